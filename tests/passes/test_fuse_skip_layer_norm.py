"""fuse-skip-layer-norm: residual Add + LayerNorm / RMSNorm into ORT's skip-norm contrib ops."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import FLOAT, ROOT, make_model, op_types, run
from onnx import TensorProto, helper
from test_fuse_rms_norm import rms_nodes

from onnxopt import GoldenSet, Pipeline, load
from onnxopt.passes.fuse_skip_layer_norm import FuseSkipLayerNormPass
from onnxopt.passes.infer_shapes import InferShapesPass

FLOAT16 = TensorProto.FLOAT16
SHAPE = [2, 3, 16]
ZOO = ROOT / "golden" / "zoo"


def residual(inits: dict, bias: tuple[bool, bool] | None, dtype=np.float32) -> list:
    """``s = a + b``, or with a bias ``(a + bias) + b`` in the operand orders ``bias`` says."""
    if bias is None:
        return [helper.make_node("Add", ["a", "b"], ["s"])]
    outer, inner = bias
    inits["bias"] = np.linspace(-1, 1, 16).astype(dtype)
    return [
        helper.make_node("Add", ["bias", "a"] if inner else ["a", "bias"], ["ab"]),
        helper.make_node("Add", ["b", "ab"] if outer else ["ab", "b"], ["s"]),
    ]


def skip_ln_model(
    *,
    a_shape: list = SHAPE,
    b_shape: list = SHAPE,
    bias: tuple[bool, bool] | None = None,
    beta: bool = True,
    axis: int = -1,
    sum_read: str | None = None,
    mean_read: bool = False,
    fp16: bool = False,
):
    """``LayerNormalization(a + b)``; ``sum_read``: None, "output" or "add" (s + y)."""
    dtype, elem = (np.float16, FLOAT16) if fp16 else (np.float32, FLOAT)
    inits = {"gamma": np.linspace(0.5, 1.5, 16).astype(dtype)}
    ln_inputs = ["s", "gamma"]
    if beta:
        inits["beta"] = np.linspace(-0.2, 0.2, 16).astype(dtype)
        ln_inputs.append("beta")
    if axis == -2:
        inits["gamma"] = np.ones([3, 16], dtype)
        inits["beta"] = np.zeros([3, 16], dtype)
    nodes = residual(inits, bias, dtype)
    ln_outputs = ["y", "mean"] if mean_read else ["y"]
    nodes.append(helper.make_node("LayerNormalization", ln_inputs, ln_outputs, axis=axis))
    outputs = {"y": (elem, SHAPE)} | ({"mean": (FLOAT, None)} if mean_read else {})
    if sum_read == "output":
        outputs["s"] = (elem, SHAPE)
    elif sum_read == "add":
        nodes.append(helper.make_node("Add", ["s", "y"], ["h"]))
        outputs["h"] = (elem, SHAPE)
    inputs = {"a": (elem, a_shape), "b": (elem, b_shape)}
    return make_model(nodes, inputs, outputs, inits)


def feeds(model) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    arrays = {}
    for value in model.graph.inputs:
        shape = [d if isinstance(d, int) else 2 for d in value.shape]
        arrays[value.name] = rng.standard_normal(shape).astype(value.dtype.numpy())
    return arrays


def fused(model, *, target: str = "ort-cpu", atol: float = 1e-5):
    """Run the pass, checking every output in ORT before and after."""
    feed = feeds(model)
    before = run(model, feed)
    result = FuseSkipLayerNormPass(target=target)(model)
    after = run(model, feed)
    assert after.keys() == before.keys()
    for name in before:
        np.testing.assert_allclose(
            after[name].astype(np.float32), before[name].astype(np.float32), atol=atol, rtol=1e-3
        )
    return result


def fused_node(model):
    (node,) = [n for n in model.graph if n.domain == "com.microsoft"]
    return node


def test_add_then_layer_norm_becomes_skip_layer_norm() -> None:
    model = skip_ln_model()
    result = fused(model)
    assert result.counts == {"skip-layer-norm": 1}
    assert op_types(model) == ["SkipLayerNormalization"]
    node = fused_node(model)
    assert [v.name for v in node.inputs] == ["a", "b", "gamma", "beta"]
    assert len(node.outputs) == 1 and model.opset_imports["com.microsoft"] == 1
    assert node.attributes["epsilon"].value == pytest.approx(1e-5)


@pytest.mark.parametrize("order", [(False, False), (False, True), (True, False), (True, True)])
def test_a_bias_add_before_the_residual_becomes_the_bias_input(order) -> None:
    model = skip_ln_model(bias=order, beta=False)
    result = fused(model)
    assert result.counts == {"skip-layer-norm": 1} and op_types(model) == ["SkipLayerNormalization"]
    assert [v.name if v else "" for v in fused_node(model).inputs] == [
        "a",
        "b",
        "gamma",
        "",
        "bias",
    ]


@pytest.mark.parametrize("reader", ["output", "add"])
def test_a_sum_read_elsewhere_comes_from_the_fourth_output(reader: str) -> None:
    model = skip_ln_model(sum_read=reader, bias=(False, False))
    result = fused(model)
    assert result.counts == {"skip-layer-norm": 1}
    node = fused_node(model)
    assert len(node.outputs) == 4 and node.outputs[3].name == "s"
    assert [n.op_type for n in model.graph] == ["SkipLayerNormalization"] + (
        ["Add"] if reader == "add" else []
    )
    assert [v.name for v in model.graph.outputs] == ["y", "s" if reader == "output" else "h"]


@pytest.mark.parametrize(
    ("a_shape", "b_shape"), [([3, 16], SHAPE), ([1, 3, 16], SHAPE), ([6, 16], [6, 16])], ids=str
)
def test_shapes_the_kernel_takes(a_shape: list, b_shape: list) -> None:
    model = skip_ln_model(a_shape=a_shape, b_shape=b_shape)
    if a_shape == [6, 16]:
        model.graph.outputs[0].shape = None
    result = fused(model)
    assert result.counts == {"skip-layer-norm": 1}
    assert fused_node(model).inputs[0].name == ("b" if a_shape != b_shape else "a")


def test_float16() -> None:
    model = skip_ln_model(fp16=True, bias=(True, False))
    assert fused(model, atol=4e-3).counts == {"skip-layer-norm": 1}


@pytest.mark.parametrize(
    ("options", "reason"),
    [
        ({"b_shape": [2, 1, 16]}, "are neither of one 2-D/3-D shape"),
        ({"a_shape": ["batch", 3, 16], "b_shape": ["other", 3, 16]}, "are neither of one"),
        ({"a_shape": [2, 2, 3, 16], "b_shape": [2, 2, 3, 16]}, "are neither of one"),
        ({"axis": -2}, "normalizes from axis -2, not only the last axis"),
        ({"mean_read": True}, "mean or inverse std dev output is used"),
    ],
    ids=str,
)
def test_what_must_not_fuse(options: dict, reason: str) -> None:
    model = skip_ln_model(**options)
    if len(options.get("a_shape", [])) == 4 or options.get("b_shape") == [2, 1, 16]:
        model.graph.outputs[0].shape = None
    result = FuseSkipLayerNormPass()(model)
    assert not result.modified and "SkipLayerNormalization" not in op_types(model)
    assert reason in " ".join(result.misses)


@pytest.mark.parametrize("target", ["onnx-17", "onnx-23"])
def test_standard_targets_fuse_nothing(target: str) -> None:
    model = skip_ln_model()
    result = FuseSkipLayerNormPass(target=target)(model)
    assert not result.modified and op_types(model) == ["Add", "LayerNormalization"]
    assert (
        f"skip-layer-norm: skipped, {target} cannot run com.microsoft::SkipLayerNormalization"
        in result.notes
    )


def skip_rms_model(*, opset: int = 17, fp16: bool = False, sum_read: bool = False, node=False):
    """``a + b`` then Llama's RMS norm, decomposed or (``node``) as RMSNormalization-23."""
    elem, dtype = (FLOAT16, np.float16) if fp16 else (FLOAT, np.float32)
    inits: dict = {}
    nodes = [helper.make_node("Add", ["a", "b"], ["s"])]
    if node:
        inits["w"] = np.linspace(0.5, 1.5, 16).astype(dtype)
        nodes.append(helper.make_node("RMSNormalization", ["s", "w"], ["y"], epsilon=1e-6))
    else:
        nodes += rms_nodes("s", "y", inits, opset=opset, fp16=fp16)
    outputs = {"y": (elem, SHAPE)}
    if sum_read:
        nodes.append(helper.make_node("Add", ["s", "y"], ["h"]))
        outputs["h"] = (elem, SHAPE)
    model = make_model(nodes, {"a": (elem, SHAPE), "b": (elem, SHAPE)}, outputs, inits, opset)
    model.ir_version = 10
    return model


