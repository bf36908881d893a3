"""Tests of tvmquant.schedules.x86: blocked INT8 conv/dense rewrites, VNNI tensorization, tuning database.

Exact integer checks against numpy; the design-space test needs no VNNI hardware (it only generates and
compiles for a fixed target). Tests that run VNNI code skip on CPUs without AVX512-VNNI.
"""

from __future__ import annotations

import importlib
import json
import logging
import os
import time

import numpy as np
import pytest

tvm = pytest.importorskip("tvm")
from tvm import relax  # noqa: E402

from tvmquant.schedules import x86  # noqa: E402
from tvmquant.testing import library_source  # noqa: E402

HOST_FLAGS = x86.cpu_flags()
needs_vnni = pytest.mark.skipif("avx512_vnni" not in HOST_FLAGS, reason="host CPU has no AVX512-VNNI")
needs_avx512bw = pytest.mark.skipif("avx512bw" not in HOST_FLAGS, reason="host CPU has no AVX-512BW")
needs_avx2 = pytest.mark.skipif("avx2" not in HOST_FLAGS, reason="host CPU has no AVX2")
#: Sapphire Rapids without AMX: the VNNI kernels of the graphs below (with AMX, large GEMMs go to AMX tiles;
#: tests/test_schedules_amx.py tests those).
NO_AMX = ["-amx-int8", "-amx-tile"]


def vnni_host():
    """The host target with its AMX kernels off: these tests check the VNNI kernels (AMX has its own file)."""
    return x86.x86_target(num_cores=2, mattr=NO_AMX if "amx_int8" in HOST_FLAGS else None)


# ----------------------------------------------------------------------------------------------------------
# Model builders and numpy references
def conv2d_reference(data, weight, stride=1, padding=0, groups=1):
    """Exact int conv2d (NCHW/OIHW) in int64, returned as int32."""
    batch, channels, height, width = data.shape
    out_ch, per_group, k_h, k_w = weight.shape
    padded = np.pad(data.astype(np.int64), ((0, 0), (0, 0), (padding, padding), (padding, padding)))
    out_h = (height + 2 * padding - k_h) // stride + 1
    out_w = (width + 2 * padding - k_w) // stride + 1
    out = np.zeros((batch, out_ch, out_h, out_w), dtype=np.int64)
    out_per_group = out_ch // groups
    for g in range(groups):
        x_g = padded[:, g * per_group : (g + 1) * per_group]
        w_g = weight[g * out_per_group : (g + 1) * out_per_group].astype(np.int64)
        for r in range(k_h):
            for s in range(k_w):
                patch = x_g[:, :, r : r + stride * out_h : stride, s : s + stride * out_w : stride]
                out[:, g * out_per_group : (g + 1) * out_per_group] += np.einsum(
                    "nchw,oc->nohw", patch, w_g[:, :, r, s]
                )
    return out.astype(np.int32)


