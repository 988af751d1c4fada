"""Importance-sampled estimates of the per-datum log evidence log p(x) for any model/guide pair."""

from __future__ import annotations

import math

import torch

from pvae.inference._weights import checked_plate_nesting, log_weights, point_mass_sites

__all__ = ["estimator_spread", "log_evidence", "per_datum_log_weights"]


def _check_num(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return value


def per_datum_log_weights(
    model,
    guide,
    *args,
    num_samples: int = 1000,
    proposal: str = "guide",
    particles_per_batch: int | None = None,
    **kwargs,
) -> torch.Tensor:
    """Log importance weights log w[s, n] for ``num_samples`` particles, shape (num_samples, N).

    Global (non-``"data"``-plate) terms, if any, are shared by all data and added to every datum, which is
    exact for a pair with no global latents. Particles are drawn in batches of ``particles_per_batch``
    (default 100) so memory stays bounded. Empty data (N = 0), or 0-d data the pair cannot run on, raise
    ``ValueError``.
    """
    _check_num("num_samples", num_samples)
    if proposal not in ("guide", "prior"):
        raise ValueError(
            f"proposal must be 'guide' (importance sampling) or 'prior' (naive), got {proposal!r}"
        )
    nesting = checked_plate_nesting(model, guide if proposal == "guide" else None, args, kwargs)
    if particles_per_batch is None:
        particles_per_batch = min(num_samples, 100)
    _check_num("particles_per_batch", particles_per_batch)
    chunks = []
    remaining = num_samples
    with torch.no_grad():
        while remaining > 0:
            size = min(particles_per_batch, remaining)
            weights = log_weights(model, guide, args, kwargs, size, proposal, max_plate_nesting=nesting)
            if weights.guide_trace is not None and len(chunks) == 0:
                delta_sites = point_mass_sites(weights.guide_trace)
                if delta_sites:
                    raise ValueError(
                        f"the guide draws {delta_sites} from a point mass (Delta), which has no density, so "
                        "log p(x) cannot be importance-sampled through it; an autoencoder has no marginal "
                        "likelihood: report its reconstruction error, or use a guide with a density"
                    )
            chunks.append(weights.per_datum + weights.global_.unsqueeze(-1))
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
    """
    log_w = per_datum_log_weights(
        model,
        guide,
        *args,
        num_samples=num_samples,
        proposal=proposal,
        particles_per_batch=particles_per_batch,
        **kwargs,
    )
    estimate = torch.logsumexp(log_w, dim=0) - math.log(num_samples)
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
    if isinstance(repeats, bool) or not isinstance(repeats, int) or repeats < 2:
        raise ValueError(f"repeats must be an integer ≥ 2, got {repeats!r}")
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
