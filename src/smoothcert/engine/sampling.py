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
import hashlib
import operator
import struct
import zlib
from collections.abc import Callable, Iterator, Sequence

import numpy as np
import torch

from smoothcert.noise.base import Noise
from smoothcert.validation import check_count, check_finite_scores, check_logits, check_num_classes

__all__ = ["sample_counts", "input_generator", "stream_id", "Observer", "DTYPES"]

#: dtypes the engine runs the base classifier in, by name (the name is recorded with every result).
DTYPES: dict[str, torch.dtype] = {"float32": torch.float32, "bfloat16": torch.bfloat16}

#: ``observer(rows, noise, predictions)``: ``rows`` are the positions (in ``x``) of the inputs in this block,
#: ``noise`` is ``(len(rows), m, *shape)`` and ``predictions`` is ``(len(rows), m)``.
Observer = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], None]


#: Stream ids in use in this process (crc32 of the name -> name): two names never share an id.
_STREAM_IDS: dict[int, str] = {}
_KEY_PART = 2**32  # seed and index each fit one 32-bit word of the key
_MT_WORDS, _MT_AT = 624, 24  # torch's CPU state: seed (8 bytes), left (4), seeded (4), next (8), state[624] (8 each)
_MT_TEMPLATE: list[np.ndarray] = []  # one checked CPU generator state to copy (filled on first use)
_KEY_DOMAIN = b"smoothcert.input_generator/1\0"


def stream_id(stream: str) -> int:
    """The 32-bit id of a stream name (its crc32); a ValueError if another name in use has the same id."""
    if not isinstance(stream, str) or not stream:
        raise ValueError(f"stream must be a non-empty name (e.g. 'select', 'estimate'), got {stream!r}")
    sid = zlib.crc32(stream.encode())
    known = _STREAM_IDS.setdefault(sid, stream)
    if known != stream:
        raise ValueError(f"stream names {known!r} and {stream!r} share the id {sid}: rename one")
    return sid


def _key_part(name: str, value: int) -> int:
    try:
        value = operator.index(value)
    except TypeError:
        raise TypeError(f"{name} must be an integer, got {type(value).__name__}") from None
    if not 0 <= value < _KEY_PART:
        raise ValueError(f"{name} must lie in [0, 2**32), got {value}")
    return value


def _mt_template() -> np.ndarray:
    """A fresh CPU generator state (bytes), after checking that its layout is the MT19937 one described above."""
    if not _MT_TEMPLATE:
        probe = 5489
        state = torch.Generator().manual_seed(probe).get_state().numpy().copy()
        words = state[_MT_AT:_MT_AT + 8 * _MT_WORDS].view(np.uint64)
        expected = [probe]
        for i in range(1, 3):  # MT19937's initialization recurrence
            prev = expected[-1]
            expected.append((1812433253 * (prev ^ (prev >> 30)) + i) & 0xFFFFFFFF)
        left, nxt = int(state[8:12].view(np.int32)[0]), int(state[16:24].view(np.uint64)[0])
        if words.tolist()[:3] != expected or left != 1 or nxt != 0:
            raise RuntimeError(f"torch {torch.__version__}'s CPU generator state is not laid out as smoothcert "
                               "expects (MT19937 words at byte 24); input_generator cannot set it")
        _MT_TEMPLATE.append(state)
    return _MT_TEMPLATE[0]


