"""SDTT, self-distillation through time (Deschenaux & Gulcehre, arXiv 2410.21035; reference/sdtt.md 2, 4, 6).

A student learns to produce in ONE sampling step of size m * delta what a frozen teacher produces in m
ancestral steps of size delta. Per training step:
1. z_t ~ q(z_t | x) at antithetic times t (losses/mdlm.py);
2. `teacher_targets`: the teacher walks m steps from z_t; each position revealed at step k takes the
   teacher's full distribution x_T^(k) as its target; positions still masked after m steps take the
   last step's prediction;
3. the student runs once on z_t, and `sdtt_loss` compares it with the targets over the positions masked
   in z_t (no 1/t weight).
After each round the student becomes the teacher and delta grows by m (`delta_for_round`), so the
student's number of sampling steps divides by m per round (`sampling_steps_for_round`).

Teacher time grid: step k goes from t_k to t_k - delta. "corrected" (the default) uses t_k = t - k delta;
"original" reproduces the reference code's grid, which is almost certainly a typo (reference/sdtt.md 4.1)
and reveals about 1.34x as many tokens over two steps; it is kept only for reproduction and ablation.

Divergence names say what they compute (reference/sdtt.md 4.2): the original's `kl-bwd` is `kld`, and
its `tvd` (an L1 distance between LOG-probabilities) is `l1-log`; `tvd` here is a real total variation.
"""

from __future__ import annotations

import math
from typing import Callable, Literal

import torch
from torch import Tensor

from distilray.errors import DistilrayError
from distilray.losses.mdlm import NEG_INF, SAMPLER_EPS, ancestral_step

Grid = Literal["corrected", "original"]
GRIDS = ("corrected", "original")
DIVERGENCES = ("kld", "kl-fwd", "mse", "tvd", "l1-log", "jsd")


# --- teacher trajectory ---------------------------------------------------------------------------------------


def teacher_times(
    t: Tensor, delta: float, num_teacher_steps: int = 2, grid: Grid = "corrected", eps_s: float = SAMPLER_EPS
) -> Tensor:
    """Start times of the teacher's steps: t (B,) -> (m, B) float32; step k goes from out[k] to out[k] - delta.

    corrected: t_k = t - k delta, clamped to >= eps_s.
    original (reference/sdtt.md 4.1, reproduced exactly): space = linspace(1, 0, m), t_end = t - m delta,
    ts = t * space + (1 - t) * t_end in float64, clamped to >= eps_s, cast to float32. For m = 2:
    ts[0] = t + (1 - t)(t - 2 delta) (above t) and ts[1] = (1 - t)(t - 2 delta).
    """
    _check_grid(delta, num_teacher_steps, grid)
    t64 = torch.as_tensor(t, dtype=torch.float64).reshape(-1)  # (B,)
    if grid == "corrected":
        steps = torch.arange(num_teacher_steps, dtype=torch.float64, device=t64.device)
        times = t64.unsqueeze(0) - steps.unsqueeze(1) * delta  # (m, B)
    else:
        space = torch.linspace(1.0, 0.0, num_teacher_steps, dtype=torch.float64, device=t64.device)
        t_end = t64 - num_teacher_steps * delta  # (B,)
        # The typo itself: (1 - t) where (1 - space) was presumably meant.
        times = t64.unsqueeze(0) * space.unsqueeze(1) + (1 - t64).unsqueeze(0) * t_end.unsqueeze(0)  # (m, B)
    return times.clamp_min(eps_s).float()


def reveal_fractions(
    t: float, delta: float, num_teacher_steps: int = 2, grid: Grid = "corrected", eps_s: float = SAMPLER_EPS
) -> list[float]:
    """Expected share of the still-masked tokens that teacher step k reveals, for k = 0..m-1.

    Under the log-linear schedule a step t_k -> s reveals a masked token with probability (t_k - s)/t_k,
    here delta / t_k; a step whose end time falls below 0 reveals everything (1.0). At t = 0.5 and
    delta = 1/1024: corrected [0.0020, 0.0020], original [0.0013, 0.0039] (reference/sdtt.md 4.1).
    """
    starts = teacher_times(torch.tensor([t]), delta, num_teacher_steps, grid, eps_s)[:, 0].double()  # (m,)
    return [1.0 if float(start) - delta < 0 else delta / float(start) for start in starts]


