"""The OpenAI completions-shape plumbing shared by the Serve apps (serve_apps/retrieval.py,
serve_apps/speculative.py): builder-argument parsing with environment fallbacks, request validation
into the types of serve_apps/schemas.py, the error body, the FastAPI app with its error handlers, and
the completion, health, models and stats bodies.

No `from __future__ import annotations`: FastAPI reads annotations at runtime (see serve_apps/retrieval.py).
"""

import json
import math
import os
import secrets
import time
import uuid
from collections.abc import AsyncGenerator, Awaitable, Callable
from typing import Any, TypeVar

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from distilray.errors import DistilrayError
from distilray.serve_apps.schemas import Completion, GenerationFailure, TextDelta

Args = TypeVar("Args", bound=BaseModel)
Body = TypeVar("Body", bound=BaseModel)
UNQUOTED_ERRORS = ("missing", "json_invalid", "extra_forbidden")  # messages that need no "got <input>"


def parse_app_args(model: type[Args], args: dict[str, Any] | None, env: dict[str, str], app: str) -> Args:
    """Validate a builder's args dict into `model`; a field of `env` (field -> environment variable)
    missing or empty in `args` comes from that variable. Problems become one DistilrayError."""
    raw = dict(args or {})
    for key, var in env.items():
        if not raw.get(key) and os.environ.get(var):
            raw[key] = os.environ[var]
    try:
        return model.model_validate(raw)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in e['loc']) or 'args'}: {_arg_problem(e, env)}" for e in exc.errors()
        )
        raise DistilrayError(f"bad {app} app arguments: {problems}") from None


def _arg_problem(error: Any, env: dict[str, str]) -> str:
    if error["type"] == "extra_forbidden":
        return "unknown argument"
    if error["type"] == "missing":
        key = error["loc"][0]
        return f"required (pass {key}=PATH or set ${env[key]})" if key in env else f"required (pass {key}=...)"
    return error["msg"]


def error_response(status: int, message: str, param: str | None = None, kind: str | None = None) -> JSONResponse:
    """The OpenAI error body: {"error": {"message", "type", "param", "code"}}; the type defaults to
    invalid_request_error below 500, server_error from 500 on."""
    kind = kind or ("invalid_request_error" if status < 500 else "server_error")
    return JSONResponse(
        status_code=status, content={"error": {"message": message, "type": kind, "param": param, "code": None}}
    )


# -- the FastAPI app ---------------------------------------------------------------------------------


def _validation_message(errors: list[Any]) -> tuple[str, str | None]:
    """(message, param) of the first validation error: the field, what is wrong, and the value sent."""
    if not errors:
        return "invalid request", None
    first = errors[0]
    loc = [str(p) for p in first.get("loc", ()) if p != "body"]
    if first.get("type") == "json_invalid":
        return f"the request body is not valid JSON: {first.get('msg')}", None
    field = ".".join(loc) or None
    message = str(first.get("msg"))
    value = first.get("input")
    # pydantic's own messages say what was expected; the value sent makes the 400 self-explaining
    if first.get("type") in UNQUOTED_ERRORS or isinstance(value, dict) or repr(value) in message:
        detail = message
    else:
        detail = f"{message}, got {value!r}"
    return (f"{field}: {detail}" if field else detail), field


def validate_request(model: type[Body], body: Any, args: BaseModel) -> Body | JSONResponse:
    """`body` (parsed JSON) validated into `model` against this app's `args`, or the 400 naming the field."""
    try:
        return model.model_validate(body, context={"args": args})
    except ValidationError as exc:
        message, param = _validation_message(exc.errors())
        if exc.errors()[0].get("type") == "model_not_found":  # OpenAI and vLLM answer an unknown model with 404
            return error_response(404, message, param, kind="model_not_found")
        return error_response(400, message, param)


def request_schema(model: type[BaseModel]) -> dict[str, Any]:
    """`openapi_extra` documenting a route's JSON body as `model` (the route validates it itself)."""
    return {"requestBody": {"required": True, "content": {"application/json": {"schema": model.model_json_schema()}}}}


async def _on_validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
    message, param = _validation_message(list(exc.errors()))
    return error_response(400, message, param)


async def _on_http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    return error_response(exc.status_code, str(exc.detail))


def make_api(title: str, description: str) -> FastAPI:
    """A FastAPI app whose bad bodies get a 400 and HTTP errors their status, in the OpenAI error shape."""
    api = FastAPI(title=title, description=description)
    api.add_exception_handler(RequestValidationError, _on_validation_error)
    api.add_exception_handler(StarletteHTTPException, _on_http_error)
    return api


# -- responses ---------------------------------------------------------------------------------------


def finite_or_none(x: float) -> float | None:
    return x if math.isfinite(x) else None  # JSON has no NaN


async def completion(
    generate: Callable[[], Awaitable[Completion | GenerationFailure]],
    model: str,
    start: float | None = None,
    chat: bool = False,
) -> Any:
    """Await the target's generate call and answer in the OpenAI completion shape (chat completion
    when `chat`), its stats as the `distilray` block (plus `request_seconds` since `start` when given).
    A GenerationFailure becomes that error; a failed call, a 500."""
    try:
        out = await generate()
    except Exception as exc:  # replica crash, timeout: this request fails, the service goes on
        return failed(exc)
    if isinstance(out, GenerationFailure):
        return error_response(out.status, out.message, getattr(out, "param", None))
    stats = out.stats.model_dump()
    if start is not None:
        stats["request_seconds"] = time.perf_counter() - start
    head = response_head(model, chat)
    if chat:
        choice = {"index": 0, "message": {"role": "assistant", "content": out.text}}
    else:
        choice = {"index": 0, "text": out.text}
    choice |= {"logprobs": None, "finish_reason": out.finish_reason}
    return {
        **head,
        "object": head["object"].removesuffix(".chunk"),
        "choices": [choice],
        "usage": usage(out),
        "distilray": stats,
    }


