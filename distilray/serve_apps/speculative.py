"""Speculative decoding as a Ray Serve application (reference/speculative.md 2, 4, 6; DESIGN "Who uses it").

Deployments:

- `DrafterDeployment` (serve_apps/speculative_drafter.py), bound once per configured drafter name
  (any saved drafter folder: n-gram, CNN, LSTM, transformer). It keeps each generation's drafter state
  (token list, LSTM state, KV cache) in a bounded LRU of sessions, so a speculative step ships only the
  tokens that changed and gets g drafts back: ONE round trip per step, over a loopback socket when the
  target shares its node (a Serve handle call costs several times more, on every step).
- `TargetDeployment` is the app's HTTP ingress (FastAPI) and holds the target LM and tokenizer:
  `POST /v1/completions` and `/v1/chat/completions` (OpenAI shape, plus `gamma`, `drafter`,
  `adaptive_gamma`; the response adds a `distilray` block; `stream: true` sends the verified blocks as
  server-sent events, at most one per `stream_interval_ms`), `GET /healthz`, `GET /v1/models`,
  `GET /v1/stats`. Requests are validated into `SpeculativeRequest` (serve_apps/schemas.py); bad
  ones get HTTP 400 with an OpenAI-style JSON error body. Every request in flight decodes in one
  batch (serve_apps/batching.py), each row with a drafter in this process or a `RemoteDrafter` proxy
  that buffers start/push/rollback locally and sends them with the next `propose` call. The target's
  KV cache never leaves it. Serve's proxy routes a request straight to a target replica: there is no
  ingress deployment, so no extra hop per request or per streamed block.

What the composition costs is measured per request: `drafter_round_trips`, `round_trip_seconds`
(wall time the target waited on the drafter), `drafter_seconds` (compute inside the drafter) and
`composition_seconds` (their difference: serialisation, transport, scheduling), and `request_seconds`
(the whole request inside the replica, validation and detokenisation included). Prometheus counters
`distilray_spec_*` (requests, drafted/accepted/generated tokens, target passes) are tagged by drafter.

    serve run distilray.serve_apps.speculative:app target=PATH 'drafters={"ngram3": "PATH"}'
    DISTILRAY_TARGET=PATH DISTILRAY_DRAFTERS='{"ngram3": "PATH"}' serve run distilray.serve_apps.speculative:app

No `from __future__ import annotations`: FastAPI reads endpoint annotations at runtime and cannot
resolve postponed ones inside a Serve ingress class (see serve_apps/retrieval.py).
"""

import asyncio
import copy
import dataclasses
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import torch
from fastapi import Body
from ray import serve
from ray.serve.handle import DeploymentHandle

