"""fuse-rms-norm: decomposed RMSNorm (Llama/T5, both exporters) into RMSNormalization-23."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import FLOAT, make_model, op_types, run
from onnx import TensorProto, helper
from test_fuse_layer_norm import SHAPE, affine_tail, divide, feeds, reduce_mean

from onnxopt.passes.fuse_rms_norm import FuseRmsNormPass

FLOAT16 = TensorProto.FLOAT16


def rms_nodes(x: str, out: str, inits: dict, *, opset: int, **options) -> list:
    """``x / sqrt(mean(x^2) + eps)`` [Cast back] [* weight], the result named ``out``.

    Options: ``square`` ("Pow"/"Mul"), ``inv`` ("div", "recip", "one-div"), ``eps`` (a value
    or "input"), ``axes``, ``fp16`` (Cast x to float and back), ``weight`` (a shape, "input"
    or None), ``swapped`` (weight first).
    """
    axes, fp16 = options.get("axes", [-1]), options.get("fp16", False)
    nodes, xc = [], x
    if fp16:
        nodes.append(helper.make_node("Cast", [x], [f"{x}_f32"], to=FLOAT))
        xc = f"{x}_f32"
    if options.get("square", "Pow") == "Pow":
        inits["two"] = np.array(2.0, np.float32)
        nodes.append(helper.make_node("Pow", [xc, "two"], ["sq"]))
    else:
        nodes.append(helper.make_node("Mul", [xc, xc], ["sq"]))
    nodes.append(reduce_mean("sq", "ms", axes, opset, inits))
    if options.get("eps", 1e-6) != "input":
        inits["eps"] = np.array(options.get("eps", 1e-6), np.float32)
    nodes += [
        helper.make_node("Add", ["ms", "eps"], ["mse"]),
        helper.make_node("Sqrt", ["mse"], ["rms"]),
    ]
    nodes += divide(xc, "rms", "n", options.get("inv", "one-div"), inits, swapped=False)
    last = "n"
    if fp16:
        nodes.append(helper.make_node("Cast", ["n"], ["n16"], to=FLOAT16))
        last = "n16"
    dtype = np.float16 if fp16 else np.float32
    weight = options.get("weight", (16,))
    tail, _ = affine_tail(last, inits, {"scale": weight}, dtype, options.get("swapped", True))
    tail[-1] = helper.make_node("Identity", tail[-1].input, [out])
    return nodes + tail


def rms_model(*, opset: int = 23, **options):
    inits: dict = {}
    elem = FLOAT16 if options.get("fp16") else FLOAT
    inputs = {"x": (elem, SHAPE)}
    if options.get("eps") == "input":
        inputs["eps"] = (FLOAT, [])
    if options.get("weight") == "input":
        inputs["scale"] = (elem, [16])
    nodes = rms_nodes("x", "y", inits, opset=opset, **options)
    model = make_model(nodes, inputs, {"y": (elem, SHAPE)}, inits, opset=opset)
    model.ir_version = 10
    return model


def fused(model, *, target: str = "ort-cpu", fp16: bool = False, atol: float = 1e-5):
    feed = feeds(np.float16 if fp16 else np.float32)
    before = run(model, feed)
    result = FuseRmsNormPass(target=target)(model)
    after = run(model, feed)
    np.testing.assert_allclose(
        after["y"].astype(np.float32), before["y"].astype(np.float32), atol=atol, rtol=1e-3
    )
    return result


def rms_node(model):
    (node,) = [n for n in model.graph if n.op_type == "RMSNormalization"]
    return node


def test_llama_torchscript_form() -> None:
    model = rms_model()
    result = fused(model)
    assert result.counts == {"rms-norm": 1}
    assert op_types(model) == ["RMSNormalization", "Identity"]
    node = rms_node(model)
    assert node.inputs[0].name == "x" and node.inputs[1].name == "scale"
    assert node.attributes["epsilon"].value == pytest.approx(1e-6)
    assert node.attributes["axis"].value == -1


@pytest.mark.parametrize("inv", ["recip", "div"])
def test_float16_with_casts_around_the_statistics(inv: str) -> None:
    model = rms_model(fp16=True, inv=inv)
    result = fused(model, fp16=True, atol=4e-3)
    assert result.counts == {"rms-norm": 1}
    assert op_types(model) == ["RMSNormalization", "Identity"]
    node = rms_node(model)
    assert node.inputs[0].name == "x" and node.attributes["stash_type"].value == 1


@pytest.mark.parametrize(
    "options",
    [
        {"square": "Mul"},
        {"inv": "recip", "swapped": False},
        {"weight": None},
        {"weight": (1, 1, 16)},
        {"axes": [2]},
        {"axes": [-2, -1], "weight": (3, 16)},
    ],
    ids=str,
)
def test_variants(options: dict) -> None:
    model = rms_model(**options)
    result = fused(model)
    assert result.counts == {"rms-norm": 1}
    assert op_types(model) == ["RMSNormalization", "Identity"]
    scale = rms_node(model).inputs[1].const_value.numpy()
    assert scale.shape == tuple(SHAPE[-len(options.get("axes", [-1])) :])
    if options.get("weight", True) is None:
        assert np.all(scale == 1)


def test_computed_weight_is_used_as_is() -> None:
    model = rms_model(weight="input")
    feed = feeds() | {"scale": np.linspace(0.5, 2, 16, dtype=np.float32)}
    before = run(model, feed)
    assert FuseRmsNormPass()(model).counts == {"rms-norm": 1}
    assert rms_node(model).inputs[1].name == "scale"
    np.testing.assert_allclose(run(model, feed)["y"], before["y"], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("target", ["ort-cpu", "onnx-23"])
def test_targets_with_rms_normalization(target: str) -> None:
    assert fused(rms_model(), target=target).counts == {"rms-norm": 1}


@pytest.mark.parametrize(("opset", "target"), [(17, "ort-cpu"), (18, "onnx-23"), (23, "onnx-21")])
def test_without_rms_normalization_nothing_is_fused(opset: int, target: str) -> None:
    model = rms_model(opset=opset)
    result = FuseRmsNormPass(target=target)(model)
    assert not result.modified and "RMSNormalization" not in op_types(model)
    assert "SimplifiedLayerNormalization" not in op_types(model)
    (note,) = result.notes
    if opset < 23:
        assert note.startswith(
            f"rms-norm: skipped, RMSNormalization needs opset 23 and the model imports {opset}"
        )
    else:
        assert note.startswith("rms-norm: skipped, onnx-21 cannot run RMSNormalization (ORT")


@pytest.mark.parametrize(
    ("options", "reason"),
    [
        ({"axes": [1]}, "not the trailing axes"),
        ({"eps": "input"}, "epsilon is not a non-negative constant"),
    ],
    ids=str,
)
def test_what_must_not_fuse(options: dict, reason: str) -> None:
    model = rms_model(**options)
    result = FuseRmsNormPass()(model)
    assert not result.modified and "RMSNormalization" not in op_types(model)
    assert reason in " ".join(result.misses)


def test_a_weight_varying_along_the_sequence_stays_a_mul() -> None:
    model = rms_model(weight=(3, 1))
    assert fused(model).counts == {"rms-norm": 1}
    assert op_types(model) == ["RMSNormalization", "Mul", "Identity"]
