"""Distributions Pyro lacks: a tail-stable, reparameterized truncated normal.

Every quantity is computed in *tail-stable coordinates*. With standardized bounds
a = (low − loc)/scale and b = (high − loc)/scale, an interval that lies in the upper half (a > 0) is
mirrored, Z' = −Z on [−b, −a], so that it always lies where log Φ is accurate (the lower tail,
``torch.special.log_ndtr``). Normalizers, densities, moments and samples are then computed from log Φ
without ever forming Φ(a) or 1 − Φ(a) directly, which keeps them finite and accurate for standardized
bounds far into either tail (|a|, |b| ≤ 50 is tested; float64 recommended there).
"""

from __future__ import annotations

import math

import torch
from pyro.distributions.torch_distribution import TorchDistribution
from torch.distributions import constraints
from torch.distributions.kl import register_kl
from torch.distributions.utils import broadcast_all

__all__ = ["TruncatedNormal", "log_ndtri"]

_HALF_LOG_2PI = 0.5 * math.log(2 * math.pi)
_LOG_HALF = math.log(0.5)


def _log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 − exp(x)) for x ≤ 0, accurate near 0 and far below it (Mächler 2012)."""
    near_zero = x > -math.log(2.0)
    # Each branch only sees inputs valid for it, so torch.where has no NaN gradient to mix in.
    x_near = torch.where(near_zero, x, torch.full_like(x, -math.log(2.0)))
    x_far = torch.where(near_zero, torch.full_like(x, -math.log(2.0)), x)
    return torch.where(near_zero, torch.log(-torch.expm1(x_near)), torch.log1p(-torch.exp(x_far)))


def _log_phi(z: torch.Tensor) -> torch.Tensor:
    """Log standard normal density."""
    return -0.5 * z * z - _HALF_LOG_2PI


def log_ndtri(log_p: torch.Tensor, newton_steps: int = 4) -> torch.Tensor:
    """Standard normal quantile of p = exp(log_p), accurate when p underflows (log_p ≪ −700).

    Upper half (p > 1/2): z = −Φ⁻¹(1 − p) with 1 − p = −expm1(log_p). Lower half: a start from
    ``ndtri(p)`` (or, when p is tiny, the asymptotic z² ≈ −2 log p − log(−4π log p)), refined by Newton
    steps on log Φ(z) = log_p, which converge monotonically because log Φ is concave. Differentiable.
    """
    upper = log_p > _LOG_HALF
    tiny = log_p < -30.0
    safe_upper = torch.where(upper, log_p, torch.full_like(log_p, _LOG_HALF))
    z_upper = -torch.special.ndtri(-torch.expm1(safe_upper))

    safe_lower = torch.where(upper, torch.full_like(log_p, _LOG_HALF), log_p)
    start_moderate = torch.special.ndtri(
        torch.exp(torch.where(tiny, torch.full_like(log_p, -30.0), safe_lower))
    )
    minus_two_log_p = -2.0 * torch.where(tiny, safe_lower, torch.full_like(log_p, -30.0))
    start_tiny = -torch.sqrt(minus_two_log_p - torch.log(2 * math.pi * minus_two_log_p))
    z = torch.where(tiny, start_tiny, start_moderate)
    for _ in range(newton_steps):
        log_cdf = torch.special.log_ndtr(z)
        z = z - (log_cdf - safe_lower) * torch.exp(log_cdf - _log_phi(z))
    z = torch.where(log_p == -math.inf, torch.full_like(z, -math.inf), z)  # p = 0
    return torch.where(upper, z_upper, z)


class TruncatedNormal(TorchDistribution):
    r"""Normal(loc, scale) restricted to [low, high]; ``None`` leaves a side unbounded.

    .. math:: p(x) = \frac{\phi((x-\mu)/\sigma)}{\sigma\,[\Phi(b) - \Phi(a)]}\,
              \mathbf 1[\text{low} \le x \le \text{high}],\quad a = \tfrac{\text{low}-\mu}{\sigma},\;
              b = \tfrac{\text{high}-\mu}{\sigma}.

    Samples are reparameterized (inverse CDF, computed in log space), so gradients flow to ``loc`` and
    ``scale``. Works with any floating dtype and device; parameters broadcast against each other.

    :param loc: mean of the untruncated normal.
    :param scale: standard deviation of the untruncated normal, > 0.
    :param low: lower bound, or ``None`` for −∞.
    :param high: upper bound, or ``None`` for +∞; where both are given, low < high.
    """

    arg_constraints = {"loc": constraints.real, "scale": constraints.positive}
    has_rsample = True

    def __init__(self, loc, scale, low=None, high=None, validate_args=None):
        self._has_low = low is not None
        self._has_high = high is not None
        low = -math.inf if low is None else low
        high = math.inf if high is None else high
        self.loc, self.scale, self.low, self.high = broadcast_all(loc, scale, low, high)
        if not self.loc.is_floating_point():
            raise ValueError(f"loc must be a floating tensor, got dtype {self.loc.dtype}")
        if validate_args is not False:
            for name in ("loc", "scale"):
                if not torch.isfinite(getattr(self, name)).all():
                    raise ValueError(f"TruncatedNormal: {name} must be finite, got {getattr(self, name)}")
            if torch.isnan(self.low).any() or torch.isnan(self.high).any():
                raise ValueError("TruncatedNormal: low and high must not be NaN")
            if not (self.low < self.high).all():
                raise ValueError(
                    f"TruncatedNormal: need low < high everywhere, got low={self.low} and high={self.high}"
                )
        super().__init__(self.loc.shape, validate_args=validate_args)

    def expand(self, batch_shape, _instance=None):
        new = self._get_checked_instance(TruncatedNormal, _instance)
        batch_shape = torch.Size(batch_shape)
        for name in ("loc", "scale", "low", "high"):
            setattr(new, name, getattr(self, name).expand(batch_shape))
        new._has_low, new._has_high = self._has_low, self._has_high
        super(TruncatedNormal, new).__init__(batch_shape, validate_args=self._validate_args)
        return new

    @constraints.dependent_property(is_discrete=False, event_dim=0)
    def support(self):
        if self._has_low and self._has_high:
            return constraints.interval(self.low, self.high)
        if self._has_low:
            return constraints.greater_than_eq(self.low)
        if self._has_high:
            return constraints.less_than(self.high)
        return constraints.real

    # ---- tail-stable coordinates -------------------------------------------------------------------
    def _standardize_bound(self, bound: torch.Tensor) -> torch.Tensor:
        """(bound − loc)/scale, keeping infinite bounds constant so no ∞·0 reaches a gradient."""
        finite = torch.isfinite(bound)
        standardized = (torch.where(finite, bound, torch.zeros_like(bound)) - self.loc) / self.scale
        return torch.where(finite, standardized, bound)

    def _stable(self):
        """(sign, a', b', log Z) with Z' = sign·(X − loc)/scale supported on [a', b'] and b' ≤ 0 or a' ≤ 0."""
        a = self._standardize_bound(self.low)
        b = self._standardize_bound(self.high)
        flip = a > 0
        sign = torch.where(flip, -torch.ones_like(a), torch.ones_like(a))
        lo = torch.where(flip, -b, a)
        hi = torch.where(flip, -a, b)
        log_cdf_hi = torch.special.log_ndtr(hi)
        log_z = log_cdf_hi + _log1mexp(torch.special.log_ndtr(lo) - log_cdf_hi)
        return sign, lo, hi, log_z

    @property
    def log_normalizer(self) -> torch.Tensor:
        """log(Φ(b) − Φ(a)): the log probability mass the bounds keep."""
        return self._stable()[3]

    def log_prob(self, value):
        if self._validate_args:
            self._validate_sample(value)
        z = (value - self.loc) / self.scale
        inside = (value >= self.low) & (value <= self.high)
        log_density = _log_phi(z) - torch.log(self.scale) - self.log_normalizer
        return torch.where(inside, log_density, torch.full_like(log_density, -math.inf))

    def cdf(self, value):
        if self._validate_args:
            self._validate_sample(value)
        sign, lo, hi, log_z = self._stable()
        z = (sign * (value - self.loc) / self.scale).clamp(min=lo, max=hi)  # standardized, mirrored
        log_cdf_z = torch.special.log_ndtr(z)
        # mass of [a', z'] relative to Z; mirrored intervals measure the upper part, so take 1 − it
        mass = torch.exp(log_cdf_z + _log1mexp(torch.special.log_ndtr(lo) - log_cdf_z) - log_z)
        mass = torch.where(z <= lo, torch.zeros_like(mass), mass)
        return torch.where(sign > 0, mass, 1 - mass).clamp(0, 1)

    def _icdf_stable(self, log_u, sign, lo, hi, log_z):
        """Quantile in mirrored coordinates: z' with P(Z' ≤ z') = exp(log_u)."""
        log_target = torch.logaddexp(torch.special.log_ndtr(lo), log_u + log_z)
        z = log_ndtri(log_target)
        return torch.maximum(torch.minimum(z, hi), lo)

    def icdf(self, value):
        sign, lo, hi, log_z = self._stable()
        value = torch.as_tensor(value, dtype=self.loc.dtype, device=self.loc.device)
        # mirrored intervals reverse the order: P(X ≤ x) = u  ⇔  P(Z' ≤ z') = 1 − u
        u_stable = torch.where(sign > 0, value, 1 - value)
        z = self._icdf_stable(torch.log(u_stable), sign, lo, hi, log_z)
        return self.loc + self.scale * sign * z

    def rsample(self, sample_shape=()):
        shape = self._extended_shape(sample_shape)
        sign, lo, hi, log_z = self._stable()
        finfo = torch.finfo(self.loc.dtype)
        # u ~ U(0, 1) drawn in the mirrored frame directly (U and 1 − U have the same law)
        u = torch.rand(shape, dtype=self.loc.dtype, device=self.loc.device).clamp(min=finfo.tiny)
        z = self._icdf_stable(torch.log(u), sign, lo, hi, log_z)
        value = self.loc + self.scale * sign * z
        return torch.maximum(torch.minimum(value, self.high), self.low)

    # ---- moments ------------------------------------------------------------------------------------
    def _phi_terms(self):
        """(sign, E[Z'], E[Z'²] − 1 correction term, log Z) shared by mean, variance and entropy."""
        sign, lo, hi, log_z = self._stable()
        ratio_lo = torch.exp(_log_phi(lo) - log_z)  # φ(a')/Z, zero when a' = −∞
        ratio_hi = torch.exp(_log_phi(hi) - log_z)
        mean_std = ratio_lo - ratio_hi
        # a'φ(a')/Z − b'φ(b')/Z with 0·∞ read as 0 at infinite bounds
        lo_term = torch.where(torch.isfinite(lo), lo, torch.zeros_like(lo)) * ratio_lo
        hi_term = torch.where(torch.isfinite(hi), hi, torch.zeros_like(hi)) * ratio_hi
        return sign, mean_std, lo_term - hi_term, log_z

    @property
    def mean(self):
        sign, mean_std, _, _ = self._phi_terms()
        return self.loc + self.scale * sign * mean_std

    @property
    def variance(self):
        _, mean_std, second, _ = self._phi_terms()
        return (self.scale**2 * (1 + second - mean_std**2)).clamp(min=0)

    def entropy(self):
        _, _, second, log_z = self._phi_terms()
        return _HALF_LOG_2PI + 0.5 + torch.log(self.scale) + log_z + 0.5 * second


@register_kl(TruncatedNormal, TruncatedNormal)
def _kl_truncated_normal(q: TruncatedNormal, p: TruncatedNormal) -> torch.Tensor:
    r"""Closed-form KL(q ‖ p) for truncated normals, finite when q's interval lies inside p's.

    .. math:: \mathrm{KL} = \log\frac{\sigma_p Z_p}{\sigma_q Z_q}
              - \frac{\mathbb E_q[(z-\mu_q)^2]}{2\sigma_q^2} + \frac{\mathbb E_q[(z-\mu_p)^2]}{2\sigma_p^2},
       \quad \mathbb E_q[(z-\mu)^2] = \mathrm{Var}_q + (\mathbb E_q z - \mu)^2.
    """
    inside = (q.low >= p.low) & (q.high <= p.high)
    mean, variance = q.mean, q.variance
    kl = (
        torch.log(p.scale)
        - torch.log(q.scale)
        + p.log_normalizer
        - q.log_normalizer
        - (variance + (mean - q.loc) ** 2) / (2 * q.scale**2)
        + (variance + (mean - p.loc) ** 2) / (2 * p.scale**2)
    )
    return torch.where(inside, kl, torch.full_like(kl, math.inf))
