"""Fuse scaled-dot-product attention subgraphs into one attention op."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import onnx_ir as ir
from onnxscript.rewriter import pattern

from onnxopt.fusion import Fusion, FusionPass
from onnxopt.passes import _attention_patterns as ap
from onnxopt.passes._attention_patterns import Dims, Heads, NotFusable, Step
from onnxopt.registry import register_pass
from onnxopt.targets import Target

MHA = ("com.microsoft", "MultiHeadAttention")
GQA = ("com.microsoft", "GroupQueryAttention")
ATTENTION = ("", "Attention")
_BSND = [0, 2, 1, 3]


@dataclasses.dataclass
class _ShapeRead:
    """A ``Shape`` of a tensor in head layout, to be computed from ``base`` instead.

    ``base`` is the 3-D projection (layout "flat"), or None for the fused op's output;
    ``want`` is the layout of the tensor read: "bnsh" or "bsnd".
    """

    node: ir.Node
    base: ir.Value | None
    want: str
    heads: int
    size: int


@dataclasses.dataclass
class _Plan:
    """What ``check`` proved about one attention subgraph; ``rewrite`` builds from it."""

    q: Heads
    k: Heads
    v: Heads
    heads: int | None
    scale: float
    steps: list[Step]
    dims: Dims
    opset: int
    causal: bool = False
    kv_broadcast: bool = False  # K/V have one head that the MatMuls broadcast
    nan_rows: bool = False  # rows masked entirely by -inf: the graph zeroes their NaN
    bias_rank: int = 0
    bias_fits: bool = True  # the additive terms are already [.., S, T] in their last two axes
    out_shape: ir.Value | None = None  # merged output: Reshape(fused output, out_shape)
    reads: list[_ShapeRead] = dataclasses.field(default_factory=list)
    rotary: tuple[Heads, Heads, ir.Value, ir.Value] | None = None  # Q, K before; cos, sin


class _AttentionRule(pattern.RewriteRuleClassBase):
    """``Softmax(scores) @ V`` and, with ``merged``, the head merge after it: one attention op.

    Subclasses adapt the plan to their op (``_adapt``, which refuses what it cannot express)
    and build the op (``_emit``).
    """

    def __init__(
        self, name: str, *, merged: bool, dtypes: frozenset[ir.DataType], pending: list
    ) -> None:
        super().__init__(name, remove_nodes=False)  # uses of intermediates are checked here
        self.merged, self.dtypes, self.pending = merged, dtypes, pending
        self._plan: _Plan | None = None

    def pattern(self, op, scores, v, zero, inner_shape, shape):
        probs = op.Softmax(scores, _outputs=["probs"])
        guarded = op.Where(op.IsNaN(probs), zero, probs)
        weights = pattern.OrValue([guarded, probs], tag_var="guard", tag_values=[True, False])
        ctx = op.MatMul(weights, v, _outputs=["ctx"])
        if not self.merged:
            return ctx
        kept = pattern.OrValue(
            [op.Reshape(ctx, inner_shape, _outputs=["ctx_r"]), ctx],
            tag_var="reshaped",
            tag_values=[True, False],
        )
        heads_last = op.Transpose(kept, perm=_BSND, _outputs=["ctx_t"])
        return op.Reshape(heads_last, shape, _outputs=["merged"])

    def check(self, context, scores, v, probs, ctx, guard, zero=None, **rest):
        result = pattern.MatchResult()
        self._plan = None
        try:
            if scores.dtype not in self.dtypes:
                raise NotFusable(f"the op has no kernel for {scores.dtype} here", scores)
            plan = _analyze(context.model, scores, v, probs, ctx, guard, zero)
            self._adapt(plan)
            _check_bias(plan)
            plan.nan_rows = bool(guard) and _may_mask_rows(plan)
            if self.merged:
                plan.out_shape = _merged_output(plan, ctx, rest)
            elif _merge_after(plan, ctx) is not None:
                raise NotFusable("the head merge after it is fused with it (merged variant)", ctx)
        except NotFusable as err:
            return result.fail(str(err), err.where)
        self._plan = plan
        return result

    def rewrite(self, op, scores, **_):
        plan = self._plan
        assert plan is not None
        y, flat = self._emit(op, plan, want_flat=self.merged)
        self.pending.append((y, "flat" if flat else "bnsh", plan.reads))
        if self.merged:
            if not flat:
                y = op.Reshape(op.Transpose(y, perm=_BSND), _ints(op, [0, 0, -1]))
            return op.Reshape(y, plan.out_shape) if plan.out_shape is not None else y
        if flat:
            y = op.Transpose(op.Reshape(y, _ints(op, [0, 0, plan.heads, -1])), perm=_BSND)
        return y

    def _adapt(self, plan: _Plan) -> None:
        """Adjust the plan to the op, or raise NotFusable for what it cannot express."""

    def _emit(self, op, plan: _Plan, want_flat: bool) -> tuple[ir.Value, bool]:
        """Build the op: its output, and whether that is [B, S, N*Dv] (else [B, N, S, Dv])."""
        raise NotImplementedError


class _MultiHeadAttention(_AttentionRule):
    """``com.microsoft::MultiHeadAttention``: Q 3-D; K/V 3-D, or 4-D BNSH (cache, GQA, rotary)."""

    def _adapt(self, plan: _Plan) -> None:
        if plan.heads is None:
            raise NotFusable("the number of heads is not static", plan.q.bnsh)
        if plan.kv_broadcast:
            raise NotFusable(
                "K/V have one head broadcast over the query heads; MultiHeadAttention needs "
                "them repeated",
                plan.k.bnsh,
            )
        sizes = (plan.k.size, plan.v.size)
        if not _flat_kv(plan) and None not in sizes and sizes[0] != sizes[1]:
            raise NotFusable(
                f"K and V head sizes differ ({plan.k.size} vs {plan.v.size}): "
                "MultiHeadAttention takes 4-D K and V of the same shape",
                plan.v.bnsh,
            )

    def _emit(self, op, plan: _Plan, want_flat: bool) -> tuple[ir.Value, bool]:
        if _flat_kv(plan):
            key, value = _as_flat(op, plan.k), _as_flat(op, plan.v)
        else:
            key, value = _as_bnsh(op, plan.k, repeated=True), _as_bnsh(op, plan.v, repeated=True)
        bias = _bias(op, plan, rank=4)
        y = op.MultiHeadAttention(
            _as_flat(op, plan.q),
            key,
            value,
            *([None, None, bias] if bias is not None else []),
            _domain=MHA[0],
            num_heads=plan.heads,
            scale=plan.scale,
        )
        if plan.nan_rows:  # MHA returns NaN for a row masked entirely by -inf; the graph zeroes it
            y = op.Where(op.IsNaN(y), _zero(op, plan.q.bnsh.dtype), y)
        return y, True


class _GroupQueryAttention(_AttentionRule):
    """``com.microsoft::GroupQueryAttention`` for repeated K/V heads without a cache.

    Q, K and V go in 3-D (K/V un-repeated), the mask as ``attention_bias`` with ``causal=0``,
    every key valid (``seqlens_k`` = T - 1). ORT 1.32's CPU kernel refuses batches > 1 with
    past context and several query tokens, so a cache stays with MultiHeadAttention: the
    query and key lengths must be proven equal.
    """

    def _adapt(self, plan: _Plan) -> None:
        k, v = plan.k, plan.v
        if plan.heads is None or k.repeat < 2 or k.repeat != v.repeat or k.heads != v.heads:
            raise NotFusable("K/V heads are not repeated to the query heads alike", k.bnsh)
        if k.heads is None or None in (plan.q.size, k.size, v.size):
            raise NotFusable("the K/V head count or a head size is not static", k.bnsh)
        if not plan.q.size == k.size == v.size:
            raise NotFusable("Q, K and V head sizes differ", v.bnsh)
        if not plan.dims.same(plan.q.dim(plan.dims, "L"), k.dim(plan.dims, "L")):
            raise NotFusable(
                "the key length is not provably the query length (a cache: GroupQueryAttention "
                "on CPU takes past context only for one batch row or one token)",
                k.bnsh,
            )
        plan.rotary = _absorbed_rotary(plan)

    def _emit(self, op, plan: _Plan, want_flat: bool) -> tuple[ir.Value, bool]:
        q, k = plan.rotary[:2] if plan.rotary else (plan.q, plan.k)
        query = _as_flat(op, q)
        key, value = _as_flat(op, k, repeated=False), _as_flat(op, plan.v, repeated=False)
        total = op.Cast(op.Squeeze(_slice_dim(op, key, 1)), to=ir.DataType.INT32)
        batch = _slice_dim(op, query, 0)
        seqlens = op.Expand(
            op.Sub(total, op.Constant(value=ir.tensor(np.array(1, np.int32)))), batch
        )
        bias = _bias(op, plan, rank=4)
        y, _, _ = op.GroupQueryAttention(
            query,
            key,
            value,
            None,
            None,
            seqlens,
            total,
            *(plan.rotary[2:] if plan.rotary else [None, None]),
            *([None, bias] if bias is not None else []),
            _domain=GQA[0],
            _outputs=3,
            num_heads=plan.heads,
            kv_num_heads=plan.k.heads,
            scale=plan.scale,
            causal=0,
            **({"do_rotary": 1} if plan.rotary else {}),
        )
        if plan.nan_rows:  # rows masked entirely by -inf are NaN, the graph zeroes them
            y = op.Where(op.IsNaN(y), _zero(op, plan.q.bnsh.dtype), y)
        return y, True


def _absorbed_rotary(plan: _Plan) -> tuple[Heads, Heads, ir.Value, ir.Value] | None:
    """Q and K before the rotary that GroupQueryAttention can apply itself (do_rotary), if so.

    Both must come (used nowhere else) from ``com.microsoft::RotaryEmbedding`` with position
    offset 0 (GroupQueryAttention rotates prompt token s by row s) and the same caches;
    ORT's CPU kernel rotates only head sizes that are multiples of 16.
    """
    nodes = [_plain_rotary(h.bnsh) for h in (plan.q, plan.k)]
    if None in nodes or plan.q.size is None or plan.q.size % 16:
        return None
    (rq, rk), dims = nodes, plan.dims
    if not all(_same_value(a, b) for a, b in zip(rq.inputs[2:4], rk.inputs[2:4], strict=True)):
        return None
    return ap.heads_of(rq.inputs[0], dims), ap.heads_of(rk.inputs[0], dims), *rq.inputs[2:4]


def _plain_rotary(value: ir.Value | None) -> ir.Node | None:
    """The ORT RotaryEmbedding making ``value`` (its one use), non-interleaved, offset 0."""
    node = value.producer() if value is not None else None
    if node is None or (node.domain, node.op_type) != ("com.microsoft", "RotaryEmbedding"):
        return None
    attrs = node.attributes
    plain = not any(attrs.get_int(a, 0) for a in ("interleaved", "rotary_embedding_dim"))
    offset = ap.numeric(node.inputs[1])
    if not plain or attrs.get_int("is_packed_batching", 0) or attrs.get_float("scale", 1.0) != 1:
        return None
    if offset is None or offset.size != 1 or int(offset.reshape(-1)[0]) != 0:
        return None
    return node if ap.single_use(value) and ap.rank(node.inputs[0]) == 4 else None


def _same_value(a: ir.Value, b: ir.Value, depth: int = 0) -> bool:
    """Whether two values are computed alike from the same inputs (or are equal constants)."""
    if a is b:
        return True
    x, y = (ir.convenience.get_const_tensor(v) for v in (a, b))
    if x is not None or y is not None:
        return x is not None and y is not None and _same_array(x.numpy(), y.numpy())
    na, nb = a.producer(), b.producer()
    if na is None or nb is None or depth > 8 or len(na.inputs) != len(nb.inputs):
        return False
    if (na.domain, na.op_type, na.outputs.index(a)) != (nb.domain, nb.op_type, nb.outputs.index(b)):
        return False
    if na.attributes.keys() != nb.attributes.keys() or not all(
        _same_attr(na.attributes[k].value, nb.attributes[k].value) for k in na.attributes
    ):
        return False
    return all(
        (u is None and w is None)
        or (u is not None and w is not None and _same_value(u, w, depth + 1))
        for u, w in zip(na.inputs, nb.inputs, strict=True)
    )


def _same_attr(a, b) -> bool:
    if hasattr(a, "numpy") and hasattr(b, "numpy"):
        return _same_array(a.numpy(), b.numpy())
    return a == b


def _same_array(x: np.ndarray, y: np.ndarray) -> bool:
    return x.dtype == y.dtype and x.shape == y.shape and np.array_equal(x, y)


class _Attention23(_AttentionRule):
    """ONNX ``Attention`` (opset 23): 3-D with q/kv_num_heads, else 4-D; GQA without repeats."""

    def _adapt(self, plan: _Plan) -> None:
        plan.causal = _take_causal(plan)
        for step in plan.steps:
            if step.kind in ("fill", "add") and _fills_lowest(step.operand):
                _tame(step)

    def _emit(self, op, plan: _Plan, want_flat: bool) -> tuple[ir.Value, bool]:
        repeat = plan.k.repeat if plan.k.repeat == plan.v.repeat else 1
        bias = _bias(op, plan, rank=2)
        mask = [bias] if bias is not None else []
        attrs = {"scale": plan.scale, **({"is_causal": 1} if plan.causal else {})}
        kv_heads = plan.k.heads if plan.k.heads == plan.v.heads else None
        if (
            want_flat
            and plan.heads
            and kv_heads
            and _flat_kv(plan, repeat)
            and plan.q.flat is not None
        ):
            y = op.Attention(
                _as_flat(op, plan.q),
                _as_flat(op, plan.k, repeated=repeat == 1),
                _as_flat(op, plan.v, repeated=repeat == 1),
                *mask,
                q_num_heads=plan.heads,
                kv_num_heads=plan.k.heads,
                **attrs,
            )
            return y, True
        y = op.Attention(
            _as_bnsh(op, plan.q),
            _as_bnsh(op, plan.k, repeated=repeat == 1),
            _as_bnsh(op, plan.v, repeated=repeat == 1),
            *mask,
            **attrs,
        )
        return y, False


# --- analysis ----------------------------------------------------------------------------------


def _analyze(model, scores, v, probs, ctx, guard, zero) -> _Plan:
    softmax = probs.producer()
    if ap.rank(scores) != 4:
        raise NotFusable("the scores are not 4-D [batch, heads, seq, total_seq]", scores)
    opset = model.opset_imports.get("", 1)
    axis = ap.int_attr(softmax, "axis", -1 if opset >= 13 else 1)
    if axis not in (-1, 3):
        raise NotFusable(f"Softmax is over axis {axis}, not the last one", softmax)
    users = {node for node, _ in probs.uses()}
    if probs.is_graph_output() or len(users) != (2 if guard else 1):
        raise NotFusable("the attention probabilities are also used elsewhere", probs)
    if guard and (
        zero is None or ap.scalar(zero) != 0.0 or not ap.single_use(ctx.producer().inputs[0])
    ):
        raise NotFusable("the NaN guard after Softmax does not write zeros", softmax)
    dims = Dims()
    found = ap.scores_of(scores, lambda mm: dims.same(dims.ref(mm.inputs[1], 0), dims.ref(v, 0)))
    q_raw, q_factor = ap.peel_scale(found.qk.inputs[0])
    if ap.rank(q_raw) != 4:
        raise NotFusable("Q is not 4-D [batch, heads, seq, head_size]", q_raw)
    q = ap.heads_of(q_raw, dims)
    k, k_factor = _key_heads(found.qk.inputs[1], dims)
    v_heads = ap.heads_of(v, dims)
    scale = q_factor * k_factor * math.prod(s.factor for s in found.steps if s.kind == "scale")
    plan = _Plan(q, k, v_heads, None, float(np.float32(scale)), found.steps, dims, opset)
    plan.heads = _head_count(plan)
    dims.union(k.dim(dims, "L"), v_heads.dim(dims, "L"))  # the contracted axis of probs @ V
    if q.size is not None and k.size is not None and q.size != k.size:
        raise NotFusable(f"Q and K head sizes differ ({q.size} vs {k.size})", found.qk)
    dims.bind(ctx, [q.dim(dims, "B"), plan.heads, q.dim(dims, "L"), v_heads.size])
    plan.reads = [read for heads in (q, k, v_heads) for read in _projection_reads(heads)]
    return plan


def _projection_reads(heads: Heads) -> list[_ShapeRead]:
    """Shape reads of Q/K/V in head layout, to take from the 3-D projection (which stays)."""
    if heads.flat is None or heads.heads is None or heads.size is None:
        return []
    return [
        _ShapeRead(node, heads.flat, form, heads.heads, heads.size)
        for form in ("bnsh", "bsnd")
        if getattr(heads, form) is not None
        for node, _ in getattr(heads, form).uses()
        if node.op_type == "Shape"
    ]


def _key_heads(kt: ir.Value, dims: Dims) -> tuple[Heads, float]:
    """K from Kᵀ ``[B, N, D, T]``: a Transpose of K, of ``[B, T, N, D]``, or via 3-D Reshapes."""
    kt, factor = ap.peel_scale(kt)
    node = ap.producer(kt, "Transpose", "Reshape")
    perm = ap.ints_attr(node, "perm") if node is not None and node.op_type == "Transpose" else None
    if perm == [0, 1, 3, 2]:
        k4, f = ap.peel_scale(node.inputs[0])
        return ap.heads_of(k4, dims), factor * f
    if perm == [0, 2, 3, 1]:
        bsnd, f = ap.peel_scale(node.inputs[0])
        heads = Heads(bsnd=bsnd, heads=dims.static(dims.ref(bsnd, 2)))
        heads.size = dims.static(dims.ref(bsnd, 3))
        split = ap.split_heads(bsnd, dims)
        if split is not None:
            heads.flat, heads.heads, heads.size = split
        return heads, factor * f
    k4 = _transposed_via_3d(node, dims) if node is not None else None
    if k4 is None:
        raise NotFusable("Kᵀ is not a transpose of K the pass recognizes", kt)
    k4, f = ap.peel_scale(k4)
    return ap.heads_of(k4, dims), factor * f


def _transposed_via_3d(node: ir.Node, dims: Dims) -> ir.Value | None:
    """``Reshape(Transpose(Reshape(k, [-1, T, D]), [0, 2, 1]), [B, N, D, T])``: k."""
    transpose = ap.producer(node.inputs[0], "Transpose")
    inner = ap.producer(transpose.inputs[0] if transpose else None, "Reshape")
    if inner is None or ap.ints_attr(transpose, "perm") != [0, 2, 1]:
        return None
    k4 = inner.inputs[0]
    first, second = ap.reshape_targets(inner, dims), ap.reshape_targets(node, dims)
    if ap.rank(k4) != 4 or first is None or second is None or len(first) != 3:
        return None
    wanted = [(first[1], 2), (first[2], 3), *zip(second, (0, 1, 3, 2), strict=False)]
    if len(second) != 4 or not all(dims.same(a, dims.ref(k4, i)) for a, i in wanted):
        return None
    return k4


def _head_count(plan: _Plan) -> int | None:
    """Query heads; K/V must have as many (after their repeat), or one (broadcast)."""
    count = plan.q.heads
    for h in (plan.k, plan.v):
        if h.heads is None:
            continue
        if count is None:
            count = h.heads * h.repeat
        elif h.heads == 1 and h.repeat == 1 and count != 1:
            plan.kv_broadcast = True
        elif h.heads * h.repeat != count:
            raise NotFusable(f"Q has {count} heads, K or V {h.heads * h.repeat}", h.bnsh)
    plan.dims.union(plan.q.dim(plan.dims, "N"), count)
    return count


def _take_causal(plan: _Plan) -> bool:
    """Drop an added causal mask built from Trilu when S == T; Attention-23 says is_causal."""
    seq, total = plan.q.dim(plan.dims, "L"), plan.k.dim(plan.dims, "L")
    if not plan.dims.same(seq, total):
        return False
    for i, step in enumerate(plan.steps):
        later = [s.factor for s in plan.steps[i + 1 :] if s.kind == "scale"]
        if step.kind == "add" and min(later, default=1) > 0 and _is_causal(step.operand, plan):
            del plan.steps[i]
            return True
    return False


def _is_causal(value: ir.Value, plan: _Plan) -> bool:
    """``Where(Equal(Trilu(ones[S, S], upper=0), 0), -inf or lowest, 0)``."""
    where = ap.producer(value, "Where")
    equal = ap.producer(where.inputs[0] if where else None, "Equal")
    trilu = ap.producer(equal.inputs[0] if equal else None, "Trilu")
    if trilu is None or ap.int_attr(trilu, "upper", 1) != 0 or len(trilu.inputs) > 1:
        return False
    fill = ap.scalar(where.inputs[1])
    if ap.scalar(where.inputs[2]) != 0.0 or ap.scalar(equal.inputs[1]) != 0.0 or fill is None:
        return False
    if fill != -math.inf and fill > float(np.finfo(np.float32).min):
        return False
    ones = ap.producer(trilu.inputs[0], "Expand")
    if ones is None or ap.scalar(ones.inputs[0]) != 1.0:
        return False
    shape = ap.shape_vector(ones.inputs[1], plan.dims)
    seq = plan.q.dim(plan.dims, "L")
    return shape is not None and len(shape) == 2 and all(plan.dims.same(s, seq) for s in shape)


def _check_bias(plan: _Plan) -> None:
    """Rank of the additive terms, and whether their last two axes are already [S, T]."""
    parts = [s.operand for s in plan.steps if s.kind in ("add", "fill")]
    parts += [s.cond for s in plan.steps if s.kind == "fill"]
    ranks = [ap.rank(p) for p in parts]
    if None in ranks:
        raise NotFusable("the rank of an additive mask is unknown (run infer-shapes)", plan.q.bnsh)
    plan.bias_rank = max(ranks, default=0)
    if plan.bias_rank > 4:
        raise NotFusable("an additive mask has more than 4 dims", plan.q.bnsh)
    wanted = (plan.q.dim(plan.dims, "L"), plan.k.dim(plan.dims, "L"))
    for axis, atom in zip((-2, -1), wanted, strict=True):
        size = ap.broadcast_dim([ap.trailing_dim(p, axis, plan.dims) for p in parts], plan.dims)
        plan.bias_fits = plan.bias_fits and plan.dims.same(size, atom)


_TAME_FILL = -1e38  # masks like the lowest float (exp underflows to 0), sums never reach it


def _tame(step: Step) -> None:
    """Mark a mask filled with the lowest float to be rebuilt with ``_TAME_FILL``.

    ONNX Runtime's Attention returns zeros for a query row whose every score is the lowest
    float, where the graph averages V (the spec zeroes only -inf rows). With -1e38 the
    softmax is the graph's for scores below 1e30 in magnitude: masked keys get probability
    0, and a row masked entirely stays uniform.
    """
    where = step.operand if step.kind == "fill" else ap.producer(step.operand, "Where")
    branches = [step.operand] if step.kind == "fill" else (where.inputs[1:] if where else [])
    lowest = [_is_lowest(v) for v in branches]
    if (
        step.operand.dtype != ir.DataType.FLOAT
        or not any(lowest)
        or any(_fills_lowest(v) for v, low in zip(branches, lowest, strict=True) if not low)
    ):
        raise NotFusable(
            "the mask fills with the lowest float and cannot be rebuilt: ONNX Runtime's "
            "Attention returns zeros for a row masked entirely so, the graph the mean of V",
            step.node,
        )
    step.tamed = True


def _is_lowest(value: ir.Value) -> bool:
    number = ap.scalar(value)
    return number is not None and number <= float(np.finfo(np.float32).min)


def _fills_lowest(value: ir.Value, depth: int = 0) -> bool:
    """Whether ``value`` is, or selects with Where from, the lowest finite float."""
    number = ap.scalar(value)
    if number is not None:
        return number <= float(np.finfo(np.float32).min) or (
            value.dtype == ir.DataType.FLOAT16 and number <= -65504.0
        )
    where = ap.producer(value, "Where")
    return (
        where is not None
        and depth < 4
        and any(_fills_lowest(v, depth + 1) for v in where.inputs[1:])
    )


def _may_mask_rows(plan: _Plan) -> bool:
    if plan.causal:
        return True
    for step in plan.steps:
        if step.kind == "add" and ap.may_be_neg_inf(step.operand):
            return True
        if step.kind == "fill" and ap.scalar(step.operand) == -math.inf:
            return True
    return False


def _merged_output(plan: _Plan, ctx: ir.Value, bound: dict) -> ir.Value | None:
    """For ``Reshape(Transpose(ctx))``: None when it is [B, S, N*Dv], else the shape to keep."""
    found = _merge_after(plan, ctx)
    if found is None:
        raise NotFusable("the head merge after it cannot be taken over exactly", ctx)
    nodes = [bound.get("ctx_r"), bound["ctx_t"], bound["merged"]]
    chain = {v.producer() for v in nodes if v is not None}
    sinks = chain if found.shape is None else chain - {bound["merged"].producer()}
    for value in [ctx] + [v for v in nodes[:2] if v is not None]:
        users = [n for n, _ in value.uses() if n.op_type != "Shape"]
        if value.is_graph_output() or len(users) != 1 or users[0] not in chain:
            raise NotFusable("the attention output is also used before its heads are merged", value)
        for node, _ in value.uses():
            if node.op_type == "Shape" and not _feeds_only(node.outputs[0], sinks):
                if plan.heads is None or plan.v.size is None:
                    raise NotFusable("the attention output's shape is read, heads unknown", node)
                want = "bsnd" if value is bound["ctx_t"] else "bnsh"
                plan.reads.append(_ShapeRead(node, None, want, plan.heads, plan.v.size))
    return found.shape


@dataclasses.dataclass
class _Merge:
    shape: ir.Value | None  # None: the merge gives [B, S, N*Dv]; else its target, to keep


def _merge_after(plan: _Plan, ctx: ir.Value) -> _Merge | None:
    """Follow ctx through an optional no-op Reshape and Transpose(0, 2, 1, 3) to a Reshape.

    The fused op's output ``[B, S, N*Dv]`` holds the elements of ``Transpose(ctx)`` in the
    same order, so the merging Reshape either is proven to give that shape (and goes), or
    is applied to the fused output with its own target, when no entry past the second
    copies an input dim (0 without allowzero).
    """
    dims, value = plan.dims, ctx
    node = _only_user(value, "Reshape")
    if node is not None and ap.reshape_keeps(node, dims, [(0, 0), (2, 2), (3, 3)], 4):
        value = node.outputs[0]
        dims.bind(value, [dims.ref(ctx, i) for i in range(4)])
    transpose = _only_user(value, "Transpose")
    if transpose is None or ap.ints_attr(transpose, "perm") != _BSND:
        return None
    heads_last = transpose.outputs[0]
    dims.bind(heads_last, [dims.ref(ctx, i) for i in (0, 2, 1, 3)])
    merge = _only_user(heads_last, "Reshape")
    if merge is None:
        return None
    if ap.reshape_keeps(merge, dims, [(0, 0), (1, 1)], 3):
        return _Merge(None)
    target = ap.shape_vector(merge.inputs[1], dims)
    if target is None:
        return None
    if ap.int_attr(merge, "allowzero", 0) == 0 and any(e in (0, None) for e in target[2:]):
        return None
    return _Merge(merge.inputs[1])


def _only_user(value: ir.Value, op_type: str) -> ir.Node | None:
    """The one consumer of ``value`` other than Shape reads, if it is an ``op_type``."""
    users = [node for node, _ in value.uses() if node.op_type != "Shape"]
    return users[0] if len(users) == 1 and users[0].op_type == op_type else None


def _feeds_only(value: ir.Value, sinks: set[ir.Node], depth: int = 0) -> bool:
    """Every use of ``value`` is a sink, or shape arithmetic whose results feed only sinks."""
    for node, _ in value.uses():
        if node in sinks:
            continue
        if depth > 8 or node.op_type not in ap.SHAPE_OPS:
            return False
        if not all(_feeds_only(out, sinks, depth + 1) for out in node.outputs):
            return False
        if any(out.is_graph_output() for out in node.outputs):
            return False
    return True


# --- emission ----------------------------------------------------------------------------------


def _ints(op, values: list[int]) -> ir.Value:
    return op.Constant(value=ir.tensor(np.array(values, np.int64)))


def _zero(op, dtype: ir.DataType) -> ir.Value:
    return op.Constant(value=ir.tensor(np.array(0, dtype.numpy())))


def _flat_kv(plan: _Plan, repeat: int = 1) -> bool:
    """K and V both 3-D projections (not repeated, unless the op repeats them itself)."""
    return all(h.flat is not None and h.repeat == repeat for h in (plan.k, plan.v))


def _as_flat(op, heads: Heads, repeated: bool = True) -> ir.Value:
    if heads.flat is not None and (heads.repeat == 1 or not repeated):
        if heads.flat_add is not None:
            return op.Add(heads.flat, op.Reshape(heads.flat_add, _ints(op, [-1])))
        return heads.flat
    if heads.bsnd is not None and (heads.repeat == 1 or not repeated):
        return op.Reshape(heads.bsnd, _ints(op, [0, 0, -1]))
    return op.Reshape(
        op.Transpose(_as_bnsh(op, heads, repeated), perm=_BSND), _ints(op, [0, 0, -1])
    )


def _as_bnsh(op, heads: Heads, repeated: bool = True) -> ir.Value:
    if repeated and heads.repeat > 1:
        return heads.repeated
    if heads.bnsh is not None:
        return heads.bnsh
    return op.Transpose(heads.bsnd, perm=_BSND)


def _bias(op, plan: _Plan, rank: int) -> ir.Value | None:
    """The additive terms as one tensor ``[.., S, T]`` of at least ``rank`` dims."""
    bias = None
    for step in plan.steps:
        if step.kind == "scale" and bias is not None:
            bias = (op.Mul if step.node.op_type == "Mul" else op.Div)(bias, step.operand)
        elif step.kind == "add":
            term = _tamed(op, step.operand) if step.tamed else step.operand
            bias = term if bias is None else op.Add(bias, term)
        elif step.kind == "fill":
            base = bias if bias is not None else _zero(op, step.operand.dtype)
            fill = _tamed(op, step.operand) if step.tamed else step.operand
            bias = op.Where(step.cond, *((base, fill) if step.keep_if_true else (fill, base)))
    if bias is None:
        return None
    if not plan.bias_fits:
        seq = _slice_dim(op, *plan.q.seq_source())
        total = _slice_dim(op, *plan.k.seq_source())
        bias = op.Expand(bias, op.Concat(seq, total, axis=0))
    have = max(plan.bias_rank, 2 if not plan.bias_fits else 0)
    if have < rank:
        axes = list(range(rank - have))
        if plan.opset >= 13:
            bias = op.Unsqueeze(bias, _ints(op, axes))
        else:
            bias = op.Unsqueeze(bias, axes=axes)
    return bias


def _tamed(op, value: ir.Value) -> ir.Value:
    """``value`` (the lowest float, or a Where choosing it) with ``_TAME_FILL`` instead."""
    if _is_lowest(value):
        return op.Constant(value=ir.tensor(np.full(value.shape or (), _TAME_FILL, np.float32)))
    where = value.producer()
    branches = [_tamed(op, v) if _is_lowest(v) else v for v in where.inputs[1:]]
    return op.Where(where.inputs[0], *branches)


def _slice_dim(op, value: ir.Value, axis: int) -> ir.Value:
    return op.Slice(op.Shape(value), _ints(op, [axis]), _ints(op, [axis + 1]))


# --- the pass ----------------------------------------------------------------------------------


def _rules(cls: type[_AttentionRule], dtypes: frozenset[ir.DataType], pending: list) -> list:
    name = cls.__name__.strip("_")
    return [
        cls.rule(f"{name}-merged", merged=True, dtypes=dtypes, pending=pending),
        cls.rule(f"{name}-4d", merged=False, dtypes=dtypes, pending=pending),
    ]


def _reroute(model: ir.Model, pending: list) -> None:
    """Point the Shape reads of fused-away tensors at what stays (before dead nodes go)."""
    applied = False
    for y, layout, reads in pending:
        node = y.producer()
        if node is None or node.graph is not model.graph:
            continue  # traced only, never applied
        for read in reads:
            if read.node.graph is not model.graph:
                continue  # dead already
            value = read.node.inputs[0]
            if read.base is not None and any(n.op_type != "Shape" for n, _ in value.uses()):
                continue  # the head-layout tensor stays anyway: its Shape reads can stay too
            base, base_layout = (read.base, "flat") if read.base is not None else (y, layout)
            tape = ir.tape.Tape()
            vector = _shape_in_layout(tape, base, base_layout, read)
            anchor = base.producer()
            if anchor is not None and anchor.graph is model.graph:
                model.graph.insert_after(anchor, tape.nodes)
            else:
                model.graph.insert_before(read.node, tape.nodes)
            read.node.outputs[0].replace_all_uses_with(vector)
            applied = True
    if applied:
        model.graph.sort()


def _shape_in_layout(tape, base: ir.Value, layout: str, read: _ShapeRead) -> ir.Value:
    """``Shape`` of the tensor ``read`` names, from its ``base`` in ``layout``."""

    def const(values: list[int]) -> ir.Value:
        return tape.op("Constant", [], {"value": ir.tensor(np.array(values, np.int64))})

    def part(shape: ir.Value, start: int, end: int) -> ir.Value:
        return tape.op("Slice", [shape, const([start]), const([end])])

    shape = tape.op("Shape", [base])
    if layout == "flat":
        sizes = const([read.heads, read.size]) if read.want == "bsnd" else None
        parts = (
            [part(shape, 0, 2), sizes]
            if sizes is not None
            else [part(shape, 0, 1), const([read.heads]), part(shape, 1, 2), const([read.size])]
        )
        vector = tape.op("Concat", parts, {"axis": 0})
    elif read.want == "bsnd":
        vector = tape.op("Gather", [shape, const([0, 2, 1, 3])], {"axis": 0})
    else:
        vector = shape
    start, end = ap.int_attr(read.node, "start", 0), ap.int_attr(read.node, "end", 4)
    return vector if (start, end) in ((0, 4), (0, 2**62)) else part(vector, start, end)


_FLOATS = frozenset({ir.DataType.FLOAT, ir.DataType.FLOAT16, ir.DataType.BFLOAT16})


@register_pass
class FuseAttentionPass(FusionPass):
    """Fuse scaled-dot-product attention subgraphs into one attention op.

    Rules (alternatives of the fusion ``attention``: the first whose ops the target runs):
      0. ``GroupQueryAttention-merged`` / ``-4d`` (ORT targets with it, tried before rule 1 on
         each match): K/V heads repeated to the query heads (transformers' repeat_kv) and the
         key length proven the query length (no cache) become ``com.microsoft::
         GroupQueryAttention(q, k, v, seqlens_k=T-1, total_sequence_length=T, attention_bias=M',
         num_heads, kv_num_heads, scale=s, causal=0)`` with 3-D un-repeated k/v; Q and K
         from ORT's RotaryEmbedding (offset 0, the same caches, head size a multiple of 16,
         the CPU kernel's limit) go in before it, with the caches and ``do_rotary=1``. With a cache,
         ORT 1.32's CPU kernel refuses several query tokens for more than one batch row, so
         rule 1 takes it.
      1. ``MultiHeadAttention-merged`` / ``-4d`` (ORT targets, float32 on CPU):
         ``Softmax(s·(Q @ Kᵀ) + M) @ V``, with the head merge ``Reshape(Transpose(., 0213))``
         after it (merged) or not (4d), becomes ``com.microsoft::MultiHeadAttention(q, k, v,
         attention_bias=M', num_heads, scale=s)``: q 3-D; k/v the 3-D projections, else 4-D
         BNSH (after a cache Concat, rotary, or the repeat of grouped-query heads).
      2. ``Attention23-merged`` / ``-4d`` (opset >= 23): the same becomes ONNX ``Attention``,
         3-D with ``q_num_heads``/``kv_num_heads`` when Q, K and V are 3-D projections, else
         4-D; repeated K/V heads go in un-repeated (grouped-query attention); an added Trilu
         causal mask with S == T proven becomes ``is_causal``.

    Matched: any constant scalar scale (Div/Mul on the scores, Mul on Q and/or K or Kᵀ;
    ``scale`` is the product of the float32 constants, rounded to float32); Kᵀ as
    Transpose(K, 0132), Transpose([B,T,N,D], 0231) or Reshape/Transpose(0,2,1)/Reshape;
    Q/K/V taken back to their 3-D projections when a Reshape provably only splits the hidden
    axis (dims proven equal from inferred shapes and the graph's own shape arithmetic);
    a constant per-head bias on Q (Conformer's u) folded into the 3-D query. Masks: every
    additive term (key padding, causal, relative position) is summed outside the op, scaled
    when it was added before the scale, and expanded to [.., S, T] unless proven so;
    ``Where(c, scores, -inf or lowest)`` becomes the term ``Where(c, 0, fill)``. A KV cache
    Concat stays outside (present outputs untouched). Shape reads of fused-away tensors are
    recomputed from what stays, so the exporters' shape arithmetic does not keep them alive.

    NaN and masked rows, for finite inputs: the guard ``Where(IsNaN(p), 0, p)`` is dropped
    when no row can be masked entirely by -inf, else MultiHeadAttention's NaN rows are
    zeroed after it. Attention-23 zeroes rows masked entirely by -inf (its spec), also where
    an unguarded graph gives NaN; ORT's kernel also zeroes rows of the lowest float, so
    graph-built lowest fills are rebuilt as -1e38 (same softmax for scores below 1e30).

    Not fused: scores or probabilities used elsewhere; non-constant or per-head scales;
    fills that are not additive (not -inf or lowest); 3-D (bmm) attention; float16 for
    MultiHeadAttention/GroupQueryAttention on CPU. GroupQueryAttention's mask stays the
    additive ``attention_bias`` (``causal=0``, every key valid): its per-row key lengths
    (right padding) are not what an arbitrary additive mask reduces to.
    """

    name = "fuse-attention"

    def fusions(self, target: Target) -> list[Fusion]:
        cpu = "CPUExecutionProvider" in target.source or target.name == "ort-cpu"
        mha_types = frozenset({ir.DataType.FLOAT}) if cpu else _FLOATS
        a23_types = _FLOATS | {ir.DataType.DOUBLE}
        self._pending: list = []  # what the applied rewrites leave to ``after_fusions``
        hint = "; ONNX Attention needs a model at opset 23"
        gqa = _rules(_GroupQueryAttention, mha_types, self._pending)
        return [
            Fusion(
                "attention",
                gqa + _rules(_MultiHeadAttention, mha_types, self._pending),
                [MHA, GQA],
                anchors=("Softmax",),
                hint=hint,
            ),
            Fusion(
                "attention",
                _rules(_MultiHeadAttention, mha_types, self._pending),
                [MHA],
                anchors=("Softmax",),
                hint=hint,
            ),
            Fusion(
                "attention",
                _rules(_Attention23, a23_types, self._pending),
                [ATTENTION],
                anchors=("Softmax",),
                hint=hint,
            ),
        ]

    def after_fusions(self, model: ir.Model) -> None:
        _reroute(model, self._pending)
        self._pending.clear()
