import numpy as np
import pytest

from distilray.cdlm.datastore_files import write_datastore
from distilray.cdlm.local import LocalDatastore
from distilray.errors import DistilrayError


def test_local_datastore_matches_brute_force_cosine(tmp_path):
    rng = np.random.default_rng(0)
    n, d = 300, 16
    entries = rng.integers(0, 7, size=n)
    keys = rng.standard_normal((n, d)).astype(np.float32)
    chunks = [(int(a), int(b)) for a, b in rng.integers(0, 50, size=(n, 2))]
    write_datastore(tmp_path, entry_tokens=entries, keys=keys, chunk_ids=np.arange(n), chunks=chunks, num_shards=3, tokenizer_fingerprint="fp")
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
    with pytest.raises(DistilrayError, match="another tokenizer"):
        LocalDatastore(tmp_path, "other")
