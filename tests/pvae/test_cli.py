import json
import os
import subprocess
import sys

import pytest
import torch

from pvae import cli
from pvae.models.toy import ExponentialGaussian


def _run(args, tmp_path):
    command = [sys.executable, "-m", "pvae.cli", *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=600, cwd=tmp_path)


def test_toy_json_is_only_json_with_the_documented_keys(tmp_path):
    completed = _run(
        ["toy", "--guide", "exact", "--x", "-1", "0.5", "30", "--json", "--out", str(tmp_path)], tmp_path
    )
    assert completed.returncode == 0, completed.stderr
    rows = json.loads(completed.stdout)  # stdout carries nothing else
    assert [set(row) for row in rows] == [{"x", "log_marginal", "elbo", "kl"}] * 3
    exact = ExponentialGaussian().log_marginal(torch.tensor([-1.0, 0.5, 30.0], dtype=torch.float64))
    for row, value in zip(rows, exact.tolist()):
        assert row["log_marginal"] == pytest.approx(value, abs=1e-12)
        assert row["elbo"] == pytest.approx(value, abs=1e-6)
        assert row["kl"] == pytest.approx(0.0, abs=1e-9)
    assert (tmp_path / "toy_exact.png").exists()


def test_toy_table_and_plot(tmp_path, capsys):
    code = cli.main(
        ["toy", "--guide", "meanfield", "--num-steps", "50", "--x", "0", "2", "--out", str(tmp_path)]
    )
    assert code == 0
    out = capsys.readouterr().out
    assert "KL(q||p)" in out and "x=2" in out
    assert os.path.getsize(tmp_path / "toy_meanfield.png") > 10_000


def test_toy_fits_the_same_guide_on_the_trace_engine(tmp_path, capsys, monkeypatch):
    """The recorded step replays the eager one bit for bit, so the fitted guide's table is the same."""
    from pvae.inference.step import SVIStep

    replayed = []
    graph_step = SVIStep._graph_step

    def counted(self, *arguments):
        loss = graph_step(self, *arguments)
        replayed.append(loss is not None)
        return loss

    monkeypatch.setattr(SVIStep, "_graph_step", counted)
    args = ["toy", "--guide", "amortized", "--num-steps", "30", "--x", "0", "2", "--out", str(tmp_path)]
    assert cli.main(args) == 0
    eager = capsys.readouterr().out
    assert not replayed
    assert cli.main([*args, "--engine", "trace"]) == 0
    assert capsys.readouterr().out == eager
    assert len(replayed) == 29 and all(replayed)  # every step after the first replayed the recording
    assert cli.main([*args, "--engine", "tpu"]) == 2
    assert "argument --engine: invalid choice: 'tpu'" in capsys.readouterr().err


@pytest.mark.parametrize(
    "args, message",
    [
        (["toy", "--rate", "0"], "rate"),
        (["toy", "--scale", "-1"], "scale"),
        (["toy", "--x", "nan"], "argument --x: must be a finite number in [-10000, 10000], got nan"),
        (["toy", "--device", "tpu"], "device"),
    ],
    ids=["rate", "scale", "nan", "device"],
)
def test_bad_input_is_a_clear_error(args, message, tmp_path, capsys):
    assert cli.main([*args, "--out", str(tmp_path)]) == 2
    assert message in capsys.readouterr().err


def test_argparse_rejects_unknown_guide(capsys):
    assert cli.main(["toy", "--guide", "nope"]) == 2
    error = capsys.readouterr().err
    assert (
        error.startswith("pvae: error: pvae toy: argument --guide: invalid choice") and error.count("\n") == 1
    )
