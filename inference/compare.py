"""How far is a guide from the truth? One call for any model/guide pair.

:func:`compare` draws guide particles once and reports, per datum over the ``"data"`` plate and in total:

- the ELBO, E_q[log p(x, z) − log q(z)], with its Monte-Carlo standard error;
- log p(x): exact when a ``log_marginal`` callable is given, else the importance-weighted (IWAE-k) estimate;
- the gap log p(x) − ELBO, which equals KL(q ‖ p(z | x)) when the posterior is exact;
- KL(q ‖ p) estimated directly against an exact ``posterior`` callable, when given;
- the PSIS k̂ of each datum's importance weights (:func:`pvae.inference.psis_khat`): below 0.5 the guide
  is a good importance-sampling proposal, 0.5–0.7 usable, above 0.7 unreliable.

Nothing here knows a concrete family: the exact quantities come in as callables taking the model's args.
The result, :class:`Comparison`, is plain data (numbers and tensors, the densities it plots included);
:func:`pvae.plots.plot_comparison` draws it.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import dataclass, field

import pyro.poutine as poutine
import torch
from torch.distributions import Distribution, kl_divergence

from pvae.checks import check_int
from pvae.inference._weights import checked_plate_nesting, data_frame, importance_weights, reduce_per_datum
from pvae.inference.diagnostics import KHAT_MIN_SAMPLES, psis_khat

__all__ = ["Comparison", "SiteDensities", "compare"]

#: Points of the grid on which a continuous site's densities are evaluated, per datum.
GRID_POINTS = 600


@dataclass
class SiteDensities:
    """The guide's (and the exact posterior's) density at one latent site, per datum, as plain tensors.

    For a continuous scalar site, ``points`` is an (M, G) grid of z values per column (datum) covering the
    guide's draws (and the exact posterior's mean ± 4 standard deviations), and ``guide``/``posterior`` are
    the densities there, (M, G). For a discrete site, ``points`` holds the K values of its support,
    (K, *event), and ``guide``/``posterior`` their probabilities, (M, K). ``posterior`` is ``None`` without
    an exact posterior. The guide's distribution is that of one run of the guide (exact for a guide with a
    single latent site; for several, conditional on one draw of the others).
    """

    discrete: bool
    points: torch.Tensor
    guide: torch.Tensor
    posterior: torch.Tensor | None


@dataclass
class Comparison:
    """Result of :func:`compare`: plain numbers and tensors. Totals are sums over the ``"data"`` plate;
    ``per_datum`` has (N,) tensors.

    ``kl`` and ``kl_stderr`` are ``None`` without a posterior; ``log_marginal_exact`` says whether
    ``log_marginal`` is the exact value or an IWAE estimate from the same particles. Terms of sites outside
    the ``"data"`` plate (global latents) are spread evenly over the data in ``per_datum``; the IWAE
    estimate is exact in expectation only for pairs without global latents. ``samples`` are the guide's
    draws at ``site``, (num_samples, *batch, *event) with ``event_shape`` the site's event shape;
    ``densities`` what :meth:`plot` draws (``None`` when the site is neither scalar nor discrete);
    ``data`` the data, ``args[0]``, when it is a tensor. ``per_datum["khat"]`` is the PSIS k̂ of each
    datum's weights (−∞ for constant weights, the exact posterior's) and ``khat_max`` the largest; both are
    ``None`` with fewer than :data:`pvae.inference.KHAT_MIN_SAMPLES` particles.
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
    samples: torch.Tensor | None = field(default=None, repr=False)
    event_shape: tuple[int, ...] | None = None
    densities: SiteDensities | None = field(default=None, repr=False)
    data: torch.Tensor | None = field(default=None, repr=False)
    khat_max: float | None = None

    def labels(self) -> list[str]:
        """One label per datum: ``"x=…"`` for scalar data, else the datum's index."""
        n = self.per_datum["elbo"].shape[0]
        data = self.data
        if isinstance(data, torch.Tensor) and data.dim() > 0 and data.shape[0] == n and data[0].numel() == 1:
            return [f"x={value:.3g}" for value in data.reshape(-1).tolist()]
        return [str(i) for i in range(n)]

    def table(self, labels: list[str] | None = None, digits: int = 4) -> str:
        """A plain-text per-datum table (and totals)."""
        rows = self._rows(labels)
        header = ["datum", "log p(x)", "ELBO", "gap", "KL(q||p)", "khat"]
        lines = [header] + [[row["datum"], *(_fmt(row[k], digits) for k in header[1:])] for row in rows]
        total = ["total", _fmt(self.log_marginal, digits), _fmt(self.elbo, digits), _fmt(self.gap, digits)]
        total += [_fmt(self.kl, digits), _fmt(None, digits)]  # k̂ has no total
        lines.append(total)
        widths = [max(len(str(line[i])) for line in lines) for i in range(len(header))]
        text = ["  ".join(str(cell).rjust(width) for cell, width in zip(line, widths)) for line in lines]
        text.insert(1, "  ".join("-" * width for width in widths))
        note = "exact" if self.log_marginal_exact else f"IWAE estimate, k={self.num_samples}"
        text.append(
            f"(log p(x): {note}; ELBO ± {self.elbo_stderr:.2g} stderr over {self.num_samples} particles)"
        )
        if self.khat_max is not None:
            text.append(
                f"(khat: PSIS k̂ of each datum's weights, largest {self.khat_max:.3g}; < 0.5 good, 0.5–0.7 "
                "usable, > 0.7 unreliable)"
            )
        return "\n".join(text)

    def markdown(self, labels: list[str] | None = None, digits: int = 4) -> str:
        """The per-datum table as Markdown."""
        rows = self._rows(labels)
        out = [
            "| datum | log p(x) | ELBO | gap | KL(q‖p) | k̂ |",
            "| --- | ---: | ---: | ---: | ---: | ---: |",
        ]
        keys = ("log p(x)", "ELBO", "gap", "KL(q||p)", "khat")
        for row in rows:
            cells = [row["datum"], *(_fmt(row[k], digits) for k in keys)]
            out.append("| " + " | ".join(cells) + " |")
        totals = (self.log_marginal, self.elbo, self.gap, self.kl, None)  # k̂ has no total
        out.append("| " + " | ".join(["**total**", *(_fmt(v, digits) for v in totals)]) + " |")
        return "\n".join(out)

    def _rows(self, labels):
        n = self.per_datum["elbo"].shape[0]
        labels = labels or self.labels()
        kl = self.per_datum["kl"]
        khat = self.per_datum.get("khat")
        return [
            {
                "datum": labels[i],
                "log p(x)": self.per_datum["log_marginal"][i].item(),
                "ELBO": self.per_datum["elbo"][i].item(),
                "gap": self.per_datum["gap"][i].item(),
                "KL(q||p)": None if kl is None else kl[i].item(),
                "khat": None if khat is None else khat[i].item(),
            }
            for i in range(n)
        ]

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
                "khat_max",
            )
        }
        out["per_datum"] = {k: None if v is None else v.tolist() for k, v in self.per_datum.items()}
        json.dumps(out)  # fail here rather than in the caller if something is not serializable
        return out

    def plot(self, path: str, max_panels: int = 9, labels: list[str] | None = None) -> str:
        """Overlay, per datum, the exact posterior density, the guide density and a histogram of guide draws
        (:func:`pvae.plots.plot_comparison`).

        Continuous scalar sites get density curves; discrete sites get side-by-side bars of probabilities.
        """
        from pvae.plots import plot_comparison

        return plot_comparison(self, path, max_panels=max_panels, labels=labels)


