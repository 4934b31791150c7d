"""The speculative drafter's per-step round trip: loopback socket vs Ray Compiled Graph vs actor call.

`measure_transports` times one DraftRequest -> DraftReply round trip from a caller actor (the target
replica's role: an async actor whose decoding runs on a worker thread) to a drafter actor, over:

- socket: `socket_calls` (serve_apps/speculative_drafter.py) to a `LoopbackServer` whose handler is
  `DrafterSessions._on_frame`, exactly the app's code on both ends (JSON header, raw q bytes);
- compiled: a Ray Compiled Graph `drafter.step.bind(inp)` compiled and executed by the caller actor
  (shared-memory channels; the DraftRequest / DraftReply dataclasses go through Ray's serializer);
- actor_call: `ray.get(drafter.step.remote(request))`, for reference.

Greedy requests (temperature 0) get drafts only; sampled ones also get the (gamma, vocab) float32 q
rows. A round trip is what `RemoteDrafter.propose` sees: the call, the drafts as ints and the q rows
copied into an array of the caller's own. The drafter's work is a table look-up, so the figures are
transport cost alone. Transports take turns in blocks of `block` rounds, rotating which goes first, so
drift and noise fall on all of them; every reply is checked bit for bit outside the timed region.

Besides latency: CPU seconds per round trip in the caller's and the drafter's processes (all their
threads), and the drafter's CPU while idle with and without a live compiled graph. A graph is
compiled for each of its turns and torn down after it (its DAGDriverProxyActor up before timing):
while alive, the graph's loop on the drafter busy-waits for its next input (Ray's shared-memory
channel reader polls with sched_yield), which would otherwise tax the other transports' turns.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import ray
from ray.dag import InputNode

from distilray.serve_apps.loopback import LoopbackServer
from distilray.serve_apps.schemas import DraftReply, DraftRequest
from distilray.serve_apps.speculative_drafter import STEP_TIMEOUT_S, DrafterSessions, socket_calls

TRANSPORTS = ("socket", "compiled", "actor_call")
MODES = ("greedy", "sampled")
POOL = 8  # distinct q blocks a drafter answers with (picked by the request's seed)
WARMUP = 20  # untimed round trips per transport and mode
BLOCK_WARMUP = 3  # untimed round trips after each compile (channels register their readers on first use)


def q_rows(index: int, gamma: int, vocab: int) -> np.ndarray:
    """The `index`-th q block: (gamma, vocab) float32 rows summing to about 1, with every bit pattern
    of a real softmax (tiny values, many distinct mantissas), the same in every process."""
    rng = np.random.default_rng(1000 + index)
    rows = rng.standard_normal((gamma, vocab), dtype=np.float32) * np.float32(4.0)
    rows = np.exp(rows - rows.max(axis=1, keepdims=True))
    return (rows / rows.sum(axis=1, keepdims=True)).astype(np.float32)


def expected_drafts(request: DraftRequest, vocab: int) -> list[int]:
    return [(request.seed * 31 + 7 * k + len(request.tokens)) % vocab for k in range(request.gamma)]


class StubDrafter:
    """The drafter replica's role with a table look-up for a drafter: `step` answers a DraftRequest
    with drafts and (sampled requests) one of POOL q blocks; the loopback handler is the app's own."""

    def __init__(self, gamma: int, vocab: int) -> None:
        self._vocab = vocab
        self._qs = [q_rows(i, gamma, vocab) for i in range(POOL)]
        self._server: LoopbackServer | None = None

    def step(self, request: DraftRequest) -> DraftReply:
        q = None if request.temperature == 0 else self._qs[request.seed % POOL][: request.gamma]
        return DraftReply(drafts=expected_drafts(request, self._vocab), q=q, seconds=0.0)

    def end(self, session: str) -> None:
        pass

    def cpu_seconds(self) -> float:
        """CPU time of this whole process (every thread: socket server, compiled graph loop, Ray's)."""
        return time.process_time()

    def open_channel(self) -> tuple[int, str]:
        """(port, token) of a loopback server answering with DrafterSessions._on_frame over this object."""
        if self._server is None:
            self._server = LoopbackServer(lambda header, blob: DrafterSessions._on_frame(self, header, blob))
        return self._server.port, self._server.token


def _percentiles(seconds: list[float]) -> dict[str, float]:
    us = np.asarray(seconds) * 1e6
    return {
        "median_us": float(np.median(us)),
        "p99_us": float(np.percentile(us, 99)),
        "mean_us": float(us.mean()),
        "min_us": float(us.min()),
        "rounds": len(us),
    }


def _idle_cpu_percent(drafter: Any, seconds: float) -> float:
    """The drafter process's CPU use over `seconds` in which nobody calls it, in % of one core."""
    before = ray.get(drafter.cpu_seconds.remote())
    time.sleep(seconds)
    return 100 * (ray.get(drafter.cpu_seconds.remote()) - before) / seconds


