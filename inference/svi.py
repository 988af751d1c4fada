"""Stochastic variational inference on any model/guide pair, and the learning-rate schedule pvae uses.

The schedule (:func:`scheduled_lr`) is the one geometric decay of both training loops: :func:`fit` (with
``lr_end``, or an optimizer from :func:`scheduled_adam`) and :func:`pvae.inference.train` (with ``lr_end``).
"""

from __future__ import annotations

import math

import pyro
import pyro.optim
import torch
from pyro.infer import SVI, Trace_ELBO
from pyro.infer.elbo import ELBO

from pvae.checks import check_int, check_positive
from pvae.inference.step import ENGINES, SVIStep
from pvae.utils import progress_bar, seed_everything

__all__ = ["fit", "scheduled_adam", "scheduled_lr"]


def scheduled_lr(lr: float, lr_end: float | None, step: int, total_steps: int) -> float:
    """The learning rate of optimizer step ``step`` (0-based) of ``total_steps``: lr·(lr_end/lr)^{k/(S−1)}.

    The first step uses ``lr``, the last ``lr_end``: a constant factor (lr_end/lr)^{1/(S−1)} per step.

    :param lr: the first step's rate.
    :param lr_end: the last step's rate (``None``: constant ``lr``).
    :param step: k, 0 ≤ k (steps past the end keep ``lr_end``).
    :param total_steps: S ≥ 1.
    :returns: the rate, a float.
    """
    if lr_end is None or total_steps <= 1:
        return float(lr)
    fraction = min(step, total_steps - 1) / (total_steps - 1)
    return float(lr) * (float(lr_end) / float(lr)) ** fraction


def scheduled_adam(lr: float, lr_end: float | None, num_steps: int) -> pyro.optim.PyroOptim:
    """Pyro's Adam whose rate at step k of ``num_steps`` is :func:`scheduled_lr` (lr → lr_end).

    A ``pyro.optim`` learning-rate scheduler: :func:`fit` advances it after every SVI step (a loop of your
    own calls its ``step()`` after each ``SVI.step``). With ``lr_end=None`` it is plain ``Adam({"lr": lr})``.

    :param lr: the first step's rate, > 0.
    :param lr_end: the last step's rate, > 0, or ``None`` for a constant rate.
    :param num_steps: S, the steps the schedule spans, ≥ 1.
    """
    lr = check_positive("lr", lr)
    num_steps = check_int("num_steps", num_steps)
    if lr_end is None:
        return pyro.optim.Adam({"lr": lr})
    lr_end = check_positive("lr_end", lr_end)
    return pyro.optim.LambdaLR(
        {
            "optimizer": torch.optim.Adam,
            "optim_args": {"lr": lr},
            "lr_lambda": lambda step: scheduled_lr(lr, lr_end, step, num_steps) / lr,
        }
    )


def _advance_schedule(optim: pyro.optim.PyroOptim, loss: float) -> None:
    """Step a ``pyro.optim`` learning-rate scheduler once (ReduceLROnPlateau is given the loss)."""
    if not isinstance(optim, pyro.optim.PyroLRScheduler):
        return
    if issubclass(optim.pt_scheduler_constructor, torch.optim.lr_scheduler.ReduceLROnPlateau):
        optim.step(loss)
    else:
        optim.step()