def _fmt(value, digits):
    if value is None:
        return "—"
    return f"{value:.{digits}f}"


def _latent_sites(trace) -> list[str]:
    return [
        name for name, site in trace.nodes.items() if site["type"] == "sample" and not site["is_observed"]
    ]


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

    The importance weights are those of :func:`pvae.inference.log_weights` (one vectorized draw of
    ``num_samples`` particles): their mean per datum is the ELBO, their log-mean-exp the IWAE estimate.

    :param model: Pyro model; data points in ``pyro.plate("data", N)``, N ≥ 1.
    :param guide: Pyro guide (any pair: nothing here knows a concrete family).
    :param args: the data, passed to model, guide, ``posterior`` and ``log_marginal`` alike; a tensor
        ``args[0]`` holds the N data points along its first dimension (empty data raise ``ValueError``).
    :param posterior: callable ``posterior(*args, **kwargs)`` returning the exact p(z | x) of one latent site
        as a distribution whose batch shape matches that site's plates (e.g. (N,)); a batch shape whose
        size at the ``"data"`` plate's dim is not N raises ``ValueError`` rather than broadcasting.
    :param log_marginal: callable ``log_marginal(*args, **kwargs)`` returning the exact log p(x), (N,);
        any other shape raises ``ValueError``.
    :param num_samples: guide particles, ≥ 2 (a standard error needs two); k̂ needs at least
        :data:`pvae.inference.KHAT_MIN_SAMPLES`.
    :param site: latent site that ``posterior`` describes; needed only when the guide has several.
    :param kwargs: passed to model, guide and the callables.
    :returns: :class:`Comparison`.
    """
    num_samples = check_int("num_samples", num_samples, low=2)
    if posterior is not None and not callable(posterior):
        raise ValueError("posterior must be a callable taking the model's arguments, e.g. family.posterior")
    if log_marginal is not None and not callable(log_marginal):
        raise ValueError(
            "log_marginal must be a callable taking the model's arguments, e.g. family.log_marginal"
        )
    with torch.no_grad():
        nesting = checked_plate_nesting(model, guide, args, kwargs)
        weights = importance_weights(model, guide, args, kwargs, num_samples, max_plate_nesting=nesting)
        log_w = weights.per_datum  # (S, N)
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
        elbo_stderr = (weights.joint.std(unbiased=True) / math.sqrt(num_samples)).item()
        if log_marginal is not None:
            log_marginal_per_datum = _as_log_marginal(log_marginal(*args, **kwargs), elbo_per_datum)
            if log_marginal_per_datum.shape != elbo_per_datum.shape:
                raise ValueError(
                    f"log_marginal returned shape {tuple(log_marginal_per_datum.shape)}, expected "
                    f"{tuple(elbo_per_datum.shape)} (one value per datum of the 'data' plate)"
                )
        else:
            log_marginal_per_datum = torch.logsumexp(log_w, 0) - math.log(num_samples)

        samples = event_shape = guide_site = guide_fn = exact = None
        if site is not None:
            guide_site = weights.guide_trace.nodes[site]
            samples, event_shape = guide_site["value"], tuple(guide_site["fn"].event_shape)
            plottable = not event_shape or getattr(guide_site["fn"].support, "is_discrete", False)
            if posterior is not None or plottable:
                guide_fn = _site_distribution(guide, site, args, kwargs)
        kl_per_datum, kl_stderr, kl_method = None, None, None
        if posterior is not None:
            exact = posterior(*args, **kwargs)
            _check_posterior(exact, site, guide_site)
            if latents == [site]:  # one latent site: q at it cannot depend on other draws
                kl_per_datum = _analytic_kl(guide_fn, exact, guide_site, weights.particle_dim)
            if kl_per_datum is not None:
                kl_method, kl_stderr = "analytic", 0.0
            else:
                difference = _per_datum(
                    guide_site["fn"].log_prob(samples) - exact.log_prob(samples), guide_site, weights
                )  # (S, N)
                kl_per_datum = difference.mean(0)
                kl_stderr = (difference.sum(-1).std(unbiased=True) / math.sqrt(num_samples)).item()
                kl_method = "monte-carlo"
        densities = None
        if guide_fn is not None and (not event_shape or getattr(guide_fn.support, "is_discrete", False)):
            densities = site_densities(samples, guide_fn, exact)

    gap_per_datum = log_marginal_per_datum - elbo_per_datum
    khat_per_datum = psis_khat(log_w) if num_samples >= KHAT_MIN_SAMPLES else None
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
            "khat": khat_per_datum,
        },
        samples=samples,
        event_shape=event_shape,
        densities=densities,
        data=args[0] if args and isinstance(args[0], torch.Tensor) else None,
        khat_max=None if khat_per_datum is None else khat_per_datum.max().item(),
    )


def _per_datum(log_prob: torch.Tensor, guide_site, weights) -> torch.Tensor:
    """A log-density at the guide site reduced like the importance weights: (S, N), or (S, 1) outside
    the ``"data"`` plate."""
    terms, _ = reduce_per_datum(log_prob, guide_site, weights.particle_dim, weights.local.shape[0])
    return terms


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
    frame = data_frame(guide_site)
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


def _analytic_kl(guide_fn, exact, guide_site, particle_dim: int) -> torch.Tensor | None:
    """Closed-form KL(q ‖ p) per datum when ``torch.distributions.kl_divergence`` knows the pair, else None.

    Exact when the guide has a single latent site, so that its distribution there, from one run of the
    guide, cannot depend on other draws.
    """
    try:
        kl = kl_divergence(guide_fn, exact)  # the site's batch shape, no particle axis
    except NotImplementedError:
        return None
    terms, _ = reduce_per_datum(kl, guide_site, particle_dim, 1)
    return terms[0]  # (N,), or (1,) for a site outside the "data" plate


def _site_distribution(guide, site, args, kwargs) -> Distribution:
    """The guide's distribution at ``site`` in one unvectorized run of the guide."""
    with poutine.block():
        trace = poutine.trace(guide).get_trace(*args, **kwargs)
    return trace.nodes[site]["fn"]


