"""Quality scores of auxiliary (e.g. synthetic) anomalies: EAP, the rarity score, the baseline scores and the
data-valuation baselines; :mod:`anomgen.quality.set_scoring` applies them to a synthetic set."""

from anomgen.quality.base import QualityScorer
from anomgen.quality.baselines import (
    DensityQuality,
    PosteriorPlusDensity,
    PosteriorQuality,
    RandomQuality,
    RarityQuality,
)
from anomgen.quality.eap import EAP, eap_posterior
from anomgen.quality.rarity import (
    k_hat,
    knn_radii,
    minimal_k,
    rarity_density,
    rarity_score,
)
from anomgen.quality.valuation import DataOOB, KNNShapley, LeaveOneOut

__all__ = [
    "EAP",
    "DataOOB",
    "KNNShapley",
    "LeaveOneOut",
    "DensityQuality",
    "PosteriorPlusDensity",
    "PosteriorQuality",
    "QualityScorer",
    "RandomQuality",
    "RarityQuality",
    "eap_posterior",
    "k_hat",
    "knn_radii",
    "minimal_k",
    "rarity_density",
    "rarity_score",
]
