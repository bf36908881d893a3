"""Tests of tvmquant.schedules.x86.defaults: the heuristic default schedules of kernels without a tuning record.

They stay exact (same integers as TVM's stock ``tvm.compile``), are deterministic, keep the pad out of the
FP32 conv, and on a VNNI target still tensorize with ``vpdpbusd`` (codegen only: nothing runs for VNNI here).
"""

from __future__ import annotations

import importlib

import numpy as np
import pytest

tvm = pytest.importorskip("tvm")
from test_schedules_x86 import assembly, conv_module, needs_avx2, needs_vnni, run, stock_reference, vnni_host  # noqa: E402
from tvm import relax  # noqa: E402

from tvmquant._compat import structural_equal  # noqa: E402
from tvmquant.schedules import x86  # noqa: E402
from tvmquant.schedules.intrinsics import register_x86_intrinsics  # noqa: E402
from tvmquant.schedules.x86 import defaults  # noqa: E402

HASWELL = {"mcpu": "haswell", "num_cores": 2}  # AVX2: runs on this kind of host


def _dense_module(rng, batch: int, depth: int, cols: int):
    """u8 x s8 -> s32 matmul plus an int32 bias, as the realize passes emit it."""
    bb = relax.BlockBuilder()
    weight = rng.integers(-128, 128, (depth, cols)).astype("int8")
    bias = rng.integers(-1000, 1000, (cols,)).astype("int32")
    x = relax.Var("x", relax.TensorType((batch, depth), "uint8"))
    with bb.function("main", [x]):
        with bb.dataflow():
            acc = bb.emit(relax.op.matmul(x, relax.const(weight), out_dtype="int32"))
            out = bb.emit_output(relax.op.add(acc, relax.const(bias)))
        bb.emit_func_output(out)
    return bb.get()


def _untuned_kernels(mod, target):
    prepared = x86.prepare(mod, target)
    return [(name, prepared[name]) for name in x86.untuned_functions(prepared)]


def _fp32_conv_module(rng, shape=(1, 16, 12, 12), out_ch=24, kernel=3, padding=1):
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType(shape, "float32"))
    weight = rng.standard_normal((out_ch, shape[1], kernel, kernel)).astype("float32")
    bias = rng.standard_normal((1, out_ch, 1, 1)).astype("float32")
    with bb.function("main", [x]):
        with bb.dataflow():
            y = bb.emit(relax.op.nn.conv2d(x, relax.const(weight), padding=padding))
            y = bb.emit(relax.op.nn.relu(relax.op.add(y, relax.const(bias))))
            out = bb.emit_output(y)
        bb.emit_func_output(out)
    return bb.get()


def _fp32_depthwise_module(rng, shape=(2, 32, 14, 14)):
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType(shape, "float32"))
    weight = rng.standard_normal((shape[1], 1, 3, 3)).astype("float32")
    with bb.function("main", [x]):
        with bb.dataflow():
            y = bb.emit(relax.op.nn.conv2d(x, relax.const(weight), padding=1, groups=shape[1]))
            out = bb.emit_output(relax.op.clip(y, 0.0, 6.0))
        bb.emit_func_output(out)
    return bb.get()