def conv_module(data_shape, layers, rng, requantize=False):
    """A Relax module of quantized convs as the realize passes emit them.

    ``layers``: list of (out_channels, kernel, stride, padding, groups). Each conv is u8 x s8 -> s32 plus an
    int32 bias; with ``requantize`` the int32 result is requantized to uint8 (cast, per-channel multiply,
    round, zero point, clip, cast), which is what feeds the next conv. Returns (module, weights, biases).
    """
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType(data_shape, "uint8"))
    weights, biases = [], []
    channels = data_shape[1]
    with bb.function("main", [x]):
        with bb.dataflow():
            y = x
            for out_ch, kernel, stride, padding, groups in layers:
                weight = rng.integers(-128, 128, (out_ch, channels // groups, kernel, kernel)).astype("int8")
                bias = rng.integers(-2000, 2000, (1, out_ch, 1, 1)).astype("int32")
                weights.append(weight)
                biases.append(bias)
                acc = bb.emit(
                    relax.op.nn.conv2d(
                        y,
                        relax.const(weight),
                        strides=stride,
                        padding=padding,
                        groups=groups,
                        out_dtype="int32",
                    )
                )
                y = bb.emit(relax.op.add(acc, relax.const(bias)))
                if requantize:
                    fan_in = channels // groups * kernel * kernel
                    multiplier = (rng.uniform(0.5, 1.5, (1, out_ch, 1, 1)) / (fan_in * 40)).astype("float32")
                    f = bb.emit(relax.op.astype(y, "float32"))
                    f = bb.emit(relax.op.multiply(f, relax.const(multiplier)))
                    f = bb.emit(relax.op.round(f))
                    f = bb.emit(relax.op.add(f, relax.const(np.float32(128))))
                    f = bb.emit(relax.op.clip(f, 0, 255))
                    y = bb.emit(relax.op.astype(f, "uint8"))
                channels = out_ch
            out = bb.emit_output(y)
        bb.emit_func_output(out)
    return bb.get(), weights, biases


def run(executable, *args):
    vm = relax.VirtualMachine(executable, tvm.cpu())
    return vm["main"](*[tvm.runtime.tensor(a) for a in args]).numpy()


def assembly(executable) -> str:
    return library_source(executable, "asm")


def stock_reference(mod, data):
    """The same Relax module through TVM's default pipeline (no tvmquant passes)."""
    return run(tvm.compile(mod, target=tvm.target.Target({"kind": "llvm"})), data)


# ----------------------------------------------------------------------------------------------------------
# Pure helpers
def test_pack_conv2d_weight_layout():
    rng = np.random.default_rng(0)
    weight = rng.integers(-128, 128, (20, 6, 3, 3)).astype("int8")
    packed = x86.pack_conv2d_weight(weight, groups=1, ic_block=8)
    assert packed.shape == (2, 1, 3, 3, 2, 16, 4)  # K 20 -> 32, C 6 -> 8
    for o, c, r, s in [(0, 0, 0, 0), (19, 5, 2, 1), (7, 4, 1, 2)]:
        assert packed[o // 16, c // 8, r, s, (c % 8) // 4, o % 16, c % 4] == weight[o, c, r, s]
    assert not packed[1, 0, :, :, :, 4:, :].any()  # padded output channels are zero
    assert not packed[0, 0, :, :, 1, :, 2:].any()  # padded input channels are zero


def test_pack_dense_weight_layout():
    rng = np.random.default_rng(0)
    weight = rng.integers(-128, 128, (10, 20)).astype("int8")
    packed = x86.pack_dense_weight(weight)
    assert packed.shape == (2, 3, 16, 4)
    for k, n in [(0, 0), (9, 19), (5, 17)]:
        assert packed[n // 16, k // 4, n % 16, k % 4] == weight[k, n]
    assert not packed[1, :, 4:, :].any() and not packed[:, 2, :, 2:].any()


def test_int8_isa_and_targets(tmp_path):
    assert x86.int8_isa(x86.x86_target("sapphirerapids")) == "amx"
    assert x86.int8_isa(x86.x86_target("cascadelake")) == "vnni"
    assert x86.int8_isa(x86.x86_target("znver4")) == "vnni"
    assert x86.int8_isa(x86.x86_target("skylake-avx512")) == "avx512"
    assert x86.int8_isa(x86.x86_target("haswell")) == "avx2"
    target = x86.x86_target(num_cores=2)
    assert target.attrs["mcpu"] == x86.host_mcpu() and int(target.attrs["num-cores"]) == 2
    with pytest.raises(ValueError, match="does not know the CPU"):
        x86.x86_target("not-a-cpu")
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("processor\t: 0\nflags\t\t: fpu avx2 avx512f avx512_vnni amx_int8\n")
    assert {"avx512_vnni", "amx_int8"} <= x86.cpu_flags(str(cpuinfo))
    assert x86.cpu_flags(str(tmp_path / "missing")) == frozenset()


# ----------------------------------------------------------------------------------------------------------
# Graph passes
def _called_functions(mod):
    names = []

    def visit(expr):
        if isinstance(expr, tvm.ir.Call) and isinstance(expr.op, tvm.ir.Op) and expr.op.name == "relax.call_tir":
            names.append(expr.args[0].name_hint)

    relax.analysis.post_order_visit(mod["main"], visit)
    return names


def test_passes_idempotent_and_well_formed():
    rng = np.random.default_rng(1)
    mod, _, _ = conv_module(
        (1, 32, 8, 8), [(32, 3, 1, 1, 1), (48, 1, 1, 0, 1), (16, 3, 2, 1, 16)], rng, requantize=True
    )
    original = mod.script()
    once = x86.optimize_int8_for_x86()(mod)
    assert mod.script() == original  # the caller's module is not mutated
    twice = x86.optimize_int8_for_x86()(once)
    relax.analysis.well_formed(once)  # raises on the first violation
    tvm.ir.assert_structural_equal(once, twice)
    prepared = x86.prepare(mod, x86.x86_target("sapphirerapids", num_cores=2))
    relax.analysis.well_formed(prepared)


def test_conv_chain_stays_blocked_and_fuses_epilogue():
    rng = np.random.default_rng(2)
    mod, _, _ = conv_module(
        (1, 32, 10, 10), [(32, 3, 1, 1, 1), (64, 3, 1, 1, 1), (32, 1, 1, 0, 1)], rng, requantize=True
    )
    prepared = x86.prepare(mod, x86.x86_target("sapphirerapids", num_cores=2, mattr=NO_AMX))
    calls = _called_functions(prepared)
    convs = [name for name in calls if "conv2d_int8_nchwc" in name]
    assert len(convs) == 3
    # Each conv is fused with its whole requantize epilogue: the fused kernel writes uint8.
    for name in convs:
        assert name.startswith("fused_conv2d_int8_nchwc") and name.endswith("_cast" + name.rsplit("_cast", 1)[-1])
        assert str(prepared[name].params[-1].dtype) == "uint8", name  # TVM 0.27: params are buffers
    # Only one layout change in and one out: nothing between the convs except the separate pads.
    transforms = [name for name in calls if "layout_transform" in name]
    assert len(transforms) == 2, calls
    between = calls[calls.index(convs[0]) + 1 : calls.index(convs[-1])]
    assert all("conv2d" in name or name.startswith("pad") for name in between), between


def test_signed_convs_are_left_alone_and_float_convs_run_blocked():
    rng = np.random.default_rng(3)
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType((1, 16, 6, 6), "int8"))
    xf = relax.Var("xf", relax.TensorType((1, 16, 6, 6), "float32"))
    weight = relax.const(rng.integers(-128, 128, (16, 16, 3, 3)).astype("int8"))
    weight_f = relax.const(rng.standard_normal((16, 16, 3, 3)).astype("float32"))
    with bb.function("main", [x, xf]):
        with bb.dataflow():
            a = bb.emit(relax.op.nn.conv2d(x, weight, padding=1, out_dtype="int32"))
            b = bb.emit(relax.op.nn.conv2d(xf, weight_f, padding=1))
            out = bb.emit_output(relax.Tuple([a, b]))
        bb.emit_func_output(out)
    mod = bb.get()
    script = x86.optimize_int8_for_x86()(mod)["main"].script()
    assert script.count("R.nn.conv2d(") == 1 and 'out_dtype="int32"' in script  # the s8 x s8 conv, as it was
    assert "conv2d_nchwc_float" in script  # the FP32 conv: BlockFloatConv2d (tests/test_schedules_layout.py)


# ----------------------------------------------------------------------------------------------------------
# (a) VNNI conv: vpdpbusd in the assembly, exact results
CONV_CASES = [
    # (data shape, out channels, kernel, stride, padding, groups)
    ((1, 64, 14, 14), 64, 3, 1, 1, 1),  # the blocked (ConvertLayout) path
    ((2, 32, 9, 11), 48, 3, 2, 1, 1),  # batch 2, odd sizes, stride 2
    ((1, 3, 16, 16), 32, 3, 1, 1, 1),  # C=3: padded to a 4-channel block on the NCHW path
    ((1, 32, 7, 7), 10, 1, 1, 0, 1),  # K=10: padded to 16 and sliced back
    ((1, 64, 8, 8), 64, 3, 1, 1, 2),  # grouped, whole 16-channel blocks per group
    ((1, 16, 8, 8), 16, 3, 1, 1, 16),  # depthwise: the blocked multiply-add kernel
    ((1, 32, 9, 9), 32, 3, 2, 1, 32),  # depthwise, stride 2, two channel blocks
    ((1, 8, 8, 8), 8, 3, 1, 1, 8),  # depthwise, channels not a 16-block: stays a generic conv
]


@needs_vnni
@pytest.mark.parametrize("shape,out_ch,kernel,stride,padding,groups", CONV_CASES)
def test_vnni_conv_exact_and_uses_vpdpbusd(shape, out_ch, kernel, stride, padding, groups):
    rng = np.random.default_rng(4)
    mod, (weight,), (bias,) = conv_module(shape, [(out_ch, kernel, stride, padding, groups)], rng)
    data = rng.integers(0, 256, shape).astype("uint8")
    executable = x86.build(mod, vnni_host())
    expected = conv2d_reference(data, weight, stride, padding, groups) + bias
    np.testing.assert_array_equal(run(executable, data), expected)
    if groups != shape[1]:
        assert "vpdpbusd" in assembly(executable)
    elif shape[1] % 16 == 0:
        assert any("depthwise_int8_nchwc" in name for name in _called_functions(x86.prepare(mod)))


@needs_vnni
@pytest.mark.parametrize("channels", [32, 24])  # blocked (ConvertLayout) path, NCHW path
def test_vnni_dilated_conv_matches_stock_tvm(channels):
    rng = np.random.default_rng(13)
    weight = rng.integers(-128, 128, (32, channels, 3, 3)).astype("int8")
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType((1, channels, 13, 13), "uint8"))
    with bb.function("main", [x]):
        with bb.dataflow():
            conv = relax.op.nn.conv2d(x, relax.const(weight), padding=2, dilation=2, out_dtype="int32")
            out = bb.emit_output(conv)
        bb.emit_func_output(out)
    mod = bb.get()
    data = rng.integers(0, 256, (1, channels, 13, 13)).astype("uint8")
    executable = x86.build(mod, vnni_host())
    np.testing.assert_array_equal(run(executable, data), stock_reference(mod, data))
    assert "vpdpbusd" in assembly(executable)


@needs_vnni
def test_vnni_requantized_chain_matches_stock_tvm():
    # Exercises the blocked epilogue: padded channels, per-channel constants moved to the blocked layout,
    # the clip rewrite, and the C=3 / K=10 edge convs on both sides of the blocked region.
    rng = np.random.default_rng(5)
    layers = [(32, 3, 1, 1, 1), (32, 3, 1, 1, 1), (64, 3, 2, 1, 1), (64, 3, 1, 1, 64), (10, 1, 1, 0, 1)]
    mod, _, _ = conv_module((1, 3, 16, 16), layers, rng, requantize=True)
    data = rng.integers(0, 256, (1, 3, 16, 16)).astype("uint8")
    expected = stock_reference(mod, data)
    assert 20 < expected.mean() < 235  # the multipliers keep the outputs in range (not all clipped)
    np.testing.assert_array_equal(run(x86.build(mod, vnni_host()), data), expected)


@needs_vnni
def test_vnni_residual_and_pool_match_stock_tvm():
    # A ResNet-like block: conv -> requantize -> max_pool -> conv, plus a residual add of the pooled
    # activations, all in the blocked layout; the result must equal TVM's default pipeline exactly.
    rng = np.random.default_rng(12)
    channels = 32
    weights = [rng.integers(-128, 128, (channels, channels, 3, 3)).astype("int8") for _ in range(2)]
    multiplier = np.float32(1.0 / (channels * 9 * 40))
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType((1, channels, 12, 12), "uint8"))

    def requantize(acc):
        f = bb.emit(relax.op.multiply(relax.op.astype(acc, "float32"), relax.const(multiplier)))
        f = bb.emit(relax.op.add(relax.op.round(f), relax.const(np.float32(128))))
        return bb.emit(relax.op.astype(relax.op.clip(f, 0, 255), "uint8"))

    with bb.function("main", [x]):
        with bb.dataflow():
            y = requantize(bb.emit(relax.op.nn.conv2d(x, relax.const(weights[0]), padding=1, out_dtype="int32")))
            pooled = bb.emit(relax.op.nn.max_pool2d(y, pool_size=2, strides=2))
            acc = bb.emit(relax.op.nn.conv2d(pooled, relax.const(weights[1]), padding=1, out_dtype="int32"))
            acc = bb.emit(
                relax.op.add(acc, relax.op.multiply(relax.op.astype(pooled, "int32"), relax.const(np.int32(300))))
            )
            out = bb.emit_output(requantize(acc))
        bb.emit_func_output(out)
    mod = bb.get()
    calls = _called_functions(x86.prepare(mod))
    assert len([name for name in calls if "layout_transform" in name]) == 2, calls  # in and out only
    data = rng.integers(0, 256, (1, channels, 12, 12)).astype("uint8")
    expected = stock_reference(mod, data)
    assert 20 < expected.mean() < 235
    np.testing.assert_array_equal(run(x86.build(mod, vnni_host()), data), expected)


@needs_vnni
@pytest.mark.parametrize(
    "batch_shape,depth,cols",
    # (1, 1280) x (1280, 1000): MobileNetV2's classifier, whose first design-space sketch passes the
    # postprocessors but fails in codegen; the untuned fallback must skip to one that compiles.
    [
        ((4,), 100, 40),
        ((1,), 64, 32),  # every tensorized sketch fails codegen unless the epilogue is vectorized apart
        ((2, 3), 30, 17),
        ((1,), 1280, 1000),
    ],
)
def test_vnni_dense_exact(batch_shape, depth, cols):
    rng = np.random.default_rng(6)
    weight = rng.integers(-128, 128, (depth, cols)).astype("int8")
    bias = rng.integers(-1000, 1000, (cols,)).astype("int32")
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType((*batch_shape, depth), "uint8"))
    with bb.function("main", [x]):
        with bb.dataflow():
            acc = bb.emit(relax.op.matmul(x, relax.const(weight), out_dtype="int32"))
            out = bb.emit_output(relax.op.add(acc, relax.const(bias)))
        bb.emit_func_output(out)
    mod = bb.get()
    assert "dense_int8_packed" in "".join(_called_functions(x86.prepare(mod)))
    data = rng.integers(0, 256, (*batch_shape, depth)).astype("uint8")
    executable = x86.build(mod, vnni_host())
    expected = (data.astype(np.int64) @ weight.astype(np.int64) + bias).astype(np.int32)
    np.testing.assert_array_equal(run(executable, data), expected)
    assert "vpdpbusd" in assembly(executable)


