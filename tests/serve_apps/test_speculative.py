"""The speculative-decoding endpoint on Ray Serve: real HTTP against 127.0.0.1, tiny GPT-2 target,
an n-gram drafter and a transformer drafter, each in its own deployment."""

from __future__ import annotations

import pydoc_data.topics
import time

import pytest
import requests
import torch

from distilray.decoding.sampling import Sampler, SamplingParams
from distilray.decoding.speculative import MAX_GAMMA, plain_generate, speculative_generate
from distilray.errors import DistilrayError
from distilray.serve_apps.schemas import DraftRequest
from distilray.serve_apps.speculative import (
    ENV_DRAFTERS,
    ENV_TARGET,
    app,
    build_app,
    parse_args,
)
from distilray.serve_apps.speculative_drafter import DrafterSessions, RemoteDrafter, socket_calls

pytestmark = pytest.mark.ray

APP_NAME = "speculative-test"
SERVED = "spec-tiny"
PROMPTS = [
    "The for statement is used to iterate over the elements of a sequence",
    "Exceptions can be raised by the raise statement",
]
CONTEXT = 128  # target context, small so "prompt + max_tokens over the context" is cheap to hit
MAX_TOKENS_LIMIT = 120
GEN = 20


@pytest.fixture(scope="module")
def artifacts(small_tokenizer, tmp_path_factory):
    """A saved tiny GPT-2 target + tokenizer; drafters: an n-gram fitted on pydoc text, a copy of the
    target as a transformer drafter (greedy acceptance ~1, so multi-token steps are exercised), and an
    n-gram over another vocabulary size."""
    from distilray.models.causal_lm import build_causal_lm
    from distilray.models.ngram import NGramDrafter
    from distilray.tokenizer import encode_documents

    tok, _ = small_tokenizer
    root = tmp_path_factory.mktemp("serve-spec")
    torch.manual_seed(0)
    target = build_causal_lm("tiny", tok, n_positions=CONTEXT).eval()
    with torch.no_grad():  # peaky: varied greedy text, top-2 gaps far above float rounding
        for param in target.parameters():
            param.mul_(5.0)
    paths = {
        "target": root / "target",
        "ngram3": root / "ngram3",
        "transformer": root / "transformer",
        "foreign": root / "foreign",
        "near": root / "near",
    }
    target.save_pretrained(paths["target"])
    tok.save_pretrained(paths["target"])
    target.save_pretrained(paths["transformer"])
    texts = [pydoc_data.topics.topics[k] for k in sorted(pydoc_data.topics.topics)[:30]]
    NGramDrafter(3, len(tok)).fit(encode_documents(tok, texts)).save(paths["ngram3"])
    NGramDrafter(2, len(tok) + 7).fit([[1, 2, 3]]).save(paths["foreign"])
    # near the target after PROMPTS[1]: fitted on the target's own samples there, so that drafts are often
    # accepted, often not, and a rejection's residual differs from the target's distribution
    near_ids = tok(PROMPTS[1])["input_ids"]
    samples = [plain_generate(target, near_ids, 2, temperature=1.5, seed=s).token_ids for s in range(300)]
    # (each sample counted 20 times, so that add-one smoothing over the vocabulary leaves q near p)
    NGramDrafter(3, len(tok)).fit([near_ids + s for s in samples] * 20).save(paths["near"])
    eos = tok.eos_token_id
    want = {
        p: tok.decode(
            plain_generate(target, tok(p)["input_ids"], GEN, eos_token_id=eos).token_ids, skip_special_tokens=True
        )
        for p in PROMPTS
    }
    return {**{k: str(v) for k, v in paths.items()}, "tok": tok, "model": target, "want": want}


@pytest.fixture(scope="module")
def server(serve_loopback, artifacts):
    """The app under route /speculative on a free loopback port; deleted (and Serve stopped if we
    started it) after. Shares a running Serve instance with the other Serve tests."""
    drafters = {
        "ngram3": artifacts["ngram3"],
        "transformer": artifacts["transformer"],
        "near": artifacts["near"],
        "lookup": "prompt-lookup",
    }
    app = build_app(
        {
            "target": artifacts["target"],
            "drafters": drafters,
            "default_drafter": "ngram3",
            "max_tokens_limit": MAX_TOKENS_LIMIT,
            "max_prompt_bytes": 4096,
            "served_model_name": SERVED,
            "max_batch_size": 8,
            "batch_wait_ms": 20,
            "num_cpus": 1,
        }
    )
    with serve_loopback(app, APP_NAME, "/speculative") as base:
        yield base


