"""Speculative decoding: greedy equivalence, distributional losslessness, adaptive gamma, metrics, errors."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from distilray.decoding.drafter_api import Draft, Drafter, NextTokenAdapter, as_drafter, check_same_vocab
from distilray.decoding.drafters import HFDrafter
from distilray.decoding.sampling import Sampler, SamplingParams, warp
from distilray.decoding.speculative import (
    SpecRecord,
    SpeculativeParams,
    expected_tokens_per_pass,
    optimal_gamma,
    plain_decode,
    plain_generate,
    speculative_decode,
    speculative_generate,
    theoretical_speedup,
)
from distilray.errors import DistilrayError

PROMPTS = [
    "The for statement is used to iterate",
    "A class definition defines a class object",
    "The import statement",
    "Exceptions can be raised",
]
CHI2_CRIT_DOF5_P001 = 20.52  # chi-square critical value, 5 degrees of freedom, p = 0.001


@pytest.fixture(scope="module")
def setup(pydoc_tokenizer, tiny_lm):
    """A tokenizer, a tiny peaky target and an unrelated tiny drafter model over it."""
    tok = pydoc_tokenizer(40, 300)
    return tok, tiny_lm(tok, 0), tiny_lm(tok, 1)


def test_greedy_matches_plain_with_other_drafter(setup):
    tok, target, other = setup
    drafter = HFDrafter(other)
    assert isinstance(drafter, Drafter)
    for i, text in enumerate(PROMPTS):
        ids = tok(text)["input_ids"]
        plain = plain_generate(target, ids, 24)
        assert plain.target_passes == 24
        spec = speculative_generate(target, drafter, ids, 24, gamma=3 + i % 2)
        assert spec.token_ids == plain.token_ids
        assert len(spec.token_ids) == 24
        assert spec.drafted == sum(spec.gamma_history)
        assert spec.target_passes == len(spec.gamma_history)
        # each step emits its accepted drafts plus one target token
        assert len(spec.token_ids) == spec.accepted + spec.target_passes
        assert spec.mean_accepted_length == pytest.approx(24 / spec.target_passes)
        assert spec.alpha == pytest.approx(spec.accepted / (spec.accepted + spec.rejections))
        assert spec.rejections > 0  # an unrelated random drafter must miss sometimes


def test_greedy_self_drafting_accepts_everything(setup):
    tok, target, _ = setup
    gamma = 4
    for text in PROMPTS:
        ids = tok(text)["input_ids"]
        plain = plain_generate(target, ids, 20)
        spec = speculative_generate(target, HFDrafter(target), ids, 20, gamma=gamma)
        assert spec.token_ids == plain.token_ids
        assert spec.alpha == 1.0 and spec.rejections == 0
        assert spec.mean_accepted_length == gamma + 1  # 20 tokens in 4 passes of 5
        # a budget not divisible by gamma + 1: only the last step is shorter
        spec = speculative_generate(target, HFDrafter(target), ids, 22, gamma=gamma)
        assert spec.token_ids == plain_generate(target, ids, 22).token_ids
        assert spec.gamma_history == [4, 4, 4, 4, 1]
        assert spec.target_passes == 5


def test_eos_stops_generation(setup):
    tok, target, other = setup
    ids = tok(PROMPTS[0])["input_ids"]
    plain = plain_generate(target, ids, 20)
    eos = plain.token_ids[5]
    stop = plain.token_ids.index(eos) + 1
    spec = speculative_generate(target, HFDrafter(other), ids, 20, gamma=4, eos_token_id=eos)
    assert spec.token_ids == plain.token_ids[:stop]
    assert plain_generate(target, ids, 20, eos_token_id=eos).token_ids == plain.token_ids[:stop]


def test_adaptive_gamma_moves_within_bounds(setup):
    tok, target, other = setup
    ids = tok(PROMPTS[1])["input_ids"]
    # self-drafting accepts every block: gamma climbs by 2 (transformers' "heuristic" schedule) to gamma_max
    up = speculative_generate(target, HFDrafter(target), ids, 60, gamma=2, adaptive_gamma=True, gamma_max=7)
    assert up.gamma_history[:5] == [2, 4, 6, 7, 7]
    assert max(up.gamma_history) == 7
    # a random drafter is often rejected at the first draft: gamma falls, never below gamma_min
    down = speculative_generate(
        target, HFDrafter(other), ids, 60, gamma=5, adaptive_gamma=True, gamma_min=2, gamma_max=7
    )
    hist = down.gamma_history
    assert all(0 <= g <= 7 for g in hist)
    # only steps starting with fewer than gamma_max + 1 tokens left (at most the last 7) are budget-cut
    free = hist[:-7]
    assert all(g >= 2 for g in free) and min(free) == 2
    assert any(b < a for a, b in zip(free, free[1:]))
    assert down.token_ids == plain_generate(target, ids, 60).token_ids
    # the schedule step by step: +2 after a full block, -1 after any rejection, a budget-cut step keeps it
    method = SpeculativeParams(gamma=4, adaptive_gamma=True, gamma_min=2, gamma_max=7)
    assert [method.next_gamma(4, 4, 4), method.next_gamma(4, 4, 3), method.next_gamma(4, 4, 0)] == [6, 3, 3]
    assert method.next_gamma(7, 7, 7) == 7 and method.next_gamma(2, 2, 1) == 2 and method.next_gamma(4, 2, 0) == 4
    # where to start: the theory's best gamma for the measured alpha and c
    start = SpeculativeParams.from_measurements(alpha=0.8, c=0.05)
    assert start.gamma == optimal_gamma(0.8, 0.05, 8) and start.adaptive_gamma
    assert SpeculativeParams.from_measurements(alpha=0.2, c=0.5, adaptive=False).gamma == 1


class FixedDrafter:
    """A toy drafter with one fixed next-token distribution, whatever the context."""

    def __init__(self, probs: list[float]) -> None:
        self.vocab_size = len(probs)
        self._logits = torch.tensor(probs, dtype=torch.float32).log()
        self._tokens: list[int] = []

    def start(self, prefix: list[int]) -> None:
        self._tokens = list(prefix)

    def next_logits(self) -> torch.Tensor:
        return self._logits.clone()

    def push(self, tokens: list[int]) -> None:
        self._tokens.extend(tokens)

    def rollback(self, length: int) -> None:
        self._tokens = self._tokens[:length]

    def length(self) -> int:
        return len(self._tokens)


@pytest.fixture(scope="module")
def toy_target(scaled):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    config = GPT2Config(
        vocab_size=6,
        n_embd=16,
        n_layer=1,
        n_head=2,
        n_positions=64,
        bos_token_id=None,
        eos_token_id=None,
        pad_token_id=None,
    )
    return scaled(GPT2LMHeadModel(config), 4.0)  # far from uniform: the top token has ~0.37, the bottom ~0.07


def _exact_marginals(
    model, prompt: list[int], steps: int, temperature: float = 1.0, top_p: float = 1.0
) -> list[torch.Tensor]:
    """Exact marginal distribution (6,) of each of the first `steps` generated tokens, by enumeration,
    under the warped target (temperature and nucleus, as `warp` defines them; 1 and 1: the softmax)."""

    def next_probs(seq: list[int]) -> torch.Tensor:
        logits = model(torch.tensor([seq])).logits[0, -1].double()
        if temperature == 1.0 and top_p == 1.0:
            return torch.softmax(logits, -1)
        return warp(logits, temperature, top_p).double()

    marginals = []
    with torch.no_grad():
        for t in range(steps):
            m = torch.zeros(6, dtype=torch.float64)
            for ctx in itertools.product(range(6), repeat=t):
                seq = prompt + list(ctx)
                weight = 1.0
                for j in range(t):  # probability of the context itself
                    weight *= float(next_probs(seq[: len(prompt) + j])[ctx[j]])
                m += weight * next_probs(seq)
            marginals.append(m)
    return marginals


def test_sampling_is_lossless(toy_target):
    prompt, runs, steps = [0, 1], 2000, 3
    drafter = FixedDrafter([0.4, 0.25, 0.05, 0.1, 0.15, 0.05])
    exact = _exact_marginals(toy_target, prompt, steps)
    q = torch.tensor([0.4, 0.25, 0.05, 0.1, 0.15, 0.05], dtype=torch.float64)
    assert 0.5 * float((exact[0] - q).abs().sum()) > 0.25  # drafter and target really differ
    counts = torch.zeros(steps, 6, dtype=torch.float64)
    accepted = rejections = bonus_steps = 0
    for seed in range(runs):
        # gamma 2 with 3 tokens: rejections at draft 1 and 2, full acceptance with a bonus token
        rec = speculative_generate(toy_target, drafter, prompt, steps, gamma=2, temperature=1.0, seed=seed)
        assert len(rec.token_ids) == steps
        for t, tok in enumerate(rec.token_ids):
            counts[t, tok] += 1
        accepted += rec.accepted
        rejections += rec.rejections
        bonus_steps += rec.target_passes - rec.rejections
    assert accepted > 500 and rejections > 500 and bonus_steps > 300  # every path is exercised
    for t in range(steps):
        expected = runs * exact[t]
        assert float(expected.min()) >= 5  # the chi-square approximation holds
        chi2 = float(((counts[t] - expected) ** 2 / expected).sum())
        assert chi2 < CHI2_CRIT_DOF5_P001, (t, counts[t].tolist(), expected.tolist())


@pytest.mark.parametrize("temperature, top_p", [(0.6, 1.0), (1.4, 0.75)])
def test_sampling_is_lossless_for_the_warped_target(toy_target, chi2_fits, one_thread, temperature, top_p):
    """Temperature and nucleus applied to p and q alike: the output follows the *warped* target, tokens
    outside its nucleus never appear (the fixed drafter proposes some of them, the target rejects them)."""
    prompt, runs, steps = [0, 1], 500, 2
    drafter = FixedDrafter([0.4, 0.25, 0.05, 0.1, 0.15, 0.05])
    exact = _exact_marginals(toy_target, prompt, steps, temperature, top_p)
    plain = _exact_marginals(toy_target, prompt, 1)[0]
    assert 0.5 * float((exact[0] - plain).abs().sum()) > 0.05  # the warp really changes the target
    if top_p < 1.0:
        assert (exact[0] == 0).any()  # the nucleus really cuts tokens
    samples: list[list[int]] = [[] for _ in range(steps)]
    accepted = rejections = 0
    for seed in range(runs):
        # budget 2, gamma 2: one draft, then a rejection, or an acceptance and the bonus token
        rec = speculative_generate(
            toy_target, drafter, prompt, steps, gamma=2, temperature=temperature, top_p=top_p, seed=seed
        )
        for t, tok in enumerate(rec.token_ids):
            samples[t].append(tok)
        accepted, rejections = accepted + rec.accepted, rejections + rec.rejections
    assert accepted > 80 and rejections > 80
    for t in range(steps):
        assert chi2_fits(samples[t], exact[t]), (t, torch.bincount(torch.tensor(samples[t]), minlength=6), exact[t])


class PointMassDrafter:
    """Proposes the same tokens at every step, without a distribution (like prompt lookup or a chunk)."""

    needs_target_hidden = False

    def __init__(self, vocab_size: int, block: list[int]) -> None:
        self.vocab_size, self.block, self._tokens = vocab_size, block, []

    def start(self, prefix: list[int]) -> None:
        self._tokens = list(prefix)

    def propose(self, gamma: int, sampler: Sampler, target_hidden=None) -> Draft:
        tokens = self.block[:gamma]
        self._tokens += tokens
        return Draft(tokens)

    def push(self, tokens: list[int]) -> None:
        self._tokens += tokens

    def rollback(self, length: int) -> None:
        self._tokens = self._tokens[:length]

    def length(self) -> int:
        return len(self._tokens)


def test_point_mass_drafts_are_lossless(toy_target):
    """A draft without q is accepted with probability p(d) and corrected from p without d: the first
    three tokens keep the target's exact marginals, whatever the (here fixed, context-blind) drafts."""
    prompt, runs, steps = [0, 1], 2000, 3
    exact = _exact_marginals(toy_target, prompt, steps)
    drafter = PointMassDrafter(6, [int(exact[0].argmax()), 2])  # a likely first draft, then a rare one
    counts = torch.zeros(steps, 6, dtype=torch.float64)
    accepted = rejections = 0
    for seed in range(runs):
        rec = speculative_generate(toy_target, drafter, prompt, steps, gamma=2, temperature=1.0, seed=seed)
        assert len(rec.token_ids) == steps and rec.drafted == sum(rec.gamma_history)
        for t, tok in enumerate(rec.token_ids):
            counts[t, tok] += 1
        accepted += rec.accepted
        rejections += rec.rejections
    assert accepted > 500 and rejections > 500  # both branches of the rule are exercised
    for t in range(steps):
        expected = runs * exact[t]
        chi2 = float(((counts[t] - expected) ** 2 / expected).sum())
        assert chi2 < CHI2_CRIT_DOF5_P001, (t, counts[t].tolist(), expected.tolist())
    greedy = speculative_generate(toy_target, drafter, prompt, 12, gamma=2)
    assert greedy.token_ids == plain_generate(toy_target, prompt, 12).token_ids


