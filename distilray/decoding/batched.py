"""Continuous batching for speculative and plain decoding: many requests, one target pass per step
(two in a step where requests join a batch already decoding).

A `BatchDecoder` owns one Hugging Face causal LM target and up to `max_batch_size` rows (requests).
Requests join (`add`) and leave (finished, `cancel`) between steps. Every `step` asks each row's
drafter for up to gamma tokens (sequentially, drafters are per-request objects), runs ONE batched
target forward pass over all rows, then applies per row exactly the rule of `_loop` in speculative.py:
accept left to right with min(1, p/q), correct a rejection from the residual, or add a bonus token from
p_{g+1}; each row with its own `Sampler` (its own seeded generator) and its own adaptive gamma. A row
without a drafter is plain decoding (gamma 0: each pass yields one token). Greedy output equals decoding
the request alone; a sampled row draws exactly the random numbers it would draw alone, so its output
does not depend on the batch around it (up to float rounding of the batched logits, ~1e-6).

Prefill: a joining row's whole prompt is its `pending` input of its first step, fed together with its
first drafts, exactly as `_loop` feeds prompt + drafts in its first pass. When rows are already
decoding, the newcomers take that first step in a pass of their own and their cache then joins the
batch's (`_merge`, holes padding the shorter side): fed with the others, a 32-token prompt would pad
every row's pass to 32 tokens, and a step of 8 rows (4.3M target) took 47 ms against 11; apart, 19.
Every row's record counts the passes its solo run would (V = passes it took part in).

KV cache design: ONE batched DynamicCache (B, heads, T, d) with a boolean column mask (B, T).
- Each pass appends N = max_r(pending_r + drafts_r) columns. A row's tokens are right-padded in that
  block, so every query (padding included) sees at least one real key: no all-masked softmax row, no NaN
  written into the cache.
- `position_ids` are per row (its own sequence positions), so a column's index never matters for
  positions: keys already carry their position (GPT-2 adds it at the input, Llama rotates keys before
  caching). Causality inside a block follows column order, which is the row's token order.
- Rejected drafts and padding stay in the cache as holes (mask 0) instead of being cropped; a joining
  row gets zero-filled entries masked 0 for the existing columns. Only the last columns, where every
  row has a hole, are cut off after each step (`_trim`): a lone row then keeps a cache without holes
  and its pass runs with no mask at all, at the cost of decoding alone (0.96x its time, from 0.91x).
- After a step, `_compact` gathers each row's real columns to the front (one gather per layer) when the
  cache holds more than max(2 L, L + compact_slack) columns, L the longest row: memory stays within
  about twice the live tokens. Finished and cancelled rows leave through index_select on the batch
  dimension. The column count may exceed the model's context (positions never do): nothing reads it.
The alternative, per-row caches padded and stacked into a batch every step, copies every row's whole
cache into a batch tensor on each step (and needs the same mask and position bookkeeping anyway); the
shared cache only appends (DynamicCache's cat) and pays a copy on a compaction or a change of rows.
Measured for the "small" preset's shapes (6 layers, 8 heads, d 64), 8 rows: padding and stacking the
per-row caches alone costs 4.6 ms per step at 64 cached tokens and 15 ms at 256, next to a 15 ms pass.

Step times measured on 2 shared CPU cores, one thread, float32, greedy, prompts of 10 tokens, 48 new
tokens per row, the prefill step left out ("tiny" and "small" GPT-2 presets, a 300-token vocabulary):

    target   rows  plain step   tokens/s   speculative step (its target pass)  tokens/s
    tiny     1      0.7 ms       1370       3.7 ms (0.9 ms)                      1280
    tiny     4      0.9 ms       4480      11.1 ms (1.2 ms)                      1450
    tiny     8      1.0 ms       7900      21.2 ms (1.4 ms)                      1510
    small    1      6.9 ms        144      16.6 ms (13.2 ms)                      283
    small    4     12.8 ms        313      31.9 ms (20.2 ms)                      571
    small    8     15.3 ms        524      49.4 ms (28.3 ms)                      679

(solo plain_decode: 0.77 and 7.2 ms per token; speculative rows draft gamma 4 with a tiny GPT-2.) The
batched pass costs little more than a lone one, so throughput grows almost with the rows; the
drafters, run one after another, are what a speculative step adds per row.

A drafter that raises (a remote drafter gone) ends only its own request: its event carries `error`.
Not thread-safe: one thread owns a decoder (a Serve replica's step loop). Encoder-decoder targets and
models whose caches are not plain DynamicLayers (sliding-window attention) are refused.
"""

