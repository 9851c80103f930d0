"""Fuse GELU in its erf, tanh and sigmoid (QuickGelu) forms, with a preceding bias."""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Literal

import onnx_ir as ir
from onnxscript.rewriter import pattern

from onnxopt.fusion import Fusion, FusionPass
from onnxopt.passes.fuse_bias import MS, BiasIntoFastGelu, BiasIntoGelu, constant
from onnxopt.registry import register_pass
from onnxopt.targets import Target

SQRT_HALF = math.sqrt(0.5)  # erf(x / sqrt(2)) = erf(SQRT_HALF * x)
SQRT_2_OVER_PI = math.sqrt(2.0 / math.pi)
CUBIC = 0.044715
# How far a constant may be from its exact value, relative: 1e-4 for float, one unit in the last
# place for the 16-bit floats (their nearest value to sqrt(2) is 1.4140625). The types are the
# ones the fused ops run in: ORT has no double kernel for Gelu, FastGelu or BiasGelu.
REL_TOL = {
    ir.DataType.FLOAT: 1e-4,
    ir.DataType.FLOAT16: 2.0**-10,
    ir.DataType.BFLOAT16: 2.0**-8,
}
Half = Literal["last", "inner", "first"]
Poly = dict[int, float]  # degree in x -> coefficient


@dataclasses.dataclass(frozen=True)
class _Op:
    """The op a fused GELU becomes."""

    domain: str
    op_type: str
    attributes: dict[str, Any] = dataclasses.field(default_factory=dict)

    def make(self, op, x: ir.Value, **attributes: Any) -> ir.Value:
        return getattr(op, self.op_type)(x, _domain=self.domain, **self.attributes, **attributes)


class _NotPolynomial(Exception):
    """An argument is not a polynomial of x with scalar constants; the message says why."""


class _Polynomial:
    """Reads an elementwise expression of ``x`` and scalar constants as a polynomial in x.

    Walks from a value to ``x`` through Add, Sub, Mul, Neg, Div by a constant and Pow by 1 to 3,
    so every placement of the constants (either side of Add and Mul, folded or not) gives the same
    coefficients. The nodes it walked through are in ``nodes``, consumers first.
    """

    MAX_DEGREE = 3
    MAX_NODES = 12

    def __init__(self, x: ir.Value, dtype: ir.DataType) -> None:
        self.x, self.dtype = x, dtype
        self.nodes: list[ir.Node] = []

    def of(self, value: ir.Value) -> Poly:
        if value is self.x:
            return {1: 1.0}
        if constant(value) is not None:
            return {0: self.scalar(value)}
        node = value.producer()
        ops = ("Add", "Sub", "Mul", "Div", "Neg", "Pow")
        if node is None or node.domain not in ("", "ai.onnx") or node.op_type not in ops:
            source = "a graph input" if node is None else f"a {node.op_type}"
            raise _NotPolynomial(f"'{value.name}' comes from {source}, not from x")
        if len(self.nodes) == self.MAX_NODES:
            raise _NotPolynomial(f"it takes more than {self.MAX_NODES} nodes")
        self.nodes.append(node)
        a, b = node.inputs[0], node.inputs[1] if len(node.inputs) > 1 else None
        if node.op_type == "Neg":
            return _scale(self.of(a), -1.0)
        if node.op_type == "Pow":
            return self._power(self.of(a), b)
        p, q = self.of(a), self.of(b)
        if node.op_type == "Add":
            return _add(p, q)
        if node.op_type == "Sub":
            return _add(p, _scale(q, -1.0))
        if node.op_type == "Mul":
            return self._trim(_mul(p, q))
        if set(q) != {0} or q[0] == 0:
            raise _NotPolynomial(f"'{node.name}' divides by '{b.name}', not by a constant")
        return _scale(p, 1.0 / q[0])

    def scalar(self, value: ir.Value) -> float:
        """The constant's value, if it is a scalar that cannot raise the rank of x."""
        tensor = constant(value)
        shape = list(tensor.shape)
        rank = None if self.x.shape is None else len(self.x.shape)
        if math.prod(shape) != 1:
            raise _NotPolynomial(f"the constant '{value.name}' has shape {shape}, not a scalar")
        if shape and (rank is None or len(shape) > rank):
            raise _NotPolynomial(f"the constant '{value.name}' of shape {shape} may raise the rank")
        return float(tensor.numpy().reshape(()))

    def _power(self, p: Poly, exponent: ir.Value | None) -> Poly:
        tensor = constant(exponent)
        n = None
        if tensor is not None and math.prod(tensor.shape) == 1:
            n = float(tensor.numpy().reshape(()))
        if n not in (1.0, 2.0, 3.0):
            raise _NotPolynomial(f"the exponent '{exponent.name}' is not a constant 1, 2 or 3")
        result = {0: 1.0}
        for _ in range(int(n)):
            result = self._trim(_mul(result, p))
        return result

    def _trim(self, p: Poly) -> Poly:
        if max(p, default=0) > self.MAX_DEGREE:
            raise _NotPolynomial(f"its degree is above {self.MAX_DEGREE}")
        return p


