"""`distilray bench serve`: the speculative and CD-LM apps under concurrent clients, over real HTTP on
127.0.0.1, then a fault under load.

Apps (one Serve, each under its own prefix; the quickstart's target, a trigram drafter and the CD-LM
datastore, trained or built and cached as the quickstart does):

- `spec`: the speculative app as deployed (continuous batching, `max_batch_size`), asked for the
  trigram drafter (`speculative`) and for plain decoding (`plain`: the same batching, no drafter);
- `spec-local`: the same app with `drafter_placement=target`, the trigram inside the target replica
  (`speculative-in-target`: no round trip per step);
- `spec1`: the same app with `max_batch_size=1`, one request at a time per replica (the app's
  behaviour before batching), with the trigram drafter (`speculative-serial`);
- `cdlm`: the CD-LM app in `verify` mode (lossless, so its greedy answers equal plain decoding).

Each level runs `clients` threads that each send `requests_per_client` greedy requests; half the
clients use the official `openai` client with `stream=True` (time to first token is theirs), the other
half plain JSON requests (their first token arrives with the last). Every answer is compared with the
same prompt decoded alone in this process. The fault run sends requests from 8 clients to a
two-replica speculative app and the CD-LM app while one target replica and one datastore shard actor
are killed, and reports what failed, how, and when service was whole again.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import signal
import threading
import time
from pathlib import Path
from typing import Any, Callable

import requests

from distilray.bench.serve_single import one_client_side_by_side
from distilray.config import BenchServeConfig, BuildDatastoreConfig, ExtractConfig, FitNGramConfig, QuickstartConfig
from distilray.io_utils import atomic_write_json

DRAFTER = "trigram"
ONE_CLIENT = ("speculative", "speculative-in-target")  # the configs set side by side with in-process decoding
REQUEST_TIMEOUT_S = 120.0  # a request that takes longer counts as hanging


# ------------------------------------------------------------------------------------- artifacts
def prepare(cfg: BenchServeConfig) -> dict[str, str]:
    """The quickstart's target, a trigram drafter and the CD-LM datastore (cached where they exist)."""
    from distilray.pipelines import build_datastore, extract, fit_ngram, train_lm, train_tokenizer
    from distilray.pipelines.quickstart import lm_config

    q = QuickstartConfig(artifacts_dir=cfg.artifacts_dir, seed=cfg.seed)
    tok_dir = train_tokenizer.get_or_train(q.corpus, q.vocab_size, q.artifacts_dir)
    target = cfg.target or train_lm.run(lm_config(q, q.target_model, q.target_steps, tok_dir))["model_dir"]
    home = Path(cfg.artifacts_dir).resolve() / "bench_serve"
    ngram = home / f"ngram3-{Path(target).parent.name}"
    if not (ngram / "stats.json").is_file():
        fit_ngram.run(FitNGramConfig(tokenizer=target, corpus=q.corpus, n=3, output_dir=str(ngram)))
    store = home / f"datastore-{Path(target).parent.name}"
    if not (store / "datastore.json").is_file():
        ext = extract.run(
            ExtractConfig(
                model=target,
                corpus=q.corpus,
                window=q.cdlm_window,
                stride=q.cdlm_stride,
                min_length=32,
                output_dir=str(home / f"extract-{Path(target).parent.name}"),
            )
        )
        build_datastore.run(
            BuildDatastoreConfig(
                extract_dir=ext["output_dir"],
                tok_prob_threshold=q.cdlm_tok_prob_threshold,
                num_shards=2,
                output_dir=str(store),
            )
        )
    return {"target": target, "ngram": str(ngram), "datastore": str(store), "corpus": q.corpus}


def held_out_prompts(tokenizer, corpus_spec, count: int, prompt_tokens: int = 32) -> list[str]:
    """Distinct prompts cut from the test split."""
    from distilray import corpus
    from distilray.tokenizer import encode_documents

    docs = encode_documents(tokenizer, corpus.load_splits(corpus_spec)["test"])
    cuts = [d[i : i + prompt_tokens] for d in docs for i in range(0, len(d) - 2 * prompt_tokens, 2 * prompt_tokens)]
    if len(cuts) < count:
        raise ValueError(f"the test split yields {len(cuts)} prompts; need {count}")
    return [tokenizer.decode(c) for c in cuts[:count]]


