"""`distilray quickstart`: the main job end to end on the embedded defaults.

Stage 1 (foundation): a BPE tokenizer and two causal LMs, a target and a much smaller drafter,
trained with Ray Train on the built-in corpus; their test perplexity and a sample from each.
Stage 2 (CD-LM): Ray Data extraction, the sharded datastore, retrieval decoding in three modes.
Stage 3 (speculative decoding): the stage-1 drafter distilled from the target on Ray Train, a
trigram counted on Ray Data, and greedy speculative decoding against plain decoding.
Stage 4 (SDTT): an MDLM teacher on Ray Train, one round of self-distillation through time, and
few-step samples of teacher and student scored by the stage-1 target.
Later stages add their rows to the same summary.
"""

from __future__ import annotations

import dataclasses
import sys
import time
from pathlib import Path

from distilray import corpus
from distilray.actors.cluster import ensure_ray
from distilray.config import (
    BuildDatastoreConfig,
    CDLMGenerateConfig,
    DistillDrafterConfig,
    DistillSDTTConfig,
    EvalPPLConfig,
    ExtractConfig,
    FitNGramConfig,
    QuickstartConfig,
    TrainLMConfig,
    TrainMDLMConfig,
    config_from,
)
from distilray.generation import generate_text
from distilray.io_utils import atomic_write_json, read_json
from distilray.models.causal_lm import load_causal_lm
from distilray.pipelines import (
    build_datastore,
    cdlm_generate,
    distill_drafter,
    distill_sdtt,
    eval_ppl,
    extract,
    fit_ngram,
    train_lm,
    train_mdlm,
    train_tokenizer,
)
from distilray.tokenizer import encode_documents, load_tokenizer


