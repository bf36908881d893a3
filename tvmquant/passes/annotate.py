"""AnnotateQuant: find the quantizable layers and mark the tensors to quantize.

Run after :func:`tvmquant.frontend.prepare` (constant weights, canonical clips) and before calibration.

A marked tensor passes through ``R.call_pure_packed("tvmquant.observe", x, R.str(name), R.str(role))``,
an identity whose name is the tensor's stable, readable name (``conv2d_3.in0``, ``conv2d_3.weight``).
Calibration runs the module with that function bound to the observers; :class:`BindQuantParams` replaces each
marker with quantize/dequantize. The layers found, and why any stayed FP32, are stored as JSON in the
function attribute ``tvmquant.layers``.
"""

from __future__ import annotations

import json
from dataclasses import asdict

import tvm
from tvm import relax

from .. import op_table
from .._compat import StringImm, is_const, op_name, register_ffi_error, tensor_dtype, tensor_shape
from .._relax import (  # noqa: F401  (the marker vocabulary, re-exported)
    MARKER_INTO,
    OBSERVE_MARKER,
    OUTPUT_KEY,
    SOURCE_NAMES_ATTR,
    BindingRewriter,
    MarkerLayout,
    dps_marker,
    parse_dps_marker,
    tvmquant_module_pass,
)
from ..config import QuantConfig, SkipName, SkipOpType, SkipPredicate
from ..op_table import LayerInfo
from ..qparams import Role

MARKER = OBSERVE_MARKER
LAYERS_ATTR = "tvmquant.layers"


@register_ffi_error
class SkipRuleError(ValueError):
    """A skip entry matched no layer."""


def marker(expr, name: str, role: Role):
    """The identity marker call on ``expr``."""
    return relax.call_pure_packed(MARKER, expr, StringImm(name), StringImm(str(role)), ty_args=[expr.ty])


def parse_marker(value):
    """``(tensor, name, role)`` if ``value`` is a marker call, else None."""
    if op_name(value) != "relax.call_pure_packed":
        return None
    callee = value.args[0]
    if getattr(callee, "global_symbol", None) != MARKER:
        return None
    return value.args[1], value.args[2].value, value.args[3].value


def layers_of(mod: tvm.IRModule) -> list[LayerInfo]:
    """The layers AnnotateQuant recorded on ``main`` (empty if it has not run)."""
    func = mod["main"]
    if func.attrs is None or LAYERS_ATTR not in func.attrs:
        return []
    return [LayerInfo(**entry) for entry in json.loads(str(func.attrs[LAYERS_ATTR]))]


@tvmquant_module_pass("AnnotateQuant")
class AnnotateQuant:
    """Mark the inputs and weights of quantizable layers, honouring the skip list.

    Parameters
    ----------
    config : QuantConfig
        Its ``skip`` rules choose layers to keep in FP32; an entry that matches nothing is an error.

    Examples
    --------
    >>> mod = AnnotateQuant(QuantConfig(skip=("conv2d_0",)))(mod)  # doctest: +SKIP
    """

    def __init__(self, config: QuantConfig | None = None):
        self.config = config or QuantConfig()

    def transform_module(self, mod, ctx):
        if layers_of(mod):
            return mod  # idempotent: already annotated
        rewriter = _Annotator(self.config)
        new_mod = rewriter.transform_module(mod)
        _check_skip_rules(self.config, rewriter.layers)
        func = new_mod["main"].with_attr(LAYERS_ATTR, json.dumps([asdict(layer) for layer in rewriter.layers]))
        new_mod["main"] = func
        return new_mod


