"""Decoding-time drafters: Hugging Face LMs with their KV cache, and any saved drafter folder (or the
`prompt-lookup` spec, which needs no folder) loaded as a `Drafter` (the registry of kinds is
models/drafters.py).

`HFDrafter` drives any Hugging Face causal LM (the small-transformer drafter, or the target itself
for testing), `HFSeq2SeqDrafter` an encoder-decoder LM (a small T5 drafting decoder tokens for a T5
target). n-gram, CNN and LSTM states live in models/ and propose blocks through `NextTokenAdapter`.
"""

from __future__ import annotations

from pathlib import Path

import torch

from distilray.decoding.cached_model import CachedModel
from distilray.decoding.drafter_api import Drafter, LogitsDrafter, NextTokenAdapter, model_vocab_size
from distilray.decoding.prompt_lookup import PromptLookupDrafter
from distilray.decoding.seq2seq import check_encoder_ids, is_encoder_decoder
from distilray.errors import DistilrayError
from distilray.models.causal_lm import position_limit
from distilray.models.drafters import DRAFTERS, drafter_kind, network_kind
from distilray.models.quantize import apply_quantization, check_quantize_mode

PROMPT_LOOKUP = "prompt-lookup"
PROMPT_LOOKUP_KEYS = {"n": "max_ngram", "m": "min_ngram", "k": "max_draft"}


class HFDrafter(LogitsDrafter):
    """A Hugging Face causal LM as a drafter, its KV cache kept in sync with the token state.

    Invariant: the cache holds the first `_lm.length()` tokens of `_tokens`, and `_logits` (V,) is the
    distribution after all of them when it is not None. Feeding is lazy: pushes only extend `_tokens`,
    and `next_logits` runs one forward pass over every unfed token, so the last draft of a step and the
    correction token that follows cost a single pass.
    """

    def __init__(self, model, encoder_ids: list[int] | None = None) -> None:
        self.model = model
        self.vocab_size = model_vocab_size(model)
        # tokens the state may hold (its position table; None: unbounded), checked by the loop up front
        self.max_context: int | None = position_limit(model)
        self.forward_passes = 0
        self._tokens: list[int] = []
        self._lm = CachedModel(model, encoder_ids)
        self._logits: torch.Tensor | None = None

    def start(self, prefix: list[int]) -> None:
        """Take `prefix` (non-empty) as the state, with an empty cache (a source encoding is kept)."""
        if len(prefix) == 0:
            raise DistilrayError("a drafter needs a non-empty prefix")
        self._tokens = [int(t) for t in prefix]
        self._lm = self._lm.fresh()  # rebinds: a shallow copy of a started drafter never shares a cache
        self._logits = None

    def push(self, tokens: list[int]) -> None:
        """Append tokens; they are fed on the next `next_logits` call."""
        self._tokens.extend(int(t) for t in tokens)

    def length(self) -> int:
        return len(self._tokens)

    def cached_length(self) -> int:
        """Tokens whose keys and values are in the cache."""
        return self._lm.length()

    def rollback(self, length: int) -> None:
        """Keep the first `length` tokens; the cache is cropped to match (never recomputed)."""
        if not 1 <= length <= len(self._tokens):
            raise DistilrayError(f"cannot roll a drafter of {len(self._tokens)} tokens back to {length}")
        self._tokens = self._tokens[:length]
        if self._lm.length() > length:
            self._lm.crop(length)
            self._logits = None  # the logits in hand belonged to a dropped position

    @torch.inference_mode()
    def next_logits(self) -> torch.Tensor:
        """(V,) float32 logits of the next token after the whole state."""
        if not self._tokens:
            raise DistilrayError("the drafter has no state: call start(prefix) first")
        fed = self._lm.length()
        if fed == len(self._tokens) and self._logits is None:
            # after a rollback the last kept token's logits are gone: re-feed that one token
            fed -= 1
            self._lm.crop(fed)
        if fed < len(self._tokens):
            self._logits = self._lm.feed(self._tokens[fed:]).logits[-1]  # (V,)
            self.forward_passes += 1
        assert self._logits is not None
        return self._logits


