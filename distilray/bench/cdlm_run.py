"""`distilray bench cdlm`: every figure for one generator (bench/cdlm.py) and/or the generator-size sweep
(bench/cdlm_sweep.py), and the one table. The dispatch sits above both so that each imports only downward.
"""

from __future__ import annotations

from distilray.actors.cluster import ensure_ray
from distilray.bench.cdlm import bench_generator, generator_lines
from distilray.bench.cdlm_sweep import format_sweep, run_sweep
from distilray.config import BenchCDLMConfig
from distilray.io_utils import atomic_write_json


def run(cfg: BenchCDLMConfig) -> dict:
    """Every figure for one generator (the quickstart's, or `model=`), and/or the generator-size sweep."""
    ensure_ray()
    results = {} if cfg.sweep_only else bench_generator(cfg)
    if cfg.sweep or cfg.sweep_only:
        results["sweep"] = run_sweep(cfg)
    if cfg.json_out:
        atomic_write_json(cfg.json_out, results)
    return results


def format_table(r: dict) -> str:
    lines = generator_lines(r) if "goals" in r else []
    if r.get("sweep"):
        lines.extend(format_sweep(r["sweep"]))
    return "\n".join(lines)
