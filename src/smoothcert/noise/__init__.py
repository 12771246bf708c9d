"""Smoothing distributions, one module per family; each owns its sampler, its gap and its certified region."""

from smoothcert.noise.base import Noise, noise_from_parameters
from smoothcert.noise.gaussian import DiagonalGaussian, FullGaussian, IsotropicGaussian, RotatedGaussian
from smoothcert.noise.laplace import Laplace, laplace_l1_radius
from smoothcert.noise.uniform import UniformDiagonal, uniform_l1_radius, uniform_linf_radius, uniform_tv
from smoothcert.noise.families import FAMILIES, family_noise
from smoothcert.noise.discrete import DiscretizedGaussian
from smoothcert.noise.lowrank import LowRankGaussian

__all__ = ["Noise", "noise_from_parameters", "IsotropicGaussian", "DiagonalGaussian", "RotatedGaussian",
           "FullGaussian", "UniformDiagonal", "uniform_tv", "Laplace", "laplace_l1_radius", "uniform_l1_radius",
           "uniform_linf_radius", "FAMILIES", "family_noise", "DiscretizedGaussian", "LowRankGaussian"]
