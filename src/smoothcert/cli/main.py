"""The ``smoothcert`` command line: train, certify, predict, report, demo.

Every command validates its arguments before any work starts and says what is allowed.
"""

from __future__ import annotations

import argparse
import sys
from functools import partial
from pathlib import Path

import torch

from smoothcert.cli.checks import check_demo_options, check_input_shape, check_plot_options, check_run_options
from smoothcert.cli.common import load_base_classifier, resolve_device
from smoothcert.cli.demo import run_demo
from smoothcert.cli.distributed import check_distributed, run_distributed
from smoothcert.cli.options import add_method_options, build_method, dest_of
from smoothcert.cli.runner import (CERTIFY_COLUMNS, PREDICT_COLUMNS, ResultsFile, flag_summary, run_dataset,
                                   samples_per_pass, select_indices)
from smoothcert.cli.train import add_train_arguments, run_train
from smoothcert.data.datasets import DATASETS
from smoothcert.engine.sampling import DTYPES, input_generator
from smoothcert.engine.sequential import MODES, Mode
from smoothcert.engine.smooth import predict
from smoothcert.stats.sequential import SEQUENCES
import smoothcert.methods  # noqa: F401  (registers every built-in method)
from smoothcert.methods.base import COMMON_COLUMNS, CertifyMethod, RunContext, method_class
from smoothcert.methods.records import Prediction
from smoothcert.methods.topk import predict_topk
from smoothcert.noise.gaussian import IsotropicGaussian
from smoothcert.settings import flag_of, setting_fields
from smoothcert.stats.topk import check_top_k
from smoothcert.noise.discrete import SAMPLINGS, gaussian_noise


def _compilable() -> list[str]:
    """Methods that only sample the base classifier (no gradient through it), so it may be compiled."""
    return sorted(name for name, cls in CertifyMethod.registry.items() if cls.samples_only)


def _common(p: argparse.ArgumentParser, *, certify: bool) -> None:
    p.add_argument("--checkpoint", action="append", required=True,
                   help="model checkpoint (.safetensors with its .json); repeat to average several (an ensemble)")
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
        _mode_options(p)
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
                        f"{', '.join(_compilable())} and predict only)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def _mode_options(p: argparse.ArgumentParser) -> None:
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
    p.add_argument("--randomized-cp", action="store_true",
                   help="--mode fixed: randomized Clopper-Pearson bound (exact 1 - alpha coverage; its uniform "
                        "draw is recorded in the cp_uniform column)")


def mode_from_args(args, method: type[CertifyMethod]) -> Mode:
    """The run's :class:`Mode`, checked against the method and the sample sizes before any work."""
    mode = Mode(args.mode, radius=args.radius, n_max=args.n_max, precision=args.precision,
                randomized=args.randomized_cp, sequence=args.sequence)
    if mode != Mode() and not method.modes:
        raise ValueError(f"--method {method.name} certifies with fixed n only (no --mode target/anytime, "
                         "--randomized-cp, --sequence); methods with every mode: "
                         + ", ".join(sorted(n for n, c in CertifyMethod.registry.items() if c.modes)))
    mode.check_sampling(args.n0, args.n)
    return mode


def _check_compile(args, method: type[CertifyMethod] | None) -> None:
    """``--compile`` only for PREDICT and methods that only sample the base classifier (no gradient through it)."""
    if args.compile and method is not None and not method.samples_only:
        raise ValueError(f"--compile is for methods that only sample ({', '.join(_compilable())}) and predict; "
                         f"--method {method.name} differentiates through the model")


def _check_method_options(args, method: type[CertifyMethod]) -> None:
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


def _check_sampling(args, method: type[CertifyMethod]) -> None:
    """``--sampling sound`` only for methods whose settings choose the sampling (isotropic Gaussian noise)."""
    if getattr(args, "sampling", None) == "sound" and "sampling" not in method.settings_type.field_names():
        able = sorted(n for n, c in CertifyMethod.registry.items() if "sampling" in c.settings_type.field_names())
        raise ValueError(f"--sampling sound needs a method with one isotropic Gaussian noise ({', '.join(able)}); "
                         f"--method {method.name} samples in floating point only")


def _check_inputs(check, dataset, indices, chunk: int = 1000) -> None:
    """Every selected input passes ``check`` (e.g. lies on sound sampling's grid), before any file is written."""
    for start in range(0, len(indices), chunk):
        check(dataset.batch(indices[start:start + chunk])[0])


