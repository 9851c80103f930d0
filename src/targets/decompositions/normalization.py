"""Normalizations: Layer-, Group- and RMSNormalization; ORT's (Skip)(Simplified)LayerNormalization.

Stage one (the statistics and the normalized value) runs in ``stash_type`` (1: float32) as the
specs say; ops without that attribute (com.microsoft ``Skip*``) use float32 too, as ORT's kernels
do. An optional input changes the body, so each combination of present optional inputs gets its
own function, picked by ``applies``. Where a function also returns optional outputs (the
``Skip*`` ops' ``input_skip_bias_sum``), a leaner one without them is registered first.
"""

from __future__ import annotations

from collections.abc import Callable

import onnx_ir as ir
from onnxscript import opset13 as op
from onnxscript import script

from onnxopt.targets.decompositions import register

MS = "com.microsoft"


def _inputs(
    present: tuple[int, ...] = (), absent: tuple[int, ...] = ()
) -> Callable[[ir.Node], str | None]:
    """``applies`` hook: the optional inputs at ``present`` are given, those at ``absent`` not."""

    def applies(node: ir.Node) -> str | None:
        given = [
            i < len(node.inputs) and node.inputs[i] is not None
            for i in range(max(present + absent) + 1)
        ]
        missing = [i for i in present if not given[i]]
        if missing:
            return f"optional input {missing[0]} is absent"
        extra = [i for i in absent if given[i]]
        return f"optional input {extra[0]} is present" if extra else None

    return applies


def _unused_output(index: int) -> Callable[[ir.Node], str | None]:
    """``applies`` hook: output ``index`` (one the function cannot compute) is unused."""

    def applies(node: ir.Node) -> str | None:
        if index < len(node.outputs):
            value = node.outputs[index]
            if value.uses() or value.is_graph_output():
                return f"output {index} ('{value.name}') is used"
        return None

    return applies


def _all(*hooks: Callable[[ir.Node], str | None]) -> Callable[[ir.Node], str | None]:
    def applies(node: ir.Node) -> str | None:
        return next((r for r in (hook(node) for hook in hooks) if r is not None), None)

    return applies


# --- Shared statistics ------------------------------------------------------------------------
# Helper functions (inlined with the caller). Each returns its intermediate values too, so that
# a caller picks what it needs without computing anything twice.


@script(default_opset=op)
def _trailing(X, axis: int, stash_type: int):
    """x = Cast(X, stash_type), the axes [axis, rank) and count, the elements over them."""
    shape = op.Shape(X)
    rank = op.Size(shape)
    axis_value = op.Constant(value_int=axis)
    start = op.Where(op.Less(axis_value, op.Constant(value_int=0)), axis_value + rank, axis_value)
    axes = op.Range(start, rank, op.Constant(value_int=1))
    x = op.Cast(X, to=stash_type)
    count = op.CastLike(op.ReduceProd(op.Gather(shape, axes), keepdims=0), x)
    return x, axes, count


@script(default_opset=op)
def _last_axis(s):
    """The axes [-1] and count, the elements over them."""
    axes = op.Constant(value_ints=[-1])
    count = op.CastLike(op.Gather(op.Shape(s), axes), s)
    return axes, count


@script(default_opset=op)
def _standardize(x, axes, count, epsilon: float):
    """(x - mean) / std, mean = E[x] and std = sqrt(E[(x - mean)^2] + epsilon) over axes."""
    mean = op.ReduceSum(x, axes, keepdims=1) / count
    centered = x - mean
    variance = op.ReduceSum(centered * centered, axes, keepdims=1) / count
    std = op.Sqrt(variance + op.CastLike(op.Constant(value_float=epsilon), x))
    return centered / std, mean, std


@script(default_opset=op)
def _rms_normalize(x, axes, count, epsilon: float):
    """x / rms, mean_square = E[x^2] and rms = sqrt(mean_square + epsilon) over axes."""
    mean_square = op.ReduceSum(x * x, axes, keepdims=1) / count
    rms = op.Sqrt(mean_square + op.CastLike(op.Constant(value_float=epsilon), x))
    return x / rms, mean_square, rms


