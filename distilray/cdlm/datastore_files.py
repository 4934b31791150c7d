"""On-disk format of the CD-LM datastore (reference/cdlm.md 3.4, 6, 8.6).

A datastore is a folder with `datastore.json` (the manifest) and N HDF5 shard files. Rows are
partitioned by entry token: token e lives in shard `e % N`, so a query is routed by its last token
alone. One shard file holds:

    entry_token    (n,)            int32    rows sorted by entry token (stable: build order kept)
    keys           (n, d)          float16  hidden state of model_gen at the entry position
    chunk_id       (n,)            int32    index into this file's chunk table
    chunk_tokens   (total,)        int32    the chunk table, flat
    chunk_offsets  (n_chunks + 1,) int64    chunk c = chunk_tokens[offsets[c]:offsets[c + 1]]
    attrs: format_version=1, shard_index, num_shards, hidden_dim, tokenizer_fingerprint

Chunks are token ids, never strings (note 8.3), and nothing read back is a pickle (note 8.6).
Every file is written under a temporary name in the same folder and renamed into place.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import h5py
import numpy as np

from distilray.errors import DistilrayError
from distilray.io_utils import atomic_path, atomic_write_json

FORMAT_VERSION = 1
MANIFEST_NAME = "datastore.json"
# Dataset name (also the ShardData field) -> on-disk dtype.
_DATASETS = {
    "entry_token": np.int32,
    "keys": np.float16,
    "chunk_id": np.int32,
    "chunk_tokens": np.int32,
    "chunk_offsets": np.int64,
}
_ATTRS = ("format_version", "shard_index", "num_shards", "hidden_dim", "tokenizer_fingerprint")
_F16_MAX = float(np.finfo(np.float16).max)
_INT32_MAX = int(np.iinfo(np.int32).max)


def shard_of(entry_token: int | np.ndarray, num_shards: int) -> int | np.ndarray:
    """Shard that owns an entry token (scalar or array): `entry_token % num_shards`."""
    if int(num_shards) < 1:
        raise DistilrayError(f"num_shards must be >= 1, got {num_shards}")
    if isinstance(entry_token, np.ndarray):
        return entry_token % int(num_shards)
    return int(entry_token) % int(num_shards)


def shard_file_name(shard_index: int, num_shards: int) -> str:
    """Conventional file name of one shard, e.g. `shard-00001-of-00004.h5`."""
    return f"shard-{int(shard_index):05d}-of-{int(num_shards):05d}.h5"


def pack_chunks(chunks: Sequence[Sequence[int]]) -> tuple[np.ndarray, np.ndarray]:
    """Chunk list -> (flat tokens (total,) int32, offsets (len(chunks) + 1,) int64)."""
    lengths = np.fromiter((len(c) for c in chunks), dtype=np.int64, count=len(chunks))
    offsets = np.zeros(len(chunks) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    flat = np.fromiter((t for c in chunks for t in c), dtype=np.int64, count=int(offsets[-1]))
    if flat.size and (flat.min() < 0 or flat.max() > _INT32_MAX):
        raise DistilrayError("chunk token ids must be in 0..2**31-1")
    return flat.astype(np.int32), offsets


@dataclass
class ShardData:
    """One shard in memory, rows sorted by entry token.

    entry_token: (n,) int32; keys: (n, d) float16; chunk_id: (n,) int32 into the chunk table;
    chunk_tokens: (total,) int32 and chunk_offsets: (n_chunks + 1,) int64, the flat chunk table.
    """

    entry_token: np.ndarray
    keys: np.ndarray
    chunk_id: np.ndarray
    chunk_tokens: np.ndarray
    chunk_offsets: np.ndarray
    shard_index: int = 0
    num_shards: int = 1
    tokenizer_fingerprint: str = ""
    path: str | None = None

    @property
    def num_keys(self) -> int:
        return int(self.entry_token.shape[0])

    @property
    def hidden_dim(self) -> int:
        return int(self.keys.shape[1])

    @property
    def num_chunks(self) -> int:
        return int(self.chunk_offsets.shape[0] - 1)

    def chunk(self, chunk_id: int) -> tuple[int, ...]:
        """Token ids of chunk `chunk_id` of this shard's table."""
        start, end = self.chunk_offsets[chunk_id], self.chunk_offsets[chunk_id + 1]
        return tuple(int(t) for t in self.chunk_tokens[start:end])

    @classmethod
    def from_rows(
        cls,
        *,
        entry_tokens: np.ndarray,
        keys: np.ndarray,
        chunk_ids: np.ndarray,
        chunks: Sequence[Sequence[int]],
        shard_index: int = 0,
        num_shards: int = 1,
        tokenizer_fingerprint: str = "",
    ) -> "ShardData":
        """Validate rows, sort them by entry token and keep only the chunks they reference.

        entry_tokens: (n,) ints, all owned by `shard_index`; keys: (n, d) floats;
        chunk_ids: (n,) indices into `chunks` (a table that may be shared by all shards).
        """
        entry = np.asarray(entry_tokens)
        ids = np.asarray(chunk_ids)
        keys = np.asarray(keys)
        n = entry.shape[0] if entry.ndim == 1 else -1
        if n < 0 or ids.shape != (n,) or keys.ndim != 2 or keys.shape[0] != n:
            raise DistilrayError(
                f"shard rows disagree: entry_tokens {entry.shape}, keys {keys.shape}, "
                f"chunk_ids {ids.shape} (expected (n,), (n, d), (n,))"
            )
        if keys.shape[1] < 1:
            raise DistilrayError("keys must have a hidden dimension >= 1")
        for name, arr in (("entry_tokens", entry), ("chunk_ids", ids)):
            if arr.size and not np.issubdtype(arr.dtype, np.integer):
                raise DistilrayError(f"{name} must be integers, got dtype {arr.dtype}")
        if n and (entry.min() < 0 or entry.max() > _INT32_MAX):
            raise DistilrayError("entry tokens must be in 0..2**31-1")
        wrong = entry[shard_of(entry, num_shards) != int(shard_index)]
        if wrong.size:
            bad = int(wrong[0])
            raise DistilrayError(
                f"entry token {bad} belongs to shard {bad % int(num_shards)}, not shard {shard_index} of {num_shards}"
            )
        if n and (ids.min() < 0 or ids.max() >= len(chunks)):
            raise DistilrayError(f"chunk ids must index the {len(chunks)} chunks given")
        keys16 = _to_float16(keys)

        # Stable sort keeps build order inside an entry token; skip the copy when already sorted.
        entry = entry.astype(np.int32, copy=False)
        if n > 1 and not bool(np.all(entry[1:] >= entry[:-1])):
            order = np.argsort(entry, kind="stable")
            entry, ids, keys16 = entry[order], ids[order], keys16[order]
        # Only the chunks this shard references, renumbered 0..k-1 in global-id order.
        used, local = np.unique(ids, return_inverse=True)
        table = [tuple(chunks[int(i)]) for i in used]
        if any(len(c) == 0 for c in table):
            raise DistilrayError("a datastore chunk must hold at least one token")
        flat, offsets = pack_chunks(table)
        return cls(
            entry_token=entry,
            keys=keys16,
            chunk_id=local.reshape(-1).astype(np.int32),
            chunk_tokens=flat,
            chunk_offsets=offsets,
            shard_index=int(shard_index),
            num_shards=int(num_shards),
            tokenizer_fingerprint=str(tokenizer_fingerprint),
        )


