"""CD-LM retrieval decoding for any Hugging Face causal LM (reference/cdlm.md 3.5, 7, 8, 10.1, 10.2).

Three modes, all KV-cached (the prefix is never recomputed, note 8.5):

- `baseline`: plain decoding (speculative.plain_decode), one forward pass per generated token.
- `paper`: after each forward pass the last token and its hidden state query the datastore; a chunk
  whose cosine similarity reaches the threshold is appended unverified (not lossless), and the next
  forward pass covers all its tokens at once. Its own small loop, below.
- `verify`: the chunk is a draft with a point-mass proposal (decoding/chunk_drafter.py) run through the
  speculative loop (reference/speculative.md 2), so the output is distributed exactly as the model's
  own; the KV cache is rolled back to the accepted length.

The lookup sees only (last token id, query hidden state); the hidden state is the last layer's
final-norm output, `hidden_states[-1][0, -1]`, the layer the datastore keys must come from.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from typing import Literal, Sequence, get_args

import torch

from distilray.decoding.cached_model import CachedModel
from distilray.decoding.chunk_drafter import ChunkDrafter, Lookup, query_chunk
from distilray.decoding.drafter_api import model_vocab_size
from distilray.decoding.sampling import Sampler, SamplingParams, reached_stop
from distilray.decoding.speculative import (
    MAX_GAMMA,
    SpecRecord,
    SpeculativeParams,
    TokenHook,
    check_request,
    plain_decode,
    speculative_decode,
)
from distilray.errors import DistilrayError

Mode = Literal["baseline", "paper", "verify"]
MODES: tuple[str, ...] = get_args(Mode)


@dataclass
class GenerationRecord:
    """One prompt's generation with the counters behind FPS, TTS and the chunk hit rate."""

    prompt_ids: list[int]
    token_ids: list[int] = field(default_factory=list)  # generated tokens only
    from_chunk: list[bool] = field(default_factory=list)  # per generated token: copied from a chunk
    forward_passes: int = 0  # model calls on new tokens; the prompt prefill counts as 1
    chunks_used: int = 0  # steps that used a chunk (appended in paper mode, drafted in verify)
    chunk_tokens_proposed: int = 0  # chunk tokens after truncation to the remaining budget
    chunk_tokens_accepted: int = 0  # chunk tokens that ended up in the output
    steps: int = 0  # decisions between "copy a chunk" and "take one LM token" (verify: one per forward pass)
    seconds: float = 0.0  # wall time, prefill included
    mode: str = "paper"
    on_token: TokenHook | None = field(default=None, repr=False, compare=False)  # sees each token as emitted

    def to_json(self, tokenizer=None) -> dict:
        """The per-prompt result (the original eval.py writes one JSON per prompt); text needs a tokenizer."""
        out = asdict(self)
        del out["on_token"]  # a hook, not a result
        n = len(self.token_ids)
        out["num_generated"] = n
        out["seconds_per_token"] = self.seconds / n if n else None
        out["fps"] = 1.0 - self.forward_passes / n if n else None
        if tokenizer is not None:
            out["prompt"] = tokenizer.decode(self.prompt_ids)
            out["text"] = tokenizer.decode(self.token_ids)
        return out


@dataclass(frozen=True)
class RetrievalParams:
    """The CD-LM method: how chunks are used, and how similar a key must be for its chunk to count."""

    mode: Mode = "paper"
    similarity_threshold: float = 0.5  # cosine similarity of the query to the key

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise DistilrayError(f"unknown retrieval decoding mode {self.mode!r}; modes: {', '.join(MODES)}")
        if not -1.0 <= self.similarity_threshold <= 1.0:  # also rejects NaN
            raise DistilrayError(
                f"similarity_threshold is a cosine similarity and must lie in [-1, 1], got {self.similarity_threshold}"
            )


@torch.inference_mode()
def retrieval_decode(
    model,
    prompt_ids: list[int],
    lookup: Lookup | None,
    params: SamplingParams,
    method: RetrievalParams = RetrievalParams(),
    vocab_limit: int | None = None,
    on_token: TokenHook | None = None,
) -> GenerationRecord:
    """Continue `prompt_ids` by up to params.max_new_tokens tokens, copying retrieved chunks where they match.

    `lookup` is ignored in `baseline` mode; None in the other modes means "never a hit". Greedy `verify`
    output equals greedy `baseline` output. vocab_limit: the tokenizer's length when the model's logits
    are padded past it (those ids are never sampled, and a chunk holding one is an error). on_token
    sees each generated token as it is emitted (a server streams with it).
    """
    check_request(model, prompt_ids, params, vocab_limit=vocab_limit)
    record = GenerationRecord(prompt_ids=[int(t) for t in prompt_ids], mode=method.mode, on_token=on_token)
    vocab = vocab_limit or model_vocab_size(model)  # the ids a chunk may hold
    if method.mode == "baseline" or lookup is None:
        _from_spec(
            record,
            plain_decode(model, record.prompt_ids, params, vocab_limit=vocab_limit, on_token=on_token),
            chunks_used=0,
        )
    elif method.mode == "verify":
        drafter = ChunkDrafter(lookup, method.similarity_threshold, vocab)
        # a chunk is drafted whole: gamma only caps it (the budget cuts it too)
        gamma = SpeculativeParams(gamma=MAX_GAMMA)
        spec = speculative_decode(
            model, drafter, record.prompt_ids, params, gamma, vocab_limit=vocab_limit, on_token=on_token
        )
        _from_spec(record, spec, drafter.chunks_used)
    else:
        start = time.perf_counter()
        if params.max_new_tokens > 0:
            sampler = Sampler(params, vocab_limit)
            _paper_loop(CachedModel(model), sampler, record, params, lookup, method.similarity_threshold, vocab)
        record.seconds = time.perf_counter() - start
    return record


