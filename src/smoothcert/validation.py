"""Checks at the public boundary: each raises one clear error that says what was wrong and what is allowed.

Number and count checks share the constraints (and the one message form) of :mod:`smoothcert.settings`.
"""

from __future__ import annotations

import warnings

import torch

from smoothcert.settings import Integer, Number


def check_alpha(alpha: float) -> float:
    """``alpha`` is a failure probability: a number strictly between 0 and 1."""
    return Number(0.0, 1.0, low_open=True, high_open=True).check("alpha", alpha)


def check_positive(name: str, value: float) -> float:
    """A strictly positive, finite number (e.g. sigma, in the model's input units)."""
    return Number(0.0, low_open=True).check(name, value)


def check_number(name: str, value: float, low: float | None = None, high: float | None = None, *,
                 low_open: bool = False, high_open: bool = False) -> float:
    """A finite number in the interval from ``low`` to ``high`` (ends included unless ``*_open``)."""
    return Number(low, high, low_open=low_open, high_open=high_open).check(name, value)


def check_count(name: str, value: int, minimum: int = 1) -> int:
    """A whole number of samples (or batch size) at least ``minimum``."""
    return Integer(minimum).check(name, value)


def check_sample_sizes(n0: int, n: int) -> None:
    """Selection samples ``n0`` and estimation samples ``n``: both >= 1 and ``n0 <= n``."""
    check_count("n0", n0)
    check_count("n", n)
    if n0 > n:
        raise ValueError(f"n0 (selection samples) must not exceed n (estimation samples), got n0={n0} > n={n}")


def check_num_classes(num_classes: int) -> int:
    """At least two classes."""
    return Integer(2).check("num_classes", num_classes)


def check_inputs(x: torch.Tensor, *, range_policy: str = "warn") -> torch.Tensor:
    """Inputs must be a floating tensor of finite values; values outside [0, 1] warn (or raise).

    smoothcert adds noise in the model's input space, where pixels lie in [0, 1] and normalization
    lives inside the model; sigma is measured in those units. ``range_policy`` is ``"warn"``,
    ``"error"`` or ``"ignore"``.
    """
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"inputs must be a torch.Tensor, got {type(x).__name__}")
    if not torch.is_floating_point(x):
        raise TypeError(f"inputs must be a floating-point tensor (pixels in [0, 1]), got dtype {x.dtype}")
    if x.numel() == 0:
        raise ValueError(f"inputs are empty (shape {tuple(x.shape)})")
    if not bool(torch.isfinite(x).all()):
        raise ValueError("inputs contain NaN or infinite values")
    if range_policy != "ignore":
        lo, hi = float(x.min()), float(x.max())
        if lo < 0.0 or hi > 1.0:
            msg = (
                f"inputs lie in [{lo:.3g}, {hi:.3g}], outside [0, 1]: smoothcert adds noise in the model's "
                "input space (pixels in [0, 1]); put normalization inside the model"
            )
            if range_policy == "error":
                raise ValueError(msg)
            warnings.warn(msg, stacklevel=3)
    return x


def check_logits(logits: torch.Tensor, expected_rows: int, num_classes: int) -> None:
    """The base classifier must return one row of ``num_classes`` scores per input (a tensor of that shape).

    Reads only the tensor's metadata, so it never waits on the device; finiteness is :func:`check_finite_scores`'s,
    once the sampling is done."""
    if not isinstance(logits, torch.Tensor):
        raise TypeError(f"the base classifier must return a tensor, got {type(logits).__name__}")
    if logits.ndim != 2 or logits.shape[0] != expected_rows or logits.shape[1] != num_classes:
        raise ValueError(
            f"the base classifier returned shape {tuple(logits.shape)}; expected ({expected_rows}, {num_classes}): "
            f"one score per class for each of the {expected_rows} inputs (num_classes={num_classes})"
        )


def check_finite_scores(finite: torch.Tensor) -> None:
    """``finite``: a bool tensor, false when some score of the base classifier was NaN or infinite (one host read)."""
    if not bool(finite):
        raise ValueError("the base classifier returned NaN or infinite scores")
