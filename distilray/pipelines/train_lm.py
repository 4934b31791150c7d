"""`distilray train-lm`: a causal LM trained with Ray Train (DDP: gloo on CPU, NCCL on GPU).

The driver tokenizes the corpus once and puts the packed blocks in the object store, so workers on
any node read them without a shared file system. Batches are a pure function of (seed, step), so a
run resumed from a checkpoint (after a worker crash, or when the same command is run again) trains on
exactly the batches an uninterrupted run would have. The loop itself is distilray.ray_train's.
"""

from __future__ import annotations

import dataclasses
import math
import re
from pathlib import Path

import numpy as np
import torch

from distilray import corpus
from distilray.config import TrainLMConfig, config_hash
from distilray.errors import DistilrayError
from distilray.eval.perplexity import perplexity
from distilray.models.causal_lm import build_causal_lm, is_preset, load_causal_lm
from distilray.pipelines import train_tokenizer
from distilray.ray_train import TrainerHooks, TrainJob, cached_result, train
from distilray.tokenizer import encode_documents, load_tokenizer, vocab_fingerprint
from distilray.training import batch_rows, flat_tokens, lm_loss, pack_tokens


def run_dir_for(cfg: TrainLMConfig) -> Path:
    if cfg.name:
        return Path(cfg.artifacts_dir).resolve() / "lm" / cfg.name
    # the tokenizer enters the key by its vocabulary, not by how its path was spelled
    tok = cfg.tokenizer
    if tok and Path(tok).is_dir():
        tok = vocab_fingerprint(load_tokenizer(tok))
    key = config_hash(dataclasses.replace(cfg, tokenizer=tok))
    fingerprint = corpus.corpus_fingerprint(cfg.corpus)[:6]
    slug = re.sub(r"[^A-Za-z0-9_.-]+", "_", cfg.model.strip("/").split("/")[-1])
    return Path(cfg.artifacts_dir).resolve() / "lm" / f"{slug}-{key}-{fingerprint}"


def prepare_data(cfg: TrainLMConfig):
    """Tokenizer folder, packed training blocks # (N, seq_len+1), validation stream # (T,)."""
    if cfg.seq_len < 8:
        raise DistilrayError(f"seq_len must be at least 8, got {cfg.seq_len}")
    if cfg.steps < 1 or cfg.batch_size < 1:
        raise DistilrayError("steps and batch_size must be positive")
    if cfg.tokenizer:
        tok_dir = Path(cfg.tokenizer)
    elif is_preset(cfg.model):
        tok_dir = train_tokenizer.get_or_train(cfg.corpus, cfg.vocab_size, cfg.artifacts_dir)
    else:
        tok_dir = Path(cfg.model)  # fine-tuning an existing model: use its own tokenizer
    tokenizer = load_tokenizer(tok_dir)
    splits = corpus.load_splits(cfg.corpus)
    train_blocks = pack_tokens(encode_documents(tokenizer, splits["train"]), cfg.seq_len + 1, tokenizer.eos_token_id)
    val_stream = flat_tokens(encode_documents(tokenizer, splits["validation"]), tokenizer.eos_token_id)
    return tok_dir, tokenizer, train_blocks, val_stream[: cfg.eval_max_tokens]


def run(cfg: TrainLMConfig, untimed_steps: int = 0) -> dict:
    """Train (or resume, or reuse from the cache) and return where everything went, with figures."""
    run_dir = run_dir_for(cfg)
    if cached := cached_result(run_dir):
        return cached
    if not is_preset(cfg.model):
        load_causal_lm(cfg.model, device="cpu")  # fail early, with a clear message, on a bad path
    tok_dir, tokenizer, train_blocks, val_stream = prepare_data(cfg)
    job = TrainJob(
        LMHooks,
        cfg,
        run_dir,
        data={"train": train_blocks, "validation": val_stream},
        folders={"tokenizer": tok_dir},
        untimed_steps=untimed_steps,
    )
    return train(
        job,
        lambda m: {
            "tokenizer_dir": str(Path(tok_dir).resolve()),
            "train_tokens": int(train_blocks.size),
            "val_ppl": float(m["val_ppl"]),
            "tokens_per_s": float(m["mean_tokens_per_s"]),
        },
    )


class LMHooks(TrainerHooks):
    """Next-token cross-entropy on packed corpus blocks; validation perplexity at the end."""

    label = "train-lm"

    def build(self) -> torch.nn.Module:
        cfg = self.cfg
        if is_preset(cfg.model):
            return build_causal_lm(cfg.model, self.tokenizer, dropout=cfg.dropout, n_positions=max(512, cfg.seq_len))
        return load_causal_lm(cfg.model, device="cpu", dtype=torch.float32).train()

    def batch(self, step: int) -> torch.Tensor:
        blocks = self.data["train"]
        rows = batch_rows(len(blocks), self.cfg.batch_size, step, self.cfg.seed, self.worker.rank, self.worker.world)
        return torch.from_numpy(np.asarray(blocks[rows]).astype(np.int64))  # (b, T+1)

    def loss(self, model, batch: torch.Tensor, step: int) -> torch.Tensor:
        return lm_loss(model, batch.to(self.worker.device))

    def tokens_per_step(self) -> int:
        return self.cfg.batch_size * self.cfg.seq_len

    def validate(self, model) -> dict[str, float]:
        val = np.asarray(self.data["validation"])
        if len(val) < 2:
            return {"ppl": float("nan")}
        ppl = perplexity(model, val, context_len=self.cfg.seq_len, stride=max(1, self.cfg.seq_len // 2))["ppl"]
        return {"ppl": ppl if math.isfinite(ppl) else float("nan")}
