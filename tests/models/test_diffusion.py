"""DDPM as a Pyro model/guide pair: schedules, forward-process formulas, three ELBO estimators against the
closed form, L_simple, the discretized decoder, sampling, EMA, and training on two moons."""

import math

import pyro
import pytest
import torch
from pyro import poutine
from pyro.infer import Trace_ELBO, TraceMeanField_ELBO
from torch import nn

from pvae.data import BatchLoader, to_model_space, two_moons
from pvae.inference import train
from pvae.models.diffusion import DDPM, DiscretizedGaussian, make_betas
from pvae.two_sample import mmd2, mmd2_null

Z_LIMIT = 4.0  # two-sided z-test threshold: a false alarm has probability ~6e-5 per test


pytestmark = pytest.mark.usefixtures("one_thread")  # thousands of tiny steps: threads only cost


class LinearDenoiser(nn.Module):
    """ε_θ(x, t) = a_t ⊙ x + b_t: μ_θ is linear in x_t, so the ELBO's expectation is exact in closed form."""

    def __init__(self, dim: int, timesteps: int):
        super().__init__()
        self.a = nn.Parameter(torch.zeros(timesteps + 1, dim))
        self.b = nn.Parameter(torch.zeros(timesteps + 1, dim))

    def forward(self, x, t):
        index = torch.as_tensor(t, device=x.device).long()
        return self.a[index] * x + self.b[index]


def exact_elbo(model: DDPM, net: LinearDenoiser, x0: torch.Tensor) -> torch.Tensor:
    """The exact per-datum ELBO of a Gaussian-decoder DDPM with a linear denoiser, (N,), derived here by
    conditioning the joint Gaussian (x_{t−1}, x_t) | x_0 — independently of the library's coefficients."""
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
        sigma2 = beta_t if model.config.reverse_variance == "beta" else post_var
        second_moment = (A * x0 - K + (B - M) * m_t) ** 2 + (B - M) ** 2 * v_t  # E(μ̃ − μ_θ)²
        total = total + 0.5 * (math.log(sigma2 / post_var) + (post_var + second_moment) / sigma2 - 1)
    return -total.sum(-1)


def linear_ddpm(timesteps=8, schedule="linear", reverse_variance="beta", dim=2):
    """A DDPM with a linear denoiser near the optimal one for N(0, I) data (E[ε | x_t] = √(1 − ᾱ_t) x_t),
    perturbed at random."""
    net = LinearDenoiser(dim, timesteps)
    model = DDPM(
        net, data_shape=(dim,), timesteps=timesteps, schedule=schedule, reverse_variance=reverse_variance
    )
    model.double()
    with torch.no_grad():
        net.a.copy_(model.sqrt_one_minus_alpha_bar[:, None] + 0.1 * torch.randn(timesteps + 1, dim))
        net.b.copy_(0.1 * torch.randn(timesteps + 1, dim))
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


def test_schedule_buffers_follow_dtype_and_match_float64():
    model = DDPM(data_shape=(2,), timesteps=50)
    assert model.alpha_bar.dtype == torch.float32
    model.double()
    assert model.alpha_bar.dtype == torch.float64
    torch.testing.assert_close(
        model.alpha_bar[1:], torch.cumprod(1 - make_betas("linear", 50), 0), rtol=1e-14, atol=0
    )
    assert "alpha_bar" not in model.state_dict()  # derived from the config, not stored


# ---- forward-process formulas --------------------------------------------------------------------------
@pytest.mark.parametrize("schedule", ["linear", "cosine"])
def test_forward_marginal_composes_one_step_kernels(schedule):
    model = DDPM(data_shape=(2,), timesteps=20, schedule=schedule).double()
    x0 = torch.tensor([[0.7, -1.3]], dtype=torch.float64)
    mean, var = x0.clone(), torch.zeros_like(x0)
    for t in range(1, 21):
        beta = model.beta[t].item()
        mean, var = math.sqrt(1 - beta) * mean, (1 - beta) * var + beta  # x_t = √α_t x_{t−1} + √β_t ε
        marginal = model._forward_marginal(x0, t).base_dist
        torch.testing.assert_close(marginal.loc, mean)
        torch.testing.assert_close(marginal.scale**2, var)


