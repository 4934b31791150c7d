"""The CD-LM benchmark's cheaper parts on toy inputs (the whole benchmark trains for minutes)."""

import pytest
import torch

from distilray.bench import cdlm as bench_cdlm
from distilray.bench import cdlm_run, cdlm_sweep
from distilray.bench.targets import vocab_limit_of
from distilray.config import BenchCDLMConfig, load_config
from distilray.errors import DistilrayError
from distilray.models.causal_lm import build_causal_lm, load_causal_lm

pytestmark = pytest.mark.ray


def test_router_latency_on_synthetic_keys(ray_session, tmp_path):
    cfg = BenchCDLMConfig(datastore_keys=5000, datastore_dim=32, datastore_queries=60)
    r = bench_cdlm.bench_datastore(cfg, tmp_path)
    assert r["keys"] == 5000 and r["synthetic_keys"] is True and r["queries"] == 60
    assert 0 < r["p50_ms"] <= r["p99_ms"]


def test_ecd_injects_facts_the_model_never_saw(small_tokenizer, tmp_path):
    tok, _ = small_tokenizer
    torch.manual_seed(0)
    model = build_causal_lm("tiny", tok).eval()
    r = bench_cdlm.bench_ecd(BenchCDLMConfig(), model, tok, tmp_path)
    assert r["facts"] == len(bench_cdlm.ECD_NAMES)
    assert r["exact.base_accuracy"] < 0.2
    assert r["exact.cdlm_accuracy"] == 1.0  # the prompt is the fact's own prefix: its key matches exactly


def test_goals_table_reports_misses():
    fake = {
        "generator": "g",
        "generator_parameters": 1,
        "scd": {"fps": 0.1, "tts": -0.5, "rouge_l_vs_baseline": 0.9, "colocated": {"tts": 0.0, "fps": 0.1}},
        "verify": {"identical_to_baseline": True, "fps": 0.3},
        "extract": {"ratio_vs_bare": 0.9},
        "datastore": {"p99_ms": 2.0, "p50_ms": 1.0, "keys": 10},
        "ecd": {
            "facts": 2,
            "exact.base_accuracy": 0.0,
            "exact.cdlm_accuracy": 1.0,
            "paraphrase.base_accuracy": 0.0,
            "paraphrase.cdlm_accuracy": 0.5,
        },
        "kcd": {
            "d": {
                "reduction": 0.4,
                "ppl_base": 10.0,
                "ppl_cdlm": 6.0,
                "q_func": "map05_09",
                "mauve_baseline": 0.5,
                "mauve_paper": 0.6,
                "mauve_texts": 4,
            }
        },
    }
    fake["goals"] = bench_cdlm._goals(fake)
    assert fake["goals"]["scd.fps"]["met"] is False and fake["goals"]["verify.fps"]["met"] is True
    assert fake["goals"]["kcd.d.reduction"]["met"] is True
    table = cdlm_run.format_table(fake)
    assert "NOT met" in table and "kcd.d" in table


def _user_generator(tok, folder, extra_columns: int = 0) -> str:
    torch.manual_seed(0)
    model = build_causal_lm("tiny", tok)
    if extra_columns:  # logits padded past the tokenizer, as Pythia's are
        model.resize_token_embeddings(len(tok) + extra_columns, mean_resizing=False)
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return str(folder)


def test_a_user_generator_is_taken_as_it_is(small_tokenizer, tmp_path):
    tok, _ = small_tokenizer
    folder = _user_generator(tok, tmp_path / "gen")
    cfg = load_config(BenchCDLMConfig, None, [f"model={folder}", "sweep=true", "sweep_sizes=[tiny,mini]"])
    assert bench_cdlm.generator(cfg) == (folder, {"generator_user": True})
    (tmp_path / "bare").mkdir()
    (tmp_path / "bare" / "config.json").write_text("{}")
    with pytest.raises(DistilrayError, match="no tokenizer files"):
        bench_cdlm.generator(BenchCDLMConfig(model=str(tmp_path / "bare")))
    with pytest.raises(DistilrayError, match="not a preset a CPU sweep trains"):
        BenchCDLMConfig(sweep_only=True, sweep_sizes=("tiny", "gpt2"))


def test_scd_and_verify_on_a_padded_user_generator(ray_session, small_tokenizer, tmp_path):
    tok, _ = small_tokenizer
    folder = _user_generator(tok, tmp_path / "gen", extra_columns=8)
    model = load_causal_lm(folder, "cpu", torch.float32)
    limit = vocab_limit_of(model, tok)
    assert limit == len(tok)
    cfg = BenchCDLMConfig(prompts=2, max_new_tokens=10, scd_samples=1, tok_prob_threshold=1e-6)
    scd, verify = bench_cdlm.bench_scd_and_verify(cfg, model, tok, tmp_path, limit)
    assert scd["prompts"] == 2 and 0.0 <= scd["fps"] <= 1.0 and 0.0 <= scd["rouge_l_vs_baseline"] <= 1.0
    assert verify["identical_to_baseline"] and verify["prompts"] == 2


def test_sweep_table_and_a_sweep_only_result():
    def size(preset, params, fps):
        return {
            "preset": preset,
            "parameters": params,
            "val_ppl": 100.0,
            "scd": {
                "datastore_keys": 1234,
                "fps": fps,
                "tts": fps / 2,
                "rouge_l_vs_baseline": 0.7,
                "chunk_hit_rate": 0.1,
                "mean_chunk_length": 2.5,
            },
            "verify": {"fps": fps / 3, "identical_prompts": 8, "prompts": 8},
        }

    sweep = {
        "steps": 400,
        "prompts": 8,
        "max_new_tokens": 64,
        "quantize": "none",
        "sizes": [size("tiny", 524_480, 0.05), size("mini", 4_339_200, 0.18), size("small", 21_000_000, 0.31)],
    }
    lines = cdlm_sweep.format_sweep(sweep)
    assert lines[0].startswith("generator-size sweep: 400 training steps each, 8 prompts x 64 tokens")
    rows = {line.split()[0]: line.split() for line in lines[2:5]}
    assert rows["small"][1] == "21,000,000" and rows["small"][4] == "0.310" and rows["small"][-1] == "8/8"
    assert rows["mini"][4] == "0.180" and rows["tiny"][3] == "1,234" and rows["tiny"][8] == "2.50"
    assert cdlm_run.format_table({"sweep": sweep}).splitlines() == lines  # the sweep alone