@needs_avx2
def test_int8_defaults_exact_against_stock_tvm():
    """A requantized conv chain (3x3 with pad, strided 1x1) and a dense, built with the heuristic defaults
    and with the old first-sketch defaults: both give exactly TVM's stock integers."""
    rng = np.random.default_rng(21)
    layers = [(32, 3, 1, 1, 1), (48, 1, 2, 0, 1), (32, 3, 1, 1, 1)]
    mod, _, _ = conv_module((1, 16, 14, 14), layers, rng, requantize=True)
    target = x86.x86_target(**HASWELL)
    register_x86_intrinsics()
    kernels = [(n, f) for n, f in _untuned_kernels(mod, target) if "conv2d_int8_nchwc" in n]
    assert kernels
    for name, func in kernels:  # the heuristic schedules them itself (no fallback to a sampled sketch)
        assert defaults.choose_schedule(func, target, name, 2) is not None, name
    data = rng.integers(0, 256, (1, 16, 14, 14)).astype("uint8")
    expected = stock_reference(mod, data)
    assert 20 < expected.mean() < 235
    np.testing.assert_array_equal(run(x86.build(mod, target), data), expected)
    np.testing.assert_array_equal(run(x86.build(mod, target, fallback="first-sketch"), data), expected)

    dense = _dense_module(rng, batch=1, depth=256, cols=72)
    x = rng.integers(0, 256, (1, 256)).astype("uint8")
    np.testing.assert_array_equal(run(x86.build(dense, target), x), stock_reference(dense, x))


@needs_avx2
@pytest.mark.parametrize("blocked", [False, True], ids=["nchw", "nchw8c"])
def test_fp32_conv_defaults_keep_the_pad_out_and_match(blocked, monkeypatch):
    """The FP32 conv gets a vectorized register tile, the pad as its own block (not an ``if_then_else`` in the
    conv's vector loop), and the stock result: in NCHW (what calibration runs: its weights pass through
    observe markers) and blocked (constant weights, :class:`BlockFloatConv2d`)."""
    rng = np.random.default_rng(22)
    mod = _fp32_conv_module(rng)
    target = x86.x86_target(**HASWELL)
    if not blocked:
        monkeypatch.setattr(x86.passes, "BlockFloatConv2d", lambda target=None: tvm.transform.Sequential([]))
    (name, func), *_ = [(n, f) for n, f in _untuned_kernels(mod, target) if "conv2d" in n]
    assert ("nchwc_float" in name) == blocked, name
    scheduled = defaults.choose_schedule(func, target, name, 2)
    assert scheduled is not None
    script = scheduled.script()
    assert "T.vectorized" in script and "T.parallel" in script
    output = "conv2d_NCHWc_float_intermediate[" if blocked else "conv2d_nchw_intermediate["
    conv_update = [line for line in script.splitlines() if output in line and " + " in line]
    assert conv_update and not any("if_then_else" in line for line in conv_update)
    data = rng.standard_normal((1, 16, 12, 12)).astype("float32")
    np.testing.assert_allclose(run(x86.build(mod, target), data), stock_reference(mod, data), rtol=1e-5, atol=1e-5)


@needs_avx2
def test_fp32_depthwise_defaults_vectorize_one_channel_block_and_match():
    """The blocked FP32 depthwise conv vectorizes one vector of its channel block (8 lanes with AVX2), not the
    64-lane fusion of the register tile's columns with it that meta-schedule's postprocessor makes (slower to
    compile and to run), and gives the stock result."""
    rng = np.random.default_rng(23)
    mod = _fp32_depthwise_module(rng)
    target = x86.x86_target(**HASWELL)
    (name, func), *_ = [(n, f) for n, f in _untuned_kernels(mod, target) if "depthwise" in n]
    scheduled = defaults.choose_schedule(func, target, name, 2)
    assert scheduled is not None
    script = scheduled.script()
    vectors = [line for line in script.splitlines() if "T.vectorized(" in line]
    assert vectors and all("T.vectorized(T.int64(8))" in line for line in vectors), vectors
    data = rng.standard_normal((2, 32, 14, 14)).astype("float32")
    np.testing.assert_allclose(run(x86.build(mod, target), data), stock_reference(mod, data), rtol=1e-5, atol=1e-5)


