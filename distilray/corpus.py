"""Text sources -> documents -> train/validation/test splits.

A corpus is named by one string (`CorpusSpec.dataset`):

- `pydoc`: the built-in default, the Python reference documentation in the standard library;
- a data set of ../shared/data (see `known_datasets()`), found through `shared_data_dir()`;
- a local `.txt` / `.jsonl` / `.json` / `.parquet` file, or a folder of them (recursive);
- `hf:NAME` or `hf:NAME:CONFIG`, a Hugging Face dataset (needs the Hub or a local cache).

Plain Python: no ray here, so every pipeline and test can read text the same way.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import random
from pathlib import Path
from typing import Any

from distilray.config import CorpusSpec
from distilray.errors import DistilrayError

BUILTIN = "pydoc"
SPLITS = ("train", "validation", "test")
LOCAL_SUFFIXES = (".txt", ".jsonl", ".json", ".parquet")
MAX_PIECE_CHARS = 4000

# name -> path under shared_data_dir()
SHARED_DATASETS: dict[str, str] = {
    "tinyshakespeare": "tinyshakespeare.txt",
    "wikitext2": "wikitext2",
    "dockerfile": "dockerfiles.jsonl",
    "medquad": "medquad_subset.jsonl",
    "cnndm": "cnndm_sample.jsonl",
    "gutenberg": "gutenberg",
    "lambada-dev": "lambada_dev_plain_text.txt",
}


def known_datasets() -> list[str]:
    return [BUILTIN, *SHARED_DATASETS]


def shared_data_dir() -> Path:
    """The ../shared/data folder: $DISTILRAY_DATA_DIR, else next to the repository or the cwd."""
    env = os.environ.get("DISTILRAY_DATA_DIR")
    if env:
        path = Path(env).expanduser()
        if not path.is_dir():
            raise DistilrayError(f"DISTILRAY_DATA_DIR={env} is not a folder")
        return path
    repo_root = Path(__file__).resolve().parent.parent
    for candidate in (repo_root / ".." / "shared" / "data", Path.cwd() / ".." / "shared" / "data"):
        if candidate.is_dir():
            return candidate.resolve()
    raise DistilrayError(
        "shared data folder not found (looked for ../shared/data next to the repository and the "
        "current directory); set DISTILRAY_DATA_DIR to the folder holding the data sets"
    )


# ------------------------------------------------------------------------------- file readers
def _read_txt(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise DistilrayError(f"{path} is not valid UTF-8 text: {e}") from None


def _json_records(path: Path) -> list[tuple[str, Any]]:
    """(location for messages, record) for each object of a .jsonl or .json file."""
    text = _read_txt(path)
    try:
        if path.suffix.lower() == ".jsonl":
            lines = enumerate(text.splitlines(), start=1)
            return [(f"{path}:{i}", json.loads(line)) for i, line in lines if line.strip()]
        records = json.loads(text)
    except json.JSONDecodeError as e:
        raise DistilrayError(f"{path} is not valid JSON: {e}") from None
    if not isinstance(records, list):
        raise DistilrayError(f"{path}: expected a JSON list of objects")
    return [(f"{path} item {i}", r) for i, r in enumerate(records)]


def _read_json_field(path: Path, text_field: str) -> list[str]:
    texts = []
    for where, record in _json_records(path):
        if not isinstance(record, dict) or text_field not in record:
            keys = ", ".join(sorted(record)) if isinstance(record, dict) else "not an object"
            raise DistilrayError(f"{where}: no field {text_field!r} (fields: {keys}); set corpus.text_field")
        value = record[text_field]
        if value is not None and not isinstance(value, str):
            raise DistilrayError(f"{where}: field {text_field!r} is not a string")
        texts.append(value or "")
    return texts


def _read_parquet(path: Path, text_field: str) -> list[str]:
    import pyarrow.parquet as pq  # lazy: only Parquet users pay for the import

    try:
        names = pq.read_schema(path).names
        if text_field in names:
            return [v or "" for v in pq.read_table(path, columns=[text_field]).column(text_field).to_pylist()]
    except (OSError, ValueError) as e:  # pyarrow's ArrowInvalid is a ValueError, ArrowIOError an OSError
        raise DistilrayError(f"{path} is not a readable Parquet file: {e}") from None
    columns = ", ".join(names)
    raise DistilrayError(f"{path}: no column {text_field!r} (columns: {columns}); set corpus.text_field")


def _read_file(path: Path, text_field: str) -> list[str]:
    suffix = path.suffix.lower()
    if suffix == ".txt":
        return [_read_txt(path)]  # one document per file
    if suffix in (".jsonl", ".json"):
        return _read_json_field(path, text_field)
    if suffix == ".parquet":
        return _read_parquet(path, text_field)
    raise DistilrayError(f"{path}: unsupported file type {suffix!r} (use one of {', '.join(LOCAL_SUFFIXES)})")


def _is_preprocessed_dir(path: Path) -> bool:
    return path.is_dir() and all((path / f"{s}.json").is_file() for s in SPLITS)


def _local_files(path: Path) -> list[Path]:
    """The files a local corpus is read from; a folder's hidden files (e.g. temporary writes) are skipped."""
    if path.is_file():
        return [path]
    if _is_preprocessed_dir(path):  # our own output: stats.json beside the splits is not text
        return [path / f"{s}.json" for s in SPLITS]
    return sorted(
        p
        for p in path.rglob("*")
        if p.is_file()
        and p.suffix.lower() in LOCAL_SUFFIXES
        and not any(part.startswith(".") for part in p.relative_to(path).parts)
    )


