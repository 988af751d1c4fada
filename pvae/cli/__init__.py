"""The ``pvae`` command line: one sub-command per job; the only package that knows every family.

Each sub-command is a ``register_<name>(subparsers)`` function that adds its parser and sets ``run=`` to
the function doing the work: ``toy`` in :mod:`pvae.cli.toy`; ``train``, ``evaluate`` and ``sample`` in
:mod:`pvae.cli.train` (a family other than the autoencoders adds its options and handles its checkpoints
in its own module, e.g. :mod:`pvae.cli.diffusion`); ``demo`` in :mod:`pvae.cli.demo`, which runs every
section of ``DEMO_SECTIONS`` and writes ``DIR/report.md``. Commands that print results accept ``--json``
(stdout then carries only JSON; progress bars go to stderr and are silent when stderr is not a terminal)
and ``--device``.
"""

from __future__ import annotations

import argparse
import sys

from pvae.cli.common import DemoContext
from pvae.cli.demo import DEMO_SECTIONS, register_demo
from pvae.cli.diffusion import demo_diffusion, demo_diffusion_digits
from pvae.cli.toy import demo_mixture, demo_toy, register_toy
from pvae.cli.train import demo_autoencoders, register_evaluate, register_sample, register_train

__all__ = ["DEMO_SECTIONS", "DemoContext", "build_parser", "main"]

DEMO_SECTIONS += [demo_toy, demo_mixture, demo_autoencoders, demo_diffusion, demo_diffusion_digits]
_REGISTRARS = [register_demo, register_toy, register_train, register_evaluate, register_sample]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pvae",
        description="Latent-variable generative models as Pyro model/guide pairs: exact toys, a one-hot "
        "mixture, autoencoders, VAEs and diffusion, fitted by SVI.",
    )
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for register in _REGISTRARS:
        register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.run(args) or 0)
    except (ValueError, FileNotFoundError, FloatingPointError) as error:
        print(f"pvae {args.command}: error: {error}", file=sys.stderr)
        return 2