from __future__ import annotations

import inspect
import time
from dataclasses import dataclass, field

import torch

from distilray.decoding.drafter_api import (
    Draft,
    Drafter,
    NextTokenDrafter,
    as_drafter,
    check_same_vocab,
    model_vocab_size,
)
from distilray.decoding.sampling import Sampler, SamplingParams, pad_columns, residual
from distilray.decoding.seq2seq import is_encoder_decoder
from distilray.decoding.speculative import SpecRecord, SpeculativeParams, check_drafter_context, check_request
from distilray.errors import DistilrayError

PAD_ID = 0  # the token fed in padding slots: any id in the vocabulary, its keys are masked out


@dataclass
class BatchEvent:
    """What one step produced for one request."""

    request_id: str
    new_tokens: list[int]  # emitted this step: an accepted block plus the correction or bonus token
    finished: bool
    record: SpecRecord  # the request's running record (target_passes: the passes this row took part in)
    error: str | None = None  # the row's drafter failed: the request ends here (finished is True)


@dataclass
class _Row:
    """One request in the batch: its decoding state and where its sequence stands in the cache."""

    request_id: str
    params: SamplingParams
    method: SpeculativeParams
    drafter: Drafter | None  # None: plain decoding
    sampler: Sampler
    prompt_len: int
    pending: list[int]  # emitted tokens not yet in the cache (the prompt before the first pass)
    gamma: int
    record: SpecRecord = field(default_factory=SpecRecord)
    position: int = 0  # tokens of the sequence in the cache: the position id of pending[0]
    target_hidden: torch.Tensor | None = None  # (d,) at the last kept position, for drafters that ask
    started: float = field(default_factory=time.perf_counter)


@dataclass(frozen=True)
class _Verdict:
    """The acceptance test of one row's draft."""

    tokens: list[int]  # emitted this step
    accepted: int  # k: drafts kept
    finished: bool


