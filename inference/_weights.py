"""Per-datum log importance weights for any model/guide pair, with particles vectorized in an outer plate.

This is the one place where pvae forms importance weights; :func:`pvae.inference.log_weights`,
:func:`pvae.inference.log_evidence`, :func:`pvae.inference.compare` and the IWAE objective
(:class:`pvae.inference.IWAE_ELBO`) all call :func:`importance_weights`. It never looks at what the model
*is*: it traces the guide (or, for ``proposal="prior"``, the model alone) under a particle plate, replays
the model against it, and reduces every site's log-density (:func:`reduce_per_datum`) to a per-datum part
(sites inside the plate named :data:`DATA_PLATE`) and a global part (everything else), for each particle.
"""

from __future__ import annotations

import inspect
import math
import numbers
from dataclasses import dataclass

import pyro
import pyro.distributions as dist
import pyro.poutine as poutine
import torch
from pyro.infer.util import is_validation_enabled
from pyro.poutine.util import prune_subsample_sites
from pyro.util import check_model_guide_match

from pvae.checks import check_choice

__all__ = [
    "DATA_PLATE",
    "PARTICLE_PLATE",
    "PROPOSALS",
    "LogWeights",
    "checked_plate_nesting",
    "data_frame",
    "guess_max_plate_nesting",
    "importance_weights",
    "log_mean_weight",
    "point_mass_sites",
    "reduce_per_datum",
]

#: The plate whose entries are independent data: per-datum quantities are reported over it.
DATA_PLATE = "data"
#: The outer plate that vectorizes importance-sampling particles.
PARTICLE_PLATE = "_pvae_particles"
#: ``"guide"``: z ~ q(z | x), log w = log p(x, z) − log q(z | x); ``"prior"``: z ~ p(z), log w = log p(x | z).
PROPOSALS = ("guide", "prior")


@dataclass
class LogWeights:
    """Log importance weights of k particles, split per datum.

    ``local[s, n]`` is log p − log q of the sites inside the ``"data"`` plate at datum n for particle s;
    ``global_[s]`` collects the sites outside it (global latents). Densities are unscaled (masks applied):
    ``scale`` is the sites' common scale, e.g. N/B when the data plate is subsampled, for the caller to
    apply to totals. A pair without a ``"data"`` plate is one datum (N = 1).
    """

    local: torch.Tensor  # (k, N)
    global_: torch.Tensor  # (k,)
    scale: float | torch.Tensor
    has_global: bool  # some site lies outside the "data" plate (and the pair has one)
    guide_trace: poutine.Trace | None
    model_trace: poutine.Trace
    particle_dim: int

    @property
    def per_datum(self) -> torch.Tensor:
        """(k, N) log weights, global terms spread evenly over the data: each row sums to :attr:`joint`."""
        if not self.has_global:
            return self.local
        return self.local + self.global_.unsqueeze(-1) / self.local.shape[-1]

    @property
    def joint(self) -> torch.Tensor:
        """(k,) log weight of the whole batch, log p(x_{1:N}, z) − log q(z | x_{1:N})."""
        return self.local.sum(-1) + self.global_


def log_mean_weight(log_w: torch.Tensor) -> torch.Tensor:
    """log (1/k) Σ_i w_i over the first (particle) axis of k log weights: the importance-sampled estimate
    of log p(x), which is the IWAE-k bound in expectation; shape ``log_w.shape[1:]``."""
    return torch.logsumexp(log_w, dim=0) - math.log(log_w.shape[0])


def _cuda_devices(args) -> list:
    return [arg.device for arg in args if isinstance(arg, torch.Tensor) and arg.device.type == "cuda"][:1]


def guess_max_plate_nesting(model, guide, args, kwargs) -> int:
    """Deepest plate nesting seen in one (unvectorized) run of guide and model, as Pyro's ELBOs find it.

    The run draws from torch's generator inside a forked state, so the caller's random stream is left as it
    was (the same draws follow whether the nesting was guessed or given).
    """
    with torch.random.fork_rng(devices=_cuda_devices(args)), poutine.block():
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
    while isinstance(fn, dist.Independent | dist.ExpandedDistribution | dist.MaskedDistribution):
        fn = fn.base_dist
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


def data_frame(site):
    """The site's vectorized ``"data"`` plate frame, or ``None`` when it lies outside that plate."""
    return next(
        (frame for frame in site["cond_indep_stack"] if frame.name == DATA_PLATE and frame.vectorized), None
    )


def reduce_per_datum(
    log_prob: torch.Tensor, site, particle_dim: int, num_particles: int
) -> tuple[torch.Tensor, bool]:
    """A site's log-density summed over everything but the particle plate and the ``"data"`` plate.

    :param log_prob: the log-density, with the site's batch shape (a leading particle axis at
        ``particle_dim`` or broadcast to it).
    :param site: the trace site (its plates say where the ``"data"`` axis is).
    :param particle_dim: the particle plate's dim (negative).
    :param num_particles: k.
    :returns: ``(terms, in_data)``: (k, N) per-datum terms when the site lies in the ``"data"`` plate
        (``in_data=True``), else (k, 1), the site's total per particle.
    """
    depth = -particle_dim
    if log_prob.dim() < depth:
        log_prob = log_prob.reshape((1,) * (depth - log_prob.dim()) + log_prob.shape)
    log_prob = log_prob.expand((num_particles,) + log_prob.shape[1:])  # (k, ...) batch dims, rank `depth`
    frame = data_frame(site)
    if frame is None:
        return log_prob.reshape(num_particles, -1).sum(-1, keepdim=True), False
    axis = depth + frame.dim  # counted from the left
    drop = [d for d in range(1, depth) if d != axis]
    return (log_prob.sum(drop) if drop else log_prob).reshape(num_particles, -1), True


