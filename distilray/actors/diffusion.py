"""Ray Data actor: a masked diffusion LM that samples a batch of sequences per call (`sample-diffusion`,
as the SDTT seed spreads sampling over devices)."""

from __future__ import annotations

import time

import numpy as np
import torch

from distilray.console import quiet_worker
from distilray.decoding.mdlm import sample
from distilray.models.mdlm import load_diffusion_lm
from distilray.tokenizer import load_tokenizer


class DiffusionSampler:
    """Loads the model once per actor (its EMA weights); each batch of rows becomes a batch of samples.

    Rows: `sample_id` and `prompt` (token ids, empty for unconditional sampling; one length per batch)."""

    def __init__(
        self,
        model: str,
        num_steps: int,
        temperature: float,
        float64: bool,
        cache_predictions: bool,
        seed: int,
        threads: int = 0,
    ) -> None:
        quiet_worker()
        if threads:
            torch.set_num_threads(threads)
        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        self.model = load_diffusion_lm(model, device=self.device)
        self.tokenizer = load_tokenizer(model)
        self.num_steps, self.temperature, self.float64 = num_steps, temperature, float64
        self.cache_predictions, self.seed = cache_predictions, seed

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        ids = batch["sample_id"]
        prompts = [np.asarray(p, dtype=np.int64) for p in batch["prompt"]]
        prefix = torch.from_numpy(np.stack(prompts)) if len(prompts[0]) else None  # (B, P)
        # seeded by the batch's first sample id: the same rows give the same samples on any actor
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + int(ids[0]))
        t0 = time.perf_counter()
        out = sample(
            self.model,
            len(ids),
            self.num_steps,
            generator=generator,
            prefix=prefix,
            temperature=self.temperature,
            float64=self.float64,
            cache_predictions=self.cache_predictions,
        )
        seconds = (time.perf_counter() - t0) / len(ids)
        return {
            "sample_id": ids,
            "prompt_ids": np.stack(prompts),  # (B, P), P = 0 when unconditional
            "token_ids": out.tokens.cpu().numpy().astype(np.int32),
            "text": np.array(self.tokenizer.batch_decode(out.tokens.tolist(), skip_special_tokens=True), dtype=object),
            "steps": np.full(len(ids), out.steps),
            "nfe": np.full(len(ids), out.nfe),
            "seconds": np.full(len(ids), seconds),  # per sample: the batch's wall time shared out
        }
