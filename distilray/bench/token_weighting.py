"""`distilray bench token-weighting`: every weighting variant extended from one short-context start, measured
in one harness (reference/token_weighting.md).

- Data: the Gutenberg books cut into BOS + (L-1)-token sequences (prepare-long), one book held out for
  validation and one for the test (or `eval_data`, cut the same way).
- Start: a `llama-mini` (~4.3M parameters) trained from scratch at the short context (256 tokens, 300 steps of
  16 sequences).
- Variants: uniform cross-entropy, Dense, Sparse, LongCE, PPMI, NPMI, each extended to L = 1024 for the same
  steps (40 of 4 sequences) from the same start, with self scoring (`-unfrozen`) and with the start as the
  frozen scorer at its native 256-token context (`-frozen`); b = 256, s = 192, so J = L/b = 4 window passes
  per sequence, the paper's ratio (b = 8192, s = 6144 at 32k).
- Figures per variant: long-context perplexity (all targets, and before / after b), LongPPL with the uniform
  run as the evaluator (stated in `harness`), pass-key and key-value recall by distance (the candidate-ranking
  accuracy; exact greedy answers beside it), short-context perplexity, training time and throughput, extra
  forward passes per step.

Scale here (2 CPU cores): the start trains in a few minutes; each extension run about a minute; a cold run
about 20-25 minutes in all. Every trained model is cached by its config.
"""

from __future__ import annotations

import math
import time
from pathlib import Path

import numpy as np
import torch

from distilray import corpus
from distilray.actors.cluster import ensure_ray
from distilray.config import (
    BenchTokenWeightingConfig,
    CorpusSpec,
    EvalLongConfig,
    PrepareLongConfig,
    TrainLongConfig,
    config_from,
)
from distilray.errors import DistilrayError
from distilray.eval.plots import metrics_by_variant
from distilray.io_utils import atomic_write_json
from distilray.pipelines import eval_long, prepare_long, train_long, train_tokenizer
from distilray.tokenizer import load_tokenizer

SHORT_PPL_TOLERANCE = 0.02  # a weighting must keep short-context perplexity within 2% of uniform's
LONG_PPL_GAIN = 0.05  # and beat uniform's LongPPL by at least 5%
UNFROZEN_TIME_LIMIT = 1.5  # self scoring's training time at most 1.5x uniform's


def variant_runs(cfg: BenchTokenWeightingConfig) -> list[tuple[str, str, str]]:
    """(name, variant, scorer) of every extension run: uniform once, the others with each scorer."""
    runs = []
    for v in cfg.variants:
        if v == "uniform":
            runs.append(("uniform", "uniform", "self"))
            continue
        for scorer in cfg.scorers:
            runs.append((f"{v}-{'unfrozen' if scorer == 'self' else 'frozen'}", v, scorer))
    return runs


def prepare(cfg: BenchTokenWeightingConfig) -> dict:
    """Tokenizer, data, the short-context start and every extension run (all cached)."""
    if "uniform" not in cfg.variants:
        raise DistilrayError("the benchmark compares against uniform cross-entropy: keep 'uniform' in variants")
    ensure_ray()
    tok_dir = train_tokenizer.get_or_train(CorpusSpec(dataset=cfg.dataset), 4096, cfg.artifacts_dir)
    data = prepare_long.run(
        config_from(
            PrepareLongConfig,
            dataset=cfg.dataset,
            tokenizer=str(tok_dir),
            seq_len=cfg.seq_len,
            artifacts_dir=cfg.artifacts_dir,
            seed=cfg.seed,
        )
    )["output_dir"]
    common = {"data": data, "artifacts_dir": cfg.artifacts_dir, "seed": cfg.seed, "eval_sequences": 4}
    print(f"[bench token-weighting] start: {cfg.start_model} at {cfg.start_seq_len} tokens ...", flush=True)
    start = train_long.run(
        config_from(
            TrainLongConfig,
            model=cfg.start_model,
            tokenizer=str(tok_dir),
            seq_len=cfg.start_seq_len,
            steps=cfg.start_steps,
            batch_size=cfg.start_batch_size,
            lr=1e-3,
            min_lr_ratio=0.1,
            warmup_steps=30,
            weight_decay=0.1,
            variant="uniform",
            base_length=cfg.start_seq_len,
            **common,
        )
    )
    runs = {}
    for name, variant, scorer in variant_runs(cfg):
        print(f"[bench token-weighting] {name}: {cfg.steps} steps at {cfg.seq_len} tokens ...", flush=True)
        runs[name] = train_long.run(extension_config(cfg, start["model_dir"], variant, scorer, common))
    return {"tokenizer": str(tok_dir), "data": data, "start": start, "runs": runs, "common": common}


