"""Neural network building blocks shared by the families."""

from __future__ import annotations

from collections.abc import Callable, Sequence

from torch import nn

__all__ = ["mlp"]


def mlp(
    sizes: Sequence[int],
    activation: Callable[[], nn.Module] = nn.ReLU,
    final_activation: Callable[[], nn.Module] | None = None,
) -> nn.Sequential:
    """A multilayer perceptron ``sizes[0] → … → sizes[-1]`` with ``activation`` between layers.

    Works on any number of leading batch dimensions, e.g. (batch, dim) or (particles, batch, dim).
    """
    if len(sizes) < 2 or any(int(size) <= 0 for size in sizes):
        raise ValueError(f"sizes must list at least two positive layer widths, got {list(sizes)}")
    layers: list[nn.Module] = []
    for index, (width_in, width_out) in enumerate(zip(sizes[:-1], sizes[1:])):
        layers.append(nn.Linear(int(width_in), int(width_out)))
        if index < len(sizes) - 2:
            layers.append(activation())
    if final_activation is not None:
        layers.append(final_activation())
    return nn.Sequential(*layers)
