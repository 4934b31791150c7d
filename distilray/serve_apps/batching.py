"""Continuous batching in a target replica: one thread runs a `BatchDecoder` (decoding/batched.py) step
after step, and requests join and leave at step boundaries.

The replica's event loop submits a request with a callback; the thread admits it when the batch has
room, steps every active row in one target pass, and hands each row's `BatchEvent` to its callback
(which must be thread-safe: the replica passes `loop.call_soon_threadsafe`). An idle thread that gets a
request waits up to `max_wait_s` for more, so a burst starts as one batch. A decoder step that raises
fails every row in flight with that error and the loop goes on with an empty batch: one bad step never
hangs a request.
"""

import asyncio
import dataclasses
import math
import threading
import time
import uuid
from collections import deque
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

from distilray.decoding.batched import BatchDecoder, BatchEvent
from distilray.decoding.sampling import SamplingParams
from distilray.errors import DistilrayError
from distilray.serve_apps.schemas import GenerationFailure, TextDelta
from distilray.serve_apps.text_output import TextStream

Listener = Callable[["BatchEvent | BaseException"], None]


@dataclass
class BatchJob:
    """One request for the batch: what the decoder's `add` takes, and where its events go."""

    request_id: str
    prompt_ids: list[int]
    params: SamplingParams
    listener: Listener
    # the rest of add's keywords: drafter, method (SpeculativeParams / RetrievalParams), vocab_limit
    options: dict[str, Any] = field(default_factory=dict)
    on_leave: Callable[[], None] | None = None  # called on the loop's thread once the row left the batch


class BatchLoop:
    """Owns a `BatchDecoder` and the one thread that steps it."""

    def __init__(self, decoder: BatchDecoder, max_wait_s: float = 0.0) -> None:
        self._decoder, self._max_wait_s = decoder, max_wait_s
        self._pending: deque[BatchJob] = deque()
        self._cancelled: set[str] = set()
        self._rows: dict[str, BatchJob] = {}  # requests in the decoder
        self._cond = threading.Condition()
        self.steps = self.rows_stepped = 0  # batch occupancy = rows_stepped / steps
        threading.Thread(target=self._run, daemon=True, name="batch-decode").start()

    def submit(self, job: BatchJob) -> None:
        with self._cond:
            self._pending.append(job)
            self._cond.notify()

    def cancel(self, request_id: str) -> None:
        """Drop a request (its client left): it leaves the batch at the next step boundary."""
        with self._cond:
            self._cancelled.add(request_id)
            self._cond.notify()

    def stats(self) -> dict[str, Any]:
        return {
            "active": self._decoder.active,
            "waiting": len(self._pending),
            "steps": self.steps,
            "mean_batch": self.rows_stepped / self.steps if self.steps else None,
        }

    def _take(self) -> tuple[list[BatchJob], set[str]]:
        """Block until there is work; then the jobs that fit the batch, and the cancellations."""
        with self._cond:
            while not self._pending and not self._rows and not self._cancelled:
                self._cond.wait()
            if not self._rows and self._max_wait_s > 0:  # idle: let a burst gather into one batch
                deadline = time.monotonic() + self._max_wait_s
                while len(self._pending) < self._decoder.max_batch_size and (left := deadline - time.monotonic()) > 0:
                    self._cond.wait(left)
            cancelled, self._cancelled = self._cancelled, set()
            room = self._decoder.max_batch_size - self._decoder.active
            jobs = []
            while self._pending and len(jobs) < room:
                job = self._pending.popleft()
                if job.request_id in cancelled:
                    cancelled.discard(job.request_id)
                else:
                    jobs.append(job)
            return jobs, cancelled

    def _leave(self, request_id: str) -> BatchJob | None:
        """Forget a row; its drafter is released here, on the thread that drives it."""
        job = self._rows.pop(request_id, None)
        if job is not None and job.on_leave is not None:
            try:
                job.on_leave()
            except Exception:  # a drafter session already gone: nothing left to release
                pass
        return job

    def _run(self) -> None:
        while True:
            jobs, cancelled = self._take()
            for request_id in cancelled:
                if request_id in self._rows:
                    self._decoder.cancel(request_id)
                    self._leave(request_id)
            for job in jobs:
                try:
                    self._decoder.add(job.request_id, job.prompt_ids, job.params, **job.options)
                except Exception as exc:  # a request the decoder refuses fails alone
                    job.listener(exc)
                    if job.on_leave is not None:
                        job.on_leave()
                else:
                    self._rows[job.request_id] = job
            if not self._rows:
                continue
            rows = self._decoder.active
            try:
                events = self._decoder.step()
            except Exception as exc:  # every row in flight fails with it; the loop serves on
                for request_id in list(self._rows):
                    self._decoder.cancel(request_id)
                    self._leave(request_id).listener(exc)
                continue
            self.steps += 1
            self.rows_stepped += rows
            for event in events:
                job = self._leave(event.request_id) if event.finished else self._rows.get(event.request_id)
                if job is not None:
                    job.listener(event)