@needs_vnni
@pytest.mark.parametrize(
    "batch_shape,rows,depth,cols",
    [
        ((2, 12), 128, 64, 128),  # BERT-base attention QK^T (batch 2, 12 heads, head size 64)
        ((3,), 20, 30, 17),  # K and N off the 4 / 16 blocks: zero padding, a slice
        ((), 16, 8, 16),  # no batch dims
    ],
)
@pytest.mark.parametrize("data_dtype", ["uint8", "int8"])
def test_vnni_matmul_of_two_activations_exact(batch_shape, rows, depth, cols, data_dtype):
    # Attention's QK^T: the second operand a run-time tensor (a transposed one), packed by a kernel of its own.
    # int8 x int8 (dynamic quantization's symmetric rows) runs shifted to uint8, a column sum taking it back.
    rng = np.random.default_rng(7)
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType((*batch_shape, rows, depth), data_dtype))
    y = relax.Var("y", relax.TensorType((*batch_shape, cols, depth), "int8"))
    with bb.function("main", [x, y]):
        with bb.dataflow():
            axes = [*range(len(batch_shape)), len(batch_shape) + 1, len(batch_shape)]
            y_t = bb.emit(relax.op.permute_dims(y, axes))
            out = bb.emit_output(relax.op.matmul(x, y_t, out_dtype="int32"))
        bb.emit_func_output(out)
    mod = bb.get()
    assert "batch_dense_int8_packed" in "".join(_called_functions(x86.prepare(mod)))
    low, high = np.iinfo(data_dtype).min, np.iinfo(data_dtype).max + 1
    data = rng.integers(low, high, (*batch_shape, rows, depth)).astype(data_dtype)
    other = rng.integers(-128, 128, (*batch_shape, cols, depth)).astype("int8")
    executable = x86.build(mod, vnni_host())
    expected = np.matmul(data.astype(np.int64), np.swapaxes(other, -1, -2).astype(np.int64)).astype(np.int32)
    np.testing.assert_array_equal(run(executable, data, other), expected)
    assert "vpdpbusd" in assembly(executable)


