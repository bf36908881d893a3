"""Export a calibrated model as a standard ONNX QDQ model (QuantizeLinear/DequantizeLinear).

The QDQ model is the source ONNX graph with:

- ``QuantizeLinear -> DequantizeLinear`` on every quantized activation, feeding the quantized ops;
- weights stored as int8 initializers behind a ``DequantizeLinear`` (per-channel scales with their axis);
- biases of quantized Conv/Gemm stored as int32 with scale ``scale_x * scale_w``, as ONNX Runtime expects.

Relax and ONNX name tensors differently. A quantized tensor of a layer whose ONNX node is known (the layer's
``source``) is that node's input, checked by value; otherwise it is matched by value: the FP32 ONNX model (every
intermediate exposed) and the annotated Relax model run on the same input, and a marked tensor maps to the ONNX
tensor of the same shape and values (within float rounding of the two runtimes, relative to the tensor's range)
that feeds a quantizable node.

A residual add of two quantized tensors is written as ``Sum`` (the same operator for two inputs) unless
``fused_adds=True``: ONNX Runtime fuses ``DequantizeLinear -> Add -> QuantizeLinear`` into ``QLinearAdd``, whose
x86 kernel approximates the scale ratios in 22-bit fixed point, so a few elements land one step away from the
ONNX definition (dequantize, add, quantize), which tvmquant computes; in a deep net (MobileNetV2) those steps
grow into a 22 dB difference on the logits. With ``Sum`` ONNX Runtime follows the definition and its output is
tvmquant's integer model bit for bit (the QLinearConv/QGemm kernels are exact with
:func:`tvmquant.testing.ort.ort_session`'s ``exact_int8``).
"""

from __future__ import annotations

import numpy as np

from .frontend.prepare import ModelError

_QUANTIZABLE = {"Conv", "MatMul", "Gemm", "Add", "Concat", "MaxPool", "AveragePool", "GlobalAveragePool", "ReduceMean"}
_NP_TO_ONNX = {np.dtype(np.int8): 3, np.dtype(np.uint8): 2, np.dtype(np.int32): 6}


def export_qdq(qmodel, path, sample=None, fused_adds: bool = False) -> None:
    """Write ``qmodel`` as a QDQ ONNX model to ``path`` (see the module docstring).

    Parameters
    ----------
    qmodel : QuantizedModel
        Quantized from an ONNX model (the source graph is needed).
    path : str or os.PathLike
    sample : dict, optional
        One input batch used to match tensors; a seeded random batch by default.
    fused_adds : bool
        Write residual adds as ``Add`` (ONNX Runtime then runs its approximate ``QLinearAdd``) instead of ``Sum``.
    """
    import onnx

    from ._io import atomic_write

    if qmodel.source is None:
        raise ModelError("ONNX export needs a model quantized from ONNX; this one came from a Relax IRModule")
    if qmodel.qdq is not None:
        model = onnx.load_from_string(qmodel.source)  # already QDQ: write it back as given
    else:
        model = _build_qdq(qmodel, sample, fused_adds)
    onnx.checker.check_model(model)
    atomic_write(path, lambda handle: handle.write(model.SerializeToString()))


def _run_onnx_all_tensors(model, feed: dict) -> dict:
    import onnx
    import onnxruntime as ort

    exposed = onnx.ModelProto()
    exposed.CopyFrom(model)
    existing = {out.name for out in exposed.graph.output}
    for node in exposed.graph.node:
        for name in node.output:
            if name and name not in existing:
                exposed.graph.output.append(onnx.ValueInfoProto(name=name))
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(exposed.SerializeToString(), options, providers=["CPUExecutionProvider"])
    names = [out.name for out in session.get_outputs()]
    values = session.run(names, feed)
    tensors = dict(zip(names, values, strict=True))
    tensors.update(feed)
    return tensors