def _add(p: Poly, q: Poly) -> Poly:
    out = dict(p)
    for d, c in q.items():
        out[d] = out.get(d, 0.0) + c
    return {d: c for d, c in out.items() if c != 0.0}


def _scale(p: Poly, k: float) -> Poly:
    return {d: c * k for d, c in p.items() if c * k != 0.0}


def _mul(p: Poly, q: Poly) -> Poly:
    out: Poly = {}
    for d1, c1 in p.items():
        for d2, c2 in q.items():
            out[d1 + d2] = out.get(d1 + d2, 0.0) + c1 * c2
    return {d: c for d, c in out.items() if c != 0.0}


def _show(p: Poly) -> str:
    """A polynomial as text: ``0.797885*x + 0.0356774*x^3``."""
    power = {0: "", 1: "*x"}
    terms = [f"{c:.6g}{power.get(d, f'*x^{d}')}" for d, c in sorted(p.items())]
    return " + ".join(terms) or "0"


def _close(found: float, expected: float, dtype: ir.DataType) -> bool:
    return abs(found - expected) <= REL_TOL[dtype] * abs(expected)


def _erf_mismatch(p: Poly, dtype: ir.DataType) -> str | None:
    """Why the erf argument is not x / sqrt(2) (None when it is)."""
    if set(p) != {1}:
        return f"the erf argument is {_show(p)}, not x / sqrt(2)"
    if not _close(p[1], SQRT_HALF, dtype):
        found = f"{_show(p)} = x / {1 / p[1]:.6g}"
        return f"the erf argument is {found}, not x / sqrt(2) = x / {1 / SQRT_HALF:.6g}"
    return None


def _tanh_mismatch(p: Poly, dtype: ir.DataType) -> str | None:
    """Why the tanh argument is not sqrt(2/pi) * (x + 0.044715 * x^3) (None when it is)."""
    if set(p) != {1, 3}:
        return f"the tanh argument is {_show(p)}, not sqrt(2/pi) * (x + 0.044715 * x^3)"
    k, c = p[1], p[3] / p[1]
    if not _close(k, SQRT_2_OVER_PI, dtype):
        return f"the tanh argument's factor is {k:.6g}, not sqrt(2/pi) = {SQRT_2_OVER_PI:.6g}"
    if not _close(c, CUBIC, dtype):
        return f"the tanh argument's x^3 coefficient is {c:.6g} (over the x term's), not {CUBIC}"
    return None


def _float_type(x: ir.Value, fallback: ir.Value | None) -> ir.DataType | None:
    dtype = x.dtype
    if dtype is None and fallback is not None and constant(fallback) is not None:
        dtype = constant(fallback).dtype
    return dtype if dtype in REL_TOL else None


def _scalar_mismatch(value: ir.Value, expected: float, role: str, p: _Polynomial) -> str | None:
    """Why ``value`` is not the scalar constant ``expected`` (None when it is)."""
    if constant(value) is None:
        return f"{role} '{value.name}' is not a constant"
    try:
        found = p.scalar(value)
    except _NotPolynomial as err:
        return f"{role}: {err}"
    if not _close(found, expected, p.dtype):
        return f"{role} is {found:.6g}, not {expected}"
    return None


def _used_outside(nodes: list[ir.Node], consumer: ir.Node) -> ir.Value | None:
    """A value of ``nodes`` that something besides them and ``consumer`` reads, if any."""
    inside = {*nodes, consumer}
    for node in nodes:
        for value in node.outputs:
            if value.is_graph_output() or any(user not in inside for user, _ in value.uses()):
                return value
    return None


