"""SBC, PSIS k̂ and the inference gaps, on pairs whose answers are known: the exponential–Gaussian toy with
its exact and two wrong guides, a conjugate Normal–Normal pair written here, and weights of a known tail."""

import json
import math

import pyro
import pyro.distributions as dist
import pytest
import scipy.stats
import torch
from matplotlib.image import imread
from pyro.distributions import constraints
from pyro.ops.stats import fit_generalized_pareto
from torch.nn.functional import softplus

from pvae.distributions import TruncatedNormal
from pvae.inference import (
    InferenceGaps,
    ecdf_band,
    fit,
    inference_gaps,
    khat_threshold,
    pareto_khat,
    psis_khat,
    rank_chi_square,
    sbc,
)
from pvae.models.ae import AE
from pvae.models.toy import ExponentialGaussian

pytestmark = pytest.mark.usefixtures("one_thread")  # small tensors: threads cost more than they save

# ---- the toy and two wrong guides for it ---------------------------------------------------------------
TOY = ExponentialGaussian()
TOY_X = torch.linspace(-1.0, 4.0, 40, dtype=torch.float64)


def narrow_guide(x, num_data=None):
    """The exact posterior's family and location with its scale × 0.4: too narrow. For a Gaussian target
    the weights p/q then have tail index k = 1 − 0.4² = 0.84."""
    exact = TOY.posterior(x)
    with pyro.plate("data", x.shape[0]):
        pyro.sample("z", TruncatedNormal(exact.loc, 0.4 * exact.scale, low=x.new_zeros(())))


def lognormal_guide(x, num_data=None):
    """A LogNormal with the exact posterior's mean and variance: right moments, wrong shape (its density
    vanishes at z = 0, where the posterior's does not)."""
    exact = TOY.posterior(x)
    mean, variance = exact.mean, exact.variance
    log_scale_squared = torch.log1p(variance / mean**2)
    with pyro.plate("data", x.shape[0]):
        pyro.sample("z", dist.LogNormal(mean.log() - log_scale_squared / 2, log_scale_squared.sqrt()))


def _picture(path):
    return torch.from_numpy(imread(str(path))[..., :3].copy())  # (H, W, 3) in [0, 1]


def test_toy_exact_guide_is_calibrated_and_its_weights_have_no_tail(tmp_path):
    result = sbc(TOY.model, TOY.exact_guide, num_simulations=100, num_data=10, seed=0)
    assert result.sites == ["z"] and result.data_site == "x"
    ranks = result.ranks["z"]
    assert ranks.shape == (100, 10) and ranks.dtype == torch.int64
    assert ranks.min() >= 0 and ranks.max() <= 99 and ranks.unique().numel() > 90
    assert result.p_values["z"] > 0.01
    band = result.ecdf_band("z")
    assert band.inside and band.num_ranks == 1000
    assert ((band.lower <= band.ecdf_difference) & (band.ecdf_difference <= band.upper)).all()

    khat = pareto_khat(TOY.model, TOY.exact_guide, TOY_X)
    assert khat.shape == (40,) and khat.dtype == torch.float64
    assert (khat < 0.5).all()  # constant weights: −∞, the best case

    path = result.plot(str(tmp_path / "sbc.png"))
    picture = _picture(path)
    assert picture.shape == (372, 504, 3) and picture.std() > 0.05
    payload = json.loads(json.dumps(result.to_dict()))
    assert payload["p_values"]["z"] == result.p_values["z"] and len(payload["ranks"]["z"]) == 100
    assert "z" in result.table()


def test_sbc_with_a_seed_repeats_and_leaves_the_callers_stream_alone():
    torch.manual_seed(7)
    expected_next = torch.rand(3)
    torch.manual_seed(7)
    first = sbc(TOY.model, TOY.exact_guide, num_simulations=5, num_posterior_samples=9, seed=3)
    assert torch.equal(torch.rand(3), expected_next)
    second = sbc(TOY.model, TOY.exact_guide, num_simulations=5, num_posterior_samples=9, seed=3)
    assert torch.equal(first.ranks["z"], second.ranks["z"])


