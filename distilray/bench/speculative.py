"""`distilray bench speculative`: every drafter kind, baseline vs distilled, measured side by side.

- Target: the quickstart's target LM (trained and cached by the same config).
- Drafters: n-grams (n = 1..4) counted on the corpus (baseline) or on target generations
  (distilled: the seed's pseudo-dataset); CNN, LSTM and a GPT-2 transformer trained with
  cross-entropy on the corpus (baseline) or distilled from the target (`distill_loss` on
  `distill_data`), the same steps for both; prompt lookup (untrained: copies from the context).
- Greedy decoding of held-out prompts; for each drafter and gamma: alpha = A / (A + R), mean
  accepted length, c (drafter step / target step, both cached one-token steps), theoretical speedup
  E / (gamma c + 1) and measured speedup over plain KV-cached decoding of the same prompts, timed
  prompt by prompt in alternation. Each drafter's gamma is picked on the first half of the prompts
  and its figures come from the second half.
- Peers: transformers' assisted generation with the same target, drafter and gamma.
- Serving: tokens/s through the Ray Serve endpoint over the same decoding in process.
- Copy-heavy task: cnndm articles followed by a summary cue, decoded by the same causal target with
  prompt lookup against plain decoding (goal: >= 1.5x).
- int8 (bench/speculative_int8.py): the target's one-token step and gamma-4 verification pass in
  float32 and int8, also on a ~21M preset, and its held-out perplexity before and after. With
  `quantize=int8` every decoding figure above is of the int8 target with int8 neural drafters,
  against plain decoding of that same int8 target (the Serve comparison stays float32).
- T5 (`include_t5`): the encoder-decoder setting on cnndm.
- A user's target (`target=PATH drafters=[NAME=SPEC,...]`, bench/speculative_user.py): the same figures
  for any causal LM folder against the drafters given; what needs the quickstart's artifacts is skipped.
- Target-size sweep (`sweep=true`, bench/speculative_sweep.py): presets of growing size trained the
  quickstart's way, each against the cheap drafters: speedup and verification cost against target size.
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path

import numpy as np
import torch

from distilray import corpus
from distilray.actors.cluster import ensure_ray
from distilray.bench.speculative_int8 import format_int8, int8_figures
from distilray.config import (
    BenchSpeculativeConfig,
    CorpusSpec,
    DistillDrafterConfig,
    FitNGramConfig,
    QuickstartConfig,
    config_from,
)
from distilray.decoding.drafter_api import model_vocab_size
from distilray.decoding.drafters import is_prompt_lookup, load_drafter
from distilray.decoding.speculative import optimal_gamma, speculative_generate
from distilray.eval.plots import acceptance_vs_gamma
from distilray.eval.speculative_speed import scan_drafter, step_times, verify_cost
from distilray.io_utils import read_json
from distilray.models.causal_lm import count_parameters, load_causal_lm, max_context
from distilray.models.drafters import NEURAL_KINDS, load_drafter_network
from distilray.models.quantize import apply_quantization
from distilray.pipelines import distill_drafter, fit_ngram, train_lm, train_tokenizer
from distilray.pipelines.quickstart import lm_config
from distilray.tokenizer import encode_documents, load_tokenizer

GOALS = {
    "best_speedup": 2.0,
    "prompt_lookup.cnndm_speedup": 1.5,
    "distilled_alpha_gain": 0.05,
    "measured_over_theoretical": 0.85,
    "measured_over_theoretical_with_verify_cost": 0.95,
    "measured_over_priced": 0.95,  # not the issue's goal: where the gap to the one above comes from
    "hf_assisted.speedup_ours_over_hf": 1.3,
    "serve.ratio_vs_in_process": 0.9,
}
NGRAM_ORDERS = (1, 2, 3, 4)
PROMPT_LOOKUP = "prompt-lookup"  # the drafter spec: n-grams of 3 down to 1, drafts of up to 8 tokens
SUMMARY_CUE = "\n\nTL;DR:"  # after an article, a causal LM's cue to summarise it (as in the GPT-2 paper)
TIMING_STEPS = 64  # context left after a summary prompt: the answer, or step_times' 48 timed steps


# ------------------------------------------------------------------------------------- artifacts
def prepare(cfg: BenchSpeculativeConfig) -> tuple[str, dict[str, dict[str, str]]]:
    """The target folder and drafter folders {name: {"baseline": dir, "distilled": dir}}, trained or cached."""
    q = QuickstartConfig(artifacts_dir=cfg.artifacts_dir, seed=cfg.seed)
    tok_dir = train_tokenizer.get_or_train(q.corpus, q.vocab_size, q.artifacts_dir)
    target_dir = train_lm.run(lm_config(q, q.target_model, q.target_steps, tok_dir))["model_dir"]
    home = Path(cfg.artifacts_dir).resolve() / "bench_speculative"
    base = config_from(
        DistillDrafterConfig,
        target=target_dir,
        corpus=q.corpus,
        steps=cfg.drafter_steps,
        artifacts_dir=cfg.artifacts_dir,
        pseudo_sequences=cfg.pseudo_sequences,
        sample_temperature=cfg.pseudo_temperature,
        seed=cfg.seed,
    )
    drafters: dict[str, dict[str, str]] = {}
    for kind in NEURAL_KINDS:
        drafters[kind] = {
            "baseline": distill_drafter.run(dataclasses.replace(base, drafter=kind, loss="ce", data="corpus"))[
                "drafter_dir"
            ],
            "distilled": distill_drafter.run(
                dataclasses.replace(base, drafter=kind, loss=cfg.distill_loss, data=cfg.distill_data)
            )["drafter_dir"],
        }
    pseudo = distill_drafter.prepare_pseudo(dataclasses.replace(base, drafter="transformer", loss="ce", data="pseudo"))
    for n in NGRAM_ORDERS:
        drafters[f"ngram{n}"] = {}
        for variant, source in (("baseline", ""), ("distilled", str(pseudo))):
            out = home / f"ngram{n}-{variant}"
            if not (out / "stats.json").is_file():
                fit_ngram.run(
                    FitNGramConfig(tokenizer=target_dir, corpus=q.corpus, n=n, pseudo_data=source, output_dir=str(out))
                )
            drafters[f"ngram{n}"][variant] = str(out)
    return target_dir, drafters


def held_out_prompts(cfg: BenchSpeculativeConfig, tokenizer) -> list[list[int]]:
    """Prompts cut from the test split (or --eval-data), spaced so that no prompt overlaps another's answer."""
    spec = CorpusSpec(dataset=cfg.eval_data) if cfg.eval_data else CorpusSpec()
    step = cfg.prompt_tokens + cfg.new_tokens
    docs = encode_documents(tokenizer, corpus.load_splits(spec)["test"])
    prompts = [d[i : i + cfg.prompt_tokens] for d in docs for i in range(0, len(d) - step, step)]
    if len(prompts) < 2:
        raise ValueError(
            f"the evaluation text yields {len(prompts)} prompts of {cfg.prompt_tokens}+{cfg.new_tokens} tokens; "
            f"need at least 2"
        )
    return prompts[: cfg.prompts]


