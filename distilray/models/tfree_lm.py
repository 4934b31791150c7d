"""The T-Free language model (reference/tfree.md 4, 6): a causal transformer over WORD positions whose input
is a sum of hashed trigram rows and whose head scores each of the v rows for the next word (multi-label).

word bags -> EmbeddingBag(v, d, "sum") -> n_layers x Block -> RMSNorm -> Linear(d, v) -> logits (B, S, v).
- Input (trigram mode): e_t = sum over the word's trigrams g and their m rows T[g, k] of E[T[g, k]]; a row that
  occurs twice counts twice; no normalisation. Token mode is the BPE baseline of the same backbone:
  nn.Embedding(V, d) and a V-way softmax head, so the two differ only in embedding and head.
- Blocks as the 7B config: pre-norm RMSNorm, causal self-attention with rotary positions (rotate-half form,
  base rope_theta), SwiGLU MLP, no biases anywhere. Untied head without bias.
- Init: embedding and head normal(0, sqrt(2 / (5 d))) (the "pythia" init of the spec); the other projections
  take GPT-NeoX's pair, the same small init for inputs and "wang" init 2 / (n_layers sqrt(d)) for the two
  projections that write into the residual stream.
- Packed documents: `positions` restart at 0 in each document and `doc_ids` confine attention to the
  document (reset_position_ids / reset_attention_mask of the original). Doc id -1 marks padding, which
  attends to itself only, so no row of the attention is empty (no NaN).
- A KVCache lets generation prefill a prompt, then feed one new word's bag per step.

The forward returns raw logits in float32; the loss is `losses.tfree.tfree_bce` (trigram mode) or the plain
cross-entropy (token mode). Stored as model.safetensors + config.json (architecture "tfree_lm"), no pickle.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from distilray.errors import DistilrayError
from distilray.models.mdlm import apply_rotary
from distilray.models.module_io import check_model_folder, load_weights, read_config, save_module

ARCH = "tfree_lm"


@dataclass(frozen=True, kw_only=True)
class TFreeLMConfig:
    input: Literal["trigram", "token"] = "trigram"
    v: int  # trigram mode: rows of the sparse embedding and of the head; token mode: the BPE vocabulary size
    m: int = 10  # rows per trigram (the tokenizer's; kept so a saved model names its tokenizer)
    k: int = 0  # of the m rows shared by a trigram's lowercase form (the tokenizer's)
    d_model: int = 256
    n_layers: int = 6
    n_heads: int = 4
    mlp_factor: float = 2.668  # SwiGLU hidden width = mlp_factor * d_model, rounded to a multiple of 8
    max_seq_len: int = 1024  # in words (trigram mode) or tokens
    rope_theta: float = 10_000.0
    dropout: float = 0.0

    def __post_init__(self) -> None:
        if self.input not in ("trigram", "token"):
            raise DistilrayError(f"input must be 'trigram' or 'token', got {self.input!r}")
        sizes = {"v": self.v, "m": self.m, "d_model": self.d_model, "n_layers": self.n_layers}
        sizes |= {"n_heads": self.n_heads, "max_seq_len": self.max_seq_len}
        for name, value in sizes.items():
            if value < 1:
                raise DistilrayError(f"{name} must be positive, got {value}")
        head_dim, rest = divmod(self.d_model, self.n_heads)
        if rest or head_dim % 2:
            raise DistilrayError(f"d_model {self.d_model} must split into {self.n_heads} heads of even width (rotary)")
        if self.m > self.v:
            raise DistilrayError(f"m ({self.m} rows per trigram) cannot exceed v ({self.v} rows)")
        if not 0 <= self.k <= self.m:
            raise DistilrayError(f"k (lowercase-shared rows) must be in [0, m = {self.m}], got {self.k}")
        if self.mlp_hidden < 8:
            raise DistilrayError(f"mlp_factor {self.mlp_factor} leaves no SwiGLU width at d_model {self.d_model}")
        if self.rope_theta <= 0:
            raise DistilrayError(f"rope_theta must be positive, got {self.rope_theta}")
        if not 0.0 <= self.dropout < 1.0:
            raise DistilrayError(f"dropout must be in [0, 1), got {self.dropout}")

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    @property
    def mlp_hidden(self) -> int:
        return 8 * round(self.mlp_factor * self.d_model / 8)


class KVCache:
    """Keys (after rotary) and values of every layer, (B, H, T, hd) each, plus the doc ids (B, T) of the T cached
    positions. `TFreeLM.forward(..., cache=cache)` appends to it; `length` is T."""

    def __init__(self, n_layers: int) -> None:
        self.keys: list[Tensor | None] = [None] * n_layers
        self.values: list[Tensor | None] = [None] * n_layers
        self.doc_ids: Tensor | None = None

    @property
    def length(self) -> int:
        return 0 if self.doc_ids is None else self.doc_ids.shape[1]

    def append(self, layer: int, keys: Tensor, values: Tensor) -> tuple[Tensor, Tensor]:
        """Add one layer's new keys and values (B, H, S, hd); return all of that layer's (B, H, T + S, hd)."""
        if self.keys[layer] is not None:
            keys = torch.cat([self.keys[layer], keys], dim=2)
            values = torch.cat([self.values[layer], values], dim=2)
        self.keys[layer], self.values[layer] = keys, values
        return keys, values


def rotary_tables(positions: Tensor, head_dim: int, theta: float) -> tuple[Tensor, Tensor]:
    """positions (B, S) int -> cos, sin (B, 1, S, hd) float32, ready to broadcast over heads."""
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32, device=positions.device) / head_dim)
    angles = positions.float().unsqueeze(-1) * inv_freq  # (B, S, hd / 2)
    angles = torch.cat([angles, angles], dim=-1).unsqueeze(1)  # (B, 1, S, hd)
    return angles.cos(), angles.sin()


def attention_mask(doc_ids: Tensor | None, past_doc_ids: Tensor | None, length: int) -> Tensor | None:
    """Who may attend to whom: (B, 1, S, T) bool, T = past + S, or None for plain causal attention.

    doc_ids (B, S) of the new positions, past_doc_ids (B, past) of the cached ones. Query i (absolute position
    past + i) sees key j iff j <= past + i and both lie in the same document; a padding query (doc id -1) sees
    itself only. doc_ids None (allowed only without a cache) is one document: plain causal attention.
    """
    if doc_ids is None:
        return None
    past = 0 if past_doc_ids is None else past_doc_ids.shape[1]
    query_at = torch.arange(past, past + length, device=doc_ids.device)[:, None]  # (S, 1)
    key_at = torch.arange(past + length, device=doc_ids.device)[None, :]  # (1, T)
    key_docs = doc_ids if past_doc_ids is None else torch.cat([past_doc_ids, doc_ids], dim=1)  # (B, T)
    same_doc = (doc_ids[:, :, None] == key_docs[:, None, :]) & (doc_ids[:, :, None] >= 0)  # (B, S, T)
    return ((same_doc & (key_at <= query_at)) | (key_at == query_at)).unsqueeze(1)


class Attention(nn.Module):
    def __init__(self, config: TFreeLMConfig) -> None:
        super().__init__()
        self.n_heads, self.dropout = config.n_heads, config.dropout
        self.qkv = nn.Linear(config.d_model, 3 * config.d_model, bias=False)
        self.out = nn.Linear(config.d_model, config.d_model, bias=False)

    def forward(
        self, x: Tensor, cos: Tensor, sin: Tensor, mask: Tensor | None, cache: KVCache | None, layer: int
    ) -> Tensor:
        """x (B, S, D) -> (B, S, D); mask None means causal over x alone (no cache entries)."""
        batch, length, d = x.shape
        q, k, v = self.qkv(x).view(batch, length, 3, self.n_heads, d // self.n_heads).permute(2, 0, 3, 1, 4)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)  # each (B, H, S, hd)
        if cache is not None:
            k, v = cache.append(layer, k, v)  # (B, H, T, hd)
        dropout = self.dropout if self.training else 0.0
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None, dropout_p=dropout)
        return self.out(y.transpose(1, 2).reshape(batch, length, d))


class SwiGLU(nn.Module):
    def __init__(self, config: TFreeLMConfig) -> None:
        super().__init__()
        self.gate_up = nn.Linear(config.d_model, 2 * config.mlp_hidden, bias=False)
        self.down = nn.Linear(config.mlp_hidden, config.d_model, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        gate, up = self.gate_up(x).chunk(2, dim=-1)
        return self.down(F.silu(gate) * up)


class Block(nn.Module):
    """x + Attn(RMSNorm(x)), then x + MLP(RMSNorm(x))."""

    def __init__(self, config: TFreeLMConfig) -> None:
        super().__init__()
        self.attn_norm = nn.RMSNorm(config.d_model, eps=1e-5)
        self.attn = Attention(config)
        self.mlp_norm = nn.RMSNorm(config.d_model, eps=1e-5)
        self.mlp = SwiGLU(config)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, mask: Tensor | None, cache: KVCache | None, layer: int):
        x = x + self.dropout(self.attn(self.attn_norm(x), cos, sin, mask, cache, layer))
        return x + self.dropout(self.mlp(self.mlp_norm(x)))


class TFreeLM(nn.Module):
    def __init__(self, config: TFreeLMConfig) -> None:
        super().__init__()
        self.config = config
        d = config.d_model
        if config.input == "trigram":
            self.embed = nn.EmbeddingBag(config.v, d, mode="sum")
        else:
            self.embed = nn.Embedding(config.v, d)
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.n_layers))
        self.norm = nn.RMSNorm(d, eps=1e-5)
        self.head = nn.Linear(d, config.v, bias=False)
        small = math.sqrt(2 / (5 * d))
        for name, p in self.named_parameters():
            if name.endswith("attn.out.weight") or name.endswith("mlp.down.weight"):
                nn.init.normal_(p, std=2 / (config.n_layers * math.sqrt(d)))  # wang init
            elif p.dim() == 2:
                nn.init.normal_(p, std=small)  # embedding and head: the "pythia" init; the rest: small init

    def new_cache(self) -> KVCache:
        return KVCache(self.config.n_layers)

    def forward(
        self,
        *,
        indices: Tensor | None = None,
        offsets: Tensor | None = None,
        tokens: Tensor | None = None,
        shape: tuple[int, int] | None = None,
        positions: Tensor | None = None,
        doc_ids: Tensor | None = None,
        cache: KVCache | None = None,
    ) -> Tensor:
        """Logits (B, S, v) float32 for B sequences of S positions.

        Trigram mode: `indices` (N,) int64 and `offsets` (B*S,) int64 describe the B*S word bags row-major as
        EmbeddingBag does (bag i is indices[offsets[i]:offsets[i+1]], the last one running to N), `shape` (B, S).
        Token mode: `tokens` (B, S) int64.
        positions (B, S) int64 for the rotary angles, restarting at 0 in each document; None: past + 0..S-1.
        doc_ids (B, S) int64: attention stays inside a document, -1 is padding; None: one document (with a
        cache: the new positions continue the last cached position's document).
        cache: keys and values of the positions before these; this call appends its own.
        """
        x = self._embed(indices, offsets, tokens, shape)  # (B, S, D)
        batch, length, _ = x.shape
        past = 0 if cache is None else cache.length
        if past + length > self.config.max_seq_len:
            raise DistilrayError(f"{past + length} positions exceed the model's context of {self.config.max_seq_len}")
        if positions is None:
            positions = torch.arange(past, past + length, device=x.device).expand(batch, length)
        if doc_ids is None and past:
            doc_ids = cache.doc_ids[:, -1:].expand(batch, length)
        for name, given in (("positions", positions), ("doc_ids", doc_ids)):
            if given is not None and tuple(given.shape) != (batch, length):
                raise DistilrayError(f"{name} must be (B, S) = {(batch, length)}, got {tuple(given.shape)}")
        mask = attention_mask(doc_ids, None if cache is None else cache.doc_ids, length)  # (B, 1, S, T) or None
        cos, sin = rotary_tables(positions, self.config.head_dim, self.config.rope_theta)  # (B, 1, S, hd)
        for layer, block in enumerate(self.blocks):
            x = block(x, cos, sin, mask, cache, layer)
        if cache is not None:
            new_docs = doc_ids if doc_ids is not None else torch.zeros(batch, length, dtype=torch.long, device=x.device)
            cache.doc_ids = new_docs if cache.doc_ids is None else torch.cat([cache.doc_ids, new_docs], dim=1)
        return self.head(self.norm(x)).float()

    def _embed(self, indices, offsets, tokens, shape) -> Tensor:
        """The inputs of either mode -> (B, S, D)."""
        if self.config.input == "token":
            if tokens is None or indices is not None or offsets is not None:
                raise DistilrayError("a token-mode T-Free baseline takes tokens=(B, S), not trigram indices")
            if tokens.dim() != 2:
                raise DistilrayError(f"tokens must be (B, S), got shape {tuple(tokens.shape)}")
            return self.embed(tokens)
        if indices is None or offsets is None or shape is None or tokens is not None:
            raise DistilrayError("a trigram-mode T-Free LM takes indices, offsets and shape=(B, S), not tokens")
        batch, length = shape
        if offsets.dim() != 1 or offsets.numel() != batch * length:
            raise DistilrayError(
                f"offsets must hold one entry per word position (B*S = {batch * length}), "
                f"got shape {tuple(offsets.shape)}"
            )
        return self.embed(indices, offsets).view(batch, length, -1)


# --- sizes ------------------------------------------------------------------------------------------------------

# The first three train on 2 CPU cores and leave v to the tokenizer. The last three are for GPU users: v, m, k
# from reference/tfree.md 6; tfree-7b is the repository's configs/7b_fineweb.yaml; the 1B and 3B shapes are not
# in the reference, so they are Llama-like widths (head width 128) with the depth that reproduces the paper's
# totals at v = 8000: 0.84B (1B) and 2.77B (3B). The context is the 7B config's 4096 words for all three.
PRESETS: dict[str, dict] = {
    "tfree-micro": dict(d_model=64, n_layers=2, n_heads=2),  # tests
    "tfree-tiny": dict(d_model=128, n_layers=4, n_heads=4),  # quickstart, bench tfree
    "tfree-mini": dict(d_model=256, n_layers=6, n_heads=4),
    "tfree-1b": dict(v=8000, m=10, k=0, d_model=2048, n_layers=16, n_heads=16, max_seq_len=4096),
    "tfree-3b": dict(v=8000, m=7, k=3, d_model=3072, n_layers=24, n_heads=24, max_seq_len=4096),
    "tfree-7b": dict(v=32000, m=10, k=2, d_model=4096, n_layers=32, n_heads=32, max_seq_len=4096),
}


def build_tfree_lm(preset_or_config: str | TFreeLMConfig, **overrides) -> TFreeLM:
    """A fresh T-Free LM from a preset name (PRESETS) or a config, with fields replaced by `overrides`."""
    known = {f.name for f in dataclasses.fields(TFreeLMConfig)}
    unknown = sorted(set(overrides) - known)
    if unknown:
        raise DistilrayError(f"unknown T-Free LM setting(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
    if isinstance(preset_or_config, TFreeLMConfig):
        return TFreeLM(dataclasses.replace(preset_or_config, **overrides))
    if preset_or_config not in PRESETS:
        raise DistilrayError(f"unknown T-Free preset {preset_or_config!r}; choose from {', '.join(PRESETS)}")
    fields = {**PRESETS[preset_or_config], **overrides}
    if "v" not in fields:
        raise DistilrayError(f"preset {preset_or_config!r} leaves v open: pass v (the tokenizer's rows)")
    return TFreeLM(TFreeLMConfig(**fields))


def embed_head_params(model: TFreeLM) -> int:
    """Parameters of the input embedding plus the head: 2 v d (reference/tfree.md 7)."""
    return model.embed.weight.numel() + model.head.weight.numel()


def param_count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


# --- files ------------------------------------------------------------------------------------------------------


def save_tfree_lm(model: TFreeLM, folder: str | Path) -> None:
    """Write model.safetensors and config.json (architecture "tfree_lm") atomically."""
    save_module(model, model.config, ARCH, folder)


def load_tfree_lm(folder: str | Path, device: str | torch.device = "cpu") -> TFreeLM:
    """The T-Free LM saved in `folder`, in eval mode on `device`; any other folder is a DistilrayError."""
    check_model_folder(folder, ARCH, "a T-Free LM")
    if not (Path(folder) / "model.safetensors").is_file():
        raise DistilrayError(f"{folder} has a T-Free LM config.json but no model.safetensors")
    config = TFreeLMConfig(**read_config(folder, ARCH, TFreeLMConfig))
    return load_weights(TFreeLM(config), folder, device)
