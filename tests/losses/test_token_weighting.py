"""Token weighting: each step and preset against hand values and the closed forms of the note's table, plus
strided short-context windows checked against a direct per-target computation on a tiny random GPT-2."""

from __future__ import annotations

import math

import pytest
import torch

from distilray.errors import DistilrayError
from distilray.losses.token_weighting import (
    VARIANTS,
    WeightingSpec,
    apply_transforms,
    check_stride,
    context_pure_scores,
    interpolate,
    model_window_losses,
    normalize,
    per_token_losses,
    short_context_losses,
    token_weights,
    top_kappa,
    truncate,
    weight_stats,
    weighted_loss,
    weighting_spec,
    window_starts,
)

T = torch.tensor


def assert_close(got: torch.Tensor, want, atol: float = 1e-6) -> None:
    torch.testing.assert_close(got, torch.as_tensor(want, dtype=got.dtype), atol=atol, rtol=0)


# --------------------------------------------------------------------------------------------- steps


def test_each_transform_and_order():
    w = T([[-2.0, 0.0, 3.0]])
    assert_close(apply_transforms(w, ["absolute"]), [[2.0, 0.0, 3.0]])
    assert_close(apply_transforms(w, ["minus"]), [[2.0, 0.0, -3.0]])
    assert_close(apply_transforms(w, ["exp"]), [[math.exp(-2), 1.0, math.exp(3)]], atol=1e-5)
    assert_close(apply_transforms(w, ["max"]), [[0.0, 0.0, 3.0]])
    assert_close(apply_transforms(w, ["shift:2"]), [[-2 - math.log(2), -math.log(2), 3 - math.log(2)]])
    assert_close(apply_transforms(w, ["shift:0.5"]), [[-2 + math.log(2), math.log(2), 3 + math.log(2)]])
    # left to right: minus then max keeps the negatives, max then minus keeps the positives
    assert_close(apply_transforms(w, ["minus", "max"]), [[2.0, 0.0, 0.0]])
    assert_close(apply_transforms(w, ["max", "minus"]), [[0.0, 0.0, -3.0]])
    assert_close(apply_transforms(w, []), w)
    with pytest.raises(DistilrayError, match="unknown transform 'log'.*absolute, minus, exp, max, shift:C"):
        apply_transforms(w, ["log"])


def test_truncation_clips_from_above_only():
    assert_close(truncate(T([[1.0, 3.0, -5.0, 2.0]]), 2.0), [[1.0, 2.0, -5.0, 2.0]])
    with pytest.raises(DistilrayError, match="gamma must be > 0"):
        truncate(T([[1.0]]), 0.0)


def test_top_kappa_keeps_at_least_one_token():
    # int(0.25 * 3) = 0 made the original select every token
    assert_close(top_kappa(T([[0.3, 0.9, 0.1]]), 0.25), [[0.0, 1.0, 0.0]])
    assert_close(top_kappa(T([[0.3, 0.9, 0.1]]), 1.0), [[1.0, 1.0, 1.0]])
    # floor(0.29 * 100) is 29 despite 0.29 * 100 = 28.999...
    kept = top_kappa(torch.arange(100.0)[None], 0.29)
    assert kept.sum().item() == 29 and kept[0, 71:].sum().item() == 29


def test_top_kappa_ties_only_at_cut_seeded_and_deterministic():
    w = T([[5.0, 2.0, 2.0, 2.0, 0.0], [4.0, 3.0, 2.0, 1.0, 0.0]])  # k = floor(0.6 * 5) = 3 per row
    picks = set()
    for seed in range(20):
        got = top_kappa(w, 0.6, generator=torch.Generator().manual_seed(seed))
        assert set(got.unique().tolist()) <= {0.0, 1.0}
        assert got.sum(dim=1).tolist() == [3.0, 3.0]
        assert got[0, 0] == 1 and got[0, 4] == 0  # above and below the cut: never shuffled
        assert_close(got[1], [1.0, 1.0, 1.0, 0.0, 0.0])  # a row without ties is unaffected
        picks.add(tuple(got[0, 1:4].tolist()))
        again = top_kappa(w, 0.6, generator=torch.Generator().manual_seed(seed))
        assert torch.equal(got, again)
    assert len(picks) > 1  # the tie is really broken at random, not by position
    assert torch.equal(top_kappa(w, 0.6), top_kappa(w, 0.6))  # default generator is seeded


