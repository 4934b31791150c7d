"""T-Free's data files: raw text with random access (the seed's MemoryMap), an aligned index over it
(its AlignedMemoryMap), and instruction conversations. Plain pyarrow/numpy, no Ray.

Text stays text on disk; words and trigrams are made on the fly at training time (reference/tfree.md
section 6). A store is a folder:

- `text.arrow`: an Arrow IPC file, one row per document (`text`, large_string), or per conversation
  (`segments_text` list<string>, `segments_loss` list<bool>) for instruction data. Opening it memory-maps
  the file: nothing is read until a row is asked for, so workers share the page cache;
- `index.json`: format tag, kind, number of rows, total UTF-8 bytes, and a sha256 over the contents
  (`fingerprint`) by which derived files (aligned indices, caches) know their store;
- `aligned-<min_bytes>-<seed>.safetensors` (pre-training stores, `write_aligned_index`): int64 `permutation`
  (N,) and entry bounds `starts`, `ends` (E,) into it; its metadata names the store's fingerprint.

A store is written into a temporary folder and renamed into place, so a reader never sees half of one.
"""

from __future__ import annotations

import hashlib
import itertools
import json
from pathlib import Path
from typing import Any, Iterable, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.ipc as ipc

from distilray.errors import DistilrayError
from distilray.io_utils import atomic_dir, atomic_path, atomic_write_json, read_json

FORMAT = "distilray.tfree.textstore/1"
ALIGNED_FORMAT = "distilray.tfree.aligned/1"
TEXT_FILE = "text.arrow"
INDEX_FILE = "index.json"
BATCH_ROWS = 4096  # rows per Arrow record batch: bounded memory while writing, few chunks to search


def _write_store(folder: str | Path, batches: Iterator[dict[str, list]], schema: pa.Schema, kind: str) -> dict:
    """Write record batches (column -> values; the first column holds the text) as `text.arrow` +
    `index.json`; returns the index. The fingerprint hashes every row, each part length-prefixed so that
    ("ab", "c") and ("a", "bc") differ."""
    h = hashlib.sha256(f"{FORMAT}\n{kind}\n".encode())
    rows = total_bytes = 0
    with atomic_dir(folder) as tmp:
        with ipc.new_file(str(tmp / TEXT_FILE), schema) as writer:
            for columns in batches:
                for row in zip(*(columns[name] for name in schema.names)):
                    texts = [t.encode("utf-8") for t in (row[0] if isinstance(row[0], list) else [row[0]])]
                    parts = texts + [json.dumps(v).encode() for v in row[1:]]
                    h.update(len(parts).to_bytes(8, "little"))
                    for part in parts:
                        h.update(len(part).to_bytes(8, "little") + part)
                    total_bytes += sum(len(t) for t in texts)
                    rows += 1
                writer.write_batch(pa.record_batch(columns, schema=schema))
        index = {"format": FORMAT, "kind": kind, "rows": rows, "bytes": total_bytes, "fingerprint": h.hexdigest()}
        atomic_write_json(tmp / INDEX_FILE, index)
    return index


def _batched(items: Iterable[Any]) -> Iterator[list[Any]]:
    it = iter(items)
    while batch := list(itertools.islice(it, BATCH_ROWS)):
        yield batch


def write_text_store(folder: str | Path, documents: Iterable[str], kind: str = "documents") -> dict:
    """Write documents (any iterable, read once) as a text store; returns its index.json contents. `kind` is
    a free tag kept in the index (what the texts are); `TextStore` reads any kind."""
    schema = pa.schema([("text", pa.large_string())])

    def batches() -> Iterator[dict[str, list]]:
        for batch in _batched(documents):
            bad = next((d for d in batch if not isinstance(d, str)), None)
            if bad is not None:
                raise DistilrayError(f"a text store holds strings; got a {type(bad).__name__}")
            yield {"text": batch}

    return _write_store(folder, batches(), schema, kind)


