"""infer-shapes: types and shapes for intermediate values."""

from __future__ import annotations

import numpy as np
from conftest import FLOAT, WHISPER, assert_same_outputs, make_model, op_types, run
from onnx import helper

from onnxopt import load
from onnxopt.passes.infer_shapes import InferShapesPass


def test_annotates_intermediate_values() -> None:
    nodes = [
        helper.make_node("Transpose", ["x"], ["t"], perm=[1, 0]),
        helper.make_node("Relu", ["t"], ["y"]),
    ]
    model = make_model(nodes, {"x": (FLOAT, ["n", 4])}, {"y": (FLOAT, [4, "n"])})
    t = model.graph.node(0).outputs[0]
    assert t.shape is None
    result = InferShapesPass()(model)
    assert result.modified and result.counts["values-annotated"] >= 1
    assert [str(d) for d in t.shape] == ["4", "n"] and t.dtype is not None
    assert op_types(model) == ["Transpose", "Relu"]
    feeds = {"x": np.ones((3, 4), np.float32)}
    assert run(model, feeds)["y"].shape == (4, 3)


def test_second_run_changes_nothing() -> None:
    model = load(WHISPER)
    before = run(model, {"mel": np.ones((1, 80, 20), np.float32)})
    assert InferShapesPass()(model).modified
    assert not InferShapesPass()(model).modified
    assert_same_outputs(before, run(model, {"mel": np.ones((1, 80, 20), np.float32)}))
