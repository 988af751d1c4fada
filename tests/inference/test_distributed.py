"""Data-parallel training: 2 CPU processes (gloo) started by torchrun give the one-process results.

Every test launches ``python -m torch.distributed.run`` (torchrun) on the command line or on
``distributed_worker.py`` (one rank's work; it saves what the rank holds), so what runs is what a user runs.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import pvae
from pvae.inference import distributed

WORKER = Path(__file__).with_name("distributed_worker.py")
# a few hundred digits, a small autoencoder: each run takes seconds
AE_FLAGS = [
    "--epochs", "2", "--num-train", "400", "--num-test", "100", "--batch-size", "100",
    "--hidden-dim", "64", "--z-dim", "8", "--device", "cpu", "--json",
]  # fmt: skip


def _environment() -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1")  # 2 processes on 2 cores
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(name, None)
    return env


def _torchrun(*args: str, nproc: int = 2, timeout: float = 240, extra: tuple[str, ...] = ("--standalone",)):
    command = [sys.executable, "-m", "torch.distributed.run", *extra, f"--nproc-per-node={nproc}", *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=_environment())


def _pvae(*args: str):
    command = [sys.executable, "-m", "pvae", *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=240, env=_environment())


def _worker(scenario: str, out: Path, *options: str, nproc: int = 2):
    out.mkdir(parents=True, exist_ok=True)
    return _torchrun(str(WORKER), scenario, str(out), *options, nproc=nproc)


def _ranks(out: Path, world: int = 2) -> list[dict]:
    return [torch.load(out / f"rank{rank}.pt", weights_only=False) for rank in range(world)]


def _max_relative_difference(first: dict, second: dict) -> float:
    assert first.keys() == second.keys()
    worst = 0.0
    for key, value in first.items():
        if value.is_floating_point():
            scale = value.abs().max().clamp_min(1e-12)
            worst = max(worst, float((value - second[key]).abs().max() / scale))
        else:
            assert torch.equal(value, second[key]), key
    return worst


def _assert_ranks_equal(results: list[dict]) -> None:
    for result in results[1:]:
        for key, value in results[0]["state"].items():
            assert torch.equal(value, result["state"][key]), f"{key} differs between ranks"


@pytest.fixture(scope="module")
def ae_one_process(tmp_path_factory):
    out = tmp_path_factory.mktemp("ae1")
    done = _pvae("train", "ae", *AE_FLAGS, "--out", str(out))
    assert done.returncode == 0, done.stderr
    return out


def test_ae_under_torchrun_with_two_processes_equals_one_process(ae_one_process, tmp_path):
    done = _torchrun("-m", "pvae", "train", "ae", *AE_FLAGS, "--out", str(tmp_path))
    assert done.returncode == 0, done.stderr[-3000:]
    assert "process 0 of 2 on cpu" in done.stderr and "process 1 of 2 on cpu" in done.stderr
    summary = json.loads(done.stdout)  # rank 0 alone reports
    assert summary["epochs"] == 2
    one, two = pvae.load(ae_one_process / "checkpoint.pt"), pvae.load(tmp_path / "checkpoint.pt")
    assert _max_relative_difference(one.state_dict(), two.state_dict()) <= 1e-5
    history_one = json.loads((ae_one_process / "history.json").read_text())
    history_two = json.loads((tmp_path / "history.json").read_text())
    for key in ("train_elbo", "test_elbo", "step_losses"):
        assert len(history_one[key]) == len(history_two[key])
        for a, b in zip(history_one[key], history_two[key]):
            assert math.isclose(a, b, rel_tol=1e-5), (key, a, b)
    # the checkpoint is the family's own (no DDP prefixes): evaluate reads it unchanged
    evaluated = _pvae("evaluate", str(tmp_path / "checkpoint.pt"), "--device", "cpu", "--json")
    assert evaluated.returncode == 0, evaluated.stderr


def _noise(history: dict, epoch: int, steps_per_epoch: int) -> float:
    """Standard error of an epoch's mean step loss (per datum) from the spread of its steps."""
    losses = torch.tensor(history["step_losses"][epoch * steps_per_epoch : (epoch + 1) * steps_per_epoch])
    return float(losses.std() / math.sqrt(len(losses)))


def test_vae_with_the_trace_engine_keeps_ranks_equal_and_trains_like_one_process(tmp_path):
    options = ("--family", "vae", "--engine", "trace", "--epochs", "3")
    two = _worker("train", tmp_path / "two", *options)
    assert two.returncode == 0, two.stderr[-3000:]
    one = _worker("train", tmp_path / "one", *options, nproc=1)
    assert one.returncode == 0, one.stderr[-3000:]
    ranks = _ranks(tmp_path / "two")
    _assert_ranks_equal(ranks)
    history_two, history_one = ranks[0]["history"], _ranks(tmp_path / "one", 1)[0]["history"]
    # both improve, and the last epoch's training ELBO agrees within the noise of its steps (a wrongly
    # scaled loss — not the global batch's — would be off by about the ELBO itself)
    assert history_two["train_elbo"][-1] > history_two["train_elbo"][0]
    noise = math.hypot(_noise(history_one, 2, 4), _noise(history_two, 2, 4))
    assert abs(history_two["train_elbo"][-1] - history_one["train_elbo"][-1]) < 5 * noise + 0.5
    assert abs(history_two["test_elbo"][-1] - history_one["test_elbo"][-1]) < 5 * noise + 0.5


