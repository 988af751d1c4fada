"""Benchmark: which training objective gives the best diffusion model of two moons, by its exact ELBO and its
samples — L_simple against the ELBO with importance-sampled timesteps and learned variances.

Every variant trains ``DDPM(data_shape=(2,), timesteps=100, ema_decay=0.99)`` (linear schedule, the
default MLP denoiser; ``pvae.report.diffusion.train_moons_variant``, as the demo does) on the demo's
budget: 4,000 points, 200 epochs of batches of 256 (3,200 Adam steps), the learning rate decayed
geometrically from 1e-2 to 1e-4. Variants (objective, time sampler, variances):

- ``simple`` — L_simple, one uniform timestep per point, fixed σ_t² = β_t (the demo's recommendation);
- ``meanfield`` — the ELBO with closed-form step KLs, uniform timesteps per point;
- ``meanfield+is`` — the same with Improved DDPM's importance-sampled timesteps (p_t ∝ √E[L_t²]);
- ``meanfield+is+learned`` — and learned reverse variances;
- ``hybrid+learned`` — L_simple + λ·L_vlb with learned variances, uniform timesteps per point.

Per seed, every model is scored on the **same** 2,000 fresh points with the same draws of x_t (the exact
``DDPM.elbo``: all T terms in closed form), so the differences to ``simple`` are paired: mean ± standard
error over the points. Samples: MMD² (Gaussian kernel, width 0.25) of 1,000 samples against 1,000 fresh
points, divided by the 95th percentile of MMD² between two independent data sets of that size (below 1:
the test does not tell the samples from data). The last table gives, over seeds, the mean difference to
``simple`` and its between-seed standard error.

Run: ``python benchmarks/ddpm_moons.py [--seeds 0 1 2] [--variants …] [--epochs 200]``
"""

from __future__ import annotations

import argparse
import math
import statistics
import time

import torch

from pvae.data import BatchLoader, two_moons
from pvae.report.diffusion import MOONS_SCHEDULE, MOONS_VARIANTS, TWO_MOONS_NOISE, train_moons_variant
from pvae.two_sample import mmd2, mmd2_null
from pvae.utils import seed_everything

DEFAULT_VARIANTS = ["simple", "meanfield", "meanfield+is", "meanfield+is+learned", "hybrid+learned"]
BANDWIDTH = 0.25


def run_seed(seed: int, variants: list[str], epochs: int, threads: int) -> dict[str, dict]:
    torch.set_num_threads(threads)
    generator = seed_everything(seed)
    data = two_moons(4000, noise=TWO_MOONS_NOISE, generator=generator)
    test = two_moons(2000, noise=TWO_MOONS_NOISE, generator=generator)
    reference = two_moons(1000, noise=TWO_MOONS_NOISE, generator=generator)
    null = mmd2_null(lambda n: two_moons(n, noise=TWO_MOONS_NOISE, generator=generator), 1000, BANDWIDTH)
    threshold = null.quantile(0.95).item()
    results = {}
    _, lr, lr_end = MOONS_SCHEDULE["full"]
    for name in variants:
        loader = BatchLoader(data, batch_size=256, seed=seed)
        started = time.perf_counter()
        family, _ = train_moons_variant(
            name, loader, timesteps=100, epochs=epochs, lr=lr, lr_end=lr_end, seed=seed
        )
        seconds = time.perf_counter() - started
        elbo = family.elbo(test, generator=torch.Generator().manual_seed(1000 + seed))  # same draws for all
        torch.manual_seed(2000 + seed)
        samples = family.sample(1000, progress=False)
        results[name] = {
            "elbo": elbo,
            "mmd_ratio": mmd2(samples, reference, BANDWIDTH) / threshold,
            "seconds": seconds,
        }
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--variants", nargs="+", default=DEFAULT_VARIANTS, choices=list(MOONS_VARIANTS))
    parser.add_argument("--epochs", type=int, default=200)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (small nets: 1 is fastest)")
    args = parser.parse_args()
    if "simple" not in args.variants:
        args.variants.insert(0, "simple")
    differences: dict[str, list[float]] = {name: [] for name in args.variants if name != "simple"}
    passed: dict[str, int] = dict.fromkeys(args.variants, 0)
    for seed in args.seeds:
        results = run_seed(seed, args.variants, args.epochs, args.threads)
        base = results["simple"]["elbo"]
        print(f"\nseed {seed}\n")
        print("| variant | train s | test ELBO (nats/point) | − simple (paired) | MMD² ÷ 95th pct |")
        print("| --- | ---: | ---: | ---: | ---: |")
        for name, result in results.items():
            elbo = result["elbo"]
            se = elbo.std().item() / math.sqrt(len(elbo))
            diff = elbo - base
            paired = (
                "—"
                if name == "simple"
                else f"{diff.mean():+.4f} ± {diff.std().item() / math.sqrt(len(diff)):.4f}"
            )
            if name != "simple":
                differences[name].append(diff.mean().item())
            passed[name] += result["mmd_ratio"] < 1
            print(
                f"| {name} | {result['seconds']:.0f} | {elbo.mean():.4f} ± {se:.4f} | {paired} | "
                f"{result['mmd_ratio']:.2f} |",
                flush=True,
            )
    print(f"\nover seeds {args.seeds}: mean paired difference to simple (nats/point) ± between-seed SE\n")
    print("| variant | mean − simple | between-seed SE | seeds with samples below the 95th pct |")
    print("| --- | ---: | ---: | ---: |")
    for name in args.variants:
        if name == "simple":
            print(f"| simple | — | — | {passed[name]}/{len(args.seeds)} |")
            continue
        values = differences[name]
        se = statistics.stdev(values) / math.sqrt(len(values)) if len(values) > 1 else float("nan")
        print(f"| {name} | {statistics.mean(values):+.4f} | {se:.4f} | {passed[name]}/{len(args.seeds)} |")


if __name__ == "__main__":
    main()
