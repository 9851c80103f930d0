"""Tensor ops: Pad (reflect, edge) and Einsum (common two-operand equations).

Pad with constant ``pads`` and no ``axes`` input; one function per number of trailing padded
axes (1 to 3), the other pads 0. Per axis with pads ``(b, e)``:
reflect: ``concat(x[b:0:-1], x, x[-2:-2-e:-1])``; edge: ``concat(x[[0]*b], x, x[[-1]*e])``.

Einsum: the equation, with letters renamed by first appearance, picks a MatMul form.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import onnx_ir as ir
from onnxscript import opset13 as op
from onnxscript import script

from onnxopt.targets.decompositions import register


def _pad_applies(mode: str, axes: int) -> Callable[[ir.Node], str | None]:
    """Pad in ``mode`` whose constant, non-negative pads are 0 outside the last ``axes`` axes."""

    def check(node: ir.Node) -> str | None:
        if node.attributes.get_string("mode", "constant") != mode:
            return f"mode is not {mode}"
        if len(node.inputs) > 3 and node.inputs[3] is not None:
            return "the axes input is not supported"
        pads = node.inputs[1].const_value if len(node.inputs) > 1 and node.inputs[1] else None
        if pads is None:
            return "pads is not a constant"
        values = np.asarray(pads.numpy()).reshape(2, -1)
        if (values < 0).any():
            return "negative pads (cropping)"
        if values.shape[1] < axes or values[:, : values.shape[1] - axes].any():
            return f"pads other than on the last {axes} axes"
        return None

    return check


@register("", "Pad", applies=_pad_applies("reflect", 1))
@script()
def pad_reflect_1(data, pads, constant_value, axes):
    """Reflect-pad the last axis: concat(x[b:0:-1], x, x[-2:-2-e:-1])."""
    table = op.Reshape(pads, op.Constant(value_ints=[2, -1]))  # [[begins], [ends]]
    back = op.Constant(value_ints=[-1])
    two = op.Constant(value_ints=[-2])
    b1 = op.Gather(op.Gather(table, 0), op.Constant(value_ints=[-1]))
    e1 = op.Gather(op.Gather(table, 1), op.Constant(value_ints=[-1]))
    head = op.Slice(data, b1, op.Constant(value_ints=[0]), op.Constant(value_ints=[-1]), back)
    tail = op.Slice(data, two, two - e1, op.Constant(value_ints=[-1]), back)
    return op.Concat(head, data, tail, axis=-1)


@register("", "Pad", applies=_pad_applies("reflect", 2))
@script()
def pad_reflect_2(data, pads, constant_value, axes):
    """Reflect-pad the last two axes: concat(x[b:0:-1], x, x[-2:-2-e:-1]) on each."""
    table = op.Reshape(pads, op.Constant(value_ints=[2, -1]))
    back = op.Constant(value_ints=[-1])
    two = op.Constant(value_ints=[-2])
    zero = op.Constant(value_ints=[0])
    b1 = op.Gather(op.Gather(table, 0), op.Constant(value_ints=[-1]))
    e1 = op.Gather(op.Gather(table, 1), op.Constant(value_ints=[-1]))
    head = op.Slice(data, b1, zero, op.Constant(value_ints=[-1]), back)
    tail = op.Slice(data, two, two - e1, op.Constant(value_ints=[-1]), back)
    x = op.Concat(head, data, tail, axis=-1)
    b2 = op.Gather(op.Gather(table, 0), op.Constant(value_ints=[-2]))
    e2 = op.Gather(op.Gather(table, 1), op.Constant(value_ints=[-2]))
    head = op.Slice(x, b2, zero, op.Constant(value_ints=[-2]), back)
    tail = op.Slice(x, two, two - e2, op.Constant(value_ints=[-2]), back)
    return op.Concat(head, x, tail, axis=-2)


@register("", "Pad", applies=_pad_applies("reflect", 3))
@script()
def pad_reflect_3(data, pads, constant_value, axes):
    """Reflect-pad the last three axes: concat(x[b:0:-1], x, x[-2:-2-e:-1]) on each."""
    table = op.Reshape(pads, op.Constant(value_ints=[2, -1]))
    back = op.Constant(value_ints=[-1])
    two = op.Constant(value_ints=[-2])
    zero = op.Constant(value_ints=[0])
    b1 = op.Gather(op.Gather(table, 0), op.Constant(value_ints=[-1]))
    e1 = op.Gather(op.Gather(table, 1), op.Constant(value_ints=[-1]))
    head = op.Slice(data, b1, zero, op.Constant(value_ints=[-1]), back)
    tail = op.Slice(data, two, two - e1, op.Constant(value_ints=[-1]), back)
    x = op.Concat(head, data, tail, axis=-1)
    b2 = op.Gather(op.Gather(table, 0), op.Constant(value_ints=[-2]))
    e2 = op.Gather(op.Gather(table, 1), op.Constant(value_ints=[-2]))
    head = op.Slice(x, b2, zero, op.Constant(value_ints=[-2]), back)
    tail = op.Slice(x, two, two - e2, op.Constant(value_ints=[-2]), back)
    x = op.Concat(head, x, tail, axis=-2)
    b3 = op.Gather(op.Gather(table, 0), op.Constant(value_ints=[-3]))
    e3 = op.Gather(op.Gather(table, 1), op.Constant(value_ints=[-3]))
    head = op.Slice(x, b3, zero, op.Constant(value_ints=[-3]), back)
    tail = op.Slice(x, two, two - e3, op.Constant(value_ints=[-3]), back)
    return op.Concat(head, x, tail, axis=-3)


@register("", "Pad", applies=_pad_applies("edge", 1))
@script()
def pad_edge_1(data, pads, constant_value, axes):
    """Edge-pad the last axis: concat(x[[0]*b], x, x[[-1]*e])."""
    table = op.Reshape(pads, op.Constant(value_ints=[2, -1]))
    zero = op.Constant(value_int=0)
    one = op.Constant(value_int=1)
    b1 = op.Gather(op.Gather(table, 0), op.Constant(value_int=-1))
    e1 = op.Gather(op.Gather(table, 1), op.Constant(value_int=-1))
    head = op.Gather(data, op.Range(zero, b1, one) * zero, axis=-1)
    tail = op.Gather(data, op.Range(zero, e1, one) * zero - one, axis=-1)
    return op.Concat(head, data, tail, axis=-1)


@register("", "Pad", applies=_pad_applies("edge", 2))
@script()
def pad_edge_2(data, pads, constant_value, axes):
    """Edge-pad the last two axes: concat(x[[0]*b], x, x[[-1]*e]) on each."""
    table = op.Reshape(pads, op.Constant(value_ints=[2, -1]))
    zero = op.Constant(value_int=0)
    one = op.Constant(value_int=1)
    b1 = op.Gather(op.Gather(table, 0), op.Constant(value_int=-1))
    e1 = op.Gather(op.Gather(table, 1), op.Constant(value_int=-1))
    head = op.Gather(data, op.Range(zero, b1, one) * zero, axis=-1)
    tail = op.Gather(data, op.Range(zero, e1, one) * zero - one, axis=-1)
    x = op.Concat(head, data, tail, axis=-1)
    b2 = op.Gather(op.Gather(table, 0), op.Constant(value_int=-2))
    e2 = op.Gather(op.Gather(table, 1), op.Constant(value_int=-2))
    head = op.Gather(x, op.Range(zero, b2, one) * zero, axis=-2)
    tail = op.Gather(x, op.Range(zero, e2, one) * zero - one, axis=-2)
    return op.Concat(head, x, tail, axis=-2)


@register("", "Pad", applies=_pad_applies("edge", 3))
@script()
def pad_edge_3(data, pads, constant_value, axes):
    """Edge-pad the last three axes: concat(x[[0]*b], x, x[[-1]*e]) on each."""
    table = op.Reshape(pads, op.Constant(value_ints=[2, -1]))
    zero = op.Constant(value_int=0)
    one = op.Constant(value_int=1)
    b1 = op.Gather(op.Gather(table, 0), op.Constant(value_int=-1))
    e1 = op.Gather(op.Gather(table, 1), op.Constant(value_int=-1))
    head = op.Gather(data, op.Range(zero, b1, one) * zero, axis=-1)
    tail = op.Gather(data, op.Range(zero, e1, one) * zero - one, axis=-1)
    x = op.Concat(head, data, tail, axis=-1)
    b2 = op.Gather(op.Gather(table, 0), op.Constant(value_int=-2))
    e2 = op.Gather(op.Gather(table, 1), op.Constant(value_int=-2))
    head = op.Gather(x, op.Range(zero, b2, one) * zero, axis=-2)
    tail = op.Gather(x, op.Range(zero, e2, one) * zero - one, axis=-2)
    x = op.Concat(head, x, tail, axis=-2)
    b3 = op.Gather(op.Gather(table, 0), op.Constant(value_int=-3))
    e3 = op.Gather(op.Gather(table, 1), op.Constant(value_int=-3))
    head = op.Gather(x, op.Range(zero, b3, one) * zero, axis=-3)
    tail = op.Gather(x, op.Range(zero, e3, one) * zero - one, axis=-3)
    return op.Concat(head, x, tail, axis=-3)


def _canonical(equation: str) -> str:
    """The equation without spaces, letters renamed a, b, c… by first appearance."""
    names: dict[str, str] = {}
    out = []
    for char in equation.replace(" ", ""):
        if char.isalpha():
            char = names.setdefault(char, chr(ord("a") + len(names)))
        out.append(char)
    return "".join(out)


def _einsum_applies(*equations: str) -> Callable[[ir.Node], str | None]:
    def check(node: ir.Node) -> str | None:
        equation = _canonical(node.attributes.get_string("equation", ""))
        return None if equation in equations else f"equation {equation} is another form"

    return check


_MATMUL = ("ab,bc->ac", "abc,acd->abd", "abcd,abde->abce", "...ab,...bc->...ac")


@register("", "Einsum", applies=_einsum_applies(*_MATMUL))
@script()
def einsum_matmul(A, B):
    """'ij,jk->ik', 'bij,bjk->bik', 'bhqk,bhkd->bhqd', '...ij,...jk->...ik': A @ B."""
    return op.MatMul(A, B)


@register("", "Einsum", applies=_einsum_applies("ab,cb->ac"))
@script()
def einsum_matmul_transposed_2d(A, B):
    """'ij,kj->ik': A @ B^T."""
    return op.MatMul(A, op.Transpose(B, perm=[1, 0]))


@register("", "Einsum", applies=_einsum_applies("abc,adc->abd"))
@script()
def einsum_matmul_transposed_3d(A, B):
    """'bij,bkj->bik': A @ B^T."""
    return op.MatMul(A, op.Transpose(B, perm=[0, 2, 1]))


@register("", "Einsum", applies=_einsum_applies("abcd,abed->abce"))
@script()
def einsum_matmul_transposed_4d(A, B):
    """'bhqd,bhkd->bhqk': A @ B^T."""
    return op.MatMul(A, op.Transpose(B, perm=[0, 1, 3, 2]))


@register("", "Einsum", applies=_einsum_applies("a,b->ab"))
@script()
def einsum_outer(A, B):
    """'i,j->ij': A[:, None] * B[None, :]."""
    return op.Unsqueeze(A, op.Constant(value_ints=[1])) * op.Unsqueeze(
        B, op.Constant(value_ints=[0])
    )


@register("", "Einsum", applies=_einsum_applies("a,a->"))
@script()
def einsum_dot(A, B):
    """'i,i->': sum(A * B)."""
    return op.ReduceSum(A * B, op.Constant(value_ints=[0]), keepdims=0)
