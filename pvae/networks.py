"""Neural network building blocks shared by the families."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
from torch import nn

__all__ = ["ConvDecoder", "ConvEncoder", "mlp"]


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


def _check_image_shape(image_shape: Sequence[int], channels: Sequence[int]) -> tuple[int, int, int]:
    """``image_shape`` as a (C, H, W) tuple whose H and W halve exactly once per entry of ``channels``."""
    if len(channels) < 1 or any(isinstance(width, bool) or int(width) <= 0 for width in channels):
        raise ValueError(f"channels must list at least one positive width, got {list(channels)}")
    shape = tuple(int(size) for size in image_shape)
    factor = 2 ** len(channels)
    if len(shape) != 3 or min(shape) <= 0 or shape[1] % factor or shape[2] % factor:
        raise ValueError(
            f"image_shape must be (C, H, W) with H and W multiples of {factor} (one halving per entry of "
            f"channels={tuple(channels)}), got {tuple(image_shape)}"
        )
    return shape  # type: ignore[return-value]


class _ImageSequential(nn.Sequential):
    """A ``nn.Sequential`` whose ``forward`` reshapes around its layers; a slice of it is a plain
    ``nn.Sequential`` of the same layers (e.g. ``encoder[:4]``: the convolutions, on (n, C, H, W))."""

    def __getitem__(self, index):
        if isinstance(index, slice):
            return nn.Sequential(*list(self)[index])
        return super().__getitem__(index)


class ConvEncoder(_ImageSequential):
    """Strided convolutions from flattened images to a vector: (..., C·H·W) → (..., out_dim).

    Layers: for each width c_k in ``channels``, Conv2d(c_{k−1}, c_k, 4, stride 2, padding 1) → activation,
    each halving H and W (28 → 14 → 7 for two widths); then flatten → Linear(c_last·h·w, hidden_dim) →
    activation → Linear(hidden_dim, out_dim). The last layer is ``self[-1]``, as in :func:`mlp`.

    Inputs are rows of C·H·W pixels (channel-major, as ``images.reshape(N, -1)`` gives), with any number
    of leading dimensions: they are reshaped to (−1, C, H, W) for the convolutions and the output back to
    the leading dimensions, so (batch, D) and (particles, batch, D) inputs both work.

    :param image_shape: (C, H, W) of one image; H and W are multiples of 2^len(channels).
    :param out_dim: width of the output.
    :param hidden_dim: width of the fully connected layer between the feature map and the output.
    :param channels: widths of the convolutions, input side first.
    :param activation: builds the non-linearity placed after every layer but the last.
    """

    def __init__(
        self,
        image_shape: Sequence[int],
        out_dim: int,
        hidden_dim: int,
        channels: Sequence[int] = (32, 64),
        activation: Callable[[], nn.Module] = nn.ReLU,
    ):
        shape = _check_image_shape(image_shape, channels)
        in_channels, height, width = shape
        layers: list[nn.Module] = []
        for out_channels in channels:
            layers += [nn.Conv2d(in_channels, int(out_channels), 4, stride=2, padding=1), activation()]
            in_channels, height, width = int(out_channels), height // 2, width // 2
        layers += [
            nn.Flatten(),  # (n, c_last·h·w)
            nn.Linear(in_channels * height * width, hidden_dim),
            activation(),
            nn.Linear(hidden_dim, out_dim),
        ]
        super().__init__(*layers)
        self.image_shape = shape

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        leading = x.shape[:-1]
        images = x.reshape(-1, *self.image_shape)  # (n, C, H, W), n = prod(leading)
        output = super().forward(images)  # (n, out_dim)
        return output.reshape(*leading, output.shape[-1])


class ConvDecoder(_ImageSequential):
    """Transposed convolutions from a vector to flattened images: (..., in_dim) → (..., C·H·W).

    The mirror of :class:`ConvEncoder`: Linear(in_dim, hidden_dim) → activation → Linear(hidden_dim,
    c_last·h·w) → activation → reshape to (c_last, h, w); then, for the widths of ``channels`` in reverse
    order, ConvTranspose2d(c_k, c_{k−1}, 4, stride 2, padding 1), each doubling H and W (7 → 14 → 28 for
    two widths), the last one to C channels with no activation after it (logits or a mean); flatten.
    The first layer is ``self[0]``, as in :func:`mlp`.

    Any number of leading dimensions: inputs are reshaped to (−1, in_dim) and outputs back, so codes of
    shape (batch, in_dim) and (particles, batch, in_dim) both work.

    :param image_shape: (C, H, W) of one output image; H and W are multiples of 2^len(channels).
    :param in_dim: width of the input code.
    :param hidden_dim: width of the fully connected layer between the code and the feature map.
    :param channels: widths of the matching encoder's convolutions, input side first.
    :param activation: builds the non-linearity placed after every layer but the last.
    """

    def __init__(
        self,
        image_shape: Sequence[int],
        in_dim: int,
        hidden_dim: int,
        channels: Sequence[int] = (32, 64),
        activation: Callable[[], nn.Module] = nn.ReLU,
    ):
        shape = _check_image_shape(image_shape, channels)
        image_channels, height, width = shape
        factor = 2 ** len(channels)
        feature_shape = (int(channels[-1]), height // factor, width // factor)  # (c_last, h, w)
        layers: list[nn.Module] = [
            nn.Linear(in_dim, hidden_dim),
            activation(),
            nn.Linear(hidden_dim, math.prod(feature_shape)),
            activation(),
            nn.Unflatten(1, feature_shape),  # (n, c_last, h, w)
        ]
        widths = [int(size) for size in reversed(channels)] + [image_channels]
        for index, (width_in, width_out) in enumerate(zip(widths[:-1], widths[1:])):
            layers.append(nn.ConvTranspose2d(width_in, width_out, 4, stride=2, padding=1))
            if index < len(widths) - 2:
                layers.append(activation())
        layers.append(nn.Flatten())  # (n, C·H·W)
        super().__init__(*layers)
        self.image_shape = shape

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        leading = z.shape[:-1]
        output = super().forward(z.reshape(-1, z.shape[-1]))  # (n, C·H·W), n = prod(leading)
        return output.reshape(*leading, output.shape[-1])
