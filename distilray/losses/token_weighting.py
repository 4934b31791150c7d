"""Token weighting for long-context language modeling (Helm et al., NAACL 2025) and LongCE (Fang et al., ICLR 2025).

Conventions:
- `tokens` (B, L) integer ids; per-token losses (B, N) with N = L - 1, where index i is
  -log p(tokens[:, i + 1] | ...).
- `valid` (B, N) bool marks real targets (False for padding); None means every target is real.
- Scores d = long_losses - short_losses ("difference" comparison), always detached: weights are constants.

Weights come from the scores, per row, in this order: transforms -> truncation -> top-kappa -> normalization ->
interpolation (`token_weights`). Padding positions always get weight 0 and never count as targets.
Short-context losses come from strided windows of length b (`short_context_losses`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from distilray.errors import DistilrayError

TRANSFORMS = ("absolute", "minus", "exp", "max", "shift:C")
NORMALIZATIONS = ("none", "l1", "softmax")
VARIANTS = ("uniform", "dense", "sparse", "longce", "ppmi", "npmi")
DEFAULT_TIE_SEED = 0  # top-kappa tie-breaking is deterministic unless the caller passes a generator

WindowLossesFn = Callable[[torch.Tensor], torch.Tensor]

# Sign of the weights as tracked through the steps, to reject specs that can reward loss (note pitfall 3).
_NONNEG, _NONPOS, _SIGNED = "non-negative", "non-positive", "signed"


# --------------------------------------------------------------------------------------------- validation helpers


def _parse_shift(item: str) -> float:
    """'shift:C' -> C (> 0, finite); anything else raises."""
    text = item[len("shift:") :]
    try:
        c = float(text)
    except ValueError:
        raise DistilrayError(f"transform {item!r}: shift needs a number C > 0, as in 'shift:2.0'") from None
    if not (math.isfinite(c) and c > 0):
        raise DistilrayError(f"transform {item!r}: shift C must be finite and > 0, got {c}")
    return c


def _check_transform(item: str) -> None:
    if item.startswith("shift:"):
        _parse_shift(item)
    elif item not in TRANSFORMS:
        raise DistilrayError(f"unknown transform {item!r}; allowed: {', '.join(TRANSFORMS)} (C > 0)")


def _check_gamma(gamma: float) -> None:
    if not gamma > 0:
        raise DistilrayError(f"truncation gamma must be > 0, got {gamma}")


def _check_kappa(kappa: float) -> None:
    if not 0 < kappa <= 1:
        raise DistilrayError(f"top-kappa kappa must be in (0, 1], got {kappa}")


def _check_lambda(lam: float) -> None:
    if not 0 <= lam <= 1:
        raise DistilrayError(f"interpolation lambda must be in [0, 1], got {lam}")


def _check_normalization(kind: str) -> None:
    if kind not in NORMALIZATIONS:
        raise DistilrayError(f"unknown normalization {kind!r}; allowed: {', '.join(NORMALIZATIONS)}")


def _valid_mask(w: torch.Tensor, valid: torch.Tensor | None) -> torch.Tensor:
    """Checks w is (B, N) and returns a bool mask of the same shape (all True when None)."""
    if w.dim() != 2:
        raise DistilrayError(f"expected a (batch, positions) tensor, got shape {tuple(w.shape)}")
    if valid is None:
        return torch.ones(w.shape, dtype=torch.bool, device=w.device)
    if valid.shape != w.shape:
        raise DistilrayError(f"valid mask shape {tuple(valid.shape)} differs from {tuple(w.shape)}")
    if valid.dtype != torch.bool:
        raise DistilrayError(f"valid mask must be bool, got {valid.dtype}")
    return valid.to(w.device)


def _transform_sign(sign: str, item: str) -> str:
    if item in ("absolute", "exp", "max"):
        return _NONNEG
    if item == "minus":
        return {_NONNEG: _NONPOS, _NONPOS: _NONNEG}.get(sign, _SIGNED)
    # shift: w - log C moves values up when C <= 1 and down when C >= 1.
    log_c = math.log(_parse_shift(item))
    if sign == _NONNEG and log_c <= 0:
        return _NONNEG
    if sign == _NONPOS and log_c >= 0:
        return _NONPOS
    return _SIGNED


# --------------------------------------------------------------------------------------------- spec and presets


@dataclass(frozen=True)
class WeightingSpec:
    """How scores become weights. Validated on construction; weights it produces are never negative."""

    transforms: tuple[str, ...] = ()
    truncation: float | None = None  # gamma: w <- min(w, gamma)
    kappa: float | None = None  # top-kappa share of valid targets kept (binary weights)
    normalization: str = "none"  # "none", "l1", "softmax"
    interpolation: float | None = None  # lambda: w <- lambda + (1 - lambda) w

    def __post_init__(self) -> None:
        if isinstance(self.transforms, str):
            raise DistilrayError(f"transforms must be a sequence of names, got the string {self.transforms!r}")
        object.__setattr__(self, "transforms", tuple(self.transforms))
        sign = _SIGNED  # raw scores d have either sign
        for item in self.transforms:
            _check_transform(item)
            sign = _transform_sign(sign, item)
        if self.truncation is not None:
            _check_gamma(self.truncation)  # min(w, gamma > 0) keeps the sign class
        if self.kappa is not None:
            _check_kappa(self.kappa)
            sign = _NONNEG  # binary {0, 1}
        _check_normalization(self.normalization)
        if self.normalization == "softmax":
            sign = _NONNEG
        if self.interpolation is not None:
            _check_lambda(self.interpolation)
            if self.interpolation == 1:
                sign = _NONNEG  # constant 1
        if sign != _NONNEG:
            raise DistilrayError(
                f"weighting {self.describe()!r} can give negative weights ({sign} after all steps), which would "
                "reward loss; add 'absolute', 'exp' or 'max', top-kappa, or softmax normalization"
            )

    def describe(self) -> str:
        """Short human-readable form, e.g. 'absolute -> top-kappa 0.25 -> l1'."""
        steps = list(self.transforms)
        if self.truncation is not None:
            steps.append(f"truncate {self.truncation:g}")
        if self.kappa is not None:
            steps.append(f"top-kappa {self.kappa:g}")
        if self.normalization != "none":
            steps.append(self.normalization)
        if self.interpolation is not None:
            steps.append(f"lambda {self.interpolation:g}")
        return " -> ".join(steps) if steps else "identity"


_PRESET_PARAMS = {
    "uniform": (),
    "dense": ("lam",),
    "sparse": ("kappa",),
    "longce": ("gamma",),
    "ppmi": ("kappa", "shift"),
    "npmi": ("kappa", "shift"),
}


def weighting_spec(
    variant: str,
    lam: float | None = None,
    kappa: float | None = None,
    gamma: float | None = None,
    shift: float | None = None,
) -> WeightingSpec | None:
    """The paper's named variants (note section 4); None for "uniform" (plain cross-entropy, no scoring).

    A parameter the variant does not use raises instead of being silently ignored.
    """
    if variant not in VARIANTS:
        raise DistilrayError(f"unknown token-weighting variant {variant!r}; allowed: {', '.join(VARIANTS)}")
    given = {"lam": lam, "kappa": kappa, "gamma": gamma, "shift": shift}
    used = _PRESET_PARAMS[variant]
    for name, value in given.items():
        if value is not None and name not in used:
            uses = ", ".join(used) if used else "no parameters"
            raise DistilrayError(f"variant {variant!r} ignores {name}={value}; it uses {uses}")
    if variant == "uniform":
        return None
    if variant == "dense":
        return WeightingSpec(("absolute",), normalization="l1", interpolation=0.75 if lam is None else lam)
    if variant == "sparse":
        return WeightingSpec(("absolute",), kappa=0.25 if kappa is None else kappa, normalization="l1")
    if variant == "longce":
        return WeightingSpec(("minus", "exp"), truncation=5.0 if gamma is None else gamma)
    shift_item = f"shift:{1.0 if shift is None else float(shift)!r}"
    transforms = ("minus", shift_item, "max") if variant == "ppmi" else (shift_item, "max")
    return WeightingSpec(transforms, kappa=0.25 if kappa is None else kappa, normalization="l1")


def custom_or_preset(cfg) -> WeightingSpec | None:
    """The spec of a weighting config (distilray.config.WeightingConfig, read by attribute): a named variant
    with its parameters, or `custom` with every step spelled out (lam: interpolation, kappa: top-kappa,
    gamma: truncation). Keys that the chosen form would ignore are refused."""
    if cfg.variant != "custom":
        extra = [k for k, v in (("transforms", cfg.transforms), ("normalization", cfg.normalization)) if v]
        if extra:
            raise DistilrayError(
                f"variant {cfg.variant!r} fixes its own steps and ignores {', '.join(extra)}; "
                "use variant=custom to give transforms and normalization"
            )
        return weighting_spec(cfg.variant, lam=cfg.lam, kappa=cfg.kappa, gamma=cfg.gamma, shift=cfg.shift)
    if cfg.shift is not None:
        raise DistilrayError("variant custom takes a shift as a transform (transforms=[minus,shift:2,max]), not shift=")
    if not cfg.transforms and cfg.kappa is None:
        raise DistilrayError("variant custom needs transforms (absolute, minus, exp, max, shift:C) or a kappa")
    return WeightingSpec(
        tuple(cfg.transforms),
        truncation=cfg.gamma,
        kappa=cfg.kappa,
        normalization=cfg.normalization or "none",
        interpolation=cfg.lam,
    )


# --------------------------------------------------------------------------------------------- weighting steps


def apply_transforms(w: torch.Tensor, transforms: Sequence[str]) -> torch.Tensor:
    """Elementwise transforms, left to right: absolute, minus, exp, max (w, 0), shift:C (w - log C)."""
    for item in transforms:
        _check_transform(item)
        if item == "absolute":
            w = w.abs()
        elif item == "minus":
            w = -w
        elif item == "exp":
            w = w.exp()
        elif item == "max":
            w = w.clamp(min=0)
        else:
            w = w - math.log(_parse_shift(item))
    return w


def truncate(w: torch.Tensor, gamma: float) -> torch.Tensor:
    """min(w, gamma): clips from above only."""
    _check_gamma(gamma)
    return w.clamp(max=gamma)


def _keep_count(kappa: float, n: int) -> int:
    # The epsilon keeps floor exact when kappa * n is an integer up to rounding (0.29 * 100 = 28.999...).
    return max(1, math.floor(kappa * n + 1e-9)) if n > 0 else 0


def top_kappa(
    w: torch.Tensor,
    kappa: float,
    valid: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Binary {0, 1} weights: per row, the k = max(1, floor(kappa * n)) largest of its n valid values.

    Ties at the cut value are broken at random among exactly the values equal to it (any sign), with
    `generator` (default: seeded with DEFAULT_TIE_SEED, so repeated calls agree). Padding is never selected.
    """
    _check_kappa(kappa)
    valid = _valid_mask(w, valid)
    if torch.isnan(w[valid]).any():
        raise DistilrayError("top-kappa got NaN weights at valid positions")
    if generator is None:
        generator = torch.Generator().manual_seed(DEFAULT_TIE_SEED)
    out = torch.zeros(w.shape, dtype=torch.float32, device=w.device)
    # One row at a time: k depends on the row's valid count, and B is small in long-context training.
    for row in range(w.shape[0]):
        positions = valid[row].nonzero().squeeze(1)
        k = _keep_count(kappa, positions.numel())
        if k == 0:
            continue
        values = w[row, positions]
        cut = torch.topk(values, k).values[-1]
        above = positions[values > cut]
        tied = positions[values == cut]
        order = torch.randperm(tied.numel(), generator=generator, device=generator.device).to(w.device)
        out[row, above] = 1.0
        out[row, tied[order[: k - above.numel()]]] = 1.0
    return out


