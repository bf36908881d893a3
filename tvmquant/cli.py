"""The ``tvmquant`` command line. It only parses arguments into a config and calls the library.

Every flag has a Python equivalent: ``--method``/``--percentile`` -> ``TensorSpec.method``, ``--scheme`` ->
activation ``TensorSpec(dtype, scheme)``, ``--per-tensor`` -> weight ``PerTensor()``, ``--skip`` ->
``QuantConfig.skip``, ``--config`` -> ``QuantConfig.from_json``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import numpy as np

from .config import PRESETS

EXIT_USER_ERROR = 2


def _config_from_args(args):
    from .config import DEFAULT, Dynamic, PerTensor, QuantConfig, TensorSpec, method_from_name

    if args.config:
        if not os.path.exists(args.config):
            raise FileNotFoundError(f"config file {args.config!r} does not exist")
        with open(args.config) as handle:
            try:
                config = QuantConfig.from_json(handle.read())
            except json.JSONDecodeError as err:
                raise ValueError(f"config file {args.config!r} is not valid JSON: {err}") from None
    elif args.preset:
        config = PRESETS[args.preset]
    else:
        config = DEFAULT
    op_methods = config.op_methods
    if getattr(args, "dynamic", False):
        if args.method or args.percentile is not None:
            raise ValueError("--dynamic computes activation ranges at run time: drop --method/--percentile")
        config = config.replace(activation=TensorSpec("uint8", "affine", method=Dynamic()), auto_skip=None)
    activation = config.activation
    if args.scheme == "affine":
        activation = TensorSpec("uint8", "affine", activation.granularity, activation.bits, activation.method)
    elif args.scheme == "symmetric":
        activation = TensorSpec("int8", "symmetric", activation.granularity, activation.bits, activation.method)
    if args.percentile is not None and args.method not in (None, "percentile"):
        raise ValueError(f"--percentile applies to --method percentile, not --method {args.method}")
    method_name = args.method or ("percentile" if args.percentile is not None else None)
    if method_name:
        percentile = args.percentile if args.percentile is not None else 99.99
        activation = TensorSpec(
            activation.dtype,
            activation.scheme,
            activation.granularity,
            activation.bits,
            method_from_name(method_name, percentile),
        )
        op_methods = ()  # a method given on the command line applies to every op
    weight = config.weight
    if args.per_tensor:
        weight = TensorSpec(weight.dtype, weight.scheme, PerTensor(), weight.bits, weight.method)
    skip = tuple(config.skip) + tuple(name for entry in args.skip or () for name in _split_names(entry))
    auto_skip = config.auto_skip
    if args.auto_skip is not None:
        from .config import AutoSkip

        auto_skip = AutoSkip(target_sqnr_db=args.auto_skip, max_layers=args.auto_skip_max)
    activation, weight = _with_bits(args, activation, weight)
    recovery = {
        flag: getattr(args, flag)
        for flag in ("bias_correction", "equalize", "depthwise_per_channel")
        if getattr(args, flag, None) is not None
    }
    return config.replace(
        activation=activation, weight=weight, skip=skip, auto_skip=auto_skip, op_methods=op_methods, **recovery
    )


def _with_bits(args, activation, weight):
    """Apply ``--weight-bits`` / ``--activation-bits`` (values on the int8 kernels' 2..8-bit ranges)."""
    import dataclasses

    specs = {"weight": weight, "activation": activation}
    for role in specs:
        bits = getattr(args, f"{role}_bits", None)
        if bits is None:
            continue
        if not 2 <= bits <= 8:
            raise ValueError(
                f"--{role}-bits {bits}: tvmquant runs 2- to 8-bit values on its int8 kernels; give a value in 2..8"
            )
        specs[role] = dataclasses.replace(specs[role], bits=bits)
    return specs["activation"], specs["weight"]


def _split_names(entry: str) -> list:
    names = [name.strip() for name in entry.split(",") if name.strip()]
    if not names:
        raise ValueError(f"--skip {entry!r} names no layer; give a layer name, an ONNX node name or op:TYPE")
    return names


def _load_npz(path: str, what: str):
    """The arrays of an ``.npz`` (a dict) or an ``.npy`` (one array, for a one-input model)."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"{what} file {path!r} does not exist")
    try:
        data = np.load(path, allow_pickle=False)
    except Exception as err:
        raise ValueError(f"{what} file {path!r} is not a readable .npz/.npy file ({err})") from None
    if isinstance(data, np.ndarray):
        return data
    try:
        arrays = {key: data[key] for key in data.files}
    except ValueError as err:  # object arrays need pickle, which is never allowed
        raise ValueError(f"{what} file {path!r} holds an array tvmquant cannot read ({err})") from None
    if not arrays:
        raise ValueError(
            f"{what} file {path!r} holds no arrays; save one array per model input, samples stacked on axis 0 "
            "(np.savez(path, input=x))"
        )
    return arrays


def _check_output_path(path: str) -> None:
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"cannot write {path!r}: folder {folder!r} does not exist; create it first")


def cmd_quantize(args) -> int:
    from .api import quantize

    _check_output_path(args.output)
    config = _config_from_args(args)
    calib = _load_npz(args.calib, "calibration data") if args.calib else None
    qmodel = quantize(
        args.model,
        config,
        calib,
        progress=not args.quiet,
        batch_size=args.batch_size,
        calib_batch=args.calib_batch,
    )
    qmodel.save(args.output, keep_source=args.keep_source)
    if not args.quiet:
        print(qmodel.summary())
        print(f"wrote {args.output}")
    return 0


def cmd_inspect(args) -> int:
    from .api import load

    qmodel = load(args.artifact)
    summary = qmodel.summary()
    if args.json:
        print(json.dumps(summary.to_dict(), indent=2))
    else:
        print(summary)
    return 0


def _open_runnable(path: str, target):
    """A callable model from an artifact (compiled now) or a library written by ``tvmquant compile``."""
    if path.endswith(".so"):
        from .deploy import load_library

        return load_library(path)
    from .api import load

    return load(path).compile(target=target, mode="int8")


def cmd_run(args) -> int:
    _check_output_path(args.output)
    model = _open_runnable(args.model, args.target)
    feed = _load_npz(args.input, "input")
    from ._io import atomic_write, iter_batches  # numpy only: `run` works with TVM's runtime alone

    outputs: list = []
    for batch in iter_batches(feed, model.inputs, what=f"input file {args.input!r}"):
        result = model(batch)
        result = result if isinstance(result, list) else [result]
        if not outputs:
            outputs = [[] for _ in result]
        for store, value in zip(outputs, result):
            store.append(value)
    if not outputs:
        raise ValueError(f"input file {args.input!r} holds no samples")
    names = list(getattr(model, "output_names", []))
    if len(names) != len(outputs):
        names = [f"output{i}" for i in range(len(outputs))]
    arrays = {name: np.concatenate(values, axis=0) for name, values in zip(names, outputs)}
    atomic_write(args.output, lambda handle: np.savez(handle, **arrays))
    if not args.quiet:
        print(f"wrote {args.output}: " + ", ".join(f"{k} {v.shape}" for k, v in arrays.items()))
    return 0


def cmd_compile(args) -> int:
    from .api import load
    from .library import export_library
    from .target import as_target

    _check_output_path(args.output)
    target = as_target(args.target)  # a bad --target fails before the artifact is read
    qmodel = load(args.artifact)
    if args.batch_size:
        qmodel = qmodel.rebatch(args.batch_size)
    metadata = export_library(qmodel, args.output, target=target, db=args.db)
    if not args.quiet:
        print(f"wrote {args.output} and {args.output}.json (target {metadata['target']})")
    return 0


def cmd_tune(args) -> int:
    from .tuning import tune

    result = tune(
        args.model,
        target=args.target,
        trials=args.trials,
        db=args.db,
        trials_per_task=args.trials_per_task,
        package=args.package,
        import_package=args.import_package,
        batch_size=args.batch_size,
        progress=not args.quiet,
        verbose=args.verbose,
        rpc_tracker=args.rpc_tracker,
        rpc_key=args.rpc_key,
        rpc_parallel=args.rpc_parallel,
    )
    if args.quiet:
        return 0
    if result.action == "tuned":
        print(f"tuning database: {args.db}")
    elif result.action == "packaged":
        print(
            f"{result.details['candidates']} candidates of {result.details['tasks']} kernels in {args.package}. "
            f"Next:\n  on the GPU host: TVM_USE_RUNTIME_LIB=1 python -m tvmquant.remote measure {args.package}\n"
            f"  here, with its measurements.json in {args.package}: tvmquant tune {args.model} --target ... "
            f"--import {args.package} --db {args.db}"
        )
    else:
        counts = result.details
        print(
            f"imported {counts['correct']} correct measured schedules ({counts['wrong']} wrong, {counts['failed']} "
            f"failed) for {counts['tuned_tasks']}/{counts['tasks']} kernels into {args.db}"
        )
    return 0


def cmd_bench(args) -> int:
    from .api import load
    from .benchmark import benchmark, format_table

    if args.output:
        _check_output_path(args.output)
    if args.seconds <= 0:
        raise ValueError(f"--seconds must be positive, got {args.seconds}")
    qmodel = load(args.artifact)
    if args.batch_size:
        qmodel = qmodel.rebatch(args.batch_size)
    say = (lambda message: None) if args.quiet else (lambda message: print(f"[bench] {message}", file=sys.stderr))
    result = benchmark(
        qmodel,
        target=args.target,
        db=args.db,
        fp32_db=args.fp32_db,
        threads=tuple(args.threads),
        seconds=args.seconds,
        onnx_runtime=not args.no_ort,
        openvino=not args.no_openvino,
        calib_data=_load_npz(args.calib, "calibration data") if args.calib else None,
        say=say,
    )
    result["arguments"] = {key: value for key, value in vars(args).items() if key != "func"}
    print(format_table(result))
    if args.output:
        from ._io import atomic_write

        atomic_write(args.output, lambda handle: handle.write(json.dumps(result, indent=2).encode()))
        if not args.quiet:
            print(f"wrote {args.output}")
    return 0


def cmd_report(args) -> int:
    from .api import load

    _check_output_path(args.output)
    qmodel = load(args.artifact)
    data = _load_npz(args.data, "calibration data") if args.data else None
    result = qmodel.report(
        args.output, data=data, bench=args.bench, progress=not args.quiet, sensitivity_batches=args.sensitivity_batches
    )
    if not args.quiet:
        figures = sum(result["figures"].values())
        print(f"wrote {args.output}: sections {', '.join(result['sections'])}; {figures} figures")
    return 0


def cmd_export(args) -> int:
    from .api import load

    _check_output_path(args.output)
    qmodel = load(args.artifact)
    qmodel.export_onnx(args.output, fused_adds=args.fused_adds)
    if not args.quiet:
        print(f"wrote {args.output} ({args.format})")
    return 0


def _load_labels(path: str) -> np.ndarray:
    labels = _load_npz(path, "labels")
    if isinstance(labels, dict):
        if len(labels) == 1:
            return next(iter(labels.values()))
        if "labels" not in labels:
            raise ValueError(f"labels file {path!r} holds {sorted(labels)}; save one array (np.savez(path, labels=y))")
        return labels["labels"]
    return labels


def cmd_finetune(args) -> int:
    from .api import load
    from .training import finetune

    _check_output_path(args.output)
    qmodel = load(args.model)
    data = _load_npz(args.data, "training data")
    labels = _load_labels(args.labels) if args.labels else None
    tuned = finetune(
        qmodel,
        data,
        labels,
        epochs=args.epochs,
        lr=args.lr,
        batch_size=args.batch,
        learn_scales=args.learn_scales,
        train_weights=args.train_weights,
        loss=args.loss,
        progress=not args.quiet,
    )
    tuned.save(args.output, keep_source=True)  # the trained FP32 weights live only in this artifact
    if not args.quiet:
        losses = ", ".join(f"{value:.4g}" for value in tuned.finetune_log["loss"])
        print(tuned.summary())
        print(f"loss per epoch: {losses}")
        print(f"wrote {args.output}")
    return 0


def cmd_demo(args) -> int:
    """Quantize the bundled Fashion-MNIST CNN and print FP32 vs INT8 accuracy."""
    from . import quantize
    from .examples import fmnist_model_path, load_fmnist_example

    calib, test_x, test_y = load_fmnist_example()
    qmodel = quantize(fmnist_model_path(), calib_data=calib, progress=not args.quiet, batch_size=1)
    print(qmodel.summary())
    int8 = qmodel.compile(mode="int8")
    fp32 = qmodel.compile(mode="fp32")
    int8_pred = np.array([int(np.argmax(int8(x[None]))) for x in test_x])
    fp32_pred = np.array([int(np.argmax(fp32(x[None]))) for x in test_x])
    n = len(test_y)
    print(f"Fashion-MNIST, {n} bundled test images:")
    print(f"  FP32 accuracy {np.mean(fp32_pred == test_y) * 100:.2f}%")
    print(f"  INT8 accuracy {np.mean(int8_pred == test_y) * 100:.2f}%")
    print(f"  INT8 agrees with FP32 on {np.mean(int8_pred == fp32_pred) * 100:.2f}% of images")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tvmquant", description="INT8 quantization for Apache TVM (Relax)")
    sub = parser.add_subparsers(dest="command", required=True)

    q = sub.add_parser("quantize", help="calibrate and quantize an FP32 ONNX model")
    q.add_argument("model", help="FP32 ONNX file")
    q.add_argument("--calib", help=".npz with one array per model input, samples on axis 0 (not needed for QDQ models)")
    q.add_argument(
        "--method",
        choices=["max", "entropy", "percentile", "mse"],
        help="activation calibration (default percentile 99.99)",
    )
    q.add_argument(
        "--dynamic",
        action="store_true",
        help="dynamic quantization: per-row activation ranges computed at run time, no --calib needed",
    )
    q.add_argument("--percentile", type=float, default=None, help="percentile for --method percentile (default 99.99)")
    q.add_argument("--scheme", choices=["affine", "symmetric"], help="activations: uint8 affine or int8 symmetric")
    q.add_argument("--per-tensor", action="store_true", help="per-tensor weight scales (default per channel)")
    q.add_argument(
        "--skip",
        action="append",
        metavar="NAME",
        help="a layer to keep in FP32: tvmquant's name (conv2d_3), the ONNX node name, or op:TYPE; repeat the flag "
        "or give a comma list",
    )
    q.add_argument(
        "--auto-skip",
        type=float,
        metavar="DB",
        help="keep the most sensitive layers in FP32 until the output SQNR vs FP32 reaches DB (QuantConfig.auto_skip)",
    )
    q.add_argument("--auto-skip-max", type=int, default=8, help="at most this many layers for --auto-skip")
    q.add_argument(
        "--bias-correction",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="cancel each conv/matmul's mean quantization error per channel through its bias (QuantConfig."
        "bias_correction)",
    )
    q.add_argument(
        "--equalize",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="cross-layer equalization of conv -> (ReLU/ReLU6) -> conv weight ranges (QuantConfig.equalize)",
    )
    q.add_argument(
        "--depthwise-per-channel",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="one activation scale per channel at the inputs of depthwise convs (QuantConfig.depthwise_per_channel)",
    )
    q.add_argument("--weight-bits", type=int, metavar="N", help="weight bit width, 2..8 (4: W4 on the int8 kernels)")
    q.add_argument("--activation-bits", type=int, metavar="N", help="activation bit width, 2..8 (A4: 4)")
    q.add_argument("--config", help="QuantConfig JSON file (flags override it)")
    q.add_argument(
        "--preset",
        choices=sorted(PRESETS),
        help="start from a named config (default x86_vnni); flags override it",
    )
    q.add_argument(
        "--batch-size",
        type=int,
        default=None,
        help="batch to bind a dynamic batch axis to (default 1; `compile --batch-size` can change it later)",
    )
    q.add_argument(
        "--calib-batch",
        type=int,
        default=None,
        help="samples per calibration run (models with a dynamic batch axis; default: up to 16, what fits)",
    )
    q.add_argument("-o", "--output", required=True, help="artifact to write (.tvmq)")
    q.add_argument(
        "--keep-source",
        action="store_true",
        help="store the ONNX model in the artifact (save(keep_source=True)); without it the artifact records the "
        "file's path and SHA-256, and FP32 runs, rebatching and the ONNX export read the file there",
    )
    q.add_argument("-q", "--quiet", action="store_true")
    q.set_defaults(func=cmd_quantize)

    r = sub.add_parser("run", help="run a quantized artifact or compiled library on inputs")
    r.add_argument("model", help="artifact (.tvmq) or library (.so from `tvmquant compile`)")
    r.add_argument("--input", required=True, help=".npz with one array per input, samples on axis 0")
    r.add_argument("--target", default=None, help="target to compile an artifact for (default: this CPU)")
    r.add_argument("-o", "--output", required=True, help=".npz to write, one array per output")
    r.add_argument("-q", "--quiet", action="store_true")
    r.set_defaults(func=cmd_run)

    i = sub.add_parser("inspect", help="print what was quantized, skipped and why")
    i.add_argument("artifact")
    i.add_argument("--json", action="store_true", help="print JSON instead of a table")
    i.set_defaults(func=cmd_inspect)

    c = sub.add_parser("compile", help="compile an artifact into a deployable library (.so + .so.json)")
    c.add_argument("artifact")
    c.add_argument(
        "--target", default=None, help="'llvm' (this CPU), a JSON target dict, or a tag like nvidia/nvidia-h100"
    )
    c.add_argument("--db", default=None, help="tuning database directory from `tvmquant tune`")
    c.add_argument(
        "--batch-size", type=int, default=None, help="compile for this batch (the model's batch axis must be dynamic)"
    )
    c.add_argument("-o", "--output", required=True, help="library to write (.so)")
    c.add_argument("-q", "--quiet", action="store_true")
    c.set_defaults(func=cmd_compile)

    t = sub.add_parser("tune", help="tune the model's kernels with meta-schedule into a reusable database")
    t.add_argument("model", help="artifact (.tvmq: its INT8 model) or an FP32 .onnx (for an FP32 baseline)")
    t.add_argument("--target", default=None, help="'llvm' (this CPU, default) or a JSON target dict")
    t.add_argument("--trials", type=int, default=64, help="total trial budget over the tasks still untuned")
    t.add_argument("--trials-per-task", type=int, default=None, help="cap per task")
    t.add_argument("--db", required=True, help="database directory (created; reused by later runs)")
    t.add_argument("--batch-size", type=int, default=None, help="static batch size")
    t.add_argument("--package", default=None, help="CUDA: write a measurement package here (no GPU needed)")
    t.add_argument("--import", dest="import_package", default=None, help="CUDA: import a measured package into --db")
    t.add_argument(
        "--rpc-tracker", default=None, metavar="HOST:PORT", help="measure on the RPC servers of this tracker"
    )
    t.add_argument(
        "--rpc-key", default=None, help="device key of those servers (`python -m tvmquant.rpc_server --key`)"
    )
    t.add_argument(
        "--rpc-parallel", type=int, default=None, help="measurements at once (default: servers under the key)"
    )
    t.add_argument("-q", "--quiet", action="store_true")
    t.add_argument("--verbose", action="store_true", help="also print meta-schedule's own log (always in DB/logs)")
    t.set_defaults(func=cmd_tune)

    b = sub.add_parser("bench", help="time the INT8 model against FP32 (TVM) and ONNX Runtime, in one run, on this CPU")
    b.add_argument("artifact", help="artifact (.tvmq) from `tvmquant quantize`")
    b.add_argument("--target", default=None, help="'llvm' (this CPU, default) or a JSON target dict")
    b.add_argument("--db", default=None, help="tuning database of the INT8 model (`tvmquant tune ARTIFACT`)")
    b.add_argument("--fp32-db", default=None, help="tuning database of the FP32 model (`tvmquant tune MODEL.onnx`)")
    b.add_argument("--threads", type=int, nargs="+", default=[1, 2], help="thread counts to time at")
    b.add_argument("--seconds", type=float, default=3.0, help="timing window per measurement")
    b.add_argument("--batch-size", type=int, default=None, help="static batch size (ONNX sources)")
    b.add_argument("--no-ort", action="store_true", help="skip ONNX Runtime")
    b.add_argument("--no-openvino", action="store_true", help="skip OpenVINO FP32/INT8 (NNCF)")
    b.add_argument(
        "--calib",
        default=None,
        help=".npz of calibration samples for OpenVINO's NNCF INT8 (the data you quantized with)",
    )
    b.add_argument("-o", "--output", default=None, help="JSON file for the results")
    b.add_argument("-q", "--quiet", action="store_true")
    b.set_defaults(func=cmd_bench)

    e = sub.add_parser("export", help="export a quantized artifact to another format")
    e.add_argument("artifact")
    e.add_argument("--format", choices=["onnx-qdq"], default="onnx-qdq", help="QDQ ONNX (ONNX Runtime, TensorRT)")
    e.add_argument("-o", "--output", required=True)
    e.add_argument(
        "--fused-adds",
        action="store_true",
        help="write residual adds as Add, which ONNX Runtime fuses into its approximate QLinearAdd (faster there; "
        "outputs then differ from tvmquant's by a few steps); default: Sum, which ONNX Runtime runs exactly",
    )
    e.add_argument("-q", "--quiet", action="store_true")
    e.set_defaults(func=cmd_export)

    rp = sub.add_parser("report", help="write a self-contained HTML report: layers, histograms, weights, sensitivity")
    rp.add_argument("artifact", help="artifact (.tvmq) from `tvmquant quantize`")
    rp.add_argument(
        "--data", help=".npz of calibration data (one array per input): the histograms and sensitivity need it"
    )
    rp.add_argument("--bench", help="JSON from `tvmquant bench` of this model: latency table and chart")
    rp.add_argument(
        "--sensitivity-batches", type=int, default=8, help="batches the sensitivity chart is measured on (default 8)"
    )
    rp.add_argument("-o", "--output", required=True, help="HTML file to write")
    rp.add_argument("-q", "--quiet", action="store_true")
    rp.set_defaults(func=cmd_report)

    d = sub.add_parser("demo", help="quantize the bundled Fashion-MNIST model and print FP32 vs INT8 accuracy")
    d.add_argument("-q", "--quiet", action="store_true")
    d.set_defaults(func=cmd_demo)

    f = sub.add_parser("finetune", help="fine-tune a quantized artifact with fake quantization (QAT, LSQ scales)")
    f.add_argument("model", help="a quantized artifact (.tvmq)")
    f.add_argument("--data", required=True, help=".npz/.npy of training inputs, samples on axis 0")
    f.add_argument("--labels", help=".npz/.npy of integer class labels (else: distil from the FP32 model)")
    f.add_argument("--epochs", type=int, default=1)
    f.add_argument("--lr", type=float, default=1e-4, help="relative learning rate (Adam, cosine decay)")
    f.add_argument("--batch", type=int, help="samples per step (default: min(32, N))")
    f.add_argument(
        "--learn-scales",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="learn step sizes (LSQ) and affine zero points (LSQ+); --no-learn-scales keeps the calibrated ones",
    )
    f.add_argument(
        "--train-weights",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="train the FP32 weights; --no-train-weights trains only biases and quantizers (few images)",
    )
    f.add_argument("--loss", choices=["mse", "kl"], help="distillation loss without labels (default mse)")
    f.add_argument("-o", "--output", required=True)
    f.add_argument("-q", "--quiet", action="store_true")
    f.set_defaults(func=cmd_finetune)

    return parser


def _one_line_warnings(message, category, filename, lineno, file=None, line=None) -> None:
    """Warnings and notices as one line each (``tvmquant: notice: ...``), not Python's two-line form."""
    kind = "notice" if category.__name__.endswith("Notice") else "warning"
    print(f"tvmquant: {kind}: {message}", file=file or sys.stderr)


def _import_tvm_without_torch() -> None:
    """Import TVM with PyTorch hidden, when nothing has imported PyTorch yet.

    ``tvm_ffi`` imports ``torch`` first thing, to pre-empt a symbol clash seen on Windows, and tvmquant's
    commands never use it: 1.5 s of a command's start-up here, and TVMScript's parser (``inspect.stack``) then
    walks PyTorch's thousand modules at every kernel intrinsic it parses. PyTorch stays importable afterwards;
    ``TVMQUANT_IMPORT_TORCH=1`` keeps TVM's own behaviour.
    """
    if "tvm" in sys.modules or "torch" in sys.modules or os.environ.get("TVMQUANT_IMPORT_TORCH") == "1":
        return
    sys.modules["torch"] = None  # makes `import torch` raise ImportError, which tvm_ffi expects and skips
    try:
        import tvm  # noqa: F401
    except ImportError:  # TVM missing or broken: the command that needs it says so
        pass
    finally:
        if sys.modules.get("torch", 0) is None:
            del sys.modules["torch"]


def main(argv=None) -> int:
    import warnings

    _import_tvm_without_torch()
    parser = build_parser()
    args = parser.parse_args(argv)
    for flag in ("batch_size", "calib_batch", "sensitivity_batches"):
        value = getattr(args, flag, None)
        if value is not None and value < 1:
            print(f"tvmquant: error: --{flag.replace('_', '-')} must be at least 1, got {value}", file=sys.stderr)
            return EXIT_USER_ERROR
    previous = warnings.showwarning
    warnings.showwarning = _one_line_warnings
    try:
        return args.func(args)
    except KeyboardInterrupt:
        print("tvmquant: interrupted", file=sys.stderr)
        return 130
    except (ValueError, FileNotFoundError, TypeError, ImportError) as err:
        print(f"tvmquant: error: {err}", file=sys.stderr)
        return EXIT_USER_ERROR
    finally:
        warnings.showwarning = previous


if __name__ == "__main__":
    sys.exit(main())
