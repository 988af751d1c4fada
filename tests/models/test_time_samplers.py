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


# ---- learned reverse variances and the hybrid objective --------------------------------------------------
def _learned(timesteps: int = T, seed: int = 0) -> DDPM:
    torch.manual_seed(seed)
    return DDPM(data_shape=(2,), timesteps=timesteps, hidden_dim=16, num_blocks=1, reverse_variance="learned")


def test_the_learned_log_variance_runs_from_log_beta_tilde_to_log_beta():
    from pvae.models.diffusion.chain import learned_log_variance

    schedule = _learned().schedule
    t = torch.arange(1, T + 1)  # one timestep per row of the (T, 2) batch
    ones = torch.ones(T, 2)
    beta, beta_tilde = schedule.beta[1:], schedule.beta_tilde[1:]
    at_plus = learned_log_variance(schedule, ones, t, 1)
    at_minus = learned_log_variance(schedule, -ones, t, 1)
    assert torch.allclose(at_plus[:, 0], beta.log(), atol=1e-6)
    assert torch.allclose(at_minus[1:, 0], beta_tilde[1:].log(), atol=1e-6)
    assert torch.allclose(at_minus[0, 0], beta_tilde[1].log(), atol=1e-6)  # β̃_1 = 0 clipped to β̃_2
    middle = learned_log_variance(schedule, 0 * ones, t, 1)
    assert torch.allclose(middle, (at_plus + at_minus) / 2, atol=1e-6)


def test_with_learned_variances_the_subsampled_estimate_stays_unbiased_for_the_full_chain_elbo():
    family, x = _learned(), _data()
    with torch.no_grad():  # a network whose v is not zero, so the variances vary per entry
        family.denoiser.network.output.bias.uniform_(-1, 1)
    pyro.set_rng_seed(4)
    assert abs(_z(_estimates(family, x, 400), _reference(family, x, 200))) < 4


def test_the_hybrid_objective_trains_the_mean_by_l_simple_and_the_variances_by_the_elbo():
    family, x = _learned(), _data(16)
    model, guide, _ = family.svi_program("hybrid")
    guide_trace = poutine.trace(guide).get_trace(x)
    trace = poutine.trace(poutine.replay(model, trace=guide_trace)).get_trace(x)
    simple, vlb = trace.nodes["x_prev"]["fn"].base_dist, trace.nodes["x_prev_vlb"]["fn"].base_dist
    assert simple.loc.requires_grad and not simple.scale.requires_grad  # fixed σ_t for L_simple
    assert not vlb.loc.requires_grad and vlb.scale.requires_grad  # the mean's gradient stopped
    assert not torch.allclose(simple.scale, vlb.scale)
    with pytest.raises(ValueError, match="'simple' does not train learned variances"):
        family.svi_program("simple")
    with pytest.raises(ValueError, match="reverse_variance='learned'"):
        _ddpm("per_datum").svi_program("hybrid")


def test_a_learned_variance_model_trains_samples_and_round_trips_a_checkpoint(tmp_path):
    family = _learned(timesteps=20)
    loader = pvae.data.BatchLoader(_data(256), batch_size=64, seed=0)
    checkpoint = tmp_path / "run.pt"
    history = pvae.inference.train(
        family, loader, loader, epochs=3, objective="hybrid", lr=3e-3, progress=False, checkpoint=checkpoint
    )
    assert history.objective == "hybrid" and all(math.isfinite(v) for v in history.test_elbo)
    restored = pvae.load(checkpoint)
    x = _data(8)
    assert torch.allclose(
        restored.elbo(x, generator=torch.Generator().manual_seed(0)),
        family.elbo(x, generator=torch.Generator().manual_seed(0)),
    )


def test_ancestral_sampling_draws_with_the_networks_variances():
    """With ε chosen so that every mean is 0, the state after the step from t = 2 is σ_2·z: a network
    answering v = +1 gives the fixed chain's σ_2 = √β_2 draw for draw, v = −1 gives √β̃_2."""
    from pvae.models.diffusion.sampling import ancestral_sample

    schedule = _learned().schedule

    def zero_mean(x, t):  # μ = x/√α_t − eps_coef·ε = 0
        return x * schedule.coef("recip_sqrt_alpha", t, x, 1) / schedule.coef("eps_coef", t, x, 1)

    def state_after_t2(denoiser):
        generator = torch.Generator().manual_seed(0)
        return ancestral_sample(denoiser, schedule, 6, (2,), generator=generator, record=(T - 1,))[1][0]

    fixed = state_after_t2(zero_mean)
    plus = state_after_t2(lambda x, t: (zero_mean(x, t), torch.ones_like(x)))
    minus = state_after_t2(lambda x, t: (zero_mean(x, t), -torch.ones_like(x)))
    assert torch.allclose(plus, fixed, rtol=1e-5)
    ratio = torch.sqrt(schedule.beta_tilde[2] / schedule.beta[2])
    assert torch.allclose(minus, ratio * fixed, rtol=1e-4) and float(ratio) < 0.9
