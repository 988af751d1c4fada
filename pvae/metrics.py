"""Sample quality of generated digits, measured by a small digit classifier trained on real ones.

Two numbers say how good a batch of generated 28×28 digits is:

- :func:`frechet_distance` — the Fréchet distance between Gaussians fitted to the classifier's features of
  generated and of real digits (Heusel et al. 2017, the FID with a digit classifier in place of Inception):

  .. math:: d^2 = \\lVert \\mu_g - \\mu_r \\rVert^2 + \\operatorname{tr}\\big(\\Sigma_g + \\Sigma_r
            - 2 (\\Sigma_g \\Sigma_r)^{1/2}\\big);

  0 for identical feature statistics, growing as samples blur, get noisy or leave the data.
- :func:`label_histogram` — how many samples the classifier puts in each class, and the entropy of those
  fractions in nats: log 10 when every digit is drawn equally often, 0 when one digit is all there is
  (mode collapse).

The classifier (:class:`DigitClassifier`) is trained on the ``mnist5k`` **train** split
(:func:`pvae.data.load_images`), deterministically given its seed, and its accuracy on the ``mnist5k``
**test** split is stored with it. It is trained on first use and cached in the user's cache folder
(:func:`classifier_cache_path`); the cache file is untrusted input, checked tensor by tensor on every load,
and retrained with a warning when it is unreadable, damaged or stale.

Images are (n, 784) rows or (n, 1, 28, 28) images of grey levels in [0, 1], as
:meth:`pvae.data.ImageData.flat` gives them. Every result lives on the device of its input.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import warnings
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from pvae.checks import check_finite, check_int
from pvae.data import MNIST5K_TRAIN_PER_CLASS, load_images, mnist5k_path
from pvae.utils import progress_bar, resolve_device, torch_threads, write_atomically

__all__ = [
    "DigitClassifier",
    "LabelHistogram",
    "classifier_cache_path",
    "digit_classifier",
    "frechet_distance",
    "label_histogram",
]

NUM_CLASSES = 10
IMAGE_SHAPE = (1, 28, 28)
_NUM_PIXELS = math.prod(IMAGE_SHAPE)
_CHUNK = 256  # images per forward pass when scoring: bounds activation memory, stays in cache

# Bump when the forward pass changes in a way the parameter shapes do not show (an activation, a pooling).
_ARCHITECTURE_VERSION = 1
_CACHE_FORMAT = "pvae.metrics.digit_classifier/1"
_CACHE_FIELDS = frozenset({"format", "key", "state_dict", "test_accuracy"})


@dataclass(frozen=True)
class _Training:
    """How the classifier is trained; every field goes into the cache key."""

    epochs: int = 3
    batch_size: int = 64
    lr: float = 2e-3


_TRAINING = _Training()


class DigitClassifier(nn.Module):
    """A small convolutional classifier for 28×28 digits in [0, 1].

    conv 3×3 (1→16) → ReLU → max-pool 2 → conv 3×3 (16→32) → ReLU → max-pool 2 → linear (1568→128) gives
    the 128 **features** the Fréchet distance compares; ReLU and a last linear layer map them to 10 logits.
    The features are taken before that ReLU: units that never fire would otherwise add directions of zero
    variance, and pre-activations are closer to the Gaussian the distance assumes.

    :attr num_features: the feature size (what torchmetrics' ``FrechetInceptionDistance`` reads).
    :attr test_accuracy: accuracy on the ``mnist5k`` test split, set by :func:`digit_classifier`
        (``None`` for an untrained network).
    """

    num_features = 128

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 16, kernel_size=3, padding=1)
        self.conv2 = nn.Conv2d(16, 32, kernel_size=3, padding=1)
        self.hidden = nn.Linear(32 * 7 * 7, self.num_features)
        self.logits = nn.Linear(self.num_features, NUM_CLASSES)
        self.test_accuracy: float | None = None

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """Hidden-layer pre-activations of (n, 1, 28, 28) images: (n, 128)."""
        hidden = F.max_pool2d(F.relu(self.conv1(images)), 2)  # (n, 16, 14, 14)
        hidden = F.max_pool2d(F.relu(self.conv2(hidden)), 2)  # (n, 32, 7, 7)
        return self.hidden(hidden.flatten(1))  # (n, 128)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Class logits of (n, 1, 28, 28) images: (n, 10)."""
        return self.logits(F.relu(self.features(images)))  # (n, 10)


@dataclass(frozen=True)
class LabelHistogram:
    """The classifier's verdict on a batch of samples.

    :attr counts: (10,) int64 tensor on the samples' device: how many samples fall in each class.
    :attr entropy: entropy of ``counts / n`` in nats; log 10 for uniform classes, 0 for a single one.
    """

    counts: torch.Tensor
    entropy: float


# ---------------------------------------------------------------------------------------------- the cache


def _blank_classifier() -> DigitClassifier:
    """A freshly built network, made without drawing from the caller's random stream."""
    with torch.random.fork_rng(devices=[]):
        return DigitClassifier()


def _cache_folder(cache_dir: str | os.PathLike | None) -> str:
    if cache_dir is not None:
        return os.fspath(cache_dir)
    if os.environ.get("PVAE_CACHE_DIR"):
        return os.environ["PVAE_CACHE_DIR"]
    if os.environ.get("XDG_CACHE_HOME"):
        return os.path.join(os.environ["XDG_CACHE_HOME"], "pvae")
    return os.path.join(os.path.expanduser("~"), ".cache", "pvae")


def _cache_key(seed: int) -> str:
    """A digest of everything that decides the trained weights: architecture, training, seed and data."""
    with open(mnist5k_path(), "rb") as handle:
        data_digest = hashlib.sha256(handle.read()).hexdigest()
    parameters = _blank_classifier().state_dict().items()
    shapes = [[name, list(value.shape), str(value.dtype)] for name, value in parameters]
    recipe = {
        "architecture": [_ARCHITECTURE_VERSION, shapes],
        "training": [_TRAINING.epochs, _TRAINING.batch_size, _TRAINING.lr],
        "seed": seed,
        "data": ["mnist5k", data_digest, MNIST5K_TRAIN_PER_CLASS],
    }
    return hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).hexdigest()


