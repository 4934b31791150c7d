"""distilray.pipelines.prepare_long: BOS + (seq_len - 1)-token windows of whole documents, no token
dropped between windows, document-level splits, deterministic and resumable output."""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from distilray.config import PrepareLongConfig, config_from
from distilray.corpus import load_documents
from distilray.errors import DistilrayError
from distilray.pipelines import prepare_long as pl

SPLITS = ("train", "validation", "test")
SEQ_LEN = 17  # BOS + 16 document tokens
WORDS = "the of and long range token weighting river house light night stone window said little".split()


def _text(i: int, n_words: int) -> str:
    rng = random.Random(i)
    lines = []
    while n_words > 0:
        k = min(n_words, rng.randint(5, 12))
        lines.append(" ".join(rng.choice(WORDS) for _ in range(k)).capitalize() + ".")
        n_words -= k
    return f"Book {i}.\n" + "\n".join(lines) + "\n"


def _write_corpus(folder: Path, texts: list[str]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for i, text in enumerate(texts):
        (folder / f"doc{i:02d}.txt").write_text(text, encoding="utf-8")
    return folder


@pytest.fixture(scope="module")
def long_corpus(tmp_path_factory) -> Path:
    """Nine documents of varied length; doc03 and doc07 are shorter than one window."""
    sizes = [120, 80, 200, 0, 150, 60, 95, 0, 170]
    texts = [_text(i, n) if n else f"Short {i}.\n" for i, n in enumerate(sizes)]
    return _write_corpus(tmp_path_factory.mktemp("long") / "docs", texts)


def _ids(tok, text: str) -> list[int]:
    return tok(text, add_special_tokens=False)["input_ids"]


def _prep(corpus: Path, tok_dir: Path, out: Path, **kw) -> dict:
    kw.setdefault("test_documents", 2)
    kw.setdefault("validation_documents", 1)
    kw.setdefault("seed", 3)
    return pl.prepare_long(str(corpus), str(tok_dir), str(out), SEQ_LEN, **kw)


def _table(out: Path, split: str) -> dict[str, list]:
    return pq.read_table(pl.split_file(out, split)).to_pydict()


def test_windows_cover_each_document_with_no_token_dropped(small_tokenizer, long_corpus, tmp_path):
    tok, tok_dir = small_tokenizer
    assert tok.bos_token_id is not None
    out = tmp_path / "out"
    meta = _prep(long_corpus, tok_dir, out)
    docs = load_documents(str(long_corpus))

    assert sorted(p.name for p in out.iterdir()) == [
        "heldout_test.jsonl",
        "heldout_validation.jsonl",
        "meta.json",
        "test.parquet",
        "train.parquet",
        "validation.parquet",
    ]
    schema = pq.read_schema(pl.split_file(out, "train"))
    assert [str(t) for t in schema.types] == ["string", "int64", "int64", "list<element: int32>"]
    assert schema.names == ["seq_id", "doc_id", "chunk", "input_ids"]

    seen_docs: dict[int, str] = {}
    for split in SPLITS:
        t = _table(out, split)
        by_doc: dict[int, dict[int, list[int]]] = {}
        for seq_id, d, c, ids in zip(t["seq_id"], t["doc_id"], t["chunk"], t["input_ids"]):
            assert len(ids) == SEQ_LEN and ids[0] == tok.bos_token_id
            assert tok.bos_token_id not in ids[1:]
            assert seq_id == f"{split}-{d}-{c}"
            by_doc.setdefault(d, {})[c] = ids
        discarded = 0
        for d, chunks in by_doc.items():
            assert sorted(chunks) == list(range(len(chunks)))
            body = [t for c in sorted(chunks) for t in chunks[c][1:]]
            full = _ids(tok, docs[d])
            assert body == full[: len(body)]  # consecutive windows, step seq_len - 1: nothing dropped
            assert len(full) - len(body) < SEQ_LEN - 1  # only a partial last window is left out
            discarded += len(full) - len(body)
            seen_docs[d] = split
        s = meta["splits"][split]
        assert s["sequences"] == len(t["seq_id"]) == sum(map(len, by_doc.values()))
        assert s["tokens_kept"] == s["sequences"] * (SEQ_LEN - 1)
        assert s["tokens_discarded"] == discarded
    # the ones too short for a sequence are skipped, and counted
    short = {d for d, text in enumerate(docs) if len(_ids(tok, text)) < SEQ_LEN - 1}
    assert short == {3, 7}
    assert set(seen_docs) == set(range(len(docs))) - short
    assert sum(meta["splits"][s]["documents_skipped"] for s in SPLITS) == 2
    assert sum(meta["splits"][s]["tokens_in_skipped_documents"] for s in SPLITS) == sum(
        len(_ids(tok, docs[d])) for d in short
    )
    assert meta["seq_len"] == SEQ_LEN and meta["seed"] == 3 and meta["bos_token_id"] == tok.bos_token_id
    assert meta["documents_total"] == 9


def test_documents_split_whole_and_heldout_texts_are_the_documents(small_tokenizer, long_corpus, tmp_path):
    _, tok_dir = small_tokenizer
    out = tmp_path / "out"
    meta = _prep(long_corpus, tok_dir, out)
    docs = load_documents(str(long_corpus))

    assert {s: meta["splits"][s]["documents"] for s in SPLITS} == {"train": 6, "validation": 1, "test": 2}
    doc_sets = {s: set(_table(out, s)["doc_id"]) for s in SPLITS}
    assert not doc_sets["train"] & doc_sets["validation"]
    assert not doc_sets["train"] & doc_sets["test"]
    assert not doc_sets["validation"] & doc_sets["test"]
    held: set[int] = set()
    for split in ("validation", "test"):
        rows = [json.loads(line) for line in pl.heldout_file(out, split).read_text(encoding="utf-8").splitlines()]
        assert len(rows) == meta["splits"][split]["documents"]
        for row in rows:
            assert row["text"] == docs[row["doc_id"]]
        ids = {r["doc_id"] for r in rows}
        assert doc_sets[split] <= ids
        held |= ids
        assert pl.read_heldout_texts(out, split) == [(r["doc_id"], r["text"]) for r in rows]
    assert not held & doc_sets["train"]
    # the seed chooses the held-out documents
    other = _prep(long_corpus, tok_dir, tmp_path / "other", seed=11)
    assert other["fingerprint"] != meta["fingerprint"]


def test_duplicate_documents_are_removed_before_the_split(small_tokenizer, tmp_path):
    _, tok_dir = small_tokenizer
    texts = [_text(i, 80) for i in range(5)]
    corpus = _write_corpus(tmp_path / "docs", texts + [texts[1], texts[1]])
    out = tmp_path / "out"
    meta = _prep(corpus, tok_dir, out, test_documents=2, validation_documents=2)
    assert meta["duplicate_documents_removed"] == 2
    assert sum(meta["splits"][s]["documents"] for s in SPLITS) == 5
    all_ids = [d for s in SPLITS for d in set(_table(out, s)["doc_id"])]
    assert sorted(all_ids) == [0, 1, 2, 3, 4]


def test_two_runs_give_identical_files_and_fingerprint(small_tokenizer, long_corpus, tmp_path):
    _, tok_dir = small_tokenizer
    a = _prep(long_corpus, tok_dir, tmp_path / "a")
    b = _prep(long_corpus, tok_dir, tmp_path / "b")
    assert a["fingerprint"] == b["fingerprint"] and len(a["fingerprint"]) == 64
    for split in SPLITS:
        assert pl.split_file(tmp_path / "a", split).read_bytes() == pl.split_file(tmp_path / "b", split).read_bytes()
        assert a["splits"][split]["fingerprint"] == b["splits"][split]["fingerprint"]
    # the train split is shuffled: not in (doc_id, chunk) order
    t = _table(tmp_path / "a", "train")
    keys = list(zip(t["doc_id"], t["chunk"]))
    assert keys != sorted(keys)
    v = _table(tmp_path / "a", "test")
    assert list(zip(v["doc_id"], v["chunk"])) == sorted(zip(v["doc_id"], v["chunk"]))


def test_rerun_is_cached_other_config_raises_unless_overwrite(small_tokenizer, long_corpus, tmp_path, capsys):
    _, tok_dir = small_tokenizer
    out = tmp_path / "out"
    first = _prep(long_corpus, tok_dir, out)
    mtimes = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    capsys.readouterr()

    again = _prep(long_corpus, tok_dir, out)
    assert again == first
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == mtimes
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err == ""
    import shutil

    copied = shutil.copytree(tok_dir, tmp_path / "tokenizer-copy")  # the same vocabulary from another folder
    assert _prep(long_corpus, copied, out) == first

    with pytest.raises(DistilrayError, match=r"another config.*seq_len"):
        pl.prepare_long(
            str(long_corpus), str(tok_dir), str(out), SEQ_LEN + 4, test_documents=2, validation_documents=1, seed=3
        )
    assert pl.read_meta(out) == first  # untouched

    redone = pl.prepare_long(
        str(long_corpus), str(tok_dir), str(out), 9, test_documents=2, validation_documents=1, seed=3, overwrite=True
    )
    assert redone["seq_len"] == 9 and redone["fingerprint"] != first["fingerprint"]
    seq_ids, ids = pl.read_long_split(out, "train")
    assert ids.shape == (redone["splits"]["train"]["sequences"], 9)


def test_half_written_folder_is_redone(small_tokenizer, long_corpus, tmp_path):
    _, tok_dir = small_tokenizer
    out = tmp_path / "out"
    first = _prep(long_corpus, tok_dir, out)
    (out / "meta.json").unlink()
    pl.split_file(out, "train").write_bytes(b"half a file")
    with pytest.raises(DistilrayError, match="not a complete prepare-long folder"):
        pl.read_meta(out)
    with pytest.raises(DistilrayError, match="not a complete prepare-long folder"):
        pl.read_long_split(out, "train")
    again = _prep(long_corpus, tok_dir, out)
    assert again == first
    assert pl.read_long_split(out, "train")[1].shape[0] == first["splits"]["train"]["sequences"]
    assert not [p.name for p in out.iterdir() if p.name.startswith(".")]  # no temporary files left


def test_too_few_documents_is_an_error(small_tokenizer, tmp_path):
    _, tok_dir = small_tokenizer
    corpus = _write_corpus(tmp_path / "docs", [_text(i, 80) for i in range(3)])
    with pytest.raises(DistilrayError, match=r"at least .* = 4 documents.*the corpus has 3"):
        _prep(corpus, tok_dir, tmp_path / "out", test_documents=2, validation_documents=1)
    assert not (tmp_path / "out" / "meta.json").exists()


def test_only_short_train_documents_is_an_error(small_tokenizer, tmp_path):
    _, tok_dir = small_tokenizer
    corpus = _write_corpus(tmp_path / "docs", [f"Short {i}.\n" for i in range(4)])
    with pytest.raises(DistilrayError, match="no training sequences"):
        _prep(corpus, tok_dir, tmp_path / "out", test_documents=1, validation_documents=1)


def test_max_sequences_caps_the_shuffled_train_split(small_tokenizer, long_corpus, tmp_path):
    _, tok_dir = small_tokenizer
    full = _prep(long_corpus, tok_dir, tmp_path / "full")
    capped = _prep(long_corpus, tok_dir, tmp_path / "capped", max_sequences=5)
    assert capped["splits"]["train"]["sequences"] == 5
    assert capped["splits"]["train"]["sequences_before_cap"] == full["splits"]["train"]["sequences"] > 5
    full_ids, full_x = pl.read_long_split(tmp_path / "full", "train")
    cap_ids, cap_x = pl.read_long_split(tmp_path / "capped", "train")
    assert cap_ids == full_ids[:5] and np.array_equal(cap_x, full_x[:5])
    for split in ("validation", "test"):  # held-out splits are not capped
        assert capped["splits"][split]["fingerprint"] == full["splits"][split]["fingerprint"]


def test_read_long_split_round_trip(small_tokenizer, long_corpus, tmp_path):
    _, tok_dir = small_tokenizer
    out = tmp_path / "out"
    meta = _prep(long_corpus, tok_dir, out)
    for split in SPLITS:
        seq_ids, ids = pl.read_long_split(out, split)
        t = _table(out, split)
        assert seq_ids == t["seq_id"]
        assert ids.dtype == np.int64 and ids.shape == (meta["splits"][split]["sequences"], SEQ_LEN)
        assert ids.tolist() == t["input_ids"]
        batches = list(pl.iter_long_split(out, split, batch_size=4))
        assert [s for b, _ in batches for s in b] == seq_ids
        assert np.array_equal(np.concatenate([x for _, x in batches]), ids)
    assert pl.read_meta(out) == meta
    with pytest.raises(DistilrayError, match="unknown split"):
        pl.read_long_split(out, "dev")
    with pytest.raises(DistilrayError, match="no such folder"):
        pl.read_long_split(tmp_path / "missing", "train")


def test_tokenizer_without_bos_is_an_error(small_tokenizer, long_corpus, tmp_path):
    from distilray.tokenizer import load_tokenizer

    tok, tok_dir = small_tokenizer
    no_bos = load_tokenizer(tok_dir)
    no_bos.bos_token = None
    no_bos.save_pretrained(tmp_path / "nobos")
    assert load_tokenizer(tmp_path / "nobos").bos_token_id is None
    with pytest.raises(DistilrayError, match="no BOS token"):
        _prep(long_corpus, tmp_path / "nobos", tmp_path / "out")


def test_cut_windows_and_aliases():
    x, tail = pl.cut_windows(list(range(10, 52)), 5, bos_token_id=0)
    assert tail == 2 and x.shape == (10, 5) and x.dtype == np.int32
    assert (x[:, 0] == 0).all() and x[:, 1:].reshape(-1).tolist() == list(range(10, 50))
    x, tail = pl.cut_windows([1, 2, 3], 5, bos_token_id=0)
    assert x.shape == (0, 5) and tail == 3
    assert pl._resolve_dataset("pg19", "body") == ("hf:deepmind/pg19", "text")
    assert pl._resolve_dataset("gutenberg", "text") == ("gutenberg", "text")
    with pytest.raises(DistilrayError, match="seq_len"):
        pl.prepare_long("pydoc", "unused", "unused", 1)


def test_run_reports_files_and_cache(small_tokenizer, long_corpus, tmp_path):
    _, tok_dir = small_tokenizer
    cfg = config_from(
        PrepareLongConfig,
        dataset=str(long_corpus),
        tokenizer=str(tok_dir),
        seq_len=SEQ_LEN,
        artifacts_dir=str(tmp_path),
    )
    first = pl.run(cfg)
    assert Path(first["output_dir"]).parent == tmp_path.resolve() / "long_data"  # named by dataset, length, config
    assert first["cached"] is False
    assert set(first["files"]) == {"train", "validation", "test", "heldout_validation", "heldout_test", "meta"}
    assert all(Path(p).is_file() for p in first["files"].values())
    second = pl.run(cfg)
    assert second["cached"] is True and second["fingerprint"] == first["fingerprint"]


def test_datasets_folder_holds_the_same_sequences(small_tokenizer, long_corpus, tmp_path):
    import dataclasses

    import datasets

    _, tok_dir = small_tokenizer
    cfg = config_from(PrepareLongConfig, dataset=str(long_corpus), tokenizer=str(tok_dir), seq_len=SEQ_LEN)
    cfg = dataclasses.replace(cfg, output_dir=str(tmp_path / "data"), datasets_folder=True)
    res = pl.run(cfg)
    loaded = datasets.load_from_disk(res["files"]["datasets"])
    for split in ("train", "validation", "test"):
        seq_ids, ids = pl.read_long_split(res["output_dir"], split)
        assert loaded[split]["seq_id"] == seq_ids
        assert np.array_equal(np.array(loaded[split]["input_ids"], dtype=np.int64).reshape(ids.shape), ids)
    assert pl.run(cfg)["files"]["datasets"] == res["files"]["datasets"]  # kept on a re-run
