"""CD-LM retrieval decoding as a Ray Serve application (reference/cdlm.md 3.5; DESIGN "Who uses it").

Three deployments:

- `DatastoreRouterDeployment` owns a `DatastoreRouter` (one shard actor per datastore file) and
  answers `query(entries (b,), queries (b, d))` and `stats()`.
- `TargetDeployment` holds the generation model and its tokenizer, checks at start that the datastore
  was built with the same tokenizer, and runs `retrieval_generate`; each decoding step's lookup is a
  synchronous call to the router deployment (`handle.query.remote(...).result()`).
- `CompletionsIngress` (FastAPI) serves `POST /v1/completions` in the OpenAI completions shape plus a
  `distilray` block of decoding statistics, `GET /healthz`, `GET /v1/models` and
  `GET /v1/datastore/stats`. Requests are validated into `RetrievalRequest` (serve_apps/schemas.py); bad
  ones get HTTP 400 with an OpenAI-style JSON error body. The target gets typed parameters
  (`SamplingParams`, `RetrievalParams`) and answers a `Completion` or a `GenerationFailure`.

Run it:

    serve run distilray.serve_apps.retrieval:build_app model=PATH datastore=PATH [default_mode=verify]
    DISTILRAY_MODEL=PATH DISTILRAY_DATASTORE=PATH serve run distilray.serve_apps.retrieval:app

`app` is the builder itself (Serve calls an import path that names a one-argument function with the
args dict, empty when none are given); missing `model`/`datastore` args fall back to the environment.

No `from __future__ import annotations` here: FastAPI reads the endpoint annotations at runtime, and
inside a Serve ingress class postponed (string) annotations are not resolved, so a body model would be
taken for a query parameter.
"""

import asyncio
import dataclasses
import secrets
import threading
import time
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
from fastapi import Body
from ray import serve
from ray.serve.handle import DeploymentHandle

from distilray.actors.datastore import DatastoreRouter
from distilray.cdlm.datastore_files import read_manifest
from distilray.cdlm.local import QueryResult, merge_shard_answers
from distilray.decoding.retrieval import retrieval_decode
from distilray.errors import DistilrayError
from distilray.serve_apps import openai_api
from distilray.serve_apps.schemas import (
    Completion,
    GenerationFailure,
    RetrievalAppArgs,
    RetrievalChatRequest,
    RetrievalRequest,
    RetrievalStats,
    StreamItem,
    TextDelta,
    TextJob,
    TextStart,
)
from distilray.serve_apps.text_output import TextStream, render_prompt

ENV_MODEL = "DISTILRAY_MODEL"
ENV_DATASTORE = "DISTILRAY_DATASTORE"
LOOKUP_TIMEOUT_S = 60.0  # one datastore round trip; a shard restarting from disk fits well inside


def parse_args(args: dict[str, Any] | RetrievalAppArgs | None) -> RetrievalAppArgs:
    """Validate builder args; `model`/`datastore` default to $DISTILRAY_MODEL/$DISTILRAY_DATASTORE."""
    if isinstance(args, RetrievalAppArgs):
        return args
    env = {"model": ENV_MODEL, "datastore": ENV_DATASTORE}
    return openai_api.parse_app_args(RetrievalAppArgs, args, env, "retrieval")


def check_datastore_tokenizer(datastore: str, tokenizer) -> str:
    """The model's tokenizer fingerprint, after checking the datastore was built with the same one."""
    from distilray.tokenizer import vocab_fingerprint

    manifest = read_manifest(datastore)
    mine, built_with = vocab_fingerprint(tokenizer), str(manifest["tokenizer_fingerprint"])
    if mine != built_with:
        raise DistilrayError(
            f"datastore {datastore} was built with another tokenizer (fingerprint {built_with!r}) than "
            f"the model's (fingerprint {mine!r}): rebuild it with this model, or serve the model it was built for"
        )
    return mine


# -- deployments -----------------------------------------------------------------------------------


