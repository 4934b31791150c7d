"""The load benchmark's arithmetic: per-level figures from client outcomes, the goals and the table."""

from __future__ import annotations

import pytest

from distilray.bench.serve_load import Outcome, format_table, goals, summarise

WANT = {"a": "x", "b": "y"}


def _ok(prompt: str, latency: float, text: str, tokens: int = 10, first: float | None = None) -> Outcome:
    return Outcome(
        prompt=prompt, started=0.0, latency=latency, first_token=first or latency, tokens=tokens, text=text, status=200
    )


def test_summarise_counts_errors_tokens_percentiles_and_identity():
    outcomes = [
        _ok("a", 1.0, "x", first=0.1),
        _ok("b", 2.0, "y", first=0.2),
        _ok("a", 3.0, "wrong"),
        Outcome(prompt="b", started=0.0, status=500, error="boom"),
        Outcome(prompt="b", started=0.0, error="ReadTimeout"),
    ]
    row = summarise(outcomes, wall=2.0, want=WANT)
    assert row["requests"] == 5 and row["errors"] == 2
    assert row["requests_per_s"] == pytest.approx(1.5) and row["tokens_per_s"] == pytest.approx(15.0)
    assert row["p50_s"] == 2.0 and row["p99_s"] == 3.0 and row["ttft_p50_s"] == 0.2
    assert row["identical_to_solo"] == 2


def _out(one_tps: float, eight_tps: float, one_p99: float, eight_p99: float, errors: int = 0) -> dict:
    row = dict(requests=8, errors=errors, requests_per_s=1.0, p50_s=0.1, ttft_p50_s=0.1, ttft_p99_s=0.1, seconds=1.0)
    levels = {
        "speculative": {
            "1": {**row, "tokens_per_s": one_tps, "p99_s": one_p99, "identical_to_solo": 8 - errors},
            "8": {**row, "tokens_per_s": eight_tps, "p99_s": eight_p99, "identical_to_solo": 7 - errors},
        }
    }
    return {
        "target": "t",
        "quantize": "none",
        "max_batch_size": 8,
        "gamma": 4,
        "max_tokens": 32,
        "levels": levels,
        "single_client": {  # one client side by side: the ratio is measured there, not recomputed
            "in_process_tokens_per_s": 100.0,
            "served_tokens_per_s": {"speculative": one_tps},
            "ratio_vs_in_process": {"speculative": one_tps / 100.0},
            "requests_per_side": 16,
            "same_text": True,
        },
        "fault": {
            "failed": 2,
            "failed_with_5xx_json": 2,
            "hung": 0,
            "recovery_s": 3.0,
            "after_recovery": 5,
            "after_recovery_ok": 5,
        },
    }


def test_goals_use_the_measured_ratios_and_say_when_they_are_not_met():
    out = _out(one_tps=95.0, eight_tps=300.0, one_p99=0.5, eight_p99=1.0)
    g = goals(out, None)
    assert (
        g["serve_one_client_vs_in_process"]["value"] == pytest.approx(0.95)
        and g["serve_one_client_vs_in_process"]["met"]
    )
    assert (
        g["eight_clients_tokens_per_s_vs_one"]["value"] == pytest.approx(300 / 95)
        and g["eight_clients_tokens_per_s_vs_one"]["met"]
    )
    assert g["eight_clients_p99_vs_one"]["met"] and g["errors"]["met"]
    assert (
        g["greedy_answers_not_identical_to_solo"]["value"] == 1 and not g["greedy_answers_not_identical_to_solo"]["met"]
    )
    assert g["fault_failures_clean_and_recovered"]["met"]
    slow = goals(_out(one_tps=50.0, eight_tps=100.0, one_p99=0.5, eight_p99=2.0, errors=1), None)
    assert not slow["serve_one_client_vs_in_process"]["met"] and not slow["eight_clients_tokens_per_s_vs_one"]["met"]
    assert not slow["eight_clients_p99_vs_one"]["met"] and slow["errors"]["value"] == 2 and not slow["errors"]["met"]
    out["goals"] = g
    table = format_table(out)
    assert "NOT met" in table and "speculative" in table and "eight_clients_p99_vs_one: 2.00" in table
