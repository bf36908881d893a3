"""Graph passes: TVMScript Before/Expected, idempotence, well-formedness, realize == simulate."""

import numpy as np
import pytest
import tvm
from models import calibration_images, residual_cnn, residual_cnn_dynamic_batch, transformer_block
from tvm import relax
from tvm.script import ir as I
from tvm.script import relax as R
from tvm.script import tirx as T

from tvmquant import QuantConfig, quantize
from tvmquant._compat import to_tensor
from tvmquant.frontend.prepare import CanonicalizeClip, prepare
from tvmquant.passes import AnnotateQuant, BindQuantParams, ExposeQuantizedTensors, QParams, RealizeQuant
from tvmquant.passes.annotate import LAYERS_ATTR, layers_of
from tvmquant.passes.calibrate import compile_vm, run_vm
from tvmquant.testing.forcing import teacher_forced


def _strip_layers(mod):
    mod = mod.clone() if hasattr(mod, "clone") else mod
    func = mod["main"]
    if func.attrs is not None and LAYERS_ATTR in func.attrs:
        mod["main"] = func.without_attr(LAYERS_ATTR)
    return mod


def _well_formed(mod):
    assert relax.analysis.well_formed(mod) is not False


def test_canonicalize_clip_turns_min_max_into_clip_and_relu():
    @I.ir_module
    class Before:
        @R.function
        def main(x: R.Tensor((1, 4), "float32")) -> R.Tensor((1, 4), "float32"):
            with R.dataflow():
                a = R.maximum(x, R.const(0.0, "float32"))
                b = R.minimum(R.maximum(a, R.const(-1.0, "float32")), R.const(6.0, "float32"))
                R.output(b)
            return b

    @I.ir_module
    class Expected:
        @R.function
        def main(x: R.Tensor((1, 4), "float32")) -> R.Tensor((1, 4), "float32"):
            with R.dataflow():
                a = R.nn.relu(x)
                b = R.clip(a, T.float64(-1.0), T.float64(6.0))
                R.output(b)
            return b

    after = prepare(Before)
    _well_formed(after)
    tvm.ir.assert_structural_equal(after, Expected)
    tvm.ir.assert_structural_equal(prepare(after), after)
    assert CanonicalizeClip is not None


def test_annotate_before_expected():
    weight = np.arange(18, dtype=np.float32).reshape(3, 2, 3, 1) / 10.0 - 0.8

    @I.ir_module
    class Before:
        @R.function
        def main(x: R.Tensor((1, 2, 4, 4), "float32")) -> R.Tensor((1, 3, 2, 4), "float32"):
            R.func_attr({"num_input": 1})
            with R.dataflow():
                c = R.nn.conv2d(x, R.const(weight))
                r = R.nn.relu(c)
                R.output(r)
            return r

    @I.ir_module
    class Expected:
        @R.function
        def main(x: R.Tensor((1, 2, 4, 4), "float32")) -> R.Tensor((1, 3, 2, 4), "float32"):
            R.func_attr({"num_input": 1})
            with R.dataflow():
                xi = R.call_pure_packed(
                    "tvmquant.observe",
                    x,
                    R.str("conv2d_0.in0"),
                    R.str("activation"),
                    ty_args=(R.Tensor((1, 2, 4, 4), "float32"),),
                )
                wi = R.call_pure_packed(
                    "tvmquant.observe",
                    R.const(weight),
                    R.str("conv2d_0.weight"),
                    R.str("weight"),
                    ty_args=(R.Tensor((3, 2, 3, 1), "float32"),),
                )
                c = R.nn.conv2d(xi, wi)
                r = R.nn.relu(c)
                R.output(r)
            return r

    after = AnnotateQuant(QuantConfig())(Before)
    _well_formed(after)
    tvm.ir.assert_structural_equal(_strip_layers(after), Expected)
    (layer,) = layers_of(after)
    assert (layer.name, layer.op_type, layer.inputs, layer.weight, layer.weight_axis) == (
        "conv2d_0",
        "conv2d",
        ["conv2d_0.in0"],
        "conv2d_0.weight",
        0,
    )
    # idempotent
    tvm.ir.assert_structural_equal(AnnotateQuant(QuantConfig())(after), after)


def _qp(name, role, dtype, scheme, scale, zero_point, qmin, qmax, axis=None):
    return QParams(
        name, role, dtype, scheme, np.asarray(scale, np.float32), np.asarray(zero_point, np.int32), qmin, qmax, axis
    )


