"""T-Free word scores against hand-computed values (reference/tfree.md 5.3-5.6, 10.2)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from distilray.decoding.tfree import pick_word, word_bags, word_log_probs, word_scores
from distilray.errors import DistilrayError
from distilray.tfree.dictionary import Dictionary, build_dictionary
from distilray.tfree.hashing import TrigramVocab, hasher_for

# v = 16 rows, m = 2. Word "x": P = {1, 3, 5}, N = {1, 3}, E = {3, 5} (row 3 in both), n_w = 2.
# Word "y": P = N = {0, 2}, n_w = 1. Word "z": n_w = 8, so v - m n_w = 0 (excluded).
V, M = 16, 2
ACT = [0.5] * V
ACT[0], ACT[1], ACT[2], ACT[3], ACT[5] = 0.1, 0.9, 0.3, 0.8, 0.2
TOTAL = sum(ACT)  # 7.8


def hand_dictionary() -> Dictionary:
    return Dictionary(
        words=["x", "y", "z"],
        counts=np.zeros(3, dtype=np.int64),
        vocab=TrigramVocab(v=V, m=M),
        indptr=np.array([0, 3, 5, 7]),
        indices=np.array([1, 3, 5, 0, 2, 4, 6]),
        in_non_edge=np.array([1, 1, 0, 1, 1, 1, 0], dtype=bool),
        in_edge=np.array([0, 1, 1, 0, 0, 1, 1], dtype=bool),
        n_w=np.array([2, 1, 8]),
    )


def logits() -> torch.Tensor:
    a = torch.tensor(ACT, dtype=torch.float64)
    return torch.log(a / (1 - a)).float()  # sigmoid(logits) = ACT


def head_score(pattern_sum: float, n_w: int) -> float:
    return pattern_sum / (M * n_w) + (pattern_sum - TOTAL) / (V - M * n_w)


@pytest.mark.parametrize("e", [1.0, 0.5])
def test_head_scores(e: float) -> None:
    x_sum = ACT[1] + ACT[3] + e * (ACT[3] + ACT[5])  # row 3 counts 1 + e times
    y_sum = ACT[0] + ACT[2]
    scores = word_scores(logits(), hand_dictionary(), "head", edge_weight=e)
    assert scores[:2].tolist() == pytest.approx([head_score(x_sum, 2), head_score(y_sum, 1)], abs=1e-6)
    assert scores[2].item() == float("-inf")  # v - m n_w = 0: no outside mean
    if e == 1.0:
        assert scores[0].item() == pytest.approx(0.25, abs=1e-6)  # 2.7 / 4 + (2.7 - 7.8) / 12


@pytest.mark.parametrize("e", [1.0, 0.5])
def test_union_scores(e: float) -> None:
    x_sum = ACT[1] + e * ACT[3] + e * ACT[5]  # each row of P once, edge rows weighted e
    scores = word_scores(logits(), hand_dictionary(), "union", edge_weight=e)
    assert scores[0].item() == pytest.approx(head_score(x_sum, 2), abs=1e-6)
    assert scores[1].item() == pytest.approx(head_score(ACT[0] + ACT[2], 1), abs=1e-6)
    assert scores[2].item() == float("-inf")
    if e == 1.0:
        assert scores[0].item() == pytest.approx(1.9 / 4 + (1.9 - 7.8) / 12, abs=1e-6)


def test_calibrated_scores() -> None:
    def log_likelihood(pattern: set[int]) -> float:
        return sum(math.log(a) if j in pattern else math.log(1 - a) for j, a in enumerate(ACT))

    scores = word_scores(logits(), hand_dictionary(), "calibrated", edge_weight=0.3)  # e does not apply
    expected = [log_likelihood({1, 3, 5}), log_likelihood({0, 2}), log_likelihood({4, 6})]
    assert scores.tolist() == pytest.approx(expected, abs=1e-4)
    probs = word_log_probs(scores).exp()
    assert probs.sum().item() == pytest.approx(1.0)


def test_batched_shapes_and_cache() -> None:
    d = hand_dictionary()
    batch = torch.randn(2, 3, V)
    for method in ("head", "union", "calibrated"):
        scores = word_scores(batch, d, method)
        assert scores.shape == (2, 3, 3) and scores.dtype == torch.float32
        single = word_scores(batch[1, 2], d, method)
        assert torch.allclose(scores[1, 2], single, atol=1e-5)
    cpu = torch.device("cpu")
    assert word_bags(d, "head", 1.0, cpu) is word_bags(d, "head", 1.0, cpu)  # built once per dictionary


def test_real_dictionary_matches_brute_force() -> None:
    vocab = TrigramVocab(v=64, m=3, k=1)
    d = build_dictionary({"the": 3, "cat": 2, "Hello": 1, "abcabcab": 1}, vocab)
    hasher = hasher_for(vocab)
    z = torch.randn(64, generator=torch.Generator().manual_seed(0))
    a = torch.sigmoid(z).double()
    scores = word_scores(z, d, "head", edge_weight=0.7)
    for i, word in enumerate(d.words):
        inner, edge = hasher.edge_split(word)
        s = a[inner].sum() + 0.7 * a[edge].sum()
        n_w = hasher.n_trigrams(word)
        expected = s / (3 * n_w) + (s - a.sum()) / (64 - 3 * n_w)
        assert scores[i].item() == pytest.approx(expected.item(), abs=1e-5), word


def test_pick_word() -> None:
    d = hand_dictionary()
    scores = word_scores(logits(), d, "head")
    assert pick_word(scores).item() == 0  # x: 0.25 against y's -0.33
    assert pick_word(scores, temperature=1.0, top_k=1).item() == 0
    gen = torch.Generator().manual_seed(0)
    draws = pick_word(scores.expand(500, 3), temperature=0.2, generator=gen)
    assert draws.shape == (500,) and set(draws.tolist()) == {0, 1}  # z (-inf) is never drawn
    again = pick_word(scores.expand(500, 3), temperature=0.2, generator=torch.Generator().manual_seed(0))
    assert torch.equal(draws, again)
    assert word_log_probs(scores)[2].item() == float("-inf")
    with pytest.raises(DistilrayError, match="finite score"):
        pick_word(torch.full((3,), float("-inf")))
    with pytest.raises(DistilrayError, match="temperature"):
        pick_word(scores, temperature=-1.0)


def test_bad_inputs() -> None:
    with pytest.raises(DistilrayError, match="unknown T-Free score method 'sum'"):
        word_scores(logits(), hand_dictionary(), "sum")
    with pytest.raises(DistilrayError, match="v=16"):
        word_scores(torch.zeros(8), hand_dictionary())
