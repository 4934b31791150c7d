"""Speculative decoding as a Ray Serve application (reference/speculative.md 2, 4, 6; DESIGN "Who uses it").

Deployments:

- `DrafterDeployment` (serve_apps/speculative_drafter.py), bound once per configured drafter name
  (any saved drafter folder: n-gram, CNN, LSTM, transformer). It keeps each generation's drafter state
  (token list, LSTM state, KV cache) in a bounded LRU of sessions, so a speculative step ships only the
  tokens that changed and gets g drafts back: ONE round trip per step, over a loopback socket when the
  target shares its node (a Serve handle call costs several times more, on every step).
- `TargetDeployment` holds the target LM and tokenizer and runs `speculative_generate` with a
  `RemoteDrafter` proxy that buffers start/push/rollback locally and sends them with the next
  `propose` call (or `plain_generate` for drafter "none"). The target's KV cache never leaves it.
- `CompletionsIngress` (FastAPI): `POST /v1/completions` (OpenAI shape, plus `gamma`, `drafter`,
  `adaptive_gamma`; the response adds a `distilray` block), `GET /healthz`, `GET /v1/models`,
  `GET /v1/stats`. Requests are validated into `SpeculativeRequest` (serve_apps/schemas.py); bad ones get
  HTTP 400 with an OpenAI-style JSON error body. The ingress hands the target typed parameters
  (`SamplingParams`, `SpeculativeParams`) and gets a `Completion` or `GenerationFailure` back.

What the composition costs is measured per request: `drafter_round_trips`, `round_trip_seconds`
(wall time the target waited on the drafter), `drafter_seconds` (compute inside the drafter) and
`composition_seconds` (their difference: serialisation, transport, scheduling), and at the ingress
`request_seconds` (the whole request, hops included). Prometheus counters `distilray_spec_*` (requests,
drafted/accepted/generated tokens, target passes) are tagged by drafter.

    serve run distilray.serve_apps.speculative:app target=PATH 'drafters={"ngram3": "PATH"}'
    DISTILRAY_TARGET=PATH DISTILRAY_DRAFTERS='{"ngram3": "PATH"}' serve run distilray.serve_apps.speculative:app

No `from __future__ import annotations`: FastAPI reads endpoint annotations at runtime and cannot
resolve postponed ones inside a Serve ingress class (see serve_apps/retrieval.py).
"""

import asyncio
import dataclasses
import secrets
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch
from fastapi import Body
from ray import serve
from ray.serve.handle import DeploymentHandle

from distilray.decoding.sampling import SamplingParams
from distilray.decoding.speculative import SpeculativeParams, plain_decode, speculative_decode
from distilray.errors import DistilrayError
from distilray.serve_apps import openai_api
from distilray.serve_apps.openai_api import finite_or_none
from distilray.serve_apps.schemas import (
    NO_DRAFTER,
    Completion,
    DrafterChannel,
    GenerationFailure,
    SpeculativeAppArgs,
    SpeculativeRequest,
    SpeculativeStats,
)
from distilray.serve_apps.speculative_drafter import (
    STEP_TIMEOUT_S,
    DrafterDeployment,
    RemoteDrafter,
    serve_calls,
    socket_calls,
)

ENV_TARGET = "DISTILRAY_TARGET"
ENV_DRAFTERS = "DISTILRAY_DRAFTERS"
METRICS = ("requests", "drafted_tokens", "accepted_tokens", "target_passes", "generated_tokens")


def parse_args(args: dict[str, Any] | SpeculativeAppArgs | None) -> SpeculativeAppArgs:
    """Validate builder args; `target`/`drafters` default to $DISTILRAY_TARGET/$DISTILRAY_DRAFTERS."""
    if isinstance(args, SpeculativeAppArgs):
        return args
    env = {"target": ENV_TARGET, "drafters": ENV_DRAFTERS}
    return openai_api.parse_app_args(SpeculativeAppArgs, args, env, "speculative")


