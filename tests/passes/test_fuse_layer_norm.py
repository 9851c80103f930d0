"""fuse-layer-norm: decomposed LayerNorm (both exporters' forms) into LayerNormalization."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import FLOAT, assert_same_outputs, make_model, op_types, run
from onnx import TensorProto, helper

from onnxopt.passes.fuse_layer_norm import FuseLayerNormPass

FLOAT16 = TensorProto.FLOAT16
SHAPE = [2, 3, 16]  # the input x of every model here


def reduce_mean(inp: str, out: str, axes: list[int], opset: int, inits: dict, **attrs):
    """ReduceMean with its axes as an attribute (opset < 18) or an input (opset >= 18)."""
    if opset < 18:
        return helper.make_node("ReduceMean", [inp], [out], axes=axes, **attrs)
    inits[f"{out}_axes"] = np.array(axes, np.int64)
    return helper.make_node("ReduceMean", [inp, f"{out}_axes"], [out], **attrs)


def divide(num: str, std: str, out: str, inv: str, inits: dict, swapped: bool = False):
    """``num / std`` as Div, Mul by Reciprocal, or Mul by Div(1, std)."""
    if inv == "div":
        return [helper.make_node("Div", [num, std], [out])]
    if inv == "recip":
        first = helper.make_node("Reciprocal", [std], [f"{out}_inv"])
    else:
        inits[f"{out}_one"] = np.array(1.0, np.float32)
        first = helper.make_node("Div", [f"{out}_one", std], [f"{out}_inv"])
    pair = [f"{out}_inv", num] if swapped else [num, f"{out}_inv"]
    return [first, helper.make_node("Mul", pair, [out])]


def affine_tail(last: str, inits: dict, params: dict, dtype, swapped=False):
    """``last * scale + bias`` (either, both or none); each an initializer shape or "input"."""
    nodes, inputs = [], {}
    for op, name in (("Mul", "scale"), ("Add", "bias")):
        shape = params.get(name)
        if shape is None:
            continue
        if shape == "input":
            inputs[name] = (helper.np_dtype_to_tensor_dtype(np.dtype(dtype)), [SHAPE[-1]])
        else:
            inits[name] = (np.random.default_rng(1).random(shape) + 0.5).astype(dtype)
        pair = [name, last] if swapped else [last, name]
        nodes.append(helper.make_node(op, pair, [f"{name}_out"]))
        last = f"{name}_out"
    return [*nodes, helper.make_node("Identity", [last], ["y"])], inputs


def layer_norm_model(
    *,
    opset: int = 17,
    axes: list[int] = (-1,),
    var_axes: list[int] | None = None,
    square: str = "Pow",
    eps: float | str | None = 1e-5,
    inv: str = "div",
    scale: list | str | None = (16,),
    bias: list | str | None = (16,),
    swapped: bool = False,
    fp16: str | None = None,
    extra_output: str | None = None,
):
    """A decomposed LayerNorm over ``x`` [2, 3, 16].

    ``eps``: a value, None, "input" (a graph input) or "outside" (added after the Sqrt);
    ``fp16``: None, "input" (x Cast to float for the statistics) or "diff" (x - mean to double).
    """
    inits: dict = {}
    dtype = np.float16 if fp16 else np.float32
    elem = FLOAT16 if fp16 else FLOAT
    inputs = {"x": (elem, SHAPE)}
    xc, nodes = "x", []
    if fp16 == "input":
        nodes.append(helper.make_node("Cast", ["x"], ["xc"], to=FLOAT))
        xc = "xc"
    nodes.append(reduce_mean(xc, "mean", list(axes), opset, inits))
    nodes.append(helper.make_node("Sub", [xc, "mean"], ["d"]))
    d, stat = "d", np.float32
    if fp16 == "diff":
        nodes.append(helper.make_node("Cast", ["d"], ["dc"], to=TensorProto.DOUBLE))
        d, stat = "dc", np.float64
    if square == "Pow":
        inits["two"] = np.array(2.0, stat)
        nodes.append(helper.make_node("Pow", [d, "two"], ["dd"]))
    else:
        nodes.append(helper.make_node("Mul", [d, d], ["dd"]))
    nodes.append(reduce_mean("dd", "var", list(var_axes or axes), opset, inits))
    std_in, std = "var", "std"
    if eps == "input":
        inputs["eps"] = (FLOAT, [])
    elif eps is not None:
        inits["eps"] = np.array(1e-3 if eps == "outside" else eps, stat)
    if eps is not None and eps != "outside":
        nodes.append(helper.make_node("Add", ["var", "eps"], ["ve"]))
        std_in = "ve"
    nodes.append(helper.make_node("Sqrt", [std_in], ["std"]))
    if eps == "outside":
        nodes.append(helper.make_node("Add", ["std", "eps"], ["std_eps"]))
        std = "std_eps"
    nodes += divide(d, std, "n", inv, inits)
    last = "n"
    if fp16:
        nodes.append(helper.make_node("Cast", ["n"], ["nc"], to=FLOAT16))
        last = "nc"
    tail, extra_inputs = affine_tail(last, inits, {"scale": scale, "bias": bias}, dtype, swapped)
    outputs = {"y": (elem, SHAPE)}
    if extra_output:
        outputs[extra_output] = (elem, None)
    model = make_model(nodes + tail, inputs | extra_inputs, outputs, inits, opset=opset)
    return model


def feeds(dtype=np.float32) -> dict[str, np.ndarray]:
    x = np.random.default_rng(0).standard_normal(SHAPE) * 3 + 1
    return {"x": x.astype(dtype)}


def fused(model, *, target: str = "ort-cpu", dtype=np.float32, atol=1e-5):
    """Run the pass; check ORT outputs before and after; return the result."""
    before = run(model, feeds(dtype))
    result = FuseLayerNormPass(target=target)(model)
    after = run(model, feeds(dtype))
    for name in before:
        np.testing.assert_allclose(
            after[name].astype(np.float32), before[name].astype(np.float32), atol=atol, rtol=1e-3
        )
    return result


def ln_node(model):
    (node,) = [n for n in model.graph if n.op_type == "LayerNormalization"]
    return node


def test_torchscript_form_becomes_layer_normalization() -> None:
    model = layer_norm_model()
    result = fused(model)
    assert result.counts == {"layer-norm": 1}
    assert op_types(model) == ["LayerNormalization", "Identity"]
    node = ln_node(model)
    assert node.attributes["axis"].value == -1
    assert node.attributes["epsilon"].value == pytest.approx(1e-5)
    assert [v.name for v in node.inputs[1:]] == ["scale", "bias"]


def test_dynamo_form_with_axes_input_and_reversed_operands() -> None:
    model = layer_norm_model(opset=18, swapped=True, eps=None)
    result = fused(model)
    assert result.counts == {"layer-norm": 1} and op_types(model)[0] == "LayerNormalization"
    assert ln_node(model).attributes["epsilon"].value == 0.0


@pytest.mark.parametrize(
    "options",
    [
        {"square": "Mul"},
        {"inv": "recip"},
        {"inv": "one-div"},
        {"bias": None},
        {"scale": None},
        {"scale": None, "bias": None},
        {"axes": [2]},
        {"axes": [-2, -1], "scale": (3, 16), "bias": (16,)},
        {"scale": (1, 1, 16), "bias": (1, 16)},
        {"scale": (1,)},
    ],
    ids=str,
)
def test_variants_fuse_exactly(options: dict) -> None:
    model = layer_norm_model(**options)
    result = fused(model)
    assert result.counts == {"layer-norm": 1}
    assert op_types(model) == ["LayerNormalization", "Identity"]
    node = ln_node(model)
    axes = options.get("axes", [-1])
    assert node.attributes["axis"].value == -len(axes)
    scale = node.inputs[1].const_value.numpy()
    assert scale.shape == tuple(SHAPE[-len(axes) :]) and scale.dtype == np.float32
    if options.get("scale", True) is None:
        assert np.all(scale == 1)
    assert (len(node.inputs) == 3) == (options.get("bias", True) is not None)


@pytest.mark.parametrize("where", ["input", "diff"])
def test_float16_with_float_statistics(where: str) -> None:
    model = layer_norm_model(fp16=where)
    result = fused(model, dtype=np.float16, atol=4e-3)
    assert result.counts == {"layer-norm": 1}
    assert op_types(model) == ["LayerNormalization", "Identity"]
    node = ln_node(model)
    assert node.inputs[0].name == "x" and node.attributes["stash_type"].value == 1


def test_computed_scale_of_the_normalized_shape_is_used_as_is() -> None:
    model = layer_norm_model(scale="input")
    feed = feeds() | {"scale": np.linspace(0.5, 2, 16, dtype=np.float32)}
    before = run(model, feed)
    result = FuseLayerNormPass()(model)
    assert result.counts == {"layer-norm": 1}
    assert ln_node(model).inputs[1].name == "scale"
    assert_same_outputs(before, run(model, feed))


@pytest.mark.parametrize("target", ["ort-cpu", "onnx-17", "onnx-23"])
def test_targets_with_layer_normalization(target: str) -> None:
    result = fused(layer_norm_model(opset=17), target=target)
    assert result.counts == {"layer-norm": 1}


def test_below_opset_17_nothing_is_fused_and_the_note_says_why() -> None:
    model = layer_norm_model(opset=14)
    result = FuseLayerNormPass()(model)
    assert not result.modified and "LayerNormalization" not in op_types(model)
    assert result.notes == [
        "layer-norm: skipped, LayerNormalization needs opset 17 and the model imports 14"
    ]


@pytest.mark.parametrize(
    ("options", "reason"),
    [
        ({"axes": [1]}, "not the trailing axes"),
        ({"axes": [0, 2]}, "not the trailing axes"),
        ({"extra_output": "d"}, ""),
    ],
    ids=str,
)
def test_what_must_not_fuse(options: dict, reason: str) -> None:
    model = layer_norm_model(**options)
    result = FuseLayerNormPass()(model)
    assert "LayerNormalization" not in op_types(model), result.counts
    assert reason in " ".join(result.misses)


@pytest.mark.parametrize(
    ("options", "reason"),
    [
        ({"eps": "outside"}, ""),
        ({"eps": "input"}, "epsilon is not a non-negative constant"),
        ({"opset": 18, "var_axes": [-2, -1]}, "reduce different axes"),
    ],
    ids=str,
)
def test_other_formulas_do_not_fuse(options: dict, reason: str) -> None:
    model = layer_norm_model(**options)
    result = FuseLayerNormPass()(model)
    assert not result.modified and "LayerNormalization" not in op_types(model)
    assert reason in " ".join(result.misses)


def test_a_scale_varying_along_the_sequence_stays_a_mul() -> None:
    model = layer_norm_model(scale=(3, 1))
    result = fused(model)
    assert result.counts == {"layer-norm": 1}
    assert op_types(model) == ["LayerNormalization", "Mul", "Add", "Identity"]
    assert np.all(ln_node(model).inputs[1].const_value.numpy() == 1)
