"""Batched CD-LM decoding: every row decodes as `retrieval_decode` alone, one pass and one lookup per step."""

from __future__ import annotations

import itertools
import time
from dataclasses import dataclass

import numpy as np
import pytest
import torch

from distilray.cdlm.datastore_files import write_datastore
from distilray.cdlm.local import LocalDatastore
from distilray.decoding.batched import BatchEvent
from distilray.decoding.batched_retrieval import BatchRetrievalDecoder, RetrievalRecord, batch_lookup
from distilray.decoding.retrieval import RetrievalParams, retrieval_decode
from distilray.decoding.sampling import SamplingParams
from distilray.decoding.speculative import plain_decode
from distilray.errors import DistilrayError

PROMPTS = [
    "The for statement is used to iterate",
    "A class definition defines a class object",
    "The import statement",
    "Exceptions can be raised",
    "Operators",
    "The while statement is used for repeated execution as long as an expression is true",
]
CHUNK_LEN = 4
COUNTED = ("token_ids", "from_chunk", "forward_passes", "steps", "chunks_used")
COUNTED += ("chunk_tokens_proposed", "chunk_tokens_accepted")


@pytest.fixture(scope="module")
def setup(one_thread, pydoc_tokenizer, tiny_lm, tmp_path_factory):
    """A tiny peaky GPT-2, the prompts, and a LocalDatastore mined from its own greedy continuations:
    keys at two positions in three (the third misses), every other chunk with a wrong last token (so
    paper rows leave the greedy path and verify rows get partial accepts)."""
    tok = pydoc_tokenizer(40, 300)
    model = tiny_lm(tok, 0)
    prompts = [tok(t)["input_ids"] for t in PROMPTS]
    vocab = model.config.vocab_size
    entries, keys, chunks = [], [], []
    for prompt in prompts:
        seq = prompt + plain_decode(model, prompt, SamplingParams(40)).token_ids
        with torch.no_grad():
            hidden = model(input_ids=torch.tensor([seq]), output_hidden_states=True).hidden_states[-1][0].numpy()
        for i in range(len(prompt) - 1, len(seq) - CHUNK_LEN):
            if i % 3 == 1:
                continue
            chunk = seq[i + 1 : i + 1 + CHUNK_LEN]
            if len(chunks) % 2:
                chunk = chunk[:-1] + [(chunk[-1] + 1) % vocab]
            entries.append(seq[i])
            keys.append(hidden[i])
            chunks.append(chunk)
    folder = tmp_path_factory.mktemp("datastore")
    write_datastore(
        folder,
        entry_tokens=np.array(entries),
        keys=np.stack(keys),
        chunk_ids=np.arange(len(chunks)),
        chunks=chunks,
        num_shards=2,
        tokenizer_fingerprint="fp",
    )
    return model, prompts, LocalDatastore(folder, "fp")


@dataclass(frozen=True)
class Request:
    prompt: list[int]
    params: SamplingParams
    method: RetrievalParams

    def solo(self, model, store) -> tuple[RetrievalRecord, int]:
        """The request decoded alone, and the lookups it made."""
        calls = []

        def lookup(entry: int, hidden: np.ndarray):
            calls.append(entry)
            return store.lookup(entry, hidden)

        return retrieval_decode(model, self.prompt, lookup, self.params, self.method), len(calls)


def _mixed(model, prompts) -> dict[str, Request]:
    """The three modes, greedy and sampled, various prompts and budgets, one row stopped by EOS."""
    eos = plain_decode(model, prompts[0], SamplingParams(30)).token_ids[9]
    base, paper, verify = (RetrievalParams(m, 0.9) for m in ("baseline", "paper", "verify"))
    return {
        "base": Request(prompts[0], SamplingParams(17), base),
        "verify": Request(prompts[1], SamplingParams(30), verify),
        "paper": Request(prompts[2], SamplingParams(25), paper),
        "paper-eos": Request(prompts[0], SamplingParams(30, eos_token_id=eos), paper),
        "paper-t1": Request(prompts[3], SamplingParams(20, temperature=1.0, seed=3), RetrievalParams("paper", 0.5)),
        "verify-t1": Request(prompts[5], SamplingParams(22, temperature=1.0, seed=5), verify),
        "base-t1": Request(prompts[4], SamplingParams(9, temperature=0.8, seed=1), base),
    }


