"""Next-word figures of a T-Free model and of its BPE baseline on the same held-out text (reference/tfree.md 7).

Both models are judged on the same units, the words of letters of the text (the regex `[^\\W\\d_]+`: the
T-Free splitter makes exactly these its letter words, so the k-th letter word of one side is the k-th of the
other):
- T-Free: the dictionary word with the best score at the position before it is the word;
- BPE: greedy decoding from the true prefix reproduces the word, i.e. the argmax is right at every token
  that overlaps the word's characters (teacher forcing along the true path is the greedy path while the
  argmaxes agree).
Word perplexity is exp(total NLL of the text / reference words of the text): the T-Free NLL sums -log p(item)
over its items (whitespace markers, digits and punctuation included) with p the calibrated pattern
likelihood normalised over the dictionary (reference 10.2), the BPE NLL sums its tokens. The T-Free figure
is relative to its dictionary, which holds every held-out word (`more_words`): a closed-vocabulary
perplexity, optimistic against the BPE's open one; the table says so.

The pattern likelihood treats the v rows as independent and the model is trained with pos_weight >> 1, so
its word scores are far too peaked: a wrong word costs tens of nats and the raw perplexity is astronomical.
Both models' perplexities are therefore reported after temperature scaling (the standard one-parameter
calibration): the temperature is chosen on the first half of the held-out texts and the perplexity measured
on the second half; the raw figure (temperature 1) is kept beside it.
"""

from __future__ import annotations

import math
import re

import numpy as np
import torch

from distilray.decoding.tfree import METHODS, word_log_probs, word_scores
from distilray.tfree.dictionary import Dictionary
from distilray.tfree.hashing import hasher_for
from distilray.tfree.metrics import reference_words
from distilray.tfree.wordsplit import EOT, encode_document

LETTER_WORD = re.compile(r"[^\W\d_]+")
TEMPERATURES = (0.5, 0.75, 1.0, 1.5, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0)  # the calibration grid


def windows(n: int, seq_len: int) -> list[tuple[int, int]]:
    """[start, end) windows of seq_len + 1 items overlapping by one: every item after the first is a target once."""
    return [(s, min(s + seq_len + 1, n)) for s in range(0, max(n - 1, 0), seq_len)]


@torch.no_grad()
def tfree_next_word(model, dictionary: Dictionary, texts: list[str], seq_len: int, method: str = "head") -> dict:
    """Top-1 next-word accuracy (letter words, `method`'s score) and the calibrated NLL of every item."""
    device = next(model.parameters()).device
    vocab = dictionary.vocab
    hasher = hasher_for(vocab)
    docs = [encode_document(t) for t in texts]
    dictionary = dictionary.with_more_words(w for d in docs for w in d)  # closed vocabulary: see the module doc
    letter_targets = items = 0
    correct_by = dict.fromkeys(METHODS, 0)  # every score's pick, for the table; `method` is the one reported
    nll = dict.fromkeys(TEMPERATURES, 0.0)
    for words in docs:
        for start, end in windows(len(words), seq_len):
            inputs, targets = words[start : end - 1], words[start + 1 : end]
            flat, offsets = hasher.encode(inputs)
            logits = model(
                indices=torch.from_numpy(flat).to(device),
                offsets=torch.from_numpy(offsets[:-1]).to(device),
                shape=(1, len(inputs)),
            )[0]
            target_ids = torch.tensor([dictionary.index(w) for w in targets], device=device)
            calibrated = word_scores(logits, dictionary, "calibrated")
            text_items = torch.tensor([w != EOT for w in targets], device=device)  # the BPE side has no EOT
            for t in TEMPERATURES:
                log_p = word_log_probs(calibrated / t).gather(-1, target_ids[:, None])[:, 0]
                nll[t] -= float((log_p * text_items).sum())
            letters = torch.tensor([bool(LETTER_WORD.fullmatch(w)) for w in targets], device=device)
            for name in METHODS:
                scores = calibrated if name == "calibrated" else word_scores(logits, dictionary, name)
                correct_by[name] += int(((scores.argmax(-1) == target_ids) & letters).sum())
            letter_targets += int(letters.sum())
            items += int(text_items.sum())
    return {
        "correct": correct_by[method],
        "correct_by_score": correct_by,
        "letter_words": letter_targets,
        "items": items,
        "nll": nll,
        "method": method,
    }


@torch.no_grad()
def bpe_next_word(model, tokenizer, texts: list[str], seq_len: int) -> dict:
    """The same figures for a token-input model: greedy word accuracy on letter words, summed token NLL."""
    device = next(model.parameters()).device
    correct = letter_targets = items = 0
    nll = dict.fromkeys(TEMPERATURES, 0.0)
    for text in texts:
        text = text.lstrip()  # as encode_document: the same characters on both sides
        enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        ids, spans = enc["input_ids"], np.asarray(enc["offset_mapping"]).reshape(-1, 2)
        right = np.zeros(len(ids), dtype=bool)  # token i predicted greedily from its prefix (never for token 0)
        for start, end in windows(len(ids), seq_len):
            chunk = torch.tensor(ids[start:end], device=device)[None]
            logits = model(tokens=chunk[:, :-1])[0].float()
            targets = chunk[0, 1:]
            for t in TEMPERATURES:
                nll[t] += float(torch.nn.functional.cross_entropy(logits / t, targets, reduction="sum"))
            right[start + 1 : end] = (logits.argmax(-1) == targets).cpu().numpy()
            items += len(targets)
        for match in LETTER_WORD.finditer(text):
            covering = np.nonzero((spans[:, 0] < match.end()) & (spans[:, 1] > match.start()))[0]
            if len(covering) == 0 or covering[0] == 0:
                continue  # the first token has no prediction
            letter_targets += 1
            correct += int(right[covering].all())
    return {"correct": correct, "letter_words": letter_targets, "items": items, "nll": nll, "method": "greedy"}


def evaluate_texts(measure, texts: list[str]) -> dict:
    """`measure(texts) -> figures` (tfree_next_word or bpe_next_word with its model bound) on two halves of the
    texts: accuracy over both, the temperature fitted on the first half, the perplexity on the second."""
    if len(texts) < 2:
        raise ValueError("calibrating the perplexity needs at least two held-out texts")
    half = len(texts) // 2
    fit, held = measure(texts[:half]), measure(texts[half:])
    temperature = min(fit["nll"], key=fit["nll"].get)
    ref_words = sum(len(reference_words(t)) for t in texts[half:])
    letters = fit["letter_words"] + held["letter_words"]
    return {
        "next_word_acc": (fit["correct"] + held["correct"]) / letters if letters else math.nan,
        "word_ppl": math.exp(held["nll"][temperature] / ref_words) if ref_words else math.nan,
        "word_ppl_raw": math.exp(min(held["nll"][1.0] / ref_words, 700.0)) if ref_words else math.nan,
        "temperature": temperature,
        "letter_words": letters,
        "reference_words": ref_words,
        "items": fit["items"] + held["items"],
        "score": held["method"],
        **(
            {
                "next_word_acc_by_score": {
                    k: (fit["correct_by_score"][k] + held["correct_by_score"][k]) / letters if letters else math.nan
                    for k in fit["correct_by_score"]
                }
            }
            if "correct_by_score" in fit
            else {}
        ),
    }