def _one_conv():
    """A 1x1 conv of a (1, 2, 2, 2) input and its quantization table (uint8 affine in, per-channel weight)."""
    weight = np.array([[[[0.5]], [[-0.25]]], [[[1.0]], [[0.75]]]], np.float32)  # (2, 2, 1, 1)

    @I.ir_module
    class Before:
        @R.function
        def main(x: R.Tensor((1, 2, 2, 2), "float32")) -> R.Tensor((1, 2, 2, 2), "float32"):
            R.func_attr({"num_input": 1})
            with R.dataflow():
                c = R.nn.conv2d(x, R.const(weight))
                R.output(c)
            return c

    table = {
        "conv2d_0.in0": _qp("conv2d_0.in0", "activation", "uint8", "affine", 0.5, 10, 0, 255),
        "conv2d_0.weight": _qp(
            "conv2d_0.weight", "weight", "int8", "symmetric", [0.5 / 127, 1.0 / 127], [0, 0], -127, 127, 0
        ),
    }
    return Before, table


def test_bind_then_realize_before_expected():
    Before, table = _one_conv()
    annotated = AnnotateQuant(QuantConfig())(Before)
    realized = RealizeQuant()(BindQuantParams(table)(annotated))
    _well_formed(realized)
    weight_q = np.array([[[[127]], [[-64]]], [[[127]], [[95]]]], np.int8)
    correction = (-10 * weight_q.reshape(2, -1).astype(np.int32).sum(axis=1)).reshape(1, 2, 1, 1)
    scale = (np.float32(0.5) * np.array([0.5 / 127, 1.0 / 127], np.float32)).reshape(1, 2, 1, 1)

    @I.ir_module
    class Expected:
        @R.function
        def main(x: R.Tensor((1, 2, 2, 2), "float32")) -> R.Tensor((1, 2, 2, 2), "float32"):
            R.func_attr({"num_input": 1})
            with R.dataflow():
                q = R.quantize(x, R.const(0.5, "float32"), R.const(10, "int32"), out_dtype="uint8", axis=-1)
                acc = R.nn.conv2d(q, R.const(weight_q), out_dtype="int32")
                acc2 = R.add(acc, R.const(correction.astype(np.int32)))
                f = R.astype(acc2, "float32")
                c = R.multiply(f, R.const(scale.astype(np.float32)))
                R.output(c)
            return c

    tvm.ir.assert_structural_equal(_strip_layers(realized), Expected)
    tvm.ir.assert_structural_equal(RealizeQuant()(realized), realized)


def test_passes_are_passes_that_compose_in_sequential():
    Before, table = _one_conv()
    passes = [CanonicalizeClip(), AnnotateQuant(QuantConfig()), BindQuantParams(table), RealizeQuant()]
    assert all(isinstance(p, tvm.transform.Pass) for p in passes + [ExposeQuantizedTensors()])
    assert [p.info.name for p in passes] == ["CanonicalizeClip", "AnnotateQuant", "BindQuantParams", "RealizeQuant"]
    step_by_step = Before
    for one in passes:
        step_by_step = one(step_by_step)
    tvm.ir.assert_structural_equal(tvm.transform.Sequential(passes)(Before), step_by_step)


@pytest.mark.parametrize(
    "make_pass, stage",
    [
        (lambda table: CanonicalizeClip(), "fp32"),
        (lambda table: AnnotateQuant(QuantConfig()), "fp32"),
        (lambda table: BindQuantParams(table), "annotated"),
        (lambda table: RealizeQuant(), "simulated"),
    ],
    ids=["CanonicalizeClip", "AnnotateQuant", "BindQuantParams", "RealizeQuant"],
)
def test_every_pass_is_idempotent_and_well_formed(make_pass, stage):
    Before, table = _one_conv()
    annotated = AnnotateQuant(QuantConfig())(Before)
    modules = {"fp32": Before, "annotated": annotated, "simulated": BindQuantParams(table)(annotated)}
    once = make_pass(table)(modules[stage])  # each pass on the module it is meant for
    _well_formed(once)
    tvm.ir.assert_structural_equal(make_pass(table)(once), once)


