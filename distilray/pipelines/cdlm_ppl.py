"""`distilray cdlm-ppl`: CD-LM perplexity (section 4 dynamic program) beside the base LM's, on the same tokens."""

from __future__ import annotations

from distilray import corpus
from distilray.actors.cluster import ensure_ray
from distilray.actors.datastore import DatastoreRouter
from distilray.cdlm.evaluate import corpus_perplexities
from distilray.cdlm.perplexity_dp import parse_q_func
from distilray.config import CDLMPerplexityConfig
from distilray.errors import DistilrayError
from distilray.io_utils import atomic_write_json
from distilray.models.causal_lm import load_causal_lm, max_context
from distilray.tokenizer import encode_documents, load_tokenizer, vocab_fingerprint
from distilray.training import flat_tokens


def test_sequences(cfg: CDLMPerplexityConfig, tokenizer, limit: int):
    stream = flat_tokens(encode_documents(tokenizer, corpus.load_splits(cfg.corpus)[cfg.split]), tokenizer.eos_token_id)
    seq_len = min(cfg.seq_len, limit)
    n = min(cfg.num_sequences, len(stream) // seq_len)
    if n == 0:
        raise DistilrayError(f"the {cfg.split} split has fewer than seq_len={seq_len} tokens")
    return [stream[i * seq_len : (i + 1) * seq_len] for i in range(n)]


def run(cfg: CDLMPerplexityConfig) -> dict:
    if not cfg.model:
        raise DistilrayError("cdlm-ppl needs model=PATH (the generation model)")
    parse_q_func(cfg.q_func, cfg.q_func_max_prob)  # a bad name fails before any work
    tokenizer = load_tokenizer(cfg.model)
    model = load_causal_lm(cfg.model)
    sequences = test_sequences(cfg, tokenizer, max_context(model))
    ensure_ray()
    with DatastoreRouter.open(cfg.datastore, vocab_fingerprint(tokenizer)) as router:
        result = corpus_perplexities(model, sequences, router.query_batch, cfg.q_func, cfg.q_func_max_prob)
    result.update(model=cfg.model, datastore=cfg.datastore, dataset=cfg.corpus.dataset, split=cfg.split)
    if cfg.output:
        atomic_write_json(cfg.output, result)
    return result