@pytest.mark.parametrize("schedule", ["linear", "cosine"])
def test_forward_posterior_is_gaussian_conditioning(schedule):
    model = DDPM(data_shape=(3,), timesteps=15, schedule=schedule).double()
    x0, x_t = torch.randn(4, 3, dtype=torch.float64), torch.randn(4, 3, dtype=torch.float64)
    for t in range(2, 16):
        abar_prev, abar_t = model.alpha_bar[t - 1].item(), model.alpha_bar[t].item()
        alpha_t = 1 - model.beta[t].item()
        # (x_{t−1}, x_t) | x0 is jointly Gaussian: Var x_{t−1} = 1 − ᾱ_{t−1}, Cov = √α_t (1 − ᾱ_{t−1})
        var_prev, cov, var_t = 1 - abar_prev, math.sqrt(alpha_t) * (1 - abar_prev), 1 - abar_t
        mean = math.sqrt(abar_prev) * x0 + cov / var_t * (x_t - math.sqrt(abar_t) * x0)
        variance = var_prev - cov**2 / var_t
        posterior = model._forward_posterior(x_t, x0, t).base_dist
        torch.testing.assert_close(posterior.loc, mean)
        torch.testing.assert_close(posterior.scale**2, torch.full_like(mean, variance))
    # t = 1: β̃_1 = 0, the posterior is the point mass at x0
    assert torch.equal(model._forward_posterior(x_t, x0, 1).v, x0)


def test_full_chain_guide_has_the_forward_marginals():
    """Sampling the guide backwards (x_T first) gives q(x_t | x0) at every t (z-tests on mean and var)."""
    model = DDPM(data_shape=(1,), timesteps=6, schedule="cosine").double()
    x0 = torch.full((20000, 1), 0.8, dtype=torch.float64)
    trace = poutine.trace(model.guide).get_trace(x0)
    for t in range(1, 7):
        draws = trace.nodes[f"x_{t}"]["value"].squeeze(-1)
        marginal = model._forward_marginal(x0[:1], t).base_dist
        mean, var = marginal.loc.item(), marginal.scale.item() ** 2
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


# ---- the ELBO, four ways -------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "schedule,reverse_variance",
    [("linear", "beta"), ("cosine", "beta_tilde")],
    ids=["linear-beta", "cosine-beta_tilde"],
)
def test_estimators_agree_with_the_closed_form_elbo(schedule, reverse_variance):
    """For a fixed (linear) network and T = 8, the full chain under Trace_ELBO and TraceMeanField_ELBO, the
    time-subsampled pair under Trace_ELBO and TraceMeanField_ELBO, and elbo(x0) are all unbiased for the
    exact ELBO (z-tests, |z| < 4)."""
    torch.manual_seed(1)
    model, net = linear_ddpm(8, schedule, reverse_variance)
    x0 = torch.tensor([[0.5, -1.0], [1.5, 0.2], [-0.3, 0.9]], dtype=torch.float64)
    exact = exact_elbo(model, net, x0)  # (3,)
    # elbo(x0): per datum, 1000 independent draws each (the data repeated)
    draws = model.elbo(x0.repeat(1000, 1)).reshape(1000, 3)
    for n in range(3):
        assert abs(ztest(draws[:, n], exact[n].item())) < Z_LIMIT
    repeated = x0.repeat(200, 1)  # 600 data per call: each call is a sum of 600 independent draws
    estimators = {  # label: (model, guide, loss, data per call, calls)
        "full chain, Trace_ELBO": (model.model, model.guide, Trace_ELBO(), repeated, 50),
        "full chain, TraceMeanField_ELBO": (model.model, model.guide, TraceMeanField_ELBO(), repeated, 50),
        # one t per call: the spread comes from t, so many calls on the three data
        "subsampled, Trace_ELBO": (*model.svi_program("elbo"), x0, 500),
        "subsampled, TraceMeanField_ELBO": (*model.svi_program("meanfield"), x0, 500),
    }
    for label, (pair_model, pair_guide, loss, data, calls) in estimators.items():
        values = torch.tensor([-loss.loss(pair_model, pair_guide, data) for _ in range(calls)])
        target = exact.sum().item() * data.shape[0] / 3
        z = ztest(values, target)
        assert abs(z) < Z_LIMIT, f"{label}: z = {z:.2f}"


