"""Top-1 cosine search over one datastore shard, per entry token (reference/cdlm.md 3.5, 10.3).

Keys are L2-normalised once at load time, queries per batch, so cosine similarity is an inner
product. Each entry token's rows form a group, searched by one of three back ends chosen by its size:

- fewer than `faiss_min_rows` rows: a numpy matmul (exact; for tiny groups the call overhead of
  faiss outweighs its kernel);
- `faiss_min_rows` up to `approx_min_rows` rows: `faiss.IndexFlatIP` (exact, blocked top-1 without
  materialising the (b, n) score matrix);
- more than `approx_min_rows` rows: `faiss.IndexHNSWFlat` with METRIC_INNER_PRODUCT (approximate,
  graph search; no training step, so it can be built from the keys alone). Recall depends on the
  data: top-1 matched exact search on clustered keys in a local check, but only about half the time on
  structureless random 256-d keys at efSearch 128; raise `hnsw_ef_search` to trade speed for recall.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from distilray.cdlm.datastore_files import ShardData
from distilray.errors import DistilrayError

_EPS = 1e-12
_BLOCK = 65536  # rows normalised at a time (bounds float32 temporaries)


def _normalise(x: np.ndarray) -> np.ndarray:
    """(n, d) -> float32 rows of unit L2 norm (zero rows stay zero)."""
    x = np.asarray(x, dtype=np.float32)
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return x / np.maximum(norms, _EPS)


class ShardIndex:
    """Exact (or, for huge groups, HNSW) top-1 cosine search grouped by entry token.

    Row numbers are those of the ShardData (sorted by entry token), so `chunk(row)` resolves them.
    """

    def __init__(
        self,
        data: ShardData,
        *,
        faiss_min_rows: int = 256,
        approx_min_rows: int = 200_000,
        hnsw_m: int = 32,
        hnsw_ef_search: int = 128,
    ) -> None:
        if faiss_min_rows < 1 or approx_min_rows < 1:
            raise DistilrayError("faiss_min_rows and approx_min_rows must be >= 1")
        self._hidden_dim = data.hidden_dim
        self._num_keys = data.num_keys
        self._chunk_id = np.ascontiguousarray(data.chunk_id, dtype=np.int32)  # (n,)
        self._chunk_tokens = np.ascontiguousarray(data.chunk_tokens, dtype=np.int32)
        self._chunk_offsets = np.ascontiguousarray(data.chunk_offsets, dtype=np.int64)
        self.faiss_min_rows = int(faiss_min_rows)
        self.approx_min_rows = int(approx_min_rows)

        # Groups: entries (G,) sorted, row starts (G,) and sizes (G,) in the ShardData order.
        entries, starts, counts = np.unique(data.entry_token, return_index=True, return_counts=True)
        self._entries = entries.astype(np.int64)
        self._starts = starts.astype(np.int64)
        self._counts = counts.astype(np.int64)
        self._group_of = {int(e): g for g, e in enumerate(entries.tolist())}  # one query: no array bookkeeping

        # Small groups share one compact float32 matrix; big groups live only in their faiss index,
        # so no key is held twice. Normalised block by block: no full float32 copy of all keys.
        small = self._counts < self.faiss_min_rows
        sizes = self._counts[small]
        self._small_offset = np.full(len(entries), -1, dtype=np.int64)
        self._small_offset[small] = np.cumsum(sizes) - sizes
        small_rows = np.flatnonzero(np.repeat(small, self._counts))  # grouped, in ShardData order
        self._small_keys = np.empty((small_rows.shape[0], self._hidden_dim), dtype=np.float32)
        for start in range(0, small_rows.shape[0], _BLOCK):
            block = small_rows[start : start + _BLOCK]
            self._small_keys[start : start + block.shape[0]] = _normalise(data.keys[block])
        self._faiss: dict[int, Any] = {}  # group index -> faiss index
        for g in np.flatnonzero(~small).tolist():
            rows = data.keys[int(self._starts[g]) : int(self._starts[g] + self._counts[g])]
            self._faiss[g] = self._build_faiss(rows, hnsw_m, hnsw_ef_search)

    def _build_faiss(self, keys: np.ndarray, hnsw_m: int, ef_search: int) -> Any:
        """keys: (n, d) raw (float16) rows of one group -> a faiss index over their unit vectors."""
        import faiss  # lazy: processes that only read files never load its OpenMP runtime

        d = self._hidden_dim
        if keys.shape[0] > self.approx_min_rows:
            index = faiss.IndexHNSWFlat(d, int(hnsw_m), faiss.METRIC_INNER_PRODUCT)
            index.hnsw.efConstruction = max(40, 2 * int(hnsw_m))
            index.hnsw.efSearch = int(ef_search)
        else:
            index = faiss.IndexFlatIP(d)
        for start in range(0, keys.shape[0], _BLOCK):
            index.add(np.ascontiguousarray(_normalise(keys[start : start + _BLOCK])))
        return index

    # -- properties ---------------------------------------------------------------------------

    @property
    def num_keys(self) -> int:
        return self._num_keys

    @property
    def hidden_dim(self) -> int:
        return self._hidden_dim

    @property
    def num_entries(self) -> int:
        """Distinct entry tokens with at least one key."""
        return int(self._entries.shape[0])

    def backend_counts(self) -> dict[str, int]:
        """How many entry-token groups use each back end."""
        if not self._faiss:
            return {"numpy": self.num_entries, "flat_ip": 0, "hnsw": 0}
        import faiss

        hnsw = sum(isinstance(ix, faiss.IndexHNSWFlat) for ix in self._faiss.values())
        return {"numpy": self.num_entries - len(self._faiss), "flat_ip": len(self._faiss) - hnsw, "hnsw": hnsw}

    def memory_bytes(self) -> int:
        """Approximate resident bytes of keys, graphs, chunk table and group arrays."""
        total = self._small_keys.nbytes + self._chunk_id.nbytes + self._chunk_tokens.nbytes
        total += self._chunk_offsets.nbytes + 4 * self._entries.nbytes
        for index in self._faiss.values():
            total += index.ntotal * self._hidden_dim * 4
            hnsw = getattr(index, "hnsw", None)
            if hnsw is not None:  # neighbour lists (int32) and per-node offsets/levels
                total += hnsw.neighbors.size() * 4 + hnsw.offsets.size() * 8 + hnsw.levels.size() * 4
        return int(total)

    # -- search -------------------------------------------------------------------------------

    def search(self, entries: np.ndarray, queries: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Best row under each query's own entry token.

        entries: (B,) ints; queries: (B, d) floats (normalised here).
        Returns rows (B,) int64 (-1 when the entry token has no keys) and cosine sims (B,) float32
        (-inf for those).
        """
        entries = np.asarray(entries).reshape(-1)
        queries = np.asarray(queries)
        b = entries.shape[0]
        if queries.shape != (b, self._hidden_dim):
            raise DistilrayError(f"queries must be ({b}, {self._hidden_dim}) for {b} entries, got {queries.shape}")
        if b and not np.issubdtype(entries.dtype, np.integer):
            raise DistilrayError(f"entry tokens must be integers, got dtype {entries.dtype}")
        q = _normalise(queries)
        if not np.all(np.isfinite(q)):
            raise DistilrayError("queries contain NaN or inf")
        rows = np.full(b, -1, dtype=np.int64)
        sims = np.full(b, -np.inf, dtype=np.float32)
        if b == 0 or self.num_entries == 0:
            return rows, sims

        if b == 1:  # a decoding step's one query: a dict lookup instead of the batch's sort and split
            g = self._group_of.get(int(entries[0]))
            if g is not None:
                best, best_sim = self._search_group(g, q)
                if best[0] >= 0:  # HNSW can return -1 when its graph search finds nothing
                    rows[0], sims[0] = self._starts[g] + best[0], best_sim[0]
            return rows, sims
        group = np.searchsorted(self._entries, entries)
        found = group < self.num_entries
        found[found] = self._entries[group[found]] == entries[found]
        # One search per distinct group in the batch: sort the hits by group, cut into runs.
        hit = np.flatnonzero(found)
        if hit.size == 0:
            return rows, sims
        hit = hit[np.argsort(group[hit], kind="stable")]
        hit_groups = group[hit]
        cuts = np.flatnonzero(np.diff(hit_groups)) + 1
        for idx in np.split(hit, cuts):
            g = int(group[idx[0]])
            best, best_sim = self._search_group(g, q[idx])
            ok = best >= 0  # HNSW can return -1 when its graph search finds nothing
            rows[idx[ok]] = self._starts[g] + best[ok]
            sims[idx[ok]] = best_sim[ok]
        return rows, sims

    def _search_group(self, g: int, q: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """q: (b, d) unit queries -> (local row (b,) int64, sim (b,) float32) within group g."""
        index = self._faiss.get(g)
        if index is not None:
            dist, ids = index.search(np.ascontiguousarray(q), 1)
            return ids[:, 0].astype(np.int64), dist[:, 0].astype(np.float32)
        off, n = int(self._small_offset[g]), int(self._counts[g])
        scores = q @ self._small_keys[off : off + n].T  # (b, n)
        best = np.argmax(scores, axis=1)
        return best.astype(np.int64), scores[np.arange(q.shape[0]), best].astype(np.float32)

    def chunk(self, row: int) -> tuple[int, ...]:
        """Token ids of the chunk stored at `row` (a row returned by search)."""
        row = int(row)
        if not 0 <= row < self._num_keys:
            raise DistilrayError(f"row {row} outside 0..{self._num_keys - 1}")
        c = int(self._chunk_id[row])
        return tuple(int(t) for t in self._chunk_tokens[self._chunk_offsets[c] : self._chunk_offsets[c + 1]])

    def lookup_batch(self, entries: np.ndarray, queries: np.ndarray) -> list[tuple[tuple[int, ...] | None, float]]:
        """search + chunk: per query (chunk token ids, cosine), or (None, -inf) on no keys."""
        rows, sims = self.search(entries, queries)
        return [(self.chunk(r) if r >= 0 else None, float(s)) for r, s in zip(rows.tolist(), sims.tolist())]
