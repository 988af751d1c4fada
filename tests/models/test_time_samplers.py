"""Time samplers of the DDPM's subsampled pair: every one unbiased for the full chain's ELBO (z-tests with a
power check), the importance sampler's history (ring buffer, probabilities, checkpointed) and its lower
variance on a trained model."""

from __future__ import annotations

import math

import pyro
import pytest
import torch
from pyro import poutine

import pvae
from pvae.models.diffusion import DDPM
from pvae.models.diffusion import family as diffusion_family
from pvae.models.diffusion.chain import TimeDraw
from pvae.models.diffusion.family import TERM_HISTORY, UNIFORM_SHARE

T = 8


def _ddpm(time_sampling: str, seed: int = 0, timesteps: int = T) -> DDPM:
    torch.manual_seed(seed)
    return DDPM(
        data_shape=(2,), timesteps=timesteps, hidden_dim=16, num_blocks=1, time_sampling=time_sampling
    )


def _data(n: int = 32) -> torch.Tensor:
    return pvae.data.two_moons(n, noise=0.1, generator=torch.Generator().manual_seed(3))


def _estimates(family: DDPM, x: torch.Tensor, draws: int) -> torch.Tensor:
    """−(subsampled pair's ELBO estimate) per call, summed over the data, ``draws`` calls."""
    model, guide, elbo = family.svi_program("meanfield")
    with torch.no_grad():
        return torch.tensor([elbo.loss(model, guide, x) for _ in range(draws)], dtype=torch.float64)


def _reference(family: DDPM, x: torch.Tensor, draws: int) -> torch.Tensor:
    """−elbo(x).sum() (every term in closed form given one x_t per t), ``draws`` independent draws."""
    return torch.stack([-family.elbo(x).sum().double() for _ in range(draws)])


def _z(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.mean() - b.mean()) / torch.sqrt(a.var() / len(a) + b.var() / len(b)))


def _skewed_history(family: DDPM) -> None:
    """A full history making p_t far from uniform (most mass on t = 1 and t = T)."""
    values = torch.ones(T)
    values[0], values[-1] = 40.0, 15.0
    family.record_terms(torch.arange(1, T + 1).repeat(TERM_HISTORY), values.repeat(TERM_HISTORY))


@pytest.mark.parametrize("time_sampling", ["plate", "per_datum", "stratified", "importance"])
def test_every_time_sampler_is_unbiased_for_the_full_chain_elbo(time_sampling):
    family, x = _ddpm(time_sampling), _data()
    family.train()
    if time_sampling == "importance":
        _skewed_history(family)
        probs = family.timestep_probs()
        assert float(probs.max() / probs.min()) > 10  # a real test of the 1/p_t weights
    pyro.set_rng_seed(1)
    estimates, reference = _estimates(family, x, 600), _reference(family, x, 300)
    assert abs(_z(estimates, reference)) < 4


def test_the_z_test_rejects_importance_draws_without_their_weights(monkeypatch):
    """Power: the same draws weighted by T instead of 1/p_t estimate Σ_t T·p_t·L_t, and the test sees it."""
    family, x = _ddpm("importance"), _data()
    _skewed_history(family)
    real = diffusion_family.importance_timesteps

    def unweighted(probs, *, like):
        return TimeDraw(real(probs, like=like).t, float(T))

    monkeypatch.setattr(diffusion_family, "importance_timesteps", unweighted)
    pyro.set_rng_seed(1)
    assert abs(_z(_estimates(family, x, 600), _reference(family, x, 300))) > 4


