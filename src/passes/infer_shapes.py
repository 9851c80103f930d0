"""Infer value types and shapes with ONNX shape inference, weights never serialized."""

from __future__ import annotations

import logging

import onnx
import onnx_ir as ir
from onnx_ir.passes.common import _c_api_utils

from onnxopt.pass_api import Pass, PassResult
from onnxopt.registry import register_pass
from onnxopt.symbolic_shapes import unify_dims

logger = logging.getLogger(__name__)


@register_pass
class InferShapesPass(Pass):
    """Annotate values with inferred types and shapes (counted as values that gained some).

    After ONNX inference, dims it made up (``unk__N``) that are provably a known dim (a Reshape
    or Expand to a shape read from another value, a broadcast of agreeing dims, a Range up to
    a dim, a Slice or padded Conv whose bounds give the length back) are renamed everywhere,
    so equal dims share one name (see ``onnxopt.symbolic_shapes``).
    """

    name = "infer-shapes"
    kind = "exact"
    data_prop: bool = True

    def call(self, model: ir.Model) -> PassResult:
        before = _annotations(model)

        def infer(proto: onnx.ModelProto) -> onnx.ModelProto:
            return onnx.shape_inference.infer_shapes(
                proto, check_type=True, strict_mode=True, data_prop=self.data_prop
            )

        try:
            # Hands ONNX a copy without the weights (onnx-ir's ShapeInferencePass does the same).
            inferred = _c_api_utils.call_onnx_api(infer, model)
        except Exception as err:
            logger.warning("shape inference failed, model left unchanged: %s", err)
            return PassResult(model, False, notes=[f"shape inference failed: {err}"])
        _merge(model, inferred)
        unify_dims(model.graph)
        after = _annotations(model)
        changed = sum(1 for key, info in after.items() if before.get(key) != info)
        counts = {"values-annotated": changed} if changed else {}
        return PassResult(model, changed > 0, counts=counts)


def _merge(model: ir.Model, inferred: onnx.ModelProto) -> None:
    """Copy inferred types (whole types: sequences and optionals too) and shapes by name.

    onnx-ir's ShapeInferencePass copies only ``dtype``, which turns a sequence or optional
    value with no type yet into a tensor (onnx-ir <= 1.1).
    """
    inferred_model = ir.serde.deserialize_model(inferred)
    for graph, inferred_graph in zip(model.graphs(), inferred_model.graphs(), strict=False):
        inferred_values = ir.convenience.create_value_mapping(inferred_graph)
        for name, value in ir.convenience.create_value_mapping(graph).items():
            other = inferred_values.get(name)
            if other is None:
                continue
            if other.type is not None and value.type != other.type:
                value.type = other.type
            if other.shape is not None and value.shape != other.shape:
                value.shape = other.shape


def _annotations(model: ir.Model) -> dict[int, tuple[str, str]]:
    return {
        id(value): (str(value.type), str(value.shape))
        for node in model.graph.all_nodes()
        for value in node.outputs
    }
