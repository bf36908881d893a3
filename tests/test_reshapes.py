"""Tests of tvmquant.schedules.reshapes.FoldRowReshapes: flatten/unflatten reshapes around linear layers go, so
that FuseOps fuses a matmul's requantize epilogue with what follows (BERT's GELU)."""

from __future__ import annotations

import numpy as np
import pytest

tvm = pytest.importorskip("tvm")
from tvm import relax  # noqa: E402

from tvmquant.schedules import x86  # noqa: E402
from tvmquant.schedules.reshapes import FoldRowReshapes  # noqa: E402
from tvmquant.target import host_target  # noqa: E402


def _ffn(rng, per_row_constant: bool = False):
    """u8 [1, 16, 32] -> flatten -> u8 x s8 matmul, bias, dequantize -> unflatten -> GELU -> flatten -> quantize ->
    matmul -> unflatten (a transformer FFN as ONNX exports and realize leave it)."""
    w1 = rng.integers(-128, 128, (32, 64)).astype("int8")
    w2 = rng.integers(-128, 128, (64, 32)).astype("int8")
    bias = rng.integers(-500, 500, (64,)).astype("int32")
    scale = rng.uniform(1e-4, 1e-3, (1, 64) if not per_row_constant else (16, 1)).astype("float32")
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType((1, 16, 32), "uint8"))
    with bb.function("main", [x]):
        with bb.dataflow():
            flat = bb.emit(relax.op.reshape(x, (16, 32)))
            acc = bb.emit(relax.op.add(relax.op.matmul(flat, relax.const(w1), out_dtype="int32"), relax.const(bias)))
            deq = bb.emit(relax.op.multiply(relax.op.astype(acc, "float32"), relax.const(scale)))
            h = bb.emit(relax.op.reshape(deq, (1, 16, 64)))
            gelu = bb.emit(relax.op.multiply(h, relax.op.add(relax.op.erf(h), relax.const(np.float32(1)))))
            flat2 = bb.emit(relax.op.reshape(gelu, (16, 64)))
            q = bb.emit(relax.op.quantize(flat2, relax.const(np.float32(0.02)), relax.const(3), out_dtype="uint8"))
            acc2 = bb.emit(relax.op.matmul(q, relax.const(w2), out_dtype="int32"))
            out = bb.emit_output(relax.op.reshape(acc2, (1, 16, 32)))
        bb.emit_func_output(out)
    return bb.get()


def _count(mod, op: str) -> int:
    return mod["main"].script().count(op)


def test_ffn_reshapes_fold_and_values_stay():
    rng = np.random.default_rng(5)
    mod = _ffn(rng)
    folded = FoldRowReshapes()(mod)
    assert _count(mod, "R.reshape(") == 4 and _count(folded, "R.reshape(") == 0
    data = rng.integers(0, 256, (1, 16, 32)).astype("uint8")
    runs = []
    for m in (mod, folded):
        vm = relax.VirtualMachine(tvm.compile(m, target=host_target()), tvm.cpu())
        runs.append(vm["main"](tvm.runtime.tensor(data)).numpy())
    np.testing.assert_array_equal(runs[0], runs[1])  # stock TVM kernels: the same arithmetic, other shapes


def test_the_x86_pipeline_fuses_the_first_matmul_with_the_gelu():
    prepared = x86.prepare(_ffn(np.random.default_rng(6)), x86.x86_target("znver4", num_cores=2))
    names = [gv.name_hint for gv, f in prepared.functions.items() if isinstance(f, tvm.tirx.PrimFunc)]
    assert any("dense_int8" in name and "erf" in name and "quantize" in name for name in names), names


def test_a_per_row_constant_keeps_the_reshapes():
    """A [16, 1] scale broadcasts along the rows of the flattened tensor: in [1, 16, 64] it would not mean the
    same, so that chain stays as it is."""
    mod = _ffn(np.random.default_rng(7), per_row_constant=True)
    folded = FoldRowReshapes()(mod)
    assert _count(folded, "R.reshape(") >= 2  # the first pair stays; the second (after the scale) may fold
    first = folded["main"].script().split("R.erf")[0]
    assert "R.reshape(" in first
