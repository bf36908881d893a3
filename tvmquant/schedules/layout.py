"""Keep blocked tensors blocked: sink ``layout_transform`` below elementwise ops and cancel round trips.

``ConvertLayout`` stops at ops that have no layout-inference rule (``relax.quantize``/``dequantize`` among
them), so in a quantized ResNet every residual ``dequantize -> add -> relu -> quantize`` runs in NCHW: both
blocked inputs are unblocked, added, and the sum is blocked again for the next conv. Each such add is a
separate, serial kernel over a strided gather (0.2-0.6 ms at 56x56x256 on one Zen 4 core; 5 ms of a 33 ms
ResNet-50).

:class:`SinkLayoutTransform` rewrites, binding by binding::

    y = op(layout_transform(a, M), ..., scalar)   ->   y_b = op(a, ..., scalar); y = layout_transform(y_b, M)
    layout_transform(layout_transform(a, M), M')  ->   a      (when M' undoes M)

for elementwise ops whose other operands are scalars, per-channel constants (blocked in numpy) or tensors
unblocked by the same map. ``max_pool2d`` follows when ``M`` is the plain ``NCHW{b}c -> NCHW`` map. The
unblocked copies that nothing uses any more are dead and removed by ``DeadCodeElimination``.
"""

from __future__ import annotations

import logging

import numpy as np
import tvm
from tvm import relax, tirx
from tvm.sym import Analyzer  # TVM 0.27: tvm.arith moved to tvm.sym

from .._compat import TensorType, Var, const_value, is_const, tensor_shape
from .._relax import BindingRewriter, MarkerLayout, dps_marker, parse_dps_marker

logger = logging.getLogger(__name__)

__all__ = ["SinkLayoutTransform", "is_identity_composition", "permutation", "permute_map", "unblock_factor"]

#: Ops computed elementwise on (broadcast) operands whose result does not depend on the layout.
ELEMENTWISE_OPS = frozenset(
    {
        "relax.add",
        "relax.subtract",
        "relax.multiply",
        "relax.divide",
        "relax.maximum",
        "relax.minimum",
        "relax.nn.relu",
        "relax.round",
        "relax.floor",
        "relax.astype",
        "relax.clip",
        "relax.quantize",
        "relax.dequantize",
    }
)


def _shape(expr) -> tuple[int, ...] | None:
    shape = tensor_shape(expr)
    return None if shape is None or None in shape else shape


def _mapped(index_map: tirx.IndexMap, shape: tuple[int, ...]):
    """``index_map`` applied to fresh index variables bounded by ``shape`` (variables, images, analyzer)."""
    analyzer = Analyzer()
    variables = [tirx.Var(f"i{k}", "int64") for k in range(len(shape))]
    for var, extent in zip(variables, shape):
        analyzer.bind(var, tvm.ir.Range(0, extent))
    return variables, list(index_map.map_indices(variables)), analyzer


def is_identity_composition(first: tirx.IndexMap, second: tirx.IndexMap, shape: tuple[int, ...]) -> bool:
    """Whether applying ``first`` then ``second`` to indices of a tensor of ``shape`` gives them back."""
    if len(first.final_indices) != len(second.initial_indices):
        return False
    variables, images, analyzer = _mapped(first, shape)
    back = second.map_indices(images)
    return len(back) == len(variables) and all(analyzer.can_prove_equal(b, v) for b, v in zip(back, variables))


def _same_map(first: tirx.IndexMap, second: tirx.IndexMap, shape: tuple[int, ...]) -> bool:
    if len(first.final_indices) != len(second.final_indices):
        return False
    variables, images, analyzer = _mapped(first, shape)
    others = second.map_indices(variables)
    return all(analyzer.can_prove_equal(a, b) for a, b in zip(images, others))


def unblock_factor(index_map: tirx.IndexMap, shape: tuple[int, ...]) -> int | None:
    """The block ``b`` when ``index_map`` is ``(n, c, h, w, cb) -> (n, c * b + cb, h, w)`` on ``shape``."""
    if len(shape) != 5 or len(index_map.final_indices) != 4:
        return None
    block = shape[4]
    (n, c, h, w, cb), images, analyzer = _mapped(index_map, shape)
    expected = [n, c * block + cb, h, w]
    if all(analyzer.can_prove_equal(image, want) for image, want in zip(images, expected)):
        return block
    return None


def permutation(index_map: tirx.IndexMap) -> tuple[int, ...] | None:
    """``axes`` when ``index_map`` is the transpose ``(i_0, ..., i_n) -> (i_axes[0], ..., i_axes[n])``."""
    initial = list(index_map.initial_indices)
    final = list(index_map.final_indices)
    if len(initial) != len(final):
        return None
    axes = []
    for index in final:
        match = [k for k, var in enumerate(initial) if index.same_as(var)]
        if len(match) != 1:
            return None
        axes.append(match[0])
    return tuple(axes) if sorted(axes) == list(range(len(axes))) else None


