"""Report section and pictures of the autoencoders (AE, denoising AE, VAE) on real digits."""

from __future__ import annotations

import os

from pvae.report import ReportContext, report_section


def image_split(
    dataset: str, split: str, root: str | None, limit: int | None, seed: int, download: bool = True
):
    """Flattened grey levels (N, 784) and labels of a split, optionally a seeded class-mixed subset."""
    import torch

    from pvae.data import load_images

    images = load_images(dataset, split, root=root, download=download)
    x, labels = images.flat(), images.labels
    if limit is not None and limit < x.shape[0]:
        index = torch.randperm(x.shape[0], generator=torch.Generator().manual_seed(seed))[:limit]
        x, labels = x[index.sort().values], labels[index.sort().values]
    return x, labels


def binarization(family_kind: str, likelihood: str) -> str | None:
    return "dynamic" if family_kind == "vae" and likelihood == "bernoulli" else None


def image_test_loader(x, labels, binarize: str | None, device, batch_size: int = 100):
    """The test digits, binarized once (seed 0) under a Bernoulli likelihood so every evaluation agrees."""
    from pvae.data import BatchLoader

    static = "static" if binarize is not None else None
    return BatchLoader(x.to(device), labels, batch_size=batch_size, shuffle=False, binarize=static, seed=0)


def is_autoencoder(family) -> bool:
    from pvae.models.ae import AE

    return isinstance(family, AE)


