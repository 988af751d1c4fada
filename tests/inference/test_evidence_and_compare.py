"""compare / log_evidence on pairs written here, not in the library: they must work for any user pair."""

import dataclasses
import math
import pickle

import pyro
import pyro.distributions as dist
import pytest
import torch
from matplotlib.image import imread

from pvae.inference import IWAE_ELBO, compare, log_evidence, log_weights

PRIOR_SCALE, NOISE = 2.0, 0.5


def conjugate_model(x):
    """z ~ N(0, 2²), x | z ~ N(z, 0.5²) per datum."""
    with pyro.plate("data", x.shape[0]):
        z = pyro.sample("z", dist.Normal(torch.zeros_like(x), PRIOR_SCALE))
        pyro.sample("x", dist.Normal(z, NOISE), obs=x)


def shifted_guide(x):
    """A deliberately imperfect Gaussian guide: right form, wrong mean and width."""
    loc, scale = _posterior_parameters(x)
    with pyro.plate("data", x.shape[0]):
        pyro.sample("z", dist.Normal(loc + 0.3, scale * 1.4))


def _posterior_parameters(x):
    precision = 1 / PRIOR_SCALE**2 + 1 / NOISE**2
    return x / NOISE**2 / precision, torch.full_like(x, precision**-0.5)


def posterior(x):
    return dist.Normal(*_posterior_parameters(x))


def log_marginal(x):
    return dist.Normal(torch.zeros_like(x), math.sqrt(PRIOR_SCALE**2 + NOISE**2)).log_prob(x)


def analytic_kl(x):
    return torch.distributions.kl_divergence(dist.Normal(*_shifted(x)), posterior(x))


def _shifted(x):
    loc, scale = _posterior_parameters(x)
    return loc + 0.3, scale * 1.4


X = torch.tensor([-1.5, 0.0, 0.7, 2.0], dtype=torch.float64)


def test_gap_equals_analytic_kl_within_monte_carlo_error():
    result = compare(
        conjugate_model, shifted_guide, X, posterior=posterior, log_marginal=log_marginal, num_samples=4000
    )
    kl = analytic_kl(X)
    assert result.kl_method == "analytic"
    torch.testing.assert_close(result.per_datum["kl"], kl)
    assert abs(result.gap - kl.sum().item()) <= 4 * result.elbo_stderr
    assert result.elbo_stderr > 0  # the Monte-Carlo ELBO really is noisy here


def test_monte_carlo_kl_when_no_closed_form():
    def two_site_guide(x):  # a second latent site rules out the closed form
        loc, scale = _shifted(x)
        with pyro.plate("data", x.shape[0]):
            pyro.sample("z", dist.Normal(loc, scale))
            pyro.sample("aux", dist.Normal(torch.zeros_like(x), 1.0))

    def model_with_aux(x):
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("z", dist.Normal(torch.zeros_like(x), PRIOR_SCALE))
            pyro.sample("aux", dist.Normal(torch.zeros_like(x), 1.0))
            pyro.sample("x", dist.Normal(z, NOISE), obs=x)

    result = compare(model_with_aux, two_site_guide, X, posterior=posterior, site="z", num_samples=20000)
    assert result.kl_method == "monte-carlo"
    kl = analytic_kl(X)
    assert abs(result.kl - kl.sum().item()) <= 4 * result.kl_stderr
    assert not result.log_marginal_exact


def test_iwae_estimate_without_log_marginal_is_close():
    result = compare(conjugate_model, shifted_guide, X, num_samples=5000)
    exact = log_marginal(X)
    assert (result.per_datum["log_marginal"] - exact).abs().max().item() < 0.05
    assert result.kl is None and result.site == "z"


def test_naive_and_importance_sampled_evidence_agree_and_naive_spreads_more():
    """Both estimators agree with the exact log p(x); over repeats the naive (prior) one spreads more."""
    exact = log_marginal(X)
    guided = torch.stack(
        [log_evidence(conjugate_model, shifted_guide, X, num_samples=200) for _ in range(40)]
    )
    naive = torch.stack(
        [log_evidence(conjugate_model, None, X, num_samples=200, proposal="prior") for _ in range(40)]
    )
    # with k = 200 the log of the mean is nearly unbiased for both; allow 4 standard errors of the mean
    for estimates in (guided, naive):
        mean, stderr = estimates.mean(0), estimates.std(0) / math.sqrt(len(estimates))
        assert ((mean - exact).abs() <= 4 * stderr + 2e-3).all(), (mean - exact, stderr)
    assert (naive.std(0) > 2 * guided.std(0)).all(), (naive.std(0), guided.std(0))


