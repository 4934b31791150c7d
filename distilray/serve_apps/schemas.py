"""The Serve apps' types: builder arguments, HTTP requests, and what crosses between deployments
(the diffusion app's own are in diffusion_schemas.py).

Validation lives here (Ray Serve LLM style): ranges in `Field`, choices in `Literal`, and the checks
that depend on one app's arguments (max_tokens_limit, the configured drafter names) in validators that
read those arguments from the validation context, `model_validate(body, context={"args": app_args})`.
A failed request is answered by openai_api.py as a 400 whose `param` names the first bad field.

No `from __future__ import annotations`: pydantic and FastAPI read these annotations at runtime.
"""

import dataclasses
import json
import re
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator, model_validator
from pydantic_core import PydanticCustomError

from distilray.decoding.retrieval import Mode, RetrievalParams
from distilray.decoding.sampling import SamplingParams
from distilray.decoding.speculative import MAX_GAMMA, SpeculativeParams

NO_DRAFTER = "none"
DRAFTER_NAME = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")  # drafter names become deployment names
ADAPTIVE_GAMMA_MAX = 8  # upper bound of adaptive gamma unless the request's gamma is larger
SEED_MIN, SEED_END = -(2**63), 2**64  # what torch.Generator.manual_seed takes


def app_args_of(info: ValidationInfo) -> Any:
    """The app's arguments, which a validator reads from the validation context (None when absent)."""
    return (info.context or {}).get("args")


# -- builder arguments -------------------------------------------------------------------------------


class ReplicaResources(BaseModel):
    """What the text apps share: the target replica's resources (torch threads = max(1, int(num_cpus));
    bf16 on a GPU), its weights' precision, the model id clients see, and the request limits."""

    model_config = ConfigDict(extra="forbid")

    served_model_name: str | None = Field(
        None, min_length=1, description="the model id of responses and /v1/models; default: the model folder's name"
    )
    max_tokens_limit: int = Field(512, ge=1, description="the largest max_tokens a request may ask for")
    max_prompt_bytes: int = Field(
        262_144, ge=1, description="the largest prompt (UTF-8 bytes, all messages together) a request may send"
    )
    quantize: Literal["none", "int8"] = Field(
        "none", description="int8: dynamic int8 weights on CPU (FBGEMM), lossless w.r.t. the model served"
    )
    num_cpus: float = Field(1, ge=0, description="CPUs of the target replica (torch threads = max(1, int(num_cpus)))")
    num_gpus: float = Field(0, ge=0, description="GPUs of the target replica")
    max_batch_size: int = Field(
        8, ge=1, le=256, description="requests a target replica decodes together (continuous batching)"
    )
    batch_wait_ms: float = Field(
        0.0,
        ge=0,
        le=1000,
        description="how long an idle target replica waits for a burst to gather before its first step (0: none; "
        "requests that come later join at the next step anyway)",
    )
    stream_interval_ms: float = Field(
        20.0,
        ge=0,
        le=1000,
        description="the least time between two events of a stream (the first text goes at once; 0: an event per "
        "step). Each event costs the replica CPU and interpreter time its batch needs",
    )

    def model_id(self, folder: str) -> str:
        """served_model_name, else the folder's last part: a response never shows a filesystem path."""
        return self.served_model_name or model_id_of(folder)


def model_id_of(folder: str) -> str:
    """A model id for a folder or hub name without the path before it ('org/name' hub ids stay whole)."""
    path = folder.rstrip("/")
    if path.count("/") == 1 and not path.startswith((".", "/")):
        return path  # a hub id
    return path.rsplit("/", 1)[-1] or "model"


class RetrievalAppArgs(ReplicaResources):
    """Arguments of the CD-LM app's `build_app` (`serve run ... key=value` or `args:` in serve_config.yaml)."""

    model: str = Field(description="HF causal LM: a save_pretrained folder with its tokenizer, or a hub name")
    datastore: str = Field(description="folder holding datastore.json and the shard files")
    default_mode: Mode = Field("paper", description="decoding mode when a request names none")
    similarity_threshold: float = Field(
        0.5, ge=-1.0, le=1.0, allow_inf_nan=False, description="default cosine threshold for a chunk to be used"
    )
    overlap_lookups: bool = Field(
        False,
        description="run each step's datastore lookup beside the target pass (assuming no hit; a hit discards "
        "that row's pass): pays when a lookup costs about a pass and hits are rare",
    )
    datastore_placement: Literal["shards", "target"] = Field(
        "shards",
        description="shards: one actor per shard file behind a router deployment (a datastore larger than one "
        "replica's memory, shards on `datastore` nodes); target: the whole datastore loaded into each target "
        "replica, no RPC per step (a datastore that fits beside the model; the fast choice on CPUs)",
    )

    @property
    def served(self) -> str:
        return self.model_id(self.model)