def _assert_consistent(stats: dict, usage: dict) -> None:
    n = usage["completion_tokens"]
    assert stats["generated_tokens"] == n
    assert 0 <= stats["accepted"] <= stats["drafted"] and stats["rejections"] <= stats["target_passes"]
    assert stats["mean_accepted_length"] == pytest.approx(n / stats["target_passes"])
    # every pass emits one target token on top of the accepted drafts (truncation only at the end)
    assert stats["target_passes"] <= n <= stats["accepted"] + stats["target_passes"]
    if stats["accepted"] + stats["rejections"]:
        assert stats["alpha"] == pytest.approx(stats["accepted"] / (stats["accepted"] + stats["rejections"]))
    if stats["drafted"]:
        assert stats["draft_acceptance_rate"] == pytest.approx(stats["accepted"] / stats["drafted"])
    assert stats["seconds"] > 0 and stats["tokens_per_s"] == pytest.approx(n / stats["seconds"])
    assert stats["request_seconds"] >= stats["seconds"]


@pytest.mark.parametrize("drafter", ["ngram3", "transformer", "lookup", "none"])
def test_greedy_output_equals_plain_decoding_over_the_wire(artifacts, drafter, client):
    for prompt in PROMPTS:
        out = client.ok(model=SERVED, prompt=prompt, max_tokens=GEN, drafter=drafter, gamma=3)
        assert out["object"] == "text_completion" and out["id"].startswith("cmpl-") and out["model"] == SERVED
        (choice,) = out["choices"]
        assert choice["text"] == artifacts["want"][prompt]  # lossless through two deployments
        usage, stats = out["usage"], out["distilray"]
        assert usage["prompt_tokens"] == len(artifacts["tok"](prompt)["input_ids"])
        assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
        assert choice["finish_reason"] == ("length" if usage["completion_tokens"] == GEN else "stop")
        _assert_consistent(stats, usage)
        assert stats["drafter"] == drafter
        if drafter == "none":
            assert stats["drafted"] == stats["drafter_round_trips"] == 0 and stats["gamma"] is None
            assert stats["target_passes"] == usage["completion_tokens"] and stats["alpha"] is None
        elif drafter == "lookup":  # in the target's process: no round trips
            assert stats["drafter_transport"] == "local" and stats["drafter_round_trips"] == 0
        else:
            assert stats["gamma"] == 3 and stats["drafted"] > 0
            # one round trip per step; a last step with nothing left to draft makes none
            assert stats["target_passes"] - 1 <= stats["drafter_round_trips"] <= stats["target_passes"]
            assert stats["session_restarts"] == 0 and stats["drafter_transport"] == "socket"  # same node
            assert 0 <= stats["drafter_seconds"] <= stats["round_trip_seconds"]
        if drafter == "transformer":  # the target's own copy: every draft accepted
            assert stats["alpha"] == 1.0 and stats["mean_accepted_length"] > 2


