"""Fold bias Adds into Gemm or into the bias inputs of fused ops."""

from __future__ import annotations

from onnxopt.fusion import Fusion, FusionPass
from onnxopt.registry import register_pass
from onnxopt.targets import Target


@register_pass
class FuseBiasPass(FusionPass):
    """Fold bias Adds into Gemm or into the bias inputs of fused ops."""

    name = "fuse-bias"

    def fusions(self, target: Target) -> list[Fusion]:
        return []
