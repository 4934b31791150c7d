"""Encoder-decoder LMs: Hugging Face T5 architecture from size presets, or any HF seq2seq path.

The seed's setting is summarization with an encoder-decoder target (FLAN-T5) and a smaller T5
drafter; these presets are that pair at a size that trains on 2 CPU cores (parameters quoted for a
2048-token vocabulary, embeddings tied as in T5 v1.0). On a cluster, point the same code at
`google/flan-t5-*`.

Decoder start token: the tokenizer's **bos** id. HF T5 checkpoints use pad (id 0) for it; ours keep
pad for padding only, so a mask built from `ids != pad` can never hide the start position.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from distilray.errors import DistilrayError
from distilray.losses.distillation import distillation_loss
from distilray.models.causal_lm import pick_device, pick_dtype


@dataclass(frozen=True)
class T5Size:
    d_model: int
    d_ff: int
    num_layers: int  # encoder layers
    num_decoder_layers: int
    num_heads: int
    d_kv: int


SEQ2SEQ_PRESETS: dict[str, T5Size] = {
    "t5-micro": T5Size(
        d_model=64, d_ff=256, num_layers=2, num_decoder_layers=1, num_heads=2, d_kv=32
    ),  # ~0.3M: tests, tiny drafter
    "t5-tiny": T5Size(
        d_model=128, d_ff=512, num_layers=2, num_decoder_layers=2, num_heads=4, d_kv=32
    ),  # ~1.2M: drafter
    "t5-mini": T5Size(
        d_model=256, d_ff=1024, num_layers=3, num_decoder_layers=3, num_heads=4, d_kv=64
    ),  # ~6M: CPU target
    "t5-small": T5Size(
        d_model=512, d_ff=2048, num_layers=6, num_decoder_layers=6, num_heads=8, d_kv=64
    ),  # T5-small's shape
}


def is_seq2seq_preset(name: str) -> bool:
    return name in SEQ2SEQ_PRESETS and not Path(name).exists()


def build_seq2seq_lm(preset: str, tokenizer, dropout: float = 0.0):
    """A freshly initialised T5ForConditionalGeneration of a named size, sized to `tokenizer`'s vocabulary."""
    from transformers import T5Config, T5ForConditionalGeneration

    if preset not in SEQ2SEQ_PRESETS:
        raise DistilrayError(f"unknown seq2seq preset {preset!r}; presets: {', '.join(SEQ2SEQ_PRESETS)}")
    size = SEQ2SEQ_PRESETS[preset]
    start = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.pad_token_id
    config = T5Config(
        vocab_size=len(tokenizer),
        d_model=size.d_model,
        d_ff=size.d_ff,
        d_kv=size.d_kv,
        num_layers=size.num_layers,
        num_decoder_layers=size.num_decoder_layers,
        num_heads=size.num_heads,
        dropout_rate=dropout,
        feed_forward_proj="relu",
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=tokenizer.bos_token_id,
        decoder_start_token_id=start,
    )
    config._attn_implementation = "sdpa"
    return T5ForConditionalGeneration(config)


def is_seq2seq(model_or_path) -> bool:
    """True for an encoder-decoder model, or a model folder / hub name whose config says so."""
    config = getattr(model_or_path, "config", None)
    if config is not None:
        return bool(getattr(config, "is_encoder_decoder", False))
    p = Path(str(model_or_path))
    if p.is_dir():
        try:
            return bool(json.loads((p / "config.json").read_text()).get("is_encoder_decoder", False))
        except (OSError, json.JSONDecodeError):
            return False
    from transformers import AutoConfig

    try:
        return bool(getattr(AutoConfig.from_pretrained(str(model_or_path)), "is_encoder_decoder", False))
    except Exception:  # unknown name, no hub access: not a seq2seq model we can load
        return False