def retrieval_generate(
    model,
    prompt_ids: list[int],
    max_new_tokens: int,
    lookup: Lookup | None,
    mode: str = "paper",
    similarity_threshold: float = 0.5,
    temperature: float = 0.0,
    seed: int = 0,
    eos_token_id: int | None = None,
    top_p: float = 1.0,
    vocab_limit: int | None = None,
) -> GenerationRecord:
    """`retrieval_decode` with its parameters as keywords."""
    params = SamplingParams(max_new_tokens, temperature, top_p, seed, eos_token_id)
    method = RetrievalParams(mode, similarity_threshold)
    return retrieval_decode(model, prompt_ids, lookup, params, method, vocab_limit)


def _from_spec(record: GenerationRecord, spec: SpecRecord, chunks_used: int) -> None:
    """Fill a CD-LM record from the speculative loop's: its drafts were the chunks."""
    record.token_ids, record.from_chunk = spec.token_ids, spec.from_draft
    record.forward_passes = record.steps = spec.target_passes  # each step is one pass
    record.seconds, record.chunks_used = spec.seconds, chunks_used
    record.chunk_tokens_proposed, record.chunk_tokens_accepted = spec.drafted, spec.accepted


def _emit(record: GenerationRecord, token: int, from_chunk: bool, params: SamplingParams) -> bool:
    """Append one generated token; True when generation must stop (budget spent or EOS)."""
    record.token_ids.append(token)
    record.from_chunk.append(from_chunk)
    record.chunk_tokens_accepted += from_chunk
    if record.on_token is not None:
        record.on_token(token)
    return reached_stop(record.token_ids, params)


def _paper_loop(
    lm: CachedModel,
    sampler: Sampler,
    record: GenerationRecord,
    params: SamplingParams,
    lookup: Lookup,
    threshold: float,
    vocab: int,
) -> None:
    """paper mode: each forward pass yields the next query and the fallback distribution (note 3.5);
    `vocab`: chunk ids must lie below it."""
    budget = params.max_new_tokens
    fed = lm.feed(record.prompt_ids, hidden=True)
    last = record.prompt_ids[-1]
    while True:
        record.steps += 1
        chunk = query_chunk(lookup, last, fed.hidden[-1], threshold, vocab)
        if chunk:
            # unverified copy (note 3.5 step 3), truncated to the budget (step 5)
            chunk = chunk[: budget - len(record.token_ids)]
            record.chunks_used += 1
            record.chunk_tokens_proposed += len(chunk)
            new: list[int] = []
            for token in chunk:
                new.append(token)
                if done := _emit(record, token, True, params):
                    break
        else:
            new = [sampler.sample(sampler.warp(fed.logits[-1]))]
            done = _emit(record, new[0], False, params)
        if done:  # the last tokens need no forward pass: nothing will read their logits
            break
        # one pass over every new token: their keys and values enter the cache, the last one is the next query
        fed = lm.feed(new, hidden=True)
        last = new[-1]
    record.forward_passes = lm.passes


def _totals(records: Sequence[GenerationRecord]) -> tuple[int, float]:
    tokens = sum(len(r.token_ids) for r in records)
    if tokens == 0:
        raise DistilrayError("no generated tokens: the metric is undefined")
    return tokens, sum(r.seconds for r in records)


def fps(records: Sequence[GenerationRecord]) -> float:
    """Forward passes saved, as a fraction: 1 - F / T_gen over all records (cdlm.md 7); baseline gives 0."""
    tokens, _ = _totals(records)
    return 1.0 - sum(r.forward_passes for r in records) / tokens


def tts(baseline_records: Sequence[GenerationRecord], cd_records: Sequence[GenerationRecord]) -> float:
    """Time per token saved, as a fraction: (t_LM - t_CD) / t_LM with t = wall time / generated tokens."""
    base_tokens, base_seconds = _totals(baseline_records)
    cd_tokens, cd_seconds = _totals(cd_records)
    t_lm, t_cd = base_seconds / base_tokens, cd_seconds / cd_tokens
    if t_lm <= 0:
        raise DistilrayError("the baseline took no measurable time: TTS is undefined")
    return (t_lm - t_cd) / t_lm


def chunk_hit_rate(records: Sequence[GenerationRecord]) -> float:
    """Share of decoding steps that used a chunk (appended in paper mode, drafted in verify mode)."""
    steps = sum(r.steps for r in records)
    if steps == 0:
        raise DistilrayError("no decoding steps: the chunk hit rate is undefined")
    return sum(r.chunks_used for r in records) / steps


def mean_chunk_length(records: Sequence[GenerationRecord]) -> float:
    """Chunk tokens that reached the output per chunk used (0.0 when no chunk was used)."""
    used = sum(r.chunks_used for r in records)
    return sum(r.chunk_tokens_accepted for r in records) / used if used else 0.0
