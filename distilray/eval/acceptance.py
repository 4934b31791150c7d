"""How well a drafter matches its target, from the two distributions alone (reference/speculative.md 3-4).

beta = sum_v min(p(v), q(v)) = 1 - TV(p, q) is the probability that speculative sampling accepts a
draft at one position; its mean over positions is alpha. At temperature 0 both are one-hot and beta
is 1 exactly when the argmaxes agree.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from distilray.errors import DistilrayError


def acceptance_per_position(p_logits: torch.Tensor, q_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """(..., V) target and drafter logits -> (...,) beta at `temperature` (0: argmax agreement)."""
    if p_logits.shape != q_logits.shape:
        raise DistilrayError(f"target logits {tuple(p_logits.shape)} and drafter logits {tuple(q_logits.shape)} differ")
    if temperature == 0:
        return (p_logits.argmax(-1) == q_logits.argmax(-1)).float()
    p = torch.softmax(p_logits.float() / temperature, dim=-1)
    q = torch.softmax(q_logits.float() / temperature, dim=-1)
    return torch.minimum(p, q).sum(-1)


@torch.no_grad()
def drafter_agreement(
    target, drafter_logits_fn, stream: np.ndarray, seq_len: int, max_tokens: int = 20_000, batch_size: int = 8
) -> dict[str, float]:
    """Teacher-forced agreement of a drafter with its target on a token stream # (T,).

    drafter_logits_fn: input_ids (B, T) -> logits (B, T, V). Returns alpha at temperature 0 (argmax
    agreement) and 1 (mean 1 - TV), and the drafter's perplexity, over non-overlapping windows.
    """
    stream = np.asarray(stream[: max_tokens + 1], dtype=np.int64)
    n = (len(stream) - 1) // seq_len
    if n == 0:
        raise DistilrayError(f"need more than {seq_len} tokens to measure agreement, got {len(stream)}")
    windows = torch.from_numpy(stream[: n * seq_len + 1])
    inputs = windows[:-1].reshape(n, seq_len)
    labels = windows[1:].reshape(n, seq_len)
    device = next(target.parameters()).device
    sums = {"alpha_greedy": 0.0, "alpha_t1": 0.0, "nll": 0.0}
    for i in range(0, n, batch_size):
        x = inputs[i : i + batch_size].to(device)
        p = target(input_ids=x).logits.float()  # (B, T, V)
        q = drafter_logits_fn(x).float()
        sums["alpha_greedy"] += float(acceptance_per_position(p, q, 0.0).sum())
        sums["alpha_t1"] += float(acceptance_per_position(p, q, 1.0).sum())
        y = labels[i : i + batch_size].to(device)
        sums["nll"] += float(
            torch.nn.functional.cross_entropy(q.reshape(-1, q.shape[-1]), y.reshape(-1), reduction="sum")
        )
    count = n * seq_len
    return {
        "alpha_greedy": sums["alpha_greedy"] / count,
        "alpha_t1": sums["alpha_t1"] / count,
        "drafter_ppl": math.exp(sums["nll"] / count),
        "positions": count,
    }
