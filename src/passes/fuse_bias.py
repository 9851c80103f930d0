"""Fold bias Adds into Gemm or into the bias inputs of fused ops."""

from __future__ import annotations

from typing import Literal

import onnx_ir as ir
from onnxscript.rewriter import pattern

from onnxopt.fusion import Fusion, FusionPass
from onnxopt.registry import register_pass
from onnxopt.targets import Target

MS = "com.microsoft"
_FLOATS = frozenset({ir.DataType.FLOAT, ir.DataType.DOUBLE, ir.DataType.FLOAT16})
_SKIP_NORM_BIAS = {"SkipLayerNormalization": 4, "SkipSimplifiedLayerNormalization": 3}


def constant(value: ir.Value | None) -> ir.TensorProtocol | None:
    """The value's tensor if it is constant: an initializer no input overrides, or a Constant."""
    if value is None or value.is_graph_input():
        return None
    return ir.convenience.get_const_tensor(value)


def bias_mismatch(mm: ir.Value, b: ir.Value) -> str | None:
    """Why ``b`` is not a bias of the MatMul output ``mm`` (None when it is).

    A bias is a 1-D constant with one element per column of ``mm``: adding it leaves the shape of
    ``mm`` as it is, which is what every fused op's bias input computes.
    """
    producer = mm.producer()
    if producer is None or producer.op_type != "MatMul" or producer.domain not in ("", "ai.onnx"):
        source = "a graph input" if producer is None else f"a {producer.op_type}"
        return f"the biased value '{mm.name}' comes from {source}, not from a MatMul"
    tensor = constant(b)
    if tensor is None:
        return f"the bias '{b.name}' is not a constant"
    if len(tensor.shape) != 1:
        return f"the bias '{b.name}' has shape {list(tensor.shape)}, not 1-D"
    columns = _last_dim(mm, producer)
    if columns is None:
        return f"the last dimension of the MatMul output '{mm.name}' is unknown"
    if tensor.shape[0] != columns:
        return f"the bias has {tensor.shape[0]} elements, the MatMul output {columns} columns"
    return None


def _last_dim(mm: ir.Value, matmul: ir.Node) -> int | None:
    """The number of columns of a MatMul output, from its shape or else from its weight's."""
    last = mm.shape[-1] if mm.shape is not None and len(mm.shape) else None
    if isinstance(last, int):
        return last
    w = matmul.inputs[1]
    if w is not None and w.shape is not None and len(w.shape) >= 2:
        return w.shape[-1] if isinstance(w.shape[-1], int) else None
    return None


class BiasIntoGelu(pattern.RewriteRuleClassBase):
    """Gelu(MatMul(x, W) + b), exact form, b a bias -> com.microsoft::BiasGelu(MatMul(x, W), b)."""

    def __init__(self, name: str, *, domain: str) -> None:
        super().__init__(name)
        self.domain = domain

    def pattern(self, op, mm, b):
        return op.Gelu(op.Add(mm, b), _domain=self.domain, _outputs=["gelu"])

    def check(self, context, mm, b, gelu, **_) -> pattern.MatchResult:
        result = pattern.MatchResult()
        approximate = gelu.producer().attributes.get_string("approximate", "none")
        if approximate != "none":
            return result.fail(f"the Gelu has approximate='{approximate}'; BiasGelu is exact", gelu)
        if reason := bias_mismatch(mm, b):
            return result.fail(reason, b)
        return result

    def rewrite(self, op, mm, b, **_):
        return op.BiasGelu(mm, b, _domain=MS)


