r"""DDPM (Ho et al. 2020) written as a hierarchical latent-variable model: a Pyro model/guide pair.

The **model** is the learned reverse chain and the **guide** the fixed forward (noising) process, so the
training objective is Pyro's own ELBO rather than a hand-derived loss:

.. math::
    p_\theta(x_{0:T}) = \mathcal N(x_T; 0, I) \prod_{t=1}^{T} p_\theta(x_{t-1} \mid x_t), \qquad
    q(x_{1:T} \mid x_0) = q(x_T \mid x_0) \prod_{t=2}^{T} q(x_{t-1} \mid x_t, x_0).

With α_t = 1 − β_t and ᾱ_t = ∏_{s≤t} α_s (ᾱ_0 = 1):

- q(x_t | x_0) = N(√ᾱ_t x_0, (1 − ᾱ_t) I)  (DDPM Eq. 4);
- q(x_{t−1} | x_t, x_0) = N(μ̃_t, β̃_t I), μ̃_t = √ᾱ_{t−1}β_t/(1−ᾱ_t)·x_0 + √α_t(1−ᾱ_{t−1})/(1−ᾱ_t)·x_t,
  β̃_t = (1−ᾱ_{t−1})/(1−ᾱ_t)·β_t  (Eq. 6–7). At t = 1 this is the point mass at x_0 (β̃_1 = 0);
- p_θ(x_{t−1} | x_t) = N(μ_θ(x_t, t), σ_t² I), μ_θ = (x_t − β_t/√(1−ᾱ_t)·ε_θ(x_t, t))/√α_t  (Eq. 11), with
  σ_t² = β_t or β̃_t for t ≥ 2 (``reverse_variance``) and σ_1² = β_1 for the decoder p_θ(x_0 | x_1);
- −ELBO = L_T + Σ_{t≥2} L_{t−1} + L_0  (Eq. 5), L_T = KL(q(x_T | x_0) ‖ N(0, I)) (≈ 0, no parameters),
  L_{t−1} = E_q KL(q(x_{t−1} | x_t, x_0) ‖ p_θ(x_{t−1} | x_t)), L_0 = −E_q log p_θ(x_0 | x_1).

Sites (all inside ``pyro.plate("data", N)``, each with ``.to_event(len(data_shape))``):

- full chain, :meth:`DDPM.model` / :meth:`DDPM.guide`: latent ``"x_T"`` … ``"x_1"`` (e.g. ``"x_1000"``),
  observed ``"x_0"``. Fine for Trace_ELBO and TraceMeanField_ELBO (per-step closed-form KLs); it costs T
  network passes per step, so it is practical for small T only;
- time-subsampled pair, :meth:`DDPM.model_subsampled` / :meth:`DDPM.guide_subsampled`: one timestep t per
  step, drawn by ``pyro.plate("time", T, subsample_size=1)`` (Pyro scales by T). The guide draws
  ``"x_t"`` ~ q(x_t | x_0) — masked in model and guide (it feeds μ_θ, it scores nothing) — then
  ``"x_prev"`` ~ q(x_{t−1} | x_t, x_0), which at t = 1 is the point mass at x_0; the model scores
  ``"x_prev"`` under p_θ(x_{t−1} | x_t), i.e. under the decoder at t = 1, so model and guide have the same
  sites at every t. The constant L_T enters through ``pyro.factor("prior_kl", −L_T)``. Under Trace_ELBO
  its expectation is the full chain's ELBO. This is the pair that trains on images.
  With ``time_sampling="per_datum"`` each datum gets its own timestep instead (as in DDPM's Algorithm 1):
  the guide draws u ~ Uniform(0, T) at a masked site ``"t"`` in the data plate, t = ⌊u⌋ + 1, and the
  x_prev term is scaled by T per datum (:class:`ForwardStep`/:class:`ReverseStep` hold the per-datum mix
  of Gaussian steps and, where t = 1, the point mass and the decoder). Same expectation; one batch then
  covers many timesteps, which trains faster per step.

Objectives (:meth:`DDPM.svi_program`): ``"elbo"`` — the subsampled pair with Trace_ELBO; ``"meanfield"``
— the same pair with TraceMeanField_ELBO (the per-step KL in closed form given x_t: the same ELBO, less
variance); ``"simple"`` — DDPM's L_simple (Eq. 14), E_{t,ε}‖ε − ε_θ(x_t, t)‖², which is **not an ELBO** but a
reweighting of it: L_{t−1} = w_t·E‖ε − ε_θ‖² + c_t with w_t = β_t²/(2σ_t²α_t(1−ᾱ_t)), so the same program
with the x_prev term scaled by 1/(T·w_t) and the constant c_t removed is L_simple (at t = 1 the decoder is
replaced by its Gaussian density, as DDPM does).

Data are in model space: continuous vectors as they are, 8-bit images as pixel/127.5 − 1 ∈ [−1, 1]
(``pvae.data.to_model_space``) with the discretized Gaussian decoder (Eq. 13).
"""

from __future__ import annotations

import copy
import functools
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple

import pyro
import pyro.distributions as dist
import torch
from pyro import poutine
from pyro.distributions import constraints
from pyro.distributions.torch_distribution import TorchDistribution
from pyro.infer import Trace_ELBO, TraceMeanField_ELBO
from torch import nn
from torch.distributions import register_kl

from pvae.data import check_model_space
from pvae.denoisers import default_denoiser
from pvae.family import Family, register_family
from pvae.utils import check_finite, progress_bar

__all__ = [
    "DDPM",
    "OBJECTIVES",
    "SCHEDULES",
    "TIME_SAMPLING",
    "DDPMConfig",
    "DiscretizedGaussian",
    "ForwardStep",
    "ReverseStep",
    "SampleChain",
    "make_betas",
]

SCHEDULES = ("linear", "cosine")
REVERSE_VARIANCES = ("beta", "beta_tilde")
DECODERS = ("gaussian", "discretized")
OBJECTIVES = ("elbo", "meanfield", "simple")
TIME_SAMPLING = ("plate", "per_datum")
WEIGHTINGS = ("elbo", "simple")
MAX_BETA = 0.999
COSINE_OFFSET = 0.008
PIXEL_HALF_WIDTH = 1.0 / 255.0  # half the spacing of the 256-level grid on [−1, 1]


