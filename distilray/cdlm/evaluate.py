"""CD-LM perplexity of reference text (reference/cdlm.md section 4), plain torch/numpy.

`batch_lookup(entries (B,), queries (B, d)) -> [(chunk | None, cosine)]` is any datastore client:
the Ray router, or an in-process ShardIndex in tests. The model pass and the lookups are done once
per sequence (`sequence_proposals`); each similarity map then costs only the dynamic program, so
calibrating g_phi on held-out text is cheap.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np
import torch

from distilray.cdlm.perplexity_dp import cdlm_log_likelihood, similarity_to_prob

BatchLookup = Callable[[np.ndarray, np.ndarray], Sequence[tuple[tuple[int, ...] | None, float]]]


@dataclass(frozen=True)
class Proposals:
    """What the retriever proposes at every position of one reference sequence."""

    targets: np.ndarray  # (N-1,) tokens[1:], the predicted tokens
    lm_logprobs: np.ndarray  # (N-1,) log p_LM(tokens[n] | tokens[<n])
    chunks: list  # (N-1,) chunk proposed at n (from the query after reading tokens[<n]) or None
    sims: np.ndarray  # (N-1,) its cosine similarity (0 where none)


@torch.no_grad()
def sequence_proposals(model, tokens: np.ndarray, batch_lookup: BatchLookup) -> Proposals:
    """One teacher-forced pass and one batched lookup over a sequence. tokens: # (N,)"""
    device = next(model.parameters()).device
    ids = torch.as_tensor(np.asarray(tokens, dtype=np.int64), device=device)[None]
    out = model(input_ids=ids, output_hidden_states=True)
    logp = torch.log_softmax(out.logits[0, :-1].float(), dim=-1)  # (N-1, V)
    lm_logprobs = logp.gather(-1, ids[0, 1:, None]).squeeze(-1).cpu().numpy().astype(np.float64)
    hidden = out.hidden_states[-1][0, :-1].float().cpu().numpy()  # (N-1, d): h_{n-1} for n = 1..N-1
    answers = batch_lookup(np.asarray(tokens[:-1], dtype=np.int64), hidden)
    chunks = [chunk for chunk, _ in answers]
    sims = np.array([sim if chunk is not None else 0.0 for chunk, sim in answers])
    return Proposals(np.asarray(tokens[1:]), lm_logprobs, chunks, sims)


def perplexities(proposals: Sequence[Proposals], q_func: str, max_prob: float = 1.0) -> dict:
    """Base-LM and CD-LM perplexity over the same tokens, for one similarity-to-probability map."""
    lm_total, cd_total, n_total, hits = 0.0, 0.0, 0, 0
    for p in proposals:
        has = np.array([c is not None for c in p.chunks])
        q = np.where(has, similarity_to_prob(p.sims, q_func, max_prob), 0.0)
        lm_total += float(p.lm_logprobs.sum())
        cd_total += cdlm_log_likelihood(p.lm_logprobs, p.chunks, q, p.targets)
        n_total += len(p.targets)
        hits += sum(
            c is not None and tuple(p.targets[t : t + len(c)]) == tuple(c[: len(p.targets) - t])
            for t, c in enumerate(p.chunks)
        )
    return {
        "ppl_base": float(np.exp(-lm_total / n_total)),
        "ppl_cdlm": float(np.exp(-cd_total / n_total)),
        "tokens": n_total,
        "sequences": len(proposals),
        "exact_match_proposals": hits,
        "q_func": q_func,
    }


def corpus_perplexities(
    model, sequences: Sequence[np.ndarray], batch_lookup: BatchLookup, q_func: str, max_prob: float = 1.0
) -> dict:
    return perplexities([sequence_proposals(model, s, batch_lookup) for s in sequences], q_func, max_prob)
