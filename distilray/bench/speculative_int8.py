"""int8 against float32 for `bench speculative`: the same target, side by side in one run.

- cost: the target's one-token step and its verification pass over gamma + 1 tokens (gamma 4), in
  float32 and int8 (models/quantize.py), timed in alternation on the same cached prompt (medians); as
  ratios: verification pass / one-token step per precision, int8 / float32 per pass. The goal speaks
  of a target of 20M parameters or more and the quickstart target has ~4M, so the same figures are
  also taken on the `small` preset (~21M) built fresh: a pass costs the same whatever the weights' values.
- quality: the trained target's perplexity on held-out text before and after int8, with the top-1
  agreement and mean KL(p_float32 || p_int8) of its next-token distributions (how int8 changes its
  outputs; speculative decoding is lossless w.r.t. the int8 model served, not its float32 original).
"""

from __future__ import annotations

import numpy as np
import torch

from distilray.eval.perplexity import perplexity
from distilray.eval.speculative_speed import pass_times
from distilray.models.causal_lm import build_causal_lm, count_parameters, load_causal_lm
from distilray.models.quantize import quantize_int8

VERIFY_GOAL = 1.3  # verification pass at gamma 4 <= 1.3x a one-token step ...
GOAL_PARAMETERS = 20_000_000  # ... for a target of 20M parameters or more
LARGE_PRESET = "small"  # GPT-2 preset of ~21M parameters over a 4096-token vocabulary


def cost_figures(fp32, int8, prompt: list[int], gamma: int) -> dict:
    """One-token step and verification pass (gamma + 1 tokens), float32 and int8, and their ratios."""
    t = pass_times({"fp32": fp32, "int8": int8}, prompt, (1, gamma + 1))
    return {
        "parameters": count_parameters(fp32),
        "gamma": gamma,
        "step_ms": {k: 1e3 * v[1] for k, v in t.items()},
        "verify_ms": {k: 1e3 * v[gamma + 1] for k, v in t.items()},
        "verify_over_step": {k: v[gamma + 1] / v[1] for k, v in t.items()},
        "int8_over_fp32": {"step": t["int8"][1] / t["fp32"][1], "verify": t["int8"][gamma + 1] / t["fp32"][gamma + 1]},
    }


@torch.inference_mode()
def output_shift(fp32, int8, tokens: np.ndarray, context_len: int, max_windows: int = 32) -> dict:
    """Top-1 agreement and mean KL(p_fp32 || p_int8) of the next-token distributions over held-out windows."""
    n = min(len(tokens) // context_len, max_windows)
    windows = torch.as_tensor(np.asarray(tokens[: n * context_len], dtype=np.int64)).view(n, context_len)
    agree = kl = 0.0
    for batch in windows.split(8):
        log_p = torch.log_softmax(fp32(input_ids=batch).logits.float(), -1)  # (B, T, V)
        log_q = torch.log_softmax(int8(input_ids=batch).logits.float(), -1)
        agree += float((log_p.argmax(-1) == log_q.argmax(-1)).sum())
        kl += float((log_p.exp() * (log_p - log_q)).sum())
    return {"top1_agreement": agree / windows.numel(), "mean_kl": kl / windows.numel(), "positions": windows.numel()}


def int8_figures(
    target_dir: str, tokenizer, tokens: np.ndarray, prompt: list[int], context_len: int, seed: int
) -> dict:
    """Cost and quality of int8 against float32 for the target, and cost for the LARGE_PRESET; the goal
    is read on the first of them with GOAL_PARAMETERS or more."""
    fp32 = load_causal_lm(target_dir, device="cpu", dtype=torch.float32)
    int8 = quantize_int8(load_causal_lm(target_dir, device="cpu", dtype=torch.float32))
    target = cost_figures(fp32, int8, prompt, gamma=4)
    ppl = {k: perplexity(m, tokens, context_len)["ppl"] for k, m in (("fp32", fp32), ("int8", int8))}
    quality = {"ppl": ppl, "ppl_ratio": ppl["int8"] / ppl["fp32"], **output_shift(fp32, int8, tokens, context_len)}
    models = []
    for _ in range(2):  # the same fresh weights twice: one copy stays float32
        torch.manual_seed(seed)
        models.append(build_causal_lm(LARGE_PRESET, tokenizer).eval())
    large = {"preset": LARGE_PRESET, **cost_figures(models[0], quantize_int8(models[1]), prompt, gamma=4)}
    measured = target if target["parameters"] >= GOAL_PARAMETERS else large
    return {
        "target": target,
        "quality": quality,
        "large": large,
        "goal": {
            "value": measured["verify_over_step"]["int8"],
            "goal": VERIFY_GOAL,
            "op": "<=",
            "parameters": measured["parameters"],
            "model": "target" if measured is target else f"{LARGE_PRESET} preset (fresh weights, timing only)",
        },
    }


def format_int8(r: dict) -> list[str]:
    """Table lines for int8_figures."""
    lines = []
    for label, c in (("target", r["target"]), (f"{r['large']['preset']} preset", r["large"])):
        lines.append(
            f"int8 vs fp32, {label} ({c['parameters'] / 1e6:.1f}M params): one-token step "
            f"{c['step_ms']['fp32']:.2f} -> {c['step_ms']['int8']:.2f} ms ({c['int8_over_fp32']['step']:.2f}x), "
            f"verify gamma {c['gamma']} {c['verify_ms']['fp32']:.2f} -> {c['verify_ms']['int8']:.2f} ms; "
            f"verify / step fp32 {c['verify_over_step']['fp32']:.2f}x, int8 {c['verify_over_step']['int8']:.2f}x"
        )
    q = r["quality"]
    lines.append(
        f"int8 quality: held-out ppl {q['ppl']['fp32']:.2f} -> {q['ppl']['int8']:.2f} ({q['ppl_ratio']:.3f}x), "
        f"top-1 agreement {q['top1_agreement']:.3f}, mean KL {q['mean_kl']:.4f} over {q['positions']} positions"
    )
    return lines
