"""The smoothed classifier ``g(x) = argmax_c P(f(x + noise) = c)``: PREDICT and CERTIFY for any noise.

CERTIFY (Cohen et al.; seed 000 section 3.1, seed 002 section 5.1): ``n0`` samples choose the class ``c_A``,
``n`` *fresh* samples give the one-sided Clopper-Pearson lower bound ``p_A`` of ``P(f(x + noise) = c_A)`` at
level ``alpha``. If ``p_A < 1/2`` it abstains; otherwise, with probability at least ``1 - alpha``, ``g``
predicts ``c_A`` on the whole region ``{x + delta : ||S^-1 delta||_2 <= Phi^-1(p_A)}`` of the noise
(a ball of radius ``sigma Phi^-1(p_A)`` for ``N(0, sigma^2 I)``, seed 000 eq. 3.3).

PREDICT: ``n`` samples; answer the top class if a two-sided binomial test of its count against the
runner-up's rejects equality at level ``alpha``, else abstain. The answer is wrong (not abstained and not
``g(x)``) with probability at most ``alpha``.

:class:`Smooth` keeps the classic interface of Cohen et al.'s reference code, so scripts switch by changing
one import; :func:`certify` and :func:`predict` take a batch of inputs and any noise and return full records.

The base classifier is sampled in eval mode (:func:`evaluation_mode`): a model left in train mode would change its
BatchNorm statistics and drop units while it is sampled. Each submodule's own mode is restored afterwards; nothing
else of the model is touched.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from smoothcert.noise.gaussian import IsotropicGaussian
from smoothcert.noise.base import Noise
from smoothcert.geometry.norms import NormRadii
from smoothcert.geometry.regions import Region
from smoothcert.engine.sampling import DTYPES, Observer, evaluation_mode, sample_counts
from smoothcert.stats.bounds import binomial_pvalue, clopper_pearson_lower
from smoothcert.stats.sequential import randomized_cp_lower
from smoothcert.validation import check_alpha, check_count, check_inputs, check_num_classes, check_sample_sizes

ABSTAIN = -1

__all__ = ["ABSTAIN", "Certificate", "Smooth", "certify", "predict", "dtype_name", "evaluation_mode", "check_call",
           "check_noise_support"]


def dtype_name(dtype: torch.dtype) -> str:
    for name, value in DTYPES.items():
        if value == dtype:
            return name
    raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype}")


@dataclass(frozen=True)
class Certificate:
    """What CERTIFY established for one input.

    ``prediction`` is ``ABSTAIN`` (-1) or the class ``c_A``; ``p_lower`` the one-sided Clopper-Pearson bound of
    ``P(f(x + noise) = c_A)`` at level ``alpha`` from ``n`` fresh samples; ``gap = Phi^-1(p_lower)``;
    ``region`` the certified region (None when abstaining); ``radius`` its inscribed l2 radius and
    ``radius_proxy`` ANCER's proxy radius (both 0 when abstaining). ``counts`` are the estimation counts.
    ``radii`` the certified radius in each of l1, l2 and l_inf with the norms that were converted by the norm
    inequalities (:class:`~smoothcert.geometry.norms.NormRadii`, from the noise family's
    :meth:`~smoothcert.noise.base.Noise.norm_radii`; all 0 when abstaining).
    """

    prediction: int
    p_lower: float
    counts: np.ndarray = field(repr=False)
    gap: float
    region: Region | None = field(repr=False)
    radius: float
    radius_proxy: float
    n0: int
    n: int
    alpha: float
    dtype: str
    noise: Noise = field(repr=False)
    seed: int | None = None
    #: Estimation samples actually drawn (``n`` for fixed-n CERTIFY; fewer when a sequential test stopped early).
    n_used: int | None = None
    #: What the mode of certification adds to the row (e.g. ``cp_uniform``, ``decision``).
    extra: dict = field(default_factory=dict, repr=False)
    radii: NormRadii | None = field(default=None, repr=False)

    @property
    def abstained(self) -> bool:
        return self.prediction == ABSTAIN

    @property
    def sampling(self) -> str:
        """How the noise was drawn: ``float`` or ``sound`` (:attr:`~smoothcert.noise.base.Noise.sampling`)."""
        return self.noise.sampling


def check_noise_support(x, noise):
    """Each input's noise family accepts it (e.g. a grid for sound sampling): a ValueError before any sampling."""
    if isinstance(noise, Noise):
        noise.check_support(x)
        return
    for xi, ni in zip(x, noise):
        ni.check_support(xi)


