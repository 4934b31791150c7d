"""One client, served against in process, side by side (`bench serve`'s goal "one client >= 0.9x").

Each prompt is decoded in this process (the same target, the same drafter, greedy, torch on one
thread as the replica has) and through every served config, one request at a time, the order rotated
per prompt: a noisy moment of a shared machine lands on every side alike, so the ratios hold where two
separate timings would not (the same in-process figure measured minutes apart varied 255-319 tok/s).
"""

from __future__ import annotations

import time
from typing import Any

import requests

from distilray.config import BenchServeConfig

REQUEST_TIMEOUT_S = 120.0


class InProcessDecoder:
    """The served speculative decoding, in this process: target and drafter loaded as the replica loads them."""

    def __init__(self, paths: dict[str, str], cfg: BenchServeConfig) -> None:
        import torch

        from distilray.decoding.drafters import load_drafter
        from distilray.models.causal_lm import load_causal_lm
        from distilray.models.quantize import apply_quantization
        from distilray.tokenizer import load_tokenizer

        self._cfg = cfg
        self.tokenizer = load_tokenizer(paths["target"])
        self._target = apply_quantization(load_causal_lm(paths["target"], "cpu", torch.float32), cfg.quantize)
        self._drafter = load_drafter(paths["ngram"], quantize=cfg.quantize)

    def __call__(self, prompt: str) -> tuple[str, int]:
        """(text, tokens) of one greedy request, tokenised and detokenised as the endpoint does."""
        import torch

        from distilray.decoding.speculative import speculative_generate

        before = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            ids = self.tokenizer(prompt)["input_ids"]
            record = speculative_generate(
                self._target,
                self._drafter,
                ids,
                self._cfg.max_tokens,
                gamma=self._cfg.gamma,
                eos_token_id=self.tokenizer.eos_token_id,
            )
            return self.tokenizer.decode(record.token_ids, skip_special_tokens=True), len(record.token_ids)
        finally:
            torch.set_num_threads(before)

    def batched_tokens_per_s(self, prompts: list[str], rows: int, speculative: bool) -> float:
        """Tokens/s of `rows` requests decoded together by the replica's BatchDecoder, in this process:
        what batching can give at most here, before any HTTP."""
        import copy

        import torch

        from distilray.decoding.batched import BatchDecoder
        from distilray.decoding.sampling import SamplingParams
        from distilray.decoding.speculative import SpeculativeParams

        before = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            decoder, tokens = BatchDecoder(self._target, rows), 0
            start = time.perf_counter()
            for i, prompt in enumerate(prompts[:rows]):
                decoder.add(
                    str(i),
                    self.tokenizer(prompt)["input_ids"],
                    SamplingParams(max_new_tokens=self._cfg.max_tokens, eos_token_id=self.tokenizer.eos_token_id),
                    drafter=copy.copy(self._drafter) if speculative else None,
                    method=SpeculativeParams(gamma=self._cfg.gamma),
                )
            while decoder.active:
                tokens += sum(len(event.new_tokens) for event in decoder.step())
            return tokens / (time.perf_counter() - start)
        finally:
            torch.set_num_threads(before)


def batching_ceiling(decode: InProcessDecoder, prompts: list[str], rows: int, rounds: int = 3) -> dict[str, float]:
    """In process, `rows` requests decoded together over one alone (tokens/s), plain and speculative,
    alternating, best of `rounds`: the most the served 8-client goal could show on this machine."""
    out = {}
    for kind, speculative in (("plain", False), ("speculative", True)):
        best = {1: 0.0, rows: 0.0}
        for _ in range(rounds):
            for n in best:
                best[n] = max(best[n], decode.batched_tokens_per_s(prompts, n, speculative))
        out[kind] = best[rows] / best[1]
    return out


def one_client_side_by_side(
    served: dict[str, tuple[str, dict[str, Any]]],
    paths: dict[str, str],
    prompts: list[str],
    cfg: BenchServeConfig,
    rounds: int = 2,
) -> dict[str, Any]:
    """`served`: config name -> (app URL, request fields). Returns tokens/s in process and per config,
    each config's ratio to in process, and whether every served text equals the in-process one."""
    decode = InProcessDecoder(paths, cfg)
    session = requests.Session()  # one kept-alive connection, as one client has
    body = {"model": "bench", "max_tokens": cfg.max_tokens, "temperature": 0}

    def ask(url: str, fields: dict[str, Any], prompt: str) -> tuple[str, int]:
        r = session.post(f"{url}/v1/completions", json={**body, **fields, "prompt": prompt}, timeout=REQUEST_TIMEOUT_S)
        r.raise_for_status()
        data = r.json()
        return data["choices"][0]["text"], data["usage"]["completion_tokens"]

    sides: dict[str, Any] = {"in_process": decode}
    sides |= {name: (lambda p, u=url, f=fields: ask(u, f, p)) for name, (url, fields) in served.items()}
    tokens, seconds = dict.fromkeys(sides, 0), dict.fromkeys(sides, 0.0)
    for side in sides.values():  # warm-up: kernels, lazy tables, the replica's first request
        side(prompts[0])
    same = True
    names = list(sides)
    for r in range(rounds):
        for i, prompt in enumerate(prompts):
            shift = (r * len(prompts) + i) % len(names)
            texts = {}
            for name in names[shift:] + names[:shift]:
                start = time.perf_counter()
                texts[name], n = sides[name](prompt)
                seconds[name] += time.perf_counter() - start
                tokens[name] += n
            same = same and len(set(texts.values())) == 1
    rate = {name: tokens[name] / seconds[name] for name in names}
    return {
        "in_process_tokens_per_s": rate["in_process"],
        "served_tokens_per_s": {n: rate[n] for n in served},
        "ratio_vs_in_process": {n: rate[n] / rate["in_process"] for n in served},
        "requests_per_side": rounds * len(prompts),
        "same_text": same,
        "batching_ceiling": batching_ceiling(decode, prompts, cfg.max_batch_size),
    }
