r"""The exponential–Gaussian toy: a latent-variable model whose posterior and evidence are exact.

.. math::
    z \sim \mathrm{Exponential}(\lambda), \qquad x \mid z \sim \mathcal N(z, \sigma^2).

Completing the square in λe^{−λz}·N(x; z, σ²) gives the posterior and the evidence in closed form:

.. math::
    p(z \mid x) = \mathrm{TruncatedNormal}(m, \sigma; \text{low}=0), \quad m = x - \lambda\sigma^2,

    \log p(x) = \log\lambda - \lambda x + \tfrac12\lambda^2\sigma^2 + \log\Phi(a), \quad
    a = (x - \lambda\sigma^2)/\sigma.

For λ = σ = 1: p(x) = e^{1/2 − x} Φ(x − 1). When a ≪ 0 the terms λ²σ²/2 and log Φ(a) are huge and cancel
(both of order a²/2), so for a < 0 the evidence is evaluated in the equivalent form

.. math::
    \log p(x) = \log\lambda - \frac{x^2}{2\sigma^2} + \log\frac{\mathrm{erfcx}(-a/\sqrt2)}{2},

which follows from log Φ(a) = log(erfcx(−a/√2)/2) − a²/2 (erfcx(t) = e^{t²} erfc(t), the scaled
complementary error function, ``torch.special.erfcx``) and −λx + λ²σ²/2 − a²/2 = −x²/(2σ²). For a ≥ 0
the original form has no cancellation worth the name (−λx + λ²σ²/2 lies between −λx and −λx/2, and
log Φ(a) lies in [log ½, 0]) and is kept. The posterior's moments and density are equally free of
cancellation in the tail (see :mod:`pvae.distributions`). The tests hold both to a relative error of
1e-10 against 120-digit arithmetic for rate and scale in :data:`PARAMETER_RANGE` and x in [−10⁴, 10⁴];
the constructor refuses rate or scale outside that range.

Sites: ``"z"`` (latent) and ``"x"`` (observed), in ``pyro.plate("data", N)``; x has shape (N,).
``model(x=None, num_data=N)`` draws x at the same site from the prior predictive.
Guides (each takes the model's data ``x`` and its optional ``num_data``, :func:`pvae.family.data_plate`), from
exact to deliberately wrong:

- :meth:`ExponentialGaussian.exact_guide` — the true posterior: ELBO = log p(x) with zero variance;
- :meth:`ExponentialGaussian.meanfield_guide` — a TruncatedNormal with free parameters per datum (the right
  family, fitted by SVI);
- :meth:`ExponentialGaussian.lognormal_guide` — a LogNormal per datum (misspecified: its KL cannot reach 0);
- :meth:`ExponentialGaussian.amortized_guide` — a small network x ↦ (loc, scale) of a TruncatedNormal,
  shared across x (amortized inference).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import pyro
import pyro.distributions as dist
import torch
from pyro.distributions import constraints
from torch import nn

from pvae.checks import check_choice, check_finite, check_int
from pvae.distributions import TruncatedNormal
from pvae.family import Family, data_plate, register_family
from pvae.networks import mlp

__all__ = [
    "DEFAULT_AMORTIZED_STEPS",
    "DEFAULT_PER_DATUM_STEPS",
    "GUIDES",
    "PARAMETER_RANGE",
    "ExponentialGaussian",
    "ExponentialGaussianConfig",
    "check_parameter",
]

DEFAULT_AMORTIZED_STEPS = 2000
DEFAULT_PER_DATUM_STEPS = 1000
#: The toy's guides, from exact to deliberately wrong (each is the method ``<name>_guide``).
GUIDES = ("exact", "meanfield", "lognormal", "amortized")
# The closed interval of rate λ and scale σ the toy accepts: the box over which its exact formulas are
# tested (with x in [−1e4, 1e4]). Much further out the toy stops being computable at all: with σ far below
# the float spacing near x, ((x − z)/σ)² overflows in the likelihood for any z a guide can represent.
PARAMETER_RANGE = (1e-8, 1e8)


def check_parameter(name: str, value) -> float:
    """``value`` as a float, or a ``ValueError`` naming ``name`` unless it is a number in PARAMETER_RANGE."""
    low, high = PARAMETER_RANGE
    try:
        number = float(value)
    except (TypeError, ValueError) as error:
        raise ValueError(f"{name} must be a number in [{low:g}, {high:g}], got {value!r}") from error
    if not low <= number <= high:  # also False for NaN
        raise ValueError(
            f"{name} must be a number in [{low:g}, {high:g}] (where the toy's exact posterior and evidence "
            f"are accurate), got {value!r}"
        )
    return number


def _two_product(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(p, e) with p = fl(a·b) and p + e = a·b exactly (Dekker's product; |a|, |b| far from overflow)."""
    # Veltkamp's split of each factor into halves of at most ⌈t/2⌉ significant bits, t the dtype's precision
    digits = round(-math.log2(torch.finfo(a.dtype).eps)) + 1
    splitter = 2.0 ** math.ceil(digits / 2) + 1.0

    def split(v):
        c = splitter * v
        high = c - (c - v)
        return high, v - high

    product = a * b
    a_high, a_low = split(a)
    b_high, b_low = split(b)
    error = ((a_high * b_high - product) + a_high * b_low + a_low * b_high) + a_low * b_low
    return product, error