# ----------------------------------------------------------------------------------------------------------
# (b) design space: the VNNI tensorize step, on fixed targets (no hardware needed)
def _conv_task(target):
    rng = np.random.default_rng(7)
    mod, _, _ = conv_module((1, 64, 14, 14), [(64, 3, 1, 1, 1)], rng, requantize=True)
    tasks = [t for t in x86.extract_tasks(mod, target) if "conv2d_int8_nchwc" in t.task_name]
    assert len(tasks) == 1
    return tasks[0]


@pytest.mark.parametrize(
    "mcpu,intrin",
    [
        ("sapphirerapids", "dot_16x4_vnni"),
        ("cascadelake", "dot_16x4_vnni"),
        ("skylake-avx512", "dot_16x4_avx512"),
        ("haswell", None),
    ],
)
def test_design_space_tensorizes_with_int8_intrinsic(mcpu, intrin):
    from tvm.s_tir import meta_schedule as ms

    from tvmquant.schedules.intrinsics import register_x86_intrinsics

    register_x86_intrinsics()
    target = x86.x86_target(mcpu, num_cores=2, mattr=NO_AMX if mcpu == "sapphirerapids" else None)
    task = _conv_task(target)
    context = ms.TuneContext(
        mod=task.dispatched[0],
        target=target,
        space_generator="post-order-apply",
        search_strategy="evolutionary",
        task_name=task.task_name,
        rand_state=0,
    )
    sketches = context.generate_design_space()
    assert sketches
    traces = [str(sketch.trace) for sketch in sketches]
    if intrin is None:
        assert not any("dot_16x4" in trace for trace in traces)
        return
    assert all(f'ann_val="{intrin}"' in trace for trace in traces), traces[0]
    # After the postprocessors the sketch is tensorized with the LLVM-22-compatible implementation
    # (uint8x64/int8x64 operands) and compiles for the target: cross-compilation, nothing runs.
    sketch = sketches[0]
    assert all(postproc.apply(sketch) for postproc in context.space_generator.postprocs)
    script = sketch.mod.script()
    llvm_intrin = "vpdpbusd.512" if intrin == "dot_16x4_vnni" else "pmaddubs.w.512"
    assert llvm_intrin in script
    lib = tvm.compile(sketch.mod, target=target)
    asm = lib.mod.inspect_source("asm") if hasattr(lib, "mod") else lib.inspect_source("asm")
    assert ("vpdpbusd" if intrin == "dot_16x4_vnni" else "vpmaddubsw") in asm