class BatchDecoder:
    """Continuous batching over one target: `add` requests, call `step` until they finish."""

    def __init__(self, model, max_batch_size: int = 8, compact_slack: int = 64) -> None:
        if max_batch_size < 1:
            raise DistilrayError(f"max_batch_size must be >= 1, got {max_batch_size}")
        if is_encoder_decoder(model):
            raise DistilrayError("batched decoding needs a causal LM target; encoder-decoder targets decode alone")
        self.model = model
        self.max_batch_size = max_batch_size
        self.compact_slack = compact_slack
        self.device = next(model.parameters()).device
        self.vocab_size = model_vocab_size(model)
        self.forward_passes = 0
        self._can_trim = "logits_to_keep" in inspect.signature(model.forward).parameters
        self._rows: list[_Row] = []  # in cache batch order
        self._waiting: list[_Row] = []  # added, joining at the next step
        self._cache = None  # DynamicCache (B, H, T, d), None while no pass has run
        self._mask = torch.zeros(0, 0, dtype=torch.bool, device=self.device)  # (B, T): real keys

    @property
    def active(self) -> int:
        """Requests in the decoder, joined or waiting to join."""
        return len(self._rows) + len(self._waiting)

    @property
    def has_room(self) -> bool:
        return self.active < self.max_batch_size

    @property
    def cache_length(self) -> int:
        """Columns in the batched cache (real keys and holes)."""
        return int(self._mask.shape[1])

    def add(
        self,
        request_id: str,
        prompt_ids: list[int],
        params: SamplingParams,
        drafter: Drafter | NextTokenDrafter | None = None,
        method: SpeculativeParams = SpeculativeParams(),
        vocab_limit: int | None = None,
    ) -> None:
        """Queue a request; it joins at the next step. drafter None: plain decoding. vocab_limit: the
        tokenizer's length when the target's logits are padded past it (as in speculative_decode)."""
        if not self.has_room:
            raise DistilrayError(f"the batch is full ({self.max_batch_size} requests)")
        if any(r.request_id == request_id for r in self._rows + self._waiting):
            raise DistilrayError(f"request {request_id!r} is already decoding")
        check_request(self.model, prompt_ids, params, vocab_limit=vocab_limit)
        prompt = [int(t) for t in prompt_ids]
        if drafter is not None:
            drafter = as_drafter(drafter)
            check_same_vocab(self.vocab_size, drafter, vocab_limit)
            check_drafter_context(drafter, prompt, params)
            drafter.start(prompt)
        sampler = Sampler(params, vocab_limit)
        row = _Row(request_id, params, method, drafter, sampler, len(prompt), prompt, method.first_gamma())
        self._waiting.append(row)

    def cancel(self, request_id: str) -> None:
        """Drop a request (its client is gone); unknown or finished ids are ignored."""
        self._waiting = [r for r in self._waiting if r.request_id != request_id]
        self._drop({i for i, r in enumerate(self._rows) if r.request_id == request_id})

    @torch.inference_mode()
    def step(self) -> list[BatchEvent]:
        """One step for every request: drafts, one batched target pass, verification. Finished rows leave.

        Requests that join while others decode take their first step in a pass of their own, then join
        the batch: fed with the others, a prompt would pad every row of the pass to its length (8 rows
        of a 4.3M model: 47 ms a step against 11). A newcomer alone thus makes exactly the first pass
        of decoding alone."""
        events = [self._finish_empty(r) for r in self._waiting if r.params.max_new_tokens == 0]
        joining = [r for r in self._waiting if r.params.max_new_tokens > 0]
        self._waiting = []
        if not (joining and self._rows):
            self._join(joining)
            return events + self._step_rows()
        batch = self._rows, self._mask, self._cache
        self._rows, self._mask, self._cache = [], self._mask.new_zeros((0, 0)), None
        self._join(joining)
        events += self._step_rows()
        newcomers = self._rows, self._mask, self._cache
        self._rows, self._mask, self._cache = batch
        events += self._step_rows()
        self._merge(*newcomers)
        return events

    def _step_rows(self) -> list[BatchEvent]:
        """Drafts, the pass and verification for the rows in the batch now."""
        events: list[BatchEvent] = []
        drafts: list[Draft] = []
        failed: set[int] = set()
        for i, row in enumerate(self._rows):
            try:
                drafts.append(_propose(row))
            except Exception as e:  # one request's drafter (maybe remote) must not stop the others
                events.append(_failed(row, e))
                drafts.append(Draft([]))
                failed.add(i)
        self._drop(failed)
        drafts = [d for i, d in enumerate(drafts) if i not in failed]
        if not self._rows:
            return events
        start = self.cache_length
        logits, hidden = self._forward(drafts)
        done: set[int] = set()
        for i, (row, draft) in enumerate(zip(self._rows, drafts)):
            event = self._settle(i, row, draft, logits[i], hidden[i] if hidden is not None else None, start)
            events.append(event)
            if event.finished:
                done.add(i)
        self._end_step(done)
        return events

    def _merge(self, rows: list[_Row], mask: torch.Tensor, cache) -> None:
        """Rows that stepped apart join the batch: both caches padded with holes to the same columns
        (each row's real columns keep their order, before every later one), then stacked."""
        if not rows:
            return
        if not self._rows:
            self._rows, self._mask, self._cache = rows, mask, cache
            return
        width = max(self.cache_length, mask.shape[1])
        for mine, theirs in zip(self._cache.layers, cache.layers):
            mine.keys = torch.cat([_widen(mine.keys, width), _widen(theirs.keys, width)], dim=0)
            mine.values = torch.cat([_widen(mine.values, width), _widen(theirs.values, width)], dim=0)
        self._mask = torch.cat([_widen(self._mask, width, dim=1), _widen(mask, width, dim=1)], dim=0)
        self._rows += rows
        self._compact()

    def _end_step(self, done: set[int]) -> None:
        """After a pass: finished rows leave, the columns no row uses go, and the holes are compacted."""
        self._drop(done)
        self._trim()
        self._compact()

    def _settle(
        self, i: int, row: _Row, draft: Draft, logits: torch.Tensor, hidden: torch.Tensor | None, start: int
    ) -> BatchEvent:
        """Row i after the pass that fed its pending tokens and draft from cache column `start` on: the
        acceptance test, rejected drafts masked out, the row advanced. (A seam for batched_retrieval.py,
        whose verify and baseline rows settle exactly as here.)"""
        verdict = _verify(row, draft, logits)
        fed = len(row.pending) + len(draft.tokens)
        kept = len(row.pending) + verdict.accepted
        self._mask[i, start + kept : start + fed] = False  # rejected drafts become holes
        error = None
        if not verdict.finished:
            try:
                _advance(row, verdict, kept, hidden)
            except Exception as e:
                error = f"{type(e).__name__}: {e}"
        row.record.seconds = time.perf_counter() - row.started
        return BatchEvent(row.request_id, verdict.tokens, verdict.finished or error is not None, row.record, error)

    def _finish_empty(self, row: _Row) -> BatchEvent:
        """A request for no tokens ends without a pass, as speculative_decode and plain_decode do."""
        row.record.seconds = time.perf_counter() - row.started
        return BatchEvent(row.request_id, [], True, row.record)

    def _join(self, rows: list[_Row]) -> None:
        """New rows enter the batch with every existing column masked out (zero keys and values)."""
        if not rows:
            return
        if self._cache is not None:
            for layer in self._cache.layers:
                layer.keys = _grow(layer.keys, len(rows))
                layer.values = _grow(layer.values, len(rows))
        self._mask = _grow(self._mask, len(rows))
        self._rows += rows

    def _drop(self, indices: set[int]) -> None:
        """Remove rows from the batch (their cache entries and mask rows)."""
        if not indices:
            return
        self._rows = [r for i, r in enumerate(self._rows) if i not in indices]
        if not self._rows:  # an empty batch starts over with a fresh cache
            self._cache = None
            self._mask = torch.zeros(0, 0, dtype=torch.bool, device=self.device)
            return
        keep = torch.tensor([i for i in range(len(self._mask)) if i not in indices], device=self.device)
        self._mask = self._mask.index_select(0, keep)
        if self._cache is not None:
            for layer in self._cache.layers:
                layer.keys = layer.keys.index_select(0, keep)
                layer.values = layer.values.index_select(0, keep)

    def _forward(self, drafts: list[Draft]) -> tuple[list[torch.Tensor], list[torch.Tensor] | None]:
        """The one batched pass: per row, the logits (g+1, V) float32 on the CPU of its last g+1 fed
        tokens, and (when a drafter asks) the final hidden states (g+1, d) at those positions."""
        feeds = [row.pending + draft.tokens for row, draft in zip(self._rows, drafts)]
        width = max(len(f) for f in feeds)
        # right padding: a row's tokens first, then padding that repeats its last position id
        ids = [f + [PAD_ID] * (width - len(f)) for f in feeds]
        pos = [[r.position + min(j, len(f) - 1) for j in range(width)] for r, f in zip(self._rows, feeds)]
        new = [[j < len(f) for j in range(width)] for f in feeds]
        keep = [[len(f) - len(d.tokens) - 1 <= j < len(f) for j in range(width)] for f, d in zip(feeds, drafts)]
        new_mask = torch.tensor(new, dtype=torch.bool, device=self.device)
        keep_mask = torch.tensor(keep, dtype=torch.bool, device=self.device)
        self._mask = torch.cat([self._mask, new_mask], dim=1)
        want_hidden = self._wants_hidden()
        # a boolean (B, N) logits_to_keep projects only the kept positions onto the vocabulary, flattened
        kwargs = {"logits_to_keep": keep_mask} if self._can_trim else {}
        # no holes and no padding (one row, say): no mask, the model's plain causal path, as decoding alone
        mask = None if bool(self._mask.all()) else self._mask.long()
        out = self.model(
            input_ids=torch.tensor(ids, dtype=torch.long, device=self.device),
            attention_mask=mask,
            position_ids=torch.tensor(pos, dtype=torch.long, device=self.device),
            past_key_values=self._cache,
            use_cache=True,
            output_hidden_states=want_hidden,
            **kwargs,
        )
        self._cache = out.past_key_values
        _check_cache(self._cache)
        self.forward_passes += 1
        for row in self._rows:
            row.record.target_passes += 1
        flat = out.logits if out.logits.dim() == 2 else out.logits[keep_mask]  # (sum of g+1, V)
        sizes = [len(d.tokens) + 1 for d in drafts]
        logits = list(flat.float().cpu().split(sizes))
        hidden = None
        if want_hidden:
            hidden = list(out.hidden_states[-1][keep_mask].float().cpu().split(sizes))
        return logits, hidden

    def _wants_hidden(self) -> bool:
        """Whether the pass must return final hidden states (a subclass with rows of its own may need them)."""
        return any(r.drafter is not None and r.drafter.needs_target_hidden for r in self._rows)

    def _trim(self) -> None:
        """Drop the last columns when they are holes in every row (a lone row's rejected drafts): the
        cache then stays free of holes wherever it can, as a crop keeps a lone decoder's."""
        if self._cache is None:
            return
        used = self._mask.any(dim=0).nonzero()
        length = int(used[-1]) + 1 if len(used) else 0
        if length == self.cache_length:
            return
        for layer in self._cache.layers:
            layer.keys = layer.keys[:, :, :length]
            layer.values = layer.values[:, :, :length]
        self._mask = self._mask[:, :length]

    def _compact(self) -> None:
        """Move every row's real columns to the front and drop the columns no row needs any more."""
        if self._cache is None:
            return
        real = self._mask.sum(dim=1)  # (B,)
        longest = int(real.max())
        if self.cache_length - longest <= max(self.compact_slack, longest):
            return
        # a stable sort on "is a hole" lists each row's real columns first, in their order
        order = torch.sort((~self._mask).to(torch.int8), dim=1, stable=True).indices[:, :longest]  # (B, L)
        for layer in self._cache.layers:
            index = order[:, None, :, None].expand(-1, layer.keys.shape[1], -1, layer.keys.shape[3])
            layer.keys = layer.keys.gather(2, index)
            layer.values = layer.values.gather(2, index)
        self._mask = torch.arange(longest, device=self.device)[None, :] < real[:, None]