def response_head(model: str, chat: bool) -> dict[str, Any]:
    """id, object, created and model: what every chunk of one streamed response shares."""
    return {
        "id": f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}",
        "object": "chat.completion.chunk" if chat else "text_completion",
        "created": int(time.time()),
        "model": model,
    }


def usage(out: Completion) -> dict[str, int]:
    return {
        "prompt_tokens": out.prompt_tokens,
        "completion_tokens": out.completion_tokens,
        "total_tokens": out.prompt_tokens + out.completion_tokens,
    }


def text_chunk(head: dict[str, Any], text: str, chat: bool, first: bool = False) -> str:
    """One streamed piece of text as an SSE event (a chat's first delta also names the role)."""
    if chat:
        delta = {"role": "assistant", "content": text} if first else {"content": text}
        choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": None}
    else:
        choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": None}
    return sse({**head, "choices": [choice]})


def final_chunk(head: dict[str, Any], out: Completion, chat: bool, start: float) -> str:
    """The last event: no new text, the finish reason, usage and the `distilray` statistics."""
    choice: dict[str, Any] = {"index": 0, "logprobs": None, "finish_reason": out.finish_reason}
    choice |= {"delta": {}} if chat else {"text": ""}
    stats = out.stats.model_dump() | {"request_seconds": time.perf_counter() - start, "event": "final"}
    return sse({**head, "choices": [choice], "usage": usage(out), "distilray": stats})


async def text_stream(items: AsyncGenerator[Any, None], model: str, start: float, chat: bool) -> Any:
    """Answer a text app's streamed request from its target's items (serve_apps/schemas.py: TextStart,
    then TextDelta per emitted block, then the Completion; a GenerationFailure instead of TextStart is
    the request's error, sent before any event). A failure mid-stream ends the stream with an error
    event; a client that leaves closes `items`, which takes its row out of the batch."""
    try:
        first = await items.__anext__()
    except Exception as exc:
        return failed(exc)
    if isinstance(first, GenerationFailure):
        await items.aclose()
        return error_response(first.status, first.message, getattr(first, "param", None))
    head = response_head(model, chat)

    async def events() -> Any:
        sent = False
        try:
            async for item in items:
                if isinstance(item, TextDelta):
                    if item.text:
                        yield text_chunk(head, item.text, chat, first=not sent)
                        sent = True
                elif isinstance(item, GenerationFailure):
                    yield error_event(item.status, item.message)
                else:
                    yield final_chunk(head, item, chat, start)
        except Exception as exc:  # decoding failed mid-stream: say so in the stream
            yield sse(error_body(failed(exc)))
        finally:
            await items.aclose()  # no-op once finished; stops the decoding when the client left
        yield "data: [DONE]\n\n"

    return StreamingResponse(events(), media_type="text/event-stream")


async def answer_text(
    kind: type[BaseModel], body: Any, args: Any, run: Callable[[Any, bool], AsyncGenerator[Any, None]], chat: bool
) -> Any:
    """A text app's POST: `body` validated into `kind` against the app's `args` (or the 400), its job
    decoded by `run(job, stream)` (the target's items: serve_apps/schemas.py StreamItem), answered as
    server-sent events or as one completion."""
    start = time.perf_counter()
    req = validate_request(kind, body, args)
    if not isinstance(req, kind):
        return req  # the 400
    job = req.job(args, seed=secrets.randbits(63))  # unseeded sampling varies
    if req.stream:
        return await text_stream(run(job, True), args.served, start, chat)

    async def whole() -> Any:
        last = None
        async for item in run(job, False):
            last = item
        return last

    return await completion(whole, args.served, start, chat)


async def or_unavailable(call: Callable[[], Awaitable[Any]], what: str) -> Any:
    """The awaited result of `call`, or a 503 "{what}: {exception type}" when it fails."""
    try:
        return await call()
    except Exception as exc:
        return error_response(503, f"{what}: {type(exc).__name__}")


async def health(info: Callable[[], Awaitable[dict[str, Any]]], **extra: Any) -> Any:
    """GET /healthz: {"status": "ok", **info(), **extra}, or a 503 while the target is not ready."""
    out = await or_unavailable(info, "target not ready")
    return out if isinstance(out, JSONResponse) else {"status": "ok", **out, **extra}


def model_card(name: str, **extra: Any) -> dict[str, Any]:
    """One row of GET /v1/models; the body is {"object": "list", "data": [rows]}."""
    return {"id": name, "object": "model", "owned_by": "distilray", **extra}


def sse(body: dict[str, Any]) -> str:
    """One server-sent event carrying a JSON body."""
    return f"data: {json.dumps(body)}\n\n"


def failed(exc: Exception) -> JSONResponse:
    """HTTP 500 for a replica that crashed on this request (the service goes on)."""
    first_line = (str(exc).splitlines() or [""])[0]
    return error_response(500, f"generation failed: {type(exc).__name__}: {first_line}")


def error_body(response: JSONResponse) -> dict[str, Any]:
    return json.loads(response.body)  # the error object, as an event of a stream already under way


def error_event(status: int, message: str, param: str | None = None) -> str:
    """The error object of `error_response`, as an event of a stream already under way."""
    return sse(error_body(error_response(status, message, param)))


async def answer(out: Any, model: str, start: float) -> dict[str, Any]:
    """`completion` of a result already computed."""

    async def done() -> Any:
        return out

    return await completion(done, model, start)
