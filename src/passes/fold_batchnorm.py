"""Fold BatchNormalization and per-channel Mul/Add into neighbouring Conv, ConvTranspose, Gemm."""

from __future__ import annotations

import onnx_ir as ir
from onnxscript.rewriter import pattern
from onnxscript.rewriter.rules import common as rules

from onnxopt.pass_api import Pass, PassResult
from onnxopt.registry import register_pass
from onnxopt.stats import add_count

_RULES = {
    "batchnorm-into-conv": rules.fuse_batchnorm_into_conv_rule,
    "batchnorm-into-conv-transpose": rules.fuse_batchnorm_into_conv_transpose_rule,
    "batchnorm-into-gemm": rules.fuse_batchnorm_into_gemm_rule,
    "affine-into-conv": rules.affine_conv_fusion_rule,
    "conv-into-affine": rules.conv_affine_fusion_rule,
}


@register_pass
class FoldBatchNormPass(Pass):
    """Fold inference BatchNormalization and constant per-channel Mul/Add into conv weights.

    Rules (onnxscript's, counted by firings); each needs constant weights and statistics:
      1. ``batchnorm-into-conv`` / ``-conv-transpose`` / ``-gemm``: ``BN(Conv(x, W, b))`` becomes
         ``Conv(x, W * s, (b - mean) * s + beta)`` with ``s = gamma / sqrt(var + eps)``.
      2. ``affine-into-conv``: ``Conv(x * a + c)``, scalar ``a`` and ``c``, folds them into W, b.
      3. ``conv-into-affine``: ``Conv(x) * a + c`` with scalar ``a``, ``c`` likewise.
    Every op it leaves (Conv, ConvTranspose, Gemm) was already in the model, so no target
    loses support.
    """

    name = "fold-batchnorm"
    kind = "exact"

    def call(self, model: ir.Model) -> PassResult:
        counts: dict[str, int] = {}
        for name, rule in _RULES.items():
            add_count(counts, name, pattern.RewriteRuleSet([rule]).apply_to_model(model))
        if counts:
            ir.passes.common.RemoveUnusedNodesPass()(model)
        return PassResult(model, bool(counts), counts=counts)
