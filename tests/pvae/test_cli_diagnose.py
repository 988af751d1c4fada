"""pvae diagnose: k̂, inference gaps and SBC of tiny trained checkpoints, against the same computation in
process; families that cannot be diagnosed are refused in one line, saying why."""

import dataclasses
import json

import pytest
import torch
from matplotlib.image import imread

import pvae
import pvae.inference
from pvae import cli
from pvae.cli import register_commands, registered_commands
from pvae.inference import inference_gaps, pareto_khat
from pvae.report.autoencoders import image_split, image_test_loader
from pvae.utils import seed_everything

TINY = ["--num-train", "240", "--num-test", "60", "--batch-size", "60", "--hidden-dim", "32", "--json"]
SIZES = ["--num-test", "20", "--num-samples", "100", "--num-steps", "20"]


def _train(tmp_path_factory, *argv):
    out = tmp_path_factory.mktemp(argv[0])
    assert cli.main(["train", *argv, "--epochs", "1", "--out", str(out)]) == 0
    return str(out / "checkpoint.pt")


@pytest.fixture(scope="module")
def vae(tmp_path_factory):
    return _train(tmp_path_factory, "vae", "--z-dim", "2", *TINY)


@pytest.fixture(scope="module")
def autoencoder(tmp_path_factory):
    return _train(tmp_path_factory, "ae", "--z-dim", "2", *TINY)


def _one_error_line(capsys) -> str:
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert captured.out == "" and len(lines) == 1 and lines[0].startswith("pvae: error: "), captured.err
    return lines[0]


def test_khat_and_gaps_are_the_in_process_diagnostics_of_the_evaluated_digits(vae, capsys):
    assert cli.main(["diagnose", vae, "--khat", "--gaps", "--json", *SIZES]) == 0
    payload = json.loads(capsys.readouterr().out)  # stdout holds only the JSON
    assert payload["family"] == "vae" and payload["num_test"] == 20 and payload["seed"] == 0
    khat, gaps = payload["khat"], payload["gaps"]
    assert len(khat["per_datum"]) == 20 and khat["num_samples"] == 100
    shares = khat["fraction_good"] + khat["fraction_usable"] + khat["fraction_unreliable"]
    assert shares == pytest.approx(1.0)
    # the decomposition: approximation + amortization = log p(x) − ELBO(q_φ), per datum and on average
    per_datum = {key: torch.tensor(value) for key, value in gaps["per_datum"].items()}
    inference_gap = per_datum["log_marginal"] - per_datum["elbo_amortized"]
    parts = per_datum["approximation_gap"] + per_datum["amortization_gap"]
    assert torch.allclose(parts, inference_gap, atol=1e-4)
    total = gaps["approximation_gap"] + gaps["amortization_gap"]
    assert total == pytest.approx(gaps["log_marginal"] - gaps["elbo_amortized"], abs=1e-4)
    assert gaps["num_samples"] == 100 and gaps["num_steps"] == 20 and not gaps["log_marginal_exact"]

    # the same checkpoint, the digits pvae evaluate scores (seed-0 subset, binarized once) and seed 0
    family = pvae.load(vae)
    digits, labels = image_split("mnist5k", "test", None, 20, 0)
    x = image_test_loader(digits, labels, "dynamic", torch.device("cpu")).data
    seed_everything(0)
    expected_khat = pareto_khat(family.model, family.guide, x, num_samples=100)
    assert khat["per_datum"] == pytest.approx(expected_khat.tolist(), abs=1e-9)
    seed_everything(0)
    expected = inference_gaps(family.model, family.guide, x, num_samples=100, num_steps=20, num_particles=4)
    for key in ("log_marginal", "elbo_amortized", "elbo_optimal", "approximation_gap", "amortization_gap"):
        assert gaps[key] == pytest.approx(getattr(expected, key), abs=1e-6), key


