import dataclasses
import inspect
import math

import pyro
import pyro.optim
import pytest
import torch
from pyro import poutine
from pyro.infer import (
    SVI,
    JitTrace_ELBO,
    JitTraceMeanField_ELBO,
    Predictive,
    Trace_ELBO,
    TraceMeanField_ELBO,
)

import pvae
from pvae import checkpoint as ckpt
from pvae.data import BatchLoader, load_images
from pvae.family import build_family, check_config_kwargs
from pvae.inference import log_evidence
from pvae.models.vae import ARCHITECTURES, VAE, VAEConfig

# The conv networks' small batches run faster on one intra-op thread than on two busy ones.
conv_on_one_thread = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def digits():
    """128 test digits of mnist5k, statically binarized (fixed draw), float64, with their grey levels."""
    grey = load_images("mnist5k", "test").flat(torch.float64)[::8][:128]  # spread over the classes
    binary = torch.bernoulli(grey, generator=torch.Generator().manual_seed(1))
    return grey, binary


def _traces(vae, x):
    guide_trace = poutine.trace(vae.guide).get_trace(x)
    model_trace = poutine.trace(poutine.replay(vae.model, trace=guide_trace)).get_trace(x)
    guide_trace.compute_log_prob()
    model_trace.compute_log_prob()
    return guide_trace, model_trace


# ---- the ELBO: Monte-Carlo KL vs closed form -------------------------------------------------------------
def _fixed_network(z_dim: int, hidden_dim: int, architecture: str = "mlp") -> VAE:
    """A fixed VAE whose posteriors sit far from the prior (KL of several nats per datum)."""
    vae = VAE(z_dim=z_dim, hidden_dim=hidden_dim, architecture=architecture).double()
    with torch.no_grad():
        vae.encoder[-1].weight[:z_dim] *= 8.0  # spread the means μ
        vae.encoder[-1].bias[z_dim:] = -3.0  # σ ≈ 0.22
    return vae


def test_trace_and_meanfield_elbo_agree_in_expectation(digits):
    """Paired z-test: with the same seed both ELBOs draw the same z, so the likelihood term cancels and
    Trace_ELBO − TraceMeanField_ELBO = log q(z) − log p(z) − KL, whose expectation must be zero."""
    _, x = digits
    x = x[:16]
    vae = _fixed_network(z_dim=8, hidden_dim=32)
    options = {"num_particles": 100, "vectorize_particles": True, "max_plate_nesting": 1}
    differences = []
    for seed in range(20):
        pyro.set_rng_seed(seed)
        trace_loss = Trace_ELBO(**options).loss(vae.model, vae.guide, x)
        pyro.set_rng_seed(seed)
        meanfield_loss = TraceMeanField_ELBO(**options).loss(vae.model, vae.guide, x)
        differences.append(trace_loss - meanfield_loss)
    differences = torch.tensor(differences, dtype=torch.float64)
    loc, scale = vae.encode(x)
    kl = VAE.analytic_kl(loc, scale).sum()
    mean, stderr = differences.mean(), differences.std() / math.sqrt(len(differences))
    assert stderr > 0  # the Monte-Carlo KL really is random
    assert stderr < 0.01 * kl  # so a KL off by a few percent would be caught
    assert abs(mean) < 4 * stderr, (float(mean), float(stderr))


def test_trace_and_meanfield_elbo_agree_unpaired(digits):
    """The same check with independent draws and vectorized particles (z of shape (particles, batch, z))."""
    _, x = digits
    x = x[:16]
    vae = _fixed_network(z_dim=8, hidden_dim=32)
    trace_elbo = Trace_ELBO(num_particles=100, vectorize_particles=True, max_plate_nesting=1)
    meanfield = TraceMeanField_ELBO(num_particles=100, vectorize_particles=True, max_plate_nesting=1)
    trace_losses = torch.tensor([trace_elbo.loss(vae.model, vae.guide, x) for _ in range(20)])
    meanfield_losses = torch.tensor([meanfield.loss(vae.model, vae.guide, x) for _ in range(20)])
    stderr = math.sqrt((trace_losses.var() + meanfield_losses.var()) / 20)
    difference = trace_losses.mean() - meanfield_losses.mean()
    loc, scale = vae.encode(x)
    assert stderr < 0.01 * VAE.analytic_kl(loc, scale).sum()  # a KL off by a few percent would show
    assert abs(difference) < 4 * stderr, (float(difference), stderr)


