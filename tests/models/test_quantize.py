"""int8 quantisation: exact Conv1D conversion, closeness to float32, batch invariance, losslessness of
speculative decoding w.r.t. the quantised target, and the errors."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from distilray.decoding.drafter_api import model_vocab_size
from distilray.decoding.drafters import HFDrafter, load_drafter
from distilray.decoding.speculative import plain_generate, speculative_generate
from distilray.errors import DistilrayError
from distilray.models.causal_lm import build_causal_lm
from distilray.models.conv_drafter import ConvDrafter, ConvDrafterConfig
from distilray.models.drafters import save_drafter
from distilray.models.lstm_drafter import LSTMDrafter, LSTMDrafterConfig
from distilray.models.quantize import (
    QUANTIZE_CHOICES,
    ROWWISE_ATTENTION,
    Int8Linear,
    apply_quantization,
    conv1d_to_linear,
    is_quantized,
    quantize_int8,
)
from distilray.models.rotary_lm import build_rotary_lm

VOCAB = 200
# measured on these seeds: max |logit difference| / max |logit| is 0.017 (GPT-2 tiny) and 0.015 (Llama
# tiny); the bound leaves room for other CPUs' rounding
RELATIVE_LOGIT_TOLERANCE = 0.05


class Vocab:
    """What the model builders read from a tokenizer."""

    bos_token_id = eos_token_id = 1
    pad_token_id = 0

    def __len__(self) -> int:
        return VOCAB


def gpt2(seed: int, factor: float = 1.0) -> nn.Module:
    torch.manual_seed(seed)
    model = build_causal_lm("tiny", Vocab()).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(factor)  # scaled weights: peaky distributions, no greedy near-ties
    return model


@pytest.fixture(autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_conv1d_to_linear_is_exact():
    model = gpt2(0)
    ids = torch.randint(0, VOCAB, (2, 12))
    with torch.no_grad():
        before = model(input_ids=ids).logits
        assert conv1d_to_linear(model) is model
        after = model(input_ids=ids).logits
    assert not any(isinstance(m, Conv1D) for m in model.modules())
    assert sum(isinstance(m, nn.Linear) for m in model.modules()) == 2 * 4 + 1  # 4 per block, and the head
    torch.testing.assert_close(after, before, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_int8_logits_close_to_float32(arch):
    torch.manual_seed(0)
    model = gpt2(0) if arch == "gpt2" else build_rotary_lm("llama-tiny", Vocab(), max_positions=64).eval()
    ids = torch.randint(0, VOCAB, (2, 16))
    with torch.no_grad():
        reference = model(input_ids=ids).logits
        assert quantize_int8(model) is model
        logits = model(input_ids=ids).logits
    assert is_quantized(model) and isinstance(model.get_output_embeddings(), Int8Linear)
    assert model.config._attn_implementation == ROWWISE_ATTENTION
    assert model_vocab_size(model) == VOCAB  # the int8 head still reads as a (V, d) weight
    assert model.get_input_embeddings().weight.dtype == torch.float32  # embeddings untouched
    assert (logits - reference).abs().max() <= RELATIVE_LOGIT_TOLERANCE * reference.abs().max()


def test_vocab_size_of_an_int8_head_never_unpacks_its_weight(monkeypatch):
    """Every request checks the target's width; unpacking an int8 head for it cost ms a request."""
    model = quantize_int8(gpt2(0))

    def unpacked(self):
        raise AssertionError("model_vocab_size unpacked the int8 weight")

    monkeypatch.setattr(Int8Linear, "weight", property(unpacked))
    assert model_vocab_size(model) == VOCAB


def test_int8_rows_do_not_depend_on_the_batch():
    """A token's output is the same alone and inside a longer pass (what makes verification lossless)."""
    linear = nn.Linear(48, 24)
    x = torch.randn(7, 48) * torch.rand(7, 1) * 5
    model = quantize_int8(nn.Sequential(linear))
    layer = model[0]
    assert isinstance(layer, Int8Linear)
    with torch.no_grad():
        full = layer(x)
        for i in range(7):
            assert torch.equal(layer(x[i : i + 1]), full[i : i + 1])
            assert torch.equal(layer(x[i]), full[i])  # a single vector, as nn.Linear takes
        torch.testing.assert_close(full, linear(x), rtol=0, atol=0.05 * float(linear(x).abs().max()))


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_int8_model_gives_a_token_the_same_logits_in_any_pass(arch):
    """Prefill rows do not depend on the prefill's length, and a cached multi-token pass equals one-token steps."""
    from distilray.decoding.cached_model import CachedModel

    torch.manual_seed(0)
    model = gpt2(0) if arch == "gpt2" else build_rotary_lm("llama-tiny", Vocab(), max_positions=128).eval()
    quantize_int8(model)
    ids = torch.randint(0, VOCAB, (80,)).tolist()
    with torch.inference_mode():
        short = model(input_ids=torch.tensor([ids[:61]])).logits[0]
        long = model(input_ids=torch.tensor([ids[:70]])).logits[0, :61]
        assert torch.equal(short, long)
        steps, multi = CachedModel(model), CachedModel(model)
        steps.feed(ids[:50])
        multi.feed(ids[:50])
        one_by_one = torch.cat([steps.feed([t]).logits for t in ids[50:61]])  # (11, V)
        assert torch.equal(multi.feed(ids[50:61], keep=11).logits, one_by_one)
        assert torch.equal(one_by_one[-1], short[-1])


def test_speculative_decoding_of_the_int8_target_equals_its_plain_decoding(tmp_path):
    target = quantize_int8(gpt2(0, factor=4.0))
    drafters = {"transformer": HFDrafter(quantize_int8(gpt2(1, factor=4.0)))}
    torch.manual_seed(2)
    save_drafter(ConvDrafter(ConvDrafterConfig(vocab_size=VOCAB, d_model=32)), tmp_path / "cnn")
    save_drafter(LSTMDrafter(LSTMDrafterConfig(vocab_size=VOCAB, d_model=32)), tmp_path / "lstm")
    for kind in ("cnn", "lstm"):
        drafters[kind] = load_drafter(tmp_path / kind, quantize="int8")
        assert is_quantized(drafters[kind].inner.model)
    drafters["self"] = HFDrafter(target)  # the served model drafting for itself: every draft accepted
    for seed in range(3):
        prompt = torch.randint(0, VOCAB, (10,), generator=torch.Generator().manual_seed(seed)).tolist()
        plain = plain_generate(target, prompt, 24)
        for kind, drafter in drafters.items():
            spec = speculative_generate(target, drafter, prompt, 24, gamma=4)
            assert spec.token_ids == plain.token_ids, kind
        assert spec.rejections == 0 and spec.target_passes == 5


def test_modes_and_errors(tmp_path):
    assert QUANTIZE_CHOICES == ("none", "int8")
    model = gpt2(0)
    assert apply_quantization(model, "none") is model and not is_quantized(model)
    with pytest.raises(DistilrayError, match="unknown quantization 'int4'"):
        apply_quantization(model, "int4")
    with pytest.raises(DistilrayError, match="CPU only"):
        apply_quantization(nn.Linear(4, 4, device="meta"), "int8")
    assert is_quantized(apply_quantization(model, "int8"))
    save_drafter(LSTMDrafter(LSTMDrafterConfig(vocab_size=VOCAB, d_model=16)), tmp_path / "lstm")
    with pytest.raises(DistilrayError, match="unknown quantization"):
        load_drafter(tmp_path / "lstm", quantize="fp8")
    assert not is_quantized(load_drafter(tmp_path / "lstm").inner.model)
