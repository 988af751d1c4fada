import math

import mpmath
import numpy as np
import pyro
import pytest
import torch
from pyro.infer import Predictive
from scipy import integrate

from pvae.inference import compare
from pvae.models.toy import GUIDES, ExponentialGaussian
from pvae.utils import torch_threads

PARAMS = [(1.0, 1.0), (0.5, 2.0), (3.0, 0.4)]


def _log_joint(z, x, rate, scale):
    return (
        math.log(rate)
        - rate * z
        - 0.5 * ((x - z) / scale) ** 2
        - math.log(scale)
        - 0.5 * math.log(2 * math.pi)
    )


def _log_marginal_by_quadrature(x, rate, scale):
    """log ∫_0^∞ p(x, z) dz, integrating exp(log p(x, z) − c) around the posterior mode to keep it O(1)."""
    mode = max(x - rate * scale**2, 0.0)
    shift = _log_joint(mode, x, rate, scale)
    value, _ = integrate.quad(
        lambda z: math.exp(_log_joint(z, x, rate, scale) - shift),
        0,
        np.inf,
        points=None,
        epsabs=0,
        epsrel=1e-13,
        limit=500,
    )
    return shift + math.log(value)


@pytest.mark.parametrize("rate,scale", PARAMS, ids=lambda v: f"{v}")
def test_log_marginal_matches_quadrature(rate, scale):
    family = ExponentialGaussian(rate, scale)
    x = torch.linspace(-10, 10, 41, dtype=torch.float64)
    exact = family.log_marginal(x)
    reference = torch.tensor(
        [_log_marginal_by_quadrature(v, rate, scale) for v in x.tolist()], dtype=torch.float64
    )
    assert (exact - reference).abs().max().item() <= 1e-6


def test_log_marginal_is_finite_and_right_far_out():
    family = ExponentialGaussian(1.0, 1.0)
    x = torch.linspace(-40, 40, 161, dtype=torch.float64)
    value = family.log_marginal(x)
    assert torch.isfinite(value).all()
    # far right, Φ → 1: log p(x) → log λ − λx + λ²σ²/2 = 0.5 − x
    assert value[-1].item() == pytest.approx(0.5 - 40.0, abs=1e-12)
    # far left, the shifted quadrature still works where the naive integral underflows to 0
    assert value[0].item() == pytest.approx(_log_marginal_by_quadrature(-40.0, 1.0, 1.0), abs=1e-6)
    naive, _ = integrate.quad(lambda z: math.exp(_log_joint(z, -40.0, 1.0, 1.0)), 0, np.inf)
    assert naive == 0.0  # the naive integral underflows: why log p(x) needs the closed form


def test_closed_form_for_unit_parameters():
    x = torch.tensor([-1.0, 0.0, 2.5], dtype=torch.float64)
    expected = torch.exp(0.5 - x) * torch.special.ndtr(x - 1)  # p(x) = e^{1/2 − x} Φ(x − 1)
    torch.testing.assert_close(ExponentialGaussian().log_marginal(x).exp(), expected)


@pytest.mark.parametrize("rate,scale", PARAMS, ids=lambda v: f"{v}")
def test_posterior_is_bayes_rule(rate, scale):
    family = ExponentialGaussian(rate, scale)
    x = torch.tensor([-2.0, 0.3, 4.0], dtype=torch.float64)
    z = torch.tensor([[0.01], [0.5], [2.0], [7.0]], dtype=torch.float64)  # (4, 1) against (3,)
    rate_t, scale_t = torch.tensor(rate, dtype=torch.float64), torch.tensor(scale, dtype=torch.float64)
    prior, likelihood = torch.distributions.Exponential(rate_t), torch.distributions.Normal(z, scale_t)
    log_joint = prior.log_prob(z) + likelihood.log_prob(x)
    bayes = log_joint - family.log_marginal(x)
    torch.testing.assert_close(family.posterior(x).log_prob(z), bayes, atol=1e-10, rtol=0)


