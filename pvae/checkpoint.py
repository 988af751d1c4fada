"""Checkpoints: everything needed to rebuild a trained family, or to resume its training exactly.

A checkpoint is **untrusted input** (people share trained models as files), so loading one runs no code
from it and uses nothing from it unchecked. It is one ``torch.save`` file holding only tensors, dicts,
lists, numbers, strings and None, read with ``torch.load(..., weights_only=True)`` (no pickled code), and
every field is validated before use (:func:`load_checkpoint`; a :class:`CheckpointError` names the file
and the field otherwise):

- ``family``: the family's **registered name** (``@pvae.register_family``; never an import path), its
  constructor arguments (checked against the family's declared config, then by its constructor, and sized
  on the ``meta`` device before anything is allocated: :func:`pvae.family.build_family`) and the prefix it
  had in Pyro's param store;
- ``state_dict``: the family's module state, loaded strictly (same keys, same shapes);
- ``param_store``: any other Pyro params under the family's prefix (``pyro.param`` sites that are not
  module parameters): unconstrained values, and their constraints named from a fixed table;
- ``optimizer``: Adam's per-parameter state and the param-store names it is keyed by, checked against the
  parameters (shape, dtype) before it reaches the optimizer; the hyperparameters are the running
  program's own, never the file's; ``rng``: Python, NumPy, torch (and CUDA) generator states;
  ``loader``: the training loader's generator state; ``epoch``, ``history`` and ``train_config`` (plain
  data: numbers, strings, short lists; nothing in it is used as a path).

Files are written atomically (a temporary file in the same folder, then ``os.replace``), so a run killed
while saving leaves the previous checkpoint intact. ``pvae`` core never imports a family's module by a
name from a file: a family must be registered by the running program (the built-in ones register when
``pvae.models`` is imported; a user's when their module is).

(This module is longer than most on purpose: it is the one place where pvae reads a file from a stranger,
so every field's check stands here together, where it can be audited in one read.)
"""

from __future__ import annotations

import math
import os
import random
from typing import Any

import numpy as np
import pyro
import torch
from pyro.distributions import constraints
from pyro.distributions.transforms import biject_to
from torch import nn

from pvae.family import build_family, check_config_kwargs, family_by_class_path, family_class
from pvae.utils import resolve_device, write_atomically

__all__ = [
    "CHECKPOINT_FORMAT",
    "CheckpointError",
    "build_from_checkpoint",
    "capture_rng_state",
    "load",
    "load_checkpoint",
    "param_renamer",
    "restore_family",
    "restore_rng_state",
    "save_checkpoint",
]

CHECKPOINT_FORMAT = "pvae-checkpoint"
CHECKPOINT_VERSION = 2  # 1: the family was recorded by class path; read for built-in families only
_MODULE_DIVIDER = "$$$"  # pyro.module's separator between module name and parameter name
_MAX_NAME = 256  # characters of a key, prefix or param name
_MAX_ENTRIES = 1_000_000  # entries of a list or dict read from a file
_MAX_EPOCH = 10**9
_HISTORY_LISTS = ("train_elbo", "test_elbo", "epoch_seconds", "eval_seconds", "step_losses")


class CheckpointError(ValueError):
    """A checkpoint that pvae will not use; the message names the file and the field.

    :param source: the file (or another description of where the checkpoint came from).
    :param field: the field, e.g. ``"state_dict"`` or ``"rng.numpy.keys"``.
    :param problem: what is wrong, in one line.
    """

    def __init__(self, source: str, field: str, problem: str):
        self.source, self.field = source, field
        problem = " ".join(str(problem).split())
        if len(problem) > 300:
            problem = problem[:297] + "…"
        super().__init__(f"checkpoint {source}: {field}: {problem}")


def _short(value) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "…"


