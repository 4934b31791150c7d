"""CD-LM perplexity of reference text (reference/cdlm.md section 4), plain torch/numpy.

`batch_lookup(entries (B,), queries (B, d)) -> [(chunk | None, cosine)]` is any datastore client:
the Ray router, or an in-process ShardIndex in tests.
"""

from __future__ import annotations

from typing import Callable, Sequence

import numpy as np
import torch

from distilray.cdlm.perplexity_dp import cdlm_log_likelihood, similarity_to_prob

BatchLookup = Callable[[np.ndarray, np.ndarray], Sequence[tuple[tuple[int, ...] | None, float]]]


@torch.no_grad()
def sequence_terms(model, tokens: np.ndarray, batch_lookup: BatchLookup, q_func: str, max_prob: float = 1.0) -> tuple[float, float, int]:
    """(log P_LM, log P_CD-LM, scored tokens) of tokens[1:] given tokens[0], teacher-forced. tokens: # (N,)

    At position n the proposal comes from the query (x_{n-1}, h_{n-1}): what decoding would have
    asked after reading x_<n.
    """
    device = next(model.parameters()).device
    ids = torch.as_tensor(np.asarray(tokens, dtype=np.int64), device=device)[None]
    out = model(input_ids=ids, output_hidden_states=True)
    logp = torch.log_softmax(out.logits[0, :-1].float(), dim=-1)  # (N-1, V)
    lm_logprobs = logp.gather(-1, ids[0, 1:, None]).squeeze(-1).cpu().numpy().astype(np.float64)
    hidden = out.hidden_states[-1][0, :-1].float().cpu().numpy()  # (N-1, d): h_{n-1} for n = 1..N-1
    answers = batch_lookup(np.asarray(tokens[:-1], dtype=np.int64), hidden)
    chunks = [chunk for chunk, _ in answers]
    sims = np.array([sim if chunk is not None else 0.0 for chunk, sim in answers])
    q = np.where([c is not None for c in chunks], similarity_to_prob(sims, q_func, max_prob), 0.0)
    log_cd = cdlm_log_likelihood(lm_logprobs, chunks, q, np.asarray(tokens[1:]))
    return float(lm_logprobs.sum()), float(log_cd), len(lm_logprobs)


def corpus_perplexities(model, sequences: Sequence[np.ndarray], batch_lookup: BatchLookup, q_func: str, max_prob: float = 1.0) -> dict:
    """Base-LM and CD-LM perplexity over the same tokens of several sequences."""
    lm_total, cd_total, n_total = 0.0, 0.0, 0
    for seq in sequences:
        lm, cd, n = sequence_terms(model, seq, batch_lookup, q_func, max_prob)
        lm_total, cd_total, n_total = lm_total + lm, cd_total + cd, n_total + n
    return {
        "ppl_base": float(np.exp(-lm_total / n_total)),
        "ppl_cdlm": float(np.exp(-cd_total / n_total)),
        "tokens": n_total,
        "sequences": len(sequences),
        "q_func": q_func,
    }