# ------------------------------------------------------------------------------------------ clients
@dataclasses.dataclass
class Outcome:
    """One request as its client saw it."""

    prompt: str
    started: float
    latency: float | None = None  # None: no answer (error or hang)
    first_token: float | None = None  # seconds to the first text (streamed requests)
    tokens: int = 0
    text: str = ""
    status: int | None = None  # HTTP status; None: no response at all
    error: str = ""


def _json_request(client: requests.Session, url: str, body: dict[str, Any], out: Outcome) -> None:
    r = client.post(f"{url}/v1/completions", json=body, timeout=REQUEST_TIMEOUT_S)
    out.status = r.status_code
    if r.status_code != 200:
        out.error = r.text[:300]
        return
    data = r.json()
    out.latency = out.first_token = time.perf_counter() - out.started
    out.text, out.tokens = data["choices"][0]["text"], data["usage"]["completion_tokens"]


def _openai_request(client: Any, url: str, body: dict[str, Any], out: Outcome) -> None:
    from openai import APIStatusError

    extra = {k: v for k, v in body.items() if k not in ("model", "prompt", "max_tokens", "temperature")}
    pieces: list[str] = []
    try:
        stream = client.completions.create(
            model=body["model"],
            prompt=body["prompt"],
            max_tokens=body["max_tokens"],
            temperature=0,
            stream=True,
            extra_body=extra,
        )
        for chunk in stream:
            if chunk.choices and chunk.choices[0].text:
                if out.first_token is None:
                    out.first_token = time.perf_counter() - out.started
                pieces.append(chunk.choices[0].text)
            if getattr(chunk, "usage", None):
                out.tokens = chunk.usage.completion_tokens
    except APIStatusError as exc:
        out.status, out.error = exc.status_code, str(exc)[:300]
        return
    out.status = 200
    out.latency = time.perf_counter() - out.started
    out.text = "".join(pieces)
    if out.first_token is None:
        out.first_token = out.latency


def client_for(url: str, streamed: bool) -> Any:
    """One client per simulated user, kept for all its requests (a kept-alive connection, as real
    clients have): the official openai client for streamed requests, a requests session otherwise."""
    if not streamed:
        return requests.Session()
    from openai import OpenAI

    return OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=REQUEST_TIMEOUT_S)


def _send(client: Any, url: str, body: dict[str, Any]) -> Outcome:
    out = Outcome(prompt=body["prompt"], started=time.perf_counter())
    try:
        if isinstance(client, requests.Session):
            _json_request(client, url, body, out)
        else:
            _openai_request(client, url, body, out)
    except Exception as exc:  # a hang (timeout) or a dropped connection: no status
        out.error = f"{type(exc).__name__}: {str(exc)[:200]}"
    return out


def run_level(url: str, prompts: list[str], clients: int, per_client: int, body: dict[str, Any]) -> list[Outcome]:
    """`clients` threads, each sending `per_client` requests in turn; odd clients stream through openai."""
    outcomes: list[list[Outcome]] = [[] for _ in range(clients)]

    def client(i: int) -> None:
        session = client_for(url, streamed=i % 2 == 1)
        for j in range(per_client):
            prompt = prompts[(i * per_client + j) % len(prompts)]
            outcomes[i].append(_send(session, url, {**body, "prompt": prompt}))

    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return [o for per in outcomes for o in per]


def summarise(outcomes: list[Outcome], wall: float, want: dict[str, str]) -> dict[str, Any]:
    """requests/s, tokens/s, latency and first-token percentiles, errors, and answers equal to solo decoding."""
    ok = [o for o in outcomes if o.status == 200 and o.latency is not None]
    latencies = sorted(o.latency for o in ok)
    firsts = sorted(o.first_token for o in ok if o.first_token is not None)
    return {
        "requests": len(outcomes),
        "errors": len(outcomes) - len(ok),
        "requests_per_s": len(ok) / wall,
        "tokens_per_s": sum(o.tokens for o in ok) / wall,
        "p50_s": _quantile(latencies, 0.5),
        "p99_s": _quantile(latencies, 0.99),
        "ttft_p50_s": _quantile(firsts, 0.5),
        "ttft_p99_s": _quantile(firsts, 0.99),
        "identical_to_solo": sum(o.text == want[o.prompt] for o in ok),
        "seconds": wall,
    }