def hand_over_interval(stream: bool, stop: list[str], stream_interval_ms: float) -> float | None:
    """decode_text's `interval_s` for a request: a stream at the app's interval, a whole answer once at
    the end unless a stop string must be watched for."""
    return stream_interval_ms / 1000 if stream or stop else None


def _coalescing(post: Listener, interval_s: float | None) -> Listener:
    """A listener that holds a row's tokens on the batch thread and posts them together: with
    `interval_s`, the first step's at once (time to first token), then at most one post per interval;
    with None, one post when the row ends. The last tokens and a failure are always posted."""
    held: list[int] = []
    last_post = -math.inf

    def listener(event: BatchEvent | BaseException) -> None:
        nonlocal last_post
        if isinstance(event, BaseException):
            post(event)
            return
        held.extend(event.new_tokens)
        now = time.monotonic()
        if event.finished or (interval_s is not None and now - last_post >= interval_s):
            post(dataclasses.replace(event, new_tokens=held.copy()))
            held.clear()
            last_post = now

    return listener


async def decode_text(
    batch: BatchLoop,
    prompt_ids: list[int],
    params: SamplingParams,
    options: dict[str, Any],
    text: TextStream,
    on_leave: Callable[[], None] | None = None,
    interval_s: float | None = 0.0,
) -> AsyncIterator[TextDelta | GenerationFailure | BatchEvent]:
    """One request through the batch, on the replica's event loop: a TextDelta per piece of text that
    became final, then the row's last BatchEvent (its record); or a GenerationFailure and nothing more.

    Every event queued by the time the consumer looks is taken as one piece: under load a stream sends
    fewer, larger pieces instead of falling behind one hop per step. A stop string, or a consumer that
    leaves (client disconnect), takes the row out of the batch at the next step (a stop string is seen
    when the text reaches this loop). The batch thread hands this loop a row's tokens at most once per
    `interval_s` (0: every step; None: once, at the end, for a whole answer with no stop string to
    watch): every hand-over wakes this loop, which takes the interpreter lock from the batch thread in
    the middle of its steps.
    """
    loop = asyncio.get_running_loop()
    events: asyncio.Queue = asyncio.Queue()
    request_id = uuid.uuid4().hex

    def post(event: BatchEvent | BaseException) -> None:
        loop.call_soon_threadsafe(events.put_nowait, event)

    listener = post if interval_s == 0 else _coalescing(post, interval_s)
    job = BatchJob(request_id, prompt_ids, params, listener, options, on_leave)
    batch.submit(job)
    done = False
    try:
        while not done:
            pending = [await events.get()]
            while not events.empty():
                pending.append(events.get_nowait())
            tokens: list[int] = []
            for event in pending:
                if isinstance(event, BaseException):
                    done = True
                    status = 400 if isinstance(event, DistilrayError) else 500
                    yield GenerationFailure(status=status, message=f"{type(event).__name__}: {event}")
                    return
                if event.error is not None:  # this request alone failed (e.g. its drafter); the batch went on
                    done = True
                    yield GenerationFailure(status=500, message=f"decoding failed: {event.error}")
                    return
                tokens += event.new_tokens
                done, last = event.finished, event
            delta = text.add(tokens)
            if text.stopped and not done:
                batch.cancel(request_id)  # the stop string came: the rest is not wanted
                done = True
            if delta:
                yield TextDelta(text=delta, tokens=len(tokens))
        if rest := text.rest():
            yield TextDelta(text=rest, tokens=0)
        yield last
    finally:
        if not done:
            batch.cancel(request_id)