def test_sampling_adaptive_gamma_and_stop(artifacts, client):
    body = dict(prompt=PROMPTS[0], max_tokens=GEN, temperature=1.0, top_p=0.9, seed=5, drafter="ngram3")
    a, b = client.ok(**body), client.ok(**body)
    assert a["choices"][0]["text"] == b["choices"][0]["text"]  # seeded drafts and tests: reproducible
    _assert_consistent(a["distilray"], a["usage"])
    c = client.ok(**{**body, "drafter": "transformer", "adaptive_gamma": True, "gamma": 2})
    stats = c["distilray"]
    _assert_consistent(stats, c["usage"])
    assert stats["adaptive_gamma"] and stats["alpha"] == 1.0  # p == q: nothing is ever rejected
    assert stats["drafted"] > 2 * (stats["target_passes"] - 1)  # gamma grew past 2
    want = artifacts["want"][PROMPTS[0]]
    cut = want[len(want) // 2 :][:3]  # a stop string from the middle of the greedy text
    out = client.ok(prompt=PROMPTS[0], max_tokens=GEN, stop=["@@never@@", cut])
    assert out["choices"][0]["text"] == want[: want.find(cut)] and out["choices"][0]["finish_reason"] == "stop"
    assert 0 < out["usage"]["completion_tokens"] < GEN


def test_sampled_text_follows_the_warped_target_over_the_wire(artifacts, client, chi2_fits):
    """Speculative sampling through the endpoint, rows batched together, an n-gram drafter near the target
    in its own replica (q rows over the socket): two-token answers follow the warped target's
    distribution (temperature 1.5, top-p 0.9): a chi-square test of their first tokens, read from the texts.
    (Sampling a correction from p instead of the residual fails it.)"""
    from concurrent.futures import ThreadPoolExecutor

    from distilray.decoding.sampling import warp

    tok, model, prompt, runs = artifacts["tok"], artifacts["model"], PROMPTS[1], 320
    ids = tok(prompt)["input_ids"]

    def warped_next(seq: list[int]) -> torch.Tensor:
        with torch.inference_mode():
            return warp(model(torch.tensor([seq])).logits[0, -1], 1.5, 0.9).double()

    # the exact distribution of the answer's first token, read from the text: a text that two first
    # tokens could start (one token's text a prefix of another's) joins their bins
    first = warped_next(ids)
    bin_of_text: dict[str, int] = {}
    bins = {a: a for a in first.nonzero().flatten().tolist()}  # union-find over first tokens

    def root(a: int) -> int:
        while bins[a] != a:
            a = bins[a]
        return a

    for a in list(bins):
        seconds = [] if a == tok.eos_token_id else warped_next([*ids, a]).nonzero().flatten().tolist()
        for b in seconds or [None]:  # an answer that ends at its first token has one
            text = tok.decode([a] if b is None else [a, b], skip_special_tokens=True)
            if text in bin_of_text:
                bins[root(a)] = root(bin_of_text[text])
            bin_of_text[text] = a
    groups = sorted({root(a) for a in bins})
    probs = torch.zeros(len(groups) + 1, dtype=torch.float64)  # the last bin: an impossible text
    for a in bins:
        probs[groups.index(root(a))] += first[a]
    body = dict(prompt=prompt, max_tokens=2, temperature=1.5, top_p=0.9, drafter="near", gamma=3)
    with ThreadPoolExecutor(8) as pool:
        outs = list(pool.map(lambda seed: client.ok(**body, seed=seed), range(runs)))
    assert sum(o["distilray"]["drafted"] for o in outs) >= runs  # every answer's first step drafted
    rejections = sum(o["distilray"]["rejections"] for o in outs)
    assert runs // 10 < rejections < runs - runs // 10  # drafts accepted and corrections sampled, both often
    texts = [o["choices"][0]["text"] for o in outs]
    samples = [groups.index(root(bin_of_text[t])) if t in bin_of_text else len(groups) for t in texts]
    assert (probs > 0.05).sum() >= 3  # several likely first tokens
    assert chi2_fits(samples, probs)


def test_bad_requests_get_4xx_json_and_service_keeps_serving(server, client, assert_error):
    url = f"{server}/v1/completions"
    r = requests.post(url, data="{not json", headers={"Content-Type": "application/json"}, timeout=30)
    assert_error(r)
    assert "JSON" in r.json()["error"]["message"]
    p = PROMPTS[0]
    assert_error(requests.post(url, json={"max_tokens": 5}, timeout=30), "prompt")
    assert_error(client.post(prompt=123), "prompt")
    assert_error(client.post(prompt=""), "prompt")
    assert_error(client.post(prompt=p, max_tokens="many"), "max_tokens")
    assert_error(client.post(prompt=p, max_tokens=-1), "max_tokens")
    r = client.post(prompt=p, max_tokens=MAX_TOKENS_LIMIT + 1)
    assert_error(r, "max_tokens")
    assert str(MAX_TOKENS_LIMIT) in r.json()["error"]["message"]
    assert_error(client.post(prompt=p, gamma=0), "gamma")
    assert_error(client.post(prompt=p, gamma=MAX_GAMMA + 1), "gamma")
    assert_error(client.post(prompt=p, gamma=10**6), "gamma")
    assert_error(client.post(prompt=p, gamma="x"), "gamma")
    r = client.post(prompt=p, drafter="medusa")
    assert_error(r, "drafter")
    assert "medusa" in r.json()["error"]["message"] and "ngram3" in r.json()["error"]["message"]
    assert_error(client.post(prompt=p, temperature=-0.5), "temperature")
    assert_error(client.post(prompt=p, top_p=1.5), "top_p")
    assert_error(client.post(prompt=p, n=2), "n")
    assert_error(client.post(prompt="x" * 5000), "prompt")  # over max_prompt_bytes: refused before tokenising
    r = client.post(prompt=p, model="gpt-4")
    assert r.status_code == 404 and r.json()["error"]["param"] == "model" and SERVED in r.json()["error"]["message"]
    assert_error(client.post(prompt=p, stop=["a", "b", "c", "d", "e"]), "stop")
    assert_error(client.post(prompt=p, seed=2**70), "seed")
    # within max_tokens_limit but over the target's context once the prompt is counted (checked by the target)
    for drafter in ("ngram3", "none"):
        r = client.post(prompt=p, max_tokens=MAX_TOKENS_LIMIT, drafter=drafter)
        assert_error(r)
        assert "context" in r.json()["error"]["message"] and str(CONTEXT) in r.json()["error"]["message"]
    assert_error(requests.get(f"{server}/v1/nowhere", timeout=30))  # 404 in the same JSON shape
    out = client.ok(prompt=p, max_tokens=5)  # still serving, with the default drafter
    assert out["usage"]["completion_tokens"] <= 5 and out["distilray"]["drafter"] == "ngram3"


def test_health_models_stats_and_sessions_closed(server, artifacts, client):
    r = requests.get(f"{server}/healthz", timeout=30)
    assert r.status_code == 200 and r.json()["status"] == "ok"
    assert r.json()["context"] == CONTEXT and r.json()["vocab_size"] == len(artifacts["tok"])
    models = requests.get(f"{server}/v1/models", timeout=30).json()["data"]
    assert [m["id"] for m in models] == [SERVED, "ngram3", "transformer", "near", "lookup"]
    # no response shows where the server keeps its files
    bodies = [requests.get(f"{server}/{path}", timeout=30).text for path in ("healthz", "v1/models", "v1/stats")]
    assert not any(str(artifacts["target"]).rsplit("/", 2)[0] in body for body in bodies)
    client.ok(prompt=PROMPTS[1], max_tokens=8, drafter="ngram3")
    deadline = time.monotonic() + 20
    while True:  # end(session) is fire-and-forget: give it a moment
        stats = requests.get(f"{server}/v1/stats", timeout=30).json()
        if all(d["sessions"] == 0 for d in stats["drafters"].values()) or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert all(d["sessions"] == 0 for d in stats["drafters"].values())
    ngram = stats["drafters"]["ngram3"]
    assert ngram["kind"] == "ngram" and ngram["steps"] > 0 and ngram["mean_step_ms"] > 0
    totals = stats["totals"]["ngram3"]
    assert totals["requests"] >= 1 and 0 <= totals["accepted_tokens"] <= totals["drafted_tokens"]
    assert totals["target_passes"] <= totals["generated_tokens"]
    # the same counters reach Prometheus, tagged by drafter (Ray exports them every few seconds)
    import ray

    port = ray._private.worker._global_node.metrics_export_port
    wanted = [f"ray_distilray_spec_{k}_total" for k in ("drafted_tokens", "requests", "target_passes")]
    deadline = time.monotonic() + 45
    while True:
        lines = [
            line
            for line in requests.get(f"http://127.0.0.1:{port}/metrics", timeout=30).text.splitlines()
            if line.startswith("ray_distilray_spec_") and 'drafter="ngram3"' in line
        ]
        if all(any(line.startswith(w) for line in lines) for w in wanted) or time.monotonic() > deadline:
            break
        time.sleep(1)
    drafted = [float(line.rsplit(" ", 1)[1]) for line in lines if line.startswith(wanted[0])]
    assert drafted and max(drafted) > 0, lines


def _sse(response: requests.Response) -> list[dict]:
    """The JSON events of a server-sent event stream, up to its [DONE]."""
    import json

    assert response.status_code == 200 and response.headers["content-type"].startswith("text/event-stream")
    lines = [line[len("data: ") :] for line in response.text.splitlines() if line.startswith("data: ")]
    assert lines[-1] == "[DONE]"
    return [json.loads(line) for line in lines[:-1]]


@pytest.mark.parametrize("drafter", ["transformer", "none"])
def test_stream_sends_the_text_block_by_block(server, artifacts, client, drafter):
    body = dict(prompt=PROMPTS[0], max_tokens=GEN, drafter=drafter, gamma=3)
    plain = client.ok(**body)
    events = _sse(requests.post(f"{server}/v1/completions", json={**body, "stream": True}, timeout=120))
    *chunks, final = events
    assert len({e["id"] for e in events}) == 1 and all(e["model"] == SERVED for e in events)
    assert (
        "".join(c["choices"][0]["text"] for c in chunks) == plain["choices"][0]["text"] == artifacts["want"][PROMPTS[0]]
    )
    assert all(c["choices"][0]["finish_reason"] is None for c in chunks)
    assert final["choices"][0]["finish_reason"] == plain["choices"][0]["finish_reason"]
    assert final["usage"] == plain["usage"] and final["distilray"]["event"] == "final"
    if drafter == "transformer":  # every draft accepted: blocks of several tokens, one event per verified block
        assert len(chunks) <= final["distilray"]["target_passes"] < GEN
    # a request the target refuses still gets its 4xx before any event
    r = requests.post(
        f"{server}/v1/completions", json={**body, "max_tokens": MAX_TOKENS_LIMIT, "stream": True}, timeout=60
    )
    assert r.status_code == 400 and "context" in r.json()["error"]["message"]


def test_chat_and_streams_through_the_official_openai_client(server, artifacts):
    from openai import OpenAI

    api = OpenAI(base_url=f"{server}/v1", api_key="unused", max_retries=0, timeout=120)
    messages = [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": "What is a for loop?"}]
    extra = {"drafter": "transformer", "gamma": 3}
    chat = api.chat.completions.create(model=SERVED, messages=messages, max_tokens=GEN, extra_body=extra)
    assert chat.object == "chat.completion" and chat.model == SERVED and chat.choices[0].message.role == "assistant"
    # the project's base model has no template of its own: the plain default renders the conversation
    from distilray.serve_apps.text_output import DEFAULT_CHAT_STOP, render_prompt

    tok = artifacts["tok"]
    prompt, stop = render_prompt(tok, messages)
    assert prompt.endswith("User: What is a for loop?\n\nAssistant:") and stop == [DEFAULT_CHAT_STOP]
    want = tok.decode(
        plain_generate(artifacts["model"], tok(prompt)["input_ids"], GEN, eos_token_id=tok.eos_token_id).token_ids,
        skip_special_tokens=True,
    )
    assert chat.choices[0].message.content == want.split(DEFAULT_CHAT_STOP)[0]
    assert chat.usage.prompt_tokens == len(tok(prompt)["input_ids"])
    pieces = api.chat.completions.create(model=SERVED, messages=messages, max_tokens=GEN, stream=True, extra_body=extra)
    deltas = [c.choices[0].delta.content or "" for c in pieces if c.choices]
    assert "".join(deltas) == chat.choices[0].message.content
    text = api.completions.create(model=SERVED, prompt=PROMPTS[1], max_tokens=GEN, stream=True, extra_body=extra)
    assert "".join(c.choices[0].text for c in text) == artifacts["want"][PROMPTS[1]]
    assert api.models.list().data[0].id == SERVED


def test_concurrent_requests_share_target_passes_and_stay_lossless(server, artifacts, client):
    """Eight clients at once, mixed drafters: the target decodes them as one batch, and each greedy
    answer equals the same request decoded alone."""
    from concurrent.futures import ThreadPoolExecutor

    drafters = ["ngram3", "transformer", "none", "lookup"] * 2
    bodies = [dict(prompt=PROMPTS[i % 2], max_tokens=GEN - i, drafter=d, gamma=3) for i, d in enumerate(drafters)]
    before = requests.get(f"{server}/healthz", timeout=30).json()["batch"]
    with ThreadPoolExecutor(len(bodies)) as pool:
        outs = list(pool.map(lambda body: client.ok(**body), bodies))
    after = requests.get(f"{server}/healthz", timeout=30).json()["batch"]
    for body, out in zip(bodies, outs):
        assert out["choices"][0]["text"] == artifacts["tok"].decode(
            plain_generate(
                artifacts["model"],
                artifacts["tok"](body["prompt"])["input_ids"],
                body["max_tokens"],
                eos_token_id=artifacts["tok"].eos_token_id,
            ).token_ids,
            skip_special_tokens=True,
        )
    steps = after["steps"] - before["steps"]
    rows = after["mean_batch"] * after["steps"] - (before["mean_batch"] or 0) * before["steps"]
    assert rows / steps > 1.5, (before, after)  # rows per target pass: requests really shared them


def test_two_int8_target_replicas_share_the_load(serve_loopback, artifacts):
    """target_replicas=2 (what an autoscaling_config does on a cluster) spreads requests across both
    replicas; drafter_placement=target runs the n-gram drafter inside each; with quantize=int8 every greedy
    answer equals plain decoding of the int8 model served."""
    import copy
    from concurrent.futures import ThreadPoolExecutor

    from distilray.models.quantize import apply_quantization

    tok = artifacts["tok"]
    served = apply_quantization(copy.deepcopy(artifacts["model"]), "int8")
    app = build_app(
        {
            "target": artifacts["target"],
            "drafters": {"lookup": "prompt-lookup:n=2,k=4", "ngram3": artifacts["ngram3"]},
            "drafter_placement": "target",  # every drafter inside each target replica: no drafter deployments
            "target_replicas": 2,
            "num_cpus": 0,  # both replicas fit the test's two CPUs
            "quantize": "int8",
        }
    )
    prompts = [PROMPTS[i % 2] + " " * (i // 2) for i in range(12)]

    def post(prompt: str) -> requests.Response:
        body = {"prompt": prompt, "max_tokens": 12, "drafter": "ngram3"}
        return requests.post(f"{base}/v1/completions", json=body, timeout=120)

    outs: list[requests.Response] = []
    with serve_loopback(app, "speculative-replicas", "/replicas") as base, ThreadPoolExecutor(6) as pool:
        # rounds of concurrent requests until both replicas answered (Serve routes by queue length, so a
        # busy machine may send a first round to one): at most 4 rounds
        for _ in range(4):
            outs += list(pool.map(post, prompts))
            if len({r.json().get("distilray", {}).get("replica") for r in outs if r.status_code == 200}) == 2:
                break
    prompts = prompts * (len(outs) // len(prompts))
    assert all(r.status_code == 200 for r in outs), [r.text for r in outs]
    assert len({r.json()["distilray"]["replica"] for r in outs}) == 2
    assert all(r.json()["distilray"]["drafter_transport"] == "local" for r in outs)
    assert all(r.json()["distilray"]["drafted"] > 0 for r in outs)  # the in-target drafter ran
    for prompt, r in zip(prompts, outs):
        want = plain_generate(served, tok(prompt)["input_ids"], 12, eos_token_id=tok.eos_token_id).token_ids
        assert r.json()["choices"][0]["text"] == tok.decode(want, skip_special_tokens=True)


def test_remote_drafter_sessions_survive_eviction(artifacts):
    """The proxy's protocol without Ray: interleaved generations on a drafter that keeps one session
    resend their state when evicted, and stay lossless."""
    drafter = DrafterSessions("ngram3", artifacts["ngram3"], max_sessions=1)
    tok, target = artifacts["tok"], artifacts["model"]
    ids = [tok(p)["input_ids"] for p in PROMPTS]
    proxies = [RemoteDrafter(drafter.step, drafter.end, len(tok)) for _ in PROMPTS]
    # drive both generations step by step, alternately: each evicts the other's session
    greedy = Sampler(SamplingParams(max_new_tokens=GEN))
    for proxy, prompt in zip(proxies, ids):
        proxy.start(prompt)
        proxy.propose(2, greedy)
    for proxy, prompt in zip(proxies, ids):
        proxy.rollback(len(prompt) + 1)
        proxy.push([5])
        draft = proxy.propose(3, greedy)
        assert len(draft.tokens) == 3 and draft.probs is None  # greedy drafts are point masses: no rows shipped
        assert proxy.length() == len(prompt) + 2 + 3
    assert proxies[0].restarts == 1 and proxies[1].restarts == 1 and drafter.info()["evicted"] >= 1
    for prompt in ids:  # and a whole generation through the proxy equals plain decoding
        want = plain_generate(target, prompt, GEN).token_ids
        proxy = RemoteDrafter(drafter.step, drafter.end, len(tok))
        record = speculative_generate(target, proxy, prompt, GEN, gamma=4, temperature=0.0)
        assert record.token_ids == want and proxy.round_trips <= record.target_passes
        proxy.close()
    assert drafter.info()["sessions"] == 0


def test_serve_transport_and_reconnect_stay_lossless(server, artifacts):
    """The Serve handle path (a target on another node, drafter_transport=serve), and a broken
    connection mid-generation: the proxy reconnects, resends its state and the output is unchanged."""
    from ray import serve

    from distilray.serve_apps.speculative_drafter import serve_calls

    tok, target = artifacts["tok"], artifacts["model"]
    step, end = serve_calls(serve.get_deployment_handle("Drafter-ngram3", app_name=APP_NAME))
    prompt = tok(PROMPTS[1])["input_ids"]
    want = plain_generate(target, prompt, GEN).token_ids
    proxy = RemoteDrafter(step, end, len(tok))
    assert speculative_generate(target, proxy, prompt, GEN, gamma=3).token_ids == want
    proxy.close()
    calls = {"n": 0}

    def flaky(*args):  # the third step finds the connection gone
        calls["n"] += 1
        if calls["n"] == 3:
            raise ConnectionError("drafter connection closed")
        return step(*args)

    fresh = DrafterSessions("ngram3", artifacts["ngram3"])  # "the replaced replica": knows no session
    proxy = RemoteDrafter(flaky, end, len(tok), reconnect=lambda: (fresh.step, fresh.end))
    record = speculative_generate(target, proxy, prompt, GEN, gamma=3)
    assert record.token_ids == want and proxy.restarts == 1
    proxy.close()
    assert fresh.info()["sessions"] == 0


def test_loopback_channel_is_exact_and_authenticated(artifacts):
    """The socket transport returns what a direct call returns, q rows bit for bit, and serves only
    callers that know the token."""
    tok = artifacts["tok"]
    drafter = DrafterSessions("transformer", artifacts["transformer"])
    channel = drafter.open_channel()
    step, end = socket_calls(channel.port, channel.token)
    prompt = tok(PROMPTS[0])["input_ids"]
    remote = step(DraftRequest("s1", None, prompt, 3, 0.8, 0.9, 11))
    direct = drafter.step(DraftRequest("s2", None, prompt, 3, 0.8, 0.9, 11))
    assert remote.drafts == direct.drafts and remote.q.dtype == direct.q.dtype
    assert (remote.q == direct.q).all() and remote.q.shape == (3, len(tok))
    greedy_step = step(DraftRequest("s1", len(prompt) + 1, [7], 2, 0.0, 1.0, 0))  # incremental step
    assert len(greedy_step.drafts) == 2 and greedy_step.q is None  # greedy: no rows
    assert step(DraftRequest("s1", len(prompt), [], 1, 0.0, 1.0, 0)).q is None
    unknown = step(DraftRequest("nobody", 3, [], 1, 0.0, 1.0, 0))
    assert unknown.unknown_session and unknown.drafts == []
    with pytest.raises(RuntimeError, match="drafter step failed"):  # a failing step: error, channel lives on
        step(DraftRequest("s1", None, [], 1, 0.0, 1.0, 0))
    end("s1")
    drafter.end("s2")
    assert drafter.info()["sessions"] == 0
    intruder, _ = socket_calls(channel.port, "wrong-token")
    with pytest.raises((ConnectionError, OSError)):
        intruder(DraftRequest("s3", None, prompt, 1, 0.0, 1.0, 0))
    assert drafter.info()["sessions"] == 0


def test_foreign_vocabulary_is_refused(artifacts):
    with pytest.raises(DistilrayError, match=r"drafter 'bad' .* proposes over \d+ tokens but the target"):
        build_app({"target": artifacts["target"], "drafters": {"ok": artifacts["ngram3"], "bad": artifacts["foreign"]}})
    with pytest.raises(DistilrayError, match="not a drafter folder"):
        build_app({"target": artifacts["target"], "drafters": {"gone": artifacts["ngram3"] + "-missing"}})


def test_builder_args_and_environment(artifacts, monkeypatch):
    from ray.serve import Application
    from ray.serve._private.api import call_user_app_builder_with_args_if_necessary

    monkeypatch.delenv(ENV_TARGET, raising=False)
    monkeypatch.delenv(ENV_DRAFTERS, raising=False)
    with pytest.raises(DistilrayError, match="target: required"):
        parse_args({})
    with pytest.raises(DistilrayError, match="colour: unknown argument"):
        parse_args({"target": "t", "colour": "red"})
    with pytest.raises(DistilrayError, match="default_drafter"):
        parse_args({"target": "t", "drafters": {"a": "x"}, "default_drafter": "b"})
    with pytest.raises(DistilrayError, match="default_gamma"):
        parse_args({"target": "t", "default_gamma": 0})
    with pytest.raises(DistilrayError, match="drafter name"):
        parse_args({"target": "t", "drafters": {"none": "x"}})
    with pytest.raises(DistilrayError, match="drafters"):
        parse_args({"target": "t", "drafters": "{not json"})
    assert parse_args({"target": "t"}).default_drafter == "none"
    assert parse_args({"target": "t", "drafters": {"a": "x", "b": "y"}}).default_drafter == "a"
    # what `serve run distilray.serve_apps.speculative:app target=... drafters='{...}' num_cpus=0.5` does
    built = call_user_app_builder_with_args_if_necessary(
        app, {"target": artifacts["target"], "drafters": f'{{"ngram3": "{artifacts["ngram3"]}"}}', "num_cpus": "0.5"}
    )
    assert isinstance(built, Application)
    # and with no args at all, the environment names the target and the drafters
    monkeypatch.setenv(ENV_TARGET, artifacts["target"])
    monkeypatch.setenv(ENV_DRAFTERS, f'{{"ngram3": "{artifacts["ngram3"]}"}}')
    parsed = parse_args({})
    assert parsed.target == artifacts["target"] and parsed.drafters == {"ngram3": artifacts["ngram3"]}
    assert isinstance(call_user_app_builder_with_args_if_necessary(app, {}), Application)


def test_loopback_server_drops_silent_and_surplus_connections():
    """The drafter socket bounds what a peer can hold: a connection over the cap is closed at once, one
    that does not authenticate in time is dropped, an idle one is dropped (its client reconnects)."""
    import socket as sockets

    from distilray.serve_apps.loopback import LoopbackClient, LoopbackServer

    server = LoopbackServer(
        lambda header, blob: ({"echo": header}, blob), max_connections=1, idle_timeout_s=0.5, hello_timeout_s=0.3
    )
    first = LoopbackClient(server.port, server.token, timeout_s=5)
    assert first.call({"x": 1})[0] == {"echo": {"x": 1}}
    with sockets.create_connection(("127.0.0.1", server.port), timeout=5) as surplus:
        assert surplus.recv(1) == b""  # over the cap: closed without a word
    time.sleep(1.0)  # the first client idles past the timeout: dropped, its slot freed
    with pytest.raises((ConnectionError, OSError)):
        first.call({"x": 2})
    with sockets.create_connection(("127.0.0.1", server.port), timeout=5) as silent:
        start = time.monotonic()
        assert silent.recv(1) == b""  # no hello: dropped after the hello timeout
        assert time.monotonic() - start < 3
    again = LoopbackClient(server.port, server.token, timeout_s=5)
    assert again.call({"x": 3})[0] == {"echo": {"x": 3}}
