"""Sound against float sampling on the MNIST CNN, measured in one interleaved run (not run in CI).

Prints
  1. the cost of drawing one block of noisy copies (``perturb_``, 1000 x 784 values): sound / float, interleaved;
  2. the cost of certify per test digit, float and sound alternating digit by digit (the order flips every digit):
     the ratio of the summed times and the median of the per-digit ratios (target: at most 1.2);
  3. certified accuracy at several radii, ACR and abstentions of both on the same digits, and how far the radii
     of the two differ.

Sound sampling certifies the smoothed classifier of f(clip(round(x + delta))) exactly
(smoothcert.noise.discrete); float sampling certifies, strictly, only an idealized Gaussian smoothing.

    python benchmarks/sound_sampling.py --checkpoint PATH [--inputs 50] [--n 10000] [--threads 1]
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import numpy as np
import torch

from smoothcert.data.datasets import load_dataset
from smoothcert.engine.sampling import input_generator
from smoothcert.engine.smooth import certify
from smoothcert.evaluation.tables import average_certified_radius, certified_accuracy
from smoothcert.noise.discrete import SAMPLINGS, gaussian_noise

RADII = (0.0, 0.25, 0.5, 0.75, 1.0)


def get_model(args, device):
    from smoothcert.models.checkpoint import load_checkpoint

    if args.checkpoint:
        model, _ = load_checkpoint(args.checkpoint)
        return model.eval().to(device)
    from smoothcert.models.architectures import model_for_dataset
    from smoothcert.training.loop import train

    prefix = Path(args.out) / "mnist-cnn-gaussian"
    state = prefix.with_name(prefix.name + ".state.pt")
    torch.manual_seed(0)
    model = model_for_dataset("mnist", "mnist-cnn")
    print(f"training the MNIST CNN with Gaussian noise, sigma {args.sigma}, {args.epochs} epochs (resumes)", flush=True)
    train(model, load_dataset("mnist", "train"), objective="gaussian", sigma=args.sigma, epochs=args.epochs,
          lr=0.05, schedule="cosine", seed=0, out=prefix, progress=False, resume=state.exists(),
          config={"dataset": "mnist"})
    model, _ = load_checkpoint(prefix)
    return model.eval().to(device)


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _clocks():
    """(wall, CPU) seconds: on a shared CPU the process's CPU time leaves out the time it waited for a core."""
    return time.perf_counter(), time.process_time()


