"""`distilray prepare-long`: long documents -> fixed-length token sequences for long-context training.

The data convention of the token-weighting paper (reference/token_weighting.md section 5), without its
dropped token (pitfall 13):

- documents are split between train / validation / test at the document level: the last
  `test_documents`, then the `validation_documents` before them, of a permutation seeded by `seed`
  are held out, the rest is train. Exact duplicate documents are removed first (the first one is
  kept), so no held-out text is also a training text;
- each document is tokenized whole, without the tokenizer's special tokens (its BOS is never placed
  mid-document; literal special-token text in a document is encoded as text), then cut into windows
  of `seq_len - 1` tokens with step `seq_len - 1`, so no token is dropped between consecutive
  sequences; the last partial window is discarded (counted in meta.json) and a document shorter
  than one window is skipped (counted);
- every sequence is BOS + its window: exactly `seq_len` tokens, one document per sequence, no
  packing, no padding;
- the train sequences are shuffled once (`numpy.random.default_rng(seed)`, the generator the
  document split drew from) and optionally capped at `max_sequences`.

Output folder:

- `train.parquet`, `validation.parquet`, `test.parquet`: columns `seq_id` (string,
  `{split}-{doc_id}-{chunk}`), `doc_id` (int64, the document's index in `corpus.load_documents`
  order), `chunk` (int64, the window's index in its document), `input_ids` (list<int32>, `seq_len`
  long); validation and test in (doc_id, chunk) order;
- `heldout_validation.jsonl`, `heldout_test.jsonl`: `{"doc_id", "text"}` of the whole held-out
  documents (skipped short ones included), for evaluation by text with any tokenizer;
- `datasets/` (with `datasets_folder=true`): the same three splits as a Hugging Face `datasets` folder
  (`datasets.load_from_disk`), derived from the Parquet files, which stay what distilray reads;
- `meta.json`, written last: the config, counts per split and `fingerprint`, a sha256 over the
  ordered seq_ids and input_ids of all splits, by which later stages key what they derive.

Every file is written atomically; a folder without meta.json is redone, one with a meta.json of the
same config is returned as it is, one of another config is an error unless `overwrite`. The output
depends only on the config and the input: two runs give byte-identical files.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import tempfile
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from distilray import corpus
from distilray.console import progress
from distilray.errors import DistilrayError
from distilray.io_utils import atomic_dir, atomic_path, atomic_write_json, atomic_write_text, read_json

log = logging.getLogger(__name__)

SPLITS = ("train", "validation", "test")
HELDOUT = ("validation", "test")
META = "meta.json"
FORMAT = "distilray.prepare_long/1"
ALIASES = {"pg19": "hf:deepmind/pg19"}  # name -> (dataset); PG19's text is in field "text"
TOKENIZE_BATCH = 16  # documents per tokenizer call (a fast tokenizer encodes a batch in parallel)
ROW_GROUP_BYTES = 16 << 20  # about this much input_ids per Parquet row group


def split_file(out_dir: str | Path, split: str) -> Path:
    return Path(out_dir) / f"{split}.parquet"


def heldout_file(out_dir: str | Path, split: str) -> Path:
    return Path(out_dir) / f"heldout_{split}.jsonl"


def _schema():
    import pyarrow as pa

    return pa.schema(
        [
            ("seq_id", pa.string()),
            ("doc_id", pa.int64()),
            ("chunk", pa.int64()),
            ("input_ids", pa.list_(pa.int32())),
        ]
    )


# ------------------------------------------------------------------------------------ config
def _resolve_dataset(dataset: str, text_field: str) -> tuple[str, str]:
    """(dataset as load_documents takes it, text field): aliases mapped, local paths made absolute."""
    if dataset in ALIASES:
        return ALIASES[dataset], "text"
    if dataset.startswith("hf:") or dataset in corpus.known_datasets():
        return dataset, text_field
    path = Path(dataset).expanduser()
    return (str(path.resolve()) if path.exists() else dataset), text_field


def _tokenizer_name(tokenizer_dir: str) -> str:
    path = Path(tokenizer_dir).expanduser()
    return str(path.resolve()) if path.exists() else tokenizer_dir  # else a hub name


def _check_args(seq_len: int, test_documents: int, validation_documents: int, max_sequences: int) -> None:
    if seq_len < 2:
        raise DistilrayError(f"seq_len must be at least 2 (BOS and one token), got {seq_len}")
    for name, value in (
        ("test_documents", test_documents),
        ("validation_documents", validation_documents),
        ("max_sequences", max_sequences),
    ):
        if value < 0:
            raise DistilrayError(f"{name} must be 0 or more, got {value}")


# --------------------------------------------------------------------------------- the core
def document_split(n_docs: int, test_documents: int, validation_documents: int, rng) -> dict[str, np.ndarray]:
    """Document indices per split, each sorted: the last `test_documents` of `rng.permutation(n_docs)`
    are test, the `validation_documents` before them validation, the rest train."""
    needed = test_documents + validation_documents + 1
    if n_docs < needed:
        raise DistilrayError(
            f"prepare-long needs at least test_documents + validation_documents + 1 = {needed} documents "
            f"({test_documents} test, {validation_documents} validation, 1 or more train); the corpus has {n_docs}"
        )
    perm = rng.permutation(n_docs)
    n_train = n_docs - test_documents - validation_documents
    return {
        "train": np.sort(perm[:n_train]),
        "validation": np.sort(perm[n_train : n_train + validation_documents]),
        "test": np.sort(perm[n_train + validation_documents :]),
    }


def cut_windows(ids, seq_len: int, bos_token_id: int) -> tuple[np.ndarray, int]:
    """(sequences (n, seq_len) int32, tokens discarded at the tail): BOS + consecutive windows of
    `seq_len - 1` tokens, step `seq_len - 1`, so no token between two sequences is dropped."""
    body = seq_len - 1
    ids = np.asarray(ids, dtype=np.int64)
    n = len(ids) // body
    out = np.empty((n, seq_len), dtype=np.int32)
    out[:, 0] = bos_token_id
    out[:, 1:] = ids[: n * body].reshape(n, body)
    return out, len(ids) - n * body


def _encode(tokenizer, docs: list[str]) -> list[list[int]]:
    """Token ids of whole documents: no special tokens added, special-token text kept as text, and no
    warning that a document is longer than the model's maximum length (it is cut afterwards)."""
    if not docs:
        return []
    return tokenizer(docs, add_special_tokens=False, split_special_tokens=True, verbose=False)["input_ids"]