class SpeculativeAppArgs(ReplicaResources):
    """Arguments of the speculative app's `build_app` (`serve run ... key=value` or serve_config.yaml)."""

    target: str = Field(description="HF causal LM: a save_pretrained folder with its tokenizer, or a hub name")
    drafters: dict[str, str] = Field({}, description="drafter name (chosen per request) -> saved drafter folder")
    default_drafter: str | None = Field(
        None, description=f"drafter of requests that name none; default: the first drafter, else {NO_DRAFTER!r}"
    )
    default_gamma: int = Field(4, ge=1, le=MAX_GAMMA, description="draft length of requests that name none")
    max_sessions: int = Field(256, ge=1, description="drafter sessions kept per drafter replica (LRU evicted)")
    drafter_num_cpus: float = Field(
        0, ge=0, description="CPUs of each drafter replica; 0: a drafter and its target take turns"
    )
    drafter_num_gpus: float = Field(0, ge=0, description="GPUs of each drafter replica")
    target_replicas: int | None = Field(
        None, ge=1, description="a fixed count of target replicas; default: Serve's (serve_config.yaml autoscales)"
    )
    drafter_placement: Literal["replica", "target"] = Field(
        "replica",
        description="replica: one deployment per drafter, reached once per step (scales apart, may hold a GPU); "
        "target: every drafter inside each target replica, no round trip (cheap CPU drafters such as n-grams)",
    )
    drafter_transport: Literal["auto", "serve"] = Field(
        "auto",
        description="auto: a loopback socket to a drafter replica on the target's node, Serve handle "
        "calls otherwise; serve: always the latter (slower per step)",
    )

    @field_validator("drafters", mode="before")
    @classmethod
    def _json_drafters(cls, value: Any) -> Any:
        # `serve run ... drafters={"a": "path"}` and $DISTILRAY_DRAFTERS hand over a JSON string
        if isinstance(value, str):
            try:
                return json.loads(value) if value.strip() else {}
            except json.JSONDecodeError as exc:
                raise ValueError(f"not a JSON object of name -> folder: {exc}") from None
        return value

    @field_validator("drafters")
    @classmethod
    def _drafter_names(cls, value: dict[str, str]) -> dict[str, str]:
        for name in value:
            if name == NO_DRAFTER or not DRAFTER_NAME.match(name):
                raise ValueError(f"drafter name {name!r} must match {DRAFTER_NAME.pattern} and not be {NO_DRAFTER!r}")
        return value

    @property
    def served(self) -> str:
        return self.model_id(self.target)

    @model_validator(mode="after")
    def _resolve_default_drafter(self) -> "SpeculativeAppArgs":
        if self.default_drafter is None:
            self.default_drafter = next(iter(self.drafters), NO_DRAFTER)
        if self.default_drafter != NO_DRAFTER and self.default_drafter not in self.drafters:
            raise ValueError(
                f"default_drafter {self.default_drafter!r} is not one of the drafters "
                f"({', '.join(self.drafters) or 'none configured'}) nor {NO_DRAFTER!r}"
            )
        return self


# -- HTTP requests -----------------------------------------------------------------------------------


