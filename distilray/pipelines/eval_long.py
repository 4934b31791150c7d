"""`distilray eval-long`: what long-context training is for, measured on held-out long documents.

For every model: perplexity over the held-out prepared sequences, overall and by position (targets with
fewer than `base_length` tokens of context, and the rest: where the long context can help); LongPPL
(PKU-ML/LongPPL's rule: key tokens chosen by an evaluator model, mapped to text spans, so models with other
tokenizers are comparable); pass-key and key-value recall at several distances (exact greedy answers and a
multiple-choice accuracy over candidates, which a tiny model can show); and short-context perplexity, to
catch a regression at the context the model started from.
"""

from __future__ import annotations

import math
import re
from pathlib import Path

import numpy as np
import torch

from distilray.config import EvalLongConfig
from distilray.errors import DistilrayError
from distilray.eval.long_context import long_ppl, passkey_example, position_bucket_ppl, probe_suite, token_losses
from distilray.eval.perplexity import perplexity
from distilray.eval.plots import metrics_by_variant
from distilray.io_utils import atomic_write_json
from distilray.models.causal_lm import load_causal_lm, max_context
from distilray.pipelines import prepare_long
from distilray.tokenizer import load_tokenizer

PROBE_DEPTHS = (0.0, 0.25)  # where the fact sits in the text before the question (0: at its start)


def filler_sentences(texts: list[str], limit: int = 400) -> list[str]:
    """Sentences of held-out text, the haystack of the probes (never training text)."""
    sentences = [s.strip() for t in texts for s in re.split(r"(?<=[.!?])\s+", " ".join(t.split()))]
    return [s for s in sentences if 20 <= len(s) <= 300][:limit]


def max_probe_distance(context: int, tokenizer, filler: list[str]) -> int:
    """The longest fact-to-question distance whose prompts fit the context at every depth: the text before
    the fact grows as distance * depth / (1 - depth); the instructions, question and answer take what a
    probe with no haystack takes under this tokenizer, and the filler's token estimate gets 10% slack."""
    import random

    bare = passkey_example(filler or ["Nothing here."], random.Random(0), haystack_chars=1, depth=0.0)
    overhead = len(tokenizer(bare.prompt + bare.answer, add_special_tokens=False)["input_ids"]) + 8
    return int((context - overhead) * (1 - max(PROBE_DEPTHS)) * 0.9)


