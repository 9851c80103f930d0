"""Quantized ops: com.microsoft MatMulNBits.

MatMulNBits: ``Y = A @ W^T (+ bias)`` with ``W[n, k] = (q[n, k] - zp[n, k // block_size]) *
scale[n, k // block_size]``. ``B`` holds the ``bits``-wide codes ``q`` packed low bits first,
``[N, k_blocks, block_size * bits / 8]`` uint8; zero points are packed the same way
(``[N, ceil(k_blocks * bits / 8)]`` uint8), unpacked in A's type, or absent
(``2^(bits - 1)``). A code is ``(x >> s) - ((x >> s + bits) << bits)`` with ``s`` a multiple
of ``bits``: BitShift-11 on uint8, no BitwiseAnd (opset 18). The weight subgraph depends on
constants only, so constant folding turns it into a float ``[K, N]`` MatMul weight.
"""

from __future__ import annotations

from collections.abc import Callable

import onnx_ir as ir
from onnxscript import opset13 as op
from onnxscript import script

from onnxopt.targets.decompositions import register

_UINT8 = 2  # TensorProto.UINT8
_ZP = 3  # input index of zero_points
_G_IDX = 4
_BIAS = 5


def _present(node: ir.Node, index: int) -> bool:
    return len(node.inputs) > index and node.inputs[index] is not None


def _applies(zero_points: str, bias: bool) -> Callable[[ir.Node], str | None]:
    """Checks one input pattern: zero_points "none" / "packed" (uint8) / "float"; bias or not."""

    def check(node: ir.Node) -> str | None:
        if node.attributes.get_int("weight_prepacked", 0) != 0:
            return "B is prepacked in an EP-specific layout"
        if node.attributes.get_int("bits", 4) not in (2, 4, 8):
            return "bits must be 2, 4 or 8"
        if _present(node, _G_IDX):
            return "g_idx is not supported"
        if _present(node, _BIAS) != bias:
            return "bias " + ("missing" if bias else "present")
        if not _present(node, _ZP):
            return None if zero_points == "none" else "zero_points missing"
        dtype = node.inputs[_ZP].dtype
        if dtype is None:
            return "zero_points has no known type"
        kind = "packed" if dtype == ir.DataType.UINT8 else "float"
        return None if kind == zero_points else f"zero_points are {kind}"

    return check


@script(default_opset=op)
def _codes(packed, like, bits: int):
    """The ``bits``-wide codes of uint8 ``packed``, low bits first, in like's type.

    ``[..., bytes] -> [..., bytes, 8 / bits]``, each ``(x >> s) - ((x >> s + bits) << bits)``.
    """
    nbits = op.Constant(value_int=bits)
    shifts = op.Cast(op.Range(op.Constant(value_int=0), op.Constant(value_int=8), nbits), to=2)
    shifted = op.BitShift(
        op.Unsqueeze(packed, op.Constant(value_ints=[-1])), shifts, direction="RIGHT"
    )
    high = op.BitShift(shifted, op.Cast(nbits, to=2), direction="RIGHT")
    levels = op.CastLike(op.Pow(op.Constant(value_int=2), nbits), like)
    return op.CastLike(shifted, like) - op.CastLike(high, like) * levels


@script(default_opset=op)
def _block_shape(B):
    """[N, k_blocks, 1], the shape of one scale or zero point per block."""
    blocks = op.Slice(op.Shape(B), op.Constant(value_ints=[0]), op.Constant(value_ints=[2]))
    return op.Concat(blocks, op.Constant(value_ints=[1]), axis=0)


@script(default_opset=op)
def _default_zp(like, bits: int):
    """2^(bits - 1), in like's type."""
    nbits = op.Constant(value_int=bits)
    return op.CastLike(op.Pow(op.Constant(value_int=2), nbits - op.Constant(value_int=1)), like)


@script(default_opset=op)
def _packed_zp(zero_points, B, like, bits: int):
    """Zero points unpacked from uint8 like q: [N, zp_bytes] -> [N, k_blocks, 1]."""
    shape_b = op.Shape(B)
    rows = op.Slice(shape_b, op.Constant(value_ints=[0]), op.Constant(value_ints=[1]))
    n_blocks = op.Slice(shape_b, op.Constant(value_ints=[1]), op.Constant(value_ints=[2]))
    last = op.Constant(value_ints=[-1])
    zp_bytes = op.Reshape(zero_points, op.Concat(rows, last, axis=0))  # [N, zp_bytes]
    zp_flat = op.Reshape(_codes(zp_bytes, like, bits=bits), op.Constant(value_ints=[0, -1]))
    zp_flat = op.Slice(zp_flat, op.Constant(value_ints=[0]), n_blocks, op.Constant(value_ints=[1]))
    return op.Unsqueeze(zp_flat, last)


