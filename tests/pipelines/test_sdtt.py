"""SDTT's jobs on the session's local Ray: an MDLM teacher with train-mdlm, rounds of distill-sdtt on two
workers (interrupted and resumed: the round, delta and the teacher come back), the students' loaders, and
samples on a Ray Data actor pool."""

from __future__ import annotations

import json

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from safetensors.torch import load_file

from distilray.config import DistillSDTTConfig, SampleDiffusionConfig, TrainMDLMConfig, config_from
from distilray.errors import DistilrayError
from distilray.models.causal_lm import build_causal_lm
from distilray.models.mdlm import EMA_FILE, load_diffusion_lm, load_mdlm
from distilray.pipelines import distill_sdtt, sample_diffusion, train_mdlm

pytestmark = pytest.mark.ray

TINY = dict(batch_size=8, checkpoint_every=4, report_every=2, eval_blocks=4, use_gpu="false", cpus_per_worker=1)


@pytest.fixture(scope="module")
def teacher(ray_session, small_tokenizer, tmp_path_factory):
    _, tok_dir = small_tokenizer
    cfg = config_from(
        TrainMDLMConfig,
        model="dit-micro",
        tokenizer=str(tok_dir),
        seq_len=32,
        steps=12,
        lr=3e-3,
        warmup_steps=2,
        artifacts_dir=str(tmp_path_factory.mktemp("mdlm")),
        **TINY,
    )
    return cfg, train_mdlm.run(cfg)


def test_train_mdlm_learns_and_keeps_ema_weights(teacher):
    cfg, result = teacher
    assert result["steps"] == 12 and result["final_loss"] < result["first_loss"]
    assert np.isfinite(result["val_nelbo"]) and result["val_ppl_bound"] > 1
    folder = result["model_dir"]
    raw, ema = load_diffusion_lm(folder, ema=False), load_diffusion_lm(folder)
    saved_ema = load_file(f"{folder}/{EMA_FILE}")
    name = next(iter(saved_ema))
    assert torch.equal(ema.state_dict()[name], saved_ema[name])
    assert not torch.equal(raw.state_dict()[name], ema.state_dict()[name])  # the average lags the weights
    assert train_mdlm.run(cfg)["cached"] is True


def test_another_architecture_is_a_clear_error(small_tokenizer, tmp_path):
    tok, _ = small_tokenizer
    build_causal_lm("tiny", tok).save_pretrained(tmp_path / "gpt2")
    with pytest.raises(DistilrayError, match="not an MDLM|gpt2"):
        load_mdlm(tmp_path / "gpt2")
    with pytest.raises(DistilrayError, match="gpt2|MDLM"):
        distill_sdtt.run(config_from(DistillSDTTConfig, teacher=str(tmp_path / "gpt2")))


def _distill(teacher_dir: str, out, **over):
    keys = dict(
        teacher=teacher_dir,
        orig_num_steps=64,
        grow_dt_every=3,
        steps=8,
        num_workers=2,
        lr=1e-3,
        warmup_steps=1,
        output_dir=str(out),
        **TINY,
    )
    return distill_sdtt.run(config_from(DistillSDTTConfig, **{**keys, **over}))


def test_rounds_on_two_workers_resume_where_an_uninterrupted_run_ends(teacher, tmp_path, monkeypatch):
    teacher_dir = teacher[1]["model_dir"]
    clean = _distill(teacher_dir, tmp_path / "clean")
    assert clean["rounds"] == 2 and clean["sampling_steps"] == {"1": 32, "2": 16}
    assert [r["round"] for r in distill_sdtt.round_summaries(clean["run_dir"])] == [1, 2]
    # fail after the step-4 checkpoint: round 1 is over (step 3), so the teacher is the round-1 student
    monkeypatch.setenv("DISTILRAY_FAIL_AT_STEP", "5")
    resumed = _distill(teacher_dir, tmp_path / "resumed")
    assert (tmp_path / "resumed" / "injected_failure").exists()
    for name in ("model.safetensors", EMA_FILE):
        want, got = load_file(f"{clean['model_dir']}/{name}"), load_file(f"{resumed['model_dir']}/{name}")
        assert all(torch.allclose(got[k], want[k], atol=1e-5) for k in want), name
    checkpoints = sorted((tmp_path / "resumed" / "ray").glob("*/checkpoint_0*"))
    state = json.loads((checkpoints[-1] / "trainer_state.json").read_text())
    assert state["extra"]["round"] == 2 and state["extra"]["delta"] == pytest.approx(4 * (1 - 1e-5) / 64)
    # the students load by round, as the seed's loaders do
    cfg = config_from(
        DistillSDTTConfig,
        teacher=teacher_dir,
        orig_num_steps=64,
        grow_dt_every=3,
        steps=8,
        output_dir=str(tmp_path / "clean"),
    )
    first, last = distill_sdtt.load_student(cfg, round=1), distill_sdtt.load_student(cfg)
    assert any(not torch.equal(a, b) for a, b in zip(first.parameters(), last.parameters()))  # trained on
    with pytest.raises(DistilrayError, match="round 5"):
        distill_sdtt.load_student(cfg, round=5)


def test_samples_on_a_ray_data_actor_pool(teacher, tmp_path):
    model_dir = teacher[1]["model_dir"]
    base = dict(model=model_dir, num_samples=4, num_steps=4, batch_size=2, output_dir=str(tmp_path))
    out = sample_diffusion.run(config_from(SampleDiffusionConfig, **base))
    table = pq.read_table(out["parquet"]).sort_by("sample_id")
    assert table.num_rows == 4 and set(table.column_names) >= {"token_ids", "text", "steps", "nfe", "seconds"}
    tokens = sample_diffusion.read_samples(out["output_dir"])
    assert tokens.shape == (4, 32) and out["mean_nfe"] <= 5  # 4 steps and at most one final denoise
    assert not (tokens == load_mdlm(model_dir).config.mask_id).any()
    assert sample_diffusion.run(config_from(SampleDiffusionConfig, **base))["cached"] is True
    prompted = sample_diffusion.run(config_from(SampleDiffusionConfig, **base, prompt_tokens=6))
    rows = pq.read_table(prompted["parquet"]).sort_by("sample_id")
    prompts = np.stack(rows.column("prompt_ids").to_numpy(zero_copy_only=False))
    seqs = np.stack(rows.column("token_ids").to_numpy(zero_copy_only=False))
    assert prompts.shape == (4, 6) and np.array_equal(seqs[:, :6], prompts)  # the prompt stays the prefix


@pytest.mark.parametrize(
    "over, words",
    [(dict(num_steps=0), "num_steps"), (dict(prompt_tokens=32), "prompt_tokens"), (dict(model=""), "needs model")],
)
def test_bad_sampling_requests_are_clear_errors(teacher, tmp_path, over, words):
    keys = {"model": teacher[1]["model_dir"], "output_dir": str(tmp_path), **over}
    with pytest.raises(DistilrayError, match=words):
        sample_diffusion.run(config_from(SampleDiffusionConfig, **keys))
