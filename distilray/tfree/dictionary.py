"""The decoding dictionary D (reference/tfree.md 5.1, 5.2): the words a T-Free model can emit, with
each word's pattern precomputed.

T-Free predicts row activations, not words, so decoding scores a closed list of words (pitfall 6: a
word outside D cannot be generated; `with_more_words` adds a prompt's words). Patterns are stored
as CSR arrays: word i owns `indices[indptr[i]:indptr[i+1]]`, its sorted distinct rows P_w, and the
flags `in_non_edge` / `in_edge` say whether each row is in N_w (reached from a trigram inside the
word) and / or in E_w (from an edge trigram). `n_w` is the word's number of trigrams.

On disk (no pickle, pitfall 10): `dictionary.json` (format tag, vocab key, words, counts) and
`patterns.safetensors` (the CSR arrays), in a folder of their own.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterable, Mapping

import numpy as np
from safetensors import SafetensorError
from safetensors.numpy import load_file, save_file

from distilray.errors import DistilrayError
from distilray.io_utils import OUTPUT_MARKER, atomic_dir, atomic_write_json
from distilray.tfree.hashing import TrigramVocab, hasher_for
from distilray.tfree.wordsplit import SPECIAL_WORDS

FORMAT = "distilray-tfree-dictionary-v1"
_JSON = "dictionary.json"
_PATTERNS = "patterns.safetensors"
_ARRAYS = ("indptr", "indices", "in_non_edge", "in_edge", "n_w")


class Dictionary:
    """Words with counts and their patterns under one `TrigramVocab`. Treat it as immutable: decoding
    caches matrices built from it."""

    def __init__(
        self,
        words: list[str],
        counts: np.ndarray,
        vocab: TrigramVocab,
        indptr: np.ndarray,
        indices: np.ndarray,
        in_non_edge: np.ndarray,
        in_edge: np.ndarray,
        n_w: np.ndarray,
    ) -> None:
        n = len(words)
        if len(counts) != n or len(n_w) != n or len(indptr) != n + 1:
            raise DistilrayError(
                f"dictionary arrays disagree: {n} words, {len(counts)} counts, {len(n_w)} n_w, "
                f"{len(indptr)} indptr entries (expected {n + 1})"
            )
        nnz = len(indices)
        if len(in_non_edge) != nnz or len(in_edge) != nnz or (n and (indptr[0] != 0 or indptr[-1] != nnz)):
            raise DistilrayError(f"dictionary pattern arrays disagree with indptr (nnz {nnz})")
        if nnz and not (0 <= int(indices.min()) and int(indices.max()) < vocab.v):
            raise DistilrayError(f"dictionary pattern rows fall outside [0, v={vocab.v})")
        self.words = list(words)
        self.counts = np.asarray(counts, dtype=np.int64)
        self.vocab = vocab
        self.indptr = np.asarray(indptr, dtype=np.int64)
        self.indices = np.asarray(indices, dtype=np.int64)
        self.in_non_edge = np.asarray(in_non_edge, dtype=bool)
        self.in_edge = np.asarray(in_edge, dtype=bool)
        self.n_w = np.asarray(n_w, dtype=np.int64)
        self._index = {w: i for i, w in enumerate(self.words)}
        if len(self._index) != n:
            raise DistilrayError("dictionary words must be distinct")

    def __len__(self) -> int:
        return len(self.words)

    def __contains__(self, word: object) -> bool:
        return word in self._index

    def index(self, word: str) -> int:
        """The word's position in D, or -1."""
        return self._index.get(word, -1)

    def pattern(self, i: int) -> np.ndarray:
        """P_w of word i: sorted distinct rows."""
        return self.indices[self.indptr[i] : self.indptr[i + 1]]

    def with_more_words(self, words: Iterable[str]) -> Dictionary:
        """A new dictionary with the words not yet in D appended (count 0), in first-seen order."""
        new = [w for w in dict.fromkeys(words) if w and w not in self._index]
        if not new:
            return self
        extra = _from_words(new, np.zeros(len(new), dtype=np.int64), self.vocab)
        return Dictionary(
            self.words + extra.words,
            np.concatenate([self.counts, extra.counts]),
            self.vocab,
            np.concatenate([self.indptr, extra.indptr[1:] + self.indptr[-1]]),
            np.concatenate([self.indices, extra.indices]),
            np.concatenate([self.in_non_edge, extra.in_non_edge]),
            np.concatenate([self.in_edge, extra.in_edge]),
            np.concatenate([self.n_w, extra.n_w]),
        )

    def save(self, folder: str | Path) -> None:
        """Write the dictionary as `folder` (replaced as a whole, atomically). The folder must be the
        dictionary's own: one holding other files (a model's weights) is refused, not wiped."""
        folder = Path(folder)
        if folder.is_dir():
            others = sorted(p.name for p in folder.iterdir() if p.name not in (_JSON, _PATTERNS, OUTPUT_MARKER))
            if others:
                raise DistilrayError(
                    f"refusing to replace {folder} with a dictionary: it holds other files ({', '.join(others[:3])})"
                )
        meta = {"format": FORMAT, "vocab": self.vocab.key(), "words": self.words, "counts": self.counts.tolist()}
        arrays = {name: getattr(self, name) for name in _ARRAYS}
        with atomic_dir(folder) as tmp:
            save_file(arrays, str(tmp / _PATTERNS))
            atomic_write_json(tmp / _JSON, meta, indent=None)