def test_plain_defaults_skip_the_trial_compile_and_a_failed_build_retries_checked(monkeypatch):
    """``build`` accepts plain (not tensorized) default schedules without compiling each on its own (three
    quarters of the chooser's time), and when the module then fails to compile it builds again with every
    schedule checked: the result is still right."""
    build_module = importlib.import_module("tvmquant.schedules.x86.build")  # the package exports build()

    rng = np.random.default_rng(25)
    mod = _fp32_conv_module(rng, shape=(1, 8, 10, 10), out_ch=12)
    target = x86.x86_target(**HASWELL)
    trial_compiles = []
    real_candidate = defaults.build_candidate
    monkeypatch.setattr(defaults, "build_candidate", lambda *a: trial_compiles.append(1) or real_candidate(*a))
    (name, func), *_ = [(n, f) for n, f in _untuned_kernels(mod, target) if "conv2d" in n]
    assert defaults.choose_schedule(func, target, name, 2, verify="tensorized") is not None
    assert not trial_compiles
    assert defaults.choose_schedule(func, target, name, 2, verify="always") is not None
    assert len(trial_compiles) == 1

    real_build, calls = build_module._relax_build, []

    def failing_once(*args, **kwargs):
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("codegen failed in a kernel")
        return real_build(*args, **kwargs)

    monkeypatch.setattr(build_module, "_relax_build", failing_once)
    monkeypatch.setattr(build_module, "_CHECK_EVERY_DEFAULT", [False])
    build_module._SKETCH_CACHE.clear()
    trial_compiles.clear()
    executable = x86.build(mod, target)
    assert len(calls) == 2 and trial_compiles  # the second build checked its schedules one by one
    data = rng.standard_normal((1, 8, 10, 10)).astype("float32")
    np.testing.assert_allclose(run(executable, data), stock_reference(mod, data), rtol=1e-5, atol=1e-5)
    # Later builds in the process check at once: one compile, not a failed one and a retry.
    x86.build(mod, target)
    assert len(calls) == 3


def test_chooser_is_deterministic():
    rng = np.random.default_rng(23)
    mod, _, _ = conv_module((1, 32, 14, 14), [(64, 3, 1, 1, 1)], rng, requantize=True)
    for mcpu in ("haswell", "sapphirerapids"):
        target = x86.x86_target(mcpu, num_cores=2, mattr=["-amx-int8", "-amx-tile"] if mcpu != "haswell" else None)
        register_x86_intrinsics()
        name, func = next((n, f) for n, f in _untuned_kernels(mod, target) if "conv2d_int8_nchwc" in n)
        first = defaults.choose_schedule(func, target, name, 2)
        second = defaults.choose_schedule(func, target, name, 2)
        assert first is not None
        assert structural_equal(first, second)
        assert first.script() == second.script()


def test_vnni_default_schedules_are_tensorized():
    """Cross-compiled for Sapphire Rapids (nothing runs here): the heuristic's conv and dense schedules keep
    meta-schedule's VNNI tensorization, with a register tile of several ``vpdpbusd`` accumulators."""
    rng = np.random.default_rng(24)
    target = x86.x86_target("sapphirerapids", num_cores=2, mattr=["-amx-int8", "-amx-tile"])  # VNNI, no AMX
    register_x86_intrinsics()
    mod, _, _ = conv_module((1, 64, 14, 14), [(64, 3, 1, 1, 1), (128, 1, 1, 0, 1)], rng, requantize=True)
    dense = _dense_module(rng, batch=1, depth=512, cols=1000)
    kernels = [(n, f) for m in (mod, dense) for n, f in _untuned_kernels(m, target) if "int8" in n]
    assert len(kernels) == 3
    for name, func in kernels:
        scheduled = defaults.choose_schedule(func, target, name, 2)
        assert scheduled is not None, name
        assert "vpdpbusd" in scheduled.script()
        lib = tvm.compile(tvm.IRModule({"main": scheduled.with_attr("global_symbol", "main")}), target=target)
        asm = lib.mod.inspect_source("asm")
        assert asm.count("vpdpbusd") >= 4, name  # unrolled over the register tile
    asm = assembly(x86.build(mod, target))
    assert "vpdpbusd" in asm


