"""`distilray train-long`: token-weighted long-context training on Ray Train (reference/token_weighting.md).

A rotary-position causal LM (Llama architecture) is trained at `seq_len` on prepare-long sequences, either
from scratch (the short-context start) or extended from `init` (context extension: `max_position_embeddings`
raised, RoPE theta or linear interpolation as configured). Each token's loss is weighted by how much the
long context helped it: d = l_long - l_short, turned into weights by the variant's steps
(losses/token_weighting.py). Short-context losses come from strided windows of `base_length`:

- `scorer=self` (unfrozen): the model being trained scores itself each step, in eval mode, without
  gradients, J = (L - b) / s extra window passes per sequence (counted in the metrics);
- `scorer=frozen`: a separate short-context model scored every sequence once, at its own native context
  and RoPE settings (pipelines/score_long.py), and the scores ride along with the batch.

The first b - 1 targets get d = 0 in both modes (the context-pure choice), so both modes give the same
weights for the same scorer. Batches are a pure function of (seed, step), so resume replays them.
"""

from __future__ import annotations

import dataclasses
import math
import re
from pathlib import Path

import numpy as np
import torch

from distilray.config import CorpusSpec, PrepareLongConfig, TrainLongConfig, config_from, config_hash
from distilray.errors import DistilrayError
from distilray.io_utils import folder_fingerprint
from distilray.losses.token_weighting import (
    check_stride,
    context_pure_scores,
    custom_or_preset,
    model_window_losses,
    per_token_losses,
    short_context_losses,
    token_weights,
    weight_stats,
    weighted_loss,
)
from distilray.models.rotary_lm import (
    build_rotary_lm,
    extended_rope,
    is_rotary_preset,
    load_rotary_lm,
    rope_settings,
)
from distilray.pipelines import prepare_long, score_long, train_tokenizer
from distilray.ray_train import TrainerHooks, TrainJob, cached_result, train
from distilray.tokenizer import load_tokenizer, vocab_fingerprint
from distilray.training import batch_rows


# ------------------------------------------------------------------------------------------ setup
def tokenizer_dir(cfg: TrainLongConfig) -> Path:
    """The tokenizer of the run: the start model's, a given folder, or the project's BPE on the dataset."""
    if cfg.init:
        return Path(cfg.init)
    if cfg.tokenizer:
        return Path(cfg.tokenizer)
    return train_tokenizer.get_or_train(CorpusSpec(dataset=cfg.dataset), cfg.vocab_size, cfg.artifacts_dir)


def data_dir(cfg: TrainLongConfig, tok_dir: Path) -> Path:
    """The prepare-long folder: given, or prepared (and cached) from `dataset` with the run's tokenizer."""
    if cfg.data:
        return Path(cfg.data)
    res = prepare_long.run(
        config_from(
            PrepareLongConfig,
            dataset=cfg.dataset,
            tokenizer=str(tok_dir),
            seq_len=cfg.data_seq_len,
            artifacts_dir=cfg.artifacts_dir,
            seed=cfg.seed,
        )
    )
    return Path(res["output_dir"])


def check_config(cfg: TrainLongConfig) -> None:
    w = cfg.weighting
    if cfg.steps < 1 or cfg.batch_size < 1:
        raise DistilrayError("steps and batch_size must be positive")
    if cfg.seq_len < 8:
        raise DistilrayError(f"seq_len must be at least 8, got {cfg.seq_len}")
    if not cfg.init and not is_rotary_preset(cfg.model):
        raise DistilrayError(f"model={cfg.model!r} is not a rotary preset; give init=FOLDER to extend a saved model")
    if w.variant != "uniform":
        check_stride(cfg.seq_len, w.base_length, w.base_stride)
    if w.scorer == "frozen" and w.variant != "uniform" and not (w.scorer_model or cfg.init):
        raise DistilrayError("weighting.scorer=frozen needs weighting.scorer_model=FOLDER (or init=FOLDER)")


