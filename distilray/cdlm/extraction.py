"""Windows over tokenized passages, and one scoring pass per window (no Ray here).

Per window the datastore model gives p(x_i | x_<i) for every position (the mining input), and the
generation model gives its last-layer hidden states (the keys). One pass serves both when they are
the same model.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from distilray.errors import DistilrayError


@dataclass(frozen=True)
class Window:
    window_id: int
    doc_id: int
    start: int  # offset of the window's first token in its passage
    skip: int  # leading positions already covered by the previous window of the passage
    tokens: tuple[int, ...]


def make_windows(docs_ids: list[list[int]], window: int, stride: int, min_length: int) -> list[Window]:
    """Cut passages into windows of `window` tokens every `stride` tokens; drop passages under `min_length`."""
    if not 0 < stride <= window:
        raise DistilrayError(f"stride must be in 1..window ({window}), got {stride}")
    out: list[Window] = []
    for doc_id, ids in enumerate(docs_ids):
        if len(ids) < min_length:
            continue
        start = 0
        while True:
            piece = ids[start : start + window]
            out.append(Window(len(out), doc_id, start, 0 if start == 0 else window - stride, tuple(piece)))
            if start + window >= len(ids):
                break
            start += stride
    return out


@torch.no_grad()
def score_windows(
    windows: list[tuple[int, ...]], model_ds, model_gen=None, want_hidden: bool = True
) -> tuple[list[np.ndarray], list[np.ndarray] | None]:
    """Token probabilities from `model_ds` and hidden states from `model_gen` (default: the same model).

    Returns per window probs # (T,) float32 with probs[0] = nan (no context), and hidden # (T, d)
    float16 (the final-norm output, as `hidden_states[-1]`) when `want_hidden`.
    """
    model_gen = model_gen if model_gen is not None else model_ds
    device = next(model_ds.parameters()).device
    width = max(len(w) for w in windows)
    ids = torch.zeros((len(windows), width), dtype=torch.long)
    mask = torch.zeros((len(windows), width), dtype=torch.long)
    for row, w in enumerate(windows):
        ids[row, : len(w)] = torch.tensor(w)
        mask[row, : len(w)] = 1
    ids, mask = ids.to(device), mask.to(device)
    same = model_gen is model_ds
    out = model_ds(input_ids=ids, attention_mask=mask, output_hidden_states=want_hidden and same)
    logp = torch.log_softmax(out.logits[:, :-1].float(), dim=-1)  # (B, W-1, V)
    picked = logp.gather(-1, ids[:, 1:, None]).squeeze(-1).exp()  # (B, W-1)
    hidden = None
    if want_hidden:
        states = (
            out.hidden_states[-1]
            if same
            else model_gen(
                input_ids=ids.to(next(model_gen.parameters()).device), attention_mask=mask, output_hidden_states=True
            ).hidden_states[-1]
        )
        hidden = [states[row, : len(w)].to(torch.float16).cpu().numpy() for row, w in enumerate(windows)]
    probs = []
    for row, w in enumerate(windows):
        p = np.full(len(w), np.nan, dtype=np.float32)
        p[1:] = picked[row, : len(w) - 1].cpu().numpy()
        probs.append(p)
    return probs, hidden
