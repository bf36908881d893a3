"""Default schedules for x86 kernels without a tuning record: meta-schedule's design space, chosen decisions.

:func:`choose_schedule` takes the design-space sketches meta-schedule would search for a kernel (multi-level
tiling ``SSRSRS`` = ``S0 S1 R0 S2 R1 S3``, VNNI tensorization where the target has it, parallel/vectorize/
unroll annotations) and replays them (``Trace.apply_to_schedule`` with a ``decision_provider``) with decisions
from a model of the CPU instead of random samples:

- ``S3``, the innermost spatial tile, is a register tile (:func:`_register_tile`): the output's contiguous
  axis is the vector (8 fp32/int32 lanes with AVX2, 16 with AVX-512; in a VNNI-tensorized block each
  ``vpdpbusd`` is one vector of accumulators), the other axes give rows of accumulators, and the tile is the
  one with the most multiply-adds per cycle in a model of one reduction step (multiply-adds and loads per
  cycle, the multiply-add latency, about three quarters of the vector registers for accumulators; strided
  and partial vectors cost what LLVM makes of them);
- the outer spatial tiles ``S0`` take the rest, so the parallel loop meta-schedule fuses from them has
  ``extent / tile`` iterations; the loops of the operand that is cheaper to re-read go to ``S2``, inside the
  outer reduction (:func:`_inner_axes`: the order with the least memory traffic);
- the inner reduction tile ``R1`` takes whole small loops (kernel taps, the VNNI quad) and up to
  :data:`INNER_REDUCTION` input channels;
- unrolling gets :data:`UNROLL_STEPS` steps; a pad the sketch would compute inline (an ``if_then_else`` in
  the conv's vector loop, which LLVM scalarises) stays its own loop nest; sketches that fuse the epilogue
  into the conv's tile come first.

Each schedule passes meta-schedule's postprocessors and compiles, as a tuning candidate would; a kernel for
which no sketch does gets the old default (:func:`tvmquant.schedules.x86._search_valid_sketch`, the first
random sample that does). Nothing is measured: the same kernel and target give the same schedule. Blocks
meta-schedule does not tile (pooling, rfactor splits) keep the sketch's sampled decisions.
"""

from __future__ import annotations

import itertools
import logging
import math
from dataclasses import dataclass
from typing import Literal

import tvm
from tvm import tirx
from tvm.s_tir import meta_schedule as ms
from tvm.sym import Analyzer
from tvm.target import codegen as _llvm_codegen

from .._ms_worker import build_candidate
from .fixed import _block_has_reduction

logger = logging.getLogger(__name__)

__all__ = ["CpuModel", "choose_schedule", "cpu_model", "heuristic_schedule", "heuristic_trace"]

#: Unroll steps given to meta-schedule's ``unroll_explicit`` (its candidates are 0, 16, 64, 512).
UNROLL_STEPS = 64
#: Unroll steps of the blocked floating-point convs (``conv2d_NCHWc_float``, ``depthwise_NCHWc_float``): their
#: vector is the channel block, so unrolling buys little, and at 64 steps LLVM took 2-3 s on some of
#: MobileNetV2's kernels. At 16 (a noisy Zen 3, batch 4): MobileNetV2 50-65 ms against 61-71 ms at 64,
#: ResNet-50-style 534 against 493 ms, within the noise.
FLOAT_BLOCKED_UNROLL_STEPS = 16
FLOAT_BLOCKED_BLOCKS = ("conv2d_NCHWc_float", "depthwise_NCHWc_float")
#: Blocks whose vectorized loop is one vector of the channel block, never fused with the register tile's
#: other axes (:func:`_vectorize_lanes_only`).
ONE_VECTOR_BLOCKS = ("depthwise_NCHWc_float",)
#: Input channels (the innermost reduction loop of a conv) reduced inside the register tile.
INNER_REDUCTION = 32
#: What the operands a register tile reads over its inner reduction may take of the L1 data cache (32 KB on
#: Zen 3 and 4, 48 KB on Sapphire Rapids).
L1_BYTES = 24 * 1024
#: Share of the vector registers the accumulators of the register tile may use.
ACCUMULATOR_SHARE = 0.75
#: The register-tile model (:func:`_register_tile`): vector multiply-adds and loads issued per cycle, and the
#: latency of a multiply-add (FP32 FMA; the VNNI ``vpdpbusd`` of a tensorized block) in cycles.
FMA_PER_CYCLE = 2
LOADS_PER_CYCLE = 2
FMA_LATENCY = 4
INTRINSIC_LATENCY = 5
#: The loop-order model (:func:`_inner_axes`): an operand this small is re-read from the L2 cache, at this
#: share of the cost of reading it from memory.
CACHE_BYTES = 256 * 1024
CACHED_COST = 0.1


@dataclass(frozen=True)
class CpuModel:
    """What the heuristic knows about an x86 target."""

    vector_bits: int
    vector_registers: int
    num_cores: int

    @property
    def accumulators(self) -> int:
        return max(1, int(self.vector_registers * ACCUMULATOR_SHARE))