def test_formulas_and_record_properties():
    assert expected_tokens_per_pass(1.0, 4) == 5.0
    assert expected_tokens_per_pass(0.0, 4) == 1.0
    assert expected_tokens_per_pass(0.5, 2) == pytest.approx(1.75)
    assert expected_tokens_per_pass(0.8, 5) == pytest.approx((1 - 0.8**6) / 0.2)
    assert theoretical_speedup(0.5, 2, 0.1) == pytest.approx(1.75 / 1.2)
    assert theoretical_speedup(1.0, 4, 0.0) == 5.0
    # by hand: (1 - 0.6^4) / 0.4 = 0.8704 / 0.4; (1 - 0.8^5) / 0.2 = 0.67232 / 0.2
    assert expected_tokens_per_pass(0.6, 3) == pytest.approx(2.176)
    assert expected_tokens_per_pass(0.9, 1) == pytest.approx(1.9)
    assert expected_tokens_per_pass(0.8, 4) == pytest.approx(3.3616)
    assert expected_tokens_per_pass(0.7, 0) == 1.0  # no drafts: one token per pass
    assert theoretical_speedup(0.6, 3, 0.2) == pytest.approx(2.176 / 1.6)  # 1.36
    assert theoretical_speedup(0.8, 4, 0.05) == pytest.approx(3.3616 / 1.2)  # 2.8013
    assert theoretical_speedup(0.9, 2, 0.5) == pytest.approx(2.71 / 2.0)  # a slow drafter: 1.355
    assert theoretical_speedup(0.0, 3, 0.1) == pytest.approx(1 / 1.3)  # a useless drafter slows decoding down
    # optimal gamma, scanned by hand over S(g) = E[tau](g) / (g c + 1):
    # alpha 0.8, c 0.05: S(7) = 3.0823 < S(8) = 3.0921 > S(9) = 3.0780
    assert optimal_gamma(0.8, 0.05) == 8
    # alpha 0.6, c 0.2: S(1) = 1.3333 < S(2) = 1.4 > S(3) = 1.36
    assert optimal_gamma(0.6, 0.2) == 2
    # alpha 0.9, c 0.5: S(2) = 1.355 < S(3) = 1.3756 > S(4) = 1.3650
    assert optimal_gamma(0.9, 0.5) == 3
    assert optimal_gamma(0.0, 0.1) == 1  # every draft wasted: draft as little as allowed
    assert optimal_gamma(0.5, 0.0) == 16 and optimal_gamma(0.5, 0.0, gamma_max=5) == 5  # free drafts: the most
    assert optimal_gamma(1.0, 0.1) == 16  # S(g) = (g + 1) / (0.1 g + 1) grows with g
    rec = SpecRecord(token_ids=[1] * 10, accepted=6, rejections=2, target_passes=4)
    assert rec.alpha == 0.75 and rec.mean_accepted_length == 2.5
    assert math.isnan(SpecRecord().alpha) and math.isnan(SpecRecord().mean_accepted_length)
    with pytest.raises(DistilrayError):
        expected_tokens_per_pass(1.5, 4)


