"""Infer value types and shapes with ONNX shape inference, weights never serialized."""

from __future__ import annotations

import onnx_ir as ir
from onnx_ir.passes.common import ShapeInferencePass

from onnxopt.pass_api import Pass, PassResult
from onnxopt.registry import register_pass


@register_pass
class InferShapesPass(Pass):
    """Annotate values with inferred types and shapes (counted as values that gained some)."""

    name = "infer-shapes"
    kind = "exact"
    data_prop: bool = True

    def call(self, model: ir.Model) -> PassResult:
        before = _annotations(model)
        ShapeInferencePass(data_prop=self.data_prop)(model)
        after = _annotations(model)
        changed = sum(1 for key, info in after.items() if before.get(key) != info)
        counts = {"values-annotated": changed} if changed else {}
        return PassResult(model, changed > 0, counts=counts)


def _annotations(model: ir.Model) -> dict[int, tuple[str, str]]:
    return {
        id(value): (str(value.type), str(value.shape))
        for node in model.graph.all_nodes()
        for value in node.outputs
    }
