"""Training objectives: Pyro's ELBOs by name, and the importance-weighted bound (IWAE-k) per datum.

``make_elbo("elbo" | "meanfield" | "iwae", num_particles=k)`` returns a Pyro ELBO:

- ``"elbo"``: :class:`pyro.infer.Trace_ELBO`, every term by Monte Carlo (the KL too);
- ``"meanfield"``: :class:`pyro.infer.TraceMeanField_ELBO`, the KL of each latent site in closed form when
  Pyro knows it (for a Gaussian guide against a Gaussian prior: seed 2's ½(−log σ² + μ² + σ² − 1));
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

import math
import numbers

import pyro
import torch
from pyro.infer import JitTrace_ELBO, JitTraceMeanField_ELBO, Trace_ELBO, TraceMeanField_ELBO
from pyro.infer.elbo import ELBO
from pyro.infer.enum import get_importance_trace

from pvae.inference._weights import guess_max_plate_nesting

__all__ = ["DATA_PLATE", "IWAE_ELBO", "OBJECTIVES", "make_elbo"]

OBJECTIVES = ("elbo", "meanfield", "iwae")
DATA_PLATE = "data"
_PARTICLE_PLATE = "iwae_particles"


def _check_particles(num_particles) -> int:
    if isinstance(num_particles, bool) or not isinstance(num_particles, int) or num_particles < 1:
        raise ValueError(f"num_particles must be a positive integer, got {num_particles!r}")
    return num_particles


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
    if objective not in OBJECTIVES:
        raise ValueError(f"objective must be one of {OBJECTIVES} or a Pyro ELBO instance, got {objective!r}")
    num_particles = _check_particles(num_particles)
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


def _scale_of(site) -> float | torch.Tensor:
    scale = site["scale"]
    return float(scale) if isinstance(scale, numbers.Number) else scale


def _same_scale(a, b) -> bool:
    if isinstance(a, float) and isinstance(b, float):
        return a == b
    if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor):
        return a is b or (a.shape == b.shape and bool(torch.equal(a, b)))
    return False


def _masked(log_prob: torch.Tensor, mask) -> torch.Tensor:
    """Pyro's masking of a log-density (``scale_and_mask`` without the scale)."""
    if mask is None or mask is True:
        return log_prob
    if mask is False:
        return torch.zeros_like(log_prob)
    return torch.where(mask, log_prob, log_prob.new_zeros(()))