def test_effective_sample_size():
    _, ess_exact = log_evidence(conjugate_model, _exact, X, num_samples=500, return_ess=True)
    torch.testing.assert_close(ess_exact, torch.full_like(X, 500.0))  # perfect proposal: equal weights
    _, ess_prior = log_evidence(conjugate_model, None, X, num_samples=500, proposal="prior", return_ess=True)
    assert (ess_prior < 300).all() and (ess_prior >= 1).all()


def _exact(x):
    with pyro.plate("data", x.shape[0]):
        pyro.sample("z", posterior(x))


def test_exact_guide_has_zero_gap_and_iwae_is_exact():
    result = compare(conjugate_model, _exact, X, posterior=posterior, log_marginal=log_marginal)
    assert abs(result.gap) < 1e-10 and result.elbo_stderr < 1e-10
    torch.testing.assert_close(log_evidence(conjugate_model, _exact, X, num_samples=10), log_marginal(X))


def test_point_mass_guide_has_no_evidence():
    def delta_guide(x):
        with pyro.plate("data", x.shape[0]):
            pyro.sample("z", dist.Delta(x))

    with pytest.raises(ValueError, match="point mass"):
        log_evidence(conjugate_model, delta_guide, X)


def test_nested_plates_and_event_dims_reduce_per_datum():
    """The "data" plate at dim -2 with an inner plate; per-datum terms sum over the inner plate."""

    def model(x):  # x: (N, 3)
        with pyro.plate("data", x.shape[0], dim=-2), pyro.plate("feature", 3, dim=-1):
            z = pyro.sample("z", dist.Normal(0.0, PRIOR_SCALE).expand([x.shape[0], 3]))
            pyro.sample("x", dist.Normal(z, NOISE), obs=x)

    def guide(x):
        with pyro.plate("data", x.shape[0], dim=-2), pyro.plate("feature", 3, dim=-1):
            pyro.sample("z", posterior(x))

    x = torch.randn(5, 3, dtype=torch.float64)
    expected = log_marginal(x).sum(-1)
    torch.testing.assert_close(log_evidence(model, guide, x, num_samples=7), expected)
    result = compare(model, guide, x, log_marginal=lambda x: log_marginal(x).sum(-1))
    assert result.per_datum["elbo"].shape == (5,)
    torch.testing.assert_close(result.per_datum["elbo"], expected)


def _picture(path):
    return torch.from_numpy(imread(str(path))[..., :3].copy())  # (H, W, 3) in [0, 1]


def test_table_dict_and_plot(tmp_path):
    result = compare(conjugate_model, shifted_guide, X, posterior=posterior, log_marginal=log_marginal)
    table = result.table()
    assert "x=-1.5" in table and "total" in table
    payload = result.to_dict()
    assert set(payload["per_datum"]) == {"elbo", "log_marginal", "gap", "kl", "khat"}
    assert payload["per_datum"]["kl"] == pytest.approx(analytic_kl(X).tolist())
    path = result.plot(str(tmp_path / "overlay.png"))
    assert path.endswith("overlay.png")
    picture = _picture(path)
    assert picture.shape == (2 * 372, 3 * 504, 3)  # 4 panels, 3 per row, at 120 dpi
    assert picture.std() > 0.05  # curves and bars, not a blank page
    assert "| **total** |" in result.markdown()


def test_khat_column_beside_gap_and_kl():
    """The exact posterior as guide: constant weights, k̂ = −∞ for every datum; a guide far too narrow
    (scale × 0.4, weights with tail index 1 − 0.4² ≈ 0.84): k̂ well above the 0.5 of a good proposal."""

    def exact_guide(x):
        with pyro.plate("data", x.shape[0]):
            pyro.sample("z", posterior(x))

    def narrow_guide(x):
        loc, scale = _posterior_parameters(x)
        with pyro.plate("data", x.shape[0]):
            pyro.sample("z", dist.Normal(loc, 0.4 * scale))

    exact = compare(conjugate_model, exact_guide, X, posterior=posterior, log_marginal=log_marginal)
    assert exact.per_datum["khat"].shape == (4,)
    assert (exact.per_datum["khat"] == -math.inf).all() and exact.khat_max == -math.inf
    narrow = compare(conjugate_model, narrow_guide, X, num_samples=4000)
    assert (narrow.per_datum["khat"] > 0.5).all() and narrow.khat_max > 0.7, narrow.per_datum["khat"]

    lines = narrow.table().splitlines()
    assert lines[0].split()[-1] == "khat"
    first_row = lines[2].split()
    assert float(first_row[-1]) == pytest.approx(narrow.per_datum["khat"][0].item(), abs=1e-4)
    assert lines[-3].split()[-1] == "—"  # the total row: k̂ is not summed
    assert "largest" in lines[-1]
    markdown = exact.markdown().splitlines()
    assert markdown[0].endswith("| KL(q‖p) | k̂ |") and markdown[2].endswith("| -inf |")
    payload = exact.to_dict()
    assert payload["per_datum"]["khat"] == [-math.inf] * 4 and payload["khat_max"] == -math.inf
    few = compare(conjugate_model, narrow_guide, X, num_samples=10)  # too few draws for a tail fit
    assert few.per_datum["khat"] is None and few.khat_max is None
    assert few.table().splitlines()[2].split()[-1] == "—"