# ----------------------------------------------------------------------------------------------------------
# (c) fallbacks: AVX-512 without VNNI, AVX2, unscheduled
@pytest.mark.parametrize(
    "mcpu,instruction",
    [
        pytest.param("skylake-avx512", "vpmaddubsw", marks=needs_avx512bw),
        pytest.param("haswell", None, marks=needs_avx2),
    ],
)
def test_fallback_targets_build_and_match(mcpu, instruction):
    rng = np.random.default_rng(8)
    mod, (weight,), (bias,) = conv_module((1, 32, 10, 10), [(32, 3, 1, 1, 1)], rng)
    data = rng.integers(0, 256, (1, 32, 10, 10)).astype("uint8")
    executable = x86.build(mod, x86.x86_target(mcpu, num_cores=2))
    np.testing.assert_array_equal(run(executable, data), conv2d_reference(data, weight, 1, 1) + bias)
    asm = assembly(executable)
    assert "vpdpbusd" not in asm
    if instruction:
        assert instruction in asm


def test_unscheduled_fallback_matches():
    rng = np.random.default_rng(9)
    mod, (weight,), (bias,) = conv_module((1, 16, 6, 6), [(16, 3, 1, 1, 1)], rng)
    data = rng.integers(0, 256, (1, 16, 6, 6)).astype("uint8")
    executable = x86.build(mod, x86.x86_target("haswell", num_cores=2), fallback="none")
    np.testing.assert_array_equal(run(executable, data), conv2d_reference(data, weight, 1, 1) + bias)


def test_build_without_database_dir_warns(tmp_path):
    rng = np.random.default_rng(10)
    mod, _, _ = conv_module((1, 16, 6, 6), [(16, 1, 1, 0, 1)], rng)
    with pytest.warns(UserWarning, match="no tuning database"):
        x86.build(mod, x86.x86_target("haswell", num_cores=2), db_dir=str(tmp_path / "nothing"), fallback="none")


# ----------------------------------------------------------------------------------------------------------
# (d) tuning database reuse
def _records(db_dir):
    path = os.path.join(db_dir, "database_tuning_record.json")
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def _tune_and_reuse(tmp_path, monkeypatch, capsys, strategy, trials):
    rng = np.random.default_rng(11)
    mod, (weight,), (bias,) = conv_module((1, 16, 8, 8), [(16, 1, 1, 0, 1)], rng)
    target = x86.x86_target(num_cores=2)
    db_dir = str(tmp_path / "db")
    x86.tune(mod, target, trials=trials, db_dir=db_dir, num_trials_per_iter=4, strategy=strategy, seed=0)
    err = capsys.readouterr().err
    assert "[tune] task" in err and "trials" in err and "best" in err  # the progress lines
    records = _records(db_dir)
    tasks = x86.extract_tasks(mod, target)
    assert len({r[0] for r in records}) == len(tasks)  # every task has records
    assert all(r[1][1] and max(r[1][1]) < 1e9 for r in records)  # ... that ran

    def no_tuning(**_kwargs):
        raise AssertionError("second tune() tuned again although every task is in the database")

    monkeypatch.setattr(x86.ms.tune, "tune_tasks", no_tuning)
    start = time.perf_counter()
    x86.tune(mod, target, trials=trials, db_dir=db_dir, num_trials_per_iter=4, strategy=strategy)
    assert time.perf_counter() - start < 20
    assert "already tuned" in capsys.readouterr().err
    assert len(_records(db_dir)) == len(records)

    with _no_untuned_warning():
        executable = x86.build(mod, target, db_dir=db_dir)
    data = rng.integers(0, 256, (1, 16, 8, 8)).astype("uint8")
    np.testing.assert_array_equal(run(executable, data), conv2d_reference(data, weight) + bias)
    assert "vpdpbusd" in assembly(executable)
    from tvmquant.schedules import build_with_database  # the entry tvmquant.compile.build uses

    with _no_untuned_warning():
        executable = build_with_database(mod, target, tmp_path / "db")
    np.testing.assert_array_equal(run(executable, data), conv2d_reference(data, weight) + bias)

    other, _, _ = conv_module((1, 16, 8, 8), [(32, 1, 1, 0, 1)], rng)
    with pytest.warns(UserWarning, match="no tuning record"):
        x86.build(other, target, db_dir=db_dir)

    # Records tuned for this CPU must not be replayed for another one (a VNNI schedule would not compile
    # for AVX2): that build falls back to the untuned schedule, with a warning saying what the database was
    # tuned for, and stays exact.
    with pytest.warns(UserWarning, match=r"was tuned for .*, building for haswell, 2 cores: re-tune"):
        executable = x86.build(mod, x86.x86_target("haswell", num_cores=2), db_dir=db_dir)
    np.testing.assert_array_equal(run(executable, data), conv2d_reference(data, weight) + bias)


