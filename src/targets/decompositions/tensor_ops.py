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


@script(default_opset=op)
def _reflect(x, table, axis: int):
    """Reflect-pad one axis: concat(x[b:0:-1], x, x[-2:-2-e:-1]), (b, e) = table[:, axis]."""
    where = op.Reshape(op.Constant(value_int=axis), op.Constant(value_ints=[1]))  # [axis]
    back = op.Constant(value_ints=[-1])
    two = op.Constant(value_ints=[-2])
    b = op.Gather(op.Gather(table, 0), where)
    e = op.Gather(op.Gather(table, 1), where)
    head = op.Slice(x, b, op.Constant(value_ints=[0]), where, back)
    tail = op.Slice(x, two, two - e, where, back)
    return op.Concat(head, x, tail, axis=axis)


@script(default_opset=op)
def _edge(x, table, axis: int):
    """Edge-pad one axis: concat(x[[0]*b], x, x[[-1]*e]), (b, e) = table[:, axis]."""
    zero = op.Constant(value_int=0)
    one = op.Constant(value_int=1)
    where = op.Constant(value_int=axis)
    b = op.Gather(op.Gather(table, 0), where)
    e = op.Gather(op.Gather(table, 1), where)
    head = op.Gather(x, op.Range(zero, b, one) * zero, axis=axis)
    tail = op.Gather(x, op.Range(zero, e, one) * zero - one, axis=axis)
    return op.Concat(head, x, tail, axis=axis)


@script(default_opset=op)
def _pad_table(pads):
    """The pads as [[begins], [ends]]."""
    return op.Reshape(pads, op.Constant(value_ints=[2, -1]))


@register("", "Pad", applies=_pad_applies("reflect", 1))
@script(default_opset=op)
def pad_reflect_1(data, pads, constant_value, axes):
    """Reflect-pad the last axis: concat(x[b:0:-1], x, x[-2:-2-e:-1])."""
    return _reflect(data, _pad_table(pads), axis=-1)


@register("", "Pad", applies=_pad_applies("reflect", 2))
@script(default_opset=op)
def pad_reflect_2(data, pads, constant_value, axes):
    """Reflect-pad the last two axes: concat(x[b:0:-1], x, x[-2:-2-e:-1]) on each."""
    table = _pad_table(pads)
    return _reflect(_reflect(data, table, axis=-1), table, axis=-2)


@register("", "Pad", applies=_pad_applies("reflect", 3))
@script(default_opset=op)
def pad_reflect_3(data, pads, constant_value, axes):
    """Reflect-pad the last three axes: concat(x[b:0:-1], x, x[-2:-2-e:-1]) on each."""
    table = _pad_table(pads)
    x = _reflect(_reflect(data, table, axis=-1), table, axis=-2)
    return _reflect(x, table, axis=-3)


@register("", "Pad", applies=_pad_applies("edge", 1))
@script(default_opset=op)
def pad_edge_1(data, pads, constant_value, axes):
    """Edge-pad the last axis: concat(x[[0]*b], x, x[[-1]*e])."""
    return _edge(data, _pad_table(pads), axis=-1)


@register("", "Pad", applies=_pad_applies("edge", 2))
@script(default_opset=op)
def pad_edge_2(data, pads, constant_value, axes):
    """Edge-pad the last two axes: concat(x[[0]*b], x, x[[-1]*e]) on each."""
    table = _pad_table(pads)
    return _edge(_edge(data, table, axis=-1), table, axis=-2)


@register("", "Pad", applies=_pad_applies("edge", 3))
@script(default_opset=op)
def pad_edge_3(data, pads, constant_value, axes):
    """Edge-pad the last three axes: concat(x[[0]*b], x, x[[-1]*e]) on each."""
    table = _pad_table(pads)
    return _edge(_edge(_edge(data, table, axis=-1), table, axis=-2), table, axis=-3)


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
