"""stream-rnn: GRU/LSTM/RNN states become inputs and outputs; chunked == offline."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import pytest
from conftest import FLOAT, INT64, make_model, op_types
from onnx import helper

from onnxopt import Pipeline, UnsupportedModelError, UsageError
from onnxopt.passes.stream_conv import StreamConvPass
from onnxopt.passes.stream_rnn import StreamRnnPass
from onnxopt.streaming import StreamingSession, StreamSpec, offline_difference

F, H = 6, 8
_GATES = {"RNN": 1, "GRU": 3, "LSTM": 4}


def _weights(rng, op: str, name: str, inputs: int, dirs: int = 1) -> dict[str, np.ndarray]:
    g = _GATES[op]
    scale = 1 / np.sqrt(H)
    return {
        f"{name}_W": (rng.standard_normal((dirs, g * H, inputs)) * scale).astype(np.float32),
        f"{name}_R": (rng.standard_normal((dirs, g * H, H)) * scale).astype(np.float32),
        f"{name}_B": (rng.standard_normal((dirs, 2 * g * H)) * 0.1).astype(np.float32),
    }


def _rnn(op: str, name: str, x: str, outputs: list[str], *extra: str, **attrs) -> object:
    ins = [x, f"{name}_W", f"{name}_R", f"{name}_B", *extra]
    return helper.make_node(op, ins, outputs, name=name, hidden_size=H, **attrs)


def _keyword_spotter(rng) -> ir.Model:
    """x[batch, time, F] -> 2-layer GRU -> per-frame scores y and logits from the last state.

    The first layer's zero initial state is built from Shape(x) as torch.onnx writes it.
    """
    nodes = [
        helper.make_node("Shape", ["x"], ["shape"]),
        helper.make_node("Gather", ["shape", "zero"], ["b"]),
        helper.make_node("Concat", ["one", "b", "hidden"], ["h0_shape"], axis=0),
        helper.make_node("ConstantOfShape", ["h0_shape"], ["h0"]),
        helper.make_node("Transpose", ["x"], ["xt"], perm=[1, 0, 2]),
        _rnn("GRU", "gru1", "xt", ["y1"], "", "h0", linear_before_reset=1),
        helper.make_node("Squeeze", ["y1", "one"], ["s1"]),
        _rnn("GRU", "gru2", "s1", ["y2", "h2"]),
        helper.make_node("Squeeze", ["y2", "one"], ["s2"]),
        helper.make_node("Transpose", ["s2"], ["s2t"], perm=[1, 0, 2]),
        helper.make_node("MatMul", ["s2t", "w_frame"], ["y"]),
        helper.make_node("Squeeze", ["h2", "zero1"], ["last"]),
        helper.make_node("MatMul", ["last", "w_out"], ["logits"]),
    ]
    inits = {
        **_weights(rng, "GRU", "gru1", F),
        **_weights(rng, "GRU", "gru2", H),
        "w_frame": rng.standard_normal((H, 3)).astype(np.float32),
        "w_out": rng.standard_normal((H, 4)).astype(np.float32),
        "zero": np.array([0]),
        "zero1": np.array([0]),
        "one": np.array([1]),
        "hidden": np.array([H]),
    }
    return make_model(
        nodes,
        {"x": (FLOAT, ["batch", "time", F])},
        {"y": (FLOAT, ["batch", "time", 3]), "logits": (FLOAT, ["batch", 4])},
        inits,
    )


def _lstm_stack(rng, layout: int = 0, expand: bool = True) -> ir.Model:
    """A 2-layer LSTM; layer 1 starts from a learned state (expanded to the batch)."""
    x_shape = ["batch", "time", F] if layout else ["time", "batch", F]
    squeeze_axis = 2 if layout else 1
    nodes = [
        helper.make_node("Shape", ["x"], ["shape"]),
        helper.make_node("Gather", ["shape", "batch_axis"], ["b"]),
        helper.make_node(
            "Concat",
            ["b", "one", "hidden"] if layout else ["one", "b", "hidden"],
            ["h0_shape"],
            axis=0,
        ),
        helper.make_node("Expand", ["h0_learned"], ["h0"])
        if False
        else helper.make_node("Expand", ["h0_learned", "h0_shape"], ["h0"]),
        _rnn("LSTM", "lstm1", "x", ["y1"], "", "h0" if expand else "h0_learned", layout=layout),
        helper.make_node("Squeeze", ["y1", "dirs"], ["s1"]),
        _rnn("LSTM", "lstm2", "s1", ["y2", "h2", "c2"], layout=layout),
        helper.make_node("Squeeze", ["y2", "dirs"], ["y"]),
    ]
    inits = {
        **_weights(rng, "LSTM", "lstm1", F),
        **_weights(rng, "LSTM", "lstm2", H),
        "h0_learned": rng.standard_normal((1, 1, H)).astype(np.float32),
        "batch_axis": np.array([0 if layout else 1]),
        "one": np.array([1]),
        "hidden": np.array([H]),
        "dirs": np.array([squeeze_axis]),
    }
    y_shape = ["batch", "time", H] if layout else ["time", "batch", H]
    return make_model(
        nodes,
        {"x": (FLOAT, x_shape)},
        {"y": (FLOAT, y_shape), "h2": (FLOAT, None), "c2": (FLOAT, None)},
        inits,
    )


def _streamed(model: ir.Model, pass_: StreamRnnPass) -> tuple[ir.Model, object]:
    result, report = Pipeline([pass_]).run(model)
    entry = report.passes[0]
    assert entry.status == "ok", entry.reason
    return result, entry


def _feeds(rng, shape: tuple[int, ...]) -> dict[str, np.ndarray]:
    return {"x": rng.standard_normal(shape).astype(np.float32)}


def test_gru_keyword_spotter_streams(rng) -> None:
    model = _keyword_spotter(rng)
    result, entry = _streamed(model, StreamRnnPass(chunk=8))
    assert entry.counts == {"gru-state": 2}
    assert entry.metrics["passed"] and entry.metrics["max_abs"] < 1e-5
    names = [v.name for v in result.graph.inputs]
    assert names == ["x", "gru1.h_in", "gru2.h_in"]
    assert [v.name for v in result.graph.outputs] == ["y", "logits", "gru1.h_out", "gru2.h_out"]
    spec = StreamSpec.read(result)
    assert spec.outputs == {"y": 1, "logits": None} and spec.chunk == 8
    assert spec.states[0].shape == [1, "batch", H] and spec.states[0].initial == 0.0
    assert "Shape" not in op_types(result)  # the computed initial state is gone
    diff = offline_difference(model, result, _feeds(rng, (3, 41, F)), chunks=[1, 5, 8, 64])
    assert diff < 1e-5


def test_lstm_stack_streams_with_a_learned_initial_state(rng) -> None:
    model = _lstm_stack(rng, layout=0)
    result, entry = _streamed(model, StreamRnnPass(chunk=4))
    assert entry.counts == {"lstm-state": 2}
    states = {s.input: s for s in StreamSpec.read(result).states}
    assert set(states) == {"lstm1.h_in", "lstm1.c_in", "lstm2.h_in", "lstm2.c_in"}
    assert states["lstm1.h_in"].shape == [1, "batch", H]
    assert np.asarray(states["lstm1.h_in"].initial).shape == (1, 1, H)
    assert states["lstm1.c_in"].initial == 0.0
    # the model's own final-state outputs stay (last chunk's values), beside the state outputs
    assert StreamSpec.read(result).outputs == {"y": 0, "h2": None, "c2": None}
    assert {"lstm2.h_out", "lstm2.c_out"} <= {v.name for v in result.graph.outputs}
    assert offline_difference(model, result, _feeds(rng, (29, 2, F)), chunks=[3, 4, 29]) < 1e-5


def test_batch_first_layout_puts_the_batch_first_in_states(rng) -> None:
    """layout=1 (ONNX Runtime's CPU kernels do not run it, so only the structure is checked)."""
    model = _lstm_stack(rng, layout=1, expand=False)
    learned_h0 = model.graph.initializers["h0_learned"].const_value.numpy()
    result = StreamRnnPass(chunk=4)(model)
    assert result.counts == {"lstm-state": 2}
    spec = StreamSpec.read(result.model)
    assert [s.shape for s in spec.states] == [["batch", 1, H]] * 4
    assert spec.outputs == {"y": 1, "h2": None, "c2": None}
    learned = np.asarray(spec.states[0].initial)
    np.testing.assert_array_equal(learned, learned_h0)


def test_vanilla_rnn_on_a_time_major_input(rng) -> None:
    nodes = [_rnn("RNN", "rnn", "x", ["y4"]), helper.make_node("Squeeze", ["y4", "one"], ["y"])]
    inits = {**_weights(rng, "RNN", "rnn", F), "one": np.array([1])}
    model = make_model(nodes, {"x": (FLOAT, ["time", "batch", F])}, {"y": (FLOAT, None)}, inits)
    result, entry = _streamed(model, StreamRnnPass(chunk=2))
    assert entry.counts == {"rnn-state": 1}
    assert StreamSpec.read(result).inputs == {"x": 0}


@pytest.mark.parametrize("direction", ["bidirectional", "reverse"])
def test_backward_recurrences_are_refused_by_name(rng, direction) -> None:
    dirs = 2 if direction == "bidirectional" else 1
    node = _rnn("LSTM", "blstm", "x", ["y"], direction=direction)
    model = make_model(
        [node],
        {"x": (FLOAT, ["time", "batch", F])},
        {"y": (FLOAT, None)},
        _weights(rng, "LSTM", "blstm", F, dirs),
    )
    with pytest.raises(UnsupportedModelError, match=f"node 'blstm' \\(LSTM\\) runs {direction}"):
        StreamRnnPass()(model)


def test_sequence_lengths_are_refused(rng) -> None:
    node = _rnn("GRU", "gru", "x", ["y"], "lens")
    model = make_model(
        [node],
        {"x": (FLOAT, ["time", "batch", F]), "lens": (INT64, ["batch"])},
        {"y": (FLOAT, None)},
        _weights(rng, "GRU", "gru", F),
    )
    with pytest.raises(UnsupportedModelError, match=r"'gru'.*sequence lengths"):
        StreamRnnPass()(model)


def test_a_model_with_its_own_state_inputs_is_left_unchanged(rng) -> None:
    node = _rnn("GRU", "gru", "x", ["y", "h_out"], "", "h_in")
    model = make_model(
        [node],
        {"x": (FLOAT, ["time", "batch", F]), "h_in": (FLOAT, [1, "batch", H])},
        {"y": (FLOAT, None), "h_out": (FLOAT, None)},
        _weights(rng, "GRU", "gru", F),
    )
    result, report = Pipeline([StreamRnnPass()]).run(model)
    entry = report.passes[0]
    assert entry.status == "unchanged"
    assert "takes its state from input 'h_in'" in entry.notes[0]
    assert StreamSpec.read(result) is None


def test_a_streamed_model_is_not_streamed_twice(rng) -> None:
    result, _ = _streamed(_keyword_spotter(rng), StreamRnnPass())
    again = StreamRnnPass()(result)
    assert not again.modified and "streams already" in again.notes[0]


def test_other_families_name_the_pass_they_need(rng) -> None:
    with pytest.raises(UsageError, match="'gru1' \\(GRU\\) keeps past frames; it needs stream-rnn"):
        StreamConvPass()(_keyword_spotter(rng))


def test_chunk_option_sets_the_chunk_the_model_is_verified_with(rng) -> None:
    result = StreamRnnPass(chunk=3)(_keyword_spotter(rng)).model
    assert StreamSpec.read(result).chunk == 3
    session = StreamingSession(result)
    assert [c["x"].shape[1] for c in session.chunks(_feeds(rng, (1, 7, F)))] == [3, 3, 1]
    with pytest.raises(UsageError, match="chunk"):
        StreamRnnPass.from_options({"chunk": "0"})