def _density(distribution, values: torch.Tensor) -> torch.Tensor:
    """Density of each batch entry of a scalar distribution at its own points: ``values`` (G, *batch) →
    (G, M) with M the number of batch entries.

    Points outside the support get density 0; they are swapped for a draw before ``log_prob`` so that
    argument validation stays on.
    """
    safe_point = distribution.sample().expand_as(values)
    inside = distribution.support.check(values)
    log_prob = distribution.log_prob(torch.where(inside, values, safe_point))
    return torch.where(inside, log_prob.exp(), torch.zeros_like(log_prob)).reshape(values.shape[0], -1)


def site_densities(samples: torch.Tensor, guide_fn, exact=None) -> SiteDensities:
    """The densities :func:`pvae.plots.plot_comparison` draws, as plain tensors (see :class:`SiteDensities`).

    :param samples: guide draws at the site, (S, *batch, *event).
    :param guide_fn: the guide's distribution at the site, batch shape ``batch``.
    :param exact: the exact posterior there, or ``None``.
    """
    if getattr(guide_fn.support, "is_discrete", False):
        values = guide_fn.enumerate_support(expand=False)  # (K, 1, …, *event)
        num_values = values.shape[0]

        def probabilities(distribution):
            return distribution.log_prob(values).reshape(num_values, -1).exp().transpose(0, 1)  # (M, K)

        return SiteDensities(
            discrete=True,
            points=values.reshape(num_values, *guide_fn.event_shape),
            guide=probabilities(guide_fn),
            posterior=None if exact is None else probabilities(exact),
        )
    batch_shape = guide_fn.batch_shape
    columns = samples.reshape(samples.shape[0], -1).double()  # (S, M)
    bounds = torch.tensor([0.001, 0.999], dtype=torch.float64, device=columns.device)
    low, high = torch.quantile(columns, bounds, dim=0)  # (M,) each
    if exact is not None:
        try:
            mean = exact.mean.double().reshape(-1).expand_as(low)
            std = exact.variance.double().sqrt().reshape(-1).expand_as(low)
            low, high = torch.minimum(low, mean - 4 * std), torch.maximum(high, mean + 4 * std)
        except (NotImplementedError, AttributeError, RuntimeError):
            pass  # no closed-form moments: the guide's draws set the range
    pad = 0.05 * (high - low + 1e-12)
    fraction = torch.linspace(0, 1, GRID_POINTS, dtype=torch.float64, device=columns.device)
    points = (low - pad).unsqueeze(-1) + (high - low + 2 * pad).unsqueeze(-1) * fraction  # (M, G)
    values = points.transpose(0, 1).reshape(GRID_POINTS, *batch_shape).to(samples.dtype)  # (G, *batch)
    return SiteDensities(
        discrete=False,
        points=points,
        guide=_density(guide_fn, values).transpose(0, 1),
        posterior=None if exact is None else _density(exact, values).transpose(0, 1),
    )
