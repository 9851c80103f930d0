"""Fuse decomposed RMSNorm (Pow/ReduceMean/Add/Sqrt/Div/Mul) into RMSNormalization."""

from __future__ import annotations

import onnx_ir as ir
from onnxscript.rewriter import pattern

from onnxopt.fusion import Fusion, FusionPass
from onnxopt.passes.fuse_layer_norm import (
    FLOAT,
    Norm,
    NormRule,
    match_norm,
    norm_tail,
    stats_pattern,
)
from onnxopt.registry import register_pass
from onnxopt.targets import Target

# ORT's RMSNormalization kernels take float, double and float16; double statistics in float
# would lose precision, so float and float16 inputs only.
RMS_DTYPES = (FLOAT, ir.DataType.FLOAT16)
# (has weight, -, form of the final node), as ``norm_tail`` takes it; longest first.
RMS_VARIANTS = [(True, False, 0), (True, False, 1)] + [(False, False, i) for i in range(4)]


def rms_variant_name(variant: tuple[bool, bool, int]) -> str:
    weight, _, last = variant
    if weight:
        return "weight-swapped" if last else "weight"
    return ("plain-cast", "plain-div", "plain-mul", "plain-mul-swapped")[last]


def rms_pattern(op, xc, two, eps, one, scale, variant: tuple[bool, bool, int]):
    """``xc / Sqrt(ReduceMean(xc ** 2) [+ eps])`` in any of its forms, [Cast], [* weight]."""
    std = stats_pattern(op, xc, two, eps)
    return norm_tail(op, xc, std, one, scale, None, variant)


def match_rms(vals: dict, variant: tuple[bool, bool, int]) -> Norm | pattern.MatchResult:
    """Check a matched RMS decomposition: the Norm to build, or why it does not hold."""
    return match_norm(vals, variant, RMS_DTYPES)


class _RmsNorm(NormRule):
    """x (or Cast(x)), its root mean square, normalized, [Cast back], [* weight]."""

    dtypes = RMS_DTYPES

    def __init__(self, variant: tuple[bool, bool, int]) -> None:
        super().__init__(variant, rms_variant_name(variant))

    def pattern(self, op, xc, two, eps, one, scale):
        return rms_pattern(op, xc, two, eps, one, scale, self.variant)

    def rewrite(self, op, **_):
        n = self._norm
        scale = n.initializer(op, n.scale, "scale")
        return op.RMSNormalization(n.x, scale, axis=n.axis, epsilon=n.epsilon, stash_type=1)


RMS_NORM_RULES = [_RmsNorm.rule(v) for v in RMS_VARIANTS]


@register_pass
class FuseRmsNormPass(FusionPass):
    """Fuse decomposed RMSNorm (Pow/ReduceMean/Add/Sqrt/Div/Mul) into RMSNormalization.

    Rule ``rms-norm`` (one firing per norm; variants by the ops after the statistics):
      ``x / Sqrt(ReduceMean(x ** 2 | x * x) [+ eps])`` (or ``x * Reciprocal(...)`` or
      ``x * (1 / ...)``), optionally Cast back, optionally ``* weight`` (either order) becomes
      ``RMSNormalization(x, weight, axis, epsilon, stash_type=1)``; without a weight a ones
      scale is created. Llama/T5 forms, which Cast a float16 ``x`` to float for the statistics
      and the result back, are looked through. It holds when: the ReduceMean keeps dims over
      trailing axes, ``eps`` and the exponent are constants, the weight is a constant
      broadcasting over the normalized axes only (or a computed value of exactly that shape),
      the input is float or float16 and the statistics are in float (float16 inputs: also
      double or float16 statistics, which float computes at least as precisely).
    Targets: RMSNormalization exists from opset 23 (standard targets and ort-cpu). Below it
    nothing is fused here: ORT's SimplifiedLayerNormalization sits in the default domain, which
    the onnx checker rejects; ``fuse-skip-layer-norm`` fuses the norms after residual Adds.
    """

    name = "fuse-rms-norm"

    def fusions(self, target: Target) -> list[Fusion]:
        hint = (
            " (ORT's SimplifiedLayerNormalization is no standard op; fuse-skip-layer-norm fuses"
            " the norms after residual Adds)"
        )
        rms = [("", "RMSNormalization")]
        return [Fusion("rms-norm", RMS_NORM_RULES, rms, anchors=["ReduceMean"], hint=hint)]
