"""A family's command-line face, declared once: what ``pvae train NAME``, ``pvae evaluate`` and
``pvae sample`` need to know about it.

A family registered with ``@pvae.register_family("name")`` becomes a command-line family when a
:class:`FamilyCommands` is registered for the same name with :func:`register_commands`, next to the family
(the built-in ones in :mod:`pvae.cli.autoencoders` and :mod:`pvae.cli.diffusion`; a user's in their own
module, imported before :func:`pvae.cli.main` runs). ``pvae train`` then has a sub-command for it with the
flags every family shares (epochs, batch size, learning rate and its decay, objective, seed, device,
``--out``, ``--resume``/``--overwrite``/``--allow-changes``, ``--json``) plus its own; its checkpoints are
evaluated and sampled through the same spec.

The flow of ``pvae train NAME`` (:mod:`pvae.cli.train`): check the flags and the output folder; seed;
``data(args, device)`` → :class:`RunData`; ``config(args, data)`` → constructor arguments, built by
:func:`pvae.family.build_family` (checked against the family's config, sized before allocation);
``first_stage(...)`` when the family has one; :func:`pvae.inference.train` with ``train_options(args)``;
``pictures(...)``; a JSON summary or ``describe(...)``.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

__all__ = ["FamilyCommands", "RunData", "register_commands", "registered_commands"]


@dataclass
class RunData:
    """The data of one training run.

    :param train_loader: batches for training (re-iterated every epoch).
    :param test_loader: batches for the per-epoch test objective, or None.
    :param metadata: plain data recorded in the checkpoint's ``train_config`` (what a resumed run must
        match, and what ``evaluate``/``sample`` may read back, checked).
    :param test_data: what ``pictures`` draws from (e.g. the test tensor), family-specific.
    :param extra: anything else the family's functions pass along.
    """

    train_loader: Iterable
    test_loader: Iterable | None
    metadata: dict[str, Any] = field(default_factory=dict)
    test_data: Any = None
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class FamilyCommands:
    """The command-line spec of one registered family.

    :param help: one line for ``pvae train --help``.
    :param add_arguments: adds the family's own ``pvae train NAME`` flags (data set, sizes, …).
    :param data: ``(args, device) -> RunData``.
    :param config: ``(args, data) -> dict`` of constructor arguments for the registered family.
    :param objectives: the ``--objective`` choices (the first is the default).
    :param train_options: ``args -> dict`` of further :func:`pvae.inference.train` keywords (engine, …).
    :param pictures: ``(family, data, history, out, args) -> {name: path}`` drawn after training.
    :param summary: ``(family, data, history, args) -> dict`` of fields for the JSON summary.
    :param describe: ``(family, data, history, summary, args) -> str``: the text printed without --json.
    :param evaluate: ``(args, family, checkpoint) -> (payload, text)`` for ``pvae evaluate``; None if the
        family has no evaluation.
    :param add_evaluate_arguments: adds flags to ``pvae evaluate`` (grouped under the family's name).
    :param sample: ``(args, family, checkpoint) -> path`` for ``pvae sample``; None if it cannot sample.
    :param cannot_sample: why ``pvae sample`` refuses the family (when ``sample`` is None).
    :param add_sample_arguments: adds flags to ``pvae sample`` (grouped under the family's name).
    :param threads: ``args -> int | None``: intra-op threads for the run (None: torch's default).
    :param first_stage: ``(family, args, data, out) -> None`` run before the main training run, e.g. a
        warm start trained and checkpointed in a folder of its own (the latent diffusion model's
        autoencoder); None for families trained in one run.
    :param test_data: ``(args, family, checkpoint) -> (N, ...) tensor``: the checkpoint's test data on the
        family's device, read as ``evaluate`` reads them (``args.num_test``, else as trained;
        ``args.data_root``, ``args.download``); ``pvae diagnose`` computes k̂ and the inference gaps on them.
        None: ``diagnose`` refuses ``--khat``/``--gaps`` for the family (``--sbc`` needs no test data).
    """

    help: str
    add_arguments: Callable[[argparse.ArgumentParser], None]
    data: Callable[..., RunData]
    config: Callable[..., dict]
    objectives: tuple[str, ...] = ("elbo",)
    train_options: Callable[[argparse.Namespace], dict] | None = None
    pictures: Callable[..., dict[str, str]] | None = None
    summary: Callable[..., dict] | None = None
    describe: Callable[..., str] | None = None
    evaluate: Callable[..., tuple[dict, str]] | None = None
    add_evaluate_arguments: Callable[[Any], None] | None = None
    sample: Callable[..., str] | None = None
    cannot_sample: str = "it has no proper prior to sample from"
    add_sample_arguments: Callable[[Any], None] | None = None
    threads: Callable[[argparse.Namespace], int | None] | None = None
    first_stage: Callable[..., None] | None = None
    test_data: Callable[..., Any] | None = None


_COMMANDS: dict[str, FamilyCommands] = {}


def register_commands(name: str, commands: FamilyCommands) -> FamilyCommands:
    """Give the family registered as ``name`` its command-line face (replacing an earlier one)."""
    from pvae.family import family_class

    family_class(name)  # the family must be registered first: a ValueError names the registered ones
    if not isinstance(commands, FamilyCommands):
        raise TypeError(
            f"register_commands({name!r}, ...) takes a FamilyCommands, got {type(commands).__name__}"
        )
    _COMMANDS[name] = commands
    return commands


def registered_commands() -> dict[str, FamilyCommands]:
    """Registered name → :class:`FamilyCommands`, the built-in families' included."""
    from pvae.cli import autoencoders, diffusion, latent_diffusion  # noqa: F401 — built-in specs register

    return dict(_COMMANDS)
