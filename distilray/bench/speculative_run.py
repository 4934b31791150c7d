"""`distilray bench speculative`: which benchmark runs (bench/speculative.py on the quickstart's target,
bench/speculative_user.py on a user's, bench/speculative_sweep.py against target size) and the one table.

The dispatch sits above the three so that each imports only downward.
"""

from __future__ import annotations

import dataclasses
import time

from distilray.bench.speculative import main_lines, run_quickstart
from distilray.bench.speculative_sweep import format_sweep, run_sweep
from distilray.bench.speculative_user import run_user_target
from distilray.config import BenchSpeculativeConfig
from distilray.io_utils import atomic_write_json


def run(cfg: BenchSpeculativeConfig) -> dict:
    """The quickstart's target and drafters, or a user's target (`target=`), and/or the target-size sweep."""
    started = time.perf_counter()
    out: dict = {}
    if not cfg.sweep_only:
        if cfg.target:
            out = run_user_target(cfg)
        else:
            out = run_quickstart(cfg)
    if cfg.sweep or cfg.sweep_only:
        out["sweep"] = run_sweep(cfg)
    out["seconds"] = round(time.perf_counter() - started, 1)
    out["config"] = dataclasses.asdict(cfg)
    if cfg.json_out:
        atomic_write_json(cfg.json_out, out)
    return out


def format_table(r: dict) -> str:
    lines = main_lines(r) if "drafters" in r else []
    if r.get("sweep"):
        lines.extend(format_sweep(r["sweep"]))
    return "\n".join(lines)