def draw_costs(x, sigma, rounds, block, device):
    """Median seconds per ``perturb_`` of ``block`` copies of one digit, per sampling, rounds interleaved (CPU time of
    the process on a CPU, wall time on a GPU)."""
    noises = {s: gaussian_noise(sigma, s) for s in SAMPLINGS}
    out = torch.empty((block, *x.shape), device=device)
    times = {s: [] for s in SAMPLINGS}
    gen = input_generator(0, 0, "bench", device)
    for r in range(rounds):
        for s in (SAMPLINGS if r % 2 == 0 else SAMPLINGS[::-1]):
            noises[s].perturb_(out, x, gen)
            _sync(device)
            t0 = time.perf_counter() if device.type == "cuda" else time.process_time()
            noises[s].perturb_(out, x, gen)
            _sync(device)
            times[s].append((time.perf_counter() if device.type == "cuda" else time.process_time()) - t0)
    return {s: statistics.median(t) for s, t in times.items()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint", default=None, help="MNIST checkpoint (default: train one into --out)")
    p.add_argument("--out", default="bench-sound")
    p.add_argument("--epochs", type=int, default=8)
    p.add_argument("--inputs", type=int, default=50, help="the first INPUTS test digits")
    p.add_argument("--sigma", type=float, default=0.25)
    p.add_argument("--n0", type=int, default=100)
    p.add_argument("--n", type=int, default=10_000)
    p.add_argument("--alpha", type=float, default=0.001)
    p.add_argument("--batch-size", type=int, default=1000)
    p.add_argument("--draw-rounds", type=int, default=20)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1: the machine is shared)")
    p.add_argument("--device", default="cpu")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    model = get_model(args, device)
    data = load_dataset("mnist", "test")
    x, y = data.batch(list(range(args.inputs)))
    x, y = x.to(device), y.numpy()

    draws = draw_costs(x[0], args.sigma, args.draw_rounds, args.batch_size, device)
    print(f"perturb_ of {args.batch_size} x {x[0].numel()} values (median of {args.draw_rounds}): float {draws['float'] * 1e3:.2f} ms, "
          f"sound {draws['sound'] * 1e3:.2f} ms, ratio sound/float {draws['sound'] / draws['float']:.2f}")

    noises = {s: gaussian_noise(args.sigma, s) for s in SAMPLINGS}
    seconds = {s: [] for s in SAMPLINGS}
    cpu = {s: [] for s in SAMPLINGS}
    radius = {s: np.zeros(args.inputs) for s in SAMPLINGS}
    correct = {s: np.zeros(args.inputs, dtype=bool) for s in SAMPLINGS}
    abstained = {s: 0 for s in SAMPLINGS}
    certify(model, x[:1], noises["sound"], 10, 10, 100, args.alpha, batch_size=args.batch_size)  # warm-up
    for i in range(args.inputs):
        for s in (SAMPLINGS if i % 2 == 0 else SAMPLINGS[::-1]):
            gens = [(input_generator(args.seed, i, "select", device), input_generator(args.seed, i, "estimate", device))]
            _sync(device)
            wall, proc = _clocks()
            (c,) = certify(model, x[i : i + 1], noises[s], 10, args.n0, args.n, args.alpha,
                           batch_size=args.batch_size, generators=gens)
            _sync(device)
            seconds[s].append(time.perf_counter() - wall)
            cpu[s].append(time.process_time() - proc)
            radius[s][i] = c.radius
            correct[s][i] = c.prediction == int(y[i])
            abstained[s] += c.abstained
        print(f"digit {i}: wall float {seconds['float'][-1]:.2f} s, sound {seconds['sound'][-1]:.2f} s; CPU float "
              f"{cpu['float'][-1]:.2f} s, sound {cpu['sound'][-1]:.2f} s", flush=True)

    print(f"\ncertify, {args.inputs} digits, n0 {args.n0}, n {args.n}, batch {args.batch_size}, sigma {args.sigma}, "
          f"{args.threads} thread(s), {device}:")
    for name, clock in (("wall", seconds), ("CPU", cpu)):
        total = sum(clock["sound"]) / sum(clock["float"])
        per_digit = statistics.median(a / b for a, b in zip(clock["sound"], clock["float"]))
        print(f"  {name} time: float {sum(clock['float']):.1f} s, sound {sum(clock['sound']):.1f} s; ratio sound/float "
              f"{total:.3f} (summed), {per_digit:.3f} (median per digit)")
    print("\n| sampling | " + " | ".join(f"r={r:g}" for r in RADII) + " | ACR | abstained |")
    print("|---" * (len(RADII) + 3) + "|")
    for s in SAMPLINGS:
        acc = certified_accuracy(radius[s], correct[s], RADII)
        print(f"| {s} | " + " | ".join(f"{a:.3f}" for a in acc)
              + f" | {average_certified_radius(radius[s], correct[s]):.4f} | {abstained[s]} |")
    both = correct["float"] & correct["sound"]
    diff = radius["sound"][both] - radius["float"][both]
    print(f"\nradius sound - float on the {int(both.sum())} digits both got right: mean {diff.mean():+.4f}, "
          f"max |.| {np.abs(diff).max():.4f}; void probability per sample "
          f"{noises['sound'].void_probability(x[0].numel()):.2e}")


if __name__ == "__main__":
    main()