def _check_noise_option(args, method: type[CertifyMethod]) -> None:
    """``--noise`` only for methods whose settings choose a noise family; elsewhere it would be silently ignored."""
    if getattr(args, "noise", None) is not None and "noise" not in method.settings_type.field_names():
        users = sorted(n for n, c in CertifyMethod.registry.items() if "noise" in c.settings_type.field_names())
        raise ValueError(f"--noise is an option of --method {', '.join(users)}; --method {method.name} chooses its "
                         "own noise (dds and ancer: uniform noise with --norm l1)")


def _setup(args, method: type[CertifyMethod] | None = None):
    from smoothcert.data.datasets import load_dataset

    check_run_options(args, certify=hasattr(args, "n0"))  # every setting first: a rejected run leaves no file
    _check_compile(args, method)
    device = resolve_device(args.device)
    model, config, fingerprint = load_base_classifier(args.checkpoint, device)
    if args.compile:
        model = torch.compile(model)
    dataset = load_dataset(args.dataset or config.get("dataset"), args.split, root=args.data_root)
    check_input_shape(config, dataset.input_shape, dataset.name)
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
    return device, model, num_classes, dataset, indices, inputs, run


def certify_state(args):
    """What ``certify`` builds from its parsed options: ``(method, ctx, inputs, indices, run)``."""
    cls = method_class(args.method)
    _check_sampling(args, cls)  # these two before the generic check, whose message is less specific
    _check_noise_option(args, cls)
    _check_method_options(args, cls)
    mode = mode_from_args(args, cls)
    device, model, num_classes, dataset, indices, inputs, run = _setup(args, cls)
    method = build_method(cls, args)
    method.check_classes(num_classes)
    _check_inputs(method.check_inputs, dataset, indices)
    identity = {"checkpoints": [c["sha256"] for c in run["checkpoints"]], "dataset": run["dataset"],
                "split": run["split"]}
    ctx = RunContext(model, num_classes, args.n0, args.n, args.alpha, args.batch_size, DTYPES[args.dtype],
                     args.seed, device, args.inputs_per_batch, identity, mode)
    return method, ctx, inputs, indices, run


def worker_state(args):
    """A distributed worker's ``(method, ctx, inputs)``, built from the driver's parsed options."""
    method, ctx, inputs, _, _ = certify_state(args)
    return method, ctx, inputs


def cmd_certify(args) -> int:
    check_distributed(args.workers, args.ray_address, args.worker_cpus, args.worker_gpus)
    method, ctx, inputs, indices, run = certify_state(args)
    cls = type(method)
    columns = CERTIFY_COLUMNS + COMMON_COLUMNS + tuple(c for c in cls.columns if c not in COMMON_COLUMNS)
    columns += tuple(c for c in ctx.mode.columns if c not in columns)
    # a method that only samples may change its batch sizes on resume (the numbers depend on "block" only)
    results = ResultsFile(Path(args.out), columns, {"command": "certify", **run, "n0": args.n0,
                                                    "method": method.config(), **ctx.mode.config()},
                          continuable=("batch_size", "inputs_per_batch") if cls.samples_only else ())
    on_open = lambda done: method.open(ctx, results.path, done)  # noqa: E731
    try:
        if args.workers is not None or args.ray_address is not None:
            run_distributed(results, inputs, indices, method, ctx, partial(worker_state, args),
                            workers=args.workers or 1, address=args.ray_address,
                            inputs_per_batch=args.inputs_per_batch, cpus_per_worker=args.worker_cpus,
                            gpus_per_worker=args.worker_gpus, on_open=on_open, progress=not args.no_progress)
        else:
            run_dataset(results, inputs, indices, lambda x, y, idx: method.certify(ctx, x, y, idx),
                        inputs_per_batch=args.inputs_per_batch, on_open=on_open, progress=not args.no_progress)
    finally:
        method.close()
    print(f"wrote {results.path} ({len(indices)} inputs) and {results.sidecar}")
    for line in flag_summary(results.path):
        print(line)
    return 0