def evaluate_model(
    cfg: EvalLongConfig, folder: str, rows: np.ndarray, texts: list[str], evaluator, evaluator_tokenizer
) -> dict:
    """Every figure of one model (see the module docstring)."""
    model = load_causal_lm(folder, device="cpu", dtype=torch.float32).eval()
    tokenizer = load_tokenizer(folder)
    context = max_context(model)
    if rows.shape[1] > context:
        raise DistilrayError(f"{folder} reads {context} tokens; the held-out sequences have {rows.shape[1]}")
    with torch.no_grad():
        buckets = position_bucket_ppl([token_losses(model, torch.from_numpy(r)) for r in rows], cfg.base_length)
        out = {
            "model": folder,
            "context": context,
            "long_ppl": buckets["ppl"],
            "long_ppl_before_b": buckets["ppl_before"],
            "long_ppl_after_b": buckets["ppl_after"],
            "tokens": buckets["tokens"],
        }
        if evaluator is not None:
            # each held-out sequence's text, so the evaluated model tokenizes it its own way
            scored = [
                long_ppl(t, model, tokenizer, evaluator, evaluator_tokenizer, cfg.short_length, cfg.short_step)
                for t in texts
            ]
            kept = [s for s in scored if s]
            nll = sum(math.log(s["long_ppl"]) * s["key_tokens"] for s in kept)
            count = sum(s["key_tokens"] for s in kept)
            out["long_key_ppl"] = math.exp(nll / count) if count else None
            out["long_key_tokens"] = count
            out["long_key_documents"] = f"{len(kept)}/{len(scored)} with key tokens"
        filler = filler_sentences(texts)
        longest = max_probe_distance(context, tokenizer, filler)
        distances = [d for d in cfg.probe_distances if d <= longest]
        out["probe_distances_dropped"] = [d for d in cfg.probe_distances if d not in distances]
        probes = (
            probe_suite(model, tokenizer, filler, distances, PROBE_DEPTHS, cfg.probes_per_distance, cfg.seed, context)
            if distances
            else {"passkey": {}, "kv_recall": {}}  # no distance fits this context: reported as dropped
        )
        out["passkey_acc"] = {d: r["choice"] for d, r in probes["passkey"].items()}
        out["passkey_exact"] = {d: r["exact"] for d, r in probes["passkey"].items()}
        out["kv_recall"] = {d: r["choice"] for d, r in probes["kv_recall"].items()}
        out["kv_recall_exact"] = {d: r["exact"] for d, r in probes["kv_recall"].items()}
        out["probe_chance"] = next(iter(probes["passkey"].values()))["chance"] if distances else None
        stream = rows.reshape(-1)[: cfg.short_tokens]
        short = min(cfg.short_context, context)
        out["short_ppl"] = perplexity(model, stream, context_len=short, stride=max(1, short // 2))["ppl"]
    return out


def run(cfg: EvalLongConfig) -> dict:
    if not cfg.models:
        raise DistilrayError("eval-long needs models=[FOLDER, ...] (train-long model folders)")
    if not cfg.data:
        raise DistilrayError("eval-long needs data=FOLDER (a prepare-long folder: its held-out documents)")
    _, ids = prepare_long.read_long_split(cfg.data, cfg.split)
    rows = ids[: cfg.sequences] if cfg.sequences else ids
    if len(rows) == 0:
        raise DistilrayError(f"the {cfg.split} split of {cfg.data} holds no sequence")
    data_tokenizer = load_tokenizer(prepare_long.read_meta(cfg.data)["tokenizer_dir"])
    texts = [data_tokenizer.decode(r[1:].tolist()) for r in rows]  # without the BOS
    evaluator = evaluator_tokenizer = None
    if cfg.evaluator:
        evaluator = load_causal_lm(cfg.evaluator, device="cpu", dtype=torch.float32).eval()
        evaluator_tokenizer = load_tokenizer(cfg.evaluator)
    results = {Path(m).parent.name if Path(m).name == "model" else Path(m).name: None for m in cfg.models}
    for name, folder in zip(list(results), cfg.models):
        results[name] = evaluate_model(cfg, folder, rows, texts, evaluator, evaluator_tokenizer)
    out = {
        "models": results,
        "data": str(cfg.data),
        "split": cfg.split,
        "sequences": int(len(rows)),
        "harness": harness(cfg),
    }
    if cfg.output:
        out["plot"] = str(
            metrics_by_variant(
                {name: plot_figures(f) for name, f in results.items()},
                Path(cfg.output).with_suffix(".png"),
                f"eval-long on {len(rows)} held-out sequences of {rows.shape[1]} tokens",
            )
        )
        atomic_write_json(cfg.output, out)
    return out


def _mean(values: dict) -> float:
    return float(np.mean(list(values.values()))) if values else math.nan


def plot_figures(f: dict) -> dict[str, float]:
    """The figures of one model that the per-variant plot shows."""
    return {
        "long PPL before b": f["long_ppl_before_b"] or math.nan,
        "long PPL after b": f["long_ppl_after_b"] or math.nan,
        "LongPPL": f.get("long_key_ppl") or math.nan,
        "pass-key acc (mean)": _mean(f["passkey_acc"]),
        "kv recall acc (mean)": _mean(f["kv_recall"]),
        "short-context PPL": f["short_ppl"],
    }


def harness(cfg: EvalLongConfig) -> dict:
    return {
        "long_ppl": f"token-weighted over held-out sequences, full context; buckets split at b={cfg.base_length}",
        "long_key_ppl": (
            f"LongPPL (PKU-ML rule: LSD > 2 and log p_long > -2, strict), evaluator {cfg.evaluator or 'none'}, "
            f"K={cfg.short_length}, d={cfg.short_step}, token-weighted over documents"
        ),
        "probes": (
            f"pass key / key-value recall at depths {list(PROBE_DEPTHS)}, {cfg.probes_per_distance} per depth and "
            "distance; *_acc: the answer ranks first by log-likelihood among candidates; *_exact: greedy answer"
        ),
        "short_ppl": f"sliding windows of {cfg.short_context} tokens (stride half) over the held-out tokens",
    }
