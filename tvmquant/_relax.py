"""The Relax vocabulary every stage shares: a binding-by-binding rewriter, graph errors, name attributes.

Below ``frontend/``, ``passes/`` and ``schedules/``: they import this, not each other.

Relax models imported from ONNX are one dataflow block of calls. Every tvmquant pass walks those bindings in
order and either re-emits a binding (with its arguments renamed) or emits something else in its place.
:class:`BindingRewriter` does the walking, renaming and module bookkeeping; a pass overrides
:meth:`BindingRewriter.rewrite` for the bindings it cares about. :func:`tvmquant_module_pass` makes the pass
class a ``tvm.transform.Pass`` whose errors reach the caller as tvmquant's own.
"""

from __future__ import annotations

import tvm
from tvm import relax

from ._compat import (
    StringImm,
    TensorType,
    Var,
    is_const,
    op_name,
    python_pass_instance,
    register_ffi_error,
    structural_equal,
)

#: Function attributes of ``main`` that keep the source model's own names through every tvmquant pass.
SOURCE_NAMES_ATTR = "tvmquant.source_names"  # JSON {Relax variable name: ONNX node name}
OUTPUT_NAMES_ATTR = "tvmquant.output_names"  # JSON [graph output name, ...]
OUTPUT_KEY = "output:"  # SOURCE_NAMES_ATTR key of the node producing the graph's output i


# -- the observe marker ------------------------------------------------------------------------------------
#: The identity marker the passes put on each tensor to quantize (see :mod:`tvmquant.passes.annotate`).
OBSERVE_MARKER = "tvmquant.observe"
#: The destination-passing form of the marker that :func:`tvmquant.passes.calibrate.compile_vm` compiles: the
#: VM plans its output, the marker copies its input there and shows the observers a view of it.
MARKER_INTO = OBSERVE_MARKER + "_into"


def dps_marker(expr, name: str, role: str, ty=None):
    """The destination-passing marker call on ``expr`` (its output typed ``ty``, ``expr``'s type by default)."""
    return relax.call_dps_packed(MARKER_INTO, [expr, StringImm(name), StringImm(role)], ty or expr.ty)


#: The aliasing form of the marker (:func:`alias_markers`): it returns its input itself to a callback that only
#: reads (calibration), a copy to one that may write (the simulating callbacks).
MARKER_ALIAS = OBSERVE_MARKER + "_alias"


def alias_markers(mod: tvm.IRModule) -> tvm.IRModule:
    """``mod`` with each destination-passing marker in ``main`` replaced by a call of a small Relax function of
    its own that calls :data:`MARKER_ALIAS` (the last step before the VM lowers the module).

    The destination-passing marker copies every marked tensor into memory the VM planned: a fifth of the time
    of a ResNet-50 calibration batch (31 of 145 ms at batch 4). A marker that returned its input would alias
    memory the planner hands to later kernels once the input's last use (the marker) is done; a tensor passed
    to a *Relax function*, though, is one the planner leaves alone (``StaticPlanBlockMemory`` plans only the
    arguments of kernels and packed calls): the VM allocates it from its pool and reference-counts it, so the
    alias keeps it alive as long as it is used.
    """

    @relax.expr_functor.mutator
    class _Alias(relax.PyExprMutator):
        def __init__(self, module):
            super().__init__(module)
            self.count = 0

        def visit_call_(self, call):  # noqa: D102  (PyExprMutator hook)
            call = self.visit_expr_post_order(call)
            parsed = parse_dps_marker(call)
            if parsed is None or not structural_equal(parsed[0].ty, call.ty):
                return call
            tensor, name, role = parsed
            x, y = relax.Var("x", call.ty), relax.Var("y", call.ty)
            packed = relax.call_pure_packed(MARKER_ALIAS, x, StringImm(name), StringImm(role), ty_args=call.ty)
            body = relax.SeqExpr([relax.BindingBlock([relax.VarBinding(y, packed)])], y)
            helper = self.builder_.add_func(relax.Function([x], body, call.ty), f"tvmquant_observe_{self.count}")
            self.count += 1
            return relax.Call(helper, [tensor])

    if "main" not in [gv.name_hint for gv in mod.get_global_vars()]:
        return mod
    body = mod["main"].body
    if not isinstance(body, relax.SeqExpr) or not any(
        parse_dps_marker(binding.value) for block in body.blocks for binding in block.bindings
    ):
        return mod  # a deployment library: no markers
    mutator = _Alias(mod)
    gvar = mod.get_global_var("main")
    mutator.builder_.update_func(gvar, mutator.visit_expr(mod["main"]))
    return mutator.builder_.get()


