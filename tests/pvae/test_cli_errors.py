"""The command line's failures: one line ``pvae: error: …`` naming the argument or field, the documented exit
status (2 for a bad argument, 1 at run time), never a traceback; and a checkpoint naming code to run runs
nothing."""

from __future__ import annotations

import contextlib
import copy
import io
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from pvae import cli

TINY = ["--num-train", "32", "--num-test", "4", "--hidden-dim", "8", "--z-dim", "2", "--batch-size", "32"]
MARKER_COMMAND = ["sh", "-c", "touch MARKER"]


def run_cli(argv: list[str]) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        status = cli.main([str(arg) for arg in argv])
    return status, out.getvalue(), err.getvalue()


def one_error_line(err: str) -> str:
    """The one line a failing command writes on stderr (asserting that there is exactly one)."""
    lines = err.rstrip("\n").split("\n")
    assert len(lines) == 1 and lines[0].strip(), f"expected one line on stderr, got:\n{err}"
    line = lines[0]
    assert line.startswith("pvae: error:"), line
    assert "Traceback" not in err and "Trace Shapes" not in err, err
    assert "(an unexpected " not in line, f"an error the CLI did not expect: {line}"
    return line


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    """One tiny VAE run (1 epoch); rows copy it rather than train their own."""
    out = tmp_path_factory.mktemp("cli-errors") / "run"
    status, _, err = run_cli(["train", "vae", *TINY, "--epochs", "1", "--out", out, "--json"])
    assert status == 0, err
    return out


@pytest.fixture
def workdir(tmp_path, monkeypatch) -> Path:
    monkeypatch.chdir(tmp_path)
    return tmp_path


# ---- a checkpoint that names a process to start -----------------------------------------------------------
def _popen_payloads(trained: Path) -> dict[str, dict]:
    real = torch.load(trained / "checkpoint.pt", weights_only=True)
    old = copy.deepcopy(real)
    old["version"] = 1
    old["family"] = {"class": "subprocess:Popen", "kwargs": {"args": MARKER_COMMAND}, "name": None}
    current = copy.deepcopy(real)
    current["family"] = {"name": "subprocess:Popen", "kwargs": {"args": MARKER_COMMAND}, "prefix": None}
    return {"format 1 (class path)": old, "current format (registered name)": current}


_LOAD_SCRIPT = """
import sys
import pvae
from pvae.checkpoint import CheckpointError
try:
    pvae.load(sys.argv[1])
except CheckpointError as error:
    print(f"error: {error}", file=sys.stderr)
    sys.exit(1)
"""


