"""quant-embeddings: Gather tables to 4/8-bit blocks, as GatherBlockQuantized or blocked QDQ."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import onnxruntime as ort
import pytest
from conftest import FLOAT, GOLDEN, INT64, make_model, op_types, run
from onnx import helper

from onnxopt import model_io, optimize, spec
from onnxopt.errors import UsageError
from onnxopt.passes.quant_embeddings import QuantEmbeddingsPass
from onnxopt.passes.quant_int4 import QuantInt4Pass
from onnxopt.quant import blocks, kquant

V, H = 120, 64
IDS = np.array([[0, 7, V - 1], [3, 3, -2]], np.int64)


def _embedding(rng, v=V, h=H, dtype=np.float32, **gather):
    table = rng.standard_normal((v, h)).astype(dtype)
    node = helper.make_node("Gather", ["table", "ids"], ["y"], name="embed", **gather)
    elem = helper.np_dtype_to_tensor_dtype(np.dtype(dtype))
    model = make_model([node], {"ids": (INT64, [2, 3])}, {"y": (elem, None)}, {"table": table})
    return model, table


def _reference(table, bits=4, block=32, symmetric=True, algo="kquant"):
    quantize = blocks.rtn if algo == "rtn" else kquant.kquant
    return quantize(table, bits=bits, block=block, symmetric=symmetric).dequantize()


@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize(("bits", "width", "zp_width"), [(4, H // 2, 1), (8, H, 2)])
def test_gather_becomes_gather_block_quantized(rng, bits, width, zp_width, symmetric):
    model, table = _embedding(rng)
    result = QuantEmbeddingsPass(bits=bits, symmetric=symmetric)(model)
    assert result.modified and result.counts == {"gather": 1}
    assert op_types(model) == ["GatherBlockQuantized"]
    node = model.graph.node(0)
    assert node.domain == "com.microsoft" and node.name == "embed"
    attributes = {k: a.value for k, a in node.attributes.items()}
    assert attributes == {"gather_axis": 0, "quantize_axis": 1, "block_size": 32, "bits": bits}
    data = node.inputs[0].const_value  # uint8; 4 bits: two codes a byte along hidden
    assert data.dtype == ir.DataType.UINT8 and list(data.shape) == [V, width]
    assert list(node.inputs[2].const_value.shape) == [V, H // 32]
    if symmetric:
        assert len(node.inputs) == 3
    else:
        assert list(node.inputs[3].const_value.shape) == [V, zp_width]
    assert "table" not in model.graph.initializers
    expected = _reference(table, bits=bits, symmetric=symmetric)[IDS]
    np.testing.assert_array_equal(run(model, {"ids": IDS})["y"], expected)


def test_layer_record_and_sizes(rng):
    model, table = _embedding(rng)
    (layer,) = QuantEmbeddingsPass()(model).layers
    error = np.linalg.norm(_reference(table) - table) / np.linalg.norm(table)
    assert layer["name"] == "table" and layer["nodes"] == ["embed"]
    assert layer["precision"] == "int4" and layer["format"] == "gbq"
    assert layer["shape"] == [V, H] and layer["bytes_before"] == table.nbytes
    assert layer["bytes_after"] == V * H // 2 + V * (H // 32) * 4  # codes + float32 scales
    assert layer["rel_error"] == pytest.approx(error, rel=1e-4) and 0 < error < 0.1


@pytest.mark.parametrize(("symmetric", "data_type"), [(True, "INT4"), (False, "UINT4")])
def test_odd_hidden_size_uses_4bit_types(rng, symmetric, data_type):
    model, table = _embedding(rng, h=33)
    QuantEmbeddingsPass(block=16, min_elements=0, symmetric=symmetric)(model)
    data = model.graph.node(0).inputs[0].const_value
    assert data.dtype == ir.DataType[data_type] and list(data.shape) == [V, 33]
    expected = _reference(table, block=16, symmetric=symmetric)[IDS]
    np.testing.assert_array_equal(run(model, {"ids": IDS})["y"], expected)


@pytest.mark.parametrize(("bits", "symmetric"), [(4, True), (4, False), (8, True), (8, False)])
def test_qdq_format_matches_gather_block_quantized(rng, bits, symmetric):
    model, _ = _embedding(rng)
    gbq = model.clone()
    result = QuantEmbeddingsPass(format="qdq", bits=bits, symmetric=symmetric)(model)
    assert result.counts == {"opset": 1, "gather": 1} and model.opset_imports[""] == 21
    assert op_types(model) == ["DequantizeLinear", "Gather"]
    dq = model.graph.node(0)
    assert dq.attributes["axis"].value == 1 and dq.attributes["block_size"].value == 32
    if bits == 8 and symmetric:  # DequantizeLinear's default zero point is 0: signed codes
        assert dq.inputs[0].const_value.dtype == ir.DataType.INT8
    QuantEmbeddingsPass(bits=bits, symmetric=symmetric)(gbq)
    np.testing.assert_array_equal(run(model, {"ids": IDS})["y"], run(gbq, {"ids": IDS})["y"])


def test_table_read_by_two_gathers_is_quantized_once(rng):
    table = rng.standard_normal((V, H)).astype(np.float32)
    nodes = [
        helper.make_node("Gather", ["table", "ids"], ["a"], name="enc"),
        helper.make_node("Gather", ["table", "ids2"], ["b"], name="dec"),
    ]
    inputs = {"ids": (INT64, [2, 3]), "ids2": (INT64, [4])}
    model = make_model(nodes, inputs, {"a": (FLOAT, None), "b": (FLOAT, None)}, {"table": table})
    result = QuantEmbeddingsPass()(model)
    assert result.counts == {"gather": 2} and len(result.layers) == 1
    first, second = model.graph
    assert first.inputs[0] is second.inputs[0] and len(model.graph.initializers) == 2
    ids2 = np.array([5, 0, 1, V - 1], np.int64)
    out = run(model, {"ids": IDS, "ids2": ids2})
    np.testing.assert_array_equal(out["b"], _reference(table)[ids2])


def _tied(rng):
    """GPT-2 style: ``wte`` is the embedding and, transposed, the LM head."""
    table = rng.standard_normal((V, H)).astype(np.float32)
    nodes = [
        helper.make_node("Gather", ["wte", "ids"], ["h"], name="embed"),
        helper.make_node("Transpose", ["wte"], ["wte_t"], perm=[1, 0]),
        helper.make_node("MatMul", ["h", "wte_t"], ["logits"], name="lm_head"),
    ]
    outputs = {"h": (FLOAT, None), "logits": (FLOAT, None)}
    return make_model(nodes, {"ids": (INT64, [2, 3])}, outputs, {"wte": table}), table


def test_tied_table_stays_float_by_default(rng):
    model, _ = _tied(rng)
    result = QuantEmbeddingsPass()(model)
    assert not result.modified and result.counts == {"skipped-tied": 1}
    assert "lm_head" not in result.misses[0] and "Transpose" in result.misses[0]
    assert op_types(model) == ["Gather", "Transpose", "MatMul"]


def test_tied_copy_quantizes_the_gather_and_keeps_the_head(rng):
    model, table = _tied(rng)
    result = QuantEmbeddingsPass(tied="copy")(model)
    assert result.counts == {"gather": 1, "tied-kept": 1} and "wte" in model.graph.initializers
    assert any("float tables kept" in note for note in result.notes)
    out = run(model, {"ids": IDS})
    dequantized = _reference(table)[IDS]
    np.testing.assert_array_equal(out["h"], dequantized)
    np.testing.assert_allclose(out["logits"], dequantized @ table.T, rtol=1e-5, atol=1e-4)
    QuantInt4Pass(accuracy_level=0)(model)  # the head too: the float table goes
    assert "wte" not in model.graph.initializers
    assert op_types(model) == ["GatherBlockQuantized", "MatMulNBits"]


def test_skips_are_counted_with_reasons(rng):
    big = rng.standard_normal((V, H)).astype(np.float32)
    nodes = [
        helper.make_node("Gather", ["big", "ids"], ["a"], name="columns", axis=1),
        helper.make_node("Gather", ["cube", "ids"], ["b"], name="cube"),
        helper.make_node("Gather", ["small", "ids"], ["c"], name="small"),
        helper.make_node("Gather", ["big2", "ids"], ["d"], name="/blocks.0/pos"),
        helper.make_node("Gather", ["fed", "ids"], ["e"], name="fed"),
    ]
    inits = {
        "big": big,
        "cube": rng.standard_normal((V, 4, H)).astype(np.float32),
        "small": big[:8],
        "big2": big,
        "fed": big,
    }
    inputs = {"ids": (INT64, [2, 3]), "fed": (FLOAT, [V, H])}
    model = make_model(nodes, inputs, {o: (FLOAT, None) for o in "abcde"}, inits)
    result = QuantEmbeddingsPass(exclude=["*pos"])(model)
    assert not result.modified
    assert result.counts == {
        "skipped-axis": 1,
        "skipped-shape": 1,
        "skipped-small": 1,
        "skipped-excluded": 1,
        "skipped-input": 1,
    }
    assert len(result.misses) == 5 and any(
        m.startswith("columns: Gather on axis 1") for m in result.misses
    )
    result = QuantEmbeddingsPass(min_elements=0, exclude=["big2"])(model)  # a table name too
    assert result.counts["gather"] == 1 and result.counts["skipped-excluded"] == 1


def test_float16_table_gives_float16_scales_and_output(rng):
    model, table = _embedding(rng, dtype=np.float16)
    QuantEmbeddingsPass()(model)
    scales = model.graph.node(0).inputs[2].const_value
    assert scales.dtype == ir.DataType.FLOAT16
    y = run(model, {"ids": IDS})["y"]
    assert y.dtype == np.float16
    expected = _reference(table.astype(np.float32))[IDS]
    np.testing.assert_allclose(y.astype(np.float32), expected, rtol=2e-3, atol=2e-3)


def test_options_change_the_output(rng):
    def tensors(**options):
        model, _ = _embedding(rng)
        QuantEmbeddingsPass(**options)(model)
        node = model.graph.node(0)
        return node, [v.const_value.numpy() for v in node.inputs if v.const_value is not None]

    _, default = tensors()
    _, rtn = tensors(algo="rtn")
    assert not all(np.array_equal(a, b) for a, b in zip(default, rtn, strict=True))
    node, (_, scales) = tensors(block=64)
    assert node.attributes["block_size"].value == 64 and scales.shape == (V, 1)
    model, _ = _embedding(rng)
    assert not QuantEmbeddingsPass(min_elements=V * H + 1)(model).modified


@pytest.mark.parametrize(
    ("options", "message"),
    [({"bits": "2"}, "bits"), ({"block": "8"}, "block"), ({"tied": "share"}, "tied")],
)
def test_bad_options(options, message):
    with pytest.raises(UsageError, match=message):
        QuantEmbeddingsPass.from_options(options)


def test_spec_round_trip():
    text = "quant-embeddings(bits=8,algo=rtn,format=qdq,tied=copy,exclude=[*pos*])"
    (built,) = spec.build(text)
    assert isinstance(built, QuantEmbeddingsPass) and built.exclude == ["*pos*"]
    assert built.to_spec() == text


def test_external_table_is_read_from_its_file(rng, tmp_path):
    model, table = _embedding(rng, v=512)
    path = model_io.save(model, tmp_path / "m.onnx", external_data=True)
    lazy = model_io.load(path)
    QuantEmbeddingsPass()(lazy)
    assert "table" not in lazy.graph.initializers
    expected = _reference(table)[IDS]
    np.testing.assert_array_equal(run(lazy, {"ids": IDS})["y"], expected)


@pytest.mark.parametrize(
    ("name", "tables", "bits"),
    # 4-bit llama: logits cosine 0.985 < 0.99 (random tiny model, hidden 32): rolled back
    [("bert_ts", 3, 4), ("gpt2_dynamo", 2, 4), ("gpt2_ts", 2, 4), ("llama_ts", 1, 8)],
)
def test_zoo_embeddings_verified_in_the_pipeline(name, tables, bits):
    zoo = GOLDEN / "zoo"
    passes = [QuantEmbeddingsPass(min_elements=0, bits=bits)]
    model, report = optimize(zoo / f"{name}.onnx", passes, golden=zoo / f"{name}.golden")
    entry = report.passes[0]
    assert entry.status == "ok" and entry.counts == {"gather": tables}
    assert entry.metrics["passed"] and entry.metrics["cosine"] > 0.99
    assert len(entry.layers) == tables
    # codes and one float32 scale per 32 values
    assert sum(r["bytes_after"] for r in entry.layers) == (bits + 1) / 32 * sum(
        r["bytes_before"] for r in entry.layers
    )
    gathers = [n for n in model.graph.all_nodes() if n.op_type == "Gather"]
    assert all(n.inputs[0].const_value is None for n in gathers)  # no float table left


def test_gather_inside_an_if_branch(rng):
    table = rng.standard_normal((V, H)).astype(np.float32)
    branch = helper.make_graph(
        [helper.make_node("Gather", ["table", "ids"], ["t"], name="inner")],
        "then",
        [],
        [helper.make_tensor_value_info("t", FLOAT, [2, 3, H])],
    )
    other = helper.make_graph(
        [helper.make_node("Identity", ["zeros"], ["e"])],
        "else",
        [],
        [helper.make_tensor_value_info("e", FLOAT, [2, 3, H])],
    )
    node = helper.make_node("If", ["cond"], ["y"], then_branch=branch, else_branch=other)
    inits = {"table": table, "zeros": np.zeros((2, 3, H), np.float32)}
    inputs = {"ids": (INT64, [2, 3]), "cond": (helper.np_dtype_to_tensor_dtype(np.dtype(bool)), [])}
    model = make_model([node], inputs, {"y": (FLOAT, [2, 3, H])}, inits)
    assert QuantEmbeddingsPass()(model).counts == {"gather": 1}
    assert "table" not in model.graph.initializers
    y = run(model, {"ids": IDS, "cond": np.array(True)})["y"]
    np.testing.assert_array_equal(y, _reference(table)[IDS])


def test_ort_full_optimizations_give_the_same_lookups(rng):
    """The verifier runs ORT with its optimizations off; users run with them on."""
    model, _ = _embedding(rng)
    QuantEmbeddingsPass(symmetric=False)(model)
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    proto = ir.serde.serialize_model(model)
    session = ort.InferenceSession(proto.SerializeToString(), options)
    np.testing.assert_array_equal(session.run(None, {"ids": IDS})[0], run(model, {"ids": IDS})["y"])
