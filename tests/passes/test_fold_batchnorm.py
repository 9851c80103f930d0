"""fold-batchnorm: BatchNormalization and scalar affine ops folded into Conv weights."""

from __future__ import annotations

import numpy as np
from conftest import FLOAT, assert_same_outputs, make_model, op_types, run
from onnx import helper

from onnxopt.passes.fold_batchnorm import FoldBatchNormPass


def _conv_bn(rng, *, constant_stats: bool = True):
    c = 4
    inits = {
        "w": rng.standard_normal((c, 3, 3, 3)).astype(np.float32),
        "b": rng.standard_normal(c).astype(np.float32),
        "gamma": rng.random(c).astype(np.float32) + 0.5,
        "beta": rng.standard_normal(c).astype(np.float32),
        "mean": rng.standard_normal(c).astype(np.float32),
        "var": rng.random(c).astype(np.float32) + 0.1,
    }
    inputs = {"x": (FLOAT, [1, 3, 8, 8])}
    if not constant_stats:
        del inits["var"]
        inputs["var"] = (FLOAT, [c])
    nodes = [
        helper.make_node("Conv", ["x", "w", "b"], ["c"], pads=[1, 1, 1, 1]),
        helper.make_node("BatchNormalization", ["c", "gamma", "beta", "mean", "var"], ["y"]),
    ]
    return make_model(nodes, inputs, {"y": (FLOAT, [1, 4, 8, 8])}, inits)


def test_batchnorm_after_conv_is_folded(rng) -> None:
    model = _conv_bn(rng)
    feeds = {"x": rng.standard_normal((1, 3, 8, 8)).astype(np.float32)}
    before = run(model, feeds)
    result = FoldBatchNormPass()(model)
    assert result.counts == {"batchnorm-into-conv": 1}
    assert op_types(model) == ["Conv"]
    assert_same_outputs(before, run(model, feeds))


def test_batchnorm_with_runtime_statistics_is_left_alone(rng) -> None:
    model = _conv_bn(rng, constant_stats=False)
    result = FoldBatchNormPass()(model)
    assert not result.modified and op_types(model) == ["Conv", "BatchNormalization"]


def test_scalar_affine_after_conv_is_folded(rng) -> None:
    nodes = [
        helper.make_node("Conv", ["x", "w", "b"], ["c"]),
        helper.make_node("Mul", ["c", "a"], ["m"]),
        helper.make_node("Add", ["m", "t"], ["y"]),
    ]
    inits = {
        "w": rng.standard_normal((2, 3, 1, 1)).astype(np.float32),
        "b": rng.standard_normal(2).astype(np.float32),
        "a": np.array(1.5, np.float32),
        "t": np.array(-0.25, np.float32),
    }
    model = make_model(nodes, {"x": (FLOAT, [1, 3, 4, 4])}, {"y": (FLOAT, [1, 2, 4, 4])}, inits)
    feeds = {"x": rng.standard_normal((1, 3, 4, 4)).astype(np.float32)}
    before = run(model, feeds)
    result = FoldBatchNormPass()(model)
    assert result.counts == {"conv-into-affine": 1} and op_types(model) == ["Conv"]
    assert_same_outputs(before, run(model, feeds))


def _conv_then(rng, ops: list[str], scale_shape=(1, 2, 1, 1), bias: bool = True, extra_use=False):
    inits = {"w": rng.standard_normal((2, 3, 3, 3)).astype(np.float32)}
    conv_inputs = ["x", "w"]
    if bias:
        inits["b"] = rng.standard_normal(2).astype(np.float32)
        conv_inputs.append("b")
    nodes = [helper.make_node("Conv", conv_inputs, ["c"], pads=[1, 1, 1, 1])]
    last = "c"
    for i, op in enumerate(ops):
        inits[f"k{i}"] = (rng.random(scale_shape) + 0.5).astype(np.float32)
        nodes.append(helper.make_node(op, [last, f"k{i}"], [f"o{i}"]))
        last = f"o{i}"
    outputs = {last: (FLOAT, [1, 2, 5, 5])}
    if extra_use:
        outputs["c"] = (FLOAT, [1, 2, 5, 5])
    return make_model(nodes, {"x": (FLOAT, [1, 3, 5, 5])}, outputs, inits)


def test_per_channel_mul_add_after_conv_is_folded(rng) -> None:
    feeds = {"x": rng.standard_normal((1, 3, 5, 5)).astype(np.float32)}
    cases = [
        (["Mul", "Add"], True, "channel-affine-into-conv", (1, 2, 1, 1)),
        (["Mul", "Add"], False, "channel-affine-into-conv", (2, 1, 1)),
        (["Mul"], True, "channel-scale-into-conv", (1, 2, 1, 1)),
        (["Add"], False, "channel-shift-into-conv", (2, 1, 1)),
    ]
    for ops, bias, rule, shape in cases:
        model = _conv_then(rng, ops, scale_shape=shape, bias=bias)
        before = run(model, feeds)
        result = FoldBatchNormPass()(model)
        assert result.counts == {rule: 1} and op_types(model) == ["Conv"], (ops, bias)
        assert_same_outputs(before, run(model, feeds))


def test_spatial_scale_or_shared_conv_output_is_left_alone(rng) -> None:
    spatial = _conv_then(rng, ["Mul"], scale_shape=(1, 1, 5, 5))
    assert not FoldBatchNormPass()(spatial).modified
    shared = _conv_then(rng, ["Mul", "Add"], extra_use=True)
    assert not FoldBatchNormPass()(shared).modified
    assert op_types(shared) == ["Conv", "Mul", "Add"]
