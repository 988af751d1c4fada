"""Helpers shared by the sub-commands: argument types, common options, JSON output, demo context."""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile


# ---- errors and argument types ------------------------------------------------------------------------
class UsageError(ValueError):
    """A bad command-line argument found after parsing: ``pvae: error: …`` and exit status 2."""


def _integer(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be an integer, got {text!r}") from None


def bounded_int(low: int, high: int):
    """An argparse type: an integer in [low, high]."""

    def parse(text: str) -> int:
        value = _integer(text)
        if not low <= value <= high:
            raise argparse.ArgumentTypeError(f"must be an integer in [{low}, {high:,}], got {text}")
        return value

    parse.__name__ = f"integer in [{low}, {high}]"
    return parse


TORCHVISION_DATASETS = ("mnist", "fashion-mnist")  # read from --data-root (or downloaded), not shipped
MAX_COUNT = 10**7  # images, points, samples or steps one flag may ask for
positive_int = bounded_int(1, MAX_COUNT)
non_negative_int = bounded_int(0, 2**63 - 1)


def bounded_float(low: float, high: float, *, low_open: bool = True, high_open: bool = False):
    """An argparse type: a finite number in the interval between ``low`` and ``high``."""
    interval = f"{'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be a number in {interval}, got {text!r}") from None
        inside = (value > low if low_open else value >= low) and (
            value < high if high_open else value <= high
        )
        if not (math.isfinite(value) and inside):
            raise argparse.ArgumentTypeError(f"must be a finite number in {interval}, got {text}")
        return value

    parse.__name__ = f"number in {interval}"
    return parse


positive_float = bounded_float(0.0, 1e300)


def device_from_args(args):
    """``--device`` as a ``torch.device``; a bad value is a :class:`UsageError`."""
    from pvae.utils import resolve_device

    try:
        return resolve_device(args.device)
    except ValueError as error:
        raise UsageError(f"--device: {error}") from None


def _os_problem(error: OSError) -> str:
    return error.strerror or type(error).__name__


def prepare_out_folder(out: str, option: str = "--out") -> str:
    """Create the output folder if needed and make sure files can be written there, before any work.

    :raises UsageError: when ``out`` is a file, lies under a file, or cannot be created or written.
    """
    if os.path.exists(out) and not os.path.isdir(out):
        raise UsageError(f"{option} {out} is a file, not a folder")
    try:
        os.makedirs(out, exist_ok=True)
        with tempfile.TemporaryFile(dir=out):
            pass
    except OSError as error:
        raise UsageError(f"{option} {out}: cannot write there ({_os_problem(error)})") from None
    return out


def check_out_file(path: str, option: str = "--out", *, overwrite: bool = False, suffix: str = ".png") -> str:
    """Check that ``path`` names a new ``suffix`` file in a folder that can be written (created if needed).

    :raises UsageError: for a folder, another suffix, an existing file (unless ``overwrite``), or a folder
        that cannot be created or written.
    """
    if os.path.isdir(path):
        raise UsageError(f"{option} {path} is a folder; name a FILE{suffix}")
    if not path.lower().endswith(suffix):
        raise UsageError(f"{option} must name a {suffix} file, got {path}")
    if os.path.exists(path) and not overwrite:
        raise UsageError(f"{option} {path} already exists; pass --overwrite to replace it")
    prepare_out_folder(os.path.dirname(os.path.abspath(path)), option)
    return path


def add_image_data_arguments(parser, datasets: tuple[str, ...]) -> None:
    """Data flags: ``--dataset`` (default: the first of ``datasets``), ``--data-root``, ``--num-*``."""
    parser.add_argument("--dataset", choices=datasets, default=datasets[0], help=f"default {datasets[0]}")
    parser.add_argument("--data-root", default=None, help="folder for mnist/fashion-mnist files")
    parser.add_argument("--num-train", type=positive_int, default=None, help="use a class-mixed subset")
    parser.add_argument("--num-test", type=positive_int, default=None, help="test data points to use")


COMPILE_MODES = ("default", "reduce-overhead", "max-autotune-no-cudagraphs", "max-autotune")


