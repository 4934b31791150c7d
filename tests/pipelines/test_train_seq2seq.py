"""`distilray train-seq2seq`: pair splits, the loss (shift, masks, distillation), checkpoint restore,
one tiny Ray Train run whose loss falls, and a distillation run from it (teacher=)."""

import math
from pathlib import Path

import pytest
import torch

from distilray.config import TrainSeq2SeqConfig, config_from, replace_keys
from distilray.decoding.speculative import plain_generate
from distilray.errors import DistilrayError
from distilray.models.seq2seq_lm import (
    IGNORE,
    build_seq2seq_lm,
    decoder_start_id,
    is_seq2seq,
    load_seq2seq_lm,
    seq2seq_loss,
    shift_right,
)
from distilray.pipelines import train_seq2seq
from distilray.tokenizer import load_tokenizer, train_bpe_tokenizer
from distilray.training import make_optimizer, save_checkpoint


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny matrices gain nothing from a second thread, and OpenMP threads crawl on a shared, busy CPU."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def tok():
    return train_bpe_tokenizer(
        ["The quick brown fox jumps over the lazy dog. " * 20, "Police said on Monday. " * 20], vocab_size=300
    )


def test_pairs_split_deterministically_and_disjointly():
    pairs = train_seq2seq.load_pairs("cnndm")
    assert len(pairs) == 250 and all(a and h for a, h in pairs)
    splits = train_seq2seq.split_pairs(pairs, 25, 25, seed=0)
    assert [len(splits[s]) for s in ("train", "validation", "test")] == [200, 25, 25]
    assert splits == train_seq2seq.split_pairs(pairs, 25, 25, seed=0)
    assert splits["test"] != train_seq2seq.split_pairs(pairs, 25, 25, seed=1)["test"]
    seen = [a for s in splits.values() for a, _ in s]
    assert sorted(seen) == sorted(a for a, _ in pairs)
    with pytest.raises(DistilrayError, match="leave training pairs"):
        train_seq2seq.split_pairs(pairs, 200, 50, seed=0)
    with pytest.raises(DistilrayError, match="pairs"):
        train_seq2seq.load_pairs("pydoc")


def test_shift_right_and_masked_loss(tok):
    pad, start = tok.pad_token_id, tok.bos_token_id
    labels = torch.tensor([[11, 12, 13, IGNORE], [21, IGNORE, IGNORE, IGNORE]])
    assert shift_right(labels, start, pad).tolist() == [[start, 11, 12, 13], [start, 21, pad, pad]]
    torch.manual_seed(0)
    model = build_seq2seq_lm("t5-micro", tok).eval()
    src = torch.tensor([[40, 41, 42, tok.eos_token_id, pad], [50, 51, tok.eos_token_id, pad, pad]])
    loss = seq2seq_loss(model, src, labels, pad, start)
    # extra padding columns change nothing: padded sources are masked, padded labels ignored
    wider_src = torch.cat([src, torch.full((2, 3), pad)], 1)
    wider_labels = torch.cat([labels, torch.full((2, 2), IGNORE)], 1)
    torch.testing.assert_close(seq2seq_loss(model, wider_src, wider_labels, pad, start), loss)
    # CE is HF's own labels= loss (shifted inside with decoder_start_token_id)
    hf = model(input_ids=src, attention_mask=(src != pad).long(), labels=labels).loss
    torch.testing.assert_close(loss, hf)
    # distilling a model from itself: the divergence is 0; with ce_weight the CE comes back
    zero = seq2seq_loss(model, src, labels, pad, start, teacher=model, kind="fkl", temperature=2.0)
    assert abs(float(zero)) < 1e-5
    mixed = seq2seq_loss(model, src, labels, pad, start, teacher=model, kind="fkl", temperature=2.0, ce_weight=0.5)
    torch.testing.assert_close(mixed, 0.5 * loss, atol=1e-5, rtol=1e-4)


def test_checkpoint_restore_roundtrip(tok, tmp_path):
    torch.manual_seed(0)
    model = build_seq2seq_lm("t5-micro", tok)
    opt = make_optimizer(model, 1e-3, 0.0)
    model(input_ids=torch.tensor([[5, 6, 7]]), labels=torch.tensor([[8, 9]])).loss.backward()
    opt.step()
    save_checkpoint(tmp_path, model, tok, opt, {"step": 7})
    torch.manual_seed(1)
    fresh = build_seq2seq_lm("t5-micro", tok)
    fresh_opt = make_optimizer(fresh, 1e-3, 0.0)
    assert train_seq2seq.restore_checkpoint(tmp_path, fresh, fresh_opt) == 7
    for (name, a), b in zip(model.state_dict().items(), fresh.state_dict().values()):
        torch.testing.assert_close(a, b, msg=name)
    (tmp_path / "model.safetensors").write_bytes(b"garbage")
    with pytest.raises(DistilrayError, match="corrupt"):
        train_seq2seq.restore_checkpoint(tmp_path, fresh, fresh_opt)


def test_bad_configs_are_named(tmp_path):
    with pytest.raises(DistilrayError, match="loss"):
        train_seq2seq.validate(TrainSeq2SeqConfig(teacher="x", loss="ce"))
    with pytest.raises(DistilrayError, match="max_source_tokens"):
        train_seq2seq.validate(TrainSeq2SeqConfig(max_source_tokens=1))
    with pytest.raises(DistilrayError, match="not a model folder"):
        train_seq2seq.run(TrainSeq2SeqConfig(model=str(tmp_path)))


def test_train_then_distil_with_ray_train(ray_session, tmp_path):
    cfg = config_from(
        TrainSeq2SeqConfig,
        model="t5-micro",
        vocab_size=512,
        max_source_tokens=64,
        max_target_tokens=24,
        steps=25,
        batch_size=8,
        lr=3e-3,
        warmup_steps=3,
        checkpoint_every=25,
        cpus_per_worker=1,
        artifacts_dir=str(tmp_path),
    )
    result = train_seq2seq.run(cfg)
    assert result["steps"] == 25 and result["train_pairs"] == 200 and result["val_pairs"] == 25
    assert result["final_loss"] < result["first_loss"] - 0.5
    assert math.isfinite(result["val_loss"]) and result["val_loss"] < math.log(512)
    model_dir = Path(result["model_dir"])
    assert is_seq2seq(model_dir) and not (model_dir / "optimizer.pt").exists()
    model = load_seq2seq_lm(model_dir, device="cpu")
    tokenizer = load_tokenizer(model_dir)  # the checkpoint carries its tokenizer
    src = tokenizer("Police said the man was arrested on Monday.", add_special_tokens=False)["input_ids"]
    out = plain_generate(model, [decoder_start_id(model)], 8, encoder_ids=src).token_ids
    assert len(out) == 8 and all(0 <= t < len(tokenizer) for t in out)
    assert train_seq2seq.run(cfg)["cached"] is True

    kd = replace_keys(
        cfg, teacher=str(model_dir), loss="fkl", temperature=2.0, ce_weight=0.5, steps=6, checkpoint_every=6
    )
    distilled = train_seq2seq.run(kd)
    assert distilled["teacher"] == str(model_dir) and distilled["run_dir"] != result["run_dir"]
    assert distilled["tokenizer_dir"] == str(model_dir.resolve())  # a drafter shares its teacher's tokenizer
    assert math.isfinite(distilled["final_loss"]) and math.isfinite(distilled["val_loss"])
    assert distilled["first_loss"] > 0
    assert is_seq2seq(distilled["model_dir"])
