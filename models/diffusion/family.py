r"""The DDPM family (Ho et al. 2020): thin model/guide programs over the chains of :mod:`.chain`.

Sites (inside ``pyro.plate("data", N)``, each with ``.to_event(len(data_shape))``):

- full chain, :meth:`DDPM.model` / :meth:`DDPM.guide` (:func:`.chain.reverse_chain` /
  :func:`.chain.forward_chain`): latent ``"x_T"`` … ``"x_1"`` (e.g. ``"x_1000"``), ``"x_0"`` observed — or,
  with ``model(None, num_data=N)``, sampled from the prior predictive. T network passes per step: for small T;
- time-subsampled pair, :meth:`DDPM.model_subsampled` / :meth:`DDPM.guide_subsampled`
  (:func:`.chain.reverse_pair` / :func:`.chain.forward_pair`): one timestep t per step, drawn by
  ``pyro.plate("time", T, subsample_size=1)`` (Pyro scales by T); ``"x_t"`` ~ q(x_t | x_0) masked in both,
  then ``"x_prev"`` ~ q(x_{t−1} | x_t, x_0) (the point mass at x_0 when t = 1) scored under p_θ(x_{t−1} | x_t)
  (the decoder at t = 1); the constant L_T enters through ``pyro.factor("prior_kl", −L_T)``. Under
  Trace_ELBO its expectation is the full chain's ELBO. With ``time_sampling="per_datum"`` each datum gets
  its own timestep (DDPM's Algorithm 1): u ~ Uniform(0, T) at a masked site ``"t"``, t = ⌊u⌋ + 1, the x_prev
  term scaled by T. Same expectation; one batch covers many timesteps. ``"stratified"`` spreads a batch's
  per-datum draws over T strata; ``"importance"`` draws t with p_t ∝ √E[L_t²] and scales by 1/p_t
  (Improved DDPM, Nichol & Dhariwal 2021: the last :data:`TERM_HISTORY` values of each L_t, kept in the
  buffers ``term_history``/``term_counts`` so a checkpoint resumes the sampler exactly; uniform until
  every t has them, mixed with :data:`UNIFORM_SHARE` of the uniform distribution). All are unbiased for
  the full chain's ELBO.

Objectives (:meth:`DDPM.svi_program`): ``"elbo"`` — the subsampled pair with Trace_ELBO; ``"meanfield"``
— the same pair with TraceMeanField_ELBO (the per-step KL in closed form given x_t: the same ELBO, less
variance); ``"simple"`` — DDPM's L_simple (Eq. 14), E_{t,ε}‖ε − ε_θ(x_t, t)‖², which is **not an ELBO** but a
reweighting of it: L_{t−1} = w_t·E‖ε − ε_θ‖² + c_t with w_t = β_t²/(2σ_t²α_t(1−ᾱ_t)), so the same program
with the x_prev term scaled by 1/(T·w_t) and the constant c_t removed is L_simple (at t = 1 the decoder is
replaced by its Gaussian density, as DDPM does).

Data are in model space: continuous vectors as they are, 8-bit images as pixel/127.5 − 1 ∈ [−1, 1]
(``pvae.data.to_model_space``) with the discretized Gaussian decoder (Eq. 13).
"""

from __future__ import annotations

import contextlib
import functools
import math
from collections.abc import Iterator, Sequence

import pyro
import torch
from pyro import poutine
from pyro.infer import Trace_ELBO, TraceMeanField_ELBO
from torch import nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from pvae.checks import check_int
from pvae.data import check_model_space
from pvae.denoisers import default_denoiser
from pvae.family import Family, data_plate, register_family
from pvae.inference import distributed
from pvae.models.diffusion.chain import (
    TimeDraw,
    elbo_terms,
    forward_chain,
    forward_pair,
    importance_timesteps,
    per_datum_timesteps,
    plate_timesteps,
    prior_kl,
    reverse_chain,
    reverse_pair,
    stratified_timesteps,
)
from pvae.models.diffusion.config import HYBRID_WEIGHT, OBJECTIVES, DDPMConfig, checked_config
from pvae.models.diffusion.sampling import sample_chain
from pvae.models.diffusion.schedules import DiffusionSchedule
from pvae.utils import bits_per_dim, check_finite

