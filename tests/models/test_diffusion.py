"""DDPM as a Pyro model/guide pair: schedules, the step formulas, ELBO estimators against the closed form
(with power checks), L_simple, the discretized decoder, chains inside other programs, the prior
predictive, sampling, EMA, checkpoints and training on two moons.

One file over 500 lines: these tests share the small fixtures and closed forms above them, and splitting
them by concern would copy those into each part."""

import math

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro import poutine
from pyro.infer import Predictive, Trace_ELBO, TraceMeanField_ELBO
from pyro.poutine.util import prune_subsample_sites
from torch import nn

import pvae
from pvae.checkpoint import save_checkpoint
from pvae.data import BatchLoader, check_model_space, to_model_space, two_moons
from pvae.denoisers import MLPDenoiser
from pvae.family import build_family
from pvae.inference import log_evidence, train
from pvae.inference.step import SVIStep
from pvae.models.diffusion import (
    DDPM,
    DiffusionSchedule,
    DiscretizedGaussian,
    forward_chain,
    forward_marginal,
    forward_pair,
    forward_posterior,
    make_betas,
    plate_timesteps,
    prior_kl,
    reverse_chain,
    reverse_pair,
)
from pvae.two_sample import mmd2, mmd2_null

Z_LIMIT = 4.0  # two-sided z-test threshold: a false alarm has probability ~6e-5 per test


pytestmark = pytest.mark.usefixtures("one_thread")  # thousands of tiny steps: threads only cost


# ---- reference quantities, computed here from the betas alone --------------------------------------------
def alpha_bar_table(schedule: str, timesteps: int) -> torch.Tensor:
    """ᾱ_0 … ᾱ_T in float64, (T + 1,), from make_betas by a running product (ᾱ_0 = 1)."""
    return torch.cat(
        [torch.ones(1, dtype=torch.float64), torch.cumprod(1 - make_betas(schedule, timesteps), 0)]
    )


class LinearDenoiser(nn.Module):
    """ε_θ(x, t) = a_t ⊙ x + b_t: μ_θ is linear in x_t, so the ELBO's expectation is exact in closed form."""

    def __init__(self, dim: int, timesteps: int):
        super().__init__()
        self.a = nn.Parameter(torch.zeros(timesteps + 1, dim))
        self.b = nn.Parameter(torch.zeros(timesteps + 1, dim))

    def forward(self, x, t):
        index = torch.as_tensor(t, device=x.device).long()
        return self.a[index] * x + self.b[index]


class AffineDenoiser(nn.Module):
    """ε_θ(x, t) = 0.5·x + 0.1·t: a network whose output the test knows."""

    def forward(self, x, t):
        return 0.5 * x + 0.1 * torch.as_tensor(t, device=x.device).to(x.dtype)


def exact_elbo(model: DDPM, net: LinearDenoiser, x0: torch.Tensor, reverse_variance=None) -> torch.Tensor:
    """The exact per-datum ELBO of a Gaussian-decoder DDPM with a linear denoiser, (N,), derived here by
    conditioning the joint Gaussian (x_{t−1}, x_t) | x_0 — independently of the library's coefficients.
    ``reverse_variance`` (default the model's) picks σ_t² for t ≥ 2."""
    reverse_variance = reverse_variance or model.config.reverse_variance
    betas = make_betas(model.config.schedule, model.timesteps)
    T = model.timesteps
    alpha = 1 - betas
    alpha_bar = torch.cumprod(alpha, 0)
    a, b = net.a.detach().double(), net.b.detach().double()
    x0 = x0.double()

    def abar(t):
        return 1.0 if t == 0 else alpha_bar[t - 1].item()

    total = 0.5 * (abar(T) * x0**2 + (1 - abar(T)) - 1 - math.log(1 - abar(T)))  # KL(q(x_T|x0) ‖ N(0,1))
    for t in range(1, T + 1):
        beta_t, alpha_t = betas[t - 1].item(), alpha[t - 1].item()
        m_t, v_t = math.sqrt(abar(t)) * x0, 1 - abar(t)  # q(x_t | x0)
        # μ_θ = M x_t + K
        M = (1 - beta_t / math.sqrt(1 - abar(t)) * a[t]) / math.sqrt(alpha_t)
        K = -beta_t / (math.sqrt(1 - abar(t)) * math.sqrt(alpha_t)) * b[t]
        if t == 1:  # −E log N(x0; M x_1 + K, β_1)
            second_moment = (x0 - M * m_t - K) ** 2 + M**2 * v_t
            total = total + 0.5 * (math.log(2 * math.pi * beta_t) + second_moment / beta_t)
            continue
        # joint of (x_{t−1}, x_t) given x0, then condition on x_t
        var_prev, cov = 1 - abar(t - 1), math.sqrt(alpha_t) * (1 - abar(t - 1))
        B = cov / v_t
        A = math.sqrt(abar(t - 1)) - B * math.sqrt(abar(t))
        post_var = var_prev - cov**2 / v_t
        sigma2 = beta_t if reverse_variance == "beta" else post_var
        second_moment = (A * x0 - K + (B - M) * m_t) ** 2 + (B - M) ** 2 * v_t  # E(μ̃ − μ_θ)²
        total = total + 0.5 * (math.log(sigma2 / post_var) + (post_var + second_moment) / sigma2 - 1)
    return -total.sum(-1)


def perturb_near_optimal(net: LinearDenoiser, schedule: str, timesteps: int) -> None:
    """Set the linear denoiser near the optimal one for N(0, I) data (E[ε | x_t] = √(1 − ᾱ_t) x_t)."""
    dim = net.a.shape[1]
    with torch.no_grad():
        optimal = (1 - alpha_bar_table(schedule, timesteps)).sqrt()[:, None]
        net.a.copy_(optimal + 0.1 * torch.randn(timesteps + 1, dim))
        net.b.copy_(0.1 * torch.randn(timesteps + 1, dim))


def linear_ddpm(timesteps=8, schedule="linear", reverse_variance="beta", dim=2, **options):
    """A float64 DDPM with a linear denoiser near the optimal one for N(0, I) data, perturbed at random."""
    net = LinearDenoiser(dim, timesteps)
    model = DDPM(
        net,
        data_shape=(dim,),
        timesteps=timesteps,
        schedule=schedule,
        reverse_variance=reverse_variance,
        **options,
    ).double()
    perturb_near_optimal(net, schedule, timesteps)
    return model, net


