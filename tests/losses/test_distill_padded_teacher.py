"""Drafter distillation from a teacher whose logits are padded past its tokenizer (T5: 32128 for 32100):
the drafter hooks, stepped without Ray, train a CNN/LSTM drafter sized to the tokenizer on its real ids."""

from __future__ import annotations

import math
from pydoc_data.topics import topics

import numpy as np
import pytest
import torch

from distilray.config import DistillDrafterConfig
from distilray.losses.distillation import distillation_loss
from distilray.models.causal_lm import build_causal_lm
from distilray.pipelines.distill_drafter import DrafterHooks
from distilray.ray_train.hooks import WorkerInfo
from distilray.tokenizer import encode_documents, train_bpe_tokenizer
from distilray.training import flat_tokens, pack_tokens

PAD = 8  # padded logit columns past the tokenizer


@pytest.fixture(scope="module")
def padded_teacher(tmp_path_factory):
    """A tiny GPT-2 with PAD extra output rows whose logits are large: unmasked, they would dominate."""
    texts = list(topics.values())[:12]
    tok = train_bpe_tokenizer(texts, vocab_size=300)
    torch.manual_seed(0)
    model = build_causal_lm("tiny", tok)
    model.resize_token_embeddings(len(tok) + PAD, mean_resizing=False)
    with torch.no_grad():
        for param in model.parameters():
            param.mul_(4.0)  # peaked distributions
        weight = model.get_output_embeddings().weight  # (V + PAD, d)
        weight[len(tok) :] = 3.0 * weight[torch.arange(PAD) * 7 + 50]  # amplified copies of real rows
    path = tmp_path_factory.mktemp("padded") / "model"
    model.save_pretrained(path)
    tok.save_pretrained(path)
    stream = flat_tokens(encode_documents(tok, texts), tok.eos_token_id)
    return path, tok, stream


@pytest.mark.parametrize("drafter, loss", [("cnn", "jsd"), ("lstm", "rkl"), ("cnn", "ce"), ("transformer", "fkl")])
def test_drafter_hooks_distil_from_a_padded_teacher(padded_teacher, tmp_path, drafter, loss):
    path, tok, stream = padded_teacher
    cfg = DistillDrafterConfig(
        target=str(path), drafter=drafter, drafter_size="" if drafter == "transformer" else "16", loss=loss,
        ce_weight=0.0 if loss == "ce" else 0.5, seq_len=8, batch_size=4, eval_tokens=64,
    )  # fmt: skip
    data = {"train": pack_tokens([stream.tolist()], 9, tok.eos_token_id), "validation": stream, "vocab": len(tok) + PAD}
    hooks = DrafterHooks(cfg, WorkerInfo(0, 1, torch.device("cpu"), tmp_path), data, {"target": path})
    network = hooks.build()
    assert hooks.vocab_limit == len(tok)
    batch = hooks.batch(0)
    value = hooks.loss(network, batch, 0)
    assert torch.isfinite(value)
    value.backward()
    grads = [p.grad for p in network.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)
    if loss != "ce":  # the teacher's padded columns do not count: the loss over its real columns alone
        with torch.no_grad():
            inputs, targets = batch[:, :-1], batch[:, 1:]
            teacher = hooks.teacher(input_ids=inputs).logits
            assert teacher.shape[-1] == len(tok) + PAD
            student = network(inputs) if drafter != "transformer" else network(input_ids=inputs).logits
            want = distillation_loss(loss, teacher[..., : len(tok)], student[..., : len(tok)], 1.0, 0.5, targets)
        assert value.item() == pytest.approx(want.item(), rel=1e-5)
    figures = hooks.validate(network.eval())
    assert all(math.isfinite(v) for v in figures.values()) and 0.0 <= figures["alpha_t1"] <= 1.0


def test_padded_columns_would_dominate_unmasked(padded_teacher):
    """The fixture is a real test: without the mask the padded ids take most of the teacher's mass."""
    path, tok, stream = padded_teacher
    from distilray.models.causal_lm import load_causal_lm

    teacher = load_causal_lm(path, device="cpu", dtype=torch.float32)
    with torch.no_grad():
        probs = torch.softmax(teacher(input_ids=torch.from_numpy(np.asarray(stream[:16])[None])).logits, -1)
    assert float(probs[..., len(tok) :].sum(-1).mean()) > 0.5