def cpu_model(target: tvm.target.Target) -> CpuModel:
    """Vector width and register count of ``target`` (from LLVM's features for its ``mcpu``), and its cores."""
    features = frozenset(str(f) for f in _llvm_codegen.llvm_get_cpu_features(target))
    if "avx512f" in features:
        bits, registers = 512, 32
    elif "avx2" in features or "avx" in features:
        bits, registers = 256, 16
    else:
        bits, registers = 128, 16
    return CpuModel(bits, registers, int(target.attrs.get("num-cores", 1) or 1))


#: ``Schedule.get`` and ``get_loops`` without TVM's Python type checking of their arguments (a third of the time
#: the heuristic spent replaying a sketch went to it: ~1,300 lookups for MobileNetV2's kernels).
_get = getattr(tvm.s_tir.Schedule.get, "__wrapped__", tvm.s_tir.Schedule.get)
_get_loops = getattr(tvm.s_tir.Schedule.get_loops, "__wrapped__", tvm.s_tir.Schedule.get_loops)


# ----------------------------------------------------------------------------------------------------------
# Block analysis
@dataclass
class _Loop:
    var: tirx.Var
    name: str
    extent: int
    spatial: bool
    out_stride: int
    operand_strides: tuple[int, ...]  # stride of the loop in each operand read (0: not used)
    span: int  # the longest run (a divisor of the extent) over which every access is linear in the loop


def _find_realize(stmt, block):
    """The ``SBlockRealize`` of ``block`` under ``stmt`` (loops, sequences, attributes)."""
    todo = [stmt]
    while todo:
        node = todo.pop()
        if isinstance(node, tvm.s_tir.stmt.SBlockRealize):
            if node.block.same_as(block):
                return node
            todo.append(node.block.body)
        elif isinstance(node, tvm.s_tir.stmt.SBlock):
            todo.append(node.body)
        elif isinstance(node, tirx.stmt.SeqStmt):
            todo.extend(node.seq)
        elif hasattr(node, "body"):
            todo.append(node.body)
    return None


def _int(value) -> int | None:
    return int(value) if isinstance(value, tirx.IntImm) else None


def _flat_index(region, shape):
    index = tirx.IntImm("int64", 0)
    for dim, extent in zip(region, shape, strict=True):
        index = index * tirx.IntImm("int64", int(extent)) + tirx.Cast("int64", dim.min)
    return index


_PYTHON_OPERATORS = {tirx.Add: "+", tirx.Sub: "-", tirx.Mul: "*", tirx.FloorDiv: "//", tirx.FloorMod: "%"}


def _integer_function(expr, params: list):
    """A Python function of a list of ints (the values of ``params``, TIR variables) that evaluates the integer
    index expression ``expr``, or None when ``expr`` holds anything but constants, ``params``, ``+ - *``, floor
    division and modulo, casts, min and max.

    :func:`_analyze` evaluates each index of a kernel at a few hundred loop points; an ``Analyzer`` per point
    took 0.6 s of the 1.9 s MobileNetV2's 32 kernels spent in the default-schedule heuristic.
    """

    def source(node) -> str:
        if isinstance(node, tirx.IntImm):
            return str(int(node.value))
        if isinstance(node, tirx.Var):
            for k, param in enumerate(params):
                if node.same_as(param):
                    return f"a[{k}]"
            raise LookupError(node)
        if isinstance(node, tirx.Cast):
            return source(node.value)
        operator = _PYTHON_OPERATORS.get(type(node))
        if operator is not None:
            return f"({source(node.a)} {operator} {source(node.b)})"
        if isinstance(node, (tirx.Min, tirx.Max)):
            return f"{'min' if isinstance(node, tirx.Min) else 'max'}({source(node.a)}, {source(node.b)})"
        raise LookupError(node)

    try:
        return eval(f"lambda a: {source(expr)}", {"__builtins__": {"min": min, "max": max}})  # noqa: S307
    except LookupError:
        return None


