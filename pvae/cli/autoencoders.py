"""The autoencoders' command-line face: ``pvae train ae|dae|vae``, their evaluation and the VAE's samples."""

from __future__ import annotations

import math

from pvae.cli.commands import FamilyCommands, RunData, register_commands
from pvae.cli.common import (
    add_engine_arguments,
    add_image_data_arguments,
    bounded_float,
    bounded_int,
    checked_data_settings,
    engine_options,
    positive_float,
    positive_int,
    saved_setting,
)

IMAGE_SIDE = 784  # 28 × 28 digits, flattened


def _add_arguments(kind: str):
    def add(parser) -> None:
        from pvae.data import IMAGE_DATASETS

        add_image_data_arguments(parser, IMAGE_DATASETS)
        parser.add_argument(
            "--z-dim", type=positive_int, default=20, help="latent/code dimension (default 20)"
        )
        parser.add_argument("--hidden-dim", type=positive_int, default=400, help="hidden width (default 400)")
        parser.add_argument(
            "--scale",
            type=positive_float,
            default=None,
            help="Gaussian likelihood std (default: the family's)",
        )
        if kind == "vae":
            from pvae.models.vae import ARCHITECTURES, VAEConfig

            parser.add_argument(
                "--architecture",
                choices=ARCHITECTURES,
                default=VAEConfig.architecture,
                help=f"encoder and decoder networks (default {VAEConfig.architecture}); conv: strided "
                "convolutions on the 28×28 digits, --hidden-dim sizing its fully connected layer",
            )
            parser.add_argument(
                "--likelihood",
                choices=("bernoulli", "gaussian"),
                default="bernoulli",
                help="bernoulli on binarized digits (default) or gaussian on grey levels",
            )
            parser.add_argument(
                "--num-particles", type=bounded_int(1, 10_000), default=1, help="k of IWAE-k (default 1)"
            )
        if kind == "dae":
            parser.add_argument("--corruption", choices=("mask", "gaussian"), default="mask")
            parser.add_argument(
                "--noise",
                type=bounded_float(0.0, 1e300, low_open=False),
                default=0.25,
                help="masking probability (in [0, 1)) or noise std (default 0.25)",
            )
        add_engine_arguments(parser)
        parser.add_argument("--jit", action="store_true", help="Pyro's JitTrace_ELBO (TorchScript)")

    return add


def _binarize(args) -> str | None:
    return "dynamic" if getattr(args, "likelihood", None) == "bernoulli" else None


def image_data(args, device) -> RunData:
    """The digits of ``--dataset``/``--num-train``/``--num-test``: a training loader (binarized per batch
    under a Bernoulli likelihood), the test loader (binarized once), what the checkpoint records."""
    from pvae.data import BatchLoader
    from pvae.report.autoencoders import image_split, image_test_loader

    train_x, _ = image_split(args.dataset, "train", args.data_root, args.num_train, args.seed)
    test_x, test_labels = image_split(args.dataset, "test", args.data_root, args.num_test, args.seed)
    binarize = _binarize(args)
    train_loader = BatchLoader(
        train_x.to(device), batch_size=args.batch_size, binarize=binarize, seed=args.seed
    )
    test_loader = image_test_loader(test_x, test_labels, binarize, device)
    metadata = {
        "dataset": args.dataset,
        "num_train": int(train_x.shape[0]),
        "num_test": int(test_x.shape[0]),
        "binarize": binarize,
    }
    return RunData(
        train_loader,
        test_loader,
        metadata,
        test_data=(test_loader.data, test_labels),
        extra={"train_x": train_loader.data},
    )


def _config(kind: str):
    def config(args, data: RunData) -> dict:
        kwargs = {"x_dim": IMAGE_SIDE, "z_dim": args.z_dim, "hidden_dim": args.hidden_dim}
        if args.scale is not None:
            kwargs["scale"] = args.scale
        if kind == "vae":
            kwargs |= {"likelihood": args.likelihood, "architecture": args.architecture}
        if kind == "dae":
            kwargs |= {"corruption": args.corruption, "noise": args.noise}
        return kwargs

    return config


def _train_options(args) -> dict:
    return {"jit": args.jit, "num_particles": getattr(args, "num_particles", 1)} | engine_options(args)


def _pictures(family, data: RunData, history, out: str, args) -> dict[str, str]:
    from pvae.report.autoencoders import autoencoder_pictures

    test_x, labels = data.test_data
    return autoencoder_pictures(family, test_x, labels, history, out)


def _summary(family, data: RunData, history, args) -> dict:
    return {
        "train_elbo": history.train_elbo[-1],
        "test_elbo": history.test_elbo[-1] if history.test_elbo else None,
    }