def test_cpu_model_and_register_tile():
    avx2 = defaults.cpu_model(x86.x86_target("haswell", num_cores=2))
    avx512 = defaults.cpu_model(x86.x86_target("sapphirerapids", num_cores=4))
    assert (avx2.vector_bits, avx2.vector_registers, avx2.num_cores) == (256, 16, 2)
    assert (avx512.vector_bits, avx512.vector_registers, avx512.num_cores) == (512, 32, 4)
    assert avx2.accumulators == 12 and avx512.accumulators == 24
    # acc[oc, y, x] += data[c, y, x] * w[oc, c] (FP32 NCHW 1x1): x is the vector, oc and y register rows.
    loop = defaults._Loop
    loops = [
        loop(None, "ff", 64, True, 3136, (0, 64), 64),
        loop(None, "yy", 56, True, 56, (56, 0), 56),
        loop(None, "xx", 56, True, 1, (1, 0), 56),
        loop(None, "rc", 64, False, 0, (3136, 1), 64),
    ]
    tile = defaults._register_tile(loops, avx2, lanes=8)
    assert tile[2] % 8 == 0  # whole vectors along the contiguous axis
    ops = tile[0] * tile[1] * tile[2] // 8
    assert 8 <= ops <= avx2.accumulators  # enough independent accumulators, within the registers


def test_integer_function_evaluates_index_expressions_as_tvm_does():
    """The heuristic's Python index evaluator agrees with TVM's arithmetic (floor division and modulo of
    negatives included) and declines what it cannot evaluate."""
    from tvm import tirx
    from tvm.sym import Analyzer

    i, j = tirx.Var("i", "int64"), tirx.Var("j", "int64")
    expressions = [
        (i * 16 + j) // 7,
        tirx.floormod(i - 3 * j, 5),
        tirx.floordiv(i - j * 9, 4) + tirx.Cast("int64", tirx.Min(i, j)),
        tirx.Max(i * j - 2, j),
    ]
    for expr in expressions:
        fn = defaults._integer_function(expr, [i, j])
        assert fn is not None, expr
        for a, b in [(0, 0), (3, 1), (1, 3), (-5, 2), (7, -4)]:
            analyzer = Analyzer()
            analyzer.bind(i, tirx.IntImm("int64", a))
            analyzer.bind(j, tirx.IntImm("int64", b))
            assert fn([a, b]) == int(analyzer.simplify(expr)), (expr, a, b)
    assert defaults._integer_function(i * tirx.Var("k", "int64"), [i, j]) is None  # a variable it was not given
    assert defaults._integer_function(tirx.truncdiv(i, j), [i, j]) is None  # not floor division