class _Store:
    """The memory-mapped table of a store folder, with row lookup across its record batches."""

    def __init__(self, folder: str | Path, column: str) -> None:
        self.folder = Path(folder)
        try:
            self.index = read_json(self.folder / INDEX_FILE)
        except (OSError, ValueError) as e:
            raise DistilrayError(f"{self.folder} is not a T-Free text store (no readable {INDEX_FILE}: {e})") from None
        if not isinstance(self.index, dict) or self.index.get("format") != FORMAT:
            raise DistilrayError(f"{self.folder / INDEX_FILE}: unknown format (expected {FORMAT})")
        try:
            # zero-copy: the table's buffers point into the mapped file
            self.table = ipc.open_file(pa.memory_map(str(self.folder / TEXT_FILE))).read_all()
        except (OSError, pa.ArrowInvalid) as e:
            raise DistilrayError(f"{self.folder / TEXT_FILE} is missing or not an Arrow file: {e}") from None
        if column not in self.table.column_names:
            raise DistilrayError(f"{self.folder} holds {self.index.get('kind')!r} data, without the column {column!r}")
        if self.table.num_rows != self.index["rows"]:
            raise DistilrayError(f"{self.folder}: {self.table.num_rows} rows, index.json says {self.index['rows']}")
        lengths = [len(c) for c in self.table.column(0).chunks]
        self._starts = np.cumsum([0, *lengths])[:-1]  # first row of each chunk

    @property
    def fingerprint(self) -> str:
        return self.index["fingerprint"]

    @property
    def kind(self) -> str:
        return self.index["kind"]

    def __len__(self) -> int:
        return self.table.num_rows

    def _locate(self, i: int) -> tuple[int, int]:
        """(chunk, row inside it) of row `i`; negative indices count from the end, as for a list."""
        n = len(self)
        if not -n <= i < n:
            raise IndexError(f"row {i} out of range for a store of {n}")
        i = int(i) % n
        chunk = int(np.searchsorted(self._starts, i, side="right")) - 1
        return chunk, i - int(self._starts[chunk])

    def _value(self, column: str, i: int) -> Any:
        chunk, row = self._locate(i)
        return self.table.column(column).chunk(chunk)[row].as_py()


class TextStore(_Store):
    """Random access to the documents of a text store: `store[i] -> str`."""

    def __init__(self, folder: str | Path) -> None:
        super().__init__(folder, "text")
        # (N,) int64 UTF-8 bytes per document, read from the Arrow offsets: no text is decoded
        self.byte_lengths: np.ndarray = np.concatenate(
            [np.zeros(0, np.int64)] + [pc.binary_length(c).to_numpy() for c in self.table.column("text").chunks]
        ).astype(np.int64)

    def __getitem__(self, i: int) -> str:
        return self._value("text", i)

    def byte_length(self, i: int) -> int:
        """UTF-8 bytes of document `i`."""
        self._locate(i)  # range check
        return int(self.byte_lengths[i])


# ------------------------------------------------------------------------------ aligned index
def aligned_index_path(store_folder: str | Path, min_bytes: int, seed: int = 42) -> Path:
    return Path(store_folder) / f"aligned-{min_bytes}-{seed}.safetensors"


