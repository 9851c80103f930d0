"""Decompositions of Gelu-family activations: structure and numerics against ORT and numpy."""

from __future__ import annotations

import math

import numpy as np
import onnx_ir as ir
import pytest
from conftest import FLOAT, assert_decomposes, make_model, op_types, run
from onnx import TensorProto, helper

from onnxopt.targets import decompositions

FLOAT16 = TensorProto.FLOAT16
MS = "com.microsoft"
SHAPE = [2, 3, 8]
_erf = np.vectorize(math.erf)


def _gelu(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    return 0.5 * x * (1 + _erf(x / math.sqrt(2)))


def _gelu_tanh(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    return 0.5 * x * (1 + np.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x**3)))


def _model(op_type, inputs, attrs=None, inits=None, *, domain="", opset=17, elem=FLOAT):
    node = helper.make_node(op_type, inputs, ["y"], domain=domain, **(attrs or {}))
    model = make_model([node], {"x": (elem, SHAPE)}, {"y": (elem, SHAPE)}, inits, opset=opset)
    if domain:
        model.opset_imports[domain] = 1
    return model


def _x(rng, dtype=np.float32) -> np.ndarray:
    return (rng.standard_normal(SHAPE) * 3).astype(dtype)


def _check(model, feeds, op_type, expected, domain="", atol=1e-5, rtol=1e-4) -> ir.Model:
    result = assert_decomposes(model, feeds, op_type, domain=domain, atol=atol, rtol=rtol)
    np.testing.assert_allclose(run(result, feeds)["y"], expected, atol=atol, rtol=rtol)
    return result


@pytest.mark.parametrize("approximate", [None, "none", "tanh"])
def test_gelu(approximate: str | None, rng) -> None:
    attrs = {} if approximate is None else {"approximate": approximate}
    feeds = {"x": _x(rng)}
    expected = (_gelu_tanh if approximate == "tanh" else _gelu)(feeds["x"])
    result = _check(_model("Gelu", ["x"], attrs, opset=20), feeds, "Gelu", expected)
    assert ("Tanh" if approximate == "tanh" else "Erf") in op_types(result)


@pytest.mark.parametrize("approximate", ["none", "tanh"])
def test_gelu_fp16(approximate: str, rng) -> None:
    model = _model("Gelu", ["x"], {"approximate": approximate}, opset=20, elem=FLOAT16)
    feeds = {"x": _x(rng, np.float16)}
    assert_decomposes(model, feeds, "Gelu", atol=5e-3, rtol=5e-3)


def test_gelu_unknown_approximation_is_refused() -> None:
    node = ir.node("Gelu", [None], attributes={"approximate": "sigmoid"})
    options = decompositions.decompositions("", "Gelu")
    assert all(d.reason_not_applicable(node, 20) is not None for d in options)


def test_ms_gelu(rng) -> None:
    feeds = {"x": _x(rng)}
    model = _model("Gelu", ["x"], domain=MS)
    _check(model, feeds, "Gelu", _gelu(feeds["x"]), domain=MS)


def test_bias_gelu(rng) -> None:
    inits = {"b": rng.standard_normal([8]).astype(np.float32)}
    feeds = {"x": _x(rng)}
    model = _model("BiasGelu", ["x", "b"], inits=inits, domain=MS)
    _check(model, feeds, "BiasGelu", _gelu(feeds["x"] + inits["b"]), domain=MS)


@pytest.mark.parametrize("inputs", [["x"], ["x", ""], ["x", "b"]])
def test_fast_gelu(inputs: list[str], rng) -> None:
    inits = {"b": rng.standard_normal([8]).astype(np.float32)} if "b" in inputs else {}
    feeds = {"x": _x(rng)}
    model = _model("FastGelu", inputs, inits=inits, domain=MS)
    expected = _gelu_tanh(feeds["x"] + inits.get("b", 0))
    _check(model, feeds, "FastGelu", expected, domain=MS)


@pytest.mark.parametrize("alpha", [None, 1.0, -0.5])
def test_quick_gelu(alpha: float | None, rng) -> None:
    attrs = {} if alpha is None else {"alpha": alpha}
    feeds = {"x": _x(rng)}
    model = _model("QuickGelu", ["x"], attrs, domain=MS)
    a = 1.702 if alpha is None else alpha
    x = feeds["x"].astype(np.float64)
    _check(model, feeds, "QuickGelu", x / (1 + np.exp(-a * x)), domain=MS)


@pytest.mark.parametrize(
    ("op_type", "inputs"),
    [("Gelu", ["x"]), ("BiasGelu", ["x", "b"]), ("FastGelu", ["x", "b"]), ("QuickGelu", ["x"])],
)
def test_ms_activations_fp16(op_type: str, inputs: list[str], rng) -> None:
    """ORT runs these in fp16 through the ops' function bodies; the same within fp16 rounding."""
    inits = {"b": rng.standard_normal([8]).astype(np.float16)} if "b" in inputs else {}
    model = _model(op_type, inputs, inits=inits, domain=MS, elem=FLOAT16)
    assert_decomposes(model, {"x": _x(rng, np.float16)}, op_type, domain=MS, atol=5e-3, rtol=5e-3)