@pytest.mark.parametrize(
    "options",
    [{}, {"fp16": True}, {"sum_read": True}, {"opset": 18, "fp16": True, "sum_read": True}],
    ids=str,
)
def test_llama_rms_norm_after_a_residual_becomes_skip_simplified(options: dict) -> None:
    model = skip_rms_model(**options)
    result = fused(model, atol=4e-3 if options.get("fp16") else 1e-5)
    assert result.counts == {"skip-simplified-layer-norm": 1}
    expected = ["SkipSimplifiedLayerNormalization", "Identity"]
    expected += ["Add"] if options.get("sum_read") else []
    assert op_types(model) == expected
    node = fused_node(model)
    assert [v.name for v in node.inputs[:2]] == ["a", "b"] and len(node.inputs) == 3
    assert node.attributes["epsilon"].value == pytest.approx(1e-6)
    assert len(node.outputs) == (4 if options.get("sum_read") else 1)


def test_rms_normalization_node_after_a_residual() -> None:
    model = skip_rms_model(opset=23, node=True, sum_read=True)
    assert fused(model).counts == {"skip-simplified-layer-norm": 1}
    assert op_types(model) == ["SkipSimplifiedLayerNormalization", "Add"]


def embeddings_model(rows: int = 4):
    """BERT's embeddings: ``x + position_embeddings(position_ids[:, :seq])`` (a ``[1, rows]``
    buffer, so ``Min(rows, seq)`` positions), then LayerNormalization."""
    nodes = [
        helper.make_node("Shape", ["x"], ["shape"]),
        helper.make_node("Gather", ["shape", "one"], ["seq"], axis=0),
        helper.make_node("Unsqueeze", ["seq", "zero_axis"], ["end"]),
        helper.make_node("Slice", ["ids", "zero_axis", "end", "one_axis"], ["positions"]),
        helper.make_node("Gather", ["table", "positions"], ["pos"]),
        helper.make_node("Add", ["x", "pos"], ["s"]),
        helper.make_node("LayerNormalization", ["s", "gamma", "beta"], ["y"]),
    ]
    inits = {
        "one": np.array(1, np.int64),
        "zero_axis": np.array([0], np.int64),
        "one_axis": np.array([1], np.int64),
        "ids": np.arange(rows, dtype=np.int64)[None],
        "table": np.linspace(-1, 1, rows * 16).astype(np.float32).reshape(rows, 16),
        "gamma": np.linspace(0.5, 1.5, 16).astype(np.float32),
        "beta": np.linspace(-0.2, 0.2, 16).astype(np.float32),
    }
    inputs = {"x": (FLOAT, ["batch", "seq", 16])}
    return make_model(nodes, inputs, {"y": (FLOAT, ["batch", "seq", 16])}, inits)


