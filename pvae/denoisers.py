"""ε-prediction networks for diffusion models: ε_θ(x_t, t).

Both networks take a noisy input ``x`` with any number of leading batch dimensions and an integer-valued
timestep ``t ∈ {1, …, T}`` (a number, or an integer or floating tensor broadcastable to the batch
dimensions — the diffusion chains pass LongTensors: one value per batch, or one per datum) and return a
tensor shaped like ``x``: the predicted noise ε in x_t = √ᾱ_t x_0 + √(1 − ᾱ_t) ε (DDPM Eq. 4).
The timestep enters through a sinusoidal embedding (Vaswani et al. 2017, as in DDPM §4) of t rescaled to
the range 0 … 1000, so the same architecture serves any number of steps T.

- :class:`MLPDenoiser` for vector data ``(D,)`` — residual SiLU blocks, the time embedding added in each;
- :class:`UNetDenoiser` for small images ``(C, H, W)`` such as 28×28 digits — residual blocks with
  GroupNorm and SiLU, the time embedding added in each block, one down/up level per extra entry of
  ``channels`` with skip connections (no attention, so it stays cheap on a CPU).

Both zero-initialise their output layer, so an untrained denoiser predicts ε = 0 (μ_θ = x_t/√α_t).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn
from torch.nn import functional as F

from pvae.checks import check_int

__all__ = ["MLPDenoiser", "UNetDenoiser", "VarianceHead", "default_denoiser", "sinusoidal_embedding"]


def sinusoidal_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal features of (real-valued) times: (...,) → (..., dim).

    The first half holds sin(t·ω_i), the second cos(t·ω_i), with ω_i = max_period^(−i/(dim/2)).

    :param t: times, any shape, floating.
    :param dim: embedding width, a positive even integer.
    :param max_period: the longest period.
    :returns: the embedding, in t's dtype and device.
    """
    if dim <= 0 or dim % 2:
        raise ValueError(f"dim must be a positive even integer, got {dim!r}")
    half = dim // 2
    frequencies = torch.exp(
        -math.log(max_period) * torch.arange(half, dtype=t.dtype, device=t.device) / half
    )  # (half,)
    angles = t.unsqueeze(-1) * frequencies  # (..., half)
    return torch.cat([torch.sin(angles), torch.cos(angles)], dim=-1)


class TimeEmbedding(nn.Module):
    """t ↦ MLP(sinusoidal(t · 1000/T)): the time features every block receives."""

    def __init__(self, timesteps: int, dim: int):
        super().__init__()
        self.scale = 1000.0 / timesteps
        self.dim = dim
        self.net = nn.Sequential(nn.Linear(dim, dim), nn.SiLU(), nn.Linear(dim, dim))

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        return self.net(sinusoidal_embedding(t * self.scale, self.dim))


def _as_times(t, batch_shape: torch.Size, like: torch.Tensor) -> torch.Tensor:
    """Timesteps broadcast to ``batch_shape`` in the dtype/device of ``like``."""
    t = torch.as_tensor(t, device=like.device).to(like.dtype)
    try:
        return t.broadcast_to(batch_shape)
    except RuntimeError as error:
        raise ValueError(
            f"t of shape {tuple(t.shape)} does not broadcast to the batch shape {tuple(batch_shape)}"
        ) from error


def _check_input(x: torch.Tensor, event_shape: tuple[int, ...]) -> None:
    if not isinstance(x, torch.Tensor) or not x.is_floating_point():
        raise ValueError("x must be a floating torch.Tensor")
    if tuple(x.shape[x.dim() - len(event_shape) :]) != event_shape or x.dim() < len(event_shape):
        raise ValueError(f"x must have shape (..., {', '.join(map(str, event_shape))}), got {tuple(x.shape)}")


