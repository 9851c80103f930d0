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


@register("com.microsoft", "MatMulNBits", applies=_applies("none", bias=False))
@script()
def matmul_nbits(
    A, B, scales, zero_points, g_idx, bias, K: int, N: int, block_size: int, bits: int = 4
):
    """A @ ((q - 2^(bits-1)) * scale)^T."""
    nbits = op.Constant(value_int=bits)
    shifts = op.Cast(op.Range(op.Constant(value_int=0), op.Constant(value_int=8), nbits), to=2)
    shifted = op.BitShift(op.Unsqueeze(B, op.Constant(value_ints=[-1])), shifts, direction="RIGHT")
    high = op.BitShift(shifted, op.Cast(nbits, to=2), direction="RIGHT")
    levels = op.CastLike(op.Pow(op.Constant(value_int=2), nbits), A)
    codes = op.CastLike(shifted, A) - op.CastLike(high, A) * levels  # [N, k_blocks, blob, 8/bits]
    q = op.Reshape(codes, op.Constant(value_ints=[0, 0, -1]))  # [N, k_blocks, block_size]
    blocks = op.Slice(op.Shape(B), op.Constant(value_ints=[0]), op.Constant(value_ints=[2]))
    scale = op.Reshape(scales, op.Concat(blocks, op.Constant(value_ints=[1]), axis=0))
    zp = op.CastLike(op.Pow(op.Constant(value_int=2), nbits - op.Constant(value_int=1)), A)
    weight = op.Reshape((q - zp) * scale, op.Constant(value_ints=[0, -1]))
    k = op.Unsqueeze(op.Constant(value_int=K), op.Constant(value_ints=[0]))
    weight = op.Slice(weight, op.Constant(value_ints=[0]), k, op.Constant(value_ints=[1]))
    return op.MatMul(A, op.Transpose(weight, perm=[1, 0]))


@register("com.microsoft", "MatMulNBits", applies=_applies("none", bias=True))
@script()
def matmul_nbits_bias(
    A, B, scales, zero_points, g_idx, bias, K: int, N: int, block_size: int, bits: int = 4
):
    """A @ ((q - 2^(bits-1)) * scale)^T + bias."""
    nbits = op.Constant(value_int=bits)
    shifts = op.Cast(op.Range(op.Constant(value_int=0), op.Constant(value_int=8), nbits), to=2)
    shifted = op.BitShift(op.Unsqueeze(B, op.Constant(value_ints=[-1])), shifts, direction="RIGHT")
    high = op.BitShift(shifted, op.Cast(nbits, to=2), direction="RIGHT")
    levels = op.CastLike(op.Pow(op.Constant(value_int=2), nbits), A)
    codes = op.CastLike(shifted, A) - op.CastLike(high, A) * levels
    q = op.Reshape(codes, op.Constant(value_ints=[0, 0, -1]))
    blocks = op.Slice(op.Shape(B), op.Constant(value_ints=[0]), op.Constant(value_ints=[2]))
    scale = op.Reshape(scales, op.Concat(blocks, op.Constant(value_ints=[1]), axis=0))
    zp = op.CastLike(op.Pow(op.Constant(value_int=2), nbits - op.Constant(value_int=1)), A)
    weight = op.Reshape((q - zp) * scale, op.Constant(value_ints=[0, -1]))
    k = op.Unsqueeze(op.Constant(value_int=K), op.Constant(value_ints=[0]))
    weight = op.Slice(weight, op.Constant(value_ints=[0]), k, op.Constant(value_ints=[1]))
    return op.MatMul(A, op.Transpose(weight, perm=[1, 0])) + bias


