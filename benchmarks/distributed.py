"""Benchmark: data-parallel training under torchrun — 1 process × 2 threads against 2 processes × 1 thread.

Both layouts run ``pvae.inference.train`` on the same global batches (the batch size is the global batch,
split over the processes), so they do the same arithmetic per epoch; what differs is how the cores share it
(intra-op threads inside each matrix product, or one process per half-batch plus a gradient all-reduce).

- **VAE**: 784-400-20 MLP, Trace_ELBO, the 4,000 mnist5k training digits dynamically binarized, batch 128;
- **DDPM**: the digits' U-Net denoiser (channels 16, 32), T = 1000, ``meanfield`` objective with one
  timestep per datum, the first ``--ddpm-images`` training digits in [−1, 1], batch 64.

For each, the table gives images per second (the median over epochs 2…E: the first holds one-time costs)
and, for 2 processes, the **communication share** of a step: the time of averaging that family's gradients
over the processes with :func:`pvae.inference.distributed.average_gradients` (one flattened all-reduce,
what DistributedDataParallel does in buckets), timed alone after training, divided by the median step time.
DDP overlaps its all-reduce with the backward pass, so this is an upper bound of what communication costs.

Run: ``python benchmarks/distributed.py [--epochs 4] [--families vae ddpm] [--ddpm-images 1024]``; it
starts torchrun itself (``python -m torch.distributed.run --standalone``) for each layout.

``--two-nodes`` instead checks a 2-"node" run on this machine: ``pvae train ae`` by one process, then by two
torchrun launchers (``--nnodes=2 --nproc-per-node=1 --rdzv-backend=c10d``, rendezvous on localhost),
and prints the largest relative difference between the two runs' parameters (float rounding: the same
global batches, the same loss). It is kept out of the test suite: under heavy load its gloo workers were
seen to abort (SIGABRT) while connecting across the two launchers.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

import torch

LAYOUTS = ((1, 2), (2, 1))  # (processes, threads per process)


def _family_and_data(name: str, ddpm_images: int):
    from pvae.data import BatchLoader, load_images, to_model_space
    from pvae.models.diffusion import DDPM
    from pvae.models.vae import VAE

    images = load_images("mnist5k", "train")
    if name == "vae":
        loader = BatchLoader(images.flat(), batch_size=128, binarize="dynamic", seed=0)
        return VAE(z_dim=20, hidden_dim=400), loader, "elbo"
    x = to_model_space(images.pixels[:ddpm_images]).unsqueeze(1)
    family = DDPM(
        data_shape=(1, 28, 28), timesteps=1000, channels=(16, 32), time_sampling="per_datum", ema_decay=0.999
    )
    return family, BatchLoader(x, batch_size=64, seed=0), "meanfield"


def _worker(args) -> None:
    from pvae.inference import distributed, train
    from pvae.utils import seed_everything

    distributed.setup("cpu")
    torch.set_num_threads(args.threads)
    seed_everything(0)
    family, loader, objective = _family_and_data(args.family, args.ddpm_images)
    history = train(family, loader, epochs=args.epochs, objective=objective, seed=0, progress=False)
    step_seconds = statistics.median(history.epoch_seconds[1:]) / len(loader)
    params = [p for p in family.parameters() if p.requires_grad]
    for p in params:
        p.grad = torch.ones_like(p)
    rounds = 20
    distributed.average_gradients(params)  # warm up the connection
    started = time.perf_counter()
    for _ in range(rounds):
        distributed.average_gradients(params)
    reduce_seconds = (time.perf_counter() - started) / rounds
    if distributed.is_main_process():
        result = {
            "images_per_second": loader.num_examples / statistics.median(history.epoch_seconds[1:]),
            "step_seconds": step_seconds,
            "reduce_seconds": reduce_seconds if distributed.world_size() > 1 else 0.0,
            "parameters": sum(p.numel() for p in params),
        }
        with open(args.result, "w") as handle:
            json.dump(result, handle)
    distributed.teardown()


def _launch(family: str, processes: int, threads: int, args) -> dict:
    with tempfile.TemporaryDirectory() as folder:
        result = os.path.join(folder, "result.json")
        env = dict(os.environ, OMP_NUM_THREADS=str(threads))
        command = [
            sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={processes}",
            __file__, "--worker", "--family", family, "--threads", str(threads), "--epochs", str(args.epochs),
            "--ddpm-images", str(args.ddpm_images), "--result", result,
        ]  # fmt: skip
        done = subprocess.run(command, capture_output=True, text=True, env=env)
        if done.returncode != 0:
            raise SystemExit(f"{family} with {processes} process(es) failed:\n{done.stderr[-3000:]}")
        with open(result) as handle:
            return json.load(handle)


AE_FLAGS = [
    "--epochs", "2", "--num-train", "400", "--num-test", "100", "--batch-size", "100",
    "--hidden-dim", "64", "--z-dim", "8", "--device", "cpu", "--json",
]  # fmt: skip


def two_nodes() -> None:
    """The AE trained by one process and by two c10d 'nodes' on this machine: parameters compared."""
    import socket

    import pvae

    env = dict(os.environ, OMP_NUM_THREADS="1")
    with tempfile.TemporaryDirectory() as folder:
        one, two = os.path.join(folder, "one"), os.path.join(folder, "two")
        command = [sys.executable, "-m", "pvae", "train", "ae", *AE_FLAGS, "--out", one]
        subprocess.run(command, check=True, capture_output=True, env=env)
        with socket.socket() as probe:  # a free port for the rendezvous
            probe.bind(("localhost", 0))
            port = probe.getsockname()[1]
        node = [
            sys.executable, "-m", "torch.distributed.run", "--nnodes=2", "--nproc-per-node=1",
            "--rdzv-backend=c10d", f"--rdzv-endpoint=localhost:{port}", "--rdzv-id=pvae-bench",
            "-m", "pvae", "train", "ae", *AE_FLAGS, "--out", two,
        ]  # fmt: skip
        launchers = [
            subprocess.Popen(node, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env) for _ in "ab"
        ]
        codes = [launcher.wait() for launcher in launchers]
        if codes != [0, 0]:
            raise SystemExit(f"the two launchers exited with {codes}")
        first = pvae.load(os.path.join(one, "checkpoint.pt")).state_dict()
        second = pvae.load(os.path.join(two, "checkpoint.pt")).state_dict()
        worst = max(
            float((first[key] - second[key]).abs().max() / first[key].abs().max().clamp_min(1e-12))
            for key in first
        )
        print(
            f"AE, 1 process vs 2 c10d nodes on one machine: largest relative parameter difference {worst:.1e}"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--families", nargs="+", default=["vae", "ddpm"], choices=["vae", "ddpm"])
    parser.add_argument("--ddpm-images", type=int, default=1024)
    parser.add_argument("--two-nodes", action="store_true", help="check a 2-node run against 1 process")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--family", default="vae", help=argparse.SUPPRESS)
    parser.add_argument("--threads", type=int, default=1, help=argparse.SUPPRESS)
    parser.add_argument("--result", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.epochs < 2:
        parser.error("--epochs must be at least 2 (the first epoch is left out of the timing)")
    if args.worker:
        _worker(args)
        return
    if args.two_nodes:
        two_nodes()
        return
    print(f"torch {torch.__version__}, {os.cpu_count()} CPU(s); median over epochs 2…{args.epochs}\n")
    print("| family | processes × threads | images/s | step (ms) | all-reduce (ms) | communication share |")
    print("| --- | --- | ---: | ---: | ---: | ---: |")
    for family in args.families:
        baseline = None
        for processes, threads in LAYOUTS:
            result = _launch(family, processes, threads, args)
            baseline = baseline or result["images_per_second"]
            share = result["reduce_seconds"] / result["step_seconds"] if processes > 1 else None
            print(
                f"| {family} | {processes} × {threads} | {result['images_per_second']:.0f} "
                f"({result['images_per_second'] / baseline:.2f}×) | {1000 * result['step_seconds']:.1f} | "
                f"{1000 * result['reduce_seconds']:.2f} | {'—' if share is None else f'{share:.1%}'} |",
                flush=True,
            )


if __name__ == "__main__":
    main()