def summary_prompts(cfg: BenchSpeculativeConfig, tokenizer, context: int) -> list[list[int]]:
    """The first `cfg.prompts` cnndm articles, each cut to leave room for the cue and the answer (or the
    timed steps) within the target's context, then the summary cue: a copy-heavy task (a summary reuses
    the article's words)."""
    cue = encode_documents(tokenizer, [SUMMARY_CUE])[0]
    budget = context - max(cfg.new_tokens, TIMING_STEPS) - len(cue)
    articles = [article for article, _ in corpus.load_cnndm_pairs()[: cfg.prompts]]
    return [ids[:budget] + cue for ids in encode_documents(tokenizer, articles)]


def held_out_tokens(cfg: BenchSpeculativeConfig, tokenizer, limit: int = 16_384) -> np.ndarray:
    """The first `limit` tokens of the held-out text (test split, or --eval-data), documents concatenated."""
    spec = CorpusSpec(dataset=cfg.eval_data) if cfg.eval_data else CorpusSpec()
    docs = encode_documents(tokenizer, corpus.load_splits(spec)["test"])
    return np.concatenate([np.asarray(d, dtype=np.int64) for d in docs])[:limit]


def measure_drafter(
    target,
    folder: str,
    prompts: list[list[int]],
    cfg: BenchSpeculativeConfig,
    verify: dict[int, float],
    vocab_limit: int | None = None,
) -> dict:
    """One drafter (a folder, or the prompt-lookup spec), quantised as the target is, against plain decoding.
    vocab_limit: the tokenizer's length when the target's logits are padded past it."""
    drafter = load_drafter(folder, quantize=cfg.quantize, vocab_size=model_vocab_size(target))
    target_s, drafter_s = step_times(target, drafter, prompts[0])
    c = drafter_s / target_s
    half = max(1, len(prompts) // 2)
    tune, _ = scan_drafter(target, drafter, prompts[:half], cfg.gammas, cfg.new_tokens, c, vocab_limit=vocab_limit)
    gamma = max(tune, key=lambda g: tune[g]["speedup_measured"])
    alpha = tune[gamma]["alpha"]
    # where the i.i.d. theory puts gamma for the measured alpha and c: beside the gamma the scan picked
    theory_gamma = optimal_gamma(min(max(alpha, 0.0), 1.0), c, max(cfg.gammas)) if alpha == alpha else None
    scan, identical = scan_drafter(
        target, drafter, prompts[half:], cfg.gammas, cfg.new_tokens, c, verify, vocab_limit=vocab_limit
    )
    return {
        **scan[gamma],
        "gamma": gamma,
        "gamma_optimal_theory": theory_gamma,
        "c": c,
        "target_step_ms": 1e3 * target_s,
        "drafter_step_ms": 1e3 * drafter_s,
        "identical_to_plain": identical,
        "scan": {str(g): v for g, v in scan.items()},
    }


@torch.inference_mode()
def hf_assisted(target, drafter_dir: str, prompts: list[list[int]], cfg: BenchSpeculativeConfig, gamma: int) -> dict:
    """Tokens/s of transformers' assisted generation against ours, same pair, same gamma, greedy, alternating."""
    assistant = apply_quantization(load_drafter_network(drafter_dir), cfg.quantize)
    assistant.generation_config.num_assistant_tokens = gamma
    assistant.generation_config.num_assistant_tokens_schedule = "constant"
    assistant.generation_config.assistant_confidence_threshold = 0.0  # draft exactly gamma, as ours does
    drafter = load_drafter(drafter_dir, quantize=cfg.quantize)
    ours_s = hf_s = 0.0
    tokens = 0
    same = True
    for prompt in prompts:
        ids = torch.tensor([prompt])
        t0 = time.perf_counter()
        out = target.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            assistant_model=assistant,
            do_sample=False,
            max_new_tokens=cfg.new_tokens,
            min_new_tokens=cfg.new_tokens,
            eos_token_id=None,
            pad_token_id=0,
        )
        hf_s += time.perf_counter() - t0
        rec = speculative_generate(target, drafter, prompt, cfg.new_tokens, gamma=gamma)
        ours_s += rec.seconds
        tokens += len(rec.token_ids)
        same &= out[0, len(prompt) :].tolist() == rec.token_ids
    return {
        "gamma": gamma,
        "tokens_per_s_ours": tokens / ours_s,
        "tokens_per_s_hf": tokens / hf_s,
        "speedup_ours_over_hf": hf_s / ours_s,
        "same_tokens": same,
    }


