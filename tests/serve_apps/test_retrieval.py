"""The CD-LM retrieval endpoint on Ray Serve: real HTTP against 127.0.0.1, tiny GPT-2, tiny datastore."""

from __future__ import annotations

import numpy as np
import pytest
import requests
import torch

from distilray.cdlm.datastore_files import write_datastore
from distilray.decoding.retrieval import retrieval_generate
from distilray.errors import DistilrayError
from distilray.serve_apps.retrieval import (
    ENV_DATASTORE,
    ENV_MODEL,
    app,
    build_app,
    check_datastore_tokenizer,
    parse_args,
)
from distilray.tokenizer import vocab_fingerprint

pytestmark = pytest.mark.ray

APP_NAME = "retrieval-test"
PROMPT = "The for statement is used to iterate over the elements of a sequence"
CONTEXT = 128  # model context, small so "prompt + max_tokens over the context" is cheap to hit
MAX_TOKENS_LIMIT = 120
CHUNK_LEN = 4
GEN = 24  # tokens of the greedy continuation the datastore is built from


@pytest.fixture(scope="module")
def artifacts(small_tokenizer, tmp_path_factory):
    """A saved tiny GPT-2 + tokenizer, a datastore built from its own greedy continuation of PROMPT
    (keys = its hidden states, so lookups on that path hit with cosine ~1), and one with a foreign
    tokenizer fingerprint."""
    from distilray.models.causal_lm import build_causal_lm

    tok, _ = small_tokenizer
    root = tmp_path_factory.mktemp("serve-cdlm")
    torch.manual_seed(0)
    model = build_causal_lm("tiny", tok, n_positions=CONTEXT).eval()
    with torch.no_grad():  # larger weights: varied greedy text and top-2 gaps far above float rounding
        for param in model.parameters():
            param.mul_(5.0)
    model_dir = root / "model"
    model.save_pretrained(model_dir)
    tok.save_pretrained(model_dir)

    prompt_ids = tok(PROMPT)["input_ids"]
    cont = retrieval_generate(model, prompt_ids, GEN, None, mode="baseline").token_ids
    seq = prompt_ids + cont
    with torch.no_grad():
        hidden = model(input_ids=torch.tensor([seq]), output_hidden_states=True).hidden_states[-1][0].numpy()
    positions = list(range(len(prompt_ids) - 1, len(seq) - 1))
    chunks = [tuple(seq[i + 1 : i + 1 + CHUNK_LEN]) for i in positions]
    entry = np.array([seq[i] for i in positions])
    keys = hidden[positions]
    # a few decoys: other entry tokens with random keys and random chunks
    rng = np.random.default_rng(0)
    decoy_entry = rng.integers(0, len(tok), size=8)
    decoy_keys = rng.standard_normal((8, keys.shape[1])).astype(np.float32)
    decoy_chunks = [tuple(int(t) for t in rng.integers(10, len(tok), size=3)) for _ in range(8)]
    all_chunks = chunks + decoy_chunks
    common = dict(
        entry_tokens=np.concatenate([entry, decoy_entry]),
        keys=np.concatenate([keys, decoy_keys]),
        chunk_ids=np.arange(len(all_chunks)),
        chunks=all_chunks,
        num_shards=2,
    )
    store = root / "store"
    write_datastore(store, tokenizer_fingerprint=vocab_fingerprint(tok), **common)
    foreign = root / "foreign"
    write_datastore(foreign, tokenizer_fingerprint="0123456789abcdef", **common)
    return {
        "model": str(model_dir),
        "store": str(store),
        "foreign": str(foreign),
        "tok": tok,
        "num_keys": len(all_chunks),
        "baseline": cont,
    }


@pytest.fixture(scope="module")
def server(serve_loopback, artifacts):
    """The app under route /cdlm on a free loopback port; deleted (and Serve stopped if we started it) after."""
    app = build_app(
        {
            "model": artifacts["model"],
            "datastore": artifacts["store"],
            "max_tokens_limit": MAX_TOKENS_LIMIT,
            "served_model_name": "cdlm-tiny",
            "num_cpus": 1,
        }
    )
    with serve_loopback(app, APP_NAME, "/cdlm") as base:
        yield base