@torch.no_grad()
def teacher_targets(
    teacher_log_probs: Callable[[Tensor], Tensor],
    z_t: Tensor,
    t: Tensor,
    delta: float,
    mask_id: int,
    generator: torch.Generator,
    num_teacher_steps: int = 2,
    grid: Grid = "corrected",
    eps_s: float = SAMPLER_EPS,
    float64: bool = True,
) -> tuple[Tensor, Tensor]:
    """The teacher's m-step trajectory from z_t (B, L) at times t (B,) -> (targets, masked).

    teacher_log_probs: z (B, L) -> SUBS log-probs (B, L, V), the frozen teacher.
    targets (B, L, V) float32: at each position masked in z_t, the log-probs of the teacher step that
    revealed it (the full distribution, not the sampled token), or of the last step if none did; zeros
    elsewhere. masked (B, L) bool: the positions masked in z_t, the only ones that enter the loss.
    float64 draws the ancestral steps' categorical samples in float64 (reference/sdtt.md 6.2).
    """
    times = teacher_times(t, delta, num_teacher_steps, grid, eps_s).to(z_t.device)  # (m, B)
    masked = z_t == mask_id  # (B, L)
    z = z_t
    targets: Tensor | None = None
    for k in range(num_teacher_steps):
        log_probs = teacher_log_probs(z).float()  # (B, L, V): sees z_t plus the tokens revealed before step k
        if targets is None:
            targets = torch.zeros_like(log_probs)
        # The step size is the fixed delta, on either grid (the original goes to ts[k] - delta, not ts[k+1]).
        z_next = ancestral_step(log_probs, z, times[k], times[k] - delta, mask_id, generator, float64=float64)
        revealed = (z == mask_id) & (z_next != mask_id)  # (B, L)
        targets = torch.where(revealed.unsqueeze(-1), log_probs, targets)
        z = z_next
    still_masked = z == mask_id
    targets = torch.where(still_masked.unsqueeze(-1), log_probs, targets)
    return targets, masked


def _check_grid(delta: float, num_teacher_steps: int, grid: str) -> None:
    if not isinstance(grid, str) or grid not in GRIDS:
        raise DistilrayError(f"teacher grid must be one of {', '.join(GRIDS)}, got {grid!r}")
    if not isinstance(num_teacher_steps, int) or num_teacher_steps < 1:
        raise DistilrayError(f"num_teacher_steps must be an int >= 1, got {num_teacher_steps!r}")
    if not delta > 0:
        raise DistilrayError(f"delta must be > 0, got {delta}")


# --- divergences ----------------------------------------------------------------------------------------------
# Each maps student log-probs a (N, V) and target log-probs b (N, V), both finite (>= NEG_INF), to (N,).


def _kld(a: Tensor, b: Tensor) -> Tensor:
    """Reverse KL(x_S || y) = sum_v e^a (a - b): the original's `kl-bwd` (F.kl_div(b, a, log_target=True))."""
    return (a.exp() * (a - b)).sum(-1)


def _kl_fwd(a: Tensor, b: Tensor) -> Tensor:
    """Forward KL(y || x_S) = sum_v e^b (b - a)."""
    return (b.exp() * (b - a)).sum(-1)


def _mse(a: Tensor, b: Tensor) -> Tensor:
    """Mean over the vocabulary of (a - b)^2; the mean over positions then gives the original's F.mse_loss."""
    return (a - b).pow(2).mean(-1)


def _tvd(a: Tensor, b: Tensor) -> Tensor:
    """Total variation 1/2 sum_v |e^a - e^b|, on probabilities."""
    return 0.5 * (a.exp() - b.exp()).abs().sum(-1)


def _l1_log(a: Tensor, b: Tensor) -> Tensor:
    """sum_v |a - b| on LOG-probabilities: what the original calls `tvd`."""
    return (a - b).abs().sum(-1)


def _jsd(a: Tensor, b: Tensor) -> Tensor:
    """Jensen-Shannon 1/2 KL(p || m) + 1/2 KL(q || m), m = (p + q)/2 in log space (stable for tiny p, q)."""
    log_m = torch.logaddexp(a, b) - math.log(2.0)
    return 0.5 * (a.exp() * (a - log_m)).sum(-1) + 0.5 * (b.exp() * (b - log_m)).sum(-1)


