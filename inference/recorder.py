"""Record one step of a Pyro program as a graph of aten operations, with guards and published values.

The trace and compile engines of :class:`pvae.inference.step.SVIStep` run a step once under
:func:`record` and replay the recorded graph afterwards. This module is the whole of what they need from
torch's tracing machinery:

:func:`record`
    ``record(fn, *inputs)`` runs ``fn(*inputs)`` once (the random streams left as they were) and returns a
    :class:`Recording`: an FX graph whose outputs are ``fn``'s outputs, a flag that every *guard* holds, and
    the values *published* while it ran. Tensors among ``inputs`` are inputs of the graph; every other
    tensor ``fn`` reads is a constant of it.

guards
    A Python value read from a tensor while recording (``bool(t)``, ``t.item()``: validation checks, NaN
    warnings, data-dependent branches) cannot be replayed; each one becomes a guard, a 0-dim output that
    says whether the tensor still has the value seen while recording. A replay whose guards fail must be
    recomputed eagerly (so validation errors are raised as usual).

:func:`publish`
    ``publish(callback, *tensors)`` hands tensors a program computes on the side (e.g. the terms an
    importance sampler keeps a history of) to ``callback``. Run eagerly, it calls ``callback`` at once;
    while recording, the tensors become extra outputs of the graph and ``callback`` is called with their
    replayed values by :meth:`Recording.deliver` after each replay (and never during recording itself).

Pyro's ELBOs report their loss through ``pyro.infer.util.torch_item`` (``x.item()``), which would freeze the
first batch's value into the graph. Pyro offers no hook for it, so while recording (only then) the
``torch_item`` that ``pyro.*`` modules imported is replaced by ``x.detach()``: the same value, as a tensor.

Tracing uses torch APIs that are not public (``make_fx``, a dispatch mode that sees
``aten._local_scalar_dense``): :func:`check_support` says in one line what is missing on a torch that lacks
them, and the engines then run eagerly.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

__all__ = ["Recording", "check_support", "leaves", "publish", "record"]

# the torch releases whose make_fx/TorchDispatchMode behaviour this module was tested with (major, minor)
TESTED_TORCH = ((2, 2), (2, 14))


def torch_version() -> tuple[int, int]:
    """(major, minor) of the running torch."""
    major, minor = torch.__version__.split(".")[:2]
    return int(major), int("".join(ch for ch in minor if ch.isdigit()) or 0)


def check_support() -> None:
    """Raise ``RuntimeError`` (one line) when this torch lacks what :func:`record` uses, or is older than the
    releases it was tested with. (A newer torch is tried: the recorded step is checked by its guards and,
    in the tests, against the eager step.)"""
    if torch_version() < TESTED_TORCH[0]:
        oldest = ".".join(map(str, TESTED_TORCH[0]))
        raise RuntimeError(f"recording a step needs torch ≥ {oldest}, this is {torch.__version__}")
    try:
        from torch.fx.experimental.proxy_tensor import disable_proxy_modes_tracing, make_fx  # noqa: F401
        from torch.utils._python_dispatch import TorchDispatchMode  # noqa: F401
    except ImportError as error:
        raise RuntimeError(
            f"recording a step needs torch's make_fx and TorchDispatchMode, missing in torch "
            f"{torch.__version__} ({error})"
        ) from None
    if not hasattr(torch.ops.aten, "_local_scalar_dense"):
        raise RuntimeError(f"torch {torch.__version__} has no aten._local_scalar_dense to guard on")


# ---- published values ------------------------------------------------------------------------------------
_active: list[list] = []  # the publications of the recording in progress (a stack)


def publish(callback: Callable[..., None], *tensors: torch.Tensor) -> None:
    """Hand ``tensors`` to ``callback``: now when run eagerly, after each replay when recorded (see the
    module docstring). The tensors should be detached (they are side values, not part of the loss)."""
    if _active:
        _active[-1].append((callback, [t.detach() for t in tensors]))
    else:
        callback(*tensors)


# ---- guards ----------------------------------------------------------------------------------------------
class _GuardMode:
    """Records every tensor → Python scalar conversion made while ``make_fx`` traces (a dispatch mode)."""

    def __init__(self):
        from torch.fx.experimental.proxy_tensor import disable_proxy_modes_tracing
        from torch.utils._python_dispatch import TorchDispatchMode

        guards: list[tuple[torch.Tensor, object]] = []
        self.guards = guards

        class _Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                if func is torch.ops.aten._local_scalar_dense.default:
                    with disable_proxy_modes_tracing():
                        value = func(*args, **(kwargs or {}))
                    guards.append((args[0], value))
                    return value
                return func(*args, **(kwargs or {}))

        self.mode = _Mode()

    def all_hold(self) -> torch.Tensor:
        """A 0-dim bool tensor (traced): every recorded tensor still has the value seen while tracing."""
        if not self.guards:
            return torch.ones((), dtype=torch.bool)
        checks = [tensor.reshape(()) == value for tensor, value in self.guards]
        return torch.stack(checks).all()


@contextlib.contextmanager
def _loss_values_as_tensors():
    """While recording, Pyro's ``torch_item`` (``x.item()``) returns ``x.detach()`` instead of a float."""

    def as_tensor(value):
        return value.detach() if isinstance(value, torch.Tensor) else value

    patched = []
    for name, module in list(sys.modules.items()):
        if name.startswith("pyro.") and getattr(module, "torch_item", None) is not None:
            original = module.torch_item
            if getattr(original, "__module__", "") == "pyro.infer.util":
                patched.append((module, original))
                module.torch_item = as_tensor
    try:
        yield
    finally:
        for module, original in patched:
            module.torch_item = original


