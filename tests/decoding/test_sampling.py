"""The shared sampling pieces: parameters, warp, the acceptance test and the residual (point masses included)."""

from __future__ import annotations

import math

import pytest
import torch

from distilray.decoding.sampling import (
    Sampler,
    SamplingParams,
    pad_columns,
    reached_stop,
    residual,
    sample_token,
    warp,
)
from distilray.errors import DistilrayError


def test_warp():
    logits = torch.tensor([2.0, 1.0, 0.0, -1.0])
    assert warp(logits, 0.0).tolist() == [1.0, 0.0, 0.0, 0.0]
    p = warp(logits, 1.0)
    assert torch.allclose(p, torch.softmax(logits, -1))
    nucleus = warp(logits, 1.0, top_p=0.9)  # top two hold 0.881 < 0.9: the third is kept, not the fourth
    assert nucleus[3] == 0 and nucleus[2] > 0 and math.isclose(float(nucleus.sum()), 1.0, rel_tol=1e-6)
    assert warp(logits, 1.0, top_p=0.0).tolist() == [1.0, 0.0, 0.0, 0.0]
    assert warp(logits.repeat(3, 1), 0.5).shape == (3, 4)


@pytest.mark.parametrize("temperature", [1e-8, 1e-30, 1e-38, 1e-45, 5e-324])
def test_tiny_temperatures_tend_to_the_argmax_without_nan(temperature):
    """logits / T overflows (or T rounds to 0 in float32): the warp must still be a distribution, the
    limit of softmax(logits / T) as T -> 0: the argmax, or the tied maxima shared equally."""
    for scale in (1.0, 1e9):  # ordinary logits, and logits whose ratio to 1e-30 overflows float32
        logits = scale * torch.tensor([[2.0, 1.0, 0.5, -1.0], [0.0, 3.0, 3.0, float("-inf")]])
        for top_p in (1.0, 0.5):
            probs = warp(logits, temperature, top_p)
            assert torch.isfinite(probs).all(), (temperature, scale, top_p)
            torch.testing.assert_close(probs[0], torch.tensor([1.0, 0.0, 0.0, 0.0]))
            assert probs[1, 1] > 0 and probs[1, 0] == probs[1, 3] == 0 and float(probs[1].sum()) == pytest.approx(1.0)
        torch.testing.assert_close(warp(logits, temperature)[1], torch.tensor([0.0, 0.5, 0.5, 0.0]))
    sampler = Sampler(SamplingParams(1, temperature=temperature, seed=0))
    assert sampler.sample(sampler.warp(torch.tensor([0.3, 2.5, -4.0]))) == 1


def test_vocab_limit_masks_padded_columns():
    logits = torch.tensor([1.0, 0.0, 5.0, 9.0])  # the last two columns are padding past a 2-token vocabulary
    assert warp(logits, 0.0, vocab_limit=2).tolist() == [1.0, 0.0, 0.0, 0.0]
    probs = warp(logits, 1.0, vocab_limit=2)
    torch.testing.assert_close(probs, torch.cat([torch.softmax(logits[:2], -1), torch.zeros(2)]))
    torch.testing.assert_close(warp(logits, 1.0, vocab_limit=4), torch.softmax(logits, -1))  # nothing padded
    sampler = Sampler(SamplingParams(1, temperature=1.0, seed=0), vocab_limit=2)
    assert all(sampler.sample(sampler.warp(logits)) < 2 for _ in range(200))
    torch.testing.assert_close(pad_columns(torch.tensor([[0.25, 0.75]]), 4), torch.tensor([[0.25, 0.75, 0.0, 0.0]]))


def test_params_are_checked():
    for bad in (
        dict(max_new_tokens=-1),
        dict(temperature=-0.1),
        dict(temperature=float("inf")),
        dict(temperature=float("nan")),
        dict(top_p=1.5),
        dict(top_p=float("nan")),
    ):
        with pytest.raises(DistilrayError, match=next(iter(bad))):
            SamplingParams(**{"max_new_tokens": 4, **bad})
    params = SamplingParams(4, eos_token_id=7)
    assert params.greedy and not SamplingParams(4, temperature=0.5).greedy
    assert not reached_stop([1, 2], params) and reached_stop([1, 7], params) and reached_stop([1, 2, 3, 4], params)


def test_point_mass_residual_is_p_without_the_token():
    """max(0, p - one_hot(d)) renormalised: exactly p with d zeroed, for a float32 or float64 p."""
    for dtype in (torch.float32, torch.float64):
        p = torch.tensor([0.5, 0.3, 0.2], dtype=dtype)
        rest = residual(p, None, 0)
        assert rest.dtype == dtype
        torch.testing.assert_close(rest, torch.tensor([0.0, 0.6, 0.4], dtype=dtype))
        torch.testing.assert_close(rest, residual(p, torch.tensor([1.0, 0.0, 0.0]), 0))
    p = torch.tensor([0.5, 0.3, 0.2])
    torch.testing.assert_close(residual(p, torch.tensor([0.2, 0.6, 0.2]), 1), torch.tensor([1.0, 0.0, 0.0]))
    assert torch.equal(residual(p, p.clone(), 1), p)  # p == q: nothing left, fall back to p
    assert residual(torch.tensor([0.0, 1.0]), None, 1).tolist() == [0.0, 1.0]  # a sure token: p again


def test_acceptance_rates():
    """A point-mass draft is accepted with probability p(d); a sampled one with min(1, p(d) / q(d))."""
    p = torch.tensor([0.25, 0.75])
    sampler = Sampler(SamplingParams(1, temperature=1.0, seed=3))
    n = 4000
    point = sum(sampler.accept(p, 0, None) for _ in range(n)) / n
    sampled = sum(sampler.accept(p, 0, torch.tensor([0.5, 0.5])) for _ in range(n)) / n
    always = sum(sampler.accept(p, 1, torch.tensor([0.5, 0.5])) for _ in range(n)) / n
    assert abs(point - 0.25) < 0.03 and abs(sampled - 0.5) < 0.03 and always == 1.0
    greedy = Sampler(SamplingParams(1))
    one_hot = warp(torch.tensor([0.1, 2.0]), 0.0)
    assert greedy.accept(one_hot, 1, None) and not greedy.accept(one_hot, 0, None)
    assert greedy.child_seed() == 0 and sample_token(one_hot, None) == 1


def test_sampler_is_reproducible():
    def draws(seed: int) -> list[int]:
        sampler = Sampler(SamplingParams(1, temperature=1.0, seed=seed))
        return [sampler.sample(torch.full((50,), 0.02, dtype=torch.float64)) for _ in range(20)]

    assert draws(1) == draws(1) != draws(2)
