"""`distilray generate-tfree`: continue a prompt with a trained T-Free model by dictionary decoding, KV-cached
(reference/tfree.md 5). The model folder is what train-tfree writes: config.json + model.safetensors and
dictionary/; `load_tfree_bundle` reads it (it lives in decoding/tfree_generate.py, where the Serve app, which
may not import a job, reads it too)."""

from __future__ import annotations

import torch

from distilray.config import GenerateTFreeConfig
from distilray.decoding.tfree_generate import generate_words, load_tfree_bundle
from distilray.errors import DistilrayError
from distilray.models.causal_lm import pick_device

__all__ = ["load_tfree_bundle", "run"]


def run(cfg: GenerateTFreeConfig) -> dict:
    """Generate once; the text, its words, why it stopped, |D| and the speed (the CLI prints the dict)."""
    if not cfg.model:
        raise DistilrayError("generate-tfree needs model=PATH (a train-tfree model folder with its dictionary/)")
    device = pick_device()
    model, dictionary = load_tfree_bundle(cfg.model, device)
    out = generate_words(
        model,
        dictionary,
        cfg.prompt,
        max_words=cfg.max_words,
        method=cfg.decode_score,
        edge_weight=cfg.word_edge_weight,
        temperature=cfg.temperature,
        top_k=cfg.top_k,
        more_words=cfg.more_words or None,  # empty: the prompt's words, as the original
        generator=torch.Generator(device=device).manual_seed(cfg.seed),
    )
    return {
        "text": out.text,
        "words": out.words,
        "stop_reason": out.stop_reason,
        "prompt_words": out.prompt_words,
        "dictionary_size": out.dictionary_size,
        "decode_score": cfg.decode_score,
        "word_edge_weight": cfg.word_edge_weight,
        "seconds": out.seconds,
        "words_per_s": out.words_per_s,
    }
