"""The IWAE-k objective on a conjugate Normal–Normal model with a known log p(x), and make_elbo."""

import math

import pyro
import pyro.distributions as dist
import pyro.poutine as poutine
import pytest
import torch
from pyro.infer import (
    JitTrace_ELBO,
    JitTraceMeanField_ELBO,
    RenyiELBO,
    Trace_ELBO,
    TraceMeanField_ELBO,
)

from pvae.inference.objectives import IWAE_ELBO, make_elbo

SCALE = 0.5  # likelihood std
X = torch.tensor([-1.7, -0.4, 0.0, 0.3, 1.1, 2.2, 3.0], dtype=torch.float64)


def model(x):
    """z ~ N(0, 1), x | z ~ N(z, SCALE²): log p(x) = log N(x; 0, 1 + SCALE²)."""
    with pyro.plate("data", x.shape[0]):
        z = pyro.sample("z", dist.Normal(x.new_zeros(()), 1.0))
        pyro.sample("x", dist.Normal(z, SCALE), obs=x)


def exact_log_marginal(x):
    return dist.Normal(x.new_zeros(()), x.new_tensor(1 + SCALE**2).sqrt()).log_prob(x)


def make_guide(shift=0.6, width=0.9):
    """A deliberately imperfect Gaussian guide around the exact posterior mean."""
    posterior_mean = X / (1 + SCALE**2)
    loc = (posterior_mean + shift).clone().requires_grad_()

    def guide(x):
        with pyro.plate("data", x.shape[0]):
            pyro.sample("z", dist.Normal(loc, width))

    return guide, loc


def _bound_draws(k, repeats=300):
    guide, _ = make_guide()
    elbo = IWAE_ELBO(num_particles=k)
    with torch.no_grad():
        return torch.stack([-elbo.differentiable_loss(model, guide, X) for _ in range(repeats)])


def test_iwae_bound_is_below_log_evidence_and_increases_with_k():
    exact = exact_log_marginal(X).sum().item()
    means, errors = [], []
    for k in (1, 5, 50):
        draws = _bound_draws(k)
        means.append(draws.mean().item())
        errors.append(draws.std().item() / math.sqrt(draws.numel()))
    for mean, error in zip(means, errors):
        assert mean + 3 * error < exact  # a strict lower bound for this imperfect guide
    for (low, low_error), (high, high_error) in zip(zip(means, errors), zip(means[1:], errors[1:])):
        assert high - low > 3 * math.hypot(low_error, high_error)
    assert exact - means[-1] < 0.25 * (exact - means[0])  # and it closes most of the gap by k = 50


def test_iwae_gradient_is_finite_and_points_to_the_posterior():
    guide, loc = make_guide(shift=1.5)
    elbo = IWAE_ELBO(num_particles=20)
    for _ in range(100):  # the mean of 100 single-draw gradients
        elbo.differentiable_loss(model, guide, X).backward()
    assert torch.isfinite(loc.grad).all()
    assert (loc.grad > 0).all()  # loc sits above the posterior mean: gradient descent lowers it


def test_iwae_equals_renyi_alpha_zero_per_datum_and_trace_elbo_for_one_particle():
    guide, _ = make_guide()
    for k in (4, 32):
        pyro.set_rng_seed(3)
        ours = IWAE_ELBO(num_particles=k).loss(model, guide, X)
        pyro.set_rng_seed(3)
        renyi = RenyiELBO(alpha=0, num_particles=k, vectorize_particles=True, max_plate_nesting=2)
        assert ours == pytest.approx(renyi.loss(model, guide, X), rel=1e-12)
    pyro.set_rng_seed(5)
    ours = IWAE_ELBO(num_particles=1).loss(model, guide, X)
    pyro.set_rng_seed(5)
    assert ours == pytest.approx(Trace_ELBO().loss(model, guide, X), rel=1e-12)


def test_iwae_is_per_datum_not_over_the_joint_weight():
    guide, _ = make_guide()
    elbo = IWAE_ELBO(num_particles=16)
    pyro.set_rng_seed(0)
    log_w, scale, per_datum = elbo.log_weights(model, guide, X)
    assert per_datum and scale == 1.0 and log_w.shape == (16, X.shape[0])
    pyro.set_rng_seed(0)
    loss = elbo.loss(model, guide, X)
    per_datum_bound = (torch.logsumexp(log_w, 0) - math.log(16)).sum().item()
    joint_bound = (torch.logsumexp(log_w.sum(1), 0) - math.log(16)).item()
    assert -loss == pytest.approx(per_datum_bound, rel=1e-12)
    assert per_datum_bound > joint_bound + 1.0  # the joint weight would be a much looser bound


