"""Activations: Gelu-20 (erf and tanh forms); com.microsoft Gelu, BiasGelu, FastGelu, QuickGelu.

Elementwise, computed in the input's type (as the ops' ONNX/ORT function bodies do). Constants:
1/sqrt(2) = 0.7071067811865476, sqrt(2/pi) = 0.7978845608028654.
"""

from __future__ import annotations

from collections.abc import Callable

import onnx_ir as ir
from onnxscript import opset13 as op
from onnxscript import script

from onnxopt.targets.decompositions import register

MS = "com.microsoft"


def _approximate(expected: str) -> Callable[[ir.Node], str | None]:
    """``applies`` hook: Gelu's ``approximate`` attribute (default "none") is ``expected``."""

    def applies(node: ir.Node) -> str | None:
        attr = node.attributes.get("approximate")
        value = "none" if attr is None else attr.value
        return None if value == expected else f"approximate is '{value}'"

    return applies


def _bias(present: bool) -> Callable[[ir.Node], str | None]:
    """``applies`` hook: the optional input 1 (bias) is given (``present``) or absent."""

    def applies(node: ir.Node) -> str | None:
        given = len(node.inputs) > 1 and node.inputs[1] is not None
        if given == present:
            return None
        return "bias is absent" if present else "bias is present"

    return applies


@register("", "Gelu", applies=_approximate("none"))
@register(MS, "Gelu")
@script()
def gelu(X):
    """0.5 * X * (1 + erf(X / sqrt(2)))."""
    return 0.5 * X * (1.0 + op.Erf(X * 0.7071067811865476))


@register("", "Gelu", applies=_approximate("tanh"))
@script()
def gelu_tanh(X):
    """0.5 * X * (1 + tanh(sqrt(2/pi) * (X + 0.044715 * X^3)))."""
    inner = X * (0.7978845608028654 + 0.035677408136300125 * X * X)
    return 0.5 * X * (1.0 + op.Tanh(inner))


@register(MS, "BiasGelu")
@script()
def bias_gelu(A, B):
    """Gelu(A + B) = 0.5 * x * (1 + erf(x / sqrt(2))), x = A + B."""
    x = A + B
    return 0.5 * x * (1.0 + op.Erf(x * 0.7071067811865476))


@register(MS, "FastGelu", applies=_bias(True))
@script()
def fast_gelu(X, bias):
    """0.5 * x * (1 + tanh(sqrt(2/pi) * (x + 0.044715 * x^3))), x = X + bias."""
    x = X + bias
    inner = x * (0.7978845608028654 + 0.035677408136300125 * x * x)
    return 0.5 * x * (1.0 + op.Tanh(inner))


@register(MS, "FastGelu", applies=_bias(False))
@script()
def fast_gelu_no_bias(X, bias):
    """0.5 * X * (1 + tanh(sqrt(2/pi) * (X + 0.044715 * X^3))) (bias absent)."""
    inner = X * (0.7978845608028654 + 0.035677408136300125 * X * X)
    return 0.5 * X * (1.0 + op.Tanh(inner))


@register(MS, "QuickGelu")
@script()
def quick_gelu(X, alpha: float = 1.702):
    """X * sigmoid(alpha * X)."""
    return X * op.Sigmoid(op.CastLike(op.Constant(value_float=alpha), X) * X)