class _no_untuned_warning:
    def __enter__(self):
        import warnings

        self._catch = warnings.catch_warnings(record=True)
        self._log = self._catch.__enter__()
        warnings.simplefilter("always")
        return self

    def __exit__(self, *exc):
        self._catch.__exit__(*exc)
        untuned = [w for w in self._log if "no tuning record" in str(w.message)]
        assert not untuned, untuned[0].message
        return False


@needs_vnni
def test_database_reuse_skips_tuned_tasks(tmp_path, monkeypatch, capsys):
    _tune_and_reuse(tmp_path, monkeypatch, capsys, strategy="replay-trace", trials=4)


@needs_vnni
@pytest.mark.slow
def test_evolutionary_xgb_tuning_and_reuse(tmp_path, monkeypatch, capsys):
    _tune_and_reuse(tmp_path, monkeypatch, capsys, strategy="evolutionary", trials=24)


def test_tuning_measures_with_one_thread_per_target_core(monkeypatch, tmp_path):
    # TVM's own default on x86 is half the logical CPUs (1 on the 2-core CI machines): candidates would be
    # timed single-threaded and the search would favour schedules that do not scale.
    rng = np.random.default_rng(13)
    mod, _, _ = conv_module((1, 16, 8, 8), [(16, 1, 1, 0, 1)], rng)
    seen = {}

    def fake_tune_tasks(**kwargs):
        seen["threads"] = os.environ.get("TVM_NUM_THREADS")
        seen["strategy"] = kwargs["tasks"][0].search_strategy

    monkeypatch.setattr(x86.ms.tune, "tune_tasks", fake_tune_tasks)
    monkeypatch.setenv("TVM_NUM_THREADS", "7")
    x86.tune(mod, x86.x86_target(num_cores=3), trials=16, db_dir=str(tmp_path / "db"), progress=False)
    assert seen["threads"] == "3"
    assert os.environ["TVM_NUM_THREADS"] == "7"  # restored
    assert isinstance(seen["strategy"], x86.ms.search_strategy.EvolutionarySearch)
    assert x86.search_strategy("replay-trace", 16) == "replay-trace"


class _FakeTuneContext:
    def __init__(self, **kwargs):
        self.__dict__.update(kwargs)

    def clone(self):
        return self


def _no_seeds(*_args, **_kwargs):
    return {}


@pytest.fixture
def no_measuring(monkeypatch):
    """tune() with the measuring parts stubbed, for tests that replace ``tune_tasks``.

    The first ``TuneContext`` of a process imports TVM's intrinsic registry (~28 s), and the runner starts a
    checking worker (~6 s); test_tuning_measures_with_one_thread_per_target_core runs them for real.
    """
    monkeypatch.setattr(x86.intrinsics, "register_x86_intrinsics", lambda: None)
    monkeypatch.setattr(x86.ms, "TuneContext", _FakeTuneContext)
    monkeypatch.setattr(x86.ms.runner, "LocalRunner", lambda **kwargs: None)
    # The default schedules tune() measures into the database before the search (tests/test_tuning_seed.py).
    monkeypatch.setattr(importlib.import_module("tvmquant.schedules.x86.tune"), "seed_default_schedules", _no_seeds)


class _Recorder(logging.Handler):
    """An unnamed handler that keeps its records and notes whether someone closed it."""

    def __init__(self):
        super().__init__(logging.DEBUG)
        self.records = []
        self.closed = False

    def emit(self, record):
        self.records.append(record)

    def close(self):
        self.closed = True
        super().close()


