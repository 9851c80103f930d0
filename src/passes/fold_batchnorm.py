"""Fold BatchNormalization and per-channel Mul/Add into neighbouring Conv, ConvTranspose, Gemm."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
from onnxscript.rewriter import pattern
from onnxscript.rewriter.rules import common as rules

from onnxopt.pass_api import Pass, PassResult
from onnxopt.registry import register_pass
from onnxopt.stats import add_count


class _ChannelAffineIntoConv(pattern.RewriteRuleClassBase):
    """Conv(x, W, b) * s + t, s and t constant per output channel -> Conv(x, W * s, b * s + t)."""

    def __init__(self, name: str, *, scale: bool, shift: bool) -> None:
        super().__init__(name)
        self.scale, self.shift = scale, shift

    def pattern(self, op, x, w, s, t):
        y = op.Conv(x, w, _allow_other_inputs=True, _allow_other_attributes=True, _outputs=["conv"])
        if self.scale:
            y = op.Mul(y, s)
        return op.Add(y, t) if self.shift else y

    def check(self, context, x, w, s, t, conv, **_):
        result = pattern.MatchResult()
        node = conv.producer()
        if w.const_value is None or (len(node.inputs) > 2 and node.inputs[2].const_value is None):
            return result.fail("weights or bias are not constant", w)
        if len(conv.uses()) != 1 or conv.is_graph_output():
            return result.fail("the Conv output has other uses", conv)
        rank, channels = len(w.const_value.shape), w.const_value.shape[0]
        for value in (s, t) if self.scale and self.shift else (s,) if self.scale else (t,):
            if _per_channel(value, rank, channels) is None:
                return result.fail("not a constant per output channel", value)
        return result

    def rewrite(self, op, x, w, s, t, conv, **_):
        node = conv.producer()
        weights = w.const_value.numpy()
        rank, channels = weights.ndim, weights.shape[0]
        bias = node.inputs[2].const_value.numpy() if len(node.inputs) > 2 else 0
        scale = _per_channel(s, rank, channels) if self.scale else 1
        shift = _per_channel(t, rank, channels) if self.shift else 0
        new_w = (weights * np.reshape(scale, (-1,) + (1,) * (rank - 1))).astype(weights.dtype)
        new_b = np.broadcast_to(bias * scale + shift, (channels,)).astype(weights.dtype)
        return op.Conv(
            x,
            op.initializer(ir.tensor(new_w), name=f"{w.name}_folded"),
            op.initializer(ir.tensor(new_b), name=f"{w.name}_folded_bias"),
            **node.attributes,
        )


def _per_channel(value: ir.Value | None, rank: int, channels: int) -> np.ndarray | None:
    """The value as one number per output channel, if it broadcasts only along axis 1."""
    if value is None or value.const_value is None:
        return None
    array = value.const_value.numpy()
    if array.ndim > rank:
        return None
    shape = (1,) * (rank - array.ndim) + array.shape
    if any(d != 1 for i, d in enumerate(shape) if i != 1) or shape[1] not in (1, channels):
        return None
    return np.broadcast_to(array.reshape(-1), (channels,))


_RULES = {
    "batchnorm-into-conv": rules.fuse_batchnorm_into_conv_rule,
    "batchnorm-into-conv-transpose": rules.fuse_batchnorm_into_conv_transpose_rule,
    "batchnorm-into-gemm": rules.fuse_batchnorm_into_gemm_rule,
    "affine-into-conv": rules.affine_conv_fusion_rule,
    "conv-into-affine": rules.conv_affine_fusion_rule,
    "channel-affine-into-conv": _ChannelAffineIntoConv.rule("mul-add", scale=True, shift=True),
    "channel-scale-into-conv": _ChannelAffineIntoConv.rule("mul", scale=True, shift=False),
    "channel-shift-into-conv": _ChannelAffineIntoConv.rule("add", scale=False, shift=True),
}


@register_pass
class FoldBatchNormPass(Pass):
    """Fold inference BatchNormalization and constant per-channel Mul/Add into conv weights.

    Rules (onnxscript's, counted by firings); each needs constant weights and statistics:
      1. ``batchnorm-into-conv`` / ``-conv-transpose`` / ``-gemm``: ``BN(Conv(x, W, b))`` becomes
         ``Conv(x, W * s, (b - mean) * s + beta)`` with ``s = gamma / sqrt(var + eps)``.
      2. ``affine-into-conv``: ``Conv(x * a + c)``, scalar ``a`` and ``c``, folds them into W, b.
      3. ``conv-into-affine``: ``Conv(x) * a + c`` with scalar ``a``, ``c`` likewise.
      4. ``channel-affine-into-conv`` / ``channel-scale-`` / ``channel-shift-into-conv``:
         ``Conv(x) * s + t`` with ``s``, ``t`` constant per output channel (the BatchNorm that
         exporters split into Mul and Add) becomes ``Conv(x, W * s, b * s + t)``.
    Every op it leaves (Conv, ConvTranspose, Gemm) was already in the model, so no target
    loses support.
    """

    name = "fold-batchnorm"
    kind = "exact"

    def call(self, model: ir.Model) -> PassResult:
        counts: dict[str, int] = {}
        for name, rule in _RULES.items():
            fired = pattern.RewriteRuleSet([rule], commute=True).apply_to_model(model)
            add_count(counts, name, fired)
        if counts:
            ir.passes.common.RemoveUnusedNodesPass()(model)
        return PassResult(model, bool(counts), counts=counts)
