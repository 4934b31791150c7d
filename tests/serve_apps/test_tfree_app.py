"""The T-Free endpoint on Ray Serve: real HTTP against 127.0.0.1, a tfree-micro model with a small dictionary,
greedy, streamed, calibrated and more_words requests, and bad ones (special words, a bad decode_score)."""

from __future__ import annotations

import collections
import json

import pytest
import requests
import torch

from distilray.decoding.tfree_generate import DICTIONARY_DIR, generate_words, load_tfree_bundle
from distilray.errors import DistilrayError
from distilray.serve_apps.tfree import TFreeRequest, app, build_app, parse_args

pytestmark = pytest.mark.ray

APP_NAME = "tfree-test"
SERVED = "tfree-micro-test"
TEXT = (
    "The cat sat on the mat. A dog ran to the park, and the cat ran after it.\n"
    "Then the dog sat down; the cat sat on the dog. The end."
)
PROMPT = "The cat"


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """A saved tfree-micro model (weights scaled up, so its words vary) with a dictionary of TEXT's words."""
    from distilray.models.tfree_lm import build_tfree_lm, save_tfree_lm
    from distilray.tfree.dictionary import build_dictionary
    from distilray.tfree.hashing import TrigramVocab
    from distilray.tfree.wordsplit import split_words

    path = tmp_path_factory.mktemp("serve-tfree") / "tfree"
    torch.manual_seed(0)
    model = build_tfree_lm("tfree-micro", v=64, m=4, k=0, max_seq_len=64)
    with torch.no_grad():
        for param in model.parameters():
            param.mul_(3.0)
    save_tfree_lm(model, path)  # first: it writes the folder as a whole
    build_dictionary(collections.Counter(split_words(TEXT)), TrigramVocab(64, 4, 0)).save(path / DICTIONARY_DIR)
    return str(path)


@pytest.fixture(scope="module")
def server(serve_loopback, folder):
    """The app under route /tfree on a free loopback port; shares a running Serve with the other tests."""
    with serve_loopback(build_app({"model": folder, "served_model_name": SERVED}), APP_NAME, "/tfree") as base:
        yield base


def _local(folder: str, prompt: str, max_words: int, **kwargs):
    """What the endpoint must return: generate_words on the same folder."""
    model, dictionary = load_tfree_bundle(folder)
    return generate_words(model, dictionary, prompt, max_words=max_words, **kwargs)


def _events(response: requests.Response) -> list:
    """The `data:` payloads of a server-sent event stream, parsed ("[DONE]" kept as a string)."""
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("text/event-stream")
    blocks = [b for b in response.text.split("\n\n") if b.strip()]
    assert all(b.startswith("data: ") for b in blocks), blocks
    return [b[6:] if b[6:] == "[DONE]" else json.loads(b[6:]) for b in blocks]


def test_greedy_completion_is_generate_words(server, client, folder):
    out = client.ok(prompt=PROMPT, max_tokens=10)
    expected = _local(folder, PROMPT, 10)
    assert out["object"] == "text_completion" and out["id"].startswith("cmpl-") and out["model"] == SERVED
    (choice,) = out["choices"]
    assert choice["text"] == expected.text and choice["finish_reason"] == "length"
    assert out["usage"] == {"prompt_tokens": 2, "completion_tokens": 10, "total_tokens": 12}
    stats = out["distilray"]
    assert stats["words"] == expected.words and stats["stop_reason"] == "max_words"
    assert stats["decode_score"] == "head" and stats["dictionary_size"] == expected.dictionary_size
    assert stats["request_seconds"] >= stats["seconds"] > 0
    # a stop word: the text ends before it, finish_reason "stop"
    stop = expected.words[4]
    out = client.ok(prompt=PROMPT, max_tokens=10, stop=stop)
    assert out["distilray"]["words"] == expected.words[: expected.words.index(stop)]
    assert out["choices"][0]["finish_reason"] == "stop" and out["distilray"]["stop_reason"] == "stop_word"


