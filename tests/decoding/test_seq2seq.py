"""Encoder-decoder (T5) targets in speculative decoding: greedy output equals the target's own greedy
decoding (ours and transformers'), for n-gram and T5 drafters; rollback, errors, sampling budget.
No Ray: tiny untrained T5s with scaled weights so greedy ties cannot hide a bug."""

import pytest
import torch

from distilray import corpus
from distilray.decoding.drafters import HFDrafter, HFSeq2SeqDrafter
from distilray.decoding.prompt_lookup import PromptLookupDrafter
from distilray.decoding.speculative import plain_generate, speculative_generate
from distilray.errors import DistilrayError
from distilray.models.causal_lm import build_causal_lm
from distilray.models.ngram import NGramDrafter
from distilray.models.seq2seq_lm import (
    build_seq2seq_lm,
    decoder_start_id,
    encode_truncated,
    is_seq2seq,
    load_seq2seq_lm,
)
from distilray.tokenizer import train_bpe_tokenizer

NEW = 24
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def setup(scaled):
    pairs = corpus.load_cnndm_pairs()[:40]
    tok = train_bpe_tokenizer([a for a, _ in pairs] + [h for _, h in pairs], vocab_size=400)
    torch.manual_seed(0)
    target = scaled(build_seq2seq_lm("t5-micro", tok), 2.5)
    torch.manual_seed(1)
    drafter_model = scaled(build_seq2seq_lm("t5-micro", tok), 2.5)
    sources = encode_truncated(tok, [a for a, _ in pairs], 48)
    summaries = encode_truncated(tok, [h for _, h in pairs], 32)
    start = decoder_start_id(target)
    ngram = NGramDrafter(3, len(tok)).fit([[start, *s] for s in summaries])
    return tok, target, drafter_model, sources, start, ngram


def _hf_greedy(target, src, start, n):
    out = target.generate(
        input_ids=torch.tensor([src]),
        do_sample=False,
        max_new_tokens=n,
        min_new_tokens=n,
        decoder_start_token_id=start,
        eos_token_id=None,
        pad_token_id=None,
    )
    assert out[0, 0].item() == start
    return out[0, 1:].tolist()


def test_decoder_start_is_bos_and_pad_stays_padding(setup):
    tok, target, *_ = setup
    assert decoder_start_id(target) == tok.bos_token_id != tok.pad_token_id
    assert target.config.pad_token_id == tok.pad_token_id and target.config.vocab_size == len(tok)


def test_greedy_equals_target_greedy_for_ngram_and_t5_drafters(setup):
    tok, target, drafter_model, sources, start, ngram = setup
    rejected = {"ngram": 0, "t5": 0}
    accepted = {"ngram": 0, "t5": 0}
    for src in sources[:3]:
        want = plain_generate(target, [start], NEW, encoder_ids=src).token_ids
        assert want == _hf_greedy(target, src, start, NEW)
        assert len(set(want)) > 3  # a varied continuation, not one repeated token
        for gamma in (1, 4):
            for name, drafter in (("ngram", ngram), ("t5", HFSeq2SeqDrafter(drafter_model, src))):
                rec = speculative_generate(target, drafter, [start], NEW, gamma=gamma, encoder_ids=src)
                assert rec.token_ids == want, (name, gamma)
                rejected[name] += rec.rejections
                accepted[name] += rec.accepted
    # both outcomes happened for both drafters: rollbacks were exercised, and so were accepted runs
    assert min(rejected.values()) > 0 and min(accepted.values()) > 0


def test_prompt_lookup_copies_from_the_source_losslessly(setup):
    tok, target, _, sources, start, _ = setup
    drafted = accepted = rejected = 0
    for src in sources[:3]:
        want = plain_generate(target, [start], NEW, encoder_ids=src).token_ids
        drafter = PromptLookupDrafter(len(tok), max_ngram=2, encoder_ids=src)
        rec = speculative_generate(target, drafter, [start], NEW, gamma=4, encoder_ids=src)
        assert rec.token_ids == want
        drafted, accepted, rejected = drafted + rec.drafted, accepted + rec.accepted, rejected + rec.rejections
    assert drafted > 0 and accepted > 0 and rejected > 0, (drafted, accepted, rejected)
    # the source drafter sees only its own article: another request's is refused
    with pytest.raises(DistilrayError, match="another source"):
        speculative_generate(
            target, PromptLookupDrafter(len(tok), encoder_ids=sources[0]), [start], NEW, encoder_ids=sources[1]
        )