def _dedup(docs: list[str]) -> tuple[list[int], int]:
    """Indices of the first occurrence of each distinct text, and how many duplicates were left out."""
    seen: set[bytes] = set()
    keep = []
    for i, doc in enumerate(docs):
        key = hashlib.sha256(doc.encode("utf-8")).digest()
        if key not in seen:
            seen.add(key)
            keep.append(i)
    return keep, len(docs) - len(keep)


class _SplitWindows:
    """One split's sequences, in document order, spilled to a temporary int32 file beside the output
    (a long-document corpus at seq_len 32k does not fit in memory twice)."""

    def __init__(self, out_dir: Path, split: str, seq_len: int) -> None:
        self.seq_len = seq_len
        fd, self.path = tempfile.mkstemp(prefix=f".{split}.windows.", suffix=".tmp", dir=out_dir)
        self.file = os.fdopen(fd, "wb")
        self.doc_ids: list[np.ndarray] = []
        self.chunks: list[np.ndarray] = []
        self.n = 0
        self.documents = self.documents_skipped = self.tokens_discarded = self.tokens_skipped = 0

    def add(self, doc_id: int, ids: list[int], bos_token_id: int) -> None:
        self.documents += 1
        windows, tail = cut_windows(ids, self.seq_len, bos_token_id)
        if len(windows) == 0:
            self.documents_skipped += 1
            self.tokens_skipped += tail
            return
        self.tokens_discarded += tail
        self.file.write(windows.tobytes())
        self.doc_ids.append(np.full(len(windows), doc_id, dtype=np.int64))
        self.chunks.append(np.arange(len(windows), dtype=np.int64))
        self.n += len(windows)

    def close(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(sequences as a read-only memmap (n, seq_len), doc_ids, chunks)."""
        self.file.close()
        doc_ids = np.concatenate(self.doc_ids) if self.doc_ids else np.zeros(0, dtype=np.int64)
        chunks = np.concatenate(self.chunks) if self.chunks else np.zeros(0, dtype=np.int64)
        if self.n == 0:
            return np.zeros((0, self.seq_len), dtype=np.int32), doc_ids, chunks
        return np.memmap(self.path, dtype=np.int32, mode="r", shape=(self.n, self.seq_len)), doc_ids, chunks

    def remove(self) -> None:
        if not self.file.closed:
            self.file.close()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)


def _write_split(
    path: Path,
    split: str,
    windows: np.ndarray,
    doc_ids: np.ndarray,
    chunks: np.ndarray,
    order: np.ndarray,
    hashers: list,
) -> None:
    """Write rows `order` of a split to Parquet, feeding (seq_id, input_ids) of each row to the hashers."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    seq_len = windows.shape[1]
    rows_per_group = max(1, ROW_GROUP_BYTES // (4 * seq_len))
    schema = _schema()
    with atomic_path(path) as tmp:
        with pq.ParquetWriter(tmp, schema) as writer:
            if len(order) == 0:
                writer.write_table(schema.empty_table())
            for start in range(0, len(order), rows_per_group):
                rows = order[start : start + rows_per_group]
                block = np.ascontiguousarray(windows[rows], dtype="<i4")
                seq_ids = [f"{split}-{d}-{c}" for d, c in zip(doc_ids[rows].tolist(), chunks[rows].tolist())]
                for seq_id, row in zip(seq_ids, block):
                    for h in hashers:
                        h.update(seq_id.encode("utf-8") + b"\0")
                        h.update(row.tobytes())
                offsets = pa.array(np.arange(0, (len(rows) + 1) * seq_len, seq_len, dtype=np.int32))
                input_ids = pa.ListArray.from_arrays(offsets, pa.array(block.reshape(-1)))
                table = pa.table(
                    {
                        "seq_id": pa.array(seq_ids, pa.string()),
                        "doc_id": pa.array(doc_ids[rows], pa.int64()),
                        "chunk": pa.array(chunks[rows], pa.int64()),
                        "input_ids": input_ids,
                    },
                    schema=schema,
                )
                writer.write_table(table, row_group_size=len(rows))


def _config(
    dataset: str,
    text_field: str,
    tokenizer_dir: str,
    vocab: str,
    seq_len: int,
    test_documents: int,
    validation_documents: int,
    seed: int,
    max_sequences: int,
) -> dict[str, Any]:
    from distilray.config import CorpusSpec

    return {
        "dataset": dataset,
        "text_field": text_field,
        # the contents of a local corpus's files (the name alone for hf:), as corpus caches use
        "source_fingerprint": corpus.corpus_fingerprint(CorpusSpec(dataset=dataset, text_field=text_field)),
        "tokenizer_dir": tokenizer_dir,
        "vocab_fingerprint": vocab,
        "seq_len": seq_len,
        "test_documents": test_documents,
        "validation_documents": validation_documents,
        "seed": seed,
        "max_sequences": max_sequences,
    }


def _complete_meta(out: Path) -> dict[str, Any] | None:
    """The folder's meta.json when it and the files it names are all there, else None (redo)."""
    try:
        meta = read_json(out / META)
    except (OSError, ValueError):
        return None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT or "config" not in meta:
        return None
    files = [split_file(out, s) for s in SPLITS] + [heldout_file(out, s) for s in HELDOUT]
    return meta if all(f.is_file() for f in files) else None


def _prepare(
    dataset: str,
    tokenizer_dir: str,
    out_dir: str,
    seq_len: int,
    text_field: str,
    test_documents: int,
    validation_documents: int,
    seed: int,
    max_sequences: int,
    overwrite: bool,
) -> tuple[dict[str, Any], bool]:
    """(meta, whether it came from the cache)."""
    from distilray.tokenizer import load_tokenizer, vocab_fingerprint

    _check_args(seq_len, test_documents, validation_documents, max_sequences)
    dataset, text_field = _resolve_dataset(dataset, text_field)
    tokenizer = load_tokenizer(tokenizer_dir)
    bos = tokenizer.bos_token_id
    if bos is None:
        raise DistilrayError(f"tokenizer {tokenizer_dir!r} has no BOS token; every long sequence starts with BOS")
    config = _config(
        dataset,
        text_field,
        _tokenizer_name(tokenizer_dir),
        vocab_fingerprint(tokenizer),
        seq_len,
        test_documents,
        validation_documents,
        seed,
        max_sequences,
    )

    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise DistilrayError(f"{out} exists and is not a folder")
    meta = _complete_meta(out)
    if meta is not None:
        # the tokenizer counts by its vocabulary (vocab_fingerprint), not by the folder it was read from
        changed = sorted(
            k
            for k in set(config) | set(meta["config"])
            if k != "tokenizer_dir" and config.get(k) != meta["config"].get(k)
        )
        if not changed:
            return meta, True
        if not overwrite:
            raise DistilrayError(
                f"{out} holds long sequences of another config (differs in: {', '.join(changed)}); "
                "choose another output folder or pass overwrite"
            )
    out.mkdir(parents=True, exist_ok=True)
    with contextlib.suppress(FileNotFoundError):
        (out / META).unlink()  # from here until the new meta.json, the folder reads as incomplete

    docs = corpus.load_documents(dataset, text_field)
    n_total = len(docs)
    keep, duplicates = _dedup(docs)
    rng = np.random.default_rng(seed)
    where = document_split(len(keep), test_documents, validation_documents, rng)
    split_of = {int(keep[i]): split for split in SPLITS for i in where[split]}  # doc_id -> split

    for split in HELDOUT:
        held = [d for d in sorted(split_of) if split_of[d] == split]
        lines = [json.dumps({"doc_id": d, "text": docs[d]}, ensure_ascii=False) + "\n" for d in held]
        atomic_write_text(heldout_file(out, split), "".join(lines))

    parts = {s: _SplitWindows(out, s, seq_len) for s in SPLITS}
    try:
        doc_ids = sorted(split_of)
        with progress(len(doc_ids), "prepare-long: tokenize", unit="doc") as bar:
            for start in range(0, len(doc_ids), TOKENIZE_BATCH):
                batch = doc_ids[start : start + TOKENIZE_BATCH]
                for d, ids in zip(batch, _encode(tokenizer, [docs[d] for d in batch])):
                    parts[split_of[d]].add(d, ids, bos)
                bar.update(len(batch))
        del docs

        total = hashlib.sha256(f"{FORMAT}\nseq_len={seq_len}\n".encode())
        splits: dict[str, dict[str, Any]] = {}
        for split in SPLITS:
            part = parts[split]
            windows, seq_doc_ids, chunks = part.close()
            order = np.arange(part.n)
            if split == "train":
                order = rng.permutation(part.n)
                if max_sequences:
                    order = order[:max_sequences]
            if len(order) == 0:
                if split == "train":
                    raise DistilrayError(
                        f"no training sequences: each of the {part.documents} train documents is shorter than "
                        f"seq_len - 1 = {seq_len - 1} tokens; lower seq_len"
                    )
                log.warning("prepare-long: the %s split has no sequence (its documents are too short)", split)
            total.update(f"\n{split}\n".encode())
            own = hashlib.sha256()
            _write_split(split_file(out, split), split, windows, seq_doc_ids, chunks, order, [total, own])
            del windows
            part.remove()
            splits[split] = {
                "file": split_file(out, split).name,
                "documents": part.documents,
                "documents_used": part.documents - part.documents_skipped,
                "documents_skipped": part.documents_skipped,
                "tokens_in_skipped_documents": part.tokens_skipped,
                "sequences": int(len(order)),
                "sequences_before_cap": part.n,
                "tokens_kept": int(len(order)) * (seq_len - 1),  # document tokens in the file, BOS not counted
                "tokens_discarded": part.tokens_discarded,  # at document tails, over all documents of the split
                "fingerprint": own.hexdigest(),
            }
    finally:
        for part in parts.values():
            part.remove()

    meta = {
        "format": FORMAT,
        "config": config,
        "dataset": dataset,
        "tokenizer_dir": config["tokenizer_dir"],
        "vocab_fingerprint": config["vocab_fingerprint"],
        "bos_token_id": int(bos),
        "seq_len": seq_len,
        "seed": seed,
        "documents_total": n_total,
        "duplicate_documents_removed": duplicates,
        "splits": splits,
        "heldout_texts": {s: heldout_file(out, s).name for s in HELDOUT},
        "fingerprint": total.hexdigest(),
    }
    atomic_write_json(out / META, meta)  # last: its presence marks the folder complete
    return meta, False


def prepare_long(
    dataset: str,
    tokenizer_dir: str,
    out_dir: str,
    seq_len: int,
    text_field: str = "text",
    test_documents: int = 1,
    validation_documents: int = 1,
    seed: int = 0,
    max_sequences: int = 0,
    overwrite: bool = False,
) -> dict[str, Any]:
    """Cut the documents of `dataset` (a corpus name as `corpus.load_documents` takes it, or `pg19`)
    into BOS + (seq_len - 1)-token sequences in `out_dir`; return its meta.json (see the module doc).

    A complete `out_dir` of the same config is returned as it is; one of another config raises unless
    `overwrite`."""
    meta, _ = _prepare(
        dataset,
        tokenizer_dir,
        out_dir,
        seq_len,
        text_field,
        test_documents,
        validation_documents,
        seed,
        max_sequences,
        overwrite,
    )
    return meta


# ------------------------------------------------------------------------------------ readers
def read_meta(out_dir: str | Path) -> dict[str, Any]:
    """meta.json of a complete prepare-long folder."""
    out = Path(out_dir)
    if not out.is_dir():
        raise DistilrayError(f"{out}: no such folder; run prepare-long first")
    if not (out / META).is_file():
        raise DistilrayError(f"{out} is not a complete prepare-long folder (no {META}); run prepare-long again")
    meta = _complete_meta(out)
    if meta is None:
        raise DistilrayError(
            f"{out}: {META} is not a prepare-long meta, or files it names are missing; run prepare-long again"
        )
    return meta


def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise DistilrayError(f"unknown split {split!r} (one of {', '.join(SPLITS)})")


def _rows(table, seq_len: int, where: str) -> tuple[list[str], np.ndarray]:
    ids = table.column("input_ids").combine_chunks()
    flat = ids.flatten().to_numpy(zero_copy_only=False)
    if len(flat) != len(ids) * seq_len:
        raise DistilrayError(f"{where}: input_ids are not all {seq_len} long")
    return table.column("seq_id").to_pylist(), flat.astype(np.int64).reshape(len(ids), seq_len)


def read_long_split(out_dir: str | Path, split: str) -> tuple[list[str], np.ndarray]:
    """(seq_ids, input_ids (n, seq_len) int64) of one split, in file order (train: shuffled)."""
    import pyarrow.parquet as pq

    _check_split(split)
    meta = read_meta(out_dir)
    path = split_file(out_dir, split)
    try:
        table = pq.read_table(path, columns=["seq_id", "input_ids"])
    except (OSError, ValueError) as e:
        raise DistilrayError(f"{path} is not a readable Parquet file: {e}") from None
    return _rows(table, meta["seq_len"], str(path))


def iter_long_split(out_dir: str | Path, split: str, batch_size: int = 64) -> Iterator[tuple[list[str], np.ndarray]]:
    """`read_long_split` in batches of up to `batch_size` sequences, for splits too big for memory."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    _check_split(split)
    meta = read_meta(out_dir)
    path = split_file(out_dir, split)
    try:
        for batch in pq.ParquetFile(path).iter_batches(batch_size=batch_size, columns=["seq_id", "input_ids"]):
            yield _rows(pa.Table.from_batches([batch]), meta["seq_len"], str(path))
    except (OSError, ValueError) as e:
        raise DistilrayError(f"{path} is not a readable Parquet file: {e}") from None


def read_heldout_texts(out_dir: str | Path, split: str) -> list[tuple[int, str]]:
    """(doc_id, text) of the whole held-out documents of `validation` or `test`."""
    if split not in HELDOUT:
        raise DistilrayError(f"held-out texts exist for {' and '.join(HELDOUT)}, not {split!r}")
    read_meta(out_dir)
    with open(heldout_file(out_dir, split), encoding="utf-8") as f:
        return [(r["doc_id"], r["text"]) for r in map(json.loads, f) if r]


def write_datasets_folder(out_dir: str | Path) -> Path:
    """The prepared splits as a `datasets` folder (a DatasetDict) at out_dir/datasets; kept when complete."""
    import datasets

    read_meta(out_dir)
    dest = Path(out_dir) / "datasets"
    if (dest / "dataset_dict.json").is_file():
        return dest
    splits = {s: datasets.Dataset.from_parquet(str(split_file(out_dir, s))) for s in SPLITS}
    with atomic_dir(dest) as tmp:
        datasets.DatasetDict(splits).save_to_disk(str(tmp))
    return dest


# ------------------------------------------------------------------------------------ the CLI
def run(cfg) -> dict[str, Any]:
    """`distilray prepare-long` (a PrepareLongConfig). An empty `tokenizer` means the project's BPE trained on
    the dataset (cached; its vocabulary has seen every document, the held-out ones too: only the vocabulary);
    an empty `output_dir` a folder under artifacts_dir/long_data named by the dataset, length and config."""
    from distilray.config import CorpusSpec, config_hash
    from distilray.pipelines import train_tokenizer
    from distilray.tokenizer import load_tokenizer, vocab_fingerprint

    tok_dir = cfg.tokenizer or str(
        train_tokenizer.get_or_train(
            CorpusSpec(dataset=cfg.dataset, text_field=cfg.text_field), cfg.vocab_size, cfg.artifacts_dir
        )
    )
    out = cfg.output_dir
    if not out:
        import dataclasses
        import re

        key = config_hash(dataclasses.replace(cfg, tokenizer=vocab_fingerprint(load_tokenizer(tok_dir))))
        source = corpus.corpus_fingerprint(CorpusSpec(dataset=cfg.dataset, text_field=cfg.text_field))[:6]
        slug = re.sub(r"[^A-Za-z0-9_.-]+", "_", Path(cfg.dataset).name or cfg.dataset)
        out = str(Path(cfg.artifacts_dir).resolve() / "long_data" / f"{slug}-{cfg.seq_len}-{key}-{source}")
    meta, cached = _prepare(
        cfg.dataset,
        str(tok_dir),
        out,
        cfg.seq_len,
        cfg.text_field,
        cfg.test_documents,
        cfg.validation_documents,
        cfg.seed,
        cfg.max_sequences,
        cfg.overwrite,
    )
    files = {
        **{s: str(split_file(out, s)) for s in SPLITS},
        **{f"heldout_{s}": str(heldout_file(out, s)) for s in HELDOUT},
        "meta": str(Path(out) / META),
    }
    if cfg.datasets_folder:
        files["datasets"] = str(write_datasets_folder(out))
    return {
        "output_dir": str(out),
        "cached": cached,
        "fingerprint": meta["fingerprint"],
        "seq_len": meta["seq_len"],
        "sequences": {s: meta["splits"][s]["sequences"] for s in SPLITS},
        "tokens_discarded": {s: meta["splits"][s]["tokens_discarded"] for s in SPLITS},
        "files": files,
    }