@register("com.microsoft", "MatMulNBits", applies=_applies("float", bias=False))
@script()
def matmul_nbits_float_zp(
    A, B, scales, zero_points, g_idx, bias, K: int, N: int, block_size: int, bits: int = 4
):
    """A @ ((q - zero_points) * scale)^T, zero points in A's type."""
    nbits = op.Constant(value_int=bits)
    shifts = op.Cast(op.Range(op.Constant(value_int=0), op.Constant(value_int=8), nbits), to=2)
    shifted = op.BitShift(op.Unsqueeze(B, op.Constant(value_ints=[-1])), shifts, direction="RIGHT")
    high = op.BitShift(shifted, op.Cast(nbits, to=2), direction="RIGHT")
    levels = op.CastLike(op.Pow(op.Constant(value_int=2), nbits), A)
    codes = op.CastLike(shifted, A) - op.CastLike(high, A) * levels
    q = op.Reshape(codes, op.Constant(value_ints=[0, 0, -1]))
    blocks = op.Slice(op.Shape(B), op.Constant(value_ints=[0]), op.Constant(value_ints=[2]))
    block_shape = op.Concat(blocks, op.Constant(value_ints=[1]), axis=0)  # [N, k_blocks, 1]
    scale = op.Reshape(scales, block_shape)
    zp = op.Reshape(zero_points, block_shape)
    weight = op.Reshape((q - zp) * scale, op.Constant(value_ints=[0, -1]))
    k = op.Unsqueeze(op.Constant(value_int=K), op.Constant(value_ints=[0]))
    weight = op.Slice(weight, op.Constant(value_ints=[0]), k, op.Constant(value_ints=[1]))
    return op.MatMul(A, op.Transpose(weight, perm=[1, 0]))


@register("com.microsoft", "MatMulNBits", applies=_applies("float", bias=True))
@script()
def matmul_nbits_float_zp_bias(
    A, B, scales, zero_points, g_idx, bias, K: int, N: int, block_size: int, bits: int = 4
):
    """A @ ((q - zero_points) * scale)^T + bias, zero points in A's type."""
    nbits = op.Constant(value_int=bits)
    shifts = op.Cast(op.Range(op.Constant(value_int=0), op.Constant(value_int=8), nbits), to=2)
    shifted = op.BitShift(op.Unsqueeze(B, op.Constant(value_ints=[-1])), shifts, direction="RIGHT")
    high = op.BitShift(shifted, op.Cast(nbits, to=2), direction="RIGHT")
    levels = op.CastLike(op.Pow(op.Constant(value_int=2), nbits), A)
    codes = op.CastLike(shifted, A) - op.CastLike(high, A) * levels
    q = op.Reshape(codes, op.Constant(value_ints=[0, 0, -1]))
    blocks = op.Slice(op.Shape(B), op.Constant(value_ints=[0]), op.Constant(value_ints=[2]))
    block_shape = op.Concat(blocks, op.Constant(value_ints=[1]), axis=0)
    scale = op.Reshape(scales, block_shape)
    zp = op.Reshape(zero_points, block_shape)
    weight = op.Reshape((q - zp) * scale, op.Constant(value_ints=[0, -1]))
    k = op.Unsqueeze(op.Constant(value_int=K), op.Constant(value_ints=[0]))
    weight = op.Slice(weight, op.Constant(value_ints=[0]), k, op.Constant(value_ints=[1]))
    return op.MatMul(A, op.Transpose(weight, perm=[1, 0])) + bias


