"""`distilray bench speculative target=PATH drafters=[...]`: the benchmark on a target a user brings.

The target is any Hugging Face causal LM folder saved with save_pretrained, with its tokenizer; the
drafters are saved drafter folders of any kind (n-gram, CNN, LSTM, a small causal LM) sharing its
tokenizer, or prompt-lookup specs, each `NAME=SPEC` (or a bare SPEC, named after its folder):

    drafters=[ngram3=runs/ngram3,small=runs/gpt2-tiny,pl=prompt-lookup:n=3,k=8]

Prompt lookup is always measured (it needs nothing). The figures are the quickstart run's: per drafter
alpha, tokens per target pass, c, measured and theoretical speedup (also with the verification pass
priced as measured) and whether the output equals plain greedy decoding, on held-out prompts of
`eval_data` (or the built-in corpus's test split) tokenized with the target's tokenizer; prompt
lookup on cnndm summaries; int8 against float32 for that target. What needs the quickstart's trained
artifacts (baseline vs distilled drafters, transformers' assisted generation with the distilled
transformer, the T5 setting) is skipped, and the Serve comparison is `bench serve target=PATH`'s.
A target whose logits are padded past its tokenizer decodes with vocab_limit = len(tokenizer).
"""

from __future__ import annotations

import re
from pathlib import Path

import torch

from distilray.bench.speculative import (
    copy_task,
    goals,
    held_out_prompts,
    held_out_tokens,
    measure_drafter,
    ranked_drafters,
)
from distilray.bench.speculative_int8 import int8_figures
from distilray.bench.targets import user_model, vocab_limit_of
from distilray.config import BenchSpeculativeConfig, QuickstartConfig
from distilray.decoding.drafter_api import check_same_vocab, model_vocab_size
from distilray.decoding.drafters import PROMPT_LOOKUP, is_prompt_lookup, load_drafter
from distilray.errors import DistilrayError
from distilray.eval.plots import acceptance_vs_gamma
from distilray.eval.speculative_speed import verify_cost
from distilray.models.causal_lm import count_parameters, load_causal_lm
from distilray.models.drafters import drafter_kind
from distilray.models.quantize import apply_quantization

NAME = re.compile(r"^[A-Za-z0-9_.-]+$")
PROMPT_LOOKUP_OPTION = re.compile(r"^\s*[nmk]\s*=\s*\d+\s*$")  # n=3, m=1, k=8: continue a prompt-lookup spec
SKIPPED = {
    "baseline_vs_distilled": "needs the quickstart's baseline and distilled drafters",
    "hf_assisted": "needs the quickstart's distilled transformer drafter",
    "serve": "measured by `distilray bench serve target=PATH`",
    "t5": "the encoder-decoder setting trains its own T5 target",
}


def parse_drafters(items: tuple[str, ...] | list[str]) -> dict[str, str]:
    """`NAME=SPEC` items -> {name: spec}, in order. SPEC is a drafter folder or a prompt-lookup spec; a bare
    SPEC is named after its folder (or is itself, for prompt lookup). Items may also be comma-separated in
    one string (`a=DIR,b=prompt-lookup:n=3,k=8`: the options after a prompt-lookup spec stay with it)."""
    pieces = [p.strip() for item in items for p in str(item).split(",")]
    merged: list[str] = []
    for piece in pieces:
        if not piece:
            continue
        if merged and PROMPT_LOOKUP_OPTION.match(piece) and is_prompt_lookup(_spec_of(merged[-1])):
            merged[-1] += "," + piece.replace(" ", "")
        else:
            merged.append(piece)
    out: dict[str, str] = {}
    for item in merged:
        name, spec = _split(item)
        if name in out:
            raise DistilrayError(f"two drafters are named {name!r}: give each its own name (NAME=SPEC)")
        out[name] = spec
    return out


def _spec_of(item: str) -> str:
    return _split(item)[1]


def _split(item: str) -> tuple[str, str]:
    head, eq, rest = item.partition("=")
    if eq and NAME.match(head.strip()) and not is_prompt_lookup(item):
        name, spec = head.strip(), rest.strip()
        if not spec:
            raise DistilrayError(f"drafter {name!r} has no spec: use {name}=FOLDER or {name}=prompt-lookup")
        return name, spec
    if is_prompt_lookup(item):
        return item, item
    return Path(item.rstrip("/")).name or item, item