class BiasIntoFastGelu(pattern.RewriteRuleClassBase):
    """FastGelu or Gelu(tanh) of MatMul(x, W) + b -> com.microsoft::FastGelu(MatMul(x, W), b)."""

    def __init__(self, name: str, *, source: Literal["FastGelu", "Gelu"]) -> None:
        super().__init__(name)
        self.source = source

    def pattern(self, op, mm, b):
        added = op.Add(mm, b)
        if self.source == "FastGelu":
            return op.FastGelu(added, _domain=MS, _allow_other_inputs=True, _outputs=["gelu"])
        return op.Gelu(added, _outputs=["gelu"])

    def check(self, context, mm, b, gelu, **_) -> pattern.MatchResult:
        result = pattern.MatchResult()
        node = gelu.producer()
        if self.source == "FastGelu" and len(node.inputs) > 1 and node.inputs[1] is not None:
            return result.fail(f"the FastGelu already has the bias '{node.inputs[1].name}'", gelu)
        approximate = node.attributes.get_string("approximate", "none")
        if self.source == "Gelu" and approximate != "tanh":
            return result.fail(f"the Gelu has approximate='{approximate}', not 'tanh'", gelu)
        if reason := bias_mismatch(mm, b):
            return result.fail(reason, b)
        return result

    def rewrite(self, op, mm, b, **_):
        return op.FastGelu(mm, b, _domain=MS)


class BiasIntoSkipNorm(pattern.RewriteRuleClassBase):
    """SkipNorm(MatMul(x, W) + b, skip, ...) without a bias -> SkipNorm(MatMul(x, W), skip, ..., b).

    The skip-norm adds input, skip and bias before normalizing, so the Add may sit on either of
    its first two inputs. One rule per number of outputs the node has, all kept (the last one,
    the sum, may feed the next residual).
    """

    def __init__(self, name: str, *, op_type: str, position: int, outputs: int) -> None:
        super().__init__(name)
        self.op_type, self.position, self.outputs = op_type, position, outputs
        self.bias_index = _SKIP_NORM_BIAS[op_type]

    def pattern(self, op, mm, b, other):
        added = op.Add(mm, b)
        inputs = (added, other) if self.position == 0 else (other, added)
        names = [f"out{i}" for i in range(self.outputs)]
        make = getattr(op, self.op_type)
        return make(*inputs, _domain=MS, _allow_other_inputs=True, _outputs=names)

    def check(self, context, mm, b, out0, **_) -> pattern.MatchResult:
        result = pattern.MatchResult()
        node = out0.producer()
        if len(node.outputs) != self.outputs:  # onnxscript lets one with fewer outputs through
            return result.fail(f"the node has {len(node.outputs)} outputs, not {self.outputs}")
        inputs = node.inputs
        if len(inputs) > self.bias_index and inputs[self.bias_index] is not None:
            bias = inputs[self.bias_index].name
            return result.fail(f"the {self.op_type} already has the bias '{bias}'", out0)
        if reason := bias_mismatch(mm, b):
            return result.fail(reason, b)
        return result

    def rewrite(self, op, mm, b, out0, **_):
        node = out0.producer()
        inputs = list(node.inputs) + [None] * (self.bias_index + 1 - len(node.inputs))
        inputs[self.position], inputs[self.bias_index] = mm, b
        make = getattr(op, self.op_type)
        outputs = {"_outputs": self.outputs} if self.outputs > 1 else {}
        return make(*inputs, _domain=MS, **outputs, **node.attributes)


class MatMulAddToGemm(pattern.RewriteRuleClassBase):
    """MatMul(x, W) + c, x and W 2-D, c broadcasting to the product's shape -> Gemm(x, W, c)."""

    def pattern(self, op, x, w, c):
        return op.Add(op.MatMul(x, w), c)

    def check(self, context, x, w, c, **_) -> pattern.MatchResult:
        result = pattern.MatchResult()
        for value, role in ((x, "the MatMul input"), (w, "the MatMul weight")):
            if value.shape is None or len(value.shape) != 2:
                rank = "unknown" if value.shape is None else len(value.shape)
                return result.fail(f"{role} '{value.name}' has rank {rank}, Gemm needs 2", value)
        dtype = x.dtype or w.dtype
        floats = _FLOATS | ({ir.DataType.BFLOAT16} if _opset(context) >= 13 else set())
        if dtype not in floats:
            return result.fail(f"the MatMul is {dtype}; Gemm is fused for float types only", x)
        product = (x.shape[0], w.shape[1])
        if c.shape is None or not _broadcasts_to(c.shape, product):
            shape = "unknown" if c.shape is None else _dims(c.shape)
            return result.fail(
                f"the added '{c.name}' of shape {shape} does not broadcast to "
                f"the product's shape {_dims(product)}",
                c,
            )
        return result

    def rewrite(self, op, x, w, c):
        return op.Gemm(x, w, c)


