"""Autoencoder and denoising autoencoder as Pyro model/guide pairs.

An autoencoder (x → encoder → z → decoder → x̃, trained on the squared-error loss ‖x − x̃‖²) is the
probabilistic pair

    model:  z ~ flat (improper uniform) prior      # site "z", log density 0
            x | z ~ Normal(decoder(z), s² I)        # site "x"
    guide:  z = encoder(x), a point mass            # site "z", Delta(encoder(x))

For a point-mass guide log q(z | x) = 0 and the flat prior has log p(z) = 0, so the ELBO is the Gaussian
log-likelihood of the reconstruction, exactly

    ELBO = −SSE / (2 s²) − (D / 2) · log(2π s²),      SSE = Σ (x − decoder(encoder(x)))²,

with D the number of observed entries: maximizing it is minimizing the squared-error loss ‖x − x̃‖².

A denoising autoencoder (Vincent et al. 2008) feeds the guide a corrupted copy x̃ of each datum — masking
(each entry set to zero with probability p, the original paper's choice) or additive Gaussian noise — while
the likelihood scores the *clean* x, so the identity map no longer solves the task. The corruption is drawn
with torch's global generator (seeded by ``pyro.set_rng_seed``) and is not a Pyro sample site.

Neither family has a marginal likelihood: the flat prior is improper, so log p(x) is undefined, and a
point-mass guide gives no importance weights. Report :meth:`AE.reconstruction_error` instead;
``pvae.inference.log_evidence`` refuses a point-mass guide. Nor has either a prior predictive:
``model(x=None, num_data=N)`` raises ``ValueError`` (there is no distribution to draw codes from).

Data: (batch, x_dim), or sequences (batch, length, x_dim) on which the networks act per position (e.g.
length × 96 features). Event dims of ``"z"`` and ``"x"`` are then (length, ·).
"""

from __future__ import annotations

from dataclasses import dataclass

import pyro
import pyro.distributions as dist
import torch
from pyro.distributions import constraints

from pvae.checks import (
    check_choice,
    check_finite,
    check_int,
    check_positive,
    check_probability,
)
from pvae.family import Family, data_plate, register_family
from pvae.networks import mlp

__all__ = ["AE", "CORRUPTIONS", "DAE", "AEConfig", "DAEConfig", "FlatPrior"]

CORRUPTIONS = ("mask", "gaussian")
REDUCTIONS = ("mean", "sum")


class FlatPrior(dist.ImproperUniform):
    """The improper uniform density on ℝ^event_shape: log p(z) = 0 everywhere; it cannot be sampled.

    Unlike Pyro's ``ImproperUniform`` (whose ``log_prob`` returns a CPU float32 zero), the zero follows the
    value's device and dtype.
    """

    def __init__(self, batch_shape: torch.Size, event_shape: torch.Size):
        super().__init__(constraints.real, batch_shape, event_shape)

    def expand(self, batch_shape, _instance=None):
        new = self._get_checked_instance(FlatPrior, _instance)
        new._support = self._support
        super(dist.ImproperUniform, new).__init__(torch.Size(batch_shape), self.event_shape)
        return new

    def log_prob(self, value: torch.Tensor) -> torch.Tensor:
        batch_shape = torch.broadcast_shapes(value.shape[: value.dim() - self.event_dim], self.batch_shape)
        return value.new_zeros(()).expand(batch_shape)

    def sample(self, sample_shape=()):
        raise NotImplementedError(
            "the flat prior on 'z' is improper and cannot be sampled: run the model under its guide "
            "(e.g. SVI with Trace_ELBO, which replays the guide's z) rather than on its own"
        )


def _check_finite(x: torch.Tensor) -> None:
    """Raise ``ValueError`` for NaN/inf entries; one cheap reduction (NaN/inf propagate into Σx) first."""
    if not torch.isfinite(x.sum()):
        check_finite("x", x)  # a finite sum that overflowed passes: the data are fine


@dataclass
class AEConfig:
    """Constructor arguments of :class:`AE` (field for field)."""

    x_dim: int = 96
    hidden_dim: int = 128
    z_dim: int = 512
    scale: float = 1.0
    name: str | None = None


@dataclass
class DAEConfig:
    """Constructor arguments of :class:`DAE` (field for field)."""

    x_dim: int = 96
    hidden_dim: int = 128
    z_dim: int = 512
    scale: float = 1.0
    corruption: str = "mask"
    noise: float = 0.25
    name: str | None = None


