"""k-quant: per block, search the scale (and zero point) that minimise the weighted error.

In the spirit of llama.cpp's k-quants. For each block ``x`` with importance ``w`` it minimises
``sum(w * (x - s * (q - z))**2)`` over the scale ``s``, the integer zero point ``z`` (fixed at
``2**(bits-1)`` when symmetric) and the codes ``q``:

1. Candidates: a grid of inverse scales around the round-to-nearest one; each gives codes by
   rounding, and the least-squares scale for those codes (``s = sum(w x l) / sum(w l l)`` with
   levels ``l = q - z``). The round-to-nearest codes are one of the candidates, so the result is
   never worse than RTN under the same importance.
2. Refinement (Lloyd steps): re-round to the nearest codes for the best scale, then re-fit the
   scale; asymmetric blocks also try ``z - 1`` and ``z + 1``. Each step can only lower the error.

The codes returned are the ones the error was measured with: they are not re-rounded against
the stored scale and zero point afterwards, so what ORT dequantizes is what was optimised.
Everything is vectorised over blocks; candidates are a short Python loop over the grid.
"""

from __future__ import annotations

import numpy as np

from onnxopt.quant.blocks import Blockwise, code_range, quantize_rows, rtn_kernel

# Offsets (in levels) of the extreme value's target level around round-to-nearest.
GRID = np.linspace(-0.8, 0.8, 5, dtype=np.float32)
REFINE_STEPS = 2


def magnitude_importance(x: np.ndarray) -> np.ndarray:
    """llama.cpp's weights without an activation matrix: ``rms(block) + |x|``."""
    rms = np.sqrt(np.mean(np.square(x), axis=1, keepdims=True))
    return np.abs(x) + rms


def kquant(
    rows: np.ndarray,
    *,
    bits: int,
    block: int,
    symmetric: bool,
    importance: str = "uniform",
    threads: int | None = None,
    along_k: bool | None = None,
) -> Blockwise:
    """k-quant of ``rows [N, K]``; ``importance`` is ``uniform`` (weight MSE) or ``magnitude``."""
    weights = {"uniform": None, "magnitude": magnitude_importance}
    if importance not in weights:
        raise ValueError(f"importance must be uniform or magnitude, not {importance!r}")
    return quantize_rows(
        rows,
        bits=bits,
        block=block,
        symmetric=symmetric,
        kernel=kquant_kernel,
        importance=weights[importance],
        threads=threads,
        along_k=along_k,
    )


def kquant_kernel(
    x: np.ndarray, w: np.ndarray, bits: int, symmetric: bool
) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """k-quant on blocks ``x [B, n]`` with importance ``w [B, n]``: codes, scales, zero points."""
    max_code, mid, _ = code_range(bits)
    _, s0, z0 = rtn_kernel(x, w, bits, symmetric)
    z = np.full(len(x), mid, np.float32) if z0 is None else z0.astype(np.float32)
    # At 8 bits the error is ~1e-5 of the signal: float32 sums could not tell candidates apart.
    exact = np.float64 if bits > 4 else np.float32
    best = _Best(x, w, max_code, symmetric, exact)
    best.offer(_inverse(s0), z)
    if symmetric:
        _search_symmetric(best, bits)
    else:
        _search_asymmetric(best, max_code)
    for _ in range(REFINE_STEPS):
        _refine(best, max_code, symmetric)
    codes = best.levels(best.multipliers, best.zero_points) + best.zero_points[:, None]
    zero_points = None if symmetric else best.zero_points.astype(np.uint8)
    return codes.astype(np.uint8), best.scales.astype(np.float32), zero_points


def _inverse(values: np.ndarray) -> np.ndarray:
    return np.divide(1.0, values, out=np.zeros_like(values), where=values != 0)


