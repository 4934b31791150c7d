"""The CD-LM perplexity dynamic program against brute-force enumeration, and the q_func maps."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest

from distilray.cdlm.perplexity_dp import (
    cdlm_log_likelihood,
    cdlm_perplexity,
    lm_perplexity,
    similarity_to_prob,
)
from distilray.errors import DistilrayError


def _brute_force_log_likelihood(lm_logprobs, chunks, q, tokens) -> float:
    """Sum over every switch vector z in {0,1}^N, in probability space.

    A chunk taken at n covers n..n+tau-1, where no switch is drawn: only the vector with z = 0 there is
    counted, so each generation path appears exactly once.
    """
    n_tok = len(tokens)
    total = 0.0
    for z in itertools.product((0, 1), repeat=n_tok):
        prob, n = 1.0, 0
        while n < n_tok:
            if z[n] == 1:
                c = chunks[n]
                m = min(len(c), n_tok - n) if c is not None else 0
                if c is None or any(z[k] for k in range(n + 1, n + m)):
                    prob = 0.0
                    break
                if list(c[:m]) != list(tokens[n : n + m]):
                    prob = 0.0
                    break
                prob *= q[n]
                n += m
            else:
                prob *= (1.0 - q[n]) * math.exp(lm_logprobs[n])
                n += 1
        total += prob
    return math.log(total) if total > 0 else -math.inf


def _random_case(seed: int, n_tok: int):
    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, 3, size=n_tok)
    lm_logprobs = np.log(rng.uniform(0.05, 1.0, size=n_tok))
    chunks: list[tuple[int, ...] | None] = []
    q = np.zeros(n_tok)
    for n in range(n_tok):
        kind = rng.integers(0, 3)
        if kind == 0:
            chunks.append(None)
            continue
        tau = int(rng.integers(1, 5))
        if kind == 1:  # matching, possibly running past the end with arbitrary unobserved tokens
            c = list(tokens[n : n + tau]) + list(rng.integers(0, 3, size=max(0, n + tau - n_tok)))
        else:  # random: sometimes matches by chance, usually not
            c = list(rng.integers(0, 3, size=tau))
        chunks.append(tuple(int(t) for t in c))
        q[n] = rng.uniform(0.05, 0.95)
    return lm_logprobs, chunks, q, tokens


@pytest.mark.parametrize("seed", range(8))
def test_dp_matches_brute_force(seed):
    lm_logprobs, chunks, q, tokens = _random_case(seed, n_tok=7 + seed % 3)
    got = cdlm_log_likelihood(lm_logprobs, chunks, q, tokens)
    want = _brute_force_log_likelihood(lm_logprobs, chunks, q, tokens)
    assert got == pytest.approx(want, rel=1e-10, abs=1e-12)
    assert cdlm_perplexity(lm_logprobs, chunks, q, tokens) == pytest.approx(math.exp(-want / len(tokens)))


def test_chunk_running_past_end_counts_when_its_prefix_matches():
    tokens = np.array([1, 2, 3, 4])
    lm_logprobs = np.log(np.full(4, 0.5))
    q = np.array([0.0, 0.0, 0.6, 0.0])
    # proposed at n=2: (3, 4, 9, 9) runs two tokens past the end; its in-range prefix (3, 4) matches
    chunks = [None, None, (3, 4, 9, 9), None]
    got = cdlm_log_likelihood(lm_logprobs, chunks, q, tokens)
    # paths after x_1 x_2 (prob 0.25): LM, LM (0.4 * 0.5 * 0.5) or the chunk (0.6)
    assert got == pytest.approx(math.log(0.25 * (0.4 * 0.25 + 0.6)))
    assert got == pytest.approx(_brute_force_log_likelihood(lm_logprobs, chunks, q, tokens))
    mismatched = [None, None, (3, 5, 9), None]  # in-range part (3, 5) differs: chunk branch impossible
    assert cdlm_log_likelihood(lm_logprobs, mismatched, q, tokens) == pytest.approx(math.log(0.25 * 0.4 * 0.25))


def test_q_zero_everywhere_is_the_lm_likelihood():
    rng = np.random.default_rng(0)
    lm_logprobs = np.log(rng.uniform(0.01, 1.0, size=50))
    tokens = rng.integers(0, 10, size=50)
    chunks = [tuple(int(t) for t in tokens[n : n + 3]) if n % 2 else None for n in range(50)]
    got = cdlm_log_likelihood(lm_logprobs, chunks, np.zeros(50), tokens)
    assert got == sum(reversed(lm_logprobs.tolist()))  # the same additions, in the DP's order
    assert got == pytest.approx(float(lm_logprobs.sum()), rel=1e-12)
    assert cdlm_perplexity(lm_logprobs, chunks, np.zeros(50), tokens) == pytest.approx(lm_perplexity(lm_logprobs))
    assert lm_perplexity(lm_logprobs) == pytest.approx(math.exp(-lm_logprobs.mean()))


def test_q_near_one_with_mismatching_chunks_stays_finite():
    n_tok = 6
    tokens = np.arange(n_tok)
    lm_logprobs = np.log(np.full(n_tok, 0.3))
    chunks = [(99, 98)] * n_tok  # never matches
    q = np.full(n_tok, 1.0 - 1e-9)
    got = cdlm_log_likelihood(lm_logprobs, chunks, q, tokens)
    assert np.isfinite(got)
    assert got == pytest.approx(float(lm_logprobs.sum()) + n_tok * math.log(1e-9), rel=1e-6)
    assert np.isfinite(cdlm_perplexity(lm_logprobs, chunks, q, tokens))
    # exactly 1 makes the reference impossible: -inf, infinite perplexity, and no error
    assert cdlm_log_likelihood(lm_logprobs, chunks, np.ones(n_tok), tokens) == -math.inf
    assert cdlm_perplexity(lm_logprobs, chunks, np.ones(n_tok), tokens) == math.inf
    # q = 1 with chunks that always match: the chunk path alone has probability 1
    matching = [tuple(int(t) for t in tokens[n : n + 2]) for n in range(n_tok)]
    assert cdlm_log_likelihood(lm_logprobs, matching, np.ones(n_tok), tokens) == 0.0


def test_dp_input_validation():
    lp, toks = np.log(np.full(3, 0.5)), np.array([1, 2, 3])
    with pytest.raises(DistilrayError, match="length"):
        cdlm_log_likelihood(lp, [None] * 2, np.zeros(3), toks)
    with pytest.raises(DistilrayError, match="must be 0"):
        cdlm_log_likelihood(lp, [None] * 3, np.array([0.0, 0.5, 0.0]), toks)
    with pytest.raises(DistilrayError, match=r"\[0, 1\]"):
        cdlm_log_likelihood(lp, [(1,)] * 3, np.array([0.0, 1.5, 0.0]), toks)
    with pytest.raises(DistilrayError, match="empty chunk"):
        cdlm_log_likelihood(lp, [(), None, None], np.array([0.5, 0.0, 0.0]), toks)
    with pytest.raises(DistilrayError, match="non-empty"):
        cdlm_log_likelihood(np.zeros(0), [], np.zeros(0), np.zeros(0, dtype=int))


# -- similarity -> switch probability -------------------------------------------------------------


def test_identity_map():
    q = similarity_to_prob(np.array([-0.4, 0.0, 0.3, 1.0, 1.5]), "identity")
    assert q.tolist() == pytest.approx([0.0, 0.0, 0.3, 1.0 - 1e-12, 1.0 - 1e-12], abs=0)
    assert (q < 1.0).all()
    assert float(similarity_to_prob(0.7, "identity")) == pytest.approx(0.7)


def test_map05_09():
    s = np.array([0.25, 0.5, 0.75, 1.0, -0.3])
    q = similarity_to_prob(s, "map05_09")
    assert q.shape == s.shape
    assert q[0] == pytest.approx(0.45)  # (B/A) s below A
    assert q[1] == 0.9  # exactly B at A
    assert q[2] == pytest.approx(0.95)  # B + (M - B)(s - A)/(M - A)
    assert q[3] == 1.0 - 1e-12 and q[3] < 1.0  # capped below M
    assert q[4] == 0.0  # negative similarity clamped to 0, never a negative probability
    capped = similarity_to_prob(s, "map05_09", max_prob=0.95)
    assert capped[2] == pytest.approx(0.9 + 0.05 * 0.25 / 0.45)
    assert capped[3] == pytest.approx(0.95 - 1e-12, abs=0) and capped[3] < 0.95


def test_map05_09_0_and_three_digit_forms():
    q = similarity_to_prob(np.array([0.25, 0.4999, 0.5, 0.75]), "map05_09_0")
    assert q.tolist() == pytest.approx([0.0, 0.0, 0.9, 0.95])
    assert float(similarity_to_prob(0.85, "map085_095")) == pytest.approx(0.95)
    assert float(similarity_to_prob(0.425, "map085_095")) == pytest.approx(0.475)


def test_q_func_errors():
    with pytest.raises(DistilrayError, match="infinite"):
        similarity_to_prob(0.5, "greedy")
    for name in ("foo", "map05", "map05_09_1", "mapA_B"):
        with pytest.raises(DistilrayError, match="valid forms"):
            similarity_to_prob(0.5, name)
    with pytest.raises(DistilrayError, match="A="):
        similarity_to_prob(0.5, "map5_09")  # A = 5.0: the first digit is the units digit
    with pytest.raises(DistilrayError, match="A="):
        similarity_to_prob(0.5, "map0_09")
    with pytest.raises(DistilrayError, match="max_prob"):
        similarity_to_prob(0.5, "map05_09", max_prob=0.0)
    with pytest.raises(DistilrayError, match="NaN"):
        similarity_to_prob(np.array([0.1, np.nan]), "identity")
