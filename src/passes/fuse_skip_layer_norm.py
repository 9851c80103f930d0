"""Fuse a residual Add and the LayerNorm/RMSNorm after it into one skip-norm op."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
from onnxscript.rewriter import pattern

from onnxopt.fusion import Fusion, FusionPass
from onnxopt.passes.fuse_layer_norm import (
    new_initializer,
    rank_of,
    same_dim,
    same_shape,
)
from onnxopt.passes.fuse_rms_norm import RMS_VARIANTS, match_rms, rms_pattern, rms_variant_name
from onnxopt.registry import register_pass
from onnxopt.symbolic_shapes import min_parts
from onnxopt.targets import Target

_MS = "com.microsoft"
_SKIP_DTYPES = (ir.DataType.FLOAT, ir.DataType.FLOAT16, ir.DataType.BFLOAT16, ir.DataType.DOUBLE)
_REPLACES = "onnxopt.skip_norm.replaces"  # meta of a new sum output: the Add output it stands for


def residual_order(a: ir.Value, b: ir.Value) -> tuple[ir.Value, ir.Value] | str:
    """(input, skip) as the contrib ops take them, or why ``a + b`` does not fit them.

    ORT (checked on 1.32) wants a 2-D or 3-D input and a skip of the same shape, or, for a
    3-D input ``[B, S, H]``, a skip of shape ``[1, S, H]`` or ``[S, H]``; the sum output has
    the input's shape, so the operand with the full shape is the input. A skip row count
    ``Min(c, S)`` (c >= 2; BERT's position embeddings, a prefix of a c-row table) counts as
    ``S``: the Add fails unless they are equal (neither is 1 while they differ), and ORT's op
    then fails too (it checks the skip's last two dims against the input's).
    """
    for inp, skip in ((a, b), (b, a)):
        if inp.shape is None or skip.shape is None or len(inp.shape) not in (2, 3):
            continue
        lead, rows = list(skip.shape)[:-2], list(skip.shape)[-2:]
        if len(skip.shape) < 2 or not _rows_match(list(inp.shape)[-2:], rows):
            continue
        if len(skip.shape) == len(inp.shape) and same_shape(
            ir.Shape(list(inp.shape)[:-2]), ir.Shape(lead)
        ):
            return inp, skip
        broadcast = len(inp.shape) == 3 and len(skip.shape) in (2, 3)
        if broadcast and all(d == 1 for d in lead):
            return inp, skip
    return (
        f"the residual operands {a.name} {a.shape} and {b.name} {b.shape} are neither of one "
        "2-D/3-D shape nor a 3-D [B,S,H] with a [1,S,H] or [S,H] skip"
    )


def _rows_match(inp: list, skip: list) -> bool:
    """The last two dims agree: equal, or the skip's rows ``Min(c, S)`` for input rows ``S``."""
    if len(inp) != 2 or len(skip) != 2 or not same_dim(inp[1], skip[1]):
        return False
    if same_dim(inp[0], skip[0]):
        return True
    parts = min_parts(skip[0].value) if isinstance(skip[0], ir.SymbolicDim) else None
    rows = inp[0].value if isinstance(inp[0], ir.SymbolicDim) else None
    return parts is not None and rows is not None and parts[0] >= 2 and parts[1] == rows


def vector_problem(value: ir.Value | np.ndarray | None, x: ir.Value, what: str) -> str | None:
    """Why ``value`` is not a 1-D tensor of the hidden size of ``x`` in its dtype, if so."""
    if value is None:
        return None
    hidden = list(x.shape)[-1] if x.shape else None
    if isinstance(value, np.ndarray):
        name, shape, dtype = "constant", value.shape, ir.DataType.from_numpy(value.dtype)
    else:
        name, shape, dtype = value.name, value.shape, value.dtype
    if shape is None or len(shape) != 1 or hidden is None or not same_dim(shape[0], hidden):
        return f"the {what} {name} has shape {shape}, not [{hidden}] (1-D, hidden size)"
    if dtype != x.dtype:
        return f"the {what} {name} is {dtype}, the input {x.dtype}"
    return None


def read_elsewhere(value: ir.Value, nodes: set[ir.Node]) -> bool:
    """Whether a node outside ``nodes``, or the graph's outputs, read ``value``."""
    return value.is_graph_output() or any(use.node not in nodes for use in value.uses())


class _Skip(pattern.RewriteRuleClassBase):
    """The residual ``Add(a, b)`` (or ``Add(Add(a, bias), b)``) before a norm, the fused node.

    Matched nodes are not removed by the rewriter (``remove_nodes=False``): the sum may have
    other readers, which the pass then points at the fused op's ``input_skip_bias_sum``
    output (a multi-output pattern would do it too, but onnxscript matches those by trying
    every pair of nodes). What no one reads any more is removed after the rewrites.
    """

    op_type = ""

    def __init__(self, name: str, *, bias: tuple[bool, bool] | None = None) -> None:
        """``bias``: None, or whether the outer and the inner Add have their operands swapped
        (one rule per order: an alternative would bind the bias to the wrong operand)."""
        orders = "" if bias is None else "-" + "".join("ba"[int(x)] + "ab"[int(x)] for x in bias)
        super().__init__(("biased-" if bias else "") + name + orders, remove_nodes=False)
        self.bias = bias

    def residual(self, op, a, b, bias):
        if self.bias is None:
            return op.Add(a, b, _outputs=["sum"])
        outer, inner = self.bias
        biased = op.Add(bias, a) if inner else op.Add(a, bias)
        return op.Add(b, biased, _outputs=["sum"]) if outer else op.Add(biased, b, _outputs=["sum"])

    def prepare(self, context, vals: dict, params: dict, epsilon: float) -> pattern.MatchResult:
        """Check the residual, the 1-D parameters and the readers; keep what rewrite needs."""
        result = pattern.MatchResult()
        s, out = vals["sum"], vals["out"]
        nodes = set(context.nodes)
        inner = [v for n in nodes for v in n.outputs if v is not s and v is not out]
        shared = next((v for v in inner if read_elsewhere(v, nodes)), None)
        if shared is not None:
            return result.fail(f"{shared.name} is read outside the fused nodes", shared)
        order = residual_order(vals["a"], vals["b"])
        if isinstance(order, str):
            return result.fail(order, s)
        if s.dtype not in _SKIP_DTYPES:
            return result.fail(f"the residual sum is {s.dtype}", s)
        for what, value in params.items():
            problem = vector_problem(value, order[0], what)
            if problem:
                return result.fail(problem, value if isinstance(value, ir.Value) else s)
        sum_read = read_elsewhere(s, nodes)
        self._fused = (order, params, epsilon, out, s if sum_read else None)
        return result

    def rewrite(self, op, **_):
        order, params, epsilon, out, sum_read = self._fused
        inputs = list(order)
        for what, value in params.items():
            if isinstance(value, np.ndarray):
                value = new_initializer(op, value, out, what)
            inputs.append(value)
        while inputs[-1] is None:
            inputs.pop()
        outs = getattr(op, self.op_type)(
            *inputs, epsilon=epsilon, _domain=_MS, _outputs=4 if sum_read else 1
        )
        if sum_read is None:
            return outs
        outs[3].meta[_REPLACES] = sum_read  # its readers move over in ``expose_sums``
        return outs[0]


def expose_sums(model: ir.Model) -> None:
    """Point the other readers of each fused residual sum at the fused op's sum output."""
    moved: set[ir.Graph] = set()
    for node in model.graph.all_nodes():
        if node.domain == _MS and len(node.outputs) == 4:
            new, old = node.outputs[3], node.outputs[3].meta.pop(_REPLACES, None)
            if old is None:
                continue
            new.type, new.shape = old.type, old.shape
            new.name, old.name = old.name, f"{old.name}_unfused"  # a graph output keeps its name
            old.replace_all_uses_with(new, replace_graph_outputs=True)
            moved.add(node.graph)
    for graph in moved:
        graph.sort()  # a reader may sit before the norm the fused op replaced


def _norm_node_problem(node: ir.Node, s: ir.Value) -> str | None:
    """Why a LayerNormalization/RMSNormalization node is not a last-axis, float-stash norm."""
    axis, rank = node.attributes.get_int("axis", -1), rank_of(s)
    if axis != -1 and (rank is None or axis != rank - 1):
        return f"{node.op_type} normalizes from axis {axis}, not only the last axis"
    if node.attributes.get_int("stash_type", 1) != 1:
        return f"{node.op_type} has stash_type {node.attributes.get_int('stash_type')}, not float"
    if any(o.uses() or o.is_graph_output() for o in node.outputs[1:]):
        return f"{node.op_type}'s mean or inverse std dev output is used"
    return None


class _SkipLayerNorm(_Skip):
    """Add(a, b) [with a bias], then LayerNormalization over the last axis."""

    op_type = "SkipLayerNormalization"

    def pattern(self, op, a, b, bias, gamma):
        s = self.residual(op, a, b, bias)
        return op.LayerNormalization(s, gamma, _allow_other_inputs=True, _outputs=["out"])

    def check(self, context, **vals) -> pattern.MatchResult:
        node = vals["out"].producer()
        problem = _norm_node_problem(node, vals["sum"])
        if problem:
            return pattern.MatchResult().fail(problem, node)
        beta = node.inputs[2] if len(node.inputs) > 2 else None
        params = {"gamma": vals["gamma"], "beta": beta, "bias": vals["bias"]}
        epsilon = node.attributes.get_float("epsilon", 1e-5)
        return self.prepare(context, vals, params, epsilon)


class _SkipRmsNode(_Skip):
    """Add(a, b), then RMSNormalization over the last axis."""

    op_type = "SkipSimplifiedLayerNormalization"

    def pattern(self, op, a, b, gamma):
        return op.RMSNormalization(self.residual(op, a, b, None), gamma, _outputs=["out"])

    def check(self, context, **vals) -> pattern.MatchResult:
        node = vals["out"].producer()
        problem = _norm_node_problem(node, vals["sum"])
        if problem:
            return pattern.MatchResult().fail(problem, node)
        epsilon = node.attributes.get_float("epsilon", 1e-5)
        return self.prepare(context, vals, {"gamma": vals["gamma"]}, epsilon)


class _SkipRmsDecomposed(_Skip):
    """Add(a, b), then the decomposed RMS norm ``fuse-rms-norm`` matches (below opset 23)."""

    op_type = "SkipSimplifiedLayerNormalization"

    def __init__(self, variant: tuple[bool, bool, int]) -> None:
        super().__init__(f"decomposed-{rms_variant_name(variant)}")
        self.variant = variant

    def pattern(self, op, a, b, two, eps, one, scale):
        s = self.residual(op, a, b, None)
        xc = pattern.OrValue([op.Cast(s), s], name="xc")
        return rms_pattern(op, xc, two, eps, one, scale, self.variant)

    def check(self, context, **vals) -> pattern.MatchResult:
        norm = match_rms(vals, self.variant)
        if isinstance(norm, pattern.MatchResult):
            return norm
        if norm.x is not vals["sum"]:
            return pattern.MatchResult().fail("the statistics read a Cast of the sum", norm.x)
        if norm.axis != -1:
            return pattern.MatchResult().fail("the norm is not over the last axis only", norm.x)
        return self.prepare(context, vals, {"gamma": norm.scale}, norm.epsilon)


SKIP_LAYER_NORM_RULES = [
    _SkipLayerNorm.rule("residual", bias=(outer, inner))
    for outer in (False, True)
    for inner in (False, True)
] + [_SkipLayerNorm.rule("residual")]
SKIP_RMS_NORM_RULES = [_SkipRmsNode.rule("residual")]
SKIP_RMS_NORM_RULES += [_SkipRmsDecomposed.rule(v) for v in RMS_VARIANTS]


@register_pass
class FuseSkipLayerNormPass(FusionPass):
    """Fuse a residual Add and the LayerNorm/RMSNorm after it into one skip-norm op.

    Rules (ORT's contrib ops, so ort-cpu only; standard targets keep the Add and the norm):
      1. ``skip-layer-norm``: ``LayerNormalization(Add(a, b), gamma, beta)`` over the last axis
         becomes ``com.microsoft::SkipLayerNormalization(a, b, gamma, beta)``; with
         ``Add(Add(a, bias), b)`` (``bias`` 1-D of the hidden size) the bias becomes its 5th
         input.
      2. ``skip-simplified-layer-norm``: ``RMSNormalization(Add(a, b), gamma)``, or the
         decomposed RMS norm ``fuse-rms-norm`` matches (Llama's below opset 23, where no
         standard op holds it), becomes ``com.microsoft::SkipSimplifiedLayerNormalization``.
    When the sum has other readers (pre-LN models: GPT-2, Whisper, Llama) they read the fused
    op's 4th output ``input_skip_bias_sum`` instead. It holds when: the norm is over the last
    axis only with float statistics and its mean / inverse std dev outputs unused; ``a`` and
    ``b`` have one 2-D or 3-D shape, or one is ``[B, S, H]`` and the other ``[1, S, H]`` or
    ``[S, H]`` (what ORT's kernels accept; skip rows ``Min(c, S)`` count as ``S``, see
    ``residual_order``); gamma, beta and bias are 1-D of the hidden size
    and of the input's dtype; no other value of the fused nodes is read elsewhere.
    """

    name = "fuse-skip-layer-norm"

    def fusions(self, target: Target) -> list[Fusion]:
        return [
            Fusion(
                "skip-layer-norm",
                SKIP_LAYER_NORM_RULES,
                [(_MS, "SkipLayerNormalization")],
                anchors=["LayerNormalization"],
            ),
            Fusion(
                "skip-simplified-layer-norm",
                SKIP_RMS_NORM_RULES,
                [(_MS, "SkipSimplifiedLayerNormalization")],
                anchors=["ReduceMean", "RMSNormalization"],
            ),
        ]

    def after_fusions(self, model: ir.Model) -> None:
        expose_sums(model)