def _run(dec: BatchRetrievalDecoder, schedule: dict[int, dict[str, Request]], cancel=None, on_step=None):
    """Step `dec` until it is empty; joins and cancellations happen before the numbered steps. Returns
    the final records and each request's concatenated new_tokens."""
    records: dict[str, RetrievalRecord] = {}
    streamed: dict[str, list[int]] = {}
    for step in itertools.count():
        for rid, req in schedule.get(step, {}).items():
            dec.add(rid, req.prompt, req.params, req.method)
        for rid in (cancel or {}).get(step, []):
            dec.cancel(rid)
        if not dec.active and step >= max(schedule):
            return records, streamed
        events = dec.step()
        for event in events:
            assert isinstance(event, BatchEvent) and event.error is None, event.error
            streamed.setdefault(event.request_id, []).extend(event.new_tokens)
            if event.finished:
                records[event.request_id] = event.record
        if on_step is not None:
            on_step(events)
        assert step < 500


def _assert_solo(model, store, requests: dict[str, Request], records, streamed) -> None:
    for rid, req in requests.items():
        solo, lookups = req.solo(model, store)
        rec = records[rid]
        assert isinstance(rec, RetrievalRecord) and streamed[rid] == rec.token_ids, rid
        for name in COUNTED:
            assert getattr(rec, name) == getattr(solo, name), (rid, name)
        assert rec.lookups == lookups and rec.mode == req.method.mode, rid


@pytest.mark.parametrize("overlap", [False, True])
def test_mixed_modes_equal_solo(setup, overlap):
    model, prompts, store = setup
    requests = _mixed(model, prompts)
    dec = BatchRetrievalDecoder(model, store.query_batch, max_batch_size=8, overlap=overlap)
    records, streamed = _run(dec, {0: requests})
    _assert_solo(model, store, requests, records, streamed)
    for rid in ("paper", "paper-t1", "verify", "verify-t1"):  # hits and misses in every CD-LM row
        assert 0 < records[rid].chunks_used < records[rid].lookups, rid
    assert records["verify"].chunk_tokens_accepted > 0 and records["base"].lookups == 0
    assert records["paper-eos"].token_ids[-1] == _mixed(model, prompts)["paper-eos"].params.eos_token_id
    discarded = sum(r.discarded_passes for r in records.values())
    assert discarded > 0 if overlap else discarded == 0  # with overlap, hits threw passes away
    assert dec.active == 0 and dec.cache_length == 0 and dec.lookup_calls > 0


@pytest.mark.parametrize("overlap", [False, True])
def test_rows_join_and_leave(setup, overlap):
    """Rows join between steps, finish (budget, EOS) or are cancelled while the others go on; the cache is
    compacted after every step (slack 0)."""
    model, prompts, store = setup
    requests = _mixed(model, prompts)
    requests["doomed"] = Request(prompts[1], SamplingParams(40), RetrievalParams("paper", 0.9))
    schedule = {
        0: {k: requests[k] for k in ("paper", "verify")},
        2: {k: requests[k] for k in ("base", "doomed", "paper-eos")},
        5: {k: requests[k] for k in ("paper-t1", "verify-t1", "base-t1")},
    }
    dec = BatchRetrievalDecoder(model, store.query_batch, overlap=overlap, compact_slack=0)
    records, streamed = _run(dec, schedule, cancel={6: ["doomed"]})
    assert "doomed" not in records and 0 < len(streamed["doomed"]) < 40 and "doomed" not in dec._cd
    del requests["doomed"]
    _assert_solo(model, store, requests, records, streamed)


@pytest.mark.parametrize("overlap", [False, True])
def test_one_lookup_call_and_one_forward_per_step(setup, overlap):
    """Each step makes at most one lookup call, which carries every row's query of that step (the rows'
    lookup counters, equal to the solo runs', grow by its size), and at most one target pass."""
    model, prompts, store = setup
    sizes: list[int] = []

    def lookup(entries: np.ndarray, queries: np.ndarray):
        assert entries.dtype == np.int64 and queries.dtype == np.float32
        assert queries.shape == (len(entries), model.config.n_embd)
        sizes.append(len(entries))
        return store.query_batch(entries, queries)

    requests = _mixed(model, prompts)
    passes: list[int] = []
    handle = model.register_forward_pre_hook(lambda module, args: passes.append(1))
    dec = BatchRetrievalDecoder(model, lookup, overlap=overlap)
    seen: dict[str, int] = {}
    per_step: list[tuple[int, int, int]] = []  # (lookup calls, their queries, rows' lookups added) per step

    def on_step(events: list[BatchEvent]) -> None:
        added = sum(e.record.lookups - seen.get(e.request_id, 0) for e in events)
        seen.update({e.request_id: e.record.lookups for e in events})
        per_step.append((len(sizes), sum(sizes), added))
        assert len(passes) <= 1
        if any(not e.finished for e in events):  # rows leave before the pass only when they need none
            assert len(passes) == 1
        sizes.clear()
        passes.clear()

    try:
        records, streamed = _run(dec, {0: requests}, on_step=on_step)
    finally:
        handle.remove()
    assert all(calls == (1 if added else 0) and queries == added for calls, queries, added in per_step)
    assert max(added for *_, added in per_step) > 3  # calls carried many rows at once
    assert dec.lookup_calls == sum(calls for calls, *_ in per_step) and dec.forward_passes <= len(per_step)
    _assert_solo(model, store, requests, records, streamed)


