"""Decompositions of quantized ops against ORT's com.microsoft kernels."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import pytest
from conftest import assert_decomposes, run
from onnx import TensorProto, helper, numpy_helper


def _pack(codes: np.ndarray, bits: int) -> np.ndarray:
    """Pack ``bits``-wide codes along the last axis into uint8, low bits first."""
    per_byte = 8 // bits
    pad = -codes.shape[-1] % per_byte
    codes = np.pad(codes, [(0, 0)] * (codes.ndim - 1) + [(0, pad)]).astype(np.uint8)
    grouped = codes.reshape(*codes.shape[:-1], -1, per_byte)
    shifts = np.arange(per_byte, dtype=np.uint8) * bits
    return np.bitwise_or.reduce(grouped << shifts, axis=-1).astype(np.uint8)


def _matmul_nbits_model(
    a_shape: list[int],
    k: int,
    n: int,
    bits: int,
    block_size: int,
    zero_points: str,
    bias: bool,
    rng: np.random.Generator,
) -> tuple[ir.Model, np.ndarray]:
    """The model and its dequantized weight ``[K, N]`` (the spec's formula, in numpy)."""
    blocks = -(-k // block_size)
    codes = rng.integers(0, 2**bits, size=(n, blocks, block_size))
    inits = {
        "B": _pack(codes, bits),
        "scales": rng.uniform(0.01, 0.1, size=(n, blocks)).astype(np.float32),
    }
    inputs = ["A", "B", "scales"]
    zp = np.full((n, blocks), 2.0 ** (bits - 1), np.float32)
    if zero_points == "packed":
        zp = rng.integers(0, 2**bits, size=(n, blocks)).astype(np.float32)
        inits["zp"] = _pack(zp.astype(np.uint8), bits)
    elif zero_points == "float":
        zp = rng.uniform(0, 2**bits - 1, size=(n, blocks)).astype(np.float32)
        inits["zp"] = zp
    if zero_points != "none":
        inputs.append("zp")
    if bias:
        inits["bias"] = rng.standard_normal(n).astype(np.float32)
        inputs += [""] * (5 - len(inputs)) + ["bias"]
    node = helper.make_node(
        "MatMulNBits",
        inputs,
        ["Y"],
        domain="com.microsoft",
        K=k,
        N=n,
        block_size=block_size,
        **({} if bits == 4 else {"bits": bits}),  # 4: the default
    )
    graph = helper.make_graph(
        [node],
        "test",
        [helper.make_tensor_value_info("A", TensorProto.FLOAT, a_shape)],
        [helper.make_tensor_value_info("Y", TensorProto.FLOAT, None)],
        [numpy_helper.from_array(v, name) for name, v in inits.items()],
    )
    opsets = [helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)]
    proto = helper.make_model(graph, opset_imports=opsets)
    proto.ir_version = 8
    weight = (codes - zp[..., None]) * inits["scales"][..., None]
    return ir.serde.deserialize_model(proto), weight.reshape(n, -1)[:, :k].T


def _decompose(model: ir.Model) -> None:
    from onnxopt.targets import decompositions

    opset = model.opset_imports[""]
    for node in list(model.graph):
        options = decompositions.decompositions(node.domain, node.op_type)
        usable = [d for d in options if d.reason_not_applicable(node, opset) is None]
        decompositions.replace(model, node, usable[0])
    decompositions.inline_calls(model)


@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("zero_points", ["none", "packed", "float"])
@pytest.mark.parametrize("bias", [False, True])
def test_matmul_nbits(bits: int, zero_points: str, bias: bool, rng) -> None:
    model, weight = _matmul_nbits_model([2, 3, 40], 40, 6, bits, 16, zero_points, bias, rng)
    feeds = {"A": rng.standard_normal([2, 3, 40]).astype(np.float32)}
    expected = feeds["A"] @ weight
    if bias:
        expected += model.graph.initializers["bias"].const_value.numpy()
    if bits == 8 and zero_points == "float":  # ORT's CPU kernel rejects this combination
        _decompose(model)
    else:
        model = assert_decomposes(model, feeds, "MatMulNBits", domain="com.microsoft")
    assert "MatMulNBits" not in [n.op_type for n in model.graph]
    np.testing.assert_allclose(run(model, feeds)["Y"], expected, rtol=1e-4, atol=1e-5)


def test_matmul_nbits_2d_large_block(rng) -> None:
    model, _ = _matmul_nbits_model([5, 64], 64, 3, 4, 32, "packed", False, rng)
    feeds = {"A": rng.standard_normal([5, 64]).astype(np.float32)}
    assert_decomposes(model, feeds, "MatMulNBits", domain="com.microsoft")


def test_matmul_nbits_g_idx_not_decomposed(rng) -> None:
    from onnxopt.targets import decompositions

    model, _ = _matmul_nbits_model([2, 16], 16, 2, 4, 16, "none", False, rng)
    node = next(iter(model.graph))
    node.resize_inputs(5)
    node.replace_input_with(4, model.graph.inputs[0])
    reasons = [
        d.reason_not_applicable(node, 17)
        for d in decompositions.decompositions("com.microsoft", "MatMulNBits")
    ]
    assert all(r is not None for r in reasons)
