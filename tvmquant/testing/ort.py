"""ONNX Runtime helpers for tests and benchmarks: static QDQ quantization as a baseline (onnxruntime is a dev extra).

Used by the accuracy and speed benchmarks so that every table compares tvmquant with ORT on the same
calibration and evaluation data.
"""

from __future__ import annotations

import os
import tempfile

import numpy as np


class _Reader:
    def __init__(self, input_name: str, samples: np.ndarray):
        self.items = iter([{input_name: sample[None]} for sample in samples])

    def get_next(self):
        return next(self.items, None)


def ort_quantize(
    model_path: str,
    calib: np.ndarray,
    method: str = "minmax",
    per_channel: bool = True,
    percentile: float = 99.99,
    activation_type: str = "uint8",
    out_dir: str | None = None,
) -> str:
    """Quantize ``model_path`` with ``onnxruntime.quantization.quantize_static``; return the QDQ file path."""
    import onnx
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    model = onnx.load(model_path)
    input_name = model.graph.input[0].name
    folder = out_dir or tempfile.mkdtemp(prefix="ort-q-")
    pre = os.path.join(folder, "pre.onnx")
    quant_pre_process(model_path, pre, skip_symbolic_shape=True)
    out = os.path.join(folder, f"q_{method}.onnx")
    calibrate_method = {
        "minmax": CalibrationMethod.MinMax,
        "percentile": CalibrationMethod.Percentile,
        "entropy": CalibrationMethod.Entropy,
    }[method]
    extra = {"CalibPercentile": percentile} if method == "percentile" else {}
    quantize_static(
        pre,
        out,
        _Reader(input_name, calib),
        quant_format=QuantFormat.QDQ,
        per_channel=per_channel,
        activation_type=QuantType.QUInt8 if activation_type == "uint8" else QuantType.QInt8,
        weight_type=QuantType.QInt8,
        calibrate_method=calibrate_method,
        extra_options=extra,
    )
    return out


# ONNX Runtime's session option (kOrtSessionOptionsAvx2PrecisionMode) that keeps its u8s8 integer kernels exact on
# x86 CPUs without VNNI; the Python package exposes no constant for it.
_X64_QUANT_PRECISION = "session.x64quantprecision"


def ort_session(path: str, threads: int = 2, optimize: bool = True, exact_int8: bool = True):
    """An ONNX Runtime CPU session; ``optimize=False`` runs the graph as written (no kernel fusion), which
    follows the ONNX operator definitions exactly.

    ``exact_int8`` (the default) makes ORT's fused integer kernels (QLinearConv, QGemm, ...) accumulate exactly in
    INT32 on every x86 CPU. Without it their result depends on the CPU: where there is no VNNI (AVX2, AVX-512
    without VNNI), MLAS multiplies uint8 activations by int8 weights with ``vpmaddubsw``, which saturates each
    sum of two adjacent products to int16 (255 * 127 * 2 > 32767), and outputs of per-channel models move by
    several quantization steps. The option has ORT shift such weights to uint8 (u8u8 kernels, no saturation) on
    those CPUs only; on CPUs with VNNI, and on other architectures, it changes nothing.
    """
    import onnxruntime as ort

    options = ort.SessionOptions()
    if not optimize:
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    if exact_int8:
        options.add_session_config_entry(_X64_QUANT_PRECISION, "1")
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    return ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])


def ort_predict(path: str, images: np.ndarray, batch: int = 100) -> np.ndarray:
    """Logits of the ONNX model on ``images`` (batched when the model's batch axis is dynamic)."""
    session = ort_session(path)
    name = session.get_inputs()[0].name
    dim0 = session.get_inputs()[0].shape[0]
    step = batch if not isinstance(dim0, int) else dim0
    outputs = [session.run(None, {name: images[i : i + step]})[0] for i in range(0, len(images), step)]
    return np.concatenate(outputs, axis=0)