class MLPDenoiser(nn.Module):
    """ε_θ(x, t) for vector data: residual MLP blocks with the time embedding added in each.

    h = W_in x;  h ← h + W_2 SiLU(W_1 SiLU(h) + E_k(t)) per block;  ε = W_out SiLU(h).

    :param data_dim: D, the length of a data vector.
    :param timesteps: T, the number of diffusion steps (times are rescaled to 0 … 1000).
    :param hidden_dim: width of the blocks.
    :param num_blocks: number of residual blocks.
    :param time_dim: width of the time embedding (even).
    :param outputs: values per data entry: 1 (ε), or 2 (ε and v, split by :class:`VarianceHead`).
    """

    def __init__(
        self,
        data_dim: int,
        timesteps: int = 1000,
        hidden_dim: int = 128,
        num_blocks: int = 3,
        time_dim=64,
        outputs: int = 1,
    ):
        super().__init__()
        self.data_dim = check_int("data_dim", data_dim)
        check_int("outputs", outputs, 1, 2)
        check_int("timesteps", timesteps)
        check_int("hidden_dim", hidden_dim)
        check_int("num_blocks", num_blocks)
        if check_int("time_dim", time_dim) % 2:
            raise ValueError(f"time_dim must be even, got {time_dim}")
        self.time_embedding = TimeEmbedding(timesteps, time_dim)
        self.input = nn.Linear(data_dim, hidden_dim)
        self.blocks = nn.ModuleList(
            nn.ModuleDict(
                {
                    "time": nn.Linear(time_dim, hidden_dim),
                    "inner": nn.Linear(hidden_dim, hidden_dim),
                    "outer": nn.Linear(hidden_dim, hidden_dim),
                }
            )
            for _ in range(num_blocks)
        )
        self.output = nn.Linear(hidden_dim, outputs * data_dim)
        nn.init.zeros_(self.output.weight)
        nn.init.zeros_(self.output.bias)

    def forward(self, x: torch.Tensor, t) -> torch.Tensor:
        """:param x: (..., D). :param t: timesteps broadcastable to x.shape[:-1].

        :returns: (..., outputs·D)."""
        _check_input(x, (self.data_dim,))
        dtype = self.input.weight.dtype
        inputs = x.to(dtype)
        times = _as_times(t, x.shape[:-1], inputs)  # (...,)
        embedding = F.silu(self.time_embedding(times))  # (..., time_dim)
        h = self.input(inputs)  # (..., hidden)
        for block in self.blocks:
            inner = block["inner"](F.silu(h)) + block["time"](embedding)
            h = h + block["outer"](F.silu(inner))
        return self.output(F.silu(h)).to(x.dtype)  # (..., outputs·D)


def _groups(channels: int, preferred: int = 8) -> int:
    return math.gcd(preferred, channels)


