"""Base classifiers: architectures, safetensors checkpoints, ensembles and the PCA input layer."""

from smoothcert.models.architectures import build_model, model_for_dataset
from smoothcert.models.checkpoint import load_checkpoint, save_checkpoint
from smoothcert.models.denoiser import DenoisedClassifier, DnCNN  # registers the "dncnn" architecture
from smoothcert.models.ensemble import Ensemble, load_ensemble
from smoothcert.models.layout import ChannelsLast
from smoothcert.models.pca import PCAProjection, ProjectedModel, add_pca, fit_pca  # registers the "pca" wrapper

__all__ = ["build_model", "model_for_dataset", "load_checkpoint", "save_checkpoint", "Ensemble", "load_ensemble",
           "PCAProjection", "ProjectedModel", "add_pca", "fit_pca", "DenoisedClassifier", "DnCNN", "ChannelsLast"]
