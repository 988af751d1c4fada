"""The ``pvae`` command line: one sub-command per job; the only module that knows every family.

Each sub-command is a ``_register_<name>(subparsers)`` function that adds its parser and sets
``run=`` to the function doing the work. Commands that print results accept ``--json`` (stdout then
carries only JSON; progress bars go to stderr and are silent when stderr is not a terminal) and
``--device``. ``pvae demo`` runs every section in ``DEMO_SECTIONS`` and writes ``DIR/report.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass

__all__ = ["DEMO_SECTIONS", "DemoContext", "build_parser", "main"]


# ---- shared helpers ------------------------------------------------------------------------------------
def _positive_int(text: str) -> int:
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def _non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be a non-negative integer, got {text}")
    return value


def _add_common(parser: argparse.ArgumentParser, json_output: bool = True) -> None:
    parser.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: cuda if available)")
    parser.add_argument("--seed", type=_non_negative_int, default=0, help="random seed (default 0)")
    if json_output:
        parser.add_argument("--json", action="store_true", help="print only JSON on stdout")


def _print_json(payload) -> None:
    json.dump(payload, sys.stdout, indent=2)
    sys.stdout.write("\n")


# ---- demo ----------------------------------------------------------------------------------------------
@dataclass
class DemoContext:
    """What a demo section gets: where to write figures, how long it may take, and on which device."""

    out: str
    quick: bool
    device: str | None
    seed: int


#: Sections of ``pvae demo``, in report order. Each takes a DemoContext and returns Markdown.
DEMO_SECTIONS: list[Callable[[DemoContext], str]] = []  # filled below, next to each family's commands


def _register_demo(subparsers) -> None:
    parser = subparsers.add_parser(
        "demo", help="run the main job and write DIR/report.md with tables and figures"
    )
    parser.add_argument("--out", default="report", help="output folder (default: report)")
    parser.add_argument("--quick", action="store_true", help="short version (about a minute)")
    _add_common(parser, json_output=False)
    parser.set_defaults(run=_run_demo)


def _run_demo(args) -> int:
    os.makedirs(args.out, exist_ok=True)
    context = DemoContext(out=args.out, quick=args.quick, device=args.device, seed=args.seed)
    parts = ["# pvae demo report", ""]
    timings = []
    for section in DEMO_SECTIONS:
        start = time.perf_counter()
        print(f"[demo] {section.__name__.removeprefix('_demo_')} …", file=sys.stderr, flush=True)
        parts.append(section(context))
        timings.append((section.__name__.removeprefix("_demo_"), time.perf_counter() - start))
    parts += ["## Timings", "", "| section | seconds |", "| --- | ---: |"]
    parts += [f"| {name} | {seconds:.1f} |" for name, seconds in timings]
    path = os.path.join(args.out, "report.md")
    with open(path + ".tmp", "w") as handle:
        handle.write("\n".join(parts) + "\n")
    os.replace(path + ".tmp", path)
    print(f"wrote {path}", file=sys.stderr)
    return 0


# ---- toy: the exponential–Gaussian model with an exact posterior ---------------------------------------
TOY_GUIDES = ("exact", "meanfield", "lognormal", "amortized")


def _register_toy(subparsers) -> None:
    parser = subparsers.add_parser(
        "toy",
        help="exact posterior vs a fitted guide for z ~ Exponential(rate), x | z ~ Normal(z, scale)",
        description="Fit a guide by SVI and compare it per x with the exact posterior and evidence.",
    )
    parser.add_argument("--rate", type=float, default=1.0, help="λ of the exponential prior, > 0 (default 1)")
    parser.add_argument(
        "--scale", type=float, default=1.0, help="σ of the Gaussian likelihood, > 0 (default 1)"
    )
    parser.add_argument(
        "--x",
        type=float,
        nargs="+",
        default=[float(v) for v in range(-3, 6)],
        help="observations (default −3 … 5)",
    )
    parser.add_argument(
        "--guide", choices=TOY_GUIDES, default="amortized", help="guide to fit (default amortized)"
    )
    parser.add_argument(
        "--num-steps",
        type=_non_negative_int,
        default=None,
        help="SVI steps (default 1000; 2000 for amortized)",
    )
    parser.add_argument(
        "--num-samples", type=_positive_int, default=1000, help="guide draws for the comparison"
    )
    parser.add_argument("--out", default=os.path.join("runs", "toy"), help="folder for the overlay plot")
    _add_common(parser)
    parser.set_defaults(run=_run_toy)


def _fit_toy_guide(family, guide_name: str, x, num_steps=None, seed: int = 0, progress: bool = True):
    """Fit one toy guide by SVI with the family's recipe; returns (guide, seconds)."""
    from pvae.inference import fit

    guide, data, steps, optimizer = family.svi_setup(guide_name, x, num_steps)
    start = time.perf_counter()
    if steps > 0:
        fit(family.model, guide, data, num_steps=steps, optim=optimizer, seed=seed, progress=progress)
    return guide, time.perf_counter() - start


def _run_toy(args) -> int:
    from pvae.utils import torch_threads

    with torch_threads(1):  # a toy of scalars: intra-op threads only add overhead
        return _toy(args)