@pytest.mark.parametrize("layout", ["format 1 (class path)", "current format (registered name)"])
def test_a_checkpoint_naming_subprocess_popen_starts_nothing(trained, tmp_path, layout):
    path = tmp_path / "popen.pt"
    torch.save(_popen_payloads(trained)[layout], path)
    environment = {key: value for key, value in os.environ.items() if key != "PVAE_DEBUG"}
    commands = {
        "pvae evaluate": [sys.executable, "-m", "pvae.cli", "evaluate", str(path)],
        "pvae.load": [sys.executable, "-c", _LOAD_SCRIPT, str(path)],
    }
    children = {
        name: subprocess.Popen(
            argv, cwd=tmp_path, env=environment, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        for name, argv in commands.items()
    }
    for name, child in children.items():
        _, err = child.communicate(timeout=300)
        assert child.returncode == 1, f"{name}: exit {child.returncode}, stderr:\n{err}"
        lines = err.rstrip("\n").split("\n")
        assert len(lines) == 1 and "family" in lines[0], f"{name}:\n{err}"
        assert lines[0].startswith("pvae: error:" if name == "pvae evaluate" else "error: checkpoint"), err
        assert "Traceback" not in err and "(an unexpected " not in err
    assert not (tmp_path / "MARKER").exists(), "the checkpoint started a process"
    assert sorted(entry.name for entry in tmp_path.iterdir()) == ["popen.pt"]


# ---- the table: argv (after any setup), exit status, what the one line names -------------------------------
@dataclass
class Row:
    id: str
    setup: Callable[[Path, Path], list]  # (work folder, trained run) → argv
    status: int
    names: tuple[str, ...] = ()  # substrings of the one line (failures only)
    check: Callable[[Path, str], None] | None = None  # (work folder, stdout) → further assertions

    def __repr__(self) -> str:
        return self.id


def copy_run(work: Path, trained: Path, name: str = "run") -> Path:
    target = work / name
    shutil.copytree(trained, target)
    return target


def train_into_copy(*flags):
    def setup(work, trained):
        return ["train", "vae", *TINY, "--out", copy_run(work, trained), *flags]

    return setup


def _new_objective_recorded(work: Path, stdout: str) -> None:
    summary = json.loads(stdout)
    history = json.loads((work / "run" / "history.json").read_text())
    assert summary["objective"] == "meanfield" and history["objective"] == "meanfield"
    assert history["changes"] and history["changes"][-1]["objective"] == ["elbo", "meanfield"]
    assert len(history["train_elbo"]) == 2


def _file(work: Path, name: str = "a-file") -> Path:
    path = work / name
    path.write_text("not a folder\n")
    return path


def _existing_png(work: Path, trained: Path) -> list:
    target = work / "grid.png"
    shutil.copyfile(trained / "samples.png", target)
    return ["sample", trained / "checkpoint.pt", "--out", target]


ROWS = [
    Row(
        "train into a run folder without --resume/--overwrite",
        train_into_copy("--epochs", "1"),
        2,
        ("--resume", "--overwrite"),
    ),
    Row(
        "train into a run folder with --overwrite",
        train_into_copy("--epochs", "1", "--overwrite", "--json"),
        0,
    ),
    Row(
        "train with --resume --overwrite",
        train_into_copy("--epochs", "2", "--resume", "--overwrite"),
        2,
        ("--resume", "--overwrite"),
    ),
    Row(
        "resume with another --objective",
        train_into_copy("--epochs", "2", "--resume", "--objective", "meanfield"),
        1,
        ("objective", "'elbo'", "'meanfield'", "--allow-changes"),
    ),
    Row(
        "resume with another --lr",
        train_into_copy("--epochs", "2", "--resume", "--lr", "0.01"),
        1,
        ("lr", "0.001", "0.01", "--allow-changes"),
    ),
    Row(
        "resume with another --objective and --allow-changes",
        train_into_copy("--epochs", "2", "--resume", "--objective", "meanfield", "--allow-changes", "--json"),
        0,
        check=_new_objective_recorded,
    ),
    Row(
        "resume with nothing left to train",
        train_into_copy("--epochs", "1", "--resume"),
        1,
        ("nothing left to train",),
    ),
    Row(
        "--out is a file",
        lambda work, trained: ["train", "vae", *TINY, "--epochs", "1", "--out", _file(work)],
        2,
        ("--out", "a-file"),
    ),
    Row(
        "--out under a file",
        lambda work, trained: ["train", "vae", *TINY, "--epochs", "1", "--out", _file(work) / "sub"],
        2,
        ("--out", "a-file/sub"),
    ),
    Row(
        "--out cannot be created",
        lambda work, trained: ["train", "vae", *TINY, "--epochs", "1", "--out", "/proc/pvae-test"],
        2,
        ("--out", "/proc/pvae-test"),
    ),
    Row(
        "sample --out is a folder",
        lambda work, trained: ["sample", trained / "checkpoint.pt", "--out", work],
        2,
        ("--out",),
    ),
    Row("sample --out exists, no --overwrite", _existing_png, 2, ("--out", "--overwrite")),
    Row(
        "train vae --num-test 1",
        lambda work, trained: [
            "train",
            "vae",
            *TINY,
            "--num-test",
            "1",
            "--epochs",
            "1",
            "--out",
            work / "one",
            "--json",
        ],
        0,
    ),
    Row(
        "--device meta",
        lambda work, trained: ["train", "vae", *TINY, "--out", work / "r", "--device", "meta"],
        2,
        ("--device", "meta"),
    ),
    Row(
        "--device mps",
        lambda work, trained: ["train", "vae", *TINY, "--out", work / "r", "--device", "mps"],
        2,
        ("--device", "mps"),
    ),
    Row(  # one step per epoch: the step that diverges is the epoch's last, the test evaluation follows
        "a diverging run (--lr 10)",
        lambda work, trained: ["train", "vae", *TINY, "--epochs", "1", "--lr", "10", "--out", work / "r"],
        1,
        ("smaller lr",),
    ),
    Row(
        "a diverging run, two steps per epoch (--lr 10)",
        lambda work, trained: [
            "train",
            "vae",
            *TINY,
            "--num-train",
            "64",
            "--epochs",
            "1",
            "--lr",
            "10",
            "--out",
            work / "r",
        ],
        1,
        ("smaller lr",),
    ),
    Row(
        "evaluate a missing file",
        lambda work, trained: ["evaluate", work / "missing.pt"],
        2,
        ("missing.pt", "does not exist"),
    ),
]
if not torch.cuda.is_available():
    ROWS.append(
        Row(
            "--device cuda:99 without a GPU",
            lambda work, trained: ["train", "vae", *TINY, "--out", work / "r", "--device", "cuda:99"],
            2,
            ("--device", "cuda:99"),
        )
    )


# ---- malformed checkpoints, for evaluate, sample and train --resume ---------------------------------------
def _text_file(path: Path, payload) -> None:
    path.write_text("this is not a checkpoint\n")


def _mutated(change):
    def write(path: Path, payload) -> None:
        payload = copy.deepcopy(payload)
        payload = change(payload) or payload
        torch.save(payload, path)

    return write


def _set(key, value):
    def change(payload):
        payload[key] = value

    return change


def _set_in(section, key, value):
    def change(payload):
        payload[section][key] = value

    return change


def _short_python_state(payload):
    payload["rng"]["python"]["internal"] = payload["rng"]["python"]["internal"][:100]


MALFORMED = {  # what the file holds → (how to write it, the field the one line names)
    "a text file": (_text_file, "file"),
    "a list": (_mutated(lambda payload: [1, 2, 3]), "format"),
    "no state_dict": (_mutated(lambda payload: payload.pop("state_dict") and None), "state_dict"),
    "a string version": (_mutated(_set("version", "2")), "version"),
    "family a list": (_mutated(_set("family", ["vae"])), "family"),
    "family.kwargs None": (_mutated(_set_in("family", "kwargs", None)), "family.kwargs"),
    "param_store a list": (_mutated(_set("param_store", [])), "param_store"),
    "history with an unknown key": (_mutated(_set_in("history", "bogus", 1)), "history"),
    "a Python rng state of the wrong length": (_mutated(_short_python_state), "rng.python.internal"),
    "train_config a list": (_mutated(_set("train_config", [1])), "train_config"),
}


def _malformed_row(name: str, command: str) -> Row:
    write, field_name = MALFORMED[name]

    def setup(work, trained):
        payload = torch.load(trained / "checkpoint.pt", weights_only=True)
        if command == "train --resume":
            run = work / "run"
            run.mkdir()
            write(run / "checkpoint.pt", payload)
            return ["train", "vae", *TINY, "--epochs", "2", "--resume", "--out", run]
        path = work / "bad.pt"
        write(path, payload)
        if command == "evaluate":
            return ["evaluate", path, "--num-samples", "2"]
        return ["sample", path, "--out", work / "grid.png"]

    return Row(f"{command} on {name}", setup, 1, (field_name,))


ROWS += [
    _malformed_row(name, command)
    for name in MALFORMED
    for command in ("evaluate", "sample", "train --resume")
]


@pytest.mark.parametrize("row", ROWS, ids=[row.id for row in ROWS])
def test_cli_errors_are_one_line_with_the_documented_status(row, trained, workdir):
    argv = row.setup(workdir, trained)
    status, out, err = run_cli(argv)
    if row.status == 0:
        assert status == 0 and "pvae: error" not in err, f"exit {status}:\n{err}"
    else:
        line = one_error_line(err)
        assert status == row.status, (
            f"pvae {' '.join(map(str, argv))}: exit {status}, expected {row.status}: {line}"
        )
        for name in row.names:
            assert name in line, f"{name!r} not named in: {line}"
    if row.check is not None:
        row.check(workdir, out)
