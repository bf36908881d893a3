"""ONNX in: parse a file or ``onnx.ModelProto`` and import it into Relax with clear errors.

``onnx`` and TVM's ONNX importer load lazily here, so ``import tvmquant`` stays cheap.
"""

from __future__ import annotations

import os

from .._io import InputSpec
from .prepare import ModelError

#: Quantized-operator ONNX ops that TVM's importer does not take (QOperator format).
QOPERATOR_OPS = ("QLinearConv", "QLinearMatMul", "ConvInteger", "MatMulInteger", "QLinearAdd", "QLinearMul")


def load_onnx_model(model):
    """An ``onnx.ModelProto`` from a path or a ModelProto, with an error naming the file if it does not parse."""
    import onnx

    if isinstance(model, onnx.ModelProto):
        return model
    path = os.fspath(model)
    if not os.path.exists(path):
        raise ModelError(f"ONNX file {path!r} does not exist")
    try:
        return onnx.load(path)
    except Exception as err:  # onnx raises DecodeError and others
        raise ModelError(f"{path!r} is not a valid ONNX file ({type(err).__name__}: {err}); re-export it") from None


def input_specs(model, batch_size: int = 1) -> list:
    """The graph inputs that are not initializers, with dynamic dims replaced by ``batch_size`` on axis 0."""
    import onnx

    initializers = {init.name for init in model.graph.initializer}
    specs = []
    for value in model.graph.input:
        if value.name in initializers:
            continue
        tensor_type = value.type.tensor_type
        dims = []
        for axis, dim in enumerate(tensor_type.shape.dim):
            if dim.HasField("dim_value") and dim.dim_value > 0:
                dims.append(int(dim.dim_value))
            elif axis == 0:
                dims.append(batch_size)
            else:
                raise ModelError(
                    f"input {value.name!r} has a dynamic dimension {axis} ({dim.dim_param or '?'}); "
                    "only the batch axis may be dynamic: export with a fixed shape"
                )
        dtype = onnx.helper.tensor_dtype_to_np_dtype(tensor_type.elem_type).name
        specs.append(InputSpec(value.name, tuple(dims), dtype))
    return specs


def import_onnx(model, batch_size: int = 1, where: str = "the ONNX model"):
    """Import ONNX into Relax with weights as constants.

    Returns
    -------
    mod : tvm.IRModule
    inputs : list of InputSpec
    """
    model = load_onnx_model(model)
    bad = sorted({node.op_type for node in model.graph.node if node.op_type in QOPERATOR_OPS})
    if bad:
        node = next(n for n in model.graph.node if n.op_type in QOPERATOR_OPS)
        raise ModelError(
            f"{where} uses QOperator-format ops {bad} (first: node {node.name!r}), which TVM's importer does not "
            "take; re-export it in QDQ format (onnxruntime quantize_static(..., quant_format=QuantFormat.QDQ)) "
            "or pass the FP32 model to tvmquant"
        )
    specs = input_specs(model, batch_size)
    check_qdq_nodes(model, where)
    from tvm.relax.frontend.onnx import from_onnx

    shape_dict = {spec.name: list(spec.shape) for spec in specs}
    dtype_dict = {spec.name: spec.dtype for spec in specs}
    try:
        mod = from_onnx(model, shape_dict=shape_dict, dtype_dict=dtype_dict, keep_params_in_input=False)
    except Exception as err:
        folded = _constant_fold(model, specs)
        if folded is None:
            raise _import_error(model, err, where) from None
        try:
            mod = from_onnx(folded, shape_dict=shape_dict, dtype_dict=dtype_dict, keep_params_in_input=False)
        except Exception as err2:
            raise _import_error(folded, err2, where) from None
    return mod, specs