def check_vocabularies(args: SpeculativeAppArgs) -> int:
    """The target's vocabulary size, after checking from config files (no weights) that every drafter
    proposes over the same vocabulary, and uses the same tokenizer where its folder holds one."""
    from transformers import AutoConfig

    from distilray.io_utils import read_json
    from distilray.models.drafters import drafter_kind
    from distilray.tokenizer import check_same_tokenizer, load_tokenizer

    try:
        config = AutoConfig.from_pretrained(args.target)
    except Exception as exc:
        raise DistilrayError(f"cannot read the target {args.target!r}: {str(exc).splitlines()[0]}") from None
    vocab = int(config.get_text_config().vocab_size)
    tokenizer = None
    for name, folder in args.drafters.items():
        drafter_kind(folder)  # a clear error for a missing or foreign folder
        theirs = read_json(Path(folder) / "config.json").get("vocab_size")
        if theirs != vocab:
            raise DistilrayError(
                f"drafter {name!r} ({folder}) proposes over {theirs} tokens but the target "
                f"{args.target!r} has {vocab}: a drafter must use the target's tokenizer"
            )
        if any(Path(folder).glob("tokenizer*")):
            tokenizer = tokenizer or load_tokenizer(args.target)
            check_same_tokenizer(tokenizer, load_tokenizer(folder), f"drafter {name!r} and target")
    return vocab


# -- target side -------------------------------------------------------------------------------------