def test_top_kappa_negative_scores_and_all_zero_row():
    assert_close(top_kappa(T([[-1.0, -3.0, -3.0, -2.0]]), 0.5), [[1.0, 0.0, 0.0, 1.0]])
    got = top_kappa(T([[-1.0, -2.0, -2.0, -5.0]]), 0.5)  # tie among negatives at the cut
    assert got[0, 0] == 1 and got[0, 3] == 0 and got[0, 1:3].sum() == 1
    zeros = top_kappa(torch.zeros(1, 4), 0.5)
    assert zeros.sum().item() == 2 and set(zeros.unique().tolist()) == {0.0, 1.0}


def test_top_kappa_never_selects_padding():
    valid = T([[True, False, True, True]])
    # n = 3, k = floor(0.34 * 3) = 1: the largest valid value, not the padded 9
    assert_close(top_kappa(T([[1.0, 9.0, 2.0, 3.0]]), 0.34, valid), [[0.0, 0.0, 0.0, 1.0]])
    # padding holds 0 above every valid value, and k counts valid targets only (4 -> 2)
    w = T([[-1.0, -2.0, 0.0, 0.0, -3.0, -4.0], [1.0, 2.0, 3.0, 4.0, 5.0, 6.0]])
    valid = T([[True, True, False, False, True, True], [True] * 6])
    got = top_kappa(w, 0.5, valid)
    assert_close(got, [[1.0, 1.0, 0.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 1.0, 1.0, 1.0]])
    assert top_kappa(w, 0.5, torch.zeros(2, 6, dtype=torch.bool)).sum() == 0
    with pytest.raises(DistilrayError, match="kappa must be in"):
        top_kappa(w, 0.0)


def test_l1_and_softmax_normalisation():
    assert_close(normalize(T([[1.0, 3.0, 0.0, 4.0]]), "l1"), [[0.5, 1.5, 0.0, 2.0]])
    valid = T([[True, True, False]])
    assert_close(normalize(T([[1.0, 3.0, 7.0]]), "l1", valid), [[0.5, 1.5, 0.0]])
    assert_close(normalize(T([[0.0, math.log(3.0), 5.0]]), "softmax", valid), [[0.5, 1.5, 0.0]])
    assert_close(normalize(T([[1.0, -3.0]]), "none"), [[1.0, -3.0]])
    with pytest.raises(DistilrayError, match="unknown normalization 'l2'"):
        normalize(T([[1.0]]), "l2")


def test_all_zero_row_becomes_uniform_before_normalising():
    w = T([[0.0, 0.0, 0.0, 5.0], [2.0, 0.0, 2.0, 0.0]])
    valid = T([[True, True, True, False], [True, True, True, True]])
    for kind in ("l1", "softmax"):
        got = normalize(w, kind, valid)
        assert_close(got[0], [1.0, 1.0, 1.0, 0.0])  # valid weights all zero: plain CE on that row
        assert torch.isfinite(got).all()
    assert_close(normalize(w, "l1", valid)[1], [2.0, 0.0, 2.0, 0.0])
    # a row that is all padding stays 0, without NaN
    assert_close(normalize(w, "l1", torch.zeros(2, 4, dtype=torch.bool)), torch.zeros(2, 4))
    assert_close(normalize(w, "softmax", torch.zeros(2, 4, dtype=torch.bool)), torch.zeros(2, 4))


def test_interpolation():
    assert_close(interpolate(T([[0.0, 2.0, 1.0]]), 0.75), [[0.75, 1.25, 1.0]])
    assert_close(interpolate(T([[0.0, 2.0, 1.0]]), 0.75, T([[True, True, False]])), [[0.75, 1.25, 0.0]])
    assert_close(interpolate(T([[0.0, 2.0]]), 1.0), [[1.0, 1.0]])
    with pytest.raises(DistilrayError, match="lambda must be in"):
        interpolate(T([[0.0]]), 1.5)


