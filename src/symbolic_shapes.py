"""Tell which dims ONNX shape inference made up (``unk__N``) are really dims it already knew.

Exporters build Reshape targets from ``Shape`` reads (``x.view(-1, x.size(-1))``,
``y.view(*x.shape[:-1], n)``); ONNX inference then invents a fresh ``unk__N`` dim, so equal dims
stop looking equal and shape-dependent fusions cannot prove their conditions. Each made-up name
stands for one quantity wherever ONNX wrote it, so once that quantity is known it can be
replaced everywhere. Two rules find them, repeated until nothing changes:

- a Reshape whose target is computed from ``Shape`` reads (through Constant, Gather, Slice,
  Concat, Unsqueeze, Squeeze, Cast, Identity) has the dims those reads name, and a ``-1`` the
  size left when the other dims cancel against the input's;
- a broadcasting op's output dim equals its inputs' dim where those agree (1s aside).
"""

from __future__ import annotations

import dataclasses
from collections import Counter
from collections.abc import Sequence

import numpy as np
import onnx_ir as ir

Elem = int | str | None  # a static size, a symbolic dim's name, or unknown
_GENERATED = "unk__"  # names ONNX shape inference makes up


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


def unify_dims(graph: ir.Graph) -> int:
    """Replace made-up dims of the graph's values by what they provably are; how many names."""
    total = 0
    for _ in range(_MAX_ROUNDS):
        found: dict[str, Elem] = {}
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
                _learn(found, _slice_dims(node, vectors), node.outputs[0])
        subs = {name: new for name, new in found.items() if new is not None}
        # Two made-up names proven equal both ways: keep one direction, or they would swap.
        subs = {n: v for n, v in subs.items() if not (subs.get(v) == n and n < str(v))}
        if not subs:
            break
        _substitute(graph, subs)
        total += len(subs)
    return total


def _learn(found: dict[str, Elem], dims: list[Elem] | None, out: ir.Value) -> None:
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


def _equal(node: ir.Node, vectors: dict[ir.Value, _Vec]) -> _Vec | None:
    """Elementwise ==, where a dim name equals no negative number (dims are never negative)."""
    a, b = (_vector(v, vectors) for v in node.inputs[:2])
    if a is None or b is None or len(b.elems) not in (1, len(a.elems)):
        return None
    other = b.elems * len(a.elems) if len(b.elems) == 1 else b.elems
    out: list[Elem] = []
    for x, y in zip(a.elems, other, strict=True):
        if isinstance(x, int) and isinstance(y, int):
            out.append(int(x == y))
        elif (isinstance(x, str) and isinstance(y, int) and y < 0) or (
            isinstance(y, str) and isinstance(x, int) and x < 0
        ):
            out.append(0)
        else:
            return None
    return _Vec(tuple(out), scalar=a.scalar)


def _where(node: ir.Node, vectors: dict[ir.Value, _Vec]) -> _Vec | None:
    cond, a, b = (_vector(v, vectors) for v in node.inputs[:3])
    if cond is None or a is None or b is None:
        return None
    n = len(cond.elems)
    if any(len(v.elems) not in (1, n) for v in (a, b)):
        return None
    pick = [
        (a.elems[i if len(a.elems) > 1 else 0] if c else b.elems[i if len(b.elems) > 1 else 0])
        for i, c in enumerate(cond.elems)
    ]
    return _Vec(tuple(pick))


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
        dims.append(seen.pop() if len(seen) == 1 else 1 if not seen else None)
    return dims


def _expand_dims(node: ir.Node, vectors: dict[ir.Value, _Vec]) -> list[Elem] | None:
    """Expand broadcasts its input against the shape it is given."""
    vec = _vector(node.inputs[1], vectors) if len(node.inputs) > 1 else None
    if vec is None or vec.scalar or node.inputs[0] is None:
        return None
    return _broadcast_dims([node.inputs[0], ir.Shape(list(vec.elems))])


def _window_dims(node: ir.Node) -> list[Elem] | None:
    """Conv and pools: batch kept, channels from the weight (or kept), and every spatial dim
    kept where the window slides with stride 1 and the padding adds back what it takes."""
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
    dims: list[Elem] = [_dim(x.shape[0])]
    if node.op_type == "Conv":
        dims.append(_dim(w.shape[0]) if w is not None and w.shape is not None else None)
    else:
        dims.append(_dim(x.shape[1]))
    for i in range(spatial):
        taken = None if kernel[i] is None else dilations[i] * (kernel[i] - 1)
        same = auto_pad in ("SAME_UPPER", "SAME_LOWER") or (
            auto_pad == "NOTSET" and taken is not None and pads[i] + pads[i + spatial] == taken
        )
        dims.append(_dim(x.shape[i + 2]) if strides[i] == 1 and same else None)
    return dims


def _matmul_dims(node: ir.Node) -> list[Elem] | None:
    """MatMul of rank >= 2 operands: broadcast batch dims, then rows of A and columns of B."""
    a, b = (v.shape if v is not None else None for v in node.inputs[:2])
    if a is None or b is None or len(a) < 2 or len(b) < 2:
        return None
    batch = _broadcast_dims([ir.Shape(list(a)[:-2]), ir.Shape(list(b)[:-2])]) or []
    return [*batch, _dim(a[-2]), _dim(b[-1])]


def _slice_dims(node: ir.Node, vectors: dict[ir.Value, _Vec]) -> list[Elem] | None:
    """Slice keeps the dims of the axes it does not slice (constant ``axes`` needed)."""
    data = node.inputs[0]
    if data is None or data.shape is None or len(node.inputs) < 3:
        return None
    rank = len(data.shape)
    axes = _ints(node.inputs[3], vectors) if len(node.inputs) > 3 and node.inputs[3] else None
    if axes is None:
        if len(node.inputs) > 3 and node.inputs[3] is not None:
            return None
        starts = _vector(node.inputs[1], vectors)
        if starts is None:
            return None
        axes = list(range(len(starts.elems)))
    sliced = {a % rank for a in axes}
    return [None if i in sliced else _dim(d) for i, d in enumerate(data.shape)]


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