@register_family("ae")
class AE(Family):
    """Autoencoder: flat prior on ``"z"``, Gaussian likelihood on ``"x"``, point-mass guide z = encoder(x).

    Networks: the MLP encoder Linear(x_dim, hidden_dim) → ReLU → Linear(hidden_dim, z_dim) and decoder
    Linear(z_dim, hidden_dim) → ReLU → Linear(hidden_dim, x_dim). The defaults (96 → 128 → 512) suit
    sequences of 96 features per position; use ``x_dim=784`` for flattened 28×28 images.

    It has no marginal likelihood (see the module docstring): its ``Trace_ELBO`` is
    −SSE/(2 scale²) − (D/2)·log(2π scale²), a rescaled squared reconstruction error.

    :param x_dim: features per datum (per position for sequences).
    :param hidden_dim: hidden width of encoder and decoder.
    :param z_dim: code dimension.
    :param scale: fixed standard deviation s of the Gaussian likelihood, > 0.
    :param name: prefix in Pyro's param store (default: a unique ``"ae_<k>"``).
    """

    config_class = AEConfig

    def __init__(
        self,
        x_dim: int = 96,
        hidden_dim: int = 128,
        z_dim: int = 512,
        scale: float = 1.0,
        name: str | None = None,
    ):
        super().__init__(name)
        check_int("x_dim", x_dim)
        check_int("hidden_dim", hidden_dim)
        check_int("z_dim", z_dim)
        self.x_dim, self.z_dim = x_dim, z_dim
        self.scale = check_positive("scale", scale)
        self.encoder = mlp([x_dim, hidden_dim, z_dim])
        self.decoder = mlp([z_dim, hidden_dim, x_dim])
        self.config = AEConfig(
            x_dim=x_dim, hidden_dim=hidden_dim, z_dim=z_dim, scale=self.scale, name=self.name
        )

    # ---- data checks -------------------------------------------------------------------------------------
    def _checked(self, x: torch.Tensor) -> torch.Tensor:
        """Check shape (batch[, length], x_dim), batch ≥ 1, and finiteness; cast to the parameters' dtype."""
        if not isinstance(x, torch.Tensor):
            raise ValueError(f"x must be a torch.Tensor, got {type(x).__name__}")
        if not x.is_floating_point():
            raise ValueError(f"x must have a floating dtype (float32/float64), got {x.dtype}")
        if x.dim() not in (2, 3) or x.shape[-1] != self.x_dim:
            hint = " (flatten images first: x.flatten(1))" if x.dim() >= 3 else ""
            raise ValueError(
                f"x must have shape (batch, {self.x_dim}) or (batch, length, {self.x_dim}), "
                f"got {tuple(x.shape)}{hint}"
            )
        if x.shape[0] == 0:
            raise ValueError(f"x is an empty batch, shape {tuple(x.shape)}: a batch needs at least one datum")
        dtype = self.decoder[0].weight.dtype
        if x.dtype != dtype:
            x = x.to(dtype)
        _check_finite(x)
        return x

    def _encoder_input(self, x: torch.Tensor) -> torch.Tensor:
        """What the guide encodes: x itself for an AE (a DAE corrupts it)."""
        return x

    # ---- the model/guide pair ----------------------------------------------------------------------------
    def model(self, x: torch.Tensor | None = None, num_data: int | None = None) -> None:
        """Flat prior on ``"z"``; ``"x"`` ~ Normal(decoder(z), scale²) on every entry.

        The flat prior cannot be sampled: run the model with a guide (e.g. under ``Trace_ELBO``).

        :param x: (batch, x_dim) or (batch, length, x_dim).
        :param num_data: with ``x``, the size of the data set x is a batch of
            (:func:`pvae.family.data_plate`); without, the family contract's ``model(x=None, num_data=N)``,
            which this family cannot honour: it raises ``ValueError`` (no prior predictive to draw from).
        """
        if x is None:
            raise ValueError(
                f"{type(self).__name__} cannot draw data from a prior predictive (model(x=None, "
                f"num_data={num_data!r})): its prior on the code 'z' is flat (improper), a constant "
                "density with no distribution to sample codes from. Pass data x instead (and score it under "
                "the guide, e.g. Trace_ELBO), decode the codes of real data with decode(encode(x)), or use a "
                "VAE (pvae.models.vae.VAE), whose Normal(0, I) prior can be sampled"
            )
        x = self._prepare(x)
        pyro.module(self.name, self)
        event_dims = x.dim() - 1
        with data_plate(x, num_data, device=self.device):
            code_shape = (*x.shape[1:-1], self.z_dim)  # (z_dim,) or (length, z_dim)
            z = pyro.sample("z", FlatPrior(x.shape[:1], code_shape))
            loc = self.decoder(z)  # shaped like x (with any leading particle dims)
            pyro.sample(
                "x",
                dist.Normal(loc, loc.new_tensor(self.scale)).to_event(event_dims),
                obs=x,
            )

    def guide(self, x: torch.Tensor, num_data: int | None = None) -> None:
        """Point mass at the code: ``"z"`` ~ Delta(encoder(x)) (a DAE encodes a corrupted x).

        :param x: the same data as given to :meth:`model`.
        :param num_data: as for :meth:`model`.
        """
        x = self._prepare(x)
        pyro.module(self.name, self)
        with data_plate(x, num_data):
            code = self.encoder(self._encoder_input(x))  # (batch, z_dim) or (batch, length, z_dim)
            pyro.sample("z", dist.Delta(code, event_dim=x.dim() - 1))

    # ---- reconstructions ---------------------------------------------------------------------------------
    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """The code encoder(x) of clean data: (batch, z_dim) or (batch, length, z_dim)."""
        return self.encoder(self._prepare(x))

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """The likelihood's mean decoder(z): (..., x_dim)."""
        if not isinstance(z, torch.Tensor) or z.dim() < 1 or z.shape[-1] != self.z_dim:
            shape = tuple(z.shape) if isinstance(z, torch.Tensor) else type(z).__name__
            raise ValueError(f"z must be a tensor of shape (..., {self.z_dim}), got {shape}")
        return self.decoder(z)

    @torch.no_grad()
    def reconstruct(self, x: torch.Tensor) -> torch.Tensor:
        """decoder(encoder(x)) of the clean input, shaped like ``x`` (no gradient)."""
        return self.decoder(self.encoder(self._prepare(x)))

    @torch.no_grad()
    def reconstruction_error(self, x: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
        """Squared reconstruction error of each datum, on clean input (no gradient).

        :param x: (batch, x_dim) or (batch, length, x_dim).
        :param reduction: ``"mean"``: mean squared error over the datum's D entries (MSE per datum);
            ``"sum"``: summed squared error over its entries (the SSE of the ELBO identity).
        :returns: (batch,) tensor.
        """
        check_choice("reduction", reduction, REDUCTIONS)
        x = self._prepare(x)
        squared = (x - self.decoder(self.encoder(x))).square().flatten(1)  # (batch, D)
        return squared.mean(1) if reduction == "mean" else squared.sum(1)


@register_family("dae")
class DAE(AE):
    """Denoising autoencoder: the guide encodes a corrupted x̃, the likelihood scores the clean x.

    Corruptions (Vincent et al. 2008):

    - ``"mask"``: each entry is set to zero independently with probability ``noise`` = p ∈ [0, 1)
      (masking noise, as in the original paper);
    - ``"gaussian"``: x̃ = x + ``noise``·ε with ε ~ Normal(0, I) (``noise`` = standard deviation > 0).

    Like :class:`AE` it has no marginal likelihood. :meth:`reconstruct` and
    :meth:`reconstruction_error` use clean input; :meth:`corrupt` exposes the corruption.

    :param x_dim: features per datum (per position for sequences).
    :param hidden_dim: hidden width of encoder and decoder.
    :param z_dim: code dimension.
    :param scale: fixed standard deviation s of the Gaussian likelihood, > 0.
    :param corruption: ``"mask"`` or ``"gaussian"``.
    :param noise: masking probability p ∈ [0, 1), or the Gaussian noise's standard deviation > 0.
    :param name: prefix in Pyro's param store (default: a unique ``"dae_<k>"``).
    """

    config_class = DAEConfig

    def __init__(
        self,
        x_dim: int = 96,
        hidden_dim: int = 128,
        z_dim: int = 512,
        scale: float = 1.0,
        corruption: str = "mask",
        noise: float = 0.25,
        name: str | None = None,
    ):
        super().__init__(x_dim, hidden_dim, z_dim, scale, name)
        check_choice("corruption", corruption, CORRUPTIONS)
        if corruption == "mask":
            noise = check_probability("noise (masking probability)", noise, include_one=False)
        else:
            noise = check_positive("noise (Gaussian corruption's standard deviation)", noise)
        self.corruption, self.noise = corruption, noise
        self.config = DAEConfig(
            x_dim=x_dim,
            hidden_dim=hidden_dim,
            z_dim=z_dim,
            scale=self.scale,
            corruption=corruption,
            noise=noise,
            name=self.name,
        )

    def corrupt(self, x: torch.Tensor) -> torch.Tensor:
        """A corrupted copy x̃ of ``x`` (same shape), drawn with torch's global generator.

        :param x: data tensor of any shape.
        :returns: x with each entry zeroed with probability ``noise`` (mask), or x + noise·ε (gaussian).
        """
        if self.corruption == "mask":
            keep = torch.rand_like(x) >= self.noise  # P(keep) = 1 − p
            return x * keep
        return x + self.noise * torch.randn_like(x)

    def _encoder_input(self, x: torch.Tensor) -> torch.Tensor:
        return self.corrupt(x)
