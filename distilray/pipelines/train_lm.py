"""`distilray train-lm`: a causal LM trained with Ray Train (DDP: gloo on CPU, NCCL on GPU).

The driver tokenizes the corpus once and puts the packed blocks in the object store, so workers on
any node read them without a shared file system. Batches are a pure function of (seed, step), so a
run resumed from a checkpoint (after a worker crash, or when the same command is run again) trains on
exactly the batches an uninterrupted run would have.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import re
import shutil
import time
from pathlib import Path

import numpy as np
import ray
import ray.train
import torch

from distilray import corpus
from distilray.config import TrainLMConfig, config_hash
from distilray.errors import DistilrayError
from distilray.eval.perplexity import perplexity
from distilray.io_utils import atomic_write_json, read_json
from distilray.models.causal_lm import build_causal_lm, count_parameters, is_preset, load_causal_lm
from distilray.pipelines import train_tokenizer
from distilray.pipelines.ray_runtime import cpus_per_worker, ensure_ray, resolve_use_gpu
from distilray.pipelines.trainer_runtime import (
    apply_update,
    config_from_dict,
    copy_final_model,
    fail_at_step_from_env,
    fit,
    latest_checkpoint,
    maybe_inject_failure,
    report_step,
    restore_start_step,
    saved_files,
    worker_context,
    worker_tokenizer,
)
from distilray.tokenizer import encode_documents, load_tokenizer, vocab_fingerprint
from distilray.training import (
    MetricsLog,
    batch_rows,
    flat_tokens,
    lm_loss,
    lr_at,
    make_optimizer,
    pack_tokens,
    read_trainer_state,
    save_checkpoint,
)

log = logging.getLogger("distilray.train_lm")

# Config fields that do not change what is trained (left out of the artifact cache key).
_NOT_IN_KEY = ("artifacts_dir", "checkpoint_every", "report_every", "keep_checkpoints", "max_failures", "name", "cpus_per_worker")


def run_dir_for(cfg: TrainLMConfig) -> Path:
    if cfg.name:
        return Path(cfg.artifacts_dir).resolve() / "lm" / cfg.name
    # the tokenizer enters the key by its vocabulary, not by how its path was spelled
    tok = cfg.tokenizer
    if tok and Path(tok).is_dir():
        tok = vocab_fingerprint(load_tokenizer(tok))
    key = config_hash(dataclasses.replace(cfg, tokenizer=tok), exclude=_NOT_IN_KEY)
    fingerprint = corpus.corpus_fingerprint(cfg.corpus)[:6]
    slug = re.sub(r"[^A-Za-z0-9_.-]+", "_", cfg.model.strip("/").split("/")[-1])
    return Path(cfg.artifacts_dir).resolve() / "lm" / f"{slug}-{key}-{fingerprint}"


def prepare_data(cfg: TrainLMConfig):
    """Tokenizer folder, packed training blocks # (N, seq_len+1), validation stream # (T,)."""
    if cfg.seq_len < 8:
        raise DistilrayError(f"seq_len must be at least 8, got {cfg.seq_len}")
    if cfg.steps < 1 or cfg.batch_size < 1:
        raise DistilrayError("steps and batch_size must be positive")
    if cfg.tokenizer:
        tok_dir = Path(cfg.tokenizer)
    elif is_preset(cfg.model):
        tok_dir = train_tokenizer.get_or_train(cfg.corpus, cfg.vocab_size, cfg.artifacts_dir)
    else:
        tok_dir = Path(cfg.model)  # fine-tuning an existing model: use its own tokenizer
    tokenizer = load_tokenizer(tok_dir)
    splits = corpus.load_splits(cfg.corpus)
    train_blocks = pack_tokens(encode_documents(tokenizer, splits["train"]), cfg.seq_len + 1, tokenizer.eos_token_id)
    val_stream = flat_tokens(encode_documents(tokenizer, splits["validation"]), tokenizer.eos_token_id)
    return tok_dir, tokenizer, train_blocks, val_stream[: cfg.eval_max_tokens]


