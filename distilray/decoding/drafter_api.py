"""The drafter interface of speculative decoding (reference/speculative.md 2), after transformers'
candidate generators: one small protocol for every draft source.

A drafter is a stateful proposer of token blocks over the target's vocabulary. The loop drives it as
`start(prompt)`, then per step `propose(gamma, sampler, target_hidden)` (which also appends the drafts
to the state), `rollback(n + k)` to the accepted length and `push([y])` for the correction or bonus
token. A `Draft` carries the tokens and, when they were sampled, the warped rows q they came from; a
draft without rows is a point mass (retrieved chunks, prompt lookup), which the acceptance rule
handles exactly (decoding/sampling.py).

A drafter may also have `max_context`: the most tokens its state can hold (a transformer's position
table); the loop refuses a request that would not fit. Absent or None means unbounded (n-gram, CNN,
LSTM, chunks).

`needs_target_hidden` asks the loop for the target's final-layer hidden state at the last position it
has processed; as in EAGLE that position lags the state by one token (the correction or bonus token
has not been fed yet), and it is None before the first target pass.

Every drafter that predicts one token at a time from logits (Hugging Face LMs, n-gram, CNN, LSTM)
gets `propose` from `LogitsDrafter`; `as_drafter` wraps a bare `NextTokenDrafter` (the model-side
states in models/) at the loop's entry.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import torch

from distilray.decoding.sampling import Sampler
from distilray.errors import DistilrayError


@dataclass(frozen=True)
class Draft:
    """A proposed block: tokens (g,) and, when sampled, the warped q rows (g, V) float32 on the CPU."""

    tokens: list[int]
    probs: torch.Tensor | None = None  # None: a point mass at each token

    def q(self, i: int) -> torch.Tensor | None:
        """The proposal row (V,) of draft i, or None for a point mass."""
        return None if self.probs is None else self.probs[i]


@runtime_checkable
class Drafter(Protocol):
    """What the speculative loop drives."""

    vocab_size: int
    needs_target_hidden: bool

    def start(self, prefix: list[int]) -> None:
        """(Re)initialise the state on a non-empty prefix."""
        ...

    def propose(self, gamma: int, sampler: Sampler, target_hidden: torch.Tensor | None = None) -> Draft:
        """At most `gamma` drafts after the state, appended to it; target_hidden (d,) when asked for."""
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


class NextTokenDrafter(Protocol):
    """A one-token-at-a-time proposer (the model-side drafter states): `Drafter` minus `propose`, plus logits."""

    vocab_size: int

    def start(self, prefix: list[int]) -> None: ...

    def next_logits(self) -> torch.Tensor:
        """(V,) float32 unnormalised log-probabilities of the next token given the state."""
        ...

    def push(self, tokens: list[int]) -> None: ...

    def rollback(self, length: int) -> None: ...

    def length(self) -> int: ...


class LogitsDrafter:
    """Base of every logits drafter: a block is gamma samples from the warped next-token logits.
    Subclasses provide the rest of `NextTokenDrafter` (start, next_logits, push, rollback, length)."""

    vocab_size: int
    needs_target_hidden = False

    def propose(self, gamma: int, sampler: Sampler, target_hidden: torch.Tensor | None = None) -> Draft:
        """gamma tokens, each sampled from the warped q after the ones before; q rows only when sampling
        (greedy drafts are point masses: q would be one-hot at each token anyway)."""
        tokens: list[int] = []
        rows: list[torch.Tensor] = []
        for _ in range(gamma):
            q = sampler.warp(self.next_logits())  # (V,)
            token = sampler.sample(q)
            tokens.append(token)
            rows.append(q)
            self.push([token])
        probs = torch.stack(rows) if rows and not sampler.greedy else None
        return Draft(tokens, probs)


class DrafterWrapper:
    """Hands the token-state methods on to a wrapped drafter (adapters and instrumenting wrappers build on it)."""

    def __init__(self, inner: Drafter | NextTokenDrafter) -> None:
        self.inner = inner
        self.vocab_size = int(inner.vocab_size)
        self.max_context: int | None = getattr(inner, "max_context", None)

    def start(self, prefix: list[int]) -> None:
        self.inner.start(prefix)

    def push(self, tokens: list[int]) -> None:
        self.inner.push(tokens)

    def rollback(self, length: int) -> None:
        self.inner.rollback(length)

    def length(self) -> int:
        return self.inner.length()

    def __copy__(self) -> "DrafterWrapper":
        # a copy must not share the per-sequence state of the wrapped drafter (Serve sessions copy a template)
        clone = object.__new__(type(self))
        clone.__dict__.update(self.__dict__)
        clone.inner = copy.copy(self.inner)
        return clone


class NextTokenAdapter(DrafterWrapper, LogitsDrafter):
    """A `NextTokenDrafter` (n-gram, CNN, LSTM state, a test's toy) with block proposal."""

    def next_logits(self) -> torch.Tensor:
        return self.inner.next_logits()


def as_drafter(drafter: Drafter | NextTokenDrafter) -> Drafter:
    """The drafter itself when it proposes blocks, else its logits wrapped in `NextTokenAdapter`."""
    return drafter if isinstance(drafter, Drafter) else NextTokenAdapter(drafter)


def model_vocab_size(model) -> int:
    """Width of the model's logits (the output embedding rows; config.vocab_size as a fallback)."""
    out = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    # out_features first: an int8 layer's `weight` unpacks and dequantises the whole matrix (ms per call)
    if getattr(out, "out_features", None) is not None:
        return int(out.out_features)
    if out is not None and getattr(out, "weight", None) is not None:
        return int(out.weight.shape[0])
    return int(model.config.vocab_size)


def check_same_vocab(
    target_vocab_size: int, drafter: Drafter | NextTokenDrafter, vocab_limit: int | None = None
) -> None:
    """Raise DistilrayError unless the drafter proposes over the target's vocabulary.

    Speculative decoding compares p(d) and q(d) token id by token id, so a drafter with another
    tokenizer would silently give garbage acceptance tests instead of failing. vocab_limit None: the
    widths must be equal. vocab_limit = the number of real tokens (the tokenizer's length), when the
    target's logits are padded past it (T5: 32128 for 32100): the drafter must cover the real tokens
    and may be as wide as the target, i.e. vocab_limit <= drafter width <= target width; the columns
    past vocab_limit are padding that the loop masks.
    """
    drafter_vocab = int(getattr(drafter, "vocab_size", -1))
    target_vocab_size = int(target_vocab_size)
    if vocab_limit is None:
        if drafter_vocab != target_vocab_size:
            raise DistilrayError(
                f"drafter and target vocabularies differ: drafter has {drafter_vocab} tokens, target has "
                f"{target_vocab_size}; both must use the same tokenizer (if the target's logits are padded "
                "past its tokenizer, pass vocab_limit=len(tokenizer))"
            )
        return
    check_vocab_limit(target_vocab_size, vocab_limit)
    if not vocab_limit <= drafter_vocab <= target_vocab_size:
        raise DistilrayError(
            f"drafter and target vocabularies differ: drafter has {drafter_vocab} tokens, the target "
            f"{vocab_limit} real tokens in {target_vocab_size} logit columns; the drafter must use the same "
            f"tokenizer and have between {vocab_limit} and {target_vocab_size} columns"
        )


def check_vocab_limit(width: int, vocab_limit: int | None) -> None:
    """A number of real tokens a model with `width` logit columns can have (None: all of them)."""
    if vocab_limit is not None and not 1 <= int(vocab_limit) <= int(width):
        raise DistilrayError(
            f"vocab_limit (the tokenizer's length) must lie in [1, {width}], the model's logit width; got {vocab_limit}"
        )
