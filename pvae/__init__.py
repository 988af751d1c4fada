"""pvae: latent-variable generative models written as Pyro model/guide pairs and fitted with SVI."""

from pvae import distributions, utils
from pvae.checkpoint import load
from pvae.distributions import TruncatedNormal

__version__ = "0.1.0"

__all__ = ["TruncatedNormal", "__version__", "distributions", "load", "utils"]
