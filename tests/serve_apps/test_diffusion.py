"""The masked diffusion LM endpoint on Ray Serve: real HTTP against 127.0.0.1, a tiny MDLM (dit-micro,
seq_len 32) with EMA weights, unconditional, prompted, seeded and streamed requests, and bad ones."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import requests
import torch

from distilray.decoding.mdlm import MAX_STEPS, sample
from distilray.errors import DistilrayError
from distilray.serve_apps.diffusion import app, build_app, check_model, parse_args
from distilray.serve_apps.diffusion_schemas import MASK_PLACEHOLDER, DiffusionAppArgs, DiffusionRequest

pytestmark = pytest.mark.ray

APP_NAME = "diffusion-test"
SEQ_LEN = 32
STEPS = 8
MAX_NUM_STEPS = 64
PROMPT = "The for statement is used to iterate"


@pytest.fixture(scope="module")
def folder(small_tokenizer, tmp_path_factory):
    """A saved dit-micro MDLM with its tokenizer and an EMA file that differs from the raw weights."""
    from safetensors.torch import save_file

    from distilray.models.mdlm import EMA_FILE, build_mdlm

    tok, _ = small_tokenizer
    path = tmp_path_factory.mktemp("serve-diffusion") / "mdlm"
    torch.manual_seed(0)
    model = build_mdlm("dit-micro", len(tok), tok.mask_token_id, SEQ_LEN, dropout=0.0)
    with torch.no_grad():  # the output layer starts at zero: make the predictions depend on the input
        for param in model.parameters():
            param.add_(0.1 * torch.randn_like(param))
    model.save_pretrained(path)
    tok.save_pretrained(path)
    ema = {k: v + 0.1 * torch.randn_like(v) for k, v in model.state_dict().items()}
    save_file({k: v.contiguous() for k, v in ema.items()}, str(path / EMA_FILE))
    return str(path)


@pytest.fixture(scope="module")
def server(serve_loopback, folder):
    """The app under route /diffusion on a free loopback port; shares a running Serve with the other tests."""
    application = build_app(
        {"model": folder, "default_num_steps": STEPS, "max_num_steps": MAX_NUM_STEPS, "num_cpus": 1}
    )
    with serve_loopback(application, APP_NAME, "/diffusion") as base:
        yield base


def _local_sample(folder: str, seed: int, num_steps: int, prefix: list[int] | None = None) -> list[int]:
    """What the endpoint must return: the sampler on the EMA weights with the same seed."""
    from distilray.models.mdlm import load_diffusion_lm

    model = load_diffusion_lm(folder)
    prefix_ids = torch.tensor(prefix) if prefix else None
    out = sample(model, 1, num_steps, generator=torch.Generator().manual_seed(seed), prefix=prefix_ids)
    return out.tokens[0].tolist()


def _events(response: requests.Response) -> list:
    """The `data:` payloads of a server-sent event stream, parsed ("[DONE]" kept as a string)."""
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("text/event-stream")
    blocks = [b for b in response.text.split("\n\n") if b.strip()]
    assert all(b.startswith("data: ") for b in blocks), blocks
    return [b[6:] if b[6:] == "[DONE]" else json.loads(b[6:]) for b in blocks]


def test_unconditional_completion_is_the_ema_sampler(server, client, folder, small_tokenizer):
    tok, _ = small_tokenizer
    out = client.ok(model="m", seed=11)
    # the model id is the folder's name, never the server's path to it
    assert out["object"] == "text_completion" and out["id"].startswith("cmpl-") and out["model"] == Path(folder).name
    (choice,) = out["choices"]
    stats, usage = out["distilray"], out["usage"]
    assert stats["num_steps"] == STEPS and 1 <= stats["nfe"] <= STEPS + 1  # the exact cache may skip a pass
    assert stats["prompt_tokens"] == usage["prompt_tokens"] == 0 and stats["seq_len"] == SEQ_LEN
    assert usage["completion_tokens"] == SEQ_LEN and usage["total_tokens"] == SEQ_LEN
    assert stats["seconds"] > 0 and stats["tokens_per_s"] == pytest.approx(SEQ_LEN / stats["seconds"])
    assert stats["request_seconds"] >= stats["seconds"] and stats["seed"] == 11
    ids = stats["token_ids"]
    assert ids == _local_sample(folder, 11, STEPS)  # EMA weights, the request's seed
    assert tok.mask_token_id not in ids
    assert choice["text"] == tok.decode(ids, skip_special_tokens=True) and choice["finish_reason"] == "length"
    assert client.ok(prompt="", seed=11)["distilray"]["token_ids"] == ids  # an empty prompt is no prompt
    # max_tokens cuts the returned text only; nfe equals num_steps without the cache's skips
    cut = client.ok(seed=11, max_tokens=5, num_steps=4, temperature=0.7)
    assert cut["usage"]["completion_tokens"] == 5 and len(cut["distilray"]["token_ids"]) == SEQ_LEN
    assert cut["choices"][0]["text"] == tok.decode(cut["distilray"]["token_ids"][:5], skip_special_tokens=True)
    assert cut["distilray"]["num_steps"] == 4 and cut["distilray"]["temperature"] == 0.7
    # many steps over few positions: the prediction cache skips the steps that revealed nothing
    many = client.ok(seed=3, num_steps=MAX_NUM_STEPS)["distilray"]
    assert many["num_steps"] == MAX_NUM_STEPS and many["nfe"] <= SEQ_LEN + 1


def test_prompt_is_the_fixed_prefix_and_seeds_repeat(server, client, folder, small_tokenizer):
    tok, _ = small_tokenizer
    prefix = [tok.bos_token_id, *tok(PROMPT, add_special_tokens=False)["input_ids"]]
    a = client.ok(prompt=PROMPT, seed=5, num_steps=6)
    ids = a["distilray"]["token_ids"]
    assert ids[: len(prefix)] == prefix and a["usage"]["prompt_tokens"] == a["distilray"]["prompt_tokens"] == len(
        prefix
    )
    assert a["usage"]["completion_tokens"] == SEQ_LEN - len(prefix)
    assert a["choices"][0]["text"] == tok.decode(ids[len(prefix) :], skip_special_tokens=True)
    assert ids == _local_sample(folder, 5, 6, prefix)
    assert client.ok(prompt=PROMPT, seed=5, num_steps=6)["choices"][0]["text"] == a["choices"][0]["text"]
    texts = {client.ok(prompt=PROMPT, num_steps=6)["choices"][0]["text"] for _ in range(3)}
    assert len(texts) > 1  # unseeded requests vary


def test_stream_sends_each_denoising_step(server, folder, small_tokenizer):
    tok, _ = small_tokenizer
    body = {"prompt": PROMPT, "seed": 9, "num_steps": STEPS, "stream": True}
    r = requests.post(f"{server}/v1/completions", json=body, stream=True, timeout=120)
    events = _events(r)
    assert events[-1] == "[DONE]"
    *steps, final = events[:-1]
    assert len(steps) == STEPS and len({e["id"] for e in events[:-1]}) == 1
    prompt_tokens = final["distilray"]["prompt_tokens"]
    ids = final["distilray"]["token_ids"]
    seen = []
    for j, event in enumerate(steps, start=1):
        assert event["object"] == "text_completion" and event["choices"][0]["text"] == ""
        step = event["distilray"]
        assert step["event"] == "step" and step["step"] == j and step["num_steps"] == STEPS
        assert 0 < step["t"] < 1 and (j == 1 or step["t"] < steps[j - 2]["distilray"]["t"])
        assert [ids[p] for p in step["positions"]] == step["token_ids"]  # revealed tokens never change
        seen += step["positions"]
        assert step["masked"] == SEQ_LEN - prompt_tokens - len(seen)
        assert step["text"].count(MASK_PLACEHOLDER) >= step["masked"]
    assert sorted(seen) == list(range(prompt_tokens, SEQ_LEN))  # every masked position, exactly once
    assert steps[-1]["distilray"]["masked"] == 0 and MASK_PLACEHOLDER not in steps[-1]["distilray"]["text"]
    assert final["distilray"]["event"] == "final" and final["choices"][0]["finish_reason"] == "length"
    plain = requests.post(f"{server}/v1/completions", json={**body, "stream": False}, timeout=120).json()
    assert final["choices"][0]["text"] == plain["choices"][0]["text"]  # streamed or not, the same sample
    assert ids == plain["distilray"]["token_ids"]


def test_bad_requests_get_400_naming_the_field_and_service_keeps_serving(server, client, assert_error, small_tokenizer):
    url = f"{server}/v1/completions"
    r = requests.post(url, data="{not json", headers={"Content-Type": "application/json"}, timeout=30)
    assert_error(r)
    assert r.status_code == 400 and "JSON" in r.json()["error"]["message"]
    for field, value in [
        ("num_steps", 0),
        ("num_steps", -3),
        ("num_steps", 10**9),
        ("num_steps", MAX_NUM_STEPS + 1),  # within MAX_STEPS, over this server's max_num_steps
        ("num_steps", "many"),
        ("temperature", 0),
        ("temperature", -1.0),
        ("max_tokens", -1),
        ("n", 2),
        ("seed", 2**70),
        ("prompt", 123),
        ("top_p", 0.9),  # unknown to a diffusion LM
        ("logprobs", 3),
    ]:
        r = client.post(**{field: value})
        assert r.status_code == 400, (field, value, r.text)
        assert_error(r, field)
    r = client.post(prompt="word " * SEQ_LEN)  # leaves nothing to sample
    assert r.status_code == 400 and str(SEQ_LEN) in r.json()["error"]["message"]
    assert_error(r, "prompt")
    assert_error(client.post(prompt=f"a {small_tokenizer[0].mask_token} b"), "prompt")
    r = client.post(prompt="word " * SEQ_LEN, stream=True)  # refused before any event
    assert r.status_code == 400 and r.headers["content-type"].startswith("application/json")
    assert_error(r, "prompt")
    assert client.ok(seed=1, num_steps=2)["distilray"]["num_steps"] == 2  # still serving
    assert_error(requests.get(f"{server}/v1/nowhere", timeout=30))


def test_health_and_models(server, folder):
    r = requests.get(f"{server}/healthz", timeout=30)
    assert r.status_code == 200 and r.json()["status"] == "ok"
    assert r.json()["seq_len"] == SEQ_LEN and r.json()["ema_weights"] is True
    (card,) = requests.get(f"{server}/v1/models", timeout=30).json()["data"]
    assert card["id"] == Path(folder).name and card["role"] == "diffusion"
    assert str(Path(folder).parent) not in r.text  # the server's paths are not a client's business


def test_app_args_and_model_checks(folder, tmp_path, monkeypatch, small_tokenizer):
    assert app is build_app
    assert parse_args({"model": "m"}).default_num_steps == 64
    monkeypatch.setenv("DISTILRAY_DIFFUSION_MODEL", folder)
    assert parse_args({}).model == folder
    monkeypatch.delenv("DISTILRAY_DIFFUSION_MODEL")
    with pytest.raises(DistilrayError, match="model: required"):
        parse_args({})
    with pytest.raises(DistilrayError, match="colour: unknown argument"):
        parse_args({"model": "m", "colour": 1})
    with pytest.raises(DistilrayError, match="exceeds max_num_steps"):
        parse_args({"model": "m", "default_num_steps": 100, "max_num_steps": 10})
    with pytest.raises(DistilrayError, match="default_num_steps"):
        parse_args({"model": "m", "default_num_steps": MAX_STEPS + 1})
    assert check_model(folder).seq_len == SEQ_LEN
    with pytest.raises(DistilrayError, match="mdlm_dit"):
        check_model(str(tmp_path))  # no model there
    tok, _ = small_tokenizer
    from distilray.models.mdlm import build_mdlm

    other = tmp_path / "other-mask"
    build_mdlm("dit-micro", len(tok) + 1, len(tok), SEQ_LEN).save_pretrained(other)
    tok.save_pretrained(other)
    with pytest.raises(DistilrayError, match="mask token id"):
        check_model(str(other))
    req = DiffusionRequest.model_validate({}, context={"args": DiffusionAppArgs(model="m", default_num_steps=7)})
    assert req.params(DiffusionAppArgs(model="m", default_num_steps=7), seed=4).num_steps == 7
