"""SVIStep: the traced (trace-once/replay) step equals Pyro's eager Trace_ELBO step bit for bit, keeps
validation through guards, and the compiled step agrees with it."""

import copy
import functools
import warnings

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro.infer import Trace_ELBO, TraceMeanField_ELBO

from pvae.family import Family
from pvae.inference import compile_passes
from pvae.inference.objectives import IWAE_ELBO
from pvae.inference.step import SVIStep
from pvae.models.ae import DAE
from pvae.models.vae import VAE


def _batches(count, batch=16, dim=20, seed=0, binary=True):
    generator = torch.Generator().manual_seed(seed)
    grey = torch.rand(count, batch, dim, generator=generator)
    return torch.bernoulli(grey, generator=generator) if binary else grey


def _run(make_family, make_elbo, engine, batches, seed=0, lrs=None, adam_kwargs=None, compile_options=None):
    pyro.set_rng_seed(seed)
    family = make_family()
    step = SVIStep(
        family.model,
        family.guide,
        make_elbo(),
        lr=1e-2,
        engine=engine,
        module=family,
        adam_kwargs=adam_kwargs,
        compile_options=compile_options,
    )
    losses = []
    for index, x in enumerate(batches):
        if lrs is not None:
            step.set_lr(lrs[index])
        losses.append(step(x))
    return family, step, torch.stack(losses)


DECAY = [1e-2, 3e-3, 1e-3, 3e-4, 1e-4, 3e-5]  # a learning-rate schedule, one rate per step


FAMILIES = {
    "vae": lambda: VAE(x_dim=20, z_dim=3, hidden_dim=16),
    "vae-gaussian": lambda: VAE(x_dim=20, z_dim=3, hidden_dim=16, likelihood="gaussian", scale=0.5),
    "dae": lambda: DAE(x_dim=20, hidden_dim=16, z_dim=4, corruption="mask", noise=0.3),
}
ELBOS = {
    "elbo": Trace_ELBO,
    "meanfield": TraceMeanField_ELBO,
    "iwae": lambda: IWAE_ELBO(num_particles=3),
    "elbo-2particles": lambda: Trace_ELBO(num_particles=2),
}
CASES = [("vae", "elbo"), ("vae", "iwae"), ("vae-gaussian", "meanfield"), ("dae", "elbo-2particles")]


@pytest.mark.parametrize("family_name, elbo_name", CASES, ids=[f"{f}-{e}" for f, e in CASES])
def test_traced_step_equals_the_eager_pyro_step_bit_for_bit(family_name, elbo_name):
    batches = _batches(6, binary=family_name == "vae")
    eager_family, _, eager_losses = _run(FAMILIES[family_name], ELBOS[elbo_name], "eager", batches)
    traced_family, traced, traced_losses = _run(FAMILIES[family_name], ELBOS[elbo_name], "trace", batches)
    assert traced.counts["graph"] == 5 and traced.counts["eager"] == 1 and traced.disabled_reason is None
    for (name, a), b in zip(eager_family.named_parameters(), traced_family.parameters()):
        assert torch.equal(a, b), name  # same draws, same kernels: identical after 6 Adam steps
    # Pyro adds the reported loss up in Python floats, the graph in float32: equal to rounding.
    torch.testing.assert_close(traced_losses, eager_losses, rtol=1e-6, atol=1e-4)


