"""``tvmquant report``: one self-contained HTML page that shows why a quantized model loses (or keeps) accuracy.

Sections, each a ``<section id=...>`` of the page:

- ``layers``: the per-layer table of :meth:`QuantizedModel.summary` (op, dtype, scales, zero points, SQNR vs FP32,
  kept in FP32 and why), sortable by clicking a column header;
- ``histograms``: for every quantized activation, its histogram (log scale) with the range that max, percentile,
  entropy and MSE choose drawn on it, and the range the model uses marked;
- ``weights``: per-channel weight ranges of every conv/matmul, and the bits per-tensor scales would waste;
- ``sensitivity``: the model-output SQNR with only that layer quantized (and AutoSkip's choices, if it ran);
- ``bench``: the latency table and a bar chart of a ``tvmquant bench`` JSON (``bench=``);
- ``finetune``: the loss curve, when the artifact's manifest records a ``loss_history`` list.

Histograms are not stored in artifacts, so the report recomputes them from calibration data (``data=``, the
samples the model was quantized with): it runs the annotated model, whose markers pass every quantizable tensor
to the pure-numpy observers of :mod:`tvmquant.calibration`, exactly as calibration did. Figures are PNG images
embedded as base64 (matplotlib, the optional extra ``pip install "tvmquant[report]"``); the page loads nothing
from the network.
"""

from __future__ import annotations

import base64
import datetime
import hashlib
import html
import io
import json
import os
import re
import zipfile

import numpy as np

from ._io import atomic_write
from .calibration import make_observer
from .calibration.histogram import StreamingHistogram
from .config import MSE, Entropy, Max, Percentile, PerTensor, TensorSpec
from .qparams import Role

__all__ = ["ReportError", "build_report", "model_fingerprint", "check_bench"]

#: The calibration methods drawn on each histogram, in drawing order, with their colours.
METHOD_COLORS = {"max": "#7f7f7f", "percentile": "#1f77b4", "entropy": "#2ca02c", "mse": "#d62728"}
_INSTALL = 'pip install "tvmquant[report]"  (or: pip install matplotlib)'


class ReportError(ValueError):
    """The report cannot be made from what it was given; the message says what to pass instead."""


# ----------------------------------------------------------------------------------------------------------
# Which model a benchmark measured
def model_fingerprint(qmodel) -> dict:
    """What identifies a quantized model in other files (``tvmquant bench`` JSON): its name, inputs and a digest
    of its quantization table (two artifacts with the same table are the same quantized model)."""
    table = {name: params.to_dict() for name, params in sorted(qmodel.table.items())}
    digest = hashlib.sha256(json.dumps(table, sort_keys=True).encode()).hexdigest()
    return {
        "name": _model_name(qmodel),
        "inputs": [spec.to_dict() for spec in qmodel.inputs],
        "quant_table_sha256": digest,
    }


def _model_name(qmodel) -> str:
    artifact = getattr(qmodel, "_artifact", None)
    if artifact:
        return os.path.basename(artifact)
    if qmodel.source_file is not None:
        return os.path.basename(qmodel.source_file.path)
    return "the model"


def check_bench(bench, qmodel) -> tuple[dict, str]:
    """``(bench result, where)`` from a ``tvmquant bench`` JSON path or dict, refused if it measured another model."""
    where = "the benchmark result"
    if isinstance(bench, (str, os.PathLike)):
        where = f"bench JSON {os.fspath(bench)!r}"
        if not os.path.isfile(bench):
            raise ReportError(f"{where} does not exist; write one with `tvmquant bench MODEL.tvmq -o BENCH.json`")
        try:
            with open(bench) as handle:
                bench = json.load(handle)
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise ReportError(f"{where} is not JSON ({err}); pass the file `tvmquant bench -o` wrote") from None
    if not isinstance(bench, dict) or not isinstance(bench.get("latency_ms"), dict) or "threads" not in bench:
        raise ReportError(f"{where} is not a `tvmquant bench` result (no latency_ms/threads); pass the file it wrote")
    mine = model_fingerprint(qmodel)
    theirs = bench.get("model")
    if not isinstance(theirs, dict) or "quant_table_sha256" not in theirs:
        raise ReportError(
            f"{where} does not say which model it measured (written by an older tvmquant); re-run "
            f"`tvmquant bench {mine['name']} -o BENCH.json`"
        )
    if theirs["quant_table_sha256"] != mine["quant_table_sha256"]:
        raise ReportError(
            f"{where} measured model {theirs.get('name')!r} (quantization table {theirs['quant_table_sha256'][:12]}), "
            f"not {mine['name']!r} (table {mine['quant_table_sha256'][:12]}); run `tvmquant bench {mine['name']} "
            "-o BENCH.json` for this model"
        )
    return bench, where


