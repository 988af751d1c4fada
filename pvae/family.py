"""The base class every model family derives from.

A family is an ``nn.Module`` whose ``model(*data)`` and ``guide(*data)`` methods share sample-site names.
This base gives it two things the rest of pvae relies on:

- ``name``: a prefix that keeps its networks and parameters apart in Pyro's *global* param store
  (``pyro.module(self.name, self)``), so several families can be fitted in one process;
- ``config``: a dataclass of constructor arguments (plain numbers, strings, tuples), so a checkpoint can
  rebuild the family as ``type(family)(**dataclasses.asdict(family.config))``.
"""

from __future__ import annotations

import dataclasses
import warnings
from typing import Any

import torch
from torch import nn

from pvae.utils import unique_name

__all__ = ["Family"]


class Family(nn.Module):
    """Base for model/guide families.

    Subclasses set ``self.config`` to a dataclass whose fields are exactly their constructor's
    keyword arguments (including ``name``), after calling ``super().__init__(name)``.
    """

    config: Any

    def __init__(self, name: str | None = None):
        super().__init__()
        if name is not None and (not isinstance(name, str) or not name):
            raise ValueError(f"name must be a non-empty string or None, got {name!r}")
        self.name = name if name is not None else unique_name(type(self).__name__.lower())

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
