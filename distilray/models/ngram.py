"""Count-based n-gram drafter (n = 1..4) with add-one smoothing and back-off.

Counting: for every position i of every training sequence and every context length k in 0..n-1 with
k <= i, the pair (context = seq[i-k:i], next token = seq[i]) is counted. Short contexts at the start
of a sequence are therefore counted too, which is what a drafter sees on a short prompt.

Probability rule (exact):
    ctx  = the longest suffix of `context`, of length <= n-1, that was seen as a context in training
           (the empty context always qualifies; if the corpus was empty its total is 0)
    P(t) = (count(ctx, t) + 1) / (total(ctx) + V)
This is "use the longest seen context, add-one over the vocabulary": no interpolation and no
discounting, so probabilities of one context sum to exactly 1. With n = 1 it is the add-one unigram.

Storage is JSON (lists), never pickle: a model file from elsewhere must not be able to run code.
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path
from typing import Iterable

import numpy as np
import torch

from distilray.errors import DistilrayError
from distilray.io_utils import atomic_dir, atomic_write_json, read_json
from distilray.models.module_io import TokenListState

Context = tuple[int, ...]
FORMAT = "distilray-ngram-v1"


class NGramDrafter(TokenListState):
    """n-gram language model usable as a speculative-decoding drafter (state = the token list)."""

    def __init__(self, n: int, vocab_size: int) -> None:
        if not 1 <= int(n) <= 4:
            raise DistilrayError(f"n-gram order must be in 1..4, got {n}")
        if int(vocab_size) < 1:
            raise DistilrayError(f"vocab_size must be positive, got {vocab_size}")
        self.n = int(n)
        self.vocab_size = int(vocab_size)
        # Mutable counts while fitting/merging; compiled to arrays lazily for fast lookup.
        self._counts: dict[Context, dict[int, int]] = defaultdict(lambda: defaultdict(int))
        self._table: dict[Context, tuple[np.ndarray, np.ndarray]] | None = None
        self._totals: dict[Context, int] = {}
        self._tokens: list[int] = []

    # ------------------------------------------------------------------ fitting
    def fit(self, token_sequences: Iterable[list[int]]) -> "NGramDrafter":
        """Add the counts of `token_sequences` (may be called repeatedly, e.g. per shard)."""
        for seq in token_sequences:
            seq = [int(t) for t in seq]
            for t in seq:
                if not 0 <= t < self.vocab_size:
                    raise DistilrayError(f"token id {t} outside vocabulary of size {self.vocab_size}")
            for i, tok in enumerate(seq):
                for k in range(min(self.n - 1, i) + 1):
                    self._counts[tuple(seq[i - k : i])][tok] += 1
        self._table = None
        return self

    def merge_counts(self, other: "NGramDrafter") -> "NGramDrafter":
        """Add `other`'s counts into self, so models fitted on shards combine to the union's model."""
        if (other.n, other.vocab_size) != (self.n, self.vocab_size):
            raise DistilrayError(
                f"cannot merge n-gram (n={other.n}, V={other.vocab_size}) into (n={self.n}, V={self.vocab_size})"
            )
        for ctx, nxt in other._counts.items():
            mine = self._counts[ctx]
            for tok, c in nxt.items():
                mine[tok] += c
        self._table = None
        return self

    def _compile(self) -> dict[Context, tuple[np.ndarray, np.ndarray]]:
        # Sorted id arrays + counts: one dict lookup per context, then a vectorised scatter.
        if self._table is None:
            table, totals = {}, {}
            for ctx, nxt in self._counts.items():
                ids = np.array(sorted(nxt), dtype=np.int64)
                counts = np.array([nxt[i] for i in ids.tolist()], dtype=np.int64)
                if counts.sum() > 0:
                    table[ctx], totals[ctx] = (ids, counts), int(counts.sum())
            self._table, self._totals = table, totals
        return self._table

    # ------------------------------------------------------------------ probabilities
    def _backoff_context(self, context: list[int] | tuple[int, ...]) -> Context:
        """Longest suffix of `context` (length <= n-1) seen in training; () if none."""
        table = self._compile()
        # max(0, .): a context shorter than n-1 is used whole (a negative start would keep only its tail)
        ctx = tuple(int(t) for t in context[max(0, len(context) - (self.n - 1)) :]) if self.n > 1 else ()
        while ctx and ctx not in table:
            ctx = ctx[1:]
        return ctx

    def probs(self, context: list[int] | tuple[int, ...]) -> np.ndarray:
        """(V,) float64 next-token distribution after `context` (sums to 1)."""
        ctx = self._backoff_context(context)
        out = np.ones(self.vocab_size, dtype=np.float64)
        entry = self._table.get(ctx)  # type: ignore[union-attr]
        total = 0
        if entry is not None:
            ids, counts = entry
            out[ids] += counts
            total = self._totals[ctx]
        return out / (total + self.vocab_size)

    def prob(self, context: list[int] | tuple[int, ...], token: int) -> float:
        """P(token | context) under the rule in the module docstring."""
        ctx = self._backoff_context(context)
        entry = self._table.get(ctx)  # type: ignore[union-attr]
        count, total = 0, 0
        if entry is not None:
            ids, counts = entry
            j = int(np.searchsorted(ids, token))
            count = int(counts[j]) if j < len(ids) and ids[j] == token else 0
            total = self._totals[ctx]
        return (count + 1) / (total + self.vocab_size)

    # ------------------------------------------------------------------ drafter interface
    def next_logits(self) -> torch.Tensor:
        """(V,) float32 log-probabilities of the next token."""
        return torch.from_numpy(np.log(self.probs(self._tokens))).to(torch.float32)

    # ------------------------------------------------------------------ persistence
    def to_rows(self) -> list[list]:
        """Counts as plain lists [context, token ids, counts]: the file format, and what shards send."""
        return [[list(ctx), ids.tolist(), counts.tolist()] for ctx, (ids, counts) in sorted(self._compile().items())]

    @classmethod
    def from_rows(cls, n: int, vocab_size: int, rows: list, where: str = "counts") -> "NGramDrafter":
        model = cls(n, vocab_size)
        try:
            for ctx, ids, counts in rows:
                if len(ids) != len(counts) or len(ctx) >= model.n:
                    raise ValueError(f"bad row for context {ctx}")
                nxt = model._counts[tuple(int(t) for t in ctx)]
                for tok, c in zip(ids, counts):
                    if not 0 <= int(tok) < model.vocab_size or int(c) < 0:
                        raise ValueError(f"bad count {tok}:{c}")
                    nxt[int(tok)] += int(c)
        except (TypeError, ValueError) as e:
            raise DistilrayError(f"{where} is corrupt: {e}") from None
        return model

    def save(self, folder: str | Path) -> None:
        """Write config.json and counts.json (lists of [context, token ids, counts]) atomically."""
        with atomic_dir(folder) as tmp:
            atomic_write_json(tmp / "config.json", {"format": FORMAT, "n": self.n, "vocab_size": self.vocab_size})
            atomic_write_json(tmp / "counts.json", self.to_rows(), indent=None)

    @classmethod
    def load(cls, folder: str | Path) -> "NGramDrafter":
        folder = Path(folder)
        try:
            config = read_json(folder / "config.json")
            rows = read_json(folder / "counts.json")
        except (OSError, ValueError) as e:
            raise DistilrayError(f"{folder} is not a readable n-gram folder: {e}") from None
        if not isinstance(config, dict) or config.get("format") != FORMAT:
            raise DistilrayError(f"{folder}/config.json is not a {FORMAT} config")
        return cls.from_rows(config["n"], config["vocab_size"], rows, where=f"{folder}/counts.json")
