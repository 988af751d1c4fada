"""Report sections and pictures of the diffusion family: DDPM on two moons and on digits."""

from __future__ import annotations

import os
import time
from dataclasses import dataclass

from pvae.report import ReportContext, report_section

DIFFUSION_ONLY_DATASETS = ("two-moons",)
#: Spread of the two-moons points around their half circles, for the command line and the report alike.
TWO_MOONS_NOISE = 0.1


def diffusion_data(
    dataset: str, split: str, root: str | None, limit: int | None, seed: int, download: bool = True
):
    """Model-space data: two-moons points (N, 2) (seeded per split) or images (N, 1, 28, 28) in [−1, 1]."""
    import torch

    from pvae.data import load_images, to_model_space, two_moons

    if dataset == "two-moons":
        count = limit or (4000 if split == "train" else 1000)
        generator = torch.Generator().manual_seed(seed * 2 + (split == "test"))
        return two_moons(count, noise=TWO_MOONS_NOISE, generator=generator)
    pixels = load_images(dataset, split, root=root, download=download).pixels
    if limit is not None and limit < pixels.shape[0]:  # a seeded class-mixed subset, in file order
        index = torch.randperm(pixels.shape[0], generator=torch.Generator().manual_seed(seed))[:limit]
        pixels = pixels[index.sort().values]
    return to_model_space(pixels).unsqueeze(1)


def ddpm_pictures(family, test_x, history, out: str, count: int | None, seed: int) -> dict[str, str]:
    """Samples (a grid, or a scatter over the test points), the chain x_T → x_0, the training curve."""
    import torch

    from pvae import plots, plots_diffusion
    from pvae.data import from_model_space

    images = test_x.dim() == 4
    count = count or (16 if images else 1000)
    generator = torch.Generator(device=family.device).manual_seed(seed)
    chain = family.sample(count, return_chain=True, chain_length=10 if images else 6, generator=generator)
    paths = {}
    if images:
        paths["samples"] = plots.save_image_grid(
            from_model_space(chain.samples).cpu(),
            os.path.join(out, "samples.png"),
            nrow=plots_diffusion.sample_grid_side(count),
        )
        paths["chain"] = plots_diffusion.plot_chain_strip(
            chain.states.cpu(), chain.times, os.path.join(out, "chain.png")
        )
    else:
        paths["samples"] = plots_diffusion.plot_samples_2d(
            chain.samples.cpu(), test_x.cpu(), os.path.join(out, "samples.png")
        )
        paths["chain"] = plots_diffusion.plot_chain_2d(
            chain.states.cpu(), chain.times, os.path.join(out, "chain.png"), data=test_x.cpu()
        )
    curves = {"epoch": list(range(1, history.epochs + 1)), "train": history.train_elbo}
    if history.test_elbo:
        curves["test"] = history.test_elbo
    label = "−L_simple" if history.objective == "simple" else "ELBO"
    unit = "image" if images else "point"
    paths["curve"] = plots.plot_loss_curve(
        curves, os.path.join(out, "training.png"), ylabel=f"{label} (nats per {unit})"
    )
    return paths


@report_section(40)
def diffusion(ctx: ReportContext) -> str:
    """DDPM on two moons with its three objectives: test ELBO, an MMD to the data, samples, chain, terms."""
    from pvae.utils import torch_threads

    with torch_threads(1):  # 2-D points through a small MLP: intra-op threads only add overhead
        return moons_section(ctx)


@report_section(50)
def diffusion_digits(ctx: ReportContext) -> str:
    """A small DDPM run on mnist5k digits (samples, chain, test bits/dim); full demo only (empty if quick)."""
    return "" if ctx.quick else digits_section(ctx)


#: The two-moons runs of the demo: (epochs, learning rate, final learning rate), full and quick.
MOONS_SCHEDULE = {"full": (200, 1e-2, 1e-4), "quick": (60, 1e-2, 1e-4)}

#: Ways to train a DDPM on two moons: name → (objective, time sampling, reverse variance).
MOONS_VARIANTS = {
    "simple": ("simple", "per_datum", "beta"),
    "elbo": ("elbo", "per_datum", "beta"),
    "meanfield": ("meanfield", "per_datum", "beta"),
    "meanfield+is": ("meanfield", "importance", "beta"),
    "meanfield+is+learned": ("meanfield", "importance", "learned"),
    "hybrid+learned": ("hybrid", "per_datum", "learned"),
}
#: The variants the demo trains (full report, and ``--quick``).
MOONS_DEMO_VARIANTS = {"full": ("simple", "meanfield", "meanfield+is+learned"), "quick": ("simple",)}


