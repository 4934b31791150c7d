"""ROUGE-L (Lin, 2004): F1 of the longest common subsequence, computed by Google's `rouge-score`,
the reference implementation papers report, so figures here compare with theirs."""

from __future__ import annotations

from functools import lru_cache
from typing import Hashable, Sequence


class _SpaceSeparated:
    """rouge-score tokenizer that splits on spaces only and keeps every piece (digits included)."""

    def tokenize(self, text: str) -> list[str]:
        return text.split()


@lru_cache(maxsize=2)
def _scorer(given_tokens: bool):
    from rouge_score import rouge_scorer  # imports nltk (over a second): only when a score is asked for

    return rouge_scorer.RougeScorer(["rougeL"], tokenizer=_SpaceSeparated() if given_tokens else None)


def rouge_l(reference: str | Sequence[Hashable], candidate: str | Sequence[Hashable]) -> float:
    """ROUGE-L F1 of `candidate` against `reference`; an empty side scores 0, as in rouge-score.

    Two strings are tokenized by rouge-score itself (lowercase alphanumeric words), as in papers.
    Two token sequences (token ids, or words) are compared element by element.
    """
    if isinstance(reference, str) and isinstance(candidate, str):
        return float(_scorer(False).score(reference, candidate)["rougeL"].fmeasure)
    if isinstance(reference, str) or isinstance(candidate, str):
        raise TypeError("rouge_l takes two strings or two token sequences, not one of each")
    # rouge-score scores strings only, and its default tokenizer would lowercase words and drop
    # punctuation tokens; LCS needs nothing but equality, so each distinct token becomes a number
    # and the numbers are joined by spaces, which _SpaceSeparated splits back one for one.
    codes: dict[Hashable, int] = {}
    ref, cand = (" ".join(str(codes.setdefault(t, len(codes))) for t in seq) for seq in (reference, candidate))
    return float(_scorer(True).score(ref, cand)["rougeL"].fmeasure)