def _quantile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    return values[min(len(values) - 1, int(round(q * (len(values) - 1))))]


# ------------------------------------------------------------------------------------------ the run
def _deploy(paths: dict[str, str], cfg: BenchServeConfig) -> tuple[str, Callable[[], None]]:
    """Start Serve on a free loopback port with the three apps; (base URL, teardown)."""
    import socket

    from ray import serve
    from ray.serve.context import _get_global_client

    from distilray.serve_apps import retrieval, speculative

    running = _get_global_client(raise_if_no_controller_running=False) is not None
    if not running:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        serve.start(http_options={"host": "127.0.0.1", "port": port})
    base = f"http://127.0.0.1:{_get_global_client().http_config.port}"
    common = {"max_tokens_limit": cfg.max_tokens, "num_cpus": 0, "quantize": cfg.quantize}
    spec = {
        "target": paths["target"],
        "drafters": {DRAFTER: paths["ngram"], "lookup": "prompt-lookup"},
        "default_gamma": cfg.gamma,
        "served_model_name": "bench",
        **common,
    }
    cdlm = {
        "model": paths["target"],
        "datastore": paths["datastore"],
        "default_mode": "verify",
        "served_model_name": "bench",
        **common,
    }
    apps = {
        "spec": speculative.build_app({**spec, "max_batch_size": cfg.max_batch_size}),
        "spec1": speculative.build_app({**spec, "max_batch_size": 1}),
        "spec-local": speculative.build_app(
            {**spec, "max_batch_size": cfg.max_batch_size, "drafter_placement": "target"}
        ),
        "cdlm": retrieval.build_app(cdlm),
        "cdlm-local": retrieval.build_app({**cdlm, "datastore_placement": "target"}),
    }
    for name, app in apps.items():
        serve.run(app, name=f"bench-{name}", route_prefix=f"/bench-{name}", blocking=False)
    for name in apps:  # ready when it answers
        _wait_healthy(f"{base}/bench-{name}")

    def teardown() -> None:
        for name in apps:
            serve.delete(f"bench-{name}")
        if not running:
            serve.shutdown()

    return base, teardown


def _wait_healthy(url: str, timeout_s: float = 300) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            if requests.get(f"{url}/healthz", timeout=10).status_code == 200:
                return
        except requests.RequestException:
            pass
        time.sleep(0.5)
    raise RuntimeError(f"{url} not healthy after {timeout_s:.0f} s")


def solo_answers(paths: dict[str, str], prompts: list[str], cfg: BenchServeConfig) -> dict[str, str]:
    """Each prompt decoded alone, greedily, by the served model (what every greedy answer must equal)."""
    import torch

    from distilray.decoding.speculative import plain_generate
    from distilray.models.causal_lm import load_causal_lm
    from distilray.models.quantize import apply_quantization
    from distilray.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(paths["target"])
    target = apply_quantization(load_causal_lm(paths["target"], "cpu", torch.float32), cfg.quantize)
    out = {}
    for prompt in prompts:
        ids = plain_generate(
            target, tokenizer(prompt)["input_ids"], cfg.max_tokens, eos_token_id=tokenizer.eos_token_id
        )
        out[prompt] = tokenizer.decode(ids.token_ids, skip_special_tokens=True)
    return out


CONFIGS = {  # name -> (app, request fields)
    "speculative": ("spec", {"drafter": DRAFTER}),
    "speculative-in-target": ("spec-local", {"drafter": DRAFTER}),
    "plain": ("spec", {"drafter": "none"}),
    "speculative-serial": ("spec1", {"drafter": DRAFTER}),
    "cdlm-verify": ("cdlm", {"mode": "verify"}),
}


