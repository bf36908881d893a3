"""docs/quant_math.md stays true: its worked examples are recomputed with tvmquant.quant_math.

Each example is a fenced block that opens with ```text and a line ``example: NAME``, then lines of
``key = value`` pairs (several per line, separated by ``;``) whose values are Python literals. Floats in
the doc are float32 values, compared exactly after ``np.float32(...)``. Numpy only: no TVM needed.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import numpy as np
import pytest

from tvmquant import quant_math as qm

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "quant_math.md"
EXAMPLE = re.compile(r"^```text\nexample: (\w+)\n(.*?)^```", re.S | re.M)
EXPECTED = {
    "affine_uint8",
    "affine_int8",
    "widened_range",
    "affine_int8_4bit",
    "symmetric_int8",
    "zero_width",
    "linear_layer",
    "relu6_bounds",
    "rounding_ties",
}


def _examples() -> dict[str, dict]:
    examples = {}
    for name, body in EXAMPLE.findall(DOC.read_text()):
        values = {}
        for line in body.strip().splitlines():
            for pair in line.split(";"):
                key, _, literal = pair.partition("=")
                values[key.strip()] = ast.literal_eval(literal.strip())
        assert name not in examples, f"example {name!r} appears twice in {DOC.name}"
        examples[name] = values
    return examples


EXAMPLES = _examples()


def f32(value):
    return np.asarray(value, dtype=np.float32)


def test_doc_has_every_example():
    assert set(EXAMPLES) == EXPECTED


@pytest.mark.parametrize("name", ["affine_uint8", "affine_int8", "widened_range", "affine_int8_4bit", "zero_width"])
def test_affine_examples(name):
    ex = EXAMPLES[name]
    bits = ex.get("bits", 8)
    qmin, qmax = qm.qrange(ex["dtype"], "affine", bits)
    if "qmin" in ex:
        assert (qmin, qmax) == (ex["qmin"], ex["qmax"])
    scale, zero_point = qm.compute_qparams(ex["a_min"], ex["a_max"], ex["dtype"], "affine", bits)
    assert scale == f32(ex["scale"])
    assert int(zero_point) == ex["zero_point"]
    if "x" in ex:
        q = qm.quantize(f32(ex["x"]), scale, zero_point, ex["dtype"], qmin=qmin, qmax=qmax)
        assert q.tolist() == ex["q"]
        if "x_hat" in ex:
            np.testing.assert_array_equal(qm.dequantize(q, scale, zero_point), f32(ex["x_hat"]))


def test_symmetric_example():
    ex = EXAMPLES["symmetric_int8"]
    qmin, qmax = qm.qrange("int8", "symmetric")
    assert (qmin, qmax) == (ex["qmin"], ex["qmax"])
    scale, zero_point = qm.compute_qparams(ex["a_min"], ex["a_max"], "int8", "symmetric")
    assert scale == f32(ex["scale"]) and int(zero_point) == 0
    q = qm.quantize(f32(ex["x"]), scale, zero_point, "int8", qmin=qmin, qmax=qmax)
    assert q.tolist() == ex["q"]


def test_linear_layer_example():
    """Zero-point folding, INT32 bias and float32 requantization, as RealizeQuant computes them."""
    ex = EXAMPLES["linear_layer"]
    scale_x, zero_x = qm.compute_qparams(-1.0, 3.0, "uint8", "affine")  # the affine_uint8 example's tensor
    assert scale_x == f32(ex["scale_x"]) and int(zero_x) == ex["zero_x"]
    qx, qw = np.array(ex["qx"], np.int64), np.array(ex["qw"], np.int64)
    assert int((qx * qw).sum()) == ex["sum_qx_qw"]
    assert -ex["zero_x"] * int(qw.sum()) == ex["folded_term"]
    acc = ex["sum_qx_qw"] + ex["folded_term"]
    assert acc == ex["acc"] == int(((qx - ex["zero_x"]) * qw).sum())
    scale_acc = (f32(scale_x) * f32(ex["scale_w"])).astype(np.float32)
    assert scale_acc == f32(ex["scale_acc"])
    bias_q = int(np.round(np.float64(ex["bias"]) / np.float64(scale_acc)))
    assert bias_q == ex["bias_q"]
    multiplier = np.float32(np.float64(scale_acc) / np.float64(f32(ex["scale_y"])))
    assert multiplier == f32(ex["multiplier"])
    q_y = qm.requantize(np.array([acc + bias_q]), multiplier, ex["zero_y"], 0, 255, "uint8")
    assert q_y.tolist() == [ex["q_y"]]


def test_relu6_bounds_example():
    ex = EXAMPLES["relu6_bounds"]
    qmin, qmax = qm.qrange(ex["dtype"])
    scale_y = np.float32(ex["scale_y"])
    low = max(qmin, int(np.round(np.float32(ex["clip_low"]) / scale_y)) + ex["zero_y"])
    high = min(qmax, int(np.round(np.float32(ex["clip_high"]) / scale_y)) + ex["zero_y"])
    assert (low, high) == (ex["low"], ex["high"])


def test_rounding_ties_example():
    ex = EXAMPLES["rounding_ties"]
    acc = np.array(ex["acc"])
    assert qm.requantize(acc, ex["multiplier"], 0, -128, 127, "int8").tolist() == ex["float_path"]
    multiplier, shift = qm.quantize_multiplier(ex["multiplier"])
    assert (int(multiplier), int(shift)) == (ex["q31_multiplier"], ex["shift"])
    fixed = qm.requantize_fixed_point(acc, multiplier, shift, 0, -128, 127, "int8")
    assert fixed.tolist() == ex["fixed_point_path"]


def test_doc_states_min_scale():
    assert qm.MIN_SCALE == f32(EXAMPLES["zero_width"]["scale"])
    assert "MIN_SCALE = 1e-8" in DOC.read_text()


def test_readme_links_the_doc_in_the_repository():
    readme = (ROOT / "README.md").read_text()
    assert "(docs/quant_math.md)" in readme
    assert "shared/QUANT_MATH.md" not in readme
