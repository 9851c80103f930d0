"""Fuse rotate-half rotary position embeddings into one RotaryEmbedding op."""

from __future__ import annotations

import dataclasses

import numpy as np
import onnx_ir as ir
from onnxscript.rewriter import pattern

from onnxopt.fusion import Fusion, FusionPass
from onnxopt.passes import _attention_patterns as ap
from onnxopt.passes._attention_patterns import Atom, Dims, NotFusable
from onnxopt.registry import register_pass
from onnxopt.targets import Target

MS_ROTARY = ("com.microsoft", "RotaryEmbedding")
ROTARY = ("", "RotaryEmbedding")
_BIG = 2**31 - 1  # a Slice end at or past this means "to the end"
_MAX_DEPTH = 16
# elementwise ops: an output axis is an input's where the other inputs broadcast into it
_ELEMENTWISE = {"Cos", "Sin", "Cast", "Neg", "Identity", "Mul", "Div", "Add", "Sub"}


@dataclasses.dataclass
class _Plan:
    """What ``check`` proved: how to lay x out as [B, N, S, D] and whether cos varies by batch."""

    perm: list[int]  # x -> BNSH
    half: int
    per_batch: bool  # cos/sin differ along the axis that becomes B
    rank: int  # of cos/sin


class _Rotary(pattern.RewriteRuleClassBase):
    """``x * cos + Concat(-x2, x1) * sin`` over the last axis of a 4-D x: RotaryEmbedding.

    ``split``: the halves x1, x2 come from two Slices or from one Split.
    """

    def __init__(
        self, name: str, *, split: bool, standard: bool, dtypes: frozenset, made: list
    ) -> None:
        super().__init__(name)
        self.split, self.standard, self.dtypes, self.made = split, standard, dtypes, made
        self._plan: _Plan | None = None

    def pattern(self, op, x, cos, sin):
        if self.split:
            x1, x2 = op.Split(x, _allow_other_inputs=True, _outputs=["x1", "x2"])
        else:
            x1 = op.Slice(x, _allow_other_inputs=True, _outputs=["x1"])
            x2 = op.Slice(x, _allow_other_inputs=True, _outputs=["x2"])
        rot = op.Concat(op.Neg(x2), x1, _outputs=["rot"])
        return op.Add(op.Mul(x, cos), op.Mul(rot, sin))

    def check(self, context, x, cos, sin, x1, x2, rot, **_):
        result = pattern.MatchResult()
        self._plan = None
        try:
            half = _halves(x, x1, x2, rot)
            if x.dtype not in self.dtypes:
                raise NotFusable(f"the op has no kernel for {x.dtype} here", x)
            for table in (cos, sin):
                if table.dtype != x.dtype:
                    raise NotFusable(f"{table.name} is {table.dtype}, x is {x.dtype}", table)
                if not _halves_equal(table, half):
                    raise NotFusable(
                        f"the two halves of {table.name} are not provably equal (the op "
                        "takes one angle per pair)",
                        table,
                    )
            plan = _layout(x, cos, sin, half)
        except NotFusable as err:
            return result.fail(str(err), err.where)
        self._plan = plan
        return result

    def rewrite(self, op, x, cos, sin, **_):
        plan = self._plan
        assert plan is not None
        identity = plan.perm == [0, 1, 2, 3]
        xp = x if identity else _transposed(op, x, plan.perm)
        caches = [_half_table(op, t, plan) for t in (cos, sin)]
        if self.standard:
            caches = [_per_token(op, c, xp, plan) for c in caches]
            y = op.RotaryEmbedding(xp, *caches)
        else:
            caches = [op.Reshape(c, _ints(op, [-1, plan.half])) for c in caches]
            y = op.RotaryEmbedding(xp, _positions(op, xp, plan), *caches, _domain=MS_ROTARY[0])
        out = y if identity else op.Transpose(y, perm=[int(a) for a in np.argsort(plan.perm)])
        self.made.append((y, out, x, plan.perm))
        return out


# --- checks ------------------------------------------------------------------------------------


