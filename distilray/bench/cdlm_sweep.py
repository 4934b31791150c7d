"""Generator-size sweep of `bench cdlm` (`sweep=true`, or `sweep_only=true`): SCD against generator size.

SCD appends a retrieved chunk only where the generator's own sampled answers held a run of tokens it
was confident about (probability above `tok_prob_threshold`), so its FPS, TTS and ROUGE-L track how
confident the generator is: the ~4M quickstart model reaches an FPS near 0.2 where the paper reports
about 0.43 with GPT-2-XL. The sweep trains GPT-2 presets of growing size (`sweep_sizes`, default tiny
~0.5M, mini ~4M, small ~21M) `generator_steps` steps each the quickstart's way (cached; `mini` is the
main run's generator) and runs the same SCD and verify measurement on each, with its own datastore,
on `sweep_prompts` held-out prompts: FPS, TTS, ROUGE-L against its own greedy output, the chunk hit
rate, the datastore's size, and whether `verify` stays identical to plain decoding.
"""

from __future__ import annotations

import dataclasses
import tempfile
from pathlib import Path

import torch

from distilray.bench.cdlm import bench_scd_and_verify
from distilray.bench.targets import train_preset
from distilray.config import BenchCDLMConfig
from distilray.models.causal_lm import load_causal_lm
from distilray.models.quantize import apply_quantization
from distilray.tokenizer import load_tokenizer


def run_sweep(cfg: BenchCDLMConfig) -> dict:
    """{sizes: [per preset: model_dir, parameters, val_ppl, scd and verify figures], ...}."""

    trained = []
    for preset in cfg.sweep_sizes:
        print(
            f"[bench cdlm] sweep: {preset} generator, {cfg.generator_steps} steps (trained, or from the cache) ...",
            flush=True,
        )
        trained.append((preset, train_preset(cfg.artifacts_dir, preset, cfg.generator_steps)))
    small = dataclasses.replace(cfg, prompts=cfg.sweep_prompts)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # one-token decoding steps of a small model run faster on one thread
    sizes = []
    try:
        with tempfile.TemporaryDirectory(prefix="distilray-bench-cdlm-sweep-") as tmp:
            for preset, result in trained:
                print(f"[bench cdlm] sweep: SCD and verify with the {preset} generator ...", flush=True)
                tokenizer = load_tokenizer(result["model_dir"])
                model = load_causal_lm(result["model_dir"], "cpu", torch.float32)
                model = apply_quantization(model, cfg.quantize)
                work = Path(tmp) / preset
                work.mkdir()
                scd, verify = bench_scd_and_verify(small, model, tokenizer, work)
                sizes.append(
                    {
                        "preset": preset,
                        "model_dir": result["model_dir"],
                        "parameters": result["parameters"],
                        "steps": result["steps"],
                        "val_ppl": result["val_ppl"],
                        "scd": scd,
                        "verify": verify,
                    }
                )
    finally:
        torch.set_num_threads(threads)
    return {
        "steps": cfg.generator_steps,
        "prompts": cfg.sweep_prompts,
        "max_new_tokens": cfg.max_new_tokens,
        "quantize": cfg.quantize,
        "sizes": sizes,
    }


def format_sweep(s: dict) -> list[str]:
    """The sweep as table lines: one row per generator size."""
    lines = [
        f"generator-size sweep: {s['steps']} training steps each, {s['prompts']} prompts x {s['max_new_tokens']} "
        f"tokens, quantize {s['quantize']}",
        f"{'generator':<10}{'params':>12}{'val ppl':>9}{'keys':>8}{'FPS':>7}{'TTS':>8}{'ROUGE-L':>9}{'hits':>7}"
        f"{'chunk':>7}{'verify FPS':>12}  verify same",
    ]
    for z in s["sizes"]:
        c, v = z["scd"], z["verify"]
        lines.append(
            f"{z['preset']:<10}{z['parameters']:>12,}{z['val_ppl']:>9.1f}{c['datastore_keys']:>8,}{c['fps']:>7.3f}"
            f"{c['tts']:>8.3f}{c['rouge_l_vs_baseline']:>9.3f}{c['chunk_hit_rate']:>7.3f}"
            f"{c['mean_chunk_length']:>7.2f}{v['fps']:>12.3f}"
            f"  {v['identical_prompts']}/{v['prompts']}"
        )
    lines.append(
        "(FPS: forward passes saved per generated token; TTS: time per token saved over plain greedy decoding; "
        "ROUGE-L against that output; hits: share of decoding steps that used a chunk, chunk: its mean length)"
    )
    return lines
