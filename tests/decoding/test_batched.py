"""Continuous batching: every row decodes as it would alone, in one target pass per step."""

from __future__ import annotations

import copy
import itertools

import pytest
import torch

from distilray.decoding.batched import BatchDecoder, BatchEvent
from distilray.decoding.drafter_api import Draft, NextTokenAdapter
from distilray.decoding.drafters import HFDrafter
from distilray.decoding.sampling import Sampler, SamplingParams
from distilray.decoding.speculative import SpecRecord, SpeculativeParams, plain_decode, speculative_decode
from distilray.errors import DistilrayError
from distilray.models.ngram import NGramDrafter
from tests.decoding.test_speculative import FixedDrafter  # the same toy drafter as the one-sequence tests

PROMPTS = [
    "The for statement is used to iterate",
    "A class definition defines a class object",
    "The import statement",
    "Exceptions can be raised",
    "Operators",
    "The while statement is used for repeated execution as long as an expression is true",
]
CHI2_CRIT_DOF5_P001 = 20.52  # chi-square critical value, 5 degrees of freedom, p = 0.001


@pytest.fixture(scope="module")
def setup(one_thread, pydoc_tokenizer, tiny_lm):
    """A tokenizer, a tiny peaky GPT-2 target, an unrelated tiny drafter LM and an n-gram fitted on the
    target's own greedy continuations (a drafter that is often right), the prompts tokenized."""
    tok = pydoc_tokenizer(40, 300)
    target, other = tiny_lm(tok, 0), tiny_lm(tok, 1)
    prompts = [tok(t)["input_ids"] for t in PROMPTS]
    seqs = [p + plain_decode(target, p, SamplingParams(40)).token_ids for p in prompts]
    ngram = NGramDrafter(3, len(tok)).fit(seqs)
    return tok, target, other, ngram, prompts


class Request:
    """One request of a test: what the batch gets, and how to decode it alone."""

    def __init__(self, prompt, params, drafter_factory=None, method=SpeculativeParams()) -> None:
        self.prompt, self.params, self.factory, self.method = prompt, params, drafter_factory, method

    def drafter(self):
        return None if self.factory is None else self.factory()

    def solo(self, target) -> SpecRecord:
        if self.factory is None:
            return plain_decode(target, self.prompt, self.params)
        return speculative_decode(target, self.factory(), self.prompt, self.params, self.method)


def _run(dec: BatchDecoder, schedule: dict[int, dict[str, Request]], cancel: dict[int, list[str]] | None = None):
    """Step `dec` until it is empty; requests join and cancellations happen before the numbered steps.
    Returns the final records and each request's concatenated new_tokens."""
    records: dict[str, SpecRecord] = {}
    streamed: dict[str, list[int]] = {}
    for step in itertools.count():
        for rid, req in schedule.get(step, {}).items():
            dec.add(rid, req.prompt, req.params, req.drafter(), req.method)
        for rid in (cancel or {}).get(step, []):
            dec.cancel(rid)
        if not dec.active and step >= max(schedule):
            return records, streamed
        for event in dec.step():
            assert isinstance(event, BatchEvent) and event.error is None
            streamed.setdefault(event.request_id, []).extend(event.new_tokens)
            if event.finished:
                records[event.request_id] = event.record
        assert step < 500


def _mixed(target, other, ngram, prompts, eos: int | None = None) -> dict[str, Request]:
    """Plain rows and speculative rows (an LM drafter, an n-gram, adaptive gamma), various lengths."""
    return {
        "plain-a": Request(prompts[0], SamplingParams(17)),
        "lm": Request(prompts[1], SamplingParams(25), lambda: HFDrafter(other), SpeculativeParams(gamma=3)),
        "ngram": Request(prompts[2], SamplingParams(30, eos_token_id=eos), lambda: copy.copy(ngram)),
        "adaptive": Request(
            prompts[5],
            SamplingParams(22),
            lambda: copy.copy(ngram),
            SpeculativeParams(gamma=2, adaptive_gamma=True, gamma_max=5),
        ),
        "plain-b": Request(prompts[4], SamplingParams(9)),
        "self": Request(prompts[3], SamplingParams(21), lambda: HFDrafter(target), SpeculativeParams(gamma=4)),
    }


