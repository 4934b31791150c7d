"""Shared plumbing of the project's own architectures (CNN and LSTM drafters, later MDLM, T-Free):
model.safetensors + config.json with an architecture tag, and the token-list drafter state."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from distilray.errors import DistilrayError
from distilray.io_utils import atomic_dir, atomic_write_json, read_json


def save_module(module: torch.nn.Module, config, arch: str, folder: str | Path, tied: tuple[str, ...] = ()) -> None:
    """Write model.safetensors (minus the `tied` copies, which safetensors refuses) and config.json atomically."""
    state = {k: v.detach().cpu().contiguous() for k, v in module.state_dict().items() if k not in tied}
    with atomic_dir(folder) as tmp:
        save_file(state, str(tmp / "model.safetensors"))
        atomic_write_json(tmp / "config.json", {"architecture": arch, **dataclasses.asdict(config)})


def load_weights(
    model: torch.nn.Module, folder: str | Path, device: str | torch.device = "cpu", ties: dict[str, str] | None = None
) -> torch.nn.Module:
    """Fill `model` from folder/model.safetensors; `ties` maps a dropped key to the key it copies."""
    state = load_file(str(Path(folder) / "model.safetensors"))
    for dropped, source in (ties or {}).items():
        state[dropped] = state[source]
    try:
        model.load_state_dict(state)
    except RuntimeError as e:
        raise DistilrayError(f"{folder}/model.safetensors does not match its config: {e}") from None
    return model.to(device).eval()


def read_config(folder: str | Path, arch: str, cls: type) -> dict:
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


def check_model_folder(folder: str | Path, arch: str, label: str) -> None:
    """A clear error for a folder that holds something else (a Hugging Face LM, another architecture) or nothing;
    `label` names the kind in messages ("an MDLM", "a T-Free LM")."""
    path = Path(folder) / "config.json"
    if not path.is_file():
        raise DistilrayError(f"{folder} is not {label} folder: it has no config.json")
    try:
        raw = read_json(path)
    except (OSError, ValueError) as e:
        raise DistilrayError(f"{folder} is not {label} folder: unreadable config.json ({e})") from None
    kind = (raw.get("architecture") or raw.get("model_type")) if isinstance(raw, dict) else None
    if kind != arch:
        what = f"a {kind!r} model" if kind else "an unknown model"
        raise DistilrayError(f"{folder} is not {label} ({arch}) folder: its config.json describes {what}")


class TokenListState:
    """Drafter state that is just the token list (n-gram, CNN): start / push / rollback / length."""

    _tokens: list[int]

    def start(self, prefix: list[int]) -> None:
        if not prefix:
            raise DistilrayError("drafter prefix must be non-empty")
        self._tokens = [int(t) for t in prefix]

    def push(self, tokens: list[int]) -> None:
        self._tokens.extend(int(t) for t in tokens)

    def rollback(self, length: int) -> None:
        if not 0 <= length <= len(self._tokens):
            raise DistilrayError(f"cannot roll back to {length}: state has {len(self._tokens)} tokens")
        del self._tokens[length:]

    def length(self) -> int:
        return len(self._tokens)
