"""stream-conv: causal convs keep a cache of past frames; chunked == offline; strides align."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import pytest
from conftest import FLOAT, make_model, op_types
from onnx import helper

from onnxopt import Pipeline, UnsupportedModelError, UsageError
from onnxopt.passes.stream_conv import StreamConvPass
from onnxopt.streaming import StreamSpec, offline_difference

C = 6


def _w(rng, *shape: int) -> np.ndarray:
    return (rng.standard_normal(shape) / np.sqrt(np.prod(shape[1:]))).astype(np.float32)


def _tcn(rng) -> ir.Model:
    """A strided front end (k=4, stride 2) and residual blocks with dilations 1, 2, 4.

    The three blocks pad in the three ways exporters write causal convs: the Conv's own pads,
    a Pad node in front, and symmetric pads with a "chomp" Slice after.
    """
    nodes = [
        helper.make_node("Conv", ["x", "w0", "b0"], ["c0"], pads=[3, 0], strides=[2], name="front"),
        helper.make_node("Relu", ["c0"], ["r0"]),
        helper.make_node("Conv", ["r0", "w1", "b1"], ["c1"], pads=[2, 0], name="block1"),
        helper.make_node("Relu", ["c1"], ["a1"]),
        helper.make_node("Add", ["a1", "r0"], ["r1"]),
        helper.make_node("Pad", ["r1", "pads2"], ["p2"]),
        helper.make_node("Conv", ["p2", "w2", "b2"], ["c2"], dilations=[2], name="block2"),
        helper.make_node("Relu", ["c2"], ["a2"]),
        helper.make_node("Add", ["a2", "r1"], ["r2"]),
        helper.make_node(
            "Conv", ["r2", "w3", "b3"], ["c3"], pads=[8, 8], dilations=[4], name="block4"
        ),
        helper.make_node("Slice", ["c3", "zero", "minus8", "two"], ["chomped"], name="chomp"),
        helper.make_node("Relu", ["chomped"], ["a3"]),
        helper.make_node("Add", ["a3", "r2"], ["y"]),
    ]
    inits = {"w0": _w(rng, C, 2, 4), "b0": _w(rng, C)}
    for i in (1, 2, 3):
        inits |= {f"w{i}": _w(rng, C, C, 3), f"b{i}": _w(rng, C)}
    inits |= {
        "pads2": np.array([0, 0, 4, 0, 0, 0]),
        "zero": np.array([0]),
        "minus8": np.array([-8]),
        "two": np.array([2]),
    }
    return make_model(nodes, {"x": (FLOAT, ["batch", 2, "time"])}, {"y": (FLOAT, None)}, inits)


def _streamed(model: ir.Model, pass_: StreamConvPass) -> tuple[ir.Model, object]:
    result, report = Pipeline([pass_]).run(model)
    entry = report.passes[0]
    assert entry.status == "ok", entry.reason
    assert entry.metrics["max_abs"] < 1e-5
    return result, entry


def _x(rng, *shape: int) -> dict[str, np.ndarray]:
    return {"x": rng.standard_normal(shape).astype(np.float32)}


def test_tcn_with_dilations_and_a_strided_front_end_streams(rng) -> None:
    model = _tcn(rng)
    result, entry = _streamed(model, StreamConvPass(chunk=8))
    assert entry.counts == {"conv-cache": 4}
    spec = StreamSpec.read(result)
    assert spec.frame_multiple == 2 and spec.outputs == {"y": 2}
    caches = {s.input: s.shape for s in spec.states}
    assert caches == {
        "front.cache_in": ["batch", 2, 3],
        "block1.cache_in": ["batch", C, 2],
        "block2.cache_in": ["batch", C, 4],
        "block4.cache_in": ["batch", C, 8],
    }
    assert "Pad" not in op_types(result) and op_types(result).count("Slice") == 4  # chomp gone
    assert all(
        list(n.attributes["pads"].as_ints()) == [0, 0] for n in result.graph if n.op_type == "Conv"
    )
    # 45 frames: odd, so the last chunk is short and ends between two strided frames
    assert offline_difference(model, result, _x(rng, 2, 2, 45), chunks=[2, 8, 14, 46]) < 1e-5


def test_chunk_must_be_a_multiple_of_the_total_stride(rng) -> None:
    nodes = [
        helper.make_node("Conv", ["x", "w0"], ["c0"], pads=[1, 0], strides=[2], name="down1"),
        helper.make_node("Conv", ["c0", "w1"], ["y"], pads=[2, 0], strides=[2], name="down2"),
    ]
    inits = {"w0": _w(rng, C, 2, 2), "w1": _w(rng, C, C, 3)}
    model = make_model(nodes, {"x": (FLOAT, ["batch", 2, "time"])}, {"y": (FLOAT, None)}, inits)
    with pytest.raises(UsageError, match=r"chunk 6 is not a multiple of .* stride \(4 frames\)"):
        StreamConvPass(chunk=6)(model.clone())
    result, _ = _streamed(model, StreamConvPass(chunk=12))
    assert StreamSpec.read(result).frame_multiple == 4
    assert offline_difference(model, result, _x(rng, 1, 2, 31), chunks=[4, 12]) < 1e-5


def test_depthwise_then_pointwise(rng) -> None:
    nodes = [
        helper.make_node("Conv", ["x", "wd"], ["d"], pads=[4, 0], group=C, name="depthwise"),
        helper.make_node("BatchNormalization", ["d", "s", "t", "m", "v"], ["n"]),
        helper.make_node("Conv", ["n", "wp"], ["y"], name="pointwise"),
    ]
    inits = {
        "wd": _w(rng, C, 1, 5),
        "wp": _w(rng, C, C, 1),
        "s": np.ones(C, np.float32),
        "t": np.zeros(C, np.float32),
        "m": _w(rng, C),
        "v": np.ones(C, np.float32),
    }
    model = make_model(nodes, {"x": (FLOAT, ["batch", C, "time"])}, {"y": (FLOAT, None)}, inits)
    result, entry = _streamed(model, StreamConvPass(chunk=4))
    assert entry.counts == {"conv-cache": 1}  # the 1x1 conv needs no cache
    assert [s.shape for s in StreamSpec.read(result).states] == [["batch", C, 4]]


@pytest.mark.parametrize("time_axis", [2, 3])
def test_conv2d_with_time_on_either_spatial_axis(rng, time_axis) -> None:
    """Frequency is padded on both sides (in the Conv, and by a Pad node), time causally."""
    freq_axis = 5 - time_axis
    conv_pads = [0, 0, 0, 0]
    conv_pads[time_axis - 2] = 2  # time: 2 before (kernel 3)
    conv_pads[freq_axis - 2] = conv_pads[freq_axis] = 1  # frequency: 1 each side
    pad = [0] * 8
    pad[time_axis], pad[freq_axis], pad[freq_axis + 4] = 2, 1, 1
    shape = ["batch", 3, "time", 8] if time_axis == 2 else ["batch", 3, 8, "time"]
    nodes = [
        helper.make_node("Conv", ["x", "w1"], ["c1"], pads=conv_pads, name="conv1"),
        helper.make_node("Pad", ["c1", "pad"], ["p"], name="pad"),
        helper.make_node("Conv", ["p", "w2"], ["y"], name="conv2"),
    ]
    inits = {"w1": _w(rng, 4, 3, 3, 3), "w2": _w(rng, 4, 4, 3, 3), "pad": np.array(pad)}
    model = make_model(nodes, {"x": (FLOAT, shape)}, {"y": (FLOAT, None)}, inits)
    result, _ = _streamed(model, StreamConvPass(chunk=4))
    cache = [s.shape for s in StreamSpec.read(result).states]
    expected = [["batch", 3, 2, 8], ["batch", 4, 2, 10]]
    if time_axis == 3:
        expected = [["batch", 3, 8, 2], ["batch", 4, 10, 2]]
    assert cache == expected  # the second cache holds frequency-padded frames
    assert "Pad" in op_types(result)  # still padding frequency
    dims = (1, 3, 21, 8) if time_axis == 2 else (1, 3, 8, 21)
    assert offline_difference(model, result, _x(rng, *dims), chunks=[1, 4, 5]) < 1e-5


def test_causal_pools_keep_caches_too(rng) -> None:
    nodes = [
        helper.make_node("MaxPool", ["x"], ["m"], kernel_shape=[3], pads=[2, 0], name="maxpool"),
        helper.make_node(
            "AveragePool", ["m"], ["y"], kernel_shape=[2], pads=[1, 0], count_include_pad=1
        ),
    ]
    model = make_model(nodes, {"x": (FLOAT, ["batch", C, "time"])}, {"y": (FLOAT, None)})
    result, entry = _streamed(model, StreamConvPass(chunk=4))
    assert entry.counts == {"maxpool-cache": 1, "averagepool-cache": 1}
    # the max pool's cache starts at the lowest float, as padding never wins a max
    assert StreamSpec.read(result).states[0].initial < -1e38
    assert offline_difference(model, result, _x(rng, 1, C, 13), chunks=[1, 3]) < 1e-5


@pytest.mark.parametrize(
    ("attrs", "reason"),
    [
        ({"pads": [1, 1]}, "pads 1 frame after the input: it reads future frames"),
        ({"pads": [1, 0]}, "reads 1 frame ahead"),
        ({"auto_pad": "SAME_UPPER"}, "pads both sides"),
        ({"pads": [3, 0]}, "pads 3 frames before a reach of 2"),
    ],
)
def test_non_causal_convs_are_refused_by_name(rng, attrs, reason) -> None:
    nodes = [helper.make_node("Conv", ["x", "w"], ["y"], name="encoder/conv", **attrs)]
    model = make_model(
        nodes, {"x": (FLOAT, ["batch", 2, "time"])}, {"y": (FLOAT, None)}, {"w": _w(rng, 2, 2, 3)}
    )
    with pytest.raises(UnsupportedModelError, match=f"node 'encoder/conv' \\(Conv\\) {reason}"):
        StreamConvPass()(model)


def test_reflect_padding_in_front_is_refused(rng) -> None:
    nodes = [
        helper.make_node("Pad", ["x", "pads"], ["p"], mode="reflect", name="reflect"),
        helper.make_node("Conv", ["p", "w"], ["y"], name="conv"),
    ]
    inits = {"w": _w(rng, 2, 2, 3), "pads": np.array([0, 0, 2, 0, 0, 0])}
    model = make_model(nodes, {"x": (FLOAT, ["batch", 2, "time"])}, {"y": (FLOAT, None)}, inits)
    with pytest.raises(UnsupportedModelError, match="'reflect' \\(Pad\\) pads time by reflection"):
        StreamConvPass()(model)


def test_a_model_without_past_context_is_left_unchanged(rng) -> None:
    nodes = [helper.make_node("Conv", ["x", "w"], ["y"], name="pointwise")]
    model = make_model(
        nodes, {"x": (FLOAT, ["batch", 2, "time"])}, {"y": (FLOAT, None)}, {"w": _w(rng, 2, 2, 1)}
    )
    result = StreamConvPass()(model)
    assert not result.modified and "nothing to stream" in result.notes[0]


def test_a_model_with_its_own_cache_is_left_unchanged(rng) -> None:
    nodes = [
        helper.make_node("Concat", ["cache", "x"], ["joined"], axis=2, name="join"),
        helper.make_node("Conv", ["joined", "w"], ["y"], name="conv"),
    ]
    model = make_model(
        nodes,
        {"x": (FLOAT, ["batch", 2, "time"]), "cache": (FLOAT, ["batch", 2, 2])},
        {"y": (FLOAT, None)},
        {"w": _w(rng, 2, 2, 3)},
    )
    result = StreamConvPass()(model)
    assert not result.modified
    assert "puts input 'cache' before the frames" in result.notes[0]
