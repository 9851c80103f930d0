"""fp16: float16 weights and compute, float32 IO, sensitive ops kept float32 behind Casts."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import onnxruntime as ort
import pytest
from conftest import FLOAT, WHISPER, WHISPER_GOLDEN, make_model, op_types, run
from onnx import helper

from onnxopt import model_io, optimize, spec
from onnxopt.passes.fp16 import Fp16Pass

F16 = ir.DataType.FLOAT16


def _mlp(rng, middle: str = "Relu", k: int = 16, n: int = 8):
    nodes = [
        helper.make_node("MatMul", ["x", "w1"], ["a"], name="mm1"),
        helper.make_node("Add", ["a", "b1"], ["h"], name="add1"),
        helper.make_node(middle, ["h"], ["r"], name="mid"),
        helper.make_node("MatMul", ["r", "w2"], ["y"], name="mm2"),
    ]
    inits = {
        "w1": rng.standard_normal((k, n)).astype(np.float32) / 4,
        "b1": rng.standard_normal(n).astype(np.float32),
        "w2": rng.standard_normal((n, 4)).astype(np.float32),
    }
    return make_model(nodes, {"x": (FLOAT, ["b", k])}, {"y": (FLOAT, ["b", 4])}, inits)


def _feeds(rng, k: int = 16) -> dict[str, np.ndarray]:
    return {"x": rng.standard_normal((3, k)).astype(np.float32)}


def _node(model: ir.Model, name: str) -> ir.Node:
    return next(n for n in model.graph if n.name == name)


def test_mlp_is_float16_inside_float32_outside(rng):
    model = _mlp(rng)
    feeds = _feeds(rng)
    expected = run(model, feeds)["y"]
    out, report = optimize(model, [Fp16Pass()])
    entry = report.passes[0]
    assert entry.status == "ok" and entry.metrics["cosine"] >= 0.99
    assert entry.counts["initializers"] == 3 and entry.counts["nodes"] == 4
    assert entry.counts["casts-inserted"] == 2  # x in, y out
    assert all(v.const_value.dtype == F16 for v in out.graph.initializers.values())
    assert out.graph.inputs[0].dtype == ir.DataType.FLOAT
    assert [(v.name, v.dtype) for v in out.graph.outputs] == [("y", ir.DataType.FLOAT)]
    assert op_types(out) == ["Cast", "MatMul", "Add", "Relu", "MatMul", "Cast"]
    y = run(out, feeds)["y"]
    assert y.dtype == np.float32
    np.testing.assert_allclose(y, expected, rtol=2e-2, atol=2e-2)


def test_sensitive_op_kept_float32_behind_casts(rng):
    model = _mlp(rng, middle="Exp")
    feeds = _feeds(rng)
    expected = run(model, feeds)["y"]
    result = Fp16Pass()(model)
    assert result.counts["kept-fp32"] == 1 and result.counts["casts-inserted"] == 4
    exp = _node(model, "mid")
    assert exp.inputs[0].producer().op_type == "Cast" and exp.outputs[0].dtype == ir.DataType.FLOAT
    assert exp.inputs[0].dtype == ir.DataType.FLOAT
    assert op_types(model).count("Cast") == 4
    np.testing.assert_allclose(run(model, feeds)["y"], expected, rtol=2e-2, atol=5e-2)
    unkept = _mlp(rng, middle="Exp")
    result = Fp16Pass(keep_fp32_ops=[])(unkept)
    assert "kept-fp32" not in result.counts and _node(unkept, "mid").outputs[0].dtype == F16


def test_exclude_by_name_keeps_the_node_and_its_weight(rng):
    model = _mlp(rng)
    result = Fp16Pass(exclude=["mm2*"])(model)
    assert result.counts["excluded"] == 1 and result.counts["initializers"] == 2
    assert model.graph.initializers["w2"].const_value.dtype == ir.DataType.FLOAT
    assert _node(model, "mm2").inputs[0].producer().op_type == "Cast"
    feeds = _feeds(rng)
    assert run(model, feeds)["y"].dtype == np.float32


def test_weight_shared_with_a_float32_node_stays_float32(rng):
    nodes = [
        helper.make_node("Add", ["x", "c"], ["a"], name="add"),
        helper.make_node("Pow", ["a", "c"], ["y"], name="pow"),
    ]
    c = np.full(4, 2.0, np.float32)
    model = make_model(nodes, {"x": (FLOAT, [4])}, {"y": (FLOAT, [4])}, {"c": c})
    result = Fp16Pass()(model)
    assert "initializers" not in result.counts
    assert model.graph.initializers["c"].const_value.dtype == ir.DataType.FLOAT
    x = np.arange(4, dtype=np.float32)
    np.testing.assert_allclose(run(model, {"x": x})["y"], (x + 2) ** 2, rtol=1e-3)


def test_out_of_range_constant_is_clamped_with_a_note(rng):
    big = np.array([1e5, -2e5, 3.0, 1.0], np.float32)
    nodes = [
        helper.make_node("Constant", [], ["c"], value=helper.make_tensor("c", FLOAT, [4], big)),
        helper.make_node("Mul", ["x", "c"], ["y"], name="mul"),
    ]
    model = make_model(nodes, {"x": (FLOAT, [4])}, {"y": (FLOAT, [4])})
    result = Fp16Pass()(model)
    assert result.counts["constants"] == 1
    assert any("2 constant values" in note for note in result.notes)
    y = run(model, {"x": np.ones(4, np.float32)})["y"]
    np.testing.assert_array_equal(y, [65504, -65504, 3, 1])


def test_cancelling_casts_are_removed(rng):
    nodes = [
        helper.make_node("Relu", ["x"], ["a"], name="r1"),
        helper.make_node("Cast", ["a"], ["b"], to=FLOAT, name="to32"),
        helper.make_node("Relu", ["b"], ["y"], name="r2"),
    ]
    model = make_model(nodes, {"x": (FLOAT, [4])}, {"y": (FLOAT, [4])})
    result = Fp16Pass()(model)
    assert result.counts["casts-removed"] == 2
    assert _node(model, "r2").inputs[0] is _node(model, "r1").outputs[0]
    x = np.array([-1, 0.5, 2, 3], np.float32)
    np.testing.assert_array_equal(run(model, {"x": x})["y"], np.maximum(x, 0))


def test_if_node_and_what_its_body_reads_stay_float32(rng):
    branch = helper.make_graph(
        [helper.make_node("Relu", ["h"], ["t"])],
        "then",
        [],
        [helper.make_tensor_value_info("t", FLOAT, [4])],
    )
    other = helper.make_graph(
        [helper.make_node("Neg", ["h"], ["e"])],
        "else",
        [],
        [helper.make_tensor_value_info("e", FLOAT, [4])],
    )
    nodes = [
        helper.make_node("Add", ["x", "x"], ["h"], name="add"),
        helper.make_node("If", ["cond"], ["y"], then_branch=branch, else_branch=other),
    ]
    bool_type = helper.np_dtype_to_tensor_dtype(np.dtype(bool))
    model = make_model(nodes, {"x": (FLOAT, [4]), "cond": (bool_type, [])}, {"y": (FLOAT, [4])})
    result = Fp16Pass()(model)
    assert result.counts == {"kept-subgraph": 1} and not result.modified
    assert "stay float32" in result.notes[0]
    x = np.array([-1, 1, 2, 3], np.float32)
    np.testing.assert_array_equal(run(model, {"x": x, "cond": np.array(False)})["y"], -2 * x)


def test_nothing_to_convert_leaves_the_model_alone():
    nodes = [helper.make_node("Shape", ["x"], ["y"])]
    model = make_model(
        nodes,
        {"x": (helper.np_dtype_to_tensor_dtype(np.dtype("int32")), [4])},
        {"y": (helper.np_dtype_to_tensor_dtype(np.dtype("int64")), [1])},
    )
    assert not Fp16Pass()(model).modified and op_types(model) == ["Shape"]


def test_spec_round_trip():
    text = "fp16(keep_fp32_ops=[Exp,Softmax],exclude=['/dec/*'])"
    (built,) = spec.build(text)
    assert isinstance(built, Fp16Pass) and built.keep_fp32_ops == ["Exp", "Softmax"]
    assert spec.build(built.to_spec())[0] == built


def test_external_weights_converted_one_at_a_time(rng, tmp_path):
    model = _mlp(rng, k=512, n=256)
    path = model_io.save(model, tmp_path / "m.onnx", external_data=True)
    lazy = model_io.load(path)
    tensor = lazy.graph.initializers["w1"].const_value
    assert isinstance(tensor, ir.ExternalTensor)
    Fp16Pass()(lazy)
    assert tensor.raw is None  # released once converted
    feeds = _feeds(rng, k=512)
    np.testing.assert_allclose(run(lazy, feeds)["y"], run(model, feeds)["y"], rtol=0.05, atol=0.05)


def test_whisper_encoder_fuse_fp16(tmp_path):
    out, report = optimize(WHISPER, "fuse,fp16", golden=WHISPER_GOLDEN)
    entry = report.passes[-1]
    assert entry.name == "fp16" and entry.status == "ok", entry
    assert entry.metrics["cosine"] > 0.999
    assert entry.counts["initializers"] > 30 and "kept-unsupported" not in entry.counts
    assert entry.bytes_after < 0.55 * entry.bytes_before
    assert [v.dtype for v in out.graph.outputs] == [ir.DataType.FLOAT] * len(out.graph.outputs)
    path = model_io.save(out, tmp_path / "w.onnx")
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])  # all opts on
    assert session.get_inputs()[0].type == "tensor(float)"


def test_against_onnxconverter_common(rng):
    float16 = pytest.importorskip("onnxconverter_common.float16")
    model = _mlp(rng)
    feeds = _feeds(rng)
    theirs = float16.convert_float_to_float16(ir.to_proto(model.clone()), keep_io_types=True)
    Fp16Pass()(model)
    ours = run(model, feeds)["y"]
    np.testing.assert_allclose(ours, run(ir.from_proto(theirs), feeds)["y"], rtol=1e-2, atol=1e-2)


def test_float16_model_is_left_alone(rng):
    half = helper.np_dtype_to_tensor_dtype(np.dtype(np.float16))
    nodes = [helper.make_node("Exp", ["x"], ["a"]), helper.make_node("MatMul", ["a", "w"], ["y"])]
    w = rng.standard_normal((4, 2)).astype(np.float16)
    model = make_model(nodes, {"x": (half, [3, 4])}, {"y": (half, [3, 2])}, {"w": w})
    assert not Fp16Pass()(model).modified and op_types(model) == ["Exp", "MatMul"]


def test_large_weights_get_a_layer_record_with_their_rounding_error(rng):
    model = _mlp(rng, k=128, n=64)  # w1 has 8192 values: reported; b1, w2 are too small
    w1 = model.graph.initializers["w1"].const_value.numpy().copy()
    result = Fp16Pass()(model)
    (layer,) = result.layers
    rounded = w1.astype(np.float16).astype(np.float32)
    expected = np.linalg.norm(rounded - w1) / np.linalg.norm(w1)
    assert layer["name"] == "w1" and layer["nodes"] == ["mm1"] and layer["precision"] == "fp16"
    assert layer["bytes_after"] * 2 == layer["bytes_before"] == w1.nbytes
    assert layer["rel_error"] == pytest.approx(expected, rel=1e-5) and 0 < expected < 1e-3
