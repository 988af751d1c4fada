"""Stochastic variational inference on any model/guide pair."""

from __future__ import annotations

import math

import pyro
import pyro.optim
from pyro.infer import SVI, Trace_ELBO
from pyro.infer.elbo import ELBO

from pvae.utils import progress_bar, seed_everything

__all__ = ["fit"]


def fit(
    model,
    guide,
    *args,
    num_steps: int = 1000,
    lr: float = 1e-2,
    loss: ELBO | None = None,
    seed: int | None = None,
    progress: bool = True,
    optim: pyro.optim.PyroOptim | None = None,
    **kwargs,
) -> list[float]:
    """Fit ``guide`` (and any parameters of ``model``) by SVI and return the loss history.

    Each step is one ``SVI.step(*args, **kwargs)``: the loss is −ELBO summed over the ``"data"`` plate, as
    Pyro reports it. Parameters live in Pyro's global param store and are *not* cleared here, so several
    pairs can be fitted in one process.

    :param model: Pyro model.
    :param guide: Pyro guide with the same latent sites.
    :param num_steps: number of SVI steps, ≥ 1.
    :param lr: Adam learning rate, > 0 (ignored when ``optim`` is given).
    :param loss: any Pyro ELBO (default ``Trace_ELBO()``), e.g. ``TraceMeanField_ELBO()`` or
        ``TraceEnum_ELBO(max_plate_nesting=1)`` for enumerated discrete latents.
    :param seed: seeds Python, NumPy, torch and Pyro first.
    :param progress: show a progress bar (on stderr, and only when it is a terminal).
    :param optim: a Pyro optimizer to use instead of ``Adam({"lr": lr})`` (e.g. ``ClippedAdam`` with decay).
    :returns: the loss after each step.
    :raises FloatingPointError: when the loss becomes NaN or infinite (the step is named).
    """
    if isinstance(num_steps, bool) or not isinstance(num_steps, int) or num_steps < 1:
        raise ValueError(f"num_steps must be a positive integer, got {num_steps!r}")
    if optim is None and not (isinstance(lr, int | float) and math.isfinite(lr) and lr > 0):
        raise ValueError(f"lr must be a finite number > 0, got {lr!r}")
    if seed is not None:
        seed_everything(seed)
    svi = SVI(model, guide, optim or pyro.optim.Adam({"lr": lr}), loss or Trace_ELBO())
    losses: list[float] = []
    with progress_bar(range(num_steps), progress=progress, desc="SVI") as bar:
        for step in bar:
            value = svi.step(*args, **kwargs)
            if not math.isfinite(value):
                if step == 0:
                    raise FloatingPointError(
                        f"the SVI loss is {value} at the first step, before any update: the model cannot "
                        "score this data at its initial parameters (check the data and the model's settings)"
                    )
                raise FloatingPointError(f"SVI loss became {value} at step {step}; try a smaller lr")
            losses.append(value)
            if step % 50 == 0 or step == num_steps - 1:
                bar.set_postfix(loss=f"{value:.4g}")
    return losses
