"""What ``certify`` and ``predict`` build from their options before any work: the checks, the base classifier
(with its denoiser), the data set, the selected indices, the mode of certification and the method's context.

Every check runs before any file is created or any sample drawn, so a rejected run leaves nothing behind.
"""

from __future__ import annotations

import argparse

import torch

from smoothcert.cli.checks import check_input_shape, check_run_options
from smoothcert.cli.common import load_base_classifier, load_denoised, resolve_device
from smoothcert.cli.options import build_method, dest_of
from smoothcert.cli.runner import samples_per_pass, select_indices
from smoothcert.data.datasets import DATASETS
from smoothcert.engine.sampling import DTYPES
from smoothcert.engine.sequential import MODES, Mode
from smoothcert.models.layout import ChannelsLast
import smoothcert.methods  # noqa: F401  (registers every built-in method)
from smoothcert.methods.base import CertifyMethod, RunContext, method_class
from smoothcert.settings import flag_of, setting_fields
from smoothcert.stats.sequential import SEQUENCES

__all__ = ["compilable", "add_run_options", "add_mode_options", "mode_from_args", "check_compile",
           "check_method_options", "check_sampling_option", "check_selected_inputs", "check_noise_option", "setup_run",
           "certify_state", "worker_state"]


def compilable() -> list[str]:
    """Methods that only sample the base classifier (no gradient through it), so it may be compiled."""
    return sorted(name for name, cls in CertifyMethod.registry.items() if cls.samples_only)


def add_run_options(p: argparse.ArgumentParser, *, certify: bool) -> None:
    p.add_argument("--checkpoint", action="append", required=True,
                   help="model checkpoint (.safetensors with its .json); repeat to average several (an ensemble)")
    p.add_argument("--denoiser", default=None,
                   help="denoised smoothing: a denoiser checkpoint (smoothcert train-denoiser) put in front of the "
                        "classifier; the base classifier is then CHECKPOINT o DENOISER")
    p.add_argument("--dataset", default=None, metavar="NAME",
                   help=f"data set (default: the checkpoint's): {', '.join(DATASETS)}, or npz:FILE, npy:DIR, "
                        "folder:DIR for your own files (README: 'Your own data')")
    p.add_argument("--split", default="test", help="split to certify: train or test (default: test)")
    p.add_argument("--data-root", default=None, help="directory of a data set read from disk (e.g. CIFAR-10 batches)")
    p.add_argument("--out", required=True, help="results TSV (its configuration goes to OUT.json)")
    p.add_argument("--sigma", type=float, default=None,
                   help="noise level in input units, pixels in [0, 1] (default: the checkpoint's training sigma)")
    if certify:
        p.add_argument("--n0", type=int, default=100, help="selection samples (default 100)")
    p.add_argument("--n", type=int, default=100_000, help="estimation samples (default 100,000)")
    if certify:
        add_mode_options(p)
    p.add_argument("--alpha", type=float, default=0.001, help="failure probability (default 0.001)")
    p.add_argument("--batch-size", type=int, default=1000,
                   help="noisy samples per forward pass (default 1000; lower it if memory runs out)")
    p.add_argument("--inputs-per-batch", type=int, default=1,
                   help="inputs that share a forward pass, each with batch-size // inputs-per-batch samples "
                        "(more is faster for small n; default 1)")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="float32",
                   help="dtype of the base classifier; the certificate holds for the classifier in this dtype")
    p.add_argument("--seed", type=int, default=0, help="run seed; each input's noise derives from it and its index")
    p.add_argument("--skip", type=int, default=1, help="certify every SKIP-th input of the split (default 1)")
    p.add_argument("--max", type=int, default=None,
                   help="stop before this dataset index (default: the whole split); a larger --max extends a file")
    p.add_argument("--device", default="auto", help="auto (accelerator if any, else cpu), cpu, cuda:0, ...")
    p.add_argument("--compile", action="store_true",
                   help="run the base classifier through torch.compile (faster sampling after a warm-up; "
                        f"{', '.join(compilable())} and predict only)")
    p.add_argument("--channels-last", action="store_true",
                   help="run the base classifier on channels-last (NHWC) image batches: the GPU fast path's layout "
                        "(NHWC convolution kernels, tensor cores with --dtype bfloat16); the same model up to rounding")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def add_mode_options(p: argparse.ArgumentParser) -> None:
    """The modes of certification (:mod:`smoothcert.engine.sequential`)."""
    p.add_argument("--mode", choices=MODES, default="fixed",
                   help="fixed: n samples (default); target: sequential test of 'certified at --radius?', at most "
                        "--n-max samples; anytime: confidence sequence until the radius is known to --precision")
    p.add_argument("--radius", type=float, default=None, help="--mode target: the l2 radius to decide, in input units")
    p.add_argument("--n-max", type=int, default=None, help="--mode target/anytime: most estimation samples per input")
    p.add_argument("--precision", type=float, default=None,
                   help="--mode anytime: stop when the gap is within this of its value at --n-max (gap units, "
                        "radius / sigma for isotropic noise; default 0.02)")
    p.add_argument("--sequence", choices=SEQUENCES, default="cp",
                   help="--mode target: cp (union-bound Clopper-Pearson, default) or betting (KT mixture)")
    p.add_argument("--first-check", type=int, default=Mode.first,
                   help=f"--mode target/anytime: estimation samples before the first check (default {Mode.first})")
    p.add_argument("--check-growth", type=float, default=Mode.growth,
                   help="--mode target/anytime: each later check at this many times the previous one's samples "
                        f"(default {Mode.growth})")
    p.add_argument("--randomized-cp", action="store_true",
                   help="--mode fixed: randomized Clopper-Pearson bound (exact 1 - alpha coverage; its uniform "
                        "draw is recorded in the cp_uniform column)")


