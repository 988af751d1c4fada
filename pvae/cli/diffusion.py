"""The diffusion family's command-line face: ``pvae train ddpm``, its exact-ELBO evaluation and sampling."""

from __future__ import annotations

import math
import time

from pvae.cli.commands import FamilyCommands, RunData, register_commands
from pvae.cli.common import (
    UsageError,
    add_engine_arguments,
    add_image_data_arguments,
    bounded_float,
    bounded_int,
    checked_data_settings,
    engine_options,
    optional_count,
    optional_seed,
    positive_int,
    saved_setting,
)
from pvae.models.diffusion import (
    MAX_TIMESTEPS,
    OBJECTIVES,
    REVERSE_VARIANCES,
    SCHEDULES,
    TIME_SAMPLING,
    DDPMConfig,
)
from pvae.report.diffusion import DIFFUSION_ONLY_DATASETS, diffusion_data
from pvae.utils import bits_per_dim


def add_chain_arguments(parser, defaults) -> None:
    """The diffusion chain's ``--timesteps``, ``--schedule`` and ``--time-sampling``, with the defaults of
    ``defaults`` (a config with those fields: the DDPM's, or the latent diffusion model's prior)."""
    parser.add_argument(
        "--timesteps",
        type=bounded_int(1, MAX_TIMESTEPS),
        default=defaults.timesteps,
        help=f"T, diffusion steps (default {defaults.timesteps})",
    )
    parser.add_argument(
        "--schedule", choices=SCHEDULES, default=defaults.schedule, help=f"default {defaults.schedule}"
    )
    parser.add_argument(
        "--time-sampling",
        choices=TIME_SAMPLING,
        default=defaults.time_sampling,
        help="how the training pair draws timesteps — plate: one per batch (the time plate); per_datum: "
        "one per datum; stratified: one per datum, spread over T strata per batch; importance: one per "
        f"datum with p_t ∝ √E[L_t²] (Improved DDPM) (default {defaults.time_sampling})",
    )


def _add_arguments(parser) -> None:
    from pvae.data import IMAGE_DATASETS

    add_image_data_arguments(parser, IMAGE_DATASETS + DIFFUSION_ONLY_DATASETS)
    defaults = DDPMConfig()
    parser.add_argument(
        "--hidden-dim",
        type=positive_int,
        default=defaults.hidden_dim,
        help=f"width of the MLP denoiser for 2-D data (default {defaults.hidden_dim})",
    )
    add_chain_arguments(parser, defaults)
    parser.add_argument(
        "--reverse-variance",
        choices=REVERSE_VARIANCES,
        default=defaults.reverse_variance,
        help="σ_t² of the reverse steps t ≥ 2: β_t, β̃_t, or learned by the network between the two "
        f"(train it with --objective elbo, meanfield or hybrid) (default {defaults.reverse_variance})",
    )
    parser.add_argument(
        "--learn-variance",
        action="store_const",
        const="learned",
        dest="reverse_variance",
        help="the same as --reverse-variance learned",
    )
    parser.add_argument(
        "--ema-decay",
        type=bounded_float(0.0, 1.0, low_open=False, high_open=True),
        default=None,
        help="EMA of the weights for sampling/evaluation, 0 = off (default: on for images, off for 2-D)",
    )
    parser.add_argument(
        "--channels",
        type=positive_int,
        nargs="+",
        default=list(defaults.channels),
        help=f"U-Net widths per level (default {' '.join(map(str, defaults.channels))})",
    )
    add_engine_arguments(parser)
    parser.add_argument(
        "--picture-samples",
        type=positive_int,
        default=None,
        help="samples drawn for the pictures (default 16 images, 1000 points)",
    )


def _add_sample_arguments(group) -> None:
    group.add_argument(
        "--steps", type=bounded_int(1, MAX_TIMESTEPS), default=None, help="DDIM with this many steps"
    )
    group.add_argument(
        "--eta",
        type=bounded_float(0.0, 1e6, low_open=False),
        default=None,
        help="DDIM noise scale η ≥ 0 (default 0 with --steps)",
    )
    group.add_argument("--clip", action="store_true", help="clip the implied x̂_0 to [−1, 1] (images)")
    group.add_argument("--chain", default=None, help="also write the chain x_T → x_0 to this FILE.png")


def _data(args, device) -> RunData:
    from pvae.data import BatchLoader

    train_x = diffusion_data(args.dataset, "train", args.data_root, args.num_train, args.seed)
    test_x = diffusion_data(args.dataset, "test", args.data_root, args.num_test, args.seed)
    train_loader = BatchLoader(train_x.to(device), batch_size=args.batch_size, seed=args.seed)
    test_loader = BatchLoader(test_x.to(device), batch_size=250, shuffle=False)
    metadata = {"dataset": args.dataset, "num_train": int(train_x.shape[0]), "num_test": int(test_x.shape[0])}
    return RunData(train_loader, test_loader, metadata, test_data=test_x.to(device))


def _config(args, data: RunData) -> dict:
    settings = {
        "data_shape": tuple(data.test_data.shape[1:]),
        "timesteps": args.timesteps,
        "schedule": args.schedule,
        "reverse_variance": args.reverse_variance,
        "hidden_dim": args.hidden_dim,
        "channels": tuple(args.channels),
        "time_sampling": args.time_sampling,
    }
    if args.ema_decay is not None:
        settings["ema_decay"] = args.ema_decay
    return settings