# --------------------------------------------------------------------------- named data sets
def _shared_path(name: str) -> Path:
    path = shared_data_dir() / SHARED_DATASETS[name]
    if not path.exists():
        raise DistilrayError(f"data set {name!r}: {path} not found")
    return path


def _wikitext_articles(path: Path) -> list[str]:
    """Cut a WikiText raw file at its ` = Title = ` lines.

    A title line sits between two blank lines; this tells titles apart from the formula lines in
    wiki.test.raw that also look like ` = ... = `. Sections (` = = ... = = `) stay inside articles.
    """
    lines = _read_txt(path).split("\n")
    articles: list[list[str]] = []
    for i, line in enumerate(lines):
        is_title = (
            line.startswith(" = ")
            and line.endswith(" = ")
            and not line.startswith(" = = ")
            and i > 0
            and not lines[i - 1].strip()
            and i + 1 < len(lines)
            and not lines[i + 1].strip()
        )
        if is_title or not articles:
            articles.append([])
        articles[-1].append(line)
    docs = []
    for lines_ in articles:
        while lines_ and not lines_[-1].strip():  # drop the blank lines before the next title
            lines_.pop()
        if any(line.strip() for line in lines_):
            docs.append("\n".join(lines_) + "\n")
    return docs


def _load_shared(name: str) -> list[str]:
    path = _shared_path(name)
    if name == "wikitext2":
        return _wikitext_articles(path / "wiki.valid.raw") + _wikitext_articles(path / "wiki.test.raw")
    if name == "lambada-dev":
        return _read_txt(path).splitlines()  # one passage per line
    if name == "gutenberg":
        return [_read_txt(p) for p in sorted(path.glob("*.txt"))]  # one document per book
    field = {"dockerfile": "text", "medquad": "answer", "cnndm": "article"}.get(name, "text")
    return _read_file(path, field)


def load_cnndm_pairs(path: str | Path | None = None) -> list[tuple[str, str]]:
    """(article, highlights) pairs of the CNN/DailyMail sample, for summarization tasks."""
    src = Path(path) if path else _shared_path("cnndm")
    return list(zip(_read_json_field(src, "article"), _read_json_field(src, "highlights")))


def _pydoc_topics() -> list[str]:
    from pydoc_data.topics import topics

    return [topics[name] for name in sorted(topics)]  # sorted: dict order is not a contract