def autoencoder_pictures(family, x, labels, history, out: str, prefix: str = "") -> dict[str, str]:
    """Reconstructions, prior samples (VAE), ELBO curve, latent scatter, and the manifold for z_dim = 2."""
    import torch

    from pvae import plots

    paths = {}
    shown = x[:: max(1, x.shape[0] // 32)][:32]  # the test digits are sorted by class
    paths["reconstructions"] = plots.plot_reconstructions(
        shown.cpu(), family.reconstruct(shown).cpu(), os.path.join(out, f"{prefix}reconstructions.png")
    )
    if not is_autoencoder(family):
        samples = family.sample(64, generator=None)
        paths["samples"] = plots.save_image_grid(samples.cpu(), os.path.join(out, f"{prefix}samples.png"))
    curves = {"epoch": list(range(1, history.epochs + 1)), "train": history.train_elbo}
    if history.test_elbo:
        curves["test"] = history.test_elbo
    paths["elbo"] = plots.plot_loss_curve(
        curves, os.path.join(out, f"{prefix}elbo.png"), ylabel=f"{history.objective} (nats per image)"
    )
    with torch.no_grad():
        codes = family.encode(x)
        codes = codes[0] if isinstance(codes, tuple) else codes  # VAE: (loc, scale)
    if codes.shape[-1] >= 2:
        paths["latent"] = plots.plot_latent_scatter(
            codes.cpu(), labels, os.path.join(out, f"{prefix}latent.png")
        )
    if codes.shape[-1] == 2 and not is_autoencoder(family):
        paths["manifold"] = plots.plot_latent_manifold(
            family.decode, os.path.join(out, f"{prefix}manifold.png")
        )
    return paths


@report_section(30)
def autoencoders(ctx: ReportContext) -> str:
    """AE, DAE and VAE on real digits: training curves, reconstructions, samples, test log-likelihood."""
    import math

    import torch

    from pvae.data import BatchLoader
    from pvae.inference import evaluate_log_likelihood, train
    from pvae.models.ae import AE, DAE
    from pvae.models.vae import VAE
    from pvae.utils import resolve_device, seed_everything

    device = resolve_device(ctx.device)
    seed_everything(ctx.seed)
    num_train, num_test, k, k_images = (512, 100, 50, 50) if ctx.quick else (4000, 1000, 1000, 300)
    epochs = (
        {"ae": 1, "dae": 1, "vae": 2, "vae2": 1} if ctx.quick else {"ae": 5, "dae": 5, "vae": 20, "vae2": 10}
    )
    train_x, _ = image_split("mnist5k", "train", None, num_train, ctx.seed)
    test_x, test_labels = image_split("mnist5k", "test", None, num_test, ctx.seed)
    runs = {
        "ae": (AE(x_dim=784, hidden_dim=400, z_dim=20, scale=0.1), None),
        "dae": (DAE(x_dim=784, hidden_dim=400, z_dim=20, scale=0.1, corruption="mask", noise=0.5), None),
        "vae": (VAE(x_dim=784, z_dim=20, hidden_dim=400), "dynamic"),
        "vae2": (VAE(x_dim=784, z_dim=2, hidden_dim=400), "dynamic"),
    }
    rows = []
    for key, (family, binarize) in runs.items():
        family.to(device)
        loader = BatchLoader(train_x.to(device), batch_size=128, binarize=binarize, seed=ctx.seed)
        test_loader = image_test_loader(test_x, test_labels, binarize, device)
        history = train(family, loader, test_loader, epochs=epochs[key], seed=ctx.seed, progress=True)
        family.eval()
        autoencoder_pictures(family, test_loader.data, test_labels, history, ctx.out, prefix=f"demo_{key}_")
        seconds = sum(history.epoch_seconds) / history.epochs
        if is_autoencoder(family):
            errors = torch.cat([family.reconstruction_error(x).cpu() for x, _ in test_loader]).double()
            quality = (
                f"MSE {errors.mean().item():.4f} ± {errors.std().item() / math.sqrt(errors.numel()):.4f}"
            )
        else:
            few = BatchLoader(test_loader.data[:: max(1, num_test // k_images)][:k_images], batch_size=50)
            result = evaluate_log_likelihood(family, few, num_samples=k, seed=ctx.seed)
            quality = f"log p(x) ≥ {result.log_likelihood:.1f} ± {result.stderr:.1f}"
        name = {"ae": "AE", "dae": "DAE (mask 50%)", "vae": "VAE, z = 20", "vae2": "VAE, z = 2"}[key]
        rows.append(
            f"| {name} | {history.epochs} | {history.train_elbo[-1]:.1f} | {history.test_elbo[-1]:.1f} | "
            f"{quality} | {seconds:.2f} |"
        )
    lines = [
        "## Autoencoders on real digits: AE, denoising AE, VAE",
        "",
        f"mnist5k, {train_x.shape[0]} training digits, batch 128, Adam 1e-3, `pvae.inference.train` with",
        "Pyro's Trace_ELBO. AE and DAE: flat prior, point-mass guide, Gaussian likelihood (σ = 0.1) on",
        "grey levels — their ELBO is a rescaled squared error and they have no marginal likelihood, so",
        "their quality is the reconstruction error (mean squared error per pixel on the test digits).",
        "VAE: Bernoulli likelihood on dynamically binarized digits; test log-likelihood by importance",
        f"sampling with the guide (IWAE bound, k = {k}, {k_images} test digits, ± standard error over",
        "digits).",
        "",
        "| model | epochs | train ELBO | test ELBO | test quality | s / epoch |",
        "| --- | ---: | ---: | ---: | --- | ---: |",
        *rows,
        "",
        "ELBOs in nats per image. Reconstructions (rows: originals, then reconstructions):",
        "",
        "![AE](demo_ae_reconstructions.png) ![DAE](demo_dae_reconstructions.png)",
        "![VAE](demo_vae_reconstructions.png)",
        "",
        "VAE prior samples, its ELBO curve and its codes (first two principal components):",
        "",
        "![samples](demo_vae_samples.png) ![ELBO](demo_vae_elbo.png) ![codes](demo_vae_latent.png)",
        "",
        "With z = 2 the codes need no projection, and the decoder can be walked over the prior:",
        "",
        "![codes, z = 2](demo_vae2_latent.png) ![manifold](demo_vae2_manifold.png)",
        "",
    ]
    return "\n".join(lines)