class _Activation(pattern.RewriteRuleClassBase):
    """Common part of the rules: read ``fn``'s argument as a polynomial in x, drop its nodes."""

    fn = ""

    def __init__(self, name: str, *, emit: _Op) -> None:
        super().__init__(name)
        self.emit = emit
        self._orphans: list[ir.Node] = []

    def argument(
        self, x: ir.Value, arg: ir.Value, dtype: ir.DataType, fn_out: ir.Value
    ) -> Poly | str:
        """The argument as a polynomial in x, or the reason it cannot be fused into."""
        walk = _Polynomial(x, dtype)
        try:
            poly = walk.of(arg)
        except _NotPolynomial as err:
            return f"the {self.fn.lower()} argument is not a polynomial of x: {err}"
        if shared := _used_outside(walk.nodes, fn_out.producer()):
            return f"'{shared.name}' in the {self.fn.lower()} argument has other uses"
        return poly

    def drop_argument(self, x: ir.Value, arg: ir.Value, *constants: ir.Value) -> None:
        """Mark the argument's nodes, and Constant nodes the rewrite stops reading, for removal."""
        walk = _Polynomial(x, ir.DataType.FLOAT)
        walk.of(arg)
        self._orphans += walk.nodes
        self._orphans += [v.producer() for v in constants if v.producer() is not None]

    def cleanup(self) -> None:
        """Remove the marked nodes once unused (the pattern did not hold them), consumers first."""
        pending = list(dict.fromkeys(self._orphans))
        self._orphans.clear()
        progress = True
        while progress:
            progress = False
            for node in list(pending):
                if any(v.uses() or v.is_graph_output() for v in node.outputs):
                    continue
                pending.remove(node)
                if node.graph is None:
                    continue
                feeds = [v.producer() for v in node.inputs if v is not None and v.producer()]
                node.graph.remove(node, safe=True)
                pending += [n for n in feeds if n.op_type == "Constant" and n not in pending]
                progress = True


class GeluShell(_Activation):
    """0.5 * x * (1 + erf(x / sqrt(2))) or the tanh form -> one GELU op.

    ``half`` says where the 0.5 multiply sits: ``last`` (x * (1 + f)) * 0.5, ``inner``
    x * (0.5 * (1 + f)) or ``first`` (x * 0.5) * (1 + f); the constants may be on either side
    (the fusion commutes). The argument of erf or tanh is read as a polynomial in x.
    """

    def __init__(self, name: str, *, fn: Literal["Erf", "Tanh"], half: Half, emit: _Op) -> None:
        super().__init__(name, emit=emit)
        self.fn, self.half = fn, half

    def pattern(self, op, x, arg, one, half):
        term = op.Add(getattr(op, self.fn)(arg, _outputs=["fn_out"]), one)  # 1 + f(arg)
        if self.half == "last":
            return op.Mul(op.Mul(x, term), half)  # (x * (1 + f)) * 0.5
        if self.half == "inner":
            return op.Mul(x, op.Mul(half, term))  # x * (0.5 * (1 + f))
        return op.Mul(op.Mul(x, half), term)  # (x * 0.5) * (1 + f)

    def check(self, context, x, arg, one, half, fn_out, **_) -> pattern.MatchResult:
        result = pattern.MatchResult()
        dtype = _float_type(x, half)
        if dtype is None:
            return result.fail(f"x '{x.name}' is {x.dtype}, not float, float16 or bfloat16", x)
        probe = _Polynomial(x, dtype)
        for value, expected, role in ((half, 0.5, "the 0.5 factor"), (one, 1.0, "the 1 added")):
            if reason := _scalar_mismatch(value, expected, role, probe):
                return result.fail(reason, value)
        poly = self.argument(x, arg, dtype, fn_out)
        if isinstance(poly, str):
            return result.fail(poly, arg)
        mismatch = _erf_mismatch if self.fn == "Erf" else _tanh_mismatch
        if reason := mismatch(poly, dtype):
            return result.fail(reason, arg)
        return result

    def rewrite(self, op, x, arg, one, half, **_):
        self.drop_argument(x, arg, one, half)
        return self.emit.make(op, x)


class SigmoidShell(_Activation):
    """x * sigmoid(alpha * x) -> QuickGelu(alpha) or Swish(alpha); SiLU is alpha = 1."""

    fn = "Sigmoid"

    def __init__(self, name: str, *, silu: bool, emit: _Op) -> None:
        super().__init__(name, emit=emit)
        self.silu = silu

    def pattern(self, op, x, arg):
        return op.Mul(x, op.Sigmoid(arg, _outputs=["fn_out"]))

    def check(self, context, x, arg, fn_out, **_) -> pattern.MatchResult:
        result = pattern.MatchResult()
        dtype = _float_type(x, None)
        if dtype is None and x.dtype is not None:
            return result.fail(f"x '{x.name}' is {x.dtype}, not float, float16 or bfloat16", x)
        poly = self.argument(x, arg, dtype or ir.DataType.FLOAT, fn_out)
        if isinstance(poly, str):
            return result.fail(poly, arg)
        if set(poly) != {1}:
            return result.fail(f"the sigmoid argument is {_show(poly)}, not alpha * x", arg)
        if self.silu and poly[1] != 1.0:
            return result.fail(f"alpha is {poly[1]:.6g}, not 1 (that is QuickGelu)", arg)
        if not self.silu and poly[1] == 1.0:
            return result.fail("alpha is 1: that is SiLU, fused as 'silu'", arg)
        return result

    def rewrite(self, op, x, arg, **_):
        self.drop_argument(x, arg)
        alpha = _Polynomial(x, ir.DataType.FLOAT).of(arg)[1]
        return self.emit.make(op, x, alpha=float(alpha))


