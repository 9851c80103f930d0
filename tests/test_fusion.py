"""The fusion base: alternatives by target, skipped fusions, domain imports, near misses."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import pytest
from conftest import FLOAT, assert_same_outputs, make_model, op_types, run
from onnx import helper
from onnxscript.rewriter import pattern

from onnxopt.fusion import Fusion, FusionPass, can_emit
from onnxopt.targets import Target, load_target


class _LogSoftmax(pattern.RewriteRuleClassBase):
    def __init__(self, domain: str = "", op_type: str = "LogSoftmax") -> None:
        super().__init__(f"{domain}{op_type}")
        self.domain, self.op_type = domain, op_type

    def pattern(self, op, x):
        return op.Log(op.Softmax(x, _outputs=["probs"]))

    def check(self, context, x, probs, **_):
        result = pattern.MatchResult()
        axis = probs.producer().attributes.get_int("axis", -1)
        if axis not in (-1, len(x.shape or ()) - 1):
            return result.fail(f"softmax axis {axis} is not the last axis", probs)
        return result

    def rewrite(self, op, x, probs, **_):
        return getattr(op, self.op_type)(x, axis=-1, _domain=self.domain)


class _TransposedMatMul(pattern.RewriteRuleClassBase):
    def pattern(self, op, a, b):
        return op.MatMul(op.Transpose(a, perm=[1, 0]), b)

    def rewrite(self, op, a, b):
        return op.FusedMatMul(a, b, transA=1, _domain="com.microsoft")


class _Toy(FusionPass):
    name = "test-toy-fusion"

    def fusions(self, target: Target) -> list[Fusion]:
        return [
            Fusion(
                "log-softmax",
                [_LogSoftmax.rule("com.microsoft", "NoSuchOp")],
                [("com.microsoft", "NoSuchOp")],
            ),
            Fusion("log-softmax", [_LogSoftmax.rule()], [("", "LogSoftmax")]),
            Fusion("never", [_LogSoftmax.rule("", "NoSuchOp")], [("", "NoSuchOp")]),
            Fusion("fused-matmul", [_TransposedMatMul.rule()], [("com.microsoft", "FusedMatMul")]),
        ]


def _model(axis: int = -1) -> ir.Model:
    nodes = [
        helper.make_node("Softmax", ["x"], ["p"], axis=axis),
        helper.make_node("Log", ["p"], ["l"]),
        helper.make_node("Transpose", ["l"], ["t"], perm=[1, 0]),
        helper.make_node("MatMul", ["t", "w"], ["y"]),
    ]
    w = np.random.default_rng(0).standard_normal((3, 4)).astype(np.float32)
    return make_model(nodes, {"x": (FLOAT, [3, 5])}, {"y": (FLOAT, [5, 4])}, {"w": w})


def test_the_first_alternative_the_target_runs_is_applied() -> None:
    model = _model()
    feeds = {"x": np.random.default_rng(1).standard_normal((3, 5)).astype(np.float32)}
    before = run(model, feeds)
    result = _Toy()(model)
    assert result.counts == {"log-softmax": 1, "fused-matmul": 1}
    assert op_types(model) == ["LogSoftmax", "FusedMatMul"]
    assert model.opset_imports["com.microsoft"] == 1
    assert result.notes == ["never: skipped, NoSuchOp is not a standard ONNX operator"]
    assert_same_outputs(before, run(model, feeds))


def test_a_standard_target_gets_no_contrib_op() -> None:
    model = _model()
    result = _Toy(target="onnx-17")(model)
    assert result.counts == {"log-softmax": 1}
    assert op_types(model) == ["LogSoftmax", "Transpose", "MatMul"]
    assert "com.microsoft" not in model.opset_imports
    assert "fused-matmul: skipped, onnx-17 cannot run com.microsoft::FusedMatMul" in result.notes


def test_a_near_miss_says_why() -> None:
    model = _model(axis=0)
    result = _Toy(target="onnx-17")(model)
    assert result.counts == {}
    assert not result.modified
    assert op_types(model) == ["Softmax", "Log", "Transpose", "MatMul"]
    assert len(result.misses) == 1
    assert result.misses[0].startswith("log-softmax: not fused at node")
    assert result.misses[0].endswith("softmax axis 0 is not the last axis")


def test_a_fusion_without_its_anchor_op_in_the_graph_is_not_tried() -> None:
    class Anchored(_Toy):
        name = "test-toy-anchored"

        def fusions(self, target: Target) -> list[Fusion]:
            return [
                Fusion("log-softmax", [_LogSoftmax.rule()], [("", "LogSoftmax")], anchors=["Tanh"])
            ]

    model = _model(axis=0)
    result = Anchored()(model)
    assert (result.counts, result.notes, result.misses) == ({}, [], [])
    assert op_types(model) == ["Softmax", "Log", "Transpose", "MatMul"]


def test_can_emit_needs_the_op_in_the_models_opset() -> None:
    model = _model()
    ort = load_target("ort-cpu")
    assert can_emit(model, ort, "", "LayerNormalization")
    assert not can_emit(model, ort, "", "Gelu")  # Gelu is opset 20; the model is at 17
    assert not can_emit(model, ort, "", "SimplifiedLayerNormalization")  # ORT-only, not ONNX
    assert can_emit(model, ort, "com.microsoft", "Gelu")
    assert not can_emit(model, load_target("onnx-23"), "com.microsoft", "Gelu")


def test_an_unknown_target_fails_when_the_pass_is_built() -> None:
    from onnxopt.errors import UsageError

    with pytest.raises(UsageError, match="unknown target 'nope'"):
        _Toy(target="nope")