def _run_or_error(model, x: np.ndarray):
    try:
        return run(model, {"x": x})["y"]
    except Exception as err:  # ORT's error, as the runner wraps it
        assert "Non-zero status code" in str(err)
        return "fails"


def test_positions_cut_to_the_sequence_fuse_and_fail_where_the_add_fails() -> None:
    """Min(4, seq) rows equal seq wherever the Add runs (seq <= 4); where it does not, ORT's
    op fails too (it checks the skip's last two dims), so the fused model is exact."""
    model = embeddings_model(rows=4)
    xs = [
        np.random.default_rng(s).standard_normal((2, s, 16)).astype(np.float32)
        for s in (1, 3, 4, 5)
    ]
    before = [_run_or_error(model, x) for x in xs]
    InferShapesPass()(model)
    result = FuseSkipLayerNormPass()(model)
    assert result.counts == {"skip-layer-norm": 1}
    node = fused_node(model)
    assert [v.name for v in node.inputs[:2]] == ["x", "pos"]
    assert [str(d) for d in node.inputs[1].shape] == ["1", "Min(4, seq)", "16"]
    after = [_run_or_error(model, x) for x in xs]
    for old, new in zip(before[:3], after[:3], strict=True):
        np.testing.assert_allclose(new, old, atol=1e-5, rtol=1e-3)
    assert before[3] == after[3] == "fails"  # seq 5 > 4 rows


