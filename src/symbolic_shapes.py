"""Tell which dims ONNX shape inference made up (``unk__N``) are really dims it already knew.

Exporters build Reshape targets from ``Shape`` reads (``x.view(-1, x.size(-1))``,
``y.view(*x.shape[:-1], n)``); ONNX inference then invents a fresh ``unk__N`` dim, so equal dims
stop looking equal and shape-dependent fusions cannot prove their conditions. Each made-up name
stands for one quantity wherever ONNX wrote it, so once that quantity is known it can be
replaced everywhere. These rules find them, repeated until nothing changes:

- a Reshape whose target is computed from ``Shape`` reads (through Constant, Gather, Slice,
  Concat, Unsqueeze, Squeeze, Cast, Identity, ConstantOfShape, Add/Sub/Mul, Equal and Where)
  has the dims those reads name, and a ``-1`` the
  size left when the other dims cancel against the input's;
- a broadcasting op's output dim equals its inputs' dim where those agree (1s aside); a dim
  ``x`` broadcast with ``Min(c, x)`` (c >= 2) gives ``x``: they can only differ when neither
  is 1 (the op fails);
- ``Range(0, n, 1)`` has ``n`` elements; an Expand has the dims its shape input broadcasts to;
- a Slice's sliced axis has the length its constant (or dim-valued) bounds leave, a Conv or
  pool with stride 1 the input's length plus what its pads add back, so a Conv that pads one
  too many and the Slice that drops it (wav2vec2's SamePad) keep the length; a prefix
  ``[0:n]`` of a static axis of size ``c`` has ``Min(c, n)`` elements (the name dynamo gives).
"""

from __future__ import annotations

import dataclasses
import re
from collections import Counter
from collections.abc import Sequence

import numpy as np
import onnx_ir as ir

Elem = int | str | None  # a static size, a symbolic dim's name, or unknown
_GENERATED = "unk__"  # names ONNX shape inference makes up


@dataclasses.dataclass(frozen=True)
class _Offset:
    """A made-up dim known to be ``base + delta`` (never written into a shape)."""

    base: str
    delta: int


@dataclasses.dataclass(frozen=True)
class _Vec:
    elems: tuple[Elem, ...]
    scalar: bool = False


_BROADCAST = frozenset(
    {
        *("Add", "Sub", "Mul", "Div", "Pow", "Where", "And", "Or", "Xor", "Equal", "Less"),
        *("LessOrEqual", "Greater", "GreaterOrEqual", "Max", "Min", "Mod", "BitShift", "PRelu"),
        *("Sum", "Mean"),
    }
)
_MAX_ROUNDS = 32
_INT64_MAX = 2**63 - 1
_MIN = re.compile(r"Min\((\d+), (.+)\)$")


def min_dim(size: int, name: str) -> str:
    """The name of ``min(size, name)`` (sympy's spelling, as the dynamo exporter writes it)."""
    return f"Min({size}, {name})"


def min_parts(name: str | None) -> tuple[int, str] | None:
    """``(c, x)`` for a dim named ``Min(c, x)``; else None."""
    match = _MIN.match(name or "")
    return (int(match.group(1)), match.group(2)) if match else None