# ----------------------------------------------------------------------------- Hugging Face
def _load_hf(dataset: str, text_field: str) -> list[str]:
    """`hf:NAME[:CONFIG]` -> texts of all its splits. Offline mode is the user's choice (HF_HUB_OFFLINE)."""
    parts = dataset[len("hf:") :].split(":")
    if not parts[0] or len(parts) > 2:
        raise DistilrayError(f"bad Hugging Face dataset {dataset!r}: use hf:NAME or hf:NAME:CONFIG")
    name, config = parts[0], (parts[1] if len(parts) == 2 else None)
    try:
        import datasets  # lazy: heavy, and only needed for hub data
    except ImportError:
        raise DistilrayError(f"{dataset}: the `datasets` package is not installed") from None
    try:
        loaded = datasets.load_dataset(name, config)
    except Exception as e:  # noqa: BLE001 - offline, unknown name, bad config: all the user's to fix
        raise DistilrayError(
            f"could not load Hugging Face dataset {dataset!r}: {type(e).__name__}: {e}. Check the name "
            "and config, and that the Hugging Face Hub is reachable (or the data set is in the local "
            "cache when HF_HUB_OFFLINE / HF_DATASETS_OFFLINE is set)"
        ) from None
    texts: list[str] = []
    for split in sorted(loaded):
        if text_field not in loaded[split].column_names:
            columns = ", ".join(loaded[split].column_names)
            raise DistilrayError(f"{dataset} split {split}: no column {text_field!r} (columns: {columns})")
        texts += [t or "" for t in loaded[split][text_field]]
    return texts


# ------------------------------------------------------------------------------ public API
def _non_empty(dataset: str, docs: list[str]) -> list[str]:
    kept = [d for d in docs if d.strip()]
    if not kept:
        raise DistilrayError(f"corpus {dataset!r} has no text")
    return kept


def load_documents(dataset: str, text_field: str = "text") -> list[str]:
    """All documents of a corpus, in a fixed order, without empty ones.

    `text_field` applies to local .jsonl/.json/.parquet files and HF datasets; the named data sets
    know their own fields (medquad: answer, cnndm: article).
    """
    if dataset.startswith("hf:"):
        docs = _load_hf(dataset, text_field)
    elif dataset == BUILTIN:
        docs = _pydoc_topics()
    elif dataset in SHARED_DATASETS:
        docs = _load_shared(dataset)
    else:
        path = Path(dataset).expanduser()
        if not path.exists():
            raise DistilrayError(
                f"corpus {dataset!r}: no such file or folder, and not a known data set "
                f"(known: {', '.join(known_datasets())}, or hf:NAME[:CONFIG])"
            )
        field = "text" if _is_preprocessed_dir(path) else text_field
        docs = [d for f in _local_files(path) for d in _read_file(f, field)]
    return _non_empty(dataset, docs)


def _cut_long(doc: str, max_piece_chars: int) -> list[str]:
    """Cut a document into pieces of at most about `max_piece_chars`, at line boundaries."""
    if len(doc) <= max_piece_chars:
        return [doc]
    pieces: list[str] = []
    current: list[str] = []
    size = 0
    for line in doc.splitlines(keepends=True):
        if current and size + len(line) > max_piece_chars:
            pieces.append("".join(current))
            current, size = [], 0
        current.append(line)
        size += len(line)
    if current:
        pieces.append("".join(current))
    return [p for p in pieces if p.strip()]


