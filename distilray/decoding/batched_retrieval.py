"""Batched CD-LM decoding for a Serve target replica: many requests, ONE target pass and ONE datastore
lookup per step (reference/cdlm.md 3.5, 10.1).

`BatchRetrievalDecoder` is a `BatchDecoder` (decoding/batched.py) whose rows are CD-LM requests. The
batched KV cache with its column mask, per-row positions, holes, joins, leaves and compaction are the
parent's, unchanged; so are the verification of a draft and the advance of a row (`_settle`). Per row
(`RetrievalParams.mode`, as `retrieval_decode` in decoding/retrieval.py):

- `baseline`: a plain row of the parent, one token per pass.
- `verify`: a speculative row of the parent whose drafter is a `ChunkDrafter` that never calls the
  datastore itself: the decoder hands it its answer from the step's batch lookup. The parent's acceptance
  rule verifies the chunk, so the output is the model's own (greedy: identical to `baseline`).
- `paper`: retrieval.py's `_paper_loop`, one decision per step. After a pass the row keeps its last logits and hidden
  state; the next step's lookup either hits (cosine >= threshold: the chunk is emitted unverified, cut
  to the budget) or misses (one token is sampled from the kept logits); the next pass feeds what was
  emitted. A decision that ends the row needs no pass, as alone.

Lookups: every row that needs one in a step (a paper row after its pass, a verify row whose drafter
would query) goes into ONE `BatchLookup` call, entries (B,) and queries (B, d): the shape of
`DatastoreRouter.query_batch` (one scatter/gather to the shard actors) and `LocalDatastore.query_batch`.

Overlap (`overlap=True`, item 2 of "Serving at load"): the step's lookup runs on a worker thread while the
target pass runs on the assumption that every row missed: a paper row feeds the token it samples from
its kept logits (its sampler's state saved first), a verify row feeds its pending token without a draft.
When the answer comes back after the pass, a row that hit throws its share of the pass away (its new
cache columns become holes): a paper row rewinds its sampler, emits the chunk and feeds it next step; a
verify row takes the chunk as its draft next step. A miss keeps the pass, which is then exactly the one
it would have run. So outputs, random draws and every counter except `discarded_passes` equal the run
without overlap (and the solo run); a hit costs its row one extra step (a chunk takes two steps instead
of one). Worth it when the lookup is a remote call (the Serve replica: an RPC that releases the GIL) and
hits are not the rule: with hit rate h a row needs about (1 + h) steps of max(L, F) instead of one step
of L + F (L lookup, F pass). `overlap` is per decoder: one step cannot both wait for the lookup (for the
rows that would need it before the pass) and overlap it.

Measured on 2 CPU cores shared with other jobs (load average 10-17 during the runs, so the figures
vary: ranges over three runs, each the median of 9-15 interleaved repetitions), one thread, float32,
greedy `paper` rows, 8-token prompts, 32 new tokens per row, the prefill step left out, a lookup that
sleeps 2 ms (a remote call) and never hits, "tiny" GPT-2 preset (its pass alone: 1.4-3.7 ms a step):

    rows  no overlap        overlap           gain
    1     155-253 steps/s   168-358 steps/s   1.06-1.45x
    8     131-201 steps/s   143-292 steps/s   1.08-1.45x

With a third of the queries hitting (2-token chunks) overlap needs 31-32 steps where no overlap needs
25: 0.99-1.57x steps/s but 0.80-1.27x tokens/s. The "small" preset (its pass 15-50 ms here): 0.93-1.14x
without hits, 0.73-1.00x tokens/s with them; a 2 ms lookup behind a 30 ms pass hides little. Hence off
by default: turn it on when a lookup costs about as much as a pass or more (a remote datastore next to a
fast GPU pass) and hits are not the rule.

Records: each `BatchEvent.record` is a `RetrievalRecord`, a `GenerationRecord` (token_ids, from_chunk,
forward_passes, chunks_used, chunk_tokens_proposed/accepted, steps, seconds, mode: counted as
`retrieval_decode` counts them, so equal to the solo run's) plus `lookups` (queries this row sent) and
`discarded_passes` (passes it took part in whose output overlap threw away; forward_passes excludes them).
A row gets one event per step it was in, `new_tokens` possibly empty (a paper row's prefill, a discarded
pass). The decoder counts `lookup_calls` and `lookup_seconds`. Not thread-safe, as `BatchDecoder`: one
thread owns a decoder. `add` takes a `RetrievalParams` where the parent takes a drafter and its method.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import torch

from distilray.cdlm.local import MISS, QueryResult
from distilray.decoding.batched import BatchDecoder, BatchEvent, _propose, _Row
from distilray.decoding.chunk_drafter import ChunkDrafter, Lookup, query_chunk
from distilray.decoding.drafter_api import Draft
from distilray.decoding.retrieval import GenerationRecord, Mode, RetrievalParams
from distilray.decoding.sampling import SamplingParams
from distilray.decoding.speculative import MAX_GAMMA, SpeculativeParams
from distilray.errors import DistilrayError

# entries (B,) int64, queries (B, d) float32 -> per query (chunk | None, cosine), in input order
BatchLookup = Callable[[np.ndarray, np.ndarray], list[QueryResult]]


def batch_lookup(lookup: Lookup) -> BatchLookup:
    """A per-query `Lookup` as a `BatchLookup` (tests, toy stores): it still answers one query at a time."""

    def run(entries: np.ndarray, queries: np.ndarray) -> list[QueryResult]:
        found = [lookup(int(e), q) for e, q in zip(entries.tolist(), queries)]
        return [MISS if f is None else f for f in found]

    return run


@dataclass
class RetrievalRecord(GenerationRecord):
    """A batched row's `GenerationRecord`, plus what only batching has."""

    lookups: int = 0  # queries this row sent (one per paper decision; verify: per step its drafter queried)
    discarded_passes: int = 0  # overlap: passes this row took part in whose output a hit (or its end) made useless


