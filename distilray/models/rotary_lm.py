"""Rotary-position causal LMs (Hugging Face Llama architecture) for long-context training.

Token-weighted training (reference/token_weighting.md) starts from a model trained at a short context
and extends it to a long one by raising `max_position_embeddings` and, optionally, the RoPE base (theta)
or a linear position interpolation factor. Sizes are quoted for a 4096-token vocabulary; the first three
train on 2 CPU cores, the 1B-8B shapes are for GPU workers (same code path).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from distilray.errors import DistilrayError


@dataclass(frozen=True)
class LlamaSize:
    n_layer: int
    n_head: int
    d_model: int
    d_ff: int
    n_kv_head: int = 0  # 0: as many as query heads (no grouped-query attention)


LLAMA_PRESETS: dict[str, LlamaSize] = {
    "llama-tiny": LlamaSize(n_layer=2, n_head=4, d_model=128, d_ff=352),  # ~0.9M
    "llama-mini": LlamaSize(n_layer=4, n_head=4, d_model=256, d_ff=704),  # ~4.3M
    "llama-small": LlamaSize(n_layer=6, n_head=8, d_model=512, d_ff=1376),  # ~21M
    "llama-1b": LlamaSize(n_layer=16, n_head=32, d_model=2048, d_ff=8192, n_kv_head=8),  # Llama-3.2-1B shape
    "llama-8b": LlamaSize(n_layer=32, n_head=32, d_model=4096, d_ff=14336, n_kv_head=8),  # Llama-3-8B shape
}


def is_rotary_preset(name: str) -> bool:
    return name in LLAMA_PRESETS and not Path(name).exists()


def build_rotary_lm(preset: str, tokenizer, max_positions: int, rope_theta: float = 10_000.0, dropout: float = 0.0):
    """A freshly initialised Llama-architecture LM of a named size, sized to `tokenizer`'s vocabulary."""
    from transformers import LlamaConfig, LlamaForCausalLM

    if preset not in LLAMA_PRESETS:
        raise DistilrayError(f"unknown rotary model preset {preset!r}; presets: {', '.join(LLAMA_PRESETS)}")
    size = LLAMA_PRESETS[preset]
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=size.d_model,
        intermediate_size=size.d_ff,
        num_hidden_layers=size.n_layer,
        num_attention_heads=size.n_head,
        num_key_value_heads=size.n_kv_head or size.n_head,
        max_position_embeddings=max_positions,
        rope_parameters={"rope_type": "default", "rope_theta": float(rope_theta)},
        attention_dropout=dropout,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=True,
    )
    config._attn_implementation = "sdpa"
    return LlamaForCausalLM(config)


def rope_settings(config) -> dict:
    """The RoPE settings of a model config: type, theta and factor, plus the native context."""
    params = dict(getattr(config, "rope_parameters", None) or {})
    if not params:
        raise DistilrayError(
            f"{getattr(config, 'model_type', type(config).__name__)} has no rotary position settings "
            "(rope_parameters): token-weighted context extension needs a rotary-position model (e.g. Llama)"
        )
    return {
        "rope_type": params.get("rope_type", "default"),
        "rope_theta": float(params.get("rope_theta", 10_000.0)),
        "factor": float(params.get("factor", 1.0)),
        "max_positions": int(config.max_position_embeddings),
    }


def extended_rope(config, seq_len: int, rope_theta: float = 0.0, rope_type: str = "default", factor: float = 1.0):
    """`config` changed for a context of `seq_len`: theta replaced when given (0 keeps it), `linear` position
    interpolation by `factor` when asked. Settings that would be ignored are refused."""
    old = rope_settings(config)
    if rope_type not in ("default", "linear"):
        raise DistilrayError(f"rope_type must be default or linear, got {rope_type!r}")
    if rope_type == "default" and factor != 1.0:
        raise DistilrayError(f"rope_factor={factor} needs rope_type=linear (default RoPE has no factor)")
    if rope_type == "linear" and factor <= 1.0:
        raise DistilrayError(f"linear position interpolation needs rope_factor > 1, got {factor}")
    if rope_theta < 0:
        raise DistilrayError(f"rope_theta must be positive (or 0 to keep {old['rope_theta']:g}), got {rope_theta}")
    params = {"rope_type": rope_type, "rope_theta": float(rope_theta or old["rope_theta"])}
    if rope_type == "linear":
        params["factor"] = float(factor)
    config.rope_parameters = params
    config.max_position_embeddings = int(seq_len)
    return config


def load_rotary_lm(folder: str | Path, seq_len: int | None = None, device: str = "cpu", **rope) -> torch.nn.Module:
    """A saved rotary causal LM (any HF folder), optionally extended to `seq_len` (see extended_rope)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    folder = Path(folder)
    if not (folder / "config.json").is_file():
        raise DistilrayError(f"{folder} is not a model folder (no config.json)")
    config = AutoConfig.from_pretrained(str(folder))
    rope_settings(config)  # a clear error for a model without rotary positions
    if seq_len is not None:
        extended_rope(config, seq_len, **rope)
    try:
        model = AutoModelForCausalLM.from_pretrained(
            str(folder), config=config, dtype=torch.float32, attn_implementation="sdpa"
        )
    except Exception as e:  # OSError for missing/corrupt weights, ValueError for a non-causal config
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise DistilrayError(f"cannot load rotary LM {str(folder)!r}: {msg}") from None
    return model.to(device)
