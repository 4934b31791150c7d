"""Fertility and duplicate metrics (reference/tfree.md section 7)."""

from __future__ import annotations

import numpy as np
import pytest

from distilray.errors import DistilrayError
from distilray.tfree.dictionary import Dictionary, build_dictionary
from distilray.tfree.hashing import TrigramVocab
from distilray.tfree.metrics import (
    duplicate_share,
    fertility,
    hf_vocabulary,
    pattern_duplicates,
    reference_words,
    tfree_duplicates,
)
from distilray.tfree.wordsplit import split_words


def test_reference_words() -> None:
    assert reference_words("Hello, world!  It's 2024_x.\n") == [
        "Hello", ",", "world", "!", "It", "'", "s", "2024", "_", "x", ".",
    ]  # fmt: skip
    assert reference_words("Straße 中文 é") == ["Straße", "中文", "é"]


def test_fertility() -> None:
    # "In 2024" -> In <|ws|> 2 0 2 4: six T-Free items over two reference words
    assert fertility(split_words, ["In 2024"]) == 3.0
    assert fertility(split_words, ["Hello world.", "The cat"]) == 5 / 5
    assert fertility(str.split, ["a b", "c"]) == 1.0
    with pytest.raises(DistilrayError, match="at least one word"):
        fertility(split_words, ["  ", ""])


def test_duplicate_share() -> None:
    vocabulary = ["the", "The", "Ġthe", "▁cat", "cat", "1", "2", "12", "Ġ12", "34", "dog"]
    # cap: the, The; space: the, Ġthe, ▁cat, cat, 12, Ġ12; digits: 12, Ġ12 (34: no "3" alone)
    shares = duplicate_share(vocabulary)
    assert shares == pytest.approx({"cap": 200 / 11, "space": 600 / 11, "digits": 200 / 11, "total": 700 / 11})
    assert duplicate_share(["a", "b", "1"]) == {"cap": 0.0, "space": 0.0, "digits": 0.0, "total": 0.0}
    with pytest.raises(DistilrayError, match="non-empty"):
        duplicate_share([])


def test_hf_vocabulary() -> None:
    class FakeTokenizer:
        tokens = ["<s>", "Ġthe", "the"]

        def __len__(self) -> int:
            return len(self.tokens)

        def convert_ids_to_tokens(self, ids: list[int]) -> list[str]:
            return [self.tokens[i] for i in ids]

    assert hf_vocabulary(FakeTokenizer()) == ["<s>", "Ġthe", "the"]


def test_tfree_duplicates() -> None:
    assert tfree_duplicates() == {"cap": 0.0, "space": 0.0, "digits": 0.0, "total": 0.0}
    d = build_dictionary({"The": 2, "the": 1}, TrigramVocab(v=64, m=3, k=2))
    assert pattern_duplicates(d)["count"] == 0  # case is kept: "The" and "the" differ


def test_pattern_duplicates() -> None:
    vocab = TrigramVocab(v=16, m=2)
    indices = np.array([1, 3, 2, 1, 3], dtype=np.int64)  # words 0 and 2 share the pattern {1, 3}
    flags = np.ones(5, dtype=bool)
    d = Dictionary(
        ["a", "b", "c"], np.zeros(3, dtype=np.int64), vocab, np.array([0, 2, 3, 5]), indices, flags, ~flags,
        np.ones(3, dtype=np.int64),
    )  # fmt: skip
    assert pattern_duplicates(d) == {"total": pytest.approx(200 / 3), "count": 2, "words": 3}
