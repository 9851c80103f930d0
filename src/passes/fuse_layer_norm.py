"""Fuse decomposed LayerNorm (ReduceMean/Sub/Pow/Sqrt/Div/Mul/Add) into LayerNormalization.

The helpers here (statistics, axes, affine parameters) are shared with ``fuse-rms-norm`` and
``fuse-skip-layer-norm``: the three passes match the same decompositions.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import numpy as np
import onnx_ir as ir
from onnxscript.rewriter import pattern

from onnxopt.fusion import Fusion, FusionPass
from onnxopt.registry import register_pass
from onnxopt.targets import Target

FLOAT, DOUBLE = ir.DataType.FLOAT, ir.DataType.DOUBLE
HALF = (ir.DataType.FLOAT16, ir.DataType.BFLOAT16)
LN_DTYPES = (FLOAT, *HALF)


@dataclasses.dataclass
class Norm:
    """A matched normalization, as the fused op takes it."""

    x: ir.Value
    axis: int  # the first normalized axis, negative (-1: the last axis only)
    epsilon: float
    scale: ir.Value | np.ndarray
    bias: ir.Value | np.ndarray | None
    out: ir.Value  # the value the fused op replaces

    def initializer(self, op, array_or_value, what: str) -> ir.Value:
        """A scale or bias as an op input; a new array becomes an initializer."""
        if isinstance(array_or_value, ir.Value):
            return array_or_value
        return new_initializer(op, array_or_value, self.out, what)


# --- helpers shared by the normalization fusions ---------------------------------------------


def new_initializer(op, array: np.ndarray, near: ir.Value, what: str) -> ir.Value:
    """An initializer named after ``near`` (a value of the graph), unique among initializers."""
    taken = near.graph.initializers if near.graph is not None else {}
    name, count = f"{near.name}_{what}", 0
    while name in taken:
        count += 1
        name = f"{near.name}_{what}{count}"
    return op.initializer(ir.tensor(array, name=name), name=name)


def const_array(value: ir.Value | None) -> np.ndarray | None:
    """The value's constant contents; None if it is computed or a (default-carrying) input."""
    if value is None or value.is_graph_input():
        return None
    tensor = ir.convenience.get_const_tensor(value)
    return None if tensor is None else tensor.numpy()


def scalar(value: ir.Value | None, rank: int | None) -> float | None:
    """A one-element constant that cannot widen a rank-``rank`` operand it is broadcast with."""
    array = const_array(value)
    if array is None or array.size != 1 or array.ndim > max(rank or 1, 1):
        return None
    return float(array.reshape(()))


def rank_of(value: ir.Value) -> int | None:
    return None if value.shape is None else len(value.shape)


def same_dim(a: int | ir.SymbolicDim, b: int | ir.SymbolicDim) -> bool:
    """Dims known to be equal: equal ints, or symbolic dims of the same (non-empty) name."""
    if isinstance(a, ir.SymbolicDim) or isinstance(b, ir.SymbolicDim):
        return (
            isinstance(a, ir.SymbolicDim)
            and isinstance(b, ir.SymbolicDim)
            and a.value is not None
            and a.value == b.value
        )
    return a == b


def same_shape(a: ir.Shape | None, b: ir.Shape | None) -> bool:
    return (
        a is not None
        and b is not None
        and len(a) == len(b)
        and all(same_dim(x, y) for x, y in zip(a, b, strict=True))
    )


def norm_axis(reduce: ir.Node, rank: int | None) -> int | str:
    """The first normalized axis (negative) of a ReduceMean over trailing axes, or why not."""
    if reduce.attributes.get_int("keepdims", 1) != 1:
        return f"ReduceMean '{reduce.name}' drops the reduced axes (keepdims=0)"
    axes = list(reduce.attributes.get_ints("axes", []))
    if len(reduce.inputs) > 1 and reduce.inputs[1] is not None:
        array = const_array(reduce.inputs[1])
        if array is None:
            return f"ReduceMean '{reduce.name}' reads its axes from a computed value"
        axes = [int(a) for a in array.reshape(-1)]
    if not axes:
        if reduce.attributes.get_int("noop_with_empty_axes", 0):
            return f"ReduceMean '{reduce.name}' has no axes and noop_with_empty_axes=1"
        return 0 if rank is None else -rank  # over every axis
    if rank is None and any(a >= 0 for a in axes):
        return f"ReduceMean axes {axes} are not negative and the input rank is unknown"
    trailing = sorted({a - rank if a >= 0 else a for a in axes} if rank else set(axes))
    if trailing != list(range(-len(trailing), 0)) or (rank and len(trailing) > rank):
        of = f" of a rank-{rank} input" if rank else ""
        return f"ReduceMean axes {axes} are not the trailing axes{of}"
    return -len(trailing)


