"""Tiny models the decoding tests share: random models with scaled-up weights, whose distributions are
peaky, so greedy ties (and float32 rounding between decoders) cannot hide a bug."""

from __future__ import annotations

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
