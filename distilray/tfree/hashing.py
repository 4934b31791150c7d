"""Words -> sparse hashed trigram rows (reference/tfree.md section 3), the repository's md5 scheme.

A word's trigrams are the 3-byte windows of the UTF-8 of " " + word + " " (a set). Each trigram maps
to m of v rows: for slot s = 0..m-1 the first candidate md5(f"{id}_{s}_{j}") mod v (j = 0, 1, ...)
not yet taken, sorted; id = b0 + 256*b1 + 65536*b2. With k lowercase-shared slots, a trigram over
[a-zA-Z ] holding a capital takes its last k sorted rows from its lowercase form (so "The" and
"the" share rows); rows may then repeat. Special words `<|...|>` are hashed whole.

This is the repository's `initialize_hash_weight` scheme, not the paper's Algorithm 2 (hash of the
trigram string, first k hashes lowercased): only the repository's matches the released checkpoints.
Rows are computed lazily for the trigrams seen and memoised (the repository precomputes all 2^24
trigrams, hours of md5). md5, never Python's salted `hash()`, keeps rows equal across processes.
"""

from __future__ import annotations

import functools
import hashlib
from dataclasses import dataclass

import numpy as np

from distilray.errors import DistilrayError
from distilray.tfree.wordsplit import is_special

