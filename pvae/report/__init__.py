"""The report of ``pvae demo``: sections that train, measure and draw, assembled into ``DIR/report.md``.

A section is a function ``section(context) -> str`` returning Markdown (or "" when it has nothing to add,
e.g. a long run under ``quick``), registered with ``@report_section(order)`` where it is defined; the
report runs them by ``order``. Every number
in a section's prose comes from the run that writes the report.

Sections, in report order: the exact families (:mod:`pvae.report.exact`: the toy, then
:mod:`pvae.report.diagnostics` on its guides, then the mixture), the
autoencoders (:mod:`pvae.report.autoencoders`), the diffusion model (:mod:`pvae.report.diffusion`:
two moons, and digits in the full report) and latent diffusion (:mod:`pvae.report.latent_diffusion`,
full report only). The modules also hold the pictures the command line draws
after training.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass

__all__ = ["SECTIONS", "DemoContext", "ReportContext", "report_section", "sections", "write_report"]


@dataclass
class ReportContext:
    """What a section gets: where to write figures, how long it may take, and on which device."""

    out: str
    quick: bool
    device: str | None
    seed: int


DemoContext = ReportContext  # the name the command line has always used

#: Registered sections as ``(order, section)``; :func:`sections` gives them in report order.
SECTIONS: list[tuple[float, Callable[[ReportContext], str]]] = []


def report_section(order: float):
    """Decorator: register a section at position ``order`` of the report (smaller first)."""

    def register(section: Callable[[ReportContext], str]) -> Callable[[ReportContext], str]:
        SECTIONS.append((order, section))
        return section

    return register


def sections() -> list[Callable[[ReportContext], str]]:
    """Every registered section (the built-in ones included), in report order."""
    # the built-in sections register on import
    from pvae.report import autoencoders, diagnostics, diffusion, exact, latent_diffusion  # noqa: F401

    return [section for _, section in sorted(SECTIONS, key=lambda entry: entry[0])]


def write_report(context: ReportContext) -> str:
    """Run every section and write ``context.out/report.md`` (atomically); returns its path."""
    from pvae.utils import write_atomically

    parts = ["# pvae demo report", ""]
    timings = []
    for section in sections():
        start = time.perf_counter()
        print(f"[demo] {section.__name__} …", file=sys.stderr, flush=True)
        text = section(context)
        if text:
            parts.append(text)
            timings.append((section.__name__, time.perf_counter() - start))
    parts += ["## Timings", "", "| section | seconds |", "| --- | ---: |"]
    parts += [f"| {name} | {seconds:.1f} |" for name, seconds in timings]
    report = "\n".join(parts) + "\n"
    path = os.path.join(context.out, "report.md")
    return write_atomically(path, lambda handle: handle.write(report), binary=False)
