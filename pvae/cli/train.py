"""``pvae train NAME``, ``pvae evaluate``, ``pvae sample`` for every family with a command-line spec
(:mod:`pvae.cli.commands`): one sub-command of ``train`` per family, evaluation and sampling dispatched
by the family a checkpoint names."""

from __future__ import annotations

import contextlib
import os
import sys

from pvae.cli.commands import registered_commands
from pvae.cli.common import (
    UsageError,
    add_common,
    add_run_options,
    bounded_int,
    check_out_file,
    open_checkpoint,
    positive_float,
    positive_int,
    print_json,
    run_summary,
    start_run,
    train_and_record,
)


def register_train(subparsers) -> None:
    commands = registered_commands()
    parser = subparsers.add_parser(
        "train",
        help=f"train a family ({', '.join(commands)}); writes DIR/checkpoint.pt and pictures",
        description="Train a family by SVI with Adam: per-epoch test objective, checkpoints, pictures.",
    )
    families = parser.add_subparsers(dest="family", required=True, metavar="FAMILY")
    for name, spec in commands.items():
        family_parser = families.add_parser(name, help=spec.help, description=spec.help)
        spec.add_arguments(family_parser)
        _add_training_arguments(family_parser, spec.objectives)
        family_parser.set_defaults(run=_run_train)


def _add_training_arguments(parser, objectives: tuple[str, ...]) -> None:
    """The flags every family's ``pvae train`` shares."""
    group = parser.add_argument_group("training")
    group.add_argument("--epochs", type=positive_int, default=10, help="default 10")
    group.add_argument("--batch-size", type=positive_int, default=128, help="default 128")
    group.add_argument("--lr", type=positive_float, default=1e-3, help="Adam learning rate (default 1e-3)")
    group.add_argument(
        "--lr-end",
        type=positive_float,
        default=None,
        help="decay the learning rate geometrically per step from --lr to this at the last step (default: "
        "constant)",
    )
    group.add_argument(
        "--objective",
        choices=objectives,
        default=objectives[0],
        help=f"default {objectives[0]}: elbo = Trace_ELBO, meanfield = closed-form KLs, iwae = IWAE-k, "
        "simple = a diffusion model's L_simple, hybrid = L_simple + λ·L_vlb for learned variances (neither "
        "is an ELBO)",
    )
    add_run_options(group)
    add_common(group)


def _run_train(args) -> int:
    from pvae.inference import distributed
    from pvae.utils import torch_threads

    spec = registered_commands()[args.family]
    threads = spec.threads(args) if spec.threads is not None else None
    try:
        with torch_threads(threads) if threads else contextlib.nullcontext():
            return _train(args, spec)
    finally:
        distributed.teardown()


def _train(args, spec) -> int:
    from pvae.family import build_family, family_class
    from pvae.inference import distributed

    device, out = start_run(args, os.path.join("runs", args.family))
    data = spec.data(args, device)
    try:
        family = build_family(family_class(args.family), spec.config(args, data)).to(device)
    except ValueError as error:
        raise UsageError(str(error)) from None
    if spec.first_stage is not None:
        spec.first_stage(family, args, data, out)
    options = spec.train_options(args) if spec.train_options is not None else {}
    history, checkpoint = train_and_record(
        family, args, data.train_loader, data.test_loader, out, data.metadata, **options
    )
    if not distributed.is_main_process():
        return 0  # rank 0 draws the pictures and reports
    pictures = spec.pictures(family, data, history, out, args) if spec.pictures is not None else {}
    fields = spec.summary(family, data, history, args) if spec.summary is not None else {}
    summary = run_summary(history, checkpoint, pictures, family=args.family, **fields)
    if args.json:
        print_json(summary)
        return 0
    if spec.describe is not None:
        print(spec.describe(family, data, history, summary, args))
    print(f"checkpoint: {checkpoint}; pictures: {', '.join(pictures.values()) or 'none'}")
    return 0


def register_evaluate(subparsers) -> None:
    parser = subparsers.add_parser(
        "evaluate",
        help="evaluate a trained checkpoint on its test data (log-likelihood ± standard error, or the "
        "family's own measure)",
        description="Evaluate a checkpoint with its family's measure: the VAE's log p(x) by importance "
        "sampling (IWAE-k), the AE/DAE reconstruction error (no marginal likelihood), the DDPM's exact ELBO "
        "and bits per dimension.",
    )
    parser.add_argument("checkpoint", help="a checkpoint.pt written by pvae train")
    parser.add_argument(
        "--num-samples", type=positive_int, default=1000, help="k of the IWAE-k estimate (default 1000)"
    )
    parser.add_argument(
        "--num-test", type=positive_int, default=None, help="test data points (default: as trained)"
    )
    parser.add_argument(
        "--data-root",
        default=None,
        help="folder holding mnist/fashion-mnist files (needed for checkpoints trained on those; never "
        "taken from the checkpoint)",
    )
    parser.add_argument(
        "--download",
        action="store_true",
        help="let torchvision download mnist/fashion-mnist into --data-root",
    )
    for name, spec in registered_commands().items():
        if spec.add_evaluate_arguments is not None:
            spec.add_evaluate_arguments(parser.add_argument_group(f"{name} options"))
    add_common(parser)
    parser.set_defaults(run=_run_evaluate)


def _run_evaluate(args) -> int:
    commands = registered_commands()
    evaluates = tuple(name for name, spec in commands.items() if spec.evaluate is not None)
    checkpoint, family = open_checkpoint(args, evaluates, "evaluate")
    payload, text = commands[checkpoint["family"]["name"]].evaluate(args, family, checkpoint)
    if args.json:
        print_json(payload)
    else:
        print(text)
    return 0


def register_sample(subparsers) -> None:
    parser = subparsers.add_parser(
        "sample", help="draw from a trained family's prior predictive and save a picture"
    )
    parser.add_argument("checkpoint", help="a checkpoint.pt written by pvae train")
    parser.add_argument(
        "-n", "--num", type=bounded_int(1, 100_000), default=64, help="number of samples (default 64)"
    )
    parser.add_argument("--out", required=True, help="destination FILE.png")
    parser.add_argument("--overwrite", action="store_true", help="replace --out (and --chain) if they exist")
    parser.add_argument("--nrow", type=bounded_int(1, 1000), default=8, help="images per row (default 8)")
    for name, spec in registered_commands().items():
        if spec.add_sample_arguments is not None:
            spec.add_sample_arguments(parser.add_argument_group(f"{name} options"))
    add_common(parser, json_output=False)
    parser.set_defaults(run=_run_sample)


def _run_sample(args) -> int:
    check_out_file(args.out, overwrite=args.overwrite)
    if getattr(args, "chain", None):
        check_out_file(args.chain, "--chain", overwrite=args.overwrite)
    commands = registered_commands()
    samples = tuple(name for name, spec in commands.items() if spec.sample is not None)
    why_not = {name: spec.cannot_sample for name, spec in commands.items() if spec.sample is None}
    checkpoint, family = open_checkpoint(args, samples, "sample", why_not)
    path = commands[checkpoint["family"]["name"]].sample(args, family, checkpoint)
    print(f"wrote {args.num} samples to {path}", file=sys.stderr)
    return 0