def check_call(model, x, num_classes, alpha, batch_size, dtype, range_policy) -> None:
    """The checks every sampling entry point makes before any sample: a callable model, a class count, alpha, the
    batch size, the dtype and the inputs (finite, in range by ``range_policy``)."""
    if not callable(model):
        raise TypeError("the base classifier must be callable (an nn.Module or a function of a batch)")
    check_num_classes(num_classes)
    check_alpha(alpha)
    check_count("batch_size", batch_size)
    dtype_name(dtype)
    check_inputs(x, range_policy=range_policy)


def _streams(generators, x, n_streams, *, more=False):
    """Per-input generators: ``None``, a list of per-input generators, or per-input tuples of streams.

    With ``more``, tuples may hold more than ``n_streams`` streams (all of one length): all are returned.
    """
    if generators is None:
        return [[None] * x.shape[0] for _ in range(n_streams)]
    gens = list(generators)
    if len(gens) != x.shape[0]:
        raise ValueError(f"got {len(gens)} generators for {x.shape[0]} inputs")
    if all(isinstance(g, (tuple, list)) for g in gens):
        width = len(gens[0]) if more else n_streams
        if any(len(g) < n_streams or (more and len(g) != width) for g in gens):
            lengths = sorted({len(g) for g in gens})
            raise ValueError(f"each input needs a tuple of at least {n_streams} streams"
                             + (", all of one length" if more else "") + f", got lengths {lengths}")
        return [[g[k] for g in gens] for k in range(width)]
    return [gens] * n_streams


