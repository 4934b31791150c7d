"""T-Free's BCE against hand-computed values, its two normalisations, and the targets built from index lists."""

from __future__ import annotations

import math

import pytest
import torch

from distilray.errors import DistilrayError
from distilray.losses.tfree import pattern_targets, tfree_bce

LN3 = math.log(3.0)


def test_pattern_targets_are_binary_with_repeats_and_empty_rows() -> None:
    flat = torch.tensor([2, 0, 2, 2, 3, 1])
    offsets = torch.tensor([0, 4, 4, 6])  # rows {2, 0, 2, 2}, {}, {3, 1}
    expected = torch.tensor([[1.0, 0, 1, 0], [0, 0, 0, 0], [0, 1, 0, 1]])
    assert torch.equal(pattern_targets(flat, offsets, 3, 4), expected)
    with pytest.raises(DistilrayError, match="n_rows"):
        pattern_targets(flat, offsets, 4, 4)
    with pytest.raises(DistilrayError, match="len"):
        pattern_targets(flat, torch.tensor([0, 4, 4, 5]), 3, 4)


def _case() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """1 x 2 x 4: position 0 real (weight 1), position 1 padding (weight 0, logits that would count a lot)."""
    logits = torch.tensor([[[LN3, 0.0, -LN3, 0.0], [5.0, -5.0, 5.0, -5.0]]], requires_grad=True)
    targets = torch.tensor([[[1.0, 0, 1, 0], [0, 1, 0, 1]]])
    weights = torch.tensor([[1.0, 0.0]])
    return logits, targets, weights


def test_bce_by_hand_both_normalisations() -> None:
    # Position 0, pos_weight 2: sigma(ln 3) = 3/4 and sigma(-ln 3) = 1/4, sigma(0) = 1/2.
    #   j=0 positive, logit ln 3:  2 * -log(3/4) = 2 log(4/3)
    #   j=1 negative, logit 0:     -log(1/2)     = log 2
    #   j=2 positive, logit -ln 3: 2 * -log(1/4) = 2 log 4
    #   j=3 negative, logit 0:     log 2
    row = 2 * math.log(4 / 3) + math.log(2) + 2 * math.log(4) + math.log(2)
    logits, targets, weights = _case()
    real = tfree_bce(logits, targets, weights, pos_weight=2.0, loss_scale=10.0)
    assert real.item() == pytest.approx(10 * row / (1 * 4), rel=1e-6)  # R = 1 real position, v = 4
    every = tfree_bce(logits, targets, weights, pos_weight=2.0, loss_scale=10.0, normalization="all")
    assert every.item() == pytest.approx(10 * row / (1 * 2 * 4), rel=1e-6)  # B * S = 2 positions
    assert every.item() == pytest.approx(real.item() * 1 / 2, rel=1e-6)  # original = real * R / (B * S)
    with pytest.raises(DistilrayError, match="normalization"):
        tfree_bce(logits, targets, weights, 2.0, 10.0, normalization="mean")


def test_index_list_targets_give_the_dense_loss() -> None:
    logits, targets, weights = _case()
    flat, offsets = torch.tensor([0, 2, 2, 1, 3]), torch.tensor([0, 3, 5])  # the repeated 2 still gives 1
    dense = tfree_bce(logits, targets, weights, 2.0, 10.0)
    assert torch.equal(tfree_bce(logits, (flat, offsets), weights, 2.0, 10.0), dense)


def test_gradient_flows_to_real_positions_only() -> None:
    logits, targets, weights = _case()
    tfree_bce(logits, targets, weights, pos_weight=2.0, loss_scale=10.0).backward()
    grad = logits.grad[0]
    assert torch.equal(grad[1], torch.zeros(4)) and (grad[0] != 0).all()
    # d/dz of pw*y*softplus(-z) + (1-y)*softplus(z), times loss_scale / (R v): at j=1 (negative, z=0) 10/4 * 1/2
    assert grad[0, 1].item() == pytest.approx(10 / 4 * 0.5)
    assert grad[0, 0].item() == pytest.approx(10 / 4 * -2 * 0.25)  # positive: -pw (1 - sigma(ln 3))


def test_all_padding_gives_zero_with_a_graph() -> None:
    logits, targets, _ = _case()
    loss = tfree_bce(logits, targets, torch.zeros(1, 2), pos_weight=2.0, loss_scale=10.0)
    assert loss.item() == 0.0 and loss.requires_grad
    loss.backward()
    assert torch.equal(logits.grad, torch.zeros_like(logits))


def test_shape_checks() -> None:
    logits, targets, weights = _case()
    with pytest.raises(DistilrayError, match="loss_weights"):
        tfree_bce(logits, targets, weights[:, :1], 2.0, 10.0)
    with pytest.raises(DistilrayError, match="targets"):
        tfree_bce(logits, targets[..., :3], weights, 2.0, 10.0)
    with pytest.raises(DistilrayError, match="pos_weight"):
        tfree_bce(logits, targets, weights, 0.0, 10.0)
