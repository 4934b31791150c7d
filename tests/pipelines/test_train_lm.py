"""Ray Train on the session's local Ray: two DDP workers, checkpoints, crash and resume."""

import csv
import json

import pytest

from distilray.config import TrainLMConfig, load_config
from distilray.errors import DistilrayError
from distilray.models.causal_lm import load_causal_lm
from distilray.pipelines import train_lm

pytestmark = pytest.mark.ray


def _cfg(tmp_path, name, **over):
    keys = {
        "model": "tiny",
        "steps": 6,
        "checkpoint_every": 3,
        "seq_len": 32,
        "batch_size": 4,
        "warmup_steps": 2,
        "num_workers": 2,
        "vocab_size": 512,
        "eval_max_tokens": 2000,
        "artifacts_dir": str(tmp_path),
        "name": name,
        "max_failures": 0,
        **over,
    }
    return load_config(TrainLMConfig, None, [f"{k}={v}" for k, v in keys.items()])


def _steps(run_dir):
    with open(run_dir / "metrics.csv") as f:
        return [int(r["step"]) for r in csv.DictReader(f)]


@pytest.fixture(scope="module")
def reference_run(ray_session, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("train")
    return tmp, train_lm.run(_cfg(tmp, "reference"))


def test_two_workers_train_and_save_a_hf_model(reference_run):
    tmp, res = reference_run
    assert res["steps"] == 6 and res["num_workers"] == 2 and not res["cached"]
    assert res["val_ppl"] > 1 and res["tokens_per_s"] > 0
    model = load_causal_lm(res["model_dir"], device="cpu")
    assert model.config.n_layer == 2 and model.config.vocab_size == 512
    run_dir = tmp / "lm" / "reference"
    assert _steps(run_dir) == [1, 2, 3, 4, 5, 6]
    assert any((run_dir / "tensorboard").iterdir())
    assert json.loads((run_dir / "result.json").read_text())["final_loss"] == res["final_loss"]
    # a second call with the same config is served from the cache
    assert train_lm.run(_cfg(tmp, "reference"))["cached"] is True


def test_crash_then_rerun_resumes_from_checkpoint(reference_run, tmp_path, monkeypatch):
    monkeypatch.setenv("DISTILRAY_FAIL_AT_STEP", "4")
    with pytest.raises(DistilrayError, match="injected failure at step 4"):
        train_lm.run(_cfg(reference_run[0], "crashy"))
    run_dir = reference_run[0] / "lm" / "crashy"
    assert not (run_dir / "result.json").exists()
    assert _steps(run_dir) == [1, 2, 3, 4]  # the failure hits before the 5th step
    monkeypatch.delenv("DISTILRAY_FAIL_AT_STEP")
    res = train_lm.run(_cfg(reference_run[0], "crashy"))
    assert res["steps"] == 6
    assert _steps(run_dir) == [1, 2, 3, 4, 5, 6]  # steps after the checkpoint re-done once, not duplicated
    # same batches, same weights at the checkpoint: the resumed run ends where the uninterrupted one did
    assert res["final_loss"] == pytest.approx(reference_run[1]["final_loss"], rel=1e-4)


def test_worker_failure_is_retried_in_run(reference_run, monkeypatch):
    monkeypatch.setenv("DISTILRAY_FAIL_AT_STEP", "5")
    res = train_lm.run(_cfg(reference_run[0], "retried", max_failures=1))
    assert res["steps"] == 6
    assert (reference_run[0] / "lm" / "retried" / "injected_failure").exists()
    assert res["final_loss"] == pytest.approx(reference_run[1]["final_loss"], rel=1e-4)


def test_bad_model_path_is_a_clear_error(ray_session, tmp_path):
    (tmp_path / "notamodel").mkdir()
    with pytest.raises(DistilrayError, match="not a model folder"):
        train_lm.run(_cfg(tmp_path, "bad", model=str(tmp_path / "notamodel"), tokenizer=""))


def test_cache_key_follows_the_tokenizer_not_its_path(small_tokenizer, tmp_path, monkeypatch):
    _, tok_dir = small_tokenizer
    monkeypatch.chdir(tok_dir.parent)
    relative = _cfg(tmp_path, "", tokenizer=tok_dir.name)
    absolute = _cfg(tmp_path, "", tokenizer=str(tok_dir))
    assert train_lm.run_dir_for(relative) == train_lm.run_dir_for(absolute)
    assert train_lm.run_dir_for(absolute) != train_lm.run_dir_for(_cfg(tmp_path, "", tokenizer=str(tok_dir), steps=7))