def ztest(draws: torch.Tensor, expected: float) -> float:
    draws = draws.double()
    return ((draws.mean() - expected) / (draws.std() / math.sqrt(draws.numel()))).item()


# ---- schedules -----------------------------------------------------------------------------------------
def test_linear_schedule_endpoints_scale_with_T():
    torch.testing.assert_close(
        make_betas("linear", 1000), torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64)
    )
    torch.testing.assert_close(make_betas("linear", 100), torch.linspace(1e-3, 0.2, 100, dtype=torch.float64))
    small = make_betas("linear", 10)  # endpoints 0.01 … 2.0, clipped at 0.999
    assert small[0].item() == pytest.approx(0.01) and small.max().item() == pytest.approx(0.999)


def test_cosine_schedule_matches_nichol_dhariwal():
    T, s = 50, 0.008
    betas = make_betas("cosine", T)
    f = [math.cos((t / T + s) / (1 + s) * math.pi / 2) ** 2 for t in range(T + 1)]
    alpha_bar = torch.cumprod(1 - betas, 0)
    expected = torch.tensor([f[t] / f[0] for t in range(1, T + 1)], dtype=torch.float64)
    torch.testing.assert_close(alpha_bar[:-1], expected[:-1])  # the last β is clipped at 0.999
    assert betas[-1].item() == pytest.approx(0.999)


@pytest.mark.parametrize("schedule", ["linear", "cosine"])
@pytest.mark.parametrize("timesteps", [10, 100, 1000])
def test_prior_term_is_negligible(schedule, timesteps):
    """L_T = KL(q(x_T | x0) ‖ N(0, I)) < 1e-4 nats per dimension for data in [−1, 1]."""
    model = DDPM(data_shape=(3,), timesteps=timesteps, schedule=schedule).double()
    x0 = torch.tensor([[-1.0, 0.0, 1.0]], dtype=torch.float64)
    assert model.prior_kl(x0).item() / 3 < 1e-4


def test_schedule_lookup_follows_dtype_and_matches_float64():
    model = DDPM(data_shape=(2,), timesteps=50)
    t = torch.arange(1, 51)
    assert model.schedule.coef("alpha_bar", t, torch.zeros(())).dtype == torch.float32
    model.double()
    table = model.schedule.coef("alpha_bar", t, torch.zeros((), dtype=torch.float64))
    torch.testing.assert_close(table, alpha_bar_table("linear", 50)[1:], rtol=1e-14, atol=0)
    model.float().double()  # recomputed from the float64 master: the round trip through float32 loses nothing
    torch.testing.assert_close(model.schedule.alpha_bar, alpha_bar_table("linear", 50), rtol=1e-14, atol=0)
    assert not any(key.startswith("schedule.") for key in model.state_dict())  # derived from the config
    # a per-batch timestep broadcasts over data and event dimensions, a per-datum one over the event
    x = torch.zeros(4, 3, 5, dtype=torch.float64)
    assert model.schedule.coef("sigma", model.schedule.timestep(7), x, event_dims=2).shape == (1, 1)
    per_datum = model.schedule.coef("sigma", torch.tensor([1, 2, 3, 4]), x, event_dims=2)
    assert per_datum.shape == (4, 1, 1) and torch.equal(per_datum[2, 0, 0], model.schedule.sigma[3])
    with pytest.raises(ValueError, match="unknown coefficient"):
        model.schedule.coef("gamma", t, x)


def test_family_builds_on_the_meta_device():
    """pvae.family.build_family sizes a family on the meta device first: the tables stay real numbers."""
    settings = {"data_shape": (1, 8, 8), "timesteps": 20, "channels": (8,), "ema_decay": 0.9}
    with torch.device("meta"):
        probe = DDPM(**settings)
    assert probe.denoiser.output.weight.is_meta and probe.schedule.sigma.device.type == "cpu"
    family = build_family(DDPM, settings)
    assert isinstance(family, DDPM) and family.ema_denoiser is not None


# ---- the step formulas ---------------------------------------------------------------------------------
@pytest.mark.parametrize("schedule", ["linear", "cosine"])
def test_forward_marginal_composes_one_step_kernels(schedule):
    model = DDPM(data_shape=(2,), timesteps=20, schedule=schedule).double()
    betas = make_betas(schedule, 20)
    x0 = torch.tensor([[0.7, -1.3]], dtype=torch.float64)
    mean, var = x0.clone(), torch.zeros_like(x0)
    for t in range(1, 21):
        beta = betas[t - 1].item()
        mean, var = math.sqrt(1 - beta) * mean, (1 - beta) * var + beta  # x_t = √α_t x_{t−1} + √β_t ε
        marginal = forward_marginal(model.schedule, x0, model.schedule.timestep(t), 1)
        torch.testing.assert_close(marginal.loc, mean)
        torch.testing.assert_close(marginal.scale**2, var)


@pytest.mark.parametrize("schedule", ["linear", "cosine"])
def test_forward_posterior_is_gaussian_conditioning(schedule):
    model = DDPM(data_shape=(3,), timesteps=15, schedule=schedule).double()
    alpha_bar = alpha_bar_table(schedule, 15)
    x0, x_t = torch.randn(4, 3, dtype=torch.float64), torch.randn(4, 3, dtype=torch.float64)
    for t in range(2, 16):
        abar_prev, abar_t = alpha_bar[t - 1].item(), alpha_bar[t].item()
        alpha_t = abar_t / abar_prev
        # (x_{t−1}, x_t) | x0 is jointly Gaussian: Var x_{t−1} = 1 − ᾱ_{t−1}, Cov = √α_t (1 − ᾱ_{t−1})
        var_prev, cov, var_t = 1 - abar_prev, math.sqrt(alpha_t) * (1 - abar_prev), 1 - abar_t
        mean = math.sqrt(abar_prev) * x0 + cov / var_t * (x_t - math.sqrt(abar_t) * x0)
        variance = var_prev - cov**2 / var_t
        posterior = forward_posterior(model.schedule, x_t, x0, model.schedule.timestep(t), 1)
        torch.testing.assert_close(posterior.loc, mean)
        torch.testing.assert_close(posterior.scale**2, torch.full_like(mean, variance))
    # t = 1: β̃_1 = 0, the posterior is the point mass at x0; a timestep per datum mixes both kinds
    first = forward_posterior(model.schedule, x_t, x0, model.schedule.timestep(1), 1)
    assert torch.equal(first.loc, x0) and torch.equal(first.scale, torch.zeros_like(x0))
    mixed = forward_posterior(model.schedule, x_t, x0, torch.tensor([1, 5, 1, 9]), 1)
    assert mixed.point[:, 0].tolist() == [True, False, True, False]
    assert torch.equal(mixed.rsample()[[0, 2]], x0[[0, 2]]) and torch.equal(
        mixed.log_prob(x0)[0], torch.zeros(3)
    )


