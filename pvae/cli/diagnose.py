"""``pvae diagnose CHECKPOINT``: did the guide work? Three checks of a trained family's guide
(:mod:`pvae.inference.diagnostics`).

- ``--khat``: the PSIS k̂ of the importance weights log p(x, z) − log q(z | x), z ~ q, per test datum
  (Yao et al. 2018): below 0.5 good, 0.5–0.7 usable, above 0.7 unreliable.
- ``--gaps``: log p(x) − ELBO(q_φ) split into the approximation gap (the guide's family) and the
  amortization gap (one encoder for all data) of Cremer, Li & Duvenaud (2018), with q* the guide's family
  fitted to each test datum.
- ``--sbc``: simulation-based calibration (Talts et al. 2018) on data drawn from the model itself.

Without any of the three, ``--khat --gaps`` run. The test data are the checkpoint's, read by the same
code as ``pvae evaluate`` reads them: the ``test_data`` reader of the family's
:class:`~pvae.cli.commands.FamilyCommands` (a user's family gives its own there). SBC needs no test data,
only a proper prior. ``--threads N`` runs everything on N intra-op threads (default: torch's choice).

Each diagnostic starts from ``--seed`` (``pvae.utils.seed_everything``), so its result does not depend on
which others run. k̂ and the gaps go through the test data in chunks of :data:`CHUNK` data: each datum's
k̂ and gaps depend on that datum alone, and the chunks give the progress bar its steps.
"""

from __future__ import annotations

import contextlib
import math
import os

from pvae.cli.common import (
    UsageError,
    add_common,
    bounded_int,
    open_checkpoint,
    optional_count,
    prepare_out_folder,
    print_json,
    saved_setting,
)

__all__ = ["CHUNK", "DEFAULT_NUM_TEST", "GAP_PARTICLES", "MAX_THREADS", "register_diagnose"]

#: Test data used unless ``--num-test`` says otherwise (fewer if the run had fewer).
DEFAULT_NUM_TEST = 200
#: Test data handled at once by k̂ and the gaps (a step of the progress bar).
CHUNK = 50
#: Particles per step of the per-datum fit of q* (the gaps).
GAP_PARTICLES = 4
#: Entries of the sample sites of one batch of particles × data that the importance weights may hold.
_ELEMENT_BUDGET = 2**24
#: Most intra-op threads ``--threads`` may ask for.
MAX_THREADS = 1024


# ---- the command line ----------------------------------------------------------------------------------
def register_diagnose(subparsers) -> None:
    from pvae.inference.diagnostics import KHAT_MIN_SAMPLES

    parser = subparsers.add_parser(
        "diagnose",
        help="did the guide work? Pareto k̂, inference gaps and SBC of a trained checkpoint",
        description="Diagnose a checkpoint's guide q(z | x). --khat: the PSIS k̂ of the importance weights "
        "per test datum (< 0.5 good, 0.5–0.7 usable, > 0.7 unreliable). --gaps: log p(x) − ELBO split into "
        "the approximation gap and the amortization gap (q* = the guide's family fitted to each test datum). "
        "--sbc: simulation-based calibration on data drawn from the model (needs a proper prior). Without "
        "any of the three: --khat --gaps. SBC is the costliest: it simulates --num-simulations data sets and "
        "draws --num-posterior-samples guide draws for each, through the whole model.",
    )
    parser.add_argument("checkpoint", help="a checkpoint.pt written by pvae train")
    which = parser.add_argument_group("diagnostics (default: --khat --gaps)")
    which.add_argument("--khat", action="store_true", help="Pareto k̂ of the importance weights per datum")
    which.add_argument(
        "--gaps", action="store_true", help="approximation and amortization gaps (Cremer et al. 2018)"
    )
    which.add_argument(
        "--sbc", action="store_true", help="simulation-based calibration (Talts et al. 2018); costly"
    )
    sizes = parser.add_argument_group("sizes")
    sizes.add_argument(
        "--num-test",
        type=bounded_int(1, 100_000),
        default=None,
        help=f"test data for k̂ and the gaps (default {DEFAULT_NUM_TEST}, or all if the run had fewer)",
    )
    sizes.add_argument(
        "--num-samples",
        type=bounded_int(KHAT_MIN_SAMPLES, 1_000_000),
        default=1000,
        help="guide draws per datum for k̂ and for each ELBO of the gaps (default 1000)",
    )
    sizes.add_argument(
        "--num-steps",
        type=bounded_int(1, 100_000),
        default=200,
        help=f"steps of the per-datum fit of q* for the gaps ({GAP_PARTICLES} particles each; default 200)",
    )
    sizes.add_argument(
        "--num-simulations",
        type=bounded_int(1, 100_000),
        default=200,
        help="SBC: data sets simulated from the model, one datum each (default 200)",
    )
    sizes.add_argument(
        "--num-posterior-samples",
        type=bounded_int(1, 100_000),
        default=99,
        help="SBC: guide draws per simulation, M; ranks lie in 0..M (default 99)",
    )
    parser.add_argument(
        "--out",
        default=None,
        help="folder for the SBC plot DIR/sbc.png, replaced if there (default: the checkpoint's folder)",
    )
    parser.add_argument(
        "--data-root",
        default=None,
        help="folder holding mnist/fashion-mnist files (for checkpoints trained on those)",
    )
    parser.add_argument(
        "--download",
        action="store_true",
        help="let torchvision download mnist/fashion-mnist into --data-root",
    )
    parser.add_argument(
        "--threads",
        type=bounded_int(1, MAX_THREADS),
        default=None,
        help="torch intra-op threads for the run (default: torch's choice)",
    )
    add_common(parser)
    parser.set_defaults(run=_run_diagnose)


