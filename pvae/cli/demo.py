"""``pvae demo``: run every section in ``DEMO_SECTIONS`` and write ``DIR/report.md``."""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable

from pvae.cli.common import DemoContext, add_common, device_from_args, prepare_out_folder
from pvae.utils import write_atomically

#: Sections of ``pvae demo``, in report order. Each takes a DemoContext and returns Markdown (or "").
DEMO_SECTIONS: list[Callable[[DemoContext], str]] = []  # filled below, next to each family's commands


def register_demo(subparsers) -> None:
    parser = subparsers.add_parser(
        "demo", help="run the main job and write DIR/report.md with tables and figures"
    )
    parser.add_argument("--out", default="report", help="output folder (default: report)")
    parser.add_argument("--quick", action="store_true", help="short version (about a minute)")
    add_common(parser, json_output=False)
    parser.set_defaults(run=_run_demo)


def _run_demo(args) -> int:
    device_from_args(args)
    prepare_out_folder(args.out)
    context = DemoContext(out=args.out, quick=args.quick, device=args.device, seed=args.seed)
    parts = ["# pvae demo report", ""]
    timings = []
    for section in DEMO_SECTIONS:
        start = time.perf_counter()
        print(f"[demo] {section.__name__.removeprefix('demo_')} …", file=sys.stderr, flush=True)
        text = section(context)
        if text:  # a section may have nothing to add (e.g. a long one under --quick)
            parts.append(text)
            timings.append((section.__name__.removeprefix("demo_"), time.perf_counter() - start))
    parts += ["## Timings", "", "| section | seconds |", "| --- | ---: |"]
    parts += [f"| {name} | {seconds:.1f} |" for name, seconds in timings]
    path = write_atomically(
        os.path.join(args.out, "report.md"),
        lambda handle: handle.write("\n".join(parts) + "\n"),
        binary=False,
    )
    print(f"wrote {path}", file=sys.stderr)
    return 0
