"""fuse-bias: MatMul + Add into Gemm, bias Adds into SkipLayerNormalization and FastGelu."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import FLOAT, GOLDEN, assert_same_outputs, make_model, op_types, run
from onnx import TensorProto, helper

from onnxopt import load
from onnxopt.passes.fuse_bias import FuseBiasPass
from onnxopt.passes.infer_shapes import InferShapesPass

MS = "com.microsoft"


def _matmul_add(rng, x_shape, c_shape, *, c_first=False, dtype=np.float32, c_input=False):
    elem = TensorProto.INT32 if dtype == np.int32 else FLOAT
    inits = {"w": (rng.standard_normal((x_shape[-1], 8)) * 4).astype(dtype)}
    inputs = {"x": (elem, x_shape)}
    if c_input:
        inputs["c"] = (elem, c_shape)
    else:
        inits["c"] = rng.standard_normal(c_shape).astype(dtype)
    add_inputs = ["c", "mm"] if c_first else ["mm", "c"]
    nodes = [
        helper.make_node("MatMul", ["x", "w"], ["mm"]),
        helper.make_node("Add", add_inputs, ["y"]),
    ]
    return make_model(nodes, inputs, {"y": (elem, None)}, inits)


def _fused(model, feeds, target="ort-cpu"):
    before = run(model, feeds)
    result = FuseBiasPass(target=target)(model)
    assert_same_outputs(before, run(model, feeds))
    return result


@pytest.mark.parametrize(
    ("x_shape", "c_shape", "c_first"),
    [
        ([3, 16], [8], True),
        ([3, 16], [8], False),
        ([3, 16], [3, 8], False),
        ([3, 16], [3, 1], True),
        (["batch", 16], [1, 8], False),
    ],
)
def test_2d_matmul_add_becomes_gemm(rng, x_shape, c_shape, c_first) -> None:
    model = _matmul_add(rng, x_shape, c_shape, c_first=c_first)
    feeds = {"x": rng.standard_normal((3, 16)).astype(np.float32)}
    result = _fused(model, feeds, target="onnx-17")
    assert result.counts == {"gemm": 1} and op_types(model) == ["Gemm"]
    assert result.notes == []  # no skip-norm or FastGelu here: nothing was skipped for onnx-17


def test_what_gemm_cannot_express_stays_matmul_add(rng) -> None:
    cases = [
        (_matmul_add(rng, [2, 3, 16], [8]), "the MatMul input 'x' has rank 3, Gemm needs 2"),
        (_matmul_add(rng, [3, 16], [2, 8]), "'c' of shape [2, 8] does not broadcast to"),
        (_matmul_add(rng, ["m", 16], ["n", 8], c_input=True), "'c' of shape [n, 8] does not"),
        (_matmul_add(rng, [3, 16], [8], dtype=np.int32), "Gemm is fused for float types only"),
    ]
    for model, reason in cases:
        result = FuseBiasPass()(model)
        assert not result.modified and op_types(model) == ["MatMul", "Add"]
        assert reason in "\n".join(result.misses), result.misses


def _skip_norm(rng, op_type="SkipLayerNormalization", position=0, bias=False, outputs=4):
    """A Linear's output and a residual into a skip-norm whose sum output feeds on."""
    hidden = 8
    inits = {
        "w": rng.standard_normal((16, hidden)).astype(np.float32),
        "b": rng.standard_normal(hidden).astype(np.float32),
        "gamma": rng.random(hidden).astype(np.float32) + 0.5,
        "beta": rng.standard_normal(hidden).astype(np.float32),
        "old_bias": rng.standard_normal(hidden).astype(np.float32),
    }
    simplified = op_type == "SkipSimplifiedLayerNormalization"
    norm_inputs = ["biased", "skip"] if position == 0 else ["skip", "biased"]
    norm_inputs += ["gamma"] if simplified else ["gamma", "beta"]
    if bias:
        norm_inputs.append("old_bias")
    norm_outputs = ["y", "", "", "sum"][:outputs]
    nodes = [
        helper.make_node("MatMul", ["h", "w"], ["mm"]),
        helper.make_node("Add", ["b", "mm"], ["biased"]),
        helper.make_node(op_type, norm_inputs, norm_outputs, domain=MS, epsilon=1e-5),
    ]
    outs = {"y": (FLOAT, None)} | ({"sum": (FLOAT, None)} if outputs == 4 else {})
    shape = ["batch", "seq", 16]
    inputs = {"h": (FLOAT, shape), "skip": (FLOAT, [*shape[:2], hidden])}
    model = make_model(nodes, inputs, outs, inits)
    model.opset_imports[MS] = 1
    feeds = {
        "h": rng.standard_normal((2, 3, 16)).astype(np.float32),
        "skip": rng.standard_normal((2, 3, hidden)).astype(np.float32),
    }
    return model, feeds


