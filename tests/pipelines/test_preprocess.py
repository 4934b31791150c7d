"""distilray.pipelines.preprocess: split files written atomically and read back as a corpus."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from distilray.config import CorpusSpec, PreprocessConfig
from distilray.corpus import load_documents, load_splits
from distilray.errors import DistilrayError
from distilray.pipelines import preprocess

SPLITS = ("train", "validation", "test")


def _read(path: str | Path) -> object:
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def _jsonl_corpus(tmp_path: Path, n: int = 60) -> Path:
    src = tmp_path / "src.jsonl"
    src.write_text(
        "".join(json.dumps({"body": f"record {i} text", "id": i}) + "\n" for i in range(n)), encoding="utf-8"
    )
    return src


def test_writes_json_splits_and_stats(tmp_path: Path) -> None:
    src = _jsonl_corpus(tmp_path)
    spec = CorpusSpec(dataset=str(src), text_field="body", val_fraction=0.1, test_fraction=0.2, split_seed=7)
    out_dir = tmp_path / "out"
    result = preprocess.run(PreprocessConfig(corpus=spec, output_dir=str(out_dir)))

    assert result["output_dir"] == str(out_dir)
    assert result["documents"] == {"train": 42, "validation": 6, "test": 12}
    assert set(result["files"]) == {"train", "validation", "test", "stats"}
    assert sorted(p.name for p in out_dir.iterdir()) == ["stats.json", "test.json", "train.json", "validation.json"]

    expected = load_splits(spec)
    texts: list[str] = []
    for split in SPLITS:
        data = _read(result["files"][split])
        assert isinstance(data, list)
        assert all(set(item) == {"text"} and isinstance(item["text"], str) for item in data)
        assert [item["text"] for item in data] == expected[split]
        texts += [item["text"] for item in data]
    assert sorted(texts) == sorted(f"record {i} text" for i in range(60))

    stats = _read(out_dir / "stats.json")
    assert stats["corpus"] == {
        "dataset": str(src),
        "text_field": "body",
        "val_fraction": 0.1,
        "test_fraction": 0.2,
        "split_seed": 7,
    }
    for split in SPLITS:
        assert stats["splits"][split]["documents"] == result["documents"][split]
        assert stats["splits"][split]["characters"] == sum(len(t) for t in expected[split])
    assert isinstance(stats["fingerprint"], str) and len(stats["fingerprint"]) == 16


def test_output_folder_reads_back_as_the_same_splits(tmp_path: Path) -> None:
    out_dir = tmp_path / "pydoc"
    result = preprocess.run(PreprocessConfig(output_dir=str(out_dir)))  # the built-in default corpus
    assert all(result["documents"][s] > 0 for s in SPLITS)
    original = load_splits(CorpusSpec())
    # the folder is used as it is: no re-splitting, whatever the fractions and seed say
    again = load_splits(CorpusSpec(dataset=str(out_dir), val_fraction=0.3, split_seed=5))
    assert again == original
    # as plain documents, stats.json is not mistaken for text
    assert load_documents(str(out_dir)) == original["train"] + original["validation"] + original["test"]


def test_rerun_replaces_files_with_identical_content(tmp_path: Path) -> None:
    cfg = PreprocessConfig(
        corpus=CorpusSpec(dataset=str(_jsonl_corpus(tmp_path)), text_field="body"), output_dir=str(tmp_path / "out")
    )
    first = preprocess.run(cfg)
    before = {s: Path(first["files"][s]).read_bytes() for s in SPLITS}
    second = preprocess.run(cfg)
    assert second == first
    assert {s: Path(second["files"][s]).read_bytes() for s in SPLITS} == before


def test_tinyshakespeare_preprocess(tmp_path: Path) -> None:
    result = preprocess.run(PreprocessConfig(corpus=CorpusSpec(dataset="tinyshakespeare"), output_dir=str(tmp_path)))
    texts = {s: [d["text"] for d in _read(result["files"][s])] for s in SPLITS}
    assert all(texts.values())
    assert sum(len(t) for s in SPLITS for t in texts[s]) == 1_115_394


def test_bad_input_writes_nothing(tmp_path: Path) -> None:
    out_dir = tmp_path / "out"
    with pytest.raises(DistilrayError, match="below 1"):
        preprocess.run(
            PreprocessConfig(corpus=CorpusSpec(val_fraction=0.5, test_fraction=0.5), output_dir=str(out_dir))
        )
    with pytest.raises(DistilrayError, match="no such file"):
        preprocess.run(PreprocessConfig(corpus=CorpusSpec(dataset=str(tmp_path / "nope.txt")), output_dir=str(out_dir)))
    assert not out_dir.exists()
