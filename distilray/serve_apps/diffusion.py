"""A masked diffusion LM (MDLM teacher or SDTT student) as a Ray Serve application (issue 9, item 6).

Two deployments:

- `DiffusionDeployment` loads the model (its EMA weights) and tokenizer once and runs the ancestral
  sampler of decoding/mdlm.py, one request at a time per replica. `generate` answers a
  `DiffusionCompletion`; `stream` is an async generator (called through `handle.options(stream=True)`)
  that yields each denoising step as the sampler takes it.
- `CompletionsIngress` (FastAPI) serves `POST /v1/completions` in the OpenAI completions shape plus a
  `distilray` block (num_steps, nfe, seconds, tokens_per_s, prompt_tokens, token_ids), `GET /healthz`
  and `GET /v1/models`. Requests are validated into `DiffusionRequest` (serve_apps/diffusion_schemas.py): bad
  ones, and unknown fields, get HTTP 400 with the OpenAI error body naming the field.

What a request means for a diffusion LM:

- The sample is always the model's whole block of seq_len positions, denoised together. A prompt is
  written as [bos] + its tokens over the first positions (the block convention of train-mdlm) and
  held there at every step; the rest is generated. No prompt: unconditional, all seq_len positions
  sampled. A prompt must leave at least one position to sample.
- `choices[0].text` is the generated part after the prompt (special tokens dropped: eos inside a block
  separates documents, as in training). `max_tokens` only cuts that text to its first max_tokens
  tokens; sampling costs the same. finish_reason is always "length".
- `num_steps` (default: the app's default_num_steps, at most max_num_steps), `temperature` (> 0,
  divides the logits), `seed` (same seed, same sample, streamed or not), `n` = 1.

`stream: true` answers `text/event-stream`: one `data: {json}` event per denoising step, then the final
completion, then `data: [DONE]`. Every event is an OpenAI completion chunk, so an OpenAI client still
reads the final text: step events carry an empty `choices[0].text` and the denoising state in
`distilray` (`event: "step"`, step, num_steps, t, the positions this step revealed with their
token_ids, masked, and `text`: the generated part so far with MASK_PLACEHOLDER at masked positions;
the last step also lists what the final noise removal revealed). The final event is the non-streaming
body (`distilray.event: "final"`). Streaming is incremental end to end: the sampler's on_step hook
feeds the deployment's async generator, Serve streams it to the ingress, and the ingress writes each
event as it arrives; a client that disconnects stops the sampling at the next step.

Run it:

    serve run distilray.serve_apps.diffusion:app model=PATH [default_num_steps=64]
    DISTILRAY_DIFFUSION_MODEL=PATH serve run distilray.serve_apps.diffusion:app

No `from __future__ import annotations` here: FastAPI reads the endpoint annotations at runtime, and
cannot resolve postponed ones inside a Serve ingress class (see serve_apps/retrieval.py).
"""

import asyncio
import secrets
import threading
import time
import uuid
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch
from fastapi import Body
from fastapi.responses import StreamingResponse
from ray import serve
from ray.serve.handle import DeploymentHandle

from distilray.errors import DistilrayError
from distilray.losses.mdlm import SAMPLER_EPS
from distilray.serve_apps import openai_api
from distilray.serve_apps.diffusion_schemas import (
    MASK_PLACEHOLDER,
    DiffusionAppArgs,
    DiffusionCompletion,
    DiffusionFailure,
    DiffusionParams,
    DiffusionRequest,
    DiffusionStart,
    DiffusionStats,
    DiffusionStep,
)
from distilray.serve_apps.schemas import model_id_of

ENV_MODEL = "DISTILRAY_DIFFUSION_MODEL"
StreamItem = DiffusionStart | DiffusionFailure | DiffusionStep | DiffusionCompletion


def parse_args(args: dict[str, Any] | DiffusionAppArgs | None) -> DiffusionAppArgs:
    """Validate builder args; `model` defaults to $DISTILRAY_DIFFUSION_MODEL."""
    if isinstance(args, DiffusionAppArgs):
        return args
    return openai_api.parse_app_args(DiffusionAppArgs, args, {"model": ENV_MODEL}, "diffusion")


