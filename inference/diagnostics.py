r"""Did the guide work? Three checks of a guide against its model, for any model/guide pair.

- :func:`sbc`: simulation-based calibration (Talts et al. 2018). Draw θ̃ ~ p(θ) and y ~ p(y | θ̃) from the
  model's prior predictive, then θ_1..M ~ q(θ | y) from the guide; the rank #{m : θ_m < θ̃} is uniform on
  {0, …, M} for every simulation when q is calibrated. Uniformity is tested with a χ² test on binned ranks
  (:func:`rank_chi_square`) and shown as an ECDF-difference plot with a simultaneous confidence band
  (Säilynoja, Bürkner & Vehtari 2022; :func:`ecdf_band`).
- :func:`pareto_khat`: the PSIS tail index k̂ (Vehtari et al. 2024; Yao et al. 2018) of the importance
  weights log w = log p(x, z) − log q(z | x), z ~ q, one per datum (:func:`psis_khat`).
- :func:`inference_gaps`: the decomposition of Cremer, Li & Duvenaud (2018),
  log p(x) − ELBO(q_φ) = [log p(x) − ELBO(q*)] + [ELBO(q*) − ELBO(q_φ)] (approximation + amortization gap),
  with q* the guide's own distribution family fitted to each datum separately.

Everything works on the contract of :mod:`pvae.family`: data points in ``pyro.plate("data", N)``,
``model(x=None, num_data=N)`` drawing from the prior predictive, ``guide(x)``. The importance weights are
those of :func:`pvae.inference.log_weights`; nothing here knows a concrete family.

Reading k̂ (Vehtari et al. 2024, "Pareto smoothed importance sampling"): below 0.5 the importance weights
have a finite variance and the guide is a good proposal; 0.5–0.7 usable; above 0.7 the weights' tail is too
heavy for importance sampling (and the guide is a poor approximation of the posterior). With S draws, the
sample-size-aware bound is min(1 − 1/log₁₀ S, 0.7) (:func:`khat_threshold`).
"""

from __future__ import annotations

import contextlib
import json
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import pyro
import pyro.distributions as dist
import pyro.poutine as poutine
import torch
from pyro.infer import Trace_ELBO
from pyro.poutine.util import prune_subsample_sites

from pvae.checks import check_int, check_positive, check_probability
from pvae.distributions import TruncatedNormal
from pvae.inference._weights import _vectorize, checked_plate_nesting, guess_max_plate_nesting
from pvae.inference.evidence import log_weights
from pvae.inference.svi import scheduled_lr

__all__ = [
    "KHAT_GOOD",
    "KHAT_MIN_SAMPLES",
    "KHAT_UNRELIABLE",
    "ECDFBand",
    "InferenceGaps",
    "SBCResult",
    "ecdf_band",
    "inference_gaps",
    "khat_threshold",
    "pareto_khat",
    "psis_khat",
    "rank_chi_square",
    "sbc",
]

#: k̂ below this: the importance weights have a finite variance; the guide is a good proposal.
KHAT_GOOD = 0.5
#: k̂ above this: importance sampling with the guide is unreliable (0.5–0.7: usable).
KHAT_UNRELIABLE = 0.7
#: Fewest draws per datum for which k̂ is computed: the PSIS tail then holds at least 10 weights.
KHAT_MIN_SAMPLES = 50
# Chunk of data fitted at once by the vectorized Pareto fit (its work array is 40 × tail × chunk).
_KHAT_CHUNK = 256


# ---- PSIS k̂ ------------------------------------------------------------------------------------------------
def khat_threshold(num_samples: int) -> float:
    """The sample-size-aware k̂ bound min(1 − 1/log₁₀ S, 0.7) of Vehtari et al. (2024): above it, S draws
    are too few for a reliable importance-sampling estimate.

    :param num_samples: S, the draws per datum, ≥ 2.
    """
    num_samples = check_int("num_samples", num_samples, low=2)
    return min(1.0 - 1.0 / math.log10(num_samples), KHAT_UNRELIABLE)


def _tail_size(num_samples: int) -> int:
    """M = ⌈min(S/5, 3√S)⌉, the number of largest weights the PSIS tail fit uses."""
    return math.ceil(min(0.2 * num_samples, 3.0 * math.sqrt(num_samples)))


def _fit_generalized_pareto(exceedances: torch.Tensor) -> torch.Tensor:
    """Shape k of a generalized Pareto distribution fitted to each column of ``exceedances``.

    The estimator of Zhang & Stephens (2009), in the variant of PSIS (Vehtari et al. 2024),
    as ``pyro.ops.stats.fit_generalized_pareto`` computes it for one sample, here for many at once:
    a grid of m = 30 + ⌊√n⌋ values of b = k/σ, each weighted by its profile likelihood, then
    k = mean log(1 − b̂ x) and the weakly informative prior k ← (n k + 10 · 0.5)/(n + 10).

    :param exceedances: (n, B) float64, each column sorted ascending, the largest entry > 0 and the entry
        at ⌊n/4 + 0.5⌋ (1-based) > 0.
    :returns: (B,) shapes.
    """
    n = exceedances.shape[0]
    m = 30 + int(math.sqrt(n))
    j = torch.arange(1, m + 1, dtype=exceedances.dtype, device=exceedances.device)  # (m,)
    grid = 1.0 - math.sqrt(m) / (j - 0.5).sqrt()  # (m,)
    quartile = exceedances[int(n / 4 - 0.5)]  # (B,)
    b = grid.unsqueeze(-1) / (3.0 * quartile) + 1.0 / exceedances[-1]  # (m, B)
    k = torch.log1p(-b.unsqueeze(1) * exceedances).mean(1)  # (m, B)
    profile = n * (torch.log(-b / k) - (k + 1.0))  # (m, B)
    weights = torch.softmax(profile, dim=0)  # (m, B)
    weights = torch.where(weights > 1e-30, weights, torch.zeros_like(weights))
    weights = weights / weights.sum(0)
    b_hat = (b * weights).sum(0)  # (B,)
    k_hat = torch.log1p(-b_hat * exceedances).mean(0)  # (B,)
    return k_hat * n / (n + 10.0) + 5.0 / (n + 10.0)