def test_exact_guide_elbo_equals_log_evidence_with_zero_spread():
    family = ExponentialGaussian(1.0, 1.0)
    x = torch.linspace(-3, 5, 9, dtype=torch.float64)
    result = compare(
        family.model, family.exact_guide, x, posterior=family.posterior, log_marginal=family.log_marginal
    )
    torch.testing.assert_close(result.per_datum["elbo"], family.log_marginal(x), atol=1e-6, rtol=0)
    assert abs(result.gap) <= 1e-6 and abs(result.kl) <= 1e-10
    assert result.elbo_stderr <= 1e-10


def _fit(family, name, x, seed=0):
    with torch_threads(1):  # scalars: intra-op threads only slow SVI down
        return family.fit_guide(name, x, seed=seed)[0]


def test_amortized_guide_reaches_small_kl_with_default_steps():
    family = ExponentialGaussian(1.0, 1.0)
    x = torch.arange(-3.0, 6.0)
    guide = _fit(family, "amortized", x)
    result = compare(family.model, guide, x, posterior=family.posterior, log_marginal=family.log_marginal)
    assert result.kl_method == "analytic"
    mean_kl = result.per_datum["kl"].mean().item()
    assert 0 <= mean_kl <= 1e-3, result.table()
    # the gap (Monte Carlo, exact evidence) is the same KL up to its noise
    assert abs(result.gap - result.kl) <= 5 * result.elbo_stderr


def test_meanfield_fits_and_lognormal_keeps_a_gap():
    x = torch.tensor([-2.0, 0.5, 3.0])
    family = ExponentialGaussian()
    meanfield = compare(
        family.model,
        _fit(family, "meanfield", x),
        x,
        posterior=family.posterior,
        log_marginal=family.log_marginal,
    )
    lognormal = compare(
        family.model,
        _fit(family, "lognormal", x),
        x,
        posterior=family.posterior,
        log_marginal=family.log_marginal,
    )
    assert lognormal.kl_method == "monte-carlo"
    assert meanfield.per_datum["kl"].max().item() < 0.02
    assert lognormal.kl > 0.1 > meanfield.kl  # the wrong family cannot close the gap


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_follows_dtype(dtype):
    family = ExponentialGaussian()
    x = torch.tensor([0.0, 1.0], dtype=dtype)
    assert family.log_marginal(x).dtype == dtype
    assert family.posterior(x).sample().dtype == dtype
    trace = pyro.poutine.trace(family.model).get_trace(x)
    assert trace.nodes["z"]["value"].dtype == dtype
    for guide in map(family.guide_named, GUIDES):
        assert pyro.poutine.trace(guide).get_trace(x).nodes["z"]["value"].dtype == dtype


@pytest.mark.parametrize(
    "x",
    [
        torch.tensor([0.0, float("nan")]),
        torch.tensor([float("inf")]),
        torch.zeros(2, 2),
        torch.tensor([1, 2]),
    ],
    ids=["nan", "inf", "2-d", "integer"],
)
def test_bad_data_raises(x):
    family = ExponentialGaussian()
    for method in (family.model, family.posterior, family.log_marginal, family.amortized_guide):
        with pytest.raises(ValueError, match="x"):
            method(x)


@pytest.mark.parametrize(
    "kwargs", [{"rate": 0.0}, {"rate": -1.0}, {"scale": 0.0}, {"scale": float("nan")}], ids=str
)
def test_bad_parameters_raise(kwargs):
    with pytest.raises(ValueError, match=r"rate|scale"):
        ExponentialGaussian(**kwargs)


# ---- accuracy across the supported box, against 120-digit arithmetic ---------------------------------------
# rate λ and scale σ on the decades of [1e-8, 1e8], x across [−1e4, 1e4]; for every (λ, σ) whose posterior
# loc λσ² is within the x range, also x = λσ² + kσ, which puts a = (x − λσ²)/σ near 0, where log p(x)
# switches between its two forms.
BOX_DECADES = (1e-8, 1e-4, 1.0, 1e4, 1e8)
BOX_X = (-1e4, -30.0, -1.0, 0.0, 0.5, 1.0, 30.0, 1e4)
TRANSITION_STEPS = (-3.0, -0.5, 0.0, 0.5, 3.0)
BOX = [(rate, scale) for rate in BOX_DECADES for scale in BOX_DECADES]
# Relative error, with an absolute floor for values near 0 (a log density or entropy can cross 0, where a
# relative error means nothing): |computed − exact| ≤ 1e-10 · max(1, |exact|).
BOX_TOLERANCE = 1e-10


