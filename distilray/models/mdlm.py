"""MDLM's denoiser backbone: the DiT of kuleshov-group/mdlm models/dit.py (configs model/dit-orig-*),
reference/sdtt.md 1.

embedding -> n_layers x DiTBlock -> FinalLayer -> logits (B, L, V), V counting the [MASK] token.
- Bidirectional attention (MDLM hard-codes causal=False; dit-orig-large.yaml's `causal: True` is ignored).
- Rotary positions (rotate-half form) on queries and keys; no learned position table.
- adaLN-zero: each block's LayerNorm output is shifted and scaled, and each residual branch gated, by
  a projection of a timestep embedding c; the projections start at zero, so each block starts as the
  identity. With time_conditioning False the time input is zeroed (MDLM's `_process_sigma`): c is then
  a learned constant, and masked diffusion needs no more (SDTT runs this way).
- LayerNorms without bias, untied input and output embeddings, a zero-initialised output layer.

The forward returns raw logits in float32; callers apply `losses.mdlm.subs_log_probs`.
Stored as model.safetensors + config.json (architecture "mdlm_dit"), no pickle.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from distilray.errors import DistilrayError
from distilray.losses.mdlm import sigma
from distilray.models.module_io import check_model_folder, load_weights, read_config, save_module

ARCH = "mdlm_dit"


@dataclass(frozen=True)
class MDLMConfig:
    vocab_size: int  # including the [MASK] token
    seq_len: int  # context length L
    d_model: int = 256
    n_layers: int = 6
    n_heads: int = 4
    cond_dim: int = 128  # width of the timestep embedding c
    dropout: float = 0.1
    mask_id: int | None = None  # None: vocab_size - 1 (MDLM's convention); the tokenizer's mask id otherwise
    time_conditioning: bool = False

    def __post_init__(self) -> None:
        if min(self.vocab_size, self.seq_len, self.d_model, self.n_layers, self.n_heads, self.cond_dim) < 1:
            raise DistilrayError(f"invalid MDLMConfig: {self}")
        if self.vocab_size < 2:
            raise DistilrayError(f"vocab_size must count at least one real token and [MASK], got {self.vocab_size}")
        head_dim, rest = divmod(self.d_model, self.n_heads)
        if rest or head_dim % 2:
            raise DistilrayError(f"d_model {self.d_model} must split into {self.n_heads} heads of even width (rotary)")
        if not 0.0 <= self.dropout < 1.0:
            raise DistilrayError(f"dropout must be in [0, 1), got {self.dropout}")
        if self.mask_id is None:
            object.__setattr__(self, "mask_id", self.vocab_size - 1)
        if not 0 <= self.mask_id < self.vocab_size:
            raise DistilrayError(f"mask_id {self.mask_id} is outside the vocabulary [0, {self.vocab_size})")


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """adaLN: x (B, L, D), shift/scale (B, 1, D)."""
    return x * (1 + scale) + shift


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10_000.0) -> torch.Tensor:
    """Sinusoidal features of t (B,) -> (B, dim), as DiT's TimestepEmbedder."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t.float()[:, None] * freqs[None]  # (B, half)
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


class TimestepEmbedder(nn.Module):
    """t (B,) -> c (B, cond_dim): sinusoids of width 256, then a two-layer MLP."""

    def __init__(self, cond_dim: int, frequency_dim: int = 256) -> None:
        super().__init__()
        self.frequency_dim = frequency_dim
        self.mlp = nn.Sequential(nn.Linear(frequency_dim, cond_dim), nn.SiLU(), nn.Linear(cond_dim, cond_dim))

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        return self.mlp(timestep_embedding(t, self.frequency_dim))