@conv_on_one_thread
@pytest.mark.parametrize("architecture", ARCHITECTURES)
def test_per_datum_elbo_agrees_with_trace_elbo_in_expectation(digits, architecture):
    """VAE.elbo (closed-form KL, one value per datum) summed over the data plate and −Trace_ELBO's loss
    (Monte-Carlo KL) estimate the same ELBO: unpaired z-test on their means, with a KL large enough that
    one off by several percent would show."""
    _, x = digits
    x = x[:8].float()
    vae = _fixed_network(z_dim=8, hidden_dim=32, architecture=architecture).float()
    trace_elbo = Trace_ELBO(num_particles=20, vectorize_particles=True, max_plate_nesting=1)
    trace_values = torch.tensor(
        [-trace_elbo.loss(vae.model, vae.guide, x) for _ in range(10)], dtype=torch.float64
    )
    per_datum = torch.stack([vae.elbo(x, num_particles=20) for _ in range(10)])  # (10, 8)
    assert per_datum.shape == (10, 8) and not per_datum.requires_grad
    elbo_values = per_datum.sum(1).double()
    stderr = math.sqrt((trace_values.var() + elbo_values.var()) / 10)
    loc, scale = vae.encode(x)
    assert stderr < 0.02 * VAE.analytic_kl(loc, scale).sum()  # a KL off by several percent would show
    difference = trace_values.mean() - elbo_values.mean()
    assert abs(difference) < 4 * stderr, (float(difference), stderr)


def test_meanfield_uses_the_closed_form_gaussian_kl(digits):
    """TraceMeanField_ELBO's loss = −log p(x | z) + KL with the KL in closed form: recover it exactly."""
    _, x = digits
    vae = VAE(z_dim=6, hidden_dim=32).double()
    pyro.set_rng_seed(3)
    loss = TraceMeanField_ELBO().loss(vae.model, vae.guide, x)
    pyro.set_rng_seed(3)
    _, model_trace = _traces(vae, x)  # the same z as inside the loss
    kl_used = loss + model_trace.nodes["x"]["log_prob_sum"].item()

    loc, scale = vae.encode(x)
    log_var = 2 * scale.log()
    closed_form = 0.5 * (-log_var + loc**2 + log_var.exp() - 1).sum()  # ½Σ(−log σ² + μ² + σ² − 1)
    torch_kl = torch.distributions.kl_divergence(
        torch.distributions.Normal(loc, scale), torch.distributions.Normal(0.0, 1.0)
    ).sum()
    assert kl_used == pytest.approx(closed_form.item(), rel=1e-9, abs=1e-9)
    assert torch_kl.item() == pytest.approx(closed_form.item(), rel=1e-12)
    assert VAE.analytic_kl(loc, scale).sum().item() == pytest.approx(closed_form.item(), rel=1e-12)


def test_elbo_terms_are_the_summed_binary_cross_entropy(digits):
    """−log p(x | z) of the Bernoulli site is the summed binary cross-entropy on sigmoid(logits)."""
    _, x = digits
    vae = VAE(z_dim=5, hidden_dim=32).double()
    guide_trace, model_trace = _traces(vae, x)
    z = guide_trace.nodes["z"]["value"]
    probs = vae.decode(z)
    bce = torch.nn.functional.binary_cross_entropy(probs, x, reduction="sum")
    assert -model_trace.nodes["x"]["log_prob_sum"].item() == pytest.approx(bce.item(), rel=1e-9)
    prior = torch.distributions.Normal(0.0, 1.0).log_prob(z).sum()
    assert model_trace.nodes["z"]["log_prob_sum"].item() == pytest.approx(prior.item(), rel=1e-12)


