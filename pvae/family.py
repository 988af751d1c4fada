"""The base class every model family derives from, and the registry that names families.

A family is an ``nn.Module`` whose ``model(x=None, num_data=None)`` and ``guide(x, num_data=None)`` methods
share sample-site names.
This base gives it what the rest of pvae relies on:

- ``name``: a prefix that keeps its networks and parameters apart in Pyro's *global* param store
  (``pyro.module(self.name, self)``), so several families can be fitted in one process;
- ``config``: a dataclass of constructor arguments (plain numbers, strings, tuples), the one declaration
  of what the family is built from: the class says which dataclass with ``config_class``, and a
  checkpoint rebuilds the family as ``type(family)(**dataclasses.asdict(family.config))``;
- a registered name: ``@register_family("vae")`` on the class. Checkpoints name a family by this name
  only (never by an import path), so loading a file can only ever build a class that the running program
  registered. A family of your own is registered the same way, in your own module; import that module
  before loading its checkpoints, as with any plugin.

:func:`build_family` is the one way pvae builds a family from untrusted arguments (a checkpoint's, the
command line's): it checks them against the declared config (names and types), lets the constructor
check ranges, and refuses a family whose parameters and buffers would exceed :data:`MAX_ELEMENTS`, which
it learns by building the family on PyTorch's ``meta`` device first (shapes only, no memory).
"""

from __future__ import annotations

import dataclasses
import re
import types
import typing
import warnings
from typing import Any

import pyro
import torch
from torch import nn

from pvae.checks import check_int
from pvae.utils import unique_name

__all__ = [
    "MAX_ELEMENTS",
    "Family",
    "build_family",
    "check_config_kwargs",
    "data_plate",
    "family_class",
    "register_family",
    "registered_families",
]

# Parameters and buffers one family may ask for (2**31 float32 entries are 8 GiB): a size read from a
# file or typed on the command line is refused beyond this before anything is allocated.
MAX_ELEMENTS = 2**31

_REGISTRY: dict[str, type] = {}
_NAME_PATTERN = re.compile(r"[a-z][a-z0-9_\-]{0,63}")


def register_family(name: str):
    """Class decorator: register a :class:`Family` subclass under ``name`` for checkpoints and the CLI.

    ``name`` is lower-case letters, digits, ``_`` and ``-`` (starting with a letter, at most 64
    characters). The class must declare ``config_class``, the dataclass of its constructor arguments.
    Registering a second, different class under a taken name is an error.

    Example::

        @pvae.register_family("beta-bernoulli")
        class BetaBernoulli(pvae.Family):
            config_class = BetaBernoulliConfig
            ...
    """
    if not isinstance(name, str) or not _NAME_PATTERN.fullmatch(name):
        raise ValueError(
            f"a family's registered name must match {_NAME_PATTERN.pattern} (e.g. 'vae'), got {name!r}"
        )

    def register(cls: type) -> type:
        if not (isinstance(cls, type) and issubclass(cls, Family)):
            raise TypeError(f"register_family({name!r}) decorates a pvae.family.Family subclass, got {cls!r}")
        if not dataclasses.is_dataclass(getattr(cls, "config_class", None)):
            raise TypeError(
                f"{cls.__qualname__} must declare config_class, the dataclass of its constructor arguments"
            )
        _check_constructor_matches_config(cls)
        known = _REGISTRY.get(name)
        if known is not None and _class_path(known) != _class_path(cls):
            raise ValueError(f"family name {name!r} is already registered for {_class_path(known)}")
        _REGISTRY[name] = cls  # the same class again (its module re-imported) replaces itself
        cls.family_name = name
        return cls

    return register


def _check_constructor_matches_config(cls: type) -> None:
    """Every field of the config is a keyword of the constructor, and every other keyword defaults to None
    (an object that is not plain data, e.g. a custom network, passed again when loading)."""
    import inspect

    fields = {field.name for field in dataclasses.fields(cls.config_class)}
    parameters = dict(inspect.signature(cls.__init__).parameters)
    parameters.pop("self", None)
    missing = sorted(fields - set(parameters))
    if missing:
        raise TypeError(f"{cls.__qualname__}.__init__ lacks the config fields {missing}")
    others = [
        key for key, parameter in parameters.items() if key not in fields and parameter.default is not None
    ]
    if others:
        raise TypeError(
            f"{cls.__qualname__}.__init__ takes {others}, which are not in its config "
            f"{cls.config_class.__name__} (arguments outside the config must default to None)"
        )


