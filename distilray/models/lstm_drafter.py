"""Unidirectional LSTM drafter: embedding -> LSTM (n_layers) -> LN -> head.

Unidirectional on purpose: a bidirectional LSTM sees future tokens during teacher-forced training
and cannot draft autoregressively (FastLLM pitfall). Stored as model.safetensors + config.json.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from distilray.errors import DistilrayError
from distilray.models.module_io import load_weights, read_config, save_module

ARCH = "lstm_drafter"
State = tuple[torch.Tensor, torch.Tensor]  # (h, c), each (n_layers, B, d_model)


@dataclass(frozen=True)
class LSTMDrafterConfig:
    vocab_size: int
    d_model: int = 128
    n_layers: int = 1
    dropout: float = 0.0  # between LSTM layers and before the head
    tie_embeddings: bool = True

    def __post_init__(self) -> None:
        if self.vocab_size < 1 or self.d_model < 1 or self.n_layers < 1:
            raise DistilrayError(f"invalid LSTMDrafterConfig: {self}")
        if not 0.0 <= self.dropout < 1.0:
            raise DistilrayError(f"dropout must be in [0, 1), got {self.dropout}")


class LSTMDrafter(nn.Module):
    def __init__(self, config: LSTMDrafterConfig) -> None:
        super().__init__()
        self.config = config
        self.embed = nn.Embedding(config.vocab_size, config.d_model)
        nn.init.normal_(self.embed.weight, std=0.02)  # N(0, 1) through the tied head gives wildly peaked logits
        self.lstm = nn.LSTM(
            config.d_model,
            config.d_model,  # hidden == d_model so the head can tie to the embedding
            num_layers=config.n_layers,
            batch_first=True,
            dropout=config.dropout if config.n_layers > 1 else 0.0,
        )
        self.dropout = nn.Dropout(config.dropout)
        self.norm = nn.LayerNorm(config.d_model)
        self.head = nn.Linear(config.d_model, config.vocab_size, bias=False)
        if config.tie_embeddings:
            self.head.weight = self.embed.weight

    def step(self, input_ids: torch.Tensor, state: State | None = None) -> tuple[torch.Tensor, State]:
        """input_ids: (B, T), state: (h, c) or None (zeros) -> logits (B, T, V), new (h, c)."""
        out, new_state = self.lstm(self.embed(input_ids), state)
        return self.logits_from_hidden(out), new_state

    def logits_from_hidden(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden: (..., D) top-layer LSTM output -> logits (..., V)."""
        return self.head(self.norm(self.dropout(hidden)))

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        """input_ids: (B, T) int64 -> logits (B, T, V) float."""
        return self.step(input_ids)[0]

    def save_pretrained(self, folder: str | Path) -> None:
        """Write model.safetensors and config.json atomically (a tied head is re-tied on load)."""
        save_module(self, self.config, ARCH, folder, tied=("head.weight",) if self.config.tie_embeddings else ())

    @classmethod
    def from_pretrained(cls, folder: str | Path, device: str | torch.device = "cpu") -> "LSTMDrafter":
        config = LSTMDrafterConfig(**read_config(folder, ARCH, LSTMDrafterConfig))
        ties = {"head.weight": "embed.weight"} if config.tie_embeddings else {}
        return load_weights(cls(config), folder, device, ties)


class LSTMDrafterState:
    """Drafter interface over an LSTMDrafter.

    `_states[i]` is the (h, c) after the first i tokens, or None where not kept: `start` runs the
    prefix in one pass and keeps only the final state; `push` steps token by token and keeps each.
    `rollback(length)` reuses `_states[length]` when kept, otherwise re-runs tokens[:length] once.
    Memory is O(generated tokens), fine for short speculative drafts.
    """

    def __init__(self, model: LSTMDrafter) -> None:
        self.model = model.eval()
        self.vocab_size = model.config.vocab_size
        self._tokens: list[int] = []
        self._states: list[State | None] = []

    def _device(self) -> torch.device:
        return self.model.embed.weight.device

    @torch.inference_mode()
    def _run(self, tokens: list[int], state: State | None) -> State:
        ids = torch.tensor([tokens], dtype=torch.long, device=self._device())
        _, new_state = self.model.lstm(self.model.embed(ids), state)
        return new_state

    def start(self, prefix: list[int]) -> None:
        if not prefix:
            raise DistilrayError("drafter prefix must be non-empty")
        self._tokens = [int(t) for t in prefix]
        self._states = [None] * len(self._tokens) + [self._run(self._tokens, None)]

    @torch.inference_mode()
    def next_logits(self) -> torch.Tensor:
        """(V,) float32 logits of the next token, from the top layer's h after the last token."""
        if not self._tokens:
            raise DistilrayError("next_logits before start")
        h, _ = self._states[-1]  # type: ignore[misc]
        return self.model.logits_from_hidden(h[-1, 0]).float()

    def push(self, tokens: list[int]) -> None:
        if not self._tokens and tokens:
            # An LSTM state needs a real prefix; start() owns initialisation.
            raise DistilrayError("push on an empty drafter state: call start first")
        for t in tokens:
            self._states.append(self._run([int(t)], self._states[-1]))
            self._tokens.append(int(t))

    def rollback(self, length: int) -> None:
        if not 0 <= length <= len(self._tokens):
            raise DistilrayError(f"cannot roll back to {length}: state has {len(self._tokens)} tokens")
        del self._tokens[length:]
        del self._states[length + 1 :]
        if length > 0 and self._states[length] is None:
            self._states[length] = self._run(self._tokens, None)

    def length(self) -> int:
        return len(self._tokens)