def normalize(w: torch.Tensor, kind: str, valid: torch.Tensor | None = None) -> torch.Tensor:
    """Row normalization over valid positions; padding gets 0.

    For "l1" and "softmax", a row whose valid weights are all zero first becomes uniform 1 (no signal: plain
    cross-entropy). "l1": n * w / sum|w| (row mean 1 for non-negative w); "softmax": n * softmax(w);
    "none": w unchanged.
    """
    _check_normalization(kind)
    if kind == "none":
        return w
    valid = _valid_mask(w, valid)
    w = torch.where(valid, w.float(), torch.zeros((), device=w.device))
    all_zero = ~((w != 0) & valid).any(dim=1, keepdim=True)
    w = torch.where(all_zero & valid, torch.ones((), device=w.device), w)
    n = valid.sum(dim=1, keepdim=True).float()
    if kind == "l1":
        total = w.abs().sum(dim=1, keepdim=True)
        return n * w / total.clamp(min=torch.finfo(torch.float32).tiny)
    probs = torch.softmax(w.masked_fill(~valid, float("-inf")), dim=1)
    return torch.where(valid, n * probs, torch.zeros((), device=w.device))  # all-padding rows: NaN -> 0


def interpolate(w: torch.Tensor, lam: float, valid: torch.Tensor | None = None) -> torch.Tensor:
    """lam + (1 - lam) * w on valid positions; padding gets 0."""
    _check_lambda(lam)
    valid = _valid_mask(w, valid)
    return torch.where(valid, lam + (1.0 - lam) * w, torch.zeros((), dtype=w.dtype, device=w.device))