def run_dir_for(cfg: TrainLongConfig, data: Path) -> Path:
    if cfg.name:
        return Path(cfg.artifacts_dir).resolve() / "long" / cfg.name
    # models and data enter the key by what they hold, not by how their paths were spelled
    tok = cfg.tokenizer
    if tok and Path(tok).is_dir():
        tok = vocab_fingerprint(load_tokenizer(tok))
    keyed = dataclasses.replace(
        cfg,
        tokenizer=tok,
        init=folder_fingerprint(cfg.init) if cfg.init else "",
        data=prepare_long.read_meta(data)["fingerprint"][:12],
        weighting=dataclasses.replace(
            cfg.weighting,
            scorer_model=folder_fingerprint(cfg.weighting.scorer_model) if cfg.weighting.scorer_model else "",
        ),
    )
    variant = cfg.weighting.variant + ("" if cfg.weighting.variant == "uniform" else f"-{cfg.weighting.scorer}")
    slug = re.sub(r"[^A-Za-z0-9_.-]+", "_", f"{variant}-{cfg.seq_len}")
    return Path(cfg.artifacts_dir).resolve() / "long" / f"{slug}-{config_hash(keyed)}"


def training_rows(ids: np.ndarray, seq_len: int) -> np.ndarray:
    """Prepared sequences cut into rows of seq_len (a long sequence gives L // seq_len rows; the rest unused)."""
    n, length = ids.shape
    if seq_len > length:
        raise DistilrayError(f"seq_len={seq_len} exceeds the prepared sequences' length {length}")
    per = length // seq_len
    return np.ascontiguousarray(ids[:, : per * seq_len].reshape(n * per, seq_len))


def run(cfg: TrainLongConfig, untimed_steps: int = 0) -> dict:
    """Train (or resume, or reuse from the cache) and return where everything went, with figures."""
    check_config(cfg)
    tok_dir = tokenizer_dir(cfg)
    tokenizer = load_tokenizer(tok_dir)
    data = data_dir(cfg, tok_dir)
    meta = prepare_long.read_meta(data)
    if meta["vocab_fingerprint"] != vocab_fingerprint(tokenizer):
        raise DistilrayError(f"the data in {data} was tokenized with another tokenizer than the model's ({tok_dir})")
    run_dir = run_dir_for(cfg, data)
    if cached := cached_result(run_dir):
        return cached
    if cfg.init:
        start = load_rotary_lm(cfg.init)  # a clear error for a folder that is not a rotary LM
        if start.config.vocab_size < len(tokenizer):
            raise DistilrayError(f"init={cfg.init} reads {start.config.vocab_size} ids; the tokenizer has more")
        del start
    seq_ids, ids = prepare_long.read_long_split(data, "train")
    _, val_ids = prepare_long.read_long_split(data, "validation")
    w = cfg.weighting
    arrays = {"train": training_rows(ids, cfg.seq_len), "validation": training_rows(val_ids, cfg.seq_len)}
    folders = {"tokenizer": tok_dir}
    if cfg.init:
        folders["init"] = Path(cfg.init)
    frozen = w.variant != "uniform" and w.scorer == "frozen"
    if frozen:
        if cfg.seq_len != meta["seq_len"]:
            raise DistilrayError("frozen scores are per prepared sequence: train at the data's seq_len")
        scorer = w.scorer_model or cfg.init
        scores = score_long.frozen_scores(data, scorer, w.base_length, w.base_stride, w.windows_per_pass)
        arrays["short_losses"] = score_long.read_scores(scores, data, seq_ids, scorer=scorer)
    job = TrainJob(LongHooks, cfg, run_dir, data=arrays, folders=folders, untimed_steps=untimed_steps)
    return train(
        job,
        lambda m: {
            "tokenizer_dir": str(Path(tok_dir).resolve()),
            "data_dir": str(data),
            "variant": w.variant,
            "scorer": "none" if w.variant == "uniform" else w.scorer,
            "train_rows": int(len(arrays["train"])),
            "extra_forward_passes_per_step": extra_passes(cfg),
            "val_ppl": _number(m.get("val_ppl")),
            "val_ppl_before_b": _number(m.get("val_ppl_before_b")),
            "val_ppl_after_b": _number(m.get("val_ppl_after_b")),
            "tokens_per_s": float(m["mean_tokens_per_s"]),
        },
    )


