"""infer-shapes names the dims ONNX makes up when they provably are dims it knows."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import FLOAT, INT64, assert_same_outputs, make_model, run
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


def _shape_reads(x: str, axis: int, out: str) -> list:
    """``out = x.size(axis)`` as a scalar, the TorchScript way."""
    return [
        helper.make_node("Shape", [x], [f"{out}_shape"]),
        helper.make_node("Gather", [f"{out}_shape", f"axis{axis}"], [out], axis=0),
    ]


_AXES = {f"axis{i}": np.array(i, np.int64) for i in range(3)}


def test_range_up_to_a_dim_has_that_many_elements() -> None:
    """GPT-2's positions: ``arange(x.size(1))`` embedded, then added to ``x``."""
    nodes = [
        *_shape_reads("x", 1, "seq_len"),
        helper.make_node("Range", ["zero", "seq_len", "one"], ["positions"]),
        helper.make_node("Unsqueeze", ["positions", "zero_axis"], ["ids"]),
        helper.make_node("Gather", ["table", "ids"], ["pos"]),
        helper.make_node("Add", ["x", "pos"], ["y"]),
    ]
    inits = _AXES | {
        "zero": np.array(0, np.int64),
        "one": np.array(1, np.int64),
        "zero_axis": np.array([0], np.int64),
        "table": np.arange(32, dtype=np.float32).reshape(8, 4),
    }
    model = make_model(nodes, {"x": (FLOAT, ["batch", "seq", 4])}, {"y": (FLOAT, None)}, inits)
    feeds = {"x": np.ones((2, 5, 4), np.float32)}
    before = run(model, feeds)
    InferShapesPass()(model)
    assert _dims(model, "positions") == ["seq"]  # ONNX alone: [unk__0]
    assert _dims(model, "pos") == ["1", "seq", "4"]
    assert _dims(model, "y") == ["batch", "seq", "4"]
    assert_same_outputs(before, run(model, feeds))


def test_expand_to_a_computed_shape_has_the_dims_it_names() -> None:
    """GPT-2's causal mask: ``m.expand(batch, -1, seq)``, the -1s resolved by Where."""
    nodes = [
        *_shape_reads("x", 0, "batch_len"),
        *_shape_reads("x", 1, "seq_len"),
        *[helper.make_node("Unsqueeze", [n, "zero_axis"], [f"{n}_1d"]) for n in ("batch_len",)],
        helper.make_node("Unsqueeze", ["seq_len", "zero_axis"], ["seq_len_1d"]),
        helper.make_node("Concat", ["batch_len_1d", "minus_one", "seq_len_1d"], ["wanted"], axis=0),
        helper.make_node(
            "ConstantOfShape", ["three"], ["ones"], value=helper.make_tensor("v", INT64, [1], [1])
        ),
        helper.make_node("Mul", ["ones", "minus_one_scalar"], ["minus_ones"]),
        helper.make_node("Equal", ["wanted", "minus_ones"], ["keep"]),
        helper.make_node("Where", ["keep", "ones", "wanted"], ["target"]),
        helper.make_node("Expand", ["mask", "target"], ["expanded"]),
        helper.make_node("Add", ["expanded", "x"], ["y"]),
    ]
    inits = _AXES | {
        "zero_axis": np.array([0], np.int64),
        "minus_one": np.array([-1], np.int64),
        "minus_one_scalar": np.array(-1, np.int64),
        "three": np.array([3], np.int64),
    }
    inputs = {"x": (FLOAT, ["batch", "seq", "seq"]), "mask": (FLOAT, [1, 1, "seq"])}
    model = make_model(nodes, inputs, {"y": (FLOAT, None)}, inits)
    feeds = {
        "x": np.ones((2, 3, 3), np.float32),
        "mask": np.arange(3, dtype=np.float32)[None, None],
    }
    before = run(model, feeds)
    InferShapesPass()(model)
    assert _dims(model, "expanded") == ["batch", "1", "seq"]  # ONNX alone: three unk__
    assert _dims(model, "y") == ["batch", "seq", "seq"]
    assert_same_outputs(before, run(model, feeds))


def _same_pad_conv(kernel: int, pads: list[int], ends: int):
    """wav2vec2's positional conv: a Conv whose pads keep ``kernel - 1 + k`` more, a Slice
    ``[:, :, 0:ends]`` (SamePad drops the last one), then the residual Add."""
    rng = np.random.default_rng(0)
    nodes = [
        helper.make_node("Conv", ["x", "w"], ["conv"], pads=pads, group=4),
        helper.make_node("Slice", ["conv", "zero", "end", "two"], ["sliced"]),
        helper.make_node("Add", ["sliced", "x"], ["y"]),
    ]
    inits = {
        "w": rng.standard_normal((4, 1, kernel)).astype(np.float32),
        "zero": np.array([0], np.int64),
        "end": np.array([ends], np.int64),
        "two": np.array([2], np.int64),
    }
    model = make_model(nodes, {"x": (FLOAT, ["batch", 4, "time"])}, {"y": (FLOAT, None)}, inits)
    return model, {"x": rng.standard_normal((2, 4, 9)).astype(np.float32)}


def test_a_conv_one_longer_and_a_slice_dropping_the_last_keep_the_length() -> None:
    model, feeds = _same_pad_conv(kernel=4, pads=[2, 2], ends=-1)  # time + 1, then [0:-1]
    before = run(model, feeds)
    InferShapesPass()(model)
    assert _dims(model, "conv")[2] not in ("time", "None")  # time + 1 has no name
    assert _dims(model, "sliced") == ["batch", "4", "time"]
    assert _dims(model, "y") == ["batch", "4", "time"]
    assert_same_outputs(before, run(model, feeds))


@pytest.mark.parametrize(("pads", "ends"), [([1, 2], -1), ([2, 2], -2)], ids=str)
def test_a_slice_that_leaves_another_length_stays_unknown(pads: list[int], ends: int) -> None:
    model, _ = _same_pad_conv(kernel=4, pads=pads, ends=ends)  # time - 1 either way
    InferShapesPass()(model)
    assert _dims(model, "sliced")[2] != "time"


def test_a_prefix_of_a_static_table_is_min_of_its_size_and_the_length() -> None:
    """BERT's ``position_ids[:, :seq]`` (a [1, 64] buffer): ``Min(64, seq)`` rows, which an
    Add with ``[batch, seq, H]`` turns into ``seq`` (they differ only where the Add fails)."""
    nodes = [
        *_shape_reads("x", 1, "seq_len"),
        helper.make_node("Unsqueeze", ["seq_len", "zero_axis"], ["end"]),
        helper.make_node("Slice", ["ids", "zero_axis", "end", "one_axis"], ["prefix"]),
        helper.make_node("Gather", ["table", "prefix"], ["pos"]),
        helper.make_node("Add", ["x", "pos"], ["y"]),
    ]
    inits = _AXES | {
        "zero_axis": np.array([0], np.int64),
        "one_axis": np.array([1], np.int64),
        "ids": np.arange(4, dtype=np.int64)[None],
        "table": np.arange(8, dtype=np.float32).reshape(4, 2),
    }
    model = make_model(nodes, {"x": (FLOAT, ["batch", "seq", 2])}, {"y": (FLOAT, None)}, inits)
    feeds = {"x": np.ones((2, 3, 2), np.float32)}
    before = run(model, feeds)
    InferShapesPass()(model)
    assert _dims(model, "prefix") == ["1", "Min(4, seq)"]
    assert _dims(model, "y") == ["batch", "seq", "2"]
    assert_same_outputs(before, run(model, feeds))