def _propose(row: _Row) -> Draft:
    """The row's drafts for this step, never past its token budget (none for plain decoding)."""
    if row.drafter is None:
        return Draft([])
    asked = min(row.gamma, row.params.max_new_tokens - len(row.record.token_ids) - 1)
    draft = row.drafter.propose(asked, row.sampler, row.target_hidden)
    if len(draft.tokens) > asked:
        raise DistilrayError(f"the drafter proposed {len(draft.tokens)} tokens where at most {asked} were asked for")
    row.record.drafter_calls += len(draft.tokens)
    return draft


def _verify(row: _Row, draft: Draft, logits: torch.Tensor) -> _Verdict:
    """The speculative rule of `_loop` on one row: logits (g+1, V) of p_1..p_{g+1}. Emits into the record."""
    record, params, sampler = row.record, row.params, row.sampler
    g = len(draft.tokens)
    p_probs = sampler.warp(logits)  # (g+1, V), padded ids masked
    if draft.probs is not None:  # a drafter over the real tokens only gives the padded ids q = 0
        draft = Draft(draft.tokens, pad_columns(draft.probs, p_probs.shape[-1]))
    if row.drafter is not None:  # plain decoding keeps the draft counters at 0, as plain_decode does
        record.drafted += g
        record.gamma_history.append(g)
    k = 0
    while k < g and sampler.accept(p_probs[k], draft.tokens[k], draft.q(k)):
        k += 1
    emitted: list[int] = []
    for d in draft.tokens[:k]:
        emitted.append(d)
        if record.emit(d, params, drafted=True):
            return _Verdict(emitted, k, True)
    if k < g:
        record.rejections += 1
        y = sampler.sample(residual(p_probs[k], draft.q(k), draft.tokens[k]))
    else:
        y = sampler.sample(p_probs[g])  # bonus token (the one token of a plain step)
    row.gamma = row.method.next_gamma(row.gamma, g, k)
    emitted.append(y)
    return _Verdict(emitted, k, record.emit(y, params))


