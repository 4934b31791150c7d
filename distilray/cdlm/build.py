"""From mined phrases to datastore rows (no Ray): shared by `build-datastore` and the SCD benchmark."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from distilray.cdlm.datastore_files import write_datastore
from distilray.cdlm.extraction import score_windows
from distilray.cdlm.mining import mine_window
from distilray.cdlm.trie import ChunkTrie


def mine_rows(rows, threshold: float) -> ChunkTrie:
    """rows: dicts with token_ids # (T,), probs # (T,) (probs[0] may be nan), skip, window_id."""
    trie = ChunkTrie()
    for row in rows:
        probs = np.nan_to_num(row["probs"], nan=0.0)  # position 0 has no context: never confident
        trie.insert_many(
            mine_window(np.asarray(row["token_ids"]), probs, threshold, int(row["skip"]), int(row["window_id"]))
        )
    return trie


def trie_rows(trie: ChunkTrie, max_keys_per_chunk: int | None = None):
    """One row per kept occurrence: entry tokens # (n,), chunk ids # (n,), positions # (n, 2), chunk table."""
    chunk_ids: dict[tuple[int, ...], int] = {}
    entries, key_chunk, positions = [], [], []
    for entry in trie.entry_tokens():
        chunk_index, chunks, pos = trie.flatten(entry, max_keys_per_chunk)
        ids = [chunk_ids.setdefault(c, len(chunk_ids)) for c in chunks]
        entries.append(np.full(len(pos), entry, dtype=np.int64))
        key_chunk.append(np.asarray(ids, dtype=np.int64)[chunk_index])
        positions.append(pos)
    table: list[tuple[int, ...]] = [()] * len(chunk_ids)
    for chunk, i in chunk_ids.items():
        table[i] = chunk
    if not entries:
        return np.empty(0, np.int64), np.empty(0, np.int64), np.empty((0, 2), np.int64), table
    return np.concatenate(entries), np.concatenate(key_chunk), np.concatenate(positions), table


def datastore_from_sequences(
    model,
    sequences: list[list[int]],
    threshold: float,
    folder: str | Path,
    num_shards: int,
    tokenizer_fingerprint: str,
    batch_size: int = 8,
    provenance: dict | None = None,
) -> dict:
    """Score whole token sequences (one window each), mine them and write a datastore. Returns the manifest."""
    rows, hidden = [], []
    for i in range(0, len(sequences), batch_size):
        probs, states = score_windows([tuple(s) for s in sequences[i : i + batch_size]], model)
        for j, (p, h) in enumerate(zip(probs, states)):
            rows.append({"token_ids": np.asarray(sequences[i + j]), "probs": p, "skip": 0, "window_id": i + j})
            hidden.append(h)
    entries, chunk_ids, positions, table = trie_rows(mine_rows(rows, threshold))
    keys = (
        np.stack([hidden[w][p] for w, p in positions])
        if len(positions)
        else np.zeros((0, hidden[0].shape[1]), np.float16)
    )
    return write_datastore(
        folder,
        entry_tokens=entries,
        keys=keys,
        chunk_ids=chunk_ids,
        chunks=table,
        num_shards=num_shards,
        tokenizer_fingerprint=tokenizer_fingerprint,
        provenance={"synthetic": False, **(provenance or {})},
    )
