import math

import numpy as np
import pytest
import torch
from scipy import stats

from pvae.distributions import TruncatedNormal, log_ndtri

BOUNDS = [
    (-50.0, None),
    (50.0, None),
    (None, -50.0),
    (None, 50.0),
    (-50.0, -49.0),
    (49.0, 50.0),
    (-1.0, 2.0),
    (0.0, None),
    (-2.0, 40.0),
]


def _ids(bounds):
    return f"low={bounds[0]}-high={bounds[1]}"


@pytest.mark.parametrize("bounds", BOUNDS, ids=_ids)
def test_matches_scipy_in_both_tails(bounds):
    low, high = bounds
    loc, scale = 0.7, 1.3
    d = TruncatedNormal(
        torch.tensor(loc, dtype=torch.float64), scale, _shift(low, loc, scale), _shift(high, loc, scale)
    )
    reference = stats.truncnorm(-np.inf if low is None else low, np.inf if high is None else high, loc, scale)
    quantiles = np.array([0.01, 0.3, 0.5, 0.9, 0.99])
    x = torch.tensor(reference.ppf(quantiles))
    np.testing.assert_allclose(d.log_prob(x).numpy(), reference.logpdf(x.numpy()), rtol=1e-9, atol=1e-9)
    np.testing.assert_allclose(d.cdf(x).numpy(), quantiles, atol=1e-9)
    np.testing.assert_allclose(d.icdf(torch.tensor(quantiles)).numpy(), x.numpy(), rtol=1e-9, atol=1e-9)
    np.testing.assert_allclose(d.mean.item(), reference.mean(), rtol=1e-9)
    np.testing.assert_allclose(d.variance.item(), reference.var(), rtol=1e-6)
    samples = d.sample((20000,))
    assert torch.isfinite(samples).all()
    assert samples.min() >= d.low and samples.max() <= d.high
    z_score = (samples.mean().item() - reference.mean()) / (reference.std() / math.sqrt(len(samples)))
    assert abs(z_score) < 4.5


def _shift(bound, loc, scale):
    """Standardized bound → bound in data units."""
    return None if bound is None else loc + scale * bound


def test_entropy_matches_quadrature():
    from scipy import integrate

    for low, high in [(0.0, None), (-1.0, 2.0), (None, 0.5), (3.0, 3.5)]:
        d = TruncatedNormal(torch.tensor(0.2, dtype=torch.float64), 0.8, low, high)
        lo = -np.inf if low is None else low
        hi = np.inf if high is None else high

        def integrand(x, d=d):
            lp = d.log_prob(torch.tensor(x, dtype=torch.float64)).item()
            return -math.exp(lp) * lp

        reference, _ = integrate.quad(integrand, lo, hi)
        assert d.entropy().item() == pytest.approx(reference, abs=1e-7)


def test_log_ndtri_inverts_log_ndtr_far_into_the_tail():
    z = torch.tensor([-60.0, -38.0, -10.0, -1.0, 0.0, 1.0, 5.0, 8.0], dtype=torch.float64)
    np.testing.assert_allclose(log_ndtri(torch.special.log_ndtr(z)).numpy(), z.numpy(), rtol=1e-9, atol=1e-9)


def test_reparameterized_gradient_matches_gradient_of_mean():
    loc = torch.tensor(0.3, dtype=torch.float64, requires_grad=True)
    scale = torch.tensor(1.2, dtype=torch.float64, requires_grad=True)
    torch.manual_seed(0)
    sample_mean = TruncatedNormal(loc, scale, low=0.0).rsample((200_000,)).mean()
    pathwise = torch.autograd.grad(sample_mean, [loc, scale])
    exact = torch.autograd.grad(TruncatedNormal(loc, scale, low=0.0).mean, [loc, scale])
    for estimate, truth in zip(pathwise, exact):
        assert estimate.item() == pytest.approx(truth.item(), abs=0.01)


def test_gradients_are_finite_with_infinite_bounds():
    loc = torch.tensor(0.3, requires_grad=True)
    scale = torch.tensor(1.2, requires_grad=True)
    for low, high in [(0.0, None), (None, 0.0), (None, None), (40.0, None)]:
        d = TruncatedNormal(loc, scale, low, high)
        value = d.rsample((5,))
        total = value.sum() + d.mean + d.variance + d.entropy() + d.log_prob(value).sum()
        grads = torch.autograd.grad(total, [loc, scale])
        assert all(torch.isfinite(g) for g in grads), (low, high)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_follows_dtype_and_broadcasts(dtype):
    d = TruncatedNormal(torch.zeros(3, dtype=dtype), 1.0, low=torch.tensor([40.0, 0.0, -40.0], dtype=dtype))
    assert d.batch_shape == (3,)
    sample = d.sample((4,))
    assert sample.dtype == dtype and sample.shape == (4, 3)
    assert torch.isfinite(d.log_prob(sample)).all()
    assert d.mean.dtype == dtype
    np.testing.assert_allclose(d.mean.double().numpy(), [40.0249, math.sqrt(2 / math.pi), 0.0], atol=1e-3)
    expanded = d.expand((2, 3))
    assert expanded.batch_shape == (2, 3) and expanded.sample().shape == (2, 3)


def test_outside_support_is_rejected_or_minus_inf():
    d = TruncatedNormal(0.0, 1.0, low=0.0, validate_args=False)
    assert d.log_prob(torch.tensor(-0.5)) == -math.inf
    with pytest.raises(ValueError):
        TruncatedNormal(0.0, 1.0, low=0.0, validate_args=True).log_prob(torch.tensor(-0.5))


@pytest.mark.parametrize(
    "kwargs",
    [
        {"loc": 0.0, "scale": 0.0},
        {"loc": 0.0, "scale": -1.0},
        {"loc": float("nan"), "scale": 1.0},
        {"loc": 0.0, "scale": 1.0, "low": 1.0, "high": 1.0},
        {"loc": 0.0, "scale": 1.0, "low": 2.0, "high": 1.0},
    ],
    ids=["scale0", "scale-neg", "loc-nan", "low=high", "low>high"],
)
def test_bad_parameters_raise(kwargs):
    with pytest.raises(ValueError):
        TruncatedNormal(**kwargs)
