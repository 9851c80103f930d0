"""Normalizations: LayerNormalization (more to come: GroupNormalization, RMSNormalization…)."""

from __future__ import annotations

from onnxscript import opset13 as op
from onnxscript import script

from onnxopt.targets.decompositions import register


@register("", "LayerNormalization")
@script()
def layer_normalization(X, Scale, B, axis: int = -1, epsilon: float = 1e-5):
    """(X - mean) / sqrt(var + epsilon) * Scale + B over the axes [axis, rank)."""
    shape = op.Shape(X)
    rank = op.Size(shape)
    axis_value = op.Constant(value_int=axis)
    start = op.Where(op.Less(axis_value, op.Constant(value_int=0)), axis_value + rank, axis_value)
    axes = op.Range(start, rank, op.Constant(value_int=1))
    count = op.CastLike(op.ReduceProd(op.Gather(shape, axes), keepdims=0), X)
    mean = op.ReduceSum(X, axes, keepdims=1) / count  # E[x]
    centered = X - mean
    variance = op.ReduceSum(centered * centered, axes, keepdims=1) / count  # E[(x - E[x])^2]
    eps = op.CastLike(op.Constant(value_float=epsilon), X)
    return centered / op.Sqrt(variance + eps) * Scale + B