# ---- constraints of free Pyro params: a fixed table, nothing looked up by a name from a file ------------
_NAMED_CONSTRAINTS = {
    "real": constraints.real,
    "positive": constraints.positive,
    "nonnegative": constraints.nonnegative,
    "unit_interval": constraints.unit_interval,
    "real_vector": constraints.real_vector,
    "simplex": constraints.simplex,
    "positive_definite": constraints.positive_definite,
    "lower_cholesky": constraints.lower_cholesky,
    "corr_cholesky": constraints.corr_cholesky,
    "ordered_vector": constraints.ordered_vector,
}
# kind → (constructor, argument names); the bounds are checked numbers
_BOUNDED_CONSTRAINTS = {
    "greater_than": (constraints.greater_than, ("lower_bound",)),
    "greater_than_eq": (constraints.greater_than_eq, ("lower_bound",)),
    "less_than": (constraints.less_than, ("upper_bound",)),
    "interval": (constraints.interval, ("lower_bound", "upper_bound")),
    "half_open_interval": (constraints.half_open_interval, ("lower_bound", "upper_bound")),
}


def _constraint_spec(constraint, name: str) -> dict:
    for kind, value in _NAMED_CONSTRAINTS.items():
        if value is constraint:
            return {"kind": kind}
    for kind, (factory, fields) in _BOUNDED_CONSTRAINTS.items():
        if type(constraint) is type(factory(*range(len(fields)))):
            return {"kind": kind, "args": [float(getattr(constraint, field)) for field in fields]}
    raise ValueError(f"cannot store the constraint {constraint!r} of Pyro param {name!r} in a checkpoint")


def _constraint_from_spec(spec, fail) -> constraints.Constraint:
    if not isinstance(spec, dict) or not isinstance(spec.get("kind"), str):
        fail(f"must be a dict with a 'kind', got {_short(spec)}")
    kind = spec["kind"]
    if kind in _NAMED_CONSTRAINTS:
        if set(spec) != {"kind"}:
            fail(f"constraint {kind!r} takes no arguments")
        return _NAMED_CONSTRAINTS[kind]
    if kind not in _BOUNDED_CONSTRAINTS:
        fail(
            f"unknown constraint {_short(kind)}; known: "
            + ", ".join([*_NAMED_CONSTRAINTS, *_BOUNDED_CONSTRAINTS])
        )
    factory, fields = _BOUNDED_CONSTRAINTS[kind]
    args = spec.get("args")
    if set(spec) != {"kind", "args"} or not isinstance(args, list | tuple) or len(args) != len(fields):
        fail(f"constraint {kind!r} needs args = [{', '.join(fields)}]")
    if not all(_is_finite_number(arg) for arg in args):
        fail(f"the bounds of {kind!r} must be finite numbers, got {_short(args)}")
    if len(args) == 2 and not args[0] < args[1]:
        fail(f"the bounds of {kind!r} must satisfy lower < upper, got {_short(args)}")
    return factory(*(float(arg) for arg in args))


def _belongs(param_name: str, prefix: str) -> bool:
    return param_name == prefix or param_name.startswith(
        (prefix + _MODULE_DIVIDER, prefix + ".", prefix + "_")
    )


def param_renamer(old_prefix: str | None, new_prefix: str):
    """Map param-store names under ``old_prefix`` (a saved family's name) to ``new_prefix``."""

    def rename(name: str) -> str:
        if old_prefix and _belongs(name, old_prefix):
            return new_prefix + name[len(old_prefix) :]
        return name

    return rename


def _free_params(family: nn.Module) -> dict:
    """Pyro params under the family's prefix that are not module parameters, relative names → data."""
    store = pyro.get_param_store()
    own = {id(p) for p in family.parameters()}
    prefix = getattr(family, "name", None)
    params, specs = {}, {}
    if prefix is None:
        return {"params": params, "constraints": specs}
    state = store.get_state()
    for name, unconstrained in state["params"].items():
        if not _belongs(name, prefix) or id(unconstrained) in own:
            continue
        relative = name[len(prefix) :]
        params[relative] = unconstrained.detach().clone()
        specs[relative] = _constraint_spec(state["constraints"][name], name)
    return {"params": params, "constraints": specs}


# ---- random number generators ----------------------------------------------------------------------------
def capture_rng_state() -> dict:
    """States of Python's, NumPy's, torch's (and every CUDA device's) global generators, as plain data."""
    version, internal, gauss_next = random.getstate()
    kind, keys, position, has_gauss, cached_gaussian = np.random.get_state()
    state = {
        "python": {
            "version": int(version),
            "internal": torch.tensor(internal, dtype=torch.int64),
            "gauss_next": gauss_next,
        },
        "numpy": {
            "kind": str(kind),
            "keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)),
            "position": int(position),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached_gaussian),
        },
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = [s.cpu() for s in torch.cuda.get_rng_state_all()]
    return state


