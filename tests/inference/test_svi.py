import pyro
import pyro.distributions as dist
import pyro.optim
import pytest
import torch
from pyro.infer import TraceMeanField_ELBO

from pvae.inference import fit, scheduled_adam, scheduled_lr
from pvae.models.toy import ExponentialGaussian


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
    losses = fit(
        model,
        guide,
        x,
        num_steps=1500,
        lr=0.05,
        lr_end=0.0025,
        loss=TraceMeanField_ELBO(),
        seed=0,
        progress=False,
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

    with pytest.raises(FloatingPointError, match="at the first step, before any update"):
        fit(nan_model, guide, torch.zeros(2), num_steps=5, progress=False)


@pytest.mark.parametrize(
    "kwargs",
    [{"num_steps": 0}, {"num_steps": 2.5}, {"lr": 0.0}, {"lr": float("inf")}, {"lr_end": -1.0}],
    ids=str,
)
def test_fit_rejects_bad_arguments(kwargs):
    with pytest.raises(ValueError, match=r"num_steps|lr"):
        fit(model, guide, torch.zeros(2), **kwargs)


@pytest.fixture
def adam_rates(monkeypatch):
    """The learning rate of every torch Adam step taken, in order."""
    rates = []
    step = torch.optim.Adam.step

    def recording(self, *args, **kwargs):
        rates.append(self.param_groups[0]["lr"])
        return step(self, *args, **kwargs)

    monkeypatch.setattr(torch.optim.Adam, "step", recording)
    return rates


def test_fit_decays_the_rate_on_trains_geometric_schedule(adam_rates):
    x = torch.tensor([0.3, 1.0])
    fit(model, guide, x, num_steps=6, lr=1e-2, lr_end=1e-4, progress=False)
    expected = [scheduled_lr(1e-2, 1e-4, k, 6) for k in range(6)]
    assert expected[0] == 1e-2 and expected[-1] == pytest.approx(1e-4)
    # one Adam per parameter (loc, scale), both stepped at the scheduled rate
    assert adam_rates == pytest.approx([rate for rate in expected for _ in range(2)], rel=1e-12)
    adam_rates.clear()
    fit(model, guide, x, num_steps=3, optim=scheduled_adam(1e-2, 1e-4, 6), progress=False)  # half of it
    assert adam_rates == pytest.approx([rate for rate in expected[:3] for _ in range(2)], rel=1e-12)


def test_the_toys_fitting_recipe_uses_the_same_schedule(adam_rates):
    family = ExponentialGaussian()
    x = torch.tensor([-1.0, 2.0])
    family.fit_guide("meanfield", x, num_steps=4)
    expected = [scheduled_lr(2e-2, 1e-4, k, 4) for k in range(4)]
    assert adam_rates == pytest.approx([rate for rate in expected for _ in range(2)], rel=1e-12)
