r"""A latent graphical model with a one-hot latent: the Gaussian mixture.

.. math::
    z \sim \mathrm{OneHotCategorical}(\pi), \qquad
    x \mid z \sim \mathcal N(z^\top \mu,\, \mathrm{diag}(z^\top \sigma)^2).

The latent z is a one-hot vector (the component indicator). Because it takes only K values, everything is
exact by enumeration: Pyro's ``poutine.enum`` runs the model once over all K values in parallel, giving the
log joint log p(x, z = e_k) as a (K, N) table; its log-sum-exp over k is log p(x) and its softmax is the
posterior p(z | x) (Bayes' rule). ``TraceEnum_ELBO`` with an empty guide computes the same evidence.

Sites: ``"z"`` (latent, event shape (K,)) and ``"x"`` (observed, event shape (D,)) in
``pyro.plate("data", N)``; x has shape (N, D), or (N,) when D = 1. ``model(x=None, num_data=N)`` draws
(N, D) data at site ``"x"`` from the prior predictive, whose mean is Σ_k π_k μ_k.

The amortized guide q_φ(z | x) = OneHotCategorical(softmax(f_φ(x))) is a small network shared across x.
Its site is marked for parallel enumeration, so under ``TraceEnum_ELBO`` it is trained with the exact
expectation over z (no score-function noise); under ``Trace_ELBO`` it is sampled like any other guide.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import pyro
import pyro.distributions as dist
import pyro.poutine as poutine
import torch
from pyro.infer import config_enumerate
from torch import nn

from pvae.checks import check_finite, check_int
from pvae.family import Family, data_plate, register_family
from pvae.networks import mlp

__all__ = ["GaussianMixture", "GaussianMixtureConfig"]


@dataclass
class GaussianMixtureConfig:
    weights: tuple[float, ...] = (0.3, 0.5, 0.2)
    locs: tuple = (-2.0, 0.5, 3.0)
    scales: tuple = (0.6, 0.8, 0.5)
    hidden_dim: int = 32
    name: str | None = None


def _as_matrix(name: str, values, num_components: int) -> torch.Tensor:
    tensor = torch.as_tensor(values, dtype=torch.float64, device="cpu")
    if tensor.dim() == 1:
        tensor = tensor.unsqueeze(-1)  # (K,) → (K, 1): one-dimensional data
    if tensor.dim() != 2 or tensor.shape[0] != num_components:
        raise ValueError(
            f"{name} must have shape (K,) or (K, D) with K = {num_components}, got {tuple(tensor.shape)}"
        )
    if not torch.isfinite(tensor).all():
        raise ValueError(f"{name} must be finite")
    return tensor


@register_family("mixture")
class GaussianMixture(Family):
    """Gaussian mixture with a one-hot component indicator; exact posterior and evidence by enumeration.

    :param weights: mixing weights π (K,), positive, normalized here.
    :param locs: component means, (K,) for 1-D data or (K, D).
    :param scales: component standard deviations, same shape as ``locs``, > 0.
    :param hidden_dim: width of the amortized guide's network.
    :param name: prefix of this family's parameters in Pyro's param store (default: unique).
    """

    config_class = GaussianMixtureConfig

    def __init__(
        self,
        weights: Sequence[float] = (0.3, 0.5, 0.2),
        locs: Sequence = (-2.0, 0.5, 3.0),
        scales: Sequence = (0.6, 0.8, 0.5),
        hidden_dim: int = 32,
        name: str | None = None,
    ):
        super().__init__(name)
        weights_tensor = torch.as_tensor(weights, dtype=torch.float64, device="cpu")
        if weights_tensor.dim() != 1 or len(weights_tensor) < 2 or not (weights_tensor > 0).all():
            raise ValueError(f"weights must be ≥ 2 positive numbers, got {weights!r}")
        num_components = len(weights_tensor)
        locs_tensor = _as_matrix("locs", locs, num_components)
        scales_tensor = _as_matrix("scales", scales, num_components)
        if scales_tensor.shape != locs_tensor.shape or not (scales_tensor > 0).all():
            raise ValueError(f"scales must be > 0 with the shape of locs {tuple(locs_tensor.shape)}")
        hidden_dim = check_int("hidden_dim", hidden_dim)
        self.config = GaussianMixtureConfig(
            weights=tuple(float(w) for w in weights),
            locs=_nested(locs),
            scales=_nested(scales),
            hidden_dim=hidden_dim,
            name=self.name,
        )
        self.num_components, self.data_dim = num_components, locs_tensor.shape[1]
        self.register_buffer("weights", weights_tensor / weights_tensor.sum())  # (K,)
        self.register_buffer("locs", locs_tensor)  # (K, D)
        self.register_buffer("scales", scales_tensor)  # (K, D)
        self.encoder = mlp([self.data_dim, hidden_dim, hidden_dim, num_components], activation=nn.Tanh)

    # ---- input validation --------------------------------------------------------------------------
    def _check(self, x: torch.Tensor) -> torch.Tensor:
        check_finite("x", x)
        shape = tuple(x.shape)
        if x.dim() == 1 and self.data_dim == 1:
            x = x.unsqueeze(-1)
        if x.dim() != 2 or x.shape[-1] != self.data_dim:
            raise ValueError(f"x must have shape (N, {self.data_dim}) (or (N,) for 1-D data), got {shape}")
        if x.shape[0] == 0:
            raise ValueError(f"x is an empty batch, shape {shape}: a batch needs at least one datum")
        return x

    def _constants(self, like: torch.Tensor):
        """π, μ and σ with the dtype and device of ``like``."""
        return (self.weights.to(like), self.locs.to(like), self.scales.to(like))

    # ---- model and exact inference ---------------------------------------------------------------------
    def model(self, x: torch.Tensor | None = None, num_data: int | None = None) -> None:
        """z ~ OneHotCategorical(π); x | z ~ Normal(zᵀμ, zᵀσ) with D independent coordinates.

        :param x: (N, D) data, or (N,) for D = 1; ``None`` to draw x at site ``"x"`` from the prior
            predictive, (num_data, D), in the dtype and on the device of the family's buffers.
        :param num_data: the number of data points to draw when ``x`` is ``None``.
        """
        if x is not None:
            x = self._check(x)
        weights, locs, scales = self._constants(x if x is not None else self.locs)
        with data_plate(x, num_data, device=self.device):
            z = pyro.sample("z", dist.OneHotCategorical(weights))  # (…, N, K), one-hot
            pyro.sample("x", dist.Normal(z @ locs, z @ scales).to_event(1), obs=x)  # mean (…, N, D)

    def _enumerated_log_joint(self, x: torch.Tensor) -> torch.Tensor:
        """log p(x_n, z = e_k) for every k by Pyro's parallel enumeration: (K, N)."""
        enumerated = poutine.enum(config_enumerate(self.model, "parallel"), first_available_dim=-2)
        trace = poutine.trace(enumerated).get_trace(x)
        trace.compute_log_prob()
        return trace.nodes["z"]["log_prob"] + trace.nodes["x"]["log_prob"]  # (K, 1) + (K, N)

    def log_marginal(self, x: torch.Tensor) -> torch.Tensor:
        """Exact log p(x) = log Σ_k π_k N(x; μ_k, σ_k²), by enumeration: (N,)."""
        return torch.logsumexp(self._enumerated_log_joint(self._check(x)), dim=0)

    def posterior(self, x: torch.Tensor) -> dist.OneHotCategorical:
        """Exact p(z | x) ∝ π_k N(x; μ_k, σ_k²), by enumeration: a OneHotCategorical with batch (N,)."""
        log_joint = self._enumerated_log_joint(self._check(x))  # (K, N)
        return dist.OneHotCategorical(logits=log_joint.transpose(0, 1))  # (N, K)

    # ---- guide ---------------------------------------------------------------------------------------
    def guide(self, x: torch.Tensor, num_data: int | None = None) -> None:
        """Amortized q_φ(z | x) = OneHotCategorical(logits = f_φ(x)), enumerated under TraceEnum_ELBO.

        ``num_data``: as for :meth:`model` (:func:`pvae.family.data_plate`).
        """
        x = self._check(x)
        pyro.module(self.name, self)
        logits = self.encoder(x.to(_net_dtype(self))).to(x.dtype)  # (N, K)
        with data_plate(x, num_data):
            pyro.sample("z", dist.OneHotCategorical(logits=logits), infer={"enumerate": "parallel"})

    amortized_guide = guide

    def sample_data(
        self, num_points: int, generator: torch.Generator | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Draw (x, component) from the model: (num_points, D) and (num_points,) integer labels."""
        num_points = check_int("num_points", num_points)
        labels = torch.multinomial(self.weights, num_points, replacement=True, generator=generator)
        noise = torch.randn(
            num_points, self.data_dim, generator=generator, dtype=self.locs.dtype, device=self.locs.device
        )
        return self.locs[labels] + self.scales[labels] * noise, labels

    def sample(self, n: int, *, generator: torch.Generator | None = None) -> torch.Tensor:
        """``n`` draws of x from the model, (n, D), on the device of its buffers."""
        return self.sample_data(n, generator)[0]


def _net_dtype(module: nn.Module) -> torch.dtype:
    return next(module.encoder.parameters()).dtype


def _nested(values) -> tuple:
    tensor = torch.as_tensor(values, dtype=torch.float64, device="cpu")
    return tuple(tensor.tolist()) if tensor.dim() == 1 else tuple(tuple(row) for row in tensor.tolist())