# --------------------------------------------------------------------------------------------- presets

# distinct |d| per row, so no ties decide the selections
D = T(
    [
        [0.5, -3.0, 1.2, -0.2, 2.5, -1.0, 0.1, -0.7],
        [-2.0, 0.3, 4.0, -0.4, -1.5, 0.9, -0.05, 1.7],
    ]
)
N = 8


def binary_rows(selected: list[list[int]], value: float) -> torch.Tensor:
    out = torch.zeros(len(selected), N)
    for row, idx in enumerate(selected):
        out[row, idx] = value
    return out


@pytest.mark.parametrize("lam", [None, 0.5])
def test_dense_closed_form(lam):
    lam_value = 0.75 if lam is None else lam
    got = token_weights(D, weighting_spec("dense", lam=lam))
    want = lam_value + (1 - lam_value) * N * D.abs() / D.abs().sum(dim=1, keepdim=True)
    assert_close(got, want, atol=1e-5)
    assert_close(got.mean(dim=1), [1.0, 1.0], atol=1e-5)


def test_sparse_closed_form():
    # top floor(0.25 * 8) = 2 by |d|: row 0 -> 3.0, 2.5; row 1 -> 4.0, 2.0; weight N / 2 = 4 there
    assert_close(token_weights(D, weighting_spec("sparse")), binary_rows([[1, 4], [2, 0]], 4.0))
    # kappa 0.5: top 4 by |d|, weight 2
    assert_close(token_weights(D, weighting_spec("sparse", kappa=0.5)), binary_rows([[1, 4, 2, 5], [2, 0, 7, 4]], 2.0))


@pytest.mark.parametrize("gamma", [None, 2.0])
def test_longce_closed_form(gamma):
    got = token_weights(D, weighting_spec("longce", gamma=gamma))
    want = torch.exp(-D).clamp(max=5.0 if gamma is None else gamma)  # min(p_long / p_short, gamma)
    assert_close(got, want, atol=1e-5)
    assert got.max().item() == pytest.approx(5.0 if gamma is None else 2.0)  # exp(3) = 20 is clipped


def test_ppmi_and_npmi_select_by_their_scores():
    log2 = math.log(2.0)
    # ppmi, s = 2: max(-d - log 2, 0) -> row 0: idx 1 (2.31), 5 (0.31); row 1: idx 0 (1.31), 4 (0.81)
    ppmi = token_weights(D, weighting_spec("ppmi", shift=2.0))
    assert_close(ppmi, binary_rows([[1, 5], [0, 4]], 4.0))
    sel = (-D - log2).clamp(min=0)
    assert torch.equal(ppmi > 0, sel >= sel.topk(2, dim=1).values[:, -1:])
    # npmi, s = 2: max(d - log 2, 0) -> row 0: idx 4 (1.81), 2 (0.51); row 1: idx 2 (3.31), 7 (1.01)
    npmi = token_weights(D, weighting_spec("npmi", shift=2.0))
    assert_close(npmi, binary_rows([[4, 2], [2, 7]], 4.0))
    sel = (D - log2).clamp(min=0)
    assert torch.equal(npmi > 0, sel >= sel.topk(2, dim=1).values[:, -1:])
    # defaults s = 1, kappa = 0.25: ppmi by max(-d, 0)
    assert_close(token_weights(D, weighting_spec("ppmi")), binary_rows([[1, 5], [0, 4]], 4.0))


def test_uniform_is_plain_cross_entropy():
    assert weighting_spec("uniform") is None
    valid = torch.ones(2, N, dtype=torch.bool)
    valid[1, -2:] = False
    assert_close(token_weights(D, None, valid), valid.float())


