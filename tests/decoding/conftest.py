"""Tiny models the decoding tests share: random models with scaled-up weights, whose distributions are
peaky, so greedy ties (and float32 rounding between decoders) cannot hide a bug."""

from __future__ import annotations

import math
from typing import Callable

import pytest
import torch


def _scaled(model: torch.nn.Module, factor: float) -> torch.nn.Module:
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(factor)
    return model.eval()


@pytest.fixture(scope="session")
def scaled() -> Callable[[torch.nn.Module, float], torch.nn.Module]:
    """scaled(model, factor): every weight multiplied by factor, in eval mode."""
    return _scaled


@pytest.fixture(scope="session")
def tiny_lm() -> Callable[..., torch.nn.Module]:
    """tiny_lm(tokenizer, seed, factor=4.0): a tiny random GPT-2 over the tokenizer, weights scaled."""
    from distilray.models.causal_lm import build_causal_lm

    def build(tokenizer, seed: int, factor: float = 4.0) -> torch.nn.Module:
        torch.manual_seed(seed)
        return _scaled(build_causal_lm("tiny", tokenizer), factor)

    return build


@pytest.fixture(scope="session")
def pydoc_tokenizer():
    """pydoc_tokenizer(n_topics, vocab_size): a BPE tokenizer trained on the first topics of the stdlib docs."""
    from pydoc_data.topics import topics

    from distilray.tokenizer import train_bpe_tokenizer

    texts = list(topics.values())
    return lambda n_topics, vocab_size: train_bpe_tokenizer(texts[:n_topics], vocab_size=vocab_size)  # None: all


@pytest.fixture(scope="module")
def one_thread():
    """Tiny matrices gain nothing from a second thread, and OpenMP threads crawl on a shared, busy CPU."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _chi2_fits(samples: list[int], probs: torch.Tensor, p_value: float = 1e-3) -> bool:
    """Whether token samples fit the distribution probs (V,) by a chi-square test at `p_value`.

    Tokens expected fewer than 5 times are pooled into one bin (the chi-square approximation needs about
    5 per bin); a token of probability 0 must never appear. The critical value is Wilson-Hilferty's
    approximation, within 3% of the exact one from 2 degrees of freedom on.
    """
    counts = torch.bincount(torch.tensor(samples), minlength=len(probs)).double()
    if counts[probs == 0].sum() > 0:
        return False
    expected = len(samples) * probs.double()
    big = expected >= 5
    observed, wanted = counts[big], expected[big]
    if expected[~big].sum() > 0:
        observed = torch.cat([observed, counts[~big].sum().view(1)])
        wanted = torch.cat([wanted, expected[~big].sum().view(1)])
    dof = len(wanted) - 1
    if dof < 1:
        return True  # one bin holds everything: nothing to test
    z = {1e-3: 3.0902, 1e-4: 3.7190}[p_value]  # standard normal quantiles 1 - p_value
    critical = dof * (1 - 2 / (9 * dof) + z * math.sqrt(2 / (9 * dof))) ** 3
    return float(((observed - wanted) ** 2 / wanted).sum()) < critical


@pytest.fixture(scope="session")
def chi2_fits() -> Callable[..., bool]:
    """chi2_fits(samples, probs, p_value=1e-3): token samples fit probs (V,) by a chi-square test."""
    return _chi2_fits
