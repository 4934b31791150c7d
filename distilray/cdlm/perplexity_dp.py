"""Perplexity of a reference text under CD-LM, marginalising over chunk switches (reference note 4).

At position n the retriever proposes chunk c_n (length tau_n) and a switch probability q_n. With
probability 1 - q_n the LM emits x_n; with probability q_n the whole chunk is copied and must equal
x_n..x_{n+tau_n-1} exactly. Backwards from beta_N = 1 (0-based, N = sequence length):

    beta_n = (1 - q_n) p_LM(x_n | x_<n) beta_{n+1} + q_n 1[c_n matches] beta_{min(n + tau_n, N)}

A chunk running past the end counts when its in-range prefix matches (the rest is unobserved).
"""

from __future__ import annotations

import re
from typing import Sequence

import numpy as np

from distilray.errors import DistilrayError

_CAP = 1e-12  # keeps q strictly below its ceiling, so the LM branch never gets probability 0
_MAP_RE = re.compile(r"^map(\d+)_(\d+)(_0)?$")
_VALID_FORMS = (
    "'identity', 'map{A}_{B}' or 'map{A}_{B}_0' with A and B written as digit strings whose first "
    "digit is the units digit (map05_09: A=0.5, B=0.9; map085_095: A=0.85, B=0.95)"
)


def _digits_to_decimal(digits: str) -> float:
    """'05' -> 0.5, '085' -> 0.85, '1' -> 1.0: the first digit is the units digit, the rest decimals."""
    return float(digits[0] + "." + digits[1:]) if len(digits) > 1 else float(digits)


def parse_q_func(q_func: str, max_prob: float = 1.0) -> tuple[str, float, float, bool]:
    """Validate a q_func name; returns (kind, A, B, zero_below) with kind 'identity' or 'map'."""
    if not 0.0 < float(max_prob) <= 1.0:
        raise DistilrayError(f"q_func max_prob must be in (0, 1], got {max_prob}")
    if q_func == "identity":
        return "identity", 0.0, 0.0, False
    if q_func == "greedy":
        raise DistilrayError(
            "q_func 'greedy' is not supported: a hard 0/1 switch gives a chosen chunk that mismatches "
            "the reference probability 1 and the LM probability 0, so perplexity becomes infinite; "
            f"use a soft map instead: {_VALID_FORMS}"
        )
    m = _MAP_RE.match(q_func)
    if m is None:
        raise DistilrayError(f"unknown q_func {q_func!r}; valid forms: {_VALID_FORMS}")
    a, b = _digits_to_decimal(m.group(1)), _digits_to_decimal(m.group(2))
    # A divides in both branches ((B/A)s and (s-A)/(M-A)), so it must lie strictly inside (0, M).
    if not 0.0 < a < max_prob:
        raise DistilrayError(f"q_func {q_func!r}: A={a} must be in (0, max_prob={max_prob})")
    if not 0.0 <= b <= max_prob:
        raise DistilrayError(f"q_func {q_func!r}: B={b} must be in [0, max_prob={max_prob}]")
    return "map", a, b, m.group(3) is not None


def similarity_to_prob(s: np.ndarray | float, q_func: str, max_prob: float = 1.0) -> np.ndarray:
    """Map cosine similarities to switch probabilities q = g_phi(s).

    s: any shape (or a scalar); clamped to [0, 1] first so that negative cosines give q >= 0 (note 8.9).
    q_func: 'identity' -> q = min(s, 1 - 1e-12) (max_prob is not used);
        'map{A}_{B}' -> (B/A) s below A, B at A, min(B + (M - B)(s - A)/(M - A), M - 1e-12) above A,
        with M = max_prob; the '_0' variant gives q = 0 below A.
    Returns float64 q of the same shape as s (0-d for a scalar), every value in [0, 1).
    """
    kind, a, b, zero_below = parse_q_func(q_func, max_prob)
    x = np.asarray(s, dtype=np.float64)
    if np.isnan(x).any():
        raise DistilrayError("similarity contains NaN (a zero-norm key or query?)")
    x = np.clip(x, 0.0, 1.0)
    if kind == "identity":
        return np.minimum(x, 1.0 - _CAP)
    m = float(max_prob)
    below = np.zeros_like(x) if zero_below else (b / a) * x
    above = np.minimum(b + (m - b) * (x - a) / (m - a), m - _CAP)
    q = np.where(x < a, below, np.where(x > a, above, b))
    # B == M would put q = M at s == A; keep every q below M so log(1 - q) stays finite when M == 1.
    return np.minimum(q, m - _CAP) if b >= m else q


