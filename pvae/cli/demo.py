"""``pvae demo``: run every section of the report (:mod:`pvae.report`) and write ``DIR/report.md``."""

from __future__ import annotations

import sys

from pvae.cli.common import add_common, device_from_args, prepare_out_folder


def register_demo(subparsers) -> None:
    parser = subparsers.add_parser(
        "demo", help="run the main job and write DIR/report.md with tables and figures"
    )
    parser.add_argument("--out", default="report", help="output folder (default: report)")
    parser.add_argument("--quick", action="store_true", help="short version (about a minute)")
    add_common(parser, json_output=False)
    parser.set_defaults(run=_run_demo)


def _run_demo(args) -> int:
    from pvae.report import ReportContext, write_report

    device_from_args(args)
    prepare_out_folder(args.out)
    context = ReportContext(out=args.out, quick=args.quick, device=args.device, seed=args.seed)
    print(f"wrote {write_report(context)}", file=sys.stderr)
    return 0
