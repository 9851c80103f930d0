"""Byte layouts: com.microsoft MatMulNBits and GatherBlockQuantized, blocked DequantizeLinear.

MatMulNBits (``Y = A @ W``, ``W[k, n] = (q[n, k] - zp[n, k // block]) * scale[n, k // block]``):

- ``B``: uint8 ``[N, k_blocks, block * bits / 8]``; codes packed low bits first along K
  (for 4 bits: byte ``j`` holds code ``2j`` in its low nibble, ``2j + 1`` in its high nibble).
  K is padded up to ``k_blocks * block``.
- ``scales``: ``[N, k_blocks]`` in A's float type.
- ``zero_points`` (optional; absent means ``2**(bits-1)``): uint8 ``[N, ceil(k_blocks * bits /
  8)]``, each row packed like B on its own (the last byte of a row padded with the default).

DequantizeLinear-21 blocked (``W[K, N]``, ``axis=0``, ``block_size``): INT4 (symmetric, levels
``q - 8`` in two's complement) or UINT4 data ``[K, N]``, scales ``[k_blocks, N]``, zero points
UINT4 ``[k_blocks, N]``. ONNX packs 4-bit tensors flat in row-major order, two per byte, the
even element in the low nibble, the last byte padded with zero.
"""

from __future__ import annotations

import numpy as np

from onnxopt.quant.blocks import Blockwise


def pack_codes(codes: np.ndarray, bits: int) -> np.ndarray:
    """Pack uint8 codes along the last axis, low bits first: ``[..., n] -> [..., n*bits/8]``."""
    if bits == 8:
        return np.ascontiguousarray(codes, dtype=np.uint8)
    per_byte = 8 // bits
    if codes.shape[-1] % per_byte:
        raise ValueError(f"last axis ({codes.shape[-1]}) is not a multiple of {per_byte}")
    grouped = codes.reshape(*codes.shape[:-1], -1, per_byte).astype(np.uint8)
    packed = np.zeros(grouped.shape[:-1], dtype=np.uint8)
    for slot in range(per_byte):
        packed |= grouped[..., slot] << np.uint8(slot * bits)
    return packed


def unpack_codes(packed: np.ndarray, bits: int) -> np.ndarray:
    """Inverse of :func:`pack_codes`: ``[..., m] -> [..., m*8/bits]`` uint8."""
    if bits == 8:
        return np.asarray(packed, dtype=np.uint8)
    per_byte = 8 // bits
    mask = np.uint8((1 << bits) - 1)
    slots = [(packed >> np.uint8(slot * bits)) & mask for slot in range(per_byte)]
    return np.stack(slots, axis=-1).reshape(*packed.shape[:-1], -1)


def pack_zero_points(zero_points: np.ndarray, bits: int) -> np.ndarray:
    """``[N, k_blocks]`` uint8 -> ``[N, ceil(k_blocks*bits/8)]``, rows padded with the default."""
    per_byte = 8 // bits
    pad = -zero_points.shape[1] % per_byte
    if pad:
        fill = np.full((zero_points.shape[0], pad), 1 << (bits - 1), dtype=np.uint8)
        zero_points = np.concatenate([zero_points, fill], axis=1)
    return pack_codes(zero_points, bits)


def unpack_zero_points(packed: np.ndarray, bits: int, k_blocks: int) -> np.ndarray:
    return unpack_codes(packed, bits)[:, :k_blocks]


def matmul_nbits(quant: Blockwise) -> dict[str, np.ndarray]:
    """The ``B``, ``scales`` and (asymmetric only) ``zero_points`` inputs of MatMulNBits."""
    tensors = {"B": pack_codes(quant.codes, quant.bits), "scales": quant.scales}
    if quant.zero_points is not None:
        tensors["zero_points"] = pack_zero_points(quant.zero_points, quant.bits)
    return tensors


def from_matmul_nbits(
    b: np.ndarray,
    scales: np.ndarray,
    zero_points: np.ndarray | None,
    *,
    bits: int,
    k: int,
) -> Blockwise:
    """Read MatMulNBits inputs back (packed zero points, or none)."""
    codes = unpack_codes(b, bits)
    kb = codes.shape[1]
    zps = None if zero_points is None else unpack_zero_points(zero_points, bits, kb)
    return Blockwise(codes, scales.reshape(-1, kb).astype(np.float32), zps, bits, k)


def pack_4bit_flat(values: np.ndarray) -> np.ndarray:
    """ONNX INT4/UINT4 raw data: the low nibbles of ``values`` (any shape), two per byte."""
    flat = np.asarray(values).reshape(-1).astype(np.uint8) & np.uint8(0x0F)
    if flat.size % 2:
        flat = np.append(flat, np.uint8(0))
    return flat[0::2] | (flat[1::2] << np.uint8(4))


