"""A T-Free LM as a Ray Serve application (reference/tfree.md 5; DESIGN "Who uses it").

Two deployments, as in serve_apps/diffusion.py:

- `TFreeDeployment` loads a train-tfree model folder once (weights and dictionary/) and runs
  decoding/tfree_generate.py `generate_words`, one request at a time per replica. `generate` answers a
  `TFreeCompletion`; `stream` is an async generator (through `handle.options(stream=True)`) that yields each
  word as it is picked.
- `CompletionsIngress` (FastAPI) serves `POST /v1/completions` in the OpenAI completions shape plus a
  `distilray` block (stop_reason, dictionary_size, decode_score, words, seconds, words_per_s), `GET /healthz`
  and `GET /v1/models`. Requests are validated into `TFreeRequest`: bad ones get HTTP 400 with the OpenAI
  error body naming the field, and the app keeps serving.

What a request means for a T-Free LM (its unit is the word, whitespace markers included):

- `max_tokens` counts words, and so does `usage`. The model's context (max_seq_len words) also ends a text.
- The prompt's leading whitespace is stripped (training documents start stripped; see tfree_generate.py).
- `stop`: up to 4 strings, each one T-Free word (one item of `split_words`: "." or "\\n" or "The"); the text
  ends before the first stop word generated, and leaves it out.
- `more_words`: text whose words join the closed dictionary for this request; default: the prompt's words.
- `decode_score` ("head", "union", "calibrated") and `word_edge_weight` choose the word score
  (decoding/tfree.py); `temperature` 0 is greedy, else softmax sampling over the `top_k` best (0: all), `seed`.
- prompt, more_words and stop holding `<|...|>` are refused (pitfall 8): typed into a prompt, `<|endoftext|>`
  would reach the model as the real end-of-text marker.
- `choices[0].text` is what the generated words add to the prompt (prompt + text reads right);
  finish_reason "stop" for end-of-text or a stop word, "length" for max_tokens or the model's context.
  `model` is the app's served_model_name.

`stream: true` answers `text/event-stream`: one OpenAI completion chunk per word, its text being what the word
adds to the text (`distilray`: event "word", index, word), then a last chunk with empty text, the
finish_reason, usage and the `distilray` block (event "final"), then `data: [DONE]`. Concatenating the chunks'
texts gives the non-streamed text. A client that disconnects stops the generation at its next word.

Run it:

    serve run distilray.serve_apps.tfree:app model=PATH [served_model_name=tfree] [device=cpu]
    DISTILRAY_TFREE_MODEL=PATH serve run distilray.serve_apps.tfree:app

The app's types live here rather than in serve_apps/schemas.py: only this app uses them.
No `from __future__ import annotations`: FastAPI and pydantic read annotations at runtime (see diffusion.py).
"""

import asyncio
import secrets
import threading
import time
import uuid
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Literal

import torch
from fastapi import Body
from fastapi.responses import StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, field_validator
from pydantic_core import PydanticCustomError
from ray import serve
from ray.serve.handle import DeploymentHandle

from distilray.config import TFreeDecodeScore
from distilray.decoding.tfree_generate import (
    GenerationResult,
    StopReason,
    check_tfree_folder,
    generate_words,
    load_tfree_bundle,
    prompt_words,
)
from distilray.errors import DistilrayError
from distilray.serve_apps import openai_api
from distilray.serve_apps.schemas import SEED_END, SEED_MIN, Completion, GenerationFailure, model_id_of
from distilray.tfree.wordsplit import check_user_text, split_words

ENV_MODEL = "DISTILRAY_TFREE_MODEL"
MAX_STOP_WORDS = 4  # as OpenAI's `stop`


# -- types -------------------------------------------------------------------------------------------


class TFreeAppArgs(BaseModel):
    """Arguments of the T-Free app's `build_app` (`serve run ... key=value` or serve_config.yaml)."""

    model_config = ConfigDict(extra="forbid")

    model: str = Field(description="a train-tfree model folder: config.json, model.safetensors and dictionary/")
    served_model_name: str = Field("tfree", min_length=1, description="the model id of responses and /v1/models")
    device: str = Field("cpu", description="torch device of the replica: cpu, cuda or cuda:N (then it takes a GPU)")
    num_cpus: float = Field(1, ge=0, description="CPUs of the replica (torch threads = max(1, int(num_cpus)))")
    max_concurrency: int = Field(
        8, ge=1, description="requests a replica holds at once; it generates one at a time, the others wait"
    )

    @field_validator("device")
    @classmethod
    def _known_device(cls, value: str) -> str:
        try:
            kind = torch.device(value).type
        except RuntimeError:
            kind = None
        if kind not in ("cpu", "cuda"):
            raise ValueError(f"device must be cpu, cuda or cuda:N, got {value!r}")
        return value

    @property
    def num_gpus(self) -> int:
        return 1 if torch.device(self.device).type == "cuda" else 0


