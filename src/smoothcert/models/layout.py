"""Memory layout of image batches: the base classifier run on channels-last (NHWC-strided) tensors.

A channels-last tensor holds the same values as its NCHW twin, only strided so that the channels of one pixel are
adjacent; convolutions then use NHWC kernels (on CUDA GPUs cuDNN's, which with bfloat16 run on tensor cores),
the layout the GPU fast path wants (``smoothcert certify --channels-last``). The classifier is the same function:
outputs agree with the NCHW model's up to the rounding of a different summation order (checked in the tests),
so certificates keep their guarantee for the model as run, which is what every certificate is about.
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["ChannelsLast"]


class ChannelsLast(nn.Module):
    """``model`` with its 4-D parameters and every 4-D input in ``torch.channels_last`` (other inputs as given).

    Wraps (and converts in place) ``model``; ``state_dict`` keys gain the prefix ``model.``, so save the inner
    model (``.model``), not the wrapper.
    """

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model.to(memory_format=torch.channels_last)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        return self.model(x)