def _to_float16(keys: np.ndarray, block: int = 65536) -> np.ndarray:
    """(n, d) -> float16, refusing NaN/inf and values that overflow float16 (checked in blocks)."""
    out = keys if keys.dtype == np.float16 else np.empty(keys.shape, dtype=np.float16)
    for start in range(0, keys.shape[0], block):
        part = keys[start : start + block]
        if part.dtype != np.float16:
            part = part.astype(np.float32, copy=False)
            if not bool(np.all(np.abs(part) <= _F16_MAX)):  # also False for NaN
                raise DistilrayError("keys contain NaN, inf or values beyond the float16 range")
            out[start : start + block] = part
        elif not bool(np.all(np.isfinite(part))):
            raise DistilrayError("keys contain NaN or inf")
    return out


def _write_h5_atomic(path: Path, data: ShardData) -> None:
    with atomic_path(path) as tmp, h5py.File(tmp, "w") as f:
        for name, dtype in _DATASETS.items():
            f.create_dataset(name, data=getattr(data, name), dtype=dtype)
        f.attrs.update(
            format_version=FORMAT_VERSION,
            shard_index=data.shard_index,
            num_shards=data.num_shards,
            hidden_dim=data.hidden_dim,
            tokenizer_fingerprint=data.tokenizer_fingerprint,
        )


