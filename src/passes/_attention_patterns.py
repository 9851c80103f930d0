"""Graph analysis for fuse-attention: dims proven equal, shape vectors, head layouts, scores.

Nothing here changes the graph. The pass asks three kinds of question:

- *which dims are equal*: :class:`Dims` is a union-find over dim atoms (a static int, a symbolic
  name, or "axis i of value v"), fed by inferred shapes, by shape vectors the graph computes
  (``Concat(Shape(x)[0], Shape(x)[1], -1, 16)``) and by layouts proven on the way;
- *what a tensor is in head layout*: :func:`heads_of` follows Transpose/Reshape (and the
  repeat of K/V heads for grouped-query attention) back to the 3-D ``[B, L, N*D]`` projection;
- *what the scores are*: :func:`scores_of` walks from the Softmax input down to ``Q @ Kᵀ`` and
  returns the constant scale factors and the additive terms and masked fills on the way.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence

import numpy as np
import onnx_ir as ir

Atom = int | str | tuple[int, int]  # static size, symbolic name, (id(value), axis)
Element = int | tuple[int, int] | None  # a shape-vector entry: constant, dim of a value, ?
_MAX_DEPTH = 12
SHAPE_OPS = {"Shape", "Gather", "Slice", "Unsqueeze", "Squeeze", "Concat", "Cast", "Identity"}


def producer(value: ir.Value | None, *op_types: str) -> ir.Node | None:
    """The node computing ``value`` if it is one of ``op_types`` (default domain)."""
    node = value.producer() if value is not None else None
    if node is None or node.domain not in ("", "ai.onnx") or node.op_type not in op_types:
        return None
    return node


def ints_attr(node: ir.Node, name: str) -> list[int] | None:
    attr = node.attributes.get(name)
    return list(attr.as_ints()) if attr is not None else None


def int_attr(node: ir.Node, name: str, default: int) -> int:
    attr = node.attributes.get(name)
    return attr.as_int() if attr is not None else default


def rank(value: ir.Value | None) -> int | None:
    return None if value is None or value.shape is None else len(value.shape)


def single_use(value: ir.Value) -> bool:
    return len(value.uses()) == 1 and not value.is_graph_output()


# --- numbers -----------------------------------------------------------------------------------


def numeric(value: ir.Value | None, depth: int = 0) -> np.ndarray | None:
    """The value as an array when the graph computes it from constants and static dims."""
    if value is None or depth > _MAX_DEPTH:
        return None
    if value.const_value is not None:
        return value.const_value.numpy()
    node = value.producer()
    if node is None or node.domain not in ("", "ai.onnx"):
        return None
    if node.op_type in ("Shape", "Slice", "Gather") and value.dtype == ir.DataType.INT64:
        table = Dims()
        entries = shape_vector(value, table)
        sizes = [e if isinstance(e, int) else table.static(e) for e in entries or [None]]
        if all(isinstance(e, int) for e in sizes):
            return np.array(sizes, np.int64).reshape(() if rank(value) == 0 else -1)
    args = [numeric(v, depth + 1) if v is not None else None for v in node.inputs]
    if any(a is None for a in args[:1]):
        return None
    return _evaluate(node, args)


def _evaluate(node: ir.Node, args: list[np.ndarray | None]) -> np.ndarray | None:
    op, x = node.op_type, args[0]
    unary = {
        "Sqrt": np.sqrt,
        "Reciprocal": np.reciprocal,
        "Identity": np.asarray,
        "Neg": np.negative,
    }
    if op in unary:
        return unary[op](x)
    if op == "Cast":
        return x.astype(ir.DataType(int_attr(node, "to", 1)).numpy())
    if op in ("Mul", "Div", "Add", "Sub", "Pow") and len(args) == 2 and args[1] is not None:
        if op == "Div" and np.issubdtype(x.dtype, np.integer):
            return x // args[1]
        return {
            "Mul": np.multiply,
            "Div": np.divide,
            "Add": np.add,
            "Sub": np.subtract,
            "Pow": np.power,
        }[op](x, args[1]).astype(np.result_type(x, args[1]))
    if op in ("Unsqueeze", "Squeeze", "Reshape") and x.size == 1:
        return x.reshape(()) if op == "Squeeze" else x.reshape((1,))
    if op == "Gather" and len(args) == 2 and args[1] is not None and x.ndim == 1:
        return x[args[1]]
    if op == "Slice" and x.ndim == 1 and all(a is not None for a in args[1:]):
        if len(args) > 3 and int(args[3][0]) not in (0, -1):
            return None
        step = int(args[4][0]) if len(args) > 4 else 1
        return x[int(args[1][0]) : int(args[2][0]) : step]
    return None


def scalar(value: ir.Value | None, max_rank: int = 4) -> float | None:
    """A one-element constant (computed from constants and static dims), as a float."""
    array = numeric(value)
    if array is None or array.size != 1 or array.ndim > max_rank:
        return None
    if not np.issubdtype(array.dtype, np.floating) and not np.issubdtype(array.dtype, np.integer):
        return None
    return float(array.reshape(()))


# --- dims --------------------------------------------------------------------------------------


class Dims:
    """Which dims are known equal: union-find over static sizes, symbols and (value, axis)."""

    def __init__(self) -> None:
        self._parent: dict[Atom, Atom] = {}
        self._values: dict[int, ir.Value] = {}

    def ref(self, value: ir.Value, axis: int) -> Atom | None:
        """Axis ``axis`` of ``value`` (negative counts from the end when the rank is known)."""
        r = rank(value)
        if axis < 0:
            if r is None:
                return None
            axis += r
        if r is not None and not 0 <= axis < r:
            return None
        atom = (id(value), axis)
        if atom not in self._parent:
            self._parent[atom] = atom
            self._values[id(value)] = value
            if r is not None:
                dim = value.shape[axis]
                if isinstance(dim, int):
                    self.union(atom, dim)
                elif dim.value is not None:
                    self.union(atom, str(dim.value))
        return atom

    def find(self, atom: Atom) -> Atom:
        self._parent.setdefault(atom, atom)
        while self._parent[atom] != atom:
            self._parent[atom] = self._parent[self._parent[atom]]
            atom = self._parent[atom]
        return atom

    def union(self, a: Atom | None, b: Atom | None) -> None:
        if a is None or b is None:
            return
        ra, rb = self.find(a), self.find(b)
        if ra == rb or (isinstance(ra, int) and isinstance(rb, int)):
            return  # two different sizes: a contradiction, never merged
        if isinstance(ra, int):  # keep a static size as the root, so ``static`` finds it
            ra, rb = rb, ra
        self._parent[ra] = rb

    def same(self, a: Atom | None, b: Atom | None) -> bool:
        return a is not None and b is not None and self.find(a) == self.find(b)

    def static(self, atom: Atom | None) -> int | None:
        root = self.find(atom) if atom is not None else None
        return root if isinstance(root, int) else None

    def bind(self, value: ir.Value, atoms: Sequence[Atom | None]) -> None:
        """Record that ``value`` has the dims ``atoms`` (a layout proven elsewhere)."""
        for axis, atom in enumerate(atoms):
            self.union(self.ref(value, axis), atom)


def shape_vector(value: ir.Value | None, dims: Dims, depth: int = 0) -> list[Element] | None:
    """A 1-D int tensor the graph computes, entry by entry: a constant, a value's dim, or None."""
    if value is None or depth > _MAX_DEPTH:
        return None
    if value.const_value is not None:
        array = value.const_value.numpy()
        return [int(v) for v in array.reshape(-1)] if array.ndim <= 1 else None
    node = value.producer()
    if node is None or node.domain not in ("", "ai.onnx"):
        return None
    op = node.op_type
    if op == "Shape":
        r = rank(node.inputs[0])
        if r is None:
            return None
        start, end = int_attr(node, "start", 0), int_attr(node, "end", r)
        start, end = (min(max(s + r if s < 0 else s, 0), r) for s in (start, end))
        return [dims.ref(node.inputs[0], i) for i in range(start, end)]
    if op == "Concat":
        parts = [shape_vector(v, dims, depth + 1) for v in node.inputs]
        return None if any(p is None for p in parts) else [e for p in parts for e in p]
    if op in ("Unsqueeze", "Squeeze", "Cast", "Identity", "Reshape"):
        return shape_vector(node.inputs[0], dims, depth + 1)
    if op == "ConstantOfShape":
        size = numeric(node.inputs[0])
        attr = node.attributes.get("value")
        fill = int(attr.as_tensor().numpy().reshape(-1)[0]) if attr is not None else 0
        return [fill] * int(size.reshape(-1)[0]) if size is not None and size.size == 1 else None
    if op in ("Gather", "Slice"):
        return _select(node, shape_vector(node.inputs[0], dims, depth + 1))
    if op in ("Mul", "Add", "Div", "Sub", "Where", "Equal"):
        return _elementwise(node, [shape_vector(v, dims, depth + 1) for v in node.inputs])
    return None


