"""Decompositions of attention ops against ORT's kernels."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import pytest
from conftest import assert_decomposes
from onnx import TensorProto, helper

from onnxopt.targets import decompositions

FLOAT, BOOL = TensorProto.FLOAT, TensorProto.BOOL


def _model(
    node, inputs: dict[str, tuple[int, list[int]]], opset: int = 23, ms: bool = False
) -> ir.Model:
    graph = helper.make_graph(
        [node],
        "test",
        [helper.make_tensor_value_info(n, t, s) for n, (t, s) in inputs.items()],
        [helper.make_tensor_value_info("y", FLOAT, None)],
    )
    opsets = [helper.make_opsetid("", opset)]
    if ms:
        opsets.append(helper.make_opsetid("com.microsoft", 1))
    proto = helper.make_model(graph, opset_imports=opsets)
    proto.ir_version = 10
    return ir.serde.deserialize_model(proto)


def _feeds(inputs: dict[str, tuple[int, list[int]]], rng) -> dict[str, np.ndarray]:
    feeds = {}
    for name, (dtype, shape) in inputs.items():
        if dtype == BOOL:
            mask = rng.random(shape) < 0.7
            mask[..., 0] = True  # no row masked entirely (kept for a dedicated test)
            feeds[name] = mask
        else:
            feeds[name] = rng.standard_normal(shape).astype(np.float32)
    return feeds


_CASES = [
    (rank, mask, causal)
    for rank in (4, 3)
    for mask in ("none", "bool", "float")
    for causal in (False, True)
    if not (rank == 3 and mask != "none" and causal)  # not decomposed
]


@pytest.mark.parametrize(("rank", "mask", "causal"), _CASES)
@pytest.mark.parametrize("scale", [None, 0.3])
def test_attention(rank: int, mask: str, causal: bool, scale: float | None, rng) -> None:
    batch, heads, q_len, kv_len, size, v_size = 2, 3, 4, 5, 8, 6
    if rank == 4:
        q_shape = [batch, heads, q_len, size]
        k_shape = [batch, heads, kv_len, size]
        v_shape = [batch, heads, kv_len, v_size]
        attrs = {}
    else:
        q_shape = [batch, q_len, heads * size]
        k_shape = [batch, kv_len, heads * size]
        v_shape = [batch, kv_len, heads * v_size]
        attrs = {"q_num_heads": heads, "kv_num_heads": heads}
    inputs = {"q": (FLOAT, q_shape), "k": (FLOAT, k_shape), "v": (FLOAT, v_shape)}
    if mask != "none":
        inputs["m"] = (BOOL if mask == "bool" else FLOAT, [q_len, kv_len])
    if causal:
        attrs["is_causal"] = 1
    if scale is not None:
        attrs["scale"] = scale
    node = helper.make_node("Attention", list(inputs), ["y"], **attrs)
    model = _model(node, inputs)
    result = assert_decomposes(model, _feeds(inputs, rng), "Attention")
    assert "Softmax" in [n.op_type for n in result.graph]


@pytest.mark.parametrize("mask", ["bool", "float"])
def test_attention_fully_masked_row_is_zero(mask: str, rng) -> None:
    shape = [1, 2, 3, 4]
    inputs = {"q": (FLOAT, shape), "k": (FLOAT, shape), "v": (FLOAT, shape)}
    inputs["m"] = (BOOL if mask == "bool" else FLOAT, [1, 1, 3, 3])
    node = helper.make_node("Attention", list(inputs), ["y"])
    feeds = _feeds(inputs, rng)
    allowed = np.array([[True, False, True], [False, False, False], [True, True, True]])
    feeds["m"] = allowed if mask == "bool" else np.where(allowed, 0, -np.inf).astype(np.float32)
    feeds["m"] = feeds["m"].reshape(1, 1, 3, 3)
    result = assert_decomposes(_model(node, inputs), feeds, "Attention")
    assert "IsNaN" in [n.op_type for n in result.graph]


@pytest.mark.parametrize(
    ("attrs", "shapes", "reason"),
    [
        ({}, ([1, 4, 3, 8], [1, 2, 3, 8]), "head counts"),  # grouped-query
        ({"softcap": 5.0}, ([1, 2, 3, 8], [1, 2, 3, 8]), "softcap"),
        ({}, ([1, 3, 16], [1, 3, 16]), "head counts"),  # 3D without q_num_heads
    ],
)
def test_attention_not_applicable(attrs: dict, shapes: tuple, reason: str) -> None:
    q_shape, k_shape = shapes
    inputs = {"q": (FLOAT, q_shape), "k": (FLOAT, k_shape), "v": (FLOAT, k_shape)}
    node = helper.make_node("Attention", list(inputs), ["y"], **attrs)
    attention = next(iter(_model(node, inputs).graph))
    reasons = [
        d.reason_not_applicable(attention, 23)
        for d in decompositions.decompositions("", "Attention")
    ]
    assert all(reasons) and any(reason in r for r in reasons), reasons


@pytest.mark.parametrize("attention_bias", [False, True])
@pytest.mark.parametrize("scale", [None, 0.2])
def test_multi_head_attention(attention_bias: bool, scale: float | None, rng) -> None:
    batch, heads, q_len, kv_len = 2, 4, 3, 5
    inputs = {
        "q": (FLOAT, [batch, q_len, heads * 8]),
        "k": (FLOAT, [batch, kv_len, heads * 8]),
        "v": (FLOAT, [batch, kv_len, heads * 6]),
    }
    names = list(inputs)
    if attention_bias:
        inputs["ab"] = (FLOAT, [1, heads, q_len, kv_len])
        names += ["", "", "ab"]
    attrs = {"num_heads": heads} | ({} if scale is None else {"scale": scale})
    node = helper.make_node("MultiHeadAttention", names, ["y"], domain="com.microsoft", **attrs)
    model = _model(node, inputs, opset=17, ms=True)
    assert_decomposes(model, _feeds(inputs, rng), "MultiHeadAttention", domain="com.microsoft")