# No access log: this deployment is called once per decoding step, a log line per token would flood.
@serve.deployment(
    ray_actor_options={"num_cpus": 0}, max_ongoing_requests=256, logging_config={"enable_access_log": False}
)
class DatastoreRouterDeployment:
    """The sharded datastore behind one handle: a DatastoreRouter over one actor per shard file."""

    def __init__(self, datastore: str, tokenizer_fingerprint: str | None = None) -> None:
        self._router = DatastoreRouter.open(datastore, tokenizer_fingerprint)
        self._pool = ThreadPoolExecutor(max_workers=2, thread_name_prefix="datastore-stats")  # blocking stats()
        self._calls = self._queries = 0
        self._seconds = 0.0

    async def query(self, entries: np.ndarray, queries: np.ndarray) -> list[QueryResult]:
        """entries (b,) ints, queries (b, d) floats -> per query (chunk token ids | None, cosine).

        DatastoreRouter's scatter and merge, awaited on the replica's event loop instead of a blocking
        ray.get in a thread: one hop fewer on the per-step path.
        """
        start = time.perf_counter()
        size, batches, refs = self._router.scatter(entries, queries)
        out = merge_shard_answers(size, batches, await asyncio.gather(*refs))
        self._calls += 1  # the event loop is single-threaded: no lock needed
        self._queries += size
        self._seconds += time.perf_counter() - start
        return out

    async def stats(self) -> dict[str, Any]:
        """DatastoreRouter.stats() (manifest figures, per-shard counters) plus this replica's counters."""
        out = await asyncio.get_running_loop().run_in_executor(self._pool, self._router.stats)
        # names, never the server's paths: a client has no business knowing the filesystem
        out["folder"] = Path(out["folder"]).name
        for shard in out["shards"]:
            shard["path"] = Path(shard["path"]).name
        out["router"] = {
            "calls": self._calls,
            "queries": self._queries,
            "mean_call_ms": 1000 * self._seconds / self._calls if self._calls else None,
        }
        out["manifest"] = {k: v for k, v in self._router.manifest.items() if k not in ("shards", "keys_per_shard")}
        return out

    def __del__(self) -> None:
        router = getattr(self, "_router", None)
        if router is not None:
            router.close()


