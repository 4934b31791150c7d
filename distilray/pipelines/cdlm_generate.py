"""`distilray cdlm-generate`: CD-LM decoding against the sharded datastore actors (or, with
datastore_placement=local, the datastore loaded in this process), one JSON per prompt."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from distilray import corpus
from distilray.actors.cluster import ensure_ray
from distilray.actors.datastore import DatastoreRouter
from distilray.cdlm.local import LocalDatastore
from distilray.config import CDLMGenerateConfig
from distilray.decoding.retrieval import chunk_hit_rate, fps, mean_chunk_length, retrieval_generate
from distilray.errors import DistilrayError
from distilray.io_utils import atomic_write_json
from distilray.models.causal_lm import load_causal_lm
from distilray.models.quantize import apply_quantization
from distilray.tokenizer import encode_documents, load_tokenizer, vocab_fingerprint


def load_prompts(cfg: CDLMGenerateConfig, tokenizer) -> list[list[int]]:
    """Prompt token ids: from a JSON list of strings, or the first tokens of test-split passages."""
    if cfg.prompt_file:
        path = Path(cfg.prompt_file)
        if not path.is_file():
            raise DistilrayError(f"prompt file not found: {path}")
        try:
            texts = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise DistilrayError(f"prompt file {path} is not JSON: {e}") from None
        if not isinstance(texts, list) or not all(isinstance(t, str) for t in texts):
            raise DistilrayError(f"prompt file {path} must hold a JSON list of strings")
        return encode_documents(tokenizer, texts)
    docs = encode_documents(tokenizer, corpus.load_splits(cfg.corpus)["test"])
    prompts = [ids[: cfg.prompt_tokens] for ids in docs if len(ids) > cfg.prompt_tokens]
    if not prompts:
        raise DistilrayError(f"no test passage is longer than prompt_tokens={cfg.prompt_tokens}")
    return prompts[: cfg.num_prompts]


def run(cfg: CDLMGenerateConfig) -> dict:
    if not cfg.model:
        raise DistilrayError("cdlm-generate needs model=PATH (the generation model)")
    mode = "baseline" if cfg.gen_baseline_only else cfg.mode
    tokenizer = load_tokenizer(cfg.model)
    # int8 kernels are CPU only: a quantised model is loaded there in float32, then quantised
    model = load_causal_lm(cfg.model) if cfg.quantize == "none" else load_causal_lm(cfg.model, "cpu", torch.float32)
    model = apply_quantization(model, cfg.quantize)
    prompts = load_prompts(cfg, tokenizer)
    router = store = None
    if mode != "baseline" and cfg.datastore_placement == "local":
        store = LocalDatastore(cfg.datastore, vocab_fingerprint(tokenizer))
    elif mode != "baseline":
        ensure_ray()
        router = DatastoreRouter.open(cfg.datastore, vocab_fingerprint(tokenizer))
    save = Path(cfg.save_dir)
    records = []
    try:
        for i, prompt in enumerate(prompts):
            rec = retrieval_generate(
                model,
                prompt,
                cfg.max_new_tokens,
                router or store,
                mode=mode,
                similarity_threshold=cfg.similarity_threshold,
                temperature=cfg.temperature,
                seed=cfg.seed + i,
                eos_token_id=tokenizer.eos_token_id,
            )
            atomic_write_json(save / f"prompt_{i}.json", rec.to_json(tokenizer))
            records.append(rec)
    finally:
        if router is not None:
            router.close()
    tokens = sum(len(r.token_ids) for r in records)
    summary = {
        "save_dir": str(save.resolve()),
        "mode": mode,
        "quantize": cfg.quantize,
        "datastore_placement": cfg.datastore_placement,
        "prompts": len(records),
        "generated_tokens": tokens,
        "forward_passes": sum(r.forward_passes for r in records),
        "fps": fps(records),
        "chunk_hit_rate": chunk_hit_rate(records),
        "mean_chunk_length": mean_chunk_length(records),
        "seconds_per_token": sum(r.seconds for r in records) / max(1, tokens),
    }
    atomic_write_json(save / "summary.json", summary)
    return summary