def check_model(folder: str, tokenizer=None) -> Any:
    """The MDLM config of `folder` (config.json only, no weights), after checking that the folder's
    tokenizer is the model's: its mask token is the model's mask id, it fits the vocabulary, it has bos."""
    from distilray.models.mdlm import ARCH, MDLMConfig
    from distilray.models.module_io import read_config
    from distilray.tokenizer import load_tokenizer

    config = MDLMConfig(**read_config(folder, ARCH, MDLMConfig))
    tokenizer = tokenizer or load_tokenizer(folder)
    if tokenizer.mask_token_id != config.mask_id:
        raise DistilrayError(
            f"the tokenizer of {folder} has mask token id {tokenizer.mask_token_id} but the model masks with "
            f"{config.mask_id}: serve the model with the tokenizer it was trained with"
        )
    if len(tokenizer) > config.vocab_size:
        raise DistilrayError(
            f"the tokenizer of {folder} has {len(tokenizer)} tokens, more than the model's {config.vocab_size}"
        )
    if tokenizer.bos_token_id is None:
        raise DistilrayError(f"the tokenizer of {folder} has no bos token (prompts start with one)")
    return config


class _Cancelled(Exception):
    """Raised from the sampler's on_step hook when the stream's consumer went away."""


# -- the model ---------------------------------------------------------------------------------------


@serve.deployment(max_ongoing_requests=8)
class DiffusionDeployment:
    """The diffusion LM: tokenises the prompt, samples one request at a time, detokenises."""

    def __init__(self, model: str, num_threads: int = 1, device: str = "cpu", cache_predictions: bool = True) -> None:
        from distilray.models.mdlm import EMA_FILE, load_diffusion_lm
        from distilray.tokenizer import load_tokenizer

        torch.set_num_threads(max(1, int(num_threads)))
        self._tokenizer = load_tokenizer(model)
        check_model(model, self._tokenizer)  # before loading weights
        self._model = load_diffusion_lm(model, ema=True, device=device)
        self._config = self._model.config
        self._name, self._ema = model, (Path(model) / EMA_FILE).is_file()
        self._cache = cache_predictions
        # one sample at a time: torch already uses the replica's CPUs, and sampling must stay off the event loop
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="sample")

    async def info(self) -> dict[str, Any]:
        return {
            "model": model_id_of(self._name),
            "seq_len": self._config.seq_len,
            "vocab_size": self._config.vocab_size,
            "mask_id": self._config.mask_id,
            "parameters": self._model.num_parameters(),
            "ema_weights": self._ema,
            "device": str(next(self._model.parameters()).device),
        }

    def _prefix(self, prompt: str) -> list[int] | DiffusionFailure:
        """[bos] + the prompt's tokens (empty for no prompt), or the 400 when it leaves nothing to sample."""
        if not prompt:
            return []
        ids = [self._tokenizer.bos_token_id, *self._tokenizer(prompt, add_special_tokens=False)["input_ids"]]
        length = self._config.seq_len
        if len(ids) >= length:
            return DiffusionFailure(
                param="prompt",
                message=f"prompt: {len(ids)} tokens (bos included) leave nothing to sample in the model's "
                f"sequence of {length} positions; a prompt takes at most {length - 1}",
            )
        if self._config.mask_id in ids:
            return DiffusionFailure(param="prompt", message="prompt: contains the mask token")
        return ids

    def _sample(self, prefix: list[int], params: DiffusionParams, on_step=None) -> DiffusionCompletion:
        from distilray.decoding.mdlm import sample

        out = sample(
            self._model,
            1,
            params.num_steps,
            generator=torch.Generator().manual_seed(params.seed),
            prefix=torch.tensor(prefix, dtype=torch.long) if prefix else None,
            temperature=params.temperature,
            cache_predictions=self._cache,
            on_step=on_step,
        )
        ids = [int(t) for t in out.tokens[0].tolist()]
        generated = ids[len(prefix) :]
        returned = generated if params.max_tokens is None else generated[: params.max_tokens]
        stats = DiffusionStats(
            num_steps=out.steps,
            nfe=out.nfe,
            seconds=out.seconds,
            tokens_per_s=len(generated) / out.seconds if out.seconds > 0 else None,
            prompt_tokens=len(prefix),
            seq_len=len(ids),
            temperature=params.temperature,
            seed=params.seed,
            token_ids=ids,
        )
        return DiffusionCompletion(
            text=self._tokenizer.decode(returned, skip_special_tokens=True),
            finish_reason="length",
            prompt_tokens=len(prefix),
            completion_tokens=len(returned),
            stats=stats,
        )

    async def generate(self, prompt: str, params: DiffusionParams) -> DiffusionCompletion | DiffusionFailure:
        """One completion, or the failure the ingress answers with (400: the request)."""
        prefix = self._prefix(prompt)
        if isinstance(prefix, DiffusionFailure):
            return prefix
        try:
            return await asyncio.get_running_loop().run_in_executor(self._pool, self._sample, prefix, params)
        except DistilrayError as exc:
            return DiffusionFailure(message=str(exc))

    async def stream(self, prompt: str, params: DiffusionParams) -> AsyncIterator[StreamItem]:
        """DiffusionStart (or a DiffusionFailure, then nothing), one DiffusionStep per step as the sampler
        takes it, then the DiffusionCompletion. Each step is sent when the next one arrives, so that the
        last can carry the final noise removal."""
        prefix = self._prefix(prompt)
        if isinstance(prefix, DiffusionFailure):
            yield prefix
            return
        yield DiffusionStart(prompt_tokens=len(prefix), seq_len=self._config.seq_len, num_steps=params.num_steps)
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()
        stop = threading.Event()
        revealed = _Reveals(self._tokenizer, self._config.mask_id, len(prefix), params.num_steps)

        def on_step(j: int, z: torch.Tensor) -> None:  # the sampling thread
            if stop.is_set():
                raise _Cancelled
            loop.call_soon_threadsafe(queue.put_nowait, revealed.step(j, z[0].tolist()))

        job = loop.run_in_executor(self._pool, self._sample, prefix, params, on_step)

        def finished(future: asyncio.Future) -> None:
            if not future.cancelled():
                future.exception()  # retrieved here too: a stream closed early never reads it
            queue.put_nowait(None)

        job.add_done_callback(finished)
        pending = None
        try:
            while (item := await queue.get()) is not None:
                if pending is not None:
                    yield pending
                pending = item
            try:
                out = job.result()
            except DistilrayError as exc:
                yield DiffusionFailure(message=str(exc))
                return
            if pending is not None:
                yield revealed.finish(pending, out.stats.token_ids)
            yield out
        finally:
            stop.set()  # a consumer that left (client disconnect) stops the sampler at its next step