def permute_map(axes) -> tirx.IndexMap:
    """The index map of ``permute_dims(x, axes)``."""
    return tirx.IndexMap.from_func(lambda *index: [index[axis] for axis in axes], ndim=len(axes))


def _is_bijective(index_map: tirx.IndexMap, shape: tuple[int, ...]) -> bool:
    try:
        index_map.inverse(list(shape))
    except Exception:  # noqa: BLE001  (TVM raises InternalError for non-bijective maps)
        return False
    return True


class _Sinker(BindingRewriter):
    def begin(self, func) -> None:
        # var -> (blocked variable, unblocking map, blocked shape): var == layout_transform(blocked, map)
        self.unblocked: dict = {}
        self.sunk = 0

    def rewrite(self, var, value):
        if not isinstance(value, relax.Call) or not isinstance(value.op, tvm.ir.Op):
            return value
        name = value.op.name
        if name == "relax.call_dps_packed":
            return self._marker(var, value)
        if name == "relax.layout_transform":
            return self._layout_transform(var, value)
        if name in ELEMENTWISE_OPS:
            return self._elementwise(var, value)
        if name == "relax.permute_dims":
            return self._permute_dims(var, value)
        if name == "relax.nn.max_pool2d":
            return self._max_pool(var, value)
        if name == "relax.mean":
            return self._mean(var, value)
        if name == "relax.concat":
            return self._concat(var, value)
        return value

    # -- rules ----------------------------------------------------------------------------------------------
    def _layout_transform(self, var, value):
        source = value.args[0]
        index_map = value.attrs.index_map
        if source in self.unblocked:
            blocked, first, shape = self.unblocked[source]
            if _shape(var) == shape and is_identity_composition(first, index_map, shape):
                self.sunk += 1
                return blocked
        shape = _shape(source)
        if (
            shape is not None
            and value.attrs.pad_value is None
            and len(index_map.final_indices) < len(shape)
            and _is_bijective(index_map, shape)
        ):
            emitted = self.emit(value)
            self.unblocked[emitted] = (source, index_map, shape)
            return emitted
        return value

    def _permute_dims(self, var, value):
        source = value.args[0]
        shape = _shape(source)
        if shape is None:
            return value
        axes = (
            tuple(int(a) for a in value.attrs.axes)
            if value.attrs.axes is not None
            else tuple(reversed(range(len(shape))))
        )
        index_map = permute_map(axes)
        if source in self.unblocked:
            blocked, first, first_shape = self.unblocked[source]
            if _shape(var) == first_shape and is_identity_composition(first, index_map, first_shape):
                self.sunk += 1
                return blocked
        if is_const(source):
            return value  # a weight: FoldConstant transposes it
        emitted = self.emit(value)
        self.unblocked[emitted] = (source, index_map, shape)
        return emitted

    def _elementwise(self, var, value):
        plain_shape = _shape(var)
        if plain_shape is None:
            return value
        key = None
        for arg in value.args:
            if isinstance(arg, Var) and arg in self.unblocked:
                blocked, index_map, shape = self.unblocked[arg]
                if _shape(arg) != plain_shape:
                    return value  # broadcast of a blocked operand: keep NCHW
                if key is None:
                    key = (index_map, shape)
                elif key[1] != shape or not _same_map(key[0], index_map, shape):
                    return value
        if key is None:
            return value
        index_map, shape = key
        block = unblock_factor(index_map, shape)
        axes = permutation(index_map)
        args = []
        for arg in value.args:
            new = self._blocked_operand(arg, plain_shape, block, axes)
            if new is None:
                return value
            args.append(new)
        blocked = self.emit(relax.Call(value.op, args, value.attrs))
        return self._unblock(var, blocked, index_map, shape)

    def _blocked_operand(self, arg, plain_shape, block, axes=None):
        if isinstance(arg, Var) and arg in self.unblocked:
            return self.unblocked[arg][0]
        shape = _shape(arg)
        if shape is None:
            return arg if not isinstance(getattr(arg, "ty", None), TensorType) else None  # attrs-like operands
        if int(np.prod(shape, dtype=np.int64)) == 1:
            return arg  # a scalar broadcasts the same in any layout
        if axes is not None and is_const(arg) and len(shape) <= len(axes):
            # A broadcast constant under a transpose: transpose it in numpy (plain = transpose(src, axes)).
            full = (1,) * (len(axes) - len(shape)) + shape
            array = const_value(arg).reshape(full).transpose(np.argsort(axes))
            return relax.const(np.ascontiguousarray(array), str(array.dtype))
        if block is None or not is_const(arg) or len(plain_shape) != 4:
            return None
        # A per-channel constant of (broadcast) shape (1, C, 1, 1): block it in numpy.
        full = (1,) * (4 - len(shape)) + shape
        channels = plain_shape[1]
        if full != (1, channels, 1, 1) or channels % block != 0:
            return None
        array = const_value(arg).reshape(1, channels // block, 1, 1, block)
        return relax.const(array, str(array.dtype))

    def _max_pool(self, var, value):
        data = value.args[0]
        attrs = value.attrs
        if data not in self.unblocked or str(attrs.layout) != "NCHW" or str(attrs.out_layout) != "NCHW":
            return value
        blocked, index_map, shape = self.unblocked[data]
        block = unblock_factor(index_map, shape)
        if block is not None:
            layout = f"NCHW{block}c"
        elif permutation(index_map) == (0, 3, 1, 2):
            layout = "NHWC"
        else:
            return value
        pooled = self.emit(
            relax.op.nn.max_pool2d(
                blocked,
                pool_size=[int(v) for v in attrs.pool_size],
                strides=[int(v) for v in attrs.strides],
                padding=[int(v) for v in attrs.padding],
                dilation=[int(v) for v in attrs.dilation],
                ceil_mode=bool(attrs.ceil_mode),
                count_include_pad=bool(attrs.count_include_pad),
                layout=layout,
                out_layout=layout,
            )
        )
        return self._unblock(var, pooled, index_map, _shape(pooled))

    def _mean(self, var, value):
        data = value.args[0]
        if data not in self.unblocked or not bool(value.attrs.keepdims) or value.attrs.axis is None:
            return value
        blocked, index_map, shape = self.unblocked[data]
        axes = permutation(index_map)
        if axes is None:
            return value
        rank = len(axes)
        reduced = [axes[int(a) % rank] for a in value.attrs.axis]
        mean = self.emit(relax.op.mean(blocked, axis=sorted(reduced), keepdims=True))
        return self._unblock(var, mean, index_map, _shape(mean))

    def _concat(self, var, value):
        fields = value.args[0]
        if not isinstance(fields, relax.Tuple) or value.attrs.axis is None:
            return value
        sources, key = [], None
        for field in fields.fields:
            if field not in self.unblocked:
                return value
            blocked, index_map, shape = self.unblocked[field]
            axes = permutation(index_map)
            if axes is None or (key is not None and key != axes):
                return value
            key = axes
            sources.append(blocked)
        axis = key[int(value.attrs.axis) % len(key)]
        joined = self.emit(relax.op.concat(sources, axis=axis))
        return self._unblock(var, joined, permute_map(key), _shape(joined))

    def _marker(self, var, value):
        """An observe marker sees the blocked tensor, its role saying how it is blocked (see ``MarkerLayout``)."""
        parsed = parse_dps_marker(value)
        if parsed is None or parsed[0] not in self.unblocked or "@" in parsed[2]:
            return value
        tensor, name, role = parsed
        blocked, index_map, shape = self.unblocked[tensor]
        plain = _shape(tensor)
        block = unblock_factor(index_map, shape)
        axes = permutation(index_map)
        if block is not None and plain is not None and len(plain) == 4:
            batch, channels, height, width = plain
            layout = MarkerLayout(plain, (batch, channels // block, block, height, width), (0, 1, 3, 4, 2))
        elif axes is not None and plain is not None:
            layout = MarkerLayout(plain, plain, tuple(int(a) for a in np.argsort(axes)))
        else:
            return value
        marked = self.emit(dps_marker(blocked, name, layout.encode(role), blocked.ty))
        return self._unblock(var, marked, index_map, shape)

    def _unblock(self, var, blocked, index_map, shape):
        self.sunk += 1
        axes = permutation(index_map)
        if axes is not None:
            plain = self.emit(relax.op.permute_dims(blocked, list(axes)))
        else:
            plain = self.emit(relax.op.layout_transform(blocked, index_map))
        self.unblocked[plain] = (blocked, index_map, shape)
        return plain


@tvm.transform.module_pass(opt_level=0, name="SinkLayoutTransform")
class SinkLayoutTransform:
    """Run elementwise ops (and max pooling) in the blocked layout and cancel the round trips.

    See the module docstring for the rules. The result computes exactly what the input did: only where each
    elementwise op runs changes. Run after :class:`~tvmquant.schedules.x86.BlockInt8Conv2d` and before
    ``GatherLayoutTransform``; follow it with ``DeadCodeElimination``.

    Examples
    --------
    >>> mod = SinkLayoutTransform()(mod)  # doctest: +SKIP
    """

    def transform_module(self, mod: tvm.IRModule, _ctx: tvm.transform.PassContext) -> tvm.IRModule:
        if "main" not in [gv.name_hint for gv in mod.get_global_vars()]:
            return mod
        sinker = _Sinker()
        out = sinker.transform_module(mod)
        logger.debug("SinkLayoutTransform: %d ops moved into the blocked layout or round trips cancelled", sinker.sunk)
        return out