def _halves(x: ir.Value, x1: ir.Value, x2: ir.Value, rot: ir.Value) -> int:
    """Half the last axis of x, once x1/x2 are proven its first/second half and rot is -x2|x1."""
    if ap.rank(x) != 4:
        raise NotFusable(f"x is not 4-D (rank {ap.rank(x)})", x)
    size = x.shape[-1]
    if not isinstance(size, int) or size % 2:
        raise NotFusable(f"the last axis of x is not a static even size ({size})", x)
    half = size // 2
    node = x1.producer()
    if node.op_type == "Split":
        _check_split(node, half)
    else:
        _check_slice(node, 0, half, size)
        _check_slice(x2.producer(), half, size, size)
    concat = rot.producer()
    if ap.int_attr(concat, "axis", 0) not in (-1, 3):
        raise NotFusable("the rotated halves are not concatenated on the last axis", concat)
    return half


def _check_split(node: ir.Node, half: int) -> None:
    if len(node.outputs) != 2:
        raise NotFusable(f"the Split has {len(node.outputs)} outputs, not two halves", node)
    if ap.int_attr(node, "axis", 0) not in (-1, 3):
        raise NotFusable("the Split is not over the last axis", node)
    sizes = ap.numeric(node.inputs[1]) if len(node.inputs) > 1 else None
    listed = ap.ints_attr(node, "split")
    if sizes is not None:
        listed = [int(s) for s in sizes.reshape(-1)]
    if listed is not None and listed != [half, half]:
        raise NotFusable(f"the Split sizes are {listed}, not two halves [{half}, {half}]", node)


def _check_slice(node: ir.Node, start: int, end: int, size: int) -> None:
    """A Slice of the last axis from ``start`` to ``end`` with step 1."""
    args = [ap.numeric(v) if v is not None else None for v in node.inputs[1:]]
    if len(args) < 2 or args[0] is None or args[1] is None:
        raise NotFusable("a half of x is sliced with non-constant bounds", node)
    axes = [int(a) for a in args[2].reshape(-1)] if len(args) > 2 and args[2] is not None else [0]
    steps = [int(s) for s in args[3].reshape(-1)] if len(args) > 3 and args[3] is not None else [1]
    got_start, got_end = int(args[0].reshape(-1)[0]), int(args[1].reshape(-1)[0])
    got_end = size if got_end >= size or got_end >= _BIG else got_end
    if axes not in ([-1], [3]) or steps != [1] or (got_start, got_end) != (start, end):
        raise NotFusable(
            f"a Slice of x is not the {'first' if start == 0 else 'second'} half of its last "
            f"axis ([{start}:{end}])",
            node,
        )


def _halves_equal(value: ir.Value, half: int, depth: int = 0) -> bool:
    """Whether ``value[..., :half] == value[..., half:]`` for all inputs (last axis 2*half)."""
    array = ap.numeric(value)
    if array is not None:
        if array.ndim == 0 or array.shape[-1] == 1:
            return True
        return array.shape[-1] == 2 * half and np.array_equal(array[..., :half], array[..., half:])
    node = value.producer()
    if node is None or depth > _MAX_DEPTH or node.domain not in ("", "ai.onnx"):
        return False
    op, r = node.op_type, ap.rank(value)
    if op == "Concat":
        axis = ap.int_attr(node, "axis", 0)
        last = axis == -1 or (r is not None and axis == r - 1)
        if last:
            return len(node.inputs) == 2 and node.inputs[0] is node.inputs[1]
        return r is not None and all(_halves_equal(v, half, depth + 1) for v in node.inputs)
    if op in _ELEMENTWISE:
        inputs = [v for v in node.inputs if v is not None]
        return all(_halves_equal(v, half, depth + 1) for v in inputs)
    if op in ("Unsqueeze", "Gather", "Slice") and _keeps_last_axis(node, r):
        return _halves_equal(node.inputs[0], half, depth + 1)
    return False


def _keeps_last_axis(node: ir.Node, out_rank: int | None) -> bool:
    """An Unsqueeze/Gather/Slice whose output's last axis is its input's last axis, untouched."""
    in_rank = ap.rank(node.inputs[0])
    if out_rank is None or in_rank is None:
        return False
    if node.op_type == "Unsqueeze":
        return out_rank - 1 not in _unsqueeze_axes(node, out_rank)
    if node.op_type == "Gather":
        axis = ap.int_attr(node, "axis", 0)
        return (axis + in_rank if axis < 0 else axis) != in_rank - 1
    listed = len(node.inputs) > 3 and node.inputs[3] is not None
    found = ap.numeric(node.inputs[3] if listed else node.inputs[1])
    if found is None:
        return False  # axes (or, without them, how many) not known
    axes = [int(a) % in_rank for a in found.reshape(-1)] if listed else range(found.size)
    return in_rank - 1 not in axes


