"""Fuse scaled-dot-product attention subgraphs into one attention op."""

from __future__ import annotations

from onnxopt.fusion import Fusion, FusionPass
from onnxopt.registry import register_pass
from onnxopt.targets import Target


@register_pass
class FuseAttentionPass(FusionPass):
    """Fuse scaled-dot-product attention subgraphs into one attention op."""

    name = "fuse-attention"

    def fusions(self, target: Target) -> list[Fusion]:
        return []