def test_calibrated_and_more_words(server, client, folder):
    out = client.ok(prompt=PROMPT, max_tokens=8, decode_score="calibrated", word_edge_weight=0.5)
    expected = _local(folder, PROMPT, 8, method="calibrated")
    assert out["distilray"]["words"] == expected.words and out["distilray"]["decode_score"] == "calibrated"
    plain = client.ok(prompt=PROMPT, max_tokens=1)["distilray"]["dictionary_size"]
    more = client.ok(prompt=PROMPT, max_tokens=4, more_words="wombat quokka")
    assert more["distilray"]["dictionary_size"] == plain + 2
    assert more["distilray"]["words"] == _local(folder, PROMPT, 4, more_words="wombat quokka").words


def test_stream_sends_each_word(server, folder):
    body = {"prompt": PROMPT, "max_tokens": 12, "stream": True}
    events = _events(requests.post(f"{server}/v1/completions", json=body, stream=True, timeout=120))
    assert events[-1] == "[DONE]"
    *words, final = events[:-1]
    expected = _local(folder, PROMPT, 12)
    assert len({e["id"] for e in events[:-1]}) == 1 and all(e["model"] == SERVED for e in events[:-1])
    assert [e["distilray"]["word"] for e in words] == expected.words
    assert [e["distilray"]["index"] for e in words] == list(range(12))
    assert all(e["choices"][0]["finish_reason"] is None for e in words)
    assert "".join(e["choices"][0]["text"] for e in words) == expected.text
    assert final["distilray"]["event"] == "final" and final["choices"][0]["text"] == ""
    assert final["choices"][0]["finish_reason"] == "length" and final["usage"]["completion_tokens"] == 12


def test_bad_requests_get_400_and_service_keeps_serving(server, client, assert_error):
    for field, value in [
        ("prompt", "Hello <|endoftext|> world"),
        ("prompt", "   "),
        ("decode_score", "best"),
        ("more_words", "a <|ws|> b"),
        ("stop", "<|endoftext|>"),
        ("stop", "two words"),
        ("max_tokens", -1),
        ("temperature", -0.5),
        ("top_k", -2),
        ("top_p", 0.9),  # unknown to this app
    ]:
        r = client.post(**{"prompt": PROMPT, field: value})
        assert r.status_code == 400, (field, value, r.text)
        assert_error(r, field)
    r = client.post(prompt="word " * 70)  # more words than the model's context of 64
    assert r.status_code == 400 and "context of 64" in r.json()["error"]["message"]
    assert_error(r, "prompt")
    r = client.post(prompt="word " * 70, stream=True)  # refused before any event
    assert r.status_code == 400 and r.headers["content-type"].startswith("application/json")
    assert client.ok(prompt=PROMPT, max_tokens=3)["usage"]["completion_tokens"] == 3  # still serving


def test_health_and_models(server, folder):
    r = requests.get(f"{server}/healthz", timeout=30)
    assert r.status_code == 200 and r.json()["status"] == "ok" and r.json()["max_seq_len"] == 64
    (card,) = requests.get(f"{server}/v1/models", timeout=30).json()["data"]
    assert card["id"] == SERVED and "root" not in card  # no server paths in answers


def test_app_args_and_folder_checks(folder, tmp_path, monkeypatch):
    assert app is build_app
    args = parse_args({"model": "m"})
    assert args.served_model_name == "tfree" and args.device == "cpu" and args.num_gpus == 0
    assert parse_args({"model": "m", "device": "cuda:1"}).num_gpus == 1
    monkeypatch.setenv("DISTILRAY_TFREE_MODEL", folder)
    assert parse_args({}).model == folder
    monkeypatch.delenv("DISTILRAY_TFREE_MODEL")
    with pytest.raises(DistilrayError, match="model: required"):
        parse_args({})
    with pytest.raises(DistilrayError, match="device"):
        parse_args({"model": "m", "device": "tpu"})
    with pytest.raises(DistilrayError, match="no config.json"):
        build_app({"model": str(tmp_path)})
    req = TFreeRequest.model_validate({"prompt": PROMPT, "stop": ["\n", "."], "more_words": ""})
    params = req.params(seed=3)
    assert params.stop_words == ("<|\n|>", ".") and params.more_words is None and params.seed == 3
