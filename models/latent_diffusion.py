r"""Latent diffusion (Rombach et al. 2022) as one Pyro program: a VAE whose prior p(z) is a diffusion chain.

The hierarchy, for each datum in ``pyro.plate("data", N)``:

.. code-block:: text

    model:  z_T ~ N(0, I) → z_{T−1} → … → z_1 → z_0          (the DDPM reverse chain, sites "z_T" … "z_0")
            x | z_0 ~ p(x | z_0 / s)                           (the VAE's decoder, site "x")
    guide:  z_0 ~ q(z_0 | x) = N(s·μ(x), s²·σ²(x))            (the VAE's encoder, site "z_0")
            z_T ~ q(z_T | z_0), z_{t−1} ~ q(z_{t−1} | z_t, z_0)  (the forward process, no parameters)

so Trace_ELBO on ``model``/``guide`` is a lower bound on log p(x) over the whole latent hierarchy (the
joint objective of score-based latent models, Vahdat et al. 2021, in discrete time), and
``log_evidence(ldm.model, ldm.guide, x, num_samples=k)`` is its importance-sampled version. The chain
runs on the *scaled* latent u = s·z (``latent_scale``; LDM scales latents to unit spread so the chain's
N(0, I) end fits them): both model and guide are densities over u, so s changes no bound on log p(x) —
the Jacobian of u = s·z cancels between them.

**Training pair** (:meth:`LatentDiffusion.svi_program`): the full chain costs T network passes per
step, so training uses the chain's time-subsampled pair (:meth:`DDPM.reverse_terms` /
:meth:`DDPM.forward_terms`, one timestep per datum or per batch) on the guide's draw of z_0. In the model
z_0 carries a flat density and the chain's subsampled terms supply its prior, so under Trace_ELBO the
expectation is the same ELBO as the full chain's. Objectives: ``"elbo"`` (Trace_ELBO), ``"meanfield"``
(TraceMeanField_ELBO: the step KLs in closed form given z_t, the same ELBO), ``"simple"`` (the prior's
steps reweighted as DDPM's L_simple: **not an ELBO**).

**Stages** (the ``stage`` setting, one family throughout, checkpointed as such): ``"autoencoder"`` trains
the VAE with its N(0, I) prior (the prior chain frozen); ``"prior"`` freezes the VAE and fits the chain to
its latents (the two-stage recipe of LDM); ``"joint"`` trains everything on the whole ELBO (warm-started
from the first stage). :meth:`LatentDiffusion.fit_latent_scale` sets s from the encoder's means.

**Recipes** (:data:`RECIPES`, run by :func:`train_latent_diffusion` through :func:`pvae.inference.train`):
``"two-stage"`` = stage ``"autoencoder"``, then s, then stage ``"prior"``; ``"joint"`` = the same first
stage and s, then stage ``"joint"``. Each stage has its own learning rate and checkpoint.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

import pyro
import pyro.distributions as dist
import torch
from pyro.infer import Trace_ELBO, TraceMeanField_ELBO
from torch import nn

from pvae.checkpoint import load_checkpoint, restore_family
from pvae.checks import check_choice, check_int
from pvae.family import Family, data_plate, register_family
from pvae.inference import History, distributed, train
from pvae.models.ae import FlatPrior
from pvae.models.diffusion import DDPM, forward_chain, reverse_chain
from pvae.models.diffusion.config import TIME_SAMPLING
from pvae.models.vae import ARCHITECTURES, LIKELIHOODS, VAE
from pvae.utils import bits_per_dim

__all__ = [
    "RECIPES",
    "STAGES",
    "LatentDiffusion",
    "LatentDiffusionConfig",
    "LatentDiffusionRun",
    "train_latent_diffusion",
]

OBJECTIVES = ("elbo", "meanfield", "simple")  # of the prior's chain, whose variances are fixed

#: What :meth:`LatentDiffusion.svi_program` trains: the VAE alone, the prior alone, or both.
STAGES = ("autoencoder", "prior", "joint")

#: The training recipes (:func:`train_latent_diffusion`): recipe → the stage its second run trains.
RECIPES = {"two-stage": "prior", "joint": "joint"}

_AUTOENCODER_OBJECTIVES = ("elbo", "meanfield")  # the first stage trains a VAE: an ELBO, never "simple"


@dataclass
class LatentDiffusionConfig:
    """Constructor arguments of :class:`LatentDiffusion` (field for field)."""

    x_dim: int = 784
    z_dim: int = 16
    hidden_dim: int = 400
    architecture: str = "conv"
    likelihood: str = "bernoulli"
    scale: float = 0.1
    timesteps: int = 100
    schedule: str = "linear"
    reverse_variance: str = "beta"
    prior_hidden_dim: int = 512
    prior_blocks: int = 3
    prior_ema_decay: float = 0.0
    time_sampling: str = "per_datum"
    stage: str = "joint"
    name: str | None = None


@register_family("ldm")
class LatentDiffusion(Family):
    """A VAE (:class:`~pvae.models.vae.VAE`, MLP or convolutional) with a DDPM prior over its latent.

    :param x_dim, z_dim, hidden_dim, architecture, likelihood, scale: the VAE's (``autoencoder``).
    :param timesteps, schedule, reverse_variance: the prior chain's (``prior``, a
        :class:`~pvae.models.diffusion.DDPM` over (z_dim,) vectors with the Gaussian decoder).
    :param prior_hidden_dim: width of the prior's MLP denoiser.
    :param prior_blocks: residual blocks of the prior's MLP denoiser.
    :param prior_ema_decay: decay of the exponential moving average of the prior's denoiser, which
        :meth:`sample` and :meth:`elbo` then use (0: off; see :class:`~pvae.models.diffusion.DDPM`).
    :param time_sampling: how the training pair draws timesteps (``"per_datum"`` or ``"plate"``).
    :param stage: what :meth:`svi_program` trains (:data:`STAGES`); change it with :meth:`set_stage`.
    :param name: prefix in Pyro's param store (default: unique).
    """

    config_class = LatentDiffusionConfig

    def __init__(
        self,
        x_dim: int = 784,
        z_dim: int = 16,
        hidden_dim: int = 400,
        architecture: str = "conv",
        likelihood: str = "bernoulli",
        scale: float = 0.1,
        timesteps: int = 100,
        schedule: str = "linear",
        reverse_variance: str = "beta",
        prior_hidden_dim: int = 512,
        prior_blocks: int = 3,
        prior_ema_decay: float = 0.0,
        time_sampling: str = "per_datum",
        stage: str = "joint",
        name: str | None = None,
    ):
        super().__init__(name)
        check_choice("architecture", architecture, ARCHITECTURES)
        check_choice("likelihood", likelihood, LIKELIHOODS)
        check_choice("time_sampling", time_sampling, TIME_SAMPLING)
        check_choice("stage", stage, STAGES)
        self.autoencoder = VAE(
            x_dim=x_dim,
            z_dim=z_dim,
            hidden_dim=hidden_dim,
            likelihood=likelihood,
            scale=scale,
            architecture=architecture,
            name=f"{self.name}.autoencoder",
        )
        self.prior = DDPM(
            data_shape=(z_dim,),
            timesteps=timesteps,
            schedule=schedule,
            reverse_variance=reverse_variance,
            decoder="gaussian",
            ema_decay=prior_ema_decay,
            hidden_dim=check_int("prior_hidden_dim", prior_hidden_dim),
            num_blocks=check_int("prior_blocks", prior_blocks),
            time_sampling=time_sampling,
            name=f"{self.name}.prior",
        )
        self.config = LatentDiffusionConfig(
            x_dim=x_dim,
            z_dim=z_dim,
            hidden_dim=hidden_dim,
            architecture=architecture,
            likelihood=likelihood,
            scale=self.autoencoder.scale,
            timesteps=timesteps,
            schedule=schedule,
            reverse_variance=reverse_variance,
            prior_hidden_dim=prior_hidden_dim,
            prior_blocks=prior_blocks,
            prior_ema_decay=self.prior.ema_decay,
            time_sampling=time_sampling,
            stage=stage,
            name=self.name,
        )
        self.z_dim = z_dim
        # s of u = s·z, the chain's variable: a buffer (saved with the weights), set by fit_latent_scale
        self.register_buffer("latent_scale", torch.ones(()))
        self.set_stage(stage)

    # ---- stages -----------------------------------------------------------------------------------------
    @property
    def stage(self) -> str:
        return self.config.stage

    def set_stage(self, stage: str) -> None:
        """Train ``stage`` from now on (:data:`STAGES`): the other part's parameters are frozen
        (``requires_grad=False``), so optimizers and the training loop leave them as they are."""
        self.config.stage = check_choice("stage", stage, STAGES)
        self.autoencoder.requires_grad_(stage != "prior")
        self.prior.denoiser.requires_grad_(stage != "autoencoder")  # its average (EMA) is never trained

    @torch.no_grad()
    def fit_latent_scale(self, x: torch.Tensor) -> float:
        """Set s = 1/std of the encoder's means μ(x) over ``x`` (all entries), so the chain sees latents of
        unit spread; returns s. Use it between the stages, before the prior is trained."""
        loc, _ = self.autoencoder.encode(x)
        spread = float(loc.std())
        if not math.isfinite(spread) or spread <= 0:
            raise ValueError(f"the encoder's means have spread {spread}: cannot scale latents by it")
        self.latent_scale.fill_(1.0 / spread)
        return 1.0 / spread

    def _register(self) -> None:
        """``pyro.module`` on the trainable parts under the family's name (the average of no part)."""
        parts = {"autoencoder": self.autoencoder, "prior": nn.ModuleDict({"denoiser": self.prior.denoiser})}
        trained = nn.ModuleDict({key: part for key, part in parts.items() if _trainable(part)})
        pyro.module(self.name, trained)

    # ---- the full hierarchy ---------------------------------------------------------------------------
    def model(self, x: torch.Tensor | None = None, num_data: int | None = None) -> None:
        """z_T → … → z_0 by the prior chain, then x | z_0 from the decoder: observed at x (N, x_dim), or
        drawn when x is None (``num_data`` draws from the prior predictive)."""
        if x is not None:
            x = self.autoencoder._prepare(x)
        self._register()
        with data_plate(x, num_data, device=self.device):
            u0 = reverse_chain(self.prior.denoiser, self.prior.schedule, (self.z_dim,), prefix="z")
            self._observe(u0, x)

    def guide(self, x: torch.Tensor, num_data: int | None = None) -> None:
        """z_0 ~ N(s·μ(x), s²·σ²(x)) from the encoder, then the forward process z_0 → z_T."""
        x = self.autoencoder._prepare(x)
        self._register()
        with data_plate(x, num_data):
            u0 = pyro.sample("z_0", self._posterior(x))
            forward_chain(self.prior.schedule, u0, 1, prefix="z")

    def _posterior(self, x: torch.Tensor) -> dist.TorchDistribution:
        loc, scale = self.autoencoder._encode(x)
        return dist.Normal(self.latent_scale * loc, self.latent_scale * scale).to_event(1)

    def _observe(self, u0: torch.Tensor, x: torch.Tensor | None) -> None:
        logits = self.autoencoder.decoder(u0 / self.latent_scale)
        pyro.sample("x", self.autoencoder._likelihood(logits), obs=x)

    # ---- the training pair ----------------------------------------------------------------------------
    def model_subsampled(
        self,
        x: torch.Tensor,
        *,
        weighting: str = "elbo",
        timestep: int | None = None,
        num_data: int | None = None,
    ) -> None:
        """z_0 (flat density), one timestep of the prior chain's terms on it, then x | z_0."""
        x = self.autoencoder._prepare(x)
        self._register()
        with data_plate(x, num_data):
            u0 = pyro.sample("z_0", FlatPrior(x.shape[:1], torch.Size([self.z_dim])))
            self.prior.reverse_terms(u0, timestep=timestep, weighting=weighting, prefix="z")
            self._observe(u0, x)

    def guide_subsampled(
        self,
        x: torch.Tensor,
        *,
        weighting: str = "elbo",
        timestep: int | None = None,
        num_data: int | None = None,
    ) -> None:
        """z_0 ~ q(z_0 | x), then the same timestep's forward terms on it."""
        x = self.autoencoder._prepare(x)
        self._register()
        with data_plate(x, num_data):
            u0 = pyro.sample("z_0", self._posterior(x))
            self.prior.forward_terms(u0, timestep=timestep, weighting=weighting, prefix="z")

    def svi_program(self, objective: str = "elbo"):
        """(model, guide, loss) for ``objective`` (``"elbo"``, ``"meanfield"`` or ``"simple"``) at the
        current :attr:`stage`; in stage ``"autoencoder"`` the VAE's own pair (N(0, I) prior)."""
        check_choice("objective", objective, OBJECTIVES)  # not "hybrid": the prior's variances are fixed
        loss = Trace_ELBO() if objective == "elbo" else TraceMeanField_ELBO()
        if self.stage == "autoencoder":
            if objective == "simple":
                raise ValueError(
                    "objective 'simple' reweighs the prior chain's steps: not for stage 'autoencoder'"
                )
            return self.autoencoder.model, self.autoencoder.guide, loss
        weighting = "simple" if objective == "simple" else "elbo"

        def model(x, num_data=None):
            return self.model_subsampled(x, weighting=weighting, num_data=num_data)

        def guide(x, num_data=None):
            return self.guide_subsampled(x, weighting=weighting, num_data=num_data)

        return model, guide, loss

    # ---- evaluation ------------------------------------------------------------------------------------
    def elbo(self, x: torch.Tensor, *, grad: bool = False, generator: torch.Generator | None = None):
        """Per-datum ELBO of the whole hierarchy, (N,): log p(x | z_0) − log q(z_0 | x) at one draw of z_0
        from the encoder, plus the prior chain's ELBO of that z_0 with all T terms in closed form
        (:meth:`DDPM.elbo`). Unbiased for the bound that Trace_ELBO on model/guide estimates."""
        x = self.autoencoder._prepare(x)
        with torch.set_grad_enabled(grad):
            posterior = self._posterior(x)
            noise = torch.randn(
                posterior.batch_shape + posterior.event_shape,
                generator=generator,
                dtype=x.dtype,
                device=x.device,
            )
            u0 = posterior.base_dist.loc + posterior.base_dist.scale * noise
            logits = self.autoencoder.decoder(u0 / self.latent_scale)
            log_likelihood = self.autoencoder._likelihood(logits).log_prob(x)
            prior = self.prior.elbo(u0, grad=grad, generator=generator)
            return log_likelihood - posterior.log_prob(u0) + prior

    def bits_per_dim(self, x: torch.Tensor, **elbo_kwargs) -> torch.Tensor:
        """−ELBO/(D ln 2) per datum, (N,)."""
        return bits_per_dim(self.elbo(x, **elbo_kwargs), self.config.x_dim)

    # ---- sampling --------------------------------------------------------------------------------------
    @torch.no_grad()
    def sample(
        self,
        n: int,
        mean: bool = True,
        *,
        steps: int | None = None,
        generator: torch.Generator | None = None,
        progress: bool = False,
        return_latents: bool = False,
    ):
        """``n`` digits from the model: the prior chain in latent space (ancestral, or DDIM with ``steps``),
        then the decoder: (n, x_dim), probabilities when ``mean`` (as :meth:`VAE.sample`), else x ~ p(x | z).
        With ``return_latents`` also the chain's (n, z_dim) end z_0 = u_0/s."""
        u0 = self.prior.sample(check_int("n", n), steps=steps, generator=generator, progress=progress)
        z = u0 / self.latent_scale
        x = self.autoencoder.decode(z)
        if not mean:
            if self.autoencoder.likelihood == "bernoulli":
                x = torch.bernoulli(x, generator=generator)
            else:
                x = x + self.autoencoder.scale * torch.randn(
                    x.shape, generator=generator, dtype=x.dtype, device=x.device
                )
        return (x, z) if return_latents else x

    def after_step(self) -> None:
        self.prior.after_step()

    @property
    def device(self) -> torch.device:
        return self.latent_scale.device