def parse_dps_marker(value):
    """``(tensor, name, role)`` if ``value`` is a destination-passing marker call, else None."""
    if op_name(value) != "relax.call_dps_packed" or getattr(value.args[0], "global_symbol", None) != MARKER_INTO:
        return None
    tensor, name, role = value.args[1].fields
    return tensor, name.value, role.value


# -- markers on blocked tensors ---------------------------------------------------------------------------
# The x86 build runs FP32 convs in a blocked layout (NCHW8c, weights packed) and moves the markers of their
# inputs, outputs and weights onto the blocked tensors. Such a marker's role says how the tensor it sees is
# laid out: ``"activation@1,32,56,56|1,4,8,56,56|0,1,3,4,2"`` is the plain shape, then ``blocked =
# plain.reshape(split).transpose(perm)``. The marker shows observers the plain tensor, or the blocked one to
# those that said they take any layout (per-tensor statistics, elementwise fake-quantization).
class MarkerLayout:
    """How a blocked tensor comes from its plain one: ``plain.reshape(split).transpose(perm)``."""

    def __init__(self, plain, split, perm):
        self.plain = tuple(int(v) for v in plain)
        self.split = tuple(int(v) for v in split)
        self.perm = tuple(int(v) for v in perm)

    def encode(self, role: str) -> str:
        parts = (self.plain, self.split, self.perm)
        return role + "@" + "|".join(",".join(str(v) for v in part) for part in parts)

    @classmethod
    def decode(cls, role: str):
        """``(role, MarkerLayout or None)`` of a marker's role string."""
        base, _, layout = role.partition("@")
        if not layout:
            return base, None
        plain, split, perm = ([int(v) for v in part.split(",") if v] for part in layout.split("|"))
        return base, cls(plain, split, perm)

    def block(self, plain):
        """The blocked array (a view where numpy can; copy it to keep it)."""
        import numpy as np

        return np.asarray(plain).reshape(self.split).transpose(self.perm)

    def unblock(self, blocked):
        """A contiguous copy of the plain tensor."""
        import numpy as np

        inverse = np.argsort(self.perm)
        return np.ascontiguousarray(np.asarray(blocked).transpose(inverse)).reshape(self.plain)


def output_names(mod: tvm.IRModule, count: int | None = None) -> list:
    """The output names of ``mod``'s ``main``: the source model's (kept by the ONNX import), else ``output{i}``."""
    import json

    func = mod["main"]
    names = []
    if func.attrs is not None and OUTPUT_NAMES_ATTR in func.attrs:
        names = json.loads(str(func.attrs[OUTPUT_NAMES_ATTR]))
    if count is None:
        ret = func.ret_ty if hasattr(func, "ret_ty") else None
        count = len(list(getattr(ret, "fields", []))) or 1
    if len(names) != count:
        names = [f"output{index}" for index in range(count)]
    return names


@register_ffi_error
class UnsupportedGraphError(ValueError):
    """The graph has a structure tvmquant's passes cannot rewrite; the message says which and why."""