def _run_diagnose(args) -> int:
    from pvae.utils import torch_threads

    with torch_threads(args.threads) if args.threads else contextlib.nullcontext():
        return _diagnose(args)


def _diagnose(args) -> int:
    from pvae.family import registered_families
    from pvae.utils import seed_everything

    if not (args.khat or args.gaps or args.sbc):
        args.khat = args.gaps = True
    out = None
    if args.sbc:
        out = prepare_out_folder(args.out or os.path.dirname(os.path.abspath(args.checkpoint)))
    checkpoint, family = open_checkpoint(args, tuple(registered_families()), "diagnose")
    name = checkpoint["family"]["name"]
    where = f"{args.checkpoint} holds a {name!r}"
    if args.sbc:
        _check_prior_predictive(family, where)
    x = batch = None
    if args.khat or args.gaps:
        x = _test_data(args, checkpoint, family, where)
        _check_guide(family, x, args.gaps, where)
        batch = _particles_per_batch(family, x, args.num_samples)  # before seeding: it draws from the guide

    payload = {"checkpoint": args.checkpoint, "family": name, "seed": args.seed}
    text = [f"{name} checkpoint {args.checkpoint}, seed {args.seed}"]
    if x is not None:
        payload["num_test"] = int(x.shape[0])
        text[0] += f": {x.shape[0]} test data"
    progress = not args.json
    results = {}  # computed gaps first (a guide they cannot refit fails fast), shown k̂, gaps, SBC
    if args.gaps:
        seed_everything(args.seed)
        results["gaps"] = _gaps(family, x, args.num_samples, args.num_steps, batch, progress, where)
    if args.khat:
        seed_everything(args.seed)
        results["khat"] = _khat(family, x, args.num_samples, batch, progress)
    if args.sbc:
        seed_everything(args.seed)
        results["sbc"] = _sbc(family, args, out, progress)
    if args.khat:
        payload["khat"] = _khat_summary(results["khat"], args.num_samples)
        text += ["", _khat_text(payload["khat"])]
    if args.gaps:
        gaps = results["gaps"]
        payload["gaps"] = gaps.to_dict()
        text += ["", "Inference gaps (Cremer, Li & Duvenaud 2018), nats per datum:", gaps.table()]
        if not gaps.log_marginal_exact:
            text.append(
                "(the IWAE estimate is a lower bound on log p(x), the further below it the larger k̂: so are "
                "the approximation and inference gaps)"
            )
    if args.sbc:
        payload["sbc"], sbc_text = results["sbc"]
        text += ["", sbc_text]
    if args.json:
        print_json(payload)
    else:
        print("\n".join(text))
    return 0


# ---- what a checkpoint can be diagnosed with -------------------------------------------------------------
def _first_sentence(error: BaseException) -> str:
    text = " ".join(str(error).split()) or type(error).__name__
    return text.split(". ")[0].rstrip(".")


def _check_prior_predictive(family, where: str) -> None:
    """SBC simulates from ``model(None, num_data=N)``: refuse a family that cannot draw, saying why."""
    import pyro.poutine as poutine
    import torch

    try:
        with torch.no_grad(), poutine.block():
            poutine.trace(family.model).get_trace(None, num_data=1)
    except Exception as error:
        raise UsageError(
            f"{where}: --sbc simulates data from the model's prior predictive, and model(None, num_data=1) "
            f"cannot draw ({_first_sentence(error)})"
        ) from None


