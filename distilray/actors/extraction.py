"""Ray Data actor that scores one shard of windows and writes it (Parquet + HDF5) atomically."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from distilray import console
from distilray.cdlm.extraction import score_windows
from distilray.io_utils import atomic_path
from distilray.models.causal_lm import load_causal_lm


def shard_paths(out_dir: str | Path, shard_id: int) -> tuple[Path, Path]:
    base = Path(out_dir) / f"shard-{shard_id:05d}"
    return base.with_suffix(".parquet"), base.with_suffix(".h5")


def shard_done(out_dir: str | Path, shard_id: int, save_hidden: bool) -> bool:
    table, hidden = shard_paths(out_dir, shard_id)
    return table.is_file() and (hidden.is_file() or not save_hidden)


class ExtractShardWorker:
    """Loads the model(s) once per actor; each call scores whole shards (one row = one shard)."""

    def __init__(
        self, model: str, datastore_model: str, out_dir: str, batch_size: int, save_hidden: bool, threads: int = 0
    ):
        console.quiet_worker()
        if threads:
            torch.set_num_threads(threads)
        self.model_gen = load_causal_lm(model)
        self.model_ds = self.model_gen if datastore_model in ("", model) else load_causal_lm(datastore_model)
        self.out_dir, self.batch_size, self.save_hidden = out_dir, batch_size, save_hidden

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        done_ids, done_tokens = [], []
        for row in range(len(batch["shard_id"])):
            shard_id = int(batch["shard_id"][row])
            tokens = [tuple(int(t) for t in w) for w in batch["tokens"][row]]
            probs, hidden = [], []
            for i in range(0, len(tokens), self.batch_size):
                p, h = score_windows(tokens[i : i + self.batch_size], self.model_ds, self.model_gen, self.save_hidden)
                probs += p
                hidden += h or []
            meta = {k: np.asarray(batch[k][row]) for k in ("window_id", "doc_id", "start", "skip")}
            self._write(shard_id, meta, tokens, probs, hidden)
            done_ids.append(shard_id)
            done_tokens.append(sum(len(t) for t in tokens))
        return {"shard_id": np.array(done_ids), "tokens": np.array(done_tokens)}

    def _write(self, shard_id: int, meta: dict, tokens: list, probs: list, hidden: list) -> None:
        import h5py
        import pyarrow as pa
        import pyarrow.parquet as pq

        table_path, hidden_path = shard_paths(self.out_dir, shard_id)
        if self.save_hidden:  # hidden states first: the Parquet file marks the shard complete
            lengths = np.array([len(t) for t in tokens], dtype=np.int64)
            offsets = np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.int64)
            with atomic_path(hidden_path) as tmp, h5py.File(tmp, "w") as f:
                f.create_dataset("hidden", data=np.concatenate(hidden), dtype=np.float16)
                f.create_dataset("window_id", data=meta["window_id"].astype(np.int64))
                f.create_dataset("offset", data=offsets)
                f.create_dataset("length", data=lengths)
        table = pa.table(
            {
                "window_id": pa.array(meta["window_id"], pa.int64()),
                "doc_id": pa.array(meta["doc_id"], pa.int64()),
                "start": pa.array(meta["start"], pa.int64()),
                "skip": pa.array(meta["skip"], pa.int32()),
                "token_ids": pa.array([list(t) for t in tokens], pa.list_(pa.int32())),
                "probs": pa.array([p.tolist() for p in probs], pa.list_(pa.float32())),
            }
        )
        with atomic_path(table_path) as tmp:
            pq.write_table(table, tmp)
