"""CD-LM's time saving through the Serve endpoint against the same decoding in this process.

TTS (time-to-solution saving, reference/cdlm.md) = 1 - (seconds per token in `paper` mode) / (seconds
per token in `baseline` mode), measured twice with the same model and the same datastore folder:

- in process: `retrieval_generate` with the datastore loaded here (`LocalDatastore`, no RPC), torch on
  one thread as in the replica;
- served: one client, one request at a time, `mode` baseline then paper, through each CD-LM app given
  (tokenising, ingress -> target hop, the batched decoder, and one `BatchLookup` call a step: to the
  router deployment and its shard actors, or into the datastore held by the target replica).

Per prompt the four runs alternate their order, so drift falls on every side alike. Goal (issue
"Serving at load"): served TTS >= 0.9x the in-process TTS; a ratio means something only while the
in-process TTS is positive, and the report says so when it is not.
"""

from __future__ import annotations

import functools
import time
from typing import Any

import requests

REQUEST_TIMEOUT_S = 300
MODES = ("baseline", "paper")


def cdlm_tts(
    urls: dict[str, str],
    paths: dict[str, str],
    prompts: list[str],
    max_tokens: int,
    quantize: str,
    similarity_threshold: float,
    served_model_name: str = "bench",
) -> dict[str, Any]:
    """{in_process, <served app>...}: per mode seconds per token, TTS and the paper mode's FPS; and per
    served app its TTS / the in-process TTS (`ratio_vs_in_process`, None while the in-process TTS is not
    positive). `urls`: a name for each CD-LM app (its datastore placement, say) -> its base URL."""
    import torch

    from distilray.cdlm.local import LocalDatastore
    from distilray.decoding.retrieval import fps, retrieval_generate
    from distilray.models.causal_lm import load_causal_lm
    from distilray.models.quantize import apply_quantization
    from distilray.tokenizer import load_tokenizer, vocab_fingerprint

    tokenizer = load_tokenizer(paths["target"])
    model = apply_quantization(load_causal_lm(paths["target"], "cpu", torch.float32), quantize)
    store = LocalDatastore(paths["datastore"], vocab_fingerprint(tokenizer))
    sides: dict[str, dict[str, dict[str, float]]] = {
        side: {m: {"seconds": 0.0, "tokens": 0, "records": []} for m in MODES} for side in ("in_process", *urls)
    }
    session = requests.Session()

    def local(prompt: str, mode: str) -> None:
        ids = tokenizer(prompt)["input_ids"]
        rec = retrieval_generate(
            model, ids, max_tokens, store.lookup, mode=mode, similarity_threshold=similarity_threshold,
            eos_token_id=tokenizer.eos_token_id,
        )  # fmt: skip
        side = sides["in_process"][mode]
        side["seconds"] += rec.seconds
        side["tokens"] += len(rec.token_ids)
        side["records"].append(rec)

    def served(name: str, prompt: str, mode: str) -> None:
        body = {
            "model": served_model_name, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "mode": mode,
            "similarity_threshold": similarity_threshold,
        }  # fmt: skip
        start = time.perf_counter()
        r = session.post(f"{urls[name]}/v1/completions", json=body, timeout=REQUEST_TIMEOUT_S)
        seconds = time.perf_counter() - start
        if r.status_code != 200:
            raise RuntimeError(f"the CD-LM app {name} answered {r.status_code}: {r.text[:300]}")
        data = r.json()
        side = sides[name][mode]
        side["seconds"] += seconds
        side["tokens"] += data["usage"]["completion_tokens"]
        side["records"].append((data["distilray"]["forward_passes"], data["usage"]["completion_tokens"]))

    before = torch.get_num_threads()
    torch.set_num_threads(1)  # as the target replica
    try:
        runs = [(local, m) for m in MODES] + [(functools.partial(served, n), m) for n in urls for m in MODES]
        for f, mode in runs:  # warm-up: kernels, the store's index, the replicas' first request
            f(prompts[0], mode)
        for side in sides.values():
            for m in MODES:
                side[m].update(seconds=0.0, tokens=0, records=[])
        for i, prompt in enumerate(prompts):
            for f, mode in runs if i % 2 == 0 else runs[::-1]:
                f(prompt, mode)
    finally:
        torch.set_num_threads(before)
        session.close()
    out: dict[str, Any] = {
        "prompts": len(prompts),
        "max_tokens": max_tokens,
        "similarity_threshold": similarity_threshold,
    }
    for name, side in sides.items():
        spt = {m: side[m]["seconds"] / max(1, side[m]["tokens"]) for m in MODES}
        paper = side["paper"]["records"]
        out[name] = {
            **{f"{m}_seconds_per_token": spt[m] for m in MODES},
            "tts": 1.0 - spt["paper"] / spt["baseline"],
            "paper_fps": fps(paper) if name == "in_process" else _served_fps(paper),
        }
    tts_local = out["in_process"]["tts"]
    for name in urls:
        out[name]["ratio_vs_in_process"] = out[name]["tts"] / tts_local if tts_local > 0 else None
    return out


def _served_fps(passes_and_tokens: list[tuple[int, int]]) -> float:
    """FPS from the app's answers: 1 - forward passes / generated tokens, over all requests."""
    return 1.0 - sum(p for p, _ in passes_and_tokens) / max(1, sum(t for _, t in passes_and_tokens))