def train_moons_variant(variant: str, loader, *, timesteps: int, epochs: int, lr: float, lr_end: float, seed):
    """A ``DDPM(data_shape=(2,), timesteps, ema_decay=0.99)`` trained on ``loader`` the way ``variant``
    (:data:`MOONS_VARIANTS`) says; returns (family, history)."""
    from pvae.inference import train
    from pvae.models.diffusion import DDPM

    objective, time_sampling, variance = MOONS_VARIANTS[variant]
    data = loader.data
    family = DDPM(
        data_shape=(2,),
        timesteps=timesteps,
        ema_decay=0.99,
        time_sampling=time_sampling,
        reverse_variance=variance,
        name=f"moons_{variant}",
    ).to(data.device)
    history = train(
        family, loader, epochs=epochs, objective=objective, lr=lr, lr_end=lr_end, seed=seed, progress=False
    )
    return family, history


def moons_section(ctx: ReportContext) -> str:
    from pvae import plots, plots_diffusion
    from pvae.data import BatchLoader, two_moons
    from pvae.two_sample import mmd2, mmd2_null
    from pvae.utils import resolve_device, seed_everything

    device = resolve_device(ctx.device)
    generator = seed_everything(ctx.seed)
    timesteps, points = (100, 500) if ctx.quick else (100, 1000)
    epochs, lr, lr_end = MOONS_SCHEDULE["quick" if ctx.quick else "full"]
    variants = MOONS_DEMO_VARIANTS["quick" if ctx.quick else "full"]
    data = two_moons(4000, noise=TWO_MOONS_NOISE, generator=generator).to(device)
    test = two_moons(1000, noise=TWO_MOONS_NOISE, generator=generator).to(device)
    reference = two_moons(points, noise=TWO_MOONS_NOISE, generator=generator).to(device)
    bandwidth = 0.25
    null = mmd2_null(lambda n: two_moons(n, noise=TWO_MOONS_NOISE, generator=generator), points, bandwidth)
    threshold = null.quantile(0.95).item()
    loader = BatchLoader(data, batch_size=256, seed=ctx.seed)
    steps = epochs * len(loader)
    lines = [
        "## Diffusion as a hierarchical latent chain: DDPM on two moons",
        "",
        f"`DDPM(data_shape=(2,), timesteps={timesteps}, ema_decay=0.99)` (linear schedule): the model is the",
        "reverse chain p_θ(x_{t−1} | x_t), the guide the forward noising process. Each variant trained it",
        f"on {len(data):,} two-moons points by `pvae.inference.train`: {steps:,} Adam steps of",
        f"{loader.batch_size} points ({epochs} epochs), the learning rate decayed geometrically from {lr:g}",
        f"to {lr_end:g} (`lr_end`), one timestep per point. Variants: `simple` (DDPM's L_simple, a",
        "reweighting that is *not* an ELBO; uniform timesteps), `meanfield` (the ELBO, each step's KL in",
        "closed form; uniform timesteps), `meanfield+is+learned` (the same ELBO with importance-sampled",
        'timesteps, p_t ∝ √E[L_t²], and learned reverse variances: `time_sampling="importance"`,',
        '`reverse_variance="learned"`). Test ELBO: all T terms in closed form (`DDPM.elbo`), mean over',
        f"{len(test):,} test points. MMD²: Gaussian kernel of width {bandwidth}, {points} samples against",
        f"{points} fresh data points. Between two independent data sets of {points} points it is",
        f"{null.mean():.5f} on average, with a **95th percentile of {threshold:.5f}** ({len(null)} pairs): a",
        "model whose MMD² lies below it is not told apart from the data by this test.",
        "",
        "| variant | train s | test ELBO (nats/point) | MMD² samples vs data | ÷ data-vs-data 95th pct |",
        "| --- | ---: | ---: | ---: | ---: |",
    ]
    scores = {}
    last = None
    for variant in variants:
        started = time.perf_counter()
        family, history = train_moons_variant(
            variant, loader, timesteps=timesteps, epochs=epochs, lr=lr, lr_end=lr_end, seed=ctx.seed
        )
        seconds = time.perf_counter() - started
        elbo, terms = family.elbo(test, return_terms=True)
        samples = family.sample(points, progress=False)
        distance = mmd2(samples, reference, bandwidth)
        scores[variant] = distance
        stderr = elbo.std().item() / len(elbo) ** 0.5
        lines.append(
            f"| {variant} | {seconds:.1f} | {elbo.mean():.3f} ± {stderr:.3f} | {distance:.5f} | "
            f"{distance / threshold:.2f} |"
        )
        plots_diffusion.plot_samples_2d(
            samples.cpu(), test.cpu(), os.path.join(ctx.out, f"ddpm_samples_{variant}.png"), title=variant
        )
        last = (variant, family, terms, history)
    variant, family, terms, history = last
    chain = family.sample(points, return_chain=True, chain_length=6, progress=False)
    plots_diffusion.plot_chain_2d(
        chain.states.cpu(), chain.times, os.path.join(ctx.out, "ddpm_chain.png"), data=test.cpu()
    )
    plots_diffusion.plot_elbo_terms(terms, os.path.join(ctx.out, "ddpm_elbo_terms.png"))
    plots.plot_loss_curve(
        plots_diffusion.moving_average(history.step_losses, 100),
        os.path.join(ctx.out, "ddpm_loss.png"),
        xlabel="step",
        ylabel=f"{variant} loss per point (mean of 100 steps)",
    )
    within = [name for name, value in scores.items() if value <= threshold]
    above = [name for name, value in scores.items() if value > threshold]
    lines.append("")
    if within:
        lines.append(
            f"Below the data-vs-data 95th percentile ({threshold:.5f}): "
            + ", ".join(f"`{name}` ({scores[name]:.5f})" for name in within)
            + "."
        )
    if above:
        lines.append("Above it: " + ", ".join(f"`{name}` ({scores[name]:.5f})" for name in above) + ".")
    lines += ["", "Samples (blue) over test data (grey):", ""]
    lines += [f"![{name}](ddpm_samples_{name}.png)" for name in variants]
    lines += [
        "",
        f"The reverse chain x_T → x_0 of the `{variant}` model, its loss per point (running mean of 100",
        "steps: one timestep per step makes the raw loss jump with t), and the ELBO's terms against t",
        "(L_{t−1} = E KL(q(x_{t−1} | x_t, x_0) ‖ p_θ(x_{t−1} | x_t)), L_0 the decoder, L_T ≈ 0):",
        "",
        "![reverse chain](ddpm_chain.png)",
        "",
        "![training loss](ddpm_loss.png)",
        "",
        "![ELBO terms](ddpm_elbo_terms.png)",
        "",
    ]
    return "\n".join(lines)


