"""Datastore shard actors and the router, on the session's local Ray."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest

from distilray.actors.datastore import DatastoreRouter
from distilray.cdlm.datastore_files import ShardData, write_datastore
from distilray.cdlm.index import ShardIndex
from distilray.errors import DistilrayError

pytestmark = pytest.mark.ray

D = 16
ENTRIES = 12  # entry tokens 0..11; 12 and 13 have no keys


@pytest.fixture(scope="module")
def datastore(tmp_path_factory):
    """A 2-shard datastore on disk and an in-process index over all of its rows (the oracle)."""
    rng = np.random.default_rng(7)
    n = 600
    entry = rng.integers(0, ENTRIES, size=n)
    keys = rng.standard_normal((n, D)).astype(np.float32)
    chunks = [tuple(int(t) for t in rng.integers(0, 500, size=rng.integers(1, 6))) for _ in range(150)]
    chunk_ids = rng.integers(0, len(chunks), size=n)
    folder = tmp_path_factory.mktemp("ds") / "store"
    write_datastore(
        folder,
        entry_tokens=entry,
        keys=keys,
        chunk_ids=chunk_ids,
        chunks=chunks,
        num_shards=2,
        tokenizer_fingerprint="fp-1",
        provenance={"model_gen": "test"},
    )
    # The same rows in one in-process shard; float16 like the files so similarities agree.
    oracle = ShardIndex(
        ShardData.from_rows(entry_tokens=entry, keys=keys, chunk_ids=chunk_ids, chunks=chunks), faiss_min_rows=40
    )
    return folder, oracle


@pytest.fixture(scope="module")
def router(ray_session, datastore):
    r = DatastoreRouter.open(datastore[0], tokenizer_fingerprint="fp-1", faiss_min_rows=40)
    yield r
    r.close()


def _queries(seed: int, b: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return rng.integers(0, ENTRIES + 2, size=b), rng.standard_normal((b, D)).astype(np.float32)


def _assert_same(got, want):
    assert [c for c, _ in got] == [c for c, _ in want]
    np.testing.assert_allclose([s for _, s in got], [s for _, s in want], atol=1e-5)


def test_router_matches_single_index(router, datastore):
    _, oracle = datastore
    entries, queries = _queries(0, 200)
    got = router.query_batch(entries, queries)
    want = oracle.lookup_batch(entries, queries)
    _assert_same(got, want)
    missing = entries >= ENTRIES
    assert missing.any() and all(got[i] == (None, float("-inf")) for i in np.flatnonzero(missing))
    assert router.query_batch(np.zeros(0, dtype=np.int64), np.zeros((0, D))) == []
    # The single-query adapter retrieval decoding uses.
    hit = int(np.flatnonzero(~missing)[0])
    assert router.lookup(int(entries[hit]), queries[hit]) == got[hit]
    assert router.lookup(ENTRIES + 1, queries[0]) is None
    stats = router.stats()
    assert stats["num_shards"] == 2 and stats["num_keys"] == oracle.num_keys
    assert [s["shard_index"] for s in stats["shards"]] == [0, 1] and stats["queries"] > 0


def test_router_survives_serialisation_and_rejects_bad_input(ray_session, router, datastore):
    copy = ray_session.get(ray_session.put(router))  # what a Serve deployment holding it does
    entries, queries = _queries(1, 20)
    _assert_same(copy.query_batch(entries, queries), datastore[1].lookup_batch(entries, queries))
    with pytest.raises(DistilrayError, match="queries must be"):
        router.query_batch(entries, queries[:, :3])
    with pytest.raises(DistilrayError, match="non-negative"):
        router.query_batch(np.array([-1]), queries[:1])


def test_tokenizer_mismatch_and_missing_datastore(ray_session, datastore, tmp_path):
    with pytest.raises(DistilrayError, match="datastore was built with another tokenizer"):
        DatastoreRouter.open(datastore[0], tokenizer_fingerprint="fp-2")
    with pytest.raises(DistilrayError, match="datastore.json not found"):
        DatastoreRouter.open(tmp_path / "none")


def test_corrupt_shard_fails_open_with_clear_error(ray_session, datastore, tmp_path):
    import shutil

    folder = tmp_path / "broken"
    shutil.copytree(datastore[0], folder)
    (folder / "shard-00001-of-00002.h5").write_bytes(b"\x00garbage" * 100)
    with pytest.raises(DistilrayError, match="failed to load: missing or corrupt datastore shard .*00001"):
        DatastoreRouter.open(folder)


def test_killed_shard_restarts_and_in_flight_queries_are_retried(ray_session, router, datastore):
    _, oracle = datastore
    victim = router.handles()[0]
    pid_before = router.stats()["shards"][0]["pid"]
    batches = [_queries(100 + i, 64) for i in range(400)]
    results: list = []
    errors: list = []
    first_done = threading.Event()

    def client():
        try:
            for entries, queries in batches:
                results.append(router.query_batch(entries, queries))
                first_done.set()
                if stop.is_set():
                    return
        except Exception as exc:  # surfaced by the assertion below
            errors.append(exc)
            first_done.set()

    stop = threading.Event()
    thread = threading.Thread(target=client)
    thread.start()
    assert first_done.wait(60)
    done_at_kill = len(results)
    # Besides whatever the client has in flight, queue calls straight on the victim: all are
    # pending at the kill, so every one of them must be retried on the restarted actor.
    direct = [_queries(900 + i, 64) for i in range(100)]
    refs = [victim.query.remote(e, q) for e, q in direct]
    ray_session.kill(victim, no_restart=False)
    # Keep querying until several batches completed after the restart, then stop the client.
    deadline = time.monotonic() + 45
    while len(results) < done_at_kill + 5 and not errors and thread.is_alive() and time.monotonic() < deadline:
        time.sleep(0.05)
    stop.set()
    thread.join(60)
    assert not errors, errors
    assert len(results) >= done_at_kill + 5
    for (entries, queries), got in zip(batches, results):
        _assert_same(got, oracle.lookup_batch(entries, queries))
    for (entries, queries), got in zip(direct, ray_session.get(refs, timeout=60)):
        mine = np.flatnonzero(entries % 2 == 0)  # only shard 0's rows are answerable there
        _assert_same([got[i] for i in mine], oracle.lookup_batch(entries[mine], queries[mine]))
    shard0 = router.stats()["shards"][0]
    assert shard0["restarted"] is True and shard0["pid"] != pid_before


def test_close_kills_actors(ray_session, datastore):
    r = DatastoreRouter.open(datastore[0])
    handles = r.handles()
    assert ray_session.get([h.ready.remote() for h in handles])[1]["shard_index"] == 1
    r.close()
    r.close()  # idempotent
    with pytest.raises(DistilrayError, match="closed"):
        r.query_batch(np.array([1]), np.zeros((1, D)))
    # ray.kill is asynchronous: a call may still be served just after close(); then they die for good.
    deadline = time.monotonic() + 30
    for h in handles:
        with pytest.raises(ray_session.exceptions.RayActorError):
            while time.monotonic() < deadline:
                ray_session.get(h.ready.remote(), timeout=30)
                time.sleep(0.1)
