"""The pass manager: verify after each change, roll back failures, report, reproduce."""

from __future__ import annotations

import json

import numpy as np
import onnx_ir as ir
import pytest
from conftest import FLOAT, WHISPER, WHISPER_GOLDEN, make_model, op_types, run
from onnx import helper

from onnxopt import GoldenSet, Pass, PassResult, Pipeline, load
from onnxopt.passes.cleanup import CleanupPass


class ScaleWeight(Pass):
    """Scales the first MatMul weight: a deliberate numerics bug."""

    name = "test-scale-weight"
    factor: float = 2.0

    def call(self, model):
        for node in model.graph:
            if node.op_type == "MatMul" and node.inputs[1].const_value is not None:
                w = node.inputs[1]
                w.const_value = ir.tensor(w.const_value.numpy() * self.factor, name=w.name)
                return PassResult(model, True, counts={"scaled": 1})
        return PassResult(model, False)


class LieAboutChange(ScaleWeight):
    """Breaks numerics but reports no change: the manager trusts ``modified``."""

    name = "test-lie"

    def call(self, model):
        super().call(model)
        return PassResult(model, False)


class Dangle(Pass):
    """Points a node at a value nothing produces."""

    name = "test-dangle"

    def call(self, model):
        node = next(iter(model.graph))
        node.replace_input_with(0, ir.Value(name="ghost"))
        return PassResult(model, True)


class Crash(Pass):
    name = "test-crash"

    def call(self, model):
        raise RuntimeError("boom")


class Approximate(ScaleWeight):
    name = "test-approx"
    kind = "approximate"


class AddGainInput(Pass):
    """An interface pass: a new graph input ``gain`` multiplies the output; run with gain 1."""

    name = "test-gain-input"
    kind = "interface"

    def call(self, model):
        gain = ir.Value(name="gain", type=ir.TensorType(ir.DataType.FLOAT), shape=ir.Shape([1]))
        model.graph.inputs.append(gain)
        out = model.graph.outputs[0]
        mul = ir.node("Mul", [out, gain], name="gain_mul")
        model.graph.append(mul)
        mul.outputs[0].name, mul.outputs[0].dtype, mul.outputs[0].shape = (
            "y_gain",
            out.dtype,
            out.shape,
        )
        model.graph.outputs[0] = mul.outputs[0]
        return PassResult(model, True)

    def run_golden(self, model, cases):
        from onnxopt import ort_runner

        ones = np.ones(1, np.float32)
        outputs = ort_runner.run(model, [{**case, "gain": ones} for case in cases])
        return [{"y": out["y_gain"]} for out in outputs]


def _matmul_model():
    w = np.random.default_rng(1).standard_normal((4, 4)).astype(np.float32)
    nodes = [
        helper.make_node("MatMul", ["x", "w"], ["h"], name="mm"),
        helper.make_node("Relu", ["h"], ["r"], name="relu"),
        helper.make_node("Identity", ["r"], ["y"], name="id"),
    ]
    return make_model(nodes, {"x": (FLOAT, ["batch", 4])}, {"y": (FLOAT, ["batch", 4])}, {"w": w})


def test_verified_pipeline_on_the_shipped_model() -> None:
    model = load(WHISPER)
    golden = GoldenSet.load(WHISPER_GOLDEN)
    result, report = Pipeline("simplify", golden=golden).run(model)
    assert report.ok and report.exit_code == 0
    assert [p.status for p in report.passes] == ["ok", "ok", "unchanged", "ok", "unchanged"]
    _, fold, _, cleanup, _ = report.passes
    assert fold.counts["Constant"] > 0 and fold.nodes_after < fold.nodes_before
    assert cleanup.counts["cse"] > 0 and cleanup.nodes_after < cleanup.nodes_before
    assert cleanup.metrics["passed"] and cleanup.tolerance == "atol=0.0001, rtol=0.001"
    for feeds, expected in zip(golden.inputs, golden.outputs, strict=True):
        np.testing.assert_allclose(run(result, feeds)["hidden"], expected["hidden"], atol=1e-5)


def test_failing_pass_is_rolled_back_with_first_diverging_tensor(tmp_path) -> None:
    model = _matmul_model()
    x = np.random.default_rng(2).standard_normal((3, 4)).astype(np.float32)
    before = run(model, {"x": x})
    pipeline = Pipeline(
        [ScaleWeight(factor=3.0), CleanupPass()], reproducer_dir=tmp_path, reproducer_stem="m"
    )
    result, report = pipeline.run(model)
    failed, cleanup = report.passes
    assert failed.status == "failed" and report.exit_code == 3
    assert "values outside" in failed.reason
    assert failed.first_diverging["name"] == "h"
    assert cleanup.status == "skipped"
    np.testing.assert_array_equal(run(result, {"x": x})["y"], before["y"])
    repro = load(failed.reproducer["model"])
    assert op_types(repro) == ["MatMul", "Relu", "Identity"]
    assert failed.reproducer["spec"] == "test-scale-weight(factor=3.0)"
    assert (tmp_path / "m.before-test-scale-weight.golden" / "outputs.npz").is_file()


