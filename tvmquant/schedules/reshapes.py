"""Fold the flatten/unflatten reshapes around linear layers, so that FuseOps fuses across them.

Transformer exports compute a linear layer on ``[batch * tokens, features]``: ``reshape`` to 2-D, ``MatMul``,
bias, ``reshape`` back to 3-D. After realize, the requantize epilogue sits between the two reshapes, and
``reshape`` (an injective op) ends ``FuseOps``' group of the matmul and its element-wise epilogue: the matmul
writes float32 dequantized values, and what follows (GELU, the next quantize) becomes a kernel of its own that
reads them back. On BERT-base's FFN that is a 1.5 MB float32 tensor written and read per layer, and the
GELU as a separate kernel.

:class:`FoldRowReshapes` rewrites ::

    y = reshape(f_n(... f_1(reshape(x, P) ...)), S)   ->   y = f_n(... f_1(x) ...)

when the reshapes only regroup the leading (row) axes (``x`` and ``y`` have the same leading shape, each
``f_i`` keeps its input's rows), every ``f_i`` has a single use and is a row-wise op: ``astype``, ``round``,
``relu``, ``clip``, ``quantize``/``dequantize`` on the last axis (or with scalar parameters), an element-wise
binary op with a constant that broadcasts along the last axis only, or a ``matmul`` with a constant 2-D
weight. Every other binding is kept; the reshapes nothing uses any more are removed by
``DeadCodeElimination``.
"""

from __future__ import annotations

import logging

import numpy as np
import tvm
from tvm import relax

from .._compat import Var, is_const, tensor_shape
from .._relax import BindingRewriter, UnsupportedGraphError, tvmquant_module_pass

logger = logging.getLogger(__name__)

__all__ = ["FoldRowReshapes"]

_UNARY = frozenset({"relax.astype", "relax.round", "relax.nn.relu", "relax.clip"})
_BINARY = frozenset({"relax.add", "relax.subtract", "relax.multiply", "relax.divide", "relax.maximum", "relax.minimum"})
_QUANTIZE = frozenset({"relax.quantize", "relax.dequantize"})


def _shape(expr):
    shape = tensor_shape(expr)
    return None if shape is None or None in shape else tuple(int(d) for d in shape)


def _row_constant(expr) -> bool:
    """A constant whose broadcast is along the last axis only (all other dims 1): the same in any row shape."""
    if not is_const(expr):
        return False
    shape = _shape(expr)
    return shape is not None and all(d == 1 for d in shape[:-1])


def _row_operand(value) -> int | None:
    """Index of the one tensor operand of a row-wise op ``value`` (see the module docstring), or None."""
    if not isinstance(value, relax.Call) or not isinstance(value.op, tvm.ir.Op):
        return None
    name = value.op.name
    args = list(value.args)
    if name in _UNARY:
        return 0 if isinstance(args[0], Var) else None
    if name in _BINARY and len(args) == 2:
        for k in (0, 1):
            if isinstance(args[k], Var) and _row_constant(args[1 - k]):
                return k
        return None
    if name in _QUANTIZE:
        data_shape = _shape(args[0])
        if not isinstance(args[0], Var) or data_shape is None:
            return None
        axis = int(value.attrs.axis)
        scalar = all(is_const(a) and int(np.prod(_shape(a) or (1,))) == 1 for a in args[1:])
        last = axis in (-1, len(data_shape) - 1) and all(_row_constant(a) for a in args[1:])
        return 0 if (scalar or last) else None
    if name == "relax.matmul":
        weight = args[1]
        return 0 if isinstance(args[0], Var) and is_const(weight) and len(_shape(weight) or ()) == 2 else None
    return None


def _rebuild(value, operand: int, new_arg):
    """``value`` with its tensor operand replaced by ``new_arg`` (of another row shape)."""
    args = list(value.args)
    args[operand] = new_arg
    name = value.op.name
    if name in _QUANTIZE:
        build = relax.op.quantize if name == "relax.quantize" else relax.op.dequantize
        return build(args[0], args[1], args[2], axis=-1, out_dtype=str(value.attrs.out_dtype))
    return relax.Call(value.op, args, value.attrs, list(value.ty_args))