def input_generator(seed: int, index: int, stream: str, device: torch.device | str = "cpu") -> torch.Generator:
    """An independent random stream for one input, derived from the run seed and the input's dataset index.

    ``stream`` names the use ("select", "estimate", "optimize", ...). The key ``(seed, index, stream id)``
    (``seed``, ``index`` in ``[0, 2**32)``; :func:`stream_id`) is kept whole by the generator, so different keys
    give different streams by construction:

    * CPU (MT19937, whose ``manual_seed`` keeps only 32 bits): the full 624-word state is set, words from
      the SHAKE-128 extendable-output hash of the key (FIPS 202, :mod:`hashlib`; every word depends on the
      whole key) with words 1-3 replaced by the key itself. The state is then an injective function of the
      key (word 0 contributes only its top bit to MT19937's 19937-bit state; words 1-3 count whole), and the
      MT19937 transition is a bijection of that state, so two streams never pass through the same state at
      the same step.
    * CUDA (Philox4x32-10, a bijection of a 128-bit counter for each 64-bit key): key ``seed + 2**32 index``,
      counter offset ``2**32 stream id``, so the streams of one input use disjoint counters (each may draw
      2**32 offset units, far beyond a run) and different inputs use different keys.

    ``initial_seed()`` is a 63-bit hash of the key (CPU) or the Philox key (CUDA). Creating one costs tens of
    microseconds (one hash and a state copy).
    """
    key = (_key_part("seed", seed), _key_part("index", index), stream_id(stream))
    device = torch.device(device)
    generator = torch.Generator(device=device)
    if device.type != "cpu":
        generator.manual_seed(key[0] + _KEY_PART * key[1])
        generator.set_offset(_KEY_PART * key[2])
        return generator
    digest = hashlib.shake_128(_KEY_DOMAIN + struct.pack("<3I", *key)).digest(4 * _MT_WORDS + 8)
    words = np.frombuffer(digest, dtype="<u4", count=_MT_WORDS).astype(np.uint64)
    words[1:4] = key
    state = _mt_template().copy()
    state[0:8].view(np.uint64)[0] = int.from_bytes(digest[-8:], "little") & 0x7FFF_FFFF_FFFF_FFFF
    state[_MT_AT:_MT_AT + 8 * _MT_WORDS].view(np.uint64)[:] = words
    generator.set_state(torch.from_numpy(state))
    return generator


def _autocast(device: torch.device, dtype: torch.dtype):
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


@contextlib.contextmanager
def evaluation_mode(model: Callable[[torch.Tensor], torch.Tensor]) -> Iterator[None]:
    """``model`` (an ``nn.Module``) in eval mode inside the block, every submodule's ``training`` flag restored
    after (also after an error). The smoothed classifier is that of the model in eval mode (BatchNorm with its
    running statistics, no dropout); a function that is not a module is left alone."""
    if not isinstance(model, torch.nn.Module):
        yield
        return
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for module, training in modes:
            module.training = training



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
    voids: torch.Tensor | None = None,
) -> torch.Tensor:
    """Count ``argmax f(x_i + noise_i)`` over ``num`` draws per input; returns int64 ``(B, num_classes)``.

    ``x`` is ``(B, *shape)``; ``noise`` is one :class:`Noise` for all inputs or one per input; ``generators``
    one per input (``None``: torch's global generator). The model runs under ``inference_mode`` and in eval mode
    (:func:`evaluation_mode`, each submodule's mode restored after), in ``dtype``
    (float32, or bfloat16 through autocast). ``block`` is how many samples of one input share a forward pass
    (default ``batch_size // B``); fix it to make counts independent of how inputs are grouped.

    Each noise makes its noisy copies (:meth:`Noise.perturb_`, ``x + noise`` unless the family says otherwise);
    samples a family declares *void* count for no class (so they count against every class, the selected one
    included), are added to ``voids`` (int64 ``(B,)``, on ``x``'s device) when given, and reach observers with
    prediction -1. Counts and a finiteness flag of the scores stay on ``x``'s device: the one host read is the
    flag's, after the last pass (a NaN or infinite score raises ``ValueError`` then, before any count is returned).
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
    finite = torch.ones((), dtype=torch.bool, device=x.device)  # read once, after the loop: no sync inside it

    with torch.inference_mode(), _autocast(x.device, dtype), evaluation_mode(model):
        for start in range(0, total, per_pass):
            rows = torch.arange(start, min(start + per_pass, total), device=x.device)
            group = len(rows)
            xs = x[start : start + group].to(torch.float32)
            done = 0
            while done < num:
                m = min(block, num - done)
                noisy = buffer[:group, :m]
                drawn = torch.empty_like(noisy) if observers else None
                valid = None
                for j in range(group):
                    void = noises[start + j].perturb_(noisy[j], xs[j], gens[start + j],
                                                      None if drawn is None else drawn[j])
                    if void is not None:
                        if valid is None:
                            valid = torch.ones((group, m), dtype=torch.bool, device=x.device)
                        valid[j] = ~void
                logits = model(noisy.reshape(group * m, *shape))
                check_logits(logits, group * m, num_classes)
                finite &= torch.isfinite(logits).all()
                predictions = logits.argmax(dim=1).view(group, m)
                weight = torch.ones_like(predictions) if valid is None else valid.to(torch.int64)
                counts[start : start + group].scatter_add_(1, predictions, weight)
                if valid is not None:
                    if voids is not None:
                        voids[start : start + group] += m - weight.sum(dim=1)
                    predictions = torch.where(valid, predictions, -1)
                for observe in observers:
                    observe(rows, drawn, predictions)
                done += m
    check_finite_scores(finite)
    return counts
