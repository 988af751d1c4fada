"""Benchmark: DDPM in pvae (Pyro model/guide pair) vs hand-written PyTorch, same U-Net, same digits.

Three measurements, printed as tables:

1. **Training step.** One optimizer step on a batch of mnist5k digits (model space, 1×28×28) with the same
   U-Net: pvae's generic step (``pvae.inference.step.SVIStep``, the one ``pvae.inference.train`` runs) on
   the time-subsampled pair from ``DDPM.svi_program`` — ``"elbo"`` (Trace_ELBO) and ``"simple"``
   (L_simple through TraceMeanField_ELBO) — against a hand-written L_simple step (t and ε drawn, MSE,
   backward, Adam; pvae's side also updates the EMA of the weights). Blocks of steps are interleaved, the
   order rotated each round (A B C, B C A, …); the ratio is median time per step pvae / hand-written.
2. **Sampling.** ``DDPM.sample`` (ancestral, T steps, n images) against a hand-written loop
   x ← (x − β_t/√(1−ᾱ_t)·ε_θ(x, t))/√α_t + σ_t z with the same network; interleaved repetitions, medians.
3. **Bits/dim.** Models trained with each objective for the same number of steps (same batch size, seed,
   learning rate, EMA), evaluated by the same exact ``DDPM.bits_per_dim`` (all T terms, closed-form KLs,
   EMA weights) on an evenly spread subset of the mnist5k test split; mean ± standard error over images.
   pvae's objectives draw one timestep per step for the whole batch (the time plate), or one per image
   with ``/per_datum`` (``DDPM(time_sampling="per_datum")``), ``/stratified`` or ``/importance`` (Improved
   DDPM's importance-sampled timesteps); a third part ``/learned`` learns the reverse variances
   (``reverse_variance="learned"``, e.g. ``meanfield/importance/learned``, ``hybrid/per_datum/learned``);
   ``hand-simple`` is the hand-written L_simple step, which draws a timestep per image.

Run: ``python benchmarks/ddpm_vs_torch.py`` (the defaults; about two hours on 2 CPU cores — part 3
trains seven models and evaluates each with 1,000 network passes per test image). One part at a time:
``--parts steps``, ``--parts sampling``, ``--parts bpd --objectives simple hand-simple``.
Quicker: ``python benchmarks/ddpm_vs_torch.py --channels 16 32 --train-steps 100 --eval-images 8``
"""

import argparse
import math
import statistics
import time

import pyro
import torch
from torch.nn import functional as F

from pvae.data import BatchLoader, load_images, to_model_space
from pvae.inference.step import SVIStep
from pvae.models.diffusion import DDPM
from pvae.utils import seed_everything


def make_family(args, seed: int, time_sampling: str = "plate", reverse_variance: str = "beta") -> DDPM:
    seed_everything(seed)  # the same initial U-Net weights for every side (but the learned variances' head)
    return DDPM(
        data_shape=(1, 28, 28),
        timesteps=args.timesteps,
        schedule=args.schedule,
        channels=tuple(args.channels),
        ema_decay=args.ema_decay,
        time_sampling=time_sampling,
        reverse_variance=reverse_variance,
    )


class HandWrittenTrainer:
    """DDPM Algorithm 1 with the same network: t ~ U{1..T} per image, ε ~ N(0, I), ‖ε − ε_θ(x_t, t)‖²."""

    def __init__(self, family: DDPM, lr: float):
        self.net = family.denoiser
        self.sqrt_alpha_bar = family.sqrt_alpha_bar.clone()
        self.sqrt_one_minus_alpha_bar = family.sqrt_one_minus_alpha_bar.clone()
        self.timesteps = family.timesteps
        self.optimizer = torch.optim.Adam(self.net.parameters(), lr=lr, fused=True)

    def step(self, x0: torch.Tensor) -> torch.Tensor:
        t = torch.randint(1, self.timesteps + 1, (x0.shape[0],), device=x0.device)
        noise = torch.randn_like(x0)
        view = (-1, 1, 1, 1)
        x_t = self.sqrt_alpha_bar[t].view(view) * x0 + self.sqrt_one_minus_alpha_bar[t].view(view) * noise
        loss = F.mse_loss(self.net(x_t, t), noise)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        return loss.detach()


