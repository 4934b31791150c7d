"""`distilray bench cdlm`: CD-LM figures measured side by side in one run.

- scd: the generator's datastore from its own sampled answers to the prompts, then greedy
  generation for the same prompts: baseline vs `paper` mode (FPS, TTS, ROUGE-L vs baseline);
- verify: the same datastore in lossless `verify` mode (identical to baseline?, FPS);
- kcd.<domain>: a domain-tuned datastore model mines chunks from the domain's train split, keyed by
  the generator's hidden states; CD-LM perplexity on the domain test split beside the generator's
  own, with g_phi chosen on the validation split;
- extract: Ray Data extraction tokens/s over a bare single-process loop (same model, one actor);
- datastore: single-query latency through the router over 2 shard actors (synthetic keys).

The generator is the quickstart's target trained `generator_steps` steps, or a user's (`model=PATH`:
any causal LM folder saved with save_pretrained, with its tokenizer; every part above runs on it, KCD
fine-tuning it into each domain's datastore model, so `kcd_domains=[]` skips that on a large model).
`sweep=true` (or `sweep_only=true`) adds SCD and verify against generator size (bench/cdlm_sweep.py).
"""

from __future__ import annotations

import dataclasses
import multiprocessing
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from distilray import corpus
from distilray.actors.datastore import DatastoreRouter
from distilray.bench.targets import user_model, vocab_limit_of
from distilray.cdlm.build import datastore_from_sequences
from distilray.cdlm.datastore_files import write_synthetic_datastore
from distilray.cdlm.evaluate import perplexities, sequence_proposals
from distilray.cdlm.extraction import score_windows
from distilray.cdlm.local import LocalDatastore
from distilray.config import (
    BenchCDLMConfig,
    BuildDatastoreConfig,
    CDLMPerplexityConfig,
    CorpusSpec,
    ExtractConfig,
    QuickstartConfig,
    TrainLMConfig,
    config_from,
)
from distilray.decoding.retrieval import chunk_hit_rate, fps, mean_chunk_length, retrieval_generate, tts
from distilray.eval.mauve import mauve, mean_hidden_features
from distilray.eval.rouge import rouge_l
from distilray.models.causal_lm import count_parameters, load_causal_lm
from distilray.models.quantize import apply_quantization
from distilray.pipelines import build_datastore, extract, train_lm, train_tokenizer
from distilray.pipelines.cdlm_ppl import test_sequences
from distilray.pipelines.quickstart import lm_config
from distilray.tokenizer import encode_documents, load_tokenizer, vocab_fingerprint

GOALS = {
    "scd.fps": 0.45,
    "scd.tts": 0.30,
    "scd.rouge_l_vs_baseline": 0.8,
    "kcd.ppl_reduction": 0.30,
    "verify.fps": 0.2,
    "extract.ratio_vs_bare": 0.85,
    "datastore.p99_ms": 5.0,
}


def _prompts(cfg: BenchCDLMConfig, tokenizer) -> list[list[int]]:
    """Prompts cut from the test split, one every prompt + answer length, so none overlaps another."""
    spec = CorpusSpec(dataset=cfg.eval_data) if cfg.eval_data else CorpusSpec()
    step = cfg.prompt_tokens + cfg.max_new_tokens
    prompts = [
        d[i : i + cfg.prompt_tokens]
        for d in encode_documents(tokenizer, corpus.load_splits(spec)["test"])
        for i in range(0, len(d) - step, step)
    ]
    return prompts[: cfg.prompts]