# ---- training --------------------------------------------------------------------------------------------
def test_short_training_run_improves_the_test_elbo(digits):
    _, test_x = digits
    train = load_images("mnist5k", "train").flat()[::8]  # 500 digits, every class
    loader = BatchLoader(train, batch_size=50, binarize="dynamic", seed=0)
    vae = VAE(z_dim=10, hidden_dim=200)
    test_x = test_x.float()
    estimator = TraceMeanField_ELBO(num_particles=20, vectorize_particles=True, max_plate_nesting=1)

    def test_elbo():
        return -estimator.loss(vae.model, vae.guide, test_x) / test_x.shape[0]

    before = test_elbo()
    svi = SVI(vae.model, vae.guide, pyro.optim.Adam({"lr": 3e-3}), TraceMeanField_ELBO())
    for _ in range(4):
        for batch, _ in loader:
            svi.step(batch)
    after = test_elbo()
    assert before < -450  # an untrained decoder is close to coin flips (784 log 2 ≈ 543 nats)
    assert after > before + 200, (before, after)


# ---- data checks -----------------------------------------------------------------------------------------
def test_grey_pixels_to_a_bernoulli_vae_raise_with_advice(digits):
    grey, _ = digits
    vae = VAE()
    for method in (vae.model, vae.guide):
        with pytest.raises(ValueError, match=r"binary.*bernoulli.*[Bb]inarize"):
            method(grey.float())
    with pytest.raises(ValueError, match="binary"):
        vae.model(torch.full((2, 784), 2.0))
    with pytest.raises(ValueError, match="binary"):
        Trace_ELBO().loss(vae.model, vae.guide, grey.float())


@pytest.mark.parametrize("likelihood", ["bernoulli", "gaussian"])
@pytest.mark.parametrize("bad", [math.nan, math.inf], ids=["nan", "inf"])
def test_non_finite_data_raise(likelihood, bad):
    vae = VAE(likelihood=likelihood)
    x = torch.zeros(3, 784)
    x[1, 7] = bad
    for method in (vae.model, vae.guide, vae.encode):
        with pytest.raises(ValueError, match="finite"):
            method(x)


def test_gaussian_vae_accepts_grey_levels_and_huge_finite_values(digits):
    grey, _ = digits
    vae = VAE(likelihood="gaussian", scale=0.2, z_dim=4, hidden_dim=16).double()
    guide_trace, model_trace = _traces(vae, grey)
    z = guide_trace.nodes["z"]["value"]
    expected = torch.distributions.Normal(vae.decoder(z), 0.2).log_prob(grey).sum(-1)
    torch.testing.assert_close(model_trace.nodes["x"]["log_prob"], expected)
    # Σx overflows to inf in float32 although every entry is finite: the fast check must not raise.
    huge = torch.full((4, 784), 3e37)
    assert VAE(likelihood="gaussian").encode(huge)[0].shape == (4, 20)


@pytest.mark.parametrize(
    "shape",
    [(784,), (4, 785), (4, 2, 28, 28), (4, 27, 28), (2, 2, 1, 28, 28), (4, 784, 1, 1, 1)],
    ids=lambda s: "x".join(map(str, s)),
)
def test_wrong_shapes_raise(shape):
    vae = VAE()
    with pytest.raises(ValueError, match=r"shape \(batch, 784\)"):
        vae.model(torch.zeros(shape))


def test_integer_data_raise():
    with pytest.raises(ValueError, match="floating dtype"):
        VAE().model(torch.zeros(3, 784, dtype=torch.int64))


@conv_on_one_thread
@pytest.mark.parametrize("architecture", ARCHITECTURES)
def test_image_shapes_are_flattened(digits, architecture):
    _, x = digits
    x = x[:8].float()
    vae = VAE(z_dim=4, hidden_dim=16, architecture=architecture)
    losses = []
    for images in (x, x.reshape(8, 28, 28), x.reshape(8, 1, 28, 28)):
        pyro.set_rng_seed(0)
        losses.append(Trace_ELBO().loss(vae.model, vae.guide, images))
    assert losses[0] == losses[1] == losses[2]
    assert vae.reconstruct(x.reshape(8, 1, 28, 28)).shape == (8, 1, 28, 28)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"z_dim": 0},
        {"z_dim": -3},
        {"z_dim": 2.5},
        {"hidden_dim": 0},
        {"x_dim": -1},
        {"likelihood": "poisson"},
        {"likelihood": "gaussian", "scale": 0.0},
        {"scale": -1.0},
        {"name": ""},
        {"architecture": "resnet"},
        {"architecture": "CONV"},
        {"architecture": "conv", "x_dim": 100},
        {"x_dim": 28, "architecture": "conv"},
    ],
    ids=lambda kwargs: "-".join(f"{k}={v}" for k, v in kwargs.items()),
)
def test_bad_constructor_arguments_raise(kwargs):
    with pytest.raises(ValueError, match=list(kwargs)[-1]):
        VAE(**kwargs)


