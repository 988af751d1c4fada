"""Checkpoints: everything needed to rebuild a trained family, or to resume its training exactly.

A checkpoint is one ``torch.save`` file holding only tensors, dicts, lists, numbers, strings and None, so it
loads with ``torch.load(..., weights_only=True)`` (no pickled code runs on load):

- ``family``: its import path ``"module:qualname"``, constructor kwargs (``family.constructor_kwargs()``)
  and the name it had (its prefix in Pyro's param store);
- ``state_dict``: the family's module state (networks, buffers);
- ``param_store``: any other Pyro params under the family's prefix (``pyro.param`` sites that are not module
  parameters), unconstrained values and their constraints, names relative to the prefix;
- ``optimizer``: optimizer state and the param-store names it is keyed by; ``rng``: Python, NumPy, torch
  (and CUDA) generator states; ``loader``: the training loader's generator state (shuffling, dynamic
  binarization); ``epoch``, ``history`` and ``train_config``.

Files are written atomically (a temporary file in the same folder, then ``os.replace``), so a run killed
while saving leaves the previous checkpoint intact. ``pvae`` core never imports ``models/``: :func:`load`
imports the family class by its recorded path.
"""

from __future__ import annotations

import importlib
import os
import pickle
import random
import tempfile
import zipfile
from typing import Any

import numpy as np
import pyro
import torch
from pyro.distributions import constraints
from torch import nn

from pvae.utils import resolve_device

__all__ = [
    "CHECKPOINT_FORMAT",
    "capture_rng_state",
    "family_path",
    "import_family",
    "load",
    "load_checkpoint",
    "param_renamer",
    "restore_family",
    "restore_rng_state",
    "save_checkpoint",
]

CHECKPOINT_FORMAT = "pvae-checkpoint"
CHECKPOINT_VERSION = 1
_MODULE_DIVIDER = "$$$"  # pyro.module's separator between module name and parameter name


# ---- the family's identity -------------------------------------------------------------------------------
def family_path(family: nn.Module) -> str:
    """``"module:qualname"`` of the family's class, e.g. ``"pvae.models.vae:VAE"``."""
    cls = type(family)
    if "<locals>" in cls.__qualname__:
        raise ValueError(
            f"{cls.__qualname__} is defined inside a function; a checkpoint must be able to import it"
        )
    return f"{cls.__module__}:{cls.__qualname__}"


def import_family(path: str) -> type:
    """Import a class from ``"module:qualname"``; ``ValueError`` when it cannot be found."""
    module_name, _, qualname = str(path).partition(":")
    if not module_name or not qualname:
        raise ValueError(f"family path must look like 'package.module:Class', got {path!r}")
    try:
        obj = importlib.import_module(module_name)
        for part in qualname.split("."):
            obj = getattr(obj, part)
    except (ImportError, AttributeError) as error:
        raise ValueError(f"cannot import the checkpoint's family {path!r}: {error}") from error
    if not isinstance(obj, type):
        raise ValueError(f"the checkpoint's family {path!r} is not a class")
    return obj


# ---- constraints of free Pyro params (stored as plain data) ----------------------------------------------
_NAMED_CONSTRAINTS = {
    name: value
    for name, value in vars(constraints).items()
    if isinstance(value, constraints.Constraint) and not name.startswith("_")
}


def _constraint_spec(constraint, name: str) -> dict:
    for key, value in _NAMED_CONSTRAINTS.items():
        if value is constraint:
            return {"kind": key}
    for kind, fields in (
        ("greater_than", ("lower_bound",)),
        ("greater_than_eq", ("lower_bound",)),
        ("less_than", ("upper_bound",)),
        ("interval", ("lower_bound", "upper_bound")),
        ("half_open_interval", ("lower_bound", "upper_bound")),
    ):
        cls = type(getattr(constraints, kind))
        if type(constraint) is cls:
            return {"kind": kind, "args": [float(getattr(constraint, field)) for field in fields]}
    raise ValueError(f"cannot store the constraint {constraint!r} of Pyro param {name!r} in a checkpoint")


def _constraint_from_spec(spec: dict):
    kind = spec["kind"]
    if "args" in spec:
        return getattr(constraints, kind)(*spec["args"])
    if kind not in _NAMED_CONSTRAINTS:
        raise ValueError(f"unknown constraint {kind!r} in checkpoint")
    return _NAMED_CONSTRAINTS[kind]


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


def _restore_free_params(section: dict, prefix: str, device) -> None:
    store = pyro.get_param_store()
    for relative, unconstrained in section.get("params", {}).items():
        name = prefix + relative
        constraint = _constraint_from_spec(section["constraints"][relative])
        if name in store:
            del store[name]
        value = unconstrained.detach().to(device).clone().requires_grad_(True)
        store.set_state({"params": {name: value}, "constraints": {name: constraint}})  # merges, exactly


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


def restore_rng_state(state: dict) -> None:
    """Inverse of :func:`capture_rng_state`."""
    python = state["python"]
    random.setstate(
        (python["version"], tuple(int(v) for v in python["internal"].tolist()), python["gauss_next"])
    )
    numpy_state = state["numpy"]
    np.random.set_state(
        (
            numpy_state["kind"],
            numpy_state["keys"].numpy().astype(np.uint32),
            numpy_state["position"],
            numpy_state["has_gauss"],
            numpy_state["cached_gaussian"],
        )
    )
    torch.set_rng_state(state["torch"].cpu())
    if "cuda" in state and torch.cuda.is_available():
        cuda_states = state["cuda"]
        if len(cuda_states) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(cuda_states)


