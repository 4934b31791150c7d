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

# per dictionary: (method, edge_weight, device) -> sparse (|D|, v) weights; dropped with the dictionary
_MATRICES: weakref.WeakKeyDictionary[Dictionary, dict[tuple, torch.Tensor]] = weakref.WeakKeyDictionary()


def word_matrix(dictionary: Dictionary, method: str, edge_weight: float, device: torch.device) -> torch.Tensor:
    """The sparse COO (|D|, v) float32 matrix whose row w holds each row index's weight in S_w."""
    key = (method, float(edge_weight), str(device))
    cache = _MATRICES.setdefault(dictionary, {})
    if key not in cache:
        non_edge = torch.from_numpy(dictionary.in_non_edge).float()
        edge = torch.from_numpy(dictionary.in_edge).float()
        if method == "head":
            values = non_edge + edge_weight * edge
        elif method == "union":
            values = torch.where(edge > 0, edge_weight, 1.0)
        else:
            values = torch.ones_like(non_edge)
        rows = torch.repeat_interleave(torch.arange(len(dictionary)), torch.from_numpy(dictionary.indptr).diff())
        coords = torch.stack([rows, torch.from_numpy(dictionary.indices)])
        # sorted distinct columns within sorted rows: already coalesced, no check needed
        matrix = torch.sparse_coo_tensor(
            coords, values, (len(dictionary), dictionary.vocab.v), is_coalesced=True, check_invariants=False
        )
        cache[key] = matrix.to(device)
    return cache[key]


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
    matrix = word_matrix(dictionary, method, edge_weight, z.device)
    if method == "calibrated":
        # log s(z) - log s(-z) = z exactly, so the pattern term is a plain sum of logits
        scores = torch.sparse.mm(matrix, z.T).T + F.logsigmoid(-z).sum(-1, keepdim=True)  # (N, |D|)
        return scores.reshape(*lead, len(dictionary))
    a = torch.sigmoid(z)
    pattern_sum = torch.sparse.mm(matrix, a.T).T  # (N, |D|): S_w
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