def test_the_history_keeps_the_last_values_of_each_timestep_and_sets_p_from_them():
    family = _ddpm("importance")
    assert torch.allclose(family.timestep_probs(), torch.full((T,), 1 / T))
    # t = 1 seen 13 times in one batch (values 0 … 12), t = 2 … T ten times each with value t
    t = torch.cat([torch.ones(13, dtype=torch.long), torch.arange(2, T + 1).repeat(TERM_HISTORY)])
    values = torch.cat([torch.arange(13.0), torch.arange(2, T + 1).float().repeat(TERM_HISTORY)])
    family.record_terms(t[:-1], values[:-1])  # t = T one short: still uniform
    assert int(family.term_counts[-1]) == TERM_HISTORY - 1
    assert torch.allclose(family.timestep_probs(), torch.full((T,), 1 / T))
    family.record_terms(t[-1:], values[-1:])
    assert sorted(family.term_history[0].tolist()) == [float(v) for v in range(3, 13)]  # the last ten
    assert int(family.term_counts[0]) == 13
    rms = torch.tensor([math.sqrt(sum(v * v for v in range(3, 13)) / 10)] + list(range(2, T + 1))).float()
    expected = (1 - UNIFORM_SHARE) * rms / rms.sum() + UNIFORM_SHARE / T
    assert torch.allclose(family.timestep_probs(), expected, atol=1e-6)
    # the ring continues where it stopped: two more values for t = 1 replace the two oldest (3 and 4)
    family.record_terms(torch.tensor([1, 1]), torch.tensor([100.0, 200.0]))
    assert sorted(family.term_history[0].tolist()) == [float(v) for v in range(5, 13)] + [100.0, 200.0]


def test_stratified_draws_cover_every_timestep_once_per_batch_of_T():
    family = _ddpm("stratified")
    x = _data(T)
    for _ in range(5):
        trace = poutine.trace(family.guide_subsampled).get_trace(x)
        steps = trace.nodes["t"]["value"].floor().long() + 1  # the stratified sampler's u ∈ [0, T)
        assert sorted(steps.tolist()) == list(range(1, T + 1))


def test_the_history_trains_with_the_family_and_is_checkpointed(tmp_path):
    family = _ddpm("importance", timesteps=4)
    x = _data(64)
    loader = pvae.data.BatchLoader(x, batch_size=16, seed=0)
    checkpoint = tmp_path / "run.pt"
    pvae.inference.train(
        family, loader, epochs=2, objective="meanfield", progress=False, checkpoint=checkpoint
    )
    assert int(family.term_counts.sum()) == 2 * 64  # every datum of every step, recorded after its step
    assert bool((family.term_history != 0).all())
    restored = pvae.load(checkpoint)
    assert torch.equal(restored.term_history, family.term_history)
    assert torch.equal(restored.term_counts, family.term_counts)
    assert torch.allclose(restored.timestep_probs(), family.timestep_probs())
    # evaluation does not touch the history
    before = family.term_counts.clone()
    family.eval()
    _estimates(family, x, 3)
    assert torch.equal(family.term_counts, before)


def test_importance_sampling_lowers_the_variance_of_the_elbo_estimate_on_a_trained_model():
    timesteps = 50
    x = _data(512)
    trained = _ddpm("per_datum", seed=1, timesteps=timesteps)
    loader = pvae.data.BatchLoader(x, batch_size=128, seed=0)
    pvae.inference.train(trained, loader, epochs=40, objective="simple", lr=3e-3, progress=False)
    importance = _ddpm("importance", seed=1, timesteps=timesteps)
    importance.load_state_dict(trained.state_dict(), strict=False)
    with torch.no_grad():  # the history from the model's own terms: ten draws of each L_t
        for _ in range(TERM_HISTORY):
            terms = trained.elbo(x[:1], return_terms=True)[1]
            values = torch.cat([-terms["decoder"], terms["kl"][:, 0]])
            importance.record_terms(torch.arange(1, timesteps + 1), values)
    batch = x[:64]
    pyro.set_rng_seed(2)
    uniform, weighted = _estimates(trained, batch, 300), _estimates(importance, batch, 300)
    assert abs(_z(uniform, weighted)) < 4  # the same ELBO …
    assert float(weighted.var() / uniform.var()) < 0.5  # … estimated with less than half the variance
