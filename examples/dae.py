"""Example: Denoising autoencoder

A denoising autoencoder (Vincent et al. 2008) is the autoencoder pair of ``examples/ae.py`` whose guide
encodes a corrupted copy x̃ of each digit while the likelihood scores the clean x, so copying the input is
no longer a solution. Corruption ``mask`` sets each pixel to zero with probability ``--noise`` (the original
paper's masking noise, also the idea behind masked autoencoders); ``gaussian`` adds Normal(0, noise²)
noise. After training on the mnist5k digits the script corrupts the test digits afresh and compares the
error of the denoised digits with that of the corrupted input itself. Pictures in ``--out``: rows of clean,
corrupted and denoised test digits, and the training curve.

References:

1. P. Vincent, H. Larochelle, Y. Bengio, P.-A. Manzagol, "Extracting and Composing Robust Features with
   Denoising Autoencoders", ICML 2008.
"""

import argparse
import os
import time

import pyro
import pyro.optim
import torch
from pyro.infer import SVI, Trace_ELBO

from pvae import plots
from pvae.data import BatchLoader, load_images
from pvae.models.ae import DAE
from pvae.utils import resolve_device, seed_everything


def main(args):
    seed_everything(args.seed)
    device = resolve_device(args.device)
    train, test = load_images(args.dataset, "train"), load_images(args.dataset, "test")
    train_x = train.flat()[: args.num_train].to(device)  # (num_train, 784) grey levels in [0, 1]
    test_x = test.flat()[: args.num_test].to(device)
    loader = BatchLoader(train_x, batch_size=args.batch_size, seed=args.seed)

    dae = DAE(
        x_dim=784,
        hidden_dim=args.hidden_dim,
        z_dim=args.z_dim,
        scale=args.scale,
        corruption=args.corruption,
        noise=args.noise,
    ).to(device)
    svi = SVI(dae.model, dae.guide, pyro.optim.Adam({"lr": args.learning_rate}), Trace_ELBO())

    history = {"denoised test error": []}
    corrupted = dae.corrupt(test_x)  # one fixed corruption of the test digits
    for epoch in range(1, args.num_epochs + 1):
        start = time.perf_counter()
        for batch, _ in loader:
            svi.step(batch)
        with torch.no_grad():
            denoised = dae.reconstruct(corrupted)
        error = (denoised - test_x).square().mean().item()
        history["denoised test error"].append(error)
        print(
            f"epoch {epoch:3d}  mean squared error per pixel of denoised test digits {error:.5f}  "
            f"({time.perf_counter() - start:.1f} s)"
        )
    baseline = (corrupted - test_x).square().mean().item()
    print(
        f"corrupted input ({args.corruption}, noise {args.noise}): error {baseline:.5f}; "
        f"denoised: {history['denoised test error'][-1]:.5f}"
    )

    os.makedirs(args.out, exist_ok=True)
    index = torch.arange(0, test_x.shape[0], max(1, test_x.shape[0] // 10))[:10]  # sorted by class
    rows = torch.cat([test_x[index], corrupted[index].clamp(0, 1), denoised[index]])  # (30, 784)
    plots.save_image_grid(rows, os.path.join(args.out, "dae_denoising.png"), nrow=len(index))
    plots.plot_loss_curve(
        history, os.path.join(args.out, "dae_error.png"), ylabel="mean squared error per pixel", title="DAE"
    )
    print(f"pictures in {args.out}/ (rows: clean, corrupted, denoised)")
    return history


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="Denoising autoencoder")
    parser.add_argument("--dataset", default="mnist5k", choices=["mnist5k", "mnist", "fashion-mnist"])
    parser.add_argument("-n", "--num-epochs", default=20, type=int)
    parser.add_argument("--batch-size", default=128, type=int)
    parser.add_argument("-lr", "--learning-rate", default=1e-3, type=float)
    parser.add_argument("--hidden-dim", default=400, type=int)
    parser.add_argument("--z-dim", default=32, type=int)
    parser.add_argument("--scale", default=0.1, type=float, help="standard deviation s of the likelihood")
    parser.add_argument("--corruption", default="mask", choices=["mask", "gaussian"])
    parser.add_argument("--noise", default=0.5, type=float, help="masking probability, or Gaussian std")
    parser.add_argument("--num-train", default=4000, type=int, help="training digits used")
    parser.add_argument("--num-test", default=1000, type=int, help="test digits used")
    parser.add_argument("--out", default="runs/examples", help="folder for the pictures")
    parser.add_argument("--seed", default=0, type=int)
    parser.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: cuda if available)")
    main(parser.parse_args())