@register("com.microsoft", "MatMulNBits", applies=_applies("packed", bias=False))
@script()
def matmul_nbits_packed_zp(
    A, B, scales, zero_points, g_idx, bias, K: int, N: int, block_size: int, bits: int = 4
):
    """A @ ((q - zp) * scale)^T, zp unpacked from uint8 like q."""
    nbits = op.Constant(value_int=bits)
    shifts = op.Cast(op.Range(op.Constant(value_int=0), op.Constant(value_int=8), nbits), to=2)
    nbits8 = op.Cast(nbits, to=2)
    levels = op.CastLike(op.Pow(op.Constant(value_int=2), nbits), A)
    last = op.Constant(value_ints=[-1])
    shifted = op.BitShift(op.Unsqueeze(B, last), shifts, direction="RIGHT")
    high = op.BitShift(shifted, nbits8, direction="RIGHT")
    codes = op.CastLike(shifted, A) - op.CastLike(high, A) * levels
    q = op.Reshape(codes, op.Constant(value_ints=[0, 0, -1]))
    shape_b = op.Shape(B)
    rows = op.Slice(shape_b, op.Constant(value_ints=[0]), op.Constant(value_ints=[1]))
    n_blocks = op.Slice(shape_b, op.Constant(value_ints=[1]), op.Constant(value_ints=[2]))
    block_shape = op.Concat(rows, n_blocks, op.Constant(value_ints=[1]), axis=0)
    scale = op.Reshape(scales, block_shape)
    zp_bytes = op.Reshape(zero_points, op.Concat(rows, last, axis=0))  # [N, zp_bytes]
    zp_shifted = op.BitShift(op.Unsqueeze(zp_bytes, last), shifts, direction="RIGHT")
    zp_high = op.BitShift(zp_shifted, nbits8, direction="RIGHT")
    zp_codes = op.CastLike(zp_shifted, A) - op.CastLike(zp_high, A) * levels
    zp_flat = op.Reshape(zp_codes, op.Constant(value_ints=[0, -1]))
    zp_flat = op.Slice(zp_flat, op.Constant(value_ints=[0]), n_blocks, op.Constant(value_ints=[1]))
    zp = op.Unsqueeze(zp_flat, last)  # [N, k_blocks, 1]
    weight = op.Reshape((q - zp) * scale, op.Constant(value_ints=[0, -1]))
    k = op.Unsqueeze(op.Constant(value_int=K), op.Constant(value_ints=[0]))
    weight = op.Slice(weight, op.Constant(value_ints=[0]), k, op.Constant(value_ints=[1]))
    return op.MatMul(A, op.Transpose(weight, perm=[1, 0]))


@register("com.microsoft", "MatMulNBits", applies=_applies("packed", bias=True))
@script()
def matmul_nbits_packed_zp_bias(
    A, B, scales, zero_points, g_idx, bias, K: int, N: int, block_size: int, bits: int = 4
):
    """A @ ((q - zp) * scale)^T + bias, zp unpacked from uint8 like q."""
    nbits = op.Constant(value_int=bits)
    shifts = op.Cast(op.Range(op.Constant(value_int=0), op.Constant(value_int=8), nbits), to=2)
    nbits8 = op.Cast(nbits, to=2)
    levels = op.CastLike(op.Pow(op.Constant(value_int=2), nbits), A)
    last = op.Constant(value_ints=[-1])
    shifted = op.BitShift(op.Unsqueeze(B, last), shifts, direction="RIGHT")
    high = op.BitShift(shifted, nbits8, direction="RIGHT")
    codes = op.CastLike(shifted, A) - op.CastLike(high, A) * levels
    q = op.Reshape(codes, op.Constant(value_ints=[0, 0, -1]))
    shape_b = op.Shape(B)
    rows = op.Slice(shape_b, op.Constant(value_ints=[0]), op.Constant(value_ints=[1]))
    n_blocks = op.Slice(shape_b, op.Constant(value_ints=[1]), op.Constant(value_ints=[2]))
    block_shape = op.Concat(rows, n_blocks, op.Constant(value_ints=[1]), axis=0)
    scale = op.Reshape(scales, block_shape)
    zp_bytes = op.Reshape(zero_points, op.Concat(rows, last, axis=0))
    zp_shifted = op.BitShift(op.Unsqueeze(zp_bytes, last), shifts, direction="RIGHT")
    zp_high = op.BitShift(zp_shifted, nbits8, direction="RIGHT")
    zp_codes = op.CastLike(zp_shifted, A) - op.CastLike(zp_high, A) * levels
    zp_flat = op.Reshape(zp_codes, op.Constant(value_ints=[0, -1]))
    zp_flat = op.Slice(zp_flat, op.Constant(value_ints=[0]), n_blocks, op.Constant(value_ints=[1]))
    zp = op.Unsqueeze(zp_flat, last)
    weight = op.Reshape((q - zp) * scale, op.Constant(value_ints=[0, -1]))
    k = op.Unsqueeze(op.Constant(value_int=K), op.Constant(value_ints=[0]))
    weight = op.Slice(weight, op.Constant(value_ints=[0]), k, op.Constant(value_ints=[1]))
    return op.MatMul(A, op.Transpose(weight, perm=[1, 0])) + bias
