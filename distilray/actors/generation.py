"""Ray Data actor: a target model that continues prompts by sampling (the pseudo-data set of drafter
distillation, reference/speculative.md 5)."""

from __future__ import annotations

import numpy as np
import torch

from distilray.generation import sample_continuations
from distilray.models.causal_lm import load_causal_lm


class TargetSampler:
    """Loads the target once per actor; each batch of prompts becomes a batch of fixed-length samples."""

    def __init__(self, model: str, new_tokens: int, temperature: float, seed: int, threads: int = 0):
        if threads:
            torch.set_num_threads(threads)
        self.model = load_causal_lm(model)
        self.new_tokens, self.temperature, self.seed = new_tokens, temperature, seed

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        prompts = torch.from_numpy(np.stack(batch["prompt"]).astype(np.int64))  # (B, P)
        # seeded by the batch's first row id: the same rows give the same samples on any actor
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + int(batch["row"][0]))
        seq = sample_continuations(self.model, prompts, self.new_tokens, self.temperature, generator)
        return {"row": batch["row"], "tokens": seq.numpy().astype(np.int32)}
