"""`distilray train-mdlm`: a masked diffusion LM (MDLM: DiT backbone, log-linear schedule, SUBS,
continuous-time NELBO with antithetic times) on Ray Train: the teacher SDTT distils.

Data follow MDLM's block convention (reference/sdtt.md 1): documents each end with eos, are
concatenated and cut, and every block is [bos] + L-2 tokens + [eos]. The weights used for sampling
and evaluation are an exponential moving average, saved beside the raw weights (ema.safetensors).
"""

from __future__ import annotations

import dataclasses
import math
import re
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from distilray import corpus
from distilray.config import TrainMDLMConfig, config_hash
from distilray.errors import DistilrayError
from distilray.losses.mdlm import mask_tokens, nelbo, sample_times, subs_log_probs
from distilray.models.mdlm import EMA_FILE, PRESETS, build_mdlm, load_mdlm
from distilray.pipelines import train_tokenizer
from distilray.ray_train import TrainerHooks, TrainJob, cached_result, train
from distilray.tokenizer import encode_documents, load_tokenizer, vocab_fingerprint
from distilray.training import batch_rows, bos_eos_blocks, ema_copy, ema_decay, ema_update


def run_dir_for(cfg: TrainMDLMConfig) -> Path:
    if cfg.name:
        return Path(cfg.artifacts_dir).resolve() / "mdlm" / cfg.name
    tok = cfg.tokenizer
    if tok and Path(tok).is_dir():
        tok = vocab_fingerprint(load_tokenizer(tok))
    key = config_hash(dataclasses.replace(cfg, tokenizer=tok))
    slug = re.sub(r"[^A-Za-z0-9_.-]+", "_", cfg.model.strip("/").split("/")[-1])
    return Path(cfg.artifacts_dir).resolve() / "mdlm" / f"{slug}-{key}-{corpus.corpus_fingerprint(cfg.corpus)[:6]}"


def tokenizer_for(cfg: TrainMDLMConfig):
    """The tokenizer's folder and the tokenizer; it must have bos, eos and a mask token."""
    if cfg.tokenizer:
        tok_dir = Path(cfg.tokenizer)
    elif cfg.model in PRESETS:
        tok_dir = train_tokenizer.get_or_train(cfg.corpus, cfg.vocab_size, cfg.artifacts_dir)
    else:
        tok_dir = Path(cfg.model)  # continuing a saved MDLM: its own tokenizer
    tokenizer = load_tokenizer(tok_dir)
    missing = [n for n in ("bos", "eos", "mask") if getattr(tokenizer, f"{n}_token_id") is None]
    if missing:
        raise DistilrayError(
            f"the tokenizer of {tok_dir} has no {', '.join(missing)} token; MDLM needs bos, eos and mask"
        )
    return tok_dir, tokenizer


def diffusion_blocks(spec, tokenizer, seq_len: int, split: str) -> np.ndarray:
    """A corpus split in MDLM's block convention. # (N, seq_len)"""
    docs = encode_documents(tokenizer, corpus.load_splits(spec)[split])
    return bos_eos_blocks(docs, seq_len, tokenizer.bos_token_id, tokenizer.eos_token_id)


def run(cfg: TrainMDLMConfig) -> dict:
    """Train (or resume, or reuse from the cache) and return where the model went, with figures."""
    if cfg.steps < 1 or cfg.batch_size < 1 or cfg.seq_len < 8:
        raise DistilrayError("steps and batch_size must be positive and seq_len at least 8")
    if not 0.0 <= cfg.ema < 1.0 or not 0.0 < cfg.sampling_eps < 1.0:
        raise DistilrayError("ema must lie in [0, 1) and sampling_eps in (0, 1)")
    run_dir = run_dir_for(cfg)
    if cached := cached_result(run_dir):
        return cached
    if cfg.model not in PRESETS:
        load_mdlm(cfg.model)  # fail early, with a clear message, on a folder that is not an MDLM
    tok_dir, tokenizer = tokenizer_for(cfg)
    train_blocks = diffusion_blocks(cfg.corpus, tokenizer, cfg.seq_len, "train")
    val_blocks = diffusion_blocks(cfg.corpus, tokenizer, cfg.seq_len, "validation")[: cfg.eval_blocks]
    job = TrainJob(
        MDLMHooks, cfg, run_dir, data={"train": train_blocks, "validation": val_blocks}, folders={"tokenizer": tok_dir}
    )
    return train(
        job,
        lambda m: {
            "tokenizer_dir": str(Path(tok_dir).resolve()),
            "train_blocks": int(len(train_blocks)),
            "val_nelbo": float(m["val_nelbo"]),
            "val_ppl_bound": float(m["val_ppl_bound"]),
        },
    )