def _select(node: ir.Node, data: list[Element] | None) -> list[Element] | None:
    if data is None:
        return None
    if node.op_type == "Gather":
        index = numeric(node.inputs[1])
        if index is None or int_attr(node, "axis", 0) != 0:
            return None
        return [data[int(i)] for i in index.reshape(-1)]
    args = [numeric(v) if v is not None else None for v in node.inputs[1:]]
    if any(a is None for a in args[:2]) or (
        len(args) > 2 and args[2] is not None and int(args[2][0]) != 0
    ):
        return None
    step = int(args[3][0]) if len(args) > 3 and args[3] is not None else 1
    start, end = (int(np.clip(a[0], -(2**62), 2**62)) for a in args[:2])
    return data[start:end:step]


def _elementwise(node: ir.Node, args: list[list[Element] | None]) -> list[Element] | None:
    """Int arithmetic on shape vectors; unknown results become None entries."""
    if any(a is None for a in args):
        return None
    size = max(len(a) for a in args)
    if any(len(a) not in (1, size) for a in args):
        return None
    cols = [[a[i] if len(a) > 1 else a[0] for a in args] for i in range(size)]
    return [_element(node.op_type, col) for col in cols]


def _element(op: str, col: list[Element]) -> Element:
    if op == "Where":
        cond, a, b = col
        return a if cond == 1 else b if cond == 0 else None
    x, y = col
    if op == "Equal":  # a dim is never negative: TorchScript's Where(Equal(shape, -1), 1, shape)
        if isinstance(x, int) and isinstance(y, int):
            return int(x == y)
        return 0 if isinstance(y, int) and y < 0 and isinstance(x, tuple) else None
    if isinstance(x, int) and isinstance(y, int):
        return {"Mul": x * y, "Add": x + y, "Sub": x - y, "Div": x // y if y else None}[op]
    if (op == "Mul" and y == 1) or (op in ("Add", "Sub") and y == 0) or (op == "Div" and y == 1):
        return x
    return None


_ELEMENTWISE = {
    "Add",
    "Sub",
    "Mul",
    "Div",
    "Where",
    "And",
    "Or",
    "Equal",
    "Less",
    "Greater",
    "LessOrEqual",
    "GreaterOrEqual",
    "Not",
    "Neg",
    "Cast",
}


def trailing_dim(value: ir.Value, axis: int, dims: Dims, depth: int = 0) -> Atom | None:
    """Size of ``value`` at negative ``axis``, through elementwise ops and Expand targets."""
    r = rank(value)
    if r is not None and r < -axis:
        return 1  # missing leading axes broadcast as 1
    node = value.producer()
    if node is not None and depth < 6 and node.domain in ("", "ai.onnx"):
        if node.op_type in _ELEMENTWISE:
            parts = [trailing_dim(v, axis, dims, depth + 1) for v in node.inputs if v is not None]
            found = broadcast_dim(parts, dims)
            if found is not None:
                return found
        elif node.op_type == "Expand":
            entries = shape_vector(node.inputs[1], dims)
            inner = trailing_dim(node.inputs[0], axis, dims, depth + 1)
            if entries is not None and len(entries) >= -axis:
                found = broadcast_dim([entries[axis], inner], dims)
                if found is not None:
                    return found
    return dims.ref(value, axis) if r is not None else None


def broadcast_dim(sizes: Sequence[Atom | None], dims: Dims) -> Atom | None:
    """The size of one axis after broadcasting: the one size not 1 (None when unclear)."""
    if any(size is None for size in sizes):
        return None
    big = [size for size in sizes if dims.static(size) != 1]
    if not big:
        return 1
    return big[0] if all(dims.same(size, big[0]) for size in big) else None


def reshape_targets(node: ir.Node, dims: Dims) -> list[Atom | None] | None:
    """The output dims a Reshape asks for: atoms, None for -1 or unknown entries."""
    vector = shape_vector(node.inputs[1], dims)
    out = node.outputs[0]
    if vector is None:
        r = rank(out)
        return None if r is None else [dims.ref(out, i) for i in range(r)]
    allowzero = int_attr(node, "allowzero", 0)
    atoms: list[Atom | None] = []
    for i, entry in enumerate(vector):
        if entry == 0 and not allowzero:
            atoms.append(dims.ref(node.inputs[0], i))
        elif isinstance(entry, int) and entry < 0:
            atoms.append(None)
        else:
            atoms.append(entry)
        dims.union(dims.ref(out, i), atoms[-1])
    return atoms


def reshape_keeps(
    node: ir.Node, dims: Dims, keep: Sequence[tuple[int, int]], out_rank: int
) -> bool:
    """Whether a Reshape gives output axis o the size of input axis i, for each (o, i) in keep.

    One kept axis may be left to -1 (or be unknown) when the sizes of all the other axes,
    in and out, have equal products.
    """
    targets = reshape_targets(node, dims)
    source, out = node.inputs[0], node.outputs[0]
    if targets is None or len(targets) != out_rank:
        return False
    missing = [
        (o, i)
        for o, i in keep
        if not dims.same(targets[o], dims.ref(source, i))
        and not dims.same(dims.ref(out, o), dims.ref(source, i))
    ]
    if not missing:
        return True
    in_rank = rank(source)
    if len(missing) > 1 or in_rank is None or targets[missing[0][0]] is not None:
        return False
    o, i = missing[0]
    rest_out = [targets[j] for j in range(out_rank) if j != o]
    rest_in = [dims.ref(source, j) for j in range(in_rank) if j != i]
    if not _same_product(dims, rest_out, rest_in):
        return False
    dims.union(dims.ref(out, o), dims.ref(source, i))
    return True


def _same_product(dims: Dims, a: list[Atom | None], b: list[Atom | None]) -> bool:
    """Whether two lists of sizes have equal products (static parts, then symbols)."""
    sides = []
    for atoms in (a, b):
        if any(x is None for x in atoms):
            return False
        roots = [dims.find(x) for x in atoms]  # type: ignore[arg-type]
        static = math.prod(r for r in roots if isinstance(r, int))
        sides.append((static, sorted(map(str, (r for r in roots if not isinstance(r, int))))))
    return sides[0] == sides[1]


# --- head layouts ------------------------------------------------------------------------------


@dataclasses.dataclass
class Heads:
    """Q, K or V in head layout, with the forms of it the graph already computes.

    ``bnsh`` is ``[B, N, L, D]``; ``bsnd`` is ``[B, L, N, D]``; ``flat`` is ``[B, L, N*D]``
    (plus ``flat_add`` flattened, when set: a per-head bias like Conformer's ``pos_bias_u``).
    For K and V whose heads the graph repeats (grouped-query attention), ``repeat`` > 1, these
    describe the un-repeated tensor and ``repeated`` is the ``[B, N*repeat, L, D]`` one.
    """

    bnsh: ir.Value | None = None
    bsnd: ir.Value | None = None
    flat: ir.Value | None = None
    flat_add: ir.Value | None = None  # a constant [1, N, 1, D] the graph adds to the heads
    heads: int | None = None
    size: int | None = None
    repeat: int = 1
    repeated: ir.Value | None = None

    def dim(self, dims: Dims, which: str) -> Atom | None:
        """Atom of 'B' (batch), 'L' (sequence), 'N' (heads) or 'D' (head size)."""
        axes = {"bnsh": "BNLD", "bsnd": "BLND", "flat": "BL"}
        for form, letters in axes.items():
            value = getattr(self, form)
            if value is not None and which in letters:
                return dims.ref(value, letters.index(which))
        return None

    def seq_source(self) -> tuple[ir.Value, int]:
        """A value and axis holding this tensor's sequence length."""
        if self.flat is not None:
            return self.flat, 1
        if self.bsnd is not None:
            return self.bsnd, 1
        return self.bnsh, 2  # type: ignore[return-value]


def split_heads(value: ir.Value, dims: Dims) -> tuple[ir.Value, int | None, int | None] | None:
    """``Reshape(x, [B, L, N, D])`` of a 3-D ``x`` that only splits its last axis: (x, N, D)."""
    node = producer(value, "Reshape")
    if node is None or rank(node.inputs[0]) != 3 or rank(value) != 4:
        return None
    if not reshape_keeps(node, dims, [(0, 0), (1, 1)], 4):
        return None
    size = dims.static(dims.ref(value, 3))
    heads = dims.static(dims.ref(value, 2))
    hidden = dims.static(dims.ref(node.inputs[0], 2))
    if heads is None and size and hidden and hidden % size == 0:
        heads = hidden // size
        dims.union(dims.ref(value, 2), heads)
    return node.inputs[0], heads, size


def heads_of(value: ir.Value, dims: Dims) -> Heads:
    """``value`` ([B, N, L, D]) with the 3-D projection it was split from, when proven."""
    heads = _repeated_heads(value, dims) or _biased_heads(value, dims)
    if heads is not None:
        return heads
    found = Heads(bnsh=value)
    node = producer(value, "Transpose")
    if node is not None and ints_attr(node, "perm") == [0, 2, 1, 3]:
        found.bsnd = node.inputs[0]
        dims.bind(value, [dims.ref(found.bsnd, i) for i in (0, 2, 1, 3)])
        split = split_heads(node.inputs[0], dims)
        if split is not None:
            found.flat, found.heads, found.size = split
    if rank(value) == 4:
        found.heads = found.heads or dims.static(dims.ref(value, 1))
        found.size = found.size or dims.static(dims.ref(value, 3))
        dims.union(dims.ref(value, 1), found.heads)
    return found


def _biased_heads(value: ir.Value, dims: Dims) -> Heads | None:
    """``heads + c`` with c a constant ``[1, N, 1, D]`` (or fewer leading dims), heads split."""
    node = producer(value, "Add")
    if node is None or rank(value) != 4:
        return None
    for data, const in ((0, 1), (1, 0)):
        bias = node.inputs[const]
        if bias.const_value is None or rank(bias) is None or rank(bias) > 4:
            continue
        inner = heads_of(node.inputs[data], dims)
        shape = (1,) * (4 - rank(bias)) + tuple(bias.shape)
        if inner.flat is None or inner.flat_add is not None or inner.repeat > 1:
            continue
        if shape != (1, inner.heads, 1, inner.size):
            continue
        dims.bind(value, [dims.ref(node.inputs[data], i) for i in range(4)])
        return dataclasses.replace(inner, bnsh=value, bsnd=None, flat_add=bias)
    return None


def _repeated_heads(value: ir.Value, dims: Dims) -> Heads | None:
    """``Reshape(Expand(Unsqueeze(x, 2), [B, n, r, L, D]), [B, n*r, L, D])``: x, r times."""
    reshape = producer(value, "Reshape")
    expand = producer(reshape.inputs[0] if reshape else None, "Expand")
    unsqueeze = producer(expand.inputs[0] if expand else None, "Unsqueeze")
    if unsqueeze is None or rank(unsqueeze.inputs[0]) != 4:
        return None
    axes = ints_attr(unsqueeze, "axes") or [
        int(a) for a in numeric(unsqueeze.inputs[1] if len(unsqueeze.inputs) > 1 else None) or []
    ]
    if axes not in ([2], [-3]):
        return None
    source, target = unsqueeze.inputs[0], shape_vector(expand.inputs[1], dims)
    if target is None or len(target) != 5 or not isinstance(target[2], int) or target[2] < 1:
        return None
    for axis, entry in zip((0, 1, 3, 4), (target[0], target[1], target[3], target[4]), strict=True):
        if entry != 1 and not dims.same(entry, dims.ref(source, axis if axis < 2 else axis - 1)):
            return None
    expanded = expand.outputs[0]
    dims.bind(
        expanded,
        [
            dims.ref(source, 0),
            dims.ref(source, 1),
            target[2],
            dims.ref(source, 2),
            dims.ref(source, 3),
        ],
    )
    if not reshape_keeps(reshape, dims, [(0, 0), (2, 3), (3, 4)], 4):
        return None
    inner = heads_of(source, dims)
    inner.repeat, inner.repeated = target[2], value
    if inner.heads is not None:
        dims.union(dims.ref(value, 1), inner.heads * inner.repeat)
    return inner


# --- scores ------------------------------------------------------------------------------------


@dataclasses.dataclass
class Step:
    """One op between ``Q @ Kᵀ`` and Softmax, bottom up.

    ``kind`` is 'scale' (Mul or Div by the constant ``operand``), 'add' (``operand`` added),
    or 'fill' (``Where(cond, scores, operand)``, or with the branches swapped when
    ``keep_if_true`` is False).
    """

    kind: str
    node: ir.Node
    operand: ir.Value
    factor: float = 1.0
    cond: ir.Value | None = None
    keep_if_true: bool = True
    tamed: bool = False  # its lowest-float fill is to be written as a large finite value


@dataclasses.dataclass
class Scores:
    qk: ir.Node
    steps: list[Step]


class NotFusable(Exception):
    """Why a subgraph cannot become one attention op (the message) and where (the value)."""

    def __init__(self, reason: str, where: ir.Value | ir.Node | None = None) -> None:
        super().__init__(reason)
        self.where = where


def scale_of(node: ir.Node) -> tuple[ir.Value, ir.Value, float] | None:
    """For ``Mul(x, c)``, ``Mul(c, x)`` or ``Div(x, c)`` with c a constant scalar: (x, c, f)."""
    if node.op_type not in ("Mul", "Div") or node.domain not in ("", "ai.onnx"):
        return None
    order = ((0, 1), (1, 0)) if node.op_type == "Mul" else ((0, 1),)
    for data, const in order:
        value = scalar(node.inputs[const], max_rank=rank(node.outputs[0]) or 4)
        if value is not None and value != 0 and math.isfinite(value):
            return (
                node.inputs[data],
                node.inputs[const],
                value if node.op_type == "Mul" else (1.0 / value),
            )
    return None


def peel_scale(value: ir.Value) -> tuple[ir.Value, float]:
    """``value`` without the constant scalar factors applied to it, and their product."""
    factor = 1.0
    for _ in range(_MAX_DEPTH):
        node = value.producer()
        found = scale_of(node) if node is not None else None
        if found is None:
            break
        value, _, f = found
        factor *= f
    return value, factor


def scores_of(value: ir.Value, prefer: Callable[[ir.Node], bool]) -> Scores:
    """Walk from the Softmax input down to ``Q @ Kᵀ``; each value on the way has one use.

    When both terms of an Add are products (relative-position attention without a shift),
    ``prefer`` picks the MatMul that pairs with V.
    """
    steps: list[Step] = []
    for _ in range(_MAX_DEPTH):
        if not single_use(value):
            raise NotFusable("the attention scores are also used elsewhere", value)
        node = value.producer()
        if node is None or node.domain not in ("", "ai.onnx"):
            raise NotFusable("the scores do not come from a MatMul of Q and Kᵀ", value)
        if node.op_type == "MatMul":
            return Scores(node, steps[::-1])
        scaled = scale_of(node)
        if scaled is not None:
            steps.append(Step("scale", node, scaled[1], factor=scaled[2]))
            value = scaled[0]
        elif node.op_type == "Add":
            found = [_leads_to_qk(v) for v in node.inputs]
            chain = [i for i in (0, 1) if found[i] is not None]
            if len(chain) == 2:
                chain = [i for i in chain if prefer(found[i])]  # type: ignore[arg-type]
            if len(chain) != 1:
                raise NotFusable(
                    "cannot tell which term of the Add on the scores is Q·Kᵀ "
                    f"({'both' if chain else 'neither'} look like it)",
                    node,
                )
            steps.append(Step("add", node, node.inputs[1 - chain[0]]))
            value = node.inputs[chain[0]]
        elif node.op_type == "Where":
            steps.append(_fill_step(node))
            value = node.inputs[1] if steps[-1].keep_if_true else node.inputs[2]
        elif node.op_type in ("Mul", "Div"):
            raise NotFusable(
                f"the scores go through a {node.op_type} by a non-constant or "
                "non-scalar value; the fused op takes one constant scale",
                node,
            )
        else:
            raise NotFusable(
                f"the scores go through {node.op_type}, which the fused op cannot express", node
            )
    raise NotFusable("too many ops between Q·Kᵀ and Softmax", value)


def _fill_step(node: ir.Node) -> Step:
    """``Where(cond, scores, fill)`` (a masked fill) as a step; fill must be -inf or lowest."""
    cond, a, b = node.inputs
    keep = not _is_fill(a, b)
    fill = b if keep else a
    if not _is_fill(fill, a if keep else b):
        raise NotFusable(
            "the scores are masked with a Where whose fill is not -inf or the "
            "lowest float: it cannot become an additive mask exactly",
            node,
        )
    return Step("fill", node, fill, cond=cond, keep_if_true=keep)


def _is_fill(fill: ir.Value, other: ir.Value) -> bool:
    value = scalar(fill)
    if value is None or other.dtype is None:
        return False
    if value == -math.inf:
        return True
    return other.dtype == ir.DataType.FLOAT and value <= float(np.finfo(np.float32).min)


def _leads_to_qk(value: ir.Value, depth: int = 0) -> ir.Node | None:
    """The 4-D MatMul ``value`` is, possibly scaled, masked or with terms added."""
    node = value.producer()
    if node is None or depth > 6 or node.domain not in ("", "ai.onnx"):
        return None
    if node.op_type == "MatMul":
        return node if rank(node.outputs[0]) in (None, 4) else None
    scaled = scale_of(node)
    if scaled is not None:
        return _leads_to_qk(scaled[0], depth + 1)
    if node.op_type in ("Add", "Where"):
        inputs = node.inputs if node.op_type == "Add" else node.inputs[1:]
        found = [_leads_to_qk(v, depth + 1) for v in inputs]
        return next((m for m in found if m is not None), None)
    return None


def may_be_neg_inf(value: ir.Value | None, depth: int = 0) -> bool:
    """False when ``value`` is provably finite (constants, Where/arith of finite values)."""
    if value is None:
        return False
    array = numeric(value)
    if array is not None:
        return not bool(np.all(np.isfinite(array)))
    node = value.producer()
    if node is None or depth > 6:
        return True
    if node.op_type == "Where":
        return any(may_be_neg_inf(v, depth + 1) for v in node.inputs[1:])
    source = node.inputs[0].dtype if node.op_type == "Cast" else None
    if source is not None and not source.is_floating_point():
        return False
    if node.op_type in ("Add", "Sub", "Mul", "Expand", "Unsqueeze", "Reshape", "Cast"):
        data = node.inputs if node.op_type in ("Add", "Sub", "Mul") else node.inputs[:1]
        return any(may_be_neg_inf(v, depth + 1) for v in data)
    return True
