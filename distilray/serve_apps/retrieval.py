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
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
from fastapi import Body
from ray import serve
from ray.serve.handle import DeploymentHandle

from distilray.actors.datastore import DatastoreRouter
from distilray.cdlm.datastore_files import read_manifest
from distilray.cdlm.local import QueryResult, merge_shard_answers
from distilray.decoding.retrieval import RetrievalParams, retrieval_decode
from distilray.decoding.sampling import SamplingParams
from distilray.errors import DistilrayError
from distilray.serve_apps import openai_api
from distilray.serve_apps.schemas import (
    Completion,
    GenerationFailure,
    RetrievalAppArgs,
    RetrievalRequest,
    RetrievalStats,
)

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
    """The generation model: tokenises, runs retrieval decoding one request at a time, decodes."""

    def __init__(self, model: str, datastore: str, router: DeploymentHandle, num_threads: int = 1) -> None:
        import torch

        from distilray.models.causal_lm import load_causal_lm, max_context
        from distilray.tokenizer import load_tokenizer

        torch.set_num_threads(max(1, int(num_threads)))
        self._tokenizer = load_tokenizer(model)
        self._fingerprint = check_datastore_tokenizer(datastore, self._tokenizer)  # fail before loading weights
        self._model = load_causal_lm(model)
        self._context = max_context(self._model)
        self._router = router
        self._name = model
        # one generation at a time per replica: torch already uses the replica's CPUs; lookups block
        # on .result(), which must not run on the event loop
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="generate")

    async def info(self) -> dict[str, Any]:
        return {
            "model": self._name,
            "context": self._context,
            "tokenizer_fingerprint": self._fingerprint,
            "device": str(next(self._model.parameters()).device),
        }

    def _generate(self, prompt: str, sampling: SamplingParams, method: RetrievalParams) -> Completion:
        prompt_ids = list(self._tokenizer(prompt)["input_ids"])
        if not prompt_ids:
            raise DistilrayError("the prompt is empty after tokenisation")
        if len(prompt_ids) + sampling.max_new_tokens > self._context:
            raise DistilrayError(
                f"prompt ({len(prompt_ids)} tokens) + max_tokens ({sampling.max_new_tokens}) "
                f"exceeds the model's context of {self._context} tokens"
            )
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

        eos = self._tokenizer.eos_token_id
        record = retrieval_decode(
            self._model, prompt_ids, lookup, dataclasses.replace(sampling, eos_token_id=eos), method
        )
        stopped = eos is not None and bool(record.token_ids) and record.token_ids[-1] == eos
        stats = RetrievalStats(
            mode=record.mode,
            chunks_used=record.chunks_used,
            forward_passes=record.forward_passes,
            tokens_from_chunks=sum(record.from_chunk),
            steps=record.steps,
            lookups=lookups,
            lookup_seconds=lookup_seconds,
            seconds=record.seconds,
        )
        return Completion(
            text=self._tokenizer.decode(record.token_ids, skip_special_tokens=True),
            finish_reason="stop" if stopped else "length",
            prompt_tokens=len(prompt_ids),
            completion_tokens=len(record.token_ids),
            stats=stats,
        )

    async def generate(
        self, prompt: str, sampling: SamplingParams, method: RetrievalParams
    ) -> Completion | GenerationFailure:
        """One completion, or the failure the ingress answers with a 400."""
        loop = asyncio.get_running_loop()
        try:
            return await loop.run_in_executor(self._pool, self._generate, prompt, sampling, method)
        except DistilrayError as exc:
            return GenerationFailure(message=str(exc))


# -- HTTP ingress ----------------------------------------------------------------------------------


api = openai_api.make_api(
    title="distilray CD-LM retrieval", description="OpenAI-style completions with chunk retrieval"
)


@serve.deployment(ray_actor_options={"num_cpus": 0}, max_ongoing_requests=64)
@serve.ingress(api)
class CompletionsIngress:
    """HTTP front: validates requests, calls the target, shapes OpenAI-style responses."""

    def __init__(self, target: DeploymentHandle, router: DeploymentHandle, args: dict[str, Any]) -> None:
        self._target = target
        self._router = router
        self._args = RetrievalAppArgs.model_validate(args)

    @api.post("/v1/completions", openapi_extra=openai_api.request_schema(RetrievalRequest))
    async def completions(self, body: Any = Body(...)) -> Any:
        req = openai_api.validate_request(RetrievalRequest, body, self._args)
        if not isinstance(req, RetrievalRequest):
            return req  # the 400
        return await openai_api.completion(
            lambda: self._target.generate.remote(req.prompt, req.sampling(seed=0), req.method(self._args)),
            req.model or self._args.model,
        )

    @api.get("/healthz")
    async def healthz(self) -> Any:
        return await openai_api.health(self._target.info.remote, datastore=self._args.datastore)

    @api.get("/v1/models")
    async def models(self) -> dict[str, Any]:
        return {"object": "list", "data": [openai_api.model_card(self._args.model)]}

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
    ).bind(parsed.model, parsed.datastore, router, max(1, int(parsed.num_cpus)))
    return CompletionsIngress.bind(target, router, parsed.model_dump())


# `serve run distilray.serve_apps.retrieval:app` calls this with the CLI's key=value args (or none, then
# the environment supplies model and datastore).
app = build_app
