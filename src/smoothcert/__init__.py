"""smoothcert: certified robustness by randomized smoothing.

Turn any PyTorch classifier into a smoothed classifier and certify each prediction: a region around the
input (a ball or an ellipsoid) inside which no perturbation changes the answer, with probability at least
``1 - alpha``. Noise is added in the model's input space (pixels in [0, 1]); sigma is in those units.
"""

from smoothcert.models.checkpoint import load_checkpoint, save_checkpoint
from smoothcert.data.datasets import DATASETS, load_dataset
from smoothcert.models.architectures import build_model, model_for_dataset
from smoothcert.noise.gaussian import DiagonalGaussian, FullGaussian, IsotropicGaussian, RotatedGaussian
from smoothcert.noise.base import Noise, noise_from_parameters
from smoothcert.geometry.regions import Ball, Ellipsoid, Region
from smoothcert.engine.sampling import input_generator, sample_counts
from smoothcert.engine.smooth import ABSTAIN, Certificate, Smooth, certify, predict
from smoothcert.stats.bounds import binomial_pvalue, clopper_pearson_lower, clopper_pearson_upper
from smoothcert.models.ensemble import Ensemble, load_ensemble
from smoothcert.training.objectives import OBJECTIVES, Objective, make_objective
from smoothcert.models.pca import PCAProjection, add_pca, fit_pca  # also registers the "pca" layer kind for checkpoints
from smoothcert.training.loop import train
from smoothcert.methods.firstorder.certificate import FirstOrderCertificate, Subspace, certify_first_order
from smoothcert.methods.base import CertifyMethod, RunContext, method_class
from smoothcert.geometry.regions import CrossPolytope
from smoothcert.geometry.distance import distance_to_region, largest_ball_outside
from smoothcert.geometry.intersection import intersects
from smoothcert.methods.memory import CertificationMemory
from smoothcert.noise.discrete import DiscretizedGaussian
from smoothcert.noise.lowrank import LowRankGaussian
from smoothcert.geometry.lowrank import LowRankEllipsoid
from smoothcert.engine.sequential import Mode, certify_in_mode, certify_sequential

from smoothcert.version import __version__  # noqa: E402

__all__ = [
    "ABSTAIN", "DATASETS", "Ball", "build_model", "load_checkpoint", "load_dataset", "model_for_dataset",
    "save_checkpoint", "Certificate", "DiagonalGaussian", "Ellipsoid", "FullGaussian", "IsotropicGaussian",
    "Noise", "Region", "RotatedGaussian", "Smooth", "binomial_pvalue", "certify", "clopper_pearson_lower",
    "clopper_pearson_upper", "input_generator", "noise_from_parameters", "predict", "sample_counts",
    "Ensemble", "load_ensemble", "OBJECTIVES", "Objective", "make_objective", "PCAProjection", "add_pca", "fit_pca",
    "train", "FirstOrderCertificate", "Subspace", "certify_first_order", "CertifyMethod", "RunContext", "method_class",
    "CrossPolytope", "distance_to_region", "intersects", "largest_ball_outside", "CertificationMemory",
    "DiscretizedGaussian", "Mode", "certify_in_mode", "certify_sequential", "LowRankGaussian", "LowRankEllipsoid",
]