def _dims(shape) -> str:
    return "[" + ", ".join(str(d) for d in shape) + "]"


def _opset(context) -> int:
    return context.model.opset_imports.get("", 1)


def _broadcasts_to(shape: ir.Shape, target: tuple) -> bool:
    """Whether ``shape`` broadcasts to ``target`` one way: the result has the target's shape."""
    if len(shape) > len(target):
        return False
    for dim, want in zip(reversed(shape), reversed(target), strict=False):
        if dim == 1 or (isinstance(dim, int) and dim == want):
            continue
        if isinstance(dim, ir.SymbolicDim) and dim.value is not None and dim == want:
            continue
        return False
    return True


def skip_norm_bias_rules(op_type: str) -> list[pattern.RewriteRule]:
    return [
        BiasIntoSkipNorm.rule(f"{op_type}-{p}-{n}", op_type=op_type, position=p, outputs=n)
        for n in (1, 2, 3, 4)
        for p in (0, 1)
    ]


@register_pass
class FuseBiasPass(FusionPass):
    """Fold bias Adds into Gemm or into the bias inputs of fused ops.

    Runs last among the fusions, after the attention and skip-norm passes (attention biases are
    the attention pass's). A bias is a 1-D constant with one element per column of the MatMul
    output it is added to. Rules, in order (com.microsoft ops only where the target runs them):
      1. ``bias-skip-layer-norm``: ``SkipLayerNormalization(MatMul(x, W) + b, skip, ...)`` without
         a bias (the Add on its input or its skip) -> the same op with ``MatMul(x, W)`` there and
         ``b`` as its bias input. 1b. ``bias-skip-simplified-layer-norm``: the same for
         ``SkipSimplifiedLayerNormalization``.
      2. ``bias-fast-gelu``: ``FastGelu(MatMul(x, W) + b)`` without a bias ->
         ``FastGelu(MatMul(x, W), b)``.
      3. ``gemm``: ``MatMul(x, W) + c`` with x and W 2-D and c broadcasting to the product's
         shape -> ``Gemm(x, W, c)``, on every target.
    A MatMul of higher rank plus a bias is left alone: no standard op takes a bias for it, and
    ONNX Runtime fuses MatMul + Add itself at load time (into Reshape-Gemm-Reshape where the
    shapes are static; with dynamic batch or sequence dims it keeps MatMul + Add).
    """

    name = "fuse-bias"

    def fusions(self, target: Target) -> list[Fusion]:
        return [
            Fusion(
                "bias-skip-layer-norm",
                skip_norm_bias_rules("SkipLayerNormalization"),
                [(MS, "SkipLayerNormalization")],
                commute=True,
                anchors=["SkipLayerNormalization"],
            ),
            Fusion(
                "bias-skip-simplified-layer-norm",
                skip_norm_bias_rules("SkipSimplifiedLayerNormalization"),
                [(MS, "SkipSimplifiedLayerNormalization")],
                commute=True,
                anchors=["SkipSimplifiedLayerNormalization"],
            ),
            Fusion(
                "bias-fast-gelu",
                [BiasIntoFastGelu.rule("fast-gelu", source="FastGelu")],
                [(MS, "FastGelu")],
                commute=True,
                anchors=["FastGelu"],
            ),
            Fusion("gemm", [MatMulAddToGemm.rule("gemm")], [("", "Gemm")], True, ["MatMul"]),
        ]
