"""infer-shapes names the dims ONNX makes up when they provably are dims it knows."""

from __future__ import annotations

import numpy as np
from conftest import FLOAT, assert_same_outputs, make_model, run
from onnx import helper

from onnxopt.passes.infer_shapes import InferShapesPass


def _dims(model, name: str) -> list[str]:
    value = next(v for n in model.graph for v in n.outputs if v.name == name)
    return [str(d) for d in value.shape]


def _view_minus_one(second: str = "seq_vec"):
    """``x.view(-1, x.size(1))`` then an Add with ``x``: TorchScript's reshape idiom."""
    nodes = [
        helper.make_node("Shape", ["x"], ["shape"]),
        helper.make_node("Gather", ["shape", "one"], ["seq_dim"], axis=0),
        helper.make_node("Unsqueeze", ["seq_dim", "zero_axis"], ["seq_vec"]),
        helper.make_node("Concat", ["minus_one", second], ["target"], axis=0),
        helper.make_node("Reshape", ["x", "target"], ["y"]),
        helper.make_node("Add", ["y", "x"], ["z"]),
    ]
    inits = {
        "one": np.array(1, np.int64),
        "zero_axis": np.array([0], np.int64),
        "minus_one": np.array([-1], np.int64),
        "three": np.array([3], np.int64),
    }
    return make_model(nodes, {"x": (FLOAT, ["batch", "seq"])}, {"z": (FLOAT, None)}, inits)


def test_a_reshape_to_a_read_shape_keeps_the_dims_it_read() -> None:
    model = _view_minus_one()
    feeds = {"x": np.arange(6, dtype=np.float32).reshape(2, 3)}
    before = run(model, feeds)
    InferShapesPass()(model)
    assert _dims(model, "y") == ["batch", "seq"]  # ONNX alone says [unk__0, seq]
    assert _dims(model, "z") == ["batch", "seq"]  # and the broadcast with x agrees
    assert_same_outputs(before, run(model, feeds))


def test_a_minus_one_that_does_not_cancel_stays_unknown() -> None:
    model = _view_minus_one(second="three")  # view(-1, 3): -1 is batch * seq / 3
    InferShapesPass()(model)
    assert _dims(model, "y")[0] not in ("batch", "seq")
    assert _dims(model, "y")[1] == "3"


def test_a_same_padded_conv_keeps_the_length_a_strided_one_does_not() -> None:
    rng = np.random.default_rng(0)
    nodes = [
        helper.make_node("Conv", ["x", "w"], ["same"], pads=[3, 3], group=4),
        helper.make_node("Conv", ["x", "w"], ["strided"], pads=[3, 3], group=4, strides=[2]),
        helper.make_node("Add", ["same", "x"], ["y"]),
    ]
    inits = {"w": rng.standard_normal((4, 1, 7)).astype(np.float32)}
    model = make_model(
        nodes,
        {"x": (FLOAT, ["batch", 4, "time"])},
        {"y": (FLOAT, None), "strided": (FLOAT, None)},
        inits,
    )
    feeds = {"x": rng.standard_normal((2, 4, 9)).astype(np.float32)}
    before = run(model, feeds)
    InferShapesPass()(model)
    assert _dims(model, "same") == ["batch", "4", "time"]  # ONNX alone: [batch, 4, unk__0]
    assert _dims(model, "y") == ["batch", "4", "time"]
    assert _dims(model, "strided")[2] != "time"
    assert_same_outputs(before, run(model, feeds))
