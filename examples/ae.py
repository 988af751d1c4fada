"""Example: Autoencoder as a Pyro model/guide pair

An autoencoder (x → encoder → z → decoder → x̃, trained on the squared-error loss ‖x − x̃‖²) written as a
probabilistic program: a flat prior on the code z, a Gaussian likelihood x | z ~ Normal(decoder(z), s²), and
a point-mass guide z = encoder(x). Its ELBO is exactly −SSE/(2s²) − (D/2)·log(2πs²), so SVI with
``Trace_ELBO`` minimizes the summed squared reconstruction error. The script checks that identity on a
batch, trains on the mnist5k digits (grey levels in [0, 1]), and reports the test reconstruction error (an
autoencoder has no marginal likelihood to report). Pictures in ``--out``: reconstructions next to the
originals, the training curve, and the codes of the test digits projected on their first two principal
components.

References:

1. G. E. Hinton, R. R. Salakhutdinov, "Reducing the Dimensionality of Data with Neural Networks",
   Science 2006.
"""

import argparse
import math
import os
import time

import pyro
import pyro.optim
import torch
from pyro.infer import SVI, Trace_ELBO

from pvae import plots
from pvae.data import BatchLoader, load_images
from pvae.models.ae import AE
from pvae.utils import resolve_device, seed_everything


def main(args):
    seed_everything(args.seed)
    device = resolve_device(args.device)
    train, test = load_images(args.dataset, "train"), load_images(args.dataset, "test")
    train_x = train.flat()[: args.num_train].to(device)  # (num_train, 784) grey levels in [0, 1]
    test_x = test.flat()[: args.num_test].to(device)
    loader = BatchLoader(train_x, batch_size=args.batch_size, seed=args.seed)

    ae = AE(x_dim=784, hidden_dim=args.hidden_dim, z_dim=args.z_dim, scale=args.scale).to(device)
    elbo = Trace_ELBO()
    svi = SVI(ae.model, ae.guide, pyro.optim.Adam({"lr": args.learning_rate}), elbo)

    # The ELBO of this pair is the Gaussian reconstruction loss, exactly.
    with torch.no_grad():
        batch = test_x[:64]
        sse = ae.reconstruction_error(batch, reduction="sum").sum().item()
        identity = -sse / (2 * args.scale**2) - batch.numel() / 2 * math.log(2 * math.pi * args.scale**2)
        print(
            f"ELBO {-elbo.loss(ae.model, ae.guide, batch):.7g} = −SSE/(2s²) − (D/2)log 2πs² = {identity:.7g}"
        )

    history = {"train": [], "test": []}
    for epoch in range(1, args.num_epochs + 1):
        start = time.perf_counter()
        for batch, _ in loader:
            svi.step(batch)
        history["train"].append(ae.reconstruction_error(train_x).mean().item())
        history["test"].append(ae.reconstruction_error(test_x).mean().item())
        print(
            f"epoch {epoch:3d}  mean squared error per pixel: train {history['train'][-1]:.5f}  "
            f"test {history['test'][-1]:.5f}  ({time.perf_counter() - start:.1f} s)"
        )

    os.makedirs(args.out, exist_ok=True)
    shown = test_x[:: max(1, test_x.shape[0] // 32)][:32]  # the test digits are sorted by class
    plots.plot_reconstructions(shown, ae.reconstruct(shown), os.path.join(args.out, "ae_reconstructions.png"))
    plots.plot_loss_curve(
        history, os.path.join(args.out, "ae_error.png"), ylabel="mean squared error per pixel", title="AE"
    )
    with torch.no_grad():
        codes = ae.encode(test_x)
    plots.plot_latent_scatter(codes, test.labels[: args.num_test], os.path.join(args.out, "ae_codes.png"))
    print(f"pictures in {args.out}/")
    return history


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="Autoencoder as a Pyro model/guide pair")
    parser.add_argument("--dataset", default="mnist5k", choices=["mnist5k", "mnist", "fashion-mnist"])
    parser.add_argument("-n", "--num-epochs", default=20, type=int)
    parser.add_argument("--batch-size", default=128, type=int)
    parser.add_argument("-lr", "--learning-rate", default=1e-3, type=float)
    parser.add_argument("--hidden-dim", default=400, type=int)
    parser.add_argument("--z-dim", default=32, type=int)
    parser.add_argument("--scale", default=0.1, type=float, help="standard deviation s of the likelihood")
    parser.add_argument("--num-train", default=4000, type=int, help="training digits used")
    parser.add_argument("--num-test", default=1000, type=int, help="test digits used")
    parser.add_argument("--out", default="runs/examples", help="folder for the pictures")
    parser.add_argument("--seed", default=0, type=int)
    parser.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: cuda if available)")
    main(parser.parse_args())