def test_bad_arguments(setup, toy_target):
    tok, target, other = setup
    ids = tok(PROMPTS[0])["input_ids"]
    d = HFDrafter(other)
    bad = [
        dict(max_new_tokens=-1),
        dict(gamma=0),
        dict(gamma=65),
        dict(top_p=1.5),
        dict(top_p=-0.1),
        dict(temperature=-1.0),
        dict(max_new_tokens=600),  # beyond the 512-token context
        dict(adaptive_gamma=True, gamma_min=5, gamma_max=3),
    ]
    for kwargs in bad:
        args = dict(max_new_tokens=4) | kwargs
        with pytest.raises(DistilrayError):
            speculative_generate(target, d, ids, **args)
    with pytest.raises(DistilrayError, match="empty"):
        speculative_generate(target, d, [], 4)
    with pytest.raises(DistilrayError, match="vocabulary"):
        plain_generate(target, [10_000], 4)
    assert speculative_generate(target, d, ids, 0).token_ids == []
    # a drafter over another vocabulary is refused before any work
    with pytest.raises(DistilrayError, match="vocabularies differ"):
        speculative_generate(toy_target, d, [0, 1], 4)
    with pytest.raises(DistilrayError, match="vocabularies differ"):
        check_same_vocab(6, FixedDrafter([0.5, 0.5]))
    check_same_vocab(len(tok), d)


