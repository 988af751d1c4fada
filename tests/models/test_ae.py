import dataclasses
import inspect
import math

import pyro
import pyro.optim
import pytest
import torch
from pyro import poutine
from pyro.infer import SVI, JitTrace_ELBO, Predictive, Trace_ELBO

from pvae.data import BatchLoader, load_images
from pvae.inference import log_evidence
from pvae.models.ae import AE, DAE, AEConfig, DAEConfig, FlatPrior

SHAPES = [(6, 96), (4, 5, 96)]


def _ids(shape):
    return "x".join(map(str, shape))


def _gaussian_elbo(x, reconstruction, scale):
    """−SSE/(2s²) − (D/2)·log(2πs²), D = number of observed entries."""
    sse = (x - reconstruction).square().sum()
    return -sse / (2 * scale**2) - x.numel() / 2 * math.log(2 * math.pi * scale**2)


# ---- the ELBO identity -----------------------------------------------------------------------------------
@pytest.mark.parametrize("shape", SHAPES, ids=_ids)
@pytest.mark.parametrize("scale", [0.3, 1.0, 2.5])
def test_ae_elbo_is_the_gaussian_reconstruction_loss(shape, scale):
    ae = AE(scale=scale).double()
    x = torch.randn(shape, dtype=torch.float64)
    elbo = -Trace_ELBO().loss(ae.model, ae.guide, x)
    expected = _gaussian_elbo(x, ae.reconstruct(x), scale).item()
    assert elbo == pytest.approx(expected, rel=1e-12)
    sse = ae.reconstruction_error(x, reduction="sum").sum().item()
    assert elbo == pytest.approx(-sse / (2 * scale**2) - x.numel() / 2 * math.log(2 * math.pi * scale**2))


@pytest.mark.parametrize("shape", SHAPES, ids=_ids)
def test_ae_sites_and_event_dims(shape):
    ae = AE(z_dim=7).double()
    x = torch.randn(shape, dtype=torch.float64)
    guide_trace = poutine.trace(ae.guide).get_trace(x)
    model_trace = poutine.trace(poutine.replay(ae.model, trace=guide_trace)).get_trace(x)
    model_trace.compute_log_prob()
    z = guide_trace.nodes["z"]["value"]
    assert z.shape == (*shape[:-1], 7)
    assert model_trace.nodes["z"]["fn"].event_shape == (*shape[1:-1], 7)
    assert model_trace.nodes["x"]["fn"].event_shape == shape[1:]
    assert model_trace.nodes["z"]["log_prob"].shape == (shape[0],)
    assert model_trace.nodes["x"]["log_prob"].shape == (shape[0],)
    assert (model_trace.nodes["z"]["log_prob"] == 0).all()  # the flat prior
    assert model_trace.nodes["z"]["log_prob"].dtype == torch.float64
    torch.testing.assert_close(z, ae.encode(x))


def test_flat_prior_is_improper():
    prior = FlatPrior(torch.Size([3]), torch.Size([4]))
    value = torch.randn(2, 3, 4, dtype=torch.float64)
    log_prob = prior.expand([2, 3]).log_prob(value)
    assert log_prob.shape == (2, 3) and log_prob.dtype == torch.float64 and (log_prob == 0).all()
    with pytest.raises(NotImplementedError):
        prior.sample()


def test_ae_model_cannot_run_without_a_guide():
    with pytest.raises(NotImplementedError):
        AE().model(torch.randn(2, 96))


@pytest.mark.parametrize("family", [AE, DAE])
def test_no_prior_predictive_says_why_and_what_instead(family):
    ae = family(hidden_dim=8, z_dim=4)
    message = r"cannot draw data from a prior predictive .* flat \(improper\).* decode\(encode\(x\)\).* VAE"
    with pytest.raises(ValueError, match=message):
        Predictive(ae.model, num_samples=2)(None, num_data=3)
    with pytest.raises(ValueError, match=message):
        ae.model(None, num_data=3)
    x = torch.randn(2, 96)
    pyro.set_rng_seed(0)
    batch = Trace_ELBO().loss(ae.model, ae.guide, x)
    pyro.set_rng_seed(0)
    # with data, num_data is the size of the data set the batch comes from: each datum stands for 2
    assert Trace_ELBO().loss(ae.model, ae.guide, x, num_data=4) == pytest.approx(2 * batch, rel=1e-5)


# ---- denoising -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("p", [0.1, 0.25, 0.5, 0.9])
def test_mask_corruption_zeroes_a_fraction_p(p):
    dae = DAE(corruption="mask", noise=p)
    x = torch.rand(200, 500) + 0.5  # no zeros to begin with
    corrupted = dae.corrupt(x)
    zeroed = (corrupted == 0).sum().item()
    n = x.numel()
    z_score = (zeroed - n * p) / math.sqrt(n * p * (1 - p))  # binomial(n, p)
    assert abs(z_score) < 4.5, z_score
    kept = corrupted != 0
    assert torch.equal(corrupted[kept], x[kept])  # masking zeroes entries, it does not rescale them


