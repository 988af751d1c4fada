"""Inference that works for any model/guide pair; installed as ``pvae.inference``.

Nothing here imports a concrete family: exact quantities come in as callables.
"""

from pvae.inference import distributed
from pvae.inference.compare import Comparison, SiteDensities, compare
from pvae.inference.diagnostics import (
    KHAT_GOOD,
    KHAT_MIN_SAMPLES,
    KHAT_UNRELIABLE,
    ECDFBand,
    InferenceGaps,
    SBCResult,
    ecdf_band,
    inference_gaps,
    khat_threshold,
    pareto_khat,
    psis_khat,
    rank_chi_square,
    sbc,
)
from pvae.inference.evaluate import LogLikelihood, evaluate_log_likelihood
from pvae.inference.evidence import estimator_spread, log_evidence, log_weights
from pvae.inference.objectives import IWAE_ELBO, make_elbo
from pvae.inference.step import SVIStep
from pvae.inference.svi import fit, scheduled_adam, scheduled_lr
from pvae.inference.train import History, train

__all__ = [
    "IWAE_ELBO",
    "KHAT_GOOD",
    "KHAT_MIN_SAMPLES",
    "KHAT_UNRELIABLE",
    "Comparison",
    "ECDFBand",
    "History",
    "InferenceGaps",
    "LogLikelihood",
    "SBCResult",
    "SVIStep",
    "SiteDensities",
    "compare",
    "distributed",
    "ecdf_band",
    "estimator_spread",
    "evaluate_log_likelihood",
    "fit",
    "inference_gaps",
    "khat_threshold",
    "log_evidence",
    "log_weights",
    "make_elbo",
    "pareto_khat",
    "psis_khat",
    "rank_chi_square",
    "sbc",
    "scheduled_adam",
    "scheduled_lr",
    "train",
]