def fit(
    model,
    guide,
    *args,
    num_steps: int = 1000,
    lr: float = 1e-2,
    lr_end: float | None = None,
    loss: ELBO | None = None,
    seed: int | None = None,
    progress: bool = True,
    optim: pyro.optim.PyroOptim | None = None,
    engine: str = "eager",
    **kwargs,
) -> list[float]:
    """Fit ``guide`` (and any parameters of ``model``) by SVI and return the loss history.

    Each step is one step of :class:`~pvae.inference.step.SVIStep`, the step engine of
    :func:`pvae.inference.train`: the ELBO's loss and gradients for ``(*args, **kwargs)``, then one
    ``torch.optim.Adam`` update of every parameter the pair touched on its first step. The loss is −ELBO
    summed over the ``"data"`` plate, as Pyro's ``SVI.step`` reports it. Parameters live in Pyro's global
    param store and are *not* cleared here, so several pairs can be fitted in one process. With ``optim``
    (any Pyro optimizer) the steps are Pyro's own ``SVI.step`` instead. Under ``torch.distributed`` the
    steps are SVIStep's there too: every rank calls ``fit``, and the ranks' gradients and losses are
    averaged (one fit, the same parameters on every rank).

    :param model: Pyro model.
    :param guide: Pyro guide with the same latent sites.
    :param num_steps: number of SVI steps, ≥ 1.
    :param lr: Adam learning rate, > 0 (of the first step with ``lr_end``; ignored when ``optim`` is given).
    :param lr_end: if given (> 0), the rate decays geometrically from ``lr`` to ``lr_end`` at the last step
        (:func:`scheduled_lr`, the schedule of :func:`pvae.inference.train`).
    :param loss: any Pyro ELBO (default ``Trace_ELBO()``), e.g. ``TraceMeanField_ELBO()`` or
        ``TraceEnum_ELBO(max_plate_nesting=1)`` for enumerated discrete latents.
    :param seed: seeds Python, NumPy, torch and Pyro first.
    :param progress: show a progress bar (on stderr, and only when it is a terminal).
    :param optim: a Pyro optimizer to use instead of Adam with ``lr``/``lr_end`` (e.g. from
        :func:`scheduled_adam`), run by Pyro's ``SVI.step`` (so not with ``engine``); a ``pyro.optim``
        learning-rate scheduler is advanced after every step.
    :param engine: the :class:`~pvae.inference.step.SVIStep` engine, one of
        :data:`~pvae.inference.step.ENGINES`: ``"eager"`` (any program), ``"trace"`` (records one step and
        replays it: for programs of fixed structure, as the toy's and the mixture's are; a step whose
        guards fail runs eagerly) or ``"compile"`` (worth its compile time only for long runs).
    :returns: the loss after each step.
    :raises FloatingPointError: when the loss becomes NaN or infinite (the step is named); the parameters
        keep their values from before that step.
    """
    num_steps = check_int("num_steps", num_steps)
    if engine not in ENGINES:
        raise ValueError(f"engine must be one of {ENGINES}, got {engine!r}")
    if optim is not None:
        if engine != "eager":
            raise ValueError(
                f"engine={engine!r} needs fit's own Adam: leave optim=None (a Pyro optimizer "
                "runs through Pyro's SVI.step)"
            )
        if seed is not None:
            seed_everything(seed)
        return _fit_with_pyro_optim(model, guide, args, kwargs, num_steps, loss, progress, optim)
    lr = check_positive("lr", lr)
    if lr_end is not None:
        lr_end = check_positive("lr_end", lr_end)
    if seed is not None:
        seed_everything(seed)
    step = SVIStep(model, guide, loss or Trace_ELBO(), lr=lr, engine=engine)
    losses: list[float] = []
    with progress_bar(range(num_steps), progress=progress, desc="SVI") as bar:
        for index in bar:
            if lr_end is not None:
                step.set_lr(scheduled_lr(lr, lr_end, index, num_steps))
            try:
                value = float(step(*args, **kwargs))
            except FloatingPointError as error:
                raise _non_finite(getattr(error, "loss", float("nan")), index) from error
            losses.append(value)
            if index % 50 == 0 or index == num_steps - 1:
                bar.set_postfix(loss=f"{value:.4g}")
    return losses


def _non_finite(value, step: int) -> FloatingPointError:
    """The error :func:`fit` raises when the loss of step ``step`` is ``value`` (NaN, ±inf or "invalid")."""
    if step == 0:
        return FloatingPointError(
            f"the SVI loss is {value} at the first step, before any update: the model cannot "
            "score this data at its initial parameters (check the data and the model's settings)"
        )
    return FloatingPointError(f"SVI loss became {value} at step {step}; try a smaller lr")


def _fit_with_pyro_optim(model, guide, args, kwargs, num_steps, loss, progress, optim) -> list[float]:
    """:func:`fit`'s loop with a Pyro optimizer: Pyro's ``SVI.step``, its scheduler advanced per step."""
    svi = SVI(model, guide, optim, loss or Trace_ELBO())
    losses: list[float] = []
    with progress_bar(range(num_steps), progress=progress, desc="SVI") as bar:
        for step in bar:
            value = svi.step(*args, **kwargs)
            if not math.isfinite(value):
                raise _non_finite(value, step)
            losses.append(value)
            _advance_schedule(optim, value)
            if step % 50 == 0 or step == num_steps - 1:
                bar.set_postfix(loss=f"{value:.4g}")
    return losses
