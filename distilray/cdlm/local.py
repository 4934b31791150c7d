"""Sharded datastore queries in this process: the one scatter/gather every caller shares, and a whole
datastore without actors behind the same lookup interface as the Ray router.

`split_by_shard` groups a batch of queries by the shard that owns each entry token and
`merge_shard_answers` puts the shards' answers back in input order; `LocalDatastore` calls its shards
directly, the Ray router (actors/datastore.py) and its Serve deployment call shard actors in between.
`LocalDatastore` is for small datastores next to a decoding loop (one process, no round trip per
step), tests, and the benchmark's co-located figure; large ones belong in the shard actors.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from distilray.cdlm.datastore_files import read_manifest, read_shard, shard_of
from distilray.cdlm.index import ShardIndex
from distilray.errors import DistilrayError

# (chunk token ids or None when the entry token has no keys, cosine similarity or -inf)
QueryResult = tuple[tuple[int, ...] | None, float]
MISS: QueryResult = (None, float("-inf"))


@dataclass(frozen=True)
class ShardBatch:
    """The queries of one batch that one shard answers."""

    shard: int
    index: np.ndarray  # (b_s,) positions in the batch, ascending


def split_by_shard(entries: np.ndarray, num_shards: int) -> list[ShardBatch]:
    """entries (B,) -> one ShardBatch per shard that owns at least one of them (by `shard_of`)."""
    owner = shard_of(np.asarray(entries).reshape(-1), num_shards)
    return [ShardBatch(s, np.flatnonzero(owner == s)) for s in np.unique(owner).tolist()]


def merge_shard_answers(
    size: int, batches: Sequence[ShardBatch], answers: Sequence[Sequence[QueryResult]]
) -> list[QueryResult]:
    """The shards' answers (one list per batch, in its order) as one list of `size` results in input order."""
    out: list[QueryResult] = [MISS] * size
    for batch, answer in zip(batches, answers):
        for i, result in zip(batch.index.tolist(), answer):
            out[i] = result
    return out


class LocalDatastore:
    def __init__(self, folder: str | Path, tokenizer_fingerprint: str | None = None):
        self.manifest = read_manifest(folder)
        if tokenizer_fingerprint is not None and tokenizer_fingerprint != self.manifest["tokenizer_fingerprint"]:
            raise DistilrayError(f"datastore was built with another tokenizer: {folder}")
        self.num_shards = int(self.manifest["num_shards"])
        self.shards = [ShardIndex(read_shard(Path(folder) / name)) for name in self.manifest["shards"]]

    def query_batch(self, entries: np.ndarray, queries: np.ndarray) -> list[QueryResult]:
        """entries (B,) ints, queries (B, d) floats -> per query (chunk | None, cosine), in input order."""
        entries = np.asarray(entries).reshape(-1)
        queries = np.asarray(queries, dtype=np.float32).reshape(len(entries), -1)
        if len(entries) == 1:  # one query (a decoding step): its shard answers it, no split or merge
            return self.shards[shard_of(int(entries[0]), self.num_shards)].lookup_batch(entries, queries)
        batches = split_by_shard(entries, self.num_shards)
        answers = [self.shards[b.shard].lookup_batch(entries[b.index], queries[b.index]) for b in batches]
        return merge_shard_answers(len(entries), batches, answers)

    def lookup(self, entry: int, hidden: np.ndarray) -> tuple[tuple[int, ...], float] | None:
        chunk, sim = self.query_batch(np.array([int(entry)]), np.asarray(hidden).reshape(1, -1))[0]
        return None if chunk is None else (chunk, sim)

    __call__ = lookup
