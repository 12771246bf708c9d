"""Memory-based certification with low-rank regions: O(d k) storage, and the same bits across chunk sizes, resume
points and batches (as tests/test_memory_reproducible.py checks for the dense regions)."""

import torch
from safetensors.torch import load_file

from smoothcert.geometry import Ball, LowRankEllipsoid, distances, intersects_each
from smoothcert.methods.memory import CertificationMemory
from smoothcert.noise.lowrank import LowRankGaussian

from test_memory_reproducible import folder_bytes, outcome, run_all, torch_threads

F64 = torch.float64


def lowrank_inputs(d=24, k=3, n=40, seed=0):
    """Low-rank regions (and a few balls) of three classes, close enough that every rule of Algorithm 1 fires."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        center = 0.5 + 0.02 * torch.randn(d, generator=gen, dtype=F64)
        if i % 6 == 5:  # next to the previous input: inside its region
            center = out[-1][1] + 1e-4 * torch.randn(d, generator=gen, dtype=F64)
        if i % 5 == 4:
            region = Ball(center, 0.05 + 0.1 * float(torch.rand(1, generator=gen)))
        else:
            q = torch.linalg.qr(torch.randn(d, k, generator=gen, dtype=F64))[0]
            gamma = torch.rand(k, generator=gen, dtype=F64) * 3 - 0.5
            noise = LowRankGaussian(0.03 + 0.05 * float(torch.rand(1, generator=gen)), q, gamma)
            region = noise.region(center, 0.5 + float(torch.rand(1, generator=gen)))
        label = int(torch.randint(3, (1,), generator=gen))
        out.append((i, center, (out[-1][2] + 1) % 3 if i % 6 == 5 else label, region))
    return out


def state_bytes(memory):
    out = []
    for index, prediction, region in memory.stored:
        names = ("center", "theta", "basis", "gamma") if isinstance(region, LowRankEllipsoid) else ("center",)
        blob = b"".join(getattr(region, n).contiguous().numpy().tobytes() for n in names)
        out.append((type(region).__name__, index, prediction, blob, getattr(region, "gap", None),
                    getattr(region, "radius", None)))
    return out


def test_low_rank_memory_stores_o_dk_and_is_the_same_bits_across_chunks_resumes_and_batches(tmp_path):
    d, k = 24, 3
    inputs = lowrank_inputs(d, k)
    order = [i for i, *_ in inputs]
    reference = CertificationMemory("run", order)
    expected = outcome(run_all(reference, inputs))
    counts = reference.counts
    assert min(counts.values()) >= 3, counts  # kept, shrunk and abstained all occur
    assert any(isinstance(r, LowRankEllipsoid) for _, _, r in reference.stored)
    expected_state = state_bytes(reference)
    saved = None
    for chunk_bytes, cuts in ((1, (0, 17)), (3000, (5, 6, 29)), (1 << 20, (1, 39))):
        folder = tmp_path / f"mem-{chunk_bytes}"
        memory = CertificationMemory.open(folder, "run", order, chunk_bytes=chunk_bytes)
        got = []
        for start, stop in zip((0,) + cuts, cuts + (len(inputs),)):
            got += outcome(run_all(memory, inputs[start:stop]))
            del memory
            memory = CertificationMemory.open(folder, "run", chunk_bytes=chunk_bytes)
            assert len(memory) == stop and state_bytes(memory) == expected_state[:len(memory.stored)]
        assert got == expected
        files = folder_bytes(folder)
        saved = saved or files
        assert files == saved
    # per stored low-rank region: center, theta, the (d, k) factor, gamma -- O(d k), no d x d matrix
    tensors = {}
    for chunk in (tmp_path / "mem-1").glob("regions-*.safetensors"):
        tensors.update(load_file(chunk))
    for index, _, region in reference.stored:
        keys = sorted(key for key in tensors if key.split("/")[0] == str(index))
        size = sum(tensors[key].numel() for key in keys)
        if isinstance(region, LowRankEllipsoid):
            assert size == d * (k + 2) + k and tensors[f"{index}/basis"].shape == (d, k)
        else:
            assert size == d
    for threads in (1, 2):
        with torch_threads(threads):
            again = CertificationMemory("run", order)
            assert outcome(run_all(again, inputs)) == expected and state_bytes(again) == expected_state


def test_low_rank_distances_and_verdicts_are_the_same_alone_or_batched():
    inputs = lowrank_inputs(16, 4, 20, seed=3)
    regions = [r for *_, r in inputs]
    x = inputs[0][1] + 0.03
    alone = [float(distances(x, [r])[0]).hex() for r in regions]
    assert [float(v).hex() for v in distances(x, regions)] == alone
    assert [float(v).hex() for v in distances(x, regions[::-1])] == alone[::-1]
    query = regions[1]
    verdicts = [bool(intersects_each(query, [r])[0]) for r in regions]
    assert intersects_each(query, regions).tolist() == verdicts
    assert intersects_each(query, regions[5:12]).tolist() == verdicts[5:12]
    assert 0 < sum(verdicts) < len(verdicts)
