"""Tests of tvmquant.schedules.x86.fast_math: the vectorizable exp / erf / sigmoid / softmax of the x86 pipeline.

Accuracy against float64 numpy on dense sweeps (including the clamps, inf and NaN), and the pipeline using them:
no call of libm's ``expf``/``erff`` is left in a GELU or softmax kernel prepared for x86, while float16 keeps
TVM's own legalization.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

tvm = pytest.importorskip("tvm")
from tvm import relax, te  # noqa: E402

from tvmquant.schedules import x86  # noqa: E402
from tvmquant.schedules.x86 import fast_math  # noqa: E402
from tvmquant.target import host_target  # noqa: E402

SPECIAL = np.array([np.nan, np.inf, -np.inf, 0.0, -0.0], np.float32)


def _run(te_func, x: np.ndarray, *args) -> np.ndarray:
    placeholder = te.placeholder(x.shape, "float32", name="x")
    lib = tvm.compile(te.create_prim_func([placeholder, te_func(placeholder, *args)]), target=host_target())
    out = tvm.runtime.tensor(np.empty_like(x))
    lib(tvm.runtime.tensor(x), out)
    return out.numpy()


def test_exp_within_one_ulp_and_its_limits():
    x = np.linspace(-100, 100, 400_001, dtype=np.float32)
    y = _run(fast_math.fast_exp, np.concatenate([x, SPECIAL]))
    got, special = y[: x.size], y[x.size :]
    exact = np.exp(x.astype(np.float64))
    normal = (x > -87) & (x < 88)
    ulp = np.abs(got[normal] - exact[normal]) / np.spacing(exact[normal].astype(np.float32))
    assert ulp.max() <= 1.1
    assert got[x < -87.4].max() < 1.2e-38 and (got[x < -88.4] == 0).all()
    assert np.isinf(got[x > 88.73]).all() and np.isfinite(got[x < 88.7]).all()
    assert np.isnan(special[0]) and special[1] == np.inf and special[2] == 0 and (special[3:] == 1).all()


def test_erf_and_sigmoid_accuracy():
    x = np.linspace(-10, 10, 200_001, dtype=np.float32)
    erf = _run(fast_math.fast_erf, np.concatenate([x, SPECIAL]))
    exact = np.array([math.erf(v) for v in x.astype(np.float64)])
    assert np.abs(erf[: x.size] - exact).max() < 3.5e-7
    small = np.abs(x) < 0.1
    assert (np.abs(erf[: x.size] - exact)[small] / np.maximum(np.abs(exact[small]), 1e-30)).max() < 2.5e-7
    assert erf[x.size + 1] == 1 and erf[x.size + 2] == -1 and (erf[x.size + 3 :] == 0).all()
    sigmoid = _run(fast_math.fast_sigmoid, x)
    exact = 1 / (1 + np.exp(-x.astype(np.float64)))
    assert (np.abs(sigmoid - exact) / exact).max() < 3e-7


@pytest.mark.parametrize("axis", [-1, 1, 0])
def test_softmax_matches_along_any_axis(axis):
    x = np.random.default_rng(0).normal(0, 4, (3, 7, 33)).astype(np.float32)
    x[0, 0, :5] = -3.4e38  # an attention mask's fill value
    z = x.astype(np.float64)
    z = np.exp(z - z.max(axis, keepdims=True))
    z /= z.sum(axis, keepdims=True)
    np.testing.assert_allclose(_run(fast_math.fast_softmax, x, axis), z, rtol=1e-6, atol=1e-7)


def _module(dtype: str):
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType((4, 64), dtype))
    with bb.function("main", [x]):
        with bb.dataflow():
            gelu = relax.op.multiply(x, relax.op.add(relax.op.erf(x), relax.const(np.ones((), dtype))))
            out = bb.emit_output(relax.op.nn.softmax(bb.emit(gelu), axis=-1))
        bb.emit_func_output(out)
    return bb.get()


def test_x86_pipeline_legalizes_float32_to_the_fast_forms_only():
    target = x86.x86_target("znver4", num_cores=2)
    float32 = x86.prepare(_module("float32"), target).script()
    assert "T.erf(" not in float32 and "T.exp(" not in float32 and "T.reinterpret" in float32
    float16 = x86.prepare(_module("float16"), target).script()
    assert "T.erf(" in float16 and "T.exp(" in float16


def test_gelu_softmax_model_runs_close_to_numpy():
    x = np.random.default_rng(1).normal(0, 2, (4, 64)).astype(np.float32)
    vm = relax.VirtualMachine(x86.build(_module("float32"), host_target()), tvm.cpu())
    got = vm["main"](tvm.runtime.tensor(x)).numpy()
    z = x.astype(np.float64) * (1 + np.array([[math.erf(v) for v in row] for row in x.astype(np.float64)]))
    z = np.exp(z - z.max(-1, keepdims=True))
    np.testing.assert_allclose(got, z / z.sum(-1, keepdims=True), rtol=2e-6, atol=1e-7)


def test_a_gelu_kernel_runs_in_parallel_and_a_copy_of_its_size_does_not():
    """BERT-base's FFN activations (128 x 3072) are below the data-movement kernels' parallel size, but a GELU
    with the polynomial erf computes enough to be worth both cores; a transpose of the same size stays serial."""
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType((128, 3072), "float32"))
    with bb.function("main", [x]):
        with bb.dataflow():
            gelu = bb.emit(relax.op.multiply(x, relax.op.add(relax.op.erf(x), relax.const(np.float32(1)))))
            out = bb.emit_output(relax.Tuple([gelu, bb.emit(relax.op.permute_dims(x, [1, 0]))]))
        bb.emit_func_output(out)
    prepared = x86.prepare(bb.get(), x86.x86_target("znver4", num_cores=2))
    kernels = {gv.name_hint: f.script() for gv, f in prepared.functions.items() if isinstance(f, tvm.tirx.PrimFunc)}
    [gelu] = [text for name, text in kernels.items() if "erf" in name]
    [copy] = [text for name, text in kernels.items() if "transpose" in name or "permute" in name]
    assert "T.parallel" in gelu and "T.parallel" not in copy