def test_full_chain_guide_has_the_forward_marginals():
    """Sampling the guide backwards (x_T first) gives q(x_t | x0) at every t (z-tests on mean and var)."""
    model = DDPM(data_shape=(1,), timesteps=6, schedule="cosine").double()
    alpha_bar = alpha_bar_table("cosine", 6)
    x0 = torch.full((20000, 1), 0.8, dtype=torch.float64)
    trace = poutine.trace(model.guide).get_trace(x0)
    for t in range(1, 7):
        draws = trace.nodes[f"x_{t}"]["value"].squeeze(-1)
        mean, var = math.sqrt(alpha_bar[t].item()) * 0.8, 1 - alpha_bar[t].item()
        assert abs(ztest(draws, mean)) < Z_LIMIT
        assert abs(ztest((draws - mean) ** 2, var)) < Z_LIMIT


def test_full_chain_sites():
    model = DDPM(data_shape=(2,), timesteps=3)
    x0 = torch.randn(5, 2)
    guide_trace = poutine.trace(model.guide).get_trace(x0)
    model_trace = poutine.trace(poutine.replay(model.model, trace=guide_trace)).get_trace(x0)
    latent = [
        name
        for name, site in model_trace.nodes.items()
        if site["type"] == "sample" and not site["is_observed"] and name.startswith("x_")
    ]
    assert latent == ["x_3", "x_2", "x_1"]
    assert model_trace.nodes["x_0"]["is_observed"] and torch.equal(model_trace.nodes["x_0"]["value"], x0)
    assert model_trace.nodes["x_1"]["fn"].batch_shape == (5,) and model_trace.nodes["x_1"][
        "fn"
    ].event_shape == (2,)
    # num_data: x0 is a batch of a larger data set, every datum's terms scaled by num_data / len(x0)
    scaled = poutine.trace(model.model).get_trace(x0, num_data=20)
    assert scaled.nodes["x_0"]["scale"] == pytest.approx(4.0) and scaled.nodes["x_3"][
        "scale"
    ] == pytest.approx(4.0)


# ---- the ELBO, four ways, and the power of these tests -----------------------------------------------
@pytest.mark.parametrize(
    "schedule,reverse_variance",
    [("linear", "beta"), ("cosine", "beta_tilde")],
    ids=["linear-beta", "cosine-beta_tilde"],
)
def test_estimators_agree_with_the_closed_form_elbo(schedule, reverse_variance):
    """For a fixed (linear) network and T = 8, the full chain under Trace_ELBO and TraceMeanField_ELBO, the
    time-subsampled pair under Trace_ELBO and TraceMeanField_ELBO, and elbo(x0) are all unbiased for the
    exact ELBO (z-tests, |z| < 4).

    Power: the same statistics reject a wrong variant. elbo(x0) and the full chains reject the ELBO of the
    other reverse variance (σ_t² = β̃_t for β_t or back: every L_{t−1} mis-scaled); one call of the
    subsampled pair draws one timestep, so its spread is wide — its z-test rejects the terms scored once
    instead of T times (the time plate's scale lost), and test_subsampled_pair_per_timestep_terms pins each
    term at a fixed t."""
    torch.manual_seed(1)
    model, net = linear_ddpm(8, schedule, reverse_variance)
    other_variance = "beta_tilde" if reverse_variance == "beta" else "beta"
    x0 = torch.tensor([[0.5, -1.0], [1.5, 0.2], [-0.3, 0.9]], dtype=torch.float64)
    exact = exact_elbo(model, net, x0)  # (3,)
    swapped = exact_elbo(model, net, x0, reverse_variance=other_variance)
    prior = model.prior_kl(x0)
    unscaled = -prior + (exact + prior) / model.timesteps  # the T terms' mean: each call's one term, unscaled
    # elbo(x0): per datum, 2000 independent draws each (the data repeated)
    draws = model.elbo(x0.repeat(2000, 1)).reshape(2000, 3)
    for n in range(3):
        assert abs(ztest(draws[:, n], exact[n].item())) < Z_LIMIT
        assert abs(ztest(draws[:, n], swapped[n].item())) > Z_LIMIT, f"elbo(x0) misses σ² = {other_variance}"
    repeated = x0.repeat(200, 1)  # 600 data per call: each call is a sum of 600 independent draws
    estimators = {  # label: (model, guide, loss, data per call, calls, wrong variant)
        "full chain, Trace_ELBO": (model.model, model.guide, Trace_ELBO(), repeated, 50, swapped),
        "full chain, TraceMeanField_ELBO": (
            model.model,
            model.guide,
            TraceMeanField_ELBO(),
            repeated,
            50,
            swapped,
        ),
        # one t per call: the spread comes from t, so many calls on the three data
        "subsampled, Trace_ELBO": (*model.svi_program("elbo"), x0, 500, unscaled),
        "subsampled, TraceMeanField_ELBO": (*model.svi_program("meanfield"), x0, 500, unscaled),
    }
    for label, (pair_model, pair_guide, loss, data, calls, wrong) in estimators.items():
        values = torch.tensor([-loss.loss(pair_model, pair_guide, data) for _ in range(calls)])
        repeats = data.shape[0] / 3
        z = ztest(values, exact.sum().item() * repeats)
        assert abs(z) < Z_LIMIT, f"{label}: z = {z:.2f}"
        z_wrong = ztest(values, wrong.sum().item() * repeats)
        assert abs(z_wrong) > Z_LIMIT, f"{label} has no power against the wrong variant: z = {z_wrong:.2f}"


