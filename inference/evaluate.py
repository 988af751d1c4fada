"""Test-set log-likelihood of a trained model: IWAE-k estimates per image, averaged, with a standard error."""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass

import torch

from pvae.checks import check_int
from pvae.inference.evidence import log_evidence
from pvae.inference.train import batch_data
from pvae.utils import progress_bar, resolve_device, seed_everything

__all__ = ["LogLikelihood", "evaluate_log_likelihood"]

#: particles × images evaluated at once; bounds memory (about 8 kB per pair for a 784-400 VAE).
MAX_PAIRS_PER_CHUNK = 10_000


@dataclass
class LogLikelihood:
    """Mean of per-image log p̂(x) (nats per image) ± its standard error over images."""

    log_likelihood: float
    stderr: float | None  # None for a single image
    num_images: int
    num_samples: int
    per_image: torch.Tensor  # (num_images,) on the CPU

    def to_dict(self) -> dict:
        """Plain numbers: keys ``log_likelihood``, ``stderr``, ``num_images``, ``num_samples``."""
        return {
            "log_likelihood": self.log_likelihood,
            "stderr": self.stderr,
            "num_images": self.num_images,
            "num_samples": self.num_samples,
        }

    def __str__(self) -> str:
        error = "n/a" if self.stderr is None else f"{self.stderr:.2f}"
        return (
            f"log p(x) ≈ {self.log_likelihood:.2f} ± {error} nats per image "
            f"({self.num_images} images, k = {self.num_samples})"
        )


def _pair(family_or_model_guide):
    if isinstance(family_or_model_guide, tuple | list) and len(family_or_model_guide) == 2:
        model, guide = family_or_model_guide
        return model, guide, None
    model, guide = (
        getattr(family_or_model_guide, "model", None),
        getattr(family_or_model_guide, "guide", None),
    )
    if not (callable(model) and callable(guide)):
        raise ValueError(
            "family_or_model_guide must be a family with .model/.guide or a (model, guide) pair, "
            f"got {type(family_or_model_guide).__name__}"
        )
    return model, guide, family_or_model_guide


def evaluate_log_likelihood(
    family_or_model_guide,
    loader: Iterable,
    num_samples: int = 1000,
    *,
    particles_per_batch: int | None = None,
    device: str | torch.device | None = None,
    seed: int | None = None,
    progress: bool = True,
) -> LogLikelihood:
    r"""Estimate the test log-likelihood, in nats per image, with ``num_samples`` importance samples.

    For each image, :func:`pvae.inference.log_evidence` gives the IWAE-k estimate
    log p̂(x_n) = log (1/k) Σ_i p(x_n, z_i)/q(z_i | x_n), z_i ~ q(z | x_n) — a stochastic lower bound on
    log p(x_n) that tightens as k grows (Burda et al. 2016). The result is their mean over the images and
    the standard error of that mean, std/√n (it covers the spread over images, which dominates the
    Monte-Carlo error of each estimate at k = 1,000).

    :param family_or_model_guide: a family (``.model``/``.guide``) or a ``(model, guide)`` pair. A guide
        with a point-mass site (an autoencoder) raises ``ValueError``: it has no marginal likelihood.
    :param loader: iterable of ``x`` or ``(x, labels)`` batches (e.g. the test split, binarized once).
    :param num_samples: k, importance samples per image.
    :param particles_per_batch: particles drawn at once; default keeps particles × images ≤ 10,000 so
        memory stays bounded whatever k is.
    :param device: move the family there first; data follow the family's device.
    :param seed: seeds every generator first, for a reproducible estimate.
    :param progress: progress bar over batches (stderr, terminal only).
    :returns: :class:`LogLikelihood`.
    """
    num_samples = check_int("num_samples", num_samples)
    if particles_per_batch is not None:
        particles_per_batch = check_int("particles_per_batch", particles_per_batch)
    model, guide, family = _pair(family_or_model_guide)
    if family is not None and hasattr(family, "to"):
        if device is not None:
            family.to(resolve_device(device))
        target = getattr(family, "device", None)
    else:
        target = resolve_device(device) if device is not None else None
    if seed is not None:
        seed_everything(seed)
    was_training = getattr(family, "training", None)
    if was_training:
        family.eval()
    estimates = []
    try:
        for batch in progress_bar(loader, progress=progress, desc=f"log p(x), k={num_samples}"):
            x = batch_data(batch)
            if target is not None and x.device != target:
                x = x.to(target)
            chunk = particles_per_batch or max(1, min(num_samples, MAX_PAIRS_PER_CHUNK // max(1, x.shape[0])))
            estimate = log_evidence(model, guide, x, num_samples=num_samples, particles_per_batch=chunk)
            estimates.append(estimate.detach().cpu())
    finally:
        if was_training:
            family.train()
    if not estimates:
        raise ValueError("loader yielded no data")
    per_image = torch.cat(estimates).double()
    n = per_image.numel()
    stderr = float(per_image.std() / math.sqrt(n)) if n > 1 else None
    return LogLikelihood(float(per_image.mean()), stderr, n, num_samples, per_image)