@serve.deployment(max_ongoing_requests=8)
class TargetDeployment:
    """The target LM: tokenises, decodes one request at a time (speculative or plain), detokenises."""

    def __init__(
        self,
        target: str,
        drafters: dict[str, DeploymentHandle],
        num_threads: int = 1,
        device: str = "cpu",
        transport: str = "auto",
    ) -> None:
        import ray
        from ray.serve import metrics

        from distilray.decoding.drafter_api import model_vocab_size
        from distilray.models.causal_lm import load_causal_lm, max_context
        from distilray.tokenizer import load_tokenizer

        torch.set_num_threads(max(1, int(num_threads)))
        self._tokenizer = load_tokenizer(target)
        self._model = load_causal_lm(target, device=device)
        self._context, self._vocab = max_context(self._model), model_vocab_size(self._model)
        self._name, self._drafters = target, drafters
        self._transport, self._node_id = transport, ray.get_runtime_context().get_node_id()
        self._connections: dict[str, DrafterChannel] = {}  # drafter name -> DrafterDeployment.connect()
        # drafter name -> (transport, step, end), used by the generate thread only
        self._calls: dict[str, tuple[str, Any, Any]] = {}
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="generate")  # blocks on drafter calls
        self._metrics = {
            key: metrics.Counter(
                f"distilray_spec_{key}",
                tag_keys=("drafter",),
                description=f"speculative decoding: {key.replace('_', ' ')}",
            )
            for key in METRICS
        }
        self._totals: dict[str, dict[str, int]] = {}

    async def info(self) -> dict[str, Any]:
        return {
            "target": self._name,
            "context": self._context,
            "vocab_size": self._vocab,
            "device": str(next(self._model.parameters()).device),
            "drafters": list(self._drafters),
        }

    async def totals(self) -> dict[str, dict[str, int]]:
        return self._totals

    async def generate(
        self, prompt: str, sampling: SamplingParams, method: SpeculativeParams, drafter: str, stop: list[str]
    ) -> Completion | GenerationFailure:
        """One completion, or the failure to answer with (400: the request, 500: the deployment)."""
        if drafter != NO_DRAFTER and drafter not in self._connections:
            # first use: Serve calls for the drafter's vocabulary and channel; this replica sticks to them
            handle = self._drafters[drafter]
            info, connection = await asyncio.gather(handle.info.remote(), handle.connect.remote())
            if int(info["vocab_size"]) != self._vocab:
                return GenerationFailure(
                    status=500,
                    message=f"drafter {drafter!r} proposes over {info['vocab_size']} "
                    f"tokens but the target has {self._vocab}: a drafter must use the target's "
                    "tokenizer",
                )
            self._connections[drafter] = connection
        loop = asyncio.get_running_loop()
        try:
            out = await loop.run_in_executor(self._pool, self._generate, prompt, sampling, method, drafter, stop)
        except DistilrayError as exc:
            return GenerationFailure(message=str(exc))
        self._count(drafter, out.stats)
        return out

    def _drafter_calls(self, drafter: str, fresh: bool = False) -> tuple[str, Any, Any]:
        """(transport, step, end) for a drafter; `fresh` asks its deployment again (replica replaced)."""
        if fresh:
            self._connections[drafter] = self._drafters[drafter].connect.remote().result(timeout_s=STEP_TIMEOUT_S)
        if fresh or drafter not in self._calls:
            conn = self._connections[drafter]
            calls = None
            if self._transport == "auto" and conn.node_id == self._node_id:
                try:
                    calls = ("socket", *socket_calls(conn.port, conn.token))
                except OSError:  # e.g. another network namespace: the Serve path still works
                    calls = None
            self._calls[drafter] = calls or ("serve", *serve_calls(self._drafters[drafter]))
        return self._calls[drafter]

    def _generate(
        self, prompt: str, sampling: SamplingParams, method: SpeculativeParams, drafter: str, stop: list[str]
    ) -> Completion:
        from distilray.models.causal_lm import check_prompt

        prompt_ids = [int(t) for t in self._tokenizer(prompt)["input_ids"]]
        check_prompt(self._model, prompt_ids, sampling.max_new_tokens)  # before any drafter session is opened
        eos = self._tokenizer.eos_token_id
        sampling = dataclasses.replace(sampling, eos_token_id=eos)
        proxy = None
        if drafter == NO_DRAFTER:
            record = plain_decode(self._model, prompt_ids, sampling)
        else:
            transport, step, end = self._drafter_calls(drafter)
            proxy = RemoteDrafter(step, end, self._vocab, reconnect=lambda: self._drafter_calls(drafter, True)[1:])
            try:
                record = speculative_decode(self._model, proxy, prompt_ids, sampling, method)
            finally:
                proxy.close()
        ids = record.token_ids
        text, n_tokens, stopped = self._cut_at_stop(ids, stop)
        stopped = stopped or (eos is not None and bool(ids) and ids[-1] == eos)
        a, d = record.accepted, record.drafted
        stats = SpeculativeStats(
            drafter=drafter,
            gamma=None if proxy is None else method.gamma,
            adaptive_gamma=method.adaptive_gamma,
            drafted=d,
            accepted=a,
            rejections=record.rejections,
            target_passes=record.target_passes,
            generated_tokens=len(ids),
            mean_accepted_length=finite_or_none(record.mean_accepted_length),
            alpha=finite_or_none(record.alpha),
            draft_acceptance_rate=a / d if d else None,
            seconds=record.seconds,
            tokens_per_s=len(ids) / record.seconds if record.seconds > 0 else None,
        )
        if proxy is not None:
            stats = stats.model_copy(
                update=dict(
                    drafter_round_trips=proxy.round_trips,
                    round_trip_seconds=proxy.round_trip_seconds,
                    drafter_seconds=proxy.drafter_seconds,
                    composition_seconds=proxy.round_trip_seconds - proxy.drafter_seconds,
                    session_restarts=proxy.restarts,
                    drafter_transport=transport,
                )
            )
        return Completion(
            text=text,
            finish_reason="stop" if stopped else "length",
            prompt_tokens=len(prompt_ids),
            completion_tokens=n_tokens,
            stats=stats,
        )

    def _cut_at_stop(self, ids: list[int], stop: list[str]) -> tuple[str, int, bool]:
        """(text, its token count, stopped): the text ends before the first stop string (OpenAI `stop`).

        Decoding runs to the budget or EOS first: the lossless decoder has no stop-string hook.
        """
        decode = self._tokenizer.decode
        text = decode(ids, skip_special_tokens=True)
        cuts = [text.find(s) for s in stop if s in text]
        if not cuts:
            return text, len(ids), False
        cut = min(cuts)
        n = next(i for i in range(len(ids) + 1) if len(decode(ids[:i], skip_special_tokens=True)) >= cut)
        return text[:cut], n, True

    def _count(self, drafter: str, stats: SpeculativeStats) -> None:
        values = {
            "requests": 1,
            "drafted_tokens": stats.drafted,
            "accepted_tokens": stats.accepted,
            "target_passes": stats.target_passes,
            "generated_tokens": stats.generated_tokens,
        }
        mine = self._totals.setdefault(drafter, dict.fromkeys(METRICS, 0))
        for key, value in values.items():
            mine[key] += value
            if value > 0:  # a Ray counter refuses increments <= 0
                self._metrics[key].inc(value, tags={"drafter": drafter})