def _relax_marked_tensors(qmodel, feed: dict) -> dict:
    from .passes.calibrate import compile_vm, observing, run_vm

    captured: dict = {}
    from .compile import host_build

    annotated = qmodel.annotated
    if qmodel.bias_corrections:  # match the ONNX model's FP32 tensors, which have the biases before correction
        from .passes.annotate import AnnotateQuant

        annotated = AnnotateQuant(qmodel.config)(qmodel.fp32)
    vm = compile_vm(annotated, build=host_build)
    with observing(lambda name, array: captured.__setitem__(name, array.copy())):  # views valid in the call only
        run_vm(vm, feed, qmodel.inputs)
    return captured


def _close(array, value) -> float:
    """How far ``array`` is from ``value``, relative to ``value``'s range (inf if shapes or dtypes differ)."""
    if array.shape != value.shape or array.dtype != value.dtype:
        return np.inf
    if value.size == 0:
        return 0.0
    span = float(np.max(np.abs(value))) if np.issubdtype(value.dtype, np.floating) else 1.0
    return float(np.max(np.abs(array.astype(np.float64) - value.astype(np.float64)))) / max(span, 1e-20)


#: Two runtimes computing the same FP32 tensor differ by float rounding (summation order); relative to the
#: tensor's largest magnitude that stays far below this, while distinct tensors differ by far more.
_MATCH_TOLERANCE = 1e-4


def _named_tensor(name: str, layers: dict, node_by_name: dict):
    """The ONNX input tensor behind a quantized tensor ``LAYER.inP`` (``LAYER.inP_J`` for concat), by the layer's
    source node, or None."""
    layer_name, _, slot = name.rpartition(".")
    layer = layers.get(layer_name)
    node = node_by_name.get(layer.source) if layer is not None and layer.source else None
    if node is None or not slot.startswith("in"):
        return None
    position, _, item = slot[2:].partition("_")
    if not position.isdigit() or (item and not item.isdigit()):
        return None
    index = int(item) if item else int(position)
    return node.input[index] if index < len(node.input) else None


