"""Sharded CD-LM datastore on Ray: one actor per shard file, and a router that fans queries out.

Queries are routed by entry token (`token % num_shards`, the partition the files were written
with), so each query touches exactly one shard. Shard actors are restartable and their queries
idempotent: an actor that dies reloads its file from disk, and the calls that were in flight are
retried on the new instance instead of failing.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import numpy as np
import ray

from distilray.cdlm.datastore_files import read_manifest, read_shard
from distilray.cdlm.index import ShardIndex
from distilray.cdlm.local import QueryResult, ShardBatch, merge_shard_answers, split_by_shard
from distilray.errors import DistilrayError


class DatastoreShard:
    """Holds one shard file in memory as a ShardIndex. Plain class; `start_shard_actor` makes it remote."""

    def __init__(self, path: str, faiss_min_rows: int = 256, approx_min_rows: int = 200_000) -> None:
        start = time.perf_counter()
        self._path = str(path)
        data = read_shard(path)
        self._shard_index = data.shard_index
        self._num_shards = data.num_shards
        self._num_chunks = data.num_chunks
        self._index = ShardIndex(data, faiss_min_rows=faiss_min_rows, approx_min_rows=approx_min_rows)
        del data  # the index keeps what it needs (normalised keys, chunk table)
        self._load_seconds = time.perf_counter() - start
        self._queries = 0
        self._batches = 0

    def ready(self) -> dict[str, Any]:
        """Answers once the shard is loaded; the shard's identity for the router to check."""
        return {
            "shard_index": self._shard_index,
            "num_shards": self._num_shards,
            "hidden_dim": self._index.hidden_dim,
            "num_keys": self._index.num_keys,
        }

    def query(self, entries: np.ndarray, queries: np.ndarray) -> list[QueryResult]:
        """entries (b,) ints, queries (b, d) floats -> per query (chunk | None, cosine)."""
        result = self._index.lookup_batch(entries, queries)
        self._queries += len(result)
        self._batches += 1
        return result

    def stats(self) -> dict[str, Any]:
        """Counters since this instance started (a restart resets them) and memory use."""
        try:
            restarted = bool(ray.get_runtime_context().was_current_actor_reconstructed)
        except Exception:  # not running as an actor (tests may use the plain class)
            restarted = False
        return {
            "path": self._path,
            "shard_index": self._shard_index,
            "num_keys": self._index.num_keys,
            "num_chunks": self._num_chunks,
            "num_entries": self._index.num_entries,
            "memory_bytes": self._index.memory_bytes(),
            "backends": self._index.backend_counts(),
            "load_seconds": self._load_seconds,
            "queries": self._queries,
            "batches": self._batches,
            "pid": os.getpid(),
            "restarted": restarted,
        }


def _datastore_resource(num_shards: int) -> dict[str, float]:
    """{"datastore": x} when the cluster defines that custom resource, else {}.

    Each shard asks for one unit, or an equal fraction when there are fewer units than shards, so
    all shards still fit on the nodes set aside for the datastore instead of pending forever.
    """
    total = float(ray.cluster_resources().get("datastore", 0.0))
    if total <= 0:
        return {}
    return {"datastore": min(1.0, round(total / max(num_shards, 1), 4))}


def start_shard_actor(
    path: str | Path,
    *,
    num_shards: int = 1,
    num_cpus: float = 0.0,
    faiss_min_rows: int = 256,
    approx_min_rows: int = 200_000,
) -> "ray.actor.ActorHandle":
    """Start one DatastoreShard actor on `path`.

    max_restarts=-1: a crashed shard reloads from disk; max_task_retries=-1: queries are idempotent,
    so one in flight during a crash is re-run on the new instance rather than lost.
    num_cpus=0 by default: lookups are short and must not starve trainers on a small machine.
    """
    options: dict[str, Any] = {"num_cpus": num_cpus, "max_restarts": -1, "max_task_retries": -1}
    resources = _datastore_resource(num_shards)
    if resources:
        options["resources"] = resources
    actor_cls = ray.remote(DatastoreShard).options(**options)
    return actor_cls.remote(str(path), faiss_min_rows, approx_min_rows)


