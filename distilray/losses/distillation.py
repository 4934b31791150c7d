"""Distillation divergences on logits (N, V) (any leading shape is flattened to N), averaged over N.

Convention: p is the teacher (target model), q the student (drafter).
- forward_kl: KL(p || q) = sum_v p log(p/q)      (mass-covering; FastLLM / Hinton KD)
- reverse_kl: KL(q || p) = sum_v q log(q/p)      (mode-seeking)
- jsd(beta):  beta KL(p || m) + (1-beta) KL(q || m), m = beta p + (1-beta) q
- tvd:        1/2 sum_v |p - q|                  (acceptance rate of speculative decoding = 1 - TVD)

Temperature T: p_T = softmax(z_p / T), q_T = softmax(z_q / T). The result is NOT multiplied by T^2
(Hinton's gradient-scale correction); keep it plain, as FastLLM did, and scale outside if wanted.
Logits of -inf (masked padded ids) are allowed: terms with zero probability contribute 0, and their
gradients are 0 (not NaN), in the teacher's logits and the student's alike.

Padded vocabularies: a teacher may emit more logit columns than its tokenizer has tokens (T5: 32128
for 32100) while the student has only the real ones. `vocab_limit` (the tokenizer length) keeps the
first `vocab_limit` columns of both: the same as masking the padded columns to -inf before the
softmax, without carrying them.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from distilray.errors import DistilrayError


def _log_probs(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """(..., V) logits -> (N, V) float32 log-probabilities at `temperature`."""
    if not temperature > 0:
        raise DistilrayError(f"temperature must be > 0, got {temperature}")
    logits = logits.float()
    return F.log_softmax(logits.reshape(-1, logits.shape[-1]) / temperature, dim=-1)


def real_columns(logits: torch.Tensor, vocab_limit: int | None) -> torch.Tensor:
    """(..., V) -> (..., vocab_limit): the columns of real tokens (all of them when vocab_limit is None)."""
    if vocab_limit is None:
        return logits
    if not 1 <= vocab_limit <= logits.shape[-1]:
        raise DistilrayError(f"vocab_limit must lie in [1, {logits.shape[-1]}] (the logit width), got {vocab_limit}")
    return logits[..., :vocab_limit]


def _pair(
    p_logits: torch.Tensor, q_logits: torch.Tensor, temperature: float, vocab_limit: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    p_logits, q_logits = real_columns(p_logits, vocab_limit), real_columns(q_logits, vocab_limit)
    if p_logits.shape != q_logits.shape:
        raise DistilrayError(
            f"teacher logits {tuple(p_logits.shape)} and student logits {tuple(q_logits.shape)} differ"
        )
    return _log_probs(p_logits, temperature), _log_probs(q_logits, temperature)


def _kl_rows(log_a: torch.Tensor, log_b: torch.Tensor) -> torch.Tensor:
    """(N, V) log-probs -> (N,) KL(a || b); 0 * log 0 counts as 0.

    The logs are zeroed where a = 0 *before* the product: a `where` after it would still send
    0 * (-inf - -inf) = NaN into the backward pass of both logits.
    """
    a = log_a.exp()
    live = a > 0
    zero = torch.zeros_like(a)
    return (a * (torch.where(live, log_a, zero) - torch.where(live, log_b, zero))).sum(dim=-1)


def forward_kl(
    p_logits: torch.Tensor, q_logits: torch.Tensor, temperature: float = 1.0, vocab_limit: int | None = None
) -> torch.Tensor:
    """KL(p || q), p teacher; scalar mean over N."""
    log_p, log_q = _pair(p_logits, q_logits, temperature, vocab_limit)
    return _kl_rows(log_p, log_q).mean()


def reverse_kl(
    p_logits: torch.Tensor, q_logits: torch.Tensor, temperature: float = 1.0, vocab_limit: int | None = None
) -> torch.Tensor:
    """KL(q || p), q student; scalar mean over N."""
    log_p, log_q = _pair(p_logits, q_logits, temperature, vocab_limit)
    return _kl_rows(log_q, log_p).mean()


def jsd(
    p_logits: torch.Tensor,
    q_logits: torch.Tensor,
    temperature: float = 1.0,
    beta: float = 0.5,
    vocab_limit: int | None = None,
) -> torch.Tensor:
    """beta KL(p || m) + (1-beta) KL(q || m), m = beta p + (1-beta) q; beta in (0, 1); mean over N."""
    if not 0.0 < beta < 1.0:
        raise DistilrayError(f"jsd beta must be in (0, 1), got {beta}")
    log_p, log_q = _pair(p_logits, q_logits, temperature, vocab_limit)
    # log m computed in log space: stable when p or q is tiny. -inf is floored at the lowest float
    # first: logsumexp over two -inf gives a NaN gradient, and where p = q = 0 log m is never used.
    floor = torch.finfo(log_p.dtype).min
    log_m = torch.logsumexp(
        torch.stack([log_p.clamp(min=floor) + math.log(beta), log_q.clamp(min=floor) + math.log(1.0 - beta)]), dim=0
    )
    return (beta * _kl_rows(log_p, log_m) + (1.0 - beta) * _kl_rows(log_q, log_m)).mean()


def tvd(
    p_logits: torch.Tensor, q_logits: torch.Tensor, temperature: float = 1.0, vocab_limit: int | None = None
) -> torch.Tensor:
    """1/2 sum_v |p - q|; mean over N."""
    log_p, log_q = _pair(p_logits, q_logits, temperature, vocab_limit)
    return 0.5 * (log_p.exp() - log_q.exp()).abs().sum(dim=-1).mean()


DIVERGENCES = {
    "fkl": forward_kl,
    "forward_kl": forward_kl,
    "rkl": reverse_kl,
    "reverse_kl": reverse_kl,
    "jsd": jsd,
    "tvd": tvd,
}


def distillation_loss(
    kind: str,
    teacher_logits: torch.Tensor,
    student_logits: torch.Tensor,
    temperature: float = 1.0,
    ce_weight: float = 0.0,
    targets: torch.Tensor | None = None,
    ignore_index: int = -100,
    vocab_limit: int | None = None,
) -> torch.Tensor:
    """divergence(kind)(teacher, student, T) + ce_weight * CE(student logits at T = 1, targets).

    teacher_logits, student_logits: (N, V) or (B, T, V), or (..., V_t) and (..., V_s) with both widths
    >= vocab_limit (only the first vocab_limit columns count, in the divergence and the CE); targets:
    (N,) or (B, T) token ids, entries equal to `ignore_index` (padding) are left out of the
    cross-entropy. No T^2 factor.
    """
    fn = DIVERGENCES.get(kind)
    if fn is None:
        raise DistilrayError(f"unknown distillation loss {kind!r}; choose from {', '.join(DIVERGENCES)}")
    loss = fn(teacher_logits, student_logits, temperature=temperature, vocab_limit=vocab_limit)
    if ce_weight:
        if targets is None:
            raise DistilrayError("ce_weight > 0 needs targets")
        student_logits = real_columns(student_logits, vocab_limit)
        v = student_logits.shape[-1]
        ce = F.cross_entropy(student_logits.float().reshape(-1, v), targets.reshape(-1), ignore_index=ignore_index)
        loss = loss + ce_weight * ce
    return loss