def _gelu_rules(fn: Literal["Erf", "Tanh"], emit: _Op) -> list[pattern.RewriteRule]:
    halves: tuple[Half, ...] = ("last", "inner", "first")
    return [GeluShell.rule(f"{fn.lower()}-{h}", fn=fn, half=h, emit=emit) for h in halves]


@register_pass
class FuseGeluPass(FusionPass):
    """Fuse GELU in its erf, tanh and sigmoid (QuickGelu) forms, with a preceding bias.

    Every form may put its constants on either side of Add and Mul; the argument of erf, tanh or
    sigmoid is read as a polynomial in x (Div or Mul, Pow(x, 3) or x * x * x, constants folded or
    not) and its coefficients must match within ``REL_TOL``. Where the model's opset has the
    standard op (Gelu-20, Swish-24) and the target runs it, it is preferred: on ORT CPU Gelu-20
    runs as fast as com.microsoft::Gelu, and Gelu-20(tanh) as FastGelu. Rules, in order:
      1. ``gelu-erf``: ``0.5 * x * (1 + erf(x / sqrt(2)))`` (0.5 first, last or with the erf
         term) -> ``Gelu`` (opset >= 20) or ``com.microsoft::Gelu``.
      2. ``gelu-tanh``: ``0.5 * x * (1 + tanh(sqrt(2/pi) * (x + 0.044715 * x^3)))`` ->
         ``Gelu(approximate="tanh")`` (opset >= 20) or ``com.microsoft::FastGelu``. The same
         formula only: other tanh approximations are left alone.
      3. ``quick-gelu``: ``x * sigmoid(alpha * x)``, alpha not 1 -> ``Swish(alpha)`` (opset >= 24)
         or ``com.microsoft::QuickGelu(alpha)``.
      4. ``silu``: ``x * sigmoid(x)`` -> ``Swish`` (opset >= 24) or ``com.microsoft::QuickGelu``
         with alpha 1, which ORT itself fuses SiLU into at load time (about 2x faster than
         Sigmoid + Mul on ORT CPU).
      5. ``bias-gelu``: ``Gelu(MatMul(x, W) + b)``, exact form, b a 1-D constant with one element
         per column -> ``com.microsoft::BiasGelu(MatMul(x, W), b)``; standard targets keep the Add.
      6. ``bias-fast-gelu``: ``FastGelu`` or ``Gelu(tanh)`` of ``MatMul(x, W) + b`` ->
         ``com.microsoft::FastGelu(MatMul(x, W), b)``.
    """

    name = "fuse-gelu"

    def fusions(self, target: Target) -> list[Fusion]:
        std_gelu, std_tanh = _Op("", "Gelu"), _Op("", "Gelu", {"approximate": "tanh"})
        swish, quick = _Op("", "Swish"), _Op(MS, "QuickGelu")
        return [
            Fusion("gelu-erf", _gelu_rules("Erf", std_gelu), [("", "Gelu")], True, ["Erf"]),
            Fusion("gelu-erf", _gelu_rules("Erf", _Op(MS, "Gelu")), [(MS, "Gelu")], True, ["Erf"]),
            Fusion("gelu-tanh", _gelu_rules("Tanh", std_tanh), [("", "Gelu")], True, ["Tanh"]),
            Fusion(
                "gelu-tanh",
                _gelu_rules("Tanh", _Op(MS, "FastGelu")),
                [(MS, "FastGelu")],
                commute=True,
                anchors=["Tanh"],
            ),
            *[
                Fusion(
                    name,
                    [SigmoidShell.rule(name, silu=silu, emit=emit)],
                    creates,
                    commute=True,
                    anchors=["Sigmoid"],
                )
                for name, silu in (("quick-gelu", False), ("silu", True))
                for emit, creates in ((swish, [("", "Swish")]), (quick, [(MS, "QuickGelu")]))
            ],
            Fusion(
                "bias-gelu",
                [BiasIntoGelu.rule("gelu", domain=""), BiasIntoGelu.rule("ms-gelu", domain=MS)],
                [(MS, "BiasGelu")],
                commute=True,
                anchors=["Gelu"],
            ),
            Fusion(
                "bias-fast-gelu",
                [
                    BiasIntoFastGelu.rule("fast-gelu", source="FastGelu"),
                    BiasIntoFastGelu.rule("gelu-tanh", source="Gelu"),
                ],
                [(MS, "FastGelu")],
                commute=True,
                anchors=["FastGelu", "Gelu"],
            ),
        ]
