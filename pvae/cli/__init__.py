"""The ``pvae`` command line: one sub-command per job.

Each sub-command is a ``register_<name>(subparsers)`` function that adds its parser and sets ``run=`` to
the function doing the work: ``toy`` in :mod:`pvae.cli.toy`; ``train``, ``evaluate`` and ``sample`` in
:mod:`pvae.cli.train`, which learn the families from the registry of command-line specs
(:mod:`pvae.cli.commands`: ``register_commands(name, FamilyCommands(...))`` next to each family, the
built-in ones in :mod:`pvae.cli.autoencoders` and :mod:`pvae.cli.diffusion`); ``demo`` in
:mod:`pvae.cli.demo`, which writes the report of :mod:`pvae.report`; ``diagnose`` (k̂, inference gaps,
SBC of a checkpoint's guide) in :mod:`pvae.cli.diagnose`. Commands that print results accept
``--json`` (stdout then carries only JSON; progress bars go to stderr and are silent when stderr is not a
terminal) and ``--device``.

Errors are one line on stderr, ``pvae: error: …``, never a traceback: exit status 2 for a bad argument
(argparse's convention), 1 for a failure at run time (a malformed checkpoint, a diverging run, a file that
cannot be written). ``pvae --debug …`` or the environment variable ``PVAE_DEBUG=1`` shows the traceback.
"""

from __future__ import annotations

import argparse
import os
import sys

from pvae.cli.commands import FamilyCommands, RunData, register_commands, registered_commands
from pvae.cli.common import UsageError
from pvae.cli.demo import register_demo
from pvae.cli.diagnose import register_diagnose
from pvae.cli.toy import register_toy
from pvae.cli.train import register_evaluate, register_sample, register_train

__all__ = ["FamilyCommands", "RunData", "build_parser", "main", "register_commands", "registered_commands"]

_REGISTRARS = [
    register_demo,
    register_toy,
    register_train,
    register_evaluate,
    register_sample,
    register_diagnose,
]


class _Parser(argparse.ArgumentParser):
    """argparse, with its errors as one line (``pvae: error: …``, exit 2) instead of usage + message."""

    def error(self, message: str):
        self.exit(2, f"pvae: error: {self.prog}: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="pvae",
        description="Latent-variable generative models as Pyro model/guide pairs: exact toys, a one-hot "
        "mixture, autoencoders, VAEs and diffusion, fitted by SVI.",
    )
    parser.add_argument(
        "--debug", action="store_true", help="show the traceback of an error (or set PVAE_DEBUG=1)"
    )
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for register in _REGISTRARS:
        register(subparsers)
    return parser


def _one_line(error: BaseException) -> str:
    """The error as one line: OSErrors as 'what: file', others as their message."""
    if isinstance(error, OSError) and error.strerror:
        where = f": {error.filename}" if error.filename else ""
        text = f"{error.strerror}{where}"
    else:
        text = str(error) or type(error).__name__
    # Pyro's errors name the site on the first line and give the reason on the next: keep both
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    text = " ".join(" ".join(lines[:2]).split())
    return text if len(text) <= 500 else text[:497] + "…"


# What a user's input or machine can cause; anything else is reported as unexpected, with its type.
_EXPECTED = (ValueError, TypeError, OSError, FloatingPointError, MemoryError)


def _process() -> str:
    """``"process R: "`` in a job of several processes started by torchrun (the failing rank), else ``""``."""
    rank, world = os.environ.get("RANK", ""), os.environ.get("WORLD_SIZE", "")
    return f"process {rank}: " if rank.isdigit() and world.isdigit() and int(world) > 1 else ""


def main(argv: list[str] | None = None) -> int:
    """Run ``pvae`` with ``argv`` (default: the process's arguments); returns the exit status."""
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as exit_request:  # argparse: --help (0) or a bad argument (2, one line printed)
        return int(exit_request.code or 0)
    debug = args.debug or os.environ.get("PVAE_DEBUG", "") not in ("", "0")
    try:
        return int(args.run(args) or 0)
    except KeyboardInterrupt:
        if debug:
            raise
        print("pvae: interrupted", file=sys.stderr)
        return 130
    except Exception as error:  # the command line's boundary: one line, never a traceback
        if debug:
            raise
        message = _one_line(error)
        if not isinstance(error, _EXPECTED):
            message = f"{message} (an unexpected {type(error).__name__}; pvae --debug shows where)"
        print(f"pvae: error: {_process()}{message}", file=sys.stderr)
        return 2 if isinstance(error, UsageError) else 1