def unpack_4bit_flat(packed: np.ndarray, shape: tuple[int, ...], signed: bool) -> np.ndarray:
    """Inverse of :func:`pack_4bit_flat`: int8 (signed) or uint8 values of ``shape``."""
    nibbles = unpack_codes(np.asarray(packed, dtype=np.uint8), 4)[: int(np.prod(shape))]
    if signed:
        return ((nibbles.astype(np.int8) ^ 8) - 8).reshape(shape)
    return nibbles.reshape(shape)


def dequantize_linear_int4(quant: Blockwise) -> dict[str, np.ndarray | bool]:
    """The blocked DequantizeLinear tensors for ``W[K, N]``, ``axis=0``, ``block_size=block``.

    Returns ``data`` (packed bytes of the ``[K, N]`` 4-bit tensor), ``signed`` (INT4 when
    True, else UINT4), ``scales`` ``[k_blocks, N]`` float32 and, asymmetric only,
    ``zero_points`` (packed bytes of the ``[k_blocks, N]`` UINT4 tensor).
    """
    if quant.bits != 4:
        raise ValueError("4-bit DequantizeLinear needs 4-bit codes")
    codes = quant.codes.reshape(quant.n, -1)[:, : quant.k].T  # [K, N]
    result: dict[str, np.ndarray | bool] = {"scales": np.ascontiguousarray(quant.scales.T)}
    if quant.zero_points is None:
        result["signed"] = True
        result["data"] = pack_4bit_flat(codes ^ np.uint8(8))  # q - 8 as a two's complement nibble
    else:
        result["signed"] = False
        result["data"] = pack_4bit_flat(codes)
        result["zero_points"] = pack_4bit_flat(quant.zero_points.T)
    return result


def gather_block_quantized(
    quant: Blockwise, *, standard: bool = False
) -> dict[str, np.ndarray | str]:
    """The tensors of a table ``[V, H]`` quantized in blocks along H (``quant`` holds its rows).

    Returns ``data`` and ``data_type``, ``scales`` ``[V, k_blocks]`` float32 and, asymmetric
    only, ``zero_points``; the padding of the last block is dropped. Layouts checked in ORT
    1.32 CPU.

    com.microsoft GatherBlockQuantized (``gather_axis=0, quantize_axis=1``), the default:

    - 8 bits: UINT8 ``[V, H]``; zero points UINT8 ``[V, k_blocks]`` (symmetric: none, the
      op's default for uint8 is 128).
    - 4 bits, H even: UINT8 ``[V, H / 2]``, two codes per byte along H, low nibble first
      (ORT's fast path); zero points packed per row like MatMulNBits' (:func:`pack_zero_points`,
      symmetric: none, the default is 8).
    - 4 bits, H odd: as ``standard`` (UINT8 would gather ``H + 1`` values per row).

    ``standard`` (DequantizeLinear-21, ``axis=1, block_size=block``): 4 bits INT4 ``q - 8``
    (symmetric; GatherBlockQuantized's default zero point for 4-bit types is 0 too) or UINT4
    with UINT4 zero points ``[V, k_blocks]``, ONNX flat packing (:func:`pack_4bit_flat`);
    8 bits INT8 ``q - 128`` (symmetric) or UINT8 with UINT8 zero points.
    """
    codes = quant.codes.reshape(quant.n, -1)[:, : quant.k]
    result: dict[str, np.ndarray | str] = {"scales": quant.scales}
    symmetric = quant.symmetric
    if quant.bits == 4 and (standard or quant.k % 2):
        result["data_type"] = "int4" if symmetric else "uint4"
        result["data"] = pack_4bit_flat(codes ^ np.uint8(8) if symmetric else codes)
        if not symmetric:
            result["zero_points"] = pack_4bit_flat(quant.zero_points)
    elif quant.bits == 4:
        result["data_type"] = "uint8"
        result["data"] = pack_codes(codes, 4)
        if not symmetric:
            result["zero_points"] = pack_zero_points(quant.zero_points, 4)
    elif quant.bits == 8:
        signed = standard and symmetric
        result["data_type"] = "int8" if signed else "uint8"
        result["data"] = (codes ^ np.uint8(0x80)).view(np.int8) if signed else codes.copy()
        if not symmetric:
            result["zero_points"] = quant.zero_points.copy()
    else:
        raise ValueError(f"tables are quantized to 4 or 8 bits, not {quant.bits}")
    return result