def bench_scd_and_verify(
    cfg: BenchCDLMConfig, model, tokenizer, work: Path, vocab_limit: int | None = None
) -> tuple[dict, dict]:
    """vocab_limit: the tokenizer's length when the generator's logits are padded past it."""
    prompts = _prompts(cfg, tokenizer)
    answers = []
    for i, prompt in enumerate(prompts):  # the datastore text: the model's own sampled answers
        for k in range(cfg.scd_samples):
            rec = retrieval_generate(
                model,
                prompt,
                cfg.max_new_tokens,
                None,
                mode="baseline",
                temperature=cfg.scd_temperature,
                seed=cfg.seed + 1000 * i + k,
                vocab_limit=vocab_limit,
            )
            answers.append(list(prompt) + rec.token_ids)
    manifest = datastore_from_sequences(
        model, answers, cfg.tok_prob_threshold, work / "scd_datastore", 2, vocab_fingerprint(tokenizer)
    )
    eos = tokenizer.eos_token_id

    def run(mode, lookup):
        return [
            retrieval_generate(
                model,
                p,
                cfg.max_new_tokens,
                lookup,
                mode=mode,
                similarity_threshold=cfg.similarity_threshold,
                eos_token_id=eos,
                vocab_limit=vocab_limit,
            )
            for p in prompts
        ]

    with DatastoreRouter.open(work / "scd_datastore", vocab_fingerprint(tokenizer)) as router:
        run("baseline", None)  # warm-up: caches, allocator, actor connections
        base, paper, verify = run("baseline", None), run("paper", router), run("verify", router)
    local = LocalDatastore(work / "scd_datastore")  # the same datastore in this process: no round trip
    paper_local = run("paper", local)
    rouge = float(np.mean([rouge_l(b.token_ids, p.token_ids) for b, p in zip(base, paper)]))
    scd = {
        "prompts": len(prompts),
        "datastore_keys": int(manifest["num_keys"]),
        "datastore_chunks": int(manifest["num_chunks"]),
        "similarity_threshold": cfg.similarity_threshold,
        "sampling_temperature": cfg.scd_temperature,
        "fps": fps(paper),
        "tts": tts(base, paper),
        "rouge_l_vs_baseline": rouge,
        "chunk_hit_rate": chunk_hit_rate(paper),
        "mean_chunk_length": mean_chunk_length(paper),
        "seconds_per_token_baseline": sum(r.seconds for r in base) / sum(len(r.token_ids) for r in base),
        "seconds_per_token_cdlm": sum(r.seconds for r in paper) / sum(len(r.token_ids) for r in paper),
        "lookups_via": "2 datastore shard actors through the router (one Ray call per decoding step)",
        "colocated": {
            "tts": tts(base, paper_local),
            "fps": fps(paper_local),
            "lookups_via": "the same datastore loaded in the decoding process",
        },
    }
    same = [b.token_ids == v.token_ids for b, v in zip(base, verify)]
    ver = {
        "identical_to_baseline": all(same),
        "identical_prompts": int(sum(same)),
        "prompts": len(same),
        "fps": fps(verify),
        "tts": tts(base, verify),
    }
    return scd, ver


ECD_NAMES = [
    "Alice Moreau",
    "Bruno Keller",
    "Chen Wei",
    "Dana Okafor",
    "Emil Novak",
    "Farah Haddad",
    "Goran Petrov",
    "Hana Sato",
    "Ivan Rossi",
    "Julia Berg",
    "Kofi Mensah",
    "Lena Fischer",
    "Marco Silva",
    "Nadia Costa",
    "Omar Aziz",
    "Paula Lind",
]


def bench_ecd(cfg: BenchCDLMConfig, model, tokenizer, work: Path, vocab_limit: int | None = None) -> dict:
    """Expert chunk distillation: facts the model has never seen, injected only through a datastore
    built from curated text; accuracy = generations that contain the right value."""
    rng = np.random.default_rng(cfg.seed)
    facts = {name: str(rng.integers(1000, 10000)) for name in ECD_NAMES}
    texts = [f"The badge number of {name} is {code}." for name, code in facts.items()]
    seqs = encode_documents(tokenizer, texts)
    # curated text is trusted as it is: every token counts as confident (threshold near 0)
    datastore_from_sequences(model, seqs, 1e-6, work / "ecd_datastore", 2, vocab_fingerprint(tokenizer))
    store = LocalDatastore(work / "ecd_datastore")
    prompts = {
        "exact": "The badge number of {} is",
        "paraphrase": "Q: What badge number does {} have? A: The badge number is",
    }
    out: dict = {"facts": len(facts)}
    for kind, template in prompts.items():
        ids = encode_documents(tokenizer, [template.format(n) for n in facts])
        for mode, lookup in (("base", None), ("cdlm", store)):
            hits = 0
            for p, code in zip(ids, facts.values()):
                rec = retrieval_generate(
                    model,
                    p,
                    8,
                    lookup,
                    mode="paper" if lookup else "baseline",
                    similarity_threshold=cfg.similarity_threshold,
                    vocab_limit=vocab_limit,
                )
                hits += code in tokenizer.decode(rec.token_ids)
            out[f"{kind}.{mode}_accuracy"] = hits / len(facts)
    return out


