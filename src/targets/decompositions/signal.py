"""Signal ops: STFT (opset 17) of a real signal.

``Y[b, f, k] = sum_n x[b, f * step + n] * w[n] * exp(-2i pi k n / N)``, as ``[..., (re, im)]``:
the frames are one Gather (indices ``f * step + n``), the DFT a MatMul with the basis
``w[n] * (cos, -sin)(2 pi (k n mod N) / N)``, ``[N, bins * 2]``, ``bins = N // 2 + 1`` when
``onesided``. Indices and basis depend only on shapes and the step, frame length and window
(constants in practice), so constant folding leaves Gather + MatMul. ``N`` is the window's
length, else ``frame_length``. Complex signals (``[batch, length, 2]``) are left alone.
"""

from __future__ import annotations

import math

import onnx_ir as ir
from onnxscript import opset13 as op
from onnxscript import script

from onnxopt.targets.decompositions import register

TWO_PI = 2 * math.pi


def _stft_applies(window: bool):
    def check(node: ir.Node) -> str | None:
        signal = node.inputs[0]
        if signal.shape is None or signal.shape.rank() != 3 or signal.shape[-1] != 1:
            return "signal not known to be real, [batch, length, 1]"
        has_window = len(node.inputs) > 2 and node.inputs[2] is not None
        if has_window != window:
            return "window " + ("missing" if window else "present")
        if not window and (len(node.inputs) < 4 or node.inputs[3] is None):
            return "neither window nor frame_length"
        return None

    return check


@script(default_opset=op)
def _frames(signal, frame_step, size):
    """x[b, f * step + n] as [batch, frames, N]: one Gather, ``N = size`` (an int64 scalar)."""
    zero = op.Constant(value_int=0)
    one = op.Constant(value_int=1)
    x = op.Squeeze(signal, op.Constant(value_ints=[2]))  # [batch, length]
    count = (op.Shape(signal)[1] - size) / op.CastLike(frame_step, size) + one
    starts = op.Range(zero, count, one) * op.CastLike(frame_step, size)
    index = op.Unsqueeze(starts, op.Constant(value_ints=[1])) + op.Range(zero, size, one)
    return op.Gather(x, index, axis=1)


@script(default_opset=op)
def _dft_basis(size, like, onesided: int):
    """(cos, -sin)(2 pi (k n mod N) / N) as [N, bins, 2] in like's type, bins N // 2 + 1 if
    onesided, else N."""
    zero = op.Constant(value_int=0)
    one = op.Constant(value_int=1)
    half = op.Constant(value_int=onesided)
    bins = op.Where(op.Equal(half, zero), size, size / op.Constant(value_int=2) + one)
    n = op.Range(zero, size, one)
    turns = op.Mod(op.Unsqueeze(n, op.Constant(value_ints=[1])) * op.Range(zero, bins, one), size)
    angle = op.CastLike(turns, like) * op.CastLike(TWO_PI, like) / op.CastLike(size, like)
    last = op.Constant(value_ints=[-1])
    return op.Concat(op.Unsqueeze(op.Cos(angle), last), op.Unsqueeze(-op.Sin(angle), last), axis=-1)


@script(default_opset=op)
def _spectrum(frames, basis):
    """frames [batch, frames, N] @ basis [N, bins, 2] -> [batch, frames, bins, 2]."""
    flat = op.MatMul(frames, op.Reshape(basis, op.Constant(value_ints=[0, -1])))
    return op.Reshape(flat, op.Constant(value_ints=[0, 0, -1, 2]))


@register("", "STFT", min_opset=17, applies=_stft_applies(window=True))
@script(default_opset=op)
def stft(signal, frame_step, window, frame_length, onesided: int = 1):
    """STFT with a window: frames (Gather) @ windowed DFT basis w[n] * (cos, -sin) (MatMul)."""
    size = op.Size(window)
    basis = _dft_basis(size, signal, onesided=onesided)
    basis = basis * op.Unsqueeze(window, op.Constant(value_ints=[1, 2]))  # [N, bins, 2]
    return _spectrum(_frames(signal, frame_step, size), basis)


@register("", "STFT", min_opset=17, applies=_stft_applies(window=False))
@script(default_opset=op)
def stft_no_window(signal, frame_step, window, frame_length, onesided: int = 1):
    """STFT without a window: frames (Gather) @ DFT basis (MatMul), N = frame_length."""
    size = op.Cast(frame_length, to=7)  # INT64
    basis = _dft_basis(size, signal, onesided=onesided)
    return _spectrum(_frames(signal, frame_step, size), basis)
