"""The main job and the training benchmark, end to end at toy size on the session's Ray."""

import json
from dataclasses import replace
from pathlib import Path

import pytest

from distilray.bench import train as bench_train
from distilray.config import BenchTrainConfig, CDLMGenerateConfig, QuickstartConfig, load_config
from distilray.pipelines import cdlm_generate, quickstart

pytestmark = pytest.mark.ray


def test_quickstart_trains_both_models_and_reports(ray_session, tmp_path):
    cfg = load_config(
        QuickstartConfig,
        None,
        [
            f"artifacts_dir={tmp_path}",
            "vocab_size=512",
            "target_steps=4",
            "drafter_steps=4",
            "seq_len=32",
            "batch_size=4",
            "sample_tokens=8",
            "cdlm_tok_prob_threshold=0.01",
            "cdlm_prompts=2",
            "cdlm_new_tokens=8",
            "cdlm_similarity_threshold=0.0",
            "spec_distill_steps=3",
            "spec_prompts=2",
            "spec_new_tokens=8",
            "sdtt_seq_len=32",
            "sdtt_teacher_steps=4",
            "sdtt_distill_steps=2",
            "sdtt_orig_num_steps=16",
            "sdtt_samples=2",
            "long_start_steps=3",
            "long_steps=2",
            "long_base_length=32",
            "long_seq_len=128",
            "long_max_sequences=16",
            "long_eval_sequences=2",
            "long_probes=1",
            "tfree_model=tfree-micro",
            "tfree_steps=2",
            "tfree_batch_size=2",
            "tfree_seq_len=32",
            "tfree_eval_words=200",
            "tfree_words=4",
        ],
    )
    summary = quickstart.run(cfg)
    table = quickstart.format_table(summary)
    for needle in (
        "target (mini)",
        "drafter (tiny)",
        "test ppl",
        "validation ppl",
        "parameters",
        "CD-LM",
        "datastore keys",
    ):
        assert needle in table
    params = {stage: value for stage, figure, value in summary["rows"] if figure == "parameters"}
    assert int(params["drafter (tiny)"].replace(",", "")) < int(params["target (mini)"].replace(",", ""))
    for path in summary["artifacts"].values():
        assert Path(path).exists(), path
    assert set(summary["samples"]) == {"target", "drafter"}
    cdlm = {figure: value for stage, figure, value in summary["rows"] if stage == "CD-LM"}
    assert cdlm["verify, datastore actors: FPS / same"].endswith("/ True")  # lossless mode, even on a toy model
    # the paper rows' datastore in process answers as the actors do: the same greedy text either way
    gen = CDLMGenerateConfig(
        model=str(tmp_path / "quickstart" / "cdlm" / "model"),
        datastore=str(tmp_path / "quickstart" / "cdlm" / "datastore"),
        num_prompts=2,
        max_new_tokens=8,
        similarity_threshold=0.0,
    )
    outs = {
        where: cdlm_generate.run(replace(gen, datastore_placement=where, save_dir=str(tmp_path / f"gen-{where}")))
        for where in ("local", "shards")
    }
    assert outs["local"]["chunk_hit_rate"] > 0 and outs["local"]["fps"] == outs["shards"]["fps"]
    for i in range(2):
        texts = [json.loads((tmp_path / f"gen-{w}" / f"prompt_{i}.json").read_text())["token_ids"] for w in outs]
        assert texts[0] == texts[1]
    assert (tmp_path / "quickstart" / "cdlm" / "datastore" / "datastore.json").is_file()
    assert json.loads((tmp_path / "quickstart" / "results.json").read_text())["rows"]
    spec = {figure: value for stage, figure, value in summary["rows"] if stage == "speculative"}
    for name in ("transformer baseline", "transformer distilled", "trigram"):
        assert spec[f"{name}: speedup meas / theo"].endswith("(same as plain: True)")  # lossless, every drafter
    sdtt = {figure: value for stage, figure, value in summary["rows"] if stage == "SDTT"}
    assert set(sdtt) >= {"teacher @ 16 steps: gen ppl / entropy", "student r1 @ 8 steps: gen ppl / entropy"}
    assert sdtt["student @ 8 vs teacher @ 16: time/sample"].endswith("x faster")
    long = {figure: value for stage, figure, value in summary["rows"] if stage == "token weighting"}
    for name in ("uniform CE", "dense (self scoring)"):
        before, after = (float(x) for x in long[f"{name}: ppl before / after b"].split(" / "))
        assert before > 1 and after > 1
    assert long["dense (self scoring): tokens/s, extra passes/step"].endswith(", 16")  # 4 rows x J = L/b = 4 windows
    for folder in ("target", "drafters/ngram3", "drafters/transformer-distilled"):  # what serve_config.yaml points at
        assert (tmp_path / "quickstart" / "speculative" / folder / "config.json").is_file()
    tfree = {figure: value for stage, figure, value in summary["rows"] if stage == "T-Free (tfree-micro)"}
    t_fert, bpe_fert = (float(x) for x in tfree["fertility: T-Free / stage-1 BPE"].split(" / "))
    assert 0.5 < t_fert < 2 and bpe_fert > 0
    assert tfree["vocabulary duplicates: T-Free / BPE"].startswith("0.0% / ")
    assert summary["tfree_sample"].startswith(cfg.tfree_prompt)
    assert (tmp_path / "quickstart" / "tfree" / "model" / "dictionary" / "dictionary.json").is_file()


def test_bench_train_writes_ratios(ray_session, tmp_path):
    out = tmp_path / "bench.json"
    cfg = load_config(
        BenchTrainConfig,
        None,
        [
            "model=tiny",
            "vocab_size=512",
            "seq_len=32",
            "batch_size=4",
            "warmup_steps=1",
            "steps=3",
            "worker_counts=[1]",
            f"artifacts_dir={tmp_path}",
            f"json_out={out}",
        ],
    )
    results = bench_train.run(cfg)
    written = json.loads(out.read_text())
    assert written["ray_train_1w"]["ratio_vs_bare"] == pytest.approx(
        written["ray_train_1w"]["tokens_per_s"] / written["bare_loop"]["tokens_per_s"]
    )
    assert written["goal"]["met"] == (written["goal"]["ratio"] >= 0.9)
    assert "Ray Train 1w" in bench_train.format_table(results)
