"""Benchmark: latent diffusion against its own autoencoder, a VAE and a pixel DDPM on mnist5k digits.

Every model is trained on the 4,000 mnist5k training digits, binarized afresh in every batch, and judged on
the 1,000 test digits, binarized once (seed 0), by

- **test ELBO**, nats per image, mean ± standard error over images: ``elbo(x)`` per image, averaged over
  ``--elbo-draws`` independent draws (each an unbiased estimate of the bound). For the LDM it is the bound
  of the whole hierarchy (the chain's T terms in closed form given one draw of z_0); **− autoencoder**
  pairs each model with the LDM's stage-1 autoencoder (its N(0, I) prior) on the same images;
- **Fréchet distance** of ``--quality-samples`` samples to the test digits (grey levels) in the features
  of ``pvae.metrics``' digit classifier, and the **entropy** of the samples' label histogram (log 10 when
  every digit is drawn equally often), each averaged over ``--quality-draws`` independent draws;
- **train s**: wall time of the training passes (``History.epoch_seconds``; evaluation excluded).

Rows (``--parts``):

- ``data``: no model — 1,000 mnist5k training digits (grey, and binarized) scored as samples: the floor
  of the Fréchet distance at this sample size;
- ``vae``: the reference VAE, 784-400-20 MLP with its N(0, I) prior, scored twice: after
  ``--autoencoder-epochs`` at ``--lr`` (the first stage's budget), and after the LDM's whole schedule
  (then ``--epochs`` from ``--prior-lr`` decaying to ``--lr-end``); a last table divides each latent
  model's Fréchet distance by both references';
- ``autoencoder``: the LDM's stage 1 (``--architecture mlp|conv``, ``--z-dim``), a VAE with its N(0, I)
  prior after ``--autoencoder-epochs`` — the same encoder and decoder as the two-stage LDM;
- ``continued``: that autoencoder trained ``--epochs`` more with its N(0, I) prior on the second stage's
  schedule: the control of the joint recipe, which trains the autoencoder for as long;
- ``two-stage``: the autoencoder frozen, latents scaled to unit spread, the diffusion prior trained
  ``--epochs`` (stage ``"prior"``);
- ``joint``: from the same autoencoder and scale, everything trained ``--epochs`` on the whole ELBO;
  the LDM rows' samples are ancestral (T steps of the chain in latent space); with
  ``--ldm-sample-steps K`` each LDM is scored a second time with samples drawn by DDIM (K steps, η = 0);
- ``ddpm``: a pixel DDPM (the U-Net of ``pvae.models.diffusion``, ``--ddpm-timesteps``, a timestep per
  digit, L_simple, EMA of the weights) trained on the same binarized digits in model space (0 → −1,
  1 → 1). Its discretized decoder is a distribution over 256 grey levels per pixel; restricted to binary
  images and renormalized it is a model of binary digits whose log-likelihood is at least the DDPM's, so
  its ELBO is a lower bound on a binary model's log-likelihood, comparable with the others (and
  conservative for the DDPM). Every test digit costs T network passes, so it is scored on
  ``--ddpm-eval-images`` digits spread evenly over the test split; its samples are DDIM
  (``--ddpm-sample-steps``, x̂_0 clipped), near-binary, so its Fréchet distance is to be read against the
  binarized-digit row of ``data``.

Run: ``python benchmarks/latent_diffusion.py`` (every row; about 10 minutes on one thread). Only the
latent models: ``--parts autoencoder two-stage joint``; the convolutional autoencoder:
``--architecture conv`` (its steps cost several times the MLP's).
"""

from __future__ import annotations

import argparse
import copy
import math
import os
import time
from dataclasses import dataclass

import pyro
import torch

from pvae.data import BatchLoader, from_model_space
from pvae.inference import train
from pvae.models.diffusion import DDPM, TIME_SAMPLING
from pvae.models.diffusion.schedules import REVERSE_VARIANCES
from pvae.models.latent_diffusion import RECIPES, LatentDiffusion, train_latent_diffusion
from pvae.models.vae import ARCHITECTURES, VAE
from pvae.report.autoencoders import image_split, image_test_loader
from pvae.report.latent_diffusion import mean_stderr, per_image_elbo, sample_quality, spread_subset
from pvae.utils import seed_everything

PARTS = ("data", "vae", "autoencoder", "continued", "two-stage", "joint", "ddpm")
ARCHITECTURE_NAMES = {"mlp": "MLP", "conv": "convolutional"}