def load_seq2seq_lm(path: str | Path, device: torch.device | str | None = None, dtype: torch.dtype | None = None):
    """Load any HF seq2seq LM (hub name or local `save_pretrained` folder) onto a device, in eval mode."""
    from transformers import AutoModelForSeq2SeqLM

    p = Path(path)
    if p.exists() and not (p / "config.json").is_file():
        raise DistilrayError(f"{path} is not a model folder (no config.json)")
    if p.is_dir():
        try:
            cfg = json.loads((p / "config.json").read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise DistilrayError(f"{path}/config.json is unreadable: {e}") from None
        if not cfg.get("is_encoder_decoder", False):
            raise DistilrayError(f"{path} is not an encoder-decoder model (model_type {cfg.get('model_type')!r})")
    device = torch.device(device) if device is not None else pick_device()
    dtype = dtype or pick_dtype(device)
    try:
        model = AutoModelForSeq2SeqLM.from_pretrained(str(path), dtype=dtype, attn_implementation="sdpa")
    except Exception as e:  # OSError for missing/corrupt files, ValueError for non-seq2seq configs
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise DistilrayError(f"cannot load seq2seq LM {str(path)!r}: {msg}") from None
    return model.to(device).eval()


def decoder_start_id(model) -> int:
    """The id every decoder sequence starts with (config.decoder_start_token_id, else pad)."""
    cfg = model.config
    start = cfg.decoder_start_token_id if cfg.decoder_start_token_id is not None else cfg.pad_token_id
    if start is None:
        raise DistilrayError("the seq2seq model's config has neither decoder_start_token_id nor pad_token_id")
    return int(start)


# ------------------------------------------------------------------------------- data and loss
IGNORE = -100  # label of padded summary positions (left out of every loss)


def encode_truncated(tokenizer, texts: list[str], max_tokens: int) -> list[list[int]]:
    """Ids per text: the first max_tokens-1 tokens, then eos (T5 ends sources and summaries with it)."""
    ids = tokenizer(texts, add_special_tokens=False)["input_ids"] if texts else []
    return [row[: max_tokens - 1] + [tokenizer.eos_token_id] for row in ids]


def pad_rows(rows: list[list[int]], value: int) -> torch.Tensor:
    """Ragged rows -> (N, L) long tensor, right-padded with `value` to the longest row."""
    width = max(len(r) for r in rows)
    return torch.tensor([r + [value] * (width - len(r)) for r in rows], dtype=torch.long)


def shift_right(labels: torch.Tensor, start_id: int, pad_id: int) -> torch.Tensor:
    """labels (B, T) -> decoder inputs (B, T): [start] + labels[:-1], IGNORE turned into pad.

    Position t then predicts labels[t] from labels[<t] only (FastLLM fed the labels themselves as
    decoder inputs, so every position saw the token it had to predict: reference 7.5).
    """
    shifted = torch.full_like(labels, pad_id)
    shifted[:, 0] = start_id
    shifted[:, 1:] = labels[:, :-1]
    return shifted.masked_fill(shifted == IGNORE, pad_id)


def seq2seq_loss(
    model,
    src: torch.Tensor,
    labels: torch.Tensor,
    pad_id: int,
    start_id: int,
    teacher=None,
    kind: str = "fkl",
    temperature: float = 1.0,
    ce_weight: float = 0.0,
) -> torch.Tensor:
    """Training loss of one batch. src (B, S) right-padded with pad_id; labels (B, T) with IGNORE at padding.

    No teacher: cross-entropy of the summary tokens. Teacher: distillation_loss(kind) between the
    teacher's and the student's logits (B, T, V) at the summary positions only (a boolean mask), plus
    ce_weight times the cross-entropy on the gold tokens.
    """
    attention = (src != pad_id).long()  # (B, S)
    decoder_in = shift_right(labels, start_id, pad_id)  # (B, T)
    logits = model(input_ids=src, attention_mask=attention, decoder_input_ids=decoder_in).logits  # (B, T, V)
    if teacher is None:
        return torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), labels.flatten(), ignore_index=IGNORE)
    with torch.no_grad():
        teacher_logits = teacher(
            input_ids=src, attention_mask=attention, decoder_input_ids=decoder_in
        ).logits  # (B, T, V)
    keep = labels != IGNORE  # (B, T) bool
    return distillation_loss(kind, teacher_logits[keep], logits[keep], temperature, ce_weight, labels[keep])


@torch.no_grad()
def mean_token_loss(
    model, sources: list[list[int]], summaries: list[list[int]], pad_id: int, start_id: int, batch_size: int = 8
) -> float:
    """Cross-entropy per summary token (nats) over (source ids, summary ids) pairs; nan when empty."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for i in range(0, len(sources), batch_size):
        src = pad_rows(sources[i : i + batch_size], pad_id)
        labels = pad_rows(summaries[i : i + batch_size], IGNORE)
        n = int((labels != IGNORE).sum())
        total += float(seq2seq_loss(model, src, labels, pad_id, start_id)) * n
        count += n
    model.train(was_training)
    return total / count if count else float("nan")
