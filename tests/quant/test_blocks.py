"""Block layout, round-to-nearest and int8 per channel, checked against direct formulas."""

from __future__ import annotations

import numpy as np
import pytest

from onnxopt.quant import blocks


@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("bits", [4, 8])
def test_rtn_error_bounded_by_half_a_step(rng, bits, symmetric):
    rows = rng.standard_normal((6, 96)).astype(np.float32)
    quant = blocks.rtn(rows, bits=bits, block=32, symmetric=symmetric)
    assert quant.codes.shape == (6, 3, 32) and quant.scales.shape == (6, 3)
    assert quant.codes.max() < 2**bits
    step = np.abs(quant.scales).repeat(32, axis=1)
    error = np.abs(quant.dequantize() - rows)
    # Symmetric: the extreme takes the lowest level, so the other sign tops out one level short.
    reachable = np.abs(rows) <= step * (2 ** (bits - 1) - 1) if symmetric else True
    assert np.all(np.where(reachable, error <= step / 2 + 1e-6, error <= step + 1e-6))


def test_symmetric_rtn_maps_the_extreme_to_the_lowest_code(rng):
    rows = rng.standard_normal((4, 32)).astype(np.float32)
    quant = blocks.rtn(rows, bits=4, block=32, symmetric=True)
    extreme = np.argmax(np.abs(rows), axis=1)
    assert np.all(quant.codes[np.arange(4), 0, extreme] == 0)
    picked = np.arange(4), extreme
    np.testing.assert_allclose(quant.dequantize()[picked], rows[picked])


def test_asymmetric_rtn_represents_zero_exactly():
    rows = np.array([[0.0, 1.0, 2.0, 3.0] * 8, [-5.0, -1.0, 0.0, -2.0] * 8], dtype=np.float32)
    quant = blocks.rtn(rows, bits=4, block=32, symmetric=False)
    assert quant.dequantize()[0, 0] == 0.0 and quant.dequantize()[1, 2] == 0.0


def test_padding_repeats_the_last_value_and_codes_the_zero_point(rng):
    rows = rng.standard_normal((3, 40)).astype(np.float32)
    padded = blocks.padded_blocks(rows, 32)
    assert padded.shape == (3, 2, 32)
    assert np.all(padded[:, 1, 8:] == rows[:, -1:])
    for symmetric in (True, False):
        quant = blocks.rtn(rows, bits=4, block=32, symmetric=symmetric)
        tail = quant.codes[:, 1, 8:].astype(np.int16) - quant.zero_point_values()[:, 1:]
        assert np.all(tail == 0) and quant.dequantize().shape == (3, 40)


def test_all_zero_block_dequantizes_to_zero():
    quant = blocks.rtn(np.zeros((2, 32), np.float32), bits=4, block=32, symmetric=False)
    assert np.all(quant.dequantize() == 0)


@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("k", [128, 100])
def test_slabs_along_k_and_threads_give_the_same_result(rng, k, symmetric):
    weight = rng.standard_normal((k, 64)).astype(np.float32)  # [K, N]: rows are its columns
    options = {"bits": 4, "block": 32, "symmetric": symmetric}
    whole = blocks.rtn(np.ascontiguousarray(weight.T), threads=1, **options)
    old = blocks.CHUNK_ELEMENTS
    blocks.CHUNK_ELEMENTS = 2048  # one k-block of all 64 columns per piece: 4 pieces
    try:
        assert len(blocks._pieces(64, 32, 4, along_k=True)) == 4
        sliced = blocks.rtn(weight.T, threads=2, **options)
    finally:
        blocks.CHUNK_ELEMENTS = old
    np.testing.assert_array_equal(whole.codes, sliced.codes)
    np.testing.assert_array_equal(whole.scales, sliced.scales)
    np.testing.assert_array_equal(whole.zero_point_values(), sliced.zero_point_values())


@pytest.mark.parametrize("bad", [{"bits": 3}, {"block": 24}, {"block": 1}])
def test_bad_bits_or_block_raise(rng, bad):
    options = {"bits": 4, "block": 32, "symmetric": True} | bad
    with pytest.raises(ValueError):
        blocks.rtn(rng.standard_normal((2, 32)).astype(np.float32), **options)


def test_per_channel_int8(rng):
    rows = rng.standard_normal((5, 70)).astype(np.float32)
    rows[2] = 0
    q, scales = blocks.per_channel_int8(rows)
    assert q.dtype == np.int8 and np.abs(q).max() == 127
    assert np.all(np.abs(q * scales[:, None] - rows) <= scales[:, None] / 2 + 1e-7)
    assert np.all(q[2] == 0)