def _analyze(sch: tvm.s_tir.Schedule, block_rv) -> tuple[list[_Loop], list[int]] | None:
    """The loops of a block with their kind and their strides in its output and operand buffers.

    None when the block has loops of non-constant extent or buffers of non-constant shape.
    """
    block = _get(sch, block_rv)
    loop_rvs = _get_loops(sch, block_rv)
    if not loop_rvs:
        return None
    fors = [_get(sch, rv) for rv in loop_rvs]
    extents = [_int(f.extent) for f in fors]
    if any(e is None for e in extents):
        return None
    realize = _find_realize(fors[-1].body, block)
    if realize is None:
        return None
    loop_vars = [f.loop_var for f in fors]

    iter_values = list(realize.iter_values)
    iter_vars = [iv.var for iv in block.iter_vars]
    value_fns = [_integer_function(value, loop_vars) for value in iter_values]

    def values(point: dict[int, int]) -> list[int | None]:
        """Each iter var's value at the loop point ``{loop index: value}`` (other loops at 0)."""
        args = [point.get(k, 0) for k in range(len(loop_vars))]
        if all(fn is not None for fn in value_fns):
            return [fn(args) for fn in value_fns]
        analyzer = Analyzer()
        for var, arg in zip(loop_vars, args, strict=True):
            analyzer.bind(var, tirx.IntImm(str(var.ty.dtype), arg))
        return [_int(analyzer.simplify(value)) for value in iter_values]

    def offset(region_index, index_fn, point: dict[int, int]) -> int | None:
        """``region_index`` (``index_fn`` its Python function, or None) at the loop point ``point``."""
        at = values(point)
        if any(value is None for value in at):
            return None
        if index_fn is not None:
            return index_fn(at)
        analyzer = Analyzer()
        for var, value in zip(iter_vars, at, strict=True):
            analyzer.bind(var, tirx.IntImm(str(var.ty.dtype), value))
        return _int(analyzer.simplify(region_index))

    spans = list(extents)

    def strides(access) -> list[int]:
        """Stride of each loop in ``access``; narrows ``spans`` to where the access stays linear (a packed
        index such as ``i // 16, i % 16`` is linear over 16 only)."""
        shape = [_int(s) for s in access.source.shape]
        if any(s is None for s in shape):
            return [0] * len(loop_vars)
        index = _flat_index(access.region, shape)
        index_fn = _integer_function(index, iter_vars)
        base = offset(index, index_fn, {})
        out = []
        for k in range(len(loop_vars)):
            moved = offset(index, index_fn, {k: 1}) if extents[k] > 1 else base
            stride = 0 if base is None or moved is None else moved - base
            out.append(stride)
            if base is None or moved is None:
                continue
            for d in sorted(_divisors(extents[k], spans[k]), reverse=True):
                if d <= 2:
                    spans[k] = d
                    break
                last = offset(index, index_fn, {k: d - 1})
                if last is not None and last - base == (d - 1) * stride:
                    spans[k] = d
                    break
        return out

    # Iteration kind of each loop: that of the iter vars its variable is bound into.
    iter_kinds = []
    base = values({})
    for k in range(len(loop_vars)):
        moved = values({k: 1})
        kinds = {
            int(iv.iter_type)
            for iv, m, b in zip(block.iter_vars, moved, base, strict=True)
            if m is not None and b is not None and m != b
        }
        iter_kinds.append(kinds)
    if len(block.writes) != 1:
        return None
    out_strides = strides(block.writes[0])
    reduction = [k for k, kinds in enumerate(iter_kinds) if kinds and kinds != {0}]
    operand_strides, operand_bytes = [], []
    for access in block.reads:
        if access.source.same_as(block.writes[0].source):
            continue
        s = strides(access)
        if any(s[k] != 0 for k in reduction):  # an operand of the reduction (not an epilogue input)
            operand_strides.append(s)
            elements = math.prod(_int(e) or 1 for e in access.source.shape)
            operand_bytes.append(elements * tvm.DataType(str(access.source.dtype)).bits // 8)
    loops = []
    for k, f in enumerate(fors):
        spatial = iter_kinds[k] == {0} or (not iter_kinds[k] and out_strides[k] != 0)
        loops.append(
            _Loop(
                var=f.loop_var,
                name=str(f.loop_var.name),
                extent=extents[k],
                spatial=spatial,
                out_stride=out_strides[k],
                operand_strides=tuple(s[k] for s in operand_strides),
                span=spans[k],
            )
        )
    return loops, operand_bytes


def _divisors(n: int, limit: int) -> list[int]:
    return [d for d in range(1, min(n, limit) + 1) if n % d == 0]


def _vector_loads(length: int, lanes: int) -> int:
    """Loads LLVM needs for ``length`` contiguous lanes: whole vectors, then halves, quarters... (it cannot
    widen a load past the end of the row; arithmetic it widens: ``ceil(length / lanes)`` instructions)."""
    return length // lanes + bin(length % lanes).count("1")


def _fusable_with_vector(loops: list[_Loop], outer: int, vec: int) -> bool:
    """Whether meta-schedule's vectorize postprocessor fuses loop ``outer`` with the vector loop ``vec`` when
    the vector tile covers the whole of ``vec``: every access contiguous across both (or using neither)."""
    extent = loops[vec].extent
    pairs = [(loops[outer].out_stride, loops[vec].out_stride)]
    pairs += list(zip(loops[outer].operand_strides, loops[vec].operand_strides, strict=True))
    for s_outer, s_vec in pairs:
        if s_vec == 0 and s_outer == 0:
            continue
        if s_vec == 0 or s_outer != s_vec * extent:
            return False
    return True


def _tile_candidates(loops: list[_Loop], spatial: list[int], vector: set[int], vector_limit: int, budget: int):
    """Every register tile ``{loop index: tile}`` over ``spatial`` (tiles divide the loops' linear spans):
    the ``vector`` loops up to ``vector_limit``, the product of the others up to ``budget``."""

    def extend(pos: int, tile: dict[int, int], product: int):
        if pos == len(spatial):
            yield dict(tile)
            return
        k = spatial[pos]
        limit = vector_limit if k in vector else budget // product
        for d in _divisors(loops[k].span, limit):
            tile[k] = d
            yield from extend(pos + 1, tile, product if k in vector else product * d)
        del tile[k]

    yield from extend(0, {}, 1)


def _register_tile(loops: list[_Loop], cpu: CpuModel, lanes: int) -> dict[int, int]:
    """Innermost spatial tile per loop index: the register tile with the most multiply-adds per cycle.

    ``lanes``: elements per vector along the output's contiguous axis (1 when the block is tensorized: each
    intrinsic call produces one vector of accumulators). The model of one step of the innermost reduction:
    ``ops`` vector multiply-adds (one per accumulator register) and ``loads`` vector loads or broadcasts of
    the operands, at :data:`FMA_PER_CYCLE` and :data:`LOADS_PER_CYCLE`, and no faster than the multiply-add
    latency (each accumulator depends on its previous step); accumulators within ``cpu.accumulators``.
    """
    budget = cpu.accumulators
    spatial = [k for k, loop in enumerate(loops) if loop.spatial and loop.extent > 1]
    vec = None
    if lanes > 1 and spatial and loops[spatial[-1]].out_stride == 1:
        vec = spatial[-1]
    # The loop just outside the vector loop, fused into the vector when the vector tile covers the row.
    fusable = None
    if vec is not None and len(spatial) > 1 and spatial[-2] == vec - 1 and _fusable_with_vector(loops, vec - 1, vec):
        fusable = vec - 1
    n_operands = len(loops[0].operand_strides) if loops else 0
    latency = FMA_LATENCY if lanes > 1 else INTRINSIC_LATENCY
    best, best_key = {}, None
    for tile in _tile_candidates(loops, spatial, {vec, fusable} - {None}, 4 * lanes, budget):
        useful = math.prod(tile.values())
        group = [vec] if vec is not None else []
        if fusable is not None and tile[vec] == loops[vec].extent:
            group.append(fusable)
        length = math.prod(tile[k] for k in group)
        vector_ops = math.ceil(length / lanes) if group else 1
        others = [k for k in spatial if k not in group]
        ops = vector_ops * math.prod(tile[k] for k in others)
        if ops > budget:
            continue
        loads = 0
        for o in range(n_operands):
            count = math.prod(tile[k] for k in others if loops[k].operand_strides[o] != 0)
            if group and any(loops[k].operand_strides[o] != 0 for k in group):
                contiguous = abs(loops[vec].operand_strides[o]) == 1
                # Strided: a load and an insert per lane (LLVM scalarises the gather).
                count *= _vector_loads(length, lanes) if contiguous else 2 * length
            loads += count
        cycles = max(ops / FMA_PER_CYCLE, loads / LOADS_PER_CYCLE, latency)
        tiled = [pos for pos, k in enumerate(spatial) if tile[k] > 1]
        # Most useful multiply-adds per cycle; then fewer loads; then fewer, inner tiled loops.
        key = (round(useful / cycles, 2), -loads, -len(tiled), sum(tiled))
        if best_key is None or key > best_key:
            best, best_key = tile, key
    return best


def _inner_axes(loops: list[_Loop], operand_bytes: list[int], tile: dict[int, int], cpu: CpuModel) -> set[int]:
    """Spatial loops whose outer part goes inside the reduction's outer loop (the third tiling level).

    With two operands ``A`` (say the data) and ``B`` (the weights), either the loops that index only ``B``
    run inside those that index only ``A`` (each tile of ``A`` stays in cache while all of ``B`` streams
    past it: ``B`` is read once per tile of ``A``), or the other way round. The order with the least memory
    traffic wins, an operand that fits in :data:`CACHE_BYTES` being re-read from cache at
    :data:`CACHED_COST` of the cost. The inner loops go back out when the outer ones would leave fewer than
    4 parallel jobs per core.
    """
    if len(operand_bytes) != 2:
        return set()
    spatial = [k for k, loop in enumerate(loops) if loop.spatial and loop.extent // tile.get(k, 1) > 1]

    def only(o):
        return [k for k in spatial if loops[k].operand_strides[o] != 0 and loops[k].operand_strides[1 - o] == 0]

    def traffic(reread):
        size = operand_bytes[reread]
        repeats = math.prod(loops[k].extent // tile.get(k, 1) for k in only(1 - reread))
        cost = CACHED_COST if size <= CACHE_BYTES else 1.0
        return operand_bytes[1 - reread] + size + size * (repeats - 1) * cost

    reread = min((0, 1), key=traffic)
    inner = only(reread)
    outer_jobs = math.prod(loops[k].extent // tile.get(k, 1) for k in spatial if k not in inner)
    while inner and outer_jobs < 4 * cpu.num_cores:
        k = inner.pop(0)
        outer_jobs *= loops[k].extent // tile.get(k, 1)
    return set(inner)


def _plan(
    loops: list[_Loop], operand_bytes: list[int], cpu: CpuModel, elem_bits: int, tensorized: bool, safe: bool
) -> dict[str, tuple[int, ...]]:
    """The tiles of every loop of a tiled block: ``{loop name: (S0, S1, S2, S3)}`` for spatial loops,
    ``{loop name: (R0, R1)}`` for reduction loops (``SSRSRS``: ``S0 S1 R0 S2 R1 S3``).

    ``S3`` is the register tile, ``S0`` the rest (the parallel loop), except for the loops
    :func:`_inner_axes` moves inside the outer reduction (``S2``); ``S1`` is 1. With ``safe``, the innermost
    tiled loop of a tensorized block keeps its register tile in ``S2`` instead: meta-schedule's vectorize
    postprocessor would otherwise vectorize that loop around the intrinsic, which LLVM refuses for a dense
    ("Cannot broadcast lanes=16 to 64").
    """
    lanes = 1 if tensorized else max(1, cpu.vector_bits // max(elem_bits, 8))
    tile = _register_tile(loops, cpu, lanes)
    if safe and tensorized:
        tiled = [k for k in tile if tile[k] > 1]
        if tiled:
            tile = {**tile, tiled[-1]: 1}
            demoted = tiled[-1]
        else:
            demoted = None
    else:
        demoted = None
    inner_axes = _inner_axes(loops, operand_bytes, tile, cpu)
    # The blocked FP32 convs split the input channels over two loops: ``ic_inner`` (the block, taken whole)
    # and ``ic_outer``, which gets what is left of INNER_REDUCTION. Chunks of 32 blocks (256 channels) in the
    # tile made LLVM spend 2-3 s on each of ResNet-50's 14x14 convs.
    inner = {loop.name: loop.extent for loop in loops if not loop.spatial}
    budget = {"ic_outer": _ic_outer_chunk(loops, tile, elem_bits)} if "ic_inner" in inner else {}
    plan = {}
    for k, loop in enumerate(loops):
        if loop.spatial:
            t = tile.get(k, 1)
            rest = loop.extent // t
            plan[loop.name] = (1, 1, rest, t) if k in inner_axes else (rest, 1, 1, t)
            if k == demoted:
                plan[loop.name] = (1, 1, loop.extent, 1) if k in inner_axes else (1, 1, 1, 1)
        else:
            # Inner reduction: whole small loops (taps, the VNNI quad); long loops (input channels) in
            # chunks of at most INNER_REDUCTION.
            if loop.name in budget:
                t = max(_divisors(loop.extent, budget[loop.name]))
            else:
                t = loop.extent if loop.extent <= 16 else max(_divisors(loop.extent, INNER_REDUCTION))
            plan[loop.name] = (loop.extent // t, t)
    if demoted is not None and demoted not in inner_axes:
        # Its register tile, now the third level (inside the outer reduction, around the inner one).
        extent = loops[demoted].extent
        fitting = _divisors(loops[demoted].span, cpu.accumulators)
        t = max([d for d in fitting if extent // d >= 4 * cpu.num_cores] or [1])
        plan[loops[demoted].name] = (extent // t, 1, t, 1)
    return plan


def _ic_outer_chunk(loops: list[_Loop], tile: dict[int, int], elem_bits: int) -> int:
    """Input-channel blocks (``ic_outer``) a blocked FP32 conv reduces inside its register tile: what is left of
    :data:`INNER_REDUCTION` after the block (``ic_inner``), fewer where the operands one tile reads over them
    would not stay in :data:`L1_BYTES` (a 3x3 conv's weights: 4 output blocks x 9 taps x 64 values each)."""
    extent = {loop.name: loop.extent for loop in loops}
    limit = max(1, INNER_REDUCTION // extent["ic_inner"])
    outer = next(k for k, loop in enumerate(loops) if loop.name == "ic_outer")
    per_block = 0  # bytes the tile reads per ic_outer block
    for o in range(len(loops[outer].operand_strides)):
        if loops[outer].operand_strides[o] == 0:
            continue
        elements = 1
        for k, loop in enumerate(loops):
            if k != outer and loop.operand_strides[o] != 0:
                elements *= tile.get(k, 1) if loop.spatial else loop.extent
        per_block += elements * elem_bits // 8
    fitting = max(1, L1_BYTES // max(per_block, 1))
    return max(_divisors(extent["ic_outer"], min(limit, fitting)))


def _tiles(extent: int, n: int, entry: tuple[int, ...], max_innermost: int) -> list[int] | None:
    """``SamplePerfectTile`` decision of ``n`` tiles from a plan entry (None when it does not fit)."""
    if math.prod(entry) != extent or n < 2:
        return None
    if len(entry) == n:
        tiles = list(entry)
    else:
        tiles = [math.prod(entry[:-1])] + [1] * (n - 2) + [entry[-1]]
    if tiles[-1] > max_innermost:
        return None
    return tiles


# ----------------------------------------------------------------------------------------------------------
# Replaying a sketch with the heuristic's decisions
class _Decider:
    """``decision_provider`` for ``Trace.apply_to_schedule``: the heuristic's tiles and unroll steps."""

    def __init__(self, sch: tvm.s_tir.Schedule, cpu: CpuModel, pads: set[str], safe: bool, unroll: int = UNROLL_STEPS):
        self.sch = sch
        self.cpu = cpu
        self.pads = pads
        self.safe = safe
        self.unroll = unroll
        self.plans: dict[str, dict | None] = {}

    def _block_of(self, loop_rv):
        realize = None
        todo = [_get(self.sch, loop_rv).body]
        while todo and realize is None:
            node = todo.pop()
            if isinstance(node, tvm.s_tir.stmt.SBlockRealize):
                realize = node
            elif isinstance(node, tirx.stmt.SeqStmt):
                todo.extend(reversed(list(node.seq)))
            elif hasattr(node, "body"):
                todo.append(node.body)
        return None if realize is None else realize.block

    def _plan_for(self, block) -> dict | None:
        name = str(block.name_hint)
        if name not in self.plans:
            plan = None
            annotations = block.annotations
            if "meta_schedule.tiling_structure" in annotations or "meta_schedule.auto_tensorize" in annotations:
                block_rv = self.sch.get_sblock(name)
                analysis = _analyze(self.sch, block_rv)
                if analysis:
                    tensorized = "meta_schedule.auto_tensorize" in block.annotations
                    bits = tvm.DataType(str(block.writes[0].source.dtype)).bits
                    plan = _plan(*analysis, self.cpu, bits, tensorized, self.safe)
            self.plans[name] = plan
        return self.plans[name]

    def __call__(self, inst, inputs, attrs, decision):
        kind = inst.kind.name
        if kind == "SamplePerfectTile":
            loop = _get(self.sch, inputs[0])
            block = self._block_of(inputs[0])
            plan = None if block is None else self._plan_for(block)
            entry = None if plan is None else plan.get(str(loop.loop_var.name))
            if entry is None:
                return decision
            extent = _int(loop.extent)
            tiles = None if extent is None else _tiles(extent, int(attrs[0]), entry, int(attrs[1]))
            return decision if tiles is None else tiles
        if kind == "SampleComputeLocation":
            # -1: the root (its own loop nest), -2: inline. A pad computed inline is an if_then_else in
            # the conv's vector loop (see _keep_padding_out).
            if str(_get(self.sch, inputs[0]).name_hint) in self.pads:
                return -1
            return decision
        if kind == "SampleCategorical":
            candidates = [int(c) for c in attrs[0]]
            if self.unroll in candidates and 0 in candidates:  # meta-schedule's unroll candidates
                return candidates.index(self.unroll)
        return decision


def _root_blocks(func: tirx.PrimFunc) -> list:
    sch = tvm.s_tir.Schedule(tvm.IRModule({"main": func}))
    try:
        return [sch.get(rv) for rv in sch.get_child_blocks(sch.get_sblock("root"))]
    except Exception:  # noqa: BLE001  (no root block)
        return []


def _padding_blocks(blocks: list) -> set[str]:
    """Names of the blocks (a kernel's :func:`_root_blocks`) that pad (a store of ``if_then_else``: TOPI's
    ``pad_temp``)."""
    names = set()
    for block in blocks:
        body = block.body
        if isinstance(body, tirx.stmt.BufferStore) and "if_then_else" in str(body.value):
            names.add(str(block.name_hint))
    return names


def _unroll_steps(blocks: list) -> int:
    names = [str(block.name_hint) for block in blocks]
    return FLOAT_BLOCKED_UNROLL_STEPS if any(n.startswith(FLOAT_BLOCKED_BLOCKS) for n in names) else UNROLL_STEPS


def _keep_padding_out(trace, pads: set[str]):
    """``trace`` without its ``compute_inline`` of padding blocks.

    Inlined into a conv, the pad becomes an ``if_then_else`` on every load of the innermost (vectorized)
    loop, which LLVM scalarises: a 64-channel 56x56 3x3 FP32 conv ran at ~2.5 GFLOP/s with the pad inlined,
    whatever the tiles. Left as its own block, the pad is a parallel copy and the conv reads a padded buffer
    with plain vector loads (what the INT8 path does with a separate ``R.nn.pad``).
    """
    if not pads:
        return trace
    names = {}
    for inst in trace.insts:
        if inst.kind.name == "GetSBlock":
            names[inst.outputs[0]] = str(inst.attrs[0])
    keep = []
    for inst in trace.insts:
        if inst.kind.name == "ComputeInline":
            name = next((n for rv, n in names.items() if rv.same_as(inst.inputs[0])), None)
            if name in pads:
                continue
        keep.append(inst)
    if len(keep) == len(trace.insts):
        return trace
    decisions = {inst: trace.decisions[inst] for inst in keep if inst in trace.decisions}
    return tvm.s_tir.schedule.Trace(keep, decisions)


def _vectorize_lanes_only(trace, lanes: int):
    """``trace`` with meta-schedule's ``meta_schedule.vectorize`` extent cut to one vector (``lanes``).

    The postprocessor fuses the innermost spatial loops into one vectorized loop up to that extent (64): in
    a blocked depthwise conv, the register tile's output columns times the channel block (8 x 8 lanes with
    AVX2). LLVM spends 0.5-0.9 s on each such 64-lane loop and runs it slower than a loop of 8-lane vectors,
    which the unroll pragma then unrolls: MobileNetV2's ten depthwise kernels (batch 4, Zen 3) took 4.5 s
    to compile and 9-11 ms to run, with one vector 2.5 s and 7-8 ms. The blocked FP32 convs (a vector of
    output channels, rows of them in the tile) showed no difference either way and keep the default.
    """
    insts = []
    changed = False
    for inst in trace.insts:
        if inst.kind.name == "Annotate" and str(inst.attrs[0]) == "meta_schedule.vectorize":
            value = inst.inputs[1]
            if isinstance(value, tirx.IntImm) and int(value) > lanes:
                inst = tvm.s_tir.schedule.Instruction(
                    inst.kind, [inst.inputs[0], tirx.IntImm(str(value.ty), lanes)], list(inst.attrs), list(inst.outputs)
                )
                changed = True
        insts.append(inst)
    if not changed:
        return trace
    decisions = {new: trace.decisions[old] for old, new in zip(trace.insts, insts) if old in trace.decisions}
    return tvm.s_tir.schedule.Trace(insts, decisions)


#: How :func:`heuristic_schedule` tries a sketch, in order. ``"plain"``: the heuristic's register tile,
#: meta-schedule's vectorize postprocessor as it is. ``"epilogue-vectors"``: the same tile, the postprocessor's
#: vectorize cut to nothing and the epilogue's innermost loops vectorized here instead
#: (:func:`_vectorize_epilogues`): around a VNNI dense intrinsic the postprocessor vectorizes the register tile's
#: row loop, which LLVM refuses ("Cannot broadcast lanes=16 to 64"). ``"safe"``: see :func:`_plan`.
MODES = ("plain", "epilogue-vectors", "safe")


def heuristic_trace(
    func: tirx.PrimFunc, sketch_trace, target: tvm.target.Target, safe: bool = False, vectorize: bool = True
) -> tvm.s_tir.Schedule:
    """Replay ``sketch_trace`` on ``func`` with the heuristic's decisions (padding kept out of the conv);
    returns the schedule before the postprocessors. ``safe``: see :func:`_plan`; ``vectorize=False`` cuts
    meta-schedule's vectorize annotation to nothing (see :data:`MODES`)."""
    sch = tvm.s_tir.Schedule(tvm.IRModule({"main": func}), seed=1)
    blocks = _root_blocks(func)
    pads = _padding_blocks(blocks)
    trace = _keep_padding_out(sketch_trace, pads)
    cpu = cpu_model(target)
    if not vectorize:
        trace = _vectorize_lanes_only(trace, 1)
    elif any(str(block.name_hint).startswith(ONE_VECTOR_BLOCKS) for block in blocks):
        trace = _vectorize_lanes_only(trace, cpu.vector_bits // 32)
    decider = _Decider(sch, cpu, pads, safe, _unroll_steps(blocks))
    trace.apply_to_schedule(sch, remove_postproc=True, decision_provider=decider)
    return sch


def _leaf_blocks(sch: tvm.s_tir.Schedule, parent=None):
    parent = sch.get_sblock("root") if parent is None else parent
    for child in sch.get_child_blocks(parent):
        grandchildren = sch.get_child_blocks(child)
        if grandchildren:
            yield from _leaf_blocks(sch, child)
        else:
            yield child


def _vectorize_epilogues(sch: tvm.s_tir.Schedule, lanes: int) -> None:
    """Vectorize, one vector (``lanes``) at a time, the innermost loop of every element-wise block (no
    reduction, no block inside) whose innermost loop is serial and a multiple of ``lanes`` long: the
    requantize epilogue of a tensorized kernel, once the postprocessor no longer vectorizes it (MODES).

    A BERT-base FFN dense (128 x 768 x 3072, u8 x s8, Zen 5, one core): the epilogue left to LLVM took longer
    than the VNNI GEMM (1.7 ms); vectorized here the kernel runs in 0.79 ms (765 GOP/s), 1.06 ms before with
    the ``safe`` tile."""
    for block in list(_leaf_blocks(sch)):
        if _block_has_reduction(sch, block):
            continue
        loops = _get_loops(sch, block)
        if not loops:
            continue
        inner = _get(sch, loops[-1])
        extent = _int(inner.extent)
        if inner.kind != tirx.ForKind.SERIAL or extent is None or extent % lanes:
            continue
        if extent > lanes:
            _, loop = sch.split(loops[-1], [None, lanes])
        else:
            loop = loops[-1]
        sch.vectorize(loop)


def _unroll_float_init(sch: tvm.s_tir.Schedule, names: set[str]) -> None:
    """Unroll the vectorized loop of the blocked FP32 convs' accumulator initialisation.

    Vectorized, the zero-fill of a register tile spread over spatial loops inside the reduction (ResNet-50's
    14x14 convs at batch 4: 4 x 14 x 7 tiles) took LLVM 2-3 s of machine code per kernel, 15 s of the
    calibration graph's 20 s; unrolled (LLVM vectorizes the stores again), 0.07 s. The conv itself is
    unchanged. ``names``: the kernel's blocks before scheduling (a conv block that is not there has no init).
    """
    for name in FLOAT_BLOCKED_BLOCKS:
        if name not in names:
            continue
        try:
            block = sch.get_sblock(name + "_init")
        except RuntimeError:  # ScheduleError: no such block in this kernel
            continue
        loops = sch.get_loops(block)
        if loops and sch.get(loops[-1]).kind == tirx.ForKind.VECTORIZED:
            sch.unroll(loops[-1])


def _sketch_preference(sketch) -> tuple:
    """Sort key: tensorized sketches first, then those that compute the epilogue inside the tile (deeper
    first), then meta-schedule's order."""
    insts = list(sketch.trace.insts)
    tensorized = any(i.kind.name == "Annotate" and str(i.attrs[0]) == "meta_schedule.auto_tensorize" for i in insts)
    levels = []  # (loop RV, its tiling level) for every split output
    for inst in insts:
        if inst.kind.name == "Split":
            levels.extend((out, level) for level, out in enumerate(inst.outputs))
    fused = 0
    for inst in insts:
        if inst.kind.name == "ReverseComputeAt":
            level = next((lv for rv, lv in levels if rv.same_as(inst.inputs[1])), 0)
            fused = max(fused, 1 + level)
    return (not tensorized, -fused)


def design_space_context(func: tirx.PrimFunc, target, name: str, rand_state: int, num_threads) -> ms.TuneContext:
    """The tuning context whose design space (post-order-apply, x86 rules) the default schedules come from."""
    from . import amx

    return ms.TuneContext(
        mod=tvm.IRModule({"main": func}),
        target=target,
        space_generator=amx.space_generator() if amx.is_amx_kernel(func) else "post-order-apply",
        search_strategy="replay-trace",
        task_name=name,
        rand_state=rand_state,
        num_threads=num_threads,
    )


def choose_schedule(
    func: tirx.PrimFunc, target, name: str, num_threads, verify: Literal["always", "tensorized"] = "always"
) -> tirx.PrimFunc | None:
    """The heuristic default schedule of ``func``, or None when no sketch with the heuristic's decisions
    passes the postprocessors and compiles (the caller falls back to a sampled sketch).

    ``verify="always"`` compiles each schedule on its own before accepting it; ``"tensorized"`` only those of
    tensorized sketches (where codegen failures were seen: a vectorized loop around a VNNI body). That
    compile is three quarters of the time here (0.13 of 0.17 s per kernel; a 275-kernel training graph
    spent 37 s in it), so :func:`tvmquant.schedules.x86.build.build` takes the risk for plain kernels and,
    should the module then fail to compile, builds again with ``"always"``.
    """
    sch = heuristic_schedule(func, target, name, num_threads, verify)
    return None if sch is None else sch.mod["main"].with_attr("tirx.is_scheduled", True)


def heuristic_schedule(
    func: tirx.PrimFunc, target, name: str, num_threads, verify: Literal["always", "tensorized"] = "always"
) -> tvm.s_tir.Schedule | None:
    """The schedule behind :func:`choose_schedule`, postprocessors applied: its ``trace`` (decisions, then
    ``EnterPostproc`` and the postprocessors' instructions) replays it on ``func``, as a tuning record's does.
    None when no sketch passes the postprocessors and compiles."""
    if verify not in ("always", "tensorized"):
        raise ValueError(f"choose_schedule: verify must be 'always' or 'tensorized', got {verify!r}")
    context = design_space_context(func, target, name, 0, num_threads)
    sketches = list(context.generate_design_space())
    names = {str(block.name_hint) for block in _root_blocks(func)}
    preference = [_sketch_preference(sketch) for sketch in sketches]
    order = sorted(range(len(sketches)), key=lambda i: (preference[i], i))
    lanes = cpu_model(target).vector_bits // 32
    tensorized_sketches = [index for index in order if not preference[index][0]]
    # Every way of tensorizing first (a plain sketch of a small dense compiled before the tensorized ones'
    # epilogue-vectors mode was tried); ``safe`` changes nothing in a plain sketch.
    attempts = list(itertools.product(MODES, tensorized_sketches))
    attempts += [("plain", index) for index in order if index not in tensorized_sketches]
    for mode, index in attempts:
        tensorized = index in tensorized_sketches
        try:
            sch = heuristic_trace(func, sketches[index].trace, target, mode == "safe", mode != "epilogue-vectors")
        except Exception as err:  # noqa: BLE001  (a decision the sketch's primitives refuse)
            logger.debug("default schedule: sketch %d of %s does not replay (%s)", index, name, err)
            continue
        sch.enter_postproc()  # what the search marks too: a search seeded from the trace re-runs what follows
        if not all(postproc.apply(sch) for postproc in context.space_generator.postprocs):
            logger.debug("default schedule: sketch %d of %s fails the postprocessors", index, name)
            continue
        if mode == "epilogue-vectors":
            _vectorize_epilogues(sch, lanes)
        _unroll_float_init(sch, names)
        if verify == "always" or tensorized:
            try:
                scheduled = sch.mod["main"].with_attr("global_symbol", "main")
                build_candidate(tvm.IRModule({"main": scheduled}), target, None)
            except Exception as err:  # noqa: BLE001  (any codegen failure: try the next sketch)
                logger.debug("default schedule: sketch %d of %s does not compile (%s)", index, name, err)
                continue
        return sch
    return None
