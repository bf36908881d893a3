"""``tvmquant bench``: latency of a quantized model against its FP32 original, side by side in one run.

Engines, each timed in a fresh process per thread count (TVM's thread pool is sized when it starts):

- ``tvmquant_int8``: the INT8 model compiled for the target, with a tuning database if given;
- ``tvm_fp32``: the FP32 model compiled the same way (with its own database if given, else untuned);
- ``ort_fp32`` / ``ort_int8_qdq``: ONNX Runtime on the ONNX source and on the model's own QDQ export (the same
  scales), when ``onnxruntime`` is installed and the model came from ONNX.

The result holds the machine (CPU, LLVM ``mcpu``, VNNI/AMX flags, cores), the median latency per engine and
thread count, and the INT8 speed-ups. ``bench/speed_x86.py`` uses the same timers for its benchmark.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import tempfile

import numpy as np

__all__ = [
    "benchmark",
    "format_table",
    "machine_info",
    "openvino_models",
    "random_inputs",
    "time_library",
    "time_onnx",
    "time_openvino",
]

_LIBRARY_TIMER = """
import json, sys, time, numpy as np
from tvmquant.deploy import load_library
model = load_library(sys.argv[1])
feed = dict(np.load(sys.argv[2], allow_pickle=False))
for _ in range(5): model(feed)
times, deadline = [], time.time() + float(sys.argv[3])
while time.time() < deadline or len(times) < 10:
    start = time.perf_counter(); model(feed); times.append(time.perf_counter() - start)
print(json.dumps({"median_ms": float(np.median(times) * 1000), "runs": len(times)}))
"""

_ONNX_TIMER = """
import json, sys, time, numpy as np, onnxruntime as ort
options = ort.SessionOptions(); options.intra_op_num_threads = int(sys.argv[3]); options.inter_op_num_threads = 1
session = ort.InferenceSession(sys.argv[1], options, providers=["CPUExecutionProvider"])
feed = dict(np.load(sys.argv[2], allow_pickle=False))
for _ in range(5): session.run(None, feed)
times, deadline = [], time.time() + float(sys.argv[4])
while time.time() < deadline or len(times) < 10:
    start = time.perf_counter(); session.run(None, feed); times.append(time.perf_counter() - start)
print(json.dumps({"median_ms": float(np.median(times) * 1000), "runs": len(times)}))
"""


_OPENVINO_TIMER = """
import json, sys, time, numpy as np, openvino as ov
core = ov.Core()
config = {"INFERENCE_NUM_THREADS": int(sys.argv[3]), "PERFORMANCE_HINT": "LATENCY"}
compiled = core.compile_model(core.read_model(sys.argv[1]), "CPU", config)
request = compiled.create_infer_request()
feed = dict(np.load(sys.argv[2]))
for _ in range(5): request.infer(feed)
times, deadline = [], time.time() + float(sys.argv[4])
while time.time() < deadline or len(times) < 10:
    start = time.perf_counter(); request.infer(feed); times.append(time.perf_counter() - start)
