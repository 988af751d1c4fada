"""Per-datum importance weights for any model/guide pair, with particles vectorized in an outer plate.

This is the engine behind :func:`pvae.inference.compare` and :func:`pvae.inference.log_evidence`. It never
looks at what the model *is*: it traces the guide (or, for ``proposal="prior"``, the model alone), replays
the model against it, and splits every site's log-density into a per-datum part (sites inside the plate
named ``"data"``) and a global part (everything else), for each particle.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass

import pyro
import pyro.distributions as dist
import pyro.poutine as poutine
import torch
from pyro.infer.util import is_validation_enabled
from pyro.poutine.util import prune_subsample_sites
from pyro.util import check_model_guide_match

__all__ = [
    "DATA_PLATE",
    "LogWeights",
    "checked_plate_nesting",
    "guess_max_plate_nesting",
    "log_weights",
    "point_mass_sites",
]

DATA_PLATE = "data"
_PARTICLE_PLATE = "_pvae_particles"


@dataclass
class LogWeights:
    """Log importance weights, split per datum.

    ``per_datum[s, n]`` is log p − log q of every site inside the ``"data"`` plate at datum n for particle s;
    ``global_[s]`` collects sites outside it (global latents); the joint log weight of particle s is
    ``per_datum[s].sum() + global_[s]``. ``guide_trace`` is the (vectorized) trace of the proposal.
    """

    per_datum: torch.Tensor  # (num_particles, N)
    global_: torch.Tensor  # (num_particles,)
    guide_trace: poutine.Trace | None
    model_trace: poutine.Trace
    data_dim: int | None  # the "data" plate's dim (negative), None when the model has no such plate
    particle_dim: int


def guess_max_plate_nesting(model, guide, args, kwargs) -> int:
    """Deepest plate nesting seen in one (unvectorized) run of guide and model, as Pyro's ELBOs do."""
    with poutine.block():
        guide_trace = poutine.trace(guide).get_trace(*args, **kwargs) if guide is not None else None
        replayed = poutine.replay(model, trace=guide_trace) if guide_trace is not None else model
        model_trace = poutine.trace(replayed).get_trace(*args, **kwargs)
    sites = list(model_trace.nodes.values())
    if guide_trace is not None:
        sites += list(guide_trace.nodes.values())
    depth = 0
    for site in sites:
        if site["type"] == "sample":
            depth = max(depth, *(-frame.dim for frame in site["cond_indep_stack"] if frame.vectorized), 0)
    return depth


def _data_label(model) -> str:
    """How error messages name the data: ``args[0]``, with the model's own name for it when it has one."""
    try:
        parameters = inspect.signature(model).parameters.values()
    except (TypeError, ValueError):
        return "args[0] (the data)"
    positional = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    names = [parameter.name for parameter in parameters if parameter.kind in positional]
    return f"args[0] (the data, the model's argument {names[0]!r})" if names else "args[0] (the data)"


_ACCEPTED = (
    "a tensor of shape (N, ...) with the N ≥ 1 data points of the 'data' plate along its first dimension"
)


def checked_plate_nesting(model, guide, args, kwargs) -> int:
    """:func:`guess_max_plate_nesting`, after checking the data, the first positional argument.

    An empty data tensor (N = 0) raises ``ValueError`` at once: a batch needs at least one datum. A 0-d
    data tensor is left to the pair, since a model without a ``"data"`` plate may observe one scalar (the
    whole pair is then one datum); if the pair cannot run on it, the ``ValueError`` says what is accepted.
    """
    data = args[0] if args and isinstance(args[0], torch.Tensor) else None
    if data is not None and data.dim() > 0 and data.shape[0] == 0:
        raise ValueError(
            f"{_data_label(model)} is empty, shape {tuple(data.shape)}: a batch needs at least one datum; "
            f"pass {_ACCEPTED}"
        )
    try:
        return guess_max_plate_nesting(model, guide, args, kwargs)
    except Exception as error:
        if data is None or data.dim() > 0:
            raise
        raise ValueError(
            f"{_data_label(model)} is a 0-d tensor, which the model/guide pair could not run on "
            f"({type(error).__name__}: {error}); pass {_ACCEPTED}, e.g. x[None] for one datum"
        ) from error


def _unwrap(fn):
    while True:
        if isinstance(fn, dist.Independent | dist.ExpandedDistribution | dist.MaskedDistribution):
            fn = fn.base_dist
        else:
            return fn