@pytest.mark.parametrize("guide", [narrow_guide, lognormal_guide], ids=["narrow", "lognormal"])
def test_toy_wrong_guides_fail_sbc_and_have_heavy_weight_tails(guide):
    result = sbc(TOY.model, guide, num_simulations=100, num_data=10, seed=0)
    assert result.p_values["z"] < 1e-3
    assert not result.ecdf_band("z").inside
    khat = pareto_khat(TOY.model, guide, TOY_X, num_samples=4000, particles_per_batch=1000)
    if guide is narrow_guide:
        # k = 0.84 asymptotically; the estimate at S = 4000 scatters around it per datum
        assert khat.mean() > 0.7 and khat.median() > 0.7, khat
        assert (khat > 0.5).float().mean() >= 0.9, khat
    else:
        assert (khat > 0.7).all(), khat


# ---- k̂ against known tails --------------------------------------------------------------------------------
def test_khat_recovers_known_pareto_tails_and_equals_pyros_estimator():
    """log w = k·E with E ~ Exponential(1) makes w Pareto with tail index k exactly; log w = log U makes the
    weights uniform, a bounded tail of index −1."""
    num_samples, columns = 4000, 40
    exponential = torch.distributions.Exponential(torch.tensor(1.0, dtype=torch.float64))
    for shape in (0.3, 0.7, 1.0):
        khat = psis_khat(shape * exponential.sample((num_samples, columns)))
        assert abs(khat.mean().item() - shape) < 0.08, (shape, khat.mean())
    uniform = psis_khat(torch.rand(num_samples, columns, dtype=torch.float64).log())
    assert abs(uniform.mean().item() + 1.0) < 0.15 and (uniform < 0).all()

    # the vectorized fit is Pyro's fit_generalized_pareto on the PSIS tail, column by column
    log_w = 0.8 * exponential.sample((num_samples, 5))
    tail_size = math.ceil(min(0.2 * num_samples, 3 * math.sqrt(num_samples)))
    for column, khat in zip(log_w.T, psis_khat(log_w)):
        ordered = column.sort().values - column.max()
        exceedances = ordered[-tail_size:].exp() - ordered[-tail_size - 1].exp()
        assert khat.item() == pytest.approx(fit_generalized_pareto(exceedances)[0], abs=1e-10)


def test_khat_is_computed_per_column_across_chunks():
    """600 data (more than one chunk of the vectorized fit), each column's k̂ as if fitted alone."""
    scales = torch.linspace(0.1, 1.2, 600, dtype=torch.float64)
    exponential = torch.distributions.Exponential(torch.tensor(1.0, dtype=torch.float64))
    log_w = exponential.sample((200, 600)) * scales  # (S, N): tail index scales[n] in column n
    together = psis_khat(log_w)
    assert together.shape == (600,)
    for index in (0, 255, 256, 257, 511, 512, 599):
        assert together[index].item() == pytest.approx(psis_khat(log_w[:, index]).item(), abs=1e-12)
    assert together[:100].mean() < together[-100:].mean()  # heavier tails, larger k̂


def test_khat_without_a_tail_is_minus_inf_not_an_error():
    constant = torch.full((1000,), -3.2, dtype=torch.float64)
    with pytest.raises(ZeroDivisionError):  # what the tail fit does on constant weights
        fit_generalized_pareto(torch.zeros(95, dtype=torch.float64))
    rounding = constant + 1e-13 * torch.randn(1000, dtype=torch.float64)
    single_rounding = constant.float() + 1e-6 * torch.randn(1000)
    discrete = torch.tensor([0.0, -1.0, -2.0], dtype=torch.float64)[torch.randint(0, 3, (1000,))]
    for log_w in (constant, rounding, single_rounding, discrete):
        khat = psis_khat(log_w)
        assert khat.shape == () and khat.item() == -math.inf and khat.dtype == log_w.dtype
    broken = torch.randn(100, 4, dtype=torch.float64)
    broken[3, 1], broken[:, 2], broken[5, 3] = math.nan, -math.inf, math.inf
    khat = psis_khat(broken)
    assert math.isfinite(khat[0]) and khat[1].isnan() and khat[2].isnan() and khat[3] == math.inf


def test_khat_threshold():
    assert khat_threshold(1000) == pytest.approx(1 - 1 / 3)
    assert khat_threshold(10**9) == 0.7
    with pytest.raises(ValueError, match="num_samples must be an integer ≥ 2"):
        khat_threshold(1)


