"""Helpers shared by the sub-commands: argument types, common options, JSON output, demo context."""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass


# ---- shared helpers ------------------------------------------------------------------------------------
def positive_int(text: str) -> int:
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be a non-negative integer, got {text}")
    return value


def add_common(parser: argparse.ArgumentParser, json_output: bool = True) -> None:
    parser.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: cuda if available)")
    parser.add_argument("--seed", type=non_negative_int, default=0, help="random seed (default 0)")
    if json_output:
        parser.add_argument("--json", action="store_true", help="print only JSON on stdout")


def print_json(payload) -> None:
    json.dump(payload, sys.stdout, indent=2)
    sys.stdout.write("\n")


@dataclass
class DemoContext:
    """What a demo section gets: where to write figures, how long it may take, and on which device."""

    out: str
    quick: bool
    device: str | None
    seed: int