@dataclass(frozen=True)
class DigitsDemo:
    """The full demo's image run: DDPM with the U-Net on mnist5k digits in model space."""

    timesteps: int = 1000
    channels: tuple[int, ...] = (16, 32)
    objective: str = "simple"
    time_sampling: str = "per_datum"
    batch_size: int = 64
    epochs: int = 20
    lr: float = 2e-3
    lr_end: float = 2e-5
    ema_decay: float = 0.999
    eval_images: int = 16
    samples: int = 64
    ddim_steps: int = 100
    num_train: int | None = None  # training digits (None: all of the training split)


DIGITS_DEMO = DigitsDemo()


def digits_section(ctx: ReportContext, settings: DigitsDemo = DIGITS_DEMO) -> str:
    """Train a small DDPM on mnist5k digits, then samples (DDIM), the chain x_T → x_0 and test bits/dim."""
    import math

    import torch

    from pvae import plots, plots_diffusion
    from pvae.data import BatchLoader, from_model_space
    from pvae.inference import train
    from pvae.models.diffusion import DDPM
    from pvae.utils import resolve_device, seed_everything

    device = resolve_device(ctx.device)
    seed_everything(ctx.seed)
    train_x = diffusion_data("mnist5k", "train", None, settings.num_train, ctx.seed).to(device)  # (≤ 4000, …)
    test_all = diffusion_data("mnist5k", "test", None, None, ctx.seed)  # (1000, 1, 28, 28)
    spread = torch.linspace(0, len(test_all) - 1, settings.eval_images).round().long()
    test_x = test_all[spread].to(device)  # evenly spread over the test split
    family = DDPM(
        data_shape=(1, 28, 28),
        timesteps=settings.timesteps,
        channels=settings.channels,
        time_sampling=settings.time_sampling,
        ema_decay=settings.ema_decay,
        name="demo_ddpm_digits",
    ).to(device)
    loader = BatchLoader(train_x, batch_size=settings.batch_size, seed=ctx.seed)
    started = time.perf_counter()
    history = train(
        family,
        loader,
        epochs=settings.epochs,
        objective=settings.objective,
        lr=settings.lr,
        lr_end=settings.lr_end,
        seed=ctx.seed,
        progress=False,
    )
    train_seconds = time.perf_counter() - started
    family.eval()
    generator = torch.Generator(device=family.device).manual_seed(ctx.seed)
    started = time.perf_counter()
    bits = family.bits_per_dim(test_x, generator=generator).double()  # (eval_images,), all T terms, EMA
    eval_seconds = time.perf_counter() - started
    bits_stderr = bits.std().item() / math.sqrt(len(bits))
    started = time.perf_counter()
    chain = family.sample(
        settings.samples,
        steps=settings.ddim_steps,
        return_chain=True,
        chain_length=10,
        clip_denoised=True,
        generator=generator,
        progress=False,
    )
    sample_seconds = time.perf_counter() - started
    plots.save_image_grid(
        from_model_space(chain.samples).cpu(),
        os.path.join(ctx.out, "ddpm_digits_samples.png"),
        nrow=plots_diffusion.sample_grid_side(settings.samples),
    )
    plots_diffusion.plot_chain_strip(
        chain.states.cpu(), chain.times, os.path.join(ctx.out, "ddpm_digits_chain.png")
    )
    label = "L_simple" if settings.objective == "simple" else "−ELBO"
    plots.plot_loss_curve(
        plots_diffusion.moving_average(history.step_losses, 100),
        os.path.join(ctx.out, "ddpm_digits_loss.png"),
        xlabel="step",
        ylabel=f"{label} per image (mean of 100 steps)",
    )
    steps = len(history.step_losses)
    channels = ", ".join(map(str, settings.channels))
    return "\n".join(
        [
            "## DDPM on digits: a small image run",
            "",
            f"`DDPM(data_shape=(1, 28, 28), timesteps={settings.timesteps}, channels=({channels}),",
            f'time_sampling="{settings.time_sampling}", ema_decay={settings.ema_decay})`: the U-Net',
            f"denoiser on the {len(train_x):,} mnist5k training digits in model space (pixels k/127.5 − 1),",
            "with DDPM's discretized decoder for x_0. Trained by `pvae.inference.train` on the",
            f"`{settings.objective}` objective: {steps:,} Adam steps of {settings.batch_size} digits",
            f"({settings.epochs} epochs) in {train_seconds:.0f} s, learning rate decayed geometrically from",
            f"{settings.lr:g} to {settings.lr_end:g}.",
            "",
            f"**Test bits/dim: {bits.mean():.3f} ± {bits_stderr:.3f}** (mean ± standard error over",
            f"{len(bits)} test digits spread evenly over the mnist5k test split): −ELBO/(784 ln 2) by the",
            f"exact `DDPM.elbo`, all T = {settings.timesteps} terms with closed-form KLs (one x_t draw per",
            f"t), EMA weights; an upper bound on the code length of the 8-bit digits ({eval_seconds:.0f} s,",
            f"{settings.timesteps} network passes per digit).",
            "",
            "The objective and the way of drawing timesteps are chosen by `benchmarks/ddpm_vs_torch.py",
            "--parts bpd`, which compares them by this same evaluation (its measured table is in the",
            "README).",
            "",
            f"{settings.samples} samples by DDIM (η = 0, {settings.ddim_steps} of the {settings.timesteps}",
            f"timesteps, x̂_0 clipped to [−1, 1]; {sample_seconds:.0f} s), and the chain x_T → x_0 of the",
            "first eight (left to right):",
            "",
            "![digit samples](ddpm_digits_samples.png)",
            "",
            "![digit chain](ddpm_digits_chain.png)",
            "",
            "![digit training loss](ddpm_digits_loss.png)",
            "",
        ]
    )
