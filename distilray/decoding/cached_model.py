"""A Hugging Face LM with its KV cache, as every decoder and the HF drafters drive it.

One class for causal LMs and for the decoder of an encoder-decoder (T5): with `encoder_ids` the
encoder runs once, on the first pass, and the cache is the decoder's EncoderDecoderCache, whose
get_seq_length/crop see only the self-attention half (the cross-attention keys of the encoder states
never change). `crop_cache` is the one place a cache is shortened.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass

import torch

from distilray.decoding.seq2seq import decoder_forward, run_encoder


def crop_cache(cache, length: int):
    """The cache holding only its first `length` positions (None for 0); crop takes a negative count
    (transformers 5.x), and works in place on DynamicCache and EncoderDecoderCache alike."""
    if cache is None or length <= 0:
        return None
    extra = cache.get_seq_length() - length
    if extra > 0:
        cache.crop(-extra)
    return cache


@dataclass(frozen=True)
class Fed:
    """What one pass returns for its last `keep` positions."""

    logits: torch.Tensor  # (keep, V) float32
    hidden: torch.Tensor | None  # (keep, d) float32 final-layer hidden states, when asked for


class CachedModel:
    """A model and its KV cache: `feed` runs new tokens after the cached ones, `crop` rolls back."""

    def __init__(self, model, encoder_ids: list[int] | None = None, encoder_outputs=None) -> None:
        self.model = model
        self.device = next(model.parameters()).device
        self.cache = None  # the model creates its cache on the first call
        self.passes = 0  # forward passes over new tokens (the prefill is the first)
        self.encoder_passes = 0
        self._encoder_ids = encoder_ids
        self.encoder_outputs = encoder_outputs  # last_hidden_state (1, S, d) once the encoder has run
        # logits for only the kept positions save a (T, V) matmul on long prompts and big vocabularies
        self._can_trim = "logits_to_keep" in inspect.signature(model.forward).parameters

    @property
    def is_encoder_decoder(self) -> bool:
        return self._encoder_ids is not None or self.encoder_outputs is not None

    def fresh(self) -> "CachedModel":
        """The same model (and source encoding) with an empty cache."""
        clone = CachedModel(self.model, self._encoder_ids, self.encoder_outputs)
        clone.encoder_passes = self.encoder_passes  # the passes that produced the encoding it shares
        return clone

    def length(self) -> int:
        """Positions in the cache."""
        return self.cache.get_seq_length() if self.cache is not None else 0

    @torch.inference_mode()
    def feed(self, tokens: list[int], keep: int = 1, hidden: bool = False) -> Fed:
        """One forward pass over `tokens` (n,) after the cached ones; logits (and hidden) of the last `keep`."""
        ids = torch.tensor([list(tokens)], dtype=torch.long, device=self.device)  # (1, n)
        if self.is_encoder_decoder:
            if self.encoder_outputs is None:
                self.encoder_outputs = run_encoder(self.model, self._encoder_ids)
                self.encoder_passes += 1
            out = decoder_forward(self.model, self.encoder_outputs, ids, self.cache, output_hidden_states=hidden)
        else:
            kwargs = {"logits_to_keep": keep} if self._can_trim else {}
            out = self.model(
                input_ids=ids, past_key_values=self.cache, use_cache=True, output_hidden_states=hidden, **kwargs
            )
        self.cache = out.past_key_values
        self.passes += 1
        logits = out.logits[0, -keep:].float()  # (keep, V)
        states = None
        if hidden:
            last = out.decoder_hidden_states if self.is_encoder_decoder else out.hidden_states
            states = last[-1][0, -keep:].float()  # (keep, d)
        return Fed(logits, states)

    def crop(self, length: int) -> None:
        """Keep the first `length` cached positions."""
        self.cache = crop_cache(self.cache, length)