def write_shard(
    path: str | Path,
    *,
    entry_tokens: np.ndarray,
    keys: np.ndarray,
    chunk_ids: np.ndarray,
    chunks: Sequence[Sequence[int]],
    shard_index: int,
    num_shards: int,
    tokenizer_fingerprint: str,
) -> dict[str, Any]:
    """Write one shard file atomically (see module docstring for the layout).

    entry_tokens: (n,) ints, each with `token % num_shards == shard_index`; keys: (n, d) floats
    (stored float16); chunk_ids: (n,) indices into `chunks`, which may be the whole datastore's
    table: only the referenced chunks are written, re-indexed.
    Returns {"file", "num_keys", "num_chunks", "chunk_tokens"} for the manifest.
    """
    data = ShardData.from_rows(
        entry_tokens=entry_tokens,
        keys=keys,
        chunk_ids=chunk_ids,
        chunks=chunks,
        shard_index=shard_index,
        num_shards=num_shards,
        tokenizer_fingerprint=tokenizer_fingerprint,
    )
    _write_h5_atomic(Path(path), data)
    return {
        "file": Path(path).name,
        "num_keys": data.num_keys,
        "num_chunks": data.num_chunks,
        "chunk_tokens": int(data.chunk_tokens.shape[0]),
    }


def _corrupt(path: Path, why: str) -> DistilrayError:
    return DistilrayError(f"missing or corrupt datastore shard {path}: {why}")


def read_shard(path: str | Path) -> ShardData:
    """Load one shard file fully into memory; any defect raises DistilrayError naming the file."""
    path = Path(path)
    if not path.is_file():
        raise _corrupt(path, "no such file")
    try:
        with h5py.File(path, "r") as f:
            missing = [name for name in _DATASETS if name not in f]
            if missing:
                raise _corrupt(path, f"dataset(s) {', '.join(missing)} missing")
            absent = [name for name in _ATTRS if name not in f.attrs]
            if absent:
                raise _corrupt(path, f"attribute(s) {', '.join(absent)} missing")
            arrays = {name: f[name][()] for name in _DATASETS}
            attrs = {name: f.attrs[name] for name in _ATTRS}
    except DistilrayError:
        raise
    except Exception as exc:  # h5py raises OSError/KeyError/ValueError on damaged files
        raise _corrupt(path, f"{type(exc).__name__}: {exc}") from exc
    if int(attrs["format_version"]) != FORMAT_VERSION:
        raise _corrupt(path, f"format_version {attrs['format_version']}, expected {FORMAT_VERSION}")
    fingerprint = attrs["tokenizer_fingerprint"]
    data = ShardData(
        **arrays,
        shard_index=int(attrs["shard_index"]),
        num_shards=int(attrs["num_shards"]),
        tokenizer_fingerprint=fingerprint.decode() if isinstance(fingerprint, bytes) else str(fingerprint),
        path=str(path),
    )
    problem = _shape_problem(data, int(attrs["hidden_dim"]))
    if problem:
        raise _corrupt(path, problem)
    return data


