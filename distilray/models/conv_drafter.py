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

import dataclasses
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from distilray.errors import DistilrayError
from distilray.io_utils import atomic_dir, atomic_write_json, read_json

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
        """Write model.safetensors and config.json atomically."""
        state = {k: v.detach().cpu().contiguous() for k, v in self.state_dict().items()}
        if self.config.tie_embeddings:
            state.pop("head.weight")  # safetensors refuses shared storage; re-tied on load
        with atomic_dir(folder) as tmp:
            save_file(state, str(tmp / "model.safetensors"))
            atomic_write_json(tmp / "config.json", {"architecture": ARCH, **dataclasses.asdict(self.config)})

    @classmethod
    def from_pretrained(cls, folder: str | Path, device: str | torch.device = "cpu") -> "ConvDrafter":
        config = ConvDrafterConfig(**_read_config(folder, ARCH, ConvDrafterConfig))
        model = cls(config)
        state = load_file(str(Path(folder) / "model.safetensors"))
        if config.tie_embeddings:
            state["head.weight"] = state["embed.weight"]
        try:
            model.load_state_dict(state)
        except RuntimeError as e:
            raise DistilrayError(f"{folder}/model.safetensors does not match its config: {e}") from None
        return model.to(device).eval()


def _read_config(folder: str | Path, arch: str, cls: type) -> dict:
    """Read config.json, check the architecture, reject unknown keys by name."""
    path = Path(folder) / "config.json"
    try:
        raw = read_json(path)
    except (OSError, ValueError) as e:
        raise DistilrayError(f"{folder} is not a readable {arch} folder: {e}") from None
    if not isinstance(raw, dict) or raw.pop("architecture", None) != arch:
        raise DistilrayError(f"{path} is not a {arch} config")
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - known)
    if unknown:
        raise DistilrayError(f"{path}: unknown config key(s) {', '.join(unknown)}")
    return raw


class ConvDrafterState:
    """Drafter interface over a ConvDrafter: the state is the token list; each `next_logits` runs the
    model on the last `receptive_field` tokens only (exactly the tokens the last logits depend on)."""

    def __init__(self, model: ConvDrafter) -> None:
        self.model = model.eval()
        self.vocab_size = model.config.vocab_size
        self._window = model.config.receptive_field
        self._tokens: list[int] = []

    def start(self, prefix: list[int]) -> None:
        if not prefix:
            raise DistilrayError("drafter prefix must be non-empty")
        self._tokens = [int(t) for t in prefix]

    @torch.inference_mode()
    def next_logits(self) -> torch.Tensor:
        """(V,) float32 logits of the next token."""
        if not self._tokens:
            raise DistilrayError("next_logits before start")
        device = self.model.embed.weight.device
        ids = torch.tensor([self._tokens[-self._window :]], dtype=torch.long, device=device)
        return self.model(ids)[0, -1].float()

    def push(self, tokens: list[int]) -> None:
        self._tokens.extend(int(t) for t in tokens)

    def rollback(self, length: int) -> None:
        if not 0 <= length <= len(self._tokens):
            raise DistilrayError(f"cannot roll back to {length}: state has {len(self._tokens)} tokens")
        del self._tokens[length:]

    def length(self) -> int:
        return len(self._tokens)
