"""Every drafter family behind one registry (reference/speculative.md): build a trainable drafter
network, run it on a batch, save it, load a saved folder back, and tell a folder's kind.

Kinds: `ngram` (counted, not trained), `cnn` (causal conv), `lstm` (unidirectional) and
`transformer` (Hugging Face GPT-2 architecture, so it also works as a transformers assistant model).
A saved drafter is a folder with config.json: n-gram and own architectures tag it themselves, a
Hugging Face model has `model_type`.

Models only: the decoding-time `Drafter` over a loaded folder is `distilray.decoding.drafters.load_drafter`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from distilray.errors import DistilrayError
from distilray.io_utils import read_json


def _width(kind: str, size: str) -> int:
    try:
        return int(size) if size else 128
    except ValueError:
        raise DistilrayError(f"a {kind} drafter's size is its width d_model (an integer), got {size!r}") from None


def _is_hf(network: Any) -> bool:
    return hasattr(network, "config") and hasattr(network.config, "model_type")


# -- the kinds, each in a few lines -----------------------------------------------------------------


def _build_cnn(tokenizer, size: str) -> torch.nn.Module:
    from distilray.models.conv_drafter import ConvDrafter, ConvDrafterConfig

    return ConvDrafter(ConvDrafterConfig(vocab_size=len(tokenizer), d_model=_width("cnn", size)))


def _build_lstm(tokenizer, size: str) -> torch.nn.Module:
    from distilray.models.lstm_drafter import LSTMDrafter, LSTMDrafterConfig

    return LSTMDrafter(LSTMDrafterConfig(vocab_size=len(tokenizer), d_model=_width("lstm", size)))


def _build_transformer(tokenizer, size: str) -> torch.nn.Module:
    from distilray.models.causal_lm import build_causal_lm

    return build_causal_lm(size or "tiny", tokenizer)


def _load_ngram(folder: str | Path, device: str | torch.device):
    from distilray.models.ngram import NGramDrafter

    return NGramDrafter.load(folder)


def _load_cnn(folder: str | Path, device: str | torch.device) -> torch.nn.Module:
    from distilray.models.conv_drafter import ConvDrafter

    return ConvDrafter.from_pretrained(folder, device)


def _load_lstm(folder: str | Path, device: str | torch.device) -> torch.nn.Module:
    from distilray.models.lstm_drafter import LSTMDrafter

    return LSTMDrafter.from_pretrained(folder, device)


def _load_transformer(folder: str | Path, device: str | torch.device) -> torch.nn.Module:
    from distilray.models.causal_lm import load_causal_lm

    return load_causal_lm(folder, device=device, dtype=torch.float32)


def _cnn_state(network: torch.nn.Module):
    from distilray.models.conv_drafter import ConvDrafterState

    return ConvDrafterState(network.eval())


def _lstm_state(network: torch.nn.Module):
    from distilray.models.lstm_drafter import LSTMDrafterState

    return LSTMDrafterState(network.eval())


def _is_cnn(network: Any) -> bool:
    from distilray.models.conv_drafter import ConvDrafter

    return isinstance(network, ConvDrafter)


def _is_lstm(network: Any) -> bool:
    from distilray.models.lstm_drafter import LSTMDrafter

    return isinstance(network, LSTMDrafter)


@dataclass(frozen=True)
class DrafterKind:
    """How one drafter family is built, recognised, saved, loaded and run."""

    recognises: Callable[[dict], bool]  # its config.json
    load: Callable[[str | Path, str | torch.device], Any]  # folder, device -> the network (or n-gram model)
    save: Callable[[Any, str | Path], None]
    build: Callable[[Any, str], torch.nn.Module] | None = None  # tokenizer, size -> network; None: not trainable
    owns: Callable[[Any], bool] = lambda network: False  # is this object one of its networks?
    logits: Callable[[Any, torch.Tensor], torch.Tensor] | None = None  # network, input_ids (B, T) -> (B, T, V)
    # the loaded object -> its next-token decoding state (models/); None: a Hugging Face LM, which
    # decoding/drafters.HFDrafter drives with its KV cache
    state: Callable[[Any], Any] | None = None


DRAFTERS: dict[str, DrafterKind] = {
    "ngram": DrafterKind(
        recognises=lambda config: str(config.get("format", "")).startswith("distilray-ngram"),
        load=_load_ngram,
        save=lambda model, folder: model.save(folder),
        state=lambda model: model,
    ),
    "cnn": DrafterKind(
        recognises=lambda config: config.get("architecture") == "conv_drafter",
        load=_load_cnn,
        save=lambda net, folder: net.save_pretrained(folder),
        build=_build_cnn,
        owns=_is_cnn,
        logits=lambda net, ids: net(ids),
        state=_cnn_state,
    ),
    "lstm": DrafterKind(
        recognises=lambda config: config.get("architecture") == "lstm_drafter",
        load=_load_lstm,
        save=lambda net, folder: net.save_pretrained(folder),
        build=_build_lstm,
        owns=_is_lstm,
        logits=lambda net, ids: net(ids),
        state=_lstm_state,
    ),
    # last: any Hugging Face config has model_type, so the tagged kinds are recognised first
    "transformer": DrafterKind(
        recognises=lambda config: "model_type" in config,
        load=_load_transformer,
        save=lambda net, folder: net.save_pretrained(folder),
        build=_build_transformer,
        owns=_is_hf,
        logits=lambda net, ids: net(input_ids=ids).logits,
    ),
}
NEURAL_KINDS = tuple(name for name, kind in DRAFTERS.items() if kind.build is not None)  # cnn, lstm, transformer
DRAFTER_KINDS = tuple(DRAFTERS)


def build_drafter_network(kind: str, tokenizer, size: str = "") -> torch.nn.Module:
    """A freshly initialised trainable drafter over `tokenizer`'s vocabulary.

    `size` is a GPT-2 preset for the transformer (default `tiny`) and the width d_model for CNN/LSTM
    (default 128).
    """
    spec = DRAFTERS.get(kind)
    if spec is None or spec.build is None:
        raise DistilrayError(f"unknown trainable drafter kind {kind!r}; choose from {', '.join(NEURAL_KINDS)}")
    return spec.build(tokenizer, size)


def network_kind(network: torch.nn.Module) -> str:
    """The kind of a drafter network object."""
    for name, spec in DRAFTERS.items():
        if spec.owns(network):
            return name
    raise DistilrayError(f"{type(network).__name__} is not a drafter network")


def network_logits(network: torch.nn.Module, input_ids: torch.Tensor) -> torch.Tensor:
    """input_ids (B, T) -> logits (B, T, V) for any drafter network (HF models wrap theirs in .logits)."""
    return DRAFTERS[network_kind(network)].logits(network, input_ids)


def drafter_kind(folder: str | Path) -> str:
    """The kind of a saved drafter folder, from its config.json."""
    path = Path(folder) / "config.json"
    try:
        config = read_json(path)
    except (OSError, ValueError) as e:
        raise DistilrayError(f"{folder} is not a drafter folder (config.json: {e})") from None
    if not isinstance(config, dict):
        raise DistilrayError(f"{path} is not a drafter config")
    for name, spec in DRAFTERS.items():
        if spec.recognises(config):
            return name
    raise DistilrayError(f"{path} names no known drafter (n-gram, conv_drafter, lstm_drafter or a Hugging Face model)")


def load_drafter_network(folder: str | Path, device: str | torch.device = "cpu") -> torch.nn.Module:
    """The trainable network of a saved neural drafter (eval mode)."""
    kind = drafter_kind(folder)
    if DRAFTERS[kind].build is None:
        raise DistilrayError(f"{folder} is a {kind} drafter (counted, not trained): it has no trainable network")
    return DRAFTERS[kind].load(folder, device).eval()


def save_drafter(drafter: Any, folder: str | Path) -> None:
    """Save a drafter network or n-gram model as a folder `drafter_kind` recognises."""
    from distilray.models.ngram import NGramDrafter

    kind = "ngram" if isinstance(drafter, NGramDrafter) else network_kind(drafter)
    DRAFTERS[kind].save(drafter, folder)