def bench_kcd(cfg: BenchCDLMConfig, domain: str, gen_dir: str, model, tokenizer, work: Path) -> dict:
    spec = CorpusSpec(dataset=domain)
    tuned = train_lm.run(
        config_from(
            TrainLMConfig,
            corpus=spec,
            model=gen_dir,
            steps=cfg.kcd_finetune_steps,
            lr=3e-4,
            warmup_steps=10,
            seq_len=128,
            batch_size=16,
            checkpoint_every=cfg.kcd_finetune_steps,
            artifacts_dir=cfg.artifacts_dir,
            seed=cfg.seed,
        )
    )
    # one extraction folder per (generator, datastore model) pair: a resumed run must not mix them
    ext_dir = (
        Path(cfg.artifacts_dir)
        / "bench_cdlm"
        / f"extract-{domain}-{Path(gen_dir).parent.name}-{Path(tuned['model_dir']).parent.name}"
    )
    extract.run(
        ExtractConfig(
            model=gen_dir,
            datastore_model=tuned["model_dir"],
            corpus=spec,
            window=cfg.kcd_window,
            stride=cfg.kcd_stride,
            min_length=32,
            max_windows=cfg.kcd_max_windows,
            output_dir=str(ext_dir),
        )
    )
    ds_dir = work / f"kcd-{domain}"
    stats = build_datastore.run(
        BuildDatastoreConfig(
            extract_dir=str(ext_dir / "train"),
            tok_prob_threshold=cfg.tok_prob_threshold,
            num_shards=2,
            output_dir=str(ds_dir),
        )
    )
    with DatastoreRouter.open(ds_dir, vocab_fingerprint(tokenizer)) as router:

        def proposals(split):
            seqs = test_sequences(
                CDLMPerplexityConfig(corpus=spec, split=split, seq_len=cfg.kcd_window, num_sequences=cfg.kcd_sequences),
                tokenizer,
                cfg.kcd_window,
            )
            return [sequence_proposals(model, s, router.query_batch) for s in seqs]

        val, test = proposals("validation"), proposals("test")
        quality = _kcd_generation_quality(cfg, spec, model, tokenizer, router)
    by_q = {q: perplexities(val, q)["ppl_cdlm"] for q in cfg.q_funcs}
    chosen = min(by_q, key=by_q.get)  # g_phi calibrated on held-out text, then applied to test
    result = perplexities(test, chosen)
    return {
        "ppl_base": result["ppl_base"],
        "ppl_cdlm": result["ppl_cdlm"],
        "reduction": 1 - result["ppl_cdlm"] / result["ppl_base"],
        "q_func": chosen,
        "validation_ppl_cdlm_by_q_func": by_q,
        "test_tokens": result["tokens"],
        "exact_match_proposals": result["exact_match_proposals"],
        "datastore_keys": stats["keys"],
        "datastore_chunks": stats["chunks"],
        "datastore_model": tuned["model_dir"],
        "datastore_model_steps": tuned["steps"],
        **quality,
    }


def _kcd_generation_quality(
    cfg: BenchCDLMConfig, spec: CorpusSpec, model, tokenizer, router, n: int = 40, length: int = 32
) -> dict:
    """MAUVE of greedy continuations (baseline and paper mode) against the test split's own continuations.

    Features are the generator's mean last-layer hidden states (the paper uses GPT-2 large's); with
    40 texts per side the figure is coarse: compare the two modes, not absolute values.
    """
    docs = encode_documents(tokenizer, corpus.load_splits(spec)["test"])
    pairs = [
        (d[i : i + cfg.prompt_tokens], d[i + cfg.prompt_tokens : i + cfg.prompt_tokens + length])
        for d in docs
        for i in range(0, len(d) - cfg.prompt_tokens - length, cfg.prompt_tokens + length)
    ][:n]
    refs = [c for _, c in pairs]
    out = {}
    for mode, lookup in (("baseline", None), ("paper", router)):
        gens = [
            retrieval_generate(
                model, p, length, lookup, mode=mode, similarity_threshold=cfg.similarity_threshold
            ).token_ids
            for p, _ in pairs
        ]
        out[f"mauve_{mode}"] = mauve(
            mean_hidden_features(model, refs), mean_hidden_features(model, gens), seed=cfg.seed
        )
    out["mauve_texts"] = len(pairs)
    return out


def _bare_extract(model_dir: str, windows: list[tuple[int, ...]], batch_size: int, threads: int) -> float:
    """Seconds for model load + the same scoring passes, in this (fresh) process."""
    torch.set_num_threads(threads)
    start = time.perf_counter()
    model = load_causal_lm(model_dir)
    for i in range(0, len(windows), batch_size):
        score_windows(windows[i : i + batch_size], model)
    return time.perf_counter() - start


