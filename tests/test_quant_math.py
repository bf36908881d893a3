"""Quantization primitives: exact hand-computed cases and bit-exact agreement with onnx.reference."""

import numpy as np
import pytest

from tvmquant import quant_math as qm


def test_affine_qparams_hand_computed():
    scale, zero_point = qm.compute_qparams(-1.0, 3.0, "int8", "affine")
    assert scale == np.float32(4.0 / 255)
    assert zero_point == -128 - round(-1.0 / (4.0 / 255))  # -128 + 64 = -64
    scale, zero_point = qm.compute_qparams(0.0, 2.55, "uint8", "affine")
    assert scale == np.float32(0.01) and zero_point == 0


def test_symmetric_qparams_hand_computed():
    scale, zero_point = qm.compute_qparams(-2.54, 1.0, "int8", "symmetric")
    assert scale == np.float32(2.54 / 127) and zero_point == 0


def test_one_sided_ranges_are_widened_to_contain_zero():
    scale, zero_point = qm.compute_qparams(2.0, 4.0, "uint8", "affine")
    assert scale == np.float32(4.0 / 255) and zero_point == 0
    scale, zero_point = qm.compute_qparams(-4.0, -2.0, "int8", "affine")
    assert scale == np.float32(4.0 / 255) and zero_point == 127
    # 0.0 is exact in both
    assert qm.dequantize(qm.quantize(0.0, scale, zero_point, "int8"), scale, zero_point) == 0.0


@pytest.mark.parametrize("scheme, dtype", [("affine", "uint8"), ("affine", "int8"), ("symmetric", "int8")])
def test_zero_width_range_gives_tiny_positive_scale(scheme, dtype):
    scale, zero_point = qm.compute_qparams(0.0, 0.0, dtype, scheme)
    assert np.isfinite(scale) and scale > 0
    q = qm.quantize(np.zeros(4, np.float32), scale, zero_point, dtype)
    assert np.all(qm.dequantize(q, scale, zero_point) == 0.0)


def test_per_channel_qparams():
    scale, zero_point = qm.compute_qparams(np.array([-1.0, 0.0, -3.0]), np.array([1.0, 0.0, 2.0]), "int8", "symmetric")
    np.testing.assert_array_equal(scale, np.array([1 / 127, qm.MIN_SCALE, 3 / 127], np.float32))
    np.testing.assert_array_equal(zero_point, [0, 0, 0])


def test_round_half_to_even_and_clipping():
    x = np.array([0.5, 1.5, 2.5, -0.5, -1.5, 300.0, -300.0], np.float32)
    np.testing.assert_array_equal(qm.quantize(x, 1.0, 0, "int8"), [0, 2, 2, 0, -2, 127, -128])
    np.testing.assert_array_equal(qm.quantize(x, 1.0, 0, "int8", qmin=-127, qmax=127)[-1], -127)
    np.testing.assert_array_equal(qm.quantize(x, 1.0, 10, "uint8"), [10, 12, 12, 10, 8, 255, 0])


def test_dtype_ranges_are_the_integer_types():
    for dtype, (low, high) in qm.DTYPE_RANGES.items():
        assert (low, high) == (np.iinfo(dtype).min, np.iinfo(dtype).max)
    assert set(qm.QUANT_DTYPES) < set(qm.DTYPE_RANGES)
    for dtype in qm.QUANT_DTYPES:  # the full 8-bit range is qrange's, and quantize's default clip
        assert qm.qrange(dtype) == qm.DTYPE_RANGES[dtype]
        q = qm.quantize(np.array([-1e6, 1e6], np.float32), 1.0, 0, dtype)
        assert q.dtype == np.dtype(dtype) and tuple(q.tolist()) == qm.DTYPE_RANGES[dtype]


def test_qrange():
    assert qm.qrange("int8") == (-128, 127)
    assert qm.qrange("int8", "symmetric") == (-127, 127)
    assert qm.qrange("uint8", bits=4) == (0, 15)
    assert qm.qrange("int8", "symmetric", bits=4) == (-7, 7)
    with pytest.raises(ValueError, match="signed"):
        qm.qrange("uint8", "symmetric")


