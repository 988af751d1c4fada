"""Example: Variational Autoencoder on MNIST digits

Trains a VAE with MLP encoder and decoder (784 → 400 → z, LeakyReLU(0.2) encoder giving μ and log σ², ReLU
decoder giving Bernoulli logits) as a Pyro model/guide pair with SVI on the 4,000 mnist5k training digits,
dynamically binarized (a fresh Bernoulli draw of every pixel each time a digit is served).
``Trace_ELBO`` estimates KL(q(z | x) ‖ p(z)) by Monte Carlo; ``--analytic-kl`` switches to
``TraceMeanField_ELBO`` and its closed form ½Σ(−log σ² + μ² + σ² − 1). After training it estimates the test
log-likelihood log p(x) by importance sampling with the guide as proposal (the IWAE-k bound,
k = ``--num-samples``) and writes pictures to ``--out``: reconstructions, prior samples, the ELBO curve, a
latent scatter coloured by digit and, for ``--z-dim 2``, the decoded latent manifold.

References:

1. D. P. Kingma, M. Welling, "Auto-Encoding Variational Bayes", ICLR 2014.
2. Y. Burda, R. Grosse, R. Salakhutdinov, "Importance Weighted Autoencoders", ICLR 2016.
"""

import argparse
import math
import os
import time

import pyro
import pyro.optim
import torch
from pyro.infer import SVI, Trace_ELBO, TraceMeanField_ELBO

from pvae import plots
from pvae.data import BatchLoader, load_images
from pvae.inference import log_evidence
from pvae.models.vae import VAE
from pvae.utils import resolve_device, seed_everything


def main(args):
    seed_everything(args.seed)
    device = resolve_device(args.device)
    train, test = load_images(args.dataset, "train"), load_images(args.dataset, "test")
    train_x = train.flat()[: args.num_train].to(device)  # (num_train, 784) grey levels
    test_images = test.flat()[: args.num_test].to(device)
    test_labels = test.labels[: args.num_test]
    train_loader = BatchLoader(train_x, batch_size=args.batch_size, binarize="dynamic", seed=args.seed)
    # The test digits get one fixed binarization, so every epoch is evaluated on the same data.
    test_x = BatchLoader(test_images, batch_size=args.num_test, binarize="static", seed=args.seed).data

    vae = VAE(x_dim=784, z_dim=args.z_dim, hidden_dim=args.hidden_dim).to(device)
    elbo = TraceMeanField_ELBO() if args.analytic_kl else Trace_ELBO()
    svi = SVI(vae.model, vae.guide, pyro.optim.Adam({"lr": args.learning_rate}), elbo)

    history = {"train": [], "test": []}
    for epoch in range(1, args.num_epochs + 1):
        start, total = time.perf_counter(), 0.0
        for batch, _ in train_loader:
            total += svi.step(batch)
        history["train"].append(-total / train_x.shape[0])
        with torch.no_grad():
            history["test"].append(-elbo.loss(vae.model, vae.guide, test_x) / test_x.shape[0])
        print(
            f"epoch {epoch:3d}  train ELBO {history['train'][-1]:8.2f}  test ELBO {history['test'][-1]:8.2f}"
            f"  nats/image  ({time.perf_counter() - start:.1f} s)"
        )

    if args.num_samples > 0:
        log_px = log_evidence(
            vae.model, vae.guide, test_x, num_samples=args.num_samples, particles_per_batch=10
        )
        stderr = log_px.std().item() / math.sqrt(log_px.shape[0]) if log_px.shape[0] > 1 else math.nan
        print(
            f"test log p(x) ≥ {log_px.mean().item():.2f} ± {stderr:.2f} nats/image "
            f"(IWAE bound, k = {args.num_samples}, {log_px.shape[0]} images)"
        )

    os.makedirs(args.out, exist_ok=True)
    shown = test_x[:: max(1, test_x.shape[0] // 32)][:32]  # the test digits are sorted by class
    plots.plot_reconstructions(
        shown, vae.reconstruct(shown), os.path.join(args.out, "vae_reconstructions.png")
    )
    plots.save_image_grid(vae.sample(64), os.path.join(args.out, "vae_samples.png"), nrow=8)
    plots.plot_loss_curve(history, os.path.join(args.out, "vae_elbo.png"), title="VAE on " + args.dataset)
    with torch.no_grad():
        codes, _ = vae.encode(test_x)
    if args.z_dim >= 2:
        plots.plot_latent_scatter(codes, test_labels, os.path.join(args.out, "vae_latent.png"))
    if args.z_dim == 2:
        plots.plot_latent_manifold(vae.decode, os.path.join(args.out, "vae_manifold.png"), grid=20)
    print(f"pictures in {args.out}/")
    return history


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="Variational autoencoder on MNIST digits")
    parser.add_argument("--dataset", default="mnist5k", choices=["mnist5k", "mnist", "fashion-mnist"])
    parser.add_argument("-n", "--num-epochs", default=20, type=int)
    parser.add_argument("--batch-size", default=128, type=int)
    parser.add_argument("-lr", "--learning-rate", default=1e-3, type=float)
    parser.add_argument("--z-dim", default=20, type=int)
    parser.add_argument("--hidden-dim", default=400, type=int)
    parser.add_argument("--analytic-kl", action="store_true", help="TraceMeanField_ELBO (closed-form KL)")
    parser.add_argument("--num-train", default=4000, type=int, help="training digits used")
    parser.add_argument("--num-test", default=1000, type=int, help="test digits used")
    parser.add_argument("--num-samples", default=100, type=int, help="k of the IWAE estimate (0: skip)")
    parser.add_argument("--out", default="runs/examples", help="folder for the pictures")
    parser.add_argument("--seed", default=0, type=int)
    parser.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: cuda if available)")
    main(parser.parse_args())
