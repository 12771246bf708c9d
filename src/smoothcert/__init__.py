"""smoothcert: certified robustness by randomized smoothing.

Turn any PyTorch classifier into a smoothed classifier and certify each prediction: a region around the
input (a ball or an ellipsoid) inside which no perturbation changes the answer, with probability at least
``1 - alpha``. Noise is added in the model's input space (pixels in [0, 1]); sigma is in those units.
"""

from .checkpoint import load_checkpoint, save_checkpoint
from .data import DATASETS, load_dataset
from .models import build_model, model_for_dataset
from .noise import DiagonalGaussian, FullGaussian, IsotropicGaussian, Noise, RotatedGaussian, noise_from_parameters
from .regions import Ball, Ellipsoid, Region
from .sampling import input_generator, sample_counts
from .smooth import ABSTAIN, Certificate, Smooth, certify, predict
from .stats import binomial_pvalue, clopper_pearson_lower, clopper_pearson_upper
from .ensemble import Ensemble, load_ensemble
from .objectives import OBJECTIVES, Objective, make_objective
from .pca import PCAProjection, add_pca, fit_pca  # also registers the "pca" layer kind for checkpoints
from .training import train
from .firstorder import FirstOrderCertificate, Subspace, certify_first_order
from .methods import CertifyMethod, RunContext, method_class
from .geometry import CrossPolytope, distance_to_region, intersects, largest_ball_outside
from .memory import CertificationMemory

__version__ = "0.1.0"

__all__ = [
    "ABSTAIN", "DATASETS", "Ball", "build_model", "load_checkpoint", "load_dataset", "model_for_dataset",
    "save_checkpoint", "Certificate", "DiagonalGaussian", "Ellipsoid", "FullGaussian", "IsotropicGaussian",
    "Noise", "Region", "RotatedGaussian", "Smooth", "binomial_pvalue", "certify", "clopper_pearson_lower",
    "clopper_pearson_upper", "input_generator", "noise_from_parameters", "predict", "sample_counts",
    "Ensemble", "load_ensemble", "OBJECTIVES", "Objective", "make_objective", "PCAProjection", "add_pca", "fit_pca",
    "train", "FirstOrderCertificate", "Subspace", "certify_first_order", "CertifyMethod", "RunContext", "method_class",
    "CrossPolytope", "distance_to_region", "intersects", "largest_ball_outside", "CertificationMemory",
]