def mode_from_args(args, method: type[CertifyMethod]) -> Mode:
    """The run's :class:`Mode`, checked against the method and the sample sizes before any work."""
    mode = Mode(args.mode, radius=args.radius, n_max=args.n_max, precision=args.precision,
                randomized=args.randomized_cp, sequence=args.sequence, first=args.first_check,
                growth=args.check_growth)
    if mode != Mode() and not method.modes:
        raise ValueError(f"--method {method.name} certifies with fixed n only (no --mode target/anytime, "
                         "--randomized-cp, --sequence); methods with every mode: "
                         + ", ".join(sorted(n for n, c in CertifyMethod.registry.items() if c.modes)))
    mode.check_sampling(args.n0, args.n)
    return mode


def check_compile(args, method: type[CertifyMethod] | None) -> None:
    """``--compile`` only for PREDICT and methods that only sample the base classifier (no gradient through it)."""
    if args.compile and method is not None and not method.samples_only:
        raise ValueError(f"--compile is for methods that only sample ({', '.join(compilable())}) and predict; "
                         f"--method {method.name} differentiates through the model")


def check_method_options(args, method: type[CertifyMethod]) -> None:
    """A method option given on the command line that ``--method`` does not take is an error, not ignored."""
    taken = {dest_of(f) for f in setting_fields(method.settings_type)}
    owners: dict[str, tuple[str, list[str]]] = {}
    for cls in CertifyMethod.registry.values():
        for f in setting_fields(cls.settings_type):
            owners.setdefault(dest_of(f), (flag_of(f), []))[1].append(cls.name)
    for dest, (flag, names) in owners.items():
        if dest not in taken and getattr(args, dest, None) is not None:
            raise ValueError(f"{flag} is a setting of --method {', '.join(sorted(names))}, not of --method "
                             f"{method.name}: add --method {sorted(names)[0]} or leave {flag} out")


def check_sampling_option(args, method: type[CertifyMethod]) -> None:
    """``--sampling sound`` only for methods whose settings choose the sampling (isotropic Gaussian noise)."""
    if getattr(args, "sampling", None) == "sound" and "sampling" not in method.settings_type.field_names():
        able = sorted(n for n, c in CertifyMethod.registry.items() if "sampling" in c.settings_type.field_names())
        raise ValueError(f"--sampling sound needs a method with one isotropic Gaussian noise ({', '.join(able)}); "
                         f"--method {method.name} samples in floating point only")


def check_selected_inputs(check, dataset, indices, chunk: int = 1000) -> None:
    """Every selected input passes ``check`` (e.g. lies on sound sampling's grid), before any file is written."""
    for start in range(0, len(indices), chunk):
        check(dataset.batch(indices[start:start + chunk])[0])


