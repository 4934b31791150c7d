"""Measuring speculative decoding: per-step costs of target and drafter, the verification-pass cost,
and a scan of one drafter over gammas against plain decoding (prompts alternate between the two, so
that drifts in machine load hit both sides alike). Used by `bench speculative` and the quickstart."""

from __future__ import annotations

import math
import time

import numpy as np
import torch

from distilray.decoding.cached_model import crop_cache
from distilray.decoding.drafter_api import as_drafter
from distilray.decoding.sampling import Sampler, SamplingParams
from distilray.decoding.speculative import plain_generate, speculative_generate, theoretical_speedup


@torch.inference_mode()
def step_times(target, drafter, prompt: list[int], steps: int = 48) -> tuple[float, float]:
    """Seconds of one cached single-token step of the target and of the drafter (medians of `steps`)."""
    out = target(input_ids=torch.tensor([prompt]), use_cache=True)
    cache, tok = out.past_key_values, int(out.logits[0, -1].argmax())
    t_times, d_times = [], []
    for _ in range(steps):
        t0 = time.perf_counter()
        out = target(input_ids=torch.tensor([[tok]]), past_key_values=cache, use_cache=True)
        t_times.append(time.perf_counter() - t0)
        cache, tok = out.past_key_values, int(out.logits[0, -1].argmax())
    drafter, greedy = as_drafter(drafter), Sampler(SamplingParams(max_new_tokens=steps))
    drafter.start(list(prompt))
    for _ in range(steps):
        t0 = time.perf_counter()
        drafter.propose(1, greedy)  # one greedy draft, pushed onto the state as in the loop
        d_times.append(time.perf_counter() - t0)
    return float(torch.tensor(t_times).median()), float(torch.tensor(d_times).median())


@torch.inference_mode()
def pass_times(models: dict, prompt: list[int], sizes: tuple[int, ...], repeats: int = 32) -> dict:
    """{name: {n: median seconds of one cached pass over n new tokens after `prompt`}}, the models and
    sizes timed in turn within each repeat, so that drifts in machine load hit all of them alike."""
    caches = {
        name: model(input_ids=torch.tensor([prompt]), use_cache=True).past_key_values for name, model in models.items()
    }
    samples: dict = {name: {n: [] for n in sizes} for name in models}
    batches = {n: torch.tensor([prompt[-n:] if n <= len(prompt) else [prompt[-1]] * n]) for n in sizes}  # (1, n)
    for repeat in range(repeats + 2):  # the first two rounds warm up
        for name, model in models.items():
            for n in sizes:
                ids = batches[n]
                start = time.perf_counter()
                model(input_ids=ids, past_key_values=caches[name], use_cache=True)
                if repeat >= 2:
                    samples[name][n].append(time.perf_counter() - start)
                crop_cache(caches[name], len(prompt))  # drop what this pass appended
    return {name: {n: float(np.median(s)) for n, s in per.items()} for name, per in samples.items()}


@torch.inference_mode()
def verify_cost(target, prompt: list[int], gammas: tuple[int, ...], repeats: int = 24) -> dict[int, float]:
    """v(gamma) = time of one cached target pass over gamma + 1 tokens / time over 1 token (medians).

    The i.i.d. theory prices a verification pass like a one-token step (true where decoding is
    memory-bound, as on a GPU); on a small CPU model compute grows with the tokens, and this ratio
    is what the measured speedup pays on top."""
    times = pass_times({"target": target}, prompt, tuple(sorted({1, *(g + 1 for g in gammas)})), repeats)["target"]
    return {g: times[g + 1] / times[1] for g in gammas}


def priced_speedup(records, verify: dict[int, float], c: float) -> float:
    """The speedup the measured passes would give at the measured costs with nothing else paid.

    Each pass that verified g drafts is priced v(g) + g c one-token steps (v(0) = 1, v between measured
    gammas interpolated) and the generated tokens are set against that. measured / priced is what the
    loop itself loses between passes; the i.i.d. theory can differ further through its E[tau] (prompt
    lookup drafts nothing on a miss and long runs on a hit, which a single alpha does not describe).
    """
    known = sorted(verify)
    xs, ys = [0, *known], [1.0, *(verify[g] for g in known)]
    steps = [g for r in records for g in r.gamma_history]
    price = sum(float(np.interp(g, xs, ys)) + g * c for g in steps)
    return sum(len(r.token_ids) for r in records) / price if price else float("nan")


def _totals(records) -> dict:
    tokens = sum(len(r.token_ids) for r in records)
    accepted = sum(r.accepted for r in records)
    tested = accepted + sum(r.rejections for r in records)
    return {
        "tokens": tokens,
        "seconds": sum(r.seconds for r in records),
        "alpha": accepted / tested if tested else float("nan"),
        "mean_accepted_length": tokens / max(1, sum(r.target_passes for r in records)),
        "draft_acceptance_rate": accepted / max(1, sum(r.drafted for r in records)),
    }


def scan_drafter(
    target,
    drafter,
    prompts: list[list[int]],
    gammas: tuple[int, ...],
    new_tokens: int,
    c: float,
    verify: dict[int, float] | None = None,
    vocab_limit: int | None = None,
) -> tuple[dict[int, dict], bool]:
    """Per gamma: figures over `prompts`, each prompt decoded plainly and then speculatively (alternating, so
    drifts in machine load hit both sides alike). Also whether every output equalled plain greedy decoding.
    vocab_limit: the tokenizer's length when the target's logits are padded past it (decoding/speculative.py)."""
    plain, spec = [], {g: [] for g in gammas}
    identical = True
    for prompt in prompts:
        ref = plain_generate(target, prompt, new_tokens, vocab_limit=vocab_limit)
        plain.append(ref)
        for g in gammas:
            rec = speculative_generate(target, drafter, prompt, new_tokens, gamma=g, vocab_limit=vocab_limit)
            identical &= rec.token_ids == ref.token_ids
            spec[g].append(rec)
    base = _totals(plain)
    out = {}
    for g, records in spec.items():
        t = _totals(records)
        alpha = t["alpha"] if math.isfinite(t["alpha"]) else 0.0
        out[g] = {
            **{k: t[k] for k in ("alpha", "mean_accepted_length", "draft_acceptance_rate")},
            "speedup_measured": (base["seconds"] / base["tokens"]) / (t["seconds"] / t["tokens"]),
            "speedup_theoretical": theoretical_speedup(min(max(alpha, 0.0), 1.0), g, c),
        }
        if verify:  # the same formula with the verification pass priced as measured: E / (gamma c + v)
            theory = out[g]["speedup_theoretical"]
            out[g]["speedup_theoretical_verify_cost"] = theory * (g * c + 1) / (g * c + verify[g])
            out[g]["speedup_priced"] = priced_speedup(records, verify, c)
    return out, identical