def _test_data(args, checkpoint: dict, family, where: str):
    """The checkpoint's test data, read by its family's ``FamilyCommands.test_data`` (``pvae evaluate``'s)."""
    from pvae.cli.commands import registered_commands

    spec = registered_commands().get(checkpoint["family"]["name"])
    if spec is None or spec.test_data is None:
        raise UsageError(
            f"{where}: pvae diagnose knows no test data for it (k̂ and the gaps need them; --sbc does not): "
            "give its FamilyCommands a test_data reader (pvae.cli.commands)"
        )
    if args.num_test is None:  # the readers take args.num_test, as pvae evaluate's do
        recorded = saved_setting(checkpoint, "num_test", optional_count)
        args.num_test = min(DEFAULT_NUM_TEST, recorded or DEFAULT_NUM_TEST)
    return spec.test_data(args, family, checkpoint)


def _check_guide(family, x, gaps: bool, where: str) -> None:
    """k̂ and the gaps weigh guide draws by the guide's density; the gaps also need something amortized."""
    import pyro.poutine as poutine
    import torch

    from pvae.inference._weights import point_mass_sites

    with torch.no_grad(), poutine.block():
        trace = poutine.trace(family.guide).get_trace(x[:2])
    delta = point_mass_sites(trace)
    if delta:
        raise UsageError(
            f"{where}: its guide draws {', '.join(map(repr, delta))} from a point mass (Delta), which has no "
            "density, so there are no importance weights (k̂) and no ELBO gaps to measure"
        )
    if gaps:
        with torch.no_grad(), poutine.block(), poutine.trace(param_only=True) as params:
            family.guide(x[:2])
        if not params.trace.nodes:
            raise UsageError(
                f"{where}: --gaps measures what a learned guide loses, and its guide has no parameters "
                "(a fixed q(z | x)): there is no amortization gap; --khat and --sbc apply"
            )