class CompletionRequest(BaseModel):
    """The OpenAI completions fields both apps take; validated in field order, so the 400 names the first."""

    model: str | None = Field(None, description="the app's served_model_name, or absent")
    prompt: str = Field(min_length=1, description="the text to continue")
    max_tokens: int = Field(16, ge=0, description="tokens to generate at most (the app caps it: max_tokens_limit)")
    temperature: float = Field(0.0, ge=0.0, allow_inf_nan=False, description="0: greedy")
    top_p: float = Field(1.0, ge=0.0, le=1.0, allow_inf_nan=False, description="nucleus sampling mass")
    seed: int | None = Field(None, ge=SEED_MIN, lt=SEED_END, description="sampling seed (64 bits)")
    n: Literal[1] = Field(1, description="choices: these apps serve one")
    stream: bool = Field(False, description="send the text as server-sent events while it is generated")
    stream_options: dict[str, Any] | None = Field(None, description="accepted; the last event carries usage")
    stop: list[str] = Field(default_factory=list, description="up to 4 strings; the text ends before the first")

    @field_validator("stop", mode="before")
    @classmethod
    def _one_stop_string(cls, value: Any) -> Any:
        return [value] if isinstance(value, str) else [] if value is None else value  # OpenAI takes str | list

    @field_validator("stop")
    @classmethod
    def _stop_strings(cls, value: list[str]) -> list[str]:
        if len(value) > 4 or not all(value):
            raise PydanticCustomError(
                "stop", "stop takes at most 4 non-empty strings, got {value}", {"value": repr(value)}
            )
        return value

    @field_validator("model")
    @classmethod
    def _served_model(cls, value: str | None, info: ValidationInfo) -> str | None:
        served = getattr(app_args_of(info), "served", None)
        if value is not None and served is not None and value != served:
            raise PydanticCustomError(
                "model_not_found",
                "the model {value} is not served here; this app serves {served}",
                {"value": repr(value), "served": repr(served)},
            )
        return value

    @field_validator("prompt", check_fields=False)
    @classmethod
    def _prompt_size(cls, value: Any, info: ValidationInfo) -> Any:
        _check_prompt_bytes(len(value.encode()) if isinstance(value, str) else 0, info)
        return value

    @field_validator("max_tokens")
    @classmethod
    def _within_server_limit(cls, value: int, info: ValidationInfo) -> int:
        args = app_args_of(info)
        if args is not None and value > args.max_tokens_limit:
            raise PydanticCustomError(
                "max_tokens_limit",
                "must be <= {limit} on this server, got {value}",
                {"limit": args.max_tokens_limit, "value": value},
            )
        return value

    def text_input(self) -> "str | list[dict[str, str]]":
        """What the target renders into prompt tokens: the prompt, or a chat's messages."""
        return self.prompt

    def sampling(self, seed: int) -> SamplingParams:
        """The decoder's sampling parameters; `seed` stands in for a missing one (the app decides how)."""
        return SamplingParams(
            max_new_tokens=self.max_tokens,
            temperature=float(self.temperature),
            top_p=float(self.top_p),
            seed=self.seed if self.seed is not None else seed,
        )

    def method(self, args: Any) -> Any:
        """The app's decoding method parameters (SpeculativeParams, RetrievalParams) for this request."""
        return None

    def job(self, args: Any, seed: int) -> "TextJob":
        """What the target decodes for this request; `seed` stands in for a missing one."""
        return TextJob(self.text_input(), self.sampling(seed), self.stop, self.method(args))


def _check_prompt_bytes(size: int, info: ValidationInfo) -> None:
    """Refuse a prompt over the app's max_prompt_bytes before anything tokenises it."""
    limit = getattr(app_args_of(info), "max_prompt_bytes", None)
    if limit is not None and size > limit:
        raise PydanticCustomError(
            "max_prompt_bytes",
            "the prompt is {size} bytes; this server takes at most {limit}",
            {"size": size, "limit": limit},
        )


class ChatMessage(BaseModel):
    """One message of a chat: OpenAI's role and text content."""

    role: Literal["system", "user", "assistant", "developer"]
    content: str


class ChatFields(BaseModel):
    """What a chat completion takes instead of a prompt; the target renders it with the chat template."""

    prompt: None = Field(None, exclude=True, description="chats send messages")
    messages: list[ChatMessage] = Field(min_length=1, description="the conversation so far")
    max_completion_tokens: int | None = Field(None, ge=0, description="OpenAI's newer name for max_tokens")

    @model_validator(mode="before")
    @classmethod
    def _newer_max_tokens(cls, body: Any) -> Any:
        if isinstance(body, dict) and body.get("max_completion_tokens") is not None and "max_tokens" not in body:
            body = {**body, "max_tokens": body["max_completion_tokens"]}
        return body

    @field_validator("messages")
    @classmethod
    def _messages_size(cls, value: list[ChatMessage], info: ValidationInfo) -> list[ChatMessage]:
        _check_prompt_bytes(sum(len(m.content.encode()) for m in value), info)
        return value

    def text_input(self) -> "str | list[dict[str, str]]":
        return [m.model_dump() for m in self.messages]


class RetrievalRequest(CompletionRequest):
    """A completion for the CD-LM app; `mode` and `similarity_threshold` are distilray's own fields."""

    max_tokens: int = Field(50, ge=0, description="tokens to generate at most (the app caps it: max_tokens_limit)")
    mode: Mode | None = Field(None, description="how chunks are used; default: the app's default_mode")
    similarity_threshold: float | None = Field(
        None, ge=-1.0, le=1.0, allow_inf_nan=False, description="cosine threshold; default: the app's"
    )

    def method(self, args: RetrievalAppArgs) -> RetrievalParams:
        threshold = self.similarity_threshold if self.similarity_threshold is not None else args.similarity_threshold
        return RetrievalParams(self.mode or args.default_mode, float(threshold))