def test_self_drafting_t5_accepts_everything(setup):
    _, target, _, sources, start, _ = setup
    src = sources[5]
    drafter = HFSeq2SeqDrafter(target, src)
    rec = speculative_generate(target, drafter, [start], NEW, gamma=4, encoder_ids=src)
    assert rec.token_ids == plain_generate(target, [start], NEW, encoder_ids=src).token_ids
    assert rec.rejections == 0 and rec.alpha == 1.0
    assert rec.target_passes == -(-NEW // 5)  # gamma + 1 tokens per pass
    assert drafter.encoder_passes == 1  # the drafter's encoder ran once for the whole request


def test_t5_drafter_rollback_matches_a_fresh_state(setup):
    _, _, drafter_model, sources, start, _ = setup
    src = sources[2]
    prefix = [start, 10, 57, 200, 33, 91]
    d = HFSeq2SeqDrafter(drafter_model, src)
    d.start(prefix[:2])
    d.next_logits()
    d.push(prefix[2:])
    d.next_logits()
    d.push([7, 8, 9])
    d.next_logits()
    d.rollback(4)  # crops the decoder self-attention cache, keeps the cross-attention of the encoder
    assert d.length() == 4 and d.cached_length() <= 4
    fresh = HFSeq2SeqDrafter(drafter_model, src)
    fresh.start(prefix[:4])
    torch.testing.assert_close(d.next_logits(), fresh.next_logits())
    d.push([5])
    fresh.push([5])
    torch.testing.assert_close(d.next_logits(), fresh.next_logits())
    d.start([start])  # a new decode of the same source reuses the encoding
    d.next_logits()
    assert d.encoder_passes == 1
    with pytest.raises(DistilrayError):
        d.rollback(0)


def test_missing_or_misplaced_encoder_ids_are_errors(setup):
    tok, target, drafter_model, sources, start, ngram = setup
    with pytest.raises(DistilrayError, match="encoder_ids"):
        speculative_generate(target, ngram, [start], 5)
    with pytest.raises(DistilrayError, match="encoder_ids"):
        plain_generate(target, [start], 5)
    with pytest.raises(DistilrayError, match="empty"):
        plain_generate(target, [start], 5, encoder_ids=[])
    with pytest.raises(DistilrayError, match="vocabulary"):
        plain_generate(target, [start], 5, encoder_ids=[len(tok) + 5])
    causal = build_causal_lm("tiny", tok).eval()
    with pytest.raises(DistilrayError, match="decoder-only"):
        plain_generate(causal, [start, 11], 5, encoder_ids=sources[0])
    with pytest.raises(DistilrayError, match="encoder-decoder"):
        HFSeq2SeqDrafter(causal, sources[0])
    with pytest.raises(DistilrayError, match="encoder_ids"):
        HFSeq2SeqDrafter(drafter_model, None)
    with pytest.raises(DistilrayError, match="another source"):
        speculative_generate(target, HFSeq2SeqDrafter(drafter_model, sources[1]), [start], 5, encoder_ids=sources[0])
    # a causal drafter over the same vocabulary is allowed: it drafts decoder tokens from the prefix alone
    rec = speculative_generate(target, HFDrafter(causal), [start], 8, gamma=2, encoder_ids=sources[0])
    assert rec.token_ids == plain_generate(target, [start], 8, encoder_ids=sources[0]).token_ids


def test_eos_stops_inside_an_accepted_run(setup):
    _, target, _, sources, start, _ = setup
    src = sources[4]
    want = plain_generate(target, [start], NEW, encoder_ids=src).token_ids
    eos = want[6]
    cut = want[: want.index(eos) + 1]
    rec = speculative_generate(
        target, HFSeq2SeqDrafter(target, src), [start], NEW, gamma=4, eos_token_id=eos, encoder_ids=src
    )
    assert rec.token_ids == cut
    assert plain_generate(target, [start], NEW, eos_token_id=eos, encoder_ids=src).token_ids == cut


def test_sampling_runs_within_budget_and_is_seeded(setup):
    _, target, drafter_model, sources, start, ngram = setup
    src = sources[3]
    for drafter in (ngram, HFSeq2SeqDrafter(drafter_model, src)):
        a, b = (
            speculative_generate(
                target, drafter, [start], 15, gamma=3, temperature=0.9, top_p=0.95, seed=4, encoder_ids=src
            )
            for _ in range(2)
        )
        assert a.token_ids == b.token_ids and len(a.token_ids) == 15
        assert all(0 <= t < len(setup[0]) for t in a.token_ids)
        assert sum(a.gamma_history) == a.drafted and a.target_passes == len(a.gamma_history)
        assert a.accepted + a.target_passes >= len(a.token_ids)
    adaptive = speculative_generate(
        target,
        ngram,
        [start],
        15,
        gamma=2,
        temperature=1.0,
        seed=1,
        encoder_ids=src,
        adaptive_gamma=True,
        gamma_min=1,
        gamma_max=4,
    )
    assert len(adaptive.token_ids) == 15 and all(1 <= g <= 4 for g in adaptive.gamma_history[:-1])


def test_build_save_load_roundtrip(setup, tmp_path):
    tok, target, _, sources, start, _ = setup
    with pytest.raises(DistilrayError, match="preset"):
        build_seq2seq_lm("t5-huge", tok)
    target.save_pretrained(tmp_path / "t5")
    assert is_seq2seq(target) and is_seq2seq(tmp_path / "t5")
    loaded = load_seq2seq_lm(tmp_path / "t5", device="cpu")
    src = sources[0]
    want = plain_generate(target, [start], 10, encoder_ids=src).token_ids
    assert plain_generate(loaded, [start], 10, encoder_ids=src).token_ids == want
    with pytest.raises(DistilrayError, match="no config.json"):
        load_seq2seq_lm(tmp_path)
    causal_dir = tmp_path / "causal"
    build_causal_lm("tiny", tok).save_pretrained(causal_dir)
    assert not is_seq2seq(causal_dir)
    with pytest.raises(DistilrayError, match="not an encoder-decoder"):
        load_seq2seq_lm(causal_dir)


def test_bench_measurement_reports_every_drafter(setup):
    """run_t5's measuring half on untrained models: every figure present, outputs identical to plain."""
    from distilray.bench.speculative_t5 import _measure, format_t5_table

    tok, target, drafter_model, sources, start, ngram = setup
    drafters = {
        "ngram3": {"baseline": lambda src: ngram},
        "t5": {"baseline": lambda src: HFSeq2SeqDrafter(drafter_model, src)},
        "prompt-lookup": {"baseline": lambda src: PromptLookupDrafter(len(tok), encoder_ids=src)},
    }
    out = _measure(target, drafters, sources[:2], start, eos=None, max_new_tokens=12, gamma=3)
    assert out["target"]["tokens"] == 24 and out["target"]["seconds_per_token"] > 0
    for family in ("ngram3", "t5", "prompt-lookup"):
        f = out["drafters"][family]["baseline"]
        assert f["identical_to_plain"] is True and f["tokens"] == 24 and f["gamma"] == 3
        assert 0.0 <= f["alpha"] <= 1.0 and 1.0 <= f["mean_accepted_length"] <= 4.0
        assert f["c"] > 0 and f["speedup_measured"] > 0 and f["speedup_theoretical"] > 0
    assert out["drafters"]["ngram3"]["baseline"]["c"] < out["drafters"]["t5"]["baseline"]["c"]
    out["settings"] = {"gamma": 3, "test_articles": 2}
    assert out["drafters"]["prompt-lookup"]["baseline"]["c"] < out["drafters"]["t5"]["baseline"]["c"]
    assert "ngram3" in format_t5_table(out) and "prompt-lookup" in format_t5_table(out)