# ---- rank tests -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("num_posterior_samples, bins", [(99, 20), (30, 7)], ids=["equal-bins", "unequal"])
def test_rank_chi_square_is_pearsons_test(num_posterior_samples, bins):
    ranks = torch.randint(0, num_posterior_samples + 1, (500,))
    ranks[:40] = 0  # a little excess at the bottom, so the p-value is not near 1
    statistic, p_value = rank_chi_square(ranks, num_posterior_samples, bins)
    bin_of = (torch.arange(num_posterior_samples + 1) * bins) // (num_posterior_samples + 1)
    observed = torch.bincount(bin_of[ranks], minlength=bins).numpy()
    expected = torch.bincount(bin_of, minlength=bins).double().numpy() * 500 / (num_posterior_samples + 1)
    reference = scipy.stats.chisquare(observed, expected)
    assert statistic == pytest.approx(reference.statistic, rel=1e-10)
    assert p_value == pytest.approx(reference.pvalue, rel=1e-8)


def test_ecdf_band_is_simultaneous():
    """Uniform ranks stay inside the 95% band with probability 0.95 along the whole curve; the band is
    therefore wider than the pointwise 95% binomial intervals at its 19 points."""
    bands = [ecdf_band(torch.randint(0, 20, (200,)), 19, num_band_simulations=400) for _ in range(200)]
    coverage = sum(band.inside for band in bands) / len(bands)
    assert 0.9 <= coverage <= 0.99, coverage
    band = bands[0]
    fractions = band.fractional_ranks.numpy()
    pointwise_lower = scipy.stats.binom.ppf(0.025, 200, fractions) / 200 - fractions
    pointwise_upper = scipy.stats.binom.ppf(0.975, 200, fractions) / 200 - fractions
    assert (band.lower.numpy() <= pointwise_lower + 1e-12).all()
    assert (band.upper.numpy() >= pointwise_upper - 1e-12).all()
    assert (band.upper - band.lower).numpy().sum() > (pointwise_upper - pointwise_lower).sum()


def test_sbc_of_a_discrete_site_breaks_ties_uniformly():
    """z ∈ {0, 1}: most guide draws tie with the prior draw; only ranks with the ties shared out at random
    are uniform (counting only draws below θ̃ would put most ranks at 0)."""

    def coin_model(x=None, num_data=None):
        size = x.shape[0] if x is not None else num_data
        with pyro.plate("data", size):
            z = pyro.sample("z", dist.Bernoulli(torch.full((size,), 0.3, dtype=torch.float64)))
            pyro.sample("x", dist.Normal(z, 1.0), obs=x)

    def coin_guide(x, num_data=None):  # the exact posterior: log-odds log(0.3/0.7) + x − 1/2
        with pyro.plate("data", x.shape[0]):
            pyro.sample("z", dist.Bernoulli(logits=math.log(0.3 / 0.7) + x - 0.5))

    result = sbc(
        coin_model, coin_guide, num_simulations=100, num_posterior_samples=9, num_data=10, thinning=2
    )
    assert result.ranks["z"].shape == (100, 10) and result.thinning == 2
    assert result.ranks["z"].max() <= 9  # ranks among the M = 9 kept draws, not all 18
    assert result.p_values["z"] > 0.01
    assert (result.ranks["z"] == 0).float().mean() < 0.2


