"""Property-based tests (hypothesis): random small ONNX DAGs, random configs, three properties.

The strategy :func:`graphs` builds float32 NCHW ONNX models (batch 1, spatial 6..12, channels 1..12) out of
Conv (plain, depthwise, grouped, strided, padded with asymmetric pads), Add of two equal-shaped branches, Concat
on the channel axis, MaxPool / AveragePool / GlobalAveragePool, Relu / Clip(0, 6), Reshape, and a
Flatten + MatMul/Gemm head. Weights are seeded from a drawn integer. :func:`configs` draws affine or symmetric
activations, per-channel or per-tensor weights and (given the layer names) a skip list.

Properties:

1. the realized integer model equals the simulated (fake-quant) model within 1 LSB at every quantized tensor,
   each layer fed the simulated model's inputs (``tvmquant.testing.forcing``);
2. the QDQ export, run by ONNX Runtime, gives tvmquant's integer outputs within one output step;
3. ONNX Runtime's own QDQ quantization of the graph (``quantize_static``, QDQ format) imports into tvmquant and
   computes what ONNX Runtime computes, within one output step.

The default suite runs a few derandomized examples of each; ``-m slow`` runs many more.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import onnx
import pytest
from hypothesis import HealthCheck, assume, example, given, settings
from hypothesis import strategies as st
from models import _Graph
from onnx import TensorProto, helper, numpy_helper

import tvmquant
from tvmquant import QuantConfig
from tvmquant._compat import to_tensor
from tvmquant.api import load_model
from tvmquant.config import Max, Percentile, PerChannel, PerTensor, TensorSpec
from tvmquant.passes import AnnotateQuant, ExposeQuantizedTensors, RealizeQuant
from tvmquant.passes.annotate import layers_of
from tvmquant.passes.calibrate import compile_vm, run_vm
from tvmquant.testing.forcing import teacher_forced
from tvmquant.testing.ort import ort_quantize, ort_session

# Default suite: each integer-model example builds 4 modules (~8 s on 2 loaded cores), an ORT QDQ example 1 (~1.5 s).
FAST = dict(max_examples=4, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck), database=None)
SLOW = dict(max_examples=200, deadline=None, suppress_health_check=list(HealthCheck), database=None)


# ----------------------------------------------------------------------------------------------------------------
# Graph descriptions: a list of plain tuples (hypothesis shrinks and prints them), built into ONNX by `build`.
# Each step reads the current tensor `cur` of shape (C, H, W).


@st.composite
def _conv(draw, c, h, w):
    kind = draw(st.sampled_from(["plain", "depthwise", "grouped"]))
    if kind == "depthwise":
        groups, cout = c, c * draw(st.sampled_from([1, 2])) if c <= 6 else c
    elif kind == "grouped":
        divisors = [g for g in range(2, c + 1) if c % g == 0]
        if not divisors:
            groups, cout = 1, draw(st.integers(1, 12))
        else:
            groups = draw(st.sampled_from(divisors))
            cout = groups * draw(st.integers(1, max(1, 12 // groups)))
    else:
        groups, cout = 1, draw(st.integers(1, 12))
    k = draw(st.sampled_from([1, 2, 3]))
    stride = draw(st.sampled_from([1, 1, 2]))
    pads = [draw(st.integers(0, k - 1)) for _ in range(4)] if k > 1 else [0, 0, 0, 0]  # top, left, bottom, right
    oh = (h + pads[0] + pads[2] - k) // stride + 1
    ow = (w + pads[1] + pads[3] - k) // stride + 1
    if oh < 2 or ow < 2:
        stride, pads = 1, [k // 2, k // 2, k - 1 - k // 2, k - 1 - k // 2]
        oh, ow = h, w
    bias = draw(st.booleans())
    return ("conv", cout, k, stride, groups, tuple(pads), bias), (cout, oh, ow)


@st.composite
def _step(draw, c, h, w):
    """One step from (c, h, w): the step's tuple and the new shape."""
    op = draw(st.sampled_from(["conv", "conv", "act", "pool", "add", "concat", "reshape"]))
    if op == "conv":
        return draw(_conv(c, h, w))
    if op == "act":
        return ("act", draw(st.sampled_from(["relu", "relu6"]))), (c, h, w)
    if op == "pool":
        kind = draw(st.sampled_from(["max", "avg"]))
        k = draw(st.sampled_from([2, 3]))
        stride = draw(st.sampled_from([1, 2]))
        pad = draw(st.integers(0, 1)) if k == 3 else 0
        oh, ow = (h + 2 * pad - k) // stride + 1, (w + 2 * pad - k) // stride + 1
        if oh < 2 or ow < 2:
            return ("act", "relu"), (c, h, w)
        return ("pool", kind, k, stride, pad), (c, oh, ow)
    if op == "add":
        # a conv branch (same shape as cur: stride 1, "same" pads) plus cur, or plus a second conv branch
        k = draw(st.sampled_from([1, 3]))
        cout = draw(st.sampled_from([c, draw(st.integers(1, 12))]))
        act = draw(st.booleans())
        return ("add", k, cout, act), (cout, h, w)
    if op == "concat":
        c2 = draw(st.integers(1, max(1, 12 - c)))
        return ("concat", c2, draw(st.booleans())), (c + c2, h, w)
    # reshape: (C, H, W) -> (2C, H/2, W) when H is even (the same memory, other NCHW dims), else (C, H*W, 1)... no:
    # keep spatial >= 2 in both axes
    if h % 2 == 0 and h >= 4 and 2 * c <= 12:
        return ("reshape", (2 * c, h // 2, w)), (2 * c, h // 2, w)
    if w % 2 == 0 and w >= 4 and c % 2 == 0:
        return ("reshape", (c // 2, h, 2 * w)), (c // 2, h, 2 * w)
    return ("act", "relu"), (c, h, w)


@st.composite
def graphs(draw, max_steps: int = 5):
    """A graph description: (seed, input shape, steps, head)."""
    seed = draw(st.integers(0, 2**31 - 1))
    c, h, w = draw(st.integers(1, 4)), draw(st.integers(6, 12)), draw(st.integers(6, 12))
    shape = (c, h, w)
    steps = []
    for _ in range(draw(st.integers(1, max_steps))):
        step, (c, h, w) = draw(_step(c, h, w))
        steps.append(step)
    head = draw(st.sampled_from(["none", "gap_gemm", "gap_matmul", "flatten_gemm", "reshape_matmul"]))
    if head in ("flatten_gemm", "reshape_matmul") and c * h * w > 1024:
        head = "gap_gemm"
    units = draw(st.integers(1, 12))
    trans_b = draw(st.booleans())
    return seed, shape, tuple(steps), (head, units, trans_b)


class _Builder(_Graph):
    """tests/models.py's graph builder, with convs that take explicit (asymmetric) pads."""

    def conv(self, x, cin, cout, k, stride=1, groups=1, pads=None, bias=True):
        fan_in = cin // groups * k * k
        weight = self.rng.standard_normal((cout, cin // groups, k, k)) * np.sqrt(2.0 / fan_in)
        inputs = [x, self.const(weight.astype(np.float32), "w")]
        if bias:
            inputs.append(self.const((self.rng.standard_normal(cout) * 0.1).astype(np.float32), "b"))
        if pads is None:
            pads = (k // 2, k // 2, k - 1 - k // 2, k - 1 - k // 2)
        top, left, bottom, right = pads
        return self.node(
            "Conv", inputs, kernel_shape=[k, k], pads=[top, left, bottom, right], strides=[stride] * 2, group=groups
        )

    def act(self, x, kind):
        if kind == "relu":
            return self.node("Relu", [x])
        return self.node("Clip", [x, self.const(np.array(0.0, np.float32)), self.const(np.array(6.0, np.float32))])

    def matmul(self, x, k, n, gemm, trans_b):
        weight = (self.rng.standard_normal((k, n)) * np.sqrt(1.0 / k)).astype(np.float32)
        if not gemm:
            return self.node("MatMul", [x, self.const(weight, "w")])
        bias = self.const((self.rng.standard_normal(n) * 0.1).astype(np.float32), "b")
        if trans_b:
            return self.node("Gemm", [x, self.const(np.ascontiguousarray(weight.T), "w"), bias], transB=1)
        return self.node("Gemm", [x, self.const(weight, "w"), bias])


def build(description) -> onnx.ModelProto:
    """The ONNX model of a description drawn by :func:`graphs`."""
    seed, (c, h, w), steps, (head, units, trans_b) = description
    g = _Builder(seed)
    x = "input"
    for step in steps:
        op = step[0]
        if op == "conv":
            _, cout, k, stride, groups, pads, bias = step
            x = g.conv(x, c, cout, k, stride, groups, pads, bias)
            h = (h + pads[0] + pads[2] - k) // stride + 1
            w = (w + pads[1] + pads[3] - k) // stride + 1
            c = cout
        elif op == "act":
            x = g.act(x, step[1])
        elif op == "pool":
            _, kind, k, stride, pad = step
            attrs = dict(kernel_shape=[k, k], strides=[stride] * 2, pads=[pad] * 4)
            x = g.node("MaxPool" if kind == "max" else "AveragePool", [x], **attrs)
            h, w = (h + 2 * pad - k) // stride + 1, (w + 2 * pad - k) // stride + 1
        elif op == "add":
            _, k, cout, act = step
            branch = g.conv(x, c, cout, k)
            if act:
                branch = g.act(branch, "relu")
            other = x if cout == c else g.conv(x, c, cout, 1)
            x = g.node("Add", [branch, other])
            c = cout
        elif op == "concat":
            _, c2, act = step
            side = g.conv(x, c, c2, 3)
            if act:
                side = g.act(side, "relu")
            x = g.node("Concat", [x, side], axis=1)
            c += c2
        elif op == "reshape":
            c, h, w = step[1]
            x = g.node("Reshape", [x, g.const(np.array([1, c, h, w], np.int64), "shape")])
    if head == "none":
        out_shape = [1, c, h, w]
    else:
        if head.startswith("gap"):
            x, k = g.node("Flatten", [g.node("GlobalAveragePool", [x])]), c
        elif head == "flatten_gemm":
            x, k = g.node("Flatten", [x]), c * h * w
        else:
            x, k = g.node("Reshape", [x, g.const(np.array([1, -1], np.int64), "shape")]), c * h * w
        x = g.matmul(x, k, units, gemm=head.endswith("gemm"), trans_b=trans_b)
        out_shape = [1, units]
    g.nodes[-1].output[0] = "output"
    graph = helper.make_graph(
        g.nodes,
        "hypothesis_graph",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, [1, *description[1]])],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, out_shape)],
        initializer=g.inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model, full_check=True)
    return model


def data_for(description, count: int, offset: int = 0) -> np.ndarray:
    seed, shape = description[0], description[1]
    return np.random.default_rng(seed + 1 + offset).standard_normal((count, *shape)).astype(np.float32)


# ----------------------------------------------------------------------------------------------------------------
# Configs
ACTIVATIONS = {
    "uint8-affine": TensorSpec("uint8", "affine", method=Max()),
    "int8-symmetric": TensorSpec("int8", "symmetric", method=Max()),
    "int8-affine": TensorSpec("int8", "affine", method=Max()),
    "uint8-affine-p99.9": TensorSpec("uint8", "affine", method=Percentile(99.9)),
}
WEIGHTS = {"per-channel": PerChannel(0), "per-tensor": PerTensor()}


@st.composite
def configs(draw):
    """(activation key, weight key, skip index or None): turned into a QuantConfig once the layers are known."""
    return (
        draw(st.sampled_from(sorted(ACTIVATIONS))),
        draw(st.sampled_from(sorted(WEIGHTS))),
        draw(st.none() | st.integers(0, 63)),
    )


def make_config(model, choice) -> QuantConfig:
    activation, weight, skip = choice
    config = QuantConfig(
        activation=ACTIVATIONS[activation],
        weight=TensorSpec("int8", "symmetric", granularity=WEIGHTS[weight]),
    )
    if skip is None:
        return config
    names = [layer.name for layer in layers_of(AnnotateQuant(config)(load_model(model)[0]))]
    if not names:
        return config
    return dataclasses.replace(config, skip=(names[skip % len(names)],))


# ----------------------------------------------------------------------------------------------------------------
# Property checks


def realized_vs_simulated_lsb(qmodel, batches) -> int:
    """Worst |realized - simulated| (in LSB) over every quantized tensor, every layer fed the simulated inputs."""
    simulated = ExposeQuantizedTensors()(qmodel.simulated)
    forced = teacher_forced(RealizeQuant()(simulated))
    vm_sim, vm_real = compile_vm(simulated), compile_vm(forced)
    worst = 0
    for batch in batches:
        sim = run_vm(vm_sim, batch, qmodel.inputs)
        if not hasattr(sim, "__len__") or len(sim) < 2:
            return 0  # nothing quantized
        args = [to_tensor(batch[spec.name]) for spec in qmodel.inputs] + [sim[i] for i in range(1, len(sim))]
        real = vm_real["main"](*args)
        for index in range(1, len(sim)):
            a, b = sim[index].numpy(), real[index].numpy()
            assert a.dtype == b.dtype and a.dtype in (np.uint8, np.int8)
            worst = max(worst, int(np.max(np.abs(a.astype(np.int32) - b.astype(np.int32)))))
    return worst


def output_step(path) -> float:
    """The largest quantization step of the last DequantizeLinear on the way to the model output (0: none)."""
    model = onnx.load(str(path))
    inits = {init.name: numpy_helper.to_array(init) for init in model.graph.initializer}
    producer = {out: node for node in model.graph.node for out in node.output}
    frontier, seen = [model.graph.output[0].name], set()
    while frontier:
        name = frontier.pop(0)
        node = producer.get(name)
        if node is None or name in seen:
            continue
        seen.add(name)
        if node.op_type == "DequantizeLinear":
            return float(np.max(inits[node.input[1]]))
        frontier.extend(node.input)
    return 0.0


def sqnr_db(reference, other) -> float:
    noise = float(np.sum((reference.astype(np.float64) - other) ** 2))
    return np.inf if noise == 0 else 10 * np.log10(max(float(np.sum(reference.astype(np.float64) ** 2)), 1e-30) / noise)


def assert_matches_ort(path, x, got, what):
    """``got`` is what ONNX Runtime computes from the QDQ file ``path`` on ``x``, within one output step.

    End to end, one value that rounds the other way at a tie inside the model moves the output by more than a step
    where a later layer amplifies it (a 1x1 conv with weight * in_scale / out_scale = 3 turns 1 LSB into 3 output
    steps). Such a tie is not an error: ONNX Runtime's fused kernels (QLinearAveragePool, QLinearAdd) and its
    reference kernels (the graph as written) disagree with each other in exactly this way. So the tolerance is one
    step beyond the distance between those two ORT runs, or the issue-17 bound (>= 40 dB), with at most 2 elements (2%)
    more than a step off: a tie, not a wrong layer (which moves most of its output).
    """
    fused = ort_session(str(path)).run(None, {"input": x})[0]
    reference = ort_session(str(path), optimize=False).run(None, {"input": x})[0]
    step = output_step(path)
    rounding = 1e-5 * max(1.0, float(np.max(np.abs(fused))))
    ort_self = float(np.max(np.abs(fused.astype(np.float64) - reference)))
    diff = min(float(np.max(np.abs(got.astype(np.float64) - ort))) for ort in (fused, reference))
    if diff <= step * 1.01 + rounding:
        return "within one step"
    if diff <= ort_self + step * 1.01 + rounding:
        return "within ORT's own spread"
    off = int(np.sum(np.abs(got.astype(np.float64) - fused) > step * 1.01 + rounding))
    sqnr = sqnr_db(fused, got)
    assert sqnr >= 40 and off <= max(2, got.size // 50), (
        f"{what}: max |diff| {diff:.6g} = {diff / max(step, 1e-30):.2f} output steps (step {step:.6g}; ORT fused vs "
        f"reference kernels: {ort_self:.6g}); {off} of {got.size} elements more than a step off; SQNR {sqnr:.1f} dB"
    )
    return "a tie (>= 40 dB)"


def check_integer_model(description, choice, tmp_path):
    """Properties 1 and 2 on one graph and config."""
    model = build(description)
    config = make_config(model, choice)
    calib, evaluation = data_for(description, 8), data_for(description, 2, offset=1000)
    qmodel = tvmquant.quantize(model, config, calib, progress=False, report_batches=0)
    worst = realized_vs_simulated_lsb(qmodel, [{"input": x[None]} for x in evaluation])
    assert worst <= 1, f"realized vs simulated: {worst} LSB at some quantized tensor"
    path = tmp_path / "export.onnx"
    qmodel.export_onnx(path)
    onnx.checker.check_model(onnx.load(str(path)))
    integer = qmodel.compile()
    return [assert_matches_ort(path, x[None], integer(x[None]), "export run by ORT vs tvmquant") for x in evaluation]


def check_ort_qdq(description, per_channel, activation_type, tmp_path):
    """Property 3 on one graph."""
    model = build(description)
    source = tmp_path / "fp32.onnx"
    onnx.save(model, str(source))
    calib, evaluation = data_for(description, 8), data_for(description, 2, offset=1000)
    qdq_path = ort_quantize(
        str(source), calib, "minmax", per_channel=per_channel, activation_type=activation_type, out_dir=str(tmp_path)
    )
    # ORT quantizes nothing in a graph of activations and pools alone (no Q/DQ): then there is nothing to import
    assume(any(node.op_type == "QuantizeLinear" for node in onnx.load(qdq_path).graph.node))
    qmodel = tvmquant.quantize(qdq_path, progress=False)
    run = qmodel.compile()
    return [
        assert_matches_ort(qdq_path, x[None], run(x[None]), "ORT's QDQ model in tvmquant vs ORT") for x in evaluation
    ]


# ----------------------------------------------------------------------------------------------------------------
# Default suite: a few derandomized examples (reproducible in CI), plus the regressions hypothesis found.


# An input read by a quantized concat and by a skipped (FP32) conv: the export fed the conv the Q/DQ'd input.
SKIPPED_CONV_BESIDE_CONCAT = dict(
    description=(2097151, (2, 9, 6), (("concat", 6, False),), ("none", 12, False)),
    choice=("int8-affine", "per-channel", 0),
)


@settings(**{**FAST, "max_examples": 2})
@given(description=graphs(), choice=configs())
@example(**SKIPPED_CONV_BESIDE_CONCAT)
def test_integer_model_matches_simulation_and_export(tmp_path_factory, description, choice):
    check_integer_model(description, choice, tmp_path_factory.mktemp("prop"))


# A tie, not a bug: conv 1x1 -> ReLU -> AveragePool 3x3 (pad 1) -> Add(conv 1x1, itself). One pooled value rounds the
# other way in tvmquant's integer model (teacher-forced: 1 LSB), or in ORT's FP32 reference kernels, and the 1x1
# conv after it multiplies that LSB into 3 output steps; ORT's fused and reference kernels differ by as much.
AMPLIFIED_TIE = dict(
    description=(
        1,
        (1, 6, 6),
        (("conv", 1, 1, 1, 1, (0, 0, 0, 0), False), ("act", "relu"), ("pool", "avg", 3, 1, 1), ("add", 1, 1, False)),
        ("none", 1, False),
    ),
    per_channel=False,
)


@settings(**FAST)
@given(description=graphs(), per_channel=st.booleans(), activation_type=st.sampled_from(["uint8", "int8"]))
@example(**AMPLIFIED_TIE, activation_type="uint8")
@example(**AMPLIFIED_TIE, activation_type="int8")
def test_ort_qdq_model_imports_and_matches_ort(tmp_path_factory, description, per_channel, activation_type):
    check_ort_qdq(description, per_channel, activation_type, tmp_path_factory.mktemp("prop"))


# ----------------------------------------------------------------------------------------------------------------
# Slow: many more random examples.


@pytest.mark.slow
@settings(**SLOW)
@given(description=graphs(max_steps=7), choice=configs())
def test_integer_model_matches_simulation_and_export_many(tmp_path_factory, description, choice):
    check_integer_model(description, choice, tmp_path_factory.mktemp("prop"))


@pytest.mark.slow
@settings(**SLOW)
@given(description=graphs(max_steps=7), per_channel=st.booleans(), activation_type=st.sampled_from(["uint8", "int8"]))
def test_ort_qdq_model_imports_and_matches_ort_many(tmp_path_factory, description, per_channel, activation_type):
    check_ort_qdq(description, per_channel, activation_type, tmp_path_factory.mktemp("prop"))