def test_tune_sends_meta_schedule_logs_to_files_and_leaves_other_handlers_alone(
    no_measuring, monkeypatch, tmp_path, capfd
):
    # pytest >= 9.1 attaches its unnamed capture handlers to every non-propagating logger, and meta-schedule's
    # get_loggers_from_work_dir listed the handlers of its logger by name: with one unnamed handler the second
    # tune() of a session died with "'NoneType' object has no attribute 'format'" (logging.py:234). Set that
    # state up explicitly, so the test does not depend on the pytest version running it.
    ms_logger = logging.getLogger(x86.MS_LOGGER)
    unnamed, app = _Recorder(), _Recorder()
    monkeypatch.setattr(ms_logger, "propagate", False)
    monkeypatch.setattr(ms_logger, "level", logging.ERROR)
    ms_logger.addHandler(unnamed)
    logging.getLogger().addHandler(app)
    seen = {}

    def fake_tune_tasks(**kwargs):
        seen["handlers"] = list(ms_logger.handlers)
        seen["propagate"] = ms_logger.propagate
        (task_logger,) = [
            logging.getLogger(name)
            for name in logging.root.manager.loggerDict
            if name.startswith(x86.MS_LOGGER + ".logging.task_0_") and kwargs["tasks"][0].task_name in name
        ]
        seen["task_handlers"] = list(task_logger.handlers)
        assert kwargs["tasks"][0].logger is task_logger  # the logger the TuneContext gets
        task_logger.info("a task line")
        logging.getLogger(x86.MS_LOGGER + ".task_scheduler.task_scheduler").info("a scheduler table")

    monkeypatch.setattr(x86.ms.tune, "tune_tasks", fake_tune_tasks)
    rng = np.random.default_rng(15)
    mod, _, _ = conv_module((1, 16, 8, 8), [(16, 1, 1, 0, 1)], rng)
    db_dir = tmp_path / "db"
    try:
        x86.tune(mod, x86.x86_target(num_cores=2), trials=16, db_dir=str(db_dir), progress=False)
    finally:
        ms_logger.removeHandler(unnamed)
        logging.getLogger().removeHandler(app)
    # While tuning, only tvmquant's file handler was on meta-schedule's logger, and nothing propagated.
    assert unnamed not in seen["handlers"] and not seen["propagate"]
    assert [type(h) for h in seen["handlers"]] == [logging.FileHandler]
    assert [type(h) for h in seen["task_handlers"]] == [logging.FileHandler]
    # Afterwards the logger is as it was, and no handler of the process was closed (logging.config.dictConfig,
    # which meta-schedule's set-up calls, closes them all).
    assert ms_logger.handlers == [] and ms_logger.propagate is False and ms_logger.level == logging.ERROR
    assert not unnamed.closed and not app.closed
    assert not unnamed.records and not [r for r in app.records if r.name.startswith(x86.MS_LOGGER)]
    logs = {name: (db_dir / "logs" / name).read_text() for name in os.listdir(db_dir / "logs")}
    assert "a scheduler table" in logs["tvm.s_tir.meta_schedule.logging.task_scheduler.log"]
    task_logs = [text for name, text in logs.items() if "task_0_" in name]
    assert len(task_logs) == 1 and "a task line" in task_logs[0]
    captured = capfd.readouterr()
    assert "[INFO]" not in captured.out + captured.err  # no "Logging directory: ..." banner


def test_tune_verbose_also_prints_meta_schedule_log_to_stderr(no_measuring, monkeypatch, tmp_path, capfd):
    def fake_tune_tasks(**_kwargs):
        logging.getLogger(x86.MS_LOGGER + ".task_scheduler.task_scheduler").info("a scheduler table")

    monkeypatch.setattr(x86.ms.tune, "tune_tasks", fake_tune_tasks)
    mod, _, _ = conv_module((1, 16, 8, 8), [(16, 1, 1, 0, 1)], np.random.default_rng(16))
    x86.tune(mod, x86.x86_target(num_cores=2), trials=16, db_dir=str(tmp_path / "db"), progress=False, verbose=True)
    assert "[INFO] a scheduler table" in capfd.readouterr().err


def test_plan_trials_gives_every_task_a_share_in_the_first_round():
    total, per_task, per_iter, note = x86.plan_trials(32, 10)
    assert (total, per_task, per_iter) == (40, 4, 4)
    assert note.startswith("32 trials over 10 kernels: giving each kernel at least 4; total 40")
    # The case seen on a 39-task model: 320 trials in batches of 16 reached 20 tasks. Batches of at most 8
    # let the first round (one batch per task) cover all 39 within the budget.
    total, per_task, per_iter, note = x86.plan_trials(320, 39)
    assert total == 320 and note is None
    assert per_iter * 39 <= total and per_task * 39 >= total
    assert x86.plan_trials(1000, 10) == (1000, 100, 16, None)  # large budgets keep full batches
    # An explicit cap wins, also over the floor, and the note gives the total it leaves.
    total, per_task, per_iter, note = x86.plan_trials(64, 10, trials_per_task=1)
    assert (total, per_task, per_iter) == (10, 1, 1) and "total 10" in note
    with pytest.raises(ValueError, match="trials_per_task"):
        x86.plan_trials(64, 10, trials_per_task=0)
    with pytest.raises(ValueError, match="trials"):
        x86.plan_trials(0, 10)


def test_tune_spreads_a_small_budget_and_says_so(no_measuring, monkeypatch, tmp_path, capsys):
    rng = np.random.default_rng(17)
    mod, _, _ = conv_module((1, 16, 8, 8), [(16, 1, 1, 0, 1), (32, 3, 1, 1, 1), (16, 1, 1, 0, 1)], rng)
    target = x86.x86_target(num_cores=2)
    num_tasks = len(x86.extract_tasks(mod, target))
    assert num_tasks >= 3
    seen = {}
    monkeypatch.setattr(x86.ms.tune, "tune_tasks", lambda **kwargs: seen.update(kwargs))
    x86.tune(mod, target, trials=2, db_dir=str(tmp_path / "db"))
    assert len(seen["tasks"]) == num_tasks
    assert seen["max_trials_global"] == 4 * num_tasks and seen["max_trials_per_task"] == 4
    assert seen["num_trials_per_iter"] == 4  # one batch each in the first round
    # Below XGBModel's warm-up its predictions are random: the random model, without the retraining.
    assert seen["cost_model"] == "random"
    err = capsys.readouterr().err
    assert f"2 trials over {num_tasks} kernels: giving each kernel at least 4; total {4 * num_tasks}" in err