@dataclass
class Row:
    """One line of the table; ``elbo`` is per image over ``images`` (indices into the test split)."""

    name: str
    epochs: str = "—"
    train_seconds: str = "—"
    elbo: torch.Tensor | None = None
    images: torch.Tensor | None = None
    distance: float | None = None
    entropy: float | None = None


class ModelSpaceDigits:
    """The batches of a binarizing ``BatchLoader`` as DDPM data: (B, 1, 28, 28), pixel 0 → −1, 1 → 1."""

    def __init__(self, loader: BatchLoader):
        self.loader = loader

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self):
        for x, _ in self.loader:
            yield (2 * x - 1).reshape(-1, 1, 28, 28)  # (B, 1, 28, 28) on the 256-level grid


def timed_train(family, loader, epochs, args, lr, *, lr_end=None, seed=None) -> float:
    """Train on ``--objective``; returns the seconds of the training passes."""
    history = train(
        family,
        loader,
        epochs=epochs,
        objective=args.objective,
        lr=lr,
        lr_end=lr_end,
        seed=seed,
        progress=False,
    )
    return train_seconds(history)


def train_seconds(history) -> float:
    """Wall time of a run's training passes (its epochs' evaluations excluded)."""
    return sum(history.epoch_seconds)


def drawn_quality(draw, args, test_grey) -> tuple[float, float]:
    """Fréchet distance and label entropy averaged over ``--quality-draws`` independent draws of
    ``--quality-samples`` samples (``draw(seed) -> (n, 784)`` in [0, 1]): one draw's distance moves by
    several units from draw to draw."""
    scores = [sample_quality(draw(args.seed + index), test_grey) for index in range(args.quality_draws)]
    distances = [distance for distance, _ in scores]
    if len(distances) > 1:
        print(f"    Fréchet distance per draw: {', '.join(f'{d:.2f}' for d in distances)}", flush=True)
    return sum(distances) / len(scores), sum(entropy for _, entropy in scores) / len(scores)


def samples_of(family, count: int, seed: int, **options) -> torch.Tensor:
    """``count`` samples (decoder means, (count, 784) in [0, 1]) of a VAE or an LDM, seeded; ``options``
    go to ``sample`` (e.g. ``steps`` for DDIM in an LDM's latent space)."""
    generator = torch.Generator().manual_seed(seed)
    return family.sample(count, generator=generator, **options).cpu()


def latent_rows(args, loader, train_grey, test_x, test_grey) -> list[Row]:
    """The rows of the LDM and its autoencoder: stage 1 once, each second stage from a copy of it."""
    rows: list[Row] = []
    all_images = torch.arange(len(test_x))
    config = {
        "z_dim": args.z_dim,
        "hidden_dim": args.hidden_dim,
        "architecture": args.architecture,
        "timesteps": args.timesteps,
        "prior_hidden_dim": args.prior_hidden_dim,
        "time_sampling": args.time_sampling,
        "reverse_variance": args.reverse_variance,
        "prior_ema_decay": args.prior_ema_decay,
        "stage": "autoencoder",
    }
    first_epochs, second_epochs = args.autoencoder_epochs, args.epochs
    seed_everything(args.seed)
    first = LatentDiffusion(**config)
    first_seconds = timed_train(first, loader, first_epochs, args, args.lr, seed=args.seed)
    first_state = copy.deepcopy(first.state_dict())
    label = f"{ARCHITECTURE_NAMES[args.architecture]} autoencoder, z = {args.z_dim}"

    def scored(name, model, epochs, seconds) -> Row:
        """``model``: the LDM, or its autoencoder (its N(0, I) prior); both have ``elbo`` and ``sample``."""
        model.eval()
        values = per_image_elbo(model.elbo, test_x, draws=args.elbo_draws, seed=args.seed)
        distance, entropy = drawn_quality(
            lambda seed: samples_of(model, args.quality_samples, seed), args, test_grey
        )
        row = Row(name, epochs, seconds, values, all_images, distance, entropy)
        print(f"  {name}: ELBO {values.mean():.2f}, Fréchet distance {distance:.2f}", flush=True)
        return row

    if "autoencoder" in args.parts:
        rows.append(
            scored(
                f"{label}, N(0, I) prior (LDM stage 1)",
                first.autoencoder,
                f"{first_epochs}",
                f"{first_seconds:.0f}",
            )
        )
    if "continued" in args.parts:
        family = LatentDiffusion(**config)
        family.load_state_dict(first_state)
        seconds = timed_train(family, loader, second_epochs, args, args.prior_lr, lr_end=args.lr_end)
        rows.append(
            scored(
                f"{label}, N(0, I) prior, continued",
                family.autoencoder,
                f"{first_epochs} + {second_epochs}",
                f"{first_seconds:.0f} + {seconds:.0f}",
            )
        )
    for recipe in RECIPES:
        if recipe not in args.parts:
            continue
        family = LatentDiffusion(**config)
        family.load_state_dict(first_state)
        run = train_latent_diffusion(
            family,
            loader,
            recipe=recipe,
            first_epochs=0,  # the first stage trained above
            epochs=second_epochs,
            objective=args.objective,
            lr=args.lr,
            prior_lr=args.prior_lr,
            lr_end=args.lr_end,
            latent_data=train_grey.bernoulli(),
            seed=args.seed,
            progress=False,
        )
        row = scored(
            f"LDM {recipe} (latent scale {float(family.latent_scale):.3g})",
            family,
            f"{first_epochs} + {second_epochs}",
            f"{first_seconds:.0f} + {train_seconds(run.second):.0f}",
        )
        rows.append(row)
        if args.ldm_sample_steps:  # the same model, its samples drawn by DDIM in latent space
            distance, entropy = drawn_quality(
                lambda seed, model=family: samples_of(
                    model, args.quality_samples, seed, steps=args.ldm_sample_steps
                ),
                args,
                test_grey,
            )
            name = f"LDM {recipe}, samples by DDIM ({args.ldm_sample_steps} steps)"
            print(f"  {name}: Fréchet distance {distance:.2f}", flush=True)
            rows.append(Row(name, row.epochs, row.train_seconds, row.elbo, row.images, distance, entropy))
    return rows