# ---- noise schedules -----------------------------------------------------------------------------------
def make_betas(schedule: str, timesteps: int) -> torch.Tensor:
    """β_1 … β_T in float64 on the CPU (the master table every device's copy is made from), shape (T,).

    - ``"linear"``: evenly spaced from 1e-4 to 0.02 at T = 1000 (DDPM §4); for other T both endpoints are
      scaled by 1000/T (Nichol & Dhariwal 2021, App. D) so that ᾱ_T ≈ 0 at any T;
    - ``"cosine"``: ᾱ_t = f(t)/f(0), f(t) = cos²((t/T + s)/(1 + s)·π/2), s = 0.008, β_t = 1 − ᾱ_t/ᾱ_{t−1}
      (Nichol & Dhariwal 2021, Eq. 17).

    Both are clipped at β ≤ 0.999 (the scaled linear endpoints exceed 1 for T < 50).
    """
    _check_timesteps(timesteps)
    if schedule == "linear":
        scale = 1000.0 / timesteps
        betas = torch.linspace(1e-4 * scale, 0.02 * scale, timesteps, dtype=torch.float64, device="cpu")
    elif schedule == "cosine":
        steps = torch.arange(timesteps + 1, dtype=torch.float64, device="cpu") / timesteps
        f = torch.cos((steps + COSINE_OFFSET) / (1 + COSINE_OFFSET) * math.pi / 2) ** 2
        alphas_bar = f / f[0]
        betas = 1 - alphas_bar[1:] / alphas_bar[:-1]
    else:
        raise ValueError(f"schedule must be one of {SCHEDULES}, got {schedule!r}")
    return betas.clamp(max=MAX_BETA)


MAX_TIMESTEPS = 100_000  # ten times the longest chains in the literature; keeps per-t tables small


def _check_timesteps(timesteps) -> int:
    if isinstance(timesteps, bool) or not isinstance(timesteps, int) or not 1 <= timesteps <= MAX_TIMESTEPS:
        raise ValueError(f"timesteps must be an integer in [1, {MAX_TIMESTEPS}], got {timesteps!r}")
    return timesteps


def _schedule_tables(betas: torch.Tensor, reverse_variance: str) -> dict[str, torch.Tensor]:
    """Every per-t coefficient, float64, shape (T + 1,), indexed by t (entry 0 stands for t = 0)."""
    T = betas.shape[0]
    beta = torch.cat([betas.new_zeros(1), betas])  # (T+1,)
    alpha = 1 - beta
    log_alpha_bar = torch.cumsum(torch.log1p(-beta), 0)
    alpha_bar = torch.exp(log_alpha_bar)  # ᾱ_0 = 1
    one_minus_alpha_bar = -torch.expm1(log_alpha_bar)  # 1 − ᾱ_t, accurate for small t
    alpha_bar_prev = torch.cat([alpha_bar.new_ones(1), alpha_bar[:-1]])
    one_minus_alpha_bar_prev = torch.cat([alpha_bar.new_zeros(1), one_minus_alpha_bar[:-1]])
    safe = one_minus_alpha_bar.clone()
    safe[0] = 1.0  # t = 0 entries are never used; avoid 0/0
    beta_tilde = one_minus_alpha_bar_prev / safe * beta  # (Eq. 7); β̃_1 = 0
    if reverse_variance == "beta":
        sigma2 = beta.clone()
    else:
        sigma2 = beta_tilde.clone()
        sigma2[1] = beta[1]  # the decoder at t = 1 uses β_1 whichever variance is chosen
    sigma2[0] = 1.0
    eps_coef = beta / (torch.sqrt(alpha) * torch.sqrt(safe))
    posterior_coef_x0 = torch.sqrt(alpha_bar_prev) * beta / safe  # (Eq. 7)
    posterior_coef_xt = torch.sqrt(alpha) * one_minus_alpha_bar_prev / safe
    posterior_coef_x0[1], posterior_coef_xt[1] = 1.0, 0.0  # exactly: q(x_0 | x_1, x_0) is the point mass
    tables = {
        "beta": beta,
        "alpha": alpha,
        "alpha_bar": alpha_bar,
        "sqrt_alpha_bar": torch.sqrt(alpha_bar),
        "sqrt_one_minus_alpha_bar": torch.sqrt(one_minus_alpha_bar),
        "beta_tilde": beta_tilde,
        "posterior_coef_x0": posterior_coef_x0,
        "posterior_coef_xt": posterior_coef_xt,
        "sigma2": sigma2,
        "recip_sqrt_alpha": 1 / torch.sqrt(alpha),  # μ_θ = x_t/√α_t − eps_coef·ε_θ (Eq. 11)
        "eps_coef": eps_coef,
        # L_{t−1} = w_t ‖ε − ε_θ‖² + c_t: w_t = β_t²/(2σ_t² α_t (1 − ᾱ_t)) = eps_coef²/(2σ_t²)
        "simple_weight": eps_coef**2 / (2 * sigma2),
    }
    for name, table in tables.items():
        if table.shape != (T + 1,):
            raise AssertionError(name)
    return tables


# ---- the discretized decoder ---------------------------------------------------------------------------
class _PixelGrid(constraints.Constraint):
    """Values k/127.5 − 1, k ∈ {0, …, 255}: the 256-level grid on [−1, 1]."""

    is_discrete = True
    event_dim = 0

    def check(self, value):
        levels = (value + 1) * 127.5
        return (value >= -1 - 1e-4) & (value <= 1 + 1e-4) & ((levels - levels.round()).abs() < 1e-2)


pixel_grid = _PixelGrid()


