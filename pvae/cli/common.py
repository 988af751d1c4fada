"""Helpers shared by the sub-commands: argument types, common options, JSON output, demo context."""

from __future__ import annotations

import argparse
import json
import os
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


# ---- the training flow shared by `pvae train` for every family -------------------------------------------
def start_run(args, default_out: str):
    """Resolve ``--device``, create the output folder (``--out`` or ``default_out``) and seed everything.

    Returns ``(device, out)``."""
    from pvae.utils import resolve_device, seed_everything

    device = resolve_device(args.device)
    out = args.out or default_out
    os.makedirs(out, exist_ok=True)
    seed_everything(args.seed)
    return device, out


def train_and_record(family, args, train_loader, test_loader, out: str, metadata: dict, **options):
    """Train ``family`` with the options every family shares (epochs, objective, learning rate and its
    decay, seed, progress, checkpoint in ``out`` and ``--resume``), write ``out/history.json`` and switch the
    family to evaluation mode. ``metadata`` joins the checkpoint's record of the data; ``options`` go to
    :func:`pvae.inference.train`. Returns ``(history, checkpoint path)``."""
    from pvae.inference import train

    checkpoint = os.path.join(out, "checkpoint.pt")
    history = train(
        family,
        train_loader,
        test_loader,
        epochs=args.epochs,
        objective=args.objective,
        lr=args.lr,
        lr_end=args.lr_end,
        checkpoint=checkpoint,
        resume=args.resume,
        seed=args.seed,
        progress=not args.json,
        metadata={"dataset": args.dataset, "data_root": args.data_root, "batch_size": args.batch_size}
        | metadata,
        **options,
    )
    with open(os.path.join(out, "history.json"), "w") as handle:
        json.dump(history.to_dict(), handle)
    family.eval()
    return history, checkpoint


def run_summary(history, checkpoint: str, pictures: dict, **fields) -> dict:
    """The JSON summary of a training run: ``fields`` first, then what every family reports."""
    import statistics

    return fields | {
        "epochs": history.epochs,
        "objective": history.objective,
        "median_epoch_seconds": float(statistics.median(history.epoch_seconds)),
        "checkpoint": checkpoint,
        "pictures": pictures,
    }


@dataclass
class DemoContext:
    """What a demo section gets: where to write figures, how long it may take, and on which device."""

    out: str
    quick: bool
    device: str | None
    seed: int
