"""Training a family by SVI over a data loader: epochs, Adam, test ELBO, atomic checkpoints, exact resume.

:func:`train` is generic: it needs a family (an ``nn.Module`` with ``model``/``guide``, or a
``svi_program(objective) -> (model, guide, elbo)`` method for pairs trained on another objective, e.g. a
diffusion model's time-subsampled pair; a family that trains some other objective than the one asked for
returns ``(model, guide, elbo, name)`` and the history names what trained) and a loader yielding ``x`` or
``(x, labels)``. Every step computes Pyro's own ELBO for the pair (:class:`~pvae.inference.step.SVIStep`);
``engine="trace"``/``"compile"`` replay a recorded graph of that same computation.

Reported numbers are in **nats per datum**: the train ELBO of an epoch is −(Σ step losses)/(Σ batch sizes)
over its steps (parameters move during the epoch, as usual), the test ELBO the same objective evaluated on
the test loader without gradients after the epoch.

Learning rate: constant by default; with ``lr_end`` it decays geometrically per optimizer step, step k of
S = epochs × len(train_loader) (k = 0 … S − 1, counted over the whole run) following
:func:`pvae.inference.scheduled_lr`, the schedule :func:`pvae.inference.fit` uses too:

    lr_k = lr · (lr_end / lr)^{k / (S − 1)},

so the first step uses ``lr`` and the last ``lr_end`` (exponential decay by a constant factor per step).

Resuming: a checkpoint is written atomically after every epoch (after the test evaluation), holding the
family, the optimizer with its step count (hence the schedule's position), Python/NumPy/torch/CUDA
generator states and the training loader's generator. A run resumed from it replays the remaining epochs
exactly as the uninterrupted run would have (bit for bit on CPU with the eager or trace engine, with or
without ``lr_end``), wherever the interruption happened within the next epoch. (The test loader's own
state is not saved: give it ``shuffle=False`` for test ELBOs that match too.)

Several processes (``torchrun``, after :func:`pvae.inference.distributed.setup`): the loaders' batches are
*global* batches, split over the ranks (:mod:`pvae.inference.distributed` explains the scaling that makes
the ranks' average the one-process loss); the batch size must be divisible by the number of processes. The
test ELBO is summed over the ranks' shares. Rank 0 alone writes the checkpoint (the family's own state, as
one process saves it) and shows progress; every rank reads a resumed run from rank 0's file. Draws inside
a step come from per-rank streams re-seeded every epoch (:func:`~pvae.inference.distributed.rank_seed`), so
a run resumed under the same number of processes replays the uninterrupted one, and one resumed under
another number visits the same global batches.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field

import torch
from pyro.infer.elbo import ELBO

from pvae.checkpoint import (
    capture_rng_state,
    load_checkpoint,
    param_renamer,
    restore_family,
    restore_rng_state,
    save_checkpoint,
)
from pvae.checks import check_choice, check_int, check_positive
from pvae.inference import distributed
from pvae.inference.objectives import make_elbo
from pvae.inference.step import ENGINES, SVIStep
from pvae.inference.svi import scheduled_lr
from pvae.utils import progress_bar, resolve_device, seed_everything

__all__ = ["History", "batch_data", "scheduled_lr", "train"]


@dataclass
class History:
    """Per-epoch record of a training run (JSON-serializable with :meth:`to_dict`).

    ``train_elbo``/``test_elbo``: nats per datum after each epoch (for a non-ELBO objective such as a
    diffusion model's L_simple, minus that objective); ``epoch_seconds``: wall time of each epoch's training
    pass; ``eval_seconds``: of its test evaluation; ``step_losses``: the loss per datum of every step;
    ``objective``: the objective that trained the latest epochs (as the family's ``svi_program`` names it,
    when it has one); ``changes``: settings changed when the run was
    resumed (``train(..., allow_changes=True)``), each ``{"epoch": first epoch under the new settings,
    setting: [old, new], …}``.
    """

    objective: str = "elbo"
    train_elbo: list[float] = field(default_factory=list)
    test_elbo: list[float] = field(default_factory=list)
    epoch_seconds: list[float] = field(default_factory=list)
    eval_seconds: list[float] = field(default_factory=list)
    step_losses: list[float] = field(default_factory=list)
    changes: list[dict] = field(default_factory=list)

    @property
    def epochs(self) -> int:
        """Number of completed epochs."""
        return len(self.train_elbo)

    def to_dict(self) -> dict:
        """Plain lists and strings (for JSON and checkpoints)."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> History:
        """Inverse of :meth:`to_dict`."""
        return cls(**{key: list(value) if isinstance(value, list) else value for key, value in data.items()})


def batch_data(batch) -> torch.Tensor:
    """The data tensor of a loader's batch: ``x`` itself, or the first entry of ``(x, labels)``."""
    if isinstance(batch, list | tuple):
        if not batch:
            raise ValueError("the loader yielded an empty batch")
        batch = batch[0]
    if not isinstance(batch, torch.Tensor):
        raise ValueError(f"the loader must yield tensors x or (x, labels), got {type(batch).__name__}")
    return batch


# Settings a resumed run must share with the saved one (unless allow_changes): they change what is being
# optimized or on what data. The engine, jit and the epoch count change neither.
_RESUME_SETTINGS = ("objective", "lr", "lr_end", "num_particles")


def _setting_changes(saved: dict, current: dict) -> dict[str, list]:
    """Settings whose saved value differs from the current one: name → [saved, current]."""
    keys = [key for key in current if key in _RESUME_SETTINGS or key not in _RUN_SETTINGS]
    return {key: [saved.get(key), current[key]] for key in keys if saved.get(key) != current[key]}


_RUN_SETTINGS = (
    "objective",
    "lr",
    "lr_end",
    "total_steps",
    "epochs",
    "num_particles",
    "jit",
    "engine",
    "seed",
)


def _loader_generator(loader) -> torch.Generator | None:
    generator = getattr(loader, "generator", None)
    return generator if isinstance(generator, torch.Generator) else None


def _program(family, objective, num_particles: int, jit: bool):
    """(model, guide, training ELBO, evaluation ELBO, name of the objective that trains) for the family.

    A family with ``svi_program(objective)`` hands over its own pair and loss: ``(model, guide, elbo)``
    when it trains the objective asked for, or ``(model, guide, elbo, name)`` naming the objective it
    trains instead; the history records that name.
    """
    svi_program = getattr(family, "svi_program", None)  # declared by pvae.Family; None: model/guide
    program = svi_program(objective) if callable(svi_program) else None
    if program is not None:
        if not isinstance(program, tuple) or len(program) not in (3, 4):
            raise ValueError(
                f"{type(family).__name__}.svi_program must return (model, guide, elbo) or "
                f"(model, guide, elbo, objective name), got {type(program).__name__}"
            )
        model, guide, elbo = program[:3]
        name = program[3] if len(program) == 4 else _objective_name(objective)
        if not isinstance(name, str) or not name:
            raise ValueError(
                f"{type(family).__name__}.svi_program must name the objective it trains by a non-empty "
                f"string, got {name!r}"
            )
        return model, guide, elbo, elbo, name
    elbo = make_elbo(objective, num_particles=num_particles, jit=jit)
    # Pyro's jitted ELBOs freeze batch shapes: evaluate test batches with the plain ELBO of the same kind.
    evaluation = make_elbo(objective, num_particles=num_particles) if jit else elbo
    return family.model, family.guide, elbo, evaluation, _objective_name(objective)


def _objective_name(objective) -> str:
    """A named objective's name, or the class name of a Pyro ELBO instance (e.g. ``"Trace_ELBO"``)."""
    return objective if isinstance(objective, str) else type(objective).__name__


@torch.no_grad()
def _evaluate(elbo: ELBO, model, guide, loader: Iterable, device: torch.device) -> float:
    """The objective's loss per datum over a loader (no gradients); with several processes, each scores its
    share of every batch and the totals are summed."""
    total, count = 0.0, 0
    world, rank = distributed.world_size(), distributed.rank()
    for batch in loader:
        x = batch_data(batch)
        if world > 1:
            x = distributed.shard(x, rank, world)
            if x is None:
                continue
        x = x.to(device)
        try:
            total += float(elbo.loss(model, guide, x))
        except ValueError as error:  # a distribution's parameter out of its support: the run diverged
            first_line = str(error).split("\n", 1)[0]
            if not first_line.startswith("Expected parameter"):
                raise
            raise FloatingPointError(
                f"training diverged: the test objective has an invalid distribution parameter "
                f"({first_line[:160]}…); try a smaller lr"
            ) from None
        count += x.shape[0]
    if world > 1:
        total, count = distributed.all_reduce_sum([total, count], device).tolist()
    if count == 0:
        raise ValueError("test_loader yielded no data")
    return total / count


def _check_shardable(loader, world: int) -> None:
    """Several processes need the same global batches on every rank: a batch size divisible by the number
    of processes, and a loader whose shuffling does not draw from the (per-rank) global generator."""
    batch_size = getattr(loader, "batch_size", None)
    if isinstance(batch_size, int) and batch_size % world:
        raise ValueError(
            f"batch size {batch_size} is the global batch, split over {world} processes: it must be a "
            f"multiple of {world}"
        )
    sampler = getattr(loader, "sampler", None)
    if isinstance(sampler, torch.utils.data.RandomSampler) and sampler.generator is None:
        raise ValueError(
            "with several processes a shuffling DataLoader needs generator=torch.Generator() seeded alike on "
            "every rank (or use pvae.data.BatchLoader), so that every rank sees the same global batches"
        )


def train(
    family,
    train_loader: Iterable,
    test_loader: Iterable | None = None,
    *,
    epochs: int,
    objective: str | ELBO = "elbo",
    lr: float = 1e-3,
    lr_end: float | None = None,
    device: str | torch.device | None = None,
    checkpoint: str | os.PathLike | None = None,
    resume: bool = False,
    overwrite: bool = False,
    allow_changes: bool = False,
    seed: int | None = None,
    progress: bool = True,
    jit: bool = False,
    num_particles: int = 1,
    engine: str = "eager",
    adam_kwargs: dict | None = None,
    compile_options: dict | None = None,
    metadata: dict | None = None,
    callback: Callable[[int, History], None] | None = None,
) -> History:
    """Fit a family by SVI with Adam for a number of epochs over ``train_loader``.

    :param family: an ``nn.Module`` with ``model(x)``/``guide(x)`` (a :class:`pvae.family.Family`), or with
        ``svi_program(objective) -> (model, guide, elbo)`` (or ``(model, guide, elbo, name)`` when it trains
        another objective than the one asked for, named ``name``). If it has ``after_step()``, that is
        called after every optimizer step (e.g. an exponential moving average of weights).
    :param train_loader: iterable of ``x`` or ``(x, labels)`` batches, re-iterated every epoch
        (:class:`pvae.data.BatchLoader` is the fast choice); batches are moved to the family's device.
    :param test_loader: optional; the objective is evaluated on it after every epoch.
    :param epochs: total number of epochs (a resumed run continues up to this number).
    :param objective: ``"elbo"`` (Trace_ELBO), ``"meanfield"`` (TraceMeanField_ELBO, analytic KL),
        ``"iwae"`` (IWAE-k with k = ``num_particles``), or a Pyro ELBO instance.
    :param lr: Adam learning rate (of the first step, with ``lr_end``).
    :param lr_end: if given (> 0), the rate decays geometrically per step from ``lr`` to ``lr_end`` at the
        run's last step (the module docstring has the formula); needs a loader with ``len()``. A resumed run
        continues the schedule from the saved step count.
    :param device: move the family there first (``"cpu"``, ``"cuda"``); default: where it already is.
    :param checkpoint: file to write after every epoch (atomically); needed for ``resume``. An existing
        file is never replaced unless ``resume`` or ``overwrite`` says so.
    :param resume: continue from ``checkpoint`` if it exists (else start afresh). The saved run must have
        the same family config and the same settings (objective, lr, lr_end, num_particles and every
        ``metadata`` entry, e.g. the data set and batch size), unless ``allow_changes``.
    :param overwrite: start afresh even though ``checkpoint`` exists (it is replaced after the first epoch).
    :param allow_changes: resume although settings differ; the differences are recorded in
        ``History.changes`` and the history names the new objective from then on.
    :param seed: seeds Python, NumPy, torch and Pyro before training (a resumed run restores the states
        saved in the checkpoint instead).
    :param progress: tqdm bar with the running loss per datum (stderr, only on a terminal).
    :param jit: use Pyro's ``JitTrace_ELBO``/``JitTraceMeanField_ELBO`` (TorchScript-traced loss).
    :param num_particles: k of IWAE-k; for the ELBOs, samples averaged per step.
    :param engine: ``"eager"``, ``"trace"`` (replay a recorded graph of the step) or ``"compile"`` (that
        graph compiled by Inductor); see :mod:`pvae.inference.step`.
    :param adam_kwargs: further ``torch.optim.Adam`` arguments.
    :param compile_options: for ``engine="compile"``, Inductor's ``mode`` and ``options`` as ``torch.compile``
        takes them (:data:`pvae.inference.step.COMPILE_OPTIONS`).
    :param metadata: plain data stored with the run's settings in the checkpoint (e.g. the data set used).
    :param callback: called as ``callback(epoch, history)`` after each epoch (1-based, after its checkpoint),
        e.g. to print progress, stop early (by raising), or interleave other work. With several processes
        it is called on every one: write files only where
        :func:`pvae.inference.distributed.is_main_process`, and stop early on all of them alike.
    :returns: the :class:`History` of all epochs (including those before a resume).
    :raises FloatingPointError: when the loss becomes NaN/inf; names the epoch and step, and leaves the
        last good checkpoint in place.
    :raises ValueError: for bad arguments, an existing ``checkpoint`` without ``resume``/``overwrite``, a
        resume whose settings differ (the message lists them) or that has nothing left to train, and an
        empty ``train_loader``; :class:`~pvae.checkpoint.CheckpointError` (a ``ValueError``) for a malformed
        checkpoint.
    """
    epochs = check_int("epochs", epochs)
    check_choice("engine", engine, ENGINES)
    world, rank = distributed.world_size(), distributed.rank()
    if world > 1:
        if jit:
            raise ValueError("jit=True (Pyro's JitTrace_ELBO) runs in one process; with several use engine=")
        _check_shardable(train_loader, world)
        if seed is None:  # every rank needs the same seed to derive its streams from
            seed = int(distributed.from_main_process(lambda: int(torch.randint(2**62, ()))))
        progress = progress and rank == 0
    if jit and engine != "eager":
        raise ValueError(f"jit=True (Pyro's JitTrace_ELBO) runs with engine='eager', not engine={engine!r}")
    if resume and checkpoint is None:
        raise ValueError("resume=True needs checkpoint= (the file to resume from)")
    if resume and overwrite:
        raise ValueError("resume=True and overwrite=True contradict each other: choose one")
    if (
        checkpoint is not None
        and not resume
        and not overwrite
        and distributed.from_main_process(lambda: os.path.exists(checkpoint))
    ):
        raise ValueError(
            f"checkpoint {os.fspath(checkpoint)} already exists: pass resume=True to continue that run or "
            "overwrite=True to replace it"
        )
    lr_end = None if lr_end is None else check_positive("lr_end (the last step's rate, or None)", lr_end)
    if lr_end is not None and not hasattr(train_loader, "__len__"):
        raise ValueError("lr_end needs a train_loader with len() (the schedule spans epochs × len(loader))")
    steps_per_epoch = len(train_loader) if lr_end is not None else None
    if device is not None:
        family.to(resolve_device(device))
    device = family.device
    if seed is not None:
        seed_everything(seed)

    model, guide, elbo, evaluation_elbo, objective_name = _program(family, objective, num_particles, jit)
    after_step = getattr(family, "after_step", None)
    step = SVIStep(
        model,
        guide,
        elbo,
        lr=lr,
        engine=engine,
        module=family,
        after_step=after_step if callable(after_step) else None,
        adam_kwargs=adam_kwargs,
        compile_options=compile_options,
    )
    history = History(objective=objective_name)
    train_config = {
        "objective": history.objective,
        "lr": float(lr),
        "lr_end": lr_end,
        "total_steps": epochs * steps_per_epoch if steps_per_epoch is not None else None,
        "epochs": epochs,
        "num_particles": int(num_particles),
        "jit": bool(jit),
        "engine": engine,
        "seed": seed,
        **(metadata or {}),
    }
    start_epoch = 0
    if world > 1:
        distributed.broadcast_module(family)  # every rank starts from rank 0's family
    if resume and distributed.from_main_process(lambda: os.path.isfile(checkpoint)):
        saved = distributed.from_main_process(lambda: load_checkpoint(checkpoint))
        source = os.fspath(checkpoint)
        changes = _setting_changes(saved["train_config"], train_config)
        if changes and not allow_changes:
            listed = "; ".join(f"{key}: saved {old!r}, now {new!r}" for key, (old, new) in changes.items())
            raise ValueError(
                f"resuming {source} with other settings than the saved run ({listed}); use the saved "
                "settings, or allow the change explicitly (allow_changes=True, pvae train --allow-changes)"
            )
        restore_family(family, saved, device=device)
        start_epoch = saved["epoch"]
        if start_epoch >= epochs:
            raise ValueError(
                f"nothing left to train: {source} already holds {start_epoch} epoch(s) and the run asks for "
                f"{epochs} in all; ask for more epochs to continue it"
            )
        rename = param_renamer(saved["family"]["prefix"], family.name)
        step.load_state_dict(saved["optimizer"] or {}, rename=rename, source=source)
        if saved["rng"] is not None:
            restore_rng_state(saved["rng"])
        generator = _loader_generator(train_loader)
        if generator is not None and saved["loader"] is not None:
            if generator.device.type != "cpu":
                raise ValueError("resuming needs a train_loader whose generator lives on the CPU")
            generator.set_state(saved["loader"])
        if saved["history"]:
            history = History.from_dict(saved["history"])
        if changes:
            history.changes.append({"epoch": start_epoch + 1, **changes})
            history.objective = train_config["objective"]
        if not (saved["optimizer"] or {}).get("num_steps") and steps_per_epoch is not None:
            step.num_steps = start_epoch * steps_per_epoch  # a checkpoint from before step counting
    total_steps = train_config["total_steps"]

    for epoch in range(start_epoch, epochs):
        if world > 1:
            seed_everything(distributed.rank_seed(seed, rank, epoch))
        family.train()
        losses: list[torch.Tensor] = []
        sizes: list[int] = []
        started = time.perf_counter()
        total = len(train_loader) if hasattr(train_loader, "__len__") else None
        last_update = started
        description = f"epoch {epoch + 1}/{epochs}"
        with progress_bar(train_loader, progress=progress, total=total, desc=description) as bar:
            for batch in bar:
                x = batch_data(batch)
                size, shares = x.shape[0], {}
                if world > 1:  # this rank's share, scaled to stand for the global batch
                    x = distributed.shard(x, rank, world)
                    if x is None:
                        continue
                    shares = {"num_data": world * x.shape[0]}
                if x.device != device:
                    x = x.to(device, non_blocking=True)
                if total_steps is not None:
                    step.set_lr(scheduled_lr(lr, lr_end, step.num_steps, total_steps))
                try:
                    losses.append(step(x, **shares))
                except FloatingPointError as error:
                    if checkpoint is not None and os.path.exists(checkpoint):
                        kept = f"the last good checkpoint ({os.fspath(checkpoint)}, epoch {epoch}) is kept"
                    else:
                        kept = "no checkpoint was written"
                    detail = str(error).split(";", 1)[0]  # "the loss is nan" or the invalid parameter
                    if step.num_steps == 0:
                        raise FloatingPointError(
                            f"{detail} at the first step, before any update: the model cannot score this "
                            "data at its initial parameters (check the data and the family's settings)"
                        ) from error
                    raise FloatingPointError(
                        f"training diverged at epoch {epoch + 1}, step {len(losses) + 1} of this epoch "
                        f"({detail}); the parameters were not updated and {kept}. Try a smaller lr (now "
                        f"{step.lr:.3g})."
                    ) from error
                sizes.append(size)
                now = time.perf_counter()
                if progress and now - last_update > 0.5:  # the running loss per datum, twice a second
                    recent = max(1, len(losses) // 10)
                    running = torch.stack(losses[-recent:]).sum().item() / sum(sizes[-recent:])
                    bar.set_postfix(loss=f"{running:.2f}")
                    last_update = now
        epoch_seconds = time.perf_counter() - started
        if not losses:
            raise ValueError("train_loader yielded no batches: it needs at least one batch per epoch")
        # a finite loss can still come with non-finite gradients: never evaluate or save such parameters
        if not all(bool(torch.isfinite(p).all()) for p in step.params or ()):
            kept = (
                f"the last good checkpoint ({os.fspath(checkpoint)}) is kept"
                if checkpoint
                else "nothing saved"
            )
            raise FloatingPointError(
                f"training diverged in epoch {epoch + 1}: a parameter became NaN/inf; {kept}. Try a smaller "
                f"lr (now {step.lr:.3g})."
            )
        step_losses = [value / size for value, size in zip(torch.stack(losses).tolist(), sizes)]
        history.step_losses += step_losses
        history.train_elbo.append(-sum(value * size for value, size in zip(step_losses, sizes)) / sum(sizes))
        history.epoch_seconds.append(epoch_seconds)

        if test_loader is not None:
            started = time.perf_counter()
            family.eval()
            history.test_elbo.append(-_evaluate(evaluation_elbo, model, guide, test_loader, device))
            family.train()
            history.eval_seconds.append(time.perf_counter() - started)

        if checkpoint is not None and rank == 0:
            generator = _loader_generator(train_loader)
            save_checkpoint(
                checkpoint,
                family,
                epoch=epoch + 1,
                history=history.to_dict(),
                optimizer=step.state_dict(),
                rng=capture_rng_state(),
                loader=generator.get_state() if generator is not None else None,
                train_config=train_config,
            )
        if callback is not None:
            callback(epoch + 1, history)
    return history
