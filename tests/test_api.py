"""The Python API: optimize(), user passes, and onnx-graphsurgeon functions as passes."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import onnx_ir as ir
import pytest
from conftest import (
    FLOAT,
    WHISPER,
    WHISPER_GOLDEN,
    assert_same_outputs,
    make_model,
    op_types,
    run,
)
from onnx import helper

import onnxopt
from onnxopt import registry
from onnxopt.golden import load_npz

FEEDS = {"x": np.random.default_rng(0).standard_normal((2, 32)).astype(np.float32)}


def small_model() -> ir.Model:
    """z = Identity(x) @ w + b, weights big enough for external data."""
    rng = np.random.default_rng(1)
    return make_model(
        [
            helper.make_node("Identity", ["x"], ["x1"], name="identity"),
            helper.make_node("MatMul", ["x1", "w"], ["y"], name="matmul"),
            helper.make_node("Add", ["y", "b"], ["z"], name="add"),
        ],
        {"x": (FLOAT, [2, 32])},
        {"z": (FLOAT, [2, 32])},
        {
            "w": rng.standard_normal((32, 32)).astype(np.float32),
            "b": rng.standard_normal(32).astype(np.float32),
        },
    )


@pytest.fixture
def external_model(tmp_path: Path) -> Path:
    """small_model() in ``model/``, every weight in ``model/weights.bin``."""
    folder = tmp_path / "model"
    folder.mkdir()
    path = folder / "model.onnx"
    onnx.save_model(
        ir.to_proto(small_model()),
        path,
        save_as_external_data=True,
        location="weights.bin",
        size_threshold=0,
    )
    return path


# --- optimize() ---------------------------------------------------------------------------


def test_optimize_path_writes_output(tmp_path: Path) -> None:
    out = tmp_path / "out.onnx"
    model, report = onnxopt.optimize(WHISPER, "simplify", golden=WHISPER_GOLDEN, output=out)
    assert isinstance(model, ir.Model) and isinstance(report, onnxopt.Report)
    assert report.ok and report.exit_code == 0 and report.output == str(out)
    expected = registry.aliases()["simplify"].split(",")
    assert [p.name for p in report.passes] == expected
    written, original = onnxopt.load(out), onnxopt.load(WHISPER)
    for case in load_npz(WHISPER_GOLDEN / "inputs.npz"):
        assert_same_outputs(run(original, case), run(written, case))


def test_optimize_in_memory_model_leaves_it_alone() -> None:
    model = small_model()
    result, report = onnxopt.optimize(model, "cleanup")
    assert report.ok and report.output == ""
    assert "Identity" not in op_types(result) and "Identity" in op_types(model)
    assert report.passes[0].counts.get("identity") == 1
    assert_same_outputs(run(result, FEEDS), run(small_model(), FEEDS))


def test_optimize_external_data_model_from_another_directory(external_model: Path) -> None:
    # pytest runs from the repository root, never from the model's folder.
    assert Path.cwd() != external_model.parent
    model, report = onnxopt.optimize(external_model, "cleanup")
    assert report.ok, report.passes[0].reason
    assert "Identity" not in op_types(model)


# --- user passes --------------------------------------------------------------------------


@onnxopt.register_pass
class ScaleBiasPass(onnxopt.Pass):
    """Multiply every Add's constant second input by ``factor`` (1 keeps numerics)."""

    name = "test-api-scale-bias"
    factor: float = 1.0

    def call(self, model: ir.Model) -> onnxopt.PassResult:
        scaled = 0
        for node in model.graph:
            bias = node.inputs[1] if node.op_type == "Add" else None
            if bias is not None and bias.const_value is not None:
                array = bias.const_value.numpy() * np.float32(self.factor)
                bias.const_value = ir.tensor(array, name=bias.name)
                scaled += 1
        return onnxopt.PassResult(model, scaled > 0, counts={"scaled": scaled})


def test_registered_pass_is_usable_by_name() -> None:
    _, report = onnxopt.optimize(small_model(), "cleanup,test-api-scale-bias")
    assert report.ok
    entry = report.passes[1]
    assert (entry.name, entry.status, entry.counts) == ("test-api-scale-bias", "ok", {"scaled": 1})


def test_registered_pass_breaking_numerics_is_caught() -> None:
    result, report = onnxopt.optimize(small_model(), "test-api-scale-bias(factor=3)")
    assert report.exit_code == 3
    assert report.passes[0].status == "failed" and report.passes[0].first_diverging
    assert_same_outputs(run(result, FEEDS), run(small_model(), FEEDS))  # rolled back