def unify_dims(graph: ir.Graph) -> int:
    """Replace made-up dims of the graph's values by what they provably are; how many names."""
    total = 0
    for _ in range(_MAX_ROUNDS):
        found: dict[str, Known] = {}
        vectors: dict[ir.Value, _Vec] = {}
        for node in graph:
            vec = _evaluate(node, vectors)
            if vec is not None:
                vectors[node.outputs[0]] = vec
            if node.domain not in ("", "ai.onnx"):
                continue
            if node.op_type == "Reshape":
                _learn(found, _reshape_dims(node, vectors), node.outputs[0])
            elif node.op_type in _BROADCAST:
                _learn(found, _broadcast_dims(node.inputs), node.outputs[0])
            elif node.op_type == "MatMul":
                _learn(found, _matmul_dims(node), node.outputs[0])
            elif node.op_type in ("Conv", "MaxPool", "AveragePool", "LpPool"):
                _learn(found, _window_dims(node), node.outputs[0])
            elif node.op_type == "Expand":
                _learn(found, _expand_dims(node, vectors), node.outputs[0])
            elif node.op_type == "Slice":
                _learn(found, _slice_dims(node, vectors, found), node.outputs[0])
            elif node.op_type == "Range":
                _learn(found, _range_dims(node, vectors), node.outputs[0])
        subs = {n: v for n, v in found.items() if v is not None and not isinstance(v, _Offset)}
        # Two made-up names proven equal both ways: keep one direction, or they would swap.
        subs = {n: v for n, v in subs.items() if not (subs.get(v) == n and n < str(v))}
        if not subs:
            break
        _substitute(graph, subs)
        total += len(subs)
    return total


Known = Elem | _Offset


def _learn(found: dict[str, Known], dims: list[Known] | None, out: ir.Value) -> None:
    """Record ``made-up name -> dim`` for each made-up output dim the op's semantics tell."""
    if dims is None or out.shape is None or len(out.shape) != len(dims):
        return
    for old, new in zip(out.shape, dims, strict=True):
        name = old.value if isinstance(old, ir.SymbolicDim) else None
        if not name or not name.startswith(_GENERATED) or new is None or new == name:
            continue
        if name in found and found[name] != new:
            found[name] = None  # two answers: leave it alone
        else:
            found.setdefault(name, new)


def _substitute(graph: ir.Graph, subs: dict[str, Elem]) -> None:
    values = [v for node in graph.all_nodes() for v in node.outputs]
    for value in [*graph.inputs, *values]:
        shape = value.shape
        if shape is None or not any(
            isinstance(d, ir.SymbolicDim) and d.value in subs for d in shape
        ):
            continue
        value.shape = ir.Shape(
            [
                subs[d.value] if isinstance(d, ir.SymbolicDim) and d.value in subs else d
                for d in shape
            ]
        )


def _dim(d: ir.SymbolicDim | int) -> Elem:
    if isinstance(d, int):
        return d
    return d.value or None


def _vector(value: ir.Value | None, vectors: dict[ir.Value, _Vec]) -> _Vec | None:
    if value is None:
        return None
    if value in vectors:
        return vectors[value]
    tensor = value.const_value
    if tensor is None or tensor.dtype not in (ir.DataType.INT64, ir.DataType.INT32):
        return None
    array = tensor.numpy()
    if array.ndim > 1 or array.size > 64:
        return None
    return _Vec(tuple(int(v) for v in array.reshape(-1)), scalar=array.ndim == 0)


def _ints(value: ir.Value | None, vectors: dict[ir.Value, _Vec]) -> list[int] | None:
    vec = _vector(value, vectors)
    if vec is None or not all(isinstance(e, int) for e in vec.elems):
        return None
    return list(vec.elems)  # type: ignore[arg-type]