def _assert_solo(target, requests: dict[str, Request], records, streamed) -> None:
    for rid, req in requests.items():
        solo, rec = req.solo(target), records[rid]
        assert rec.token_ids == solo.token_ids, rid
        assert streamed[rid] == rec.token_ids, rid
        for name in ("drafted", "accepted", "rejections", "target_passes", "gamma_history", "from_draft"):
            assert getattr(rec, name) == getattr(solo, name), (rid, name)


def test_greedy_mixed_batch_equals_solo(setup):
    tok, target, other, ngram, prompts = setup
    requests = _mixed(target, other, ngram, prompts)
    dec = BatchDecoder(target, max_batch_size=6)
    records, streamed = _run(dec, {0: requests})
    _assert_solo(target, requests, records, streamed)
    assert records["self"].rejections == 0 and records["ngram"].accepted > 10  # good drafters were used
    assert records["lm"].rejections > 0  # and a bad one
    assert records["plain-b"].target_passes == 9 and records["plain-b"].drafted == 0
    assert max(records["adaptive"].gamma_history) > 2
    assert dec.active == 0 and dec.cache_length == 0


def test_eos_and_rows_joining_and_leaving(setup):
    """Rows join between steps, finish (budget, EOS) or are cancelled while the others go on; the
    cache is compacted after every step (slack 0) and stays within twice the longest row."""
    tok, target, other, ngram, prompts = setup
    eos = plain_decode(target, prompts[2], SamplingParams(30)).token_ids[12]
    requests = _mixed(target, other, ngram, prompts, eos=eos)
    requests["doomed"] = Request(prompts[0], SamplingParams(40), lambda: HFDrafter(other))
    schedule = {
        0: {k: requests[k] for k in ("plain-a", "ngram")},
        2: {k: requests[k] for k in ("lm", "doomed")},
        5: {k: requests[k] for k in ("adaptive", "plain-b", "self")},
    }
    dec = BatchDecoder(target, max_batch_size=6, compact_slack=0)
    lengths = []
    orig_step = dec.step

    def step():
        events = orig_step()
        if dec.active:
            real = dec._mask.sum(1)
            lengths.append((dec.cache_length, int(real.max())))
        return events

    dec.step = step
    records, streamed = _run(dec, schedule, cancel={4: ["doomed"]})
    assert "doomed" not in records and 0 < len(streamed["doomed"]) < 40
    del requests["doomed"]
    _assert_solo(target, requests, records, streamed)
    assert records["ngram"].token_ids[-1] == eos and len(records["ngram"].token_ids) <= 13
    assert all(t <= 2 * longest for t, longest in lengths)


def _passes_against_alone(dec: BatchDecoder, prompts: list[list[int]]):
    """Step `dec` until its requests finish; per pass and row: (request id, the row's sequence with this
    pass's drafts, the number of drafts, the logits the batched pass gave the row's last g+1 tokens)."""
    seen, forward = [], dec._forward

    def spy(drafts):
        logits, hidden = forward(drafts)
        seen.extend((row, list(d.tokens), lg) for row, d, lg in zip(dec._rows, drafts, logits))
        return logits, hidden

    dec._forward = spy
    sequences: dict[int, list[int]] = {}
    while dec.active:
        seen.clear()
        for row in dec._rows + dec._waiting:
            sequences[id(row)] = row.record.token_ids.copy()
        dec.step()
        for row, drafts, lg in list(seen):
            seq = prompts[int(row.request_id)] + sequences[id(row)] + drafts
            yield row.request_id, seq, len(drafts), lg


def test_batched_logits_match_unbatched(setup):
    """Padding, holes of rejected drafts and compaction leave every row's logits as a lone forward pass
    over its sequence would give them."""
    tok, target, other, ngram, prompts = setup
    dec = BatchDecoder(target, compact_slack=8)
    compact = dec._compact
    compactions = 0

    def counted_compact():
        nonlocal compactions
        before = dec.cache_length
        compact()
        compactions += dec.cache_length < before

    dec._compact = counted_compact
    dec._trim = lambda: None  # holes at the end too, so that they pile up to compactions within 20 tokens
    for i, p in enumerate(prompts[:4]):
        dec.add(str(i), p, SamplingParams(20), HFDrafter(other) if i % 2 else None, SpeculativeParams(gamma=3))
    for request_id, seq, g, lg in _passes_against_alone(dec, prompts):
        ref = target(torch.tensor([seq])).logits[0, -(g + 1) :]
        assert torch.allclose(lg, ref, atol=1e-4, rtol=1e-5), (float((lg - ref).abs().max()), request_id)
    assert compactions > 0


