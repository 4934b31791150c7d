"""Quickstart stage 6, T-Free: a tokenizer-free LM trained briefly on the Gutenberg books, its figures beside
the stage-1 BPE's on the same held-out text, and a generated sample (reference/tfree.md)."""

from __future__ import annotations

import time
from pathlib import Path

import torch

from distilray.config import QuickstartConfig, TrainTFreeConfig, config_from
from distilray.decoding.tfree_generate import generate_words, load_tfree_bundle
from distilray.pipelines import eval_tfree, train_tfree
from distilray.tfree.metrics import duplicate_share, fertility, hf_vocabulary
from distilray.tokenizer import load_tokenizer

BPE_32K = 32_768  # the vocabulary the T-Free paper's embedding saving is usually quoted against


def tfree_stage(cfg: QuickstartConfig, tok_dir: str, link) -> tuple[list[tuple[str, str, str]], dict, str]:
    """What T-Free is for: no vocabulary duplicates, about one item per word, an embedding and head of v hashed
    rows whatever the words; and what it gives: next-word accuracy and a sample from its dictionary decoding."""
    t0 = time.perf_counter()
    res = train_tfree.run(
        config_from(
            TrainTFreeConfig,
            dataset=cfg.long_dataset,
            model=cfg.tfree_model,
            steps=cfg.tfree_steps,
            batch_size=cfg.tfree_batch_size,
            seq_len=cfg.tfree_seq_len,
            warmup_steps=max(1, cfg.tfree_steps // 10),
            eval_words=cfg.tfree_eval_words,
            num_workers=cfg.num_workers,
            artifacts_dir=cfg.artifacts_dir,
            seed=cfg.seed,
        )
    )
    texts = eval_tfree.held_out_texts(cfg.long_dataset, "test", cfg.tfree_eval_words)
    bpe = load_tokenizer(tok_dir)
    bpe_fertility = fertility(eval_tfree.hf_tokenize(bpe), texts)
    model, dictionary = load_tfree_bundle(res["model_dir"])
    # sampled from the calibrated pattern likelihood at the temperature the held-out perplexity was fitted with:
    # greedy head scores of a model this small fall into runs of newlines or short words
    out = generate_words(
        model,
        dictionary,
        cfg.tfree_prompt,
        max_words=cfg.tfree_words,
        method="calibrated",
        temperature=res["word_ppl_temperature"],
        top_k=cfg.tfree_top_k,
        generator=torch.Generator().manual_seed(cfg.seed),
    )
    d, v = model.config.d_model, model.config.v
    label = f"T-Free ({cfg.tfree_model})"
    rows = [
        (
            label,
            "fertility: T-Free / stage-1 BPE",
            f"{fertility(eval_tfree.tfree_items, texts):.2f} / {bpe_fertility:.2f}",
        ),
        (label, "vocabulary duplicates: T-Free / BPE", f"0.0% / {duplicate_share(hf_vocabulary(bpe))['total']:.1f}%"),
        (
            label,
            "embedding + head params",
            f"{res['embed_head_params']:,} ({v} rows, {len(dictionary):,}-word dictionary); "
            f"a {BPE_32K // 1024}k BPE: {2 * BPE_32K * d:,}",
        ),
        (
            label,
            "next-word acc / word ppl (held out)",
            f"{res['next_word_acc']:.3f} / {res['word_ppl']:.1f} (temperature {res['word_ppl_temperature']:g})",
        ),
        (label, "train words/s", f"{res['tokens_per_s']:.0f}" + (" (cached run)" if res.get("cached") else "")),
        (label, "seconds", f"{time.perf_counter() - t0:.1f}"),
    ]
    home = Path(cfg.artifacts_dir).resolve() / "quickstart" / "tfree"
    link(home / "model", res["model_dir"])  # the path serve_config.yaml's tfree app reads
    return rows, {"tfree model": str(home / "model")}, cfg.tfree_prompt + out.text
