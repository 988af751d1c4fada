"""DDPM on the recorded step engines: with one timestep per datum (or importance-sampled timesteps) the
time-subsampled pair has a fixed structure, so the traced step replays the eager step bit for bit —
batches with and without t = 1 entries alike — and the compiled step agrees with it to rounding."""

import pyro
import pytest
import torch

from pvae.inference.step import SVIStep
from pvae.models.diffusion import DDPM

STEPS = 8


def _moons_like(count: int, batch: int, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(count, batch, 2, generator=generator) * torch.tensor([1.0, 0.5])


def _pixels(count: int, batch: int, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    levels = torch.randint(0, 256, (count, batch, 1, 8, 8), generator=generator)
    return levels.float() / 127.5 - 1


CASES = {
    "meanfield/per_datum": (dict(time_sampling="per_datum"), "meanfield", _moons_like),
    "elbo/stratified": (dict(time_sampling="stratified"), "elbo", _moons_like),
    "simple/per_datum": (dict(time_sampling="per_datum"), "simple", _moons_like),
    "meanfield/importance/learned": (
        dict(time_sampling="importance", reverse_variance="learned"),
        "meanfield",
        _moons_like,
    ),
    "hybrid/importance/learned": (
        dict(time_sampling="importance", reverse_variance="learned"),
        "hybrid",
        _moons_like,
    ),
    "meanfield/per_datum/images": (
        dict(time_sampling="per_datum", data_shape=(1, 8, 8), channels=(4, 8)),
        "meanfield",
        _pixels,
    ),
}


def _run(options: dict, objective: str, batches: torch.Tensor, engine: str):
    pyro.clear_param_store()
    torch.manual_seed(0)
    settings = {"data_shape": (2,), "timesteps": 6, "ema_decay": 0.9, "hidden_dim": 16, "num_blocks": 1}
    family = DDPM(**(settings | options), name="ddpm")
    family.train()
    model, guide, elbo = family.svi_program(objective)[:3]
    step = SVIStep(model, guide, elbo, lr=1e-2, engine=engine, module=family, after_step=family.after_step)
    losses = torch.stack([step(x) for x in batches])
    return family, step, losses


@pytest.mark.parametrize("case", list(CASES))
def test_traced_ddpm_step_equals_the_eager_step_bit_for_bit(case):
    options, objective, data = CASES[case]
    batches = data(STEPS, 16)
    eager_family, _, eager_losses = _run(options, objective, batches, "eager")
    traced_family, traced, traced_losses = _run(options, objective, batches, "trace")
    assert traced.disabled_reason is None
    assert traced.counts == {"eager": 1, "graph": STEPS - 1, "guard_failures": 0}
    torch.testing.assert_close(traced_losses, eager_losses, rtol=1e-6, atol=1e-4)
    eager_state, traced_state = eager_family.state_dict(), traced_family.state_dict()
    for key, value in eager_state.items():  # weights, EMA, the importance sampler's history
        assert torch.equal(value, traced_state[key]), key
    if options["time_sampling"] == "importance":
        assert int(traced_family.term_counts.sum()) == STEPS * 16  # every replay delivered its terms


def test_batches_with_and_without_the_first_timestep_replay_the_same_graph():
    """The t = 1 entries (the point mass of q, the discretized decoder of p) are computed branch-free, so a
    graph recorded on one kind of batch replays the other. The importance sampler's history counts the
    t = 1 draws of each step."""
    options = dict(time_sampling="importance", channels=(4, 8))
    batches = _pixels(12, 2)  # two images per batch, T = 6: about a third of the batches have t = 1

    def first_timestep_counts(engine):
        pyro.clear_param_store()
        torch.manual_seed(0)
        family = DDPM(data_shape=(1, 8, 8), timesteps=6, ema_decay=0.9, name="ddpm", **options)
        model, guide, elbo = family.svi_program("meanfield")[:3]
        step = SVIStep(
            model, guide, elbo, lr=1e-2, engine=engine, module=family, after_step=family.after_step
        )
        counts, losses = [], []
        for x in batches:
            losses.append(step(x))
            counts.append(int(family.term_counts[0]))
        return step, torch.diff(torch.tensor([0, *counts])), torch.stack(losses)

    _, eager_counts, eager_losses = first_timestep_counts("eager")
    traced, traced_counts, traced_losses = first_timestep_counts("trace")
    assert torch.equal(traced_counts, eager_counts)
    replayed = traced_counts[1:]
    assert (replayed > 0).any() and (replayed == 0).any()  # both kinds of batch were replayed
    assert traced.counts == {"eager": 1, "graph": 11, "guard_failures": 0}
    torch.testing.assert_close(traced_losses, eager_losses, rtol=1e-6, atol=1e-4)


def test_compiled_ddpm_step_matches_eager_from_the_same_seed():
    """The compiled step draws timesteps and noise with torch's samplers, as the eager step does."""
    options, objective, data = CASES["meanfield/importance/learned"]
    batches = data(4, 16)
    eager_family, _, eager_losses = _run(options, objective, batches, "eager")
    compiled_family, compiled, compiled_losses = _run(options, objective, batches, "compile")
    assert compiled.counts["graph"] == 3 and compiled.disabled_reason is None
    assert compiled.compile_failure is None  # compiled, not the traced graph replayed as a fallback
    torch.testing.assert_close(compiled_losses, eager_losses, rtol=1e-5, atol=1e-3)
    compiled_state = compiled_family.state_dict()
    for key, value in eager_family.state_dict().items():
        torch.testing.assert_close(compiled_state[key], value, rtol=1e-4, atol=1e-5, msg=key)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_recorded_ddpm_steps_on_the_gpu_with_cuda_graphs():
    """On CUDA: the traced step equals the eager one (to rounding: CUDA's reductions may reorder), and the
    compiled step replays as CUDA graphs (``mode="reduce-overhead"``) with the importance sampler's terms
    delivered after every replay."""
    options = dict(time_sampling="importance", reverse_variance="learned")
    batches = _moons_like(12, 64).cuda()

    def run(engine, compile_options=None):
        pyro.clear_param_store()
        torch.manual_seed(0)
        settings = {"data_shape": (2,), "timesteps": 6, "ema_decay": 0.9, "hidden_dim": 16, "num_blocks": 1}
        family = DDPM(**(settings | options), name="ddpm").cuda()
        model, guide, elbo = family.svi_program("meanfield")[:3]
        step = SVIStep(
            model,
            guide,
            elbo,
            lr=1e-2,
            engine=engine,
            module=family,
            after_step=family.after_step,
            compile_options=compile_options,
        )
        losses = torch.stack([step(x) for x in batches])
        return family, step, losses

    _, _, eager_losses = run("eager")
    _, traced, traced_losses = run("trace")
    assert traced.counts["graph"] == len(batches) - 1 and traced.disabled_reason is None
    torch.testing.assert_close(traced_losses, eager_losses, rtol=1e-5, atol=1e-4)
    compiled_family, compiled, compiled_losses = run("compile", {"mode": "reduce-overhead"})
    assert compiled.counts["graph"] == len(batches) - 1 and compiled.disabled_reason is None
    assert torch.isfinite(compiled_losses).all()
    assert int(compiled_family.term_counts.sum()) == len(batches) * 64
    assert compiled_family.term_history.device.type == "cuda"