def add_engine_arguments(parser, compile_mode: bool = True) -> None:
    """``--engine`` (the step engine of :class:`pvae.inference.step.SVIStep`) and, with ``compile_mode``,
    ``--compile-mode`` and ``--gemm``."""
    from pvae.inference.compile_passes import GEMM_CHOICES
    from pvae.inference.step import ENGINES

    parser.add_argument(
        "--engine",
        choices=ENGINES,
        default="eager",
        help="eager (default), trace (replay a recorded graph of the step) or compile (that graph "
        "compiled by Inductor)",
    )
    if not compile_mode:
        return
    parser.add_argument(
        "--compile-mode",
        choices=COMPILE_MODES,
        default=None,
        help="Inductor's mode with --engine compile, as torch.compile names them: reduce-overhead "
        "replays CUDA graphs on a GPU (default: torch's default mode)",
    )
    parser.add_argument(
        "--gemm",
        choices=GEMM_CHOICES,
        default=None,
        help="matrix products with --engine compile: auto (default: large fp32 products through oneDNN "
        "on CPUs with AVX-512, MKL elsewhere) or default (torch's default BLAS for all)",
    )


def engine_options(args) -> dict:
    """The :func:`pvae.inference.train` keywords of :func:`add_engine_arguments`' flags."""
    chosen = {}
    for key, flag in (("mode", "--compile-mode"), ("gemm", "--gemm")):
        value = getattr(args, flag[2:].replace("-", "_"), None)
        if value is None:
            continue
        if args.engine != "compile":
            raise UsageError(f"argument {flag}: needs --engine compile, got --engine {args.engine}")
        chosen[key] = value
    return {"engine": args.engine, "compile_options": chosen or None}


def add_common(parser: argparse.ArgumentParser, json_output: bool = True) -> None:
    parser.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: cuda if available)")
    parser.add_argument("--seed", type=non_negative_int, default=0, help="random seed (default 0)")
    if json_output:
        parser.add_argument("--json", action="store_true", help="print only JSON on stdout")


def print_json(payload) -> None:
    json.dump(payload, sys.stdout, indent=2)
    sys.stdout.write("\n")


# ---- the training flow shared by `pvae train` for every family -------------------------------------------
def add_run_options(parser: argparse.ArgumentParser) -> None:
    """``--out``, ``--resume``, ``--overwrite`` and ``--allow-changes``: where a run lives and what may
    happen to a run already there."""
    parser.add_argument("--out", default=None, help="output folder (default runs/<family>)")
    parser.add_argument("--resume", action="store_true", help="continue the run in DIR/checkpoint.pt")
    parser.add_argument(
        "--overwrite", action="store_true", help="replace the run already in the output folder"
    )
    parser.add_argument(
        "--allow-changes",
        action="store_true",
        help="with --resume: continue although the objective, learning rate or data settings differ from "
        "the saved run's (the change is recorded in the history)",
    )


def start_run(args, default_out: str):
    """Check ``--device`` and the output folder (``--out`` or ``default_out``) before any work, and seed
    everything. A folder that already holds a run is used only with ``--resume`` or ``--overwrite``. Under
    ``torchrun``, join the process group first (each process on its own device) and say so once per rank.

    Returns ``(device, out)``."""
    from pvae.inference import distributed
    from pvae.utils import seed_everything

    if distributed.launched():
        try:
            device = distributed.setup(args.device)
        except ValueError as error:
            raise UsageError(f"--device: {error}") from None
        print(
            f"pvae: process {distributed.rank()} of {distributed.world_size()} on {device}", file=sys.stderr
        )
    else:
        device = device_from_args(args)
    out = args.out or default_out
    if args.resume and args.overwrite:
        raise UsageError("--resume and --overwrite contradict each other: choose one")
    if args.allow_changes and not args.resume:
        raise UsageError("--allow-changes goes with --resume")
    prepare_out_folder(out)
    checkpoint = os.path.join(out, "checkpoint.pt")
    if os.path.exists(checkpoint) and not (args.resume or args.overwrite):
        raise UsageError(
            f"{out} already holds a run ({checkpoint}): pass --resume to continue it, --overwrite to replace "
            "it, or --out to choose another folder"
        )
    if args.resume and not os.path.exists(checkpoint):
        print(f"pvae: no checkpoint in {out}: starting a new run", file=sys.stderr)
    seed_everything(args.seed)
    return device, out


def write_history(history, path: str) -> None:
    """``history.json``, written atomically (readers never see half a file)."""
    from pvae.utils import write_atomically

    write_atomically(path, lambda handle: json.dump(history.to_dict(), handle), binary=False)


def run_settings(args) -> dict:
    """The :func:`pvae.inference.train` keywords every run of ``pvae train`` takes from the shared flags
    (what may happen to a run already there, the seed, the progress bar)."""
    return {
        "resume": args.resume,
        "overwrite": args.overwrite,
        "allow_changes": args.allow_changes,
        "seed": args.seed,
        "progress": not args.json,
    }


