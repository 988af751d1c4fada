"""pvae: latent-variable generative models written as Pyro model/guide pairs and fitted with SVI."""

from pvae import distributions, utils
from pvae.checkpoint import CheckpointError, load
from pvae.distributions import TruncatedNormal
from pvae.family import Family, data_plate, register_family, registered_families

__version__ = "0.1.0"

__all__ = [
    "CheckpointError",
    "Family",
    "TruncatedNormal",
    "__version__",
    "data_plate",
    "distributions",
    "load",
    "register_family",
    "registered_families",
    "utils",
]
