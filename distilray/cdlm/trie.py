"""Token trie of mined phrases, grouped by entry token (reference note 3.4).

Root children are entry tokens; the path below an entry token spells a chunk; the node where an
inserted chunk ends holds the list of its occurrences (window_id, entry_pos). Identical phrases
from different windows therefore share one node, and every occurrence later becomes one key row
(the hidden state at its entry position) pointing at that node's chunk.
"""

from __future__ import annotations

from typing import Iterable, Iterator

import numpy as np

from distilray.cdlm.mining import Phrase
from distilray.errors import DistilrayError


class _Node:
    """A trie node: children by token id, and occurrences when an inserted chunk ends here."""

    __slots__ = ("children", "occurrences")

    def __init__(self) -> None:
        self.children: dict[int, _Node] = {}
        self.occurrences: list[tuple[int, int]] | None = None  # None: no chunk ends here


class ChunkTrie:
    """Trie of (entry token, chunk) pairs with their occurrences.

    Insertion order of occurrences is kept (so a cap keeps the first ones); chunks are listed in
    lexicographic token order, which does not depend on the order phrases arrived in (shards built
    in parallel give the same datastore).
    """

    def __init__(self) -> None:
        self._root = _Node()
        self._num_chunks = 0
        self._num_occurrences = 0
        self._total_chunk_tokens = 0  # sum of lengths over distinct chunks

    # -- building -------------------------------------------------------------------------------

    def insert(self, phrase: Phrase) -> None:
        """Add one occurrence of `phrase` (its chunk must hold at least one token)."""
        if len(phrase.chunk) == 0:
            raise DistilrayError(f"phrase with entry token {phrase.entry_token} has an empty chunk")
        node = self._root.children.setdefault(int(phrase.entry_token), _Node())
        for token in phrase.chunk:
            node = node.children.setdefault(int(token), _Node())
        if node.occurrences is None:
            node.occurrences = []
            self._num_chunks += 1
            self._total_chunk_tokens += len(phrase.chunk)
        node.occurrences.append((int(phrase.window_id), int(phrase.entry_pos)))
        self._num_occurrences += 1

    def insert_many(self, phrases: Iterable[Phrase]) -> None:
        """Insert every phrase of an iterable, in order."""
        for phrase in phrases:
            self.insert(phrase)

    # -- reading --------------------------------------------------------------------------------

    def entry_tokens(self) -> list[int]:
        """Entry tokens that have at least one chunk, sorted ascending."""
        return sorted(self._root.children)

    def __contains__(self, entry: object) -> bool:
        return entry in self._root.children

    def _walk(self, entry: int) -> Iterator[tuple[tuple[int, ...], list[tuple[int, int]]]]:
        """(chunk, occurrences) for every chunk under `entry`, lexicographic, prefixes first."""
        start = self._root.children.get(int(entry))
        if start is None:
            return
        # Explicit stack instead of recursion: chunks can be as long as a window (hundreds of tokens).
        stack: list[tuple[_Node, tuple[int, ...]]] = [(start, ())]
        while stack:
            node, path = stack.pop()
            if node.occurrences is not None:
                yield path, node.occurrences
            for token in sorted(node.children, reverse=True):  # reversed so the smallest pops first
                stack.append((node.children[token], path + (token,)))

    def chunks_for(self, entry: int) -> list[tuple[int, ...]]:
        """Distinct chunks stored under `entry` (empty if unknown), in lexicographic token order."""
        return [chunk for chunk, _ in self._walk(entry)]

    def occurrences(self, entry: int, chunk: tuple[int, ...]) -> list[tuple[int, int]]:
        """(window_id, entry_pos) of every occurrence of `chunk` after `entry`, in insertion order.

        Empty when the pair was never inserted (also when `chunk` is only a prefix of stored chunks).
        """
        node = self._root.children.get(int(entry))
        for token in chunk:
            if node is None:
                return []
            node = node.children.get(int(token))
        if node is None or node.occurrences is None:
            return []
        return list(node.occurrences)

    def num_chunks(self) -> int:
        """Distinct (entry token, chunk) pairs."""
        return self._num_chunks

    def num_occurrences(self) -> int:
        """All recorded occurrences (the number of key rows before any cap)."""
        return self._num_occurrences

    def mean_chunk_length(self) -> float:
        """Mean length in tokens over distinct chunks (0.0 for an empty trie)."""
        return self._total_chunk_tokens / self._num_chunks if self._num_chunks else 0.0

    def flatten(
        self, entry: int, max_keys_per_chunk: int | None = None
    ) -> tuple[np.ndarray, list[tuple[int, ...]], np.ndarray]:
        """One row per kept occurrence of the chunks under `entry`: what the datastore gathers keys with.

        max_keys_per_chunk: keep at most this many occurrences per chunk (the first inserted), to
            deduplicate keys of frequent chunks (note 10.4); None keeps all.

        Returns
            chunk_index_per_key: (n_e,) int64, row r's chunk is chunks[chunk_index_per_key[r]];
            chunks: distinct chunks in `chunks_for` order;
            positions: (n_e, 2) int64, row r = (window_id, entry_pos) whose hidden state is key r.
        Rows are grouped by chunk, in chunk order. Unknown entries give empty arrays.
        """
        if max_keys_per_chunk is not None and int(max_keys_per_chunk) < 1:
            raise DistilrayError(f"max_keys_per_chunk must be >= 1 or None, got {max_keys_per_chunk}")
        chunks: list[tuple[int, ...]] = []
        index: list[int] = []
        rows: list[tuple[int, int]] = []
        for chunk, occ in self._walk(entry):
            kept = occ if max_keys_per_chunk is None else occ[: int(max_keys_per_chunk)]
            index.extend([len(chunks)] * len(kept))
            rows.extend(kept)
            chunks.append(chunk)
        chunk_index = np.asarray(index, dtype=np.int64)
        positions = np.asarray(rows, dtype=np.int64).reshape(len(rows), 2)
        return chunk_index, chunks, positions
