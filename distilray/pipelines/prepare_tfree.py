"""T-Free data preparation: a corpus -> text stores per split (+ aligned indices), and word counts with Ray
Data for the T-Free dictionary.

Output folder of `prepare_tfree`:

- `<split>/` for train, validation and test: a text store (`distilray.tfree.textstore`), of documents
  with `aligned-<min_bytes>-<seed>.safetensors` beside them, or of conversations (`instruction=True`);
- `meta.json`, written last: format, config (source fingerprint included) and per split the rows, bytes,
  store fingerprint and aligned entries.

A folder with a complete meta.json of the same config is returned without work; one of another config is
an error unless `overwrite`. Pre-training text comes through `corpus.load_splits`, so every corpus name
works; instruction data is read from a local .jsonl/.json file or folder (one conversation per record,
forms in `textstore.conversation_segments`) and split at the record level with the same seeded split.
"""

from __future__ import annotations

import contextlib
import json
import sys
from collections import Counter
from pathlib import Path
from typing import Any, Iterable

import numpy as np

from distilray import corpus
from distilray.config import CorpusSpec
from distilray.errors import DistilrayError
from distilray.io_utils import atomic_write_json, read_json
from distilray.tfree import textstore
from distilray.tfree.wordsplit import encode_document

FORMAT = "distilray.prepare_tfree/1"
META = "meta.json"
SPLITS = corpus.SPLITS
COUNT_BLOCKS = 8  # Ray Data blocks for word counting: a few per CPU here, enough to spread on a cluster


def _resolve(dataset: str) -> str:
    """Local paths made absolute, so the config (and its cache key) does not depend on the cwd."""
    if dataset.startswith("hf:") or dataset in corpus.known_datasets():
        return dataset
    path = Path(dataset).expanduser()
    return str(path.resolve()) if path.exists() else dataset


def _read_conversations(dataset: str) -> list[str]:
    """Each record of a local .jsonl/.json source as one line of JSON (what the split shuffles)."""
    path = Path(dataset)
    files = sorted(path.rglob("*.json*")) if path.is_dir() else [path]
    files = [f for f in files if f.suffix in (".jsonl", ".json") and not f.name.startswith(".")]
    if not path.exists() or not files:
        raise DistilrayError(f"instruction data {dataset!r}: expected a .jsonl/.json file or a folder of them")
    records: list[Any] = []
    for f in files:
        try:
            text = f.read_text(encoding="utf-8")
            if f.suffix == ".jsonl":
                records += [json.loads(line) for line in text.splitlines() if line.strip()]
            else:
                loaded = json.loads(text)
                records += loaded if isinstance(loaded, list) else [loaded]
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise DistilrayError(f"{f} is not valid UTF-8 JSON: {e}") from None
    for r in records:
        textstore.conversation_segments(r)  # names a bad record before any work
    return [json.dumps(r, ensure_ascii=False) for r in records]


def _complete_meta(out: Path) -> dict[str, Any] | None:
    with contextlib.suppress(OSError, ValueError):
        meta = read_json(out / META)
        if isinstance(meta, dict) and meta.get("format") == FORMAT and "config" in meta:
            if all((out / s / textstore.INDEX_FILE).is_file() for s in SPLITS):
                return meta
    return None


