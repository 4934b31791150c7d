"""T-Free dictionary decoding (reference/tfree.md 5.3-5.6, 10.2): head logits over v rows -> a score
for every word of the dictionary D -> a word.

With a = sigmoid(z) (float32), m rows per trigram, n_w trigrams of word w, N_w / E_w its rows from
inner / edge trigrams and P_w = N_w u E_w:

- "head" (repository HEAD, the default, as the released checkpoints decode):
  S_w = sum_{N_w} a + e * sum_{E_w} a, so a row in both sets counts 1 + e times;
  score_w = S_w / (m n_w) + (S_w - sum_j a_j) / (v - m n_w),
  the mean activation inside the pattern minus the mean outside, both sized by m n_w, not |P_w|;
- "union" (older revisions): the same with each row of P_w once, weighted e if in E_w else 1;
- "calibrated" (10.2): log P(pattern) = sum_{P_w} log s(z) + sum_{not P_w} log(1 - s(z)), the
  log-likelihood of the exact pattern under the BCE training loss; edge_weight does not apply.

Guard (pitfall 13): where v - m n_w <= 0 (a long word under a small v) the head/union score has no
outside mean; such words get -inf and cannot be picked.

The head/union scores lie near [-1, 1], so their softmax is nearly flat: not a calibrated probability.
"""

from __future__ import annotations

import weakref

import torch
import torch.nn.functional as F

from distilray.errors import DistilrayError
from distilray.tfree.dictionary import Dictionary

METHODS = ("head", "union", "calibrated")

# per dictionary: (method, edge_weight, device) -> its pattern bags; dropped with the dictionary
_BAGS: weakref.WeakKeyDictionary[Dictionary, dict[tuple, tuple[torch.Tensor, ...]]] = weakref.WeakKeyDictionary()


def word_bags(
    dictionary: Dictionary, method: str, edge_weight: float, device: torch.device
) -> tuple[torch.Tensor, ...]:
    """(rows, offsets, weights): word w's pattern rows rows[offsets[w]:offsets[w+1]], each with its weight in
    S_w, laid out for a weighted sum-EmbeddingBag over the activations. An EmbeddingBag on CPU is about 50x
    faster than torch.sparse.mm with the same (|D|, v) matrix in COO form (16k words, v = 4096, 128 positions)."""
    key = (method, float(edge_weight), str(device))
    cache = _BAGS.setdefault(dictionary, {})
    if key not in cache:
        non_edge = torch.from_numpy(dictionary.in_non_edge).float()
        edge = torch.from_numpy(dictionary.in_edge).float()
        if method == "head":
            weights = non_edge + edge_weight * edge
        elif method == "union":
            weights = torch.where(edge > 0, edge_weight, 1.0)
        else:
            weights = torch.ones_like(non_edge)
        rows = torch.from_numpy(dictionary.indices).long()
        offsets = torch.from_numpy(dictionary.indptr[:-1]).long()
        cache[key] = (rows.to(device), offsets.to(device), weights.to(device))
    return cache[key]


def pattern_sums(values: torch.Tensor, dictionary: Dictionary, method: str, edge_weight: float) -> torch.Tensor:
    """values (N, v) -> (N, |D|): sum over each word's pattern rows of weight * value."""
    rows, offsets, weights = word_bags(dictionary, method, edge_weight, values.device)
    table = values.T.contiguous()  # (v, N): one "embedding" row per pattern row
    return F.embedding_bag(rows, table, offsets, mode="sum", per_sample_weights=weights).T


def word_scores(
    logits: torch.Tensor, dictionary: Dictionary, method: str = "head", edge_weight: float = 1.0
) -> torch.Tensor:
    """logits (..., v) -> word scores (..., |D|) float32, by `method` (see the module docstring)."""
    if method not in METHODS:
        raise DistilrayError(f"unknown T-Free score method {method!r}; choose one of {', '.join(METHODS)}")
    v, m = dictionary.vocab.v, dictionary.vocab.m
    if logits.shape[-1] != v:
        raise DistilrayError(f"logits have {logits.shape[-1]} rows, the dictionary's vocab has v={v}")
    lead = logits.shape[:-1]
    z = logits.float().reshape(-1, v)  # (N, v)
    if method == "calibrated":
        # log s(z) - log s(-z) = z exactly, so the pattern term is a plain sum of logits
        scores = pattern_sums(z, dictionary, method, edge_weight) + F.logsigmoid(-z).sum(-1, keepdim=True)
        return scores.reshape(*lead, len(dictionary))
    a = torch.sigmoid(z)
    pattern_sum = pattern_sums(a, dictionary, method, edge_weight)  # (N, |D|): S_w
    inside = m * torch.from_numpy(dictionary.n_w).to(device=z.device, dtype=torch.float32)  # (|D|,)
    outside = v - inside
    scores = pattern_sum / inside + (pattern_sum - a.sum(-1, keepdim=True)) / outside.clamp(min=1.0)
    scores = scores.masked_fill(outside <= 0, float("-inf"))
    return scores.reshape(*lead, len(dictionary))


def word_log_probs(scores: torch.Tensor) -> torch.Tensor:
    """(..., |D|) scores -> log p(w), a log-softmax over D (calibrated only for "calibrated")."""
    return torch.log_softmax(scores, dim=-1)


def pick_word(
    scores: torch.Tensor, temperature: float = 0.0, top_k: int = 0, generator: torch.Generator | None = None
) -> torch.Tensor:
    """(..., |D|) scores -> (...) long word indices: argmax at temperature 0 (the repository decodes
    greedily), else a sample from softmax(scores / temperature) over the top_k words (0: all)."""
    if not temperature >= 0.0:
        raise DistilrayError(f"temperature must be >= 0, got {temperature}")
    if top_k < 0:
        raise DistilrayError(f"top_k must be >= 0, got {top_k}")
    if not torch.isfinite(scores).any(-1).all():
        raise DistilrayError("no dictionary word has a finite score (v - m*n_w <= 0 for every word?)")
    if temperature == 0.0:
        return scores.argmax(-1)
    flat = scores.float().reshape(-1, scores.shape[-1]) / temperature
    if 0 < top_k < flat.shape[-1]:
        kth = flat.topk(top_k, dim=-1).values[:, -1:]
        flat = flat.masked_fill(flat < kth, float("-inf"))
    picks = torch.multinomial(torch.softmax(flat, dim=-1), 1, generator=generator)
    return picks.reshape(scores.shape[:-1])
