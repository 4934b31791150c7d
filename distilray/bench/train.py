"""`distilray bench train`: training tokens/s through Ray Train against a bare torch loop.

Same model, same global batch, same data, same optimizer, measured side by side in one run.
Goal: Ray Train with one worker at least 0.9x the bare loop.
"""

from __future__ import annotations

import multiprocessing
import os
import tempfile
import time

import numpy as np
import torch

from distilray.actors.cluster import ensure_ray
from distilray.config import BenchTrainConfig, CorpusSpec, TrainLMConfig, config_from, replace_keys
from distilray.io_utils import atomic_write_json
from distilray.models.causal_lm import build_causal_lm, count_parameters
from distilray.pipelines import train_lm, train_tokenizer
from distilray.training import batch_rows, lm_loss, lr_at, make_optimizer

GOAL_RATIO_1_WORKER = 0.9


def bare_loop_tokens_per_s(cfg: TrainLMConfig, blocks: np.ndarray, tokenizer, untimed: int, threads: int) -> float:
    """The same steps as the shared Ray Train loop runs for train-lm, in this process, with no Ray and no DDP."""
    torch.set_num_threads(threads)
    torch.manual_seed(cfg.seed)
    model = build_causal_lm(cfg.model, tokenizer, n_positions=max(512, cfg.seq_len)).train()
    optimizer = make_optimizer(model, cfg.optim.lr, cfg.optim.weight_decay)
    data = torch.from_numpy(blocks.astype(np.int64))
    elapsed, timed = 0.0, 0
    for step in range(cfg.steps):
        t0 = time.perf_counter()
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, cfg.optim.lr, cfg.optim.warmup_steps, cfg.steps, cfg.optim.min_lr_ratio)
        loss = lm_loss(model, data[batch_rows(len(data), cfg.batch_size, step, cfg.seed, 0, 1)])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.optim.grad_clip)
        optimizer.step()
        float(loss.detach())
        if step >= untimed:
            elapsed, timed = elapsed + time.perf_counter() - t0, timed + 1
    return cfg.batch_size * cfg.seq_len * timed / elapsed


def _bare_in_fresh_process(*args) -> float:
    """Run the bare loop in a new process with no Ray in it: the driver hosts Ray's client threads."""
    ctx = multiprocessing.get_context("spawn")
    with ctx.Pool(1) as pool:
        return pool.apply(bare_loop_tokens_per_s, args)


def run(cfg: BenchTrainConfig) -> dict:
    ensure_ray()
    import ray

    cpus = int(ray.cluster_resources().get("CPU", os.cpu_count() or 1))
    corpus = CorpusSpec(dataset=cfg.eval_data) if cfg.eval_data else CorpusSpec()
    tok_dir = train_tokenizer.get_or_train(corpus, cfg.vocab_size, cfg.artifacts_dir)
    base = config_from(
        TrainLMConfig,
        corpus=corpus,
        model=cfg.model,
        tokenizer=str(tok_dir),
        vocab_size=cfg.vocab_size,
        seq_len=cfg.seq_len,
        batch_size=cfg.batch_size,
        steps=cfg.warmup_steps + cfg.steps,
        warmup_steps=2,
        checkpoint_every=10**9,  # only the final checkpoint, after the timed steps
        eval_max_tokens=2_000,
        max_failures=0,
        artifacts_dir=cfg.artifacts_dir,
        use_gpu="false",
        seed=cfg.seed,
    )
    _, tokenizer, blocks, _ = train_lm.prepare_data(base)
    probe = build_causal_lm(cfg.model, tokenizer)
    results: dict = {
        "model": cfg.model,
        "parameters": count_parameters(probe),
        "seq_len": cfg.seq_len,
        "global_batch": cfg.batch_size,
        "timed_steps": cfg.steps,
        "cpus": cpus,
        "unit": "training tokens per second",
    }
    print(f"[bench train] bare torch loop ({cpus} threads) ...", flush=True)
    bare_before = _bare_in_fresh_process(base, blocks, tokenizer, cfg.warmup_steps, cpus)
    with tempfile.TemporaryDirectory(prefix="distilray-bench-") as tmp:
        for workers in cfg.worker_counts:
            print(f"[bench train] Ray Train, {workers} worker(s) ...", flush=True)
            # a fresh run folder each time: a cached model would measure nothing
            run_cfg = replace_keys(
                base,
                num_workers=workers,
                cpus_per_worker=max(1, cpus // workers),
                artifacts_dir=tmp,
                name=f"bench-{workers}w",
            )
            res = train_lm.run(run_cfg, untimed_steps=cfg.warmup_steps)
            results[f"ray_train_{workers}w"] = {
                "tokens_per_s": res["tokens_per_s"],
                "threads_per_worker": max(1, cpus // workers),
            }
    print("[bench train] bare torch loop again (noise check) ...", flush=True)
    bare_after = _bare_in_fresh_process(base, blocks, tokenizer, cfg.warmup_steps, cpus)
    bare = (bare_before + bare_after) / 2
    results["bare_loop"] = {"tokens_per_s": bare, "before": bare_before, "after": bare_after}
    for workers in cfg.worker_counts:
        r = results[f"ray_train_{workers}w"]
        r["ratio_vs_bare"] = r["tokens_per_s"] / bare
    if 1 in cfg.worker_counts:
        ratio = results["ray_train_1w"]["ratio_vs_bare"]
        results["goal"] = {
            "ray_train_1w_ratio_min": GOAL_RATIO_1_WORKER,
            "ratio": ratio,
            "met": bool(ratio >= GOAL_RATIO_1_WORKER),
        }
    if cfg.json_out:
        atomic_write_json(cfg.json_out, results)
    return results


def format_table(results: dict) -> str:
    lines = [
        f"bench train: {results['model']} ({results['parameters']:,} params), "
        f"batch {results['global_batch']} x {results['seq_len']} tokens, "
        f"{results['timed_steps']} timed steps, {results['cpus']} CPUs",
        f"{'setting':<22}{'tokens/s':>12}{'vs bare':>10}",
        f"{'bare torch loop':<22}{results['bare_loop']['tokens_per_s']:>12.0f}{1.0:>10.2f}",
    ]
    for key, r in results.items():
        if key.startswith("ray_train_"):
            lines.append(
                f"{'Ray Train ' + key.split('_')[-1]:<22}{r['tokens_per_s']:>12.0f}{r['ratio_vs_bare']:>10.2f}"
            )
    if "goal" in results:
        g = results["goal"]
        lines.append(
            f"goal: Ray Train 1 worker >= {g['ray_train_1w_ratio_min']}x bare: "
            f"{'met' if g['met'] else 'NOT met'} ({g['ratio']:.2f}x)"
        )
    return "\n".join(lines)
