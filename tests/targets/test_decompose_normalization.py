"""Decompositions of normalization ops: structure and numerics against ORT and numpy references."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import pytest
from conftest import FLOAT, assert_decomposes, make_model, op_types, run
from onnx import TensorProto, helper

from onnxopt.targets import decompositions

FLOAT16 = TensorProto.FLOAT16
MS = "com.microsoft"
FP16_TOL = {"atol": 2e-3, "rtol": 1e-2}


def _model(node, inputs, outputs, inits, opset: int = 17, ms: bool = False) -> ir.Model:
    model = make_model([node], inputs, outputs, inits, opset=opset)
    if ms:
        model.opset_imports[MS] = 1
    return model


def _decompose(model: ir.Model, op_type: str, domain: str = "") -> list[str]:
    """Replace each ``domain::op_type`` node like ``assert_decomposes``; the functions chosen."""
    opset = model.opset_imports.get("", 1)
    chosen = []
    for node in [n for n in model.graph if (n.domain, n.op_type) == (domain, op_type)]:
        options = decompositions.decompositions(domain, op_type)
        usable = [d for d in options if d.reason_not_applicable(node, opset) is None]
        assert usable, f"no decomposition applies to {node.name}"
        decompositions.replace(model, node, usable[0])
        chosen.append(usable[0].function_proto.name)
    decompositions.inline_calls(model)
    assert op_type not in op_types(model) and not model.functions
    return chosen


def _normalize(x: np.ndarray, axes: tuple[int, ...], epsilon: float, rms: bool = False):
    """(x - mean) / sqrt(var + epsilon) (x / sqrt(mean(x^2) + epsilon) if rms), in float64."""
    x = x.astype(np.float64)
    if rms:
        return x / np.sqrt(np.mean(x * x, axis=axes, keepdims=True) + epsilon)
    mean = x.mean(axis=axes, keepdims=True)
    return (x - mean) / np.sqrt(x.var(axis=axes, keepdims=True) + epsilon)


# --- LayerNormalization ----------------------------------------------------------------------


@pytest.mark.parametrize("axis", [-1, 1, -2])
def test_layer_normalization(axis: int, rng) -> None:
    shape = [2, 3, 4]
    norm_shape = shape[axis:]
    node = helper.make_node("LayerNormalization", ["x", "s", "b"], ["y"], axis=axis, epsilon=1e-3)
    inits = {
        "s": rng.standard_normal(norm_shape).astype(np.float32),
        "b": rng.standard_normal(norm_shape).astype(np.float32),
    }
    model = make_model([node], {"x": (FLOAT, shape)}, {"y": (FLOAT, shape)}, inits)
    feeds = {"x": rng.standard_normal(shape).astype(np.float32)}
    result = assert_decomposes(model, feeds, "LayerNormalization")
    assert "ReduceSum" in [n.op_type for n in result.graph]


def test_layer_normalization_without_bias(rng) -> None:
    node = helper.make_node("LayerNormalization", ["x", "s"], ["y"])
    inits = {"s": rng.standard_normal([8]).astype(np.float32)}
    model = make_model([node], {"x": (FLOAT, [2, 3, 8])}, {"y": (FLOAT, None)}, inits)
    feeds = {"x": rng.standard_normal([2, 3, 8]).astype(np.float32)}
    assert_decomposes(model, feeds, "LayerNormalization")


def test_layer_normalization_fp16_stashes_in_float(rng) -> None:
    node = helper.make_node("LayerNormalization", ["x", "s", "b"], ["y"])
    inits = {n: rng.standard_normal([64]).astype(np.float16) for n in "sb"}
    model = make_model([node], {"x": (FLOAT16, [2, 64])}, {"y": (FLOAT16, None)}, inits)
    feeds = {"x": (rng.standard_normal([2, 64]) * 30).astype(np.float16)}  # x^2 sums overflow fp16
    result = assert_decomposes(model, feeds, "LayerNormalization", **FP16_TOL)
    assert "Cast" in op_types(result)


# --- GroupNormalization ----------------------------------------------------------------------


def _group_norm_reference(x, scale, bias, groups: int, epsilon: float) -> np.ndarray:
    n, c = x.shape[:2]
    y = _normalize(x.reshape(n, groups, -1), (2,), epsilon).reshape(x.shape)
    if scale.size == groups:  # opset 18: one scale and bias per group
        scale, bias = np.repeat(scale, c // groups), np.repeat(bias, c // groups)
    channel = (1, c) + (1,) * (x.ndim - 2)
    return y * scale.reshape(channel) + bias.reshape(channel)


@pytest.mark.parametrize("opset", [18, 21])
@pytest.mark.parametrize(("shape", "groups"), [([2, 6, 3, 4], 3), ([2, 6, 5], 2), ([1, 4, 3], 1)])
@pytest.mark.parametrize("epsilon", [1e-5, 0.1])
def test_group_normalization(opset: int, shape: list[int], groups: int, epsilon: float, rng):
    affine = [groups] if opset == 18 else [shape[1]]
    attrs = {"num_groups": groups, "epsilon": epsilon}
    node = helper.make_node("GroupNormalization", ["x", "s", "b"], ["y"], **attrs)
    inits = {n: rng.standard_normal(affine).astype(np.float32) for n in "sb"}
    model = make_model([node], {"x": (FLOAT, shape)}, {"y": (FLOAT, shape)}, inits, opset=opset)
    feeds = {"x": rng.standard_normal(shape).astype(np.float32)}
    result = assert_decomposes(model, feeds, "GroupNormalization")
    expected = _group_norm_reference(feeds["x"], inits["s"], inits["b"], groups, epsilon)
    np.testing.assert_allclose(run(result, feeds)["y"], expected, atol=1e-5, rtol=1e-4)


def test_group_normalization_per_channel_equals_instance_norm(rng) -> None:
    """num_groups == C: both forms agree (scale [C]), so the opset does not matter."""
    node = helper.make_node("GroupNormalization", ["x", "s", "b"], ["y"], num_groups=4)
    inits = {n: rng.standard_normal([4]).astype(np.float32) for n in "sb"}
    model = make_model([node], {"x": (FLOAT, [2, 4, 5])}, {"y": (FLOAT, None)}, inits, opset=21)
    feeds = {"x": rng.standard_normal([2, 4, 5]).astype(np.float32)}
    assert_decomposes(model, feeds, "GroupNormalization")


@pytest.mark.parametrize("opset", [18, 21])
def test_group_normalization_fp16(opset: int, rng) -> None:
    affine = [2] if opset == 18 else [8]
    node = helper.make_node("GroupNormalization", ["x", "s", "b"], ["y"], num_groups=2)
    inits = {n: rng.standard_normal(affine).astype(np.float16) for n in "sb"}
    model = make_model(
        [node], {"x": (FLOAT16, [2, 8, 3, 3])}, {"y": (FLOAT16, None)}, inits, opset=opset
    )
    feeds = {"x": rng.standard_normal([2, 8, 3, 3]).astype(np.float16)}
    result = assert_decomposes(model, feeds, "GroupNormalization", **FP16_TOL)
    expected = _group_norm_reference(feeds["x"], inits["s"], inits["b"], 2, 1e-5)
    np.testing.assert_allclose(run(result, feeds)["y"], expected, **FP16_TOL)


def test_group_normalization_needs_opset_18() -> None:
    (option,) = decompositions.decompositions("", "GroupNormalization")
    node = ir.node("GroupNormalization", [None, None, None], attributes={"num_groups": 2})
    assert option.reason_not_applicable(node, 17) is not None


# --- RMSNormalization-23, SimplifiedLayerNormalization ---------------------------------------


@pytest.mark.parametrize("op_type", ["RMSNormalization", "SimplifiedLayerNormalization"])
@pytest.mark.parametrize(("axis", "scale_shape"), [(-1, [4]), (1, [3, 4]), (-2, [1, 4]), (0, [])])
def test_rms_normalization(op_type: str, axis: int, scale_shape: list[int], rng) -> None:
    shape = [2, 3, 4]
    node = helper.make_node(op_type, ["x", "s"], ["y"], axis=axis, epsilon=1e-3)
    inits = {"s": rng.standard_normal(scale_shape).astype(np.float32)}
    opset = 23 if op_type == "RMSNormalization" else 17
    model = make_model([node], {"x": (FLOAT, shape)}, {"y": (FLOAT, shape)}, inits, opset=opset)
    feeds = {"x": rng.standard_normal(shape).astype(np.float32)}
    result = assert_decomposes(model, feeds, op_type)
    axes = tuple(range(axis % 3, 3))
    expected = _normalize(feeds["x"], axes, 1e-3, rms=True) * inits["s"]
    np.testing.assert_allclose(run(result, feeds)["y"], expected, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("op_type", ["RMSNormalization", "SimplifiedLayerNormalization"])
def test_rms_normalization_fp16(op_type: str, rng) -> None:
    node = helper.make_node(op_type, ["x", "s"], ["y"])
    inits = {"s": rng.standard_normal([64]).astype(np.float16)}
    opset = 23 if op_type == "RMSNormalization" else 17
    model = make_model(
        [node], {"x": (FLOAT16, [3, 64])}, {"y": (FLOAT16, None)}, inits, opset=opset
    )
    feeds = {"x": (rng.standard_normal([3, 64]) * 40).astype(np.float16)}
    assert_decomposes(model, feeds, op_type, **FP16_TOL)


def test_simplified_layer_normalization_inv_std_var_used_is_refused() -> None:
    (option,) = decompositions.decompositions("", "SimplifiedLayerNormalization")
    node = ir.node("SimplifiedLayerNormalization", [None, None], num_outputs=2)
    ir.node("Identity", [node.outputs[1]])
    assert "is used" in option.reason_not_applicable(node, 17)


# --- com.microsoft SkipLayerNormalization, SkipSimplifiedLayerNormalization ------------------


def _skip_reference(x, skip, gamma, beta, bias, epsilon: float, rms: bool):
    s = x.astype(np.float64) + skip + (0 if bias is None else bias)
    y = _normalize(s, (-1,), epsilon, rms) * gamma + (0 if beta is None else beta)
    return y, s


SKIP_INPUTS = {  # op -> its optional inputs' names, in order
    "SkipLayerNormalization": ["beta", "bias"],
    "SkipSimplifiedLayerNormalization": ["bias"],
}


def _skip_model(op_type, optional, outputs, dtype, skip_shape, rng, epsilon=1e-4):
    hidden = skip_shape[-1]
    names = ["x", "skip", "gamma"] + [n if n in optional else "" for n in SKIP_INPUTS[op_type]]
    while names[-1] == "":
        names.pop()
    node = helper.make_node(op_type, names, outputs, domain=MS, epsilon=epsilon)
    elem = FLOAT if dtype == np.float32 else FLOAT16
    inits = {n: rng.standard_normal([hidden]).astype(dtype) for n in ["gamma", *optional]}
    inits["skip"] = rng.standard_normal(skip_shape).astype(dtype)
    graph_outputs = {o: (elem, None) for o in outputs if o in ("y", "sum")}
    model = _model(node, {"x": (elem, [2, 3, hidden])}, graph_outputs, inits, ms=True)
    feeds = {"x": rng.standard_normal([2, 3, hidden]).astype(dtype)}
    return model, feeds, inits


def _expected(op_type, feeds, inits, epsilon=1e-4):
    rms = op_type == "SkipSimplifiedLayerNormalization"
    x, skip, gamma = feeds["x"], inits["skip"], inits["gamma"]
    return _skip_reference(x, skip, gamma, inits.get("beta"), inits.get("bias"), epsilon, rms)


SKIP_CASES = [
    ("SkipLayerNormalization", ["beta", "bias"]),
    ("SkipLayerNormalization", ["beta"]),
    ("SkipLayerNormalization", ["bias"]),
    ("SkipLayerNormalization", []),
    ("SkipSimplifiedLayerNormalization", ["bias"]),
    ("SkipSimplifiedLayerNormalization", []),
]


@pytest.mark.parametrize(("op_type", "optional"), SKIP_CASES)
@pytest.mark.parametrize("skip_shape", [[2, 3, 16], [3, 16]])
def test_skip_layer_normalization(op_type: str, optional: list[str], skip_shape, rng) -> None:
    model, feeds, inits = _skip_model(op_type, optional, ["y"], np.float32, skip_shape, rng)
    result = assert_decomposes(model, feeds, op_type, domain=MS)
    expected, _ = _expected(op_type, feeds, inits)
    np.testing.assert_allclose(run(result, feeds)["y"], expected, atol=1e-5, rtol=1e-4)
    assert "Reciprocal" not in op_types(result)  # the lean 1-output function


@pytest.mark.parametrize(("op_type", "optional"), SKIP_CASES)
def test_skip_layer_normalization_sum_output(op_type: str, optional: list[str], rng) -> None:
    """input_skip_bias_sum used: the 4-output function; mean, inv_std_var named but unused."""
    outputs = ["y", "mean", "inv_std", "sum"]
    model, feeds, inits = _skip_model(op_type, optional, outputs, np.float32, [2, 3, 16], rng)
    result = assert_decomposes(model, feeds, op_type, domain=MS)
    expected, expected_sum = _expected(op_type, feeds, inits)
    got = run(result, feeds)
    np.testing.assert_allclose(got["y"], expected, atol=1e-5, rtol=1e-4)
    np.testing.assert_allclose(got["sum"], expected_sum, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("op_type", ["SkipLayerNormalization", "SkipSimplifiedLayerNormalization"])
def test_skip_layer_normalization_sum_output_absent_middle_outputs(op_type: str, rng) -> None:
    """ORT's fusions write outputs ['y', '', '', 'sum']."""
    model, feeds, _ = _skip_model(op_type, ["bias"], ["y", "", "", "sum"], np.float32, [3, 16], rng)
    assert_decomposes(model, feeds, op_type, domain=MS)


