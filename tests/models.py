"""Small ONNX models built in code for the tests (no torch needed).

Weights are seeded random, scaled like trained nets (He init), so activations have realistic ranges.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from tvmquant.testing.models import resnet_style  # noqa: F401  (shared with bench/)


class _Graph:
    def __init__(self, seed: int):
        self.rng = np.random.default_rng(seed)
        self.nodes = []
        self.inits = []
        self.count = 0

    def name(self, prefix):
        self.count += 1
        return f"{prefix}{self.count}"

    def const(self, array, prefix="c"):
        name = self.name(prefix)
        self.inits.append(numpy_helper.from_array(np.asarray(array), name))
        return name

    def node(self, op, inputs, prefix=None, **attrs):
        out = self.name(prefix or op.lower())
        self.nodes.append(helper.make_node(op, inputs, [out], name=out, **attrs))
        return out

    def conv(self, x, cin, cout, k=3, stride=1, groups=1, bias=True):
        fan_in = cin // groups * k * k
        weight = (self.rng.standard_normal((cout, cin // groups, k, k)) * np.sqrt(2.0 / fan_in)).astype(np.float32)
        inputs = [x, self.const(weight, "w")]
        if bias:
            inputs.append(self.const((self.rng.standard_normal(cout) * 0.1).astype(np.float32), "b"))
        pad = k // 2
        return self.node("Conv", inputs, "conv", pads=[pad] * 4, strides=[stride, stride], group=groups)

    def batchnorm(self, x, channels):
        scale = (1.0 + 0.1 * self.rng.standard_normal(channels)).astype(np.float32)
        bias = (0.1 * self.rng.standard_normal(channels)).astype(np.float32)
        mean = (0.1 * self.rng.standard_normal(channels)).astype(np.float32)
        var = (1.0 + 0.1 * self.rng.random(channels)).astype(np.float32)
        return self.node(
            "BatchNormalization", [x, self.const(scale), self.const(bias), self.const(mean), self.const(var)], "bn"
        )

    def gemm(self, x, cin, cout):
        weight = (self.rng.standard_normal((cout, cin)) * np.sqrt(1.0 / cin)).astype(np.float32)
        bias = (self.rng.standard_normal(cout) * 0.1).astype(np.float32)
        return self.node("Gemm", [x, self.const(weight, "w"), self.const(bias, "b")], "gemm", transB=1)

    def model(self, inputs, outputs, opset=17):
        graph = helper.make_graph(self.nodes, "tvmquant_test", inputs, outputs, initializer=self.inits)
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
        model.ir_version = 8
        onnx.checker.check_model(model)
        return model


def _classifier_head(g: _Graph, x: str, channels: int, size: int) -> onnx.ModelProto:
    """GAP, Flatten and a 10-class Gemm (``logits``) on ``x``; the model with a ``[1, 3, size, size]`` input."""
    pooled = g.node("Flatten", [g.node("GlobalAveragePool", [x])])
    g.gemm(pooled, channels, 10)
    g.nodes[-1].output[0] = "logits"
    return g.model(
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, [1, 3, size, size])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [1, 10])],
    )


def residual_cnn(seed: int = 0, channels: int = 16, size: int = 16) -> onnx.ModelProto:
    """Conv+BN+ReLU stem, a residual block, a depthwise conv, ReLU6 (Clip), max pool, concat, GAP, Gemm."""
    g = _Graph(seed)
    x = "input"
    h = g.node("Relu", [g.batchnorm(g.conv(x, 3, channels, bias=False), channels)])
    # residual block
    r = g.node("Relu", [g.conv(h, channels, channels)])
    r = g.conv(r, channels, channels)
    h = g.node("Relu", [g.node("Add", [h, r])])
    # depthwise + pointwise with ReLU6
    lo, hi = g.const(np.array(0.0, np.float32)), g.const(np.array(6.0, np.float32))
    d = g.node("Clip", [g.conv(h, channels, channels, groups=channels), lo, hi])
    p = g.node("Relu", [g.conv(d, channels, channels, k=1)])
    m = g.node("MaxPool", [p], kernel_shape=[2, 2], strides=[2, 2])
    side = g.node("MaxPool", [h], kernel_shape=[2, 2], strides=[2, 2])
    c = g.node("Concat", [m, side], axis=1)
    c = g.node("Relu", [g.conv(c, 2 * channels, channels, k=1)])
    return _classifier_head(g, c, channels, size)


def transformer_block(
    seed: int = 0, seq: int = 16, dim: int = 32, heads: int = 2, batch: int | None = 1
) -> onnx.ModelProto:
    """A pre-norm transformer encoder block: LayerNorm, multi-head attention (MatMul x MatMul, Softmax),
    residual adds, LayerNorm, MLP with GELU (Erf form). Input and output ``[batch, seq, dim]``;
    ``batch=None`` makes the batch dimension symbolic (``"N"``)."""
    reshape_batch = -1 if batch is None else batch
    batch = "N" if batch is None else batch
    g = _Graph(seed)
    head_dim = dim // heads

    def linear(x, cin, cout):
        weight = (g.rng.standard_normal((cin, cout)) * np.sqrt(1.0 / cin)).astype(np.float32)
        bias = (g.rng.standard_normal(cout) * 0.05).astype(np.float32)
        return g.node("Add", [g.node("MatMul", [x, g.const(weight, "w")]), g.const(bias, "b")])

    def layer_norm(x):
        return g.node(
            "LayerNormalization",
            [x, g.const(np.ones(dim, np.float32)), g.const(np.zeros(dim, np.float32))],
            axis=-1,
            epsilon=1e-5,
        )

    def split_heads(x):
        shape = g.const(np.array([reshape_batch, seq, heads, head_dim], np.int64))
        return g.node("Transpose", [g.node("Reshape", [x, shape])], perm=[0, 2, 1, 3])

    x = "input"
    h = layer_norm(x)
    q, k, v = (split_heads(linear(h, dim, dim)) for _ in range(3))
    scores = g.node("MatMul", [q, g.node("Transpose", [k], perm=[0, 1, 3, 2])])
    scores = g.node("Mul", [scores, g.const(np.array(1.0 / np.sqrt(head_dim), np.float32))])
    attn = g.node("MatMul", [g.node("Softmax", [scores], axis=-1), v])
    attn = g.node(
        "Reshape",
        [g.node("Transpose", [attn], perm=[0, 2, 1, 3]), g.const(np.array([reshape_batch, seq, dim], np.int64))],
    )
    x = g.node("Add", [x, linear(attn, dim, dim)])
    h = linear(layer_norm(x), dim, 4 * dim)
    gelu = g.node(
        "Mul",
        [
            g.node("Mul", [h, g.const(np.array(0.5, np.float32))]),
            g.node(
                "Add",
                [
                    g.node("Erf", [g.node("Div", [h, g.const(np.array(np.sqrt(2.0), np.float32))])]),
                    g.const(np.array(1.0, np.float32)),
                ],
            ),
        ],
    )
    g.node("Add", [x, linear(gelu, 4 * dim, dim)])
    g.nodes[-1].output[0] = "output"
    return g.model(
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, [batch, seq, dim])],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, [batch, seq, dim])],
    )


def inverted_residual_cnn(seed: int = 0, channels: int = 16, size: int = 16) -> onnx.ModelProto:
    """MobileNetV2-style: a ReLU6 stem whose channels span 40x in range, then two inverted-residual blocks
    (1x1 expand + ReLU6, 3x3 depthwise + ReLU6, 1x1 project; the second with stride 2 and a channel multiplier
    of 2), GAP and Gemm. Each depthwise conv reads only its ReLU6 input: what per-channel activation scales take."""
    g = _Graph(seed)
    lo, hi = g.const(np.array(0.0, np.float32)), g.const(np.array(6.0, np.float32))
    stem = g.conv("input", 3, channels)
    gains = np.geomspace(0.01, 3.0, channels).astype(np.float32)  # trained stems: some channels 40x the others
    g.rng.shuffle(gains)
    h = g.node("Clip", [g.node("Mul", [stem, g.const(gains.reshape(1, channels, 1, 1))]), lo, hi])
    d = g.node("Clip", [g.conv(h, channels, channels, groups=channels), lo, hi])
    h = g.conv(d, channels, channels, k=1)
    e = g.node("Clip", [g.conv(h, channels, 2 * channels, k=1), lo, hi])
    d = g.node("Clip", [g.conv(e, 2 * channels, 4 * channels, stride=2, groups=2 * channels), lo, hi])
    h = g.conv(d, 4 * channels, channels, k=1)
    return _classifier_head(g, h, channels, size)


def residual_cnn_dynamic_batch(**kwargs) -> onnx.ModelProto:
    """:func:`residual_cnn` with a symbolic batch axis (``N``) on its input and output."""
    model = residual_cnn(**kwargs)
    for value in list(model.graph.input) + list(model.graph.output):
        dim = value.type.tensor_type.shape.dim[0]
        dim.ClearField("dim_value")
        dim.dim_param = "N"
    onnx.checker.check_model(model)
    return model


def calibration_images(count: int, size: int = 16, seed: int = 1) -> np.ndarray:
    """Smooth random images (low-frequency noise), more image-like than white noise."""
    rng = np.random.default_rng(seed)
    coarse = rng.standard_normal((count, 3, size // 4, size // 4)).astype(np.float32)
    images = coarse.repeat(4, axis=2).repeat(4, axis=3)
    return (images + 0.3 * rng.standard_normal(images.shape)).astype(np.float32)


def dynamic_pad_conv() -> onnx.ModelProto:
    """A conv whose 'same' padding is computed at run time from the input shape (as exporters leave it)."""
    weight = np.random.default_rng(0).standard_normal((4, 3, 3, 3)).astype(np.float32)
    nodes = [
        helper.make_node("Shape", ["x"], ["shape"]),
        helper.make_node("Slice", ["shape", "start", "end"], ["hw"]),
        helper.make_node("Sub", ["hw", "hw"], ["zeros"]),
        helper.make_node("Add", ["zeros", "one"], ["ones"]),
        helper.make_node("Concat", ["head", "ones"], ["pads"], axis=0),
        helper.make_node("Pad", ["x", "pads"], ["padded"], name="same_pad"),
        helper.make_node("Conv", ["padded", "weight"], ["y"], name="conv"),
    ]
    inits = {
        "start": np.array([2], np.int64),
        "end": np.array([4], np.int64),
        "one": np.array([1, 1], np.int64),
        "head": np.array([0, 0, 1, 1, 0, 0], np.int64),
        "weight": weight,
    }
    graph = helper.make_graph(
        nodes,
        "dynamic_pad",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4, 8, 8])],
        initializer=[numpy_helper.from_array(v, k) for k, v in inits.items()],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def tiny_cnn(seed: int = 0, channels: int = 8, size: int = 8, classes: int = 5) -> onnx.ModelProto:
    """Conv+ReLU, conv+ReLU6 (Clip), global average pool, Gemm; a symbolic batch axis: for fine-tuning tests."""
    g = _Graph(seed)
    h = g.node("Relu", [g.conv("input", 3, channels)])
    lo, hi = g.const(np.array(0.0, np.float32)), g.const(np.array(6.0, np.float32))
    h = g.node("Clip", [g.conv(h, channels, channels), lo, hi])
    h = g.node("Flatten", [g.node("GlobalAveragePool", [h])])
    out = g.gemm(h, channels, classes)
    inputs = [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 3, size, size])]
    outputs = [helper.make_tensor_value_info(out, TensorProto.FLOAT, ["N", classes])]
    return g.model(inputs, outputs)


def tiny_linear(seed: int = 0, features: int = 6, outputs: int = 4) -> onnx.ModelProto:
    """One Gemm layer with a static batch of 8: the smallest quantized graph, for gradient tests."""
    g = _Graph(seed)
    out = g.gemm("input", features, outputs)
    inputs = [helper.make_tensor_value_info("input", TensorProto.FLOAT, [8, features])]
    outs = [helper.make_tensor_value_info(out, TensorProto.FLOAT, [8, outputs])]
    return g.model(inputs, outs)
