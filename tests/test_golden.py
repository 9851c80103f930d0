"""Golden sets: synthesis, capture, files, input checks."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import FLOAT, INT64, WHISPER, make_model, run
from onnx import TensorProto, helper

from onnxopt import GoldenSet, UnsupportedModelError, UsageError, load
from onnxopt.golden import capture, check_inputs, synthesize


def _two_input_model():
    nodes = [
        helper.make_node("Cast", ["ids"], ["idf"], to=TensorProto.FLOAT),
        helper.make_node("ReduceSum", ["idf"], ["s"], keepdims=1),
        helper.make_node("Add", ["x", "s"], ["y"]),
    ]
    return make_model(
        nodes,
        {"x": (FLOAT, ["batch", "time", 4]), "ids": (INT64, ["batch", "n"])},
        {"y": (FLOAT, None)},
    )


def test_synthesize_uses_dims_and_varies_free_ones() -> None:
    cases, dims = synthesize(_two_input_model(), dims={"time": 7}, shapes=2)
    assert len(cases) == 2
    assert [c["x"].shape for c in cases] == [(1, 7, 4), (2, 7, 4)]
    assert [d["time"] for d in dims] == [7, 7]
    assert cases[0]["ids"].dtype == np.int64 and set(np.unique(cases[1]["ids"])) <= {0, 1}
    assert cases[1]["ids"].shape[0] == cases[1]["x"].shape[0]  # same symbol, same size


def test_synthesize_is_seeded() -> None:
    model = _two_input_model()
    a, _ = synthesize(model, seed=3)
    b, _ = synthesize(model, seed=3)
    c, _ = synthesize(model, seed=4)
    np.testing.assert_array_equal(a[0]["x"], b[0]["x"])
    assert not np.array_equal(a[0]["x"], c[0]["x"])


def test_unknown_dim_is_a_usage_error() -> None:
    with pytest.raises(UsageError, match="frames"):
        synthesize(_two_input_model(), dims={"frames": 3})


def test_capture_save_load_round_trip(tmp_path) -> None:
    model = load(WHISPER)
    golden = capture(model, dims={"frames": 30})
    assert [c["mel"].shape[2] for c in golden.inputs] == [30, 30]
    for feeds, outputs in zip(golden.inputs, golden.outputs, strict=True):
        np.testing.assert_array_equal(run(model, feeds)["hidden"], outputs["hidden"])
    golden.tolerances = {"exact": {"atol": 1e-3}}
    loaded = GoldenSet.load(golden.save(tmp_path / "g"))
    assert loaded.dims == golden.dims and loaded.seed == 0
    np.testing.assert_array_equal(loaded.inputs[1]["mel"], golden.inputs[1]["mel"])
    np.testing.assert_array_equal(loaded.outputs[1]["hidden"], golden.outputs[1]["hidden"])
    assert loaded.tolerance("exact").atol == 1e-3
    assert loaded.tolerance("exact", {"atol": 0.5}).atol == 0.5


def test_user_npz_with_plain_names_is_one_case(tmp_path) -> None:
    mel = np.zeros((1, 80, 10), np.float32)
    np.savez(tmp_path / "inputs.npz", mel=mel)
    np.savez(tmp_path / "outputs.npz", hidden=np.zeros((1, 5, 128), np.float32))
    golden = GoldenSet.load(tmp_path)
    assert len(golden.inputs) == 1 and golden.source == "user"
    check_inputs(load(WHISPER), golden.inputs)


@pytest.mark.parametrize(
    ("feeds", "message"),
    [
        ({"x": np.zeros((1, 80, 10), np.float32)}, "missing mel"),
        ({"mel": np.zeros((1, 80, 10), np.float64)}, "float64"),
        ({"mel": np.zeros((1, 10), np.float32)}, "rank 2"),
        ({"mel": np.zeros((1, 81, 10), np.float32)}, "axis 1 is 81"),
    ],
)
def test_check_inputs_rejects_mismatches(feeds, message) -> None:
    with pytest.raises(UsageError, match=message):
        check_inputs(load(WHISPER), [feeds])


def test_missing_folder_and_files(tmp_path) -> None:
    with pytest.raises(UsageError, match="not found"):
        GoldenSet.load(tmp_path / "nope")
    with pytest.raises(UsageError, match=r"inputs\.npz"):
        GoldenSet.load(tmp_path)


def test_untyped_input_cannot_be_synthesized() -> None:
    model = make_model(
        [helper.make_node("Identity", ["x"], ["y"])], {"x": (FLOAT, None)}, {"y": (FLOAT, None)}
    )
    with pytest.raises(UnsupportedModelError, match="--inputs"):
        synthesize(model)


def test_more_shapes_give_more_distinct_cases() -> None:
    cases, dims = synthesize(_two_input_model(), shapes=3)
    assert [c["x"].shape[:2] for c in cases] == [(1, 16), (2, 23), (3, 30)]
    assert len({tuple(d.values()) for d in dims}) == 3