def _box_x(rate, scale):
    xs = list(BOX_X)
    centre = rate * scale**2
    xs += [centre + k * scale for k in TRANSITION_STEPS if abs(centre + k * scale) <= 1e4]
    return torch.tensor(xs, dtype=torch.float64)


def _exact_toy(rate, scale, x):
    """log p(x) and the posterior's mean, variance and entropy at 120 digits, from the textbook forms.

    With m = x − λσ² and a = m/σ the posterior is Normal(m, σ²) truncated to z ≥ 0, and h = φ(a)/Φ(a):
    log p(x) = log λ − λx + λ²σ²/2 + log Φ(a), mean = m + σh, variance = σ²(1 − ah − h²),
    entropy = ½ log(2πe) + log σ + log Φ(a) − ah/2. The cancellations in these forms (up to 64 digits
    when |a| is near 1e16) are harmless at 120 digits.
    """
    with mpmath.workdps(120):
        lam, s, x = mpmath.mpf(rate), mpmath.mpf(scale), mpmath.mpf(x)
        m = x - lam * s**2
        a = m / s
        cdf = mpmath.ncdf(a)
        h = mpmath.npdf(a) / cdf
        return {
            "log_marginal": mpmath.log(lam) - lam * x + (lam * s) ** 2 / 2 + mpmath.log(cdf),
            "mean": m + s * h,
            "variance": s**2 * (1 - a * h - h**2),
            "entropy": mpmath.log(2 * mpmath.pi * mpmath.e) / 2 + mpmath.log(s) + mpmath.log(cdf) - a * h / 2,
        }


def _exact_truncated_log_density(loc, scale, z):
    """log of Normal(loc, scale²) truncated to [0, ∞) at z, at 120 digits."""
    with mpmath.workdps(120):
        loc, s, z = mpmath.mpf(loc), mpmath.mpf(scale), mpmath.mpf(z)
        return (
            -(((z - loc) / s) ** 2) / 2
            - mpmath.log(2 * mpmath.pi) / 2
            - mpmath.log(s)
            - mpmath.log(mpmath.ncdf(loc / s))
        )


def _box_error(computed, exact):
    """|computed − exact| / max(1, |exact|), the error the box's tolerance bounds."""
    with mpmath.workdps(120):
        return float(abs(mpmath.mpf(computed) - exact) / max(1, abs(exact)))


@pytest.mark.parametrize("rate,scale", BOX, ids=lambda v: f"{v:g}")
def test_exact_formulas_are_accurate_across_the_box(rate, scale):
    family = ExponentialGaussian(rate, scale)
    x = _box_x(rate, scale)
    log_marginal = family.log_marginal(x)
    posterior = family.posterior(x)
    computed = {
        "log_marginal": log_marginal,
        "mean": posterior.mean,
        "variance": posterior.variance,
        "entropy": posterior.entropy(),
    }
    for name, values in computed.items():
        assert torch.isfinite(values).all(), (name, values)
    assert (posterior.variance > 0).all()
    failures = []
    for index, value in enumerate(x.tolist()):
        exact = _exact_toy(rate, scale, value)
        for name, values in computed.items():
            error = _box_error(values[index].item(), exact[name])
            if not error <= BOX_TOLERANCE:
                failures.append((name, value, error))
    assert not failures, failures


@pytest.mark.parametrize("rate,scale", BOX, ids=lambda v: f"{v:g}")
def test_posterior_log_density_is_accurate_across_the_box(rate, scale):
    # The reference is the density of the posterior's own float64 parameters: its loc x − λσ² is rounded
    # once, and near z ≈ x with x/σ as large as 1e12 that rounding alone moves the exact density by more
    # than the tolerance. What is tested here is that TruncatedNormal evaluates its density accurately.
    family = ExponentialGaussian(rate, scale)
    x = _box_x(rate, scale)
    posterior = family.posterior(x)
    mean = torch.tensor([float(_exact_toy(rate, scale, value)["mean"]) for value in x.tolist()])
    z = torch.stack([mean / 2, mean, mean + scale]).to(x.dtype)  # (3, N): below, at and above the mean
    log_density = posterior.log_prob(z)
    assert torch.isfinite(log_density).all()
    failures = []
    for row, column in np.ndindex(*z.shape):
        exact = _exact_truncated_log_density(posterior.loc[column].item(), scale, z[row, column].item())
        error = _box_error(log_density[row, column].item(), exact)
        if not error <= BOX_TOLERANCE:
            failures.append((x[column].item(), z[row, column].item(), error))
    assert not failures, failures