def _build_qdq(qmodel, sample, fused_adds: bool = False):
    import onnx
    from onnx import helper, numpy_helper

    model = _fold_batchnorm(onnx.load_from_string(qmodel.source))
    graph = model.graph
    if sample is None:
        rng = np.random.default_rng(0)
        sample = {spec.name: rng.standard_normal(spec.shape).astype(spec.dtype) for spec in qmodel.inputs}
    onnx_tensors = _run_onnx_all_tensors(model, sample)
    relax_tensors = _relax_marked_tensors(qmodel, sample)
    inits = {init.name: init for init in graph.initializer}
    consumers: dict = {}
    order = {}
    for index, node in enumerate(graph.node):
        for output in node.output:
            order[output] = index
        for position, name in enumerate(node.input):
            consumers.setdefault(name, []).append((node, position))
    for spec in qmodel.inputs:
        order[spec.name] = -1

    layers = {layer.name: layer for layer in qmodel.layers if layer.quantized}
    new_nodes_after: dict = {}  # tensor name -> list of nodes to insert after its producer
    rewired: dict = {}  # (node id, position) -> new input name
    quantized_tensor: dict = {}  # onnx tensor name -> activation QParams

    # Activations: the layer's ONNX node input when the layer's node is known and the values agree; else match by
    # value, preferring tensors consumed by quantizable nodes, then the latest produced.
    all_layers = {layer.name: layer for layer in qmodel.layers}
    node_by_name = {node.name: node for node in graph.node if node.name}
    for name, params in sorted(qmodel.table.items()):
        if params.role != "activation" or name not in relax_tensors:
            continue
        value = relax_tensors[name]
        named = _named_tensor(name, all_layers, node_by_name)
        if named in onnx_tensors and named not in inits and _close(onnx_tensors[named], value) <= _MATCH_TOLERANCE:
            quantized_tensor[named] = params
            continue
        candidates = []
        for tensor, array in onnx_tensors.items():
            if tensor in inits:
                continue
            error = _close(array, value)
            if error <= _MATCH_TOLERANCE:
                feeds = any(node.op_type in _QUANTIZABLE for node, _ in consumers.get(tensor, []))
                candidates.append((feeds, order.get(tensor, -1), tensor))
        if not candidates:
            raise ModelError(
                f"ONNX export: no ONNX tensor matches quantized tensor {name!r} (shape {value.shape}); the ONNX "
                "source and the quantized model disagree on it"
            )
        tensor = max(candidates)[2]
        quantized_tensor[tensor] = params

    # A tensor read by a quantized layer and by a layer kept in FP32 (skip list): only the quantized one reads
    # the Q/DQ pair; the FP32 layer reads the FP32 tensor, as in tvmquant's model.
    fp32_nodes = {layer.source for layer in qmodel.layers if not layer.quantized and layer.source}
    fp32_nodes -= {layer.source for layer in qmodel.layers if layer.quantized and layer.source}
    for tensor, params in quantized_tensor.items():
        zero_dtype = np.uint8 if params.dtype == "uint8" else np.int8
        scale_name, zero_name = f"{tensor}_qdq_scale", f"{tensor}_qdq_zero_point"
        # Per-channel activations (a depthwise conv's input, NCHW channels): per-axis QuantizeLinear.
        shape, axis = ((-1,), {"axis": 1}) if params.axis is not None else ((), {})
        graph.initializer.extend(
            [
                numpy_helper.from_array(np.asarray(params.scale, np.float32).reshape(shape), scale_name),
                numpy_helper.from_array(np.asarray(params.zero_point).astype(zero_dtype).reshape(shape), zero_name),
            ]
        )
        new_nodes_after[tensor] = [
            helper.make_node(
                "QuantizeLinear",
                [tensor, scale_name, zero_name],
                [f"{tensor}_q"],
                name=f"{tensor}_QuantizeLinear",
                **axis,
            ),
            helper.make_node(
                "DequantizeLinear",
                [f"{tensor}_q", scale_name, zero_name],
                [f"{tensor}_dq"],
                name=f"{tensor}_DequantizeLinear",
                **axis,
            ),
        ]
        for node, position in consumers.get(tensor, []):
            if node.op_type in _QUANTIZABLE and node.name not in fp32_nodes:
                rewired[(id(node), position)] = f"{tensor}_dq"

    # Weights and biases of quantized Conv / Gemm / MatMul.
    relax_weights = {layer.weight: layer for layer in layers.values() if layer.weight}
    weight_values = _relax_weight_values(qmodel, relax_weights)
    for node in graph.node:
        if node.op_type not in ("Conv", "Gemm", "MatMul") or len(node.input) < 2 or node.input[1] not in inits:
            continue
        x_name = node.input[0]
        if x_name not in quantized_tensor:
            continue
        weight = numpy_helper.to_array(inits[node.input[1]])
        trans_b = node.op_type == "Gemm" and any(a.name == "transB" and a.i for a in node.attribute)
        as_relax = weight.T if trans_b else weight
        match = next(
            (w for w, v in weight_values.items() if v.shape == as_relax.shape and np.array_equal(v, as_relax)), None
        )
        if match is None:
            continue  # folded differently in Relax (e.g. BatchNorm): keep this weight in FP32
        params = qmodel.table[match]
        relax_axis = params.axis
        onnx_axis = None if relax_axis is None else (0 if (node.op_type == "Conv" or trans_b) else 1)
        from .quant_math import quantize

        weight_q = quantize(weight, params.scale, params.zero_point, "int8", onnx_axis, params.qmin, params.qmax)
        base = node.input[1]
        _add_dq(
            graph,
            new_nodes_after,
            "",
            base,
            weight_q,
            params.scale,
            np.zeros_like(params.zero_point, np.int8),
            onnx_axis,
        )
        rewired[(id(node), 1)] = f"{base}_int8_dq"
        correction = qmodel.bias_corrections.get(relax_weights[match].name)
        bias_slot = None
        if len(node.input) > 2 and node.input[2] in inits:
            bias_slot = (node, 2)
        elif node.op_type == "MatMul" and len(consumers.get(node.output[0], [])) == 1:
            add, position = consumers[node.output[0]][0]
            other = add.input[1 - position]
            if add.op_type == "Add" and other in inits and tuple(inits[other].dims) == (weight.shape[-1],):
                bias_slot = (add, 1 - position)  # MatMul + Add(bias), as exporters write a Linear layer
        if correction is not None:
            bias_slot = _corrected_bias(graph, inits, node, bias_slot, correction, new_nodes_after)
        if bias_slot is not None:
            bias_node, bias_position = bias_slot
            bias = numpy_helper.to_array(inits[bias_node.input[bias_position]])
            x_scale = quantized_tensor[x_name].scale_per_output(bias.shape[0] if bias.ndim else 1)
            w_scale = np.broadcast_to(np.asarray(params.scale, np.float32).reshape(-1), bias.shape)
            bias_scale = (x_scale * w_scale).astype(np.float32)
            with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
                bias_q = np.round(bias.astype(np.float64) / bias_scale.astype(np.float64))
            if not np.all(np.abs(bias_q) <= 2**31 - 1):
                continue  # no INT32 bias (a channel with a tiny weight scale): FP32, as tvmquant keeps it
            bias_q = bias_q.astype(np.int32)
            bias_name = bias_node.input[bias_position]
            _add_dq(graph, new_nodes_after, "", bias_name, bias_q, bias_scale, np.zeros(bias.shape, np.int32), 0)
            rewired[(id(bias_node), bias_position)] = f"{bias_name}_int8_dq"

    if not fused_adds:
        # Residual adds of two quantized tensors as Sum: ONNX Runtime runs it as defined (see the module docstring).
        for node in graph.node:
            dq_inputs = [rewired.get((id(node), position)) for position in range(len(node.input))]
            if node.op_type == "Add" and len(node.input) == 2 and all(dq_inputs):
                node.op_type = "Sum"

    # Rebuild the node list in order, inserting Q/DQ right after producers (graph inputs and weights first).
    nodes = []
    for tensor in [spec.name for spec in qmodel.inputs] + [""]:
        nodes.extend(new_nodes_after.pop(tensor, []))

    def emit(node):
        nodes.append(node)
        for output in node.output:
            for new in new_nodes_after.pop(output, []):
                emit(new)  # a bias correction's Add has Q/DQ nodes of its own after it

    for node in graph.node:
        for position, _ in enumerate(node.input):
            if (id(node), position) in rewired:
                node.input[position] = rewired[(id(node), position)]
        emit(node)
    del graph.node[:]
    graph.node.extend(nodes)
    _drop_unused_initializers(graph)
    if all(opset.version < 13 for opset in model.opset_import if opset.domain in ("", "ai.onnx")):
        raise ModelError("ONNX export needs opset >= 13 (per-channel DequantizeLinear)")
    return model


