"""Small shared helpers: seeding, devices, atomic writes, progress bars, and log1mexp.

The argument checks (``check_finite``, ``check_positive``, …) live in :mod:`pvae.checks`.
"""

from __future__ import annotations

import contextlib
import itertools
import math
import os
import random
import sys
import tempfile
from collections.abc import Callable

import numpy as np
import pyro
import torch
from tqdm.auto import tqdm

# The argument checks live in pvae.checks; re-exported here for code that imports them from pvae.utils.
from pvae.checks import check_finite, check_int, check_positive

__all__ = [
    "bits_per_dim",
    "check_finite",
    "check_positive",
    "default_device",
    "log1mexp",
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


def bits_per_dim(log_likelihood: torch.Tensor, dims: int) -> torch.Tensor:
    """−log p/(D ln 2): a log-likelihood (or a lower bound on it) in nats per datum as bits per dimension
    (an upper bound on the code length when the input is a bound)."""
    return -log_likelihood / (dims * math.log(2.0))


def log1mexp(x: torch.Tensor) -> torch.Tensor:
    r"""log(1 − eˣ) for x ≤ 0, accurate near 0 and far below it (Mächler 2012), with NaN-free gradients.

    .. math:: \log(1 - e^x) = \begin{cases} \log(-\operatorname{expm1}(x)), & x > -\log 2,\\
              \operatorname{log1p}(-e^x), & x \le -\log 2, \end{cases}

    each form where it loses no digits. Each branch only sees inputs valid for it, so ``torch.where`` has
    no NaN gradient to mix in. x = 0 gives −inf (log 0).

    :param x: a floating tensor with entries ≤ 0.
    :returns: a tensor like ``x``.
    """
    near_zero = x > -math.log(2.0)
    x_near = torch.where(near_zero, x, torch.full_like(x, -math.log(2.0)))
    x_far = torch.where(near_zero, torch.full_like(x, -math.log(2.0)), x)
    return torch.where(near_zero, torch.log(-torch.expm1(x_near)), torch.log1p(-torch.exp(x_far)))


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
    check_int("num_threads", num_threads)
    previous = torch.get_num_threads()
    torch.set_num_threads(num_threads)
    try:
        yield
    finally:
        torch.set_num_threads(previous)
