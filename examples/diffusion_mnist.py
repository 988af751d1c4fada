"""Example: DDPM on MNIST digits with a small U-Net, trained by SVI on the time-subsampled ELBO

The digits are scaled to the model space of 8-bit images (pixel/127.5 − 1 on the 256-level grid) and
modelled by ``pvae.models.diffusion.DDPM`` with the discretized Gaussian decoder, so the ELBO bounds the log
probability of the 8-bit images and −ELBO/(784 ln 2) is in bits per dimension, as DDPM reports.
Training runs the generic loop ``pvae.inference.train`` on the pair the family hands it
(``svi_program``): ``--objective elbo`` is Pyro's Trace_ELBO on the time-subsampled pair, ``meanfield``
the same with closed-form per-step KLs, ``simple`` DDPM's reweighted L_simple (not an ELBO). An exponential
moving average of the weights (``--ema-decay``) is used for sampling and evaluation.

Writes ``samples.png`` (ancestral samples), ``chain.png`` (x_T → x_0, one row per sample), ``loss.png`` (the
loss per image at every step) and prints the test bits/dim on ``--num-test`` images (T network passes each).

Reference: Ho, Jain & Abbeel (2020), Denoising Diffusion Probabilistic Models.
"""

import argparse
import math
import os
import time

import torch

from pvae import plots, plots_diffusion
from pvae.data import BatchLoader, from_model_space, load_images, to_model_space
from pvae.inference import train
from pvae.models.diffusion import DDPM, OBJECTIVES
from pvae.utils import resolve_device, seed_everything


def main(args):
    seed_everything(args.seed)
    device = resolve_device(args.device)
    os.makedirs(args.out, exist_ok=True)
    train_images = to_model_space(load_images(args.dataset, "train").pixels).unsqueeze(1)  # (N, 1, 28, 28)
    if args.num_train is not None:  # an evenly spread subset (the split is sorted by class)
        train_images = train_images[:: max(1, len(train_images) // args.num_train)][: args.num_train]
    test_images = to_model_space(load_images(args.dataset, "test").pixels).unsqueeze(1)
    model = DDPM(
        data_shape=(1, 28, 28),
        timesteps=args.timesteps,
        schedule=args.schedule,
        time_sampling=args.time_sampling,
        channels=tuple(args.channels),
        ema_decay=args.ema_decay,
    ).to(device)
    loader = BatchLoader(train_images.to(device), batch_size=args.batch_size, seed=args.seed, drop_last=True)
    epochs = max(1, math.ceil(args.num_steps / len(loader)))
    started = time.perf_counter()
    history = train(
        model, loader, epochs=epochs, objective=args.objective, lr=args.lr, seed=args.seed, progress=True
    )
    print(
        f"{epochs * len(loader)} steps of {args.objective} (batch {args.batch_size}) in "
        f"{time.perf_counter() - started:.0f} s; T = {args.timesteps}, {args.schedule} schedule"
    )
    # test bits/dim on an evenly spread subset (the split is sorted by class)
    subset = test_images[:: max(1, len(test_images) // args.num_test)][: args.num_test].to(device)
    bits = model.bits_per_dim(subset, progress=True)
    print(
        f"test bits/dim on {len(subset)} images: {bits.mean():.3f} ± {bits.std() / math.sqrt(len(bits)):.3f}"
        if len(bits) > 1
        else f"test bits/dim on 1 image: {bits.item():.3f}"
    )
    chain = model.sample(args.num_samples, return_chain=True, chain_length=10, clip_denoised=True)
    paths = [
        plots.save_image_grid(
            from_model_space(chain.samples).cpu(),
            os.path.join(args.out, "samples.png"),
            nrow=plots_diffusion.sample_grid_side(args.num_samples),
        ),
        plots_diffusion.plot_chain_strip(chain.states, chain.times, os.path.join(args.out, "chain.png")),
        plots.plot_loss_curve(
            plots_diffusion.moving_average(history.step_losses, 50),
            os.path.join(args.out, "loss.png"),
            xlabel="step",
            ylabel=f"{args.objective} loss per image (mean of 50 steps)",
        ),
    ]
    print("wrote " + ", ".join(paths))
    return torch.as_tensor(bits)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="DDPM on MNIST digits with a small U-Net")
    parser.add_argument("--dataset", default="mnist5k", choices=["mnist5k", "mnist", "fashion-mnist"])
    parser.add_argument("--num-steps", type=int, default=2000)
    parser.add_argument("--timesteps", type=int, default=1000)
    parser.add_argument("--schedule", default="linear", choices=["linear", "cosine"])
    parser.add_argument("--time-sampling", default="plate", choices=["plate", "per_datum"])
    parser.add_argument("--objective", default="elbo", choices=list(OBJECTIVES))
    parser.add_argument("--channels", type=int, nargs="+", default=[32, 64])
    parser.add_argument("--ema-decay", type=float, default=0.999)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=2e-4)
    parser.add_argument("--num-train", type=int, default=None, help="train on a subset of this size")
    parser.add_argument("--num-test", type=int, default=16)
    parser.add_argument("--num-samples", type=int, default=36)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default=None)
    parser.add_argument("--out", default="runs/diffusion_mnist")
    main(parser.parse_args())
