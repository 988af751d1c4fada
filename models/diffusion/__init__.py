r"""Diffusion models written as hierarchical latent-variable models: Pyro model/guide pairs.

The **model** is the learned reverse chain and the **guide** the fixed forward (noising) process, so the
training objective is Pyro's own ELBO rather than a hand-derived loss:

.. math::
    p_\theta(x_{0:T}) = \mathcal N(x_T; 0, I) \prod_{t=1}^{T} p_\theta(x_{t-1} \mid x_t), \qquad
    q(x_{1:T} \mid x_0) = q(x_T \mid x_0) \prod_{t=2}^{T} q(x_{t-1} \mid x_t, x_0).

With α_t = 1 − β_t and ᾱ_t = ∏_{s≤t} α_s (ᾱ_0 = 1):

- q(x_t | x_0) = N(√ᾱ_t x_0, (1 − ᾱ_t) I)  (DDPM Eq. 4);
- q(x_{t−1} | x_t, x_0) = N(μ̃_t, β̃_t I), μ̃_t = √ᾱ_{t−1}β_t/(1−ᾱ_t)·x_0 + √α_t(1−ᾱ_{t−1})/(1−ᾱ_t)·x_t,
  β̃_t = (1−ᾱ_{t−1})/(1−ᾱ_t)·β_t  (Eq. 6–7). At t = 1 this is the point mass at x_0 (β̃_1 = 0);
- p_θ(x_{t−1} | x_t) = N(μ_θ(x_t, t), σ_t² I), μ_θ = (x_t − β_t/√(1−ᾱ_t)·ε_θ(x_t, t))/√α_t (Eq. 11), with
  σ_t² = β_t or β̃_t for t ≥ 2 (``reverse_variance``) and σ_1² = β_1 for the decoder p_θ(x_0 | x_1);
- −ELBO = L_T + Σ_{t≥2} L_{t−1} + L_0  (Eq. 5), L_T = KL(q(x_T | x_0) ‖ N(0, I)) (≈ 0, no parameters),
  L_{t−1} = E_q KL(q(x_{t−1} | x_t, x_0) ‖ p_θ(x_{t−1} | x_t)), L_0 = −E_q log p_θ(x_0 | x_1).

Files, by concern:

- :mod:`.schedules` — β schedules and the one coefficient table (:class:`DiffusionSchedule`,
  looked up by a LongTensor of timesteps with ``coef(name, t, like)``);
- :mod:`.steps` — the step distributions (:class:`ForwardStep`, :class:`ReverseStep`,
  :class:`DiscretizedGaussian`), the Gaussian KL and the registered KL;
- :mod:`.chain` — the step formulas and the processes as sub-programs that run inside the caller's
  plates (:func:`reverse_chain`, :func:`forward_chain`, the time-subsampled halves :func:`reverse_pair` /
  :func:`forward_pair` with their time samplers), and the ELBO's terms in closed form;
- :mod:`.sampling` — ancestral and DDIM samplers;
- :mod:`.config` — the DDPM family's config and the checks of its values;
- :mod:`.family` — the DDPM family: thin model/guide programs over the chains, objectives, EMA,
  evaluation and sampling.
"""

from pvae.models.diffusion.chain import (
    DECODERS,
    TimeDraw,
    elbo_terms,
    forward_chain,
    forward_marginal,
    forward_pair,
    forward_posterior,
    per_datum_timesteps,
    plate_timesteps,
    posterior_mean,
    predicted_x0,
    prior_kl,
    reverse_chain,
    reverse_mean,
    reverse_pair,
    reverse_step,
)
from pvae.models.diffusion.config import OBJECTIVES, TIME_SAMPLING, DDPMConfig
from pvae.models.diffusion.family import DDPM
from pvae.models.diffusion.sampling import SampleChain, ancestral_sample, ddim_sample
from pvae.models.diffusion.schedules import (
    MAX_TIMESTEPS,
    REVERSE_VARIANCES,
    SCHEDULES,
    DiffusionSchedule,
    coefficient_table,
    make_betas,
)
from pvae.models.diffusion.steps import DiscretizedGaussian, ForwardStep, ReverseStep, gaussian_kl

__all__ = [
    "DDPM",
    "DECODERS",
    "MAX_TIMESTEPS",
    "OBJECTIVES",
    "REVERSE_VARIANCES",
    "SCHEDULES",
    "TIME_SAMPLING",
    "DDPMConfig",
    "DiffusionSchedule",
    "DiscretizedGaussian",
    "ForwardStep",
    "ReverseStep",
    "SampleChain",
    "TimeDraw",
    "ancestral_sample",
    "coefficient_table",
    "ddim_sample",
    "elbo_terms",
    "forward_chain",
    "forward_marginal",
    "forward_pair",
    "forward_posterior",
    "gaussian_kl",
    "make_betas",
    "per_datum_timesteps",
    "plate_timesteps",
    "posterior_mean",
    "predicted_x0",
    "prior_kl",
    "reverse_chain",
    "reverse_mean",
    "reverse_pair",
    "reverse_step",
]