@pytest.mark.parametrize("decoder", ["gaussian", "discretized"])
def test_per_datum_timesteps_estimate_the_same_elbo(decoder):
    """time_sampling="per_datum" (a timestep per datum instead of one per batch): under Trace_ELBO and
    TraceMeanField_ELBO still unbiased for the ELBO — the exact one (Gaussian decoder, linear network), or
    elbo(x0)'s estimate (discretized decoder: two-sample z-test). Power (Gaussian decoder): the ELBO of the
    other reverse variance is rejected."""
    torch.manual_seed(4)
    model, net = linear_ddpm(8, "cosine", decoder=decoder, time_sampling="per_datum")
    x0 = to_model_space(torch.tensor([[100, 30], [250, 128], [0, 200]]), dtype=torch.float64)
    wrong = None
    if decoder == "gaussian":
        reference, reference_stderr = exact_elbo(model, net, x0).sum().item(), 0.0
        wrong = exact_elbo(model, net, x0, reverse_variance="beta_tilde").sum().item()
    else:
        draws = model.elbo(x0.repeat(4000, 1)).reshape(4000, 3).sum(-1)
        reference, reference_stderr = draws.mean().item(), draws.std().item() / math.sqrt(4000)
    repeated = x0.repeat(200, 1)
    for objective in ("elbo", "meanfield"):
        pair_model, pair_guide, loss = model.svi_program(objective)
        values = torch.tensor([-loss.loss(pair_model, pair_guide, repeated) / 200 for _ in range(150)])
        stderr = math.sqrt(values.var().item() / len(values) + reference_stderr**2)
        assert abs(values.mean().item() - reference) < Z_LIMIT * stderr, objective
        if wrong is not None:
            assert abs(values.mean().item() - wrong) > Z_LIMIT * stderr, f"{objective}: no power"


def test_subsampled_pair_per_timestep_terms():
    """With timestep=t fixed, the subsampled Trace_ELBO is T × (term t) − L_T: check each t against elbo's
    closed-form terms (which the previous test ties to the exact ELBO)."""
    torch.manual_seed(2)
    model, _ = linear_ddpm(5, "cosine", "beta")
    x0 = torch.tensor([[0.5, -1.0]], dtype=torch.float64).repeat(400, 1)
    _, terms = model.elbo(x0, return_terms=True)
    prior = terms["prior"].sum().item()
    loss = TraceMeanField_ELBO()
    model_fn, guide_fn, _ = model.svi_program("meanfield")
    for t in range(1, 6):
        value = -loss.loss(model_fn, guide_fn, x0, timestep=t)
        expected_term = terms["decoder"] if t == 1 else -terms["kl"][t - 2]
        per_datum = (value + prior) / 5
        # both are sums over 400 independent draws; compare the difference against its standard error
        other = expected_term.sum().item()
        spread = expected_term.std().item() * math.sqrt(400) * math.sqrt(2)
        assert abs(per_datum - other) < Z_LIMIT * spread, t


def test_elbo_of_a_nonlinear_network_matches_the_full_chain():
    """With the default MLP (nonlinear), the full chain's Trace_ELBO, the subsampled pair and elbo(x0) agree
    in expectation: two-sample z-tests between estimators."""
    torch.manual_seed(3)
    model = DDPM(data_shape=(2,), timesteps=6, schedule="cosine", hidden_dim=32).double()
    nn.init.normal_(model.denoiser.output.weight, std=0.3)
    x0 = torch.tensor([[0.5, -1.0], [1.5, 0.2]], dtype=torch.float64)
    reference = model.elbo(x0.repeat(2000, 1)).reshape(2000, 2).sum(-1)  # 2000 draws of the total
    full = torch.tensor(
        [-Trace_ELBO().loss(model.model, model.guide, x0.repeat(20, 1)) / 20 for _ in range(50)]
    )
    sub_model, sub_guide, loss = model.svi_program("elbo")
    sub = torch.tensor([-loss.loss(sub_model, sub_guide, x0) for _ in range(400)])
    for label, values in {"full chain": full, "subsampled": sub}.items():
        difference = values.mean() - reference.mean()
        stderr = math.sqrt(values.var() / len(values) + reference.var() / len(reference))
        assert abs(difference / stderr) < Z_LIMIT, label


def test_time_sampler_takes_drawn_indices_and_scales():
    """The time plate fed indices drawn from a non-uniform p_t and scaled by 1/(T·p_t) (importance-sampled
    time, DESIGN.md) keeps the subsampled pair unbiased for the exact ELBO: the sub-programs need no
    change."""
    torch.manual_seed(6)
    model, net = linear_ddpm(8, "linear", "beta")
    schedule, T = model.schedule, model.timesteps
    x0 = torch.tensor([[0.5, -1.0], [1.5, 0.2], [-0.3, 0.9]], dtype=torch.float64)
    p = torch.linspace(1.0, 3.0, T, dtype=torch.float64)
    p = p / p.sum()

    def half(program):
        def run(x0):
            index = pyro.sample("t_index", dist.Categorical(p).mask(False))  # drawn in the guide, replayed
            with pyro.plate("data", x0.shape[0]):
                if program is reverse_pair:
                    pyro.factor("prior_kl", -prior_kl(schedule, x0, 1))
                with plate_timesteps(
                    T, device=x0.device, subsample=index.view(1), scale=1 / (T * p[index])
                ) as draw:
                    if program is reverse_pair:
                        reverse_pair(net, schedule, x0, draw.t, 1, scale=draw.scale)
                    else:
                        forward_pair(schedule, x0, draw.t, 1, scale=draw.scale)

        return run

    values = torch.tensor(
        [-Trace_ELBO().loss(half(reverse_pair), half(forward_pair), x0) for _ in range(500)]
    )
    assert abs(ztest(values, exact_elbo(model, net, x0).sum().item())) < Z_LIMIT


