"""The ``pvae`` command line: one sub-command per job; the only module that knows every family.

Each sub-command is a ``_register_<name>(subparsers)`` function that adds its parser and sets
``run=`` to the function doing the work. Commands that print results accept ``--json`` (stdout then
carries only JSON; progress bars go to stderr and are silent when stderr is not a terminal) and
``--device``. ``pvae demo`` runs every section in ``DEMO_SECTIONS`` and writes ``DIR/report.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass

__all__ = ["DEMO_SECTIONS", "DemoContext", "build_parser", "main"]


# ---- shared helpers ------------------------------------------------------------------------------------
def _positive_int(text: str) -> int:
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def _non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be a non-negative integer, got {text}")
    return value


def _add_common(parser: argparse.ArgumentParser, json_output: bool = True) -> None:
    parser.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: cuda if available)")
    parser.add_argument("--seed", type=_non_negative_int, default=0, help="random seed (default 0)")
    if json_output:
        parser.add_argument("--json", action="store_true", help="print only JSON on stdout")


def _print_json(payload) -> None:
    json.dump(payload, sys.stdout, indent=2)
    sys.stdout.write("\n")


# ---- demo ----------------------------------------------------------------------------------------------
@dataclass
class DemoContext:
    """What a demo section gets: where to write figures, how long it may take, and on which device."""

    out: str
    quick: bool
    device: str | None
    seed: int


#: Sections of ``pvae demo``, in report order. Each takes a DemoContext and returns Markdown.
DEMO_SECTIONS: list[Callable[[DemoContext], str]] = []


def _register_demo(subparsers) -> None:
    parser = subparsers.add_parser(
        "demo", help="run the main job and write DIR/report.md with tables and figures"
    )
    parser.add_argument("--out", default="report", help="output folder (default: report)")
    parser.add_argument("--quick", action="store_true", help="short version (about a minute)")
    _add_common(parser, json_output=False)
    parser.set_defaults(run=_run_demo)


def _run_demo(args) -> int:
    os.makedirs(args.out, exist_ok=True)
    context = DemoContext(out=args.out, quick=args.quick, device=args.device, seed=args.seed)
    parts = ["# pvae demo report", ""]
    timings = []
    for section in DEMO_SECTIONS:
        start = time.perf_counter()
        print(f"[demo] {section.__name__.removeprefix('_demo_')} …", file=sys.stderr, flush=True)
        parts.append(section(context))
        timings.append((section.__name__.removeprefix("_demo_"), time.perf_counter() - start))
    parts += ["## Timings", "", "| section | seconds |", "| --- | ---: |"]
    parts += [f"| {name} | {seconds:.1f} |" for name, seconds in timings]
    path = os.path.join(args.out, "report.md")
    with open(path + ".tmp", "w") as handle:
        handle.write("\n".join(parts) + "\n")
    os.replace(path + ".tmp", path)
    print(f"wrote {path}", file=sys.stderr)
    return 0


# ---- entry point ---------------------------------------------------------------------------------------
_REGISTRARS = [_register_demo]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pvae", description=__doc__.splitlines()[0])
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for register in _REGISTRARS:
        register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.run(args) or 0)
    except (ValueError, FileNotFoundError) as error:
        print(f"pvae {args.command}: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
