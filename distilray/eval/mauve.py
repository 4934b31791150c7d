"""MAUVE (Pillutla et al., 2021): how close a model's text distribution is to human text.

Both sets of texts are embedded (any feature extractor: here the caller's LM), the union is
quantised with k-means, and the two cluster histograms P (human) and Q (model) are compared along
the divergence frontier {(exp(-c KL(Q || R_l)), exp(-c KL(P || R_l))) : R_l = l P + (1 - l) Q}.
MAUVE is the area under that curve: 1 for identical histograms, near 0 for disjoint ones.
"""

from __future__ import annotations

import numpy as np


def _kl(a: np.ndarray, b: np.ndarray) -> float:
    mask = a > 0
    return float(np.sum(a[mask] * np.log(a[mask] / b[mask])))


def divergence_curve(p: np.ndarray, q: np.ndarray, scaling: float = 5.0, num_points: int = 50) -> np.ndarray:
    """Points (x, y) of the frontier, with the end points (0, 1) and (1, 0), sorted by x. # (K, 2)"""
    points = [(0.0, 1.0), (1.0, 0.0)]
    for lam in np.linspace(1e-6, 1 - 1e-6, num_points):
        r = lam * p + (1 - lam) * q
        points.append((np.exp(-scaling * _kl(q, r)), np.exp(-scaling * _kl(p, r))))
    return np.array(sorted(points, key=lambda xy: (xy[0], -xy[1])))  # along x, falling in y


def mauve_from_histograms(p: np.ndarray, q: np.ndarray, scaling: float = 5.0) -> float:
    curve = divergence_curve(np.asarray(p, float), np.asarray(q, float), scaling)
    # the frontier is monotone: x rises as y falls; the area under it is a sum of trapezoids
    return float(np.sum((curve[1:, 0] - curve[:-1, 0]) * (curve[1:, 1] + curve[:-1, 1]) / 2))


def mauve(human: np.ndarray, model: np.ndarray, num_clusters: int | None = None, scaling: float = 5.0, seed: int = 0) -> float:
    """MAUVE of two feature matrices human # (n, d) and model # (m, d)."""
    import faiss

    x = np.concatenate([human, model]).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True) + 1e-12
    k = num_clusters or max(2, len(x) // 10)
    kmeans = faiss.Kmeans(x.shape[1], k, niter=50, seed=seed, verbose=False, min_points_per_centroid=1)
    kmeans.train(x)
    labels = kmeans.index.search(x, 1)[1].reshape(-1)
    p = np.bincount(labels[: len(human)], minlength=k) / len(human)
    q = np.bincount(labels[len(human) :], minlength=k) / len(model)
    return mauve_from_histograms(p, q, scaling)


def mean_hidden_features(model, sequences: list[list[int]]) -> np.ndarray:
    """Mean of an LM's last-layer hidden states over each token sequence. # (n, d)"""
    import torch

    device = next(model.parameters()).device
    feats = []
    with torch.no_grad():
        for seq in sequences:
            ids = torch.tensor([list(seq) or [0]], device=device)
            feats.append(model(input_ids=ids, output_hidden_states=True).hidden_states[-1][0].float().mean(0).cpu().numpy())
    return np.stack(feats)