def test_a_traced_step_applies_adam_to_trace_elbos_loss_and_gradients():
    family = FAMILIES["vae"]()
    x = _batches(3)
    step = SVIStep(family.model, family.guide, Trace_ELBO(), engine="trace", module=family)
    step(x[0])  # eager first step; the graph is recorded, and replayed, on the next one
    step(x[1])
    assert step.counts == {"eager": 1, "graph": 1, "guard_failures": 0}
    before = [param.detach().clone() for param in step.params]
    state = copy.deepcopy(step.optimizer.state_dict())
    pyro.set_rng_seed(11)
    reference = Trace_ELBO().differentiable_loss(family.model, family.guide, x[2])
    gradients = torch.autograd.grad(reference, step.params)
    pyro.set_rng_seed(11)
    loss = step(x[2])  # a replayed step: the same draws
    assert step.counts["graph"] == 2
    torch.testing.assert_close(loss, reference.detach(), rtol=1e-6, atol=1e-4)
    # Adam's update applied by hand to Trace_ELBO's own gradients lands on the same parameters
    copies = [param.clone().requires_grad_() for param in before]
    adam = torch.optim.Adam(copies, **step.optimizer.defaults)
    adam.load_state_dict(state)
    for copied, gradient in zip(copies, gradients):
        copied.grad = gradient
    adam.step()
    for param, expected, old in zip(step.params, copies, before):
        assert torch.equal(param, expected) and not torch.equal(param, old)


def test_a_smaller_last_batch_runs_eagerly_and_still_matches():
    full = list(_batches(4))
    # (16, 20) × 4, then (5, 20), then a (16, 20) batch laid out column-major: other strides, which a
    # compiled graph (called without Dynamo's guard checks) must not be given
    batches = [*full, full[0][:5], full[1].t().contiguous().t()]
    eager_family, _, eager_losses = _run(FAMILIES["vae"], Trace_ELBO, "eager", batches)
    traced_family, traced, traced_losses = _run(FAMILIES["vae"], Trace_ELBO, "trace", batches)
    assert traced.counts == {"eager": 3, "graph": 3, "guard_failures": 0}
    for a, b in zip(eager_family.parameters(), traced_family.parameters()):
        assert torch.equal(a, b)
    torch.testing.assert_close(traced_losses, eager_losses, rtol=1e-6, atol=1e-4)


def test_validation_still_runs_on_replayed_steps():
    family = FAMILIES["vae"]()
    step = SVIStep(family.model, family.guide, Trace_ELBO(), engine="trace", module=family)
    for x in _batches(3):
        step(x)
    assert step.counts["graph"] == 2
    grey = _batches(1, binary=False)[0]
    with pytest.raises(ValueError, match="binary"):  # the guard fails, the eager rerun raises the VAE's error
        step(grey)
    assert step.counts["guard_failures"] == 1

    gaussian = FAMILIES["vae-gaussian"]()
    step = SVIStep(gaussian.model, gaussian.guide, Trace_ELBO(), engine="trace", module=gaussian)
    for x in _batches(3, binary=False):
        step(x)
    bad = _batches(1, binary=False)[0].clone()
    bad[3, 4] = float("nan")
    with pytest.raises(ValueError, match="finite"):
        step(bad)


class Branching(Family):
    """A model whose structure depends on a tensor value read in Python (not traceable once for all)."""

    def __init__(self, name=None):
        super().__init__(name)
        self.loc = torch.nn.Parameter(torch.zeros(()))
        self.config = {"name": name}

    def model(self, x):
        pyro.module(self.name, self)
        scale = 1.0 if x.mean() > 0 else 2.0  # a Python branch on data
        with pyro.plate("data", x.shape[0]):
            pyro.sample("x", dist.Normal(self.loc, scale), obs=x)

    def guide(self, x):
        pyro.module(self.name, self)


def test_data_dependent_branches_fall_back_to_eager_steps():
    family = Branching()
    step = SVIStep(family.model, family.guide, Trace_ELBO(), lr=0.1, engine="trace", module=family)
    positive, negative = torch.full((8,), 1.0), torch.full((8,), -1.0)
    step(positive)
    step(positive)  # recorded with the "> 0" branch
    expected = -dist.Normal(family.loc.detach(), 2.0).log_prob(negative).sum()
    assert torch.allclose(step(negative), expected)  # guard failed: this step ran eagerly, correctly
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        step(negative)
        step(negative)
    assert step.disabled_reason is not None and "guards failed" in step.disabled_reason
    assert any("leaving the trace engine" in str(w.message) for w in caught)
    step(positive)
    assert step.counts["graph"] == 1 and step.counts["eager"] == 5


