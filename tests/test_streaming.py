"""The streaming driver, its metadata, chunked verification and the causality analysis."""

from __future__ import annotations

import json

import numpy as np
import onnx_ir as ir
import pytest
from conftest import FLOAT, INT64, make_model, run
from onnx import helper

from onnxopt import Pipeline, UnsupportedModelError, UsageError, VerificationError
from onnxopt.passes.stream_conv import StreamConvPass
from onnxopt.streaming import (
    METADATA_KEY,
    StateSpec,
    StreamingSession,
    StreamSpec,
    describe,
    offline_difference,
    run_chunked,
    verification_chunks,
)


def _accumulator(*, threaded: bool = True) -> ir.Model:
    """A hand-made streaming model: y = running sum of x over time, the sum carried as state.

    With ``threaded=False`` the state output is the chunk's own sum, so chunkings disagree.
    """
    nodes = [
        helper.make_node("CumSum", ["x", "one"], ["cs"]),
        helper.make_node("Add", ["cs", "sum_in"], ["y"]),
        helper.make_node("Slice", ["y" if threaded else "cs", "m1", "big", "one"], ["sum_out"]),
        helper.make_node("ReduceSum", ["y", "one"], ["total"], keepdims=0),
    ]
    model = make_model(
        nodes,
        {"x": (FLOAT, ["batch", "time"]), "sum_in": (FLOAT, ["batch", 1])},
        {"y": (FLOAT, ["batch", "time"]), "sum_out": (FLOAT, ["batch", 1]), "total": (FLOAT, None)},
        {"one": np.array([1]), "m1": np.array([-1]), "big": np.array([2**62])},
    )
    spec = StreamSpec(
        chunk=4,
        inputs={"x": 1},
        outputs={"y": 1, "total": None},
        states=[StateSpec("sum_in", "sum_out", ["batch", 1], initial=0.0)],
        batch=("x", 0),
    )
    spec.write(model)
    return model


def test_session_matches_the_offline_computation_for_any_chunking() -> None:
    x = np.random.default_rng(0).standard_normal((2, 11)).astype(np.float32)
    session = StreamingSession(_accumulator())
    for chunk in (1, 3, 4, 11, 50):
        out = session.run({"x": x}, chunk)
        np.testing.assert_allclose(out["y"], np.cumsum(x, axis=1), rtol=1e-5, atol=1e-5)
        assert out["total"].shape == (2,)  # the last chunk's value, not concatenated
    assert [c["x"].shape[1] for c in session.chunks({"x": x}, 4)] == [4, 4, 3]


def test_step_threads_states_by_hand() -> None:
    session = StreamingSession(_accumulator())
    x = np.ones((1, 6), np.float32)
    state = session.initial_state({"x": x})
    assert state["sum_in"].shape == (1, 1) and not state["sum_in"].any()
    out, state = session.step({"x": x[:, :3]}, state)
    out, state = session.step({"x": x[:, 3:]}, state)
    np.testing.assert_array_equal(out["y"], [[4, 5, 6]])
    np.testing.assert_array_equal(state["sum_in"], [[6]])


def test_metadata_round_trips_and_describes(tmp_path) -> None:
    model = _accumulator()
    spec = StreamSpec.read(model)
    assert StreamSpec.from_json(spec.to_json()) == spec
    data = json.loads(model.metadata_props[METADATA_KEY])
    assert data["version"] == 1 and data["states"][0]["shape"] == ["batch", 1]
    lines = describe(spec)
    assert lines[0].startswith("streaming: chunk 4") and any(
        "sum_in -> sum_out" in s for s in lines
    )
    path = tmp_path / "acc.onnx"
    ir.save(model, path)
    assert StreamingSession(path).spec == spec


def test_state_dims_follow_the_batch_and_grow_from_empty() -> None:
    state = StateSpec("k_in", "k_out", ["2*batch", 4, "past"], initial=0.0, grow_axis=2)
    assert state.initial_value(3).shape == (6, 4, 0)
    learned = StateSpec("h", "h_out", [1, "batch", 2], initial=[[[1.0, 2.0]]])
    np.testing.assert_array_equal(learned.initial_value(2), [[[1, 2], [1, 2]]])


def test_session_refuses_plain_models_and_bad_chunks() -> None:
    plain = make_model(
        [helper.make_node("Relu", ["x"], ["y"])], {"x": (FLOAT, [3])}, {"y": (FLOAT, [3])}
    )
    with pytest.raises(UsageError, match="not streaming"):
        StreamingSession(plain)
    model = _accumulator()
    spec = StreamSpec.read(model)
    spec.frame_multiple = 4
    spec.write(model)
    with pytest.raises(UsageError, match="multiple of 4"):
        StreamingSession(model).run({"x": np.zeros((1, 8), np.float32)}, chunk=6)
    with pytest.raises(UsageError, match="missing chunked input"):
        StreamingSession(model).run({}, chunk=4)


