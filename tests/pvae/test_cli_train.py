"""pvae train / evaluate / sample on small digit subsets, end to end (and on a GPU when there is one)."""

import json
import math

import pytest
import torch
from matplotlib.image import imread

import pvae
from pvae import cli
from pvae.checkpoint import load_checkpoint
from pvae.inference import evaluate_log_likelihood
from pvae.report.autoencoders import image_split, image_test_loader
from pvae.utils import seed_everything

TINY = ["--num-train", "240", "--num-test", "60", "--batch-size", "60", "--hidden-dim", "32"]


def _json(capsys, argv):
    assert cli.main(argv) == 0
    return json.loads(capsys.readouterr().out)  # stdout holds only the JSON


@pytest.fixture(scope="module")
def trained_vae(tmp_path_factory):
    out = tmp_path_factory.mktemp("vae")
    assert (
        cli.main(["train", "vae", "--epochs", "1", "--z-dim", "2", "--out", str(out), "--json", *TINY]) == 0
    )
    return out


def test_train_vae_writes_checkpoint_history_and_pictures(trained_vae):
    names = {path.name for path in trained_vae.iterdir()}
    expected = {"reconstructions.png", "samples.png", "elbo.png", "latent.png", "manifold.png"}
    assert {"checkpoint.pt", "history.json"} | expected <= names
    for name in expected:  # pictures with something drawn in them
        pixels = imread(str(trained_vae / name))[..., :3]
        assert min(pixels.shape[:2]) >= 28 and pixels.std() > 0.01, name
    saved = load_checkpoint(trained_vae / "checkpoint.pt")
    assert saved["epoch"] == 1 and saved["train_config"]["dataset"] == "mnist5k"
    assert saved["train_config"]["num_train"] == 240 and saved["train_config"]["binarize"] == "dynamic"
    assert saved["family"]["kwargs"]["architecture"] == "mlp"  # the default


def _test_images(binarize, num_test: int = 60):
    """The run's test digits as the CLI evaluates them (the same subset, binarized once if asked)."""
    x, labels = image_split("mnist5k", "test", None, num_test, 0)
    return image_test_loader(x, labels, binarize, torch.device("cpu"))


def test_evaluate_reports_the_in_process_estimate_of_the_checkpoint(trained_vae, capsys):
    result = _json(capsys, ["evaluate", str(trained_vae / "checkpoint.pt"), "--num-samples", "20", "--json"])
    assert set(result) == {"log_likelihood", "stderr", "num_images", "num_samples"}
    assert result["num_images"] == 60 and result["num_samples"] == 20
    # the same checkpoint, data, seed (0, the default) and k, evaluated in this process
    family = pvae.load(str(trained_vae / "checkpoint.pt"))
    seed_everything(0)
    expected = evaluate_log_likelihood(family, _test_images("dynamic"), num_samples=20, progress=False)
    assert result["log_likelihood"] == pytest.approx(expected.log_likelihood, rel=1e-9)
    per_image = expected.per_image
    assert result["stderr"] == pytest.approx(per_image.std().item() / math.sqrt(60), rel=1e-9)
    again = _json(capsys, ["evaluate", str(trained_vae / "checkpoint.pt"), "--num-samples", "20", "--json"])
    assert again == result  # seeded: the same test binarization and importance samples


def test_sample_draws_the_familys_samples_into_a_grid(trained_vae, tmp_path):
    target = tmp_path / "grid.png"
    argv = ["sample", str(trained_vae / "checkpoint.pt"), "-n", "9", "--nrow", "3", "--out", str(target)]
    assert cli.main(argv) == 0
    picture = torch.from_numpy(imread(str(target))[..., 0].copy())  # (H, W), values in [0, 1]
    assert picture.shape == (3 * 30 + 2, 3 * 30 + 2)  # 3 × 3 tiles of 28 × 28 with 2-pixel padding
    family = pvae.load(str(trained_vae / "checkpoint.pt"))
    generator = torch.Generator().manual_seed(0)  # the default --seed
    images = family.sample(9, generator=generator).reshape(9, 28, 28)
    tiles = torch.stack(
        [
            picture[2 + row * 30 : row * 30 + 30, 2 + col * 30 : col * 30 + 30]
            for row in range(3)
            for col in range(3)
        ]
    )  # (9, 28, 28), row-major
    torch.testing.assert_close(tiles, images, atol=1 / 255, rtol=0)  # 8-bit rounding
    assert images.std() > 0.01  # decoded digits, not a blank grid


