"""The ``smoothcert`` command line: train, certify, predict, report, demo.

Every command validates its arguments before any work starts and says what is allowed.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from smoothcert.cli.common import load_base_classifier, load_denoised, resolve_device
from smoothcert.cli.demo import run_demo
from smoothcert.cli.denoiser import add_denoiser_arguments, run_train_denoiser
from smoothcert.cli.options import add_method_options, build_method
from smoothcert.cli.runner import CERTIFY_COLUMNS, PREDICT_COLUMNS, ResultsFile, run_dataset, select_indices
from smoothcert.cli.train import add_train_arguments, run_train
from smoothcert.engine.sampling import DTYPES, input_generator
from smoothcert.engine.smooth import predict
import smoothcert.methods  # noqa: F401  (registers every built-in method)
from smoothcert.methods.base import COMMON_COLUMNS, CertifyMethod, RunContext, method_class
from smoothcert.methods.records import Prediction
from smoothcert.noise.gaussian import IsotropicGaussian


def _compilable() -> list[str]:
    """Methods that only sample the base classifier (no gradient through it), so it may be compiled."""
    return sorted(name for name, cls in CertifyMethod.registry.items() if cls.samples_only)


def _common(p: argparse.ArgumentParser, *, certify: bool) -> None:
    p.add_argument("--checkpoint", action="append", required=True,
                   help="model checkpoint (.safetensors with its .json); repeat to average several (an ensemble)")
    p.add_argument("--denoiser", default=None,
                   help="denoised smoothing: a denoiser checkpoint (smoothcert train-denoiser) put in front of the "
                        "classifier; the base classifier is then CHECKPOINT o DENOISER")
    p.add_argument("--dataset", default=None, help="data set name (default: the checkpoint's)")
    p.add_argument("--split", default="test", help="split to certify (default: test)")
    p.add_argument("--data-root", default=None, help="directory of a data set read from disk (e.g. CIFAR-10 batches)")
    p.add_argument("--out", required=True, help="results TSV (its configuration goes to OUT.json)")
    p.add_argument("--sigma", type=float, default=None,
                   help="noise level in input units, pixels in [0, 1] (default: the checkpoint's training sigma)")
    if certify:
        p.add_argument("--n0", type=int, default=100, help="selection samples (default 100)")
    p.add_argument("--n", type=int, default=100_000, help="estimation samples (default 100,000)")
    p.add_argument("--alpha", type=float, default=0.001, help="failure probability (default 0.001)")
    p.add_argument("--batch-size", type=int, default=1000, help="noisy samples per forward pass (default 1000)")
    p.add_argument("--inputs-per-batch", type=int, default=1,
                   help="inputs that share a forward pass (more is faster for small n; default 1)")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="float32",
                   help="dtype of the base classifier; the certificate holds for the classifier in this dtype")
    p.add_argument("--seed", type=int, default=0, help="run seed; each input's noise derives from it and its index")
    p.add_argument("--skip", type=int, default=1, help="certify every SKIP-th input of the split (default 1)")
    p.add_argument("--max", type=int, default=None, help="stop before this dataset index")
    p.add_argument("--device", default="auto", help="auto (accelerator if any, else cpu), cpu, cuda:0, ...")
    p.add_argument("--compile", action="store_true",
                   help="run the base classifier through torch.compile (faster sampling after a warm-up; "
                        f"{', '.join(_compilable())} and predict only)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def _check_compile(args, method: type[CertifyMethod] | None) -> None:
    """``--compile`` only for PREDICT and methods that only sample the base classifier (no gradient through it)."""
    if args.compile and method is not None and not method.samples_only:
        raise ValueError(f"--compile is for methods that only sample ({', '.join(_compilable())}) and predict; "
                         f"--method {method.name} differentiates through the model")


def _setup(args, method: type[CertifyMethod] | None = None):
    from smoothcert.data.datasets import load_dataset

    _check_compile(args, method)
    device = resolve_device(args.device)
    model, config, fingerprint = load_base_classifier(args.checkpoint, device)
    denoiser = None
    if args.denoiser is not None:
        model, denoiser = load_denoised(model, config, args.denoiser, device)
    if args.compile:
        model = torch.compile(model)
    dataset = load_dataset(args.dataset or config.get("dataset"), args.split, root=args.data_root)
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
           "seed": args.seed, "compile": args.compile, "indices": f"range(0, {indices[-1] + 1 if indices else 0}, {args.skip})",
           "count": len(indices)}
    if denoiser is not None:
        run["denoiser"] = denoiser
    return device, model, num_classes, dataset, indices, inputs, run


def cmd_certify(args) -> int:
    cls = method_class(args.method)
    device, model, num_classes, dataset, indices, inputs, run = _setup(args, cls)
    method = build_method(cls, args)
    method.check_input_shape(tuple(dataset.input_shape))
    identity = {"checkpoints": [c["sha256"] for c in run["checkpoints"]], "dataset": run["dataset"],
                "split": run["split"]}
    if "denoiser" in run:
        identity["denoiser"] = run["denoiser"]["sha256"]
    ctx = RunContext(model, num_classes, args.n0, args.n, args.alpha, args.batch_size, DTYPES[args.dtype],
                     args.seed, device, args.inputs_per_batch, identity)
    columns = CERTIFY_COLUMNS + COMMON_COLUMNS + tuple(c for c in cls.columns if c not in COMMON_COLUMNS)
    results = ResultsFile(Path(args.out), columns, {"command": "certify", **run, "n0": args.n0,
                                                    "method": method.config()})
    try:
        run_dataset(results, inputs, indices, lambda x, y, idx: method.certify(ctx, x, y, idx),
                    inputs_per_batch=args.inputs_per_batch,
                    on_open=lambda done: method.open(ctx, results.path, done), progress=not args.no_progress)
    finally:
        method.close()
    print(f"wrote {results.path} ({len(indices)} inputs) and {results.sidecar}")
    return 0


def cmd_predict(args) -> int:
    device, model, num_classes, _, indices, inputs, run = _setup(args)
    noise = IsotropicGaussian(args.sigma)
    dtype = DTYPES[args.dtype]
    block = max(1, args.batch_size // args.inputs_per_batch)

    def process(x, labels, idx):
        gens = [input_generator(args.seed, i, "predict", device) for i in idx]
        out = predict(model, x, noise, num_classes, args.n, args.alpha, batch_size=args.batch_size, block=block,
                      generators=gens, dtype=dtype)
        return [Prediction(int(c)) for c in out]

    results = ResultsFile(Path(args.out), PREDICT_COLUMNS, {"command": "predict", **run, "sigma": args.sigma})
    run_dataset(results, inputs, indices, process, inputs_per_batch=args.inputs_per_batch,
                progress=not args.no_progress)
    print(f"wrote {results.path} ({len(indices)} inputs) and {results.sidecar}")
    return 0


def cmd_report(args) -> int:
    from smoothcert.evaluation.tables import report

    print(report(args.files, radii=args.radii, latex=args.latex, plot=args.plot, labels=args.labels,
                 proxy=args.proxy, baseline=args.baseline))
    return 0


def cmd_demo(args) -> int:
    run_demo(main, Path(args.out), num_inputs=args.inputs, n=args.n, retrain=args.retrain)
    return 0


def cmd_plot_regions(args) -> int:
    from smoothcert.data.datasets import load_dataset
    from smoothcert.evaluation.regions_plot import plot_regions

    device = resolve_device(args.device)
    model, config, _ = load_base_classifier(args.checkpoint, device)
    dataset = load_dataset(args.dataset or config.get("dataset"), args.split)
    if args.sigma is None:
        if config.get("sigma") is None:
            raise ValueError("give --sigma (the checkpoint does not record a training sigma)")
        args.sigma = float(config["sigma"])
    methods = [build_method(method_class(name), args, memory=False) for name in args.methods]  # each input alone
    path = plot_regions(model, dataset.inputs, dataset.labels, args.points, methods, args.out,
                        num_classes=dataset.num_classes, n0=args.n0, n=args.n, alpha=args.alpha, seed=args.seed)
    print(f"wrote {path}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="smoothcert", description="Certified robustness by randomized smoothing.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="train a base classifier under noise")
    add_train_arguments(p)
    p.set_defaults(func=run_train)

    p = sub.add_parser("train-denoiser", help="train a denoiser in front of a frozen classifier (denoised smoothing)")
    add_denoiser_arguments(p)
    p.set_defaults(func=run_train_denoiser)

    p = sub.add_parser("certify", help="certify a data set split; resumable TSV results")
    _common(p, certify=True)
    p.add_argument("--method", default="fixed", choices=sorted(CertifyMethod.registry),
                   help="certification method (default: fixed, Cohen et al.)")
    add_method_options(p)
    p.set_defaults(func=cmd_certify)

    p = sub.add_parser("predict", help="PREDICT (with abstention) over a data set split; resumable TSV results")
    _common(p, certify=False)
    p.set_defaults(func=cmd_predict)

    p = sub.add_parser("report", help="tables (Markdown or LaTeX) and a plot from results files")
    p.add_argument("files", nargs="+", help="results TSVs (smoothcert's or the classic reference code's)")
    p.add_argument("--radii", type=float, nargs="+", default=[0.0, 0.25, 0.5, 0.75, 1.0, 1.5, 2.0],
                   help="radii at which to report certified accuracy")
    p.add_argument("--labels", nargs="+", default=None, help="one name per file (default: file names)")
    p.add_argument("--latex", action="store_true", help="print a LaTeX table instead of Markdown")
    p.add_argument("--plot", default=None, help="write a PNG of certified accuracy against radius here")
    p.add_argument("--proxy", action="store_true", help="also report certified accuracy at proxy radii and proxy ACR")
    p.add_argument("--baseline", default=None,
                   help="a results file to compare against: ARI and proxy ARI (mean radius gain on inputs both got right)")
    p.set_defaults(func=cmd_report)

    p = sub.add_parser("plot-regions", help="draw certified regions of several methods on a 2D toy data set")
    p.add_argument("--checkpoint", action="append", required=True, help="a model trained on a 2D data set")
    p.add_argument("--dataset", default=None, help="2D data set (default: the checkpoint's)")
    p.add_argument("--split", default="test")
    p.add_argument("--points", type=int, nargs="+", default=[0, 1, 2, 3], help="dataset indices to certify")
    p.add_argument("--methods", nargs="+", default=["fixed", "dds", "ancer", "rancer", "rddrs"],
                   choices=sorted(CertifyMethod.registry))
    p.add_argument("--sigma", type=float, default=None, help="base noise level (default: the checkpoint's)")
    p.add_argument("--n0", type=int, default=100)
    p.add_argument("--n", type=int, default=10_000)
    p.add_argument("--alpha", type=float, default=0.001)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto")
    p.add_argument("--out", default="regions.png", help="PNG to write")
    add_method_options(p)
    p.set_defaults(func=cmd_plot_regions)

    p = sub.add_parser("demo", help="train a noise-robust MNIST model and certify 100 test digits at sigma 0.25")
    p.add_argument("--out", default="demo-output", help="folder for the model, results, table and plot")
    p.add_argument("--inputs", type=int, default=100, help="test digits to certify (default 100)")
    p.add_argument("--n", type=int, default=10_000, help="estimation samples per digit (default 10,000)")
    p.add_argument("--retrain", action="store_true", help="train even if the folder holds a model")
    p.set_defaults(func=cmd_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except (ValueError, TypeError, FileNotFoundError) as e:
        print(f"smoothcert {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"smoothcert {args.command}: interrupted; run the same command again to resume", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
