"""``pvae train``, ``pvae evaluate``, ``pvae sample`` for every trainable family, and the autoencoder demo."""

from __future__ import annotations

import os
import sys

from pvae.cli import diffusion
from pvae.cli.common import (
    DemoContext,
    UsageError,
    add_common,
    add_run_options,
    bounded_float,
    bounded_int,
    check_out_file,
    checked_data_settings,
    open_checkpoint,
    positive_float,
    positive_int,
    print_json,
    run_summary,
    saved_setting,
    start_run,
    train_and_record,
)

# ---- autoencoders: train, evaluate, sample ---------------------------------------------------------------
AUTOENCODERS = ("ae", "dae", "vae")
ENGINE_CHOICES = ("eager", "trace", "compile")


def register_train(subparsers) -> None:
    from pvae.data import IMAGE_DATASETS

    parser = subparsers.add_parser(
        "train",
        help="train an AE, DAE, VAE or DDPM; writes DIR/checkpoint.pt and pictures",
        description="Train an AE, DAE, VAE or DDPM by SVI with Adam: per-epoch test ELBO, checkpoints.",
    )
    parser.add_argument(
        "family", choices=AUTOENCODERS + ("ddpm",), help="ae, dae (denoising), vae or ddpm (diffusion)"
    )
    parser.add_argument(
        "--dataset",
        choices=IMAGE_DATASETS + diffusion.DIFFUSION_ONLY_DATASETS,
        default="mnist5k",
        help="default mnist5k; two-moons (2-D points) for ddpm",
    )
    parser.add_argument("--data-root", default=None, help="folder for mnist/fashion-mnist files")
    parser.add_argument("--num-train", type=positive_int, default=None, help="use a class-mixed subset")
    parser.add_argument("--num-test", type=positive_int, default=None, help="test images to use")
    parser.add_argument("--epochs", type=positive_int, default=10, help="default 10")
    parser.add_argument("--batch-size", type=positive_int, default=128, help="default 128")
    parser.add_argument("--lr", type=positive_float, default=1e-3, help="Adam learning rate (default 1e-3)")
    parser.add_argument(
        "--lr-end",
        type=positive_float,
        default=None,
        help="decay the learning rate geometrically per step from --lr to this at the last step (default: "
        "constant)",
    )
    parser.add_argument("--z-dim", type=positive_int, default=20, help="latent/code dimension (default 20)")
    parser.add_argument(
        "--hidden-dim", type=positive_int, default=None, help="hidden width (default 400; ddpm MLP: 128)"
    )
    parser.add_argument(
        "--likelihood",
        choices=("bernoulli", "gaussian"),
        default="bernoulli",
        help="VAE likelihood: bernoulli on binarized digits (default) or gaussian on grey levels",
    )
    parser.add_argument(
        "--scale", type=positive_float, default=None, help="Gaussian likelihood std (default: the family's)"
    )
    parser.add_argument("--corruption", choices=("mask", "gaussian"), default="mask", help="DAE corruption")
    parser.add_argument(
        "--noise",
        type=bounded_float(0.0, 1e300, low_open=False),
        default=0.25,
        help="DAE masking probability (in [0, 1)) or noise std (default 0.25)",
    )
    parser.add_argument(
        "--objective",
        choices=("elbo", "meanfield", "iwae", "simple"),
        default="elbo",
        help="default elbo (Trace_ELBO); meanfield: closed-form KLs; ddpm: simple = L_simple (not an ELBO)",
    )
    parser.add_argument(
        "--num-particles", type=bounded_int(1, 10_000), default=1, help="k of IWAE-k (default 1)"
    )
    parser.add_argument(
        "--engine",
        choices=ENGINE_CHOICES,
        default="eager",
        help="eager (default), trace (replay a recorded graph of the step) or compile (torch.compile it)",
    )
    parser.add_argument("--jit", action="store_true", help="Pyro's JitTrace_ELBO (TorchScript)")
    add_run_options(parser)
    diffusion.add_train_options(parser)
    add_common(parser)
    parser.set_defaults(run=_run_train)