def lm_config(cfg: QuickstartConfig, preset: str, steps: int, tokenizer_dir: Path) -> TrainLMConfig:
    """The quickstart's training config for one model (benchmarks reuse it, and so its cache)."""
    return config_from(
        TrainLMConfig,
        corpus=cfg.corpus,
        model=preset,
        tokenizer=str(tokenizer_dir),
        seq_len=cfg.seq_len,
        batch_size=cfg.batch_size,
        steps=steps,
        warmup_steps=max(1, steps // 10),
        num_workers=cfg.num_workers,
        checkpoint_every=max(1, steps // 2),
        artifacts_dir=cfg.artifacts_dir,
        seed=cfg.seed,
    )


def run(cfg: QuickstartConfig) -> dict:
    started = time.perf_counter()
    ensure_ray()
    rows: list[tuple[str, str, str]] = []  # (stage, figure, value)
    artifacts: dict[str, str] = {}

    _stage("1/6 foundation: a BPE tokenizer, a target and a drafter LM on Ray Train")
    t0 = time.perf_counter()
    tok_dir = train_tokenizer.get_or_train(cfg.corpus, cfg.vocab_size, cfg.artifacts_dir)
    tokenizer = load_tokenizer(tok_dir)
    rows.append(("tokenizer", "vocabulary", str(len(tokenizer))))
    rows.append(("tokenizer", "seconds", f"{time.perf_counter() - t0:.1f}"))
    artifacts["tokenizer"] = str(Path(tok_dir).resolve())

    models: dict[str, dict] = {}
    for role, preset, steps in (
        ("target", cfg.target_model, cfg.target_steps),
        ("drafter", cfg.drafter_model, cfg.drafter_steps),
    ):
        t0 = time.perf_counter()
        res = train_lm.run(lm_config(cfg, preset, steps, tok_dir))
        test = eval_ppl.run(
            EvalPPLConfig(
                model=res["model_dir"], corpus=cfg.corpus, split="test", context_len=cfg.seq_len, max_tokens=50_000
            )
        )
        model = load_causal_lm(res["model_dir"])
        sample = generate_text(
            model,
            tokenizer,
            cfg.sample_prompt,
            max_new_tokens=cfg.sample_tokens,
            temperature=0.8,
            top_k=50,
            seed=cfg.seed,
        )
        models[role] = {**res, "test_ppl": test["ppl"], "sample": sample}
        label = f"{role} ({preset})"
        rows += [
            (label, "parameters", f"{res['parameters']:,}"),
            (label, "train steps", str(res["steps"])),
            (label, "final train loss", f"{res['final_loss']:.3f}"),
            (label, "validation ppl", f"{res['val_ppl']:.2f}"),
            (label, "test ppl", f"{test['ppl']:.2f}"),
            (label, "train tokens/s", f"{res['tokens_per_s']:.0f}" + (" (cached run)" if res.get("cached") else "")),
            (label, "seconds", f"{time.perf_counter() - t0:.1f}"),
        ]
        artifacts[f"{role} model"] = res["model_dir"]
        artifacts[f"{role} metrics"] = res["metrics_csv"]

    _stage("2/6 CD-LM: Ray Data extraction, the sharded datastore, decoding with chunks")
    cdlm_rows, cdlm_artifacts = cdlm_stage(cfg, models["target"]["model_dir"])
    rows += cdlm_rows
    artifacts.update(cdlm_artifacts)
    _stage("3/6 speculative decoding: a distilled drafter and a trigram against plain decoding")
    spec_rows, spec_artifacts = speculative_stage(cfg, models["target"]["model_dir"], models["drafter"]["model_dir"])
    rows += spec_rows
    artifacts.update(spec_artifacts)
    _stage("4/6 SDTT: an MDLM teacher, one round of self-distillation, few-step samples")
    sdtt_rows, sdtt_artifacts = sdtt_stage(cfg, tok_dir, models["target"]["model_dir"])
    rows += sdtt_rows
    artifacts.update(sdtt_artifacts)
    _stage("5/6 token weighting: a short-context Llama extended 4x, uniform against weighted cross-entropy")
    long_rows, long_artifacts = long_context_stage(cfg, tok_dir)
    rows += long_rows
    artifacts.update(long_artifacts)
    _stage("6/6 T-Free: a tokenizer-free LM on hashed trigram words, against the stage-1 BPE")
    from distilray.pipelines.quickstart_tfree import tfree_stage

    tfree_rows, tfree_artifacts, tfree_sample = tfree_stage(cfg, tok_dir, _link)
    rows += tfree_rows
    artifacts.update(tfree_artifacts)

    results_path = Path(cfg.artifacts_dir).resolve() / "quickstart" / "results.json"
    artifacts["results"] = str(results_path)
    summary = {
        "rows": rows,
        "artifacts": artifacts,
        "samples": {role: m["sample"] for role, m in models.items()},
        "tfree_sample": tfree_sample,
        "prompt": cfg.sample_prompt,
        "seconds": round(time.perf_counter() - started, 1),
    }
    atomic_write_json(results_path, summary)
    return summary


def _stage(title: str) -> None:
    print(f"[quickstart] stage {title}", file=sys.stderr, flush=True)


def cdlm_stage(cfg: QuickstartConfig, target_dir: str) -> tuple[list[tuple[str, str, str]], dict[str, str]]:
    """CD-LM: extract the train split on Ray Data, build the sharded datastore, then decode test
    prompts in baseline and paper modes with the datastore in process, and in verify mode through the
    datastore actors."""
    t0 = time.perf_counter()
    home = Path(cfg.artifacts_dir).resolve() / "quickstart" / "cdlm"
    home.mkdir(parents=True, exist_ok=True)
    _link(home / "model", target_dir)  # a stable path for serve_config.yaml
    ext = extract.run(
        ExtractConfig(
            model=target_dir,
            corpus=cfg.corpus,
            window=cfg.cdlm_window,
            stride=cfg.cdlm_stride,
            min_length=32,
            output_dir=str(home / "extract"),
        )
    )
    ds = build_datastore.run(
        BuildDatastoreConfig(
            extract_dir=ext["output_dir"],
            tok_prob_threshold=cfg.cdlm_tok_prob_threshold,
            num_shards=2,
            output_dir=str(home / "datastore"),
        )
    )
    gen = CDLMGenerateConfig(
        model=target_dir,
        datastore=str(home / "datastore"),
        corpus=cfg.corpus,
        num_prompts=cfg.cdlm_prompts,
        max_new_tokens=cfg.cdlm_new_tokens,
        similarity_threshold=cfg.cdlm_similarity_threshold,
        quantize=cfg.quantize,
    )
    # paper with the datastore in process, as a CPU deployment holds it (the app's datastore_placement=target):
    # its TTS is then the method's, not the price of a Ray round trip per step; verify goes through the actors
    placement = {"baseline": "local", "paper": "local", "verify": "shards"}
    by_mode = {
        mode: cdlm_generate.run(
            dataclasses.replace(
                gen, mode=mode, datastore_placement=placement[mode], save_dir=str(home / f"generations-{mode}")
            )
        )
        for mode in ("baseline", "paper", "verify")
    }
    same = all(
        read_json(home / "generations-baseline" / f"prompt_{i}.json")["token_ids"]
        == read_json(home / "generations-verify" / f"prompt_{i}.json")["token_ids"]
        for i in range(by_mode["baseline"]["prompts"])
    )
    base_spt = by_mode["baseline"]["seconds_per_token"]
    label = "CD-LM"
    rows = [
        (label, "extracted tokens", f"{ext['tokens']:,}"),
        (label, "datastore keys / chunks", f"{ds['keys']:,} / {ds['chunks']:,}"),
        (
            label,
            "paper, datastore in process: FPS / TTS",
            f"{by_mode['paper']['fps']:.3f} / {1 - by_mode['paper']['seconds_per_token'] / base_spt:.3f}",
        ),
        (label, "paper: chunk hit rate", f"{by_mode['paper']['chunk_hit_rate']:.3f}"),
        (label, "verify, datastore actors: FPS / same", f"{by_mode['verify']['fps']:.3f} / {same}"),
        (label, "seconds", f"{time.perf_counter() - t0:.1f}"),
    ]
    return rows, {"cdlm datastore": str(home / "datastore"), "cdlm generations": str(home)}


def _link(link: Path, target: str | Path) -> None:
    """A stable path (for serve_config.yaml) pointing at a cached artifact."""
    link.parent.mkdir(parents=True, exist_ok=True)
    if link.is_symlink() or link.exists():
        link.unlink()
    link.symlink_to(Path(target).resolve(), target_is_directory=True)


def speculative_stage(
    cfg: QuickstartConfig, target_dir: str, drafter_dir: str
) -> tuple[list[tuple[str, str, str]], dict[str, str]]:
    """Distil the stage-1 drafter from the target (fkl, DistillSpec's start from a trained drafter), count a
    trigram drafter, then decode test prompts greedily: plain vs speculative with each drafter."""
    import torch

    from distilray.decoding.drafters import load_drafter
    from distilray.decoding.speculative import theoretical_speedup
    from distilray.eval.speculative_speed import scan_drafter, step_times
    from distilray.models.quantize import apply_quantization

    t0 = time.perf_counter()
    home = Path(cfg.artifacts_dir).resolve() / "quickstart" / "speculative"
    distilled = distill_drafter.run(
        config_from(
            DistillDrafterConfig,
            target=target_dir,
            drafter="transformer",
            init=drafter_dir,
            loss="fkl",
            data="corpus",
            corpus=cfg.corpus,
            seq_len=cfg.seq_len,
            batch_size=cfg.batch_size,
            steps=cfg.spec_distill_steps,
            lr=5e-4,
            warmup_steps=10,
            artifacts_dir=cfg.artifacts_dir,
            seed=cfg.seed,
        )
    )
    ngram_dir = home / "drafters" / "ngram3"
    if not (ngram_dir / "stats.json").is_file():
        fit_ngram.run(FitNGramConfig(tokenizer=target_dir, corpus=cfg.corpus, n=3, output_dir=str(ngram_dir)))
    _link(home / "target", target_dir)
    _link(home / "drafters" / "transformer-baseline", drafter_dir)
    _link(home / "drafters" / "transformer-distilled", distilled["drafter_dir"])

    tokenizer = load_tokenizer(target_dir)
    step = 32 + cfg.spec_new_tokens
    docs = encode_documents(tokenizer, corpus.load_splits(cfg.corpus)["test"])
    prompts = [d[i : i + 32] for d in docs for i in range(0, len(d) - step, step)][: cfg.spec_prompts]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # one-token steps of small models: extra threads only add overhead
    try:
        # as served on CPU (serve_config.yaml): int8 weights make a verification pass cost about one step
        target = apply_quantization(load_causal_lm(target_dir, device="cpu", dtype=torch.float32), cfg.quantize)
        rows = [
            ("speculative", "drafter distilled (fkl) steps", str(distilled["steps"])),
            ("speculative", "target and drafters", f"{cfg.quantize} weights, against plain decoding of the same"),
        ]
        for name, folder in (
            ("transformer baseline", drafter_dir),
            ("transformer distilled", distilled["drafter_dir"]),
            ("trigram", ngram_dir),
            ("prompt lookup", "prompt-lookup"),
        ):
            drafter = load_drafter(folder, quantize=cfg.quantize, vocab_size=len(tokenizer))
            target_s, drafter_s = step_times(target, drafter, prompts[0])
            scan, same = scan_drafter(
                target, drafter, prompts, (cfg.spec_gamma,), cfg.spec_new_tokens, drafter_s / target_s
            )
            r = scan[cfg.spec_gamma]
            rows.append(
                (
                    "speculative",
                    f"{name}: alpha / tokens per pass",
                    f"{r['alpha']:.3f} / {r['mean_accepted_length']:.2f}",
                )
            )
            theory = theoretical_speedup(max(0.0, min(1.0, r["alpha"])), cfg.spec_gamma, drafter_s / target_s)
            rows.append(
                (
                    "speculative",
                    f"{name}: speedup meas / theo",
                    f"{r['speedup_measured']:.2f}x / {theory:.2f}x (same as plain: {same})",
                )
            )
    finally:
        torch.set_num_threads(threads)
    rows.append(("speculative", "seconds", f"{time.perf_counter() - t0:.1f}"))
    return rows, {"speculative drafters": str(home / "drafters"), "speculative target": str(home / "target")}


def format_table(summary: dict) -> str:
    rows = summary["rows"]
    w1 = max(len(r[0]) for r in rows)
    w2 = max(len(r[1]) for r in rows)
    lines = ["", "distilray quickstart: summary", "=" * (w1 + w2 + 20)]
    lines += [f"{stage:<{w1}}  {figure:<{w2}}  {value}" for stage, figure, value in rows]
    lines += ["", f"samples (prompt: {summary['prompt']!r})"]
    lines += [f"  {role:<8} {text!r}" for role, text in summary["samples"].items()]
    if summary.get("tfree_sample"):
        lines += [f"  T-Free   {summary['tfree_sample']!r} (its own prompt, Gutenberg-trained)"]
    lines += ["", "artifacts"]
    lines += [f"  {k:<16} {v}" for k, v in summary["artifacts"].items()]
    lines += ["", f"total {summary['seconds']} s"]
    return "\n".join(lines)


def sdtt_stage(cfg: QuickstartConfig, tok_dir: str, evaluator_dir: str) -> tuple[list[tuple[str, str, str]], dict]:
    """SDTT: an MDLM teacher on Ray Train, one round of self-distillation (the student learns to take in one
    step what the teacher takes in two), then samples of both at the teacher's and half its step count,
    scored by the stage-1 target (fp32, the pinned harness) with their unigram entropy and time per sample."""
    import torch

    from distilray.decoding.mdlm import sample
    from distilray.eval.diffusion import gen_ppl
    from distilray.models.mdlm import load_diffusion_lm

    t0 = time.perf_counter()
    common = dict(batch_size=32, num_workers=cfg.num_workers, artifacts_dir=cfg.artifacts_dir, seed=cfg.seed)
    teacher = train_mdlm.run(
        config_from(
            TrainMDLMConfig,
            corpus=cfg.corpus,
            model=cfg.sdtt_teacher_model,
            tokenizer=str(tok_dir),
            seq_len=cfg.sdtt_seq_len,
            steps=cfg.sdtt_teacher_steps,
            lr=1e-3,
            warmup_steps=min(30, max(1, cfg.sdtt_teacher_steps // 8)),
            checkpoint_every=max(1, cfg.sdtt_teacher_steps // 2),
            **common,
        )
    )
    distilled = distill_sdtt.run(
        config_from(
            DistillSDTTConfig,
            teacher=teacher["model_dir"],
            corpus=cfg.corpus,
            orig_num_steps=cfg.sdtt_orig_num_steps,
            grow_dt_every=cfg.sdtt_distill_steps,
            steps=cfg.sdtt_distill_steps,
            lr=3e-4,
            warmup_steps=min(10, max(1, cfg.sdtt_distill_steps // 10)),
            checkpoint_every=cfg.sdtt_distill_steps,
            **common,
        )
    )
    evaluator = load_causal_lm(evaluator_dir, dtype=torch.float32)
    full, few = cfg.sdtt_orig_num_steps, distilled["sampling_steps"]["1"]
    label, rows = "SDTT", []
    rows.append((label, "teacher val NELBO bound (ppl)", f"{teacher['val_ppl_bound']:.1f}"))
    cases = (
        ("teacher", teacher["model_dir"], full),
        ("teacher", teacher["model_dir"], few),
        ("student r1", distilled["students"]["1"], few),
    )
    seconds = {}
    for name, folder, steps in cases:
        model = load_diffusion_lm(folder)
        out = sample(model, cfg.sdtt_samples, steps, generator=torch.Generator().manual_seed(cfg.seed))
        scored = gen_ppl(evaluator, out.tokens)
        seconds[(name, steps)] = out.seconds / cfg.sdtt_samples
        rows.append(
            (label, f"{name} @ {steps} steps: gen ppl / entropy", f"{scored['gen_ppl']:.1f} / {scored['entropy']:.3f}")
        )
    speedup = seconds[("teacher", full)] / seconds[("student r1", few)]
    rows.append((label, f"student @ {few} vs teacher @ {full}: time/sample", f"{speedup:.2f}x faster"))
    rows.append((label, "seconds", f"{time.perf_counter() - t0:.1f}"))
    home = Path(cfg.artifacts_dir).resolve() / "quickstart" / "sdtt"
    _link(home / "teacher", teacher["model_dir"])  # stable paths for serve_config.yaml
    _link(home / "student", distilled["students"]["1"])
    return rows, {"sdtt teacher": str(home / "teacher"), "sdtt student": str(home / "student")}


def long_context_stage(cfg: QuickstartConfig, tok_dir: str) -> tuple[list[tuple[str, str, str]], dict]:
    """Token weighting: long documents cut into sequences (prepare-long), a Llama trained at a short context,
    then extended 4x twice for the same steps: with uniform cross-entropy and with weighted cross-entropy
    (self scoring). Perplexity where the long context can help (targets past b) shows what it is for; the
    pass-key accuracy, short-context perplexity and extra scoring passes show what it costs or gives."""
    import numpy as np

    from distilray.config import EvalLongConfig, PrepareLongConfig, TrainLongConfig
    from distilray.pipelines import eval_long, prepare_long, train_long

    t0 = time.perf_counter()
    b, L = cfg.long_base_length, cfg.long_seq_len
    data = prepare_long.run(
        config_from(
            PrepareLongConfig,
            dataset=cfg.long_dataset,
            tokenizer=str(tok_dir),
            seq_len=L,
            max_sequences=cfg.long_max_sequences,
            artifacts_dir=cfg.artifacts_dir,
            seed=cfg.seed,
        )
    )["output_dir"]
    common = dict(data=data, artifacts_dir=cfg.artifacts_dir, seed=cfg.seed, num_workers=cfg.num_workers)
    start = train_long.run(
        config_from(
            TrainLongConfig,
            model=cfg.long_start_model,
            tokenizer=str(tok_dir),
            seq_len=b,
            steps=cfg.long_start_steps,
            batch_size=16,
            lr=1e-3,
            min_lr_ratio=0.1,
            warmup_steps=20,
            variant="uniform",
            base_length=b,
            eval_sequences=4,
            **common,
        )
    )
    runs = {}
    for variant in ("uniform", cfg.long_variant):
        runs[variant] = train_long.run(
            config_from(
                TrainLongConfig,
                init=start["model_dir"],
                seq_len=L,
                rope_theta=cfg.long_rope_theta,
                steps=cfg.long_steps,
                batch_size=4,
                lr=3e-4,
                warmup_steps=5,
                variant=variant,
                base_length=b,
                base_stride=(L - b) // (L // b),  # (1 - b/L) b: J = L/b window passes, the paper's ratio
                eval_sequences=4,
                **common,
            )
        )
    _, ids = prepare_long.read_long_split(data, "test")
    rows_ = ids[: cfg.long_eval_sequences].astype(np.int64)
    ecfg = config_from(
        EvalLongConfig,
        base_length=b,
        probe_distances=(L // 8, L // 4, L // 2),
        probes_per_distance=cfg.long_probes,
        short_context=b,
        short_tokens=8_000,
        seed=cfg.seed,
    )
    tokenizer = load_tokenizer(tok_dir)
    texts = [tokenizer.decode(r[1:].tolist()) for r in rows_]
    label, rows = "token weighting", []
    rows.append(
        (label, "start / extension", f"{cfg.long_start_model} at {b} tokens -> {L} (b={b}, {cfg.long_steps} steps)")
    )
    for variant, res in runs.items():
        f = eval_long.evaluate_model(ecfg, res["model_dir"], rows_, texts, None, None)
        name = "uniform CE" if variant == "uniform" else f"{variant} (self scoring)"
        rows.append(
            (label, f"{name}: ppl before / after b", f"{f['long_ppl_before_b']:.1f} / {f['long_ppl_after_b']:.1f}")
        )
        passkey = (
            f"{np.mean(list(f['passkey_acc'].values())):.2f} (chance {f['probe_chance']:.2f})"
            if f["passkey_acc"]
            else f"no probe fits {L} tokens"
        )
        rows.append(
            (
                label,
                f"{name}: pass-key acc / short ppl",
                f"{passkey} / {f['short_ppl']:.1f}",
            )
        )
        rows.append(
            (
                label,
                f"{name}: tokens/s, extra passes/step",
                f"{res['tokens_per_s']:.0f}, {res['extra_forward_passes_per_step']}",
            )
        )
    rows.append((label, "seconds", f"{time.perf_counter() - t0:.1f}"))
    return rows, {"long data": data, "long weighted model": runs[cfg.long_variant]["model_dir"]}
