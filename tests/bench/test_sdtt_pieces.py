"""The SDTT benchmark's pieces that train nothing: configs, the models and steps it scores, goals on a fake
result, the table and the plots (the whole benchmark trains for many minutes)."""

import math

import pytest

from distilray.bench import sdtt as bench_sdtt
from distilray.config import BenchSDTTConfig
from distilray.errors import DistilrayError
from distilray.eval.plots import loss_per_round, quality_vs_steps
from distilray.pipelines.distill_sdtt import num_rounds, student_sampling_steps

TEACHER = {64: (40.0, 4.00), 32: (45.0, 4.00), 16: (60.0, 4.00), 8: (90.0, 4.00), 4: (150.0, 4.00)}


def _row(model, steps, gen_ppl, entropy, own=None, run="", round_=0):
    return {
        "model": model,
        "steps": steps,
        "nfe": steps,
        "gen_ppl": gen_ppl,
        "entropy": entropy,
        "mauve": 0.5,
        "seconds_per_sample": steps * 1e-3,
        "run": run,
        "round": round_,
        "own_steps": own or steps,
    }


def fake_result(mse_keeps: bool = False) -> dict:
    rows = [_row("teacher", s, p, h, own=64) for s, (p, h) in TEACHER.items()]
    for name, suffix, better in (("kld", "", 0.9), ("mse", "", 0.9 if mse_keeps else 1.2), ("kld", "-og", 0.95)):
        run = name + ("-original-grid" if suffix else "")
        for r in (1, 2, 3):
            own = 64 // 2**r
            for s in (x for x in TEACHER if x <= own):
                p, h = TEACHER[s]
                model = f"student-{name}-r{r}" + ("-original-grid" if suffix else "")
                rows.append(_row(model, s, p * better, h * 0.99, own, run, r))
    return {
        "rows": rows,
        "settings": {
            "full_steps": 64,
            "rounds": 3,
            "distill_steps_per_round": 40,
            "teacher_model": "dit-tiny",
            "teacher_steps": 600,
            "seq_len": 64,
            "num_samples": 64,
            "divergences": ["kld", "mse"],
            "grid_ablation": True,
            "mauve_references": "64 test blocks of pydoc",
        },
        "speed": {"speedup": 7.0, "teacher_steps": 64, "student_steps": 8},
        "harness": {
            "form": "sdtt",
            "evaluator": "/a/lm/mini-x/model",
            "evaluator_parameters": 4_000_000,
            "evaluator_precision": "float32",
        },
        "parameters": {"teacher": 2_000_000},
        "ar": [
            {
                **_row("ar-target", 63, 80.0, 3.8),
                "parameters": 4_000_000,
                "self_scored": True,
                "folder": "/a/lm/mini-x/model",
            }
        ],
        "lambada_acc": {"teacher": 0.01},
        "lambada_ppl": {"teacher": 5000.0},
        "lambada_examples": 200,
        "teacher_resample": {"steps": 8, "gen_ppl": 92.0, "entropy": 4.0},
        "plots": {"quality_vs_steps": "/a/q.png"},
        "json": "/tmp/out.json",
    }


def test_goals_confirm_the_claim_when_only_kld_keeps_quality():
    g = bench_sdtt.compute_goals(fake_result())
    assert g["kld_final.gen_ppl_at_1/8"]["met"] is True and g["kld_final.gen_ppl_at_1/8"]["teacher"] == 90.0
    assert g["kld_final.entropy_at_1/8"]["met"] is True  # 1% below the teacher
    assert g["kld_final.at_1/16"]["met"] is None and g["kld_final.at_1/16"]["steps"] == 4
    assert g["kld_final.speedup_vs_teacher_full_steps"]["met"] is True
    claim = g["divergences.reverse_kl_only_one_kept_quality"]
    assert claim["value"] == "confirmed" and claim["kept_quality"] == {"kld": True, "mse": False}
    assert [x["divergence"] for x in claim["ranking_at_final_steps"]] == ["kld", "mse"]
    grid = g["grid.corrected_vs_original"]
    assert [p["lower_gen_ppl"] for p in grid["per_round"]] == ["corrected"] * 3


def test_goals_refute_and_report_misses():
    r = fake_result(mse_keeps=True)
    r["speed"]["speedup"] = 3.0
    for row in r["rows"]:
        if row["model"] == "student-kld-r3" and row["steps"] == 8:
            row["entropy"] = 3.5  # 12.5% below the teacher
    g = bench_sdtt.compute_goals(r)
    assert g["kld_final.entropy_at_1/8"]["met"] is False
    assert g["kld_final.speedup_vs_teacher_full_steps"]["met"] is False
    claim = g["divergences.reverse_kl_only_one_kept_quality"]
    assert claim["met"] is False and claim["value"].startswith("refuted")