@pytest.mark.parametrize("std", [0.05, 0.5, 2.0])
def test_gaussian_corruption_has_the_right_std(std):
    dae = DAE(corruption="gaussian", noise=std)
    x = torch.rand(200, 500, dtype=torch.float64)
    noise = (dae.corrupt(x) - x).flatten()
    n = noise.numel()
    assert abs(noise.mean().item()) / (std / math.sqrt(n)) < 4.5
    variance_z = (noise.square().mean().item() - std**2) / (std**2 * math.sqrt(2 / n))
    assert abs(variance_z) < 4.5, variance_z


@pytest.mark.parametrize("shape", SHAPES, ids=_ids)
@pytest.mark.parametrize("corruption,noise", [("mask", 0.3), ("gaussian", 0.4)], ids=["mask", "gaussian"])
def test_dae_encodes_corrupted_x_and_scores_clean_x(shape, corruption, noise):
    dae = DAE(corruption=corruption, noise=noise, scale=0.8).double()
    x = torch.randn(shape, dtype=torch.float64)
    pyro.set_rng_seed(11)
    corrupted = dae.corrupt(x)
    pyro.set_rng_seed(11)
    elbo = -Trace_ELBO().loss(dae.model, dae.guide, x)
    denoised = dae.decoder(dae.encoder(corrupted))
    assert elbo == pytest.approx(_gaussian_elbo(x, denoised, 0.8).item(), rel=1e-12)
    # Neither the clean reconstruction nor a likelihood on the corrupted x gives that value.
    assert elbo != pytest.approx(_gaussian_elbo(x, dae.reconstruct(x), 0.8).item(), rel=1e-6)
    assert elbo != pytest.approx(_gaussian_elbo(corrupted, denoised, 0.8).item(), rel=1e-6)


def test_dae_without_masking_is_an_ae():
    dae = DAE(corruption="mask", noise=0.0).double()
    x = torch.randn(5, 96, dtype=torch.float64)
    elbo = -Trace_ELBO().loss(dae.model, dae.guide, x)
    assert elbo == pytest.approx(_gaussian_elbo(x, dae.reconstruct(x), 1.0).item(), rel=1e-12)


# ---- reconstruction error --------------------------------------------------------------------------------
@pytest.mark.parametrize("shape", SHAPES, ids=_ids)
def test_reconstruction_error_reductions(shape):
    ae = AE().double()
    x = torch.randn(shape, dtype=torch.float64)
    squared = (x - ae.reconstruct(x)).square().reshape(shape[0], -1)
    mse, sse = ae.reconstruction_error(x), ae.reconstruction_error(x, reduction="sum")
    assert mse.shape == sse.shape == (shape[0],)
    torch.testing.assert_close(mse, squared.mean(1))
    torch.testing.assert_close(sse, squared.sum(1))
    with pytest.raises(ValueError, match="reduction"):
        ae.reconstruction_error(x, reduction="max")


def test_short_training_run_reduces_the_reconstruction_error():
    train = load_images("mnist5k", "train").flat()[::10]  # 400 digits, grey levels
    test = load_images("mnist5k", "test").flat()[::4]
    ae = DAE(x_dim=784, hidden_dim=128, z_dim=32, corruption="mask", noise=0.25, scale=0.3)
    before = ae.reconstruction_error(test).mean().item()
    svi = SVI(ae.model, ae.guide, pyro.optim.Adam({"lr": 3e-3}), Trace_ELBO())
    for _ in range(8):
        for batch, _ in BatchLoader(train, batch_size=50, seed=0):
            svi.step(batch)
    after = ae.reconstruction_error(test).mean().item()
    assert after < 0.6 * before, (before, after)


# ---- validation, dtypes, params --------------------------------------------------------------------------
@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"z_dim": 0}, "z_dim"),
        ({"hidden_dim": -1}, "hidden_dim"),
        ({"x_dim": 0}, "x_dim"),
        ({"scale": 0.0}, "scale"),
        ({"corruption": "dropout"}, "corruption"),
        ({"corruption": "mask", "noise": 1.0}, r"\[0, 1\)"),
        ({"corruption": "mask", "noise": -0.1}, r"\[0, 1\)"),
        ({"corruption": "mask", "noise": "a lot"}, r"\[0, 1\)"),
        ({"corruption": "gaussian", "noise": 0.0}, "standard deviation"),
        ({"corruption": "gaussian", "noise": math.nan}, "standard deviation"),
    ],
    ids=lambda value: value if isinstance(value, str) else "-".join(f"{k}={v}" for k, v in value.items()),
)
def test_bad_constructor_arguments_raise(kwargs, match):
    with pytest.raises(ValueError, match=match):
        DAE(**kwargs)