def _no_special_words(value: str) -> str:
    """Pitfall 8: user text may not hold `<|...|>` (the template keeps braces in the text literal)."""
    try:
        check_user_text(value)
    except DistilrayError as err:
        raise PydanticCustomError("special_word", "{message}", {"message": str(err)}) from None
    return value


class TFreeRequest(BaseModel):
    """A completion for the T-Free app; unknown fields are refused (it has no top_p, logprobs...)."""

    model_config = ConfigDict(extra="forbid")

    model: str | None = Field(None, description="accepted; the response names the app's served_model_name")
    prompt: str = Field(min_length=1, description="the text to continue (leading whitespace is stripped)")
    max_tokens: int = Field(16, ge=0, description="words to generate at most")
    temperature: float = Field(0.0, ge=0.0, allow_inf_nan=False, description="0: greedy")
    top_k: int = Field(0, ge=0, description="sample among the k best words (0: all)")
    seed: int | None = Field(None, ge=SEED_MIN, lt=SEED_END, description="sampling seed (64 bits)")
    n: Literal[1] = Field(1, description="choices: this app serves one")
    stream: bool = Field(False, description="send each word as a server-sent event")
    stop: list[str] = Field(default_factory=list, description="up to 4 stop words; the text ends before the first")
    more_words: str | None = Field(None, description="text whose words join the dictionary; default: the prompt's")
    word_edge_weight: float = Field(
        1.0, ge=0.0, allow_inf_nan=False, description="weight of edge-trigram rows in head/union scores"
    )
    decode_score: TFreeDecodeScore = Field("head", description="the word score: head, union or calibrated")

    @field_validator("prompt")
    @classmethod
    def _prompt_words(cls, value: str) -> str:
        if not value.strip():
            raise PydanticCustomError("no_words", "holds no words (only whitespace)")
        return _no_special_words(value)

    @field_validator("more_words")
    @classmethod
    def _more_words(cls, value: str | None) -> str | None:
        return None if value is None else _no_special_words(value)

    @field_validator("stop", mode="before")
    @classmethod
    def _one_stop_string(cls, value: Any) -> Any:
        return [value] if isinstance(value, str) else [] if value is None else value  # OpenAI takes str | list

    @field_validator("stop")
    @classmethod
    def _stop_words(cls, value: list[str]) -> list[str]:
        if len(value) > MAX_STOP_WORDS:
            raise PydanticCustomError("stop", "takes at most {limit} stop words", {"limit": MAX_STOP_WORDS})
        for text in value:
            _no_special_words(text)
            if len(split_words(text)) != 1:
                raise PydanticCustomError(
                    "stop",
                    "each stop string must be one T-Free word; {text} splits into {words}",
                    {"text": repr(text), "words": repr(split_words(text))},
                )
        return value

    def params(self, seed: int) -> "TFreeParams":
        """What the deployment generates with; `seed` stands in for a missing one."""
        return TFreeParams(
            max_words=self.max_tokens,
            method=self.decode_score,
            edge_weight=float(self.word_edge_weight),
            temperature=float(self.temperature),
            top_k=self.top_k,
            seed=self.seed if self.seed is not None else seed,
            more_words=self.more_words or None,  # empty: the prompt's words, as the original
            stop_words=tuple(split_words(s)[0] for s in self.stop),
        )


@dataclass(frozen=True)
class TFreeParams:
    """One request's decoding parameters, as the deployment receives them."""

    max_words: int
    method: TFreeDecodeScore
    edge_weight: float
    temperature: float
    top_k: int
    seed: int
    more_words: str | None
    stop_words: tuple[str, ...]


class TFreeStats(BaseModel):
    """The `distilray` block of a T-Free completion (before the ingress adds request_seconds)."""

    stop_reason: StopReason
    decode_score: TFreeDecodeScore
    word_edge_weight: float
    dictionary_size: int  # |D| with this request's more_words (or prompt words)
    words: list[str]  # the generated words, whitespace markers included
    seconds: float
    words_per_s: float | None
    temperature: float
    top_k: int
    seed: int


class TFreeCompletion(Completion):
    stats: TFreeStats


class TFreeFailure(GenerationFailure):
    """A request the deployment could not serve; `param` names the request field at fault."""

    param: str | None = None