def test_verification_chunks_include_one_that_does_not_divide() -> None:
    assert verification_chunks(16, 1, 16) == [16, 1, 3]
    assert verification_chunks(8, 4, 16) == [8, 4, 12]
    sizes = verification_chunks(16, 2, 2000)
    assert all(s % 2 == 0 for s in sizes) and 2000 // sizes[1] <= 256
    assert any(2000 % s for s in sizes)


def test_run_chunked_catches_chunkings_that_disagree() -> None:
    x = {"x": np.random.default_rng(1).standard_normal((1, 9)).astype(np.float32)}
    outputs = run_chunked(_accumulator(), [x])
    np.testing.assert_allclose(outputs[0]["y"], np.cumsum(x["x"], axis=1), rtol=1e-5)
    with pytest.raises(VerificationError, match="disagree"):
        run_chunked(_accumulator(threaded=False), [x])


# --- the analysis, through a pass: what reads future frames is refused by name ----------------


def _conv_then(nodes: list, outputs: dict, extra: dict | None = None) -> ir.Model:
    """x[batch, 2, time] -> causal Conv 'conv' (k=3) -> ``nodes`` (reading 'c')."""
    w = np.random.default_rng(2).standard_normal((2, 2, 3)).astype(np.float32)
    conv = helper.make_node("Conv", ["x", "w"], ["c"], pads=[2, 0], name="conv")
    return make_model(
        [conv, *nodes], {"x": (FLOAT, ["batch", 2, "time"])}, outputs, {"w": w, **(extra or {})}
    )


@pytest.mark.parametrize(
    ("node", "extra", "reason"),
    [
        (helper.make_node("ReduceMean", ["c"], ["y"], axes=[2], name="pool"), {}, "reduces over"),
        (helper.make_node("GlobalAveragePool", ["c"], ["y"], name="pool"), {}, "every frame"),
        (helper.make_node("Softmax", ["c"], ["y"], axis=2, name="pool"), {}, "normalizes over"),
        (helper.make_node("CumSum", ["c", "ax"], ["y"], name="pool"), {"ax": np.array(2)}, "accum"),
        (
            helper.make_node("Add", ["c", "table"], ["y"], name="pool"),
            {"table": np.zeros((1, 1, 16), np.float32)},
            "absolute position",
        ),
    ],
)
def test_nodes_reading_all_frames_are_refused_by_name(node, extra, reason) -> None:
    model = _conv_then([node], {"y": (FLOAT, None)}, extra)
    with pytest.raises(UnsupportedModelError, match=rf"node 'pool' .*{reason}"):
        StreamConvPass()(model)


def _positions(g_nodes: list, start: int = 0) -> tuple[list, dict]:
    """Nodes computing float positions ``start..start+T-1`` of 'c' along time -> 'posf'."""
    nodes = [
        helper.make_node("Shape", ["c"], ["shape"]),
        helper.make_node("Gather", ["shape", "two"], ["t"]),
        helper.make_node("Range", ["start", "t", "one"], ["pos"], name="positions"),
        helper.make_node("Cast", ["pos"], ["posf"], to=FLOAT),
        *g_nodes,
    ]
    extra = {"two": np.array(2), "start": np.array(start), "one": np.array(1)}
    return nodes, extra


def test_absolute_positions_count_from_the_stream_position() -> None:
    nodes, extra = _positions([helper.make_node("Add", ["c", "posf"], ["y"], name="add_pos")])
    model = _conv_then(nodes, {"y": (FLOAT, ["batch", 2, "time"])}, extra)
    result, report = Pipeline([StreamConvPass(chunk=4)]).run(model.clone())
    entry = report.passes[0]
    assert entry.status == "ok", entry.reason
    assert entry.counts == {"conv-cache": 1, "position-offset": 1}
    assert "stream.position_in" in {s.input for s in StreamSpec.read(result).states}
    x = {"x": np.random.default_rng(7).standard_normal((1, 2, 19)).astype(np.float32)}
    assert offline_difference(model, result, x, chunks=[1, 4, 5]) < 1e-5