# ----------------------------------------------------------------------------------------------------------
def _require_matplotlib():
    try:
        import matplotlib
    except ImportError:
        raise ImportError(f"the report draws its figures with matplotlib, which is not installed: {_INSTALL}") from None
    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def _manifest(qmodel) -> dict:
    artifact = getattr(qmodel, "_artifact", None)
    if not artifact or not os.path.isfile(artifact):
        return {}
    try:
        with zipfile.ZipFile(artifact) as archive:
            return json.loads(archive.read("manifest.json"))
    except (zipfile.BadZipFile, KeyError, json.JSONDecodeError):
        return {}


def _loss_history(qmodel, manifest: dict) -> list | None:
    """The finetune loss curve, where the model or its artifact records one (``loss_history``)."""
    candidates = [
        (getattr(qmodel, "finetune_log", None) or {}).get("loss_history"),
        getattr(qmodel, "loss_history", None),
        manifest.get("loss_history"),
        (manifest.get("finetune") or {}).get("loss_history") if isinstance(manifest.get("finetune"), dict) else None,
        (manifest.get("metadata") or {}).get("loss_history") if isinstance(manifest.get("metadata"), dict) else None,
    ]
    for history in candidates:
        if history is not None and len(history):
            values = np.asarray(history, dtype=np.float64).reshape(-1)
            if values.size:
                return values.tolist()
    return None


def _histogram_specs(spec: TensorSpec) -> dict:
    """The activation spec with each of the four methods, on one histogram resolution (so one histogram serves)."""
    method = spec.method
    num_bins = getattr(method, "num_bins", 2048)
    percentile = method.percentile if isinstance(method, Percentile) else 99.99
    start_bins = method.start_bins if isinstance(method, Entropy) else min(128, num_bins)
    methods = {
        "max": Max(),
        "percentile": Percentile(percentile, num_bins),
        "entropy": Entropy(num_bins, start_bins),
        "mse": MSE(num_bins),
    }
    return {name: TensorSpec(spec.dtype, spec.scheme, PerTensor(), spec.bits, m) for name, m in methods.items()}


def _method_label(spec: TensorSpec, name: str) -> str:
    if name == "percentile":
        return f"percentile {getattr(spec.method, 'percentile', 99.99):g}"
    return name


def _configured_method(spec: TensorSpec) -> str:
    return {Max: "max", Percentile: "percentile", Entropy: "entropy", MSE: "mse"}[type(spec.method)]


class _ActivationStats:
    """One shared histogram per activation (of ``x``, or of ``|x|`` for symmetric schemes) and the range each
    method computes from it, with the observers of :mod:`tvmquant.calibration`."""

    def __init__(self, names, spec: TensorSpec, nan_policy: str):
        self.spec = spec
        self.specs = _histogram_specs(spec)
        # The MSE observer's histogram also counts exact zeros, which MSE needs and the others ignore.
        self.collectors = {name: make_observer(self.specs["mse"], name, nan_policy) for name in names}

    def collect(self, name, array) -> None:
        collector = self.collectors.get(name)
        if collector is not None:
            collector.collect(array)

    def ranges(self, name) -> dict:
        collector = self.collectors[name]
        result = {}
        for method, spec in self.specs.items():
            if method == "mse":
                observer = collector
            else:
                observer = make_observer(spec, name)
                if hasattr(observer, "histogram"):
                    observer.histogram = collector.histogram
                else:  # max: the extremes, which the histogram keeps exactly
                    observer.min, observer.max = collector.histogram.min, collector.histogram.max
                observer.num_values = collector.num_values
            result[method] = tuple(float(v) for v in observer.compute())
        return result