def test_overlap_runs_the_lookup_during_the_pass(setup):
    """With overlap the step's pass starts while its lookup is in flight (the lookup waits to see it);
    without, the step waits for the lookup before its pass. Outputs are the same."""
    model, prompts, store = setup
    requests = {f"p{i}": Request(p, SamplingParams(8), RetrievalParams("paper", 0.9)) for i, p in enumerate(prompts)}
    out = {}
    for overlap in (False, True):
        passes: list[int] = []
        at_step: list[int] = []  # passes before each step
        saw_pass: list[bool] = []  # per lookup call: its step's pass started while it ran

        def lookup(entries: np.ndarray, queries: np.ndarray):
            before, deadline = at_step[-1], time.monotonic() + (10.0 if overlap else 0.02)
            while len(passes) == before and time.monotonic() < deadline:
                time.sleep(0.0005)
            saw_pass.append(len(passes) > before)
            return store.query_batch(entries, queries)

        dec = BatchRetrievalDecoder(model, lookup, overlap=overlap)
        step = dec.step
        dec.step = lambda: at_step.append(len(passes)) or step()
        handle = model.register_forward_pre_hook(lambda module, args: passes.append(1))
        try:
            out[overlap] = _run(dec, {0: requests})[0]
        finally:
            handle.remove()
        assert saw_pass and all(seen == overlap for seen in saw_pass), (overlap, saw_pass)
    assert all(out[False][r].token_ids == out[True][r].token_ids for r in requests)


def test_adapter_errors_and_edge_cases(setup):
    """batch_lookup, a bad chunk, a lookup that loses answers, no datastore, a request for no tokens."""
    model, prompts, store = setup
    rng = np.random.default_rng(0)
    entries = np.array([prompts[0][-1], prompts[2][-1], 299, prompts[1][3]], dtype=np.int64)
    queries = rng.standard_normal((4, model.config.n_embd)).astype(np.float32)
    assert batch_lookup(store.lookup)(entries, queries) == store.query_batch(entries, queries)
    # a chunk outside the vocabulary ends its own row with an error; the others go on
    params = SamplingParams(6)
    dec = BatchRetrievalDecoder(model, lambda e, q: [((10**6,), 1.0)] * len(e))
    dec.add("bad", prompts[0], params, RetrievalParams("paper"))
    dec.add("ok", prompts[1], params, RetrievalParams("baseline"))
    dec.add("none", prompts[2], SamplingParams(0), RetrievalParams("verify"))
    events = dec.step() + dec.step()
    assert [(e.request_id, e.finished) for e in events[:1]] == [("none", True)] and events[0].new_tokens == []
    failed = [e for e in events if e.error]
    assert [e.request_id for e in failed] == ["bad"] and "outside the vocabulary" in failed[0].error
    records, _ = _run(dec, {0: {}})
    assert records["ok"].token_ids == plain_decode(model, prompts[1], params).token_ids
    # a lookup that loses answers is an error of the step
    dec = BatchRetrievalDecoder(model, lambda e, q: [])
    dec.add("a", prompts[0], params, RetrievalParams("paper"))
    dec.step()
    with pytest.raises(DistilrayError, match="answered 0 of 1"):
        dec.step()
    # no datastore: every row decodes plainly, as retrieval_decode does
    dec = BatchRetrievalDecoder(model, None)
    dec.add("v", prompts[3], params, RetrievalParams("verify"))
    records, _ = _run(dec, {0: {}})
    assert records["v"].token_ids == plain_decode(model, prompts[3], params).token_ids and records["v"].lookups == 0
    with pytest.raises(DistilrayError, match="already decoding"):
        dec.add("x", prompts[0], params)
        dec.add("x", prompts[0], params)
