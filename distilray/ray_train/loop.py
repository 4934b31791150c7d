"""The one training loop every Ray Train worker runs, whatever the method (its hooks give the model,
batches, loss and validation). Here: seeds, the learning-rate schedule, the update with clipping,
metrics (metrics.csv, TensorBoard, Ray Train reports), checkpoints, resume, and the one fault
injection point the resume tests use."""

from __future__ import annotations

import logging
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import ray
import ray.train
import torch
from safetensors.torch import load_file, save_file

from distilray.console import quiet_worker
from distilray.models.causal_lm import count_parameters
from distilray.ray_train.hooks import TrainerHooks, WorkerInfo
from distilray.training import (
    MetricsLog,
    load_checkpoint_into,
    lr_at,
    make_optimizer,
    read_trainer_state,
    save_optimizer_and_state,
)

log = logging.getLogger("distilray.ray_train")

EXTRA_TENSORS = "extra.safetensors"


@dataclass(frozen=True)
class LoopInput:
    """What the driver hands every worker (Ray ships it to the worker processes)."""

    hooks: type[TrainerHooks]
    config: Any  # the command's frozen config: steps, batch_size, seed, optim, checkpoint
    data: dict[str, Any] = field(default_factory=dict)  # object refs of arrays, by name
    files: dict[str, dict[str, bytes]] = field(default_factory=dict)  # folders to materialise, by name
    run_dir: str = ""
    threads: int = 1
    resume_dir: str = ""  # a checkpoint an earlier, interrupted run of the same config left
    untimed_steps: int = 0  # warm-up steps left out of the mean throughput (benchmarks)
    fail_at_step: int = 0  # fault injection for the resume tests (0: never)


def train_loop(loop_config: dict) -> None:
    """Ray Train's per-worker function: `loop_config["job"]` is a LoopInput."""
    job: LoopInput = loop_config["job"]
    cfg = job.config
    quiet_worker()
    ctx = ray.train.get_context()
    torch.set_num_threads(job.threads)
    torch.manual_seed(cfg.seed)
    worker = WorkerInfo(ctx.get_world_rank(), ctx.get_world_size(), ray.train.torch.get_device(), Path(job.run_dir))
    folders = {name: write_folder(files, f"distilray-{name}-") for name, files in job.files.items()}
    data = {name: ray.get(ref) for name, ref in job.data.items()}
    try:
        _run_steps(job, job.hooks(cfg, worker, data, folders), worker)
    finally:
        for folder in folders.values():
            shutil.rmtree(folder, ignore_errors=True)


def _run_steps(job: LoopInput, hooks: TrainerHooks, worker: WorkerInfo) -> None:
    cfg, optim, ckpt = job.config, job.config.optim, job.config.checkpoint
    raw = hooks.build()
    optimizer = make_optimizer(raw, optim.lr, optim.weight_decay)
    start = _restore(raw, optimizer, hooks, job.resume_dir)
    model = ray.train.torch.prepare_model(raw)  # DDP when world > 1, and onto the device
    metrics_log = MetricsLog(worker.run_dir, resume_step=start) if worker.rank == 0 else None
    n_params, tokens_per_step = count_parameters(raw), hooks.tokens_per_step()
    autocast = worker.device.type == "cuda" and hooks.mixed_precision
    print_every = max(1, cfg.steps // 20)
    first_loss, elapsed, timed_steps = float("nan"), 0.0, 0
    model.train()
    for step in range(start, cfg.steps):
        _fail_once_at(job, step, worker.rank)
        # dropout and any other draw from torch's global generator: a pure function of (seed, step, rank),
        # so a run resumed at any step draws what an uninterrupted one would
        torch.manual_seed(int(np.random.SeedSequence([cfg.seed, step, worker.rank]).generate_state(1)[0]))
        t0 = time.perf_counter()
        lr = lr_at(step, optim.lr, optim.warmup_steps, cfg.steps, optim.min_lr_ratio)
        batch = hooks.batch(step)
        with torch.autocast(worker.device.type, dtype=torch.bfloat16, enabled=autocast):
            out = hooks.loss(model, batch, step)
        loss, extra = out if isinstance(out, tuple) else (out, {})
        grad_norm = apply_update(model, optimizer, loss, lr, optim.grad_clip)
        done = step + 1
        hooks.after_update(done, raw)
        seconds = time.perf_counter() - t0
        if step - start >= job.untimed_steps:
            elapsed, timed_steps = elapsed + seconds, timed_steps + 1
        loss_value = float(loss.detach())  # this rank's loss; ranks differ only by their batch
        first_loss = loss_value if step == start else first_loss
        metrics = {
            "step": done,
            "loss": loss_value,
            "lr": lr,
            "grad_norm": grad_norm,
            "seconds_per_step": seconds,
            **extra,
        }
        if tokens_per_step:
            metrics["tokens_per_s"] = tokens_per_step / seconds
        if metrics_log is not None:
            metrics_log.log(done, {k: v for k, v in metrics.items() if k != "step"})
            if done % print_every == 0 or done == cfg.steps:
                log.info(f"[{hooks.label}] step {done}/{cfg.steps} loss {loss_value:.4f} lr {lr:.2e}")
        metrics.update(parameters=n_params, first_loss=first_loss)
        if done == cfg.steps:
            if tokens_per_step:
                metrics["mean_tokens_per_s"] = tokens_per_step * timed_steps / elapsed if elapsed else float("nan")
            if worker.rank == 0:
                raw.eval()
                with torch.no_grad():
                    metrics.update({f"val_{k}": v for k, v in hooks.validate(raw).items()})
                raw.train()
        _report(metrics, done, cfg.steps, ckpt, worker.rank, lambda d: _save(d, raw, optimizer, hooks, done, cfg))
    if metrics_log is not None:
        metrics_log.close()


def apply_update(model, optimizer, loss: torch.Tensor, lr: float, grad_clip: float) -> float:
    """One optimizer step at learning rate `lr` with gradient clipping; returns the gradient norm."""
    for group in optimizer.param_groups:
        group["lr"] = lr
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    optimizer.step()
    return float(grad_norm)


def _fail_once_at(job: LoopInput, step: int, rank: int) -> None:
    """Fault injection for the resume tests: fail once (a marker file remembers) when reaching a step."""
    marker = Path(job.run_dir) / "injected_failure"
    if job.fail_at_step and step == job.fail_at_step and rank == 0 and not marker.exists():
        marker.touch()
        raise RuntimeError(f"injected failure at step {step}")


# ------------------------------------------------------------------------------------ checkpoints
def _save(folder: Path, model, optimizer, hooks: TrainerHooks, step: int, cfg: Any) -> None:
    """Model files, optimizer tensors, extra tensors, then the JSON trainer state (written last = complete)."""
    hooks.save_model(model, folder)
    tensors = hooks.extra_tensors()
    if tensors:
        save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(folder / EXTRA_TENSORS))
    save_optimizer_and_state(
        folder, optimizer, {"step": step, "seed": cfg.seed, "method": hooks.label, "extra": hooks.extra_state()}
    )