def bench_extract(cfg: BenchCDLMConfig, gen_dir: str, work: Path) -> dict:
    import ray

    ecfg = ExtractConfig(
        model=gen_dir,
        window=256,
        stride=224,
        min_length=32,
        max_windows=cfg.extract_windows,
        windows_per_shard=16,
        output_dir=str(work / "extract"),
    )
    windows, _ = extract.plan_windows(ecfg)
    tokens = sum(len(w.tokens) for w in windows)
    cpus = int(ray.cluster_resources().get("CPU", 1))
    with multiprocessing.get_context("spawn").Pool(1) as pool:
        bare_s = pool.apply(_bare_extract, (gen_dir, [w.tokens for w in windows], ecfg.batch_size, cpus))
    out = work / "extract" / "train"
    out.mkdir(parents=True)
    shards = [windows[i : i + ecfg.windows_per_shard] for i in range(0, len(windows), ecfg.windows_per_shard)]
    start = time.perf_counter()  # Ray Data planning, actor start and model load count, as the bare loop's load does
    extract.run_actor_pool(ecfg, out, shards, list(range(len(shards))))
    ray_s = time.perf_counter() - start
    return {
        "tokens": tokens,
        "windows": len(windows),
        "actors": 1,
        "bare_tokens_per_s": tokens / bare_s,
        "ray_tokens_per_s": tokens / ray_s,
        "ratio_vs_bare": bare_s / ray_s,
    }