class TFreeStart(BaseModel):
    """First item of a word stream: the request was accepted."""

    prompt_words: int


class TFreeWord(BaseModel):
    """One generated word of a stream and the text it adds."""

    index: int
    word: str
    text: str


StreamItem = TFreeStart | TFreeFailure | TFreeWord | TFreeCompletion


def parse_args(args: dict[str, Any] | TFreeAppArgs | None) -> TFreeAppArgs:
    """Validate builder args; `model` defaults to $DISTILRAY_TFREE_MODEL."""
    if isinstance(args, TFreeAppArgs):
        return args
    return openai_api.parse_app_args(TFreeAppArgs, args, {"model": ENV_MODEL}, "tfree")


class _Cancelled(Exception):
    """Raised from generate_words' on_word hook when the stream's consumer went away."""


# -- the model ---------------------------------------------------------------------------------------


@serve.deployment(max_ongoing_requests=8)
class TFreeDeployment:
    """The T-Free LM with its dictionary: generates one request at a time."""

    def __init__(self, model: str, device: str = "cpu", num_threads: int = 1) -> None:
        torch.set_num_threads(max(1, int(num_threads)))
        self._model, self._dictionary = load_tfree_bundle(model, device)
        self._folder, self._device = model, torch.device(device)
        # one generation at a time: torch already uses the replica's CPUs, and decoding must stay off the event loop
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="generate")

    async def info(self) -> dict[str, Any]:
        config = self._model.config
        return {
            "model": model_id_of(self._folder),
            "v": config.v,
            "m": config.m,
            "k": config.k,
            "max_seq_len": config.max_seq_len,
            "dictionary_size": len(self._dictionary),
            "device": str(self._device),
        }

    def _check(self, prompt: str) -> int | TFreeFailure:
        """The prompt's word count, or the 400 when it does not fit the model's context."""
        try:
            return len(prompt_words(self._model, prompt))
        except DistilrayError as err:
            return TFreeFailure(param="prompt", message=f"prompt: {err}")

    def _generate(self, prompt: str, params: TFreeParams, on_word=None) -> TFreeCompletion:
        out: GenerationResult = generate_words(
            self._model,
            self._dictionary,
            prompt,
            max_words=params.max_words,
            method=params.method,
            edge_weight=params.edge_weight,
            temperature=params.temperature,
            top_k=params.top_k,
            more_words=params.more_words,
            stop_words=params.stop_words,
            generator=torch.Generator(device=self._device).manual_seed(params.seed),
            on_word=on_word,
        )
        stats = TFreeStats(
            stop_reason=out.stop_reason,
            decode_score=params.method,
            word_edge_weight=params.edge_weight,
            dictionary_size=out.dictionary_size,
            words=out.words,
            seconds=out.seconds,
            words_per_s=out.words_per_s,
            temperature=params.temperature,
            top_k=params.top_k,
            seed=params.seed,
        )
        return TFreeCompletion(
            text=out.text,
            finish_reason="stop" if out.stop_reason in ("eot", "stop_word") else "length",
            prompt_tokens=out.prompt_words,
            completion_tokens=len(out.words),
            stats=stats,
        )

    async def generate(self, prompt: str, params: TFreeParams) -> TFreeCompletion | TFreeFailure:
        """One completion, or the failure the ingress answers with (400: the request)."""
        checked = self._check(prompt)
        if isinstance(checked, TFreeFailure):
            return checked
        try:
            return await asyncio.get_running_loop().run_in_executor(self._pool, self._generate, prompt, params)
        except DistilrayError as err:
            return TFreeFailure(message=str(err))

    async def stream(self, prompt: str, params: TFreeParams) -> AsyncIterator[StreamItem]:
        """TFreeStart (or a TFreeFailure, then nothing), one TFreeWord per word as it is picked, then the
        TFreeCompletion (or a TFreeFailure)."""
        checked = self._check(prompt)
        if isinstance(checked, TFreeFailure):
            yield checked
            return
        yield TFreeStart(prompt_words=checked)
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()
        stop = threading.Event()
        index, streamed = 0, 0  # words and characters sent so far (the decoding thread only)

        def on_word(word: str, text: str) -> None:  # the decoding thread
            nonlocal index, streamed
            if stop.is_set():
                raise _Cancelled
            # words_to_text spaces a word by its predecessor alone, so each text extends the previous one
            loop.call_soon_threadsafe(queue.put_nowait, TFreeWord(index=index, word=word, text=text[streamed:]))
            index, streamed = index + 1, len(text)

        job = loop.run_in_executor(self._pool, self._generate, prompt, params, on_word)

        def finished(future: asyncio.Future) -> None:
            if not future.cancelled():
                future.exception()  # retrieved here too: a stream closed early never reads it
            queue.put_nowait(None)

        job.add_done_callback(finished)
        try:
            while (item := await queue.get()) is not None:
                yield item
            try:
                yield job.result()
            except DistilrayError as err:
                yield TFreeFailure(message=str(err))
        finally:
            stop.set()  # a consumer that left (client disconnect) stops the decoding at its next word


