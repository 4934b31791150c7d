"""Prompt-lookup drafting: proposals on hand-made sequences, rollback, specs, and losslessness in the loop."""

from __future__ import annotations

import copy
import random

import pytest
import torch

from distilray.decoding.drafter_api import Drafter, model_vocab_size
from distilray.decoding.drafters import is_prompt_lookup, load_drafter, prompt_lookup_drafter
from distilray.decoding.prompt_lookup import PromptLookupDrafter
from distilray.decoding.sampling import Sampler, SamplingParams
from distilray.decoding.speculative import plain_generate, speculative_generate
from distilray.errors import DistilrayError
from distilray.models.causal_lm import build_causal_lm

GREEDY = Sampler(SamplingParams(max_new_tokens=64))


def drafter(prefix: list[int], **kwargs) -> PromptLookupDrafter:
    d = PromptLookupDrafter(100, **kwargs)
    d.start(prefix)
    return d


def brute_force(tokens: list[int], limit: int, max_ngram: int, min_ngram: int) -> list[int]:
    """The definition, by a backwards scan: longest n first, most recent earlier occurrence, periodic copy."""
    end = len(tokens)
    for n in range(min(max_ngram, end - 1), min_ngram - 1, -1):
        for start in range(end - n - 1, -1, -1):
            if tokens[start : start + n] == tokens[end - n :]:
                seq = list(tokens)
                for j in range(start + n, start + n + limit):
                    seq.append(seq[j])
                return seq[end:]
    return []


def test_longest_match_wins():
    # the suffix (1, 2, 3) occurred at 0 (then 10, 11); the 1-gram (3) more recently at 6 (then 20, 21)
    tokens = [1, 2, 3, 10, 11, 5, 3, 20, 21, 1, 2, 3]
    assert drafter(tokens).lookup(3) == [10, 11, 5]
    assert drafter(tokens, max_ngram=1).lookup(3) == [20, 21, 1]


def test_most_recent_occurrence_wins():
    tokens = [4, 5, 6, 4, 5, 7, 9, 4, 5]  # (4, 5) at 0 (then 6) and at 3 (then 7, 9)
    assert drafter(tokens).lookup(3) == [7, 9, 4]


def test_min_ngram_and_miss_give_nothing():
    d = drafter([1, 2, 3, 4])
    draft = d.propose(4, GREEDY)
    assert draft.tokens == [] and draft.probs is None and d.length() == 4 and d.matches == 0
    # (9) occurred before, but min_ngram=2 asks for (3, 9), which did not
    assert drafter([9, 1, 3, 9], min_ngram=2).lookup(4) == []
    assert drafter([9, 1, 3, 9]).lookup(4) == [1, 3, 9, 1]


def test_draft_length_respects_max_draft_and_gamma():
    prefix = list(range(20)) + [0, 1]
    d = drafter(prefix, max_draft=5)
    draft = d.propose(16, GREEDY)
    assert draft.tokens == [2, 3, 4, 5, 6] and draft.probs is None
    assert d.length() == len(prefix) + 5 and d.matches == 1  # drafts are appended to the state
    d.rollback(len(prefix))
    assert d.propose(3, GREEDY).tokens == [2, 3, 4]
    d.rollback(len(prefix))
    assert d.propose(0, GREEDY).tokens == []


def test_periodic_match_copies_through_its_draft():
    assert drafter([1, 2, 1, 2]).lookup(5) == [1, 2, 1, 2, 1]
    assert drafter([7, 7]).lookup(3) == [7, 7, 7]


def test_index_matches_definition_under_push_propose_rollback():
    rng = random.Random(0)
    d = PromptLookupDrafter(100, max_ngram=4, min_ngram=1, max_draft=6)
    d.start([rng.randrange(5) for _ in range(30)])
    for _ in range(300):
        op = rng.random()
        if op < 0.4:
            d.push([rng.randrange(5) for _ in range(rng.randint(1, 3))])
        elif op < 0.7:
            d.propose(rng.randint(1, 8), GREEDY)
        else:
            d.rollback(rng.randint(1, d.length()))
        tokens = d._tokens
        assert d.lookup(6) == brute_force(tokens, 6, 4, 1)
        fresh = PromptLookupDrafter(100, max_ngram=4, min_ngram=1)
        fresh.start(tokens)
        assert d._index == fresh._index  # rollback restored the index exactly


