"""SDTT: divergences against hand values on V = 3, the teacher time grids, targets from stub teachers,
and the round schedule (reference/sdtt.md 2, 4)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from distilray.errors import DistilrayError
from distilray.losses.mdlm import NEG_INF
from distilray.losses.sdtt import (
    DIVERGENCES,
    delta_for_round,
    num_rounds,
    reveal_fractions,
    sampling_steps_for_round,
    sdtt_loss,
    teacher_targets,
    teacher_times,
)

P_S = [0.2, 0.3, 0.5]  # student
P_T = [0.5, 0.25, 0.25]  # target


def _pair() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(1, 3, 3) student and target log-probs; position 1 is not masked and holds unrelated rows."""
    a = torch.log(torch.tensor([[P_S, [0.9, 0.05, 0.05], P_S]]))
    b = torch.log(torch.tensor([[P_T, [0.05, 0.05, 0.9], P_T]]))
    mask = torch.tensor([[True, False, True]])
    return a, b, mask


def _hand(name: str) -> float:
    p, q = P_S, P_T
    m = [(x + y) / 2 for x, y in zip(p, q)]
    return {
        "kld": sum(x * math.log(x / y) for x, y in zip(p, q)),
        "kl-fwd": sum(y * math.log(y / x) for x, y in zip(p, q)),
        "mse": sum(math.log(x / y) ** 2 for x, y in zip(p, q)) / 3,
        "tvd": 0.5 * sum(abs(x - y) for x, y in zip(p, q)),
        "l1-log": sum(abs(math.log(x / y)) for x, y in zip(p, q)),
        "jsd": 0.5 * sum(x * math.log(x / z) for x, z in zip(p, m))
        + 0.5 * sum(y * math.log(y / z) for y, z in zip(q, m)),
    }[name]


@pytest.mark.parametrize("name", DIVERGENCES)
def test_divergences_by_hand_over_masked_positions(name):
    a, b, mask = _pair()
    assert sdtt_loss(name, a, b, mask).item() == pytest.approx(_hand(name), rel=1e-5)


def test_tvd_is_a_real_total_variation_and_l1_log_is_the_original_tvd():
    a, b, mask = _pair()
    assert sdtt_loss("tvd", a, b, mask).item() == pytest.approx(0.3, abs=1e-6)
    assert sdtt_loss("l1-log", a, b, mask).item() != pytest.approx(0.3, abs=1e-2)


def test_kld_matches_the_original_kl_div_and_gradient_flows():
    logits = torch.randn(2, 4, 5, requires_grad=True)
    a = F.log_softmax(logits, dim=-1)
    b = F.log_softmax(torch.randn(2, 4, 5), dim=-1)
    mask = torch.tensor([[True, False, True, True], [False, True, False, False]])
    loss = sdtt_loss("kld", a, b, mask)
    want = F.kl_div(b[mask], a[mask], log_target=True, reduction="batchmean")
    assert loss.item() == pytest.approx(want.item(), rel=1e-5)
    loss.backward()
    assert torch.isfinite(logits.grad).all() and logits.grad[mask].abs().sum() > 0
    assert logits.grad[~mask].abs().sum() == 0  # unmasked positions do not enter the loss


@pytest.mark.parametrize("name", DIVERGENCES)
def test_log_zero_entries_give_finite_values_and_gradients(name):
    # SUBS rows: the [MASK] column is log 0, as NEG_INF from the model or -inf from elsewhere.
    logits = torch.tensor([[[0.1, 0.7, 0.0]]], requires_grad=True)
    a = F.log_softmax(logits, dim=-1) + torch.tensor([0.0, 0.0, NEG_INF])
    b = torch.tensor([[[math.log(0.4), math.log(0.6), -math.inf]]])
    loss = sdtt_loss(name, a, b, torch.tensor([[True]]))
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(logits.grad).all()


def test_empty_mask_gives_zero_with_grad():
    logits = torch.randn(1, 3, 4, requires_grad=True)
    a = F.log_softmax(logits, dim=-1)
    loss = sdtt_loss("kld", a, a.detach(), torch.zeros(1, 3, dtype=torch.bool))
    assert loss.item() == 0.0 and loss.requires_grad
    loss.backward()
    assert (logits.grad == 0).all()