def _root_cause(exc: Exception) -> str:
    """The DistilrayError line of an actor's creation-task traceback, else its last line."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    for line in reversed(lines):
        if "DistilrayError: " in line:
            return line.split("DistilrayError: ", 1)[1]
    return lines[-1] if lines else type(exc).__name__


class DatastoreRouter:
    """Client of a sharded datastore: plain object holding actor handles (picklable, so a Serve
    deployment can hold one). Open with `DatastoreRouter.open(folder)`."""

    def __init__(self, folder: str, manifest: dict[str, Any], handles: list) -> None:
        self.folder = folder
        self.manifest = manifest
        self._handles = handles
        self.num_shards = int(manifest["num_shards"])
        self.hidden_dim = int(manifest["hidden_dim"])

    @classmethod
    def open(
        cls,
        folder: str | Path,
        tokenizer_fingerprint: str | None = None,
        *,
        num_cpus: float = 0.0,
        faiss_min_rows: int = 256,
        approx_min_rows: int = 200_000,
        ready_timeout_s: float | None = 600.0,
    ) -> "DatastoreRouter":
        """Read the manifest, check the tokenizer, start one actor per shard, wait until all loaded."""
        manifest = read_manifest(folder)
        built_with = manifest["tokenizer_fingerprint"]
        if tokenizer_fingerprint is not None and tokenizer_fingerprint != built_with:
            raise DistilrayError(
                f"datastore was built with another tokenizer (fingerprint {built_with!r}, "
                f"the model's is {tokenizer_fingerprint!r}): {folder}"
            )
        num_shards = int(manifest["num_shards"])
        handles = [
            start_shard_actor(
                Path(folder) / name,
                num_shards=num_shards,
                num_cpus=num_cpus,
                faiss_min_rows=faiss_min_rows,
                approx_min_rows=approx_min_rows,
            )
            for name in manifest["shards"]
        ]
        router = cls(str(folder), manifest, handles)
        try:
            infos = ray.get([h.ready.remote() for h in handles], timeout=ready_timeout_s)
        except ray.exceptions.GetTimeoutError as exc:
            router.close()
            raise DistilrayError(
                f"datastore shards of {folder} not ready after {ready_timeout_s} s (no node with room for them?)"
            ) from exc
        except ray.exceptions.RayActorError as exc:
            router.close()
            raise DistilrayError(f"a datastore shard of {folder} failed to load: {_root_cause(exc)}") from exc
        expected = [
            {"shard_index": i, "num_shards": num_shards, "hidden_dim": router.hidden_dim} for i in range(num_shards)
        ]
        for name, info, want in zip(manifest["shards"], infos, expected):
            if any(info[k] != v for k, v in want.items()):
                router.close()
                raise DistilrayError(f"shard file {name} does not match {folder}/datastore.json: {info}")
        return router

    def _check_open(self) -> None:
        if not self._handles:
            raise DistilrayError(f"datastore router for {self.folder} is closed")

    def check_queries(self, entries, queries) -> tuple[np.ndarray, np.ndarray]:
        """entries as a (B,) array of non-negative ints, queries as (B, hidden_dim) float32, or an error."""
        entries = np.asarray(entries).reshape(-1)
        queries = np.asarray(queries, dtype=np.float32)
        b = entries.shape[0]
        if queries.shape != (b, self.hidden_dim):
            raise DistilrayError(f"queries must be ({b}, {self.hidden_dim}) for {b} entries, got {queries.shape}")
        if b and (not np.issubdtype(entries.dtype, np.integer) or entries.min() < 0):
            raise DistilrayError("entry tokens must be non-negative integers")
        return entries, queries

    def scatter(self, entries, queries) -> tuple[int, list[ShardBatch], list]:
        """Checked queries sent out: (batch size, the shard batches, one object ref per batch), all
        sent before any is awaited. Callers await the refs (ray.get, or await in a Serve replica) and
        hand the answers to `merge_shard_answers`."""
        self._check_open()
        entries, queries = self.check_queries(entries, queries)
        batches = split_by_shard(entries, self.num_shards)
        refs = [self._handles[b.shard].query.remote(entries[b.index], queries[b.index]) for b in batches]
        return entries.shape[0], batches, refs

    def query_batch(self, entries: np.ndarray, queries: np.ndarray) -> list[QueryResult]:
        """entries (B,) ints >= 0, queries (B, d) floats -> per query (chunk | None, cosine), in input order.

        One call per shard that has queries.
        """
        size, batches, refs = self.scatter(entries, queries)
        return merge_shard_answers(size, batches, ray.get(refs))

    def lookup(self, entry: int, hidden: np.ndarray) -> tuple[tuple[int, ...], float] | None:
        """Single-query adapter for retrieval decoding: hidden (d,) -> (chunk, cosine) or None."""
        chunk, sim = self.query_batch(np.array([int(entry)]), np.asarray(hidden).reshape(1, -1))[0]
        return None if chunk is None else (chunk, sim)

    __call__ = lookup  # so the router itself is a `Lookup` callable

    def stats(self) -> dict[str, Any]:
        """Manifest figures plus every shard actor's own stats."""
        self._check_open()
        shards = ray.get([h.stats.remote() for h in self._handles])
        return {
            "folder": self.folder,
            "num_shards": self.num_shards,
            "hidden_dim": self.hidden_dim,
            "num_keys": sum(s["num_keys"] for s in shards),
            "memory_bytes": sum(s["memory_bytes"] for s in shards),
            "queries": sum(s["queries"] for s in shards),
            "shards": shards,
        }

    def handles(self) -> list:
        """The shard actor handles, in shard order (for health checks and tests)."""
        return list(self._handles)

    def close(self) -> None:
        """Kill the shard actors for good (no restart). Safe to call twice."""
        handles, self._handles = self._handles, []
        for handle in handles:
            try:
                ray.kill(handle, no_restart=True)
            except Exception:  # already gone
                pass

    def __enter__(self) -> "DatastoreRouter":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