# ------------------------------------------------------------------------------------------ run
def measure_all(target, drafters: dict, prompts: list[list[int]], cfg: BenchSpeculativeConfig, verify: dict) -> dict:
    """{name: {variant: figures}} for every drafter folder and prompt lookup, on the held-out prompts."""
    results: dict[str, dict] = {}
    for name, variants in {**drafters, PROMPT_LOOKUP: {"untrained": PROMPT_LOOKUP}}.items():
        results[name] = {
            variant: measure_drafter(target, folder, prompts, cfg, verify) for variant, folder in variants.items()
        }
        for variant, folder in variants.items():
            results[name][variant]["folder"] = folder
            if name in NEURAL_KINDS:
                results[name][variant]["train"] = read_json(Path(folder).parent / "result.json")["val"]
    return results


def copy_task(target, tokenizer, cfg: BenchSpeculativeConfig, vocab_limit: int | None = None) -> dict:
    """Prompt lookup against plain decoding on cnndm articles followed by a summary cue."""
    prompts = summary_prompts(cfg, tokenizer, max_context(target))
    verify = verify_cost(target, prompts[0], cfg.gammas)
    figures = measure_drafter(target, PROMPT_LOOKUP, prompts, cfg, verify, vocab_limit=vocab_limit)
    return {**figures, "prompts": len(prompts), "prompt_tokens": sum(map(len, prompts)) / len(prompts)}