def check_noise_option(args, method: type[CertifyMethod]) -> None:
    """``--noise`` only for methods whose settings choose a noise family; elsewhere it would be silently ignored."""
    if getattr(args, "noise", None) is not None and "noise" not in method.settings_type.field_names():
        users = sorted(n for n, c in CertifyMethod.registry.items() if "noise" in c.settings_type.field_names())
        raise ValueError(f"--noise is an option of --method {', '.join(users)}; --method {method.name} chooses its "
                         "own noise (dds and ancer: uniform noise with --norm l1)")


def setup_run(args, method: type[CertifyMethod] | None = None):
    from smoothcert.data.datasets import load_dataset

    check_run_options(args, certify=hasattr(args, "n0"))  # every setting first: a rejected run leaves no file
    check_compile(args, method)
    device = resolve_device(args.device)
    model, config, fingerprint = load_base_classifier(args.checkpoint, device)
    denoiser = None
    if args.denoiser is not None:
        model, denoiser = load_denoised(model, config, args.denoiser, device)
    if args.channels_last:
        model = ChannelsLast(model)
    if args.compile:
        model = torch.compile(model)
    dataset = load_dataset(args.dataset or config.get("dataset"), args.split, root=args.data_root)
    check_input_shape(config, dataset.input_shape, dataset.name)
    if args.sigma is None and denoiser is not None and denoiser["sigma"] is not None:
        args.sigma = float(denoiser["sigma"])  # a denoised classifier is certified at its denoiser's sigma
    if args.sigma is None:
        if config.get("sigma") is None:
            raise ValueError("give --sigma (the checkpoint does not record a training sigma)")
        args.sigma = float(config["sigma"])
    num_classes = int(config.get("num_classes", dataset.num_classes))
    if num_classes != dataset.num_classes:
        raise ValueError(f"the checkpoint predicts {num_classes} classes, the data set has {dataset.num_classes}")
    indices = select_indices(len(dataset), args.skip, args.max)

    def inputs(batch):
        x, y = dataset.batch(batch)
        return x.to(device), y

    run = {"dataset": dataset.name, "split": dataset.split, "skip": args.skip, "max": args.max,
           "checkpoints": fingerprint, "num_classes": num_classes, "n": args.n, "alpha": args.alpha,
           "batch_size": args.batch_size, "inputs_per_batch": args.inputs_per_batch, "dtype": args.dtype,
           "block": samples_per_pass(args.batch_size, args.inputs_per_batch),
           "seed": args.seed, "compile": args.compile, "indices": f"range(0, {indices[-1] + 1 if indices else 0}, {args.skip})",
           "count": len(indices)}
    if args.channels_last:
        run["channels_last"] = True  # a different summation order: part of what the rows were computed with
    if denoiser is not None:
        run["denoiser"] = denoiser
    return device, model, num_classes, dataset, indices, inputs, run


def certify_state(args):
    """What ``certify`` builds from its parsed options: ``(method, ctx, inputs, indices, run)``."""
    cls = method_class(args.method)
    check_sampling_option(args, cls)  # these two before the generic check, whose message is less specific
    check_noise_option(args, cls)
    check_method_options(args, cls)
    mode = mode_from_args(args, cls)
    device, model, num_classes, dataset, indices, inputs, run = setup_run(args, cls)
    method = build_method(cls, args)
    method.check_classes(num_classes)
    check_selected_inputs(method.check_inputs, dataset, indices)
    method.check_input_shape(tuple(dataset.input_shape))
    identity = {"checkpoints": [c["sha256"] for c in run["checkpoints"]], "dataset": run["dataset"],
                "split": run["split"]}
    if "denoiser" in run:
        identity["denoiser"] = run["denoiser"]["sha256"]
    ctx = RunContext(model, num_classes, args.n0, args.n, args.alpha, args.batch_size, DTYPES[args.dtype],
                     args.seed, device, args.inputs_per_batch, identity, mode)
    return method, ctx, inputs, indices, run


def worker_state(args):
    """A distributed worker's ``(method, ctx, inputs)``, built from the driver's parsed options."""
    method, ctx, inputs, _, _ = certify_state(args)
    return method, ctx, inputs
