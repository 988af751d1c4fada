"""How far is a guide from the truth? One call for any model/guide pair.

:func:`compare` draws guide particles once and reports, per datum over the ``"data"`` plate and in total:

- the ELBO, E_q[log p(x, z) − log q(z)], with its Monte-Carlo standard error;
- log p(x): exact when a ``log_marginal`` callable is given, else the importance-weighted (IWAE-k) estimate;
- the gap log p(x) − ELBO, which equals KL(q ‖ p(z | x)) when the posterior is exact;
- KL(q ‖ p) estimated directly against an exact ``posterior`` callable, when given.

Nothing here knows a concrete family: the exact quantities come in as callables taking the model's args.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import dataclass, field

import pyro.poutine as poutine
import torch
from torch.distributions import Distribution, kl_divergence

from pvae.inference._weights import _PARTICLE_PLATE, DATA_PLATE, checked_plate_nesting, log_weights

__all__ = ["Comparison", "compare"]


@dataclass
class Comparison:
    """Result of :func:`compare`. Totals are sums over the ``"data"`` plate; ``per_datum`` has (N,) tensors.

    ``kl`` and ``kl_stderr`` are ``None`` without a posterior; ``log_marginal_exact`` says whether
    ``log_marginal`` is the exact value or an IWAE estimate from the same particles. Terms of sites outside
    the ``"data"`` plate (global latents) are spread evenly over the data in ``per_datum``; the IWAE
    estimate is exact in expectation only for pairs without global latents.
    """

    elbo: float
    elbo_stderr: float
    log_marginal: float
    log_marginal_exact: bool
    gap: float
    kl: float | None
    kl_stderr: float | None
    kl_method: str | None  # "analytic" (closed form) or "monte-carlo"
    num_samples: int
    site: str | None
    per_datum: dict[str, torch.Tensor | None] = field(repr=False)
    samples: torch.Tensor | None = field(default=None, repr=False)  # (num_samples, N, ...) guide draws
    # for plots: callables producing the densities that were compared
    _posterior: object = field(default=None, repr=False)
    _guide_fn: object = field(default=None, repr=False)
    data: torch.Tensor | None = field(default=None, repr=False)

    def table(self, labels: list[str] | None = None, digits: int = 4) -> str:
        """A plain-text per-datum table (and totals)."""
        rows = self._rows(labels)
        header = ["datum", "log p(x)", "ELBO", "gap", "KL(q||p)"]
        lines = [header] + [[row["datum"], *(_fmt(row[k], digits) for k in header[1:])] for row in rows]
        total = ["total", _fmt(self.log_marginal, digits), _fmt(self.elbo, digits), _fmt(self.gap, digits)]
        total.append(_fmt(self.kl, digits))
        lines.append(total)
        widths = [max(len(str(line[i])) for line in lines) for i in range(len(header))]
        text = ["  ".join(str(cell).rjust(width) for cell, width in zip(line, widths)) for line in lines]
        text.insert(1, "  ".join("-" * width for width in widths))
        note = "exact" if self.log_marginal_exact else f"IWAE estimate, k={self.num_samples}"
        text.append(
            f"(log p(x): {note}; ELBO ± {self.elbo_stderr:.2g} stderr over {self.num_samples} particles)"
        )
        return "\n".join(text)

    def markdown(self, labels: list[str] | None = None, digits: int = 4) -> str:
        """The per-datum table as Markdown."""
        rows = self._rows(labels)
        out = ["| datum | log p(x) | ELBO | gap | KL(q‖p) |", "| --- | ---: | ---: | ---: | ---: |"]
        for row in rows:
            cells = [row["datum"], *(_fmt(row[k], digits) for k in ("log p(x)", "ELBO", "gap", "KL(q||p)"))]
            out.append("| " + " | ".join(cells) + " |")
        total = ["**total**", *(_fmt(v, digits) for v in (self.log_marginal, self.elbo, self.gap, self.kl))]
        out.append("| " + " | ".join(total) + " |")
        return "\n".join(out)

    def _rows(self, labels):
        n = self.per_datum["elbo"].shape[0]
        labels = labels or _default_labels(self.data, n)
        rows = []
        for i in range(n):
            kl = self.per_datum["kl"]
            rows.append(
                {
                    "datum": labels[i],
                    "log p(x)": self.per_datum["log_marginal"][i].item(),
                    "ELBO": self.per_datum["elbo"][i].item(),
                    "gap": self.per_datum["gap"][i].item(),
                    "KL(q||p)": None if kl is None else kl[i].item(),
                }
            )
        return rows

    def to_dict(self) -> dict:
        """JSON-ready: totals and per-datum lists."""
        out = {
            key: getattr(self, key)
            for key in (
                "elbo",
                "elbo_stderr",
                "log_marginal",
                "log_marginal_exact",
                "gap",
                "kl",
                "kl_stderr",
                "kl_method",
                "num_samples",
                "site",
            )
        }
        out["per_datum"] = {k: None if v is None else v.tolist() for k, v in self.per_datum.items()}
        json.dumps(out)  # fail here rather than in the caller if something is not serializable
        return out

    def plot(self, path: str, max_panels: int = 9, labels: list[str] | None = None) -> str:
        """Overlay, per datum, the exact posterior density, the guide density and a histogram of guide draws.

        Continuous scalar sites get density curves; discrete sites get side-by-side bars of probabilities.
        """
        from pvae.plots import plot_comparison

        return plot_comparison(self, path, max_panels=max_panels, labels=labels)


def _fmt(value, digits):
    if value is None:
        return "—"
    return f"{value:.{digits}f}"


def _default_labels(data, n):
    if isinstance(data, torch.Tensor) and data.shape[0] == n and data[0].numel() == 1:
        return [f"x={value:.3g}" for value in data.reshape(-1).tolist()]
    return [str(i) for i in range(n)]


def _latent_sites(trace) -> list[str]:
    return [
        name for name, site in trace.nodes.items() if site["type"] == "sample" and not site["is_observed"]
    ]


def _site_log_prob_per_datum(site, value, fn, particle_dim, num_samples):
    """log fn(value) reduced to (num_samples, N) over the "data" plate, like the ELBO terms."""
    log_prob = fn.log_prob(value)
    depth = -particle_dim
    if log_prob.dim() < depth:
        log_prob = log_prob.reshape((1,) * (depth - log_prob.dim()) + log_prob.shape)
    log_prob = log_prob.expand((num_samples,) + log_prob.shape[1:])
    frames = {frame.name: frame for frame in site["cond_indep_stack"]}
    if DATA_PLATE in frames:
        keep = {0, depth + frames[DATA_PLATE].dim}
        drop = [axis for axis in range(log_prob.dim()) if axis not in keep]
        return (log_prob.sum(dim=drop) if drop else log_prob).reshape(num_samples, -1)
    return log_prob.reshape(num_samples, -1).sum(-1, keepdim=True)


def compare(
    model,
    guide,
    *args,
    posterior: Callable | None = None,
    log_marginal: Callable | None = None,
    num_samples: int = 1000,
    site: str | None = None,
    **kwargs,
) -> Comparison:
    """Compare ``guide`` with the exact posterior of ``model``, per datum over the ``"data"`` plate.

    :param model: Pyro model; data points in ``pyro.plate("data", N)``, N ≥ 1.
    :param guide: Pyro guide (any pair: nothing here knows a concrete family).
    :param args: the data, passed to model, guide, ``posterior`` and ``log_marginal`` alike; a tensor
        ``args[0]`` holds the N data points along its first dimension (empty data raise ``ValueError``).
    :param posterior: callable ``posterior(*args, **kwargs)`` returning the exact p(z | x) of one latent site
        as a distribution whose batch shape matches that site's plates (e.g. (N,)); a batch shape whose
        size at the ``"data"`` plate's dim is not N raises ``ValueError`` rather than broadcasting.
    :param log_marginal: callable ``log_marginal(*args, **kwargs)`` returning the exact log p(x), (N,);
        any other shape raises ``ValueError``.
    :param num_samples: guide particles, ≥ 2.
    :param site: latent site that ``posterior`` describes; needed only when the guide has several.
    :param kwargs: passed to model, guide and the callables.
    :returns: :class:`Comparison`.
    """
    if isinstance(num_samples, bool) or not isinstance(num_samples, int) or num_samples < 2:
        raise ValueError(
            f"num_samples must be an integer ≥ 2 (a standard error needs two), got {num_samples!r}"
        )
    if posterior is not None and not callable(posterior):
        raise ValueError("posterior must be a callable taking the model's arguments, e.g. family.posterior")
    if log_marginal is not None and not callable(log_marginal):
        raise ValueError(
            "log_marginal must be a callable taking the model's arguments, e.g. family.log_marginal"
        )
    with torch.no_grad():
        nesting = checked_plate_nesting(model, guide, args, kwargs)
        weights = log_weights(model, guide, args, kwargs, num_samples, "guide", max_plate_nesting=nesting)
        log_w = weights.per_datum + weights.global_.unsqueeze(-1) / weights.per_datum.shape[-1]  # (S, N)
        latents = _latent_sites(weights.guide_trace)
        if site is None and posterior is not None:
            if len(latents) != 1:
                raise ValueError(
                    f"site= is needed: the guide has latent sites {latents}; name the one posterior describes"
                )
            site = latents[0]
        elif site is None and len(latents) == 1:
            site = latents[0]
        if site is not None and site not in latents:
            raise ValueError(
                f"site={site!r} is not a latent site of the guide; its latent sites are {latents}"
            )

        elbo_per_datum = log_w.mean(0)  # (N,)
        total_per_particle = log_w.sum(-1)  # (S,)
        elbo_stderr = (total_per_particle.std(unbiased=True) / math.sqrt(num_samples)).item()
        if log_marginal is not None:
            log_marginal_per_datum = _as_log_marginal(log_marginal(*args, **kwargs), elbo_per_datum)
            if log_marginal_per_datum.shape != elbo_per_datum.shape:
                raise ValueError(
                    f"log_marginal returned shape {tuple(log_marginal_per_datum.shape)}, expected "
                    f"{tuple(elbo_per_datum.shape)} (one value per datum of the 'data' plate)"
                )
        else:
            log_marginal_per_datum = torch.logsumexp(log_w, 0) - math.log(num_samples)

        kl_per_datum, kl_stderr, samples, guide_fn = None, None, None, None
        if site is not None:
            guide_site = weights.guide_trace.nodes[site]
            samples, guide_fn = guide_site["value"], guide_site["fn"]
        kl_method = None
        if posterior is not None:
            exact = posterior(*args, **kwargs)
            _check_posterior(exact, site, guide_site)
            kl_per_datum = _analytic_kl(guide, site, latents, exact, guide_site, args, kwargs)
            if kl_per_datum is not None:
                kl_method, kl_stderr = "analytic", 0.0
            else:
                log_q = _site_log_prob_per_datum(
                    guide_site, samples, guide_fn, weights.particle_dim, num_samples
                )
                log_p = _site_log_prob_per_datum(
                    guide_site, samples, exact, weights.particle_dim, num_samples
                )
                difference = log_q - log_p  # (S, N)
                kl_per_datum = difference.mean(0)
                kl_stderr = (difference.sum(-1).std(unbiased=True) / math.sqrt(num_samples)).item()
                kl_method = "monte-carlo"

    gap_per_datum = log_marginal_per_datum - elbo_per_datum
    data = args[0] if args and isinstance(args[0], torch.Tensor) else None
    return Comparison(
        elbo=elbo_per_datum.sum().item(),
        elbo_stderr=elbo_stderr,
        log_marginal=log_marginal_per_datum.sum().item(),
        log_marginal_exact=log_marginal is not None,
        gap=gap_per_datum.sum().item(),
        kl=None if kl_per_datum is None else kl_per_datum.sum().item(),
        kl_stderr=kl_stderr,
        kl_method=kl_method,
        num_samples=num_samples,
        site=site,
        per_datum={
            "elbo": elbo_per_datum,
            "log_marginal": log_marginal_per_datum,
            "gap": gap_per_datum,
            "kl": kl_per_datum,
        },
        samples=samples,
        _posterior=(lambda: posterior(*args, **kwargs)) if posterior is not None else None,
        _guide_fn=_single_draw_guide_fn(guide, site, args, kwargs) if site is not None else None,
        data=data,
    )


def _as_log_marginal(value, like: torch.Tensor) -> torch.Tensor:
    """What ``log_marginal`` returned, as a tensor like ``like``; ``ValueError`` when it is not numbers."""
    try:
        return torch.as_tensor(value).to(like)
    except (TypeError, ValueError, RuntimeError) as error:
        raise ValueError(
            f"log_marginal must return the exact log p(x) as a tensor of shape {tuple(like.shape)} "
            f"(one value per datum of the 'data' plate), got {type(value).__name__}"
        ) from error


def _check_posterior(exact, site: str, guide_site: dict) -> None:
    """Raise ``ValueError`` unless ``exact`` is a distribution with one posterior per datum of the data plate.

    The data plate's dim counts from the right of the site's batch shape; the guide's event dims are
    counted off the right of the posterior's batch + event shape, so a posterior that declares the event
    dims as batch dims (or the other way round) is checked at the same axis. A missing or size-1 axis would
    broadcast one posterior over every datum, and is accepted only when there is a single datum.
    """
    if not isinstance(exact, Distribution):
        raise ValueError(
            f"posterior must return the exact p(z | x) at site {site!r} as a torch/Pyro distribution, "
            f"got {type(exact).__name__}"
        )
    frame = next(
        (frame for frame in guide_site["cond_indep_stack"] if frame.name == DATA_PLATE and frame.vectorized),
        None,
    )
    if frame is None:
        return  # a latent outside the "data" plate: no per-datum axis to check
    shape = exact.batch_shape + exact.event_shape
    axis = frame.dim - len(guide_site["fn"].event_shape)
    size = shape[axis] if len(shape) >= -axis else 1
    if size != frame.size:
        raise ValueError(
            f"posterior returned a distribution of batch shape {tuple(exact.batch_shape)} (event shape "
            f"{tuple(exact.event_shape)}), but site {site!r} lies in the 'data' plate of {frame.size} data "
            f"points at dim {frame.dim}: its batch shape must have size {frame.size} there, one posterior "
            f"per datum (e.g. batch shape ({frame.size},)), not broadcast over the data"
        )


def _analytic_kl(guide, site, latents, exact, guide_site, args, kwargs):
    """Closed-form KL(q ‖ p) per datum when it is exact and available, else None.

    Exact when the guide has a single latent site (so its distribution there cannot depend on other
    draws) and ``torch.distributions.kl_divergence`` knows the pair of distribution types.
    """
    if latents != [site]:
        return None
    guide_fn = _single_draw_guide_fn(guide, site, args, kwargs)()
    try:
        kl = kl_divergence(guide_fn, exact)
    except NotImplementedError:
        return None
    frames = {frame.name: frame for frame in guide_site["cond_indep_stack"] if frame.name != _PARTICLE_PLATE}
    if DATA_PLATE not in frames:
        return kl.sum().reshape(1)
    dim = frames[DATA_PLATE].dim
    kl = kl.reshape((1,) * max(0, -dim - kl.dim()) + kl.shape)
    return kl.sum(dim=[axis for axis in range(-kl.dim(), 0) if axis != dim]) if kl.dim() > 1 else kl


def _single_draw_guide_fn(guide, site, args, kwargs):
    """A callable giving the guide's distribution at ``site`` from one unvectorized run (for plots)."""

    def guide_fn():
        with torch.no_grad(), poutine.block():
            trace = poutine.trace(guide).get_trace(*args, **kwargs)
        return trace.nodes[site]["fn"]

    return guide_fn