def psis_khat(log_weights: torch.Tensor) -> torch.Tensor:
    r"""PSIS k̂ of each column of log importance weights: the shape of a generalized Pareto distribution
    fitted to the M = ⌈min(S/5, 3√S)⌉ largest weights above the (M+1)-th largest (Vehtari et al. 2024, the
    tail rule of ``pyro.infer.importance.psis_diagnostic``), vectorized over columns.

    Thresholds: k̂ < 0.5 good, 0.5–0.7 usable, > 0.7 unreliable (:data:`KHAT_GOOD`,
    :data:`KHAT_UNRELIABLE`; sample-size aware: :func:`khat_threshold`).

    Weights without a tail get k̂ = −∞, the best case: constant weights (a guide equal to the posterior),
    weights whose M + 1 largest differ by less than √ε of the dtype on the log scale (rounding), or weights
    of which a quarter of the tail ties with the cutoff (a discrete guide's finitely many values). A column
    whose largest weight is +∞ gets +∞; one with a NaN, or no positive weight, gets NaN.

    :param log_weights: (S, N) or (S,) log weights, S ≥ :data:`KHAT_MIN_SAMPLES` draws per column.
    :returns: (N,) (or 0-d) tensor of k̂ in the dtype and on the device of ``log_weights``.
    """
    if not isinstance(log_weights, torch.Tensor) or not log_weights.is_floating_point():
        raise ValueError(
            f"log_weights must be a floating tensor of shape (S, N), got {type(log_weights).__name__}"
        )
    if log_weights.dim() not in (1, 2):
        raise ValueError(f"log_weights must have shape (S, N) or (S,), got {tuple(log_weights.shape)}")
    num_samples = log_weights.shape[0]
    if num_samples < KHAT_MIN_SAMPLES:
        raise ValueError(
            f"log_weights must hold at least {KHAT_MIN_SAMPLES} draws per column (a tail of 10 weights), "
            f"got {num_samples}"
        )
    columns = log_weights.reshape(num_samples, -1)  # (S, N)
    tolerance = math.sqrt(torch.finfo(log_weights.dtype).eps)
    size = _tail_size(num_samples)
    largest = columns.double().transpose(0, 1).topk(size + 1, dim=-1).values  # (N, M+1) descending
    ordered = largest.flip(-1).transpose(0, 1)  # (M+1, N) ascending
    top = ordered[-1]  # (N,)
    tail = ordered[1:]  # (M, N)
    cutoff = ordered[0]  # (N,)
    finite = torch.isfinite(top)
    shifted_top = torch.where(finite, top, torch.zeros_like(top))
    exceedances = (tail - shifted_top).exp() - (cutoff - shifted_top).exp()  # (M, N), in [0, 1)
    exceedances = torch.where(finite, exceedances, torch.ones_like(exceedances))
    quartile = exceedances[int(size / 4 - 0.5)]
    flat = ~((top - cutoff > tolerance) & (quartile > 0))  # no tail: bounded weights
    fittable = finite & ~flat
    khat = torch.full_like(top, -math.inf)
    index = fittable.nonzero().squeeze(-1)
    for start in range(0, index.numel(), _KHAT_CHUNK):
        chunk = index[start : start + _KHAT_CHUNK]
        khat[chunk] = _fit_generalized_pareto(exceedances[:, chunk])
    khat = torch.where(top == math.inf, torch.full_like(khat, math.inf), khat)
    broken = columns.isnan().any(0) | (top == -math.inf)
    khat = torch.where(broken, torch.full_like(khat, math.nan), khat)
    return khat.to(log_weights.dtype).reshape(log_weights.shape[1:])


def pareto_khat(
    model,
    guide,
    *args,
    num_samples: int = 1000,
    particles_per_batch: int | None = None,
    **kwargs,
) -> torch.Tensor:
    r"""PSIS k̂ per datum of the importance weights log w = log p(x_n, z) − log q(z | x_n), z ~ q.

    k̂ < 0.5: good (the weights have a finite variance); 0.5–0.7: usable; > 0.7: unreliable; with S draws
    the bound min(1 − 1/log₁₀ S, 0.7) (:func:`khat_threshold`) applies. A guide equal to the posterior has
    constant weights and gets k̂ = −∞ (see :func:`psis_khat`). For a guide q whose tails are too light, e.g.
    a Gaussian of scale s·σ for a Gaussian posterior of scale σ (s < 1), the weights have tail index
    k = 1 − s².

    :param model: Pyro model; data points in ``pyro.plate("data", N)``.
    :param guide: Pyro guide with the same latent sites.
    :param args: the data and any other arguments of model and guide.
    :param num_samples: S, draws per datum, ≥ :data:`KHAT_MIN_SAMPLES`.
    :param particles_per_batch: draws made at once (default ``min(num_samples, 100)``), to bound memory.
    :param kwargs: passed to model and guide.
    :returns: (N,) tensor of k̂, one per datum of the ``"data"`` plate (global latents' terms spread evenly
        over the data, as in :func:`pvae.inference.log_weights`).
    """
    num_samples = check_int("num_samples", num_samples, low=KHAT_MIN_SAMPLES)
    weights = log_weights(
        model, guide, *args, num_samples=num_samples, particles_per_batch=particles_per_batch, **kwargs
    )  # (S, N)
    return psis_khat(weights)


# ---- simulation-based calibration -----------------------------------------------------------------------
def _check_ranks(ranks, num_posterior_samples: int) -> None:
    """``ValueError`` unless ``ranks`` is a non-empty integer tensor with entries in [0, M]."""
    if not isinstance(ranks, torch.Tensor) or ranks.is_floating_point() or ranks.is_complex():
        raise ValueError(f"ranks must be an integer tensor, got {getattr(ranks, 'dtype', type(ranks))}")
    if ranks.numel() == 0:
        raise ValueError("ranks must hold at least one rank, got an empty tensor")
    if ranks.min() < 0 or ranks.max() > num_posterior_samples:
        raise ValueError(f"ranks must lie in [0, {num_posterior_samples}] (M = num_posterior_samples)")


