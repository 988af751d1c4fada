r"""The diffusion processes as sub-programs, and the step formulas that model, guide, ELBO and samplers share.

**Formulas** (each written once; t is a LongTensor broadcastable to the batch dimensions, ``event_dims``
the number of trailing event dimensions of the values):

- :func:`forward_marginal` q(x_t | x_0) = N(√ᾱ_t x_0, (1 − ᾱ_t) I)  (DDPM Eq. 4);
- :func:`forward_posterior` q(x_{t−1} | x_t, x_0) = N(μ̃_t, β̃_t I), the point mass at x_0 where t = 1
  (Eq. 6–7), with mean :func:`posterior_mean`;
- :func:`reverse_step` p_θ(x_{t−1} | x_t) = N(μ_θ, σ_t² I), the decoder where t = 1, with mean
  :func:`reverse_mean` μ_θ = (x_t − β_t/√(1−ᾱ_t)·ε_θ)/√α_t (Eq. 11) and σ_t² fixed, or learned:
  :func:`learned_log_variance` (Improved DDPM Eq. 15) from the second output of a network that predicts
  (ε, v) (:func:`split_output`);
- :func:`predicted_x0` x̂_0 = (x_t − √(1−ᾱ_t) ε_θ)/√ᾱ_t, and :func:`prior_kl` L_T = KL(q(x_T | x_0) ‖ N(0, I)).

**Sub-programs** run inside the caller's plates (they open none of their own except the time plate of
:func:`plate_timesteps`, check no data and observe only what they are given), so a larger model is built
from them — e.g. a latent diffusion model whose prior over z is a chain with ``prefix="z"``:

- :func:`reverse_chain` (model): ``f"{prefix}_{T}"`` ~ N(0, I), then ``f"{prefix}_{t−1}"`` ~
  p_θ(· | x_t) for t = T … 1; the last site is observed when ``obs`` is given, else sampled. Returns x_0.
- :func:`forward_chain` (guide): takes x_0, draws ``f"{prefix}_{T}"`` ~ q(x_T | x_0), then
  ``f"{prefix}_{t−1}"`` ~ q(x_{t−1} | x_t, x_0) for t = T … 2.
- :func:`reverse_pair` / :func:`forward_pair`: the model and guide halves of the time-subsampled pair
  at a timestep t supplied by a time sampler — ``f"{prefix}_t"`` ~ q(x_t | x_0) (masked in both: it feeds
  μ_θ and scores nothing), then ``f"{prefix}_prev"`` under p_θ(· | x_t) or q(· | x_t, x_0), scaled by
  the sampler's ``scale``.
- Time samplers return a :class:`TimeDraw` (timesteps and the scale of the x_prev term):
  :func:`plate_timesteps` (one t per call by ``pyro.plate("time", T, subsample…)``, scaled by T by the
  plate), :func:`per_datum_timesteps` (one t per datum, scale T), :func:`stratified_timesteps` (one t
  per datum, the batch's draws spread over T strata, scale T) and :func:`importance_timesteps` (one t per
  datum drawn with probabilities p_t, scale 1/p_t: the time plate subsampled with a non-uniform proposal,
  unbiased for every p). Each draws at a masked site ``"t"`` in model and guide alike, so the guide's draw
  is replayed in the model and scores nothing.

:func:`elbo_terms` evaluates the per-timestep terms of −ELBO in closed form (given one draw of x_t), batched
over t, with the same formulas and the same KL as ``TraceMeanField_ELBO`` uses.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from typing import NamedTuple

import pyro
import pyro.distributions as dist
import torch
from pyro import poutine
from pyro.distributions.util import sum_rightmost
from torch.distributions import kl_divergence

from pvae.inference.recorder import publish
from pvae.models.diffusion.schedules import DiffusionSchedule
from pvae.models.diffusion.steps import ForwardStep, ReverseStep, gaussian_kl
from pvae.utils import progress_bar

__all__ = [
    "DECODERS",
    "TimeDraw",
    "elbo_terms",
    "forward_chain",
    "forward_marginal",
    "forward_pair",
    "forward_posterior",
    "importance_timesteps",
    "learned_log_variance",
    "per_datum_timesteps",
    "plate_timesteps",
    "posterior_mean",
    "predicted_x0",
    "prior_kl",
    "reverse_chain",
    "reverse_mean",
    "reverse_pair",
    "reverse_step",
    "split_output",
    "stratified_timesteps",
]

DECODERS = ("gaussian", "discretized")
Denoiser = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # ε_θ(x_t, t)


# ---- the step formulas ---------------------------------------------------------------------------------
def forward_marginal(schedule: DiffusionSchedule, x0: torch.Tensor, t: torch.Tensor, event_dims: int):
    """q(x_t | x_0) = N(√ᾱ_t x_0, (1 − ᾱ_t) I)  (DDPM Eq. 4), batch shape broadcast(t, batch of x0)."""
    loc = schedule.coef("sqrt_alpha_bar", t, x0, event_dims) * x0
    return dist.Normal(loc, schedule.coef("sqrt_one_minus_alpha_bar", t, x0, event_dims))


def posterior_mean(schedule: DiffusionSchedule, x_t, x0, t, event_dims: int) -> torch.Tensor:
    """μ̃_t(x_t, x_0) = √ᾱ_{t−1}β_t/(1−ᾱ_t)·x_0 + √α_t(1−ᾱ_{t−1})/(1−ᾱ_t)·x_t  (Eq. 7); x_0 at t = 1."""
    return (
        schedule.coef("posterior_coef_x0", t, x_t, event_dims) * x0
        + schedule.coef("posterior_coef_xt", t, x_t, event_dims) * x_t
    )


def forward_posterior(schedule: DiffusionSchedule, x_t, x0, t, event_dims: int) -> ForwardStep:
    """q(x_{t−1} | x_t, x_0) = N(μ̃_t, β̃_t I)  (Eq. 6–7): the point mass at x_0 where t = 1 (β̃_1 = 0)."""
    loc = posterior_mean(schedule, x_t, x0, t, event_dims)
    return ForwardStep(loc, schedule.coef("posterior_std", t, x_t, event_dims))


def predicted_x0(schedule: DiffusionSchedule, x_t, t, eps, event_dims: int) -> torch.Tensor:
    """x̂_0 = (x_t − √(1 − ᾱ_t) ε)/√ᾱ_t: the x_0 that x_t and the predicted noise ε imply (Eq. 4 solved)."""
    return (x_t - schedule.coef("sqrt_one_minus_alpha_bar", t, x_t, event_dims) * eps) / schedule.coef(
        "sqrt_alpha_bar", t, x_t, event_dims
    )


def reverse_mean(
    schedule: DiffusionSchedule, x_t, t, eps, event_dims: int, *, clip_denoised: bool = False
) -> torch.Tensor:
    """μ_θ(x_t, t) = x_t/√α_t − β_t/(√α_t √(1−ᾱ_t))·ε_θ(x_t, t)  (Eq. 11).

    With ``clip_denoised``: μ̃_t(x_t, clip(x̂_0, −1, 1)), which equals μ_θ when nothing is clipped.
    """
    if clip_denoised:
        x0_hat = predicted_x0(schedule, x_t, t, eps, event_dims).clamp(-1, 1)
        return posterior_mean(schedule, x_t, x0_hat, t, event_dims)
    return (
        schedule.coef("recip_sqrt_alpha", t, x_t, event_dims) * x_t
        - schedule.coef("eps_coef", t, x_t, event_dims) * eps
    )


def split_output(output) -> tuple[torch.Tensor, torch.Tensor | None]:
    """A denoiser's output as (ε, v): ε alone from an ε-network (v None), the pair from a network that also
    predicts the reverse variances (:class:`pvae.denoisers.VarianceHead`)."""
    if isinstance(output, tuple):
        return output
    return output, None


def learned_log_variance(schedule: DiffusionSchedule, v, t, event_dims: int) -> torch.Tensor:
    """log σ_t² = w log β_t + (1 − w) log β̃_t with w = (v + 1)/2 (Improved DDPM Eq. 15, v = 0 the midpoint
    in log space), β̃_1 replaced by β̃_2 (β̃_1 = 0): the network's v interpolates between the two fixed
    choices, per entry."""
    w = (v + 1) / 2
    return w * schedule.coef("log_beta", t, v, event_dims) + (1 - w) * schedule.coef(
        "log_beta_tilde_clipped", t, v, event_dims
    )


def reverse_step(
    schedule: DiffusionSchedule,
    x_t,
    t,
    output,
    event_dims: int,
    *,
    decoder: str = "gaussian",
    fixed_variance: bool = False,
    detach_mean: bool = False,
) -> dist.Normal | ReverseStep:
    """p_θ(x_{t−1} | x_t) = N(μ_θ, σ_t² I); with ``decoder="discretized"``, DDPM's discretized decoder
    (Eq. 13) where t = 1.

    :param output: the denoiser's output: ε (fixed σ_t², σ_1² = β_1), or (ε, v) (σ_t² learned, at every t).
    :param fixed_variance: use the schedule's fixed σ_t² even when the network predicts v (L_simple).
    :param detach_mean: stop the gradient through μ_θ (the ELBO term of Improved DDPM's hybrid objective,
        which trains the variances only).
    """
    eps, v = split_output(output)
    mean = reverse_mean(schedule, x_t, t, eps.detach() if detach_mean else eps, event_dims)
    if v is None or fixed_variance:
        scale = schedule.coef("sigma", t, x_t, event_dims)
    else:
        scale = torch.exp(0.5 * learned_log_variance(schedule, v, t, event_dims))
    if decoder == "discretized":
        return ReverseStep(mean, scale, (t == 1).view(*t.shape, *(1,) * event_dims))
    return dist.Normal(mean, scale)


def prior_kl(schedule: DiffusionSchedule, x0: torch.Tensor, event_dims: int) -> torch.Tensor:
    """L_T = KL(q(x_T | x_0) ‖ N(0, I)), summed over the event dimensions: shape x0.shape[:-event_dims]."""
    t = schedule.timestep(schedule.timesteps)
    loc = schedule.coef("sqrt_alpha_bar", t, x0, event_dims) * x0
    kl = gaussian_kl(loc, schedule.coef("one_minus_alpha_bar", t, x0, event_dims), 0.0, 1.0)
    return sum_rightmost(kl, event_dims)


# ---- full chains ---------------------------------------------------------------------------------------
def reverse_chain(
    denoiser: Denoiser,
    schedule: DiffusionSchedule,
    event_shape: Sequence[int],
    *,
    prefix: str = "x",
    obs: torch.Tensor | None = None,
    decoder: str = "gaussian",
) -> torch.Tensor:
    """The reverse process as a sub-program: x_T ~ N(0, I), x_{t−1} ~ p_θ(x_{t−1} | x_t) for t = T … 1.

    Runs inside the caller's plates, which set the batch shape (the prior at ``f"{prefix}_{T}"`` is one
    event, broadcast by them). Sites ``f"{prefix}_{T}"`` … ``f"{prefix}_1"`` are latent; ``f"{prefix}_0"``
    is observed at ``obs`` when given, else sampled (a latent z_0, or a prior-predictive draw of x_0).

    :param denoiser: ε_θ(x_t, t) with t a LongTensor broadcastable to x_t's batch dimensions.
    :param schedule: the coefficient table.
    :param event_shape: shape of one value, e.g. (2,) or (1, 28, 28).
    :param prefix: site-name prefix.
    :param obs: observed x_0, shaped (*batch, *event_shape), or None.
    :param decoder: distribution of the last step: ``"gaussian"`` or ``"discretized"`` (8-bit data).
    :returns: x_0 (``obs`` when given).
    """
    event_shape = tuple(event_shape)
    event_dims = len(event_shape)
    reference = obs if obs is not None else schedule.sigma  # dtype and device of the draws
    noise = dist.Normal(reference.new_zeros(()), reference.new_ones(())).expand(event_shape)
    x = pyro.sample(f"{prefix}_{schedule.timesteps}", noise.to_event(event_dims))
    for step in range(schedule.timesteps, 0, -1):
        t = schedule.timestep(step)
        output = denoiser(x, t)
        last = decoder if step == 1 else "gaussian"  # the decoder only ever applies at t = 1
        kernel = reverse_step(schedule, x, t, output, event_dims, decoder=last).to_event(event_dims)
        x = pyro.sample(f"{prefix}_{step - 1}", kernel, obs=obs if step == 1 else None)
    return x


def forward_chain(
    schedule: DiffusionSchedule, x0: torch.Tensor, event_dims: int, *, prefix: str = "x"
) -> torch.Tensor:
    """The forward posterior chain as a sub-program: x_T ~ q(x_T | x_0), then x_{t−1} ~ q(x_{t−1} | x_t, x_0)
    for t = T … 2, at sites ``f"{prefix}_{T}"`` … ``f"{prefix}_1"`` inside the caller's plates.

    It has no parameters and registers none. x_0 is the caller's (data, or a latent it drew).

    :param x0: (*batch, *event) with ``event_dims`` event dimensions.
    :returns: x_T, the end the reverse chain starts from.
    """
    first = schedule.timestep(schedule.timesteps)
    x_T = pyro.sample(
        f"{prefix}_{schedule.timesteps}",
        forward_marginal(schedule, x0, first, event_dims).to_event(event_dims),
    )
    x = x_T
    for step in range(schedule.timesteps, 1, -1):
        kernel = forward_posterior(schedule, x, x0, schedule.timestep(step), event_dims)
        x = pyro.sample(f"{prefix}_{step - 1}", kernel.to_event(event_dims))
    return x_T


# ---- the time-subsampled pair --------------------------------------------------------------------------
class TimeDraw(NamedTuple):
    """Timesteps for the time-subsampled pair and the scale of its x_prev term."""

    t: torch.Tensor  # LongTensor in 1 … T, broadcastable to the batch shape of the pair's sites
    scale: float | torch.Tensor  # beyond the scale of enclosing plates: T per datum, 1 under the time plate


@contextlib.contextmanager
def plate_timesteps(
    timesteps: int,
    *,
    device: torch.device,
    subsample: torch.Tensor | None = None,
    scale: float | torch.Tensor = 1.0,
    dim: int = -2,
) -> Iterator[TimeDraw]:
    """``pyro.plate("time", T)`` subsampled to one timestep (uniform: Pyro scales its sites by T), or to
    the given 0-based ``subsample`` indices; yields their timesteps shaped (k, 1, …) for the plate at
    ``dim`` (inside a data plate at −1). ``scale`` is passed through (e.g. 1/(T·p_t) for drawn indices)."""
    if subsample is None:
        plate = pyro.plate("time", timesteps, subsample_size=1, dim=dim, device=device)
    else:
        plate = pyro.plate("time", timesteps, subsample=subsample, dim=dim)
    with plate as index:
        yield TimeDraw((index + 1).view(-1, *(1,) * (-dim - 1)), scale)


def per_datum_timesteps(timesteps: int, *, like: torch.Tensor, name: str = "t") -> TimeDraw:
    """One timestep per datum inside the caller's data plate: u ~ Uniform(0, T) at the masked site ``name``
    (it scores nothing), t = ⌊u⌋ + 1 uniform on {1, …, T}; the x_prev term is scaled by T."""
    uniform = dist.Uniform(like.new_zeros(()), like.new_tensor(float(timesteps)))
    u = pyro.sample(name, uniform.mask(False))
    return TimeDraw(u.detach().floor().long().clamp(0, timesteps - 1) + 1, float(timesteps))


def stratified_timesteps(timesteps: int, *, like: torch.Tensor, name: str = "t") -> TimeDraw:
    """One timestep per datum, stratified over the batch: the N data get the strata [kT/N, (k+1)T/N) in a
    random order, u uniform within its stratum at the masked site ``name``, t = ⌊u⌋ + 1. Each datum's t is
    uniform on {1, …, T} (scale T, unbiased as :func:`per_datum_timesteps`), and a batch covers the
    timesteps evenly, which lowers the variance of the batch's sum."""
    count = like.shape[0]
    order = torch.randperm(count, device=like.device).to(like.dtype)
    width = float(timesteps) / count
    low = order * width
    u = pyro.sample(name, dist.Uniform(low, low + width).mask(False))
    return TimeDraw(u.detach().floor().long().clamp(0, timesteps - 1) + 1, float(timesteps))


