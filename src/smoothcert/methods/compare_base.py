"""Keep the optimized noise only where it is expected to certify more than the base noise at ``--sigma``.

The data-dependent objectives (seed 000 eq. 3.7, 3.15; seed 003 eq. 5) maximize the radius of the *expected*
probability, ``scale * gap(E[softmax])``, with no regard for the certification sample size. Where a model stays
confident far from its data (a ReLU network's far field), the objective keeps growing with the scale while the
probability sinks towards 1/2: on ``toy-curved`` DDS drives sigma from 0.25 to 1.5-2 for most inputs, and at
``n = 1,000`` the Clopper-Pearson bound of a probability near 0.6 then certifies less than ``sigma_0`` does, or
abstains.

``--compare-base N`` (:func:`compare_with_base`) estimates, for each input, the proxy radius that the run's own
certification (``n`` samples, level ``alpha``) would give with the optimized noise and with the base noise,
each from ``N`` samples of its own stream (``compare-optimized`` and ``compare-base``), and certifies the
larger. The choice, like the optimization, sees neither the selection nor the estimation samples of
certification, so the certificate keeps Cohen's guarantee for the chosen noise (and memory makes it sound across
inputs); only the choice's cost, ``2 N`` forward passes per input, is added.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from smoothcert.engine.sampling import sample_counts
from smoothcert.geometry.linalg import geometric_mean
from smoothcert.methods.base import RunContext
from smoothcert.noise.base import Noise
from smoothcert.stats.bounds import clopper_pearson_lower

__all__ = ["predicted_proxy", "compare_with_base"]


def predicted_proxy(ctx: RunContext, x: torch.Tensor, noises: Sequence[Noise], samples: int,
                    generators: Sequence[torch.Generator]) -> np.ndarray:
    """Per input, the proxy radius that certification at ``ctx.n``, ``ctx.alpha`` is expected to give.

    ``p_hat`` = the top class's share of ``samples`` draws from ``generators``; the expected lower bound is the
    one-sided Clopper-Pearson bound of ``round(p_hat n)`` successes in ``n``; the radius is the noise family's gap
    of that bound times the geometric mean of the noise's scales (seed 000 eq. 3.14), 0 where it would abstain.
    """
    counts = sample_counts(ctx.model, x, list(noises), samples, ctx.num_classes, batch_size=ctx.batch_size,
                           block=ctx.block, generators=generators, dtype=ctx.dtype)
    p_hat = counts.max(dim=1).values.cpu().numpy() / samples
    p_lower = np.atleast_1d(clopper_pearson_lower(np.round(p_hat * ctx.n), ctx.n, ctx.alpha))
    out = np.zeros(len(noises))
    for i, noise in enumerate(noises):
        if p_lower[i] > 0.5:
            geo = float(geometric_mean(torch.as_tensor(noise.scales(), dtype=torch.float64).reshape(-1)))
            out[i] = noise.gap(float(p_lower[i])) * geo
    return out


def compare_with_base(ctx: RunContext, x: torch.Tensor, indices: Sequence[int], optimized: Sequence[Noise],
                      base: Noise, samples: int) -> list[bool]:
    """Per input, True where the base noise is expected to certify a larger proxy radius than the optimized one
    (:func:`predicted_proxy` on the separate ``compare-optimized`` and ``compare-base`` streams)."""
    proxy_optimized = predicted_proxy(ctx, x, optimized, samples, ctx.generators(indices, "compare-optimized"))
    proxy_base = predicted_proxy(ctx, x, [base] * len(optimized), samples, ctx.generators(indices, "compare-base"))
    return (proxy_base > proxy_optimized).tolist()
