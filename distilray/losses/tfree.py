"""T-Free's training loss (reference/tfree.md 4): multi-label BCE of the output head against the next word's
sparse trigram pattern.

The head gives v logits z per word position; the target y is binary, y_j = 1 iff row j lies in the next word's
pattern (the union of its trigrams' m hashed rows). Targets travel as index lists (flat indices + offsets) and
become dense only here, on the logits' device: a dense int8 target per sample would be S x v bytes
(4096 x 32000 = 131 MB, reference/tfree.md 8.7).
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from distilray.errors import DistilrayError


def pattern_targets(flat: Tensor, offsets: Tensor, n_rows: int, v: int) -> Tensor:
    """Binary targets (n_rows, v) float32 from index lists, built on flat's device.

    flat (N,) int64 holds every row's indices back to back; offsets (n_rows + 1,) int64 are where each row starts,
    the last one being N. An index repeated within a row gives 1, never a count (the original binarises its int8
    counts in the loss). An empty row is all zeros.
    """
    if offsets.dim() != 1 or offsets.numel() != n_rows + 1:
        raise DistilrayError(f"offsets must hold n_rows + 1 = {n_rows + 1} entries, got shape {tuple(offsets.shape)}")
    if flat.dim() != 1:
        raise DistilrayError(f"flat indices must be one-dimensional, got shape {tuple(flat.shape)}")
    if int(offsets[-1]) != flat.numel() or int(offsets[0]) != 0:
        raise DistilrayError(
            f"offsets must run from 0 to len(flat) = {flat.numel()}, got {int(offsets[0])} .. {int(offsets[-1])}"
        )
    lengths = offsets[1:] - offsets[:-1]  # (n_rows,)
    rows = torch.repeat_interleave(torch.arange(n_rows, device=flat.device), lengths, output_size=flat.numel())
    targets = torch.zeros(n_rows, v, dtype=torch.float32, device=flat.device)
    targets[rows, flat] = 1.0  # every write of a repeated (row, index) pair writes the same 1
    return targets


def tfree_bce(
    logits: Tensor,
    targets: Tensor | tuple[Tensor, Tensor],
    loss_weights: Tensor,
    pos_weight: float,
    loss_scale: float,
    normalization: Literal["real", "all"] = "real",
) -> Tensor:
    """Weighted multi-label BCE, a scalar.

    logits (B, S, v); targets (B, S, v) binary, or (flat, offsets) index lists of the B*S positions row-major
    (see `pattern_targets`); loss_weights (B, S) float, 0 at padding and at positions without loss.

        L = loss_scale / N * sum_{b,t,j} w_{b,t} [ -pw y_j log sigma(z_j) - (1 - y_j) log(1 - sigma(z_j)) ]

    with pw = pos_weight and N = R * v for "real" (R = the number of positions with w > 0: padding does not dilute
    the loss, distilray's default) or N = B * S * v for "all" (the original's `.mean()`, padding included). So
    all = real * R / (B * S). With R = 0 the loss is 0, still attached to the graph.
    """
    if logits.dim() != 3:
        raise DistilrayError(f"logits must be (B, S, v), got shape {tuple(logits.shape)}")
    batch, length, v = logits.shape
    if loss_weights.shape != (batch, length):
        raise DistilrayError(f"loss_weights must be (B, S) = {(batch, length)}, got {tuple(loss_weights.shape)}")
    if pos_weight <= 0:
        raise DistilrayError(f"pos_weight must be positive, got {pos_weight}")
    if normalization not in ("real", "all"):
        raise DistilrayError(f"normalization must be 'real' or 'all', got {normalization!r}")
    if isinstance(targets, (tuple, list)):
        flat, offsets = targets
        targets = pattern_targets(flat, offsets, batch * length, v).view(batch, length, v)
    elif targets.shape != logits.shape:
        raise DistilrayError(f"targets must be (B, S, v) = {tuple(logits.shape)}, got {tuple(targets.shape)}")
    logits = logits.float()
    positive_weight = torch.tensor(pos_weight, dtype=torch.float32, device=logits.device)
    elementwise = F.binary_cross_entropy_with_logits(
        logits, targets.to(logits.dtype), pos_weight=positive_weight, reduction="none"
    )  # (B, S, v)
    weights = loss_weights.to(logits.dtype)
    total = (elementwise * weights.unsqueeze(-1)).sum()
    if normalization == "all":
        return loss_scale * total / (batch * length * v)
    real = (weights > 0).sum().clamp_min(1)  # stays a tensor: no host sync; R = 0 gives 0 / 1
    return loss_scale * total / (real * v)