@torch.no_grad()
def token_weights(
    scores: torch.Tensor,
    spec: WeightingSpec | None,
    valid: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """(B, N) scores -> (B, N) float32 weights, no grad; padding gets 0. spec None: uniform 1 (plain CE)."""
    valid = _valid_mask(scores, valid)
    w = scores.detach().float()
    if torch.isnan(w[valid]).any():
        raise DistilrayError(
            "scores contain NaN at valid positions (short losses left NaN by first_window=False must go through "
            "context_pure_scores, which sets d = 0 there)"
        )
    w = torch.where(valid, w, torch.zeros((), device=w.device))  # padding may hold garbage or NaN
    if spec is not None:
        w = apply_transforms(w, spec.transforms)
        if spec.truncation is not None:
            w = truncate(w, spec.truncation)
        if spec.kappa is not None:
            w = top_kappa(w, spec.kappa, valid, generator)
        w = normalize(w, spec.normalization, valid)
        if spec.interpolation is not None:
            w = interpolate(w, spec.interpolation, valid)
    else:
        w = torch.ones_like(w)
    return torch.where(valid, w, torch.zeros((), device=w.device)).float()


def weighted_loss(long_losses: torch.Tensor, weights: torch.Tensor, valid: torch.Tensor | None = None) -> torch.Tensor:
    """sum(w * l) / number of valid targets: the note's plain mean over positions, padding masked out.

    Weights are detached here, so gradient flows only through `long_losses`.
    """
    if weights.shape != long_losses.shape:
        raise DistilrayError(f"weights shape {tuple(weights.shape)} differs from losses {tuple(long_losses.shape)}")
    valid = _valid_mask(long_losses, valid)
    # where (not multiply) so NaN/inf losses at padding leave no NaN in the value or the gradient.
    terms = torch.where(valid, weights.detach().to(long_losses.dtype) * long_losses, torch.zeros_like(long_losses))
    return terms.sum() / valid.sum().clamp(min=1)


@torch.no_grad()
def weight_stats(weights: torch.Tensor, scores: torch.Tensor, valid: torch.Tensor | None = None) -> dict[str, float]:
    """Diagnostics over valid positions, as Python floats (0.0 when nothing is valid).

    weight_mean / weight_std: mean over rows (with at least one valid target) of the row's mean and population
    std of w; zero_weight_share: share of w == 0; negative_score_share: share of d < 0 (long context helped).
    """
    if weights.shape != scores.shape:
        raise DistilrayError(f"weights shape {tuple(weights.shape)} differs from scores {tuple(scores.shape)}")
    valid = _valid_mask(weights, valid)
    w = torch.where(valid, weights.detach().float(), torch.zeros((), device=weights.device))
    n = valid.sum(dim=1).float()
    rows = n > 0
    total = valid.sum().item()
    if total == 0:
        return {"weight_mean": 0.0, "weight_std": 0.0, "zero_weight_share": 0.0, "negative_score_share": 0.0}
    row_mean = w.sum(dim=1) / n.clamp(min=1)
    row_var = torch.where(valid, (w - row_mean[:, None]) ** 2, torch.zeros((), device=w.device)).sum(dim=1)
    row_std = (row_var / n.clamp(min=1)).sqrt()
    return {
        "weight_mean": row_mean[rows].mean().item(),
        "weight_std": row_std[rows].mean().item(),
        "zero_weight_share": ((w == 0) & valid).sum().item() / total,
        "negative_score_share": ((scores.detach() < 0) & valid).sum().item() / total,
    }


# --------------------------------------------------------------------------------------------- short-context windows


def _nearest_stride(seq_len: int, base_length: int, wanted: int) -> int | None:
    span = seq_len - base_length
    candidates = [s for s in range(1, base_length) if span % s == 0]
    if not candidates:
        return None
    return min(candidates, key=lambda s: (abs(s - wanted), -s))


def check_stride(seq_len: int, base_length: int, base_stride: int) -> None:
    """Windows of length b at stride s must tile the sequence exactly: raises unless
    0 < s < b <= L and (L - b) % s == 0 (s = b would leave the first target of every window unscored).
    """
    ok = 2 <= base_length <= seq_len and 0 < base_stride < base_length
    ok = ok and (seq_len - base_length) % base_stride == 0
    if ok:
        return
    rule = (
        f"short-context windows need 0 < base_stride < base_length <= seq_len and (seq_len - base_length) "
        f"divisible by base_stride; got seq_len={seq_len}, base_length={base_length}, base_stride={base_stride}"
    )
    if not 2 <= base_length <= seq_len:
        raise DistilrayError(f"{rule}: base_length must be in [2, {seq_len}]")
    hint = _nearest_stride(seq_len, base_length, base_stride)
    paper = (1 - base_length / seq_len) * base_length  # README rule s = (1 - b/L) b, giving J = L/b passes
    extra = ""
    if paper.is_integer() and int(paper) != hint and 0 < paper < base_length:
        if (seq_len - base_length) % int(paper) == 0:
            extra = f" (or {int(paper)} = (1 - b/L) * b, giving {seq_len // base_length} extra windows)"
    raise DistilrayError(f"{rule}; nearest valid base_stride: {hint}{extra}")


def window_starts(seq_len: int, base_length: int, base_stride: int) -> list[int]:
    """[0, s, 2s, ..., J s] with J = (L - b) / s."""
    check_stride(seq_len, base_length, base_stride)
    return list(range(0, seq_len - base_length + 1, base_stride))


def per_token_losses(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Cross-entropy per position: logits (M, T, V), targets (M, T) -> (M, T) float32."""
    if logits.dim() != 3 or targets.shape != logits.shape[:2]:
        raise DistilrayError(
            f"per_token_losses needs logits (M, T, V) and targets (M, T); got {tuple(logits.shape)} "
            f"and {tuple(targets.shape)}"
        )
    m, t, v = logits.shape
    losses = F.cross_entropy(logits.float().reshape(m * t, v), targets.reshape(m * t), reduction="none")
    return losses.reshape(m, t)


def short_context_losses(
    tokens: torch.Tensor,
    window_losses_fn: WindowLossesFn,
    base_length: int,
    base_stride: int,
    bos_id: int | None = None,
    first_window: bool = True,
    windows_per_pass: int = 8,
) -> torch.Tensor:
    """Short-context per-token losses (B, N) from windows [j s, j s + b), j = 0..J (note section 3).

    Window 0 gives targets 0..b-2; window j >= 1 gives only its last s predictions (loss indices
    b-1+(j-1)s .. b-2+js), which see b-s .. b-1 tokens of context. If `bos_id` is given and every row starts
    with it, the first token of every window is replaced by BOS (the same rule for frozen and self scoring).
    Windows of all rows are stacked and scored `windows_per_pass` at a time by
    `window_losses_fn(windows (M, b)) -> (M, b-1)`. With first_window=False window 0 is not run and its
    b-1 entries are NaN (the caller uses the long losses there).
    """
    if tokens.dim() != 2 or tokens.dtype.is_floating_point or tokens.dtype == torch.bool:
        raise DistilrayError(
            f"tokens must be a (batch, length) integer tensor, got {tokens.dtype} {tuple(tokens.shape)}"
        )
    if windows_per_pass < 1:
        raise DistilrayError(f"windows_per_pass must be >= 1, got {windows_per_pass}")
    batch, seq_len = tokens.shape
    b, s = base_length, base_stride
    check_stride(seq_len, b, s)
    windows = tokens.unfold(1, b, s).clone()  # (B, J+1, b); clone: unfold is a view and BOS is written in
    if bos_id is not None and bool((tokens[:, 0] == bos_id).all()):
        windows[:, :, 0] = bos_id  # window 0 already starts with it
    if not first_window:
        windows = windows[:, 1:]
    per_row = windows.shape[1]
    flat = windows.reshape(batch * per_row, b)
    parts = []
    for chunk in torch.split(flat, windows_per_pass):
        losses = window_losses_fn(chunk.contiguous())
        if tuple(losses.shape) != (chunk.shape[0], b - 1):
            raise DistilrayError(
                f"window_losses_fn returned shape {tuple(losses.shape)} for {chunk.shape[0]} windows of "
                f"{b} tokens; expected ({chunk.shape[0]}, {b - 1})"
            )
        parts.append(losses.detach().float().to(tokens.device))
    stacked = torch.cat(parts) if parts else torch.empty((0, b - 1), device=tokens.device)
    losses = stacked.reshape(batch, per_row, b - 1)
    out = torch.full((batch, seq_len - 1), float("nan"), dtype=torch.float32, device=tokens.device)
    if first_window:
        out[:, : b - 1] = losses[:, 0]
        losses = losses[:, 1:]
    if seq_len > b:
        # Windows 1..J tile loss indices b-1 .. N-1 exactly (J s = L - b).
        out[:, b - 1 :] = losses[:, :, b - 1 - s :].reshape(batch, seq_len - b)
    return out


def context_pure_scores(long_losses: torch.Tensor, short_losses: torch.Tensor, base_length: int) -> torch.Tensor:
    """d = long - short (detached, float32), exactly 0 on the b-1 targets window 0 covers (indices 0..b-2).

    There both contexts are the same, so frozen and self scoring give the same d for the same model.
    """
    if long_losses.shape != short_losses.shape or long_losses.dim() != 2:
        raise DistilrayError(
            f"long losses {tuple(long_losses.shape)} and short losses {tuple(short_losses.shape)} must be the "
            "same (batch, positions) shape"
        )
    if base_length < 2:
        raise DistilrayError(f"base_length must be >= 2, got {base_length}")
    d = long_losses.detach().float() - short_losses.detach().float()
    d[:, : base_length - 1] = 0.0
    return d


def model_window_losses(model: torch.nn.Module) -> WindowLossesFn:
    """A window_losses_fn for a HF causal LM: no_grad, eval mode (dropout off, note pitfall 8), float32 losses.

    Every submodule's training flag is restored afterwards, also on exception.
    """

    def window_losses(windows: torch.Tensor) -> torch.Tensor:
        modes = [(module, module.training) for module in model.modules()]
        model.eval()
        try:
            with torch.no_grad():
                param = next(model.parameters(), None)
                if param is not None:
                    windows = windows.to(param.device)  # the scorer may live elsewhere than the batch
                logits = model(input_ids=windows).logits
                return per_token_losses(logits[:, :-1], windows[:, 1:])
        finally:
            for module, mode in modes:
                module.training = mode

    return window_losses
