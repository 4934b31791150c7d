"""Trigram hashing against the repository's md5 scheme (reference/tfree.md section 3, pitfalls 1-3, 9)."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from collections import Counter

import numpy as np
import pytest

from distilray.errors import DistilrayError
from distilray.tfree.hashing import TrigramHasher, TrigramVocab, hasher_for, word_trigrams


def md5_rows(trigram: bytes, v: int, m: int) -> list[int]:
    """The table rule, written from the reference text: id = b0 + 256 b1 + 65536 b2; slot s takes the
    first md5(f"{id}_{s}_{j}") mod v not taken yet; the m rows are sorted."""
    trigram_id = trigram[0] + 256 * trigram[1] + 65536 * trigram[2]
    taken: list[int] = []
    for slot in range(m):
        j = 0
        while True:
            candidate = int(hashlib.md5(f"{trigram_id}_{slot}_{j}".encode()).hexdigest(), 16) % v
            j += 1
            if candidate not in taken:
                taken.append(candidate)
                break
    return sorted(taken)


def test_word_trigrams() -> None:
    assert word_trigrams("Hello") == [b" He", b"Hel", b"ell", b"llo", b"lo "]
    assert word_trigrams("aaaa") == [b" aa", b"aaa", b"aa "]  # a set: the repeated window once
    assert word_trigrams("é") == [b" \xc3\xa9", b"\xc3\xa9 "]  # multi-byte characters are split
    assert word_trigrams("") == []
    for word in ["Hello", "aaaa", "é", "中文", "x"]:
        assert len(word_trigrams(word)) <= len(word.encode())


def test_md5_pins() -> None:
    plain = TrigramHasher(TrigramVocab(v=32000, m=10, k=0))
    shared = TrigramHasher(TrigramVocab(v=32000, m=10, k=2))
    # literal values guard against the test helper and the code drifting together
    assert plain.trigram_rows(b" He") == (3605, 6000, 6940, 8764, 13910, 15616, 17701, 22257, 26238, 29911)
    assert shared.trigram_rows(b" He") == (3605, 6000, 6940, 8764, 13910, 15616, 17701, 22257, 22896, 29430)
    for tri in [b" He", b"Hel", b"he ", b"\xc3\xa9 ", b"123"]:
        assert list(plain.trigram_rows(tri)) == md5_rows(tri, 32000, 10)
    for upper, lower in [(b" He", b" he"), (b"Hel", b"hel"), (b"HEL", b"hel"), (b"A b", b"a b")]:
        expected = md5_rows(upper, 32000, 10)[:8] + md5_rows(lower, 32000, 10)[8:]
        assert list(shared.trigram_rows(upper)) == expected
        assert shared.trigram_rows(upper)[-2:] == shared.trigram_rows(lower)[-2:]
        assert list(shared.trigram_rows(lower)) == md5_rows(lower, 32000, 10)  # lowercase rows unchanged


def test_m_distinct_sorted_rows_without_sharing() -> None:
    for vocab in [TrigramVocab(v=32000, m=10), TrigramVocab(v=12, m=10), TrigramVocab(v=10, m=10)]:
        hasher = TrigramHasher(vocab)
        for word in ["Hello", "World", "中文", "x9_"]:
            for tri in word_trigrams(word):
                rows = hasher.trigram_rows(tri)
                assert len(set(rows)) == vocab.m and list(rows) == sorted(rows)
                assert 0 <= min(rows) and max(rows) < vocab.v
    assert TrigramHasher(TrigramVocab(v=10, m=10)).trigram_rows(b"abc") == tuple(range(10))


def test_lowercase_sharing_multiplicities() -> None:
    hasher = TrigramHasher(TrigramVocab(v=16, m=10, k=2))  # small v: shared rows often repeat
    repeats = 0
    for word in ["The", "Hello", "WORLD", "Alice", "Bob", "Zebra", "QUICK", "Fox"]:
        for tri in word_trigrams(word):
            rows = hasher.trigram_rows(tri)
            assert len(rows) == 10
            if tri == tri.lower():
                assert len(set(rows)) == 10
                continue
            own, low = hasher._base_rows(tri), hasher._base_rows(tri.lower())
            assert rows == own[:8] + low[8:]
            assert Counter(rows) == Counter(own[:8]) + Counter(low[8:])
            repeats += len(rows) - len(set(rows))
    assert repeats > 0  # pitfall 3 is exercised: some row holds a repeated index


def test_no_sharing_outside_ascii_letters() -> None:
    hasher = TrigramHasher(TrigramVocab(v=32000, m=10, k=2))
    for tri in ["É".encode()[:1] + b"Ab", b"A1 ", b"A-b", b"\xc3\x89 "]:  # pitfall 9: ASCII letters only
        assert list(hasher.trigram_rows(tri)) == md5_rows(tri, 32000, 10)


def test_special_rows() -> None:
    vocab = TrigramVocab(v=50, m=6, k=2)
    hasher = TrigramHasher(vocab)
    word = "<|EndOfText|>"

    def md5(text: str) -> int:
        return int(hashlib.md5(text.encode()).hexdigest(), 16) % 50

    expected = [md5(f"{word}_{i}") for i in range(4)] + [md5(f"<|endoftext|>_lower_{i}") for i in range(2)]
    assert list(hasher.special_rows(word)) == expected
    assert hasher.word_rows(word).tolist() == expected  # not deduplicated
    assert hasher.word_pattern(word).tolist() == sorted(set(expected))
    assert hasher.n_trigrams(word) == 1
    inner, edge = hasher.edge_split(word)
    assert inner.tolist() == sorted(set(expected)) and edge.size == 0


def test_word_rows_pattern_and_edges() -> None:
    hasher = TrigramHasher(TrigramVocab(v=64, m=3, k=1))
    rows = hasher.word_rows("Hello")
    tris = word_trigrams("Hello")
    assert rows.dtype == np.int64 and rows.tolist() == [r for t in tris for r in hasher.trigram_rows(t)]
    assert hasher.word_pattern("Hello").tolist() == sorted(set(rows.tolist()))
    inner, edge = hasher.edge_split("Hello")
    assert inner.tolist() == sorted({r for t in (b"Hel", b"ell", b"llo") for r in hasher.trigram_rows(t)})
    assert edge.tolist() == sorted({r for t in (b" He", b"lo ") for r in hasher.trigram_rows(t)})
    assert hasher.n_trigrams("Hello") == 5
    rows[0] = -1  # callers get their own copy, the memo is untouched
    assert hasher.word_rows("Hello")[0] != -1
    with pytest.raises(DistilrayError, match="empty word"):
        hasher.word_rows("")
    with pytest.raises(DistilrayError, match="3 bytes"):
        hasher.trigram_rows(b"ab")


def test_encode_and_targets_layout() -> None:
    hasher = hasher_for(TrigramVocab(v=64, m=3))
    words = ["In", "<|ws|>", "2", "In"]
    flat, offsets = hasher.encode(words)
    assert offsets.tolist() == [0, 6, 9, 12, 18]  # " In " has 2 trigrams x m=3 rows; a special word m rows
    for i, word in enumerate(words):
        assert flat[offsets[i] : offsets[i + 1]].tolist() == hasher.word_rows(word).tolist()
    targets, target_offsets = hasher.targets(words)
    for i, word in enumerate(words):
        assert targets[target_offsets[i] : target_offsets[i + 1]].tolist() == hasher.word_pattern(word).tolist()
    empty_flat, empty_offsets = hasher.encode([])
    assert empty_flat.dtype == np.int64 and empty_offsets.tolist() == [0]
    assert hasher_for(TrigramVocab(v=64, m=3)) is hasher


@pytest.mark.parametrize(
    "kwargs, name",
    [({"v": 1}, "v"), ({"v": 8, "m": 0}, "m"), ({"v": 8, "m": 9}, "m"), ({"m": 4, "k": 5}, "k"), ({"k": -1}, "k")],
)
def test_vocab_validation(kwargs: dict, name: str) -> None:
    with pytest.raises(DistilrayError, match=f"TrigramVocab {name} "):
        TrigramVocab(**kwargs)
    assert TrigramVocab(v=32000, m=10, k=2).key() == {"v": 32000, "m": 10, "k": 2}


def test_rows_equal_across_processes() -> None:
    code = (
        "import json; from distilray.tfree.hashing import TrigramHasher, TrigramVocab;"
        "h = TrigramHasher(TrigramVocab(v=32000, m=10, k=2));"
        "print(json.dumps([h.word_rows(w).tolist() for w in ['Hello', 'the', 'THE', '<|ws|>', 'é']]))"
    )
    hasher = TrigramHasher(TrigramVocab(v=32000, m=10, k=2))
    here = [hasher.word_rows(w).tolist() for w in ["Hello", "the", "THE", "<|ws|>", "é"]]
    for seed in ("1", "2"):  # a salted hash() would differ between these
        env = {**os.environ, "PYTHONHASHSEED": seed}
        out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
        assert json.loads(out.stdout) == here
