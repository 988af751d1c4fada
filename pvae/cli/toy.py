"""``pvae toy``: a guide fitted by SVI against the exponential–Gaussian toy's exact posterior."""

from __future__ import annotations

import os

from pvae.cli.common import (
    add_common,
    add_engine_arguments,
    bounded_float,
    device_from_args,
    non_negative_int,
    positive_int,
    print_json,
)
from pvae.models.toy import GUIDES, PARAMETER_RANGE

# ---- toy: the exponential–Gaussian model with an exact posterior ---------------------------------------
# --rate and --scale: the range the toy accepts (where its exact posterior and evidence are accurate)
_toy_parameter = bounded_float(*PARAMETER_RANGE, low_open=False)


def register_toy(subparsers) -> None:
    parser = subparsers.add_parser(
        "toy",
        help="exact posterior vs a fitted guide for z ~ Exponential(rate), x | z ~ Normal(z, scale)",
        description="Fit a guide by SVI and compare it per x with the exact posterior and evidence.",
    )
    low, high = PARAMETER_RANGE
    parser.add_argument(
        "--rate",
        type=_toy_parameter,
        default=1.0,
        help=f"λ of the exponential prior, in [{low:g}, {high:g}] (default 1)",
    )
    parser.add_argument(
        "--scale",
        type=_toy_parameter,
        default=1.0,
        help=f"σ of the Gaussian likelihood, in [{low:g}, {high:g}] (default 1)",
    )
    parser.add_argument(
        "--x",
        type=bounded_float(-1e4, 1e4, low_open=False),
        nargs="+",
        default=[float(v) for v in range(-3, 6)],
        help="observations in [−1e4, 1e4] (default −3 … 5)",
    )
    parser.add_argument(
        "--guide", choices=GUIDES, default="amortized", help="guide to fit (default amortized)"
    )
    parser.add_argument(
        "--num-steps",
        type=non_negative_int,
        default=None,
        help="SVI steps (default 1000; 2000 for amortized)",
    )
    parser.add_argument(
        "--num-samples", type=positive_int, default=1000, help="guide draws for the comparison"
    )
    parser.add_argument("--out", default=os.path.join("runs", "toy"), help="folder for the overlay plot")
    add_engine_arguments(parser, compile_mode=False)
    add_common(parser)
    parser.set_defaults(run=_run_toy)


def _run_toy(args) -> int:
    from pvae.utils import torch_threads

    with torch_threads(1):  # a toy of scalars: intra-op threads only add overhead
        return _toy(args)


def _toy(args) -> int:
    import torch

    from pvae.inference import compare
    from pvae.models.toy import ExponentialGaussian
    from pvae.utils import seed_everything

    device = device_from_args(args)
    seed_everything(args.seed)
    family = ExponentialGaussian(rate=args.rate, scale=args.scale).to(device)
    x = torch.tensor(args.x, dtype=torch.float64, device=device)
    guide, _ = family.fit_guide(
        args.guide, x, args.num_steps, args.seed, progress=not args.json, engine=args.engine
    )
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
        print_json(rows)
        return 0
    print(f"z ~ Exponential({args.rate:g}), x | z ~ Normal(z, {args.scale:g}); guide: {args.guide}")
    print(result.table())
    mean_kl = sum(row["kl"] for row in rows) / len(rows)
    print(f"mean KL(q‖p) over x: {mean_kl:.3g} nats ({result.kl_method}); overlay plot: {plot}")
    return 0
