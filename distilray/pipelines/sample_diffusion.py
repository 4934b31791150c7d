"""`distilray sample-diffusion`: N samples (unconditional, or continuing corpus prompts) of a masked
diffusion LM on a Ray Data actor pool, written as Parquet (sample id, prompt and token ids, text,
steps, NFE, seconds per sample). A finished set is reused on a re-run of the same config."""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import ray

from distilray import corpus
from distilray.actors.cluster import cpus_per_worker, ensure_ray, resolve_use_gpu
from distilray.actors.diffusion import DiffusionSampler
from distilray.config import SampleDiffusionConfig, config_hash
from distilray.decoding.mdlm import check_num_steps
from distilray.errors import DistilrayError
from distilray.io_utils import atomic_write_json, folder_fingerprint, read_json
from distilray.models.mdlm import load_mdlm
from distilray.tokenizer import encode_documents, load_tokenizer

MANIFEST = "samples.json"


def corpus_prompts(cfg: SampleDiffusionConfig, tokenizer, count: int) -> list[list[int]]:
    """`count` prompts of `prompt_tokens` tokens, each [bos] + the start of a test-split document."""
    docs = [
        d for d in encode_documents(tokenizer, corpus.load_splits(cfg.corpus)["test"]) if len(d) >= cfg.prompt_tokens
    ]
    if not docs:
        raise DistilrayError(f"no test document of the corpus has {cfg.prompt_tokens} tokens for a prompt")
    return [[tokenizer.bos_token_id] + docs[i % len(docs)][: cfg.prompt_tokens - 1] for i in range(count)]


def run(cfg: SampleDiffusionConfig) -> dict:
    if not cfg.model:
        raise DistilrayError("sample-diffusion needs model=PATH (a train-mdlm or distill-sdtt model folder)")
    check_num_steps(cfg.num_steps)
    if cfg.num_samples < 1 or cfg.batch_size < 1:
        raise DistilrayError("num_samples and batch_size must be positive")
    model = load_mdlm(cfg.model)  # a clear error on a folder that is not an MDLM
    if not 0 <= cfg.prompt_tokens < model.config.seq_len:
        raise DistilrayError(f"prompt_tokens must lie in [0, {model.config.seq_len}), the model's sequence length")
    del model
    out = Path(cfg.output_dir).resolve() / f"{Path(cfg.model).name}-{config_hash(cfg)}-{folder_fingerprint(cfg.model)}"
    if (out / MANIFEST).is_file():
        return {**read_json(out / MANIFEST), "cached": True}
    started = time.perf_counter()
    tokenizer = load_tokenizer(cfg.model)
    prompts = corpus_prompts(cfg, tokenizer, cfg.num_samples) if cfg.prompt_tokens else [[]] * cfg.num_samples
    ensure_ray()
    actors = max(1, cfg.num_actors)
    use_gpu = resolve_use_gpu(cfg.use_gpu)
    threads = cpus_per_worker(cfg.cpus_per_actor, actors)
    rows = [{"sample_id": i, "prompt": np.asarray(p, dtype=np.int64)} for i, p in enumerate(prompts)]
    ds = ray.data.from_items(rows, override_num_blocks=max(1, -(-cfg.num_samples // cfg.batch_size)))
    ds = ds.map_batches(
        DiffusionSampler,
        fn_constructor_kwargs={
            "model": str(Path(cfg.model).resolve()),
            "num_steps": cfg.num_steps,
            "temperature": cfg.temperature,
            "float64": cfg.float64,
            "cache_predictions": cfg.cache_predictions,
            "seed": cfg.seed,
            "threads": threads,
        },
        batch_size=cfg.batch_size,
        batch_format="numpy",
        compute=ray.data.ActorPoolStrategy(size=actors),
        num_gpus=1 if use_gpu else 0,
        num_cpus=threads,
    )
    if (out / "data").exists():
        shutil.rmtree(out / "data")  # an interrupted write: sample again
    ds.write_parquet(str(out / "data"))
    table = pq.read_table(out / "data").sort_by("sample_id")
    summary = {
        "output_dir": str(out),
        "parquet": str(out / "data"),
        "model": cfg.model,
        "samples": table.num_rows,
        "num_steps": cfg.num_steps,
        "prompt_tokens": cfg.prompt_tokens,
        "mean_nfe": float(np.mean(table.column("nfe").to_numpy())),
        "seconds_per_sample": float(np.mean(table.column("seconds").to_numpy())),
        "wall_seconds": round(time.perf_counter() - started, 1),
        "first_text": str(table.column("text")[0]),
    }
    atomic_write_json(out / MANIFEST, summary)  # written last: its presence means the Parquet set is complete
    return {**summary, "cached": False}


def read_samples(folder: str | Path) -> np.ndarray:
    """The token ids of a sample-diffusion output folder, in sample order. # (N, L)"""
    table = pq.read_table(Path(folder) / "data", columns=["sample_id", "token_ids"]).sort_by("sample_id")
    return np.stack(table.column("token_ids").to_numpy(zero_copy_only=False)).astype(np.int64)