def _log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 − eˣ) for x < 0, accurate near 0 and far below it (Mächler 2012); NaN-free gradients."""
    x = x.clamp(max=-torch.finfo(x.dtype).tiny)
    near = torch.log(-torch.expm1(x.clamp(min=-math.log(2))))
    far = torch.log1p(-torch.exp(x.clamp(max=-math.log(2))))
    return torch.where(x > -math.log(2), near, far)


class DiscretizedGaussian(TorchDistribution):
    r"""DDPM's discretized Gaussian decoder (Eq. 13) for 8-bit data in model space.

    P(x) = ∫_{δ₋(x)}^{δ₊(x)} N(u; loc, scale²) du with bin edges δ± = x ± 1/255, except δ₋ = −∞ at x = −1
    and δ₊ = +∞ at x = 1, so the masses of the 256 levels sum to 1. log P is evaluated in log space
    (``log_ndtr``): an inner bin [a, b] (standardized) right of ``loc`` is reflected to [−b, −a], then
    log(Φ(b) − Φ(a)) = log Φ(b) + log(1 − exp(log Φ(a) − log Φ(b))), stable in both tails; the edge bins
    are log Φ(b) and log Φ(−a).

    :param loc: mean in model space.
    :param scale: standard deviation, > 0.
    """

    arg_constraints = {"loc": constraints.real, "scale": constraints.positive}
    support = pixel_grid
    has_rsample = False

    def __init__(self, loc: torch.Tensor, scale: torch.Tensor, validate_args=None):
        self.loc, self.scale = torch.broadcast_tensors(torch.as_tensor(loc), torch.as_tensor(scale))
        super().__init__(self.loc.shape, validate_args=validate_args)

    def expand(self, batch_shape, _instance=None):
        new = self._get_checked_instance(DiscretizedGaussian, _instance)
        batch_shape = torch.Size(batch_shape)
        new.loc = self.loc.expand(batch_shape)
        new.scale = self.scale.expand(batch_shape)
        super(DiscretizedGaussian, new).__init__(batch_shape, validate_args=self._validate_args)
        return new

    @property
    def mean(self):
        return self.loc

    def log_prob(self, value: torch.Tensor) -> torch.Tensor:
        if self._validate_args:
            self._validate_sample(value)
        lower = (value - PIXEL_HALF_WIDTH - self.loc) / self.scale  # a
        upper = (value + PIXEL_HALF_WIDTH - self.loc) / self.scale  # b
        # inner bins: log(Φ(b) − Φ(a)), reflected to Φ(−a) − Φ(−b) when the bin lies right of the mean
        right = (lower + upper) > 0
        a = torch.where(right, -upper, lower)
        b = torch.where(right, -lower, upper)
        log_b = torch.special.log_ndtr(b)
        inner = log_b + _log1mexp(torch.special.log_ndtr(a) - log_b)
        # open edge bins: Φ(b) at x = −1 and 1 − Φ(a) = Φ(−a) at x = 1
        left_edge = value <= -1 + PIXEL_HALF_WIDTH
        right_edge = value >= 1 - PIXEL_HALF_WIDTH
        left_mass = torch.special.log_ndtr(upper)
        right_mass = torch.special.log_ndtr(-lower)
        return torch.where(left_edge, left_mass, torch.where(right_edge, right_mass, inner))

    def sample(self, sample_shape=()):
        shape = self._extended_shape(torch.Size(sample_shape))
        with torch.no_grad():
            draw = self.loc.expand(shape) + self.scale.expand(shape) * torch.randn(
                shape, dtype=self.loc.dtype, device=self.loc.device
            )
            return ((draw.clamp(-1, 1) + 1) * 127.5).round() / 127.5 - 1


# ---- one reverse/forward step per datum (timesteps differ across the batch) ---------------------------
class ForwardStep(TorchDistribution):
    """q(x_{t−1} | x_t, x_0) with a per-datum t: N(loc, scale²) where scale > 0, the point mass at ``loc``
    where scale = 0 (t = 1, β̃_1 = 0). Its log density is 0 on the point-mass entries (like ``Delta``)."""

    arg_constraints = {"loc": constraints.real, "scale": constraints.greater_than_eq(0.0)}
    support = constraints.real
    has_rsample = True

    def __init__(self, loc: torch.Tensor, scale: torch.Tensor, validate_args=None):
        self.loc, self.scale = torch.broadcast_tensors(loc, scale)
        super().__init__(self.loc.shape, validate_args=validate_args)

    def expand(self, batch_shape, _instance=None):
        new = self._get_checked_instance(ForwardStep, _instance)
        batch_shape = torch.Size(batch_shape)
        new.loc, new.scale = self.loc.expand(batch_shape), self.scale.expand(batch_shape)
        super(ForwardStep, new).__init__(batch_shape, validate_args=self._validate_args)
        return new

    @property
    def point(self) -> torch.Tensor:
        return self.scale == 0

    def _gaussian(self) -> dist.Normal:
        return dist.Normal(self.loc, torch.where(self.point, torch.ones_like(self.scale), self.scale))

    def rsample(self, sample_shape=()):
        shape = self._extended_shape(torch.Size(sample_shape))
        noise = torch.randn(shape, dtype=self.loc.dtype, device=self.loc.device)
        return self.loc + self.scale * noise

    def log_prob(self, value):
        return torch.where(self.point, torch.zeros_like(self.loc), self._gaussian().log_prob(value))


class ReverseStep(TorchDistribution):
    """p_θ(x_{t−1} | x_t) with a per-datum t: N(loc, scale²), except the discretized decoder (Eq. 13) on the
    entries where ``decoder`` is true (t = 1)."""

    arg_constraints = {"loc": constraints.real, "scale": constraints.positive}
    support = constraints.real
    has_rsample = False

    def __init__(self, loc: torch.Tensor, scale: torch.Tensor, decoder: torch.Tensor, validate_args=None):
        self.loc, self.scale, self.decoder = torch.broadcast_tensors(loc, scale, decoder)
        super().__init__(self.loc.shape, validate_args=validate_args)

    def expand(self, batch_shape, _instance=None):
        new = self._get_checked_instance(ReverseStep, _instance)
        batch_shape = torch.Size(batch_shape)
        new.loc, new.scale = self.loc.expand(batch_shape), self.scale.expand(batch_shape)
        new.decoder = self.decoder.expand(batch_shape)
        super(ReverseStep, new).__init__(batch_shape, validate_args=self._validate_args)
        return new

    def sample(self, sample_shape=()):
        with torch.no_grad():
            gaussian = dist.Normal(self.loc, self.scale).sample(sample_shape)
            pixels = DiscretizedGaussian(self.loc, self.scale).sample(sample_shape)
            return torch.where(self.decoder, pixels, gaussian)

    def log_prob(self, value):
        gaussian = dist.Normal(self.loc, self.scale).log_prob(value)
        if not bool(self.decoder.any()):
            return gaussian
        if self._validate_args and not bool(pixel_grid.check(value[self.decoder.expand(value.shape)]).all()):
            raise ValueError("the decoder entries of the value must lie on the 256-level grid of [−1, 1]")
        # the continuous entries are discarded below; snapped to the grid they pass the decoder's own checks
        on_grid = torch.where(self.decoder, value, ((value.clamp(-1, 1) + 1) * 127.5).round() / 127.5 - 1)
        discretized = DiscretizedGaussian(self.loc, self.scale).log_prob(on_grid)
        return torch.where(self.decoder, discretized, gaussian)


def _gaussian_kl(loc_q, var_q, loc_p, var_p):
    return 0.5 * (torch.log(var_p / var_q) + (var_q + (loc_q - loc_p).square()) / var_p - 1)


@register_kl(ForwardStep, dist.Normal)
def _kl_forward_step_normal(q, p):
    point = q.point
    var_q = torch.where(point, torch.ones_like(q.scale), q.scale.square())
    kl = _gaussian_kl(q.loc, var_q, p.loc, p.scale.square())
    return torch.where(point, -p.log_prob(q.loc), kl)


@register_kl(ForwardStep, ReverseStep)
def _kl_forward_step_reverse_step(q, p):
    point = q.point
    var_q = torch.where(point, torch.ones_like(q.scale), q.scale.square())
    kl = _gaussian_kl(q.loc, var_q, p.loc, p.scale.square())
    return torch.where(point, -p.log_prob(q.loc), kl)


# ---- the family ----------------------------------------------------------------------------------------
@dataclass
class DDPMConfig:
    """Constructor arguments of :class:`DDPM` (what a checkpoint stores to rebuild it)."""

    data_shape: tuple[int, ...] = (2,)
    timesteps: int = 1000
    schedule: str = "linear"
    reverse_variance: str = "beta"
    decoder: str = "gaussian"
    ema_decay: float = 0.0
    hidden_dim: int = 128
    num_blocks: int = 3
    channels: tuple[int, ...] = (32, 64)
    time_sampling: str = "plate"
    name: str | None = None


class SampleChain(NamedTuple):
    """Samples with intermediate states of the reverse chain (for the x_T → x_0 strip)."""

    samples: torch.Tensor  # (n, *data_shape)
    states: torch.Tensor  # (K, n, *data_shape): x_t at the times below, x_T first, the samples last
    times: list[int]  # the K timesteps, T first, 0 last


@register_family("ddpm")
class DDPM(Family):
    """Denoising diffusion probabilistic model as a Pyro model/guide pair (see the module docstring).

    :param denoiser: an ε-network ``denoiser(x, t)`` taking x of shape (..., *data_shape) and integer
        timesteps t ∈ {1, …, T} broadcastable to its batch dimensions; default: :class:`MLPDenoiser` for
        (D,) data, :class:`UNetDenoiser` for (C, H, W) images (``pvae.denoisers``). A checkpoint rebuilds
        the default network from the config, so a custom network must be passed again when loading.
    :param data_shape: shape of one datum in model space, e.g. (2,) or (1, 28, 28).
    :param timesteps: T ≥ 1.
    :param schedule: ``"linear"`` or ``"cosine"`` (see :func:`make_betas`).
    :param reverse_variance: σ_t² for t ≥ 2: ``"beta"`` (β_t) or ``"beta_tilde"`` (β̃_t).
    :param decoder: p_θ(x_0 | x_1): ``"gaussian"`` (continuous data) or ``"discretized"`` (8-bit images in
        model space, DDPM Eq. 13); default: discretized for (C, H, W) data, Gaussian otherwise.
    :param ema_decay: decay of the exponential moving average of the denoiser's weights, in [0, 1); 0 turns
        it off. Default: 0.999 for images, off for vector data. The average is updated by
        :meth:`after_step` (the training loop calls it after each optimizer step), lives in buffers (so it is
        in the state dict), and is what :meth:`sample` and :meth:`elbo` use once it has been updated.
    :param hidden_dim: width of the default MLP denoiser.
    :param num_blocks: residual blocks of the default MLP denoiser.
    :param channels: channel widths per level of the default U-Net.
    :param time_sampling: how the subsampled pair draws timesteps: ``"plate"`` — one t per call for the
        whole batch, by ``pyro.plate("time", T, subsample_size=1)``; ``"per_datum"`` — one t per datum.
    :param name: prefix in Pyro's param store (default: unique).
    """

    config_class = DDPMConfig

    def __init__(
        self,
        denoiser: nn.Module | None = None,
        data_shape: Sequence[int] = (2,),
        timesteps: int = 1000,
        schedule: str = "linear",
        reverse_variance: str = "beta",
        decoder: str | None = None,
        ema_decay: float | None = None,
        hidden_dim: int = 128,
        num_blocks: int = 3,
        channels: Sequence[int] = (32, 64),
        time_sampling: str = "plate",
        name: str | None = None,
    ):
        super().__init__(name)
        try:
            data_shape = tuple(int(size) for size in data_shape)
        except (TypeError, ValueError) as error:
            raise ValueError(f"data_shape must be a tuple of positive ints, got {data_shape!r}") from error
        if not data_shape or min(data_shape) < 1:
            raise ValueError(f"data_shape must be a non-empty tuple of positive ints, got {data_shape!r}")
        _check_timesteps(timesteps)
        if schedule not in SCHEDULES:
            raise ValueError(f"schedule must be one of {SCHEDULES}, got {schedule!r}")
        if reverse_variance not in REVERSE_VARIANCES:
            raise ValueError(f"reverse_variance must be one of {REVERSE_VARIANCES}, got {reverse_variance!r}")
        is_image = len(data_shape) == 3
        if decoder is None:
            decoder = "discretized" if is_image else "gaussian"
        if decoder not in DECODERS:
            raise ValueError(f"decoder must be one of {DECODERS} (or None for the default), got {decoder!r}")
        if ema_decay is None:
            ema_decay = 0.999 if is_image else 0.0
        if isinstance(ema_decay, bool) or not (
            isinstance(ema_decay, int | float) and 0.0 <= float(ema_decay) < 1.0
        ):
            raise ValueError(f"ema_decay must be a number in [0, 1) (0 turns EMA off), got {ema_decay!r}")
        channels = tuple(int(width) for width in channels)
        if time_sampling not in TIME_SAMPLING:
            raise ValueError(f"time_sampling must be one of {TIME_SAMPLING}, got {time_sampling!r}")
        self.config = DDPMConfig(
            data_shape=data_shape,
            timesteps=timesteps,
            schedule=schedule,
            reverse_variance=reverse_variance,
            decoder=decoder,
            ema_decay=float(ema_decay),
            hidden_dim=hidden_dim,
            num_blocks=num_blocks,
            channels=channels,
            time_sampling=time_sampling,
            name=self.name,
        )
        self.data_shape = data_shape
        self.event_dims = len(data_shape)
        self.timesteps = timesteps
        self.time_sampling = time_sampling
        self.decoder = decoder
        self.ema_decay = float(ema_decay)
        if denoiser is None:
            denoiser = default_denoiser(
                data_shape, timesteps, hidden_dim=hidden_dim, num_blocks=num_blocks, channels=channels
            )
        if not isinstance(denoiser, nn.Module):
            raise ValueError(f"denoiser must be an nn.Module ε_θ(x, t), got {type(denoiser).__name__}")
        self.denoiser = denoiser
        # EMA copy of the denoiser whose parameters are buffers: in the state dict, invisible to optimizers
        self.ema_denoiser = _frozen_copy(denoiser) if self.ema_decay > 0 else None
        self.register_buffer("ema_updates", torch.zeros((), dtype=torch.long))
        # schedule: float64 master on the CPU (Python floats for per-step use) + buffers on the device
        self._tables64 = _schedule_tables(make_betas(schedule, timesteps), reverse_variance)
        self._tables64["kl_constant"] = torch.tensor(
            [0.0] + [self._kl_constant_from(tables=self._tables64, t=t) for t in range(1, timesteps + 1)],
            dtype=torch.float64,
            device="cpu",
        )
        self._scalars = {name: table.tolist() for name, table in self._tables64.items()}
        self._register_schedule(torch.get_default_dtype(), torch.device("cpu"))

    # ---- schedule buffers follow the module's dtype/device, recomputed from the float64 master --------
    def _register_schedule(self, dtype: torch.dtype, device: torch.device) -> None:
        for name, table in self._tables64.items():
            self.register_buffer(name, table.to(device=device, dtype=dtype), persistent=False)

    def _apply(self, fn, recurse=True):
        super()._apply(fn, recurse)
        reference = self.beta
        self._register_schedule(reference.dtype, reference.device)
        return self

    def _table(self, name: str, like: torch.Tensor) -> torch.Tensor:
        table = getattr(self, name)
        return table if table.dtype == like.dtype else table.to(like.dtype)

    # ---- validation ------------------------------------------------------------------------------------
    def _check_data(self, x0: torch.Tensor, name: str = "x0") -> torch.Tensor:
        check_finite(name, x0)
        if x0.dim() != 1 + self.event_dims or tuple(x0.shape[1:]) != self.data_shape:
            raise ValueError(
                f"{name} must have shape (N, {', '.join(map(str, self.data_shape))}) with N ≥ 1 to match "
                f"data_shape={self.data_shape}, got {tuple(x0.shape)}"
            )
        if x0.shape[0] == 0:
            raise ValueError(
                f"{name} is an empty batch, shape {tuple(x0.shape)}: a batch needs at least one datum"
            )
        if x0.device != self.beta.device:
            raise ValueError(f"{name} is on {x0.device} but the model is on {self.beta.device}; move one")
        if self.decoder == "discretized":
            check_model_space(name, x0)
        return x0

    def _check_timestep(self, timestep) -> int:
        if isinstance(timestep, bool) or not isinstance(timestep, int) or not 1 <= timestep <= self.timesteps:
            raise ValueError(f"timestep must be an integer in 1 … {self.timesteps}, got {timestep!r}")
        return timestep

    # ---- building blocks -------------------------------------------------------------------------------
    def _network(self, use_ema: bool | None) -> nn.Module:
        if use_ema is None:
            use_ema = self.ema_denoiser is not None and int(self.ema_updates) > 0
        if use_ema and self.ema_denoiser is None:
            raise ValueError("use_ema=True needs a model built with ema_decay > 0")
        return self.ema_denoiser if use_ema else self.denoiser

    def _reverse_mean(self, x_t: torch.Tensor, t: int, network: nn.Module | None = None) -> torch.Tensor:
        """μ_θ(x_t, t) = x_t/√α_t − β_t/(√α_t √(1−ᾱ_t))·ε_θ(x_t, t)  (DDPM Eq. 11)."""
        eps = (network or self.denoiser)(x_t, x_t.new_tensor(float(t)))
        return self._scalars["recip_sqrt_alpha"][t] * x_t - self._scalars["eps_coef"][t] * eps

    def _forward_marginal(self, x0: torch.Tensor, t: int) -> dist.Distribution:
        """q(x_t | x_0) = N(√ᾱ_t x_0, (1 − ᾱ_t) I)  (DDPM Eq. 4)."""
        loc = self._scalars["sqrt_alpha_bar"][t] * x0
        scale = x0.new_tensor(self._scalars["sqrt_one_minus_alpha_bar"][t]).expand(x0.shape)
        return dist.Normal(loc, scale).to_event(self.event_dims)

    def _forward_posterior(self, x_t: torch.Tensor, x0: torch.Tensor, t: int) -> dist.Distribution:
        """q(x_{t−1} | x_t, x_0) = N(μ̃_t, β̃_t I) (Eq. 6–7); the point mass at x_0 when t = 1."""
        if t == 1:
            return dist.Delta(x0.expand(x_t.shape), event_dim=self.event_dims)
        loc = self._scalars["posterior_coef_x0"][t] * x0 + self._scalars["posterior_coef_xt"][t] * x_t
        scale = loc.new_tensor(math.sqrt(self._scalars["beta_tilde"][t])).expand(loc.shape)
        return dist.Normal(loc, scale).to_event(self.event_dims)

    def _reverse(self, mean: torch.Tensor, t: int, gaussian_decoder: bool = False) -> dist.Distribution:
        """p_θ(x_{t−1} | x_t) = N(μ_θ, σ_t² I), or the decoder p_θ(x_0 | x_1) at t = 1."""
        scale = mean.new_tensor(math.sqrt(self._scalars["sigma2"][t])).expand(mean.shape)
        if t == 1 and self.decoder == "discretized" and not gaussian_decoder:
            return DiscretizedGaussian(mean, scale).to_event(self.event_dims)
        return dist.Normal(mean, scale).to_event(self.event_dims)

    def prior_kl(self, x0: torch.Tensor) -> torch.Tensor:
        """L_T = KL(q(x_T | x_0) ‖ N(0, I)) = ½ Σ_i (ᾱ_T (x_0,i² − 1) − log(1 − ᾱ_T)), shape (N,)."""
        alpha_bar = self._scalars["alpha_bar"][self.timesteps]
        per_dim = 0.5 * (alpha_bar * (x0.square() - 1) - math.log1p(-alpha_bar))
        return per_dim.reshape(x0.shape[0], -1).sum(-1)

    def _kl_constant_from(self, tables: dict[str, torch.Tensor], t: int) -> float:
        """c_t in L_{t−1} = w_t‖ε − ε_θ‖² + c_t, per datum (D dims); at t = 1 the Gaussian decoder's."""
        dims = math.prod(self.data_shape)
        sigma2 = tables["sigma2"][t].item()
        if t == 1:
            return 0.5 * dims * math.log(2 * math.pi * sigma2)
        beta_tilde = tables["beta_tilde"][t].item()
        return 0.5 * dims * (math.log(sigma2 / beta_tilde) + beta_tilde / sigma2 - 1)

    def _kl_constant(self, t: int) -> float:
        return self._scalars["kl_constant"][t]

    # ---- full chain ------------------------------------------------------------------------------------
    def model(self, x0: torch.Tensor) -> None:
        """Reverse chain: x_T ~ N(0, I), x_{t−1} ~ N(μ_θ(x_t, t), σ_t² I) for t = T … 2 at sites ``"x_{t}"``,
        then ``"x_0"`` observed under the decoder. x0: (N, *data_shape)."""
        x0 = self._check_data(x0)
        pyro.module(self.name, self)
        with pyro.plate("data", x0.shape[0]):
            noise = dist.Normal(x0.new_zeros(()), x0.new_ones(())).expand(self.data_shape)
            x = pyro.sample(f"x_{self.timesteps}", noise.to_event(self.event_dims))
            for t in range(self.timesteps, 0, -1):
                mean = self._reverse_mean(x, t)
                x = pyro.sample(f"x_{t - 1}", self._reverse(mean, t), obs=x0 if t == 1 else None)

    def guide(self, x0: torch.Tensor) -> None:
        """Forward posterior chain: x_T ~ q(x_T | x_0), x_{t−1} ~ q(x_{t−1} | x_t, x_0) for t = T … 2.

        The forward process has no parameters, so the guide registers none (the model registers the
        denoiser with ``pyro.module``).
        """
        x0 = self._check_data(x0)
        with pyro.plate("data", x0.shape[0]):
            x = pyro.sample(f"x_{self.timesteps}", self._forward_marginal(x0, self.timesteps))
            for t in range(self.timesteps, 1, -1):
                x = pyro.sample(f"x_{t - 1}", self._forward_posterior(x, x0, t))

    # ---- time-subsampled pair --------------------------------------------------------------------------
    def _time_plate(self, x0: torch.Tensor, timestep: int | None):
        if timestep is None:
            return pyro.plate("time", self.timesteps, subsample_size=1, dim=-2, device=x0.device)
        index = torch.tensor([self._check_timestep(timestep) - 1], device=x0.device)
        return pyro.plate("time", self.timesteps, subsample=index, dim=-2)

    @staticmethod
    def _check_weighting(weighting: str) -> None:
        if weighting not in WEIGHTINGS:
            raise ValueError(f"weighting must be one of {WEIGHTINGS}, got {weighting!r}")

    def _weight(self, t: int, weighting: str) -> float:
        """Extra scale of the x_prev term: 1 for the ELBO, 1/(T·w_t) for L_simple (in model *and* guide)."""
        if weighting == "elbo":
            return 1.0
        return 1.0 / (self.timesteps * self._scalars["simple_weight"][t])

    def model_subsampled(
        self, x0: torch.Tensor, *, timestep: int | None = None, weighting: str = "elbo"
    ) -> None:
        """One timestep of the reverse chain per call, scaled by T (see the module docstring).

        :param x0: (N, *data_shape) in model space.
        :param timestep: use this t ∈ {1, …, T} instead of a uniform draw (still scaled by T).
        :param weighting: ``"elbo"`` (the ELBO) or ``"simple"`` (L_simple, DDPM Eq. 14 — not an ELBO; exact
            under TraceMeanField_ELBO, which evaluates the per-step KL in closed form).
        """
        x0 = self._check_data(x0)
        self._check_weighting(weighting)
        pyro.module(self.name, self)
        with pyro.plate("data", x0.shape[0]):
            if weighting == "elbo":
                pyro.factor("prior_kl", -self.prior_kl(x0))  # −L_T, constant in θ
            if self.time_sampling == "per_datum":
                self._per_datum_step(x0, timestep, weighting, model=True)
                return
            with self._time_plate(x0, timestep) as index:
                t = int(index[0]) + 1
                x_t = pyro.sample("x_t", self._forward_marginal(x0, t).mask(False))  # (1, N, *shape)
                mean = self._reverse_mean(x_t, t)
                if weighting == "elbo":
                    pyro.sample("x_prev", self._reverse(mean, t))
                else:
                    # (−L_{t−1} + c_t)/(T w_t) per draw of t: T·that = −‖ε − ε_θ‖² (the plate scales by T)
                    with poutine.scale(scale=self._weight(t, weighting)):
                        pyro.factor("kl_constant", mean.new_tensor(self._kl_constant(t)))
                        pyro.sample("x_prev", self._reverse(mean, t, gaussian_decoder=True))

    def guide_subsampled(
        self, x0: torch.Tensor, *, timestep: int | None = None, weighting: str = "elbo"
    ) -> None:
        """t ~ Uniform{1, …, T} (time plate), x_t ~ q(x_t | x_0) (masked), x_{t−1} ~ q(x_{t−1} | x_t, x_0).

        ``weighting`` must match the model's: with ``"simple"`` the x_prev term is rescaled here too, since
        an ELBO estimator weighs log p − log q of a site by the site's scale (TraceMeanField_ELBO takes the
        guide's).
        """
        x0 = self._check_data(x0)
        self._check_weighting(weighting)
        with pyro.plate("data", x0.shape[0]):  # no parameters here: pyro.module is the model's
            if self.time_sampling == "per_datum":
                self._per_datum_step(x0, timestep, weighting, model=False)
                return
            with self._time_plate(x0, timestep) as index:
                t = int(index[0]) + 1
                x_t = pyro.sample("x_t", self._forward_marginal(x0, t).mask(False))
                with poutine.scale(scale=self._weight(t, weighting)):
                    pyro.sample("x_prev", self._forward_posterior(x_t, x0, t))

    def _per_datum_step(self, x0: torch.Tensor, timestep: int | None, weighting: str, model: bool) -> None:
        """The subsampled pair with ``time_sampling="per_datum"``: one timestep per datum, in the data plate.

        u ~ Uniform(0, T) at site ``"t"`` (masked: it scores nothing) and t = ⌊u⌋ + 1, uniform on
        {1, …, T}; then ``"x_t"`` and ``"x_prev"`` as in the plate version with per-datum coefficients, the
        x_prev term scaled by T (ELBO) or by 1/w_t (L_simple) in model and guide alike.
        """
        view_tail = (1,) * self.event_dims
        if timestep is None:
            uniform = dist.Uniform(x0.new_zeros(()), x0.new_tensor(float(self.timesteps)))
            u = pyro.sample("t", uniform.mask(False))  # (N,)
            t = u.detach().floor().long().clamp(0, self.timesteps - 1) + 1
        else:
            t = torch.full((x0.shape[0],), self._check_timestep(timestep), device=x0.device)

        def table(name):
            return self._table(name, x0)[t].view(*t.shape, *view_tail)

        marginal = dist.Normal(
            table("sqrt_alpha_bar") * x0, table("sqrt_one_minus_alpha_bar").expand(x0.shape)
        )
        x_t = pyro.sample("x_t", marginal.to_event(self.event_dims).mask(False))  # (N, *shape)
        if weighting == "elbo":
            scale = float(self.timesteps)
        else:
            scale = 1.0 / self._table("simple_weight", x0)[t]  # (N,)
        with poutine.scale(scale=scale):
            if not model:
                loc = table("posterior_coef_x0") * x0 + table("posterior_coef_xt") * x_t
                step = ForwardStep(loc, table("beta_tilde").sqrt().expand(loc.shape))
                pyro.sample("x_prev", step.to_event(self.event_dims))
                return
            eps = self.denoiser(x_t, t.to(x0.dtype))
            mean = table("recip_sqrt_alpha") * x_t - table("eps_coef") * eps  # μ_θ (Eq. 11)
            sigma = table("sigma2").sqrt().expand(mean.shape)
            if weighting == "simple":
                pyro.factor("kl_constant", self._table("kl_constant", x0)[t])
                pyro.sample("x_prev", dist.Normal(mean, sigma).to_event(self.event_dims))
            elif self.decoder == "discretized":
                decoder = (t == 1).view(*t.shape, *view_tail).expand(mean.shape)
                pyro.sample("x_prev", ReverseStep(mean, sigma, decoder).to_event(self.event_dims))
            else:
                pyro.sample("x_prev", dist.Normal(mean, sigma).to_event(self.event_dims))

    def svi_program(self, objective: str = "elbo"):
        """(model, guide, loss) to train with SVI for ``objective``:

        - ``"elbo"``: the time-subsampled pair with ``Trace_ELBO`` — an unbiased estimate of the ELBO;
        - ``"meanfield"``: the same pair with ``TraceMeanField_ELBO`` (the KL of x_prev in closed form
          given x_t: the same ELBO, lower variance);
        - ``"simple"``: DDPM's L_simple = E_{t,ε}‖ε − ε_θ(x_t, t)‖² (Eq. 14), summed over data and dims.
          A reweighted objective, **not** an ELBO: the per-t ELBO term divided by T·w_t, constants removed.

        The ELBO weighs step t by w_t = β_t²/(2σ_t²α_t(1−ᾱ_t)). With the cosine schedule the last step is
        clipped to β_T = 0.999, so w_T ≈ 1/(2α_T) = 500 per dimension and that one step's gradients dwarf
        the others'. On two moons (T = 100, 1,600 Adam steps) the ELBO objectives reached a test ELBO of
        about −2.5 nats per point with the linear schedule but below −200 with the cosine one, while
        ``"simple"`` (all weights 1) was fine with both: train the ELBO objectives on the linear schedule.
        """
        if objective == "elbo":
            return self.model_subsampled, self.guide_subsampled, Trace_ELBO()
        if objective == "meanfield":
            return self.model_subsampled, self.guide_subsampled, TraceMeanField_ELBO()
        if objective == "simple":
            model = functools.partial(self.model_subsampled, weighting="simple")
            guide = functools.partial(self.guide_subsampled, weighting="simple")
            return model, guide, TraceMeanField_ELBO()
        raise ValueError(f"objective must be one of {OBJECTIVES}, got {objective!r}")

    # ---- EMA -------------------------------------------------------------------------------------------
    @torch.no_grad()
    def after_step(self) -> None:
        """Update the EMA of the denoiser's weights (no-op when ``ema_decay`` is 0).

        ema ← d·ema + (1 − d)·θ with d = min(ema_decay, (1 + n)/(10 + n)) after n earlier updates, so the
        average follows the weights closely during the first steps.
        """
        if self.ema_denoiser is None:
            return
        updates = int(self.ema_updates)
        decay = min(self.ema_decay, (1 + updates) / (10 + updates))
        shadows = dict(self.ema_denoiser.named_buffers())
        for name, param in self.denoiser.named_parameters():
            shadows[name].lerp_(param.detach(), 1 - decay)
        for name, buffer in self.denoiser.named_buffers():
            shadows[name].copy_(buffer)
        self.ema_updates += 1

    # ---- evaluation ------------------------------------------------------------------------------------
    def elbo(
        self,
        x0: torch.Tensor,
        *,
        use_ema: bool | None = None,
        grad: bool = False,
        generator: torch.Generator | None = None,
        return_terms: bool = False,
        progress: bool = False,
    ):
        """Per-datum ELBO with every one of the T terms evaluated (DDPM Eq. 5), shape (N,).

        ELBO = −L_T − Σ_{t=2}^T KL(q(x_{t−1} | x_t, x_0) ‖ p_θ(x_{t−1} | x_t)) + log p_θ(x_0 | x_1), with the
        KLs and L_T in closed form and one draw x_t ~ q(x_t | x_0) per t and datum (the network is not
        linear, so the expectation over x_t is a single-sample estimate, unbiased). Batched over t.

        :param x0: (N, *data_shape) in model space.
        :param use_ema: evaluate the EMA weights (default: when EMA is on and has been updated).
        :param grad: keep the autograd graph (default: evaluate under ``torch.no_grad``).
        :param generator: torch generator for the draws (on x0's device).
        :param return_terms: also return ``{"prior": (N,), "kl": (T − 1, N) for t = 2 … T, "decoder": (N,)}``
            with prior = L_T, kl[t − 2] = L_{t−1}, decoder = −L_0 = log p_θ(x_0 | x_1).
        :param progress: progress bar over chunks of timesteps.
        :returns: the ELBO (N,), or (ELBO, terms).
        """
        x0 = self._check_data(x0)
        network = self._network(use_ema)
        with torch.set_grad_enabled(grad):
            prior = self.prior_kl(x0)  # (N,)
            data_chunk, time_chunk = self._chunk_sizes(x0)
            times = list(range(1, self.timesteps + 1))
            work = [
                (start, times[first : first + time_chunk])
                for start in range(0, x0.shape[0], data_chunk)
                for first in range(0, self.timesteps, time_chunk)
            ]
            kl_rows: dict[int, list[torch.Tensor]] = {}
            decoder_parts: dict[int, torch.Tensor] = {}
            for start, chunk_times in progress_bar(work, progress=progress, desc="ELBO terms"):
                kl, log_decoder = self._terms(x0[start : start + data_chunk], chunk_times, network, generator)
                kl_rows.setdefault(start, []).append(kl)
                if log_decoder is not None:
                    decoder_parts[start] = log_decoder
            kl = torch.cat([torch.cat(kl_rows[start], 0) for start in sorted(kl_rows)], 1)  # (T−1, N)
            decoder = torch.cat([decoder_parts[start] for start in sorted(decoder_parts)], 0)  # (N,)
            elbo = -prior - kl.sum(0) + decoder
        if return_terms:
            return elbo, {"prior": prior, "kl": kl, "decoder": decoder}
        return elbo

    def _chunk_sizes(self, x0: torch.Tensor) -> tuple[int, int]:
        """Data and timesteps per network call, about 2^18 input numbers per call."""
        budget = max(1, 2**18 // x0[0].numel())  # network inputs per call
        data_chunk = min(x0.shape[0], budget)
        return data_chunk, max(1, budget // data_chunk)

    def _terms(self, x0, times, network, generator):
        """KL terms (len(times) without t = 1, N) and log p(x_0 | x_1) (N,) when 1 ∈ times."""
        view = (-1,) + (1,) * (1 + self.event_dims)
        t = torch.tensor(times, device=x0.device)  # (c,)
        noise = torch.randn(
            (len(times), *x0.shape), generator=generator, dtype=x0.dtype, device=x0.device
        )  # (c, N, *shape)
        x_t = (
            self._table("sqrt_alpha_bar", x0)[t].view(view) * x0
            + self._table("sqrt_one_minus_alpha_bar", x0)[t].view(view) * noise
        )
        eps = network(x_t, t.to(x0.dtype).view(-1, 1))  # (c, N, *shape)
        mean = (
            self._table("recip_sqrt_alpha", x0)[t].view(view) * x_t
            - self._table("eps_coef", x0)[t].view(view) * eps
        )
        sigma2 = self._table("sigma2", x0)[t].view(view)
        log_decoder = None
        if times[0] == 1:
            decoder = self._reverse(mean[0], 1)
            log_decoder = decoder.log_prob(x0)  # (N,)
            x0_rest, x_t, mean, sigma2, t = x0, x_t[1:], mean[1:], sigma2[1:], t[1:]
        else:
            x0_rest = x0
        post_mean = (
            self._table("posterior_coef_x0", x0)[t].view(view) * x0_rest
            + self._table("posterior_coef_xt", x0)[t].view(view) * x_t
        )
        post_var = self._table("beta_tilde", x0)[t].view(view)
        # KL(N(μ̃, β̃) ‖ N(μ_θ, σ²)) per dimension, summed over the event dims
        kl = 0.5 * (torch.log(sigma2 / post_var) + (post_var + (post_mean - mean).square()) / sigma2 - 1)
        return kl.flatten(2).sum(-1), log_decoder

    def bits_per_dim(self, x0: torch.Tensor, **elbo_kwargs) -> torch.Tensor:
        """−ELBO/(D ln 2) per datum, shape (N,): an upper bound on the code length in bits per dimension.

        With the discretized decoder the ELBO bounds the log *probability* of the 8-bit data, so this is in
        bits per dim of the 8-bit data (as DDPM reports); with the Gaussian decoder it is −log density in
        model space, per dim, in bits. ``elbo_kwargs`` go to :meth:`elbo`.
        """
        return -self.elbo(x0, **elbo_kwargs) / (math.prod(self.data_shape) * math.log(2))

    # ---- sampling --------------------------------------------------------------------------------------
    @torch.no_grad()
    def sample(
        self,
        num_samples: int,
        *,
        steps: int | None = None,
        eta: float | None = None,
        return_chain: bool = False,
        chain_length: int = 10,
        batch_size: int | None = None,
        clip_denoised: bool = False,
        use_ema: bool | None = None,
        generator: torch.Generator | None = None,
        progress: bool = True,
    ):
        """Draw samples x_0 from the model, on its device, in model space: (num_samples, *data_shape).

        Default: ancestral sampling through the reverse chain (DDPM Algorithm 2), x_T ~ N(0, I),
        x_{t−1} = μ_θ(x_t, t) + σ_t z, returning μ_θ(x_1, 1) (the decoder's mean) at the end. With ``steps``
        or ``eta`` given: DDIM (Song et al. 2021, Eq. 12) on ``steps`` evenly spaced timesteps, noise scale
        η (0: deterministic; 1: ancestral-like).

        :param num_samples: number of samples n ≥ 1.
        :param steps: DDIM steps, 1 … T (default T).
        :param eta: DDIM η ≥ 0 (default 0).
        :param return_chain: also return ``chain_length`` intermediate states (a :class:`SampleChain`).
        :param chain_length: number of recorded states (x_T and x_0 included), ≥ 2.
        :param batch_size: samples per network call (default all).
        :param clip_denoised: clip the implied x̂_0 = (x_t − √(1−ᾱ_t) ε_θ)/√ᾱ_t to [−1, 1] and step with
            the posterior mean μ̃_t(x_t, x̂_0) (equal to μ_θ without clipping); for image data.
        :param use_ema: use the EMA weights (default: when EMA is on and has been updated).
        :param generator: torch generator for the noise (on the model's device).
        :param progress: progress bar over timesteps (on stderr, only when it is a terminal).
        """
        if isinstance(num_samples, bool) or not isinstance(num_samples, int) or num_samples < 1:
            raise ValueError(f"num_samples must be a positive integer, got {num_samples!r}")
        if batch_size is None:
            batch_size = num_samples
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
        if isinstance(chain_length, bool) or not isinstance(chain_length, int) or chain_length < 2:
            raise ValueError(f"chain_length must be an integer ≥ 2, got {chain_length!r}")
        ddim = steps is not None or eta is not None
        if ddim:
            steps = self.timesteps if steps is None else steps
            if isinstance(steps, bool) or not isinstance(steps, int) or not 1 <= steps <= self.timesteps:
                raise ValueError(f"steps must be an integer in 1 … {self.timesteps}, got {steps!r}")
            eta = 0.0 if eta is None else eta
            if not (isinstance(eta, int | float) and math.isfinite(eta) and eta >= 0):
                raise ValueError(f"eta must be a finite number ≥ 0, got {eta!r}")
            times = sorted(
                {round(v) for v in torch.linspace(1, self.timesteps, steps).tolist()}, reverse=True
            )
        else:
            times = list(range(self.timesteps, 0, -1))
        network = self._network(use_ema)
        # the K recorded states: x_T, a few evenly spaced along the chain, and the result
        record_after = sorted(
            {round(v) for v in torch.linspace(0, len(times), chain_length).tolist()}
        )  # after how many steps
        outputs, chains = [], []
        for start in range(0, num_samples, batch_size):
            count = min(batch_size, num_samples - start)
            run = self._sample_ddim if ddim else self._sample_ancestral
            samples, states = run(
                count, times, network, clip_denoised, generator, progress, record_after, eta or 0.0
            )
            outputs.append(samples)
            chains.append(states)
        samples = torch.cat(outputs, 0)
        if not return_chain:
            return samples
        state_times = [times[k] if k < len(times) else 0 for k in record_after]  # x_T first
        return SampleChain(samples, torch.cat(chains, 1), state_times)

    def _sample_setup(self, count, generator):
        reference = self.beta
        x = torch.randn(
            (count, *self.data_shape), generator=generator, device=reference.device, dtype=reference.dtype
        )  # x_T: (count, *data_shape)
        clock = torch.arange(self.timesteps + 1, device=reference.device).to(reference.dtype)
        return x, clock

    def _sample_ancestral(self, count, times, network, clip_denoised, generator, progress, record_after, _):
        x, clock = self._sample_setup(count, generator)
        s = self._scalars
        states = [x] if 0 in record_after else []
        for step, t in enumerate(progress_bar(times, progress=progress, desc="sampling"), start=1):
            eps = network(x, clock[t])
            if clip_denoised:
                x0_hat = ((x - s["sqrt_one_minus_alpha_bar"][t] * eps) / s["sqrt_alpha_bar"][t]).clamp(-1, 1)
                mean = s["posterior_coef_x0"][t] * x0_hat + s["posterior_coef_xt"][t] * x
            else:
                mean = s["recip_sqrt_alpha"][t] * x - s["eps_coef"][t] * eps  # (Eq. 11)
            if t > 1:
                noise = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
                x = mean + math.sqrt(s["sigma2"][t]) * noise
            else:
                x = mean
            if step in record_after:
                states.append(x)
        return x, torch.stack(states, 0)

    def _sample_ddim(self, count, times, network, clip_denoised, generator, progress, record_after, eta):
        x, clock = self._sample_setup(count, generator)
        alpha_bar = self._scalars["alpha_bar"]
        states = [x] if 0 in record_after else []
        for step, t in enumerate(progress_bar(times, progress=progress, desc="DDIM"), start=1):
            t_prev = times[step] if step < len(times) else 0
            eps = network(x, clock[t])
            x0_hat = (x - math.sqrt(1 - alpha_bar[t]) * eps) / math.sqrt(alpha_bar[t])
            if clip_denoised:
                x0_hat = x0_hat.clamp(-1, 1)
                eps = (x - math.sqrt(alpha_bar[t]) * x0_hat) / math.sqrt(1 - alpha_bar[t])
            sigma = (
                eta
                * math.sqrt((1 - alpha_bar[t_prev]) / (1 - alpha_bar[t]))
                * math.sqrt(max(0.0, 1 - alpha_bar[t] / alpha_bar[t_prev]))
            )
            x = (
                math.sqrt(alpha_bar[t_prev]) * x0_hat
                + math.sqrt(max(0.0, 1 - alpha_bar[t_prev] - sigma**2)) * eps
            )
            if sigma > 0:
                x = x + sigma * torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
            if step in record_after:
                states.append(x)
        return x, torch.stack(states, 0)


def _frozen_copy(module: nn.Module) -> nn.Module:
    """A deep copy of ``module`` whose parameters are plain buffers (no gradients, no optimizer)."""
    shadow = copy.deepcopy(module)
    for submodule in shadow.modules():
        for name, param in list(submodule._parameters.items()):
            del submodule._parameters[name]
            if param is not None:
                submodule.register_buffer(name, param.detach().clone())
    shadow.requires_grad_(False)
    return shadow
