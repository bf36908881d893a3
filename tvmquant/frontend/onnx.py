"""ONNX in: parse a file or ``onnx.ModelProto`` and import it into Relax with clear errors.

``onnx`` and TVM's ONNX importer load lazily here, so ``import tvmquant`` stays cheap.
"""

from __future__ import annotations

import contextlib
import io
import json
import os

from .._io import InputSpec
from .._relax import OUTPUT_KEY, OUTPUT_NAMES_ATTR, SOURCE_NAMES_ATTR
from ..quant_math import DTYPE_RANGES
from .prepare import ModelError

#: ONNX ops whose results can be quantizable layers; their Relax results are named after the ONNX node.
_LAYER_ONNX_OPS = frozenset(
    {"Conv", "MatMul", "Gemm", "Add", "Concat", "MaxPool", "AveragePool", "GlobalAveragePool", "ReduceMean"}
)

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
        model = onnx.load(path, load_external_data=False)
    except Exception as err:  # onnx raises DecodeError and others
        raise ModelError(f"{path!r} is not a valid ONNX file ({type(err).__name__}: {err}); re-export it") from None
    _check_external_data(model, path)
    try:
        onnx.load_external_data_for_model(model, os.path.dirname(os.path.abspath(path)))
    except Exception as err:
        raise ModelError(f"{path!r}: its external tensor data does not load ({type(err).__name__}: {err})") from None
    return model


def _check_external_data(model, path: str) -> None:
    """Every external-data file of ``model`` exists beside ``path``, inside its folder, and is long enough."""
    from onnx.external_data_helper import ExternalDataInfo, uses_external_data

    folder = os.path.dirname(os.path.abspath(path))
    tensors = list(model.graph.initializer)
    for node in model.graph.node:
        tensors.extend(attr.t for attr in node.attribute if attr.HasField("t"))
    for tensor in tensors:
        if not uses_external_data(tensor):
            continue
        info = ExternalDataInfo(tensor)
        location = os.path.normpath(os.path.join(folder, info.location))
        if os.path.isabs(info.location) or not location.startswith(folder + os.sep):
            raise ModelError(
                f"{path!r}: tensor {tensor.name!r} points at external data {info.location!r} outside the model's "
                "folder; refusing it"
            )
        if not os.path.isfile(location):
            raise ModelError(
                f"{path!r}: tensor {tensor.name!r} keeps its data in {info.location!r}, which is missing; put that "
                f"file next to the model (in {folder!r}) or re-export with the weights inside the .onnx"
            )
        end = (info.offset or 0) + (info.length or 0)
        if info.length and os.path.getsize(location) < end:
            raise ModelError(
                f"{path!r}: external data file {info.location!r} is {os.path.getsize(location)} bytes, tensor "
                f"{tensor.name!r} needs bytes up to {end}: the file is truncated; copy it again"
            )


class BatchNotice(UserWarning):
    """A dynamic batch axis was bound to a static batch size (the message says which, and how to choose)."""


def input_specs(model, batch_size: int | None = None) -> list:
    """The graph inputs that are not initializers, with a dynamic axis 0 bound to ``batch_size``.

    With ``batch_size=None`` a dynamic batch axis is bound to 1, and a :class:`BatchNotice` says so.
    """
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
                if batch_size is None:
                    import warnings

                    warnings.warn(
                        f"input {value.name!r} has a dynamic batch axis ({dim.dim_param or '?'}): bound to batch 1; "
                        "choose another with batch_size=N (--batch-size N), here or when compiling",
                        BatchNotice,
                        stacklevel=2,
                    )
                dims.append(batch_size or 1)
            else:
                raise ModelError(
                    f"input {value.name!r} has a dynamic dimension {axis} ({dim.dim_param or '?'}); "
                    "only the batch axis may be dynamic: export with a fixed shape"
                )
        dtype = onnx.helper.tensor_dtype_to_np_dtype(tensor_type.elem_type).name
        specs.append(InputSpec(value.name, tuple(dims), dtype))
    return specs