@torch.no_grad()
def validation_nelbo(model, blocks: np.ndarray, mask_id: int, seed: int, batch_size: int = 16) -> float:
    """NELBO per token on held-out blocks, times drawn with a fixed seed (an upper bound on the NLL)."""
    generator = torch.Generator().manual_seed(seed)
    device = next(model.parameters()).device
    total, n = 0.0, 0
    for i in range(0, len(blocks), batch_size):
        x = torch.from_numpy(np.asarray(blocks[i : i + batch_size]).astype(np.int64))
        t = sample_times(len(x), generator, 1e-3, "mdlm")
        z = mask_tokens(x, t, mask_id, generator)
        log_probs = subs_log_probs(model(z.to(device)), z.to(device), mask_id)
        total += float(nelbo(log_probs, x.to(device), z.to(device), t.to(device), mask_id)) * len(x)
        n += len(x)
    return total / n if n else float("nan")


class DiffusionHooks(TrainerHooks):
    """What train-mdlm and distill-sdtt share: blocks as batches, EMA weights saved and restored, the
    validation NELBO with the EMA weights."""

    ema: dict[str, torch.Tensor]

    def batch(self, step: int) -> torch.Tensor:
        blocks = self.data["train"]
        rows = batch_rows(len(blocks), self.cfg.batch_size, step, self.cfg.seed, self.worker.rank, self.worker.world)
        return torch.from_numpy(np.asarray(blocks[rows]).astype(np.int64))  # (b, L)

    def generator(self, step: int, stream: int = 0) -> torch.Generator:
        """Random draws of a step: a pure function of (seed, step, rank), so a resumed run draws the same."""
        entropy = [self.cfg.seed, step, self.worker.rank, stream]
        return torch.Generator().manual_seed(int(np.random.SeedSequence(entropy).generate_state(1)[0]))

    def tokens_per_step(self) -> int:
        return self.cfg.batch_size * int(self.data["train"].shape[1])

    def after_update(self, done: int, model) -> None:
        ema_update(self.ema, model, ema_decay(self.cfg.ema, done))  # done: a pure function of the step

    def save_model(self, model, folder: Path) -> None:
        super().save_model(model, folder)
        save_file({k: v.detach().contiguous().cpu() for k, v in self.ema.items()}, str(folder / EMA_FILE))

    def load_extra(self, state: dict, tensors: dict[str, torch.Tensor], folder: Path) -> None:
        self.ema = {k: v.to(self.worker.device) for k, v in load_file(str(folder / EMA_FILE)).items()}

    def validate(self, model) -> dict[str, float]:
        raw = {k: v.clone() for k, v in model.state_dict().items()}
        model.load_state_dict({**raw, **self.ema})
        value = validation_nelbo(model, self.data["validation"], self.tokenizer.mask_token_id, self.cfg.seed)
        model.load_state_dict(raw)
        return {"nelbo": value, "ppl_bound": math.exp(value) if math.isfinite(value) else float("nan")}


class MDLMHooks(DiffusionHooks):
    """The MDLM objective: mask at antithetic times, SUBS log-probs, NELBO weighted by 1/t over all tokens."""

    label = "train-mdlm"

    def build(self) -> torch.nn.Module:
        cfg, tok = self.cfg, self.tokenizer
        if cfg.model in PRESETS:
            model = build_mdlm(cfg.model, len(tok), tok.mask_token_id, cfg.seq_len, dropout=cfg.dropout)
        else:
            model = load_mdlm(cfg.model).train()
        self.ema = ema_copy(model)
        return model

    def loss(self, model, x: torch.Tensor, step: int) -> torch.Tensor:
        generator, mask_id, device = self.generator(step), self.tokenizer.mask_token_id, self.worker.device
        t = sample_times(len(x), generator, self.cfg.sampling_eps, self.cfg.time_sampling)
        z = mask_tokens(x, t, mask_id, generator)
        x, z, t = x.to(device), z.to(device), t.to(device)
        with torch.autocast(device.type, enabled=False):  # the log-probs in fp32, as MDLM's SUBS
            log_probs = subs_log_probs(model(z).float(), z, mask_id)
        return nelbo(log_probs, x, z, t, mask_id)
