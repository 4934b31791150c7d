"""The replica's side of continuous batching: what reaches the event loop from the batch thread."""

from __future__ import annotations

from distilray.decoding.batched import BatchEvent
from distilray.serve_apps.batching import _coalescing


def test_a_whole_answer_wakes_the_loop_once_with_every_token():
    posted: list = []
    listener = _coalescing(posted.append, None)
    listener(BatchEvent("r", [1, 2], finished=False, record=None))
    listener(BatchEvent("r", [3], finished=False, record=None))
    assert posted == []  # nothing crosses to the event loop mid-answer
    listener(BatchEvent("r", [4, 5], finished=True, record=None))
    assert len(posted) == 1 and posted[0].finished and posted[0].new_tokens == [1, 2, 3, 4, 5]


def test_a_failure_reaches_the_loop_at_once():
    posted: list = []
    listener = _coalescing(posted.append, None)
    listener(BatchEvent("r", [1], finished=False, record=None))
    boom = RuntimeError("step failed")
    listener(boom)
    assert posted == [boom]
    failed = BatchEvent("s", [], finished=True, record=None, error="drafter gone")
    _coalescing(posted.append, None)(failed)
    assert posted[-1].error == "drafter gone" and posted[-1].finished


def test_a_stream_gets_its_first_tokens_at_once_then_at_most_one_post_per_interval(monkeypatch):
    clock = iter([0.0, 0.005, 0.012, 0.030, 0.034, 0.036])
    monkeypatch.setattr("distilray.serve_apps.batching.time.monotonic", lambda: next(clock))
    posted: list = []
    listener = _coalescing(posted.append, 0.02)
    for tokens in ([1], [2], [3], [4], [5]):  # at 0, 5, 12, 30 and 34 ms
        listener(BatchEvent("r", tokens, finished=False, record=None))
    listener(BatchEvent("r", [6], finished=True, record=None))  # at 36 ms: the end always goes
    assert [e.new_tokens for e in posted] == [[1], [2, 3, 4], [5, 6]]
    assert [e.finished for e in posted] == [False, False, True]