def test_completion_has_openai_shape_and_stats(artifacts, client):
    out = client.ok(model="cdlm-tiny", prompt=PROMPT, max_tokens=12)
    assert out["object"] == "text_completion" and out["id"].startswith("cmpl-")
    assert isinstance(out["created"], int) and out["model"] == "cdlm-tiny"
    (choice,) = out["choices"]
    assert choice["index"] == 0 and isinstance(choice["text"], str)
    usage = out["usage"]
    assert usage["prompt_tokens"] == len(artifacts["tok"](PROMPT)["input_ids"])
    n = usage["completion_tokens"]
    assert (n == 12 and choice["finish_reason"] == "length") or (n < 12 and choice["finish_reason"] == "stop")
    assert usage["total_tokens"] == usage["prompt_tokens"] + n
    stats = out["distilray"]
    assert stats["mode"] == "paper"  # the app's default_mode
    for key in ("chunks_used", "forward_passes", "tokens_from_chunks", "seconds"):
        assert key in stats
    assert 1 <= stats["forward_passes"] <= n and stats["seconds"] > 0
    assert stats["lookups"] == stats["steps"] >= 1  # every paper-mode step asked the router deployment
    # the default threshold 0.5 is reached on the path the datastore was built from
    assert stats["chunks_used"] > 0 and stats["tokens_from_chunks"] > 0


def test_verify_equals_baseline_and_saves_passes(artifacts, client):
    base = client.ok(prompt=PROMPT, max_tokens=GEN, mode="baseline")
    ver = client.ok(prompt=PROMPT, max_tokens=GEN, mode="verify", temperature=0)
    want = artifacts["tok"].decode(artifacts["baseline"], skip_special_tokens=True)
    assert base["choices"][0]["text"] == want  # served model == the in-process one
    assert ver["choices"][0]["text"] == base["choices"][0]["text"]
    assert ver["usage"] == base["usage"]
    assert base["distilray"]["mode"] == "baseline" and base["distilray"]["lookups"] == 0
    assert base["distilray"]["chunks_used"] == 0
    # the chunks are the model's own continuation: verify accepts them and needs fewer passes
    assert ver["distilray"]["chunks_used"] > 0
    assert ver["distilray"]["forward_passes"] < base["distilray"]["forward_passes"]
    assert ver["distilray"]["lookups"] > 0


def test_concurrent_requests_share_passes_and_lookups(server, artifacts, client):
    """Eight clients at once, every mode: one batch, one datastore call per step for all rows, and each
    greedy verify/baseline answer equal to decoding alone."""
    from concurrent.futures import ThreadPoolExecutor

    modes = ["verify", "baseline", "paper", "verify"] * 2
    bodies = [dict(prompt=PROMPT, max_tokens=GEN - i, mode=m, similarity_threshold=0.9) for i, m in enumerate(modes)]
    before = requests.get(f"{server}/healthz", timeout=30).json()
    with ThreadPoolExecutor(len(bodies)) as pool:
        outs = list(pool.map(lambda body: client.ok(**body), bodies))
    after = requests.get(f"{server}/healthz", timeout=30).json()
    tok = artifacts["tok"]
    for body, out in zip(bodies, outs):
        if body["mode"] != "paper":  # lossless modes: the model's own greedy text
            want = tok.decode(artifacts["baseline"][: body["max_tokens"]], skip_special_tokens=True)
            assert out["choices"][0]["text"] == want
    steps = after["batch"]["steps"] - before["batch"]["steps"]
    rows = (
        after["batch"]["mean_batch"] * after["batch"]["steps"]
        - before["batch"]["mean_batch"] * before["batch"]["steps"]
    )
    assert rows / steps > 1.5, (before, after)
    lookups = sum(out["distilray"]["lookups"] for out in outs)
    assert after["lookup_calls"] - before["lookup_calls"] < lookups  # rows' queries shared calls


def test_paper_mode_threshold_minus_one_uses_chunks(client):
    other = "Exceptions can be raised by the raise statement"  # a prompt the datastore was not built from
    out = client.ok(prompt=other, max_tokens=16, mode="paper", similarity_threshold=-1, seed=3)
    stats = out["distilray"]
    assert stats["chunks_used"] > 0 and stats["tokens_from_chunks"] > 0
    assert stats["forward_passes"] < out["usage"]["completion_tokens"]
    # same request, same answer
    again = client.ok(prompt=other, max_tokens=16, mode="paper", similarity_threshold=-1, seed=3)
    assert again["choices"] == out["choices"]


def test_tts_served_and_in_process_measure_the_same_decoding(server, artifacts):
    """bench serve's CD-LM comparison: the endpoint and the in-process loop use the same chunks (same
    FPS), and each TTS is 1 - paper / baseline seconds per token on its own side."""
    from distilray.bench.serve_cdlm import cdlm_tts

    paths = {"target": artifacts["model"], "datastore": artifacts["store"]}
    out = cdlm_tts({"shards": server}, paths, [PROMPT, PROMPT], 16, "none", 0.5, served_model_name="cdlm-tiny")
    local, served = out["in_process"], out["shards"]
    assert local["paper_fps"] > 0  # the datastore holds this prompt's own continuation
    assert served["paper_fps"] == pytest.approx(local["paper_fps"])
    for side in (local, served):
        assert side["tts"] == pytest.approx(1 - side["paper_seconds_per_token"] / side["baseline_seconds_per_token"])
    if local["tts"] > 0:
        assert served["ratio_vs_in_process"] == pytest.approx(served["tts"] / local["tts"])
    else:
        assert served["ratio_vs_in_process"] is None