def test_gradients_are_finite_across_the_box():
    # torch.where selects one of two forms per element; the form not taken must not leak a NaN gradient.
    for rate, scale in BOX:
        family = ExponentialGaussian(rate, scale)
        x = _box_x(rate, scale).requires_grad_()
        posterior = family.posterior(x)
        total = family.log_marginal(x).sum() + posterior.mean.sum() + posterior.entropy().sum()
        (gradient,) = torch.autograd.grad(total, [x])
        assert torch.isfinite(gradient).all(), (rate, scale, gradient)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_finite_at_the_corners_of_the_box(dtype):
    for rate in (1e-8, 1e8):
        for scale in (1e-8, 1e8):
            family = ExponentialGaussian(rate, scale)
            x = torch.tensor([-1e4, 0.0, 1e4], dtype=dtype)
            posterior = family.posterior(x)
            for values in (family.log_marginal(x), posterior.mean, posterior.variance, posterior.entropy()):
                assert values.dtype == dtype and torch.isfinite(values).all(), (rate, scale, values)


@pytest.mark.parametrize(
    "kwargs",
    [{"rate": 1e-9}, {"rate": 1e9}, {"scale": 1e-300}, {"scale": 1e9}, {"rate": math.inf}],
    ids=str,
)
def test_parameters_outside_the_box_are_rejected(kwargs):
    name = next(iter(kwargs))
    with pytest.raises(ValueError, match=rf"{name} must be .*\[1e-08, 1e\+08\]"):
        ExponentialGaussian(**kwargs)


def test_the_edges_of_the_box_are_accepted():
    for value in (1e-8, 1e8):
        family = ExponentialGaussian(rate=value, scale=value)
        assert family.rate == value and family.scale == value


# ---- the prior predictive ---------------------------------------------------------------------------------
def test_prior_predictive_has_the_moments_of_exponential_plus_gaussian():
    """x = z + σε with z ~ Exponential(λ): mean 1/λ, variance 1/λ² + σ² (fourth central moment
    9/λ⁴ + 6σ²/λ² + 3σ⁴ sets the spread of the sample variance)."""
    rate, scale = 2.0, 0.5
    family = ExponentialGaussian(rate, scale).double()
    samples = Predictive(family.model, num_samples=200)(None, num_data=100)
    assert samples["x"].shape == samples["z"].shape == (200, 100)
    assert samples["x"].dtype == torch.float64 and (samples["z"] >= 0).all()
    x = samples["x"].flatten()  # 20,000 independent draws
    n, mean, variance = x.numel(), 1 / rate, 1 / rate**2 + scale**2
    fourth = 9 / rate**4 + 6 * scale**2 / rate**2 + 3 * scale**4
    assert abs(x.mean().item() - mean) < 4 * math.sqrt(variance / n)
    assert abs(x.var().item() - variance) < 4 * math.sqrt((fourth - variance**2) / n)
    noise = (samples["x"] - samples["z"]) / scale  # x | z ~ Normal(z, σ)
    assert abs(noise.mean().item()) < 4 / math.sqrt(n) and abs(noise.std().item() - 1) < 4 / math.sqrt(2 * n)


def test_the_model_needs_data_or_a_number_of_draws():
    family = ExponentialGaussian()
    with pytest.raises(ValueError, match=r"pass the data x, or num_data=N"):
        family.model()
    with pytest.raises(ValueError, match=r"num_data=1 is the size of the data set x is a batch of"):
        family.model(torch.zeros(2), num_data=1)
    with pytest.raises(ValueError, match="num_data must be a positive integer"):
        family.model(None, num_data=0)
    family.model(torch.zeros(2), num_data=2)  # the batch is the data set: fine
