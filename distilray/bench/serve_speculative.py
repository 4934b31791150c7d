"""Serving cost of speculative decoding: the Serve endpoint against the same decoding in this process.

`serve_vs_in_process` decodes the same prompts greedily with the same target and drafter twice: in
this process (load_causal_lm + load_drafter + speculative_generate, torch threads matched to the
target replica's), and through `distilray.serve_apps.speculative` over HTTP on 127.0.0.1 (tokenising,
ingress -> target hop, one drafter round trip per step, detokenising). Requests go one after another,
each prompt alternating which side runs first, so drift and noise fall on both sides alike.
Goal: endpoint >= 0.9x the in-process tokens/s (DESIGN "Performance model": serving is reported as
a ratio against a bare single-process loop).
"""

from __future__ import annotations

import http.client
import json
import socket
import time
from typing import Any

import torch

from distilray.decoding.drafter_api import DrafterWrapper

APP_NAME = "bench-speculative"
DRAFTER_NAME = "bench"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _post(conn: http.client.HTTPConnection, path: str, body: dict[str, Any]) -> dict[str, Any]:
    """POST on a kept-alive connection, as an OpenAI client does."""
    conn.request("POST", path, body=json.dumps(body), headers={"Content-Type": "application/json"})
    response = conn.getresponse()
    data = response.read()
    if response.status != 200:
        raise RuntimeError(f"{path} answered {response.status}: {data[:500]!r}")
    return json.loads(data)


def _start_serve() -> tuple[int, bool]:
    """(HTTP port, whether we started Serve): a running Serve instance is reused with its own port."""
    from ray import serve
    from ray.serve.context import _get_global_client

    running = _get_global_client(raise_if_no_controller_running=False) is not None
    if not running:
        serve.start(http_options={"host": "127.0.0.1", "port": _free_port()})
    return int(_get_global_client().http_config.port), not running


class _TimedDrafter(DrafterWrapper):
    """The in-process drafter with its time counted, so both sides split into drafter and target time."""

    def __init__(self, drafter: Any) -> None:
        super().__init__(drafter)
        self.needs_target_hidden = drafter.needs_target_hidden
        self.seconds, self.steps = 0.0, 0

    def start(self, prefix: list[int]) -> None:
        start = time.perf_counter()
        self.inner.start(prefix)
        self.seconds += time.perf_counter() - start

    def propose(self, gamma: int, sampler: Any, target_hidden: Any = None) -> Any:
        start = time.perf_counter()
        out = self.inner.propose(gamma, sampler, target_hidden)  # the drafter's own loop
        self.seconds += time.perf_counter() - start
        if gamma > 0:  # the remote side makes no round trip for gamma == 0 either
            self.steps += 1
        return out


