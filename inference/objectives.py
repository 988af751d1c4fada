"""Training objectives: Pyro's ELBOs by name, and the importance-weighted bound (IWAE-k) per datum.

``make_elbo("elbo" | "meanfield" | "iwae", num_particles=k)`` returns a Pyro ELBO:

- ``"elbo"``: :class:`pyro.infer.Trace_ELBO`, every term by Monte Carlo (the KL too);
- ``"meanfield"``: :class:`pyro.infer.TraceMeanField_ELBO`, the KL of each latent site in closed form when
  Pyro knows it (for a Gaussian guide against a standard normal prior: ½(−log σ² + μ² + σ² − 1) per
  coordinate);
- ``"iwae"``: :class:`IWAE_ELBO`, the importance-weighted bound of Burda et al. (2016), Eq. 8,

  .. math:: \\mathcal L_k = \\sum_n \\mathbb E\\Big[\\log \\frac1k \\sum_{i=1}^k
            \\frac{p(x_n, z_{n,i})}{q(z_{n,i} \\mid x_n)}\\Big] \\;\\le\\; \\sum_n \\log p(x_n),

  which equals the ELBO for k = 1 and increases with k (their Theorem 1).

Why a class of our own for IWAE. Pyro's ``RenyiELBO(alpha=0)`` is this bound when every sample site sits
in the ``"data"`` plate: it sums a site's log-density only over plates that are *not* shared by all sites
(``get_dependent_plate_dims``), so a common ``"data"`` plate survives and the log-mean-exp over particles is
taken per datum. But it (a) multiplies each log-weight by the plate's subsampling scale N/B *before* the
log-mean-exp, which is not the bound when the data plate is subsampled (the scale belongs outside, on the
sum over data); (b) has no ``differentiable_loss``, so it can only drive Pyro's own optimizers; (c) calls
``.item()`` every step. :class:`IWAE_ELBO` computes the same per-datum bound (identical values on an
unsubsampled plate: see the tests), applies the scale after the log-mean-exp, and offers
``differentiable_loss`` with reparameterized gradients, which the fast training engines need. When some
sample site lies outside the ``"data"`` plate (a global latent), the weights do not factor over data and the
bound is taken over the joint weight of the batch instead, as ``RenyiELBO`` does.
"""

from __future__ import annotations

import torch
from pyro.infer import JitTrace_ELBO, JitTraceMeanField_ELBO, Trace_ELBO, TraceMeanField_ELBO
from pyro.infer.elbo import ELBO

from pvae.checks import check_int
from pvae.inference._weights import guess_max_plate_nesting, importance_weights, log_mean_weight

__all__ = ["IWAE_ELBO", "OBJECTIVES", "make_elbo"]

OBJECTIVES = ("elbo", "meanfield", "iwae")


def make_elbo(objective: str | ELBO = "elbo", num_particles: int = 1, jit: bool = False) -> ELBO:
    """The Pyro ELBO for a named objective (an :class:`~pyro.infer.elbo.ELBO` instance is returned as is).

    :param objective: ``"elbo"`` (Trace_ELBO), ``"meanfield"`` (TraceMeanField_ELBO, analytic KL) or
        ``"iwae"`` (:class:`IWAE_ELBO`), or any Pyro ELBO instance.
    :param num_particles: particles per datum: k of IWAE-k; for the ELBOs, the number of samples averaged.
    :param jit: use Pyro's TorchScript-traced variants (``JitTrace_ELBO``, ``JitTraceMeanField_ELBO``).
    :returns: the ELBO object.
    """
    if isinstance(objective, ELBO):
        return objective
    if not isinstance(objective, str) or objective not in OBJECTIVES:
        raise ValueError(f"objective must be one of {OBJECTIVES} or a Pyro ELBO instance, got {objective!r}")
    num_particles = check_int("num_particles", num_particles)
    if objective == "iwae":
        if jit:
            raise ValueError(
                "jit=True supports objective 'elbo' or 'meanfield'; for 'iwae' use engine='trace' or "
                "engine='compile'"
            )
        return IWAE_ELBO(num_particles=num_particles)
    if jit:
        cls = JitTrace_ELBO if objective == "elbo" else JitTraceMeanField_ELBO
        return cls(num_particles=num_particles, ignore_jit_warnings=True)
    cls = Trace_ELBO if objective == "elbo" else TraceMeanField_ELBO
    return cls(num_particles=num_particles)