def _trainable(module: nn.Module) -> bool:
    return any(parameter.requires_grad for parameter in module.parameters())


# ---- the training recipes ------------------------------------------------------------------------------
@dataclass
class LatentDiffusionRun:
    """The histories of :func:`train_latent_diffusion`'s two stages.

    :param first: stage ``"autoencoder"``'s :class:`~pvae.inference.History` (of a reused finished first
        stage: its saved one); None when the call ran no first stage (``first_epochs=0``, or a resumed
        second stage).
    :param second: the recipe's second stage's; None when ``epochs=0``.
    """

    first: History | None
    second: History | None


def train_latent_diffusion(
    family: LatentDiffusion,
    train_loader,
    test_loader=None,
    *,
    recipe: str = "two-stage",
    first_epochs: int,
    epochs: int,
    lr: float = 1e-3,
    prior_lr: float | None = None,
    lr_end: float | None = None,
    objective: str = "meanfield",
    latent_data: torch.Tensor,
    out: str | os.PathLike | None = None,
    resume: bool = False,
    overwrite: bool = False,
    allow_changes: bool = False,
    seed: int | None = None,
    progress: bool = True,
    metadata: dict | None = None,
    callback=None,
    **options,
) -> LatentDiffusionRun:
    """Train ``family`` by ``recipe`` (:data:`RECIPES`), each stage one :func:`pvae.inference.train` run.

    1. Stage ``"autoencoder"``: ``first_epochs`` epochs of the VAE with its N(0, I) prior at the constant
       rate ``lr``, on ``objective`` (an ELBO: ``"simple"``, which reweighs the chain, trains it as
       ``"meanfield"``). ``first_epochs=0`` takes the autoencoder as it stands (e.g. a copy of another
       run's first stage).
    2. The recipe's stage, and s = 1/spread of the encoder's means over ``latent_data``
       (:meth:`LatentDiffusion.fit_latent_scale`).
    3. That stage for ``epochs`` epochs on ``objective``, the rate going from ``prior_lr`` (default
       ``lr``) to ``lr_end`` (default: constant). ``epochs=0`` stops after step 2, for a caller that
       trains the second stage itself (``pvae train ldm`` does, with its shared training flags).

    With ``out``, the first stage is checkpointed in ``out/autoencoder/checkpoint.pt`` and the second in
    ``out/checkpoint.pt``. With ``resume``: a second stage already saved is continued and the first stage
    left alone (the second's checkpoint holds every weight and s); otherwise a first stage saved with at
    least ``first_epochs`` epochs is reused as it is, a shorter one continued. Under ``torchrun`` every
    process learns from rank 0 what is saved.

    :param family: a :class:`LatentDiffusion`, in any stage.
    :param train_loader, test_loader: as :func:`pvae.inference.train` takes them, for both stages.
    :param latent_data: (N, x_dim) data as the encoder sees it (e.g. a binarized draw of the training
        digits) whose encoder means set s.
    :param overwrite, allow_changes, seed, progress, metadata: :func:`pvae.inference.train`'s, for both
        stages (``seed`` re-seeds each, so a second stage does not depend on how its first stage came to be).
    :param callback: :func:`pvae.inference.train`'s, after every epoch of either stage
        (``family.stage`` says which).
    :param options: further :func:`pvae.inference.train` keywords for both stages (e.g. ``engine``).
    :returns: the :class:`LatentDiffusionRun`.
    """
    stage = RECIPES[check_choice("recipe", recipe, tuple(RECIPES))]
    first_epochs = check_int("first_epochs", first_epochs, low=0)
    epochs = check_int("epochs", epochs, low=0)

    def run(epochs_of_stage: int, checkpoint: str | None, **settings) -> History:
        return train(
            family,
            train_loader,
            test_loader,
            epochs=epochs_of_stage,
            checkpoint=checkpoint,
            resume=resume,
            overwrite=overwrite,
            allow_changes=allow_changes,
            seed=seed,
            progress=progress,
            metadata=metadata,
            callback=callback,
            **settings,
            **options,
        )

    def saved(*folders: str) -> tuple[str | None, bool]:  # a checkpoint under out; found when resuming
        path = None if out is None else os.path.join(out, *folders, "checkpoint.pt")
        found = resume and path is not None and distributed.from_main_process(lambda: os.path.exists(path))
        return path, found

    second_path, second_saved = saved()
    first_path, first_saved = saved("autoencoder")
    first = None
    if first_epochs and not second_saved:
        family.set_stage("autoencoder")  # as the first stage's checkpoint holds it
        if first_saved:
            checkpoint = distributed.from_main_process(lambda: load_checkpoint(first_path))
            if checkpoint["epoch"] >= first_epochs:  # finished: reuse it as it is
                restore_family(family, checkpoint, device=family.device)
                first = History.from_dict(checkpoint["history"] or {})
        if first is None:
            if first_path is not None:
                os.makedirs(os.path.dirname(first_path), exist_ok=True)
            first_objective = objective if objective in _AUTOENCODER_OBJECTIVES else "meanfield"
            first = run(first_epochs, first_path, objective=first_objective, lr=lr)
    family.set_stage(stage)
    if not second_saved:  # a saved second stage restores s with its weights
        family.fit_latent_scale(latent_data)
    second = None
    if epochs:
        second_lr = lr if prior_lr is None else prior_lr
        second = run(epochs, second_path, objective=objective, lr=second_lr, lr_end=lr_end)
    return LatentDiffusionRun(first, second)