def with_prompt_lookup(specs: dict[str, str]) -> dict[str, str]:
    """The drafters plus plain prompt lookup, unless a prompt-lookup spec is among them already."""
    if any(is_prompt_lookup(s) for s in specs.values()):
        return dict(specs)
    if PROMPT_LOOKUP in specs:
        raise DistilrayError(f"the name {PROMPT_LOOKUP!r} is kept for prompt lookup; name that folder otherwise")
    return {**specs, PROMPT_LOOKUP: PROMPT_LOOKUP}


def check_drafters(target, specs: dict[str, str], vocab_limit: int | None) -> dict[str, str]:
    """{name: kind} for every drafter, after checking its folder and that it shares the target's vocabulary."""
    kinds = {}
    for name, spec in specs.items():
        if is_prompt_lookup(spec):
            load_drafter(spec, vocab_size=model_vocab_size(target))  # a bad option is an error here
            kinds[name] = "prompt-lookup"
            continue
        if not Path(spec).is_dir():
            raise DistilrayError(f"drafter {name!r}: {spec} is not a folder (a saved drafter, or prompt-lookup)")
        kinds[name] = drafter_kind(spec)
        try:
            check_same_vocab(model_vocab_size(target), load_drafter(spec), vocab_limit)
        except DistilrayError as e:
            raise DistilrayError(f"drafter {name!r} ({spec}): {e}") from None
    return kinds


def run_user_target(cfg: BenchSpeculativeConfig) -> dict:
    """The benchmark's figures for cfg.target against cfg.drafters (see the module doc)."""

    target_dir, tokenizer = user_model(cfg.target)
    specs = with_prompt_lookup(parse_drafters(cfg.drafters))
    prompts = held_out_prompts(cfg, tokenizer)
    torch.set_num_threads(max(1, cfg.threads))
    target = load_causal_lm(target_dir, device="cpu", dtype=torch.float32)
    parameters = count_parameters(target)
    limit = vocab_limit_of(target, tokenizer)
    kinds = check_drafters(target, specs, limit)
    print("[bench speculative] int8 against float32 ...", flush=True)
    q = QuickstartConfig(artifacts_dir=cfg.artifacts_dir, seed=cfg.seed)
    int8 = int8_figures(target_dir, tokenizer, held_out_tokens(cfg, tokenizer), prompts[0], q.seq_len, cfg.seed)
    target = apply_quantization(target, cfg.quantize)
    verify = verify_cost(target, prompts[0], cfg.gammas)
    print(f"[bench speculative] {len(specs)} drafters on held-out prompts ...", flush=True)
    results: dict[str, dict] = {}
    for name, spec in specs.items():
        variant = "untrained" if is_prompt_lookup(spec) else "given"
        figures = measure_drafter(target, spec, prompts, cfg, verify, vocab_limit=limit)
        results[name] = {variant: {**figures, "folder": spec, "kind": kinds[name]}}
    print("[bench speculative] prompt lookup on cnndm summaries ...", flush=True)
    cnndm = copy_task(target, tokenizer, cfg, vocab_limit=limit)
    folder = Path(target_dir).resolve()
    label = folder.parent.name if folder.name == "model" else folder.name  # train-lm's <run>/model
    plot = acceptance_vs_gamma(
        {n: {int(g): x for g, x in v[next(iter(v))]["scan"].items()} for n, v in results.items()},
        Path(cfg.artifacts_dir).resolve() / "bench_speculative" / f"acceptance_vs_gamma-{label}.png",
        f"speculative decoding, {label} ({parameters:,} params, {cfg.quantize}), greedy, held-out prompts",
    )
    return {
        "target": {
            "model_dir": target_dir,
            "parameters": parameters,
            "quantize": cfg.quantize,
            "user": True,
            "vocab_limit": limit,
            "verify_cost": {str(g): v for g, v in verify.items()},
        },
        "prompts": len(prompts),
        "new_tokens": cfg.new_tokens,
        "threads": cfg.threads,
        "drafters": results,
        "cnndm_prompt_lookup": cnndm,
        "int8": int8,
        "skipped": dict(SKIPPED),
        "goals": goals(cfg, results, ranked_drafters(results)[0], cnndm, int8),
        "plot": str(plot),
    }
