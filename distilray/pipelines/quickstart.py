"""`distilray quickstart`: the main job end to end on the embedded defaults.

Stage 1 (foundation): a BPE tokenizer and two causal LMs, a target and a much smaller drafter,
trained with Ray Train on the built-in corpus; their test perplexity and a sample from each.
Later stages (CD-LM, speculative decoding, ...) add their rows to the same summary.
"""

from __future__ import annotations

import time
from pathlib import Path

from distilray.config import CorpusSpec, EvalPPLConfig, QuickstartConfig, TrainLMConfig
from distilray.generation import generate_text
from distilray.io_utils import atomic_write_json
from distilray.models.causal_lm import load_causal_lm
from distilray.pipelines import eval_ppl, train_lm, train_tokenizer
from distilray.pipelines.ray_runtime import ensure_ray
from distilray.tokenizer import load_tokenizer


def lm_config(cfg: QuickstartConfig, preset: str, steps: int, tokenizer_dir: Path) -> TrainLMConfig:
    """The quickstart's training config for one model (benchmarks reuse it, and so its cache)."""
    return TrainLMConfig(
        corpus=cfg.corpus,
        model=preset,
        tokenizer=str(tokenizer_dir),
        seq_len=cfg.seq_len,
        batch_size=cfg.batch_size,
        steps=steps,
        warmup_steps=max(1, steps // 10),
        num_workers=cfg.num_workers,
        checkpoint_every=max(1, steps // 2),
        artifacts_dir=cfg.artifacts_dir,
        seed=cfg.seed,
    )


def trained_target(cfg: QuickstartConfig) -> tuple[Path, dict]:
    """Tokenizer folder and the quickstart's target model (trained once, then cached)."""
    tok_dir = train_tokenizer.get_or_train(cfg.corpus, cfg.vocab_size, cfg.artifacts_dir)
    return tok_dir, train_lm.run(lm_config(cfg, cfg.target_model, cfg.target_steps, tok_dir))


def run(cfg: QuickstartConfig) -> dict:
    started = time.perf_counter()
    ensure_ray()
    rows: list[tuple[str, str, str]] = []  # (stage, figure, value)
    artifacts: dict[str, str] = {}

    t0 = time.perf_counter()
    tok_dir = train_tokenizer.get_or_train(cfg.corpus, cfg.vocab_size, cfg.artifacts_dir)
    tokenizer = load_tokenizer(tok_dir)
    rows.append(("tokenizer", "vocabulary", str(len(tokenizer))))
    rows.append(("tokenizer", "seconds", f"{time.perf_counter() - t0:.1f}"))
    artifacts["tokenizer"] = str(Path(tok_dir).resolve())

    models: dict[str, dict] = {}
    for role, preset, steps in (("target", cfg.target_model, cfg.target_steps), ("drafter", cfg.drafter_model, cfg.drafter_steps)):
        t0 = time.perf_counter()
        res = train_lm.run(lm_config(cfg, preset, steps, tok_dir))
        test = eval_ppl.run(EvalPPLConfig(model=res["model_dir"], corpus=cfg.corpus, split="test", context_len=cfg.seq_len, max_tokens=50_000))
        model = load_causal_lm(res["model_dir"])
        sample = generate_text(model, tokenizer, cfg.sample_prompt, max_new_tokens=cfg.sample_tokens, temperature=0.8, top_k=50, seed=cfg.seed)
        models[role] = {**res, "test_ppl": test["ppl"], "sample": sample}
        label = f"{role} ({preset})"
        rows += [
            (label, "parameters", f"{res['parameters']:,}"),
            (label, "train steps", str(res["steps"])),
            (label, "final train loss", f"{res['final_loss']:.3f}"),
            (label, "validation ppl", f"{res['val_ppl']:.2f}"),
            (label, "test ppl", f"{test['ppl']:.2f}"),
            (label, "train tokens/s", f"{res['tokens_per_s']:.0f}" + (" (cached run)" if res.get("cached") else "")),
            (label, "seconds", f"{time.perf_counter() - t0:.1f}"),
        ]
        artifacts[f"{role} model"] = res["model_dir"]
        artifacts[f"{role} metrics"] = res["metrics_csv"]

    results_path = Path(cfg.artifacts_dir).resolve() / "quickstart" / "results.json"
    artifacts["results"] = str(results_path)
    summary = {
        "rows": rows,
        "artifacts": artifacts,
        "samples": {role: m["sample"] for role, m in models.items()},
        "prompt": cfg.sample_prompt,
        "seconds": round(time.perf_counter() - started, 1),
    }
    atomic_write_json(results_path, summary)
    return summary


def format_summary(summary: dict) -> str:
    rows = summary["rows"]
    w1 = max(len(r[0]) for r in rows)
    w2 = max(len(r[1]) for r in rows)
    lines = ["", "distilray quickstart: summary", "=" * (w1 + w2 + 20)]
    lines += [f"{stage:<{w1}}  {figure:<{w2}}  {value}" for stage, figure, value in rows]
    lines += ["", f"samples (prompt: {summary['prompt']!r})"]
    lines += [f"  {role:<8} {text!r}" for role, text in summary["samples"].items()]
    lines += ["", "artifacts"]
    lines += [f"  {k:<16} {v}" for k, v in summary["artifacts"].items()]
    lines += ["", f"total {summary['seconds']} s"]
    return "\n".join(lines)
