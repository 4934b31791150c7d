"""Datastore files (HDF5 shards + manifest) and the per-shard cosine index, without Ray."""

from __future__ import annotations

import h5py
import numpy as np
import pytest

from distilray.cdlm.datastore_files import (
    ShardData,
    read_manifest,
    read_shard,
    shard_file_name,
    shard_of,
    write_datastore,
    write_manifest,
    write_shard,
    write_synthetic_datastore,
)
from distilray.cdlm.index import ShardIndex
from distilray.errors import DistilrayError


def _rows(rng, n, d, entries, n_chunks=7):
    """Random rows: entry tokens drawn from `entries`, keys (n, d), chunk ids into n_chunks chunks."""
    chunks = [tuple(int(t) for t in rng.integers(0, 100, size=rng.integers(1, 5))) for _ in range(n_chunks)]
    return (
        rng.choice(np.asarray(entries), size=n),
        rng.standard_normal((n, d)).astype(np.float32),
        rng.integers(0, n_chunks, size=n),
        chunks,
    )


def test_shard_of_scalar_and_array():
    assert shard_of(10, 4) == 2
    np.testing.assert_array_equal(shard_of(np.array([0, 5, 7, 8]), 4), [0, 1, 3, 0])
    with pytest.raises(DistilrayError):
        shard_of(3, 0)