class _Annotator(BindingRewriter):
    def begin(self, func):
        self.source_of = _source_names(func)
        self.fp32_only_adds = _adds_without_integer_consumers(func)

    def __init__(self, config: QuantConfig):
        super().__init__()
        self.config = config
        self.layers: list[LayerInfo] = []
        self.counts: dict[str, int] = {}
        self.marked: dict = {}  # new var -> marker var
        self.producer: dict = {}  # new var -> value
        self.used_rules: set = set()
        self.marker_names: dict = {}  # marker var -> tensor name

    def _is_float_tensor(self, expr) -> bool:
        return tensor_dtype(expr) in ("float32", "float16") and tensor_shape(expr) is not None

    def _already_quantized(self, expr) -> bool:
        """True if ``expr`` is a marked tensor seen through ops that keep it on the quantization grid."""
        while True:
            if expr in self.marked:
                return True
            value = self.producer.get(expr)
            name = op_name(value)
            rule = op_table.OP_TABLE.get(name)
            if rule is None or not (rule.realize == op_table.TRANSPARENT or name == "relax.nn.relu"):
                return False
            expr = value.args[0]

    def _mark(self, expr, name: str, role: str):
        # Dynamic ranges depend on the consumer (per row of a matmul's data, per column of its second operand):
        # a tensor gets a marker per consumer position, never one shared with another kind.
        key = (expr, name.rpartition(".")[2]) if self.config.dynamic else expr
        if key in self.marked:
            return self.marked[key]
        var = self.emit(marker(expr, name, role), name.replace(".", "_"))
        self.marked[key] = var
        self.marker_names[var] = name
        return var

    def _skip_reason(self, info: LayerInfo) -> str:
        for rule in self.config.skip:
            if isinstance(rule, SkipName) and info.matches(rule.name):
                self.used_rules.add(rule)
                return f"skip list: name {rule.name!r}"
            if isinstance(rule, SkipOpType) and rule.op_type == info.op_type:
                self.used_rules.add(rule)
                return f"skip list: op type {rule.op_type!r}"
            if isinstance(rule, SkipPredicate) and rule.predicate(info):
                self.used_rules.add(rule)
                return f"skip list: predicate {rule.description}"
        return ""

    def rewrite(self, var, value):
        name = op_name(value)
        rule = op_table.OP_TABLE.get(name)
        if rule is None or not rule.is_layer or not self._is_layer(name, value):
            out = self.emit(value, None)
            self.producer[out] = value
            return out
        index = self.counts.get(rule.op_type, 0)
        self.counts[rule.op_type] = index + 1
        info = LayerInfo(
            f"{rule.op_type}_{index}", rule.op_type, output_shape=tensor_shape(var), source=self.source_of.get(var, "")
        )
        args = list(value.args)
        weight_pos = rule.weight_input if rule.weight_input is not None and is_const(args[rule.weight_input]) else None
        activation_pos = [i for i in rule.activation_inputs if i != weight_pos]
        # Pre-compute tensor names so that predicates see them.
        if weight_pos is not None:
            info.weight = f"{info.name}.weight"
            info.weight_axis = rule.weight_channel_axis % len(tensor_shape(args[weight_pos]))
        info.reason = self._skip_reason(info)
        if not info.reason and self.config.dynamic and rule.realize != op_table.LINEAR:
            info.reason = "dynamic activations: only matmul and conv2d have a run-time range of their own"
        if not info.reason and var in self.fp32_only_adds:
            info.reason = (
                f"output feeds only FP32 ops ({self.fp32_only_adds[var]}): an INT8 add would only lose accuracy"
            )
        info.quantized = not info.reason
        if info.quantized:
            for pos in activation_pos:
                if isinstance(args[pos], relax.Tuple):
                    fields = []
                    for j, item in enumerate(args[pos].fields):
                        tensor = f"{info.name}.in{pos}_{j}"
                        fields.append(self._mark_activation(item, tensor, info))
                    args[pos] = relax.Tuple(fields)
                else:
                    args[pos] = self._mark_activation(args[pos], f"{info.name}.in{pos}", info)
            if weight_pos is not None:
                args[weight_pos] = self.emit(
                    marker(args[weight_pos], info.weight, Role.WEIGHT), info.weight.replace(".", "_")
                )
        self.layers.append(info)
        new_value = relax.Call(value.op, args, value.attrs, list(value.ty_args))
        out = self.emit(new_value, None)
        self.producer[out] = new_value
        return out

    def _mark_activation(self, expr, tensor_name: str, info: LayerInfo):
        if not self._is_float_tensor(expr) or is_const(expr):
            return expr
        if not self.config.dynamic and self._already_quantized(expr) and expr not in self.marked:
            info.inputs.append(f"(on grid of an earlier tensor) {tensor_name}")
            return expr
        marked = self._mark(expr, tensor_name, Role.ACTIVATION)
        info.inputs.append(self.marker_names[marked])
        return marked

    def _is_layer(self, name: str, value) -> bool:
        args = value.args
        if name == "relax.nn.conv2d":
            attrs = value.attrs
            return (
                str(attrs["data_layout"]) == "NCHW"
                and str(attrs["kernel_layout"]) == "OIHW"
                and self._is_float_tensor(args[0])
            )
        if name == "relax.add":
            # A bias add (a constant operand) is folded into the producer; only tensor + tensor is a layer.
            return all(self._is_float_tensor(a) and not is_const(a) for a in args)
        if name == "relax.matmul":
            return self._is_float_tensor(args[0]) and self._is_float_tensor(args[1]) and not is_const(args[0])
        if name == "relax.concat":
            return isinstance(args[0], relax.Tuple) and all(self._is_float_tensor(a) for a in args[0].fields)
        return self._is_float_tensor(args[0])


