"""Shared fixtures: one local Ray for the whole test run, and small trained artifacts."""

from __future__ import annotations

import os
import tempfile

import pytest

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
