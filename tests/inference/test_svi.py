import pyro
import pyro.distributions as dist
import pyro.optim
import pytest
import torch
from pyro.infer import TraceMeanField_ELBO

from pvae.inference import fit


def model(x):
    with pyro.plate("data", x.shape[0]):
        z = pyro.sample("z", dist.Normal(torch.zeros_like(x), 1.0))
        pyro.sample("x", dist.Normal(z, 1.0), obs=x)


def guide(x):
    loc = pyro.param("loc", torch.zeros_like(x))
    scale = pyro.param("scale", torch.ones_like(x), constraint=dist.constraints.positive)
    with pyro.plate("data", x.shape[0]):
        pyro.sample("z", dist.Normal(loc, scale))


def test_fit_reaches_the_posterior_and_reports_every_step():
    x = torch.tensor([-1.0, 0.5, 2.0])
    optim = pyro.optim.ClippedAdam({"lr": 0.05, "lrd": 0.998})
    losses = fit(
        model, guide, x, num_steps=1500, optim=optim, loss=TraceMeanField_ELBO(), seed=0, progress=False
    )
    assert len(losses) == 1500
    # exact posterior N(x/2, 1/2)
    torch.testing.assert_close(pyro.param("loc").detach(), x / 2, atol=0.05, rtol=0)
    torch.testing.assert_close(pyro.param("scale").detach(), torch.full_like(x, 0.5**0.5), atol=0.05, rtol=0)
    assert sum(losses[-100:]) < sum(losses[:100])


def test_fit_is_reproducible_with_a_seed():
    x = torch.tensor([0.3, 1.0])
    first = fit(model, guide, x, num_steps=20, seed=3, progress=False)
    pyro.clear_param_store()
    second = fit(model, guide, x, num_steps=20, seed=3, progress=False)
    assert first == second


def test_fit_stops_on_non_finite_loss():
    def nan_model(x):
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("z", dist.Normal(torch.zeros_like(x), 1.0))
            pyro.factor("broken", z * 0 - float("inf"))  # log density −∞

    with pytest.raises(FloatingPointError, match="step 0"):
        fit(nan_model, guide, torch.zeros(2), num_steps=5, progress=False)


@pytest.mark.parametrize(
    "kwargs", [{"num_steps": 0}, {"num_steps": 2.5}, {"lr": 0.0}, {"lr": float("inf")}], ids=str
)
def test_fit_rejects_bad_arguments(kwargs):
    with pytest.raises(ValueError, match=r"num_steps|lr"):
        fit(model, guide, torch.zeros(2), **kwargs)