def _adds_without_integer_consumers(func) -> dict:
    """``{add variable: its FP32 consumers}`` for the tensor + tensor adds whose results no quantized op uses.

    A quantized residual add pays off when its INT8 result feeds an INT8 op (a CNN's next conv). In a transformer
    the residual add feeds LayerNorm, and the attention-mask add feeds softmax: both FP32, so quantizing the add
    would only round its inputs, and the residual stream's outlier channels make that rounding ruinous (a
    trained MiniLM's embeddings fell to cosine 0.73 vs FP32). Such adds stay FP32 (see the layer's reason).
    Consumers are followed through ops that carry a quantized value (reshape, transpose, relu); an add counts
    as an INT8 consumer only if it is itself kept (the bindings are walked from the output up).
    """
    bindings = [b for block in func.body.blocks for b in block.bindings if isinstance(b, relax.VarBinding)]
    consumers: dict = {}
    for binding in bindings:
        for arg in _call_args(binding.value):
            consumers.setdefault(arg, []).append(binding)
    fp32_only: dict = {}

    def integer_consumer(var, fp32_ops: set, depth: int = 0) -> bool:
        for binding in consumers.get(var, []):
            name = op_name(binding.value)
            rule = op_table.OP_TABLE.get(name)
            if rule is None:
                fp32_ops.add(name.split(".")[-1] if name else "call")
            elif name == "relax.add":
                # Only a kept tensor + tensor add takes an INT8 value; a constant (bias) add on it is FP32.
                if all(not is_const(arg) for arg in binding.value.args) and binding.var not in fp32_only:
                    return True
                fp32_ops.add("add")
            elif rule.is_layer:
                return True
            elif depth < 16 and integer_consumer(binding.var, fp32_ops, depth + 1):
                return True
        return False

    for binding in reversed(bindings):
        value = binding.value
        if op_name(value) != "relax.add" or any(is_const(arg) for arg in value.args):
            continue
        fp32_ops: set = set()
        if not integer_consumer(binding.var, fp32_ops):
            fp32_only[binding.var] = ", ".join(sorted(fp32_ops)) or "the graph output"
    return fp32_only


def _call_args(value) -> list:
    if not isinstance(value, relax.Call):
        return []
    args = []
    for arg in value.args:
        args.extend(arg.fields if isinstance(arg, relax.Tuple) else [arg])
    return args