def _unsqueeze_axes(node: ir.Node, out_rank: int) -> list[int]:
    axes = ap.ints_attr(node, "axes")
    if axes is None:
        found = ap.numeric(node.inputs[1]) if len(node.inputs) > 1 else None
        axes = [] if found is None else [int(a) for a in found.reshape(-1)]
    return sorted(a + out_rank if a < 0 else a for a in axes)


def _layout(x: ir.Value, cos: ir.Value, sin: ir.Value, half: int) -> _Plan:
    """Which axis of x is the sequence (cos varies along it) and which the batch, if any."""
    dims = Dims()
    ranks = {ap.rank(cos), ap.rank(sin)}
    if len(ranks) != 1 or None in ranks or ranks.pop() > 4:
        raise NotFusable("cos and sin do not have one known rank of at most 4", cos)
    rank = ap.rank(cos)
    for table in (cos, sin):
        if table.shape[-1] != 2 * half:
            raise NotFusable(f"the last axis of {table.name} is not x's ({2 * half})", table)
        _link(table, dims)
    varying: list[int] = []
    for axis in range(3):
        k = axis - (4 - rank)  # the axis of cos aligned with x's
        sizes = [dims.static(dims.ref(t, k)) if k >= 0 else 1 for t in (cos, sin)]
        if sizes == [1, 1]:
            continue
        if not all(dims.same(dims.ref(t, k), dims.ref(x, axis)) for t in (cos, sin)):
            raise NotFusable(
                f"axis {axis} of cos/sin is not provably 1 or the size of x's axis {axis}",
                cos,
            )
        varying.append(axis)
    if not varying:
        raise NotFusable("cos/sin do not vary along any axis of x (no sequence axis)", cos)
    if len(varying) > 2:
        raise NotFusable("cos/sin vary along three axes of x; the op takes [B, S] positions", cos)
    seq = varying[-1]
    first = varying[0] if len(varying) == 2 else next(a for a in range(3) if a != seq)
    middle = next(a for a in range(3) if a not in (seq, first))
    return _Plan([first, middle, seq, 3], half, len(varying) == 2, rank)


def _link(value: ir.Value, dims: Dims, seen: set | None = None) -> None:
    """Record in ``dims`` which axes of ``value`` equal axes of what it was computed from."""
    seen = set() if seen is None else seen
    node = value.producer()
    r = ap.rank(value)
    if node is None or r is None or len(seen) > 4 * _MAX_DEPTH or node in seen:
        return
    seen.add(node)
    if node.domain not in ("", "ai.onnx"):
        return
    if node.op_type == "Range" and _range_from_zero(node):
        limit = ap.shape_vector(node.inputs[1], dims)
        if limit is not None and len(limit) == 1:
            dims.union(dims.ref(value, 0), limit[0])
        return
    for source, _ in _axis_sources(node, r, dims):
        _link(source, dims, seen)  # first: a Slice's check reads its input's dims
    for source, mapping in _axis_sources(node, r, dims):
        for out_axis, in_axis in mapping.items():
            dims.union(dims.ref(value, out_axis), dims.ref(source, in_axis))


def _axis_sources(node: ir.Node, r: int, dims: Dims) -> list[tuple[ir.Value, dict[int, int]]]:
    """The inputs of ``node`` whose axes its output's axes are: (input, {out axis: in axis})."""
    op, source = node.op_type, node.inputs[0]
    if op in _ELEMENTWISE:
        found = []
        for i, v in enumerate(node.inputs):
            if v is not None and ap.rank(v) == r:
                others = [u for j, u in enumerate(node.inputs) if j != i and u is not None]
                found.append((v, {a: a for a in range(r) if _broadcast_at(others, a, r)}))
        return found
    if op == "Unsqueeze":
        added = _unsqueeze_axes(node, r)
        return [(source, {a: i for i, a in enumerate(b for b in range(r) if b not in added)})]
    if op == "Concat" and ap.rank(source) == r:
        axis = ap.int_attr(node, "axis", 0) % r
        return [(v, {a: a for a in range(r) if a != axis}) for v in node.inputs]
    if op == "Gather" and ap.rank(node.inputs[1]) == 0:
        axis = ap.int_attr(node, "axis", 0) % (r + 1)
        return [(source, {a: a if a < axis else a + 1 for a in range(r)})]
    if op == "Slice" and ap.rank(source) == r:
        lengths = {a: _slice_length(node, a, dims) for a in range(r)}
        for a, length in lengths.items():
            dims.union(dims.ref(node.outputs[0], a), length)
        return [(source, {a: a for a, n in lengths.items() if n == dims.ref(source, a)})]
    return []