def test_a_learning_rate_schedule_replays_bit_for_bit_in_the_traced_step():
    batches = _batches(6)
    eager_family, eager, _ = _run(FAMILIES["vae"], Trace_ELBO, "eager", batches, lrs=DECAY)
    traced_family, traced, _ = _run(FAMILIES["vae"], Trace_ELBO, "trace", batches, lrs=DECAY)
    assert traced.counts["graph"] == 5 and traced.num_steps == eager.num_steps == 6
    for a, b in zip(eager_family.parameters(), traced_family.parameters()):
        assert torch.equal(a, b)
    constant_family, _, _ = _run(FAMILIES["vae"], Trace_ELBO, "eager", batches)
    assert not all(torch.equal(a, b) for a, b in zip(eager_family.parameters(), constant_family.parameters()))


@pytest.mark.parametrize("fused", [True, False], ids=["fused-adam-after-the-graph", "adam-in-the-graph"])
def test_compiled_step_trains_and_matches_eager_from_the_same_seed(fused):
    """The compiled step draws its random numbers with torch's samplers, as the eager step does, so from
    the same seed it follows the eager run to float32 rounding. With a learning rate changing every step:
    torch's fused Adam after the graph reads it from the optimizer; the Adam update recorded into the
    graph (no fused kernel) reads it as an input."""
    batches = _batches(4)
    eager_family, _, eager_losses = _run(FAMILIES["vae"], Trace_ELBO, "eager", batches, lrs=DECAY)
    compiled_family, compiled, compiled_losses = _run(
        FAMILIES["vae"], Trace_ELBO, "compile", batches, lrs=DECAY, adam_kwargs={"fused": fused}
    )
    assert compiled.counts["graph"] == 3 and compiled.disabled_reason is None
    assert compiled.compile_failure is None  # compiled, not the traced graph replayed as a fallback
    assert compiled._update_in_graph is not fused
    torch.testing.assert_close(compiled_losses, eager_losses, rtol=1e-5, atol=1e-3)
    for a, b in zip(eager_family.parameters(), compiled_family.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    # the schedule matters at this tolerance: a rate frozen at its first value would fail the check above
    constant_family, _, _ = _run(FAMILIES["vae"], Trace_ELBO, "eager", batches, lrs=DECAY[:1] * 4)
    differences = [
        (a - b).abs().max().item() for a, b in zip(eager_family.parameters(), constant_family.parameters())
    ]
    assert max(differences) > 1e-3


def test_recorded_validation_checks_are_reductions_inductor_compiles():
    """torch.distributions' checks read ``_is_all_true``, which Inductor cannot compile (an eager call out
    of the compiled code each): the recording holds ``all`` in its place, and the guards still fire."""
    batches = _batches(3)
    _, step, _ = _run(FAMILIES["vae"], Trace_ELBO, "trace", batches)
    targets = [node.target for node in step._graph.graph.nodes if node.op == "call_function"]
    assert torch.ops.aten._is_all_true.default not in targets
    assert targets.count(torch.ops.aten.all.default) >= 2  # the support checks of x and z, at least
    grey = batches[0] * 0.5  # not binary: Bernoulli's support check fails, the step reruns eagerly
    with pytest.raises(ValueError, match="binary"):
        step(grey)
    assert step.counts["guard_failures"] == 1


def test_compiled_steps_use_inductors_cache_of_compiled_graphs():
    """A graph handed to Inductor without a shape environment is never cached ("no shape env"): every fit
    would compile afresh (tens of seconds). The second compile of the same step finds the first's."""
    from torch._dynamo.utils import counters

    batches = _batches(2)
    before = dict(counters["inductor"])
    for _ in range(2):
        _, compiled, _ = _run(FAMILIES["vae"], Trace_ELBO, "compile", batches)
        assert compiled.counts["graph"] == 1 and compiled.compile_failure is None
    after = counters["inductor"]

    def added(key):
        return after.get(key, 0) - before.get(key, 0)

    assert added("fxgraph_cache_bypass") == 0
    assert added("fxgraph_cache_hit") >= 1


def test_inductors_own_random_numbers_when_asked():
    """``fallback_random=False`` reaches Inductor: its own generator draws other numbers than eager torch's
    from the same seed (the replayed steps' losses differ), and the step still trains on them."""
    batches = _batches(4)
    _, _, eager_losses = _run(FAMILIES["vae"], Trace_ELBO, "eager", batches)
    options = {"options": {"fallback_random": False}}
    _, compiled, losses = _run(FAMILIES["vae"], Trace_ELBO, "compile", batches, compile_options=options)
    assert compiled.counts["graph"] == 3 and compiled.compile_failure is None
    assert torch.isfinite(losses).all()
    assert losses[0] == eager_losses[0]  # the first step runs eagerly (it records the graph)
    assert not torch.allclose(losses[1:], eager_losses[1:], rtol=1e-3)


def test_log1p_via_log_is_within_a_few_ulp_of_log1p_with_its_special_values():
    """Against float64 log1p over 76 decades of positive x, (−1, 0) down to 1e-38 and uniform draws, in
    float32: at most 3 ulp (the error bound of the formula with a log within 1 ulp); the naive
    log(1 + x) is off by far more near 0, so the test tells the formula from it."""
    from pvae.inference.compile_passes import log1p_via_log

    generator = torch.Generator().manual_seed(0)
    magnitudes = torch.logspace(-38, 38, 100_001, dtype=torch.float64)
    x = torch.cat(
        [
            magnitudes,
            -magnitudes[magnitudes < 1],
            torch.rand(200_000, generator=generator, dtype=torch.float64) * 2 - 1,
        ]
    ).float()
    reference = torch.log1p(x.double())
    ulp = (
        torch.nextafter(reference.float().abs(), torch.tensor(float("inf"))) - reference.float().abs()
    ).double()
    finite = torch.isfinite(reference) & (reference != 0)

    def ulps(values):
        return ((values.double() - reference).abs() / ulp)[finite].max().item()

    assert ulps(log1p_via_log(x)) <= 3
    assert ulps(torch.log(1 + x)) > 1e3
    special = torch.tensor([0.0, -0.0, -1.0, float("inf"), -2.0, float("nan"), -float("inf"), 3.0e38])
    torch.testing.assert_close(log1p_via_log(special), torch.log1p(special), equal_nan=True, rtol=0, atol=0)
    assert torch.signbit(log1p_via_log(torch.tensor(-0.0)))
    with pytest.raises(ValueError, match="float32/float64 CPU"):
        log1p_via_log(x.to(torch.bfloat16))


def test_the_log1p_pass_rewrites_cpu_float_log1p_and_keeps_the_callers_passes():
    """On a graph traced with fake values, as Inductor's post-grad passes see it: the float32 log1p node is
    replaced by log1p_via_log's nodes (same values), the float16 one is left alone; the engine's Inductor
    settings run the pass before a pass of the caller's own."""
    from torch.fx.experimental.proxy_tensor import make_fx

    from pvae.inference.compile_passes import Log1pViaLog, log1p_via_log
    from pvae.inference.step import _inductor_patches

    def program(x, h):
        return torch.log1p(x) * 2, torch.log1p(h)

    x, h = torch.rand(64) * 10 - 0.9, torch.rand(8, dtype=torch.float16)
    graph = make_fx(program, tracing_mode="fake")(x, h)
    Log1pViaLog()(graph.graph)
    graph.recompile()
    log1ps = [node for node in graph.graph.nodes if node.target is torch.ops.aten.log1p.default]
    assert [node.meta["val"].dtype for node in log1ps] == [torch.float16]
    rewritten, kept = graph(x, h)
    assert torch.equal(rewritten, log1p_via_log(x) * 2) and torch.equal(kept, torch.log1p(h))

    theirs = Log1pViaLog()
    passes = _inductor_patches({"options": {"post_grad_custom_pre_pass": theirs}})[
        "post_grad_custom_pre_pass"
    ]
    assert isinstance(passes[0], Log1pViaLog) and passes[-1] is theirs
    assert passes[0].uuid() == theirs.uuid()  # keyed on the pass's code, not the object


@pytest.mark.skipif(not compile_passes.onednn_available(), reason="this torch has no oneDNN linear kernel")
def test_onednn_gemms_give_the_default_products_to_fp32_rounding(monkeypatch):
    """The pass on a linear layer's forward and backward products (traced with fake values, as Inductor's
    post-grad passes see them): the large ones become pvae::onednn_linear and the graph's outputs —
    activations and all three gradients — equal the default path's to fp32 rounding; the small product
    stays. The rule is forced on, so the test runs on CPUs where it would pick MKL."""
    from torch.fx.experimental.proxy_tensor import make_fx

    monkeypatch.setattr(compile_passes, "onednn_wins", lambda rows, inner, outer: min(inner, outer) >= 128)

    def layer(x, weight, bias, grad, small):
        y = torch.ops.aten.addmm(bias, x, weight.t())
        grad_x, grad_weight = torch.ops.aten.mm(grad, weight), torch.ops.aten.mm(grad.t(), x)
        return y, grad_x, grad_weight, grad.sum(0), torch.ops.aten.mm(small, weight[:, :64].t())

    generator = torch.Generator().manual_seed(0)
    inputs = [
        torch.randn(*shape, generator=generator)
        for shape in [(128, 784), (400, 784), (400,), (128, 400), (64, 64)]
    ]
    graph = make_fx(layer, tracing_mode="fake")(*inputs)
    compile_passes.OneDnnGemms()(graph.graph)
    graph.recompile()
    targets = [node.target for node in graph.graph.nodes if node.op == "call_function"]
    assert targets.count(torch.ops.pvae.onednn_linear.default) == 3
    assert targets.count(torch.ops.aten.mm.default) == 1  # the 64 × 64 · 64 × 400 product is left to MKL
    for rewritten, default in zip(graph(*inputs), layer(*inputs)):
        torch.testing.assert_close(rewritten, default, rtol=1e-5, atol=1e-4)


def test_compiled_vae_step_with_onednn_gemms_matches_eager(monkeypatch):
    """End to end, the rule forced on (a fresh compile, not a cached one): a VAE whose layers are large
    enough for oneDNN follows the eager step from the same seed to float32 rounding; ``gemm="default"``
    leaves the pass out."""
    from pvae.inference.step import _inductor_patches

    if not compile_passes.onednn_available():
        pytest.skip("this torch has no oneDNN linear kernel")
    monkeypatch.setattr(compile_passes, "onednn_wins", lambda rows, inner, outer: min(inner, outer) >= 128)
    calls = []
    linear = compile_passes._onednn_linear
    monkeypatch.setattr(compile_passes, "_onednn_linear", lambda *args: calls.append(1) or linear(*args))
    make = functools.partial(VAE, x_dim=256, z_dim=3, hidden_dim=128)
    generator = torch.Generator().manual_seed(0)
    batches = [torch.bernoulli(torch.full((16, 256), 0.3), generator=generator) for _ in range(4)]
    eager_family, _, eager_losses = _run(make, Trace_ELBO, "eager", batches)
    options = {"options": {"fx_graph_cache": False}}  # compiled afresh under the forced rule
    family, compiled, losses = _run(make, Trace_ELBO, "compile", batches, compile_options=options)
    assert compiled.compile_failure is None and compiled.counts["graph"] == 3
    assert len(calls) >= 3 * 3  # the compiled step ran oneDNN's products on every replay
    torch.testing.assert_close(losses, eager_losses, rtol=1e-5, atol=1e-3)
    for a, b in zip(eager_family.parameters(), family.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    passes = _inductor_patches({"gemm": "default"})["post_grad_custom_pre_pass"]
    assert not any(isinstance(p, compile_passes.OneDnnGemms) for p in passes)
    assert any(
        isinstance(p, compile_passes.OneDnnGemms) for p in _inductor_patches({})["post_grad_custom_pre_pass"]
    )
    with pytest.raises(ValueError, match="gemm must be one of"):
        _inductor_patches({"gemm": "mkl"})


def test_compile_options_are_checked_when_the_step_is_made():
    family = FAMILIES["vae"]()
    for options, message in [
        ({"backend": "eager"}, "compile_options takes"),
        ({"mode": "fastest"}, "Unrecognized mode"),
        ({"dynamic": True}, "fixed shapes"),
        ({"options": {"no_such_setting": 1}}, "not settings of torch._inductor.config"),
    ]:
        with pytest.raises(ValueError, match=message):
            SVIStep(family.model, family.guide, Trace_ELBO(), engine="compile", compile_options=options)


def test_a_graph_inductor_cannot_compile_is_replayed_uncompiled(monkeypatch):
    """Compiling fails on the first replay: the step warns, says why, and replays the traced graph, so the
    run goes on with the trace engine's results (equal to eager bit for bit)."""
    import torch._inductor

    def refuse(*args, **kwargs):
        raise RuntimeError("no compiler here")

    monkeypatch.setattr(torch._inductor, "compile", refuse)
    batches = _batches(4)
    _, traced, traced_losses = _run(FAMILIES["vae"], Trace_ELBO, "trace", batches)
    with pytest.warns(UserWarning, match="compiling failed .*no compiler here"):
        _, compiled, compiled_losses = _run(FAMILIES["vae"], Trace_ELBO, "compile", batches)
    assert compiled.compile_failure == "RuntimeError: no compiler here"
    assert compiled.counts == traced.counts == {"eager": 1, "graph": 3, "guard_failures": 0}
    assert torch.equal(compiled_losses, traced_losses)


def test_parameters_shared_with_another_family_are_refused():
    first = VAE(x_dim=20, z_dim=3, hidden_dim=16, name="twin")
    SVIStep(first.model, first.guide, Trace_ELBO(), module=first)(_batches(1)[0])
    second = VAE(x_dim=20, z_dim=3, hidden_dim=16, name="twin")  # same param-store prefix
    step = SVIStep(second.model, second.guide, Trace_ELBO(), module=second)
    with pytest.raises(ValueError, match="same name"):
        step(_batches(1)[0])


def test_optimizer_state_round_trip_with_renamed_parameters():
    batches = _batches(3)
    family = VAE(x_dim=20, z_dim=3, hidden_dim=16, name="before")
    step = SVIStep(family.model, family.guide, Trace_ELBO(), module=family)
    step(batches[0])
    state = step.state_dict()
    assert state["param_names"][0].startswith("before$$$")
    other = VAE(x_dim=20, z_dim=3, hidden_dim=16, name="after")
    other.load_state_dict(family.state_dict())
    resumed = SVIStep(other.model, other.guide, Trace_ELBO(), module=other)
    resumed.load_state_dict(state, rename=lambda name: name.replace("before", "after", 1))
    pyro.set_rng_seed(4)
    step(batches[1])
    pyro.set_rng_seed(4)
    resumed(batches[1])
    for a, b in zip(family.parameters(), other.parameters()):
        assert torch.equal(a, b)


def test_bad_arguments_raise():
    family = FAMILIES["vae"]()
    with pytest.raises(ValueError, match="engine"):
        SVIStep(family.model, family.guide, Trace_ELBO(), engine="fast")
    with pytest.raises(ValueError, match="lr"):
        SVIStep(family.model, family.guide, Trace_ELBO(), lr=0.0)

    def no_params(x):
        with pyro.plate("data", x.shape[0]):
            pyro.sample("x", dist.Normal(0.0, 1.0), obs=x)

    with pytest.raises(ValueError, match="no parameters"):
        SVIStep(no_params, lambda x: None, Trace_ELBO())(torch.zeros(3))