def _restore(model, optimizer, hooks: TrainerHooks, resume_dir: str) -> int:
    """The step to start from: Ray Train's checkpoint after a worker-group restart within this run,
    else the one an earlier, interrupted run of the same config left (`resume_dir`), else 0."""
    checkpoint = ray.train.get_checkpoint()
    if checkpoint:
        with checkpoint.as_directory() as d:
            return restore_into(Path(d), model, optimizer, hooks)
    if resume_dir:
        return restore_into(Path(resume_dir), model, optimizer, hooks)
    return 0


def restore_into(folder: Path, model, optimizer, hooks: TrainerHooks) -> int:
    """Weights, optimizer and the method's extra state from a checkpoint folder, in place; returns its step."""
    state = load_checkpoint_into(folder, model, optimizer)
    extra = folder / EXTRA_TENSORS
    hooks.load_extra(state.get("extra", {}), load_file(str(extra)) if extra.is_file() else {}, folder)
    return int(state["step"])


def _report(metrics: dict, done: int, total: int, ckpt, rank: int, save) -> None:
    """Checkpoint (and report) every `ckpt.every` steps and at the end; report alone every `ckpt.report_every`.

    A report waits for the controller's next poll (every 2 s), so reporting every step would throttle
    a fast loop; every rank reports at the same steps, as Ray Train needs."""
    if done == total or done % ckpt.every == 0:
        if rank != 0:
            ray.train.report(metrics)
            return
        with tempfile.TemporaryDirectory(prefix="distilray-ckpt-") as d:
            save(Path(d))
            ray.train.report(
                metrics, checkpoint=ray.train.Checkpoint.from_directory(d), checkpoint_dir_name=f"checkpoint_{done:07d}"
            )
    elif done % ckpt.report_every == 0:
        ray.train.report(metrics)


def latest_checkpoint(storage: Path) -> Path | None:
    """The most advanced complete checkpoint a previous run of this config left behind."""
    best: tuple[int, Path] | None = None
    for d in Path(storage).glob("*/checkpoint_*"):
        if (d / "trainer_state.json").is_file():
            step = int(read_trainer_state(d)["step"])
            if best is None or step > best[0]:
                best = (step, d)
    return best[1] if best else None


def write_folder(files: dict[str, bytes], prefix: str) -> Path:
    """Materialise shipped files (relative paths, subfolders included) in a fresh temporary folder on this worker."""
    path = Path(tempfile.mkdtemp(prefix=prefix))
    for name, data in files.items():
        if Path(name).is_absolute() or ".." in Path(name).parts:
            raise ValueError(f"shipped file {name!r} points outside its folder")
        target = path / name
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(data)
    return path
