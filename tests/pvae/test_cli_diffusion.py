"""`pvae train/evaluate/sample` for DDPM checkpoints (two moons and digits), and their bad input."""

import json
import math

import pytest
import torch

from pvae import cli
from pvae.checkpoint import load, load_checkpoint
from pvae.utils import seed_everything

pytestmark = pytest.mark.usefixtures("one_thread")  # thousands of tiny steps: threads only cost


def _json(capsys):
    return json.loads(capsys.readouterr().out)


def test_two_moons_train_evaluate_sample(tmp_path, capsys):
    out = tmp_path / "run"
    args = ["train", "ddpm", "--dataset", "two-moons", "--timesteps", "10", "--epochs", "2", "--num-train"]
    args += ["512", "--num-test", "128", "--batch-size", "128", "--objective", "meanfield", "--json"]
    args += ["--engine", "trace", "--time-sampling", "importance"]  # a recorded step, its history delivered
    assert cli.main([*args, "--lr", "1e-3", "--lr-end", "1e-4", "--out", str(out)]) == 0
    summary = _json(capsys)
    assert summary["family"] == "ddpm" and summary["epochs"] == 2 and summary["objective"] == "meanfield"
    saved = load_checkpoint(out / "checkpoint.pt")
    assert saved["train_config"]["lr_end"] == 1e-4 and saved["train_config"]["total_steps"] == 8
    assert saved["optimizer"]["param_groups"][0]["lr"] == pytest.approx(1e-4)  # the last step's
    assert int(saved["state_dict"]["term_counts"].sum()) == 2 * 512  # every datum's term, graph steps too
    assert all(
        (out / name).exists() for name in ("checkpoint.pt", "samples.png", "chain.png", "training.png")
    )

    assert cli.main(["evaluate", str(out / "checkpoint.pt"), "--json"]) == 0
    result = _json(capsys)
    assert result["num_test"] == 128 and result["timesteps"] == 10
    assert result["bits_per_dim"] == pytest.approx(-result["elbo"] / (2 * math.log(2)))
    # the same number in-process: the run's own test points, all T terms, seed 0, batches of 64
    family = load(str(out / "checkpoint.pt"))
    test_x = cli.diffusion.diffusion_data("two-moons", "test", None, 128, 0)
    seed_everything(0)
    elbo = torch.cat([family.elbo(batch) for batch in test_x.split(64)]).double()
    assert elbo.mean().item() == pytest.approx(result["elbo"], rel=1e-6)

    assert cli.main(["sample", str(out / "checkpoint.pt"), "--out", str(tmp_path / "s.png"), "-n", "50"]) == 0
    chain = tmp_path / "c.png"
    ddim = ["--steps", "5", "--chain", str(chain)]
    assert cli.main(["sample", str(out / "checkpoint.pt"), "--out", str(tmp_path / "d.png"), *ddim]) == 0
    assert (tmp_path / "s.png").exists() and (tmp_path / "d.png").exists() and chain.exists()


def test_digits_train_and_bits_per_dim(tmp_path, capsys):
    out = tmp_path / "digits"
    args = ["train", "ddpm", "--num-train", "16", "--num-test", "4", "--timesteps", "5", "--channels", "8"]
    args += ["--batch-size", "8", "--epochs", "1", "--picture-samples", "2", "--json", "--out", str(out)]
    assert cli.main(args) == 0
    assert _json(capsys)["dataset"] == "mnist5k"
    assert cli.main(["evaluate", str(out / "checkpoint.pt"), "--json"]) == 0
    result = _json(capsys)
    assert result["num_test"] == 4 and result["bits_per_dim"] > 0 and result["ema"] is True
    assert "8-bit" in result["metric"]


@pytest.mark.parametrize(
    "args, message",
    [
        (["train", "ddpm", "--dataset", "two-moons", "--objective", "iwae"], "argument --objective: invalid"),
        (
            ["train", "ddpm", "--dataset", "two-moons", "--compile-mode", "reduce-overhead"],
            "argument --compile-mode: needs --engine compile",
        ),
        (
            ["train", "ddpm", "--dataset", "two-moons", "--gemm", "default"],
            "argument --gemm: needs --engine compile",
        ),
        (["train", "vae", "--dataset", "two-moons"], "argument --dataset: invalid choice: 'two-moons'"),
        (["train", "ddpm", "--dataset", "two-moons", "--ema-decay", "1.5", "--epochs", "1"], "--ema-decay"),
        (["train", "ddpm", "--dataset", "two-moons", "--lr-end", "0"], "--lr-end"),
    ],
    ids=["iwae", "engine", "gemm-engine", "vae-moons", "ema", "lr-end"],
)
def test_bad_input_is_a_clear_error(args, message, tmp_path, capsys):
    assert cli.main([*args, "--out", str(tmp_path)]) == 2
    assert message in capsys.readouterr().err


def test_engine_flags_become_the_compile_options_of_train():
    import argparse

    from pvae.cli.common import add_engine_arguments, engine_options

    parser = argparse.ArgumentParser()
    add_engine_arguments(parser)
    parsed = parser.parse_args(["--engine", "compile", "--gemm", "default", "--compile-mode", "max-autotune"])
    assert engine_options(parsed) == {
        "engine": "compile",
        "compile_options": {"mode": "max-autotune", "gemm": "default"},
    }
    assert engine_options(parser.parse_args(["--engine", "compile"])) == {
        "engine": "compile",
        "compile_options": None,
    }
