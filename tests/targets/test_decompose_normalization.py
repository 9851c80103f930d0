"""Decompositions of normalization ops: structure and numerics against ORT's kernels."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import FLOAT, assert_decomposes, make_model
from onnx import helper


@pytest.mark.parametrize("axis", [-1, 1, -2])
def test_layer_normalization(axis: int, rng) -> None:
    shape = [2, 3, 4]
    norm_shape = shape[axis:]
    node = helper.make_node("LayerNormalization", ["x", "s", "b"], ["y"], axis=axis, epsilon=1e-3)
    inits = {
        "s": rng.standard_normal(norm_shape).astype(np.float32),
        "b": rng.standard_normal(norm_shape).astype(np.float32),
    }
    model = make_model([node], {"x": (FLOAT, shape)}, {"y": (FLOAT, shape)}, inits)
    feeds = {"x": rng.standard_normal(shape).astype(np.float32)}
    result = assert_decomposes(model, feeds, "LayerNormalization")
    assert "ReduceSum" in [n.op_type for n in result.graph]