class SpeculativeRequest(CompletionRequest):
    """A completion for the speculative app; `gamma`, `drafter` and `adaptive_gamma` are distilray's own."""

    gamma: int | None = Field(None, ge=1, le=MAX_GAMMA, description="draft length; default: the app's")
    drafter: str | None = Field(None, description=f"a configured drafter name or {NO_DRAFTER!r}; default: the app's")
    adaptive_gamma: bool = Field(False, description="grow gamma after accepted blocks, shrink it after misses")

    @field_validator("drafter")
    @classmethod
    def _known_drafter(cls, value: str | None, info: ValidationInfo) -> str | None:
        args = app_args_of(info)
        if value is not None and args is not None and value != NO_DRAFTER and value not in args.drafters:
            raise PydanticCustomError(
                "unknown_drafter",
                "unknown drafter {name}; drafters: {names}",
                {"name": repr(value), "names": ", ".join([*args.drafters, NO_DRAFTER])},
            )
        return value

    def drafter_name(self, args: SpeculativeAppArgs) -> str:
        return self.drafter if self.drafter is not None else args.default_drafter

    def job(self, args: SpeculativeAppArgs, seed: int) -> "TextJob":
        return dataclasses.replace(super().job(args, seed), drafter=self.drafter_name(args))

    def method(self, args: SpeculativeAppArgs) -> SpeculativeParams:
        gamma = self.gamma if self.gamma is not None else args.default_gamma
        return SpeculativeParams(
            gamma=gamma, adaptive_gamma=self.adaptive_gamma, gamma_max=max(gamma, ADAPTIVE_GAMMA_MAX)
        )


class RetrievalChatRequest(ChatFields, RetrievalRequest):
    """POST /v1/chat/completions of the CD-LM app."""


class SpeculativeChatRequest(ChatFields, SpeculativeRequest):
    """POST /v1/chat/completions of the speculative app."""


# -- between deployments -----------------------------------------------------------------------------


class SpeculativeStats(BaseModel):
    """The `distilray` block of a speculative completion (before the HTTP handler adds request_seconds)."""

    drafter: str
    gamma: int | None
    adaptive_gamma: bool
    drafted: int
    accepted: int
    rejections: int
    target_passes: int
    generated_tokens: int
    mean_accepted_length: float | None
    alpha: float | None
    draft_acceptance_rate: float | None
    seconds: float
    tokens_per_s: float | None
    drafter_round_trips: int = 0
    round_trip_seconds: float = 0.0  # wall time the target waited on the drafter
    drafter_seconds: float = 0.0  # compute inside the drafter
    composition_seconds: float = 0.0  # their difference: serialisation, transport, scheduling
    session_restarts: int = 0
    drafter_transport: str | None = None  # socket | serve | local (prompt lookup runs in the target)
    replica: str | None = None  # the target replica that decoded it


class RetrievalStats(BaseModel):
    """The `distilray` block of a CD-LM completion."""

    mode: str
    chunks_used: int
    forward_passes: int
    tokens_from_chunks: int
    steps: int
    lookups: int  # queries this request sent (each step's are one batched call with the other rows')
    seconds: float
    replica: str | None = None  # the target replica that decoded it


class Completion(BaseModel):
    """A target deployment's answer to one request."""

    text: str
    finish_reason: Literal["stop", "length"]
    prompt_tokens: int
    completion_tokens: int
    stats: SpeculativeStats | RetrievalStats


class GenerationFailure(BaseModel):
    """A request the target could not serve: the HTTP handler answers `status` with `message`."""

    message: str
    status: int = 400


@dataclass(frozen=True)
class TextJob:
    """One request as a text app's HTTP handler hands it to the decoding."""

    text_input: str | list[dict[str, str]]  # a prompt, or a chat's messages (the target renders them)
    sampling: SamplingParams
    stop: list[str]
    method: Any = None  # SpeculativeParams or RetrievalParams
    drafter: str = NO_DRAFTER


class TextStart(BaseModel):
    """First item of a text stream: the request was accepted."""

    prompt_tokens: int


class TextDelta(BaseModel):
    """Text a stream adds: one emitted block (an accepted draft block and its correction, or a chunk)."""

    text: str
    tokens: int


StreamItem = TextStart | TextDelta | Completion | GenerationFailure


@dataclass(frozen=True)
class DraftRequest:
    """One speculative step asked of a drafter session: sync the state, then draft `gamma` tokens.

    keep None starts the session on `tokens`; otherwise the session rolls back to `keep` tokens and
    pushes `tokens`. The drafter samples with its own generator seeded by `seed`.
    """

    session: str
    keep: int | None
    tokens: list[int]
    gamma: int
    temperature: float
    top_p: float
    seed: int

    def sampling(self) -> SamplingParams:
        return SamplingParams(max_new_tokens=self.gamma, temperature=self.temperature, top_p=self.top_p, seed=self.seed)


@dataclass(frozen=True)
class DraftReply:
    """The drafts, their q rows (gamma, V) float32 when sampled, and the drafter's compute seconds;
    or unknown_session when the drafter does not hold the session (evicted, restarted)."""

    drafts: list[int]
    q: np.ndarray | None = None
    seconds: float = 0.0
    unknown_session: bool = False


@dataclass(frozen=True)
class DrafterChannel:
    """Where a target on the drafter's node reaches it over the loopback socket."""

    port: int
    token: str
    node_id: str | None