def test_sbc_refuses_a_model_without_a_proper_prior():
    autoencoder = AE(x_dim=4, hidden_dim=8, z_dim=2)
    with pytest.raises(ValueError, match=r"accepted is a model with a proper prior") as error:
        sbc(autoencoder.model, autoencoder.guide, num_simulations=2)
    assert "flat (improper)" in str(error.value) and "\n" not in str(error.value)

    def flat_model(x=None, num_data=None):
        with pyro.plate("data", num_data):
            z = pyro.sample("z", dist.ImproperUniform(constraints.real, (num_data,), ()))
            pyro.sample("x", dist.Normal(z, 1.0), obs=x)

    with pytest.raises(ValueError, match=r"model\(None, num_data=1\) failed \(NotImplementedError"):
        sbc(flat_model, lognormal_guide, num_simulations=2)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"num_simulations": 0}, "num_simulations must be a positive integer"),
        ({"num_posterior_samples": 0}, "num_posterior_samples must be a positive integer"),
        ({"num_data": 1.5}, "num_data must be a positive integer"),
        ({"thinning": 0}, "thinning must be a positive integer"),
        ({"bins": 1}, r"bins must be an integer in \[2, 100\]"),
        ({"bins": 101}, r"bins must be an integer in \[2, 100\]"),
        ({"seed": -1}, "seed must be a non-negative integer"),
        ({"data_site": "y"}, r"data_site must be one of the sites .* \['z', 'x'\]"),
        ({"data_site": "z"}, "every latent site needs a guide draw"),
    ],
    ids=["simulations", "samples", "num_data", "thinning", "bins-low", "bins-high", "seed", "site", "latent"],
)
def test_sbc_rejects_bad_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        sbc(TOY.model, TOY.exact_guide, **{"num_simulations": 2, **kwargs})


def test_pareto_khat_rejects_too_few_samples():
    with pytest.raises(ValueError, match="num_samples must be an integer ≥ 50"):
        pareto_khat(TOY.model, TOY.exact_guide, TOY_X, num_samples=10)
    with pytest.raises(ValueError, match="at least 50 draws"):
        psis_khat(torch.zeros(10, 3))


# ---- the inference gaps on a conjugate pair ---------------------------------------------------------------
NOISE = 0.5  # z ~ N(0, 1), x | z ~ N(z, 0.5²): p(z | x) = N(0.8 x, 0.2), p(x) = N(0, 1.25)


def conjugate_model(x=None, num_data=None):
    size = x.shape[0] if x is not None else num_data
    with pyro.plate("data", size):
        z = pyro.sample("z", dist.Normal(torch.zeros(size, dtype=torch.float64), 1.0))
        pyro.sample("x", dist.Normal(z, NOISE), obs=x)


def linear_guide(x, num_data=None):
    """q(z | x) = N(a·x + b, softplus(c)²): the exact posterior at a = 0.8, b = 0, softplus(c) = √0.2."""
    a = pyro.param("a", lambda: x.new_zeros(()))
    b = pyro.param("b", lambda: x.new_zeros(()))
    c = pyro.param("c", lambda: x.new_zeros(()))
    with pyro.plate("data", x.shape[0]):
        pyro.sample("z", dist.Normal(a * x + b, softplus(c)))


def conjugate_log_marginal(x):
    return dist.Normal(torch.zeros_like(x), math.sqrt(1 + NOISE**2)).log_prob(x)


def linear_guide_elbo(x):
    """The linear guide's ELBO in closed form, per datum."""
    loc = pyro.param("a") * x + pyro.param("b")
    variance = softplus(pyro.param("c")) ** 2
    prior_term = -0.5 * math.log(2 * math.pi) - (loc**2 + variance) / 2
    likelihood = -0.5 * math.log(2 * math.pi * NOISE**2) - ((x - loc) ** 2 + variance) / (2 * NOISE**2)
    return (prior_term + likelihood + 0.5 * torch.log(2 * math.pi * math.e * variance)).detach()