def _corrected_bias(graph, inits, node, bias_slot, correction, new_nodes_after):
    """Add a layer's bias correction to its ONNX bias (a Conv or Gemm without one gets one, a MatMul an FP32
    ``Add``); returns the bias slot to quantize to INT32, or None."""
    from onnx import helper, numpy_helper

    correction = np.asarray(correction, np.float32).reshape(-1)
    if bias_slot is not None:
        bias_node, position = bias_slot
        init = inits[bias_node.input[position]]
        bias = numpy_helper.to_array(init)
        corrected = (bias.astype(np.float32) + correction.reshape(bias.shape)).astype(bias.dtype)
        # A new initializer: the original may be shared with another node.
        name = f"{init.name}_corrected"
        graph.initializer.append(numpy_helper.from_array(corrected, name))
        inits[name] = graph.initializer[-1]
        bias_node.input[position] = name
        return bias_slot
    name = f"{node.name or node.output[0]}_bias_correction"
    graph.initializer.append(numpy_helper.from_array(correction, name))
    inits[name] = graph.initializer[-1]
    if node.op_type in ("Conv", "Gemm"):
        while len(node.input) < 2:
            node.input.append("")
        node.input.append(name)
        return (node, 2)
    output = node.output[0]
    node.output[0] = f"{output}_uncorrected"
    new_nodes_after.setdefault(node.output[0], []).append(
        helper.make_node("Add", [node.output[0], name], [output], name=f"{name}_Add")
    )
    return None


