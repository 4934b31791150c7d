"""Distillation divergences against hand-computed values on 2-3 token vocabularies."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from distilray.errors import DistilrayError
from distilray.losses.distillation import distillation_loss, forward_kl, jsd, reverse_kl, tvd

# log-probabilities as logits: softmax returns them exactly.
P = torch.tensor([[math.log(0.5), math.log(0.5)]])
Q = torch.tensor([[math.log(0.25), math.log(0.75)]])


def test_forward_and_reverse_kl_by_hand():
    fkl = 0.5 * math.log(0.5 / 0.25) + 0.5 * math.log(0.5 / 0.75)
    rkl = 0.25 * math.log(0.25 / 0.5) + 0.75 * math.log(0.75 / 0.5)
    assert forward_kl(P, Q).item() == pytest.approx(fkl, abs=1e-6)
    assert reverse_kl(P, Q).item() == pytest.approx(rkl, abs=1e-6)
    assert forward_kl(P, Q).item() != pytest.approx(rkl, abs=1e-4)  # KL is not symmetric


def test_jsd_and_tvd_by_hand():
    m = [0.375, 0.625]
    kl_pm = 0.5 * math.log(0.5 / m[0]) + 0.5 * math.log(0.5 / m[1])
    kl_qm = 0.25 * math.log(0.25 / m[0]) + 0.75 * math.log(0.75 / m[1])
    assert jsd(P, Q).item() == pytest.approx(0.5 * kl_pm + 0.5 * kl_qm, abs=1e-6)
    assert tvd(P, Q).item() == pytest.approx(0.25, abs=1e-6)
    # beta != 0.5: m = 0.2 p + 0.8 q
    m2 = [0.2 * 0.5 + 0.8 * 0.25, 0.2 * 0.5 + 0.8 * 0.75]
    want = 0.2 * sum(a * math.log(a / b) for a, b in zip([0.5, 0.5], m2)) + 0.8 * sum(
        a * math.log(a / b) for a, b in zip([0.25, 0.75], m2)
    )
    assert jsd(P, Q, beta=0.2).item() == pytest.approx(want, abs=1e-6)


def test_three_token_vocab_with_masked_id_and_mean_over_rows():
    p = torch.tensor([[math.log(0.2), math.log(0.3), math.log(0.5)], [0.0, 0.0, float("-inf")]])
    q = torch.tensor([[math.log(0.5), math.log(0.3), math.log(0.2)], [math.log(0.25), math.log(0.75), float("-inf")]])
    row0 = 0.2 * math.log(0.2 / 0.5) + 0.5 * math.log(0.5 / 0.2)
    row1 = 0.5 * math.log(0.5 / 0.25) + 0.5 * math.log(0.5 / 0.75)
    got = forward_kl(p, q)
    assert torch.isfinite(got)
    assert got.item() == pytest.approx((row0 + row1) / 2, abs=1e-6)
    assert tvd(p, q).item() == pytest.approx((0.3 + 0.25) / 2, abs=1e-6)


def test_zero_when_equal_and_symmetry():
    torch.manual_seed(0)
    a, b = torch.randn(4, 7), torch.randn(4, 7)
    for fn in (forward_kl, reverse_kl, jsd, tvd):
        assert fn(a, a).item() == pytest.approx(0.0, abs=1e-6)
        assert fn(a, b).item() > 0
    assert jsd(a, b).item() == pytest.approx(jsd(b, a).item(), abs=1e-6)
    assert tvd(a, b).item() == pytest.approx(tvd(b, a).item(), abs=1e-6)
    assert forward_kl(a, b).item() == pytest.approx(reverse_kl(b, a).item(), abs=1e-6)


def test_temperature_divides_logits_without_t_squared():
    a, b = torch.tensor([[2.0, 0.0]]), torch.tensor([[0.0, 2.0]])
    assert forward_kl(a, b, temperature=2.0).item() == pytest.approx(forward_kl(a / 2, b / 2).item(), abs=1e-6)
    # higher T flattens both distributions, so they get closer
    assert tvd(a, b, temperature=4.0).item() < tvd(a, b).item()
    t1 = 1 / (1 + math.exp(-2.0))  # softmax([2, 0])[0]
    assert tvd(a, b).item() == pytest.approx(abs(t1 - (1 - t1)), abs=1e-6)
    with pytest.raises(DistilrayError):
        tvd(a, b, temperature=0.0)


def test_distillation_loss_mixes_cross_entropy():
    torch.manual_seed(1)
    teacher, student = torch.randn(2, 3, 5), torch.randn(2, 3, 5)
    targets = torch.tensor([[1, 2, -100], [0, 4, 3]])
    kd = forward_kl(teacher, student, temperature=2.0)
    ce = F.cross_entropy(student.reshape(-1, 5), targets.reshape(-1), ignore_index=-100)
    got = distillation_loss("fkl", teacher, student, temperature=2.0, ce_weight=0.5, targets=targets)
    assert got.item() == pytest.approx((kd + 0.5 * ce).item(), abs=1e-6)
    assert distillation_loss("forward_kl", teacher, student, 2.0).item() == pytest.approx(kd.item(), abs=1e-7)
    for kind, fn in (("rkl", reverse_kl), ("jsd", jsd), ("tvd", tvd)):
        assert distillation_loss(kind, teacher, student).item() == pytest.approx(fn(teacher, student).item())
    # gradients flow to the student only through the loss
    s = student.clone().requires_grad_(True)
    distillation_loss("jsd", teacher, s, ce_weight=1.0, targets=targets).backward()
    assert s.grad is not None and torch.isfinite(s.grad).all()


def test_errors():
    a = torch.zeros(2, 3)
    with pytest.raises(DistilrayError, match="unknown distillation loss"):
        distillation_loss("mse", a, a)
    with pytest.raises(DistilrayError, match="targets"):
        distillation_loss("fkl", a, a, ce_weight=1.0)
    with pytest.raises(DistilrayError):
        forward_kl(a, torch.zeros(2, 4))
    with pytest.raises(DistilrayError):
        jsd(a, a, beta=1.0)


def _grads(fn, p_logits: torch.Tensor, q_logits: torch.Tensor, **kwargs) -> tuple[torch.Tensor, ...]:
    p, q = p_logits.clone().requires_grad_(True), q_logits.clone().requires_grad_(True)
    loss = fn(p, q, **kwargs)
    gp, gq = torch.autograd.grad(loss, (p, q))
    return loss.detach(), gp, gq


@pytest.mark.parametrize("fn", [forward_kl, reverse_kl, jsd, tvd])
def test_masked_logits_give_finite_gradients_equal_to_the_unmasked_vocabulary(fn):
    """-inf columns in teacher and student (padded ids): the value and the gradients of the real columns
    are those of the loss over the real columns alone, and the masked columns get a zero gradient."""
    torch.manual_seed(3)
    real_p, real_q = torch.randn(3, 5), torch.randn(3, 5)
    pad = torch.full((3, 2), float("-inf"))
    masked_p, masked_q = torch.cat([real_p, pad], -1), torch.cat([real_q, pad], -1)
    masked_p[1, 0] = masked_q[1, 0] = float("-inf")  # a real id masked in both, inside the vocabulary
    for temperature in (1.0, 2.0):
        loss, gp, gq = _grads(fn, masked_p, masked_q, temperature=temperature)
        assert torch.isfinite(loss) and torch.isfinite(gp).all() and torch.isfinite(gq).all()
        assert (gp[:, 5:] == 0).all() and (gq[:, 5:] == 0).all() and gp[1, 0] == 0 and gq[1, 0] == 0
        want, want_gp, want_gq = _grads(fn, masked_p[:, :5], masked_q[:, :5], temperature=temperature)
        torch.testing.assert_close(loss, want)
        torch.testing.assert_close(gp[:, :5], want_gp)
        torch.testing.assert_close(gq[:, :5], want_gq)
        assert gq.abs().sum() > 0  # the student does learn
        # vocab_limit drops the padded columns: the same loss and gradients
        limited, lgp, lgq = _grads(fn, masked_p, masked_q, temperature=temperature, vocab_limit=5)
        torch.testing.assert_close(limited, loss)
        torch.testing.assert_close(lgq, gq)
        torch.testing.assert_close(lgp, gp)


@pytest.mark.parametrize(
    "fn, side", [(forward_kl, "teacher"), (reverse_kl, "student"), (jsd, "teacher"), (jsd, "student"), (tvd, "both")]
)
def test_a_masked_id_on_one_side_keeps_gradients_finite(fn, side):
    """Where the divergence stays finite with an id masked on one side only, so do its gradients."""
    torch.manual_seed(4)
    p, q = torch.randn(2, 6), torch.randn(2, 6)
    if side in ("teacher", "both"):
        p[:, 2] = float("-inf")
    if side in ("student", "both"):
        q[:, 4] = float("-inf")
    loss, gp, gq = _grads(fn, p, q)
    assert torch.isfinite(loss) and loss > 0
    assert torch.isfinite(gp).all() and torch.isfinite(gq).all()
    if side in ("teacher", "both"):
        assert (gp[:, 2] == 0).all()
    if side in ("student", "both"):
        assert (gq[:, 4] == 0).all()


def test_padded_teacher_with_a_narrower_student():
    """A teacher wider than its tokenizer (padded logits) against a student over the tokenizer only."""
    torch.manual_seed(5)
    teacher = torch.randn(2, 3, 8)
    teacher[..., 6:] = 5.0  # padding columns with large logits: they must not count
    student = torch.randn(2, 3, 6, requires_grad=True)
    targets = torch.tensor([[1, 2, 3], [0, 5, 4]])
    for kind in ("fkl", "rkl", "jsd", "tvd"):
        got = distillation_loss(kind, teacher, student, 2.0, ce_weight=0.5, targets=targets, vocab_limit=6)
        want = distillation_loss(kind, teacher[..., :6], student, 2.0, ce_weight=0.5, targets=targets)
        assert torch.isfinite(got) and got.item() == pytest.approx(want.item(), abs=1e-6)
        (grad,) = torch.autograd.grad(got, student)
        assert torch.isfinite(grad).all()
    with pytest.raises(DistilrayError, match="differ"):
        distillation_loss("fkl", teacher, student)  # without vocab_limit the widths must agree
    with pytest.raises(DistilrayError, match="vocab_limit"):
        distillation_loss("fkl", teacher, student, vocab_limit=7)  # wider than the student
