"""Pictures of a posterior comparison: exact posterior, guide density and guide draws, per datum."""

from __future__ import annotations

import math
import os

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import torch

__all__ = ["plot_comparison", "plot_estimator_spread", "plot_posterior_sweep"]


def _panel_grid(count: int):
    columns = min(count, 3)
    rows = math.ceil(count / columns)
    figure, axes = plt.subplots(rows, columns, figsize=(4.2 * columns, 3.1 * rows), squeeze=False)
    for axis in axes.flat[count:]:
        axis.set_visible(False)
    return figure, axes.flat


def _save(figure, path: str) -> str:
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    stem, extension = os.path.splitext(path)
    temporary = f"{stem}.tmp{extension or '.png'}"
    figure.savefig(temporary, dpi=110, bbox_inches="tight")
    plt.close(figure)
    os.replace(temporary, path)
    return path


def _density(distribution, values: torch.Tensor, index: int) -> torch.Tensor:
    """Density of datum ``index`` of a distribution with batch (N,) (or scalar) at ``values`` (G,).

    Points outside the support get density 0; they are swapped for a draw before ``log_prob`` so that
    argument validation stays on.
    """
    with torch.no_grad():
        safe_point = distribution.sample()  # (N,) or ()
        grid = (
            values.to(safe_point.dtype).reshape(-1, *([1] * safe_point.dim())).expand(-1, *safe_point.shape)
        )
        inside = distribution.support.check(grid)
        log_prob = distribution.log_prob(torch.where(inside, grid, safe_point.expand_as(grid)))
        density = torch.where(inside, log_prob.exp(), torch.zeros_like(log_prob))
    density = density.reshape(len(values), -1)
    return density[:, index if density.shape[1] > 1 else 0].cpu()


def plot_comparison(comparison, path: str, max_panels: int = 9, labels: list[str] | None = None) -> str:
    """One panel per datum (up to ``max_panels``): exact posterior, guide density, histogram of guide draws.

    :param comparison: a :class:`pvae.inference.Comparison` of a scalar or discrete latent site.
    :param path: PNG file to write.
    :returns: ``path``.
    """
    if comparison.samples is None or comparison._guide_fn is None:
        raise ValueError("this comparison has no single latent site to plot; pass site= to compare()")
    guide_fn = comparison._guide_fn()
    exact = comparison._posterior() if comparison._posterior is not None else None
    discrete = getattr(guide_fn.support, "is_discrete", False)
    event_shape = tuple(getattr(guide_fn, "event_shape", ()))
    if event_shape and not discrete:
        raise ValueError(
            f"plot() draws scalar continuous or discrete latent sites; site {comparison.site!r} has event "
            f"shape {event_shape}"
        )
    samples = comparison.samples.detach().cpu()  # (S, N, *event) for a site in the data plate
    num_samples = samples.shape[0]
    samples = samples.reshape(num_samples, -1, *event_shape)
    count = min(samples.shape[1], max_panels)
    n = comparison.per_datum["elbo"].shape[0]
    labels = labels or _labels(comparison.data, n)
    figure, axes = _panel_grid(count)
    for index, axis in zip(range(count), axes):
        column = samples[:, index]
        if discrete:
            _discrete_panel(axis, column, guide_fn, exact, index)
        else:
            _continuous_panel(axis, column, guide_fn, exact, index)
        kl = comparison.per_datum["kl"]
        title = labels[index]
        if kl is not None:
            title += f"   KL(q‖p) = {kl[index].item():.2g}"
        axis.set_title(title, fontsize=9)
    axes[0].legend(fontsize=8, loc="best")
    figure.suptitle(f"site {comparison.site!r}: exact posterior vs guide ({num_samples} draws)", fontsize=10)
    figure.tight_layout()
    return _save(figure, path)


def _continuous_panel(axis, column, guide_fn, exact, index):
    low, high = torch.quantile(column.double(), torch.tensor([0.001, 0.999], dtype=torch.float64)).tolist()
    if exact is not None:
        try:
            mean, std = exact.mean[index].item(), exact.variance[index].sqrt().item()
            low, high = min(low, mean - 4 * std), max(high, mean + 4 * std)
        except (NotImplementedError, AttributeError, IndexError):
            pass
    pad = 0.05 * (high - low + 1e-12)
    grid = torch.linspace(low - pad, high + pad, 600, dtype=torch.float64)
    axis.hist(
        column.double().numpy(), bins=60, density=True, color="tab:blue", alpha=0.3, label="guide draws"
    )
    axis.plot(grid.numpy(), _density(guide_fn, grid, index).numpy(), color="tab:blue", label="guide q(z|x)")
    if exact is not None:
        axis.plot(grid.numpy(), _density(exact, grid, index).numpy(), "k--", label="exact p(z|x)")
    axis.set_xlabel("z")


