"""`distilray build-datastore`: chunks mined from an extraction, keyed by the generation model's
hidden state at each chunk's entry token, written as N shard files partitioned by entry token."""

from __future__ import annotations

import time
from pathlib import Path

import h5py
import numpy as np

from distilray.actors.extraction import shard_paths
from distilray.cdlm.build import mine_rows, trie_rows
from distilray.cdlm.datastore_files import write_datastore
from distilray.config import BuildDatastoreConfig
from distilray.errors import DistilrayError
from distilray.io_utils import atomic_write_json, read_json
from distilray.pipelines.extract import read_extraction


def gather_keys(extract_dir: Path, positions: np.ndarray) -> np.ndarray:
    """Hidden states at (window_id, position) pairs, read shard by shard in increasing row order. # (n, d)"""
    index = {w: (s, off, n) for w, s, off, n in read_json(extract_dir / "index.json")["windows"]}
    shard = np.array([index[int(w)][0] for w, _ in positions], dtype=np.int64)
    row = np.array([index[int(w)][1] + int(p) for w, p in positions], dtype=np.int64)
    keys: np.ndarray | None = None
    for s in np.unique(shard):
        pick = np.flatnonzero(shard == s)
        wanted, inverse = np.unique(row[pick], return_inverse=True)
        path = shard_paths(extract_dir, int(s))[1]
        try:
            with h5py.File(path, "r") as f:
                block = f["hidden"][wanted]  # h5py wants increasing indices
        except (OSError, KeyError) as e:
            raise DistilrayError(f"missing or corrupt hidden-state file {path}: {e}") from None
        if keys is None:
            keys = np.empty((len(positions), block.shape[1]), dtype=np.float16)
        keys[pick] = block[inverse]
    return keys if keys is not None else np.empty((0, 0), dtype=np.float16)


def run(cfg: BuildDatastoreConfig) -> dict:
    if not 0 < cfg.tok_prob_threshold < 1:
        raise DistilrayError(f"tok_prob_threshold must be in (0, 1), got {cfg.tok_prob_threshold}")
    if cfg.num_shards < 1:
        raise DistilrayError(f"num_shards must be >= 1, got {cfg.num_shards}")
    started = time.perf_counter()
    extract_dir = Path(cfg.extract_dir)
    plan, rows = read_extraction(extract_dir)
    if not plan["save_hidden"]:
        raise DistilrayError(f"{extract_dir} was extracted with save_hidden=false: no keys to build a datastore from")
    trie = mine_rows(rows, cfg.tok_prob_threshold)
    if trie.num_chunks() == 0:
        raise DistilrayError(
            f"no chunk above tok_prob_threshold={cfg.tok_prob_threshold}: lower it or use a stronger datastore model"
        )

    entries, key_chunk, positions, table = trie_rows(trie, cfg.max_keys_per_chunk or None)
    keys = gather_keys(extract_dir, positions)
    provenance = {
        "model_ds": plan["datastore_model"] or plan["model"],
        "model_gen": plan["model"],
        "tok_prob_threshold": cfg.tok_prob_threshold,
        "window": plan["window"],
        "stride": plan["stride"],
        "corpus": plan["corpus"],
        "split": plan["split"],
        "phrases": trie.num_occurrences(),
        "synthetic": False,
    }
    manifest = write_datastore(
        cfg.output_dir,
        entry_tokens=entries,
        keys=keys,
        chunk_ids=key_chunk,
        chunks=table,
        num_shards=cfg.num_shards,
        tokenizer_fingerprint=plan["tokenizer_fingerprint"],
        provenance=provenance,
    )
    stats = {
        "output_dir": str(Path(cfg.output_dir).resolve()),
        "chunks": len(table),
        "keys": int(manifest["num_keys"]),
        "entry_tokens": len(trie.entry_tokens()),
        "mean_chunk_length": float(np.mean([len(c) for c in table])),
        "keys_per_shard": manifest["keys_per_shard"],
        "seconds": round(time.perf_counter() - started, 2),
    }
    atomic_write_json(Path(cfg.output_dir) / "stats.json", stats)
    return stats
