"""CD-LM extraction on Ray Data and the datastore build, on a tiny model and corpus."""

import json

import h5py
import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from distilray.cdlm.datastore_files import read_manifest, read_shard
from distilray.cdlm.extraction import make_windows
from distilray.config import BuildDatastoreConfig, ExtractConfig, load_config
from distilray.errors import DistilrayError
from distilray.models.causal_lm import build_causal_lm, load_causal_lm
from distilray.pipelines import build_datastore, extract
from distilray.tokenizer import train_bpe_tokenizer

pytestmark = pytest.mark.ray


@pytest.fixture(scope="module")
def tiny_model_dir(small_tokenizer, tmp_path_factory):
    tok, _ = small_tokenizer
    path = tmp_path_factory.mktemp("m") / "tiny"
    torch.manual_seed(0)
    model = build_causal_lm("tiny", tok)
    with torch.no_grad():  # a sharper random model, so some tokens clear the mining threshold
        for p in model.parameters():
            p.mul_(4)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


def _extract_cfg(tmp, model_dir, **over):
    keys = {
        "model": str(model_dir),
        "window": 48,
        "stride": 40,
        "min_length": 8,
        "windows_per_shard": 4,
        "batch_size": 3,
        "max_windows": 14,
        "output_dir": str(tmp / "ext"),
        "corpus.dataset": "tinyshakespeare",
        **over,
    }
    return load_config(ExtractConfig, None, [f"{k}={v}" for k, v in keys.items()])


def test_windows_cover_passages_with_overlap():
    ws = make_windows([list(range(100)), list(range(5))], window=40, stride=30, min_length=8)
    assert [(w.start, w.skip, len(w.tokens)) for w in ws] == [(0, 0, 40), (30, 10, 40), (60, 10, 40)]
    assert ws[1].tokens[:10] == ws[0].tokens[30:]  # the skipped positions are the previous window's tail


def test_extraction_matches_a_direct_forward_and_resumes(ray_session, tiny_model_dir, tmp_path):
    cfg = _extract_cfg(tmp_path, tiny_model_dir)
    res = extract.run(cfg)
    out = tmp_path / "ext" / "train"
    assert res["windows"] == 14 and res["shards"] == 4 and res["shards_computed"] == 4
    index = json.loads((out / "index.json").read_text())["windows"]
    model = load_causal_lm(tiny_model_dir, device="cpu")
    table = pq.read_table(out / "shard-00001.parquet").to_pydict()
    with h5py.File(out / "shard-00001.h5") as f:
        hidden = f["hidden"][:]
        offsets, lengths = f["offset"][:], f["length"][:]
    assert hidden.dtype == np.float16 and hidden.shape[0] == sum(lengths)
    for i, wid in enumerate(table["window_id"]):
        ids = torch.tensor([table["token_ids"][i]])
        with torch.no_grad():
            o = model(input_ids=ids, output_hidden_states=True)
        direct_p = torch.softmax(o.logits[0, :-1], -1).gather(-1, ids[0, 1:, None]).squeeze(-1).numpy()
        np.testing.assert_allclose(np.array(table["probs"][i][1:]), direct_p, rtol=1e-4, atol=1e-6)
        assert np.isnan(table["probs"][i][0])
        rows = hidden[offsets[i] : offsets[i] + lengths[i]].astype(np.float32)
        np.testing.assert_allclose(rows, o.hidden_states[-1][0].numpy(), rtol=1e-2, atol=2e-2)
        assert [e for e in index if e[0] == wid][0][1:] == [1, int(offsets[i]), int(lengths[i])]

    # a killed run leaves finished shards and temp debris: the re-run computes only what is missing
    before = {p.name: p.stat().st_mtime_ns for p in out.glob("shard-*")}
    (out / "shard-00002.parquet").unlink()
    (out / ".shard-00002.parquet.xyz.tmp").write_bytes(b"partial")
    res2 = extract.run(cfg)
    assert res2["shards_computed"] == 1
    after = {p.name: p.stat().st_mtime_ns for p in out.glob("shard-*")}
    assert all(after[n] == t for n, t in before.items() if not n.startswith("shard-00002"))
    assert pq.read_table(out / "shard-00002.parquet").num_rows == 4

    with pytest.raises(DistilrayError, match="other settings"):
        extract.run(_extract_cfg(tmp_path, tiny_model_dir, stride=30))

    # the datastore: every key is the generation model's hidden state at its entry position
    stats = build_datastore.run(
        load_config(
            BuildDatastoreConfig,
            None,
            [f"extract_dir={out}", f"output_dir={tmp_path / 'ds'}", "tok_prob_threshold=0.05", "num_shards=2"],
        )
    )
    assert stats["keys"] > 0 and sum(stats["keys_per_shard"]) == stats["keys"]
    manifest = read_manifest(tmp_path / "ds")
    assert manifest["model_gen"] == str(tiny_model_dir) and manifest["tok_prob_threshold"] == 0.05
    shard = read_shard(tmp_path / "ds" / manifest["shards"][0])
    assert np.all(shard.entry_token % 2 == 0)


def test_kcd_models_must_share_a_tokenizer(ray_session, tiny_model_dir, tmp_path):
    other_tok = train_bpe_tokenizer(["completely different text " * 50, "another corpus entirely"], vocab_size=300)
    other = tmp_path / "other"
    build_causal_lm("tiny", other_tok).save_pretrained(other)
    other_tok.save_pretrained(other)
    with pytest.raises(DistilrayError, match="different tokenizers"):
        extract.plan_windows(_extract_cfg(tmp_path, tiny_model_dir, datastore_model=str(other)))


def test_empty_and_missing_inputs(tiny_model_dir, tmp_path):
    (tmp_path / "short.txt").write_text("tiny")
    with pytest.raises(DistilrayError, match="min_length"):
        extract.plan_windows(
            _extract_cfg(
                tmp_path,
                tiny_model_dir,
                **{"corpus.dataset": str(tmp_path / "short.txt"), "corpus.val_fraction": 0, "corpus.test_fraction": 0},
            )
        )
    with pytest.raises(DistilrayError, match="not a finished extraction"):
        build_datastore.run(load_config(BuildDatastoreConfig, None, [f"extract_dir={tmp_path}"]))