class _Folder(BindingRewriter):
    def begin(self, func) -> None:
        values, uses = {}, {}

        def count(expr):
            if isinstance(expr, Var):
                uses[expr] = uses.get(expr, 0) + 1
            elif isinstance(expr, relax.Call | relax.Tuple):
                for arg in expr.args if isinstance(expr, relax.Call) else expr.fields:
                    count(arg)
            elif isinstance(expr, tvm.ir.TupleGetItem):
                count(expr.tuple_value)

        for block in func.body.blocks:
            for binding in block.bindings:
                values[binding.var] = binding.value
                count(binding.value)
        count(func.body.body)
        # chain var -> index of its tensor operand; the outer reshape var -> the chain's last var
        self.chain: dict = {}
        self.alias: dict = {}
        self.folded = 0
        for var, value in values.items():
            plan = self._plan(var, value, values, uses)
            if plan is not None:
                chain, source = plan
                for link, operand in chain:
                    self.chain[link] = (operand, source if link is chain[-1][0] else None)
                self.alias[var] = chain[0][0]
                self.folded += 1

    @staticmethod
    def _plan(var, value, values, uses):
        if not (isinstance(value, relax.Call) and isinstance(value.op, tvm.ir.Op) and value.op.name == "relax.reshape"):
            return None
        target, inner = _shape(var), value.args[0]
        if target is None or not isinstance(inner, Var) or uses.get(inner, 0) != 1:
            return None
        chain = []  # (var, operand index), outermost first
        cur = inner
        while True:
            bound = values.get(cur)
            if bound is None:
                return None
            if isinstance(bound, relax.Call) and isinstance(bound.op, tvm.ir.Op) and bound.op.name == "relax.reshape":
                source = bound.args[0]
                break
            operand = _row_operand(bound)
            if operand is None or (chain and uses.get(cur, 0) != 1):
                return None
            chain.append((cur, operand))
            cur = bound.args[operand]
            if not isinstance(cur, Var):
                return None
        if not chain:
            return None
        source_shape, rows = _shape(source), _shape(cur)
        if source_shape is None or rows is None or source_shape[-1] != rows[-1]:
            return None
        # Every link keeps the rows of the flattened tensor; the outer reshape restores the source's rows.
        if any((_shape(link) or (None,))[:-1] != rows[:-1] for link, _ in chain):
            return None
        if target[:-1] != source_shape[:-1] or target[-1] != _shape(inner)[-1]:
            return None
        return chain, source

    def rewrite(self, var, value):
        if var in self.alias:
            return self.var_map[self.alias[var]]
        if var not in self.chain:
            return value
        operand, source = self.chain[var]
        original = self._binding_value
        new_arg = self.remap(source) if source is not None else self.remap(original.args[operand])
        return _rebuild(original, operand, new_arg)


@tvmquant_module_pass("FoldRowReshapes")
class FoldRowReshapes:
    """Remove flatten/unflatten reshape pairs around row-wise chains (see the module docstring).

    Examples
    --------
    >>> mod = FoldRowReshapes()(mod)  # doctest: +SKIP
    """

    def transform_module(self, mod: tvm.IRModule, _ctx=None) -> tvm.IRModule:
        functions = [gv.name_hint for gv in mod.get_global_vars()]
        if "main" not in functions or not isinstance(mod["main"], relax.Function):
            return mod
        folder = _Folder()
        try:
            result = folder.transform_module(mod)
        except UnsupportedGraphError:  # a match_cast (dynamic shapes): nothing to fold with static rows
            return mod
        if not folder.folded:
            return mod
        logger.debug("FoldRowReshapes: folded %d reshape pairs", folder.folded)
        return relax.transform.DeadCodeElimination()(result)
