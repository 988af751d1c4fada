"""Per-datum log importance weights, and the importance-sampled log evidence log p(x) they give, for any
model/guide pair."""

from __future__ import annotations

import torch

from pvae.checks import check_choice, check_int
from pvae.inference._weights import (
    PROPOSALS,
    checked_plate_nesting,
    importance_weights,
    log_mean_weight,
    point_mass_sites,
)

__all__ = ["estimator_spread", "log_evidence", "log_weights"]


def log_weights(
    model,
    guide,
    *args,
    num_samples: int = 1000,
    proposal: str = "guide",
    particles_per_batch: int | None = None,
    **kwargs,
) -> torch.Tensor:
    r"""Per-datum log importance weights log w[i, n] of ``num_samples`` particles, shape (num_samples, N).

    .. math:: \log w_{i,n} = \log p(x_n, z_{n,i}) - \log q(z_{n,i} \mid x_n), \quad z_{n,i} \sim q
              \qquad (\text{or } \log p(x_n \mid z_{n,i}),\; z_{n,i} \sim p(z) \text{ for proposal="prior"}),

    summed over every plate but the ``"data"`` plate (N ≥ 1 data points; a pair without that plate is one
    datum). This is the one reduction behind :func:`log_evidence`, :func:`pvae.inference.compare` and
    :class:`pvae.inference.IWAE_ELBO`: log-mean-exp over particles gives the IWAE-k estimate, the mean the
    ELBO. Terms of sites outside the ``"data"`` plate (global latents), if any, are spread evenly over the
    data, so each row sums to the particle's joint log weight of the batch; per-datum weights are then exact
    only for a pair without global latents. Densities are unscaled: a subsampled data plate's scale N/B is
    not in them. No gradients are recorded.

    :param model: Pyro model; data points in ``pyro.plate("data", N)``.
    :param guide: Pyro guide with the same latent sites (ignored for ``proposal="prior"``). A guide with a
        point-mass (Delta) site raises ``ValueError``: there is no density to weigh.
    :param args: the data and any other arguments of model and guide; an empty data tensor ``args[0]``
        (N = 0), or 0-d data the pair cannot run on, raise ``ValueError``.
    :param num_samples: particles per datum, ≥ 1.
    :param proposal: ``"guide"`` (importance sampling) or ``"prior"`` (naive Monte Carlo).
    :param particles_per_batch: particles drawn at once (default ``min(num_samples, 100)``), so memory
        stays bounded.
    :param kwargs: passed to model and guide.
    :returns: (num_samples, N) tensor.
    """
    check_int("num_samples", num_samples)
    check_choice("proposal", proposal, PROPOSALS)
    particles_per_batch = check_int(
        "particles_per_batch", min(num_samples, 100) if particles_per_batch is None else particles_per_batch
    )
    nesting = checked_plate_nesting(model, guide if proposal == "guide" else None, args, kwargs)
    chunks = []
    remaining = num_samples
    with torch.no_grad():
        while remaining > 0:
            size = min(particles_per_batch, remaining)
            weights = importance_weights(model, guide, args, kwargs, size, proposal, nesting)
            if weights.guide_trace is not None and not chunks:
                delta_sites = point_mass_sites(weights.guide_trace)
                if delta_sites:
                    raise ValueError(
                        f"the guide draws {delta_sites} from a point mass (Delta), which has no density, so "
                        "log p(x) cannot be importance-sampled through it; an autoencoder has no marginal "
                        "likelihood: report its reconstruction error, or use a guide with a density"
                    )
            chunks.append(weights.per_datum)
            remaining -= size
    return torch.cat(chunks, dim=0)


def log_evidence(
    model,
    guide,
    *args,
    num_samples: int = 1000,
    proposal: str = "guide",
    return_ess: bool = False,
    particles_per_batch: int | None = None,
    **kwargs,
):
    r"""Per-datum estimate of log p(x) over the ``"data"`` plate: the IWAE-k bound.

    .. math:: \log \hat p(x_n) = \log \frac1k \sum_{i=1}^k w_{n,i}, \qquad
              w_{n,i} = \frac{p(x_n, z_{n,i})}{q(z_{n,i} \mid x_n)}, \; z_{n,i} \sim q,

    a lower bound in expectation (Burda et al. 2016) that tightens as k grows. With ``proposal="prior"``,
    z ~ p(z) and w = p(x | z): the naive estimator p(x) ≈ 1/k Σ p(x | z_i), unbiased for p(x) but with far
    larger variance when the posterior is narrow relative to the prior.

    :param model: Pyro model; data points in ``pyro.plate("data", N)``, N ≥ 1.
    :param guide: Pyro guide with the same latent sites (ignored for ``proposal="prior"``). A guide with
        a point-mass (Delta) site raises ``ValueError``: there is no density to weigh.
    :param num_samples: k, particles per datum.
    :param proposal: ``"guide"`` (importance sampling) or ``"prior"`` (naive Monte Carlo).
    :param return_ess: also return the effective sample size per datum, (Σ w)² / Σ w².
    :param particles_per_batch: draw particles in batches of this size to bound memory.
    :returns: (N,) tensor of log p(x_n) estimates; with ``return_ess``, ``(estimate, ess)``, both (N,).

    The weights are :func:`log_weights`'s (see there for global latents and data checks).
    """
    log_w = log_weights(
        model,
        guide,
        *args,
        num_samples=num_samples,
        proposal=proposal,
        particles_per_batch=particles_per_batch,
        **kwargs,
    )
    estimate = log_mean_weight(log_w)
    if not return_ess:
        return estimate
    ess = torch.exp(2 * torch.logsumexp(log_w, dim=0) - torch.logsumexp(2 * log_w, dim=0))
    return estimate, ess


def estimator_spread(
    model,
    guide,
    *args,
    num_samples: tuple[int, ...] = (10, 100, 1000),
    repeats: int = 30,
    **kwargs,
) -> dict[str, dict[int, dict[str, torch.Tensor]]]:
    """How the naive (prior) and importance-sampled (guide) evidence estimates spread as k grows.

    For each proposal and each k in ``num_samples``, ``repeats`` independent estimates of log p(x_n) are
    drawn; returned are their per-datum mean, standard deviation and mean effective sample size:
    ``{"prior"|"guide": {k: {"mean": (N,), "std": (N,), "ess": (N,)}}}``.
    """
    check_int("repeats", repeats, low=2)
    spread: dict[str, dict[int, dict[str, torch.Tensor]]] = {}
    for proposal in ("prior", "guide"):
        spread[proposal] = {}
        for k in num_samples:
            draws = [
                log_evidence(model, guide, *args, num_samples=k, proposal=proposal, return_ess=True, **kwargs)
                for _ in range(repeats)
            ]
            estimates = torch.stack([estimate for estimate, _ in draws])  # (repeats, N)
            ess = torch.stack([value for _, value in draws])
            spread[proposal][k] = {"mean": estimates.mean(0), "std": estimates.std(0), "ess": ess.mean(0)}
    return spread
