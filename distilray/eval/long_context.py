"""Long-context metrics: per-token losses, LongPPL, position-bucket perplexity, retrieval probes.

reference/token_weighting.md sections 6 and 7. Loss vectors follow one convention throughout: for a
sequence of L tokens, loss index i is -log p(x_{i+1} | context), so a vector has L - 1 entries and
loss index i has i + 1 tokens of full context.
"""

from __future__ import annotations

import bisect
import contextlib
import math
import random
from dataclasses import dataclass
from typing import Iterator, Sequence

import torch

from distilray.errors import DistilrayError

Span = tuple[int, int]


# --- per-token losses ------------------------------------------------------------------------------------------


def _device(model) -> torch.device:
    try:
        return next(model.parameters()).device
    except (AttributeError, StopIteration):  # parameter-free stubs run on CPU
        return torch.device("cpu")


def _max_positions(model) -> int | None:
    config = getattr(model, "config", None)
    for name in ("max_position_embeddings", "n_positions"):
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def _as_1d(ids) -> torch.Tensor:
    ids = torch.as_tensor(ids, dtype=torch.long)
    if ids.dim() == 2 and ids.shape[0] == 1:
        ids = ids[0]
    if ids.dim() != 1:
        raise DistilrayError(f"expected token ids of shape (L,) or (1, L), got {tuple(ids.shape)}")
    if ids.numel() < 2:
        raise DistilrayError(f"need at least two tokens to score, got {ids.numel()}")
    return ids


@contextlib.contextmanager
def _eval_mode(model) -> Iterator[None]:
    """Dropout off and no grad while scoring; the caller's train/eval mode comes back afterwards (pitfall 8)."""
    was_training = bool(getattr(model, "training", False))
    if hasattr(model, "eval"):
        model.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        if was_training and hasattr(model, "train"):
            model.train(True)


