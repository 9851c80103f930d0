"""Fuse a residual Add and the LayerNorm/RMSNorm after it into one skip-norm op."""

from __future__ import annotations

from onnxopt.fusion import Fusion, FusionPass
from onnxopt.registry import register_pass
from onnxopt.targets import Target


@register_pass
class FuseSkipLayerNormPass(FusionPass):
    """Fuse a residual Add and the LayerNorm/RMSNorm after it into one skip-norm op."""

    name = "fuse-skip-layer-norm"

    def fusions(self, target: Target) -> list[Fusion]:
        return []
