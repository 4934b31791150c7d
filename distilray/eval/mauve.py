"""MAUVE (Pillutla et al., 2021): how close a model's text distribution is to human text.

Computed by `mauve-text`, the authors' reference implementation, from features the caller gives
(here the caller's own LM's hidden states; the paper featurizes with GPT-2 large, which is not
downloaded here): PCA, k-means quantisation of both sets into one histogram each, and the area
under the divergence frontier. 1 for identical distributions, near 0 for disjoint ones.
"""

from __future__ import annotations

import numpy as np

from distilray.errors import DistilrayError


def mauve(
    human: np.ndarray, model: np.ndarray, num_clusters: int | None = None, scaling: float = 5.0, seed: int = 0
) -> float:
    """MAUVE of two feature matrices human # (n, d) and model # (m, d).

    `num_clusters` None takes the library's rule, min(n, m) / 10 buckets (at least 2): with the few
    dozen texts a run here scores, more buckets would leave most of them nearly empty.
    """
    try:
        import mauve as mauve_text  # imports faiss, sklearn and transformers: only when a score is asked for
    except ImportError:
        raise DistilrayError('MAUVE needs the mauve-text package: pip install -e ".[eval]"') from None

    human, model = np.asarray(human, dtype=np.float32), np.asarray(model, dtype=np.float32)
    buckets = "auto" if num_clusters is None else max(2, min(int(num_clusters), len(human) + len(model)))
    out = mauve_text.compute_mauve(
        p_features=human,
        q_features=model,
        num_buckets=buckets,
        mauve_scaling_factor=scaling,
        seed=seed,
        verbose=False,
    )
    return float(out.mauve)


def mean_hidden_features(model, sequences: list[list[int]]) -> np.ndarray:
    """Mean of an LM's last-layer hidden states over each token sequence: MAUVE's features. # (n, d)"""
    import torch

    device = next(model.parameters()).device
    feats = []
    with torch.no_grad():
        for seq in sequences:
            ids = torch.tensor([list(seq) or [0]], device=device)
            hidden = model(input_ids=ids, output_hidden_states=True).hidden_states[-1]  # (1, T, d)
            feats.append(hidden[0].float().mean(0).cpu().numpy())
    return np.stack(feats)