class _BatchAnsweredDrafter(ChunkDrafter):
    """A `ChunkDrafter` whose lookup is the answer the decoder got for it from the step's batch call."""

    def __init__(self, similarity_threshold: float, vocab_size: int) -> None:
        super().__init__(self._take_answer, similarity_threshold, vocab_size)
        self.answer: QueryResult | None = None  # set by the decoder just before `propose`

    def query(self, gamma: int, target_hidden: torch.Tensor | None) -> tuple[int, torch.Tensor] | None:
        """(entry token, hidden (d,)) that `propose(gamma, _, target_hidden)` would look up, None when it
        would not look up at all (the guard of ChunkDrafter.propose)."""
        if gamma == 0 or target_hidden is None or len(self._tokens) < 2:
            return None
        return self._tokens[-2], target_hidden

    def _take_answer(self, token: int, hidden: np.ndarray) -> tuple[tuple[int, ...], float] | None:
        if self.answer is None:
            raise DistilrayError("internal: a chunk drafter looked up a query the batch did not send")
        answer, self.answer = self.answer, None
        return _found(answer)


@dataclass
class _Cd:
    """A row's CD-LM state, next to the parent's `_Row` (keyed by request id)."""

    mode: Mode
    threshold: float
    vocab: int  # chunk ids must lie below it
    record: RetrievalRecord
    reported: int = 0  # tokens already handed out in events
    last: int = 0  # paper: the last token in the cache, the entry token of the next query
    logits: torch.Tensor | None = None  # paper: (V,) after `last`, until a decision uses them
    hidden: torch.Tensor | None = None  # paper: (d,) final hidden state at `last`: the next query
    rewind: torch.Tensor | None = None  # paper, overlap: sampler state before the guessed token
    draft: Draft | None = None  # verify, overlap: the chunk found after a discarded pass, fed next step


