"""distilray.tfree.textstore: Arrow text stores with random access, the aligned index (every document in
exactly one entry of at least min_bytes, but the last), and instruction conversations in both JSONL forms."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest

from distilray.errors import DistilrayError
from distilray.tfree import textstore as ts

DOCS = ["Hello world.", "", "Grüße, 世界! 🙂", "line one\nline two\n", "  leading spaces kept in the store"]


def test_round_trip_and_random_access(tmp_path):
    index = ts.write_text_store(tmp_path / "s", DOCS)
    assert index["rows"] == len(DOCS)
    assert index["bytes"] == sum(len(d.encode("utf-8")) for d in DOCS)
    assert json.loads((tmp_path / "s" / ts.INDEX_FILE).read_text())["fingerprint"] == index["fingerprint"]
    store = ts.TextStore(tmp_path / "s")
    assert len(store) == len(DOCS)
    for i in random.Random(0).sample(range(len(DOCS)), len(DOCS)):  # any order
        assert store[i] == DOCS[i]
        assert store.byte_length(i) == len(DOCS[i].encode("utf-8"))
    assert store[-1] == DOCS[-1]
    with pytest.raises(IndexError):
        store[len(DOCS)]
    assert store.byte_lengths.tolist() == [len(d.encode("utf-8")) for d in DOCS]


def test_many_batches_are_found(tmp_path, monkeypatch):
    monkeypatch.setattr(ts, "BATCH_ROWS", 7)  # rows cross several Arrow record batches
    docs = [f"document {i} " * (i % 5) for i in range(50)]
    ts.write_text_store(tmp_path / "s", iter(docs))  # a generator is read once
    store = ts.TextStore(tmp_path / "s")
    assert store.table.column("text").num_chunks > 1
    assert [store[i] for i in range(50)] == docs
    assert [store.byte_length(i) for i in range(50)] == [len(d) for d in docs]


def test_fingerprint_follows_content_and_rewrite_replaces(tmp_path):
    a = ts.write_text_store(tmp_path / "a", ["ab", "c"])
    b = ts.write_text_store(tmp_path / "b", ["a", "bc"])  # same bytes, other documents
    assert a["fingerprint"] != b["fingerprint"]
    assert ts.write_text_store(tmp_path / "a2", ["ab", "c"])["fingerprint"] == a["fingerprint"]
    ts.write_text_store(tmp_path / "a", ["new"])
    assert [ts.TextStore(tmp_path / "a")[0]] == ["new"] and len(ts.TextStore(tmp_path / "a")) == 1
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary debris


def test_empty_store_and_bad_folders(tmp_path):
    ts.write_text_store(tmp_path / "empty", [])
    assert len(ts.TextStore(tmp_path / "empty")) == 0
    ts.write_aligned_index(tmp_path / "empty", 100)
    assert len(ts.AlignedIndex(tmp_path / "empty", 100)) == 0
    with pytest.raises(DistilrayError, match="not a T-Free text store"):
        ts.TextStore(tmp_path / "missing")
    with pytest.raises(DistilrayError, match="holds strings"):
        ts.write_text_store(tmp_path / "bad", ["ok", 3])
    ts.write_instruction_store(tmp_path / "inst", [[{"text": "hi", "has_loss": True}]])
    with pytest.raises(DistilrayError, match="'instruction' data"):
        ts.TextStore(tmp_path / "inst")


def _random_docs(n: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    return ["x" * rng.randint(0, 300) + "é" * rng.randint(0, 20) for _ in range(n)]


@pytest.mark.parametrize("min_bytes", [1, 250, 1000, 10**6])
def test_aligned_index_covers_every_document_once(tmp_path, min_bytes):
    docs = _random_docs(200, seed=min_bytes)
    ts.write_text_store(tmp_path / "s", docs)
    path = ts.write_aligned_index(tmp_path / "s", min_bytes, seed=42)
    assert path.name == f"aligned-{min_bytes}-42.safetensors"
    aligned = ts.AlignedIndex(tmp_path / "s", min_bytes, seed=42)
    entries = [aligned[i] for i in range(len(aligned))]
    assert sorted(d for e in entries for d in e) == list(range(len(docs)))  # one epoch sees each once
    sizes = [sum(len(docs[d].encode("utf-8")) for d in e) for e in entries]
    assert all(s >= min_bytes for s in sizes[:-1])
    for e, s in zip(entries[:-1], sizes[:-1]):  # minimal: the entry without its last document is short
        assert s - len(docs[e[-1]].encode("utf-8")) < min_bytes
    assert aligned.short_last_entry == (sizes[-1] < min_bytes)
    assert entries[0] != list(range(len(entries[0]))) or min_bytes == 10**6  # permuted, not in store order


def test_aligned_index_is_seeded_and_tied_to_its_store(tmp_path):
    ts.write_text_store(tmp_path / "s", _random_docs(60, seed=1))
    ts.write_aligned_index(tmp_path / "s", 500, seed=42)
    ts.write_aligned_index(tmp_path / "s", 500, seed=7)
    a, b = ts.AlignedIndex(tmp_path / "s", 500, 42), ts.AlignedIndex(tmp_path / "s", 500, 7)
    assert a.permutation.tolist() != b.permutation.tolist()
    perm, starts, ends = ts.align(ts.TextStore(tmp_path / "s").byte_lengths, 500, seed=42)
    assert np.array_equal(perm, a.permutation) and np.array_equal(starts, a.starts) and np.array_equal(ends, a.ends)
    with pytest.raises(DistilrayError, match="no aligned index"):
        ts.AlignedIndex(tmp_path / "s", 501, 42)
    saved = ts.aligned_index_path(tmp_path / "s", 500, 42).read_bytes()
    ts.write_text_store(tmp_path / "s", ["other"])  # a rewrite drops the folder's old indices...
    assert not ts.aligned_index_path(tmp_path / "s", 500, 42).exists()
    ts.aligned_index_path(tmp_path / "s", 500, 42).write_bytes(saved)  # ...and a stale one copied back is refused
    with pytest.raises(DistilrayError, match="another store"):
        ts.AlignedIndex(tmp_path / "s", 500, 42)
    with pytest.raises(DistilrayError, match="min_bytes"):
        ts.write_aligned_index(tmp_path / "s", 0)


def test_instruction_store_both_forms(tmp_path):
    records = [
        [{"text": "Question?", "has_loss": False}, {"text": "Answer.", "has_loss": True}],
        {"segments": [{"text": "Only prompt", "has_loss": False}]},
        {
            "messages": [
                {"role": "system", "content": "Be brief."},
                {"role": "user", "content": "Hi"},
                {"role": "assistant", "content": "Hello!"},
            ]
        },
    ]
    index = ts.write_instruction_store(tmp_path / "i", (r for r in records))
    assert index["kind"] == "instruction" and index["rows"] == 3
    store = ts.InstructionStore(tmp_path / "i")
    assert store[0] == [("Question?", False), ("Answer.", True)]
    assert store[1] == [("Only prompt", False)]
    assert store[2] == [("system: Be brief.", False), ("user: Hi", False), ("assistant:", False), ("Hello!", True)]
    table = store.table
    assert str(table.schema.field("segments_text").type) == "list<item: string>"
    assert str(table.schema.field("segments_loss").type) == "list<item: bool>"


@pytest.mark.parametrize(
    "record",
    [{"text": "no segments"}, [{"text": "x", "has_loss": "yes"}], {"messages": [{"role": "user"}]}, "plain"],
)
def test_bad_instruction_records_are_named(tmp_path, record):
    with pytest.raises(DistilrayError):
        ts.write_instruction_store(tmp_path / "i", [record])
    assert not (tmp_path / "i").exists()