@pytest.mark.parametrize(
    ("kernel", "channels", "chunk"), [(3, 256, 2), (3, 128, 2), (1, 256, 4)], ids=["3x3", "3x3-128", "1x1"]
)
def test_fp32_conv_reduces_the_input_channels_whose_operands_fit_in_l1(kernel, channels, chunk):
    """A blocked FP32 conv reduces up to INNER_REDUCTION input channels (4 blocks of 8) in its register tile,
    fewer where the weights the tile reads over them (4 output blocks x 9 taps x 64 values per block of a 3x3
    conv) would leave the L1 cache: 2 blocks for a 3x3 conv (also where all its 16 blocks would be few enough
    to take whole, as a short reduction loop is), 4 for a 1x1."""
    rng = np.random.default_rng(24)
    mod = _fp32_conv_module(rng, shape=(1, channels, 14, 14), out_ch=256, kernel=kernel, padding=kernel // 2)
    target = x86.x86_target(**HASWELL)
    (name, func), *_ = [(n, f) for n, f in _untuned_kernels(mod, target) if "conv2d" in n]
    sch = tvm.s_tir.Schedule(tvm.IRModule({"main": func}))
    loops, operand_bytes = defaults._analyze(sch, sch.get_sblock("conv2d_NCHWc_float"))
    plan = defaults._plan(loops, operand_bytes, defaults.cpu_model(target), 32, False, False)
    assert plan["ic_inner"] == (1, 8)
    assert plan["ic_outer"] == (channels // 8 // chunk, chunk)


def _dequantized_dense_module(rng, batch: int, depth: int, cols: int):
    """A BERT-style INT8 linear layer: u8 x s8 -> s32, bias, dequantized to float32 (the FFN's epilogue)."""
    bb = relax.BlockBuilder()
    weight = rng.integers(-128, 128, (depth, cols)).astype("int8")
    bias = rng.integers(-1000, 1000, (cols,)).astype("int32")
    scale = rng.uniform(1e-4, 1e-3, (cols,)).astype("float32")
    x = relax.Var("x", relax.TensorType((batch, depth), "uint8"))
    with bb.function("main", [x]):
        with bb.dataflow():
            acc = bb.emit(relax.op.add(relax.op.matmul(x, relax.const(weight), out_dtype="int32"), relax.const(bias)))
            out = bb.emit_output(relax.op.multiply(relax.op.astype(acc, "float32"), relax.const(scale)))
        bb.emit_func_output(out)
    return bb.get(), (weight, bias, scale)


def _accumulators(func) -> int:
    """Spatial iterations inside the innermost reduction loop around the tensorized dense block: the register
    tile, one ``vpdpbusd`` accumulator each."""
    sch = tvm.s_tir.Schedule(tvm.IRModule({"main": func}))
    loops = [sch.get(loop) for loop in sch.get_loops(sch.get_sblock("dense_packed_int8_o_update"))]
    last_reduction = max(i for i, loop in enumerate(loops) if str(loop.loop_var.name).startswith("k"))
    return int(np.prod([int(loop.extent) for loop in loops[last_reduction + 1 :]]))


def test_vnni_dense_default_has_a_register_tile_and_a_vectorized_epilogue():
    """A 64 x 256 x 384 dequantizing dense (sapphirerapids without AMX, cross-compiled): meta-schedule's vectorize
    postprocessor would vectorize the register tile's row loop around the VNNI body (LLVM refuses it), so the
    default keeps the rows x column-blocks tile (the ``epilogue-vectors`` mode) and vectorizes the epilogue
    itself. Before, the tile was cut to one column block (4 accumulators) and the epilogue left to LLVM."""
    rng = np.random.default_rng(31)
    target = x86.x86_target("sapphirerapids", num_cores=2, mattr=["-amx-int8", "-amx-tile"])
    register_x86_intrinsics()
    mod, _ = _dequantized_dense_module(rng, 64, 256, 384)
    [(name, func)] = [(n, f) for n, f in _untuned_kernels(mod, target) if "dense_int8" in n]
    scheduled = defaults.choose_schedule(func, target, name, 2)
    assert scheduled is not None and "vpdpbusd" in scheduled.script()
    assert _accumulators(scheduled) >= 8
    sch = tvm.s_tir.Schedule(tvm.IRModule({"main": scheduled}))
    epilogue = sch.get(sch.get_loops(sch.get_sblock("T_multiply"))[-1])
    assert epilogue.kind == tvm.tirx.ForKind.VECTORIZED and int(epilogue.extent) == 16


@needs_vnni
def test_vnni_dequantizing_dense_exact():
    """The same kind of kernel, run on this VNNI host: equal to numpy (int64 accumulation, float32 epilogue)."""
    rng = np.random.default_rng(32)
    mod, (weight, bias, scale) = _dequantized_dense_module(rng, 48, 320, 160)
    data = rng.integers(0, 256, (48, 320)).astype("uint8")
    expected = (data.astype(np.int64) @ weight.astype(np.int64) + bias).astype(np.float32) * scale
    np.testing.assert_array_equal(run(x86.build(mod, vnni_host()), data), expected)