class _Reveals:
    """Per-step denoising events from the sampler's states (runs in the sampling thread)."""

    def __init__(self, tokenizer, mask_id: int, prompt_tokens: int, num_steps: int) -> None:
        self._tokenizer, self._mask_id, self._start, self._num_steps = tokenizer, mask_id, prompt_tokens, num_steps
        self._last: list[int] | None = None

    def step(self, j: int, ids: list[int]) -> DiffusionStep:
        """Step j (0-based) left the sequence `ids`: what it revealed, and the text so far."""
        before = self._last or [self._mask_id] * len(ids)
        positions = [i for i in range(self._start, len(ids)) if before[i] == self._mask_id != ids[i]]
        self._last = ids
        return DiffusionStep(
            step=j + 1,
            num_steps=self._num_steps,
            t=_time_after(j, self._num_steps),
            positions=positions,
            token_ids=[ids[i] for i in positions],
            masked=sum(1 for i in ids[self._start :] if i == self._mask_id),
            text=self._text(ids),
        )

    def finish(self, last: DiffusionStep, final: list[int]) -> DiffusionStep:
        """The last step with the final noise removal's reveals added (positions still masked after it)."""
        removed = [i for i in range(self._start, len(final)) if self._last[i] == self._mask_id]
        if not removed:
            return last
        positions = sorted([*last.positions, *removed])
        return last.model_copy(
            update=dict(
                positions=positions,
                token_ids=[final[i] for i in positions],
                noise_removed=removed,
                masked=0,
                text=self._text(final),
            )
        )

    def _text(self, ids: list[int]) -> str:
        """The generated part: runs of revealed tokens decoded together, MASK_PLACEHOLDER per masked position."""
        pieces, run = [], []
        for token in ids[self._start :]:
            if token != self._mask_id:
                run.append(token)
                continue
            if run:
                pieces.append(self._tokenizer.decode(run, skip_special_tokens=True))
                run = []
            pieces.append(MASK_PLACEHOLDER)
        if run:
            pieces.append(self._tokenizer.decode(run, skip_special_tokens=True))
        return "".join(pieces)


def _time_after(j: int, num_steps: int) -> float:
    """t_{j+1} on the sampler's grid linspace(1, eps, N + 1)."""
    return 1.0 - (j + 1) * (1.0 - SAMPLER_EPS) / num_steps


