"""Per-input optimization time of the data-dependent methods, measured as ratios in one run (not run in CI).

Prints, on a model (``--checkpoint``, or a freshly initialized ``--arch`` for ``--dataset``: timing does not
depend on the weights; default the MNIST CNN on MNIST test digits):
  1. seconds per input and step of each optimizer (DDS, ANCER, RANCER's rotated ANCER, RDDRS) when the inputs
     are optimized one at a time and ``--batch`` at a time, and the speed-up of batching (target >= 2x);
  2. RANCER's basis: the Hessian by the Jacobian form ``J^T (diag(p) - p p^T) J`` against double
     differentiation (time ratio, and the largest difference of the two Hessians);
  3. RDDRS: seconds per step with 1,000 and with 20,000 Monte Carlo samples (the paper's setting).

    python benchmarks/optimization.py [--checkpoint PATH] [--batch 32] [--steps 5] [--device cpu] [--threads 1]
    python benchmarks/optimization.py --dataset digits --arch mlp      # a small model: per-step overhead shows

Batching pays where one input's samples leave the hardware idle or the per-step overhead (Python, kernel launches,
small matrix calls) is comparable to the arithmetic: on a GPU, and for small models. On a CPU with a model whose
forward pass is compute-bound (the MNIST CNN at 100 samples per input), a batch of inputs costs about what the
inputs cost one at a time.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from smoothcert.data.datasets import load_dataset
from smoothcert.methods.hessian import hessian_basis, loss_hessian
from smoothcert.methods.ancer import optimize_ancer
from smoothcert.methods.optimize import cpu_pass_size
from smoothcert.methods.optimize import optimize_dds
from smoothcert.methods.rddrs import optimize_rddrs
from smoothcert.models.architectures import model_for_dataset
from smoothcert.engine.sampling import input_generator


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device) -> float:
    _sync(device)
    t0 = time.perf_counter()
    fn()
    _sync(device)
    return time.perf_counter() - t0


def per_input_seconds(run, x, device, singles: int, rounds: int) -> tuple[float, float]:
    """Median over ``rounds`` interleaved rounds of (seconds per input one at a time over ``singles`` inputs,
    seconds per input for the whole batch): interleaving makes a shared machine's load fall on both alike."""
    run(x[:1], [0])  # warm-up
    run(x, list(range(x.shape[0])))
    ones, batches = [], []
    for _ in range(rounds):
        ones.append(sum(timed(lambda i=i: run(x[i : i + 1], [i]), device) for i in range(singles)) / singles)
        batches.append(timed(lambda: run(x, list(range(x.shape[0]))), device) / x.shape[0])
    return statistics.median(ones), statistics.median(batches)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", default=None, help="a checkpoint (default: a random --arch for --dataset)")
    p.add_argument("--dataset", default="mnist", help="test inputs from this data set (default mnist)")
    p.add_argument("--arch", default=None, help="architecture when no checkpoint (default: the data set's)")
    p.add_argument("--batch", type=int, default=32, help="inputs optimized at once (default 32)")
    p.add_argument("--singles", type=int, default=4, help="inputs timed one at a time (default 4)")
    p.add_argument("--rounds", type=int, default=3, help="interleaved timing rounds, median reported (default 3)")
    p.add_argument("--steps", type=int, default=5, help="optimization steps per timing (default 5)")
    p.add_argument("--samples", type=int, default=100, help="noise samples per input and step (default 100)")
    p.add_argument("--rddrs-batch", type=int, default=8, help="inputs optimized at once by RDDRS (default 8)")
    p.add_argument("--rddrs-samples", type=int, default=1000, help="RDDRS samples per step (default 1000)")
    p.add_argument("--max-batch", type=int, default=None,
                   help="noisy inputs per forward and backward pass, as --opt-batch-size (default as certify: "
                        "cpu_pass_size(input values) on a CPU, 1000 on an accelerator)")
    p.add_argument("--sigma", type=float, default=0.25)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--threads", type=int, default=None,
                   help="CPU threads (default: torch's; 1 gives stable timings on a shared machine)")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    torch.manual_seed(0)
    if args.checkpoint:
        from smoothcert.models.checkpoint import load_checkpoint

        model = load_checkpoint(args.checkpoint, device)[0]
    else:
        model = model_for_dataset(args.dataset, args.arch)
    model = model.to(device).eval()
    data = load_dataset(args.dataset, "test")
    x = torch.stack([data[i][0] for i in range(args.batch)]).to(device)
    args.max_batch = args.max_batch or (cpu_pass_size(x[0].numel()) if device.type == "cpu" else 1000)
    gens = lambda idx, s: [input_generator(0, i, s, device) for i in idx]  # noqa: E731
    kw = dict(steps=args.steps, samples=args.samples, max_batch=args.max_batch)
    print(f"device {device}, threads {torch.get_num_threads()}, batch {args.batch}, steps {args.steps}, "
          f"samples {args.samples}, max batch {args.max_batch}, data {args.dataset}, model {type(model).__name__}")

    basis_cache: dict = {}

    def basis_for(xs, idx):
        key = tuple(idx)
        if key not in basis_cache:
            basis_cache[key] = hessian_basis(model, xs)[0]
        return basis_cache[key]

    runs = {
        "dds": lambda xs, idx: optimize_dds(model, xs, args.sigma, generators=gens(idx, "dds"), lr=0.04, **kw),
        "ancer": lambda xs, idx: optimize_ancer(model, xs, args.sigma, generators=gens(idx, "ancer"), **kw),
        "rancer (given U)": lambda xs, idx: optimize_ancer(
            model, xs, args.sigma, generators=gens(idx, "rancer"), lower=args.sigma * 0.5, upper=args.sigma * 1.5,
            basis=basis_for(xs, idx), **kw),
    }
    print("\n1. optimization, seconds per input and step")
    print(f"{'method':<18}{'one at a time':>15}{f'batch of {args.batch}':>15}{'speed-up':>10}")
    for name, run in runs.items():
        if name.startswith("rancer"):
            for i in range(args.singles):
                basis_for(x[i : i + 1], [i])
            basis_for(x, list(range(x.shape[0])))
        one, batch = per_input_seconds(run, x, device, args.singles, args.rounds)
        print(f"{name:<18}{one / args.steps:>15.4f}{batch / args.steps:>15.4f}{one / batch:>9.1f}x")
    xr = x[: args.rddrs_batch]
    rddrs = lambda xs, idx: optimize_rddrs(model, xs, args.sigma, generators=gens(idx, "rddrs"),  # noqa: E731
                                           steps=2, samples=args.rddrs_samples,
                                           max_batch=max(args.max_batch, args.rddrs_samples))
    one, batch = per_input_seconds(rddrs, xr, device, min(args.singles, 2), args.rounds)
    print(f"{'rddrs':<18}{one / 2:>15.4f}{batch / 2:>15.4f}{one / batch:>9.1f}x   "
          f"(batch of {xr.shape[0]}, {args.rddrs_samples} samples, d = {x[0].numel()}: two float64 d x d "
          "eigen-decompositions per input and step)")

    print("\n2. RANCER basis: Hessian of the loss w.r.t. the input")
    xs = x[:8]
    loss_hessian(model, xs[:1], "jacobian")
    out = {}
    t_jac = timed(lambda: out.update(jac=loss_hessian(model, xs, "jacobian")[0]), device)
    t_dbl = timed(lambda: out.update(dbl=loss_hessian(model, xs, "double")[0]), device)
    h_jac, h_dbl, form = out["jac"], out["dbl"], loss_hessian(model, xs, "auto")[1]
    diff = float((h_jac - h_dbl).abs().max() / h_dbl.abs().max())
    print(f"8 inputs: Jacobian form {t_jac:.3f} s, double differentiation {t_dbl:.3f} s, "
          f"ratio {t_dbl / t_jac:.1f}x; auto picks {form!r}; max |difference| / max |H| = {diff:.1e}")

    print("\n3. RDDRS Monte Carlo samples per step (one input)")
    for samples in (1000, 20000):
        t = timed(lambda s=samples: optimize_rddrs(model, x[:1], args.sigma, generators=gens([0], "r"), steps=1,
                                                   samples=s, max_batch=max(args.max_batch, 1000)), device)
        print(f"{samples:>6} samples: {t:.2f} s per step")


if __name__ == "__main__":
    main()