def _describe(family, data: RunData, history, summary: dict, args) -> str:
    label = "ELBO" if history.objective != "iwae" else f"IWAE-{args.num_particles} bound"
    metadata = data.metadata
    return (
        f"{args.family} on {args.dataset} ({metadata['num_train']} train / {metadata['num_test']} test "
        f"images), {history.epochs} epochs: train {label} {summary['train_elbo']:.2f}, test {label} "
        f"{summary['test_elbo']:.2f} nats per image; median epoch {summary['median_epoch_seconds']:.2f} s"
    )


def read_test_digits(args, checkpoint: dict, device, binarizations=(None, "static", "dynamic")):
    """The test digits ``pvae evaluate`` scores for a checkpoint trained on digits: the recorded data set's
    test split (``args.num_test`` of them, else as many as the run had), a seed-0 class-mixed subset,
    binarized once (seed 0) when the run binarized (``train_config.binarize``, checked to be one of
    ``binarizations``).

    :returns: ``(dataset, grey, loader)``: the data set's name, the (N, 784) grey levels, and a loader of the
        digits as scored, in order (``loader.data``: (N, 784) on ``device``).
    """
    from pvae.data import IMAGE_DATASETS
    from pvae.report.autoencoders import image_split, image_test_loader

    dataset, num_test, _ = checked_data_settings(args, checkpoint, IMAGE_DATASETS)
    binarize = saved_setting(checkpoint, "binarize", binarizations)
    grey, labels = image_split(dataset, "test", args.data_root, num_test, 0, download=args.download)
    return dataset, grey, image_test_loader(grey, labels, binarize, device)


def _test_data(args, family, checkpoint: dict):
    """The (N, 784) test digits :func:`_evaluate` scores, on the family's device."""
    return read_test_digits(args, checkpoint, family.device)[2].data


def _evaluate(args, family, checkpoint: dict) -> tuple[dict, str]:
    """IWAE-k test log-likelihood for the VAE; the reconstruction error for AE/DAE (no marginal)."""
    import torch

    from pvae.inference import evaluate_log_likelihood
    from pvae.report.autoencoders import is_autoencoder
    from pvae.utils import seed_everything

    dataset, _, loader = read_test_digits(args, checkpoint, family.device)
    seed_everything(args.seed)
    if not is_autoencoder(family):
        result = evaluate_log_likelihood(family, loader, num_samples=args.num_samples, progress=not args.json)
        return result.to_dict(), f"{dataset} test set: {result}"
    errors = torch.cat([family.reconstruction_error(x).cpu() for x, _ in loader]).double()
    n = errors.numel()
    payload = {
        "log_likelihood": None,
        "reconstruction_error": float(errors.mean()),
        "stderr": float(errors.std() / math.sqrt(n)) if n > 1 else None,
        "num_images": n,
        "num_samples": None,
        "metric": "mean squared error per pixel",
        "note": f"{type(family).__name__} has a flat prior and a point-mass guide: no marginal likelihood",
    }
    text = (
        f"{type(family).__name__}: no marginal likelihood (flat prior, point-mass guide). Reconstruction "
        f"error {payload['reconstruction_error']:.5f} ± {payload['stderr'] or 0:.5f} (mean squared error "
        f"per pixel, {n} {dataset} test images)"
    )
    return payload, text


def _sample(args, family, checkpoint: dict) -> str:
    import torch

    from pvae import plots

    generator = torch.Generator(device=family.device).manual_seed(args.seed)
    images = family.sample(args.num, generator=generator)
    return plots.save_image_grid(images.cpu(), args.out, nrow=args.nrow)


def _commands(kind: str, help: str, objectives: tuple[str, ...]) -> FamilyCommands:
    flat = "it has no proper prior to sample from (an autoencoder's prior is flat)"
    return FamilyCommands(
        help=help,
        add_arguments=_add_arguments(kind),
        data=image_data,
        config=_config(kind),
        objectives=objectives,
        train_options=_train_options,
        pictures=_pictures,
        summary=_summary,
        describe=_describe,
        evaluate=_evaluate,
        sample=_sample if kind == "vae" else None,
        cannot_sample=flat,
        test_data=_test_data,
    )


POINT_MASS = ("elbo",)  # AE/DAE: a point-mass guide has no density, so only the plain ELBO applies
register_commands(
    "ae", _commands("ae", "autoencoder: flat prior, point-mass guide, Gaussian likelihood", POINT_MASS)
)
register_commands(
    "dae", _commands("dae", "denoising autoencoder: the guide encodes a corrupted x", POINT_MASS)
)
register_commands(
    "vae",
    _commands(
        "vae", "variational autoencoder (Trace_ELBO, closed-form KL or IWAE-k)", ("elbo", "meanfield", "iwae")
    ),
)