def _target_nll(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """(..., T, V) logits and (..., T) targets -> (..., T) float32 NLL."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    return -logp.gather(-1, targets.unsqueeze(-1)).squeeze(-1)


def token_losses(model, ids, max_window: int | None = None) -> torch.Tensor:
    """(L,) or (1, L) ids -> (L - 1,) float32 NLL of each next token given its full context, on CPU.

    max_window (default: the model's max positions, when its config has one) is a guard: a longer
    sequence raises instead of being scored with a wrapped or truncated context.
    """
    ids = _as_1d(ids)
    limit = max_window if max_window is not None else _max_positions(model)
    if limit is not None and ids.numel() > limit:
        raise DistilrayError(f"sequence of {ids.numel()} tokens is longer than the model's window of {limit}")
    with _eval_mode(model):
        logits = model(input_ids=ids.unsqueeze(0).to(_device(model))).logits[0, :-1]
        return _target_nll(logits, ids[1:].to(logits.device)).cpu()


def short_window_losses(model, ids, short_length: int, step: int, batch_size: int = 8) -> torch.Tensor:
    """(L - 1,) float32 NLL of each next token given only its last short_length..short_length+step-1 tokens.

    LongPPL/LongCE windows (K = short_length, d = step): windows start at 0, d, 2d, ... and hold K + d
    tokens; each scores its last d targets, which see K..K+d-1 tokens of context. The last window is
    shrunk to the end of the sequence. Targets 1..K (loss indices 0..K-1) have at most K tokens of
    context anyway: they are scored by window 0, which starts at token 0, so they equal the long-context
    losses (token_losses) up to float rounding, and their long-short difference is ~0.
    """
    if short_length < 1 or step < 1:
        raise DistilrayError(f"short_length and step must be >= 1, got {short_length} and {step}")
    ids = _as_1d(ids)
    n = ids.numel()
    width = short_length + step
    # (start, end, first loss index of the window to keep); window 0 keeps all of its predictions
    windows: list[tuple[int, int, int]] = []
    start = 0
    while True:
        end = min(start + width, n)
        windows.append((start, end, 0 if start == 0 else short_length - 1))
        if end == n:
            break
        start += step
    losses = torch.empty(n - 1, dtype=torch.float32)
    device = _device(model)
    with _eval_mode(model):
        for g in range(0, len(windows), batch_size):
            group = windows[g : g + batch_size]
            w = max(e - s for s, e, _ in group)
            # right padding needs no attention mask: a causal LM never looks ahead of a position
            batch = torch.zeros((len(group), w), dtype=torch.long)
            for row, (s, e, _) in enumerate(group):
                batch[row, : e - s] = ids[s:e]
            logits = model(input_ids=batch.to(device)).logits[:, :-1]
            nll = _target_nll(logits, batch[:, 1:].to(logits.device)).cpu()
            for row, (s, e, keep) in enumerate(group):
                # row position j predicts token s + j + 1, i.e. loss index s + j
                losses[s + keep : e - 1] = nll[row, keep : e - s - 1]
    return losses


# --- LongPPL ---------------------------------------------------------------------------------------------------


def key_token_mask(
    long_losses: torch.Tensor, short_losses: torch.Tensor, alpha: float = 2.0, beta: float = -2.0
) -> torch.Tensor:
    """LongPPL key tokens: LSD = l_short - l_long > alpha and log p_long = -l_long > beta, both strict."""
    if long_losses.shape != short_losses.shape:
        raise DistilrayError(
            f"long losses {tuple(long_losses.shape)} and short losses {tuple(short_losses.shape)} differ in shape"
        )
    return ((short_losses - long_losses) > alpha) & ((-long_losses) > beta)


def key_spans(offsets: Sequence[Span], mask: torch.Tensor | Sequence[bool]) -> list[Span]:
    """Character spans of the key tokens, adjacent ones merged (a span starting where the previous ended).

    mask[i] is about loss index i, i.e. the prediction of token i + 1: its span is offsets[i + 1].
    Token 0 is never a key token. Empty spans (start == end) are dropped.
    """
    mask = [bool(m) for m in (mask.tolist() if isinstance(mask, torch.Tensor) else mask)]
    if len(mask) != len(offsets) - 1:
        raise DistilrayError(
            f"{len(mask)} key-token flags for {len(offsets)} tokens: expected one per token after the first"
        )
    spans: list[Span] = []
    for i, is_key in enumerate(mask):
        if not is_key:
            continue
        start, end = (int(x) for x in offsets[i + 1])
        if start >= end:
            continue
        if spans and start == spans[-1][1]:
            spans[-1] = (spans[-1][0], end)
        else:
            spans.append((start, end))
    return spans


def tokens_in_spans(offsets: Sequence[Span], spans: Sequence[Span]) -> list[int]:
    """Indices of the non-empty tokens lying entirely inside one span (start >= span start, end <= span end)."""
    ordered = sorted(spans)
    starts = [s for s, _ in ordered]
    # running max of span ends, so an earlier long span still covers tokens after a later short one
    reach: list[int] = []
    for _, e in ordered:
        reach.append(max(e, reach[-1]) if reach else e)
    inside = []
    for idx, (start, end) in enumerate(offsets):
        start, end = int(start), int(end)
        if start >= end:
            continue
        k = bisect.bisect_right(starts, start) - 1  # last span starting at or before the token
        # every span up to k starts at or before the token: the one reaching furthest decides
        if k >= 0 and reach[k] >= end:
            inside.append(idx)
    return inside


def long_ppl_from_losses(
    evaluator_offsets: Sequence[Span],
    evaluator_long: torch.Tensor,
    evaluator_short: torch.Tensor,
    model_offsets: Sequence[Span],
    model_losses: torch.Tensor,
    alpha: float = 2.0,
    beta: float = -2.0,
) -> dict | None:
    """LongPPL from precomputed losses: the evaluator picks key spans, the model is scored on its tokens inside them.

    Both tokenizations must be of the same text (offsets are character offsets into it). Model token i
    is scored at loss index i - 1; token 0 has no prediction and is skipped. None when the evaluator
    finds no key token, or none of the model's tokens lies entirely inside a key span.
    """
    if len(model_losses) != len(model_offsets) - 1:
        raise DistilrayError(
            f"{len(model_losses)} model losses for {len(model_offsets)} model tokens: expected one fewer"
        )
    mask = key_token_mask(evaluator_long, evaluator_short, alpha, beta)
    evaluator_key = int(mask.sum())
    if evaluator_key == 0:
        return None
    picked = [i for i in tokens_in_spans(model_offsets, key_spans(evaluator_offsets, mask)) if i > 0]
    if not picked:
        return None
    nll = model_losses[torch.tensor(picked) - 1].double()
    return {"long_ppl": math.exp(float(nll.mean())), "key_tokens": len(picked), "evaluator_key_tokens": evaluator_key}


def _encode_with_offsets(tokenizer, text: str, who: str) -> tuple[torch.Tensor, list[Span]]:
    try:
        enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    except NotImplementedError:  # slow (Python) tokenizers refuse return_offsets_mapping
        enc = {}
    offsets = enc.get("offset_mapping") if hasattr(enc, "get") else None
    if not offsets:
        raise DistilrayError(f"the {who} tokenizer gives no offset_mapping: LongPPL needs a fast tokenizer")
    return torch.tensor(enc["input_ids"], dtype=torch.long), [(int(s), int(e)) for s, e in offsets]


def long_ppl(
    text: str,
    model,
    tokenizer,
    evaluator,
    evaluator_tokenizer,
    short_length: int = 4096,
    step: int = 1024,
    alpha: float = 2.0,
    beta: float = -2.0,
) -> dict | None:
    """LongPPL of `model` on one document, with key tokens chosen by `evaluator` (PKU-ML/LongPPL rule).

    Returns {"long_ppl", "key_tokens" (model tokens scored), "evaluator_key_tokens"} or None (see
    long_ppl_from_losses). Both tokenizers run without special tokens; both models score with full context.
    """
    ev_ids, ev_offsets = _encode_with_offsets(evaluator_tokenizer, text, "evaluator")
    model_ids, model_offsets = _encode_with_offsets(tokenizer, text, "evaluated model's")
    ev_long = token_losses(evaluator, ev_ids)
    ev_short = short_window_losses(evaluator, ev_ids, short_length, step)
    if not bool(key_token_mask(ev_long, ev_short, alpha, beta).any()):
        return None  # skip the evaluated model's pass
    model_losses = token_losses(model, model_ids)
    return long_ppl_from_losses(ev_offsets, ev_long, ev_short, model_offsets, model_losses, alpha, beta)


# --- perplexity by position ------------------------------------------------------------------------------------


def position_bucket_ppl(losses_list: Sequence[torch.Tensor], boundary: int) -> dict:
    """Token-weighted perplexity overall and for targets with fewer / at least `boundary` tokens of context.

    Loss index i predicts token i + 1, so its position (tokens of context) is i + 1. An empty bucket
    has ppl None.
    """
    if not losses_list:
        raise DistilrayError("no loss vectors to aggregate")
    sums = {"all": 0.0, "before": 0.0, "after": 0.0}
    counts = {"all": 0, "before": 0, "after": 0}
    for losses in losses_list:
        losses = torch.as_tensor(losses, dtype=torch.float64).reshape(-1)
        cut = max(0, min(boundary - 1, losses.numel()))  # indices < cut have position < boundary
        for key, part in (("all", losses), ("before", losses[:cut]), ("after", losses[cut:])):
            sums[key] += float(part.sum())
            counts[key] += part.numel()
    if counts["all"] == 0:
        raise DistilrayError("the loss vectors hold no tokens")

    def ppl(key: str) -> float | None:
        return math.exp(sums[key] / counts[key]) if counts[key] else None

    return {
        "ppl": ppl("all"),
        "tokens": counts["all"],
        "ppl_before": ppl("before"),
        "tokens_before": counts["before"],
        "ppl_after": ppl("after"),
        "tokens_after": counts["after"],
        "boundary": boundary,
    }


# --- synthetic retrieval probes --------------------------------------------------------------------------------

PASSKEY_INTRO = (
    "There is an important info hidden inside a lot of irrelevant text. Find it and memorize it. "
    "I will quiz you about the important information there."
)
PASSKEY_QUESTION = "What is the pass key? The pass key is"
KV_INTRO = "Below is a list of keys and values. Remember them."


@dataclass
class ProbeExample:
    """One retrieval probe: the answer (with its leading space) continues the prompt.

    distance_chars: characters between the needle (or queried pair) and the question (or prompt end);
    depth: the requested relative position of the needle.
    """

    prompt: str
    answer: str
    candidates: list[str]
    distance_chars: int
    depth: float


def _distinct_numbers(rng: random.Random, digits: int, count: int, avoid: str = "") -> list[str]:
    low, high = 10 ** (digits - 1), 10**digits - 1
    if count > high - low + 1:
        raise DistilrayError(f"cannot draw {count} distinct {digits}-digit numbers")
    out: list[str] = []
    seen: set[str] = set()
    while len(out) < count:
        s = str(rng.randint(low, high))
        if s not in seen and s not in avoid:
            seen.add(s)
            out.append(s)
    return out


def passkey_example(
    filler_sentences: Sequence[str],
    rng: random.Random,
    haystack_chars: int | None = None,
    haystack_words: int | None = None,
    depth: float = 0.5,
    num_candidates: int = 5,
    digits: int = 5,
) -> ProbeExample:
    """A pass-key retrieval prompt: the needle sits at relative `depth` of a haystack of filler sentences.

    Give the haystack length as haystack_chars or haystack_words (one of them). Sentences are taken in
    order from a random starting point, cycling, until the length is reached; the needle goes at the
    sentence boundary nearest to `depth`. The key does not occur in the haystack, so the prompt holds
    it only inside the needle (twice: "is KEY." and "KEY is"). Deterministic given the rng state.
    """
    sentences = [s.strip() for s in filler_sentences if s.strip()]
    if not sentences:
        raise DistilrayError("passkey_example needs at least one non-empty filler sentence")
    if (haystack_chars is None) == (haystack_words is None):
        raise DistilrayError("give exactly one of haystack_chars and haystack_words")
    if not 0.0 <= depth <= 1.0:
        raise DistilrayError(f"depth must be in [0, 1], got {depth}")
    if num_candidates < 1:
        raise DistilrayError(f"num_candidates must be >= 1, got {num_candidates}")
    budget = haystack_chars if haystack_chars is not None else haystack_words
    measure = len if haystack_chars is not None else (lambda s: len(s.split()))
    hay: list[str] = []
    size, i = 0, rng.randrange(len(sentences))
    while size < budget:
        hay.append(sentences[i % len(sentences)])
        size += measure(hay[-1]) + (1 if haystack_chars is not None and len(hay) > 1 else 0)
        i += 1
    haystack_text = " ".join(hay)
    numbers = _distinct_numbers(rng, digits, num_candidates, avoid=haystack_text)
    key = numbers[0]
    # boundaries[k] = characters before sentence k; choose the one nearest to depth * haystack length
    boundaries = [0]
    for s in hay:
        boundaries.append(boundaries[-1] + len(s) + 1)
    target = depth * len(haystack_text)
    k = min(range(len(hay) + 1), key=lambda j: abs(min(boundaries[j], len(haystack_text)) - target))
    before, after = " ".join(hay[:k]), " ".join(hay[k:])
    needle = f"The pass key is {key}. Remember it. {key} is the pass key."
    head = PASSKEY_INTRO + " " + (before + " " if before else "")
    tail = (" " + after if after else "") + "\n"
    prompt = head + needle + tail + PASSKEY_QUESTION
    return ProbeExample(
        prompt=prompt,
        answer=" " + key,
        candidates=[" " + n for n in numbers],
        distance_chars=len(tail),
        depth=depth,
    )


def kv_recall_example(
    rng: random.Random, num_pairs: int, query_index: int | None = None, num_candidates: int = 5
) -> ProbeExample:
    """Key-value recall: lines "key 4821: value 3390", then "The value of key 4821 is" -> " 3390".

    Keys and values are distinct 4-digit numbers (no value equals a key), so the answer occurs once in
    the prompt. Candidates: the true value and up to num_candidates - 1 other values of the list.
    distance_chars counts from the end of the queried line to the end of the prompt.
    """
    if num_pairs < 1:
        raise DistilrayError(f"num_pairs must be >= 1, got {num_pairs}")
    if query_index is None:
        query_index = rng.randrange(num_pairs)
    if not 0 <= query_index < num_pairs:
        raise DistilrayError(f"query_index {query_index} outside 0..{num_pairs - 1}")
    numbers = _distinct_numbers(rng, 4, 2 * num_pairs)
    keys, values = numbers[:num_pairs], numbers[num_pairs:]
    lines = [f"key {k}: value {v}" for k, v in zip(keys, values)]
    head = KV_INTRO + "\n" + "\n".join(lines[: query_index + 1])
    tail = "".join("\n" + line for line in lines[query_index + 1 :]) + f"\nThe value of key {keys[query_index]} is"
    others = [v for j, v in enumerate(values) if j != query_index]
    rng.shuffle(others)
    answer = values[query_index]
    return ProbeExample(
        prompt=head + tail,
        answer=" " + answer,
        candidates=[" " + v for v in [answer] + others[: max(0, num_candidates - 1)]],
        distance_chars=len(tail),
        depth=query_index / (num_pairs - 1) if num_pairs > 1 else 0.0,
    )


def _encode(tokenizer, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def _score_example(model, tokenizer, example: ProbeExample, max_length: int) -> tuple[bool, bool]:
    """(exact, choice) for one example, from one batched teacher-forced pass over its candidates.

    Greedy decoding reproduces the answer iff, with the answer's own prefix fed back, the argmax at each
    answer position is the answer's next token; so the teacher-forced pass decides `exact` without
    generating.
    """
    prompt_ids = _encode(tokenizer, example.prompt)
    cands = list(dict.fromkeys([example.answer] + list(example.candidates)))
    cand_ids = [_encode(tokenizer, c) for c in cands]
    if not prompt_ids or any(not c for c in cand_ids):
        raise DistilrayError("a probe prompt or candidate tokenizes to nothing")
    longest = len(prompt_ids) + max(len(c) for c in cand_ids)
    if longest > max_length:
        raise DistilrayError(
            f"probe prompt of {len(prompt_ids)} tokens (plus answer, {longest}) is longer than max_length {max_length}"
        )
    p = len(prompt_ids)
    batch = torch.zeros((len(cands), longest), dtype=torch.long)  # right padding: causal, never attended
    for row, c in enumerate(cand_ids):
        batch[row, : p + len(c)] = torch.tensor(prompt_ids + c)
    logits = model(input_ids=batch.to(_device(model))).logits.float().cpu()  # (C, T, V)
    scores = []
    for row, c in enumerate(cand_ids):
        pos = torch.arange(p - 1, p - 1 + len(c))
        logp = torch.log_softmax(logits[row, pos], dim=-1)
        scores.append(float(logp.gather(-1, torch.tensor(c).unsqueeze(-1)).sum()))
    answer_pos = torch.arange(p - 1, p - 1 + len(cand_ids[0]))
    exact = bool((logits[0, answer_pos].argmax(-1) == torch.tensor(cand_ids[0])).all())
    choice = all(scores[0] > s for s in scores[1:])  # a tie counts as wrong
    return exact, choice


def probe_accuracy(model, tokenizer, examples: Sequence[ProbeExample], max_length: int) -> dict:
    """Exact-match (greedy) and multiple-choice accuracy over probe examples.

    `choice` is right when the answer has a strictly higher total log-likelihood than every other
    candidate; `chance` is the mean of 1 / number of candidates, its expected value for a guesser.
    """
    if not examples:
        raise DistilrayError("no probe examples to score")
    exact = choice = 0
    chance = 0.0
    with _eval_mode(model):
        for ex in examples:
            e, c = _score_example(model, tokenizer, ex, max_length)
            exact += e
            choice += c
            chance += 1.0 / len(set([ex.answer] + list(ex.candidates)))
    n = len(examples)
    return {"exact": exact / n, "choice": choice / n, "chance": chance / n, "n": n}


def probe_suite(
    model,
    tokenizer,
    filler: Sequence[str],
    distances: Sequence[int],
    depths: Sequence[float],
    n_per_cell: int,
    seed: int,
    max_length: int,
    num_candidates: int = 5,
) -> dict:
    """Pass-key and key-value recall accuracies grouped by needle-to-question distance (in tokens, approximate).

    For a distance D and a depth q in [0, 1), the text after the needle is ~D tokens and the text before
    it ~D q / (1 - q) tokens, so the needle sits at relative depth q; the conversion from tokens to
    characters (pass key) or lines (key-value) is measured with `tokenizer`. Each (distance, depth)
    cell gets n_per_cell examples; each distance reports probe_accuracy over its cells plus the mean
    measured distance in characters.
    """
    if n_per_cell < 1 or not distances or not depths:
        raise DistilrayError("probe_suite needs n_per_cell >= 1, at least one distance and one depth")
    if any(not 0.0 <= q < 1.0 for q in depths):
        raise DistilrayError(f"probe_suite depths must be in [0, 1), got {list(depths)}")
    sentences = [s.strip() for s in filler if s.strip()]
    if not sentences:
        raise DistilrayError("probe_suite needs filler text")
    sample = " ".join(sentences)
    chars_per_token = len(sample) / max(1, len(_encode(tokenizer, sample)))
    sample_lines = "\n".join(f"key {1000 + 37 * j}: value {9999 - 53 * j}" for j in range(16))
    tokens_per_line = max(1.0, len(_encode(tokenizer, sample_lines)) / 16)
    rng = random.Random(seed)
    out: dict = {"passkey": {}, "kv_recall": {}}
    for distance in distances:
        passkeys: list[ProbeExample] = []
        kvs: list[ProbeExample] = []
        for q in depths:
            hay_chars = max(1, round(distance * chars_per_token / (1.0 - q)))
            after = max(0, round(distance / tokens_per_line))
            before = round(after * q / (1.0 - q))
            for _ in range(n_per_cell):
                passkeys.append(
                    passkey_example(sentences, rng, haystack_chars=hay_chars, depth=q, num_candidates=num_candidates)
                )
                kvs.append(
                    kv_recall_example(rng, before + after + 1, query_index=before, num_candidates=num_candidates)
                )
        for name, examples in (("passkey", passkeys), ("kv_recall", kvs)):
            result = probe_accuracy(model, tokenizer, examples, max_length)
            result["mean_distance_chars"] = sum(e.distance_chars for e in examples) / len(examples)
            out[name][distance] = result
    return out