def test_comparison_is_plain_data_with_the_densities_it_plots(tmp_path):
    result = compare(conjugate_model, shifted_guide, X, posterior=posterior, num_samples=500)
    for field in dataclasses.fields(result):
        assert not callable(getattr(result, field.name)), field.name
    densities = result.densities
    assert not densities.discrete and densities.points.shape == (4, 600)
    grid = densities.points.transpose(0, 1)  # (G, N): datum n's grid in column n
    loc, scale = _shifted(X)
    torch.testing.assert_close(densities.guide, dist.Normal(loc, scale).log_prob(grid).exp().transpose(0, 1))
    torch.testing.assert_close(densities.posterior, posterior(X).log_prob(grid).exp().transpose(0, 1))
    mean, std = _posterior_parameters(X)
    assert (grid[0] < mean - 4 * std).all() and (grid[-1] > mean + 4 * std).all()  # the posterior's bulk
    assert result.samples.shape == (500, 4) and result.event_shape == ()
    copied = pickle.loads(pickle.dumps(result))  # nothing but data: it pickles, and plots as well
    assert _picture(copied.plot(str(tmp_path / "copy.png"))).shape == (2 * 372, 3 * 504, 3)


def test_discrete_site_plot(tmp_path):
    def model(x):
        with pyro.plate("data", x.shape[0]):
            k = pyro.sample("k", dist.Categorical(torch.ones(3) / 3))
            pyro.sample("x", dist.Normal(k.to(x.dtype), 1.0), obs=x)

    def guide(x):
        with pyro.plate("data", x.shape[0]):
            pyro.sample("k", dist.Categorical(logits=torch.zeros(x.shape[0], 3)))

    result = compare(model, guide, torch.tensor([0.0, 2.0]), num_samples=200)
    assert result.densities.discrete and result.densities.posterior is None
    assert torch.equal(result.densities.points, torch.arange(3))
    torch.testing.assert_close(result.densities.guide, torch.full((2, 3), 1 / 3))
    picture = _picture(result.plot(str(tmp_path / "bars.png")))
    assert picture.shape == (372, 2 * 504, 3) and picture.std() > 0.05


def test_a_site_with_an_event_shape_has_no_plot(tmp_path):
    def model(x):
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("z", dist.Normal(torch.zeros(x.shape[0], 2), 1.0).to_event(1))
            pyro.sample("x", dist.Normal(z.sum(-1), 1.0), obs=x)

    def guide(x):
        with pyro.plate("data", x.shape[0]):
            pyro.sample("z", dist.Normal(torch.zeros(x.shape[0], 2), 1.0).to_event(1))

    result = compare(model, guide, torch.tensor([0.0, 2.0]), num_samples=10)
    assert result.densities is None and result.event_shape == (2,)
    with pytest.raises(ValueError, match=r"scalar continuous or discrete .* event shape \(2,\)"):
        result.plot(str(tmp_path / "none.png"))


