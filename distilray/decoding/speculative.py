"""Speculative decoding with any `Drafter` and a Hugging Face causal LM target (reference/speculative.md 2-4).

Encoder-decoder targets (T5) work too: pass `encoder_ids` (the source text); the encoder runs once
and `prompt_ids` is the decoder prefix, usually [decoder_start_token_id] (see decoding/seq2seq.py).

One step: the drafter proposes gamma tokens from its warped distribution q, one target forward pass
over (uncached tokens + drafts) gives p_1..p_{gamma+1}, drafts are accepted left to right with
probability min(1, p/q), the first rejection is replaced by a sample from norm(max(0, p - q)) and a
fully accepted block earns a bonus token from p_{gamma+1}. Every emitted token is distributed as the
warped target distribution; greedy output equals greedy target decoding.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from distilray.decoding.drafter_api import Drafter, check_same_vocab, model_vocab_size
from distilray.decoding.seq2seq import check_encoder_ids, decoder_forward, run_encoder
from distilray.errors import DistilrayError
from distilray.models.causal_lm import check_prompt

MAX_GAMMA = 64


@dataclass
class SpecRecord:
    """Counters of one generation (reference/speculative.md 4); plain decoding leaves the draft counters at 0."""

    token_ids: list[int] = field(default_factory=list)  # generated tokens only
    drafted: int = 0  # D: drafted tokens, summed over steps
    accepted: int = 0  # A: accepted drafts that were emitted
    rejections: int = 0  # R: steps that ended in a rejection
    target_passes: int = 0  # V: target forward passes (the prompt prefill is the first one)
    drafter_calls: int = 0  # drafter next_logits calls
    gamma_history: list[int] = field(default_factory=list)  # draft length of each step
    seconds: float = 0.0

    @property
    def alpha(self) -> float:
        """alpha_hat = A / (A + R), the i.i.d. maximum-likelihood acceptance rate (nan when untested)."""
        tested = self.accepted + self.rejections
        return self.accepted / tested if tested else float("nan")

    @property
    def mean_accepted_length(self) -> float:
        """Generated tokens per target pass (tau_bar, bonus included); nan without passes."""
        return len(self.token_ids) / self.target_passes if self.target_passes else float("nan")


def warp(logits: torch.Tensor, temperature: float, top_p: float = 1.0) -> torch.Tensor:
    """logits (..., V) -> probabilities (..., V) float32 after temperature and nucleus (top-p) filtering.

    Temperature 0 gives a one-hot argmax. The same transform must be applied to p and q so that the
    acceptance test targets the warped target distribution.
    """
    logits = logits.float()
    if temperature == 0:
        return torch.nn.functional.one_hot(logits.argmax(-1), logits.shape[-1]).float()
    probs = torch.softmax(logits / temperature, dim=-1)
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


class _Target:
    """The target LM and its KV cache: the cache holds every emitted token except the `pending` ones.

    With `encoder_ids` (encoder-decoder targets) the encoder runs once here and the cache is the
    decoder's EncoderDecoderCache, whose get_seq_length/crop see only the self-attention half.
    """

    def __init__(self, model, encoder_ids: list[int] | None = None) -> None:
        self.model = model
        self.device = next(model.parameters()).device
        self.cache = None
        self.passes = 0
        self.encoder_outputs = run_encoder(model, encoder_ids) if encoder_ids is not None else None

    @torch.inference_mode()
    def feed(self, tokens: list[int], keep: int) -> torch.Tensor:
        """One forward over `tokens` (n,) after the cache; returns logits (keep, V) float32 of the last positions."""
        ids = torch.tensor([tokens], dtype=torch.long, device=self.device)  # (1, n)
        if self.encoder_outputs is not None:
            out = decoder_forward(self.model, self.encoder_outputs, ids, self.cache)
        else:
            out = self.model(input_ids=ids, past_key_values=self.cache, use_cache=True)
        self.cache = out.past_key_values
        self.passes += 1
        return out.logits[0, -keep:].float()

    def keep_first(self, length: int) -> None:
        """Drop cached positions beyond `length`; crop takes a negative count (transformers 5.x)."""
        extra = self.cache.get_seq_length() - length
        if extra > 0:
            self.cache.crop(-extra)


def _validate(model, prompt_ids: list[int], max_new_tokens: int, gamma: int, temperature: float, top_p: float,
              encoder_ids: list[int] | None = None) -> None:
    if not 1 <= gamma <= MAX_GAMMA:
        raise DistilrayError(f"gamma must lie in [1, {MAX_GAMMA}], got {gamma}")
    if not 0.0 <= top_p <= 1.0:  # also rejects NaN
        raise DistilrayError(f"top_p must lie in [0, 1], got {top_p}")
    if not temperature >= 0.0:
        raise DistilrayError(f"temperature must be >= 0, got {temperature}")
    check_prompt(model, prompt_ids, max_new_tokens)
    check_encoder_ids(model, encoder_ids)


def sample_token(probs: torch.Tensor, generator: torch.Generator | None) -> int:
    """One token from probs (V,); argmax when greedy (no generator)."""
    if generator is None:
        return int(probs.argmax())
    return int(torch.multinomial(probs, 1, generator=generator))


def _emit(record: SpecRecord, token: int, budget: int, eos: int | None) -> bool:
    """Append one generated token; True when generation must stop (budget spent or EOS)."""
    record.token_ids.append(token)
    return len(record.token_ids) >= budget or (eos is not None and token == eos)


def propose(drafter: Drafter, g: int, temperature: float, top_p: float, generator: torch.Generator | None) -> tuple[list[int], list[torch.Tensor]]:
    """Draft g tokens and push them onto the drafter: (drafts, warped q (V,) of each draft, on CPU).

    A drafter may implement `propose` itself (same signature minus the drafter) to draft a whole
    block in one call, e.g. a drafter in another process answering one round trip per step; it must
    sample each draft from the q it returns.
    """
    own = getattr(drafter, "propose", None)
    if own is not None:
        return own(g, temperature, top_p, generator)
    drafts: list[int] = []
    q_probs: list[torch.Tensor] = []
    for _ in range(g):
        q = warp(drafter.next_logits().cpu(), temperature, top_p)
        d = sample_token(q, generator)
        drafts.append(d)
        q_probs.append(q)
        drafter.push([d])
    return drafts, q_probs


@torch.inference_mode()
def speculative_generate(
    target,
    drafter: Drafter,
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
) -> SpecRecord:
    """Continue `prompt_ids` by up to `max_new_tokens` tokens, lossless w.r.t. warp(target, temperature, top_p).

    Adaptive gamma adds 1 after a fully accepted block and subtracts 1 after a rejection of the first
    draft, within [gamma_min, gamma_max]. Drafts never run past the token budget.
    Encoder-decoder target: `encoder_ids` is the source (required), `prompt_ids` the decoder prefix,
    and the drafter proposes decoder tokens (an `HFSeq2SeqDrafter` holds its own encoding of the source).
    """
    _validate(target, prompt_ids, max_new_tokens, gamma, temperature, top_p, encoder_ids)
    own_source = getattr(drafter, "encoder_ids", None)
    if own_source is not None and encoder_ids is not None and list(own_source) != [int(t) for t in encoder_ids]:
        raise DistilrayError("the drafter was built for another source text (its encoder_ids differ from the target's)")
    if adaptive_gamma:
        if not 1 <= gamma_min <= gamma_max <= MAX_GAMMA:
            raise DistilrayError(f"need 1 <= gamma_min <= gamma_max <= {MAX_GAMMA}, got {gamma_min}, {gamma_max}")
        gamma = min(max(gamma, gamma_min), gamma_max)
    check_same_vocab(model_vocab_size(target), drafter)
    record = SpecRecord()
    start = time.perf_counter()
    if max_new_tokens == 0:
        return record
    lm = _Target(target, encoder_ids)
    greedy = temperature == 0
    generator = None if greedy else torch.Generator(device="cpu").manual_seed(seed)
    prompt = [int(t) for t in prompt_ids]
    drafter.start(prompt)
    pending = list(prompt)  # emitted tokens not yet in the target cache
    while True:
        n_before = len(prompt) + len(record.token_ids)  # tokens in the sequence before this step
        # drafting past the budget is wasted work, and keeps the target inside its context
        g = min(gamma, max_new_tokens - len(record.token_ids) - 1)
        drafts, q_probs = propose(drafter, g, temperature, top_p, generator)
        record.drafter_calls += g
        cached = lm.cache.get_seq_length() if lm.cache is not None else 0
        # one pass: p_1..p_{g+1}, p_i = p(. | sequence, d_<i)
        p_probs = warp(lm.feed(pending + drafts, keep=g + 1).cpu(), temperature, top_p)  # (g+1, V)
        record.drafted += g
        record.gamma_history.append(g)
        k = 0
        while k < g:
            d = drafts[k]
            if greedy:
                ok = bool(p_probs[k, d] == 1.0)  # d == argmax p_k
            else:
                r = torch.rand((), generator=generator)
                ok = bool(r * q_probs[k][d] <= p_probs[k, d])  # r <= p/q without dividing
            if not ok:
                break
            k += 1
        stopped = False
        for d in drafts[:k]:
            record.accepted += 1
            if _emit(record, d, max_new_tokens, eos_token_id):
                stopped = True
                break
        if stopped:
            break
        if k < g:
            record.rejections += 1
            residual = torch.clamp(p_probs[k] - q_probs[k], min=0.0)
            total = residual.sum()
            # p == q leaves nothing, so a rejection is then only a rounding artefact: fall back to p
            y = sample_token(residual / total if total > 0 else p_probs[k], generator)
        else:
            y = sample_token(p_probs[g], generator)  # bonus token
        if adaptive_gamma and g == gamma:
            if k == g:
                gamma = min(gamma + 1, gamma_max)
            elif k == 0:
                gamma = max(gamma - 1, gamma_min)
        if _emit(record, y, max_new_tokens, eos_token_id):
            break
        # keep the accepted drafts' keys and values, drop the rejected ones; y is fed next step
        lm.keep_first(cached + len(pending) + k)
        pending = [y]
        drafter.rollback(n_before + k)
        drafter.push([y])
    record.target_passes = lm.passes
    record.seconds = time.perf_counter() - start
    return record


@torch.inference_mode()
def plain_generate(
    target,
    prompt_ids: list[int],
    max_new_tokens: int,
    temperature: float = 0.0,
    top_p: float = 1.0,
    seed: int = 0,
    eos_token_id: int | None = None,
    encoder_ids: list[int] | None = None,
) -> SpecRecord:
    """The KV-cached baseline: one target pass per generated token (the prefill yields the first).

    Encoder-decoder target: `encoder_ids` is the source (encoded once), `prompt_ids` the decoder prefix.
    """
    _validate(target, prompt_ids, max_new_tokens, 1, temperature, top_p, encoder_ids)
    record = SpecRecord()
    start = time.perf_counter()
    if max_new_tokens > 0:
        lm = _Target(target, encoder_ids)
        generator = None if temperature == 0 else torch.Generator(device="cpu").manual_seed(seed)
        pending = [int(t) for t in prompt_ids]
        while True:
            probs = warp(lm.feed(pending, keep=1)[0].cpu(), temperature, top_p)  # (V,)
            y = sample_token(probs, generator)
            if _emit(record, y, max_new_tokens, eos_token_id):
                break
            pending = [y]
        record.target_passes = lm.passes
    record.seconds = time.perf_counter() - start
    return record


def optimal_gamma(alpha: float, c: float, gamma_max: int = 16) -> int:
    """The gamma in [1, gamma_max] that maximises the theoretical speedup (reference/speculative.md 3)."""
    return max(range(1, gamma_max + 1), key=lambda g: theoretical_speedup(alpha, g, c))
