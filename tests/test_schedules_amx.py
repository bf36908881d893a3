"""Tests of the AMX-INT8 kernels (tvmquant.schedules.x86.amx).

Everywhere (no AMX needed): the per-kernel AMX/VNNI choice, the tile instructions in a library built for
Sapphire Rapids (codegen only), the AMX tensorize step in meta-schedule's design space, and the whole path
(im2col, packed weights, tiling, fused epilogue, the instruction stream's offsets and strides) bit-exact
against numpy with the emulated intrinsic (plain TIR performing the same tile loads, dot products and stores).
The clear error in place of SIGILL on a CPU without AMX.

Only with ``amx_int8`` in /proc/cpuinfo (skipped elsewhere): AMX output == VNNI output == numpy on convs of
every shape class and on a dense, and on the ResNet-50-style model of bench/speed_x86.py (slow).
"""

from __future__ import annotations

import json
import logging
import os
import sys

import numpy as np
import pytest

tvm = pytest.importorskip("tvm")
from tvm import relax  # noqa: E402
from tvm_ffi import structural_equal  # noqa: E402

from tvmquant import threads  # noqa: E402
from tvmquant.schedules import x86  # noqa: E402
from tvmquant.schedules.x86 import amx  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from test_schedules_x86 import (  # noqa: E402
    _called_functions,
    assembly,
    conv2d_reference,
    conv_module,
    run,
    stock_reference,
)

HOST_FLAGS = x86.cpu_flags()
needs_amx = pytest.mark.skipif("amx_int8" not in HOST_FLAGS, reason="host CPU has no AMX-INT8")
needs_vnni = pytest.mark.skipif("avx512_vnni" not in HOST_FLAGS, reason="host CPU has no AVX512-VNNI")
SAPPHIRE_RAPIDS = x86.x86_target("sapphirerapids", num_cores=2)
NO_AMX = ["-amx-int8", "-amx-tile"]

#: (data shape, out channels, kernel, stride, padding): one of each shape class AMX takes. M (pixels) or K
#: (C*R*S) not multiples of the tile, out channels not a multiple of 32, strided 1x1 and 3x3, the 7x7 stem.
AMX_CONVS = [
    ((1, 64, 8, 8), 64, 1, 1, 0),  # 1x1, exact tiles
    ((1, 64, 16, 16), 128, 1, 2, 0),  # 1x1 stride 2 (a ResNet shortcut)
    ((1, 32, 12, 12), 64, 3, 1, 1),  # 3x3: M = 144 -> 160, K = 288 -> 320
    ((1, 64, 16, 16), 64, 3, 2, 1),  # 3x3 stride 2
    ((1, 32, 8, 8), 48, 3, 1, 1),  # out channels 48 -> 64
    ((1, 3, 32, 32), 64, 7, 2, 3),  # the 7x7 stem: C = 3 -> 4, K = 196 -> 256
]
#: The emulated builds take ~20 s each on the 2 shared cores: the default suite runs the case that pads M and
#: K; the others are slow-marked (they run with -m slow, and on AMX hardware below without emulation).
EMULATED_CONVS = [case if case is AMX_CONVS[2] else pytest.param(case, marks=pytest.mark.slow) for case in AMX_CONVS]
#: (batch shape, K, N) of denses AMX takes.
AMX_DENSES = [((64,), 256, 96), ((2, 40), 192, 64), ((64,), 1024, 384)]  # the last one in groups of columns


def _dense_module(batch_shape, depth, cols, rng):
    weight = rng.integers(-128, 128, (depth, cols)).astype("int8")
    bias = rng.integers(-1000, 1000, (cols,)).astype("int32")
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType((*batch_shape, depth), "uint8"))
    with bb.function("main", [x]):
        with bb.dataflow():
            acc = bb.emit(relax.op.matmul(x, relax.const(weight), out_dtype="int32"))
            out = bb.emit_output(relax.op.add(acc, relax.const(bias)))
        bb.emit_func_output(out)
    return bb.get(), weight, bias


