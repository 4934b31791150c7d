"""Shared fixtures: one local Ray for the whole test run, and small trained artifacts."""

from __future__ import annotations

import contextlib
import math
import os
import socket
import tempfile
from typing import Callable

import pytest
import torch

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def ray_session():
    """A local Ray (2 CPUs, capped object store, short temp dir) shared by every test that needs one."""
    import ray

    temp_dir = tempfile.mkdtemp(prefix="dr-", dir="/tmp")
    ray.init(
        num_cpus=2,
        object_store_memory=256 * 1024 * 1024,
        _temp_dir=temp_dir,
        include_dashboard=True,  # Ray Train's placement-group cleaner polls the state API
        log_to_driver=True,
    )
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def small_tokenizer(tmp_path_factory):
    """A 512-token BPE trained on the built-in corpus, saved with save_pretrained."""
    from distilray import corpus
    from distilray.tokenizer import load_tokenizer, save_tokenizer, train_bpe_tokenizer

    docs = corpus.load_documents("pydoc")
    path = tmp_path_factory.mktemp("tok") / "bpe512"
    save_tokenizer(train_bpe_tokenizer(docs, vocab_size=512), path)
    return load_tokenizer(path), path


@pytest.fixture(scope="session")
def serve_loopback(ray_session):
    """`with serve_loopback(app, name, route_prefix) as base_url:` runs a Serve app on a free 127.0.0.1
    port (or the port of a Serve already running), then deletes it, and stops Serve if it started it."""
    from ray import serve
    from ray.serve.context import _get_global_client

    @contextlib.contextmanager
    def deploy(app, name: str, route_prefix: str):
        already_running = _get_global_client(raise_if_no_controller_running=False) is not None
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            free_port = s.getsockname()[1]
        serve.start(http_options={"host": "127.0.0.1", "port": free_port})
        port = _get_global_client().http_config.port  # an already running Serve keeps its own port
        serve.run(app, name=name, route_prefix=route_prefix, blocking=False)
        try:
            yield f"http://127.0.0.1:{port}{route_prefix}"
        finally:
            serve.delete(name)
            if not already_running:
                serve.shutdown()
        assert ray_session.is_initialized() and ray_session.get(ray_session.put(7)) == 7  # session Ray lives on

    return deploy


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