class BindingRewriter:
    """Rebuild ``main`` of a module binding by binding.

    Subclasses override :meth:`rewrite` (and optionally :meth:`rewrite_output`). Inside them, ``self.bb`` is
    the block builder to emit into, and :meth:`remap` renames the variables of an expression to their
    rewritten counterparts.
    """

    func_name = "main"
    _binding_value = None  # the value of the binding being rewritten (see emit)

    def __init__(self):
        self.bb: relax.BlockBuilder | None = None
        self.var_map: dict = {}
        self.mod: tvm.IRModule | None = None

    # -- hooks --------------------------------------------------------------------------------------------
    def rewrite(self, var, value):
        """Return the expression to bind for ``var`` (``value`` has its arguments remapped already).

        Return ``value`` itself to keep the binding; return an already-emitted variable to alias ``var`` to it.
        """
        return value

    def rewrite_output(self, output):
        """Return the function's output expression (already remapped)."""
        return output

    def begin(self, func) -> None:
        """Called before the first binding, with the original function."""

    def extra_params(self, func) -> list:
        """Parameters to append to the rebuilt function (called after :meth:`begin`)."""
        return []

    # -- machinery ----------------------------------------------------------------------------------------
    def remap(self, expr):
        if isinstance(expr, Var):
            return self.var_map.get(expr, expr)
        if isinstance(expr, relax.Tuple):
            return relax.Tuple([self.remap(field) for field in expr.fields])
        if isinstance(expr, relax.Call):
            args = [self.remap(arg) for arg in expr.args]
            if all(new.same_as(old) for new, old in zip(args, expr.args)):
                return expr
            return relax.Call(expr.op, args, expr.attrs, list(expr.ty_args))
        if isinstance(expr, tvm.ir.TupleGetItem):
            return tvm.ir.TupleGetItem(self.remap(expr.tuple_value), expr.index)
        return expr

    def emit(self, expr, name: str | None = None):
        """Emit ``expr`` (normalised) and return its variable.

        A call that the binding being rewritten makes again on arguments of the same types (renamed, or behind
        an identity marker) keeps that binding's type instead of having it inferred anew
        (:func:`_keep_inferred_type`).
        """
        if isinstance(expr, Var):
            return expr
        _keep_inferred_type(expr, self._binding_value)
        if name:
            return self.bb.emit(expr, name_hint=name)
        return self.bb.emit(expr)

    def transform_module(self, mod: tvm.IRModule) -> tvm.IRModule:
        if self.func_name not in [gv.name_hint for gv in mod.get_global_vars()]:
            raise UnsupportedGraphError(f"the module has no function {self.func_name!r} to quantize")
        func = mod[self.func_name]
        if not isinstance(func, relax.Function):
            raise UnsupportedGraphError(f"{self.func_name!r} is not a Relax function")
        self.mod = mod
        self.var_map = {}
        self._binding_value = None
        self.bb = relax.BlockBuilder(mod)
        tmp_name = f"__tvmquant_{self.func_name}"
        attrs = {key: value for key, value in func.attrs.items()} if func.attrs is not None else {}
        attrs.pop("global_symbol", None)
        body = func.body
        if not isinstance(body, relax.SeqExpr):
            raise UnsupportedGraphError(f"{self.func_name!r} has no binding blocks")
        self.begin(func)
        with self.bb.function(tmp_name, params=list(func.params) + self.extra_params(func), attrs=attrs):
            with self.bb.dataflow():
                for block in body.blocks:
                    for binding in block.bindings:
                        if not isinstance(binding, relax.VarBinding):
                            raise UnsupportedGraphError(
                                f"binding of {binding.var.name} is a match_cast; tvmquant needs static shapes"
                            )
                        self._binding_value = binding.value
                        value = self.remap(binding.value)
                        new_value = self.rewrite(binding.var, value)
                        if isinstance(new_value, Var) or is_const(new_value):
                            self.var_map[binding.var] = new_value
                        else:
                            name = binding.var.name if not binding.var.name.startswith(("lv", "gv")) else None
                            self.var_map[binding.var] = self.emit(new_value, name)
                self._binding_value = None
                output = self.rewrite_output(self.remap(body.body))
                output = self.bb.emit_output(output)
            self.bb.emit_func_output(output)
        built = _rename_function(self.bb.get(), tmp_name, self.func_name)
        # The output went through emit_output: fold the resulting `gv = lv` alias away.
        return relax.transform.CanonicalizeBindings()(built)


