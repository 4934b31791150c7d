"""Ray Train plumbing shared by every trainer (train-lm, distill-drafter, ...): run a TorchTrainer with
checkpoints kept on disk, resume from what an earlier run of the same config left, report from the
workers, and ship small folders (tokenizers, models) to workers without a shared file system."""

from __future__ import annotations

import dataclasses
import logging
import os
import shutil
import tempfile
import typing
from pathlib import Path
from typing import Callable

import ray.train
import torch
from ray.train import CheckpointConfig, FailureConfig, LoggingConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchTrainer

from distilray.errors import DistilrayError
from distilray.io_utils import atomic_dir
from distilray.tokenizer import load_tokenizer
from distilray.training import load_checkpoint_into, read_trainer_state


def latest_checkpoint(storage: Path) -> Path | None:
    """The most advanced complete checkpoint a previous run of this config left behind."""
    best: tuple[int, Path] | None = None
    for d in Path(storage).glob("*/checkpoint_*"):
        if (d / "trainer_state.json").is_file():
            step = int(read_trainer_state(d)["step"])
            if best is None or step > best[0]:
                best = (step, d)
    return best[1] if best else None


def fit(train_loop: Callable[[dict], None], loop_config: dict, storage: Path, num_workers: int, use_gpu: bool,
        cpus_per_worker: int, keep_checkpoints: int, max_failures: int):
    """Run `train_loop` on `num_workers` Ray Train workers; the Result, or one clear error that keeps the checkpoints."""
    trainer = TorchTrainer(
        train_loop,
        train_loop_config=loop_config,
        scaling_config=ScalingConfig(num_workers=num_workers, use_gpu=use_gpu, resources_per_worker={"CPU": cpus_per_worker}),
        run_config=RunConfig(
            name="train",
            storage_path=str(storage),
            checkpoint_config=CheckpointConfig(num_to_keep=max(1, keep_checkpoints)),
            failure_config=FailureConfig(max_failures=max_failures),
            logging_config=LoggingConfig(log_level="WARNING"),  # per-step report lines drown the progress
        ),
    )
    try:
        return trainer.fit()
    except Exception as e:  # Ray wraps worker errors; show the cause, keep the checkpoints
        cause = str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__
        raise DistilrayError(f"training failed: {cause}\n  re-run the same command to resume from the latest checkpoint in {storage}") from None


def copy_final_model(result, model_dir: Path) -> None:
    """The final checkpoint's model files (without optimizer state) become `model_dir`, atomically."""
    with result.checkpoint.as_directory() as ckpt, atomic_dir(model_dir) as tmp:
        shutil.copytree(ckpt, tmp, dirs_exist_ok=True)
        (tmp / "optimizer.pt").unlink(missing_ok=True)


# --------------------------------------------------------------------------------- on the workers
def config_from_dict(cls: type, values: dict):
    """Rebuild a frozen config shipped as `dataclasses.asdict` (nested sections included)."""
    hints = typing.get_type_hints(cls)
    return cls(**{k: config_from_dict(hints[k], v) if dataclasses.is_dataclass(hints[k]) else v for k, v in values.items()})


def worker_tokenizer(files: dict[str, bytes]):
    """(folder, tokenizer) from tokenizer files shipped in the loop config; remove the folder when done."""
    folder = write_folder(files, "distilray-tok-")
    return folder, load_tokenizer(folder)


def worker_context(threads: int, seed: int) -> tuple[int, int, torch.device]:
    """(rank, world size, device) of this Ray Train worker, with torch threads and seed set."""
    quiet_per_step_report_lines()
    ctx = ray.train.get_context()
    torch.set_num_threads(threads)
    torch.manual_seed(seed)
    return ctx.get_world_rank(), ctx.get_world_size(), ray.train.torch.get_device()


def restore_start_step(model, optimizer, resume_dir: str) -> int:
    """The step to start from: Ray Train's checkpoint after a worker-group restart within this run,
    else the one an earlier, interrupted run of the same config left (`resume_dir`), else 0."""
    checkpoint = ray.train.get_checkpoint()
    if checkpoint:
        with checkpoint.as_directory() as d:
            return int(load_checkpoint_into(Path(d), model, optimizer)["step"])
    if resume_dir:
        return int(load_checkpoint_into(Path(resume_dir), model, optimizer)["step"])
    return 0


def apply_update(model, optimizer, loss: torch.Tensor, lr: float, grad_clip: float) -> float:
    """One optimizer step at learning rate `lr` with gradient clipping; returns the gradient norm."""
    for group in optimizer.param_groups:
        group["lr"] = lr
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    optimizer.step()
    return float(grad_norm)


def report_step(metrics: dict, done: int, total: int, checkpoint_every: int, report_every: int, rank: int,
                save: Callable[[Path], None]) -> None:
    """Checkpoint (and report) every `checkpoint_every` steps and at the end; report alone every `report_every`.

    A report waits for the controller's next poll (every 2 s), so reporting every step would throttle
    a fast loop; every rank reports at the same steps, as Ray Train needs."""
    if done == total or done % checkpoint_every == 0:
        report_with_checkpoint(metrics, save, done, rank)
    elif done % report_every == 0:
        ray.train.report(metrics)


def report_with_checkpoint(metrics: dict, save: Callable[[Path], None], step: int, rank: int) -> None:
    """Rank 0 writes the checkpoint through `save(dir)`; every rank reports (Ray Train needs all of them)."""
    if rank != 0:
        ray.train.report(metrics)
        return
    with tempfile.TemporaryDirectory(prefix="distilray-ckpt-") as d:
        save(Path(d))
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(d), checkpoint_dir_name=f"checkpoint_{step:07d}")


def maybe_inject_failure(run_dir: str, fail_at_step: int, step: int, rank: int) -> None:
    """Fault injection for the resume tests: fail once (a marker file remembers) when reaching a step."""
    marker = Path(run_dir) / "injected_failure"
    if fail_at_step and step == fail_at_step and rank == 0 and not marker.exists():
        marker.touch()
        raise RuntimeError(f"injected failure at step {step}")


def fail_at_step_from_env() -> int:
    return int(os.environ.get("DISTILRAY_FAIL_AT_STEP", "0"))


def quiet_per_step_report_lines() -> None:
    """Ray Train logs every report at INFO on the console; progress lines every few steps say enough."""
    try:
        from ray.train.v2._internal.execution import context as train_context

        logging.getLogger(train_context.__file__).setLevel(logging.WARNING)
    except ImportError:  # another Ray version: the lines just stay
        pass


def folder_files(folder: str | Path) -> dict[str, bytes]:
    """The plain files of a folder, to ship inside a loop config (no shared disk needed)."""
    return {p.name: p.read_bytes() for p in Path(folder).iterdir() if p.is_file()}


def saved_files(obj) -> dict[str, bytes]:
    """Files of anything with save_pretrained (a tokenizer, a model)."""
    with tempfile.TemporaryDirectory() as d:
        obj.save_pretrained(d)
        return folder_files(d)


def write_folder(files: dict[str, bytes], prefix: str) -> Path:
    """Materialise shipped files in a fresh temporary folder on this worker."""
    path = Path(tempfile.mkdtemp(prefix=prefix))
    for name, data in files.items():
        (path / name).write_bytes(data)
    return path