def _check_inputs(
    lm_logprobs: np.ndarray, chunks: Sequence[tuple[int, ...] | None], q: np.ndarray, tokens: np.ndarray
) -> tuple[np.ndarray, np.ndarray, list[int]]:
    lp = np.asarray(lm_logprobs, dtype=np.float64)
    qq = np.asarray(q, dtype=np.float64)
    toks = np.asarray(tokens)
    if lp.ndim != 1 or lp.size == 0:
        raise DistilrayError(f"lm_logprobs must be a non-empty 1-D array, got shape {lp.shape}")
    n = lp.shape[0]
    if toks.shape != (n,) or qq.shape != (n,) or len(chunks) != n:
        raise DistilrayError(f"tokens {toks.shape}, q {qq.shape} and chunks ({len(chunks)}) must all have length N={n}")
    if np.isnan(lp).any():
        raise DistilrayError("lm_logprobs contain NaN")
    if np.isnan(qq).any() or (qq < 0).any() or (qq > 1).any():
        raise DistilrayError("switch probabilities q must lie in [0, 1]")
    for i, c in enumerate(chunks):
        if c is None:
            if qq[i] != 0:
                raise DistilrayError(f"position {i} has no chunk but q={qq[i]} (must be 0)")
        elif len(c) == 0:
            raise DistilrayError(f"position {i} proposes an empty chunk")
    return lp, qq, [int(t) for t in toks.tolist()]


def cdlm_log_likelihood(
    lm_logprobs: np.ndarray, chunks: Sequence[tuple[int, ...] | None], q: np.ndarray, tokens: np.ndarray
) -> float:
    """log P(tokens) under CD-LM, summed over every sequence of switches.

    lm_logprobs: (N,) log p_LM(tokens[n] | tokens[<n]) with full teacher-forced context.
    chunks: N entries; chunks[n] is the chunk proposed at n (predicting tokens[n:n+tau]) or None.
    q: (N,) switch probability of each proposal, 0 where chunks[n] is None.
    tokens: (N,) the reference token ids.
    Returns a float, -inf when no switch sequence produces the reference (e.g. q = 1 on a mismatch).
    """
    lp, qq, toks = _check_inputs(lm_logprobs, chunks, q, tokens)
    n_tok = len(toks)
    with np.errstate(divide="ignore"):  # log(0) = -inf is the intended value for q in {0, 1}
        log_q = np.log(qq)
        log_not_q = np.log1p(-qq)
    # log_beta[n] for n = 0..N; -inf marks an impossible suffix, never 0 (note 8.8).
    log_beta = np.full(n_tok + 1, -np.inf)
    log_beta[n_tok] = 0.0
    for n in range(n_tok - 1, -1, -1):
        lm_branch = log_not_q[n] + lp[n] + log_beta[n + 1]
        chunk_branch = -np.inf
        c = chunks[n]
        if c is not None and qq[n] > 0:
            end = min(n + len(c), n_tok)
            # Exact match on the observed part only; tokens beyond N are marginalised out.
            if list(c[: end - n]) == toks[n:end]:
                chunk_branch = log_q[n] + log_beta[end]
        log_beta[n] = np.logaddexp(lm_branch, chunk_branch)
    return float(log_beta[0])


def cdlm_perplexity(
    lm_logprobs: np.ndarray, chunks: Sequence[tuple[int, ...] | None], q: np.ndarray, tokens: np.ndarray
) -> float:
    """exp(-log P(tokens) / N) under CD-LM (inf when the reference is impossible). Shapes as above."""
    log_p = cdlm_log_likelihood(lm_logprobs, chunks, q, tokens)
    with np.errstate(over="ignore"):  # a huge but finite perplexity overflows to inf, as it should
        return float(np.exp(-log_p / len(tokens)))


def lm_perplexity(lm_logprobs: np.ndarray) -> float:
    """The LM-only baseline on the same tokens: exp(-mean(lm_logprobs)); lm_logprobs (N,)."""
    lp = np.asarray(lm_logprobs, dtype=np.float64)
    if lp.ndim != 1 or lp.size == 0:
        raise DistilrayError(f"lm_logprobs must be a non-empty 1-D array, got shape {lp.shape}")
    if np.isnan(lp).any():
        raise DistilrayError("lm_logprobs contain NaN")
    with np.errstate(over="ignore"):
        return float(np.exp(-lp.mean()))