print(json.dumps({"median_ms": float(np.median(times) * 1000), "runs": len(times)}))
"""


def _median_ms(command: list[str], env: dict | None = None) -> float:
    out = subprocess.run(command, env=env, capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(f"timing process failed ({' '.join(command[:2])} ...):\n{out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])["median_ms"]


def time_library(library: str, inputs_npz: str, threads: int, seconds: float = 3.0) -> float:
    """Median latency (ms) of a library from ``tvmquant compile`` on the arrays of ``inputs_npz``, in a fresh
    process with ``TVM_NUM_THREADS=threads``."""
    env = dict(os.environ, TVM_NUM_THREADS=str(threads))
    return _median_ms([sys.executable, "-c", _LIBRARY_TIMER, library, inputs_npz, str(seconds)], env)


def time_onnx(model_path: str, inputs_npz: str, threads: int, seconds: float = 3.0) -> float:
    """Median latency (ms) of ONNX Runtime (CPU provider, ``threads`` intra-op threads) in a fresh process."""
    return _median_ms([sys.executable, "-c", _ONNX_TIMER, model_path, inputs_npz, str(threads), str(seconds)])


def time_openvino(model_xml: str, inputs_npz: str, threads: int, seconds: float = 3.0) -> float:
    """Median latency (ms) of an OpenVINO IR model on the CPU plugin (``INFERENCE_NUM_THREADS=threads``,
    latency hint) in a fresh process."""
    return _median_ms([sys.executable, "-c", _OPENVINO_TIMER, model_xml, inputs_npz, str(threads), str(seconds)])


def openvino_models(onnx_path: str, calib: dict, folder: str) -> dict:
    """OpenVINO FP32 and INT8 IR models of an ONNX file, written to ``folder``: ``{"ov_fp32": xml, "ov_int8":
    xml}``. INT8 is NNCF's post-training quantization (``nncf.quantize``, its defaults) calibrated on the
    samples of ``calib`` (input name -> array with samples on axis 0: the data tvmquant calibrated on).

    Raises
    ------
    ImportError
        ``openvino`` or ``nncf`` is not installed.
    """
    import nncf
    import openvino as ov

    model = ov.convert_model(onnx_path)
    names = [port.get_any_name() for port in model.inputs]
    count = min(len(next(iter(calib.values()))), 300)
    samples = [{name: np.ascontiguousarray(calib[name][i : i + 1]) for name in names} for i in range(count)]
    quantized = nncf.quantize(model, nncf.Dataset(samples), subset_size=count)
    paths = {"ov_fp32": os.path.join(folder, "ov_fp32.xml"), "ov_int8": os.path.join(folder, "ov_int8.xml")}
    ov.save_model(model, paths["ov_fp32"])
    ov.save_model(quantized, paths["ov_int8"])
    return paths


def machine_info() -> dict:
    """CPU model, LLVM's name for it, the INT8 instruction sets it has, and its core count."""
    from tvm.target import codegen

    from .target import host_mcpu
    from .threads import default_num_threads

    try:
        with open("/proc/cpuinfo") as handle:
            cpuinfo = handle.read()
    except OSError:  # not Linux
        cpuinfo = ""
    flags = set()
    for line in cpuinfo.splitlines():
        if line.startswith("flags"):
            flags = set(line.split(":", 1)[1].split())
            break
    model = next((line.split(":", 1)[1].strip() for line in cpuinfo.splitlines() if line.startswith("model name")), "")
    return {
        "platform": platform.platform(),
        "cpu": model or platform.processor(),
        "llvm_mcpu": host_mcpu(),
        "llvm_detected_mcpu": str(codegen.llvm_get_system_cpu()),
        "cores": default_num_threads(),
        "avx512_vnni": "avx512_vnni" in flags,
        "amx_int8": "amx_int8" in flags,
    }


def random_inputs(inputs, seed: int = 0) -> dict:
    """One batch of inputs for timing: standard normal floats, small integers for integer inputs."""
    rng = np.random.default_rng(seed)
    feed = {}
    for spec in inputs:
        if "float" in spec.dtype:
            feed[spec.name] = rng.standard_normal(spec.shape).astype(spec.dtype)
        else:
            feed[spec.name] = rng.integers(0, 10, spec.shape).astype(spec.dtype)
    return feed


