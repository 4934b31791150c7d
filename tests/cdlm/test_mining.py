"""Chunk mining and the chunk trie on hand-made probability tables (no ray)."""

from __future__ import annotations

import numpy as np
import pytest

from distilray.cdlm.mining import Phrase, mine_window, mine_windows, overlap_skip
from distilray.cdlm.trie import ChunkTrie
from distilray.errors import DistilrayError


def _key(p: Phrase) -> tuple:
    return (p.entry_token, p.chunk, p.window_id, p.entry_pos, round(p.min_prob, 6))


def test_first_window_runs_suffixes_strict_threshold_and_window_end():
    ids = np.array([10, 11, 12, 13, 14, 15, 16, 17])
    # pos:            0    1    2    3    4    5    6    7
    probs = np.array([0.9, 0.2, 0.8, 0.7, 0.5, 0.6, 0.1, 0.95])
    got = [_key(p) for p in mine_window(ids, probs, threshold=0.5, skip=0, window_id=3)]
    assert got == [
        # run 2..3 -> phrase [11, 12, 13]: both suffixes of length >= 2, the full phrase first
        (11, (12, 13), 3, 1, 0.7),
        (12, (13,), 3, 2, 0.7),
        # 0.5 at position 4 is not above 0.5 (strict), so the run is 5..5 -> length-2 phrase kept
        (14, (15,), 3, 4, 0.6),
        # run reaching the window end
        (16, (17,), 3, 6, 0.95),
    ]


def test_first_window_run_starting_at_position_one_uses_token_zero():
    ids = np.array([5, 6, 7, 8])
    probs = np.array([0.99, 0.9, 0.8, 0.1])  # probs[0] has no context and never counts
    got = [_key(p) for p in mine_window(ids, probs, 0.5, skip=0, window_id=0)]
    assert got == [(5, (6, 7), 0, 0, 0.8), (6, (7,), 0, 1, 0.8)]


def test_long_run_yields_every_suffix_and_no_length_one_phrase():
    ids = np.arange(100, 106)
    probs = np.array([0.0, 0.1, 0.9, 0.8, 0.95, 0.7])  # run 2..5, phrase [101..105], L = 5
    phrases = mine_window(ids, probs, 0.5, skip=0, window_id=1)
    assert [(p.entry_token, p.chunk, p.entry_pos) for p in phrases] == [
        (101, (102, 103, 104, 105), 1),
        (102, (103, 104, 105), 2),
        (103, (104, 105), 3),
        (104, (105,), 4),
    ]
    assert [p.min_prob for p in phrases] == pytest.approx([0.7, 0.7, 0.7, 0.7])
    assert all(len(p.chunk) >= 1 for p in phrases)  # the length-1 suffix [105] is dropped


def test_min_prob_is_per_suffix_chunk():
    ids = np.array([1, 2, 3, 4])
    probs = np.array([0.0, 0.6, 0.99, 0.98])
    got = [(p.chunk, p.min_prob) for p in mine_window(ids, probs, 0.5, 0, 0)]
    assert got == [((2, 3, 4), pytest.approx(0.6)), ((3, 4), pytest.approx(0.98)), ((4,), pytest.approx(0.98))]


def test_two_runs_in_one_window():
    ids = np.array([1, 2, 3, 4, 5, 6, 7])
    probs = np.array([0.1, 0.9, 0.9, 0.2, 0.3, 0.9, 0.4])
    got = [(p.entry_token, p.chunk, p.entry_pos) for p in mine_window(ids, probs, 0.5, 0, 0)]
    assert got == [(1, (2, 3), 0), (2, (3,), 1), (5, (6,), 4)]


def test_skip_ignores_overlap_but_takes_entry_token_from_it():
    ids = np.arange(100, 110)
    # pos:            0    1    2    3    4    5    6    7    8    9
    probs = np.array([0.1, 0.1, 0.9, 0.9, 0.9, 0.9, 0.1, 0.3, 0.8, 0.1])
    got = [_key(p) for p in mine_window(ids, probs, 0.5, skip=4, window_id=7)]
    assert got == [
        # the run is cut at the skip: it starts at 4 and its entry token is x_3 from the overlap
        (103, (104, 105), 7, 3, 0.9),
        (104, (105,), 7, 4, 0.9),
        (107, (108,), 7, 7, 0.8),
    ]
    # nothing is mined inside the overlap itself
    assert all(p.entry_pos >= 3 for p in mine_window(ids, probs, 0.5, 4, 7))


def test_run_only_inside_overlap_is_ignored_and_large_skip_gives_nothing():
    ids = np.arange(6)
    probs = np.array([0.1, 0.9, 0.9, 0.1, 0.1, 0.1])
    assert mine_window(ids, probs, 0.5, skip=3, window_id=0) == []
    assert mine_window(ids, np.full(6, 0.9), 0.5, skip=10, window_id=0) == []


