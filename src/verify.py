"""Checks after a pass: structure (checker, dangling values, order) and where numerics diverge."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import numpy as np
import onnx
import onnx_ir as ir
from onnx_ir.passes.common import CheckerPass

from onnxopt.errors import VerificationError
from onnxopt.metrics import Metrics, Tolerance, compare
from onnxopt.ort_runner import RunnableModel

_MAX_EXPOSED = 5000  # intermediate values compared when looking for the first divergence


def structural_problems(model: ir.Model) -> list[str]:
    """What is structurally wrong: dangling or out-of-order values, then the ONNX checker.

    The checker sees the graph with large weights turned into typed inputs, so models with
    external data or over 2 GB are checked without reading their weights.
    """
    problems = _graph_problems(model.graph, frozenset())
    if not problems:
        try:
            with _external_weights_hidden(model):
                CheckerPass()(model)
        except (onnx.checker.ValidationError, ValueError) as err:
            problems.append("onnx checker: " + " ".join(str(err).split())[:300])
    return problems


@contextlib.contextmanager
def _external_weights_hidden(model: ir.Model) -> Iterator[None]:
    """Detach external weights (even small ones) so the checker never looks for their files."""
    hidden = [
        (value, value.const_value)
        for graph in (model.graph, *model.graph.subgraphs())
        for value in graph.initializers.values()
        if isinstance(value.const_value, ir.ExternalTensor)
    ]
    for value, tensor in hidden:
        value.shape = value.shape or tensor.shape
        value.dtype = value.dtype or tensor.dtype
        value.const_value = None
    try:
        yield
    finally:
        for value, tensor in hidden:
            value.const_value = tensor


def _graph_problems(graph: ir.Graph, outer: frozenset[ir.Value]) -> list[str]:
    available = set(outer) | set(graph.inputs) | set(graph.initializers.values())
    problems = []
    for node in graph:
        for value in node.inputs:
            if value is None or value in available:
                continue
            producer = value.producer()
            where = f"node '{node.name}' ({node.op_type}) reads '{value.name}'"
            if producer is None:
                problems.append(f"{where}, which nothing produces")
            else:
                problems.append(f"{where} before '{producer.name}' produces it (not sorted)")
        for attr in node.attributes.values():
            if attr.type == ir.AttributeType.GRAPH:
                problems += _graph_problems(attr.as_graph(), frozenset(available))
            elif attr.type == ir.AttributeType.GRAPHS:
                for sub in attr.as_graphs():
                    problems += _graph_problems(sub, frozenset(available))
        available.update(node.outputs)
    for value in graph.outputs:
        if value not in available:
            problems.append(f"graph output '{value.name}' is not produced")
    return problems


def first_diverging(
    before: ir.Model, after: ir.Model, feeds: dict[str, np.ndarray], tol: Tolerance
) -> tuple[str, Metrics] | None:
    """The first value (in the new model's order) whose name exists in both models and differs."""
    before_names = {v.name for node in before.graph for v in node.outputs if v.name}
    common = [
        v.name for node in after.graph for v in node.outputs if v.name and v.name in before_names
    ][:_MAX_EXPOSED]
    try:
        old = RunnableModel(before, extra_outputs=common).run(feeds)
        new = RunnableModel(after, extra_outputs=common).run(feeds)
    except VerificationError:
        return None
    for name in [*common, *(v.name for v in after.graph.outputs)]:
        if name in old and name in new:
            metrics = compare(old[name], new[name], tol, name)
            if not metrics.passed:
                return name, metrics
    return None
