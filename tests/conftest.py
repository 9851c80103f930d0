"""Shared fixtures: tiny models built in code, the shipped golden models, ORT runs."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnxopt import ort_runner

ROOT = Path(__file__).resolve().parent.parent
GOLDEN = ROOT / "golden"
WHISPER = GOLDEN / "whisper_encoder.onnx"
WHISPER_GOLDEN = GOLDEN / "whisper_encoder.golden"


def make_model(
    nodes: list[onnx.NodeProto],
    inputs: dict[str, tuple[int, list]],
    outputs: dict[str, tuple[int, list | None]],
    initializers: dict[str, np.ndarray] | None = None,
    opset: int = 17,
) -> ir.Model:
    """An onnx-ir model from onnx.helper nodes; IO given as ``name: (elem_type, shape)``."""
    graph = helper.make_graph(
        nodes,
        "test",
        [helper.make_tensor_value_info(n, t, s) for n, (t, s) in inputs.items()],
        [helper.make_tensor_value_info(n, t, s) for n, (t, s) in outputs.items()],
        [numpy_helper.from_array(a, n) for n, a in (initializers or {}).items()],
    )
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    proto.ir_version = 8
    return ir.serde.deserialize_model(proto)


def run(model: ir.Model, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Outputs of ``model`` in ORT (its optimizations off)."""
    return ort_runner.run(model, [feeds])[0]


def op_types(model: ir.Model) -> list[str]:
    return [node.op_type for node in model.graph]


def assert_same_outputs(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> None:
    assert a.keys() == b.keys()
    for name in a:
        np.testing.assert_allclose(a[name], b[name], rtol=1e-5, atol=1e-6, err_msg=name)


FLOAT = TensorProto.FLOAT
INT64 = TensorProto.INT64


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(0)


@pytest.fixture
def whisper_path() -> Path:
    return WHISPER