def _advance(row: _Row, verdict: _Verdict, kept: int, hidden: torch.Tensor | None) -> None:
    """After a step that did not finish: the kept tokens are in the cache, the last emitted one is fed next."""
    n_before = row.position + len(row.pending)  # the sequence length before this step's drafts
    row.position += kept
    row.pending = verdict.tokens[-1:]
    if row.drafter is not None:
        row.target_hidden = hidden[verdict.accepted] if hidden is not None else None
        row.drafter.rollback(n_before + verdict.accepted)
        row.drafter.push(row.pending)


def _failed(row: _Row, error: Exception) -> BatchEvent:
    """The last event of a request whose drafter failed before the pass (nothing new emitted)."""
    row.record.seconds = time.perf_counter() - row.started
    return BatchEvent(row.request_id, [], True, row.record, f"{type(error).__name__}: {error}")


def _grow(t: torch.Tensor, rows: int) -> torch.Tensor:
    """`t` with `rows` zero entries appended along the batch dimension."""
    return torch.cat([t, t.new_zeros((rows, *t.shape[1:]))], dim=0)


def _widen(t: torch.Tensor, width: int, dim: int = 2) -> torch.Tensor:
    """`t` with zero (hole) columns appended along `dim` up to `width`."""
    missing = width - t.shape[dim]
    if missing <= 0:
        return t
    shape = list(t.shape)
    shape[dim] = missing
    return torch.cat([t, t.new_zeros(shape)], dim=dim)


def _check_cache(cache) -> None:
    """The cache surgery here (grow, index_select, gather) assumes plain full-attention DynamicLayers."""
    layers = getattr(cache, "layers", None)
    if layers is None or any(type(layer).__name__ != "DynamicLayer" for layer in layers):
        raise DistilrayError(
            "batched decoding needs a DynamicCache of full-attention layers; this model's cache is "
            f"{type(cache).__name__}"
        )
