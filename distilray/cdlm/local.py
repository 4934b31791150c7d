"""A whole datastore in this process, no actors: the same lookup interface as the Ray router.

For small datastores next to a decoding loop (one process, no round trip per step), tests, and the
benchmark's co-located figure. Large datastores belong in the shard actors (actors/datastore.py).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from distilray.cdlm.datastore_files import read_manifest, read_shard, shard_of
from distilray.cdlm.index import ShardIndex
from distilray.errors import DistilrayError


class LocalDatastore:
    def __init__(self, folder: str | Path, tokenizer_fingerprint: str | None = None):
        self.manifest = read_manifest(folder)
        if tokenizer_fingerprint is not None and tokenizer_fingerprint != self.manifest["tokenizer_fingerprint"]:
            raise DistilrayError(f"datastore was built with another tokenizer: {folder}")
        self.num_shards = int(self.manifest["num_shards"])
        self.shards = [ShardIndex(read_shard(Path(folder) / name)) for name in self.manifest["shards"]]

    def query_batch(self, entries: np.ndarray, queries: np.ndarray) -> list[tuple[tuple[int, ...] | None, float]]:
        entries = np.asarray(entries).reshape(-1)
        queries = np.asarray(queries, dtype=np.float32).reshape(len(entries), -1)
        out: list[tuple[tuple[int, ...] | None, float]] = [(None, float("-inf"))] * len(entries)
        owner = shard_of(entries, self.num_shards)
        for s in np.unique(owner).tolist():
            idx = np.flatnonzero(owner == s)
            for i, answer in zip(idx.tolist(), self.shards[s].lookup_batch(entries[idx], queries[idx])):
                out[i] = answer
        return out

    def lookup(self, entry: int, hidden: np.ndarray) -> tuple[tuple[int, ...], float] | None:
        chunk, sim = self.query_batch(np.array([int(entry)]), np.asarray(hidden).reshape(1, -1))[0]
        return None if chunk is None else (chunk, sim)

    __call__ = lookup
