"""Small shared helpers: seeding, devices, and input validation at the library's boundary."""

from __future__ import annotations

import contextlib
import itertools
import os
import random
import sys
import tempfile
from collections.abc import Callable, Iterable

import numpy as np
import pyro
import torch
from tqdm.auto import tqdm

__all__ = [
    "check_finite",
    "check_positive",
    "default_device",
    "progress_bar",
    "progress_enabled",
    "resolve_device",
    "seed_everything",
    "torch_threads",
    "unique_name",
    "write_atomically",
]

_name_counters: dict[str, itertools.count] = {}


def unique_name(prefix: str) -> str:
    """A process-unique name such as ``"vae_0"``, used to keep families apart in Pyro's global param store."""
    counter = _name_counters.setdefault(prefix, itertools.count())
    return f"{prefix}_{next(counter)}"


def seed_everything(seed: int) -> torch.Generator:
    """Seed Python, NumPy, torch and Pyro; return a torch generator for DataLoaders seeded alike."""
    if not isinstance(seed, int) or isinstance(seed, bool) or seed < 0:
        raise ValueError(f"seed must be a non-negative int, got {seed!r}")
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    pyro.set_rng_seed(seed)
    generator = torch.Generator()
    generator.manual_seed(seed)
    return generator


def default_device() -> torch.device:
    """CUDA when a GPU is available, else the CPU."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def resolve_device(device: str | torch.device | None) -> torch.device:
    """Turn a ``--device`` value (None meaning the default) into a usable ``torch.device``.

    pvae runs on the CPU and on CUDA devices; anything else (``meta``, ``mps``, an index past the last GPU)
    is a ``ValueError`` naming the accepted values.
    """
    if device is None:
        return default_device()
    accepted = "'cpu', 'cuda' or 'cuda:N'"
    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        raise ValueError(f"device must be {accepted}, got {device!r}") from None
    if resolved.type not in ("cpu", "cuda"):
        raise ValueError(f"device must be {accepted}, got {device!r}")
    if resolved.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device {str(resolved)!r} was asked for, but no CUDA device is available")
        if resolved.index is not None and resolved.index >= torch.cuda.device_count():
            raise ValueError(
                f"device {str(resolved)!r} was asked for, but there are {torch.cuda.device_count()} CUDA "
                f"device(s): use cuda:0 … cuda:{torch.cuda.device_count() - 1}"
            )
    return resolved


def write_atomically(path: str | os.PathLike, write: Callable, *, binary: bool = True) -> str:
    """Write a file so that readers see the old content or the new, never a part: ``write(handle)`` fills
    a temporary file in the same folder, which then replaces ``path`` (``os.replace``).

    The folder is created when missing; the file gets the usual permissions (0666 less the umask).

    :returns: the path written.
    """
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    handle = tempfile.NamedTemporaryFile(
        mode="wb" if binary else "w",
        dir=folder,
        prefix=os.path.basename(path) + ".",
        suffix=".tmp",
        delete=False,
        **({} if binary else {"encoding": "utf-8"}),
    )
    try:
        with handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(handle.name, 0o666 & ~umask)
        os.replace(handle.name, path)
    except BaseException:
        if os.path.exists(handle.name):
            os.unlink(handle.name)
        raise
    return path


def check_finite(name: str, value: torch.Tensor) -> torch.Tensor:
    """Raise ``ValueError`` naming ``name`` unless ``value`` is a floating tensor with only finite entries."""
    if not isinstance(value, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    if not value.is_floating_point():
        raise ValueError(f"{name} must have a floating dtype (float32/float64), got {value.dtype}")
    if not torch.isfinite(value).all():
        bad = (~torch.isfinite(value)).sum().item()
        raise ValueError(f"{name} must be finite; it has {bad} NaN/inf entr{'y' if bad == 1 else 'ies'}")
    return value


def check_positive(name: str, value: float | Iterable[float]) -> float:
    """Raise ``ValueError`` naming ``name`` unless ``value`` is a finite real number > 0."""
    try:
        number = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError) as error:
        raise ValueError(f"{name} must be a real number > 0, got {value!r}") from error
    if not (np.isfinite(number) and number > 0):
        raise ValueError(f"{name} must be a finite real number > 0, got {value!r}")
    return number


def progress_enabled(progress: bool = True) -> bool:
    """Progress bars are shown only when asked for *and* stderr is a terminal (quiet in logs and pipes)."""
    return bool(progress) and sys.stderr.isatty()


def progress_bar(iterable=None, *, progress: bool = True, **kwargs):
    """A tqdm bar on stderr, silent unless :func:`progress_enabled`."""
    return tqdm(
        iterable, disable=not progress_enabled(progress), file=sys.stderr, dynamic_ncols=True, **kwargs
    )


@contextlib.contextmanager
def torch_threads(num_threads: int):
    """Run a block with ``num_threads`` intra-op threads, restoring the previous setting afterwards.

    Tiny problems (the toy, the mixture) spend their time in many small kernels, where intra-op threads
    only add synchronisation, so they run faster on one (the README has the measurement).
    """
    if isinstance(num_threads, bool) or not isinstance(num_threads, int) or num_threads < 1:
        raise ValueError(f"num_threads must be a positive integer, got {num_threads!r}")
    previous = torch.get_num_threads()
    torch.set_num_threads(num_threads)
    try:
        yield
    finally:
        torch.set_num_threads(previous)