def test_presets_reject_unused_parameters_and_unknown_variants():
    with pytest.raises(DistilrayError, match="'dense' ignores kappa"):
        weighting_spec("dense", kappa=0.5)
    with pytest.raises(DistilrayError, match="'longce' ignores lam"):
        weighting_spec("longce", lam=0.5)
    with pytest.raises(DistilrayError, match="'sparse' ignores shift"):
        weighting_spec("sparse", shift=2.0)
    with pytest.raises(DistilrayError, match="'uniform' ignores gamma"):
        weighting_spec("uniform", gamma=5.0)
    with pytest.raises(DistilrayError, match="unknown token-weighting variant 'pmi'.*" + ", ".join(VARIANTS)):
        weighting_spec("pmi")
    with pytest.raises(DistilrayError, match="shift C must be finite and > 0"):
        weighting_spec("npmi", shift=0.0)


def test_spec_validation():
    with pytest.raises(DistilrayError, match="negative weights"):
        WeightingSpec(("minus",), normalization="l1")
    with pytest.raises(DistilrayError, match="negative weights"):
        WeightingSpec(("shift:2",))
    with pytest.raises(DistilrayError, match="negative weights"):
        WeightingSpec(("max", "shift:2"), normalization="l1")
    with pytest.raises(DistilrayError, match="negative weights"):
        WeightingSpec(("absolute", "minus"), truncation=1.0, interpolation=0.5)
    # accepted: the final weights cannot be negative
    WeightingSpec(("minus",), normalization="softmax")
    WeightingSpec(("minus",), kappa=0.5)
    WeightingSpec(("absolute", "minus", "minus"), normalization="l1")
    WeightingSpec(("max", "shift:0.5"), normalization="l1")  # w - log 0.5 moves up
    WeightingSpec(("absolute",), kappa=0.5, normalization="softmax")
    for kappa in (0.0, 1.5, -0.1):
        with pytest.raises(DistilrayError, match="kappa must be in"):
            WeightingSpec(("absolute",), kappa=kappa)
    WeightingSpec(("absolute",), kappa=1.0)
    with pytest.raises(DistilrayError, match="unknown transform 'log'.*shift:C"):
        WeightingSpec(("log",))
    for bad in ("shift:0", "shift:-1", "shift:abc", "shift:"):
        with pytest.raises(DistilrayError, match="shift"):
            WeightingSpec((bad, "max"))
    with pytest.raises(DistilrayError, match="lambda must be in"):
        WeightingSpec(("absolute",), interpolation=1.1)
    with pytest.raises(DistilrayError, match="unknown normalization"):
        WeightingSpec(("absolute",), normalization="L1")
    with pytest.raises(DistilrayError, match="gamma must be > 0"):
        WeightingSpec(("exp",), truncation=0.0)
    assert weighting_spec("sparse").describe() == "absolute -> top-kappa 0.25 -> l1"
    assert weighting_spec("longce").describe() == "minus -> exp -> truncate 5"


def test_token_weights_with_padding_and_nan_checks():
    scores = T([[1.0, -3.0, float("nan"), 2.0]])
    valid = T([[True, True, False, True]])
    got = token_weights(scores, weighting_spec("dense"), valid)
    # n = 3, sum |d| = 6: 0.75 + 0.25 * 3 |d| / 6
    assert_close(got, [[0.875, 1.125, 0.0, 1.0]])
    assert got.dtype == torch.float32 and not got.requires_grad
    with pytest.raises(DistilrayError, match="NaN at valid positions"):
        token_weights(scores, weighting_spec("dense"))


# --------------------------------------------------------------------------------------------- loss, stats, scores


def test_weighted_loss_is_masked_mean_and_detaches_weights():
    losses = T([[1.0, 2.0, 3.0], [4.0, 5.0, float("nan")]], requires_grad=True)
    weights = T([[1.0, 0.5, 2.0], [1.0, 1.0, 7.0]], requires_grad=True)
    valid = T([[True, True, True], [True, True, False]])
    loss = weighted_loss(losses, weights, valid)
    assert loss.item() == pytest.approx((1 + 1 + 6 + 4 + 5) / 5)
    loss.backward()
    assert weights.grad is None
    assert_close(losses.grad, [[0.2, 0.1, 0.4], [0.2, 0.2, 0.0]])  # 0, not NaN, at padding
    assert weighted_loss(T([[2.0, 4.0]]), torch.ones(1, 2)).item() == pytest.approx(3.0)