# ---- chains inside other programs ------------------------------------------------------------------------
class LatentChainToy(nn.Module):
    """x | z_0 ~ N(W z_0 + c, 0.5² I) (3-d) whose 2-d latent z_0 has a 3-step diffusion chain as its prior
    (sites "z_3" … "z_0", prefix "z"); the guide draws z_0 ~ q(z_0 | x), then the forward chain from it.
    With the untrained denoiser (ε_θ = 0) the chain's z_0 is N(0, v I), v = 1/ᾱ_3 + Σ_t σ_t²/ᾱ_{t−1}."""

    def __init__(self, betas=(0.1, 0.2, 0.3)):
        super().__init__()
        self.schedule = DiffusionSchedule(torch.tensor(betas))
        self.denoiser = MLPDenoiser(2, len(betas), hidden_dim=8)  # zero output layer: ε_θ = 0
        self.decoder = nn.Linear(2, 3)
        self.encoder = nn.Linear(3, 4)

    def model(self, x):
        pyro.module("latent_chain_toy", self)
        with pyro.plate("data", x.shape[0]):
            z0 = reverse_chain(self.denoiser, self.schedule, (2,), prefix="z")
            pyro.sample("x", dist.Normal(self.decoder(z0), 0.5).to_event(1), obs=x)

    def guide(self, x):
        pyro.module("latent_chain_toy", self)
        with pyro.plate("data", x.shape[0]):
            loc, log_scale = self.encoder(x).chunk(2, -1)
            z0 = pyro.sample("z_0", dist.Normal(loc, log_scale.exp()).to_event(1))
            forward_chain(self.schedule, z0, 1, prefix="z")

    def log_marginal(self, x):
        betas = self.schedule.beta[1:].double()
        alpha_bar = torch.cat([torch.ones(1, dtype=torch.float64), torch.cumprod(1 - betas, 0)])
        v = 1 / alpha_bar[-1] + (betas / alpha_bar[:-1]).sum()  # σ_t² = β_t (σ_1² = β_1 too)
        weight, bias = self.decoder.weight.detach().double(), self.decoder.bias.detach().double()
        covariance = v * weight @ weight.T + 0.25 * torch.eye(3, dtype=torch.float64)
        return dist.MultivariateNormal(bias, covariance).log_prob(x.double())


def test_chain_runs_inside_another_programs_plate():
    """A two-level model whose latent prior is a diffusion chain: its sites sit in the caller's "data"
    plate, log_evidence through the chain (prior or guide proposals) matches the exact marginal, and
    Trace_ELBO trains it while staying below that marginal."""
    torch.manual_seed(7)
    toy = LatentChainToy().double()
    x = torch.randn(4, 3, dtype=torch.float64)
    guide_trace = poutine.trace(toy.guide).get_trace(x)
    model_trace = prune_subsample_sites(
        poutine.trace(poutine.replay(toy.model, trace=guide_trace)).get_trace(x)
    )
    latent = [
        name
        for name, site in model_trace.nodes.items()
        if site["type"] == "sample" and not site["is_observed"]
    ]
    assert latent == ["z_3", "z_2", "z_1", "z_0"] and model_trace.nodes["x"]["is_observed"]
    for name in latent:
        assert [frame.name for frame in model_trace.nodes[name]["cond_indep_stack"]] == ["data"]
        assert model_trace.nodes[name]["value"].shape == (4, 2)
    # importance sampling through the whole hierarchy, from the prior chain and from the guide
    naive = log_evidence(toy.model, toy.guide, x, num_samples=20000, proposal="prior")
    torch.testing.assert_close(naive, toy.log_marginal(x), atol=0.1, rtol=0)
    guided = log_evidence(toy.model, toy.guide, x, num_samples=5000)
    torch.testing.assert_close(guided, toy.log_marginal(x), atol=0.3, rtol=0)
    # Trace_ELBO trains the chain, encoder and decoder together, and stays a bound on the new evidence
    elbo = Trace_ELBO(num_particles=500, vectorize_particles=True, max_plate_nesting=1)
    before = -elbo.loss(toy.model, toy.guide, x)
    step = SVIStep(toy.model, toy.guide, Trace_ELBO(), lr=1e-2, module=toy)
    for _ in range(100):
        step(x)
    after = -elbo.loss(toy.model, toy.guide, x)
    assert after > before + 5, (before, after)
    assert after < toy.log_marginal(x).sum().item() + 0.5


def test_prior_predictive_draws_x0_at_its_observed_site():
    """Predictive(model, num_samples=S)(None, num_data=N) samples every site, x_0 included. With the
    untrained denoiser (ε_θ = 0) each step is x_{t−1} = x_t/√α_t + σ_t z, so x_0 ~ N(0, v I) with
    v = 1/ᾱ_T + Σ_t σ_t²/ᾱ_{t−1} (z-tests on its mean and variance)."""
    model = DDPM(data_shape=(2,), timesteps=4, schedule="cosine", hidden_dim=8).double()
    draws = Predictive(model.model, num_samples=200)(None, num_data=50)
    assert set(draws) >= {"x_4", "x_3", "x_2", "x_1", "x_0"}
    assert draws["x_0"].shape == (200, 50, 2) and torch.isfinite(draws["x_0"]).all()
    betas = make_betas("cosine", 4)
    alpha_bar = alpha_bar_table("cosine", 4)
    v = (1 / alpha_bar[-1] + (betas / alpha_bar[:-1]).sum()).item()
    x0 = draws["x_0"].flatten()
    assert abs(ztest(x0, 0.0)) < Z_LIMIT and abs(ztest(x0.square(), v)) < Z_LIMIT
    # the same program observes x_0 when it is given, at the same site
    observed = poutine.trace(model.model).get_trace(draws["x_0"][0])
    assert observed.nodes["x_0"]["is_observed"]
    # 8-bit images: the prior predictive lies on the pixel grid of model space
    images = DDPM(data_shape=(1, 4, 4), timesteps=3, channels=(4,))
    pixels = Predictive(images.model, num_samples=2)(None, num_data=3)["x_0"]
    assert pixels.shape == (2, 3, 1, 4, 4)
    check_model_space("x_0", pixels)


# ---- L_simple ------------------------------------------------------------------------------------------
def _drawn_timesteps(model: DDPM, guide_trace, x0: torch.Tensor) -> torch.Tensor:
    """The timestep of each datum, (N,), as the guide drew it (time plate, or per datum)."""
    if model.time_sampling == "plate":
        return torch.full((x0.shape[0],), int(guide_trace.nodes["time"]["value"][0]) + 1)
    if "t" not in guide_trace.nodes:
        raise AssertionError("a fixed timestep was used")
    return guide_trace.nodes["t"]["value"].floor().long() + 1