def _conv_case(case, seed=31):
    shape, out_ch, kernel, stride, padding = case
    rng = np.random.default_rng(seed)
    mod, (weight,), (bias,) = conv_module(shape, [(out_ch, kernel, stride, padding, 1)], rng)
    data = rng.integers(0, 256, shape).astype("uint8")
    return mod, data, conv2d_reference(data, weight, stride, padding) + bias


def _amx_kernels(prepared):
    return [name for name in _called_functions(prepared) if "int8_amx" in name]


# ----------------------------------------------------------------------------------------------------------
# Everywhere
def test_amx_only_for_targets_with_it_and_gemms_that_fill_tiles(caplog):
    assert x86.target_has_amx(SAPPHIRE_RAPIDS) and x86.target_has_amx(x86.x86_target("graniterapids"))
    assert not x86.target_has_amx(x86.x86_target("sapphirerapids", mattr=NO_AMX))
    assert not x86.target_has_amx(x86.x86_target("znver4")) and not x86.target_has_amx(x86.x86_target("cascadelake"))
    assert x86.target_has_amx(x86.x86_target("cascadelake", mattr=["+amx-int8", "+amx-tile"]))
    rng = np.random.default_rng(1)
    # A big 3x3 conv, a depthwise conv, a 1x1 to 10 channels (too narrow for a 32-column tile).
    layers = [(64, 3, 1, 1, 1), (64, 3, 1, 1, 64), (10, 1, 1, 0, 1)]
    mod, _, _ = conv_module((1, 64, 14, 14), layers, rng, requantize=True)
    with caplog.at_level(logging.INFO, logger="tvmquant.schedules.x86.amx"):
        prepared = x86.prepare(mod, SAPPHIRE_RAPIDS)
    calls = _called_functions(prepared)
    assert len(_amx_kernels(prepared)) == 1, calls
    assert any("depthwise_int8_nchwc" in name for name in calls)
    assert any("conv2d_int8_nchwc" in name for name in calls)  # the narrow 1x1 stays on VNNI
    messages = [r.getMessage() for r in caplog.records]
    assert any("(GEMM 196x64x576): AMX" in m for m in messages), messages
    assert any("64->10" in m and "VNNI" in m for m in messages), messages
    # The epilogue (bias, requantize, clip, cast) is fused into the AMX kernel: it writes uint8.
    name = _amx_kernels(prepared)[0]
    assert name.startswith("fused_conv2d_int8_amx") and str(prepared[name].params[-1].dtype) == "uint8"
    # Without AMX in the target nothing changes: every conv is VNNI-shaped.
    assert not _amx_kernels(x86.prepare(mod, x86.x86_target("sapphirerapids", num_cores=2, mattr=NO_AMX)))


