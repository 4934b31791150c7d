"""`distilray extract`: score a corpus split with an LM across a Ray Data actor pool.

Output in `output_dir/<split>/`: `shard-NNNNN.parquet` (per window: ids, token ids, the probability
the datastore model gave each actual token), `shard-NNNNN.h5` (the generation model's last-layer
hidden states, float16, one row per token, with offset/length per window), `plan.json` (settings,
written first) and `index.json` (window -> shard, offset, length; written last). Shards are written
atomically, so a re-run skips finished shards and an interrupted run resumes where it stopped.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from pathlib import Path

import numpy as np
import ray

from distilray import console, corpus
from distilray.actors.cluster import cpus_per_worker, ensure_ray, resolve_use_gpu
from distilray.actors.extraction import ExtractShardWorker, shard_done, shard_paths
from distilray.cdlm.extraction import Window, make_windows
from distilray.config import ExtractConfig
from distilray.errors import DistilrayError
from distilray.io_utils import atomic_write_json, read_json
from distilray.models.causal_lm import load_causal_lm, max_context
from distilray.tokenizer import check_same_tokenizer, encode_documents, load_tokenizer, vocab_fingerprint

log = logging.getLogger("distilray.extract")

PLAN_KEYS = (
    "model",
    "datastore_model",
    "corpus",
    "split",
    "window",
    "stride",
    "min_length",
    "windows_per_shard",
    "save_hidden",
    "max_windows",
)


def plan_windows(cfg: ExtractConfig) -> tuple[list[Window], object]:
    """Tokenizer checks and the windows of the split (driver side, cheap)."""
    if not cfg.model:
        raise DistilrayError("extract needs model=PATH (the generation model)")
    tokenizer = load_tokenizer(cfg.tokenizer or cfg.model)
    if cfg.datastore_model and cfg.datastore_model != cfg.model:
        # KCD: probabilities from one model, keys from another; token ids must mean the same thing
        check_same_tokenizer(
            tokenizer,
            load_tokenizer(cfg.datastore_model),
            f"datastore model {cfg.datastore_model} vs generation model {cfg.model}",
        )
    for path in {cfg.model, cfg.datastore_model or cfg.model}:
        limit = max_context(load_causal_lm(path, device="cpu"))
        if cfg.window > limit:
            raise DistilrayError(f"window {cfg.window} exceeds the context of {path} ({limit})")
    if cfg.split not in corpus.SPLITS:
        raise DistilrayError(f"split must be one of {corpus.SPLITS}, got {cfg.split!r}")
    docs = corpus.load_splits(cfg.corpus)[cfg.split]
    windows = make_windows(encode_documents(tokenizer, docs), cfg.window, cfg.stride, cfg.min_length)
    if cfg.max_windows:
        windows = windows[: cfg.max_windows]
    if not windows:
        raise DistilrayError(f"no passage of the {cfg.split} split has at least min_length={cfg.min_length} tokens")
    return windows, tokenizer


def run(cfg: ExtractConfig) -> dict:
    started = time.perf_counter()
    windows, tokenizer = plan_windows(cfg)
    out = Path(cfg.output_dir).resolve() / cfg.split
    out.mkdir(parents=True, exist_ok=True)
    plan = {k: v for k, v in dataclasses.asdict(cfg).items() if k in PLAN_KEYS}
    plan["tokenizer_fingerprint"] = vocab_fingerprint(tokenizer)
    plan["num_windows"] = len(windows)
    if (out / "plan.json").is_file():
        old = read_json(out / "plan.json")
        if old != plan:
            changed = sorted(k for k in plan if old.get(k) != plan[k])
            raise DistilrayError(
                f"{out} holds an extraction with other settings ({', '.join(changed)}); use another output_dir"
            )
    else:
        atomic_write_json(out / "plan.json", plan)

    shards = [windows[i : i + cfg.windows_per_shard] for i in range(0, len(windows), cfg.windows_per_shard)]
    todo = [i for i in range(len(shards)) if not shard_done(out, i, cfg.save_hidden)]
    log.info(f"[extract] {len(windows)} windows in {len(shards)} shards; {len(shards) - len(todo)} already done")
    if todo:
        run_actor_pool(cfg, out, shards, todo)
    index = _write_index(out, shards, cfg.save_hidden)
    tokens = sum(len(w.tokens) for w in windows)
    seconds = time.perf_counter() - started
    return {
        "output_dir": str(out),
        "windows": len(windows),
        "shards": len(shards),
        "shards_computed": len(todo),
        "tokens": tokens,
        "seconds": round(seconds, 2),
        "index": str(index),
    }


def run_actor_pool(cfg: ExtractConfig, out: Path, shards: list[list[Window]], todo: list[int]) -> None:
    """Score and write the shards numbered in `todo` on a Ray Data actor pool."""
    ensure_ray()
    use_gpu = resolve_use_gpu(cfg.use_gpu)
    cpus = cpus_per_worker(cfg.cpus_per_actor, cfg.num_actors)
    rows = [
        {
            "shard_id": i,
            "window_id": [w.window_id for w in shards[i]],
            "doc_id": [w.doc_id for w in shards[i]],
            "start": [w.start for w in shards[i]],
            "skip": [w.skip for w in shards[i]],
            "tokens": [list(w.tokens) for w in shards[i]],
        }
        for i in todo
    ]
    ds = ray.data.from_items(rows, override_num_blocks=len(rows))
    done = ds.map_batches(
        ExtractShardWorker,
        fn_constructor_kwargs={
            "model": cfg.model,
            "datastore_model": cfg.datastore_model,
            "out_dir": str(out),
            "batch_size": cfg.batch_size,
            "save_hidden": cfg.save_hidden,
            "threads": 0 if use_gpu else cpus,
        },
        batch_size=1,  # one shard per call: each call writes and finishes one shard
        batch_format="numpy",
        compute=ray.data.ActorPoolStrategy(size=cfg.num_actors),
        num_gpus=1 if use_gpu else 0,
        num_cpus=cpus,
    )
    finished: set[int] = set()
    with console.progress(len(shards), "extract", unit="shards", initial=len(shards) - len(todo)) as bar:
        for row in done.iter_rows():  # one row per shard, as each is written
            finished.add(int(row["shard_id"]))
            bar.update(1)
    missing = set(todo) - finished
    if missing:
        raise DistilrayError(f"extraction did not finish shards {sorted(missing)}; re-run to resume")


def _write_index(out: Path, shards: list[list[Window]], save_hidden: bool) -> Path:
    """window id -> (shard, offset into that shard's hidden rows, length): the seed's index maps."""
    entries = []
    for shard_id, shard in enumerate(shards):
        offset = 0
        for w in shard:
            entries.append([w.window_id, shard_id, offset, len(w.tokens)])
            offset += len(w.tokens)
    path = out / "index.json"
    index = {"columns": ["window_id", "shard", "offset", "length"], "windows": entries, "hidden_states": save_hidden}
    atomic_write_json(path, index, indent=None)
    return path


def read_extraction(out: str | Path) -> tuple[dict, list[dict]]:
    """(plan, rows) of a finished extraction: one row per window with token_ids and probs as numpy."""
    import pyarrow.parquet as pq

    out = Path(out)
    if not (out / "index.json").is_file():
        raise DistilrayError(f"{out} is not a finished extraction (no index.json): run or resume `distilray extract`")
    plan = read_json(out / "plan.json")
    rows: list[dict] = []
    shard_ids = sorted({e[1] for e in read_json(out / "index.json")["windows"]})
    for shard_id in shard_ids:
        table_path, _ = shard_paths(out, shard_id)
        try:
            table = pq.read_table(table_path).to_pydict()
        except Exception as e:  # missing or corrupt Parquet
            raise DistilrayError(f"missing or corrupt extraction shard {table_path}: {e}") from None
        for i in range(len(table["window_id"])):
            rows.append(
                {
                    "window_id": table["window_id"][i],
                    "shard": shard_id,
                    "skip": table["skip"][i],
                    "token_ids": np.asarray(table["token_ids"][i], dtype=np.int64),
                    "probs": np.asarray(table["probs"][i], dtype=np.float32),
                }
            )
    return plan, rows