def fault_under_load(base: str, paths: dict[str, str], prompts: list[str], want: dict[str, str], cfg) -> dict:
    """8 clients on a two-replica speculative app and the CD-LM app; one target replica and one
    datastore shard actor killed a third of the way in. Requests are classified by when they started."""
    from ray import serve
    from ray.util.state import list_actors

    from distilray.serve_apps import speculative

    app = speculative.build_app(
        {
            "target": paths["target"],
            "drafters": {DRAFTER: paths["ngram"]},
            "target_replicas": 2,
            "max_tokens_limit": cfg.max_tokens,
            "num_cpus": 0,
            "quantize": cfg.quantize,
            "served_model_name": "bench",
        }
    )
    serve.run(app, name="bench-fault", route_prefix="/bench-fault", blocking=False)
    _wait_healthy(f"{base}/bench-fault")
    body = {"model": "bench", "max_tokens": cfg.max_tokens, "temperature": 0}
    outcomes: list[tuple[str, Outcome]] = []
    lock, stop = threading.Lock(), threading.Event()

    def client(i: int) -> None:
        app_url, fields = (f"{base}/bench-fault", {}) if i % 2 == 0 else (f"{base}/bench-cdlm", {"mode": "verify"})
        session = client_for(app_url, streamed=i % 4 == 1)
        j = 0
        while not stop.is_set():
            out = _send(session, app_url, {**body, **fields, "prompt": prompts[(i + 8 * j) % len(prompts)]})
            with lock:
                outcomes.append(("spec" if i % 2 == 0 else "cdlm", out))
            j += 1

    threads = [threading.Thread(target=client, args=(i,)) for i in range(8)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    time.sleep(cfg.fault_seconds / 3)
    replicas = [
        a
        for a in list_actors(filters=[("state", "=", "ALIVE")])
        if "bench-fault" in (a.class_name or "") and "TargetDeployment" in (a.class_name or "")
    ]
    shards = [a for a in list_actors(filters=[("state", "=", "ALIVE")]) if a.class_name == "DatastoreShard"]
    killed_at = time.perf_counter()
    for actor in replicas[:1] + shards[:1]:  # a crash, as the OS would deliver it: no cleanup runs
        os.kill(actor.pid, signal.SIGKILL)
    time.sleep(cfg.fault_seconds * 2 / 3)
    stop.set()
    for t in threads:
        t.join()
    serve.delete("bench-fault")
    failed = [(kind, o) for kind, o in outcomes if o.status != 200]
    during = [o for _, o in outcomes if o.started < killed_at <= o.started + (o.latency or REQUEST_TIMEOUT_S)]
    last_failure = max((o.started for _, o in failed), default=killed_at)
    after = [o for _, o in outcomes if o.started > last_failure]
    return {
        "killed": {"target_replicas": len(replicas[:1]), "datastore_shards": len(shards[:1])},
        "requests": len(outcomes),
        "in_flight_at_kill": len(during),
        "failed": len(failed),
        "failed_by_app": {k: sum(1 for kind, _ in failed if kind == k) for k in ("spec", "cdlm")},
        "failed_with_5xx_json": sum(1 for _, o in failed if o.status is not None and o.status >= 500),
        "hung": sum(1 for _, o in failed if o.status is None),
        "recovery_s": max(0.0, last_failure - killed_at) if failed else 0.0,
        "after_recovery": len(after),
        "after_recovery_ok": sum(1 for o in after if o.status == 200 and o.text == want[o.prompt]),
        "seconds": time.perf_counter() - start,
    }


def run(cfg: BenchServeConfig) -> dict:
    from distilray.actors.cluster import ensure_ray
    from distilray.tokenizer import load_tokenizer

    started = time.perf_counter()
    ensure_ray()
    logging.getLogger("ray.serve").setLevel(logging.WARNING)  # app start and delete lines, per app
    print("[bench serve] models and datastore ...", flush=True)
    paths = prepare(cfg)
    tokenizer = load_tokenizer(paths["target"])
    most = max(cfg.levels) * cfg.requests_per_client
    prompts = held_out_prompts(tokenizer, paths["corpus"], min(most, 64))
    print("[bench serve] each prompt decoded alone ...", flush=True)
    want = solo_answers(paths, prompts, cfg)
    base, teardown = _deploy(paths, cfg)
    body = {"model": "bench", "max_tokens": cfg.max_tokens, "temperature": 0}
    levels: dict[str, dict[int, dict]] = {name: {} for name in CONFIGS}
    try:
        for name, (app, fields) in CONFIGS.items():  # warm every path once
            run_level(f"{base}/bench-{app}", prompts[:2], 2, 1, {**body, **fields})
        for clients in cfg.levels:
            for name, (app, fields) in CONFIGS.items():
                print(f"[bench serve] {clients:>2} clients, {name} ...", flush=True)
                t0 = time.perf_counter()
                outcomes = run_level(
                    f"{base}/bench-{app}", prompts, clients, cfg.requests_per_client, {**body, **fields}
                )
                levels[name][clients] = summarise(outcomes, time.perf_counter() - t0, want)
        print("[bench serve] one client, served and in process side by side ...", flush=True)
        served = {name: (f"{base}/bench-{CONFIGS[name][0]}", CONFIGS[name][1]) for name in ONE_CLIENT}
        single = one_client_side_by_side(served, paths, prompts[: cfg.one_client_prompts], cfg)
        cdlm = {}
        if cfg.cdlm_tts_prompts:  # CD-LM's time saving served against in process, same datastore
            from distilray.bench.serve_cdlm import cdlm_tts

            print("[bench serve] CD-LM TTS, served and in process ...", flush=True)
            threshold = QuickstartConfig(artifacts_dir=cfg.artifacts_dir).cdlm_similarity_threshold
            urls = {"shards": f"{base}/bench-cdlm", "in_target": f"{base}/bench-cdlm-local"}
            cdlm = cdlm_tts(urls, paths, prompts[: cfg.cdlm_tts_prompts], cfg.max_tokens, cfg.quantize, threshold)
        fault = fault_under_load(base, paths, prompts, want, cfg) if cfg.fault else {}
    finally:
        teardown()
    transport = {}
    if cfg.transport_rounds:  # why the drafter step takes the socket: measured, not assumed
        from distilray.bench.drafter_transport import measure_transports

        print("[bench serve] drafter round trips: socket, compiled graph, actor call ...", flush=True)
        transport = measure_transports(rounds=cfg.transport_rounds, gamma=cfg.gamma)
    out = {
        "target": paths["target"],
        "quantize": cfg.quantize,
        "max_batch_size": cfg.max_batch_size,
        "gamma": cfg.gamma,
        "max_tokens": cfg.max_tokens,
        "levels": {n: {str(c): v for c, v in rows.items()} for n, rows in levels.items()},
        "single_client": single,
        "cdlm_tts": cdlm,
        "fault": fault,
        "drafter_transport": transport,
        "seconds": round(time.perf_counter() - started, 1),
        "config": dataclasses.asdict(cfg),
    }
    out["goals"] = goals(out, cfg)
    if cfg.json_out:
        atomic_write_json(cfg.json_out, out)
    return out


def goals(out: dict, cfg: BenchServeConfig) -> dict[str, dict]:
    rows: dict[str, dict] = {}
    for name, suffix in (("speculative", ""), ("speculative-in-target", ".in_target")):
        levels = out["levels"].get(name, {})
        one, eight = levels.get("1"), levels.get("8")
        ratio = out["single_client"].get("ratio_vs_in_process", {}).get(name)
        if ratio is not None:
            rows[f"serve_one_client_vs_in_process{suffix}"] = {"value": ratio, "goal": ">= 0.9", "met": ratio >= 0.9}
        if one and eight:
            tps, p99 = eight["tokens_per_s"] / one["tokens_per_s"], eight["p99_s"] / one["p99_s"]
            rows[f"eight_clients_tokens_per_s_vs_one{suffix}"] = {"value": tps, "goal": ">= 3.0", "met": tps >= 3.0}
            rows[f"eight_clients_p99_vs_one{suffix}"] = {"value": p99, "goal": "<= 3.0", "met": p99 <= 3.0}
    errors = sum(r["errors"] for rows_ in out["levels"].values() for r in rows_.values())
    rows["errors"] = {"value": errors, "goal": "0", "met": errors == 0}
    wrong = sum(
        r["requests"] - r["errors"] - r["identical_to_solo"] for rows_ in out["levels"].values() for r in rows_.values()
    )
    rows["greedy_answers_not_identical_to_solo"] = {"value": wrong, "goal": "0", "met": wrong == 0}
    cdlm = out.get("cdlm_tts")
    for placement, suffix in (("shards", ""), ("in_target", ".in_target")):
        if cdlm and placement in cdlm:
            ratio, local = cdlm[placement]["ratio_vs_in_process"], cdlm["in_process"]["tts"]
            rows[f"cdlm_tts_serve_vs_in_process{suffix}"] = {
                "value": ratio if ratio is not None else f"undefined: in-process TTS {local:.3f} <= 0",
                "goal": ">= 0.9",
                "met": ratio is not None and ratio >= 0.9,
            }
    fault = out["fault"]
    if fault:
        clean = fault["hung"] == 0 and fault["failed"] == fault["failed_with_5xx_json"]
        whole = fault["after_recovery"] > 0 and fault["after_recovery_ok"] == fault["after_recovery"]
        rows["fault_failures_clean_and_recovered"] = {
            "value": f"{fault['failed']} failed ({fault['hung']} hung), recovered in {fault['recovery_s']:.1f} s",
            "goal": "every failure a 5xx, none hanging, every later request ok",
            "met": clean and whole,
        }
    return rows


def format_table(out: dict) -> str:
    lines = [
        f"bench serve: target {out['target']} ({out['quantize']}), max_batch_size {out['max_batch_size']}, "
        f"gamma {out['gamma']}, {out['max_tokens']} greedy tokens a request",
        f"{'config':<20}{'clients':>8}{'req/s':>8}{'tok/s':>8}{'p50 s':>8}{'p99 s':>8}{'ttft50':>8}{'ttft99':>8}"
        f"{'errors':>7}{'same':>7}",
    ]
    for name, rows in out["levels"].items():
        for clients, r in rows.items():
            lines.append(
                f"{name:<20}{clients:>8}{r['requests_per_s']:>8.2f}{r['tokens_per_s']:>8.0f}{_s(r['p50_s'])}"
                f"{_s(r['p99_s'])}{_s(r['ttft_p50_s'])}{_s(r['ttft_p99_s'])}{r['errors']:>7}"
                f"{r['identical_to_solo']:>4}/{r['requests'] - r['errors']:<2}"
            )
    if single := out["single_client"]:
        lines.append(
            f"one client, side by side ({single['requests_per_side']} requests a side): in process "
            f"{single['in_process_tokens_per_s']:.0f} tok/s; "
            + "; ".join(
                f"{name} {tps:.0f} tok/s ({single['ratio_vs_in_process'][name]:.2f}x)"
                for name, tps in single["served_tokens_per_s"].items()
            )
            + f"; same text {single['same_text']}"
        )
        ceiling = single.get("batching_ceiling", {})
        lines.append(
            f"in process, {out['max_batch_size']} requests batched over one alone (tok/s: the most batching gives): "
            + ", ".join(f"{kind} {ratio:.2f}x" for kind, ratio in ceiling.items())
        )
    if out.get("cdlm_tts"):
        c = out["cdlm_tts"]
        lines.append(
            f"CD-LM paper vs baseline, one client, {c['prompts']} prompts, threshold {c['similarity_threshold']}: "
            + "; ".join(
                f"{side} TTS {c[side]['tts']:.3f} (FPS {c[side]['paper_fps']:.3f}, "
                f"{1e3 * c[side]['baseline_seconds_per_token']:.2f} / {1e3 * c[side]['paper_seconds_per_token']:.2f} "
                f"ms a token)"
                for side in ("in_process", "shards", "in_target")
                if side in c
            )
        )
    if out["fault"]:
        lines.append(f"fault under load: {out['fault']}")
    if out.get("drafter_transport"):
        from distilray.bench.drafter_transport import format_table as transport_table

        lines.append(transport_table(out["drafter_transport"]))
    lines.append("goals:")
    for key, g in out["goals"].items():
        value = (
            g["value"]
            if isinstance(g["value"], str)
            else f"{g['value']:.2f}"
            if isinstance(g["value"], float)
            else g["value"]
        )
        lines.append(f"  {key}: {value}; goal {g['goal']}: {'met' if g['met'] else 'NOT met'}")
    return "\n".join(lines)


def _s(value: float | None) -> str:
    return f"{'-':>8}" if value is None else f"{value:>8.3f}"