def benchmark(
    qmodel,
    *,
    target=None,
    db: str | None = None,
    fp32_db: str | None = None,
    threads: tuple[int, ...] = (1, 2),
    seconds: float = 3.0,
    onnx_runtime: bool = True,
    openvino: bool = True,
    calib_data: dict | None = None,
    say=None,
) -> dict:
    """Time ``qmodel`` (INT8) against its FP32 model, and against ONNX Runtime where it can run.

    Parameters
    ----------
    qmodel : tvmquant.QuantizedModel
    target : str, dict or tvm.target.Target, optional
        Defaults to this CPU. Must run on this machine.
    db, fp32_db : str, optional
        Tuning databases (``tvmquant tune``) for the INT8 and the FP32 model. Without one, that model is
        compiled with meta-schedule's default schedules and the result says it was untuned.
    threads : tuple of int
        Thread counts to time at.
    seconds : float
        Timing window per measurement (at least 10 runs).
    onnx_runtime : bool
        Also time ONNX Runtime on the ONNX source and on the QDQ export (skipped, with the reason recorded,
        when onnxruntime is missing or the model has no ONNX source).
    openvino : bool
        Also time OpenVINO FP32 and OpenVINO INT8 (``nncf.quantize`` of the same ONNX source; skipped, with the
        reason recorded, when ``openvino``/``nncf`` are missing or the model has no ONNX source).
    calib_data : dict, optional
        Input name -> samples (axis 0) to calibrate OpenVINO's INT8 on: pass the data the model was calibrated
        on. Without it, 16 random batches (the result records which).
    say : callable, optional
        Progress messages (one string each).

    Returns
    -------
    dict
        ``model`` (name, inputs, digest of the quantization table: what ``tvmquant report`` checks),
        ``machine``, ``target``, ``threads``, ``tuned`` (per TVM engine), ``latency_ms`` (engine -> {threads:
        ms}), ``speedup`` (INT8 over every other engine, per thread count) and ``skipped`` (engine -> reason).
    """
    from .compile import as_target, target_json
    from .library import export_library

    say = say or (lambda message: None)
    target = as_target(target)
    if target.kind.name != "llvm":
        raise ValueError(f"tvmquant bench times on this machine's CPU: target {target.kind.name!r} cannot run here")
    for flag, database in (("db", db), ("fp32_db", fp32_db)):
        if database is not None and not os.path.isdir(database):
            # A mistyped path would otherwise build untuned, with the result still saying "tuned".
            raise FileNotFoundError(f"{flag} {os.fspath(database)!r} is not a tuning database directory")
    threads = tuple(int(t) for t in threads)
    if not threads or min(threads) < 1:
        raise ValueError(f"threads must be positive integers, got {threads}")
    from .report import model_fingerprint

    result: dict = {
        "model": model_fingerprint(qmodel),
        "machine": machine_info(),
        "target": target_json(target),
        "threads": list(threads),
        "tuned": {"tvmquant_int8": db is not None, "tvm_fp32": fp32_db is not None},
        "latency_ms": {},
        "skipped": {},
    }
    with tempfile.TemporaryDirectory(prefix="tvmquant-bench-") as folder:
        inputs_npz = os.path.join(folder, "inputs.npz")
        np.savez(inputs_npz, **random_inputs(qmodel.inputs))
        for engine, mode, database in (("tvmquant_int8", "int8", db), ("tvm_fp32", "fp32", fp32_db)):
            say(f"compiling {engine}" + (f" with {database}" if database else " (untuned)"))
            library = os.path.join(folder, f"{engine}.so")
            export_library(qmodel, library, target=target, db=database, mode=mode)
            result["latency_ms"][engine] = {}
            for count in threads:
                result["latency_ms"][engine][str(count)] = time_library(library, inputs_npz, count, seconds)
                say(f"{engine}, {count} thread(s): {result['latency_ms'][engine][str(count)]:.3f} ms")
        if onnx_runtime:
            _time_onnx_runtime(qmodel, folder, inputs_npz, threads, seconds, result, say)
        if openvino:
            _time_openvino(qmodel, folder, inputs_npz, threads, seconds, calib_data, result, say)
    int8 = result["latency_ms"]["tvmquant_int8"]
    result["speedup"] = {
        f"vs_{engine}": {count: times[count] / int8[count] for count in int8}
        for engine, times in result["latency_ms"].items()
        if engine != "tvmquant_int8"
    }
    return result


def _source_onnx(qmodel, folder) -> str | None:
    """The FP32 ONNX source written once into ``folder`` (ONNX Runtime and OpenVINO both read it), or None for a
    model quantized from a Relax module."""
    path = os.path.join(folder, "fp32.onnx")
    if not os.path.exists(path):
        source = qmodel.source_model()
        if source is None:
            return None
        import onnx

        onnx.save(source, path)
    return path