def _toy(args) -> int:
    import torch

    from pvae.inference import compare
    from pvae.models.toy import ExponentialGaussian
    from pvae.utils import resolve_device, seed_everything

    device = resolve_device(args.device)
    seed_everything(args.seed)
    family = ExponentialGaussian(rate=args.rate, scale=args.scale).to(device)
    x = torch.tensor(args.x, dtype=torch.float64, device=device)
    guide, _ = _fit_toy_guide(family, args.guide, x, args.num_steps, args.seed, progress=not args.json)
    result = compare(
        family.model,
        guide,
        x,
        posterior=family.posterior,
        log_marginal=family.log_marginal,
        num_samples=args.num_samples,
    )
    plot = result.plot(os.path.join(args.out, f"toy_{args.guide}.png"))
    rows = [
        {"x": value, "log_marginal": log_px, "elbo": elbo, "kl": kl}
        for value, log_px, elbo, kl in zip(
            x.tolist(),
            result.per_datum["log_marginal"].tolist(),
            result.per_datum["elbo"].tolist(),
            result.per_datum["kl"].tolist(),
        )
    ]
    if args.json:
        _print_json(rows)
        return 0
    print(f"z ~ Exponential({args.rate:g}), x | z ~ Normal(z, {args.scale:g}); guide: {args.guide}")
    print(result.table())
    mean_kl = sum(row["kl"] for row in rows) / len(rows)
    print(f"mean KL(q‖p) over x: {mean_kl:.3g} nats ({result.kl_method}); overlay plot: {plot}")
    return 0


def _demo_toy(ctx: DemoContext) -> str:
    """Seed 1's examples made exact: the posterior as x moves, four guides against it, evidence estimators."""
    from pvae.utils import torch_threads

    with torch_threads(1):  # a toy of scalars: intra-op threads only add overhead
        return _demo_toy_section(ctx)


