"""Blockwise quantized weights: the layout, round-to-nearest, and the chunked driver.

A weight is quantized as *rows*: ``rows[n, k]`` is ``W[k, n]`` of a MatMul weight ``W[K, N]``
(or Gemm's ``B`` with ``transB=1`` as it is). Each row is cut along K into blocks of
``block`` values; the last block is padded by repeating the row's last value (so min, max and
abs-max stay those of the real values) and the padded codes are set to the zero point (they
dequantize to exactly 0). A block stores unsigned ``bits``-wide codes ``q`` and a float scale;
its values are ``(q - zero_point) * scale``. Symmetric blocks have no stored zero point: it is
``2**(bits - 1)``.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import numpy as np

# (blocks [B, n] float32, importance [B, n] float32, bits, symmetric) -> codes, scales, zps
Kernel = Callable[
    [np.ndarray, np.ndarray, int, bool], tuple[np.ndarray, np.ndarray, np.ndarray | None]
]

CHUNK_ELEMENTS = 1 << 18  # values quantized at a time: small enough to stay in cache
THREADS = min(2, os.cpu_count() or 1)


@dataclasses.dataclass
class Blockwise:
    """Codes ``[N, k_blocks, block]`` (uint8), scales ``[N, k_blocks]`` (float32), zero points.

    ``zero_points`` is ``[N, k_blocks]`` uint8, or None for symmetric blocks (``2**(bits-1)``).
    ``k`` is the unpadded row length. ``rel_error`` is ``||dequantize() - rows|| / ||rows||``,
    measured while quantizing (None when not measured).
    """

    codes: np.ndarray
    scales: np.ndarray
    zero_points: np.ndarray | None
    bits: int
    k: int
    rel_error: float | None = None

    @property
    def n(self) -> int:
        return self.codes.shape[0]

    @property
    def k_blocks(self) -> int:
        return self.codes.shape[1]

    @property
    def block(self) -> int:
        return self.codes.shape[2]

    @property
    def symmetric(self) -> bool:
        return self.zero_points is None

    def zero_point_values(self) -> np.ndarray:
        """The zero point of every block, ``[N, k_blocks]`` uint8 (the default if symmetric)."""
        if self.zero_points is not None:
            return self.zero_points
        return np.full(self.scales.shape, 1 << (self.bits - 1), dtype=np.uint8)

    def dequantize(self) -> np.ndarray:
        """The rows the codes stand for, ``[N, K]`` float32."""
        levels = self.codes.astype(np.float32) - self.zero_point_values()[..., None]
        values = levels * self.scales[..., None]
        return values.reshape(self.n, -1)[:, : self.k]


def k_blocks(k: int, block: int) -> int:
    return -(-k // block)


def padded_blocks(rows: np.ndarray, block: int) -> np.ndarray:
    """``[N, K]`` -> ``[N, k_blocks, block]`` float32; the tail repeats each row's last value."""
    rows = np.asarray(rows, dtype=np.float32)
    n, k = rows.shape
    pad = k_blocks(k, block) * block - k
    if pad:
        rows = np.concatenate([rows, np.repeat(rows[:, -1:], pad, axis=1)], axis=1)
    return np.ascontiguousarray(rows).reshape(n, -1, block)


def pad_mask(k: int, block: int) -> np.ndarray:
    """``[k_blocks, block]`` float32: 1 for real values, 0 for padding."""
    mask = np.zeros(k_blocks(k, block) * block, dtype=np.float32)
    mask[:k] = 1.0
    return mask.reshape(-1, block)


def code_range(bits: int) -> tuple[int, int, int]:
    """``(max_code, default zero point, largest positive level)`` for ``bits``-wide codes."""
    return (1 << bits) - 1, 1 << (bits - 1), (1 << (bits - 1)) - 1


def rtn_kernel(
    x: np.ndarray, importance: np.ndarray, bits: int, symmetric: bool
) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """Round to nearest on blocks ``x [B, n]`` (importance unused).

    Symmetric: the largest magnitude maps to level ``-2**(bits-1)`` (the full range of codes,
    as llama.cpp's Q4_0 does). Asymmetric: ``[min, max]`` (widened to hold 0) spans the codes.
    """
    del importance
    max_code, mid, _ = code_range(bits)
    if symmetric:
        index = np.argmax(np.abs(x), axis=1)
        extreme = np.take_along_axis(x, index[:, None], axis=1)[:, 0]
        scales = (extreme / -mid).astype(np.float32)
        zero_points = None
        zps = np.float32(mid)
    else:
        low = np.minimum(x.min(axis=1), 0)
        high = np.maximum(x.max(axis=1), 0)
        scales = ((high - low) / max_code).astype(np.float32)
        safe = np.where(scales == 0, 1, scales)
        zero_points = np.clip(np.rint(-low / safe), 0, max_code).astype(np.uint8)
        zps = zero_points[:, None].astype(np.float32)
    codes = assign(x, scales, zps, max_code)
    return codes, scales, zero_points


def assign(x: np.ndarray, scales: np.ndarray, zps: np.ndarray | np.float32, max_code: int):
    """The nearest codes of ``x [B, n]`` for given scales ``[B]`` and zero points: uint8."""
    inverse = np.divide(1.0, scales, out=np.zeros_like(scales), where=scales != 0)
    q = x * inverse[:, None]
    np.rint(q, out=q)
    q += zps
    np.clip(q, 0, max_code, out=q)
    return q.astype(np.uint8)