def extension_config(cfg: BenchTokenWeightingConfig, start: str, variant: str, scorer: str, common: dict):
    return config_from(
        TrainLongConfig,
        init=start,
        seq_len=cfg.seq_len,
        rope_theta=cfg.rope_theta,
        steps=cfg.steps,
        batch_size=cfg.batch_size,
        lr=cfg.lr,
        min_lr_ratio=1.0,
        warmup_steps=max(1, cfg.steps // 10),
        weight_decay=0.01,
        variant=variant,
        scorer=scorer,
        scorer_model=start if scorer == "frozen" and variant != "uniform" else "",
        base_length=cfg.base_length,
        base_stride=cfg.base_stride,
        **common,
    )


def step_timing(cfg: BenchTokenWeightingConfig, prepared: dict, warmup: int = 1) -> dict[str, dict]:
    """Seconds per optimizer step of uniform and of each self-scoring variant, measured side by side: one
    process, the variants taking turns step by step from the same start, so a change in the machine's load
    falls on all of them alike (the training runs' own throughputs come from different times)."""
    from distilray.ray_train.hooks import WorkerInfo
    from distilray.ray_train.loop import apply_update
    from distilray.training import make_optimizer

    _, ids = prepare_long.read_long_split(prepared["data"], "train")
    arrays = {"train": train_long.training_rows(ids, cfg.seq_len)}
    start = prepared["start"]["model_dir"]
    folders = {"tokenizer": Path(prepared["tokenizer"]), "init": Path(start)}
    worker = WorkerInfo(rank=0, world=1, device=torch.device("cpu"), run_dir=Path(cfg.artifacts_dir))
    setups = {}
    for name, variant, scorer in variant_runs(cfg):
        if scorer == "self":
            tcfg = extension_config(cfg, start, variant, scorer, prepared["common"])
            hooks = train_long.LongHooks(tcfg, worker, arrays, folders)
            model = hooks.build()
            setups[name] = (hooks, model, make_optimizer(model, cfg.lr, tcfg.optim.weight_decay), tcfg)
    seconds = {name: [] for name in setups}
    for step in range(warmup + cfg.timing_steps):
        for name, (hooks, model, optimizer, tcfg) in setups.items():
            began = time.perf_counter()
            out = hooks.loss(model, hooks.batch(step), step)
            apply_update(model, optimizer, out[0] if isinstance(out, tuple) else out, cfg.lr, tcfg.optim.grad_clip)
            if step >= warmup:
                seconds[name].append(time.perf_counter() - began)
    median = {name: float(np.median(s)) for name, s in seconds.items()}
    return {
        name: {"step_seconds": median[name], "vs_uniform": median[name] / median["uniform"], "steps": len(s)}
        for name, s in seconds.items()
    }


def eval_rows(cfg: BenchTokenWeightingConfig, prepared: dict) -> tuple[np.ndarray, str]:
    """Held-out sequences: the prepared test book's, or `eval_data` cut the same way with the same tokenizer."""
    if not cfg.eval_data:
        return prepare_long.read_long_split(prepared["data"], "test")[1], "the held-out test book"
    tokenizer = load_tokenizer(prepared["tokenizer"])
    docs = corpus.load_documents(cfg.eval_data)
    ids = tokenizer(docs, add_special_tokens=False, verbose=False)["input_ids"]
    rows = [prepare_long.cut_windows(d, cfg.seq_len, tokenizer.bos_token_id)[0] for d in ids]
    rows = [r for r in rows if len(r)]
    if not rows:
        raise DistilrayError(f"no document of {cfg.eval_data} holds {cfg.seq_len} tokens")
    return np.concatenate(rows).astype(np.int64), cfg.eval_data


def run(cfg: BenchTokenWeightingConfig) -> dict:
    started = time.perf_counter()
    prepared = prepare(cfg)
    rows, source = eval_rows(cfg, prepared)
    rows = rows[: cfg.eval_sequences]
    tokenizer = load_tokenizer(prepared["tokenizer"])
    texts = [tokenizer.decode(r[1:].tolist()) for r in rows]
    evaluator_dir = prepared["runs"]["uniform"]["model_dir"]
    ecfg = config_from(
        EvalLongConfig,
        base_length=cfg.base_length,
        short_length=cfg.base_length,
        short_step=cfg.base_length // 2,
        probe_distances=cfg.probe_distances,
        probes_per_distance=cfg.probes_per_distance,
        short_context=cfg.start_seq_len,
        seed=cfg.seed,
    )
    from distilray.models.causal_lm import load_causal_lm

    evaluator = load_causal_lm(evaluator_dir, device="cpu")
    variants = {}
    for name, res in prepared["runs"].items():  # the start reads only its short context: not evaluated at L
        print(f"[bench token-weighting] evaluating {name} ...", flush=True)
        figures = eval_long.evaluate_model(ecfg, res["model_dir"], rows, texts, evaluator, tokenizer)
        variants[name] = {
            **figures,
            "train_seconds": res.get("seconds"),
            "tokens_per_s": res.get("tokens_per_s"),
            "extra_forward_passes_per_step": res.get("extra_forward_passes_per_step", 0),
            "cached": res.get("cached", False),
        }
    result = {
        "variants": variants,
        "harness": {
            **eval_long.harness(ecfg),
            "evaluator": evaluator_dir,
            "held_out": f"{len(rows)} sequences of {cfg.seq_len} tokens from {source}",
        },
        "start": {k: prepared["start"].get(k) for k in ("model_dir", "val_ppl", "tokens_per_s", "seconds")},
        "settings": {
            k: getattr(cfg, k)
            for k in ("start_model", "start_seq_len", "start_steps", "seq_len", "base_length", "base_stride", "steps")
        }
        | {"batch_size": cfg.batch_size, "rope_theta": cfg.rope_theta},
    }
    if cfg.timing_steps > 0:
        print(f"[bench token-weighting] timing {cfg.timing_steps} steps of each variant side by side ...", flush=True)
        for name, t in step_timing(cfg, prepared).items():
            variants[name]["step_seconds"] = t["step_seconds"]
            variants[name]["time_vs_uniform"] = t["vs_uniform"]
    result["goals"] = compute_goals(variants)
    result["plot"] = str(
        metrics_by_variant(
            plot_figures(variants),
            Path(cfg.artifacts_dir).resolve() / "bench_token_weighting" / "metrics_by_variant.png",
            f"token weighting at L={cfg.seq_len} (b={cfg.base_length}), {cfg.steps} steps from one start",
        )
    )
    result["seconds"] = round(time.perf_counter() - started, 1)
    result["json"] = cfg.json_out
    if cfg.json_out:
        atomic_write_json(cfg.json_out, result)
    return result


def _mean(d: dict | None) -> float:
    values = [v for v in (d or {}).values() if v is not None]
    return float(np.mean(values)) if values else math.nan


def plot_figures(variants: dict) -> dict:
    return {name: eval_long.plot_figures(v) for name, v in variants.items() if name != "start"}


def compute_goals(variants: dict) -> dict:
    """The issue's goals, each with its figures: met True/False (None: nothing to judge)."""
    uniform = variants["uniform"]
    weighted = {n: v for n, v in variants.items() if n not in ("uniform", "start")}
    longce = {n: v for n, v in weighted.items() if n.startswith("longce")}
    best_longce = min(longce.values(), key=lambda v: v.get("long_key_ppl") or math.inf) if longce else None

    def beats(v: dict, ref: dict, gain: float) -> bool:
        a, b = v.get("long_key_ppl"), ref.get("long_key_ppl")
        return bool(a and b and a <= (1 - gain) * b and _mean(v["passkey_acc"]) > _mean(ref["passkey_acc"]))

    def keeps_short(v: dict) -> bool:
        return v["short_ppl"] <= (1 + SHORT_PPL_TOLERANCE) * uniform["short_ppl"]

    winners = [n for n, v in weighted.items() if not n.startswith("longce") and beats(v, uniform, LONG_PPL_GAIN)]
    winners = [
        n for n in winners if keeps_short(weighted[n]) and (best_longce is None or beats(weighted[n], best_longce, 0))
    ]
    goals = {
        "weighting_beats_uniform_and_longce": {
            "value": winners or "none",
            "goal": f"LongPPL >= {LONG_PPL_GAIN:.0%} below uniform's and higher pass-key accuracy, short PPL within "
            f"{SHORT_PPL_TOLERANCE:.0%} of uniform's; and better than LongCE on LongPPL and pass-key accuracy",
            "met": bool(winners),
            "uniform": {"long_key_ppl": uniform.get("long_key_ppl"), "passkey_acc": _mean(uniform["passkey_acc"])},
            "per_variant": {
                n: {
                    "long_key_ppl_vs_uniform": (v["long_key_ppl"] / uniform["long_key_ppl"] - 1)
                    if v.get("long_key_ppl") and uniform.get("long_key_ppl")
                    else None,
                    "passkey_acc": _mean(v["passkey_acc"]),
                    "short_ppl_vs_uniform": v["short_ppl"] / uniform["short_ppl"] - 1,
                }
                for n, v in weighted.items()
            },
        }
    }
    unfrozen = {n: v["time_vs_uniform"] for n, v in weighted.items() if v.get("time_vs_uniform") is not None}
    if unfrozen:
        goals["unfrozen_time_vs_uniform"] = {
            "value": max(unfrozen.values()),
            "per_variant": unfrozen,
            "goal": f"<= {UNFROZEN_TIME_LIMIT}x (median seconds per optimizer step, timed side by side in this run)",
            "met": max(unfrozen.values()) <= UNFROZEN_TIME_LIMIT,
        }
    return goals


def _fmt(x, spec: str = ".2f") -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, spec)


