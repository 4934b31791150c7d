"""The masked-diffusion pieces: schedule, SUBS, antithetic times, masking, NELBO, categorical draws and
one ancestral step (reference/sdtt.md 1)."""

from __future__ import annotations

import math

import pytest
import torch

from distilray.errors import DistilrayError
from distilray.losses.mdlm import (
    NEG_INF,
    SCHEDULE_EPS,
    alpha,
    ancestral_step,
    ancestral_step_probs,
    categorical,
    mask_tokens,
    move_chance,
    nelbo,
    nelbo_weight,
    sample_times,
    sigma,
    subs_log_probs,
)

MASK = 9  # vocabulary of 10, the last id is [MASK]


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_schedule_hand_values() -> None:
    t = torch.tensor([0.5], dtype=torch.float64)
    assert move_chance(t).item() == pytest.approx(0.4995)
    assert alpha(t).item() == pytest.approx(0.5005)
    assert sigma(t).item() == pytest.approx(-math.log(0.5005))
    assert torch.exp(-sigma(t)).item() == pytest.approx(alpha(t).item())
    assert nelbo_weight(t).item() == pytest.approx(2.0)


def test_nelbo_weight_is_one_over_t() -> None:
    t = torch.linspace(1e-5, 1.0, 1001, dtype=torch.float64)
    torch.testing.assert_close(nelbo_weight(t), 1 / t)
    # and it is -alpha'_t / (1 - alpha_t), alpha' taken by finite differences
    h = 1e-7
    t = torch.tensor([0.1, 0.3, 0.9], dtype=torch.float64)
    d_alpha = (alpha(t + h) - alpha(t - h)) / (2 * h)
    torch.testing.assert_close(nelbo_weight(t), -d_alpha / (1 - alpha(t)))


@pytest.mark.parametrize("eps_s", [1e-5, 1e-3])
def test_sdtt_times_are_one_rotated_lattice(eps_s: float) -> None:
    n = 16
    t = sample_times(n, _gen(3), eps_s, form="sdtt")
    assert t.dtype == torch.float32
    t = t.double()
    assert t.shape == (n,) and bool((t >= eps_s).all()) and bool((t < 1).all())
    gaps = t.sort().values.diff()
    torch.testing.assert_close(gaps, torch.full_like(gaps, (1 - eps_s) / n), atol=1e-6, rtol=0)
    t_prime = (t - eps_s) / (1 - eps_s)
    offsets = torch.remainder(t_prime - torch.arange(n) / n, 1.0)  # one shared uniform u, up to wrapping at 1
    spread = torch.remainder(offsets - offsets[0] + 0.5, 1.0) - 0.5
    assert float(spread.abs().max()) < 1e-5


def test_mdlm_times_have_one_point_per_stratum() -> None:
    n, eps_s = 8, 1e-3
    t = sample_times(n, _gen(4), eps_s, form="mdlm")
    assert t.dtype == torch.float32
    stratum = torch.floor((t - eps_s) / (1 - eps_s) * n)
    assert stratum.tolist() == list(range(n))
    offsets = (t - eps_s) / (1 - eps_s) * n - stratum
    assert len(set(offsets.tolist())) == n  # one uniform per sample, not a shared one


def test_sample_times_rejects_bad_form() -> None:
    with pytest.raises(DistilrayError, match="form"):
        sample_times(4, _gen(), 1e-5, form="uniform")  # type: ignore[arg-type]


def test_subs_rows_are_log_distributions_and_unmasked_rows_one_hot() -> None:
    logits = torch.randn(2, 6, 10, generator=_gen(1)).to(torch.bfloat16)
    z = torch.tensor([[MASK, 3, MASK, 0, MASK, 8], [MASK] * 6])
    log_probs = subs_log_probs(logits, z, MASK)
    assert log_probs.dtype == torch.float32 and log_probs.shape == (2, 6, 10)
    torch.testing.assert_close(log_probs.logsumexp(-1), torch.zeros(2, 6), atol=1e-5, rtol=0)
    masked = z == MASK
    assert bool((log_probs[masked][:, MASK] < -1e5).all())  # a clean token is never [MASK]
    unmasked_rows = log_probs[~masked]  # (n, V)
    expected = torch.full_like(unmasked_rows, NEG_INF).scatter(-1, z[~masked].unsqueeze(-1), 0.0)
    assert torch.equal(unmasked_rows, expected)
    assert bool(torch.isfinite(log_probs).all())