def test_a_drafter_with_a_shorter_context_is_refused_up_front(setup):
    """A 32-position GPT-2 drafter for a 512-position target: a request past 32 tokens is a clear error
    before any work (it used to be an IndexError from the position table mid-generation)."""
    from distilray.models.causal_lm import build_causal_lm

    tok, target, _ = setup
    torch.manual_seed(3)
    short = HFDrafter(build_causal_lm("tiny", tok, n_positions=32).eval())
    assert short.max_context == 32 and HFDrafter(target).max_context == 512
    ids = tok(PROMPTS[0])["input_ids"]
    n = 32 - len(ids)
    with pytest.raises(DistilrayError, match="drafter's context of 32"):
        speculative_generate(target, short, ids, n + 1, gamma=4)
    with pytest.raises(DistilrayError, match="drafter's context"):
        speculative_generate(target, short, ids, n + 1, gamma=4, temperature=1.0)
    # exactly at the limit it works, and stays lossless
    assert speculative_generate(target, short, ids, n, gamma=4).token_ids == plain_generate(target, ids, n).token_ids
    # drafters without positions are unbounded, and a wrapper passes the limit on
    assert as_drafter(FixedDrafter([0.5, 0.5])).max_context is None
    assert NextTokenAdapter(short).max_context == 32