def precision_problem(x: ir.Value, stats: ir.Value, dtypes: tuple[ir.DataType, ...]) -> str | None:
    """Why the fused op (statistics in float) would not compute what the graph does, if so."""
    if x.dtype not in dtypes:
        return f"the input {x.name} is {x.dtype}, not one of {', '.join(map(str, dtypes))}"
    if stats.dtype == FLOAT or (x.dtype in HALF and stats.dtype in (DOUBLE, x.dtype)):
        return None  # float: the same; for a half result float is as good as double, or better

    return f"statistics in {stats.dtype} for a {x.dtype} input; the fused op computes in float"


def uncast(xc: ir.Value, dtype: ir.DataType | None) -> ir.Value:
    """The input of a Cast from ``dtype`` (the result's type) that ``xc`` is; else ``xc``."""
    node = xc.producer()
    if (
        node is not None
        and (node.domain, node.op_type) == ("", "Cast")
        and xc.dtype != dtype
        and node.inputs[0] is not None
        and node.inputs[0].dtype == dtype
    ):
        return node.inputs[0]
    return xc


def affine(value: ir.Value, x: ir.Value, axis: int, what: str) -> ir.Value | np.ndarray | str:
    """``value`` as a LayerNormalization scale/bias (shape ``x.shape[axis:]``), or why it is not.

    A constant that broadcasts over the normalized axes only is reshaped and expanded to the
    normalized shape; a computed value must have exactly that shape.
    """
    if x.shape is None:
        return f"the shape of {x.name} is unknown"
    normalized = list(x.shape)[axis:]
    if value.dtype != x.dtype:
        return f"the {what} {value.name} is {value.dtype}, the input {x.dtype}"
    array = const_array(value)
    if array is None:
        if same_shape(value.shape, ir.Shape(normalized)):
            return value
        return (
            f"the {what} {value.name} is computed and its shape {value.shape} is not the "
            f"normalized shape {normalized}"
        )
    if not all(isinstance(d, int) for d in normalized):
        return f"the normalized dims {normalized} of {x.name} are not static"
    lead = array.shape[: max(0, array.ndim - len(normalized))]
    if array.ndim > len(x.shape) or any(d != 1 for d in lead):
        return f"the {what} shape {list(array.shape)} broadcasts over axes that are not normalized"
    try:
        full = np.broadcast_to(array.reshape(array.shape[len(lead) :]), normalized)
    except ValueError:
        return f"the {what} shape {list(array.shape)} does not broadcast to {normalized}"
    if list(array.shape) == normalized:
        return value
    return np.ascontiguousarray(full)


def ones(x: ir.Value, axis: int) -> np.ndarray | str:
    """A ones scale over the normalized axes of ``x``, or why it cannot be built."""
    normalized = [] if x.shape is None else list(x.shape)[axis:]
    if x.shape is None or not all(isinstance(d, int) for d in normalized):
        return f"the normalized dims of {x.name} are not static (a ones scale needs them)"
    return np.ones(normalized, dtype=x.dtype.numpy())


def longer_match(out: ir.Value, xc: ir.Value, axis: int, variant: tuple[bool, bool, int]):
    """The op after ``out`` that a longer variant fuses too (a Cast back, a scale, a bias)."""
    uses = out.uses()
    if len(uses) != 1 or out.is_graph_output() or uses[0].node.domain != "":
        return None
    node, index = uses[0].node, uses[0].idx
    has_scale, has_bias, last = variant
    if node.op_type == "Cast" and not (has_scale or has_bias or last == 0):
        to = node.attributes.get_int("to")
        return "Cast" if to is not None and uncast(xc, ir.DataType(to)) is not xc else None
    if has_bias or node.op_type not in (("Add",) if has_scale else ("Mul", "Add")):
        return None
    other = node.inputs[1 - index] if len(node.inputs) == 2 else None
    x = uncast(xc, out.dtype)
    valid = other is not None and not isinstance(affine(other, x, axis, "operand"), str)
    return node.op_type if valid else None


