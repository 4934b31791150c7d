"""The drafter interface shared by speculative decoding and every drafter family (reference/speculative.md 2).

A drafter is a stateful next-token proposer over the target's vocabulary. Speculative decoding drives
it as: `start(prompt)`, then per step `next_logits()` / `push([d])` up to gamma times, then
`rollback(n + k)` to the accepted length and `push([y])` for the correction or bonus token.

`HFDrafter` implements it for any Hugging Face causal LM with a KV cache (the small-transformer
drafter, or the target itself for testing), `HFSeq2SeqDrafter` for an encoder-decoder LM (a small T5
drafting decoder tokens for a T5 target); n-gram, CNN and LSTM drafters implement it elsewhere.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import torch

from distilray.decoding.seq2seq import check_encoder_ids, decoder_forward, is_encoder_decoder, run_encoder
from distilray.errors import DistilrayError


@runtime_checkable
class Drafter(Protocol):
    """A stateful proposer of next-token logits over the target's vocabulary."""

    vocab_size: int

    def start(self, prefix: list[int]) -> None:
        """(Re)initialise the state on a non-empty prefix."""
        ...

    def next_logits(self) -> torch.Tensor:
        """(V,) float32 unnormalised log-probabilities of the next token given the state."""
        ...

    def push(self, tokens: list[int]) -> None:
        """Append tokens to the state."""
        ...

    def rollback(self, length: int) -> None:
        """Keep only the first `length` tokens of the state (prefix included)."""
        ...

    def length(self) -> int:
        """Tokens in the state."""
        ...


def model_vocab_size(model) -> int:
    """Width of the model's logits (the output embedding rows; config.vocab_size as a fallback)."""
    out = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if out is not None and getattr(out, "weight", None) is not None:
        return int(out.weight.shape[0])
    return int(model.config.vocab_size)


def check_same_vocab(target_vocab_size: int, drafter: Drafter) -> None:
    """Raise DistilrayError unless the drafter proposes over exactly the target's vocabulary.

    Speculative decoding compares p(d) and q(d) token id by token id, so a drafter with another
    tokenizer would silently give garbage acceptance tests instead of failing.
    """
    drafter_vocab = int(getattr(drafter, "vocab_size", -1))
    if drafter_vocab != int(target_vocab_size):
        raise DistilrayError(
            f"drafter and target vocabularies differ: drafter has {drafter_vocab} tokens, target has "
            f"{target_vocab_size}; both must use the same tokenizer"
        )


class HFDrafter:
    """`Drafter` over a Hugging Face causal LM, with a DynamicCache kept in sync with the token state.

    Invariant: the cache holds the first `_fed` tokens of `_tokens` (`_fed <= len(_tokens)`), and
    `_logits` (V,) is the distribution after all `_fed` tokens when it is not None. Feeding is lazy:
    pushes only extend `_tokens`, and `next_logits` runs one forward pass over every unfed token, so
    the last draft of a step and the correction token that follows cost a single pass.
    """

    def __init__(self, model) -> None:
        self.model = model
        self.device = next(model.parameters()).device
        self.vocab_size = model_vocab_size(model)
        self.forward_passes = 0
        self._tokens: list[int] = []
        self._fed = 0
        self._cache = None
        self._logits: torch.Tensor | None = None

    def start(self, prefix: list[int]) -> None:
        """Reset the cache and take `prefix` (non-empty) as the state."""
        if len(prefix) == 0:
            raise DistilrayError("a drafter needs a non-empty prefix")
        self._tokens = [int(t) for t in prefix]
        self._fed = 0
        self._cache = None
        self._logits = None

    def push(self, tokens: list[int]) -> None:
        """Append tokens; they are fed on the next `next_logits` call."""
        self._tokens.extend(int(t) for t in tokens)

    def length(self) -> int:
        return len(self._tokens)

    def rollback(self, length: int) -> None:
        """Keep the first `length` tokens; the cache is cropped to match (never recomputed)."""
        if not 1 <= length <= len(self._tokens):
            raise DistilrayError(f"cannot roll a drafter of {len(self._tokens)} tokens back to {length}")
        self._tokens = self._tokens[:length]
        if self._fed > length:
            self._crop(length)
            self._logits = None  # the logits in hand belonged to a dropped position

    def _crop(self, length: int) -> None:
        """Drop cached positions beyond `length`; crop takes a negative count (transformers 5.x)."""
        if length == 0:
            self._cache = None
        else:
            extra = self._cache.get_seq_length() - length
            if extra > 0:
                self._cache.crop(-extra)
        self._fed = length

    @torch.inference_mode()
    def next_logits(self) -> torch.Tensor:
        """(V,) float32 logits of the next token after the whole state."""
        if not self._tokens:
            raise DistilrayError("the drafter has no state: call start(prefix) first")
        if self._fed == len(self._tokens) and self._logits is None:
            # after a rollback the last kept token's logits are gone: re-feed that one token
            self._crop(self._fed - 1)
        if self._fed < len(self._tokens):
            ids = torch.tensor([self._tokens[self._fed :]], dtype=torch.long, device=self.device)  # (1, n)
            out = self._forward(ids)
            self._cache = out.past_key_values
            self.forward_passes += 1
            self._fed = len(self._tokens)
            self._logits = out.logits[0, -1].float()  # (V,)
        assert self._logits is not None
        return self._logits

    def _forward(self, ids: torch.Tensor):
        """ids (1, n) after the cached tokens -> output with logits (1, n, V) and past_key_values."""
        return self.model(input_ids=ids, past_key_values=self._cache, use_cache=True)


class HFSeq2SeqDrafter(HFDrafter):
    """`Drafter` over a Hugging Face encoder-decoder LM (e.g. a small T5 for a T5 target).

    The drafter encodes `encoder_ids` (the request's source, tokenized as for the target) once, with
    its own encoder; the token state is the decoder sequence, whose self-attention cache is cropped on
    rollback exactly as `HFDrafter` crops a causal cache (EncoderDecoderCache.crop leaves the
    cross-attention keys of the encoder states alone).
    """

    def __init__(self, model, encoder_ids: list[int]) -> None:
        if not is_encoder_decoder(model):
            raise DistilrayError("HFSeq2SeqDrafter needs an encoder-decoder model; use HFDrafter for a causal LM")
        check_encoder_ids(model, encoder_ids, who="drafter")
        super().__init__(model)
        self.encoder_ids = [int(t) for t in encoder_ids]
        self.encoder_passes = 0
        self._encoder_outputs = None  # computed on the first decoder pass, then kept across start()

    def _forward(self, ids: torch.Tensor):
        if self._encoder_outputs is None:
            self._encoder_outputs = run_encoder(self.model, self.encoder_ids)  # last_hidden_state (1, S, d)
            self.encoder_passes += 1
        return decoder_forward(self.model, self._encoder_outputs, ids, self._cache)