def align(byte_lengths: np.ndarray, min_bytes: int, seed: int = 42) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(permutation (N,), starts (E,), ends (E,)): consecutive runs of a seeded permutation of the
    documents, each holding at least `min_bytes` bytes; only the last run may hold fewer."""
    if min_bytes < 1:
        raise DistilrayError(f"min_bytes must be at least 1, got {min_bytes}")
    perm = np.random.default_rng(seed).permutation(len(byte_lengths)).astype(np.int64)
    cum = np.cumsum(np.asarray(byte_lengths, np.int64)[perm])  # cum[k]: bytes of perm[0..k]
    starts, ends = [], []
    while (start := ends[-1] if ends else 0) < len(perm):  # one search per entry, not a step per document
        base = int(cum[start - 1]) if start else 0
        starts.append(start)
        ends.append(min(int(np.searchsorted(cum, base + min_bytes, side="left")) + 1, len(perm)))
    return perm, np.array(starts, np.int64), np.array(ends, np.int64)


def write_aligned_index(store_folder: str | Path, min_bytes: int, seed: int = 42) -> Path:
    """Save the aligned index of a text store beside it; returns the file. Each document is in exactly one
    entry, so one pass over the entries is one epoch. The reference uses min_bytes 20,000 for 4,096 words."""
    from safetensors.numpy import save_file

    store = TextStore(store_folder)
    perm, starts, ends = align(store.byte_lengths, min_bytes, seed)
    last_bytes = int(store.byte_lengths[perm[starts[-1] : ends[-1]]].sum()) if len(starts) else min_bytes
    metadata = {
        "format": ALIGNED_FORMAT,
        "min_bytes": str(min_bytes),
        "seed": str(seed),
        "store_fingerprint": store.fingerprint,
        "entries": str(len(starts)),
        # the tail of the permutation is kept even when it holds fewer than min_bytes
        "short_last_entry": str(last_bytes < min_bytes).lower(),
    }
    path = aligned_index_path(store_folder, min_bytes, seed)
    with atomic_path(path) as tmp:
        save_file({"permutation": perm, "starts": starts, "ends": ends}, tmp, metadata=metadata)
    return path


class AlignedIndex:
    """`aligned[i] -> [document indices]` of a text store, in permutation order."""

    def __init__(self, store_folder: str | Path, min_bytes: int, seed: int = 42) -> None:
        from safetensors import safe_open

        path = aligned_index_path(store_folder, min_bytes, seed)
        if not path.is_file():
            raise DistilrayError(f"no aligned index {path.name} in {store_folder}; run write_aligned_index first")
        with safe_open(str(path), framework="numpy") as f:
            self.metadata: dict[str, str] = f.metadata() or {}
            arrays = {k: f.get_tensor(k) for k in ("permutation", "starts", "ends")}
        store_fp = read_json(Path(store_folder) / INDEX_FILE).get("fingerprint")
        if self.metadata.get("format") != ALIGNED_FORMAT or self.metadata.get("store_fingerprint") != store_fp:
            raise DistilrayError(f"{path} was built for another store (or format); rebuild it")
        self.permutation, self.starts, self.ends = arrays["permutation"], arrays["starts"], arrays["ends"]
        self.min_bytes, self.seed = min_bytes, seed
        self.short_last_entry = self.metadata.get("short_last_entry") == "true"

    def __len__(self) -> int:
        return len(self.starts)

    def __getitem__(self, i: int) -> list[int]:
        return self.permutation[self.starts[i] : self.ends[i]].tolist()


# ------------------------------------------------------------------------------ instruction data
def conversation_segments(record: Any) -> list[tuple[str, bool]]:
    """One JSONL record -> [(text, has_loss)]. Accepted forms:

    - a list of segments `[{"text": str, "has_loss": bool}, ...]`, or `{"segments": [...]}`;
    - `{"messages": [{"role": str, "content": str}, ...]}`, rendered with a plain template: each turn is
      `role: content`; a turn other than the assistant's is one segment without loss, an assistant turn is
      the segment `assistant:` without loss followed by its content with loss, so only answers are learned;
    - `{"question": str, "answer": str}` (MedQuAD and most QA sets): `question: ...` and `answer:` without
      loss, the answer with loss.
    """
    if isinstance(record, dict) and isinstance(record.get("question"), str) and isinstance(record.get("answer"), str):
        return [(f"question: {record['question']}", False), ("answer:", False), (record["answer"], True)]
    if isinstance(record, dict) and "messages" in record:
        segments: list[tuple[str, bool]] = []
        for m in record["messages"]:
            if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
                raise DistilrayError(f"a message needs string fields role and content, got {m!r:.200}")
            if m["role"] == "assistant":
                segments += [("assistant:", False), (m["content"], True)]
            else:
                segments.append((f"{m['role']}: {m['content']}", False))
        return segments
    raw = record.get("segments") if isinstance(record, dict) else record
    if not isinstance(raw, list) or not all(
        isinstance(s, dict) and isinstance(s.get("text"), str) and isinstance(s.get("has_loss"), bool) for s in raw
    ):
        raise DistilrayError(
            'an instruction record is a list of {"text": str, "has_loss": bool} segments, {"segments": [...]}, '
            f'{{"messages": [{{"role", "content"}}]}} or {{"question", "answer"}}; got {json.dumps(record)[:200]}'
        )
    return [(s["text"], s["has_loss"]) for s in raw]


def write_instruction_store(folder: str | Path, records: Iterable[Any]) -> dict:
    """Write conversations (see `conversation_segments` for the forms) as an instruction store."""
    schema = pa.schema([("segments_text", pa.list_(pa.string())), ("segments_loss", pa.list_(pa.bool_()))])

    def batches() -> Iterator[dict[str, list]]:
        for batch in _batched(records):
            convs = [conversation_segments(r) for r in batch]
            yield {
                "segments_text": [[t for t, _ in c] for c in convs],
                "segments_loss": [[flag for _, flag in c] for c in convs],
            }

    return _write_store(folder, batches(), schema, "instruction")


class InstructionStore(_Store):
    """Random access to the conversations of an instruction store: `store[i] -> [(text, has_loss)]`."""

    def __init__(self, folder: str | Path) -> None:
        super().__init__(folder, "segments_text")

    def __getitem__(self, i: int) -> list[tuple[str, bool]]:
        return list(zip(self._value("segments_text", i), self._value("segments_loss", i)))