def _shape_problem(d: ShardData, hidden_dim: int) -> str | None:
    """Describe the first inconsistency between a shard's arrays, or None when they agree."""
    n = d.entry_token.shape[0] if d.entry_token.ndim == 1 else -1
    if n < 0 or d.keys.shape != (n, hidden_dim) or d.chunk_id.shape != (n,):
        return (
            f"inconsistent shapes: entry_token {d.entry_token.shape}, keys {d.keys.shape}, "
            f"chunk_id {d.chunk_id.shape}, hidden_dim {hidden_dim}"
        )
    offsets = d.chunk_offsets
    if d.chunk_tokens.ndim != 1 or offsets.ndim != 1 or offsets.shape[0] < 1:
        return "chunk table arrays must be 1-D with at least one offset"
    if offsets[0] != 0 or offsets[-1] != d.chunk_tokens.shape[0] or np.any(np.diff(offsets) < 1):
        return "chunk_offsets do not describe non-empty chunks covering chunk_tokens"
    if n and (d.chunk_id.min() < 0 or d.chunk_id.max() >= d.num_chunks):
        return "chunk_id outside the chunk table"
    if n and (
        np.any(d.entry_token[1:] < d.entry_token[:-1]) or np.any(d.entry_token % max(d.num_shards, 1) != d.shard_index)
    ):
        return "entry tokens unsorted or not owned by this shard"
    return None


# -- manifest ------------------------------------------------------------------------------------

_REQUIRED = ("num_shards", "shards", "tokenizer_fingerprint", "hidden_dim")


def _manifest_problem(info: Any) -> str | None:
    if not isinstance(info, dict):
        return "not a JSON object"
    missing = [k for k in _REQUIRED if k not in info]
    if missing:
        return f"lacks {', '.join(missing)}"
    if len(info["shards"]) != int(info["num_shards"]):
        return f"lists {len(info['shards'])} shard files for num_shards={info['num_shards']}"
    return None


def write_manifest(folder: str | Path, info: dict[str, Any]) -> dict[str, Any]:
    """Write `datastore.json` atomically and return what was written (`info` + format_version).

    `info` needs num_shards, shards (file names), tokenizer_fingerprint and hidden_dim; everything
    else (stats, provenance such as model_ds, model_gen, threshold, window, stride) is kept as given.
    """
    problem = _manifest_problem(info)
    if problem:
        raise DistilrayError(f"datastore manifest {problem}")
    manifest = {"format_version": FORMAT_VERSION, **info}
    atomic_write_json(Path(folder) / MANIFEST_NAME, manifest)
    return manifest


def read_manifest(folder: str | Path) -> dict[str, Any]:
    """Read `datastore.json` and check that every shard file it lists exists."""
    folder = Path(folder)
    path = folder / MANIFEST_NAME
    if not path.is_file():
        raise DistilrayError(f"no datastore at {folder}: {MANIFEST_NAME} not found")
    try:
        with open(path, encoding="utf-8") as f:
            info = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DistilrayError(f"unreadable datastore manifest {path}: {exc}") from exc
    problem = _manifest_problem(info)
    if problem:
        raise DistilrayError(f"datastore manifest {path} {problem}")
    absent = [name for name in info["shards"] if not (folder / name).is_file()]
    if absent:
        raise DistilrayError(f"missing or corrupt datastore shard {folder / absent[0]} (listed in {path})")
    return info


