"""The CD-LM benchmark's cheaper parts on toy inputs (the whole benchmark trains for minutes)."""

import pytest
import torch

from distilray.bench import cdlm as bench_cdlm
from distilray.config import BenchCDLMConfig
from distilray.models.causal_lm import build_causal_lm

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
    table = bench_cdlm.format_table(fake)
    assert "NOT met" in table and "kcd.d" in table
