"""Opset conversion with our adapters where onnx's converter has none."""

from __future__ import annotations

import numpy as np
from conftest import FLOAT, INT64, assert_same_outputs, make_model, op_types, run
from onnx import helper

from onnxopt.targets.opset import convert_opset


def _shape_then_reduce(opset: int, **shape_attrs):
    nodes = [
        helper.make_node("Shape", ["x"], ["s"], **shape_attrs),
        helper.make_node("Cast", ["s"], ["sf"], to=FLOAT),
        helper.make_node("ReduceMean", ["x", "axes"], ["m"], keepdims=0),
        helper.make_node("Add", ["m", "sf"], ["y"]),
    ]
    inits = {"axes": np.array([1], np.int64)}
    return make_model(nodes, {"x": (FLOAT, [2, 2])}, {"y": (FLOAT, [2])}, inits, opset=opset)


def test_down_conversion_where_onnx_has_no_adapter() -> None:
    model = _shape_then_reduce(18)  # Shape-15 (no adapter to 13), ReduceMean-18 (axes input)
    feeds = {"x": np.arange(4, dtype=np.float32).reshape(2, 2)}
    before = run(model, feeds)
    assert convert_opset(model, 13) is None
    assert model.opset_imports[""] == 13
    reduce = next(n for n in model.graph if n.op_type == "ReduceMean")
    assert len(reduce.inputs) == 1 and list(reduce.attributes["axes"].as_ints()) == [1]
    assert op_types(model) == ["Shape", "Cast", "ReduceMean", "Add"]
    assert_same_outputs(before, run(model, feeds))


def test_a_node_using_what_the_old_opset_lacks_is_named() -> None:
    nodes = [helper.make_node("Reshape", ["x", "shape"], ["y"], allowzero=1)]  # shape computed
    inputs = {"x": (FLOAT, [2, 2]), "shape": (INT64, [2])}
    model = make_model(nodes, inputs, {"y": (FLOAT, None)}, opset=17)
    problem = convert_opset(model, 13)
    assert problem is not None and "Reshape" in problem and "allowzero" in problem
    assert model.opset_imports[""] == 17


def test_up_conversion() -> None:
    nodes = [helper.make_node("Unsqueeze", ["x"], ["y"], axes=[0])]
    model = make_model(nodes, {"x": (FLOAT, [3])}, {"y": (FLOAT, [1, 3])}, opset=11)
    feeds = {"x": np.arange(3, dtype=np.float32)}
    before = run(model, feeds)
    assert convert_opset(model, 13) is None and model.opset_imports[""] == 13
    assert_same_outputs(before, run(model, feeds))


def test_attribute_at_its_default_does_not_block_down_conversion() -> None:
    def reshape(allowzero: int):  # allowzero appeared in Reshape-14; 0 is the old behaviour
        node = helper.make_node("Reshape", ["x", "s"], ["y"], allowzero=allowzero)
        inits = {"s": np.array([4], np.int64)}
        return make_model([node], {"x": (FLOAT, [2, 2])}, {"y": (FLOAT, [4])}, inits, opset=17)

    model = reshape(0)
    feeds = {"x": np.arange(4, dtype=np.float32).reshape(2, 2)}
    before = run(model, feeds)
    assert convert_opset(model, 13) is None
    assert "allowzero" not in model.graph.node(0).attributes
    assert_same_outputs(before, run(model, feeds))


def test_shape_bounds_become_a_slice_below_opset_15() -> None:
    nodes = [
        helper.make_node("Shape", ["x"], ["s"], start=1, end=3),
        helper.make_node("Cast", ["s"], ["y"], to=FLOAT),
    ]
    model = make_model(nodes, {"x": (FLOAT, [2, 3, 4, 5])}, {"y": (FLOAT, [2])}, opset=17)
    feeds = {"x": np.zeros((2, 3, 4, 5), np.float32)}
    before = run(model, feeds)
    assert convert_opset(model, 13) is None
    assert op_types(model) == ["Constant", "Constant", "Shape", "Slice", "Cast"]
    assert_same_outputs(before, run(model, feeds))


def test_allowzero_is_moot_for_a_constant_shape_without_zeros() -> None:
    node = helper.make_node("Reshape", ["x", "s"], ["y"], allowzero=1)
    inits = {"s": np.array([4, -1], np.int64)}
    model = make_model([node], {"x": (FLOAT, [2, 2])}, {"y": (FLOAT, [4, 1])}, inits, opset=17)
    feeds = {"x": np.arange(4, dtype=np.float32).reshape(2, 2)}
    before = run(model, feeds)
    assert convert_opset(model, 13) is None
    assert_same_outputs(before, run(model, feeds))


def test_an_attribute_newer_than_the_target_opset_is_dropped_at_its_default() -> None:
    nodes = [helper.make_node("ReduceMean", ["x", "axes"], ["y"], noop_with_empty_axes=0)]
    inits = {"axes": np.array([-1], np.int64)}
    model = make_model(nodes, {"x": (FLOAT, [2, 3])}, {"y": (FLOAT, [2, 1])}, inits, opset=18)
    feeds = {"x": np.arange(6, dtype=np.float32).reshape(2, 3)}
    before = run(model, feeds)
    assert convert_opset(model, 17) is None
    (node,) = list(model.graph)
    assert "noop_with_empty_axes" not in node.attributes  # ReduceMean-13 has no such attribute
    assert list(node.attributes["axes"].value) == [-1]
    assert_same_outputs(before, run(model, feeds))


def test_split_into_equal_parts_moves_below_opset_18() -> None:
    nodes = [helper.make_node("Split", ["x"], ["a", "b", "c"], axis=1, num_outputs=3)]
    outputs = {n: (FLOAT, ["batch", 2]) for n in "abc"}
    model = make_model(nodes, {"x": (FLOAT, ["batch", 6])}, outputs, opset=18)
    feeds = {"x": np.arange(12, dtype=np.float32).reshape(2, 6)}
    before = run(model, feeds)
    assert convert_opset(model, 17) is None
    assert "num_outputs" not in next(iter(model.graph)).attributes
    assert_same_outputs(before, run(model, feeds))


def test_split_into_uneven_parts_is_named() -> None:
    nodes = [helper.make_node("Split", ["x"], ["a", "b", "c"], axis=1, num_outputs=3)]
    outputs = {n: (FLOAT, None) for n in "abc"}
    model = make_model(nodes, {"x": (FLOAT, ["batch", 7])}, outputs, opset=18)
    problem = convert_opset(model, 17)
    assert problem is not None and "num_outputs" in problem
