"""`distilray eval-ppl`: sliding-window perplexity of any causal LM on any corpus split."""

from __future__ import annotations

import time
from pathlib import Path

from distilray import corpus
from distilray.config import EvalPPLConfig
from distilray.errors import DistilrayError
from distilray.eval.perplexity import perplexity
from distilray.io_utils import atomic_write_json
from distilray.models.causal_lm import load_causal_lm, max_context
from distilray.tokenizer import encode_documents, load_tokenizer
from distilray.training import flat_tokens


def run(cfg: EvalPPLConfig) -> dict:
    if not cfg.model:
        raise DistilrayError("eval-ppl needs model=PATH (a Hugging Face model name or a save_pretrained folder)")
    if cfg.split not in ("train", "validation", "test"):
        raise DistilrayError(f"split must be train, validation or test, got {cfg.split!r}")
    model = load_causal_lm(cfg.model)
    tokenizer = load_tokenizer(cfg.tokenizer or cfg.model)
    if len(tokenizer) > model.config.vocab_size:
        raise DistilrayError(
            f"tokenizer has {len(tokenizer)} tokens but the model only {model.config.vocab_size}: wrong tokenizer?"
        )
    docs = corpus.load_splits(cfg.corpus)[cfg.split]
    tokens = flat_tokens(encode_documents(tokenizer, docs), tokenizer.eos_token_id)
    if cfg.max_tokens:
        tokens = tokens[: cfg.max_tokens]
    context = cfg.context_len or max_context(model)
    if context > max_context(model):
        raise DistilrayError(f"context_len {context} exceeds the model's maximum context {max_context(model)}")
    stride = cfg.stride or max(1, context // 2)
    start = time.perf_counter()
    result = perplexity(model, tokens, context_len=context, stride=stride, batch_size=cfg.batch_size)
    result.update(
        model=str(cfg.model),
        dataset=cfg.corpus.dataset,
        split=cfg.split,
        context_len=context,
        stride=stride,
        seconds=round(time.perf_counter() - start, 3),
    )
    if cfg.output:
        atomic_write_json(Path(cfg.output), result)
    return result