def test_positions_counted_another_way_are_refused() -> None:
    nodes, extra = _positions([helper.make_node("Add", ["c", "posf"], ["y"], name="add_pos")], 1)
    model = _conv_then(nodes, {"y": (FLOAT, None)}, extra)
    with pytest.raises(UnsupportedModelError, match=r"'add_pos'.*absolute position"):
        StreamConvPass()(model)
    reverse = [
        helper.make_node("Sub", ["t", "pos"], ["left"], name="frames_left"),
        helper.make_node("Cast", ["left"], ["leftf"], to=FLOAT),
        helper.make_node("Add", ["c", "leftf"], ["y"]),
    ]
    nodes, extra = _positions(reverse)
    with pytest.raises(UnsupportedModelError, match=r"'frames_left'.*input length"):
        StreamConvPass()(_conv_then(nodes, {"y": (FLOAT, None)}, extra))


def test_shape_arithmetic_on_the_batch_and_time_is_followed() -> None:
    """Reshape to a shape computed from Shape (as exporters write it) keeps the time axis."""
    nodes = [
        helper.make_node("Shape", ["c"], ["shape"]),
        helper.make_node("Gather", ["shape", "idx"], ["bt"]),
        helper.make_node("Concat", ["bt", "minus1"], ["target"], axis=0),
        helper.make_node("Transpose", ["c"], ["ct"], perm=[0, 2, 1]),
        helper.make_node("Reshape", ["ct", "target"], ["y"]),
    ]
    extra = {"idx": np.array([0, 2]), "minus1": np.array([-1])}
    model = _conv_then(nodes, {"y": (FLOAT, ["batch", "time", 2])}, extra)
    result, report = Pipeline([StreamConvPass(chunk=4)]).run(model)
    assert report.passes[0].status == "ok", report.passes[0].reason
    assert StreamSpec.read(result).outputs == {"y": 1}


def test_time_axis_is_guessed_or_must_be_given() -> None:
    w = np.random.default_rng(3).standard_normal((2, 2, 3)).astype(np.float32)
    conv = helper.make_node("Conv", ["x", "w"], ["y"], pads=[2, 0], name="conv")
    model = make_model([conv], {"x": (FLOAT, ["d0", 2, "d1"])}, {"y": (FLOAT, None)}, {"w": w})
    with pytest.raises(UsageError, match="give the time_axis option"):
        StreamConvPass()(model.clone())
    result = StreamConvPass(time_axis=2)(model.clone())
    assert result.modified and StreamSpec.read(result.model).inputs == {"x": 2}
    with pytest.raises(UnsupportedModelError, match=r"'conv'.*not a spatial axis"):
        StreamConvPass(time_axis=0)(model.clone())


def test_stream_passes_parse_from_a_spec() -> None:
    from onnxopt import spec

    built = spec.build("stream(chunk=8,left_context=4),stream-conv(time_axis=2)")
    assert [p.name for p in built] == ["stream", "stream-conv"]
    assert built[0].kind == "interface" and (built[0].chunk, built[0].left_context) == (8, 4)
    assert spec.to_spec(built) == "stream(chunk=8,left_context=4),stream-conv(time_axis=2)"
    with pytest.raises(UsageError, match="no option 'left_context'"):
        spec.build("stream-conv(left_context=4)")


def test_streaming_model_runs_offline_length_inputs_through_the_pipeline() -> None:
    """Exact passes after a stream pass are verified chunk by chunk too."""
    from onnxopt.passes.cleanup import CleanupPass

    nodes = [helper.make_node("Identity", ["c"], ["y"])]
    model = _conv_then(nodes, {"y": (FLOAT, ["batch", 2, "time"])})
    result, report = Pipeline([StreamConvPass(chunk=4), CleanupPass()]).run(model)
    assert [p.status for p in report.passes] == ["ok", "ok"]
    x = np.random.default_rng(4).standard_normal((1, 2, 10)).astype(np.float32)
    expected = run(model, {"x": x})["y"]
    np.testing.assert_allclose(StreamingSession(result).run({"x": x})["y"], expected, atol=1e-5)


def test_int64_time_inputs_are_chunked_too() -> None:
    """A token model: Gather(embedding, tokens) keeps the tokens' time axis."""
    table = np.random.default_rng(5).standard_normal((10, 2)).astype(np.float32)
    w = np.random.default_rng(6).standard_normal((2, 2, 3)).astype(np.float32)
    nodes = [
        helper.make_node("Gather", ["table", "tokens"], ["emb"]),
        helper.make_node("Transpose", ["emb"], ["x"], perm=[0, 2, 1]),
        helper.make_node("Conv", ["x", "w"], ["y"], pads=[2, 0], name="conv"),
    ]
    model = make_model(
        nodes,
        {"tokens": (INT64, ["batch", "time"])},
        {"y": (FLOAT, None)},
        {"table": table, "w": w},
    )
    result, report = Pipeline([StreamConvPass(chunk=4)]).run(model)
    assert report.passes[0].status == "ok", report.passes[0].reason
    assert StreamSpec.read(result).inputs == {"tokens": 1}
