"""CD-LM retrieval decoding as a Ray Serve application (reference/cdlm.md 3.5; DESIGN "Who uses it").

Two deployments:

- `DatastoreRouterDeployment` owns a `DatastoreRouter` (one shard actor per datastore file) and
  answers `query(entries (b,), queries (b, d))` and `stats()`.
- `TargetDeployment` is the app's HTTP ingress (FastAPI) and holds the generation model and its
  tokenizer: `POST /v1/completions` and `/v1/chat/completions` in the OpenAI shape plus a `distilray`
  block of decoding statistics (`stream: true` sends the text as server-sent events), `GET /healthz`,
  `GET /v1/models` and `GET /v1/datastore/stats`. Requests are validated into `RetrievalRequest`
  (serve_apps/schemas.py); bad ones get HTTP 400 with an OpenAI-style JSON error body. It checks at
  start that the datastore was built with the same tokenizer, and decodes every request in flight
  together; each step's lookups are one call to the router deployment
  (`handle.query.remote(...).result()`), or, with `datastore_placement=target`, a call into the
  datastore loaded in the replica itself (no router, no shard actors, no RPC per step: for a datastore
  that fits beside the model). Serve's proxy routes a request straight to a target replica.

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
from distilray.cdlm.local import LocalDatastore, QueryResult, merge_shard_answers
from distilray.errors import DistilrayError
from distilray.serve_apps import openai_api
from distilray.serve_apps.batching import BatchLoop, decode_text, hand_over_interval
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


api = openai_api.make_api(
    title="distilray CD-LM retrieval", description="OpenAI-style completions with chunk retrieval"
)


@serve.deployment(max_ongoing_requests=64)
@serve.ingress(api)
class TargetDeployment:
    """The generation model and the HTTP front in one replica: validates requests, tokenises, decodes
    every request in flight together (continuous batching, one batched datastore lookup per step:
    decoding/batched_retrieval.py), detokenises, and answers in the OpenAI shape, streamed or whole.
    Serve's proxy routes each request straight to a target replica (no ingress hop in between)."""

    def __init__(self, router: DeploymentHandle | None, args: dict[str, Any]) -> None:
        import torch

        from distilray.decoding.batched_retrieval import BatchRetrievalDecoder
        from distilray.decoding.drafter_api import model_vocab_size
        from distilray.models.causal_lm import load_causal_lm, max_context
        from distilray.models.quantize import apply_quantization
        from distilray.tokenizer import load_tokenizer

        self._args = parsed = RetrievalAppArgs.model_validate(args)
        torch.set_num_threads(max(1, int(parsed.num_cpus)))
        self._tokenizer = load_tokenizer(parsed.model)
        # fail before loading weights
        self._fingerprint = check_datastore_tokenizer(parsed.datastore, self._tokenizer)
        device = "cuda" if parsed.num_gpus > 0 else "cpu"
        self._model = apply_quantization(load_causal_lm(parsed.model, device=device), parsed.quantize)
        self._context, self._quantize = max_context(self._model), parsed.quantize
        # logits padded past the tokenizer (Pythia): those ids are never sampled
        width = model_vocab_size(self._model)
        self._limit = len(self._tokenizer) if len(self._tokenizer) < width else None
        self._router = router
        # no router: the datastore lives in this replica (datastore_placement=target)
        self._store = LocalDatastore(parsed.datastore, self._fingerprint) if router is None else None
        self._replica = serve.get_replica_context().replica_id.unique_id
        decoder = BatchRetrievalDecoder(
            self._model, self._lookup, parsed.max_batch_size, overlap=parsed.overlap_lookups
        )
        self._decoder, self._batch = decoder, BatchLoop(decoder, parsed.batch_wait_ms / 1000)

    # -- HTTP --------------------------------------------------------------------------------------

    @api.post("/v1/completions", openapi_extra=openai_api.request_schema(RetrievalRequest))
    async def completions(self, body: Any = Body(...)) -> Any:
        return await openai_api.answer_text(RetrievalRequest, body, self._args, self._run, chat=False)

    @api.post("/v1/chat/completions", openapi_extra=openai_api.request_schema(RetrievalChatRequest))
    async def chat_completions(self, body: Any = Body(...)) -> Any:
        return await openai_api.answer_text(RetrievalChatRequest, body, self._args, self._run, chat=True)

    @api.get("/healthz")
    async def healthz(self) -> Any:
        return await openai_api.health(self._info, served_model_name=self._args.served)

    @api.get("/v1/models")
    async def models(self) -> dict[str, Any]:
        return {"object": "list", "data": [openai_api.model_card(self._args.served)]}

    @api.get("/v1/datastore/stats")
    async def datastore_stats(self) -> Any:
        stats = self._router.stats.remote if self._router is not None else self._local_datastore_stats
        return await openai_api.or_unavailable(stats, "datastore unavailable")

    # -- decoding ----------------------------------------------------------------------------------

    def _lookup(self, entries: np.ndarray, queries: np.ndarray) -> list:
        """One step's lookups for every row that needs one: one call to the router, one scatter/gather to
        the shards (the batch thread blocks on it; with overlap_lookups it runs beside the target pass);
        or the datastore in this replica, without an RPC."""
        if self._store is not None:
            return self._store.query_batch(entries, queries)
        return self._router.query.remote(entries, queries).result(timeout_s=LOOKUP_TIMEOUT_S)

    async def _local_datastore_stats(self) -> dict[str, Any]:
        """What /v1/datastore/stats shows when the datastore lives in the target replicas."""
        manifest = self._store.manifest if self._store is not None else {}
        keep = ("num_shards", "num_keys", "num_chunks", "mean_chunk_length", "hidden_dim", "tokenizer_fingerprint")
        return {"placement": "target", "replica": self._replica, "manifest": {k: manifest.get(k) for k in keep}}

    async def _info(self) -> dict[str, Any]:
        calls = self._decoder.lookup_calls
        return {
            "context": self._context,
            "tokenizer_fingerprint": self._fingerprint,
            "device": str(next(self._model.parameters()).device),
            "quantize": self._quantize,
            "replica": self._replica,
            "batch": self._batch.stats(),
            "lookup_calls": calls,
            "mean_lookup_ms": 1000 * self._decoder.lookup_seconds / calls if calls else None,
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

    async def _run(self, job: TextJob, stream: bool = True) -> AsyncIterator[StreamItem]:
        try:
            prompt_ids, stop = self._prepare(job)
        except DistilrayError as exc:
            yield GenerationFailure(message=str(exc))
            return
        yield TextStart(prompt_tokens=len(prompt_ids))
        sampling = dataclasses.replace(job.sampling, eos_token_id=self._tokenizer.eos_token_id)
        text, start = TextStream(self._tokenizer, stop), time.perf_counter()
        options = {"method": job.method, "vocab_limit": self._limit}
        async for item in decode_text(
            self._batch,
            prompt_ids,
            sampling,
            options,
            text,
            interval_s=hand_over_interval(stream, stop, self._args.stream_interval_ms),
        ):
            if isinstance(item, (GenerationFailure, TextDelta)):
                yield item
                if isinstance(item, GenerationFailure):
                    return
                continue
            yield self._completion(item.record, text, len(prompt_ids), time.perf_counter() - start)

    def _completion(self, record, text: TextStream, prompt_tokens: int, seconds: float) -> Completion:
        eos = self._tokenizer.eos_token_id
        ids = text.ids
        stopped = text.stopped or (eos is not None and bool(ids) and ids[-1] == eos)
        stats = RetrievalStats(
            mode=record.mode,
            chunks_used=record.chunks_used,
            forward_passes=record.forward_passes,
            tokens_from_chunks=sum(record.from_chunk),
            steps=record.steps,
            lookups=record.lookups,
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


def build_app(args: dict) -> serve.Application:
    """Serve application builder: checks the tokenizer match up front, then binds the target (the app's
    HTTP ingress) and, with datastore_placement=shards, the router (and through it the shard actors)."""
    from distilray.tokenizer import load_tokenizer

    parsed = parse_args(args)
    fingerprint = check_datastore_tokenizer(parsed.datastore, load_tokenizer(parsed.model))
    router = None
    if parsed.datastore_placement == "shards":
        router = DatastoreRouterDeployment.bind(parsed.datastore, fingerprint)
    return TargetDeployment.options(ray_actor_options={"num_cpus": parsed.num_cpus, "num_gpus": parsed.num_gpus}).bind(
        router, parsed.model_dump()
    )


# `serve run distilray.serve_apps.retrieval:app` calls this with the CLI's key=value args (or none, then
# the environment supplies model and datastore).
app = build_app