def importance_timesteps(probs: torch.Tensor, *, like: torch.Tensor, name: str = "t") -> TimeDraw:
    """One timestep per datum drawn with probabilities ``probs`` (T,) (by the inverse CDF of u ~ U(0, 1) at
    the masked site ``name``), its x_prev term scaled by 1/p_t, so that E_t[L_t/p_t] = Σ_t L_t whatever p
    (all p_t > 0): Improved DDPM's importance sampling of the time plate (Nichol & Dhariwal 2021, §3.3)."""
    # t by the inverse CDF of a uniform draw: the site stays reparameterizable, as TraceMeanField_ELBO needs
    probs = probs.to(like.dtype)
    uniform = dist.Uniform(like.new_zeros(()), like.new_ones(())).expand(like.shape[:1])
    u = pyro.sample(name, uniform.mask(False)).detach()
    index = torch.searchsorted(torch.cumsum(probs, 0), u, right=True).clamp(max=probs.shape[0] - 1)
    return TimeDraw(index + 1, 1.0 / probs[index])


def reverse_pair(
    denoiser: Denoiser,
    schedule: DiffusionSchedule,
    x0: torch.Tensor,
    t: torch.Tensor,
    event_dims: int,
    *,
    scale: float | torch.Tensor = 1.0,
    decoder: str = "gaussian",
    prefix: str = "x",
    fixed_variance: bool = False,
    vlb: tuple[float | torch.Tensor, str] | None = None,
    on_term: Callable[[torch.Tensor, torch.Tensor], None] | None = None,
) -> torch.Tensor:
    """Model half of the time-subsampled pair: ``f"{prefix}_t"`` (masked) and ``f"{prefix}_prev"`` ~
    p_θ(x_{t−1} | x_t), the decoder at t = 1, its log density scaled by ``scale``. Returns x_prev.

    :param fixed_variance: the x_prev step with the schedule's fixed σ_t² (see :func:`reverse_step`).
    :param vlb: ``(scale, decoder)`` of a second term, Improved DDPM's hybrid objective: site
        ``f"{prefix}_prev_vlb"`` under the step with the learned variances and the mean's gradient stopped.
    :param on_term: receives the timesteps and each datum's unscaled term of −ELBO in closed form given
        x_t (L_{t−1}, as :func:`elbo_terms` computes it, under the variances the ELBO uses; detached), e.g.
        for the history of an importance sampler.
    """
    marginal = forward_marginal(schedule, x0, t, event_dims).to_event(event_dims)
    x_t = pyro.sample(f"{prefix}_t", marginal.mask(False))
    output = denoiser(x_t, t)
    kernel = reverse_step(
        schedule, x_t, t, output, event_dims, decoder=decoder, fixed_variance=fixed_variance
    )
    vlb_kernel = None
    if vlb is not None:
        vlb_kernel = reverse_step(schedule, x_t, t, output, event_dims, decoder=vlb[1], detach_mean=True)
    if on_term is not None:
        with torch.no_grad():
            posterior = forward_posterior(schedule, x_t, x0, t, event_dims)
            scored = kernel if vlb_kernel is None else vlb_kernel
            # published, not called: a recorded training step hands the replayed values to on_term
            publish(on_term, t, sum_rightmost(kl_divergence(posterior, scored), event_dims))
    with poutine.scale(scale=scale):
        x_prev = pyro.sample(f"{prefix}_prev", kernel.to_event(event_dims))
    if vlb_kernel is not None:
        with poutine.scale(scale=vlb[0]):
            pyro.sample(f"{prefix}_prev_vlb", vlb_kernel.to_event(event_dims))
    return x_prev


