"""Example: Latent diffusion on MNIST digits, the two-stage recipe

A latent diffusion model is a VAE whose prior p(z) is a diffusion chain: z_T ~ N(0, I) → … → z_0 by the
learned reverse steps, then x | z_0 from the VAE's decoder; its guide is the VAE's encoder q(z_0 | x)
followed by the forward (noising) process z_0 → z_T. Both are one Pyro model/guide pair
(``pvae.models.latent_diffusion.LatentDiffusion``), so Trace_ELBO on them bounds log p(x) over the whole
hierarchy.

The two-stage recipe, run here by ``train_latent_diffusion`` (each stage a ``pvae.inference.train`` run):

1. stage ``"autoencoder"``: the VAE with its N(0, I) prior (the chain frozen);
2. ``fit_latent_scale``: latents scaled to unit spread for the chain (this changes no bound: model and
   guide are both densities over the scaled latent);
3. stage ``"prior"``: the encoder and decoder frozen, the chain fitted to the encoder's latents.

Between the stages the encoder and decoder do not change, so the test ELBOs before and after stage 3,
paired digit by digit, say what the diffusion prior gains over N(0, I). The script prints both and writes
samples of each prior through the same decoder to ``--out``.

References:

1. R. Rombach, A. Blattmann, D. Lorenz, P. Esser, B. Ommer, "High-Resolution Image Synthesis with Latent
   Diffusion Models", CVPR 2022.
2. A. Vahdat, K. Kreis, J. Kautz, "Score-based Generative Modeling in Latent Space", NeurIPS 2021.
3. J. Ho, A. Jain, P. Abbeel, "Denoising Diffusion Probabilistic Models", NeurIPS 2020.
"""

import argparse
import math
import os

import torch

from pvae import plots
from pvae.data import BatchLoader, load_images
from pvae.models.latent_diffusion import LatentDiffusion, train_latent_diffusion
from pvae.utils import resolve_device, seed_everything


def test_elbo(elbo, x, seed: int) -> torch.Tensor:
    """Per-digit ELBO, (N,): one draw of the latent per digit, from a seeded generator."""
    generator = torch.Generator(device=x.device).manual_seed(seed)
    return elbo(x, generator=generator).double().cpu()


def report(name: str, values: torch.Tensor) -> str:
    stderr = values.std().item() / math.sqrt(values.numel())
    return f"{name}: {values.mean().item():8.2f} ± {stderr:.2f} nats/image"


def main(args):
    seed_everything(args.seed)
    device = resolve_device(args.device)
    train_images, test_images = load_images("mnist5k", "train"), load_images("mnist5k", "test")
    train_x = train_images.flat()[: args.num_train].to(device)  # (num_train, 784) grey levels
    spread = torch.linspace(0, len(test_images.labels) - 1, args.num_test).round().long()
    test_grey = test_images.flat()[spread].to(device)  # the test split is sorted by class: spread evenly
    loader = BatchLoader(train_x, batch_size=args.batch_size, binarize="dynamic", seed=args.seed)
    test_x = BatchLoader(test_grey, batch_size=args.num_test, binarize="static", seed=args.seed).data

    ldm = LatentDiffusion(
        z_dim=args.z_dim,
        hidden_dim=args.hidden_dim,
        architecture=args.architecture,
        timesteps=args.timesteps,
        prior_hidden_dim=args.prior_hidden_dim,
        stage="autoencoder",
    ).to(device)

    # 1. the autoencoder, 2. latents of unit spread, 3. the diffusion prior on the frozen encoder's latents
    run = train_latent_diffusion(
        ldm,
        loader,
        recipe="two-stage",
        first_epochs=args.autoencoder_epochs,
        epochs=args.epochs,
        objective="meanfield",
        lr=args.learning_rate,
        prior_lr=args.prior_lr,
        lr_end=args.lr_end,
        latent_data=loader.data.bernoulli(),
        seed=args.seed,
        progress=False,
    )
    first, second = run.first, run.second
    print(f"stage 'autoencoder', {first.epochs} epochs: train ELBO {first.train_elbo[-1]:.2f} nats/image")
    print(f"stage 'prior', {second.epochs} epochs, latent scale {float(ldm.latent_scale):.3g}")
    ldm.eval()
    # stage 3 froze the encoder and decoder: ldm.autoencoder is still the VAE of stage 1
    before = test_elbo(ldm.autoencoder.elbo, test_x, args.seed)
    after = test_elbo(ldm.elbo, test_x, args.seed)
    generator = torch.Generator(device=device).manual_seed(args.seed)
    vae_samples = ldm.autoencoder.sample(args.num_samples, generator=generator)
    generator = torch.Generator(device=device).manual_seed(args.seed)
    ldm_samples = ldm.sample(args.num_samples, steps=args.sample_steps, generator=generator)

    print(f"test ELBO on {len(test_x)} digits (binarized once), the same encoder and decoder:")
    print("  " + report("N(0, I) prior (the VAE)     ", before))
    print("  " + report("diffusion prior (the LDM)   ", after))
    print("  " + report("LDM − VAE, paired per digit ", after - before))

    os.makedirs(args.out, exist_ok=True)
    nrow = max(1, int(math.sqrt(args.num_samples)))
    plots.save_image_grid(vae_samples.cpu(), os.path.join(args.out, "ldm_vae_samples.png"), nrow=nrow)
    plots.save_image_grid(ldm_samples.cpu(), os.path.join(args.out, "ldm_samples.png"), nrow=nrow)
    print(f"samples of both priors in {args.out}/ (ldm_vae_samples.png, ldm_samples.png)")
    return before, after


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="Latent diffusion on MNIST digits, the two-stage recipe")
    parser.add_argument("--architecture", default="mlp", choices=["mlp", "conv"], help="the autoencoder's")
    parser.add_argument("--z-dim", default=16, type=int)
    parser.add_argument("--hidden-dim", default=400, type=int, help="the autoencoder's hidden width")
    parser.add_argument("--timesteps", default=100, type=int, help="T of the prior chain")
    parser.add_argument("--prior-hidden-dim", default=512, type=int, help="width of the prior's denoiser")
    parser.add_argument("--autoencoder-epochs", default=20, type=int, help="stage 1")
    parser.add_argument("-n", "--epochs", default=40, type=int, help="stage 2, the prior")
    parser.add_argument("--batch-size", default=128, type=int)
    parser.add_argument("-lr", "--learning-rate", default=2e-3, type=float, help="stage 1's rate")
    parser.add_argument("--prior-lr", default=None, type=float, help="stage 3's rate (default: -lr)")
    parser.add_argument("--lr-end", default=1e-4, type=float, help="the prior stage's last learning rate")
    parser.add_argument("--num-train", default=4000, type=int, help="training digits used")
    parser.add_argument("--num-test", default=1000, type=int, help="test digits, spread over the classes")
    parser.add_argument("--num-samples", default=64, type=int, help="samples drawn from each prior")
    parser.add_argument("--sample-steps", default=None, type=int, help="DDIM steps (default: all T)")
    parser.add_argument("--out", default="runs/examples", help="folder for the pictures")
    parser.add_argument("--seed", default=0, type=int)
    parser.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: cuda if available)")
    main(parser.parse_args())