@pytest.mark.parametrize("dtype", ["int8", "uint8"])
@pytest.mark.parametrize("per_channel", [False, True])
def test_bit_exact_with_onnx_reference(dtype, per_channel):
    from onnx import TensorProto, helper
    from onnx.reference import ReferenceEvaluator

    rng = np.random.default_rng(0)
    x = (rng.standard_normal((4, 3, 5, 5)) * 3).astype(np.float32)
    axis = 1
    if per_channel:
        lo, hi = x.min(axis=(0, 2, 3)), x.max(axis=(0, 2, 3))
    else:
        lo, hi = x.min(), x.max()
    scale, zero_point = qm.compute_qparams(lo, hi, dtype, "affine")
    np_dtype = np.int8 if dtype == "int8" else np.uint8
    onnx_type = TensorProto.INT8 if dtype == "int8" else TensorProto.UINT8
    nodes = [
        helper.make_node("QuantizeLinear", ["x", "scale", "zp"], ["q"], axis=axis),
        helper.make_node("DequantizeLinear", ["q", "scale", "zp"], ["y"], axis=axis),
    ]
    graph = helper.make_graph(
        nodes,
        "qdq",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, x.shape)],
        [
            helper.make_tensor_value_info("q", onnx_type, x.shape),
            helper.make_tensor_value_info("y", TensorProto.FLOAT, x.shape),
        ],
        initializer=[
            helper.make_tensor("scale", TensorProto.FLOAT, scale.shape, scale.ravel()),
            helper.make_tensor("zp", onnx_type, zero_point.shape, zero_point.astype(np_dtype).ravel()),
        ],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 19)])
    q_ref, y_ref = ReferenceEvaluator(model).run(None, {"x": x})
    q = qm.quantize(x, scale, zero_point, dtype, axis=axis if per_channel else None)
    y = qm.dequantize(q, scale, zero_point, axis=axis if per_channel else None)
    assert q.dtype == q_ref.dtype
    np.testing.assert_array_equal(q, q_ref)
    np.testing.assert_array_equal(y, y_ref)


def test_quantize_multiplier_hand_computed():
    multiplier, shift = qm.quantize_multiplier(0.5)
    assert multiplier == 1 << 30 and shift == 0
    multiplier, shift = qm.quantize_multiplier(0.25)
    assert multiplier == 1 << 30 and shift == 1
    multiplier, shift = qm.quantize_multiplier(np.array([0.75, 0.0]))
    np.testing.assert_array_equal(multiplier, [3 << 29, 0])


def test_requantize_fixed_point_rounds_half_away_from_zero():
    multiplier, shift = qm.quantize_multiplier(0.5)
    acc = np.array([1, 3, -1, -3, 5, 1000], np.int32)
    out = qm.requantize_fixed_point(acc, multiplier, shift, 0, -128, 127, "int8")
    np.testing.assert_array_equal(out, [1, 2, -1, -2, 3, 127])
    out = qm.requantize_fixed_point(acc, multiplier, shift, 10, 0, 255, "uint8")
    np.testing.assert_array_equal(out, [11, 12, 9, 8, 13, 255])


def test_fixed_point_matches_float_requantize_off_ties():
    rng = np.random.default_rng(1)
    acc = rng.integers(-(1 << 20), 1 << 20, size=10000).astype(np.int32)
    real = 0.00123456
    multiplier, shift = qm.quantize_multiplier(real)
    fixed = qm.requantize_fixed_point(acc, multiplier, shift, 3, -128, 127, "int8").astype(np.int32)
    exact = np.clip(np.round(acc.astype(np.float64) * real) + 3, -128, 127)
    assert np.max(np.abs(fixed - exact)) <= 1
    assert np.mean(fixed == exact) > 0.999


def test_sqnr():
    x = np.ones(100)
    assert qm.sqnr_db(x, x) == float("inf")
    assert qm.sqnr_db(x, x * 0.9) == pytest.approx(20.0)
