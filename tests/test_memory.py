"""Memory-based certification (seed 000 Algorithm 1): soundness on overlapping toy regions, exact rules,
resumable files."""

import json
import math

import numpy as np
import pytest
import torch
from scipy.optimize import minimize

import smoothcert.methods.memory as memory_module
from smoothcert.geometry.regions import CrossPolytope
from smoothcert.geometry.intersection import intersects
from smoothcert.methods.memory import ABSTAINED, KEPT, SHRUNK, CertificationMemory, fingerprint_of
from smoothcert.noise.gaussian import FullGaussian
from smoothcert.geometry.regions import Ball, Ellipsoid

F64 = torch.float64


def random_region(kind, center, gen):
    d = center.numel()
    axes = 0.05 + 0.3 * torch.rand(d, generator=gen, dtype=F64)
    if kind == "ball":
        return Ball(center, float(axes[0]))
    if kind == "axis":
        return Ellipsoid(center, axes)
    if kind == "rotated":
        q, _ = torch.linalg.qr(torch.randn(d, d, generator=gen, dtype=F64))
        return Ellipsoid(center, axes, q)
    if kind == "general":
        m = torch.randn(d, d, generator=gen, dtype=F64)
        return FullGaussian(m @ m.T / d + 0.02 * torch.eye(d, dtype=F64)).region(center, 0.4)
    return CrossPolytope(center, 2 * axes)


def toy_inputs(d, n, seed, kinds=("ball", "axis", "rotated", "general", "l1")):
    gen = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        center = torch.rand(d, generator=gen, dtype=F64)
        kind = kinds[int(torch.randint(len(kinds), (1,), generator=gen))]
        out.append((i, center, int(torch.randint(3, (1,), generator=gen)), random_region(kind, center, gen)))
    return out


def sample_inside(region, n, gen):
    d = region.dim
    basis = getattr(region, "basis", None)
    basis = torch.eye(d, dtype=F64) if basis is None else basis
    if isinstance(region, CrossPolytope):
        e = -torch.log(torch.rand(n, d + 1, generator=gen, dtype=F64))
        sign = torch.where(torch.rand(n, d, generator=gen) < 0.5, -1.0, 1.0).to(F64)
        u = sign * e[:, :d] / e.sum(1, keepdim=True)
    else:
        g = torch.randn(n, d, generator=gen, dtype=F64)
        u = g / g.norm(dim=1, keepdim=True) * torch.rand(n, 1, generator=gen, dtype=F64) ** (1 / d)
    return region.center + (u * region.axes) @ basis.T


def reference_distance(point, region):
    """min ||y - p|| over y = c + U (a * u) in the region (SLSQP, convex): independent of smoothcert.geometry."""
    d = region.dim
    basis = getattr(region, "basis", None)
    basis = np.eye(d) if basis is None else basis.numpy()
    c, a, p = region.center.numpy(), region.axes.numpy(), point.numpy()
    l1 = isinstance(region, CrossPolytope)
    size = 2 * d if l1 else d

    lin = basis * a  # y = c + lin @ u
    if l1:
        lin = np.hstack([lin, -lin])
        cons = [{"type": "ineq", "fun": lambda v: 1.0 - v.sum(), "jac": lambda v: -np.ones_like(v)}]
    else:
        cons = [{"type": "ineq", "fun": lambda v: 1.0 - v @ v, "jac": lambda v: -2 * v}]

    def objective(v):
        r = c + lin @ v - p
        return r @ r, 2 * lin.T @ r

    res = minimize(objective, np.full(size, 0.01), jac=True, method="SLSQP", constraints=cons,
                   bounds=[(0, None)] * size if l1 else None, options={"ftol": 1e-15, "maxiter": 500})
    return math.sqrt(max(res.fun, 0.0))


def outer(region):
    return float(region.axes.max())


def run(memory, inputs):
    return [memory.check(i, c, p, r) for i, c, p, r in inputs]


# ----------------------------------------------------------------------------------------------- soundness