def bench_datastore(cfg: BenchCDLMConfig, work: Path) -> dict:
    folder = work / "synthetic"
    manifest = write_synthetic_datastore(folder, cfg.datastore_keys, cfg.datastore_dim, 4096, 2, cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    entries = rng.integers(0, 4096, size=cfg.datastore_queries)
    queries = rng.standard_normal((cfg.datastore_queries, cfg.datastore_dim)).astype(np.float32)
    with DatastoreRouter.open(folder) as router:
        for i in range(50):
            router.lookup(int(entries[i]), queries[i])
        times = []
        for e, q in zip(entries, queries):
            t0 = time.perf_counter()
            router.lookup(int(e), q)
            times.append((time.perf_counter() - t0) * 1000)
    return {
        "keys": int(manifest["num_keys"]),
        "shards": 2,
        "hidden_dim": cfg.datastore_dim,
        "synthetic_keys": True,
        "queries": len(times),
        "p50_ms": float(np.percentile(times, 50)),
        "p99_ms": float(np.percentile(times, 99)),
    }


def generator(cfg: BenchCDLMConfig) -> tuple[str, dict]:
    """The generator's folder and what the results say of it: a user's (`model=`), or the quickstart's
    target trained `generator_steps` steps (cached)."""
    if cfg.model:
        gen_dir, _ = user_model(cfg.model)
        return gen_dir, {"generator_user": True}
    q = dataclasses.replace(QuickstartConfig(), artifacts_dir=cfg.artifacts_dir)
    tok_dir = train_tokenizer.get_or_train(q.corpus, q.vocab_size, q.artifacts_dir)
    # the quickstart's target, trained longer: SCD needs a model confident enough to repeat itself
    target = train_lm.run(lm_config(q, q.target_model, cfg.generator_steps, tok_dir))
    about = {"generator_steps": target["steps"], "generator_val_ppl": target["val_ppl"]}
    return target["model_dir"], about


def bench_generator(cfg: BenchCDLMConfig) -> dict:
    gen_dir, about = generator(cfg)
    tokenizer = load_tokenizer(gen_dir)
    # int8 (a CPU fast path) quantises the generator that decodes, mines and scores; extraction stays float32
    model = load_causal_lm(gen_dir) if cfg.quantize == "none" else load_causal_lm(gen_dir, "cpu", torch.float32)
    parameters = count_parameters(model)
    limit = vocab_limit_of(model, tokenizer)
    model = apply_quantization(model, cfg.quantize)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # one-token decoding steps of a small model run faster on one thread
    results: dict = {
        "generator": gen_dir,
        "generator_parameters": parameters,
        **about,
        "quantize": cfg.quantize,
        "vocab_limit": limit,
    }
    with tempfile.TemporaryDirectory(prefix="distilray-bench-cdlm-") as tmp:
        work = Path(tmp)
        print("[bench cdlm] SCD and verify ...", flush=True)
        results["scd"], results["verify"] = bench_scd_and_verify(cfg, model, tokenizer, work, limit)
        print("[bench cdlm] ECD ...", flush=True)
        results["ecd"] = bench_ecd(cfg, model, tokenizer, work, limit)
        results["kcd"] = {}
        for domain in cfg.kcd_domains:
            print(f"[bench cdlm] KCD on {domain} ...", flush=True)
            results["kcd"][domain] = bench_kcd(cfg, domain, gen_dir, model, tokenizer, work)
        torch.set_num_threads(threads)
        print("[bench cdlm] extraction vs bare loop ...", flush=True)
        results["extract"] = bench_extract(cfg, gen_dir, work)
        print("[bench cdlm] datastore latency ...", flush=True)
        results["datastore"] = bench_datastore(cfg, work)
    results["goals"] = _goals(results)
    return results


def _goals(r: dict) -> dict:
    g = {
        "scd.fps": (r["scd"]["fps"], r["scd"]["fps"] >= GOALS["scd.fps"]),
        "scd.tts": (r["scd"]["tts"], r["scd"]["tts"] >= GOALS["scd.tts"]),
        "scd.rouge_l_vs_baseline": (
            r["scd"]["rouge_l_vs_baseline"],
            r["scd"]["rouge_l_vs_baseline"] >= GOALS["scd.rouge_l_vs_baseline"],
        ),
        "verify.identical_to_baseline": (r["verify"]["identical_to_baseline"], r["verify"]["identical_to_baseline"]),
        "verify.fps": (r["verify"]["fps"], r["verify"]["fps"] > GOALS["verify.fps"]),
        "extract.ratio_vs_bare": (
            r["extract"]["ratio_vs_bare"],
            r["extract"]["ratio_vs_bare"] >= GOALS["extract.ratio_vs_bare"],
        ),
        "datastore.p99_ms": (r["datastore"]["p99_ms"], r["datastore"]["p99_ms"] < GOALS["datastore.p99_ms"]),
    }
    for domain, k in r["kcd"].items():
        g[f"kcd.{domain}.reduction"] = (k["reduction"], k["reduction"] >= GOALS["kcd.ppl_reduction"])
    return {name: {"value": v, "met": bool(met)} for name, (v, met) in g.items()}


def generator_lines(r: dict) -> list[str]:
    """The table of one generator: the quickstart's, or a user's (`model=`)."""
    about = f"{r['generator_parameters']:,} params, quantize {r.get('quantize', 'none')}"
    if r.get("vocab_limit"):
        about += f", vocab_limit {r['vocab_limit']}"
    if r.get("generator_user"):
        about += ", a user's model"
    lines = [
        f"bench cdlm: generator {r['generator']} ({about})",
        f"{'figure':<34}{'value':>12}  goal",
    ]
    for name, g in r["goals"].items():
        v = g["value"]
        shown = f"{v:.3f}" if isinstance(v, float) else str(v)
        lines.append(f"{name:<34}{shown:>12}  {'met' if g['met'] else 'NOT met'}")
    for domain, k in r["kcd"].items():
        lines.append(
            f"kcd.{domain}: ppl {k['ppl_base']:.2f} -> {k['ppl_cdlm']:.2f} ({k['q_func']}); "
            f"MAUVE baseline {k['mauve_baseline']:.3f}, paper {k['mauve_paper']:.3f} ({k['mauve_texts']} texts)"
        )
    d = r["datastore"]
    e = r["ecd"]
    lines.append(
        f"ecd injection ({e['facts']} facts), paraphrased prompts: "
        f"{e['paraphrase.base_accuracy']:.2f} -> {e['paraphrase.cdlm_accuracy']:.2f}; sanity check, exact prompts "
        f"(the stored sentence's own prefix: its key matches at cosine 1 by construction): "
        f"{e['exact.base_accuracy']:.2f} -> {e['exact.cdlm_accuracy']:.2f}"
    )
    lines.append(
        f"scd with the datastore in-process (no actor round trip): TTS {r['scd']['colocated']['tts']:.3f}, "
        f"FPS {r['scd']['colocated']['fps']:.3f}"
    )
    lines.append(
        f"datastore: {d['keys']:,} synthetic keys, 2 shard actors: p50 {d['p50_ms']:.2f} ms, p99 {d['p99_ms']:.2f} ms"
    )
    return lines
