"""Inference that works for any model/guide pair; installed as ``pvae.inference``.

Nothing here imports a concrete family: exact quantities come in as callables.
"""

from pvae.inference.compare import Comparison, compare
from pvae.inference.evidence import estimator_spread, log_evidence, per_datum_log_weights
from pvae.inference.svi import fit

__all__ = ["Comparison", "compare", "estimator_spread", "fit", "log_evidence", "per_datum_log_weights"]
