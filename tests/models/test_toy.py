import math

import numpy as np
import pyro
import pytest
import torch
from scipy import integrate

from pvae.inference import compare, fit
from pvae.models.toy import ExponentialGaussian
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
    assert naive == 0.0  # what the first seed meant by "cannot be computed"


def test_seed_closed_form_for_unit_parameters():
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
    guide, data, num_steps, optimizer = family.svi_setup(name, x)
    with torch_threads(1):  # scalars: intra-op threads only slow SVI down
        fit(family.model, guide, data, num_steps=num_steps, optim=optimizer, seed=seed, progress=False)
    return guide


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
    for guide in family.guides().values():
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