# -- HTTP ingress ------------------------------------------------------------------------------------


api = openai_api.make_api(title="distilray speculative decoding", description="OpenAI-style completions with drafters")


@serve.deployment(ray_actor_options={"num_cpus": 0}, max_ongoing_requests=64)
@serve.ingress(api)
class CompletionsIngress:
    """HTTP front: validates requests, calls the target, shapes OpenAI-style responses."""

    def __init__(self, target: DeploymentHandle, drafters: dict[str, DeploymentHandle], args: dict[str, Any]) -> None:
        self._target, self._drafters = target, drafters
        self._args = SpeculativeAppArgs.model_validate(args)

    @api.post("/v1/completions", openapi_extra=openai_api.request_schema(SpeculativeRequest))
    async def completions(self, body: Any = Body(...)) -> Any:
        start = time.perf_counter()
        req = openai_api.validate_request(SpeculativeRequest, body, self._args)
        if not isinstance(req, SpeculativeRequest):
            return req  # the 400
        sampling = req.sampling(seed=secrets.randbits(63))  # unseeded sampling varies
        return await openai_api.completion(
            lambda: self._target.generate.remote(
                req.prompt, sampling, req.method(self._args), req.drafter_name(self._args), req.stop
            ),
            req.model or self._args.target,
            start,
        )

    @api.get("/healthz")
    async def healthz(self) -> Any:
        return await openai_api.health(self._target.info.remote)

    @api.get("/v1/models")
    async def models(self) -> dict[str, Any]:
        rows = [openai_api.model_card(self._args.target, role="target")]
        rows += [
            openai_api.model_card(name, role="drafter", folder=folder) for name, folder in self._args.drafters.items()
        ]
        return {"object": "list", "data": rows}

    @api.get("/v1/stats")
    async def stats(self) -> Any:
        """Totals per drafter (one target replica's view) and each drafter replica's session figures."""

        async def gather() -> dict[str, Any]:
            drafters = await asyncio.gather(*(h.info.remote() for h in self._drafters.values()))
            return {"totals": await self._target.totals.remote(), "drafters": dict(zip(self._drafters, drafters))}

        return await openai_api.or_unavailable(gather, "stats unavailable")


def build_app(args: dict) -> serve.Application:
    """Serve application builder: checks vocabularies up front, then binds one drafter deployment per
    configured drafter, the target and the ingress."""
    parsed = parse_args(args)
    check_vocabularies(parsed)
    drafters = {
        name: DrafterDeployment.options(
            name=f"Drafter-{name}",
            ray_actor_options={"num_cpus": parsed.drafter_num_cpus, "num_gpus": parsed.drafter_num_gpus},
        ).bind(
            name,
            folder,
            parsed.max_sessions,
            max(1, int(parsed.drafter_num_cpus)),
            "cuda" if parsed.drafter_num_gpus > 0 else "cpu",
        )
        for name, folder in parsed.drafters.items()
    }
    target = TargetDeployment.options(
        ray_actor_options={"num_cpus": parsed.num_cpus, "num_gpus": parsed.num_gpus}
    ).bind(
        parsed.target,
        drafters,
        max(1, int(parsed.num_cpus)),
        "cuda" if parsed.num_gpus > 0 else "cpu",
        parsed.drafter_transport,
    )
    return CompletionsIngress.bind(target, drafters, parsed.model_dump())


# `serve run distilray.serve_apps.speculative:app` calls this with the CLI's key=value args (or none, then
# the environment supplies target and drafters).
app = build_app