def serve_vs_in_process(
    target_dir: str,
    drafter_dir: str,
    prompts: list[str],
    max_tokens: int,
    gamma: int,
    repeats: int = 1,
    num_cpus: float = 1,
) -> dict[str, Any]:
    """Greedy speculative decoding tokens/s in this process and through the endpoint, side by side.

    Returns tokens_per_s_in_process, tokens_per_s_serve, ratio_vs_in_process (serve / in-process),
    same_tokens (served text == in-process text for every prompt), and where the difference goes:
    per-step drafter round trips (mean_round_trip_ms, mean_drafter_step_ms, composition_ms_per_step),
    per-request hops (request_overhead_ms: HTTP wall minus the target's decoding time, split into
    http_ms: the HTTP proxy hop, and replica_outside_decode_ms: validation, tokenisation and
    detokenisation in the target replica), and the target's own time per pass on each side
    (target_ms_per_pass_in_process / _serve: decoding time minus the drafter's, or minus the round trips).
    """
    from ray import serve

    from distilray.actors.cluster import ensure_ray
    from distilray.decoding.drafters import load_drafter
    from distilray.decoding.speculative import speculative_generate
    from distilray.errors import DistilrayError
    from distilray.models.causal_lm import load_causal_lm
    from distilray.serve_apps.speculative import build_app
    from distilray.tokenizer import load_tokenizer

    if not prompts or max_tokens < 1 or repeats < 1:
        raise DistilrayError("need at least one prompt, max_tokens >= 1 and repeats >= 1")
    threads_before = torch.get_num_threads()
    threads = max(1, int(num_cpus))
    device = "cpu"  # the app's target replica runs on CPU unless num_gpus is given
    tokenizer = load_tokenizer(target_dir)
    target = load_causal_lm(target_dir, device=device)
    drafter = _TimedDrafter(load_drafter(drafter_dir, device))
    eos = tokenizer.eos_token_id
    local = {"tokens": 0, "seconds": 0.0, "decode_seconds": 0.0, "passes": 0}

    def in_process(prompt: str) -> tuple[str, int, float]:
        start = time.perf_counter()
        ids = tokenizer(prompt)["input_ids"]
        record = speculative_generate(target, drafter, ids, max_tokens, gamma=gamma, eos_token_id=eos)
        text = tokenizer.decode(record.token_ids, skip_special_tokens=True)
        local["decode_seconds"] += record.seconds
        local["passes"] += record.target_passes
        return text, len(record.token_ids), time.perf_counter() - start

    ensure_ray()
    port, started = _start_serve()
    path = f"/{APP_NAME}/v1/completions"
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=300)
    args = {
        "target": target_dir,
        "drafters": {DRAFTER_NAME: drafter_dir},
        "default_drafter": DRAFTER_NAME,
        "default_gamma": gamma,
        "max_tokens_limit": max_tokens,
        "num_cpus": num_cpus,
    }
    serve.run(build_app(args), name=APP_NAME, route_prefix=f"/{APP_NAME}", blocking=False)

    def served(prompt: str) -> tuple[str, int, float, dict[str, Any]]:
        start = time.perf_counter()
        out = _post(conn, path, {"prompt": prompt, "max_tokens": max_tokens, "gamma": gamma, "temperature": 0})
        seconds = time.perf_counter() - start
        return out["choices"][0]["text"], out["usage"]["completion_tokens"], seconds, out["distilray"]

    remote = {
        "tokens": 0,
        "seconds": 0.0,
        "decode_seconds": 0.0,
        "ingress_seconds": 0.0,
        "round_trips": 0,
        "round_trip_seconds": 0.0,
        "drafter_seconds": 0.0,
        "passes": 0,
        "requests": 0,
    }
    same = True
    try:
        torch.set_num_threads(threads)
        in_process(prompts[0])  # warm-up: kernels, lazy tables, the replicas' first request
        served(prompts[0])
        local.update(decode_seconds=0.0, passes=0)
        drafter.seconds, drafter.steps = 0.0, 0
        for r in range(repeats):
            for i, prompt in enumerate(prompts):
                first_local = (r + i) % 2 == 0
                for side in ("local", "serve") if first_local else ("serve", "local"):
                    if side == "local":
                        text_local, n, seconds = in_process(prompt)
                        local["tokens"] += n
                        local["seconds"] += seconds
                    else:
                        text_serve, n, seconds, stats = served(prompt)
                        remote["tokens"] += n
                        remote["seconds"] += seconds
                        remote["decode_seconds"] += stats["seconds"]
                        remote["ingress_seconds"] += stats["request_seconds"]
                        remote["round_trips"] += stats["drafter_round_trips"]
                        remote["round_trip_seconds"] += stats["round_trip_seconds"]
                        remote["drafter_seconds"] += stats["drafter_seconds"]
                        remote["passes"] += stats["target_passes"]
                        remote["requests"] += 1
                same = same and text_local == text_serve
    finally:
        conn.close()
        torch.set_num_threads(threads_before)
        serve.delete(APP_NAME)
        if started:
            serve.shutdown()
    local_tps = local["tokens"] / local["seconds"]
    serve_tps = remote["tokens"] / remote["seconds"]
    trips = max(1, remote["round_trips"])
    return {
        "tokens_per_s_in_process": local_tps,
        "tokens_per_s_serve": serve_tps,
        "ratio_vs_in_process": serve_tps / local_tps,
        "same_tokens": same,
        "tokens_per_s_serve_decode_only": remote["tokens"] / remote["decode_seconds"],
        "mean_round_trip_ms": 1000 * remote["round_trip_seconds"] / trips,
        "mean_drafter_step_ms": 1000 * remote["drafter_seconds"] / trips,
        "drafter_step_ms_in_process": 1000 * drafter.seconds / max(1, drafter.steps),
        "composition_ms_per_step": 1000 * (remote["round_trip_seconds"] - remote["drafter_seconds"]) / trips,
        "request_overhead_ms": 1000 * (remote["seconds"] - remote["decode_seconds"]) / remote["requests"],
        # of which: HTTP proxy and client (wall minus the ingress's time), and the ingress -> target hop
        # with tokenising (also in the in-process time) and the drafter session set-up
        "http_ms": 1000 * (remote["seconds"] - remote["ingress_seconds"]) / remote["requests"],
        "replica_outside_decode_ms": 1000 * (remote["ingress_seconds"] - remote["decode_seconds"]) / remote["requests"],
        "target_ms_per_pass_in_process": 1000 * (local["decode_seconds"] - drafter.seconds) / max(1, local["passes"]),
        "target_ms_per_pass_serve": 1000
        * (remote["decode_seconds"] - remote["round_trip_seconds"])
        / max(1, remote["passes"]),
        "tokens_per_target_pass": remote["tokens"] / max(1, remote["passes"]),
        "tokens": local["tokens"],
        "requests": remote["requests"],
        "max_tokens": max_tokens,
        "gamma": gamma,
        "torch_threads": threads,
    }