def _part_sizes(n: int, parts: int) -> list[int]:
    """``n`` samples in ``parts`` consecutive parts of sizes ``floor(n j / parts) - floor(n (j - 1) / parts)``."""
    return [n * (j + 1) // parts - n * j // parts for j in range(parts)]


def certify(
    model: Callable[[torch.Tensor], torch.Tensor],
    x: torch.Tensor,
    noise: Noise | Sequence[Noise],
    num_classes: int,
    n0: int,
    n: int,
    alpha: float,
    *,
    batch_size: int = 1000,
    block: int | None = None,
    generators: Sequence | None = None,
    dtype: torch.dtype = torch.float32,
    seed: int | None = None,
    range_policy: str = "warn",
    observers: Sequence[Observer] = (),
    uniforms: Sequence[float] | None = None,
) -> list[Certificate]:
    """CERTIFY a batch ``x`` of shape ``(B, *input_shape)``; one :class:`Certificate` per input.

    ``generators``: per input either one generator (selection then estimation draw from it in turn, so the
    samples are fresh), a pair ``(selection, estimation)`` of independent streams, or a tuple
    ``(selection, estimation_1, ..., estimation_k)``: the ``n`` estimation samples are then drawn in ``k``
    consecutive parts of ``floor(n j / k) - floor(n (j - 1) / k)`` samples, part ``j`` from stream ``j``.

    ``observers`` watch the estimation samples only (never the selection samples): each is called on every
    estimation block as ``observer(rows, noise, predictions)`` (:data:`~smoothcert.engine.sampling.Observer`),
    in sample order, part after part; an observer with a ``begin(classes)`` method is first given the selected
    class of every input (an int64 tensor (B,)). What they accumulate is read from the observer objects.

    ``uniforms`` (one draw in [0, 1] per input, independent of the samples): the randomized Clopper-Pearson
    bound (:func:`~smoothcert.stats.sequential.randomized_cp_lower`, coverage exactly ``1 - alpha``) instead
    of Clopper-Pearson's; each certificate records its draw as ``extra["cp_uniform"]``.
    """
    check_call(model, x, num_classes, alpha, batch_size, dtype, range_policy)
    check_sample_sizes(n0, n)
    observers = list(observers)
    if not all(callable(o) for o in observers):
        raise TypeError("observers must be callables observer(rows, noise, predictions)")
    noises = [noise] * x.shape[0] if isinstance(noise, Noise) else list(noise)
    check_noise_support(x, noise if isinstance(noise, Noise) else noises)
    select, *estimate = _streams(generators, x, 2, more=True)
    kw = dict(batch_size=batch_size, block=block, dtype=dtype)
    counts, top = _certify_counts(model, x, noises, n0, n, num_classes, select, estimate, observers, kw)
    n_a = counts[np.arange(len(top)), top]
    if uniforms is None:
        p_lower = np.atleast_1d(clopper_pearson_lower(n_a, np.full_like(n_a, n), alpha))
        extras = [{} for _ in range(len(top))]
    else:
        if len(uniforms) != len(top):
            raise ValueError(f"got {len(uniforms)} uniform draws for {len(top)} inputs")
        p_lower = randomized_cp_lower(n_a, np.full_like(n_a, n), alpha, np.asarray(uniforms, dtype=np.float64))
        extras = [{"cp_uniform": float(u)} for u in uniforms]
    out = []
    for i in range(x.shape[0]):
        p = float(p_lower[i])
        if p < 0.5:
            out.append(Certificate(ABSTAIN, p, counts[i], float("nan"), None, 0.0, 0.0, n0, n, alpha,
                                   dtype_name(dtype), noises[i], seed, n, extras[i], radii=NormRadii.zero()))
            continue
        g = float(noises[i].gap(p))
        region = noises[i].region(x[i], g)
        out.append(Certificate(int(top[i]), p, counts[i], g, region, region.inscribed_radius,
                               region.proxy_radius, n0, n, alpha, dtype_name(dtype), noises[i], seed, n, extras[i],
                               radii=noises[i].norm_radii(p, g, region)))
    return out


def _certify_counts(model, x, noises, n0, n, num_classes, select, estimate, observers, kw):
    """Selection counts' top class, then the estimation counts from fresh streams (parts in order)."""
    top = sample_counts(model, x, noises, n0, num_classes, generators=select, **kw).argmax(dim=1)
    for observer in observers:
        if hasattr(observer, "begin"):
            observer.begin(top)
    counts = 0
    for part, size in zip(estimate, _part_sizes(n, len(estimate))):
        if size:
            counts = counts + sample_counts(model, x, noises, size, num_classes, generators=part,
                                            observers=observers, **kw)
    return counts.cpu().numpy(), top.cpu().numpy()


def predict(
    model: Callable[[torch.Tensor], torch.Tensor],
    x: torch.Tensor,
    noise: Noise | Sequence[Noise],
    num_classes: int,
    n: int,
    alpha: float,
    *,
    batch_size: int = 1000,
    block: int | None = None,
    generators: Sequence | None = None,
    dtype: torch.dtype = torch.float32,
    range_policy: str = "warn",
) -> np.ndarray:
    """PREDICT for a batch: the class per input, ``ABSTAIN`` (-1) where the binomial test is not significant.

    Two-sided test of the top count against the runner-up's (``binomtest(n_A, n_A + n_B, 1/2)``); the answer
    differs from ``g(x)`` without abstaining with probability at most ``alpha``.

    Samples the noise declares void (sound sampling's leftover) are added to the runner-up's count: coupled with
    exact sampling, where each of them is some class, that can only raise the p-value (it is increasing in the
    runner-up's count), so the guarantee holds for the exactly sampled smoothed classifier.
    """
    check_call(model, x, num_classes, alpha, batch_size, dtype, range_policy)
    check_count("n", n)
    if not isinstance(noise, Noise) and len(list(noise)) != x.shape[0]:
        raise ValueError(f"got {len(list(noise))} noise distributions for {x.shape[0]} inputs")
    check_noise_support(x, noise)
    (gens,) = _streams(generators, x, 1)
    voids = torch.zeros(x.shape[0], dtype=torch.int64, device=x.device)
    counts = sample_counts(model, x, noise, n, num_classes, generators=gens, batch_size=batch_size,
                           block=block, dtype=dtype, voids=voids).cpu().numpy()
    voids = voids.cpu().numpy()
    order = np.argsort(-counts, axis=1, kind="stable")
    out = np.full(x.shape[0], ABSTAIN, dtype=np.int64)
    for i in range(x.shape[0]):
        a, b = order[i, 0], order[i, 1]
        n_a, n_b = int(counts[i, a]), int(counts[i, b]) + int(voids[i])
        if n_a + n_b > 0 and binomial_pvalue(n_a, n_a + n_b, 0.5) <= alpha:
            out[i] = a
    return out


class Smooth:
    """Drop-in replacement for the reference ``Smooth`` of Cohen et al. (``core.py``).

    ``Smooth(base_classifier, num_classes, sigma)``; ``predict(x, n, alpha, batch_size)`` returns a class or
    ``Smooth.ABSTAIN``; ``certify(x, n0, n, alpha, batch_size)`` returns ``(class, radius)``. ``x`` is one
    input without a batch dimension, on the model's device. ``sigma`` is in the model's input units (pixels in
    [0, 1]; normalization belongs inside the model).

    Beyond the reference: any ``noise`` (:mod:`smoothcert.noise`) instead of ``sigma``, ``dtype`` (float32 or
    bfloat16), a ``seed`` for reproducible runs, and :meth:`certify_batch` / :meth:`predict_batch` for a
    batch of inputs returning full :class:`Certificate` records.
    """

    ABSTAIN = ABSTAIN

    def __init__(self, base_classifier: torch.nn.Module, num_classes: int, sigma: float | None = None, *,
                 noise: Noise | None = None, dtype: torch.dtype = torch.float32, seed: int | None = None):
        if (sigma is None) == (noise is None):
            raise ValueError("give exactly one of sigma (isotropic Gaussian noise) or noise")
        self.base_classifier = base_classifier
        self.num_classes = check_num_classes(num_classes)
        self.noise = IsotropicGaussian(sigma) if noise is None else noise
        self.sigma = getattr(self.noise, "sigma", None)
        dtype_name(dtype)
        self.dtype = dtype
        self.seed = seed
        self._generator: torch.Generator | None = None

    def _gen(self, device: torch.device) -> torch.Generator | None:
        if self.seed is None:
            return None
        if self._generator is None or self._generator.device != device:
            self._generator = torch.Generator(device=device)
            self._generator.manual_seed(self.seed)
        return self._generator

    def _single(self, x: torch.Tensor) -> torch.Tensor:
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
        return x.unsqueeze(0)

    def _one_input(self, x: torch.Tensor, run: Callable[[torch.Tensor], Any], what: str):
        """``run(x[None])``; when that fails but the model takes ``x`` itself as a batch of one, the caller gave
        ``x`` with a batch dimension: say so instead of the model's shape error."""
        single = self._single(x)
        try:
            return run(single)
        except (RuntimeError, ValueError) as e:
            if x.ndim < 2 or x.shape[0] != 1 or not isinstance(self.base_classifier, torch.nn.Module):
                raise
            try:
                with torch.inference_mode(), evaluation_mode(self.base_classifier):
                    out = self.base_classifier(x.to(torch.float32))
            except Exception:  # noqa: BLE001 - the model cannot read x as a batch either: the first error stands
                raise e from None
            if not (isinstance(out, torch.Tensor) and tuple(out.shape) == (1, self.num_classes)):
                raise
            raise ValueError(f"Smooth.{what} takes one input without a batch dimension, got shape "
                             f"{tuple(x.shape)} (a batch of one): pass x[0], or use {what}_batch(x) for a batch"
                             ) from e

    def certify(self, x: torch.Tensor, n0: int, n: int, alpha: float, batch_size: int) -> tuple[int, float]:
        """Cohen's CERTIFY for one input (no batch dimension): ``(class, l2 radius)`` or ``(ABSTAIN, 0.0)``."""
        (cert,) = self._one_input(x, lambda b: self.certify_batch(b, n0, n, alpha, batch_size), "certify")
        return cert.prediction, cert.radius

    def predict(self, x: torch.Tensor, n: int, alpha: float, batch_size: int) -> int:
        """Cohen's PREDICT for one input (no batch dimension): a class or ``ABSTAIN``."""
        return int(self._one_input(x, lambda b: self.predict_batch(b, n, alpha, batch_size), "predict")[0])

    def certify_batch(self, x: torch.Tensor, n0: int, n: int, alpha: float, batch_size: int = 1000,
                      noise: Noise | Sequence[Noise] | None = None, generators: Sequence | None = None,
                      ) -> list[Certificate]:
        """CERTIFY every input of ``x`` (B, ...); see :func:`certify`."""
        if generators is None and self.seed is not None:
            generators = [self._gen(x.device)] * x.shape[0]
        return certify(self.base_classifier, x, self.noise if noise is None else noise, self.num_classes,
                       n0, n, alpha, batch_size=batch_size, generators=generators, dtype=self.dtype, seed=self.seed)

    def predict_batch(self, x: torch.Tensor, n: int, alpha: float, batch_size: int = 1000,
                      noise: Noise | Sequence[Noise] | None = None, generators: Sequence | None = None,
                      ) -> np.ndarray:
        """PREDICT every input of ``x`` (B, ...); see :func:`predict`."""
        if generators is None and self.seed is not None:
            generators = [self._gen(x.device)] * x.shape[0]
        return predict(self.base_classifier, x, self.noise if noise is None else noise, self.num_classes,
                       n, alpha, batch_size=batch_size, generators=generators, dtype=self.dtype)

    # The reference implementation's helpers, kept for scripts that call them.
    def _sample_noise(self, x: torch.Tensor, num: int, batch_size: int) -> np.ndarray:
        gen = self._gen(x.device)
        return sample_counts(self.base_classifier, self._single(x), self.noise, num, self.num_classes,
                             batch_size=batch_size, generators=[gen], dtype=self.dtype)[0].cpu().numpy()

    def _lower_confidence_bound(self, NA: int, N: int, alpha: float) -> float:  # noqa: N803 - reference names
        return float(clopper_pearson_lower(NA, N, alpha))
