"""Target-size sweep of `bench speculative` (`sweep=true`, or `sweep_only=true`): how speedup moves as
the target grows.

Targets: GPT-2 presets of growing size (`sweep_sizes`, default tiny ~0.5M, mini ~4M, small ~21M),
each trained `sweep_steps` steps the quickstart's way on the same corpus and tokenizer (cached; `mini`
at the quickstart's target_steps is the quickstart target itself). Drafters, the same for every target
(they depend on the tokenizer only): `ngram3` counted on the corpus, `prompt-lookup`, and
`transformer`, the quickstart's drafter LM (the `tiny` preset trained with cross-entropy on the corpus).
Per target: its one-token step, the verification cost v(4) = gamma-4 pass / one-token step, its
held-out perplexity and, per drafter, the measured speedup over plain decoding with alpha, gamma and c
(gamma picked on half of `sweep_prompts` held-out prompts, figures from the other half, as in the
main table), plus prompt lookup on cnndm summaries. With `quantize=int8` targets and neural drafters
are int8. A drafter's cost c falls as the target grows, while v(4) says what the CPU charges for
verifying gamma + 1 tokens at once: the two together set the speedup.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch

from distilray.bench.speculative import copy_task, held_out_prompts, measure_drafter
from distilray.bench.targets import quickstart_tokenizer, train_preset
from distilray.config import NGRAM, BenchSpeculativeConfig, FitNGramConfig
from distilray.decoding.drafters import is_prompt_lookup
from distilray.eval.speculative_speed import verify_cost
from distilray.models.causal_lm import load_causal_lm
from distilray.models.quantize import apply_quantization
from distilray.tokenizer import load_tokenizer

VERIFY_GAMMA = 4  # the verification cost reported per target: a gamma-4 pass over a one-token step


def sweep_drafters(cfg: BenchSpeculativeConfig) -> dict[str, str]:
    """{name: folder or prompt-lookup spec} for cfg.sweep_drafters, trained or counted (cached)."""
    q, tok_dir = quickstart_tokenizer(cfg.artifacts_dir, cfg.seed)
    home = Path(cfg.artifacts_dir).resolve() / "bench_speculative"
    out: dict[str, str] = {}
    for name in cfg.sweep_drafters:
        if is_prompt_lookup(name):
            out[name] = name
        elif name == "transformer":
            out[name] = train_preset(cfg.artifacts_dir, q.drafter_model, q.drafter_steps, cfg.seed)["model_dir"]
        else:
            n = int(NGRAM.match(name).group(1))
            folder = home / f"ngram{n}-baseline"  # the main run's corpus-counted n-gram: the same tokenizer
            if not (folder / "stats.json").is_file():
                from distilray.pipelines import fit_ngram

                fit_ngram.run(FitNGramConfig(tokenizer=str(tok_dir), corpus=q.corpus, n=n, output_dir=str(folder)))
            out[name] = str(folder)
    return out


def measure_size(target, tokenizer, drafters: dict[str, str], prompts: list[list[int]], cfg) -> dict:
    """One target: its step and verification cost, every drafter's figures, prompt lookup on cnndm."""

    gammas = tuple(sorted({*cfg.gammas, VERIFY_GAMMA}))
    verify = verify_cost(target, prompts[0], gammas)
    figures = {name: measure_drafter(target, spec, prompts, cfg, verify) for name, spec in drafters.items()}
    cnndm = copy_task(target, tokenizer, cfg) if any(map(is_prompt_lookup, drafters.values())) else {}
    step_ms = [d["target_step_ms"] for d in figures.values()]
    return {
        "target_step_ms": sum(step_ms) / len(step_ms),
        "verify_over_step": verify[VERIFY_GAMMA],
        "verify_cost": {str(g): v for g, v in verify.items()},
        "drafters": figures,
        "cnndm_prompt_lookup": cnndm,
    }


def run_sweep(cfg: BenchSpeculativeConfig) -> dict:
    """{sizes: [per preset: model_dir, parameters, val_ppl, costs and drafter figures], ...}."""
    from distilray.actors.cluster import ensure_ray

    ensure_ray()  # training and n-gram counting run on Ray
    drafters = sweep_drafters(cfg)
    trained = []
    for preset in cfg.sweep_sizes:
        print(
            f"[bench speculative] sweep: {preset} target, {cfg.sweep_steps} steps (trained, or from the cache) ...",
            flush=True,
        )
        trained.append((preset, train_preset(cfg.artifacts_dir, preset, cfg.sweep_steps, cfg.seed)))
    tokenizer = load_tokenizer(trained[0][1]["model_dir"])
    small = dataclasses.replace(cfg, prompts=cfg.sweep_prompts)
    prompts = held_out_prompts(small, tokenizer)
    torch.set_num_threads(max(1, cfg.threads))
    sizes = []
    for preset, result in trained:
        print(f"[bench speculative] sweep: drafters against the {preset} target ...", flush=True)
        target = load_causal_lm(result["model_dir"], device="cpu", dtype=torch.float32)
        target = apply_quantization(target, cfg.quantize)
        sizes.append(
            {
                "preset": preset,
                "model_dir": result["model_dir"],
                "parameters": result["parameters"],
                "steps": result["steps"],
                "val_ppl": result["val_ppl"],
                **measure_size(target, tokenizer, drafters, prompts, small),
            }
        )
    return {
        "steps": cfg.sweep_steps,
        "prompts": len(prompts),
        "new_tokens": cfg.new_tokens,
        "quantize": cfg.quantize,
        "threads": cfg.threads,
        "drafter_folders": drafters,
        "sizes": sizes,
    }


def format_sweep(s: dict) -> list[str]:
    """The sweep as table lines: one row per target size, measured speedup per drafter."""
    names = list(s["sizes"][0]["drafters"]) if s["sizes"] else []
    has_cnndm = any(z.get("cnndm_prompt_lookup") for z in s["sizes"])
    columns = names + (["PL cnndm"] if has_cnndm else [])
    lines = [
        f"target-size sweep: {s['steps']} training steps each, {s['prompts']} held-out prompts x {s['new_tokens']} "
        f"tokens, quantize {s['quantize']}; measured speedup over plain decoding (alpha, gamma)",
        (
            f"{'target':<8}{'params':>12}{'val ppl':>9}{'step ms':>9}{'v(4)':>7}  "
            + "".join(f"{c:<20}" for c in columns)
        ).rstrip(),
    ]
    for z in s["sizes"]:
        cells = [z["drafters"][n] for n in names]
        if has_cnndm:
            cells.append(z.get("cnndm_prompt_lookup") or {})
        shown = "".join(f"{_cell(d):<20}" for d in cells)
        lines.append(
            f"{z['preset']:<8}{z['parameters']:>12,}{z['val_ppl']:>9.1f}{z['target_step_ms']:>9.2f}"
            f"{z['verify_over_step']:>6.2f}x  {shown}".rstrip()
        )
    lines.append(
        "(v(4): a verification pass over 5 tokens / a one-token step of the target; c per drafter in the JSON)"
    )
    return lines


def _cell(d: dict) -> str:
    """`1.42x (0.61, 4)`: measured speedup (alpha, gamma), or `-` when not measured."""
    return f"{d['speedup_measured']:.2f}x ({d['alpha']:.2f}, {d['gamma']})" if d else "-"