def _import_error(model, err, where: str) -> ModelError:
    message = str(err).strip().splitlines()
    detail = message[-1] if message else type(err).__name__
    culprit = _first_dynamic_pad(model)
    hint = f" (node {culprit!r} computes its pads at run time)" if culprit else ""
    return ModelError(
        f"TVM's ONNX importer could not take {where}{hint}: {detail}. Export with static shapes "
        "(torch.onnx.export(..., dynamo=True) folds such shape computations), or constant-fold the model first"
    )


def _first_dynamic_pad(model) -> str | None:
    constants = {init.name for init in model.graph.initializer}
    constants |= {out for node in model.graph.node if node.op_type == "Constant" for out in node.output}
    for node in model.graph.node:
        if node.op_type == "Pad" and len(node.input) > 1 and node.input[1] not in constants:
            return node.name or node.output[0]
    return None


def _constant_fold(model, specs):
    """Fold shape computations of known shapes with ONNX Runtime's basic graph optimizations, if installed.

    Exporters leave e.g. "same" padding as a run-time computation on the input shape; with static input
    shapes it is constant, but TVM's importer refuses it ("Dynamic pads are not supported yet").
    """
    try:
        import onnx
        import onnxruntime as ort
    except ImportError:
        return None
    import tempfile

    fixed = onnx.ModelProto()
    fixed.CopyFrom(model)
    by_name = {spec.name: spec for spec in specs}
    for value in fixed.graph.input:
        if value.name in by_name:
            for dim, size in zip(value.type.tensor_type.shape.dim, by_name[value.name].shape, strict=False):
                dim.ClearField("dim_param")
                dim.dim_value = size
    with tempfile.TemporaryDirectory() as folder:
        source, target = os.path.join(folder, "in.onnx"), os.path.join(folder, "folded.onnx")
        onnx.save(fixed, source)
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
        options.optimized_model_filepath = target
        try:
            ort.InferenceSession(source, options, providers=["CPUExecutionProvider"])
            return onnx.load(target)
        except Exception:  # noqa: BLE001 - folding is a best effort; the original error is reported
            return None


def check_qdq_nodes(model, where: str = "the ONNX model") -> None:
    """Refuse QuantizeLinear/DequantizeLinear nodes with inconsistent constant parameters, naming the node."""
    import numpy as np
    from onnx import numpy_helper

    inits = {init.name: init for init in model.graph.initializer}
    ranges = {np.dtype(np.int8): (-128, 127), np.dtype(np.uint8): (0, 255), np.dtype(np.int32): (-(2**31), 2**31 - 1)}
    for node in model.graph.node:
        if node.op_type not in ("QuantizeLinear", "DequantizeLinear") or len(node.input) < 2:
            continue
        name = f"{node.op_type} node {node.name or node.output[0]!r} in {where}"
        if node.input[1] not in inits:
            continue
        scale = numpy_helper.to_array(inits[node.input[1]])
        if not np.all(np.isfinite(scale)) or np.any(scale <= 0):
            raise ModelError(f"{name}: scale must be positive and finite, got {scale.ravel()[:4]}")
        if len(node.input) > 2 and node.input[2] in inits:
            zero_point = numpy_helper.to_array(inits[node.input[2]])
            if zero_point.dtype in ranges:
                low, high = ranges[zero_point.dtype]
                if np.any(zero_point.astype(np.int64) < low) or np.any(zero_point.astype(np.int64) > high):
                    raise ModelError(f"{name}: zero point outside the {zero_point.dtype} range")
            if zero_point.size != scale.size:
                raise ModelError(f"{name}: {scale.size} scales but {zero_point.size} zero points")
        if scale.size > 1 and node.input[0] in inits:
            dims = list(inits[node.input[0]].dims)
            axis = next((a.i for a in node.attribute if a.name == "axis"), 1)
            axis = axis % len(dims) if dims else 0
            if not dims or dims[axis] != scale.size:
                raise ModelError(
                    f"{name}: {scale.size} per-channel scales on axis {axis}, but tensor {node.input[0]!r} has "
                    f"shape {dims}; the axis must be the output-channel axis"
                )