class IWAE_ELBO(ELBO):
    """The importance-weighted bound (IWAE-k, Burda et al. 2016, Eq. 8), log-mean-exp taken per datum.

    With particles z_{n,1..k} ~ q(z | x_n) drawn in an outer (vectorized) plate and
    log w_{n,i} = log p(x_n, z_{n,i}) − log q(z_{n,i} | x_n) (the weights of
    :func:`pvae.inference.log_weights`, from the same function), the loss is

    .. math:: -\\, s \\sum_n \\Big(\\operatorname{logsumexp}_i \\log w_{n,i} - \\log k\\Big),

    with s the subsampling scale of the ``"data"`` plate (1 without subsampling). Gradients are the
    reparameterized ones (every latent guide site must have ``rsample``); they weight each particle's
    gradient by its normalized importance weight, as in Burda et al. Eq. 14.

    :param num_particles: k ≥ 1 (k = 1 is the ELBO).
    :param max_plate_nesting: depth of the deepest plate of model and guide (guessed on first use, without
        disturbing the random number stream, when left at infinity).
    """

    def __init__(self, num_particles: int = 2, max_plate_nesting: float = float("inf")):
        super().__init__(
            num_particles=check_int("num_particles", num_particles),
            max_plate_nesting=max_plate_nesting,
            vectorize_particles=False,  # the particle plate is pvae's own (it must exist for k = 1 as well)
        )

    def _nesting(self, model, guide, args, kwargs) -> int:
        if self.max_plate_nesting == float("inf"):
            self.max_plate_nesting = guess_max_plate_nesting(model, guide, args, kwargs)
        return int(self.max_plate_nesting)

    def _get_trace(self, model, guide, args, kwargs):
        """(model trace, guide trace) of one vectorized draw of the k particles (Pyro's ELBO interface)."""
        weights = self._weights(model, guide, args, kwargs)
        return weights.model_trace, weights.guide_trace

    def _weights(self, model, guide, args, kwargs):
        nesting = self._nesting(model, guide, args, kwargs)
        return importance_weights(model, guide, args, kwargs, self.num_particles, max_plate_nesting=nesting)

    def log_weights(self, model, guide, *args, **kwargs) -> tuple[torch.Tensor, float | torch.Tensor, bool]:
        """Log importance weights of one vectorized draw of k particles.

        :returns: ``(log_w, scale, per_datum)``: ``log_w`` is (k, N) with N the ``"data"`` plate's batch
            size when the weights factor over data (``per_datum=True``), else (k, 1) joint weights of the
            whole batch (a site outside the ``"data"`` plate, a global latent, couples the data); ``scale``
            is the common subsampling scale of the sites.
        """
        weights = self._weights(model, guide, args, kwargs)
        for name, site in weights.guide_trace.nodes.items():
            if site["type"] == "sample" and not site["is_observed"] and not site["fn"].has_rsample:
                raise ValueError(
                    f"IWAE_ELBO needs reparameterized guide sites, but site {name!r} draws from "
                    f"{type(site['fn']).__name__}, which has no rsample"
                )
        if weights.has_global:
            return weights.joint.unsqueeze(-1), weights.scale, False
        return weights.local, weights.scale, True

    # ---- the bound ---------------------------------------------------------------------------------------
    def differentiable_loss(self, model, guide, *args, **kwargs) -> torch.Tensor:
        """−IWAE-k bound summed over the ``"data"`` plate (times its subsampling scale); differentiable."""
        log_w, scale, _ = self.log_weights(model, guide, *args, **kwargs)
        bound = log_mean_weight(log_w)  # (N,) or (1,)
        return -(scale * bound).sum()

    def loss(self, model, guide, *args, **kwargs) -> float:
        """−IWAE-k bound as a float (no gradient)."""
        with torch.no_grad():
            return self.differentiable_loss(model, guide, *args, **kwargs).item()

    def loss_and_grads(self, model, guide, *args, **kwargs) -> float:
        """Back-propagate the bound into the parameters' ``.grad`` and return the loss."""
        loss = self.differentiable_loss(model, guide, *args, **kwargs)
        if loss.requires_grad:
            loss.backward(retain_graph=self.retain_graph)
        return loss.item()