_ROWS: dict[str, Callable[[Tensor, Tensor], Tensor]] = {
    "kld": _kld,
    "kl-fwd": _kl_fwd,
    "mse": _mse,
    "tvd": _tvd,
    "l1-log": _l1_log,
    "jsd": _jsd,
}


def sdtt_loss(name: str, student_log_probs: Tensor, target_log_probs: Tensor, mask: Tensor) -> Tensor:
    """Divergence `name` between student (B, L, V) and target (B, L, V) log-probs, averaged over the
    positions where mask (B, L) is True -> scalar. An empty mask gives 0, still attached to the graph.

    Computed in float32 at least. Log-probs are clamped to >= NEG_INF first: a -inf would make
    e^a (a - b) = 0 * (-inf) = NaN, and NaN gradients even where torch.where hides the value.
    """
    if not isinstance(name, str) or name not in _ROWS:
        raise DistilrayError(f"SDTT divergence must be one of {', '.join(DIVERGENCES)}, got {name!r}")
    if student_log_probs.shape != target_log_probs.shape:
        raise DistilrayError(
            f"student log-probs {tuple(student_log_probs.shape)} and targets {tuple(target_log_probs.shape)} differ"
        )
    if mask.shape != student_log_probs.shape[:-1]:
        raise DistilrayError(f"mask {tuple(mask.shape)} does not match log-probs {tuple(student_log_probs.shape)}")
    dtype = torch.promote_types(student_log_probs.dtype, torch.float32)
    a = student_log_probs.to(dtype).clamp_min(NEG_INF)[mask]  # (N, V)
    b = target_log_probs.detach().to(dtype).clamp_min(NEG_INF)[mask]  # (N, V)
    if a.shape[0] == 0:
        return student_log_probs.to(dtype).clamp_min(NEG_INF).sum() * 0.0
    return _ROWS[name](a, b).mean()


# --- rounds ---------------------------------------------------------------------------------------------------
# Round r (0-based) spans training steps [r, r + 1) * grow_dt_every. Its teacher steps with
# delta_r = delta_0 * m^r; its student learns one step of m * delta_r, so it samples with N / m^(r + 1) steps.
# The reference writes that student at step grow_dt_every * R, R = r + 1 (reference/sdtt.md 2).


def delta_for_round(round_index: int, orig_num_steps: int = 1024, m: int = 2, eps_s: float = SAMPLER_EPS) -> float:
    """The teacher's step size during round r (0-based): delta_0 * m^r with delta_0 = (1 - eps_s) / orig_num_steps."""
    _check_round(round_index, orig_num_steps, m)
    return (1.0 - eps_s) / orig_num_steps * m**round_index


def sampling_steps_for_round(round_index: int, orig_num_steps: int = 1024, m: int = 2) -> int:
    """Sampling steps of the student trained in round r (0-based): orig_num_steps / m^(r + 1).

    With 1024 and m = 2: 512 after round 0 (checkpoint at step 10,000), ..., 8 after round 6 (step 70,000).
    """
    _check_round(round_index, orig_num_steps, m)
    steps, rest = divmod(orig_num_steps, m ** (round_index + 1))
    if rest or steps < 1:
        raise DistilrayError(
            f"{orig_num_steps} steps do not divide into m^(r + 1) = {m ** (round_index + 1)} for round {round_index}"
        )
    return steps


def num_rounds(orig_num_steps: int = 1024, m: int = 2, min_num_sampling_steps: int = 8) -> int:
    """How many rounds give a student that samples with at least `min_num_sampling_steps` steps (1024, 2, 8: 7).

    The reference's stop rule (round(1 / delta) < min at a boundary) lets an 8th round start, whose
    4-step student no checkpoint keeps; this count stops at the last student it saves.
    """
    _check_round(0, orig_num_steps, m)
    rounds = 0
    while orig_num_steps % m ** (rounds + 1) == 0 and orig_num_steps // m ** (rounds + 1) >= min_num_sampling_steps:
        rounds += 1
    return rounds


def _check_round(round_index: int, orig_num_steps: int, m: int) -> None:
    if not isinstance(round_index, int) or round_index < 0:
        raise DistilrayError(f"round index must be an int >= 0, got {round_index!r}")
    if orig_num_steps < 1 or m < 2:
        raise DistilrayError(f"need orig_num_steps >= 1 and m >= 2, got {orig_num_steps} and {m}")
