r"""Distributions Pyro lacks: a tail-stable, reparameterized truncated normal.

Every quantity is computed in *tail-stable coordinates*. With standardized bounds
a = (low − loc)/scale and b = (high − loc)/scale, an interval that lies in the upper half (a > 0) is
mirrored, Z' = −Z on [−b, −a], so that it always lies where log Φ is accurate (the lower tail,
``torch.special.log_ndtr``). Normalizers, densities, moments and samples are then computed from log Φ
without ever forming Φ(a) or 1 − Φ(a) directly, which keeps them finite and accurate for standardized
bounds far into either tail (|a|, |b| ≤ 50 is tested; float64 recommended there).

When only one bound is given and the mirrored interval lies at or below 0 (b' ≤ 0, the *tail case*),
the normalizer, density, mean, variance and entropy are written relative to that bound, u = −b', so that
the terms of size u²/2 cancel on paper instead of in floating point: with Y = b' − Z' ≥ 0,

.. math::
    \log Z = -\tfrac12 u^2 + L, \qquad L = -\tfrac12\log 2\pi - \log g(u), \qquad
    \log p_Y(y) = -u y - \tfrac12 y^2 - L - \tfrac12\log 2\pi,

where g(u) = φ(u)/(1 − Φ(u)) is the standard normal hazard, and Y is the excess over u of a standard
normal conditioned to exceed u, whose mean and variance :func:`_normal_excess` gives accurately however
large u is. This keeps, e.g., Normal(−10¹⁶, 1) truncated to [0, ∞) accurate: its mean is close to its
exponential limit 10⁻¹⁶ instead of the difference of two numbers near 10¹⁶. The sampler, the CDF and the
quantile still work in the mirrored coordinates themselves: they stay finite in the tail case, but their
error relative to the spread of the distribution grows like u² times the float precision. Two-sided
intervals keep the general forms, which lose digits when both bounds lie far out in the same tail.
"""

from __future__ import annotations

import math

import torch
from pyro.distributions.torch_distribution import TorchDistribution
from torch.distributions import constraints
from torch.distributions.kl import register_kl
from torch.distributions.utils import broadcast_all

from pvae.utils import log1mexp

__all__ = ["TruncatedNormal", "log_ndtri"]

_HALF_LOG_2PI = 0.5 * math.log(2 * math.pi)
_LOG_HALF = math.log(0.5)


def _log_phi(z: torch.Tensor) -> torch.Tensor:
    """Log standard normal density."""
    return -0.5 * z * z - _HALF_LOG_2PI


# Laplace's continued fraction for erfcx (see _normal_excess) converges the faster the larger its argument
# t = u/√2 is. The moments take it over from the direct erfcx forms at t = 2.5 with _EXCESS_TERMS levels,
# enough for float64 there. A log density needs only log g, whose value the direct form gives accurately for
# every u; the fraction (_HAZARD_TERMS levels from t = 20 on) is there for its derivative.
_EXCESS_SPLIT = 2.5 * math.sqrt(2.0)
_EXCESS_TERMS = 48
_HAZARD_SPLIT = 20.0 * math.sqrt(2.0)
_HAZARD_TERMS = 8
_LOG_SQRT_2_OVER_PI = 0.5 * math.log(2.0 / math.pi)
_NEGLIGIBLE_BOUND = -40.0  # log Φ(−40) < −800, below the log of the smallest positive float64