@pytest.mark.parametrize("time_sampling", ["plate", "per_datum"])
@pytest.mark.parametrize("decoder", ["gaussian", "discretized"])
@pytest.mark.parametrize("reverse_variance", ["beta", "beta_tilde"])
def test_l_simple_gradient_matches_hand_written(decoder, reverse_variance, time_sampling):
    """svi_program("simple") has loss Σ_n ‖ε_n − ε_θ(x_t, t_n)‖² and the same gradient as that, hand-written
    (for t = 1 too, where the decoder is replaced by its Gaussian density as in DDPM)."""
    model = DDPM(
        data_shape=(2,),
        timesteps=10,
        decoder=decoder,
        reverse_variance=reverse_variance,
        hidden_dim=32,
        time_sampling=time_sampling,
    )
    nn.init.normal_(model.denoiser.output.weight, std=0.3)
    alpha_bar = alpha_bar_table("linear", 10)
    x0 = to_model_space(torch.randint(0, 256, (64, 2)))
    pair_model, pair_guide, loss = model.svi_program("simple")
    seen = set()
    for fixed in [1, 2, 10, None, None]:  # None: t drawn (by the time plate, or per datum)
        guide_trace = poutine.trace(pair_guide).get_trace(x0, timestep=fixed)
        t = torch.full((64,), fixed) if fixed is not None else _drawn_timesteps(model, guide_trace, x0)
        seen.update(t.tolist())
        x_t = guide_trace.nodes["x_t"]["value"].reshape(x0.shape)
        eps = (x_t.double() - alpha_bar[t, None].sqrt() * x0) / (1 - alpha_bar[t, None]).sqrt()
        model.zero_grad()
        hand = (eps.float() - model.denoiser(x_t, t)).square().sum()
        hand.backward()
        expected = [p.grad.clone() for p in model.denoiser.parameters()]
        model.zero_grad()
        replayed = poutine.replay(pair_guide, trace=guide_trace)
        pyro_loss = loss.differentiable_loss(pair_model, replayed, x0, timestep=fixed)
        pyro_loss.backward()
        assert pyro_loss.item() == pytest.approx(hand.item(), rel=1e-5)
        for p, g in zip(model.denoiser.parameters(), expected):
            torch.testing.assert_close(p.grad, g, rtol=1e-4, atol=1e-6)
    assert 1 in seen and len(seen) >= 3


# ---- the discretized decoder ---------------------------------------------------------------------------
@pytest.mark.parametrize(
    "loc,scale",
    [(0.0, 0.01), (0.3, 0.1), (-0.999, 0.002), (1.7, 0.05), (0.0, 3.0), (0.5, 1e-4), (-4.0, 0.5)],
)
def test_discretized_gaussian_sums_to_one(loc, scale):
    grid = torch.arange(256, dtype=torch.float64) / 127.5 - 1
    decoder = DiscretizedGaussian(
        torch.tensor(loc, dtype=torch.float64), torch.tensor(scale, dtype=torch.float64)
    )
    log_p = decoder.log_prob(grid)
    assert torch.isfinite(log_p).all()
    assert torch.logsumexp(log_p, 0).exp().item() == pytest.approx(1.0, abs=1e-10)
    # inner bins: Φ(b) − Φ(a) computed directly where it is representable
    normal = torch.distributions.Normal(decoder.loc, decoder.scale)
    direct = normal.cdf(grid + 1 / 255) - normal.cdf(grid - 1 / 255)
    inner = (direct > 1e-4) & (grid.abs() < 1 - 1e-3)  # where the direct difference is accurate
    torch.testing.assert_close(log_p[inner], direct[inner].log(), rtol=1e-6, atol=1e-9)


def test_discretized_gaussian_tails_and_gradients():
    loc = torch.tensor([0.0, 0.0, 0.9], requires_grad=True)
    value = torch.tensor([-1.0, 0.6, 1.0])  # left edge 10σ away, an inner bin 60σ away, the right edge
    log_p = DiscretizedGaussian(loc, torch.tensor(0.01)).log_prob(value)
    assert torch.isfinite(log_p).all() and log_p[1] < -1000
    log_p.sum().backward()
    assert torch.isfinite(loc.grad).all()
    with pytest.raises(ValueError):
        DiscretizedGaussian(torch.zeros(1), torch.ones(1), validate_args=True).log_prob(torch.tensor([0.001]))


def test_discretized_elbo_is_a_probability_bound():
    """bits/dim under the discretized decoder are ≥ 0 and the decoder term is a log probability ≤ 0."""
    model = DDPM(data_shape=(1, 8, 8), timesteps=10, channels=(8,), decoder="discretized")
    x0 = to_model_space(torch.randint(0, 256, (3, 1, 8, 8)))
    _, terms = model.elbo(x0, return_terms=True)
    assert (terms["decoder"] <= 0).all() and (model.bits_per_dim(x0) > 0).all()


# ---- sampling ------------------------------------------------------------------------------------------
def test_sampling_shapes_chain_and_reproducibility():
    model = DDPM(data_shape=(2,), timesteps=20, hidden_dim=16)
    nn.init.normal_(model.denoiser.output.weight, std=0.3)
    generator = torch.Generator().manual_seed(5)
    chain = model.sample(7, return_chain=True, chain_length=5, generator=generator, progress=False)
    assert chain.samples.shape == (7, 2) and chain.states.shape == (5, 7, 2)
    assert chain.times == [20, 15, 10, 5, 0] and torch.equal(chain.states[-1], chain.samples)
    again = model.sample(7, generator=torch.Generator().manual_seed(5), batch_size=7, progress=False)
    torch.testing.assert_close(again, chain.samples)
    batched = model.sample(7, batch_size=3, progress=False)
    assert batched.shape == (7, 2)
    ddim = model.sample(6, steps=5, eta=0.0, return_chain=True, chain_length=6, progress=False)
    assert ddim.samples.shape == (6, 2) and ddim.times == [20, 15, 10, 6, 1, 0]