@script(default_opset=op)
def _skip_sum(X, skip):
    """X + skip in float32."""
    return op.Cast(X, to=1) + op.Cast(skip, to=1)


@script(default_opset=op)
def _skip_standardize(s, gamma, epsilon: float):
    """(s - mean) / std * gamma over the last axis of float32 s, mean and std (_standardize)."""
    axes, count = _last_axis(s)
    normalized, mean, std = _standardize(s, axes, count, epsilon=epsilon)
    return normalized * op.Cast(gamma, to=1), mean, std


@script(default_opset=op)
def _skip_rms_normalize(s, gamma, epsilon: float):
    """s / rms * gamma over the last axis of float32 s, mean_square and rms (_rms_normalize)."""
    axes, count = _last_axis(s)
    normalized, mean_square, rms = _rms_normalize(s, axes, count, epsilon=epsilon)
    return normalized * op.Cast(gamma, to=1), mean_square, rms


# --- LayerNormalization-17 ------------------------------------------------------------------


@register("", "LayerNormalization", applies=_inputs(present=(2,)))
@script(default_opset=op)
def layer_normalization(X, Scale, B, axis: int = -1, epsilon: float = 1e-5, stash_type: int = 1):
    """(X - mean) / sqrt(var + epsilon) * Scale + B over the axes [axis, rank)."""
    x, axes, count = _trailing(X, axis=axis, stash_type=stash_type)
    normalized, _mean, _std = _standardize(x, axes, count, epsilon=epsilon)
    return op.CastLike(normalized, X) * Scale + B


@register("", "LayerNormalization", applies=_inputs(absent=(2,)))
@script(default_opset=op)
def layer_normalization_no_bias(
    X, Scale, B, axis: int = -1, epsilon: float = 1e-5, stash_type: int = 1
):
    """(X - mean) / sqrt(var + epsilon) * Scale over the axes [axis, rank) (no B)."""
    x, axes, count = _trailing(X, axis=axis, stash_type=stash_type)
    normalized, _mean, _std = _standardize(x, axes, count, epsilon=epsilon)
    return op.CastLike(normalized, X) * Scale


# --- GroupNormalization-18 / -21 -------------------------------------------------------------


@register("", "GroupNormalization", min_opset=18)
@script(default_opset=op)
def group_normalization(
    X, scale, bias, num_groups: int, epsilon: float = 1e-5, stash_type: int = 1
):
    """(x - mean) / sqrt(var + epsilon) * scale + bias, statistics per instance and group.

    X [N, C, ...] is viewed as [N, G, C/G, S]; mean and var are over the last two axes. scale
    and bias, viewed as [G, -1, 1], broadcast per group ([G], opset 18) or per channel ([C],
    opset 21) alike, so one function serves both versions. (Opset 18 has no stash_type; stage
    one then runs in float32, the default.)
    """
    shape = op.Shape(X)
    groups = op.Unsqueeze(op.Constant(value_int=num_groups), [0])
    per_group = op.Gather(shape, [1]) / groups  # C / G
    minus_one = op.Constant(value_ints=[-1])
    view = op.Concat(op.Gather(shape, [0]), groups, per_group, minus_one, axis=0)
    x = op.Cast(op.Reshape(X, view), to=stash_type)
    axes = op.Constant(value_ints=[2, 3])
    count = op.CastLike(op.ReduceProd(op.Gather(op.Shape(x), axes), keepdims=0), x)
    normalized, _mean, _std = _standardize(x, axes, count, epsilon=epsilon)
    affine = op.Concat(groups, op.Constant(value_ints=[-1, 1]), axis=0)
    y = op.CastLike(normalized, X) * op.Reshape(scale, affine) + op.Reshape(bias, affine)
    return op.Reshape(y, shape)


# --- RMSNormalization-23, SimplifiedLayerNormalization (ORT, default domain) ------------------


