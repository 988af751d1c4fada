"""Samplers of the reverse chain: ancestral (DDPM Algorithm 2) and DDIM (Song et al. 2021, Eq. 12).

Both draw x_T ~ N(0, I) from ``generator`` and then step down the chain with the formulas of
:mod:`pvae.models.diffusion.chain`; ``record`` names the step counts after which the state is kept
(0: x_T), for the x_T → x_0 strips.
"""

from __future__ import annotations

import math
from collections.abc import Collection, Sequence
from typing import NamedTuple

import torch

from pvae.checks import check_int
from pvae.models.diffusion.chain import (
    Denoiser,
    learned_log_variance,
    predicted_x0,
    reverse_mean,
    split_output,
)
from pvae.models.diffusion.schedules import DiffusionSchedule
from pvae.utils import progress_bar

__all__ = ["SampleChain", "ancestral_sample", "ddim_sample", "ddim_times", "recorded_steps", "sample_chain"]


class SampleChain(NamedTuple):
    """Samples with intermediate states of the reverse chain (for the x_T → x_0 strip)."""

    samples: torch.Tensor  # (n, *data_shape)
    states: torch.Tensor  # (K, n, *data_shape): x_t at the times below, x_T first, the samples last
    times: list[int]  # the K timesteps, T first, 0 last


def ddim_times(timesteps: int, steps: int) -> list[int]:
    """``steps`` evenly spaced timesteps in T … 1 (fewer if rounding merges some), largest first."""
    grid = torch.linspace(1, timesteps, steps, dtype=torch.float64, device="cpu").tolist()
    return sorted({round(value) for value in grid}, reverse=True)


def recorded_steps(num_steps: int, chain_length: int) -> list[int]:
    """Step counts after which to keep the state: 0 (x_T), evenly spaced ones, and ``num_steps`` (x_0)."""
    grid = torch.linspace(0, num_steps, chain_length, dtype=torch.float64, device="cpu").tolist()
    return sorted({round(value) for value in grid})


def _start(schedule: DiffusionSchedule, num_samples: int, event_shape, generator) -> torch.Tensor:
    reference = schedule.sigma
    return torch.randn(
        (num_samples, *event_shape), generator=generator, device=reference.device, dtype=reference.dtype
    )  # x_T: (num_samples, *event_shape)