def history_writer(path: str):
    """A :func:`pvae.inference.train` callback writing the history to ``path`` after every epoch (rank 0
    alone, under torchrun)."""
    from pvae.inference import distributed

    def record(epoch, history):
        if distributed.is_main_process():
            write_history(history, path)

    return record


def train_and_record(family, args, train_loader, test_loader, out: str, metadata: dict, **options):
    """Train ``family`` with the options every family shares (epochs, objective, learning rate and its
    decay, seed, progress, checkpoint in ``out``, ``--resume``/``--overwrite``/``--allow-changes``), write
    ``out/history.json`` after every epoch (rank 0 alone, under torchrun) and switch the family to
    evaluation mode. ``metadata`` joins the checkpoint's record of the data; ``options`` go to
    :func:`pvae.inference.train`, taking precedence over the shared flags (e.g. a second stage's own
    ``lr``). Returns ``(history, checkpoint path)``."""
    from pvae.inference import train

    checkpoint = os.path.join(out, "checkpoint.pt")
    settings = {
        "epochs": args.epochs,
        "objective": args.objective,
        "lr": args.lr,
        "lr_end": args.lr_end,
        "checkpoint": checkpoint,
        "metadata": {"batch_size": args.batch_size} | metadata,
        "callback": history_writer(os.path.join(out, "history.json")),
    }
    history = train(family, train_loader, test_loader, **(settings | run_settings(args) | options))
    family.eval()
    return history, checkpoint


def saved_setting(checkpoint: dict, key: str, accepted, default=None):
    """A ``train_config`` entry of a validated checkpoint that a command uses, checked against
    ``accepted`` (a tuple of values, or a predicate); a :class:`~pvae.checkpoint.CheckpointError` names it."""
    from pvae.checkpoint import CheckpointError

    value = checkpoint["train_config"].get(key, default)
    ok = accepted(value) if callable(accepted) else value in accepted
    if not ok:
        shown = repr(value) if len(repr(value)) <= 60 else repr(value)[:57] + "…"
        described = getattr(accepted, "__doc__", None) if callable(accepted) else f"one of {accepted}"
        raise CheckpointError(
            checkpoint["source"], f"train_config.{key}", f"must be {described}, got {shown}"
        )
    return value


def optional_count(value) -> bool:
    """None or an integer in [1, 10,000,000]"""
    return value is None or (
        isinstance(value, int) and not isinstance(value, bool) and 1 <= value <= MAX_COUNT
    )


def optional_seed(value) -> bool:
    """None or a non-negative integer below 2**63"""
    return value is None or (isinstance(value, int) and not isinstance(value, bool) and 0 <= value < 2**63)


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


def open_checkpoint(args, families: tuple[str, ...], command: str, why_not: dict[str, str] | None = None):
    """The validated checkpoint and its family, rebuilt on ``--device``, for a command that handles
    ``families`` (``why_not``: the reason given for a family it does not handle)."""
    from pvae.checkpoint import build_from_checkpoint, load_checkpoint

    device = device_from_args(args)
    if not os.path.isfile(args.checkpoint):
        raise UsageError(f"checkpoint {args.checkpoint} does not exist (or is not a file)")
    checkpoint = load_checkpoint(args.checkpoint)
    name = checkpoint["family"]["name"]
    if name not in families:
        reason = (why_not or {}).get(name, f"pvae {command} handles {', '.join(families)} checkpoints")
        raise UsageError(f"{args.checkpoint} holds a {name!r}: {reason}")
    return checkpoint, build_from_checkpoint(checkpoint, device)


def checked_data_settings(args, checkpoint: dict, datasets: tuple[str, ...]):
    """``(dataset, num_test, seed)`` of the run, from the checkpoint (validated), the data folder from the
    command line only."""
    dataset = saved_setting(checkpoint, "dataset", datasets, default="mnist5k")
    num_test = args.num_test or saved_setting(checkpoint, "num_test", optional_count)
    seed = saved_setting(checkpoint, "seed", optional_seed) or 0
    if dataset in TORCHVISION_DATASETS and args.data_root is None and not args.download:
        raise UsageError(
            f"{args.checkpoint} was trained on {dataset}: pass --data-root FOLDER holding its files (with "
            "--download to fetch them there)"
        )
    return dataset, num_test, seed