@pytest.mark.parametrize("decoder", ["gaussian", "discretized"])
def test_per_datum_timesteps_estimate_the_same_elbo(decoder):
    """time_sampling="per_datum" (a timestep per datum instead of one per batch): under Trace_ELBO and
    TraceMeanField_ELBO still unbiased for the ELBO — the exact one (Gaussian decoder, linear network), or
    elbo(x0)'s estimate (discretized decoder: two-sample z-test)."""
    torch.manual_seed(4)
    net = LinearDenoiser(2, 8)
    model = DDPM(
        net, data_shape=(2,), timesteps=8, schedule="cosine", decoder=decoder, time_sampling="per_datum"
    ).double()
    with torch.no_grad():
        net.a.copy_(model.sqrt_one_minus_alpha_bar[:, None] + 0.1 * torch.randn(9, 2))
        net.b.copy_(0.1 * torch.randn(9, 2))
    x0 = to_model_space(torch.tensor([[100, 30], [250, 128], [0, 200]]), dtype=torch.float64)
    if decoder == "gaussian":
        reference, reference_stderr = exact_elbo(model, net, x0).sum().item(), 0.0
    else:
        draws = model.elbo(x0.repeat(4000, 1)).reshape(4000, 3).sum(-1)
        reference, reference_stderr = draws.mean().item(), draws.std().item() / math.sqrt(4000)
    repeated = x0.repeat(200, 1)
    for objective in ("elbo", "meanfield"):
        pair_model, pair_guide, loss = model.svi_program(objective)
        values = torch.tensor([-loss.loss(pair_model, pair_guide, repeated) / 200 for _ in range(60)])
        stderr = math.sqrt(values.var().item() / len(values) + reference_stderr**2)
        assert abs(values.mean().item() - reference) < Z_LIMIT * stderr, objective


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
    x0 = to_model_space(torch.randint(0, 256, (64, 2)))
    pair_model, pair_guide, loss = model.svi_program("simple")
    seen = set()
    for fixed in [1, 2, 10, None, None]:  # None: t drawn (by the time plate, or per datum)
        guide_trace = poutine.trace(pair_guide).get_trace(x0, timestep=fixed)
        t = torch.full((64,), fixed) if fixed is not None else _drawn_timesteps(model, guide_trace, x0)
        seen.update(t.tolist())
        x_t = guide_trace.nodes["x_t"]["value"].reshape(x0.shape)
        eps = (x_t - model.sqrt_alpha_bar[t, None] * x0) / model.sqrt_one_minus_alpha_bar[t, None]
        model.zero_grad()
        hand = (eps - model.denoiser(x_t, t)).square().sum()
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


# ---- sampling and EMA ----------------------------------------------------------------------------------
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


def test_ancestral_sampling_follows_the_reverse_kernels():
    """One ancestral step from x_t is N(μ_θ(x_t, t), σ_t²): compare with the model's own site distribution."""
    model = DDPM(data_shape=(1,), timesteps=1, schedule="linear").double()  # T = 1: x_0 = μ_θ(x_1, 1)
    x1 = torch.randn(5000, 1, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    samples = model.sample(5000, generator=torch.Generator().manual_seed(0), progress=False)
    torch.testing.assert_close(samples, model._reverse_mean(x1, 1))


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


def test_ema_lives_in_buffers_and_drives_sampling():
    model = DDPM(data_shape=(2,), timesteps=10, hidden_dim=16, ema_decay=0.9)
    assert not any("ema" in name for name, _ in model.named_parameters())
    assert any(key.startswith("ema_denoiser.") for key in model.state_dict())
    live = model.denoiser.output.weight
    with torch.no_grad():
        live.add_(1.0)
    generator = torch.Generator().manual_seed(0)
    before = model.sample(3, generator=generator, progress=False)  # no update yet: live weights
    model.after_step()  # first update uses decay min(0.9, 1/10) = 0.1
    shadow = model.ema_denoiser.output.weight
    torch.testing.assert_close(shadow, 0.9 * live)
    generator = torch.Generator().manual_seed(0)
    after = model.sample(3, generator=generator, progress=False)
    assert not torch.allclose(before, after)
    assert torch.equal(
        model.sample(3, generator=torch.Generator().manual_seed(0), use_ema=False, progress=False), before
    )
    rebuilt = DDPM(**model.constructor_kwargs())
    rebuilt.load_state_dict(model.state_dict())
    assert int(rebuilt.ema_updates) == 1 and torch.equal(rebuilt.ema_denoiser.output.weight, shadow)


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
    independent data sets of 500 (the null, 100 pairs); seeds 0–7 gave 0.1–1.8× that percentile. A Gaussian
    with the data's mean and covariance, and a single moon, lie more than 3× above that threshold (checked,
    so it can fail)."""
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
        DDPM(reverse_variance="learned")
    with pytest.raises(ValueError, match="decoder"):
        DDPM(decoder="bernoulli")
    with pytest.raises(ValueError, match="ema_decay"):
        DDPM(ema_decay=1.0)
    with pytest.raises(ValueError, match="data_shape"):
        DDPM(data_shape=())
    with pytest.raises(ValueError, match="time_sampling"):
        DDPM(time_sampling="per_batch")
    model = DDPM(data_shape=(2,), timesteps=4)
    with pytest.raises(ValueError, match="shape"):
        model.elbo(torch.randn(5, 3))
    with pytest.raises(ValueError, match="shape"):
        Trace_ELBO().loss(model.model, model.guide, torch.randn(5))
    with pytest.raises(ValueError, match="finite"):
        model.elbo(torch.tensor([[0.0, float("nan")]]))
    with pytest.raises(ValueError, match="timestep"):
        model.model_subsampled(torch.zeros(1, 2), timestep=5)
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
