"""CD-LM retrieval decoding on a tiny GPT-2: KV-cache correctness, lossless verify mode, paper mode, errors."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from distilray.decoding.chunk_drafter import ChunkDrafter
from distilray.decoding.retrieval import (
    GenerationRecord,
    chunk_hit_rate,
    fps,
    mean_chunk_length,
    retrieval_generate,
    tts,
)
from distilray.decoding.sampling import Sampler, SamplingParams
from distilray.decoding.speculative import MAX_GAMMA, plain_generate, speculative_generate
from distilray.errors import DistilrayError

PROMPTS = [
    "The for statement is used to iterate",
    "A class definition defines a class object",
    "The import statement",
    "Exceptions can be raised",
]
CHUNK_LEN = 6


@pytest.fixture(scope="module")
def lm(pydoc_tokenizer, tiny_lm, one_thread):
    """A tiny GPT-2 with a fixed random init, weights scaled by 5: its greedy continuations are varied
    (not one repeated token) and its top-2 logit gaps are far above float32 rounding, so token-for-token
    comparisons between decoders are meaningful and stable. One intra-op thread: on a busy 2-core
    machine, OpenMP barriers make tiny forwards ~50x slower."""
    tok = pydoc_tokenizer(None, 400)
    model = tiny_lm(tok, 0, 5.0)
    return model, tok, [tok(p)["input_ids"] for p in PROMPTS]


def greedy_no_cache(model, prompt: list[int], n: int) -> list[int]:
    """Reference: recompute the full prefix at every step, no KV cache."""
    seq = list(prompt)
    with torch.no_grad():
        for _ in range(n):
            seq.append(int(model(input_ids=torch.tensor([seq]), use_cache=False).logits[0, -1].argmax()))
    return seq[len(prompt) :]


def oracle_lookup(model, prompt: list[int], continuation: list[int], corrupt_from: int | None = None):
    """A small datastore built from a known continuation: key = (token, hidden state) at each position,
    value = the next CHUNK_LEN tokens (optionally with tokens from `corrupt_from` on replaced)."""
    seq = list(prompt) + list(continuation)
    with torch.no_grad():
        hidden = model(input_ids=torch.tensor([seq]), output_hidden_states=True).hidden_states[-1][0].numpy()
    vocab = model.config.vocab_size
    entries: dict[int, list[tuple[np.ndarray, tuple[int, ...]]]] = {}
    for i in range(len(prompt) - 1, len(seq) - 1):
        chunk = list(seq[i + 1 : i + 1 + CHUNK_LEN])
        if corrupt_from is not None:
            chunk = [t if j < corrupt_from else (t + 1) % vocab for j, t in enumerate(chunk)]
        entries.setdefault(seq[i], []).append((hidden[i], tuple(chunk)))

    def lookup(token: int, query: np.ndarray):
        assert query.dtype == np.float32 and query.shape == (model.config.n_embd,)
        best = None
        for key, chunk in entries.get(token, []):
            cos = float(key @ query / (np.linalg.norm(key) * np.linalg.norm(query)))
            if best is None or cos > best[1]:
                best = (chunk, cos)
        return best

    return lookup


def test_baseline_cache_matches_full_recompute(lm):
    model, _, prompts = lm
    for prompt in prompts[:2]:
        rec = retrieval_generate(model, prompt, 20, None, mode="baseline")
        assert rec.token_ids == greedy_no_cache(model, prompt, 20)
        assert rec.forward_passes == 20 and rec.from_chunk == [False] * 20
        assert fps([rec]) == 0.0


def test_verify_greedy_with_oracle_is_identical_and_saves_passes(lm):
    model, _, prompts = lm
    base, cd = [], []
    for prompt in prompts:
        b = retrieval_generate(model, prompt, 30, None, mode="baseline")
        lookup = oracle_lookup(model, prompt, b.token_ids)
        v = retrieval_generate(model, prompt, 30, lookup, mode="verify")
        assert v.token_ids == b.token_ids
        assert v.forward_passes < len(v.token_ids)
        assert any(v.from_chunk) and v.chunk_tokens_accepted == sum(v.from_chunk)
        base.append(b)
        cd.append(v)
    assert fps(cd) > 0.3
    assert 0 < chunk_hit_rate(cd) <= 1 and mean_chunk_length(cd) > 1
    assert isinstance(tts(base, cd), float)


def test_verify_greedy_with_wrong_or_half_right_chunks_is_identical(lm):
    model, _, prompts = lm
    vocab = model.config.vocab_size

    def adversary(token: int, query: np.ndarray):
        return tuple((token + 1 + j) % vocab for j in range(CHUNK_LEN)), 1.0

    for prompt in prompts:
        b = retrieval_generate(model, prompt, 30, None, mode="baseline")
        wrong = retrieval_generate(model, prompt, 30, adversary, mode="verify")
        assert wrong.token_ids == b.token_ids
        # the first CHUNK_LEN // 2 tokens of every chunk are right, the rest wrong: partial accepts, cache rollback
        half = oracle_lookup(model, prompt, b.token_ids, corrupt_from=CHUNK_LEN // 2)
        partial = retrieval_generate(model, prompt, 30, half, mode="verify")
        assert partial.token_ids == b.token_ids
        assert 0 < partial.chunk_tokens_accepted < partial.chunk_tokens_proposed


def test_paper_mode_appends_chunks_without_verification(lm):
    model, tok, prompts = lm
    chunk = tuple(tok(" the value of")["input_ids"])
    assert len(chunk) >= 2
    n = 5 * len(chunk)
    rec = retrieval_generate(model, prompts[0], n, lambda t, h: (chunk, 1.0), mode="paper")
    assert rec.token_ids == list(chunk) * 5 and all(rec.from_chunk)
    # prefill + one pass per appended chunk except the last, whose logits nobody reads
    assert rec.forward_passes == 5 and rec.chunks_used == 5
    assert fps([rec]) == pytest.approx(1 - 5 / n)
    assert rec.chunk_tokens_proposed == rec.chunk_tokens_accepted == n


def test_paper_mode_continues_from_the_cache_after_a_chunk(lm):
    model, tok, prompts = lm
    chunk = tuple(tok(" the value of")["input_ids"])
    calls = []

    def once(token: int, query: np.ndarray):
        calls.append(token)
        return (chunk, 0.9) if len(calls) == 1 else (chunk, 0.1)

    rec = retrieval_generate(model, prompts[1], 15, once, mode="paper", similarity_threshold=0.5)
    rest = greedy_no_cache(model, prompts[1] + list(chunk), 15 - len(chunk))
    assert rec.token_ids == list(chunk) + rest
    assert rec.from_chunk == [True] * len(chunk) + [False] * len(rest)
    # the query after the chunk is keyed by the chunk's last token
    assert calls[0] == prompts[1][-1] and calls[1] == chunk[-1]


def test_paper_mode_above_every_similarity_equals_baseline(lm):
    model, tok, prompts = lm
    chunk = tuple(tok(" the value of")["input_ids"])
    for prompt in prompts[:2]:
        b = retrieval_generate(model, prompt, 20, None, mode="baseline")
        p = retrieval_generate(model, prompt, 20, lambda t, h: (chunk, 0.9), mode="paper", similarity_threshold=0.95)
        assert p.token_ids == b.token_ids and p.forward_passes == b.forward_passes
        assert p.chunks_used == 0 and not any(p.from_chunk) and chunk_hit_rate([p]) == 0.0


def test_long_chunks_are_truncated_to_the_budget(lm):
    model, _, prompts = lm
    long_chunk = tuple(range(10, 60))
    rec = retrieval_generate(model, prompts[0], 7, lambda t, h: (long_chunk, 1.0), mode="paper")
    assert rec.token_ids == list(long_chunk[:7]) and rec.forward_passes == 1
    assert rec.chunk_tokens_proposed == 7
    b = retrieval_generate(model, prompts[0], 40, None, mode="baseline")
    lookup = oracle_lookup(model, prompts[0], b.token_ids)
    v = retrieval_generate(model, prompts[0], 4, lookup, mode="verify")
    assert v.token_ids == b.token_ids[:4] and v.chunk_tokens_proposed <= 4


def test_stops_at_eos(lm):
    model, _, prompts = lm
    b = retrieval_generate(model, prompts[0], 30, None, mode="baseline")
    eos = b.token_ids[5]
    stop = b.token_ids.index(eos) + 1
    for mode in ("baseline", "verify"):
        lookup = oracle_lookup(model, prompts[0], b.token_ids)
        rec = retrieval_generate(model, prompts[0], 30, lookup, mode=mode, eos_token_id=eos)
        assert rec.token_ids == b.token_ids[:stop]
    chunk = (7, 8, eos, 9)
    rec = retrieval_generate(model, prompts[0], 30, lambda t, h: (chunk, 1.0), mode="paper", eos_token_id=eos)
    assert rec.token_ids == [7, 8, eos]


def test_sampling_verify_is_reproducible(lm):
    model, _, prompts = lm
    b = retrieval_generate(model, prompts[2], 40, None, mode="baseline")
    lookup = oracle_lookup(model, prompts[2], b.token_ids)
    runs = [
        retrieval_generate(model, prompts[2], 30, lookup, mode="verify", temperature=1.0, seed=s) for s in (3, 3, 4)
    ]
    assert runs[0].token_ids == runs[1].token_ids and runs[0].from_chunk == runs[1].from_chunk
    assert runs[0].token_ids != runs[2].token_ids
    base = [retrieval_generate(model, prompts[2], 30, None, mode="baseline", temperature=1.0, seed=3) for _ in range(2)]
    assert base[0].token_ids == base[1].token_ids


def test_sampling_verify_keeps_the_first_token_distribution(lm):
    """P(first token) under verify must be p itself: the draft c_1 is accepted with probability p(c_1)
    and a rejection samples from p with c_1 removed. Sampling the correction from p instead would give
    P(c_1) = p + (1 - p) p, about 0.40 here instead of 0.23."""
    model, _, prompts = lm
    prompt = prompts[0]
    with torch.no_grad():
        p = torch.softmax(model(input_ids=torch.tensor([prompt])).logits[0, -1], -1)
    top = torch.topk(p, 3).indices.tolist()
    draft = (top[1], top[0])
    n = 1000
    counts = np.zeros(len(p))
    for s in range(n):
        rec = retrieval_generate(model, prompt, 1, lambda t, h: (draft, 1.0), mode="verify", temperature=1.0, seed=s)
        counts[rec.token_ids[0]] += 1
    for token in top:
        expected = float(p[token])
        assert abs(counts[token] / n - expected) < 4 * np.sqrt(expected * (1 - expected) / n)


def test_sampling_verify_rejects_inside_a_chunk_and_keeps_the_distribution(lm, chi2_fits):
    """A chunk (c1, c2, c3) drafted after the first token: when y1 = c1 the loop drafts (c2, c3), and
    with c2 accepted, c3 is often rejected: a rejection inside the chunk, whose correction comes from
    the residual. Given the tokens before them, the second and third tokens must still follow the model:
    p(. | P c1) and p(. | P c1 c2)."""
    model, _, prompts = lm
    prompt = prompts[1]
    with torch.no_grad():
        p1 = torch.softmax(model(input_ids=torch.tensor([prompt])).logits[0, -1].double(), -1)
        c1 = int(p1.argmax())
        p2 = torch.softmax(model(input_ids=torch.tensor([prompt + [c1]])).logits[0, -1].double(), -1)
        c2 = int(p2.argmax())
        p3 = torch.softmax(model(input_ids=torch.tensor([prompt + [c1, c2]])).logits[0, -1].double(), -1)
    c3 = int(p3.argmax())
    assert float(p1[c1]) > 0.5 and float(p2[c2]) > 0.5 and float(p3[c3]) < 0.5  # c3: rejected more often than not
    second, third = [], []
    inside = accepted_c3 = 0
    for seed in range(400):
        calls = []

        def lookup(token: int, query: np.ndarray):  # one hit per generation: the first query
            calls.append(token)
            return ((c1, c2, c3), 1.0) if len(calls) == 1 else None

        # budget 4: after y1 the loop may draft 2 tokens, the whole rest of the chunk
        rec = retrieval_generate(model, prompt, 4, lookup, mode="verify", temperature=1.0, seed=seed)
        ids = rec.token_ids
        assert rec.chunk_tokens_proposed == (2 if ids[0] == c1 else 0)
        if ids[0] != c1:
            continue
        second.append(ids[1])
        assert rec.from_chunk[1] == (ids[1] == c2)  # c2 is emitted only as the accepted draft
        if ids[1] == c2:
            third.append(ids[2])
            if rec.from_chunk[2]:
                accepted_c3 += 1
            else:  # c2 accepted, then c3 rejected: the correction is a residual sample (never c3)
                inside += 1
                assert ids[2] != c3
    assert inside > 80 and accepted_c3 > 15  # both outcomes after an accepted chunk token
    assert chi2_fits(second, p2) and chi2_fits(third, p3)


def test_record_json(lm):
    model, tok, prompts = lm
    rec = retrieval_generate(model, prompts[0], 5, None, mode="baseline")
    out = rec.to_json(tok)
    assert out["text"] == tok.decode(rec.token_ids) and out["num_generated"] == 5 and out["fps"] == 0.0
    assert set(GenerationRecord.__dataclass_fields__) - {"on_token"} <= set(out) and "on_token" not in out
    json.dumps(out)  # a hook never reaches the JSON
    assert retrieval_generate(model, prompts[0], 0, None).token_ids == []


def test_bad_inputs_are_clear_errors(lm):
    model, _, prompts = lm
    with pytest.raises(DistilrayError, match="similarity_threshold"):
        retrieval_generate(model, prompts[0], 5, None, similarity_threshold=1.5)
    with pytest.raises(DistilrayError, match="similarity_threshold"):
        retrieval_generate(model, prompts[0], 5, None, similarity_threshold=float("nan"))
    with pytest.raises(DistilrayError, match="mode"):
        retrieval_generate(model, prompts[0], 5, None, mode="fast")
    with pytest.raises(DistilrayError, match="context"):
        retrieval_generate(model, [5] * 500, 20, None)
    with pytest.raises(DistilrayError, match="max_new_tokens"):
        retrieval_generate(model, prompts[0], -1, None)
    with pytest.raises(DistilrayError, match="empty"):
        retrieval_generate(model, [], 5, None)
    with pytest.raises(DistilrayError, match="vocabulary"):
        retrieval_generate(model, [10**6], 5, None)
    with pytest.raises(DistilrayError, match="outside the vocabulary"):
        retrieval_generate(model, prompts[0], 5, lambda t, h: ((10**6,), 1.0), mode="verify")
    with pytest.raises(DistilrayError, match="no generated tokens"):
        fps([])


def test_chunk_drafter_proposes_the_chunk_after_the_pending_token():
    """The lookup key lags the state by one token (the target has not fed the last one): a chunk is
    drafted only when it starts with that last token, and then from its second token on."""
    calls = []
    found = {"chunk": (3, 7, 8, 9), "similarity": 0.9}

    def lookup(token: int, hidden: np.ndarray):
        calls.append((token, hidden.shape))
        return found["chunk"], found["similarity"]

    drafter = ChunkDrafter(lookup, similarity_threshold=0.5, vocab_size=20)
    sampler = Sampler(SamplingParams(8))
    hidden = torch.zeros(4)
    drafter.start([1, 2, 3])
    assert drafter.propose(4, sampler, None).tokens == [] and not calls  # nothing fed yet: no lookup
    draft = drafter.propose(2, sampler, hidden)
    assert draft.tokens == [7, 8] and draft.probs is None  # a point mass, capped at gamma
    assert calls == [(2, (4,))] and drafter.length() == 5 and drafter.chunks_used == 1
    drafter.rollback(3)
    found["chunk"] = (4, 7, 8)  # continues another token than the pending 3
    assert drafter.propose(4, sampler, hidden).tokens == []
    found["chunk"], found["similarity"] = (3, 7), 0.4  # below the threshold
    assert drafter.propose(4, sampler, hidden).tokens == [] and drafter.chunks_used == 1
    assert drafter.propose(0, sampler, hidden).tokens == []  # the budget's last token: no lookup
    found["chunk"], found["similarity"] = (3, 99), 1.0
    with pytest.raises(DistilrayError, match="outside the vocabulary"):
        drafter.propose(4, sampler, hidden)


def test_verify_is_the_speculative_loop_with_a_chunk_drafter(lm):
    """ChunkDrafter through speculative_generate equals plain greedy decoding, and saves passes."""
    model, _, prompts = lm
    vocab = model.config.vocab_size
    for prompt in prompts[:2]:
        plain = plain_generate(model, prompt, 30)
        for lookup in (
            oracle_lookup(model, prompt, plain.token_ids),
            oracle_lookup(model, prompt, plain.token_ids, corrupt_from=CHUNK_LEN // 2),
        ):
            drafter = ChunkDrafter(lookup, 0.5, vocab)
            spec = speculative_generate(model, drafter, prompt, 30, gamma=MAX_GAMMA)
            assert spec.token_ids == plain.token_ids
            assert spec.accepted == sum(spec.from_draft) > 0 and spec.target_passes < 30
            assert drafter.chunks_used == sum(g > 0 for g in spec.gamma_history)
            verify = retrieval_generate(model, prompt, 30, lookup, mode="verify")
            assert verify.token_ids == spec.token_ids and verify.forward_passes == spec.target_passes
            assert verify.chunk_tokens_accepted == spec.accepted and verify.chunks_used == drafter.chunks_used