def ancestral_sample(
    denoiser: Denoiser,
    schedule: DiffusionSchedule,
    num_samples: int,
    event_shape: Sequence[int],
    *,
    clip_denoised: bool = False,
    generator: torch.Generator | None = None,
    record: Collection[int] = (),
    progress: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """DDPM Algorithm 2: x_{t−1} = μ_θ(x_t, t) + σ_t z for t = T … 2, then x_0 = μ_θ(x_1, 1) (the decoder's
    mean). With ``clip_denoised`` the mean is μ̃_t(x_t, clip(x̂_0, −1, 1)) (:func:`reverse_mean`).

    :returns: (x_0 of shape (num_samples, *event_shape), the states of the steps in ``record`` (0: x_T)
        stacked on a new first axis; empty along it when ``record`` is empty).
    """
    event_dims = len(event_shape)
    x = _start(schedule, num_samples, event_shape, generator)
    states = [x] if 0 in record else []
    steps = range(schedule.timesteps, 0, -1)
    for count, step in enumerate(progress_bar(steps, progress=progress, desc="sampling"), start=1):
        t = schedule.timestep(step)
        eps, v = split_output(denoiser(x, t))
        mean = reverse_mean(schedule, x, t, eps, event_dims, clip_denoised=clip_denoised)
        if step > 1:
            noise = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
            if v is None:
                scale = schedule.coef("sigma", t, x, event_dims)
            else:  # the network's own σ_t (Improved DDPM)
                scale = torch.exp(0.5 * learned_log_variance(schedule, v, t, event_dims))
            mean = mean + scale * noise
        x = mean
        if count in record:
            states.append(x)
    return x, _stacked(states, x)


def _stacked(states: list[torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """The recorded states on a new first axis: (len(states), *x.shape), (0, *x.shape) when none were."""
    return torch.stack(states, 0) if states else x.new_empty((0, *x.shape))


def ddim_sample(
    denoiser: Denoiser,
    schedule: DiffusionSchedule,
    num_samples: int,
    event_shape: Sequence[int],
    *,
    times: Sequence[int],
    eta: float = 0.0,
    clip_denoised: bool = False,
    generator: torch.Generator | None = None,
    record: Collection[int] = (),
    progress: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """DDIM (Song et al. 2021, Eq. 12) on the decreasing timesteps ``times``, each step to the next one (0
    after the last): x_{t'} = √ᾱ_{t'} x̂_0 + √(1 − ᾱ_{t'} − σ²) ε̂ + σ z with
    σ = η √((1 − ᾱ_{t'})/(1 − ᾱ_t)) √(1 − ᾱ_t/ᾱ_{t'}); η = 0 is deterministic given x_T, and η = 1 on all
    T steps is ancestral sampling with σ_t² = β̃_t. ``clip_denoised`` clips x̂_0 to [−1, 1] (ε̂ follows).

    :returns: (x_0 of shape (num_samples, *event_shape), the states of the steps in ``record`` (0: x_T)
        stacked on a new first axis; empty along it when ``record`` is empty).
    """
    event_dims = len(event_shape)
    x = _start(schedule, num_samples, event_shape, generator)
    states = [x] if 0 in record else []

    def coef(name, t):
        return schedule.coef(name, t, x, event_dims)

    for count, step in enumerate(progress_bar(times, progress=progress, desc="DDIM"), start=1):
        step_prev = times[count] if count < len(times) else 0
        t, t_prev = schedule.timestep(step), schedule.timestep(step_prev)
        eps = split_output(denoiser(x, t))[0]
        x0_hat = predicted_x0(schedule, x, t, eps, event_dims)
        if clip_denoised:
            x0_hat = x0_hat.clamp(-1, 1)
            eps = (x - coef("sqrt_alpha_bar", t) * x0_hat) / coef("sqrt_one_minus_alpha_bar", t)
        # 1 − ᾱ_t/ᾱ_{t'} = −expm1(log ᾱ_t − log ᾱ_{t'}): no cancellation between nearby timesteps
        fraction = -torch.expm1(coef("log_alpha_bar", t) - coef("log_alpha_bar", t_prev))
        variance = (
            eta**2
            * coef("one_minus_alpha_bar", t_prev)
            / coef("one_minus_alpha_bar", t)
            * fraction.clamp(min=0)
        )
        direction = (coef("one_minus_alpha_bar", t_prev) - variance).clamp(min=0).sqrt()
        x = coef("sqrt_alpha_bar", t_prev) * x0_hat + direction * eps
        if eta > 0 and step_prev > 0:  # σ = 0 at the last step (ᾱ_0 = 1)
            noise = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
            x = x + variance.sqrt() * noise
        if count in record:
            states.append(x)
    return x, _stacked(states, x)


def sample_chain(
    denoiser: Denoiser,
    schedule: DiffusionSchedule,
    num_samples: int,
    event_shape: Sequence[int],
    *,
    steps: int | None = None,
    eta: float | None = None,
    return_chain: bool = False,
    chain_length: int = 10,
    batch_size: int | None = None,
    clip_denoised: bool = False,
    generator: torch.Generator | None = None,
    progress: bool = True,
) -> torch.Tensor | SampleChain:
    """Samples x_0 of the reverse chain, (num_samples, *event_shape), in batches: ancestral by default,
    DDIM on ``steps`` evenly spaced timesteps with noise scale ``eta`` when either is given (see
    :meth:`pvae.models.diffusion.DDPM.sample` for the arguments). With ``return_chain``, a
    :class:`SampleChain` with ``chain_length`` recorded states."""
    check_int("num_samples", num_samples)
    batch_size = check_int("batch_size", num_samples if batch_size is None else batch_size)
    check_int("chain_length", chain_length, 2)
    ddim = steps is not None or eta is not None
    if ddim:
        steps = schedule.timesteps if steps is None else steps
        check_int("steps", steps, 1, schedule.timesteps)
        eta = 0.0 if eta is None else eta
        if not (isinstance(eta, int | float) and math.isfinite(eta) and eta >= 0):
            raise ValueError(f"eta must be a finite number ≥ 0, got {eta!r}")
        times = ddim_times(schedule.timesteps, steps)
    else:
        times = list(range(schedule.timesteps, 0, -1))
    record = recorded_steps(len(times), chain_length)  # x_T, evenly spaced states, the result
    options = {"clip_denoised": clip_denoised, "generator": generator, "record": record, "progress": progress}
    outputs, chains = [], []
    for start in range(0, num_samples, batch_size):
        count = min(batch_size, num_samples - start)
        if ddim:
            samples, states = ddim_sample(
                denoiser, schedule, count, event_shape, times=times, eta=float(eta), **options
            )
        else:
            samples, states = ancestral_sample(denoiser, schedule, count, event_shape, **options)
        outputs.append(samples)
        chains.append(states)
    samples = torch.cat(outputs, 0)
    if not return_chain:
        return samples
    state_times = [times[k] if k < len(times) else 0 for k in record]  # x_T first
    return SampleChain(samples, torch.cat(chains, 1), state_times)