def _python_state(python: dict) -> tuple:
    return (python["version"], tuple(int(v) for v in python["internal"].tolist()), python["gauss_next"])


def _numpy_state(numpy_state: dict) -> tuple:
    return (
        numpy_state["kind"],
        numpy_state["keys"].numpy().astype(np.uint32),
        numpy_state["position"],
        numpy_state["has_gauss"],
        numpy_state["cached_gaussian"],
    )


def restore_rng_state(state: dict) -> None:
    """Inverse of :func:`capture_rng_state` (give it a state that :func:`load_checkpoint` validated)."""
    random.setstate(_python_state(state["python"]))
    np.random.set_state(_numpy_state(state["numpy"]))
    torch.set_rng_state(state["torch"].cpu())
    if "cuda" in state and torch.cuda.is_available():
        cuda_states = state["cuda"]
        if len(cuda_states) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(cuda_states)


# ---- save ------------------------------------------------------------------------------------------------
def save_checkpoint(
    path: str | os.PathLike,
    family: nn.Module,
    *,
    epoch: int = 0,
    history: dict | None = None,
    optimizer: dict | None = None,
    rng: dict | None = None,
    loader: torch.Tensor | None = None,
    train_config: dict | None = None,
) -> str:
    """Write a checkpoint of ``family`` (and, for resuming, of its training) atomically to ``path``.

    :param path: destination file (its folder is created).
    :param family: a registered :class:`pvae.family.Family` (``@pvae.register_family``).
    :param epoch: number of completed epochs.
    :param history: ``History.to_dict()`` of the run so far.
    :param optimizer: ``SVIStep.state_dict()``.
    :param rng: :func:`capture_rng_state`.
    :param loader: the training loader's generator state (``loader.generator.get_state()``).
    :param train_config: plain-data settings of the run (objective, lr, …).
    :returns: the path written.
    """
    name = getattr(type(family), "family_name", None)
    if not hasattr(family, "constructor_kwargs") or name is None:
        raise ValueError(
            f"{type(family).__qualname__} is not a registered pvae family: derive it from pvae.Family, "
            "declare config_class and decorate the class with @pvae.register_family('name')"
        )
    if family_class(name) is not type(family):
        raise ValueError(
            f"the name {name!r} is registered for another class than {type(family).__qualname__}"
        )
    payload: dict[str, Any] = {
        "format": CHECKPOINT_FORMAT,
        "version": CHECKPOINT_VERSION,
        "family": {"name": name, "kwargs": family.constructor_kwargs(), "prefix": family.name},
        "state_dict": {key: value.detach().clone() for key, value in family.state_dict().items()},
        "param_store": _free_params(family),
        "optimizer": optimizer,
        "rng": rng,
        "loader": loader,
        "epoch": int(epoch),
        "history": history,
        "train_config": train_config or {},
    }
    return write_atomically(path, lambda handle: torch.save(payload, handle))


# ---- load: every field validated -------------------------------------------------------------------------
def _is_number(value) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _is_finite_number(value) -> bool:
    """A bool-free int or float that is finite as a float (a huge int is not: it overflows)."""
    if not _is_number(value):
        return False
    try:
        return math.isfinite(float(value))
    except OverflowError:
        return False


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_plain(value, depth: int = 0) -> bool:
    """None, a bool, number or (short) string, or a short list of those: a train_config value."""
    if value is None or isinstance(value, bool | int | float):
        return True
    if isinstance(value, str):
        return len(value) <= 4096
    if isinstance(value, list | tuple) and depth == 0:
        return len(value) <= 4096 and all(_is_plain(item, 1) for item in value)
    return False


def _is_dense(value) -> bool:
    return (
        isinstance(value, torch.Tensor)
        and value.layout == torch.strided
        and not value.is_quantized
        and not value.is_nested
        and value.device.type == "cpu"
    )