def test_datastore_in_the_target_replica_answers_as_the_shards_do(serve_loopback, artifacts, server, client):
    """datastore_placement=target: no router, no shard actors; the same chunks, the same greedy text."""
    from ray import serve

    from tests.serve_apps.conftest import CompletionsClient

    app = build_app(
        {
            "model": artifacts["model"],
            "datastore": artifacts["store"],
            "served_model_name": "cdlm-tiny",
            "num_cpus": 0,
            "datastore_placement": "target",
        }
    )
    request = {"prompt": PROMPT, "max_tokens": 16, "mode": "paper", "similarity_threshold": 0.5, "temperature": 0}
    with serve_loopback(app, APP_NAME + "-in-target", "/cdlm-in-target") as base:
        local = CompletionsClient(base).ok(**request)
        stats = requests.get(f"{base}/v1/datastore/stats", timeout=60).json()
        deployments = set(serve.status().applications[APP_NAME + "-in-target"].deployments)
    assert "DatastoreRouterDeployment" not in deployments and "TargetDeployment" in deployments
    sharded = client.ok(**request)
    assert local["choices"][0]["text"] == sharded["choices"][0]["text"]
    assert local["distilray"]["chunks_used"] == sharded["distilray"]["chunks_used"] > 0
    assert stats["placement"] == "target" and stats["manifest"]["num_keys"] == artifacts["num_keys"]


def test_sampling_is_seeded(client):
    a = client.ok(prompt=PROMPT, max_tokens=10, mode="verify", temperature=1.0, seed=5)
    b = client.ok(prompt=PROMPT, max_tokens=10, mode="verify", temperature=1.0, seed=5)
    assert a["choices"][0]["text"] == b["choices"][0]["text"]
    # without a seed every request draws its own (it used to be seed 0 for all: the same text each time)
    unseeded = {client.ok(prompt=PROMPT, max_tokens=10, mode="baseline", temperature=2.0)["choices"][0]["text"]}
    unseeded |= {client.ok(prompt=PROMPT, max_tokens=10, mode="baseline", temperature=2.0)["choices"][0]["text"]}
    unseeded |= {client.ok(prompt=PROMPT, max_tokens=10, mode="baseline", temperature=2.0)["choices"][0]["text"]}
    assert len(unseeded) > 1


def test_stream_and_chat_through_the_official_openai_client(server, artifacts, client):
    from openai import OpenAI

    api = OpenAI(base_url=f"{server}/v1", api_key="unused", max_retries=0, timeout=120)
    whole = client.ok(prompt=PROMPT, max_tokens=GEN, mode="paper")
    pieces = api.completions.create(
        model="cdlm-tiny", prompt=PROMPT, max_tokens=GEN, stream=True, extra_body={"mode": "paper"}
    )
    chunks = list(pieces)
    assert "".join(c.choices[0].text for c in chunks) == whole["choices"][0]["text"]
    assert chunks[-1].choices[0].finish_reason == whole["choices"][0]["finish_reason"]
    assert len(chunks) > 1  # the text came in pieces as it was decoded, then the final event
    chat = api.chat.completions.create(
        model="cdlm-tiny", messages=[{"role": "user", "content": PROMPT}], max_tokens=8, extra_body={"mode": "verify"}
    )
    assert chat.object == "chat.completion" and chat.choices[0].message.role == "assistant"
    streamed = api.chat.completions.create(
        model="cdlm-tiny",
        messages=[{"role": "user", "content": PROMPT}],
        max_tokens=8,
        stream=True,
        extra_body={"mode": "verify"},
    )
    assert "".join(c.choices[0].delta.content or "" for c in streamed if c.choices) == chat.choices[0].message.content


