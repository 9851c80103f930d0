"""quant-int8: MatMul/Gemm weights to int8 as MatMulNBits, per-channel QDQ, or dynamic int8."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import FLOAT, WHISPER, WHISPER_GOLDEN, make_model, op_types, run
from onnx import helper

from onnxopt import optimize
from onnxopt.passes.quant_int8 import QuantInt8Pass
from onnxopt.quant import blocks

K, N = 96, 64


def _model(rng, op="MatMul", opset=17):
    w = rng.standard_normal((K, N)).astype(np.float32)
    inits = {"w": w}
    inputs = ["x", "w"]
    if op == "Gemm":
        inits["c"] = rng.standard_normal(N).astype(np.float32)
        inputs.append("c")
    node = helper.make_node(op, inputs, ["y"], name="node")
    model = make_model([node], {"x": (FLOAT, [4, K])}, {"y": (FLOAT, [4, N])}, inits, opset)
    return model, w, inits.get("c", 0)


def _rel(a, b):
    return np.linalg.norm(a - b) / np.linalg.norm(b)


def test_matmul_nbits_8_bits(rng):
    model, w, _ = _model(rng)
    x = rng.standard_normal((4, K)).astype(np.float32)
    result = QuantInt8Pass(accuracy_level=0)(model)
    assert result.counts == {"matmul": 1} and op_types(model) == ["MatMulNBits"]
    node = next(iter(model.graph))
    assert node.attributes["bits"].value == 8
    expected = x @ blocks.rtn(w.T, bits=8, block=32, symmetric=True).dequantize().T
    np.testing.assert_allclose(run(model, {"x": x})["y"], expected, rtol=1e-4, atol=1e-4)
    assert _rel(run(model, {"x": x})["y"], x @ w) < 0.01


@pytest.mark.parametrize("op", ["MatMul", "Gemm"])
def test_qdq_per_channel(rng, op):
    model, w, c = _model(rng, op=op, opset=11)
    x = rng.standard_normal((4, K)).astype(np.float32)
    result = QuantInt8Pass(format="qdq")(model)
    assert result.counts == {"opset": 1, op.lower(): 1}
    assert model.opset_imports[""] == 13 and op_types(model) == ["DequantizeLinear", op]
    q, scales = blocks.per_channel_int8(w.T)
    expected = x @ (q * scales[:, None]).T + c
    np.testing.assert_allclose(run(model, {"x": x})["y"], expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("op", ["MatMul", "Gemm"])
def test_dynamic(rng, op):
    model, w, c = _model(rng, op=op)
    x = rng.standard_normal((4, K)).astype(np.float32)
    result = QuantInt8Pass(format="dynamic")(model)
    assert result.counts == {op.lower(): 1} and op_types(model) == ["DynamicQuantizeMatMul"]
    assert _rel(run(model, {"x": x})["y"], x @ w + c) < 0.03


def test_kquant_lowers_the_weight_error(rng):
    def weight_error(algo):
        model, w, _ = _model(rng)
        QuantInt8Pass(algo=algo, accuracy_level=0)(model)
        eye = np.eye(K, dtype=np.float32)
        return np.sum((run(model, {"x": eye[:4]})["y"] - w[:4]) ** 2)

    assert weight_error("kquant") < weight_error("rtn")


def test_whisper_encoder_dynamic_verified():
    _, report = optimize(WHISPER, [QuantInt8Pass(format="dynamic")], golden=WHISPER_GOLDEN)
    entry = report.passes[0]
    assert entry.status == "ok" and entry.counts == {"matmul": 12, "conv": 2}
    assert entry.metrics["cosine"] > 0.999


@pytest.mark.parametrize(
    ("fmt", "counts"),
    [
        ("matmulnbits", {"matmul": 1}),
        ("dynamic", {"skipped-dtype": 1}),
        ("qdq", {"skipped-dtype": 1}),
    ],
)
def test_float16_weights(rng, fmt, counts):
    w = rng.standard_normal((K, N)).astype(np.float16)
    half = helper.np_dtype_to_tensor_dtype(np.dtype(np.float16))
    node = helper.make_node("MatMul", ["x", "w"], ["y"])
    model = make_model([node], {"x": (half, [4, K])}, {"y": (half, [4, N])}, {"w": w})
    assert QuantInt8Pass(format=fmt)(model).counts == counts
    x = rng.standard_normal((4, K)).astype(np.float16)
    y = run(model, {"x": x})["y"].astype(np.float32)
    assert _rel(y, x.astype(np.float32) @ w.astype(np.float32)) < 0.01


@pytest.mark.parametrize("fmt", ["matmulnbits", "qdq", "dynamic"])
def test_layer_record_error_is_the_weights_own(rng, fmt):
    w = rng.standard_normal((64, 48)).astype(np.float32)
    nodes = [helper.make_node("MatMul", ["x", "w"], ["y"], name="mm")]
    model = make_model(nodes, {"x": (FLOAT, [3, 64])}, {"y": (FLOAT, [3, 48])}, {"w": w})
    result = QuantInt8Pass(format=fmt, min_elements=0)(model)
    (layer,) = result.layers
    assert layer["precision"] == "int8" and layer["format"] == fmt
    assert 0 < layer["rel_error"] < 0.02  # 8 bits: well under 4 bits' ~0.1