def test_ddpm_keeps_denoiser_ema_and_timestep_history_equal_on_every_rank(tmp_path):
    done = _worker("train", tmp_path, "--family", "ddpm", "--time-sampling", "importance")
    assert done.returncode == 0, done.stderr[-3000:]
    ranks = _ranks(tmp_path)
    _assert_ranks_equal(ranks)
    assert any(key.startswith("ema.") for key in ranks[0]["state"])
    assert int(ranks[0]["state"]["ema.n_averaged"]) == 8  # 2 epochs of 4 global batches
    # the importance sampler's history gathers both ranks' terms: every datum of the 2 epochs
    assert int(ranks[0]["state"]["term_counts"].sum()) == 2 * 400


@pytest.mark.parametrize("engine", ["eager", "trace"])
def test_pyro_params_outside_a_module_start_from_rank_0_and_stay_equal(tmp_path, engine):
    done = _worker("free", tmp_path, "--engine", engine)
    assert done.returncode == 0, done.stderr[-3000:]
    ranks = _ranks(tmp_path)
    _assert_ranks_equal(ranks)  # although each rank initialized them differently
    if engine == "trace":  # the recorded graph did the steps, its gradients averaged outside it
        assert ranks[0]["counts"]["graph"] >= 25
    # the guide's family holds the exact posterior N(x/2, 1/2): SVI moves towards it
    assert float((ranks[0]["state"]["weight"] - 0.5).abs().max()) < 0.2


def test_resume_under_torchrun_replays_the_run_and_one_process_resumes_it(tmp_path):
    whole = _worker("train", tmp_path / "whole", "--epochs", "2")
    assert whole.returncode == 0, whole.stderr[-3000:]
    first = _worker("train", tmp_path / "split", "--epochs", "1")
    assert first.returncode == 0, first.stderr[-3000:]
    second = _worker("train", tmp_path / "split", "--epochs", "2", "--resume")
    assert second.returncode == 0, second.stderr[-3000:]
    resumed, uninterrupted = _ranks(tmp_path / "split"), _ranks(tmp_path / "whole")
    for key, value in uninterrupted[0]["state"].items():
        assert torch.equal(value, resumed[0]["state"][key]), key
    assert resumed[0]["history"]["step_losses"] == uninterrupted[0]["history"]["step_losses"]
    # the 2-process checkpoint, continued by one process
    alone = _worker("train", tmp_path / "split", "--epochs", "3", "--resume", nproc=1)
    assert alone.returncode == 0, alone.stderr[-3000:]
    history = _ranks(tmp_path / "split", 1)[0]["history"]
    assert len(history["train_elbo"]) == 3
    assert history["train_elbo"][:2] == uninterrupted[0]["history"]["train_elbo"]


def test_a_killed_rank_ends_the_job_and_keeps_the_last_checkpoint(tmp_path):
    done = _worker("train", tmp_path, "--epochs", "3", "--kill-at", "6")  # in the second epoch
    assert done.returncode != 0
    assert "SIGKILL" in done.stderr or "Signal 9" in done.stderr
    saved = pvae.checkpoint.load_checkpoint(tmp_path / "checkpoint.pt")
    assert saved["epoch"] == 1


def test_nan_on_one_rank_stops_the_job_with_the_divergence_message(tmp_path):
    done = _worker("train", tmp_path, "--epochs", "2", "--nan-at", "5")
    assert done.returncode != 0
    # rank 1's invalid parameters fail its forward pass: it stops, with the reason, and so does the job
    assert "training diverged at epoch 2, step 2" in done.stderr
    assert pvae.checkpoint.load_checkpoint(tmp_path / "checkpoint.pt")["epoch"] == 1


def test_a_batch_size_not_divisible_by_the_processes_is_refused_in_one_line(tmp_path):
    flags = [flag if flag != "100" else "99" for flag in AE_FLAGS]
    done = _torchrun("-m", "pvae", "train", "ae", *flags, "--out", str(tmp_path))
    assert done.returncode != 0
    assert "pvae: error: process 0: batch size 99 is the global batch, split over 2 processes" in done.stderr


def test_outside_torchrun_everything_answers_for_one_process():
    assert not distributed.launched() or "RANK" in os.environ
    assert distributed.world_size() == 1 and distributed.rank() == 0 and distributed.is_main_process()
    x = torch.arange(10.0)
    assert torch.equal(distributed.shard(x, 0, 1), x)
    parts = [distributed.shard(x, rank, 3) for rank in range(3)]
    assert torch.equal(torch.cat(parts), x) and [len(p) for p in parts] == [4, 3, 3]
    assert distributed.shard(x[:2], 0, 3) is None  # fewer points than processes: skipped by all
    seeds = {distributed.rank_seed(0, rank, epoch) for rank in range(4) for epoch in range(4)}
    assert len(seeds) == 16 and all(0 <= seed < 2**32 for seed in seeds)
    assert distributed.from_main_process(lambda: 3) == 3


def test_latent_diffusion_trains_both_stages_under_torchrun(tmp_path):
    flags = [
        "--epochs", "1", "--autoencoder-epochs", "1", "--num-train", "400", "--num-test", "100",
        "--batch-size", "100", "--hidden-dim", "64", "--timesteps", "20", "--prior-hidden-dim", "32",
        "--device", "cpu", "--json", "--out", str(tmp_path),
    ]  # fmt: skip
    done = _torchrun("-m", "pvae", "train", "ldm", *flags)
    assert done.returncode == 0, done.stderr[-3000:]
    assert (tmp_path / "autoencoder" / "checkpoint.pt").is_file() and (tmp_path / "checkpoint.pt").is_file()
    family = pvae.load(tmp_path / "checkpoint.pt")
    assert family.stage == "prior" and float(family.latent_scale) > 0