def _pictures(family, data: RunData, history, out: str, args) -> dict[str, str]:
    from pvae.report.diffusion import ddpm_pictures

    return ddpm_pictures(family, data.test_data, history, out, args.picture_samples, args.seed)


def _summary(family, data: RunData, history, args) -> dict:
    return {
        "dataset": args.dataset,
        "timesteps": args.timesteps,
        "train_objective_per_datum": history.train_elbo[-1],
        "test_objective_per_datum": history.test_elbo[-1] if history.test_elbo else None,
    }


def _describe(family, data: RunData, history, summary: dict, args) -> str:
    per = "one t per batch" if args.time_sampling == "plate" else f"t {args.time_sampling}"
    not_elbo = {"simple": "−L_simple", "hybrid": "−(L_simple + λ·L_vlb)"}
    label = not_elbo.get(history.objective, f"ELBO ({history.objective}, {per})")
    metadata = data.metadata
    return (
        f"ddpm on {args.dataset} ({metadata['num_train']} train / {metadata['num_test']} test), T = "
        f"{args.timesteps}, {history.epochs} epochs: train {label} "
        f"{summary['train_objective_per_datum']:.3f}, test {summary['test_objective_per_datum']:.3f} per "
        "datum; median epoch "
        f"{summary['median_epoch_seconds']:.2f} s\nexact test ELBO (all T terms) / bits per dim: pvae "
        f"evaluate {summary['checkpoint']}"
    )


def _threads(args) -> int | None:
    return 1 if args.dataset in DIFFUSION_ONLY_DATASETS else None  # 2-D points: one thread is faster


def _read_test_data(args, family, checkpoint: dict):
    """The test data ``pvae evaluate`` scores for a DDPM: the recorded data set's test split
    (``args.num_test`` of them, else as many as the run had) in model space; for two moons, the run's own
    test points regenerated from its seed. A data set whose shape is not the DDPM's is a
    :class:`UsageError`.

    :returns: ``(dataset, test_x)``: the data set's name and the (N, ...) data, on the CPU.
    """
    from pvae.data import IMAGE_DATASETS

    datasets = IMAGE_DATASETS + DIFFUSION_ONLY_DATASETS
    dataset, num_test, seed = checked_data_settings(args, checkpoint, datasets)
    test_x = diffusion_data(
        dataset, "test", args.data_root, num_test, seed if dataset == "two-moons" else 0, args.download
    )
    if tuple(test_x.shape[1:]) != tuple(family.data_shape):
        raise UsageError(
            f"{args.checkpoint} holds a DDPM of data shape {tuple(family.data_shape)}, but its data set "
            f"{dataset} has shape {tuple(test_x.shape[1:])}"
        )
    return dataset, test_x


def _test_data(args, family, checkpoint: dict):
    """The (N, ...) test data :func:`_evaluate` scores, on the family's device."""
    return _read_test_data(args, family, checkpoint)[1].to(family.device)


def _evaluate(args, family, checkpoint: dict) -> tuple[dict, str]:
    """Per-datum ELBO with all T terms (closed-form KLs) on the test split, and bits per dimension."""
    import torch

    from pvae.utils import seed_everything

    dataset, test_x = _read_test_data(args, family, checkpoint)
    seed_everything(args.seed)
    started = time.perf_counter()
    elbo = torch.cat(
        [family.elbo(batch.to(family.device), progress=not args.json).cpu() for batch in test_x.split(64)]
    ).double()
    seconds = time.perf_counter() - started
    bits = bits_per_dim(elbo, math.prod(family.data_shape))
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
    stderr = payload["bits_per_dim_stderr"] or 0.0
    text = (
        f"ddpm (T = {family.timesteps}) on {n} {dataset} test points: ELBO {payload['elbo']:.3f} ± "
        f"{payload['elbo_stderr'] or 0:.3f} nats, {payload['bits_per_dim']:.4f} ± {stderr:.4f} bits/dim "
        f"({seconds:.0f} s)"
    )
    return payload, text


def _sample(args, family, checkpoint: dict) -> str:
    import torch

    from pvae import plots, plots_diffusion
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
        data = None  # the run's test points, for reference, when it trained on two moons
        if checkpoint["train_config"].get("dataset") == "two-moons":
            num_test = saved_setting(checkpoint, "num_test", optional_count)
            seed = saved_setting(checkpoint, "seed", optional_seed) or 0
            data = diffusion_data("two-moons", "test", None, num_test, seed)
        path = plots_diffusion.plot_samples_2d(chain.samples.cpu(), data, args.out)
        if args.chain:
            plots_diffusion.plot_chain_2d(chain.states.cpu(), chain.times, args.chain, data=data)
    return path


register_commands(
    "ddpm",
    FamilyCommands(
        help="denoising diffusion model: the reverse chain as model, the forward process as guide",
        add_arguments=_add_arguments,
        data=_data,
        config=_config,
        objectives=OBJECTIVES,
        train_options=engine_options,
        pictures=_pictures,
        summary=_summary,
        describe=_describe,
        evaluate=_evaluate,
        sample=_sample,
        add_sample_arguments=_add_sample_arguments,
        threads=_threads,
        test_data=_test_data,
    ),
)
