"""quant-int4: MatMul/Gemm weights to 4-bit blocks, as MatMulNBits or INT4 DequantizeLinear."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import pytest
from conftest import FLOAT, WHISPER, WHISPER_GOLDEN, make_model, op_types, run
from onnx import helper

from onnxopt import model_io, optimize, spec
from onnxopt.errors import UsageError
from onnxopt.passes import quant_int4
from onnxopt.passes.quant_int4 import QuantInt4Pass
from onnxopt.quant import blocks, kquant

K, N = 96, 64


def _matmul(rng, k=K, n=N, transposed=False, name="mm"):
    w = rng.standard_normal((n, k) if transposed else (k, n)).astype(np.float32)
    nodes = [helper.make_node("MatMul", ["x", "wt" if transposed else "w"], ["y"], name=name)]
    if transposed:
        nodes.insert(0, helper.make_node("Transpose", ["w"], ["wt"], perm=[1, 0]))
    return make_model(nodes, {"x": (FLOAT, [2, 5, k])}, {"y": (FLOAT, [2, 5, n])}, {"w": w}), w


def _feeds(rng, k=K, shape=(2, 5)):
    return {"x": rng.standard_normal((*shape, k)).astype(np.float32)}


def _reference(w_kn: np.ndarray, **options) -> np.ndarray:
    """W as the pass quantizes it by default (k-quant, magnitude importance), dequantized."""
    quant = kquant.kquant(w_kn.T, bits=4, block=32, symmetric=True, importance="magnitude")
    if options.get("algo") == "rtn":
        quant = blocks.rtn(w_kn.T, bits=4, block=32, symmetric=True)
    return quant.dequantize().T


def test_matmul_becomes_matmul_nbits(rng):
    model, w = _matmul(rng)
    feeds = _feeds(rng)
    result = QuantInt4Pass(accuracy_level=0)(model)
    assert result.modified and result.counts == {"matmul": 1}
    assert op_types(model) == ["MatMulNBits"]
    node = next(iter(model.graph))
    assert node.attributes["K"].value == K and node.attributes["N"].value == N
    assert node.attributes["block_size"].value == 32 and node.attributes["bits"].value == 4
    assert "w" not in model.graph.initializers
    y = run(model, feeds)["y"]
    np.testing.assert_allclose(y, feeds["x"] @ _reference(w), rtol=1e-4, atol=1e-4)
    assert np.linalg.norm(y - feeds["x"] @ w) / np.linalg.norm(feeds["x"] @ w) < 0.1


def test_transposed_weight_is_read_as_rows(rng):
    model, w = _matmul(rng, transposed=True)
    feeds = _feeds(rng)
    result = QuantInt4Pass()(model)
    assert result.counts == {"matmul-transposed": 1}
    assert op_types(model) == ["MatMulNBits"]
    np.testing.assert_allclose(run(model, feeds)["y"], feeds["x"] @ _reference(w.T), atol=1e-4)


def test_shared_weight_quantized_once(rng):
    w = rng.standard_normal((K, N)).astype(np.float32)
    nodes = [
        helper.make_node("MatMul", ["x", "w"], ["a"], name="first"),
        helper.make_node("MatMul", ["x", "w"], ["b"], name="second"),
        helper.make_node("Add", ["a", "b"], ["y"]),
    ]
    model = make_model(nodes, {"x": (FLOAT, [3, K])}, {"y": (FLOAT, [3, N])}, {"w": w})
    result = QuantInt4Pass()(model)
    assert result.counts == {"matmul": 2}
    packed = [n.inputs[1] for n in model.graph if n.op_type == "MatMulNBits"]
    assert packed[0] is packed[1] and len(model.graph.initializers) == 2  # B and scales


def _gemm(rng, *, trans_b: int, c_shape, alpha=1.0, beta=1.0, c_constant=True):
    b = rng.standard_normal((N, K) if trans_b else (K, N)).astype(np.float32)
    inits = {"b": b}
    inputs = {"x": (FLOAT, [4, K])}
    c = rng.standard_normal(c_shape).astype(np.float32)
    if c_constant:
        inits["c"] = c
    else:
        inputs["c"] = (FLOAT, list(c_shape))
    node = helper.make_node(
        "Gemm", ["x", "b", "c"], ["y"], transB=trans_b, alpha=alpha, beta=beta, name="gemm"
    )
    model = make_model([node], inputs, {"y": (FLOAT, [4, N])}, inits)
    w_kn = b.T if trans_b else b
    return model, w_kn, c


@pytest.mark.parametrize(
    ("trans_b", "c_shape", "alpha", "beta", "c_constant", "ops"),
    [
        (0, (N,), 1.0, 1.0, True, ["MatMulNBits"]),
        (1, (1, N), 0.5, 2.0, True, ["MatMulNBits"]),
        (1, (4, N), 1.0, 1.0, True, ["MatMulNBits", "Add"]),
        (0, (4, N), 1.5, 0.5, False, ["MatMulNBits", "Mul", "Add"]),
    ],
)
def test_gemm(rng, trans_b, c_shape, alpha, beta, c_constant, ops):
    model, w_kn, c = _gemm(
        rng, trans_b=trans_b, c_shape=c_shape, alpha=alpha, beta=beta, c_constant=c_constant
    )
    x = rng.standard_normal((4, K)).astype(np.float32)
    feeds = {"x": x} if c_constant else {"x": x, "c": c}
    result = QuantInt4Pass(accuracy_level=0)(model)
    assert result.counts == {"gemm": 1} and op_types(model) == ops
    expected = alpha * x @ _reference(w_kn) + beta * c
    np.testing.assert_allclose(run(model, feeds)["y"], expected, rtol=1e-4, atol=1e-4)


def test_gemm_trans_a_is_skipped(rng):
    b = rng.standard_normal((K, N)).astype(np.float32)
    node = helper.make_node("Gemm", ["x", "b"], ["y"], transA=1, name="g")
    model = make_model([node], {"x": (FLOAT, [K, 4])}, {"y": (FLOAT, [4, N])}, {"b": b})
    result = QuantInt4Pass()(model)
    assert not result.modified and result.counts == {"skipped-gemm-transA": 1}
    assert op_types(model) == ["Gemm"]


def test_small_excluded_and_odd_weights_stay_float(rng):
    small = rng.standard_normal((16, 16)).astype(np.float32)
    big = rng.standard_normal((K, N)).astype(np.float32)
    cube = rng.standard_normal((1, K, N)).astype(np.float32)
    nodes = [
        helper.make_node("MatMul", ["x16", "small"], ["a"], name="tiny"),
        helper.make_node("MatMul", ["x", "big"], ["b"], name="/blocks.0/attn/q"),
        helper.make_node("MatMul", ["x", "cube"], ["c"], name="batched"),
        helper.make_node("MatMul", ["x", "x2"], ["d"], name="activations"),
    ]
    inputs = {"x16": (FLOAT, [2, 16]), "x": (FLOAT, [2, K]), "x2": (FLOAT, [K, N])}
    outputs = {o: (FLOAT, None) for o in "abcd"}
    model = make_model(nodes, inputs, outputs, {"small": small, "big": big, "cube": cube})
    result = QuantInt4Pass(exclude=["*attn*"])(model)
    assert not result.modified
    assert result.counts == {"skipped-small": 1, "skipped-excluded": 1, "skipped-shape": 1}
    assert len(result.misses) == 3 and any("tiny" in m for m in result.misses)
    result = QuantInt4Pass(min_elements=0)(model)
    assert result.counts == {"matmul": 2, "skipped-shape": 1}


def test_ops_option_limits_the_targets(rng):
    model, _, _ = _gemm(rng, trans_b=0, c_shape=(N,))
    assert not QuantInt4Pass(ops=["MatMul"])(model).modified
    assert QuantInt4Pass(ops=["Gemm"])(model).counts == {"gemm": 1}


def test_options_change_the_output(rng):
    def quantized(**options):
        model, _ = _matmul(rng)
        QuantInt4Pass(**options)(model)
        node = next(iter(model.graph))
        return node, {v.name: v.const_value.numpy() for v in model.graph.initializers.values()}

    node, default = quantized()
    assert len(node.inputs) == 3 and node.attributes["accuracy_level"].value == 4
    _, rtn = quantized(algo="rtn")
    assert not np.array_equal(default["w_q4"], rtn["w_q4"])
    _, uniform = quantized(importance="uniform")
    assert not np.array_equal(default["w_scales"], uniform["w_scales"])
    node, _ = quantized(symmetric=False)
    assert node.inputs[3].name == "w_zp"
    node, tensors = quantized(block=64, accuracy_level=0)
    assert node.attributes["block_size"].value == 64 and "accuracy_level" not in node.attributes
    assert tensors["w_q4"].shape == (N, 2, 32)


@pytest.mark.parametrize("symmetric", [True, False])
def test_qdq_format_matches_matmul_nbits(rng, symmetric):
    feeds = _feeds(rng)
    model, _ = _matmul(rng, transposed=True)
    nbits = model.clone()
    result = QuantInt4Pass(format="qdq", symmetric=symmetric)(model)
    assert result.counts == {"opset": 1, "matmul-transposed": 1}
    assert model.opset_imports[""] == 21 and model.ir_version >= 10
    assert op_types(model) == ["DequantizeLinear", "MatMul"]
    data = model.graph.node(0).inputs[0].const_value
    assert data.dtype == (ir.DataType.INT4 if symmetric else ir.DataType.UINT4)
    QuantInt4Pass(symmetric=symmetric, accuracy_level=0)(nbits)
    np.testing.assert_allclose(run(model, feeds)["y"], run(nbits, feeds)["y"], atol=1e-4)


def test_qdq_gemm_trans_b_reads_k_by_n(rng):
    model, w_kn, c = _gemm(rng, trans_b=1, c_shape=(N,))
    x = rng.standard_normal((4, K)).astype(np.float32)
    QuantInt4Pass(format="qdq")(model)
    gemm = next(n for n in model.graph if n.op_type == "Gemm")
    assert gemm.attributes["transB"].value == 0
    np.testing.assert_allclose(run(model, {"x": x})["y"], x @ _reference(w_kn) + c, atol=1e-4)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"block": "24"}, "block"),
        ({"accuracy_level": "7"}, "accuracy_level"),
        ({"algo": "gptq"}, "algo"),
        ({"ops": ["ConvTranspose"]}, "ops"),
    ],
)
def test_bad_options(options, message):
    with pytest.raises(UsageError, match=message):
        QuantInt4Pass.from_options(options)


def test_spec_round_trip():
    text = "quant-int4(exclude=[*attn*,/blocks.0/*],algo=rtn,format=qdq)"
    (built,) = spec.build(text)
    assert isinstance(built, QuantInt4Pass) and built.exclude == ["*attn*", "/blocks.0/*"]
    assert built.to_spec() == text


def test_external_data_is_streamed_and_released(rng, tmp_path):
    model, w = _matmul(rng, k=256, n=128)
    path = model_io.save(model, tmp_path / "m.onnx", external_data=True)
    lazy = model_io.load(path)
    tensor = lazy.graph.initializers["w"].const_value
    assert isinstance(tensor, ir.ExternalTensor)
    QuantInt4Pass()(lazy)
    assert "w" not in lazy.graph.initializers and tensor.raw is None  # the map is closed
    out = model_io.save(lazy, tmp_path / "q.onnx")
    feeds = _feeds(rng, k=256)
    y = run(model_io.load(out), feeds)["y"]
    assert np.linalg.norm(y - feeds["x"] @ w) / np.linalg.norm(feeds["x"] @ w) < 0.1


def test_whisper_encoder_verified_in_the_pipeline():
    _, report = optimize(WHISPER, [QuantInt4Pass()], golden=WHISPER_GOLDEN)
    entry = report.passes[0]
    assert entry.status == "ok" and entry.counts == {"matmul": 12, "conv": 2}
    assert entry.metrics["cosine"] > 0.995
    # MatMul weights at 4 bits and the front-end Convs at 8 take it under the 0.27x goal.
    assert entry.bytes_after < 0.27 * entry.bytes_before
    convs = [layer for layer in entry.layers if layer["precision"] == "int8"]
    assert len(convs) == 2 and all(0 < layer["rel_error"] < 0.01 for layer in convs)


@pytest.mark.parametrize("opset", [11, 17])
def test_conv_weight_becomes_int8_per_channel(rng, opset):
    w = rng.standard_normal((16, 8, 3)).astype(np.float32)
    w[3] *= 100  # channels of very different scale: one scale each
    nodes = [helper.make_node("Conv", ["x", "w"], ["y"], name="conv", pads=[1, 1])]
    model = make_model(
        nodes, {"x": (FLOAT, [2, 8, 20])}, {"y": (FLOAT, [2, 16, 20])}, {"w": w}, opset=opset
    )
    feeds = {"x": rng.standard_normal((2, 8, 20)).astype(np.float32)}
    before = run(model, feeds)["y"]
    result = QuantInt4Pass(min_elements=0)(model)
    assert result.counts == {"conv": 1} and op_types(model) == ["Cast", "Mul", "Conv"]
    q = next(iter(model.graph)).inputs[0].const_value.numpy()
    assert q.dtype == np.int8 and q.shape == w.shape
    after = run(model, feeds)["y"]
    assert np.linalg.norm(after - before) / np.linalg.norm(before) < 0.01
    assert QuantInt4Pass(min_elements=0, ops=["MatMul"])(model).counts == {}


def test_conv_weights_fold_back_when_ort_loads_the_model(tmp_path, rng):
    """ORT's constant folding turns Cast * scales back into a plain weight at load."""
    import onnxruntime as ort

    w = rng.standard_normal((16, 8, 3)).astype(np.float32)
    nodes = [helper.make_node("Conv", ["x", "w"], ["y"], name="conv")]
    model = make_model(nodes, {"x": (FLOAT, [2, 8, 20])}, {"y": (FLOAT, [2, 16, 18])}, {"w": w})
    QuantInt4Pass(min_elements=0)(model)
    options = ort.SessionOptions()
    options.optimized_model_filepath = str(tmp_path / "loaded.onnx")
    ort.InferenceSession(ir.to_proto(model).SerializeToString(), options)
    loaded = model_io.load(tmp_path / "loaded.onnx")
    assert [n.op_type for n in loaded.graph] == ["Conv"]