class _Validator:
    """Checks the fields of one payload; every failure is a :class:`CheckpointError` naming the field."""

    def __init__(self, source: str):
        self.source = source

    def fail(self, field: str, problem: str):
        raise CheckpointError(self.source, field, problem)

    def failer(self, field: str):
        return lambda problem: self.fail(field, problem)

    def dict_of(self, value, field: str, *, optional: bool = False) -> dict | None:
        if value is None and optional:
            return None
        if not isinstance(value, dict):
            self.fail(field, f"must be a dict, got {type(value).__name__}")
        if len(value) > _MAX_ENTRIES:
            self.fail(field, f"has {len(value)} entries, more than {_MAX_ENTRIES}")
        for key in value:
            if not isinstance(key, str) or len(key) > _MAX_NAME:
                self.fail(field, f"keys must be strings of at most {_MAX_NAME} characters, got {_short(key)}")
        return value

    def keys(self, value: dict, field: str, allowed, required=()) -> None:
        unknown = sorted(set(value) - set(allowed))
        if unknown:
            self.fail(field, f"unknown entries {_short(unknown)}; allowed: {', '.join(allowed)}")
        missing = [key for key in required if key not in value]
        if missing:
            self.fail(field, f"missing {', '.join(missing)}")

    def tensor(
        self, value, field: str, *, floating: bool | None = None, finite: bool = False
    ) -> torch.Tensor:
        if not _is_dense(value):
            self.fail(field, f"must be a dense CPU tensor, got {type(value).__name__}")
        if floating is True and not value.is_floating_point():
            self.fail(field, f"must be a floating tensor, got {value.dtype}")
        if finite and value.is_floating_point() and not torch.isfinite(value).all():
            self.fail(field, "has NaN/inf entries")
        return value

    def int_in(self, value, field: str, low: int, high: int) -> int:
        if not _is_int(value) or not low <= value <= high:
            self.fail(field, f"must be an integer in [{low}, {high}], got {_short(value)}")
        return value

    # ---- sections ----
    def family(self, value) -> dict:
        record = self.dict_of(value, "family")
        if "class" in record:  # format 1: a class path and the prefix as "name"; read for registered classes
            self.keys(record, "family", ("class", "kwargs", "name"), ("class", "kwargs"))
            path = record["class"]
            cls = family_by_class_path(path) if isinstance(path, str) else None
            if cls is None:
                self.fail("family.class", f"{_short(path)} is not a registered family")
            record = {"name": cls.family_name, "kwargs": record["kwargs"], "prefix": record.get("name")}
        self.keys(record, "family", ("name", "kwargs", "prefix"), ("name", "kwargs"))
        try:
            cls = family_class(record["name"])
        except ValueError as error:
            self.fail("family.name", str(error))
        kwargs = self.dict_of(record["kwargs"], "family.kwargs")
        try:
            kwargs = check_config_kwargs(cls, kwargs)
        except ValueError as error:
            self.fail("family.kwargs", str(error))
        prefix = record.get("prefix")
        if prefix is not None and (not isinstance(prefix, str) or not 0 < len(prefix) <= _MAX_NAME):
            self.fail("family.prefix", f"must be a non-empty string or None, got {_short(prefix)}")
        return {"name": record["name"], "kwargs": kwargs, "prefix": prefix}

    def state_dict(self, value) -> dict:
        state = self.dict_of(value, "state_dict")
        for key, tensor in state.items():
            self.tensor(tensor, f"state_dict[{key!r}]")
        return state

    def param_store(self, value) -> dict:
        section = self.dict_of(value if value is not None else {}, "param_store")
        self.keys(section, "param_store", ("params", "constraints"))
        params = self.dict_of(section.get("params", {}), "param_store.params")
        specs = self.dict_of(section.get("constraints", {}), "param_store.constraints")
        if set(params) != set(specs):
            self.fail("param_store", "params and constraints must name the same params")
        checked = {}
        for relative, tensor in params.items():
            field = f"param_store.params[{relative!r}]"
            if relative and not relative.startswith((".", "_")):
                # module parameters ("prefix$$$…") live in the state dict, never here
                self.fail(field, "a free param's name relative to the family's prefix starts with '.' or '_'")
            self.tensor(tensor, field, floating=True, finite=True)
            constraint = _constraint_from_spec(
                specs[relative], self.failer(f"param_store.constraints[{relative!r}]")
            )
            try:  # the constrained value must exist (e.g. a simplex needs a vector)
                constrained = biject_to(constraint)(tensor)
            except (RuntimeError, ValueError, IndexError, TypeError) as error:
                self.fail(field, f"does not fit its constraint {specs[relative]['kind']}: {error}")
            if not torch.isfinite(constrained).all():
                self.fail(field, f"maps to NaN/inf under its constraint {specs[relative]['kind']}")
            checked[relative] = (tensor, constraint)
        return checked

    def optimizer(self, value) -> dict | None:
        state = self.dict_of(value, "optimizer", optional=True)
        if not state:
            return None
        self.keys(state, "optimizer", ("param_names", "optimizer", "num_steps"))
        self.int_in(state.get("num_steps", 0), "optimizer.num_steps", 0, 10**15)
        if "param_names" not in state:
            return {"num_steps": state.get("num_steps", 0)}
        names = state["param_names"]
        if not isinstance(names, list | tuple) or not 0 < len(names) <= 100_000:
            self.fail("optimizer.param_names", "must be a non-empty list of param-store names")
        if not all(isinstance(name, str) and 0 < len(name) <= _MAX_NAME for name in names):
            self.fail("optimizer.param_names", f"must hold names of at most {_MAX_NAME} characters")
        inner = self.dict_of_any(state.get("optimizer"), "optimizer.optimizer")
        self.keys(inner, "optimizer.optimizer", ("state", "param_groups"), ("state",))
        per_param = self.dict_of_any(inner["state"], "optimizer.optimizer.state")
        checked = {}
        for index, entry in per_param.items():
            field = f"optimizer.optimizer.state[{_short(index)}]"
            if not _is_int(index) or not 0 <= index < len(names):
                self.fail(field, f"keys must be parameter indices in [0, {len(names)})")
            entry = self.dict_of(entry, field)
            self.keys(
                entry,
                field,
                ("step", "exp_avg", "exp_avg_sq", "max_exp_avg_sq"),
                ("step", "exp_avg", "exp_avg_sq"),
            )
            for key, tensor in entry.items():
                self.tensor(tensor, f"{field}.{key}", floating=True, finite=True)
            if entry["step"].numel() != 1 or not 0 <= float(entry["step"]) <= 1e15:
                self.fail(f"{field}.step", "must be one non-negative number")
            if (entry["exp_avg_sq"] < 0).any() or (
                "max_exp_avg_sq" in entry and (entry["max_exp_avg_sq"] < 0).any()
            ):
                self.fail(f"{field}.exp_avg_sq", "must be non-negative (a running mean of squares)")
            if entry["exp_avg"].shape != entry["exp_avg_sq"].shape:
                self.fail(field, "exp_avg and exp_avg_sq must have one shape")
            checked[index] = entry
        groups = inner.get("param_groups", [])
        if not isinstance(groups, list | tuple) or len(groups) > 1000:
            self.fail("optimizer.optimizer.param_groups", "must be a list of dicts")
        for index, group in enumerate(groups):
            group = self.dict_of(group, f"optimizer.optimizer.param_groups[{index}]")
            if not all(_is_plain(item) for item in group.values()):
                self.fail(f"optimizer.optimizer.param_groups[{index}]", "must hold plain values")
        return {
            "param_names": list(names),
            "state": checked,
            "param_groups": list(groups),  # a record only: the running optimizer keeps its own
            "num_steps": state.get("num_steps", 0),
        }

    def dict_of_any(self, value, field: str) -> dict:
        """A dict whose keys may be ints (the optimizer's state is keyed by parameter index)."""
        if not isinstance(value, dict):
            self.fail(field, f"must be a dict, got {type(value).__name__}")
        if len(value) > _MAX_ENTRIES:
            self.fail(field, f"has more than {_MAX_ENTRIES} entries")
        return value

    def rng(self, value) -> dict | None:
        state = self.dict_of(value, "rng", optional=True)
        if state is None:
            return None
        self.keys(state, "rng", ("python", "numpy", "torch", "cuda"), ("python", "numpy", "torch"))
        python = self.dict_of(state["python"], "rng.python")
        self.keys(
            python, "rng.python", ("version", "internal", "gauss_next"), ("version", "internal", "gauss_next")
        )
        internal = self.tensor(python["internal"], "rng.python.internal")
        if internal.dtype != torch.int64 or internal.shape != (625,):
            self.fail(
                "rng.python.internal",
                f"must be 625 int64 words, got {internal.dtype} {tuple(internal.shape)}",
            )
        if python["gauss_next"] is not None and not _is_finite_number(python["gauss_next"]):
            self.fail("rng.python.gauss_next", "must be None or a finite number")
        if not ((internal[:624] >= 0) & (internal[:624] < 2**32)).all():
            self.fail("rng.python.internal", "words must lie in [0, 2**32)")
        try:
            random.Random().setstate(_python_state(python))  # a throwaway generator checks the rest
        except (ValueError, TypeError, OverflowError) as error:
            self.fail("rng.python", f"not a state of Python's generator: {error}")
        numpy_state = self.dict_of(state["numpy"], "rng.numpy")
        fields = ("kind", "keys", "position", "has_gauss", "cached_gaussian")
        self.keys(numpy_state, "rng.numpy", fields, fields)
        if numpy_state["kind"] != "MT19937":
            self.fail("rng.numpy.kind", f"must be 'MT19937', got {_short(numpy_state['kind'])}")
        keys = self.tensor(numpy_state["keys"], "rng.numpy.keys")
        if keys.dtype != torch.int64 or keys.shape != (624,) or not ((keys >= 0) & (keys < 2**32)).all():
            self.fail("rng.numpy.keys", "must be 624 int64 words in [0, 2**32)")
        self.int_in(numpy_state["position"], "rng.numpy.position", 0, 624)
        self.int_in(numpy_state["has_gauss"], "rng.numpy.has_gauss", 0, 1)
        if not _is_finite_number(numpy_state["cached_gaussian"]):
            self.fail("rng.numpy.cached_gaussian", "must be a finite number")
        try:
            np.random.RandomState().set_state(_numpy_state(numpy_state))
        except (ValueError, TypeError) as error:
            self.fail("rng.numpy", f"not a state of NumPy's generator: {error}")
        self.generator_state(state["torch"], "rng.torch")
        if "cuda" in state:
            cuda = state["cuda"]
            if not isinstance(cuda, list | tuple) or len(cuda) > 1024:
                self.fail("rng.cuda", "must be a list of generator states")
            for index, entry in enumerate(cuda):
                entry = self.tensor(entry, f"rng.cuda[{index}]")
                if entry.dtype != torch.uint8 or entry.dim() != 1 or entry.numel() > 1 << 16:
                    self.fail(f"rng.cuda[{index}]", "must be a byte tensor (a CUDA generator's state)")
        return state

    def generator_state(self, value, field: str) -> torch.Tensor:
        tensor = self.tensor(value, field)
        reference = torch.Generator().get_state()
        if tensor.dtype != torch.uint8 or tensor.shape != reference.shape:
            self.fail(
                field,
                f"must be a torch generator state (uint8 {tuple(reference.shape)}), got {tensor.dtype} "
                f"{tuple(tensor.shape)}",
            )
        try:
            torch.Generator().set_state(tensor)
        except RuntimeError as error:
            self.fail(field, f"not a torch generator state: {error}")
        return tensor

    def history(self, value, epoch: int) -> dict | None:
        history = self.dict_of(value, "history", optional=True)
        if history is None:
            return None
        self.keys(history, "history", ("objective", "changes", *_HISTORY_LISTS))
        objective = history.get("objective", "elbo")
        if not isinstance(objective, str) or not 0 < len(objective) <= 64:
            self.fail("history.objective", f"must be a short string, got {_short(objective)}")
        for key in _HISTORY_LISTS:
            values = history.get(key, [])
            if not isinstance(values, list | tuple) or len(values) > 10**8:
                self.fail(f"history.{key}", "must be a list of numbers")
            if not all(_is_finite_number(v) for v in values):
                self.fail(f"history.{key}", "must hold finite numbers only")
        for key in ("train_elbo", "epoch_seconds"):
            if len(history.get(key, [])) != epoch:
                self.fail(f"history.{key}", f"must have one entry per completed epoch ({epoch})")
        for key in ("test_elbo", "eval_seconds"):
            if len(history.get(key, [])) not in (0, epoch):
                self.fail(f"history.{key}", f"must be empty or have one entry per completed epoch ({epoch})")
        changes = history.get("changes", [])
        if not isinstance(changes, list | tuple) or len(changes) > 10_000:
            self.fail("history.changes", "must be a list of records")
        for index, change in enumerate(changes):
            change = self.dict_of(change, f"history.changes[{index}]")
            if not all(_is_plain(item) for item in change.values()):
                self.fail(f"history.changes[{index}]", "must hold plain values")
        normalized = {key: list(history.get(key, [])) for key in _HISTORY_LISTS}  # tuples become lists
        return {"objective": objective, **normalized, "changes": [dict(change) for change in changes]}

    def train_config(self, value) -> dict:
        config = self.dict_of(value if value is not None else {}, "train_config")
        for key, item in config.items():
            if not _is_plain(item):
                self.fail(
                    f"train_config.{key}",
                    f"must be a number, string, None or a short list, got {_short(item)}",
                )
        return config


