"""Fuse decomposed LayerNorm (ReduceMean/Sub/Pow/Sqrt/Div/Mul/Add) into LayerNormalization."""

from __future__ import annotations

from onnxopt.fusion import Fusion, FusionPass
from onnxopt.registry import register_pass
from onnxopt.targets import Target


@register_pass
class FuseLayerNormPass(FusionPass):
    """Fuse decomposed LayerNorm (ReduceMean/Sub/Pow/Sqrt/Div/Mul/Add) into LayerNormalization."""

    name = "fuse-layer-norm"

    def fusions(self, target: Target) -> list[Fusion]:
        return []