def test_write_read_roundtrip(tmp_path):
    rng = np.random.default_rng(0)
    entry, keys, ids, chunks = _rows(rng, 40, 8, [1, 4, 7, 13])  # all == 1 mod 3
    chunks.append((99, 98))  # unreferenced: must not be written
    path = tmp_path / "s.h5"
    info = write_shard(
        path,
        entry_tokens=entry,
        keys=keys,
        chunk_ids=ids,
        chunks=chunks,
        shard_index=1,
        num_shards=3,
        tokenizer_fingerprint="tok-abc",
    )
    data = read_shard(path)
    assert (data.shard_index, data.num_shards, data.hidden_dim) == (1, 3, 8)
    assert data.tokenizer_fingerprint == "tok-abc"
    assert data.keys.dtype == np.float16 and data.entry_token.dtype == np.int32
    assert data.chunk_id.dtype == np.int32 and data.chunk_offsets.dtype == np.int64
    assert np.all(np.diff(data.entry_token) >= 0)
    assert info["num_keys"] == 40 and info["num_chunks"] == data.num_chunks == len(set(ids.tolist()))
    # Same multiset of (entry, chunk, key) rows; the stable sort keeps build order inside an entry.
    order = np.argsort(entry, kind="stable")
    np.testing.assert_array_equal(data.entry_token, entry[order])
    np.testing.assert_allclose(data.keys.astype(np.float32), keys[order], rtol=1e-3, atol=1e-3)
    assert [data.chunk(c) for c in data.chunk_id] == [chunks[i] for i in ids[order]]
    with h5py.File(path) as f:
        assert set(f) == {"entry_token", "keys", "chunk_id", "chunk_tokens", "chunk_offsets"}
        assert f.attrs["format_version"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["s.h5"]  # no temporary left behind


def test_wrong_shard_and_bad_rows_rejected(tmp_path):
    keys = np.zeros((2, 4), dtype=np.float32)
    common = dict(keys=keys, chunk_ids=np.array([0, 0]), chunks=[(1,)], num_shards=2, tokenizer_fingerprint="t")
    with pytest.raises(DistilrayError, match="belongs to shard 1"):
        write_shard(tmp_path / "a.h5", entry_tokens=np.array([2, 3]), shard_index=0, **common)
    with pytest.raises(DistilrayError, match="chunk ids"):
        write_shard(
            tmp_path / "b.h5", entry_tokens=np.array([2, 4]), shard_index=0, **{**common, "chunk_ids": np.array([0, 1])}
        )
    with pytest.raises(DistilrayError, match="float16"):
        write_shard(
            tmp_path / "c.h5",
            entry_tokens=np.array([2, 4]),
            shard_index=0,
            **{**common, "keys": np.full((2, 4), 1e6, dtype=np.float32)},
        )
    assert not list(tmp_path.iterdir())


def test_corrupt_missing_and_incomplete_shards(tmp_path):
    garbage = tmp_path / "garbage.h5"
    garbage.write_bytes(b"not an hdf5 file at all" * 10)
    with pytest.raises(DistilrayError, match="missing or corrupt datastore shard .*garbage.h5"):
        read_shard(garbage)
    with pytest.raises(DistilrayError, match="missing or corrupt datastore shard .*absent.h5"):
        read_shard(tmp_path / "absent.h5")
    good = tmp_path / "good.h5"
    write_shard(
        good,
        entry_tokens=np.array([0, 2]),
        keys=np.ones((2, 3)),
        chunk_ids=np.array([0, 0]),
        chunks=[(5,)],
        shard_index=0,
        num_shards=2,
        tokenizer_fingerprint="t",
    )
    with h5py.File(good, "a") as f:
        del f["chunk_offsets"]
    with pytest.raises(DistilrayError, match="chunk_offsets missing"):
        read_shard(good)
    write_shard(
        good,
        entry_tokens=np.array([0, 2]),
        keys=np.ones((2, 3)),
        chunk_ids=np.array([0, 0]),
        chunks=[(5,)],
        shard_index=0,
        num_shards=2,
        tokenizer_fingerprint="t",
    )
    with h5py.File(good, "a") as f:  # keys for 3 rows, 2 entry tokens
        del f["keys"]
        f["keys"] = np.ones((3, 3), dtype=np.float16)
    with pytest.raises(DistilrayError, match="inconsistent shapes"):
        read_shard(good)


def test_manifest_roundtrip_and_missing_shard(tmp_path):
    rng = np.random.default_rng(1)
    entry, keys, ids, chunks = _rows(rng, 60, 6, list(range(10)))
    info = write_datastore(
        tmp_path / "ds",
        entry_tokens=entry,
        keys=keys,
        chunk_ids=ids,
        chunks=chunks,
        num_shards=3,
        tokenizer_fingerprint="fp",
        provenance={"model_gen": "m", "threshold": 0.3},
    )
    back = read_manifest(tmp_path / "ds")
    assert back["shards"] == [shard_file_name(s, 3) for s in range(3)] == info["shards"]
    assert back["num_keys"] == 60 == sum(back["keys_per_shard"])
    assert back["model_gen"] == "m" and back["hidden_dim"] == 6 and back["tokenizer_fingerprint"] == "fp"
    for s, name in enumerate(back["shards"]):
        data = read_shard(tmp_path / "ds" / name)
        assert np.all(data.entry_token % 3 == s) and data.num_keys == back["keys_per_shard"][s]
    (tmp_path / "ds" / back["shards"][1]).unlink()
    with pytest.raises(DistilrayError, match="missing or corrupt datastore shard"):
        read_manifest(tmp_path / "ds")
    with pytest.raises(DistilrayError, match="datastore.json not found"):
        read_manifest(tmp_path / "nowhere")
    with pytest.raises(DistilrayError, match="lacks"):
        write_manifest(tmp_path / "x", {"num_shards": 1})


def _brute_force(data: ShardData, entries, queries):
    """(B,) best sims by float64 cosine over each entry token's rows; -inf when none."""
    k = data.keys.astype(np.float64)
    k /= np.maximum(np.linalg.norm(k, axis=1, keepdims=True), 1e-12)
    q = queries / np.linalg.norm(queries, axis=1, keepdims=True)
    best = np.full(len(entries), -np.inf)
    for i, e in enumerate(entries):
        rows = np.flatnonzero(data.entry_token == e)
        if rows.size:
            best[i] = (k[rows] @ q[i]).max()
    return best, k, q


@pytest.mark.parametrize("faiss_min_rows,approx_min_rows", [(256, 200_000), (20, 200_000), (20, 150)])
def test_index_matches_brute_force(faiss_min_rows, approx_min_rows):
    rng = np.random.default_rng(2)
    sizes = {3: 5, 8: 19, 11: 60, 42: 300}  # groups on both sides of faiss_min_rows
    entry = np.repeat(list(sizes), list(sizes.values()))
    n, d = entry.size, 16
    data = ShardData.from_rows(
        entry_tokens=entry,
        keys=rng.standard_normal((n, d)) * 3,
        chunk_ids=np.arange(n),
        chunks=[(i + 1, i + 2) for i in range(n)],
    )
    index = ShardIndex(data, faiss_min_rows=faiss_min_rows, approx_min_rows=approx_min_rows)
    counts = index.backend_counts()
    assert sum(counts.values()) == 4 and index.num_keys == n and index.hidden_dim == d
    if faiss_min_rows == 20:
        assert counts["numpy"] == 2
        assert counts["hnsw" if approx_min_rows == 150 else "flat_ip"] == 1 + (approx_min_rows != 150)
    queries = rng.standard_normal((64, d)).astype(np.float32)
    entries = rng.choice([3, 8, 11, 42, 5], size=64)  # 5 has no keys
    rows, sims = index.search(entries, queries)
    best, k, q = _brute_force(data, entries, queries)
    missing = entries == 5
    assert np.all(rows[missing] == -1) and np.all(np.isneginf(sims[missing]))
    assert np.all(data.entry_token[rows[~missing]] == entries[~missing])  # never crosses entry tokens
    # The reported sim is the true cosine of the returned row, and (exact paths) the maximum.
    true_sim = np.einsum("bd,bd->b", k[rows[~missing]], q[~missing])
    np.testing.assert_allclose(sims[~missing], true_sim, atol=1e-4)
    if approx_min_rows == 150:  # HNSW: near-perfect recall on a 300-row graph
        assert np.mean(np.isclose(sims[~missing], best[~missing], atol=1e-4)) >= 0.9
    else:
        np.testing.assert_allclose(sims[~missing], best[~missing], atol=1e-4)
    assert index.chunk(int(rows[~missing][0])) == data.chunk(int(data.chunk_id[rows[~missing][0]]))
    assert index.memory_bytes() >= n * d * 4
    # one query at a time (a decoding step's fast path) finds the batch's rows, missing entries included
    singles = [index.search(entries[i : i + 1], queries[i : i + 1]) for i in range(16)]
    assert [int(r[0]) for r, _ in singles] == rows[:16].tolist()
    np.testing.assert_allclose([float(s[0]) for _, s in singles], sims[:16], atol=1e-6)


def test_index_batch_equals_single_queries_and_empty():
    rng = np.random.default_rng(3)
    entry, keys, ids, chunks = _rows(rng, 50, 5, [0, 1, 2])
    data = ShardData.from_rows(entry_tokens=entry, keys=keys, chunk_ids=ids, chunks=chunks)
    index = ShardIndex(data)
    qs, es = rng.standard_normal((10, 5)), rng.integers(0, 4, size=10)
    batch = index.lookup_batch(es, qs)
    single = [index.lookup_batch(es[i : i + 1], qs[i : i + 1])[0] for i in range(10)]
    assert [c for c, _ in batch] == [c for c, _ in single]  # BLAS may round batch and single apart
    np.testing.assert_allclose([s for _, s in batch], [s for _, s in single], atol=1e-6)
    rows, sims = index.search(np.zeros(0, dtype=np.int64), np.zeros((0, 5)))
    assert rows.shape == sims.shape == (0,)
    with pytest.raises(DistilrayError, match="queries must be"):
        index.search(es, qs[:, :4])
    empty = ShardIndex(
        ShardData.from_rows(
            entry_tokens=np.zeros(0, dtype=np.int64),
            keys=np.zeros((0, 5)),
            chunk_ids=np.zeros(0, dtype=np.int64),
            chunks=[],
        )
    )
    assert empty.lookup_batch(es[:2], qs[:2]) == [(None, float("-inf"))] * 2


def test_synthetic_datastore(tmp_path):
    info = write_synthetic_datastore(
        tmp_path / "syn", num_keys=5000, hidden_dim=32, vocab_size=300, num_shards=3, seed=0, mean_chunk_len=4
    )
    back = read_manifest(tmp_path / "syn")
    assert back == info and back["synthetic"] is True and back["num_keys"] == 5000
    total = 0
    for s, name in enumerate(back["shards"]):
        data = read_shard(tmp_path / "syn" / name)
        assert data.num_keys == back["keys_per_shard"][s] and np.all(data.entry_token % 3 == s)
        assert data.entry_token.max() < 300 and data.hidden_dim == 32
        np.testing.assert_allclose(np.linalg.norm(data.keys.astype(np.float32), axis=1), 1.0, atol=1e-2)
        total += data.num_keys
    assert total == 5000
    assert 3.0 < back["mean_chunk_length"] < 5.0