def vae_rows(args, loader, test_x, test_grey) -> list[Row]:
    """The reference VAE after its first stage's budget (``--autoencoder-epochs`` at a constant rate: the
    784-400-20, 30-epoch VAE the sample-quality target names) and on the LDM's whole schedule (constant
    rate, then the second stage's decaying one)."""
    seed_everything(args.seed)
    vae = VAE(x_dim=784, z_dim=args.vae_z_dim, hidden_dim=400)
    name = f"VAE 784-400-{args.vae_z_dim} MLP, N(0, I) prior"

    def row(label: str, epochs: str, seconds: float) -> Row:
        vae.eval()
        values = per_image_elbo(vae.elbo, test_x, draws=args.elbo_draws, seed=args.seed)
        distance, entropy = drawn_quality(
            lambda seed: samples_of(vae, args.quality_samples, seed), args, test_grey
        )
        print(f"  {label}: ELBO {values.mean():.2f}, Fréchet distance {distance:.2f}", flush=True)
        vae.train()
        return Row(label, epochs, f"{seconds:.0f}", values, torch.arange(len(test_x)), distance, entropy)

    first = timed_train(vae, loader, args.autoencoder_epochs, args, args.lr, seed=args.seed)
    rows = [row(f"{name}, stage-1 budget (reference)", f"{args.autoencoder_epochs}", first)]
    second = timed_train(vae, loader, args.epochs, args, args.prior_lr, lr_end=args.lr_end)
    rows.append(
        row(
            f"{name}, whole schedule (reference)",
            f"{args.autoencoder_epochs} + {args.epochs}",
            first + second,
        )
    )
    return rows