# ----------------------------------------------------------------------------------------------------------
def build_report(
    qmodel,
    path,
    data=None,
    bench=None,
    *,
    progress: bool = True,
    sensitivity_batches: int = 8,
    max_batches: int | None = None,
) -> dict:
    """Write the HTML report of ``qmodel`` to ``path``; the twin of ``tvmquant report``.

    Parameters
    ----------
    qmodel : QuantizedModel
    path : str or os.PathLike
        The ``.html`` file to write (its folder must exist). Written whole or not at all.
    data
        Calibration data, in any form :func:`tvmquant.quantize` takes (the samples the model was quantized with):
        the histograms and the sensitivity chart are computed on it. Required: artifacts keep calibrated ranges,
        not histograms.
    bench : str, os.PathLike or dict, optional
        A ``tvmquant bench`` JSON (or its dict) of this same model: the latency table and bar chart.
    progress : bool
        Show a progress bar.
    sensitivity_batches : int
        Batches of ``data`` the sensitivity chart is measured on (batches as calibration runs them: up to 16
        samples for an ONNX model with a dynamic batch axis, else the model's batch).
    max_batches : int, optional
        At most this many such batches for the histograms (default: all of ``data``).

    Returns
    -------
    dict
        ``path``, ``sections`` (ids, in page order), ``figures`` (kind -> count), ``ranges`` (activation ->
        method -> the ``(a_min, a_max)`` it computes from the histogram) and ``sensitivity_db`` (layer -> dB).
        The page holds the same (but ``path``) as JSON in ``<script id="report-data">``.

    Examples
    --------
    >>> qmodel.report("report.html", data=calib)  # doctest: +SKIP
    """
    plt = _require_matplotlib()
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"cannot write {path!r}: folder {folder!r} does not exist; create it first")
    if qmodel.qdq is not None:
        raise ReportError(
            f"{_model_name(qmodel)} was imported pre-quantized (QDQ): it has no calibration to report on; "
            "quantize the FP32 model with tvmquant to get a report"
        )
    bench_result = check_bench(bench, qmodel)[0] if bench is not None else None
    if data is None:
        raise ReportError(
            f"{_model_name(qmodel)} stores calibrated ranges but no calibration statistics (activation histograms): "
            "pass the calibration data it was quantized with, `tvmquant report MODEL.tvmq --data calib.npz` "
            "(report(path, data=calib))"
        )
    from tqdm.auto import tqdm

    from ._io import iter_batches
    from .compile import host_build
    from .passes.calibrate import check_finite, compile_vm, observing, run_vm
    from .passes.sensitivity import layer_sensitivity

    manifest = _manifest(qmodel)
    history = _loss_history(qmodel, manifest)
    steps = ["compile", "histograms", "sensitivity", "figures"]
    bar = tqdm(total=len(steps), desc="report", unit="step", disable=not progress, leave=False)

    def step(name):
        bar.set_postfix_str(name)

    # 1. Histograms: the annotated model's markers stream every quantizable activation into the observers.
    step("compiling the calibration graph")
    annotated, inputs = _calibration_graph(qmodel, data)
    vm = compile_vm(annotated, build=host_build)
    bar.update()
    activations = [name for name, params in qmodel.table.items() if params.role == Role.ACTIVATION]
    stats = _ActivationStats(activations, qmodel.config.activation, qmodel.config.nan_policy)
    step("histograms")
    seen = 0
    batches = iter_batches(data, inputs)
    with observing(stats.collect, any_layout=True):  # per-tensor histograms: any layout
        for batch in tqdm(batches, desc="histograms", unit="batch", disable=not progress, leave=False):
            if max_batches is not None and seen >= max_batches:
                break
            check_finite(batch, seen)
            run_vm(vm, batch, inputs)
            seen += 1
    if seen == 0:
        raise ReportError("the report's data holds no sample: pass the calibration data the model was quantized with")
    bar.update()

    # 2. Sensitivity: output SQNR with each layer alone quantized.
    step("sensitivity")
    sensitivity = layer_sensitivity(annotated, qmodel.table, data, inputs, sensitivity_batches, host_build)
    bar.update()

    # 3. Figures and the page.
    step("figures")
    summary = qmodel.summary()
    layers = qmodel.layers
    figures: dict = {}
    sections = []

    sections.append(("layers", "Layers", _layers_section(summary, qmodel, sensitivity)))
    sections.append(("histograms", "Activation histograms", _histogram_section(plt, stats, qmodel, figures)))
    sections.append(("weights", "Per-channel weight ranges", _weights_section(plt, annotated, layers, figures)))
    sections.append(("sensitivity", "Sensitivity", _sensitivity_section(plt, sensitivity, layers, qmodel, figures)))
    if bench_result is not None:
        sections.append(("bench", "Latency", _bench_section(plt, bench_result, figures)))
    if history is not None:
        sections.append(("finetune", "Finetune loss", _loss_section(plt, history, figures)))
    ranges = {name: stats.ranges(name) for name, c in stats.collectors.items() if c.num_values}
    result = {"sections": [key for key, _, _ in sections], "figures": figures, "ranges": ranges}
    result["sensitivity_db"] = sensitivity
    page = _page(qmodel, summary, sections, seen, sensitivity_batches, result)
    atomic_write(path, lambda handle: handle.write(page.encode()))
    bar.update()
    bar.close()
    return {"path": path, **result}