def test_pass_errors_are_tvmquant_errors_called_directly_or_in_sequential():
    from tvmquant._relax import UnsupportedGraphError
    from tvmquant.calibration import CalibrationError
    from tvmquant.frontend.prepare import ModelError
    from tvmquant.passes import SkipRuleError

    Before, table = _one_conv()
    annotated = AnnotateQuant(QuantConfig())(Before)
    no_main = tvm.IRModule({"other": Before["main"].with_attr("global_symbol", "other")})
    cases = [
        (AnnotateQuant(QuantConfig(skip=("conv2d_99",))), Before, SkipRuleError, "'conv2d_99' matches no layer"),
        (BindQuantParams({}), annotated, CalibrationError, "'conv2d_0.in0' has no quantization parameters"),
        (CanonicalizeClip(), no_main, UnsupportedGraphError, "no function 'main'"),
    ]
    for one, mod, error, message in cases:
        with pytest.raises(error, match=message) as direct:
            one(mod)
        assert type(direct.value) is error  # the exception as raised, not a RuntimeError from TVM's FFI
        assert not any("transform.py" in str(entry.path) for entry in direct.traceback)  # no FFI round trip
        with pytest.raises(error, match=message) as composed:
            tvm.transform.Sequential([relax.transform.Normalize(), one])(mod)
        assert type(composed.value) is error and str(composed.value) == str(direct.value)
    # prepare() turns a graph it cannot rewrite into a ModelError (it used to get TVM's RuntimeError)
    with pytest.raises(ModelError, match="no function 'main'"):
        prepare(no_main)


def _realized_vs_simulated(qmodel, batches):
    """Worst |realized - simulated| in LSB over every quantized tensor, each layer fed identical inputs.

    The realized model is teacher-forced (tvmquant.testing.forcing): every layer reads the simulated model's
    quantized tensors, so a tie that rounds differently in one layer cannot spread to the next.
    """
    simulated = ExposeQuantizedTensors()(qmodel.simulated)
    realized = RealizeQuant()(simulated)
    _well_formed(realized)
    forced = teacher_forced(realized)
    _well_formed(forced)
    vm_sim, vm_real = compile_vm(simulated), compile_vm(forced)
    worst = 0
    for batch in batches:
        sim = run_vm(vm_sim, batch, qmodel.inputs)
        args = [to_tensor(batch[spec.name]) for spec in qmodel.inputs] + [sim[i] for i in range(1, len(sim))]
        real = vm_real["main"](*args)
        assert len(sim) == len(real) > 2
        for index in range(1, len(sim)):
            a, b = sim[index].numpy(), real[index].numpy()
            assert a.dtype == b.dtype and a.dtype in (np.uint8, np.int8)
            worst = max(worst, int(np.max(np.abs(a.astype(np.int32) - b.astype(np.int32)))))
    return worst, realized


@pytest.mark.parametrize(
    "config",
    [QuantConfig(), QuantConfig.from_dict({"version": 1, "activation": {"dtype": "int8", "scheme": "symmetric"}})],
    ids=["uint8-affine", "int8-symmetric"],
)
def test_realized_equals_simulated_on_residual_cnn(config):
    data = calibration_images(12)
    qmodel = quantize(residual_cnn(), config, data[:8], progress=False, report_batches=0)
    worst, realized = _realized_vs_simulated(qmodel, [{"input": data[i : i + 1]} for i in range(8, 12)])
    assert worst <= 1
    assert realized.script(show_meta=False).count('out_dtype="int32"') == 7  # 6 convs + 1 matmul


def test_realized_equals_simulated_on_transformer_block():
    rng = np.random.default_rng(0)
    data = rng.standard_normal((10, 16, 32)).astype(np.float32)
    qmodel = quantize(transformer_block(), calib_data=data[:6], progress=False, report_batches=0)
    worst, _ = _realized_vs_simulated(qmodel, [{"input": data[i : i + 1]} for i in range(6, 10)])
    assert worst <= 1


def test_realized_model_is_integer_and_keeps_chains_in_int8():
    qmodel = quantize(residual_cnn(), calib_data=calibration_images(4), progress=False, report_batches=0)
    bindings = qmodel.mod["main"].body.blocks[0].bindings
    convs = [b.value for b in bindings if getattr(b.value.op, "name", "") == "relax.nn.conv2d"]
    assert len(convs) == 6
    for conv in convs:
        assert str(conv.args[0].ty.dtype) in ("uint8", "int8") and str(conv.args[1].ty.dtype) == "int8"
        assert str(conv.attrs["out_dtype"]) == "int32"
    # Max pools run on uint8 directly and feed the concat and the next conv without a round trip.
    pools = [b for b in bindings if getattr(b.value.op, "name", "") == "relax.nn.max_pool2d"]
    assert pools and all(str(b.var.ty.dtype) == "uint8" for b in pools)
    dequantized = [b for b in bindings if getattr(b.value.op, "name", "") == "relax.dequantize"]
    # Only the residual add and the concat of differently-scaled inputs go back to FP32 (2 inputs each).
    assert len(dequantized) == 4
    assert all(not getattr(b.value.args[0], "value", None) for b in dequantized)  # no constant (bias) dequantize