def format_table(r: dict) -> str:
    s = r["settings"]
    lines = [
        f"bench token-weighting: {s['start_model']} start at {s['start_seq_len']} ({s['start_steps']} steps), "
        f"extended to L={s['seq_len']} for {s['steps']} steps, b={s['base_length']}, s={s['base_stride']}",
        f"held out: {r['harness']['held_out']}; LongPPL evaluator: {Path(r['harness']['evaluator']).parent.name}",
        f"{'variant':<18}{'ppl':>8}{'<b':>8}{'>=b':>8}{'LongPPL':>9}{'passkey':>9}{'kv':>7}{'short':>8}"
        f"{'tok/s':>8}{'s/step':>8}{'extra':>7}",
    ]
    for name, v in r["variants"].items():
        lines.append(
            f"{name:<18}{_fmt(v['long_ppl']):>8}{_fmt(v['long_ppl_before_b']):>8}{_fmt(v['long_ppl_after_b']):>8}"
            f"{_fmt(v.get('long_key_ppl')):>9}{_fmt(_mean(v['passkey_acc']), '.3f'):>9}"
            f"{_fmt(_mean(v['kv_recall']), '.3f'):>7}{_fmt(v['short_ppl']):>8}{_fmt(v.get('tokens_per_s'), '.0f'):>8}"
            f"{_fmt(v.get('step_seconds'), '.3f'):>8}{v['extra_forward_passes_per_step']:>7}"
        )
    chance = next(iter(r["variants"].values())).get("probe_chance")
    lines.append(f"passkey / kv: candidate-ranking accuracy, mean over distances (chance {_fmt(chance, '.2f')})")
    lines.append(
        "tok/s: each training run's own throughput (runs trained at different times, cached ones earlier); "
        "s/step: median of the side-by-side timing"
    )
    lines.append("goals:")
    for name, g in r["goals"].items():
        v = g["value"]
        shown = f"{v:.2f}" if isinstance(v, float) else str(v)
        mark = "reported" if g["met"] is None else ("met" if g["met"] else "NOT met")
        lines.append(f"  {name}: {shown}; goal {g['goal']}: {mark}")
    lines.append(f"plot: {r['plot']}")
    if r.get("json"):
        lines.append(f"JSON: {r['json']}")
    return "\n".join(lines)
