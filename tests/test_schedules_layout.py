"""Tests of tvmquant.schedules.layout: residual blocks of a quantized model stay in the blocked layout."""

from __future__ import annotations

import numpy as np
import pytest

tvm = pytest.importorskip("tvm")
from models import calibration_images, residual_cnn  # noqa: E402
from tvm import relax, tirx  # noqa: E402

import tvmquant  # noqa: E402
from tvmquant._compat import is_const  # noqa: E402
from tvmquant.schedules import layout, x86  # noqa: E402

needs_vnni = pytest.mark.skipif("avx512_vnni" not in x86.cpu_flags(), reason="host CPU has no AVX512-VNNI")

UNBLOCK = tirx.IndexMap.from_func(lambda n, c, h, w, cb: (n, c * 16 + cb, h, w))
BLOCK = tirx.IndexMap.from_func(lambda n, c, h, w: (n, c // 16, h, w, c % 16))


def test_index_map_helpers():
    assert layout.is_identity_composition(UNBLOCK, BLOCK, (1, 4, 7, 7, 16))
    assert layout.unblock_factor(UNBLOCK, (1, 4, 7, 7, 16)) == 16
    shuffle = tirx.IndexMap.from_func(lambda n, c, h, w, cb: (n, cb * 4 + c, h, w))  # channels interleaved
    assert not layout.is_identity_composition(shuffle, BLOCK, (1, 4, 7, 7, 16))
    assert layout.unblock_factor(shuffle, (1, 4, 7, 7, 16)) is None


@pytest.fixture(scope="module")
def quantized_residual():
    model = tvmquant.quantize(residual_cnn(channels=16, size=16), calib_data=calibration_images(8), progress=False)
    return model


def _ops(mod):
    """(op name, rank of the first tensor argument, whether it is a constant) of every call in main.

    A ``call_tir`` is named by its PrimFunc (``layout_transform3``...) and described by its first argument.
    """
    calls = []

    def visit(expr):
        if not (isinstance(expr, relax.Call) and isinstance(expr.op, tvm.ir.Op)):
            return
        name, args = expr.op.name, list(expr.args)
        if name == "relax.call_tir":
            name, args = expr.args[0].name_hint.rstrip("0123456789"), list(expr.args[1].fields)
        first = args[0] if args else None
        ty = getattr(first, "ty", None)
        rank = len(ty.shape.values) if getattr(ty, "shape", None) is not None else None
        calls.append((name, rank, is_const(first)))

    relax.analysis.post_order_visit(mod["main"], visit)
    return calls


def test_residual_add_and_pool_run_blocked(quantized_residual):
    sunk = x86.optimize_int8_for_x86()(quantized_residual.mod)
    ops = _ops(sunk)
    # the float residual add (dequantized operands) and the max pool after it now see 5-D NCHW16c tensors
    assert ("relax.dequantize", 5, False) in ops
    assert any(name == "relax.nn.max_pool2d" and rank == 5 for name, rank, _ in ops)
    # Unblocking transforms of activations: only where an NCHW-only op (depthwise conv, concat, mean) needs
    # them, never a blocked -> NCHW -> blocked round trip.
    without = _without_sinking(quantized_residual.mod)
    transforms = [op for op in ops if op[0] == "layout_transform" and not op[2]]
    before = [op for op in _ops(without) if op[0] == "layout_transform" and not op[2]]
    assert len(transforms) < len(before), (transforms, before)


def _without_sinking(mod):
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(x86.passes, "SinkLayoutTransform", lambda: tvm.transform.Sequential([]))
        return x86.optimize_int8_for_x86()(mod)


@needs_vnni
def test_sinking_changes_no_result(quantized_residual):
    # The same integer model built with and without the pass: identical outputs, on several inputs.
    target = x86.x86_target(num_cores=2)
    data = calibration_images(3, seed=4)
    with_sink = relax.VirtualMachine(x86.build(quantized_residual.mod, target), tvm.cpu())
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(x86.passes, "SinkLayoutTransform", lambda: tvm.transform.Sequential([]))
        without = relax.VirtualMachine(x86.build(quantized_residual.mod, target), tvm.cpu())
    for image in data:
        x = tvm.runtime.tensor(image[None])
        np.testing.assert_array_equal(with_sink["main"](x).numpy(), without["main"](x).numpy())
    # and both equal the integer model through TVM's stock pipeline (none of tvmquant's x86 passes)
    stock = relax.VirtualMachine(
        tvm.compile(quantized_residual.mod, target=tvm.target.Target({"kind": "llvm"})), tvm.cpu()
    )
    x = tvm.runtime.tensor(data[:1])
    np.testing.assert_array_equal(with_sink["main"](x).numpy(), stock["main"](x).numpy())


# ---------------------------------------------------------------------------------------------------- FP32 convs
@pytest.fixture(scope="module")
def fp32_residual():
    from tvmquant.api import load_model

    mod, _, _, _ = load_model(residual_cnn(channels=16, size=16))
    return mod


def test_fp32_convs_run_blocked_and_their_residual_add_too(fp32_residual):
    ops = _ops(x86.optimize_int8_for_x86(target=x86.x86_target(num_cores=2))(fp32_residual))
    names = [name for name, _, _ in ops]
    assert "relax.nn.conv2d" not in names, names  # the 3-channel stem, 3x3, depthwise and 1x1 convs alike
    assert names.count("conv2d_nchwc_float") == 5 and names.count("depthwise_nchwc_float") == 1, names
    # the residual add between two blocked convs sees the blocked tensors: no round trip through NCHW
    assert ("relax.add", 5, False) in ops


def _assert_x86_build_matches_stock_tvm(mod, seed: int) -> None:
    target = x86.x86_target(num_cores=2)
    blocked = relax.VirtualMachine(x86.build(mod, target), tvm.cpu())
    stock = relax.VirtualMachine(tvm.compile(mod, target=tvm.target.Target({"kind": "llvm"})), tvm.cpu())
    for image in calibration_images(2, seed=seed):
        x = tvm.runtime.tensor(image[None])
        expected = stock["main"](x).numpy()
        np.testing.assert_allclose(blocked["main"](x).numpy(), expected, rtol=1e-5, atol=1e-5 * np.abs(expected).max())


def test_fp32_blocked_convs_match_stock_tvm(fp32_residual):
    _assert_x86_build_matches_stock_tvm(fp32_residual, seed=3)


def test_fp32_convs_of_channels_that_are_not_whole_vectors_run_in_8_lane_blocks():
    # MobileNetV2's 24-channel layers: NCHW, they were 40 of its calibration VM's 70 ms per batch of 4 on the
    # AMX Xeon; in 8-channel blocks (half a 512-bit vector) the whole graph took 27 ms.
    from tvmquant.api import load_model

    mod, _, _, _ = load_model(residual_cnn(channels=24, size=16))
    target = x86.x86_target(num_cores=2)
    names = [name for name, _, _ in _ops(x86.optimize_int8_for_x86(target=target)(mod))]
    assert "relax.nn.conv2d" not in names, names
    assert names.count("conv2d_nchwc_float") == 5 and names.count("depthwise_nchwc_float") == 1, names
    _assert_x86_build_matches_stock_tvm(mod, seed=4)


def test_kernels_compiled_while_others_are_scheduled_are_linked_only_where_they_are_the_lowered_ones(monkeypatch):
    # x86.build hands kernels to a worker thread as they are scheduled (_EarlyBuild). Here the second kernel
    # goes in with the first one's body: its module must be compiled again, not linked (wrong outputs).
    import importlib

    from tvmquant._compat import structural_equal
    from tvmquant.api import load_model

    build_module = importlib.import_module("tvmquant.schedules.x86.build")
    monkeypatch.setattr(build_module, "default_num_threads", lambda: 2)
    mod, _, _, _ = load_model(residual_cnn(channels=24, size=16))
    added, taken = [], []
    real_add, real_take = build_module._EarlyBuild.add, build_module._EarlyBuild.take

    def add(self, name, func):
        added.append((name, func))
        real_add(self, name, added[0][1] if len(added) == 2 else func)

    def take(self, kernels):
        self.flush()
        for _, future in self.jobs:
            future.exception()  # every module finished: none is cancelled, each is kept or dropped on its merits
        early, rest = real_take(self, kernels)
        taken.append((len(self.jobs), {n for funcs, _ in early for n in funcs}, {g.name_hint for g, _ in rest}))
        return early, rest

    monkeypatch.setattr(build_module._EarlyBuild, "add", add)
    monkeypatch.setattr(build_module._EarlyBuild, "take", take)
    _assert_x86_build_matches_stock_tvm(mod, seed=5)
    assert not structural_equal(added[0][1], added[1][1])
    jobs, linked, compiled_again = taken[-1]
    assert jobs >= 2 and added[1][0] in compiled_again and added[0][0] in compiled_again  # the same module
    assert linked and not linked & compiled_again, (linked, compiled_again)


def _markers(mod):
    from tvmquant._relax import parse_dps_marker

    found = []

    def visit(expr):
        parsed = parse_dps_marker(expr) if isinstance(expr, relax.Call) else None
        if parsed is not None:
            found.append((parsed[1], parsed[2], len(parsed[0].ty.shape.values)))

    relax.analysis.post_order_visit(mod["main"], visit)
    return found


def test_calibration_graph_convs_run_blocked_with_their_markers(quantized_residual):
    # The markers of the weights move onto the packed constants, those of the activations onto the blocked
    # tensors; each role says how its tensor is blocked.
    from tvmquant._relax import MarkerLayout
    from tvmquant.passes.calibrate import destination_markers

    graph = destination_markers(quantized_residual.annotated)
    optimized = x86.optimize_int8_for_x86(target=x86.x86_target(num_cores=2))(graph)
    names = [name for name, _, _ in _ops(optimized)]
    assert "relax.nn.conv2d" not in names and names.count("conv2d_nchwc_float") == 5, names
    markers = _markers(optimized)
    assert len(markers) == len(_markers(graph))  # none lost, none left behind on the OIHW weights
    blocked = [(name, role) for name, role, _ in markers if "@" in role]
    # Plain: the model input, the matmul's, and the one the concat's NCHW output feeds (the fifth conv's).
    plain = sorted(name for name, role, _ in markers if "@" not in role)
    assert plain == ["conv2d_0.in0", "conv2d_5.in0", "matmul_0.in0", "matmul_0.weight"], plain
    for name, role in blocked:
        base, layout_ = MarkerLayout.decode(role)
        assert base == ("weight" if name.endswith(".weight") else "activation") and layout_ is not None
        values = np.arange(np.prod(layout_.plain), dtype=np.float32).reshape(layout_.plain)
        np.testing.assert_array_equal(layout_.unblock(layout_.block(values)), values)


def test_observers_see_the_same_tensors_from_the_blocked_graph(quantized_residual):
    # What the callbacks see (plain by default) and what flows on after they change it (fake-quantizing in
    # place) match the NCHW graph's; with any_layout=True they see the blocked tensors, same values.
    from tvmquant.compile import host_build
    from tvmquant.passes.calibrate import compile_vm, observing, run_vm

    def capture(vm, any_layout=False):
        seen = {}

        def callback(name, array):
            seen[name] = array.copy()
            array *= 0.5  # a change the graph must carry on

        batch = {quantized_residual.inputs[0].name: calibration_images(1, seed=6)}
        with observing(callback, any_layout):
            out = run_vm(vm, batch, quantized_residual.inputs).numpy()
        return seen, out

    annotated = quantized_residual.annotated.with_attr("tvmquant.test", "blocked")  # a fresh VM
    blocked_seen, blocked_out = capture(compile_vm(annotated, build=host_build))
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(x86.passes, "parse_dps_marker", lambda value: None)  # markers keep their convs NCHW
        plain_vm = compile_vm(quantized_residual.annotated.with_attr("tvmquant.test", "nchw"), build=host_build)
    plain_seen, plain_out = capture(plain_vm)
    assert blocked_seen.keys() == plain_seen.keys()
    for name, array in plain_seen.items():
        assert blocked_seen[name].shape == array.shape, name
        np.testing.assert_allclose(blocked_seen[name], array, rtol=1e-4, atol=1e-4 * np.abs(array).max(), err_msg=name)
    np.testing.assert_allclose(blocked_out, plain_out, rtol=1e-4, atol=1e-4 * np.abs(plain_out).max())
    any_seen, any_out = capture(compile_vm(annotated, build=host_build), any_layout=True)
    assert any(any_seen[name].ndim > plain_seen[name].ndim for name in plain_seen)
    for name, array in plain_seen.items():
        np.testing.assert_allclose(
            np.sort(any_seen[name], axis=None), np.sort(array, axis=None), rtol=1e-4, atol=1e-4 * np.abs(array).max()
        )
    np.testing.assert_allclose(any_out, plain_out, rtol=1e-4, atol=1e-4 * np.abs(plain_out).max())


def test_gather_layout_transform_makes_one_kernel_per_distinct_transform():
    """Repeated transforms share one gather kernel; transforms that differ in shape, map or pad value get their
    own, and each call still reads its own input."""
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType((1, 16, 4, 4), "float32"))
    y = relax.Var("y", relax.TensorType((1, 16, 4, 4), "float32"))
    z = relax.Var("z", relax.TensorType((1, 12, 4, 4), "float32"))
    block8 = lambda n, c, h, w: (n, c // 8, h, w, c % 8)  # noqa: E731
    block4 = lambda n, c, h, w: (n, c // 4, h, w, c % 4)  # noqa: E731
    with bb.function("main", [x, y, z]):
        with bb.dataflow():
            a = bb.emit(relax.op.layout_transform(x, block8))
            b = bb.emit(relax.op.layout_transform(y, block8))
            c = bb.emit(relax.op.layout_transform(y, block4))
            d = bb.emit(relax.op.layout_transform(z, block8, pad_value=1.0))
            e = bb.emit(relax.op.layout_transform(z, block8, pad_value=0.0))
            out = bb.emit_output(relax.Tuple([a, b, c, d, e]))
        bb.emit_func_output(out)
    gathered = x86.passes.GatherLayoutTransform()(bb.get())
    kernels = [gv.name_hint for gv, f in gathered.functions.items() if isinstance(f, tirx.PrimFunc)]
    assert len([k for k in kernels if k.startswith("layout_transform")]) == 4, kernels
    rng = np.random.default_rng(25)
    xs, ys = (rng.standard_normal((1, 16, 4, 4)).astype("float32") for _ in range(2))
    zs = rng.standard_normal((1, 12, 4, 4)).astype("float32")
    vm = relax.VirtualMachine(tvm.compile(gathered, target="llvm"), tvm.cpu())
    got = [t.numpy() for t in vm["main"](*(tvm.runtime.tensor(v) for v in (xs, ys, zs)))]

    def blocked(v, block, fill=0.0):
        channels = -(-v.shape[1] // block) * block
        padded = np.full((1, channels, 4, 4), fill, np.float32)
        padded[:, : v.shape[1]] = v
        return padded.reshape(1, channels // block, block, 4, 4).transpose(0, 1, 3, 4, 2)

    expected = [blocked(xs, 8), blocked(ys, 8), blocked(ys, 4), blocked(zs, 8, 1.0), blocked(zs, 8)]
    for value, want in zip(got, expected, strict=True):
        np.testing.assert_array_equal(value, want)
