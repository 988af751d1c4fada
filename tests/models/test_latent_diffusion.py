"""Latent diffusion: a VAE whose prior is a diffusion chain, as one model/guide pair.

The full hierarchy's Trace_ELBO, the time-subsampled training pair under Trace_ELBO and
TraceMeanField_ELBO, and the per-datum ``elbo`` (the prior chain's terms in closed form) estimate one
bound: z-tests, with a power check that the prior chain's part is far larger than their standard error.
Stages freeze what they should, the latent scale is fitted and saved, checkpoints round-trip; the
recipes (:func:`train_latent_diffusion`) train, checkpoint, reuse and resume their two stages.
"""

import math

import pyro
import pytest
import torch
from pyro.infer import Predictive, Trace_ELBO, TraceMeanField_ELBO

from pvae import checkpoint as ckpt
from pvae import load
from pvae.data import BatchLoader
from pvae.inference import SVIStep, log_evidence
from pvae.models.latent_diffusion import RECIPES, STAGES, LatentDiffusion, train_latent_diffusion


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    """Small networks: one intra-op thread is faster than two under contention."""


def _small(**kwargs):
    options = dict(architecture="mlp", hidden_dim=32, z_dim=3, timesteps=6, prior_hidden_dim=16)
    return LatentDiffusion(**(options | kwargs)).double()


