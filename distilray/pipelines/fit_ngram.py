"""`distilray fit-ngram`: an n-gram drafter counted from a corpus with a Ray Data aggregation.

Each block of documents is tokenized and counted by a Ray Data task; the partial counts come back as
plain lists (no pickle of model objects) and are summed on the driver: the same counts as one pass
over the whole corpus.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import ray

from distilray import console, corpus
from distilray.actors.cluster import ensure_ray
from distilray.config import FitNGramConfig
from distilray.errors import DistilrayError
from distilray.io_utils import atomic_write_json
from distilray.models.ngram import NGramDrafter
from distilray.tokenizer import encode_documents, load_tokenizer, vocab_fingerprint


def _count_block(batch: dict[str, np.ndarray], tokenizer_dir: str, n: int, vocab_size: int) -> dict[str, np.ndarray]:
    """Ray Data map: documents -> one row holding this block's counts as JSON text."""
    tokenizer = load_tokenizer(tokenizer_dir)
    ids = encode_documents(tokenizer, [str(t) for t in batch["text"]])
    counts = NGramDrafter(n, vocab_size).fit(ids)
    return {"counts": np.array([json.dumps(counts.to_rows())]), "tokens": np.array([sum(len(s) for s in ids)])}


def _count_token_rows(batch: dict[str, np.ndarray], n: int, vocab_size: int) -> dict[str, np.ndarray]:
    """Ray Data map: rows of token ids (pseudo-data) -> one row holding this block's counts as JSON text."""
    ids = [[int(t) for t in row] for row in batch["tokens"]]
    counts = NGramDrafter(n, vocab_size).fit(ids)
    return {"counts": np.array([json.dumps(counts.to_rows())]), "tokens": np.array([sum(len(s) for s in ids)])}


def run(cfg: FitNGramConfig) -> dict:
    if not cfg.tokenizer:
        raise DistilrayError("fit-ngram needs tokenizer=PATH (the target model's folder or its tokenizer)")
    started = time.perf_counter()
    tokenizer = load_tokenizer(cfg.tokenizer)
    vocab_size = len(tokenizer)
    NGramDrafter(cfg.n, vocab_size)  # validates n before any work
    ensure_ray()
    if cfg.pseudo_data:
        partial = _pseudo_counts(cfg, vocab_size)
    else:
        partial = _corpus_counts(cfg, tokenizer, vocab_size)
    model = NGramDrafter(cfg.n, vocab_size)
    for row in partial:
        model.merge_counts(NGramDrafter.from_rows(cfg.n, vocab_size, json.loads(str(row["counts"]))))
    model.save(cfg.output_dir)
    stats = {
        "output_dir": str(Path(cfg.output_dir).resolve()),
        "n": cfg.n,
        "vocab_size": vocab_size,
        "source": cfg.pseudo_data or f"{cfg.corpus.dataset}:{cfg.split}",
        "tokens": int(sum(int(r["tokens"]) for r in partial)),
        "blocks": len(partial),
        "contexts": len(model.to_rows()),
        "tokenizer_fingerprint": vocab_fingerprint(tokenizer),
        "seconds": round(time.perf_counter() - started, 2),
    }
    atomic_write_json(Path(cfg.output_dir) / "stats.json", stats)
    return stats


def _corpus_counts(cfg: FitNGramConfig, tokenizer, vocab_size: int) -> list[dict]:
    docs = corpus.load_splits(cfg.corpus)[cfg.split]
    if not docs:
        raise DistilrayError(f"the {cfg.split} split of {cfg.corpus.dataset!r} is empty")
    tok_dir = Path(cfg.tokenizer)
    if not tok_dir.is_dir():  # a hub name: save it once so every task loads the same files
        tok_dir = Path(cfg.output_dir).resolve().parent / ".ngram-tokenizer"
        tokenizer.save_pretrained(tok_dir)
    blocks = max(1, min(cfg.num_blocks, len(docs)))
    ds = ray.data.from_items([{"text": d} for d in docs], override_num_blocks=blocks)
    counted = ds.map_batches(
        _count_block,
        fn_kwargs={"tokenizer_dir": str(tok_dir.resolve()), "n": cfg.n, "vocab_size": vocab_size},
        batch_size=None,  # one call per block
        batch_format="numpy",
    )
    return _collect(counted, blocks)


def _collect(counted, blocks: int) -> list[dict]:
    """The partial counts, one row per block, with a progress bar over the blocks."""
    rows = []
    with console.progress(blocks, "fit-ngram", unit="blocks") as bar:
        for row in counted.iter_rows():
            rows.append(row)
            bar.update(1)
    return rows


def _pseudo_counts(cfg: FitNGramConfig, vocab_size: int) -> list[dict]:
    """Counts over a pseudo-data set: the Parquet folder `distilray distill-drafter data=pseudo` writes."""
    folder = Path(cfg.pseudo_data)
    data = folder / "data" if (folder / "data").is_dir() else folder
    if not data.is_dir() or not any(data.glob("*.parquet")):
        raise DistilrayError(
            f"pseudo_data={cfg.pseudo_data} holds no Parquet files (expected distill-drafter's pseudo/ folder)"
        )
    ds = ray.data.read_parquet(str(data), columns=["tokens"])
    counted = ds.map_batches(
        _count_token_rows, fn_kwargs={"n": cfg.n, "vocab_size": vocab_size}, batch_size=None, batch_format="numpy"
    )
    return _collect(counted, 0)  # the number of blocks is Ray Data's to choose: a count, no total
