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
    [
        {"num_steps": 0},
        {"num_steps": 2.5},
        {"lr": 0.0},
        {"lr": float("inf")},
        {"lr_end": -1.0},
        {"engine": "jit"},
        {"engine": "trace", "optim": pyro.optim.Adam({"lr": 0.1})},
    ],
    ids=lambda kwargs: ",".join(
        f"{key}={type(v).__name__ if key == 'optim' else v}" for key, v in kwargs.items()
    ),
)
def test_fit_rejects_bad_arguments(kwargs):
    with pytest.raises(ValueError, match=r"num_steps|lr|engine"):
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
    # SVIStep: one Adam over both parameters (loc, scale), stepped at the scheduled rate
    assert adam_rates == pytest.approx(expected, rel=1e-12)
    adam_rates.clear()
    fit(model, guide, x, num_steps=3, optim=scheduled_adam(1e-2, 1e-4, 6), progress=False)  # half of it
    # a Pyro optimizer runs through SVI.step: one Adam per parameter
    assert adam_rates == pytest.approx([rate for rate in expected[:3] for _ in range(2)], rel=1e-12)


def test_the_toys_fitting_recipe_uses_the_same_schedule(adam_rates):
    family = ExponentialGaussian()
    x = torch.tensor([-1.0, 2.0])
    family.fit_guide("meanfield", x, num_steps=4)
    expected = [scheduled_lr(2e-2, 1e-4, k, 4) for k in range(4)]
    assert adam_rates == pytest.approx(expected, rel=1e-12)


def test_fit_runs_the_same_step_as_stock_svi():
    """One fit step is Pyro's SVI.step with Adam: same loss, same updated parameters (same draws)."""
    x = torch.tensor([-1.0, 0.5, 2.0], dtype=torch.float64)
    fitted = fit(model, guide, x, num_steps=3, lr=0.1, seed=5, progress=False)
    loc, scale = pyro.param("loc").detach().clone(), pyro.param("scale").detach().clone()
    pyro.clear_param_store()
    stock = fit(model, guide, x, num_steps=3, seed=5, progress=False, optim=pyro.optim.Adam({"lr": 0.1}))
    assert fitted == pytest.approx(stock, rel=1e-12)
    torch.testing.assert_close(loc, pyro.param("loc").detach(), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(scale, pyro.param("scale").detach(), rtol=1e-12, atol=1e-12)


def test_fit_passes_keyword_arguments_to_model_and_guide():
    seen = []

    def shifted_model(x, *, shift):
        seen.append(("model", shift))
        model(x - shift)

    def shifted_guide(x, *, shift):
        seen.append(("guide", shift))
        guide(x - shift)

    fit(shifted_model, shifted_guide, torch.tensor([1.0, 2.0]), num_steps=2, progress=False, shift=1.0)
    assert seen and set(seen) == {("model", 1.0), ("guide", 1.0)}


@pytest.mark.parametrize("engine", ["eager", "trace"])
def test_fit_reaches_the_posterior_and_reports_every_step(engine):
    x = torch.tensor([-1.0, 0.5, 2.0])
    losses = fit(
        model,
        guide,
        x,
        num_steps=600,
        lr=0.05,
        lr_end=0.0025,
        loss=TraceMeanField_ELBO(),
        seed=0,
        progress=False,
        engine=engine,
    )
    assert len(losses) == 600 and all(isinstance(value, float) for value in losses)
    # exact posterior N(x/2, 1/2)
    torch.testing.assert_close(pyro.param("loc").detach(), x / 2, atol=0.05, rtol=0)
    torch.testing.assert_close(pyro.param("scale").detach(), torch.full_like(x, 0.5**0.5), atol=0.05, rtol=0)
    assert sum(losses[-100:]) < sum(losses[:100])


def test_trace_engine_takes_the_eager_engines_steps():
    """Same draws, same updates; the reported loss may differ in its last bits (eager Trace_ELBO adds
    ``surrogate − float(surrogate)`` to it, the recorded graph ``surrogate − surrogate``)."""
    x = torch.tensor([-1.0, 0.5, 2.0])
    eager = fit(model, guide, x, num_steps=20, lr=0.05, lr_end=0.01, seed=1, progress=False)
    loc, scale = pyro.param("loc").detach().clone(), pyro.param("scale").detach().clone()
    pyro.clear_param_store()
    traced = fit(model, guide, x, num_steps=20, lr=0.05, lr_end=0.01, seed=1, progress=False, engine="trace")
    assert traced == pytest.approx(eager, rel=1e-6)
    assert torch.equal(pyro.param("loc").detach(), loc) and torch.equal(pyro.param("scale").detach(), scale)


def test_fit_stops_on_a_loss_that_becomes_non_finite_and_keeps_the_last_parameters():
    def exploding_model(x):
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("z", dist.Normal(torch.zeros_like(x), 1.0))
            pyro.sample("x", dist.Normal(z, 1.0), obs=x)
            # finite while loc < 1, −∞ once the guide's mean has been pushed past it
            pyro.factor("wall", torch.where(pyro.param("loc") < 1.0, 0.0, -float("inf")))

    x = torch.tensor([20.0])
    with pytest.raises(
        FloatingPointError, match=r"SVI loss became (nan|-?inf) at step \d+; try a smaller lr"
    ):
        fit(exploding_model, guide, x, num_steps=500, lr=0.1, seed=0, progress=False)
    assert torch.isfinite(pyro.param("loc")).all() and pyro.param("loc").item() >= 1.0
