"""The latent diffusion model's command-line face: ``pvae train ldm`` (two recipes), evaluation, samples.

``pvae train ldm --recipe two-stage`` trains the autoencoder (a VAE with a N(0, I) prior) for
``--autoencoder-epochs`` at ``--lr`` into ``OUT/autoencoder/``, scales the latents to unit spread, then
fits the diffusion prior on the frozen encoder's latents for ``--epochs`` at ``--prior-lr`` into ``OUT/``;
``--recipe joint`` continues from the same first stage on the whole ELBO, everything trained. Both stages
are checkpointed; ``--resume`` continues whichever is unfinished. The recipe is
:func:`pvae.models.latent_diffusion.train_latent_diffusion`: its first stage and the switch run here
(``first_stage``), its second stage is the run every family's ``pvae train`` makes.
"""

from __future__ import annotations

import math
import os

from pvae.cli.autoencoders import IMAGE_SIDE, image_data, read_test_digits
from pvae.cli.commands import FamilyCommands, RunData, register_commands
from pvae.cli.common import (
    UsageError,
    add_engine_arguments,
    add_image_data_arguments,
    bounded_int,
    engine_options,
    history_writer,
    positive_float,
    positive_int,
    run_settings,
)
from pvae.cli.diffusion import add_chain_arguments
from pvae.models.latent_diffusion import RECIPES, LatentDiffusionConfig
from pvae.models.vae import ARCHITECTURES

LATENT_SCALE_DIGITS = 4000  # training digits whose encoder means set the latent scale


def _add_arguments(parser) -> None:
    from pvae.data import IMAGE_DATASETS

    defaults = LatentDiffusionConfig()
    add_image_data_arguments(parser, IMAGE_DATASETS)
    parser.add_argument(
        "--recipe",
        choices=tuple(RECIPES),
        default="two-stage",
        help="two-stage: autoencoder, then the prior on its frozen latents (default); joint: the whole ELBO "
        "after the same first stage",
    )
    parser.add_argument(
        "--autoencoder-epochs",
        type=bounded_int(1, 100_000),
        default=10,
        help="epochs of the first stage, the autoencoder with a N(0, I) prior, at --lr (default 10)",
    )
    parser.add_argument(
        "--prior-lr",
        type=positive_float,
        default=None,
        help="Adam learning rate of the second stage (the prior; everything with --recipe joint), decaying "
        "to --lr-end if given (default: --lr)",
    )
    parser.add_argument(
        "--architecture",
        choices=ARCHITECTURES,
        default=defaults.architecture,
        help=f"the autoencoder's networks (default {defaults.architecture})",
    )
    parser.add_argument(
        "--z-dim", type=positive_int, default=defaults.z_dim, help=f"latent dimension ({defaults.z_dim})"
    )
    parser.add_argument(
        "--hidden-dim",
        type=positive_int,
        default=defaults.hidden_dim,
        help=f"the autoencoder's hidden width ({defaults.hidden_dim})",
    )
    add_chain_arguments(parser, defaults)  # the prior chain's T, schedule and time sampling
    parser.add_argument(
        "--prior-hidden-dim",
        type=positive_int,
        default=defaults.prior_hidden_dim,
        help=f"width of the prior's denoiser ({defaults.prior_hidden_dim})",
    )
    add_engine_arguments(parser)


def _data(args, device) -> RunData:
    args.likelihood = "bernoulli"  # binarized digits, as the VAE's default
    return image_data(args, device)


def _config(args, data: RunData) -> dict:
    return {
        "x_dim": IMAGE_SIDE,
        "z_dim": args.z_dim,
        "hidden_dim": args.hidden_dim,
        "architecture": args.architecture,
        "timesteps": args.timesteps,
        "schedule": args.schedule,
        "time_sampling": args.time_sampling,
        "prior_hidden_dim": args.prior_hidden_dim,
        "stage": "autoencoder",
    }


def _first_stage(family, args, data: RunData, out: str) -> None:
    """The recipe up to its second stage (:func:`~pvae.models.latent_diffusion.train_latent_diffusion` with
    ``epochs=0``): the autoencoder trained, resumed or reused in ``out/autoencoder`` (with its own
    ``history.json``), then the recipe's stage with the latents scaled to unit spread. The run that follows
    (every family's ``pvae train`` run, with :func:`_train_options`) trains the second stage."""
    from pvae.models.latent_diffusion import train_latent_diffusion

    train_x = data.extra["train_x"]
    train_latent_diffusion(
        family,
        data.train_loader,
        data.test_loader,
        recipe=args.recipe,
        first_epochs=args.autoencoder_epochs,
        epochs=0,
        lr=args.lr,
        objective=args.objective,
        latent_data=train_x[:LATENT_SCALE_DIGITS].bernoulli(),
        out=out,
        metadata={"batch_size": args.batch_size} | data.metadata,
        callback=history_writer(os.path.join(out, "autoencoder", "history.json")),
        **run_settings(args),
        **engine_options(args),
    )


def _train_options(args) -> dict:
    """The second stage's own learning rate (``--prior-lr``, default ``--lr``) and the step engine."""
    return {"lr": args.lr if args.prior_lr is None else args.prior_lr} | engine_options(args)