def _evaluate(node: ir.Node, vectors: dict[ir.Value, _Vec]) -> _Vec | None:
    """The symbolic value of a shape-arithmetic node's output, when it can be told."""
    if node.domain not in ("", "ai.onnx") or len(node.outputs) != 1:
        return None
    op, inputs = node.op_type, node.inputs
    if op == "Constant":
        attr = node.attributes.get("value")
        if attr is None or attr.type != ir.AttributeType.TENSOR:
            return None
        array = attr.as_tensor().numpy()
        if array.dtype.kind != "i" or array.ndim > 1 or array.size > 64:
            return None
        return _Vec(tuple(int(v) for v in array.reshape(-1)), scalar=array.ndim == 0)
    if op == "Shape":
        shape = inputs[0].shape
        if shape is None:
            return None
        dims = [_dim(d) for d in shape]
        start = node.attributes.get_int("start", 0)
        end = node.attributes.get_int("end", len(dims))
        return _Vec(tuple(dims[slice(start, end)]))
    if op in ("Cast", "Identity"):
        vec = _vector(inputs[0], vectors)
        return vec if op == "Identity" or node.attributes.get_int("to", 0) in (6, 7) else None
    if op == "Gather":
        return _gather(node, vectors)
    if op == "Unsqueeze":
        vec = _vector(inputs[0], vectors)
        return _Vec(vec.elems) if vec is not None and vec.scalar else None
    if op == "Squeeze":
        vec = _vector(inputs[0], vectors)
        return _Vec(vec.elems, scalar=True) if vec is not None and len(vec.elems) == 1 else None
    if op == "Concat":
        parts = [_vector(v, vectors) for v in inputs]
        if any(p is None or p.scalar for p in parts):
            return None
        return _Vec(tuple(e for p in parts for e in p.elems))  # type: ignore[union-attr]
    if op == "Slice":
        return _slice(node, vectors)
    if op == "Reshape":  # a shape vector reshaped to 1-D is itself
        vec, target = _vector(inputs[0], vectors), _ints(inputs[1], vectors)
        return _Vec(vec.elems) if vec is not None and target in ([-1], [len(vec.elems)]) else None
    if op == "ConstantOfShape":
        return _constant_of_shape(node, vectors)
    if op in _ARITHMETIC:
        return _arithmetic(node, vectors)
    if op == "Equal":
        return _equal(node, vectors)
    if op == "Where":
        return _where(node, vectors)
    return None


def _constant_of_shape(node: ir.Node, vectors: dict[ir.Value, _Vec]) -> _Vec | None:
    size = _ints(node.inputs[0], vectors)
    attr = node.attributes.get("value")
    fill = attr.as_tensor().numpy().reshape(-1) if attr is not None else np.zeros(1)
    if size is None or len(size) != 1 or fill.dtype.kind != "i" or size[0] > 64:
        return None
    return _Vec((int(fill[0]),) * size[0])


