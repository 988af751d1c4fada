r"""The step distributions of the diffusion chains, and the one Gaussian KL they all use.

- :func:`gaussian_kl`: KL(N(μ_q, v_q) ‖ N(μ_p, v_p)) per dimension, the formula behind every KL of the
  family (the L_{t−1} terms, L_T, the constants of L_simple, and the registered KLs below);
- :class:`DiscretizedGaussian`: DDPM's decoder for 8-bit data in model space (Eq. 13);
- :class:`ForwardStep`: q(x_{t−1} | x_t, x_0) with a timestep per entry: a Gaussian, or the point mass at
  x_0 where t = 1 (β̃_1 = 0);
- :class:`ReverseStep`: p_θ(x_{t−1} | x_t) with a timestep per entry: a Gaussian, or the discretized
  decoder where t = 1;
- one KL(ForwardStep ‖ ·), registered for a Gaussian or a :class:`ReverseStep` model step (what
  ``TraceMeanField_ELBO`` and :func:`pvae.models.diffusion.chain.elbo_terms` evaluate).
"""

from __future__ import annotations

import pyro.distributions as dist
import torch
from pyro.distributions import constraints
from pyro.distributions.torch_distribution import TorchDistribution
from torch.distributions import register_kl

from pvae.utils import log1mexp

__all__ = ["DiscretizedGaussian", "ForwardStep", "ReverseStep", "gaussian_kl", "pixel_grid"]

PIXEL_HALF_WIDTH = 1.0 / 255.0  # half the spacing of the 256-level grid on [−1, 1]


def gaussian_kl(loc_q, var_q, loc_p, var_p) -> torch.Tensor:
    """KL(N(loc_q, var_q) ‖ N(loc_p, var_p)) = ½(log(v_p/v_q) + (v_q + (μ_q − μ_p)²)/v_p − 1), elementwise.

    :param loc_q: mean of q; :param var_q: variance of q, > 0; likewise ``loc_p``, ``var_p`` for p.
    :returns: the KL per entry, in the broadcast shape of the arguments.
    """
    return 0.5 * (torch.log(var_p / var_q) + (var_q + (loc_q - loc_p) ** 2) / var_p - 1)


# ---- the discretized decoder ---------------------------------------------------------------------------
class _PixelGrid(constraints.Constraint):
    """Values k/127.5 − 1, k ∈ {0, …, 255}: the 256-level grid on [−1, 1]."""

    is_discrete = True
    event_dim = 0

    def check(self, value):
        levels = (value + 1) * 127.5
        return (value >= -1 - 1e-4) & (value <= 1 + 1e-4) & ((levels - levels.round()).abs() < 1e-2)


pixel_grid = _PixelGrid()


def _snap_to_grid(value: torch.Tensor) -> torch.Tensor:
    return ((value.clamp(-1, 1) + 1) * 127.5).round() / 127.5 - 1


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
        # the mass of a bin that rounds to zero stays tiny but finite (log 0 would poison the loss)
        gap = (torch.special.log_ndtr(a) - log_b).clamp(max=-torch.finfo(log_b.dtype).tiny)
        inner = log_b + log1mexp(gap)
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
            return _snap_to_grid(draw)


# ---- one step of the forward posterior and of the reverse model, a timestep per entry -----------------
class ForwardStep(TorchDistribution):
    """q(x_{t−1} | x_t, x_0) with a timestep per entry: N(loc, scale²) where scale > 0, the point mass at
    ``loc`` where scale = 0 (t = 1, β̃_1 = 0). Its log density is 0 on the point-mass entries (as
    ``Delta``'s is at its own value)."""

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
    def mean(self):
        return self.loc

    @property
    def point(self) -> torch.Tensor:
        """Where the step is the point mass (t = 1)."""
        return self.scale == 0

    def _safe_scale(self) -> torch.Tensor:
        """scale, with 1 on the point-mass entries (whose Gaussian terms are discarded)."""
        return torch.where(self.point, torch.ones_like(self.scale), self.scale)

    def rsample(self, sample_shape=()):
        shape = self._extended_shape(torch.Size(sample_shape))
        noise = torch.randn(shape, dtype=self.loc.dtype, device=self.loc.device)
        return self.loc + self.scale * noise

    def log_prob(self, value):
        # the parts are checked as this step is (its arguments were checked when it was built). Both parts
        # are computed whatever the timesteps (no branch on the values: a recorded step replays any batch)
        checked = self._validate_args
        gaussian = dist.Normal(self.loc, self._safe_scale(), validate_args=checked).log_prob(value)
        return torch.where(self.point, torch.zeros_like(gaussian), gaussian)


class ReverseStep(TorchDistribution):
    """p_θ(x_{t−1} | x_t) with a timestep per entry: N(loc, scale²), except the discretized decoder (Eq. 13)
    on the entries where ``decoder`` is true (t = 1)."""

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

    @property
    def mean(self):
        return self.loc

    def sample(self, sample_shape=()):
        with torch.no_grad():
            checked = self._validate_args
            gaussian = dist.Normal(self.loc, self.scale, validate_args=checked).sample(sample_shape)
            pixels = DiscretizedGaussian(self.loc, self.scale, validate_args=checked).sample(sample_shape)
            return torch.where(self.decoder, pixels, gaussian)

    def log_prob(self, value):
        # the parts are checked as this step is (its arguments were checked when it was built)
        # both parts are computed whatever the timesteps (no branch on the values, no shape that depends on
        # them: a recorded step replays any batch)
        gaussian = dist.Normal(self.loc, self.scale, validate_args=self._validate_args).log_prob(value)
        if self._validate_args and not bool((pixel_grid.check(value) | ~self.decoder).all()):
            raise ValueError("the decoder entries of the value must lie on the 256-level grid of [−1, 1]")
        # the continuous entries are discarded below; snapped to the grid they keep that branch finite
        on_grid = torch.where(self.decoder, value, _snap_to_grid(value))
        decoder = DiscretizedGaussian(self.loc, self.scale, validate_args=self._validate_args)
        discretized = decoder.log_prob(on_grid)
        return torch.where(self.decoder, discretized, gaussian)


@register_kl(ForwardStep, dist.Normal)
@register_kl(ForwardStep, ReverseStep)
def _kl_forward_step(q: ForwardStep, p: dist.Normal | ReverseStep) -> torch.Tensor:
    """KL(q ‖ p) per entry: the Gaussian KL where q is Gaussian, −log p(loc) where q is the point mass."""
    # both cases computed for every entry (no branch on the timesteps' values; see ForwardStep.log_prob)
    kl = gaussian_kl(q.loc, q._safe_scale().square(), p.loc, p.scale.square())
    return torch.where(q.point, -p.log_prob(q.loc), kl)
