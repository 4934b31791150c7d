"""CD-LM retrieval decoding for any Hugging Face causal LM (reference/cdlm.md 3.5, 7, 8, 10.1, 10.2).

Three modes share one KV-cached loop (the prefix is never recomputed, note 8.5):

- `baseline`: plain decoding, one forward pass per generated token.
- `paper`: after each forward pass the last token and its hidden state query the datastore; a chunk
  whose cosine similarity reaches the threshold is appended unverified (not lossless), and the next
  forward pass covers all its tokens at once.
- `verify`: the chunk is a draft with a point-mass proposal, checked by the speculative rule
  (reference/speculative.md 2), so the output is distributed exactly as the model's own; the KV cache
  is rolled back to the accepted length.

The lookup sees only (last token id, query hidden state); the hidden state is the last layer's
final-norm output, `hidden_states[-1][0, -1]`, the layer the datastore keys must come from.
"""

from __future__ import annotations

import inspect
import time
from dataclasses import asdict, dataclass, field
from typing import Callable, Sequence

import numpy as np
import torch

from distilray.errors import DistilrayError
from distilray.models.causal_lm import check_prompt, input_vocab_size

# (last token id, query hidden state (d,) float32) -> (chunk token ids, cosine similarity) or None
Lookup = Callable[[int, np.ndarray], tuple[tuple[int, ...], float] | None]
MODES = ("baseline", "paper", "verify")


@dataclass
class GenerationRecord:
    """One prompt's generation with the counters behind FPS, TTS and the chunk hit rate."""

    prompt_ids: list[int]
    token_ids: list[int] = field(default_factory=list)  # generated tokens only
    from_chunk: list[bool] = field(default_factory=list)  # per generated token: copied from a chunk
    forward_passes: int = 0  # model calls on new tokens; the prompt prefill counts as 1
    chunks_used: int = 0  # steps whose chunk reached the threshold (appended, or drafted in verify)
    chunk_tokens_proposed: int = 0  # chunk tokens after truncation to the remaining budget
    chunk_tokens_accepted: int = 0  # chunk tokens that ended up in the output
    steps: int = 0  # decisions between "copy a chunk" and "take one LM token"
    seconds: float = 0.0  # wall time, prefill included
    mode: str = "paper"

    def to_json(self, tokenizer=None) -> dict:
        """The per-prompt result (the original eval.py writes one JSON per prompt); text needs a tokenizer."""
        out = asdict(self)
        n = len(self.token_ids)
        out["num_generated"] = n
        out["seconds_per_token"] = self.seconds / n if n else None
        out["fps"] = 1.0 - self.forward_passes / n if n else None
        if tokenizer is not None:
            out["prompt"] = tokenizer.decode(self.prompt_ids)
            out["text"] = tokenizer.decode(self.token_ids)
        return out


