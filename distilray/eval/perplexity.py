"""Sliding-window perplexity of a causal LM over a token stream."""

from __future__ import annotations

import math

import numpy as np
import torch


@torch.no_grad()
def sliding_window_nll(
    model, tokens: np.ndarray, context_len: int, stride: int, batch_size: int = 8
) -> tuple[float, int]:
    """Sum of -log p(x_t | up to `context_len` previous tokens) over tokens[1:], and how many were scored.

    Windows of `context_len` start every `stride` tokens; each scores only the tokens that earlier
    windows did not, so every token is scored once, with at least context_len - stride tokens of
    context (except near the start).
    """
    if stride <= 0 or stride > context_len:
        raise ValueError(f"stride must be in 1..context_len ({context_len}), got {stride}")
    tokens = np.asarray(tokens, dtype=np.int64)
    device = next(model.parameters()).device
    windows: list[tuple[int, int, int]] = []  # (begin, end, first scored position within window)
    prev_end = 0
    for begin in range(0, max(1, len(tokens) - 1), stride):
        end = min(begin + context_len, len(tokens))
        windows.append((begin, end, max(prev_end, begin + 1) - begin))
        prev_end = end
        if end == len(tokens):
            break
    total_nll, total_count = 0.0, 0
    for i in range(0, len(windows), batch_size):
        group = windows[i : i + batch_size]
        width = max(e - b for b, e, _ in group)
        ids = torch.zeros((len(group), width), dtype=torch.long)
        labels = torch.full((len(group), width), -100, dtype=torch.long)
        for row, (b, e, first) in enumerate(group):
            ids[row, : e - b] = torch.from_numpy(tokens[b:e])
            labels[row, first : e - b] = ids[row, first : e - b]
        logits = model(input_ids=ids.to(device)).logits.float()  # (B, W, V)
        logp = torch.log_softmax(logits[:, :-1], dim=-1)
        tgt = labels[:, 1:].to(device)
        mask = tgt != -100
        picked = logp.gather(-1, tgt.clamp(min=0).unsqueeze(-1)).squeeze(-1)
        total_nll -= float(picked[mask].sum())
        total_count += int(mask.sum())
    return total_nll, total_count


def perplexity(model, tokens: np.ndarray, context_len: int, stride: int | None = None, batch_size: int = 8) -> dict:
    nll, n = sliding_window_nll(model, tokens, context_len, stride or max(1, context_len // 2), batch_size)
    if n == 0:
        raise ValueError("need at least two tokens to compute perplexity")
    return {"nll": nll / n, "ppl": math.exp(nll / n), "tokens": n}