def test_positions_of_a_one_row_table_do_not_fuse() -> None:
    """Min(1, seq) is 1: the Add broadcasts it over any seq, ORT's op would refuse it."""
    model = embeddings_model(rows=1)
    InferShapesPass()(model)
    result = FuseSkipLayerNormPass()(model)
    assert not result.modified and "SkipLayerNormalization" not in op_types(model)
    assert "are neither of one 2-D/3-D shape" in " ".join(result.misses)


# Residual Add + norm pairs the zoo models have, and how many fuse (after simplify: the
# TorchScript graphs' made-up dims are proven equal by infer-shapes, see symbolic_shapes).
ZOO_EXPECTED = {
    "bert_ts": ("skip-layer-norm", 5),  # 4 residual pairs and the embeddings (Min(64, seq))
    "bert_dynamo": ("skip-layer-norm", 5),
    "gpt2_ts": ("skip-layer-norm", 5),  # 4 residual pairs and the embeddings ([1, S, H])
    "gpt2_dynamo": ("skip-layer-norm", 5),
    "gpt2_kv_ts": ("skip-layer-norm", 5),
    "llama_ts": ("skip-simplified-layer-norm", 4),  # 4 residual pairs, 1 RMS norm without one
    "llama_dynamo": ("skip-simplified-layer-norm", 4),
    "wav2vec2_ts": ("skip-layer-norm", 5),  # 4 residual pairs and the positional conv's Add
    "wav2vec2_dynamo": ("skip-layer-norm", 5),
    "whisper_ts": ("skip-layer-norm", 5),  # 4 residual pairs and the positional embedding
    "whisper_dynamo": ("skip-layer-norm", 5),
}


@pytest.mark.parametrize("name", sorted(ZOO_EXPECTED))
def test_zoo_models(name: str) -> None:
    path, golden_dir = ZOO / f"{name}.onnx", ZOO / f"{name}.golden"
    if not path.is_file() or not golden_dir.is_dir():
        pytest.skip(f"{path} is not there")
    golden = GoldenSet.load(golden_dir)
    model, _ = Pipeline("simplify", verify=False).run(load(path))
    spec = "fuse-layer-norm,fuse-rms-norm,fuse-skip-layer-norm"
    model, report = Pipeline(spec, golden=golden).run(model)
    entry = report.passes[-1]
    assert entry.status == "ok", entry.reason
    fusion, count = ZOO_EXPECTED[name]
    assert entry.counts == {fusion: count}
