"""One SVI optimisation step — loss, gradients, Adam — for any model/guide pair, with a traced fast path.

:class:`SVIStep` runs Pyro's own ELBO (``elbo.differentiable_loss(model, guide, *args)``) and one
``torch.optim.Adam`` over every parameter the pair touches (``fused=True`` where torch has a fused kernel
for the device) instead of ``SVI.step``, whose per-parameter optimizer wrappers, ``.item()`` syncs and
param-store re-tracing cost more than the network itself on small batches. Three engines:

``"eager"``
    the ELBO runs through Pyro's poutine machinery on every step (any ELBO, including Pyro's
    ``JitTrace_ELBO``; ELBOs without ``differentiable_loss`` fall back to ``loss_and_grads``).

``"trace"``
    *trace once, replay*: after the first (eager) step, one step of the same computation —
    ``differentiable_loss`` and its gradients — is recorded into an FX graph of aten operations with
    ``make_fx``, parameters and data as inputs. Replaying it runs the same kernels on fresh random draws
    without any Python of Pyro's, so it is equal to the eager step (tested bit for bit on CPU).

``"compile"``
    the traced graph compiled whole by Inductor, torch's compiler (``torch._inductor.compile``, its entry
    point for FX graphs captured without TorchDynamo: the graph is already whole and static, so Dynamo,
    which ``torch.compile`` would put in front, has nothing to trace and its per-call frame handling and
    guard checks would only add cost): the element-wise work of Pyro's
    log-densities, validation checks and the backward pass becomes a few fused kernels around the matrix
    products. Compiling takes tens of seconds once per run (Inductor caches it on disk). Random numbers
    are drawn by torch's own samplers, as the eager step draws them (Inductor's ``fallback_random``; its
    own generator, a per-element Philox counter, is no faster on CPU and draws other numbers), so from
    the same seed the compiled step matches the eager one to float32 rounding; pass
    ``compile_options={"options": {"fallback_random": False}}`` for Inductor's generator. ``log1p`` on CPU
    is computed from ``log`` (:mod:`pvae.inference.compile_passes`: torch's is several times slower,
    and binary cross-entropy uses it for every pixel). The Adam update
    runs after the graph in torch's fused Adam kernel where the device has one (CPU, CUDA: it beats
    Inductor's code for the update, see ``benchmarks/vae_vs_torch.py``); elsewhere, or with
    ``adam_kwargs={"fused": False}``, plain Adam is recorded into the graph (applied only when the step's
    guards hold and its loss is finite), its learning rate an input of the graph, not a constant in it, so
    :meth:`SVIStep.set_lr` (a schedule) works with every engine. (Adam with ``amsgrad``, ``maximize`` or
    ``weight_decay`` always keeps the separate optimizer step.)

What recording assumes (as ``JitTrace_ELBO`` does): the program's structure is static — the same sample
sites, shapes and Python-level constants on every step — and all parameters exist after the first step.
The recording itself (:mod:`pvae.inference.recorder`) keeps validation alive: Python values read from
tensors (``bool(t)``, ``t.item()``) become *guards*, and a step whose guards fail — invalid data, a NaN
loss, a data-dependent branch — is recomputed eagerly, so validation errors are raised as usual; a program
whose guards keep failing runs eagerly from then on (with a warning). The family's buffers are inputs of
the graph (a program may read buffers that change between steps), and values a program hands out with
:func:`pvae.inference.recorder.publish` (e.g. the terms an importance sampler records) reach their
callbacks after every replay, before ``after_step``. Batches whose shapes differ from the recorded one (a
last, smaller batch) run eagerly.

Under ``torch.distributed`` (several processes, :mod:`pvae.inference.distributed`) the first step
creates the pair's parameters without updating them and sets every rank's to rank 0's values; the eager
step then runs the loss through ``DistributedDataParallel`` around Pyro's ``ELBOModule`` of the pair (the
family registered in it, so DDP averages its gradients during the backward pass), and the gradients DDP
does not see — Pyro params outside the family, the recorded graphs' — are averaged with one collective.
The loss returned is the average of the ranks' losses, so every rank sees the same value and a
non-finite loss on one rank stops all of them. ``"compile"`` then keeps Adam outside the compiled graph,
since the average has to sit between the recorded gradients and the update.

(The recording lives in :mod:`pvae.inference.recorder`; this module is the step around it: one
parameter capture, one optimizer and its saved state, for all three engines.)
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Callable

import pyro
import pyro.poutine as poutine
import torch
from torch import nn
from torch.optim.adam import adam as functional_adam

from pvae.checkpoint import CheckpointError
from pvae.inference import compile_passes, distributed, recorder

__all__ = ["ENGINES", "SVIStep"]

ENGINES = ("eager", "trace", "compile")


def _signature(args, kwargs) -> tuple:
    """Shapes, dtypes and devices of the tensors among the arguments, plus the non-tensor values."""

    def describe(value):
        if isinstance(value, torch.Tensor):
            shape = tuple(value.shape)
            return ("tensor", shape, value.stride(), value.dtype, value.device, value.requires_grad)
        if isinstance(value, list | tuple):
            return (type(value).__name__, tuple(describe(item) for item in value))
        if isinstance(value, dict):
            return ("dict", tuple((key, describe(value[key])) for key in sorted(value)))
        try:
            hash(value)
        except TypeError:
            return ("id", id(value))
        return ("value", value)

    return describe(args), describe(kwargs)


def _check_lr(lr) -> float:
    if not (isinstance(lr, int | float) and not isinstance(lr, bool) and 0 < lr < float("inf")):
        raise ValueError(f"lr must be a finite number > 0, got {lr!r}")
    return float(lr)


def _lr_dtype(param: torch.Tensor) -> torch.dtype:
    """float64 for the learning-rate input (as exact as the Python float eager Adam uses), except on MPS."""
    return torch.float32 if param.device.type == "mps" else torch.float64


def _fused_supported(params: list[torch.Tensor]) -> bool:
    return bool(params) and all(
        p.is_floating_point() and p.device.type in ("cpu", "cuda") and not p.is_sparse for p in params
    )


COMPILE_OPTIONS = ("mode", "options", "fullgraph", "dynamic", "gemm")


#: Inductor settings the compile engine starts from (``compile_options["options"]`` overrides them):
#: random numbers drawn by torch's samplers, as in the eager step (see the module docstring).
INDUCTOR_DEFAULTS = {"fallback_random": True}


def _inductor_patches(compile_options: dict) -> dict:
    """The Inductor configuration that ``torch.compile(**compile_options)`` would give a whole static
    graph, over :data:`INDUCTOR_DEFAULTS`: the ``mode``'s settings, then ``options``, and the passes of
    :mod:`pvae.inference.compile_passes` (``gemm`` chooses among the matrix-product routes). ``fullgraph``
    is moot (the graph is whole) and ``dynamic`` may not be true (a recorded step has fixed shapes)."""
    unknown = sorted(set(compile_options) - set(COMPILE_OPTIONS))
    if unknown:
        raise ValueError(f"compile_options takes {COMPILE_OPTIONS}, got {unknown}")
    if compile_options.get("dynamic"):
        raise ValueError("compile_options: dynamic=True is not supported, a recorded step has fixed shapes")
    import torch._inductor

    mode = compile_options.get("mode") or "default"
    try:
        patches = dict(torch._inductor.list_mode_options(mode))
    except RuntimeError as error:
        raise ValueError(f"compile_options: {error}") from None
    options = compile_options.get("options") or {}
    if not isinstance(options, dict):
        raise ValueError(f"compile_options: options must be a dict, got {type(options).__name__}")
    unknown = sorted(set(options) - set(torch._inductor.list_options()))
    if unknown:
        raise ValueError(f"compile_options: {unknown} are not settings of torch._inductor.config")
    return compile_passes.with_passes(
        INDUCTOR_DEFAULTS | patches | options, compile_options.get("gemm", "auto")
    )


def _fake_inputs(inputs) -> list:
    """``inputs`` as fake tensors (shapes, strides, dtypes, devices: no data) of a fake mode with a shape
    environment, as Dynamo hands graphs to Inductor. Inductor's on-disk caches of compiled graphs skip
    graphs compiled without one ("no shape env"), which would compile every run afresh. The real inputs
    where this torch lacks the (private) classes: compiling works the same, only uncached."""
    try:
        from torch._subclasses.fake_tensor import FakeTensorMode
        from torch.fx.experimental.symbolic_shapes import ShapeEnv
    except ImportError:
        return list(inputs)
    mode = FakeTensorMode(shape_env=ShapeEnv())

    def fake(value):  # the graph's inputs are tensors in (nested) lists
        if isinstance(value, torch.Tensor):
            return mode.from_tensor(value, static_shapes=True)
        return [fake(item) for item in value] if isinstance(value, list | tuple) else value

    return fake(list(inputs))


class _Compiled:
    """A recorded graph compiled by Inductor on its first call, on that call's inputs (a copy of the graph:
    Inductor rewrites the one it is given, and the original stays the fallback)."""

    def __init__(self, graph: torch.fx.GraphModule, patches: dict):
        self.graph, self.patches, self.function = graph, patches, None

    def __call__(self, *inputs):
        if self.function is None:
            import torch._inductor

            graph = torch.fx.GraphModule(self.graph, copy.deepcopy(self.graph.graph))
            self.function = torch._inductor.compile(graph, _fake_inputs(inputs), options=self.patches)
        return self.function(*inputs)


class SVIStep:
    """Callable SVI step: ``loss = step(*args, **kwargs)`` computes the ELBO loss and updates parameters.

    Parameters are those of the param-store sites the pair touches on its first step (for a family, its
    ``pyro.module`` parameters), optimized by a single ``torch.optim.Adam``. The returned loss is a detached
    0-dim tensor on the parameters' device, −ELBO summed over the data plate as Pyro reports it (the loss of
    the given ``elbo``). A NaN/inf loss raises ``FloatingPointError`` *before* the optimizer step, so the
    parameters keep their last finite values.

    :param model: Pyro model.
    :param guide: Pyro guide.
    :param elbo: a Pyro ELBO instance (see :func:`pvae.inference.objectives.make_elbo`).
    :param lr: Adam learning rate, > 0 (change it between steps with :meth:`set_lr`).
    :param engine: ``"eager"``, ``"trace"`` or ``"compile"`` (see the module docstring).
    :param module: the ``nn.Module`` holding the pair's networks (a family): its parameters must be the
        tensors Pyro's param store holds under their names; checked on the first step.
    :param after_step: called with no arguments after every optimizer step (e.g. an EMA of weights).
    :param adam_kwargs: further ``torch.optim.Adam`` arguments (``betas``, ``eps``, ``weight_decay``,
        ``fused``).
    :param compile_options: with ``engine="compile"``, what ``torch.compile`` would take for Inductor
        (:data:`COMPILE_OPTIONS`): a ``mode``, e.g. ``"max-autotune-no-cudagraphs"`` (Inductor then times its
        own GEMM kernels against ATen's) or ``"reduce-overhead"`` (CUDA graphs on a GPU), ``options``, a
        dict of ``torch._inductor.config`` settings, and pvae's ``gemm``: ``"auto"`` (the default: large
        fp32 products on CPU through oneDNN where :func:`pvae.inference.compile_passes.onednn_wins` picks
        it) or ``"default"`` (torch's default BLAS for every product).
    """

    def __init__(
        self,
        model: Callable,
        guide: Callable,
        elbo,
        *,
        lr: float = 1e-3,
        engine: str = "eager",
        module: nn.Module | None = None,
        after_step: Callable[[], None] | None = None,
        adam_kwargs: dict | None = None,
        compile_options: dict | None = None,
    ):
        if engine not in ENGINES:
            raise ValueError(f"engine must be one of {ENGINES}, got {engine!r}")
        lr = _check_lr(lr)
        self.model, self.guide, self.elbo = model, guide, elbo
        self.lr, self.engine, self.module, self.after_step = float(lr), engine, module, after_step
        self.adam_kwargs = dict(adam_kwargs or {})
        self.compile_options = dict(compile_options or {})
        self._inductor_patches = _inductor_patches(self.compile_options) if engine == "compile" else {}
        self.param_names: list[str] | None = None
        self.params: list[torch.Tensor] | None = None
        self.optimizer: torch.optim.Adam | None = None
        self._pending_optimizer_state: dict | None = None
        self._graph = None
        self._traced = None
        self._recording: recorder.Recording | None = None
        self._buffers: list[torch.Tensor] = []
        self._update_in_graph = False
        self._graph_signature = None
        self._lr_input: torch.Tensor | None = None  # the learning rate as an input of the compiled update
        self._guard_failures = 0
        self.num_steps = 0  # optimizer steps applied so far (saved by state_dict, for schedules)
        self.disabled_reason: str | None = None
        # why the compile engine replays its traced graph uncompiled (compiling failed), else None
        self.compile_failure: str | None = None
        self.counts = {"eager": 0, "graph": 0, "guard_failures": 0}
        self.world_size = distributed.world_size()  # processes sharing each step (1: none)
        self._ddp: nn.Module | None = None
        self._ddp_params: set[int] = set()

    # ---- parameters and optimizer ------------------------------------------------------------------------
    def _capture(self, param_trace: poutine.Trace) -> None:
        store = pyro.get_param_store()
        names = [name for name, site in param_trace.nodes.items() if site["type"] == "param"]
        if not names:
            raise ValueError("the model/guide pair has no parameters to optimize (no pyro.param/pyro.module)")
        params = [store[name].unconstrained() for name in names]
        if self.module is not None:
            captured = {id(p) for p in params}
            stale = [
                name
                for name, p in self.module.named_parameters()
                if p.requires_grad and id(p) not in captured
            ]
            if stale:
                raise ValueError(
                    f"parameters {stale[:3]} of {type(self.module).__name__} are not the tensors Pyro's "
                    "param store holds for this pair, so training would not change them. Two families with "
                    "the same name in one process? Give each a unique name (or clear the param store)."
                )
        self.param_names, self.params = names, params
        kwargs = dict(self.adam_kwargs)
        if "fused" not in kwargs and _fused_supported(params):
            kwargs["fused"] = True
        self.optimizer = torch.optim.Adam(params, lr=self.lr, **kwargs)
        if self._pending_optimizer_state is not None:
            self._load_optimizer_state(self._pending_optimizer_state)
            self._pending_optimizer_state = None

    def set_lr(self, lr: float) -> None:
        """Use learning rate ``lr`` (> 0) from the next step on, whichever the engine (a schedule's hook).

        The compiled engine's recorded Adam update reads the learning rate as an input tensor, not as a
        constant of the graph, so changing it needs no recompilation.
        """
        self.lr = _check_lr(lr)
        if self.optimizer is not None:
            for group in self.optimizer.param_groups:
                group["lr"] = self.lr

    def state_dict(self) -> dict:
        """Optimizer state (a copy) keyed by parameter order, with the param-store names of that order, and
        the number of steps applied (``"num_steps"``)."""
        if self.optimizer is None:
            state = copy.deepcopy(self._pending_optimizer_state or {})
            if state:
                state["num_steps"] = self.num_steps
            return state
        return {
            "param_names": list(self.param_names),
            "optimizer": copy.deepcopy(self.optimizer.state_dict()),
            "num_steps": self.num_steps,
        }

    def load_state_dict(
        self, state: dict, rename: Callable[[str], str] | None = None, source: str | None = None
    ) -> None:
        """Restore optimizer state (applied on the first step, once the parameters are known) and the step
        count (at once). The learning rate and other hyperparameters stay this step's own.

        :param state: from :meth:`state_dict`, or the ``optimizer`` section of a checkpoint that
            :func:`pvae.checkpoint.load_checkpoint` validated.
        :param rename: maps saved param-store names to current ones (a family rebuilt under a new name).
        :param source: where the state came from (a checkpoint's path): errors then are
            :class:`~pvae.checkpoint.CheckpointError` naming it.
        """
        if not state:
            return
        state = dict(state)
        self.num_steps = int(state.pop("num_steps", 0))
        if "param_names" not in state:
            return
        if rename is not None:
            state["param_names"] = [rename(name) for name in state["param_names"]]
        state["source"] = source
        if self.optimizer is None:
            self._pending_optimizer_state = state
        else:
            self._load_optimizer_state(state)

    def _load_optimizer_state(self, state: dict) -> None:
        """Check the saved per-parameter Adam state against this pair's parameters, then load it.

        The fused CPU Adam does not check state shapes (a wrong one corrupts memory), so every tensor is
        checked here first; only the per-parameter state is taken from ``state``, the hyperparameters
        (``param_groups``) are this optimizer's own.
        """
        source = state.get("source")

        def fail(field: str, problem: str):
            if source is None:
                raise ValueError(f"optimizer state: {field}: {problem}")
            raise CheckpointError(source, f"optimizer.{field}", problem)

        if list(state["param_names"]) != list(self.param_names):
            fail(
                "param_names",
                f"belongs to other parameters: saved {list(state['param_names'])[:3]}…, this pair has "
                f"{self.param_names[:3]}…",
            )
        per_param = state["state"] if "state" in state else state["optimizer"]["state"]
        checked = {}
        for index, entry in per_param.items():
            if isinstance(index, bool) or not isinstance(index, int) or not 0 <= index < len(self.params):
                fail("state", f"parameter index {index!r} is not in [0, {len(self.params)})")
            param = self.params[index]
            entry = dict(entry)
            for key in ("exp_avg", "exp_avg_sq", "max_exp_avg_sq"):
                if key in entry and (entry[key].shape != param.shape or entry[key].dtype != param.dtype):
                    fail(
                        f"state[{index}].{key}",
                        f"has {entry[key].dtype} {tuple(entry[key].shape)}, the parameter "
                        f"{self.param_names[index]!r} is {param.dtype} {tuple(param.shape)}",
                    )
            if "max_exp_avg_sq" in entry and not self.optimizer.param_groups[0].get("amsgrad"):
                del entry["max_exp_avg_sq"]
            checked[index] = entry
        own_groups = self.optimizer.state_dict()["param_groups"]
        self.optimizer.load_state_dict({"state": checked, "param_groups": own_groups})
        self.set_lr(self.lr)

    # ---- several processes -------------------------------------------------------------------------------
    def _start_distributed(self, args, kwargs) -> None:
        """Create the pair's parameters (one pass of the loss, no gradients, the random streams left as
        they were), give every rank rank 0's values, and wrap the pair for DDP."""
        devices = [p.device for p in (self.module.parameters() if self.module is not None else ())]
        cuda = [d for d in devices if d.type == "cuda"][:1]
        with torch.random.fork_rng(devices=cuda), poutine.trace(param_only=True) as capture, torch.no_grad():
            self.elbo.loss(self.model, self.guide, *args, **kwargs)
        self._capture(capture.trace)
        distributed.broadcast_tensors(self.params)
        if self.module is None or getattr(self.elbo, "differentiable_loss", None) is None:
            return  # every gradient goes through distributed.average_gradients
        from torch.nn.parallel import DistributedDataParallel

        # Pyro's ELBOModule: forward(*args) is the pair's differentiable loss. Registering the family in it
        # gives DDP the parameters to average.
        loss_module = self.elbo(self.model, self.guide)
        loss_module.family = self.module
        device = self.params[0].device
        self._ddp = DistributedDataParallel(
            loss_module,
            device_ids=[device.index] if device.type == "cuda" else None,
            broadcast_buffers=False,  # buffers change only by identical updates on every rank
        )
        self._ddp_params = {id(p) for p in self.module.parameters() if p.requires_grad}

    def _mean_over_ranks(self, loss: torch.Tensor) -> torch.Tensor:
        """The ranks' average loss (each rank's loss already stands for the whole global batch)."""
        total = distributed.all_reduce_sum([float(loss)], loss.device)[0]
        return (total / self.world_size).to(loss.dtype)

    # ---- one step ----------------------------------------------------------------------------------------
    def __call__(self, *args, **kwargs) -> torch.Tensor:
        if self.engine != "eager" and self.params is not None and self.disabled_reason is None:
            signature = _signature(args, kwargs)
            if self._graph is None and self._graph_signature is None:
                self._build_graph(args, kwargs, signature)
            if self._graph is not None and signature == self._graph_signature:
                loss = self._graph_step(args, kwargs)
                if loss is not None:
                    return loss
        return self._eager_step(args, kwargs)

    def _loss_and_backward(self, args, kwargs) -> torch.Tensor:
        try:
            return self._loss_and_backward_unchecked(args, kwargs)
        except ValueError as error:
            # torch's distribution checks say "Expected parameter …" when a distribution's *parameter* (a
            # network's output: a scale, logits) left its support, which happens when training diverges;
            # Pyro appends a dump of the trace's shapes. Report it as the divergence it is, in one line.
            first_line = str(error).split("\n", 1)[0]
            if not first_line.startswith("Expected parameter"):
                raise
            text = first_line if len(first_line) <= 200 else first_line[:197] + "…"
            diverged = FloatingPointError(f"a distribution's parameter became invalid ({text})")
            diverged.loss = "invalid"
            raise diverged from None

    def _loss_and_backward_unchecked(self, args, kwargs) -> torch.Tensor:
        if self._ddp is not None:  # DDP averages the family's gradients during backward()
            loss = self._ddp(*args, **kwargs)
            loss.backward()
            return loss.detach()
        differentiable_loss = getattr(self.elbo, "differentiable_loss", None)
        if differentiable_loss is not None:
            loss = differentiable_loss(self.model, self.guide, *args, **kwargs)
            if isinstance(loss, torch.Tensor) and loss.requires_grad:
                loss.backward()
            return loss.detach() if isinstance(loss, torch.Tensor) else torch.tensor(float(loss))
        return torch.tensor(float(self.elbo.loss_and_grads(self.model, self.guide, *args, **kwargs)))

    def _check_finite(self, loss: torch.Tensor) -> None:
        if not bool(torch.isfinite(loss)):
            self.optimizer.zero_grad(set_to_none=True)
            error = FloatingPointError(f"the loss is {float(loss)}; the parameters were not updated")
            error.loss = float(loss)
            raise error

    def _eager_step(self, args, kwargs) -> torch.Tensor:
        if self.params is None and self.world_size > 1:
            self._start_distributed(args, kwargs)
        if self.params is None:
            with poutine.trace(param_only=True) as capture:
                loss = self._loss_and_backward(args, kwargs)
            self._capture(capture.trace)
        else:
            loss = self._loss_and_backward(args, kwargs)
        if self.world_size > 1:
            distributed.average_gradients([p for p in self.params if id(p) not in self._ddp_params])
            loss = self._mean_over_ranks(loss)
        self._check_finite(loss)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.num_steps += 1
        if self.after_step is not None:
            self.after_step()
        self.counts["eager"] += 1
        return loss.to(self.params[0].device)

    def _call_graph(self, data: list[torch.Tensor]):
        if self._update_in_graph:
            self._lr_input.fill_(self.optimizer.param_groups[0]["lr"])
            return self._graph(self.params, self._buffers, self._adam_state(), self._lr_input, data)
        return self._graph(self.params, self._buffers, data)

    def _run_graph(self, data: list[torch.Tensor]):
        if self._traced is None:
            return self._call_graph(data)
        try:  # first call of the compiled graph: compile now, or fall back to the traced graph
            outputs = self._call_graph(data)
        except Exception as error:
            self.compile_failure = f"{type(error).__name__}: {error}"
            warnings.warn(
                f"SVIStep: compiling failed ({self.compile_failure}); replaying the traced graph uncompiled",
                stacklevel=4,
            )
            self._graph = self._traced
            outputs = self._call_graph(data)
        self._traced = None
        return outputs

    def _graph_step(self, args, kwargs) -> torch.Tensor | None:
        with torch.no_grad():  # the graph holds its own backward pass: no autograd recording on replay
            outputs, guards_hold, published = self._run_graph(recorder.leaves((args, kwargs)))
        loss, grads = (outputs, None) if self._update_in_graph else outputs
        if self.world_size > 1:  # one decision for all ranks: replay everywhere, or recompute everywhere
            totals = distributed.all_reduce_sum([float(loss), float(bool(guards_hold))], loss.device)
            guards_hold = bool(totals[1] == self.world_size)
            loss = (totals[0] / self.world_size).to(loss.dtype)
        if not bool(guards_hold):
            self.counts["guard_failures"] += 1
            self._guard_failures += 1
            if self._guard_failures >= 3:
                self.disabled_reason = (
                    "its guards failed on 3 steps in a row: the program reads tensor values in Python "
                    "(bool(t), t.item()) that change from step to step"
                )
                warnings.warn(
                    f"SVIStep: leaving the {self.engine} engine, {self.disabled_reason}", stacklevel=3
                )
            return None  # recompute this step eagerly (raising any validation error or non-finite loss)
        self._guard_failures = 0
        if grads is not None and self._functional_adam_applies():
            self._functional_adam(grads)
        elif grads is not None:  # else the graph has updated parameters and Adam's state in place
            for param, grad in zip(self.params, grads):
                param.grad = grad
            distributed.average_gradients(self.params)
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
        self._recording.deliver(published)
        self.num_steps += 1
        if self.after_step is not None:
            self.after_step()
        self.counts["graph"] += 1
        return loss

    # ---- tracing -----------------------------------------------------------------------------------------
    def _adam_in_graph(self) -> bool:
        """Whether the compiled graph can carry the Adam update too (plain Adam, state initialized)."""
        if self.engine != "compile":
            return False
        if self.optimizer.param_groups[0].get("fused"):  # torch's fused kernel is the faster update
            return False
        if self.world_size > 1:  # the gradients are averaged over ranks between the graph and the update
            return False
        return self._plain_adam_ready()

    def _plain_adam_ready(self) -> bool:
        """One parameter group of plain Adam (no amsgrad, maximize, weight decay or differentiable), every
        parameter's state made (by the first, eager step): what both faster updates reproduce."""
        if len(self.optimizer.param_groups) != 1:
            return False
        group = self.optimizer.param_groups[0]
        plain = not (
            group["amsgrad"] or group["maximize"] or group["weight_decay"] or group["differentiable"]
        )
        return plain and all("exp_avg" in self.optimizer.state[p] for p in self.params)

    def _functional_adam_applies(self) -> bool:
        """Whether :meth:`_functional_adam` does what ``optimizer.step()`` would: one process, one plain
        parameter group on torch's fused kernel, every parameter's state made (by the first, eager step)."""
        if self.world_size > 1 or not self.optimizer.param_groups[0].get("fused"):
            return False
        return self._plain_adam_ready()

    def _functional_adam(self, grads: list[torch.Tensor]) -> None:
        """The update of ``optimizer.step()`` through torch's functional ``torch.optim.adam.adam``, on the
        optimizer's own state tensors: the same fused kernel, without the step method's per-call work
        (collecting parameters with gradients, hooks, profiler records), which costs a noticeable share of a
        small compiled step; no ``.grad`` is set, so there is nothing to zero either."""
        group = self.optimizer.param_groups[0]
        exp_avgs, exp_avg_sqs, steps = self._adam_state()
        beta1, beta2 = group["betas"]
        functional_adam(
            self.params,
            list(grads),
            exp_avgs,
            exp_avg_sqs,
            [],
            steps,
            fused=True,
            amsgrad=False,
            beta1=beta1,
            beta2=beta2,
            lr=group["lr"],
            weight_decay=0.0,
            eps=group["eps"],
            maximize=False,
        )

    def _adam_state(self) -> list[list[torch.Tensor]]:
        state = self.optimizer.state
        return [[state[p][key] for p in self.params] for key in ("exp_avg", "exp_avg_sq", "step")]

    def _adam_update(self, params, grads, state, lr, ok) -> None:
        """Adam (Kingma & Ba 2015, Algorithm 1, as ``torch.optim.Adam`` computes it), applied if ``ok``.

        m ← β₁m + (1−β₁)g, v ← β₂v + (1−β₂)g², p ← p − lr/(1−β₁ᵗ) · m / (√v/√(1−β₂ᵗ) + ε); ``lr`` is a
        0-dim tensor (a graph input, so a learning-rate schedule keeps the recorded graph valid).
        """
        group = self.optimizer.param_groups[0]
        (beta1, beta2), eps = group["betas"], group["eps"]
        with torch.no_grad():
            for param, grad, exp_avg, exp_avg_sq, step in zip(params, grads, *state):
                new_step = step + 1
                new_avg = torch.lerp(exp_avg, grad, 1 - beta1)
                new_avg_sq = exp_avg_sq * beta2 + (1 - beta2) * grad * grad
                correction1 = 1 - torch.pow(beta1, new_step)
                correction2_sqrt = (1 - torch.pow(beta2, new_step)).sqrt()
                new_param = param - (lr / correction1) * new_avg / (
                    new_avg_sq.sqrt() / correction2_sqrt + eps
                )
                param.copy_(torch.where(ok, new_param, param))
                exp_avg.copy_(torch.where(ok, new_avg, exp_avg))
                exp_avg_sq.copy_(torch.where(ok, new_avg_sq, exp_avg_sq))
                step.copy_(torch.where(ok, new_step, step))

    def _build_graph(self, args, kwargs, signature) -> None:
        self._graph_signature = signature
        params = self.params
        # the family's buffers are inputs of the graph, not constants frozen into it: a program may read
        # buffers that change between steps (e.g. an importance sampler's history, updated by after_step)
        self._buffers = [] if self.module is None else list(self.module.buffers())
        self._update_in_graph = self._adam_in_graph()

        def loss_and_grads(params, buffers, *rest):
            loss = self.elbo.differentiable_loss(self.model, self.guide, *args, **kwargs)
            grads = torch.autograd.grad(loss, params, allow_unused=True)
            grads = [torch.zeros_like(p) if g is None else g for p, g in zip(params, grads)]
            return loss.detach(), grads

        def finite(outputs):  # one flag, one host sync per step: every guard holds and the loss is finite
            return torch.isfinite(outputs[0])

        saved = None
        try:
            # Recording runs the step once: keep the parameters and optimizer state as they were (when the
            # update is recorded too), and Pyro's param store untouched by the recording pass.
            with pyro.poutine.block():
                if self._update_in_graph:
                    state = self._adam_state()
                    saved = [t.detach().clone() for t in (*params, *state[0], *state[1], *state[2])]
                    self._lr_input = torch.tensor(
                        self.optimizer.param_groups[0]["lr"],
                        dtype=_lr_dtype(params[0]),
                        device=params[0].device,
                    )

                    def update(outputs, ok):
                        self._adam_update(params, outputs[1], state, self._lr_input, ok)
                        return outputs[0]

                    inputs = (params, self._buffers, state, self._lr_input, recorder.leaves((args, kwargs)))
                    recording = recorder.record(loss_and_grads, *inputs, check=finite, then=update)
                else:
                    inputs = (params, self._buffers, recorder.leaves((args, kwargs)))
                    recording = recorder.record(loss_and_grads, *inputs, check=finite)
        except Exception as error:
            self.disabled_reason = f"tracing failed ({type(error).__name__}: {error})"
            warnings.warn(f"SVIStep: running eagerly, {self.disabled_reason}", stacklevel=3)
            return
        finally:
            if saved is not None:
                state = self._adam_state()
                with torch.no_grad():
                    for tensor, value in zip((*params, *state[0], *state[1], *state[2]), saved):
                        tensor.copy_(value)
        self._recording = recording
        graph = recording.graph
        if self.engine == "compile":
            self._traced = graph
            graph = _Compiled(graph, self._inductor_patches)
        self._graph = graph
