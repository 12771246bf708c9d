"""RANCER: non-axis-aligned anisotropic certification (seed 000 chapter 4, Algorithm 2).

Per input: the isotropic DDS scale ``theta_iso = sigma_x`` (eq. 3.7); the rotation ``U`` = eigenvectors of the
Hessian of the loss w.r.t. the input at ``x`` (section 4.2, eq. 4.7; :mod:`smoothcert.hessian`, the Jacobian
form ``J^T (diag(p) - p p^T) J`` for piecewise-linear networks); then ANCER's optimization of ``theta`` for the
noise ``U diag(theta) w`` (eq. 4.2-4.3), with ``theta`` clipped to ``[theta_iso (1 - lambda_1),
theta_iso (1 + lambda_2)]`` after every step (eq. 4.8; default ``lambda_1 = lambda_2 = 0.5``, the public
window ``[0.5, 1.5] x theta_iso``). The certificate is the rotated ellipsoid ``{||diag(1/theta) U^T delta||_2
<= gap}`` (eq. 4.4) on fresh samples, then memory.

``--rancer-scales`` (seed 000 section 4.3) chooses where the scales come from:

- ``isotropic`` (section 4.3.1, the default and the thesis' main algorithm): as above.
- ``eigen-init`` (section 4.3.2): the Hessian's eigenvalues, mapped to scales, start the optimization; the
  isotropic DDS stage is skipped, and the clipping window is centred on ``sigma_0`` (the run's ``--sigma``,
  Algorithm 2's ``sigma_0``) instead of ``theta_iso``.
- ``eigen-final`` (section 4.3.3): the mapped eigenvalues, clipped to the same window, are the final scales; no
  DDS stage and no optimization.

The thesis does not print the map from eigenvalues to scales; the two readings of its text are options
(``--rancer-eigen-map``):

- ``curvature`` (default): ``theta_i = sigma_0 sqrt(mean_j |lambda_j| / |lambda_i|)``. Section 4.2 reads the
  eigenvalues as the curvature profile (small ``|lambda|`` = flat = a safe direction in which to expand the
  noise). By the quadratic model of the loss (eq. 4.6), noise ``U diag(theta) w`` raises the expected loss by
  ``1/2 sum_i |lambda_i| theta_i^2`` (in absolute curvature); maximizing the volume ``sum_i log theta_i`` (ANCER's
  objective, eq. 3.14) at the curvature cost of isotropic noise at ``sigma_0`` (``1/2 sigma_0^2 sum_i
  |lambda_i|``) gives, by a Lagrange multiplier, ``|lambda_i| theta_i^2`` equal for every ``i``, which is the map
  above. A zero eigenvalue (flat direction; for ReLU networks all but ``K - 1`` of them) gives the window's upper
  end, a Hessian that is zero everywhere gives ``sigma_0``.
- ``direct``: ``theta_i = |lambda_i|`` ("using eigenvalues directly", section 4.3.3), then the window.

Either way ``theta`` is clipped to ``[sigma_0 (1 - lambda_1), sigma_0 (1 + lambda_2)]`` (eq. 4.8; section 4.4's
post-processing against over-smoothing) before and during the optimization, so the noise is a valid rotated
Gaussian and the certificate, the memory and its soundness are those of the isotropic-start RANCER: the scales
depend only on the input and the model, the certification samples are fresh.

An input whose Hessian is not finite keeps the identity basis (ANCER's axis-aligned noise, within the same
clipping window) and its row says ``basis = axis``.

``--rancer-rank K`` (K > 0; :mod:`smoothcert.methods.lowrank_rancer`): the low-rank form for large inputs. The top-K
eigenvectors (largest ``|lambda|``) come from Hessian-vector products (randomized subspace iteration, no d x d
matrix), the noise is ``sigma_perp w + Q ((s - sigma_perp) * (Q^T w))`` with the K scales ``s`` and
``sigma_perp`` optimized by the same clipped ascent (every one in the window above), and the certificate is the
region of :class:`~smoothcert.noise.lowrank.LowRankGaussian` (O(d K) numbers, also in memory). It needs the
isotropic start and ANCER's elementwise constraint; ``K > d`` is refused before any sampling. 0 (the default) is
the full-matrix path, unchanged.

``--method rancer-best``: the thesis runs ANCER and RANCER and keeps the better (section 5.5, "RANCER Run
Clarification"). Choosing between two certificates by their *certified* size would reuse the certification
samples for a selection and void the bound; here the choice is made before certification, on a separate
``choose`` stream: each candidate's proxy radius ``gap(p_hat) * geomean(theta)`` is estimated from
``--select-samples`` hard predictions under that candidate's noise (``p_hat`` the frequency of ``c_A``), the
larger wins, and only the winner is certified on the fresh ``select`` / ``estimate`` streams.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from smoothcert.geometry.linalg import geometric_mean
from smoothcert.methods.hessian import METHODS as HESSIAN_METHODS, hessian_basis, top_eigenvectors
from smoothcert.methods.lowrank_rancer import optimize_lowrank
from smoothcert.noise.gaussian import DiagonalGaussian, RotatedGaussian
from smoothcert.noise.lowrank import LowRankGaussian
from smoothcert.engine.sampling import sample_counts
from smoothcert.stats.bounds import gap as normal_gap
from smoothcert.methods.ancer import ANCER, ANCERSettings, optimize_ancer
from smoothcert.methods.base import RunContext
from smoothcert.methods.optimize import CLAMP, fallback_reason
from smoothcert.methods.datadependent import Choice, norm_setting
from smoothcert.settings import choice, integer, number

__all__ = ["RANCER", "RANCERBest", "RANCERSettings", "RANCERBestSettings", "SCALES", "EIGEN_MAPS", "eigen_scales"]

#: Where RANCER's scales come from (seed 000 sections 4.3.1-4.3.3).
SCALES = ("isotropic", "eigen-init", "eigen-final")
#: Maps from the Hessian's eigenvalues to scales (see the module docstring).
EIGEN_MAPS = ("curvature", "direct")


def eigen_scales(eigenvalues: torch.Tensor, sigma: float, lower: float, upper: float,
                 mapping: str = "curvature") -> torch.Tensor:
    """Scales (B, d) float64 from Hessian eigenvalues (B, d), clipped to ``[lower, upper]`` (seed 000 eq. 4.8).

    ``curvature``: ``sigma sqrt(mean_j |lambda_j| / |lambda_i|)`` (``upper`` where ``lambda_i = 0``, ``sigma``
    where every eigenvalue is 0); ``direct``: ``|lambda_i|``. See the module docstring for the derivation.
    """
    if mapping not in EIGEN_MAPS:
        raise ValueError(f"the eigenvalue map must be one of {', '.join(EIGEN_MAPS)}, got {mapping!r}")
    size = eigenvalues.abs().to(torch.float64)
    if mapping == "direct":
        theta = size
    else:
        mean = size.mean(dim=1, keepdim=True)
        ratio = torch.where(size > 0, mean / torch.where(size > 0, size, 1.0), torch.inf)
        theta = torch.where(mean > 0, sigma * ratio.sqrt(), torch.full_like(size, sigma))
    return theta.clamp(min=lower, max=upper)


@dataclass(frozen=True)
class RANCERSettings(ANCERSettings):
    """ANCER's settings (l2 only), then the clipping window (seed 000 eq. 4.8) and the Hessian's form."""

    norm: str = norm_setting("l2")
    rancer_lambda1: float = number(0.5, low=0.0, high=1.0, high_open=True,
                                   help="theta >= theta_iso (1 - lambda1) during optimization (seed 000 eq. 4.8)")
    rancer_lambda2: float = number(0.5, low=0.0, help="theta <= theta_iso (1 + lambda2) during optimization")
    hessian: str = choice("auto", HESSIAN_METHODS, help="Hessian form: auto (Jacobian form for piecewise-linear "
                                                        "networks), jacobian, double")
    rancer_scales: str = choice("isotropic", SCALES, help="RANCER's scales: isotropic = DDS start (seed 000 4.3.1); "
                                                          "eigen-init = mapped Hessian eigenvalues start the "
                                                          "optimization (4.3.2); eigen-final = they are the scales, "
                                                          "no optimization (4.3.3)")
    rancer_eigen_map: str = choice("curvature", EIGEN_MAPS, help="eigenvalue-to-scale map of the eigen variants: "
                                                                 "curvature = sigma sqrt(mean|lambda| / |lambda_i|); "
                                                                 "direct = |lambda_i|; then the clipping window")
    rancer_rank: int = integer(0, low=0, help="low-rank RANCER: K > 0 keeps the top-K Hessian eigenvectors (by "
                                              "Hessian-vector products, no d x d matrix) and one scale off them, "
                                              "O(d K) memory per certificate; 0 = the full-matrix path")


@dataclass(frozen=True)
class RANCERBestSettings(RANCERSettings):
    """RANCER's settings and the samples of the choice between ANCER and RANCER."""

    select_samples: int = integer(1000, low=1, help="samples per candidate on the separate choose stream")