def cmd_predict(args) -> int:
    device, model, num_classes, dataset, indices, inputs, run = _setup(args)
    noise = gaussian_noise(args.sigma, args.sampling)
    _check_inputs(noise.check_support, dataset, indices)
    dtype = DTYPES[args.dtype]
    block = max(1, args.batch_size // args.inputs_per_batch)
    top_k = None if args.top_k is None else check_top_k(args.top_k, num_classes)
    if top_k is not None and args.sampling != "float":
        raise ValueError("predict --top-k samples in floating point only: leave out --sampling or give float")

    def process(x, labels, idx):
        gens = [input_generator(args.seed, i, "predict", device) for i in idx]
        kw = dict(batch_size=args.batch_size, block=block, generators=gens, dtype=dtype)
        if top_k is not None:  # the top-k set of Jia et al., with a simultaneous test (methods.topk)
            return predict_topk(model, x, noise, num_classes, top_k, args.n, args.alpha, **kw)
        out = predict(model, x, noise, num_classes, args.n, args.alpha, **kw)
        return [Prediction(int(c), noise.sampling) for c in out]

    columns = PREDICT_COLUMNS + ("sampling",)
    config = {"command": "predict", **run, "sigma": args.sigma, "sampling": args.sampling}
    if top_k is not None:
        columns, config = columns + ("top_k", "topk_set"), {**config, "top_k": top_k}
    results = ResultsFile(Path(args.out), columns, config, continuable=("batch_size", "inputs_per_batch"))
    run_dataset(results, inputs, indices, process, inputs_per_batch=args.inputs_per_batch,
                progress=not args.no_progress)
    print(f"wrote {results.path} ({len(indices)} inputs) and {results.sidecar}")
    return 0


def cmd_report(args) -> int:
    import warnings

    from smoothcert.evaluation.tables import report

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        text = report(args.files, radii=args.radii, latex=args.latex, plot=args.plot, labels=args.labels,
                      proxy=args.proxy, baseline=args.baseline, norm=args.norm)
    for w in caught:
        print(f"smoothcert report: warning: {w.message}", file=sys.stderr)
    print(text)
    return 0


def cmd_demo(args) -> int:
    check_demo_options(args, n0=100)  # the demo's selection samples (cli/demo.py), before it trains
    run_demo(main, Path(args.out), num_inputs=args.inputs, n=args.n, retrain=args.retrain)
    return 0


def cmd_plot_regions(args) -> int:
    from smoothcert.data.datasets import load_dataset
    from smoothcert.evaluation.regions_plot import plot_regions

    check_plot_options(args)
    device = resolve_device(args.device)
    model, config, _ = load_base_classifier(args.checkpoint, device)
    dataset = load_dataset(args.dataset or config.get("dataset"), args.split)
    check_input_shape(config, dataset.input_shape, dataset.name)
    if args.sigma is None:
        if config.get("sigma") is None:
            raise ValueError("give --sigma (the checkpoint does not record a training sigma)")
        args.sigma = float(config["sigma"])
    methods = [build_method(method_class(name), args, memory=False) for name in args.methods]  # each input alone
    path = plot_regions(model, dataset.inputs, dataset.labels, args.points, methods, args.out,
                        num_classes=dataset.num_classes, n0=args.n0, n=args.n, alpha=args.alpha, seed=args.seed)
    print(f"wrote {path}")
    return 0


class _HelpFormatter(argparse.HelpFormatter):
    """Help text wrapped at spaces only, so names such as ``toy-rotated`` are never split at their hyphen."""

    def _split_lines(self, text, width):
        import textwrap

        return textwrap.wrap(" ".join(text.split()), width, break_on_hyphens=False)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="smoothcert", description="Certified robustness by randomized smoothing.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="train a base classifier under noise")
    add_train_arguments(p)
    p.set_defaults(func=run_train)

    p = sub.add_parser("certify", help="certify a data set split; resumable TSV results")
    _common(p, certify=True)
    p.add_argument("--method", default="fixed", choices=sorted(CertifyMethod.registry),
                   help="certification method (default: fixed, Cohen et al.)")
    add_method_options(p)
    p.add_argument("--workers", type=int, default=None,
                   help="certify on this many Ray worker actors (a local Ray on 127.0.0.1 unless --ray-address); "
                        "the rows equal a local run's; needs pip install 'smoothcert[ray]'")
    p.add_argument("--ray-address", default=None,
                   help="HOST:PORT of a running Ray cluster to join (default: start a local one for --workers)")
    p.add_argument("--worker-cpus", type=float, default=1.0, help="CPUs each worker reserves (default 1)")
    p.add_argument("--worker-gpus", type=float, default=0.0, help="GPUs each worker reserves (default 0)")
    p.set_defaults(func=cmd_certify)

    p = sub.add_parser("predict", help="PREDICT (with abstention) over a data set split; resumable TSV results")
    _common(p, certify=False)
    p.add_argument("--top-k", type=int, default=None,
                   help="predict the set of the K classes of largest smoothed probability (1 <= K < number of "
                        "classes), or abstain, by a simultaneous test of all classes (Jia et al., ICLR 2020)")
    p.add_argument("--sampling", choices=SAMPLINGS, default="float",
                   help="float: Gaussian noise in floating point (default); sound: the Gaussian rounded onto the "
                        "8-bit grid k/255, drawn exactly from integer random bits (inputs must lie on the grid)")
    p.set_defaults(func=cmd_predict)

    p = sub.add_parser("report", help="tables (Markdown or LaTeX) and a plot from results files")
    p.add_argument("files", nargs="+", help="results TSVs (smoothcert's or the classic reference code's)")
    p.add_argument("--radii", type=float, nargs="+", default=[0.0, 0.25, 0.5, 0.75, 1.0, 1.5, 2.0],
                   help="radii at which to report certified accuracy")
    p.add_argument("--labels", nargs="+", default=None, help="one name per file (default: file names)")
    p.add_argument("--latex", action="store_true", help="print a LaTeX table instead of Markdown")
    p.add_argument("--plot", default=None, help="write a PNG of certified accuracy against radius here")
    p.add_argument("--proxy", action="store_true", help="also report certified accuracy at proxy radii and proxy ACR")
    p.add_argument("--norm", choices=("l1", "l2", "linf"), default=None,
                   help="report the radii in this norm (the radius_l1 / radius_l2 / radius_linf columns of "
                        "certify --method fixed; converted ones are marked)")
    p.add_argument("--baseline", default=None,
                   help="a results file to compare against: ARI and proxy ARI (mean radius gain on inputs both got right)")
    p.set_defaults(func=cmd_report)

    p = sub.add_parser("plot-regions", help="draw certified regions of several methods on a 2D toy data set")
    p.add_argument("--checkpoint", action="append", required=True,
                   help="a model trained on a 2D data set (smoothcert train --dataset toy-curved ...)")
    p.add_argument("--dataset", default=None, metavar="NAME",
                   help="2D data set: toy-curved, toy-rotated, toy-3class (default: the checkpoint's)")
    p.add_argument("--split", default="test", help="split whose points are drawn: train or test (default: test)")
    p.add_argument("--points", type=int, nargs="+", default=[0, 1, 2, 3],
                   help="dataset indices to certify, numbered in the picture (default: 0 1 2 3)")
    p.add_argument("--methods", nargs="+", default=["fixed", "dds", "ancer", "rancer", "rddrs"],
                   choices=sorted(CertifyMethod.registry), help="methods whose regions are drawn (default: "
                                                                 "fixed dds ancer rancer rddrs)")
    p.add_argument("--sigma", type=float, default=None, help="base noise level (default: the checkpoint's)")
    p.add_argument("--n0", type=int, default=100, help="selection samples (default 100)")
    p.add_argument("--n", type=int, default=10_000, help="estimation samples (default 10,000)")
    p.add_argument("--alpha", type=float, default=0.001, help="failure probability (default 0.001)")
    p.add_argument("--seed", type=int, default=0, help="seed of every point's noise (default 0)")
    p.add_argument("--device", default="auto", help="auto (accelerator if any, else cpu), cpu, cuda:0, ...")
    p.add_argument("--out", default="regions.png", help="PNG to write")
    add_method_options(p)
    p.set_defaults(func=cmd_plot_regions)

    p = sub.add_parser("demo", help="certify 100 MNIST test digits at sigma 0.25 with the shipped noise-trained model")
    p.add_argument("--out", default="demo-output", help="folder for the model, results, table and plot")
    p.add_argument("--inputs", type=int, default=100, help="test digits to certify (default 100)")
    p.add_argument("--n", type=int, default=2_000,
                   help="estimation samples per digit (default 2,000: radii stop at 0.675; 10,000: at 0.80)")
    p.add_argument("--retrain", action="store_true",
                   help="train the model again (the shipped weights' command) in --out instead of using the shipped one")
    p.set_defaults(func=cmd_demo)
    parser.formatter_class = _HelpFormatter
    for command in sub.choices.values():
        command.formatter_class = _HelpFormatter
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except (ValueError, TypeError, FileNotFoundError, FloatingPointError, IsADirectoryError, NotADirectoryError,
            PermissionError) as e:  # a user's error: one line, no traceback (other errors keep theirs)
        print(f"smoothcert {args.command}: error: {' '.join(str(e).split())}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"smoothcert {args.command}: interrupted; run the same command again to resume", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
