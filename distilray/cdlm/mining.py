"""Chunk mining: turn per-token probabilities of scored windows into phrases (reference note 3.3).

A *run* is a maximal span of window positions s..e whose probabilities p(x_i | x_<i) are all strictly
above the threshold gamma. The *phrase* of a run is [x_{s-1}, x_s, ..., x_e]: the token before the
run is its entry token. Every suffix of the phrase with at least two tokens is recorded on its own,
so a chunk can also be retrieved from the middle of a confident span.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable

import numpy as np

from distilray.errors import DistilrayError


@dataclass(frozen=True)
class Phrase:
    """One mined (sub)phrase occurrence.

    entry_token: the token before the chunk; the datastore key is the hidden state at this position.
    chunk: the tokens after the entry token (length >= 1), what retrieval appends.
    window_id: the scored window the phrase was found in.
    entry_pos: index of the entry token inside that window.
    min_prob: the lowest p(x_i | x_<i) among the chunk's tokens (all > threshold by construction).
    """

    entry_token: int
    chunk: tuple[int, ...]
    window_id: int
    entry_pos: int
    min_prob: float


def overlap_skip(window: int, stride: int) -> int:
    """Positions of each window already covered by the previous one: `window - stride`.

    Derived from the window settings rather than a constant (note 8.11: 64 only fits 512/448).
    """
    window, stride = int(window), int(stride)
    if window <= 0:
        raise DistilrayError(f"window must be a positive number of tokens, got {window}")
    if stride <= 0 or stride > window:
        raise DistilrayError(f"stride must be in 1..window ({window}), got {stride}")
    return window - stride


def _check_threshold(threshold: float) -> float:
    threshold = float(threshold)
    if not 0.0 < threshold < 1.0:
        raise DistilrayError(f"token-probability threshold must be in (0, 1), got {threshold}")
    return threshold


def _find_runs(above: np.ndarray) -> list[tuple[int, int]]:
    """Maximal spans of True in a boolean vector, as inclusive (start, end) pairs."""
    padded = np.concatenate(([False], above, [False])).astype(np.int8)
    edges = np.diff(padded)  # +1 where a run starts, -1 one past where it ends
    starts = np.flatnonzero(edges == 1)
    ends = np.flatnonzero(edges == -1) - 1
    return list(zip(starts.tolist(), ends.tolist()))


def mine_window(token_ids: np.ndarray, probs: np.ndarray, threshold: float, skip: int, window_id: int) -> list[Phrase]:
    """Mine every phrase suffix of one window.

    token_ids: (T,) integer token ids of the window.
    probs: (T,) p(x_i | x_<i) within the window; probs[0] has no context and never counts as confident.
    threshold: gamma in (0, 1); a token is confident when its probability is strictly above it.
    skip: positions < skip belong to the overlap with the previous window and are not mined (0 for a
        passage's first window). A run may start at `skip` and then takes its entry token from
        position skip - 1 inside the overlap (the note's "cleaner rule"), so no run loses its entry.
    window_id: recorded in every Phrase.

    Returns the phrases ordered by run, then by suffix start (longest suffix first).
    """
    threshold = _check_threshold(threshold)
    ids = np.asarray(token_ids)
    p = np.asarray(probs, dtype=np.float64)
    if ids.ndim != 1 or p.ndim != 1:
        raise DistilrayError(f"token_ids and probs must be 1-D, got shapes {ids.shape} and {p.shape}")
    if ids.shape != p.shape:
        raise DistilrayError(f"token_ids {ids.shape} and probs {p.shape} must have the same length")
    if ids.size and not np.issubdtype(ids.dtype, np.integer):
        raise DistilrayError(f"token_ids must be integers, got dtype {ids.dtype}")
    if np.isnan(p).any():
        raise DistilrayError(f"probs of window {window_id} contain NaN")
    skip = int(skip)
    if skip < 0:
        raise DistilrayError(f"skip must be >= 0, got {skip}")

    # A run needs an entry token before it, hence position 0 is never part of a run.
    first = max(skip, 1)
    above = p > threshold
    above[:first] = False
    tokens = ids.tolist()
    phrases: list[Phrase] = []
    for s, e in _find_runs(above):
        entry = s - 1  # the token before the run; inside the overlap when s == skip > 0
        length = e - entry + 1  # phrase length L = run length + 1 >= 2
        # Suffix j starts at entry + j; its chunk is positions entry+j+1..e.
        # min over each chunk, computed from the right so the loop stays linear.
        suffix_min = np.minimum.accumulate(p[s : e + 1][::-1])[::-1]  # suffix_min[k] = min p[s+k..e]
        for j in range(length - 1):
            pos = entry + j
            phrases.append(
                Phrase(
                    entry_token=int(tokens[pos]),
                    chunk=tuple(int(t) for t in tokens[pos + 1 : e + 1]),
                    window_id=int(window_id),
                    entry_pos=pos,
                    min_prob=float(suffix_min[j]),
                )
            )
    return phrases


def mine_windows(windows: Iterable[tuple[int, np.ndarray, np.ndarray, int]], threshold: float) -> list[Phrase]:
    """Mine a sequence of (window_id, token_ids (T,), probs (T,), skip) tuples; phrases in input order."""
    threshold = _check_threshold(threshold)
    phrases: list[Phrase] = []
    for window_id, ids, probs, skip in windows:
        phrases.extend(mine_window(ids, probs, threshold, skip, window_id))
    return phrases