# ---- one log-weight reduction ----------------------------------------------------------------------------
def test_log_weights_are_what_compare_log_evidence_and_iwae_reduce():
    pyro.set_rng_seed(4)
    log_w = log_weights(conjugate_model, shifted_guide, X, num_samples=300)
    assert log_w.shape == (300, 4)
    pyro.set_rng_seed(4)
    result = compare(conjugate_model, shifted_guide, X, num_samples=300)
    torch.testing.assert_close(result.per_datum["elbo"], log_w.mean(0))
    torch.testing.assert_close(result.per_datum["log_marginal"], torch.logsumexp(log_w, 0) - math.log(300))
    pyro.set_rng_seed(4)
    torch.testing.assert_close(
        log_evidence(conjugate_model, shifted_guide, X, num_samples=300),
        torch.logsumexp(log_w, 0) - math.log(300),
    )
    pyro.set_rng_seed(4)
    iwae, scale, per_datum = IWAE_ELBO(num_particles=300).log_weights(conjugate_model, shifted_guide, X)
    assert per_datum and scale == 1.0
    torch.testing.assert_close(iwae, log_w)
    # by hand: log p(x, z) − log q(z | x) at the guide's draws
    pyro.set_rng_seed(4)
    z = dist.Normal(*_shifted(X)).rsample((300,))  # (300, 4): the guide's reparameterized draws
    by_hand = (
        dist.Normal(0.0, PRIOR_SCALE).log_prob(z)
        + dist.Normal(z, NOISE).log_prob(X)
        - dist.Normal(*_shifted(X)).log_prob(z)
    )
    torch.testing.assert_close(log_w, by_hand)


def test_global_latent_terms_are_spread_so_each_row_is_the_joint_weight():
    """shift ~ N(0, 1), x_n | shift ~ N(shift, 1): with the exact posterior of shift as the guide, every
    particle's joint weight is log p(x_1..N) = log N(x; 0, I + 11ᵀ), and the rows of log_weights sum to it."""

    def model(x):
        shift = pyro.sample("shift", dist.Normal(x.new_zeros(()), 1.0))
        with pyro.plate("data", x.shape[0]):
            pyro.sample("x", dist.Normal(shift, 1.0), obs=x)

    def exact_guide(x):
        n = x.shape[0]
        pyro.sample("shift", dist.Normal(x.sum() / (n + 1), (1.0 / (n + 1)) ** 0.5))

    covariance = torch.eye(4, dtype=torch.float64) + 1.0
    exact = dist.MultivariateNormal(torch.zeros(4, dtype=torch.float64), covariance).log_prob(X)
    log_w = log_weights(model, exact_guide, X, num_samples=50)
    assert log_w.shape == (50, 4)
    torch.testing.assert_close(log_w.sum(-1), exact.expand(50))
    assert (log_w.std(0) > 0.01).all()  # the local terms still vary with the draw of shift


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"num_samples": 1}, "num_samples"),
        ({"posterior": 3}, "posterior"),
        ({"log_marginal": "x"}, "log_marginal"),
        ({"site": "nope"}, "site"),
    ],
    ids=["num_samples", "posterior", "log_marginal", "site"],
)
def test_compare_rejects_bad_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        compare(conjugate_model, shifted_guide, X, **kwargs)


def test_log_evidence_rejects_bad_arguments():
    with pytest.raises(ValueError, match="num_samples"):
        log_evidence(conjugate_model, shifted_guide, X, num_samples=0)
    with pytest.raises(ValueError, match="proposal"):
        log_evidence(conjugate_model, shifted_guide, X, proposal="posterior")


# ---- bad data and bad exact callables --------------------------------------------------------------------
@pytest.mark.parametrize(
    "data, message",
    [
        (
            torch.tensor(0.7, dtype=torch.float64),
            r"args\[0\] \(the data, the model's argument 'x'\) is a 0-d",
        ),
        (torch.zeros(0, dtype=torch.float64), r"args\[0\] \(the data, the model's argument 'x'\) is empty"),
        (torch.zeros(0, 3, dtype=torch.float64), r"a batch needs at least one datum"),
    ],
    ids=["0-d", "empty", "empty-rows"],
)
@pytest.mark.parametrize("estimator", ["compare", "log_evidence"])
def test_zero_dim_and_empty_data_raise_value_error(estimator, data, message):
    with pytest.raises(ValueError, match=message) as error:
        if estimator == "compare":
            compare(conjugate_model, shifted_guide, data, num_samples=4)
        else:
            log_evidence(conjugate_model, shifted_guide, data, num_samples=4)
    assert r"shape (N, ...) with the N ≥ 1 data points" in str(error.value)  # says what is accepted


def test_zero_dim_data_without_a_data_plate_is_one_datum():
    """A pair with no "data" plate may observe one scalar: that stays allowed (the pair is one datum)."""

    def model(x):
        z = pyro.sample("z", dist.Normal(torch.zeros_like(x), PRIOR_SCALE))
        pyro.sample("x", dist.Normal(z, NOISE), obs=x)

    def guide(x):
        pyro.sample("z", dist.Normal(x, 1.0))

    x = torch.tensor(0.7, dtype=torch.float64)
    assert compare(model, guide, x, num_samples=4).per_datum["elbo"].shape == (1,)
    assert log_evidence(model, guide, x, num_samples=4).shape == (1,)