def prepare_tfree(
    dataset: str,
    output_dir: str | Path,
    min_bytes: int = 20_000,
    seed: int = 42,
    instruction: bool = False,
    overwrite: bool = False,
) -> dict[str, Any]:
    """Write one store per split under `output_dir/<split>/`; returns meta.json's contents (+ `cached`)."""
    if min_bytes < 1:
        raise DistilrayError(f"min_bytes must be at least 1, got {min_bytes}")
    spec = CorpusSpec(dataset=_resolve(dataset))
    config = {
        "dataset": spec.dataset,
        "source_fingerprint": corpus.corpus_fingerprint(spec),
        "split": {"val_fraction": spec.val_fraction, "test_fraction": spec.test_fraction, "seed": spec.split_seed},
        "instruction": instruction,
        "min_bytes": None if instruction else min_bytes,
        "seed": None if instruction else seed,
    }
    out = Path(output_dir)
    if out.exists() and not out.is_dir():
        raise DistilrayError(f"{out} exists and is not a folder")
    meta = _complete_meta(out)
    if meta is not None:
        if meta["config"] == config:
            return {**meta, "cached": True}
        if not overwrite:
            changed = sorted(k for k in config if config[k] != meta["config"].get(k))
            raise DistilrayError(
                f"{out} holds T-Free data of another config (differs in: {', '.join(changed)}); "
                "choose another output folder or pass overwrite"
            )
    out.mkdir(parents=True, exist_ok=True)
    with contextlib.suppress(FileNotFoundError):
        (out / META).unlink()  # until the new meta.json the folder reads as incomplete

    if instruction:
        records = _read_conversations(spec.dataset)
        # one JSON line per record; no cutting of long ones (a record is one sample)
        parts = corpus.split_documents(records, spec.val_fraction, spec.test_fraction, spec.split_seed, sys.maxsize)
    else:
        parts = corpus.load_splits(spec)
    splits: dict[str, dict[str, Any]] = {}
    for split in SPLITS:
        folder = out / split
        if instruction:
            index = textstore.write_instruction_store(folder, (json.loads(r) for r in parts[split]))
        else:
            index = textstore.write_text_store(folder, parts[split])
        splits[split] = {"rows": index["rows"], "bytes": index["bytes"], "fingerprint": index["fingerprint"]}
        if not instruction:
            textstore.write_aligned_index(folder, min_bytes, seed)
            aligned = textstore.AlignedIndex(folder, min_bytes, seed)
            splits[split] |= {
                "aligned": textstore.aligned_index_path(folder, min_bytes, seed).name,
                "aligned_entries": len(aligned),
                "aligned_short_last_entry": aligned.short_last_entry,  # the tail entry, under min_bytes
            }
    meta = {"format": FORMAT, "config": config, "splits": splits}
    atomic_write_json(out / META, meta)
    return {**meta, "cached": False}


# ------------------------------------------------------------------------------ word counts
def _count_texts(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Ray Data map: documents -> one row with this block's word counts as JSON."""
    counts = Counter(w for text in batch["text"] for w in encode_document(str(text)))
    return {"counts": np.array([json.dumps(counts, ensure_ascii=False)])}


def _count_store_rows(batch: dict[str, np.ndarray], folder: str) -> dict[str, np.ndarray]:
    """Ray Data map: ranges of document indices -> counts; the task memory-maps the store itself, so no
    text passes through the object store (the folder must be visible to workers: local or shared disk)."""
    store = textstore.TextStore(folder)
    counts: Counter[str] = Counter()
    for start, end in zip(batch["start"], batch["end"]):
        for i in range(int(start), int(end)):
            counts.update(encode_document(store[i]))
    return {"counts": np.array([json.dumps(counts, ensure_ascii=False)])}


def count_words(
    texts_or_store: Iterable[str] | textstore.TextStore | str | Path, num_blocks: int = COUNT_BLOCKS
) -> dict:
    """Word counts (`encode_document` words, EOT included) over documents or a text store (object or folder),
    counted per block by Ray Data tasks and summed on the driver: the counts of one pass over all texts."""
    import ray

    from distilray.actors.cluster import ensure_ray

    ensure_ray()
    if isinstance(texts_or_store, (str, Path)):
        texts_or_store = textstore.TextStore(texts_or_store)
    if isinstance(texts_or_store, textstore.TextStore):
        n = len(texts_or_store)
        bounds = np.linspace(0, n, max(1, min(num_blocks, n)) + 1).astype(int)
        items = [{"start": int(s), "end": int(e)} for s, e in zip(bounds[:-1], bounds[1:])]
        fn, kwargs = _count_store_rows, {"folder": str(texts_or_store.folder.resolve())}
    else:
        items = [{"text": t} for t in texts_or_store]
        fn, kwargs = _count_texts, {}
    if not items:
        return {}
    ds = ray.data.from_items(items, override_num_blocks=max(1, min(num_blocks, len(items))))
    counted = ds.map_batches(fn, fn_kwargs=kwargs, batch_size=None, batch_format="numpy")  # one call per block
    total: Counter[str] = Counter()
    for row in counted.iter_rows():
        total.update(json.loads(str(row["counts"])))
    return dict(total)


def save_word_counts(path: str | Path, counts: dict[str, int]) -> None:
    """JSON object word -> count, most frequent first (ties by word): readable and diff-able, never a pickle."""
    ordered = dict(sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])))
    atomic_write_json(path, {"format": "distilray.tfree.word_counts/1", "counts": ordered}, indent=None)


def load_word_counts(path: str | Path) -> dict[str, int]:
    try:
        data = read_json(path)
    except (OSError, ValueError) as e:
        raise DistilrayError(f"cannot read word counts {path}: {e}") from None
    counts = data.get("counts") if isinstance(data, dict) else None
    if not isinstance(counts, dict) or not all(isinstance(v, int) for v in counts.values()):
        raise DistilrayError(f"{path} is not a word-count file (expected {{'counts': {{word: int}}}})")
    return counts