class IWAE_ELBO(ELBO):
    """The importance-weighted bound (IWAE-k, Burda et al. 2016, Eq. 8), log-mean-exp taken per datum.

    With particles z_{n,1..k} ~ q(z | x_n) drawn in an outer (vectorized) plate and
    log w_{n,i} = log p(x_n, z_{n,i}) − log q(z_{n,i} | x_n), the loss is

    .. math:: -\\, s \\sum_n \\Big(\\operatorname{logsumexp}_i \\log w_{n,i} - \\log k\\Big),

    with s the subsampling scale of the ``"data"`` plate (1 without subsampling). Gradients are the
    reparameterized ones (every latent guide site must have ``rsample``); they weight each particle's
    gradient by its normalized importance weight, as in Burda et al. Eq. 14.

    :param num_particles: k ≥ 1 (k = 1 is the ELBO).
    :param max_plate_nesting: depth of the deepest plate of model and guide (guessed on first use, without
        disturbing the random number stream, when left at infinity).
    :param data_plate: name of the plate whose entries are independent data.
    """

    def __init__(
        self, num_particles: int = 2, max_plate_nesting: float = float("inf"), data_plate: str = DATA_PLATE
    ):
        super().__init__(
            num_particles=_check_particles(num_particles),
            max_plate_nesting=max_plate_nesting,
            vectorize_particles=False,  # the particle plate is ours (it must exist for k = 1 as well)
        )
        self.data_plate = data_plate

    # ---- traces ------------------------------------------------------------------------------------------
    def _nesting(self, model, guide, args, kwargs) -> int:
        if self.max_plate_nesting == float("inf"):
            devices = [
                arg.device for arg in args if isinstance(arg, torch.Tensor) and arg.device.type == "cuda"
            ]
            with torch.random.fork_rng(devices=devices[:1]):  # guessing runs the program once: keep the RNG
                self.max_plate_nesting = guess_max_plate_nesting(model, guide, args, kwargs)
        return int(self.max_plate_nesting)

    def _get_trace(self, model, guide, args, kwargs):
        nesting = self._nesting(model, guide, args, kwargs)
        plate = pyro.plate(_PARTICLE_PLATE, self.num_particles, dim=-(nesting + 1))
        return get_importance_trace("flat", nesting + 1, plate(model), plate(guide), args, kwargs)

    def log_weights(self, model, guide, *args, **kwargs) -> tuple[torch.Tensor, float | torch.Tensor, bool]:
        """Log importance weights of one vectorized draw of k particles.

        :returns: ``(log_w, scale, per_datum)``: ``log_w`` is (k, N) with N the ``"data"`` plate's batch
            size when the weights factor over data (``per_datum=True``), else (k, 1) joint weights of the
            whole batch; ``scale`` is the common subsampling scale of the sites.
        """
        model_trace, guide_trace = self._get_trace(model, guide, args, kwargs)
        nesting = int(self.max_plate_nesting) + 1  # batch rank including the particle plate
        k = self.num_particles
        per_datum, joint = None, None
        scales = []
        all_in_data = True
        for trace, sign in ((model_trace, 1.0), (guide_trace, -1.0)):
            for name, site in trace.nodes.items():
                if site["type"] != "sample":
                    continue
                if sign < 0 and not getattr(site["fn"], "has_rsample", False):
                    raise ValueError(
                        f"IWAE_ELBO needs reparameterized guide sites, but site {name!r} draws from "
                        f"{type(site['fn']).__name__}, which has no rsample"
                    )
                scales.append(_scale_of(site))
                log_prob = _masked(site["unscaled_log_prob"], site["mask"])
                log_prob = log_prob.reshape((1,) * (nesting - log_prob.dim()) + log_prob.shape)
                log_prob = log_prob.expand((k,) + log_prob.shape[1:])  # (k, ...) batch dims, rank `nesting`
                frames = {frame.name: frame for frame in site["cond_indep_stack"]}
                data_frame = frames.get(self.data_plate)
                if data_frame is not None and data_frame.vectorized:
                    axis = nesting + data_frame.dim  # counted from the left
                    drop = [d for d in range(1, nesting) if d != axis]
                    term = (log_prob.sum(drop) if drop else log_prob).reshape(k, -1)  # (k, N)
                    per_datum = sign * term if per_datum is None else per_datum + sign * term
                else:
                    all_in_data = False
                    term = log_prob.reshape(k, -1).sum(-1, keepdim=True)  # (k, 1)
                    joint = sign * term if joint is None else joint + sign * term
        scale = scales[0] if scales else 1.0
        for other in scales[1:]:
            if not _same_scale(scale, other):
                raise ValueError(
                    "IWAE_ELBO needs one common scale for all sample sites (the data plate's subsampling "
                    f"scale); found {scale} and {other} (poutine.scale inside the program?)"
                )
        if per_datum is None:
            return joint, scale, False
        if not all_in_data:  # global sites: the weights do not factor over data
            return per_datum.sum(-1, keepdim=True) + joint, scale, False
        return per_datum, scale, True

    # ---- the bound ---------------------------------------------------------------------------------------
    def differentiable_loss(self, model, guide, *args, **kwargs) -> torch.Tensor:
        """−IWAE-k bound summed over the ``"data"`` plate (times its subsampling scale); differentiable."""
        log_w, scale, _ = self.log_weights(model, guide, *args, **kwargs)
        bound = torch.logsumexp(log_w, dim=0) - math.log(self.num_particles)  # (N,) or (1,)
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