def point_mass_sites(guide_trace: poutine.Trace) -> list[str]:
    """Names of latent guide sites drawn from a point mass (``Delta``): they have no density to weigh."""
    return [
        name
        for name, site in guide_trace.nodes.items()
        if site["type"] == "sample"
        and not site["is_observed"]
        and isinstance(_unwrap(site["fn"]), dist.Delta)
    ]


def _vectorize(fn, num_particles: int, dim: int):
    def vectorized(*args, **kwargs):
        with pyro.plate(_PARTICLE_PLATE, num_particles, dim=dim):
            return fn(*args, **kwargs)

    return vectorized


def _split(site, data_name: str, particle_dim: int, num_particles: int):
    """Reduce a site's log_prob to ((S, N) per-datum or None, (S,) global or None) and the data dim."""
    log_prob = site["log_prob"]
    frames = {frame.name: frame for frame in site["cond_indep_stack"]}
    depth = -particle_dim
    log_prob = (
        log_prob.reshape((1,) * (depth - log_prob.dim()) + log_prob.shape)
        if log_prob.dim() < depth
        else log_prob
    )
    log_prob = log_prob.expand((num_particles,) + log_prob.shape[1:])
    if data_name in frames and frames[data_name].vectorized:
        data_dim = frames[data_name].dim
        keep = {0, depth + data_dim}  # particle axis and data axis, counted from the left
        drop = [axis for axis in range(log_prob.dim()) if axis not in keep]
        per_datum = log_prob.sum(dim=drop) if drop else log_prob
        return per_datum.reshape(num_particles, -1), None, data_dim
    return None, log_prob.reshape(num_particles, -1).sum(-1), None


def log_weights(
    model,
    guide,
    args: tuple,
    kwargs: dict,
    num_particles: int,
    proposal: str = "guide",
    max_plate_nesting: int | None = None,
) -> LogWeights:
    """Vectorized log importance weights of ``num_particles`` draws from the guide (or the prior).

    :param proposal: ``"guide"``: log w = log p(x, z) − log q(z | x) with z ~ q; ``"prior"``: z ~ p(z) from
        the model itself and log w = log p(x | z), the naive Monte-Carlo evidence estimator.
    """
    if proposal not in ("guide", "prior"):
        raise ValueError(f"proposal must be 'guide' or 'prior', got {proposal!r}")
    if max_plate_nesting is None:
        max_plate_nesting = guess_max_plate_nesting(
            model, guide if proposal == "guide" else None, args, kwargs
        )
    particle_dim = -(max_plate_nesting + 1)
    vectorized_model = _vectorize(model, num_particles, particle_dim)
    guide_trace = None
    if proposal == "guide":
        guide_trace = poutine.trace(_vectorize(guide, num_particles, particle_dim)).get_trace(*args, **kwargs)
        guide_trace = prune_subsample_sites(guide_trace)
        vectorized_model = poutine.replay(vectorized_model, trace=guide_trace)
    model_trace = prune_subsample_sites(poutine.trace(vectorized_model).get_trace(*args, **kwargs))
    if guide_trace is not None and is_validation_enabled():
        check_model_guide_match(model_trace, guide_trace, max_plate_nesting + 1)
    model_trace.compute_log_prob()
    if guide_trace is not None:
        guide_trace.compute_log_prob()

    some_value = next(site["log_prob"] for site in model_trace.nodes.values() if site["type"] == "sample")
    global_ = torch.zeros(num_particles, dtype=some_value.dtype, device=some_value.device)
    per_datum = None
    data_dim = None

    def accumulate(trace, sign, latent_only):
        nonlocal per_datum, global_, data_dim
        for site in trace.nodes.values():
            if site["type"] != "sample":
                continue
            if proposal == "prior" and not site["is_observed"]:
                continue  # z ~ p(z): prior terms cancel against the proposal
            if latent_only and site["is_observed"]:
                continue
            datum_part, global_part, dim = _split(site, DATA_PLATE, particle_dim, num_particles)
            if datum_part is not None:
                data_dim = dim
                per_datum = sign * datum_part if per_datum is None else per_datum + sign * datum_part
            else:
                global_ = global_ + sign * global_part

    accumulate(model_trace, 1.0, latent_only=False)
    if guide_trace is not None:
        accumulate(guide_trace, -1.0, latent_only=True)
    if per_datum is None:  # no "data" plate: the whole pair is one datum
        per_datum, global_ = global_.unsqueeze(-1), torch.zeros_like(global_)
    return LogWeights(per_datum, global_, guide_trace, model_trace, data_dim, particle_dim)