def test_hf_drafter_state(setup):
    tok, _, other = setup
    ids = tok(PROMPTS[2])["input_ids"]
    d = HFDrafter(other)
    d.start(ids)
    first = d.next_logits().clone()
    d.push([5, 6, 7])
    assert d.length() == len(ids) + 3
    d.next_logits()
    d.rollback(len(ids))  # back to the prefix: the logits must be those of the prefix again
    assert torch.allclose(d.next_logits(), first, atol=1e-4)
    with pytest.raises(DistilrayError):
        d.rollback(0)


def test_on_token_sees_every_token_as_it_is_emitted(setup):
    """The streaming hook: each generated token, in order, from the speculative and the plain loop."""
    tok, target, other = setup
    ids = tok(PROMPTS[0])["input_ids"]
    for decode in (
        lambda hook: speculative_decode(target, HFDrafter(other), ids, SamplingParams(16), on_token=hook),
        lambda hook: plain_decode(target, ids, SamplingParams(16, temperature=1.0, seed=3), on_token=hook),
    ):
        seen: list[int] = []
        record = decode(seen.append)
        assert seen == record.token_ids and len(seen) == 16


def test_sampling_through_a_remote_drafter_session_is_lossless(toy_target, chi2_fits, one_thread, tmp_path):
    """The Serve composition's arithmetic without Serve: a RemoteDrafter proxy whose drafts and q rows come
    from a DrafterSessions session (own generator seeded per step, q rows shipped as float32), at a
    temperature and nucleus other than 1; the output still follows the warped target."""
    from distilray.models.ngram import NGramDrafter
    from distilray.serve_apps.speculative_drafter import DrafterSessions, RemoteDrafter

    NGramDrafter(2, 6).fit([[0, 1, 2, 0, 1, 3, 4, 0, 5, 1, 2, 2]]).save(tmp_path / "ngram2")
    sessions = DrafterSessions("ngram2", str(tmp_path / "ngram2"))
    prompt, runs, steps, temperature, top_p = [0, 1], 500, 2, 1.4, 0.75
    exact = _exact_marginals(toy_target, prompt, steps, temperature, top_p)
    samples: list[list[int]] = [[] for _ in range(steps)]
    accepted = rejections = 0
    for seed in range(runs):
        proxy = RemoteDrafter(sessions.step, sessions.end, 6)
        rec = speculative_generate(
            toy_target, proxy, prompt, steps, gamma=2, temperature=temperature, top_p=top_p, seed=seed
        )
        proxy.close()
        for t, tok in enumerate(rec.token_ids):
            samples[t].append(tok)
        accepted, rejections = accepted + rec.accepted, rejections + rec.rejections
    assert accepted > 50 and rejections > 50 and sessions.info()["sessions"] == 0
    for t in range(steps):
        assert chi2_fits(samples[t], exact[t]), (t, torch.bincount(torch.tensor(samples[t]), minlength=6), exact[t])
