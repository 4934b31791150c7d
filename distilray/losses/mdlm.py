"""Masked diffusion (MDLM, arXiv 2406.07524) pieces shared by training, distillation and sampling
(reference/sdtt.md 1): the log-linear schedule, the SUBS parameterisation, antithetic times, the
forward masking, the NELBO, fp64 categorical sampling and one ancestral step.

Schedule (eps = 1e-3): sigma(t) = -log(1 - (1 - eps) t), alpha_t = exp(-sigma) = 1 - (1 - eps) t; a
token is masked with probability 1 - alpha_t = (1 - eps) t (the "move chance").

Large finite negatives (NEG_INF = -1e6) stand for log 0 wherever log-probs may enter a KL or a
product: -inf would turn 0 * (-inf) into NaN.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from distilray.errors import DistilrayError

SCHEDULE_EPS = 1e-3  # of the log-linear schedule (MDLM noise_schedule.py)
SAMPLER_EPS = 1e-5  # last time of the sampling grid, and SDTT's training sampling_eps
NEG_INF = -1e6


# --- schedule ---------------------------------------------------------------------------------------------------


def move_chance(t: Tensor, eps: float = SCHEDULE_EPS) -> Tensor:
    """1 - alpha_t = (1 - eps) t: the probability that a token is [MASK] at time t."""
    return (1 - eps) * t


def alpha(t: Tensor, eps: float = SCHEDULE_EPS) -> Tensor:
    """alpha_t = 1 - (1 - eps) t: the probability that a token is still clean at time t."""
    return 1 - (1 - eps) * t


def sigma(t: Tensor, eps: float = SCHEDULE_EPS) -> Tensor:
    """Total noise sigma(t) = -log(1 - (1 - eps) t), so alpha_t = exp(-sigma(t))."""
    return -torch.log1p(-(1 - eps) * t)


def _dsigma(t: Tensor, eps: float) -> Tensor:
    """d sigma / dt = (1 - eps) / (1 - (1 - eps) t)."""
    return (1 - eps) / (1 - (1 - eps) * t)


def nelbo_weight(t: Tensor, eps: float = SCHEDULE_EPS) -> Tensor:
    """-alpha'_t / (1 - alpha_t), written as MDLM does: dsigma / expm1(sigma). Exactly 1/t for log-linear."""
    return _dsigma(t, eps) / torch.expm1(sigma(t, eps))


# --- parameterisation and loss ----------------------------------------------------------------------------------


def subs_log_probs(logits: Tensor, z: Tensor, mask_id: int) -> Tensor:
    """SUBS: logits (B, L, V), z (B, L) -> log x_theta (B, L, V) float32.

    The [MASK] logit gets NEG_INF before the log-softmax (a clean token is never [MASK]); a position that
    is not masked in z is a one-hot copy of its token (0 there, NEG_INF elsewhere). Always fp32, as the
    original's autocast(float32), so bf16 trainers get the same log-probs.
    """
    logits = logits.float().clone()
    logits[..., mask_id] += NEG_INF
    log_probs = F.log_softmax(logits, dim=-1)  # (B, L, V)
    copy = torch.full_like(log_probs, NEG_INF).scatter_(-1, z.unsqueeze(-1), 0.0)  # (B, L, V)
    return torch.where((z != mask_id).unsqueeze(-1), copy, log_probs)


def sample_times(n: int, generator: torch.Generator, eps_s: float, form: Literal["sdtt", "mdlm"] = "sdtt") -> Tensor:
    """Antithetic times (n,) float32 in [eps_s, 1) for a micro-batch of n sequences.

    sdtt: one uniform u shared by the batch, t'_b = (u + b/n) mod 1 (a randomly rotated lattice);
    mdlm: one uniform per sample, t'_b = (u_b + b)/n (one point per stratum). Then t = (1 - eps_s) t' + eps_s.
    """
    if n < 1:
        raise DistilrayError(f"need n >= 1 times, got {n}")
    offsets = torch.arange(n, dtype=torch.float32, device=generator.device)
    if form == "sdtt":
        u = torch.rand(1, generator=generator, device=generator.device)
        t_prime = torch.remainder(u + offsets / n, 1.0)
    elif form == "mdlm":
        u = torch.rand(n, generator=generator, device=generator.device)
        t_prime = (u + offsets) / n
    else:
        raise DistilrayError(f"time sampling form must be 'sdtt' or 'mdlm', got {form!r}")
    return (1 - eps_s) * t_prime + eps_s


def mask_tokens(x: Tensor, t: Tensor, mask_id: int, generator: torch.Generator) -> Tensor:
    """Forward process: x (B, L), t (B,) -> z_t (B, L), each token masked independently w.p. move_chance(t)."""
    u = torch.rand(x.shape, generator=generator, device=generator.device).to(x.device)  # (B, L)
    masked = u < move_chance(t.to(x.device)).unsqueeze(-1)
    return torch.where(masked, torch.full_like(x, mask_id), x)


