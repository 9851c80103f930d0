"""`onnxopt run --passes stream(...)` and `inspect` of the streaming model, end to end."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from onnx import helper, numpy_helper

from onnxopt.cli.main import cli

F, H = 3, 4


def _gru_file(tmp_path, direction: str = "forward"):
    dirs = 2 if direction == "bidirectional" else 1
    rng = np.random.default_rng(0)
    weights = {
        "W": rng.standard_normal((dirs, 3 * H, F)).astype(np.float32) * 0.5,
        "R": rng.standard_normal((dirs, 3 * H, H)).astype(np.float32) * 0.5,
        "B": rng.standard_normal((dirs, 6 * H)).astype(np.float32) * 0.1,
    }
    nodes = [
        helper.make_node("GRU", ["x", "W", "R", "B"], ["y"], hidden_size=H, direction=direction),
    ]
    graph = helper.make_graph(
        nodes,
        "gru",
        [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["time", "batch", F])],
        [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, None)],
        [numpy_helper.from_array(a, n) for n, a in weights.items()],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    path = tmp_path / f"gru_{direction}.onnx"
    onnx.save(model, path)
    return path


def test_stream_then_inspect_shows_the_state(tmp_path) -> None:
    out = tmp_path / "stream.onnx"
    runner = CliRunner()
    result = runner.invoke(
        cli, ["run", str(_gru_file(tmp_path)), "-o", str(out), "--passes", "stream(chunk=4)"]
    )
    assert result.exit_code == 0, result.output
    assert "stream(chunk=4)" in result.output and " ok " in result.output
    shown = runner.invoke(cli, ["inspect", str(out)])
    assert shown.exit_code == 0, shown.output
    assert "streaming: chunk 4 frames" in shown.output
    assert "state" in shown.output and ".h_in" in shown.output


@pytest.mark.parametrize(
    ("direction", "spec", "code"),
    [("bidirectional", "stream(chunk=4)", 4), ("forward", "stream(chunk=0)", 2)],
)
def test_a_model_or_option_stream_refuses_exits_with_its_code(tmp_path, direction, spec, code):
    out = tmp_path / "stream.onnx"
    result = CliRunner().invoke(
        cli, ["run", str(_gru_file(tmp_path, direction)), "-o", str(out), "--passes", spec]
    )
    assert result.exit_code == code, result.output
    assert "Traceback" not in result.output and not out.exists()
