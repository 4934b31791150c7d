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
def setup():
    texts = [pydoc_data.topics.topics[k] for k in sorted(pydoc_data.topics.topics)[:12]]
    tok = train_bpe_tokenizer(texts, vocab_size=300)
    torch.manual_seed(0)
    target = build_causal_lm("tiny", tok).eval()
    with torch.no_grad():
        for p in target.parameters():
            p.mul_(4)  # peaky, so greedy ties cannot hide a bug
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
    from distilray.decoding.drafter_api import HFDrafter

    tok, target, ids = setup
    torch.manual_seed(2)
    assistant = build_causal_lm("tiny", tok).eval()
    for seq in ids[:3]:
        prompt = seq[:12]
        ours = speculative_generate(target, HFDrafter(assistant), prompt, 20, gamma=4).token_ids
        theirs = target.generate(
            torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long), assistant_model=assistant,
            do_sample=False, max_new_tokens=20, min_new_tokens=20, pad_token_id=tok.pad_token_id, eos_token_id=None,
        )[0, len(prompt):].tolist()
        assert ours == theirs