def ranked_drafters(results: dict) -> list[tuple[str, str]]:
    """(name, variant) of every measured drafter, fastest (measured speedup) first."""
    return sorted(
        ((n, v) for n in results for v in results[n]), key=lambda nv: -results[nv[0]][nv[1]]["speedup_measured"]
    )


def run_quickstart(cfg: BenchSpeculativeConfig) -> dict:
    """Every figure for the quickstart's target, its drafters trained here (cached)."""
    ensure_ray()
    target_dir, drafters = prepare(cfg)
    tokenizer = load_tokenizer(target_dir)
    prompts = held_out_prompts(cfg, tokenizer)
    torch.set_num_threads(max(1, cfg.threads))
    print("[bench speculative] int8 against float32 ...", flush=True)
    q = QuickstartConfig(artifacts_dir=cfg.artifacts_dir, seed=cfg.seed)
    int8 = int8_figures(target_dir, tokenizer, held_out_tokens(cfg, tokenizer), prompts[0], q.seq_len, cfg.seed)
    target = load_causal_lm(target_dir, device="cpu", dtype=torch.float32)
    parameters = count_parameters(target)
    target = apply_quantization(target, cfg.quantize)  # the model served: every figure below is of it
    verify = verify_cost(target, prompts[0], cfg.gammas)
    print("[bench speculative] drafters on held-out prompts ...", flush=True)
    results = measure_all(target, drafters, prompts, cfg, verify)
    ranked = ranked_drafters(results)
    best_name, best_variant = ranked[0]
    print("[bench speculative] prompt lookup on cnndm summaries ...", flush=True)
    cnndm = copy_task(target, tokenizer, cfg)
    eval_half = prompts[max(1, len(prompts) // 2) :]
    hf = hf_assisted(
        target, drafters["transformer"]["distilled"], eval_half, cfg, results["transformer"]["distilled"]["gamma"]
    )
    from distilray.bench.serve_speculative import serve_vs_in_process

    # the best drafter that has a folder (the endpoint loads drafters from folders), in float32 on both sides
    serve_name, serve_variant = next((n, v) for n, v in ranked if not is_prompt_lookup(results[n][v]["folder"]))
    serve = serve_vs_in_process(
        target_dir,
        drafters[serve_name][serve_variant],
        [tokenizer.decode(p) for p in eval_half],
        cfg.new_tokens,
        results[serve_name][serve_variant]["gamma"],
    )
    serve["drafter"] = f"{serve_name} ({serve_variant})"
    home = Path(cfg.artifacts_dir).resolve() / "bench_speculative"
    scan = {
        f"{n} ({v})": {int(g): s for g, s in results[n][v]["scan"].items()}
        for n in results
        for v in results[n]
        if v != "baseline"
    }
    plot = acceptance_vs_gamma(
        scan,
        home / "acceptance_vs_gamma.png",
        f"speculative decoding, target {parameters:,} params ({cfg.quantize}), greedy, held-out prompts",
    )
    t5 = {}
    if cfg.include_t5:
        from distilray.bench.speculative_t5 import run_t5

        t5 = run_t5(cfg.artifacts_dir, seed=cfg.seed)
    return {
        "target": {
            "model_dir": target_dir,
            "parameters": parameters,
            "quantize": cfg.quantize,
            "verify_cost": {str(g): v for g, v in verify.items()},
        },
        "prompts": len(prompts),
        "new_tokens": cfg.new_tokens,
        "threads": cfg.threads,
        "drafters": results,
        "cnndm_prompt_lookup": cnndm,
        "int8": int8,
        "hf_assisted": hf,
        "serve": serve,
        "t5": t5,
        "goals": goals(cfg, results, (best_name, best_variant), cnndm, int8, hf, serve),
        "plot": str(plot),
    }


def goals(
    cfg: BenchSpeculativeConfig,
    results: dict,
    best_key: tuple,
    cnndm: dict,
    int8: dict,
    hf: dict | None = None,
    serve: dict | None = None,
) -> dict:
    """Every goal as {value, goal, op, met, ...}: op ">=" unless it says "<=". A goal whose figures were
    not measured (a user's target: no distilled drafters, no assisted generation, no Serve) is left out."""
    best = results[best_key[0]][best_key[1]]
    # alpha depends a little on gamma in practice, so both variants are compared at one fixed gamma
    fixed = str(4 if 4 in cfg.gammas else cfg.gammas[-1])
    gains = {
        k: results[k]["distilled"]["scan"][fixed]["alpha"] - results[k]["baseline"]["scan"][fixed]["alpha"]
        for k in NEURAL_KINDS
        if {"baseline", "distilled"} <= set(results.get(k, {}))
    }
    candidates = {
        "best_speedup": {
            "value": best["speedup_measured"],
            "goal": GOALS["best_speedup"],
            "drafter": f"{best_key[0]} ({best_key[1]})",
        },
        "prompt_lookup.cnndm_speedup": {
            "value": cnndm["speedup_measured"],
            "goal": GOALS["prompt_lookup.cnndm_speedup"],
            "gamma": cnndm["gamma"],
        },
        "distilled_alpha_gain": gains
        and {
            "value": min(gains.values()),
            "goal": GOALS["distilled_alpha_gain"],
            "per_kind": gains,
            "gamma": int(fixed),
        },
        "measured_over_theoretical": {
            "value": best["speedup_measured"] / best["speedup_theoretical"],
            "goal": GOALS["measured_over_theoretical"],
        },
        # the theory priced with what a verification pass really costs here: what the loop itself loses
        "measured_over_theoretical_with_verify_cost": {
            "value": best["speedup_measured"] / best["speedup_theoretical_verify_cost"],
            "goal": GOALS["measured_over_theoretical_with_verify_cost"],
        },
        # the same priced with the measured passes and tokens: only the loop's own time between passes is left
        "measured_over_priced": "speedup_priced" in best
        and {"value": best["speedup_measured"] / best["speedup_priced"], "goal": GOALS["measured_over_priced"]},
        "hf_assisted.speedup_ours_over_hf": hf
        and {"value": hf["speedup_ours_over_hf"], "goal": GOALS["hf_assisted.speedup_ours_over_hf"]},
        "serve.ratio_vs_in_process": serve
        and {"value": serve["ratio_vs_in_process"], "goal": GOALS["serve.ratio_vs_in_process"]},
        "int8.verify_over_step": dict(int8["goal"]),
    }
    out = {name: g for name, g in candidates.items() if g}
    for g in out.values():
        g.setdefault("op", ">=")
        g["met"] = bool(g["value"] >= g["goal"] if g["op"] == ">=" else g["value"] <= g["goal"])
    return out


def main_lines(r: dict) -> list[str]:
    """The table of one target: the quickstart's, or a user's (`target=`)."""
    t = r["target"]
    about = f"{t['parameters']:,} params ({t.get('quantize', 'none')}"
    about += f", vocab_limit {t['vocab_limit']})" if t.get("vocab_limit") else ")"
    lines = [
        f"bench speculative: target {t['model_dir'] + ', ' if t.get('user') else ''}{about}, "
        f"greedy, {r['prompts']} held-out prompts x {r['new_tokens']} tokens, {r['threads']} thread(s)",
        f"{'drafter':<14}{'variant':<10}{'gamma':>6}{'g*':>4}{'alpha':>8}{'tau':>7}{'c':>8}{'S meas':>8}{'S theo':>8}"
        f"{'S theo+v':>9}{'S priced':>9}  same",
    ]
    rows = [(name, variant, d) for name, variants in r["drafters"].items() for variant, d in variants.items()]
    if r.get("cnndm_prompt_lookup"):
        rows.append(("prompt-lookup", "cnndm", r["cnndm_prompt_lookup"]))
    for name, variant, d in rows:
        lines.append(
            f"{name:<14}{variant:<10}{d['gamma']:>6}{str(d.get('gamma_optimal_theory') or '-'):>4}"
            f"{d['alpha']:>8.3f}{d['mean_accepted_length']:>7.2f}{d['c']:>8.3f}"
            f"{d['speedup_measured']:>8.2f}{d['speedup_theoretical']:>8.2f}"
            f"{d['speedup_theoretical_verify_cost']:>9.2f}{d.get('speedup_priced', float('nan')):>9.2f}"
            f"  {d['identical_to_plain']}"
        )
    if r.get("cnndm_prompt_lookup"):
        c = r["cnndm_prompt_lookup"]
        lines.append(
            f"(cnndm: {c['prompts']} articles + summary cue, {c['prompt_tokens']:.0f} prompt tokens on average, "
            f"the same target)"
        )
    lines.append(
        "g*: the gamma the i.i.d. theory picks for the measured alpha and c (optimal_gamma); gamma: the scan's"
    )
    lines.append(
        "S theo+v: E[tau] / (gamma c + v(gamma)), E[tau] from alpha alone; S priced: the measured tokens over the "
        "measured passes, each priced v(g) + g c: S meas / S priced is what the loop loses between passes"
    )
    v = r["target"]["verify_cost"]
    lines.append(
        "verification pass over gamma+1 tokens / one-token step: "
        + ", ".join(f"gamma {g}: {x:.2f}x" for g, x in v.items())
    )
    if r.get("int8"):
        lines.extend(format_int8(r["int8"]))
    gain = r["goals"].get("distilled_alpha_gain")
    if gain:
        lines.append(
            f"distilled - baseline alpha at gamma {gain['gamma']}: "
            + ", ".join(f"{k} {x:+.3f}" for k, x in gain["per_kind"].items())
        )
    h, s = r.get("hf_assisted"), r.get("serve")
    if h:
        lines.append(
            f"hf assisted (transformer distilled, gamma {h['gamma']}): ours {h['tokens_per_s_ours']:.0f} tok/s, "
            f"hf {h['tokens_per_s_hf']:.0f} tok/s, same tokens {h['same_tokens']}"
        )
    if s:
        lines.append(
            f"serve ({s.get('drafter', 'best drafter')}, float32): {s['tokens_per_s_serve']:.0f} tok/s through the "
            f"endpoint, {s['tokens_per_s_in_process']:.0f} in process"
        )
    if (r.get("t5") or {}).get("drafters"):
        lines.append("T5 summarizer on cnndm test articles (encoder-decoder target; columns as above, to S theo):")
    for name, t5 in (r.get("t5") or {}).get("drafters", {}).items():
        for variant, d in t5.items():
            lines.append(
                f"{name:<14}{variant:<10}{d.get('gamma', ''):>6}{'':>4}{d['alpha']:>8.3f}"
                f"{d['mean_accepted_length']:>7.2f}{d['c']:>8.3f}{d['speedup_measured']:>8.2f}{d['speedup_theoretical']:>8.2f}"
            )
    for part, why in (r.get("skipped") or {}).items():
        lines.append(f"skipped with a user target: {part} ({why})")
    lines.append(f"{'goal':<36}{'value':>8}  target")
    for name, g in r["goals"].items():
        lines.append(
            f"{name:<36}{g['value']:>8.3f}  {g.get('op', '>=')} {g['goal']}  {'met' if g['met'] else 'NOT met'}"
        )
    if r.get("plot"):
        lines.append(f"plot: {r['plot']}")
    return lines