@pytest.mark.parametrize("d,seed", [(2, 0), (3, 1)])
def test_memory_leaves_no_conflicting_regions(d, seed):
    inputs = toy_inputs(d, 60, seed)
    mem = CertificationMemory("toy")
    results = run(mem, inputs)
    counts = mem.counts
    assert min(counts.values()) >= 3, counts  # the toy data exercises every rule
    stored = mem.stored
    assert len(stored) == counts[KEPT] + counts[SHRUNK]
    gen = torch.Generator().manual_seed(100 + seed)
    samples = [sample_inside(r, 2000, gen) for _, _, r in stored]
    for a, (ia, pa, ra) in enumerate(stored):
        for b, (ib, pb, rb) in enumerate(stored):
            if a >= b or pa == pb:
                continue
            assert not intersects(ra, rb), (ia, ib)
            assert not bool(rb.contains(samples[a]).any()) and not bool(ra.contains(samples[b]).any()), (ia, ib)
            assert not bool(rb.contains(ra.center)) and not bool(ra.contains(rb.center)), (ia, ib)
    by_index = {i: (c, p, r) for i, c, p, r in inputs}
    stored_before = []
    for (index, center, pred, original), (action, region, radius) in zip(inputs, results):
        others = [r for _, p, r in stored_before if p != pred]
        near = [r for r in others if float((r.center - center).norm()) <= outer(r) + outer(original)]
        if action == ABSTAINED:
            assert region is None and radius == 0.0
            assert any(bool(r.contains(center)) or reference_distance(center, r) < 1e-9 for r in near)
        elif action == KEPT:
            assert type(region) is type(original) and radius == original.inscribed_radius
            assert torch.equal(region.center, original.center) and torch.equal(region.axes, original.axes)
            assert not any(intersects(original, r) for r in others)
        else:  # shrunk: the largest ball inside the original region that misses the other classes
            assert isinstance(region, Ball) and torch.equal(region.center, original.center)
            assert bool(original.contains(sample_inside(region, 500, gen)).all())
            limit = min([original.inscribed_radius] + [reference_distance(center, r) for r in near])
            assert radius <= limit + 1e-12 and radius == pytest.approx(limit, rel=1e-6, abs=1e-9)
        if region is not None:
            stored_before.append((index, pred, region))
    assert [r.index for r in mem.records] == [i for i, *_ in inputs] and len(by_index) == len(inputs)


def test_algorithm_1_rules_by_hand():
    mem = CertificationMemory()
    z = torch.zeros(2, dtype=F64)
    assert mem.check(0, z, 0, Ball(z, 1.0)) == (KEPT, mem.stored[0][2], 1.0)
    p = torch.tensor([0.5, 0.0], dtype=F64)
    assert mem.check(1, p, 1, Ball(p, 0.1)) == (ABSTAINED, None, 0.0)  # inside another class's region
    p = torch.tensor([0.0, 0.5], dtype=F64)
    action, region, radius = mem.check(2, p, 0, Ball(p, 1.2))  # same class: overlap allowed
    assert action == KEPT and radius == 1.2
    p = torch.tensor([3.0, 4.5], dtype=F64)
    action, region, radius = mem.check(3, p, 1, Ellipsoid(p, torch.tensor([2.5, 0.4], dtype=F64)))
    assert action == KEPT  # misses both class-0 regions
    p = torch.tensor([5.0, 0.0], dtype=F64)
    action, region, radius = mem.check(4, p, 1, Ellipsoid(p, torch.tensor([4.5, 0.5], dtype=F64)))
    assert action == SHRUNK and radius == pytest.approx(0.5, rel=1e-9)  # capped by the inscribed radius
    p = torch.tensor([-2.2, 0.0], dtype=F64)
    action, region, radius = mem.check(5, p, 2, Ball(p, 1.5))  # meets both class-0 balls: the nearer one wins
    expected = math.hypot(2.2, 0.5) - 1.2
    assert action == SHRUNK and radius == pytest.approx(expected, rel=1e-9) and radius < expected
    assert mem.check(6, p, -1, None) == (ABSTAINED, None, 0.0)  # smoothing abstained already
    assert [i for i, _, _ in mem.stored] == [0, 2, 3, 4, 5]
    assert mem.counts == {KEPT: 3, SHRUNK: 2, ABSTAINED: 2}


def test_prefilter_sends_only_nearby_regions_to_the_exact_test(monkeypatch):
    d = 784
    gen = torch.Generator().manual_seed(3)
    mem = CertificationMemory("mnist-like")
    for i in range(300):
        center = torch.zeros(d, dtype=F64)
        center[i] = 10.0 * (i + 1)
        mem.check(i, center, i % 10, Ellipsoid(center, 0.1 + torch.rand(d, generator=gen, dtype=F64)))
    seen = []
    original = memory_module.intersects_each
    monkeypatch.setattr(memory_module, "intersects_each", lambda r, rs: seen.append(len(rs)) or original(r, rs))
    center = torch.zeros(d, dtype=F64)
    center[7] = 80.5
    action, _, radius = mem.check(300, center, 3, Ellipsoid(center, torch.full((d,), 0.5, dtype=F64)))
    assert seen == [1] and action == SHRUNK and 0 < radius < 0.5


# ----------------------------------------------------------------------------------------------- files


def assert_same_state(a, b):
    assert a.records == b.records
    assert len(a.stored) == len(b.stored)
    for (ia, pa, ra), (ib, pb, rb) in zip(a.stored, b.stored):
        assert (ia, pa, type(ra)) == (ib, pb, type(rb))
        assert torch.equal(ra.center, rb.center) and torch.equal(ra.axes, rb.axes)
        ba, bb = getattr(ra, "basis", None), getattr(rb, "basis", None)
        assert (ba is None) == (bb is None) and (ba is None or torch.equal(ba, bb))