def _digits(n=6, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return torch.bernoulli(torch.full((n, 784), 0.3, dtype=torch.float64), generator=generator)


def _mean_and_stderr(values):
    values = torch.as_tensor(values, dtype=torch.float64)
    return values.mean().item(), (values.std() / math.sqrt(values.numel())).item()


def _estimates(loss, model, guide, x, repeats=6, particles=300):
    """``repeats`` estimates of the per-datum ELBO, each over ``particles`` vectorized draws."""
    with torch.no_grad():
        return [
            -estimator.loss(model, guide, x) / x.shape[0]
            for estimator in [loss(num_particles=particles, vectorize_particles=True, max_plate_nesting=1)]
            for _ in range(repeats)
        ]


def test_the_estimators_of_the_whole_hierarchy_agree_in_expectation():
    pyro.set_rng_seed(0)
    ldm = _small()
    with torch.no_grad():  # a denoiser away from zero, so every term of the chain matters
        for parameter in ldm.prior.denoiser.parameters():
            parameter.normal_(0, 0.1)
    ldm.latent_scale.fill_(1.7)  # the chain runs on u = 1.7·z: densities of the scaled variable
    x = _digits()
    estimates = {"full chain": _estimates(Trace_ELBO, ldm.model, ldm.guide, x)}
    for objective, loss in (("elbo", Trace_ELBO), ("meanfield", TraceMeanField_ELBO)):
        model, guide, _ = ldm.svi_program(objective)
        estimates[objective] = _estimates(loss, model, guide, x)
    with torch.no_grad():
        many = x.repeat(300, 1)  # the same digits, 300 draws each, per estimate
        per_datum = [ldm.elbo(many).mean().item() for _ in range(6)]
    reference, reference_se = _mean_and_stderr(per_datum)
    for name, values in estimates.items():
        mean, se = _mean_and_stderr(values)
        assert abs(mean - reference) < 4 * math.hypot(se, reference_se), (name, mean, reference, se)
    # power: the prior chain's part of the bound is far larger than the tests' resolution, so an
    # estimator that dropped or doubled it would fail
    with torch.no_grad():
        prior_part = ldm.prior.elbo(ldm._posterior(many).sample()).mean().item()
    resolution = 4 * max(_mean_and_stderr(values)[1] for values in [*estimates.values(), per_datum])
    assert abs(prior_part) > 10 * resolution, (prior_part, resolution)


def test_the_simple_objective_is_not_the_elbo():
    pyro.set_rng_seed(1)
    ldm = _small()
    x = _digits()
    model, guide, loss = ldm.svi_program("simple")
    simple = _estimates(type(loss), model, guide, x)
    with torch.no_grad():
        elbo = [ldm.elbo(x.repeat(300, 1)).mean().item() for _ in range(6)]
    (a, a_se), (b, b_se) = _mean_and_stderr(simple), _mean_and_stderr(elbo)
    assert abs(a - b) > 4 * math.hypot(a_se, b_se)


def test_log_evidence_through_the_hierarchy_is_above_the_elbo():
    pyro.set_rng_seed(2)
    ldm = _small()
    x = _digits(4)
    with torch.no_grad():
        bound = torch.stack([ldm.elbo(x) for _ in range(200)]).mean(0)
    evidence = log_evidence(ldm.model, ldm.guide, x, num_samples=500)
    assert evidence.shape == (4,)
    assert (evidence > bound - 0.5).all()  # IWAE-k ≥ ELBO in expectation (k = 500: clearly above)
    assert (evidence - bound).mean() > 0


@pytest.mark.parametrize("stage", STAGES)
def test_each_stage_trains_its_part_and_freezes_the_other(stage):
    pyro.clear_param_store()
    ldm = _small(stage=stage)
    ldm.float()
    x = _digits().float()
    before = {name: value.clone() for name, value in ldm.state_dict().items()}
    model, guide, loss = ldm.svi_program("meanfield")
    step = SVIStep(model, guide, loss, lr=1e-2, module=ldm, after_step=ldm.after_step)
    for _ in range(3):
        step(x)
    changed = {name for name, value in ldm.state_dict().items() if not torch.equal(value, before[name])}
    autoencoder = {name for name in changed if name.startswith("autoencoder.")}
    prior = {name for name in changed if name.startswith("prior.denoiser.")}
    assert bool(autoencoder) == (stage != "prior")
    assert bool(prior) == (stage != "autoencoder")


def test_latent_scale_is_fitted_to_unit_spread_and_saved(tmp_path):
    ldm = _small().float()
    x = _digits(20).float()
    scale = ldm.fit_latent_scale(x)
    loc, _ = ldm.autoencoder.encode(x)
    assert (scale * loc).std().item() == pytest.approx(1.0, rel=1e-5)
    ldm.set_stage("prior")
    path = ckpt.save_checkpoint(tmp_path / "ldm.pt", ldm, epoch=1)
    restored = load(path)
    assert restored.stage == "prior" and float(restored.latent_scale) == pytest.approx(scale)
    generator = torch.Generator().manual_seed(0)
    expected = ldm.elbo(x, generator=generator)
    assert torch.equal(restored.elbo(x, generator=torch.Generator().manual_seed(0)), expected)


def test_prior_predictive_and_samples():
    ldm = _small()
    draws = Predictive(ldm.model, num_samples=2)(None, num_data=3)
    assert draws["x"].shape == (2, 3, 784) and set(draws["x"].unique().tolist()) <= {0.0, 1.0}
    assert draws["z_6"].shape == (2, 3, 3) and draws["z_0"].shape == (2, 3, 3)
    images, latents = ldm.sample(5, return_latents=True, generator=torch.Generator().manual_seed(0))
    assert images.shape == (5, 784) and latents.shape == (5, 3)
    assert 0 <= images.min() and images.max() <= 1
    assert ldm.sample(4, steps=3).shape == (4, 784)
    binary = ldm.sample(4, mean=False)
    assert set(binary.unique().tolist()) <= {0.0, 1.0}


def test_the_prior_chain_takes_an_ema_importance_sampled_timesteps_and_learned_variances(tmp_path):
    """The prior is a DDPM: its options carry over, after_step updates them, checkpoints keep them."""
    pyro.clear_param_store()
    ldm = _small(prior_ema_decay=0.9, time_sampling="importance", reverse_variance="learned").float()
    x = _digits(8).float()
    model, guide, loss = ldm.svi_program("meanfield")
    step = SVIStep(model, guide, loss, lr=1e-2, module=ldm, after_step=ldm.after_step)
    for _ in range(3):
        step(x)
    assert int(ldm.prior.ema_updates) == 3 and int(ldm.prior.term_counts.sum()) == 3 * 8
    assert not torch.equal(
        ldm.prior.ema_denoiser.network.output.weight, ldm.prior.denoiser.network.output.weight
    )
    path = ckpt.save_checkpoint(tmp_path / "ldm.pt", ldm, epoch=1)
    restored = load(path)
    assert restored.config.prior_ema_decay == 0.9 and torch.equal(
        restored.prior.term_counts, ldm.prior.term_counts
    )
    generator = torch.Generator().manual_seed(0)
    assert torch.equal(
        restored.sample(3, generator=generator), ldm.sample(3, generator=torch.Generator().manual_seed(0))
    )


def _parts(family):
    """Copies of the autoencoder's and the prior denoiser's weights."""
    state = family.state_dict()
    return [
        {name: value.clone() for name, value in state.items() if name.startswith(prefix)}
        for prefix in ("autoencoder.", "prior.denoiser.")
    ]


def _same(one: dict, other: dict) -> bool:
    return all(torch.equal(value, other[name]) for name, value in one.items())


@pytest.mark.parametrize("recipe", list(RECIPES))
def test_a_recipe_trains_its_stages_at_their_rates_and_resumes_from_either(recipe, tmp_path):
    x = _digits(32).float()
    settings = dict(recipe=recipe, first_epochs=1, lr=2e-3, prior_lr=5e-4, latent_data=x, progress=False)

    def run(family, **options):
        loader = BatchLoader(x, batch_size=16, seed=0)
        return train_latent_diffusion(family, loader, out=tmp_path, seed=0, **(settings | options))

    # stage one and the switch only (epochs=0: what `pvae train ldm` asks before its own second run)
    family = _small(stage="joint").float()
    done = run(family, epochs=0)
    assert done.first.epochs == 1 and done.second is None
    assert family.stage == RECIPES[recipe] and not (tmp_path / "checkpoint.pt").exists()
    loc, _ = family.autoencoder.encode(x)
    assert (family.latent_scale * loc).std().item() == pytest.approx(1.0, rel=1e-4)
    first_stage = ckpt.load_checkpoint(tmp_path / "autoencoder" / "checkpoint.pt")
    assert first_stage["train_config"]["lr"] == 2e-3
    assert first_stage["family"]["kwargs"]["stage"] == "autoencoder"
    trained_autoencoder, _ = _parts(family)

    # resumed: the finished first stage is reused as it is, the second trained at its own rate
    family = _small().float()
    done = run(family, epochs=1, resume=True)
    assert done.first.train_elbo == first_stage["history"]["train_elbo"] and done.second.epochs == 1
    autoencoder, _ = _parts(family)
    assert _same(autoencoder, trained_autoencoder) == (recipe == "two-stage")  # frozen in stage "prior"
    second_stage = ckpt.load_checkpoint(tmp_path / "checkpoint.pt")
    assert second_stage["train_config"]["lr"] == 5e-4
    assert second_stage["family"]["kwargs"]["stage"] == RECIPES[recipe]

    # resumed again: the second stage continues from its checkpoint, the first is left alone
    family = _small().float()
    done = run(family, epochs=2, resume=True)
    assert done.first is None and done.second.epochs == 2
    assert float(family.latent_scale) == pytest.approx(float(second_stage["state_dict"]["latent_scale"]))


def test_a_recipe_takes_a_trained_autoencoder_as_it_stands():
    x = _digits(16).float()
    family = _small(stage="autoencoder").float()
    autoencoder, prior = _parts(family)
    loader = BatchLoader(x, batch_size=8, seed=0)
    done = train_latent_diffusion(family, loader, first_epochs=0, epochs=1, latent_data=x, progress=False)
    assert done.first is None and done.second.epochs == 1 and family.stage == "prior"
    trained_autoencoder, trained_prior = _parts(family)
    assert _same(autoencoder, trained_autoencoder) and not _same(prior, trained_prior)
    with pytest.raises(ValueError, match="recipe must be one of"):
        train_latent_diffusion(family, loader, recipe="both", first_epochs=0, epochs=1, latent_data=x)


def test_bad_arguments_are_refused():
    with pytest.raises(ValueError, match="stage must be one of"):
        _small(stage="both")
    with pytest.raises(ValueError, match="architecture must be one of"):
        _small(architecture="unet")
    ldm = _small(stage="autoencoder")
    with pytest.raises(ValueError, match="not for stage 'autoencoder'"):
        ldm.svi_program("simple")
    with pytest.raises(ValueError, match="objective must be one of"):
        ldm.svi_program("iwae")
