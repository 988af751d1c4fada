"""evaluate_log_likelihood: exact on a conjugate model with its exact posterior as guide, bounded memory."""

import math

import pyro
import pyro.distributions as dist
import pytest
import torch

from pvae.inference import evaluate_log_likelihood
from pvae.models.ae import AE

SCALE = 0.5


def model(x):
    """z ~ N(0, 1), x | z ~ N(z, SCALE²)."""
    with pyro.plate("data", x.shape[0]):
        z = pyro.sample("z", dist.Normal(x.new_zeros(()), 1.0))
        pyro.sample("x", dist.Normal(z, SCALE), obs=x)


def exact_guide(x):
    """The exact posterior N(x/(1+s²), s²/(1+s²)): every importance weight equals p(x)."""
    with pyro.plate("data", x.shape[0]):
        pyro.sample("z", dist.Normal(x / (1 + SCALE**2), SCALE / math.sqrt(1 + SCALE**2)))


def exact_log_marginal(x):
    return dist.Normal(x.new_zeros(()), x.new_tensor(1 + SCALE**2).sqrt()).log_prob(x)


def test_exact_guide_gives_the_exact_mean_and_standard_error():
    generator = torch.Generator().manual_seed(0)
    x = 2 * torch.randn(30, dtype=torch.float64, generator=generator)
    loader = [(x[:13], None), (x[13:],)]  # any iterable of (x, labels) or (x,) batches
    result = evaluate_log_likelihood((model, exact_guide), loader, num_samples=50, particles_per_batch=7)
    exact = exact_log_marginal(x)
    torch.testing.assert_close(result.per_image, exact, rtol=0, atol=1e-10)
    assert result.log_likelihood == pytest.approx(exact.mean().item(), abs=1e-10)
    assert result.stderr == pytest.approx(exact.std().item() / math.sqrt(30), rel=1e-9)
    assert result.to_dict() == {
        "log_likelihood": result.log_likelihood,
        "stderr": result.stderr,
        "num_images": 30,
        "num_samples": 50,
    }
    assert "nats per image" in str(result)


def test_imperfect_guide_is_below_and_tightens_with_k():
    def guide(x):
        with pyro.plate("data", x.shape[0]):
            pyro.sample("z", dist.Normal(x / (1 + SCALE**2) + 0.5, 0.6))

    x = torch.linspace(-2, 3, 40, dtype=torch.float64)
    exact = exact_log_marginal(x).mean().item()
    few = evaluate_log_likelihood((model, guide), [x], num_samples=2, seed=0).log_likelihood
    many = evaluate_log_likelihood((model, guide), [x], num_samples=2000, seed=0).log_likelihood
    assert few < many < exact + 1e-3
    assert exact - many < 0.05


def test_autoencoders_have_no_marginal_likelihood():
    ae = AE(x_dim=5, hidden_dim=4, z_dim=2)
    with pytest.raises(ValueError, match="point mass"):
        evaluate_log_likelihood(ae, [torch.rand(3, 5)], num_samples=4)


def test_bad_arguments_raise():
    with pytest.raises(ValueError, match="num_samples"):
        evaluate_log_likelihood((model, exact_guide), [torch.zeros(2)], num_samples=0)
    with pytest.raises(ValueError, match="model"):
        evaluate_log_likelihood(object(), [torch.zeros(2)])
    with pytest.raises(ValueError, match="no data"):
        evaluate_log_likelihood((model, exact_guide), [])