def test_a_common_scale_multiplies_the_bound_after_the_log_mean_exp():
    guide, _ = make_guide()
    scaled_model, scaled_guide = poutine.scale(model, scale=3.0), poutine.scale(guide, scale=3.0)
    pyro.set_rng_seed(1)
    plain = IWAE_ELBO(num_particles=8).loss(model, guide, X)
    pyro.set_rng_seed(1)
    scaled = IWAE_ELBO(num_particles=8).loss(scaled_model, scaled_guide, X)
    assert scaled == pytest.approx(3.0 * plain, rel=1e-12)
    pyro.set_rng_seed(1)  # Pyro's RenyiELBO scales the log-weights inside the log-mean-exp instead
    renyi = RenyiELBO(alpha=0, num_particles=8, vectorize_particles=True, max_plate_nesting=2)
    assert renyi.loss(scaled_model, scaled_guide, X) != pytest.approx(scaled, rel=1e-3)
    with pytest.raises(ValueError, match="common scale"):
        IWAE_ELBO(num_particles=8).loss(model, scaled_guide, X)


def test_a_global_latent_makes_the_bound_joint():
    def global_model(x):
        shift = pyro.sample("shift", dist.Normal(x.new_zeros(()), 1.0))
        with pyro.plate("data", x.shape[0]):
            pyro.sample("x", dist.Normal(shift, 1.0), obs=x)

    def global_guide(x):
        pyro.sample("shift", dist.Normal(x.new_tensor(0.5), 0.3))

    elbo = IWAE_ELBO(num_particles=10)
    pyro.set_rng_seed(2)
    log_w, _, per_datum = elbo.log_weights(global_model, global_guide, X)
    assert not per_datum and log_w.shape == (10, 1)
    pyro.set_rng_seed(2)
    ours = elbo.loss(global_model, global_guide, X)
    pyro.set_rng_seed(2)
    renyi = RenyiELBO(alpha=0, num_particles=10, vectorize_particles=True, max_plate_nesting=2)
    assert ours == pytest.approx(renyi.loss(global_model, global_guide, X), rel=1e-12)


def test_guessing_the_plate_nesting_leaves_the_random_stream_alone():
    guide, _ = make_guide()
    pyro.set_rng_seed(7)
    IWAE_ELBO(num_particles=4).loss(model, guide, X)  # guesses nesting, then draws
    after_guess = torch.rand(3)
    pyro.set_rng_seed(7)
    IWAE_ELBO(num_particles=4, max_plate_nesting=1).loss(model, guide, X)  # draws only
    assert torch.equal(after_guess, torch.rand(3))


def test_non_reparameterized_guide_sites_are_refused():
    def coin_model(x):
        with pyro.plate("data", x.shape[0]):
            pyro.sample("c", dist.Bernoulli(x.new_tensor(0.5)))

    def coin_guide(x):
        with pyro.plate("data", x.shape[0]):
            pyro.sample("c", dist.Bernoulli(x.new_tensor(0.3)))

    with pytest.raises(ValueError, match="reparameterized"):
        IWAE_ELBO(num_particles=3).loss(coin_model, coin_guide, X)


@pytest.mark.parametrize(
    "objective, jit, cls",
    [
        ("elbo", False, Trace_ELBO),
        ("meanfield", False, TraceMeanField_ELBO),
        ("iwae", False, IWAE_ELBO),
        ("elbo", True, JitTrace_ELBO),
        ("meanfield", True, JitTraceMeanField_ELBO),
    ],
    ids=["elbo", "meanfield", "iwae", "elbo-jit", "meanfield-jit"],
)
def test_make_elbo_names(objective, jit, cls):
    elbo = make_elbo(objective, num_particles=3, jit=jit)
    assert type(elbo) is cls and elbo.num_particles == 3


def test_make_elbo_passes_instances_and_rejects_bad_input():
    instance = TraceMeanField_ELBO()
    assert make_elbo(instance) is instance
    with pytest.raises(ValueError, match="objective must be one of"):
        make_elbo("kl")
    with pytest.raises(ValueError, match="num_particles"):
        make_elbo("iwae", num_particles=0)
    with pytest.raises(ValueError, match="jit"):
        make_elbo("iwae", num_particles=5, jit=True)