# -- HTTP ingress ------------------------------------------------------------------------------------


api = openai_api.make_api(
    title="distilray T-Free LM",
    description="OpenAI-style completions from a tokenizer-free T-Free LM, decoded word by word from its dictionary",
)


@serve.deployment(ray_actor_options={"num_cpus": 0}, max_ongoing_requests=64)
@serve.ingress(api)
class CompletionsIngress:
    """HTTP front: validates requests, calls the T-Free deployment, shapes OpenAI-style responses."""

    def __init__(self, tfree: DeploymentHandle, args: dict[str, Any]) -> None:
        self._tfree = tfree
        self._streaming = tfree.options(stream=True)
        self._args = TFreeAppArgs.model_validate(args)

    @api.post("/v1/completions", openapi_extra=openai_api.request_schema(TFreeRequest))
    async def completions(self, body: Any = Body(...)) -> Any:
        start = time.perf_counter()
        req = openai_api.validate_request(TFreeRequest, body, self._args)
        if not isinstance(req, TFreeRequest):
            return req  # the 400
        params = req.params(seed=secrets.randbits(63))  # unseeded sampling varies
        model = self._args.served_model_name
        if req.stream:
            return await self._stream(req.prompt, params, model, start)
        try:
            out = await self._tfree.generate.remote(req.prompt, params)
        except Exception as exc:  # replica crash: this request fails, the service goes on
            return openai_api.failed(exc)
        if isinstance(out, TFreeFailure):
            return openai_api.error_response(out.status, out.message, out.param)
        return await openai_api.answer(out, model, start)

    async def _stream(self, prompt: str, params: TFreeParams, model: str, start: float) -> Any:
        """The event stream; a request the deployment refuses still gets its 400 before any event."""
        items = self._streaming.stream.remote(prompt, params)
        try:
            first = await items.__anext__()
        except Exception as exc:
            return openai_api.failed(exc)
        if isinstance(first, TFreeFailure):
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
                async for item in items:
                    if isinstance(item, TFreeWord):
                        choice = {"index": 0, "text": item.text, "logprobs": None, "finish_reason": None}
                        extra = {"event": "word", "index": item.index, "word": item.word}
                        yield openai_api.sse({**chunk, "choices": [choice], "distilray": extra})
                    elif isinstance(item, TFreeFailure):
                        yield openai_api.error_event(item.status, item.message, item.param)
                    else:
                        body = await openai_api.answer(item, model, start)
                        body["choices"][0]["text"] = ""  # the words came already: the chunks' texts add up to it
                        body["distilray"]["event"] = "final"
                        yield openai_api.sse({**body, **chunk})
            except Exception as exc:  # the replica died mid-stream: say so in the stream
                yield openai_api.sse(openai_api.error_body(openai_api.failed(exc)))
            finally:
                items.cancel()  # no-op once finished; stops the decoding when the client left
            yield "data: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream")

    @api.get("/healthz")
    async def healthz(self) -> Any:
        return await openai_api.health(self._tfree.info.remote, served_model_name=self._args.served_model_name)

    @api.get("/v1/models")
    async def models(self) -> dict[str, Any]:
        card = openai_api.model_card(self._args.served_model_name, role="tfree")
        return {"object": "list", "data": [card]}


def build_app(args: dict) -> serve.Application:
    """Serve application builder: checks the model folder up front (config and dictionary/, no weights), then
    binds the T-Free deployment and the ingress."""
    parsed = parse_args(args)
    check_tfree_folder(parsed.model)
    tfree = TFreeDeployment.options(
        ray_actor_options={"num_cpus": parsed.num_cpus, "num_gpus": parsed.num_gpus},
        max_ongoing_requests=parsed.max_concurrency,
    ).bind(parsed.model, parsed.device, max(1, int(parsed.num_cpus)))
    return CompletionsIngress.bind(tfree, parsed.model_dump())


# `serve run distilray.serve_apps.tfree:app` calls this with the CLI's key=value args (or none, then
# $DISTILRAY_TFREE_MODEL supplies the model).
app = build_app
