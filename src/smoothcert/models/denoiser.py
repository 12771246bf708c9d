"""Denoisers for denoised smoothing, and the composed base classifier ``C o D`` (Salman et al., NeurIPS 2020).

Denoised smoothing certifies a classifier ``C`` that was never trained with noise: the base classifier of the
smoothed classifier is ``f = C o D``, where ``D`` removes the Gaussian noise before ``C`` sees the input
(seed 001, "BlackBox for Randomized Smoothing"; Salman et al., "Denoised Smoothing: A Provable Defense for
Pretrained Classifiers", NeurIPS 2020). The certificate is Cohen's for ``f``: nothing in the guarantee depends
on what ``D`` is, so every certification method works on the composed :class:`DenoisedClassifier` unchanged.

**The denoiser contract** (any ``nn.Module`` works, a diffusion model's one-step denoiser included, as in
Carlini et al., ICLR 2023):

- input: a batch ``(B, *input_shape)`` of noisy images ``x + delta`` in the classifier's input units, where the
  clean image ``x`` has pixels in [0, 1] and ``delta ~ N(0, sigma^2 I)`` (so the noisy input leaves [0, 1]);
  no normalization is applied before the denoiser (normalization lives inside the classifier);
- output: the same shape, an estimate of the clean image in the same [0, 1] pixel units (what the classifier
  takes); a denoiser may clamp to [0, 1] or not;
- it was trained for one noise level ``sigma`` (recorded as ``sigma`` in its checkpoint): certify at that sigma;
- it is deterministic in eval mode (dropout off, batch norm frozen): the certificate holds for the function
  that was sampled. A diffusion model's one-step denoiser at sigma is ``x_0`` predicted from ``x_t`` with
  ``t`` chosen so that ``sqrt((1 - abar_t) / abar_t) = 2 sigma`` on its [-1, 1] scale, the input scaled by
  ``sqrt(abar_t)`` and the output mapped back to [0, 1]: wrap those steps in a module that obeys the contract.

:class:`DnCNN` (Zhang et al., 2017, the denoiser of Salman et al.) is shipped: ``depth`` 3x3 convolutions of
``width`` channels with ReLU between them, predicting the residual; the output is ``x + residual`` and the last
convolution starts at zero, so a new DnCNN is exactly the identity.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from smoothcert.models.architectures import register_arch

__all__ = ["DnCNN", "DenoisedClassifier", "check_denoiser", "check_compatible", "DENOISER_ROLE"]

#: The ``role`` entry of a denoiser checkpoint's JSON (a classifier's has none).
DENOISER_ROLE = "denoiser"


class DnCNN(nn.Module):
    """DnCNN residual denoiser: ``D(z) = z + R(z)``, ``R`` = conv-ReLU, ``depth - 2`` x conv-ReLU, conv.

    ``depth >= 2`` convolutions (3x3, padding 1) of ``width`` channels; the last one is initialized to zero
    (weights and bias), so ``D`` is the identity at initialization (exactly: ``z + 0``). Piecewise linear in
    ``z`` (convolutions and ReLU), as RANCER's Gauss-Newton Hessian assumes. No batch norm: training and
    evaluation compute the same function.
    """

    def __init__(self, input_shape: Sequence[int] = (1, 28, 28), depth: int = 5, width: int = 32):
        super().__init__()
        shape = tuple(int(s) for s in input_shape)
        if len(shape) != 3 or min(shape) < 1:
            raise ValueError(f"DnCNN takes images (C, H, W), got input_shape {tuple(input_shape)}")
        for name, value, low in (("depth", depth, 2), ("width", width, 1)):
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"DnCNN {name} must be an integer >= {low}, got {value!r}")
        channels = shape[0]
        layers: list[nn.Module] = [nn.Conv2d(channels, width, 3, padding=1), nn.ReLU()]
        for _ in range(depth - 2):
            layers += [nn.Conv2d(width, width, 3, padding=1), nn.ReLU()]
        last = nn.Conv2d(width, channels, 3, padding=1)
        nn.init.zeros_(last.weight)
        nn.init.zeros_(last.bias)
        layers.append(last)
        self.residual = nn.Sequential(*layers)
        self.input_shape = shape

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return z + self.residual(z)


@register_arch("dncnn")
def _dncnn(num_classes: int = 0, input_shape: Sequence[int] = (1, 28, 28), depth: int = 5,
           width: int = 32) -> nn.Module:
    """The registered builder (``num_classes`` is 0: a denoiser predicts no class; it is ignored)."""
    return DnCNN(input_shape, depth, width)


def check_denoiser(denoiser: nn.Module, input_shape: Sequence[int], device: torch.device | str = "cpu") -> None:
    """A ValueError unless ``denoiser`` maps a batch of ``input_shape`` images to the same shape.

    Checked on a zero batch of two inputs, before any sampling.
    """
    if not isinstance(denoiser, nn.Module):
        raise TypeError(f"the denoiser must be a torch.nn.Module, got {type(denoiser).__name__}")
    shape = tuple(int(s) for s in input_shape)
    probe = torch.zeros((2, *shape), device=device)
    with torch.no_grad():
        try:
            out = denoiser(probe)
        except RuntimeError as err:
            raise ValueError(f"the denoiser cannot take inputs of shape {shape}: {err}") from err
    if not isinstance(out, torch.Tensor) or tuple(out.shape) != (2, *shape):
        got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise ValueError(f"a denoiser must return its input's shape: input (2, {', '.join(map(str, shape))}), "
                         f"output {got}")


def check_compatible(classifier_config: dict, denoiser_config: dict) -> None:
    """A ValueError when the classifier and denoiser checkpoints were made for different input shapes, or the
    second one is not a denoiser."""
    if denoiser_config.get("role") != DENOISER_ROLE:
        raise ValueError("--denoiser must name a denoiser checkpoint (made by smoothcert train-denoiser, its JSON "
                         f"has role {DENOISER_ROLE!r}); this one has role {denoiser_config.get('role')!r}")
    a, b = classifier_config.get("input_shape"), denoiser_config.get("input_shape")
    if a is None or b is None or list(a) != list(b):
        raise ValueError(f"the classifier was trained for inputs of shape {a} and the denoiser for {b}: "
                         "they must match")


class DenoisedClassifier(nn.Module):
    """The base classifier ``f(z) = classifier(denoiser(z))`` of denoised smoothing.

    Guarantee: any certificate computed for this module (Cohen's, data-dependent, first-order) holds for
    ``C o D`` as evaluated, exactly as for any other base classifier; the smoothed classifier is
    ``g(x) = argmax_c P(C(D(x + delta)) = c)``. ``input_shape`` (when given) is checked against the denoiser
    (:func:`check_denoiser`) before anything is sampled.
    """

    def __init__(self, classifier: nn.Module, denoiser: nn.Module, input_shape: Sequence[int] | None = None):
        super().__init__()
        if not isinstance(classifier, nn.Module):
            raise TypeError(f"the classifier must be a torch.nn.Module, got {type(classifier).__name__}")
        if input_shape is not None:
            device = next((p.device for p in denoiser.parameters()), torch.device("cpu"))
            check_denoiser(denoiser, input_shape, device)
        self.denoiser = denoiser
        self.classifier = classifier

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.denoiser(z))
