"""The DDPM family's configuration: the dataclass a checkpoint stores, and the checks of its values."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from pvae.checks import check_choice, check_int
from pvae.models.diffusion.chain import DECODERS
from pvae.models.diffusion.schedules import REVERSE_VARIANCES, SCHEDULES, check_timesteps

__all__ = ["HYBRID_WEIGHT", "OBJECTIVES", "TIME_SAMPLING", "DDPMConfig", "checked_config"]

OBJECTIVES = ("elbo", "meanfield", "simple", "hybrid")
HYBRID_WEIGHT = 0.001  # λ of Improved DDPM's hybrid objective L_simple + λ·L_vlb
TIME_SAMPLING = ("plate", "per_datum", "stratified", "importance")


@dataclass
class DDPMConfig:
    """Constructor arguments of :class:`~pvae.models.diffusion.DDPM` (what a checkpoint stores)."""

    data_shape: tuple[int, ...] = (2,)
    timesteps: int = 1000
    schedule: str = "linear"
    reverse_variance: str = "beta"
    decoder: str = "gaussian"
    ema_decay: float = 0.0
    hidden_dim: int = 128
    num_blocks: int = 3
    channels: tuple[int, ...] = (32, 64)
    time_sampling: str = "plate"
    name: str | None = None


MAX_BLOCKS = 256  # residual blocks of the MLP denoiser
MAX_LEVELS = 8  # U-Net levels (each halves the resolution)
MAX_WIDTH = 65_536  # hidden width or channels of one layer
MAX_DATUM = 2**24  # entries of one datum


def checked_config(
    data_shape: Sequence[int],
    timesteps: int,
    schedule: str,
    reverse_variance: str,
    decoder: str | None,
    ema_decay: float | None,
    hidden_dim: int,
    num_blocks: int,
    channels: Sequence[int],
    time_sampling: str,
    name: str | None,
) -> DDPMConfig:
    """The config of these constructor arguments, with the defaults that depend on the data filled in
    (images (C, H, W): the discretized decoder and EMA 0.999; otherwise Gaussian and no EMA); a
    ``ValueError`` naming the first argument out of range."""
    try:
        data_shape = tuple(int(size) for size in data_shape)
    except (TypeError, ValueError) as error:
        raise ValueError(f"data_shape must be a tuple of positive ints, got {data_shape!r}") from error
    if not data_shape or min(data_shape) < 1:
        raise ValueError(f"data_shape must be a non-empty tuple of positive ints, got {data_shape!r}")
    check_timesteps(timesteps)
    check_choice("schedule", schedule, SCHEDULES)
    check_choice("reverse_variance", reverse_variance, REVERSE_VARIANCES)
    is_image = len(data_shape) == 3
    if decoder is None:
        decoder = "discretized" if is_image else "gaussian"
    if decoder not in DECODERS:
        raise ValueError(f"decoder must be one of {DECODERS} (or None for the default), got {decoder!r}")
    if ema_decay is None:
        ema_decay = 0.999 if is_image else 0.0
    if isinstance(ema_decay, bool) or not (
        isinstance(ema_decay, int | float) and 0.0 <= float(ema_decay) < 1.0
    ):
        raise ValueError(f"ema_decay must be a number in [0, 1) (0 turns EMA off), got {ema_decay!r}")
    check_choice("time_sampling", time_sampling, TIME_SAMPLING)
    # structural sizes: each layer is built (on the meta device too) before the family can be sized, so a
    # count from an untrusted file is bounded here, not only by the total element limit
    check_int("num_blocks", num_blocks, 1, MAX_BLOCKS)
    check_int("hidden_dim", hidden_dim, 1, MAX_WIDTH)
    if not isinstance(channels, Sequence) or not 1 <= len(channels) <= MAX_LEVELS:
        raise ValueError(f"channels must list 1 to {MAX_LEVELS} U-Net widths, got {channels!r}")
    for width in channels:
        check_int("channels", width, 1, MAX_WIDTH)
    if len(data_shape) > 3 or math.prod(data_shape) > MAX_DATUM:
        raise ValueError(f"data_shape must have at most 3 dims and {MAX_DATUM:,} entries, got {data_shape!r}")
    return DDPMConfig(
        data_shape=data_shape,
        timesteps=timesteps,
        schedule=schedule,
        reverse_variance=reverse_variance,
        decoder=decoder,
        ema_decay=float(ema_decay),
        hidden_dim=hidden_dim,
        num_blocks=num_blocks,
        channels=tuple(int(width) for width in channels),
        time_sampling=time_sampling,
        name=name,
    )