def test_text_output_reads_as_tables_and_sbc_draws_its_plot(vae, tmp_path, capsys):
    argv = [
        "diagnose",
        vae,
        "--num-simulations",
        "20",
        "--num-posterior-samples",
        "19",
        "--out",
        str(tmp_path),
    ]
    assert cli.main([*argv, *SIZES]) == 0  # no diagnostic named: --khat --gaps
    text = capsys.readouterr().out
    assert "Pareto k̂" in text and "(unreliable)" in text and "amortization_gap" in text and "SBC" not in text
    assert cli.main([*argv, "--sbc", "--json"]) == 0
    payload = json.loads(capsys.readouterr().out)
    assert set(payload) == {"checkpoint", "family", "seed", "sbc"}  # SBC needs no test data
    result = payload["sbc"]
    assert 0.0 <= result["p_values"]["z"] <= 1.0 and isinstance(result["ecdf_inside_band"]["z"], bool)
    ranks = torch.tensor(result["ranks"]["z"])
    assert ranks.shape == (20, 1, 2) and ranks.min() >= 0 and ranks.max() <= 19
    assert result["plot"] == str(tmp_path / "sbc.png") and imread(result["plot"]).std() > 0.05


def test_sbc_of_an_autoencoder_is_refused_naming_its_flat_prior(autoencoder, capsys):
    assert cli.main(["diagnose", autoencoder, "--sbc"]) == 2
    line = _one_error_line(capsys)
    assert "prior predictive" in line and "flat (improper)" in line
    assert cli.main(["diagnose", autoencoder, "--khat"]) == 2
    assert "point mass (Delta)" in _one_error_line(capsys)


def test_gaps_of_a_guide_without_parameters_are_refused(tmp_path_factory, capsys):
    checkpoint = _train(
        tmp_path_factory, "ddpm", "--dataset", "two-moons", "--timesteps", "5", "--num-train", "128",
        "--num-test", "16", "--batch-size", "64", "--hidden-dim", "16", "--json",
    )  # fmt: skip
    capsys.readouterr()
    assert cli.main(["diagnose", checkpoint, "--gaps", "--num-samples", "50"]) == 2
    assert "no parameters" in _one_error_line(capsys)
    assert cli.main(["diagnose", checkpoint, "--khat", "--num-samples", "50", "--json"]) == 0
    assert len(json.loads(capsys.readouterr().out)["khat"]["per_datum"]) == 16


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--num-samples", "0"], "argument --num-samples: must be an integer in [50"),
        (["--num-test", "0"], "argument --num-test: must be an integer in [1"),
        (["--num-steps", "many"], "argument --num-steps: must be an integer, got 'many'"),
        (["--num-simulations", "-3"], "argument --num-simulations: must be an integer in [1"),
        (["--seed", "-1"], "argument --seed"),
        (["--threads", "0"], "argument --threads: must be an integer in [1"),
    ],
    ids=["samples", "test", "steps", "simulations", "seed", "threads"],
)
def test_bad_flags_exit_2_with_one_line(vae, flags, message, capsys):
    assert cli.main(["diagnose", vae, *flags]) == 2
    assert message in _one_error_line(capsys)


def test_a_missing_checkpoint_is_one_line(tmp_path, capsys):
    assert cli.main(["diagnose", str(tmp_path / "none.pt")]) == 2
    assert "does not exist" in _one_error_line(capsys)


def test_threads_hold_for_the_run_and_are_restored(vae, capsys, monkeypatch):
    before = torch.get_num_threads()
    threads = 1 if before > 1 else 2
    seen = []

    def counted(*args, **kwargs):
        seen.append(torch.get_num_threads())
        return pareto_khat(*args, **kwargs)

    monkeypatch.setattr(pvae.inference, "pareto_khat", counted)
    argv = ["diagnose", vae, "--khat", "--json", *SIZES, "--threads", str(threads)]
    assert cli.main(argv) == 0
    assert len(json.loads(capsys.readouterr().out)["khat"]["per_datum"]) == 20
    assert seen == [threads] and torch.get_num_threads() == before


def test_khat_and_gaps_need_the_familys_test_data_reader(vae, capsys):
    spec = registered_commands()["vae"]
    register_commands("vae", dataclasses.replace(spec, test_data=None))
    try:
        assert cli.main(["diagnose", vae, "--khat"]) == 2
    finally:
        register_commands("vae", spec)
    line = _one_error_line(capsys)
    assert "knows no test data" in line and "test_data" in line
