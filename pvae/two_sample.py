"""Two-sample statistics: how far a model's samples are from data.

:func:`mmd2` is the unbiased estimate of the squared maximum mean discrepancy with a Gaussian kernel
(Gretton et al. 2012, Eq. 3),

.. math::
    \\widehat{\\mathrm{MMD}}^2 = \\frac{1}{n(n-1)}\\sum_{i\\ne j} k(x_i, x_j)
        + \\frac{1}{m(m-1)}\\sum_{i\\ne j} k(y_i, y_j) - \\frac{2}{nm}\\sum_{i,j} k(x_i, y_j),
    \\qquad k(a, b) = \\exp(-\\lVert a - b\\rVert^2 / 2h^2),

which is 0 in expectation when both samples come from the same distribution (and can then be negative).
:func:`mmd2_null` calibrates it: the statistic between independent data sets of the same sizes.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

__all__ = ["mmd2", "mmd2_null"]


def mmd2(x: torch.Tensor, y: torch.Tensor, bandwidth: float) -> float:
    """Unbiased squared MMD between samples x (n, d) and y (m, d) with a Gaussian kernel of width h.

    :param x: (n, d) sample, n ≥ 2.
    :param y: (m, d) sample, m ≥ 2.
    :param bandwidth: kernel width h > 0.
    :returns: the estimate (a float).
    """
    if x.dim() != 2 or y.dim() != 2 or x.shape[1] != y.shape[1] or min(len(x), len(y)) < 2:
        raise ValueError(
            f"x and y must be (n, d) and (m, d) with n, m ≥ 2, got {tuple(x.shape)}, {tuple(y.shape)}"
        )
    if not bandwidth > 0:
        raise ValueError(f"bandwidth must be > 0, got {bandwidth!r}")
    y = y.to(x.dtype)

    def kernel(a, b):
        return torch.exp(-torch.cdist(a, b).square() / (2 * bandwidth**2))

    n, m = len(x), len(y)
    kxx, kyy = kernel(x, x), kernel(y, y)
    return float(
        (kxx.sum() - kxx.diagonal().sum()) / (n * (n - 1))
        + (kyy.sum() - kyy.diagonal().sum()) / (m * (m - 1))
        - 2 * kernel(x, y).mean()
    )


def mmd2_null(
    draw: Callable[[int], torch.Tensor], size: int, bandwidth: float, repeats: int = 30
) -> torch.Tensor:
    """The statistic between pairs of independent data sets of ``size`` points each: its null distribution.

    :param draw: ``draw(n)`` returns n fresh data points (n, d).
    :param size: points per data set.
    :param bandwidth: kernel width.
    :param repeats: number of pairs.
    :returns: (repeats,) float64 tensor of MMD² values.
    """
    return torch.tensor(
        [mmd2(draw(size), draw(size), bandwidth) for _ in range(int(repeats))], dtype=torch.float64
    )
