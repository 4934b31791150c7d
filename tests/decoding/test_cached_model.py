"""The one KV-cache wrapper: feeding after the cache equals a full forward, and `crop_cache` rolls back
causal and encoder-decoder caches alike."""

from __future__ import annotations

import pytest
import torch

from distilray.decoding.cached_model import CachedModel, crop_cache

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tok(pydoc_tokenizer):
    return pydoc_tokenizer(20, 300)


def test_feed_crop_and_refeed_causal(tok, tiny_lm):
    model = tiny_lm(tok, 0)
    seq = [5, 17, 42, 8, 99, 3, 61]
    with torch.no_grad():
        full = model(input_ids=torch.tensor([seq]), output_hidden_states=True)
    lm = CachedModel(model)
    fed = lm.feed(seq[:4], keep=2, hidden=True)
    assert fed.logits.shape == (2, model.config.vocab_size) and fed.hidden.shape == (2, model.config.n_embd)
    torch.testing.assert_close(fed.logits, full.logits[0, 2:4], rtol=0, atol=1e-4)
    torch.testing.assert_close(fed.hidden, full.hidden_states[-1][0, 2:4], rtol=0, atol=1e-4)
    lm.feed([1, 2, 3])  # a wrong continuation, then rolled back
    assert lm.length() == 7
    lm.crop(4)
    assert lm.length() == 4
    rest = lm.feed(seq[4:], keep=3)
    torch.testing.assert_close(rest.logits, full.logits[0, 4:], rtol=0, atol=1e-4)
    assert rest.hidden is None and lm.passes == 3
    lm.crop(0)
    assert lm.cache is None and lm.length() == 0
    torch.testing.assert_close(lm.feed(seq).logits[0], full.logits[0, -1], rtol=0, atol=1e-4)


def test_crop_cache_edges(tok, tiny_lm):
    model = tiny_lm(tok, 1)
    assert crop_cache(None, 3) is None
    with torch.no_grad():
        cache = model(input_ids=torch.tensor([[4, 5, 6]]), use_cache=True).past_key_values
    assert crop_cache(cache, 5) is cache and cache.get_seq_length() == 3  # nothing beyond: untouched
    assert crop_cache(cache, 2).get_seq_length() == 2
    assert crop_cache(cache, 0) is None


def test_encoder_decoder_runs_the_encoder_once_and_crops_the_decoder_only(tok, scaled):
    from distilray.models.seq2seq_lm import build_seq2seq_lm, decoder_start_id

    torch.manual_seed(0)
    model = scaled(build_seq2seq_lm("t5-micro", tok), 2.5)
    src, start = [10, 11, 12, 13, 14], decoder_start_id(model)
    dec = [start, 20, 21, 22]
    with torch.no_grad():
        full = model(input_ids=torch.tensor([src]), decoder_input_ids=torch.tensor([dec])).logits[0]
    lm = CachedModel(model, encoder_ids=src)
    lm.feed(dec[:2])
    lm.feed([7, 7, 7])
    lm.crop(2)  # the self-attention half goes back to 2 tokens, the cross-attention half stays
    torch.testing.assert_close(lm.feed(dec[2:], keep=2).logits, full[2:], rtol=0, atol=1e-4)
    fresh = lm.fresh()
    assert fresh.length() == 0 and fresh.encoder_outputs is lm.encoder_outputs
    torch.testing.assert_close(fresh.feed(dec, keep=1, hidden=True).logits[0], full[-1], rtol=0, atol=1e-4)
    assert lm.encoder_passes == fresh.encoder_passes == 1
