"""cleanup: Identity, CSE, duplicate and unused initializers, dead nodes."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
from conftest import FLOAT, INT64, assert_same_outputs, make_model, op_types, run
from onnx import helper

from onnxopt.passes.cleanup import CleanupPass


def _feeds():
    return {"x": np.random.default_rng(0).standard_normal((2, 4)).astype(np.float32)}


def _messy_model():
    w = np.random.default_rng(1).standard_normal((4, 4)).astype(np.float32)
    nodes = [
        helper.make_node("Identity", ["x"], ["x1"]),
        helper.make_node("MatMul", ["x1", "w"], ["a"]),
        helper.make_node("MatMul", ["x1", "w_copy"], ["b"]),  # same as a once w_copy == w
        helper.make_node("Relu", ["a"], ["ra"]),
        helper.make_node("Relu", ["a"], ["ra2"]),  # common subexpression
        helper.make_node("Add", ["ra", "ra2"], ["s"]),
        helper.make_node("Add", ["s", "b"], ["y"]),
        helper.make_node("Sigmoid", ["x"], ["dead"]),  # no output depends on it
    ]
    inits = {"w": w, "w_copy": w.copy(), "unused": np.ones(3, np.float32)}
    return make_model(nodes, {"x": (FLOAT, [2, 4])}, {"y": (FLOAT, [2, 4])}, inits)


def test_removes_everything_that_computes_nothing() -> None:
    model = _messy_model()
    before = run(model, _feeds())
    result = CleanupPass()(model)
    assert result.modified
    assert result.counts == {
        "identity": 1,
        "cse": 2,
        "dedup-initializers": 1,
        "dead-nodes": 1,
        "unused-initializers": 1,
    }
    assert sorted(op_types(model)) == ["Add", "Add", "MatMul", "Relu"]
    assert list(model.graph.initializers) == ["w"]
    assert_same_outputs(before, run(model, _feeds()))


def test_dedup_respects_its_size_limit() -> None:
    model = _messy_model()
    result = CleanupPass(dedup_max_elements=8)(model)
    assert "dedup-initializers" not in result.counts
    assert set(model.graph.initializers) == {"w", "w_copy"}


def test_identity_feeding_a_graph_output_keeps_name_and_type() -> None:
    nodes = [helper.make_node("Relu", ["x"], ["r"]), helper.make_node("Identity", ["r"], ["y"])]
    model = make_model(nodes, {"x": (FLOAT, ["n", 4])}, {"y": (FLOAT, ["n", 4])})
    before = run(model, _feeds())
    CleanupPass()(model)
    assert op_types(model) == ["Relu"]
    (out,) = model.graph.outputs
    assert out.name == "y" and out.dtype is not None and out.shape is not None
    assert_same_outputs(before, run(model, _feeds()))


def test_clean_model_is_unchanged() -> None:
    nodes = [helper.make_node("Relu", ["x"], ["y"])]
    model = make_model(nodes, {"x": (FLOAT, [2, 4])}, {"y": (FLOAT, [2, 4])})
    result = CleanupPass()(model)
    assert not result.modified and result.counts == {} and op_types(model) == ["Relu"]


def test_identity_between_two_graph_outputs_is_kept() -> None:
    nodes = [helper.make_node("Relu", ["x"], ["z"]), helper.make_node("Identity", ["z"], ["y"])]
    model = make_model(nodes, {"x": (FLOAT, [2, 4])}, {"y": (FLOAT, [2, 4]), "z": (FLOAT, [2, 4])})
    before = run(model, _feeds())
    CleanupPass()(model)
    assert [v.name for v in model.graph.outputs] == ["y", "z"]
    assert op_types(model) == ["Relu", "Identity"]
    assert_same_outputs(before, run(model, _feeds()))


def test_inference_dropout_is_removed_training_dropout_kept() -> None:
    nodes = [
        helper.make_node("Dropout", ["x"], ["d1"]),
        helper.make_node("Dropout", ["d1", "ratio", "false"], ["d2"]),
        helper.make_node("Dropout", ["d2", "ratio", "true"], ["d3"]),
        helper.make_node("Relu", ["d3"], ["y"]),
    ]
    inits = {
        "ratio": np.array(0.0, np.float32),
        "false": np.array(False),
        "true": np.array(True),
    }
    model = make_model(nodes, {"x": (FLOAT, [2, 4])}, {"y": (FLOAT, [2, 4])}, inits, opset=13)
    before = run(model, _feeds())
    result = CleanupPass()(model)
    assert result.counts["dropout"] == 2 and result.counts["identity"] == 2
    assert op_types(model) == ["Dropout", "Relu"]
    assert_same_outputs(before, run(model, _feeds()))


def _two_shape_reads(b_shape):
    nodes = [
        helper.make_node("Relu", ["a"], ["r"]),
        helper.make_node("Shape", ["r"], ["sa"]),
        helper.make_node("Shape", ["b"], ["sb"]),
        helper.make_node("Add", ["sa", "sb"], ["y"]),
    ]
    inputs = {"a": (FLOAT, ["n", 4]), "b": (FLOAT, b_shape)}
    model = make_model(nodes, inputs, {"y": (INT64, [2])})
    model.graph.node(0).outputs[0].shape = ir.Shape(["n", 4])  # as infer-shapes would say
    return model


def test_shape_reads_of_equal_symbolic_shapes_are_shared() -> None:
    model = _two_shape_reads(["n", 4])
    feeds = {"a": np.ones((3, 4), np.float32), "b": np.ones((3, 4), np.float32)}
    before = run(model, feeds)
    result = CleanupPass()(model)
    assert result.counts["same-shape"] == 1
    assert op_types(model).count("Shape") == 1
    assert_same_outputs(before, run(model, feeds))


def test_shape_reads_of_unknown_or_other_dims_stay_apart() -> None:
    for b_shape in (["m", 4], [None, 4]):
        model = _two_shape_reads(b_shape)
        CleanupPass()(model)
        assert op_types(model).count("Shape") == 2, b_shape