@pytest.mark.parametrize("shape", [(96,), (3, 95), (2, 3, 4, 96), (2, 28, 28)], ids=_ids)
def test_wrong_shapes_raise(shape):
    with pytest.raises(ValueError, match=r"shape \(batch, 96\) or \(batch, length, 96\)"):
        AE().guide(torch.zeros(shape))


@pytest.mark.parametrize("family", [AE, DAE])
def test_nan_and_integer_data_raise(family):
    ae = family()
    x = torch.zeros(3, 96)
    x[2, 5] = math.nan
    for method in (ae.model, ae.guide, ae.reconstruct):
        with pytest.raises(ValueError, match="finite"):
            method(x)
    with pytest.raises(ValueError, match="floating dtype"):
        ae.guide(torch.zeros(3, 96, dtype=torch.int32))


def test_dtype_follows_the_family():
    ae = AE().double()
    x = torch.randn(3, 96, dtype=torch.float64)
    assert ae.reconstruct(x).dtype == torch.float64
    assert ae.reconstruction_error(x).dtype == torch.float64
    assert AE().reconstruct(x).dtype == torch.float32  # data are cast to the parameters' dtype


def test_defaults_are_a_sequence_autoencoder_of_96_features():
    ae = AE()
    assert [type(layer).__name__ for layer in ae.encoder] == ["Linear", "ReLU", "Linear"]
    assert (ae.encoder[0].in_features, ae.encoder[0].out_features, ae.encoder[2].out_features) == (
        96,
        128,
        512,
    )
    assert (ae.decoder[0].in_features, ae.decoder[2].out_features) == (512, 96)


def test_two_families_do_not_share_parameters():
    first, second = AE(), DAE()
    x = torch.randn(4, 96)
    for family in (first, second):
        Trace_ELBO().loss(family.model, family.guide, x)
    prefixes = {name.split("$$$")[0] for name in pyro.get_param_store().keys()}
    assert prefixes == {first.name, second.name}
    frozen = {k: v.clone() for k, v in second.state_dict().items()}
    SVI(first.model, first.guide, pyro.optim.Adam({"lr": 1e-2}), Trace_ELBO()).step(x)
    assert all(torch.equal(v, frozen[k]) for k, v in second.state_dict().items())


@pytest.mark.parametrize("family,config", [(AE, AEConfig), (DAE, DAEConfig)], ids=["AE", "DAE"])
def test_config_fields_are_the_constructor_arguments(family, config):
    assert [field.name for field in dataclasses.fields(config)] == list(inspect.signature(family).parameters)
    instance = family(x_dim=10, hidden_dim=8, z_dim=3, scale=0.5, name="codes")
    rebuilt = family(**instance.constructor_kwargs())
    assert rebuilt.config == instance.config
    rebuilt.load_state_dict(instance.state_dict())
    x = torch.randn(2, 10)
    torch.testing.assert_close(rebuilt.reconstruct(x), instance.reconstruct(x))


@pytest.mark.parametrize("family", [AE, DAE])
def test_log_evidence_refuses_the_point_mass_guide(family):
    ae = family()
    with pytest.raises(ValueError, match="point mass"):
        log_evidence(ae.model, ae.guide, torch.randn(3, 96), num_samples=10)


@pytest.mark.parametrize("shape", SHAPES, ids=_ids)
def test_jit_traced_elbo_equals_the_eager_one(shape):
    dae = DAE(corruption="mask", noise=0.3)
    jitted = JitTrace_ELBO()
    for _ in range(3):  # the corruption is redrawn inside the compiled graph
        x = torch.randn(shape)
        pyro.set_rng_seed(4)
        expected = Trace_ELBO().loss(dae.model, dae.guide, x)
        pyro.set_rng_seed(4)
        assert jitted.loss(dae.model, dae.guide, x) == pytest.approx(expected, rel=1e-6)


@pytest.mark.parametrize("family", [AE, DAE])
@pytest.mark.parametrize("shape", [(0, 96), (0, 5, 96)], ids=_ids)
def test_empty_batch_raises(family, shape):
    """An empty batch used to fail with ZeroDivisionError inside pyro.plate."""
    ae = family(hidden_dim=8, z_dim=4)
    x = torch.zeros(shape)
    for method in (ae.model, ae.guide, ae.reconstruct):
        with pytest.raises(
            ValueError, match=r"x is an empty batch, shape \(0, .*a batch needs at least one datum"
        ):
            method(x)


@pytest.mark.parametrize("family", [AE, DAE])
def test_non_finite_data_are_counted(family):
    ae = family(hidden_dim=8, z_dim=4)
    x = torch.zeros(2, 3, 96)
    x[0, 0, 0], x[1, 2, 5], x[1, 1, 1] = math.inf, math.nan, -math.inf
    with pytest.raises(ValueError, match="x must be finite; it has 3 NaN/inf entries"):
        ae.guide(x)
