"""Training base classifiers under noise: one seeded, resumable loop and the objectives it optimizes."""

from smoothcert.training.loop import LOG_COLUMNS, learning_rate, noisy_accuracy, train
from smoothcert.training.objectives import OBJECTIVES, Objective, make_objective

__all__ = ["LOG_COLUMNS", "learning_rate", "noisy_accuracy", "train", "OBJECTIVES", "Objective", "make_objective"]
