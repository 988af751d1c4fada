"""``pvae train ldm`` through the command line: both recipes, resume, evaluate, sample, load."""

import json

import pytest
import torch

import pvae
from pvae import cli

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