def classifier_cache_path(cache_dir: str | os.PathLike | None = None, seed: int = 0) -> str:
    """Where :func:`digit_classifier` keeps the trained classifier for ``seed``.

    The folder is ``cache_dir`` when given, else ``$PVAE_CACHE_DIR``, else ``$XDG_CACHE_HOME/pvae``, else
    ``~/.cache/pvae``; the file name carries a digest of the architecture, training recipe, seed and the
    ``mnist5k`` data file, so changing any of them never picks up old weights.
    """
    check_int("seed", seed, low=0)
    return _cache_file(cache_dir, _cache_key(seed))


def _cache_file(cache_dir: str | os.PathLike | None, key: str) -> str:
    return os.path.join(_cache_folder(cache_dir), f"digit_classifier-{key[:16]}.pt")


def _read_cache(path: str, key: str) -> tuple[DigitClassifier | None, str]:
    """The classifier stored at ``path``, or ``(None, reason)``; nothing in the file is called or imported."""
    fresh = _blank_classifier()
    expected = fresh.state_dict()
    size_limit = 4 * sum(value.numel() * value.element_size() for value in expected.values()) + 2**20
    try:
        if os.path.getsize(path) > size_limit:
            return None, f"it is larger than {size_limit} bytes"
        stored = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # an untrusted file may fail to unpickle in any way
        return None, f"it cannot be read as a weights-only torch file ({type(error).__name__})"
    if not isinstance(stored, dict) or set(stored) != _CACHE_FIELDS:
        return None, f"it is not a dict with the fields {sorted(_CACHE_FIELDS)}"
    if not (type(stored["format"]) is str and stored["format"] == _CACHE_FORMAT):
        return None, f"its format is not {_CACHE_FORMAT!r}"
    if not (type(stored["key"]) is str and stored["key"] == key):
        return None, "it was written for another architecture, seed, training recipe or data version"
    accuracy = stored["test_accuracy"]
    if type(accuracy) is not float or not 0.0 <= accuracy <= 1.0:
        return None, f"its test_accuracy is not a number in [0, 1]: {accuracy!r}"
    weights = stored["state_dict"]
    if not isinstance(weights, dict) or set(weights) != set(expected):
        return None, f"its state_dict does not hold exactly the entries {sorted(expected)}"
    for name, reference in expected.items():
        value = weights[name]
        if (
            not isinstance(value, torch.Tensor)
            or value.layout != torch.strided
            or value.dtype != reference.dtype
            or value.shape != reference.shape
        ):
            shape = tuple(reference.shape)
            return None, f"its entry {name!r} is not a {reference.dtype} tensor of shape {shape}"
        if not torch.isfinite(value).all():
            return None, f"its entry {name!r} has NaN/inf values"
    fresh.load_state_dict(weights, strict=True)
    fresh.test_accuracy = accuracy
    return fresh, ""