def manifest_stats(shard_stats: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Manifest fields derived from write_shard results, in shard order."""
    num_chunks = sum(s["num_chunks"] for s in shard_stats)
    return {
        "num_shards": len(shard_stats),
        "shards": [s["file"] for s in shard_stats],
        "num_keys": sum(s["num_keys"] for s in shard_stats),
        "num_chunks": num_chunks,  # distinct per shard (a chunk under two shards counts twice)
        "mean_chunk_length": sum(s["chunk_tokens"] for s in shard_stats) / num_chunks if num_chunks else 0.0,
        "keys_per_shard": [s["num_keys"] for s in shard_stats],
    }


def write_datastore(
    folder: str | Path,
    *,
    entry_tokens: np.ndarray,
    keys: np.ndarray,
    chunk_ids: np.ndarray,
    chunks: Sequence[Sequence[int]],
    num_shards: int,
    tokenizer_fingerprint: str,
    provenance: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Partition in-memory rows (n,), (n, d), (n,) by entry token into shard files plus manifest.

    For datastores too big for memory, call write_shard per shard and write_manifest instead.
    Returns the manifest.
    """
    folder = Path(folder)
    entry = np.asarray(entry_tokens)
    keys = np.asarray(keys)
    if entry.ndim != 1 or keys.ndim != 2 or keys.shape[0] != entry.shape[0]:
        raise DistilrayError(f"entry_tokens {entry.shape} and keys {keys.shape} must be (n,) and (n, d)")
    owner = shard_of(entry, num_shards)
    stats = []
    for s in range(int(num_shards)):
        rows = np.flatnonzero(owner == s)
        stats.append(
            write_shard(
                folder / shard_file_name(s, num_shards),
                entry_tokens=entry[rows],
                keys=keys[rows],
                chunk_ids=np.asarray(chunk_ids)[rows],
                chunks=chunks,
                shard_index=s,
                num_shards=num_shards,
                tokenizer_fingerprint=tokenizer_fingerprint,
            )
        )
    info = {
        **(provenance or {}),
        **manifest_stats(stats),
        "tokenizer_fingerprint": tokenizer_fingerprint,
        "hidden_dim": int(keys.shape[1]),
    }
    return write_manifest(folder, info)


def write_synthetic_datastore(
    folder: str | Path,
    num_keys: int,
    hidden_dim: int,
    vocab_size: int,
    num_shards: int,
    seed: int,
    mean_chunk_len: int = 4,
) -> dict[str, Any]:
    """Random datastore for latency benchmarks: unit-norm Gaussian keys, random chunks.

    Entry tokens are uniform over the vocabulary; each shard gets about two keys per distinct
    chunk, chunk lengths are 1 + Poisson(mean_chunk_len - 1). Written shard by shard so peak memory
    is about one shard's float16 keys (1e6 x 256 keys in one shard: ~0.5 GB). Returns the manifest.
    """
    num_keys, hidden_dim, vocab_size, num_shards = int(num_keys), int(hidden_dim), int(vocab_size), int(num_shards)
    if num_keys < 0 or hidden_dim < 1 or vocab_size < 1 or num_shards < 1 or mean_chunk_len < 1:
        raise DistilrayError(
            "synthetic datastore needs num_keys >= 0 and hidden_dim, vocab_size, num_shards, mean_chunk_len >= 1"
        )
    folder = Path(folder)
    rng = np.random.default_rng(seed)
    # Tokens owned by shard s: s, s + N, s + 2N, ... below vocab_size; keys split in proportion.
    owned = np.array([len(range(s, vocab_size, num_shards)) for s in range(num_shards)], dtype=np.int64)
    counts = rng.multinomial(num_keys, owned / owned.sum())
    stats = []
    for s in range(num_shards):
        n = int(counts[s])
        entry = np.sort(s + num_shards * rng.integers(0, max(int(owned[s]), 1), size=n)).astype(np.int32)
        keys = np.empty((n, hidden_dim), dtype=np.float16)
        for start in range(0, n, 65536):  # float32 only one block at a time
            block = rng.standard_normal((min(65536, n - start), hidden_dim), dtype=np.float32)
            block /= np.linalg.norm(block, axis=1, keepdims=True)
            keys[start : start + block.shape[0]] = block
        n_chunks = max(1, n // 2)
        lengths = 1 + rng.poisson(mean_chunk_len - 1, size=n_chunks)
        flat = rng.integers(0, vocab_size, size=int(lengths.sum()))
        bounds = np.concatenate(([0], np.cumsum(lengths)))
        chunks = [flat[bounds[i] : bounds[i + 1]].tolist() for i in range(n_chunks)]
        stats.append(
            write_shard(
                folder / shard_file_name(s, num_shards),
                entry_tokens=entry,
                keys=keys,
                chunk_ids=rng.integers(0, n_chunks, size=n),
                chunks=chunks,
                shard_index=s,
                num_shards=num_shards,
                tokenizer_fingerprint="synthetic",
            )
        )
        del keys, chunks, flat
    info = {
        **manifest_stats(stats),
        "tokenizer_fingerprint": "synthetic",
        "hidden_dim": hidden_dim,
        "synthetic": True,
        "seed": int(seed),
        "vocab_size": vocab_size,
    }
    return write_manifest(folder, info)
