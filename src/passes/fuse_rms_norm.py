"""Fuse decomposed RMSNorm (Pow/ReduceMean/Add/Sqrt/Div/Mul) into RMSNormalization."""

from __future__ import annotations

from onnxopt.fusion import Fusion, FusionPass
from onnxopt.registry import register_pass
from onnxopt.targets import Target


@register_pass
class FuseRmsNormPass(FusionPass):
    """Fuse decomposed RMSNorm (Pow/ReduceMean/Add/Sqrt/Div/Mul) into RMSNormalization."""

    name = "fuse-rms-norm"

    def fusions(self, target: Target) -> list[Fusion]:
        return []