def ddpm_row(args, train_grey, test_x, test_grey) -> Row:
    """A pixel DDPM on the binarized digits in model space; ELBO on an evenly spread subset."""
    seed_everything(args.seed)
    family = DDPM(
        data_shape=(1, 28, 28),
        timesteps=args.ddpm_timesteps,
        channels=tuple(args.ddpm_channels),
        time_sampling="per_datum",
        ema_decay=args.ddpm_ema_decay,
    )
    loader = ModelSpaceDigits(
        BatchLoader(train_grey, batch_size=args.ddpm_batch_size, binarize="dynamic", seed=args.seed)
    )
    history = train(
        family,
        loader,
        epochs=args.ddpm_epochs,
        objective=args.ddpm_objective,
        lr=args.ddpm_lr,
        lr_end=args.ddpm_lr_end,
        seed=args.seed,
        progress=False,
    )
    seconds = train_seconds(history)
    family.eval()
    images = spread_subset(args.ddpm_eval_images, len(test_x))
    model_space = (2 * test_x[images] - 1).reshape(-1, 1, 28, 28)  # (n, 1, 28, 28) in {−1, 1}
    values = per_image_elbo(family.elbo, model_space, draws=1, seed=args.seed, chunk=50)

    def draw(seed: int) -> torch.Tensor:
        samples = family.sample(
            args.quality_samples,
            steps=args.ddpm_sample_steps,
            clip_denoised=True,
            generator=torch.Generator().manual_seed(seed),
            progress=False,
        )
        return from_model_space(samples).float().div(255).reshape(-1, 784)  # (n, 784) in [0, 1]

    distance, entropy = drawn_quality(draw, args, test_grey)
    print(f"  ddpm: ELBO {values.mean():.2f}, Fréchet distance {distance:.2f}", flush=True)
    return Row(
        f"pixel DDPM, U-Net {tuple(args.ddpm_channels)}, T = {args.ddpm_timesteps}, {args.ddpm_objective}",
        f"{args.ddpm_epochs}",
        f"{seconds:.0f}",
        values,
        images,
        distance,
        entropy,
    )


def data_rows(args, train_grey, test_grey) -> list[Row]:
    """Training digits scored as if they were samples: the Fréchet distance's floor at this size."""
    chosen = train_grey[spread_subset(args.quality_samples, len(train_grey))]
    binary = chosen.bernoulli(generator=torch.Generator().manual_seed(args.seed))
    rows = []
    for name, images in (("mnist5k training digits (grey)", chosen), ("the same, binarized", binary)):
        distance, entropy = sample_quality(images, test_grey)
        rows.append(Row(name, distance=distance, entropy=entropy))
    return rows


def cell(values: torch.Tensor | None) -> str:
    if values is None:
        return "—"
    mean, stderr = mean_stderr(values)
    return f"{mean:.2f} ± {stderr:.2f}"


