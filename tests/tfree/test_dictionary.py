"""The decoding dictionary: order, special words, patterns, saving (reference/tfree.md 5.1-5.2)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from distilray.errors import DistilrayError
from distilray.io_utils import OUTPUT_MARKER
from distilray.tfree.dictionary import Dictionary, build_dictionary, load_dictionary
from distilray.tfree.hashing import TrigramVocab, hasher_for
from distilray.tfree.wordsplit import SPECIAL_WORDS

VOCAB = TrigramVocab(v=64, m=3, k=1)
COUNTS = {"the": 10, "The": 4, "cat": 4, "sat": 7, "": 3, "<|endoftext|>": 5}


def test_order_and_special_words() -> None:
    d = build_dictionary(COUNTS, VOCAB)
    specials_without_count = sorted(set(SPECIAL_WORDS) - {"<|endoftext|>"})
    assert d.words == ["the", "sat", "<|endoftext|>", "The", "cat", *specials_without_count]  # ties by word
    assert d.counts.tolist() == [10, 7, 5, 4, 4] + [0] * 7
    assert "" not in d and len(d) == 12  # an empty word has no trigrams
    assert d.index("sat") == 1 and d.index("dog") == -1


def test_cut_keeps_special_words() -> None:
    d = build_dictionary(COUNTS, VOCAB, max_words=len(SPECIAL_WORDS) + 2)
    assert d.words[:3] == ["the", "sat", "<|endoftext|>"]
    assert set(SPECIAL_WORDS) <= set(d.words) and len(d) == 10  # "The" and "cat" were cut, no special word
    with pytest.raises(DistilrayError, match="max_words must be >= 8"):
        build_dictionary(COUNTS, VOCAB, max_words=3)
    with pytest.raises(DistilrayError, match="'dog'"):
        build_dictionary({"dog": -1}, VOCAB)


def test_patterns_and_edge_flags() -> None:
    d = build_dictionary(COUNTS, VOCAB)
    hasher = hasher_for(VOCAB)
    for i, word in enumerate(d.words):
        pattern = d.pattern(i)
        assert pattern.tolist() == hasher.word_pattern(word).tolist()
        inner, edge = hasher.edge_split(word)
        span = slice(d.indptr[i], d.indptr[i + 1])
        assert pattern[d.in_non_edge[span]].tolist() == inner.tolist()
        assert pattern[d.in_edge[span]].tolist() == edge.tolist()
        assert (d.in_non_edge[span] | d.in_edge[span]).all()
        assert d.n_w[i] == hasher.n_trigrams(word)
    assert d.n_w[d.index("the")] == 3 and d.n_w[d.index("<|ws|>")] == 1
    assert not d.in_edge[d.indptr[d.index("<|ws|>")] : d.indptr[d.index("<|ws|>") + 1]].any()


def test_with_more_words() -> None:
    d = build_dictionary(COUNTS, VOCAB)
    more = d.with_more_words(["dog", "the", "dog", "", "Sat"])
    assert more.words == d.words + ["dog", "Sat"] and more.counts[-2:].tolist() == [0, 0]
    assert more.pattern(more.index("Sat")).tolist() == hasher_for(VOCAB).word_pattern("Sat").tolist()
    assert more.pattern(0).tolist() == d.pattern(0).tolist() and len(d) == 12  # the original is unchanged
    assert d.with_more_words(["the"]) is d


def test_save_and_load(tmp_path) -> None:
    d = build_dictionary(COUNTS, VOCAB).with_more_words(["中文", "line\nbreak"])
    folder = tmp_path / "dictionary"
    d.save(folder)
    assert sorted(p.name for p in folder.iterdir()) == [OUTPUT_MARKER, "dictionary.json", "patterns.safetensors"]
    assert json.loads((folder / "dictionary.json").read_text())["vocab"] == {"v": 64, "m": 3, "k": 1}
    loaded = load_dictionary(folder, VOCAB)
    assert loaded.words == d.words and loaded.vocab == VOCAB
    for name in ("counts", "indptr", "indices", "in_non_edge", "in_edge", "n_w"):
        assert np.array_equal(getattr(loaded, name), getattr(d, name)), name
    d.save(folder)  # replacing an earlier dictionary is fine


def test_load_errors(tmp_path) -> None:
    d = build_dictionary(COUNTS, VOCAB)
    d.save(tmp_path / "d")
    with pytest.raises(DistilrayError, match=r"v=64, m=3, k=1.*v=64, m=3, k=0"):
        load_dictionary(tmp_path / "d", TrigramVocab(v=64, m=3, k=0))
    with pytest.raises(DistilrayError, match="dictionary.json is missing"):
        load_dictionary(tmp_path / "nothing")
    empty = np.empty(0, dtype=np.int64)
    Dictionary(
        [], empty, VOCAB, np.zeros(1, dtype=np.int64), empty, empty.astype(bool), empty.astype(bool), empty
    ).save(tmp_path / "empty")
    with pytest.raises(DistilrayError, match="is empty"):
        load_dictionary(tmp_path / "empty")
    (tmp_path / "d" / "patterns.safetensors").write_bytes(b"junk")
    with pytest.raises(DistilrayError, match="corrupt"):
        load_dictionary(tmp_path / "d")


def test_save_refuses_a_shared_folder(tmp_path) -> None:
    (tmp_path / "model.safetensors").write_bytes(b"weights")
    with pytest.raises(DistilrayError, match="model.safetensors"):
        build_dictionary(COUNTS, VOCAB).save(tmp_path)
    assert (tmp_path / "model.safetensors").read_bytes() == b"weights"


def test_inconsistent_arrays_are_rejected() -> None:
    d = build_dictionary(COUNTS, VOCAB)
    with pytest.raises(DistilrayError, match="disagree"):
        Dictionary(d.words[:-1], d.counts, VOCAB, d.indptr, d.indices, d.in_non_edge, d.in_edge, d.n_w)
    with pytest.raises(DistilrayError, match="outside"):
        Dictionary(d.words, d.counts, TrigramVocab(v=8, m=3), d.indptr, d.indices, d.in_non_edge, d.in_edge, d.n_w)