def _number(x) -> float:
    """A reported figure as a float; NaN for one that is missing (JSON keeps NaN as null)."""
    return math.nan if x is None else float(x)


def extra_passes(cfg: TrainLongConfig) -> int:
    """Window forward passes (of base_length tokens, no gradient) per optimizer step, beyond the training pass."""
    w = cfg.weighting
    if w.variant == "uniform" or w.scorer == "frozen":
        return 0
    return cfg.batch_size * ((cfg.seq_len - w.base_length) // w.base_stride)


# ------------------------------------------------------------------------------------------ hooks
class LongHooks(TrainerHooks):
    """Token-weighted next-token loss on long rows; validation perplexity before and after b at the end."""

    label = "train-long"

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        w = self.cfg.weighting
        self.spec = None if w.variant == "uniform" else custom_or_preset(w)

    def build(self) -> torch.nn.Module:
        cfg = self.cfg
        rope = {"rope_theta": cfg.rope_theta, "rope_type": cfg.rope_type, "factor": cfg.rope_factor}
        if "init" in self.folders:
            return load_rotary_lm(self.folders["init"], cfg.seq_len, **rope).train()
        model = build_rotary_lm(cfg.model, self.tokenizer, cfg.seq_len, rope_theta=cfg.rope_theta or 10_000.0)
        if cfg.rope_type != "default" or cfg.rope_factor != 1.0:
            extended_rope(model.config, cfg.seq_len, **rope)
        rope_settings(model.config)
        return model.train()

    def batch(self, step: int) -> dict[str, torch.Tensor]:
        rows = batch_rows(
            len(self.data["train"]), self.cfg.batch_size, step, self.cfg.seed, self.worker.rank, self.worker.world
        )
        out = {"tokens": torch.from_numpy(np.asarray(self.data["train"][rows]).astype(np.int64))}
        if "short_losses" in self.data:
            out["short"] = torch.from_numpy(np.asarray(self.data["short_losses"][rows], dtype=np.float32))
        return out

    def loss(self, model, batch: dict[str, torch.Tensor], step: int):
        tokens = batch["tokens"].to(self.worker.device)
        logits = model(input_ids=tokens).logits
        long = per_token_losses(logits[:, :-1], tokens[:, 1:])  # (B, L-1), with gradient
        unweighted = long.mean()
        if self.spec is None:
            return unweighted, {"unweighted_loss": float(unweighted.detach())}
        w = self.cfg.weighting
        if "short" in batch:
            short = batch["short"].to(long.device)
        else:
            inner = getattr(model, "module", model)  # the DDP-wrapped module: no gradient sync for scoring
            short = short_context_losses(
                tokens,
                model_window_losses(inner),
                w.base_length,
                w.base_stride,
                bos_id=self.tokenizer.bos_token_id,
                first_window=False,
                windows_per_pass=w.windows_per_pass,
            )
        scores = context_pure_scores(long.detach(), short, w.base_length)
        generator = torch.Generator().manual_seed(self.cfg.seed * 1_000_003 + step * 101 + self.worker.rank)
        weights = token_weights(scores.cpu(), self.spec, generator=generator).to(long.device)
        stats = weight_stats(weights, scores)
        return weighted_loss(long, weights), {"unweighted_loss": float(unweighted.detach()), **stats}

    def tokens_per_step(self) -> int:
        return self.cfg.batch_size * self.cfg.seq_len

    def validate(self, model) -> dict[str, float]:
        from distilray.eval.long_context import position_bucket_ppl, token_losses

        rows = np.asarray(self.data["validation"])[: self.cfg.eval_sequences]
        if len(rows) == 0:
            return {"ppl": float("nan")}
        losses = [token_losses(model, torch.from_numpy(r.astype(np.int64))) for r in rows]
        b = self.cfg.weighting.base_length
        buckets = position_bucket_ppl(losses, b)
        nan = float("nan")  # an empty bucket (no target past b when seq_len <= b)
        return {
            "ppl": buckets["ppl"],
            "ppl_before_b": buckets["ppl_before"] or nan,
            "ppl_after_b": buckets["ppl_after"] or nan,
        }
