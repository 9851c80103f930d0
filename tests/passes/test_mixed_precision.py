"""mixed-precision: int4/int8/fp16/fp32 per weight, the smallest model that meets the budget."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import pytest
from conftest import FLOAT, WHISPER, WHISPER_GOLDEN, make_model, run
from onnx import helper

from onnxopt import golden as golden_mod
from onnxopt import model_io, optimize, spec
from onnxopt.errors import UsageError, VerificationError
from onnxopt.golden import GoldenSet
from onnxopt.metrics import Tolerance, compare_all
from onnxopt.passes.mixed_precision import MixedPrecisionPass
from onnxopt.passes.quant_int4 import QuantInt4Pass
from onnxopt.passes.quant_int8 import QuantInt8Pass
from onnxopt.quant import kquant

K, N = 128, 64


def _branches(rng, gain: float = 100.0):
    """``y = x@Wa + gain * (x@Wb) + x@Wc``: Wb dominates the output, so its error does too."""
    weights = {w: rng.standard_normal((K, N)).astype(np.float32) for w in ("wa", "wb", "wc")}
    scale = np.array(gain, np.float32)
    nodes = [
        helper.make_node("MatMul", ["x", "wa"], ["a"], name="a"),
        helper.make_node("MatMul", ["x", "wb"], ["b"], name="b"),
        helper.make_node("MatMul", ["x", "wc"], ["c"], name="c"),
        helper.make_node("Mul", ["b", "gain"], ["bs"]),
        helper.make_node("Add", ["a", "bs"], ["ab"]),
        helper.make_node("Add", ["ab", "c"], ["y"]),
    ]
    inits = {**weights, "gain": scale}
    model = make_model(nodes, {"x": (FLOAT, [4, K])}, {"y": (FLOAT, [4, N])}, inits)
    return model, weights


def _golden(model: ir.Model, rng) -> GoldenSet:
    cases = [{"x": rng.standard_normal((4, K)).astype(np.float32)} for _ in range(2)]
    return golden_mod.capture(model, inputs=cases)


def _run_pass(model: ir.Model, golden: GoldenSet, **options):
    pass_ = MixedPrecisionPass(**options)
    pass_.golden = golden
    return pass_(model)


def _bits(model: ir.Model) -> dict[str, int]:
    return {n.name: n.attributes["bits"].value for n in model.graph if n.op_type == "MatMulNBits"}


def _kquant(w: np.ndarray, bits: int) -> np.ndarray:
    quant = kquant.kquant(w.T, bits=bits, block=32, symmetric=True, importance="magnitude")
    return quant.dequantize().T


def _cosine(model: ir.Model, golden: GoldenSet) -> float:
    outputs = [run(model, case) for case in golden.inputs]
    return compare_all(golden.outputs, outputs, Tolerance()).cosine


def test_sensitive_weight_gets_more_bits(rng):
    model, w = _branches(rng)
    golden = _golden(model, rng)
    uniform = model.clone()
    QuantInt4Pass()(uniform)
    assert _cosine(uniform, golden) < 0.9999  # int4 everywhere misses this budget
    result = _run_pass(model, golden, budget=0.9999)
    assert result.modified
    assert _bits(model) == {"a": 4, "b": 8, "c": 4}
    assert not {"wa", "wb", "wc"} & set(model.graph.initializers)
    x = golden.inputs[0]["x"]
    expected = x @ _kquant(w["wa"], 4) + 100 * (x @ _kquant(w["wb"], 8)) + x @ _kquant(w["wc"], 4)
    np.testing.assert_allclose(run(model, {"x": x})["y"], expected, rtol=1e-4, atol=1e-3)
    assert _cosine(model, golden) >= 0.9999
    layers = {line["nodes"][0]: line for line in result.layers}
    assert [layers[n]["precision"] for n in "abc"] == ["int4", "int8", "int4"]
    assert layers["b"]["sensitivity"] < min(layers["a"]["sensitivity"], layers["c"]["sensitivity"])
    assert layers["b"]["output_error"] > layers["b"]["sensitivity"]  # cosine nearer 1 at int8
    assert layers["a"]["bytes_after"] < layers["b"]["bytes_after"] < layers["b"]["bytes_before"]
    assert "cosine" in result.notes[-1] and "2 int4, 1 int8" in result.notes[-1]


@pytest.mark.parametrize(
    ("metric", "budget", "attribute"),
    [("snr", 40.0, "snr_db"), ("rel_l2", 0.01, "rel_l2"), ("max_abs", 30.0, "max_abs")],
)
def test_each_metric_bounds_the_search(rng, metric, budget, attribute):
    model, _ = _branches(rng)
    golden = _golden(model, rng)
    result = _run_pass(model, golden, metric=metric, budget=budget)
    assert _bits(model) == {"a": 4, "b": 8, "c": 4}
    outputs = [run(model, case) for case in golden.inputs]
    measured = getattr(compare_all(golden.outputs, outputs, Tolerance()), attribute)
    assert measured >= budget if metric == "snr" else measured <= budget
    assert result.notes[-1].startswith(f"{metric} ")


def test_a_tight_max_abs_budget_uses_fp16(rng):
    model, _ = _branches(rng)
    golden = _golden(model, rng)
    result = _run_pass(model, golden, metric="max_abs", budget=5.0)
    assert [line["precision"] for line in result.layers] == ["int4", "fp16", "int8"]


def test_gemm_and_transposed_weights_are_fed_in_their_layout(rng):
    """Gemm(transB=1) and MatMul(Transpose(W)) store [N, K]; the search feeds them that way."""
    wg = rng.standard_normal((N, K)).astype(np.float32)
    wt = rng.standard_normal((N, K)).astype(np.float32)
    nodes = [
        helper.make_node("Gemm", ["x", "wg", "bias"], ["g"], name="g", transB=1),
        helper.make_node("Transpose", ["wt"], ["wt_t"], perm=[1, 0]),
        helper.make_node("MatMul", ["x", "wt_t"], ["t"], name="t"),
        helper.make_node("Mul", ["t", "gain"], ["ts"]),
        helper.make_node("Add", ["g", "ts"], ["y"]),
    ]
    inits = {"wg": wg, "wt": wt, "bias": np.ones(N, np.float32), "gain": np.float32(100)}
    model = make_model(nodes, {"x": (FLOAT, [4, K])}, {"y": (FLOAT, [4, N])}, inits)
    golden = _golden(model, rng)
    result = _run_pass(model, golden, budget=0.9999)
    assert result.counts == {"gemm": 1, "matmul-transposed": 1}
    assert _bits(model) == {"g": 4, "t": 8} and "Transpose" not in [n.op_type for n in model.graph]
    x = golden.inputs[0]["x"]
    expected = x @ _kquant(wg.T, 4) + 1 + 100 * (x @ _kquant(wt.T, 8))
    np.testing.assert_allclose(run(model, {"x": x})["y"], expected, rtol=1e-4, atol=1e-3)


def test_smaller_than_uniform_int8_within_budget(rng):
    model, _ = _branches(rng)
    golden = _golden(model, rng)
    int8 = model.clone()
    QuantInt8Pass()(int8)
    _run_pass(model, golden, budget=0.9999)
    assert model_io.weight_bytes(model) < model_io.weight_bytes(int8)


def test_candidates_limit_the_choices(rng):
    model, w = _branches(rng, gain=1000.0)
    golden = _golden(model, rng)
    result = _run_pass(model, golden, budget=0.999999, candidates=["fp16", "int4"])
    assert _bits(model) == {"a": 4, "c": 4}
    cast = next(n for n in model.graph if n.op_type == "Cast")
    assert cast.inputs[0].const_value.dtype == ir.DataType.FLOAT16
    assert next(n for n in model.graph if n.name == "b").inputs[1] is cast.outputs[0]
    assert [line["precision"] for line in result.layers] == ["int4", "fp16", "int4"]
    x = golden.inputs[0]["x"]
    wb = w["wb"].astype(np.float16).astype(np.float32)
    expected = x @ _kquant(w["wa"], 4) + 1000 * (x @ wb) + x @ _kquant(w["wc"], 4)
    np.testing.assert_allclose(run(model, {"x": x})["y"], expected, rtol=1e-4, atol=1e-2)


def test_overrides_pin_weights(rng):
    model, w = _branches(rng)
    golden = _golden(model, rng)
    result = _run_pass(model, golden, budget=0.9, overrides=["a=fp32", "c:int8"])
    assert _bits(model) == {"b": 4, "c": 8}  # b alone at int4 meets a loose budget
    assert next(n for n in model.graph if n.name == "a").inputs[1].name == "wa"
    assert result.counts["kept-fp32"] == 1
    x = golden.inputs[0]["x"]
    expected = x @ w["wa"] + 100 * (x @ _kquant(w["wb"], 4)) + x @ _kquant(w["wc"], 8)
    np.testing.assert_allclose(run(model, {"x": x})["y"], expected, rtol=1e-4, atol=1e-3)


def _named_chain(rng, names: list[str]) -> ir.Model:
    nodes, inits, prev = [], {}, "x"
    for i, name in enumerate(names):
        inits[f"w{i}"] = (rng.standard_normal((K, K)) / np.sqrt(K)).astype(np.float32)
        out = "y" if i == len(names) - 1 else f"h{i}"
        nodes.append(helper.make_node("MatMul", [prev, f"w{i}"], [out], name=name))
        prev = out
    return make_model(nodes, {"x": (FLOAT, [4, K])}, {"y": (FLOAT, [4, K])}, inits)


def test_llama_cpp_preset(rng):
    names = ["/l.0/q_proj/MatMul", "/l.0/v_proj/MatMul", "/l.0/o_proj/MatMul"]
    names += ["/l.0/mlp/down_proj/MatMul", "/l.1/q_proj/MatMul", "/lm_head/MatMul"]
    model = _named_chain(rng, names)
    golden = _golden(model, rng)
    result = _run_pass(model, golden, preset="llama-cpp")
    assert list(_bits(model).values()) == [8, 8, 4, 8, 4, 8]  # first, V, down, last
    assert list(_bits(model)) == names
    assert len(result.layers) == 6 and result.notes


def test_llama_cpp_preset_reads_dynamo_namespaces(rng):
    model = _named_chain(rng, [f"node_linear_{i}" for i in range(4)])
    node = list(model.graph)[1]
    node.metadata_props["namespace"] = "model.layers.0.self_attn.v_proj: Linear/linear"
    _run_pass(model, _golden(model, rng), preset="llama-cpp")
    assert list(_bits(model).values()) == [8, 8, 4, 8]


def test_bad_options_are_usage_errors():
    for options in (
        {"budget": "1.5"},
        {"metric": "max_abs"},
        {"candidates": ["int2"]},
        {"overrides": ["*=int3"]},
        {"block": "24"},
    ):
        with pytest.raises(UsageError):
            MixedPrecisionPass.from_options(options)
    assert spec.build("mixed-precision(budget=25,metric=snr)")[0].limit == 25.0


def test_unreachable_budget_refused(rng):
    model, _ = _branches(rng)
    golden = _golden(model, rng)
    with pytest.raises(VerificationError, match="even int8 everywhere"):
        _run_pass(model, golden, budget=0.9999999999, candidates=["int4", "int8"])
    with pytest.raises(VerificationError, match="fp32 everywhere outside the overrides"):
        _run_pass(model, golden, budget=0.9999, overrides=["b=int4"])


def test_without_golden_set_captures_one(rng):
    model, _ = _branches(rng)
    result = MixedPrecisionPass(budget=0.9999)(model)
    assert _bits(model) == {"a": 4, "b": 8, "c": 4}
    assert result.modified


def test_whisper_encoder_meets_budget_smaller_than_int8():
    golden = GoldenSet.load(WHISPER_GOLDEN)
    model = ir.load(WHISPER)
    int8 = model.clone()
    QuantInt8Pass()(int8)
    result = _run_pass(model, golden)
    assert _cosine(model, golden) >= 0.999
    assert model_io.weight_bytes(model) < model_io.weight_bytes(int8)
    precisions = [line["precision"] for line in result.layers]
    assert len(precisions) == 14 and {"int4", "int8"} <= set(precisions)  # 12 MatMul, 2 Conv
    assert result.counts["conv"] == 2


def test_the_pipeline_hands_its_golden_set_to_the_search(monkeypatch):
    def no_capture(*args, **kwargs):
        raise AssertionError("the pass captured its own golden set")

    monkeypatch.setattr(golden_mod, "capture", no_capture)
    _, report = optimize(WHISPER, "mixed-precision", golden=WHISPER_GOLDEN)
    (entry,) = report.passes
    assert entry.status == "ok" and entry.metrics["cosine"] >= 0.999
    assert entry.bytes_after < 0.3 * entry.bytes_before