def nelbo(log_probs: Tensor, x: Tensor, z: Tensor, t: Tensor, mask_id: int) -> Tensor:
    """Negative ELBO per token, scalar: sum over masked positions of w(t) * -log x_theta[x], divided by ALL
    B * L tokens (MDLM's attention_mask.sum()), not by the masked ones.

    log_probs (B, L, V) from subs_log_probs, x clean (B, L), z noised (B, L), t (B,).
    """
    nll = -log_probs.gather(-1, x.unsqueeze(-1)).squeeze(-1)  # (B, L)
    weighted = nelbo_weight(t.float()).unsqueeze(-1) * nll  # (B, L)
    masked = z == mask_id
    return torch.where(masked, weighted, torch.zeros_like(weighted)).sum() / x.numel()


# --- sampling -------------------------------------------------------------------------------------------------


def categorical(probs: Tensor, generator: torch.Generator, float64: bool = True) -> Tensor:
    """One index per row of probs (..., V) -> (...) int64, by the exponential race argmax_v p_v / E_v,
    E_v ~ Exp(1) (the Gumbel-max trick in another form; probs need not be normalised).

    float64 draws the uniforms and runs the race in float64: fp32 truncates the tail of E, which acts like
    a lower temperature (reference/sdtt.md 4.4). E = -log1p(-u) with u in [0, 1) is finite; u = 0 gives
    E = 0, clamped to the smallest positive number so no division is 0/0. A zero-probability category
    scores exactly 0 and loses to any category with positive probability. The uniforms come from the
    generator's device, so a CPU generator drives a GPU sampler too (at the cost of a copy).
    """
    dtype = torch.float64 if float64 else torch.float32
    u = torch.rand(probs.shape, generator=generator, device=generator.device, dtype=dtype).to(probs.device)
    race = u.neg_().log1p_().neg_().clamp_min_(torch.finfo(dtype).tiny)  # in place: (B, L, V) fp64 is large
    return race.reciprocal_().mul_(probs.to(dtype)).argmax(dim=-1)


def _as_times(t: Tensor | float, batch: int, device: torch.device) -> Tensor:
    """A time as a float64 (B, 1, 1) tensor, from a float or a (B,) tensor."""
    t = torch.as_tensor(t, dtype=torch.float64, device=device)
    return t.expand(batch).reshape(batch, 1, 1) if t.dim() == 0 else t.reshape(batch, 1, 1)


def ancestral_step_probs(
    log_probs: Tensor, t: Tensor | float, s: Tensor | float, mask_id: int, eps: float = SCHEDULE_EPS
) -> Tensor:
    """q(z_s | z_t, x_theta) for a MASKED position: log_probs (B, L, V) SUBS -> probs (B, L, V) float64.

    p(v) = (alpha_s - alpha_t)/(1 - alpha_t) x_theta[v] (v != m), p(m) = (1 - alpha_s)/(1 - alpha_t).
    Under log-linear the reveal share is (t - s)/t, whatever eps. When s < 0 (the original teacher grid's
    edge case, reference/sdtt.md 4.1) p(m) would be negative: it is clamped to 0 and the real tokens get
    weight 1, so every masked token is revealed. The original's race with a negative p(m) reveals them
    too, with the same distribution; here the rows still sum to one. Unmasked rows are not meaningful
    here: `ancestral_step` copies them.
    """
    batch = log_probs.shape[0]
    t = _as_times(t, batch, log_probs.device)
    s = _as_times(s, batch, log_probs.device)
    stay_masked = ((1 - alpha(s, eps)) / (1 - alpha(t, eps))).clamp(0.0, 1.0)  # (B, 1, 1)
    x_theta = log_probs.to(torch.float64, copy=True).exp_()
    x_theta[..., mask_id] = 0.0  # SUBS already makes it exp(-1e6) = 0; make it exact for other inputs
    probs = x_theta.mul_(1 - stay_masked)  # (B, L, V), in place
    probs[..., mask_id] = stay_masked.reshape(batch, 1)
    return probs


def ancestral_step(
    log_probs: Tensor,
    z: Tensor,
    t: Tensor | float,
    s: Tensor | float,
    mask_id: int,
    generator: torch.Generator,
    float64: bool = True,
) -> Tensor:
    """One ancestral step t -> s (s < t): z_t (B, L) -> z_s (B, L). Masked positions draw from
    `ancestral_step_probs` (each stays [MASK] or becomes a real token); unmasked positions are copied."""
    probs = ancestral_step_probs(log_probs, t, s, mask_id)  # (B, L, V)
    draw = categorical(probs, generator, float64=float64)  # (B, L)
    return torch.where(z == mask_id, draw, z)
