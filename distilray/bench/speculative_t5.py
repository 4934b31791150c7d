"""Speculative decoding with an encoder-decoder target: the seed's CNN/DailyMail setting, small.

`run_t5` trains (cached) a T5 summarizer as the target on the train split of the cnndm pairs, a
smaller T5 drafter twice (baseline: cross-entropy on the gold summaries; distilled: KD from the
target's logits, FastLLM's fkl + temperature + CE mix) and counts n-gram drafters (n = 1..4) on the
gold summaries (baseline) and on the target's own greedy summaries of the train articles
(distilled: the seed's pseudo-dataset). Prompt lookup needs no training: it copies from the article
(the source) and the summary so far, or (`summary`) from the summary alone. On held-out test
articles it then decodes greedily with each drafter and with the target alone, side by side in one
run, and reports per drafter (reference/speculative.md 3-4): alpha, mean accepted length, the
measured cost ratio c, the measured speedup against the KV-cached target alone, and the theoretical
speedup E[tau]/(gamma c + 1). Every speculative output is also checked token for token against the
target's (`identical_to_plain`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import statistics
import time
from pathlib import Path
from typing import Callable

import torch

from distilray.config import TrainSeq2SeqConfig, config_from
from distilray.decoding.drafters import HFSeq2SeqDrafter
from distilray.decoding.prompt_lookup import PromptLookupDrafter
from distilray.decoding.seq2seq import decoder_forward, run_encoder
from distilray.decoding.speculative import SpecRecord, plain_generate, speculative_generate, theoretical_speedup
from distilray.io_utils import atomic_write_json, read_json
from distilray.models.ngram import NGramDrafter
from distilray.models.seq2seq_lm import decoder_start_id, encode_truncated, load_seq2seq_lm, pad_rows
from distilray.pipelines import train_seq2seq
from distilray.tokenizer import load_tokenizer

NGRAM_ORDERS = (1, 2, 3, 4)


def run_t5(
    artifacts_dir: str,
    seed: int = 0,
    steps_target: int = 240,
    steps_drafter: int = 150,
    test_articles: int = 10,
    max_new_tokens: int = 48,
    gamma: int = 4,
    target_model: str = "t5-mini",
    drafter_model: str = "t5-tiny",
    vocab_size: int = 2048,
    max_source_tokens: int = 192,
    max_target_tokens: int = 64,
    lr: float = 2e-3,
    kd_loss: str = "fkl",
    kd_temperature: float = 2.0,
    kd_ce_weight: float = 0.5,
) -> dict:
    """Train what is missing, then measure; returns {"target", "drafters", "settings", "seconds"}.

    drafters: {"ngram1".."ngram4", "t5"} -> {"baseline", "distilled"}, and "prompt-lookup" -> {"source",
    "summary"} -> {alpha, mean_accepted_length,
    draft_acceptance_rate, c, speedup_measured, speedup_theoretical, gamma, identical_to_plain, tokens,
    target_passes} (+ parameters, val_loss, model_dir for t5); target: {model, parameters, val_loss, final_loss,
    steps, model_dir, seconds_per_token, step_seconds, tokens, sample}.
    """
    t0 = time.perf_counter()
    base = config_from(
        TrainSeq2SeqConfig,
        model=target_model,
        steps=steps_target,
        vocab_size=vocab_size,
        max_source_tokens=max_source_tokens,
        max_target_tokens=max_target_tokens,
        lr=lr,
        artifacts_dir=artifacts_dir,
        seed=seed,
        checkpoint_every=max(steps_target, steps_drafter),
        warmup_steps=20,
        cpus_per_worker=1,  # one thread: OpenMP threads of tiny matrices crawl when the CPU is shared
    )
    target_run = train_seq2seq.run(base)
    drafter_cfg = dataclasses.replace(
        base, model=drafter_model, steps=steps_drafter, tokenizer=target_run["tokenizer_dir"]
    )
    drafter_runs = {
        "baseline": train_seq2seq.run(drafter_cfg),
        "distilled": train_seq2seq.run(
            dataclasses.replace(
                drafter_cfg,
                teacher=target_run["model_dir"],
                loss=kd_loss,
                temperature=kd_temperature,
                ce_weight=kd_ce_weight,
            )
        ),
    }
    train_seconds = time.perf_counter() - t0
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # decoding of tiny models: one thread is as fast, and far steadier under load
    try:
        results = _evaluate(target_run, drafter_runs, base, test_articles, max_new_tokens, gamma, max_source_tokens)
    finally:
        torch.set_num_threads(threads)
    results["target"].update(
        model=target_model,
        parameters=target_run["parameters"],
        val_loss=target_run["val_loss"],
        final_loss=target_run["final_loss"],
        steps=target_run["steps"],
        model_dir=target_run["model_dir"],
    )
    results["settings"] = {
        "seed": seed,
        "gamma": gamma,
        "max_new_tokens": max_new_tokens,
        "test_articles": test_articles,
        "drafter_model": drafter_model,
        "steps_target": steps_target,
        "steps_drafter": steps_drafter,
        "vocab_size": vocab_size,
        "max_source_tokens": max_source_tokens,
        "max_target_tokens": max_target_tokens,
        "lr": lr,
        "kd": {"loss": kd_loss, "temperature": kd_temperature, "ce_weight": kd_ce_weight},
        "cached": bool(target_run.get("cached") and all(r.get("cached") for r in drafter_runs.values())),
    }
    results["seconds"] = {"training": train_seconds, "total": time.perf_counter() - t0}
    return results


def _evaluate(
    target_run: dict,
    drafter_runs: dict,
    base: TrainSeq2SeqConfig,
    test_articles: int,
    max_new_tokens: int,
    gamma: int,
    max_source_tokens: int,
) -> dict:
    """Build the drafters (n-grams counted here) and measure every one against the target alone."""
    tokenizer = load_tokenizer(target_run["tokenizer_dir"])
    target = load_seq2seq_lm(target_run["model_dir"], device="cpu")
    start, eos = decoder_start_id(target), tokenizer.eos_token_id
    splits = train_seq2seq.split_pairs(
        train_seq2seq.load_pairs(base.dataset), base.val_pairs, base.test_pairs, base.split_seed
    )
    train_src, train_sum = train_seq2seq.encode_split(tokenizer, splits["train"], base)
    test_src = encode_truncated(tokenizer, [a for a, _ in splits["test"][:test_articles]], max_source_tokens)

    pseudo = _pseudo_summaries(
        target, target_run["run_dir"], train_src, start, eos, tokenizer.pad_token_id, max_new_tokens
    )
    vocab = len(tokenizer)
    # family -> kind -> factory(source ids) -> Drafter; n-gram drafters are shared (start() resets them)
    drafters: dict[str, dict[str, Callable[[list[int]], object]]] = {}
    for n in NGRAM_ORDERS:
        counted = {
            "baseline": NGramDrafter(n, vocab).fit([[start, *s] for s in train_sum]),
            "distilled": NGramDrafter(n, vocab).fit([[start, *s] for s in pseudo]),
        }
        drafters[f"ngram{n}"] = {k: (lambda src, d=d: d) for k, d in counted.items()}
    t5_models = {k: load_seq2seq_lm(r["model_dir"], device="cpu") for k, r in drafter_runs.items()}
    drafters["t5"] = {k: (lambda src, m=m: HFSeq2SeqDrafter(m, src)) for k, m in t5_models.items()}
    # untrained: copies from the article (the source) and the summary so far, or from the summary alone
    drafters["prompt-lookup"] = {
        "source": lambda src: PromptLookupDrafter(vocab, encoder_ids=src),
        "summary": lambda src: PromptLookupDrafter(vocab),
    }

    results = _measure(target, drafters, test_src, start, eos, max_new_tokens, gamma)
    first = plain_generate(target, [start], max_new_tokens, eos_token_id=eos, encoder_ids=test_src[0]).token_ids
    results["target"]["sample"] = {
        "summary": tokenizer.decode(first, skip_special_tokens=True),
        "gold": splits["test"][0][1],
    }
    for kind, run in drafter_runs.items():
        results["drafters"]["t5"][kind].update(
            parameters=run["parameters"], val_loss=run["val_loss"], model_dir=run["model_dir"]
        )
    return results


@torch.inference_mode()
def _pseudo_summaries(
    target,
    run_dir: str,
    sources: list[list[int]],
    start: int,
    eos: int,
    pad: int,
    max_new_tokens: int,
    batch_size: int = 50,
) -> list[list[int]]:
    """The target's greedy summaries of `sources` (eos kept), batched, cached beside the target's run as JSON."""
    key = hashlib.sha256(json.dumps([sources, start, eos, max_new_tokens]).encode()).hexdigest()[:10]
    path = Path(run_dir) / f"pseudo_summaries-{key}.json"
    if path.is_file():
        return read_json(path)
    out: list[list[int]] = []
    for i in range(0, len(sources), batch_size):
        src = pad_rows(sources[i : i + batch_size], pad)  # (B, S)
        generated = target.generate(
            input_ids=src,
            attention_mask=(src != pad).long(),
            do_sample=False,
            max_new_tokens=max_new_tokens,
            decoder_start_token_id=start,
            eos_token_id=eos,
            pad_token_id=pad,
        )[:, 1:]  # (B, <= max_new_tokens), start token dropped
        for row in generated.tolist():
            out.append(row[: row.index(eos) + 1] if eos in row else row)
    atomic_write_json(path, out, indent=None)
    return out


def _measure(
    target, drafters: dict, sources: list[list[int]], start: int, eos: int, max_new_tokens: int, gamma: int
) -> dict:
    """Plain and speculative greedy decoding of every source, interleaved so that load affects both alike."""
    plain_decode = lambda src: plain_generate(target, [start], max_new_tokens, eos_token_id=eos, encoder_ids=src)  # noqa: E731
    plain_decode(sources[0])  # warm-up: first-call allocations are nobody's cost
    plain: list[SpecRecord] = []
    spec: dict[tuple[str, str], list[SpecRecord]] = {(f, k): [] for f, kinds in drafters.items() for k in kinds}
    lossless = {key: True for key in spec}
    for src in sources:
        reference = plain_decode(src)
        plain.append(reference)
        for family, kind in spec:
            drafter = drafters[family][kind](src)
            record = speculative_generate(
                target, drafter, [start], max_new_tokens, gamma=gamma, eos_token_id=eos, encoder_ids=src
            )
            spec[(family, kind)].append(record)
            lossless[(family, kind)] &= record.token_ids == reference.token_ids
    plain_spt = sum(r.seconds for r in plain) / sum(len(r.token_ids) for r in plain)
    target_step = statistics.median([_target_step_seconds(target, src, start, max_new_tokens) for src in sources[:3]])
    out: dict = {
        "target": {
            "seconds_per_token": plain_spt,
            "step_seconds": target_step,
            "tokens": sum(len(r.token_ids) for r in plain),
        },
        "drafters": {},
    }
    for (family, kind), records in spec.items():
        step = statistics.median(
            [_drafter_step_seconds(drafters[family][kind](src), start, max_new_tokens) for src in sources[:3]]
        )
        out["drafters"].setdefault(family, {})[kind] = _figures(
            records, plain_spt, step / target_step, gamma, lossless[(family, kind)]
        )
    return out


def _figures(records: list[SpecRecord], plain_spt: float, c: float, gamma: int, lossless: bool) -> dict:
    accepted = sum(r.accepted for r in records)
    rejections = sum(r.rejections for r in records)
    drafted = sum(r.drafted for r in records)
    tokens = sum(len(r.token_ids) for r in records)
    passes = sum(r.target_passes for r in records)
    alpha = accepted / (accepted + rejections) if accepted + rejections else float("nan")
    spec_spt = sum(r.seconds for r in records) / tokens
    return {
        "alpha": alpha,
        "mean_accepted_length": tokens / passes,
        "draft_acceptance_rate": accepted / drafted if drafted else float("nan"),
        "c": c,
        "speedup_measured": plain_spt / spec_spt,
        "speedup_theoretical": theoretical_speedup(alpha, gamma, c) if alpha == alpha else float("nan"),
        "gamma": gamma,
        "identical_to_plain": bool(lossless),
        "tokens": tokens,
        "target_passes": passes,
    }


@torch.inference_mode()
def _target_step_seconds(model, src: list[int], start: int, steps: int) -> float:
    """Seconds of one cached single-token decoder step of the target (greedy), after the encoder and prefill."""
    device = next(model.parameters()).device
    encoded = run_encoder(model, src)
    out = decoder_forward(model, encoded, torch.tensor([[start]], device=device), None)
    t0 = time.perf_counter()
    for _ in range(steps):
        token = out.logits[0, -1].argmax().view(1, 1)
        out = decoder_forward(model, encoded, token, out.past_key_values)
    return (time.perf_counter() - t0) / steps


def _drafter_step_seconds(drafter, start: int, steps: int) -> float:
    """Seconds of one drafter step (push a token, next_logits), after its start (and encoder) pass.
    A drafter with no logits (prompt lookup): one proposal, taken back."""
    drafter.start([start])
    if not hasattr(drafter, "next_logits"):
        t0 = time.perf_counter()
        for _ in range(steps):
            drafter.propose(1, None)
            drafter.rollback(1)
        return (time.perf_counter() - t0) / steps
    logits = drafter.next_logits()
    t0 = time.perf_counter()
    for _ in range(steps):
        drafter.push([int(logits.argmax())])
        logits = drafter.next_logits()
    return (time.perf_counter() - t0) / steps


def format_t5_table(result: dict) -> str:
    """A plain-text table of run_t5's figures, one row per drafter and kind."""
    head = f"{'drafter':<13} {'kind':<10} {'alpha':>6} {'tau':>5} {'c':>6} {'S meas':>7} {'S theo':>7} same"
    t = result["target"]
    lines = [
        f"T5 target {t.get('model')} ({t.get('parameters', 0) / 1e6:.1f}M params, "
        f"val loss {t.get('val_loss', float('nan')):.3f}), "
        f"gamma {result['settings']['gamma']}, {result['settings']['test_articles']} test articles",
        head,
    ]
    for family, kinds in result["drafters"].items():
        for kind, f in kinds.items():
            lines.append(
                f"{family:<13} {kind:<10} {f['alpha']:>6.3f} {f['mean_accepted_length']:>5.2f} {f['c']:>6.3f} "
                f"{f['speedup_measured']:>7.2f} {f['speedup_theoretical']:>7.2f} {f['identical_to_plain']}"
            )
    return "\n".join(lines)