def _erfcx_fraction(t: torch.Tensor, terms: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    r"""(c₁, c₂, c₃) of Laplace's continued fraction, evaluated bottom-up from c_{terms+1} = 0:

    .. math:: \sqrt\pi\,\mathrm{erfcx}(t) = \cfrac{1}{t + c_1},\qquad c_k = \cfrac{k/2}{t + c_{k+1}}.
    """
    c = c2 = c3 = torch.zeros_like(t)
    for k in range(terms, 0, -1):
        c = (0.5 * k) / (t + c)
        if k == 3:
            c3 = c
        elif k == 2:
            c2 = c
    return c, c2, c3


def _log_hazard(u: torch.Tensor) -> torch.Tensor:
    """log g(u), g(u) = φ(u)/(1 − Φ(u)), for u ≥ 0, with an accurate derivative d(u) = g(u) − u.

    log(√(2/π)/erfcx(u/√2)) is accurate in value for every u, but differentiating it through erfcx forms d
    as a difference of nearly equal terms once u is large; there log(u + √2 c₁) takes over.
    """
    large = u >= _HAZARD_SPLIT
    u_small = torch.where(large, torch.zeros_like(u), u)
    u_large = torch.where(large, u, torch.full_like(u, _HAZARD_SPLIT))
    c1 = _erfcx_fraction(u_large / math.sqrt(2.0), _HAZARD_TERMS)[0]
    small = _LOG_SQRT_2_OVER_PI - torch.log(torch.special.erfcx(u_small / math.sqrt(2.0)))
    return torch.where(large, torch.log(u_large + math.sqrt(2.0) * c1), small)


def _normal_excess(u: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    r"""For u ≥ 0 and X ~ N(0, 1): (g, d, v) with g = φ(u)/(1 − Φ(u)), d = E[X − u | X > u] = g − u and
    v = Var[X | X > u] = 1 − d·g, accurate and differentiable for any u ≥ 0 (just below the split the direct
    forms lose a few digits to cancellation, far fewer than 1 − d·g would lose above it).

    With t = u/√2 and erfcx the scaled complementary error function, 1 − Φ(u) = ½ erfcx(t) e^{−t²}, so
    g = √(2/π)/erfcx(t); that direct form is used below ``_EXCESS_SPLIT``. Above it d and v are tiny
    differences of large terms, so they come from the continued fraction of :func:`_erfcx_fraction`:
    √π erfcx(t) = 1/(t + c₁) gives d = √2 c₁, and two more of its levels turn 1 − d·g = 1 − 2c₁(t + c₁)
    into v = (t + 2c₂ − c₃) / (2 (t + c₃)(t + c₂)²), in which nothing cancels.
    """
    large = u >= _EXCESS_SPLIT
    # each form only sees arguments in its own range, so neither can feed a NaN into the other's gradient
    u_small = torch.where(large, torch.zeros_like(u), u)
    g_small = math.sqrt(2.0 / math.pi) / torch.special.erfcx(u_small / math.sqrt(2.0))
    d_small = g_small - u_small
    v_small = 1.0 - d_small * g_small

    u_large = torch.where(large, u, torch.full_like(u, _EXCESS_SPLIT))
    t = u_large / math.sqrt(2.0)
    c1, c2, c3 = _erfcx_fraction(t, _EXCESS_TERMS)
    d_large = math.sqrt(2.0) * c1
    v_large = (t + 2.0 * c2 - c3) / (2.0 * (t + c3) * (t + c2) ** 2)

    d = torch.where(large, d_large, d_small)
    g = torch.where(large, u_large + d_large, g_small)
    v = torch.where(large, v_large, v_small)
    return g, d, v


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

    def _mirror(self):
        """(sign, a', b') with Z' = sign·(X − loc)/scale supported on [a', b'] and b' ≤ 0 or a' ≤ 0."""
        a = self._standardize_bound(self.low)
        b = self._standardize_bound(self.high)
        flip = a > 0
        sign = torch.where(flip, -torch.ones_like(a), torch.ones_like(a))
        lo = torch.where(flip, -b, a)
        hi = torch.where(flip, -a, b)
        return sign, lo, hi

    def _terms(self):
        """What both cases need, each form fed only arguments valid for it.

        Returns ``(sign, a', b', log Z, tail, u, L, near)``. ``tail`` is ``None`` when both bounds or none
        are given (the general forms hold everywhere); otherwise it marks b' ≤ 0, where u = −b',
        log Z = −u²/2 + L and ``near`` is the bound in data units (``low`` when mirrored, else ``high``).
        Off the tail case u and L belong to a stand-in (u = 1) and must not be used.
        """
        sign, lo, hi = self._mirror()
        tail = (hi <= 0) if self._has_low != self._has_high else None
        lo_general, hi_general = lo, hi
        if tail is not None:  # log_ndtr's derivative overflows far out in the lower tail, even where unused
            lo_general = torch.where(tail, -torch.ones_like(lo), lo)
            hi_general = torch.where(tail, torch.ones_like(hi), hi)
        # log Φ(b') + log(1 − Φ(a')/Φ(b')). Where b' > 0, Φ(b') ≥ ½ and the second term is 0 in any float
        # format once a' < _NEGLIGIBLE_BOUND, so clamping a' there keeps its value and a finite derivative.
        lo_general = torch.where(hi_general > 0, lo_general.clamp(min=_NEGLIGIBLE_BOUND), lo_general)
        log_cdf_hi = torch.special.log_ndtr(hi_general)
        log_z = log_cdf_hi + log1mexp(torch.special.log_ndtr(lo_general) - log_cdf_hi)
        if tail is None:
            return sign, lo, hi, log_z, None, None, None, None
        u = torch.where(tail, -hi, torch.ones_like(hi))
        big_l = -_HALF_LOG_2PI - _log_hazard(u)
        log_z = torch.where(tail, -0.5 * u * u + big_l, log_z)
        near = torch.where(sign < 0, self.low, self.high)
        return sign, lo, hi, log_z, tail, u, big_l, near

    def _stable(self):
        """(sign, a', b', log Z) with Z' = sign·(X − loc)/scale supported on [a', b'] and b' ≤ 0 or a' ≤ 0."""
        return self._terms()[:4]

    @property
    def log_normalizer(self) -> torch.Tensor:
        """log(Φ(b) − Φ(a)): the log probability mass the bounds keep."""
        return self._stable()[3]

    def log_prob(self, value):
        if self._validate_args:
            self._validate_sample(value)
        sign, _, _, log_z, tail, u, big_l, near = self._terms()
        z = (value - self.loc) / self.scale
        inside = (value >= self.low) & (value <= self.high)
        log_density = _log_phi(z) - torch.log(self.scale) - log_z
        if tail is not None:
            # y = b' − z' measured from the bound itself, then log p = −uy − y²/2 − L − ½ log 2π − log scale
            y = sign * (torch.where(tail, near, value) - value) / self.scale
            log_density_tail = -u * y - 0.5 * y * y - big_l - _HALF_LOG_2PI - torch.log(self.scale)
            log_density = torch.where(tail, log_density_tail, log_density)
        return torch.where(inside, log_density, torch.full_like(log_density, -math.inf))

    def cdf(self, value):
        if self._validate_args:
            self._validate_sample(value)
        sign, lo, hi, log_z = self._stable()
        z = (sign * (value - self.loc) / self.scale).clamp(min=lo, max=hi)  # standardized, mirrored
        log_cdf_z = torch.special.log_ndtr(z)
        # mass of [a', z'] relative to Z; mirrored intervals measure the upper part, so take 1 − it
        mass = torch.exp(log_cdf_z + log1mexp(torch.special.log_ndtr(lo) - log_cdf_z) - log_z)
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
    def _moments(self):
        """(mean, variance, entropy): in the tail case E[Z'] = b' − d(u), Var[Z'] = v(u) and
        H = ½ log 2π + log scale + L + u·d(u) + ½(v(u) + d(u)²) (with d, v from :func:`_normal_excess`);
        otherwise E[Z'] = (φ(a') − φ(b'))/Z, Var[Z'] = 1 + (a'φ(a') − b'φ(b'))/Z − E[Z']² and
        H = ½ log(2πe) + log scale + log Z + (a'φ(a') − b'φ(b'))/(2Z).
        """
        sign, lo, hi, log_z, tail, u, big_l, near = self._terms()
        if tail is not None:  # the general forms get a stand-in interval where the tail case applies
            lo = torch.where(tail, -torch.ones_like(lo), lo)
            hi = torch.where(tail, torch.ones_like(hi), hi)
            log_z = torch.where(tail, torch.zeros_like(log_z), log_z)
        ratio_lo = torch.exp(_log_phi(lo) - log_z)  # φ(a')/Z, zero when a' = −∞
        ratio_hi = torch.exp(_log_phi(hi) - log_z)
        mean_std = ratio_lo - ratio_hi
        # a'φ(a')/Z − b'φ(b')/Z with 0·∞ read as 0 at infinite bounds
        lo_term = torch.where(torch.isfinite(lo), lo, torch.zeros_like(lo)) * ratio_lo
        hi_term = torch.where(torch.isfinite(hi), hi, torch.zeros_like(hi)) * ratio_hi
        second = lo_term - hi_term
        mean = self.loc + self.scale * sign * mean_std
        variance = self.scale**2 * (1 + second - mean_std**2)
        entropy = _HALF_LOG_2PI + 0.5 + torch.log(self.scale) + log_z + 0.5 * second
        if tail is not None:
            # Y = b' − Z' is the excess over u, so the mean lies d(u) inside the bound
            _, excess_mean, excess_variance = _normal_excess(u)
            near = torch.where(tail, near, torch.zeros_like(near))
            mean = torch.where(tail, near - self.scale * sign * excess_mean, mean)
            variance = torch.where(tail, self.scale**2 * excess_variance, variance)
            entropy_tail = (
                _HALF_LOG_2PI
                + torch.log(self.scale)
                + big_l
                + u * excess_mean
                + 0.5 * (excess_variance + excess_mean**2)
            )
            entropy = torch.where(tail, entropy_tail, entropy)
        return mean, variance.clamp(min=0), entropy

    @property
    def mean(self):
        return self._moments()[0]

    @property
    def variance(self):
        return self._moments()[1]

    def entropy(self):
        return self._moments()[2]


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
