"""Plain-torch training pieces shared by every trainer: packing, deterministic batches, schedule,
optimizer, checkpoint files. Ray lives in distilray.ray_train; nothing here imports it."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import numpy as np
import torch

from distilray.errors import DistilrayError
from distilray.io_utils import atomic_write_json

TRAINER_STATE = "trainer_state.json"
OPTIMIZER_STATE = "optimizer.pt"


def pack_tokens(docs_ids: list[list[int]], block_len: int, eos_id: int) -> np.ndarray:
    """Concatenate documents, each followed by eos, and cut into rows of `block_len` tokens. # (N, block_len)

    The tail that does not fill a row is dropped.
    """
    flat = np.fromiter((t for ids in docs_ids for t in (*ids, eos_id)), dtype=np.int32)
    n = len(flat) // block_len
    if n == 0:
        raise DistilrayError(f"corpus too small: {len(flat)} tokens, need at least {block_len} for one block")
    return flat[: n * block_len].reshape(n, block_len)


def bos_eos_blocks(docs_ids: list[list[int]], block_len: int, bos_id: int, eos_id: int) -> np.ndarray:
    """MDLM's block convention (`wrap`): documents each followed by eos, concatenated, cut into pieces of
    block_len - 2 tokens, each block [bos] + piece + [eos]. # (N, block_len)

    MDLM drops the remainder of every 1,000-document map batch; here only the corpus's final remainder."""
    if block_len < 3:
        raise DistilrayError(f"a block needs bos, a token and eos: block_len must be at least 3, got {block_len}")
    body = pack_tokens(docs_ids, block_len - 2, eos_id)  # (N, block_len - 2)
    n = len(body)
    return np.concatenate([np.full((n, 1), bos_id, np.int32), body, np.full((n, 1), eos_id, np.int32)], axis=1)


def flat_tokens(docs_ids: list[list[int]], eos_id: int) -> np.ndarray:
    """All documents as one stream with eos after each. # (T,)"""
    return np.fromiter((t for ids in docs_ids for t in (*ids, eos_id)), dtype=np.int32)


def batch_rows(num_rows: int, global_batch: int, step: int, seed: int, rank: int, world: int) -> np.ndarray:
    """Row indices this rank trains on at `step`.

    The sample stream is the concatenation of one seeded permutation per epoch, so batch `step` is a
    pure function of (seed, step): a resumed run sees exactly the batches an uninterrupted one would.
    """
    if global_batch % world:
        raise DistilrayError(f"batch_size {global_batch} is not divisible by num_workers {world}")
    local = global_batch // world
    start = step * global_batch + rank * local
    positions = np.arange(start, start + local)
    epochs, offsets = np.divmod(positions, num_rows)
    rows = np.empty(local, dtype=np.int64)
    for epoch in np.unique(epochs):
        perm = np.random.default_rng([seed, int(epoch)]).permutation(num_rows)
        mask = epochs == epoch
        rows[mask] = perm[offsets[mask]]
    return rows


def lr_at(step: int, base_lr: float, warmup: int, total: int, min_ratio: float) -> float:
    """Linear warm-up, then cosine decay to `min_ratio * base_lr` at `total`."""
    if step < warmup:
        return base_lr * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return base_lr * (min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def make_optimizer(model: torch.nn.Module, lr: float, weight_decay: float) -> torch.optim.AdamW:
    """AdamW with weight decay on matrices only (not on biases, norms)."""
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.95))


def lm_loss(model, batch: torch.Tensor) -> torch.Tensor:
    """Next-token cross-entropy on a packed batch. batch: # (B, T+1)"""
    inputs, targets = batch[:, :-1], batch[:, 1:]
    logits = model(input_ids=inputs).logits  # (B, T, V)
    return torch.nn.functional.cross_entropy(logits.float().reshape(-1, logits.size(-1)), targets.reshape(-1))


# ------------------------------------------------------------------------------------ checkpoints
def save_checkpoint(directory: Path, model, tokenizer, optimizer, state: dict) -> None:
    """HF model folder (safetensors) + optimizer tensors + a JSON trainer state; written last = complete."""
    directory.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(directory)  # safetensors: the default of HF models and of our own architectures
    if tokenizer is not None:
        tokenizer.save_pretrained(directory)
    save_optimizer_and_state(directory, optimizer, state)