def _broadcast_at(others: list[ir.Value], axis: int, r: int) -> bool:
    """Every one of ``others`` has size 1 (or no axis) at output ``axis`` of rank ``r``."""
    for other in others:
        other_rank = ap.rank(other)
        if other_rank is None:
            return False
        k = axis - (r - other_rank)
        if k >= 0 and other.shape[k] != 1:
            return False
    return True


def _slice_length(node: ir.Node, axis: int, dims: Dims) -> Atom | None:
    """The size of a Slice's output at ``axis``, when proven: its input's, or ``end`` of a prefix.

    A prefix ``[0:end]`` of a static axis longer than 1 (a table sliced to the sequence length)
    has ``end`` elements wherever the graph runs: were the table shorter, its Mul with x would
    not broadcast.
    """
    source = node.inputs[0]
    in_rank = ap.rank(source)
    args = [ap.numeric(v) if v is not None else None for v in node.inputs[1:]]
    if in_rank is None or len(args) < 2 or args[0] is None:
        return None
    listed = args[2] if len(args) > 2 and args[2] is not None else None
    if listed is None and len(node.inputs) > 3 and node.inputs[3] is not None:
        return None  # axes computed
    axes = list(range(args[0].size)) if listed is None else [int(a) for a in listed.reshape(-1)]
    axes = [a % in_rank for a in axes]
    whole = dims.ref(source, axis)
    if axis not in axes:
        return whole
    i = axes.index(axis)
    steps = args[3] if len(args) > 3 and args[3] is not None else None
    if int(args[0].reshape(-1)[i]) != 0 or (steps is not None and int(steps.reshape(-1)[i]) != 1):
        return None
    if args[1] is not None and int(args[1].reshape(-1)[i]) >= _BIG:
        return whole
    ends = ap.shape_vector(node.inputs[2], dims)
    if ends is None or len(ends) != len(axes) or ends[i] is None:
        return None
    if dims.same(ends[i], whole):
        return whole
    size = source.shape[axis]
    return ends[i] if isinstance(size, int) and size > 1 else None


def _range_from_zero(node: ir.Node) -> bool:
    return ap.scalar(node.inputs[0]) == 0 and ap.scalar(node.inputs[2]) == 1


# --- emission ----------------------------------------------------------------------------------


def _ints(op, values: list[int]) -> ir.Value:
    return op.Constant(value=ir.tensor(np.array(values, np.int64)))


def _half_table(op, table: ir.Value, plan: _Plan) -> ir.Value:
    """The first half of cos or sin, as [B or 1, 1, S, half] in x's BNSH order."""
    half = op.Slice(table, _ints(op, [0]), _ints(op, [plan.half]), _ints(op, [-1]))
    if plan.rank < 4:
        shape = op.Concat(_ints(op, [1] * (4 - plan.rank)), op.Shape(half), axis=0)
        half = op.Reshape(half, shape)
    if plan.perm != [0, 1, 2, 3]:
        half = op.Transpose(half, perm=plan.perm)
    return half


def _transposed(op, x: ir.Value, perm: list[int]) -> ir.Value:
    """``Transpose(x, perm)``, composed with the Transpose that makes x, if one does."""
    node = ap.producer(x, "Transpose")
    inner = ap.ints_attr(node, "perm") if node is not None else None
    if inner is None or len(inner) != len(perm):
        return op.Transpose(x, perm=perm)
    composed = [inner[a] for a in perm]
    if composed == list(range(len(perm))):
        return node.inputs[0]
    return op.Transpose(node.inputs[0], perm=composed)


def _dim(op, value: ir.Value, axis: int) -> ir.Value:
    return op.Slice(op.Shape(value), _ints(op, [axis]), _ints(op, [axis + 1]))