# ---- shapes, dtypes, particles ---------------------------------------------------------------------------
@conv_on_one_thread
@pytest.mark.parametrize("architecture", ARCHITECTURES)
def test_float64_in_float64_out(digits, architecture):
    _, x = digits
    x = x[:16]
    vae = VAE(z_dim=3, hidden_dim=16, architecture=architecture).double()
    loc, scale = vae.encode(x)
    assert loc.dtype == scale.dtype == torch.float64
    assert vae.reconstruct(x).dtype == torch.float64
    assert vae.sample(5).dtype == torch.float64
    guide_trace, model_trace = _traces(vae, x)
    assert guide_trace.nodes["z"]["value"].dtype == torch.float64
    assert model_trace.nodes["x"]["log_prob"].dtype == torch.float64
    assert model_trace.nodes["z"]["log_prob"].dtype == torch.float64
    # A float32 family casts float64 data to its own dtype rather than failing inside nn.Linear.
    assert vae.elbo(x).dtype == torch.float64
    assert VAE(z_dim=3, architecture=architecture).encode(x)[0].dtype == torch.float32


@conv_on_one_thread
@pytest.mark.parametrize("architecture", ARCHITECTURES)
def test_model_and_guide_broadcast_over_a_leading_particle_dim(digits, architecture):
    _, x = digits
    x = x[:5]
    vae = VAE(z_dim=4, hidden_dim=16, architecture=architecture).double()
    with pyro.plate("particles", 3, dim=-2):
        guide_trace, model_trace = _traces(vae, x)
    z = guide_trace.nodes["z"]["value"]
    assert z.shape == (3, 5, 4)
    assert model_trace.nodes["x"]["log_prob"].shape == (3, 5)
    loc, scale = vae.encode(x)
    for particle in range(3):
        conditioned = poutine.condition(vae.model, data={"z": z[particle]})
        single = poutine.trace(conditioned).get_trace(x)
        single.compute_log_prob()
        for site in ("z", "x"):
            torch.testing.assert_close(
                model_trace.nodes[site]["log_prob"][particle], single.nodes[site]["log_prob"]
            )
        expected_q = torch.distributions.Normal(loc, scale).log_prob(z[particle]).sum(-1)
        torch.testing.assert_close(guide_trace.nodes["z"]["log_prob"][particle], expected_q)
        torch.testing.assert_close(vae.decode(z)[particle], vae.decode(z[particle]))


@conv_on_one_thread
@pytest.mark.parametrize("architecture", ARCHITECTURES)
def test_sample_and_reconstruct(architecture):
    vae = VAE(z_dim=3, hidden_dim=16, architecture=architecture)
    means = vae.sample(7)
    assert means.shape == (7, 784) and means.device == vae.device
    assert ((means > 0) & (means < 1)).all()
    binary = vae.sample(7, mean=False)
    assert ((binary == 0) | (binary == 1)).all()
    first = vae.sample(4, generator=torch.Generator().manual_seed(5))
    second = vae.sample(4, generator=torch.Generator().manual_seed(5))
    assert torch.equal(first, second)
    with pytest.raises(ValueError, match="n must be a positive integer"):
        vae.sample(0)
    with pytest.raises(ValueError, match=r"z must be a tensor of shape \(\.\.\., 3\)"):
        vae.decode(torch.zeros(2, 4))
    z = torch.randn(2, 3)
    gaussian = VAE(z_dim=3, hidden_dim=16, likelihood="gaussian", architecture=architecture)
    torch.testing.assert_close(gaussian.decode(z), gaussian.decoder(z))
    torch.testing.assert_close(vae.decode(z), torch.sigmoid(vae.decoder(z)))


