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


def test_fp32_blocked_convs_match_stock_tvm(fp32_residual):
    target = x86.x86_target(num_cores=2)
    blocked = relax.VirtualMachine(x86.build(fp32_residual, target), tvm.cpu())
    stock = relax.VirtualMachine(tvm.compile(fp32_residual, target=tvm.target.Target({"kind": "llvm"})), tvm.cpu())
    for image in calibration_images(2, seed=3):
        x = tvm.runtime.tensor(image[None])
        expected = stock["main"](x).numpy()
        np.testing.assert_allclose(blocked["main"](x).numpy(), expected, rtol=1e-5, atol=1e-5 * np.abs(expected).max())


def test_calibration_graph_convs_stay_nchw(quantized_residual):
    # Their weights come from observe markers (run-time values): packing them at every run was slower.
    from tvmquant.passes.calibrate import destination_markers

    graph = destination_markers(quantized_residual.annotated)
    names = [name for name, _, _ in _ops(x86.optimize_int8_for_x86(target=x86.x86_target(num_cores=2))(graph))]
    assert "conv2d_nchwc_float" not in names and "relax.nn.conv2d" in names