def split_documents(
    docs: list[str],
    val_fraction: float,
    test_fraction: float,
    seed: int,
    max_piece_chars: int = MAX_PIECE_CHARS,
) -> dict[str, list[str]]:
    """Deterministic train/validation/test split by a seeded shuffle.

    Long documents are first cut into pieces so that a corpus of one or a few long texts
    (tinyshakespeare, gutenberg) still gets three splits; with at least 3 pieces every split with
    a fraction > 0 is non-empty. Pieces keep their corpus order inside each split.
    """
    for name, frac in (("val_fraction", val_fraction), ("test_fraction", test_fraction)):
        if not 0.0 <= frac < 1.0:
            raise DistilrayError(f"{name} must be in [0, 1), got {frac}")
    if val_fraction + test_fraction >= 1.0:
        raise DistilrayError(f"val_fraction + test_fraction must be below 1, got {val_fraction + test_fraction}")

    pieces = [p for d in docs for p in _cut_long(d, max_piece_chars)]
    n = len(pieces)
    n_val, n_test = round(n * val_fraction), round(n * test_fraction)
    if n >= 3:
        n_val = max(n_val, 1) if val_fraction > 0 else 0
        n_test = max(n_test, 1) if test_fraction > 0 else 0
    # train keeps at least one piece: shrink the larger side (with n >= 3 neither drops below 1)
    while n_val + n_test > n - 1 and n_val + n_test > 0:
        if n_val >= n_test:
            n_val -= 1
        else:
            n_test -= 1
    order = list(range(n))
    random.Random(seed).shuffle(order)
    where = {i: "test" for i in order[:n_test]} | {i: "validation" for i in order[n_test : n_test + n_val]}
    out: dict[str, list[str]] = {s: [] for s in SPLITS}
    for i, piece in enumerate(pieces):
        out[where.get(i, "train")].append(piece)
    return out


def load_splits(spec: CorpusSpec) -> dict[str, list[str]]:
    """{"train", "validation", "test"} -> documents for a corpus spec.

    wikitext2 keeps its own test file (wiki.test.raw, so `test_fraction` does not apply) and splits
    wiki.valid.raw into train/validation; a preprocessed folder (train/validation/test.json) is used
    as it is; anything else is split by `split_documents`.
    """
    path = Path(spec.dataset).expanduser()
    if spec.dataset == "wikitext2":
        root = _shared_path("wikitext2")
        valid = _non_empty("wikitext2", _wikitext_articles(root / "wiki.valid.raw"))
        out = split_documents(valid, spec.val_fraction, 0.0, spec.split_seed)
        out["test"] = _non_empty("wikitext2 test", _wikitext_articles(root / "wiki.test.raw"))
        return out
    if spec.dataset not in known_datasets() and _is_preprocessed_dir(path):
        out = {s: [d for d in _read_json_field(path / f"{s}.json", "text") if d.strip()] for s in SPLITS}
        if not any(out.values()):
            raise DistilrayError(f"corpus {spec.dataset!r} has no text")
        return out
    docs = load_documents(spec.dataset, spec.text_field)
    return split_documents(docs, spec.val_fraction, spec.test_fraction, spec.split_seed)


_CONTENT_HASHES: dict[tuple[str, int, int], str] = {}


def _file_digest(f: Path) -> str:
    """sha256 of a file's bytes, memoised per process by (path, size, mtime)."""
    st = f.stat()
    key = (str(f.resolve()), st.st_size, st.st_mtime_ns)
    if key not in _CONTENT_HASHES:
        h = hashlib.sha256()
        with open(f, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                h.update(block)
        _CONTENT_HASHES[key] = h.hexdigest()
    return _CONTENT_HASHES[key]


def corpus_fingerprint(spec: CorpusSpec) -> str:
    """Short hash of the spec and its sources' contents: a copied or re-downloaded corpus keeps its caches
    (hashing reads each file once per process, about a second per GB, far less than tokenizing it)."""
    h = hashlib.sha256(json.dumps(dataclasses.asdict(spec), sort_keys=True).encode())
    if spec.dataset == BUILTIN:
        h.update("\0".join(_pydoc_topics()).encode())  # changes with the Python version
    elif spec.dataset.startswith("hf:"):
        h.update(spec.dataset.encode())  # the hub keeps versions; the name is what we have
    else:
        path = _shared_path(spec.dataset) if spec.dataset in SHARED_DATASETS else Path(spec.dataset).expanduser()
        if not path.exists():
            load_documents(spec.dataset, spec.text_field)  # raises the same clear error as loading
        for f in sorted(path.rglob("*")) if path.is_dir() else [path]:
            if f.is_file():
                h.update(f"{f.relative_to(path.parent)}\0{_file_digest(f)}\n".encode())
    return h.hexdigest()[:16]