# ---- recording -------------------------------------------------------------------------------------------
@dataclass
class Recording:
    """One recorded step. ``graph(*inputs)`` returns ``(outputs, guards_hold, published)``: ``fn``'s outputs,
    a 0-dim bool tensor, and the published tensors (a flat list, for :meth:`deliver`)."""

    graph: Callable
    publications: list[tuple[Callable, int]] = field(default_factory=list)  # (callback, number of tensors)

    def deliver(self, published: list[torch.Tensor]) -> None:
        """Call each published callback with its values from one replay, in the order of publication."""
        start = 0
        for callback, count in self.publications:
            callback(*published[start : start + count])
            start += count


def _is_all_true(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.all()


# aten ops recorded as others that compute the same values. ``_is_all_true`` (a bool tensor's "all", which
# torch.distributions' validation reads) has no Inductor lowering, so each would be an eager call out of the
# compiled code that also splits its fused kernels; ``all`` is an ordinary reduction Inductor fuses.
_DECOMPOSITIONS = {torch.ops.aten._is_all_true.default: _is_all_true}


def record(fn: Callable, *inputs, check: Callable | None = None, then: Callable | None = None) -> Recording:
    """Run ``fn(*inputs)`` once under ``make_fx`` and return its :class:`Recording`.

    :param check: ``outputs -> 0-dim bool tensor``, and-ed into the guards flag (e.g. "the loss is finite"),
        so that a replay needs one host sync for both.
    :param then: ``(outputs, ok) -> outputs``, recorded after the guards: work that must happen only when
        they hold (``ok``, a 0-dim bool tensor), e.g. an optimizer update applied with ``torch.where``.

    The random streams (CPU, and the CUDA device of the first CUDA tensor among the inputs) are restored
    afterwards, so recording does not shift a run's draws. ``fn`` must not mutate what it is given unless the
    caller restores it.
    """
    check_support()
    from torch.fx.experimental.proxy_tensor import make_fx

    recording = Recording(graph=None)
    cuda = [t.device for t in leaves(inputs) if t.device.type == "cuda"][:1]

    def traced(*args):
        guards, publications = _GuardMode(), []
        _active.append(publications)
        try:
            with guards.mode:
                outputs = fn(*args)
        finally:
            _active.pop()
        hold = guards.all_hold()
        if check is not None:
            hold = hold & check(outputs)
        if then is not None:
            outputs = then(outputs, hold)
        recording.publications = [(callback, len(tensors)) for callback, tensors in publications]
        return outputs, hold, [t for _, tensors in publications for t in tensors]

    with torch.random.fork_rng(devices=cuda), _loss_values_as_tensors():
        recording.graph = make_fx(traced, decomposition_table=_DECOMPOSITIONS)(*inputs)
    return recording


def leaves(value) -> list[torch.Tensor]:
    """The tensors among nested lists, tuples and dicts (dicts by sorted key), in order: e.g. a step's
    positional and keyword arguments, the data inputs of its graph."""
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, list | tuple):
        return [tensor for item in value for tensor in leaves(item)]
    if isinstance(value, dict):
        return [tensor for key in sorted(value) for tensor in leaves(value[key])]
    return []