def test_weight_stats():
    weights = T([[1.0, 0.0, 2.0, 5.0], [2.0, 2.0, 2.0, 2.0]])
    scores = T([[-1.0, 0.5, -2.0, -9.0], [1.0, 1.0, 1.0, 1.0]])
    valid = T([[True, True, True, False], [True] * 4])
    stats = weight_stats(weights, scores, valid)
    assert stats["weight_mean"] == pytest.approx(1.5)
    assert stats["weight_std"] == pytest.approx(math.sqrt(2 / 3) / 2)
    assert stats["zero_weight_share"] == pytest.approx(1 / 7)
    assert stats["negative_score_share"] == pytest.approx(2 / 7)
    assert all(isinstance(v, float) for v in stats.values())


def test_context_pure_scores_zero_exactly_b_minus_1_targets():
    long = torch.arange(1.0, 8.0)[None]  # N = 7
    short = torch.full((1, 7), 0.5)
    short[0, :3] = float("nan")  # first_window=False leaves these NaN
    d = context_pure_scores(long, short, base_length=4)
    assert_close(d, [[0.0, 0.0, 0.0, 3.5, 4.5, 5.5, 6.5]])
    # with those zeros, dense gives exactly lambda on the b-1 first targets and the row mean stays 1
    w = token_weights(d, weighting_spec("dense"))
    assert_close(w[0, :3], [0.75] * 3) and w[0, 3] > 0.75
    assert w.mean().item() == pytest.approx(1.0)


# --------------------------------------------------------------------------------------------- windows


def test_check_stride_note_example_and_errors():
    check_stride(2048, 512, 384)
    starts = window_starts(2048, 512, 384)
    assert starts == [0, 384, 768, 1152, 1536] and len(starts) - 1 == 4  # J = 4
    assert window_starts(16, 16, 4) == [0]  # b = L: J = 0
    with pytest.raises(DistilrayError, match="divisible by base_stride.*nearest valid base_stride: 384"):
        check_stride(2048, 512, 500)
    with pytest.raises(DistilrayError, match=r"nearest valid base_stride: 96 \(or 384 = \(1 - b/L\) \* b"):
        check_stride(2048, 512, 100)
    with pytest.raises(DistilrayError, match="nearest valid base_stride: 387"):
        check_stride(2048, 500, 384)
    for stride in (0, 512, 600):  # s = b would leave each window's first target unscored
        with pytest.raises(DistilrayError, match="0 < base_stride < base_length"):
            check_stride(2048, 512, stride)
    with pytest.raises(DistilrayError, match="base_length must be in"):
        check_stride(256, 512, 128)


VOCAB, B_LEN, STRIDE, SEQ = 50, 8, 3, 17  # J = 3 windows after window 0, N = 16


def tiny_gpt2(dropout: float = 0.0):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    config = GPT2Config(
        n_layer=1,
        n_embd=16,
        n_head=2,
        vocab_size=VOCAB,
        n_positions=64,
        resid_pdrop=dropout,
        embd_pdrop=dropout,
        attn_pdrop=dropout,
    )
    return GPT2LMHeadModel(config)


@pytest.fixture(scope="module")
def gpt2():
    return tiny_gpt2().eval()


@pytest.fixture(scope="module")
def tokens():
    gen = torch.Generator().manual_seed(1)
    out = torch.randint(1, VOCAB, (2, SEQ), generator=gen)
    out[:, 0] = 0  # BOS
    return out


def direct_short_losses(model, tokens: torch.Tensor, bos_id: int | None) -> torch.Tensor:
    """Per target: find the window that scores it, run that window alone, read -log p of the target."""
    out = torch.empty(tokens.shape[0], tokens.shape[1] - 1)
    for row in range(tokens.shape[0]):
        log_probs = {}  # one forward pass per window, shared by its targets
        for i in range(tokens.shape[1] - 1):
            j = 0 if i < B_LEN - 1 else (i - (B_LEN - 1)) // STRIDE + 1
            window = tokens[row, j * STRIDE : j * STRIDE + B_LEN].clone()
            if bos_id is not None and j > 0:
                window[0] = bos_id
            pos = i - j * STRIDE  # prediction position inside the window
            assert j == 0 or B_LEN - STRIDE <= pos + 1 <= B_LEN - 1  # context the note promises
            if j not in log_probs:
                with torch.no_grad():
                    log_probs[j] = torch.log_softmax(model(input_ids=window[None]).logits[0], dim=-1)
            out[row, i] = -log_probs[j][pos, window[pos + 1]]
    return out