@serve.deployment(max_ongoing_requests=8)
class TargetDeployment:
    """The generation model: tokenises, runs retrieval decoding one request at a time, detokenises, and
    streams the text as tokens are emitted."""

    def __init__(
        self, model: str, datastore: str, router: DeploymentHandle, num_threads: int = 1, quantize: str = "none"
    ) -> None:
        import torch

        from distilray.decoding.drafter_api import model_vocab_size
        from distilray.models.causal_lm import load_causal_lm, max_context
        from distilray.models.quantize import apply_quantization
        from distilray.tokenizer import load_tokenizer

        torch.set_num_threads(max(1, int(num_threads)))
        self._tokenizer = load_tokenizer(model)
        self._fingerprint = check_datastore_tokenizer(datastore, self._tokenizer)  # fail before loading weights
        self._model = apply_quantization(load_causal_lm(model), quantize)
        self._context, self._quantize = max_context(self._model), quantize
        # logits padded past the tokenizer (Pythia): those ids are never sampled
        width = model_vocab_size(self._model)
        self._limit = len(self._tokenizer) if len(self._tokenizer) < width else None
        self._router = router
        self._replica = serve.get_replica_context().replica_id.unique_id
        # one generation at a time per replica: torch already uses the replica's CPUs; lookups block
        # on .result(), which must not run on the event loop
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="generate")

    async def info(self) -> dict[str, Any]:
        return {
            "context": self._context,
            "tokenizer_fingerprint": self._fingerprint,
            "device": str(next(self._model.parameters()).device),
            "quantize": self._quantize,
            "replica": self._replica,
        }

    def _prepare(self, job: TextJob) -> tuple[list[int], list[str]]:
        prompt, extra_stop = render_prompt(self._tokenizer, job.text_input)
        prompt_ids = list(self._tokenizer(prompt)["input_ids"])
        if not prompt_ids:
            raise DistilrayError("the prompt is empty after tokenisation")
        if len(prompt_ids) + job.sampling.max_new_tokens > self._context:
            raise DistilrayError(
                f"prompt ({len(prompt_ids)} tokens) + max_tokens ({job.sampling.max_new_tokens}) "
                f"exceeds the model's context of {self._context} tokens"
            )
        return prompt_ids, [*job.stop, *(s for s in extra_stop if not job.stop)]

    def _decode(self, prompt_ids: list[int], job: TextJob, on_token, stop_event: threading.Event):
        """Retrieval decoding on the pool's thread; `on_token` sees each token as it is emitted."""
        lookups, lookup_seconds = 0, 0.0

        def lookup(entry: int, hidden: np.ndarray):
            nonlocal lookups, lookup_seconds
            start = time.perf_counter()
            chunk, similarity = self._router.query.remote(
                np.array([entry], dtype=np.int64), hidden.reshape(1, -1)
            ).result(timeout_s=LOOKUP_TIMEOUT_S)[0]
            lookups += 1
            lookup_seconds += time.perf_counter() - start
            return None if chunk is None else (tuple(chunk), float(similarity))

        def emitted(token: int) -> None:
            if stop_event.is_set():
                raise _Stopped
            on_token(token)

        sampling = dataclasses.replace(job.sampling, eos_token_id=self._tokenizer.eos_token_id)
        try:
            record = retrieval_decode(
                self._model, prompt_ids, lookup, sampling, job.method, vocab_limit=self._limit, on_token=emitted
            )
        except _Stopped:
            record = None
        return record, lookups, lookup_seconds

    async def generate(self, job: TextJob) -> Completion | GenerationFailure:
        """One completion, or the failure the ingress answers with (400: the request)."""
        last: Any = None
        async for item in self._run(job):
            last = item
        return last

    async def stream(self, job: TextJob) -> AsyncIterator[StreamItem]:
        """TextStart (or a GenerationFailure, then nothing), a TextDelta per emitted token, then the
        Completion (or a GenerationFailure)."""
        async for item in self._run(job):
            yield item

    async def _run(self, job: TextJob) -> AsyncIterator[StreamItem]:
        try:
            prompt_ids, stop = self._prepare(job)
        except DistilrayError as exc:
            yield GenerationFailure(message=str(exc))
            return
        yield TextStart(prompt_tokens=len(prompt_ids))
        loop = asyncio.get_running_loop()
        tokens: asyncio.Queue = asyncio.Queue()
        stop_event = threading.Event()
        work = loop.run_in_executor(
            self._pool,
            self._decode,
            prompt_ids,
            job,
            lambda token: loop.call_soon_threadsafe(tokens.put_nowait, token),
            stop_event,
        )
        work.add_done_callback(lambda _: loop.call_soon_threadsafe(tokens.put_nowait, None))
        text = TextStream(self._tokenizer, stop)
        try:
            while (token := await tokens.get()) is not None:
                if delta := text.add([token]):
                    yield TextDelta(text=delta, tokens=1)
                if text.stopped:
                    stop_event.set()  # the stop string came: the decoder stops at its next token
            try:
                record, lookups, lookup_seconds = await work
            except DistilrayError as exc:
                yield GenerationFailure(message=str(exc))
                return
            if rest := text.rest():
                yield TextDelta(text=rest, tokens=0)
            yield self._completion(record, text, len(prompt_ids), lookups, lookup_seconds, job)
        finally:
            stop_event.set()  # a consumer that left (client disconnect) stops the decoding

    def _completion(self, record, text: TextStream, prompt_tokens: int, lookups: int, lookup_seconds: float, job):
        eos = self._tokenizer.eos_token_id
        ids = text.ids
        stopped = text.stopped or (eos is not None and bool(ids) and ids[-1] == eos)
        if record is None:  # stopped at a stop string: the counters are those of the emitted tokens
            from_chunks = steps = forward_passes = chunks_used = 0
            seconds, mode = 0.0, job.method.mode
        else:
            from_chunks, steps = sum(record.from_chunk), record.steps
            forward_passes, chunks_used, seconds, mode = (
                record.forward_passes,
                record.chunks_used,
                record.seconds,
                record.mode,
            )
        stats = RetrievalStats(
            mode=mode,
            chunks_used=chunks_used,
            forward_passes=forward_passes,
            tokens_from_chunks=from_chunks,
            steps=steps,
            lookups=lookups,
            lookup_seconds=lookup_seconds,
            seconds=seconds,
            replica=self._replica,
        )
        return Completion(
            text=text.text,
            finish_reason="stop" if stopped else "length",
            prompt_tokens=prompt_tokens,
            completion_tokens=text.completion_tokens(),
            stats=stats,
        )