@torch.no_grad()
def hand_written_sample(family: DDPM, count: int, generator: torch.Generator) -> torch.Tensor:
    """DDPM Algorithm 2, written out: the coefficients as Python floats, the network called once per step."""
    beta = family.beta.tolist()
    alpha_bar = family.alpha_bar.tolist()
    x = torch.randn((count, 1, 28, 28), generator=generator)
    for t in range(family.timesteps, 0, -1):
        eps = family.denoiser(x, torch.full((count,), t))
        x = (x - beta[t] / math.sqrt(1 - alpha_bar[t]) * eps) / math.sqrt(1 - beta[t])
        if t > 1:
            x = x + math.sqrt(beta[t]) * torch.randn(x.shape, generator=generator)
    return x


def timed(function) -> float:
    start = time.perf_counter()
    function()
    return time.perf_counter() - start


def bench_steps(args, train_x) -> list[tuple[str, float, float]]:
    families, steps = {}, {}
    for objective in ("elbo", "simple"):
        pyro.clear_param_store()
        family = make_family(args, args.seed)
        model, guide, loss = family.svi_program(objective)
        families[objective] = family
        steps[objective] = SVIStep(
            model, guide, loss, lr=args.lr, module=family, after_step=family.after_step
        )
    hand = HandWrittenTrainer(make_family(args, args.seed), args.lr)
    loader = iter(BatchLoader(train_x, batch_size=args.batch_size, seed=args.seed, drop_last=True))
    batch = next(loader)[0]
    for run in (steps["elbo"], steps["simple"], hand.step):  # warm-up: parameters, optimizer state
        run(batch)
    sides = {
        "pvae elbo (Trace_ELBO, subsampled pair)": lambda: steps["elbo"](batch),
        "pvae simple (L_simple, same pair)": lambda: steps["simple"](batch),
        "hand-written L_simple": lambda: hand.step(batch),
    }
    times = {name: [] for name in sides}
    names = list(sides)
    for repeat in range(args.repeats):
        shift = repeat % len(names)  # rotate the order so no side always runs first
        for name in names[shift:] + names[:shift]:
            run = sides[name]
            times[name].append(timed(lambda run=run: [run() for _ in range(args.block)]) / args.block)
    base = statistics.median(times["hand-written L_simple"])
    return [
        (name, statistics.median(values), statistics.median(values) / base) for name, values in times.items()
    ]


def bench_sampling(args) -> list[tuple[str, float, float]]:
    family = make_family(args, args.seed)
    family.eval()
    sides = {
        "pvae DDPM.sample": lambda g: family.sample(args.sample_images, generator=g, progress=False),
        "hand-written loop": lambda g: hand_written_sample(family, args.sample_images, g),
    }
    first = {name: run(torch.Generator().manual_seed(0)) for name, run in sides.items()}
    difference = (first["pvae DDPM.sample"] - first["hand-written loop"]).norm() / first[
        "hand-written loop"
    ].norm()
    if difference > 1e-4:  # same draws, same network: only float rounding may differ
        raise AssertionError(f"the two samplers disagree: relative difference {difference:.2e}")
    times = {name: [] for name in sides}
    for repeat in range(args.sample_repeats):
        order = list(sides.items()) if repeat % 2 == 0 else list(sides.items())[::-1]
        for name, run in order:
            generator = torch.Generator().manual_seed(repeat)
            times[name].append(timed(lambda run=run, generator=generator: run(generator)))
    base = statistics.median(times["hand-written loop"])
    return [
        (name, statistics.median(values), statistics.median(values) / base) for name, values in times.items()
    ]


