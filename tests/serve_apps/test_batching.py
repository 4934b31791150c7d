"""The replica's side of continuous batching: what reaches the event loop from the batch thread."""

from __future__ import annotations

from distilray.decoding.batched import BatchEvent
from distilray.serve_apps.batching import _at_the_end


def test_a_whole_answer_wakes_the_loop_once_with_every_token():
    posted: list = []
    listener = _at_the_end(posted.append)
    listener(BatchEvent("r", [1, 2], finished=False, record=None))
    listener(BatchEvent("r", [3], finished=False, record=None))
    assert posted == []  # nothing crosses to the event loop mid-answer
    listener(BatchEvent("r", [4, 5], finished=True, record=None))
    assert len(posted) == 1 and posted[0].finished and posted[0].new_tokens == [1, 2, 3, 4, 5]


def test_a_failure_reaches_the_loop_at_once():
    posted: list = []
    listener = _at_the_end(posted.append)
    listener(BatchEvent("r", [1], finished=False, record=None))
    boom = RuntimeError("step failed")
    listener(boom)
    assert posted == [boom]
    failed = BatchEvent("s", [], finished=True, record=None, error="drafter gone")
    _at_the_end(posted.append)(failed)
    assert posted[-1] is failed