def test_pooled_builder_reuses_its_workers_and_reports_failures():
    from tvm import te

    from tvmquant.schedules._ms_worker import build_candidate

    data = te.placeholder((64,), "float32", name="A")
    out = te.compute((64,), lambda i: data[i] + 1.0, name="B")
    func = te.create_prim_func([data, out]).with_attr("global_symbol", "main")
    target = tvm.target.Target({"kind": "llvm"})
    good = x86.ms.builder.BuilderInput(tvm.IRModule({"main": func}), target)
    x = relax.Var("x", relax.TensorType((4,), "float32"))
    bb = relax.BlockBuilder()
    with bb.function("main", [x]):
        bb.emit_func_output(relax.op.add(x, x))
    bad = x86.ms.builder.BuilderInput(bb.get(), target)  # a Relax function: not a candidate the builder can compile
    builder = x86.PooledBuilder(60, 2, build_candidate, batches_per_pool=2)
    try:
        first = builder.build([good, bad])
        assert first[0].error_msg is None and os.path.isfile(first[0].artifact_path)
        assert first[1].artifact_path is None and "PooledBuilder: an exception occurred" in first[1].error_msg
        pool = builder._pool
        assert builder.build([good])[0].error_msg is None and builder._pool is pool  # same workers
        assert builder.build([good])[0].error_msg is None and builder._pool is not pool  # replaced after 2
    finally:
        builder.close()
    assert builder._pool is None


def _max_pool_func():
    x = relax.Var("x", relax.TensorType((1, 16, 8, 8), "float32"))
    bb = relax.BlockBuilder()
    with bb.function("main", [x]):
        with bb.dataflow():
            out = bb.emit_output(bb.emit(relax.op.nn.max_pool2d(x, pool_size=(2, 2), strides=(2, 2))))
        bb.emit_func_output(out)
    mod = relax.transform.LegalizeOps()(bb.get())
    return mod["max_pool2d"]


def _design_space(func, target):
    context = x86.ms.TuneContext(
        mod=tvm.IRModule({"main": func}),
        target=target,
        space_generator="post-order-apply",
        search_strategy="replay-trace",
        task_name="pool",
        rand_state=0,
        num_threads=2,
    )
    return context.generate_design_space()


def test_pool_schedule_rule_without_a_registered_rule_is_stripped_without_the_cpp_warning(capfd):
    target = x86.x86_target("haswell", num_cores=2)
    func = _max_pool_func()
    assert 'schedule_rule": "meta_schedule.pool_max"' in func.script()  # TOPI's annotation, no rule for "cpu"
    stripped = x86.strip_unregistered_schedule_rules(func, list(target.keys))
    assert "schedule_rule" not in stripped.script()
    capfd.readouterr()
    assert _design_space(stripped, target)
    assert "Unknown schedule rule" not in capfd.readouterr().err
    # What the stripping saves: meta-schedule's C++ warning, printed past Python logging.
    assert _design_space(func, target)
    assert 'Unknown schedule rule "meta_schedule.pool_max"' in capfd.readouterr().err
    # An annotation that names a registered rule stays.
    sch = tvm.s_tir.Schedule(tvm.IRModule({"main": func}))
    block = sch.get_child_blocks(sch.get_sblock("root"))[-1]
    sch.unannotate(block, "schedule_rule")  # annotate() keeps an existing value
    sch.annotate(block, "schedule_rule", "conv2d_nchw_winograd_data_pack")
    kept = x86.strip_unregistered_schedule_rules(sch.mod["main"], ["cpu"])
    assert "conv2d_nchw_winograd_data_pack" in kept.script()


def test_depthwise_between_blocked_convs_gets_the_fixed_vector_schedule():
    rng = np.random.default_rng(14)
    layers = [(32, 1, 1, 0, 1), (32, 3, 2, 1, 32), (32, 1, 1, 0, 1)]  # pointwise, depthwise (stride 2), pointwise
    mod, _, _ = conv_module((1, 32, 12, 12), layers, rng, requantize=True)
    prepared = x86.prepare(mod, x86.x86_target("sapphirerapids", num_cores=2, mattr=NO_AMX))
    depthwise = [name for name in _called_functions(prepared) if "depthwise_int8_nchwc" in name]
    assert len(depthwise) == 1
    func = prepared[depthwise[0]]
    assert x86.is_scheduled(func)  # not left to the tuner
    assert "T.vectorized" in func.script() and "T.parallel" in func.script()
    assert depthwise[0] not in [task.task_name for task in x86.extract_tasks(mod, x86.x86_target(num_cores=2))]


def test_pad_after_a_conv_is_written_whole():
    # TF-style "SAME" padding of a stride-2 depthwise conv (bottom/right only, as in EfficientNet-Lite0): fused
    # as the epilogue of the conv before it, meta-schedule's tiling never wrote the padding border.
    rng = np.random.default_rng(3)
    layers = [(32, 1, 1, 0, 1), (32, 3, 2, (0, 0, 1, 1), 32), (32, 1, 1, 0, 1)]
    mod, _, _ = conv_module((1, 16, 14, 14), layers, rng, requantize=True)
    data = rng.integers(0, 256, (1, 16, 14, 14)).astype("uint8")
    expected = stock_reference(mod, data)
    np.testing.assert_array_equal(run(x86.build(mod, vnni_host()), data), expected)
