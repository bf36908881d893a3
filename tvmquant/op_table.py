"""What tvmquant knows about each Relax op, in one table, and the layers found with it.

:class:`~tvmquant.passes.AnnotateQuant` reads the table to find layers and the tensors to quantize;
:class:`~tvmquant.passes.RealizeQuant` reads it to decide how an op is computed on integers; the QDQ frontend
(:func:`tvmquant.frontend.qdq.describe_qdq`) reads it to describe a pre-quantized model's layers. Adding an op
is adding a row. Every layer found is a :class:`LayerInfo`.

Below the stages (``frontend/``, ``passes/``): imports nothing of tvmquant, nor TVM.
"""

from __future__ import annotations

from dataclasses import dataclass, field

# How RealizeQuant computes an op whose inputs are quantized:
LINEAR = "linear"  # int8 x int8 -> int32 accumulation (conv2d, matmul); weights per output channel
ELEMENTWISE_SUM = "sum"  # requantize both inputs to the output scale (residual add)
CONCAT = "concat"  # integer concat when all inputs share one (scale, zero_point)
TRANSPARENT = "transparent"  # commutes with the affine map: runs on the integers unchanged (max pool, reshape)
AVERAGE = "average"  # linear in the real value: runs on the integers cast to float (avg pool, mean)
CLAMP = "clamp"  # relu / clip: folded into the output range of the quantized value


@dataclass(frozen=True)
class OpRule:
    """How one Relax op is quantized.

    Attributes
    ----------
    op_type : str
        Short name used in layer names (``conv2d_3``) and skip rules (``SkipOpType("conv2d")``).
    realize : str
        One of the realization kinds above.
    activation_inputs : tuple of int
        Argument positions quantized as activations (when they are not constants). Empty for ops that are not
        layers of their own (they only carry quantized values through).
    weight_input : int or None
        Argument position of a constant weight quantized with the weight spec.
    weight_channel_axis : int or None
        Output-channel axis of that weight (OIHW conv: 0; matmul ``[K, N]``: -1).
    accumulator : str or None
        Accumulator dtype of integer-linear ops.
    """

    op_type: str
    realize: str
    activation_inputs: tuple = ()
    weight_input: int | None = None
    weight_channel_axis: int | None = None
    accumulator: str | None = None

    @property
    def is_layer(self) -> bool:
        return bool(self.activation_inputs)


OP_TABLE: dict[str, OpRule] = {
    "relax.nn.conv2d": OpRule("conv2d", LINEAR, (0,), 1, 0, "int32"),
    "relax.matmul": OpRule("matmul", LINEAR, (0, 1), 1, -1, "int32"),
    "relax.add": OpRule("add", ELEMENTWISE_SUM, (0, 1)),
    "relax.concat": OpRule("concat", CONCAT, (0,)),
    "relax.nn.max_pool2d": OpRule("max_pool2d", TRANSPARENT, (0,)),
    "relax.nn.avg_pool2d": OpRule("avg_pool2d", AVERAGE, (0,)),
    "relax.nn.adaptive_avg_pool2d": OpRule("adaptive_avg_pool2d", AVERAGE, (0,)),
    "relax.mean": OpRule("mean", AVERAGE, (0,)),
    # Not layers: they carry quantized values through exactly.
    "relax.reshape": OpRule("reshape", TRANSPARENT),
    "relax.permute_dims": OpRule("permute_dims", TRANSPARENT),
    "relax.squeeze": OpRule("squeeze", TRANSPARENT),
    "relax.expand_dims": OpRule("expand_dims", TRANSPARENT),
    "relax.nn.relu": OpRule("relu", CLAMP),
    "relax.clip": OpRule("clip", CLAMP),
}

#: Op types accepted by ``SkipOpType``.
LAYER_OP_TYPES = sorted({rule.op_type for rule in OP_TABLE.values() if rule.is_layer})


@dataclass
class LayerInfo:
    """One quantizable layer as AnnotateQuant (or the QDQ import) found it; what skip predicates receive.

    Attributes
    ----------
    name : str
        tvmquant's name for the layer: op type and index (``conv2d_3``).
    op_type : str
        The :attr:`OpRule.op_type` of its op.
    quantized : bool
        False when the layer stays FP32; ``reason`` says why.
    reason : str
        Why the layer was skipped (``skip list: name 'conv2d_0'``), empty if quantized.
    inputs : list of str
        The names of its quantized activation tensors (``conv2d_3.in0``).
    weight : str or None
        The name of its quantized weight (``conv2d_3.weight``).
    weight_axis : int or None
        The weight's channel axis.
    output_shape : tuple or None
    source : str
        The layer's node name in the source model (ONNX), when known: skip lists take it as well as ``name``.
    """

    name: str
    op_type: str
    quantized: bool = True
    reason: str = ""
    inputs: list = field(default_factory=list)
    weight: str | None = None
    weight_axis: int | None = None
    output_shape: tuple | None = None
    source: str = ""

    def matches(self, name: str) -> bool:
        """True if ``name`` is this layer's tvmquant name or its source (ONNX node) name."""
        return name == self.name or (bool(self.source) and name == self.source)