def test_partial_quantization_by_name_type_and_predicate():
    data = calibration_images(4)
    model = residual_cnn()
    by_name = quantize(model, QuantConfig(skip=("conv2d_0",)), data, progress=False, report_batches=0)
    assert [layer.name for layer in by_name.layers if not layer.quantized] == ["conv2d_0"]
    first_conv = next(
        b.value
        for b in by_name.mod["main"].body.blocks[0].bindings
        if getattr(b.value.op, "name", "") == "relax.nn.conv2d"
    )
    assert str(first_conv.args[0].ty.dtype) == "float32"
    by_type = quantize(model, QuantConfig(skip=("op:add",)), data, progress=False, report_batches=0)
    assert [layer.name for layer in by_type.layers if not layer.quantized] == ["add_0"]
    depthwise = QuantConfig(skip=(lambda layer: layer.op_type == "conv2d" and layer.name == "conv2d_3",))
    by_predicate = quantize(model, depthwise, data, progress=False, report_batches=0)
    skipped = [layer for layer in by_predicate.layers if not layer.quantized]
    assert [layer.name for layer in skipped] == ["conv2d_3"] and "predicate" in skipped[0].reason
    assert "skip list" in str(by_predicate.summary())


def test_accuracy_of_default_config_on_residual_cnn():
    data = calibration_images(40, seed=3)
    qmodel = quantize(residual_cnn(), calib_data=data[:24], progress=False, report_batches=4)
    assert qmodel.sqnr["output0"] > 25.0
    int8, fp32 = qmodel.compile(), qmodel.compile(mode="fp32")
    agree = np.mean([np.argmax(int8(x[None])) == np.argmax(fp32(x[None])) for x in data[24:]])
    assert agree >= 0.8


@pytest.mark.slow  # 30-50 s; realize == simulate and load paths are covered by faster tests
def test_fmnist_model_realized_equals_simulated_and_keeps_accuracy():
    from tvmquant.examples import fmnist_model_path, load_fmnist_example

    calib, test_x, test_y = load_fmnist_example()
    qmodel = quantize(fmnist_model_path(), calib_data=calib[:128], progress=False, report_batches=0)
    worst, _ = _realized_vs_simulated(qmodel, [{"input": test_x[i : i + 1]} for i in range(4)])
    assert worst <= 1
    batched = qmodel.rebatch(100)
    int8, fp32 = batched.compile(), batched.compile(mode="fp32")
    int8_pred = np.concatenate([np.argmax(int8(test_x[i : i + 100]), 1) for i in range(0, 1000, 100)])
    fp32_pred = np.concatenate([np.argmax(fp32(test_x[i : i + 100]), 1) for i in range(0, 1000, 100)])
    fp32_acc, int8_acc = np.mean(fp32_pred == test_y), np.mean(int8_pred == test_y)
    assert fp32_acc > 0.9
    assert int8_acc >= fp32_acc - 0.01  # the 1% goal, on the 1000 bundled test images
    assert np.mean(int8_pred == fp32_pred) > 0.98


def test_automatic_sensitivity_driven_partial_quantization():
    from tvmquant import AutoSkip
    from tvmquant.passes.sensitivity import layer_sensitivity

    data = calibration_images(8, seed=2)
    full = quantize(residual_cnn(), calib_data=data, progress=False, report_batches=4)
    sensitivity = layer_sensitivity(full.annotated, full.table, data, full.inputs)
    assert set(sensitivity) == {layer.name for layer in full.layers if layer.weight or layer.inputs}
    target = full.sqnr["output0"] + 3.0  # unreachable with everything quantized
    config = QuantConfig(auto_skip=AutoSkip(target_sqnr_db=target, max_layers=4))
    auto = quantize(residual_cnn(), config, data, progress=False, report_batches=4)
    skipped = [layer for layer in auto.layers if not layer.quantized]
    assert 1 <= len(skipped) <= 4
    assert all(layer.reason.startswith("auto: most sensitive") for layer in skipped)
    assert skipped[0].name == min(sensitivity, key=sensitivity.get)  # the most sensitive goes first
    assert auto.sqnr["output0"] > full.sqnr["output0"]
    assert QuantConfig.from_json(config.to_json()) == config


