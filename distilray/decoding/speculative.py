"""Speculative decoding with any `Drafter` and a Hugging Face causal LM target (reference/speculative.md 2-4).

Encoder-decoder targets (T5) work too: pass `encoder_ids` (the source text); the encoder runs once
and `prompt_ids` is the decoder prefix, usually [decoder_start_token_id] (see decoding/seq2seq.py).

One step: the drafter proposes up to gamma tokens from its warped distribution q (or as point masses),
one target forward pass over (uncached tokens + drafts) gives p_1..p_{g+1}, drafts are accepted left
to right with probability min(1, p/q), the first rejection is replaced by a sample from
norm(max(0, p - q)) and a fully accepted block earns a bonus token from p_{g+1}. Every emitted token is
distributed as the warped target distribution; greedy output equals greedy target decoding.
The rule itself (warp, test, residual) is decoding/sampling.py; CD-LM `verify` runs through this same
loop with a chunk drafter (decoding/chunk_drafter.py).

Padded vocabularies (T5, Pythia: more logit columns than tokenizer tokens): pass `vocab_limit`, the
tokenizer's length. The target's columns from there on are masked to -inf before every softmax (so
greedy and sampled output never holds a padded id), and a drafter over the real tokens only (n-gram,
CNN, LSTM: sized to len(tokenizer)) has its q rows padded with zeros to the target's width.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from distilray.decoding.cached_model import CachedModel
from distilray.decoding.drafter_api import (
    Draft,
    Drafter,
    NextTokenDrafter,
    as_drafter,
    check_same_vocab,
    check_vocab_limit,
    model_vocab_size,
)
from distilray.decoding.sampling import Sampler, SamplingParams, pad_columns, reached_stop, residual
from distilray.decoding.seq2seq import check_encoder_ids
from distilray.errors import DistilrayError
from distilray.models.causal_lm import check_prompt

MAX_GAMMA = 64
TokenHook = Callable[[int], None]  # called with each generated token as it is emitted (streaming)


@dataclass(frozen=True)
class SpeculativeParams:
    """The draft-length policy. Adaptive gamma is transformers' "heuristic" schedule
    (reference/speculative.md 6): +2 after a fully accepted block, -1 after any rejection, within
    [gamma_min, gamma_max]; `from_measurements` starts it where the theory puts the best gamma."""

    gamma: int = 4
    adaptive_gamma: bool = False
    gamma_min: int = 1
    gamma_max: int = 8

    def __post_init__(self) -> None:
        if not 1 <= self.gamma <= MAX_GAMMA:
            raise DistilrayError(f"gamma must lie in [1, {MAX_GAMMA}], got {self.gamma}")
        if self.adaptive_gamma and not 1 <= self.gamma_min <= self.gamma_max <= MAX_GAMMA:
            raise DistilrayError(
                f"need 1 <= gamma_min <= gamma_max <= {MAX_GAMMA}, got {self.gamma_min}, {self.gamma_max}"
            )

    def first_gamma(self) -> int:
        return min(max(self.gamma, self.gamma_min), self.gamma_max) if self.adaptive_gamma else self.gamma

    def next_gamma(self, gamma: int, drafted: int, accepted: int) -> int:
        """The draft length after a step that drafted `drafted` tokens and accepted `accepted` of them."""
        if not self.adaptive_gamma or drafted != gamma:  # a budget-cut step says nothing about the drafter
            return gamma
        if accepted == drafted:
            return min(gamma + 2, self.gamma_max)
        return max(gamma - 1, self.gamma_min)

    @classmethod
    def from_measurements(
        cls, alpha: float, c: float, adaptive: bool = True, gamma_max: int = 8
    ) -> "SpeculativeParams":
        """The gamma that maximises the theoretical speedup for a measured acceptance rate alpha and cost
        ratio c (`optimal_gamma`), adapted from there by the schedule when `adaptive`."""
        gamma = optimal_gamma(min(max(alpha, 0.0), 1.0), c, gamma_max)
        return cls(gamma=gamma, adaptive_gamma=adaptive, gamma_min=1, gamma_max=gamma_max)


@dataclass
class SpecRecord:
    """Counters of one generation (reference/speculative.md 4); plain decoding leaves the draft counters at 0."""

    token_ids: list[int] = field(default_factory=list)  # generated tokens only
    from_draft: list[bool] = field(default_factory=list)  # per generated token: an accepted draft
    drafted: int = 0  # D: drafted tokens, summed over steps
    accepted: int = 0  # A: accepted drafts that were emitted
    rejections: int = 0  # R: steps that ended in a rejection
    target_passes: int = 0  # V: target forward passes (the prompt prefill is the first one)
    drafter_calls: int = 0  # drafted tokens asked of the drafter (one next_logits call each for logits drafters)
    gamma_history: list[int] = field(default_factory=list)  # draft length of each step
    seconds: float = 0.0
    on_token: TokenHook | None = field(default=None, repr=False, compare=False)  # sees each token as emitted

    @property
    def alpha(self) -> float:
        """alpha_hat = A / (A + R), the i.i.d. maximum-likelihood acceptance rate (nan when untested)."""
        tested = self.accepted + self.rejections
        return self.accepted / tested if tested else float("nan")

    @property
    def mean_accepted_length(self) -> float:
        """Generated tokens per target pass (tau_bar, bonus included); nan without passes."""
        return len(self.token_ids) / self.target_passes if self.target_passes else float("nan")

    def emit(self, token: int, params: SamplingParams, drafted: bool = False) -> bool:
        """Append one generated token; True when generation must stop (budget spent or EOS)."""
        self.token_ids.append(token)
        self.from_draft.append(drafted)
        self.accepted += drafted
        if self.on_token is not None:
            self.on_token(token)
        return reached_stop(self.token_ids, params)


def expected_tokens_per_pass(alpha: float, gamma: int) -> float:
    """E[tau] = (1 - alpha^(gamma+1)) / (1 - alpha): tokens per target pass under i.i.d. acceptance."""
    if not 0.0 <= alpha <= 1.0:
        raise DistilrayError(f"alpha must lie in [0, 1], got {alpha}")
    if gamma < 0:
        raise DistilrayError(f"gamma must be >= 0, got {gamma}")
    if alpha == 1.0:
        return float(gamma + 1)
    return (1.0 - alpha ** (gamma + 1)) / (1.0 - alpha)


def theoretical_speedup(alpha: float, gamma: int, c: float) -> float:
    """S = E[tau] / (gamma * c + 1), with c = drafter step time / target step time."""
    if c < 0:
        raise DistilrayError(f"the cost ratio c must be >= 0, got {c}")
    return expected_tokens_per_pass(alpha, gamma) / (gamma * c + 1.0)


def optimal_gamma(alpha: float, c: float, gamma_max: int = 16) -> int:
    """The gamma in [1, gamma_max] that maximises the theoretical speedup (reference/speculative.md 3)."""
    return max(range(1, gamma_max + 1), key=lambda g: theoretical_speedup(alpha, g, c))


def check_request(
    model,
    prompt_ids: list[int],
    params: SamplingParams,
    encoder_ids: list[int] | None = None,
    vocab_limit: int | None = None,
) -> None:
    """A prompt (and source) the target can decode within its context: a clear error otherwise."""
    check_prompt(model, prompt_ids, params.max_new_tokens)
    check_encoder_ids(model, encoder_ids)
    check_vocab_limit(model_vocab_size(model), vocab_limit)
    if vocab_limit is not None and any(int(t) >= vocab_limit for t in prompt_ids):
        raise DistilrayError(f"a prompt token id is a padded id, past the tokenizer's {vocab_limit} tokens")


def check_drafter_context(drafter: Drafter, prompt_ids: list[int], params: SamplingParams) -> None:
    """Refuse up front a request longer than the drafter's context (its `max_context`, None: unbounded).

    Refused rather than slid: a drafter with learned positions would have to re-encode its whole window
    at every step once it slides (each token's position changes), costing more than it saves, and a
    clear error beats an IndexError from its position table mid-generation.
    """
    limit = getattr(drafter, "max_context", None)
    if limit is not None and len(prompt_ids) + params.max_new_tokens > limit:
        raise DistilrayError(
            f"prompt ({len(prompt_ids)} tokens) + max_new_tokens ({params.max_new_tokens}) exceeds the "
            f"drafter's context of {limit}; ask for fewer tokens or decode without this drafter"
        )


@torch.inference_mode()
def speculative_decode(
    target,
    drafter: Drafter | NextTokenDrafter,
    prompt_ids: list[int],
    params: SamplingParams,
    method: SpeculativeParams = SpeculativeParams(),
    encoder_ids: list[int] | None = None,
    vocab_limit: int | None = None,
    on_token: TokenHook | None = None,
) -> SpecRecord:
    """Continue `prompt_ids` by up to params.max_new_tokens tokens, lossless w.r.t. the warped target.

    Drafts never run past the token budget. Encoder-decoder target: `encoder_ids` is the source
    (required), `prompt_ids` the decoder prefix, and the drafter proposes decoder tokens (an
    `HFSeq2SeqDrafter` holds its own encoding of the source). vocab_limit: the tokenizer's length when
    the target's logits are padded past it (None: every column is a token); see check_same_vocab.
    on_token sees each generated token as it is emitted (a server streams with it).
    """
    check_request(target, prompt_ids, params, encoder_ids, vocab_limit)
    own_source = getattr(drafter, "encoder_ids", None)
    if own_source is not None and encoder_ids is not None and list(own_source) != [int(t) for t in encoder_ids]:
        raise DistilrayError("the drafter was built for another source text (its encoder_ids differ from the target's)")
    drafter = as_drafter(drafter)
    check_same_vocab(model_vocab_size(target), drafter, vocab_limit)
    check_drafter_context(drafter, prompt_ids, params)
    record = SpecRecord(on_token=on_token)
    start = time.perf_counter()
    if params.max_new_tokens > 0:
        sampler = Sampler(params, vocab_limit)
        _loop(CachedModel(target, encoder_ids), drafter, [int(t) for t in prompt_ids], sampler, method, record)
    record.seconds = time.perf_counter() - start
    return record


def _loop(
    lm: CachedModel,
    drafter: Drafter,
    prompt: list[int],
    sampler: Sampler,
    method: SpeculativeParams,
    record: SpecRecord,
) -> None:
    """The steps of one generation, from the prefill to the budget or EOS; fills `record`."""
    params = sampler.params
    budget, gamma = params.max_new_tokens, method.first_gamma()
    hidden = drafter.needs_target_hidden
    target_hidden = None  # (d,) at the last position the target has processed
    drafter.start(prompt)
    pending = list(prompt)  # emitted tokens not yet in the target cache
    while True:
        n_before = len(prompt) + len(record.token_ids)  # tokens in the sequence before this step
        # drafting past the budget is wasted work, and keeps the target inside its context
        asked = min(gamma, budget - len(record.token_ids) - 1)
        draft = drafter.propose(asked, sampler, target_hidden)
        g = len(draft.tokens)  # a drafter may propose fewer (a chunk drafter, nothing on a miss)
        if g > asked:
            raise DistilrayError(f"the drafter proposed {g} tokens where at most {asked} were asked for")
        record.drafter_calls += g
        cached = lm.length()
        # one pass: p_1..p_{g+1}, p_i = p(. | sequence, d_<i)
        fed = lm.feed(pending + draft.tokens, keep=g + 1, hidden=hidden)
        p_probs = sampler.warp(fed.logits)  # (g+1, V), padded ids masked
        if draft.probs is not None:  # a drafter over the real tokens only gives the padded ids q = 0
            draft = Draft(draft.tokens, pad_columns(draft.probs, p_probs.shape[-1]))  # q rows (g, V)
        record.drafted += g
        record.gamma_history.append(g)
        k = 0
        while k < g and sampler.accept(p_probs[k], draft.tokens[k], draft.q(k)):
            k += 1
        if any(record.emit(d, params, drafted=True) for d in draft.tokens[:k]):
            break
        if k < g:
            record.rejections += 1
            y = sampler.sample(residual(p_probs[k], draft.q(k), draft.tokens[k]))
        else:
            y = sampler.sample(p_probs[g])  # bonus token
        gamma = method.next_gamma(gamma, g, k)
        if record.emit(y, params):
            break
        # keep the accepted drafts' keys and values, drop the rejected ones; y is fed next step
        lm.crop(cached + len(pending) + k)
        target_hidden = fed.hidden[k] if fed.hidden is not None else None  # the last kept position
        pending = [y]
        drafter.rollback(n_before + k)
        drafter.push([y])
    record.target_passes = lm.passes


def speculative_generate(
    target,
    drafter: Drafter | NextTokenDrafter,
    prompt_ids: list[int],
    max_new_tokens: int,
    gamma: int = 4,
    temperature: float = 0.0,
    top_p: float = 1.0,
    seed: int = 0,
    eos_token_id: int | None = None,
    adaptive_gamma: bool = False,
    gamma_min: int = 1,
    gamma_max: int = 8,
    encoder_ids: list[int] | None = None,
    vocab_limit: int | None = None,
) -> SpecRecord:
    """`speculative_decode` with its parameters as keywords."""
    params = SamplingParams(max_new_tokens, temperature, top_p, seed, eos_token_id)
    method = SpeculativeParams(gamma, adaptive_gamma, gamma_min, gamma_max)
    return speculative_decode(target, drafter, prompt_ids, params, method, encoder_ids, vocab_limit)


@torch.inference_mode()
def plain_decode(
    target,
    prompt_ids: list[int],
    params: SamplingParams,
    encoder_ids: list[int] | None = None,
    vocab_limit: int | None = None,
    on_token: TokenHook | None = None,
) -> SpecRecord:
    """The KV-cached baseline: one target pass per generated token (the prefill yields the first).

    Encoder-decoder target: `encoder_ids` is the source (encoded once), `prompt_ids` the decoder prefix.
    vocab_limit: the tokenizer's length when the logits are padded past it (those columns are masked).
    """
    check_request(target, prompt_ids, params, encoder_ids, vocab_limit)
    record = SpecRecord(on_token=on_token)
    start = time.perf_counter()
    if params.max_new_tokens > 0:
        lm, sampler = CachedModel(target, encoder_ids), Sampler(params, vocab_limit)
        pending = [int(t) for t in prompt_ids]
        while True:
            y = sampler.sample(sampler.warp(lm.feed(pending).logits[0]))
            if record.emit(y, params):
                break
            pending = [y]
        record.target_passes = lm.passes
    record.seconds = time.perf_counter() - start
    return record


def plain_generate(
    target,
    prompt_ids: list[int],
    max_new_tokens: int,
    temperature: float = 0.0,
    top_p: float = 1.0,
    seed: int = 0,
    eos_token_id: int | None = None,
    encoder_ids: list[int] | None = None,
    vocab_limit: int | None = None,
) -> SpecRecord:
    """`plain_decode` with its parameters as keywords."""
    params = SamplingParams(max_new_tokens, temperature, top_p, seed, eos_token_id)
    return plain_decode(target, prompt_ids, params, encoder_ids, vocab_limit)
