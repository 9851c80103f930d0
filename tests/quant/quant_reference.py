"""Test references: exact optima of the block quantization error, block errors, ORT sessions."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
from onnx import helper


def optimum_fixed_range(x: np.ndarray, w: np.ndarray, low: int, high: int) -> float:
    """min over s > 0 of sum(w (x - s * clip(round(x / s), low, high))^2), exactly.

    The levels change only at ``s = |x_i| / (m + 1/2)``; between two such points they are fixed
    and the error is a quadratic in ``s``, minimised at the least-squares scale (clamped to the
    interval). Every interval is evaluated at once.
    """
    x, w = x.astype(np.float64), w.astype(np.float64)
    reach = max(abs(low), abs(high)) + 1
    cuts = np.unique(np.abs(x)[:, None] / (np.arange(reach) + 0.5)[None, :])
    cuts = cuts[cuts > 0]
    if cuts.size == 0:
        return 0.0
    a = np.concatenate([[cuts[0] / 2], cuts])
    b = np.concatenate([cuts, [cuts[-1] * 2]])
    levels = np.clip(np.rint(x[None, :] / ((a + b) / 2)[:, None]), low, high)
    sll = np.sum(w * levels * levels, axis=1)
    sxl = np.sum(w * x * levels, axis=1)
    s = np.clip(np.divide(sxl, sll, out=np.zeros_like(sxl), where=sll > 0), a, b)
    errors = np.sum(w * (x[None, :] - s[:, None] * levels) ** 2, axis=1)
    return float(min(errors.min(), np.sum(w * x * x)))  # the last: s -> infinity, all levels 0


def optimum(x: np.ndarray, w: np.ndarray, bits: int, symmetric: bool) -> float:
    """The least weighted error any scale (and integer zero point) reaches on block ``x``."""
    max_code, mid = (1 << bits) - 1, 1 << (bits - 1)
    if symmetric:  # a negative scale mirrors the range: levels [-mid, mid-1] or [-(mid-1), mid]
        ranges = [(-mid, mid - 1), (-(mid - 1), mid)]
    else:
        ranges = [(-z, max_code - z) for z in range(max_code + 1)]
    return min(optimum_fixed_range(x, w, low, high) for low, high in ranges)


def weighted_error(x: np.ndarray, w: np.ndarray, codes, scales, zero_points, bits: int):
    """Per block ``sum(w (x - s (q - z))^2)`` for kernel outputs (None zero points: default)."""
    z = np.float32(1 << (bits - 1)) if zero_points is None else zero_points[:, None]
    levels = codes.astype(np.float64) - np.asarray(z, dtype=np.float64)
    return np.sum(w * (x - scales[:, None].astype(np.float64) * levels) ** 2, axis=1)


def session(
    nodes: list[onnx.NodeProto],
    inputs: list[onnx.ValueInfoProto],
    outputs: list[onnx.ValueInfoProto],
    initializers: list[onnx.TensorProto],
    *,
    optimize: bool = False,
) -> ort.InferenceSession:
    """An ORT CPU session on an opset-21 model (com.microsoft imported); ORT's fusions off."""
    graph = helper.make_graph(nodes, "quant", inputs, outputs, initializers)
    opsets = [helper.make_opsetid("", 21), helper.make_opsetid("com.microsoft", 1)]
    model = helper.make_model(graph, opset_imports=opsets)
    model.ir_version = 10
    options = ort.SessionOptions()
    if not optimize:
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    cpu = ["CPUExecutionProvider"]
    return ort.InferenceSession(model.SerializeToString(), options, providers=cpu)
