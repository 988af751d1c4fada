"""Model families, one file each; installed as ``pvae.models``.

Importing this package imports every built-in family's module, and each registers its class by name
(``@pvae.register_family``): ``toy``, ``mixture``, ``ae``, ``dae``, ``vae``, ``ddpm``, ``ldm``.
"""

from pvae.models import ae, diffusion, latent_diffusion, mixture, toy, vae

__all__ = ["ae", "diffusion", "latent_diffusion", "mixture", "toy", "vae"]