class Rotary(nn.Module):
    """cos/sin tables (L, head_dim) for rotate-half rotary embeddings, base 10,000."""

    def __init__(self, head_dim: int, base: float = 10_000.0) -> None:
        super().__init__()
        inv_freq = 1.0 / base ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)
        self.register_buffer("inv_freq", inv_freq, persistent=False)  # derived: not in the checkpoint

    def forward(self, seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
        positions = torch.arange(seq_len, dtype=torch.float32, device=self.inv_freq.device)
        angles = torch.outer(positions, self.inv_freq)  # (L, head_dim / 2)
        angles = torch.cat([angles, angles], dim=-1)  # (L, head_dim)
        return angles.cos(), angles.sin()


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x (B, H, L, hd) rotated by position: x cos + rotate_half(x) sin."""
    first, second = x.chunk(2, dim=-1)
    return x * cos.to(x.dtype) + torch.cat([-second, first], dim=-1) * sin.to(x.dtype)


class DiTBlock(nn.Module):
    """x + gate_msa * Attn(modulate(LN(x))), then the same with an MLP; six adaLN vectors from c."""

    def __init__(self, config: MDLMConfig) -> None:
        super().__init__()
        d = config.d_model
        self.n_heads = config.n_heads
        self.norm1 = nn.LayerNorm(d, bias=False)
        self.attn_qkv = nn.Linear(d, 3 * d, bias=False)
        self.attn_out = nn.Linear(d, d, bias=False)
        self.norm2 = nn.LayerNorm(d, bias=False)
        self.mlp = nn.Sequential(nn.Linear(d, 4 * d), nn.GELU(approximate="tanh"), nn.Linear(4 * d, d))
        self.dropout = nn.Dropout(config.dropout)
        self.adaLN_modulation = nn.Linear(config.cond_dim, 6 * d)
        nn.init.zeros_(self.adaLN_modulation.weight)  # adaLN-zero: gates start at 0, the block at the identity
        nn.init.zeros_(self.adaLN_modulation.bias)

    def attention(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """x (B, L, D) -> (B, L, D), every position attending to every other."""
        batch, length, d = x.shape
        qkv = self.attn_qkv(x).view(batch, length, 3, self.n_heads, d // self.n_heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)  # each (B, H, L, hd)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=False)  # (B, H, L, hd)
        return self.attn_out(y.transpose(1, 2).reshape(batch, length, d))

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        """x (B, L, D), c (B, cond_dim) -> (B, L, D)."""
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.adaLN_modulation(c)[:, None].chunk(6, -1)
        x = x + gate_msa * self.dropout(self.attention(modulate(self.norm1(x), shift_msa, scale_msa), cos, sin))
        return x + gate_mlp * self.dropout(self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp)))


class FinalLayer(nn.Module):
    """modulate(LN(x)) -> Linear to the vocabulary, zero-initialised (uniform x_theta at the start)."""

    def __init__(self, config: MDLMConfig) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(config.d_model, bias=False)
        self.linear = nn.Linear(config.d_model, config.vocab_size)
        self.adaLN_modulation = nn.Linear(config.cond_dim, 2 * config.d_model)
        for layer in (self.linear, self.adaLN_modulation):
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        """x (B, L, D), c (B, cond_dim) -> logits (B, L, V)."""
        shift, scale = self.adaLN_modulation(c)[:, None].chunk(2, dim=-1)
        return self.linear(modulate(self.norm(x), shift, scale))


class MDLM(nn.Module):
    def __init__(self, config: MDLMConfig) -> None:
        super().__init__()
        self.config = config
        self.embed = nn.Embedding(config.vocab_size, config.d_model)
        nn.init.kaiming_uniform_(self.embed.weight, a=math.sqrt(5))  # MDLM's EmbeddingLayer init
        self.time_embed = TimestepEmbedder(config.cond_dim)
        self.rotary = Rotary(config.d_model // config.n_heads)
        self.blocks = nn.ModuleList(DiTBlock(config) for _ in range(config.n_layers))
        self.final = FinalLayer(config)

    def forward(self, input_ids: torch.Tensor, t: torch.Tensor | None = None) -> torch.Tensor:
        """input_ids (B, L) int64 (z_t), t (B,) diffusion times in [0, 1] -> logits (B, L, V) float32.

        t is only read when the config is time-conditioned; the network then sees sigma(t), as MDLM's.
        """
        batch, length = input_ids.shape
        if length > self.config.seq_len:
            raise DistilrayError(f"input of {length} tokens exceeds the model's context of {self.config.seq_len}")
        if self.config.time_conditioning:
            if t is None:
                raise DistilrayError("this MDLM is time-conditioned: forward needs t")
            noise = sigma(t.to(input_ids.device).float().expand(batch))
        else:
            noise = torch.zeros(batch, device=input_ids.device)  # the time input zeroed
        c = F.silu(self.time_embed(noise))  # (B, cond_dim)
        cos, sin = self.rotary(length)  # (L, hd) each
        x = self.embed(input_ids)  # (B, L, D)
        for block in self.blocks:
            x = block(x, cos, sin, c)
        return self.final(x, c).float()

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def save_pretrained(self, folder: str | Path) -> None:
        """Write model.safetensors and config.json (architecture "mdlm_dit") atomically."""
        save_module(self, self.config, ARCH, folder)

    @classmethod
    def from_pretrained(cls, folder: str | Path, device: str | torch.device = "cpu") -> "MDLM":
        _check_is_mdlm(folder)
        config = MDLMConfig(**read_config(folder, ARCH, MDLMConfig))
        return load_weights(cls(config), folder, device)


def _check_is_mdlm(folder: str | Path) -> None:
    check_model_folder(folder, ARCH, "an MDLM")


# name -> (d_model, n_layers, n_heads, cond_dim); the dit-orig-* are MDLM's configs/model/dit-orig-*.yaml
PRESETS: dict[str, tuple[int, int, int, int]] = {
    "dit-micro": (64, 2, 2, 32),  # tests
    "dit-tiny": (128, 4, 4, 64),
    "dit-mini": (256, 6, 4, 128),  # quickstart
    "dit-orig-small": (768, 12, 12, 128),  # ~169M at vocabulary 50258
    "dit-orig-medium": (1024, 24, 16, 128),  # ~424M
    "dit-orig-large": (1536, 24, 16, 128),  # ~862M
}


def build_mdlm(preset: str, vocab_size: int, mask_id: int, seq_len: int, dropout: float = 0.1) -> MDLM:
    """A fresh MDLM of a named size (PRESETS), not time-conditioned (as MDLM's and SDTT's runs)."""
    if preset not in PRESETS:
        raise DistilrayError(f"unknown MDLM preset {preset!r}; choose from {', '.join(PRESETS)}")
    d_model, n_layers, n_heads, cond_dim = PRESETS[preset]
    config = MDLMConfig(vocab_size, seq_len, d_model, n_layers, n_heads, cond_dim, dropout, mask_id)
    return MDLM(config)


def load_mdlm(folder: str | Path, device: str | torch.device = "cpu") -> MDLM:
    """The MDLM saved in `folder`, in eval mode on `device`; any other folder is a DistilrayError."""
    return MDLM.from_pretrained(folder, device)


EMA_FILE = "ema.safetensors"  # the moving average of the weights, saved beside them by the trainers


def load_diffusion_lm(folder: str | Path, ema: bool = True, device: str | torch.device = "cpu"):
    """A saved MDLM (teacher or student) with its EMA weights when it has them (what samples and evaluations use)."""
    model = load_mdlm(folder, device=device)
    if ema and (Path(folder) / EMA_FILE).is_file():
        from safetensors.torch import load_file

        weights = load_file(str(Path(folder) / EMA_FILE))
        model.load_state_dict({**model.state_dict(), **{k: v.to(device) for k, v in weights.items()}})
    return model.eval()
