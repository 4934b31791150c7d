"""The drafter-transport microbenchmark: every transport delivers the drafts and q rows bit for bit, and
the result has the figures the report reads."""

from __future__ import annotations

import numpy as np
import pytest
from ray.dag import InputNode

from distilray.bench.drafter_transport import (
    MODES,
    POOL,
    TRANSPORTS,
    StubDrafter,
    expected_drafts,
    format_table,
    measure_transports,
    q_rows,
)
from distilray.serve_apps.schemas import DraftRequest
from distilray.serve_apps.speculative_drafter import socket_calls

FIGURES = {"median_us", "p99_us", "mean_us", "min_us", "rounds", "caller_cpu_us", "drafter_cpu_us"}


def _request(seed: int, temperature: float, gamma: int = 4) -> DraftRequest:
    return DraftRequest(
        session="t", keep=None, tokens=[1, 2, 3], gamma=gamma, temperature=temperature, top_p=1.0, seed=seed
    )


def test_q_pool_is_deterministic_and_distinct():
    a, b = q_rows(3, 4, 64), q_rows(3, 4, 64)
    assert a.dtype == np.float32 and a.shape == (4, 64) and a.tobytes() == b.tobytes()
    assert len({q_rows(i, 4, 64).tobytes() for i in range(POOL)}) == POOL  # a misrouted block would show
    assert np.allclose(a.sum(axis=1), 1.0, atol=1e-5)


def test_each_transport_delivers_q_rows_bit_exact(ray_session):
    ray = ray_session
    gamma, vocab = 4, 1000
    drafter = ray.remote(num_cpus=0)(StubDrafter).remote(gamma, vocab)
    try:
        port, token = ray.get(drafter.open_channel.remote())
        step, _ = socket_calls(port, token)
        with InputNode() as inp:
            graph = drafter.step.bind(inp).experimental_compile()
        try:
            calls = {
                "socket": step,
                "compiled": lambda r: graph.execute(r).get(timeout=30),
                "actor_call": lambda r: ray.get(drafter.step.remote(r), timeout=30),
            }
            for name, call in calls.items():
                for seed in (5, 6):
                    sampled = call(_request(seed, 1.0))
                    q = np.array(sampled.q)  # own copy: a compiled graph's reply is a view of its channel
                    assert sampled.drafts == expected_drafts(_request(seed, 1.0), vocab), name
                    del sampled
                    want = q_rows(seed % POOL, gamma, vocab)
                    assert q.dtype == np.float32 and q.shape == (gamma, vocab), name
                    assert q.tobytes() == want.tobytes(), name
                    greedy = call(_request(seed, 0.0))
                    assert greedy.q is None and greedy.drafts == expected_drafts(_request(seed, 0.0), vocab), name
        finally:
            graph.teardown()
    finally:
        ray.kill(drafter)


def test_measure_transports_small_run(ray_session):
    # from the caller actor only (the driver path is the same code): one turn per transport and mode
    result = measure_transports(rounds=50, gamma=4, vocab=2048, block=50, from_driver=False, idle_s=0.2)
    assert (result["rounds"], result["gamma"], result["vocab"], result["block"]) == (50, 4, 2048, 50)
    assert "from_driver" not in result
    part = result["from_actor"]
    assert part["graphs_compiled"] == len(MODES) and part["compile_s"] > 0 and part["teardown_s"] >= 0
    assert set(part["idle_drafter_cpu_percent"]) == {"no_graph", "graph_alive"}
    for mode in MODES:
        row = part[mode]
        assert row["exact"] == dict.fromkeys(TRANSPORTS, True), mode  # drafts and q rows equal, bit for bit
        assert row["q_bytes"] == (0 if mode == "greedy" else 4 * 2048 * 4)
        for name in TRANSPORTS:
            figures = row[name]
            assert set(figures) == FIGURES and figures["rounds"] == 50
            assert 0 < figures["min_us"] <= figures["median_us"] <= figures["p99_us"]
        for ratio in ("compiled_over_socket", "actor_call_over_socket"):
            transport = ratio.split("_over_")[0]
            assert row[ratio]["median"] == pytest.approx(row[transport]["median_us"] / row["socket"]["median_us"])
            assert row[ratio]["p99"] == pytest.approx(row[transport]["p99_us"] / row["socket"]["p99_us"])
    assert "compiled/socket" in format_table(result)