def forward_pair(
    schedule: DiffusionSchedule,
    x0: torch.Tensor,
    t: torch.Tensor,
    event_dims: int,
    *,
    scale: float | torch.Tensor = 1.0,
    prefix: str = "x",
    vlb_scale: float | torch.Tensor | None = None,
) -> torch.Tensor:
    """Guide half of the time-subsampled pair: ``f"{prefix}_t"`` ~ q(x_t | x_0) (masked), then
    ``f"{prefix}_prev"`` ~ q(x_{t−1} | x_t, x_0) (x_0 itself at t = 1), scaled by ``scale`` — and, for the
    hybrid objective (``vlb_scale``), ``f"{prefix}_prev_vlb"`` from the same q, scaled by ``vlb_scale``.
    Returns x_prev."""
    marginal = forward_marginal(schedule, x0, t, event_dims).to_event(event_dims)
    x_t = pyro.sample(f"{prefix}_t", marginal.mask(False))
    kernel = forward_posterior(schedule, x_t, x0, t, event_dims)
    with poutine.scale(scale=scale):
        x_prev = pyro.sample(f"{prefix}_prev", kernel.to_event(event_dims))
    if vlb_scale is not None:
        with poutine.scale(scale=vlb_scale):
            pyro.sample(f"{prefix}_prev_vlb", kernel.to_event(event_dims))
    return x_prev