def test_int8_batched_logits_equal_a_lone_pass_bit_for_bit(setup):
    """int8 rounds activations, so a last-bit difference of batched attention could become a whole
    quantisation step and flip a greedy token; with padding and holes in the batch, every row's logits
    are still exactly those of its sequence alone."""
    from distilray.models.quantize import quantize_int8

    tok, target, other, ngram, prompts = setup
    int8 = quantize_int8(copy.deepcopy(target))
    dec = BatchDecoder(int8)
    merges = []
    merge = dec._merge
    dec._merge = lambda rows, mask, cache: (merges.append(len(rows)), merge(rows, mask, cache))
    drafters = [None, HFDrafter(other), ngram, HFDrafter(other)]

    def add(i: int) -> None:
        dec.add(str(i), prompts[i], SamplingParams(12 + 4 * i), drafters[i], SpeculativeParams(gamma=3))

    add(0), add(1)
    passes = 0
    for request_id, seq, g, lg in _passes_against_alone(dec, prompts):
        with torch.inference_mode():
            alone = int8(torch.tensor([seq])).logits[0, -(g + 1) :]
        assert torch.equal(lg, alone), (float((lg - alone).abs().max()), request_id)
        passes += 1
        if passes == 3:  # two rows join a batch already decoding: a first pass of their own, then a merged cache
            add(2), add(3)
    assert passes > 8 and merges == [2]


def test_a_lone_row_keeps_a_cache_without_holes(setup):
    """Rejected drafts at the end of every row are cut off, as a lone decoder crops them: one row's cache
    holds exactly its sequence, and the pass runs without a mask, as decoding alone does."""
    tok, target, other, ngram, prompts = setup
    dec = BatchDecoder(target)
    forward, masks = target.forward, []

    def spy(*args, **kwargs):
        masks.append(kwargs.get("attention_mask"))
        return forward(*args, **kwargs)

    target.forward = spy
    try:
        dec.add("a", prompts[0], SamplingParams(24), HFDrafter(other), SpeculativeParams(gamma=3))
        tokens, rejections = [], 0
        while dec.active:
            event = dec.step()[0]
            tokens += event.new_tokens
            rejections = event.record.rejections
            if not event.finished:
                assert dec.cache_length == len(prompts[0]) + len(tokens) - 1  # the last token is fed next
    finally:
        del target.forward
    alone = speculative_decode(target, HFDrafter(other), prompts[0], SamplingParams(24), SpeculativeParams(gamma=3))
    assert rejections > 0 and tokens == alone.token_ids
    assert masks and all(m is None for m in masks)


class HiddenSpy(NextTokenAdapter):
    """An n-gram drafter that asks for the target's hidden state (as a chunk drafter does) and keeps them."""

    needs_target_hidden = True

    def __init__(self, inner, seen: list) -> None:
        super().__init__(inner)
        self.seen = seen

    def propose(self, gamma: int, sampler: Sampler, target_hidden=None) -> Draft:
        self.seen.append(None if target_hidden is None else target_hidden.clone())
        return super().propose(gamma, sampler, target_hidden)


def test_drafters_get_the_target_hidden_state_they_would_get_alone(setup):
    tok, target, other, ngram, prompts = setup
    batched: list = []
    dec = BatchDecoder(target)
    dec.add("spy", prompts[1], SamplingParams(24), HiddenSpy(copy.copy(ngram), batched), SpeculativeParams(gamma=3))
    dec.add("plain", prompts[5], SamplingParams(30))
    records, _ = _run(dec, {0: {}})
    alone: list = []
    method = SpeculativeParams(gamma=3)
    solo = speculative_decode(target, HiddenSpy(copy.copy(ngram), alone), prompts[1], SamplingParams(24), method)
    assert records["spy"].token_ids == solo.token_ids and len(batched) == len(alone) > 3
    assert batched[0] is None and alone[0] is None
    for b, a in zip(batched[1:], alone[1:]):
        assert torch.allclose(b, a, atol=1e-4)