def test_skip_layer_normalization_mean_and_inv_std_var(rng) -> None:
    """ORT's CPU kernel leaves mean and inv_std_var unset: compared with numpy only."""
    outputs = ["y", "mean", "inv_std", "sum"]
    op_type = "SkipLayerNormalization"
    model, feeds, inits = _skip_model(op_type, ["beta"], outputs, np.float32, [2, 3, 16], rng)
    for name in ("mean", "inv_std"):
        value = next(v for v in model.graph[0].outputs if v.name == name)
        model.graph.outputs.append(value)
    assert _decompose(model, op_type, MS) == ["skip_layer_normalization_no_bias_sum"]
    got = run(model, feeds)
    s = feeds["x"].astype(np.float64) + inits["skip"]
    np.testing.assert_allclose(got["mean"], s.mean(-1, keepdims=True), atol=1e-5, rtol=1e-4)
    inv_std = 1 / np.sqrt(s.var(-1, keepdims=True) + 1e-4)
    np.testing.assert_allclose(got["inv_std"], inv_std, atol=1e-5, rtol=1e-4)
    assert got["mean"].dtype == np.float32


def test_skip_simplified_layer_normalization_mean_used_is_refused() -> None:
    """'mean' is undefined for the RMS variant: no function applies when it is used."""
    node = ir.node("SkipSimplifiedLayerNormalization", [None] * 3, domain=MS, num_outputs=4)
    ir.node("Identity", [node.outputs[1]])
    options = decompositions.decompositions(MS, "SkipSimplifiedLayerNormalization")
    assert all(d.reason_not_applicable(node, 17) is not None for d in options)


@pytest.mark.parametrize(("op_type", "optional"), [SKIP_CASES[0], SKIP_CASES[4]])
def test_skip_layer_normalization_fp16(op_type: str, optional: list[str], rng) -> None:
    outputs = ["y", "mean", "inv_std", "sum"]
    model, feeds, _ = _skip_model(op_type, optional, outputs, np.float16, [2, 3, 64], rng)
    feeds["x"] = feeds["x"] * np.float16(40)  # sums of squares overflow fp16
    assert_decomposes(model, feeds, op_type, domain=MS, **FP16_TOL)