class _Stopped(Exception):
    """Raised from the decoder's token hook when the stream's consumer went away or a stop string came."""


# -- HTTP ingress ----------------------------------------------------------------------------------


api = openai_api.make_api(
    title="distilray CD-LM retrieval", description="OpenAI-style completions with chunk retrieval"
)


@serve.deployment(ray_actor_options={"num_cpus": 0}, max_ongoing_requests=256)
@serve.ingress(api)
class CompletionsIngress:
    """HTTP front: validates requests, calls the target, shapes OpenAI-style responses (streamed or not)."""

    def __init__(self, target: DeploymentHandle, router: DeploymentHandle, args: dict[str, Any]) -> None:
        self._target = target
        self._streaming = target.options(stream=True)
        self._router = router
        self._args = RetrievalAppArgs.model_validate(args)

    @api.post("/v1/completions", openapi_extra=openai_api.request_schema(RetrievalRequest))
    async def completions(self, body: Any = Body(...)) -> Any:
        return await self._answer(RetrievalRequest, body, chat=False)

    @api.post("/v1/chat/completions", openapi_extra=openai_api.request_schema(RetrievalChatRequest))
    async def chat_completions(self, body: Any = Body(...)) -> Any:
        return await self._answer(RetrievalChatRequest, body, chat=True)

    async def _answer(self, kind: type[RetrievalRequest], body: Any, chat: bool) -> Any:
        start = time.perf_counter()
        req = openai_api.validate_request(kind, body, self._args)
        if not isinstance(req, RetrievalRequest):
            return req  # the 400
        job = TextJob(
            text_input=req.text_input(),
            sampling=req.sampling(seed=secrets.randbits(63)),  # unseeded sampling varies
            stop=req.stop,
            method=req.method(self._args),
        )
        if req.stream:
            return await openai_api.text_stream(self._streaming.stream.remote(job), self._args.served, start, chat)
        return await openai_api.completion(lambda: self._target.generate.remote(job), self._args.served, start, chat)

    @api.get("/healthz")
    async def healthz(self) -> Any:
        return await openai_api.health(self._target.info.remote, served_model_name=self._args.served)

    @api.get("/v1/models")
    async def models(self) -> dict[str, Any]:
        return {"object": "list", "data": [openai_api.model_card(self._args.served)]}

    @api.get("/v1/datastore/stats")
    async def datastore_stats(self) -> Any:
        return await openai_api.or_unavailable(self._router.stats.remote, "datastore unavailable")


def build_app(args: dict) -> serve.Application:
    """Serve application builder: checks the tokenizer match up front, then binds the three deployments."""
    from distilray.tokenizer import load_tokenizer

    parsed = parse_args(args)
    fingerprint = check_datastore_tokenizer(parsed.datastore, load_tokenizer(parsed.model))
    router = DatastoreRouterDeployment.bind(parsed.datastore, fingerprint)
    target = TargetDeployment.options(
        ray_actor_options={"num_cpus": parsed.num_cpus, "num_gpus": parsed.num_gpus}
    ).bind(parsed.model, parsed.datastore, router, max(1, int(parsed.num_cpus)), parsed.quantize)
    return CompletionsIngress.bind(target, router, parsed.model_dump())


# `serve run distilray.serve_apps.retrieval:app` calls this with the CLI's key=value args (or none, then
# the environment supplies model and datastore).
app = build_app
