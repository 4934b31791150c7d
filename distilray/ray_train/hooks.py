"""What a method gives the shared training loop: a `TrainerHooks` subclass. Plain torch, no Ray: hooks
can be built and stepped in a test without a cluster.

The loop builds the hooks on every worker as `Hooks(cfg, worker, data, folders)`, where `data` holds
the arrays the driver put in the object store (already fetched) and `folders` the folders it shipped
(tokenizer, teacher, init weights), materialised on this worker. The config must carry `steps`,
`batch_size`, `seed` and the `optim` section.

Extra state that must survive a restart (a distillation round, dt, a teacher's weights) goes through
`extra_state` (JSON, stored in the checkpoint's trainer_state.json) and `extra_tensors` (stored in
extra.safetensors); `load_extra` gets both back on resume, with the checkpoint folder for files that
`save_model` wrote beside the model (EMA weights). SDTT, for example, returns `{"round": r, "delta": d}`
and the teacher's state dict, and swaps the teacher in `after_update` when a round ends.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch


@dataclass(frozen=True)
class WorkerInfo:
    """Where this copy of the loop runs."""

    rank: int
    world: int
    device: torch.device
    run_dir: Path


class TrainerHooks:
    """A method's part of training; the loop does the rest (see distilray.ray_train.loop)."""

    label = "train"  # how progress lines and logs name the method
    mixed_precision = True  # the loss runs under bf16 autocast on CUDA

    def __init__(self, cfg: Any, worker: WorkerInfo, data: dict[str, Any], folders: dict[str, Path]) -> None:
        self.cfg, self.worker, self.data, self.folders = cfg, worker, data, folders
        self._tokenizer = None

    @property
    def tokenizer(self):
        """The shipped tokenizer (folder `tokenizer`), loaded once."""
        if self._tokenizer is None and "tokenizer" in self.folders:
            from distilray.tokenizer import load_tokenizer

            self._tokenizer = load_tokenizer(self.folders["tokenizer"])
        return self._tokenizer

    # ---------------------------------------------------------------------------- a method must give
    def build(self) -> torch.nn.Module:
        """The module to train, on the CPU (fresh or loaded); the loop moves and wraps it."""
        raise NotImplementedError

    def batch(self, step: int) -> Any:
        """This rank's batch for `step`: a pure function of (seed, step), so a resumed run sees the same."""
        raise NotImplementedError

    def loss(self, model: torch.nn.Module, batch: Any, step: int) -> torch.Tensor | tuple[torch.Tensor, dict]:
        """The scalar loss (and optionally extra metrics) of `batch`; `model` may be DDP-wrapped."""
        raise NotImplementedError

    # ---------------------------------------------------------------------------- a method may give
    def validate(self, model: torch.nn.Module) -> dict[str, float]:
        """Figures after the last step, on rank 0 (reported as `val_<name>`)."""
        return {}

    def tokens_per_step(self) -> int:
        """Tokens of one global batch, for tokens/s (0: not reported)."""
        return 0

    def after_update(self, done: int, model: torch.nn.Module) -> None:
        """Called after optimizer step number `done` (e.g. to end a distillation round)."""

    def save_model(self, model: torch.nn.Module, folder: Path) -> None:
        """The model's files in a checkpoint (and so the final model): weights, config, tokenizer."""
        model.save_pretrained(folder)
        if self.tokenizer is not None:
            self.tokenizer.save_pretrained(folder)

    def extra_state(self) -> dict[str, Any]:
        return {}

    def extra_tensors(self) -> dict[str, torch.Tensor]:
        return {}

    def load_extra(self, state: dict[str, Any], tensors: dict[str, torch.Tensor], folder: Path) -> None:
        """Restore what `extra_state`, `extra_tensors` and `save_model` saved (called on resume only)."""
