"""Smoothing distributions, one module per family; each owns its sampler, its gap and its certified region."""

from smoothcert.noise.base import Noise, noise_from_parameters
from smoothcert.noise.gaussian import DiagonalGaussian, FullGaussian, IsotropicGaussian, RotatedGaussian
from smoothcert.noise.uniform import UniformDiagonal, uniform_tv
from smoothcert.noise.discrete import DiscretizedGaussian

__all__ = ["Noise", "noise_from_parameters", "IsotropicGaussian", "DiagonalGaussian", "RotatedGaussian",
           "FullGaussian", "UniformDiagonal", "uniform_tv", "DiscretizedGaussian"]
