"""Continuous batching in a target replica: one thread runs a `BatchDecoder` (decoding/batched.py) step
after step, and requests join and leave at step boundaries.

The replica's event loop submits a request with a callback; the thread admits it when the batch has
room, steps every active row in one target pass, and hands each row's `BatchEvent` to its callback
(which must be thread-safe: the replica passes `loop.call_soon_threadsafe`). An idle thread that gets a
request waits up to `max_wait_s` for more, so a burst starts as one batch. A decoder step that raises
fails every row in flight with that error and the loop goes on with an empty batch: one bad step never
hangs a request.
"""

import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from distilray.decoding.batched import BatchDecoder, BatchEvent
from distilray.decoding.sampling import SamplingParams
from distilray.decoding.speculative import SpeculativeParams

Listener = Callable[["BatchEvent | BaseException"], None]


@dataclass
class BatchJob:
    """One request for the batch: what `BatchDecoder.add` takes, and where its events go."""

    request_id: str
    prompt_ids: list[int]
    params: SamplingParams
    listener: Listener
    drafter: Any = None  # a Drafter, or None for plain decoding
    method: SpeculativeParams = field(default_factory=SpeculativeParams)
    on_leave: Callable[[], None] | None = None  # called on the loop's thread once the row left the batch
    vocab_limit: int | None = None  # the tokenizer's length when the target's logits are padded past it


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
                    self._decoder.add(
                        job.request_id, job.prompt_ids, job.params, job.drafter, job.method, job.vocab_limit
                    )
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