def _posterior_loc(x: torch.Tensor, rate: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """m = x − λσ², with λσ² carried in twice the working precision before the subtraction.

    Rounding λσ² first would leave m an absolute error of order ε·λσ², all of it relative error when
    x ≈ λσ² (a ≈ 0), where the posterior's mean and entropy are most sensitive to m/σ. With
    λσ² = p + e₁σ + e₂ from two exact products (λσ = p₁ + e₁, p₁σ = p + e₂), x − p is exact near
    cancellation (Sterbenz), so m keeps a relative error of a few ε.
    """
    p1, e1 = _two_product(rate, scale)
    p, e2 = _two_product(p1, scale)
    return (x - p) - (e2 + e1 * scale)


@dataclass
class ExponentialGaussianConfig:
    rate: float = 1.0
    scale: float = 1.0
    hidden_dim: int = 32
    name: str | None = None


@register_family("toy")
class ExponentialGaussian(Family):
    """z ~ Exponential(rate), x | z ~ Normal(z, scale), with exact posterior and evidence.

    :param rate: λ of the exponential prior, in :data:`PARAMETER_RANGE`.
    :param scale: σ of the Gaussian likelihood, in :data:`PARAMETER_RANGE`.
    :param hidden_dim: width of the amortized guide's network.
    :param name: prefix of this family's parameters in Pyro's param store (default: unique).
    """

    config_class = ExponentialGaussianConfig

    def __init__(self, rate: float = 1.0, scale: float = 1.0, hidden_dim: int = 32, name: str | None = None):
        super().__init__(name)
        self.rate = check_parameter("rate", rate)
        self.scale = check_parameter("scale", scale)
        hidden_dim = check_int("hidden_dim", hidden_dim)
        self.config = ExponentialGaussianConfig(
            rate=self.rate, scale=self.scale, hidden_dim=hidden_dim, name=self.name
        )
        # amortized guide: x ↦ (loc, log scale) = linear part + small MLP correction.
        # The exact map (x − λσ², log σ) is linear, so the skip path can represent it exactly.
        self.amortized_linear = nn.Linear(1, 2)
        self.amortized_mlp = mlp([1, hidden_dim, hidden_dim, 2], activation=nn.Tanh)
        with torch.no_grad():
            self.amortized_mlp[-1].weight.mul_(0.01)
            self.amortized_mlp[-1].bias.zero_()

    # ---- input validation --------------------------------------------------------------------------
    def _check(self, x: torch.Tensor) -> torch.Tensor:
        check_finite("x", x)
        if x.dim() != 1:
            raise ValueError(f"x must be a 1-D tensor of shape (N,), got shape {tuple(x.shape)}")
        return x

    def _constants(self, like: torch.Tensor):
        """λ and σ as 0-d tensors with the dtype and device of ``like``."""
        return like.new_tensor(self.rate), like.new_tensor(self.scale)

    # ---- the generative model and what is exact about it ---------------------------------------------
    def model(self, x: torch.Tensor | None = None, num_data: int | None = None) -> None:
        """z ~ Exponential(λ), x | z ~ Normal(z, σ); x: (N,) observed at site ``"x"``.

        With ``x=None`` and ``num_data=N``, x is drawn at the same site from the prior predictive (mean
        1/λ, variance 1/λ² + σ²), in the dtype and on the device of the family's parameters.
        """
        if x is not None:
            x = self._check(x)
        rate, scale = self._constants(x if x is not None else self.amortized_linear.weight)
        with data_plate(x, num_data, device=self.device):
            z = pyro.sample("z", dist.Exponential(rate))  # (N,) or (particles, N)
            pyro.sample("x", dist.Normal(z, scale), obs=x)

    @torch.no_grad()
    def sample(self, n: int, *, generator: torch.Generator | None = None) -> torch.Tensor:
        """``n`` draws of x from the prior predictive, (n,), in the dtype and on the device of the family's
        parameters: z ~ Exponential(λ), x = z + σ ε."""
        like = self.amortized_linear.weight
        z = like.new_empty(check_int("n", n)).exponential_(self.rate, generator=generator)
        return z + self.scale * torch.randn(n, generator=generator, dtype=like.dtype, device=like.device)

    def posterior(self, x: torch.Tensor) -> TruncatedNormal:
        """Exact p(z | x) = TruncatedNormal(x − λσ², σ, low=0), batch shape (N,).

        Its mean, variance, entropy and density stay accurate when λσ − x/σ (the standardized distance of
        the mode below 0) is huge: :class:`~pvae.distributions.TruncatedNormal` evaluates them relative to
        the bound there. Its samples and CDF do not have that guarantee (see :mod:`pvae.distributions`).
        """
        x = self._check(x)
        rate, scale = self._constants(x)
        return TruncatedNormal(_posterior_loc(x, rate, scale), scale.expand(x.shape), low=x.new_zeros(()))

    def log_marginal(self, x: torch.Tensor) -> torch.Tensor:
        r"""Exact log p(x), shape (N,): with a = (x − λσ²)/σ,

        .. math::
            \log p(x) = \begin{cases}
                \log\lambda - \lambda x + \tfrac12\lambda^2\sigma^2 + \log\Phi(a), & a \ge 0,\\
                \log\lambda - x^2/(2\sigma^2) + \log\big(\mathrm{erfcx}(-a/\sqrt2)/2\big), & a < 0,
            \end{cases}

        two forms of one function, each used where it has no cancellation (module docstring).
        """
        x = self._check(x)
        rate, scale = self._constants(x)
        a = _posterior_loc(x, rate, scale) / scale
        upper = a >= 0
        # each form only sees the a of its own side, so the one not taken cannot overflow into a NaN gradient
        a_upper = torch.where(upper, a, torch.zeros_like(a))
        a_lower = torch.where(upper, torch.zeros_like(a), a)
        direct = -rate * x + 0.5 * (rate * scale) ** 2 + torch.special.log_ndtr(a_upper)
        scaled = -0.5 * (x / scale) ** 2 + torch.log(0.5 * torch.special.erfcx(-a_lower / math.sqrt(2.0)))
        return torch.log(rate) + torch.where(upper, direct, scaled)

    # ---- guides --------------------------------------------------------------------------------------
    def exact_guide(self, x: torch.Tensor, num_data: int | None = None) -> None:
        """q(z | x) = p(z | x): the ELBO equals log p(x) with zero variance."""
        with data_plate(x, num_data):
            pyro.sample("z", self.posterior(x))

    def meanfield_guide(self, x: torch.Tensor, num_data: int | None = None) -> None:
        """A TruncatedNormal(loc_n, scale_n, low=0) with free parameters per datum (needs a fixed N)."""
        x = self._check(x)
        loc = pyro.param(f"{self.name}.meanfield_loc", lambda: x.detach().clone())
        scale = pyro.param(
            f"{self.name}.meanfield_scale", lambda: torch.ones_like(x), constraint=constraints.positive
        )
        self._check_per_datum(loc, x, "meanfield")
        with data_plate(x, num_data):
            pyro.sample("z", TruncatedNormal(loc, scale, low=x.new_zeros(())))

    def lognormal_guide(self, x: torch.Tensor, num_data: int | None = None) -> None:
        """A LogNormal(μ_n, s_n) per datum: positive support, wrong shape — its KL cannot reach 0."""
        x = self._check(x)
        loc = pyro.param(f"{self.name}.lognormal_loc", lambda: torch.zeros_like(x))
        scale = pyro.param(
            f"{self.name}.lognormal_scale", lambda: torch.full_like(x, 0.5), constraint=constraints.positive
        )
        self._check_per_datum(loc, x, "lognormal")
        with data_plate(x, num_data):
            pyro.sample("z", dist.LogNormal(loc, scale))

    def amortized_parameters(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The amortized network's (loc, scale) for each x: two (N,) tensors."""
        inputs = x.unsqueeze(-1).to(self.amortized_linear.weight.dtype)  # (N, 1)
        out = (self.amortized_linear(inputs) + self.amortized_mlp(inputs)).to(x.dtype)  # (N, 2)
        return out[..., 0], nn.functional.softplus(out[..., 1]) + 1e-4

    def amortized_guide(self, x: torch.Tensor, num_data: int | None = None) -> None:
        """q_φ(z | x) = TruncatedNormal(loc_φ(x), scale_φ(x), low=0), one network shared across all x."""
        x = self._check(x)
        pyro.module(f"{self.name}.amortized", self)
        loc, scale = self.amortized_parameters(x)
        with data_plate(x, num_data):
            pyro.sample("z", TruncatedNormal(loc, scale, low=x.new_zeros(())))

    def guide(self, x: torch.Tensor, num_data: int | None = None) -> None:
        """The family's default guide: the amortized one."""
        self.amortized_guide(x, num_data)

    def guide_named(self, name: str):
        """The guide called ``name``, one of :data:`GUIDES`."""
        check_choice("guide", name, GUIDES)
        return getattr(self, f"{name}_guide")

    @staticmethod
    def _check_per_datum(param: torch.Tensor, x: torch.Tensor, which: str) -> None:
        if param.shape != x.shape:
            raise ValueError(
                f"the {which} guide has one parameter per datum, fitted for {param.shape[0]} data points, "
                f"but x has shape {tuple(x.shape)}; fit a fresh family (or clear its params) for new data"
            )

    def fit_guide(
        self,
        name: str,
        x: torch.Tensor,
        num_steps: int | None = None,
        seed: int = 0,
        progress: bool = False,
        engine: str = "eager",
    ):
        """Fit the guide called ``name`` by SVI on Trace_ELBO with :func:`pvae.inference.fit`.

        This is the toy's recipe, not a hook of the family contract: the per-datum guides are fitted on
        ``x`` itself; the amortized guide on a grid of x over [−3, 5] (then used for any x). Adam's step
        size decays geometrically from 2e-2 to 1e-4 over the ``num_steps`` steps
        (``fit``'s ``lr_end``, the schedule ``train`` uses too), so the fitted
        guide settles instead of jittering with the Monte-Carlo gradient noise.

        :param name: one of :data:`GUIDES`; the exact guide has nothing to fit.
        :param num_steps: SVI steps (default :data:`DEFAULT_PER_DATUM_STEPS` per-datum,
            :data:`DEFAULT_AMORTIZED_STEPS` amortized; always 0 for ``"exact"``).
        :param engine: ``fit``'s step engine (``"compile"`` pays off on fits of about a thousand steps or
            more once Inductor's disk cache is warm; see the README).
        :returns: ``(guide, losses)``: the fitted guide function and the loss of each step.
        """
        from pvae.inference.svi import fit  # models need inference only to be fitted

        guide = self.guide_named(name)
        x = self._check(x)
        if num_steps is None:
            num_steps = DEFAULT_AMORTIZED_STEPS if name == "amortized" else DEFAULT_PER_DATUM_STEPS
        num_steps = 0 if name == "exact" else check_int("num_steps", num_steps, low=0)
        if num_steps == 0:
            return guide, []
        data = self.amortized_training_data(dtype=x.dtype, device=x.device) if name == "amortized" else x
        losses = fit(
            self.model,
            guide,
            data,
            num_steps=num_steps,
            lr=2e-2,
            lr_end=1e-4,
            seed=seed,
            progress=progress,
            engine=engine,
        )
        return guide, losses

    def amortized_training_data(
        self, num_points: int = 512, low: float = -3.0, high: float = 5.0, **tensor_kwargs
    ):
        """An evenly spread grid of x over [low, high] to train the amortized guide on, (num_points,)."""
        check_int("num_points", num_points, low=2)
        if not (math.isfinite(low) and math.isfinite(high) and low < high):
            raise ValueError(f"low and high must be finite numbers with low < high, got {low}, {high}")
        return torch.linspace(low, high, num_points, **tensor_kwargs)
