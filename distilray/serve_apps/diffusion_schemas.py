"""The diffusion app's types (serve_apps/diffusion.py): builder arguments, the request, and what the
replica streams back. Validation as in schemas.py: ranges in `Field`, app-dependent checks in
validators that read the app's arguments from the validation context.

No `from __future__ import annotations`: pydantic and FastAPI read these annotations at runtime.
"""

from dataclasses import dataclass
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator, model_validator
from pydantic_core import PydanticCustomError

from distilray.decoding.mdlm import MAX_STEPS
from distilray.serve_apps.schemas import SEED_END, SEED_MIN, Completion, GenerationFailure, app_args_of

MASK_PLACEHOLDER = "▁"  # one per still-masked position in the text of a denoising event


class DiffusionAppArgs(BaseModel):
    """Arguments of the diffusion app's `build_app` (`serve run ... key=value` or serve_config.yaml)."""

    model_config = ConfigDict(extra="forbid")

    model: str = Field(description="a train-mdlm or distill-sdtt model folder (EMA weights used) with its tokenizer")
    default_num_steps: int = Field(64, ge=1, le=MAX_STEPS, description="denoising steps of requests that name none")
    max_num_steps: int = Field(
        1024, ge=1, le=MAX_STEPS, description="the largest num_steps a request may ask for (each step is a forward)"
    )
    cache_predictions: bool = Field(
        True,
        description="reuse the model's prediction after a step that revealed nothing (exact; saves forward passes "
        "when num_steps exceeds the sequence length)",
    )
    num_cpus: float = Field(
        1, ge=0, description="CPUs of the diffusion replica (torch threads = max(1, int(num_cpus)))"
    )
    num_gpus: float = Field(0, ge=0, description="GPUs of the diffusion replica")
    max_concurrency: int = Field(
        8,
        ge=1,
        description="requests a diffusion replica holds at once (Serve's max_ongoing_requests); it samples "
        "one at a time, the others wait their turn",
    )

    @model_validator(mode="after")
    def _default_within_limit(self) -> "DiffusionAppArgs":
        if self.default_num_steps > self.max_num_steps:
            raise ValueError(f"default_num_steps {self.default_num_steps} exceeds max_num_steps {self.max_num_steps}")
        return self


class DiffusionRequest(BaseModel):
    """A completion for the diffusion app; unknown fields are refused (a diffusion LM has no top_p, stop...).

    The sample is always the model's whole sequence (seq_len positions, denoised together): the prompt's
    tokens, after bos, are its fixed prefix, and the rest is generated. `max_tokens` only cuts the text
    returned (the first max_tokens generated tokens); it does not make sampling cheaper.
    """

    model_config = ConfigDict(extra="forbid")

    model: str | None = Field(None, description="accepted and echoed: the app serves one model")
    prompt: str | None = Field(None, description="text the sample continues; empty or absent: unconditional")
    max_tokens: int | None = Field(
        None, ge=0, description="generated tokens returned at most; default: all (seq_len - prompt tokens)"
    )
    num_steps: int | None = Field(None, ge=1, le=MAX_STEPS, description="denoising steps; default: the app's")
    temperature: float = Field(1.0, gt=0.0, allow_inf_nan=False, description="divides the logits; 1: the model's own")
    seed: int | None = Field(None, ge=SEED_MIN, lt=SEED_END, description="sampling seed (64 bits)")
    n: Literal[1] = Field(1, description="choices: this app serves one")
    stream: bool = Field(False, description="send each denoising step as a server-sent event")

    @field_validator("num_steps")
    @classmethod
    def _within_server_limit(cls, value: int | None, info: ValidationInfo) -> int | None:
        args = app_args_of(info)
        if value is not None and args is not None and value > args.max_num_steps:
            raise PydanticCustomError(
                "max_num_steps",
                "must be <= {limit} on this server, got {value}",
                {"limit": args.max_num_steps, "value": value},
            )
        return value

    def params(self, args: DiffusionAppArgs, seed: int) -> "DiffusionParams":
        """What the diffusion deployment samples with; `seed` stands in for a missing one."""
        return DiffusionParams(
            num_steps=self.num_steps if self.num_steps is not None else args.default_num_steps,
            temperature=float(self.temperature),
            seed=self.seed if self.seed is not None else seed,
            max_tokens=self.max_tokens,
        )


@dataclass(frozen=True)
class DiffusionParams:
    """One request's sampling parameters, as the diffusion deployment receives them."""

    num_steps: int
    temperature: float
    seed: int
    max_tokens: int | None = None


class DiffusionStats(BaseModel):
    """The `distilray` block of a diffusion completion (before the ingress adds request_seconds)."""

    num_steps: int
    nfe: int  # forward passes run (the prediction cache skips some; the final noise removal may add one)
    seconds: float
    tokens_per_s: float | None  # sampled positions (seq_len - prompt_tokens) per second
    prompt_tokens: int
    seq_len: int
    temperature: float
    seed: int
    token_ids: list[int]  # the whole sampled sequence, prompt included


class DiffusionCompletion(Completion):
    """The diffusion deployment's answer to one request."""

    stats: DiffusionStats


class DiffusionFailure(GenerationFailure):
    """A request the diffusion deployment could not serve; `param` names the request field at fault."""

    param: str | None = None


class DiffusionStart(BaseModel):
    """First item of a denoising stream: the request was accepted."""

    prompt_tokens: int
    seq_len: int
    num_steps: int


class DiffusionStep(BaseModel):
    """One denoising step of a stream: time t_j -> t_{j+1}, the positions it revealed and their tokens.

    Positions index the whole sequence (the prompt holds 0..prompt_tokens-1). `text` is the generated
    part so far, MASK_PLACEHOLDER at each still-masked position. The last step also holds what the final
    noise removal at t = eps revealed (argmax at positions still masked), listed again in noise_removed.
    """

    step: int  # 1..num_steps
    num_steps: int
    t: float  # the time after this step
    positions: list[int]
    token_ids: list[int]
    noise_removed: list[int] = []
    masked: int  # positions still masked after this step
    text: str