def _operands(node: ir.Node, vectors: dict[ir.Value, _Vec]) -> tuple[list, list, bool] | None:
    """Two broadcast 1-D (or scalar) operands as lists of one length, and whether a scalar."""
    a, b = (_vector(v, vectors) for v in node.inputs[:2])
    if a is None or b is None:
        return None
    n = max(len(a.elems), len(b.elems))
    if any(len(v.elems) not in (1, n) for v in (a, b)):
        return None
    scalar = a.scalar and b.scalar
    return list(a.elems) * (n // len(a.elems)), list(b.elems) * (n // len(b.elems)), scalar


_ARITHMETIC = {
    "Add": lambda x, y: x + y,
    "Sub": lambda x, y: x - y,
    "Mul": lambda x, y: x * y,
}
_NEUTRAL = {"Add": 0, "Sub": 0, "Mul": 1}  # x op neutral == x (and neutral op x, but for Sub)


def _arithmetic(node: ir.Node, vectors: dict[ir.Value, _Vec]) -> _Vec | None:
    """Elementwise Add/Sub/Mul of shape values: numbers computed, ``x + 0``/``x * 1`` kept,
    anything else unknown (None) in its place."""
    operands = _operands(node, vectors)
    if operands is None:
        return None
    op, neutral = _ARITHMETIC[node.op_type], _NEUTRAL[node.op_type]
    out: list[Elem] = []
    for x, y in zip(operands[0], operands[1], strict=True):
        if isinstance(x, int) and isinstance(y, int):
            value = op(x, y)
            out.append(value if -(2**63) <= value <= _INT64_MAX else None)
        elif y == neutral:
            out.append(x)
        elif x == neutral and node.op_type != "Sub":
            out.append(y)
        else:
            out.append(None)
    return _Vec(tuple(out), scalar=operands[2])


def _equal(node: ir.Node, vectors: dict[ir.Value, _Vec]) -> _Vec | None:
    """Elementwise ==, where a dim name equals no negative number (dims are never negative);
    None where it cannot be told."""
    operands = _operands(node, vectors)
    if operands is None:
        return None
    out: list[Elem] = []
    for x, y in zip(operands[0], operands[1], strict=True):
        if isinstance(x, int) and isinstance(y, int):
            out.append(int(x == y))
        elif (isinstance(x, str) and isinstance(y, int) and y < 0) or (
            isinstance(y, str) and isinstance(x, int) and x < 0
        ):
            out.append(0)
        elif isinstance(x, str) and x == y:
            out.append(1)
        else:
            out.append(None)
    return _Vec(tuple(out), scalar=operands[2])


def _where(node: ir.Node, vectors: dict[ir.Value, _Vec]) -> _Vec | None:
    cond, a, b = (_vector(v, vectors) for v in node.inputs[:3])
    if cond is None or a is None or b is None:
        return None
    n = len(cond.elems)
    if any(len(v.elems) not in (1, n) for v in (a, b)):
        return None
    picked: list[Elem] = []
    for i, c in enumerate(cond.elems):
        x, y = a.elems[i if len(a.elems) > 1 else 0], b.elems[i if len(b.elems) > 1 else 0]
        picked.append(y if c == 0 else x if isinstance(c, int) else x if x == y else None)
    return _Vec(tuple(picked))


def _gather(node: ir.Node, vectors: dict[ir.Value, _Vec]) -> _Vec | None:
    vec = _vector(node.inputs[0], vectors)
    index = _vector(node.inputs[1], vectors)
    if vec is None or vec.scalar or index is None or node.attributes.get_int("axis", 0) != 0:
        return None
    picked = []
    for i in index.elems:
        if not isinstance(i, int) or not -len(vec.elems) <= i < len(vec.elems):
            return None
        picked.append(vec.elems[i])
    return _Vec(tuple(picked), scalar=index.scalar)


def _slice(node: ir.Node, vectors: dict[ir.Value, _Vec]) -> _Vec | None:
    if len(node.inputs) < 3:
        return None  # Slice-1 keeps starts and ends in attributes
    vec = _vector(node.inputs[0], vectors)
    args = [_ints(v, vectors) if v is not None else None for v in node.inputs[1:5]]
    args += [None] * (4 - len(args))
    starts, ends, axes, steps = args
    if vec is None or vec.scalar or starts is None or ends is None or len(starts) != 1:
        return None
    if (axes not in (None, [0], [-1])) or (steps not in (None, [1])):
        return None
    return _Vec(vec.elems[slice(starts[0], ends[0])])


def _reshape_dims(node: ir.Node, vectors: dict[ir.Value, _Vec]) -> list[Elem] | None:
    """A Reshape's output dims as its shape input names them (None where unknown)."""
    data = node.inputs[0]
    vec = _vector(node.inputs[1], vectors) if len(node.inputs) > 1 else None
    if vec is None or vec.scalar or data is None or data.shape is None:
        return None
    in_dims = [_dim(d) for d in data.shape]
    allowzero = node.attributes.get_int("allowzero", 0)
    dims: list[Elem] = []
    for i, e in enumerate(vec.elems):
        if e == 0 and not allowzero:
            e = in_dims[i] if i < len(in_dims) else None
        dims.append(e)
    if dims.count(-1) == 1:
        dims[dims.index(-1)] = _quotient(in_dims, [d for d in dims if d != -1])
    return [None if isinstance(d, int) and d < 0 else d for d in dims]


def _broadcast_dims(inputs: Sequence[ir.Value | ir.Shape | None]) -> list[Elem] | None:
    """Output dims of a multidirectional broadcast where every input agrees (1s aside)."""
    shapes = [v if isinstance(v, ir.Shape) else v.shape for v in inputs if v is not None]
    if not shapes or any(s is None for s in shapes):
        return None
    rank = max(len(s) for s in shapes)
    dims: list[Elem] = []
    for axis in range(-rank, 0):
        seen = {_dim(s[axis]) for s in shapes if len(s) >= -axis}
        seen.discard(1)
        for name in list(seen):  # x with Min(c, x), c >= 2: equal unless the op fails
            parts = min_parts(name) if isinstance(name, str) else None
            if parts is not None and parts[0] >= 2 and parts[1] in seen:
                seen.discard(name)
        dims.append(seen.pop() if len(seen) == 1 else 1 if not seen else None)
    return dims


def _expand_dims(node: ir.Node, vectors: dict[ir.Value, _Vec]) -> list[Elem] | None:
    """Expand broadcasts its input against the shape it is given."""
    vec = _vector(node.inputs[1], vectors) if len(node.inputs) > 1 else None
    if vec is None or vec.scalar or node.inputs[0] is None:
        return None
    return _broadcast_dims([node.inputs[0], ir.Shape(list(vec.elems))])


def _window_dims(node: ir.Node) -> list[Known] | None:
    """Conv and pools: batch kept, channels from the weight (or kept), and every spatial dim
    that a stride-1 window slides over: its input length plus what the pads add back beyond
    what the window takes (the length itself where they cancel)."""
    x = node.inputs[0]
    w = node.inputs[1] if node.op_type == "Conv" and len(node.inputs) > 1 else None
    if x is None or x.shape is None or len(x.shape) < 3:
        return None
    spatial = len(x.shape) - 2
    attrs = node.attributes
    kernel = attrs.get_ints("kernel_shape", None)
    if kernel is None and w is not None and w.shape is not None and len(w.shape) == spatial + 2:
        kernel = [d if isinstance(d, int) else None for d in list(w.shape)[2:]]
    if kernel is None or len(kernel) != spatial:
        return None
    strides = attrs.get_ints("strides", [1] * spatial)
    dilations = attrs.get_ints("dilations", [1] * spatial)
    pads = attrs.get_ints("pads", [0] * 2 * spatial)
    auto_pad = attrs.get_string("auto_pad", "NOTSET")
    dims: list[Known] = [_dim(x.shape[0])]
    if node.op_type == "Conv":
        dims.append(_dim(w.shape[0]) if w is not None and w.shape is not None else None)
    else:
        dims.append(_dim(x.shape[1]))
    for i in range(spatial):
        length = _dim(x.shape[i + 2])
        if strides[i] != 1 or kernel[i] is None or length is None:
            dims.append(None)
        elif auto_pad in ("SAME_UPPER", "SAME_LOWER"):
            dims.append(length)
        elif auto_pad == "NOTSET":
            added = pads[i] + pads[i + spatial] - dilations[i] * (kernel[i] - 1)
            dims.append(_plus(length, added))
        else:
            dims.append(None)
    return dims


def _plus(length: Known, delta: int) -> Known:
    """``length + delta`` for a length that is a number, a dim's name or a name plus some."""
    if isinstance(length, int):
        return length + delta if length + delta >= 0 else None
    if isinstance(length, _Offset):
        length, delta = length.base, length.delta + delta
    if length is None:
        return None
    return length if delta == 0 else _Offset(length, delta)


def _matmul_dims(node: ir.Node) -> list[Elem] | None:
    """MatMul of rank >= 2 operands: broadcast batch dims, then rows of A and columns of B."""
    a, b = (v.shape if v is not None else None for v in node.inputs[:2])
    if a is None or b is None or len(a) < 2 or len(b) < 2:
        return None
    batch = _broadcast_dims([ir.Shape(list(a)[:-2]), ir.Shape(list(b)[:-2])]) or []
    return [*batch, _dim(a[-2]), _dim(b[-1])]


def _slice_dims(
    node: ir.Node, vectors: dict[ir.Value, _Vec], found: dict[str, Known]
) -> list[Known] | None:
    """Slice keeps the dims of the axes it does not slice (constant ``axes`` needed); a sliced
    axis has the length its bounds leave where that can be told for every input."""
    data = node.inputs[0]
    if data is None or data.shape is None or len(node.inputs) < 3:
        return None
    rank = len(data.shape)
    axes = _ints(node.inputs[3], vectors) if len(node.inputs) > 3 and node.inputs[3] else None
    starts, ends = _vector(node.inputs[1], vectors), _vector(node.inputs[2], vectors)
    if axes is None:
        if (len(node.inputs) > 3 and node.inputs[3] is not None) or starts is None:
            return None
        axes = list(range(len(starts.elems)))
    given = len(node.inputs) > 4 and node.inputs[4] is not None
    steps = _ints(node.inputs[4], vectors) if given else [1] * len(axes)
    dims: list[Known] = [_dim(d) for d in data.shape]
    for k, axis in enumerate(axes):
        if not -rank <= axis < rank:
            return None
        bounds_known = starts is not None and ends is not None
        if not bounds_known or len(starts.elems) != len(axes) or len(ends.elems) != len(axes):
            dims[axis % rank] = None
            continue
        step = steps[k] if steps is not None and len(steps) == len(axes) else None
        length = dims[axis % rank]
        if isinstance(length, str) and isinstance(found.get(length), _Offset):
            length = found[length]
        dims[axis % rank] = _slice_length(length, starts.elems[k], ends.elems[k], step)
    return dims


def _slice_length(length: Known, start: Elem, end: Elem, step: int | None) -> Known:
    """How many elements ``[start:end:step]`` of an axis of ``length`` keeps, if told."""
    if step != 1 or not isinstance(start, int):
        return None
    if isinstance(length, int) and isinstance(end, int):
        return len(range(length)[start:end])
    if isinstance(length, int) and isinstance(end, str) and start == 0:
        return min_dim(length, end) if length else 0  # end is a dim, so never negative
    if isinstance(end, str) and end == length and start == 0:
        return length
    base, delta = (length.base, length.delta) if isinstance(length, _Offset) else (length, 0)
    if not isinstance(base, str) or not isinstance(end, int) or start < 0:
        return None
    # base >= 0 unknown: both bounds must land inside the axis for every base
    stop = delta if end >= _INT64_MAX // 2 else delta + end if end < 0 else None
    if stop is None or stop < start:
        return None
    return _plus(base, stop - start)


def _range_dims(node: ir.Node, vectors: dict[ir.Value, _Vec]) -> list[Elem] | None:
    """``Range(start, limit, delta)`` has ``max(ceil((limit - start) / delta), 0)`` elements:
    a number, or the limit itself for ``Range(0, n, 1)`` with ``n`` a dim."""
    start, limit, delta = (_vector(v, vectors) for v in node.inputs[:3])
    if start is None or limit is None or delta is None:
        return None
    if any(len(v.elems) != 1 for v in (start, limit, delta)):
        return None
    (a,), (b,), (d,) = start.elems, limit.elems, delta.elems
    if isinstance(a, int) and isinstance(b, int) and isinstance(d, int) and d != 0:
        return [max(-((a - b) // d), 0)]
    if a == 0 and d == 1 and isinstance(b, str):
        return [b]
    return None


def _quotient(numerator: list[Elem], denominator: list[Elem]) -> Elem:
    """``prod(numerator) / prod(denominator)`` when the symbols cancel to one symbol or a number."""
    if None in numerator or None in denominator:
        return None
    top = Counter(d for d in numerator if isinstance(d, str))
    bottom = Counter(d for d in denominator if isinstance(d, str))
    if bottom - top:
        return None
    left = top - bottom
    top_int = int(np.prod([d for d in numerator if isinstance(d, int)], dtype=np.int64))
    bottom_int = int(np.prod([d for d in denominator if isinstance(d, int)], dtype=np.int64))
    if bottom_int == 0 or top_int % bottom_int:
        return None
    factor = top_int // bottom_int
    if not left:
        return factor
    if factor == 1 and sum(left.values()) == 1:
        return next(iter(left))
    return None