def _two_input_sums_as_adds(model):
    """``Sum`` of two inputs as ``Add`` (the same operator), on a copy: tvmquant's QDQ export writes residual adds
    as ``Sum`` (see :mod:`tvmquant.export`), and TVM's importer lowers ``Sum`` to a form its layout passes reject."""
    if not any(node.op_type == "Sum" and len(node.input) == 2 for node in model.graph.node):
        return model
    import onnx

    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    for node in copy.graph.node:
        if node.op_type == "Sum" and len(node.input) == 2:
            node.op_type = "Add"
    return copy


def import_onnx(model, batch_size: int | None = None, where: str = "the ONNX model", check: bool = True):
    """Import ONNX into Relax with weights as constants.

    ``check=False`` skips the ONNX checker that TVM's importer runs first (it only warns; a model imported
    before need not be checked again).

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
    model = _two_input_sums_as_adds(fold_conv_batchnorm(model))
    from tvm.relax.frontend.onnx import from_onnx

    shape_dict = {spec.name: list(spec.shape) for spec in specs}
    dtype_dict = {spec.name: spec.dtype for spec in specs}
    source_names: dict = {}

    def convert(graph):
        source_names.clear()
        with _naming_layers(source_names), _onnx_checker(check):
            return from_onnx(graph, shape_dict=shape_dict, dtype_dict=dtype_dict, keep_params_in_input=False)

    def convert_folded(folded):
        try:
            return convert(folded)
        except Exception as err:
            raise _import_error(folded, err, where) from None

    try:
        mod = convert(model)
    except Exception as err:
        folded = _constant_fold(model, specs)
        if folded is None:
            raise _import_error(model, err, where) from None
        mod = convert_folded(folded)
    if _has_match_cast(mod):
        # Shapes computed from a dynamic batch (the dynamo exporter's attention-mask Range over the batch) import
        # as run-time shapes; with the batch bound they are constants, which ONNX Runtime's folding computes.
        folded = _constant_fold(model, specs)
        if folded is not None:
            mod = convert_folded(folded)
    # The graph's outputs lose their variable names (the output binding is canonicalized to `gv`): keep the
    # producing node of each output under a positional key.
    producers = {output: node.name for node in model.graph.node for output in node.output}
    by_name = {node.name: node.op_type for node in model.graph.node}
    for index, output in enumerate(model.graph.output):
        node_name = producers.get(output.name)
        if node_name and by_name.get(node_name) in _LAYER_ONNX_OPS:
            source_names[f"{OUTPUT_KEY}{index}"] = node_name
    main = mod["main"].with_attr(SOURCE_NAMES_ATTR, json.dumps(source_names))
    mod["main"] = main.with_attr(OUTPUT_NAMES_ATTR, json.dumps([output.name for output in model.graph.output]))
    return mod, specs


@contextlib.contextmanager
def _onnx_checker(enabled: bool):
    """With ``enabled`` False, ``onnx.checker.check_model`` does nothing in the block (TVM's ``from_onnx`` calls
    it on every import, serializing the whole model: 0.26 s for a 100 MB ResNet-50)."""
    if enabled:
        yield
        return
    import onnx.checker

    original = onnx.checker.check_model
    onnx.checker.check_model = lambda *args, **kwargs: None
    try:
        yield
    finally:
        onnx.checker.check_model = original


def _has_match_cast(mod) -> bool:
    from tvm import relax

    body = mod["main"].body
    return any(isinstance(b, relax.MatchCast) for block in body.blocks for b in block.bindings)


def fold_conv_batchnorm(model):
    """A copy of ``model`` with each inference-mode BatchNormalization folded into the Conv before it.

    TVM folds BatchNorm too (``FoldBatchnormToConv2D``), but its rewritten conv loses the variable that carries
    the ONNX node's name; folding here keeps the Conv node, and so its name. Same arithmetic:
    ``w' = w * gamma / sqrt(var + eps)``, ``b' = (b - mean) * gamma / sqrt(var + eps) + beta``.
    """
    import numpy as np
    import onnx
    from onnx import numpy_helper

    inits = {init.name: init for init in model.graph.initializer}
    consumers: dict = {}
    for node in model.graph.node:
        for name in node.input:
            consumers[name] = consumers.get(name, 0) + 1
    graph_outputs = {output.name for output in model.graph.output}
    producer = {node.output[0]: node for node in model.graph.node if node.output}
    folded, drop = {}, set()
    for node in model.graph.node:
        if node.op_type != "BatchNormalization" or len(node.input) != 5 or len(node.output) != 1:
            continue
        conv = producer.get(node.input[0])
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        if (
            conv is None
            or conv.op_type != "Conv"
            or consumers.get(conv.output[0]) != 1
            or conv.output[0] in graph_outputs
            or attrs.get("training_mode", 0)
            or not all(name in inits for name in list(node.input[1:]) + list(conv.input[1:]))
        ):
            continue
        gamma, beta, mean, var = (numpy_helper.to_array(inits[name]).astype(np.float64) for name in node.input[1:])
        weight = numpy_helper.to_array(inits[conv.input[1]])
        bias = numpy_helper.to_array(inits[conv.input[2]]).astype(np.float64) if len(conv.input) > 2 else 0.0
        factor = gamma / np.sqrt(var + float(attrs.get("epsilon", 1e-5)))
        new_weight = (weight * factor.reshape((-1,) + (1,) * (weight.ndim - 1))).astype(weight.dtype)
        new_bias = ((bias - mean) * factor + beta).astype(weight.dtype)
        folded[conv.name or conv.output[0]] = (conv, node, new_weight, new_bias)
        drop.add(id(node))
    if not folded:
        return model
    result = onnx.ModelProto()
    result.CopyFrom(model)
    del result.graph.node[:]
    for node in model.graph.node:
        if id(node) in drop:
            continue
        key = node.name or (node.output[0] if node.output else "")
        if node.op_type == "Conv" and key in folded:
            _, bn, new_weight, new_bias = folded[key]
            weight_name, bias_name = f"{key}.folded_weight", f"{key}.folded_bias"
            result.graph.initializer.extend(
                [numpy_helper.from_array(new_weight, weight_name), numpy_helper.from_array(new_bias, bias_name)]
            )
            new = onnx.NodeProto()
            new.CopyFrom(node)
            del new.input[:]
            new.input.extend([node.input[0], weight_name, bias_name])
            del new.output[:]
            new.output.extend(bn.output)
            result.graph.node.append(new)
        else:
            result.graph.node.append(node)
    used = {name for node in result.graph.node for name in node.input}
    kept = [init for init in result.graph.initializer if init.name in used]
    del result.graph.initializer[:]
    result.graph.initializer.extend(kept)
    return result


@contextlib.contextmanager
def _naming_layers(source_names: dict):
    """Within the block, TVM's ONNX importer binds the result of each layer-like node to a variable named after
    the node, and records ``{variable name: ONNX node name}`` in ``source_names``.

    TVM's importer keeps no node names; without them a user could only skip layers by tvmquant's own names
    (``conv2d_3``), not by the names Netron shows. Relax passes keep variable names, so the names survive.
    """
    from tvm import relax
    from tvm.relax.frontend.onnx import onnx_frontend

    importer = onnx_frontend.ONNXGraphImporter
    convert = importer._convert_operator

    def convert_and_name(self, op_name, inputs, attrs, opset):
        result = convert(self, op_name, inputs, attrs, opset)
        node_name = attrs.get("tvm_custom", {}).get("name") if isinstance(attrs, dict) else None
        if op_name not in _LAYER_ONNX_OPS:
            node_name = None
        if node_name and isinstance(result, relax.Call):
            identifier = "".join(c if c.isalnum() else "_" for c in node_name).strip("_")
            var = self.bb.emit(result, name_hint=f"onnx_{identifier}")
            source_names[var.name] = node_name
            return var
        return result

    importer._convert_operator = convert_and_name
    try:
        # TVM's importer prints "Error converting operator ..." with the whole graph's metadata before it raises;
        # tvmquant retries on a folded graph or raises its own one-line ModelError instead.
        with contextlib.redirect_stdout(io.StringIO()):
            yield
    finally:
        importer._convert_operator = convert


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
    # Recorded shapes keep the dynamic batch (and the dynamo exporter repeats the outputs there, which ONNX
    # Runtime refuses as duplicate definitions): let ONNX Runtime infer them again.
    del fixed.graph.value_info[:]
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
            if zero_point.dtype.name in DTYPE_RANGES:
                low, high = DTYPE_RANGES[zero_point.dtype.name]
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