def test_overlap_skip_and_mine_windows():
    assert overlap_skip(512, 448) == 64
    assert overlap_skip(8, 8) == 0
    for window, stride in [(0, 1), (8, 0), (8, 9)]:
        with pytest.raises(DistilrayError):
            overlap_skip(window, stride)
    skip = overlap_skip(6, 4)
    windows = [
        (0, np.array([1, 2, 3, 4, 5, 6]), np.array([0.0, 0.9, 0.1, 0.1, 0.1, 0.1]), 0),
        (1, np.array([5, 6, 7, 8, 9, 10]), np.array([0.0, 0.9, 0.9, 0.1, 0.1, 0.1]), skip),
    ]
    got = [(p.window_id, p.entry_token, p.chunk, p.entry_pos) for p in mine_windows(windows, 0.5)]
    # window 1: the run 1..2 lies in the overlap except position 2, which takes entry x_1 = 6
    assert got == [(0, 1, (2,), 0), (1, 6, (7,), 1)]


def test_mining_validation_errors():
    ids, probs = np.arange(4), np.full(4, 0.9)
    for bad in (0.0, 1.0, 1.5, -0.1):
        with pytest.raises(DistilrayError, match="threshold"):
            mine_window(ids, probs, bad, 0, 0)
    with pytest.raises(DistilrayError, match="same length"):
        mine_window(ids, probs[:3], 0.5, 0, 0)
    with pytest.raises(DistilrayError, match="1-D"):
        mine_window(ids.reshape(2, 2), probs.reshape(2, 2), 0.5, 0, 0)
    with pytest.raises(DistilrayError, match="integers"):
        mine_window(ids.astype(float), probs, 0.5, 0, 0)
    with pytest.raises(DistilrayError, match="skip"):
        mine_window(ids, probs, 0.5, -1, 0)
    with pytest.raises(DistilrayError, match="NaN"):
        mine_window(ids, np.array([0.1, np.nan, 0.9, 0.9]), 0.5, 0, 0)


# -- trie ---------------------------------------------------------------------------------------


def _ph(entry: int, chunk: tuple[int, ...], window: int, pos: int) -> Phrase:
    return Phrase(entry_token=entry, chunk=chunk, window_id=window, entry_pos=pos, min_prob=0.9)


def test_identical_phrases_from_two_windows_share_a_node():
    ids = np.array([1, 2, 3, 4])
    probs = np.array([0.0, 0.9, 0.9, 0.1])
    trie = ChunkTrie()
    trie.insert_many(mine_windows([(0, ids, probs, 0), (1, ids, probs, 0)], 0.5))
    assert trie.entry_tokens() == [1, 2]
    assert trie.chunks_for(1) == [(2, 3)]
    assert trie.chunks_for(2) == [(3,)]
    assert trie.occurrences(1, (2, 3)) == [(0, 0), (1, 0)]
    assert trie.occurrences(2, (3,)) == [(0, 1), (1, 1)]
    assert trie.num_chunks() == 2
    assert trie.num_occurrences() == 4
    assert trie.mean_chunk_length() == pytest.approx(1.5)


def test_distinct_chunks_under_one_entry_and_prefix_nodes():
    trie = ChunkTrie()
    for p in [_ph(5, (9,), 0, 1), _ph(5, (6, 7), 0, 3), _ph(5, (6,), 2, 8), _ph(4, (1,), 1, 0)]:
        trie.insert(p)
    assert trie.entry_tokens() == [4, 5]
    assert 5 in trie and 3 not in trie
    assert trie.chunks_for(5) == [(6,), (6, 7), (9,)]  # lexicographic, a prefix before its extensions
    assert trie.occurrences(5, (6,)) == [(2, 8)]
    assert trie.occurrences(5, (6, 7)) == [(0, 3)]
    assert trie.occurrences(5, (7,)) == []
    assert trie.occurrences(3, (1,)) == []
    assert trie.chunks_for(3) == []
    assert trie.num_chunks() == 4
    assert trie.mean_chunk_length() == pytest.approx(5 / 4)
    with pytest.raises(DistilrayError, match="empty chunk"):
        trie.insert(_ph(5, (), 0, 0))


def test_flatten_rows_aligned_and_capped():
    trie = ChunkTrie()
    occ = [_ph(5, (6, 7), w, 10 + w) for w in range(4)] + [_ph(5, (9,), 7, 2), _ph(5, (6,), 8, 3)]
    trie.insert_many(occ)
    index, chunks, positions = trie.flatten(5)
    assert chunks == [(6,), (6, 7), (9,)]
    assert index.dtype == np.int64 and positions.dtype == np.int64
    assert index.tolist() == [0, 1, 1, 1, 1, 2]
    assert positions.tolist() == [[8, 3], [0, 10], [1, 11], [2, 12], [3, 13], [7, 2]]
    for r in range(len(index)):  # every row is an occurrence of the chunk it points at
        assert tuple(positions[r]) in trie.occurrences(5, chunks[index[r]])

    index, chunks, positions = trie.flatten(5, max_keys_per_chunk=2)
    assert index.tolist() == [0, 1, 1, 2]
    assert positions.tolist() == [[8, 3], [0, 10], [1, 11], [7, 2]]  # the first occurrences are kept

    index, chunks, positions = trie.flatten(42)
    assert index.shape == (0,) and chunks == [] and positions.shape == (0, 2)
    with pytest.raises(DistilrayError, match="max_keys_per_chunk"):
        trie.flatten(5, max_keys_per_chunk=0)