def _particles_per_batch(family, x, num_samples: int) -> int:
    """Particles drawn at once: at most 100, fewer when a chunk's sample sites would pass the budget."""
    import pyro.poutine as poutine
    import torch

    with torch.no_grad(), poutine.block():
        guide = poutine.trace(family.guide).get_trace(x[:1])
        model = poutine.trace(poutine.replay(family.model, trace=guide)).get_trace(x[:1])
    per_datum = sum(site["value"].numel() for site in model.nodes.values() if site["type"] == "sample")
    return max(1, min(num_samples, 100, _ELEMENT_BUDGET // (per_datum * min(CHUNK, x.shape[0]))))


def _chunks(x, progress: bool, description: str):
    from pvae.utils import progress_bar

    parts = x.split(CHUNK)
    return progress_bar(parts, progress=progress, total=len(parts), desc=description, unit="chunk")


# ---- the three diagnostics -----------------------------------------------------------------------------
def _khat(family, x, num_samples: int, batch: int, progress: bool):
    """k̂ per datum, (N,), drawing ``batch`` particles at once."""
    import torch

    from pvae.inference import pareto_khat

    values = [
        pareto_khat(family.model, family.guide, part, num_samples=num_samples, particles_per_batch=batch)
        for part in _chunks(x, progress, f"k̂ ({CHUNK} data a step)")
    ]
    return torch.cat(values).double().cpu()


def _finite_or_none(value: float) -> float | None:
    return value if math.isfinite(value) else None


def _khat_summary(khat, num_samples: int) -> dict:
    """Mean (of the finite values), median, max and the share of the data in each band."""
    from pvae.inference import KHAT_GOOD, KHAT_UNRELIABLE, khat_threshold

    count = khat.numel()
    finite = khat[khat.isfinite()]
    nan = khat.isnan()
    threshold = khat_threshold(num_samples)

    def share(mask) -> float:
        return mask.sum().item() / count

    return {
        "num_samples": num_samples,
        "sample_size_threshold": threshold,
        "mean": finite.mean().item() if finite.numel() else None,
        "median": _finite_or_none(khat[~nan].median().item()) if (~nan).any() else None,
        "max": _finite_or_none(khat[~nan].max().item()) if (~nan).any() else None,
        "fraction_good": share(khat < KHAT_GOOD),
        "fraction_usable": share((khat >= KHAT_GOOD) & (khat <= KHAT_UNRELIABLE)),
        "fraction_unreliable": share(khat > KHAT_UNRELIABLE),
        "fraction_above_sample_size_threshold": share(khat > threshold),
        "num_without_tail": int((khat == -math.inf).sum()),
        "num_nan": int(nan.sum()),
        "per_datum": [_finite_or_none(value) for value in khat.tolist()],
        "note": "per_datum: null where k̂ is −∞ (weights without a tail, the best case: counted in "
        "num_without_tail), +∞ or NaN (num_nan); mean over the finite values",
    }


def _khat_text(summary: dict) -> str:
    from pvae.inference import KHAT_GOOD, KHAT_UNRELIABLE

    def shown(value):
        return "—" if value is None else f"{value:.3f}"

    count = len(summary["per_datum"])
    draws = summary["num_samples"]
    bands = [
        (f"k̂ < {KHAT_GOOD} (good)", summary["fraction_good"]),
        (f"{KHAT_GOOD} ≤ k̂ ≤ {KHAT_UNRELIABLE} (usable)", summary["fraction_usable"]),
        (f"k̂ > {KHAT_UNRELIABLE} (unreliable)", summary["fraction_unreliable"]),
    ]
    width = max(len(label) for label, _ in bands)
    lines = [
        f"Pareto k̂ of the importance weights (Yao et al. 2018), S = {draws} guide draws per datum, "
        f"{count} data:",
        f"  mean {shown(summary['mean'])}  median {shown(summary['median'])}  max {shown(summary['max'])}",
        *(f"  {label.ljust(width)}  {fraction:6.1%}" for label, fraction in bands),
        f"  k̂ > {summary['sample_size_threshold']:.3f} = min(1 − 1/log₁₀ S, 0.7), the bound for S = {draws} "
        f"draws: {summary['fraction_above_sample_size_threshold']:.1%}",
    ]
    if summary["num_without_tail"]:
        lines.append(f"  {summary['num_without_tail']} data with constant weights (k̂ = −∞, counted as good)")
    if summary["num_nan"]:
        lines.append(f"  {summary['num_nan']} data whose k̂ is NaN or +∞ (a weight is infinite or undefined)")
    return "\n".join(lines)


def _gaps(family, x, num_samples: int, num_steps: int, batch: int, progress: bool, where: str):
    """:func:`pvae.inference.inference_gaps` chunk by chunk (``batch`` particles drawn at once), joined into
    one result over all data (:meth:`~pvae.inference.InferenceGaps.concatenate`). A guide whose sites the
    per-datum fit cannot refit is a :class:`UsageError`."""
    from pvae.inference import InferenceGaps, inference_gaps

    parts = []
    for part in _chunks(x, progress, f"gaps ({CHUNK} data a step)"):
        try:
            result = inference_gaps(
                family.model,
                family.guide,
                part,
                num_samples=num_samples,
                num_steps=num_steps,
                num_particles=GAP_PARTICLES,
                particles_per_batch=batch,
            )
        except ValueError as error:  # before any work: what the guide's sites do not allow
            raise UsageError(f"{where}: --gaps cannot fit q* to each datum: {error}") from None
        parts.append(result)
    return InferenceGaps.concatenate(parts)


def _sbc(family, args, out: str, progress: bool) -> tuple[dict, str]:
    """SBC with ``--num-simulations`` one-datum data sets; the JSON payload and the text."""
    from pvae.inference import sbc
    from pvae.utils import progress_bar

    with progress_bar(total=args.num_simulations, progress=progress, desc="SBC", unit="simulation") as bar:

        def model(x=None, *rest, **kwargs):  # the family's model, counting the simulations
            if x is None:
                bar.update()
            return family.model(x, *rest, **kwargs)

        result = sbc(
            model,
            family.guide,
            num_simulations=args.num_simulations,
            num_posterior_samples=args.num_posterior_samples,
            num_data=1,
            seed=args.seed,
        )
    plotted = result.sites[:9]  # the panels of result.plot
    path = result.plot(os.path.join(out, "sbc.png"))
    inside = {site: result.ecdf_band(site).inside for site in plotted}
    payload = result.to_dict() | {"plot": path, "ecdf_inside_band": inside}
    if len(result.sites) <= 12:
        lines = [result.table()]
    else:  # a deep chain: the worst sites
        worst = sorted(result.sites, key=lambda site: result.p_values[site])[:5]
        below = sum(result.p_values[site] < 0.01 for site in result.sites)
        lines = [
            result.table().splitlines()[0],
            f"  {len(result.sites)} latent sites, {below} with p < 0.01; smallest p-values:",
            *(f"  {site}  p = {result.p_values[site]:.3g}" for site in worst),
        ]
    if any(result.ranks[site][0].numel() > 1 for site in result.sites):
        lines.append(
            "  (a site's coordinates are ranked each and pooled; they are not independent, so read p as a "
            "screen, the plot for the shape)"
        )
    lines += [
        "  ECDF inside its 95% simultaneous band (Säilynoja et al. 2022): "
        + ", ".join(f"{site} {'yes' if ok else 'NO'}" for site, ok in inside.items()),
        f"  plot: {path}",
    ]
    return payload, "\n".join(lines)