class ResidualBlock(nn.Module):
    """GroupNorm → SiLU → conv3×3, plus the projected time embedding, then GroupNorm → SiLU → conv3×3."""

    def __init__(self, in_channels: int, out_channels: int, time_dim: int):
        super().__init__()
        self.norm1 = nn.GroupNorm(_groups(in_channels), in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.time = nn.Linear(time_dim, out_channels)
        self.norm2 = nn.GroupNorm(_groups(out_channels), out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        self.skip = nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else nn.Identity()

    def forward(self, x: torch.Tensor, embedding: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))  # (B, out, H, W)
        h = h + self.time(embedding)[:, :, None, None]
        h = self.conv2(F.silu(self.norm2(h)))
        return self.skip(x) + h


class UNetDenoiser(nn.Module):
    """A small U-Net ε_θ(x, t) for images (C, H, W), e.g. 28×28 digits.

    Level i works at resolution H/2^i with ``channels[i]`` channels: one residual block per level on the
    way down (its output kept as a skip), a stride-2 convolution between levels, two residual blocks at
    the bottom, then per level on the way up a nearest-neighbour ×2 upsampling + conv3×3, concatenation
    with the skip and a residual block. The time embedding is added inside every residual block.
    With ``channels=(32, 64)`` and 28×28 inputs the resolutions are 28 → 14 → 7 (bottom) → 14 → 28.

    :param image_shape: (C, H, W); H and W must be divisible by 2^len(channels).
    :param timesteps: T (times are rescaled to 0 … 1000).
    :param channels: channel widths per level.
    :param time_dim: width of the time embedding (even).
    :param outputs: values per data entry: 1 (ε), or 2 (ε and v on 2C channels, split by
        :class:`VarianceHead`).
    """

    def __init__(
        self,
        image_shape: Sequence[int] = (1, 28, 28),
        timesteps: int = 1000,
        channels: Sequence[int] = (32, 64),
        time_dim: int = 128,
        outputs: int = 1,
    ):
        super().__init__()
        check_int("outputs", outputs, 1, 2)
        image_shape = tuple(int(size) for size in image_shape)
        if len(image_shape) != 3 or min(image_shape) < 1:
            raise ValueError(f"image_shape must be (C, H, W) with positive sizes, got {image_shape}")
        channels = tuple(int(width) for width in channels)
        if not channels or min(channels) < 1:
            raise ValueError(f"channels must list at least one positive width, got {channels}")
        factor = 2 ** len(channels)
        if image_shape[1] % factor or image_shape[2] % factor:
            raise ValueError(
                f"image height and width must be divisible by 2^len(channels) = {factor}, got {image_shape}"
            )
        check_int("timesteps", timesteps)
        if check_int("time_dim", time_dim) % 2:
            raise ValueError(f"time_dim must be even, got {time_dim}")
        self.image_shape = image_shape
        self.time_embedding = TimeEmbedding(timesteps, time_dim)
        self.input = nn.Conv2d(image_shape[0], channels[0], 3, padding=1)
        self.down_blocks = nn.ModuleList()
        self.downsamples = nn.ModuleList()
        width = channels[0]
        for level_width in channels:
            self.down_blocks.append(ResidualBlock(width, level_width, time_dim))
            width = level_width
            self.downsamples.append(nn.Conv2d(width, width, 3, stride=2, padding=1))
        self.middle = nn.ModuleList([ResidualBlock(width, width, time_dim) for _ in range(2)])
        self.upsamples = nn.ModuleList()
        self.up_blocks = nn.ModuleList()
        for level_width in reversed(channels):
            self.upsamples.append(nn.Conv2d(width, level_width, 3, padding=1))
            self.up_blocks.append(ResidualBlock(2 * level_width, level_width, time_dim))
            width = level_width
        self.output_norm = nn.GroupNorm(_groups(width), width)
        self.output = nn.Conv2d(width, outputs * image_shape[0], 3, padding=1)
        nn.init.zeros_(self.output.weight)
        nn.init.zeros_(self.output.bias)

    def forward(self, x: torch.Tensor, t) -> torch.Tensor:
        """:param x: (..., C, H, W). :param t: timesteps broadcastable to x.shape[:-3]. :returns:
        (..., outputs·C, H, W)."""
        _check_input(x, self.image_shape)
        batch_shape = x.shape[:-3]
        dtype = self.input.weight.dtype
        images = x.to(dtype).reshape(-1, *self.image_shape)  # (B, C, H, W)
        times = _as_times(t, batch_shape, images).reshape(-1)  # (B,)
        embedding = F.silu(self.time_embedding(times))  # (B, time_dim)
        h = self.input(images)
        skips = []
        for block, downsample in zip(self.down_blocks, self.downsamples):
            h = block(h, embedding)
            skips.append(h)
            h = downsample(h)  # half resolution
        for block in self.middle:
            h = block(h, embedding)
        for upsample, block in zip(self.upsamples, self.up_blocks):
            h = upsample(F.interpolate(h, scale_factor=2.0, mode="nearest"))  # double resolution
            h = block(torch.cat([h, skips.pop()], dim=1), embedding)
        out = self.output(F.silu(self.output_norm(h)))  # (B, outputs·C, H, W)
        return out.reshape(*batch_shape, *out.shape[1:]).to(x.dtype)


class VarianceHead(nn.Module):
    """A network with two outputs per data entry, returned as the pair (ε, v): the noise prediction and the
    reverse variance's interpolation value (Improved DDPM; see
    :func:`pvae.models.diffusion.chain.learned_log_variance`).

    :param network: ``network(x, t)`` of shape (..., 2·d_1, d_2, …) for x of shape (..., d_1, d_2, …).
    :param event_dims: number of trailing dimensions of one datum.
    """

    def __init__(self, network: nn.Module, event_dims: int):
        super().__init__()
        self.network = network
        self.event_dims = check_int("event_dims", event_dims)

    def forward(self, x: torch.Tensor, t) -> tuple[torch.Tensor, torch.Tensor]:
        eps, v = self.network(x, t).chunk(2, dim=-self.event_dims)
        return eps, v


def default_denoiser(
    data_shape: Sequence[int], timesteps: int, *, learned_variance: bool = False, **options
) -> nn.Module:
    """The default ε-network for ``data_shape``: an MLP for (D,), a U-Net for (C, H, W); with
    ``learned_variance``, the same network with twice the outputs behind a :class:`VarianceHead`.

    :param options: ``hidden_dim``/``num_blocks`` for the MLP, ``channels`` for the U-Net.
    """
    data_shape = tuple(data_shape)
    outputs = 2 if learned_variance else 1
    if len(data_shape) == 1:
        network = MLPDenoiser(
            data_shape[0],
            timesteps,
            hidden_dim=options.get("hidden_dim", 128),
            num_blocks=options.get("num_blocks", 3),
            outputs=outputs,
        )
    elif len(data_shape) == 3:
        channels = options.get("channels", (32, 64))
        network = UNetDenoiser(data_shape, timesteps, channels=channels, outputs=outputs)
    else:
        network = None
    if network is not None:
        return VarianceHead(network, len(data_shape)) if learned_variance else network
    raise ValueError(
        f"there is no default denoiser for data_shape {data_shape}: use (D,) or (C, H, W), or pass denoiser="
    )