@register("", "RMSNormalization")
@register("", "SimplifiedLayerNormalization")
@script(default_opset=op)
def rms_normalization(X, scale, axis: int = -1, epsilon: float = 1e-5, stash_type: int = 1):
    """X / sqrt(mean(X^2) + epsilon) * scale, the mean over the axes [axis, rank)."""
    x, axes, count = _trailing(X, axis=axis, stash_type=stash_type)
    normalized, _mean_square, _rms = _rms_normalize(x, axes, count, epsilon=epsilon)
    return op.CastLike(normalized, X) * scale


# --- com.microsoft SkipLayerNormalization ----------------------------------------------------
# s = input + skip (+ bias), then LayerNormalization of s over the last axis with gamma (and
# beta), in float32 as ORT computes it. The 4-output forms, registered after the 1-output ones
# (used when input_skip_bias_sum is), also return mean and inv_std_var, float32 [..., 1].


@register(MS, "SkipLayerNormalization", applies=_inputs(present=(3, 4)))
@script(default_opset=op)
def skip_layer_normalization(X, skip, gamma, beta, bias, epsilon: float = 1e-12):
    """(s - mean) / sqrt(var + epsilon) * gamma + beta, s = X + skip + bias."""
    s = _skip_sum(X, skip) + op.Cast(bias, to=1)
    y, _mean, _std = _skip_standardize(s, gamma, epsilon=epsilon)
    return op.CastLike(y + op.Cast(beta, to=1), X)


@register(MS, "SkipLayerNormalization", applies=_inputs(present=(3,), absent=(4,)))
@script(default_opset=op)
def skip_layer_normalization_no_bias(X, skip, gamma, beta, bias, epsilon: float = 1e-12):
    """(s - mean) / sqrt(var + epsilon) * gamma + beta, s = X + skip."""
    s = _skip_sum(X, skip)
    y, _mean, _std = _skip_standardize(s, gamma, epsilon=epsilon)
    return op.CastLike(y + op.Cast(beta, to=1), X)


@register(MS, "SkipLayerNormalization", applies=_inputs(present=(4,), absent=(3,)))
@script(default_opset=op)
def skip_layer_normalization_no_beta(X, skip, gamma, beta, bias, epsilon: float = 1e-12):
    """(s - mean) / sqrt(var + epsilon) * gamma, s = X + skip + bias."""
    s = _skip_sum(X, skip) + op.Cast(bias, to=1)
    y, _mean, _std = _skip_standardize(s, gamma, epsilon=epsilon)
    return op.CastLike(y, X)


@register(MS, "SkipLayerNormalization", applies=_inputs(absent=(3, 4)))
@script(default_opset=op)
def skip_layer_normalization_no_beta_no_bias(X, skip, gamma, beta, bias, epsilon: float = 1e-12):
    """(s - mean) / sqrt(var + epsilon) * gamma, s = X + skip."""
    s = _skip_sum(X, skip)
    y, _mean, _std = _skip_standardize(s, gamma, epsilon=epsilon)
    return op.CastLike(y, X)


@register(MS, "SkipLayerNormalization", applies=_inputs(present=(3, 4)))
@script(default_opset=op)
def skip_layer_normalization_sum(X, skip, gamma, beta, bias, epsilon: float = 1e-12):
    """output (gamma + beta), mean, 1 / sqrt(var + epsilon) and s = X + skip + bias."""
    s = _skip_sum(X, skip) + op.Cast(bias, to=1)
    y, mean, std = _skip_standardize(s, gamma, epsilon=epsilon)
    output = op.CastLike(y + op.Cast(beta, to=1), X)
    return output, mean, op.Reciprocal(std), op.CastLike(s, X)


@register(MS, "SkipLayerNormalization", applies=_inputs(present=(3,), absent=(4,)))
@script(default_opset=op)
def skip_layer_normalization_no_bias_sum(X, skip, gamma, beta, bias, epsilon: float = 1e-12):
    """output (gamma + beta), mean, 1 / sqrt(var + epsilon) and s = X + skip."""
    s = _skip_sum(X, skip)
    y, mean, std = _skip_standardize(s, gamma, epsilon=epsilon)
    output = op.CastLike(y + op.Cast(beta, to=1), X)
    return output, mean, op.Reciprocal(std), op.CastLike(s, X)


