"""lower: after it, the target can run every node, and the outputs have not changed."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import pytest
from conftest import FLOAT, WHISPER, WHISPER_GOLDEN, make_model, op_types, run
from onnx import helper

from onnxopt import GoldenSet, Pipeline, load
from onnxopt.passes.lower import LowerPass
from onnxopt.targets import load_target
from onnxopt.targets.check import unsupported


def _lowered(model: ir.Model, target: str, golden: GoldenSet | None = None):
    result, report = Pipeline([LowerPass(target=target)], golden=golden).run(model)
    (entry,) = report.passes
    assert entry.status == "ok", entry.reason
    return result, entry


@pytest.mark.parametrize("target", ["onnx-13", "ort-mobile"])
def test_whisper_encoder_to_opset_13(target: str) -> None:
    golden = GoldenSet.load(WHISPER_GOLDEN)
    model, entry = _lowered(load(WHISPER), target, golden)
    assert entry.counts["LayerNormalization"] == 5 and entry.counts["opset"] == 1
    assert model.opset_imports[""] == 13
    assert "LayerNormalization" not in op_types(model) and "CastLike" not in op_types(model)
    assert unsupported(model, load_target(target)) == [] and entry.notes == []
    for feeds, expected in zip(golden.inputs, golden.outputs, strict=True):
        np.testing.assert_allclose(run(model, feeds)["hidden"], expected["hidden"], atol=1e-4)


def test_nothing_to_do_is_unchanged() -> None:
    result, report = Pipeline("lower(target=onnx-17)").run(load(WHISPER))
    assert report.passes[0].status == "unchanged"
    assert op_types(result) == op_types(load(WHISPER))


def test_what_cannot_be_lowered_is_named() -> None:
    nodes = [
        helper.make_node("Relu", ["x"], ["r"]),
        helper.make_node("Mystery", ["r"], ["y"], domain="acme"),
    ]
    model = make_model(nodes, {"x": (FLOAT, [2])}, {"y": (FLOAT, [2])})
    model.opset_imports["acme"] = 1
    result = LowerPass(target="onnx-17")(model)
    assert not result.modified
    assert any("acme::Mystery" in note for note in result.notes)


def test_unknown_target_fails_when_the_pass_is_built() -> None:
    from onnxopt import UsageError

    with pytest.raises(UsageError, match="unknown target"):
        Pipeline("lower(target=onnx-99)")
