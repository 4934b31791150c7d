import numpy as np
import torch

from distilray.cdlm.evaluate import perplexities, sequence_proposals
from distilray.models.causal_lm import build_causal_lm


def test_cdlm_perplexity_with_no_and_with_perfect_chunks(small_tokenizer):
    tok, _ = small_tokenizer
    torch.manual_seed(0)
    model = build_causal_lm("tiny", tok).eval()
    tokens = np.random.default_rng(0).integers(0, len(tok), size=40)

    empty = sequence_proposals(model, tokens, lambda e, q: [(None, 0.0)] * len(e))
    r = perplexities([empty], "map05_09")
    assert r["ppl_cdlm"] == r["ppl_base"] and r["tokens"] == 39

    # an oracle proposing the true next two tokens everywhere, with similarity 1: CD-LM wins
    def oracle(entries, queries):
        return [(tuple(int(t) for t in tokens[i + 1 : i + 3]), 1.0) for i in range(len(entries))]

    perfect = sequence_proposals(model, tokens, oracle)
    r = perplexities([perfect], "map05_09")
    assert r["ppl_cdlm"] < 0.5 * r["ppl_base"] and r["exact_match_proposals"] == 39

    # a liar with similarity 1 only costs the switch probability, so the loss is bounded
    liar = sequence_proposals(model, tokens, lambda e, q: [(((int(t) + 1) % len(tok),), 1.0) for t in tokens[1:]])
    r = perplexities([liar], "map05_09", max_prob=0.9)
    assert r["ppl_base"] < r["ppl_cdlm"] < r["ppl_base"] / (1 - 0.9) + 1e-6