class _Best:
    """Per block, the best candidate so far: ``levels = clip(rint(x * m), -z, max_code - z)``.

    A candidate is its multiplier ``m`` and zero point ``z`` (the levels are recomputed once at
    the end), with its least-squares scale and the error it removes (``gain``).
    """

    def __init__(
        self, x: np.ndarray, w: np.ndarray, max_code: int, symmetric: bool, dtype: type
    ) -> None:
        self.x, self.w, self.wx, self.dtype, self.max_code = x, w, w * x, dtype, max_code
        self.symmetric_zero = (max_code + 1) // 2 if symmetric else None
        self.multipliers = np.zeros(len(x), np.float32)
        self.zero_points = np.zeros(len(x), np.float32)
        self.scales = np.zeros(len(x), dtype)
        self.gain = np.full(len(x), -np.inf, dtype)
        self._buffer = np.empty_like(x)
        self._weighted = np.empty_like(x)

    def levels(self, multipliers: np.ndarray, z: np.ndarray) -> np.ndarray:
        """The candidate's levels, in a reused buffer (clipped with scalar bounds: fast)."""
        levels = np.multiply(self.x, multipliers[:, None], out=self._buffer)
        np.rint(levels, out=levels)
        if self.symmetric_zero is not None:
            low = -self.symmetric_zero
            return np.clip(levels, low, self.max_code + low, out=levels)
        levels += z[:, None]
        np.clip(levels, 0, self.max_code, out=levels)
        levels -= z[:, None]
        return levels

    def fit(self, levels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Least-squares scales for ``levels`` and the error they remove, ``sxl^2 / sll``.

        The weighted error is ``sum(w x^2) - gain``, so a larger gain is a smaller error.
        """
        sxl = np.einsum("ij,ij->i", self.wx, levels, dtype=self.dtype)
        weighted = np.multiply(self.w, levels, out=self._weighted)
        sll = np.einsum("ij,ij->i", weighted, levels, dtype=self.dtype)
        ok = sll > 0
        scales = np.divide(sxl, sll, out=np.zeros_like(sxl), where=ok)
        return scales, np.where(ok, sxl * scales, 0)

    def offer(self, multipliers: np.ndarray, z: np.ndarray) -> None:
        """Keep the candidate for the blocks where it lowers the error."""
        scales, gain = self.fit(self.levels(multipliers, z))
        better = gain > self.gain
        self.multipliers = np.where(better, multipliers, self.multipliers)
        self.zero_points = np.where(better, z, self.zero_points)
        self.scales = np.where(better, scales, self.scales)
        self.gain = np.where(better, gain, self.gain)


def _search_symmetric(best: _Best, bits: int) -> None:
    """Map the block's extreme value to levels near ``-2**(bits-1)`` and near ``2**(bits-1)-1``."""
    _, mid, top = code_range(bits)
    x = best.x
    index = np.argmax(np.abs(x), axis=1)
    inverse = _inverse(np.take_along_axis(x, index[:, None], axis=1)[:, 0])
    z = np.full(len(x), mid, np.float32)
    for target in (-mid, top):
        for offset in GRID:
            best.offer(inverse * (target + offset), z)


def _search_asymmetric(best: _Best, max_code: int) -> None:
    """Spread ``[min, max]`` (holding 0) over ``max_code + offset`` steps; zero point rounded."""
    x = best.x
    low = np.minimum(x.min(axis=1), 0)
    span = np.maximum(x.max(axis=1), 0) - low
    for offset in GRID:
        inverse = np.divide(max_code + offset, span, out=np.zeros_like(span), where=span > 0)
        best.offer(inverse, np.clip(np.rint(-low * inverse), 0, max_code))


def _refine(best: _Best, max_code: int, symmetric: bool) -> None:
    """Nearest levels for the best scales (and nearby zero points), then re-fit the scales."""
    inverse = _inverse(best.scales).astype(np.float32)
    shifts = (0,) if symmetric else (0, -1, 1)
    zero_points = best.zero_points
    for shift in shifts:
        best.offer(inverse, np.clip(zero_points + shift, 0, max_code))
