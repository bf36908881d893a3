"""ONNX model builders shared by the tests and the benchmarks (random, seeded weights; no torch)."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

#: ResNet-50's bottleneck stages: (blocks, width).
RESNET50_STAGES = ((3, 64), (4, 128), (6, 256), (3, 512))


def resnet_style(
    seed: int = 0, stages=((1, 8), (2, 16)), size: int = 32, classes: int = 10, graph_name: str = "resnet_style"
) -> onnx.ModelProto:
    """A ResNet-style net (``stages=RESNET50_STAGES, size=224, classes=1000`` is the ResNet-50-style benchmark
    model of ``bench/speed_x86.py``; the default a small one for tests): 7x7 stem, max pool,
    bottleneck blocks whose residual adds take a bias-carrying conv output (no ReLU) and a projection or identity
    shortcut, ReLU after each add, GAP, Gemm. Unnamed nodes, as in the benchmark model."""
    rng = np.random.default_rng(seed)
    nodes, inits = [], []
    counter = [0]

    def name(prefix):
        counter[0] += 1
        return f"{prefix}{counter[0]}"

    def conv(x, cin, cout, k, stride=1, relu=True):
        w = (rng.standard_normal((cout, cin, k, k)) * np.sqrt(2.0 / (cin * k * k))).astype(np.float32)
        b = (rng.standard_normal(cout) * 0.01).astype(np.float32)
        wn, bn, out = name("w"), name("b"), name("conv")
        inits.extend([numpy_helper.from_array(w, wn), numpy_helper.from_array(b, bn)])
        nodes.append(helper.make_node("Conv", [x, wn, bn], [out], pads=[k // 2] * 4, strides=[stride] * 2))
        if relu:
            nodes.append(helper.make_node("Relu", [out], [out + "_relu"]))
            return out + "_relu"
        return out

    x = conv("input", 3, stages[0][1], 7, 2)
    pooled = name("pool")
    nodes.append(helper.make_node("MaxPool", [x], [pooled], kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1]))
    x, cin = pooled, stages[0][1]
    for stage, (blocks, width) in enumerate(stages):
        for block in range(blocks):
            stride = 2 if block == 0 and stage > 0 else 1
            h = conv(x, cin, width, 1)
            h = conv(h, width, width, 3, stride)
            h = conv(h, width, width * 4, 1, relu=False)
            shortcut = conv(x, cin, width * 4, 1, stride, relu=False) if block == 0 else x
            added = name("add")
            nodes.append(helper.make_node("Add", [h, shortcut], [added]))
            nodes.append(helper.make_node("Relu", [added], [added + "_relu"]))
            x, cin = added + "_relu", width * 4
    gap, flat = name("gap"), name("flat")
    nodes.append(helper.make_node("GlobalAveragePool", [x], [gap]))
    nodes.append(helper.make_node("Flatten", [gap], [flat]))
    w = (rng.standard_normal((classes, cin)) * np.sqrt(1.0 / cin)).astype(np.float32)
    inits.extend([numpy_helper.from_array(w, "fc_w"), numpy_helper.from_array(np.zeros(classes, np.float32), "fc_b")])
    nodes.append(helper.make_node("Gemm", [flat, "fc_w", "fc_b"], ["logits"], transB=1))
    graph = helper.make_graph(
        nodes,
        graph_name,
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, [1, 3, size, size])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [1, classes])],
        initializer=inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model
