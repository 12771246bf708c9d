"""Memory-based certification decides bit for bit the same however its regions are batched, chunked or resumed.

Every float that feeds a memory decision (distances, verdicts, shrunk radii, the "near" pre-filter) is computed
per row from that row alone (the canonical reductions of ``smoothcert.geometry.tolerances``). The tests check
the reductions against exactly rounded references (``math.fsum``), then the geometry per (point, region) pair
alone against the same pair inside batches of other sizes and compositions, at thread counts 1 and 2, then
whole memory sequences across chunk sizes, resume points and batch compositions, byte for byte.
"""

import contextlib
import json
import math

import pytest
import torch
from safetensors.torch import load_file

import smoothcert.methods.memory as memory_module
from smoothcert.geometry.distance import distances
from smoothcert.geometry.intersection import intersects_each
from smoothcert.geometry.regions import Ball, CrossPolytope, Ellipsoid
from smoothcert.geometry.tolerances import (EPS, basis_error, fixed_cumsum, fixed_matvec, fixed_norm, fixed_sum,
                                            fixed_vecmat)
from smoothcert.methods.memory import CertificationMemory
from test_geometry import make_region
from test_memory import toy_inputs

F64 = torch.float64
KINDS = ["ball", "axis", "rotated", "general", "l1", "flat"]


@contextlib.contextmanager
def torch_threads(n):
    old = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def hexes(t):
    return [float(v).hex() for v in t.reshape(-1).tolist()]


def spread(shape, gen):
    """Values of mixed signs and magnitudes 1e-3 .. 1e3: every summation order rounds differently."""
    mag = 10.0 ** torch.randint(-3, 4, shape, generator=gen).to(F64)
    return torch.randn(shape, generator=gen, dtype=F64) * mag


def column_major(x):
    """The same values in another memory layout (library reductions change their order with it)."""
    return x.T.contiguous().T


# ----------------------------------------------------------------------------------------------- reductions


