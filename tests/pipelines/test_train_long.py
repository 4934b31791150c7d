"""Token-weighted long-context training on the session's local Ray: a short-context start, a weighted
extension on two workers (interrupted and resumed), self and frozen scoring giving the same weights, frozen
scores cached and checked against their data, eval-long's figures, and the errors users meet first."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from distilray import corpus
from distilray.actors.long_scorer import ShortContextScorer
from distilray.config import EvalLongConfig, PrepareLongConfig, TrainLongConfig, config_from
from distilray.errors import DistilrayError
from distilray.models.causal_lm import build_causal_lm
from distilray.pipelines import eval_long, prepare_long, score_long, train_long
from distilray.pipelines.train_long import LongHooks
from distilray.ray_train.hooks import WorkerInfo

pytestmark = pytest.mark.ray

TINY = dict(checkpoint_every=3, report_every=1, eval_sequences=2, use_gpu="false", cpus_per_worker=1)
L, B, S = 64, 32, 16  # extended length, window b, stride s: J = 2 window passes per sequence


@pytest.fixture(scope="module")
def long_data(small_tokenizer, tmp_path_factory):
    """Six long 'documents' (the built-in corpus joined) cut into BOS + 63-token sequences."""
    _, tok_dir = small_tokenizer
    root = tmp_path_factory.mktemp("long")
    docs = corpus.load_documents("pydoc")
    (root / "docs").mkdir()
    for i in range(6):
        (root / "docs" / f"doc{i}.txt").write_text("\n\n".join(docs[i::6]))
    cfg = config_from(PrepareLongConfig, dataset=str(root / "docs"), tokenizer=str(tok_dir), seq_len=L)
    return prepare_long.run(dataclasses.replace(cfg, output_dir=str(root / "data")))["output_dir"]


@pytest.fixture(scope="module")
def start(ray_session, small_tokenizer, long_data, tmp_path_factory):
    """A llama-tiny trained from scratch at the short context b."""
    _, tok_dir = small_tokenizer
    cfg = config_from(
        TrainLongConfig,
        data=long_data,
        model="llama-tiny",
        tokenizer=str(tok_dir),
        seq_len=B,
        steps=6,
        batch_size=8,
        lr=3e-3,
        warmup_steps=1,
        variant="uniform",
        base_length=B,
        artifacts_dir=str(tmp_path_factory.mktemp("start")),
        **TINY,
    )
    return train_long.run(cfg)


def _extend(start, long_data, out, **over):
    keys = dict(
        data=long_data,
        init=start["model_dir"],
        seq_len=L,
        steps=6,
        batch_size=4,
        lr=1e-3,
        warmup_steps=1,
        variant="dense",
        base_length=B,
        base_stride=S,
        artifacts_dir=str(out),
        **TINY,
    )
    return train_long.run(config_from(TrainLongConfig, **{**keys, **over}))


def test_start_trains_at_the_short_context(start):
    assert start["steps"] == 6 and start["final_loss"] < start["first_loss"]
    assert np.isfinite(start["val_ppl"]) and start["extra_forward_passes_per_step"] == 0


def test_weighted_extension_on_two_workers_resumes_where_an_uninterrupted_run_ends(
    start, long_data, tmp_path, monkeypatch
):
    clean = _extend(start, long_data, tmp_path / "clean", num_workers=2)
    assert clean["extra_forward_passes_per_step"] == 4 * (L - B) // S  # batch x J, reported
    metrics = (Path(clean["run_dir"]) / "metrics.csv").read_text().splitlines()
    header = metrics[0].split(",")
    for column in ("unweighted_loss", "weight_mean", "weight_std", "zero_weight_share", "negative_score_share"):
        assert column in header, column
    mean = [float(row.split(",")[header.index("weight_mean")]) for row in metrics[1:]]
    assert mean and all(abs(m - 1.0) < 1e-4 for m in mean)  # dense: L1 then interpolation keep the row mean at 1
    monkeypatch.setenv("DISTILRAY_FAIL_AT_STEP", "4")
    resumed = _extend(start, long_data, tmp_path / "resumed", num_workers=2)
    assert (Path(resumed["run_dir"]) / "injected_failure").exists()
    want = load_file(f"{clean['model_dir']}/model.safetensors")
    got = load_file(f"{resumed['model_dir']}/model.safetensors")
    assert all(torch.allclose(got[k], want[k], atol=1e-5) for k in want)
    changed = load_file(f"{start['model_dir']}/model.safetensors")
    assert any(not torch.equal(changed[k], want[k]) for k in want)  # the extension trained


def _hooks(cfg, data: dict, folders: dict, tmp_path) -> LongHooks:
    return LongHooks(cfg, WorkerInfo(rank=0, world=1, device=torch.device("cpu"), run_dir=tmp_path), data, folders)


def test_self_and_frozen_scoring_give_the_same_weights_for_the_same_model(start, long_data, tmp_path):
    _, ids = prepare_long.read_long_split(long_data, "train")
    rows = ids[:4]
    keys = dict(data=long_data, init=start["model_dir"], seq_len=L, batch_size=4, base_length=B, base_stride=S)
    self_cfg = config_from(TrainLongConfig, variant="sparse", **keys)
    frozen_cfg = config_from(TrainLongConfig, variant="sparse", scorer="frozen", **keys)
    tok = Path(start["tokenizer_dir"])
    folders = {"tokenizer": tok, "init": Path(start["model_dir"])}
    scorer = ShortContextScorer(start["model_dir"], B, S, bos_id=int(rows[0, 0]), windows_per_pass=3)
    short = np.stack(scorer({"seq_id": np.arange(4), "input_ids": list(rows)})["short_losses"])
    a = _hooks(self_cfg, {"train": rows}, folders, tmp_path)
    b = _hooks(frozen_cfg, {"train": rows, "short_losses": short}, folders, tmp_path)
    model = a.build()  # the same weights score both ways (the start's RoPE kept: rope_theta=0)
    loss_a, stats_a = a.loss(model, a.batch(0), 0)
    loss_b, stats_b = b.loss(model, b.batch(0), 0)
    assert torch.allclose(loss_a, loss_b, atol=1e-5)
    assert stats_a["zero_weight_share"] == pytest.approx(0.75, abs=0.02)  # sparse kappa 0.25 keeps a quarter
    for k in stats_a:
        assert stats_a[k] == pytest.approx(stats_b[k], abs=1e-5), k


def test_frozen_scores_are_cached_and_refused_for_other_data(start, long_data, tmp_path):
    res = _extend(start, long_data, tmp_path, scorer="frozen", steps=2)
    assert res["scorer"] == "frozen" and res["extra_forward_passes_per_step"] == 0
    folder = score_long.scores_dir(Path(long_data), start["model_dir"], B, S)
    assert (folder / "scores.json").is_file()
    mtime = (folder / "scores.json").stat().st_mtime_ns
    assert score_long.frozen_scores(long_data, start["model_dir"], B, S) == folder
    assert (folder / "scores.json").stat().st_mtime_ns == mtime  # reused, not scored again
    other = tmp_path / "other"
    meta = prepare_long.read_meta(long_data)
    prepare_long.prepare_long(meta["dataset"], meta["tokenizer_dir"], str(other), L, seed=1)
    seq_ids, _ = prepare_long.read_long_split(other, "train")
    with pytest.raises(DistilrayError, match="another data preparation"):
        score_long.read_scores(folder, other, seq_ids)
    train_ids, _ = prepare_long.read_long_split(long_data, "train")
    with pytest.raises(DistilrayError, match="another scorer"):
        score_long.read_scores(folder, long_data, train_ids, scorer=res["model_dir"])
    with pytest.raises(DistilrayError, match="native context"):
        score_long.frozen_scores(long_data, start["model_dir"], 48, 16)  # the start reads 32 tokens


def test_eval_long_reports_every_figure(start, long_data, tmp_path):
    extended = _extend(start, long_data, tmp_path, variant="uniform", steps=2)
    cfg = config_from(
        EvalLongConfig,
        models=(start["model_dir"], extended["model_dir"]),
        data=long_data,
        evaluator=extended["model_dir"],
        short_length=8,
        short_step=4,
        base_length=B,
        sequences=2,
        probe_distances=(4, 8, 500),
        probes_per_distance=2,
        short_context=16,
        short_tokens=200,
        output=str(tmp_path / "eval.json"),
    )
    with pytest.raises(DistilrayError, match="reads 32 tokens"):  # the start cannot read 64-token sequences
        eval_long.run(cfg)
    out = eval_long.run(dataclasses.replace(cfg, models=(extended["model_dir"],)))
    (figures,) = out["models"].values()
    assert figures["long_ppl"] > 1 and figures["long_ppl_before_b"] > 1 and figures["long_ppl_after_b"] > 1
    assert figures["long_key_ppl"] is None or figures["long_key_ppl"] > 1
    # a 64-token context holds no probe (their instructions alone take ~40 tokens): dropped, and said so
    assert figures["passkey_acc"] == {} and figures["probe_distances_dropped"] == [4, 8, 500]
    assert figures["short_ppl"] > 1 and (tmp_path / "eval.json").is_file() and Path(out["plot"]).is_file()


def test_bad_input_is_a_clear_error(start, long_data, small_tokenizer, tmp_path):
    with pytest.raises(DistilrayError, match="stride|divid"):
        _extend(start, long_data, tmp_path, base_stride=12)  # (64 - 32) % 12 != 0
    with pytest.raises(DistilrayError, match="kappa"):
        config_from(TrainLongConfig, variant="sparse", kappa=0.0)
    with pytest.raises(DistilrayError, match="ignores"):
        config_from(TrainLongConfig, variant="longce", kappa=0.5)
    tok, _ = small_tokenizer
    build_causal_lm("tiny", tok).save_pretrained(tmp_path / "gpt2")
    tok.save_pretrained(tmp_path / "gpt2")
    with pytest.raises(DistilrayError, match="rotary"):
        _extend(start, long_data, tmp_path, init=str(tmp_path / "gpt2"))


def test_bench_times_uniform_and_self_scoring_side_by_side(start, long_data, small_tokenizer, tmp_path):
    from distilray.bench import token_weighting as bench
    from distilray.config import BenchTokenWeightingConfig

    cfg = config_from(
        BenchTokenWeightingConfig,
        seq_len=L,
        base_length=B,
        base_stride=S,
        batch_size=2,
        variants=("uniform", "dense", "longce"),
        timing_steps=2,
        artifacts_dir=str(tmp_path),
    )
    prepared = {
        "data": long_data,
        "tokenizer": str(small_tokenizer[1]),
        "start": start,
        "common": {"data": long_data, "artifacts_dir": str(tmp_path), "seed": 0, "eval_sequences": 2},
    }
    timing = bench.step_timing(cfg, prepared)
    assert set(timing) == {"uniform", "dense-unfrozen", "longce-unfrozen"}  # frozen runs add no scoring pass
    assert timing["uniform"]["vs_uniform"] == 1.0 and all(t["steps"] == 2 for t in timing.values())
    assert all(t["step_seconds"] > 0 for t in timing.values())