def test_auto_skip_of_a_dynamic_batch_model_runs_on_the_calibration_vm(monkeypatch):
    # A dynamic batch axis calibrates a copy at the calibration batch; AutoSkip measures on that copy's VM
    # (compiled once, for calibration) with as many samples as its batches at the model's batch, and chooses
    # what it chooses on the static model.
    import tvmquant.api as api
    from tvmquant import AutoSkip
    from tvmquant.compile import host_build

    data = calibration_images(8, seed=2)
    static = quantize(residual_cnn(), calib_data=data, progress=False, report_batches=4)
    config = QuantConfig(auto_skip=AutoSkip(target_sqnr_db=static.sqnr["output0"] + 3.0, max_layers=2))
    expected = quantize(residual_cnn(), config, data, progress=False, report_batches=0)
    builds = []

    def counting_build(mod, target):  # a new build function: compile_vm's cache does not know it
        builds.append(int(mod["main"].params[0].ty.shape.values[0]))
        return host_build(mod, target)

    monkeypatch.setattr(api, "host_build", counting_build)
    dynamic = quantize(residual_cnn_dynamic_batch(), config, data, calib_batch=4, progress=False, report_batches=0)
    assert builds == [4, 4], builds  # calibration, then recalibration without the skipped layers; none at batch 1
    skipped = [layer.name for layer in dynamic.layers if not layer.quantized]
    assert skipped and skipped == [layer.name for layer in expected.layers if not layer.quantized]


def test_numpy_constant_folding_equals_tvms():
    from tvmquant._compat import const_value, is_const
    from tvmquant.frontend.prepare import FoldConstantNumpy

    rng = np.random.default_rng(0)
    a = rng.standard_normal((2, 3, 4)).astype("float32")
    b = rng.standard_normal((3, 4)).astype("float32") + 3
    ints = rng.integers(-5, 5, (2, 3, 4)).astype("int32")
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType((2, 3, 4), "float32"))
    ca, cb, ci = relax.const(a), relax.const(b), relax.const(ints)
    with bb.function("main", [x]):
        with bb.dataflow():
            terms = [
                relax.op.reshape(ca, (6, 4)),
                relax.op.permute_dims(ca, [2, 0, 1]),
                relax.op.permute_dims(ca),
                relax.op.expand_dims(cb, 0),
                relax.op.squeeze(relax.op.expand_dims(cb, 1), [1]),
                relax.op.broadcast_to(cb, (2, 3, 4)),
                relax.op.where(relax.op.isnan(ca), cb, ca),
                relax.op.add(ca, cb),
                relax.op.subtract(ca, cb),
                relax.op.multiply(ca, cb),
                relax.op.divide(ca, cb),
                relax.op.sqrt(cb),
                relax.op.negative(ca),
                relax.op.maximum(ca, cb),
                relax.op.minimum(ca, cb),
                relax.op.concat([ca, ca], axis=1),
                relax.op.astype(ci, "float32"),
                relax.op.astype(ca, "int32"),  # left to TVM (float -> int)
                relax.op.divide(ci, relax.const(np.int32(2))),  # left to TVM (integer division)
            ]
            outs = [bb.emit(term) for term in terms]
            out = bb.emit_output(relax.Tuple([x, *outs]))
        bb.emit_func_output(out)
    mod = bb.get()
    ours = FoldConstantNumpy()(mod)
    bindings = [binding.value for block in ours["main"].body.blocks for binding in block.bindings]
    left = [value.op.name for value in bindings if isinstance(value, relax.Call)]
    assert left == ["relax.astype", "relax.divide"]  # every other constant expression is folded
    ours_then_tvm = relax.transform.FoldConstant()(ours)
    tvms = relax.transform.FoldConstant()(mod)

    def constants(module):
        fields = module["main"].body.body.fields if isinstance(module["main"].body.body, relax.Tuple) else None
        if fields is None:
            var = module["main"].body.body
            value = {b.var: b.value for blk in module["main"].body.blocks for b in blk.bindings}[var]
            fields = value.fields
        return [const_value(field) for field in fields[1:] if is_const(field)]

    expected, got = constants(tvms), constants(ours_then_tvm)
    assert len(expected) == len(terms) == len(got)
    for want, have in zip(expected, got):
        assert want.dtype == have.dtype and want.shape == have.shape
        np.testing.assert_array_equal(have, want)


