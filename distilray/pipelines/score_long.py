"""Frozen short-context scores for token weighting, computed once on a Ray Data actor pool and kept beside
the prepared data as a Parquet column keyed by sequence id, with the scorer's fingerprint and the data's
in a JSON sidecar: a re-run (or a resumed training) reuses them, and a column from another scorer or another
data preparation is refused by name."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import ray

from distilray.actors.cluster import cpus_per_worker, ensure_ray, resolve_use_gpu
from distilray.actors.long_scorer import ShortContextScorer
from distilray.errors import DistilrayError
from distilray.io_utils import atomic_write_json, folder_fingerprint, read_json
from distilray.losses.token_weighting import check_stride
from distilray.models.rotary_lm import load_rotary_lm, rope_settings
from distilray.pipelines import prepare_long
from distilray.tokenizer import load_tokenizer, vocab_fingerprint


def scores_dir(data: Path, scorer: str, base_length: int, base_stride: int) -> Path:
    return Path(data) / "scores" / f"{folder_fingerprint(scorer)}-b{base_length}-s{base_stride}"


def frozen_scores(
    data: str | Path,
    scorer: str,
    base_length: int,
    base_stride: int,
    windows_per_pass: int = 8,
    num_actors: int = 1,
    batch_size: int = 4,
    use_gpu: str = "auto",
) -> Path:
    """Score the train split of a prepare-long folder with a frozen scorer (cached); returns the folder."""
    data = Path(data)
    meta = prepare_long.read_meta(data)
    check_stride(meta["seq_len"], base_length, base_stride)
    model = load_rotary_lm(scorer)
    native = rope_settings(model.config)["max_positions"]
    del model
    if base_length > native:
        raise DistilrayError(
            f"base_length={base_length} exceeds the frozen scorer's native context of {native}: it must score at "
            "its own context (reference/token_weighting.md, pitfall 9)"
        )
    tokenizer = load_tokenizer(scorer)
    if vocab_fingerprint(tokenizer) != meta["vocab_fingerprint"]:
        raise DistilrayError(f"the frozen scorer {scorer} has another tokenizer than the data in {data}")
    out = scores_dir(data, scorer, base_length, base_stride)
    if (out / "scores.json").is_file():
        return out
    seq_ids, ids = prepare_long.read_long_split(data, "train")
    ensure_ray()
    # one worker's share stays free for the read and write tasks: an actor pool holding every CPU stalls the
    # Parquet write until scoring ends (Ray Data warns "the job may hang forever")
    threads = cpus_per_worker(0, max(1, num_actors) + 1)
    gpu = resolve_use_gpu(use_gpu)
    rows = [{"seq_id": s, "input_ids": r} for s, r in zip(seq_ids, ids)]
    ds = ray.data.from_items(rows, override_num_blocks=max(1, -(-len(rows) // batch_size)))
    ds = ds.map_batches(
        ShortContextScorer,
        fn_constructor_kwargs={
            "model": str(Path(scorer).resolve()),
            "base_length": base_length,
            "base_stride": base_stride,
            "bos_id": tokenizer.bos_token_id,
            "windows_per_pass": windows_per_pass,
            "threads": threads,
        },
        batch_size=batch_size,
        batch_format="numpy",
        compute=ray.data.ActorPoolStrategy(size=max(1, num_actors)),
        num_gpus=1 if gpu else 0,
        num_cpus=threads,
    )
    if (out / "data").exists():
        shutil.rmtree(out / "data")  # an interrupted write: score again
    ds.write_parquet(str(out / "data"))
    atomic_write_json(
        out / "scores.json",  # written last: its presence means the column is complete
        {
            "scorer": str(scorer),
            "scorer_fingerprint": folder_fingerprint(scorer),
            "data_fingerprint": meta["fingerprint"],
            "base_length": base_length,
            "base_stride": base_stride,
            "sequences": len(seq_ids),
            "native_context": native,
        },
    )
    return out


def read_scores(folder: str | Path, data: str | Path, seq_ids: list[str], scorer: str | None = None) -> np.ndarray:
    """The short-context losses of `seq_ids`, in that order, after checking they belong to this data (and,
    given `scorer`, that this scorer computed them). # (n, L-1)"""
    folder = Path(folder)
    if not (folder / "scores.json").is_file():
        raise DistilrayError(f"{folder} holds no complete frozen scores (no scores.json)")
    info = read_json(folder / "scores.json")
    if scorer is not None and info["scorer_fingerprint"] != folder_fingerprint(scorer):
        raise DistilrayError(
            f"the frozen scores in {folder} were computed by another scorer ({info['scorer']}), not {scorer}"
        )
    fingerprint = prepare_long.read_meta(data)["fingerprint"]
    if info["data_fingerprint"] != fingerprint:
        raise DistilrayError(
            f"the frozen scores in {folder} were computed on another data preparation "
            f"({info['data_fingerprint'][:12]}, this data is {fingerprint[:12]}): score this data again"
        )
    table = pq.read_table(folder / "data")
    index = {s: i for i, s in enumerate(table.column("seq_id").to_pylist())}
    missing = [s for s in seq_ids if s not in index]
    if missing:
        raise DistilrayError(f"the frozen scores in {folder} lack {len(missing)} sequences (e.g. {missing[0]})")
    column = table.column("short_losses").to_numpy(zero_copy_only=False)
    return np.stack([np.asarray(column[index[s]], dtype=np.float32) for s in seq_ids])