def run(cfg: TrainLMConfig, untimed_steps: int = 0) -> dict:
    """Train (or resume, or reuse from the cache) and return where everything went, with figures."""
    run_dir = run_dir_for(cfg)
    result_path = run_dir / "result.json"
    if result_path.is_file() and (run_dir / "model" / "config.json").is_file():
        cached = read_json(result_path)
        cached["cached"] = True
        return cached

    if not is_preset(cfg.model):
        load_causal_lm(cfg.model, device="cpu")  # fail early, with a clear message, on a bad path
    tok_dir, tokenizer, train_blocks, val_stream = prepare_data(cfg)
    ensure_ray()
    use_gpu = resolve_use_gpu(cfg.use_gpu)
    cpus = cpus_per_worker(cfg.cpus_per_worker, cfg.num_workers)

    run_dir.mkdir(parents=True, exist_ok=True)
    storage = run_dir / "ray"
    resume = latest_checkpoint(storage)
    if resume is not None:
        log.warning(f"[train-lm] resuming from {resume} (step {read_trainer_state(resume)['step']})")
    loop_config = {
        "cfg": dataclasses.asdict(cfg),
        "train_ref": ray.put(train_blocks),
        "val_ref": ray.put(val_stream),
        "tokenizer_files": saved_files(tokenizer),
        "run_dir": str(run_dir),
        "threads": cpus,
        "untimed_steps": untimed_steps,
        "resume_dir": str(resume) if resume else "",
        # fault injection for the resume tests: fail once (marker file) when reaching this step
        "fail_at_step": fail_at_step_from_env(),
    }
    result = fit(train_loop, loop_config, storage, cfg.num_workers, use_gpu, cpus, cfg.keep_checkpoints, cfg.max_failures)
    model_dir = run_dir / "model"
    copy_final_model(result, model_dir)
    metrics = result.metrics
    summary = {
        "run_dir": str(run_dir),
        "model_dir": str(model_dir),
        "tokenizer_dir": str(Path(tok_dir).resolve()),
        "metrics_csv": str(run_dir / "metrics.csv"),
        "tensorboard_dir": str(run_dir / "tensorboard"),
        "parameters": int(metrics["parameters"]),
        "steps": int(metrics["step"]),
        "train_tokens": int(train_blocks.size),
        "final_loss": float(metrics["loss"]),
        "val_ppl": float(metrics["val_ppl"]),
        "tokens_per_s": float(metrics["mean_tokens_per_s"]),
        "num_workers": cfg.num_workers,
        "config": dataclasses.asdict(cfg),
        "cached": False,
    }
    atomic_write_json(result_path, summary)
    return summary


# --------------------------------------------------------------------------------- on the workers
def train_loop(c: dict) -> None:
    cfg = config_from_dict(TrainLMConfig, c["cfg"])
    rank, world, device = worker_context(c["threads"], cfg.seed)

    tok_dir, tokenizer = worker_tokenizer(c["tokenizer_files"])
    if is_preset(cfg.model):
        model = build_causal_lm(cfg.model, tokenizer, dropout=cfg.dropout, n_positions=max(512, cfg.seq_len))
    else:
        model = load_causal_lm(cfg.model, device="cpu", dtype=torch.float32).train()
    optimizer = make_optimizer(model, cfg.lr, cfg.weight_decay)
    start = restore_start_step(model, optimizer, c["resume_dir"])
    raw_model = model
    model = ray.train.torch.prepare_model(model)  # DDP when world > 1, and onto the device
    blocks = torch.from_numpy(np.asarray(ray.get(c["train_ref"])).astype(np.int64))
    metrics_log = MetricsLog(Path(c["run_dir"]), resume_step=start) if rank == 0 else None
    n_params = count_parameters(raw_model)
    print_every = max(1, cfg.steps // 20)

    tokens_per_step = cfg.batch_size * cfg.seq_len
    skip = c.get("untimed_steps", 0)  # warm-up steps left out of the mean throughput (benchmarks)
    loss_value, elapsed, timed_steps = float("nan"), 0.0, 0
    model.train()
    for step in range(start, cfg.steps):
        maybe_inject_failure(c["run_dir"], c["fail_at_step"], step, rank)
        t0 = time.perf_counter()
        lr = lr_at(step, cfg.lr, cfg.warmup_steps, cfg.steps, cfg.min_lr_ratio)
        rows = batch_rows(len(blocks), cfg.batch_size, step, cfg.seed, rank, world)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            loss = lm_loss(model, blocks[rows].to(device))
        grad_norm = apply_update(model, optimizer, loss, lr, cfg.grad_clip)
        loss_value = float(loss.detach())  # this rank's loss; ranks differ only by their batch
        dt = time.perf_counter() - t0
        if step - start >= skip:
            elapsed, timed_steps = elapsed + dt, timed_steps + 1
        done = step + 1
        metrics = {"step": done, "loss": loss_value, "lr": lr, "grad_norm": grad_norm, "tokens_per_s": tokens_per_step / dt, "parameters": n_params}
        if metrics_log is not None:
            metrics_log.log(done, {k: v for k, v in metrics.items() if k not in ("step", "parameters")})
            if done % print_every == 0 or done == cfg.steps:
                log.info(f"[train-lm] step {done}/{cfg.steps} loss {loss_value:.4f} lr {lr:.2e} tok/s {metrics['tokens_per_s']:.0f}")
        final = done == cfg.steps
        if final:
            metrics["mean_tokens_per_s"] = tokens_per_step * timed_steps / elapsed if elapsed else float("nan")
            metrics["val_ppl"] = _validation_ppl(raw_model, c, cfg) if rank == 0 else float("nan")
        state = {"step": done, "seed": cfg.seed, "model": cfg.model}
        report_step(metrics, done, cfg.steps, cfg.checkpoint_every, cfg.report_every, rank,
                    lambda d: save_checkpoint(d, raw_model, tokenizer, optimizer, state))
    if metrics_log is not None:
        metrics_log.close()
    shutil.rmtree(tok_dir, ignore_errors=True)


@torch.no_grad()
def _validation_ppl(model, c: dict, cfg: TrainLMConfig) -> float:
    val = np.asarray(ray.get(c["val_ref"]))
    if len(val) < 2:
        return float("nan")
    model.eval()
    ppl = perplexity(model, val, context_len=cfg.seq_len, stride=max(1, cfg.seq_len // 2))["ppl"]
    model.train()
    return ppl if math.isfinite(ppl) else float("nan")