def _calibration_graph(qmodel, data):
    """``(annotated module, input specs)`` to run ``data`` through: the copy at the batch quantize calibrated with
    (an ONNX model with a dynamic batch axis; the VM quantize compiled is reused in the same process), else the
    model itself."""
    from .api import _calibration_module

    if qmodel._source_kind != "onnx":
        return qmodel.annotated, qmodel.inputs
    return _calibration_module(qmodel.source_model(), None, qmodel.annotated, qmodel.inputs, qmodel.config, data, None)


# ----------------------------------------------------------------------------------------------------------
# Sections
def _esc(value) -> str:
    return html.escape(str(value), quote=True)


def _figure(plt, fig, kind: str, figures: dict, caption: str = "", **attrs) -> str:
    buffer = io.BytesIO()
    # Fixed margins, not bbox_inches="tight" (which draws every figure twice: half the report's time).
    fig.savefig(buffer, format="png", dpi=80)
    plt.close(fig)
    figures[kind] = figures.get(kind, 0) + 1
    data = base64.b64encode(buffer.getvalue()).decode()
    extra = "".join(f' data-{key}="{_esc(value)}"' for key, value in attrs.items())
    caption_html = f"<figcaption>{caption}</figcaption>" if caption else ""
    return (
        f'<figure class="figure" data-kind="{kind}"{extra}><img alt="{_esc(kind)}" '
        f'src="data:image/png;base64,{data}">{caption_html}</figure>'
    )


def _fmt(value, digits: int = 4) -> str:
    if value is None:
        return "-"
    if isinstance(value, float) and not np.isfinite(value):
        return "inf" if value > 0 else "-inf"
    return f"{value:.{digits}g}"


def _layers_section(summary, qmodel, sensitivity: dict) -> str:
    headers = [
        "layer",
        "ONNX node",
        "op",
        "dtype",
        "input scale",
        "input zero point",
        "weight scale (min..max)",
        "input SQNR dB",
        "weight SQNR dB",
        "output SQNR dB, only this layer quantized",
        "kept in FP32: why",
    ]
    rows = []
    by_name = {layer.name: layer for layer in qmodel.layers}
    for row in summary.rows:
        layer = by_name.get(row["layer"])
        weight_sqnr = qmodel.sqnr.get(layer.weight) if layer is not None and layer.weight else None
        weight = row["weight_scale"]
        cells = [
            row["layer"],
            row.get("source") or "",
            row["op"],
            row["status"],
            ", ".join(_fmt(s) for s in row["input_scale"]) or "-",
            ", ".join(str(z) for z in row["input_zero_point"]) or "-",
            f"{weight[0]:.3g}..{weight[1]:.3g}" if weight else "-",
            _fmt(row["input_sqnr_db"], 3),
            _fmt(weight_sqnr, 3),
            _fmt(sensitivity.get(row["layer"]), 3),
            "" if row["status"] == "int8" else row["reason"],
        ]
        css = ' class="fp32"' if row["status"] == "fp32" else ""
        rows.append(f"<tr{css}>" + "".join(f"<td>{_esc(cell)}</td>" for cell in cells) + "</tr>")
    head = "".join(f'<th title="click to sort">{_esc(h)}</th>' for h in headers)
    outputs = "".join(
        f"<li>output <code>{_esc(name)}</code>: {_fmt(value, 3)} dB SQNR vs FP32 (everything quantized)</li>"
        for name, value in summary.outputs.items()
    )
    quantized = sum(row["status"] == "int8" for row in summary.rows)
    return (
        f"<p>{quantized} of {len(summary.rows)} layers in INT8. SQNR is measured against the FP32 model on "
        "calibration data: input SQNR at the layer's quantized inputs (the artifact's own measurement), and the "
        "model output's SQNR when only this layer is quantized. Click a column header to sort.</p>"
        f"<ul>{outputs}</ul>"
        f'<table class="sortable" id="layer-table"><thead><tr>{head}</tr></thead><tbody>{"".join(rows)}</tbody></table>'
    )