def stats_pattern(op, dc, two, eps):
    """ReduceMean(dc ** 2 | dc * dc) [+ eps], then Sqrt: the standard deviation (or RMS)."""
    square = pattern.OrValue([op.Pow(dc, two), op.Mul(dc, dc)])
    var = op.ReduceMean(square, _allow_other_inputs=True, _outputs=["var"])
    return op.Sqrt(pattern.OrValue([op.Add(var, eps), op.Add(eps, var), var]), _outputs=["std"])


def normalized_forms(op, dc, std, one, *, last: int | None = None, name: str | None = None):
    """``dc / std`` written as Div, or as Mul by Reciprocal(std) or by 1 / std (either order).

    With ``last`` set, only that form of the final node: ``0`` Div, ``1`` Mul(dc, inv),
    ``2`` Mul(inv, dc) (onnxscript cannot match an alternative as a pattern's last node).
    """

    def inv():
        return pattern.OrValue([op.Reciprocal(std), op.Div(one, std)])

    builders = [
        lambda **o: op.Div(dc, std, **o),
        lambda **o: op.Mul(dc, inv(), **o),
        lambda **o: op.Mul(inv(), dc, **o),
    ]
    if last is not None:
        return builders[last](_outputs=[name])
    return pattern.OrValue([b() for b in builders])


def norm_tail(op, dc, std, one, scale, bias, variant: tuple[bool, bool, int]):
    """The normalized value, optionally Cast back, then optionally ``* scale`` and ``+ bias``.

    ``variant`` is (has scale, has bias, form of the final node): for the affine forms the
    operand order (0: normalized first), else 0: Cast, 1-3: the ``normalized_forms``.
    """
    has_scale, has_bias, last = variant
    if not has_scale and not has_bias:
        if last == 0:
            return op.Cast(normalized_forms(op, dc, std, one), _outputs=["out"])
        return normalized_forms(op, dc, std, one, last=last - 1, name="out")
    n = normalized_forms(op, dc, std, one)
    y = pattern.OrValue([op.Cast(n), n])
    if has_scale and has_bias:
        y = pattern.OrValue([op.Mul(y, scale), op.Mul(scale, y)])
    param = bias if has_bias else scale
    binary = op.Add if has_bias else op.Mul
    return binary(param, y, _outputs=["out"]) if last else binary(y, param, _outputs=["out"])


def match_norm(
    vals: dict, variant: tuple[bool, bool, int], dtypes: tuple[ir.DataType, ...]
) -> Norm | pattern.MatchResult:
    """Check a matched decomposition (``xc``, ``var``, ``std``, ...): a Norm, or the failure."""
    result = pattern.MatchResult()
    xc, var, out = vals["xc"], vals["var"], vals["out"]
    x = uncast(xc, out.dtype)
    if x.dtype != out.dtype:
        return result.fail(f"the result is {out.dtype} but the input {x.name} is {x.dtype}", x)
    problem = precision_problem(x, var, dtypes)
    if problem:
        return result.fail(problem, var)
    rank = rank_of(x)
    axis = norm_axis(var.producer(), rank)
    if isinstance(axis, str):
        return result.fail(axis, var.producer())
    mean = vals.get("mean")
    mean_axis = axis if mean is None else norm_axis(mean.producer(), rank)
    if mean_axis != axis:
        reason = (
            mean_axis
            if isinstance(mean_axis, str)
            else "the mean and the variance reduce different axes"
        )
        return result.fail(reason, mean.producer())
    for name, expected in (("two", 2.0), ("one", 1.0)):
        if vals.get(name) is not None and scalar(vals[name], rank) != expected:
            return result.fail(
                f"expected the constant {expected}, found {vals[name].name}", vals[name]
            )
    epsilon = 0.0 if vals.get("eps") is None else scalar(vals["eps"], rank)
    if epsilon is None or epsilon < 0:
        return result.fail("epsilon is not a non-negative constant scalar", vals.get("eps"))
    has_scale, has_bias, _ = variant
    scale = affine(vals["scale"], x, axis, "scale") if has_scale else ones(x, axis)
    bias = affine(vals["bias"], x, axis, "bias") if has_bias else None
    for what, param in (("scale", scale), ("bias", bias)):
        if isinstance(param, str):
            return result.fail(param, x if vals.get(what) is None else vals[what])
    follower = longer_match(out, xc, axis, variant)
    if follower:
        return result.fail(f"the {follower} after it is fused with it, by a longer rule", out)
    return Norm(x, axis, epsilon, scale, bias, out)