def test_source_is_earlier_text_to_copy_from():
    source = [5, 6, 7, 8, 9, 6, 7, 4]
    d = PromptLookupDrafter(100, encoder_ids=source)
    d.start([0, 6])
    assert d.lookup(2) == [7, 4]  # the latest occurrence of (6) in the source
    d.push([7])
    assert d.lookup(5) == [4]  # (6, 7) last occurs before the source's final token: the copy stops there
    d.push([8])
    assert d.lookup(3) == [9, 6, 7]  # the longest match: (6, 7, 8)
    d.push([9, 6, 7, 8])  # state 0 6 7 8 9 6 7 8: at n = 3 its own (6, 7, 8) is later than the source's
    assert d.lookup(3) == [9, 6, 7]
    d.rollback(1)
    assert d.lookup(3) == []  # the start token is nowhere in the source
    d.start([0, 8])
    assert d.lookup(2) == [9, 6] and d.encoder_ids == source  # a new request keeps the source
    with pytest.raises(DistilrayError, match="vocabulary"):
        PromptLookupDrafter(8, encoder_ids=source)


def test_copies_never_share_state():
    template = PromptLookupDrafter(100)
    assert isinstance(template, Drafter) and not template.needs_target_hidden
    a, b = copy.copy(template), copy.copy(template)
    a.start([1, 2, 3, 1, 2])
    b.start([5, 6])
    assert a.lookup(2) == [3, 1] and b.lookup(2) == [] and template.length() == 0


@pytest.mark.parametrize(
    "kwargs", [{"max_ngram": 0, "min_ngram": 0}, {"max_ngram": 1, "min_ngram": 2}, {"max_draft": 0}, {"vocab_size": 0}]
)
def test_bad_arguments(kwargs):
    with pytest.raises(DistilrayError):
        PromptLookupDrafter(**{"vocab_size": 100, **kwargs})


def test_spec_strings():
    assert is_prompt_lookup("prompt-lookup") and is_prompt_lookup("prompt-lookup:n=3,k=8")
    assert not is_prompt_lookup("artifacts/drafters/ngram") and not is_prompt_lookup("prompt-lookups")
    d = load_drafter("prompt-lookup:n=4,m=2,k=2", vocab_size=50)
    assert (d.max_ngram, d.min_ngram, d.max_draft, d.vocab_size) == (4, 2, 2, 50)
    d = load_drafter("prompt-lookup", quantize="int8", vocab_size=50)  # nothing to quantize: ignored
    assert (d.max_ngram, d.min_ngram, d.max_draft) == (3, 1, 8)
    for bad in ("prompt-lookup:x=3", "prompt-lookup:n=three", "prompt-lookup:n3", "prompt-lookup:n=1,m=2"):
        with pytest.raises(DistilrayError):
            prompt_lookup_drafter(bad, 50)
    with pytest.raises(DistilrayError, match="vocab_size"):
        load_drafter("prompt-lookup")
    with pytest.raises(DistilrayError, match="quantization"):
        load_drafter("prompt-lookup", quantize="int4", vocab_size=50)


@pytest.fixture(scope="module")
def target(pydoc_tokenizer, tiny_lm):
    tok = pydoc_tokenizer(40, 300)
    return tok, tiny_lm(tok, 0)


def test_greedy_equals_plain(target, one_thread):
    tok, model = target
    d = load_drafter("prompt-lookup:n=3,k=6", vocab_size=model_vocab_size(model))
    for text in ("The for statement is used to iterate", "A class definition defines a class object"):
        ids = tok(text)["input_ids"]
        plain = plain_generate(model, ids, 40)
        for gamma in (2, 5):
            spec = speculative_generate(model, d, ids, 40, gamma=gamma)
            assert spec.token_ids == plain.token_ids
            assert max(spec.gamma_history) <= gamma


@pytest.fixture(scope="module")
def copier(target):
    """The tiny model trained for a moment on one sentence repeated: it continues that text, as an LM
    that copies from its context does, and the sentence (token ids)."""
    tok, _ = target
    sentence = tok("The for statement is used to iterate over the elements of a sequence.")["input_ids"]
    torch.manual_seed(0)
    model = build_causal_lm("tiny", tok).train()
    stream = torch.tensor(sentence * 12)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for _ in range(60):
        batch = torch.stack([stream[s : s + 64] for s in torch.randint(0, len(sentence), (8,)).tolist()])
        loss = model(input_ids=batch, labels=batch).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model.eval(), sentence


def test_copy_heavy_prompt_accepts_drafts(copier, one_thread):
    model, sentence = copier
    ids = sentence * 2
    d = load_drafter("prompt-lookup", vocab_size=model_vocab_size(model))
    plain = plain_generate(model, ids, 48)
    spec = speculative_generate(model, d, ids, 48, gamma=8)
    assert spec.token_ids == plain.token_ids
    assert spec.accepted > 0 and spec.mean_accepted_length > 1.5
    assert spec.target_passes < plain.target_passes / 1.5