@pytest.mark.parametrize("position", [0, 1])
@pytest.mark.parametrize("outputs", [4, 1])
def test_bias_add_goes_into_skip_layer_norm(rng, position, outputs) -> None:
    model, feeds = _skip_norm(rng, position=position, outputs=outputs)
    result = _fused(model, feeds)
    assert result.counts == {"bias-skip-layer-norm": 1}
    assert op_types(model) == ["MatMul", "SkipLayerNormalization"]
    norm = list(model.graph)[1]
    assert (norm.inputs[position].name, norm.inputs[4].name) == ("mm", "b")
    assert norm.attributes["epsilon"].value == pytest.approx(1e-5)


def test_bias_add_goes_into_skip_simplified_layer_norm(rng) -> None:
    model, feeds = _skip_norm(rng, "SkipSimplifiedLayerNormalization", position=1)
    result = _fused(model, feeds)
    assert result.counts == {"bias-skip-simplified-layer-norm": 1}
    assert op_types(model) == ["MatMul", "SkipSimplifiedLayerNormalization"]
    assert list(model.graph)[1].inputs[3].name == "b"


def test_skip_norm_with_a_bias_keeps_the_add(rng) -> None:
    model, _ = _skip_norm(rng, bias=True)
    result = FuseBiasPass()(model)
    assert not result.modified and op_types(model) == ["MatMul", "Add", "SkipLayerNormalization"]
    assert "already has the bias 'old_bias'" in "\n".join(result.misses)


def _fast_gelu(rng, with_bias: bool, bias_len: int = 8):
    inits = {
        "w": rng.standard_normal((16, 8)).astype(np.float32),
        "b": rng.standard_normal(bias_len).astype(np.float32),
        "b2": rng.standard_normal(8).astype(np.float32),
    }
    gelu_inputs = ["biased", "b2"] if with_bias else ["biased"]
    nodes = [
        helper.make_node("MatMul", ["x", "w"], ["mm"]),
        helper.make_node("Add", ["mm", "b"], ["biased"]),
        helper.make_node("FastGelu", gelu_inputs, ["y"], domain=MS),
    ]
    model = make_model(nodes, {"x": (FLOAT, [2, 3, 16])}, {"y": (FLOAT, None)}, inits)
    model.opset_imports[MS] = 1
    return model, {"x": rng.standard_normal((2, 3, 16)).astype(np.float32)}


def test_bias_add_goes_into_fast_gelu(rng) -> None:
    model, feeds = _fast_gelu(rng, with_bias=False)
    result = _fused(model, feeds)
    assert result.counts == {"bias-fast-gelu": 1} and op_types(model) == ["MatMul", "FastGelu"]
    assert [v.name for v in list(model.graph)[1].inputs] == ["mm", "b"]


def test_fast_gelu_with_a_bias_or_a_broadcast_add_keeps_the_add(rng) -> None:
    for model, reason in (
        (_fast_gelu(rng, with_bias=True)[0], "the FastGelu already has the bias 'b2'"),
        (_fast_gelu(rng, with_bias=False, bias_len=1)[0], "the bias has 1 elements, the MatMul"),
    ):
        result = FuseBiasPass()(model)
        assert not result.modified and op_types(model) == ["MatMul", "Add", "FastGelu"]
        assert reason in "\n".join(result.misses)


def test_3d_linear_bias_adds_of_a_zoo_model_are_left_to_ort() -> None:
    path = GOLDEN / "zoo" / "bert_ts.onnx"
    if not path.is_file():
        pytest.skip(f"{path} is not there")
    model = load(path)
    InferShapesPass()(model)
    result = FuseBiasPass()(model)
    assert not result.modified
    assert "has rank 3, Gemm needs 2" in "\n".join(result.misses)
