"""The one training driver: artifact cache, resume, Ray Train `fit`, the final model and the summary.

def run(cfg):
    run_dir = ...                          # keyed by config_hash(cfg): scale/checkpoint never enter
    if (cached := cached_result(run_dir)):
        return cached
    job = TrainJob(MyHooks, cfg, run_dir, data={"train": blocks}, folders={"tokenizer": tok_dir})
    return train(job, lambda metrics: {"val_ppl": metrics["val_ppl"]})
"""

from __future__ import annotations

import csv
import logging
import os
import shutil
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import ray
from ray.train import CheckpointConfig, FailureConfig, LoggingConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchTrainer

from distilray.actors.cluster import cpus_per_worker, ensure_ray, resolve_use_gpu
from distilray.config_loading import config_to_dict
from distilray.console import progress
from distilray.errors import DistilrayError
from distilray.io_utils import atomic_dir, atomic_write_json, read_json
from distilray.ray_train.hooks import TrainerHooks
from distilray.ray_train.loop import EXTRA_TENSORS, LoopInput, latest_checkpoint, train_loop
from distilray.training import OPTIMIZER_STATE, read_trainer_state

log = logging.getLogger("distilray.ray_train")

RESULT = "result.json"


@dataclass(frozen=True)
class TrainJob:
    """One method's training run, as the driver needs it."""

    hooks: type[TrainerHooks]
    config: Any  # the command's config: steps, batch_size, seed, optim, scale, checkpoint sections
    run_dir: Path
    data: dict[str, Any] = field(default_factory=dict)  # arrays for the object store, by name
    folders: dict[str, str | Path] = field(default_factory=dict)  # local folders shipped to the workers
    untimed_steps: int = 0  # warm-up steps left out of the mean throughput (benchmarks)


def cached_result(run_dir: Path) -> dict | None:
    """The summary of a finished run of the same config (`cached: true`), or None."""
    result = Path(run_dir) / RESULT
    if result.is_file() and (Path(run_dir) / "model" / "config.json").is_file():
        return {**read_json(result), "cached": True}
    return None


def train(job: TrainJob, summarize: Callable[[dict], dict] = lambda metrics: {}) -> dict:
    """Run (or resume) the job on Ray Train; write and return the summary (common figures plus `summarize`'s)."""
    started = time.perf_counter()
    cfg, run_dir = job.config, Path(job.run_dir)
    ensure_ray()
    use_gpu = resolve_use_gpu(cfg.scale.use_gpu)
    cpus = cpus_per_worker(cfg.scale.cpus_per_worker, cfg.scale.num_workers)
    run_dir.mkdir(parents=True, exist_ok=True)
    storage = run_dir / "ray"
    resume = latest_checkpoint(storage)
    if resume is not None:
        log.warning(f"[{job.hooks.label}] resuming from {resume} (step {read_trainer_state(resume)['step']})")
    loop_input = LoopInput(
        hooks=job.hooks,
        config=cfg,
        data={name: ray.put(array) for name, array in job.data.items()},
        files={name: folder_files(folder) for name, folder in job.folders.items()},
        run_dir=str(run_dir),
        threads=cpus,
        resume_dir=str(resume) if resume else "",
        untimed_steps=job.untimed_steps,
        fail_at_step=int(os.environ.get("DISTILRAY_FAIL_AT_STEP", "0")),
    )
    result = _fit(loop_input, storage, use_gpu, cpus, job.hooks.label)
    model_dir = run_dir / "model"
    copy_final_model(result, model_dir)
    metrics = result.metrics
    summary = {
        "run_dir": str(run_dir),
        "model_dir": str(model_dir),
        "metrics_csv": str(run_dir / "metrics.csv"),
        "tensorboard_dir": str(run_dir / "tensorboard"),
        "parameters": int(metrics["parameters"]),
        "steps": int(metrics["step"]),
        "first_loss": float(metrics["first_loss"]),
        "final_loss": float(metrics["loss"]),
        "num_workers": cfg.scale.num_workers,
        "seconds": round(time.perf_counter() - started, 1),
        **summarize(metrics),
        "config": config_to_dict(cfg),
        "cached": False,
    }
    atomic_write_json(run_dir / RESULT, summary)
    return summary


def _fit(loop_input: LoopInput, storage: Path, use_gpu: bool, cpus: int, label: str):
    """Ray Train's TorchTrainer over the one loop; the Result, or one clear error that keeps the checkpoints."""
    cfg = loop_input.config
    trainer = TorchTrainer(
        train_loop,
        train_loop_config={"job": loop_input},
        scaling_config=ScalingConfig(
            num_workers=cfg.scale.num_workers, use_gpu=use_gpu, resources_per_worker={"CPU": cpus}
        ),
        run_config=RunConfig(
            name="train",
            storage_path=str(storage),
            checkpoint_config=CheckpointConfig(num_to_keep=max(1, cfg.checkpoint.keep)),
            failure_config=FailureConfig(max_failures=cfg.checkpoint.max_failures),
            logging_config=LoggingConfig(log_level="WARNING"),  # per-step report lines drown the progress
        ),
    )
    with _ProgressFromMetrics(Path(loop_input.run_dir) / "metrics.csv", cfg.steps, label):
        try:
            return trainer.fit()
        except Exception as e:  # Ray wraps worker errors; show the cause, keep the checkpoints
            cause = str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__
            raise DistilrayError(
                f"training failed: {cause}\n  re-run the same command to resume from the latest checkpoint in {storage}"
            ) from None


class _ProgressFromMetrics:
    """A driver-side progress bar that follows the step column of rank 0's metrics.csv (local runs, or any
    run whose artifacts_dir the driver can read); silent where the file never appears."""

    def __init__(self, csv_path: Path, total: int, label: str) -> None:
        self.csv_path, self.total, self.label = csv_path, total, label
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._follow, daemon=True)

    def __enter__(self) -> "_ProgressFromMetrics":
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

    def _follow(self) -> None:
        with progress(self.total, self.label) as bar:
            while True:
                stopping = self._stop.wait(1.0)
                step = _last_step(self.csv_path)
                if step > bar.n:
                    bar.update(step - bar.n)
                if stopping:
                    break


def _last_step(csv_path: Path) -> int:
    try:
        with open(csv_path, newline="") as f:
            rows = list(csv.reader(f))
        return int(rows[-1][0]) if len(rows) > 1 else 0
    except (OSError, ValueError, IndexError):
        return 0


def copy_final_model(result, model_dir: Path) -> None:
    """The final checkpoint's model files (without optimizer and extra state) become `model_dir`, atomically."""
    with result.checkpoint.as_directory() as ckpt, atomic_dir(model_dir) as tmp:
        shutil.copytree(ckpt, tmp, dirs_exist_ok=True)
        for name in (OPTIMIZER_STATE, EXTRA_TENSORS):
            (tmp / name).unlink(missing_ok=True)


def folder_files(folder: str | Path) -> dict[str, bytes]:
    """The plain files of a folder and its subfolders by relative path, to ship inside the loop input (no shared
    disk needed)."""
    root = Path(folder)
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}