def _demo_toy_section(ctx: DemoContext) -> str:
    import torch

    from pvae.inference import compare, estimator_spread
    from pvae.models.toy import ExponentialGaussian
    from pvae.plots import plot_estimator_spread, plot_posterior_sweep
    from pvae.utils import resolve_device, seed_everything

    device = resolve_device(ctx.device)
    seed_everything(ctx.seed)
    x = torch.arange(-3.0, 6.0, dtype=torch.float64, device=device)
    family = ExponentialGaussian().to(device)
    plot_posterior_sweep(x, family.posterior, os.path.join(ctx.out, "toy_posterior_sweep.png"))
    lines = [
        "## The exponential–Gaussian toy: an exact posterior",
        "",
        "z ~ Exponential(1), x | z ~ Normal(z, 1). The posterior is TruncatedNormal(x − 1, 1, low=0) and",
        "log p(x) = 1/2 − x + log Φ(x − 1), both exact. As x grows the posterior moves from a sharp",
        "exponential-like shape at z = 0 (the prior dominates) to a Gaussian centred at x − 1:",
        "",
        "![exact posterior as x moves](toy_posterior_sweep.png)",
        "",
        "Four guides, each fitted by SVI (Trace_ELBO) and compared with the truth by",
        "`pvae.inference.compare` (KL(q‖p) in closed form where it exists, Monte Carlo otherwise; sums over",
        "the 9 values of x):",
        "",
        "| guide | fit steps | fit s | ELBO | log p(x) | gap | KL(q‖p) | KL method |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | --- |",
    ]
    quick_steps = {"exact": 0, "meanfield": 300, "lognormal": 300, "amortized": 600}
    results = {}
    for name in TOY_GUIDES:
        steps = quick_steps[name] if ctx.quick else None
        guide, seconds = _fit_toy_guide(family, name, x, steps, ctx.seed, progress=True)
        result = compare(family.model, guide, x, posterior=family.posterior, log_marginal=family.log_marginal)
        results[name] = result
        used = family.svi_setup(name, x, steps)[2]
        lines.append(
            f"| {name} | {used} | {seconds:.1f} | {result.elbo:.4f} ± {result.elbo_stderr:.1g} | "
            f"{result.log_marginal:.4f} | {result.gap:.4f} | {result.kl:.2e} | {result.kl_method} |"
        )
    for name in ("amortized", "lognormal"):
        results[name].plot(os.path.join(ctx.out, f"toy_{name}.png"))
    lines += [
        "",
        "The exact guide gives ELBO = log p(x) with zero variance; the truncated-normal guides close the",
        "gap; the log-normal guide has the right support but the wrong shape, and its KL stays.",
        "",
        "Amortized guide (one network for every x) per datum:",
        "",
        results["amortized"].markdown(),
        "",
        "![amortized guide vs exact posterior](toy_amortized.png)",
        "",
        "![log-normal guide vs exact posterior](toy_lognormal.png)",
        "",
    ]
    # evidence: the seed's naive p(x) ≈ 1/n Σ p(x | z_i) with z_i from the prior, against importance sampling
    x_few = x[[0, 4, 8]]
    ks = (10, 100) if ctx.quick else (10, 100, 1000)
    spread = estimator_spread(family.model, family.amortized_guide, x_few, num_samples=ks, repeats=20)
    labels = [f"x = {v:g}" for v in x_few.tolist()]
    plot_estimator_spread(spread, labels, os.path.join(ctx.out, "toy_evidence_spread.png"))
    exact = family.log_marginal(x_few)
    k = ks[-1]
    lines += [
        f"Evidence estimators at k = {k} (20 repeats): the naive estimator samples z from the prior, the",
        "importance-sampled one from the amortized guide. Both agree with the exact value; the naive one",
        "spreads far more where the posterior is far from the prior.",
        "",
        "| x | exact log p(x) | naive mean ± sd | naive ESS | importance mean ± sd | importance ESS |",
        "| ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for index, value in enumerate(x_few.tolist()):
        naive, guided = spread["prior"][k], spread["guide"][k]
        lines.append(
            f"| {value:g} | {exact[index].item():.4f} | {naive['mean'][index].item():.4f} ± "
            f"{naive['std'][index].item():.1g} | {naive['ess'][index].item():.0f} | "
            f"{guided['mean'][index].item():.4f} ± {guided['std'][index].item():.1g} | "
            f"{guided['ess'][index].item():.0f} |"
        )
    lines += ["", "![spread of the evidence estimators](toy_evidence_spread.png)", ""]
    return "\n".join(lines)


def _demo_mixture(ctx: DemoContext) -> str:
    """The seed's one-hot latent: enumeration gives the exact posterior; an amortized guide is fitted."""
    from pvae.utils import torch_threads

    with torch_threads(1):  # small tensors: intra-op threads only add overhead
        return _demo_mixture_section(ctx)


def _demo_mixture_section(ctx: DemoContext) -> str:
    import torch
    from pyro.infer import TraceEnum_ELBO

    from pvae.inference import compare, fit
    from pvae.models.mixture import GaussianMixture
    from pvae.utils import resolve_device, seed_everything

    device = resolve_device(ctx.device)
    generator = seed_everything(ctx.seed)
    family = GaussianMixture().to(device)
    num_points, steps = (200, 100) if ctx.quick else (500, 400)
    data, _ = family.sample_data(num_points, generator)
    start = time.perf_counter()
    fit(
        family.model,
        family.guide,
        data.to(device),
        num_steps=steps,
        lr=3e-2,
        loss=TraceEnum_ELBO(max_plate_nesting=1),
    )
    seconds = time.perf_counter() - start
    grid = torch.linspace(-4, 5, 9, dtype=torch.float64, device=device)
    result = compare(
        family.model, family.guide, grid, posterior=family.posterior, log_marginal=family.log_marginal
    )
    result.plot(os.path.join(ctx.out, "mixture_posterior.png"))
    weights = ", ".join(f"{w:.2g}" for w in family.weights.tolist())
    locs = ", ".join(f"{m:g}" for m in family.locs.reshape(-1).tolist())
    scales = ", ".join(f"{s:g}" for s in family.scales.reshape(-1).tolist())
    return "\n".join(
        [
            "## A one-hot latent: the Gaussian mixture",
            "",
            f"z ~ OneHotCategorical(π = ({weights})), x | z ~ Normal(zᵀμ, zᵀσ) with μ = ({locs}),",
            f"σ = ({scales}). Pyro's parallel enumeration gives p(z | x) and log p(x) exactly. An amortized",
            f"categorical guide q_φ(z | x) was fitted on {num_points} draws with TraceEnum_ELBO",
            f"({steps} steps, {seconds:.1f} s); its mean KL(q‖p) over the grid is",
            f"{result.per_datum['kl'].mean().item():.2e} nats ({result.kl_method}).",
            "",
            result.markdown(),
            "",
            "![mixture: exact posterior vs amortized guide](mixture_posterior.png)",
            "",
        ]
    )


# ---- autoencoders: train, evaluate, sample ---------------------------------------------------------------
AUTOENCODERS = ("ae", "dae", "vae")
ENGINE_CHOICES = ("eager", "trace", "compile")


def _register_train(subparsers) -> None:
    from pvae.data import IMAGE_DATASETS

    parser = subparsers.add_parser(
        "train",
        help="train an AE, DAE or VAE on digits; writes DIR/checkpoint.pt and pictures",
        description="Train an autoencoder family by SVI (Adam) with per-epoch test ELBO and checkpoints.",
    )
    parser.add_argument(
        "family", choices=AUTOENCODERS + ("ddpm",), help="ae, dae (denoising), vae or ddpm (diffusion)"
    )
    parser.add_argument(
        "--dataset",
        choices=IMAGE_DATASETS + DIFFUSION_ONLY_DATASETS,
        default="mnist5k",
        help="default mnist5k; two-moons (2-D points) for ddpm",
    )
    parser.add_argument("--data-root", default=None, help="folder for mnist/fashion-mnist files")
    parser.add_argument("--num-train", type=_positive_int, default=None, help="use a class-mixed subset")
    parser.add_argument("--num-test", type=_positive_int, default=None, help="test images to use")
    parser.add_argument("--epochs", type=_positive_int, default=10, help="default 10")
    parser.add_argument("--batch-size", type=_positive_int, default=128, help="default 128")
    parser.add_argument("--lr", type=float, default=1e-3, help="Adam learning rate (default 1e-3)")
    parser.add_argument("--z-dim", type=_positive_int, default=20, help="latent/code dimension (default 20)")
    parser.add_argument(
        "--hidden-dim", type=_positive_int, default=None, help="hidden width (default 400; ddpm MLP: 128)"
    )
    parser.add_argument(
        "--likelihood",
        choices=("bernoulli", "gaussian"),
        default="bernoulli",
        help="VAE likelihood: bernoulli on binarized digits (default) or gaussian on grey levels",
    )
    parser.add_argument(
        "--scale", type=float, default=None, help="Gaussian likelihood std (default: the family's)"
    )
    parser.add_argument("--corruption", choices=("mask", "gaussian"), default="mask", help="DAE corruption")
    parser.add_argument("--noise", type=float, default=0.25, help="DAE masking probability or noise std")
    parser.add_argument(
        "--objective",
        choices=("elbo", "meanfield", "iwae", "simple"),
        default="elbo",
        help="default elbo (Trace_ELBO); meanfield: closed-form KLs; ddpm: simple = L_simple (not an ELBO)",
    )
    parser.add_argument("--num-particles", type=_positive_int, default=1, help="k of IWAE-k (default 1)")
    parser.add_argument(
        "--engine",
        choices=ENGINE_CHOICES,
        default="eager",
        help="eager (default), trace (replay a recorded graph of the step) or compile (torch.compile it)",
    )
    parser.add_argument("--jit", action="store_true", help="Pyro's JitTrace_ELBO (TorchScript)")
    parser.add_argument("--out", default=None, help="output folder (default runs/<family>)")
    parser.add_argument("--resume", action="store_true", help="continue from DIR/checkpoint.pt if present")
    _add_diffusion_train_options(parser)
    _add_common(parser)
    parser.set_defaults(run=_run_train)


def _image_split(dataset: str, split: str, root: str | None, limit: int | None, seed: int):
    """Flattened grey levels (N, 784) and labels of a split, optionally a seeded class-mixed subset."""
    import torch

    from pvae.data import load_images

    images = load_images(dataset, split, root=root)
    x, labels = images.flat(), images.labels
    if limit is not None and limit < x.shape[0]:
        index = torch.randperm(x.shape[0], generator=torch.Generator().manual_seed(seed))[:limit]
        x, labels = x[index.sort().values], labels[index.sort().values]
    return x, labels


def _binarization(family_kind: str, likelihood: str) -> str | None:
    return "dynamic" if family_kind == "vae" and likelihood == "bernoulli" else None


def _test_loader(x, labels, binarize: str | None, device, batch_size: int = 100):
    """The test digits, binarized once (seed 0) under a Bernoulli likelihood so every evaluation agrees."""
    from pvae.data import BatchLoader

    static = "static" if binarize is not None else None
    return BatchLoader(x.to(device), labels, batch_size=batch_size, shuffle=False, binarize=static, seed=0)


def _build_autoencoder(kind: str, args):
    from pvae.models.ae import AE, DAE
    from pvae.models.vae import VAE

    scale = {} if args.scale is None else {"scale": args.scale}
    args.hidden_dim = args.hidden_dim or 400
    if kind == "vae":
        return VAE(
            x_dim=784, z_dim=args.z_dim, hidden_dim=args.hidden_dim, likelihood=args.likelihood, **scale
        )
    if kind == "ae":
        return AE(x_dim=784, hidden_dim=args.hidden_dim, z_dim=args.z_dim, **scale)
    return DAE(
        x_dim=784,
        hidden_dim=args.hidden_dim,
        z_dim=args.z_dim,
        corruption=args.corruption,
        noise=args.noise,
        **scale,
    )


def _is_autoencoder(family) -> bool:
    from pvae.models.ae import AE

    return isinstance(family, AE)


def _autoencoder_pictures(family, x, labels, history, out: str, prefix: str = "") -> dict[str, str]:
    """Reconstructions, prior samples (VAE), ELBO curve, latent scatter, and the manifold for z_dim = 2."""
    import torch

    from pvae import plots

    paths = {}
    shown = x[:: max(1, x.shape[0] // 32)][:32]  # the test digits are sorted by class
    paths["reconstructions"] = plots.plot_reconstructions(
        shown.cpu(), family.reconstruct(shown).cpu(), os.path.join(out, f"{prefix}reconstructions.png")
    )
    if not _is_autoencoder(family):
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
    if codes.shape[-1] == 2 and not _is_autoencoder(family):
        paths["manifold"] = plots.plot_latent_manifold(
            family.decode, os.path.join(out, f"{prefix}manifold.png")
        )
    return paths


def _run_train(args) -> int:
    import torch

    from pvae.data import BatchLoader
    from pvae.inference import train
    from pvae.utils import resolve_device, seed_everything

    if not (args.lr > 0 and args.lr < float("inf")):
        raise ValueError(f"--lr must be a finite number > 0, got {args.lr}")
    if args.family == "ddpm":
        return _run_train_ddpm(args)
    if args.dataset in DIFFUSION_ONLY_DATASETS or args.objective == "simple":
        raise ValueError(f"--dataset {args.dataset} and --objective simple are for ddpm only")
    if args.family != "vae" and args.objective != "elbo":
        raise ValueError(
            f"--objective {args.objective} needs a guide with a density; {args.family} has a point-mass "
            "guide (use the default elbo)"
        )
    device = resolve_device(args.device)
    out = args.out or os.path.join("runs", args.family)
    os.makedirs(out, exist_ok=True)
    seed_everything(args.seed)
    train_x, _ = _image_split(args.dataset, "train", args.data_root, args.num_train, args.seed)
    test_x, test_labels = _image_split(args.dataset, "test", args.data_root, args.num_test, args.seed)
    binarize = _binarization(args.family, args.likelihood)
    train_loader = BatchLoader(
        train_x.to(device), batch_size=args.batch_size, binarize=binarize, seed=args.seed
    )
    test_loader = _test_loader(test_x, test_labels, binarize, device)
    family = _build_autoencoder(args.family, args).to(device)
    checkpoint = os.path.join(out, "checkpoint.pt")
    history = train(
        family,
        train_loader,
        test_loader,
        epochs=args.epochs,
        objective=args.objective,
        lr=args.lr,
        checkpoint=checkpoint,
        resume=args.resume,
        seed=args.seed,
        progress=not args.json,
        jit=args.jit,
        num_particles=args.num_particles,
        engine=args.engine,
        metadata={
            "dataset": args.dataset,
            "data_root": args.data_root,
            "num_train": int(train_x.shape[0]),
            "num_test": int(test_x.shape[0]),
            "batch_size": args.batch_size,
            "binarize": binarize,
            "family_kind": args.family,
        },
    )
    with open(os.path.join(out, "history.json"), "w") as handle:
        json.dump(history.to_dict(), handle)
    family.eval()
    pictures = _autoencoder_pictures(family, test_loader.data, test_labels, history, out)
    summary = {
        "family": args.family,
        "epochs": history.epochs,
        "objective": history.objective,
        "train_elbo": history.train_elbo[-1],
        "test_elbo": history.test_elbo[-1] if history.test_elbo else None,
        "median_epoch_seconds": float(torch.tensor(history.epoch_seconds).median()),
        "checkpoint": checkpoint,
        "pictures": pictures,
    }
    if args.json:
        _print_json(summary)
        return 0
    label = "ELBO" if history.objective != "iwae" else f"IWAE-{args.num_particles} bound"
    print(
        f"{args.family} on {args.dataset} ({train_x.shape[0]} train / {test_x.shape[0]} test images), "
        f"{history.epochs} epochs: train {label} {summary['train_elbo']:.2f}, test {label} "
        f"{summary['test_elbo']:.2f} nats per image; median epoch {summary['median_epoch_seconds']:.2f} s"
    )
    print(f"checkpoint: {checkpoint}; pictures: {', '.join(pictures.values())}")
    return 0


def _register_evaluate(subparsers) -> None:
    parser = subparsers.add_parser(
        "evaluate",
        help="test log-likelihood (nats per image ± standard error) of a trained checkpoint",
        description="Estimate log p(x) on the test split by importance sampling with the guide (IWAE-k). "
        "Autoencoders (AE/DAE) have no marginal likelihood: their reconstruction error is reported.",
    )
    parser.add_argument("checkpoint", help="a checkpoint.pt written by pvae train")
    parser.add_argument(
        "--num-samples", type=_positive_int, default=1000, help="k (default 1000; not used for ddpm)"
    )
    parser.add_argument(
        "--num-test", type=_positive_int, default=None, help="test images (default: as trained)"
    )
    parser.add_argument("--data-root", default=None, help="folder for mnist/fashion-mnist files")
    _add_common(parser)
    parser.set_defaults(run=_run_evaluate)


def _run_evaluate(args) -> int:
    import math

    from pvae.checkpoint import load, load_checkpoint
    from pvae.inference import evaluate_log_likelihood
    from pvae.utils import resolve_device, seed_everything

    device = resolve_device(args.device)
    config = load_checkpoint(args.checkpoint)["train_config"]
    family = load(args.checkpoint, device=device)
    if _is_diffusion(family):
        return _evaluate_ddpm(args, family, config)
    dataset = config.get("dataset", "mnist5k")
    num_test = args.num_test or config.get("num_test")
    test_x, test_labels = _image_split(
        dataset, "test", args.data_root or config.get("data_root"), num_test, 0
    )
    loader = _test_loader(test_x, test_labels, config.get("binarize"), device)
    seed_everything(args.seed)
    if _is_autoencoder(family):
        import torch

        errors = torch.cat([family.reconstruction_error(x).cpu() for x, _ in loader]).double()
        n = errors.numel()
        payload = {
            "log_likelihood": None,
            "reconstruction_error": float(errors.mean()),
            "stderr": float(errors.std() / math.sqrt(n)) if n > 1 else None,
            "num_images": n,
            "num_samples": None,
            "metric": "mean squared error per pixel",
            "note": f"{type(family).__name__} has a flat prior and a point-mass guide: "
            "no marginal likelihood",
        }
        if args.json:
            _print_json(payload)
        else:
            print(
                f"{type(family).__name__}: no marginal likelihood (flat prior, point-mass guide). "
                f"Reconstruction error {payload['reconstruction_error']:.5f} ± {payload['stderr'] or 0:.5f} "
                f"(mean squared error per pixel, {n} {dataset} test images)"
            )
        return 0
    result = evaluate_log_likelihood(family, loader, num_samples=args.num_samples, progress=not args.json)
    if args.json:
        _print_json(result.to_dict())
    else:
        print(f"{dataset} test set: {result}")
    return 0


def _register_sample(subparsers) -> None:
    parser = subparsers.add_parser(
        "sample", help="draw images from a trained VAE's prior and save them as a grid"
    )
    parser.add_argument("checkpoint", help="a checkpoint.pt written by pvae train")
    parser.add_argument("-n", "--num", type=_positive_int, default=64, help="number of images (default 64)")
    parser.add_argument("--out", required=True, help="destination FILE.png")
    parser.add_argument("--nrow", type=_positive_int, default=8, help="images per row (default 8)")
    _add_diffusion_sample_options(parser)
    _add_common(parser, json_output=False)
    parser.set_defaults(run=_run_sample)


def _run_sample(args) -> int:
    import torch

    from pvae import plots
    from pvae.checkpoint import load
    from pvae.utils import resolve_device

    device = resolve_device(args.device)
    family = load(args.checkpoint, device=device)
    if _is_diffusion(family):
        return _sample_ddpm(args, family)
    if _is_autoencoder(family) or not hasattr(family, "sample"):
        raise ValueError(
            f"{type(family).__name__} has no proper prior to sample from (an autoencoder's prior is flat)"
        )
    generator = torch.Generator(device=device).manual_seed(args.seed)
    images = family.sample(args.num, generator=generator)
    path = plots.save_image_grid(images.cpu(), args.out, nrow=args.nrow)
    print(f"wrote {args.num} samples to {path}", file=sys.stderr)
    return 0


def _demo_autoencoders(ctx: DemoContext) -> str:
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
    train_x, _ = _image_split("mnist5k", "train", None, num_train, ctx.seed)
    test_x, test_labels = _image_split("mnist5k", "test", None, num_test, ctx.seed)
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
        test_loader = _test_loader(test_x, test_labels, binarize, device)
        history = train(family, loader, test_loader, epochs=epochs[key], seed=ctx.seed, progress=True)
        family.eval()
        _autoencoder_pictures(family, test_loader.data, test_labels, history, ctx.out, prefix=f"demo_{key}_")
        seconds = sum(history.epoch_seconds) / history.epochs
        if _is_autoencoder(family):
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


# ---- diffusion (DDPM): train, evaluate, sample, demo -----------------------------------------------------
DIFFUSION_ONLY_DATASETS = ("two-moons",)


def _add_diffusion_train_options(parser) -> None:
    group = parser.add_argument_group("ddpm options")
    group.add_argument(
        "--timesteps", type=_positive_int, default=1000, help="T, diffusion steps (default 1000)"
    )
    group.add_argument("--schedule", choices=("linear", "cosine"), default="linear", help="default linear")
    group.add_argument(
        "--reverse-variance",
        choices=("beta", "beta_tilde"),
        default="beta",
        help="σ_t² of the reverse steps t ≥ 2 (default beta)",
    )
    group.add_argument(
        "--ema-decay",
        type=float,
        default=None,
        help="EMA of the weights for sampling/evaluation, 0 = off (default 0.999 for images, off for 2-D)",
    )
    group.add_argument(
        "--channels", type=_positive_int, nargs="+", default=[32, 64], help="U-Net widths per level (32 64)"
    )
    group.add_argument(
        "--time-sampling",
        choices=("plate", "per_datum"),
        default="plate",
        help="one timestep per batch (the time plate, default) or one per datum",
    )
    group.add_argument(
        "--picture-samples",
        type=_positive_int,
        default=None,
        help="samples drawn for the pictures (default 16 images, 1000 points)",
    )


def _add_diffusion_sample_options(parser) -> None:
    group = parser.add_argument_group("ddpm options")
    group.add_argument("--steps", type=_positive_int, default=None, help="DDIM with this many steps")
    group.add_argument("--eta", type=float, default=None, help="DDIM noise scale η (default 0 with --steps)")
    group.add_argument("--clip", action="store_true", help="clip the implied x̂_0 to [−1, 1] (images)")
    group.add_argument("--chain", default=None, help="also write the chain x_T → x_0 to this FILE.png")


def _is_diffusion(family) -> bool:
    from pvae.models.diffusion import DDPM

    return isinstance(family, DDPM)


def _diffusion_data(dataset: str, split: str, root: str | None, limit: int | None, seed: int):
    """Model-space data: two-moons points (N, 2) (seeded per split) or images (N, 1, 28, 28) in [−1, 1]."""
    import torch

    from pvae.data import load_images, to_model_space, two_moons

    if dataset == "two-moons":
        count = limit or (4000 if split == "train" else 1000)
        generator = torch.Generator().manual_seed(seed * 2 + (split == "test"))
        return two_moons(count, noise=0.05, generator=generator)
    pixels = load_images(dataset, split, root=root).pixels
    if limit is not None and limit < pixels.shape[0]:  # a seeded class-mixed subset, in file order
        index = torch.randperm(pixels.shape[0], generator=torch.Generator().manual_seed(seed))[:limit]
        pixels = pixels[index.sort().values]
    return to_model_space(pixels).unsqueeze(1)


def _ddpm_pictures(family, test_x, history, out: str, count: int | None, seed: int) -> dict[str, str]:
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


def _run_train_ddpm(args) -> int:
    from pvae.utils import torch_threads

    if args.dataset in DIFFUSION_ONLY_DATASETS:  # 2-D points: small kernels, one thread is faster
        with torch_threads(1):
            return _train_ddpm(args)
    return _train_ddpm(args)


def _train_ddpm(args) -> int:
    import torch

    from pvae.data import BatchLoader
    from pvae.inference import train
    from pvae.models.diffusion import DDPM
    from pvae.utils import resolve_device, seed_everything

    if args.objective == "iwae":
        raise ValueError("--objective iwae is not offered for ddpm: use elbo, meanfield or simple")
    if args.engine != "eager" or args.jit:
        raise ValueError(
            "ddpm draws a timestep per step, which changes the program's structure: use --engine eager "
            "without --jit"
        )
    device = resolve_device(args.device)
    out = args.out or os.path.join("runs", "ddpm")
    os.makedirs(out, exist_ok=True)
    seed_everything(args.seed)
    train_x = _diffusion_data(args.dataset, "train", args.data_root, args.num_train, args.seed)
    test_x = _diffusion_data(args.dataset, "test", args.data_root, args.num_test, args.seed)
    family = DDPM(
        data_shape=tuple(train_x.shape[1:]),
        timesteps=args.timesteps,
        schedule=args.schedule,
        reverse_variance=args.reverse_variance,
        ema_decay=args.ema_decay,
        hidden_dim=args.hidden_dim or 128,
        channels=tuple(args.channels),
        time_sampling=args.time_sampling,
    ).to(device)
    train_loader = BatchLoader(train_x.to(device), batch_size=args.batch_size, seed=args.seed)
    test_loader = BatchLoader(test_x.to(device), batch_size=250, shuffle=False)
    checkpoint = os.path.join(out, "checkpoint.pt")
    history = train(
        family,
        train_loader,
        test_loader,
        epochs=args.epochs,
        objective=args.objective,
        lr=args.lr,
        checkpoint=checkpoint,
        resume=args.resume,
        seed=args.seed,
        progress=not args.json,
        metadata={
            "dataset": args.dataset,
            "data_root": args.data_root,
            "num_train": int(train_x.shape[0]),
            "num_test": int(test_x.shape[0]),
            "batch_size": args.batch_size,
            "family_kind": "ddpm",
        },
    )
    with open(os.path.join(out, "history.json"), "w") as handle:
        json.dump(history.to_dict(), handle)
    family.eval()
    pictures = _ddpm_pictures(family, test_x.to(device), history, out, args.picture_samples, args.seed)
    summary = {
        "family": "ddpm",
        "dataset": args.dataset,
        "timesteps": args.timesteps,
        "epochs": history.epochs,
        "objective": history.objective,
        "train_objective_per_datum": history.train_elbo[-1],
        "test_objective_per_datum": history.test_elbo[-1] if history.test_elbo else None,
        "median_epoch_seconds": float(torch.tensor(history.epoch_seconds).median()),
        "checkpoint": checkpoint,
        "pictures": pictures,
    }
    if args.json:
        _print_json(summary)
        return 0
    label = "−L_simple" if history.objective == "simple" else f"ELBO ({history.objective}, one t per batch)"
    print(
        f"ddpm on {args.dataset} ({train_x.shape[0]} train / {test_x.shape[0]} test), T = {args.timesteps}, "
        f"{history.epochs} epochs: train {label} {summary['train_objective_per_datum']:.3f}, test "
        f"{summary['test_objective_per_datum']:.3f} per datum; median epoch "
        f"{summary['median_epoch_seconds']:.2f} s"
    )
    print(f"checkpoint: {checkpoint}; pictures: {', '.join(pictures.values())}")
    print(f"exact test ELBO (all T terms) / bits per dim: pvae evaluate {checkpoint}")
    return 0


def _evaluate_ddpm(args, family, config) -> int:
    """Per-datum ELBO with all T terms (closed-form KLs) on the test split, and bits per dimension."""
    import math

    import torch

    from pvae.utils import seed_everything

    dataset = config.get("dataset", "mnist5k")
    num_test = args.num_test or config.get("num_test")
    test_x = _diffusion_data(dataset, "test", args.data_root or config.get("data_root"), num_test, 0)
    if dataset == "two-moons":  # regenerate the run's own test points
        test_x = _diffusion_data(dataset, "test", None, num_test, int(config.get("seed") or 0))
    seed_everything(args.seed)
    started = time.perf_counter()
    elbo = torch.cat(
        [family.elbo(batch.to(family.device), progress=not args.json).cpu() for batch in test_x.split(64)]
    ).double()
    seconds = time.perf_counter() - started
    dims = math.prod(family.data_shape)
    bits = -elbo / (dims * math.log(2))
    n = elbo.numel()
    images = family.config.decoder == "discretized"
    payload = {
        "family": "ddpm",
        "dataset": dataset,
        "num_test": n,
        "timesteps": family.timesteps,
        "elbo": float(elbo.mean()),
        "elbo_stderr": float(elbo.std() / math.sqrt(n)) if n > 1 else None,
        "bits_per_dim": float(bits.mean()),
        "bits_per_dim_stderr": float(bits.std() / math.sqrt(n)) if n > 1 else None,
        "ema": bool(family.ema_denoiser is not None and int(family.ema_updates) > 0),
        "seconds": seconds,
        "metric": "ELBO in nats per datum with all T terms (closed-form KLs, one x_t draw per t); "
        + (
            "bits per dim of the 8-bit data (discretized decoder)"
            if images
            else "bits per dim of the density"
        ),
    }
    if args.json:
        _print_json(payload)
        return 0
    stderr = payload["bits_per_dim_stderr"] or 0.0
    print(
        f"ddpm (T = {family.timesteps}) on {n} {dataset} test points: ELBO {payload['elbo']:.3f} ± "
        f"{payload['elbo_stderr'] or 0:.3f} nats, {payload['bits_per_dim']:.4f} ± {stderr:.4f} bits/dim "
        f"({seconds:.0f} s)"
    )
    return 0


def _sample_ddpm(args, family) -> int:
    import torch

    from pvae import plots, plots_diffusion
    from pvae.checkpoint import load_checkpoint
    from pvae.data import from_model_space

    generator = torch.Generator(device=family.device).manual_seed(args.seed)
    chain = family.sample(
        args.num,
        steps=args.steps,
        eta=args.eta,
        clip_denoised=args.clip,
        return_chain=True,
        generator=generator,
    )
    if len(family.data_shape) == 3:
        path = plots.save_image_grid(from_model_space(chain.samples).cpu(), args.out, nrow=args.nrow)
        if args.chain:
            plots_diffusion.plot_chain_strip(chain.states.cpu(), chain.times, args.chain)
    else:
        config = load_checkpoint(args.checkpoint)["train_config"]
        data = chain.samples.cpu()
        if config.get("dataset") == "two-moons":
            data = _diffusion_data(
                "two-moons", "test", None, config.get("num_test"), int(config.get("seed") or 0)
            )
        path = plots_diffusion.plot_samples_2d(chain.samples.cpu(), data, args.out)
        if args.chain:
            plots_diffusion.plot_chain_2d(chain.states.cpu(), chain.times, args.chain, data=data)
    print(f"wrote {args.num} samples to {path}", file=sys.stderr)
    return 0


def _demo_diffusion(ctx: DemoContext) -> str:
    """DDPM on two moons with its three objectives: test ELBO, an MMD to the data, samples, chain, terms."""
    from pvae.utils import torch_threads

    with torch_threads(1):  # 2-D points through a small MLP: intra-op threads only add overhead
        return _diffusion_demo_report(ctx)


def _diffusion_demo_report(ctx: DemoContext) -> str:
    from pvae import plots, plots_diffusion
    from pvae.data import BatchLoader, two_moons
    from pvae.inference import train
    from pvae.models.diffusion import DDPM
    from pvae.two_sample import mmd2, mmd2_null
    from pvae.utils import resolve_device, seed_everything

    device = resolve_device(ctx.device)
    generator = seed_everything(ctx.seed)
    timesteps, epochs, points = (100, 20, 500) if ctx.quick else (100, 100, 1000)
    objectives = ("simple",) if ctx.quick else ("elbo", "meanfield", "simple")
    data = two_moons(4000, noise=0.1, generator=generator).to(device)
    test = two_moons(1000, noise=0.1, generator=generator).to(device)
    reference = two_moons(points, noise=0.1, generator=generator).to(device)
    bandwidth = 0.25
    null = mmd2_null(lambda n: two_moons(n, noise=0.1, generator=generator), points, bandwidth)
    loader = BatchLoader(data, batch_size=256, seed=ctx.seed)
    steps = epochs * len(loader)
    lines = [
        "## Diffusion as a hierarchical latent chain: DDPM on two moons",
        "",
        f"`DDPM(data_shape=(2,), timesteps={timesteps}, ema_decay=0.99)` (linear schedule): the model is",
        "the reverse chain p_θ(x_{t−1} | x_t), the guide the forward noising process. Each objective of",
        f"`DDPM.svi_program` trained it on 4,000 two-moons points ({steps:,} steps of 256, Adam 2e-3, by",
        "`pvae.inference.train`): `elbo` (Trace_ELBO on the time-subsampled pair: one timestep per step,",
        "scaled by T), `meanfield` (the same pair with each step's KL in closed form), `simple` (DDPM's",
        "L_simple, a reweighting that is *not* an ELBO). Test ELBO: all T terms in closed form",
        f"(`DDPM.elbo`), mean over 1,000 test points. MMD²: Gaussian kernel of width {bandwidth},",
        f"{points} samples against {points} fresh data points; between two data sets it is",
        f"{null.mean():.5f} on average (95th percentile {null.quantile(0.95):.5f}, {len(null)} pairs).",
        "",
        "| objective | train s | test ELBO (nats/point) | MMD² samples vs data |",
        "| --- | ---: | ---: | ---: |",
    ]
    last = None
    for objective in objectives:
        family = DDPM(
            data_shape=(2,),
            timesteps=timesteps,
            ema_decay=0.99,
            name=f"demo_ddpm_{objective}",
        ).to(device)
        started = time.perf_counter()
        history = train(
            family, loader, epochs=epochs, objective=objective, lr=2e-3, seed=ctx.seed, progress=False
        )
        seconds = time.perf_counter() - started
        elbo, terms = family.elbo(test, return_terms=True)
        samples = family.sample(points, progress=False)
        distance = mmd2(samples, reference, bandwidth)
        stderr = elbo.std().item() / len(elbo) ** 0.5
        lines.append(f"| {objective} | {seconds:.1f} | {elbo.mean():.3f} ± {stderr:.3f} | {distance:.5f} |")
        plots_diffusion.plot_samples_2d(
            samples.cpu(), test.cpu(), os.path.join(ctx.out, f"ddpm_samples_{objective}.png"), title=objective
        )
        last = (objective, family, terms, history)
    objective, family, terms, history = last
    chain = family.sample(points, return_chain=True, chain_length=6, progress=False)
    plots_diffusion.plot_chain_2d(
        chain.states.cpu(), chain.times, os.path.join(ctx.out, "ddpm_chain.png"), data=test.cpu()
    )
    plots_diffusion.plot_elbo_terms(terms, os.path.join(ctx.out, "ddpm_elbo_terms.png"))
    plots.plot_loss_curve(
        plots_diffusion.moving_average(history.step_losses, 100),
        os.path.join(ctx.out, "ddpm_loss.png"),
        xlabel="step",
        ylabel=f"{objective} loss per point (mean of 100 steps)",
    )
    lines += ["", "Samples (blue) over test data (grey):", ""]
    lines += [f"![{name}](ddpm_samples_{name}.png)" for name in objectives]
    lines += [
        "",
        f"The reverse chain x_T → x_0 of the `{objective}` model, its loss per point (running mean of 100",
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


# ---- entry point ---------------------------------------------------------------------------------------
DEMO_SECTIONS += [_demo_toy, _demo_mixture, _demo_autoencoders, _demo_diffusion]
_REGISTRARS = [_register_demo, _register_toy, _register_train, _register_evaluate, _register_sample]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pvae", description=__doc__.splitlines()[0])
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for register in _REGISTRARS:
        register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.run(args) or 0)
    except (ValueError, FileNotFoundError, FloatingPointError) as error:
        print(f"pvae {args.command}: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
