"""Drafters: n-gram counts against hand-computed values; Conv/LSTM causality, save/load and the
start/push/next_logits/rollback interface."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from distilray.errors import DistilrayError
from distilray.models.conv_drafter import ConvDrafter, ConvDrafterConfig, ConvDrafterState
from distilray.models.lstm_drafter import LSTMDrafter, LSTMDrafterConfig, LSTMDrafterState
from distilray.models.ngram import NGramDrafter

CORPUS = [[0, 1, 2], [0, 1, 1]]  # unigram counts {0: 2, 1: 3, 2: 1}, total 6; V = 3


def test_ngram_hand_computed():
    uni = NGramDrafter(1, 3).fit(CORPUS)
    assert uni.prob([2, 2, 2], 1) == pytest.approx(4 / 9)  # (3 + 1) / (6 + 3), context ignored
    np.testing.assert_allclose(uni.probs([0]), [3 / 9, 4 / 9, 2 / 9])

    bi = NGramDrafter(2, 3).fit(CORPUS)
    np.testing.assert_allclose(bi.probs([2, 0]), [1 / 5, 3 / 5, 1 / 5])  # after 0: 1 twice
    np.testing.assert_allclose(bi.probs([1]), [1 / 5, 2 / 5, 2 / 5])  # after 1: 2 once, 1 once
    assert bi.prob([0, 2], 0) == pytest.approx(3 / 9)  # (2,) never a context -> unigram
    assert bi.prob([], 0) == pytest.approx(3 / 9)  # empty context -> unigram

    tri = NGramDrafter(3, 3).fit(CORPUS)
    assert tri.prob([0, 1], 2) == pytest.approx(2 / 5)  # (0, 1) -> {2: 1, 1: 1}
    assert tri.prob([1, 1], 2) == pytest.approx(2 / 5)  # (1, 1) unseen -> back off to (1,)
    assert tri.prob([2, 0], 1) == pytest.approx(3 / 5)  # (2, 0) unseen -> (0,)
    for model in (uni, bi, tri):
        for ctx in ([], [0], [2], [1, 1], [0, 1], [2, 2, 2]):
            assert model.probs(ctx).sum() == pytest.approx(1.0)
            assert model.prob(ctx, 1) == pytest.approx(model.probs(ctx)[1])


def test_ngram_short_context_backs_off_from_its_whole_length():
    """A context shorter than n - 1 is looked up whole: with n = 4, the 2-token context (0, 1) is the
    bigram context, not its last token alone."""
    quad = NGramDrafter(4, 3).fit([[0, 1, 2], [2, 1, 1], [2, 1, 1]])
    # (0, 1) -> {2: 1}: (1 + 1) / (1 + 3); the unigram context (1,) -> {1: 2, 2: 1} would give 2 / 6
    np.testing.assert_allclose(quad.probs([0, 1]), [1 / 4, 1 / 4, 2 / 4])
    np.testing.assert_allclose(quad.probs([1]), [1 / 6, 3 / 6, 2 / 6])
    assert quad.prob([0, 1], 2) == pytest.approx(2 / 4)
    np.testing.assert_allclose(quad.probs([1, 0, 1]), [1 / 4, 1 / 4, 2 / 4])  # (1, 0, 1) unseen -> (0, 1)
    quad.start([0, 1])  # a 2-token prompt: the drafter's first logits use the bigram context too
    torch.testing.assert_close(quad.next_logits(), torch.log(torch.tensor([1 / 4, 1 / 4, 2 / 4])))


def test_ngram_interface_save_load_merge(tmp_path):
    model = NGramDrafter(3, 3).fit(CORPUS)
    model.start([0, 1])
    assert model.vocab_size == 3 and model.length() == 2
    torch.testing.assert_close(model.next_logits(), torch.log(torch.tensor([1 / 5, 2 / 5, 2 / 5])))
    first = model.next_logits()
    model.push([1, 1])
    assert model.length() == 4
    model.rollback(2)
    assert torch.equal(model.next_logits(), first)
    assert model.next_logits().dtype == torch.float32 and model.next_logits().shape == (3,)

    model.save(tmp_path / "ng")
    loaded = NGramDrafter.load(tmp_path / "ng")
    assert (loaded.n, loaded.vocab_size) == (3, 3)
    contexts = [[], [0], [1], [2], [0, 1], [1, 1], [2, 0], [1, 2]]
    for ctx in contexts:
        np.testing.assert_array_equal(loaded.probs(ctx), model.probs(ctx))

    rng = np.random.default_rng(0)
    seqs = [rng.integers(0, 5, size=rng.integers(1, 9)).tolist() for _ in range(20)]
    union = NGramDrafter(3, 5).fit(seqs)
    merged = NGramDrafter(3, 5).fit(seqs[:7]).merge_counts(NGramDrafter(3, 5).fit(seqs[7:]))
    for ctx in [[], [0], [4], [1, 2], [3, 3], [0, 4, 2]]:
        np.testing.assert_allclose(merged.probs(ctx), union.probs(ctx), rtol=0, atol=1e-15)
    with pytest.raises(DistilrayError):
        merged.merge_counts(NGramDrafter(2, 5))
    with pytest.raises(DistilrayError):
        NGramDrafter(5, 3)
    with pytest.raises(DistilrayError):
        NGramDrafter(2, 3).fit([[0, 3]])


def _conv() -> ConvDrafter:
    torch.manual_seed(0)
    return ConvDrafter(ConvDrafterConfig(vocab_size=11, d_model=16, kernel_size=3, n_layers=2)).eval()


def _lstm() -> LSTMDrafter:
    torch.manual_seed(0)
    return LSTMDrafter(LSTMDrafterConfig(vocab_size=11, d_model=16, n_layers=2, tie_embeddings=False)).eval()


@pytest.mark.parametrize("make", [_conv, _lstm], ids=["conv", "lstm"])
def test_neural_drafter_causal_and_round_trip(make, tmp_path):
    model = make()
    ids = torch.tensor([[1, 4, 2, 7, 3, 9, 5, 0, 6, 8]])
    with torch.no_grad():
        logits = model(ids)
        changed = ids.clone()
        changed[0, 6] = 10
        logits2 = model(changed)
    assert logits.shape == (1, 10, 11)
    torch.testing.assert_close(logits[:, :6], logits2[:, :6], rtol=0, atol=1e-6)
    assert not torch.allclose(logits[:, 6], logits2[:, 6])

    model.save_pretrained(tmp_path / "m")
    loaded = type(model).from_pretrained(tmp_path / "m")
    with torch.no_grad():
        assert torch.equal(loaded(ids), logits)
    cfg = (tmp_path / "m" / "config.json").read_text().replace('"dropout"', '"dropuot"')
    (tmp_path / "m" / "config.json").write_text(cfg)
    with pytest.raises(DistilrayError, match="dropuot"):
        type(model).from_pretrained(tmp_path / "m")


@pytest.mark.parametrize("make, wrap", [(_conv, ConvDrafterState), (_lstm, LSTMDrafterState)], ids=["conv", "lstm"])
def test_neural_drafter_interface(make, wrap):
    model = make()
    seq = [1, 4, 2, 7, 3, 9, 5, 0, 6, 8]  # longer than the conv receptive field (5)
    with torch.no_grad():
        full = model(torch.tensor([seq]))[0]
    state = wrap(model)
    assert state.vocab_size == 11
    state.start(seq[:3])
    torch.testing.assert_close(state.next_logits(), full[2], rtol=0, atol=1e-5)
    state.push(seq[3:6])
    at6 = state.next_logits()
    torch.testing.assert_close(at6, full[5], rtol=0, atol=1e-5)
    state.push(seq[6:])
    assert state.length() == 10
    out = state.next_logits()
    assert out.shape == (11,) and out.dtype == torch.float32
    torch.testing.assert_close(out, full[-1], rtol=0, atol=1e-5)

    state.rollback(6)
    assert state.length() == 6
    assert torch.equal(state.next_logits(), at6)  # exactly the logits before the push
    state.rollback(2)  # below the prefix: the LSTM recomputes, the conv re-reads its window
    torch.testing.assert_close(state.next_logits(), full[1], rtol=0, atol=1e-5)
    state.push([2, 7])
    torch.testing.assert_close(state.next_logits(), full[3], rtol=0, atol=1e-5)
    with pytest.raises(DistilrayError):
        state.rollback(99)
    with pytest.raises(DistilrayError):
        state.start([])


def test_registry_builds_saves_recognises_and_loads_every_kind(small_tokenizer, tmp_path):
    from distilray.models.drafters import (
        DRAFTER_KINDS,
        NEURAL_KINDS,
        build_drafter_network,
        drafter_kind,
        load_drafter_network,
        network_kind,
        network_logits,
        save_drafter,
    )

    tok, _ = small_tokenizer
    assert NEURAL_KINDS == ("cnn", "lstm", "transformer") and DRAFTER_KINDS == ("ngram", *NEURAL_KINDS)
    ids = torch.tensor([[1, 4, 2, 7]])
    for kind, size in (("cnn", "16"), ("lstm", "16"), ("transformer", "tiny")):
        torch.manual_seed(0)
        network = build_drafter_network(kind, tok, size).eval()
        assert network_kind(network) == kind
        with torch.no_grad():
            logits = network_logits(network, ids)
        assert logits.shape == (1, 4, len(tok))
        save_drafter(network, tmp_path / kind)
        assert drafter_kind(tmp_path / kind) == kind
        with torch.no_grad():
            torch.testing.assert_close(network_logits(load_drafter_network(tmp_path / kind), ids), logits)
    save_drafter(NGramDrafter(2, len(tok)).fit([[1, 2, 3]]), tmp_path / "ngram")
    assert drafter_kind(tmp_path / "ngram") == "ngram"
    with pytest.raises(DistilrayError, match="no trainable network"):
        load_drafter_network(tmp_path / "ngram")
    with pytest.raises(DistilrayError, match="unknown trainable drafter kind"):
        build_drafter_network("ngram", tok)
    with pytest.raises(DistilrayError, match="width"):
        build_drafter_network("cnn", tok, "wide")
    with pytest.raises(DistilrayError, match="not a drafter network"):
        network_kind(torch.nn.Linear(2, 2))
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "config.json").write_text('{"architecture": "mdlm"}')
    with pytest.raises(DistilrayError, match="names no known drafter"):
        drafter_kind(tmp_path / "other")