def test_posterior_with_a_broadcasting_batch_shape_raises():
    """A (1,)-batch posterior for 9 data points used to broadcast into a wrong KL; now it is refused."""
    x = torch.linspace(-2.0, 2.0, 9, dtype=torch.float64)

    def first_only(x):
        exact = posterior(x)
        return dist.Normal(exact.loc[:1], exact.scale[:1])  # batch shape (1,)

    # what the broadcast gave: every guide q(z | x_n) against the first datum's posterior
    wrong_kl = torch.distributions.kl_divergence(dist.Normal(*_shifted(x)), first_only(x)).sum()
    right = compare(conjugate_model, shifted_guide, x, posterior=posterior, num_samples=4)
    assert torch.allclose(right.per_datum["kl"], analytic_kl(x))
    assert abs(right.kl - wrong_kl.item()) > 1.0
    with pytest.raises(ValueError, match=r"posterior returned a distribution of batch shape \(1,\)") as error:
        compare(conjugate_model, shifted_guide, x, posterior=first_only, num_samples=4)
    assert "'data' plate of 9 data points" in str(error.value)
    with pytest.raises(ValueError, match=r"posterior .* batch shape \(\)"):  # no data axis at all
        compare(conjugate_model, shifted_guide, x, posterior=lambda x: dist.Normal(0.0, 1.0), num_samples=4)
    with pytest.raises(ValueError, match=r"posterior must return .* distribution, got Tensor"):
        compare(conjugate_model, shifted_guide, x, posterior=lambda x: x, num_samples=4)


def test_posterior_check_counts_event_dims_and_nested_plates():
    """The data axis is found at the plate's dim, left of the site's event dims; valid posteriors pass."""

    def model(x):  # x: (N, 3); "data" at dim -2, "feature" at dim -1
        with pyro.plate("data", x.shape[0], dim=-2), pyro.plate("feature", 3, dim=-1):
            z = pyro.sample("z", dist.Normal(0.0, PRIOR_SCALE).expand([x.shape[0], 3]))
            pyro.sample("x", dist.Normal(z, NOISE), obs=x)

    def guide(x):
        with pyro.plate("data", x.shape[0], dim=-2), pyro.plate("feature", 3, dim=-1):
            pyro.sample("z", dist.Normal(*_shifted(x)))

    x = torch.randn(5, 3, dtype=torch.float64)
    result = compare(model, guide, x, posterior=posterior, num_samples=4)
    assert torch.allclose(result.per_datum["kl"], analytic_kl(x).sum(-1))
    with pytest.raises(ValueError, match=r"posterior returned .* batch shape \(1, 3\)"):
        compare(model, guide, x, posterior=lambda x: posterior(x[:1]), num_samples=4)

    def event_model(x):  # x: (N, 3), one event of 3 per datum
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("z", dist.Normal(torch.zeros_like(x), PRIOR_SCALE).to_event(1))
            pyro.sample("x", dist.Normal(z, NOISE).to_event(1), obs=x)

    def event_guide(x):
        with pyro.plate("data", x.shape[0]):
            pyro.sample("z", dist.Normal(*_shifted(x)).to_event(1))

    result = compare(event_model, event_guide, x, posterior=lambda x: posterior(x).to_event(1), num_samples=4)
    assert torch.allclose(result.per_datum["kl"], analytic_kl(x).sum(-1))
    with pytest.raises(ValueError, match=r"posterior returned .* batch shape \(1,\) \(event shape \(3,\)\)"):
        compare(event_model, event_guide, x, posterior=lambda x: posterior(x[:1]).to_event(1), num_samples=4)


@pytest.mark.parametrize(
    "returned, message",
    [
        (lambda x: log_marginal(x)[:1], r"log_marginal returned shape \(1,\), expected \(4,\)"),
        (lambda x: log_marginal(x).sum(), r"log_marginal returned shape \(\), expected \(4,\)"),
        (lambda x: log_marginal(x)[:, None], r"log_marginal returned shape \(4, 1\), expected \(4,\)"),
        (lambda x: None, r"log_marginal must return the exact log p\(x\) as a tensor of shape \(4,\)"),
    ],
    ids=["one-value", "scalar", "column", "none"],
)
def test_log_marginal_of_the_wrong_shape_raises(returned, message):
    with pytest.raises(ValueError, match=message):
        compare(conjugate_model, shifted_guide, X, log_marginal=returned, num_samples=4)
