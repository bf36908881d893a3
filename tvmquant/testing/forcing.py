"""Layer-by-layer comparison of a realized model with its simulated model ("teacher forcing").

Run end to end, the integer model and the float simulation can drift apart: a single value that rounds the
other way at a tie changes everything downstream. To check each quantized layer on its own, the realized model
gets every quantized tensor (the extra outputs added by ``ExposeQuantizedTensors``) as an extra input too, and
each layer reads its inputs from there. Feeding the simulated model's tensors then measures every layer of the
integer model against the simulation from identical inputs.
"""

from __future__ import annotations

from tvm import relax

from .._relax import BindingRewriter


class _Forcer(BindingRewriter):
    def begin(self, func):
        output = func.body.body
        self.output_var = None
        if isinstance(output, relax.Var):  # `gv = (out, q0, q1, ...)`; `return gv`
            self.output_var = output
            output = next(b.value for block in func.body.blocks for b in block.bindings if b.var.same_as(output))
        self.exposed = list(output.fields[1:]) if isinstance(output, relax.Tuple) else []
        self.forced = [relax.Var(f"forced_{i}", var.ty) for i, var in enumerate(self.exposed)]
        self.computed: dict = {}

    def extra_params(self, func):
        return list(self.forced)

    def rewrite(self, var, value):
        if self.output_var is not None and var.same_as(self.output_var):
            return self._output_tuple(value)
        for index, exposed in enumerate(self.exposed):
            if var.same_as(exposed):
                self.computed[index] = self.emit(value)
                self.var_map[var] = self.forced[index]  # consumers read the forced tensor
                return self.forced[index]
        return value

    def rewrite_output(self, output):
        return self._output_tuple(output) if isinstance(output, relax.Tuple) else output

    def _output_tuple(self, output):
        fields = list(output.fields)
        return relax.Tuple([fields[0], *[self.computed.get(i, fields[i + 1]) for i in range(len(self.exposed))]])


def teacher_forced(mod):
    """``mod`` (with exposed quantized tensors) rewritten so that each quantized tensor is also an input."""
    return _Forcer().transform_module(mod)