def test_one_target_forward_per_step(setup):
    tok, target, other, ngram, prompts = setup
    calls = []
    handle = target.register_forward_pre_hook(lambda module, args: calls.append(1))
    try:
        dec = BatchDecoder(target)
        for i, p in enumerate(prompts[:4]):
            dec.add(str(i), p, SamplingParams(12), HFDrafter(other) if i % 2 else None, SpeculativeParams(gamma=3))
        steps = 0
        while dec.active:
            dec.step()
            steps += 1
            assert len(calls) == steps == dec.forward_passes
    finally:
        handle.remove()
    assert steps == 12  # plain rows need one pass per token; rows that all start together, no separate prefill


def test_rows_joining_a_decoding_batch_take_their_first_step_apart(setup):
    """A newcomer's prompt never widens the others' pass: it gets a pass of its own, then joins."""
    tok, target, other, ngram, prompts = setup
    widths: list[tuple[int, int]] = []  # (rows, tokens a row) of every pass
    handle = target.register_forward_pre_hook(
        lambda module, args, kwargs: widths.append(tuple(kwargs["input_ids"].shape)), with_kwargs=True
    )
    try:
        dec = BatchDecoder(target)
        for i in range(3):
            dec.add(str(i), prompts[i], SamplingParams(12), None)
        dec.step()
        dec.step()
        widths.clear()
        dec.add("late", prompts[5], SamplingParams(12), copy.copy(ngram), SpeculativeParams(gamma=3))
        events = dec.step()
    finally:
        handle.remove()
    assert widths == [(1, len(prompts[5]) + 3), (3, 1)]  # the newcomer's prompt and drafts alone, then the others
    assert {e.request_id for e in events} == {"0", "1", "2", "late"} and dec.active == 4


def test_llama_target(one_thread, pydoc_tokenizer, scaled):
    from distilray.models.rotary_lm import build_rotary_lm

    tok = pydoc_tokenizer(40, 300)
    torch.manual_seed(0)
    target = scaled(build_rotary_lm("llama-tiny", tok, max_positions=128), 4.0)
    torch.manual_seed(1)
    other = scaled(build_rotary_lm("llama-tiny", tok, max_positions=128), 4.0)
    prompts = [tok(t)["input_ids"] for t in PROMPTS]
    requests = {
        "plain": Request(prompts[0], SamplingParams(15)),
        "lm": Request(prompts[5], SamplingParams(20), lambda: HFDrafter(other), SpeculativeParams(gamma=3)),
        "self": Request(prompts[2], SamplingParams(18), lambda: HFDrafter(target), SpeculativeParams(gamma=4)),
        "late": Request(prompts[3], SamplingParams(10), lambda: HFDrafter(other)),
    }
    dec = BatchDecoder(target, compact_slack=0)
    late = {"late": requests["late"]}
    records, streamed = _run(dec, {0: {k: v for k, v in requests.items() if k != "late"}, 3: late})
    _assert_solo(target, requests, records, streamed)


def test_sampled_rows_reproducible_and_independent_of_the_batch(setup):
    tok, target, other, ngram, prompts = setup
    requests = {
        f"s{i}": Request(
            prompts[i],
            SamplingParams(16, temperature=1.0, top_p=0.9 if i == 1 else 1.0, seed=i),
            (lambda: HFDrafter(other)) if i < 2 else (lambda: copy.copy(ngram)) if i < 3 else None,
        )
        for i in range(4)
    }
    alone = {}
    for rid, req in requests.items():  # each request alone in a decoder
        alone |= _run(BatchDecoder(target), {0: {rid: req}})[0]
    together, _ = _run(BatchDecoder(target), {0: requests})
    for rid, req in requests.items():
        solo = req.solo(target)  # the same generator draws as speculative_decode / plain_decode
        assert alone[rid].token_ids == together[rid].token_ids == solo.token_ids, rid
        assert together[rid].accepted == solo.accepted and together[rid].rejections == solo.rejections


@pytest.fixture(scope="module")
def toy_target(scaled):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    config = GPT2Config(
        vocab_size=6, n_embd=16, n_layer=1, n_head=2, n_positions=64, bos_token_id=None, eos_token_id=None
    )
    return scaled(GPT2LMHeadModel(config), 4.0)


