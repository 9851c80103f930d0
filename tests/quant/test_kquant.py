"""k-quant against round-to-nearest and against the exact optimum found by brute force."""

from __future__ import annotations

import numpy as np
import pytest
from quant_reference import optimum, weighted_error

from onnxopt.quant import blocks, kquant


def _blocks(rng, count: int, size: int, dist: str) -> np.ndarray:
    if dist == "laplace":
        return rng.laplace(size=(count, size)).astype(np.float32)
    return rng.standard_normal((count, size)).astype(np.float32)


@pytest.mark.parametrize("importance", ["uniform", "magnitude"])
@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("bits", [4, 8])
def test_never_worse_than_rtn(rng, bits, symmetric, importance):
    x = _blocks(rng, 300, 32, "laplace")
    w = np.ones_like(x) if importance == "uniform" else kquant.magnitude_importance(x)
    k_err = weighted_error(x, w, *kquant.kquant_kernel(x, w, bits, symmetric), bits)
    r_err = weighted_error(x, w, *blocks.rtn_kernel(x, w, bits, symmetric), bits)
    assert np.all(k_err <= r_err * (1 + 1e-5) + 1e-12)
    assert k_err.sum() < 0.95 * r_err.sum()


@pytest.mark.parametrize("dist", ["normal", "laplace"])
@pytest.mark.parametrize(
    ("symmetric", "max_total_excess", "min_at_optimum"), [(True, 0.005, 0.75), (False, 0.02, 0.75)]
)
def test_close_to_the_brute_force_optimum(rng, dist, symmetric, max_total_excess, min_at_optimum):
    """Block 32, 4 bits: symmetric within 0.5 % of the optimum in total, asymmetric within 2 %."""
    x = _blocks(rng, 120, 32, dist)
    w = np.ones_like(x)
    ours = weighted_error(x, w, *kquant.kquant_kernel(x, w, 4, symmetric), 4)
    best = np.array([optimum(row, np.ones(32), 4, symmetric) for row in x])
    assert np.all(ours >= best * (1 - 1e-4))  # the brute force really is a lower bound
    assert ours.sum() <= best.sum() * (1 + max_total_excess)
    assert np.mean(ours <= best * (1 + 1e-4)) >= min_at_optimum


def test_importance_weights_steer_the_error(rng):
    """Heavier weight on a value lowers its error at the others' expense."""
    x = _blocks(rng, 400, 32, "normal")
    light, heavy = np.ones_like(x), np.ones_like(x)
    heavy[:, 0] = 100.0
    err_light = np.abs(x - _dequant(x, light))[:, 0].mean()
    err_heavy = np.abs(x - _dequant(x, heavy))[:, 0].mean()
    assert err_heavy < 0.5 * err_light


def _dequant(x: np.ndarray, w: np.ndarray) -> np.ndarray:
    codes, scales, _ = kquant.kquant_kernel(x, w, 4, True)
    return (codes.astype(np.float32) - 8) * scales[:, None]


def test_codes_are_consistent_with_stored_scales(rng):
    """What the stored codes, scales and zero points dequantize to is the optimised error."""
    rows = rng.standard_normal((8, 100)).astype(np.float32)
    quant = kquant.kquant(rows, bits=4, block=32, symmetric=False)
    x = blocks.padded_blocks(rows, 32).reshape(-1, 32)
    mask = np.tile(blocks.pad_mask(100, 32), (8, 1))
    codes, scales, zps = kquant.kquant_kernel(x, mask, 4, False)
    np.testing.assert_array_equal(quant.scales.reshape(-1), scales)
    err = np.sum((quant.dequantize() - rows) ** 2)
    np.testing.assert_allclose(err, weighted_error(x, mask, codes, scales, zps, 4).sum(), rtol=1e-4)


def test_whole_tensor_error_below_rtn(rng):
    rows = rng.standard_normal((64, 256)).astype(np.float32)
    for symmetric in (True, False):
        k = kquant.kquant(rows, bits=4, block=32, symmetric=symmetric)
        r = blocks.rtn(rows, bits=4, block=32, symmetric=symmetric)
        k_err, r_err = (np.sum((q.dequantize() - rows) ** 2) for q in (k, r))
        assert k_err < 0.95 * r_err


def test_unknown_importance_raises(rng):
    with pytest.raises(ValueError, match="importance"):
        rows = np.ones((2, 32), np.float32)
        kquant.kquant(rows, bits=4, block=32, symmetric=True, importance="x")
