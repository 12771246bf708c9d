"""The Monte Carlo engine: class counts of ``f(x + noise)`` for a batch of inputs at once.

Each forward pass holds ``block`` noisy copies of each of up to ``batch_size // block`` inputs, so small and
large batches of inputs both fill the model's batch. Noise is drawn straight into one preallocated buffer on
the input's device, predictions are counted with ``scatter_add_`` on the device, and no per-sample tensor is
kept. Every input draws from its own ``torch.Generator`` (see :func:`input_generator`), always in blocks of
``block`` samples, so an input's counts do not depend on which other inputs share its batch: a run can be
split, reordered or resumed and give the same numbers.

Extra statistics (e.g. the first-order sums of seed 004) plug in as *observers*: callables that see each
block's noise and predictions.
"""

from __future__ import annotations

import contextlib
import zlib
from collections.abc import Callable, Sequence

import numpy as np
import torch

from smoothcert.noise.base import Noise
from smoothcert.validation import check_count, check_logits, check_num_classes

__all__ = ["sample_counts", "input_generator", "Observer", "DTYPES"]

#: dtypes the engine runs the base classifier in, by name (the name is recorded with every result).
DTYPES: dict[str, torch.dtype] = {"float32": torch.float32, "bfloat16": torch.bfloat16}

#: ``observer(rows, noise, predictions)``: ``rows`` are the positions (in ``x``) of the inputs in this block,
#: ``noise`` is ``(len(rows), m, *shape)`` and ``predictions`` is ``(len(rows), m)``.
Observer = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], None]


def input_generator(seed: int, index: int, stream: str, device: torch.device | str = "cpu") -> torch.Generator:
    """An independent random stream for one input, derived from the run seed and the input's dataset index.

    ``stream`` names the use ("select", "estimate", "optimize", ...): different names give independent
    streams, so the samples that choose a class or a noise are never those that bound its probability.
    """
    key = np.random.SeedSequence([int(seed) & 0xFFFFFFFF, int(index) & 0xFFFFFFFF, zlib.crc32(stream.encode())])
    g = torch.Generator(device=device)
    g.manual_seed(int(key.generate_state(1, dtype=np.uint64)[0] & 0x7FFF_FFFF_FFFF_FFFF))
    return g


def _autocast(device: torch.device, dtype: torch.dtype):
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def sample_counts(
    model: Callable[[torch.Tensor], torch.Tensor],
    x: torch.Tensor,
    noise: Noise | Sequence[Noise],
    num: int,
    num_classes: int,
    *,
    batch_size: int = 1000,
    block: int | None = None,
    generators: Sequence[torch.Generator | None] | None = None,
    dtype: torch.dtype = torch.float32,
    observers: Sequence[Observer] = (),
) -> torch.Tensor:
    """Count ``argmax f(x_i + noise_i)`` over ``num`` draws per input; returns int64 ``(B, num_classes)``.

    ``x`` is ``(B, *shape)``; ``noise`` is one :class:`Noise` for all inputs or one per input; ``generators``
    one per input (``None``: torch's global generator). The model runs under ``inference_mode``, in ``dtype``
    (float32, or bfloat16 through autocast). ``block`` is how many samples of one input share a forward pass
    (default ``batch_size // B``); fix it to make counts independent of how inputs are grouped.
    """
    check_count("num (samples per input)", num)
    check_count("batch_size", batch_size)
    check_num_classes(num_classes)
    if x.ndim < 2:
        raise ValueError(f"x must be a batch (B, *input_shape), got shape {tuple(x.shape)}")
    total = x.shape[0]
    noises = [noise] * total if isinstance(noise, Noise) else list(noise)
    if len(noises) != total:
        raise ValueError(f"got {len(noises)} noise distributions for {total} inputs")
    gens = [None] * total if generators is None else list(generators)
    if len(gens) != total:
        raise ValueError(f"got {len(gens)} generators for {total} inputs")
    block = max(1, min(num, batch_size // total if block is None else block))
    block = min(block, batch_size)
    per_pass = max(1, batch_size // block)
    shape = tuple(x.shape[1:])
    counts = torch.zeros((total, num_classes), dtype=torch.int64, device=x.device)
    buffer = torch.empty((min(per_pass, total), block, *shape), dtype=torch.float32, device=x.device)

    with torch.inference_mode(), _autocast(x.device, dtype):
        for start in range(0, total, per_pass):
            rows = torch.arange(start, min(start + per_pass, total), device=x.device)
            group = len(rows)
            xs = x[start : start + group].to(torch.float32)
            done = 0
            while done < num:
                m = min(block, num - done)
                noisy = buffer[:group, :m]
                for j in range(group):
                    noises[start + j].fill_(noisy[j], gens[start + j])
                if observers:
                    drawn = noisy.clone()
                noisy.add_(xs.unsqueeze(1))
                logits = model(noisy.reshape(group * m, *shape))
                check_logits(logits, group * m, num_classes)
                predictions = logits.argmax(dim=1).view(group, m)
                counts[start : start + group].scatter_add_(1, predictions, torch.ones_like(predictions))
                for observe in observers:
                    observe(rows, drawn, predictions)
                done += m
    return counts