def run_rounds(
    drafter: Any, port: int, token: str, rounds: int, gamma: int, vocab: int, block: int, idle_s: float = 1.0
) -> dict:
    """Every transport and mode from this process (an actor's worker thread, or the driver): latency,
    CPU per round trip on both ends, exactness, and what a live compiled graph costs when idle."""
    socket_step, _ = socket_calls(port, token)
    graph: Any = None  # a compiled graph lives only through its own blocks: its idle loop spins (see below)
    compile_s: list[float] = []
    proxy_ready_s: list[float] = []
    teardown_s: list[float] = []

    def open_graph() -> None:
        nonlocal graph
        start = time.perf_counter()
        with InputNode() as inp:
            dag = drafter.step.bind(inp)
        graph = dag.experimental_compile()
        compile_s.append(time.perf_counter() - start)
        # each compile also starts a DAGDriverProxyActor (a new worker process) without waiting for it:
        # let it come up before anything is timed, or its start-up falls on the measured rounds
        proxy = getattr(graph, "_proxy_actor", None)
        if proxy is not None:
            ray.get(proxy.__ray_ready__.remote(), timeout=STEP_TIMEOUT_S)
        proxy_ready_s.append(time.perf_counter() - start)

    def close_graph() -> None:
        nonlocal graph
        start = time.perf_counter()
        graph.teardown()  # an actor runs one compiled graph at a time: free the drafter for the next
        graph = None
        teardown_s.append(time.perf_counter() - start)

    steps: dict[str, Callable[[DraftRequest], DraftReply]] = {
        "socket": socket_step,
        "compiled": lambda request: graph.execute(request).get(timeout=STEP_TIMEOUT_S),
        "actor_call": lambda request: ray.get(drafter.step.remote(request), timeout=STEP_TIMEOUT_S),
    }
    qs = [q_rows(i, gamma, vocab) for i in range(POOL)]
    session = f"bench-{os.getpid()}"
    counter = 0

    def one(name: str, temperature: float) -> tuple[float, bool]:
        """(seconds, exact) of one round trip: the call, the drafts as ints, q copied (as RemoteDrafter)."""
        nonlocal counter
        counter += 1
        request = DraftRequest(
            session=session,
            keep=counter,
            tokens=[counter % vocab, (counter * 3) % vocab, 5],
            gamma=gamma,
            temperature=temperature,
            top_p=1.0,
            seed=counter,
        )
        t0 = time.perf_counter()
        reply = steps[name](request)
        drafts = [int(d) for d in reply.drafts]
        q = None if reply.q is None else np.array(reply.q, dtype=np.float32)
        del reply  # a compiled graph's zero-copy reply pins its channel buffer until dropped
        elapsed = time.perf_counter() - t0
        want = None if temperature == 0 else qs[request.seed % POOL]
        same_q = (
            q is None if want is None else q is not None and q.shape == want.shape and q.tobytes() == want.tobytes()
        )
        return elapsed, same_q and drafts == expected_drafts(request, vocab)

    out: dict[str, Any] = {"idle_drafter_cpu_percent": {"no_graph": _idle_cpu_percent(drafter, idle_s)}}
    try:
        for mode in MODES:
            temperature = 0.0 if mode == "greedy" else 1.0
            times: dict[str, list[float]] = {name: [] for name in TRANSPORTS}
            cpu = {name: {"caller": 0.0, "drafter": 0.0} for name in TRANSPORTS}
            wrong = dict.fromkeys(TRANSPORTS, 0)
            for name in ("socket", "actor_call"):  # the compiled graph warms up after each compile
                for _ in range(WARMUP):
                    wrong[name] += not one(name, temperature)[1]
            for b in range((rounds + block - 1) // block):
                n = min(block, rounds - b * block)
                for k in range(len(TRANSPORTS)):
                    name = TRANSPORTS[(b + k) % len(TRANSPORTS)]
                    if name == "compiled":
                        open_graph()
                        for _ in range(WARMUP if b == 0 else BLOCK_WARMUP):
                            wrong[name] += not one(name, temperature)[1]
                        if "graph_alive" not in out["idle_drafter_cpu_percent"]:
                            out["idle_drafter_cpu_percent"]["graph_alive"] = _idle_cpu_percent(drafter, idle_s)
                    drafter_before = ray.get(drafter.cpu_seconds.remote())
                    caller_before = time.process_time()
                    for _ in range(n):
                        seconds, exact = one(name, temperature)
                        times[name].append(seconds)
                        wrong[name] += not exact
                    cpu[name]["caller"] += time.process_time() - caller_before
                    cpu[name]["drafter"] += ray.get(drafter.cpu_seconds.remote()) - drafter_before
                    if name == "compiled":
                        close_graph()
            figures = {
                name: {
                    **_percentiles(times[name]),
                    "caller_cpu_us": 1e6 * cpu[name]["caller"] / rounds,
                    "drafter_cpu_us": 1e6 * cpu[name]["drafter"] / rounds,
                }
                for name in TRANSPORTS
            }
            sock = figures["socket"]
            out[mode] = {
                **figures,
                "compiled_over_socket": {
                    "median": figures["compiled"]["median_us"] / sock["median_us"],
                    "p99": figures["compiled"]["p99_us"] / sock["p99_us"],
                },
                "actor_call_over_socket": {
                    "median": figures["actor_call"]["median_us"] / sock["median_us"],
                    "p99": figures["actor_call"]["p99_us"] / sock["p99_us"],
                },
                "exact": {name: wrong[name] == 0 for name in TRANSPORTS},
                "q_bytes": 0 if mode == "greedy" else gamma * vocab * 4,
            }
    finally:
        if graph is not None:
            close_graph()
    out["compile_s"] = float(np.median(compile_s))
    out["proxy_ready_s"] = float(np.median(proxy_ready_s))
    out["graphs_compiled"] = len(compile_s)
    out["teardown_s"] = float(np.median(teardown_s))
    return out


class CallerActor:
    """The target replica's role: an async actor whose speculative steps run on a worker thread."""

    async def run(self, drafter: Any, port: int, token: str, *args: Any) -> dict:
        return await asyncio.to_thread(run_rounds, drafter, port, token, *args)


def measure_transports(
    rounds: int = 2000,
    gamma: int = 4,
    vocab: int = 8192,
    block: int | None = None,
    from_driver: bool = True,
    idle_s: float = 1.0,
) -> dict:
    """Median / p99 microseconds (and CPU microseconds on each end) per drafter round trip over each
    transport, greedy and sampled, from a caller actor to a drafter actor and, with `from_driver`, from
    this process too; `idle_s`: how long the drafter's idle CPU is sampled with and without a live
    compiled graph. Needs Ray up; starts and kills its own two actors (num_cpus=0)."""
    drafter_cls = ray.remote(num_cpus=0)(StubDrafter)
    caller_cls = ray.remote(num_cpus=0)(CallerActor)
    drafter = drafter_cls.remote(gamma, vocab)
    caller = caller_cls.remote()
    try:
        port, token = ray.get(drafter.open_channel.remote())
        block = block or max(25, -(-rounds // 8))  # 8 turns each: every turn compiles a graph (~1 s here)
        args = (rounds, gamma, vocab, block, idle_s)
        result: dict[str, Any] = {
            "rounds": rounds,
            "gamma": gamma,
            "vocab": vocab,
            "block": block,
            "cpus": os.cpu_count(),
            "ray": ray.__version__,
            "from_actor": ray.get(caller.run.remote(drafter, port, token, *args)),
        }
        if from_driver:  # after the actor's graph is torn down: the drafter can be in one graph at a time
            result["from_driver"] = run_rounds(drafter, port, token, *args)
        return result
    finally:
        ray.kill(caller)
        ray.kill(drafter)


def format_table(result: dict) -> str:
    lines = [
        f"drafter round trip, gamma={result['gamma']} vocab={result['vocab']} rounds={result['rounds']} "
        f"(Ray {result['ray']}, {result['cpus']} CPUs); microseconds per round trip",
        f"{'caller':<7} {'mode':<8} {'transport':<11} {'median':>8} {'p99':>8} {'mean':>8} {'min':>7} "
        f"{'cpu:caller':>10} {'cpu:drafter':>11}  exact",
    ]
    for caller in ("from_actor", "from_driver"):
        if caller not in result:
            continue
        part = result[caller]
        for mode in MODES:
            for name in TRANSPORTS:
                f = part[mode][name]
                lines.append(
                    f"{caller[5:]:<7} {mode:<8} {name:<11} {f['median_us']:>8.1f} {f['p99_us']:>8.1f} "
                    f"{f['mean_us']:>8.1f} {f['min_us']:>7.1f} {f['caller_cpu_us']:>10.1f} "
                    f"{f['drafter_cpu_us']:>11.1f}  {part[mode]['exact'][name]}"
                )
            r = part[mode]["compiled_over_socket"]
            lines.append(f"{'':<7} {mode:<8} compiled/socket: median {r['median']:.2f}x, p99 {r['p99']:.2f}x")
        idle = part["idle_drafter_cpu_percent"]
        lines.append(
            f"{'':<7} {part['graphs_compiled']} graphs, median compile {part['compile_s']:.2f} s (+ proxy actor up "
            f"{part['proxy_ready_s']:.2f} s), teardown {part['teardown_s']:.2f} s; idle drafter "
            f"CPU {idle['no_graph']:.0f}% of a core without a graph, {idle['graph_alive']:.0f}% with one alive"
        )
    return "\n".join(lines)


if __name__ == "__main__":  # python -m distilray.bench.drafter_transport [rounds]
    import json
    import sys
    import tempfile

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    ray.init(
        num_cpus=2,
        object_store_memory=256 * 1024 * 1024,
        _temp_dir=tempfile.mkdtemp(prefix="dt-", dir="/tmp"),
        include_dashboard=False,
        log_to_driver=False,
    )
    try:
        res = measure_transports(rounds=int(sys.argv[1]) if len(sys.argv) > 1 else 2000)
        print(format_table(res))
        print(json.dumps(res, indent=1))
    finally:
        ray.shutdown()
