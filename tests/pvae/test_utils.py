import math

import mpmath
import pyro
import pyro.distributions as dist
import pyro.poutine as poutine
import pytest
import torch

from pvae import checks
from pvae.checks import check_choice, check_int, check_probability
from pvae.family import data_plate
from pvae.utils import (
    check_finite,
    check_positive,
    log1mexp,
    resolve_device,
    seed_everything,
    torch_threads,
    unique_name,
)


def test_seed_everything_makes_draws_repeat():
    seed_everything(5)
    first = torch.randn(3)
    generator = seed_everything(5)
    assert torch.equal(first, torch.randn(3))
    assert torch.equal(torch.rand(2, generator=generator), torch.rand(2, generator=seed_everything(5)))
    with pytest.raises(ValueError, match="seed"):
        seed_everything(-1)


def test_torch_threads_restores_the_setting():
    before = torch.get_num_threads()
    with torch_threads(1):
        assert torch.get_num_threads() == 1
    assert torch.get_num_threads() == before
    with pytest.raises(ValueError, match="num_threads"):
        with torch_threads(0):
            pass


def test_checks_name_the_argument():
    assert check_finite is checks.check_finite and check_positive is checks.check_positive  # re-exported
    with pytest.raises(ValueError, match="rate"):
        check_positive("rate", 0.0)
    with pytest.raises(ValueError, match="data"):
        check_finite("data", torch.tensor([1.0, float("nan")]))
    with pytest.raises(ValueError, match="floating"):
        check_finite("data", torch.tensor([1, 2]))
    assert check_positive("scale", 2) == 2.0
    for bad in (True, math.inf, math.nan, -1.0, None):
        with pytest.raises(ValueError, match="scale must be a"):
            check_positive("scale", bad)


@pytest.mark.parametrize(
    "value, low, high, message",
    [
        (0, 1, None, "z_dim must be a positive integer, got 0"),
        (2.0, 1, None, "z_dim must be a positive integer, got 2.0"),
        (True, 1, None, "z_dim must be a positive integer, got True"),
        (-1, 0, None, "z_dim must be a non-negative integer, got -1"),
        (1, 2, None, "z_dim must be an integer ≥ 2, got 1"),
        (11, 1, 10, r"z_dim must be an integer in \[1, 10\], got 11"),
    ],
    ids=["zero", "float", "bool", "negative", "below-low", "above-high"],
)
def test_check_int_states_the_accepted_range(value, low, high, message):
    with pytest.raises(ValueError, match=message):
        check_int("z_dim", value, low=low, high=high)


def test_check_int_choice_and_probability_accept_good_values():
    assert check_int("n", 3) == 3 and check_int("n", 0, low=0) == 0 and check_int("n", 10, high=10) == 10
    assert check_choice("likelihood", "gaussian", ("bernoulli", "gaussian")) == "gaussian"
    for bad in ("poisson", None, torch.tensor(1.0), ["gaussian"]):
        with pytest.raises(ValueError, match=r"likelihood must be one of \('bernoulli', 'gaussian'\)"):
            check_choice("likelihood", bad, ("bernoulli", "gaussian"))
    assert check_probability("p", 1) == 1.0 and check_probability("p", 0.0, include_one=False) == 0.0
    for bad, include_one in ((1.0, False), (-0.1, True), (math.nan, True), ("a lot", True)):
        with pytest.raises(ValueError, match=r"p must be a number in \[0, 1[\])]"):
            check_probability("p", bad, include_one=include_one)


def test_data_plate_is_the_batch_or_a_scaled_minibatch_of_num_data():
    x = torch.randn(3, 2)

    def model(x, num_data=None):
        with data_plate(x, num_data):
            pyro.sample("x", dist.Normal(0.0, 1.0).expand([2]).to_event(1), obs=x)

    def log_density(num_data):
        trace = poutine.trace(model).get_trace(x, num_data)
        return trace.log_prob_sum().item()

    batch_only = dist.Normal(0.0, 1.0).log_prob(x).sum().item()
    assert log_density(None) == pytest.approx(batch_only) and log_density(3) == pytest.approx(batch_only)
    # a minibatch of 3 from a data set of 12: each datum stands for 4
    assert log_density(12) == pytest.approx(4 * batch_only)
    with data_plate(None, 5) as indices:
        assert torch.equal(indices, torch.arange(5))
    with pytest.raises(ValueError, match="pass the data x, or num_data=N"):
        data_plate(None)
    with pytest.raises(ValueError, match="num_data=2 is the size of the data set x is a batch of"):
        data_plate(x, 2)
    with pytest.raises(ValueError, match="num_data must be a positive integer"):
        data_plate(None, 0)


def test_log1mexp_is_accurate_on_both_branches_and_has_finite_gradients():
    x = -torch.logspace(-20, 2.5, 200, dtype=torch.float64)  # from −1e-20 to about −316
    x = torch.cat([x, torch.tensor([-math.log(2.0)], dtype=torch.float64)])
    with mpmath.workdps(60):
        exact = torch.tensor(
            [float(mpmath.log1p(-mpmath.exp(mpmath.mpf(v)))) for v in x.tolist()], dtype=torch.float64
        )
    computed = log1mexp(x)
    assert ((computed - exact).abs() <= 1e-14 * exact.abs().clamp(min=1e-300)).all()
    naive = torch.log(1 - torch.exp(x))  # cancels near 0, where the expm1 branch does not
    assert not torch.allclose(naive[:20], exact[:20], rtol=1e-6)
    x32 = torch.tensor([-1e-6, -0.5, -1.0, -50.0], requires_grad=True)
    value = log1mexp(x32)
    (gradient,) = torch.autograd.grad(value.sum(), [x32])
    assert value.dtype == torch.float32 and torch.isfinite(value).all() and torch.isfinite(gradient).all()
    assert log1mexp(torch.zeros(1)).item() == -math.inf


def test_resolve_device():
    assert resolve_device("cpu") == torch.device("cpu")
    with pytest.raises(ValueError, match="device"):
        resolve_device("not-a-device")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA"):
            resolve_device("cuda")


def test_unique_names_differ():
    assert unique_name("vae") != unique_name("vae")
