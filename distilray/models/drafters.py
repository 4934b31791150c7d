"""Every drafter family behind one registry: build a trainable drafter network, run it on a batch,
save it, and load a saved folder back as a decoding-time `Drafter` (reference/speculative.md).

Kinds: `ngram` (counted, not trained), `cnn` (causal conv), `lstm` (unidirectional) and
`transformer` (Hugging Face GPT-2 architecture, so it also works as a transformers assistant model).
A saved drafter is a folder with config.json: n-gram and own architectures tag it themselves, a
Hugging Face model has `model_type`.
"""

from __future__ import annotations

from pathlib import Path

import torch

from distilray.errors import DistilrayError
from distilray.io_utils import read_json

NEURAL_KINDS = ("cnn", "lstm", "transformer")
DRAFTER_KINDS = ("ngram", *NEURAL_KINDS)


def build_drafter_network(kind: str, tokenizer, size: str = "") -> torch.nn.Module:
    """A freshly initialised trainable drafter over `tokenizer`'s vocabulary.

    `size` is a GPT-2 preset for the transformer (default `tiny`) and the width d_model for CNN/LSTM
    (default 128).
    """
    vocab = len(tokenizer)
    if kind == "transformer":
        from distilray.models.causal_lm import build_causal_lm

        return build_causal_lm(size or "tiny", tokenizer)
    if kind in ("cnn", "lstm"):
        try:
            d_model = int(size) if size else 128
        except ValueError:
            raise DistilrayError(f"a {kind} drafter's size is its width d_model (an integer), got {size!r}") from None
        if kind == "cnn":
            from distilray.models.conv_drafter import ConvDrafter, ConvDrafterConfig

            return ConvDrafter(ConvDrafterConfig(vocab_size=vocab, d_model=d_model))
        from distilray.models.lstm_drafter import LSTMDrafter, LSTMDrafterConfig

        return LSTMDrafter(LSTMDrafterConfig(vocab_size=vocab, d_model=d_model))
    raise DistilrayError(f"unknown trainable drafter kind {kind!r}; choose from {', '.join(NEURAL_KINDS)}")


def network_logits(network: torch.nn.Module, input_ids: torch.Tensor) -> torch.Tensor:
    """input_ids (B, T) -> logits (B, T, V) for any drafter network (HF models wrap theirs in .logits)."""
    out = network(input_ids=input_ids) if _is_hf(network) else network(input_ids)
    return out.logits if hasattr(out, "logits") else out


def _is_hf(network) -> bool:
    return hasattr(network, "config") and hasattr(network.config, "model_type")


def drafter_kind(folder: str | Path) -> str:
    """The kind of a saved drafter folder, from its config.json."""
    path = Path(folder) / "config.json"
    try:
        config = read_json(path)
    except (OSError, ValueError) as e:
        raise DistilrayError(f"{folder} is not a drafter folder (config.json: {e})") from None
    if not isinstance(config, dict):
        raise DistilrayError(f"{path} is not a drafter config")
    if str(config.get("format", "")).startswith("distilray-ngram"):
        return "ngram"
    arch = config.get("architecture")
    if arch == "conv_drafter":
        return "cnn"
    if arch == "lstm_drafter":
        return "lstm"
    if "model_type" in config:
        return "transformer"
    raise DistilrayError(f"{path} names no known drafter (n-gram, conv_drafter, lstm_drafter or a Hugging Face model)")


def load_drafter_network(folder: str | Path, device: str | torch.device = "cpu") -> torch.nn.Module:
    """The trainable network of a saved neural drafter (eval mode)."""
    kind = drafter_kind(folder)
    if kind == "transformer":
        from distilray.models.causal_lm import load_causal_lm

        return load_causal_lm(folder, device=device, dtype=torch.float32)
    if kind == "cnn":
        from distilray.models.conv_drafter import ConvDrafter

        return ConvDrafter.from_pretrained(folder, device)
    if kind == "lstm":
        from distilray.models.lstm_drafter import LSTMDrafter

        return LSTMDrafter.from_pretrained(folder, device)
    raise DistilrayError(f"{folder} is an n-gram drafter: it has no trainable network")


def as_drafter(network: torch.nn.Module):
    """Wrap a neural drafter network in its decoding-time state (the `Drafter` protocol)."""
    from distilray.decoding.drafter_api import HFDrafter
    from distilray.models.conv_drafter import ConvDrafter, ConvDrafterState
    from distilray.models.lstm_drafter import LSTMDrafter, LSTMDrafterState

    network.eval()
    if isinstance(network, ConvDrafter):
        return ConvDrafterState(network)
    if isinstance(network, LSTMDrafter):
        return LSTMDrafterState(network)
    if _is_hf(network):
        return HFDrafter(network)
    raise DistilrayError(f"{type(network).__name__} is not a drafter network")


def load_drafter(folder: str | Path, device: str | torch.device = "cpu"):
    """A saved drafter folder (any kind) -> a `Drafter` ready for speculative decoding."""
    if drafter_kind(folder) == "ngram":
        from distilray.models.ngram import NGramDrafter

        return NGramDrafter.load(folder)
    return as_drafter(load_drafter_network(folder, device))
