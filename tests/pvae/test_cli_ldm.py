"""``pvae train ldm`` through the command line: both recipes, resume, evaluate, sample, load."""

import json

import pytest
import torch

import pvae
from pvae import cli
from pvae.checkpoint import load_checkpoint

TINY = [
    "--architecture", "mlp", "--z-dim", "2", "--hidden-dim", "16", "--timesteps", "5",
    "--prior-hidden-dim", "8", "--num-train", "64", "--num-test", "20", "--batch-size", "32",
    "--autoencoder-epochs", "1",
]  # fmt: skip


@pytest.mark.parametrize("recipe", ["two-stage", "joint"])
def test_train_evaluate_sample_and_load(recipe, tmp_path, capsys):
    out = tmp_path / recipe
    argv = ["train", "ldm", *TINY, "--recipe", recipe, "--epochs", "1", "--out", str(out), "--json"]
    assert cli.main(argv) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["recipe"] == recipe and summary["epochs"] == 1
    assert (out / "autoencoder" / "checkpoint.pt").exists() and (out / "samples.png").exists()
    family = pvae.load(out / "checkpoint.pt")
    assert family.stage == ("prior" if recipe == "two-stage" else "joint")
    assert float(family.latent_scale) == pytest.approx(summary["latent_scale"])
    first = pvae.load(out / "autoencoder" / "checkpoint.pt")
    decoder = "autoencoder.decoder.0.weight"
    same = torch.equal(first.state_dict()[decoder], family.state_dict()[decoder])
    assert same == (recipe == "two-stage")  # the two-stage recipe freezes the autoencoder

    evaluate = ["evaluate", str(out / "checkpoint.pt"), "--quality-samples", "0", "--json"]
    assert cli.main(evaluate) == 0
    payload = json.loads(capsys.readouterr().out)
    assert payload["num_images"] == 20 and payload["frechet_distance"] is None
    assert payload["prior"] == "diffusion chain"
    first_stage = ["evaluate", str(out / "autoencoder" / "checkpoint.pt"), "--quality-samples", "0", "--json"]
    assert cli.main(first_stage) == 0  # the first stage is scored with the prior it was trained with
    assert json.loads(capsys.readouterr().out)["prior"] == "N(0, I) (first stage)"
    assert payload["bits_per_dim"] == pytest.approx(-payload["elbo"] / (784 * 0.6931471805599453))

    picture = tmp_path / f"{recipe}.png"
    assert (
        cli.main(["sample", str(out / "checkpoint.pt"), "--out", str(picture), "-n", "4", "--steps", "3"])
        == 0
    )
    assert picture.exists()

    # resume the second stage for one more epoch: the first stage is not trained again
    resumed = ["train", "ldm", *TINY, "--recipe", recipe, "--epochs", "2", "--out", str(out), "--resume"]
    assert cli.main([*resumed, "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["epochs"] == 2
    assert torch.equal(
        pvae.load(out / "autoencoder" / "checkpoint.pt").state_dict()[decoder], first.state_dict()[decoder]
    )


def test_bad_flags_are_one_line_errors(tmp_path, capsys):
    assert cli.main(["train", "ldm", "--recipe", "both"]) == 2
    assert cli.main(["train", "ldm", *TINY, "--timesteps", "0", "--out", str(tmp_path / "x")]) == 2
    capsys.readouterr()


def test_each_stage_trains_at_its_own_rate_and_records_it(tmp_path, capsys):
    out = tmp_path / "rates"
    argv = ["train", "ldm", *TINY, "--epochs", "1", "--out", str(out), "--lr", "2e-3", "--json"]
    assert cli.main([*argv, "--prior-lr", "5e-4", "--lr-end", "1e-4"]) == 0
    capsys.readouterr()
    first = load_checkpoint(out / "autoencoder" / "checkpoint.pt")["train_config"]
    second = load_checkpoint(out / "checkpoint.pt")["train_config"]
    assert (first["lr"], first["lr_end"]) == (2e-3, None)  # --lr-end decays the second stage only
    assert (second["lr"], second["lr_end"]) == (5e-4, 1e-4)
    assert (out / "autoencoder" / "history.json").exists() and (out / "history.json").exists()

    # the rate is a setting of the saved run: resuming at another one needs --allow-changes
    resumed = [*argv[:-1], "--epochs", "2", "--resume", "--lr-end", "1e-4"]
    assert cli.main([*resumed, "--prior-lr", "1e-3"]) == 1
    assert "lr: saved 0.0005, now 0.001" in capsys.readouterr().err
    assert cli.main([*resumed, "--prior-lr", "5e-4", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["epochs"] == 2


@pytest.mark.parametrize(
    "flag, message",
    [
        ("--prior-lr=0", "must be a finite number in (0, 1e+300], got 0"),
        ("--prior-lr=-1e-3", "must be a finite number in (0, 1e+300], got -1e-3"),
        ("--prior-lr=nan", "must be a finite number in (0, 1e+300], got nan"),
        ("--prior-lr=fast", "must be a number in (0, 1e+300], got 'fast'"),
    ],
    ids=["zero", "negative", "nan", "text"],
)
def test_a_bad_prior_lr_is_a_one_line_error(flag, message, tmp_path, capsys):
    out = tmp_path / "x"
    assert cli.main(["train", "ldm", *TINY, flag, "--out", str(out)]) == 2
    error = capsys.readouterr().err
    assert error.startswith("pvae: error: pvae train ldm: argument --prior-lr: " + message)
    assert error.count("\n") == 1
    assert not out.exists()  # refused before any work
