"""Base causal LMs: Hugging Face GPT-2 architecture from size presets, or any HF causal LM path.

Sizes quoted for a 4096-token vocabulary. The first three train on 2 CPU cores; the gpt2 family is
for GPU workers on a cluster (same code path).
"""

from __future__ import annotations

import importlib.util
import json
from dataclasses import dataclass
from pathlib import Path

import torch

from distilray.errors import DistilrayError


@dataclass(frozen=True)
class GPT2Size:
    n_layer: int
    n_head: int
    n_embd: int
    n_positions: int


PRESETS: dict[str, GPT2Size] = {
    "tiny": GPT2Size(n_layer=2, n_head=2, n_embd=80, n_positions=512),  # ~0.5M: drafter
    "mini": GPT2Size(n_layer=4, n_head=4, n_embd=256, n_positions=512),  # ~4M: quickstart target
    "small": GPT2Size(n_layer=6, n_head=8, n_embd=512, n_positions=512),  # ~21M: target on CPU
    "gpt2": GPT2Size(n_layer=12, n_head=12, n_embd=768, n_positions=1024),  # 124M with GPT-2's vocab
    "gpt2-medium": GPT2Size(n_layer=24, n_head=16, n_embd=1024, n_positions=1024),
    "gpt2-large": GPT2Size(n_layer=36, n_head=20, n_embd=1280, n_positions=1024),
    "gpt2-xl": GPT2Size(n_layer=48, n_head=25, n_embd=1600, n_positions=1024),
}


def pick_device() -> torch.device:
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def pick_dtype(device: torch.device) -> torch.dtype:
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return torch.float32


def pick_attention(device: torch.device) -> str:
    """flash-attention 2 where it is installed and a GPU is present, PyTorch sdpa otherwise."""
    if device.type == "cuda" and importlib.util.find_spec("flash_attn") is not None:
        return "flash_attention_2"
    return "sdpa"


def build_causal_lm(preset: str, tokenizer, dropout: float = 0.0, n_positions: int | None = None):
    """A freshly initialised GPT-2-architecture LM of a named size, sized to `tokenizer`'s vocabulary."""
    from transformers import GPT2Config, GPT2LMHeadModel

    if preset not in PRESETS:
        raise DistilrayError(f"unknown model preset {preset!r}; presets: {', '.join(PRESETS)}")
    size = PRESETS[preset]
    config = GPT2Config(
        vocab_size=len(tokenizer),
        n_positions=n_positions or size.n_positions,
        n_embd=size.n_embd,
        n_layer=size.n_layer,
        n_head=size.n_head,
        resid_pdrop=dropout,
        embd_pdrop=dropout,
        attn_pdrop=dropout,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=True,
    )
    config._attn_implementation = "sdpa"
    return GPT2LMHeadModel(config)


def is_preset(name: str) -> bool:
    return name in PRESETS and not Path(name).exists()


def load_causal_lm(path: str | Path, device: torch.device | str | None = None, dtype: torch.dtype | None = None):
    """Load any HF causal LM (hub name or local `save_pretrained` folder) onto a device, in eval mode."""
    from transformers import AutoModelForCausalLM

    p = Path(path)
    if p.exists() and not (p / "config.json").is_file():
        raise DistilrayError(f"{path} is not a model folder (no config.json)")
    if p.is_dir():
        try:
            json.loads((p / "config.json").read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise DistilrayError(f"{path}/config.json is unreadable: {e}") from None
    device = torch.device(device) if device is not None else pick_device()
    dtype = dtype or pick_dtype(device)
    try:
        model = AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype, attn_implementation=pick_attention(device))
    except Exception as e:  # OSError for missing/corrupt files, ValueError for non-causal configs
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise DistilrayError(f"cannot load causal LM {str(path)!r}: {msg}") from None
    return model.to(device).eval()


def count_parameters(model: torch.nn.Module) -> int:
    """Unique parameters (tied embeddings counted once)."""
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())


def position_limit(model) -> int | None:
    """The model's position table size from its config (GPT-2 n_positions, Llama max_position_embeddings),
    or None when the config names none (T5's relative positions)."""
    cfg = model.config
    for attr in ("n_positions", "max_position_embeddings", "n_ctx"):
        if getattr(cfg, attr, None):
            return int(getattr(cfg, attr))
    return None


def max_context(model) -> int:
    """The most tokens a request may span: the position table, or 1024 when the config names none."""
    return position_limit(model) or 1024


def input_vocab_size(model) -> int:
    """Rows of the input embedding: the ids the model can actually read (config.vocab_size may lag)."""
    return int(model.get_input_embeddings().num_embeddings)


def check_prompt(model, prompt_ids, max_new_tokens: int) -> None:
    """A prompt any decoder can run: non-empty, ids in the vocabulary, within the context with the budget."""
    if max_new_tokens < 0:
        raise DistilrayError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    if len(prompt_ids) == 0:
        raise DistilrayError("the prompt is empty: decoding needs at least one prompt token")
    vocab = input_vocab_size(model)
    bad = [t for t in prompt_ids if not 0 <= int(t) < vocab]
    if bad:
        raise DistilrayError(f"prompt token id {bad[0]} is outside the model's vocabulary of {vocab}")
    limit = max_context(model)
    if len(prompt_ids) + max_new_tokens > limit:
        raise DistilrayError(
            f"prompt ({len(prompt_ids)} tokens) + max_new_tokens ({max_new_tokens}) exceeds the model's "
            f"context of {limit}"
        )