@pytest.mark.parametrize("reverse_variance", ["beta", "beta_tilde"])
def test_ancestral_steps_are_the_reverse_kernels(reverse_variance):
    """Each ancestral step from x_t (t ≥ 2) is N(μ_θ(x_t, t), σ_t²) and the last returns μ_θ(x_1, 1), for a
    network whose output is known (ε = 0.5 x + 0.1 t), T = 3: the recorded chain's residuals
    x_{t−1} − μ_θ(x_t, t) have mean 0 and variance σ_t² (z-tests) — and not the other variant's σ_t²."""
    model = DDPM(
        AffineDenoiser(), data_shape=(1,), timesteps=3, schedule="cosine", reverse_variance=reverse_variance
    )
    model.double()
    betas = make_betas("cosine", 3)
    alpha_bar = alpha_bar_table("cosine", 3)
    chain = model.sample(20000, return_chain=True, chain_length=4, generator=torch.Generator().manual_seed(0))
    assert chain.times == [3, 2, 1, 0]
    states = {t: chain.states[k, :, 0] for k, t in enumerate(chain.times)}

    def mean(x, t):  # μ_θ (DDPM Eq. 11), from the betas
        eps = 0.5 * x + 0.1 * t
        beta = betas[t - 1].item()
        return (x - beta / math.sqrt(1 - alpha_bar[t].item()) * eps) / math.sqrt(1 - beta)

    for t in (3, 2):
        beta = betas[t - 1].item()
        beta_tilde = (1 - alpha_bar[t - 1].item()) / (1 - alpha_bar[t].item()) * beta
        sigma2, other = (beta, beta_tilde) if reverse_variance == "beta" else (beta_tilde, beta)
        residual = states[t - 1] - mean(states[t], t)
        assert abs(ztest(residual, 0.0)) < Z_LIMIT, t
        assert abs(ztest(residual.square(), sigma2)) < Z_LIMIT, t
        assert abs(ztest(residual.square(), other)) > Z_LIMIT, f"t = {t}: σ_t² not told apart"
    torch.testing.assert_close(states[0], mean(states[1], 1))


def test_ddim():
    """η = 0 is deterministic given x_T; η = 1 on all T steps is ancestral sampling with σ_t² = β̃_t, draw for
    draw (the same noise sequence), since then √ᾱ_{t−1} x̂_0 + √(1 − ᾱ_{t−1} − β̃_t) ε̂ = μ̃_t(x_t, x̂_0)."""
    model = DDPM(data_shape=(2,), timesteps=30, hidden_dim=16, reverse_variance="beta_tilde").double()
    nn.init.normal_(model.denoiser.output.weight, std=0.05)
    a = model.sample(4, steps=10, generator=torch.Generator().manual_seed(1), progress=False)
    b = model.sample(4, steps=10, eta=0.0, generator=torch.Generator().manual_seed(1), progress=False)
    torch.testing.assert_close(a, b)
    ancestral = model.sample(50, generator=torch.Generator().manual_seed(2), progress=False)
    ddim = model.sample(50, steps=30, eta=1.0, generator=torch.Generator().manual_seed(2), progress=False)
    torch.testing.assert_close(ddim, ancestral)
    clipped = model.sample(50, generator=torch.Generator().manual_seed(2), clip_denoised=True, progress=False)
    assert clipped.shape == (50, 2) and torch.isfinite(clipped).all()


# ---- EMA and checkpoints -------------------------------------------------------------------------------
def test_ema_is_an_average_in_the_state_dict_that_drives_sampling():
    model = DDPM(data_shape=(2,), timesteps=10, hidden_dim=16, ema_decay=0.9)
    assert not any(p.requires_grad for p in model.ema.parameters())  # never trained
    assert "ema.n_averaged" in model.state_dict()
    assert any(key.startswith("ema.module.") for key in model.state_dict())
    step = SVIStep(*model.svi_program("elbo"), lr=1e-3, module=model, after_step=model.after_step)
    step(torch.randn(8, 2))
    assert {id(p) for p in step.params} == {id(p) for p in model.denoiser.parameters()}  # the average is not
    trained = {f"{model.name}$$${key}" for key, p in model.named_parameters() if p.requires_grad}
    assert set(pyro.get_param_store().keys()) == trained  # names as for a family registered whole
    assert int(model.ema_updates) == 1
    live = model.denoiser.output.weight
    torch.testing.assert_close(model.ema_denoiser.output.weight, live)  # the first update copies
    with torch.no_grad():
        live.add_(1.0)
    shadow_before = model.ema_denoiser.output.weight.clone()
    generator = torch.Generator().manual_seed(0)
    model.after_step()  # the second update: decay min(0.9, 2/11)
    shadow = model.ema_denoiser.output.weight
    torch.testing.assert_close(shadow, 2 / 11 * shadow_before + 9 / 11 * live)
    after = model.sample(3, generator=generator, progress=False)  # the EMA weights
    live_draws = model.sample(3, generator=torch.Generator().manual_seed(0), use_ema=False, progress=False)
    assert not torch.allclose(after, live_draws)
    rebuilt = DDPM(**model.constructor_kwargs())
    rebuilt.load_state_dict(model.state_dict())
    assert int(rebuilt.ema_updates) == 2 and torch.equal(rebuilt.ema_denoiser.output.weight, shadow)


def test_checkpoint_round_trips_a_trained_ddpm_with_its_ema(tmp_path):
    model = DDPM(data_shape=(2,), timesteps=5, hidden_dim=8, ema_decay=0.9)
    data = two_moons(64, generator=torch.Generator().manual_seed(0))
    train(
        model, BatchLoader(data, batch_size=32, seed=0), epochs=2, objective="simple", lr=1e-2, progress=False
    )
    assert int(model.ema_updates) == 4
    path = save_checkpoint(tmp_path / "ddpm.pt", model, epoch=2)
    loaded = pvae.load(path)
    assert type(loaded) is DDPM and int(loaded.ema_updates) == 4
    for key, value in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key
    draws = [
        family.sample(5, generator=torch.Generator().manual_seed(1), progress=False)
        for family in (model, loaded)
    ]
    torch.testing.assert_close(draws[0], draws[1])


