"""fold-constants: folds what is constant, never past its size cap."""

from __future__ import annotations

import numpy as np
from conftest import FLOAT, assert_same_outputs, make_model, op_types, run
from onnx import helper

from onnxopt.passes.fold_constants import FoldConstantsPass


def _feeds(shape=(2, 4)):
    return {"x": np.random.default_rng(0).standard_normal(shape).astype(np.float32)}


def test_folds_constant_arithmetic_and_removes_dead_nodes() -> None:
    a = np.arange(4, dtype=np.float32)
    nodes = [
        helper.make_node("Mul", ["a", "a"], ["a2"]),
        helper.make_node("Add", ["a2", "a"], ["c"]),
        helper.make_node("Add", ["x", "c"], ["y"]),
    ]
    model = make_model(nodes, {"x": (FLOAT, [2, 4])}, {"y": (FLOAT, [2, 4])}, {"a": a})
    before = run(model, _feeds())
    result = FoldConstantsPass()(model)
    assert result.modified and result.counts == {"Add": 1, "Mul": 1}
    assert op_types(model) == ["Add"]
    assert_same_outputs(before, run(model, _feeds()))


def test_size_cap_keeps_expand_unfolded() -> None:
    inits = {"one": np.array([1.5], np.float32), "s": np.array([64, 64], np.int64)}
    nodes = [
        helper.make_node("Expand", ["one", "s"], ["big"]),
        helper.make_node("Add", ["x", "big"], ["y"]),
    ]
    model = make_model(nodes, {"x": (FLOAT, [64, 64])}, {"y": (FLOAT, [64, 64])}, inits)
    feeds = _feeds((64, 64))
    before = run(model, feeds)
    result = FoldConstantsPass(max_output_elements=1000)(model)
    assert not result.modified and op_types(model) == ["Expand", "Add"]
    # With the cap above the tensor's 4096 elements, it folds into an initializer.
    result = FoldConstantsPass(max_output_elements=4096)(model)
    assert result.counts == {"Expand": 1} and op_types(model) == ["Add"]
    assert_same_outputs(before, run(model, feeds))


def test_shape_arithmetic_folds_when_shapes_are_static() -> None:
    nodes = [
        helper.make_node("Shape", ["x"], ["s"]),
        helper.make_node("Reshape", ["x", "s"], ["y"]),
    ]
    model = make_model(nodes, {"x": (FLOAT, [2, 4])}, {"y": (FLOAT, [2, 4])})
    result = FoldConstantsPass()(model)
    # Reshape to its own shape becomes an Identity once the shape is known.
    assert result.counts == {"Reshape": 1, "Shape": 1} and op_types(model) == ["Identity"]
    assert_same_outputs({"y": _feeds()["x"]}, run(model, _feeds()))


def test_nothing_constant_is_unchanged() -> None:
    nodes = [helper.make_node("Relu", ["x"], ["y"])]
    model = make_model(nodes, {"x": (FLOAT, [2, 4])}, {"y": (FLOAT, [2, 4])})
    result = FoldConstantsPass()(model)
    assert not result.modified and result.counts == {} and op_types(model) == ["Relu"]


def test_folds_inside_if_branches() -> None:
    two = helper.make_tensor("two", 1, [], [2.0])
    branch = helper.make_graph(
        [
            helper.make_node("Constant", [], ["c"], value=two),
            helper.make_node("Mul", ["c", "c"], ["c4"]),
            helper.make_node("Mul", ["x", "c4"], ["out"]),
        ],
        "then",
        [],
        [helper.make_tensor_value_info("out", FLOAT, [2, 4])],
    )
    other = helper.make_graph(
        [helper.make_node("Neg", ["x"], ["out2"])],
        "else",
        [],
        [helper.make_tensor_value_info("out2", FLOAT, [2, 4])],
    )
    nodes = [
        helper.make_node("ReduceSum", ["x"], ["s"], keepdims=0),
        helper.make_node("Greater", ["s", "zero"], ["cond"]),
        helper.make_node("If", ["cond"], ["y"], then_branch=branch, else_branch=other),
    ]
    zero = np.array(0.0, np.float32)
    model = make_model(nodes, {"x": (FLOAT, [2, 4])}, {"y": (FLOAT, [2, 4])}, {"zero": zero})
    feeds = {"x": np.abs(_feeds()["x"])}
    before = run(model, feeds)
    result = FoldConstantsPass()(model)
    assert result.modified
    then_ops = [n.op_type for n in model.graph.node(2).attributes["then_branch"].as_graph()]
    assert then_ops == ["Mul"]
    assert_same_outputs(before, run(model, feeds))


def test_integer_shape_inputs_stay_correct() -> None:
    nodes = [
        helper.make_node("Add", ["i", "j"], ["k"]),
        helper.make_node("Reshape", ["x", "k"], ["y"]),
    ]
    inits = {"i": np.array([4, 1], np.int64), "j": np.array([4, 1], np.int64)}
    model = make_model(nodes, {"x": (FLOAT, [8, 2])}, {"y": (FLOAT, [8, 2])}, inits)
    feeds = _feeds((8, 2))
    before = run(model, feeds)
    result = FoldConstantsPass()(model)
    assert result.counts["Add"] == 1 and "Add" not in op_types(model)
    assert_same_outputs(before, run(model, feeds))


def test_constant_nodes_become_initializers_unless_told_not_to() -> None:
    nodes = [
        helper.make_node("Constant", [], ["c"], value_floats=[1.0, 2.0, 3.0, 4.0]),
        helper.make_node("Add", ["x", "c"], ["y"]),
    ]

    def model():
        return make_model(nodes, {"x": (FLOAT, [2, 4])}, {"y": (FLOAT, [2, 4])})

    kept = model()
    assert not FoldConstantsPass(lift_constants=False)(kept).modified
    assert op_types(kept) == ["Constant", "Add"]
    lifted = model()
    before = run(lifted, _feeds())
    result = FoldConstantsPass()(lifted)
    assert result.counts == {"Constant": 1} and op_types(lifted) == ["Add"]
    assert list(lifted.graph.initializers) == ["c"]
    assert_same_outputs(before, run(lifted, _feeds()))
