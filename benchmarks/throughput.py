"""Certification throughput, measured as ratios in one run (not run in CI).

Prints, on the MNIST CNN:
  1. raw forward throughput of noisy samples (model(batch) alone, batch prepared beforehand);
  2. smoothcert's certify throughput, same dtype and batch size, and its ratio to (1) (target >= 0.9);
  3. the same for bfloat16;
  4. the speed-up over the classic reference loop (Cohen et al.'s core.py: one input at a time, batch 400,
     float32, predictions counted in Python on the CPU) at n = 100,000, for several smoothcert settings.
Where a CUDA GPU is present it runs there too and adds, for a CIFAR ResNet-110 at n = 100,000, the raw forward
throughput, smoothcert's certify throughput and seconds per image, and their ratio (target >= 0.9), in float32,
bfloat16 and bfloat16 with channels_last (and torch.compile with --compile). ``--resnet`` prints only that table
(on any device; with a small --n and --batch it checks the path on a CPU).

    python benchmarks/throughput.py [--checkpoint PATH] [--inputs 3] [--n 100000] [--compile]
    python benchmarks/throughput.py --device cuda --resnet [--compile]      # or: bash benchmarks/gpu.sh
"""

from __future__ import annotations

import argparse
import copy
import time

import numpy as np
import torch

from smoothcert.noise.gaussian import IsotropicGaussian
from smoothcert.engine.smooth import certify
from smoothcert.engine.sampling import input_generator
from smoothcert.data.datasets import load_dataset
from smoothcert.models.architectures import build_model, cifar_resnet
from smoothcert.models.layout import ChannelsLast


def raw_forward(model, x, sigma, batch, dtype, seconds=3.0):
    """Samples per second of model(x + noise) with the noisy batch prepared outside the timer."""
    noisy = (x.unsqueeze(0) + sigma * torch.randn((batch, *x.shape), device=x.device)).contiguous()
    ctx = torch.autocast(x.device.type, dtype=dtype) if dtype != torch.float32 else torch.autocast(
        x.device.type, enabled=False)
    with torch.inference_mode(), ctx:
        model(noisy)
        _sync(x)
        done, t0 = 0, time.perf_counter()
        while time.perf_counter() - t0 < seconds:
            model(noisy).argmax(1)
            done += batch
        _sync(x)
        return done / (time.perf_counter() - t0)


def _sync(x):
    if x.device.type == "cuda":
        torch.cuda.synchronize(x.device)


