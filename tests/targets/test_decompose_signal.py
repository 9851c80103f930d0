"""Decompositions of signal ops (STFT) against ORT's kernel."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import FLOAT, INT64, assert_decomposes, make_model
from onnx import helper

from onnxopt.targets import decompositions


@pytest.mark.parametrize("onesided", [None, 0, 1])
@pytest.mark.parametrize("window", ["hann", "none", "hann+length"])
@pytest.mark.parametrize(("length", "frame_length", "step"), [(64, 16, 4), (50, 12, 5)])
def test_stft(onesided, window: str, length: int, frame_length: int, step: int, rng) -> None:
    inits = {"step": np.array(step, np.int64)}
    names = ["x", "step"]
    if window != "none":
        n = np.arange(frame_length)
        inits["w"] = (0.5 - 0.5 * np.cos(2 * np.pi * n / frame_length)).astype(np.float32)
        names.append("w")
    if window != "hann":
        inits["n"] = np.array(frame_length, np.int64)
        names += [""] * (3 - len(names)) + ["n"]
    attrs = {} if onesided is None else {"onesided": onesided}
    node = helper.make_node("STFT", names, ["y"], **attrs)
    model = make_model([node], {"x": (FLOAT, [2, length, 1])}, {"y": (FLOAT, None)}, inits)
    feeds = {"x": rng.standard_normal([2, length, 1]).astype(np.float32)}
    result = assert_decomposes(model, feeds, "STFT", atol=1e-4)
    assert "MatMul" in [n.op_type for n in result.graph]


def test_stft_dynamic_step_and_length(rng) -> None:
    node = helper.make_node("STFT", ["x", "step", "", "n"], ["y"])
    inputs = {"x": (FLOAT, [1, 40, 1]), "step": (INT64, []), "n": (INT64, [])}
    model = make_model([node], inputs, {"y": (FLOAT, None)})
    feeds = {
        "x": rng.standard_normal([1, 40, 1]).astype(np.float32),
        "step": np.array(3, np.int64),
        "n": np.array(10, np.int64),
    }
    assert_decomposes(model, feeds, "STFT", atol=1e-4)


def test_stft_complex_signal_not_applicable() -> None:
    node = helper.make_node("STFT", ["x", "step", "", "n"], ["y"])
    inputs = {"x": (FLOAT, [1, 40, 2]), "step": (INT64, []), "n": (INT64, [])}
    stft = next(iter(make_model([node], inputs, {"y": (FLOAT, None)}).graph))
    assert all(d.reason_not_applicable(stft, 17) for d in decompositions.decompositions("", "STFT"))