def _class_path(cls: type) -> str:
    return f"{cls.__module__}:{cls.__qualname__}"


def _load_built_ins() -> None:
    """Import the built-in families' package, whose modules register them. (pvae core does not import
    models at import time; this fixed import, never a name read from a file, lets ``pvae.load`` rebuild a
    built-in family in a program that has not imported it yet.)"""
    import pvae.models  # noqa: F401


def registered_families() -> dict[str, type]:
    """Registered name → family class, the built-in families included."""
    _load_built_ins()
    return dict(_REGISTRY)


def family_class(name: str) -> type:
    """The class registered under ``name``; ``ValueError`` naming the registered ones otherwise."""
    if isinstance(name, str) and name in _REGISTRY:
        return _REGISTRY[name]
    families = registered_families()
    if isinstance(name, str) and name in families:
        return families[name]
    shown = name if isinstance(name, str) and len(name) <= 80 else f"{str(name)[:80]}…"
    raise ValueError(
        f"unknown family {shown!r}: registered are {', '.join(sorted(families))}; a family of your own "
        "is registered with @pvae.register_family('name') on its class, in a module you import first"
    )


def family_by_class_path(path: str) -> type | None:
    """The registered class whose ``"module:qualname"`` is ``path`` (checkpoints of format 1), or None."""
    for cls in registered_families().values():
        if _class_path(cls) == path:
            return cls
    return None


# ---- constructor arguments checked against the declared config -----------------------------------------
_MAX_SEQUENCE = 4096  # entries of one tuple-valued argument
_MAX_STRING = 256


def _describe(value) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "…"


def _plain(value, depth: int = 0) -> bool:
    """A number, or a (nested, ≤ 2 levels) sequence of numbers: the values of an untyped tuple field."""
    if isinstance(value, bool):
        return False
    if isinstance(value, int | float):
        return True
    if isinstance(value, list | tuple) and depth < 2 and len(value) <= _MAX_SEQUENCE:
        return all(_plain(item, depth + 1) for item in value)
    return False


