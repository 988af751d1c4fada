"""Report section of the latent diffusion model: a VAE, then a diffusion prior fitted to its latents.

Also the measurements the section, ``benchmarks/latent_diffusion.py`` and ``examples/latent_diffusion.py``
share: per-image ELBOs averaged over independent draws (:func:`per_image_elbo`), a mean with its standard
error (:func:`mean_stderr`, also of paired differences), and the sample quality of generated digits
(:func:`sample_quality`: Fréchet distance and label entropy by :mod:`pvae.metrics`).
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from dataclasses import dataclass

from pvae.report import ReportContext, report_section


def per_image_elbo(elbo: Callable, x, *, draws: int = 1, seed: int = 0, chunk: int = 500):
    """Per-image ELBO estimates, (N,) float64 on the CPU: ``elbo(part, generator=g)`` on chunks of ``x``,
    averaged over ``draws`` independent draws (each is unbiased for the bound, so their mean is too, with
    less Monte-Carlo noise).

    :param elbo: a family's per-datum ELBO, e.g. ``vae.elbo``, ``ldm.elbo`` or ``ddpm.elbo``.
    :param x: (N, …) data in the family's space (binary digits for the Bernoulli VAE and LDM).
    :param draws: independent estimates averaged per image (≥ 1).
    :param seed: seeds the generator of the draws (on ``x``'s device).
    :param chunk: images per call.
    """
    import torch

    from pvae.checks import check_int

    draws = check_int("draws", draws)
    generator = torch.Generator(device=x.device).manual_seed(seed)
    total = torch.zeros(x.shape[0], dtype=torch.float64)
    for _ in range(draws):
        total += torch.cat([elbo(part, generator=generator).double().cpu() for part in x.split(chunk)])
    return total / draws


def mean_stderr(values) -> tuple[float, float]:
    """Mean of a (N,) tensor and its standard error std/√N (NaN for N = 1)."""
    count = values.numel()
    stderr = float(values.std() / math.sqrt(count)) if count > 1 else math.nan
    return float(values.mean()), stderr


def sample_quality(samples, real) -> tuple[float, float]:
    """(Fréchet distance of ``samples`` to ``real`` digits, entropy of the samples' label histogram in
    nats); both images (n, 784) of grey levels in [0, 1] (:func:`pvae.metrics.frechet_distance`,
    :func:`pvae.metrics.label_histogram`)."""
    from pvae.metrics import frechet_distance, label_histogram

    return frechet_distance(samples, real), label_histogram(samples).entropy


def spread_subset(count: int | None, total: int):
    """Indices of ``count`` items spread evenly over ``total`` (all when ``count`` is None or ≥ total):
    the test splits are sorted by class, so a prefix would hold only the first digits."""
    import torch

    if count is None or count >= total:
        return torch.arange(total)
    return torch.linspace(0, total - 1, count).round().long()


@dataclass(frozen=True)
class LatentDiffusionDemo:
    """The full demo's latent diffusion run: the two-stage recipe on mnist5k digits."""

    architecture: str = "mlp"
    z_dim: int = 16
    hidden_dim: int = 400
    timesteps: int = 100
    prior_hidden_dim: int = 256
    batch_size: int = 128
    autoencoder_epochs: int = 20
    prior_epochs: int = 40
    lr: float = 2e-3  # the first stage's
    prior_lr: float = 2e-3  # the second stage's, decaying to lr_end
    lr_end: float = 1e-4
    objective: str = "meanfield"
    num_train: int | None = None  # None: all 4,000 training digits
    num_test: int | None = None  # None: all 1,000 test digits
    quality_samples: int = 1000
    shown_samples: int = 64


LATENT_DIFFUSION_DEMO = LatentDiffusionDemo()


@report_section(55)
def latent_diffusion(ctx: ReportContext) -> str:
    """The two-stage latent diffusion model on digits against its own autoencoder; full demo only."""
    from pvae.utils import torch_threads

    if ctx.quick:
        return ""
    with torch_threads(1):  # small MLPs at batch 128: one thread is as fast and steadier on a shared machine
        return latent_diffusion_section(ctx)


def latent_diffusion_section(
    ctx: ReportContext, settings: LatentDiffusionDemo = LATENT_DIFFUSION_DEMO
) -> str:
    """Train a VAE (N(0, I) prior), then a diffusion prior on its frozen latents; compare the two models by
    test ELBO (paired over the same digits), Fréchet distance and label entropy of their samples."""
    import torch

    from pvae import plots
    from pvae.data import BatchLoader
    from pvae.models.latent_diffusion import LatentDiffusion, train_latent_diffusion
    from pvae.report.autoencoders import image_split, image_test_loader
    from pvae.utils import resolve_device, seed_everything

    device = resolve_device(ctx.device)
    seed_everything(ctx.seed)
    train_x, _ = image_split("mnist5k", "train", None, settings.num_train, ctx.seed)
    test_grey, test_labels = image_split("mnist5k", "test", None, settings.num_test, ctx.seed)
    loader = BatchLoader(
        train_x.to(device), batch_size=settings.batch_size, binarize="dynamic", seed=ctx.seed
    )
    test_x = image_test_loader(test_grey, test_labels, "dynamic", device).data  # binarized once
    family = LatentDiffusion(
        z_dim=settings.z_dim,
        hidden_dim=settings.hidden_dim,
        architecture=settings.architecture,
        timesteps=settings.timesteps,
        prior_hidden_dim=settings.prior_hidden_dim,
        stage="autoencoder",
    ).to(device)

    run = train_latent_diffusion(
        family,
        loader,
        recipe="two-stage",
        first_epochs=settings.autoencoder_epochs,
        epochs=settings.prior_epochs,
        objective=settings.objective,
        lr=settings.lr,
        prior_lr=settings.prior_lr,
        lr_end=settings.lr_end,
        latent_data=loader.data.bernoulli(),
        seed=ctx.seed,
        progress=False,
    )
    autoencoder_seconds, prior_seconds = sum(run.first.epoch_seconds), sum(run.second.epoch_seconds)
    latent_scale = float(family.latent_scale)
    family.eval()
    # the two-stage recipe froze the autoencoder: after the second stage it is still the first stage's VAE
    autoencoder_elbo = per_image_elbo(family.autoencoder.elbo, test_x, seed=ctx.seed)
    ldm_elbo = per_image_elbo(family.elbo, test_x, seed=ctx.seed)

    def samples_of(model):  # decoder means, from the same seed for both priors
        generator = torch.Generator(device=device).manual_seed(ctx.seed)
        return model.sample(settings.quality_samples, generator=generator).cpu()

    autoencoder_samples, ldm_samples = samples_of(family.autoencoder), samples_of(family)

    quality = {
        "vae": sample_quality(autoencoder_samples, test_grey),
        "ldm": sample_quality(ldm_samples, test_grey),
    }
    shown = settings.shown_samples
    plots.save_image_grid(autoencoder_samples[:shown], os.path.join(ctx.out, "ldm_vae_prior_samples.png"))
    plots.save_image_grid(ldm_samples[:shown], os.path.join(ctx.out, "ldm_samples.png"))

    vae_mean, vae_stderr = mean_stderr(autoencoder_elbo)
    ldm_mean, ldm_stderr = mean_stderr(ldm_elbo)
    difference, difference_stderr = mean_stderr(ldm_elbo - autoencoder_elbo)
    count = len(test_x)
    (vae_distance, vae_entropy), (ldm_distance, ldm_entropy) = quality["vae"], quality["ldm"]
    if difference > 2 * difference_stderr:
        verdict = (
            f"The diffusion prior **raises** the bound by {difference:.2f} ± {difference_stderr:.2f} nats "
            "per image (paired over the same test digits, the same decoder): the chain fits the encoder's "
            "aggregate posterior better than N(0, I) does."
        )
    elif difference < -2 * difference_stderr:
        verdict = (
            f"The diffusion prior **lowers** the bound, by {-difference:.2f} ± {difference_stderr:.2f} nats "
            "per image (paired over the same test digits): at this budget the chain fits the latents worse "
            "than N(0, I)."
        )
    else:
        verdict = (
            f"The two bounds do not differ beyond twice the standard error ({difference:+.2f} ± "
            f"{difference_stderr:.2f} nats per image, paired over the same test digits)."
        )
    closer = "the LDM's" if ldm_distance < vae_distance else "the VAE's"
    lines = [
        "## Latent diffusion: a diffusion prior over a VAE's latent",
        "",
        f'`LatentDiffusion(architecture="{settings.architecture}", z_dim={settings.z_dim},',
        f"hidden_dim={settings.hidden_dim}, timesteps={settings.timesteps},",
        f"prior_hidden_dim={settings.prior_hidden_dim})`, the two-stage recipe on the {len(train_x):,}",
        "mnist5k training digits (binarized afresh every batch), batch",
        f"{settings.batch_size}, `{settings.objective}` objective, `train_latent_diffusion`. Stage",
        f'`"autoencoder"`: the VAE with its N(0, I) prior, {settings.autoencoder_epochs} epochs at',
        f"learning rate {settings.lr:g}. Then the latents are scaled to unit spread",
        f'(s = {latent_scale:.3g}) and stage `"prior"` fits the diffusion chain to the frozen encoder\'s',
        f"latents: {settings.prior_epochs} epochs, rate {settings.prior_lr:g} → {settings.lr_end:g}.",
        "Encoder and decoder are the same in both rows, so the rows differ only in the prior.",
        "",
        "| model | epochs | train s | test ELBO (nats/image) | Fréchet distance | label entropy |",
        "| --- | ---: | ---: | ---: | ---: | ---: |",
        f"| VAE, N(0, I) prior (stage 1) | {settings.autoencoder_epochs} | {autoencoder_seconds:.0f} | "
        f"{vae_mean:.2f} ± {vae_stderr:.2f} | {vae_distance:.2f} | {vae_entropy:.3f} |",
        f"| LDM, diffusion prior (two-stage) | {settings.autoencoder_epochs} + {settings.prior_epochs} | "
        f"{autoencoder_seconds:.0f} + {prior_seconds:.0f} | {ldm_mean:.2f} ± {ldm_stderr:.2f} | "
        f"{ldm_distance:.2f} | {ldm_entropy:.3f} |",
        "",
        "Test ELBO: `elbo(x)` per digit (one draw of the latent; for the LDM all",
        f"T = {settings.timesteps} of the chain's terms in closed form), mean ± standard error over the",
        f"{count:,} test digits (binarized once). Fréchet distance and label entropy:",
        f"{settings.quality_samples:,} samples (decoder means) against the test digits in the features of",
        "`pvae.metrics`' digit classifier; entropy in nats",
        f"(log 10 = {math.log(10):.3f} when every digit is drawn equally often).",
        "",
        verdict,
        f"By Fréchet distance {closer} samples are closer to the test digits ({ldm_distance:.2f} for the",
        f"LDM, {vae_distance:.2f} for the VAE).",
        "",
        "Samples of the VAE's N(0, I) prior (left) and of the diffusion prior (right), through the same",
        "decoder:",
        "",
        "![VAE prior samples](ldm_vae_prior_samples.png) ![LDM samples](ldm_samples.png)",
        "",
    ]
    return "\n".join(lines)
