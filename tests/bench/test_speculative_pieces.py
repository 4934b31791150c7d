"""The speculative benchmark's cheaper parts on toy inputs: cnndm summary prompts, int8 figures, goals."""

import numpy as np
import pytest
import torch

from distilray.bench import speculative as bench
from distilray.bench import speculative_int8
from distilray.config import BenchSpeculativeConfig
from distilray.models.causal_lm import build_causal_lm
from distilray.models.drafters import NEURAL_KINDS
from distilray.tokenizer import encode_documents


def test_summary_prompts_fit_the_context_and_end_with_the_cue(small_tokenizer):
    tok, _ = small_tokenizer
    cfg = BenchSpeculativeConfig(prompts=3, new_tokens=16)
    prompts = bench.summary_prompts(cfg, tok, context=128)
    cue = encode_documents(tok, [bench.SUMMARY_CUE])[0]
    assert len(prompts) == 3
    for p in prompts:
        assert len(p) + bench.TIMING_STEPS == 128  # cnndm articles are long: each is cut to the budget
        assert p[-len(cue) :] == cue


def test_int8_figures_on_a_tiny_target(small_tokenizer, tmp_path, monkeypatch):
    tok, _ = small_tokenizer
    torch.manual_seed(0)
    build_causal_lm("tiny", tok).save_pretrained(tmp_path / "target")
    monkeypatch.setattr(speculative_int8, "LARGE_PRESET", "tiny")  # the ~21M preset costs seconds; the code is the same
    tokens = np.random.default_rng(0).integers(0, len(tok), 600)
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        r = speculative_int8.int8_figures(str(tmp_path / "target"), tok, tokens, list(range(3, 30)), 64, seed=0)
    finally:
        torch.set_num_threads(before)
    for cost in (r["target"], r["large"]):
        assert cost["gamma"] == 4 and cost["parameters"] > 0
        assert all(cost["step_ms"][k] > 0 and cost["verify_over_step"][k] > 0 for k in ("fp32", "int8"))
    q = r["quality"]
    assert 0.9 < q["ppl_ratio"] < 1.1 and 0.5 < q["top1_agreement"] <= 1.0 and q["mean_kl"] >= 0.0
    assert r["goal"]["op"] == "<=" and r["goal"]["value"] == r["large"]["verify_over_step"]["int8"]
    assert "int8 quality" in "\n".join(speculative_int8.format_int8(r))


def test_output_shift_of_a_model_against_itself():
    torch.manual_seed(0)

    class Vocab:
        bos_token_id = eos_token_id = pad_token_id = 0

        def __len__(self):
            return 50

    model = build_causal_lm("tiny", Vocab()).eval()
    shift = speculative_int8.output_shift(model, model, np.arange(200) % 50, context_len=32)
    assert shift["top1_agreement"] == 1.0 and shift["mean_kl"] == pytest.approx(0.0, abs=1e-6)
    assert shift["positions"] == 6 * 32


def test_goals_read_their_direction():
    scan = {"4": {"alpha": 0.5}}
    drafter = {
        "speedup_measured": 1.2,
        "speedup_theoretical": 1.5,
        "speedup_theoretical_verify_cost": 1.3,
        "scan": scan,
    }
    results = {k: {"baseline": drafter, "distilled": drafter} for k in NEURAL_KINDS}
    int8 = {"goal": {"value": 1.1, "goal": 1.3, "op": "<=", "parameters": 21_000_000, "model": "small"}}
    goals = bench.goals(
        BenchSpeculativeConfig(gammas=(2, 4)),
        results,
        ("cnn", "distilled"),
        {"speedup_measured": 1.7, "gamma": 4},
        int8,
        {"speedup_ours_over_hf": 1.0},
        {"ratio_vs_in_process": 0.9},
    )
    assert goals["prompt_lookup.cnndm_speedup"]["met"] and goals["prompt_lookup.cnndm_speedup"]["value"] == 1.7
    assert goals["int8.verify_over_step"]["met"] and goals["int8.verify_over_step"]["op"] == "<="
    assert not goals["best_speedup"]["met"] and goals["best_speedup"]["op"] == ">="
    int8["goal"]["value"] = 1.4
    assert not bench.goals(
        BenchSpeculativeConfig(),
        results,
        ("cnn", "baseline"),
        {"speedup_measured": 1.0, "gamma": 2},
        int8,
        {"speedup_ours_over_hf": 1.0},
        {"ratio_vs_in_process": 0.9},
    )["int8.verify_over_step"]["met"]
