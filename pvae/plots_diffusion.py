"""Pictures of diffusion models: samples over 2-D data, the reverse chain x_T → x_0, the ELBO's terms per t.

Image grids and training curves come from :mod:`pvae.plots` (``save_image_grid``, ``plot_loss_curve``);
this module adds what only a diffusion model has. Inputs are tensors in model space: 2-D points as they are,
images in [−1, 1] (mapped to [0, 1] for display). Each function writes a PNG atomically and returns its path.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from matplotlib.figure import Figure
from torchvision.utils import make_grid, save_image

from pvae.plots import _check_path, _save_figure
from pvae.utils import write_atomically

__all__ = ["moving_average", "plot_chain_2d", "plot_chain_strip", "plot_elbo_terms", "plot_samples_2d"]


def _points(name: str, values) -> np.ndarray:
    values = torch.as_tensor(values).detach().to("cpu", torch.float64)
    if values.dim() != 2 or values.shape[1] != 2 or values.shape[0] == 0:
        raise ValueError(f"{name} must be a non-empty (N, 2) tensor of points, got {tuple(values.shape)}")
    return values.numpy()


def _limits(*arrays: np.ndarray) -> tuple[tuple[float, float], tuple[float, float]]:
    stacked = np.concatenate(arrays)
    low, high = np.percentile(stacked, 0.5, axis=0), np.percentile(stacked, 99.5, axis=0)
    margin = 0.1 * (high - low) + 1e-6
    return (low[0] - margin[0], high[0] + margin[0]), (low[1] - margin[1], high[1] + margin[1])


def plot_samples_2d(samples, data, path, title: str | None = None, max_points: int = 3000):
    """Scatter of model samples (blue) over data points (grey), on the data's axes (the samples' without).

    :param samples: (N, 2) samples.
    :param data: (M, 2) data points, or None.
    :param path: destination ``.png``.
    :param title: optional title.
    :param max_points: at most this many points of each are drawn.
    :returns: ``path``.
    """
    path = _check_path(path)
    samples = _points("samples", samples)[:max_points]
    data = _points("data", data)[:max_points] if data is not None else None
    figure = Figure(figsize=(4.8, 4.2))
    axes = figure.add_subplot()
    if data is not None:
        axes.scatter(data[:, 0], data[:, 1], s=4, c="0.65", alpha=0.6, label="data", linewidths=0)
    axes.scatter(samples[:, 0], samples[:, 1], s=4, c="tab:blue", alpha=0.6, label="samples", linewidths=0)
    xlim, ylim = _limits(data if data is not None else samples)
    axes.set_xlim(*xlim)
    axes.set_ylim(*ylim)
    axes.set_aspect("equal")
    axes.legend(loc="upper right", markerscale=3)
    if title:
        axes.set_title(title)
    figure.tight_layout()
    return _save_figure(figure, path)


def plot_chain_2d(states, times, path, data=None, max_points: int = 2000):
    """The reverse chain of 2-D samples as a row of scatter panels, x_T on the left, x_0 on the right.

    :param states: (K, N, 2) states (``SampleChain.states``).
    :param times: the K timesteps (``SampleChain.times``).
    :param path: destination ``.png``.
    :param data: optional (M, 2) data drawn in grey in the last panel.
    :returns: ``path``.
    """
    path = _check_path(path)
    states = torch.as_tensor(states).detach().to("cpu", torch.float64)
    if states.dim() != 3 or states.shape[-1] != 2 or states.shape[0] != len(times):
        raise ValueError(f"states must be (K, N, 2) with K = len(times), got {tuple(states.shape)}")
    count = states.shape[0]
    figure = Figure(figsize=(2.2 * count, 2.4))
    reference = _points("data", data) if data is not None else states[-1].numpy()
    xlim, ylim = _limits(reference)
    xlim = (min(xlim[0], -3.0), max(xlim[1], 3.0))
    ylim = (min(ylim[0], -3.0), max(ylim[1], 3.0))
    for index in range(count):
        axes = figure.add_subplot(1, count, index + 1)
        if data is not None and index == count - 1:
            points = _points("data", data)[:max_points]
            axes.scatter(points[:, 0], points[:, 1], s=2, c="0.7", linewidths=0)
        shown = states[index, :max_points].numpy()
        axes.scatter(shown[:, 0], shown[:, 1], s=2, c="tab:blue", alpha=0.6, linewidths=0)
        axes.set_xlim(*xlim)
        axes.set_ylim(*ylim)
        axes.set_xticks([])
        axes.set_yticks([])
        axes.set_title(f"t = {times[index]}", fontsize=9)
    figure.tight_layout()
    return _save_figure(figure, path)


def plot_chain_strip(states, times, path, num_rows: int = 8):
    """Images along the reverse chain: one row per sample, columns from x_T (left) to x_0 (right).

    :param states: (K, N, C, H, W) states in model space [−1, 1] (``SampleChain.states``).
    :param times: the K timesteps.
    :param path: destination ``.png``.
    :param num_rows: samples shown (the first ones).
    :returns: ``path``.
    """
    path = _check_path(path)
    states = torch.as_tensor(states).detach().to("cpu", torch.float32)
    if states.dim() != 5 or states.shape[0] != len(times):
        raise ValueError(f"states must be (K, N, C, H, W) with K = len(times), got {tuple(states.shape)}")
    rows = min(int(num_rows), states.shape[1])
    if rows < 1:
        raise ValueError(f"num_rows must be ≥ 1, got {num_rows!r}")
    tiles = states[:, :rows].transpose(0, 1).reshape(-1, *states.shape[2:])  # row-major: sample, time
    grid = make_grid(((tiles + 1) / 2).clamp(0, 1), nrow=states.shape[0], padding=2, pad_value=1.0)
    return write_atomically(path, lambda handle: save_image(grid, handle, format="png"))


def plot_elbo_terms(terms: dict, path, title: str | None = None):
    """The per-datum mean of each ELBO term against t, on a log scale (from ``DDPM.elbo(return_terms=True)``).

    L_{t−1} for t = 2 … T as a curve, |L_0| = |log p(x_0 | x_1)| as a point at 0, L_T in the legend.

    :param terms: ``{"prior": (N,), "kl": (T − 1, N), "decoder": (N,)}``.
    :param path: destination ``.png``.
    :returns: ``path``.
    """
    path = _check_path(path)
    kl = torch.as_tensor(terms["kl"]).detach().to("cpu", torch.float64).mean(-1).numpy()  # (T − 1,)
    decoder = -float(torch.as_tensor(terms["decoder"]).double().mean())
    prior = float(torch.as_tensor(terms["prior"]).double().mean())
    steps = np.arange(2, kl.shape[0] + 2)
    figure = Figure(figsize=(5.5, 3.8))
    axes = figure.add_subplot()
    if kl.size:
        axes.plot(steps - 1, np.maximum(kl, 1e-12), label="L_{t−1}: KL per step")
    axes.scatter([0], [max(abs(decoder), 1e-12)], c="tab:red", label=f"|L_0| = {abs(decoder):.3g}", zorder=3)
    axes.plot([], [], " ", label=f"L_T = {prior:.2g} (prior term)")  # legend entry only: L_T ≈ 0
    axes.set_yscale("log")
    axes.set_xlabel("t − 1")
    axes.set_ylabel("nats per datum")
    axes.legend()
    axes.grid(alpha=0.3)
    if title:
        axes.set_title(title)
    figure.tight_layout()
    return _save_figure(figure, path)


def moving_average(values, window: int = 100) -> list[float]:
    """Running mean over the last ``window`` values (fewer at the start): a readable per-step loss curve when
    each step sees a single timestep and the raw losses jump by orders of magnitude with t."""
    values = torch.as_tensor(list(values), dtype=torch.float64)
    if values.numel() == 0:
        raise ValueError("values is empty")
    window = max(1, int(window))
    sums = torch.cat([values.new_zeros(1), values.cumsum(0)])
    ends = torch.arange(1, values.numel() + 1)
    starts = (ends - window).clamp(min=0)
    return ((sums[ends] - sums[starts]) / (ends - starts)).tolist()


def sample_grid_side(count: int) -> int:
    """Images per row for a square-ish grid of ``count`` images."""
    return max(1, math.ceil(math.sqrt(count)))