def load_checkpoint(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> dict:
    """Read a checkpoint file and validate every field (``torch.load(..., weights_only=True)``).

    What needs the family to check (state-dict shapes, optimizer state against the parameters) is checked
    by :func:`restore_family` and the training step; everything else here.

    :param path: the file.
    :param map_location: where the tensors of the returned dict live.
    :returns: the payload as plain data, with ``family`` normalized to ``{"name", "kwargs", "prefix"}``,
        ``param_store`` to ``{relative name: (unconstrained tensor, constraint)}``, and ``"source"``: the
        path.
    :raises FileNotFoundError: when ``path`` does not exist.
    :raises CheckpointError: when the file is not a pvae checkpoint or any field is malformed.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint {path} does not exist (or is not a file)")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # any failure to parse gets one answer: not a checkpoint
        raise CheckpointError(path, "file", f"not a pvae checkpoint (torch.load: {error})") from None
    check = _Validator(path)
    if not isinstance(payload, dict) or payload.get("format") != CHECKPOINT_FORMAT:
        check.fail("format", f"no '{CHECKPOINT_FORMAT}' marker: not a pvae checkpoint")
    version = payload.get("version")
    if not _is_int(version) or version < 1:
        check.fail("version", f"must be a positive integer, got {_short(version)}")
    if version > CHECKPOINT_VERSION:
        check.fail(
            "version",
            f"{version} was written by a newer pvae (this one reads ≤ {CHECKPOINT_VERSION}); upgrade pvae",
        )
    fields = (
        "format",
        "version",
        "family",
        "state_dict",
        "param_store",
        "optimizer",
        "rng",
        "loader",
        "epoch",
        "history",
        "train_config",
    )
    check.keys(payload, "file", fields, ("format", "version", "family", "state_dict", "epoch"))
    epoch = check.int_in(payload["epoch"], "epoch", 0, _MAX_EPOCH)
    loader = payload.get("loader")
    checked = {
        "format": CHECKPOINT_FORMAT,
        "version": version,
        "source": path,
        "family": check.family(payload["family"]),
        "state_dict": check.state_dict(payload["state_dict"]),
        "param_store": check.param_store(payload.get("param_store")),
        "optimizer": check.optimizer(payload.get("optimizer")),
        "rng": check.rng(payload.get("rng")),
        "loader": None if loader is None else check.generator_state(loader, "loader"),
        "epoch": epoch,
        "history": check.history(payload.get("history"), epoch),
        "train_config": check.train_config(payload.get("train_config")),
    }
    if map_location is not None and torch.device(map_location).type != "cpu":
        checked["state_dict"] = {key: value.to(map_location) for key, value in checked["state_dict"].items()}
    return checked


def _check_state(family: nn.Module, checkpoint: dict) -> None:
    """The checkpoint's state dict against ``family``'s: same keys and shapes, compatible dtypes, finite."""
    check = _Validator(checkpoint.get("source", "<checkpoint>"))
    own = family.state_dict()
    state = checkpoint["state_dict"]
    missing, extra = sorted(set(own) - set(state)), sorted(set(state) - set(own))
    if missing or extra:
        check.fail(
            "state_dict",
            f"keys differ from the family's: missing {_short(missing)}, unexpected {_short(extra)}",
        )
    for key, tensor in state.items():
        reference = own[key]
        if tensor.shape != reference.shape:
            check.fail(
                f"state_dict[{key!r}]",
                f"has shape {tuple(tensor.shape)}, the family's is {tuple(reference.shape)}",
            )
        if tensor.is_floating_point() != reference.is_floating_point() or (
            not reference.is_floating_point() and tensor.dtype != reference.dtype
        ):
            check.fail(f"state_dict[{key!r}]", f"has dtype {tensor.dtype}, the family's is {reference.dtype}")
        if reference.is_floating_point() and not torch.isfinite(tensor).all():
            check.fail(f"state_dict[{key!r}]", "has NaN/inf entries")


def restore_family(family: nn.Module, checkpoint: dict, device=None) -> None:
    """Load a validated checkpoint's module state and free Pyro params into ``family`` (same registered
    family, same constructor arguments).

    :param family: the family to fill.
    :param checkpoint: from :func:`load_checkpoint`.
    :param device: where the free params go (default: the family's device).
    :raises CheckpointError: when the checkpoint holds another family, other constructor arguments, or a
        state dict whose keys or shapes differ from the family's.
    """
    check = _Validator(checkpoint.get("source", "<checkpoint>"))
    saved = checkpoint["family"]
    name = getattr(type(family), "family_name", None)
    if name != saved["name"]:
        check.fail("family.name", f"the checkpoint holds a {saved['name']!r} family, not a {name!r}")
    mine = {key: value for key, value in family.constructor_kwargs().items() if key != "name"}
    theirs = {key: value for key, value in saved["kwargs"].items() if key != "name"}
    theirs = {key: theirs.get(key, value) for key, value in mine.items()} | theirs
    if mine != theirs:
        differences = {
            key: (theirs.get(key), mine.get(key)) for key in mine if theirs.get(key) != mine.get(key)
        }
        check.fail("family.kwargs", f"built with other arguments (saved, here): {_short(differences)}")
    _check_state(family, checkpoint)
    family.load_state_dict(checkpoint["state_dict"], strict=True)
    device = device if device is not None else getattr(family, "device", torch.device("cpu"))
    store = pyro.get_param_store()
    for relative, (unconstrained, constraint) in checkpoint.get("param_store", {}).items():
        param_name = family.name + relative
        if param_name in store:
            del store[param_name]
        value = unconstrained.detach().to(device).clone().requires_grad_(True)
        store.set_state({"params": {param_name: value}, "constraints": {param_name: constraint}})  # merges


def load(path: str | os.PathLike, device: str | torch.device = "cpu") -> nn.Module:
    """Rebuild a trained family from a checkpoint, on the CPU unless asked otherwise. Runs no code named
    by the file: the family must be registered in this program (built-in ones always are).

    The family registered under the recorded name is built from the recorded constructor arguments (checked
    and sized first, :func:`pvae.family.build_family`) under a fresh param-store name (so it never collides
    with a family already alive in this process); its ``.model`` and ``.guide`` are ready for
    ``log_evidence``, ``compare`` or more training.

    :param path: a file written by :func:`save_checkpoint` (``pvae train`` writes ``DIR/checkpoint.pt``).
    :param device: where to put it (``"cpu"``, ``"cuda"``, ``"cuda:N"``).
    :returns: the family, in eval mode (:func:`load_checkpoint` gives the history and the rest).
    :raises FileNotFoundError: when ``path`` does not exist.
    :raises CheckpointError: when the file is not a pvae checkpoint, names an unregistered family, or
        any field is malformed.
    """
    device = resolve_device(device)
    checkpoint = load_checkpoint(path)
    return build_from_checkpoint(checkpoint, device)


def build_from_checkpoint(checkpoint: dict, device: str | torch.device = "cpu") -> nn.Module:
    """The family of a validated checkpoint (:func:`load_checkpoint`), rebuilt, restored, in eval mode."""
    check = _Validator(checkpoint.get("source", "<checkpoint>"))
    record = checkpoint["family"]
    cls = family_class(record["name"])
    kwargs = dict(record["kwargs"])
    if "name" in kwargs:
        kwargs["name"] = None  # a fresh unique prefix in Pyro's param store
    try:  # the state dict is compared on the meta-device family: nothing larger than the file is built
        family = build_family(
            cls, kwargs, checked=True, inspect_probe=lambda probe: _check_state(probe, checkpoint)
        )
    except CheckpointError:
        raise
    except ValueError as error:
        check.fail("family.kwargs", str(error))
    family.to(resolve_device(device))
    restore_family(family, checkpoint, device=family.device)
    family.eval()
    return family
