"""Tests of tvmquant.schedules.x86.fixed.schedule_row_reductions: softmax and LayerNorm kernels, one row at a time.

The schedule is structural (rfactor into vector lanes, the exponentials computed once per row) and the values
stay those of numpy; kernels that reduce along another axis are left to meta-schedule.
"""

from __future__ import annotations

import numpy as np
import pytest

tvm = pytest.importorskip("tvm")
from tvm import relax  # noqa: E402

from tvmquant.schedules import x86  # noqa: E402
from tvmquant.schedules.common import is_scheduled  # noqa: E402
from tvmquant.target import host_target  # noqa: E402

SHAPE = (2, 4, 24, 48)  # (batch, heads, rows, row length)


def _attention_module(scale: float = 1 / 255):
    """Softmax over the last axis, quantized to uint8 (what an INT8 attention's ``PV`` matmul reads), and a
    LayerNorm of a hidden state."""
    bb = relax.BlockBuilder()
    scores = relax.Var("scores", relax.TensorType(SHAPE, "float32"))
    hidden = relax.Var("hidden", relax.TensorType((2, 24, 48), "float32"))
    gamma = np.linspace(0.5, 1.5, 48, dtype=np.float32)
    beta = np.linspace(-0.2, 0.2, 48, dtype=np.float32)
    with bb.function("main", [scores, hidden]):
        with bb.dataflow():
            probs = bb.emit(relax.op.nn.softmax(scores, axis=-1))
            q = relax.op.clip(relax.op.round(relax.op.divide(probs, relax.const(np.float32(scale)))), 0, 255)
            q = bb.emit(relax.op.astype(q, "uint8"))
            norm = bb.emit(
                relax.op.nn.layer_norm(hidden, relax.const(gamma), relax.const(beta), axes=[-1], epsilon=1e-5)
            )
            out = bb.emit_output(relax.Tuple([q, norm]))
        bb.emit_func_output(out)
    return bb.get(), gamma, beta


def _kernels(mod, target):
    prepared = x86.prepare(mod, target)
    return {gv.name_hint: f for gv, f in prepared.functions.items() if isinstance(f, tvm.tirx.PrimFunc)}


def _blocks(func) -> dict:
    sch = tvm.s_tir.Schedule(tvm.IRModule({"main": func}))
    found = {}

    def walk(parent):
        for block in sch.get_child_blocks(parent):
            loops = [sch.get(loop) for loop in sch.get_loops(block)]
            found[str(sch.get(block).name_hint)] = loops
            walk(block)

    walk(sch.get_sblock("root"))
    return found


def test_softmax_and_layer_norm_kernels_are_scheduled_per_row():
    target = x86.x86_target("znver4", num_cores=2)  # AVX-512: 16 lanes
    mod, _, _ = _attention_module()
    kernels = _kernels(mod, target)
    softmax = next(f for name, f in kernels.items() if "softmax" in name)
    norm = next(f for name, f in kernels.items() if "layer_norm" in name)
    for func in (softmax, norm):
        assert bool(func.attrs["tirx.is_scheduled"])
        blocks = _blocks(func)
        partial = [name for name in blocks if name.endswith("_rf_update")]
        assert len(partial) == 2, blocks.keys()  # max and sum / sum and sum of squares
        for name in partial:  # the lanes of each partial reduction are one vector
            assert blocks[name][-1].kind == tvm.tirx.ForKind.VECTORIZED and int(blocks[name][-1].extent) == 16
        assert blocks[partial[0]][0].kind == tvm.tirx.ForKind.PARALLEL  # rows in parallel
    # The exponentials have their own block (computed once per row), not inlined into the sum and the quotient.
    exp_loops = _blocks(softmax)["T_softmax_exp"]
    assert exp_loops[-1].kind == tvm.tirx.ForKind.VECTORIZED
    assert softmax.script().count("T.reinterpret") == 1


def test_row_kernels_match_numpy():
    rng = np.random.default_rng(3)
    scores = rng.normal(0, 3, SHAPE).astype(np.float32)
    scores[0, 0, :, 40:] = -3.4e38  # masked positions
    hidden = rng.normal(1, 2, (2, 24, 48)).astype(np.float32)
    mod, gamma, beta = _attention_module()
    vm = relax.VirtualMachine(x86.build(mod, host_target()), tvm.cpu())
    q, norm = (t.numpy() for t in vm["main"](tvm.runtime.tensor(scores), tvm.runtime.tensor(hidden)))
    z = scores.astype(np.float64)
    z = np.exp(z - z.max(-1, keepdims=True))
    z /= z.sum(-1, keepdims=True)
    exact = z * 255
    assert (np.abs(q - exact) <= 0.5 + 1e-4).all()  # round-to-nearest of nearly the exact value
    assert (q[0, 0, :, 40:] == 0).all()
    h = hidden.astype(np.float64)
    expected = (h - h.mean(-1, keepdims=True)) / np.sqrt(h.var(-1, keepdims=True) + 1e-5) * gamma + beta
    np.testing.assert_allclose(norm, expected, rtol=1e-5, atol=2e-6)


def test_reductions_along_another_axis_are_left_alone():
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType((4, 64, 16), "float32"))
    with bb.function("main", [x]):
        with bb.dataflow():
            mean = relax.op.mean(x, axis=[1], keepdims=True)
            out = bb.emit_output(relax.op.subtract(x, mean))
        bb.emit_func_output(out)
    func = next(f for name, f in _kernels(bb.get(), x86.x86_target("znver4", num_cores=2)).items() if "mean" in name)
    assert not is_scheduled(func)  # left to the default schedules of build()


def test_a_per_row_max_written_out_is_scheduled_per_row_and_exact():
    """Dynamic quantization's per-token range: ``max(x, axis=-1)`` is the kernel's output itself."""
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType((2, 24, 48), "float32"))
    with bb.function("main", [x]):
        with bb.dataflow():
            out = bb.emit_output(relax.op.max(relax.op.abs(x), axis=[-1], keepdims=True))
        bb.emit_func_output(out)
    mod = bb.get()
    [func] = [f for name, f in _kernels(mod, x86.x86_target("znver4", num_cores=2)).items() if "max" in name]
    blocks = _blocks(func)
    [partial] = [name for name in blocks if name.endswith("_rf_update")]
    assert blocks[partial][-1].kind == tvm.tirx.ForKind.VECTORIZED
    data = np.random.default_rng(4).normal(0, 3, (2, 24, 48)).astype(np.float32)
    vm = relax.VirtualMachine(x86.build(mod, host_target()), tvm.cpu())
    np.testing.assert_array_equal(vm["main"](tvm.runtime.tensor(data)).numpy(), np.abs(data).max(-1, keepdims=True))


def test_a_batch_matmul_and_a_sum_over_tokens_are_left_alone():
    """Reductions written out whose reduction variable is not the last index of what they read."""
    bb = relax.BlockBuilder()
    a = relax.Var("a", relax.TensorType((1, 2, 32, 32), "int32"))  # BERT's PV product, smaller
    b = relax.Var("b", relax.TensorType((1, 2, 32, 16), "int32"))
    with bb.function("main", [a, b]):
        with bb.dataflow():
            out = bb.emit_output(relax.Tuple([bb.emit(relax.op.matmul(a, b)), bb.emit(relax.op.sum(a, axis=[2]))]))
        bb.emit_func_output(out)
    kernels = _kernels(bb.get(), x86.x86_target("znver4", num_cores=2))
    for name in ("matmul", "sum"):
        [func] = [f for n, f in kernels.items() if n.startswith(name)]
        assert not is_scheduled(func), name
