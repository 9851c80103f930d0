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


def _model_with(op: str, rng: np.random.Generator) -> tuple[ir.Model, dict[str, np.ndarray]]:
    """A small model around one op a new user would lower, at the opset it needs."""
    x = rng.standard_normal((2, 4, 8)).astype(np.float32)
    ms = "com.microsoft"
    if op == "Gelu":
        nodes = [
            helper.make_node("Gelu", ["x"], ["g"]),
            helper.make_node("Transpose", ["g"], ["y"]),
        ]
        model = make_model(nodes, {"x": (FLOAT, [2, 4, 8])}, {"y": (FLOAT, [8, 4, 2])}, opset=20)
    elif op == "GroupNormalization":
        inits = {"s": rng.standard_normal(4).astype(np.float32), "b": np.ones(4, np.float32)}
        nodes = [
            helper.make_node("GroupNormalization", ["x", "s", "b"], ["g"], num_groups=2),
            helper.make_node("ReduceMean", ["g", "axes"], ["y"], keepdims=0),  # axes input (18+)
        ]
        inits["axes"] = np.array([2], np.int64)
        model = make_model(
            nodes, {"x": (FLOAT, [2, 4, 8])}, {"y": (FLOAT, [2, 4])}, inits, opset=21
        )
    elif op == "Attention":
        q = ["q", "q", "q"]
        nodes = [
            helper.make_node("Reshape", ["x", "shape"], ["q"]),
            helper.make_node("Attention", q, ["y"]),
        ]
        inits = {"shape": np.array([2, 2, 4, 4], np.int64)}
        model = make_model(
            nodes, {"x": (FLOAT, [2, 4, 8])}, {"y": (FLOAT, [2, 2, 4, 4])}, inits, opset=23
        )
    else:  # contrib fused ops and 4-bit weights
        k, n, block = 8, 8, 16
        inits = {
            "gamma": np.ones(8, np.float32),
            "w": rng.integers(0, 255, (n, 1, block // 2), dtype=np.uint8),
            "scales": (rng.random(n) * 0.1).astype(np.float32),
        }
        nodes = [
            helper.make_node("SkipLayerNormalization", ["x", "x", "gamma"], ["s"], domain=ms),
            helper.make_node("FastGelu", ["s"], ["g"], domain=ms),
            helper.make_node(
                "MatMulNBits",
                ["g", "w", "scales"],
                ["y"],
                domain=ms,
                K=k,
                N=n,
                bits=4,
                block_size=block,
            ),
        ]
        model = make_model(
            nodes, {"x": (FLOAT, [2, 4, 8])}, {"y": (FLOAT, [2, 4, 8])}, inits, opset=17
        )
        model.opset_imports[ms] = 1
    return model, {"x": x}


@pytest.mark.parametrize("target", ["onnx-13", "onnx-17"])
@pytest.mark.parametrize("op", ["Gelu", "GroupNormalization", "Attention", "contrib"])
def test_newer_and_contrib_ops_lowered_to_old_opsets(op: str, target: str, rng) -> None:
    model, feeds = _model_with(op, rng)
    expected = run(model, feeds)
    golden = GoldenSet(inputs=[feeds], outputs=[expected])
    lowered, entry = _lowered(model, target, golden)
    assert lowered.opset_imports[""] == load_target(target).opset
    assert unsupported(lowered, load_target(target)) == [], entry.notes
    for name, value in run(lowered, feeds).items():
        np.testing.assert_allclose(value, expected[name], atol=1e-4, rtol=1e-3)


def test_4bit_weights_become_fp32_weights_for_targets_without_contrib_ops(rng) -> None:
    k = n = 128
    block = 32
    inits = {
        "w": rng.integers(0, 255, (n, k // block, block // 2), dtype=np.uint8),
        "scales": (rng.random(n * k // block) * 0.1).astype(np.float32),
    }
    node = helper.make_node(
        "MatMulNBits",
        ["x", "w", "scales"],
        ["y"],
        domain="com.microsoft",
        K=k,
        N=n,
        bits=4,
        block_size=block,
    )
    model = make_model([node], {"x": (FLOAT, [3, k])}, {"y": (FLOAT, [3, n])}, inits)
    model.opset_imports["com.microsoft"] = 1
    feeds = {"x": rng.standard_normal((3, k)).astype(np.float32)}
    expected = run(model, feeds)
    lowered, entry = _lowered(model, "onnx-17", GoldenSet(inputs=[feeds], outputs=[expected]))
    assert op_types(lowered) == ["MatMul"] and entry.counts["MatMulNBits"] == 1
    weight = lowered.graph.node(0).inputs[1].const_value
    assert weight is not None and weight.shape == (k, n) and weight.dtype == ir.DataType.FLOAT
    np.testing.assert_allclose(run(lowered, feeds)["y"], expected["y"], atol=1e-4, rtol=1e-3)
    capped = Pipeline([LowerPass(target="onnx-17", max_folded_elements=1000)]).run(model)[0]
    assert "MatMul" in op_types(capped) and len(op_types(capped)) > 1  # unpacked at run time


@pytest.mark.parametrize("target", ["onnx-13", "onnx-17", "onnx-21", "onnx-23"])
def test_shipped_encoder_runs_on_every_standard_profile(target: str) -> None:
    golden = GoldenSet.load(WHISPER_GOLDEN)
    model, report = Pipeline(f"lower(target={target})", golden=golden).run(load(WHISPER))
    assert report.ok and unsupported(model, load_target(target)) == []
    for feeds, expected in zip(golden.inputs, golden.outputs, strict=True):
        np.testing.assert_allclose(run(model, feeds)["hidden"], expected["hidden"], atol=1e-4)