def _source_names(func) -> dict:
    """``{variable: source (ONNX) node name}`` for the bindings of ``func``.

    The ONNX importer names a node's result after the node (:data:`SOURCE_NAMES_ATTR`); a Conv or Gemm
    result is often ``add(conv2d(...), bias)``, so the name also goes to the layer call below such constant
    epilogues.
    """
    if func.attrs is None or SOURCE_NAMES_ATTR not in func.attrs:
        return {}
    by_var_name = json.loads(str(func.attrs[SOURCE_NAMES_ATTR]))
    values = {}
    names = {}
    for block in func.body.blocks:
        for binding in block.bindings:
            values[binding.var] = binding.value
            if binding.var.name in by_var_name:
                names[binding.var] = by_var_name[binding.var.name]
    results = func.body.body.fields if isinstance(func.body.body, relax.Tuple) else [func.body.body]
    for index, result in enumerate(results):
        if f"{OUTPUT_KEY}{index}" in by_var_name and result in values and result not in names:
            names[result] = by_var_name[f"{OUTPUT_KEY}{index}"]
    for var, source in list(names.items()):
        value = values.get(var)
        while op_name(value) in _EPILOGUE_OPS:
            operands = [arg for arg in value.args if not is_const(arg)]
            if len(operands) != 1 or operands[0] not in values or operands[0] in names:
                break
            names[operands[0]] = source
            value = values[operands[0]]
    return names


#: Ops an importer puts between a layer and its node's output (bias add, Gemm's alpha/beta, reshapes).
_EPILOGUE_OPS = ("relax.add", "relax.multiply", "relax.reshape", "relax.permute_dims")


def _check_skip_rules(config: QuantConfig, layers: list[LayerInfo]) -> None:
    names = [layer.name for layer in layers]
    for rule in config.skip:
        if isinstance(rule, SkipName) and not any(layer.matches(rule.name) for layer in layers):
            close = [n for n in names if n.split("_")[0] == rule.name.split("_")[0]][:8] or names[:8]
            sources = [layer.source for layer in layers if layer.source][:4]
            raise SkipRuleError(
                f"skip entry {rule.name!r} matches no layer; layers are named like {close}"
                + (f" or by their ONNX node names, like {sources}" if sources else "")
                + " (see `tvmquant inspect` or QuantizedModel.summary())"
            )
        if isinstance(rule, SkipOpType) and rule.op_type not in {layer.op_type for layer in layers}:
            raise SkipRuleError(
                f"skip entry op type {rule.op_type!r} matches no layer; this model has op types "
                f"{sorted({layer.op_type for layer in layers})} (all known: {op_table.LAYER_OP_TYPES})"
            )
        if isinstance(rule, SkipPredicate) and not any(layer.reason.endswith(rule.description) for layer in layers):
            raise SkipRuleError(f"skip predicate {rule.description!r} matched no layer")


def depthwise_inputs(mod: tvm.IRModule) -> set:
    """Names of the marked activations of ``main`` that only depthwise convs read.

    A depthwise conv here is an NCHW ``conv2d`` with ``groups`` equal to its input channels (any channel
    multiplier): output channel ``o`` reads input channel ``o // multiplier`` alone, so that input channel's
    scale folds into the output channel's requantize multiplier (``QuantConfig.depthwise_per_channel``). A marked
    tensor any other op reads (a residual add, a plain conv) is left out.
    """
    bindings = [b for block in mod["main"].body.blocks for b in block.bindings if isinstance(b, relax.VarBinding)]
    names = {}
    for binding in bindings:
        parsed = parse_marker(binding.value)
        if parsed is not None and parsed[2] == str(Role.ACTIVATION):
            names[binding.var] = parsed[1]
    readers: dict = {}
    for binding in bindings:
        for arg in _call_args(binding.value):
            if arg in names:
                readers.setdefault(arg, []).append(binding.value)
    found = set()
    for var, name in names.items():
        if readers.get(var) and all(_is_depthwise_data(value, var) for value in readers[var]):
            found.add(name)
    return found


def _is_depthwise_data(value, var) -> bool:
    if op_name(value) != "relax.nn.conv2d" or not value.args[0].same_as(var) or value.args[1].same_as(var):
        return False
    attrs = value.attrs
    shape = tensor_shape(var)
    if str(attrs["data_layout"]) != "NCHW" or str(attrs["kernel_layout"]) != "OIHW" or not shape or len(shape) != 4:
        return False
    channels = shape[1]
    return isinstance(channels, int) and channels > 1 and int(attrs["groups"]) == channels