__all__ = ["DDPM", "TERM_HISTORY", "UNIFORM_SHARE", "WarmupEMA"]

WEIGHTINGS = ("elbo", "simple", "hybrid")
TERM_HISTORY = 10  # values of each L_t the importance sampler keeps (Improved DDPM's choice)
UNIFORM_SHARE = 0.001  # share of the uniform distribution in the importance sampler's p_t


class WarmupEMA:
    """``multi_avg_fn`` for :class:`torch.optim.swa_utils.AveragedModel`: the EMA of
    :func:`~torch.optim.swa_utils.get_ema_multi_avg_fn` with decay min(decay, (1 + n)/(10 + n)) after n
    averages, so the average follows the weights closely during the first steps. (AveragedModel's first
    update copies the weights.)"""

    def __init__(self, decay: float):
        self.decay = decay

    def __call__(self, averaged, current, num_averaged) -> None:
        n = int(num_averaged)
        get_ema_multi_avg_fn(min(self.decay, (1 + n) / (10 + n)))(averaged, current, num_averaged)


@register_family("ddpm")
class DDPM(Family):
    """Denoising diffusion probabilistic model as a Pyro model/guide pair (see the module docstring).

    :param denoiser: an ε-network ``denoiser(x, t)`` taking x of shape (..., *data_shape) and integer
        timesteps t ∈ {1, …, T} (a LongTensor) broadcastable to its batch dimensions; default:
        :class:`MLPDenoiser` for (D,) data, :class:`UNetDenoiser` for (C, H, W) images
        (``pvae.denoisers``). A checkpoint rebuilds the default network from the config, so a custom
        network must be passed again when loading.
    :param data_shape: shape of one datum in model space, e.g. (2,) or (1, 28, 28).
    :param timesteps: T ≥ 1.
    :param schedule: ``"linear"`` or ``"cosine"`` (see :func:`make_betas`).
    :param reverse_variance: σ_t² for t ≥ 2: ``"beta"`` (β_t) or ``"beta_tilde"`` (β̃_t); ``"learned"``:
        the network predicts (ε, v) and σ_t² = exp(w log β_t + (1 − w) log β̃_t), w = (v + 1)/2, at every t
        (Improved DDPM; trained by the ELBO objectives or ``"hybrid"``). A custom ``denoiser`` then returns
        the pair (see :class:`pvae.denoisers.VarianceHead`).
    :param decoder: p_θ(x_0 | x_1): ``"gaussian"`` (continuous data) or ``"discretized"`` (8-bit images in
        model space, DDPM Eq. 13); default: discretized for (C, H, W) data, Gaussian otherwise.
    :param ema_decay: decay of the exponential moving average of the denoiser's weights, in [0, 1); 0 turns
        it off. Default: 0.999 for images, off for vector data. The average (``torch.optim.swa_utils.
        AveragedModel``, submodule ``ema``, in the state dict, never trained) is updated by
        :meth:`after_step` (the training loop calls it after each optimizer step) and is what
        :meth:`sample` and :meth:`elbo` use once it has been updated.
    :param hidden_dim: width of the default MLP denoiser.
    :param num_blocks: residual blocks of the default MLP denoiser.
    :param channels: channel widths per level of the default U-Net.
    :param time_sampling: how the subsampled pair draws timesteps: ``"plate"`` — one t per call for the
        whole batch, by ``pyro.plate("time", T, subsample_size=1)``; ``"per_datum"`` — one t per datum;
        ``"stratified"`` — one per datum, a batch's spread over T strata; ``"importance"`` — one per datum
        with p_t ∝ √E[L_t²] from the history of the terms (see the module docstring; every step engine
        updates the history after every step, in :meth:`after_step`, from the terms the step publishes).
    :param name: prefix in Pyro's param store (default: unique).
    """

    # its public import path: checkpoints of format 1 name a family by "module:class"
    __module__ = "pvae.models.diffusion"
    config_class = DDPMConfig

    def __init__(
        self,
        denoiser: nn.Module | None = None,
        data_shape: Sequence[int] = (2,),
        timesteps: int = 1000,
        schedule: str = "linear",
        reverse_variance: str = "beta",
        decoder: str | None = None,
        ema_decay: float | None = None,
        hidden_dim: int = 128,
        num_blocks: int = 3,
        channels: Sequence[int] = (32, 64),
        time_sampling: str = "plate",
        name: str | None = None,
    ):
        super().__init__(name)
        self.config = checked_config(
            data_shape,
            timesteps,
            schedule,
            reverse_variance,
            decoder,
            ema_decay,
            hidden_dim,
            num_blocks,
            channels,
            time_sampling,
            self.name,
        )
        self.data_shape = self.config.data_shape
        self.event_dims = len(self.data_shape)
        self.decoder = self.config.decoder
        self.ema_decay = self.config.ema_decay
        if denoiser is None:
            denoiser = default_denoiser(
                self.data_shape,
                timesteps,
                learned_variance=self.learned_variance,
                hidden_dim=hidden_dim,
                num_blocks=num_blocks,
                channels=self.config.channels,
            )
        if not isinstance(denoiser, nn.Module):
            raise ValueError(f"denoiser must be an nn.Module ε_θ(x, t), got {type(denoiser).__name__}")
        self.denoiser = denoiser
        self.schedule = DiffusionSchedule.named(schedule, timesteps, reverse_variance)
        self.ema = None
        if self.ema_decay > 0:
            self.ema = AveragedModel(denoiser, multi_avg_fn=WarmupEMA(self.ema_decay))
            self.ema.requires_grad_(False)  # an average, not a parameter: invisible to optimizers
        self._pending_terms: tuple[torch.Tensor, torch.Tensor] | None = None
        if self.time_sampling == "importance":
            device = self.schedule.sigma.device
            self.register_buffer("term_history", torch.zeros(timesteps, TERM_HISTORY, device=device))
            self.register_buffer("term_counts", torch.zeros(timesteps, dtype=torch.long, device=device))

    @property
    def timesteps(self) -> int:
        """T, the number of diffusion steps (the config's)."""
        return self.config.timesteps

    @property
    def learned_variance(self) -> bool:
        """Whether the network predicts the reverse variances (``reverse_variance="learned"``)."""
        return self.config.reverse_variance == "learned"

    @property
    def time_sampling(self) -> str:
        """How the subsampled pair draws timesteps (the config's)."""
        return self.config.time_sampling

    # ---- schedule entries and EMA state under their earlier names (scripts read them) -----------------
    @property
    def beta(self) -> torch.Tensor:
        """β_t, shape (T + 1,), entry 0 for t = 0 (the schedule's buffer, in the module's dtype)."""
        return self.schedule.beta

    @property
    def alpha_bar(self) -> torch.Tensor:
        return self.schedule.alpha_bar

    @property
    def sqrt_alpha_bar(self) -> torch.Tensor:
        return self.schedule.sqrt_alpha_bar

    @property
    def sqrt_one_minus_alpha_bar(self) -> torch.Tensor:
        return self.schedule.sqrt_one_minus_alpha_bar

    @property
    def ema_denoiser(self) -> nn.Module | None:
        """The averaged denoiser (None when EMA is off)."""
        return None if self.ema is None else self.ema.module

    @property
    def ema_updates(self) -> torch.Tensor:
        """How many times :meth:`after_step` has updated the average (0-d LongTensor)."""
        return (
            torch.zeros((), dtype=torch.long, device=self.device) if self.ema is None else self.ema.n_averaged
        )

    @property
    def device(self) -> torch.device:
        """The device of the family's tensors (read off one buffer: cheaper than scanning them all)."""
        return self.schedule.sigma.device

    # ---- validation ------------------------------------------------------------------------------------
    def _check_data(self, x0: torch.Tensor, name: str = "x0") -> torch.Tensor:
        if x0 is None:
            raise ValueError(f"{name} is required here (only model(None, num_data=N) runs without data)")
        check_finite(name, x0)
        if x0.dim() != 1 + self.event_dims or tuple(x0.shape[1:]) != self.data_shape:
            raise ValueError(
                f"{name} must have shape (N, {', '.join(map(str, self.data_shape))}) with N ≥ 1 to match "
                f"data_shape={self.data_shape}, got {tuple(x0.shape)}"
            )
        if x0.shape[0] == 0:
            raise ValueError(
                f"{name} is an empty batch, shape {tuple(x0.shape)}: a batch needs at least one datum"
            )
        if x0.device != self.device:
            raise ValueError(f"{name} is on {x0.device} but the model is on {self.device}; move one")
        if self.decoder == "discretized":
            check_model_space(name, x0)
        return x0

    def _check_timestep(self, timestep) -> int:
        return check_int("timestep", timestep, 1, self.timesteps)

    @staticmethod
    def _check_weighting(weighting: str) -> None:
        if weighting not in WEIGHTINGS:
            raise ValueError(f"weighting must be one of {WEIGHTINGS}, got {weighting!r}")

    def _register_networks(self) -> None:
        """``pyro.module`` on every child but the average, under the family's name: the param-store names
        are "<name>$$$<state-dict key>", as for a family registered whole, and the average stays out."""
        trained = nn.ModuleDict({key: child for key, child in self.named_children() if key != "ema"})
        pyro.module(self.name, trained)

    # ---- full chain ------------------------------------------------------------------------------------
    def model(self, x0: torch.Tensor | None = None, num_data: int | None = None) -> torch.Tensor:
        """Reverse chain: x_T ~ N(0, I), x_{t−1} ~ N(μ_θ(x_t, t), σ_t² I) at sites ``"x_{t}"``, then ``"x_0"``
        under the decoder — observed at x0 (N, *data_shape), or drawn when x0 is None (``num_data`` draws
        from the prior predictive). Returns x_0."""
        if x0 is not None:
            x0 = self._check_data(x0)
        self._register_networks()
        with data_plate(x0, num_data, device=self.device):
            return reverse_chain(self.denoiser, self.schedule, self.data_shape, obs=x0, decoder=self.decoder)

    def guide(self, x0: torch.Tensor, num_data: int | None = None) -> None:
        """Forward posterior chain: x_T ~ q(x_T | x_0), x_{t−1} ~ q(x_{t−1} | x_t, x_0) for t = T … 2.

        The forward process has no parameters, so the guide registers none (the model registers the
        denoiser with ``pyro.module``).
        """
        x0 = self._check_data(x0)
        with data_plate(x0, num_data, device=self.device):
            forward_chain(self.schedule, x0, self.event_dims)

    # ---- time-subsampled pair --------------------------------------------------------------------------
    @contextlib.contextmanager
    def _timesteps(self, x0: torch.Tensor, timestep: int | None) -> Iterator[TimeDraw]:
        """The time sampler of ``time_sampling`` (or the fixed ``timestep``, still scaled by T)."""
        if timestep is not None:
            self._check_timestep(timestep)
        if self.time_sampling == "plate":
            subsample = None if timestep is None else torch.tensor([timestep - 1], device=x0.device)
            with plate_timesteps(self.timesteps, device=x0.device, subsample=subsample) as draw:
                yield draw
        elif timestep is not None:
            yield TimeDraw(self.schedule.timestep(timestep), float(self.timesteps))
        elif self.time_sampling == "per_datum":
            yield per_datum_timesteps(self.timesteps, like=x0)
        elif self.time_sampling == "stratified":
            yield stratified_timesteps(self.timesteps, like=x0)
        else:
            yield importance_timesteps(self.timestep_probs(), like=x0)

    # ---- the importance sampler's history --------------------------------------------------------------
    def timestep_probs(self) -> torch.Tensor:
        """p_t, t = 1 … T, shape (T,): the time sampler's probabilities. For ``"importance"``:
        p_t ∝ √(mean of the last :data:`TERM_HISTORY` values of L_t²), mixed with :data:`UNIFORM_SHARE` of
        the uniform distribution, and uniform until every t has its history; otherwise uniform."""
        uniform = torch.full((self.timesteps,), 1.0 / self.timesteps, device=self.device)
        if self.time_sampling != "importance":
            return uniform
        # no branch on the history's values: a recorded training step reads them as they change
        weights = self.term_history.square().mean(1).sqrt()
        total = weights.sum()
        ready = (self.term_counts >= TERM_HISTORY).all() & torch.isfinite(total) & (total > 0)
        mixed = (1 - UNIFORM_SHARE) * weights / torch.where(ready, total, 1.0) + UNIFORM_SHARE * uniform
        return torch.where(ready, mixed, uniform)

    @torch.no_grad()
    def record_terms(self, t: torch.Tensor, terms: torch.Tensor) -> None:
        """Add observed values of the terms L_{t−1} (one per entry of ``t``, in 1 … T) to the importance
        sampler's history, keeping the last :data:`TERM_HISTORY` of each t (in the order given)."""
        index = (t.reshape(-1) - 1).long()
        values = terms.reshape(-1).to(self.term_history.dtype)
        index, order = torch.sort(index, stable=True)
        values = values[order]
        in_batch = torch.bincount(index, minlength=self.timesteps)
        first = torch.cumsum(in_batch, 0) - in_batch
        occurrence = torch.arange(len(index), device=index.device) - first[index]
        keep = occurrence >= in_batch[index] - TERM_HISTORY  # the last TERM_HISTORY of each t
        slot = (self.term_counts[index] + occurrence) % TERM_HISTORY
        self.term_history[index[keep], slot[keep]] = values[keep]
        self.term_counts += in_batch

    def _observe_terms(self, t: torch.Tensor, terms: torch.Tensor) -> None:
        """Keep a training step's terms for :meth:`after_step` (called through
        :func:`pvae.inference.recorder.publish`, so a recorded step delivers them too)."""
        self._pending_terms = (t.reshape(-1), terms.reshape(-1))

    def _term_scale(self, draw: TimeDraw, weighting: str, x0: torch.Tensor):
        """Scale of the x_prev term (model *and* guide): the sampler's for the ELBO, divided by T·w_t for
        L_simple (and the L_simple part of the hybrid objective)."""
        if weighting == "elbo":
            return draw.scale
        return draw.scale / (self.timesteps * self.schedule.coef("simple_weight", draw.t, x0))

    def _vlb_scale(self, draw: TimeDraw, weighting: str):
        """Scale of the hybrid objective's ELBO term (λ times the sampler's), None for the others."""
        return HYBRID_WEIGHT * draw.scale if weighting == "hybrid" else None

    def model_subsampled(
        self,
        x0: torch.Tensor,
        *,
        timestep: int | None = None,
        weighting: str = "elbo",
        num_data: int | None = None,
    ) -> None:
        """One timestep of the reverse chain per call, scaled by T (see the module docstring).

        :param x0: (N, *data_shape) in model space.
        :param timestep: use this t ∈ {1, …, T} instead of a uniform draw (still scaled by T).
        :param weighting: ``"elbo"`` (the ELBO) or ``"simple"`` (L_simple, DDPM Eq. 14 — not an ELBO; exact
            under TraceMeanField_ELBO, which evaluates the per-step KL in closed form).
        :param num_data: size of the data set x0 is a batch of (default len(x0)).
        """
        x0 = self._check_data(x0)
        self._check_weighting(weighting)
        self._register_networks()
        with data_plate(x0, num_data, device=self.device):
            self.reverse_terms(x0, timestep=timestep, weighting=weighting)

    def reverse_terms(
        self, x0: torch.Tensor, *, timestep: int | None = None, weighting: str = "elbo", prefix: str = "x"
    ) -> None:
        """The model half of the time-subsampled pair as a sub-program on x0 (N, *data_shape), inside the
        caller's plates: −L_T, one timestep's ``f"{prefix}_t"`` and ``f"{prefix}_prev"`` terms (scaled by
        the time sampler) and, for ``"simple"``, its constant. Registers no parameters (the caller does).
        A larger model whose latent's prior is this chain calls it on the latent (with ``prefix="z"``)."""
        self._check_weighting(weighting)
        if weighting == "elbo":
            pyro.factor("prior_kl", -prior_kl(self.schedule, x0, self.event_dims))  # −L_T, constant in θ
        with self._timesteps(x0, timestep) as draw:
            scale = self._term_scale(draw, weighting, x0)
            decoder = self.decoder
            if weighting in ("simple", "hybrid"):
                # (−L_{t−1} + c_t)/(T w_t) per draw of t: T·that = −‖ε − ε_θ‖² (the plate scales by T)
                constant = math.prod(self.data_shape) * self.schedule.coef("kl_constant", draw.t, x0)
                with poutine.scale(scale=scale):
                    pyro.factor("kl_constant", constant)
                decoder = "gaussian"  # L_simple replaces the decoder by its Gaussian density
            observe = self.training and timestep is None and self.time_sampling == "importance"
            reverse_pair(
                self.denoiser,
                self.schedule,
                x0,
                draw.t,
                self.event_dims,
                scale=scale,
                decoder=decoder,
                prefix=prefix,
                fixed_variance=weighting != "elbo",
                vlb=None if weighting != "hybrid" else (self._vlb_scale(draw, weighting), self.decoder),
                on_term=self._observe_terms if observe else None,
            )

    def guide_subsampled(
        self,
        x0: torch.Tensor,
        *,
        timestep: int | None = None,
        weighting: str = "elbo",
        num_data: int | None = None,
    ) -> None:
        """t ~ Uniform{1, …, T} (time plate, or per datum), x_t ~ q(x_t | x_0) (masked),
        x_{t−1} ~ q(x_{t−1} | x_t, x_0).

        ``weighting`` must match the model's: with ``"simple"`` the x_prev term is rescaled here too, since
        an ELBO estimator weighs log p − log q of a site by the site's scale (TraceMeanField_ELBO takes the
        guide's).
        """
        x0 = self._check_data(x0)
        self._check_weighting(weighting)
        with data_plate(x0, num_data, device=self.device):  # no parameters here: pyro.module is the model's
            self.forward_terms(x0, timestep=timestep, weighting=weighting)

    def forward_terms(
        self, x0: torch.Tensor, *, timestep: int | None = None, weighting: str = "elbo", prefix: str = "x"
    ) -> None:
        """The guide half of :meth:`reverse_terms`, inside the caller's plates: the same timestep draw,
        ``f"{prefix}_t"`` ~ q(x_t | x_0) (masked) and ``f"{prefix}_prev"`` ~ q(x_{t−1} | x_t, x_0)."""
        self._check_weighting(weighting)
        with self._timesteps(x0, timestep) as draw:
            scale = self._term_scale(draw, weighting, x0)
            vlb_scale = self._vlb_scale(draw, weighting)
            forward_pair(
                self.schedule, x0, draw.t, self.event_dims, scale=scale, prefix=prefix, vlb_scale=vlb_scale
            )

    def svi_program(self, objective: str = "elbo"):
        """(model, guide, loss) to train with SVI for ``objective``:

        - ``"elbo"``: the time-subsampled pair with ``Trace_ELBO`` — an unbiased estimate of the ELBO;
        - ``"meanfield"``: the same pair with ``TraceMeanField_ELBO`` (the KL of x_prev in closed form
          given x_t: the same ELBO, lower variance);
        - ``"simple"``: DDPM's L_simple = E_{t,ε}‖ε − ε_θ(x_t, t)‖² (Eq. 14), summed over data and dims.
          A reweighted objective, **not** an ELBO: the per-t ELBO term divided by T·w_t, constants removed.
          It does not train learned variances (refused for ``reverse_variance="learned"``);
        - ``"hybrid"``: Improved DDPM's L_simple + λ·L_vlb (λ = :data:`HYBRID_WEIGHT`), the ELBO term under
          the learned variances with the mean's gradient stopped (a second site ``"x_prev_vlb"`` from the
          same q): L_simple trains the mean, L_vlb the variances. Not an ELBO; needs learned variances.

        The ELBO weighs step t by w_t = β_t²/(2σ_t²α_t(1−ᾱ_t)). The cosine schedule clips β_T to 0.999, so
        w_T ≈ 1/(2α_T) = 500 per dimension dwarfs the other steps: train the ELBO objectives on the linear
        schedule (``"simple"``, all weights 1, is fine with both).
        """
        if objective == "elbo":
            return self.model_subsampled, self.guide_subsampled, Trace_ELBO()
        if objective == "meanfield":
            return self.model_subsampled, self.guide_subsampled, TraceMeanField_ELBO()
        if objective in ("simple", "hybrid"):
            if (objective == "simple") == self.learned_variance:
                raise ValueError(
                    "objective 'simple' does not train learned variances: use 'hybrid', 'elbo' or 'meanfield'"
                    if self.learned_variance
                    else "objective 'hybrid' trains learned variances: build the DDPM with "
                    "reverse_variance='learned'"
                )
            model = functools.partial(self.model_subsampled, weighting=objective)
            guide = functools.partial(self.guide_subsampled, weighting=objective)
            return model, guide, TraceMeanField_ELBO()
        raise ValueError(f"objective must be one of {OBJECTIVES}, got {objective!r}")

    # ---- EMA -------------------------------------------------------------------------------------------
    @torch.no_grad()
    def after_step(self) -> None:
        """After an optimizer step: add the step's terms to the importance sampler's history (gathered from
        every process, in rank order, when training is distributed), and update the EMA of the denoiser's
        weights (no-op when ``ema_decay`` is 0): the first update copies them, the (n + 1)-th sets
        ema ← d·ema + (1 − d)·θ with d = min(ema_decay, (1 + n)/(10 + n))."""
        if self._pending_terms is not None:
            t, terms = self._pending_terms
            self._pending_terms = None
            rows = distributed.all_gather_rows(torch.stack([t.to(torch.float64), terms.to(torch.float64)], 1))
            self.record_terms(rows[:, 0].round().long(), rows[:, 1])
        if self.ema is not None:
            self.ema.update_parameters(self.denoiser)

    def _network(self, use_ema: bool | None) -> nn.Module:
        if use_ema is None:
            use_ema = self.ema is not None and int(self.ema.n_averaged) > 0
        if use_ema and self.ema is None:
            raise ValueError("use_ema=True needs a model built with ema_decay > 0")
        return self.ema.module if use_ema else self.denoiser

    # ---- evaluation ------------------------------------------------------------------------------------
    def prior_kl(self, x0: torch.Tensor) -> torch.Tensor:
        """L_T = KL(q(x_T | x_0) ‖ N(0, I)) = ½ Σ_i (ᾱ_T (x_0,i² − 1) − log(1 − ᾱ_T)), shape (N,)."""
        return prior_kl(self.schedule, x0, self.event_dims)

    def elbo(
        self,
        x0: torch.Tensor,
        *,
        use_ema: bool | None = None,
        grad: bool = False,
        generator: torch.Generator | None = None,
        return_terms: bool = False,
        progress: bool = False,
    ):
        """Per-datum ELBO with every one of the T terms evaluated (DDPM Eq. 5), shape (N,).

        ELBO = −L_T − Σ_{t=2}^T KL(q(x_{t−1} | x_t, x_0) ‖ p_θ(x_{t−1} | x_t)) + log p_θ(x_0 | x_1), with the
        KLs and L_T in closed form and one draw x_t ~ q(x_t | x_0) per t and datum (the network is not
        linear, so the expectation over x_t is a single-sample estimate, unbiased). Batched over t
        (:func:`~pvae.models.diffusion.chain.elbo_terms`).

        :param x0: (N, *data_shape) in model space.
        :param use_ema: evaluate the EMA weights (default: when EMA is on and has been updated).
        :param grad: keep the autograd graph (default: evaluate under ``torch.no_grad``).
        :param generator: torch generator for the draws (on x0's device).
        :param return_terms: also return ``{"prior": (N,), "kl": (T − 1, N) for t = 2 … T, "decoder": (N,)}``
            with prior = L_T, kl[t − 2] = L_{t−1}, decoder = −L_0 = log p_θ(x_0 | x_1).
        :param progress: progress bar over chunks of timesteps.
        :returns: the ELBO (N,), or (ELBO, terms).
        """
        x0 = self._check_data(x0)
        network = self._network(use_ema)
        with torch.set_grad_enabled(grad):
            prior = self.prior_kl(x0)  # (N,)
            terms = elbo_terms(
                network,
                self.schedule,
                x0,
                self.event_dims,
                decoder=self.decoder,
                generator=generator,
                progress=progress,
            )  # (T, N), t = 1 first
            elbo = -prior - terms.sum(0)
        if return_terms:
            return elbo, {"prior": prior, "kl": terms[1:], "decoder": -terms[0]}
        return elbo

    def bits_per_dim(self, x0: torch.Tensor, **elbo_kwargs) -> torch.Tensor:
        """−ELBO/(D ln 2) per datum, shape (N,): an upper bound on the code length in bits per dimension.

        With the discretized decoder the ELBO bounds the log *probability* of the 8-bit data, so this is in
        bits per dim of the 8-bit data (as DDPM reports); with the Gaussian decoder it is −log density in
        model space, per dim, in bits. ``elbo_kwargs`` go to :meth:`elbo`.
        """
        return bits_per_dim(self.elbo(x0, **elbo_kwargs), math.prod(self.data_shape))

    # ---- sampling --------------------------------------------------------------------------------------
    @torch.no_grad()
    def sample(
        self,
        num_samples: int,
        *,
        steps: int | None = None,
        eta: float | None = None,
        return_chain: bool = False,
        chain_length: int = 10,
        batch_size: int | None = None,
        clip_denoised: bool = False,
        use_ema: bool | None = None,
        generator: torch.Generator | None = None,
        progress: bool = True,
    ):
        """Draw samples x_0 from the model, on its device, in model space: (num_samples, *data_shape).

        Default: ancestral sampling through the reverse chain (DDPM Algorithm 2), x_T ~ N(0, I),
        x_{t−1} = μ_θ(x_t, t) + σ_t z, returning μ_θ(x_1, 1) (the decoder's mean) at the end. With ``steps``
        or ``eta`` given: DDIM (Song et al. 2021, Eq. 12) on ``steps`` evenly spaced timesteps, noise scale
        η (0: deterministic; 1: ancestral-like).

        :param num_samples: number of samples n ≥ 1.
        :param steps: DDIM steps, 1 … T (default T).
        :param eta: DDIM η ≥ 0 (default 0).
        :param return_chain: also return ``chain_length`` intermediate states (a :class:`SampleChain`).
        :param chain_length: number of recorded states (x_T and x_0 included), ≥ 2.
        :param batch_size: samples per network call (default all).
        :param clip_denoised: clip the implied x̂_0 = (x_t − √(1−ᾱ_t) ε_θ)/√ᾱ_t to [−1, 1] and step with
            the posterior mean μ̃_t(x_t, x̂_0) (equal to μ_θ without clipping); for image data.
        :param use_ema: use the EMA weights (default: when EMA is on and has been updated).
        :param generator: torch generator for the noise (on the model's device).
        :param progress: progress bar over timesteps (on stderr, only when it is a terminal).
        """
        return sample_chain(
            self._network(use_ema),
            self.schedule,
            num_samples,
            self.data_shape,
            steps=steps,
            eta=eta,
            return_chain=return_chain,
            chain_length=chain_length,
            batch_size=batch_size,
            clip_denoised=clip_denoised,
            generator=generator,
            progress=progress,
        )
