"""Prompt-lookup drafting (vLLM's `ngram` method, transformers' `prompt_lookup_num_tokens`): no model,
no training; the draft is what followed the last n tokens the last time they occurred.

For n = max_ngram down to min_ngram, the drafter looks up the last n tokens of its state (prompt plus
everything generated so far) among the earlier n-grams of the state; the first n that matches wins
(the longest match), and of its occurrences the most recent one. The tokens that followed that
occurrence, at most min(gamma, max_draft), are the draft; a match that runs into the suffix copies on
through its own draft (periodic text repeats with its period, as in LZ77). No match: an empty draft
(the loop then takes one plain target step). Drafts are point masses (`Draft(tokens)`), which the
acceptance rule handles exactly, so the output is the target's own (greedy output equals plain
greedy decoding).

Encoder-decoder targets: `encoder_ids` (the source, e.g. the article being summarised) is text the
decoder may copy from, read as if it came before the decoder's own tokens: at each n the decoder
state's latest match wins, then the source's; a copy from the source stops at its end. This is
what makes prompt lookup work for summarisation with a T5 target, whose decoder state holds only
the summary so far.

Search is O(max_ngram - min_ngram + 1) dictionary lookups per proposal: an index maps every n-gram
that has a successor in the state to the position after its latest occurrence, kept up to date token
by token on push and restored exactly on rollback from an undo log.
"""

from __future__ import annotations

import torch

from distilray.decoding.drafter_api import Draft
from distilray.decoding.sampling import Sampler
from distilray.errors import DistilrayError

NGram = tuple[int, ...]


class PromptLookupDrafter:
    """Point-mass drafts copied from the longest, most recent earlier match of the state's suffix.

    State: `_tokens` (L,); `_index[ngram] = c`, the position after the latest occurrence of `ngram`
    that ends before L - 1 (so tokens[c] exists); `_undo[p]` lists (ngram, previous value or None) for
    the index entries that appending token p changed. `_source_index` is the same map over
    `encoder_ids`, fixed for the drafter's life.
    """

    needs_target_hidden = False

    def __init__(
        self,
        vocab_size: int,
        max_ngram: int = 3,
        min_ngram: int = 1,
        max_draft: int = 8,
        encoder_ids: list[int] | None = None,
    ) -> None:
        for name, value in (("vocab_size", vocab_size), ("min_ngram", min_ngram), ("max_draft", max_draft)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise DistilrayError(f"prompt lookup: {name} must be an integer >= 1, got {value!r}")
        if not isinstance(max_ngram, int) or isinstance(max_ngram, bool) or max_ngram < min_ngram:
            raise DistilrayError(
                f"prompt lookup: max_ngram must be an integer >= min_ngram ({min_ngram}), got {max_ngram!r}"
            )
        if encoder_ids is not None and any(not 0 <= int(t) < vocab_size for t in encoder_ids):
            raise DistilrayError(f"prompt lookup: a source id is outside the vocabulary of {vocab_size}")
        self.vocab_size = vocab_size
        self.max_ngram = max_ngram
        self.min_ngram = min_ngram
        self.max_draft = max_draft
        self.matches = 0  # proposals that found a match (non-empty drafts)
        self._tokens: list[int] = []
        self._index: dict[NGram, int] = {}
        self._undo: list[list[tuple[NGram, int | None]]] = []
        # the speculative loop checks that a drafter's source is the request's (speculative_decode)
        self.encoder_ids = None if encoder_ids is None else [int(t) for t in encoder_ids]
        self._source_index: dict[NGram, int] = {}
        for p in range(1, len(self.encoder_ids or [])):  # later occurrences overwrite earlier ones
            for n in range(min_ngram, min(max_ngram, p) + 1):
                self._source_index[tuple(self.encoder_ids[p - n : p])] = p

    def start(self, prefix: list[int]) -> None:
        """Take `prefix` (non-empty) as the state (the source stays); fresh containers, so a shallow copy
        never shares them."""
        if len(prefix) == 0:
            raise DistilrayError("a drafter needs a non-empty prefix")
        self._tokens, self._index, self._undo = [], {}, []
        self.push(prefix)

    def push(self, tokens: list[int]) -> None:
        """Append tokens; appending token p makes the n-grams ending at p - 1 lookups whose successor is p."""
        for token in tokens:
            p = len(self._tokens)
            changed: list[tuple[NGram, int | None]] = []
            for n in range(self.min_ngram, min(self.max_ngram, p) + 1):
                ngram = tuple(self._tokens[p - n : p])
                changed.append((ngram, self._index.get(ngram)))
                self._index[ngram] = p
            self._tokens.append(int(token))
            self._undo.append(changed)

    def rollback(self, length: int) -> None:
        """Keep the first `length` tokens; index entries are restored newest first."""
        if not 0 <= length <= len(self._tokens):
            raise DistilrayError(f"cannot roll back to {length}: state has {len(self._tokens)} tokens")
        while len(self._tokens) > length:
            self._tokens.pop()
            for ngram, previous in reversed(self._undo.pop()):
                if previous is None:
                    del self._index[ngram]
                else:
                    self._index[ngram] = previous

    def length(self) -> int:
        return len(self._tokens)

    def lookup(self, limit: int) -> list[int]:
        """Up to `limit` tokens that followed the longest, most recent earlier match of the state's suffix
        (in the state, then in the source)."""
        end = len(self._tokens)
        for n in range(min(self.max_ngram, end), self.min_ngram - 1, -1):
            suffix = tuple(self._tokens[end - n :])
            start = self._index.get(suffix) if n < end else None  # an earlier occurrence needs n < end
            if start is not None:
                # a match that runs into the suffix repeats with period end - start: copy on through the draft
                draft: list[int] = []
                for j in range(start, start + limit):
                    draft.append(self._tokens[j] if j < end else draft[j - end])
                return draft
            start = self._source_index.get(suffix)
            if start is not None:
                return self.encoder_ids[start : start + limit]
        return []

    def propose(self, gamma: int, sampler: Sampler, target_hidden: torch.Tensor | None = None) -> Draft:
        """At most min(gamma, max_draft) copied tokens, appended to the state; empty on a miss.
        The sampler and the target's hidden state are not used: the draft is a point mass."""
        if not self._tokens:
            raise DistilrayError("the drafter has no state: call start(prefix) first")
        tokens = self.lookup(min(gamma, self.max_draft)) if gamma > 0 else []
        if tokens:
            self.matches += 1
            self.push(tokens)
        return Draft(tokens)
