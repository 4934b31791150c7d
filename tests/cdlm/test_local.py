import numpy as np
import pytest

from distilray.cdlm.datastore_files import write_datastore
from distilray.cdlm.local import MISS, LocalDatastore, merge_shard_answers, split_by_shard
from distilray.errors import DistilrayError


def test_local_datastore_matches_brute_force_cosine(tmp_path):
    rng = np.random.default_rng(0)
    n, d = 300, 16
    entries = rng.integers(0, 7, size=n)
    keys = rng.standard_normal((n, d)).astype(np.float32)
    chunks = [(int(a), int(b)) for a, b in rng.integers(0, 50, size=(n, 2))]
    write_datastore(
        tmp_path,
        entry_tokens=entries,
        keys=keys,
        chunk_ids=np.arange(n),
        chunks=chunks,
        num_shards=3,
        tokenizer_fingerprint="fp",
    )
    store = LocalDatastore(tmp_path, "fp")
    queries = rng.standard_normal((20, d)).astype(np.float32)
    asked = rng.integers(0, 9, size=20)  # 7 and 8 have no keys
    normed = keys / np.linalg.norm(keys, axis=1, keepdims=True)
    for (chunk, sim), e, q in zip(store.query_batch(asked, queries), asked, queries):
        rows = np.flatnonzero(entries == e)
        if rows.size == 0:
            assert chunk is None
            continue
        cos = normed[rows] @ (q / np.linalg.norm(q))
        assert chunk == chunks[rows[np.argmax(cos)]]
        assert sim == pytest.approx(cos.max(), abs=2e-3)  # keys are stored as float16
    # one query alone (its own shard, no split or merge) answers as it does within the batch
    for i in range(len(asked)):
        alone = store.lookup(int(asked[i]), queries[i])
        chunk, sim = store.query_batch(asked, queries)[i]
        assert alone == (None if chunk is None else (chunk, pytest.approx(sim, abs=1e-6)))
    with pytest.raises(DistilrayError, match="another tokenizer"):
        LocalDatastore(tmp_path, "other")


def test_split_by_shard_and_merge_restore_input_order():
    entries = np.array([7, 3, 4, 10, 3, 0])
    batches = split_by_shard(entries, 3)  # owner = token % 3: [1, 0, 1, 1, 0, 0]
    assert [b.shard for b in batches] == [0, 1]
    assert [b.index.tolist() for b in batches] == [[1, 4, 5], [0, 2, 3]]
    # each shard answers its queries in its batch's order: (the entry as a chunk, its position)
    answers = [[((int(entries[i]),), float(i)) for i in b.index] for b in batches]
    merged = merge_shard_answers(len(entries), batches, answers)
    assert merged == [((int(e),), float(i)) for i, e in enumerate(entries)]
    assert split_by_shard(np.array([], dtype=np.int64), 2) == [] and merge_shard_answers(0, [], []) == []
    assert merge_shard_answers(2, batches[:0], []) == [MISS, MISS]  # a position nobody answered is a miss