# ----------------------------------------------------------------------------------------------- training


@torch.no_grad()
def _accuracy(classifier: DigitClassifier, images: torch.Tensor, labels: torch.Tensor) -> float:
    """The fraction of (n, 1, 28, 28) ``images`` whose predicted class is their label."""
    correct = sum(
        int((classifier(chunk).argmax(dim=1) == labels[start : start + len(chunk)]).sum())
        for start, chunk in _chunks(images)
    )
    return correct / len(images)


def _train(seed: int, progress: bool) -> DigitClassifier:
    """Train on the mnist5k train split with Adam and cross-entropy, on the CPU with one thread.

    One thread and the CPU make the weights a function of the seed alone, whatever the machine's thread
    count or accelerator; the initialisation draws from a forked global generator, which is left untouched.
    """
    train, test = load_images("mnist5k", "train"), load_images("mnist5k", "test")
    images = train.flat().reshape(-1, *IMAGE_SHAPE)  # (4000, 1, 28, 28)
    labels = train.labels
    with torch_threads(1), torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        classifier = DigitClassifier()
        order = torch.Generator().manual_seed(seed)
        optimizer = torch.optim.Adam(classifier.parameters(), lr=_TRAINING.lr)
        steps_per_epoch = math.ceil(len(images) / _TRAINING.batch_size)
        with progress_bar(
            total=_TRAINING.epochs * steps_per_epoch, progress=progress, desc="training digit classifier"
        ) as bar:
            for _ in range(_TRAINING.epochs):
                permutation = torch.randperm(len(images), generator=order)
                for start in range(0, len(images), _TRAINING.batch_size):
                    batch = permutation[start : start + _TRAINING.batch_size]
                    loss = F.cross_entropy(classifier(images[batch]), labels[batch])
                    optimizer.zero_grad()
                    loss.backward()
                    optimizer.step()
                    bar.update(1)
                    bar.set_postfix(loss=f"{loss.item():.3f}", refresh=False)
        classifier.eval()
        classifier.test_accuracy = _accuracy(classifier, test.flat().reshape(-1, *IMAGE_SHAPE), test.labels)
    return classifier


def digit_classifier(
    cache_dir: str | os.PathLike | None = None,
    device: str | torch.device | None = None,
    *,
    seed: int = 0,
    progress: bool = True,
) -> DigitClassifier:
    """The digit classifier behind :func:`frechet_distance` and :func:`label_histogram`, in eval mode.

    Loaded from :func:`classifier_cache_path` when a valid file is there; otherwise trained (on the CPU,
    with a progress bar on a terminal) and written there atomically. A file that cannot be read,
    fails a check (fields, tensor names, shapes, dtypes, finite values) or belongs to another recipe is
    replaced by a retrained classifier, with a warning. When the folder cannot be written, the trained
    classifier is returned anyway, with a warning.

    :param cache_dir: folder for the cache file (default: see :func:`classifier_cache_path`).
    :param device: where to put the classifier: ``"cpu"``, ``"cuda"`` or ``"cuda:N"`` (default: the CPU).
        Training always runs on the CPU, so the weights do not depend on it.
    :param seed: seeds the initialisation and the order of the training data.
    :param progress: show a progress bar while training (only when stderr is a terminal).
    :returns: a :class:`DigitClassifier` whose ``test_accuracy`` is set.
    """
    check_int("seed", seed, low=0)
    target = torch.device("cpu") if device is None else resolve_device(device)
    key = _cache_key(seed)
    path = _cache_file(cache_dir, key)
    classifier = None
    if os.path.exists(path):
        classifier, problem = _read_cache(path, key)
        if classifier is None:
            warnings.warn(
                f"the cached digit classifier {path} is unusable ({problem}); retraining it", stacklevel=2
            )
    if classifier is None:
        classifier = _train(seed, progress)
        record = {
            "format": _CACHE_FORMAT,
            "key": key,
            "state_dict": classifier.state_dict(),
            "test_accuracy": classifier.test_accuracy,
        }
        try:
            write_atomically(path, lambda handle: torch.save(record, handle))
        except OSError as error:
            warnings.warn(f"could not cache the digit classifier at {path} ({error})", stacklevel=2)
    return classifier.eval().to(target)


# ---------------------------------------------------------------------------------------------- measuring


