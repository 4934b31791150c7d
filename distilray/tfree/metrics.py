"""Tokenizer metrics of the T-Free paper (reference/tfree.md section 7, 10.4): fertility and
near-duplicate vocabulary entries, for any Hugging Face tokenizer and for T-Free.

Fertility = items a tokenizer emits / words of a reference segmenter, on the same text (1.0 is
ideal). The paper segments with UDPipe; `reference_words` is a regex approximation (runs of letters
and digits, each other non-space character alone), so values are comparable between tokenizers
measured here, not exactly with the paper's table. For T-Free every item the splitter emits counts,
whitespace markers (`<|ws|>`, `<|no_ws|>`, runs) included.
"""

from __future__ import annotations

import re
from collections import Counter
from typing import Any, Callable, Iterable, Sequence

from distilray.errors import DistilrayError
from distilray.tfree.dictionary import Dictionary

_REFERENCE_RE = re.compile(r"[^\W_]+|[^\w\s]|_")
_SPACE_MARKERS = ("Ġ", "▁")  # byte-level BPE (GPT-2, Llama-3) and sentencepiece spell a space so
_MULTI_DIGIT_RE = re.compile(r" ?([0-9]{2,})")


def reference_words(text: str) -> list[str]:
    """Approximate linguistic words: letter/digit runs, every punctuation mark alone, no whitespace."""
    return _REFERENCE_RE.findall(text)


def fertility(tokenize: Callable[[str], Sequence[Any]], texts: Sequence[str]) -> float:
    """Total items `tokenize` makes of `texts` / total reference words of the same texts."""
    words = sum(len(reference_words(t)) for t in texts)
    if words == 0:
        raise DistilrayError("fertility needs texts with at least one word")
    return sum(len(tokenize(t)) for t in texts) / words


def _normalise(entry: str) -> str:
    for marker in _SPACE_MARKERS:
        entry = entry.replace(marker, " ")
    return entry


def duplicate_share(vocabulary: Iterable[str]) -> dict[str, float]:
    """Percent of vocabulary entries that near-duplicate another entry, by class (Table 1):

    - cap: another entry equals it up to case ("The" / "the", both count);
    - space: another entry differs from it only by one leading space ("the" / " the", both count);
    - digits: a multi-digit number (optionally after one space) whose every digit is also an entry;
    - total: entries in any class.
    Space markers ("Ġ", "▁") are read as spaces first.
    """
    entries = [_normalise(e) for e in vocabulary]
    if not entries:
        raise DistilrayError("duplicate_share needs a non-empty vocabulary")
    present = Counter(entries)
    lowered = Counter(e.lower() for e in entries)
    cap = space = digits = total = 0
    for entry in entries:
        is_cap = lowered[entry.lower()] > present[entry]  # some entry spelled differently has its lowercase
        is_space = (entry.startswith(" ") and entry[1:] in present) or (" " + entry) in present
        number = _MULTI_DIGIT_RE.fullmatch(entry)
        is_digits = number is not None and all(d in present for d in number.group(1))
        cap += is_cap
        space += is_space
        digits += is_digits
        total += is_cap or is_space or is_digits
    n = len(entries)
    return {"cap": 100 * cap / n, "space": 100 * space / n, "digits": 100 * digits / n, "total": 100 * total / n}


def hf_vocabulary(tokenizer: Any) -> list[str]:
    """A Hugging Face tokenizer's entries as strings, in id order (added tokens included)."""
    tokens = tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))
    return [t for t in tokens if t is not None]


def tfree_duplicates() -> dict[str, float]:
    """T-Free's vocabulary duplicates: 0 by construction. Its v entries are hash rows, not strings, so
    no entry can be a case or space variant of another; "The" and "the" are different words sharing
    some rows. `pattern_duplicates` measures the one way two words can still coincide."""
    return {"cap": 0.0, "space": 0.0, "digits": 0.0, "total": 0.0}


def pattern_duplicates(dictionary: Dictionary) -> dict[str, float]:
    """Words the head cannot tell apart: words whose pattern P_w equals another word's, through equal
    trigram sets ("xxxx" and "xxxxxxxx" both have {␣xx, xxx, xx␣}) or hash collisions. Case is kept,
    so "The" / "the" differ (they share only the k lowercase rows).
    Returns {"total": percent of words, "count": such words, "words": |D|}."""
    patterns = Counter(dictionary.pattern(i).tobytes() for i in range(len(dictionary)))
    count = sum(c for c in patterns.values() if c > 1)
    n = len(dictionary)
    return {"total": 100 * count / n if n else 0.0, "count": count, "words": n}