def test_autoskip_targets_the_worst_output_not_their_sum():
    # BERT's pooler_output (small) beside last_hidden_state (large): summed, the large output's signal hid the
    # small one's noise, and AutoSkip kept nothing in FP32 while the pooler sat at 39.8 dB
    # (tutorials/transformer_partial.py).
    from tvmquant.passes.sensitivity import _Simulator

    big, small = np.full(64, 10.0), np.full(4, 0.1)
    simulator = _Simulator.__new__(_Simulator)
    simulator.batches, simulator.reference = [None, None], [[big, small], [big, small]]
    simulator._run = lambda batch, enabled: [big + 0.001, small + 0.01]  # 80 dB and 20 dB
    assert simulator.output_sqnr({"x"}) == pytest.approx(20.0)


def test_tvm_fold_constant_runs_only_where_numpy_folding_left_a_constant_call(monkeypatch):
    from tvmquant._compat import structural_equal
    from tvmquant.frontend import prepare as prepare_module
    from tvmquant.frontend.onnx import import_onnx

    imported, _ = import_onnx(residual_cnn(channels=8, size=8), batch_size=1, where="residual_cnn")
    assert prepare_module.has_constant_call(imported)  # the importer's bias reshapes, clip bounds...
    prepared = prepare(imported)
    assert not prepare_module.has_constant_call(prepared)
    # the same module as when TVM's FoldConstant runs every time
    monkeypatch.setattr(prepare_module, "has_constant_call", lambda mod: True)
    assert structural_equal(prepare(imported), prepared)
    # a constant call numpy does not fold (an FP32 exp of a constant) is still folded, by TVM
    x = relax.Var("x", relax.TensorType((2,), "float32"))
    bb = relax.BlockBuilder()
    with bb.function("main", [x]):
        with bb.dataflow():
            e = bb.emit(relax.op.exp(relax.const(np.array([0.0, 1.0], np.float32))))
            out = bb.emit_output(relax.op.add(x, e))
        bb.emit_func_output(out)
    monkeypatch.undo()
    folded = prepare(bb.get())
    assert not prepare_module.has_constant_call(folded)
    assert "exp" not in folded["main"].script()


def test_rewriter_keeps_a_re_emitted_calls_type_only_where_inference_would_give_it():
    """A binding re-emitted on arguments of the same types keeps its type (no re-inference); one whose
    argument's type changed gets its type inferred from the new argument."""
    from tvmquant._relax import BindingRewriter, _keep_inferred_type

    @I.ir_module
    class Before:
        @R.function
        def main(x: R.Tensor((1, 4, 8, 8), "float32"), w: R.Tensor((6, 4, 3, 3), "float32")):
            with R.dataflow():
                y = R.nn.conv2d(x, w, padding=[1, 1, 1, 1])
                z = R.nn.relu(y)
                R.output(z)
            return z

    class Doubled(BindingRewriter):
        """Feeds the conv a batch of two (its input concatenated with itself)."""

        def rewrite(self, var, value):
            if value.op.name != "relax.nn.conv2d":
                return value
            pair = self.emit(relax.op.concat([value.args[0], value.args[0]], axis=0))
            return relax.Call(value.op, [pair, value.args[1]], value.attrs)

    same = BindingRewriter().transform_module(Before)
    tvm.ir.assert_structural_equal(same, Before)
    doubled = Doubled().transform_module(Before)
    _well_formed(doubled)
    assert [int(d) for d in doubled["main"].ret_ty.shape] == [2, 6, 8, 8]

    conv = Before["main"].body.blocks[0].bindings[0].value
    fresh = relax.Call(conv.op, list(conv.args), conv.attrs)
    _keep_inferred_type(fresh, conv)
    assert [int(d) for d in fresh.ty.shape] == [1, 6, 8, 8]
    other = relax.Var("x2", relax.TensorType((3, 4, 8, 8), "float32"))
    refused = relax.Call(conv.op, [other, conv.args[1]], conv.attrs)
    _keep_inferred_type(refused, conv)
    assert [int(d) for d in relax.BlockBuilder().normalize(refused).ty.shape] == [3, 6, 8, 8]