def test_bad_divergence_names_fail_loudly():
    a, b, mask = _pair()
    with pytest.raises(DistilrayError, match="kl-bwd"):
        sdtt_loss("kl-bwd", a, b, mask)
    with pytest.raises(DistilrayError):
        sdtt_loss(64, a, b, mask)  # the original silently ignored a non-string (pitfall 3)
    with pytest.raises(DistilrayError, match="differ"):
        sdtt_loss("kld", a, b[..., :2], mask)


# --- teacher grid ---------------------------------------------------------------------------------------------


def test_corrected_grid_times():
    times = teacher_times(torch.tensor([0.5, 0.001]), delta=0.01, num_teacher_steps=3, eps_s=1e-5)
    want = torch.tensor([[0.5, 0.001], [0.49, 1e-5], [0.48, 1e-5]])
    assert times.dtype == torch.float32
    torch.testing.assert_close(times, want)


@pytest.mark.parametrize("m", [2, 3])
def test_original_grid_reproduces_the_reference_formula(m):
    t = torch.tensor([0.3, 0.5, 0.8], dtype=torch.float64)
    delta = 1 / 1024
    times = teacher_times(t, delta, m, grid="original")
    space = torch.linspace(1, 0, m, dtype=torch.float64)
    want = (t * space[:, None] + (1 - t) * (t - m * delta)).clamp_min(1e-5).float()
    torch.testing.assert_close(times, want, rtol=0, atol=0)
    if m == 2:  # ts[0] = t + (1 - t)(t - 2 delta) > t, ts[1] = (1 - t)(t - 2 delta)
        torch.testing.assert_close(times[0].double(), t + (1 - t) * (t - 2 * delta))
        torch.testing.assert_close(times[1].double(), (1 - t) * (t - 2 * delta))
        assert (times[0].double() > t).all()


def test_reveal_fractions_match_the_note():
    corrected = reveal_fractions(0.5, 1 / 1024)
    original = reveal_fractions(0.5, 1 / 1024, grid="original")
    assert [round(f, 4) for f in corrected] == [0.0020, 0.0020]
    assert [round(f, 4) for f in original] == [0.0013, 0.0039]
    assert sum(original) / sum(corrected) == pytest.approx(1.34, abs=0.01)


@pytest.mark.parametrize("t", [0.9999, 2.5 / 1024, 1.5 / 1024, 1e-5])
def test_original_grid_edge_cases_reveal_everything(t):
    # Near t = 1 or below ~3 delta the second step ends below 0: every masked token is revealed.
    assert reveal_fractions(t, 1 / 1024, grid="original")[1] == 1.0
    assert reveal_fractions(0.5, 1 / 1024, grid="original")[1] < 1.0


def test_grid_and_step_count_are_validated():
    with pytest.raises(DistilrayError, match="grid"):
        teacher_times(torch.tensor([0.5]), 0.01, grid="fixed")
    with pytest.raises(DistilrayError, match="num_teacher_steps"):
        teacher_times(torch.tensor([0.5]), 0.01, num_teacher_steps=0)


# --- teacher targets ------------------------------------------------------------------------------------------

V, MASK = 5, 4  # 4 real tokens, [MASK] = 4


def _dist(probs: list[float]) -> torch.Tensor:
    """A SUBS-like row (V,): log-probs of the real tokens, NEG_INF at [MASK]."""
    return torch.tensor([*map(math.log, probs), NEG_INF])


class CountingTeacher:
    """Log-probs independent of position; call k returns dists[k]; records its inputs."""

    def __init__(self, *dists: torch.Tensor):
        self.dists, self.inputs = dists, []

    def __call__(self, z: torch.Tensor) -> torch.Tensor:
        self.inputs.append(z.clone())
        row = self.dists[min(len(self.inputs) - 1, len(self.dists) - 1)]
        return row.expand(*z.shape, V).clone()


