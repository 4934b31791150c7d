"""distilray.pipelines.prepare_tfree: a corpus -> T-Free text stores per split with aligned indices,
resumable and refusing another config; instruction JSONL; word counts with Ray Data."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest

from distilray.errors import DistilrayError
from distilray.pipelines import prepare_tfree as pt
from distilray.tfree import textstore as ts
from distilray.tfree.wordsplit import EOT, encode_document

SPLITS = ("train", "validation", "test")


def _corpus(folder: Path, n: int = 6) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        text = f"Story {i}.\n" + " ".join(f"word{i * j % 7} and the river" for j in range(20 + 5 * i)) + "\n"
        (folder / f"doc{i}.txt").write_text(text, encoding="utf-8")
    return folder


def test_prepare_writes_stores_and_is_idempotent(tmp_path):
    src = _corpus(tmp_path / "docs")
    out = tmp_path / "out"
    meta = pt.prepare_tfree(str(src), out, min_bytes=400, seed=3)
    assert meta["cached"] is False
    texts = []
    for split in SPLITS:
        store = ts.TextStore(out / split)
        aligned = ts.AlignedIndex(out / split, 400, 3)
        assert meta["splits"][split]["rows"] == len(store) and meta["splits"][split]["aligned_entries"] == len(aligned)
        assert sorted(d for e in range(len(aligned)) for d in aligned[e]) == list(range(len(store)))
        texts += [store[i] for i in range(len(store))]
    originals = [p.read_text(encoding="utf-8") for p in sorted(src.glob("*.txt"))]
    assert sorted(texts) == sorted(originals)  # every document lands in exactly one split
    assert all(len(ts.TextStore(out / s)) for s in SPLITS)

    stamp = (out / "train" / ts.TEXT_FILE).stat().st_mtime_ns
    again = pt.prepare_tfree(str(src), out, min_bytes=400, seed=3)
    assert again["cached"] is True and again["splits"] == meta["splits"]
    assert (out / "train" / ts.TEXT_FILE).stat().st_mtime_ns == stamp  # no work done


def test_another_config_is_refused_unless_overwrite(tmp_path):
    src = _corpus(tmp_path / "docs")
    out = tmp_path / "out"
    pt.prepare_tfree(str(src), out, min_bytes=400)
    with pytest.raises(DistilrayError, match="another config.*min_bytes"):
        pt.prepare_tfree(str(src), out, min_bytes=800)
    (src / "doc0.txt").write_text("Changed text.\n", encoding="utf-8")
    with pytest.raises(DistilrayError, match="source_fingerprint"):
        pt.prepare_tfree(str(src), out, min_bytes=400)
    meta = pt.prepare_tfree(str(src), out, min_bytes=800, overwrite=True)
    assert meta["cached"] is False and meta["config"]["min_bytes"] == 800
    assert ts.AlignedIndex(out / "train", 800, 42)
    (out / "meta.json").unlink()  # an incomplete folder is redone, not refused
    assert pt.prepare_tfree(str(src), out, min_bytes=400)["cached"] is False


def test_instruction_jsonl_in_both_forms(tmp_path):
    lines = []
    for i in range(8):
        if i % 2:
            lines.append([{"text": f"Question {i}?", "has_loss": False}, {"text": f"Answer {i}.", "has_loss": True}])
        else:
            lines.append(
                {"messages": [{"role": "user", "content": f"Q{i}"}, {"role": "assistant", "content": f"A{i}"}]}
            )
    src = tmp_path / "chat.jsonl"
    src.write_text("\n".join(json.dumps(r) for r in lines) + "\n", encoding="utf-8")
    meta = pt.prepare_tfree(str(src), tmp_path / "out", instruction=True)
    assert sum(meta["splits"][s]["rows"] for s in SPLITS) == 8
    convs = [ts.InstructionStore(tmp_path / "out" / s)[i] for s in SPLITS for i in range(meta["splits"][s]["rows"])]
    assert [("Question 1?", False), ("Answer 1.", True)] in convs
    assert [("user: Q0", False), ("assistant:", False), ("A0", True)] in convs
    assert pt.prepare_tfree(str(src), tmp_path / "out", instruction=True)["cached"] is True

    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "no segments"}\n', encoding="utf-8")
    with pytest.raises(DistilrayError, match="instruction record"):
        pt.prepare_tfree(str(bad), tmp_path / "out_bad", instruction=True)


def test_word_counts_file_round_trip(tmp_path):
    counts = {"the": 3, "<|ws|>": 5, "Ä": 1}
    pt.save_word_counts(tmp_path / "c.json", counts)
    assert pt.load_word_counts(tmp_path / "c.json") == counts
    assert list(json.loads((tmp_path / "c.json").read_text())["counts"]) == ["<|ws|>", "the", "Ä"]
    (tmp_path / "bad.json").write_text('{"counts": {"x": "many"}}')
    with pytest.raises(DistilrayError, match="not a word-count file"):
        pt.load_word_counts(tmp_path / "bad.json")


@pytest.mark.ray
def test_count_words_equals_a_plain_counter(ray_session, tmp_path):
    texts = [f"  Line {i}: the cat, the hat.\n\n  In 20{i} it rained   {'a' * i}." for i in range(23)]
    expected = Counter(w for t in texts for w in encode_document(t))
    assert pt.count_words(texts, num_blocks=4) == dict(expected)
    ts.write_text_store(tmp_path / "s", texts)
    assert pt.count_words(tmp_path / "s", num_blocks=3) == dict(expected)  # read by the tasks from the store
    assert expected[EOT] == len(texts)
    assert pt.count_words([]) == {}