def _labels(data, n):
    if isinstance(data, torch.Tensor) and data.shape[0] == n and data[0].numel() == 1:
        return [f"x = {v:.3g}" for v in data.reshape(-1).tolist()]
    return [f"datum {i}" for i in range(n)]


def _discrete_panel(axis, column, guide_fn, exact, index):
    """Bars of probabilities over the K values of a discrete site (categorical or one-hot)."""
    values = guide_fn.enumerate_support(expand=False)  # (K, 1, …, *event)
    num_values = values.shape[0]
    event_dims = len(guide_fn.event_shape)
    width = 0.27
    positions = torch.arange(num_values, dtype=torch.float64)
    guide_probs = guide_fn.log_prob(values).reshape(num_values, -1)[:, index].exp().cpu()
    flat_values = values.reshape(num_values, *guide_fn.event_shape).cpu()  # (K, *event)
    matches = column.unsqueeze(1) == flat_values.unsqueeze(0)  # (S, K, *event)
    counts = (
        matches.reshape(*matches.shape[:2], -1).all(-1).double().mean(0)
        if event_dims
        else matches.double().mean(0)
    )
    axis.bar(
        (positions - width).numpy(), counts.numpy(), width, color="tab:blue", alpha=0.3, label="guide draws"
    )
    axis.bar(positions.numpy(), guide_probs.numpy(), width, color="tab:blue", label="guide q(z|x)")
    if exact is not None:
        exact_probs = exact.log_prob(values).reshape(num_values, -1)[:, index].exp().cpu()
        axis.bar(
            (positions + width).numpy(),
            exact_probs.numpy(),
            width,
            color="k",
            alpha=0.7,
            label="exact p(z|x)",
        )
    axis.set_xticks(positions.numpy(), [str(k) for k in range(num_values)])
    axis.set_xlabel("z (component)" if event_dims else "z")
    axis.set_ylim(0, 1.05)


def plot_posterior_sweep(x: torch.Tensor, posterior, path: str, title: str = "") -> str:
    """Exact posterior densities p(z | x) for several x on one axis: how the posterior moves with x."""
    x = x.detach().cpu()
    exact = posterior(x)
    high = (exact.mean + 4 * exact.variance.sqrt()).max().item()
    grid = torch.linspace(0, high, 500, dtype=x.dtype)
    density = exact.log_prob(grid.unsqueeze(-1).clamp(min=0)).exp()  # (G, N)
    figure, axis = plt.subplots(figsize=(6.5, 3.6))
    colours = plt.cm.viridis(torch.linspace(0, 1, len(x)).numpy())
    for index, value in enumerate(x.tolist()):
        axis.plot(grid.numpy(), density[:, index].numpy(), color=colours[index], label=f"x = {value:g}")
    axis.set_xlabel("z")
    axis.set_ylabel("p(z | x)")
    axis.set_title(title or "exact posterior p(z | x) as x moves")
    axis.legend(fontsize=8, ncol=2)
    return _save(figure, path)


def plot_estimator_spread(spread: dict, labels: list[str], path: str) -> str:
    """Standard deviation of log-evidence estimates against k, naive (prior) vs importance-sampled (guide).

    :param spread: output of :func:`pvae.inference.estimator_spread`.
    :param labels: one label per datum.
    """
    figure, axis = plt.subplots(figsize=(6.5, 3.8))
    colours = plt.cm.tab10.colors
    for proposal, style in (("prior", "--"), ("guide", "-")):
        ks = sorted(spread[proposal])
        stds = torch.stack([spread[proposal][k]["std"] for k in ks]).cpu()  # (len(ks), N)
        for index, label in enumerate(labels):
            name = "naive (prior)" if proposal == "prior" else "importance (guide)"
            axis.plot(
                ks,
                stds[:, index].numpy(),
                style,
                marker="o",
                color=colours[index % 10],
                label=f"{name}, {label}",
            )
    axis.set_xscale("log")
    axis.set_yscale("log")
    axis.set_xlabel("k (samples per estimate)")
    axis.set_ylabel("std of log p̂(x) over repeats")
    axis.set_title("evidence estimators: spread as k grows")
    axis.legend(fontsize=7, ncol=2)
    return _save(figure, path)