# -- HTTP ingress ------------------------------------------------------------------------------------


api = openai_api.make_api(
    title="distilray masked diffusion LM",
    description="OpenAI-style completions from a masked diffusion LM, with the denoising steps streamed",
)


@serve.deployment(ray_actor_options={"num_cpus": 0}, max_ongoing_requests=64)
@serve.ingress(api)
class CompletionsIngress:
    """HTTP front: validates requests, calls the diffusion deployment, shapes OpenAI-style responses."""

    def __init__(self, diffusion: DeploymentHandle, args: dict[str, Any]) -> None:
        self._diffusion = diffusion
        self._streaming = diffusion.options(stream=True)
        self._args = DiffusionAppArgs.model_validate(args)

    @api.post("/v1/completions", openapi_extra=openai_api.request_schema(DiffusionRequest))
    async def completions(self, body: Any = Body(...)) -> Any:
        start = time.perf_counter()
        req = openai_api.validate_request(DiffusionRequest, body, self._args)
        if not isinstance(req, DiffusionRequest):
            return req  # the 400
        params = req.params(self._args, seed=secrets.randbits(63))  # unseeded sampling varies
        model = model_id_of(self._args.model)
        if req.stream:
            return await self._stream(req.prompt or "", params, model, start)
        try:
            out = await self._diffusion.generate.remote(req.prompt or "", params)
        except Exception as exc:  # replica crash: this request fails, the service goes on
            return openai_api.failed(exc)
        if isinstance(out, DiffusionFailure):
            return openai_api.error_response(out.status, out.message, out.param)
        return await openai_api.answer(out, model, start)

    async def _stream(self, prompt: str, params: DiffusionParams, model: str, start: float) -> Any:
        """The event stream; a request the deployment refuses still gets its 400 before any event."""
        steps = self._streaming.stream.remote(prompt, params)
        try:
            first = await steps.__anext__()
        except Exception as exc:
            return openai_api.failed(exc)
        if isinstance(first, DiffusionFailure):
            return openai_api.error_response(first.status, first.message, first.param)
        # every event shares the id, as OpenAI's chunks do
        chunk = {
            "id": f"cmpl-{uuid.uuid4().hex}",
            "object": "text_completion",
            "created": int(time.time()),
            "model": model,
        }

        async def events() -> AsyncIterator[str]:
            try:
                async for item in steps:
                    if isinstance(item, DiffusionStep):
                        choice = {"index": 0, "text": "", "logprobs": None, "finish_reason": None}
                        extra = {"event": "step", **item.model_dump()}
                        yield openai_api.sse({**chunk, "choices": [choice], "distilray": extra})
                    elif isinstance(item, DiffusionFailure):
                        yield openai_api.error_event(item.status, item.message, item.param)
                    else:
                        body = await openai_api.answer(item, model, start)
                        body["distilray"]["event"] = "final"
                        yield openai_api.sse({**body, **chunk})
            except Exception as exc:  # the replica died mid-stream: say so in the stream
                yield openai_api.sse(openai_api.error_body(openai_api.failed(exc)))
            finally:
                steps.cancel()  # no-op once finished; stops the sampler when the client left
            yield "data: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream")

    @api.get("/healthz")
    async def healthz(self) -> Any:
        return await openai_api.health(self._diffusion.info.remote)

    @api.get("/v1/models")
    async def models(self) -> dict[str, Any]:
        return {"object": "list", "data": [openai_api.model_card(model_id_of(self._args.model), role="diffusion")]}


def build_app(args: dict) -> serve.Application:
    """Serve application builder: checks the model folder and its tokenizer up front (no weights), then
    binds the diffusion deployment and the ingress."""
    parsed = parse_args(args)
    check_model(parsed.model)
    diffusion = DiffusionDeployment.options(
        ray_actor_options={"num_cpus": parsed.num_cpus, "num_gpus": parsed.num_gpus},
        max_ongoing_requests=parsed.max_concurrency,
    ).bind(
        parsed.model,
        max(1, int(parsed.num_cpus)),
        "cuda" if parsed.num_gpus > 0 else "cpu",
        parsed.cache_predictions,
    )
    return CompletionsIngress.bind(diffusion, parsed.model_dump())


# `serve run distilray.serve_apps.diffusion:app` calls this with the CLI's key=value args (or none, then
# $DISTILRAY_DIFFUSION_MODEL supplies the model).
app = build_app
