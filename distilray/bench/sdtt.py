"""`distilray bench sdtt`: an MDLM teacher and its SDTT students, sampled and scored in one harness.

- Teacher: a `dit-tiny` MDLM (~2M parameters) on the built-in corpus with the quickstart's BPE tokenizer
  (so the evaluator scores raw ids), L = 64, 3000 steps of batch 32, EMA 0.999.
- Students: one distill-sdtt run per divergence (kld, kl-fwd, mse, tvd, l1-log, jsd) on the corrected
  teacher grid, plus kld on the released code's grid (the ablation); 3 rounds of 120 optimizer steps of
  batch 16: the round-r student samples with 64 / 2^r steps (32, 16, 8). The paper trains 10k steps per round on
  a 169M model with L = 1024 and 1024 teacher steps: this is the same procedure at a toy scale.
- Rows: every model sampled in this process (float64 Gumbel, 64 unconditional samples each) at the
  step counts where it is meant to be used: the teacher at 64, 32, 16, 8, 4; a round's student at its
  own count and below. Gen PPL (SDTT form, `distilray.eval.diffusion.HARNESS`) under the quickstart's
  target LM (~4M parameters, fp32) beside unigram entropy and MAUVE against held-out blocks.
- LAMBADA accuracy and per-word perplexity on the first 100 dev passages (cut to L = 64), for the teacher
  and each run's last student (`lambada_all_rounds` for every round's).
- AR baselines with their KV cache, same length: the quickstart target (~4M; it is also the evaluator,
  so its Gen PPL scores itself) and the quickstart drafter (~0.5M); the MDLM has ~2M.
- Speed: the teacher at full steps against the final kld student, timed in alternation (median).

Scale here (2 CPU cores): a cold run trains the tokenizer, both AR models, the teacher and 7 students
(3000 teacher steps at ~0.3 s and 2520 distillation steps at ~0.35 s when the machine is otherwise idle,
plus a Ray Train start per run): about 35 minutes; a warm run only samples and scores: about 10 minutes.
Every trained model is cached by its config. On a loaded machine it takes several times longer.
"""

from __future__ import annotations

import csv
import dataclasses
import statistics
import time
import typing
from pathlib import Path

import torch

from distilray.actors.cluster import ensure_ray
from distilray.bench.sdtt_report import GOALS, compute_goals, format_table  # noqa: F401 (format_table prints)
from distilray.config import (
    BenchSDTTConfig,
    CorpusSpec,
    DiffusionDivergence,
    DistillSDTTConfig,
    QuickstartConfig,
    TrainMDLMConfig,
    config_from,
)
from distilray.decoding.mdlm import sample
from distilray.errors import DistilrayError
from distilray.eval.diffusion import HARNESS
from distilray.eval.mauve import mean_hidden_features
from distilray.eval.plots import loss_per_round, quality_vs_steps
from distilray.io_utils import atomic_write_json
from distilray.losses.mdlm import categorical
from distilray.models.causal_lm import count_parameters, load_causal_lm
from distilray.models.mdlm import load_diffusion_lm
from distilray.pipelines import distill_sdtt, train_lm, train_mdlm, train_tokenizer
from distilray.pipelines.eval_diffusion import autoregressive_baseline, lambada_scores, sample_quality
from distilray.pipelines.quickstart import lm_config
from distilray.tokenizer import check_same_tokenizer, load_tokenizer