def test_network_is_the_mlp_encoder_and_decoder():
    vae = VAE()
    encoder, decoder = vae.encoder, vae.decoder
    assert [type(layer).__name__ for layer in encoder] == ["Linear", "LeakyReLU", "Linear"]
    assert encoder[1].negative_slope == 0.2
    assert (encoder[0].in_features, encoder[0].out_features, encoder[2].out_features) == (784, 400, 40)
    assert [type(layer).__name__ for layer in decoder] == ["Linear", "ReLU", "Linear"]  # logits: no sigmoid
    assert (decoder[0].in_features, decoder[2].out_features) == (20, 784)


# ---- families in the param store, configs ----------------------------------------------------------------
def test_two_vaes_do_not_share_parameters(digits):
    _, x = digits
    x = x.float()
    first, second = VAE(z_dim=3, hidden_dim=16), VAE(z_dim=3, hidden_dim=16)
    for vae in (first, second):
        Trace_ELBO().loss(vae.model, vae.guide, x)
    names = set(pyro.get_param_store().keys())
    assert {name.split("$$$")[0] for name in names} == {first.name, second.name}
    frozen = {k: v.detach().clone() for k, v in second.state_dict().items()}
    svi = SVI(first.model, first.guide, pyro.optim.Adam({"lr": 1e-2}), Trace_ELBO())
    svi.step(x)
    for key, value in second.state_dict().items():
        assert torch.equal(value, frozen[key])
    assert not torch.equal(first.decoder[0].weight, second.decoder[0].weight)


@pytest.mark.parametrize("architecture", ARCHITECTURES)
def test_config_fields_are_the_constructor_arguments(architecture):
    parameters = list(inspect.signature(VAE).parameters)
    assert [field.name for field in dataclasses.fields(VAEConfig)] == parameters
    vae = VAE(
        z_dim=7, hidden_dim=33, likelihood="gaussian", scale=0.3, name="digits", architecture=architecture
    )
    rebuilt = type(vae)(**vae.constructor_kwargs())
    assert rebuilt.config == vae.config
    rebuilt.load_state_dict(vae.state_dict())
    z = torch.randn(2, 7)
    torch.testing.assert_close(rebuilt.decode(z), vae.decode(z))


# ---- evidence ---------------------------------------------------------------------------------------------
def test_log_evidence_of_the_vae_is_consistent(digits):
    """Importance sampling through the particle plate: the guide and the prior as proposals estimate the
    same log p(x), and the IWAE bound lies above the ELBO."""
    _, x = digits
    x = x[::16][:8]
    vae = VAE(z_dim=2, hidden_dim=32).double()
    with_guide = log_evidence(vae.model, vae.guide, x, num_samples=4000)
    with_prior = log_evidence(vae.model, vae.guide, x, num_samples=4000, proposal="prior")
    assert with_guide.shape == (8,) and with_guide.dtype == torch.float64
    torch.testing.assert_close(with_guide, with_prior, atol=0.2, rtol=0)
    with pyro.plate("particles", 2000, dim=-2):
        guide_trace, model_trace = _traces(vae, x)
    log_w = model_trace.nodes["x"]["log_prob"] + model_trace.nodes["z"]["log_prob"]
    elbo = (log_w - guide_trace.nodes["z"]["log_prob"]).mean(0)  # (8,)
    assert (with_guide > elbo).all()


# ---- compiled steps -------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "eager,compiled",
    [(Trace_ELBO, JitTrace_ELBO), (TraceMeanField_ELBO, JitTraceMeanField_ELBO)],
    ids=["trace", "meanfield"],
)
@pytest.mark.parametrize("likelihood", ["bernoulli", "gaussian"])
def test_jit_traced_elbo_equals_the_eager_one_on_new_batches(digits, eager, compiled, likelihood):
    grey, binary = digits
    data = binary if likelihood == "bernoulli" else grey
    vae = VAE(z_dim=5, hidden_dim=32, likelihood=likelihood)
    jitted = compiled()
    for batch in (data[:16], data[16:32], data[32:48]):  # traced on the first, replayed on the others
        batch = batch.float()
        pyro.set_rng_seed(1)
        expected = eager().loss(vae.model, vae.guide, batch)
        pyro.set_rng_seed(1)
        assert jitted.loss(vae.model, vae.guide, batch) == pytest.approx(expected, rel=1e-6)