def test_short_context_losses_match_direct_windows(gpt2, tokens):
    fn = model_window_losses(gpt2)
    with_bos = short_context_losses(tokens, fn, B_LEN, STRIDE, bos_id=0)
    assert with_bos.shape == (2, SEQ - 1) and with_bos.dtype == torch.float32
    assert_close(with_bos, direct_short_losses(gpt2, tokens, bos_id=0), atol=1e-5)
    plain = short_context_losses(tokens, fn, B_LEN, STRIDE)
    assert_close(plain, direct_short_losses(gpt2, tokens, bos_id=None), atol=1e-5)
    assert_close(plain[:, : B_LEN - 1], with_bos[:, : B_LEN - 1])  # window 0 already starts with BOS
    assert not torch.allclose(plain[:, B_LEN - 1 :], with_bos[:, B_LEN - 1 :])  # replacement changes context
    # one row without BOS: no replacement anywhere
    mixed = tokens.clone()
    mixed[1, 0] = 7
    assert_close(
        short_context_losses(mixed, fn, B_LEN, STRIDE, bos_id=0),
        direct_short_losses(gpt2, mixed, bos_id=None),
        atol=1e-5,
    )


def test_short_context_losses_batching_and_first_window(gpt2, tokens):
    calls: list[int] = []
    inner = model_window_losses(gpt2)

    def counting(windows: torch.Tensor) -> torch.Tensor:
        calls.append(windows.shape[0])
        return inner(windows)

    eight = short_context_losses(tokens, counting, B_LEN, STRIDE, bos_id=0, windows_per_pass=8)
    assert calls == [8]  # 2 rows x 4 windows in one pass
    calls.clear()
    one = short_context_losses(tokens, counting, B_LEN, STRIDE, bos_id=0, windows_per_pass=1)
    assert calls == [1] * 8
    assert_close(one, eight, atol=1e-5)
    calls.clear()
    skipped = short_context_losses(tokens, counting, B_LEN, STRIDE, bos_id=0, first_window=False, windows_per_pass=3)
    assert calls == [3, 3]  # window 0 is not run
    assert torch.isnan(skipped[:, : B_LEN - 1]).all() and not torch.isnan(skipped[:, B_LEN - 1 :]).any()
    assert_close(skipped[:, B_LEN - 1 :], eight[:, B_LEN - 1 :], atol=1e-5)
    with pytest.raises(DistilrayError, match="window_losses_fn returned shape"):
        short_context_losses(tokens, lambda w: torch.zeros(w.shape[0], B_LEN), B_LEN, STRIDE)


def test_per_token_losses_by_hand():
    logits = torch.log(T([[[0.25, 0.75], [0.5, 0.5]]]))
    assert_close(per_token_losses(logits, T([[1, 0]])), [[-math.log(0.75), math.log(2.0)]])


def test_model_window_losses_disables_dropout_and_restores_modes(tokens):
    model = tiny_gpt2(dropout=0.5).train()
    model.transformer.h[0].attn.eval()  # a submodule deliberately in eval stays so
    windows = tokens[:, :B_LEN]
    with torch.no_grad():
        assert not torch.equal(model(input_ids=windows).logits, model(input_ids=windows).logits)  # dropout is on
    fn = model_window_losses(model)
    first, second = fn(windows), fn(windows)
    assert torch.equal(first, second)
    assert first.shape == (2, B_LEN - 1) and first.dtype == torch.float32 and not first.requires_grad
    assert model.training and model.transformer.drop.training and not model.transformer.h[0].attn.training
    with pytest.raises((IndexError, RuntimeError)):
        fn(torch.full((1, B_LEN), VOCAB + 5))  # id outside the vocabulary
    assert model.training and model.transformer.drop.training
