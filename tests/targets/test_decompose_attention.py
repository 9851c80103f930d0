"""Decompositions of attention ops against ORT's kernels."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import pytest
from conftest import assert_decomposes, make_model, run
from onnx import TensorProto, helper

from onnxopt import GoldenSet, Pipeline
from onnxopt.passes.lower import LowerPass
from onnxopt.targets import decompositions

FLOAT, BOOL = TensorProto.FLOAT, TensorProto.BOOL
INT32, INT64 = TensorProto.INT32, TensorProto.INT64


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


@pytest.mark.parametrize("bnsh_kv", [False, True])
@pytest.mark.parametrize("attention_bias", [False, True])
@pytest.mark.parametrize("scale", [None, 0.2])
def test_multi_head_attention(attention_bias: bool, scale: float | None, bnsh_kv, rng) -> None:
    batch, heads, q_len, kv_len = 2, 4, 3, 5
    inputs = {
        "q": (FLOAT, [batch, q_len, heads * 8]),
        "k": (FLOAT, [batch, heads, kv_len, 8] if bnsh_kv else [batch, kv_len, heads * 8]),
        "v": (FLOAT, [batch, heads, kv_len, 8] if bnsh_kv else [batch, kv_len, heads * 6]),
    }
    names = list(inputs)
    if attention_bias:
        inputs["ab"] = (FLOAT, [1, heads, q_len, kv_len])
        names += ["", "", "ab"]
    attrs = {"num_heads": heads} | ({} if scale is None else {"scale": scale})
    node = helper.make_node("MultiHeadAttention", names, ["y"], domain="com.microsoft", **attrs)
    model = _model(node, inputs, opset=17, ms=True)
    assert_decomposes(model, _feeds(inputs, rng), "MultiHeadAttention", domain="com.microsoft")


_BATCH, _SEQ, _HIDDEN, _HEADS = 2, 5, 8, 2


def _packed_attention(
    rng, *, mask: bool = False, inputs: tuple[str, ...] = (), outputs=("y",), **attrs
) -> tuple[ir.Model, dict[str, np.ndarray]]:
    """com.microsoft Attention on [2, 5, 8] with 2 heads; weights and bias initializers.

    ``inputs`` names more inputs after the mask slot (past, attention_bias, ...), '' for none.
    """
    weights = rng.standard_normal((_HIDDEN, 3 * _HIDDEN)).astype(np.float32)
    bias = rng.standard_normal(3 * _HIDDEN).astype(np.float32)
    io = {"x": (FLOAT, [_BATCH, _SEQ, _HIDDEN])}
    feeds = {"x": rng.standard_normal((_BATCH, _SEQ, _HIDDEN)).astype(np.float32)}
    if mask:
        io["mask"] = (INT32, [_BATCH, _SEQ])
        feeds["mask"] = np.array([[1, 1, 1, 0, 0], [1, 0, 1, 1, 1]], dtype=np.int32)
    for name in filter(None, inputs):  # only declared: these tests do not run the model
        io[name] = (INT32 if name == "past_length" else FLOAT, None)
    names = ["x", "w", "b", "mask" if mask else "", *inputs]
    while names[-1] == "":
        names.pop()
    node = helper.make_node(
        "Attention",
        names,
        list(outputs),
        domain="com.microsoft",
        num_heads=_HEADS,
        **attrs,
    )
    model = make_model(
        [node], io, {o: (FLOAT, None) for o in outputs if o}, {"w": weights, "b": bias}
    )
    model.opset_imports["com.microsoft"] = 1
    return model, feeds


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("mask", [False, True])
@pytest.mark.parametrize("scale", [None, 0.3])
def test_packed_attention(mask: bool, causal: bool, scale: float | None, rng) -> None:
    attrs = ({"unidirectional": 1} if causal else {}) | ({} if scale is None else {"scale": scale})
    model, feeds = _packed_attention(rng, mask=mask, **attrs)
    result = assert_decomposes(model, feeds, "Attention", domain="com.microsoft")
    ops = [n.op_type for n in result.graph]
    assert (
        "Softmax" in ops and ("Range" in ops) == causal and ("Greater" in ops) == (mask or causal)
    )


@pytest.mark.parametrize("causal", [False, True])
def test_packed_attention_mask_filter_value(causal: bool, rng) -> None:
    """The mask adds mask_filter_value (a row masked entirely averages V); causal is -inf."""
    attrs = {"mask_filter_value": -3.0} | ({"unidirectional": 1} if causal else {})
    model, feeds = _packed_attention(rng, mask=True, **attrs)
    feeds["mask"][1] = 0  # the second batch item masked entirely
    feeds["mask"][0, 1] = 7  # > 0 counts as kept
    assert_decomposes(model, feeds, "Attention", domain="com.microsoft")


def test_packed_attention_equal_qkv_hidden_sizes(rng) -> None:
    model, feeds = _packed_attention(rng, qkv_hidden_sizes=[_HIDDEN] * 3)
    assert_decomposes(model, feeds, "Attention", domain="com.microsoft")


@pytest.mark.parametrize(
    ("kwargs", "mask_shape", "reason"),
    [
        ({"inputs": ("past",), "outputs": ("y", "present")}, None, "optional output"),
        ({"inputs": ("past",)}, None, "past"),
        ({"inputs": ("", "", "past_length")}, None, "past"),
        ({"inputs": ("", "attention_bias")}, None, "attention_bias"),
        ({"do_rotary": 1}, None, "do_rotary"),
        ({"qkv_hidden_sizes": [8, 8, 4]}, None, "qkv_hidden_sizes"),
        ({}, [_BATCH], "mask_index"),
        ({}, [_BATCH, _SEQ, _SEQ], "mask_index"),
        ({}, [_BATCH, 1, _SEQ, _SEQ], "mask_index"),
        ({"outputs": ("y", "present")}, None, "optional output"),
    ],
)
def test_packed_attention_not_applicable(
    kwargs: dict, mask_shape: list[int] | None, reason: str, rng
) -> None:
    model, _ = _packed_attention(rng, mask=mask_shape is not None, **kwargs)
    if mask_shape is not None:
        model.graph.inputs[1].shape = ir.Shape(mask_shape)
    (node,) = model.graph
    reasons = [
        d.reason_not_applicable(node, 17)
        for d in decompositions.decompositions("com.microsoft", "Attention")
    ]
    assert all(reasons) and any(reason in r for r in reasons), reasons


def test_packed_attention_without_bias_not_applicable(rng) -> None:
    model, _ = _packed_attention(rng)
    (node,) = model.graph
    node.replace_input_with(2, None)
    reasons = [
        d.reason_not_applicable(node, 17)
        for d in decompositions.decompositions("com.microsoft", "Attention")
    ]
    assert all(r == "no bias" for r in reasons), reasons


def test_packed_attention_lowered_to_opset_13(rng) -> None:
    model, feeds = _packed_attention(rng, mask=True, unidirectional=1)
    expected = run(model, feeds)
    golden = GoldenSet(inputs=[feeds], outputs=[expected])
    lowered, report = Pipeline([LowerPass(target="onnx-13")], golden=golden).run(model)
    (entry,) = report.passes
    assert entry.status == "ok", entry.reason
    assert entry.counts["Attention"] == 1 and lowered.opset_imports[""] == 13
    assert not any(n.domain == "com.microsoft" for n in lowered.graph.all_nodes())
    np.testing.assert_allclose(run(lowered, feeds)["y"], expected["y"], atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("scale", [None, 0.3])
def test_group_query_attention_without_cache(scale: float | None, rng) -> None:
    """What fuse-attention writes for repeated K/V heads: no past, causal=0, a bias."""
    batch, seq, heads, kv_heads, size = 2, 5, 4, 2, 16
    inputs = {
        "q": (FLOAT, [batch, seq, heads * size]),
        "k": (FLOAT, [batch, seq, kv_heads * size]),
        "v": (FLOAT, [batch, seq, kv_heads * size]),
        "bias": (FLOAT, [batch, 1, seq, seq]),
    }
    names = ["q", "k", "v", "", "", "seqlens", "total", "", "", "", "bias"]
    attrs = {"num_heads": heads, "kv_num_heads": kv_heads, "causal": 0}
    attrs |= {} if scale is None else {"scale": scale}
    node = helper.make_node("GroupQueryAttention", names, ["y"], domain="com.microsoft", **attrs)
    graph = helper.make_graph(
        [node],
        "gqa",
        [helper.make_tensor_value_info(n, t, s) for n, (t, s) in inputs.items()],
        [helper.make_tensor_value_info("y", FLOAT, None)],
        [
            helper.make_tensor("seqlens", TensorProto.INT32, [batch], [seq - 1] * batch),
            helper.make_tensor("total", TensorProto.INT32, [], [seq]),
        ],
    )
    opsets = [helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)]
    model = ir.serde.deserialize_model(helper.make_model(graph, opset_imports=opsets))
    feeds = _feeds(inputs, rng)
    feeds["bias"] = np.where(rng.random((batch, 1, seq, seq)) < 0.3, -1e4, 0).astype(np.float32)
    assert_decomposes(model, feeds, "GroupQueryAttention", domain="com.microsoft")


@pytest.mark.parametrize("positions", ["offset", "per-token"])
def test_rotary_embedding(positions: str, rng) -> None:
    batch, heads, seq, size, rows = 2, 3, 5, 8, 12
    angles = rng.random((rows, size // 2)).astype(np.float32) * 3
    inputs = {"x": (FLOAT, [batch, heads, seq, size])}
    if positions == "offset":
        ids = helper.make_tensor("pos", TensorProto.INT64, [1], [2])
    else:
        values = rng.integers(0, rows, (batch, seq))
        ids = helper.make_tensor("pos", TensorProto.INT64, [batch, seq], values.ravel())
    tables = [
        ids,
        helper.make_tensor("cos", FLOAT, list(angles.shape), np.cos(angles).ravel()),
        helper.make_tensor("sin", FLOAT, list(angles.shape), np.sin(angles).ravel()),
    ]
    node = helper.make_node(
        "RotaryEmbedding", ["x", "pos", "cos", "sin"], ["y"], domain="com.microsoft"
    )
    graph = helper.make_graph(
        [node],
        "rope",
        [helper.make_tensor_value_info("x", FLOAT, inputs["x"][1])],
        [helper.make_tensor_value_info("y", FLOAT, None)],
        tables,
    )
    opsets = [helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)]
    model = ir.serde.deserialize_model(helper.make_model(graph, opset_imports=opsets))
    assert_decomposes(model, _feeds(inputs, rng), "RotaryEmbedding", domain="com.microsoft")


def test_interleaved_rotary_is_left_alone() -> None:
    node = helper.make_node(
        "RotaryEmbedding", ["x", "p", "c", "s"], ["y"], domain="com.microsoft", interleaved=1
    )
    inputs = {"x": (FLOAT, [1, 2, 3, 8]), "p": (INT64, [1]), "c": (FLOAT, [4, 4])}
    inputs["s"] = (FLOAT, [4, 4])
    rotary = next(iter(_model(node, inputs, opset=17, ms=True).graph))
    (option,) = decompositions.decompositions("com.microsoft", "RotaryEmbedding")
    assert "interleaved" in option.reason_not_applicable(rotary, 17)