def smoothcert_rate(model, xs, sigma, n0, n, batch, dtype, inputs_per_batch=1, num_classes=10):
    """(samples per second, seconds per input) of smoothcert.certify over the inputs ``xs``."""
    block = max(1, batch // inputs_per_batch)
    # warm-up at the timed run's pass shapes (n0 and full batches), so a compiled model is compiled before the timer
    certify(model, xs[:1], IsotropicGaussian(sigma), num_classes, n0, 2 * batch, 0.001, batch_size=batch, dtype=dtype)
    _sync(xs)
    t0 = time.perf_counter()
    for start in range(0, len(xs), inputs_per_batch):
        chunk = xs[start : start + inputs_per_batch]
        idx = range(start, start + len(chunk))
        gens = [(input_generator(0, i, "select", xs.device), input_generator(0, i, "estimate", xs.device)) for i in idx]
        certify(model, chunk, IsotropicGaussian(sigma), num_classes, n0, n, 0.001, batch_size=batch, block=block,
                generators=gens, dtype=dtype)
    _sync(xs)
    seconds = time.perf_counter() - t0
    return len(xs) * (n0 + n) / seconds, seconds / len(xs)


def classic_reference(model, x, sigma, num, batch, num_classes=10):
    """Cohen et al.'s reference ``Smooth._sample_noise``: repeat, randn_like, argmax, count in Python."""
    with torch.no_grad():
        counts = np.zeros(num_classes, dtype=int)
        remaining = num
        while remaining > 0:
            this = min(batch, remaining)
            remaining -= this
            b = x.repeat((this, 1, 1, 1))
            noise = torch.randn_like(b) * sigma
            predictions = model(b + noise).argmax(1)
            for idx in predictions.cpu().numpy():
                counts[idx] += 1
        return counts


def classic_seconds_per_input(model, xs, sigma, n0, n):
    classic_reference(model, xs[0], sigma, 100, 400)
    _sync(xs)
    t0 = time.perf_counter()
    for x in xs:
        classic_reference(model, x, sigma, n0, 400)
        classic_reference(model, x, sigma, n, 400)
    _sync(xs)
    return (time.perf_counter() - t0) / len(xs)


def resnet_table(device, n, batch, rounds, compile_too, sigma=0.25):
    """CIFAR ResNet-110 (untrained: speed does not depend on the weights), two images: per variant, the raw forward
    samples/s, certify's samples/s and seconds per image at ``n`` (n0 = 100), and their ratio (interleaved rounds)."""
    base = cifar_resnet(110).to(device).eval()
    cx = torch.rand(2, 3, 32, 32, device=device)
    variants = [("float32", torch.float32, base), ("bfloat16", torch.bfloat16, base),
                ("bfloat16, channels_last", torch.bfloat16, ChannelsLast(copy.deepcopy(base)))]
    if compile_too:
        variants.append(("bfloat16, channels_last, compile", torch.bfloat16,
                         torch.compile(ChannelsLast(copy.deepcopy(base)))))
    print(f"\nCIFAR ResNet-110 on {device}, batch {batch}, n0 100, n {n:,}, 2 images, {rounds} rounds\n")
    print("| variant | raw forward (samples/s) | certify (samples/s) | s per image | certify / raw |")
    print("|---|---:|---:|---:|---:|")
    for name, dtype, model in variants:
        raws, rates, spis = [], [], []
        for _ in range(rounds):
            raws.append(raw_forward(model, cx[0], sigma, batch, dtype, seconds=2.0))
            rate, spi = smoothcert_rate(model, cx, sigma, 100, n, batch, dtype)
            rates.append(rate)
            spis.append(spi)
        raw, rate = float(np.mean(raws)), float(np.mean(rates))
        print(f"| {name} | {raw:,.0f} | {rate:,.0f} | {np.mean(spis):.3f} | {rate / raw:.3f} |", flush=True)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", default=None, help="a trained MNIST checkpoint (default: untrained weights; "
                    "throughput does not depend on the weights)")
    ap.add_argument("--inputs", type=int, default=3, help="test digits timed at n = 100,000")
    ap.add_argument("--n", type=int, default=100_000)
    ap.add_argument("--sigma", type=float, default=0.25)
    ap.add_argument("--compile", action="store_true", help="also time a torch.compile'd model")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--rounds", type=int, default=5, help="interleaved raw/certify rounds per ratio")
    ap.add_argument("--ratios-only", action="store_true", help="only the certify / raw forward table")
    ap.add_argument("--resnet", action="store_true", help="only the CIFAR ResNet-110 table (at --n, --batch)")
    ap.add_argument("--batch", type=int, default=1000, help="the ResNet table's batch size")
    args = ap.parse_args()
    device = torch.device(args.device)
    if args.resnet:
        return resnet_table(device, args.n, args.batch, args.rounds, args.compile)
    if args.checkpoint:
        from smoothcert.models.checkpoint import load_checkpoint

        model = load_checkpoint(args.checkpoint, device=device)[0]
    else:
        torch.manual_seed(0)
        model = build_model("mnist-cnn").to(device).eval()
    xs = load_dataset("mnist", "test").inputs[: args.inputs].to(device)
    print(f"device {device}, torch {torch.__version__}, threads {torch.get_num_threads()}, "
          f"MNIST CNN, sigma {args.sigma}, n0 100, n {args.n:,}, {args.inputs} inputs\n")

    print("| dtype | batch | raw forward (samples/s) | certify (samples/s) | certify / raw |")
    print("|---|---:|---:|---:|---:|")
    for dtype in (torch.float32, torch.bfloat16):
        for batch in (400, 1000):
            # interleaved rounds, so a change in the machine's load hits both measurements alike
            raws, rates = [], []
            for _ in range(args.rounds):
                raws.append(raw_forward(model, xs[0], args.sigma, batch, dtype, seconds=1.0))
                rates.append(smoothcert_rate(model, xs[:1], args.sigma, 100, args.n // 10, batch, dtype)[0])
            raw, rate = float(np.mean(raws)), float(np.mean(rates))
            print(f"| {str(dtype).split('.')[-1]} | {batch} | {raw:,.0f} | {rate:,.0f} | {rate / raw:.3f} |",
                  flush=True)
    if args.ratios_only:
        return

    classic = classic_seconds_per_input(model, xs, args.sigma, 100, args.n)
    print(f"\nclassic reference loop (batch 400, float32): {classic:.2f} s per input at n = {args.n:,}\n")
    print("| smoothcert setting | s per input | speed-up over classic |")
    print("|---|---:|---:|")
    settings = [("float32, batch 400, 1 input per batch", torch.float32, 400, 1, model),
                ("float32, batch 1000, 1 input per batch", torch.float32, 1000, 1, model),
                ("float32, batch 4000, 1 input per batch", torch.float32, 4000, 1, model),
                ("bfloat16, batch 1000, 1 input per batch", torch.bfloat16, 1000, 1, model),
                ("bfloat16, batch 4000, 1 input per batch", torch.bfloat16, 4000, 1, model)]
    if args.compile:
        compiled = torch.compile(model)
        settings += [("float32 + torch.compile, batch 1000", torch.float32, 1000, 1, compiled),
                     ("bfloat16 + torch.compile, batch 1000", torch.bfloat16, 1000, 1, compiled)]
    for name, dtype, batch, per, m in settings:
        _, spi = smoothcert_rate(m, xs, args.sigma, 100, args.n, batch, dtype, per)
        print(f"| {name} | {spi:.2f} | {classic / spi:.2f}x |")

    if device.type == "cuda":
        resnet_table(device, 100_000, args.batch, 2, args.compile)


if __name__ == "__main__":
    main()
