import numpy as np
import pytest
import torch

from distilray.errors import DistilrayError
from distilray.eval.perplexity import perplexity, sliding_window_nll
from distilray.models.causal_lm import PRESETS, build_causal_lm, count_parameters, load_causal_lm
from distilray.tokenizer import load_tokenizer, train_bpe_tokenizer, vocab_fingerprint


def test_tokenizer_roundtrip_and_special_tokens(small_tokenizer):
    tok, path = small_tokenizer
    assert len(tok) == 512
    assert [tok.bos_token, tok.eos_token, tok.pad_token, tok.mask_token] == [
        "<|bos|>",
        "<|eos|>",
        "<|pad|>",
        "<|mask|>",
    ]
    text = "The `for` statement iterates over the elements of a sequence.\n  Indented: x = 1"
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert tok.decode(ids) == text  # byte-level BPE is lossless
    reloaded = load_tokenizer(path)
    assert reloaded(text, add_special_tokens=False)["input_ids"] == ids
    assert vocab_fingerprint(reloaded) == vocab_fingerprint(tok)


def test_tokenizer_errors(tmp_path):
    with pytest.raises(DistilrayError, match="not a tokenizer folder"):
        load_tokenizer(tmp_path)
    with pytest.raises(DistilrayError, match="at least 300"):
        train_bpe_tokenizer(["abc"], vocab_size=100)


def test_presets_span_drafter_to_target(small_tokenizer):
    tok, _ = small_tokenizer
    sizes = {name: count_parameters(build_causal_lm(name, tok)) for name in ("tiny", "mini")}
    assert sizes["tiny"] < sizes["mini"]
    assert set(PRESETS) >= {"tiny", "mini", "small", "gpt2", "gpt2-xl"}
    with pytest.raises(DistilrayError, match="unknown model preset"):
        build_causal_lm("enormous", tok)


def test_save_pretrained_model_loads_through_the_user_loader(small_tokenizer, tmp_path):
    """The loader a user points at `gpt2` also takes a local save_pretrained folder."""
    tok, _ = small_tokenizer
    torch.manual_seed(0)
    model = build_causal_lm("tiny", tok).eval()
    model.save_pretrained(tmp_path / "m")
    tok.save_pretrained(tmp_path / "m")
    loaded = load_causal_lm(tmp_path / "m", device="cpu")
    assert type(loaded).__name__ == "GPT2LMHeadModel"
    ids = torch.tensor([[5, 17, 42, 7]])
    with torch.no_grad():
        assert torch.allclose(model(ids).logits, loaded(ids).logits, atol=1e-5)
    assert (tmp_path / "m" / "model.safetensors").is_file()


def test_loader_errors_are_clear(tmp_path):
    with pytest.raises(DistilrayError, match="not a model folder"):
        load_causal_lm(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(DistilrayError, match="unreadable"):
        load_causal_lm(tmp_path)


def test_sliding_window_scores_every_token_once(small_tokenizer):
    tok, _ = small_tokenizer
    torch.manual_seed(0)
    model = build_causal_lm("tiny", tok).eval()
    tokens = np.random.default_rng(0).integers(0, len(tok), size=301)
    # with a window covering everything, the sliding sum equals one full forward pass
    full_nll, n_full = sliding_window_nll(model, tokens, context_len=512, stride=256)
    with torch.no_grad():
        logp = torch.log_softmax(model(torch.tensor(tokens[None])).logits[0, :-1], -1)
    direct = -logp.gather(-1, torch.tensor(tokens[1:, None])).sum().item()
    assert n_full == 300
    assert full_nll == pytest.approx(direct, rel=1e-5)
    nll, n = sliding_window_nll(model, tokens, context_len=64, stride=16, batch_size=3)
    assert n == 300
    assert np.isfinite(nll) and nll != pytest.approx(full_nll, rel=1e-9)  # less context, other value
    assert perplexity(model, tokens, 64, 16)["ppl"] == pytest.approx(np.exp(nll / n), rel=1e-6)