# ---- the ELBO's terms in closed form -------------------------------------------------------------------
def elbo_terms(
    denoiser: Denoiser,
    schedule: DiffusionSchedule,
    x0: torch.Tensor,
    event_dims: int,
    *,
    times: torch.Tensor | None = None,
    decoder: str = "gaussian",
    generator: torch.Generator | None = None,
    progress: bool = False,
) -> torch.Tensor:
    """Terms of −ELBO at the timesteps ``times``, one draw x_t ~ q(x_t | x_0) each: shape (len(times), N).

    Row t is KL(q(x_{t−1} | x_t, x_0) ‖ p_θ(x_{t−1} | x_t)) summed over the event, i.e. L_{t−1} for t ≥ 2
    and −log p_θ(x_0 | x_1) = L_0 at t = 1 (the KL from a point mass); unbiased for their expectations.
    Evaluated in chunks of about 2^18 network inputs, batched over data and timesteps.

    :param x0: (N, *event) data.
    :param times: LongTensor (c,) of timesteps in 1 … T on x0's device (default all, t = 1 first).
    :param generator: torch generator for the draws of x_t.
    :param progress: progress bar over the chunks.
    """
    if times is None:
        times = schedule.times[1:]
    budget = max(1, 2**18 // x0[0].numel())  # network inputs per call
    data_chunk = min(x0.shape[0], budget)
    time_chunk = max(1, budget // data_chunk)
    work = [
        (start, first)
        for start in range(0, x0.shape[0], data_chunk)
        for first in range(0, len(times), time_chunk)
    ]
    rows: dict[int, list[torch.Tensor]] = {}
    for start, first in progress_bar(work, progress=progress, desc="ELBO terms"):
        chunk = times[first : first + time_chunk]
        batch = x0[start : start + data_chunk]
        rows.setdefault(start, []).append(
            _terms(denoiser, schedule, batch, chunk, event_dims, decoder=decoder, generator=generator)
        )
    return torch.cat([torch.cat(rows[start], 0) for start in sorted(rows)], 1)


def _terms(denoiser, schedule, x0, times, event_dims, *, decoder, generator) -> torch.Tensor:
    t = times.view(-1, 1)  # (c, 1): one timestep per row of the (c, N) batch
    noise = torch.randn((times.shape[0], *x0.shape), generator=generator, dtype=x0.dtype, device=x0.device)
    marginal = forward_marginal(schedule, x0, t, event_dims)
    x_t = marginal.loc + marginal.scale * noise  # (c, N, *event)
    output = denoiser(x_t, t)
    posterior = forward_posterior(schedule, x_t, x0, t, event_dims)
    model = reverse_step(schedule, x_t, t, output, event_dims, decoder=decoder)
    return sum_rightmost(kl_divergence(posterior, model), event_dims)
