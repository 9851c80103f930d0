"""Packing layouts: round trips, and ORT's own kernels reproduce x @ dequantized(W)."""

from __future__ import annotations

import numpy as np
import pytest
from onnx import TensorProto, helper, numpy_helper
from quant_reference import session

from onnxopt.quant import blocks, kquant, packing

FLOAT = TensorProto.FLOAT


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_codes_round_trip(rng, bits):
    codes = rng.integers(0, 2**bits, size=(3, 5, 32), dtype=np.uint8)
    packed = packing.pack_codes(codes, bits)
    assert packed.shape == (3, 5, 32 * bits // 8) and packed.dtype == np.uint8
    np.testing.assert_array_equal(packing.unpack_codes(packed, bits), codes)


def test_four_bit_codes_low_nibble_first():
    packed = packing.pack_codes(np.array([[1, 2, 3, 4]], np.uint8), 4)
    np.testing.assert_array_equal(packed, [[0x21, 0x43]])


@pytest.mark.parametrize("k_blocks", [1, 2, 3, 7])
@pytest.mark.parametrize("bits", [4, 8])
def test_zero_points_round_trip(rng, bits, k_blocks):
    zps = rng.integers(0, 2**bits, size=(4, k_blocks), dtype=np.uint8)
    packed = packing.pack_zero_points(zps, bits)
    assert packed.shape == (4, -(-k_blocks * bits // 8))
    np.testing.assert_array_equal(packing.unpack_zero_points(packed, bits, k_blocks), zps)


def test_odd_zero_point_row_padded_with_the_default():
    np.testing.assert_array_equal(packing.pack_zero_points(np.array([[3]], np.uint8), 4), [[0x83]])


@pytest.mark.parametrize("signed", [True, False])
def test_flat_4bit_round_trip(rng, signed):
    low, high = (-8, 8) if signed else (0, 16)
    values = rng.integers(low, high, size=(5, 3)).astype(np.int8 if signed else np.uint8)
    packed = packing.pack_4bit_flat(values)
    assert packed.size == 8  # 15 values, the last byte half padding
    np.testing.assert_array_equal(packing.unpack_4bit_flat(packed, (5, 3), signed), values)


def test_flat_4bit_matches_onnx(rng):
    values = rng.integers(-8, 8, size=(7, 3)).astype(np.int8)
    tensor = helper.make_tensor(
        "t", TensorProto.INT4, [7, 3], packing.pack_4bit_flat(values).tobytes(), True
    )
    np.testing.assert_array_equal(numpy_helper.to_array(tensor), values)


def test_blockwise_round_trips_through_matmul_nbits(rng):
    quant = kquant.kquant(
        rng.standard_normal((6, 80)).astype(np.float32), bits=4, block=32, symmetric=False
    )
    tensors = packing.matmul_nbits(quant)
    back = packing.from_matmul_nbits(
        tensors["B"], tensors["scales"], tensors["zero_points"], bits=4, k=80
    )
    np.testing.assert_array_equal(back.dequantize(), quant.dequantize())


def _matmul_nbits_run(quant: blocks.Blockwise, x: np.ndarray, accuracy_level: int = 0):
    tensors = packing.matmul_nbits(quant)
    names = ["x", "B", "scales"] + (["zero_points"] if "zero_points" in tensors else [])
    node = helper.make_node(
        "MatMulNBits",
        names,
        ["y"],
        domain="com.microsoft",
        K=quant.k,
        N=quant.n,
        bits=quant.bits,
        block_size=quant.block,
        accuracy_level=accuracy_level,
    )
    inits = [numpy_helper.from_array(tensors[name], name) for name in names[1:]]
    sess = session(
        [node],
        [helper.make_tensor_value_info("x", FLOAT, [None, quant.k])],
        [helper.make_tensor_value_info("y", FLOAT, [None, quant.n])],
        inits,
    )
    return sess.run(None, {"x": x})[0]


@pytest.mark.parametrize("k", [128, 100])
@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("block", [16, 32, 64, 128])
@pytest.mark.parametrize("bits", [4, 8])
def test_ort_matmul_nbits_matches_dequantized_weights(rng, bits, block, symmetric, k):
    rows = rng.standard_normal((24, k)).astype(np.float32)
    quant = kquant.kquant(rows, bits=bits, block=block, symmetric=symmetric)
    x = rng.standard_normal((5, k)).astype(np.float32)
    expected = x @ quant.dequantize().T
    np.testing.assert_allclose(_matmul_nbits_run(quant, x), expected, rtol=1e-5, atol=1e-4)


def test_ort_matmul_nbits_accuracy_level_4_quantizes_activations_only(rng):
    quant = blocks.rtn(
        rng.standard_normal((32, 256)).astype(np.float32), bits=4, block=32, symmetric=True
    )
    x = rng.standard_normal((8, 256)).astype(np.float32)
    expected = x @ quant.dequantize().T
    got = _matmul_nbits_run(quant, x, accuracy_level=4)
    rel = np.linalg.norm(got - expected) / np.linalg.norm(expected)
    assert 0 < rel < 0.02


def _dequantize_linear_run(quant: blocks.Blockwise) -> np.ndarray:
    tensors = packing.dequantize_linear_int4(quant)
    k, n, kb = quant.k, quant.n, quant.k_blocks
    dtype = TensorProto.INT4 if tensors["signed"] else TensorProto.UINT4
    inits = [
        helper.make_tensor("q", dtype, [k, n], tensors["data"].tobytes(), raw=True),
        numpy_helper.from_array(tensors["scales"], "s"),
    ]
    if "zero_points" in tensors:
        inits.append(
            helper.make_tensor(
                "z", TensorProto.UINT4, [kb, n], tensors["zero_points"].tobytes(), raw=True
            )
        )
    node = helper.make_node(
        "DequantizeLinear", [i.name for i in inits], ["w"], axis=0, block_size=quant.block
    )
    sess = session([node], [], [helper.make_tensor_value_info("w", FLOAT, [k, n])], inits)
    return sess.run(None, {})[0]


@pytest.mark.parametrize("k", [64, 100])
@pytest.mark.parametrize("symmetric", [True, False])
def test_ort_blocked_dequantize_linear_int4(rng, symmetric, k):
    quant = kquant.kquant(
        rng.standard_normal((6, k)).astype(np.float32), bits=4, block=32, symmetric=symmetric
    )
    np.testing.assert_allclose(_dequantize_linear_run(quant), quant.dequantize().T, rtol=1e-6)


def test_dequantize_linear_needs_4_bits(rng):
    quant = blocks.rtn(
        rng.standard_normal((2, 32)).astype(np.float32), bits=8, block=32, symmetric=True
    )
    with pytest.raises(ValueError):
        packing.dequantize_linear_int4(quant)


_PROTO_TYPES = {
    "int4": TensorProto.INT4,
    "uint4": TensorProto.UINT4,
    "int8": TensorProto.INT8,
    "uint8": TensorProto.UINT8,
}


def _table_tensor(name: str, data_type: str, shape: list[int], data: np.ndarray):
    if data_type in ("int4", "uint4"):
        return helper.make_tensor(name, _PROTO_TYPES[data_type], shape, data.tobytes(), raw=True)
    return numpy_helper.from_array(data, name)  # 8-bit arrays carry their own shape


def _gather_block_quantized_run(
    quant: blocks.Blockwise, ids: np.ndarray, standard: bool = False
) -> np.ndarray:
    """ORT's GatherBlockQuantized on the tensors of ``packing.gather_block_quantized``."""
    tensors = packing.gather_block_quantized(quant, standard=standard)
    kind = tensors["data_type"]
    inits = [
        _table_tensor("q", kind, [quant.n, quant.k], tensors["data"]),
        numpy_helper.from_array(tensors["scales"], "s"),
    ]
    if "zero_points" in tensors:
        inits.append(_table_tensor("z", kind, [quant.n, quant.k_blocks], tensors["zero_points"]))
    names = ["q", "ids"] + [i.name for i in inits[1:]]
    node = helper.make_node(
        "GatherBlockQuantized",
        names,
        ["y"],
        domain="com.microsoft",
        gather_axis=0,
        quantize_axis=1,
        block_size=quant.block,
        bits=quant.bits,
    )
    sess = session(
        [node],
        [helper.make_tensor_value_info("ids", TensorProto.INT64, [None])],
        [helper.make_tensor_value_info("y", FLOAT, None)],
        inits,
    )
    return sess.run(None, {"ids": ids})[0]


@pytest.mark.parametrize("hidden", [64, 40, 33])
@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("block", [16, 32])
@pytest.mark.parametrize(("bits", "standard"), [(4, False), (4, True), (8, False)])
def test_ort_gather_block_quantized_matches_dequantized_table(
    rng, bits, standard, block, symmetric, hidden
):
    table = rng.standard_normal((9, hidden)).astype(np.float32)
    quant = kquant.kquant(table, bits=bits, block=block, symmetric=symmetric)
    ids = np.array([0, 8, 3, 3, -1], np.int64)  # negative counts from the end, as in Gather
    got = _gather_block_quantized_run(quant, ids, standard)
    np.testing.assert_array_equal(got, quant.dequantize()[ids])


def _codes(rows: list[list[int]], bits: int = 4, k: int | None = None) -> blocks.Blockwise:
    codes = np.array(rows, np.uint8)[:, None, :]
    scales = np.ones((len(rows), 1), np.float32)
    return blocks.Blockwise(codes, scales, None, bits, k or codes.shape[2])


def test_gather_block_quantized_layouts():
    even = packing.gather_block_quantized(_codes([[0, 15, 8, 1], [7, 9, 8, 8]]))
    assert even["data_type"] == "uint8" and "zero_points" not in even
    np.testing.assert_array_equal(even["data"], [[0xF0, 0x18], [0x97, 0x88]])  # low nibble first
    # odd H (the block's padding dropped), or the standard layout: INT4 q - 8, flat
    odd = packing.gather_block_quantized(_codes([[0, 15, 8, 1], [7, 9, 8, 8]], k=3))
    assert odd["data_type"] == "int4"
    np.testing.assert_array_equal(odd["data"], [0x78, 0xF0, 0x01])  # [-8, 7, 0 | -1, 1, 0]
    signed = packing.gather_block_quantized(_codes([[0, 240]], bits=8), standard=True)
    assert signed["data_type"] == "int8" and signed["data"].tolist() == [[-128, 112]]
    assert packing.gather_block_quantized(_codes([[0, 240]], bits=8))["data"].tolist() == [[0, 240]]