@register(MS, "SkipLayerNormalization", applies=_inputs(present=(4,), absent=(3,)))
@script(default_opset=op)
def skip_layer_normalization_no_beta_sum(X, skip, gamma, beta, bias, epsilon: float = 1e-12):
    """output (gamma), mean, 1 / sqrt(var + epsilon) and s = X + skip + bias."""
    s = _skip_sum(X, skip) + op.Cast(bias, to=1)
    y, mean, std = _skip_standardize(s, gamma, epsilon=epsilon)
    return op.CastLike(y, X), mean, op.Reciprocal(std), op.CastLike(s, X)


@register(MS, "SkipLayerNormalization", applies=_inputs(absent=(3, 4)))
@script(default_opset=op)
def skip_layer_normalization_no_beta_no_bias_sum(
    X, skip, gamma, beta, bias, epsilon: float = 1e-12
):
    """output (gamma), mean, 1 / sqrt(var + epsilon) and s = X + skip."""
    s = _skip_sum(X, skip)
    y, mean, std = _skip_standardize(s, gamma, epsilon=epsilon)
    return op.CastLike(y, X), mean, op.Reciprocal(std), op.CastLike(s, X)


# --- com.microsoft SkipSimplifiedLayerNormalization ------------------------------------------
# s = input + skip (+ bias), then RMS normalization of s over the last axis, in float32 as in
# ORT. The 4-output forms return input_skip_bias_sum and inv_std_var; "mean" is not defined for
# an RMS norm, so they apply only where it is unused (the function puts mean(s^2) there).


@register(MS, "SkipSimplifiedLayerNormalization", applies=_inputs(present=(3,)))
@script(default_opset=op)
def skip_simplified_layer_normalization(X, skip, gamma, bias, epsilon: float = 1e-12):
    """s / sqrt(mean(s^2) + epsilon) * gamma, s = X + skip + bias."""
    s = _skip_sum(X, skip) + op.Cast(bias, to=1)
    y, _mean_square, _rms = _skip_rms_normalize(s, gamma, epsilon=epsilon)
    return op.CastLike(y, X)


@register(MS, "SkipSimplifiedLayerNormalization", applies=_inputs(absent=(3,)))
@script(default_opset=op)
def skip_simplified_layer_normalization_no_bias(X, skip, gamma, bias, epsilon: float = 1e-12):
    """s / sqrt(mean(s^2) + epsilon) * gamma, s = X + skip."""
    s = _skip_sum(X, skip)
    y, _mean_square, _rms = _skip_rms_normalize(s, gamma, epsilon=epsilon)
    return op.CastLike(y, X)


@register(
    MS,
    "SkipSimplifiedLayerNormalization",
    applies=_all(_inputs(present=(3,)), _unused_output(1)),
)
@script(default_opset=op)
def skip_simplified_layer_normalization_sum(X, skip, gamma, bias, epsilon: float = 1e-12):
    """output, (mean: unused), 1 / sqrt(mean(s^2) + epsilon) and s = X + skip + bias."""
    s = _skip_sum(X, skip) + op.Cast(bias, to=1)
    y, mean_square, rms = _skip_rms_normalize(s, gamma, epsilon=epsilon)
    return op.CastLike(y, X), mean_square, op.Reciprocal(rms), op.CastLike(s, X)


@register(
    MS,
    "SkipSimplifiedLayerNormalization",
    applies=_all(_inputs(absent=(3,)), _unused_output(1)),
)
@script(default_opset=op)
def skip_simplified_layer_normalization_no_bias_sum(X, skip, gamma, bias, epsilon: float = 1e-12):
    """output, (mean: unused), 1 / sqrt(mean(s^2) + epsilon) and s = X + skip."""
    s = _skip_sum(X, skip)
    y, mean_square, rms = _skip_rms_normalize(s, gamma, epsilon=epsilon)
    return op.CastLike(y, X), mean_square, op.Reciprocal(rms), op.CastLike(s, X)