@script(default_opset=op)
def _weight(B, scales, zp, like, K: int, bits: int):
    """W^T, [K, N]: W[n, k] = (q[n, k] - zp[n, k // block_size]) * scale[n, k // block_size].

    ``zp`` broadcasts to ``[N, k_blocks, 1]``; the padding past K in the last block is dropped.
    """
    q = op.Reshape(_codes(B, like, bits=bits), op.Constant(value_ints=[0, 0, -1]))
    scale = op.Reshape(scales, _block_shape(B))  # q: [N, k_blocks, block_size]
    weight = op.Reshape((q - zp) * scale, op.Constant(value_ints=[0, -1]))
    k = op.Unsqueeze(op.Constant(value_int=K), op.Constant(value_ints=[0]))
    weight = op.Slice(weight, op.Constant(value_ints=[0]), k, op.Constant(value_ints=[1]))
    return op.Transpose(weight, perm=[1, 0])


@register("com.microsoft", "MatMulNBits", applies=_applies("none", bias=False))
@script(default_opset=op)
def matmul_nbits(
    A, B, scales, zero_points, g_idx, bias, K: int, N: int, block_size: int, bits: int = 4
):
    """A @ ((q - 2^(bits-1)) * scale)^T."""
    zp = _default_zp(A, bits=bits)
    return op.MatMul(A, _weight(B, scales, zp, A, K=K, bits=bits))


@register("com.microsoft", "MatMulNBits", applies=_applies("none", bias=True))
@script(default_opset=op)
def matmul_nbits_bias(
    A, B, scales, zero_points, g_idx, bias, K: int, N: int, block_size: int, bits: int = 4
):
    """A @ ((q - 2^(bits-1)) * scale)^T + bias."""
    zp = _default_zp(A, bits=bits)
    return op.MatMul(A, _weight(B, scales, zp, A, K=K, bits=bits)) + bias


@register("com.microsoft", "MatMulNBits", applies=_applies("float", bias=False))
@script(default_opset=op)
def matmul_nbits_float_zp(
    A, B, scales, zero_points, g_idx, bias, K: int, N: int, block_size: int, bits: int = 4
):
    """A @ ((q - zero_points) * scale)^T, zero points in A's type."""
    zp = op.Reshape(zero_points, _block_shape(B))
    return op.MatMul(A, _weight(B, scales, zp, A, K=K, bits=bits))


@register("com.microsoft", "MatMulNBits", applies=_applies("float", bias=True))
@script(default_opset=op)
def matmul_nbits_float_zp_bias(
    A, B, scales, zero_points, g_idx, bias, K: int, N: int, block_size: int, bits: int = 4
):
    """A @ ((q - zero_points) * scale)^T + bias, zero points in A's type."""
    zp = op.Reshape(zero_points, _block_shape(B))
    return op.MatMul(A, _weight(B, scales, zp, A, K=K, bits=bits)) + bias


@register("com.microsoft", "MatMulNBits", applies=_applies("packed", bias=False))
@script(default_opset=op)
def matmul_nbits_packed_zp(
    A, B, scales, zero_points, g_idx, bias, K: int, N: int, block_size: int, bits: int = 4
):
    """A @ ((q - zp) * scale)^T, zp unpacked from uint8 like q."""
    zp = _packed_zp(zero_points, B, A, bits=bits)
    return op.MatMul(A, _weight(B, scales, zp, A, K=K, bits=bits))


@register("com.microsoft", "MatMulNBits", applies=_applies("packed", bias=True))
@script(default_opset=op)
def matmul_nbits_packed_zp_bias(
    A, B, scales, zero_points, g_idx, bias, K: int, N: int, block_size: int, bits: int = 4
):
    """A @ ((q - zp) * scale)^T + bias, zp unpacked from uint8 like q."""
    zp = _packed_zp(zero_points, B, A, bits=bits)
    return op.MatMul(A, _weight(B, scales, zp, A, K=K, bits=bits)) + bias