def _from_words(words: list[str], counts: np.ndarray, vocab: TrigramVocab) -> Dictionary:
    """Compute every word's pattern and edge flags (the repository's `process_word`)."""
    hasher = hasher_for(vocab)
    indptr = np.zeros(len(words) + 1, dtype=np.int64)
    parts: list[np.ndarray] = []
    non_edge: list[np.ndarray] = []
    edge: list[np.ndarray] = []
    for i, word in enumerate(words):
        pattern = hasher.word_pattern(word)
        inner, outer = hasher.edge_split(word)
        parts.append(pattern)
        non_edge.append(np.isin(pattern, inner))
        edge.append(np.isin(pattern, outer))
        indptr[i + 1] = indptr[i] + len(pattern)

    def cat(arrays: list[np.ndarray], dtype: type) -> np.ndarray:
        return np.concatenate(arrays).astype(dtype) if arrays else np.empty(0, dtype=dtype)

    return Dictionary(
        words,
        counts,
        vocab,
        indptr,
        cat(parts, np.int64),
        cat(non_edge, bool),
        cat(edge, bool),
        np.array([hasher.n_trigrams(w) for w in words], dtype=np.int64),
    )


def build_dictionary(counts: Mapping[str, int], vocab: TrigramVocab, max_words: int | None = None) -> Dictionary:
    """D from word counts: sorted by count (descending, ties by word so builds are reproducible), cut to
    `max_words`. The special words are always in D (count 0 when absent) and never cut (pitfall 14):
    they take their slots first, the most frequent other words fill the rest. Empty words are dropped
    (they have no trigrams)."""
    if max_words is not None and max_words < len(SPECIAL_WORDS):
        raise DistilrayError(f"max_words must be >= {len(SPECIAL_WORDS)} (the special words), got {max_words}")
    for word, count in counts.items():
        if int(count) < 0:
            raise DistilrayError(f"word counts must be >= 0, got {count} for {word!r}")
    merged = {w: int(c) for w, c in counts.items() if w}
    for word in SPECIAL_WORDS:
        merged.setdefault(word, 0)
    specials = set(SPECIAL_WORDS)
    others = sorted((w for w in merged if w not in specials), key=lambda w: (-merged[w], w))
    if max_words is not None:
        others = others[: max_words - len(SPECIAL_WORDS)]
    words = sorted([*others, *SPECIAL_WORDS], key=lambda w: (-merged[w], w))
    return _from_words(words, np.array([merged[w] for w in words], dtype=np.int64), vocab)


def load_dictionary(folder: str | Path, vocab: TrigramVocab | None = None) -> Dictionary:
    """Read a dictionary saved by `Dictionary.save`; `vocab` (the model's) must match the stored one."""
    folder = Path(folder)
    meta_path, patterns_path = folder / _JSON, folder / _PATTERNS
    for path in (meta_path, patterns_path):
        if not path.is_file():
            raise DistilrayError(f"no T-Free dictionary at {folder}: {path.name} is missing")
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise DistilrayError(f"corrupt T-Free dictionary {meta_path}: {err}") from err
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise DistilrayError(f"{meta_path} is not a {FORMAT} file")
    try:
        stored = TrigramVocab(**meta["vocab"])
        words, counts = list(meta["words"]), np.array(meta["counts"], dtype=np.int64)
    except (KeyError, TypeError, ValueError) as err:
        raise DistilrayError(f"corrupt T-Free dictionary {meta_path}: {err!r}") from err
    if vocab is not None and stored != vocab:
        raise DistilrayError(f"dictionary at {folder} was built for {stored}, but the model uses {vocab}")
    if not words:
        raise DistilrayError(f"the T-Free dictionary at {folder} is empty")
    try:
        arrays = load_file(str(patterns_path))
    except SafetensorError as err:
        raise DistilrayError(f"corrupt T-Free dictionary {patterns_path}: {err}") from err
    missing = [name for name in _ARRAYS if name not in arrays]
    if missing:
        raise DistilrayError(f"{patterns_path} lacks {', '.join(missing)}")
    return Dictionary(words, counts, stored, *(arrays[n] for n in _ARRAYS))