def quantize_rows(
    rows: np.ndarray,
    *,
    bits: int,
    block: int,
    symmetric: bool,
    kernel: Kernel = rtn_kernel,
    importance: Callable[[np.ndarray], np.ndarray] | None = None,
    threads: int | None = None,
    along_k: bool | None = None,
) -> Blockwise:
    """Quantize ``rows [N, K]`` block by block, in cache-sized pieces, on ``threads``.

    ``rows`` may be ``W.T`` of a (memory-mapped) ``[K, N]`` weight: then each piece is a
    contiguous slab of whole blocks along K (all N columns), otherwise a slab of whole rows.
    Each piece is copied to float32 on its own, so no full-size float copy is made. ``rows``
    may also be any object with ``shape`` and ``rows[row_slice, column_slice]`` (a reader of
    slabs from a file); ``along_k`` then says which slabs it reads cheaply.
    ``importance`` maps blocks ``[B, n]`` to per-value weights; padding gets weight 0.
    """
    if bits not in (2, 4, 8):
        raise ValueError(f"bits must be 2, 4 or 8, not {bits}")
    if block < 2 or block & (block - 1):
        raise ValueError(f"block must be a power of two >= 2, not {block}")
    n, k = rows.shape
    kb = k_blocks(k, block)
    codes = np.empty((n, kb, block), dtype=np.uint8)
    scales = np.empty((n, kb), dtype=np.float32)
    zero_points = None if symmetric else np.empty((n, kb), dtype=np.uint8)
    mask = pad_mask(k, block)
    sums: list[tuple[float, float]] = []  # (squared error, squared signal) per piece

    def work(piece: tuple[slice, slice]) -> None:
        rs, bs = piece
        part = rows[rs, bs.start * block : bs.stop * block]
        x = padded_blocks(part, block)
        count, piece_kb = x.shape[:2]
        x = x.reshape(-1, block)
        real = np.tile(mask[bs], (count, 1))
        weights = importance(x) if importance is not None else np.ones_like(x)
        weights *= real
        q, s, z = kernel(x, weights, bits, symmetric)
        codes[rs, bs] = q.reshape(count, piece_kb, block)
        scales[rs, bs] = s.reshape(count, piece_kb)
        if zero_points is not None:
            zero_points[rs, bs] = z.reshape(count, piece_kb)
        sums.append(_squared_error(x, real, q, s, z, bits))

    if along_k is None:
        along_k = rows.T.flags.c_contiguous and not rows.flags.c_contiguous
    pieces = _pieces(n, block, kb, along_k)
    workers = threads if threads is not None else THREADS
    if workers > 1 and len(pieces) > 1:
        with ThreadPoolExecutor(workers) as pool:
            list(pool.map(work, pieces))
    else:
        for piece in pieces:
            work(piece)
    if k % block:
        pad_code = zero_points[:, -1:] if zero_points is not None else 1 << (bits - 1)
        codes[:, -1, k % block :] = pad_code
    error, signal = np.sum(sums, axis=0) if sums else (0.0, 0.0)
    rel_error = float(np.sqrt(error / signal)) if signal > 0 else 0.0
    return Blockwise(codes, scales, zero_points, bits, k, rel_error)


def _squared_error(
    x: np.ndarray, real: np.ndarray, q: np.ndarray, s: np.ndarray, z: np.ndarray | None, bits: int
) -> tuple[float, float]:
    """Sums of squared reconstruction error and of squared values over the real (unpadded) x."""
    zps = np.float32(1 << (bits - 1)) if z is None else z[:, None].astype(np.float32)
    diff = (q.astype(np.float32) - zps) * s[:, None] - x
    diff *= real
    return float(np.einsum("ij,ij->", diff, diff)), float(np.einsum("ij,ij,ij->", x, x, real))


def _pieces(n: int, block: int, kb: int, along_k: bool) -> list[tuple[slice, slice]]:
    """``(rows, k-blocks)`` slices of about CHUNK_ELEMENTS values: slabs along K or along N."""
    if along_k:
        step = max(1, CHUNK_ELEMENTS // (n * block))
        return [(slice(0, n), slice(b, min(b + step, kb))) for b in range(0, kb, step)]
    step = max(1, CHUNK_ELEMENTS // (kb * block))
    return [(slice(r, min(r + step, n)), slice(0, kb)) for r in range(0, n, step)]


def rtn(rows: np.ndarray, *, bits: int, block: int, symmetric: bool, **kw) -> Blockwise:
    """Round-to-nearest blockwise quantization of ``rows [N, K]``."""
    return quantize_rows(rows, bits=bits, block=block, symmetric=symmetric, kernel=rtn_kernel, **kw)


def per_channel_int8(rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric int8 per row: ``rows [N, K] ~ q * scale[:, None]``, q in [-127, 127]."""
    rows = np.asarray(rows, dtype=np.float32)
    amax = np.abs(rows).max(axis=1)
    scales = (amax / 127).astype(np.float32)
    inverse = np.divide(1.0, scales, out=np.zeros_like(scales), where=scales != 0)
    q = np.clip(np.rint(rows * inverse[:, None]), -127, 127).astype(np.int8)
    return q, scales


def relative_error(rows: np.ndarray, q: np.ndarray, scales: np.ndarray) -> float:
    """``||q * scales[:, None] - rows|| / ||rows||`` for per-row quantized ``rows [N, K]``."""
    rows = np.asarray(rows, dtype=np.float32)
    diff = q.astype(np.float32) * scales[:, None] - rows
    signal = float(np.einsum("ij,ij->", rows, rows))
    return float(np.sqrt(np.einsum("ij,ij->", diff, diff) / signal)) if signal > 0 else 0.0