def _image_split(
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


def _binarization(family_kind: str, likelihood: str) -> str | None:
    return "dynamic" if family_kind == "vae" and likelihood == "bernoulli" else None


def _test_loader(x, labels, binarize: str | None, device, batch_size: int = 100):
    """The test digits, binarized once (seed 0) under a Bernoulli likelihood so every evaluation agrees."""
    from pvae.data import BatchLoader

    static = "static" if binarize is not None else None
    return BatchLoader(x.to(device), labels, batch_size=batch_size, shuffle=False, binarize=static, seed=0)


def _build_autoencoder(kind: str, args):
    """The AE, DAE or VAE the flags ask for, built by :func:`pvae.family.build_family` (checked, sized)."""
    from pvae.family import build_family, family_class

    kwargs = {"x_dim": 784, "z_dim": args.z_dim, "hidden_dim": args.hidden_dim or 400}
    if args.scale is not None:
        kwargs["scale"] = args.scale
    if kind == "vae":
        kwargs["likelihood"] = args.likelihood
    if kind == "dae":
        kwargs |= {"corruption": args.corruption, "noise": args.noise}
    try:
        return build_family(family_class(kind), kwargs)
    except ValueError as error:
        raise UsageError(str(error)) from None


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
    from pvae.data import BatchLoader

    if args.family == "ddpm":
        return diffusion.run_train(args)
    if args.dataset in diffusion.DIFFUSION_ONLY_DATASETS or args.objective == "simple":
        raise UsageError(f"--dataset {args.dataset} and --objective simple are for ddpm only")
    if args.family != "vae" and args.objective != "elbo":
        raise UsageError(
            f"--objective {args.objective} needs a guide with a density; {args.family} has a point-mass "
            "guide (use the default elbo)"
        )
    device, out = start_run(args, os.path.join("runs", args.family))
    family = _build_autoencoder(args.family, args).to(device)
    train_x, _ = _image_split(args.dataset, "train", args.data_root, args.num_train, args.seed)
    test_x, test_labels = _image_split(args.dataset, "test", args.data_root, args.num_test, args.seed)
    binarize = _binarization(args.family, args.likelihood)
    train_loader = BatchLoader(
        train_x.to(device), batch_size=args.batch_size, binarize=binarize, seed=args.seed
    )
    test_loader = _test_loader(test_x, test_labels, binarize, device)
    history, checkpoint = train_and_record(
        family,
        args,
        train_loader,
        test_loader,
        out,
        {
            "num_train": int(train_x.shape[0]),
            "num_test": int(test_x.shape[0]),
            "binarize": binarize,
            "family_kind": args.family,
        },
        jit=args.jit,
        num_particles=args.num_particles,
        engine=args.engine,
    )
    pictures = _autoencoder_pictures(family, test_loader.data, test_labels, history, out)
    summary = run_summary(
        history,
        checkpoint,
        pictures,
        family=args.family,
        train_elbo=history.train_elbo[-1],
        test_elbo=history.test_elbo[-1] if history.test_elbo else None,
    )
    if args.json:
        print_json(summary)
        return 0
    label = "ELBO" if history.objective != "iwae" else f"IWAE-{args.num_particles} bound"
    print(
        f"{args.family} on {args.dataset} ({train_x.shape[0]} train / {test_x.shape[0]} test images), "
        f"{history.epochs} epochs: train {label} {summary['train_elbo']:.2f}, test {label} "
        f"{summary['test_elbo']:.2f} nats per image; median epoch {summary['median_epoch_seconds']:.2f} s"
    )
    print(f"checkpoint: {checkpoint}; pictures: {', '.join(pictures.values())}")
    return 0


def register_evaluate(subparsers) -> None:
    parser = subparsers.add_parser(
        "evaluate",
        help="test log-likelihood (nats per image ± standard error) of a trained checkpoint",
        description="Estimate log p(x) on the test split by importance sampling with the guide (IWAE-k). "
        "Autoencoders (AE/DAE) have no marginal likelihood: their reconstruction error is reported.",
    )
    parser.add_argument("checkpoint", help="a checkpoint.pt written by pvae train")
    parser.add_argument(
        "--num-samples", type=positive_int, default=1000, help="k (default 1000; not used for ddpm)"
    )
    parser.add_argument(
        "--num-test", type=positive_int, default=None, help="test images (default: as trained)"
    )
    parser.add_argument(
        "--data-root",
        default=None,
        help="folder holding mnist/fashion-mnist files (needed for checkpoints trained on those; never "
        "taken from the checkpoint)",
    )
    parser.add_argument(
        "--download",
        action="store_true",
        help="let torchvision download mnist/fashion-mnist into --data-root",
    )
    add_common(parser)
    parser.set_defaults(run=_run_evaluate)


# Families each command handles; any other registered family in a checkpoint is refused by name.
_EVALUATES = AUTOENCODERS + ("ddpm",)


def _run_evaluate(args) -> int:
    import math

    from pvae.data import IMAGE_DATASETS
    from pvae.inference import evaluate_log_likelihood
    from pvae.utils import seed_everything

    checkpoint, family = open_checkpoint(args, _EVALUATES, "evaluate")
    if diffusion.is_diffusion(family):
        return diffusion.evaluate(args, family, checkpoint)
    dataset, num_test, _ = checked_data_settings(args, checkpoint, IMAGE_DATASETS)
    binarize = saved_setting(checkpoint, "binarize", (None, "static", "dynamic"))
    test_x, test_labels = _image_split(dataset, "test", args.data_root, num_test, 0, download=args.download)
    loader = _test_loader(test_x, test_labels, binarize, family.device)
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
            print_json(payload)
        else:
            print(
                f"{type(family).__name__}: no marginal likelihood (flat prior, point-mass guide). "
                f"Reconstruction error {payload['reconstruction_error']:.5f} ± {payload['stderr'] or 0:.5f} "
                f"(mean squared error per pixel, {n} {dataset} test images)"
            )
        return 0
    result = evaluate_log_likelihood(family, loader, num_samples=args.num_samples, progress=not args.json)
    if args.json:
        print_json(result.to_dict())
    else:
        print(f"{dataset} test set: {result}")
    return 0


def register_sample(subparsers) -> None:
    parser = subparsers.add_parser(
        "sample", help="draw images from a trained VAE's prior and save them as a grid"
    )
    parser.add_argument("checkpoint", help="a checkpoint.pt written by pvae train")
    parser.add_argument(
        "-n", "--num", type=bounded_int(1, 100_000), default=64, help="number of images (default 64)"
    )
    parser.add_argument("--out", required=True, help="destination FILE.png")
    parser.add_argument("--overwrite", action="store_true", help="replace --out (and --chain) if they exist")
    parser.add_argument("--nrow", type=bounded_int(1, 1000), default=8, help="images per row (default 8)")
    diffusion.add_sample_options(parser)
    add_common(parser, json_output=False)
    parser.set_defaults(run=_run_sample)


def _run_sample(args) -> int:
    import torch

    from pvae import plots

    check_out_file(args.out, overwrite=args.overwrite)
    if getattr(args, "chain", None):
        check_out_file(args.chain, "--chain", overwrite=args.overwrite)
    flat = "it has no proper prior to sample from (an autoencoder's prior is flat)"
    checkpoint, family = open_checkpoint(args, ("vae", "ddpm"), "sample", {"ae": flat, "dae": flat})
    if diffusion.is_diffusion(family):
        return diffusion.sample(args, family, checkpoint)
    device = family.device
    generator = torch.Generator(device=device).manual_seed(args.seed)
    images = family.sample(args.num, generator=generator)
    path = plots.save_image_grid(images.cpu(), args.out, nrow=args.nrow)
    print(f"wrote {args.num} samples to {path}", file=sys.stderr)
    return 0


def demo_autoencoders(ctx: DemoContext) -> str:
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