def _conforms(value, hint) -> tuple[bool, Any]:
    """Whether ``value`` (plain data) has the type ``hint``, and the value as the config keeps it."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        for option in typing.get_args(hint):
            ok, converted = _conforms(value, option)
            if ok:
                return True, converted
        return False, value
    if hint is type(None):
        return value is None, value
    if hint is bool:
        return isinstance(value, bool), value
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool), value
    if hint is float:
        if not isinstance(value, int | float) or isinstance(value, bool):
            return False, value
        try:
            return True, float(value)
        except OverflowError:  # an integer too large for a float
            return False, value
    if hint is str:
        return isinstance(value, str) and len(value) <= _MAX_STRING, value
    if hint is tuple or origin is tuple:
        if not isinstance(value, list | tuple) or len(value) > _MAX_SEQUENCE:
            return False, value
        args = typing.get_args(hint)
        if not args:
            return all(_plain(item, 1) for item in value), _as_tuples(value)
        item_hint = args[0] if len(args) == 2 and args[1] is Ellipsis else None
        if item_hint is None:
            return False, value
        converted = []
        for item in value:
            ok, item = _conforms(item, item_hint)
            if not ok:
                return False, value
            converted.append(item)
        return True, tuple(converted)
    return False, value


def _as_tuples(value):
    return tuple(_as_tuples(item) for item in value) if isinstance(value, list | tuple) else value


def _hint_text(hint) -> str:
    return getattr(hint, "__name__", None) or str(hint).replace("typing.", "")


def check_config_kwargs(cls: type, kwargs) -> dict[str, Any]:
    """Check constructor arguments against ``cls.config_class``: known names, declared types.

    Values may come from a file: lists stand for tuples and are converted. Ranges are the constructor's
    to check (:func:`build_family` calls it).

    :returns: the arguments, converted.
    :raises ValueError: naming the first argument that is unknown or of the wrong type.
    """
    if not isinstance(kwargs, dict):
        raise ValueError(f"the arguments of {cls.__qualname__} must be a dict, got {type(kwargs).__name__}")
    config_class = cls.config_class
    hints = typing.get_type_hints(config_class)
    fields = [field.name for field in dataclasses.fields(config_class)]
    checked = {}
    for key, value in kwargs.items():
        if key not in fields:
            raise ValueError(
                f"{cls.__qualname__} takes no argument {_describe(key)}; its config has {', '.join(fields)}"
            )
        ok, converted = _conforms(value, hints[key])
        if not ok:
            raise ValueError(
                f"{cls.__qualname__} argument {key} must be {_hint_text(hints[key])}, got {_describe(value)}"
            )
        checked[key] = converted
    return checked


def _element_count(module: nn.Module) -> int:
    return sum(tensor.numel() for tensor in (*module.parameters(), *module.buffers()))


def build_family(cls: type, kwargs: dict[str, Any], *, checked: bool = False, inspect_probe=None) -> Family:
    """Build ``cls(**kwargs)`` from untrusted arguments, refusing what it cannot or should not build.

    The arguments are checked against the declared config (:func:`check_config_kwargs`), the family is
    first built on the ``meta`` device (shapes only) so that one exceeding :data:`MAX_ELEMENTS` is refused
    before any memory is taken, then built for real on the CPU.

    :param cls: a registered family class.
    :param kwargs: constructor arguments (e.g. a checkpoint's, or the command line's).
    :param checked: the arguments already went through :func:`check_config_kwargs`.
    :param inspect_probe: called with the ``meta``-device family before the real one is built (e.g. to
        compare its state dict's shapes with a checkpoint's, so nothing larger than the file is allocated).
    :raises ValueError: for an unknown or ill-typed argument, one the constructor rejects, or a family
        too large to build.
    """
    kwargs = kwargs if checked else check_config_kwargs(cls, kwargs)
    sizes = ", ".join(
        f"{key}={_describe(value)}"
        for key, value in kwargs.items()
        if isinstance(value, int | tuple) and not isinstance(value, bool)
    )
    try:
        with torch.device("meta"):
            probe = cls(**kwargs)
    except (TypeError, ValueError, OverflowError, RuntimeError, MemoryError) as error:
        message = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise ValueError(f"cannot build {cls.__qualname__} ({message}); its sizes: {sizes}") from None
    count = _element_count(probe)
    if inspect_probe is not None and count <= MAX_ELEMENTS:
        inspect_probe(probe)
    del probe
    if count > MAX_ELEMENTS:
        raise ValueError(
            f"{cls.__qualname__} would hold {count:,} parameters and buffers, over the limit of "
            f"{MAX_ELEMENTS:,} (pvae.family.MAX_ELEMENTS); its sizes: {sizes}"
        )
    return cls(**kwargs)


def data_plate(x: torch.Tensor | None, num_data: int | None = None, device=None) -> pyro.plate:
    """The ``pyro.plate("data", …)`` of the contract ``model(x=None, num_data=None)``, ``guide(x, num_data)``.

    - ``x=None``: N = ``num_data`` (required, ≥ 1) data points drawn from the prior predictive, on
      ``device``;
    - ``x`` a batch of B data points and ``num_data`` left out (or equal to B): the plate is the batch;
    - ``x`` a batch of B and ``num_data=N > B``: x is a minibatch of a data set of N points, and every site
      in the plate is scaled by N/B, so the log-densities and ELBO estimate the whole data set's (Pyro's
      plate subsampling; a data-parallel rank passes its share of a global batch this way).

    :raises ValueError: without data and without ``num_data``, or with ``num_data`` < B.
    """
    if x is None:
        if num_data is None:
            raise ValueError(
                "pass the data x, or num_data=N (and x=None) to draw N data points from the prior predictive"
            )
        return pyro.plate("data", check_int("num_data", num_data), device=device)
    batch = x.shape[0]
    if num_data is None or check_int("num_data", num_data) == batch:
        return pyro.plate("data", batch, device=x.device)
    if num_data < batch:
        raise ValueError(
            f"num_data={num_data!r} is the size of the data set x is a batch of, so it must be at least the "
            f"batch size {batch} (x has shape {tuple(x.shape)}); leave it out to use the batch alone"
        )
    return pyro.plate("data", num_data, subsample=torch.arange(batch, device=x.device))


class Family(nn.Module):
    """Base for model/guide families.

    Subclasses declare ``config_class`` (a dataclass whose fields are exactly their constructor's keyword
    arguments, ``name`` included) and set ``self.config`` to an instance of it after calling
    ``super().__init__(name)``; ``@register_family("name")`` on the class makes it loadable from
    checkpoints and known to the command line.
    """

    config_class: typing.ClassVar[type | None] = None
    family_name: typing.ClassVar[str | None] = None  # set by @register_family
    config: Any

    def __init__(self, name: str | None = None):
        super().__init__()
        if name is not None and (not isinstance(name, str) or not name):
            raise ValueError(f"name must be a non-empty string or None, got {name!r}")
        self.name = name if name is not None else unique_name(type(self).__name__.lower())

    # ---- the contract's hooks: what the training loop and the command line may call ----------------------
    def model(self, x=None, num_data: int | None = None) -> None:
        """The generative story. Data live in ``pyro.plate("data", N)``; ``x=None`` with ``num_data=N``
        draws from the prior predictive (x sampled where it is otherwise observed) when the family has a
        proper prior, so ``pyro.infer.Predictive(family.model, num_samples=S)(None, num_data=N)`` works."""
        raise TypeError(f"{type(self).__name__} must define model(x=None, num_data=None)")

    def guide(self, x, num_data: int | None = None) -> None:
        """The approximate posterior, with the model's latent site names."""
        raise TypeError(f"{type(self).__name__} must define guide(x, num_data=None)")

    def svi_program(self, objective: str):
        """The ``(model, guide, elbo[, name])`` the training loop fits for ``objective``, or None (the
        default) to fit ``model``/``guide`` with the objective's ELBO. A family whose training pair differs
        from its model/guide (the diffusion model's time-subsampled pair) overrides this; the optional
        ``name`` says which objective it really trains (the history records it)."""
        return None

    def after_step(self) -> None:
        """Called by the training loop after every optimizer step (e.g. to update an average of the
        weights); nothing by default."""

    def sample(self, n: int, *, generator: torch.Generator | None = None) -> torch.Tensor:
        """``n`` draws of x from the prior predictive, (n, *datum shape), on the family's device: a direct
        sampler (faster than ``Predictive`` on ``model(None, num_data=n)``, same distribution up to what the
        family documents, e.g. the VAE's decoded mean); families with a proper prior override it, keeping
        ``generator`` (a ``torch.Generator`` on that device) keyword-only."""
        raise ValueError(f"{type(self).__name__} has no proper prior to sample from")

    def constructor_kwargs(self) -> dict[str, Any]:
        """Keyword arguments that rebuild this family (used by checkpoints)."""
        if not dataclasses.is_dataclass(getattr(self, "config", None)):
            raise TypeError(
                f"{type(self).__name__} must set self.config to a dataclass of its constructor arguments"
            )
        return dataclasses.asdict(self.config)

    def _prepare(self, x: torch.Tensor) -> torch.Tensor:
        """Check and cast a batch of data with the family's ``_checked(x)``, quietly under JIT tracing.

        A traced step (``JitTrace_ELBO``) runs this Python once, on the batch it traces with: that batch is
        checked without the tracer's warnings about tensor → bool; later batches run the compiled graph.
        """
        if torch.jit.is_tracing():
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", torch.jit.TracerWarning)
                return self._checked(x)
        return self._checked(x)

    def _checked(self, x: torch.Tensor) -> torch.Tensor:
        """Validate and cast one batch; families that take batches of data override this."""
        return x

    @property
    def device(self):
        """Device of the family's parameters/buffers (CPU when it has none)."""
        for tensor in (*self.parameters(), *self.buffers()):
            return tensor.device
        return torch.device("cpu")
