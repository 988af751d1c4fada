import math

import pyro
import pytest
import torch
from pyro.infer import Predictive, TraceEnum_ELBO, config_enumerate

from pvae.inference import compare, fit
from pvae.models.mixture import GaussianMixture


def _bayes_rule(family, x):
    """p(z = k | x) and log p(x) by hand: π_k Π_d N(x_d; μ_kd, σ_kd²), normalized."""
    x = x.reshape(x.shape[0], -1).to(torch.float64)
    log_joint = torch.stack(
        [
            math.log(family.weights[k])
            + torch.distributions.Normal(family.locs[k], family.scales[k]).log_prob(x).sum(-1)
            for k in range(family.num_components)
        ],
        dim=-1,
    )  # (N, K)
    return torch.softmax(log_joint, -1), torch.logsumexp(log_joint, -1)


@pytest.mark.parametrize(
    "kwargs",
    [{}, {"weights": (0.5, 0.5), "locs": ((0.0, 1.0), (2.0, -1.0)), "scales": ((1.0, 0.5), (0.3, 2.0))}],
    ids=["1-d, K=3", "2-d, K=2"],
)
def test_enumeration_equals_bayes_rule(kwargs):
    family = GaussianMixture(**kwargs)
    x, _ = family.sample_data(50, torch.Generator().manual_seed(1))
    probs, log_px = _bayes_rule(family, x)
    torch.testing.assert_close(family.posterior(x).probs, probs, atol=1e-6, rtol=0)
    torch.testing.assert_close(family.log_marginal(x), log_px, atol=1e-6, rtol=0)


def test_log_marginal_equals_trace_enum_elbo_with_empty_guide():
    family = GaussianMixture()
    x, _ = family.sample_data(30, torch.Generator().manual_seed(2))
    loss = TraceEnum_ELBO(max_plate_nesting=1).loss(config_enumerate(family.model), lambda x: None, x)
    assert -loss == pytest.approx(family.log_marginal(x).sum().item(), abs=1e-6)


def test_trained_categorical_guide_kl_is_reported_and_small():
    family = GaussianMixture()
    x, _ = family.sample_data(500, torch.Generator().manual_seed(0))
    fit(
        family.model,
        family.guide,
        x,
        num_steps=300,
        lr=3e-2,
        loss=TraceEnum_ELBO(max_plate_nesting=1),
        seed=0,
        progress=False,
    )
    grid = torch.linspace(-4, 5, 9, dtype=torch.float64)
    result = compare(
        family.model, family.guide, grid, posterior=family.posterior, log_marginal=family.log_marginal
    )
    assert result.kl_method == "analytic"
    assert result.per_datum["kl"].shape == (9,)
    assert 0 <= result.per_datum["kl"].mean().item() < 0.01, result.table()
    assert abs(result.gap - result.kl) <= 5 * result.elbo_stderr + 1e-3


def test_untrained_guide_is_far_from_the_posterior():
    family = GaussianMixture()
    grid = torch.linspace(-4, 5, 9)
    result = compare(
        family.model, family.guide, grid, posterior=family.posterior, log_marginal=family.log_marginal
    )
    assert result.kl > 1.0


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_follows_dtype(dtype):
    family = GaussianMixture()
    x = torch.tensor([0.0, 1.0], dtype=dtype)
    assert family.log_marginal(x).dtype == dtype
    assert family.posterior(x).probs.dtype == dtype
    assert pyro.poutine.trace(family.guide).get_trace(x).nodes["z"]["value"].dtype == dtype


@pytest.mark.parametrize(
    "kwargs",
    [
        {"weights": (1.0,), "locs": (0.0,), "scales": (1.0,)},
        {"weights": (0.5, -0.5)},
        {"weights": (0.5, 0.5), "locs": (0.0, 1.0), "scales": (1.0, 0.0)},
        {"weights": (0.5, 0.5), "locs": (0.0, 1.0, 2.0), "scales": (1.0, 1.0)},
        {"hidden_dim": 0},
    ],
    ids=["one-component", "negative-weight", "zero-scale", "shape-mismatch", "hidden_dim"],
)
def test_bad_parameters_raise(kwargs):
    with pytest.raises(ValueError):
        GaussianMixture(**kwargs)


def test_bad_data_raises():
    family = GaussianMixture()
    for bad in (torch.tensor([float("nan")]), torch.zeros(3, 2), torch.zeros(2, 2, 1)):
        with pytest.raises(ValueError, match="x"):
            family.log_marginal(bad)


@pytest.mark.parametrize("shape", [(0,), (0, 1)], ids=["empty-1d", "empty-2d"])
def test_empty_batch_raises(shape):
    """An empty batch used to fail with ZeroDivisionError inside pyro.plate."""
    family = GaussianMixture()
    x = torch.zeros(shape)
    for method in (family.model, family.guide, family.log_marginal, family.posterior):
        with pytest.raises(
            ValueError, match=r"x is an empty batch, shape \(0,.*a batch needs at least one datum"
        ):
            method(x)


@pytest.mark.parametrize("bad", [math.nan, math.inf], ids=["nan", "inf"])
def test_non_finite_data_are_counted(bad):
    family = GaussianMixture()
    x = torch.tensor([0.0, bad, 1.0, bad])
    for method in (family.model, family.guide, family.log_marginal, family.posterior):
        with pytest.raises(ValueError, match="x must be finite; it has 2 NaN/inf entries"):
            method(x)


# ---- the prior predictive ---------------------------------------------------------------------------------
def test_prior_predictive_has_the_mixtures_mean_and_components():
    """x ~ Σ_k π_k N(μ_k, σ_k²): mean Σ_k π_k μ_k, variance Σ_k π_k (σ_k² + μ_k²) − (Σ_k π_k μ_k)²."""
    family = GaussianMixture(
        weights=(0.5, 0.5), locs=((0.0, 1.0), (2.0, -1.0)), scales=((1.0, 0.5), (0.3, 2.0))
    )
    samples = Predictive(family.model, num_samples=100)(None, num_data=200)
    z, x = samples["z"], samples["x"]
    assert z.shape == (100, 200, 2) and x.shape == (100, 200, 2) and x.dtype == family.locs.dtype
    assert ((z == 0) | (z == 1)).all() and (z.sum(-1) == 1).all()  # one-hot
    n = 100 * 200
    frequencies = z.reshape(n, 2).mean(0)
    assert ((frequencies - family.weights).abs() < 4 * (0.25 / n) ** 0.5).all()
    weights = family.weights.unsqueeze(-1)  # (K, 1)
    mean = (weights * family.locs).sum(0)  # (D,)
    variance = (weights * (family.scales**2 + family.locs**2)).sum(0) - mean**2
    flat = x.reshape(n, 2)
    assert ((flat.mean(0) - mean).abs() < 4 * (variance / n).sqrt()).all(), (flat.mean(0), mean)
    standardized = (x - z @ family.locs) / (z @ family.scales)  # x | z ~ Normal(zᵀμ, zᵀσ)
    assert abs(standardized.std().item() - 1) < 4 / (2 * 2 * n) ** 0.5


def test_the_model_needs_data_or_a_number_of_draws():
    family = GaussianMixture()
    with pytest.raises(ValueError, match=r"pass the data x, or num_data=N"):
        family.model()
    with pytest.raises(ValueError, match=r"num_data=2 is the size of the data set x is a batch of"):
        family.model(torch.zeros(3), num_data=2)
