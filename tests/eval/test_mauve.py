"""MAUVE through mauve-text, on features given directly (no featurizing model)."""

import numpy as np
import pytest

from distilray.eval.mauve import mauve, mean_hidden_features


def _cloud(rng, shift: float, n: int = 200, d: int = 8) -> np.ndarray:
    return rng.standard_normal((n, d)) + np.array([shift] + [0.0] * (d - 1))


def test_identical_sets_score_one_and_disjoint_sets_near_zero():
    rng = np.random.default_rng(0)
    a, b, c = _cloud(rng, 3.0), _cloud(rng, 3.0), _cloud(rng, -3.0)
    assert mauve(a, a) == pytest.approx(1.0)
    assert mauve(a, b) > 0.9  # two samples of one distribution
    assert mauve(a, c) < 0.05  # far apart: the histograms barely overlap
    assert mauve(a, b, num_clusters=8) > mauve(a, c, num_clusters=8)


def test_small_samples_and_seed():
    rng = np.random.default_rng(1)
    a, b = _cloud(rng, 3.0, n=12), _cloud(rng, 3.0, n=9)
    score = mauve(a, b, seed=3)
    assert 0.0 <= score <= 1.0 and score == mauve(a, b, seed=3)
    assert 0.0 <= mauve(a[:2], b[:2], num_clusters=50) <= 1.0  # more buckets than points: capped


def test_mean_hidden_features_shape(small_tokenizer):
    import torch

    from distilray.models.causal_lm import build_causal_lm

    tok, _ = small_tokenizer
    torch.manual_seed(0)
    model = build_causal_lm("tiny", tok).eval()
    feats = mean_hidden_features(model, [[1, 2, 3], [4], []])
    assert feats.shape[0] == 3 and feats.ndim == 2 and np.isfinite(feats).all()