def test_duplicate_pass_name_is_refused() -> None:
    class Again(onnxopt.Pass):
        name = "test-api-scale-bias"

    class Builtin(onnxopt.Pass):
        name = "cleanup"

    class Alias(onnxopt.Pass):
        name = "simplify"

    for cls in (Again, Builtin, Alias):
        with pytest.raises(ValueError, match="already registered"):
            onnxopt.register_pass(cls)
    assert onnxopt.register_pass(ScaleBiasPass) is ScaleBiasPass  # the same class again is fine


# --- onnx-graphsurgeon adapter ------------------------------------------------------------


@onnxopt.gs_pass(name="test-api-gs-rename", register=False)
def rename_nodes(graph: gs.Graph) -> gs.Graph:
    """Rename every node (numerics unchanged)."""
    for index, node in enumerate(graph.nodes):
        node.name = f"renamed_{index}"
    return graph


@onnxopt.gs_pass(name="test-api-gs-bump-bias", register=False)
def bump_bias(graph: gs.Graph) -> gs.Graph:
    """Add 1 to the bias (numerics broken)."""
    bias = next(node for node in graph.nodes if node.op == "Add").inputs[1]
    bias.values = np.asarray(bias.values) + np.float32(1)
    return graph


@onnxopt.gs_pass(name="test-api-gs-copy-bias", register=False)
def copy_bias(graph: gs.Graph) -> gs.Graph:
    """Replace the bias by an equal copy (numerics unchanged)."""
    bias = next(node for node in graph.nodes if node.op == "Add").inputs[1]
    bias.values = np.array(bias.values, copy=True)
    return graph


@onnxopt.gs_pass(name="test-api-gs-read-weights", register=False)
def read_weights(graph: gs.Graph) -> None:
    """Read every weight, change nothing."""
    for tensor in graph.tensors().values():
        if isinstance(tensor, gs.Constant):
            assert np.isfinite(np.asarray(tensor.values)).all()


def test_gs_pass_preserving_numerics_passes() -> None:
    result, report = onnxopt.optimize(small_model(), [rename_nodes()])
    assert report.ok and report.passes[0].status == "ok"
    assert [node.name for node in result.graph] == ["renamed_0", "renamed_1", "renamed_2"]


def test_gs_pass_breaking_numerics_is_caught() -> None:
    result, report = onnxopt.optimize(small_model(), [bump_bias()])
    assert report.exit_code == 3 and report.passes[0].status == "failed"
    assert report.passes[0].metrics and not report.passes[0].metrics["passed"]
    assert_same_outputs(run(result, FEEDS), run(small_model(), FEEDS))  # rolled back


@pytest.mark.parametrize("keep_going", [False, True])
def test_failed_pass_never_reaches_the_callers_model(keep_going: bool) -> None:
    model = small_model()
    _, report = onnxopt.optimize(model, [bump_bias()], keep_going=keep_going)
    assert report.passes[0].status == "failed"
    assert_same_outputs(run(model, FEEDS), run(small_model(), FEEDS))


def test_gs_pass_registered_by_name() -> None:
    onnxopt.gs_pass(rename_nodes.function, name="test-api-gs-rename-by-name")
    _, report = onnxopt.optimize(small_model(), "test-api-gs-rename-by-name")
    assert report.ok and report.passes[0].status == "ok"


def test_gs_pass_on_external_data_reattaches_weights(external_model: Path, tmp_path: Path) -> None:
    out = tmp_path / "out.onnx"
    model, report = onnxopt.optimize(external_model, [rename_nodes()], output=out)
    assert report.ok, report.passes[0].reason
    assert report.passes[0].counts["weights-reattached"] > 0
    weights = [v.const_value for v in model.graph.initializers.values()]
    assert all(isinstance(t, ir.ExternalTensor) for t in weights)
    assert {Path(t.path).resolve() for t in weights} == {external_model.parent / "weights.bin"}
    assert_same_outputs(run(onnxopt.load(out), FEEDS), run(small_model(), FEEDS))


def test_gs_pass_on_external_data_from_another_directory(external_model: Path) -> None:
    _, report = onnxopt.optimize(external_model, [rename_nodes()])
    assert report.ok, report.passes[0].reason


def test_gs_pass_can_read_external_weights(external_model: Path) -> None:
    _, report = onnxopt.optimize(external_model, [read_weights()])
    assert report.ok, report.passes[0].reason


def test_gs_pass_reading_weights_keeps_them_external(external_model: Path) -> None:
    model, report = onnxopt.optimize(external_model, [read_weights()])
    assert report.ok
    assert all(
        isinstance(v.const_value, ir.ExternalTensor) for v in model.graph.initializers.values()
    )
    assert_same_outputs(run(model, FEEDS), run(small_model(), FEEDS))


def test_gs_pass_can_rewrite_external_weights(external_model: Path) -> None:
    model, report = onnxopt.optimize(external_model, [copy_bias()])
    assert report.ok, report.passes[0].reason
    assert_same_outputs(run(model, FEEDS), run(small_model(), FEEDS))