def test_keep_going_runs_the_rest() -> None:
    _, report = Pipeline([ScaleWeight(), CleanupPass()], keep_going=True).run(_matmul_model())
    assert [p.status for p in report.passes] == ["failed", "ok"]
    assert report.exit_code == 0 and not report.ok


def test_unchanged_pass_is_not_verified() -> None:
    model = _matmul_model()
    _, report = Pipeline([LieAboutChange()]).run(model)
    assert report.passes[0].status == "unchanged" and report.passes[0].metrics is None


def test_structural_failure_is_caught_without_running() -> None:
    model = _matmul_model()
    result, report = Pipeline([Dangle()], verify=False).run(model)
    entry = report.passes[0]
    assert entry.status == "failed" and "ghost" in entry.reason
    assert op_types(result) == ["MatMul", "Relu", "Identity"]
    assert result.graph.node(0).inputs[0].name == "x"


def test_crashing_pass_is_an_error_and_rolled_back() -> None:
    result, report = Pipeline([Crash()]).run(_matmul_model())
    assert report.passes[0].status == "error" and "boom" in report.passes[0].reason
    assert report.exit_code == 1 and len(result.graph) == 3


def test_approximate_pass_is_judged_by_its_budget() -> None:
    _, report = Pipeline([Approximate(factor=1.001)]).run(_matmul_model())
    assert report.passes[0].status == "ok" and report.passes[0].tolerance == "min_cosine=0.99"
    _, report = Pipeline(
        [Approximate(factor=1.001)], tolerances={"approximate": {"min_snr_db": 80}}
    ).run(_matmul_model())
    assert report.passes[0].status == "failed" and "SNR" in report.passes[0].reason


def test_exact_pass_after_approximate_compares_with_the_approximate_model() -> None:
    passes = [Approximate(factor=1.01), CleanupPass()]
    _, report = Pipeline(passes, keep_going=False).run(_matmul_model())
    assert [p.status for p in report.passes] == ["ok", "ok"]


def test_passes_after_an_interface_pass_run_the_model_its_way() -> None:
    passes = [AddGainInput(), CleanupPass()]
    model, report = Pipeline(passes).run(_matmul_model())
    assert [p.status for p in report.passes] == ["ok", "ok"]
    assert op_types(model) == ["MatMul", "Relu", "Mul"]


def test_report_json_round_trips(tmp_path) -> None:
    _, report = Pipeline("cleanup").run(_matmul_model())
    report.write(tmp_path / "r.json")
    data = json.loads((tmp_path / "r.json").read_text())
    assert data["passes"][0]["counts"] == {"identity": 1}
    assert data["ok"] is True and data["pipeline"] == "cleanup"


@pytest.mark.parametrize("spec", ["simplify", "cleanup,infer-shapes"])
def test_spec_is_kept_in_the_report(spec) -> None:
    pipeline = Pipeline(spec, verify=False)
    _, report = pipeline.run(_matmul_model())
    assert report.pipeline == pipeline.spec


def test_reproducer_after_an_approximate_pass_expects_its_outputs(tmp_path) -> None:
    passes = [Approximate(factor=1.01), ScaleWeight(factor=3.0)]
    _, report = Pipeline(passes, reproducer_dir=tmp_path).run(_matmul_model())
    assert [p.status for p in report.passes] == ["ok", "failed"]
    golden = GoldenSet.load(tmp_path / "model.before-test-scale-weight.golden")
    repro = load(report.passes[1].reproducer["model"])
    for feeds, expected in zip(golden.inputs, golden.outputs, strict=True):
        np.testing.assert_array_equal(run(repro, feeds)["y"], expected["y"])
    _, again = Pipeline([CleanupPass()], golden=golden).run(repro)
    assert again.ok


class Refuses(Pass):
    name = "test-refuses"
    code: int = 4

    def call(self, model):
        from onnxopt import UnsupportedModelError, UsageError

        raise (UnsupportedModelError if self.code == 4 else UsageError)("no")


@pytest.mark.parametrize("code", [2, 4])
def test_a_pass_that_refuses_the_model_exits_with_the_errors_code(code) -> None:
    _, report = Pipeline([Refuses(code=code)]).run(_matmul_model())
    assert report.passes[0].status == "error" and report.passes[0].error_code == code
    assert report.exit_code == code
    _, report = Pipeline([Crash()]).run(_matmul_model())
    assert report.exit_code == 1