@pytest.mark.usefixtures("one_thread")  # small conv batches run faster on one thread
def test_train_evaluate_and_sample_a_conv_vae(tmp_path, capsys):
    small = ["--num-train", "60", "--num-test", "20", "--batch-size", "30", "--hidden-dim", "32"]
    argv = ["train", "vae", "--architecture", "conv", "--epochs", "1", "--z-dim", "4", "--out", str(tmp_path)]
    summary = _json(capsys, [*argv, "--json", *small])
    assert math.isfinite(summary["test_elbo"]) and summary["epochs"] == 1
    saved = load_checkpoint(tmp_path / "checkpoint.pt")
    assert saved["family"]["kwargs"]["architecture"] == "conv"
    assert saved["state_dict"]["encoder.0.weight"].shape == (32, 1, 4, 4)  # Conv2d(1 → 32, 4 × 4)
    checkpoint = str(tmp_path / "checkpoint.pt")
    result = _json(capsys, ["evaluate", checkpoint, "--num-samples", "10", "--json"])
    family = pvae.load(checkpoint)
    assert family.architecture == "conv"
    seed_everything(0)
    expected = evaluate_log_likelihood(family, _test_images("dynamic", 20), num_samples=10, progress=False)
    assert result["num_images"] == 20
    assert result["log_likelihood"] == pytest.approx(expected.log_likelihood, rel=1e-9)
    assert cli.main(["sample", checkpoint, "-n", "4", "--out", str(tmp_path / "grid.png")]) == 0


def test_resume_continues_to_the_requested_epochs(tmp_path, capsys):
    argv = ["train", "vae", "--out", str(tmp_path), "--json", "--objective", "iwae", "--num-particles", "3"]
    first = _json(capsys, [*argv, "--epochs", "1", *TINY])
    second = _json(capsys, [*argv, "--epochs", "2", "--resume", *TINY])
    history = json.loads((tmp_path / "history.json").read_text())
    assert second["epochs"] == 2 and history["train_elbo"][0] == first["train_elbo"]
    assert history["objective"] == "iwae"


def test_autoencoders_report_reconstruction_error_and_cannot_sample(tmp_path, capsys):
    _json(capsys, ["train", "dae", "--epochs", "1", "--out", str(tmp_path), "--json", *TINY])
    result = _json(capsys, ["evaluate", str(tmp_path / "checkpoint.pt"), "--json"])
    assert result["log_likelihood"] is None and "no marginal likelihood" in result["note"]
    assert result["num_images"] == 60
    family = pvae.load(str(tmp_path / "checkpoint.pt"))
    x = _test_images(None).data  # grey levels, as the DAE was trained on
    with torch.no_grad():
        errors = (x - family.decoder(family.encoder(x))).square().mean(1).double()  # per image, clean input
    assert result["reconstruction_error"] == pytest.approx(errors.mean().item(), rel=1e-6)
    assert result["stderr"] == pytest.approx(errors.std().item() / math.sqrt(60), rel=1e-6)
    assert cli.main(["sample", str(tmp_path / "checkpoint.pt"), "--out", str(tmp_path / "x.png")]) == 2
    assert "no proper prior" in capsys.readouterr().err


def test_bad_input_gives_exit_code_2_with_a_message(tmp_path, capsys):
    assert cli.main(["evaluate", str(tmp_path / "missing.pt")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert cli.main(["train", "ae", "--objective", "iwae", "--out", str(tmp_path), *TINY]) == 2
    assert "pvae train ae: argument --objective: invalid choice: 'iwae'" in capsys.readouterr().err
    assert cli.main(["train", "vae", "--architecture", "unet", "--out", str(tmp_path), *TINY]) == 2
    assert "argument --architecture: invalid choice: 'unet' (choose from" in capsys.readouterr().err
    assert cli.main(["train", "vae", "--z-dim", "0"]) == 2
    assert "argument --z-dim: must be an integer in [1, " in capsys.readouterr().err


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_train_and_evaluate_on_the_gpu(tmp_path, capsys):
    summary = _json(
        capsys, ["train", "vae", "--device", "cuda", "--epochs", "1", "--out", str(tmp_path), "--json"]
    )
    assert math.isfinite(summary["test_elbo"])
    result = _json(capsys, ["evaluate", str(tmp_path / "checkpoint.pt"), "--device", "cuda", "--json"])
    assert math.isfinite(result["log_likelihood"])
    assert load_checkpoint(tmp_path / "checkpoint.pt")["state_dict"]["decoder.0.weight"].device.type == "cpu"


def test_history_json_is_rewritten_after_every_epoch(tmp_path, capsys, monkeypatch):
    from pvae.cli import common

    seen = []
    write = common.write_history

    def record(history, path):
        write(history, path)
        seen.append(json.loads(open(path).read())["train_elbo"])

    monkeypatch.setattr(common, "write_history", record)
    summary = _json(capsys, ["train", "ae", "--epochs", "2", "--out", str(tmp_path), "--json", *TINY])
    assert [len(elbos) for elbos in seen] == [1, 2] and seen[1][0] == seen[0][0]
    assert json.loads((tmp_path / "history.json").read_text())["train_elbo"][-1] == pytest.approx(
        summary["train_elbo"]
    )