class RANCER(ANCER):
    """``--method rancer``: DDS, Hessian eigenvector basis, clipped ANCER optimization in that basis; memory."""

    name = "rancer"
    columns = ANCER.columns + ("basis",)
    settings_type = RANCERSettings
    keywords = {**ANCER.keywords, "lambda1": "rancer_lambda1", "lambda2": "rancer_lambda2",
                "scales": "rancer_scales", "eigen_map": "rancer_eigen_map"}

    def optimize_rotated(self, ctx: RunContext, x: torch.Tensor, indices: Sequence[int], iso
                         ) -> tuple[Any, torch.Tensor, torch.Tensor]:
        """(RANCER result, basis (B, d, d) float64, finite-Hessian mask) given the DDS result ``iso`` (or, for the
        eigen variants, ``None``: the start and the window come from the eigenvalues and ``sigma_0``)."""
        s = self.settings
        basis, eigenvalues, finite, _ = hessian_basis(ctx.model, x, s.hessian)
        if iso is None:
            lower, upper = self.sigma * (1 - s.rancer_lambda1), self.sigma * (1 + s.rancer_lambda2)
            scale = eigen_scales(eigenvalues, self.sigma, lower, upper, s.rancer_eigen_map).float()
            classes = None
        else:
            scale = iso.params
            lower, upper, classes = scale * (1 - s.rancer_lambda1), scale * (1 + s.rancer_lambda2), iso.classes
        steps = 0 if s.rancer_scales == "eigen-final" else s.ancer_steps
        result = optimize_ancer(ctx.model, x, scale, generators=ctx.generators(indices, "optimize-rancer"),
                                lower=lower, upper=upper, basis=basis, steps=steps, lr=s.ancer_lr,
                                samples=s.opt_samples, kappa=s.kappa, gap=s.opt_gap, constraint=s.ancer_constraint,
                                classes=classes, max_batch=self.opt_batch(ctx, x))
        return result, basis, finite

    def check_input_shape(self, shape: tuple[int, ...]) -> None:
        """``--rancer-rank K`` needs ``K <= d`` and the isotropic start (checked before any sampling)."""
        super().check_input_shape(shape)
        s, d = self.settings, int(np.prod(shape)) if shape else 1
        if not s.rancer_rank:
            return
        if s.rancer_rank > d:
            raise ValueError(f"rancer_rank (--rancer-rank) must be 0 (the full-matrix path) or an integer in "
                             f"[1, d = {d}] (the input's dimension), got {s.rancer_rank}")
        if s.rancer_scales != "isotropic" or s.ancer_constraint != "elementwise" or self.name != "rancer":
            raise ValueError(f"rancer_rank (--rancer-rank) > 0 needs --method rancer with --rancer-scales isotropic "
                             f"and --ancer-constraint elementwise, got --method {self.name}, --rancer-scales "
                             f"{s.rancer_scales}, --ancer-constraint {s.ancer_constraint}")

    def choose_lowrank(self, ctx: RunContext, x: torch.Tensor, indices: Sequence[int]) -> list[Choice]:
        """DDS, the top-K eigenvectors (:func:`~smoothcert.methods.lowrank_rancer.top_eigenvectors`), then the
        clipped ascent on ``(s_1..s_K, sigma_perp)``; the noise is a :class:`LowRankGaussian`."""
        s, k = self.settings, self.settings.rancer_rank
        iso = self.dds_stage(ctx, x, indices)
        basis, _, finite = top_eigenvectors(ctx.model, x, k, generators=ctx.generators(indices, "hessian-lowrank"))
        scale = iso.params.reshape(-1)
        result = optimize_lowrank(ctx.model, x, scale, basis, generators=ctx.generators(indices, "optimize-rancer"),
                                  lower=scale * (1 - s.rancer_lambda1), upper=scale * (1 + s.rancer_lambda2),
                                  steps=s.ancer_steps, lr=s.ancer_lr, samples=s.opt_samples, kappa=s.kappa,
                                  gap=s.opt_gap, classes=iso.classes, max_batch=self.opt_batch(ctx, x))
        choices = []
        for i in range(x.shape[0]):
            if fallback_reason(i, iso, result):
                choices.append(Choice(self.base_noise(), {"basis": "none"}, fallback_reason(i, iso, result)))
                continue
            params = result.params[i].double()
            perp = params[k]
            noise = LowRankGaussian(perp, basis[i], params[:k] / perp - 1.0)
            extra = {"basis": "hessian-lowrank" if bool(finite[i]) else "axis", "scale_iso": float(iso.params[i])}
            choices.append(Choice(noise, extra))
        return choices

    def choose(self, ctx: RunContext, x: torch.Tensor, indices: Sequence[int]) -> list[Choice]:
        if self.settings.rancer_rank:
            self.check_input_shape(tuple(x.shape[1:]))
            return self.choose_lowrank(ctx, x, indices)
        iso = self.dds_stage(ctx, x, indices) if self.settings.rancer_scales == "isotropic" else None
        result, basis, finite_basis = self.optimize_rotated(ctx, x, indices, iso)
        stages = (result,) if iso is None else (iso, result)
        choices = []
        for i in range(x.shape[0]):
            if fallback_reason(i, *stages):
                choices.append(Choice(self.base_noise(), {"basis": "none"}, fallback_reason(i, *stages)))
                continue
            noise = RotatedGaussian(basis[i], result.params[i].double())
            extra = {"basis": "hessian" if bool(finite_basis[i]) else "axis"}
            if iso is not None:
                extra["scale_iso"] = float(iso.params[i])
            choices.append(Choice(noise, extra))
        return choices