def test_sampled_row_in_a_batch_keeps_the_target_distribution(toy_target):
    """Rows sampled next to a greedy plain row with another prompt length: the first two tokens follow the
    exact marginals of the target (temperature 1), drafts accepted, corrected and bonus tokens alike."""
    prompt, batches, per_batch = [0, 1], 200, 4
    with torch.no_grad():
        first = torch.softmax(toy_target(torch.tensor([prompt])).logits[0, -1].double(), -1)
        seconds = torch.softmax(toy_target(torch.tensor([[*prompt, t] for t in range(6)])).logits[:, -1].double(), -1)
    exact = [first, first @ seconds]  # marginals of the first and second generated tokens
    counts = torch.zeros(2, 6, dtype=torch.float64)
    accepted = rejections = 0
    for b in range(batches):
        dec = BatchDecoder(toy_target)
        dec.add("greedy", [3, 4, 5, 2, 1], SamplingParams(3))
        for i in range(per_batch):
            params = SamplingParams(2, temperature=1.0, seed=b * per_batch + i)
            dec.add(str(i), prompt, params, FixedDrafter([0.4, 0.25, 0.05, 0.1, 0.15, 0.05]), SpeculativeParams(2))
        records, _ = _run(dec, {0: {}})
        for i in range(per_batch):
            rec = records[str(i)]
            counts[0, rec.token_ids[0]] += 1
            counts[1, rec.token_ids[1]] += 1
            accepted += rec.accepted
            rejections += rec.rejections
    runs = batches * per_batch
    assert accepted > 100 and rejections > 100
    for t in range(2):
        expected = runs * exact[t]
        chi2 = float(((counts[t] - expected) ** 2 / expected).sum())
        assert chi2 < CHI2_CRIT_DOF5_P001, (t, counts[t].tolist(), expected.tolist())


class BrokenDrafter:
    """Proposes once, then fails: a remote drafter whose replica died."""

    needs_target_hidden = False

    def __init__(self, vocab_size: int) -> None:
        self.vocab_size, self.calls = vocab_size, 0

    def start(self, prefix: list[int]) -> None:
        self.n = len(prefix)

    def propose(self, gamma: int, sampler: Sampler, target_hidden=None) -> Draft:
        self.calls += 1
        if self.calls > 1:
            raise ConnectionError("drafter replica gone")
        self.n += 1
        return Draft([5][:gamma])

    def push(self, tokens: list[int]) -> None:
        self.n += len(tokens)

    def rollback(self, length: int) -> None:
        self.n = length

    def length(self) -> int:
        return self.n


def test_admission_errors_and_edge_cases(setup, toy_target):
    tok, target, other, ngram, prompts = setup
    dec = BatchDecoder(target, max_batch_size=3)
    with pytest.raises(DistilrayError, match="empty"):
        dec.add("a", [], SamplingParams(4))
    with pytest.raises(DistilrayError, match="context"):
        dec.add("a", prompts[0], SamplingParams(600))
    with pytest.raises(DistilrayError, match="vocabularies differ"):
        dec.add("a", prompts[0], SamplingParams(4), HFDrafter(toy_target))
    assert dec.active == 0
    dec.add("zero", prompts[0], SamplingParams(0), HFDrafter(other))
    dec.add("broken", prompts[1], SamplingParams(10), BrokenDrafter(len(tok)))
    dec.add("ok", prompts[2], SamplingParams(5))
    assert not dec.has_room
    with pytest.raises(DistilrayError, match="full"):
        dec.add("more", prompts[0], SamplingParams(4))
    events = {e.request_id: e for e in dec.step()}
    assert events["zero"].finished and events["zero"].new_tokens == [] and events["zero"].record.target_passes == 0
    assert not events["broken"].finished and not events["ok"].finished
    with pytest.raises(DistilrayError, match="already"):
        dec.add("ok", prompts[0], SamplingParams(4))
    events = {e.request_id: e for e in dec.step()}
    assert events["broken"].finished and "replica gone" in events["broken"].error
    assert dec.active == 1 and dec.has_room
    dec.cancel("no-such-request")
    records, _ = _run(dec, {0: {}})
    assert records["ok"].token_ids == plain_decode(target, prompts[2], SamplingParams(5)).token_ids
    with pytest.raises(DistilrayError):
        BatchDecoder(target, max_batch_size=0)