def test_targets_of_a_fixed_teacher_and_excluded_clean_positions():
    d = _dist([0.1, 0.2, 0.3, 0.4])
    z_t = torch.tensor([[0, MASK, 2, MASK], [MASK, MASK, MASK, 1]])
    targets, masked = teacher_targets(
        CountingTeacher(d), z_t, torch.tensor([0.5, 0.9]), 0.1, MASK, torch.Generator().manual_seed(0)
    )
    assert targets.shape == (2, 4, V) and targets.dtype == torch.float32
    torch.testing.assert_close(masked, z_t == MASK)
    torch.testing.assert_close(targets[masked], d.expand(int(masked.sum()), V))
    assert (targets[~masked] == 0).all()


def test_positions_take_the_prediction_of_the_step_that_revealed_them():
    d0, d1 = _dist([0.7, 0.1, 0.1, 0.1]), _dist([0.1, 0.1, 0.1, 0.7])
    teacher = CountingTeacher(d0, d1)
    z_t = torch.full((2, 64), MASK)
    z_t[:, :4] = 3  # a clean prefix
    targets, masked = teacher_targets(
        teacher, z_t, torch.tensor([1.0, 1.0]), 0.5, MASK, torch.Generator().manual_seed(1)
    )
    assert len(teacher.inputs) == 2
    torch.testing.assert_close(teacher.inputs[0], z_t)  # step 0 sees z_t
    step0 = masked & (teacher.inputs[1] != MASK)  # revealed at step 0: step 1 sees them clean
    later = masked & ~step0  # revealed at step 1, or still masked: the last step's prediction
    assert step0.sum() > 10 and later.sum() > 10  # reveal share 0.5 at t = 1, delta = 0.5
    torch.testing.assert_close(targets[step0], d0.expand(int(step0.sum()), V))
    torch.testing.assert_close(targets[later], d1.expand(int(later.sum()), V))
    assert (targets[~masked] == 0).all()


@pytest.mark.parametrize(("grid", "share"), [("corrected", 0.1 / 0.5), ("original", 0.1 / (0.5 + 0.5 * 0.3))])
def test_first_step_reveal_share_follows_the_grid(grid, share):
    teacher = CountingTeacher(_dist([0.25] * 4))
    z_t = torch.full((4, 5000), MASK)
    teacher_targets(teacher, z_t, torch.full((4,), 0.5), 0.1, MASK, torch.Generator().manual_seed(2), grid=grid)
    revealed = (teacher.inputs[1] != MASK).float().mean().item()
    assert revealed == pytest.approx(share, abs=0.01)


def test_targets_are_reproducible_for_a_seed():
    d0, d1 = _dist([0.7, 0.1, 0.1, 0.1]), _dist([0.1, 0.1, 0.1, 0.7])
    z_t = torch.full((2, 32), MASK)
    args = (z_t, torch.tensor([0.6, 0.8]), 0.3, MASK)
    first, _ = teacher_targets(CountingTeacher(d0, d1), *args, torch.Generator().manual_seed(5))
    second, _ = teacher_targets(CountingTeacher(d0, d1), *args, torch.Generator().manual_seed(5))
    torch.testing.assert_close(first, second, rtol=0, atol=0)


# --- rounds ---------------------------------------------------------------------------------------------------


def test_round_schedule():
    delta_0 = (1 - 1e-5) / 1024
    assert delta_for_round(0) == pytest.approx(delta_0)
    assert delta_for_round(6) == pytest.approx(delta_0 * 64)
    # The student of round r (checkpoint at step 10,000 (r + 1)) samples with 1024 / 2^(r + 1) steps.
    assert [sampling_steps_for_round(r) for r in range(7)] == [512, 256, 128, 64, 32, 16, 8]
    # ... which is one step of the size m * delta_r its teacher took in m steps.
    for r in range(7):
        assert sampling_steps_for_round(r) * 2 * delta_for_round(r) == pytest.approx(1 - 1e-5)
    assert num_rounds() == 7
    assert num_rounds(1024, 4, 16) == 3  # 256, 64, 16
    with pytest.raises(DistilrayError):
        sampling_steps_for_round(10)
    with pytest.raises(DistilrayError):
        delta_for_round(-1)