# ---- save / load -----------------------------------------------------------------------------------------
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
    :param family: the model family (an ``nn.Module`` with ``constructor_kwargs()`` and ``name``).
    :param epoch: number of completed epochs.
    :param history: ``History.to_dict()`` of the run so far.
    :param optimizer: ``SVIStep.state_dict()``.
    :param rng: :func:`capture_rng_state`.
    :param loader: the training loader's generator state (``loader.generator.get_state()``).
    :param train_config: plain-data settings of the run (objective, lr, …).
    :returns: the path written.
    """
    if not hasattr(family, "constructor_kwargs"):
        raise ValueError(
            f"family must be a pvae Family (with constructor_kwargs()), got {type(family).__name__}"
        )
    payload: dict[str, Any] = {
        "format": CHECKPOINT_FORMAT,
        "version": CHECKPOINT_VERSION,
        "family": {
            "class": family_path(family),
            "kwargs": family.constructor_kwargs(),
            "name": getattr(family, "name", None),
        },
        "state_dict": {key: value.detach().clone() for key, value in family.state_dict().items()},
        "param_store": _free_params(family),
        "optimizer": optimizer,
        "rng": rng,
        "loader": loader,
        "epoch": int(epoch),
        "history": history,
        "train_config": train_config or {},
    }
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    handle = tempfile.NamedTemporaryFile(
        dir=folder, prefix=os.path.basename(path) + ".", suffix=".tmp", delete=False
    )
    try:
        with handle:
            torch.save(payload, handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(handle.name, path)
    except BaseException:
        if os.path.exists(handle.name):
            os.unlink(handle.name)
        raise
    return path


def load_checkpoint(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> dict:
    """Read and validate a checkpoint file (``torch.load(..., weights_only=True)``).

    :raises FileNotFoundError: when ``path`` does not exist.
    :raises ValueError: when the file is not a pvae checkpoint.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint {path!r} does not exist")
    try:
        payload = torch.load(path, map_location=map_location, weights_only=True)
    except (
        RuntimeError,
        pickle.UnpicklingError,
        zipfile.BadZipFile,
        EOFError,
        ValueError,
        KeyError,
    ) as error:
        raise ValueError(f"{path!r} is not a pvae checkpoint (torch.load failed: {error})") from error
    if not isinstance(payload, dict) or payload.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"{path!r} is not a pvae checkpoint (no '{CHECKPOINT_FORMAT}' marker)")
    if payload.get("version", 0) > CHECKPOINT_VERSION:
        raise ValueError(
            f"{path!r} was written by a newer pvae (checkpoint version {payload['version']}); upgrade pvae"
        )
    return payload


def restore_family(family: nn.Module, checkpoint: dict, device=None) -> None:
    """Load a checkpoint's module state and free Pyro params into ``family`` (same class and config).

    :raises ValueError: when the checkpoint holds another family class or other constructor arguments.
    """
    saved = checkpoint["family"]
    if family_path(family) != saved["class"]:
        raise ValueError(f"the checkpoint holds a {saved['class']}, not a {family_path(family)}")
    mine = {key: value for key, value in family.constructor_kwargs().items() if key != "name"}
    theirs = {key: value for key, value in saved["kwargs"].items() if key != "name"}
    if mine != theirs:
        raise ValueError(f"the checkpoint's family was built with {theirs}, this one with {mine}")
    family.load_state_dict(checkpoint["state_dict"])
    device = device if device is not None else getattr(family, "device", torch.device("cpu"))
    _restore_free_params(checkpoint.get("param_store", {}), family.name, device)


def load(path: str | os.PathLike, device: str | torch.device = "cpu") -> nn.Module:
    """Rebuild a trained family from a checkpoint, on the CPU unless asked otherwise.

    The family class is imported from the recorded path and built from the recorded constructor kwargs
    under a fresh param-store name (so it never collides with a family already alive in this process);
    its ``.model`` and ``.guide`` are ready for ``log_evidence``, ``compare`` or more training.

    :param path: a file written by :func:`save_checkpoint` (``pvae train`` writes ``DIR/checkpoint.pt``).
    :param device: where to put it (``"cpu"``, ``"cuda"``, ``"cuda:N"``).
    :returns: the family, in eval mode (:func:`load_checkpoint` gives the history and the rest).
    :raises FileNotFoundError: when ``path`` does not exist.
    :raises ValueError: when the file is not a pvae checkpoint or its family cannot be imported.
    """
    device = resolve_device(device)
    checkpoint = load_checkpoint(path, map_location="cpu")
    cls = import_family(checkpoint["family"]["class"])
    kwargs = dict(checkpoint["family"]["kwargs"])
    if "name" in kwargs:
        kwargs["name"] = None  # a fresh unique prefix in Pyro's param store
    try:
        family = cls(**kwargs)
    except TypeError as error:
        raise ValueError(f"cannot rebuild {checkpoint['family']['class']} from {kwargs}: {error}") from error
    family.to(device)
    restore_family(family, checkpoint, device=device)
    family.eval()
    return family