def test_mask_tokens_masks_the_move_chance_share() -> None:
    x = torch.randint(0, MASK, (4, 20_000), generator=_gen(2))
    t = torch.tensor([0.05, 0.3, 0.7, 1.0])
    z = mask_tokens(x, t, MASK, _gen(5))
    share = (z == MASK).double().mean(-1)
    torch.testing.assert_close(share, move_chance(t).double(), atol=0.01, rtol=0)
    assert torch.equal(z[z != MASK], x[z != MASK])


def test_nelbo_hand_value_counts_all_tokens() -> None:
    x = torch.tensor([[1, 2, 3], [4, 5, 6]])
    z = torch.tensor([[MASK, 2, 3], [MASK, MASK, 6]])
    t = torch.tensor([0.5, 0.25])
    log_probs = torch.full((2, 3, 10), -5.0)
    log_probs[0, 0, 1] = -1.0
    log_probs[1, 0, 4] = -2.0
    log_probs[1, 1, 5] = -3.0
    expected = (2.0 * 1.0 + 4.0 * (2.0 + 3.0)) / 6  # weights 1/t; six tokens, three masked
    assert nelbo(log_probs, x, z, t, MASK).item() == pytest.approx(expected, rel=1e-4)
    assert nelbo(log_probs, x, x, t, MASK).item() == 0.0  # nothing masked, nothing to predict


@pytest.mark.parametrize("float64", [True, False])
def test_categorical_never_picks_a_zero_probability_category(float64: bool) -> None:
    probs = torch.tensor([0.7, 1e-12, 0.0, 0.3 - 1e-12]).expand(200_000, 4)
    draws = categorical(probs, _gen(6), float64=float64)
    assert draws.dtype == torch.long and draws.shape == (200_000,)
    assert not bool((draws == 2).any())
    counts = torch.bincount(draws, minlength=4).double() / draws.numel()
    assert counts[0].item() == pytest.approx(0.7, abs=0.005)


def test_categorical_tolerates_unnormalised_rows() -> None:
    probs = torch.tensor([[2.0, 6.0, 0.0]]).expand(100_000, 3)
    share = (categorical(probs, _gen(7)) == 1).double().mean().item()
    assert share == pytest.approx(0.75, abs=0.01)


def _log_probs_all_masked(batch: int, length: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    z = torch.full((batch, length), MASK)
    return subs_log_probs(torch.randn(batch, length, 10, generator=_gen(seed)), z, MASK), z


def test_ancestral_probs_sum_to_one_and_keep_the_mask_share() -> None:
    log_probs, _ = _log_probs_all_masked(2, 5, 8)
    t, s = torch.tensor([0.8, 0.5]), torch.tensor([0.6, 0.1])
    probs = ancestral_step_probs(log_probs, t, s, MASK)
    torch.testing.assert_close(probs.sum(-1), torch.ones(2, 5, dtype=torch.float64))
    torch.testing.assert_close(probs[..., MASK], (s / t).double().unsqueeze(-1).expand(2, 5))
    real = probs[..., :MASK] / probs[..., :MASK].sum(-1, keepdim=True)  # revealed tokens follow x_theta
    torch.testing.assert_close(real, log_probs[..., :MASK].double().exp())


def test_ancestral_step_reveals_t_minus_s_over_t_in_expectation() -> None:
    log_probs, z = _log_probs_all_masked(1, 50_000, 9)
    t, s = 0.6, 0.45
    z_s = ancestral_step(log_probs, z, t, s, MASK, _gen(10))
    assert (z_s != MASK).double().mean().item() == pytest.approx((t - s) / t, abs=0.01)


def test_ancestral_step_copies_unmasked_tokens() -> None:
    z = torch.tensor([[MASK, 4, MASK, 7]])
    log_probs = subs_log_probs(torch.randn(1, 4, 10, generator=_gen(11)), z, MASK)
    z_s = ancestral_step(log_probs, z, 0.5, 0.0, MASK, _gen(12))
    assert z_s[0, 1].item() == 4 and z_s[0, 3].item() == 7
    assert not bool((z_s == MASK).any())  # s = 0: everything revealed


def test_ancestral_step_below_zero_reveals_everything() -> None:
    log_probs, z = _log_probs_all_masked(1, 2_000, 13)
    probs = ancestral_step_probs(log_probs, 0.002, 0.002 - 0.005, MASK)  # the original grid's s < 0
    assert float(probs[..., MASK].max()) == 0.0
    torch.testing.assert_close(probs.sum(-1), torch.ones(1, 2_000, dtype=torch.float64))
    assert not bool((ancestral_step(log_probs, z, 0.002, -0.003, MASK, _gen(14)) == MASK).any())


def test_schedule_eps_default() -> None:
    assert SCHEDULE_EPS == 1e-3