def test_amx_weight_packing_layout():
    rng = np.random.default_rng(2)
    w = rng.integers(-128, 128, (100, 40)).astype("int8")
    packed = amx.pack_amx_weight(w)
    assert packed.shape == (64 // 32, 128 // 4, 32, 4)  # [N/32, K/4, 32, 4]: a column block's K contiguous
    k, n = 77, 33
    assert packed[n // 32, k // 4, n % 32, k % 4] == w[k, n]
    assert not packed[:, 25:].any() and not packed[1, :, 8:].any()  # zero padding of K and N
    conv = rng.integers(-128, 128, (8, 3, 2, 2)).astype("int8")
    gemm = amx.conv_weight_as_gemm(conv, channels=4)  # rows (r * S + s) * C + c
    assert gemm.shape == (2 * 2 * 4, 8)
    assert gemm[(1 * 2 + 0) * 4 + 2, 5] == conv[5, 2, 1, 0] and not gemm[3::4].any()


def test_amx_library_has_tile_instructions():
    # Codegen only: a library for Sapphire Rapids, built on any host.
    mod, _, _ = _conv_case(AMX_CONVS[2])
    asm = assembly(x86.build(mod, SAPPHIRE_RAPIDS))
    for instruction in ("tdpbusd", "tileloadd", "ldtilecfg", "tilestored"):
        assert instruction in asm, instruction
    dense, _, _ = _dense_module(*AMX_DENSES[0], np.random.default_rng(3))
    assert "tdpbusd" in assembly(x86.build(dense, SAPPHIRE_RAPIDS))


def test_default_amx_schedule_configures_tiles_once_per_row_of_blocks():
    # ldtilecfg costs about as much as four tdpbusd: the untuned schedule loads the configuration before the first
    # 32-column block of each row of blocks only, and skips the zero-fill of C that the intrinsic's tilezero
    # makes redundant (exactness: the emulated tests above, and on AMX hardware below).
    mod, _, _ = _conv_case(AMX_CONVS[1])  # 128 output channels: four column blocks per row of blocks
    prepared = x86.prepare(mod, SAPPHIRE_RAPIDS)
    [name] = _amx_kernels(prepared)
    scheduled = amx.schedule_amx_kernel(prepared[name], num_cores=2)
    lowered = scheduled.script()
    [config] = [line for line in lowered.splitlines() if "ldtilecfg" in line]
    assert lowered.count("ldtilecfg") == 1 and "tdpbusd" in lowered
    guard = lowered.splitlines()[lowered.splitlines().index(config) - 1]
    assert guard.strip().startswith("if ") and "% " in guard, guard
    assert "T.Broadcast(0, 32)" not in lowered and "= 0\n" not in lowered  # no zero-fill of the int32 blocks


def test_denses_with_large_weights_run_in_groups_of_columns():
    # Weights beyond amx.GROUP_WEIGHT_BYTES: groups of 128 columns outside the blocks of rows (each group's
    # weights read once per call), fused into one parallel loop; exactness is the emulated and hardware tests.
    rng = np.random.default_rng(4)
    for (batch_shape, depth, cols), group in zip(AMX_DENSES, (None, None, 128)):
        mod, _, _ = _dense_module(batch_shape, depth, cols, rng)
        prepared = x86.prepare(mod, SAPPHIRE_RAPIDS)
        [name] = _amx_kernels(prepared)
        sch = tvm.s_tir.Schedule(tvm.IRModule({"main": prepared[name]}))
        extents = [int(sch.get(loop).extent) for loop in sch.get_loops(amx._inline_elementwise(sch, ())[0])]
        assert amx._column_group(sch, amx._gemm_block(sch), extents) == group
        loops = amx.amx_schedule(prepared[name], 2).mod["main"].script()
        parallel = [line for line in loops.splitlines() if "T.parallel" in line]
        assert len(parallel) == 1 and (group is None or f"T.parallel(T.int64({(cols // group) * 2}))" in parallel[0])
    # The first-column tile configuration is right only because each group's int32 block is its own (32 x group)
    # buffer, starting at the group's first column: check the lowered allocation.
    lowered = []

    @tvm.instrument.pass_instrument
    class Capture:
        def run_after_pass(self, module, info):
            if info.name == "tirx.StorageRewrite":
                lowered.append(module.script())

    scheduled = amx.schedule_amx_kernel(prepared[name], 2).with_attr("global_symbol", "main")
    with tvm.transform.PassContext(opt_level=3, instruments=[Capture()]):
        tvm.compile(tvm.IRModule({"main": scheduled}), target=SAPPHIRE_RAPIDS)
    assert f'amx_gemm_int8 = T.alloc_buffer(({32 * 128},), "int32")' in lowered[0]


def test_amx_design_space_holds_the_tensorize_step():
    from tvm.s_tir import meta_schedule as ms

    from tvmquant.schedules._ms_worker import build_candidate

    mod, _, _ = conv_module((1, 64, 14, 14), [(64, 3, 1, 1, 1)], np.random.default_rng(7), requantize=True)
    tasks = [t for t in x86.extract_tasks(mod, SAPPHIRE_RAPIDS) if "int8_amx" in t.task_name]
    assert len(tasks) == 1
    func = tasks[0].dispatched[0]["main"]
    assert amx.is_amx_kernel(func)
    context = ms.TuneContext(
        mod=tasks[0].dispatched[0],
        target=SAPPHIRE_RAPIDS,
        space_generator=amx.space_generator(),
        search_strategy="replay-trace",
        task_name=tasks[0].task_name,
        rand_state=0,
    )
    sketches = list(context.generate_design_space())
    assert sketches
    intrinsic = amx.intrinsic_name(576)
    for sketch in sketches:
        assert f'ann_val="{intrinsic}"' in str(sketch.trace)
        assert "sample_perfect_tile" in str(sketch.trace)  # the outer tiles are searched
    sketch = sketches[0]
    assert all(postproc.apply(sketch) for postproc in context.space_generator.postprocs)
    assert "llvm.x86.tdpbusd" in sketch.mod.script()
    lib = build_candidate(
        tvm.IRModule({"main": sketch.mod["main"].with_attr("global_symbol", "main")}), SAPPHIRE_RAPIDS, None
    )
    assert "tdpbusd" in lib.inspect_source("asm")
    # The untuned default of the same kernel is the fixed AMX schedule.
    scheduled = amx.schedule_amx_kernel(func, 2)
    assert x86.is_scheduled(scheduled) and "llvm.x86.tdpbusd" in scheduled.script()


@pytest.mark.parametrize("case", EMULATED_CONVS, ids=lambda c: f"{c[1]}x{c[0][1]}k{c[2]}s{c[3]}")
def test_amx_conv_exact_emulated(case):
    mod, data, expected = _conv_case(case)
    with amx.emulated():
        prepared = x86.prepare(mod, x86.x86_target(num_cores=2))
        assert len(_amx_kernels(prepared)) == 1, _called_functions(prepared)
        executable = x86.build(mod, x86.x86_target(num_cores=2))
    np.testing.assert_array_equal(run(executable, data), expected)


@pytest.mark.slow
@pytest.mark.parametrize("batch_shape,depth,cols", AMX_DENSES)
def test_amx_dense_exact_emulated(batch_shape, depth, cols):
    rng = np.random.default_rng(8)
    mod, weight, bias = _dense_module(batch_shape, depth, cols, rng)
    data = rng.integers(0, 256, (*batch_shape, depth)).astype("uint8")
    with amx.emulated():
        assert _amx_kernels(x86.prepare(mod, x86.x86_target(num_cores=2)))
        executable = x86.build(mod, x86.x86_target(num_cores=2))
    expected = (data.astype(np.int64) @ weight.astype(np.int64) + bias).astype(np.int32)
    np.testing.assert_array_equal(run(executable, data), expected)


@pytest.mark.slow
def test_amx_requantized_chain_exact_emulated():
    # A requantized chain mixing AMX and VNNI kernels in one blocked graph: 3x3, strided 3x3, 1x1 on AMX,
    # the stem (too small here), a depthwise and a 10-channel 1x1 on VNNI.
    rng = np.random.default_rng(5)
    layers = [
        (32, 3, 1, 1, 1),
        (64, 3, 1, 1, 1),
        (64, 3, 2, 1, 1),
        (64, 1, 1, 0, 1),
        (64, 3, 1, 1, 64),
        (10, 1, 1, 0, 1),
    ]
    mod, _, _ = conv_module((1, 3, 16, 16), layers, rng, requantize=True)
    data = rng.integers(0, 256, (1, 3, 16, 16)).astype("uint8")
    expected = stock_reference(mod, data)
    assert 20 < expected.mean() < 235
    with amx.emulated():
        assert len(_amx_kernels(x86.prepare(mod, x86.x86_target(num_cores=2)))) == 3
        executable = x86.build(mod, x86.x86_target(num_cores=2))
    np.testing.assert_array_equal(run(executable, data), expected)


def test_no_amx_cpu_gets_a_clear_error_not_sigill(tmp_path, monkeypatch):
    from tvmquant.deploy import load_library
    from tvmquant.library import write_library

    mod, _, _ = _conv_case(AMX_CONVS[0])
    from tvmquant._io import InputSpec

    path = tmp_path / "model.so"
    metadata = write_library(
        x86.build(mod, SAPPHIRE_RAPIDS), mod, path, [InputSpec("x", (1, 64, 8, 8), "uint8")], SAPPHIRE_RAPIDS
    )
    assert metadata["amx_int8"] is True
    assert json.loads((tmp_path / "model.so.json").read_text())["amx_int8"] is True
    monkeypatch.setattr(threads, "cpu_has_amx", lambda *a: False)
    monkeypatch.setattr(threads, "_AMX_GRANTED", False)
    with pytest.raises(RuntimeError, match=r"model\.so.*uses AMX-INT8.*no amx_int8"):
        load_library(path)
    assert threads.request_amx_permission() is False
    with pytest.raises(RuntimeError, match="no amx_int8"):
        x86.tune(mod, SAPPHIRE_RAPIDS, trials=1, db_dir=str(tmp_path / "db"), progress=False)


def test_runner_workers_request_amx(monkeypatch):
    from tvmquant.schedules import _ms_worker

    calls = []
    monkeypatch.setattr(threads, "request_amx_permission", lambda: calls.append(1) or True)
    _ms_worker.runner_initializer()
    assert calls == [1]


# ----------------------------------------------------------------------------------------------------------
# Only on CPUs with AMX-INT8 (and VNNI): the real instructions, bit-exact against VNNI and numpy
@needs_amx
@needs_vnni
@pytest.mark.parametrize("case", AMX_CONVS, ids=lambda c: f"{c[1]}x{c[0][1]}k{c[2]}s{c[3]}")
def test_amx_conv_equals_vnni_and_numpy(case):
    assert threads.request_amx_permission()
    mod, data, expected = _conv_case(case)
    host = x86.x86_target(num_cores=2)
    assert x86.target_has_amx(host)
    with_amx = x86.build(mod, host)
    assert "tdpbusd" in assembly(with_amx)
    vnni = x86.build(mod, x86.x86_target(num_cores=2, mattr=NO_AMX))
    assert "tdpbusd" not in assembly(vnni) and "vpdpbusd" in assembly(vnni)
    np.testing.assert_array_equal(run(with_amx, data), expected)
    np.testing.assert_array_equal(run(vnni, data), expected)


@needs_amx
@needs_vnni
@pytest.mark.parametrize("batch_shape,depth,cols", AMX_DENSES)
def test_amx_dense_equals_vnni_and_numpy(batch_shape, depth, cols):
    assert threads.request_amx_permission()
    rng = np.random.default_rng(9)
    mod, weight, bias = _dense_module(batch_shape, depth, cols, rng)
    data = rng.integers(0, 256, (*batch_shape, depth)).astype("uint8")
    expected = (data.astype(np.int64) @ weight.astype(np.int64) + bias).astype(np.int32)
    with_amx = x86.build(mod, x86.x86_target(num_cores=2))
    assert "tdpbusd" in assembly(with_amx)
    np.testing.assert_array_equal(run(with_amx, data), expected)
    np.testing.assert_array_equal(run(x86.build(mod, x86.x86_target(num_cores=2, mattr=NO_AMX)), data), expected)


@needs_amx
@needs_vnni
@pytest.mark.slow
def test_resnet50_style_amx_equals_vnni_and_stock(tmp_path):
    """The ResNet-50-style network of bench/speed_x86.py, quantized: AMX library == VNNI library == TVM's stock
    pipeline on the same integer model (an exact integer reference), bit for bit."""
    import onnx

    import tvmquant

    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench"))
    from speed_x86 import resnet50_style

    path = tmp_path / "resnet50_style.onnx"
    onnx.save(resnet50_style(), str(path))
    rng = np.random.default_rng(1)
    calib = (rng.standard_normal((4, 3, 224, 224)) * 0.5).astype(np.float32)
    qmodel = tvmquant.quantize(str(path), calib_data=calib, progress=False, report_batches=0)
    host = x86.x86_target(num_cores=2)
    assert len(_amx_kernels(x86.prepare(qmodel.mod, host))) >= 20
    image = calib[:1]
    with_amx = qmodel.compile(host)(image)
    vnni = qmodel.compile(x86.x86_target(num_cores=2, mattr=NO_AMX))(image)
    stock = relax.VirtualMachine(tvm.compile(qmodel.mod, target=tvm.target.Target({"kind": "llvm"})), tvm.cpu())
    reference = stock["main"](tvm.runtime.tensor(image)).numpy()
    np.testing.assert_array_equal(with_amx, vnni)
    np.testing.assert_array_equal(with_amx, reference)


@pytest.mark.slow
def test_amx_tuning_records_replay_exactly_emulated(tmp_path):
    """meta-schedule tunes the AMX kernel from its design space (measured here with the emulated intrinsic),
    and build() replays the record: the tuned kernel is the AMX one and the result is exact."""
    from tvmquant.schedules.x86 import database

    mod, data, expected = _conv_case(AMX_CONVS[3])
    target = x86.x86_target(num_cores=2)
    db = str(tmp_path / "db")
    with amx.emulated():
        tasks = x86.extract_tasks(mod, target)
        amx_tasks = [t for t in tasks if "int8_amx" in t.task_name]
        assert len(amx_tasks) == 1
        x86.tune(mod, target, trials=2 * len(tasks), db_dir=db, strategy="replay-trace", progress=False)
        records = database.records_for_target(db, target)
        assert database._is_tuned(records, amx_tasks[0], target)
        traces = [str(r.trace) for r in records.get_all_tuning_records()]
        assert any(amx.intrinsic_name(576) in trace for trace in traces)
        # tune() seeded the AMX kernel with its untuned default (the fixed AMX schedule), which replays.
        task = amx_tasks[0]
        default = x86.default_schedule(task.dispatched[0]["main"], target, task.task_name, 2).mod["main"]
        workload = records.commit_workload(task.dispatched[0])
        replayed = []
        for record in records.get_all_tuning_records():
            if record.workload.same_as(workload):
                sch = tvm.s_tir.Schedule(task.dispatched[0])
                record.trace.apply_to_schedule(sch, remove_postproc=False)
                replayed.append(sch.mod["main"])
        assert any(structural_equal(func, default) for func in replayed)
        executable = x86.build(mod, target, db_dir=db)
    np.testing.assert_array_equal(run(executable, data), expected)


@pytest.mark.parametrize("target", [SAPPHIRE_RAPIDS, x86.x86_target("cascadelake", num_cores=2)], ids=["amx", "vnni"])
def test_requantize_epilogue_rounds_whole_vectors(target):
    # The requantize epilogue rounds half to even (tirx.nearbyint, from topi.round). TVM 0.27's VectorizeLoop
    # scalarized any vector loop holding one: 16 scalar roundings and byte-wise stores per vector, 2.4x the
    # time of a low-K 1x1 AMX conv (tvmquant._compat.vectorizable_nearbyint marks it vectorizable).
    rng = np.random.default_rng(2)
    mod, _, _ = conv_module((1, 64, 8, 8), [(64, 1, 1, 0, 1)], rng, requantize=True)
    asm = assembly(x86.build(mod, target))
    assert "vrndscaleps" in asm and "vpextrb" not in asm
    assert any("vrndscaleps" in line and "%zmm" in line for line in asm.splitlines())