def test_jit_traced_step_still_rejects_grey_pixels(digits):
    grey, _ = digits
    vae = VAE(z_dim=5, hidden_dim=32)
    svi = SVI(vae.model, vae.guide, pyro.optim.Adam({"lr": 1e-3}), JitTrace_ELBO())
    with pytest.raises(ValueError, match="binar"):
        svi.step(grey[:16].float())


@pytest.mark.parametrize(
    "shape", [(0, 784), (0, 28, 28), (0, 1, 28, 28)], ids=lambda s: "x".join(map(str, s))
)
def test_empty_batch_raises(shape):
    """An empty batch used to fail with ZeroDivisionError inside pyro.plate."""
    vae = VAE(z_dim=2, hidden_dim=8)
    x = torch.zeros(shape)
    for method in (vae.model, vae.guide, vae.encode):
        with pytest.raises(
            ValueError, match=r"x is an empty batch, shape \(0, .*a batch needs at least one datum"
        ):
            method(x)
    with pytest.raises(ValueError, match="x is an empty batch"):
        Trace_ELBO().loss(vae.model, vae.guide, x)


@pytest.mark.parametrize("likelihood", ["bernoulli", "gaussian"])
def test_non_finite_data_are_counted(likelihood):
    vae = VAE(z_dim=2, hidden_dim=8, likelihood=likelihood)
    x = torch.zeros(3, 784)
    x[0, 1], x[2, 3] = math.nan, -math.inf
    with pytest.raises(ValueError, match="x must be finite; it has 2 NaN/inf entries"):
        vae.model(x)


# ---- the prior predictive ---------------------------------------------------------------------------------
@pytest.mark.parametrize("likelihood", ["bernoulli", "gaussian"])
def test_prior_predictive_draws_x_from_the_decoder_at_prior_codes(likelihood):
    vae = VAE(x_dim=30, z_dim=3, hidden_dim=16, likelihood=likelihood, scale=0.3).double()
    samples = Predictive(vae.model, num_samples=40)(None, num_data=25)
    z, x = samples["z"], samples["x"]
    assert z.shape == (40, 25, 3) and x.shape == (40, 25, 30) and x.dtype == torch.float64
    n = z.shape[0] * z.shape[1]
    flat = z.reshape(n, 3)
    assert (flat.mean(0).abs() < 4 / math.sqrt(n)).all()  # z ~ Normal(0, I)
    assert ((flat.var(0) - 1).abs() < 4 * math.sqrt(2 / n)).all()
    mean = vae.decode(z)  # E[x | z]: Bernoulli probabilities or the Gaussian mean
    residual = (x - mean).flatten()
    if likelihood == "bernoulli":
        assert ((x == 0) | (x == 1)).all()  # binary, as the likelihood's support
        variance = (mean * (1 - mean)).sum()
        assert abs(residual.sum().item()) < 4 * variance.sqrt().item()
    else:
        assert abs(residual.mean().item()) < 4 * 0.3 / math.sqrt(residual.numel())
        assert abs(residual.std().item() - 0.3) < 4 * 0.3 / math.sqrt(2 * residual.numel())


def test_the_model_needs_data_or_a_number_of_draws():
    vae = VAE(x_dim=6, z_dim=2, hidden_dim=4)
    with pytest.raises(ValueError, match=r"pass the data x, or num_data=N"):
        vae.model()
    with pytest.raises(ValueError, match=r"num_data=2 is the size of the data set x is a batch of"):
        vae.model(torch.zeros(3, 6), num_data=2)
    # a minibatch of 3 from 6 data: every site scaled by 2
    trace = pyro.poutine.trace(vae.model).get_trace(torch.zeros(3, 6), num_data=6)
    assert trace.nodes["x"]["scale"] == 2.0 and trace.nodes["z"]["scale"] == 2.0