def _histogram_section(plt, stats: _ActivationStats, qmodel, figures: dict) -> str:
    spec = stats.spec
    chosen_method = _configured_method(spec)
    symmetric = spec.scheme == "symmetric"
    parts = [
        f"<p>Activations are quantized <b>{_esc(spec.dtype)} {_esc(spec.scheme)}</b>, calibrated with "
        f"<b>{_esc(_method_label(spec, chosen_method))}</b>. Each histogram is of "
        f"{'|x|' if symmetric else 'x'} on the calibration data (log scale); the coloured lines are the ranges "
        "each method would choose, the shaded band the range the model uses.</p>",
        '<div class="grid">',
    ]
    rows = []
    for name, collector in stats.collectors.items():
        if collector.num_values == 0:
            parts.append(f"<p>{_esc(name)}: no finite value reached this tensor.</p>")
            continue
        ranges = stats.ranges(name)
        params = qmodel.table[name]
        chosen = (
            (float(np.min(params.a_min)), float(np.max(params.a_max)))
            if params.a_min is not None
            else _range_of(params)
        )
        hist: StreamingHistogram = collector.histogram
        fig, ax = plt.subplots(figsize=(4.6, 2.6))
        fig.subplots_adjust(left=0.13, right=0.98, top=0.9, bottom=0.17)
        edges, counts = _coarse(hist)
        ax.stairs(np.maximum(counts, 0.8), edges, fill=True, color="#c7d4e8", baseline=0.8)
        ax.set_yscale("log")
        _few_ticks(ax, log_y=True)
        ax.axvspan(*_shown(chosen, symmetric), color="#ffbf00", alpha=0.12, label="used by the model")
        for method, (low, high) in ranges.items():
            style = {"color": METHOD_COLORS[method], "lw": 2.2 if method == chosen_method else 1.1}
            style["ls"] = "-" if method == chosen_method else "--"
            label = _method_label(spec, method) + (" (chosen)" if method == chosen_method else "")
            low, high = _shown((low, high), symmetric)
            ax.axvline(high, label=label, **style)
            if not symmetric and low < 0:
                ax.axvline(low, **style)
        ax.set_title(name, fontsize=9)
        ax.set_xlabel("|x|" if symmetric else "x", fontsize=8)
        ax.tick_params(labelsize=7)
        ax.legend(fontsize=6, loc="upper right")
        parts.append(_figure(plt, fig, "histogram", figures, tensor=name))
        rows.append(
            "<tr><td>"
            + "</td><td>".join(
                [_esc(name)]
                + [_esc(f"{_fmt(low)} .. {_fmt(high)}") for low, high in ranges.values()]
                + [_esc(f"{_fmt(chosen[0])} .. {_fmt(chosen[1])}")]
            )
            + "</td></tr>"
        )
    parts.append("</div>")
    head = "".join(f"<th>{_esc(h)}</th>" for h in ["tensor", *[_method_label(spec, m) for m in METHOD_COLORS], "used"])
    parts.append(f'<table class="sortable"><thead><tr>{head}</tr></thead><tbody>{"".join(rows)}</tbody></table>')
    return "".join(parts)


def _few_ticks(ax, log_y: bool = False) -> None:
    """A handful of major ticks and no minor ones: tick labels are most of the drawing time."""
    from matplotlib.ticker import LogLocator, MaxNLocator, NullLocator

    ax.xaxis.set_major_locator(MaxNLocator(6))
    ax.yaxis.set_major_locator(LogLocator(numticks=5) if log_y else MaxNLocator(5))
    ax.yaxis.set_minor_locator(NullLocator())
    ax.xaxis.set_minor_locator(NullLocator())


def _range_of(params) -> tuple[float, float]:
    scale = float(np.max(params.scale))
    zero_point = int(np.max(params.zero_point))
    return (params.qmin - zero_point) * scale, (params.qmax - zero_point) * scale


def _shown(interval, symmetric: bool) -> tuple[float, float]:
    low, high = interval
    return (0.0, max(abs(low), abs(high))) if symmetric else (low, high)


