"""Pictures: posterior comparisons, evidence estimators, image grids, reconstructions, ELBO curves, latents.

Image grids use torchvision's ``make_grid``/``save_image``; everything else draws on a matplotlib
``Figure`` with the Agg canvas directly, so nothing ever opens a window or changes pyplot's global backend.
Every function writes a PNG next to its destination and renames it into place (a reader never sees a
half-written file) and returns the path it wrote.
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Callable, Mapping, Sequence

import matplotlib
import numpy as np
import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator
from torchvision.utils import make_grid, save_image

from pvae.checks import check_int
from pvae.utils import write_atomically

__all__ = [
    "latent_projection",
    "plot_comparison",
    "plot_estimator_spread",
    "plot_latent_manifold",
    "plot_latent_scatter",
    "plot_loss_curve",
    "plot_posterior_sweep",
    "plot_reconstructions",
    "save_image_grid",
]


# ---- writing ---------------------------------------------------------------------------------------------
def _check_path(path) -> str:
    path = os.fspath(path)
    if not path.lower().endswith(".png"):
        raise ValueError(f"path must name a .png file, got {path!r}")
    if os.path.isdir(path):
        raise ValueError(f"path must name a .png file, not a folder: {path!r}")
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    return path


def _save_figure(figure: Figure, path: str) -> str:
    FigureCanvasAgg(figure)
    return write_atomically(path, lambda handle: figure.savefig(handle, format="png", dpi=120))


# ---- image grids -----------------------------------------------------------------------------------------
def _as_images(images, image_shape: tuple[int, ...], name: str = "images") -> torch.Tensor:
    """(N, D), (N, H, W) or (N, C, H, W) values in [0, 1] → (N, C, H, W) float32 on the CPU."""
    images = torch.as_tensor(images).detach()
    if not (images.is_floating_point() or images.dtype == torch.uint8):
        raise ValueError(f"{name} must be floating (values in [0, 1]) or uint8 pixels, got {images.dtype}")
    if images.dtype == torch.uint8:
        images = images.float() / 255.0
    images = images.to("cpu", torch.float32)
    if images.dim() == 2:
        if len(image_shape) == 2:
            image_shape = (1, *image_shape)
        if math.prod(image_shape) != images.shape[1]:
            raise ValueError(
                f"{name} has {images.shape[1]} entries per image; image_shape {image_shape} does not fit"
            )
        images = images.reshape(images.shape[0], *image_shape)
    elif images.dim() == 3:
        images = images.unsqueeze(1)
    elif images.dim() != 4:
        raise ValueError(
            f"{name} must have shape (N, D), (N, H, W) or (N, C, H, W), got {tuple(images.shape)}"
        )
    if images.shape[0] == 0:
        raise ValueError(f"{name} is empty")
    if not torch.isfinite(images).all():
        raise ValueError(f"{name} must be finite (found NaN/inf)")
    return images.clamp(0, 1)


def save_image_grid(images, path, nrow: int = 8, image_shape: tuple[int, ...] = (28, 28), padding: int = 2):
    """Save a grid of images (e.g. prior samples ``vae.sample(64)``) as a PNG.

    :param images: (N, D) flattened images, (N, H, W) or (N, C, H, W); values in [0, 1] (or uint8 pixels).
    :param path: destination ``.png``.
    :param nrow: images per row.
    :param image_shape: (H, W) or (C, H, W) used to unflatten (N, D) input.
    :param padding: pixels between images.
    :returns: ``path``.
    """
    path = _check_path(path)
    if int(nrow) < 1:
        raise ValueError(f"nrow must be ≥ 1, got {nrow!r}")
    grid = make_grid(_as_images(images, image_shape), nrow=int(nrow), padding=padding, pad_value=1.0)
    return write_atomically(path, lambda handle: save_image(grid, handle, format="png"))


def plot_reconstructions(
    originals, reconstructions, path, per_row: int = 8, max_images: int = 32, image_shape=(28, 28)
):
    """Originals next to their reconstructions: rows alternate originals / reconstructions.

    Row 1 holds ``per_row`` originals, row 2 their reconstructions directly beneath, and so on.

    :param originals: images as for :func:`save_image_grid`.
    :param reconstructions: the same number of images, in the same order.
    :param path: destination ``.png``.
    :param per_row: image pairs per row.
    :param max_images: at most this many pairs are shown (the first ones).
    :param image_shape: used to unflatten (N, D) input.
    :returns: ``path``.
    """
    path = _check_path(path)
    originals = _as_images(originals, image_shape, "originals")
    reconstructions = _as_images(reconstructions, image_shape, "reconstructions")
    if originals.shape != reconstructions.shape:
        raise ValueError(
            f"originals {tuple(originals.shape)} and reconstructions {tuple(reconstructions.shape)} differ"
        )
    if int(per_row) < 1 or int(max_images) < 1:
        raise ValueError(f"per_row and max_images must be ≥ 1, got {per_row!r} and {max_images!r}")
    count = min(originals.shape[0], int(max_images))
    per_row = min(int(per_row), count)
    rows = []
    for start in range(0, count, per_row):
        stop = min(start + per_row, count)
        pad = per_row - (stop - start)  # blank tiles complete the last row pair
        blank = torch.ones((pad, *originals.shape[1:]))
        rows += [originals[start:stop], blank, reconstructions[start:stop], blank]
    grid = make_grid(torch.cat(rows), nrow=per_row, padding=2, pad_value=1.0)
    return write_atomically(path, lambda handle: save_image(grid, handle, format="png"))


# ---- curves ----------------------------------------------------------------------------------------------
def _curves(history) -> dict[str, list[float]]:
    """Normalize a history into named curves (None entries become NaN gaps)."""
    if dataclasses.is_dataclass(history) and not isinstance(history, type):
        history = dataclasses.asdict(history)
    if isinstance(history, torch.Tensor):
        history = history.detach().cpu().tolist()
    if isinstance(history, Mapping):
        curves = {str(key): value for key, value in history.items() if key != "epoch"}
    elif isinstance(history, Sequence) and history and all(isinstance(row, Mapping) for row in history):
        keys = [key for key in history[0] if key != "epoch"]
        curves = {str(key): [row.get(key) for row in history] for key in keys}
    elif isinstance(history, Sequence):
        curves = {"": list(history)}
    else:
        raise ValueError(
            "history must be a sequence of numbers, a mapping name → sequence (e.g. {'train': [...], "
            "'test': [...]}), or a list of per-epoch dicts; "
            f"got {type(history).__name__}"
        )
    numeric = {}
    for key, values in curves.items():
        if isinstance(values, torch.Tensor):
            values = values.detach().cpu().tolist()
        if not isinstance(values, Sequence) or isinstance(values, str):
            continue  # e.g. a scalar field of a history record
        try:
            numeric[key] = [math.nan if value is None else float(value) for value in values]
        except (TypeError, ValueError):
            continue
    numeric = {key: values for key, values in numeric.items() if values}
    if not numeric:
        raise ValueError("history holds no numeric values to plot")
    return numeric


def plot_loss_curve(
    history_or_values,
    path,
    xlabel: str = "epoch",
    ylabel: str = "ELBO (nats per image)",
    title: str | None = None,
):
    """Plot one or several curves, e.g. per-epoch train and test ELBO.

    :param history_or_values: a sequence of numbers; a mapping name → sequence (``{"train": [...],
        "test": [...]}``; a key ``"epoch"`` is used as the x values); a list of per-epoch dicts
        (``[{"epoch": 1, "train_elbo": ..., "test_elbo": ...}, ...]``); or a dataclass of such lists.
        ``None`` entries (e.g. epochs without a test evaluation) leave gaps.
    :param path: destination ``.png``.
    :param xlabel: x-axis label (``"step"`` for per-step SVI losses).
    :param ylabel: y-axis label.
    :param title: optional title.
    :returns: ``path``.
    """
    path = _check_path(path)
    curves = _curves(history_or_values)
    epochs = None
    if isinstance(history_or_values, Mapping) and "epoch" in history_or_values:
        epochs = [float(e) for e in history_or_values["epoch"]]
    elif isinstance(history_or_values, Sequence) and history_or_values:
        first = history_or_values[0]
        if isinstance(first, Mapping) and "epoch" in first:
            epochs = [float(row["epoch"]) for row in history_or_values]
    figure = Figure(figsize=(5.5, 3.8))
    axes = figure.add_subplot()
    for label, values in curves.items():
        x = epochs if epochs is not None and len(epochs) == len(values) else range(1, len(values) + 1)
        x, values = np.asarray(list(x), dtype=float), np.asarray(values, dtype=float)
        marker = "o" if len(values) <= 30 else None
        axes.plot(x, values, marker=marker, markersize=3, label=label or None)
    if any(curves):
        axes.legend()
    axes.xaxis.set_major_locator(MaxNLocator(integer=True))
    axes.set_xlabel(xlabel)
    axes.set_ylabel(ylabel)
    if title:
        axes.set_title(title)
    axes.grid(alpha=0.3)
    figure.tight_layout()
    return _save_figure(figure, path)


# ---- latent space ----------------------------------------------------------------------------------------
def latent_projection(z: torch.Tensor) -> tuple[torch.Tensor, tuple[str, str], str]:
    """2-D coordinates for a scatter of codes: z for z_dim = 2, else its first two principal components.

    :param z: (N, z_dim) codes, z_dim ≥ 2.
    :returns: ``(points, axis_names, note)``: (N, 2) coordinates (PC scores of the centred codes when
        z_dim > 2), axis labels, and a note for the title ("" for z_dim = 2).
    """
    if not isinstance(z, torch.Tensor) or z.dim() != 2 or z.shape[1] < 2:
        shape = tuple(z.shape) if isinstance(z, torch.Tensor) else type(z).__name__
        raise ValueError(f"z must be a tensor of shape (N, z_dim) with z_dim ≥ 2, got {shape}")
    if z.shape[1] == 2:
        return z, ("$z_1$", "$z_2$"), ""
    centred = z - z.mean(0)
    _, singular, vh = torch.linalg.svd(centred, full_matrices=True)  # vh: (z_dim, z_dim), also for N < 2
    points = centred @ vh[:2].T  # (N, 2): scores on the first two principal components
    total = singular.square().sum()
    share = float((singular[:2].square().sum() / total).clamp(max=1)) if total > 0 else 0.0
    note = f"first two principal components of z ({z.shape[1]}-d, {share:.0%} of variance)"
    return points, ("PC 1", "PC 2"), note


def plot_latent_scatter(z, labels, path, title: str | None = None, max_points: int = 5000):
    """Scatter of latent codes coloured by class (digit) label.

    For ``z_dim`` = 2 the axes are z₁, z₂; for ``z_dim`` > 2 the codes are projected on their first two
    principal components (the title says so, with the share of variance they explain).

    :param z: (N, z_dim) codes, e.g. posterior means ``vae.encode(x)[0]``; z_dim ≥ 2.
    :param labels: (N,) integer class labels.
    :param path: destination ``.png``.
    :param title: title prefix (default ``"latent codes"``).
    :param max_points: plot at most this many (the first) points.
    :returns: ``path``.
    """
    path = _check_path(path)
    z = torch.as_tensor(z).detach().to("cpu", torch.float64)
    labels = torch.as_tensor(labels).detach().cpu()
    if z.dim() != 2 or z.shape[1] < 2:
        raise ValueError(f"z must have shape (N, z_dim) with z_dim ≥ 2, got {tuple(z.shape)}")
    if labels.shape != (z.shape[0],):
        raise ValueError(f"labels must have shape ({z.shape[0]},), got {tuple(labels.shape)}")
    if not torch.isfinite(z).all():
        raise ValueError("z must be finite (found NaN/inf)")
    z, labels = z[:max_points], labels[:max_points]
    points, names, note = latent_projection(z)
    title = (title or "latent codes") + (f": {note}" if note else "")
    figure = Figure(figsize=(5.5, 4.8))
    axes = figure.add_subplot()
    scatter = axes.scatter(
        points[:, 0].numpy(),
        points[:, 1].numpy(),
        c=labels.numpy(),
        cmap="tab10",
        vmin=-0.5,
        vmax=9.5,
        s=6,
        alpha=0.8,
    )
    colorbar = figure.colorbar(scatter, ax=axes, ticks=range(10))
    colorbar.set_label("digit")
    axes.set_xlabel(names[0])
    axes.set_ylabel(names[1])
    axes.set_title(title, fontsize=9)
    figure.tight_layout()
    return _save_figure(figure, path)


def plot_latent_manifold(
    decode_fn: Callable[[torch.Tensor], torch.Tensor],
    path,
    grid: int = 20,
    image_shape: tuple[int, ...] = (28, 28),
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
):
    """The decoded 2-D latent manifold (Kingma & Welling 2014, Fig. 4).

    z runs over a ``grid`` × ``grid`` lattice of Normal quantiles Φ⁻¹(p), p evenly spaced in
    [0.05, 0.95], so each tile covers equal prior mass; z₁ grows left to right, z₂ bottom to top.

    :param decode_fn: maps (grid², 2) codes to (grid², D) images in [0, 1], e.g. ``vae.decode``.
    :param path: destination ``.png``.
    :param grid: tiles per side, ≥ 2.
    :param image_shape: (H, W) or (C, H, W) to unflatten the decoded images.
    :param device: device of the codes (default: that of ``decode_fn``'s module, else the CPU).
    :param dtype: dtype of the codes (default: that of ``decode_fn``'s module, else float32).
    :returns: ``path``.
    """
    path = _check_path(path)
    check_int("grid", grid, 2)
    owner = getattr(decode_fn, "__self__", None)
    parameter = next(owner.parameters(), None) if isinstance(owner, torch.nn.Module) else None
    device = device if device is not None else (parameter.device if parameter is not None else "cpu")
    dtype = dtype if dtype is not None else (parameter.dtype if parameter is not None else torch.float32)
    quantiles = torch.special.ndtri(torch.linspace(0.05, 0.95, grid, dtype=torch.float64))  # (grid,)
    z2, z1 = torch.meshgrid(quantiles.flip(0), quantiles, indexing="ij")  # rows: z₂ from top (high) down
    z = torch.stack([z1.reshape(-1), z2.reshape(-1)], dim=-1).to(device=device, dtype=dtype)  # (grid², 2)
    with torch.no_grad():
        images = decode_fn(z)
    if not isinstance(images, torch.Tensor) or images.shape[0] != grid * grid:
        raise ValueError(f"decode_fn must return a tensor with {grid * grid} images (one per code)")
    grid_image = make_grid(_as_images(images, image_shape, "decoded images"), nrow=grid, padding=1)
    return write_atomically(path, lambda handle: save_image(grid_image, handle, format="png"))


# ---- posterior comparisons -------------------------------------------------------------------------------
def _panel_grid(count: int):
    columns = min(count, 3)
    rows = math.ceil(count / columns)
    figure = Figure(figsize=(4.2 * columns, 3.1 * rows))
    axes = figure.subplots(rows, columns, squeeze=False)
    for axis in axes.flat[count:]:
        axis.set_visible(False)
    return figure, axes.flat


def plot_comparison(comparison, path: str, max_panels: int = 9, labels: list[str] | None = None) -> str:
    """One panel per datum (up to ``max_panels``): exact posterior, guide density, histogram of guide draws.

    Reads only the comparison's data: its guide draws (``samples``), the densities on a grid per datum
    (``densities``: curves for a continuous scalar site, bars of probabilities for a discrete one), the
    per-datum KL and labels.

    :param comparison: a :class:`pvae.inference.Comparison` of a scalar or discrete latent site.
    :param path: PNG file to write.
    :param max_panels: draw at most this many data.
    :param labels: panel titles, one per datum (default: the comparison's own).
    :returns: ``path``.
    """
    path = _check_path(path)
    if comparison.samples is None:
        raise ValueError("this comparison has no single latent site to plot; pass site= to compare()")
    densities = comparison.densities
    if densities is None:
        raise ValueError(
            f"plot() draws scalar continuous or discrete latent sites; site {comparison.site!r} has event "
            f"shape {comparison.event_shape}"
        )
    event_shape = tuple(comparison.event_shape or ())
    samples = comparison.samples.detach().cpu()
    num_samples = samples.shape[0]
    samples = samples.reshape(num_samples, -1, *event_shape)  # (S, M, *event): one column per datum
    count = min(samples.shape[1], max_panels)
    labels = labels or comparison.labels()
    kl = comparison.per_datum["kl"]
    figure, axes = _panel_grid(count)
    for index, axis in zip(range(count), axes):
        if densities.discrete:
            _discrete_panel(axis, samples[:, index], densities, index)
        else:
            _continuous_panel(axis, samples[:, index], densities, index)
        title = str(labels[index])
        if kl is not None:
            title += f"   KL(q‖p) = {kl[index].item():.2g}"
        axis.set_title(title, fontsize=9)
    axes[0].legend(fontsize=8, loc="best")
    figure.suptitle(f"site {comparison.site!r}: exact posterior vs guide ({num_samples} draws)", fontsize=10)
    figure.tight_layout()
    return _save_figure(figure, path)


def _column(values: torch.Tensor, index: int) -> np.ndarray:
    """Row ``index`` of an (M, ·) table of densities, or its only row when it is shared by all data."""
    return values[index if values.shape[0] > 1 else 0].detach().double().cpu().numpy()


def _continuous_panel(axis, column, densities, index):
    grid = _column(densities.points, index)
    axis.hist(
        column.double().numpy(), bins=60, density=True, color="tab:blue", alpha=0.3, label="guide draws"
    )
    axis.plot(grid, _column(densities.guide, index), color="tab:blue", label="guide q(z|x)")
    if densities.posterior is not None:
        axis.plot(grid, _column(densities.posterior, index), "k--", label="exact p(z|x)")
    axis.set_xlabel("z")


def _discrete_panel(axis, column, densities, index):
    """Bars of probabilities over the K values of a discrete site (categorical or one-hot)."""
    values = densities.points.detach().cpu()  # (K, *event)
    num_values = values.shape[0]
    event_dims = values.dim() - 1
    width = 0.27
    positions = np.arange(num_values, dtype=np.float64)
    matches = column.unsqueeze(1) == values.to(column.dtype).unsqueeze(0)  # (S, K, *event)
    frequencies = matches.reshape(*matches.shape[:2], -1).all(-1).double().mean(0)  # (K,)
    axis.bar(positions - width, frequencies.numpy(), width, color="tab:blue", alpha=0.3, label="guide draws")
    axis.bar(positions, _column(densities.guide, index), width, color="tab:blue", label="guide q(z|x)")
    if densities.posterior is not None:
        exact = _column(densities.posterior, index)
        axis.bar(positions + width, exact, width, color="k", alpha=0.7, label="exact p(z|x)")
    axis.set_xticks(positions, [str(k) for k in range(num_values)])
    axis.set_xlabel("z (component)" if event_dims else "z")
    axis.set_ylim(0, 1.05)


def plot_posterior_sweep(x: torch.Tensor, posterior, path: str, title: str = "") -> str:
    """Exact posterior densities p(z | x) for several x on one axis: how the posterior moves with x."""
    path = _check_path(path)
    x = x.detach().cpu()
    exact = posterior(x)
    high = (exact.mean + 4 * exact.variance.sqrt()).max().item()
    grid = torch.linspace(0, high, 500, dtype=x.dtype)
    density = exact.log_prob(grid.unsqueeze(-1).clamp(min=0)).exp()  # (G, N)
    figure = Figure(figsize=(6.5, 3.6))
    axis = figure.subplots()
    colours = matplotlib.colormaps["viridis"](np.linspace(0, 1, len(x)))
    for index, value in enumerate(x.tolist()):
        axis.plot(grid.numpy(), density[:, index].numpy(), color=colours[index], label=f"x = {value:g}")
    axis.set_xlabel("z")
    axis.set_ylabel("p(z | x)")
    axis.set_title(title or "exact posterior p(z | x) as x moves")
    axis.legend(fontsize=8, ncol=2)
    return _save_figure(figure, path)


def plot_estimator_spread(spread: dict, labels: list[str], path: str) -> str:
    """Standard deviation of log-evidence estimates against k, naive (prior) vs importance-sampled (guide).

    :param spread: output of :func:`pvae.inference.estimator_spread`.
    :param labels: one label per datum.
    """
    path = _check_path(path)
    figure = Figure(figsize=(6.5, 3.8))
    axis = figure.subplots()
    colours = matplotlib.colormaps["tab10"].colors
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
    return _save_figure(figure, path)