def _time_onnx_runtime(qmodel, folder, inputs_npz, threads, seconds, result, say) -> None:
    try:
        import onnxruntime  # noqa: F401
    except ImportError:
        result["skipped"]["onnxruntime"] = "onnxruntime is not installed (pip install onnxruntime)"
        return
    fp32_path = _source_onnx(qmodel, folder)
    if fp32_path is None:
        result["skipped"]["onnxruntime"] = "the model was quantized from a Relax module, not ONNX"
        return
    engines = [("ort_fp32", fp32_path)]
    qdq_path = os.path.join(folder, "int8_qdq.onnx")
    try:
        qmodel.export_onnx(qdq_path)
        engines.append(("ort_int8_qdq", qdq_path))
    except (ValueError, NotImplementedError) as err:
        result["skipped"]["ort_int8_qdq"] = f"QDQ export failed: {err}"
    for engine, path in engines:
        result["latency_ms"][engine] = {}
        for count in threads:
            result["latency_ms"][engine][str(count)] = time_onnx(path, inputs_npz, count, seconds)
            say(f"{engine}, {count} thread(s): {result['latency_ms'][engine][str(count)]:.3f} ms")


def _time_openvino(qmodel, folder, inputs_npz, threads, seconds, calib_data, result, say) -> None:
    try:
        import nncf  # noqa: F401
        import openvino  # noqa: F401
    except ImportError:
        result["skipped"]["openvino"] = "openvino/nncf are not installed (pip install openvino nncf)"
        return
    onnx_path = _source_onnx(qmodel, folder)
    if onnx_path is None:
        result["skipped"]["openvino"] = "the model was quantized from a Relax module, not ONNX"
        return
    if isinstance(calib_data, np.ndarray):  # one array (an .npy) for a one-input model
        calib_data = {qmodel.inputs[0].name: calib_data}
    if calib_data is None:
        batches = [random_inputs(qmodel.inputs, seed) for seed in range(16)]
        calib_data = {spec.name: np.concatenate([b[spec.name] for b in batches]) for spec in qmodel.inputs}
        result["openvino_calibration"] = "16 random batches (pass calib_data / --calib for the model's own)"
    else:
        result["openvino_calibration"] = f"{len(next(iter(calib_data.values())))} samples given"
    say("quantizing with NNCF for OpenVINO INT8")
    paths = openvino_models(onnx_path, calib_data, folder)
    for engine, path in paths.items():
        result["latency_ms"][engine] = {}
        for count in threads:
            result["latency_ms"][engine][str(count)] = time_openvino(path, inputs_npz, count, seconds)
            say(f"{engine}, {count} thread(s): {result['latency_ms'][engine][str(count)]:.3f} ms")


def format_table(result: dict) -> str:
    """The benchmark as a text table: one row per engine, one column per thread count, then the speed-ups."""
    counts = [str(t) for t in result["threads"]]
    header = ["engine", *[f"{c} thread{'s' if c != '1' else ''}" for c in counts]]
    rows = []
    for engine, times in result["latency_ms"].items():
        label = engine + ("" if result["tuned"].get(engine, True) else " (untuned)")
        rows.append([label, *[f"{times[c]:.3f} ms" for c in counts]])
    for name, ratios in result["speedup"].items():
        rows.append([f"INT8 speed-up {name}", *[f"{ratios[c]:.2f}x" for c in counts]])
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    lines = ["  ".join(cell.ljust(width) for cell, width in zip(row, widths)) for row in [header, *rows]]
    machine = result["machine"]
    lines.append(
        f"machine: {machine['cpu']} ({machine['llvm_mcpu']}, {machine['cores']} cores, "
        f"VNNI {'yes' if machine['avx512_vnni'] else 'no'}, AMX {'yes' if machine['amx_int8'] else 'no'})"
    )
    if not all(result["tuned"].values()):
        lines.append(
            "(untuned): default schedules, far from tuned speed; tune with `tvmquant tune ARTIFACT --db DIR` "
            "(FP32: `tvmquant tune MODEL.onnx --db DIR`) and pass --db / --fp32-db"
        )
    lines.extend(f"skipped {engine}: {reason}" for engine, reason in result["skipped"].items())
    return "\n".join(lines)