class _CachedLM:
    """A causal LM plus its DynamicCache: feeds new tokens, counts forward passes, rolls back."""

    def __init__(self, model, want_hidden: bool) -> None:
        self.model = model
        self.device = next(model.parameters()).device
        self.want_hidden = want_hidden
        self.cache = None  # the model creates a DynamicCache on the first call
        self.forward_passes = 0
        # logits for only the last position save a (T, V) matmul on long prompts and big vocabularies
        self.can_trim_logits = "logits_to_keep" in inspect.signature(model.forward).parameters

    def feed(self, tokens: Sequence[int], all_positions: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Run the model on `tokens` (n,) after the cached prefix.

        Returns logits (n, V) float32 and hidden (n, d) float32 (or None when hidden states are off);
        n is 1 (last position only) unless `all_positions`.
        """
        ids = torch.tensor([list(tokens)], dtype=torch.long, device=self.device)  # (1, n)
        kwargs = {}
        if self.can_trim_logits and not all_positions:
            kwargs["logits_to_keep"] = 1
        out = self.model(
            input_ids=ids, past_key_values=self.cache, use_cache=True, output_hidden_states=self.want_hidden, **kwargs
        )
        self.cache = out.past_key_values
        self.forward_passes += 1
        keep = slice(None) if all_positions else slice(-1, None)
        logits = out.logits[0, keep].float()  # (n, V)
        hidden = out.hidden_states[-1][0, keep].float() if self.want_hidden else None  # (n, d)
        return logits, hidden

    def keep_first(self, length: int) -> None:
        """Drop cached positions beyond `length`; crop takes a negative count (transformers 5.x)."""
        extra = self.cache.get_seq_length() - length
        if extra > 0:
            self.cache.crop(-extra)


class _Sampler:
    """Greedy (temperature 0) or seeded multinomial sampling from softmax(logits / T), with exclusions."""

    def __init__(self, temperature: float, seed: int, device: torch.device) -> None:
        self.temperature = temperature
        self.generator = torch.Generator(device=device).manual_seed(seed) if temperature > 0 else None

    def _dist(self, logits: torch.Tensor, exclude: frozenset[int] | set[int]) -> torch.Tensor:
        """logits (V,) -> probabilities (V,) with `exclude` removed and renormalised: norm(max(0, p - delta))."""
        probs = torch.softmax(logits / self.temperature, dim=-1)
        if exclude:
            masked = probs.clone()
            masked[list(exclude)] = 0.0
            total = masked.sum()
            # rounding can leave nothing to renormalise; fall back to p (speculative.md numerical guard)
            probs = masked / total if total > 0 else probs
        return probs

    def pick(self, logits: torch.Tensor, exclude: frozenset[int] | set[int] = frozenset()) -> int:
        """One token from logits (V,)."""
        if self.generator is None:
            if exclude:
                logits = logits.clone()
                logits[list(exclude)] = float("-inf")
            return int(torch.argmax(logits))
        probs = self._dist(logits, exclude)
        return int(torch.multinomial(probs, 1, generator=self.generator))

    def accept(self, logits: torch.Tensor, token: int, exclude: frozenset[int] | set[int] = frozenset()) -> bool:
        """Point-mass draft test: accept with probability p(token); greedy accepts only the argmax."""
        if self.generator is None:
            return token == self.pick(logits, exclude)
        probs = self._dist(logits, exclude)
        u = torch.rand((), generator=self.generator, device=probs.device)
        return bool(u < probs[token])


def _validate(
    model, prompt_ids: Sequence[int], max_new_tokens: int, mode: str, threshold: float, temperature: float
) -> None:
    if mode not in MODES:
        raise DistilrayError(f"unknown retrieval decoding mode {mode!r}; modes: {', '.join(MODES)}")
    if not -1.0 <= threshold <= 1.0:  # also rejects NaN
        raise DistilrayError(f"similarity_threshold is a cosine similarity and must lie in [-1, 1], got {threshold}")
    if temperature < 0:
        raise DistilrayError(f"temperature must be >= 0, got {temperature}")
    check_prompt(model, prompt_ids, max_new_tokens)


def _query(
    lookup: Lookup, last_token: int, hidden: torch.Tensor, threshold: float, vocab: int
) -> tuple[int, ...] | None:
    """The chunk to use after `last_token`, or None on a miss. hidden: (d,) float32 on any device."""
    found = lookup(int(last_token), hidden.detach().cpu().numpy().astype(np.float32, copy=False))
    if found is None:
        return None
    chunk, similarity = found
    if len(chunk) == 0 or not similarity >= threshold:
        return None
    chunk = tuple(int(t) for t in chunk)
    if not all(0 <= t < vocab for t in chunk):
        raise DistilrayError(f"the lookup returned a chunk with token ids outside the vocabulary of {vocab}: {chunk}")
    return chunk


@torch.inference_mode()
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
) -> GenerationRecord:
    """Continue `prompt_ids` by up to `max_new_tokens` tokens, copying retrieved chunks where they match.

    `lookup` is ignored in `baseline` mode; None in the other modes means "never a hit". Generation stops
    after `eos_token_id` when it is given. Greedy `verify` output equals greedy `baseline` output.
    """
    _validate(model, prompt_ids, max_new_tokens, mode, similarity_threshold, temperature)
    record = GenerationRecord(prompt_ids=[int(t) for t in prompt_ids], mode=mode)
    if mode == "baseline":
        lookup = None
    start = time.perf_counter()
    if max_new_tokens > 0:
        lm = _CachedLM(model, want_hidden=lookup is not None)
        sampler = _Sampler(temperature, seed, lm.device)
        loop = _verify_loop if mode == "verify" else _append_loop
        loop(lm, sampler, record, max_new_tokens, lookup, similarity_threshold, eos_token_id)
        record.forward_passes = lm.forward_passes
    record.seconds = time.perf_counter() - start
    return record


def _emit(record: GenerationRecord, token: int, from_chunk: bool, budget: int, eos: int | None) -> bool:
    """Append one generated token; True when generation must stop (budget spent or EOS)."""
    record.token_ids.append(token)
    record.from_chunk.append(from_chunk)
    if from_chunk:
        record.chunk_tokens_accepted += 1
    return len(record.token_ids) >= budget or (eos is not None and token == eos)


def _append_loop(lm: _CachedLM, sampler: _Sampler, record: GenerationRecord, budget: int,
                 lookup: Lookup | None, threshold: float, eos: int | None) -> None:
    """baseline and paper modes: each forward pass yields the next query and the fallback distribution."""
    vocab = input_vocab_size(lm.model)
    logits, hidden = lm.feed(record.prompt_ids)
    last = record.prompt_ids[-1]
    while True:
        record.steps += 1
        chunk = _query(lookup, last, hidden[-1], threshold, vocab) if lookup is not None else None
        if chunk:
            # unverified copy (note 3.5 step 3), truncated to the budget (step 5)
            chunk = chunk[: budget - len(record.token_ids)]
            record.chunks_used += 1
            record.chunk_tokens_proposed += len(chunk)
            new: list[int] = []
            for token in chunk:
                new.append(token)
                if done := _emit(record, token, True, budget, eos):
                    break
        else:
            new = [sampler.pick(logits[-1])]
            done = _emit(record, new[0], False, budget, eos)
        if done:  # the last tokens need no forward pass: nothing will read their logits
            return
        # one pass over every new token: their keys and values enter the cache, the last one is the next query
        logits, hidden = lm.feed(new)
        last = new[-1]


def _verify_loop(lm: _CachedLM, sampler: _Sampler, record: GenerationRecord, budget: int,
                 lookup: Lookup | None, threshold: float, eos: int | None) -> None:
    """verify mode: chunks are point-mass drafts checked by the speculative rule (note 10.1).

    State between steps: every emitted token is in the cache, `logits` (V,) is p(. | prefix) at the last
    one and `exclude` holds the drafts already rejected at the next position, so the next token is drawn
    from norm(max(0, p - delta)) over them. After a fully accepted chunk the bonus token from its last
    position is drawn in the next step, as the next chunk's verified first token or as a plain sample;
    this keeps every lookup on a true (token, hidden state) pair at no extra forward pass.
    """
    vocab = input_vocab_size(lm.model)
    all_logits, all_hidden = lm.feed(record.prompt_ids)
    logits, hidden, last = all_logits[-1], _last(all_hidden), record.prompt_ids[-1]
    exclude: set[int] = set()
    while True:
        record.steps += 1
        chunk = _query(lookup, last, hidden, threshold, vocab) if lookup is not None else None
        if chunk:
            chunk = chunk[: budget - len(record.token_ids)]
            record.chunks_used += 1
            record.chunk_tokens_proposed += len(chunk)
        # the first draft is checked against the distribution in hand, so a wrong chunk costs no pass
        if not chunk or not sampler.accept(logits, chunk[0], exclude):
            token = sampler.pick(logits, exclude | ({chunk[0]} if chunk else set()))
            if _emit(record, token, False, budget, eos):
                return
            all_logits, all_hidden = lm.feed([token])
            logits, hidden, last, exclude = all_logits[-1], _last(all_hidden), token, set()
            continue
        if _emit(record, chunk[0], True, budget, eos):
            return
        cached = lm.cache.get_seq_length()
        # one pass over the whole chunk gives p after c_1..c_tau: (tau, V)
        all_logits, all_hidden = lm.feed(chunk, all_positions=True)
        kept, exclude = 1, set()
        for k in range(1, len(chunk)):
            if not sampler.accept(all_logits[k - 1], chunk[k]):
                exclude = {chunk[k]}  # the residual at this position excludes the rejected draft
                break
            kept += 1
            if _emit(record, chunk[k], True, budget, eos):
                return
        lm.keep_first(cached + kept)  # roll the cache back to the accepted length (note 10.2)
        logits, last = all_logits[kept - 1], chunk[kept - 1]
        hidden = all_hidden[kept - 1] if all_hidden is not None else None


def _last(hidden: torch.Tensor | None) -> torch.Tensor | None:
    return hidden[-1] if hidden is not None else None


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