def save_optimizer_and_state(directory: Path, optimizer, state: dict) -> None:
    """Optimizer tensors, then the JSON trainer state: its presence marks the checkpoint complete."""
    torch.save(optimizer.state_dict(), Path(directory) / OPTIMIZER_STATE)
    atomic_write_json(Path(directory) / TRAINER_STATE, state)


def read_trainer_state(directory: Path) -> dict:
    path = Path(directory) / TRAINER_STATE
    try:
        state = json.loads(path.read_text())
        int(state["step"])
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise DistilrayError(f"checkpoint {directory} is corrupt or incomplete ({TRAINER_STATE}: {e})") from None
    return state


def load_checkpoint_into(directory: Path, model, optimizer) -> dict:
    """Restore weights and optimizer state in place; return the trainer state. Never unpickles code."""
    from safetensors.torch import load_file

    directory = Path(directory)
    state = read_trainer_state(directory)
    try:
        weights = load_file(directory / "model.safetensors")
        missing, unexpected = model.load_state_dict(weights, strict=False)
        # tied weights (an output head on the input embedding, T5's shared embeddings) are stored once
        if set(missing) - _tied_keys(model) or unexpected:
            raise ValueError(f"missing {sorted(set(missing) - _tied_keys(model))[:3]}, unexpected {unexpected[:3]}")
        optimizer.load_state_dict(torch.load(directory / OPTIMIZER_STATE, weights_only=True))
    except Exception as e:  # safetensors, torch and shape errors all mean the same thing here
        raise DistilrayError(f"checkpoint {directory} is corrupt: {str(e).splitlines()[0]}") from None
    return state


def _tied_keys(model) -> set[str]:
    """State-dict keys whose tensor shares its storage with another key's."""
    by_ptr: dict[int, list[str]] = {}
    for k, v in model.state_dict().items():
        by_ptr.setdefault(v.data_ptr(), []).append(k)
    return {k for keys in by_ptr.values() if len(keys) > 1 for k in keys}


class MetricsLog:
    """Per-step metrics to a CSV (truncated to the resume step on restart) and TensorBoard."""

    def __init__(self, run_dir: Path, resume_step: int):
        self.csv_path = Path(run_dir) / "metrics.csv"
        kept: list[dict] = []
        if self.csv_path.exists():
            with open(self.csv_path, newline="") as f:
                kept = [r for r in csv.DictReader(f) if int(r["step"]) <= resume_step]
        self.fields: list[str] | None = list(kept[0].keys()) if kept else None
        self._file = open(self.csv_path, "w", newline="")
        self._writer = None
        if kept:
            self._writer = csv.DictWriter(self._file, fieldnames=self.fields)
            self._writer.writeheader()
            self._writer.writerows(kept)
        try:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(str(Path(run_dir) / "tensorboard"), purge_step=resume_step + 1)
        except ImportError:  # tensorboard is a dependency; a stripped install still trains
            self._tb = None

    def log(self, step: int, metrics: dict[str, float]) -> None:
        row = {"step": step, **metrics}
        if self._writer is None:
            self.fields = list(row.keys())
            self._writer = csv.DictWriter(self._file, fieldnames=self.fields, extrasaction="ignore")
            self._writer.writeheader()
        self._writer.writerow(row)
        self._file.flush()
        if self._tb is not None:
            for k, v in metrics.items():
                self._tb.add_scalar(k, v, step)

    def close(self) -> None:
        self._file.close()
        if self._tb is not None:
            self._tb.close()


# ------------------------------------------------------------------------------------ EMA
def ema_copy(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Floating-point parameters and buffers, detached, as the start of an exponential moving average."""
    return {k: v.detach().clone() for k, v in model.state_dict().items() if v.is_floating_point()}


def ema_decay(decay: float, updates: int) -> float:
    """The decay after `updates` updates, warmed up as min(decay, (1 + n) / (10 + n)): without the warm-up a
    short run's average (0.999 over a few hundred steps) would still be mostly its random initial weights."""
    return min(decay, (1 + updates) / (10 + updates))


@torch.no_grad()
def ema_update(ema: dict[str, torch.Tensor], model: torch.nn.Module, decay: float) -> None:
    """ema <- decay * ema + (1 - decay) * weights, in place."""
    for k, v in model.state_dict().items():
        if k in ema:
            if ema[k].device != v.device:  # the model moved to its device after the copy was taken
                ema[k] = ema[k].to(v.device)
            ema[k].mul_(decay).add_(v.detach().to(ema[k].dtype), alpha=1 - decay)
