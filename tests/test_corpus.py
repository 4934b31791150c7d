"""distilray.corpus: every text source, the splits, the fingerprint and the error messages."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from pydoc_data.topics import topics

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from distilray import corpus
from distilray.config import CorpusSpec
from distilray.corpus import (
    corpus_fingerprint,
    known_datasets,
    load_cnndm_pairs,
    load_documents,
    load_splits,
    shared_data_dir,
    split_documents,
)
from distilray.errors import DistilrayError

REPO = Path(__file__).resolve().parent.parent


def _write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


def _jsonl_field(path: Path, field: str) -> list[str]:
    return [json.loads(line)[field] for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def _all_pieces(splits: dict[str, list[str]]) -> list[str]:
    return splits["train"] + splits["validation"] + splits["test"]


# ------------------------------------------------------------------------------ local sources
def test_txt_file_is_one_document(tmp_path: Path) -> None:
    f = tmp_path / "a.txt"
    f.write_text("line one\nline two\n", encoding="utf-8")
    assert load_documents(str(f)) == ["line one\nline two\n"]


def test_jsonl_with_custom_text_field_drops_empty_records(tmp_path: Path) -> None:
    f = _write_jsonl(
        tmp_path / "d.jsonl", [{"body": "first", "id": 1}, {"body": "   "}, {"body": None}, {"body": "second"}]
    )
    f.write_text(f.read_text() + "\n\n", encoding="utf-8")  # trailing blank lines are not records
    assert load_documents(str(f), text_field="body") == ["first", "second"]


def test_json_list(tmp_path: Path) -> None:
    f = tmp_path / "d.json"
    f.write_text(json.dumps([{"text": "alpha"}, {"text": "beta", "other": 3}]), encoding="utf-8")
    assert load_documents(str(f)) == ["alpha", "beta"]


def test_parquet_column(tmp_path: Path) -> None:
    f = tmp_path / "d.parquet"
    pq.write_table(pa.table({"content": ["p one", "", "p two"], "n": [1, 2, 3]}), f)
    assert load_documents(str(f), text_field="content") == ["p one", "p two"]


def test_folder_mixes_sources_sorted_and_recursive(tmp_path: Path) -> None:
    (tmp_path / "sub").mkdir()
    (tmp_path / "b.txt").write_text("from txt", encoding="utf-8")
    _write_jsonl(tmp_path / "a.jsonl", [{"text": "jsonl 1"}, {"text": "jsonl 2"}])
    (tmp_path / "sub" / "c.json").write_text(json.dumps([{"text": "from json"}]), encoding="utf-8")
    pq.write_table(pa.table({"text": ["from parquet"]}), tmp_path / "sub" / "d.parquet")
    (tmp_path / "notes.csv").write_text("ignored,file\n", encoding="utf-8")  # unsupported: skipped
    (tmp_path / ".hidden.txt").write_text("a temporary write", encoding="utf-8")  # hidden: skipped
    docs = load_documents(str(tmp_path))
    assert docs == ["jsonl 1", "jsonl 2", "from txt", "from json", "from parquet"]


# ------------------------------------------------------------------------------ built-in pydoc
def test_pydoc_is_the_default_and_sorted_by_topic() -> None:
    assert CorpusSpec().dataset == "pydoc"
    docs = load_documents("pydoc")
    expected = [topics[k] for k in sorted(topics) if topics[k].strip()]
    assert docs == expected
    assert sum(map(len, docs)) > 300_000  # about 465 KB of English
    assert any("for" in d and "target_list" in d for d in docs)  # the `for` statement's grammar
    splits = load_splits(CorpusSpec())
    assert all(splits[s] for s in ("train", "validation", "test"))


# ---------------------------------------------------------------------------- ../shared/data
def test_known_datasets_lists_every_named_set() -> None:
    assert set(known_datasets()) == {
        "pydoc",
        "tinyshakespeare",
        "wikitext2",
        "dockerfile",
        "medquad",
        "cnndm",
        "gutenberg",
        "lambada-dev",
    }


def test_shared_data_dir_defaults_next_to_the_repository(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("DISTILRAY_DATA_DIR", raising=False)
    assert shared_data_dir() == (REPO / ".." / "shared" / "data").resolve()
    assert (shared_data_dir() / "SOURCES.md").is_file()


def test_shared_data_dir_from_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "tinyshakespeare.txt").write_text("To be.\n", encoding="utf-8")
    monkeypatch.setenv("DISTILRAY_DATA_DIR", str(tmp_path))
    assert shared_data_dir() == tmp_path
    assert load_documents("tinyshakespeare") == ["To be.\n"]
    with pytest.raises(DistilrayError, match=r"medquad.*not found"):  # its file is not in this folder
        load_documents("medquad")
    monkeypatch.setenv("DISTILRAY_DATA_DIR", str(tmp_path / "missing"))
    with pytest.raises(DistilrayError, match="DISTILRAY_DATA_DIR"):
        shared_data_dir()


def test_tinyshakespeare_one_document_three_disjoint_splits() -> None:
    text = (shared_data_dir() / "tinyshakespeare.txt").read_text(encoding="utf-8")
    docs = load_documents("tinyshakespeare")
    assert docs == [text] and len(text) == 1_115_394
    splits = load_splits(CorpusSpec(dataset="tinyshakespeare", val_fraction=0.1, test_fraction=0.1))
    sets = {s: set(v) for s, v in splits.items()}
    assert all(sets.values())
    assert not sets["train"] & sets["validation"] and not sets["train"] & sets["test"]
    assert not sets["validation"] & sets["test"]
    pieces = _all_pieces(splits)
    assert sum(map(len, pieces)) == len(text)  # cut at line boundaries, nothing lost
    assert max(map(len, pieces)) <= corpus.MAX_PIECE_CHARS
    assert all(p.endswith("\n") for p in pieces)
    n = len(pieces)
    assert abs(len(splits["validation"]) - 0.1 * n) <= 1 and abs(len(splits["test"]) - 0.1 * n) <= 1


def test_wikitext2_articles_and_fixed_test_split() -> None:
    root = shared_data_dir() / "wikitext2"
    valid_raw = (root / "wiki.valid.raw").read_text(encoding="utf-8")
    test_raw = (root / "wiki.test.raw").read_text(encoding="utf-8")
    docs = load_documents("wikitext2")
    assert len(docs) == 120  # 60 articles in each file (SOURCES.md)
    assert docs[0].startswith(" = Homarus gammarus = \n") and docs[60].startswith(" = Robert Boulter = \n")

    splits = load_splits(CorpusSpec(dataset="wikitext2"))
    assert splits["test"] == docs[60:]  # whole articles of wiki.test.raw, test_fraction unused
    assert all(a in test_raw for a in splits["test"])
    # formula lines that look like titles stay inside their article
    constant_k = [a for a in splits["test"] if a.startswith(" = Constant k filter = ")]
    assert len(constant_k) == 1 and " = 1 henry and capacitance C = \n" in constant_k[0]
    assert splits["train"] and splits["validation"]
    for piece in splits["train"] + splits["validation"]:
        assert piece in valid_raw and piece not in test_raw


def test_dockerfile_documents() -> None:
    docs = load_documents("dockerfile")
    assert len(docs) == 206
    assert docs == _jsonl_field(shared_data_dir() / "dockerfiles.jsonl", "text")
    assert all("FROM" in d for d in docs)


def test_medquad_documents_are_the_answers() -> None:
    path = shared_data_dir() / "medquad_subset.jsonl"
    docs = load_documents("medquad")
    assert len(docs) == 2087
    assert docs == _jsonl_field(path, "answer")
    questions = set(_jsonl_field(path, "question"))
    assert not any(d in questions or d.startswith("Question:") for d in docs)


def test_cnndm_documents_and_pairs() -> None:
    path = shared_data_dir() / "cnndm_sample.jsonl"
    docs = load_documents("cnndm")
    assert len(docs) == 250 and docs == _jsonl_field(path, "article")
    pairs = load_cnndm_pairs()
    assert len(pairs) == 250
    assert [a for a, _ in pairs] == docs
    assert [h for _, h in pairs] == _jsonl_field(path, "highlights")
    assert all(0 < len(h) < len(a) for a, h in pairs)
    assert load_cnndm_pairs(path) == pairs


def test_gutenberg_eight_books_then_many_pieces() -> None:
    books = sorted((shared_data_dir() / "gutenberg").glob("*.txt"))
    docs = load_documents("gutenberg")
    assert len(docs) == 8
    assert docs == [b.read_text(encoding="utf-8") for b in books]
    splits = load_splits(CorpusSpec(dataset="gutenberg"))
    assert all(splits[s] for s in ("train", "validation", "test"))
    assert len(_all_pieces(splits)) > 1000


def test_lambada_one_passage_per_line() -> None:
    docs = load_documents("lambada-dev")
    assert len(docs) == 4869
    assert all("\n" not in d for d in docs)
    assert docs[0] == (shared_data_dir() / "lambada_dev_plain_text.txt").read_text(encoding="utf-8").split("\n")[0]


# ------------------------------------------------------------------------------------ splits
def test_split_is_deterministic_and_seed_dependent() -> None:
    docs = [f"document number {i}\n" for i in range(200)]
    a = split_documents(docs, 0.1, 0.1, seed=0)
    assert a == split_documents(docs, 0.1, 0.1, seed=0)
    assert a != split_documents(docs, 0.1, 0.1, seed=1)
    assert sorted(_all_pieces(a)) == sorted(docs)
    assert a["train"] == sorted(a["train"], key=docs.index)  # corpus order kept inside a split


def test_split_fractions_respected() -> None:
    docs = [f"doc {i}" for i in range(1000)]
    splits = split_documents(docs, val_fraction=0.1, test_fraction=0.2, seed=3)
    assert (len(splits["train"]), len(splits["validation"]), len(splits["test"])) == (700, 100, 200)
    only_train = split_documents(docs, 0.0, 0.0, seed=3)
    assert only_train["train"] == docs and not only_train["validation"] and not only_train["test"]


def test_split_few_documents_still_three_splits() -> None:
    three = split_documents(["a", "b", "c"], 0.01, 0.01, seed=0)
    assert [len(three[s]) for s in ("train", "validation", "test")] == [1, 1, 1]
    big_val = split_documents(["a", "b", "c"], 0.6, 0.3, seed=0)
    assert all(len(big_val[s]) == 1 for s in big_val)  # train keeps at least one
    one = split_documents(["only one"], 0.5, 0.4, seed=0)
    assert one["train"] == ["only one"]
    long_doc = "".join(f"line {i} of a long single document\n" for i in range(2000))
    splits = split_documents([long_doc], 0.05, 0.05, seed=0, max_piece_chars=1000)
    assert all(splits[s] for s in splits)
    assert all(len(p) <= 1000 and p.endswith("\n") for p in _all_pieces(splits))


@pytest.mark.parametrize(
    ("val", "test", "words"),
    [(-0.1, 0.1, "val_fraction"), (0.1, 1.0, "test_fraction"), (0.6, 0.5, "below 1")],
)
def test_bad_fractions(val: float, test: float, words: str) -> None:
    with pytest.raises(DistilrayError, match=words):
        split_documents(["a", "b", "c"], val, test, seed=0)
    with pytest.raises(DistilrayError, match=words):
        load_splits(CorpusSpec(val_fraction=val, test_fraction=test))


# ------------------------------------------------------------------------------------ errors
def test_unknown_name_lists_known_names() -> None:
    with pytest.raises(DistilrayError) as err:
        load_documents("no-such-corpus")
    msg = str(err.value)
    assert "no-such-corpus" in msg and "no such file" in msg
    assert all(name in msg for name in known_datasets())


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(DistilrayError, match="no such file or folder"):
        load_documents(str(tmp_path / "absent.jsonl"))
    with pytest.raises(DistilrayError, match="no such file or folder"):
        corpus_fingerprint(CorpusSpec(dataset=str(tmp_path / "absent.jsonl")))


def test_missing_text_field_names_field_and_file(tmp_path: Path) -> None:
    jl = _write_jsonl(tmp_path / "d.jsonl", [{"body": "x"}])
    js = tmp_path / "d.json"
    js.write_text(json.dumps([{"body": "x"}]), encoding="utf-8")
    pa_file = tmp_path / "d.parquet"
    pq.write_table(pa.table({"body": ["x"]}), pa_file)
    for f in (jl, js, pa_file):
        with pytest.raises(DistilrayError) as err:
            load_documents(str(f), text_field="content")
        assert "'content'" in str(err.value) and str(f) in str(err.value) and "body" in str(err.value)


def test_empty_corpus(tmp_path: Path) -> None:
    f = tmp_path / "blank.txt"
    f.write_text("  \n\n", encoding="utf-8")
    with pytest.raises(DistilrayError, match="has no text"):
        load_documents(str(f))
    (tmp_path / "empty").mkdir()
    with pytest.raises(DistilrayError, match="has no text"):
        load_documents(str(tmp_path / "empty"))


def test_bad_files(tmp_path: Path) -> None:
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\n{not json\n', encoding="utf-8")
    with pytest.raises(DistilrayError, match="not valid JSON"):
        load_documents(str(bad))
    not_list = tmp_path / "d.json"
    not_list.write_text('{"text": "x"}', encoding="utf-8")
    with pytest.raises(DistilrayError, match="list"):
        load_documents(str(not_list))
    csv = tmp_path / "d.csv"
    csv.write_text("a,b\n", encoding="utf-8")
    with pytest.raises(DistilrayError, match="unsupported file type"):
        load_documents(str(csv))
    latin = tmp_path / "latin.txt"
    latin.write_bytes("caf\xe9".encode("latin-1"))
    with pytest.raises(DistilrayError, match="UTF-8"):
        load_documents(str(latin))


def test_hf_offline_fails_fast_with_clear_message(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    # the libraries read these variables at import; if another test imported them first, patch them too
    if "datasets" in sys.modules:
        monkeypatch.setattr(sys.modules["datasets"].config, "HF_HUB_OFFLINE", True)
    if "huggingface_hub" in sys.modules:
        monkeypatch.setattr(sys.modules["huggingface_hub"].constants, "HF_HUB_OFFLINE", True)
    start = time.monotonic()
    with pytest.raises(DistilrayError) as err:
        load_documents("hf:no-such-owner/no-such-dataset:cfg")
    assert time.monotonic() - start < 15
    assert "no-such-owner/no-such-dataset" in str(err.value) and "Hugging Face" in str(err.value)
    with pytest.raises(DistilrayError, match="hf:NAME"):
        load_documents("hf:")


# ------------------------------------------------------------------------------- fingerprint
def test_fingerprint_tracks_spec_and_files(tmp_path: Path) -> None:
    f = tmp_path / "d.txt"
    f.write_text("some text\n", encoding="utf-8")
    spec = CorpusSpec(dataset=str(f))
    fp = corpus_fingerprint(spec)
    assert len(fp) == 16 and fp == corpus_fingerprint(spec)
    assert corpus_fingerprint(CorpusSpec(dataset=str(f), split_seed=1)) != fp
    f.write_text("some longer text\n", encoding="utf-8")
    assert corpus_fingerprint(spec) != fp
    fp = corpus_fingerprint(spec)
    os.utime(f, (1_000_000, 1_000_000))  # a copy with a new mtime keeps its caches
    assert corpus_fingerprint(spec) == fp
    names = ["pydoc", "tinyshakespeare", "gutenberg", "hf:wikitext:wikitext-2-raw-v1"]
    fps = {corpus_fingerprint(CorpusSpec(dataset=n)) for n in names}
    assert len(fps) == len(names)


def test_corpus_module_does_not_import_ray() -> None:
    code = "import sys, distilray.corpus, distilray.pipelines.preprocess; assert 'ray' not in sys.modules"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    subprocess.run([sys.executable, "-c", code], check=True, env=env, cwd=REPO)