from distilray.decoding.sampling import SamplingParams
from distilray.errors import DistilrayError
from distilray.serve_apps import openai_api
from distilray.serve_apps.batching import BatchLoop, decode_text, hand_over_interval
from distilray.serve_apps.openai_api import finite_or_none
from distilray.serve_apps.schemas import (
    NO_DRAFTER,
    Completion,
    DrafterChannel,
    GenerationFailure,
    SpeculativeAppArgs,
    SpeculativeChatRequest,
    SpeculativeRequest,
    SpeculativeStats,
    StreamItem,
    TextDelta,
    TextJob,
    TextStart,
)
from distilray.serve_apps.speculative_drafter import (
    STEP_TIMEOUT_S,
    DrafterDeployment,
    RemoteDrafter,
    serve_calls,
    socket_calls,
)
from distilray.serve_apps.text_output import TextStream, render_prompt

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
    proposes over the same vocabulary (sized to the tokenizer or to the target's padded logits), and uses
    the same tokenizer where its folder holds one."""
    from transformers import AutoConfig

    from distilray.decoding.drafters import is_prompt_lookup
    from distilray.io_utils import read_json
    from distilray.models.drafters import drafter_kind
    from distilray.tokenizer import check_same_tokenizer, load_tokenizer

    try:
        config = AutoConfig.from_pretrained(args.target)
    except Exception as exc:
        raise DistilrayError(f"cannot read the target {args.target!r}: {str(exc).splitlines()[0]}") from None
    vocab = int(config.get_text_config().vocab_size)
    tokenizer = load_tokenizer(args.target)
    real = min(len(tokenizer), vocab)  # a target's logits may be padded past its tokenizer

    for name, folder in args.drafters.items():
        if is_prompt_lookup(folder):
            continue  # no folder: it proposes from the request's own tokens, over any vocabulary
        drafter_kind(folder)  # a clear error for a missing or foreign folder
        theirs = read_json(Path(folder) / "config.json").get("vocab_size")
        if not isinstance(theirs, int) or not real <= theirs <= vocab:
            raise DistilrayError(
                f"drafter {name!r} ({folder}) proposes over {theirs} tokens but the target "
                f"{args.target!r} has {vocab}: a drafter must use the target's tokenizer"
            )
        if any(Path(folder).glob("tokenizer*")):
            check_same_tokenizer(tokenizer, load_tokenizer(folder), f"drafter {name!r} and target")
    return vocab


# -- target side -------------------------------------------------------------------------------------


def _drafter_template(spec: str, quantize: str, vocab_size: int, device: str) -> Any:
    """A drafter loaded once in the target's process and warmed (lazy tables, kernels), to be copied per request."""
    from distilray.decoding.drafters import load_drafter
    from distilray.decoding.sampling import Sampler

    template = load_drafter(spec, device, quantize=quantize, vocab_size=vocab_size)
    template.start([0])
    template.propose(1, Sampler(SamplingParams(max_new_tokens=1)))
    return template


api = openai_api.make_api(title="distilray speculative decoding", description="OpenAI-style completions with drafters")


def local_drafter_specs(args: SpeculativeAppArgs) -> dict[str, str]:
    """The drafters that run inside each target replica: prompt lookup always (it has no weights),
    every drafter with drafter_placement=target."""
    from distilray.decoding.drafters import is_prompt_lookup

    in_target = args.drafter_placement == "target"
    return {name: spec for name, spec in args.drafters.items() if in_target or is_prompt_lookup(spec)}


@serve.deployment(max_ongoing_requests=64)
@serve.ingress(api)
class TargetDeployment:
    """The target LM and the HTTP front in one replica: validates requests, tokenises, decodes every
    request in flight together (continuous batching: serve_apps/batching.py), detokenises, and answers
    in the OpenAI shape, streamed as blocks are verified or whole. Serve's proxy routes each request straight to
    a target replica: no ingress deployment in between, so no second hop per request and per streamed
    block (the same reason Ray Serve LLM's direct streaming drops its ingress)."""

    def __init__(self, drafters: dict[str, DeploymentHandle], args: dict[str, Any]) -> None:
        import ray
        from ray.serve import metrics

        from distilray.decoding.batched import BatchDecoder
        from distilray.decoding.drafter_api import model_vocab_size
        from distilray.models.causal_lm import load_causal_lm, max_context
        from distilray.models.quantize import apply_quantization
        from distilray.tokenizer import load_tokenizer

        self._args = parsed = SpeculativeAppArgs.model_validate(args)
        device = "cuda" if parsed.num_gpus > 0 else "cpu"
        torch.set_num_threads(max(1, int(parsed.num_cpus)))
        self._tokenizer = load_tokenizer(parsed.target)
        self._model = apply_quantization(load_causal_lm(parsed.target, device=device), parsed.quantize)
        self._context, self._vocab = max_context(self._model), model_vocab_size(self._model)
        # logits padded past the tokenizer (Pythia, T5): those ids are masked, and drafters may be sized to it
        self._limit = len(self._tokenizer) if len(self._tokenizer) < self._vocab else None
        self._drafter_vocab: dict[str, int] = {}
        self._drafters, self._quantize = drafters, parsed.quantize
        # drafters run in this process (prompt lookup always; every drafter with drafter_placement=target):
        # one loaded template each, warmed once, shallow-copied per request (the copies share the weights)
        self._local_drafters = {
            name: _drafter_template(spec, parsed.quantize, self._vocab, device)
            for name, spec in local_drafter_specs(parsed).items()
        }
        self._transport, self._node_id = parsed.drafter_transport, ray.get_runtime_context().get_node_id()
        self._replica = serve.get_replica_context().replica_id.unique_id
        self._connections: dict[str, DrafterChannel] = {}  # drafter name -> DrafterDeployment.connect()
        # drafter name -> (transport, step, end), used by the batch thread only
        self._calls: dict[str, tuple[str, Any, Any]] = {}
        self._batch = BatchLoop(BatchDecoder(self._model, parsed.max_batch_size), parsed.batch_wait_ms / 1000)
        self._metrics = {
            key: metrics.Counter(
                f"distilray_spec_{key}",
                tag_keys=("drafter",),
                description=f"speculative decoding: {key.replace('_', ' ')}",
            )
            for key in METRICS
        }
        self._totals: dict[str, dict[str, int]] = {}

    # -- HTTP --------------------------------------------------------------------------------------

    @api.post("/v1/completions", openapi_extra=openai_api.request_schema(SpeculativeRequest))
    async def completions(self, body: Any = Body(...)) -> Any:
        return await openai_api.answer_text(SpeculativeRequest, body, self._args, self._run, chat=False)

    @api.post("/v1/chat/completions", openapi_extra=openai_api.request_schema(SpeculativeChatRequest))
    async def chat_completions(self, body: Any = Body(...)) -> Any:
        return await openai_api.answer_text(SpeculativeChatRequest, body, self._args, self._run, chat=True)

    @api.get("/healthz")
    async def healthz(self) -> Any:
        return await openai_api.health(self._info, served_model_name=self._args.served)

    @api.get("/v1/models")
    async def models(self) -> dict[str, Any]:
        rows = [openai_api.model_card(self._args.served, role="target")]
        rows += [openai_api.model_card(name, role="drafter") for name in self._args.drafters]
        return {"object": "list", "data": rows}

    @api.get("/v1/stats")
    async def stats(self) -> Any:
        """Totals per drafter (this target replica's view) and each drafter replica's session figures."""

        async def gather() -> dict[str, Any]:
            drafters = await asyncio.gather(*(h.info.remote() for h in self._drafters.values()))
            return {"totals": self._totals, "drafters": dict(zip(self._drafters, drafters))}

        return await openai_api.or_unavailable(gather, "stats unavailable")

    # -- decoding ----------------------------------------------------------------------------------

    async def _info(self) -> dict[str, Any]:
        return {
            "context": self._context,
            "vocab_size": self._vocab,
            "device": str(next(self._model.parameters()).device),
            "quantize": self._quantize,
            "drafters": [*self._drafters, *self._local_drafters],
            "replica": self._replica,
            "batch": self._batch.stats(),
        }

    async def _connect(self, drafter: str) -> GenerationFailure | None:
        """First use of a remote drafter: its vocabulary and channel, asked once per replica."""
        if drafter in self._connections:
            return None
        handle = self._drafters[drafter]
        info, connection = await asyncio.gather(handle.info.remote(), handle.connect.remote())
        if not (self._limit or self._vocab) <= int(info["vocab_size"]) <= self._vocab:
            return GenerationFailure(
                status=500,
                message=f"drafter {drafter!r} proposes over {info['vocab_size']} tokens but the target has "
                f"{self._vocab}: a drafter must use the target's tokenizer",
            )
        self._drafter_vocab[drafter] = int(info["vocab_size"])
        self._connections[drafter] = connection
        return None

    def _prepare(self, job: TextJob) -> tuple[list[int], SamplingParams, list[str]]:
        """Prompt ids, sampling with EOS, and the stop strings (a chat's template may add one)."""
        from distilray.models.causal_lm import check_prompt

        prompt, extra_stop = render_prompt(self._tokenizer, job.text_input)
        prompt_ids = [int(t) for t in self._tokenizer(prompt)["input_ids"]]
        check_prompt(self._model, prompt_ids, job.sampling.max_new_tokens)  # before any drafter session opens
        sampling = dataclasses.replace(job.sampling, eos_token_id=self._tokenizer.eos_token_id)
        return prompt_ids, sampling, [*job.stop, *(s for s in extra_stop if not job.stop)]

    def _drafter(self, name: str) -> tuple[Any, str | None]:
        """(the request's drafter, its transport): None for plain decoding, a drafter in this process, or
        a proxy of a drafter replica's session."""
        if name == NO_DRAFTER:
            return None, None
        if name in self._local_drafters:
            return copy.copy(self._local_drafters[name]), "local"
        transport = self._drafter_calls(name)[0]
        # the proxy resolves its calls when it first steps, on the batch thread
        return RemoteDrafter(
            lambda request: self._drafter_calls(name)[1](request),
            lambda session: self._drafter_calls(name)[2](session),
            self._drafter_vocab[name],
            reconnect=lambda: self._drafter_calls(name, True)[1:],
        ), transport

    async def _run(self, job: TextJob, stream: bool = True) -> AsyncIterator[StreamItem]:
        if job.drafter != NO_DRAFTER and job.drafter not in self._local_drafters:
            failure = await self._connect(job.drafter)
            if failure is not None:
                yield failure
                return
        try:
            prompt_ids, sampling, stop = self._prepare(job)
            drafter, transport = self._drafter(job.drafter)
        except DistilrayError as exc:
            yield GenerationFailure(message=str(exc))
            return
        yield TextStart(prompt_tokens=len(prompt_ids))
        text, start = TextStream(self._tokenizer, stop), time.perf_counter()
        options = {"drafter": drafter, "method": job.method, "vocab_limit": self._limit}
        close = drafter.close if isinstance(drafter, RemoteDrafter) else None
        async for item in decode_text(
            self._batch,
            prompt_ids,
            sampling,
            options,
            text,
            on_leave=close,
            interval_s=hand_over_interval(stream, stop, self._args.stream_interval_ms),
        ):
            if isinstance(item, GenerationFailure):
                yield item
                return
            if isinstance(item, TextDelta):
                yield item
                continue
            out = self._completion(job, item.record, text, len(prompt_ids), time.perf_counter() - start, drafter)
            self._count(job.drafter, out.stats)
            if transport is not None:
                out.stats.drafter_transport = transport
            yield out

    def _completion(
        self, job: TextJob, record: Any, text: TextStream, prompt_tokens: int, seconds: float, drafter: Any
    ) -> Completion:
        ids = record.token_ids
        eos = self._tokenizer.eos_token_id
        stopped = text.stopped or (eos is not None and bool(ids) and ids[-1] == eos)
        a, d = record.accepted, record.drafted
        stats = SpeculativeStats(
            drafter=job.drafter,
            gamma=None if drafter is None else job.method.gamma,
            adaptive_gamma=job.method.adaptive_gamma,
            drafted=d,
            accepted=a,
            rejections=record.rejections,
            target_passes=record.target_passes,
            generated_tokens=len(ids),
            mean_accepted_length=finite_or_none(record.mean_accepted_length),
            alpha=finite_or_none(record.alpha),
            draft_acceptance_rate=a / d if d else None,
            seconds=seconds,
            tokens_per_s=len(ids) / seconds if seconds > 0 else None,
            replica=self._replica,
        )
        if isinstance(drafter, RemoteDrafter):
            stats = stats.model_copy(
                update=dict(
                    drafter_round_trips=drafter.round_trips,
                    round_trip_seconds=drafter.round_trip_seconds,
                    drafter_seconds=drafter.drafter_seconds,
                    composition_seconds=drafter.round_trip_seconds - drafter.drafter_seconds,
                    session_restarts=drafter.restarts,
                )
            )
        return Completion(
            text=text.text,
            finish_reason="stop" if stopped else "length",
            prompt_tokens=prompt_tokens,
            completion_tokens=text.completion_tokens(),
            stats=stats,
        )

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


def build_app(args: dict) -> serve.Application:
    """Serve application builder: checks vocabularies up front, then binds one drafter deployment per
    drafter that runs in its own replica, and the target (the app's HTTP ingress)."""
    parsed = parse_args(args)
    check_vocabularies(parsed)
    local = local_drafter_specs(parsed)
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
            parsed.quantize,
        )
        for name, folder in parsed.drafters.items()
        if name not in local
    }
    # a fixed count only when asked: it would clash with an autoscaling_config from serve_config.yaml
    replicas = {"num_replicas": parsed.target_replicas} if parsed.target_replicas else {}
    return TargetDeployment.options(
        **replicas,
        ray_actor_options={"num_cpus": parsed.num_cpus, "num_gpus": parsed.num_gpus},
    ).bind(drafters, parsed.model_dump())


# `serve run distilray.serve_apps.speculative:app` calls this with the CLI's key=value args (or none, then
# the environment supplies target and drafters).
app = build_app
