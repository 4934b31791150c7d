"""CD-LM `verify` as a drafter: a retrieved chunk is a point-mass draft for the speculative loop
(reference/cdlm.md 10.1, reference/speculative.md 2).

The datastore maps (token, the model's final-layer hidden state at that token) to the chunk that
followed it. The loop hands the drafter the hidden state of the last position the target has
processed, which lags the token state by one: the state ends [..., x, y] with x fed and y the
correction or bonus token just sampled from p(. | ..., x). So the drafter looks up (x, h(x)); a chunk
c_1..c_tau above the similarity threshold whose first token is y continues after y with c_2..c_tau,
which it proposes. A chunk that does not start with y, or no chunk, is an empty draft: the loop then
takes one plain target step. Sampling y from p and keeping the chunk when c_1 == y accepts c_1 with
probability p(c_1), the point-mass rule, and every other token is verified by the loop, so the output
is distributed exactly as the model's own (greedy output equals plain greedy decoding).
"""

from __future__ import annotations

from typing import Callable

import numpy as np
import torch

from distilray.decoding.drafter_api import Draft
from distilray.decoding.sampling import Sampler
from distilray.errors import DistilrayError
from distilray.models.module_io import TokenListState

# (last token id, query hidden state (d,) float32) -> (chunk token ids, cosine similarity) or None
Lookup = Callable[[int, np.ndarray], tuple[tuple[int, ...], float] | None]


def query_chunk(
    lookup: Lookup, token: int, hidden: torch.Tensor, threshold: float, vocab_size: int
) -> tuple[int, ...] | None:
    """The chunk retrieved after `token` with hidden (d,) (float32, any device), or None below the threshold."""
    found = lookup(int(token), hidden.detach().cpu().numpy().astype(np.float32, copy=False))
    if found is None:
        return None
    chunk, similarity = found
    if len(chunk) == 0 or not similarity >= threshold:
        return None
    chunk = tuple(int(t) for t in chunk)
    if not all(0 <= t < vocab_size for t in chunk):
        raise DistilrayError(
            f"the lookup returned a chunk with token ids outside the vocabulary of {vocab_size}: {chunk}"
        )
    return chunk


class ChunkDrafter(TokenListState):
    """Proposes retrieved chunks as point-mass drafts; counts the chunks it drafted (state: the token list)."""

    needs_target_hidden = True

    def __init__(self, lookup: Lookup, similarity_threshold: float, vocab_size: int) -> None:
        self.lookup = lookup
        self.threshold = similarity_threshold
        self.vocab_size = vocab_size
        self.chunks_used = 0  # proposals that were a chunk (non-empty drafts)
        self._tokens: list[int] = []

    def propose(self, gamma: int, sampler: Sampler, target_hidden: torch.Tensor | None = None) -> Draft:
        """The chunk after the state's last token, at most gamma tokens; empty on a miss.

        target_hidden: (d,) at the second-to-last token of the state; None before the first target pass.
        """
        if gamma == 0 or target_hidden is None or len(self._tokens) < 2:
            return Draft([])
        chunk = query_chunk(self.lookup, self._tokens[-2], target_hidden, self.threshold, self.vocab_size)
        if chunk is None or chunk[0] != self._tokens[-1] or len(chunk) < 2:
            return Draft([])
        tokens = list(chunk[1 : 1 + gamma])
        self.chunks_used += 1
        self._tokens.extend(tokens)
        return Draft(tokens)
