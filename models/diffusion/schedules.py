r"""Noise schedules and the one table of per-timestep coefficients every diffusion formula reads.

With α_t = 1 − β_t, ᾱ_t = ∏_{s≤t} α_s (ᾱ_0 = 1), the table holds, for t = 0 … T (entry 0 stands for
t = 0 and is only read as ᾱ_0 = 1 by DDIM's last step):

============================  ==========================================================================
``beta``, ``alpha``           β_t, α_t
``alpha_bar``                 ᾱ_t; ``log_alpha_bar`` log ᾱ_t; ``one_minus_alpha_bar`` 1 − ᾱ_t (from expm1)
``sqrt_alpha_bar``            √ᾱ_t;  ``sqrt_one_minus_alpha_bar`` √(1 − ᾱ_t): q(x_t | x_0) (DDPM Eq. 4)
``beta_tilde``                β̃_t = (1 − ᾱ_{t−1})/(1 − ᾱ_t)·β_t (Eq. 7), β̃_1 = 0; ``posterior_std`` √β̃_t
``posterior_coef_x0``         √ᾱ_{t−1}β_t/(1 − ᾱ_t), exactly 1 at t = 1 (Eq. 7)
``posterior_coef_xt``         √α_t(1 − ᾱ_{t−1})/(1 − ᾱ_t), exactly 0 at t = 1
``sigma2``, ``sigma``         σ_t², σ_t of p_θ(x_{t−1} | x_t): β_t, or β̃_t for t ≥ 2 (σ_1² = β_1 always);
                              β_t for ``"learned"`` (the fixed variance L_simple's weights assume)
``log_beta``                  log β_t; ``log_beta_tilde_clipped`` log β̃_t with β̃_1 := β̃_2 (β_1 if T = 1):
                              the ends of the learned log-variance (Improved DDPM Eq. 15)
``recip_sqrt_alpha``          1/√α_t;  ``eps_coef`` β_t/(√α_t √(1 − ᾱ_t)): μ_θ (Eq. 11)
``simple_weight``             w_t = eps_coef²/(2σ_t²) in L_{t−1} = w_t‖ε − ε_θ‖² + c_t (per dimension)
``kl_constant``               c_t per dimension: KL(N(0, β̃_t) ‖ N(0, σ_t²)) for t ≥ 2, ½ log(2πσ_1²) at t = 1
============================  ==========================================================================

:class:`DiffusionSchedule` keeps the table in float64 on the CPU (the master) and as buffers in the
module's dtype and device, recomputed from the master whenever the module is moved or cast (so a
float32 → float64 round trip loses nothing). They are not in the state dict: the config rebuilds them.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from pvae.checks import check_choice, check_int
from pvae.models.diffusion.steps import gaussian_kl

__all__ = [
    "MAX_TIMESTEPS",
    "REVERSE_VARIANCES",
    "SCHEDULES",
    "DiffusionSchedule",
    "check_timesteps",
    "coefficient_table",
    "make_betas",
]

SCHEDULES = ("linear", "cosine")
REVERSE_VARIANCES = ("beta", "beta_tilde", "learned")
MAX_BETA = 0.999
COSINE_OFFSET = 0.008
MAX_TIMESTEPS = 100_000  # ten times the longest chains in the literature; keeps per-t tables small


def check_timesteps(timesteps) -> int:
    """``timesteps`` if it is an integer in [1, MAX_TIMESTEPS]; ``ValueError`` naming it otherwise."""
    return check_int("timesteps", timesteps, 1, MAX_TIMESTEPS)


def make_betas(schedule: str, timesteps: int) -> torch.Tensor:
    """β_1 … β_T in float64 on the CPU (the master table every device's copy is made from), shape (T,).

    - ``"linear"``: evenly spaced from 1e-4 to 0.02 at T = 1000 (DDPM §4); for other T both endpoints are
      scaled by 1000/T (Nichol & Dhariwal 2021, App. D) so that ᾱ_T ≈ 0 at any T;
    - ``"cosine"``: ᾱ_t = f(t)/f(0), f(t) = cos²((t/T + s)/(1 + s)·π/2), s = 0.008, β_t = 1 − ᾱ_t/ᾱ_{t−1}
      (Nichol & Dhariwal 2021, Eq. 17).

    Both are clipped at β ≤ 0.999 (the scaled linear endpoints exceed 1 for T < 50).
    """
    check_timesteps(timesteps)
    check_choice("schedule", schedule, SCHEDULES)
    if schedule == "linear":
        scale = 1000.0 / timesteps
        betas = torch.linspace(1e-4 * scale, 0.02 * scale, timesteps, dtype=torch.float64, device="cpu")
    else:  # cosine
        steps = torch.arange(timesteps + 1, dtype=torch.float64, device="cpu") / timesteps
        f = torch.cos((steps + COSINE_OFFSET) / (1 + COSINE_OFFSET) * math.pi / 2) ** 2
        alphas_bar = f / f[0]
        betas = 1 - alphas_bar[1:] / alphas_bar[:-1]
    return betas.clamp(max=MAX_BETA)


def coefficient_table(betas: torch.Tensor, reverse_variance: str = "beta") -> dict[str, torch.Tensor]:
    """Every per-t coefficient (see the module docstring), each of shape (T + 1,), indexed by t.

    :param betas: β_1 … β_T, shape (T,), in (0, 1); float64 recommended (the table is computed in its dtype).
    :param reverse_variance: ``"beta"`` or ``"beta_tilde"``: σ_t² for t ≥ 2; ``"learned"``: the network
        sets it between the two (the table's fixed ``sigma2`` is then β_t).
    """
    check_choice("reverse_variance", reverse_variance, REVERSE_VARIANCES)
    beta = torch.cat([betas.new_zeros(1), betas])  # (T+1,)
    alpha = 1 - beta
    log_alpha_bar = torch.cumsum(torch.log1p(-beta), 0)
    alpha_bar = torch.exp(log_alpha_bar)  # ᾱ_0 = 1
    one_minus_alpha_bar = -torch.expm1(log_alpha_bar)  # accurate for small t
    one_minus_alpha_bar_prev = torch.cat([alpha_bar.new_zeros(1), one_minus_alpha_bar[:-1]])
    alpha_bar_prev = torch.cat([alpha_bar.new_ones(1), alpha_bar[:-1]])
    safe = one_minus_alpha_bar.clone()
    safe[0] = 1.0  # t = 0 entries are never used as divisors; avoid 0/0
    beta_tilde = one_minus_alpha_bar_prev / safe * beta  # (Eq. 7); β̃_1 = 0
    sigma2 = beta_tilde.clone() if reverse_variance == "beta_tilde" else beta.clone()
    sigma2[1] = beta[1]  # the decoder at t = 1 uses β_1 whichever variance is chosen
    sigma2[0] = 1.0
    eps_coef = beta / (torch.sqrt(alpha) * torch.sqrt(safe))
    posterior_coef_x0 = torch.sqrt(alpha_bar_prev) * beta / safe  # (Eq. 7)
    posterior_coef_xt = torch.sqrt(alpha) * one_minus_alpha_bar_prev / safe
    posterior_coef_x0[1], posterior_coef_xt[1] = 1.0, 0.0  # exactly: q(x_0 | x_1, x_0) is the point mass
    kl_constant = torch.zeros_like(beta)
    kl_constant[1] = 0.5 * torch.log(2 * math.pi * sigma2[1])  # the Gaussian decoder's normalizer
    kl_constant[2:] = gaussian_kl(0.0, beta_tilde[2:], 0.0, sigma2[2:])
    beta_tilde_clipped = beta_tilde.clone()
    beta_tilde_clipped[1] = beta_tilde[2] if len(beta) > 2 else beta[1]
    beta_tilde_clipped[0] = 1.0
    log_beta = torch.log(torch.where(beta > 0, beta, torch.ones_like(beta)))
    return {
        "beta": beta,
        "alpha": alpha,
        "alpha_bar": alpha_bar,
        "log_alpha_bar": log_alpha_bar,
        "one_minus_alpha_bar": one_minus_alpha_bar,
        "sqrt_alpha_bar": torch.sqrt(alpha_bar),
        "sqrt_one_minus_alpha_bar": torch.sqrt(one_minus_alpha_bar),
        "beta_tilde": beta_tilde,
        "posterior_std": torch.sqrt(beta_tilde),
        "posterior_coef_x0": posterior_coef_x0,
        "posterior_coef_xt": posterior_coef_xt,
        "sigma2": sigma2,
        "sigma": torch.sqrt(sigma2),
        "recip_sqrt_alpha": 1 / torch.sqrt(alpha),
        "eps_coef": eps_coef,
        "simple_weight": eps_coef**2 / (2 * sigma2),
        "kl_constant": kl_constant,
        "log_beta": log_beta,
        "log_beta_tilde_clipped": torch.log(beta_tilde_clipped),
    }


class DiffusionSchedule(nn.Module):
    """The coefficient table of one noise schedule, looked up by timestep with :meth:`coef`.

    Holds no parameters and nothing in the state dict. Build it with explicit betas or from a named
    schedule (:meth:`named`); a family registers it as a submodule so it follows ``.to()``/``.double()``.

    :param betas: β_1 … β_T, shape (T,), each in (0, 1), 1 ≤ T ≤ MAX_TIMESTEPS.
    :param reverse_variance: σ_t² for t ≥ 2: ``"beta"`` (β_t) or ``"beta_tilde"`` (β̃_t).
    """

    def __init__(self, betas: torch.Tensor, reverse_variance: str = "beta"):
        super().__init__()
        betas = torch.as_tensor(betas, dtype=torch.float64, device="cpu")  # real numbers, even under meta
        if betas.dim() != 1 or not 1 <= betas.shape[0] <= MAX_TIMESTEPS:
            raise ValueError(
                f"betas must be a 1-d tensor of 1 … {MAX_TIMESTEPS} entries, got {tuple(betas.shape)}"
            )
        if not bool(((betas > 0) & (betas < 1)).all()):
            raise ValueError("betas must lie in (0, 1)")
        self.timesteps = int(betas.shape[0])
        self.reverse_variance = reverse_variance
        self._master = coefficient_table(betas, reverse_variance)  # float64 on the CPU, never moved
        self._register(torch.get_default_dtype(), torch.device("cpu"))

    @classmethod
    def named(cls, schedule: str, timesteps: int, reverse_variance: str = "beta") -> DiffusionSchedule:
        """The schedule :func:`make_betas` names (``"linear"`` or ``"cosine"``) with T = ``timesteps``."""
        return cls(make_betas(schedule, timesteps), reverse_variance)

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(self._master)

    def _register(self, dtype: torch.dtype, device: torch.device) -> None:
        for name, table in self._master.items():
            self.register_buffer(name, table.to(device=device, dtype=dtype), persistent=False)
        self.register_buffer("times", torch.arange(self.timesteps + 1, device=device), persistent=False)

    def _apply(self, fn, recurse=True):
        super()._apply(fn, recurse)
        reference = self.beta  # the dtype and device fn gave the buffers
        self._register(reference.dtype, reference.device)
        return self

    def timestep(self, t: int) -> torch.Tensor:
        """t as a 0-d LongTensor on the schedule's device: one timestep for a whole batch."""
        return self.times[t]

    def coef(self, name: str, t: torch.Tensor, like: torch.Tensor, event_dims: int = 0) -> torch.Tensor:
        """The coefficient ``name`` at timesteps ``t``, in ``like``'s dtype, shaped to broadcast over events.

        :param name: a table entry (see the module docstring), e.g. ``"sqrt_alpha_bar"``.
        :param t: LongTensor of timesteps in 0 … T on the schedule's device, shaped like (or broadcastable
            to) the batch dimensions: one value (0-d, or a per-batch draw expanded) or one per datum.
        :param like: a tensor whose dtype the values take.
        :param event_dims: trailing singleton dimensions appended, so the result broadcasts against values
            of shape (*batch, *event) with ``event_dims`` event dimensions.
        :returns: shape ``(*t.shape, *(1,) * event_dims)``.
        """
        table = self._buffers.get(name)
        if table is None or name == "times":
            raise ValueError(f"unknown coefficient {name!r}; the table has {', '.join(self._master)}")
        if table.dtype != like.dtype:
            table = table.to(like.dtype)
        # a gather shaped like t, with no host sync even for a 0-d t (Inductor's decomposition of ``take``
        # indexes with a 0-d t as a Python integer, reading its value on the host)
        values = table.index_select(0, t.reshape(-1)).view(t.shape)
        return values.view(*t.shape, *(1,) * event_dims) if event_dims else values

    def extra_repr(self) -> str:
        return f"timesteps={self.timesteps}, reverse_variance={self.reverse_variance!r}"