# ---- the convolutional architecture ----------------------------------------------------------------------
def test_network_is_the_conv_encoder_and_decoder():
    """28 → 14 → 7 with 32 and 64 channels, hidden_dim next to the code, 1 × 28 × 28 logits out."""
    vae = VAE(z_dim=20, hidden_dim=400, architecture="conv")
    encoder, decoder = vae.encoder, vae.decoder
    assert [type(layer).__name__ for layer in encoder] == [
        *["Conv2d", "LeakyReLU"] * 2,
        *["Flatten", "Linear", "LeakyReLU", "Linear"],
    ]
    assert all(layer.negative_slope == 0.2 for layer in encoder if isinstance(layer, torch.nn.LeakyReLU))
    assert [type(layer).__name__ for layer in decoder] == [
        *["Linear", "ReLU", "Linear", "ReLU", "Unflatten"],
        *["ConvTranspose2d", "ReLU", "ConvTranspose2d", "Flatten"],  # logits: no activation at the end
    ]
    images = torch.zeros(3, 1, 28, 28)
    assert encoder[:2](images).shape == (3, 32, 14, 14)
    assert encoder[:4](images).shape == (3, 64, 7, 7)
    assert (encoder[5].in_features, encoder[5].out_features, encoder[7].out_features) == (64 * 7 * 7, 400, 40)
    assert (decoder[0].in_features, decoder[0].out_features, decoder[2].out_features) == (20, 400, 64 * 7 * 7)
    codes = torch.zeros(3, 20)
    assert decoder[:5](codes).shape == (3, 64, 7, 7)
    assert decoder[:7](codes).shape == (3, 32, 14, 14)
    assert decoder[:8](codes).shape == (3, 1, 28, 28)


@conv_on_one_thread
def test_conv_shapes_of_encode_decode_sample_reconstruct_and_elbo(digits):
    _, x = digits
    x = x[:6].float()
    vae = VAE(z_dim=3, hidden_dim=16, architecture="conv")
    loc, scale = vae.encode(x)
    assert loc.shape == scale.shape == (6, 3) and (scale > 0).all()
    assert vae.encode(x.reshape(6, 1, 28, 28))[0].shape == (6, 3)
    assert vae.decode(loc).shape == (6, 784)
    assert vae.decode(torch.randn(4, 6, 3)).shape == (4, 6, 784)  # particles, batch
    assert vae.decode(torch.randn(3)).shape == (784,)
    assert vae.sample(5).shape == vae.sample(5, mean=False).shape == (5, 784)
    assert vae.reconstruct(x).shape == (6, 784)
    assert vae.reconstruct(x.reshape(6, 28, 28)).shape == (6, 28, 28)
    assert vae.elbo(x, num_particles=3).shape == (6,)
    assert vae.elbo(x, grad=True).requires_grad
    draws = Predictive(vae.model, num_samples=2)(None, num_data=3)
    assert draws["z"].shape == (2, 3, 3) and draws["x"].shape == (2, 3, 784)


@conv_on_one_thread
def test_log_evidence_of_the_conv_vae(digits):
    """The evidence estimators run through the conv networks with particles in an outer plate: guide and
    prior proposals estimate the same log p(x), and the IWAE bound lies above the ELBO."""
    _, x = digits
    x = x[::16][:4].float()
    vae = VAE(z_dim=2, hidden_dim=32, architecture="conv")
    with_guide = log_evidence(vae.model, vae.guide, x, num_samples=500)
    with_prior = log_evidence(vae.model, vae.guide, x, num_samples=500, proposal="prior")
    assert with_guide.shape == (4,) and with_guide.dtype == torch.float32
    assert torch.isfinite(with_guide).all()
    torch.testing.assert_close(with_guide, with_prior, atol=0.3, rtol=0)
    assert (with_guide > vae.elbo(x, num_particles=500)).all()


@conv_on_one_thread
def test_a_few_hundred_svi_steps_train_the_conv_vae(digits):
    """Gradients reach every layer: each parameter moves, the test ELBO rises far above an untrained
    decoder's, and the codes carry information about x (KL(q(z | x) ‖ p(z)) well above zero)."""
    _, test_x = digits
    test_x = test_x.float()
    train = load_images("mnist5k", "train").flat()[::20]  # 250 digits, every class
    loader = BatchLoader(train, batch_size=10, binarize="dynamic", seed=0)
    vae = VAE(z_dim=8, hidden_dim=32, architecture="conv")
    initial = {key: value.clone() for key, value in vae.named_parameters()}

    def test_elbo():
        return vae.elbo(test_x, num_particles=4, generator=torch.Generator().manual_seed(0)).mean()

    before = test_elbo()
    svi = SVI(vae.model, vae.guide, pyro.optim.Adam({"lr": 1e-3}), TraceMeanField_ELBO())
    for _ in range(8):  # 25 steps per epoch: 200 steps
        for batch, _ in loader:
            svi.step(batch)
    after = test_elbo()
    assert before < -450  # an untrained decoder is close to coin flips (784 log 2 ≈ 543 nats)
    assert after > before + 200 and after > -240, (float(before), float(after))
    unchanged = [key for key, value in vae.named_parameters() if torch.equal(value, initial[key])]
    assert not unchanged
    loc, scale = vae.encode(test_x)
    assert VAE.analytic_kl(loc, scale).mean() > 2.0