_ASCII_LETTERS_SPACE = frozenset(b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ ")


@dataclass(frozen=True)
class TrigramVocab:
    """The hash space: v rows, m rows per trigram, k of them shared with the lowercase trigram."""

    v: int = 8000  # rows of the embedding and of the head
    m: int = 10  # rows per trigram (`vocab_population`)
    k: int = 0  # lowercase-shared rows (`vocab_population_partial_lowercase`)

    def __post_init__(self) -> None:
        if self.v < 2:
            raise DistilrayError(f"TrigramVocab v must be >= 2, got {self.v}")
        if not 1 <= self.m <= self.v:  # m distinct rows must fit in v
            raise DistilrayError(f"TrigramVocab m must lie in [1, v={self.v}], got {self.m}")
        if not 0 <= self.k <= self.m:
            raise DistilrayError(f"TrigramVocab k must lie in [0, m={self.m}], got {self.k}")

    def key(self) -> dict[str, int]:
        """What a saved artifact records to be read back with the same hashing."""
        return {"v": self.v, "m": self.m, "k": self.k}


def _md5_mod(text: str, v: int) -> int:
    return int.from_bytes(hashlib.md5(text.encode("utf-8")).digest(), "big") % v


def word_trigrams(word: str) -> list[bytes]:
    """The distinct 3-byte windows of " " + word + " " in UTF-8, in first-occurrence order (a set in
    the repository; the order here only makes outputs deterministic)."""
    data = f" {word} ".encode("utf-8")
    windows = (data[i : i + 3] for i in range(len(data) - 2))
    return list(dict.fromkeys(windows))


def _is_edge(trigram: bytes) -> bool:
    return trigram.startswith(b" ") or trigram.endswith(b" ")


def _readonly(values: list[int] | tuple[int, ...]) -> np.ndarray:
    array = np.asarray(values, dtype=np.int64)
    array.flags.writeable = False  # memoised: public methods hand out copies
    return array


class TrigramHasher:
    """Memoised trigram and word rows for one `TrigramVocab`. Use `hasher_for(vocab)` to share one."""

    def __init__(self, vocab: TrigramVocab) -> None:
        self.vocab = vocab
        self._base: dict[bytes, tuple[int, ...]] = {}
        self._rows: dict[bytes, tuple[int, ...]] = {}
        self._word_rows: dict[str, np.ndarray] = {}
        self._patterns: dict[str, np.ndarray] = {}

    def _base_rows(self, trigram: bytes) -> tuple[int, ...]:
        """m distinct rows, sorted, before lowercase sharing."""
        rows = self._base.get(trigram)
        if rows is None:
            v, m = self.vocab.v, self.vocab.m
            trigram_id = int.from_bytes(trigram, "little")
            chosen: set[int] = set()
            for slot in range(m):
                j = 0
                while True:  # first candidate not taken yet; terminates since m <= v
                    candidate = _md5_mod(f"{trigram_id}_{slot}_{j}", v)
                    j += 1
                    if candidate not in chosen:
                        chosen.add(candidate)
                        break
            rows = self._base[trigram] = tuple(sorted(chosen))
        return rows

    def trigram_rows(self, trigram: bytes) -> tuple[int, ...]:
        """The m rows of one trigram, as the repository's table stores them: sorted, except that a
        lowercase-shared trigram keeps its first m-k sorted rows followed by the last k sorted rows of
        its lowercase form (unsorted, possibly repeated: pitfall 3). ASCII only (pitfall 9)."""
        if len(trigram) != 3:
            raise DistilrayError(f"a trigram is 3 bytes, got {trigram!r}")
        rows = self._rows.get(trigram)
        if rows is None:
            rows = self._base_rows(trigram)
            k = self.vocab.k
            lower = trigram.lower()
            if k > 0 and lower != trigram and all(b in _ASCII_LETTERS_SPACE for b in trigram):
                cut = self.vocab.m - k
                rows = rows[:cut] + self._base_rows(lower)[cut:]
            self._rows[trigram] = rows
        return rows

    def special_rows(self, word: str) -> tuple[int, ...]:
        """A special word hashed whole: m-k rows of the word, k of its lowercase; not deduplicated."""
        v, m, k = self.vocab.v, self.vocab.m, self.vocab.k
        own = tuple(_md5_mod(f"{word}_{i}", v) for i in range(m - k))
        return own + tuple(_md5_mod(f"{word.lower()}_lower_{i}", v) for i in range(k))

    def _memo_rows(self, word: str) -> np.ndarray:
        rows = self._word_rows.get(word)
        if rows is None:
            if not word:
                raise DistilrayError("an empty word has no trigrams")
            if is_special(word):
                flat = self.special_rows(word)
            else:
                flat = tuple(r for tri in word_trigrams(word) for r in self.trigram_rows(tri))
            rows = self._word_rows[word] = _readonly(flat)
        return rows

    def _memo_pattern(self, word: str) -> np.ndarray:
        pattern = self._patterns.get(word)
        if pattern is None:
            pattern = self._patterns[word] = _readonly(sorted(set(self._memo_rows(word).tolist())))
        return pattern

    def word_rows(self, word: str) -> np.ndarray:
        """The embedding bag of a word (int64): its trigrams' rows concatenated, repeats kept (the
        embedding sums repeated rows repeatedly), or its special rows."""
        return self._memo_rows(word).copy()

    def word_pattern(self, word: str) -> np.ndarray:
        """P_w: the sorted distinct rows of a word (int64), its training target."""
        return self._memo_pattern(word).copy()

    def edge_split(self, word: str) -> tuple[np.ndarray, np.ndarray]:
        """(N_w, E_w), sorted distinct int64: rows of the trigrams inside the word, and rows of its edge
        trigrams (starting or ending with the padding space). A row reached from both is in both. A
        special word has all its rows in N_w and E_w empty."""
        if is_special(word):
            return self.word_pattern(word), np.empty(0, dtype=np.int64)
        inner: set[int] = set()
        edge: set[int] = set()
        for tri in word_trigrams(word):
            (edge if _is_edge(tri) else inner).update(self.trigram_rows(tri))
        return np.array(sorted(inner), dtype=np.int64), np.array(sorted(edge), dtype=np.int64)

    def n_trigrams(self, word: str) -> int:
        """n_w: distinct trigrams of the word; 1 for a special word (hashed as one unit)."""
        return 1 if is_special(word) else len(word_trigrams(word))

    def encode(self, words: list[str]) -> tuple[np.ndarray, np.ndarray]:
        """Words -> (flat rows, offsets) for a sum-EmbeddingBag: word i owns flat[offsets[i]:offsets[i+1]].
        offsets has len(words) + 1 entries (int64, starting at 0)."""
        return _ragged([self._memo_rows(w) for w in words])

    def targets(self, words: list[str]) -> tuple[np.ndarray, np.ndarray]:
        """Words -> (flat patterns, offsets) in the layout of `encode`: the multi-label targets."""
        return _ragged([self._memo_pattern(w) for w in words])


def _ragged(arrays: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    offsets = np.zeros(len(arrays) + 1, dtype=np.int64)
    offsets[1:] = np.cumsum([len(a) for a in arrays])
    flat = np.concatenate(arrays) if arrays else np.empty(0, dtype=np.int64)
    return flat, offsets


@functools.lru_cache(maxsize=8)
def hasher_for(vocab: TrigramVocab) -> TrigramHasher:
    """One shared hasher per vocab in this process, so every caller reuses the same memo."""
    return TrigramHasher(vocab)