def test_gaps_of_a_conjugate_pair_whose_guide_family_holds_the_posterior():
    x = torch.randn(40, dtype=torch.float64) * math.sqrt(1 + NOISE**2)
    settings = {
        "log_marginal": conjugate_log_marginal,
        "num_samples": 2000,
        "particles_per_batch": 2000,
        "num_steps": 300,
        "lr": 0.1,
    }
    before = inference_gaps(conjugate_model, linear_guide, x, **settings)
    assert before.elbo_amortized == pytest.approx(
        linear_guide_elbo(x).mean().item(), abs=4 * before.elbo_amortized_stderr
    )
    fit(conjugate_model, linear_guide, x, num_steps=400, lr=0.05, progress=False)
    after = inference_gaps(conjugate_model, linear_guide, x, **settings)
    assert after.elbo_amortized == pytest.approx(
        linear_guide_elbo(x).mean().item(), abs=4 * after.elbo_amortized_stderr
    )

    for gaps in (before, after):
        # q*, a Normal per datum, reaches the exact posterior: no approximation gap (1e-4 nats allows for
        # the optimizer's last steps), whichever amortized guide it was started from
        assert abs(gaps.approximation_gap) <= 4 * gaps.approximation_gap_stderr + 1e-4, gaps
        per_datum = gaps.per_datum
        assert (
            per_datum["approximation_gap"].abs() <= 4 * per_datum["approximation_gap_stderr"] + 1e-3
        ).all()
        assert gaps.amortization_gap >= -4 * gaps.amortization_gap_stderr
        assert gaps.inference_gap == pytest.approx(gaps.approximation_gap + gaps.amortization_gap)
        assert gaps.log_marginal == pytest.approx(conjugate_log_marginal(x).mean().item())
        assert gaps.log_marginal_exact and gaps.log_marginal_stderr == 0.0
    margin = 4 * math.hypot(before.amortization_gap_stderr, after.amortization_gap_stderr)
    assert before.amortization_gap > 1.0
    assert after.amortization_gap < before.amortization_gap - margin
    assert after.amortization_gap < 0.1

    payload = json.loads(json.dumps(after.to_dict()))
    assert set(payload["per_datum"]) >= {"approximation_gap", "amortization_gap_stderr", "elbo_optimal"}
    assert len(payload["per_datum"]["elbo_optimal"]) == 40 and len(payload["losses"]) == 300
    assert "amortization_gap" in after.table()


def test_gaps_without_an_exact_evidence_use_the_importance_sampled_one():
    x = torch.linspace(-2.0, 2.0, 8, dtype=torch.float64)
    gaps = inference_gaps(
        conjugate_model, linear_guide, x, num_samples=2000, particles_per_batch=2000, num_steps=200, lr=0.1
    )
    assert not gaps.log_marginal_exact and gaps.log_marginal_stderr > 0
    exact = conjugate_log_marginal(x)
    error = (gaps.per_datum["log_marginal"] - exact).abs()
    assert (error < 5 * gaps.per_datum["log_marginal_stderr"]).all(), error
    assert gaps.inference_gap == pytest.approx(gaps.approximation_gap + gaps.amortization_gap)


def test_gaps_computed_in_halves_concatenate_to_the_gaps_of_the_whole():
    """Per-datum values joined; means and standard errors recomputed over all data (as inference_gaps
    computes them), not averaged over the halves; the fit's loss summed (it sums over the data)."""
    x = torch.randn(40, dtype=torch.float64) * math.sqrt(1 + NOISE**2)
    settings = {"log_marginal": conjugate_log_marginal, "num_samples": 1000, "num_steps": 200, "lr": 0.1}
    halves = [inference_gaps(conjugate_model, linear_guide, part, **settings) for part in x.split(20)]
    whole = InferenceGaps.concatenate(halves)

    assert set(whole.per_datum) == set(halves[0].per_datum)
    for key, value in whole.per_datum.items():
        assert torch.equal(value, torch.cat([half.per_datum[key] for half in halves])), key
    for key in ("log_marginal", "elbo_amortized", "elbo_optimal", "approximation_gap", "amortization_gap"):
        assert getattr(whole, key) == pytest.approx(whole.per_datum[key].mean().item()), key
        recomputed = whole.per_datum[f"{key}_stderr"].pow(2).sum().sqrt().item() / 40
        halves_errors = [getattr(half, f"{key}_stderr") for half in halves]
        assert getattr(whole, f"{key}_stderr") == pytest.approx(recomputed), key
        assert recomputed == pytest.approx(math.hypot(*halves_errors) / 2), key  # equal halves
        if key != "log_marginal":  # exact: no error at all
            assert recomputed < 0.9 * sum(halves_errors) / 2, key  # not their average: √2 smaller
    assert whole.log_marginal == pytest.approx(conjugate_log_marginal(x).mean().item())
    assert whole.elbo_amortized == pytest.approx(
        linear_guide_elbo(x).mean().item(), abs=4 * whole.elbo_amortized_stderr
    )
    assert whole.inference_gap == pytest.approx(whole.approximation_gap + whole.amortization_gap)
    assert whole.losses == [first + second for first, second in zip(*(half.losses for half in halves))]
    assert whole.log_marginal_exact and (whole.num_samples, whole.num_steps) == (1000, 200)
    assert "(means over 40 data" in whole.table()

    # computed on the whole in one go: the same means, up to the Monte-Carlo errors
    together = inference_gaps(conjugate_model, linear_guide, x, **settings)
    for key in ("elbo_amortized", "elbo_optimal", "amortization_gap"):
        error = math.hypot(getattr(whole, f"{key}_stderr"), getattr(together, f"{key}_stderr"))
        assert getattr(whole, key) == pytest.approx(getattr(together, key), abs=4 * error + 1e-4), key
    # one result: its own summary, by the same code
    assert InferenceGaps.concatenate(halves[:1]).to_dict() == halves[0].to_dict()