# ------------------------------------------------------------------------------------- artifacts
def teacher_config(cfg: BenchSDTTConfig, tok_dir: Path) -> TrainMDLMConfig:
    q = QuickstartConfig()
    return config_from(
        TrainMDLMConfig,
        corpus=q.corpus,
        model=cfg.teacher_model,
        tokenizer=str(tok_dir),
        seq_len=cfg.seq_len,
        batch_size=cfg.batch_size,
        steps=cfg.teacher_steps,
        ema=cfg.teacher_ema,
        # every optim key: config_from builds a section it touches from OptimConfig's own defaults
        lr=cfg.teacher_lr,
        min_lr_ratio=1.0,
        warmup_steps=min(100, max(1, cfg.teacher_steps // 10)),
        weight_decay=0.0,
        checkpoint_every=max(1, cfg.teacher_steps // 2),
        artifacts_dir=cfg.artifacts_dir,
        seed=cfg.seed,
    )


def distill_config(cfg: BenchSDTTConfig, teacher_dir: str, loss: str, grid: str) -> DistillSDTTConfig:
    return config_from(
        DistillSDTTConfig,
        corpus=QuickstartConfig().corpus,
        teacher=teacher_dir,
        loss=loss,
        teacher_grid=grid,
        num_teacher_steps=2,
        orig_num_steps=cfg.orig_num_steps,
        grow_dt_every=cfg.distill_steps,
        steps=cfg.distill_steps * cfg.rounds,
        min_sampling_steps=max(1, cfg.orig_num_steps // 2**cfg.rounds),
        ema=cfg.distill_ema,
        batch_size=cfg.distill_batch_size,
        lr=cfg.distill_lr,
        min_lr_ratio=1.0,
        warmup_steps=max(1, cfg.distill_steps // 10),
        weight_decay=0.0,
        checkpoint_every=cfg.distill_steps,
        artifacts_dir=cfg.artifacts_dir,
        seed=cfg.seed,
    )


def distill_runs(cfg: BenchSDTTConfig) -> list[tuple[str, str, str]]:
    """(run name, divergence, teacher grid) of every distillation run the benchmark makes."""
    runs = [(loss, loss, "corrected") for loss in cfg.divergences]
    if cfg.grid_ablation:
        runs.append(("kld-original-grid", "kld", "original"))
    return runs


def prepare(cfg: BenchSDTTConfig) -> dict:
    """Train (or reuse) the tokenizer, the evaluator and AR baselines, the teacher and every student run."""
    unknown = [d for d in cfg.divergences if d not in typing.get_args(DiffusionDivergence)]
    if unknown:
        raise DistilrayError(f"unknown divergence {unknown}; choose from {typing.get_args(DiffusionDivergence)}")
    if cfg.orig_num_steps // 2**cfg.rounds < 1:
        raise DistilrayError(f"{cfg.rounds} rounds halve orig_num_steps={cfg.orig_num_steps} below one step")
    ensure_ray()
    q = dataclasses.replace(QuickstartConfig(), artifacts_dir=cfg.artifacts_dir, seed=cfg.seed)
    tok_dir = train_tokenizer.get_or_train(q.corpus, q.vocab_size, q.artifacts_dir)
    print("[bench sdtt] evaluator and AR baselines (the quickstart's target and drafter) ...", flush=True)
    target = train_lm.run(lm_config(q, q.target_model, q.target_steps, tok_dir))
    drafter = train_lm.run(lm_config(q, q.drafter_model, q.drafter_steps, tok_dir))
    print(f"[bench sdtt] teacher: {cfg.teacher_model}, {cfg.teacher_steps} steps ...", flush=True)
    teacher = train_mdlm.run(teacher_config(cfg, tok_dir))
    runs = {}
    for name, loss, grid in distill_runs(cfg):
        print(f"[bench sdtt] students: {name}, {cfg.rounds} rounds x {cfg.distill_steps} steps ...", flush=True)
        runs[name] = distill_sdtt.run(distill_config(cfg, teacher["model_dir"], loss, grid))
        runs[name]["grid"] = grid
    return {"evaluator": target, "ar": {"target": target, "drafter": drafter}, "teacher": teacher, "runs": runs}


# ------------------------------------------------------------------------------------- measuring
def diffusion_samples(
    model, steps: int, n: int, batch_size: int, seed: int, float64: bool = True
) -> tuple[torch.Tensor, float, float]:
    """n unconditional samples in this process: (samples (n, L), mean NFE, seconds per sample)."""
    generator = torch.Generator().manual_seed(seed)
    outs = [
        sample(model, min(batch_size, n - i), steps, generator=generator, float64=float64)
        for i in range(0, n, batch_size)
    ]
    tokens = torch.cat([o.tokens for o in outs]).cpu()
    nfe = sum(o.nfe * len(o.tokens) for o in outs) / n
    return tokens, nfe, sum(o.seconds for o in outs) / n


def scored_models(cfg: BenchSDTTConfig, prepared: dict) -> list[dict]:
    """Every model with the step counts it is sampled at: the teacher at all, a student at its own and below."""
    full = max(cfg.steps)
    teacher = {"model": "teacher", "folder": prepared["teacher"]["model_dir"], "run": "", "round": 0}
    models = [{**teacher, "own_steps": full, "last_round": True}]
    for name, res in prepared["runs"].items():
        suffix = "-original-grid" if res["grid"] == "original" else ""
        for r in range(1, int(res["rounds"]) + 1):
            models.append(
                {
                    "model": f"student-{res['loss']}-r{r}{suffix}",
                    "folder": res["students"][str(r)],
                    "run": name,
                    "round": r,
                    "own_steps": int(res["sampling_steps"][str(r)]),
                    "last_round": r == int(res["rounds"]),
                }
            )
    for m in models:
        m["steps"] = sorted({s for s in cfg.steps if s <= m["own_steps"]} | {m["own_steps"]}, reverse=True)
    return models


def speed(cfg: BenchSDTTConfig, teacher, student, full: int, few: int) -> dict:
    """Seconds per sample of the teacher at full steps and the final kld student at few, timed in alternation."""
    n = cfg.sample_batch_size
    teacher_s, student_s = [], []
    for k in range(max(1, cfg.speed_repeats)):
        teacher_s.append(diffusion_samples(teacher, full, n, n, cfg.seed + 7 + k)[2])
        student_s.append(diffusion_samples(student, few, n, n, cfg.seed + 7 + k)[2])
    t, s = statistics.median(teacher_s), statistics.median(student_s)
    return {
        "teacher_steps": full,
        "student_steps": few,
        "teacher_seconds_per_sample": t,
        "student_seconds_per_sample": s,
        "speedup": t / s,
        "repeats": len(teacher_s),
        "batch_size": n,
    }


def gumbel_precision(cfg: BenchSDTTConfig, teacher, evaluator, steps: int) -> dict:
    """What float64 draws cost against float32 (reference/sdtt.md 6.2), timed in alternation (medians):
    the draw alone on one (batch, L, V) block of probabilities, and whole samples of the teacher at `steps`,
    with the quality of each precision's samples beside it (fp32 truncates the Gumbel tail)."""
    n, vocab = cfg.sample_batch_size, teacher.config.vocab_size
    probs = torch.softmax(torch.randn(n, cfg.seq_len, vocab, generator=torch.Generator().manual_seed(cfg.seed)), -1)
    draw: dict[bool, list[float]] = {True: [], False: []}
    whole: dict[bool, list[float]] = {True: [], False: []}
    for k in range(max(3, cfg.speed_repeats)):
        for f64 in (True, False):
            g = torch.Generator().manual_seed(cfg.seed + k)
            start = time.perf_counter()
            for _ in range(10):
                categorical(probs, g, float64=f64)
            draw[f64].append((time.perf_counter() - start) / 10)
            whole[f64].append(diffusion_samples(teacher, steps, n, n, cfg.seed + 31 + k, float64=f64)[2])
    quality = {
        f64: sample_quality(
            evaluator, diffusion_samples(teacher, steps, cfg.num_samples, n, cfg.seed + 77, float64=f64)[0], None
        )
        for f64 in (True, False)
    }
    med = {f64: (statistics.median(draw[f64]), statistics.median(whole[f64])) for f64 in (True, False)}
    return {
        "steps": steps,
        "draw_shape": [n, cfg.seq_len, vocab],
        "draw_seconds": {"float64": med[True][0], "float32": med[False][0]},
        "draw_ratio_fp64_over_fp32": med[True][0] / med[False][0],
        "sample_seconds_per_sample": {"float64": med[True][1], "float32": med[False][1]},
        "sample_ratio_fp64_over_fp32": med[True][1] / med[False][1],
        "quality": {"float64": quality[True], "float32": quality[False]},
    }


def read_losses(metrics_csv: str | Path) -> list[tuple[int, float, int]]:
    """(step, loss, round) per optimizer step of a distill-sdtt run; round is 1-based (the round being trained)."""
    with open(metrics_csv, newline="") as f:
        return [(int(r["step"]), float(r["loss"]), int(float(r.get("round") or 0)) + 1) for r in csv.DictReader(f)]


# ------------------------------------------------------------------------------------------- run
def run(cfg: BenchSDTTConfig) -> dict:
    started = time.perf_counter()
    prepared = prepare(cfg)
    threads = torch.get_num_threads()
    torch.set_num_threads(max(1, cfg.threads))
    try:
        result = measure(cfg, prepared)
    finally:
        torch.set_num_threads(threads)
    home = Path(cfg.artifacts_dir).resolve() / "bench_sdtt"
    result["plots"] = write_plots(result, prepared, home)
    result["goals"] = compute_goals(result)
    result["seconds"] = round(time.perf_counter() - started, 1)
    result["json"] = cfg.json_out
    if cfg.json_out:
        atomic_write_json(cfg.json_out, result)
    return result


def measure(cfg: BenchSDTTConfig, prepared: dict) -> dict:
    teacher_dir = prepared["teacher"]["model_dir"]
    tokenizer = load_tokenizer(teacher_dir)
    evaluator_dir = prepared["evaluator"]["model_dir"]
    check_same_tokenizer(tokenizer, load_tokenizer(evaluator_dir), "the MDLM teacher and the evaluator")
    evaluator = load_causal_lm(evaluator_dir, device="cpu", dtype=torch.float32).eval()
    spec = CorpusSpec(dataset=cfg.eval_data) if cfg.eval_data else QuickstartConfig().corpus
    references = train_mdlm.diffusion_blocks(spec, tokenizer, cfg.seq_len, "test")[: cfg.num_samples]
    if cfg.mauve and len(references) < 2:
        raise DistilrayError(f"the evaluation text's test split gives {len(references)} blocks of {cfg.seq_len}")
    ref_features = mean_hidden_features(evaluator, references.tolist()) if cfg.mauve else None
    rows, lambada, parameters = [], {}, {}
    for m in scored_models(cfg, prepared):
        model = load_diffusion_lm(m["folder"]).eval()
        parameters[m["model"]] = count_parameters(model)
        print(f"[bench sdtt] sampling {m['model']} at {m['steps']} steps ...", flush=True)
        for steps in m["steps"]:
            samples, nfe, seconds = diffusion_samples(
                model, steps, cfg.num_samples, cfg.sample_batch_size, cfg.seed + 1000 + steps
            )
            quality = sample_quality(evaluator, samples, ref_features)
            rows.append(
                {"model": m["model"], "steps": steps, "nfe": nfe, **quality, "seconds_per_sample": seconds}
                | {"run": m["run"], "round": m["round"], "own_steps": m["own_steps"]}
            )
        if cfg.lambada_examples and (cfg.lambada_all_rounds or m["last_round"]):
            lambada[m["model"]] = lambada_scores(model, tokenizer, "", cfg.lambada_examples, cfg.seed)
    full, rounds = max(cfg.steps), cfg.rounds
    teacher = load_diffusion_lm(teacher_dir).eval()
    final = (
        load_diffusion_lm(prepared["runs"]["kld"]["students"][str(rounds)]).eval()
        if "kld" in prepared["runs"]
        else None
    )
    # the teacher at 1/8 once more with other draws: how far Gen PPL moves with the sampling seed alone
    resampled = diffusion_samples(teacher, max(1, full // 8), cfg.num_samples, cfg.sample_batch_size, cfg.seed + 99)[0]
    print("[bench sdtt] AR baselines and timing ...", flush=True)
    ar = []
    for role, res in prepared["ar"].items():
        row = autoregressive_baseline(
            res["model_dir"],
            tokenizer,
            evaluator,
            ref_features,
            cfg.seq_len,
            cfg.num_samples,
            cfg.sample_batch_size,
            cfg.seed,
        )
        row["folder"] = row.pop("model")
        ar.append({"model": f"ar-{role}", "steps": cfg.seq_len - 1, **row, "self_scored": res is prepared["evaluator"]})
    return {
        "rows": rows,
        "lambada_acc": {k: v["accuracy"] for k, v in lambada.items()},
        "lambada_ppl": {k: v["ppl"] for k, v in lambada.items()},
        "lambada_examples": next(iter(lambada.values()))["examples"] if lambada else 0,
        "ar": ar,
        "speed": speed(cfg, teacher, final, full, max(1, full // 2**rounds)) if final is not None else {},
        "gumbel_precision": gumbel_precision(cfg, teacher, evaluator, full),
        "teacher_resample": {"steps": max(1, full // 8), **sample_quality(evaluator, resampled, None)},
        "harness": {**HARNESS, "evaluator": evaluator_dir, "evaluator_parameters": count_parameters(evaluator)},
        "parameters": parameters,
        "settings": {
            "full_steps": full,
            "rounds": rounds,
            "distill_steps_per_round": cfg.distill_steps,
            "teacher_model": cfg.teacher_model,
            "teacher_steps": cfg.teacher_steps,
            "seq_len": cfg.seq_len,
            "num_samples": cfg.num_samples,
            "divergences": list(cfg.divergences),
            "grid_ablation": cfg.grid_ablation,
            "threads": cfg.threads,
            "mauve_references": f"{len(references)} test blocks of {spec.dataset}",
            "sampler": "ancestral, float64 Gumbel, temperature 1, in this process",
        },
        "training": {
            "teacher": _training_summary(prepared["teacher"]),
            **{name: _training_summary(res) for name, res in prepared["runs"].items()},
        },
    }


def _training_summary(res: dict) -> dict:
    keys = ("run_dir", "steps", "seconds", "cached", "val_nelbo", "val_ppl_bound", "first_loss", "final_loss")
    return {k: res[k] for k in keys if k in res}


def write_plots(result: dict, prepared: dict, home: Path) -> dict:
    rows = result["rows"]
    by_model: dict[str, dict[int, dict]] = {}
    for r in rows:
        by_model.setdefault(r["model"], {})[r["steps"]] = r
    curves = {"teacher": by_model.get("teacher", {})}
    for name in prepared["runs"]:
        # each round's student at its own step count, then the last round's student below it
        own = [x for x in rows if x["run"] == name]
        last = max((x["round"] for x in own), default=0)
        path = {x["steps"]: x for x in own if x["steps"] == x["own_steps"] or x["round"] == last}
        curves[f"student-{name}"] = path
    settings = result["settings"]
    quality = quality_vs_steps(
        curves,
        home / "quality_vs_steps.png",
        f"SDTT at L={settings['seq_len']}: {settings['teacher_model']} teacher and students "
        f"({settings['num_samples']} samples, Gen PPL under {result['harness']['evaluator_parameters']:,}-param AR)",
        baselines={f"{row['model']} (KV cache)": row for row in result.get("ar", [])},
    )
    losses = {name: read_losses(Path(res["run_dir"]) / "metrics.csv") for name, res in prepared["runs"].items()}
    loss = loss_per_round(losses, home / "loss_per_round.png", "SDTT distillation loss per round")
    return {"quality_vs_steps": str(quality), "loss_per_round": str(loss)}