def test_format_table_shows_rows_goals_and_outputs():
    r = fake_result()
    r["goals"] = bench_sdtt.compute_goals(r)
    table = bench_sdtt.format_table(r)
    assert "student-kld-r3-original-grid" in table and "ar-target" in table
    assert "evaluator itself" in table and "met" in table and "reported" in table
    assert "/a/q.png" in table and "JSON: /tmp/out.json" in table


def test_configs_give_the_rounds_and_step_counts():
    cfg = BenchSDTTConfig()
    d = bench_sdtt.distill_config(cfg, "/teacher", "kld", "original")
    assert num_rounds(d) == cfg.rounds
    assert [student_sampling_steps(d, r) for r in (1, 2, 3)] == [32, 16, 8]
    assert d.teacher_grid == "original" and d.optim.min_lr_ratio == 1.0 and d.optim.weight_decay == 0.0
    assert d.optim.lr == cfg.distill_lr and d.ema == cfg.distill_ema
    t = bench_sdtt.teacher_config(cfg, "/tok")
    assert t.optim.lr == cfg.teacher_lr and t.optim.weight_decay == 0.0 and t.ema == cfg.teacher_ema
    names = [n for n, _, _ in bench_sdtt.distill_runs(cfg)]
    assert names == [*cfg.divergences, "kld-original-grid"]


def test_scored_models_sample_each_student_at_its_steps_and_below():
    cfg = BenchSDTTConfig()
    run = {"loss": "kld", "grid": "corrected", "rounds": 3}
    run |= {"students": {str(r): f"/s{r}" for r in (1, 2, 3)}, "sampling_steps": {"1": 32, "2": 16, "3": 8}}
    models = bench_sdtt.scored_models(cfg, {"teacher": {"model_dir": "/t"}, "runs": {"kld": run}})
    steps = {m["model"]: m["steps"] for m in models}
    assert steps == {
        "teacher": [64, 32, 16, 8, 4],
        "student-kld-r1": [32, 16, 8, 4],
        "student-kld-r2": [16, 8, 4],
        "student-kld-r3": [8, 4],
    }


def test_plots_are_written(tmp_path):
    metrics = tmp_path / "metrics.csv"
    metrics.write_text("step,loss,round,delta\n1,2.0,0.0,0.1\n2,1.5,0.0,0.1\n3,1.2,1.0,0.2\n")
    losses = bench_sdtt.read_losses(metrics)
    assert losses == [(1, 2.0, 1), (2, 1.5, 1), (3, 1.2, 2)]
    loss_png = loss_per_round({"kld": losses, "mse": losses}, tmp_path / "p" / "loss.png", "loss")
    curves = {"teacher": {s: {"gen_ppl": p, "entropy": h} for s, (p, h) in TEACHER.items()}}
    curves["student-kld"] = {8: {"gen_ppl": 80.0, "entropy": 3.9}, 4: {"gen_ppl": 120.0, "entropy": 3.9}}
    quality_png = quality_vs_steps(curves, tmp_path / "q.png", "quality", {"ar": {"gen_ppl": 70.0, "entropy": 3.8}})
    for png in (loss_png, quality_png):
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_prepare_refuses_rounds_below_one_step():
    with pytest.raises(DistilrayError, match="below one step"):
        bench_sdtt.prepare(BenchSDTTConfig(rounds=7))  # 64 / 2^7 < 1: refused before anything trains


def test_gumbel_precision_times_both_precisions_and_scores_their_samples():
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    from distilray.models.mdlm import build_mdlm

    torch.manual_seed(0)
    teacher = build_mdlm("dit-micro", 33, 32, 16).eval()  # 32 real tokens + [MASK]
    evaluator = GPT2LMHeadModel(GPT2Config(vocab_size=32, n_positions=16, n_embd=16, n_layer=1, n_head=2)).eval()
    cfg = BenchSDTTConfig(seq_len=16, sample_batch_size=4, num_samples=8, speed_repeats=1)
    gp = bench_sdtt.gumbel_precision(cfg, teacher, evaluator, steps=4)
    assert gp["draw_shape"] == [4, 16, 33]
    for key in ("draw_seconds", "sample_seconds_per_sample"):
        assert gp[key]["float64"] > 0 and gp[key]["float32"] > 0
    assert gp["draw_ratio_fp64_over_fp32"] == gp["draw_seconds"]["float64"] / gp["draw_seconds"]["float32"]
    for q in gp["quality"].values():
        assert q["gen_ppl"] > 1 and 0 < q["entropy"] <= math.log(32)
    r = fake_result()
    r["gumbel_precision"], r["goals"] = gp, bench_sdtt.compute_goals(r)
    assert "float64 vs float32 draws" in bench_sdtt.format_table(r)