def _keep_inferred_type(new, old) -> None:
    """Give the fresh call ``new`` the type of ``old`` where Relax would infer the same one again.

    That is when both call the same operator with the same attributes (the same object) and type arguments on
    arguments of the same types: a binding re-emitted with renamed arguments, or with a marker (an identity)
    put on one. Inferring a conv2d's type costs about 1 ms (its layouts are parsed anew each time), and every
    pass re-emits every conv: 0.6 s of quantizing MobileNetV2.
    """
    if not (isinstance(new, relax.Call) and isinstance(old, relax.Call)) or new.same_as(old):
        return
    if not isinstance(getattr(old, "ty", None), TensorType):  # a tensor type inferred before
        return
    if not isinstance(new.op, tvm.ir.Op) or not new.op.same_as(old.op) or len(new.args) != len(old.args):
        return
    if new.attrs is not old.attrs and (new.attrs is None or not new.attrs.same_as(old.attrs)):
        return
    if len(new.ty_args) != len(old.ty_args) or not all(a.same_as(b) for a, b in zip(new.ty_args, old.ty_args)):
        return
    for arg, old_arg in zip(new.args, old.args):
        if not (arg.same_as(old_arg) or structural_equal(arg.ty, old_arg.ty)):
            return
    relax.expr._update_type(new, old.ty)


def _rename_function(mod: tvm.IRModule, old: str, new: str) -> tvm.IRModule:
    functions = {}
    for gv, func in mod.functions_items():
        if gv.name_hint == new:
            continue
        if gv.name_hint == old:
            gv = tvm.ir.GlobalVar(new)
            func = func.with_attr("global_symbol", new)
        functions[gv] = func
    return tvm.IRModule(functions, attrs=mod.attrs)


def producers(func) -> dict:
    """Map each bound variable of ``func`` to its bound value."""
    table = {}
    for block in func.body.blocks:
        for binding in block.bindings:
            table[binding.var] = binding.value
    return table


def tvmquant_module_pass(name: str, opt_level: int = 0):
    """Make a class with ``transform_module(mod, ctx)`` a ``tvm.transform.Pass`` that raises tvmquant's errors.

    The class becomes what ``tvm.transform.module_pass`` makes of it: a real ``ModulePass`` that composes in
    ``tvm.transform.Sequential``. Calling an instance on a module, ``AnnotateQuant(config)(mod)``, runs
    ``transform_module`` in Python, so an error comes out as raised (its type, message and Python traceback),
    where TVM's FFI would turn it into a RuntimeError. With pass instruments in the current ``PassContext``
    the call goes through TVM, so that they see the pass.

    Through TVM (a Sequential, or instruments) an error keeps its type only if it is registered with the FFI
    (:func:`tvmquant._compat.register_ffi_error`): tvmquant's error types are, where they are defined.

    Examples
    --------
    >>> @tvmquant_module_pass("FoldNothing")
    ... class FoldNothing:
    ...     def transform_module(self, mod, ctx):
    ...         return mod
    >>> isinstance(FoldNothing(), tvm.transform.Pass)
    True
    """

    def wrap(cls):
        pass_cls = tvm.transform.module_pass(cls, opt_level=opt_level, name=name)

        def __call__(self, mod):
            ctx = tvm.transform.PassContext.current()
            if isinstance(mod, tvm.IRModule) and not ctx.instruments:
                # What TVM's RunPass does when no instrument asks for more (it ignores opt_level and
                # disabled_pass outside a Sequential), minus the FFI round trip of errors.
                return python_pass_instance(self).transform_module(mod, ctx)
            return tvm.transform.Pass.__call__(self, mod)

        pass_cls.__call__ = __call__
        return pass_cls

    return wrap
