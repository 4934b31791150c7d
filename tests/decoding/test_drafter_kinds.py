"""Every drafter kind through the same lossless decoder: greedy output equals the target's own."""

import pydoc_data.topics

import pytest
import torch

from distilray.decoding.speculative import plain_generate, speculative_generate
from distilray.models.causal_lm import build_causal_lm
from distilray.models.conv_drafter import ConvDrafter, ConvDrafterConfig, ConvDrafterState
from distilray.models.lstm_drafter import LSTMDrafter, LSTMDrafterConfig, LSTMDrafterState
from distilray.models.ngram import NGramDrafter
from distilray.tokenizer import encode_documents, train_bpe_tokenizer


@pytest.fixture(scope="module")
def setup(tiny_lm):
    texts = [pydoc_data.topics.topics[k] for k in sorted(pydoc_data.topics.topics)[:12]]
    tok = train_bpe_tokenizer(texts, vocab_size=300)
    target = tiny_lm(tok, 0)
    ids = encode_documents(tok, texts)
    return tok, target, ids


def _drafters(vocab, ids):
    torch.manual_seed(1)
    ngram = NGramDrafter(3, vocab)
    ngram.fit(ids)
    conv = ConvDrafterState(ConvDrafter(ConvDrafterConfig(vocab_size=vocab, d_model=32)).eval())
    lstm = LSTMDrafterState(LSTMDrafter(LSTMDrafterConfig(vocab_size=vocab, d_model=32)).eval())
    return {"ngram3": ngram, "cnn": conv, "lstm": lstm}


def test_greedy_identical_for_every_drafter_kind(setup):
    tok, target, ids = setup
    vocab = target.config.vocab_size
    prompts = [seq[:12] for seq in ids[:3]]
    for kind, drafter in _drafters(vocab, ids).items():
        for prompt in prompts:
            want = plain_generate(target, prompt, 20, temperature=0.0, top_p=1.0, seed=0, eos_token_id=None).token_ids
            got = speculative_generate(target, drafter, prompt, 20, gamma=3)
            assert got.token_ids == want, kind
            assert got.drafted > 0 and got.accepted + got.rejections > 0


def test_same_greedy_tokens_as_transformers_assisted_generation(setup):
    from distilray.decoding.drafters import HFDrafter

    tok, target, ids = setup
    torch.manual_seed(2)
    assistant = build_causal_lm("tiny", tok).eval()
    for seq in ids[:3]:
        prompt = seq[:12]
        ours = speculative_generate(target, HFDrafter(assistant), prompt, 20, gamma=4).token_ids
        theirs = target.generate(
            torch.tensor([prompt]),
            attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
            assistant_model=assistant,
            do_sample=False,
            max_new_tokens=20,
            min_new_tokens=20,
            pad_token_id=tok.pad_token_id,
            eos_token_id=None,
        )[0, len(prompt) :].tolist()
        assert ours == theirs


def test_load_drafter_gives_block_drafters_whose_copies_do_not_share_state(setup, tmp_path):
    """Every saved kind loads as a `Drafter`; a shallow copy (a Serve session) has its own state."""
    import copy

    from distilray.decoding.drafter_api import Drafter
    from distilray.decoding.drafters import load_drafter
    from distilray.decoding.sampling import Sampler, SamplingParams
    from distilray.models.drafters import save_drafter

    tok, target, ids = setup
    vocab = target.config.vocab_size
    save_drafter(target, tmp_path / "transformer")
    for kind, drafter in _drafters(vocab, ids).items():
        save_drafter(getattr(drafter, "model", drafter), tmp_path / kind)
    greedy = Sampler(SamplingParams(4))
    for kind in ("ngram3", "cnn", "lstm", "transformer"):
        template = load_drafter(tmp_path / kind)
        assert isinstance(template, Drafter) and template.vocab_size == vocab and not template.needs_target_hidden
        template.start([5, 6, 7])
        first = template.propose(2, greedy)
        session = copy.copy(template)
        session.start([9, 9, 9, 9])
        assert template.length() == 5 and session.length() == 4, kind
        template.rollback(3)
        assert template.propose(2, greedy).tokens == first.tokens, kind  # its state was not touched
        assert first.probs is None  # greedy drafts are point masses
        sampled = template.propose(3, Sampler(SamplingParams(4, temperature=1.0)))
        assert sampled.probs.shape == (3, vocab)
        torch.testing.assert_close(sampled.probs.sum(-1), torch.ones(3))