class RANCERBest(RANCER):
    """``--method rancer-best``: ANCER and RANCER per input, the larger estimated proxy radius is certified."""

    name = "rancer-best"
    columns = RANCER.columns + ("chosen", "proxy_ancer", "proxy_rancer")
    settings_type = RANCERBestSettings

    def estimated_proxy(self, ctx: RunContext, x: torch.Tensor, noises: Sequence, classes: torch.Tensor,
                        generators: Sequence[torch.Generator]) -> np.ndarray:
        """``gap(p_hat) * geomean(scales)`` per input, ``p_hat`` from the ``choose`` stream (never certification)."""
        samples = self.settings.select_samples
        counts = sample_counts(ctx.model, x, list(noises), samples, ctx.num_classes,
                               batch_size=ctx.batch_size, block=ctx.block, generators=generators, dtype=ctx.dtype)
        hits = counts.gather(1, classes.to(counts.device)[:, None])[:, 0].cpu().numpy()
        p_hat = np.clip(hits / samples, *CLAMP)
        geo = np.array([float(geometric_mean(torch.as_tensor(n.scales(), dtype=torch.float64))) for n in noises])
        return np.asarray(normal_gap(p_hat)) * geo

    def choose(self, ctx: RunContext, x: torch.Tensor, indices: Sequence[int]) -> list[Choice]:
        self.check_input_shape(tuple(x.shape[1:]))
        iso, axis = self.optimize(ctx, x, indices)
        start = iso if self.settings.rancer_scales == "isotropic" else None  # the RANCER candidate's scales
        rotated, basis, finite_basis = self.optimize_rotated(ctx, x, indices, start)
        ok = (iso.finite & axis.finite & rotated.finite).tolist()
        ancer = [DiagonalGaussian(axis.params[i].reshape(x.shape[1:]).double()) if ok[i] else self.base_noise()
                 for i in range(x.shape[0])]
        rancer = [RotatedGaussian(basis[i], rotated.params[i].double()) if ok[i] else self.base_noise()
                  for i in range(x.shape[0])]
        # Each candidate gets its own stream, so the two estimates are independent of each other and of the
        # certification streams.
        proxy_a = self.estimated_proxy(ctx, x, ancer, iso.classes, ctx.generators(indices, "choose-ancer"))
        proxy_r = self.estimated_proxy(ctx, x, rancer, iso.classes, ctx.generators(indices, "choose-rancer"))
        choices = []
        for i in range(x.shape[0]):
            if not ok[i]:
                choices.append(Choice(self.base_noise(), {"basis": "none", "chosen": "none",
                                                          "proxy_ancer": float("nan"), "proxy_rancer": float("nan")},
                                      fallback_reason(i, iso, axis, rotated)))
                continue
            pick_rancer = bool(proxy_r[i] > proxy_a[i])
            extra = {"scale_iso": float(iso.params[i]), "chosen": "rancer" if pick_rancer else "ancer",
                     "proxy_ancer": float(proxy_a[i]), "proxy_rancer": float(proxy_r[i]),
                     "basis": ("hessian" if bool(finite_basis[i]) else "axis") if pick_rancer else "axis"}
            choices.append(Choice(rancer[i] if pick_rancer else ancer[i], extra))
        return choices

