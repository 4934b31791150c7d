"""`distilray eval-diffusion`: one diffusion LM through the pinned harness (distilray.eval.diffusion)
at several step counts: Gen PPL beside unigram entropy, MAUVE against held-out text, LAMBADA accuracy
and per-word perplexity, NFE and seconds per sample, and an autoregressive model of similar size
sampled with its KV cache for the speed and quality baseline. Every figure carries its harness."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch

from distilray.config import EvalDiffusionConfig, SampleDiffusionConfig, config_from
from distilray.errors import DistilrayError
from distilray.eval.diffusion import HARNESS, gen_ppl, lambada_accuracy, lambada_examples, lambada_ppl, tokenize_lambada
from distilray.eval.mauve import mauve, mean_hidden_features
from distilray.generation import sample_continuations
from distilray.io_utils import atomic_write_json
from distilray.losses.mdlm import subs_log_probs
from distilray.models.causal_lm import count_parameters, load_causal_lm
from distilray.models.mdlm import load_diffusion_lm
from distilray.pipelines import sample_diffusion
from distilray.pipelines.train_mdlm import diffusion_blocks
from distilray.tokenizer import check_same_tokenizer, load_tokenizer


def run(cfg: EvalDiffusionConfig) -> dict:
    if not cfg.model or not cfg.evaluator:
        raise DistilrayError("eval-diffusion needs model=PATH (an MDLM folder) and evaluator=PATH (a causal LM)")
    tokenizer = load_tokenizer(cfg.model)
    check_same_tokenizer(tokenizer, load_tokenizer(cfg.evaluator), "the diffusion LM and the evaluator")
    evaluator = load_causal_lm(cfg.evaluator, device="cpu", dtype=torch.float32).eval()
    model = load_diffusion_lm(cfg.model)
    seq_len = model.config.seq_len
    references = diffusion_blocks(cfg.corpus, tokenizer, seq_len, "test")[: max(cfg.num_samples, 2)]
    ref_features = mean_hidden_features(evaluator, references.tolist()) if cfg.mauve else None
    rows = []
    for steps in cfg.steps:
        out = sample_diffusion.run(
            config_from(
                SampleDiffusionConfig,
                model=cfg.model,
                num_samples=cfg.num_samples,
                num_steps=steps,
                temperature=cfg.temperature,
                float64=cfg.float64,
                batch_size=cfg.batch_size,
                num_actors=cfg.num_actors,
                output_dir=str(Path(cfg.output_dir) / "samples"),
                seed=cfg.seed,
            )
        )
        samples = torch.from_numpy(sample_diffusion.read_samples(out["output_dir"]))
        rows.append(
            {
                "model": cfg.model,
                "steps": steps,
                "nfe": out["mean_nfe"],
                "seconds_per_sample": out["seconds_per_sample"],
                **sample_quality(evaluator, samples, ref_features),
            }
        )
    result = {"model": cfg.model, "seq_len": seq_len, "rows": rows, "harness": {**HARNESS, "evaluator": cfg.evaluator}}
    if cfg.lambada_file != "none":
        result["lambada"] = lambada_scores(model, tokenizer, cfg.lambada_file, cfg.lambada_examples, cfg.seed)
    if cfg.ar_baseline:
        result["ar"] = autoregressive_baseline(
            cfg.ar_baseline, tokenizer, evaluator, ref_features, seq_len, cfg.num_samples, cfg.batch_size, cfg.seed
        )
    if cfg.json_out:
        atomic_write_json(Path(cfg.json_out), result)
    return result


def sample_quality(evaluator, samples: torch.Tensor, ref_features: np.ndarray | None) -> dict:
    """Gen PPL and entropy under the harness; MAUVE against the references when asked for."""
    scored = gen_ppl(evaluator, samples)
    out = {"gen_ppl": scored["gen_ppl"], "entropy": scored["entropy"]}
    if ref_features is not None:
        out["mauve"] = mauve(ref_features, mean_hidden_features(evaluator, samples.tolist()))
    return out


def lambada_scores(model, tokenizer, lambada_file: str = "", examples: int = 100, seed: int = 0) -> dict:
    """LAMBADA last-word accuracy and per-word perplexity (reference/sdtt.md 3) of an MDLM, on the first
    `examples` passages (0: all) of `lambada_file` (empty: the dev file of ../shared/data)."""
    texts = lambada_examples(lambada_file or None)
    texts = texts[:examples] if examples else texts
    ids_of = tokenize_lambada(texts, tokenizer)
    mask_id = model.config.mask_id

    def log_probs(z: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return subs_log_probs(model(z), z, mask_id)

    ids = (mask_id, tokenizer.bos_token_id, tokenizer.eos_token_id)
    generator = torch.Generator().manual_seed(seed)
    return {
        "examples": len(ids_of),
        "accuracy": lambada_accuracy(log_probs, ids_of, *ids, max_len=model.config.seq_len),
        "ppl": lambada_ppl(log_probs, ids_of, *ids, generator, max_len=model.config.seq_len),
        "file": lambada_file or "lambada dev (../shared/data)",
    }


def autoregressive_baseline(
    ar_dir: str,
    tokenizer,
    evaluator,
    ref_features: np.ndarray | None,
    seq_len: int,
    num_samples: int,
    batch_size: int,
    seed: int = 0,
) -> dict:
    """The AR baseline: seq_len tokens per sample from [bos], sampled at temperature 1 with its KV cache."""
    check_same_tokenizer(tokenizer, load_tokenizer(ar_dir), "the diffusion LM and the AR baseline")
    ar = load_causal_lm(ar_dir, device="cpu", dtype=torch.float32).eval()
    generator = torch.Generator().manual_seed(seed)
    prompts = torch.full((num_samples, 1), tokenizer.bos_token_id, dtype=torch.long)
    t0 = time.perf_counter()
    samples = torch.cat(
        [
            sample_continuations(ar, prompts[i : i + batch_size], seq_len - 1, 1.0, generator)
            for i in range(0, num_samples, batch_size)
        ]
    )
    seconds = (time.perf_counter() - t0) / num_samples
    return {
        "model": ar_dir,
        "parameters": count_parameters(ar),
        "nfe": seq_len - 1,
        "seconds_per_sample": seconds,
        **sample_quality(evaluator, samples, ref_features),
    }


def format_table(result: dict) -> str:
    lines = [f"{'model':<40}{'steps':>6}{'nfe':>7}{'gen ppl':>9}{'entropy':>9}{'mauve':>7}{'s/sample':>10}"]
    for r in result["rows"] + ([{**result["ar"], "steps": "AR"}] if "ar" in result else []):
        lines.append(
            f"{Path(r['model']).name[-40:]:<40}{r['steps']:>6}{r['nfe']:>7.0f}{r['gen_ppl']:>9.2f}"
            f"{r['entropy']:>9.3f}{r.get('mauve', float('nan')):>7.3f}{r['seconds_per_sample']:>10.3f}"
        )
    if "lambada" in result:
        la = result["lambada"]
        lines.append(
            f"LAMBADA ({la['examples']} passages): accuracy {la['accuracy']:.3f}, per-word ppl {la['ppl']:.1f}"
        )
    lines.append(f"harness: {result['harness']['form']} form, evaluator {result['harness']['evaluator']} in fp32")
    return "\n".join(lines)