def _masked(log_prob: torch.Tensor, mask) -> torch.Tensor:
    """Pyro's masking of a log-density (``scale_and_mask`` without the scale)."""
    if mask is None or mask is True:
        return log_prob
    if mask is False:
        return torch.zeros_like(log_prob)
    return torch.where(mask, log_prob, log_prob.new_zeros(()))


def _scale_of(site) -> float | torch.Tensor:
    scale = site["scale"]
    return float(scale) if isinstance(scale, numbers.Number) else scale


def _same_scale(a, b) -> bool:
    if isinstance(a, float) and isinstance(b, float):
        return a == b
    if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor):
        return a is b or (a.shape == b.shape and bool(torch.equal(a, b)))
    return False


def _vectorize(fn, num_particles: int, dim: int):
    def vectorized(*args, **kwargs):
        with pyro.plate(PARTICLE_PLATE, num_particles, dim=dim):
            return fn(*args, **kwargs)

    return vectorized


def importance_weights(
    model,
    guide,
    args: tuple,
    kwargs: dict,
    num_particles: int,
    proposal: str = "guide",
    max_plate_nesting: int | None = None,
) -> LogWeights:
    """Log importance weights of ``num_particles`` vectorized draws from the guide (or the prior).

    Differentiable: with a reparameterized guide, gradients flow through the draws (IWAE's estimator).

    :param proposal: ``"guide"``: log w = log p(x, z) − log q(z | x) with z ~ q; ``"prior"``: z ~ p(z) from
        the model itself and log w = log p(x | z), the naive Monte-Carlo evidence estimator.
    :param max_plate_nesting: depth of the deepest plate of model and guide (guessed when ``None``).
    :raises ValueError: when the scored sites do not share one scale (``poutine.scale`` inside the
        program): log-weights of sites scaled differently are no importance weights.
    """
    check_choice("proposal", proposal, PROPOSALS)
    if max_plate_nesting is None:
        max_plate_nesting = guess_max_plate_nesting(
            model, guide if proposal == "guide" else None, args, kwargs
        )
    particle_dim = -(max_plate_nesting + 1)
    vectorized_model = _vectorize(model, num_particles, particle_dim)
    guide_trace = None
    if proposal == "guide":
        guide_trace = poutine.trace(_vectorize(guide, num_particles, particle_dim)).get_trace(*args, **kwargs)
        vectorized_model = poutine.replay(vectorized_model, trace=guide_trace)
    model_trace = poutine.trace(vectorized_model).get_trace(*args, **kwargs)
    if guide_trace is not None and is_validation_enabled():
        check_model_guide_match(model_trace, guide_trace, max_plate_nesting + 1)
    model_trace = prune_subsample_sites(model_trace)

    def scored(trace, sign):
        for site in trace.nodes.values():
            if site["type"] != "sample":
                continue
            if sign < 0 and site["is_observed"]:
                continue  # the guide scores its latent draws only
            if proposal == "prior" and not site["is_observed"]:
                continue  # z ~ p(z): prior terms cancel against the proposal
            yield site, sign

    sites = list(scored(model_trace, 1.0))
    if guide_trace is not None:
        guide_trace = prune_subsample_sites(guide_trace)
        sites += list(scored(guide_trace, -1.0))
    if not sites:
        raise ValueError("the model has no sample site to weigh: importance weights need at least one")
    names = {site["name"] for site, _ in sites}
    model_trace.compute_log_prob(lambda name, site: name in names)
    if guide_trace is not None:
        guide_trace.compute_log_prob(lambda name, site: name in names)

    local, global_, scale = None, None, None
    for site, sign in sites:
        site_scale = _scale_of(site)
        if scale is None:
            scale = site_scale
        elif not _same_scale(scale, site_scale):
            raise ValueError(
                "importance weights need one common scale for all sample sites (the data plate's "
                f"subsampling scale); found {scale} and {site_scale} (poutine.scale inside the program?)"
            )
        terms, in_data = reduce_per_datum(
            _masked(site["unscaled_log_prob"], site["mask"]), site, particle_dim, num_particles
        )
        if in_data:
            local = sign * terms if local is None else local + sign * terms
        else:
            global_ = sign * terms[:, 0] if global_ is None else global_ + sign * terms[:, 0]
    has_global = local is not None and global_ is not None
    if local is None:  # no "data" plate: the whole pair is one datum
        local, global_ = global_.unsqueeze(-1), torch.zeros_like(global_)
    elif global_ is None:
        global_ = local.new_zeros(num_particles)
    return LogWeights(
        local, global_, 1.0 if scale is None else scale, has_global, guide_trace, model_trace, particle_dim
    )