def test_concatenate_refuses_nothing_and_results_of_other_settings():
    x = torch.zeros(4, dtype=torch.float64)
    settings = {"num_samples": 10, "num_steps": 2}
    result = inference_gaps(conjugate_model, linear_guide, x, **settings)
    other = inference_gaps(conjugate_model, linear_guide, x, **(settings | {"num_samples": 20}))
    with pytest.raises(ValueError, match="non-empty sequence of InferenceGaps"):
        InferenceGaps.concatenate([])
    with pytest.raises(
        ValueError, match=r"results\[1\]\.num_samples is 20 but results\[0\]\.num_samples is 10"
    ):
        InferenceGaps.concatenate([result, other])


def test_gaps_fit_only_the_local_parameters():
    """The model's and the amortized guide's parameters are neither changed nor given gradients; a local
    guide of one's own is fitted in place."""

    def shifted_model(x, num_data=None):
        shift = pyro.param("shift", lambda: x.new_zeros(()))
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("z", dist.Normal(shift, 1.0))
            pyro.sample("x", dist.Normal(z, NOISE), obs=x)

    def local_guide(x, num_data=None):
        loc = pyro.param("local_loc", lambda: torch.zeros_like(x))
        scale = pyro.param("local_scale", lambda: torch.ones_like(x), constraint=constraints.positive)
        with pyro.plate("data", x.shape[0]):
            pyro.sample("z", dist.Normal(loc, scale))

    x = torch.linspace(1.0, 3.0, 6, dtype=torch.float64)
    for guide in (None, local_guide):
        inference_gaps(shifted_model, linear_guide, x, num_samples=50, num_steps=20, local_guide=guide)
        for name in ("shift", "a", "b", "c"):
            assert pyro.param(name).item() == 0.0 and pyro.param(name).unconstrained().grad is None, name
    assert (pyro.param("local_loc") > 0.1).all()  # moved towards the posterior means 0.8 x


def test_gaps_of_a_guide_outside_the_default_families_need_a_local_guide():
    def coin_model(x, num_data=None):
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("z", dist.Bernoulli(torch.full_like(x, 0.3)))
            pyro.sample("x", dist.Normal(z, 1.0), obs=x)

    def coin_guide(x, num_data=None):
        with pyro.plate("data", x.shape[0]):
            pyro.sample("z", dist.Bernoulli(logits=x))

    with pytest.raises(ValueError, match=r"local_guide is needed: .* site 'z' is drawn from Bernoulli"):
        inference_gaps(coin_model, coin_guide, torch.zeros(3))


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"num_samples": 1}, "num_samples must be an integer ≥ 2"),
        ({"num_steps": 0}, "num_steps must be a positive integer"),
        ({"lr": 0.0}, "lr must be a finite real number > 0"),
        ({"num_particles": 0}, "num_particles must be a positive integer"),
        ({"local_guide": 3}, "local_guide must be a Pyro guide"),
        ({"log_marginal": "exact"}, "log_marginal must be a callable"),
        ({"log_marginal": lambda x: x[:2]}, r"log_marginal must return .* shape \(4,\) .* got \(2,\)"),
    ],
    ids=["num_samples", "num_steps", "lr", "num_particles", "local_guide", "log_marginal", "shape"],
)
def test_gaps_reject_bad_arguments(kwargs, message):
    x = torch.zeros(4, dtype=torch.float64)
    with pytest.raises(ValueError, match=message):
        inference_gaps(conjugate_model, linear_guide, x, **{"num_steps": 1, "num_samples": 10, **kwargs})