def test_resume_gives_identical_state_and_results(tmp_path):
    inputs = toy_inputs(3, 40, 5)
    order = [i for i, *_ in inputs]
    reference = CertificationMemory("run-1", order)
    expected = run(reference, inputs)
    first = CertificationMemory.open(tmp_path / "mem", "run-1", order, chunk_bytes=300)
    run(first, inputs[:25])
    resumed = CertificationMemory.open(tmp_path / "mem", "run-1")
    assert resumed.order == order and resumed.next_index == 25 and len(resumed) == 25
    assert_same_state(first, resumed)
    assert len(list((tmp_path / "mem").glob("regions-*.safetensors"))) > 1  # small chunks: several files
    got = run(resumed, inputs[25:])
    assert [(a, r) for a, _, r in got] == [(a, r) for a, _, r in expected[25:]]
    assert_same_state(reference, resumed)
    assert_same_state(reference, CertificationMemory.open(tmp_path / "mem", "run-1", order))


def test_crash_loses_only_unflushed_records_and_torn_lines(tmp_path):
    inputs = toy_inputs(2, 30, 6)
    reference = CertificationMemory("run")
    run(reference, inputs)
    crashed = CertificationMemory.open(tmp_path, "run", autosave=4)
    run(crashed, inputs[:11])  # 8 written, 3 pending when the process dies (no flush)
    with open(tmp_path / "records.jsonl", "ab") as fh:
        fh.write(b'{"index": 8, "predic')  # a torn line
    resumed = CertificationMemory.open(tmp_path, "run", autosave=4)
    assert len(resumed) == 8 and (tmp_path / "records.jsonl").read_bytes().endswith(b"\n")
    run(resumed, inputs[8:])
    resumed.flush()
    assert_same_state(reference, resumed)
    assert_same_state(reference, CertificationMemory.open(tmp_path, "run"))


def test_wrong_run_or_order_is_refused(tmp_path):
    inputs = toy_inputs(2, 6, 7)
    config = {"method": "ancer", "sigma": 0.25, "seed": 0}
    mem = CertificationMemory.open(tmp_path, config, order=[i for i, *_ in inputs])
    run(mem, inputs[:3])
    assert CertificationMemory.open(tmp_path, dict(reversed(list(config.items())))).next_index == 3
    assert fingerprint_of(config) == CertificationMemory.open(tmp_path, config).fingerprint
    with pytest.raises(ValueError, match="another run"):
        CertificationMemory.open(tmp_path, {**config, "sigma": 0.5})
    with pytest.raises(ValueError, match="another input order"):
        CertificationMemory.open(tmp_path, config, order=[5, 4, 3, 2, 1, 0])
    resumed = CertificationMemory.open(tmp_path, config)
    i, c, p, r = inputs[4]
    with pytest.raises(ValueError, match="expects dataset index 3"):
        resumed.check(i, c, p, r)
    with pytest.raises(ValueError, match="already holds a certification memory"):
        CertificationMemory(config, path=tmp_path)
    run(resumed, inputs[3:])
    with pytest.raises(ValueError, match="already processed"):
        resumed.check(*inputs[0])
    lines = (tmp_path / "records.jsonl").read_text().splitlines()
    (tmp_path / "records.jsonl").write_text("\n".join([lines[1], lines[0], *lines[2:]]) + "\n")
    with pytest.raises(ValueError, match="out of order"):
        CertificationMemory.open(tmp_path, config)
    assert json.loads(lines[0])["index"] == inputs[0][0]


def test_stored_regions_do_not_alias_the_callers_tensors():
    mem = CertificationMemory()
    x = torch.zeros(2, dtype=F64)
    axes = torch.ones(2, dtype=F64)
    mem.check(0, x, 0, Ellipsoid(x, axes))
    x += 5.0  # the caller reuses its buffers
    axes *= 10.0
    p = torch.tensor([0.5, 0.0], dtype=F64)
    assert mem.check(1, p, 1, Ball(p, 0.1))[0] == ABSTAINED
    assert mem.stored[0][2].center.tolist() == [0.0, 0.0] and mem.stored[0][2].axes.tolist() == [1.0, 1.0]


def test_check_rejects_bad_input():
    mem = CertificationMemory()
    z = torch.zeros(2, dtype=F64)
    mem.check(0, z, 0, Ball(z, 1.0))
    with pytest.raises(ValueError, match="already processed"):
        mem.check(0, z, 0, Ball(z, 1.0))
    with pytest.raises(ValueError, match="not the region's center"):
        mem.check(1, z + 1, 0, Ball(z, 1.0))
    with pytest.raises(ValueError, match="d=2 regions"):
        mem.check(1, torch.zeros(3), 0, Ball(torch.zeros(3), 1.0))
    with pytest.raises(TypeError, match="integer class"):
        mem.check(1, z, 0.5, Ball(z, 1.0))
    with pytest.raises(ValueError, match="region is None"):
        mem.check(1, z, 1, None)
    with pytest.raises(TypeError, match="Ball, an Ellipsoid, a CrossPolytope or a LowRankEllipsoid"):
        mem.check(1, z, 1, "ball")
    with pytest.raises(ValueError, match=">= 0"):
        mem.check(-1, z, 1, Ball(z, 1.0))
    with pytest.raises(ValueError, match="twice"):
        CertificationMemory(order=[1, 1])
    with pytest.raises(ValueError, match="autosave"):
        CertificationMemory(autosave=0)