def _coarse(hist: StreamingHistogram, bins: int = 256) -> tuple[np.ndarray, np.ndarray]:
    """The histogram's edges and counts, merged into at most ``bins`` bins for drawing."""
    counts = hist.counts
    edges = hist.edges()
    if len(counts) == 0:
        return np.array([0.0, 1.0]), np.zeros(1)
    group = max(1, -(-len(counts) // bins))
    pad = -len(counts) % group
    merged = np.concatenate([counts, np.zeros(pad, counts.dtype)]).reshape(-1, group).sum(axis=1)
    width = edges[1] - edges[0]
    new_edges = edges[0] + np.arange(len(merged) + 1) * width * group
    return new_edges, merged.astype(np.float64)


def _weights_of(annotated) -> dict:
    """``{weight name: FP32 array}`` of every marked constant weight of the annotated model."""
    from ._compat import const_value, is_const
    from .passes.annotate import parse_marker

    weights = {}
    for block in annotated["main"].body.blocks:
        for binding in block.bindings:
            parsed = parse_marker(binding.value)
            if parsed is not None and parsed[2] == Role.WEIGHT and is_const(parsed[0]):
                weights[parsed[1]] = const_value(parsed[0]).astype(np.float32)
    return weights


def _weights_section(plt, annotated, layers, figures: dict) -> str:
    weights = _weights_of(annotated)
    parts = [
        "<p>Range of each output channel's weights (bars) against the one range a per-tensor scale must cover "
        "(dashed). A channel whose largest |w| is a fraction f of the tensor's loses log2(1/f) bits of "
        "resolution under a per-tensor scale: per-channel scales avoid that.</p>",
        '<div class="grid">',
    ]
    rows = []
    for layer in layers:
        if not layer.weight or layer.weight not in weights:
            continue
        value = weights[layer.weight]
        axis = (layer.weight_axis if layer.weight_axis is not None else 0) % value.ndim
        moved = np.moveaxis(value, axis, 0).reshape(value.shape[axis], -1)
        low, high = moved.min(axis=1), moved.max(axis=1)
        magnitude = np.maximum(np.abs(low), np.abs(high))
        overall = float(magnitude.max())
        with np.errstate(divide="ignore"):
            wasted = np.log2(overall / np.maximum(magnitude, np.finfo(np.float32).tiny))
        fig, ax = plt.subplots(figsize=(4.6, 2.4))
        fig.subplots_adjust(left=0.14, right=0.98, top=0.9, bottom=0.18)
        channels = np.arange(len(low))
        ax.vlines(channels, low, high, color="#1f77b4", lw=max(0.6, min(4.0, 200 / max(len(low), 1))))
        ax.axhline(overall, color="#d62728", ls="--", lw=1, label="per-tensor range")
        ax.axhline(-overall, color="#d62728", ls="--", lw=1)
        ax.set_title(f"{layer.name} ({layer.weight}, {len(low)} channels)", fontsize=9)
        ax.set_xlabel("output channel", fontsize=8)
        _few_ticks(ax)
        ax.tick_params(labelsize=7)
        ax.legend(fontsize=6, loc="upper right")
        parts.append(_figure(plt, fig, "weights", figures, layer=layer.name))
        status = "int8" if layer.quantized else "fp32"
        rows.append(
            f"<tr><td>{_esc(layer.name)}</td><td>{_esc(layer.op_type)}</td><td>{status}</td><td>{len(low)}</td>"
            f"<td>{overall:.4g}</td><td>{np.median(wasted):.2f}</td><td>{np.max(wasted):.2f}</td></tr>"
        )
    parts.append("</div>")
    head = "".join(
        f"<th>{h}</th>"
        for h in [
            "layer",
            "op",
            "dtype",
            "channels",
            "max |w|",
            "bits per-tensor wastes (median channel)",
            "(worst channel)",
        ]
    )
    parts.append(f'<table class="sortable"><thead><tr>{head}</tr></thead><tbody>{"".join(rows)}</tbody></table>')
    return "".join(parts)


_AUTO_DB = re.compile(r"alone: (-?[0-9.]+|inf) dB")


def _sensitivity_section(plt, sensitivity: dict, layers, qmodel, figures: dict) -> str:
    auto = []
    for layer in layers:
        if layer.reason.startswith("auto"):
            match = _AUTO_DB.search(layer.reason)
            auto.append((layer.name, float(match.group(1)) if match else float("nan")))
    auto.sort(key=lambda item: item[1])
    names = sorted(sensitivity, key=lambda name: sensitivity[name])
    values = [sensitivity[name] for name in names]
    finite = [v for v in values if np.isfinite(v)] or [0.0]
    shown = [v if np.isfinite(v) else max(finite) + 10 for v in values]
    labels = list(names)
    colors = ["#1f77b4"] * len(names)
    for name, value in auto:  # kept in FP32: the value AutoSkip measured before skipping them
        labels.append(f"{name} (AutoSkip)")
        shown.append(value if np.isfinite(value) else 0.0)
        colors.append("#ff7f0e")
    height = 0.28 * max(len(labels), 3) + 1.0
    fig, ax = plt.subplots(figsize=(7.0, height))
    fig.subplots_adjust(left=0.24, right=0.98, top=1 - 0.2 / height, bottom=0.6 / height)
    ax.barh(np.arange(len(labels)), shown, color=colors)
    ax.set_yticks(np.arange(len(labels)), labels, fontsize=7)
    ax.invert_yaxis()
    ax.set_xlabel("model-output SQNR (dB) with only this layer quantized: lower = more sensitive", fontsize=8)
    outputs = [value for name, value in qmodel.sqnr.items() if name.startswith("output") and np.isfinite(value)]
    if outputs:
        ax.axvline(min(outputs), color="#2ca02c", ls="--", lw=1, label=f"all quantized: {min(outputs):.1f} dB")
    if qmodel.config.auto_skip is not None:
        target = qmodel.config.auto_skip.target_sqnr_db
        ax.axvline(target, color="#d62728", ls=":", lw=1.2, label=f"AutoSkip target {target:g} dB")
    if outputs or qmodel.config.auto_skip is not None:
        ax.legend(fontsize=7, loc="lower right")
    ax.tick_params(axis="x", labelsize=7)
    figure = _figure(plt, fig, "sensitivity", figures)
    text = (
        "<p>Each bar: the SQNR of the model's output against FP32 when that layer alone is quantized (its "
        "inputs and weight), everything else FP32, on the calibration data. The lowest bars are the layers "
        "worth keeping in FP32 (<code>QuantConfig(skip=...)</code> or <code>AutoSkip</code>).</p>"
    )
    if auto:
        order = "".join(f"<li>{_esc(name)}: {value:.1f} dB alone</li>" for name, value in auto)
        text += f"<p>AutoSkip kept these layers in FP32, in the order it chose them:</p><ol>{order}</ol>"
    elif qmodel.config.auto_skip is not None:
        text += "<p>AutoSkip ran and kept no layer in FP32: the fully quantized model reached its target.</p>"
    return text + figure


def _bench_section(plt, bench: dict, figures: dict) -> str:
    threads = [str(t) for t in bench["threads"]]
    latency = bench["latency_ms"]
    tuned = bench.get("tuned", {})
    head = "<th>engine</th>" + "".join(f"<th>{_esc(t)} thread(s), ms</th>" for t in threads)
    rows = []
    for engine, times in latency.items():
        label = engine + ("" if tuned.get(engine, True) else " (untuned)")
        cells = "".join(f"<td>{_fmt(times.get(t), 4)}</td>" for t in threads)
        rows.append(f"<tr><td>{_esc(label)}</td>{cells}</tr>")
    for name, ratios in (bench.get("speedup") or {}).items():
        cells = "".join(f"<td>{_fmt(ratios.get(t), 3)}x</td>" for t in threads)
        rows.append(f"<tr><td>INT8 speed-up {_esc(name)}</td>{cells}</tr>")
    fig, ax = plt.subplots(figsize=(6.4, 3.0))
    fig.subplots_adjust(left=0.11, right=0.98, top=0.95, bottom=0.12)
    engines = list(latency)
    width = 0.8 / max(len(engines), 1)
    for index, engine in enumerate(engines):
        positions = np.arange(len(threads)) + index * width
        ax.bar(positions, [latency[engine].get(t, np.nan) for t in threads], width, label=engine)
    ax.set_xticks(np.arange(len(threads)) + width * (len(engines) - 1) / 2, [f"{t} thread(s)" for t in threads])
    ax.set_ylabel("median latency (ms)")
    ax.legend(fontsize=7)
    machine = bench.get("machine", {})
    skipped = "".join(f"<li>skipped {_esc(k)}: {_esc(v)}</li>" for k, v in (bench.get("skipped") or {}).items())
    return (
        f"<p>Machine: {_esc(machine.get('cpu', '?'))} ({_esc(machine.get('llvm_mcpu', '?'))}, "
        f"{_esc(machine.get('cores', '?'))} cores, VNNI {'yes' if machine.get('avx512_vnni') else 'no'}).</p>"
        f'<table class="sortable"><thead><tr>{head}</tr></thead><tbody>{"".join(rows)}</tbody></table>'
        f"<ul>{skipped}</ul>" + _figure(plt, fig, "bench", figures)
    )


def _loss_section(plt, history: list, figures: dict) -> str:
    fig, ax = plt.subplots(figsize=(6.4, 2.8))
    fig.subplots_adjust(left=0.11, right=0.98, top=0.95, bottom=0.17)
    ax.plot(np.arange(1, len(history) + 1), history, color="#1f77b4")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    if min(history) > 0 and max(history) / min(history) > 20:
        ax.set_yscale("log")
    return f"<p>{len(history)} steps: loss {history[0]:.4g} at the start, {history[-1]:.4g} at the end.</p>" + _figure(
        plt, fig, "loss", figures
    )


# ----------------------------------------------------------------------------------------------------------
def _json_for_html(data: dict) -> str:
    """``data`` as JSON safe inside a ``<script>`` element (inf as a string, no ``</`` sequence)."""

    def clean(value):
        if isinstance(value, dict):
            return {str(k): clean(v) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return [clean(v) for v in value]
        if isinstance(value, float) and not np.isfinite(value):
            return str(value)
        return value

    return json.dumps(clean(data)).replace("</", "<\\/")


_STYLE = """
body{font-family:system-ui,-apple-system,Segoe UI,Helvetica,Arial,sans-serif;margin:0 2em 3em;color:#222}
h1{margin-bottom:.2em} nav a{margin-right:1em} code{background:#f3f3f3;padding:0 .2em}
table{border-collapse:collapse;font-size:13px;margin:.8em 0} th,td{border:1px solid #ccc;padding:2px 6px}
th{background:#eef2f7;cursor:pointer;position:sticky;top:0} tr.fp32 td{background:#fff4e0}
td{font-variant-numeric:tabular-nums} .grid{display:flex;flex-wrap:wrap;gap:8px}
figure{margin:0;border:1px solid #e4e4e4;padding:4px} figure img{display:block;max-width:100%}
.meta{color:#555;font-size:13px}
"""

_SCRIPT = """
document.querySelectorAll('table.sortable').forEach(function (table) {
  table.querySelectorAll('th').forEach(function (th, column) {
    th.addEventListener('click', function () {
      var body = table.tBodies[0], rows = Array.prototype.slice.call(body.rows);
      var ascending = th.dataset.order !== 'asc'; th.dataset.order = ascending ? 'asc' : 'desc';
      function key(row) {
        var text = row.cells[column].textContent.trim(), number = parseFloat(text);
        return isNaN(number) ? (text === 'inf' ? Infinity : text) : number;
      }
      rows.sort(function (a, b) {
        var x = key(a), y = key(b);
        var order = (typeof x === typeof y) ? (x < y ? -1 : x > y ? 1 : 0) : (typeof x === 'number' ? -1 : 1);
        return ascending ? order : -order;
      });
      rows.forEach(function (row) { body.appendChild(row); });
    });
  });
});
"""


def _page(qmodel, summary, sections, batches: int, sensitivity_batches: int, result: dict) -> str:
    from ._compat import versions

    name = _model_name(qmodel)
    config = qmodel.config
    nav = "".join(f'<a href="#{key}">{_esc(title)}</a>' for key, title, _ in sections)
    body = "".join(f'<section id="{key}"><h2>{_esc(title)}</h2>{content}</section>' for key, title, content in sections)
    version = versions().get("tvmquant", "")
    meta = (
        f"activations {config.activation.dtype} {config.activation.scheme}, weights {config.weight.dtype} "
        f"{config.weight.scheme} {type(config.weight.granularity).__name__}; histograms on {batches} batch(es), "
        f"sensitivity on up to {sensitivity_batches}; tvmquant {version}; "
        f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC"
    )
    return (
        '<!DOCTYPE html><html lang="en"><head><meta charset="utf-8">'
        f"<title>tvmquant report: {_esc(name)}</title><style>{_STYLE}</style></head><body>"
        f"<h1>tvmquant report: {_esc(name)}</h1><p class=meta>{_esc(meta)}</p><nav>{nav}</nav>{body}"
        f'<script type="application/json" id="report-data">{_json_for_html(result)}</script>'
        f"<script>{_SCRIPT}</script></body></html>"
    )