def test_image_defaults():
    model = DDPM(data_shape=(1, 28, 28), timesteps=10, channels=(8, 16))
    assert model.config.decoder == "discretized" and model.config.ema_decay == 0.999
    assert DDPM(data_shape=(2,)).config.ema_decay == 0.0


# ---- training on two moons -----------------------------------------------------------------------------
MOONS_NOISE = 0.1
MMD_BANDWIDTH = 0.25
MMD_POINTS = 500


@pytest.mark.slow
def test_trained_on_two_moons_samples_match_the_data():
    """L_simple on the time-subsampled pair with a timestep per point, T = 50 (cosine), trained by
    ``pvae.inference.train``: 100 epochs of 4,000 points in batches of 256 (1,600 Adam steps, learning rate
    decayed geometrically from 1e-2 to 1e-4, EMA 0.99). Criterion: MMD² (Gaussian kernel, bandwidth 0.25)
    between 500 samples and 500 fresh data points below 3× the 95th percentile of MMD² between two
    independent data sets of 500 (the null, 100 pairs). A Gaussian with the data's mean and covariance,
    and a single moon, lie more than 3× above that threshold (checked, so it can fail)."""
    pyro.set_rng_seed(0)
    generator = torch.Generator().manual_seed(0)
    data = two_moons(4000, noise=MOONS_NOISE, generator=generator)
    model = DDPM(data_shape=(2,), timesteps=50, schedule="cosine", ema_decay=0.99, time_sampling="per_datum")
    loader = BatchLoader(data, batch_size=256, seed=0)
    train(model, loader, epochs=100, objective="simple", lr=1e-2, lr_end=1e-4, progress=False)
    assert model.ema_updates.item() == 1600
    samples = model.sample(MMD_POINTS, progress=False)

    def draw(count):
        return two_moons(count, noise=MOONS_NOISE, generator=generator)

    reference = draw(MMD_POINTS)
    null = mmd2_null(draw, MMD_POINTS, MMD_BANDWIDTH, repeats=100)
    threshold = 3 * null.quantile(0.95).item()
    gaussian = torch.distributions.MultivariateNormal(reference.mean(0), torch.cov(reference.T))
    one_moon = draw(2 * MMD_POINTS)[::2]  # even indices lie on the upper moon
    assert mmd2(gaussian.sample((MMD_POINTS,)), reference, MMD_BANDWIDTH) > 3 * threshold
    assert mmd2(one_moon, reference, MMD_BANDWIDTH) > 3 * threshold
    distance = mmd2(samples, reference, MMD_BANDWIDTH)
    assert distance < threshold, f"MMD² {distance:.5f} ≥ threshold {threshold:.5f}"


# ---- bad input -----------------------------------------------------------------------------------------
def test_bad_input_errors():
    with pytest.raises(ValueError, match="timesteps"):
        DDPM(timesteps=0)
    with pytest.raises(ValueError, match="timesteps"):
        DDPM(timesteps=-3)
    with pytest.raises(ValueError, match="schedule"):
        DDPM(schedule="quadratic")
    with pytest.raises(ValueError, match="reverse_variance"):
        DDPM(reverse_variance="fixed")
    with pytest.raises(ValueError, match="decoder"):
        DDPM(decoder="bernoulli")
    with pytest.raises(ValueError, match="ema_decay"):
        DDPM(ema_decay=1.0)
    with pytest.raises(ValueError, match="data_shape"):
        DDPM(data_shape=())
    with pytest.raises(ValueError, match="time_sampling"):
        DDPM(time_sampling="per_batch")
    with pytest.raises(ValueError, match="betas"):
        DiffusionSchedule(torch.tensor([0.1, 1.0]))
    model = DDPM(data_shape=(2,), timesteps=4)
    with pytest.raises(ValueError, match="shape"):
        model.elbo(torch.randn(5, 3))
    with pytest.raises(ValueError, match="shape"):
        Trace_ELBO().loss(model.model, model.guide, torch.randn(5))
    with pytest.raises(ValueError, match="finite"):
        model.elbo(torch.tensor([[0.0, float("nan")]]))
    with pytest.raises(ValueError, match="timestep"):
        model.model_subsampled(torch.zeros(1, 2), timestep=5)
    with pytest.raises(ValueError, match="num_data"):
        model.model()  # the prior predictive needs a number of draws
    with pytest.raises(ValueError, match="num_data"):
        model.model(torch.zeros(3, 2), num_data=2)  # fewer data than the batch holds
    with pytest.raises(ValueError, match="x0 is required"):
        model.guide(None, num_data=3)
    with pytest.raises(ValueError, match="objective"):
        model.svi_program("hybrid")
    with pytest.raises(ValueError, match="num_samples"):
        model.sample(0)
    with pytest.raises(ValueError, match="steps"):
        model.sample(2, steps=5)
    images = DDPM(data_shape=(1, 8, 8), timesteps=4, channels=(8,))
    with pytest.raises(ValueError, match="model space"):
        images.elbo(torch.rand(2, 1, 8, 8))  # grey levels in [0, 1], not on the [−1, 1] grid
    with pytest.raises(ValueError, match="model space"):
        Trace_ELBO().loss(*images.svi_program("elbo")[:2], torch.full((2, 1, 8, 8), 1.5))


def test_empty_batch_raises():
    """An empty batch says so (rather than only that the shape is wrong)."""
    model = DDPM(data_shape=(2,), timesteps=3)
    x0 = torch.zeros(0, 2)
    for method in (model.model, model.guide, model.model_subsampled, model.guide_subsampled, model.elbo):
        with pytest.raises(
            ValueError, match=r"x0 is an empty batch, shape \(0, 2\): a batch needs at least one"
        ):
            method(x0)


@pytest.mark.parametrize("decoder", ["gaussian", "discretized"])
def test_non_finite_data_are_counted(decoder):
    model = DDPM(data_shape=(2,), timesteps=3, decoder=decoder)
    x0 = torch.zeros(3, 2)
    x0[0, 1], x0[2, 0] = math.nan, math.inf
    for method in (model.model, model.guide, model.model_subsampled, model.guide_subsampled, model.elbo):
        with pytest.raises(ValueError, match="x0 must be finite; it has 2 NaN/inf entries"):
            method(x0)