def bench_bits_per_dim(args, train_x, test_x) -> list[tuple]:
    rows = []
    subset = test_x[:: max(1, len(test_x) // args.eval_images)][: args.eval_images]
    for objective in args.objectives:
        pyro.clear_param_store()
        name, time_sampling, variance = ([*objective.split("/"), "", ""])[:3]  # e.g. "simple/per_datum"
        family = make_family(args, args.seed, time_sampling or "plate", variance or "beta")
        if objective == "hand-simple":  # per-image t, written out; the same EMA
            trainer = HandWrittenTrainer(family, args.lr)

            def step(batch, trainer=trainer, family=family):
                trainer.step(batch)
                family.after_step()

        else:
            model, guide, loss = family.svi_program(name)
            step = SVIStep(model, guide, loss, lr=args.lr, module=family, after_step=family.after_step)
        loader = BatchLoader(train_x, batch_size=args.batch_size, seed=args.seed, drop_last=True)
        seed_everything(args.seed)
        done, started = 0, time.perf_counter()
        while done < args.train_steps:
            for batch, _ in loader:
                step(batch)
                done += 1
                if done == args.train_steps:
                    break
        train_seconds = time.perf_counter() - started
        started = time.perf_counter()
        seed_everything(args.seed)
        family.eval()
        bits = torch.cat([family.bits_per_dim(chunk) for chunk in subset.split(args.eval_batch)]).double()
        eval_seconds = time.perf_counter() - started
        rows.append(
            (
                objective,
                args.train_steps,
                train_seconds,
                bits.mean().item(),
                bits.std().item() / math.sqrt(len(bits)),
                len(bits),
                eval_seconds,
            )
        )
        print(f"  {objective}: {rows[-1][3]:.3f} ± {rows[-1][4]:.3f} bits/dim", flush=True)
    return rows


def main(args):
    torch.set_num_threads(args.threads)
    pyro.enable_validation(True)
    train_x = to_model_space(load_images("mnist5k", "train").pixels).unsqueeze(1)  # (4000, 1, 28, 28)
    test_x = to_model_space(load_images("mnist5k", "test").pixels).unsqueeze(1)  # (1000, 1, 28, 28)
    print(
        f"U-Net channels {tuple(args.channels)}, T = {args.timesteps} ({args.schedule}), "
        f"batch {args.batch_size}, torch threads {torch.get_num_threads()}"
    )
    if "steps" in args.parts:
        rows = bench_steps(args, train_x)
        print(f"\n1. training step (median of {args.repeats} interleaved blocks of {args.block} steps)")
        print("| side | s/step | ratio to hand-written |\n| --- | ---: | ---: |")
        for name, seconds, ratio in rows:
            print(f"| {name} | {seconds:.3f} | {ratio:.3f} |")
    if "sampling" in args.parts:
        rows = bench_sampling(args)
        print(
            f"\n2. ancestral sampling, T = {args.timesteps}, {args.sample_images} images "
            f"(median of {args.sample_repeats} interleaved runs)"
        )
        print("| side | s/run | ratio to hand-written |\n| --- | ---: | ---: |")
        for name, seconds, ratio in rows:
            print(f"| {name} | {seconds:.1f} | {ratio:.3f} |")
    if "bpd" in args.parts:
        print("\n3. bits/dim after equal training budgets (training …)", flush=True)
        rows = bench_bits_per_dim(args, train_x, test_x)
        print(
            f"\nT = {args.timesteps}, {args.train_steps} steps of batch {args.batch_size}, lr {args.lr}, "
            f"EMA {args.ema_decay}; exact ELBO (all T terms, EMA weights) on {rows[0][5]} mnist5k test images"
        )
        print("| objective | steps | train s | test bits/dim | ± s.e. | images | eval s |")
        print("| --- | ---: | ---: | ---: | ---: | ---: | ---: |")
        for objective, steps, train_s, mean, stderr, count, eval_s in rows:
            cells = [
                objective,
                steps,
                f"{train_s:.0f}",
                f"{mean:.3f}",
                f"{stderr:.3f}",
                count,
                f"{eval_s:.0f}",
            ]
            print("| " + " | ".join(map(str, cells)) + " |")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--parts", nargs="+", default=["steps", "sampling", "bpd"], choices=["steps", "sampling", "bpd"]
    )
    parser.add_argument("--channels", type=int, nargs="+", default=[32, 64])
    parser.add_argument("--timesteps", type=int, default=1000)
    parser.add_argument("--schedule", default="linear", choices=["linear", "cosine"])
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=2e-4)
    parser.add_argument("--ema-decay", type=float, default=0.999)
    parser.add_argument("--repeats", type=int, default=5, help="interleaved blocks per side (part 1)")
    parser.add_argument("--block", type=int, default=5, help="steps per block (part 1)")
    parser.add_argument("--sample-images", type=int, default=64)
    parser.add_argument("--sample-repeats", type=int, default=3)
    parser.add_argument(
        "--objectives",
        nargs="+",
        default=[
            "elbo",
            "meanfield",
            "simple",
            "elbo/per_datum",
            "meanfield/per_datum",
            "simple/per_datum",
            "hand-simple",
        ],
        choices=[
            f"{name}{suffix}"
            for name in ("elbo", "meanfield", "simple")
            for suffix in ("", "/per_datum", "/stratified", "/importance")
        ]
        + [
            f"{name}/{sampling}/learned"
            for name in ("elbo", "meanfield", "hybrid")
            for sampling in ("plate", "per_datum", "stratified", "importance")
        ]
        + ["hand-simple"],
        help="pvae objectives (one timestep per batch, or '/per_datum'), and the hand-written L_simple step",
    )
    parser.add_argument("--train-steps", type=int, default=500)
    parser.add_argument("--eval-images", type=int, default=24)
    parser.add_argument("--eval-batch", type=int, default=8)
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads (1: steadier timings on a shared 2-core machine)",
    )
    parser.add_argument("--seed", type=int, default=0)
    main(parser.parse_args())