def _default_bins(num_posterior_samples: int, count: int) -> int:
    """min(20, M + 1) bins, fewer when ``count`` ranks would expect under 5 per bin (at least 2)."""
    return max(2, min(20, num_posterior_samples + 1, count // 5))


def _bin_of_rank(num_ranks: int, bins: int, like: torch.Tensor) -> torch.Tensor:
    """Bin of each rank 0..R−1 when R ranks go into ``bins`` nearly equal bins: ⌊r·B/R⌋, (R,)."""
    ranks = torch.arange(num_ranks, device=like.device)
    return torch.div(ranks * bins, num_ranks, rounding_mode="floor")


def rank_chi_square(
    ranks: torch.Tensor, num_posterior_samples: int, bins: int | None = None
) -> tuple[float, float]:
    """χ² test that ranks are uniform on {0, …, M}: (statistic, p-value).

    The ranks (pooled over all entries of ``ranks``) are binned into ``bins`` groups of consecutive
    values, each expected to hold its share of the M + 1 values (equal when B divides M + 1, as Talts et
    al. recommend); the statistic Σ (O − E)²/E has B − 1 degrees of freedom and the p-value is the upper
    regularized incomplete gamma function Q((B − 1)/2, χ²/2).

    :param ranks: integer tensor of ranks in [0, M], any shape.
    :param num_posterior_samples: M.
    :param bins: B in [2, M + 1]; default min(20, M + 1), fewer when the ranks are too few for 5 expected
        per bin.
    """
    num_posterior_samples = check_int("num_posterior_samples", num_posterior_samples)
    _check_ranks(ranks, num_posterior_samples)
    num_ranks = num_posterior_samples + 1
    count = ranks.numel()
    if bins is None:
        bins = _default_bins(num_posterior_samples, count)
    bins = check_int("bins", bins, low=2, high=num_ranks)
    bin_of = _bin_of_rank(num_ranks, bins, ranks)  # (M+1,)
    observed = torch.bincount(bin_of[ranks.reshape(-1).long()], minlength=bins).double()  # (B,)
    expected = torch.bincount(bin_of, minlength=bins).double() * (count / num_ranks)  # (B,)
    statistic = ((observed - expected) ** 2 / expected).sum()
    degrees = statistic.new_tensor((bins - 1) / 2.0)
    p_value = torch.special.gammaincc(degrees, statistic / 2.0)
    return statistic.item(), p_value.item()


@dataclass
class ECDFBand:
    """The ECDF of SBC ranks minus the uniform CDF, with a simultaneous confidence band, at K points.

    ``fractional_ranks`` z_j = (j + 1)/(M + 1) for rank thresholds j; ``ecdf_difference`` is
    #{ranks ≤ j}/L − z_j; ``lower``/``upper`` bound it with joint probability ``level`` for L independent
    uniform ranks; ``inside`` says whether the whole curve lies in the band. All tensors are (K,).
    """

    fractional_ranks: torch.Tensor
    ecdf_difference: torch.Tensor
    lower: torch.Tensor
    upper: torch.Tensor
    level: float
    inside: bool
    num_ranks: int

    def draw_band(self, axis) -> None:
        """Shade the simultaneous band on a matplotlib ``axis`` (x: the fractional ranks)."""
        axis.fill_between(
            self.fractional_ranks.cpu().numpy(),
            self.lower.cpu().numpy(),
            self.upper.cpu().numpy(),
            step="mid",
            color="tab:grey",
            alpha=0.3,
            label=f"{self.level:.0%} simultaneous band",
        )


def _binomial_cdf(total: int, probability: float, like: torch.Tensor) -> torch.Tensor:
    """P(X ≤ k) for k = 0..n, X ~ Binomial(n, p), as an (n+1,) float64 tensor."""
    k = torch.arange(total + 1, dtype=torch.float64, device=like.device)
    log_pmf = (
        math.lgamma(total + 1)
        - torch.lgamma(k + 1)
        - torch.lgamma(total - k + 1)
        + k * math.log(probability)
        + (total - k) * math.log1p(-probability)
    )
    return torch.cumsum(log_pmf.exp(), 0).clamp(max=1.0)


def ecdf_band(
    ranks: torch.Tensor,
    num_posterior_samples: int,
    level: float = 0.95,
    num_points: int = 100,
    num_band_simulations: int = 1000,
    seed: int = 0,
) -> ECDFBand:
    """ECDF difference of SBC ranks with a simultaneous ``level`` band (Säilynoja, Bürkner & Vehtari 2022).

    At K rank thresholds j (all of 0..M−1, or ``num_points`` evenly spread ones), the count #{r ≤ j} of L
    independent uniform ranks is Binomial(L, z_j) with z_j = (j + 1)/(M + 1). The band is the binomial
    interval [F⁻¹(γ/2), F⁻¹(1 − γ/2)] at every point, with γ chosen by simulation (the paper's simulation
    method) so that all K counts of uniform ranks fall inside their intervals together with probability
    ``level``: γ is the (1 − level) quantile, over ``num_band_simulations`` simulated rank sets, of the
    smallest two-sided binomial tail probability along the curve. The simulated counts come from a
    generator seeded with ``seed``, so the caller's random stream is untouched.

    :param ranks: integer ranks in [0, M], any shape (pooled: L = ranks.numel()).
    :param num_posterior_samples: M.
    :param level: joint coverage, in (0, 1).
    :param num_points: largest K, ≥ 1.
    :param num_band_simulations: rank sets simulated to calibrate γ, ≥ 100.
    :param seed: seed of the band's own generator, ≥ 0.
    """
    num_posterior_samples = check_int("num_posterior_samples", num_posterior_samples)
    level = check_probability("level", level, include_one=False)
    if level <= 0:
        raise ValueError(f"level must be a number in (0, 1), got {level!r}")
    num_points = check_int("num_points", num_points)
    num_band_simulations = check_int("num_band_simulations", num_band_simulations, low=100)
    seed = check_int("seed", seed, low=0)
    _check_ranks(ranks, num_posterior_samples)
    total = ranks.numel()
    device = ranks.device
    points = min(num_points, num_posterior_samples)
    thresholds = torch.linspace(0, num_posterior_samples - 1, points, device=device)
    thresholds = thresholds.round().long().unique()  # (K,) rank thresholds j
    fractions = (thresholds + 1).double() / (num_posterior_samples + 1)  # (K,) z_j
    counts = (ranks.reshape(-1, 1) <= thresholds).sum(0)  # (K,)

    # counts of simulated uniform rank sets at the thresholds: one multinomial draw over the K + 1 groups
    # between thresholds, made as a chain of binomials (remaining count, conditional probability)
    generator = torch.Generator(device=device)
    generator.manual_seed(seed)
    remaining = torch.full((num_band_simulations,), float(total), dtype=torch.float64, device=device)
    simulated = []  # K tensors of (num_band_simulations,) cumulative counts
    cumulative = torch.zeros_like(remaining)
    previous = 0.0
    for fraction in fractions.tolist():
        share = (fraction - previous) / (1.0 - previous) if previous < 1.0 else 1.0
        drawn = torch.binomial(remaining, torch.full_like(remaining, min(share, 1.0)), generator=generator)
        cumulative = cumulative + drawn
        remaining = remaining - drawn
        simulated.append(cumulative)
        previous = fraction

    smallest_tail = torch.ones_like(remaining)  # (num_band_simulations,)
    tables = []
    for index, fraction in enumerate(fractions.tolist()):
        table = _binomial_cdf(total, fraction, fractions)  # (L+1,)
        tables.append(table)
        count = simulated[index].long()
        below = table[count]
        above = 1.0 - torch.where(count > 0, table[(count - 1).clamp(min=0)], torch.zeros_like(below))
        smallest_tail = torch.minimum(smallest_tail, (2.0 * torch.minimum(below, above)).clamp(max=1.0))
    gamma = torch.quantile(smallest_tail, 1.0 - level).item()
    lower = torch.stack([torch.searchsorted(table, table.new_tensor(gamma / 2.0)) for table in tables])
    upper = torch.stack([torch.searchsorted(table, table.new_tensor(1.0 - gamma / 2.0)) for table in tables])
    lower, upper = lower.clamp(max=total), upper.clamp(max=total)
    inside = bool(((counts >= lower) & (counts <= upper)).all())
    return ECDFBand(
        fractional_ranks=fractions,
        ecdf_difference=counts.double() / total - fractions,
        lower=lower.double() / total - fractions,
        upper=upper.double() / total - fractions,
        level=level,
        inside=inside,
        num_ranks=total,
    )


@dataclass
class SBCResult:
    """Result of :func:`sbc`: plain data.

    ``ranks[site]`` is an int64 tensor (num_simulations, *site_shape): the rank of the prior draw θ̃ among
    the guide's M draws, per entry of the site (its plates and event dims). ``chi_square[site]`` and
    ``p_values[site]`` are the χ² test of uniformity on the ranks of all the site's entries pooled
    (:func:`rank_chi_square` with ``bins`` bins; :meth:`ecdf_band` pools them too). Pooling treats the
    entries as independent, as they are for one scalar latent per datum with no global latent above it;
    for a site whose entries are dependent (a global latent, or the coordinates of one datum's vector),
    test one entry at a time, e.g. ``rank_chi_square(ranks[site][:, i], M)``.
    """

    ranks: dict[str, torch.Tensor] = field(repr=False)
    chi_square: dict[str, float]
    p_values: dict[str, float]
    num_simulations: int
    num_posterior_samples: int
    num_data: int
    thinning: int
    bins: int
    data_site: str

    @property
    def sites(self) -> list[str]:
        """The latent sites checked, in the model's order."""
        return list(self.ranks)

    def ecdf_band(self, site: str, level: float = 0.95, **kwargs) -> ECDFBand:
        """:func:`ecdf_band` of ``site``'s pooled ranks (``kwargs`` go to it)."""
        return ecdf_band(self.ranks[self._site(site)], self.num_posterior_samples, level=level, **kwargs)

    def _site(self, site: str) -> str:
        if site not in self.ranks:
            raise ValueError(f"site must be one of the checked latent sites {self.sites}, got {site!r}")
        return site

    def table(self) -> str:
        """One line per site: its p-value and χ² statistic."""
        lines = [
            f"SBC: {self.num_simulations} simulations of {self.num_data} data, "
            f"M = {self.num_posterior_samples} guide draws (thinning {self.thinning}), χ² on {self.bins} bins"
        ]
        width = max(len(site) for site in self.sites)
        for site in self.sites:
            lines.append(
                f"  {site.ljust(width)}  p = {self.p_values[site]:.3g}  χ² = {self.chi_square[site]:.4g}"
                f"  ({self.ranks[site].numel()} ranks)"
            )
        return "\n".join(lines)

    def to_dict(self) -> dict:
        """JSON-ready: settings, χ² statistics, p-values and the ranks as nested lists."""
        out = {
            "num_simulations": self.num_simulations,
            "num_posterior_samples": self.num_posterior_samples,
            "num_data": self.num_data,
            "thinning": self.thinning,
            "bins": self.bins,
            "data_site": self.data_site,
            "chi_square": dict(self.chi_square),
            "p_values": dict(self.p_values),
            "ranks": {site: ranks.tolist() for site, ranks in self.ranks.items()},
        }
        json.dumps(out)
        return out

    def plot(self, path: str, level: float = 0.95, max_panels: int = 9) -> str:
        """ECDF-difference plot per site with its simultaneous ``level`` band; writes a PNG, returns ``path``.

        A calibrated guide keeps the curve inside the band. A guide too narrow leaves the prior draw in the
        tails of its draws too often (ranks pile up at both ends): the curve bulges above 0, symmetrically;
        one too wide bulges below 0; a biased guide piles ranks at one end, a bulge whose peak lies off
        the centre.
        """
        from pvae.plots import _check_path, _panel_grid, _save_figure

        path = _check_path(path)
        max_panels = check_int("max_panels", max_panels)
        sites = self.sites[:max_panels]
        figure, axes = _panel_grid(len(sites))
        for site, axis in zip(sites, axes):
            band = self.ecdf_band(site, level=level)
            fractions = band.fractional_ranks.cpu().numpy()
            band.draw_band(axis)
            difference = band.ecdf_difference.cpu().numpy()
            axis.step(fractions, difference, where="mid", color="tab:blue", label="ranks")
            axis.axhline(0.0, color="k", linewidth=0.6)
            axis.set_xlim(0.0, 1.0)
            axis.set_xlabel("fractional rank")
            axis.set_ylabel("ECDF − uniform")
            axis.set_title(f"site {site!r}: χ² p = {self.p_values[site]:.2g}", fontsize=9)
        axes[0].legend(fontsize=8, loc="best")
        figure.suptitle(
            f"SBC: {self.num_simulations} simulations × {self.num_data} data, "
            f"M = {self.num_posterior_samples}",
            fontsize=10,
        )
        figure.tight_layout()
        return _save_figure(figure, path)


@contextlib.contextmanager
def _seeded(seed: int | None):
    """Run a block on torch's generators seeded with ``seed`` and restore them afterwards (None: as is)."""
    if seed is None:
        yield
        return
    devices = list(range(torch.cuda.device_count())) if torch.cuda.is_available() else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def _prior_predictive(model, num_data: int) -> poutine.Trace:
    with poutine.block():
        return poutine.trace(model).get_trace(None, num_data=num_data)


def _latent_names(trace: poutine.Trace) -> list[str]:
    """The sampled (not observed) sites of a trace, in order, plates' subsample sites left out."""
    trace = prune_subsample_sites(trace)
    return [
        name for name, site in trace.nodes.items() if site["type"] == "sample" and not site["is_observed"]
    ]


def _rank(draws: torch.Tensor, truth: torch.Tensor) -> torch.Tensor:
    """#{m : θ_m < θ̃} plus a uniform share of the ties #{m : θ_m = θ̃}, per entry: (S, *shape) → shape."""
    less = (draws < truth).sum(0)
    ties = (draws == truth).sum(0)
    extra = torch.floor(torch.rand(ties.shape, dtype=torch.float64, device=ties.device) * (ties + 1))
    return less + extra.long()


def sbc(
    model,
    guide,
    *,
    num_simulations: int = 200,
    num_posterior_samples: int = 99,
    num_data: int = 1,
    thinning: int = 1,
    bins: int | None = None,
    data_site: str | None = None,
    seed: int | None = None,
) -> SBCResult:
    r"""Simulation-based calibration of ``guide`` for ``model`` (Talts et al. 2018).

    For each of L simulations: θ̃, y ~ p(θ) p(y | θ) from ``model(None, num_data=N)``; M draws θ_1..M from
    ``guide(y)`` (vectorized in one particle plate; with ``thinning`` t, M·t draws of which every t-th is
    kept); per latent entry the rank #{m : θ_m < θ̃} ∈ {0, …, M}, ties (discrete sites) broken uniformly at
    random. A calibrated guide, q(θ | y) = p(θ | y), makes every rank uniform.

    :param model: Pyro model following ``model(x=None, num_data=N)``: with x None it samples every latent
        and the data from its prior predictive. A model that cannot (an improper, e.g. flat, prior) raises
        ``ValueError``.
    :param guide: Pyro guide ``guide(x)`` sampling the model's latent sites (all of them but the data).
    :param num_simulations: L, ≥ 1.
    :param num_posterior_samples: M, guide draws per simulation, ≥ 1 (M + 1 a multiple of the bins is best).
    :param num_data: N, data points per simulated data set, ≥ 1.
    :param thinning: keep every t-th of M·t guide draws, ≥ 1 (for guides whose successive draws are
        correlated; independent draws need none).
    :param bins: χ² bins, in [2, M + 1] (default: see :func:`rank_chi_square`).
    :param data_site: the model's site holding the data (default: its last sampled site, the observation).
    :param seed: run on torch's generators seeded with this (≥ 0), leaving the caller's stream as it was;
        None draws from the caller's stream.
    :returns: :class:`SBCResult`.
    """
    num_simulations = check_int("num_simulations", num_simulations)
    num_posterior_samples = check_int("num_posterior_samples", num_posterior_samples)
    num_data = check_int("num_data", num_data)
    thinning = check_int("thinning", thinning)
    if bins is not None:
        bins = check_int("bins", bins, low=2, high=num_posterior_samples + 1)
    if seed is not None:
        seed = check_int("seed", seed, low=0)
    if data_site is not None and not isinstance(data_site, str):
        raise ValueError(f"data_site must be a site name (str) or None, got {data_site!r}")
    num_draws = num_posterior_samples * thinning

    with _seeded(seed), torch.no_grad():
        try:
            prior = _prior_predictive(model, num_data)
        except Exception as error:
            raise ValueError(
                f"sbc draws from the prior predictive, and model(None, num_data={num_data}) failed "
                f"({type(error).__name__}: {_first_line(error)}); accepted is a model with a proper prior "
                "whose model(x=None, num_data=N) samples every latent and the data (a flat or other "
                "improper prior cannot be sampled, so such a model cannot be calibrated by simulation)"
            ) from error
        sampled = _latent_names(prior)
        if data_site is None:
            if not sampled:
                raise ValueError("model(None, num_data=N) sampled no site: it drew no data to calibrate on")
            data_site = sampled[-1]
        elif data_site not in sampled:
            raise ValueError(
                f"data_site must be one of the sites model(None, num_data=N) samples, {sampled}, got "
                f"{data_site!r}"
            )
        latents = [name for name in sampled if name != data_site]
        if not latents:
            raise ValueError(
                f"the model samples only its data site {data_site!r}: there is no latent site to calibrate"
            )
        data = prior.nodes[data_site]["value"]
        with poutine.block():
            guide_sites = _latent_names(poutine.trace(guide).get_trace(data))
        missing = [name for name in latents if name not in guide_sites]
        if missing or data_site in guide_sites:
            raise ValueError(
                f"the guide samples {guide_sites}, the model's latent sites are {latents} with data at "
                f"{data_site!r}: every latent site needs a guide draw (pass data_site= if the data site is "
                "not the model's last sampled site)"
            )
        nesting = guess_max_plate_nesting(model, guide, (data,), {})
        draw = _vectorize(guide, num_draws, -(nesting + 1))

        ranks: dict[str, list[torch.Tensor]] = {name: [] for name in latents}
        for simulation in range(num_simulations):
            if simulation > 0:
                prior = _prior_predictive(model, num_data)
                data = prior.nodes[data_site]["value"]
            with poutine.block():
                draws = poutine.trace(draw).get_trace(data)
            for name in latents:
                truth = prior.nodes[name]["value"]
                values = draws.nodes[name]["value"]
                if values.numel() != num_draws * truth.numel():
                    raise ValueError(
                        f"site {name!r}: the guide's draws have shape {tuple(values.shape[1:])} per "
                        f"particle, the prior's {tuple(truth.shape)}; guide and model must agree on its shape"
                    )
                kept = values.reshape(num_draws, *truth.shape)[::thinning]  # (M, *shape)
                ranks[name].append(_rank(kept, truth))

    stacked = {name: torch.stack(values) for name, values in ranks.items()}  # (L, *shape)
    if bins is None:  # one number of bins for every site, set by the site with the fewest ranks
        bins = _default_bins(num_posterior_samples, min(value.numel() for value in stacked.values()))
    tests = {name: rank_chi_square(value, num_posterior_samples, bins) for name, value in stacked.items()}
    return SBCResult(
        ranks=stacked,
        chi_square={name: statistic for name, (statistic, _) in tests.items()},
        p_values={name: p_value for name, (_, p_value) in tests.items()},
        num_simulations=num_simulations,
        num_posterior_samples=num_posterior_samples,
        num_data=num_data,
        thinning=thinning,
        bins=bins,
        data_site=data_site,
    )


# ---- approximation and amortization gaps ----------------------------------------------------------------
#: The local fit's step size decays geometrically from ``lr`` to ``lr`` times this at the last step.
LOCAL_LR_DECAY = 0.01

# Location–scale families the default local guide refits per datum: (torch class, constructor).
_LOCATION_SCALE = (
    (torch.distributions.Normal, dist.Normal),
    (torch.distributions.LogNormal, dist.LogNormal),
    (torch.distributions.Laplace, dist.Laplace),
)


def _family_of(base) -> Callable | None:
    """A constructor (loc, scale) → distribution of ``base``'s family, its other arguments kept, or None."""
    if isinstance(base, TruncatedNormal):
        low, high = base.low, base.high
        return lambda loc, scale: TruncatedNormal(loc, scale, low=low, high=high)
    for torch_class, constructor in _LOCATION_SCALE:
        if isinstance(base, torch_class):
            return constructor
    return None


class _PathDerivative(dist.TorchDistribution):
    """A distribution drawn from ``live`` (reparameterized) and scored by ``frozen``: the same distribution
    with its parameters detached.

    Values and densities are those of ``live``; only gradients differ. Under Trace_ELBO the parameters then
    reach the loss through the draws alone, the path-derivative ("sticking the landing") estimator of
    Roeder, Wu & Duvenaud (2017): unbiased, and with zero variance where q equals the posterior.
    """

    arg_constraints: dict = {}
    has_rsample = True

    def __init__(self, live, frozen):
        self.live, self.frozen = live, frozen
        # the wrapper has no parameters of its own to check; live and frozen keep their own validation
        # (frozen.log_prob checks every value against the support)
        super().__init__(live.batch_shape, live.event_shape, validate_args=False)

    @property
    def support(self):
        return self.live.support

    def rsample(self, sample_shape=()):
        return self.live.rsample(sample_shape)

    def log_prob(self, value):
        return self.frozen.log_prob(value)

    def expand(self, batch_shape, _instance=None):
        return _PathDerivative(self.live.expand(batch_shape), self.frozen.expand(batch_shape))


@dataclass
class _LocalSite:
    name: str
    family: Callable
    loc: torch.Tensor  # (*batch, *event), a leaf
    log_scale: torch.Tensor  # (*batch, *event), a leaf
    event_dims: int
    frames: list


class _LocalGuide:
    """q*: at every latent site of a guide, the same location–scale family with a free loc and log-scale
    per entry (per datum), started at the guide's own values for the data; mean-field across sites."""

    def __init__(self, sites: list[_LocalSite]):
        self.sites = sites

    def parameters(self) -> list[torch.Tensor]:
        return [tensor for site in self.sites for tensor in (site.loc, site.log_scale)]

    def __call__(self, *args, **kwargs) -> None:
        for site in self.sites:
            with contextlib.ExitStack() as plates:
                for frame in site.frames:
                    plates.enter_context(pyro.plate(frame.name, frame.size, dim=frame.dim))
                live = site.family(site.loc, site.log_scale.exp())
                frozen = site.family(site.loc.detach(), site.log_scale.detach().exp())
                pyro.sample(site.name, _PathDerivative(live, frozen).to_event(site.event_dims))


_ACCEPTED_FAMILIES = "Normal, LogNormal, Laplace or pvae's TruncatedNormal (also inside .to_event/.expand)"


def _default_local_guide(guide, args, kwargs) -> _LocalGuide:
    """The guide's family with per-datum parameters, warm-started at the guide's output for ``args``."""
    with torch.no_grad(), poutine.block():
        trace = poutine.trace(guide).get_trace(*args, **kwargs)
    sites = []
    for name in _latent_names(trace):
        node = trace.nodes[name]
        fn = node["fn"]
        base = fn
        while isinstance(base, dist.Independent | dist.ExpandedDistribution):
            base = base.base_dist
        family = _family_of(base)
        if family is None:
            raise ValueError(
                f"local_guide is needed: the default refits per datum guide sites drawn from "
                f"{_ACCEPTED_FAMILIES}, and site {name!r} is drawn from {type(base).__name__}; pass "
                "local_guide=, a guide of that family with per-datum parameters (pyro.param)"
            )
        frames = [frame for frame in node["cond_indep_stack"] if frame.vectorized]
        if any(frame.full_size is not None and frame.full_size != frame.size for frame in frames):
            raise ValueError(
                f"local_guide is needed: site {name!r} lies in a subsampled plate, whose per-datum "
                "parameters the default cannot index; pass local_guide= (or the full data)"
            )
        shape = fn.batch_shape + fn.event_shape
        loc = base.loc.detach().expand(shape).clone().requires_grad_(True)
        log_scale = base.scale.detach().log().expand(shape).clone().requires_grad_(True)
        sites.append(_LocalSite(name, family, loc, log_scale, len(fn.event_shape), frames))
    if not sites:
        raise ValueError("the guide samples no latent site: there is no gap to measure")
    return _LocalGuide(sites)


def _local_parameters(local_guide, args, kwargs) -> list[torch.Tensor]:
    """The unconstrained tensors behind the ``pyro.param`` sites of a user's local guide."""
    with poutine.block(), poutine.trace(param_only=True) as capture:
        local_guide(*args, **kwargs)
    parameters = [site["value"].unconstrained() for site in capture.trace.nodes.values()]
    if not parameters:
        raise ValueError(
            "local_guide has no parameters to fit: it must register its per-datum parameters with pyro.param "
            "(or be a PyroModule)"
        )
    return parameters


def _fit_local(
    model, local_guide, parameters, args, kwargs, num_steps, lr, num_particles, nesting
) -> list[float]:
    """Maximize the ELBO of ``local_guide`` by SVI (Trace_ELBO, Adam) over ``parameters`` only.

    Gradients go to those tensors alone (``torch.autograd.grad``): the model's parameters are neither
    updated nor given ``.grad``. The step size decays from ``lr`` to ``lr·LOCAL_LR_DECAY``
    (:func:`pvae.inference.scheduled_lr`).
    """
    elbo = Trace_ELBO(
        num_particles=num_particles, vectorize_particles=num_particles > 1, max_plate_nesting=nesting
    )
    optimizer = torch.optim.Adam(parameters, lr=lr)
    losses = []
    for step in range(num_steps):
        for group in optimizer.param_groups:
            group["lr"] = scheduled_lr(lr, lr * LOCAL_LR_DECAY, step, num_steps)
        loss = elbo.differentiable_loss(model, local_guide, *args, **kwargs)
        value = loss.item()
        if not math.isfinite(value):
            raise FloatingPointError(
                f"the per-datum fit's loss became {value} at step {step}; try a smaller lr (got {lr})"
            )
        gradients = torch.autograd.grad(loss, parameters)
        for parameter, gradient in zip(parameters, gradients):
            parameter.grad = gradient
        optimizer.step()
        losses.append(value)
    for parameter in parameters:
        parameter.grad = None
    return losses


def _mean_and_stderr(values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-datum Monte-Carlo mean and standard error of (S, N) draws: two (N,) tensors."""
    return values.mean(0), values.std(0, unbiased=True) / math.sqrt(values.shape[0])


def _iwae_and_stderr(log_w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """log (1/S Σ w) per datum, and its delta-method standard error √(1/ESS − 1/S): two (N,) tensors."""
    num_samples = log_w.shape[0]
    total = torch.logsumexp(log_w, 0)
    inverse_ess = torch.exp(torch.logsumexp(2 * log_w, 0) - 2 * total)  # Σ w² / (Σ w)²
    return total - math.log(num_samples), (inverse_ess - 1.0 / num_samples).clamp(min=0).sqrt()


_GAP_KEYS = (
    "log_marginal",
    "elbo_amortized",
    "elbo_optimal",
    "inference_gap",
    "approximation_gap",
    "amortization_gap",
)


def _summary(per_datum: dict[str, torch.Tensor]) -> dict[str, float]:
    """Each quantity's mean over the N data and its standard error √(Σ_n se_n²) / N (the per-datum
    estimates are independent), from the (N,) per-datum values and standard errors."""
    num_data = per_datum[_GAP_KEYS[0]].shape[0]
    summary = {}
    for key in _GAP_KEYS:
        summary[key] = per_datum[key].mean().item()
        summary[f"{key}_stderr"] = (per_datum[f"{key}_stderr"].pow(2).sum().sqrt() / num_data).item()
    return summary


@dataclass
class InferenceGaps:
    """Result of :func:`inference_gaps`: means over the data of each quantity, with standard errors.

    ``per_datum`` holds (N,) tensors under the names of the fields (``"elbo_optimal"``, …) and their
    standard errors (``"elbo_optimal_stderr"``, …). ``inference_gap = log_marginal − elbo_amortized`` is the
    sum of ``approximation_gap = log_marginal − elbo_optimal`` and ``amortization_gap = elbo_optimal −
    elbo_amortized``. Standard errors are Monte-Carlo errors of the estimates (independent estimates
    combined in quadrature); they do not include the error of an unconverged per-datum fit, which
    understates ``elbo_optimal`` (``losses`` shows the fit). ``log_marginal_exact`` says whether
    ``log_marginal`` is exact or the importance-weighted estimate with the guide.
    """

    log_marginal: float
    log_marginal_stderr: float
    log_marginal_exact: bool
    elbo_amortized: float
    elbo_amortized_stderr: float
    elbo_optimal: float
    elbo_optimal_stderr: float
    inference_gap: float
    inference_gap_stderr: float
    approximation_gap: float
    approximation_gap_stderr: float
    amortization_gap: float
    amortization_gap_stderr: float
    num_samples: int
    num_steps: int
    losses: list[float] = field(repr=False)
    per_datum: dict[str, torch.Tensor] = field(repr=False)

    @classmethod
    def concatenate(cls, results: Sequence[InferenceGaps]) -> InferenceGaps:
        """One result over the data of all ``results`` in order, e.g. of :func:`inference_gaps` run on
        chunks of the data: the per-datum values joined, each mean and standard error recomputed over all
        N data as :func:`inference_gaps` computes them (not averaged over the results), and the per-datum
        fit's loss at each step summed over the results (the loss of all data: it sums over the data).

        :param results: one or more results with the same ``num_samples``, ``num_steps``,
            ``log_marginal_exact``, number of losses and per-datum quantities.
        :raises ValueError: for no results, anything but InferenceGaps, or results that differ in those.
        """
        results = list(results)
        if not results or not all(isinstance(result, InferenceGaps) for result in results):
            raise ValueError(
                "InferenceGaps.concatenate needs a non-empty sequence of InferenceGaps, got "
                f"{[type(result).__name__ for result in results]}"
            )
        first = results[0]
        for index, result in enumerate(results[1:], start=1):
            for name in ("num_samples", "num_steps", "log_marginal_exact"):
                ours, theirs = getattr(result, name), getattr(first, name)
                if ours != theirs:
                    raise ValueError(
                        f"InferenceGaps.concatenate: results[{index}].{name} is {ours!r} but "
                        f"results[0].{name} is {theirs!r}; only results of the same settings join"
                    )
            if len(result.losses) != len(first.losses) or set(result.per_datum) != set(first.per_datum):
                raise ValueError(
                    f"InferenceGaps.concatenate: results[{index}] has {len(result.losses)} losses and "
                    f"per-datum {sorted(result.per_datum)}, results[0] {len(first.losses)} and "
                    f"{sorted(first.per_datum)}"
                )
        per_datum = {key: torch.cat([result.per_datum[key] for result in results]) for key in first.per_datum}
        return cls(
            **_summary(per_datum),
            log_marginal_exact=first.log_marginal_exact,
            num_samples=first.num_samples,
            num_steps=first.num_steps,
            losses=[sum(step) for step in zip(*(result.losses for result in results))],
            per_datum=per_datum,
        )

    def table(self, digits: int = 4) -> str:
        """Mean ± standard error of each quantity, one per line (``digits`` significant digits)."""
        width = max(len(key) for key in _GAP_KEYS)
        lines = [
            f"{key.ljust(width)}  {getattr(self, key):.{digits}g} ± {getattr(self, key + '_stderr'):.2g}"
            for key in _GAP_KEYS
        ]
        note = "exact" if self.log_marginal_exact else f"IWAE estimate, k={self.num_samples}"
        lines.append(
            f"(means over {self.per_datum['elbo_optimal'].shape[0]} data; log p(x): {note}; "
            f"q* fitted in {self.num_steps} steps)"
        )
        return "\n".join(lines)

    def to_dict(self) -> dict:
        """JSON-ready: the means, standard errors, settings, the fit's losses and per-datum lists."""
        out = {
            key: getattr(self, key)
            for key in (
                *(name for key in _GAP_KEYS for name in (key, key + "_stderr")),
                "log_marginal_exact",
                "num_samples",
                "num_steps",
                "losses",
            )
        }
        out["per_datum"] = {key: value.tolist() for key, value in self.per_datum.items()}
        json.dumps(out)
        return out


def inference_gaps(
    model,
    guide,
    *args,
    num_samples: int = 5000,
    local_guide=None,
    log_marginal: Callable | None = None,
    num_steps: int = 1000,
    lr: float = 0.05,
    num_particles: int = 8,
    particles_per_batch: int | None = None,
    **kwargs,
) -> InferenceGaps:
    r"""Split the inference gap of an amortized guide into approximation and amortization gaps.

    Cremer, Li & Duvenaud (2018), per datum x_n of the ``"data"`` plate:

    .. math::
        \underbrace{\log p(x) - \mathcal L[q_\phi]}_{\text{inference gap}}
        = \underbrace{\log p(x) - \mathcal L[q^*]}_{\text{approximation gap}}
        + \underbrace{\mathcal L[q^*] - \mathcal L[q_\phi]}_{\text{amortization gap}},

    with q_φ(z | x) the guide, and q* the best member of the guide's own distribution family for each datum
    separately. q* is found by SVI (Trace_ELBO with ``num_particles`` vectorized particles, Adam over
    ``num_steps`` steps, step size decaying from ``lr`` to ``lr·LOCAL_LR_DECAY``), all data at once: one
    batched local guide whose parameters are per datum, so the fit equals N separate fits. By default the
    local guide has, at every latent site, the guide's family there (Normal, LogNormal, Laplace or
    TruncatedNormal, also inside ``.to_event``/``.expand``) with a free loc and scale per entry,
    initialized at the guide's output for the data (a warm start: q* starts at q_φ). Sites are fitted
    independently of each other (mean-field across sites), which is the guide's family when its sites do
    not condition on one another's draws.

    Each ELBO is the mean of ``num_samples`` log importance weights (:func:`pvae.inference.log_weights`),
    with its Monte-Carlo standard error.

    :param model: Pyro model; data points in ``pyro.plate("data", N)``.
    :param guide: the amortized Pyro guide.
    :param args: the data (and any other arguments), passed to model, guides and ``log_marginal``.
    :param num_samples: draws per datum for each ELBO (and for log p(x) without ``log_marginal``), ≥ 2.
    :param local_guide: a guide of your own for q*: the model's latent sites, with per-datum parameters
        registered with ``pyro.param`` (warm-started as you choose). Those parameters, and nothing else,
        are fitted, in place in Pyro's param store.
    :param log_marginal: callable ``log_marginal(*args, **kwargs)`` returning the exact log p(x), (N,);
        without it, log p(x) is the importance-sampled (IWAE-k) estimate with the guide's ``num_samples``
        draws, with the delta-method standard error √(1/ESS − 1/S).
    :param num_steps: SVI steps of the per-datum fit, ≥ 1.
    :param lr: Adam's first step size, > 0.
    :param num_particles: particles per SVI step, ≥ 1.
    :param particles_per_batch: draws made at once when estimating the ELBOs (default
        ``min(num_samples, 100)``), to bound memory.
    :param kwargs: passed to model, guides and ``log_marginal``.
    :returns: :class:`InferenceGaps`.
    """
    num_samples = check_int("num_samples", num_samples, low=2)
    num_steps = check_int("num_steps", num_steps)
    lr = check_positive("lr", lr)
    num_particles = check_int("num_particles", num_particles)
    if local_guide is not None and not callable(local_guide):
        raise ValueError("local_guide must be a Pyro guide (a callable taking the model's arguments) or None")
    if log_marginal is not None and not callable(log_marginal):
        raise ValueError(
            "log_marginal must be a callable taking the model's arguments, e.g. family.log_marginal"
        )
    nesting = checked_plate_nesting(model, guide, args, kwargs)
    if local_guide is None:
        local_guide = _default_local_guide(guide, args, kwargs)
        parameters = local_guide.parameters()
    else:
        parameters = _local_parameters(local_guide, args, kwargs)

    estimate = {"num_samples": num_samples, "particles_per_batch": particles_per_batch}
    amortized = log_weights(model, guide, *args, **estimate, **kwargs)  # (S, N)
    elbo_amortized, elbo_amortized_stderr = _mean_and_stderr(amortized)
    if log_marginal is not None:
        exact = log_marginal(*args, **kwargs)
        if not isinstance(exact, torch.Tensor) or exact.shape != elbo_amortized.shape:
            shape = tuple(exact.shape) if isinstance(exact, torch.Tensor) else type(exact).__name__
            raise ValueError(
                f"log_marginal must return the exact log p(x) as a tensor of shape "
                f"{tuple(elbo_amortized.shape)} (one value per datum of the 'data' plate), got {shape}"
            )
        log_marginal_value = exact.detach().to(elbo_amortized)
        log_marginal_stderr = torch.zeros_like(log_marginal_value)
    else:
        log_marginal_value, log_marginal_stderr = _iwae_and_stderr(amortized)

    losses = _fit_local(model, local_guide, parameters, args, kwargs, num_steps, lr, num_particles, nesting)
    optimal = log_weights(model, local_guide, *args, **estimate, **kwargs)  # (S, N)
    elbo_optimal, elbo_optimal_stderr = _mean_and_stderr(optimal)

    per_datum = {
        "log_marginal": log_marginal_value,
        "elbo_amortized": elbo_amortized,
        "elbo_optimal": elbo_optimal,
        "inference_gap": log_marginal_value - elbo_amortized,
        "approximation_gap": log_marginal_value - elbo_optimal,
        "amortization_gap": elbo_optimal - elbo_amortized,
    }
    errors = {
        "log_marginal": log_marginal_stderr,
        "elbo_amortized": elbo_amortized_stderr,
        "elbo_optimal": elbo_optimal_stderr,
    }
    errors["inference_gap"] = torch.hypot(log_marginal_stderr, elbo_amortized_stderr)
    errors["approximation_gap"] = torch.hypot(log_marginal_stderr, elbo_optimal_stderr)
    errors["amortization_gap"] = torch.hypot(elbo_optimal_stderr, elbo_amortized_stderr)
    per_datum.update({f"{key}_stderr": value for key, value in errors.items()})
    return InferenceGaps(
        **_summary(per_datum),
        log_marginal_exact=log_marginal is not None,
        num_samples=num_samples,
        num_steps=num_steps,
        losses=losses,
        per_datum=per_datum,
    )
