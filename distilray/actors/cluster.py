"""Connecting to Ray (a cluster when one is named, a local instance otherwise: the embedded default) and
sizing workers to it. Every job, benchmark and the training driver start Ray through `ensure_ray`."""

from __future__ import annotations

import logging
import os

import ray

from distilray import console


def ensure_ray(num_cpus: int | None = None, object_store_mb: int | None = None) -> None:
    """`RAY_ADDRESS` (set by `ray job submit` too) targets a cluster; no address starts local Ray.

    Quiet unless DISTILRAY_VERBOSE=1 (`console.configure_output`); a Ray started elsewhere (tests, a
    notebook) is used as it is."""
    if ray.is_initialized():
        return
    verbose = console.is_verbose()
    kwargs = console.ray_init_kwargs(verbose)
    if not os.environ.get("RAY_ADDRESS"):
        # Ray 2.60 otherwise writes an auth token that later CLI calls then fail on.
        os.environ.setdefault("RAY_AUTH_MODE", "disabled")
        if num_cpus:
            kwargs["num_cpus"] = num_cpus
        if object_store_mb:
            kwargs["object_store_memory"] = object_store_mb * 1024 * 1024
    ray.init(**kwargs)
    if not verbose:
        quiet_ray_data()


def quiet_ray_data() -> None:
    """Ray Data on the driver: no progress output of its own (each stage shows one bar, `console.progress`)
    and only warnings on the console; its log file (`<logs>/ray-data/`) keeps everything."""
    import ray.data
    from ray.util.debug import log_once

    ray.data.DataContext.get_current().enable_progress_bars = False
    log_once("ray_data_progress_manager_disabled")  # uses up the one warning that the bars are off
    for handler in logging.getLogger("ray.data").handlers:
        if handler.get_name() == "console":
            handler.setLevel(logging.WARNING)


def resolve_use_gpu(value: str) -> bool:
    """`auto` uses GPUs when the cluster has any."""
    from distilray.errors import DistilrayError

    choice = {"auto": None, "true": True, "false": False}.get(str(value).lower(), "bad")
    if choice == "bad":
        raise DistilrayError(f"use_gpu must be auto, true or false, got {value!r}")
    return cluster_has_gpus() if choice is None else bool(choice)


def cpus_per_worker(requested: int, workers: int) -> int:
    """`requested`, or (0) an even share of the cluster's CPUs that still fits on one node."""
    if requested:
        return requested
    total = int(ray.cluster_resources().get("CPU", 1))
    return max(1, min(largest_node_cpus(), total) // workers)


def largest_node_cpus() -> int:
    """CPUs of the biggest alive node: a training worker must fit on one node."""
    cpus = [int(n["Resources"].get("CPU", 0)) for n in ray.nodes() if n.get("Alive")]
    return max(cpus or [1])


def cluster_has_gpus() -> bool:
    return ray.cluster_resources().get("GPU", 0) > 0
