"""Decompositions of tensor ops (Pad reflect/edge, Einsum) against ORT's kernels."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import FLOAT, INT64, assert_decomposes, make_model
from onnx import helper

from onnxopt.targets import decompositions


@pytest.mark.parametrize("mode", ["reflect", "edge"])
@pytest.mark.parametrize(
    ("shape", "pads"),
    [
        ([2, 3, 8], [0, 0, 3, 0, 0, 2]),
        ([2, 3, 8], [0, 0, 0, 0, 0, 7]),  # reflect's largest pad: length - 1
        ([1, 2, 5, 6], [0, 0, 2, 1, 0, 0, 3, 4]),
        ([1, 2, 5, 6], [0, 0, 1, 0, 0, 0, 2, 0]),  # only the second-last axis
        ([4, 5], [3, 0, 0, 0]),
        ([2, 4, 5, 6], [0, 1, 2, 3, 0, 3, 2, 1]),
    ],
)
@pytest.mark.parametrize("opset", [13, 18])
def test_pad(mode: str, shape: list[int], pads: list[int], opset: int, rng) -> None:
    node = helper.make_node("Pad", ["x", "pads"], ["y"], mode=mode)
    inits = {"pads": np.array(pads, np.int64)}
    model = make_model([node], {"x": (FLOAT, shape)}, {"y": (FLOAT, None)}, inits, opset=opset)
    feeds = {"x": rng.standard_normal(shape).astype(np.float32)}
    result = assert_decomposes(model, feeds, "Pad")
    assert "Concat" in [n.op_type for n in result.graph]


@pytest.mark.parametrize(
    ("mode", "pads", "inputs", "reason"),
    [
        ("constant", [0, 1, 0, 1], ["x", "pads"], "mode"),
        ("reflect", [0, -1, 0, 1], ["x", "pads"], "negative"),
        ("reflect", None, ["x", "p"], "constant"),
        ("reflect", [1, 0, 0, 0, 0, 0, 0, 1], ["x", "pads"], "last"),
    ],
)
def test_pad_not_applicable(mode: str, pads, inputs: list[str], reason: str) -> None:
    node = helper.make_node("Pad", inputs, ["y"], mode=mode)
    inits = {} if pads is None else {"pads": np.array(pads, np.int64)}
    shape = [2, 4, 5, 6][-len(pads or [0] * 4) // 2 :]
    model_inputs = {"x": (FLOAT, shape), "p": (INT64, [4])}
    model = make_model([node], model_inputs, {"y": (FLOAT, None)}, inits)
    pad = next(iter(model.graph))
    reasons = [d.reason_not_applicable(pad, 17) for d in decompositions.decompositions("", "Pad")]
    assert all(r is not None for r in reasons) and any(reason in r for r in reasons), reasons


@pytest.mark.parametrize(
    ("equation", "a_shape", "b_shape"),
    [
        ("ij,jk->ik", [3, 4], [4, 5]),
        ("bij,bjk->bik", [2, 3, 4], [2, 4, 5]),
        ("bhqd,bhkd->bhqk", [2, 3, 4, 8], [2, 3, 5, 8]),
        ("bhqk,bhkd->bhqd", [2, 3, 4, 5], [2, 3, 5, 8]),
        ("b h q k , b h k d -> b h q d", [1, 2, 3, 4], [1, 2, 4, 5]),
        ("...ij,...jk->...ik", [2, 3, 4, 5], [2, 3, 5, 2]),
        ("nd,md->nm", [3, 4], [5, 4]),
        ("bij,bkj->bik", [2, 3, 4], [2, 5, 4]),
        ("i,j->ij", [3], [4]),
        ("i,i->", [6], [6]),
    ],
)
def test_einsum(equation: str, a_shape: list[int], b_shape: list[int], rng) -> None:
    node = helper.make_node("Einsum", ["a", "b"], ["y"], equation=equation)
    inputs = {"a": (FLOAT, a_shape), "b": (FLOAT, b_shape)}
    model = make_model([node], inputs, {"y": (FLOAT, None)})
    feeds = {
        "a": rng.standard_normal(a_shape).astype(np.float32),
        "b": rng.standard_normal(b_shape).astype(np.float32),
    }
    assert_decomposes(model, feeds, "Einsum")


def test_einsum_other_equation_not_applicable() -> None:
    node = helper.make_node("Einsum", ["a", "b"], ["y"], equation="ij,ij->ij")
    model = make_model([node], {"a": (FLOAT, [2, 2]), "b": (FLOAT, [2, 2])}, {"y": (FLOAT, None)})
    einsum = next(iter(model.graph))
    options = decompositions.decompositions("", "Einsum")
    assert all(d.reason_not_applicable(einsum, 17) for d in options)