@pytest.mark.parametrize("threads", [1, 2])
def test_fixed_reductions_are_accurate_and_the_same_alone_or_batched(threads):
    gen = torch.Generator().manual_seed(0)
    with torch_threads(threads):
        for m in (1, 2, 3, 5, 8, 9, 31, 100, 784):
            x = spread((23, m), gen)
            full, prefix = fixed_sum(x), fixed_cumsum(x)
            assert hexes(fixed_sum(column_major(x))) == hexes(full)
            assert hexes(fixed_cumsum(column_major(x))) == hexes(prefix)
            assert hexes(fixed_sum(x[5:17])) == hexes(full[5:17])
            assert hexes(fixed_sum(x[:, None, :].expand(23, 4, m))) == hexes(full[:, None].expand(23, 4))
            assert hexes(fixed_norm(x)) == hexes(fixed_sum(x * x).sqrt())
            for i in (0, 11, 22):
                row = x[i].tolist()
                assert hexes(fixed_sum(x[i])) == hexes(full[i]) and hexes(fixed_cumsum(x[i])) == hexes(prefix[i])
                bound = (math.ceil(math.log2(m)) + 1) * EPS  # pairwise summation, relative to sum |x|
                assert abs(float(full[i]) - math.fsum(row)) <= bound * math.fsum(map(abs, row))
                for k in (0, m // 2, m - 1):  # the doubling scan: at most log2(m) additions per entry
                    exact = math.fsum(row[:k + 1])
                    assert abs(float(prefix[i, k]) - exact) <= bound * math.fsum(map(abs, row[:k + 1]))
        for d in (3, 17, 64):
            v, mats = spread((6, d), gen), spread((6, d, d), gen)
            vm, mv = fixed_vecmat(v, mats), fixed_matvec(mats, v)
            shared_vm, shared_mv = fixed_vecmat(v, mats[2:3]), fixed_matvec(mats[2:3], v)
            for i in range(6):
                assert hexes(fixed_vecmat(v[i:i + 1], mats[i:i + 1])) == hexes(vm[i])
                assert hexes(fixed_matvec(mats[i:i + 1], v[i:i + 1])) == hexes(mv[i])
                assert hexes(fixed_vecmat(v[i:i + 1], mats[2:3])) == hexes(shared_vm[i])
                assert hexes(fixed_matvec(mats[2:3], v[i:i + 1])) == hexes(shared_mv[i])
            a, m_ = v[4].tolist(), mats[4].tolist()
            bound = (math.ceil(math.log2(d)) + 1) * EPS
            for j in (0, d - 1):
                terms = [a[k] * m_[k][j] for k in range(d)]
                assert abs(float(vm[4, j]) - math.fsum(terms)) <= bound * math.fsum(map(abs, terms)) * (1 + 2 * EPS)
                terms = [m_[j][k] * a[k] for k in range(d)]
                assert abs(float(mv[4, j]) - math.fsum(terms)) <= bound * math.fsum(map(abs, terms)) * (1 + 2 * EPS)


def test_basis_error_is_canonical_and_bounds_the_skew():
    gen = torch.Generator().manual_seed(1)
    q, _ = torch.linalg.qr(torch.randn(40, 40, generator=gen, dtype=F64))
    skewed = q + 1e-7 * torch.randn(40, 40, generator=gen, dtype=F64)
    reference = float(torch.linalg.matrix_norm(skewed.T @ skewed - torch.eye(40, dtype=F64)))
    err = basis_error(skewed)
    assert reference <= err <= reference * (1 + 1e-6) + 1e-12
    buffer = torch.empty(40 * 40 + 1, dtype=F64)
    unaligned = buffer[1:].view(40, 40)  # the same values at another memory address and alignment
    unaligned.copy_(skewed)
    layouts = [skewed.clone(), unaligned, column_major(skewed)]
    for threads in (1, 2):
        with torch_threads(threads):
            assert {basis_error(b).hex() for b in layouts} == {err.hex()}
    unaligned.mul_(2.0)  # modified in place: the cached value is not reused
    assert basis_error(unaligned) > 1.0


# ----------------------------------------------------------------------------------------------- geometry


def regions_and_points(d, n, seed):
    """``n`` regions of every kind, close enough that some meet; a point inside one of them and one point near
    each region."""
    gen = torch.Generator().manual_seed(seed)
    box = 2.0 * (3.0 / d) ** 0.75
    regions = [make_region(KINDS[i % len(KINDS)], torch.rand(d, generator=gen, dtype=F64) * box, gen, scale=0.6)
               for i in range(n)]
    x = regions[1].center + 0.01 * torch.rand(d, generator=gen, dtype=F64)
    points = torch.stack([r.center for r in regions]) + 0.5 * torch.randn(n, d, generator=gen, dtype=F64)
    return regions, x, points


@pytest.mark.parametrize("d", [3, 24])
def test_distance_of_a_pair_is_the_same_bits_alone_or_in_any_batch(d):
    regions, x, points = regions_and_points(d, 24, d)
    n = len(regions)
    results = []
    for threads in (1, 2):
        gen = torch.Generator().manual_seed(1)
        with torch_threads(threads):
            alone = [hexes(distances(x, [r]))[0] for r in regions]
            assert min(float.fromhex(h) for h in alone) == 0.0 < max(float.fromhex(h) for h in alone)
            assert hexes(distances(x, regions)) == alone
            assert hexes(distances(x, regions[::-1])) == alone[::-1]
            perm = torch.randperm(n, generator=gen).tolist()
            assert hexes(distances(x, [regions[i] for i in perm])) == [alone[i] for i in perm]
            for size in (2, 5):
                for s in range(0, n - size + 1, 3):
                    assert hexes(distances(x, regions[s:s + size])) == alone[s:s + size]
            same_kind = [r for i, r in enumerate(regions) if i % len(KINDS) == 2]  # one pack, several bases
            assert hexes(distances(x, same_kind)) == alone[2::len(KINDS)]
            # one point per region, and many points against one region, alone or in batches
            paired = hexes(distances(points, regions))
            assert paired == [hexes(distances(points[i], [r]))[0] for i, r in enumerate(regions)]
            many = []
            for r in regions[:len(KINDS)]:
                many.append(hexes(distances(points, r)))
                assert many[-1] == [hexes(distances(points[i], r))[0] for i in range(n)]
                assert hexes(distances(points[7:10], r)) == many[-1][7:10]
            results.append((alone, paired, many))
    assert results[0] == results[1]  # and the same at both thread counts


@pytest.mark.parametrize("d", [3, 24])
def test_intersection_verdict_of_a_pair_is_the_same_alone_or_in_any_batch(d):
    regions, _, _ = regions_and_points(d, 18, 10 + d)
    n = len(regions)
    for threads in (1, 2):
        gen = torch.Generator().manual_seed(2)
        with torch_threads(threads):
            verdicts = 0
            for query in regions[:len(KINDS)]:
                others = [r for r in regions if r is not query]
                alone = [bool(intersects_each(query, [r])[0]) for r in others]
                assert intersects_each(query, others).tolist() == alone
                perm = torch.randperm(n - 1, generator=gen).tolist()
                assert intersects_each(query, [others[i] for i in perm]).tolist() == [alone[i] for i in perm]
                assert intersects_each(query, others[3:9]).tolist() == alone[3:9]
                verdicts += sum(alone)
            assert 0 < verdicts < len(KINDS) * (n - 1)  # both verdicts occur


# ----------------------------------------------------------------------------------------------- the memory


def memory_inputs():
    """Balls, axis-aligned and rotated ellipsoids, full-covariance and l1 regions, three classes, d = 3."""
    return toy_inputs(3, 48, 5, kinds=("ball", "axis", "rotated", "general", "l1"))


def outcome(results):
    return [(action, radius.hex()) for action, _, radius in results]


def state_bytes(memory):
    """Every stored region as bytes, in order (kind, index, prediction, center, axes, basis)."""
    out = []
    for index, prediction, region in memory.stored:
        basis = getattr(region, "basis", None)
        tensors = [region.center, region.axes] + ([] if basis is None else [basis])
        out.append((type(region).__name__, index, prediction,
                    b"".join(t.detach().cpu().contiguous().numpy().tobytes() for t in tensors)))
    return out


def folder_bytes(path):
    """The saved tensors by key (whichever chunk holds them) and the record lines without their chunk names."""
    tensors = {}
    for chunk in sorted(path.glob("regions-*.safetensors")):
        for key, t in load_file(chunk).items():
            assert key not in tensors
            tensors[key] = t.numpy().tobytes()
    records = []
    for line in (path / "records.jsonl").read_text().splitlines():
        rec = json.loads(line)
        if rec["region"] is not None:
            rec["region"].pop("chunk")
        records.append(json.dumps(rec, sort_keys=True))
    return tensors, records


def run_all(memory, inputs):
    return [memory.check(i, c, p, r) for i, c, p, r in inputs]


@pytest.mark.slow
def test_memory_is_the_same_bits_across_chunk_sizes_resume_points_and_batches(tmp_path, monkeypatch):
    inputs = memory_inputs()
    order = [i for i, *_ in inputs]
    reference = CertificationMemory("run", order)
    expected = outcome(run_all(reference, inputs))
    counts = reference.counts
    assert min(counts.values()) >= 3, counts  # every rule of Algorithm 1 is exercised
    expected_state = state_bytes(reference)
    saved = None
    for chunk_bytes, cuts in ((1, (0, 26)), (300, (9, 10, 31)), (1 << 20, (1, 47))):
        folder = tmp_path / f"mem-{chunk_bytes}"
        memory = CertificationMemory.open(folder, "run", order, chunk_bytes=chunk_bytes)
        got = []
        for start, stop in zip((0,) + cuts, cuts + (len(inputs),)):
            got += outcome(run_all(memory, inputs[start:stop]))
            del memory  # the process ends here: the rest runs on the reloaded memory
            memory = CertificationMemory.open(folder, "run", chunk_bytes=chunk_bytes)
            assert len(memory) == stop and state_bytes(memory) == expected_state[:len(memory.stored)]
        assert got == expected
        files = folder_bytes(folder)
        saved = saved or files
        assert files == saved
    assert set(saved[0]) >= {f"{i}/center" for i, _, _ in reference.stored}
    for threads in (1, 2):  # every other-class region in every batch (no pre-filter): the same decisions
        with torch_threads(threads):
            assert outcome(run_all(CertificationMemory("run", order), inputs)) == expected
            with monkeypatch.context() as patch:
                patch.setattr(memory_module, "outer_radius", lambda region: math.inf)
                unfiltered = CertificationMemory("run", order)
                assert outcome(run_all(unfiltered, inputs)) == expected
                assert state_bytes(unfiltered) == expected_state


def test_memory_decides_the_same_with_unrelated_regions_stored_before(monkeypatch):
    """Regions of a fourth class far away change what is stored and batched, but no decision about the inputs."""
    inputs = memory_inputs()
    expected = outcome(run_all(CertificationMemory(), inputs))
    gen = torch.Generator().manual_seed(9)
    far = []
    for j in range(30):
        center = 50.0 + torch.rand(3, generator=gen, dtype=F64)
        axes = 0.1 + torch.rand(3, generator=gen, dtype=F64)
        region = [Ball(center, 0.3), Ellipsoid(center, axes), CrossPolytope(center, axes)][j % 3]
        far.append((1000 + j, center, 3, region))
    memory = CertificationMemory()
    run_all(memory, far)
    assert outcome(run_all(memory, inputs)) == expected
    with monkeypatch.context() as patch:  # the far regions in every batch too
        patch.setattr(memory_module, "outer_radius", lambda region: math.inf)
        memory = CertificationMemory()
        run_all(memory, far)
        assert outcome(run_all(memory, inputs)) == expected