@pytest.mark.parametrize("fmt", ["matmulnbits", "qdq"])
def test_matmul_inside_an_if_branch(rng, fmt):
    w = rng.standard_normal((K, N)).astype(np.float32)
    branch = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["t"], name="inner")],
        "then",
        [],
        [helper.make_tensor_value_info("t", FLOAT, [2, N])],
    )
    other = helper.make_graph(
        [helper.make_node("Identity", ["zeros"], ["e"])],
        "else",
        [],
        [helper.make_tensor_value_info("e", FLOAT, [2, N])],
    )
    node = helper.make_node("If", ["cond"], ["y"], then_branch=branch, else_branch=other)
    inits = {"w": w, "zeros": np.zeros((2, N), np.float32)}
    inputs = {"x": (FLOAT, [2, K]), "cond": (helper.np_dtype_to_tensor_dtype(np.dtype(bool)), [])}
    model = make_model([node], inputs, {"y": (FLOAT, [2, N])}, inits)
    x = rng.standard_normal((2, K)).astype(np.float32)
    result = QuantInt4Pass(format=fmt, accuracy_level=0)(model)
    assert result.counts.get("matmul") == 1 and "w" not in model.graph.initializers
    y = run(model, {"x": x, "cond": np.array(True)})["y"]
    np.testing.assert_allclose(y, x @ _reference(w), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("fmt", ["matmulnbits", "qdq"])
def test_float16_weights_keep_float16_scales(rng, fmt):
    w = rng.standard_normal((K, N)).astype(np.float16)
    half = helper.np_dtype_to_tensor_dtype(np.dtype(np.float16))
    node = helper.make_node("MatMul", ["x", "w"], ["y"])
    model = make_model([node], {"x": (half, [4, K])}, {"y": (half, [4, N])}, {"w": w})
    assert QuantInt4Pass(format=fmt)(model).counts.get("matmul") == 1
    scales = next(v for n, v in model.graph.initializers.items() if n.endswith("_scales"))
    assert scales.const_value.dtype == ir.DataType.FLOAT16
    x = rng.standard_normal((4, K)).astype(np.float16)
    y = run(model, {"x": x})["y"].astype(np.float32)
    expected = x.astype(np.float32) @ w.astype(np.float32)
    assert np.linalg.norm(y - expected) / np.linalg.norm(expected) < 0.1


@pytest.mark.parametrize("trans_b", [0, 1])
def test_external_weights_read_in_slabs_give_the_same_model(rng, tmp_path, trans_b):
    """Slabs read from the data file (no memory map) quantize exactly as the array would."""
    model, _, _ = _gemm(rng, trans_b=trans_b, c_shape=(N,))
    in_memory = model.clone()
    path = model_io.save(model, tmp_path / "m.onnx", external_data=True)
    lazy = model_io.load(path)
    tensor = lazy.graph.initializers["b"].const_value
    rows = quant_int4.weight_rows(
        quant_int4.WeightSite(lazy.graph.initializers["b"], bool(trans_b))
    )
    assert isinstance(rows, quant_int4.FileRows) and rows.shape == (N, K)
    expected = np.array(tensor.numpy() if trans_b else tensor.numpy().T)
    np.testing.assert_array_equal(rows[slice(3, 9), slice(10, 50)], expected[3:9, 10:50])
    tensor.release()
    held = model_io.load(path)  # a view of a mapped weight held elsewhere does not break the pass
    view = held.graph.initializers["b"].const_value.numpy()
    assert QuantInt4Pass()(held).counts == {"gemm": 1} and view.shape
    QuantInt4Pass()(lazy)
    QuantInt4Pass()(in_memory)
    for name, value in in_memory.graph.initializers.items():
        np.testing.assert_array_equal(
            lazy.graph.initializers[name].const_value.numpy(), value.const_value.numpy()
        )
    assert tensor.raw is None  # never memory-mapped


@pytest.mark.parametrize("algo", ["rtn", "kquant"])
def test_each_weight_gets_a_layer_record_with_its_true_error(rng, algo):
    model, w = _matmul(rng, name="proj")
    result = QuantInt4Pass(algo=algo, accuracy_level=0)(model)
    (layer,) = result.layers
    dequantized = _reference(w, algo=algo)
    expected = np.linalg.norm(dequantized - w) / np.linalg.norm(w)
    assert layer["name"] == "w" and layer["nodes"] == ["proj"] and layer["precision"] == "int4"
    assert layer["shape"] == [K, N] and layer["bytes_before"] == w.nbytes
    assert 0 < layer["bytes_after"] < w.nbytes / 4
    assert layer["rel_error"] == pytest.approx(expected, rel=1e-4)