def main(args):
    torch.set_num_threads(args.threads)
    args.prior_lr = args.lr if args.prior_lr is None else args.prior_lr
    pyro.enable_validation(True)
    train_grey, _ = image_split("mnist5k", "train", None, None, args.seed)  # (4000, 784)
    test_grey, test_labels = image_split("mnist5k", "test", None, None, args.seed)  # (1000, 784)
    test_x = image_test_loader(test_grey, test_labels, "dynamic", "cpu").data  # binarized once, seed 0
    loader = BatchLoader(train_grey, batch_size=args.batch_size, binarize="dynamic", seed=args.seed)
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(
        f"torch {torch.__version__}, pyro {pyro.__version__}, {torch.get_num_threads()} thread(s), load "
        f"average {load:.1f}; parts: {' '.join(args.parts)}",
        flush=True,
    )
    rows: list[Row] = []
    started = time.perf_counter()
    if "data" in args.parts:
        rows += data_rows(args, train_grey, test_grey)
    if "vae" in args.parts:
        rows += vae_rows(args, loader, test_x, test_grey)
    if {"autoencoder", "continued", "two-stage", "joint"} & set(args.parts):
        rows += latent_rows(args, loader, train_grey, test_x, test_grey)
    if "ddpm" in args.parts:
        rows.append(ddpm_row(args, train_grey, test_x, test_grey))
    total = time.perf_counter() - started

    reference = next((row for row in rows if "LDM stage 1" in row.name), None)
    print(
        f"\nmnist5k, batch {args.batch_size}, `{args.objective}` objective; latent models: "
        f"{args.architecture} autoencoder z = {args.z_dim} (hidden {args.hidden_dim}), prior chain "
        f"T = {args.timesteps} (denoiser width {args.prior_hidden_dim}); stage 1 at rate {args.lr:g}, "
        f"second stages {args.prior_lr:g} → {args.lr_end:g}. Test ELBO: {args.elbo_draws} draw(s) per image; "
        f"{args.quality_samples} samples per model and draw, {args.quality_draws} draw(s); label entropy "
        f"in nats (log 10 = {math.log(10):.3f}). "
        f"Whole run {total / 60:.1f} min.\n"
    )
    print(
        "| model | epochs | train s | test ELBO (nats/image) | − autoencoder (paired) | images | "
        "Fréchet distance | label entropy |"
    )
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for row in rows:
        paired = "—"
        if reference is not None and row.elbo is not None and row is not reference:
            paired = cell(row.elbo - reference.elbo[row.images])
        count = "—" if row.images is None else f"{len(row.images):,}"
        distance = "—" if row.distance is None else f"{row.distance:.2f}"
        entropy = "—" if row.entropy is None else f"{row.entropy:.3f}"
        print(
            f"| {row.name} | {row.epochs} | {row.train_seconds} | {cell(row.elbo)} | {paired} | {count} | "
            f"{distance} | {entropy} |"
        )
    references = [row for row in rows if "(reference)" in row.name and row.distance is not None]
    models = [row for row in rows if row.name.startswith(("LDM", "pixel")) and row.distance is not None]
    if references and models:
        print("\nFréchet distance ÷ the reference VAE's (label entropy ÷ log 10):\n")
        print("| model | " + " | ".join(f"÷ {row.name}" for row in references) + " | entropy ÷ log 10 |")
        print("| --- |" + " ---: |" * (len(references) + 1))
        for row in models:
            ratios = " | ".join(f"{row.distance / reference.distance:.2f}×" for reference in references)
            print(f"| {row.name} | {ratios} | {row.entropy / math.log(10):.3f} |")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--parts", nargs="+", default=list(PARTS), choices=PARTS, help="rows to run")
    parser.add_argument("--architecture", choices=ARCHITECTURES, default="mlp", help="the LDM's autoencoder")
    parser.add_argument("--z-dim", type=int, default=16, help="the LDM's latent dimension")
    parser.add_argument("--hidden-dim", type=int, default=400, help="the LDM autoencoder's hidden width")
    parser.add_argument("--timesteps", type=int, default=100, help="T of the LDM's prior chain")
    parser.add_argument("--prior-hidden-dim", type=int, default=512, help="width of the prior's denoiser")
    parser.add_argument(
        "--time-sampling", choices=TIME_SAMPLING, default="per_datum", help="the prior chain's time sampler"
    )
    parser.add_argument(
        "--reverse-variance", choices=REVERSE_VARIANCES, default="beta", help="the prior chain's σ_t²"
    )
    parser.add_argument(
        "--prior-ema-decay", type=float, default=0.0, help="EMA of the prior's denoiser (0: off)"
    )
    parser.add_argument("--vae-z-dim", type=int, default=20, help="latent dimension of the reference VAE")
    parser.add_argument("--autoencoder-epochs", type=int, default=30, help="stage 1 (and the VAE's first)")
    parser.add_argument("--epochs", type=int, default=60, help="second stages (and the VAE's second)")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--lr", type=float, default=2e-3, help="rate of the first stages")
    parser.add_argument("--prior-lr", type=float, default=None, help="first rate of the second stages (--lr)")
    parser.add_argument("--lr-end", type=float, default=1e-4, help="last rate of the second stages")
    parser.add_argument("--objective", choices=("meanfield", "elbo"), default="meanfield")
    parser.add_argument("--elbo-draws", type=int, default=4, help="ELBO draws averaged per test image")
    parser.add_argument("--quality-samples", type=int, default=1000, help="samples per model and draw")
    parser.add_argument(
        "--quality-draws", type=int, default=3, help="independent draws of samples, distances averaged"
    )
    parser.add_argument("--ddpm-epochs", type=int, default=8)
    parser.add_argument("--ddpm-timesteps", type=int, default=100)
    parser.add_argument("--ddpm-channels", type=int, nargs="+", default=[16, 32])
    parser.add_argument("--ddpm-batch-size", type=int, default=64)
    parser.add_argument(
        "--ddpm-objective",
        choices=("meanfield", "elbo", "simple"),
        default="meanfield",
        help="the pixel DDPM's objective (simple: L_simple, not an ELBO)",
    )
    parser.add_argument("--ddpm-lr", type=float, default=2e-3)
    parser.add_argument("--ddpm-lr-end", type=float, default=2e-5)
    parser.add_argument("--ddpm-ema-decay", type=float, default=0.999)
    parser.add_argument("--ddpm-eval-images", type=int, default=100, help="test digits for its ELBO")
    parser.add_argument("--ddpm-sample-steps", type=int, default=25, help="DDIM steps of its samples")
    parser.add_argument(
        "--ldm-sample-steps",
        type=int,
        default=0,
        help="also score the LDMs' samples drawn by DDIM with this many steps (0: ancestral only)",
    )
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    parser.add_argument("--seed", type=int, default=0)
    main(parser.parse_args())
