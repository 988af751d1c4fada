"""Benchmark: a DDPM training step on pvae's three step engines (eager, trace, compile), same program.

The two-moons model of the demo and of ``benchmarks/ddpm_moons.py`` — ``DDPM(data_shape=(2,),
timesteps=100, ema_decay=0.99)``, the default MLP denoiser, batches of 256 — trained by
:class:`pvae.inference.step.SVIStep` as :func:`pvae.inference.train` runs it, with one timestep per point
(``--time-sampling per_datum``; ``importance`` for Improved DDPM's sampler), on each engine. Every engine
gets its own copy of the same initial weights; blocks of steps are interleaved, the order rotated each
round, and the table gives the median time per step and its ratio to the eager engine's.

Before timing, the same random draws are checked to give the same losses: the trace engine against the
eager one bit for bit (the same kernels), the compile engine (which draws random numbers with torch's own
samplers, as the eager step does) to float32 rounding.

Run: ``python benchmarks/ddpm_engines.py [--objective meanfield] [--time-sampling per_datum]
[--repeats 9] [--block 50] [--threads 1]``; ``--images`` times the digits' U-Net (1×28×28, T = 1000,
batch 64) instead.
"""

from __future__ import annotations

import argparse
import statistics
import time

import pyro
import torch

from pvae.data import BatchLoader, load_images, to_model_space, two_moons
from pvae.inference.step import ENGINES, SVIStep
from pvae.models.diffusion import DDPM
from pvae.report.diffusion import TWO_MOONS_NOISE


def make_step(args, engine: str, seed: int = 0) -> tuple[DDPM, SVIStep]:
    torch.manual_seed(seed)  # the same initial weights on every engine
    if args.images:
        family = DDPM(
            data_shape=(1, 28, 28), timesteps=1000, channels=(16, 32), time_sampling=args.time_sampling
        )
    else:
        family = DDPM(data_shape=(2,), timesteps=100, ema_decay=0.99, time_sampling=args.time_sampling)
    family.train()
    model, guide, elbo = family.svi_program(args.objective)[:3]
    step = SVIStep(model, guide, elbo, lr=1e-3, engine=engine, module=family, after_step=family.after_step)
    return family, step


def losses(args, engine: str, batches: list[torch.Tensor]) -> torch.Tensor:
    pyro.clear_param_store()
    _, step = make_step(args, engine)
    torch.manual_seed(1)
    return torch.stack([step(x) for x in batches])


def check_same_draws(args, batches: list[torch.Tensor]) -> list[str]:
    eager = losses(args, "eager", batches)
    traced = losses(args, "trace", batches)
    compiled = losses(args, "compile", batches)
    lines = [
        f"trace vs eager, {len(batches)} steps: identical losses: {bool(torch.equal(traced, eager))} "
        f"(largest difference {float((traced - eager).abs().max()):.3g})",
        f"compile (eager random numbers) vs eager: largest relative difference "
        f"{float(((compiled - eager) / eager).abs().max()):.3g}",
    ]
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--objective", default="meanfield", choices=["elbo", "meanfield", "simple"])
    parser.add_argument(
        "--time-sampling", default="per_datum", choices=["per_datum", "stratified", "importance"]
    )
    parser.add_argument("--engines", nargs="+", default=list(ENGINES), choices=ENGINES)
    parser.add_argument("--repeats", type=int, default=9, help="interleaved blocks per engine")
    parser.add_argument("--block", type=int, default=50, help="steps per block")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (small nets: 1 is fastest)")
    parser.add_argument("--images", action="store_true", help="the digits' U-Net instead of two moons")
    parser.add_argument("--skip-check", action="store_true", help="skip the same-draws check")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    if args.images:
        pixels = to_model_space(load_images("mnist5k", "train").pixels[:2048]).unsqueeze(1)
        loader = BatchLoader(pixels, batch_size=64, seed=0)
    else:
        points = two_moons(4096, noise=TWO_MOONS_NOISE, generator=torch.Generator().manual_seed(0))
        loader = BatchLoader(points, batch_size=256, seed=0)
    batches = [batch[0] if isinstance(batch, tuple | list) else batch for batch in loader]
    if not args.skip_check:
        for line in check_same_draws(args, batches[:8]):
            print(line)

    pyro.clear_param_store()
    steps = {engine: make_step(args, engine)[1] for engine in args.engines}
    for step in steps.values():  # warm up: the first eager step, recording, compiling
        for x in batches[:3]:
            step(x)
    times: dict[str, list[float]] = {engine: [] for engine in args.engines}
    order = list(args.engines)
    cursor = 0
    for _ in range(args.repeats):
        for engine in order:
            step = steps[engine]
            started = time.perf_counter()
            for index in range(args.block):
                step(batches[(cursor + index) % len(batches)])
            times[engine].append((time.perf_counter() - started) / args.block)
        cursor += args.block
        order = order[1:] + order[:1]
    for engine, step in steps.items():
        if step.disabled_reason is not None or step.counts["guard_failures"]:
            print(f"{engine}: {step.counts}, {step.disabled_reason}")

    model = "U-Net (16, 32), T = 1000, batch 64" if args.images else "two moons, MLP, T = 100, batch 256"
    print(
        f"\nDDPM step ({model}; {args.objective}, {args.time_sampling} timesteps; {args.threads} thread(s); "
        f"median of {args.repeats} blocks of {args.block} steps)\n"
    )
    print("| engine | ms per step | speed-up over eager |")
    print("| --- | ---: | ---: |")
    eager = statistics.median(times["eager"]) if "eager" in times else None
    for engine in args.engines:
        median = statistics.median(times[engine])
        ratio = "—" if eager is None else f"{eager / median:.2f}×"
        print(f"| {engine} | {1e3 * median:.2f} | {ratio} |")


if __name__ == "__main__":
    main()