class HFSeq2SeqDrafter(HFDrafter):
    """A Hugging Face encoder-decoder LM as a drafter (e.g. a small T5 for a T5 target).

    The drafter encodes `encoder_ids` (the request's source, tokenized as for the target) once, with
    its own encoder, on its first pass; the token state is the decoder sequence, whose self-attention
    cache is cropped on rollback exactly as a causal cache is.
    """

    def __init__(self, model, encoder_ids: list[int]) -> None:
        if not is_encoder_decoder(model):
            raise DistilrayError("HFSeq2SeqDrafter needs an encoder-decoder model; use HFDrafter for a causal LM")
        check_encoder_ids(model, encoder_ids, who="drafter")
        self.encoder_ids = [int(t) for t in encoder_ids]
        super().__init__(model, self.encoder_ids)

    @property
    def encoder_passes(self) -> int:
        return self._lm.encoder_passes


def drafter_for(network: torch.nn.Module) -> Drafter:
    """A trained drafter network (CNN, LSTM, transformer) or n-gram model as a decoding-time `Drafter`."""
    from distilray.models.ngram import NGramDrafter

    kind = DRAFTERS["ngram" if isinstance(network, NGramDrafter) else network_kind(network)]
    if kind.state is None:  # a Hugging Face LM
        return HFDrafter(network.eval())
    return NextTokenAdapter(kind.state(network))


def is_prompt_lookup(spec: str | Path) -> bool:
    """Whether a drafter spec names prompt lookup (`prompt-lookup` or `prompt-lookup:n=3,k=8`) rather than a folder."""
    text = str(spec)
    return text == PROMPT_LOOKUP or text.startswith(PROMPT_LOOKUP + ":")


def prompt_lookup_drafter(spec: str, vocab_size: int) -> PromptLookupDrafter:
    """`prompt-lookup[:n=N,m=M,k=K]` -> a PromptLookupDrafter over the target's `vocab_size` ids
    (n: the longest n-gram matched, default 3; m: the shortest, default 1; k: the most tokens drafted, default 8)."""
    if not is_prompt_lookup(spec):
        raise DistilrayError(f"{spec!r} is not a prompt-lookup spec (prompt-lookup or prompt-lookup:n=3,k=8)")
    options: dict[str, int] = {}
    _, _, rest = str(spec).partition(":")
    for part in filter(None, (p.strip() for p in rest.split(","))):
        key, eq, value = part.partition("=")
        if not eq or key.strip() not in PROMPT_LOOKUP_KEYS:
            raise DistilrayError(
                f"bad prompt-lookup option {part!r} in {spec!r}: use n=<max ngram>, m=<min ngram>, k=<max draft>"
            )
        try:
            options[PROMPT_LOOKUP_KEYS[key.strip()]] = int(value)
        except ValueError:
            raise DistilrayError(f"prompt-lookup option {key.strip()} must be an integer, got {value!r}") from None
    return PromptLookupDrafter(int(vocab_size), **options)


def load_drafter(
    folder: str | Path,
    device: str | torch.device = "cpu",
    quantize: str = "none",
    vocab_size: int | None = None,
) -> Drafter:
    """A saved drafter folder (any kind), or a prompt-lookup spec, -> a `Drafter` ready for speculative decoding.

    quantize: "none" or "int8" (models/quantize.py; CPU only) for a network drafter (transformer, CNN,
    LSTM); n-gram and prompt-lookup drafters have no network and ignore it. vocab_size: the target's
    (`model_vocab_size(target)`), required by prompt lookup, which has no folder to read it from;
    folder drafters carry their own (the loop checks that it equals the target's).
    """
    check_quantize_mode(quantize)
    if is_prompt_lookup(folder):
        if vocab_size is None:
            raise DistilrayError(
                "a prompt-lookup drafter takes the target's vocabulary: pass vocab_size=model_vocab_size(target)"
            )
        return prompt_lookup_drafter(str(folder), vocab_size)
    kind = drafter_kind(folder)
    network = DRAFTERS[kind].load(folder, device)
    if DRAFTERS[kind].build is not None:  # a trainable network; the counted n-gram has none
        network = apply_quantization(network, quantize)
    return drafter_for(network)