class BatchRetrievalDecoder(BatchDecoder):
    """Continuous batching of CD-LM requests (baseline, paper, verify) over one target and one lookup."""

    def __init__(
        self,
        model,
        lookup: BatchLookup | None,
        max_batch_size: int = 8,
        overlap: bool = False,
        compact_slack: int = 64,
    ) -> None:
        super().__init__(model, max_batch_size, compact_slack)
        self.lookup = lookup  # None: no datastore, every row decodes plainly (as retrieval_decode)
        self.overlap = overlap
        self.lookup_calls = 0
        self.lookup_seconds = 0.0  # summed duration of the calls (with overlap, mostly behind the passes)
        self._cd: dict[str, _Cd] = {}
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="cdlm-lookup") if overlap else None

    def add(  # the parent's signature with a CD-LM method where it takes a drafter
        self,
        request_id: str,
        prompt_ids: list[int],
        params: SamplingParams,
        method: RetrievalParams = RetrievalParams(),
        vocab_limit: int | None = None,
    ) -> None:
        """Queue a request; it joins at the next step. vocab_limit: the tokenizer's length when the
        target's logits are padded past it (as in retrieval_decode)."""
        mode = "baseline" if self.lookup is None else method.mode
        vocab = vocab_limit or self.vocab_size
        drafter = _BatchAnsweredDrafter(method.similarity_threshold, vocab) if mode == "verify" else None
        # a chunk is drafted whole: gamma only caps it (the budget cuts it too), as in retrieval_decode
        super().add(request_id, prompt_ids, params, drafter, SpeculativeParams(gamma=MAX_GAMMA), vocab_limit)
        row = self._waiting[-1]
        record = RetrievalRecord(prompt_ids=[int(t) for t in prompt_ids], mode=method.mode)
        # the parent's record is the one its rule fills: share its token lists instead of copying them
        record.token_ids, record.from_chunk = row.record.token_ids, row.record.from_draft
        self._cd[request_id] = _Cd(mode, method.similarity_threshold, vocab, record)

    def cancel(self, request_id: str) -> None:
        super().cancel(request_id)
        self._cd.pop(request_id, None)

    def _finish_empty(self, row: _Row) -> BatchEvent:
        return self._event(row, True)

    def _step_rows(self) -> list[BatchEvent]:
        """One step for the rows in the batch now (the parent's `step` joins newcomers): the batch
        lookup, each row's input, one target pass, each row's outcome."""
        events: list[BatchEvent] = []
        asks = {r.request_id: q for r in self._rows if (q := self._query(r)) is not None}
        answers: dict[str, QueryResult] = {}
        future: Future | None = None
        if asks:
            entries = np.array([e for e, _ in asks.values()], dtype=np.int64)
            queries = torch.stack([h for _, h in asks.values()]).numpy()  # (B, d) float32
            for rid in asks:
                self._cd[rid].record.lookups += 1
            if self._pool is not None:
                future = self._pool.submit(self._call_lookup, entries, queries)
            else:
                answers = dict(zip(asks, self._call_lookup(entries, queries)))
        drafts: dict[str, Draft] = {}
        leaving: set[int] = set()
        for i, row in enumerate(self._rows):
            try:
                draft = self._before_pass(row, row.request_id in asks, answers.get(row.request_id))
            except Exception as e:  # one request's bad chunk must not stop the others
                draft, error = None, f"{type(e).__name__}: {e}"
            else:
                error = None
            if draft is None:  # finished (or failed) without needing the pass
                events.append(self._event(row, True, error))
                leaving.add(i)
            else:
                drafts[row.request_id] = draft
        self._drop(leaving)
        if not self._rows:
            return events
        start = self.cache_length
        logits, hidden = self._forward([drafts[r.request_id] for r in self._rows])
        if future is not None:
            answers = dict(zip(asks, future.result()))
        done: set[int] = set()
        for i, row in enumerate(self._rows):
            late = answers.get(row.request_id) if future is not None else None
            try:
                h = hidden[i] if hidden is not None else None
                event = self._after_pass(i, row, drafts[row.request_id], logits[i], h, start, late)
            except Exception as e:
                event = self._event(row, True, f"{type(e).__name__}: {e}")
            events.append(event)
            if event.finished:
                done.add(i)
        self._end_step(done)
        return events

    def _wants_hidden(self) -> bool:
        return super()._wants_hidden() or any(self._cd[r.request_id].mode == "paper" for r in self._rows)

    def _call_lookup(self, entries: np.ndarray, queries: np.ndarray) -> list[QueryResult]:
        """The step's one lookup call (on the worker thread when overlapping)."""
        started = time.perf_counter()
        answers = list(self.lookup(entries, queries))
        self.lookup_seconds += time.perf_counter() - started
        self.lookup_calls += 1
        if len(answers) != len(entries):
            raise DistilrayError(f"the batch lookup answered {len(answers)} of {len(entries)} queries")
        return answers

    def _query(self, row: _Row) -> tuple[int, torch.Tensor] | None:
        """What the row looks up this step: (entry token, hidden (d,)), or None."""
        cd = self._cd[row.request_id]
        if cd.mode == "paper":
            return None if cd.hidden is None else (cd.last, cd.hidden)
        if cd.mode == "verify" and cd.draft is None:
            asked = min(row.gamma, row.params.max_new_tokens - len(row.record.token_ids) - 1)  # as _propose
            return row.drafter.query(asked, row.target_hidden)
        return None

    def _before_pass(self, row: _Row, asked: bool, answer: QueryResult | None) -> Draft | None:
        """The row's draft for the pass (its `pending` set for it); None when it ends before the pass.

        answer: the lookup's answer when it is known already (no overlap), else None."""
        cd = self._cd[row.request_id]
        if cd.mode == "paper":
            if asked and answer is not None:
                return None if self._decide(row, cd, answer)[0] else Draft([])
            if asked:  # overlap: feed the token of a miss while the lookup runs
                generator = row.sampler.generator
                cd.rewind = None if generator is None else generator.get_state()
                row.pending = [row.sampler.sample(row.sampler.warp(cd.logits))]
            return Draft([])  # a guess, a chunk, or the prompt
        if cd.draft is not None:  # verify: the chunk found by the last step's late answer
            draft, cd.draft = cd.draft, None
            return draft
        if asked and answer is None:  # verify, overlap: no draft while the lookup runs
            return Draft([])
        if row.drafter is not None:
            row.drafter.answer = answer
        return _propose(row)

    def _after_pass(
        self,
        i: int,
        row: _Row,
        draft: Draft,
        logits: torch.Tensor,
        hidden: torch.Tensor | None,
        start: int,
        late: QueryResult | None,
    ) -> BatchEvent:
        """Row i's outcome of the pass (its columns from `start` on); late: overlap's answer for it."""
        cd = self._cd[row.request_id]
        if late is not None:  # overlap: the pass assumed a miss; a hit throws the row's share away
            if cd.mode == "verify":
                row.drafter.answer = late
                chunk = _propose(row)
                if chunk.tokens:
                    self._discard(i, start, cd)
                    cd.draft = chunk
                    return self._event(row, False)
            else:
                finished, hit = self._decide(row, cd, late, guessed=True)
                if hit or finished:  # a finished row needs no pass, as alone
                    self._discard(i, start, cd)
                    return self._event(row, finished)
        if cd.mode == "paper":  # the pass fed what the row emitted: the next query and fallback
            row.position += len(row.pending)
            cd.last, cd.logits, cd.hidden = row.pending[-1], logits[-1], hidden[-1]
            row.pending = []
            return self._event(row, False)
        event = self._settle(i, row, draft, logits, hidden, start)
        return self._event(row, event.finished, event.error)

    def _decide(self, row: _Row, cd: _Cd, answer: QueryResult, guessed: bool = False) -> tuple[bool, bool]:
        """One paper decision (note 3.5 steps 2-5): emit the chunk on a hit, else one sampled token (the
        one fed already when `guessed`); row.pending becomes what was emitted. Returns (finished, hit)."""
        params, record = row.params, cd.record
        chunk = query_chunk(lambda _t, _h: _found(answer), cd.last, cd.hidden, cd.threshold, cd.vocab)
        record.steps += 1
        if chunk:
            if cd.rewind is not None:  # the guessed token's draw never happened
                row.sampler.generator.set_state(cd.rewind)
            new = list(chunk[: params.max_new_tokens - len(record.token_ids)])
            record.chunks_used += 1
            row.record.drafted += len(new)
        elif guessed:
            new = row.pending
        else:
            new = [row.sampler.sample(row.sampler.warp(cd.logits))]
        cd.logits = cd.hidden = cd.rewind = None
        finished = False
        for n, token in enumerate(new, 1):
            if row.record.emit(token, params, drafted=bool(chunk)):
                finished, new = True, new[:n]
                break
        row.pending = new
        return finished, bool(chunk)

    def _discard(self, i: int, start: int, cd: _Cd) -> None:
        """Row i's columns of this pass become holes: the row is as if it had not been fed."""
        self._mask[i, start:] = False
        cd.record.discarded_passes += 1

    def _event(self, row: _Row, finished: bool, error: str | None = None) -> BatchEvent:
        """The row's event for this step, with its record brought up to date; a finished row's state goes."""
        cd = self._cd.pop(row.request_id) if finished else self._cd[row.request_id]
        record, spec = cd.record, row.record
        record.forward_passes = spec.target_passes - record.discarded_passes
        if cd.mode != "paper":  # verify and baseline: one step per pass (retrieval._from_spec)
            record.steps = record.forward_passes
        if cd.mode == "verify":
            record.chunks_used = row.drafter.chunks_used
        record.chunk_tokens_proposed, record.chunk_tokens_accepted = spec.drafted, spec.accepted
        record.seconds = time.perf_counter() - row.started
        new, cd.reported = record.token_ids[cd.reported :], len(record.token_ids)
        return BatchEvent(row.request_id, new, finished, record, error)


def _found(answer: QueryResult) -> tuple[tuple[int, ...], float] | None:
    """A batch answer in `Lookup` form (None for a miss)."""
    chunk, similarity = answer
    return None if chunk is None else (chunk, similarity)
