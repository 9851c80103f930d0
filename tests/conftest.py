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


def assert_decomposes(
    model: ir.Model,
    feeds: dict[str, np.ndarray],
    op_type: str,
    *,
    domain: str = "",
    atol: float = 1e-5,
    rtol: float = 1e-4,
) -> ir.Model:
    """Replace every ``domain::op_type`` node by its decomposition; the same outputs in ORT."""
    from onnxopt.targets import decompositions

    before = run(model, feeds)
    opset = model.opset_imports.get("", 1)
    nodes = [n for n in model.graph.all_nodes() if (n.domain, n.op_type) == (domain, op_type)]
    assert nodes, f"the model has no {domain}::{op_type}"
    for node in nodes:
        options = decompositions.decompositions(domain, op_type)
        usable = [d for d in options if d.reason_not_applicable(node, opset) is None]
        assert usable, f"no decomposition applies to {node.name}"
        decompositions.replace(model, node, usable[0])
    decompositions.inline_calls(model)
    remaining = [n.op_type for n in model.graph.all_nodes()]
    assert op_type not in remaining and not model.functions, remaining
    after = run(model, feeds)
    for name in before:
        np.testing.assert_allclose(after[name], before[name], atol=atol, rtol=rtol, err_msg=name)
    return model