def variant_name(variant: tuple[bool, bool, int]) -> str:
    has_scale, has_bias, last = variant
    if has_scale or has_bias:
        kind = "scale-bias" if has_scale and has_bias else "scale" if has_scale else "bias"
        return kind + ("-swapped" if last else "")
    return ("plain-cast", "plain-div", "plain-mul", "plain-mul-swapped")[last]


# Longest first: a rule also declines a match that a longer one takes (``longer_match``).
VARIANTS = [(True, True, 0), (True, True, 1), (True, False, 0), (True, False, 1)]
VARIANTS += [(False, True, 0), (False, True, 1)] + [(False, False, i) for i in range(4)]


# --- LayerNormalization ------------------------------------------------------------------------


class NormRule(pattern.RewriteRuleClassBase):
    """A decomposed norm of one ``variant``; ``check`` keeps the matched Norm for ``rewrite``."""

    dtypes: ClassVar[tuple[ir.DataType, ...]] = ()

    def __init__(self, variant: tuple[bool, bool, int], name: str) -> None:
        super().__init__(name)
        self.variant = variant

    def check(self, context, **vals) -> pattern.MatchResult:
        norm = match_norm(vals, self.variant, self.dtypes)
        if isinstance(norm, pattern.MatchResult):
            return norm
        self._norm = norm
        return pattern.MatchResult()


class _LayerNorm(NormRule):
    """mean, x - mean, its variance, normalized, [Cast back], [* scale], [+ bias]."""

    dtypes = LN_DTYPES

    def __init__(self, variant: tuple[bool, bool, int]) -> None:
        super().__init__(variant, variant_name(variant))

    def pattern(self, op, xc, two, eps, one, scale, bias):
        mean = op.ReduceMean(xc, _allow_other_inputs=True, _outputs=["mean"])
        d = op.Sub(xc, mean)
        dc = pattern.OrValue([op.Cast(d), d])
        std = stats_pattern(op, dc, two, eps)
        return norm_tail(op, dc, std, one, scale, bias, self.variant)

    def rewrite(self, op, **_):
        n = self._norm
        inputs = [n.x, n.initializer(op, n.scale, "scale")]
        if n.bias is not None:
            inputs.append(n.initializer(op, n.bias, "bias"))
        return op.LayerNormalization(*inputs, axis=n.axis, epsilon=n.epsilon, stash_type=1)


LAYER_NORM_RULES = [_LayerNorm.rule(v) for v in VARIANTS]


@register_pass
class FuseLayerNormPass(FusionPass):
    """Fuse decomposed LayerNorm (ReduceMean/Sub/Pow/Sqrt/Div/Mul/Add) into LayerNormalization.

    Rule ``layer-norm`` (one firing per norm; variants by the ops after the statistics):
      ``mean = ReduceMean(x)``, ``d = x - mean`` (optionally Cast), ``var = ReduceMean(d ** 2 |
      d * d)``, ``std = Sqrt(var [+ eps])``, ``d / std`` (or ``d * Reciprocal(std)`` or
      ``d * (1 / std)``), optionally Cast back, ``* scale``, ``+ bias`` becomes
      ``LayerNormalization(x, scale, bias, axis, epsilon, stash_type=1)``.
    It holds when: both ReduceMeans keep dims and reduce the same trailing axes (attribute or
    input), ``eps`` and the exponent 2 are constants, scale and bias are constants broadcasting
    over the normalized axes only (or computed values of exactly the normalized shape), the
    input is float/float16/bfloat16 and the statistics are in float (or, for a half input, in
    double or the half type: float statistics are then at least as precise). A Cast widening a
    half input for the statistics is looked through; without a scale a ones scale is created.
    Targets: every one with LayerNormalization-17 (ort-cpu, onnx-17+); below opset 17 nothing.
    """

    name = "fuse-layer-norm"

    def fusions(self, target: Target) -> list[Fusion]:
        anchors = ["ReduceMean"]
        return [
            Fusion("layer-norm", LAYER_NORM_RULES, [("", "LayerNormalization")], False, anchors)
        ]
