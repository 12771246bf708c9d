"""The ``smoothcert`` command line: train, certify, predict, report, demo.

Every command validates its arguments before any work starts and says what is allowed.
"""

from __future__ import annotations

import argparse
import sys
from functools import partial
from pathlib import Path

from smoothcert.cli.checks import check_demo_options, check_input_shape, check_plot_options
from smoothcert.cli.common import load_base_classifier, resolve_device
from smoothcert.cli.demo import run_demo
from smoothcert.cli.denoiser import add_denoiser_arguments, run_train_denoiser
from smoothcert.cli.distributed import check_distributed, run_distributed
from smoothcert.cli.options import add_method_options, build_method
from smoothcert.cli.runner import CERTIFY_COLUMNS, PREDICT_COLUMNS, ResultsFile, flag_summary, run_dataset
from smoothcert.cli.run_setup import add_run_options, check_selected_inputs, certify_state, setup_run, worker_state
from smoothcert.cli.train import add_train_arguments, run_train
from smoothcert.engine.sampling import DTYPES, input_generator
from smoothcert.engine.smooth import predict
import smoothcert.methods  # noqa: F401  (registers every built-in method)
from smoothcert.methods.base import COMMON_COLUMNS, CertifyMethod, method_class
from smoothcert.methods.records import Prediction
from smoothcert.methods.topk import predict_topk
from smoothcert.stats.topk import check_top_k
from smoothcert.noise.discrete import SAMPLINGS, gaussian_noise


def cmd_certify(args) -> int:
    check_distributed(args.workers, args.ray_address, args.worker_cpus, args.worker_gpus)
    method, ctx, inputs, indices, run = certify_state(args)
    cls = type(method)
    columns = CERTIFY_COLUMNS + COMMON_COLUMNS + tuple(c for c in cls.columns if c not in COMMON_COLUMNS)
    columns += tuple(c for c in ctx.mode.columns if c not in columns)
    # a method that only samples may change its batch sizes on resume (the numbers depend on "block" only); in a
    # sequential mode the estimation draws come in blocks of the batch size itself, so it stays
    resizable = cls.samples_only and not ctx.mode.sequential
    results = ResultsFile(Path(args.out), columns, {"command": "certify", **run, "n0": args.n0,
                                                    "method": method.config(), **ctx.mode.config()},
                          continuable=("batch_size", "inputs_per_batch") if resizable else ())
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
    device, model, num_classes, dataset, indices, inputs, run = setup_run(args)
    noise = gaussian_noise(args.sigma, args.sampling)
    check_selected_inputs(noise.check_support, dataset, indices)
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

    p = sub.add_parser("train-denoiser", help="train a denoiser in front of a frozen classifier (denoised smoothing)")
    add_denoiser_arguments(p)
    p.set_defaults(func=run_train_denoiser)

    p = sub.add_parser("certify", help="certify a data set split; resumable TSV results")
    add_run_options(p, certify=True)
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
    add_run_options(p, certify=False)
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