def _as_images(name: str, values, minimum: int) -> torch.Tensor:
    """``values`` as (n, 1, 28, 28) grey levels, after checking shape, finiteness and the range [0, 1]."""
    check_finite(name, values)
    if values.shape[1:] not in ((_NUM_PIXELS,), IMAGE_SHAPE):
        raise ValueError(f"{name} must have shape (n, 784) or (n, 1, 28, 28), got {tuple(values.shape)}")
    if values.shape[0] < minimum:
        raise ValueError(f"{name} must hold at least {minimum} images, got {values.shape[0]}")
    outside = int(((values < 0) | (values > 1)).sum())
    if outside:
        raise ValueError(
            f"{name} must be grey levels in [0, 1]; {outside} of {values.numel()} entries are outside"
        )
    return values.reshape(-1, *IMAGE_SHAPE)


def _classifier_for(classifier, images: torch.Tensor) -> DigitClassifier:
    if classifier is None:
        classifier = digit_classifier()
    elif not isinstance(classifier, DigitClassifier):
        raise ValueError(
            f"classifier must be a pvae.metrics.DigitClassifier (or None), got {type(classifier).__name__}"
        )
    return classifier.eval().to(images.device)


def _chunks(images: torch.Tensor) -> Iterator[tuple[int, torch.Tensor]]:
    for start in range(0, len(images), _CHUNK):
        yield start, images[start : start + _CHUNK]


class _Features(nn.Module):
    """The classifier's features in float64, the extractor handed to torchmetrics."""

    def __init__(self, classifier: DigitClassifier):
        super().__init__()
        self.classifier = classifier
        self.num_features = classifier.num_features
        self.dtype = next(classifier.parameters()).dtype

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.classifier.features(images.to(self.dtype)).double()  # (n, 128)


def frechet_distance(
    generated: torch.Tensor, real: torch.Tensor, classifier: DigitClassifier | None = None
) -> float:
    """Fréchet distance between generated and real digits in the classifier's feature space.

    Computed by torchmetrics' ``FrechetInceptionDistance`` with :class:`DigitClassifier` features as the
    extractor; the feature sums, covariances and the distance are float64. Lower is better; it is a biased
    estimate that shrinks as n grows, so compare numbers computed on equally many images.

    :param generated: (n, 784) or (n, 1, 28, 28) grey levels in [0, 1], n ≥ 2.
    :param real: the same for real digits (m ≥ 2); moved to ``generated``'s device.
    :param classifier: the feature extractor (default :func:`digit_classifier`); moved to that device.
    :returns: the distance d² (a float).
    :raises ValueError: for a wrong shape, fewer than 2 images, NaN/inf, or values outside [0, 1].
    """
    from torchmetrics.image.fid import FrechetInceptionDistance  # slow to import: loaded when used

    generated = _as_images("generated", generated, minimum=2)
    real = _as_images("real", real, minimum=2).to(generated.device)
    classifier = _classifier_for(classifier, generated)
    metric = FrechetInceptionDistance(feature=_Features(classifier), normalize=True).to(generated.device)
    for images, is_real in ((real, True), (generated, False)):
        for _, chunk in _chunks(images):
            metric.update(chunk, real=is_real)
    return float(metric.compute())


@torch.no_grad()
def label_histogram(samples: torch.Tensor, classifier: DigitClassifier | None = None) -> LabelHistogram:
    """Counts of the classifier's predicted labels and their entropy: how many digits a sampler covers.

    .. math:: H = -\\sum_k p_k \\log p_k, \\qquad p_k = \\mathrm{counts}_k / n \\quad (0 \\log 0 = 0).

    :param samples: (n, 784) or (n, 1, 28, 28) grey levels in [0, 1], n ≥ 1.
    :param classifier: default :func:`digit_classifier`; moved to the samples' device.
    :returns: :class:`LabelHistogram` with ``counts`` (10,) on the samples' device and ``entropy`` in nats.
    :raises ValueError: for a wrong shape, no images, NaN/inf, or values outside [0, 1].
    """
    samples = _as_images("samples", samples, minimum=1)
    classifier = _classifier_for(classifier, samples)
    dtype = next(classifier.parameters()).dtype
    counts = torch.zeros(NUM_CLASSES, dtype=torch.int64, device=samples.device)
    for _, chunk in _chunks(samples):
        counts += torch.bincount(classifier(chunk.to(dtype)).argmax(dim=1), minlength=NUM_CLASSES)
    fractions = counts.double() / len(samples)
    entropy = torch.special.entr(fractions).sum()  # entr(p) = -p log p, entr(0) = 0
    return LabelHistogram(counts=counts, entropy=float(entropy))