def _perturbed(vae: VAE) -> VAE:
    """``vae`` with every parameter moved off its initialization, so a freshly built one would differ."""
    generator = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for parameter in vae.parameters():
            parameter.add_(0.05 * torch.randn(parameter.shape, generator=generator))
    return vae


def _same_outputs(first: VAE, second: VAE, x: torch.Tensor) -> None:
    for a, b in zip(first.encode(x), second.encode(x)):
        assert torch.equal(a, b)
    z = torch.randn(2, x.shape[0], first.z_dim)
    assert torch.equal(first.decode(z), second.decode(z))
    draws = [vae.elbo(x, 3, generator=torch.Generator().manual_seed(5)) for vae in (first, second)]
    assert torch.equal(*draws)


@conv_on_one_thread
def test_conv_checkpoint_round_trip_restores_identical_outputs(digits, tmp_path):
    _, x = digits
    x = x[:6].float()
    vae = _perturbed(VAE(z_dim=3, hidden_dim=16, architecture="conv"))
    path = ckpt.save_checkpoint(tmp_path / "conv.pt", vae, epoch=1)
    assert ckpt.load_checkpoint(path)["family"]["kwargs"]["architecture"] == "conv"
    loaded = pvae.load(path)
    assert type(loaded) is VAE and loaded.architecture == "conv" and loaded.name != vae.name
    assert loaded.constructor_kwargs() | {"name": None} == vae.constructor_kwargs() | {"name": None}
    _same_outputs(vae, loaded, x)


def test_a_config_without_architecture_builds_the_mlp(digits, tmp_path):
    """Checkpoints written before VAEConfig had ``architecture`` hold no such key: they rebuild the MLP."""
    _, x = digits
    x = x[:6].float()
    vae = _perturbed(VAE(z_dim=3, hidden_dim=16))
    older = {key: value for key, value in vae.constructor_kwargs().items() if key != "architecture"}
    assert build_family(VAE, older | {"name": None}).config.architecture == "mlp"
    path = ckpt.save_checkpoint(tmp_path / "mlp.pt", vae, epoch=1)
    payload = torch.load(path, weights_only=True)
    del payload["family"]["kwargs"]["architecture"]  # as an older checkpoint holds it
    torch.save(payload, path)
    loaded = pvae.load(path)
    assert loaded.architecture == "mlp" and loaded.config.architecture == "mlp"
    _same_outputs(vae, loaded, x)


def test_untrusted_architecture_arguments_are_refused():
    with pytest.raises(ValueError, match="architecture must be str, got 3"):
        check_config_kwargs(VAE, {"architecture": 3})
    with pytest.raises(ValueError, match=r"architecture must be one of \('mlp', 'conv'\), got 'unet'"):
        build_family(VAE, {"architecture": "unet"})
    with pytest.raises(ValueError, match=r"x_dim must be 784 .* for architecture='conv', got 30"):
        build_family(VAE, {"architecture": "conv", "x_dim": 30})


def test_the_meta_device_size_probe_builds_the_conv_vae():
    """build_family sizes a family on the meta device before allocating it: the conv networks build there
    with the same parameter shapes as the real ones."""
    probes = []
    vae = build_family(
        VAE, {"architecture": "conv", "z_dim": 5, "hidden_dim": 24}, inspect_probe=probes.append
    )
    (probe,) = probes
    assert {parameter.device.type for parameter in probe.parameters()} == {"meta"}
    assert vae.device.type == "cpu" and vae.architecture == "conv"
    shapes = {key: value.shape for key, value in vae.state_dict().items()}
    assert {key: value.shape for key, value in probe.state_dict().items()} == shapes
