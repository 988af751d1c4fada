"""Variational autoencoder (Kingma & Welling 2014) as a Pyro model/guide pair.

Generative story (``model``), for each datum in the ``"data"`` plate::

    z ~ Normal(0, I)                                   # site "z", event (z_dim,)
    x | z ~ Bernoulli(logits = decoder(z))             # site "x", event (x_dim,)    likelihood="bernoulli"
    x | z ~ Normal(decoder(z), scale² I)               #                             likelihood="gaussian"

Amortized guide (``guide``)::

    μ, log σ² = chunk(encoder(x), 2)                   # encoder: x (x_dim,) → (2·z_dim,)
    z ~ Normal(μ, σ²)                                  # site "z", reparameterized: z = μ + σ ⊙ ε

Two architectures of encoder and decoder, one model/guide pair (``architecture=``, :data:`ARCHITECTURES`):

- ``"mlp"`` (default): encoder Linear(x_dim, hidden_dim) → LeakyReLU(0.2) → Linear(hidden_dim, 2·z_dim);
  decoder Linear(z_dim, hidden_dim) → ReLU → Linear(hidden_dim, x_dim).
- ``"conv"`` (28×28 one-channel images, x_dim = 784): encoder Conv2d(1, 32, 4, stride 2, padding 1)
  28 → 14 → LeakyReLU(0.2) → Conv2d(32, 64, 4, stride 2, padding 1) 14 → 7 → LeakyReLU(0.2) → flatten →
  Linear(64·7·7, hidden_dim) → LeakyReLU(0.2) → Linear(hidden_dim, 2·z_dim); decoder Linear(z_dim,
  hidden_dim) → ReLU → Linear(hidden_dim, 64·7·7) → ReLU → ConvTranspose2d(64, 32, 4, stride 2,
  padding 1) 7 → 14 → ReLU → ConvTranspose2d(32, 1, 4, stride 2, padding 1) 14 → 28 → flatten
  (:class:`~pvae.networks.ConvEncoder`, :class:`~pvae.networks.ConvDecoder`). The networks take and give
  rows of 784 pixels and reshape to (−1, 1, 28, 28) inside, so data, sites and shapes are the MLP's.

In both, ``hidden_dim`` is the width of the fully connected hidden layer next to the code, and the latent
z is a vector of ``z_dim`` entries.

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

from pvae.checks import check_choice, check_finite, check_int, check_positive
from pvae.family import Family, data_plate, register_family
from pvae.networks import ConvDecoder, ConvEncoder

__all__ = ["ARCHITECTURES", "CONV_IMAGE_SHAPE", "LIKELIHOODS", "VAE", "VAEConfig", "flatten_data"]

LIKELIHOODS = ("bernoulli", "gaussian")
ARCHITECTURES = ("mlp", "conv")
CONV_IMAGE_SHAPE = (1, 28, 28)  # (C, H, W) of the data of architecture="conv"
CONV_CHANNELS = (32, 64)  # widths of the conv encoder's convolutions (28 → 14 → 7)


@dataclass
class VAEConfig:
    """Constructor arguments of :class:`VAE` (field for field)."""

    x_dim: int = 784
    z_dim: int = 20
    hidden_dim: int = 400
    likelihood: str = "bernoulli"
    name: str | None = None
    scale: float = 0.1
    architecture: str = "mlp"  # checkpoints written without this field hold the MLP


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
    """Variational autoencoder with MLP or convolutional encoder and decoder.

    ``architecture="mlp"``: encoder Linear(x_dim, hidden_dim) → LeakyReLU(0.2) → Linear(hidden_dim,
    2·z_dim), chunked into μ and log σ²; decoder Linear(z_dim, hidden_dim) → ReLU → Linear(hidden_dim,
    x_dim), giving Bernoulli logits or the Gaussian mean. ``architecture="conv"``: two stride-2
    convolutions (28 → 14 → 7, 32 and 64 channels) and a hidden layer of ``hidden_dim`` to 2·z_dim, and
    the mirror image with transposed convolutions back to 1 × 28 × 28 (see the module docstring). Either
    way ``encoder[-1]`` is the Linear layer giving (μ, log σ²) and ``decoder[0]`` the Linear layer taking z.

    Sites: ``"z"`` (latent, event (z_dim,)) and ``"x"`` (observed, event (x_dim,)), both in
    ``pyro.plate("data", batch)``. ``model``/``guide`` broadcast over extra leading particle dimensions
    (``z`` of shape (particles, batch, z_dim) under an outer plate), so evidence estimators can vectorize.

    :param x_dim: entries per datum (784 for 28×28 images).
    :param z_dim: latent dimension.
    :param hidden_dim: width of the fully connected hidden layer next to the code, in encoder and decoder
        (mlp: the only hidden layer; conv: the layer between the 64·7·7 feature map and the code).
    :param likelihood: ``"bernoulli"`` (binary data, decoder gives logits) or ``"gaussian"``
        (decoder gives the mean; fixed standard deviation ``scale``).
    :param name: prefix in Pyro's param store (default: a unique ``"vae_<k>"``).
    :param scale: standard deviation of the Gaussian likelihood (ignored for Bernoulli); it must be > 0.
    :param architecture: ``"mlp"`` (default) or ``"conv"`` (:data:`ARCHITECTURES`); ``"conv"`` needs
        x_dim = 784 (28×28 images, one channel).
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
        architecture: str = "mlp",
    ):
        super().__init__(name)
        check_int("x_dim", x_dim)
        check_int("z_dim", z_dim)
        check_int("hidden_dim", hidden_dim)
        check_choice("likelihood", likelihood, LIKELIHOODS)
        scale = check_positive("scale", scale)
        check_choice("architecture", architecture, ARCHITECTURES)
        if architecture == "conv" and x_dim != math.prod(CONV_IMAGE_SHAPE):
            raise ValueError(
                f"x_dim must be {math.prod(CONV_IMAGE_SHAPE)} (28×28 images, one channel) for "
                f"architecture='conv', got {x_dim}; use architecture='mlp' for other data"
            )
        self.config = VAEConfig(
            x_dim=x_dim,
            z_dim=z_dim,
            hidden_dim=hidden_dim,
            likelihood=likelihood,
            name=self.name,
            scale=scale,
            architecture=architecture,
        )
        self.x_dim, self.z_dim, self.likelihood, self.scale = x_dim, z_dim, likelihood, scale
        self.architecture = architecture
        if architecture == "mlp":
            self.encoder = nn.Sequential(
                nn.Linear(x_dim, hidden_dim), nn.LeakyReLU(0.2), nn.Linear(hidden_dim, 2 * z_dim)
            )
            self.decoder = nn.Sequential(
                nn.Linear(z_dim, hidden_dim), nn.ReLU(), nn.Linear(hidden_dim, x_dim)
            )
        else:
            self.encoder = ConvEncoder(
                CONV_IMAGE_SHAPE,
                2 * z_dim,
                hidden_dim,
                channels=CONV_CHANNELS,
                activation=lambda: nn.LeakyReLU(0.2),
            )
            self.decoder = ConvDecoder(CONV_IMAGE_SHAPE, z_dim, hidden_dim, channels=CONV_CHANNELS)
        # constants of p(z) = Normal(0, I) and of the Gaussian likelihood, as buffers that follow the
        # module's device and dtype; not persistent, so they stay out of the state dict (the config has them)
        self.register_buffer("prior_loc", torch.zeros(z_dim), persistent=False)
        self.register_buffer("prior_scale", torch.ones(z_dim), persistent=False)
        self.register_buffer("likelihood_scale", torch.tensor(float(self.scale)), persistent=False)

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
    def _prior(self) -> dist.TorchDistribution:
        return dist.Normal(self.prior_loc, self.prior_scale).to_event(1)

    def _likelihood(self, output: torch.Tensor) -> dist.TorchDistribution:
        if self.likelihood == "bernoulli":
            return dist.Bernoulli(logits=output).to_event(1)
        return dist.Normal(output, self.likelihood_scale).to_event(1)

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
        pyro.module(self.name, self)
        with data_plate(x, num_data, device=self.device):
            z = pyro.sample("z", self._prior())  # (batch, z_dim), or (particles, batch, z_dim)
            pyro.sample("x", self._likelihood(self.decoder(z)), obs=x)

    def guide(self, x: torch.Tensor, num_data: int | None = None) -> None:
        """q(z | x) = Normal(μ(x), diag σ²(x)), amortized by the encoder.

        :param x: the same data as given to :meth:`model`.
        :param num_data: as for :meth:`model` (with data, it must equal the batch size).
        """
        x = self._prepare(x)
        pyro.module(self.name, self)
        with data_plate(x, num_data):
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
    def sample(self, n: int, mean: bool = True, *, generator: torch.Generator | None = None) -> torch.Tensor:
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

    def elbo(
        self,
        x: torch.Tensor,
        num_particles: int = 1,
        *,
        grad: bool = False,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """Per-datum ELBO, shape (batch,): log p(x | z) averaged over S draws, minus the KL in closed form,

        ELBO(x) ≈ (1/S) Σ_s log p(x | z_s) − KL(q(z | x) ‖ p(z)),   z_s = μ(x) + σ(x) ⊙ ε_s,  ε_s ~ N(0, I),

        an unbiased estimate of the ELBO that ``TraceMeanField_ELBO`` estimates the same way and
        ``Trace_ELBO`` with a Monte-Carlo KL (its loss is −Σ_n ELBO(x_n) in expectation).

        :param x: (batch, x_dim) data or images, as for :meth:`model`.
        :param num_particles: S, draws of z per datum (≥ 1).
        :param grad: keep the autograd graph (default: evaluate under ``torch.no_grad``).
        :param generator: torch generator for the draws (on the module's device).
        :returns: (batch,) ELBO estimates in nats, in the parameters' dtype.
        """
        check_int("num_particles", num_particles)
        x = self._prepare(x)
        with torch.set_grad_enabled(grad):
            loc, scale = self._encode(x)  # (batch, z_dim) each
            noise = torch.randn(
                (num_particles, *loc.shape), dtype=loc.dtype, device=loc.device, generator=generator
            )  # (S, batch, z_dim)
            z = loc + scale * noise
            log_likelihood = self._likelihood(self.decoder(z)).log_prob(x)  # (S, batch)
            return log_likelihood.mean(0) - self.analytic_kl(loc, scale)

    @staticmethod
    def analytic_kl(loc: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        """KL(N(μ, σ²) ‖ N(0, I)) = ½ Σ_j (−log σ_j² + μ_j² + σ_j² − 1), summed over the last dim.

        :param loc: (..., z_dim) means μ.
        :param scale: (..., z_dim) standard deviations σ.
        :returns: (...) KL in nats.
        """
        var = scale.square()
        return 0.5 * (-var.log() + loc.square() + var - 1).sum(-1)
