"""What every decoder shares about choosing tokens (reference/speculative.md 2): the sampling parameters,
the warp (temperature, nucleus), seeded sampling, and the speculative acceptance rule with its residual.

The acceptance rule, for a draft token d sampled from q where the target says p:
accept with probability min(1, p(d) / q(d)); on rejection draw from norm(max(0, p - q)). Every emitted
token is then distributed as p. A draft without a distribution is a point mass (q = one-hot at d): it is
accepted with probability p(d), and the residual is p with d zeroed, renormalised.

Padded vocabularies (reference/speculative.md 1): a model may emit more logit columns than its
tokenizer has tokens (T5: 32128 logits for 32100 tokens). `vocab_limit`, the number of real tokens,
masks the columns past it to -inf before every softmax, so no padded id is ever drafted, accepted or
sampled; a drafter over the real tokens only has its q rows padded with zeros to the target's width.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from distilray.errors import DistilrayError


@dataclass(frozen=True)
class SamplingParams:
    """How one generation samples and when it stops, whatever the decoding method."""

    max_new_tokens: int
    temperature: float = 0.0  # 0: greedy (argmax)
    top_p: float = 1.0  # nucleus: keep the smallest top set holding top_p of the mass
    seed: int = 0  # of the generation's one torch.Generator (unused when greedy)
    eos_token_id: int | None = None  # generation stops after this token

    def __post_init__(self) -> None:
        if self.max_new_tokens < 0:
            raise DistilrayError(f"max_new_tokens must be >= 0, got {self.max_new_tokens}")
        if not (math.isfinite(self.temperature) and self.temperature >= 0.0):
            raise DistilrayError(f"temperature must be >= 0, got {self.temperature}")
        if not 0.0 <= self.top_p <= 1.0:  # also rejects NaN
            raise DistilrayError(f"top_p must lie in [0, 1], got {self.top_p}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def mask_padded(logits: torch.Tensor, vocab_limit: int | None) -> torch.Tensor:
    """logits (..., V) with the columns >= vocab_limit set to -inf (a copy); as they are when None or >= V."""
    if vocab_limit is None or vocab_limit >= logits.shape[-1]:
        return logits
    if vocab_limit < 1:
        raise DistilrayError(f"vocab_limit must be >= 1, got {vocab_limit}")
    masked = logits.clone()
    masked[..., vocab_limit:] = float("-inf")
    return masked


def pad_columns(probs: torch.Tensor, width: int) -> torch.Tensor:
    """probs (..., V) -> (..., width) with zeros appended: a drafter over the real tokens only, seen at
    the target's (padded) width, proposes the padded ids with probability 0."""
    extra = width - probs.shape[-1]
    if extra < 0:
        raise DistilrayError(f"cannot pad {probs.shape[-1]} columns to {width}")
    return torch.nn.functional.pad(probs, (0, extra)) if extra else probs


def warp(logits: torch.Tensor, temperature: float, top_p: float = 1.0, vocab_limit: int | None = None) -> torch.Tensor:
    """logits (..., V) -> probabilities (..., V) float32 after temperature and nucleus (top-p) filtering.

    Temperature 0 gives a one-hot argmax. The same transform must be applied to p and q so that the
    acceptance test targets the warped target distribution. Columns >= vocab_limit (padding past the
    tokenizer) get probability 0.
    """
    logits = mask_padded(logits.float(), vocab_limit)
    if temperature == 0:
        return torch.nn.functional.one_hot(logits.argmax(-1), logits.shape[-1]).float()
    # A tiny positive temperature (1e-30) must tend to the argmax, not NaN: logits / T overflows to
    # inf (inf - inf = NaN in the softmax), and T may even round to 0 in float32 (0 / 0). Shifting the
    # top logit to 0 and dividing in float64 leaves 0 for the top and <= 0 (at worst -inf) elsewhere.
    shifted = logits.double() - logits.max(dim=-1, keepdim=True).values.double()
    probs = torch.softmax(shifted / temperature, dim=-1).float()
    if top_p < 1.0:
        sorted_p, order = probs.sort(dim=-1, descending=True)
        # keep a token while the mass strictly before it is below top_p; the top token always stays
        before = sorted_p.cumsum(-1) - sorted_p
        keep_sorted = before < top_p
        keep_sorted[..., 0] = True
        keep = torch.zeros_like(keep_sorted).scatter(-1, order, keep_sorted)
        probs = torch.where(keep, probs, torch.zeros_like(probs))
        probs = probs / probs.sum(-1, keepdim=True)
    return probs


def sample_token(probs: torch.Tensor, generator: torch.Generator | None) -> int:
    """One token from probs (V,) of any float dtype; argmax when greedy (no generator)."""
    if generator is None:
        return int(probs.argmax())
    return int(torch.multinomial(probs, 1, generator=generator))


def residual(p: torch.Tensor, q: torch.Tensor | None, token: int) -> torch.Tensor:
    """norm(max(0, p - q)) (V,) after `token` was rejected; q None is the point mass at `token`.

    p == q leaves nothing, so a rejection is then only a rounding artefact: fall back to p.
    """
    if q is None:
        rest = p.clone()
        rest[token] = 0.0  # p - one_hot(token), clamped: p(token) <= 1 drops to 0, the rest stays
    else:
        rest = torch.clamp(p - q.to(p.dtype), min=0.0)
    total = rest.sum()
    return rest / total if total > 0 else p


class Sampler:
    """The sampling state of one generation: its parameters and its one seeded CPU generator.

    Every random draw of a generation (drafts, acceptance tests, corrections) comes from this generator,
    so a seed reproduces the whole generation on one machine.
    """

    def __init__(self, params: SamplingParams, vocab_limit: int | None = None) -> None:
        self.params = params
        self.vocab_limit = vocab_limit  # real tokens: logit columns from here on are padding (None: none)
        self.generator = None if params.greedy else torch.Generator(device="cpu").manual_seed(params.seed)

    @property
    def greedy(self) -> bool:
        return self.generator is None

    def warp(self, logits: torch.Tensor) -> torch.Tensor:
        """logits (..., V) on any device -> warped probabilities (..., V) float32 on the CPU, padding masked."""
        return warp(logits.cpu(), self.params.temperature, self.params.top_p, self.vocab_limit)

    def sample(self, probs: torch.Tensor) -> int:
        return sample_token(probs, self.generator)

    def accept(self, p: torch.Tensor, token: int, q: torch.Tensor | None) -> bool:
        """The speculative test of a draft `token`: p, q (V,) warped; q None is a point mass.

        Greedy: accepted exactly when the token is p's argmax (p is one-hot). Sampling: u * q(d) <= p(d)
        with u ~ U[0, 1), i.e. probability min(1, p/q), compared in float64 without dividing.
        """
        if self.generator is None:
            return bool(p[token] == 1.0)
        u = float(torch.rand((), generator=self.generator))
        q_token = 1.0 if q is None else float(q[token])
        return u * q_token <= float(p[token])

    def child_seed(self) -> int:
        """A seed drawn from this generation's generator, for a sampler in another process (0 when greedy)."""
        return 0 if self.generator is None else int(torch.randint(0, 2**62, (1,), generator=self.generator))


def reached_stop(token_ids: list[int], params: SamplingParams) -> bool:
    """True when generation must stop after the tokens so far: budget spent or EOS last."""
    eos = params.eos_token_id
    return len(token_ids) >= params.max_new_tokens or (eos is not None and bool(token_ids) and token_ids[-1] == eos)