def _add_dq(graph, new_nodes_after, after, name, data, scale, zero_point, axis):
    from onnx import helper, numpy_helper

    scale = np.asarray(scale, np.float32)
    per_channel = scale.size > 1
    graph.initializer.extend(
        [
            numpy_helper.from_array(np.asarray(data), f"{name}_int8"),
            numpy_helper.from_array(scale.reshape(-1) if per_channel else scale.reshape(()), f"{name}_int8_scale"),
            numpy_helper.from_array(
                np.asarray(zero_point).reshape(-1) if per_channel else np.asarray(zero_point).reshape(()),
                f"{name}_int8_zero_point",
            ),
        ]
    )
    attrs = {"axis": int(axis)} if per_channel and axis is not None else {}
    new_nodes_after.setdefault(after, []).append(
        helper.make_node(
            "DequantizeLinear",
            [f"{name}_int8", f"{name}_int8_scale", f"{name}_int8_zero_point"],
            [f"{name}_int8_dq"],
            name=f"{name}_DequantizeLinear",
            **attrs,
        )
    )


def _relax_weight_values(qmodel, relax_weights: dict) -> dict:
    from ._compat import const_value, is_const
    from .passes.annotate import parse_marker

    values = {}
    for block in qmodel.annotated["main"].body.blocks:
        for binding in block.bindings:
            parsed = parse_marker(binding.value)
            if parsed is not None and parsed[1] in relax_weights and is_const(parsed[0]):
                values[parsed[1]] = const_value(parsed[0])
    return values


def _fold_batchnorm(model):
    """Fold BatchNormalization into the Conv before it (as Relax import does), so the weights match."""
    from onnx import numpy_helper

    graph = model.graph
    inits = {init.name: init for init in graph.initializer}
    producer = {out: node for node in graph.node for out in node.output}
    uses: dict = {}
    for node in graph.node:
        for name in node.input:
            uses[name] = uses.get(name, 0) + 1
    removed = []
    for bn in graph.node:
        if bn.op_type != "BatchNormalization" or len(bn.output) != 1:
            continue
        conv = producer.get(bn.input[0])
        if conv is None or conv.op_type != "Conv" or uses.get(conv.output[0]) != 1 or conv.input[1] not in inits:
            continue
        if not all(name in inits for name in bn.input[1:5]):
            continue
        gamma, beta, mean, var = (numpy_helper.to_array(inits[name]) for name in bn.input[1:5])
        epsilon = next((a.f for a in bn.attribute if a.name == "epsilon"), 1e-5)
        factor = (gamma / np.sqrt(var + np.float32(epsilon))).astype(np.float32)
        weight = numpy_helper.to_array(inits[conv.input[1]])
        bias = (
            numpy_helper.to_array(inits[conv.input[2]])
            if len(conv.input) > 2 and conv.input[2]
            else np.zeros(len(factor), np.float32)
        )
        new_weight = (weight * factor.reshape(-1, 1, 1, 1)).astype(np.float32)
        new_bias = ((bias - mean) * factor + beta).astype(np.float32)
        graph.initializer.extend(
            [
                numpy_helper.from_array(new_weight, f"{conv.input[1]}_bn_folded"),
                numpy_helper.from_array(new_bias, f"{bn.output[0]}_bn_bias"),
            ]
        )
        conv.input[1] = f"{conv.input[1]}_bn_folded"
        if len(conv.input) > 2:
            conv.input[2] = f"{bn.output[0]}_bn_bias"
        else:
            conv.input.append(f"{bn.output[0]}_bn_bias")
        conv.output[0] = bn.output[0]
        removed.append(bn)
    for node in removed:
        graph.node.remove(node)
    return model


def _drop_unused_initializers(graph) -> None:
    used = {name for node in graph.node for name in node.input}
    keep = [init for init in graph.initializer if init.name in used]
    del graph.initializer[:]
    graph.initializer.extend(keep)
