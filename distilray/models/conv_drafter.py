"""Causal convolutional drafter: embedding -> n_layers x [LN -> causal Conv1d -> GELU -> residual]
-> LN -> head.

Causality: every convolution is padded on the left only (kernel_size - 1 zeros), so position t sees
tokens <= t. A drafter that sees the future trains well and cannot draft (FastLLM pitfall).
There are no position embeddings, so the model is translation-equivariant: the logits at the last
position depend only on the last `receptive_field = n_layers * (kernel_size - 1) + 1` tokens, which
is what `ConvDrafterState` recomputes per call.

Stored as model.safetensors + config.json (no pickle).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from distilray.errors import DistilrayError
from distilray.models.module_io import TokenListState, load_weights, read_config, save_module

ARCH = "conv_drafter"


@dataclass(frozen=True)
class ConvDrafterConfig:
    vocab_size: int
    d_model: int = 128
    kernel_size: int = 4
    n_layers: int = 2
    dropout: float = 0.0
    tie_embeddings: bool = True

    def __post_init__(self) -> None:
        if self.vocab_size < 1 or self.d_model < 1 or self.kernel_size < 1 or self.n_layers < 1:
            raise DistilrayError(f"invalid ConvDrafterConfig: {self}")
        if not 0.0 <= self.dropout < 1.0:
            raise DistilrayError(f"dropout must be in [0, 1), got {self.dropout}")

    @property
    def receptive_field(self) -> int:
        return self.n_layers * (self.kernel_size - 1) + 1


class CausalConvBlock(nn.Module):
    """Pre-norm residual block: x + dropout(GELU(conv(pad_left(LN(x)))))."""

    def __init__(self, config: ConvDrafterConfig) -> None:
        super().__init__()
        self.pad = config.kernel_size - 1
        self.norm = nn.LayerNorm(config.d_model)
        self.conv = nn.Conv1d(config.d_model, config.d_model, config.kernel_size)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B, T, D) -> (B, T, D)."""
        h = self.norm(x).transpose(1, 2)  # (B, D, T): Conv1d wants channels first
        h = F.pad(h, (self.pad, 0))  # left padding only: no future leaks in
        h = F.gelu(self.conv(h)).transpose(1, 2)
        return x + self.dropout(h)


class ConvDrafter(nn.Module):
    def __init__(self, config: ConvDrafterConfig) -> None:
        super().__init__()
        self.config = config
        self.embed = nn.Embedding(config.vocab_size, config.d_model)
        nn.init.normal_(self.embed.weight, std=0.02)  # N(0, 1) through the tied head gives wildly peaked logits
        self.blocks = nn.ModuleList(CausalConvBlock(config) for _ in range(config.n_layers))
        self.norm = nn.LayerNorm(config.d_model)
        self.head = nn.Linear(config.d_model, config.vocab_size, bias=False)
        if config.tie_embeddings:
            self.head.weight = self.embed.weight  # halves parameters; common for small LMs

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        """input_ids: (B, T) int64 -> logits (B, T, V) float."""
        x = self.embed(input_ids)
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(x))

    def save_pretrained(self, folder: str | Path) -> None:
        """Write model.safetensors and config.json atomically (a tied head is re-tied on load)."""
        save_module(self, self.config, ARCH, folder, tied=("head.weight",) if self.config.tie_embeddings else ())

    @classmethod
    def from_pretrained(cls, folder: str | Path, device: str | torch.device = "cpu") -> "ConvDrafter":
        config = ConvDrafterConfig(**read_config(folder, ARCH, ConvDrafterConfig))
        ties = {"head.weight": "embed.weight"} if config.tie_embeddings else {}
        return load_weights(cls(config), folder, device, ties)


class ConvDrafterState(TokenListState):
    """Drafter interface over a ConvDrafter: the state is the token list; each `next_logits` runs the
    model on the last `receptive_field` tokens only (exactly the tokens the last logits depend on)."""

    def __init__(self, model: ConvDrafter) -> None:
        self.model = model.eval()
        self.vocab_size = model.config.vocab_size
        self._window = model.config.receptive_field
        self._tokens: list[int] = []

    @torch.inference_mode()
    def next_logits(self) -> torch.Tensor:
        """(V,) float32 logits of the next token."""
        if not self._tokens:
            raise DistilrayError("next_logits before start")
        device = self.model.embed.weight.device
        ids = torch.tensor([self._tokens[-self._window :]], dtype=torch.long, device=device)
        return self.model(ids)[0, -1].float()
