"""Ray Data actor: a frozen short-context model that scores long sequences through strided windows once
(token weighting's frozen variant: the original's precompute step)."""

from __future__ import annotations

import numpy as np
import torch

from distilray.console import quiet_worker
from distilray.losses.token_weighting import model_window_losses, short_context_losses
from distilray.models.rotary_lm import load_rotary_lm


class ShortContextScorer:
    """Loads the scorer once per actor at its own native context and RoPE settings (never the extended
    ones); each batch of rows (`seq_id`, `input_ids`) becomes their per-token short-context losses."""

    def __init__(
        self,
        model: str,
        base_length: int,
        base_stride: int,
        bos_id: int | None,
        windows_per_pass: int,
        threads: int = 0,
    ) -> None:
        quiet_worker()
        if threads:
            torch.set_num_threads(threads)
        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        self.model = load_rotary_lm(model, device=self.device).eval()
        self.score = model_window_losses(self.model)
        self.base_length, self.base_stride, self.bos_id = base_length, base_stride, bos_id
        self.windows_per_pass = windows_per_pass

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        tokens = torch.from_numpy(np.stack([np.asarray(r, dtype=np.int64) for r in batch["input_ids"]]))
        losses = short_context_losses(
            tokens.to(self.device),
            self.score,
            self.base_length,
            self.base_stride,
            bos_id=self.bos_id,
            first_window=True,  # window 0 scored too: the column is complete; training zeroes d there anyway
            windows_per_pass=self.windows_per_pass,
        )
        return {"seq_id": batch["seq_id"], "short_losses": list(losses.float().cpu().numpy())}
