"""Variational autoencoder (Kingma & Welling 2014) as a Pyro model/guide pair.

Generative story (``model``), for each datum in the ``"data"`` plate::

    z ~ Normal(0, I)                                   # site "z", event (z_dim,)
    x | z ~ Bernoulli(logits = decoder(z))             # site "x", event (x_dim,)    likelihood="bernoulli"
    x | z ~ Normal(decoder(z), scale² I)               #                             likelihood="gaussian"

Amortized guide (``guide``)::

    μ, log σ² = chunk(encoder(x), 2)                   # the MLP encoder Linear → LeakyReLU(0.2) → Linear
    z ~ Normal(μ, σ²)                                  # site "z", reparameterized: z = μ + σ ⊙ ε

The ELBO is E_q[log p(x | z)] − KL(q(z | x) ‖ p(z)) ≤ log p(x), and for this pair the KL has the closed
form (Kingma & Welling 2014, Appendix B) KL = ½ Σ_j (−log σ_j² + μ_j² + σ_j² − 1).
``Trace_ELBO`` estimates the KL by Monte Carlo, ``TraceMeanField_ELBO`` uses the closed form; both
estimate the same ELBO. With the Bernoulli likelihood and binary data, −log p(x | z) is the summed binary
cross-entropy between x and sigmoid(decoder(z)), computed from logits (no sigmoid inside the network).

``model(x=None, num_data=N)`` draws from the prior predictive: z ~ Normal(0, I), then x at site ``"x"``
(binary under the Bernoulli likelihood).

Data: (batch, x_dim) tensors; (batch, H, W) and (batch, C, H, W) images with C·H·W = x_dim are flattened.
A Bernoulli likelihood takes binary data only: binarize grey levels first (``BatchLoader(...,
binarize="dynamic")``) or choose ``likelihood="gaussian"``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import pyro
import pyro.distributions as dist
import torch
from torch import nn

from pvae.checks import check_choice, check_finite, check_int, check_num_data, check_positive
from pvae.family import Family, register_family

__all__ = ["LIKELIHOODS", "VAE", "VAEConfig", "flatten_data"]

LIKELIHOODS = ("bernoulli", "gaussian")


@dataclass
class VAEConfig:
    """Constructor arguments of :class:`VAE` (field for field)."""

    x_dim: int = 784
    z_dim: int = 20
    hidden_dim: int = 400
    likelihood: str = "bernoulli"
    name: str | None = None
    scale: float = 0.1


def flatten_data(x: torch.Tensor, x_dim: int, name: str = "x") -> torch.Tensor:
    """Check the shape of a batch of data and flatten images to (batch, x_dim).

    Accepted: (batch, x_dim); images (batch, H, W) or (batch, C, H, W) with C·H·W = x_dim; batch ≥ 1.

    :param x: the batch.
    :param x_dim: number of entries of one datum.
    :param name: argument name used in error messages.
    :returns: a (batch, x_dim) view of ``x``.
    :raises ValueError: for anything else, naming the accepted shapes, and for an empty batch.
    """
    if not isinstance(x, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise ValueError(f"{name} must have a floating dtype (float32/float64), got {x.dtype}")
    if (x.dim() == 2 and x.shape[1] == x_dim) or (x.dim() in (3, 4) and math.prod(x.shape[1:]) == x_dim):
        if x.shape[0] == 0:
            raise ValueError(
                f"{name} is an empty batch, shape {tuple(x.shape)}: a batch needs at least one datum"
            )
        return x if x.dim() == 2 else x.reshape(x.shape[0], x_dim)
    hint = " (add a batch dimension: x[None])" if x.dim() == 1 and x.shape[0] == x_dim else ""
    raise ValueError(
        f"{name} must have shape (batch, {x_dim}), or (batch, H, W) / (batch, C, H, W) images with "
        f"C·H·W = {x_dim}; got {tuple(x.shape)}{hint}"
    )


@register_family("vae")
class VAE(Family):
    """Variational autoencoder with MLP encoder and decoder.

    Encoder: Linear(x_dim, hidden_dim) → LeakyReLU(0.2) → Linear(hidden_dim, 2·z_dim), chunked into μ and
    log σ². Decoder: Linear(z_dim, hidden_dim) → ReLU → Linear(hidden_dim, x_dim), giving Bernoulli logits
    or the Gaussian mean.

    Sites: ``"z"`` (latent, event (z_dim,)) and ``"x"`` (observed, event (x_dim,)), both in
    ``pyro.plate("data", batch)``. ``model``/``guide`` broadcast over extra leading particle dimensions
    (``z`` of shape (particles, batch, z_dim) under an outer plate), so evidence estimators can vectorize.

    :param x_dim: entries per datum (784 for 28×28 images).
    :param z_dim: latent dimension.
    :param hidden_dim: width of the hidden layer of encoder and decoder.
    :param likelihood: ``"bernoulli"`` (binary data, decoder gives logits) or ``"gaussian"``
        (decoder gives the mean; fixed standard deviation ``scale``).
    :param name: prefix in Pyro's param store (default: a unique ``"vae_<k>"``).
    :param scale: standard deviation of the Gaussian likelihood (ignored for Bernoulli); it must be > 0.
    """

    config_class = VAEConfig

    def __init__(
        self,
        x_dim: int = 784,
        z_dim: int = 20,
        hidden_dim: int = 400,
        likelihood: str = "bernoulli",
        name: str | None = None,
        scale: float = 0.1,
    ):
        super().__init__(name)
        check_int("x_dim", x_dim)
        check_int("z_dim", z_dim)
        check_int("hidden_dim", hidden_dim)
        check_choice("likelihood", likelihood, LIKELIHOODS)
        scale = check_positive("scale", scale)
        self.config = VAEConfig(
            x_dim=x_dim,
            z_dim=z_dim,
            hidden_dim=hidden_dim,
            likelihood=likelihood,
            name=self.name,
            scale=scale,
        )
        self.x_dim, self.z_dim, self.likelihood, self.scale = x_dim, z_dim, likelihood, scale
        self.encoder = nn.Sequential(
            nn.Linear(x_dim, hidden_dim), nn.LeakyReLU(0.2), nn.Linear(hidden_dim, 2 * z_dim)
        )
        self.decoder = nn.Sequential(nn.Linear(z_dim, hidden_dim), nn.ReLU(), nn.Linear(hidden_dim, x_dim))
        # p(z) = Normal(0, I), built once per (device, dtype) rather than on every model call.
        self._priors: dict[tuple[torch.device, torch.dtype], dist.TorchDistribution] = {}
        self._scales: dict[tuple[torch.device, torch.dtype], torch.Tensor] = {}  # the likelihood's scale

    # ---- data checks -------------------------------------------------------------------------------------
    def _checked(self, x: torch.Tensor) -> torch.Tensor:
        """Flatten to (batch, x_dim), cast to the parameters' dtype, and check the values.

        The value check is one cheap reduction whose result is non-zero or non-finite exactly when some
        entry is bad: Σ|x − x²| under the Bernoulli likelihood (zero iff every entry is 0 or 1; NaN/inf
        propagate), Σx under the Gaussian one (non-finite when an entry is NaN/inf). Only then does
        :meth:`_check_values` look closer and explain.
        """
        x = flatten_data(x, self.x_dim)
        dtype = self.decoder[0].weight.dtype
        if x.dtype != dtype:
            x = x.to(dtype)
        if self.likelihood == "bernoulli":
            if torch.addcmul(x, x, x, value=-1).abs().sum():
                self._check_values(x)
        elif not torch.isfinite(x.sum()):
            self._check_values(x)
        return x

    def _check_values(self, x: torch.Tensor) -> None:
        """Raise ``ValueError`` for NaN/inf entries, or non-binary entries under a Bernoulli likelihood."""
        check_finite("x", x)
        if self.likelihood != "bernoulli":
            return  # a finite sum that overflowed: the data are fine
        grey = int(((x != 0) & (x != 1)).sum())
        if grey:
            raise ValueError(
                f"x must be binary (0/1) under likelihood='bernoulli', but {grey} of {x.numel()} entries "
                f"are not (values from {float(x.min()):.3g} to {float(x.max()):.3g}). Binarize the data "
                "first: BatchLoader(..., binarize='dynamic') or torch.bernoulli(x) for grey levels in "
                "[0, 1]; or use likelihood='gaussian' for continuous data."
            )

    # ---- networks ----------------------------------------------------------------------------------------
    def _prior(self, like: torch.Tensor) -> dist.TorchDistribution:
        key = (like.device, like.dtype)
        prior = self._priors.get(key)
        if prior is None:
            loc = torch.zeros(self.z_dim, device=like.device, dtype=like.dtype)  # (z_dim,)
            prior = dist.Normal(loc, torch.ones_like(loc)).to_event(1)
            self._priors[key] = prior
        return prior

    def _likelihood(self, output: torch.Tensor) -> dist.TorchDistribution:
        if self.likelihood == "bernoulli":
            return dist.Bernoulli(logits=output).to_event(1)
        key = (output.device, output.dtype)
        scale = self._scales.get(key)
        if scale is None:
            scale = self._scales[key] = torch.full((), self.scale, dtype=output.dtype, device=output.device)
        return dist.Normal(output, scale).to_event(1)

    def _encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        loc, log_var = self.encoder(x).chunk(2, dim=-1)  # (batch, z_dim) each
        return loc, (0.5 * log_var).exp()

    # ---- the model/guide pair ----------------------------------------------------------------------------
    def model(self, x: torch.Tensor | None = None, num_data: int | None = None) -> None:
        """p(z) p(x | z): ``"z"`` ~ Normal(0, I), ``"x"`` observed under the decoder's likelihood.

        :param x: (batch, x_dim) data (binary under a Bernoulli likelihood) or images (:func:`flatten_data`);
            ``None`` to draw x at site ``"x"`` from the prior predictive, (num_data, x_dim), in the dtype and
            on the device of the parameters.
        :param num_data: the number of data points to draw when ``x`` is ``None``.
        """
        if x is not None:
            x = self._prepare(x)
        size = check_num_data(num_data, x)
        pyro.module(self.name, self)
        like = x if x is not None else self.decoder[0].weight  # the dtype and device of the draws
        with pyro.plate("data", size):
            z = pyro.sample("z", self._prior(like))  # (batch, z_dim), or (particles, batch, z_dim)
            pyro.sample("x", self._likelihood(self.decoder(z)), obs=x)

    def guide(self, x: torch.Tensor, num_data: int | None = None) -> None:
        """q(z | x) = Normal(μ(x), diag σ²(x)), amortized by the encoder.

        :param x: the same data as given to :meth:`model`.
        :param num_data: as for :meth:`model` (with data, it must equal the batch size).
        """
        x = self._prepare(x)
        pyro.module(self.name, self)
        with pyro.plate("data", check_num_data(num_data, x)):
            loc, scale = self._encode(x)  # (batch, z_dim) each
            pyro.sample("z", dist.Normal(loc, scale).to_event(1))

    # ---- helpers for pictures and evaluation -------------------------------------------------------------
    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean and standard deviation of q(z | x).

        :param x: (batch, x_dim) data or images.
        :returns: ``(loc, scale)``, each (batch, z_dim).
        """
        return self._encode(self._prepare(x))

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Mean of p(x | z): Bernoulli probabilities sigmoid(logits), or the Gaussian mean.

        :param z: (..., z_dim) latent codes.
        :returns: (..., x_dim).
        """
        if not isinstance(z, torch.Tensor) or z.dim() < 1 or z.shape[-1] != self.z_dim:
            shape = tuple(z.shape) if isinstance(z, torch.Tensor) else type(z).__name__
            raise ValueError(f"z must be a tensor of shape (..., {self.z_dim}), got {shape}")
        output = self.decoder(z)
        return output.sigmoid() if self.likelihood == "bernoulli" else output

    @torch.no_grad()
    def reconstruct(self, x: torch.Tensor) -> torch.Tensor:
        """Decode the posterior mean: E[x | z = μ(x)], shaped like the input (no gradient).

        :param x: (batch, x_dim) data or images.
        :returns: reconstructions with the shape of ``x``.
        """
        loc, _ = self.encode(x)
        return self.decode(loc).reshape(x.shape)

    @torch.no_grad()
    def sample(self, n: int, mean: bool = True, generator: torch.Generator | None = None) -> torch.Tensor:
        """Draw z ~ Normal(0, I) on the module's device and decode it (no gradient).

        :param n: number of samples, ≥ 1.
        :param mean: return the decoder mean (probabilities / Gaussian mean, good for pictures); with
            ``False`` draw x ~ p(x | z) instead.
        :param generator: optional torch generator (on the module's device) for reproducible draws.
        :returns: (n, x_dim) in the parameters' dtype.
        """
        check_int("n", n)
        weight = self.decoder[0].weight
        z = torch.randn(n, self.z_dim, device=weight.device, dtype=weight.dtype, generator=generator)
        mean_x = self.decode(z)  # (n, x_dim)
        if mean:
            return mean_x
        if self.likelihood == "bernoulli":
            return torch.bernoulli(mean_x, generator=generator)
        noise = torch.randn(mean_x.shape, device=weight.device, dtype=weight.dtype, generator=generator)
        return mean_x + self.scale * noise

    @staticmethod
    def analytic_kl(loc: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        """KL(N(μ, σ²) ‖ N(0, I)) = ½ Σ_j (−log σ_j² + μ_j² + σ_j² − 1), summed over the last dim.

        :param loc: (..., z_dim) means μ.
        :param scale: (..., z_dim) standard deviations σ.
        :returns: (...) KL in nats.
        """
        var = scale.square()
        return 0.5 * (-var.log() + loc.square() + var - 1).sum(-1)