def _positions(op, xp: ir.Value, plan: _Plan) -> ir.Value:
    """Position ids for ORT's op: offset 0, or row b*S + s of a per-batch cache."""
    if not plan.per_batch:
        return _ints(op, [0])
    batch, seq = _dim(op, xp, 0), _dim(op, xp, 2)
    count = op.Squeeze(op.Mul(batch, seq))
    ids = op.Range(
        op.Constant(value=ir.tensor(np.array(0, np.int64))),
        count,
        op.Constant(value=ir.tensor(np.array(1, np.int64))),
    )
    return op.Reshape(ids, op.Concat(batch, seq, axis=0))


def _per_token(op, half: ir.Value, xp: ir.Value, plan: _Plan) -> ir.Value:
    """[B, S, half] for the standard op without position ids."""
    table = op.Reshape(half, _ints(op, [0, -1, plan.half]))
    if plan.per_batch:
        return table
    return op.Expand(table, op.Concat(_dim(op, xp, 0), _ints(op, [1, 1]), axis=0))


# --- the pass ----------------------------------------------------------------------------------


@register_pass
class FuseRotaryPass(FusionPass):
    """Fuse rotate-half rotary position embeddings into one RotaryEmbedding op.

    Rules (alternatives of the fusion ``rotary``: the first whose op the target runs):
      1. ``RotaryEmbedding-ms-slice`` / ``-split`` (ORT targets; float32 and float16):
         ``x * cos + Concat(-x2, x1) * sin``, x1/x2 the halves of the last axis of a 4-D x
         (two Slices, or a Split), becomes ``com.microsoft::RotaryEmbedding(x', position_ids,
         cos_cache, sin_cache)``: x' is x transposed to [B, N, S, D] when its sequence axis is
         elsewhere (Conformer's [S, B, N, D]), the caches are the first halves of the model's own
         cos/sin rows, position ids the offset 0 (cos/sin the same for every batch row) or
         ``b*S + s`` (they differ by batch row).
      2. ``RotaryEmbedding-std-slice`` / ``-split`` (opset >= 23): the same becomes ONNX
         ``RotaryEmbedding(x', cos_cache, sin_cache)`` with per-token [B, S, D/2] caches.

    Exact for all inputs: cos and sin must have equal halves on the last axis for every input
    (proven through Cos/Sin, Cast, scalar Muls, Unsqueeze/Gather/Slice of other axes, down to
    ``Concat(f, f)`` or a constant), and each of their axes must be 1 or proven equal to the
    matching axis of x (dims from inferred shapes, Range lengths and the graph's shape
    arithmetic; a table sliced to a length is that long wherever the graph runs). Shape reads
    of the rotated values read x instead (same shape). float16 rounds once where the graph
    rounds after each Mul and the Add (within an ulp). Partial rotary (rotary_dim < head size)
    fuses the rotated slice; the Concat with the rest stays. Not fused: interleaved rotary, x
    not 4-D, cos/sin of another dtype than x, or varying along three axes of x.
    """

    name = "fuse-rotary"

    def fusions(self, target: Target) -> list[Fusion]:
        floats = frozenset({ir.DataType.FLOAT, ir.DataType.FLOAT16})  # ORT CPU kernels: both
        hint = "; ONNX RotaryEmbedding needs a model at opset 23"
        self._made: list = []  # (op output, rotated value, x, perm) of each rewrite
        return [
            Fusion("rotary", _rules(False, floats, self._made), [MS_ROTARY], True, ("Neg",), hint),
            Fusion("rotary", _rules(True, floats, self._made), [ROTARY], True, ("Neg",), hint),
        ]

    def after_fusions(self, model: ir.Model) -> None:
        """The rotated values have x's shape (proven): annotated (ORT's op has no inference),
        and their Shape reads take x's, so shape arithmetic does not wait for (or keep) them."""
        for y, out, x, perm in self._made:
            if out.producer() is None or out.producer().graph is not model.graph:
                continue  # traced only, never applied
            for node, index in list(out.uses()):
                if (node.domain, node.op_type) in (("", "Shape"), ("ai.onnx", "Shape")):
                    node.replace_input_with(index, x)
            if x.shape is not None:
                out.shape = ir.Shape(list(x.shape))
                y.shape = ir.Shape([x.shape[a] for a in perm])
                y.type = out.type
        self._made.clear()


def _rules(standard: bool, dtypes: frozenset, made: list) -> list:
    kind = "std" if standard else "ms"
    return [
        _Rotary.rule(
            f"RotaryEmbedding-{kind}-{form}",
            split=form == "split",
            standard=standard,
            dtypes=dtypes,
            made=made,
        )
        for form in ("slice", "split")
    ]