def _summary(family, data: RunData, history, args) -> dict:
    return {
        "recipe": args.recipe,
        "latent_scale": float(family.latent_scale),
        "train_elbo": history.train_elbo[-1],
        "test_elbo": history.test_elbo[-1] if history.test_elbo else None,
    }


def _describe(family, data: RunData, history, summary: dict, args) -> str:
    label = "objective" if history.objective == "simple" else "ELBO"
    return (
        f"ldm ({args.recipe}) on {args.dataset}: autoencoder {args.autoencoder_epochs} epochs, then "
        f"{history.epochs} epochs of stage '{family.stage}': train {label} {summary['train_elbo']:.2f}, "
        f"test {label} {summary['test_elbo']:.2f} nats per image (latent scale {summary['latent_scale']:.3g})"
    )


def _pictures(family, data: RunData, history, out: str, args) -> dict[str, str]:
    from pvae import plots

    samples = family.sample(64)
    return {"samples": plots.save_image_grid(samples.cpu(), os.path.join(out, "samples.png"))}


def _read_test_digits(args, family, checkpoint: dict):
    """:func:`pvae.cli.autoencoders.read_test_digits` of a run whose digits were binarized per batch, as
    every latent diffusion run's are."""
    return read_test_digits(args, checkpoint, family.device, ("dynamic",))


def _test_data(args, family, checkpoint: dict):
    """The (N, 784) binarized test digits :func:`_evaluate` scores, on the family's device."""
    return _read_test_digits(args, family, checkpoint)[2].data


def _evaluate(args, family, checkpoint: dict) -> tuple[dict, str]:
    """The ELBO of the whole hierarchy (nats and bits/dim) and the Fréchet distance of samples."""
    import torch

    from pvae.metrics import frechet_distance, label_histogram
    from pvae.utils import bits_per_dim, seed_everything

    dataset, test_x, loader = _read_test_digits(args, family, checkpoint)
    seed_everything(args.seed)
    # a first-stage checkpoint holds a trained autoencoder and an untrained chain: score what was trained
    first_stage = family.stage == "autoencoder"
    scored = family.autoencoder if first_stage else family
    elbo = torch.cat([scored.elbo(x).cpu() for x, _ in loader]).double()
    n = elbo.numel()
    stderr = float(elbo.std() / math.sqrt(n)) if n > 1 else None
    bits = bits_per_dim(elbo, IMAGE_SIDE)
    if args.quality_samples == 1:
        raise UsageError("--quality-samples must be 0 (skip) or at least 2 (a covariance needs two samples)")
    count = args.quality_samples if dataset == "mnist5k" else 0  # the classifier knows mnist5k digits
    samples = scored.sample(count).cpu() if count else None
    distance = frechet_distance(samples, test_x) if count else None
    histogram = label_histogram(samples) if count else None
    payload = {
        "stage": family.stage,
        "prior": "N(0, I) (first stage)" if first_stage else "diffusion chain",
        "elbo": float(elbo.mean()),
        "elbo_stderr": stderr,
        "bits_per_dim": float(bits.mean()),
        "num_images": n,
        "frechet_distance": distance,
        "label_entropy": histogram.entropy if histogram is not None else None,
        "label_counts": histogram.counts.tolist() if histogram is not None else None,
    }
    over = (
        "the autoencoder with its N(0, I) prior (first stage)"
        if first_stage
        else "the whole latent hierarchy"
    )
    text = f"{dataset} test set: ELBO {payload['elbo']:.2f} ± {stderr or 0:.2f} nats per image " + (
        f"({payload['bits_per_dim']:.4f} bits/dim, a bound over {over}, {n} images)"
    )
    if distance is not None:
        text += (
            f"; {count} samples: Fréchet distance {distance:.2f} to the test digits (digit-classifier "
            f"features), label entropy {histogram.entropy:.3f} nats (log 10 = {math.log(10):.3f})"
        )
    return payload, text


def _sample(args, family, checkpoint: dict) -> str:
    import torch

    from pvae import plots

    generator = torch.Generator(device=family.device).manual_seed(args.seed)
    images = family.sample(args.num, generator=generator, steps=args.steps)  # the DDPM's --steps: DDIM
    return plots.save_image_grid(images.cpu(), args.out, nrow=args.nrow)


def _add_evaluate_arguments(group) -> None:
    group.add_argument(
        "--quality-samples",
        type=bounded_int(0, 100_000),
        default=1000,
        help="latent diffusion: samples for the Fréchet distance and label entropy (default 1000; 0 skips; "
        "mnist5k only)",
    )


register_commands(
    "ldm",
    FamilyCommands(
        help="latent diffusion: a VAE whose prior is a diffusion chain over its latent",
        add_arguments=_add_arguments,
        data=_data,
        config=_config,
        objectives=("meanfield", "elbo", "simple"),
        pictures=_pictures,
        summary=_summary,
        describe=_describe,
        evaluate=_evaluate,
        add_evaluate_arguments=_add_evaluate_arguments,
        sample=_sample,
        first_stage=_first_stage,
        train_options=_train_options,
        test_data=_test_data,
    ),
)