def test_bad_requests_get_4xx_json_and_service_keeps_serving(server, client, assert_error):
    url = f"{server}/v1/completions"
    r = requests.post(url, data="{not json", headers={"Content-Type": "application/json"}, timeout=30)
    assert_error(r)
    assert "JSON" in r.json()["error"]["message"]
    assert_error(requests.post(url, json={"max_tokens": 5}, timeout=30), "prompt")  # no prompt
    assert_error(client.post(prompt=123), "prompt")
    assert_error(client.post(prompt=PROMPT, max_tokens="many"), "max_tokens")
    assert_error(client.post(prompt=PROMPT, max_tokens=-1), "max_tokens")
    r = client.post(prompt=PROMPT, max_tokens=MAX_TOKENS_LIMIT + 1)
    assert_error(r, "max_tokens")
    assert str(MAX_TOKENS_LIMIT) in r.json()["error"]["message"]
    assert_error(client.post(prompt=PROMPT, similarity_threshold=1.5), "similarity_threshold")
    assert_error(client.post(prompt=PROMPT, similarity_threshold=-1.01), "similarity_threshold")
    r = client.post(prompt=PROMPT, mode="beam")
    assert_error(r, "mode")
    assert "beam" in r.json()["error"]["message"]
    assert_error(client.post(prompt=""), "prompt")
    assert_error(client.post(prompt=PROMPT, temperature=-0.5), "temperature")
    assert_error(client.post(prompt=PROMPT, n=2), "n")
    assert_error(client.post(prompt=PROMPT, seed=2**70), "seed")
    # within max_tokens_limit but over the model's context once the prompt is counted (checked by the target)
    r = client.post(prompt=PROMPT, max_tokens=MAX_TOKENS_LIMIT)
    assert_error(r)
    assert "context" in r.json()["error"]["message"] and str(CONTEXT) in r.json()["error"]["message"]
    assert_error(requests.get(f"{server}/v1/nowhere", timeout=30))  # 404 in the same JSON shape
    # still serving
    out = client.ok(prompt=PROMPT, max_tokens=5, mode="verify")
    assert out["usage"]["completion_tokens"] <= 5


def test_health_models_and_datastore_stats(server, artifacts, client):
    r = requests.get(f"{server}/healthz", timeout=30)
    assert r.status_code == 200 and r.json()["status"] == "ok"
    assert r.json()["context"] == CONTEXT
    assert r.json()["tokenizer_fingerprint"] == vocab_fingerprint(artifacts["tok"])
    models = requests.get(f"{server}/v1/models", timeout=30).json()
    assert models["data"][0]["id"] == "cdlm-tiny"
    client.ok(prompt=PROMPT, max_tokens=4, mode="paper")
    stats = requests.get(f"{server}/v1/datastore/stats", timeout=30).json()
    root = str(artifacts["store"]).rsplit("/", 1)[0]  # where the server keeps its files: never shown
    assert not any(root in requests.get(f"{server}/{p}", timeout=30).text for p in ("healthz", "v1/datastore/stats"))
    assert stats["num_shards"] == 2 and stats["num_keys"] == artifacts["num_keys"]
    assert stats["queries"] > 0 and stats["router"]["calls"] > 0 and stats["router"]["mean_call_ms"] > 0
    assert len(stats["shards"]) == 2


def test_foreign_tokenizer_fingerprint_is_refused(artifacts):
    tok = artifacts["tok"]
    assert check_datastore_tokenizer(artifacts["store"], tok) == vocab_fingerprint(tok)
    with pytest.raises(DistilrayError, match="another tokenizer"):
        check_datastore_tokenizer(artifacts["foreign"], tok)
    with pytest.raises(DistilrayError, match="another tokenizer"):  # build time, before anything deploys
        build_app({"model": artifacts["model"], "datastore": artifacts["foreign"]})
    with pytest.raises(DistilrayError, match="no datastore"):
        build_app({"model": artifacts["model"], "datastore": artifacts["store"] + "-missing"})


def test_builder_args_and_environment(artifacts, monkeypatch):
    from ray.serve import Application
    from ray.serve._private.api import call_user_app_builder_with_args_if_necessary

    monkeypatch.delenv(ENV_MODEL, raising=False)
    monkeypatch.delenv(ENV_DATASTORE, raising=False)
    with pytest.raises(DistilrayError, match="model: required"):
        parse_args({"datastore": artifacts["store"]})
    with pytest.raises(DistilrayError, match="colour: unknown argument"):
        parse_args({"model": "m", "datastore": "d", "colour": "red"})
    with pytest.raises(DistilrayError, match="default_mode"):
        parse_args({"model": "m", "datastore": "d", "default_mode": "fast"})
    with pytest.raises(DistilrayError, match="similarity_threshold"):
        parse_args({"model": "m", "datastore": "d", "similarity_threshold": "2"})
    # what `serve run distilray.serve_apps.retrieval:app model=... num_cpus=0.5` does: string args
    built = call_user_app_builder_with_args_if_necessary(
        app, {"model": artifacts["model"], "datastore": artifacts["store"], "num_cpus": "0.5"}
    )
    assert isinstance(built, Application)
    # and with no args at all, the environment names the model and the datastore
    monkeypatch.setenv(ENV_MODEL, artifacts["model"])
    monkeypatch.setenv(ENV_DATASTORE, artifacts["store"])
    assert parse_args({}).model == artifacts["model"]
    assert isinstance(call_user_app_builder_with_args_if_necessary(app, {}), Application)
