"""stream-attention: causal self-attention gets key/value caches; chunked == offline."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import pytest
from conftest import FLOAT, make_model
from onnx import helper

from onnxopt import Pipeline, UnsupportedModelError, UsageError
from onnxopt.passes.stream import StreamPass
from onnxopt.passes.stream_attention import StreamAttentionPass, band_of
from onnxopt.streaming import StreamSpec, offline_difference

D, HEADS, TMAX = 8, 2, 256


class Graph:
    """A tiny builder: ``g.op("MatMul", a, b)`` appends a node and returns its output name."""

    def __init__(self, rng: np.random.Generator) -> None:
        self.rng, self.nodes, self.inits = rng, [], {}

    def op(self, op_type: str, *inputs: str, name: str | None = None, **attrs) -> str:
        out = f"v{len(self.nodes)}"
        node_name = name or f"{op_type.lower()}{len(self.nodes)}"
        self.nodes.append(helper.make_node(op_type, list(inputs), [out], name=node_name, **attrs))
        return out

    def const(self, array, name: str | None = None) -> str:
        name = name or f"c{len(self.inits)}"
        self.inits[name] = np.asarray(array)
        return name

    def weight(self, *shape: int) -> str:
        return self.const((self.rng.standard_normal(shape) / np.sqrt(shape[0])).astype(np.float32))

    def model(self, y: str, inputs: dict | None = None) -> ir.Model:
        self.nodes.append(helper.make_node("Identity", [y], ["y"]))
        inputs = inputs or {"x": (FLOAT, ["batch", "time", D])}
        return make_model(self.nodes, inputs, {"y": (FLOAT, None)}, self.inits)


def _length(g: Graph, x: str) -> str:
    """The frame count of x[batch, time, D] as a 1-element vector (Shape -> Gather)."""
    return g.op("Gather", g.op("Shape", x), g.const([1]))


def _additive_tril(g: Graph, x: str) -> str:
    """A [T, T] slice of a 0 / -inf lower-triangular buffer, as models register it."""
    table = np.where(np.tril(np.ones((TMAX, TMAX), bool)), 0, -np.inf).astype(np.float32)
    t = _length(g, x)
    ends = g.op("Concat", t, t, axis=0)
    return g.op("Slice", g.const(table, "tril"), g.const([0, 0]), ends)


def _band_condition(g: Graph, x: str, left: int) -> str:
    """keep[i, j] = 0 <= i - j < left, computed from Range over the length (bool [T, T])."""
    t = g.op("Squeeze", _length(g, x), g.const([0]))
    pos = g.op("Range", g.const(np.array(0)), t, g.const(np.array(1)))
    diff = g.op(
        "Sub",
        g.op("Unsqueeze", pos, g.const([1])),
        g.op("Unsqueeze", pos, g.const([0])),
    )
    past = g.op("Not", g.op("Less", diff, g.const(np.array(0))))
    near = g.op("Less", diff, g.const(np.array(left)))
    return g.op("And", past, near)


def _attention(g: Graph, x: str, mask: str | None, kind: str = "add", name: str = "attn") -> str:
    """Multi-head self-attention on x[batch, time, D], heads split by Reshape/Transpose."""
    dh = D // HEADS
    heads = g.const([0, 0, HEADS, dh])
    q, k, v = (g.op("Reshape", g.op("MatMul", x, g.weight(D, D)), heads) for _ in range(3))
    q = g.op("Transpose", q, perm=[0, 2, 1, 3])
    kt = g.op("Transpose", k, perm=[0, 2, 3, 1])
    v = g.op("Transpose", v, perm=[0, 2, 1, 3])
    scores = g.op("MatMul", q, kt, name=f"{name}/scores")
    scores = g.op("Mul", scores, g.const(np.array(dh**-0.5, np.float32)))
    if mask is not None and kind == "add":
        scores = g.op("Add", scores, mask, name=f"{name}/mask")
    elif mask is not None:
        fill = g.const(np.array(-np.inf, np.float32))
        scores = g.op("Where", mask, scores, fill, name=f"{name}/mask")
    probs = g.op("Softmax", scores, axis=-1, name=f"{name}/softmax")
    out = g.op("Transpose", g.op("MatMul", probs, v), perm=[0, 2, 1, 3])
    return g.op("MatMul", g.op("Reshape", out, g.const([0, 0, D])), g.weight(D, D))


def _block(g: Graph, x: str, mask: str | None, kind: str = "add") -> str:
    """Pre-norm transformer block: x + attn(LN(x)); then x + FFN(LN(x))."""
    scale, bias = g.const(np.ones(D, np.float32)), g.const(np.zeros(D, np.float32))
    h = g.op("Add", x, _attention(g, g.op("LayerNormalization", x, scale, bias), mask, kind))
    ffn = g.op("MatMul", g.op("Relu", g.op("MatMul", h, g.weight(D, 2 * D))), g.weight(2 * D, D))
    return g.op("Add", h, ffn)


def _causal_transformer(rng) -> ir.Model:
    g = Graph(rng)
    return g.model(_block(g, "x", _additive_tril(g, "x")))


def _streamed(model: ir.Model, pass_) -> tuple[ir.Model, object]:
    result, report = Pipeline([pass_]).run(model)
    entry = report.passes[0]
    assert entry.status == "ok", entry.reason
    assert entry.metrics["max_abs"] < 1e-4
    return result, entry


def _x(rng, frames: int, batch: int = 2, width: int = D) -> dict[str, np.ndarray]:
    return {"x": rng.standard_normal((batch, frames, width)).astype(np.float32)}


def test_causal_transformer_block_gets_growing_caches(rng) -> None:
    model = _causal_transformer(rng)
    result, entry = _streamed(model, StreamAttentionPass(chunk=4))
    assert entry.counts == {"attention-cache": 1}
    states = {s.input: s for s in StreamSpec.read(result).states}
    assert set(states) == {"attn/scores.k_in", "attn/scores.v_in", "stream.position_in"}
    assert states["attn/scores.k_in"].shape == ["batch", HEADS, D // HEADS, "past"]
    assert states["attn/scores.k_in"].grow_axis == 3  # K^T: keys along the last axis
    assert states["attn/scores.v_in"].grow_axis == 2
    assert (
        states["stream.position_in"].shape == [] and states["stream.position_in"].dtype == "int64"
    )
    assert "tril" not in result.graph.initializers  # the offline mask is gone
    assert offline_difference(model, result, _x(rng, 50), chunks=[1, 4, 7, 64]) < 1e-5


def test_banded_mask_keeps_fixed_caches_of_its_left_context(rng) -> None:
    g = Graph(rng)
    model = g.model(_block(g, "x", _band_condition(g, "x", left=5), kind="where"))
    result, entry = _streamed(model, StreamAttentionPass(chunk=4))
    spec = StreamSpec.read(result)
    k_in = next(s for s in spec.states if s.input.endswith("k_in"))
    assert k_in.shape == ["batch", HEADS, D // HEADS, 4] and k_in.grow_axis is None
    assert "left context 4 frames" in entry.notes[0]
    assert offline_difference(model, result, _x(rng, 41), chunks=[1, 3, 4, 16]) < 1e-5


def test_left_context_caps_the_caches(rng) -> None:
    model = _causal_transformer(rng)
    # golden lengths (16, 23) outgrow 5 frames of context: streaming differs from offline
    _, report = Pipeline([StreamAttentionPass(chunk=4, left_context=5)]).run(model.clone())
    assert report.passes[0].status == "failed"
    result = StreamAttentionPass(chunk=4, left_context=30)(model.clone()).model
    k_in = next(s for s in StreamSpec.read(result).states if s.input.endswith("k_in"))
    assert k_in.shape[-1] == 30 and k_in.grow_axis is None
    assert offline_difference(model, result, _x(rng, 31), chunks=[2, 4, 31]) < 1e-5
    with pytest.raises(UsageError, match="left_context"):
        StreamAttentionPass.from_options({"left_context": "-1"})


def _conformer(rng, left: int = 6, kernel: int = 5) -> ir.Model:
    """FFN/2, banded self-attention, and a conv module (GLU, causal depthwise conv, BN, swish)."""
    g = Graph(rng)
    x = g.op("Add", "x", g.op("Mul", g.op("MatMul", "x", g.weight(D, D)), g.const(np.float32(0.5))))
    x = g.op("Add", x, _attention(g, x, _band_condition(g, x, left), kind="where", name="mhsa"))
    c = g.op("Transpose", x, perm=[0, 2, 1])
    c = g.op("Conv", c, g.weight(2 * D, D, 1), name="pointwise1")
    a = g.op("Split", c, g.const([D, D]), axis=1)
    g.nodes[-1].output.append("gate")  # GLU: a * sigmoid(gate)
    c = g.op("Mul", a, g.op("Sigmoid", "gate"))
    c = g.op("Conv", c, g.weight(D, 1, kernel), group=D, pads=[kernel - 1, kernel - 1], name="dw")
    c = g.op("Slice", c, g.const([0]), g.const([-(kernel - 1)]), g.const([2]), name="chomp")
    ones, zeros = g.const(np.ones(D, np.float32)), g.const(np.zeros(D, np.float32))
    c = g.op("BatchNormalization", c, ones, zeros, g.weight(D), ones)
    c = g.op("Mul", c, g.op("Sigmoid", c))
    c = g.op("Conv", c, g.weight(D, D, 1), name="pointwise2")
    return g.model(g.op("Add", x, g.op("Transpose", c, perm=[0, 2, 1])))


def test_conformer_block_streams_with_the_stream_pass(rng) -> None:
    model = _conformer(rng)
    with pytest.raises(UsageError, match=r"'dw' \(Conv\) keeps past frames; it needs stream-conv"):
        StreamAttentionPass()(model.clone())
    result, entry = _streamed(model, StreamPass(chunk=8))
    assert entry.counts == {"attention-cache": 1, "conv-cache": 1}
    shapes = {s.input: s.shape for s in StreamSpec.read(result).states}
    assert shapes["dw.cache_in"] == ["batch", D, 4]
    assert shapes["mhsa/scores.v_in"] == ["batch", HEADS, 5, D // HEADS]
    assert offline_difference(model, result, _x(rng, 45), chunks=[1, 5, 8]) < 1e-5


def test_attention_without_a_mask_is_refused(rng) -> None:
    g = Graph(rng)
    model = g.model(_block(g, "x", None))
    with pytest.raises(UnsupportedModelError, match=r"'attn/softmax' \(Softmax\) attends to every"):
        StreamAttentionPass()(model)


def test_masks_that_see_the_future_are_refused(rng) -> None:
    """keep[i, j] = |i - j| < 3: each frame sees 2 frames ahead."""
    g = Graph(rng)
    t = g.op("Squeeze", _length(g, "x"), g.const([0]))
    pos = g.op("Range", g.const(np.array(0)), t, g.const(np.array(1)))
    diff = g.op("Sub", g.op("Unsqueeze", pos, g.const([1])), g.op("Unsqueeze", pos, g.const([0])))
    keep = g.op("Less", g.op("Abs", diff), g.const(np.array(3)))
    model = g.model(_attention(g, "x", keep, kind="where"))
    with pytest.raises(UnsupportedModelError, match=r"'attn/mask' \(Where\) .*not causal"):
        StreamAttentionPass()(model)


def test_position_embeddings_count_from_the_stream_position(rng) -> None:
    """A GPT-like block: learned embeddings of Range(0, T), plus a sinusoid table cut to T."""
    g = Graph(rng)
    t = g.op("Squeeze", _length(g, "x"), g.const([0]))
    positions = g.op("Range", g.const(np.array(0)), t, g.const(np.array(1)), name="arange")
    learned = g.op("Gather", g.weight(TMAX, D), positions)
    table = g.const(rng.standard_normal((1, TMAX, D)).astype(np.float32))
    sinusoid = g.op("Slice", table, g.const([0]), _length(g, "x"), g.const([1]), name="pe")
    x = g.op("Add", g.op("Add", "x", learned), sinusoid)
    model = g.model(_block(g, x, _additive_tril(g, "x")))
    result, entry = _streamed(model, StreamAttentionPass(chunk=4))
    assert entry.counts == {"attention-cache": 1, "position-offset": 2}
    positions_state = [s for s in StreamSpec.read(result).states if "position" in s.input]
    assert len(positions_state) == 1  # embeddings and the mask share one stream position
    assert offline_difference(model, result, _x(rng, 37), chunks=[1, 4, 7]) < 1e-5


def test_position_dependent_biases_are_refused(rng) -> None:
    g = Graph(rng)
    bias = g.op("Add", _additive_tril(g, "x"), g.const(np.float32(0.5)))  # not just 0 / -inf
    model = g.model(_attention(g, "x", bias))
    with pytest.raises(UnsupportedModelError, match="position-dependent bias"):
        StreamAttentionPass()(model)


def test_band_of_reads_left_context() -> None:
    i, j = np.indices((6, 6))
    assert band_of(j <= i) is None
    assert band_of((j <= i) & (i - j < 2)) == 2
    with pytest.raises(ValueError, match="not causal"):
        band_of(np.abs(i - j) < 2)


def _relative(g: Graph, x: str, dtype=np.int64) -> str:
    """i - j for query i and key j: [T, T] from Range(0, T), the way exporters build it."""
    t = g.op("Squeeze", _length(g, x), g.const([0]))
    pos = g.op(
        "Range",
        g.const(np.array(0, dtype)),
        g.op("Cast", t, to=_ONNX[dtype]),
        g.const(np.array(1, dtype)),
    )
    return g.op("Sub", g.op("Unsqueeze", pos, g.const([1])), g.op("Unsqueeze", pos, g.const([0])))


_ONNX = {np.int64: 7, np.float32: 1}


def _bias_table(g: Graph, rel: str, buckets: int = 16, op: str = "Gather") -> str:
    """A learned bias per head of clip(i - j, 0, buckets-1): [1, HEADS, T, T] (T5-style)."""
    index = g.op("Clip", rel, g.const(np.array(0)), g.const(np.array(buckets - 1)))
    table = g.const(g.rng.standard_normal((buckets, HEADS)).astype(np.float32))
    if op == "GatherND":
        looked = g.op("GatherND", table, g.op("Unsqueeze", index, g.const([-1])))
    else:
        looked = g.op("Gather", table, index)
    return g.op("Unsqueeze", g.op("Transpose", looked, perm=[2, 0, 1]), g.const([0]))


def _attention_with_bias(g: Graph, x: str, bias: str, mask: str | None, name: str = "attn") -> str:
    """_attention, with a position bias added to the scores before the (optional) mask."""
    dh = D // HEADS
    heads = g.const([0, 0, HEADS, dh])
    q, k, v = (g.op("Reshape", g.op("MatMul", x, g.weight(D, D)), heads) for _ in range(3))
    q = g.op("Transpose", q, perm=[0, 2, 1, 3])
    kt = g.op("Transpose", k, perm=[0, 2, 3, 1])
    v = g.op("Transpose", v, perm=[0, 2, 1, 3])
    scores = g.op("MatMul", q, kt, name=f"{name}/scores")
    scores = g.op(
        "Add", g.op("Mul", scores, g.const(np.float32(dh**-0.5))), bias, name=f"{name}/rel"
    )
    if mask is not None:
        scores = g.op("Add", scores, mask, name=f"{name}/mask")
    probs = g.op("Softmax", scores, axis=-1, name=f"{name}/softmax")
    out = g.op("Transpose", g.op("MatMul", probs, v), perm=[0, 2, 1, 3])
    return g.op("MatMul", g.op("Reshape", out, g.const([0, 0, D])), g.weight(D, D))


@pytest.mark.parametrize("gather", ["Gather", "GatherND"])
def test_relative_position_bias_streams_from_the_stream_position(rng, gather) -> None:
    """T5-style: table[clip(i - j)] per head added to the scores, a separate causal mask."""
    g = Graph(rng)
    bias = _bias_table(g, _relative(g, "x"), op=gather)
    model = g.model(_attention_with_bias(g, "x", bias, _additive_tril(g, "x")))
    result, entry = _streamed(model, StreamAttentionPass(chunk=4))
    assert entry.counts == {"attention-cache": 1, "relative-position": 1}
    assert offline_difference(model, result, _x(rng, 37), chunks=[1, 4, 7, 37]) < 1e-5


def test_relative_bias_that_masks_keeps_a_band_of_caches(rng) -> None:
    """One tensor is bias and band mask: Where(0 <= i - j < 6, table[i - j], -inf), float ranges."""
    g = Graph(rng)
    rel = _relative(g, "x", np.float32)
    near = g.op(
        "And",
        g.op("Not", g.op("Less", rel, g.const(np.float32(0)))),
        g.op("Less", rel, g.const(np.float32(6))),
    )
    index = g.op("Cast", g.op("Clip", rel, g.const(np.float32(0)), g.const(np.float32(15))), to=7)
    bias = _bias_table(g, index)
    masked = g.op("Where", near, bias, g.const(np.float32(-np.inf)))
    model = g.model(_attention_with_bias(g, "x", masked, None))
    result, entry = _streamed(model, StreamPass(chunk=4))
    k_in = next(s for s in StreamSpec.read(result).states if s.input.endswith("k_in"))
    assert k_in.shape[-1] == 5 and k_in.grow_axis is None
    assert entry.counts == {"attention-cache": 1, "relative-position": 1}
    assert offline_difference(model, result, _x(rng, 41), chunks=[1, 3, 4, 16]) < 1e-5


def test_a_relative_bias_without_a_causal_mask_is_refused(rng) -> None:
    g = Graph(rng)
    model = g.model(_attention_with_bias(g, "x", _bias_table(g, _relative(g, "x")), None))
    with pytest.raises(UnsupportedModelError, match=r"'attn/scores' \(MatMul\) .*position bias"):
        StreamAttentionPass()(model)


def _distance_embedding(g: Graph, x: str, table: bool = False) -> str:
    """Sinusoids of distances T-1..1-T (Range(T-1, -T, -1)), projected per head: [H, dh, 2T-1].

    ``table``: rows c-T+1..c+T-1 of a table of 2c+1 distances (wav2vec2-conformer's cut).
    """
    t = g.op("Squeeze", _length(g, x), g.const([0]))
    if table:
        pe = g.const(g.rng.standard_normal((2 * TMAX - 1, D)).astype(np.float32))
        start = g.op("Sub", g.const([TMAX]), _length(g, x))
        end = g.op("Add", g.const([TMAX - 1]), _length(g, x))
        pe = g.op("Slice", pe, start, end, g.const([0]), name="pe_cut")
    else:
        start = g.op("Cast", g.op("Sub", t, g.const(np.array(1))), to=1)
        dist = g.op("Range", start, g.op("Cast", g.op("Neg", t), to=1), g.const(np.float32(-1)))
        freq = g.const((10000.0 ** -(np.arange(D // 2) / (D // 2))).astype(np.float32))
        angles = g.op("Mul", g.op("Unsqueeze", dist, g.const([1])), freq)
        pe = g.op("Concat", g.op("Sin", angles), g.op("Cos", angles), axis=-1)
    p = g.op("MatMul", pe, g.weight(D, D), name="linear_pos")
    return g.op("Transpose", g.op("Reshape", p, g.const([-1, HEADS, D // HEADS])), perm=[1, 2, 0])


def _rel_shift(g: Graph, bd: str, proper: bool = True) -> str:
    """[B, H, T, 2T-1] -> [B, H, T, T]: pad a zero column, view [B, H, 2T, T], drop a row,
    view back, keep T columns (Transformer-XL). Not ``proper``: just the first T columns."""
    shape = g.op("Shape", bd)
    lead, t = g.op("Slice", shape, g.const([0]), g.const([2])), g.op("Gather", shape, g.const([2]))
    if proper:
        padded = g.op("Pad", bd, g.const([0, 0, 0, 1, 0, 0, 0, 0]))
        wide = g.op("Gather", g.op("Shape", padded), g.const([3]))
        rows = g.op("Reshape", padded, g.op("Concat", lead, wide, t, axis=0))
        rows = g.op("Slice", rows, g.const([1]), g.const([np.iinfo(np.int64).max]), g.const([2]))
        bd = g.op(
            "Reshape", rows, g.op("Concat", lead, t, g.op("Gather", shape, g.const([3])), axis=0)
        )
    return g.op("Slice", bd, g.const([0]), t, g.const([3]))


def _xl_attention(
    g: Graph,
    x: str,
    mask: str,
    kind: str = "add",
    proper: bool = True,
    table: bool = False,
    pos: str | None = None,
    name: str = "attn",
) -> str:
    """scores = ((q + u) K^T + rel_shift((q + v) P^T)) / sqrt(dh) + mask (Transformer-XL)."""
    dh = D // HEADS
    heads = g.const([0, 0, HEADS, dh])
    q, k, v = (g.op("Reshape", g.op("MatMul", x, g.weight(D, D)), heads) for _ in range(3))
    kt = g.op("Transpose", k, perm=[0, 2, 3, 1])
    v = g.op("Transpose", v, perm=[0, 2, 1, 3])
    qu = g.op("Transpose", g.op("Add", q, g.weight(HEADS, dh)), perm=[0, 2, 1, 3])
    qv = g.op("Transpose", g.op("Add", q, g.weight(HEADS, dh)), perm=[0, 2, 1, 3])
    ac = g.op("MatMul", qu, kt, name=f"{name}/scores")
    pos = pos or _distance_embedding(g, x, table)
    bd = g.op("MatMul", qv, pos, name=f"{name}/relative")
    scores = g.op("Mul", g.op("Add", ac, _rel_shift(g, bd, proper)), g.const(np.float32(dh**-0.5)))
    if kind == "add":
        scores = g.op("Add", scores, mask, name=f"{name}/mask")
    else:
        scores = g.op("Where", mask, scores, g.const(np.float32(-np.inf)), name=f"{name}/mask")
    out = g.op("MatMul", g.op("Softmax", scores, axis=-1), v)
    out = g.op("Transpose", out, perm=[0, 2, 1, 3])
    return g.op("MatMul", g.op("Reshape", out, g.const([0, 0, D])), g.weight(D, D))


@pytest.mark.parametrize(("band", "table"), [(None, False), (5, False), (None, True), (5, True)])
def test_transformer_xl_relative_attention_streams(rng, band, table) -> None:
    """Distances K-1..1-C for a chunk of C queries and K keys; the shift becomes a gather."""
    g = Graph(rng)
    if band is None:
        model = g.model(_xl_attention(g, "x", _additive_tril(g, "x"), table=table))
    else:
        mask = _band_condition(g, "x", band)
        model = g.model(_xl_attention(g, "x", mask, kind="where", table=table))
    result, entry = _streamed(model, StreamPass(chunk=4))
    assert entry.counts == {"attention-cache": 1, "relative-shift": 1}
    k_in = next(s for s in StreamSpec.read(result).states if s.input.endswith("k_in"))
    assert k_in.grow_axis == (3 if band is None else None)
    assert offline_difference(model, result, _x(rng, 37), chunks=[1, 4, 7, 37]) < 1e-5


def test_a_shift_other_than_transformer_xl_is_refused(rng) -> None:
    g = Graph(rng)
    model = g.model(_xl_attention(g, "x", _additive_tril(g, "x"), proper=False))
    with pytest.raises(UnsupportedModelError, match=r"'attn/relative' .*not Transformer-XL"):
        StreamAttentionPass()(model)


def test_distances_from_a_length_other_than_t_are_refused(rng) -> None:
    """Range(T-1, -T, -1) probes as distances; Range(T+1, -T, -1) is refused by name."""
    g = Graph(rng)
    model = g.model(_xl_attention(g, "x", _additive_tril(g, "x")))
    sub = next(n for n in model.graph if n.op_type == "Sub" and n.inputs[1].const_value is not None)
    sub.inputs[1].const_value = ir.tensor(np.array(-1))
    with pytest.raises(UnsupportedModelError, match=r"\(Range\) gives positions other than"):
        StreamAttentionPass()(model)


def _fused(rng, op: str, causal: int = 1) -> ir.Model:
    """x -> Q, K, V -> fused attention (Attention-23 on 4-D or 3-D, or MultiHeadAttention)."""
    g = Graph(rng)
    dh = D // HEADS
    q, k, v = (g.op("MatMul", "x", g.weight(D, D)) for _ in range(3))
    if op == "Attention4d":
        heads = g.const([0, 0, HEADS, dh])
        q, k, v = (
            g.op("Transpose", g.op("Reshape", t, heads), perm=[0, 2, 1, 3]) for t in (q, k, v)
        )
        out = g.op("Attention", q, k, v, is_causal=causal, name="attn")
        out = g.op("Reshape", g.op("Transpose", out, perm=[0, 2, 1, 3]), g.const([0, 0, D]))
    elif op == "Attention3d":
        kw = {"q_num_heads": HEADS, "kv_num_heads": HEADS}
        out = g.op("Attention", q, k, v, is_causal=causal, name="attn", **kw)
    else:
        bias = g.op("Unsqueeze", _additive_tril(g, "x"), g.const([0, 1]))  # [1, 1, T, T]
        g.nodes.append(
            helper.make_node(
                "MultiHeadAttention",
                [q, k, v, "", "", bias],
                ["mha"],
                domain="com.microsoft",
                num_heads=HEADS,
                name="attn",
            )
        )
        out = "mha"
    model = g.model(g.op("MatMul", out, g.weight(D, D)))
    model.opset_imports[""] = 23 if op.startswith("Attention") else 17
    model.opset_imports["com.microsoft"] = 1
    return model


@pytest.mark.parametrize("op", ["Attention4d", "Attention3d", "MultiHeadAttention"])
def test_fused_causal_attention_is_decomposed_then_streamed(rng, op) -> None:
    model = _fused(rng, op)
    result, entry = _streamed(model, StreamAttentionPass(chunk=4))
    assert entry.counts == {"attention-cache": 1, "decompose-attention": 1}
    assert not any(n.op_type in ("Attention", "MultiHeadAttention") for n in result.graph)
    states = {s.input for s in StreamSpec.read(result).states}
    assert {"attn.k_in", "attn.v_in"} <= states  # caches named after the fused node
    assert offline_difference(model, result, _x(rng, 29), chunks=[1, 4, 7]) < 1e-5


def test_fused_attention_without_causal_flag_is_refused(rng) -> None:
    with pytest.raises(UnsupportedModelError, match=r"node 'attn/.*' \(Softmax\) attends to every"):
        StreamAttentionPass()(_fused(rng, "Attention4d", causal=0))
    model = _fused(rng, "MultiHeadAttention")
    next(n for n in model.graph if n.name == "attn").attributes["unidirectional"] = ir.AttrInt64(
        "unidirectional", 1
    )
    with pytest.raises(UnsupportedModelError, match=r"'attn' .*cannot be decomposed: unidir"):
        StreamAttentionPass()(model)


def _t5_model(rng) -> ir.Model:
    g = Graph(rng)
    bias = _bias_table(g, _relative(g, "x"))
    return g.model(_attention_with_bias(g, "x", bias, _additive_tril(g, "x")))


def _xl_model(rng) -> ir.Model:
    g = Graph(rng)
    return g.model(_xl_attention(g, "x", _additive_tril(g, "x")))


@pytest.mark.parametrize(
    ("build", "rules"),
    [
        (_causal_transformer, {}),
        (_t5_model, {"relative-position": 1}),  # fusion sums the bias and the mask
        (_xl_model, {"relative-shift": 1}),  # MultiHeadAttention on 4-D K/V, expanded bias
    ],
)
@pytest.mark.parametrize("opset", [17, 23])  # fuse-attention emits MultiHeadAttention / Attention
def test_fused_then_streamed_in_one_pipeline(rng, opset, build, rules) -> None:
    model = build(rng)
    model.opset_imports[""] = opset
    result, report = Pipeline("fuse,stream(chunk=4)").run(model.clone())
    entries = {p.name: p for p in report.passes}
    assert entries["fuse-attention"].counts == {"attention": 1}
    assert entries["stream"].status == "ok", entries["stream"].reason
    expected = {"attention-cache": 1, "decompose-attention": 1, **rules}
    assert entries["stream"].counts == expected
    assert offline_difference(model, result, _x(rng, 27), chunks=[1, 4, 7]) < 1e-5


def test_positions_counted_from_one_are_refused(rng) -> None:
    """Range(1, T + 1) is neither positions from 0 nor distances: refused where projected."""
    g = Graph(rng)
    t = g.op("Squeeze", _length(g, "x"), g.const([0]))
    end = g.op("Add", t, g.const(np.array(1)))
    pos = g.op("Cast", g.op("Range", g.const(np.array(1)), end, g.const(np.array(1))), to=1)
    emb = g.op("MatMul", g.op("Unsqueeze", pos, g.const([1])), g.weight(1, D), name="proj")
    model = g.model(_block(g, g.op("Add", "x", emb), _additive_tril(g, "x")))
    with pytest.raises(UnsupportedModelError, match=r"'proj' \(MatMul\) projects positions"):
        StreamAttentionPass()(model)


@pytest.mark.parametrize("band", [None, 5])
def test_two_layers_share_their_relative_positions(rng, band) -> None:
    """One T5 bias and one distance embedding feed both layers (growing or banded caches)."""
    g = Graph(rng)
    if band is None:
        mask, kind = _additive_tril(g, "x"), "add"
    else:
        mask, kind = _band_condition(g, "x", band), "where"
    bias = _bias_table(g, _relative(g, "x"))
    p = _distance_embedding(g, "x", table=True)
    h = "x"
    for layer in range(2):
        if kind == "add":
            h = g.op("Add", h, _attention_with_bias(g, h, bias, mask, name=f"t5_{layer}"))
        else:
            bias_masked = g.op("Where", mask, bias, g.const(np.float32(-np.inf)))
            h = g.op("Add", h, _attention_with_bias(g, h, bias_masked, None, name=f"t5_{layer}"))
        h = g.op("Add", h, _xl_attention(g, h, mask, kind, pos=p, name=f"xl_{layer}"))
    model = g.model(h)
    result, entry = _streamed(model, StreamPass(chunk=4))
    grids = 1 if band is None else 2  # the band condition inside the bias is a grid too
    assert entry.counts == {"attention-cache": 4, "relative-position": grids, "relative-shift": 2}
    assert offline_difference(model, result, _x(rng, 30), chunks=[1, 4, 7]) < 1e-5


def test_t5_log_buckets_with_grid_shaped_constants_stream(rng) -> None:
    """T5's causal buckets: -min(j - i, zeros_like), exact below 8, log-spaced up to 15."""
    g = Graph(rng)
    t = g.op("Squeeze", _length(g, "x"), g.const([0]))
    pos = g.op("Range", g.const(np.array(0)), t, g.const(np.array(1)))
    rel = g.op("Sub", g.op("Unsqueeze", pos, g.const([0])), g.op("Unsqueeze", pos, g.const([1])))
    zeros = g.op("ConstantOfShape", g.op("Shape", rel), value=helper.make_tensor("", 7, [1], [0]))
    n = g.op("Neg", g.op("Min", rel, zeros))
    scaled = g.op(
        "Div",
        g.op("Log", g.op("Div", g.op("Cast", n, to=1), g.const(np.float32(8)))),
        g.const(np.float32(np.log(16.0))),
    )
    large = g.op(
        "Add", g.const(np.array(8)), g.op("Cast", g.op("Mul", scaled, g.const(np.float32(8))), to=7)
    )
    large = g.op("Min", large, g.op("Expand", g.const(np.array(15)), g.op("Shape", large)))
    bucket = g.op("Where", g.op("Less", n, g.const(np.array(8))), n, large)
    model = g.model(_attention_with_bias(g, "x", _bias_table(g, bucket), _additive_tril(g, "x")))
    result, entry = _streamed(model, StreamAttentionPass(chunk=4))
    assert entry.counts == {"attention-cache": 1, "relative-position": 1}
    assert offline_difference(model, result, _x(rng, 150), chunks=[3, 16, 150]) < 1e-5


def test_attention_with_past_inputs_is_already_streaming(rng) -> None:
    """Attention-23 fed past_key/past_value by graph inputs keeps its own cache: unchanged."""
    g = Graph(rng)
    heads = g.const([0, 0, HEADS, D // HEADS])
    q, k, v = (
        g.op(
            "Transpose",
            g.op("Reshape", g.op("MatMul", "x", g.weight(D, D)), heads),
            perm=[0, 2, 1, 3],
        )
        for _ in range(3)
    )
    g.nodes.append(
        helper.make_node(
            "Attention",
            [q, k, v, "", "past_k", "past_v"],
            ["attn_out", "present_k", "present_v"],
            name="attn",
        )
    )
    out = g.op("Reshape", g.op("Transpose", "attn_out", perm=[0, 2, 1, 3]), g.const([0, 0, D]))
    past = (FLOAT, ["batch", HEADS, "past", D // HEADS])
    model = g.model(out, {"x": (FLOAT, ["batch", "time", D]), "past_k": past, "past_v": past})
    model.opset_imports[""] = 23
    result = StreamPass()(model)
    assert not result.modified
    assert "takes past keys and values from input 'past_k'" in result.notes[0]


def test_grouped_query_attention_23_repeats_kv_heads_then_streams(rng) -> None:
    """Attention-23 with 2 Q heads over 1 K/V head (as fuse-attention leaves GQA): exact."""
    g = Graph(rng)
    dh = D // HEADS
    q = g.op("Reshape", g.op("MatMul", "x", g.weight(D, D)), g.const([0, 0, HEADS, dh]))
    q = g.op("Transpose", q, perm=[0, 2, 1, 3])
    k, v = (
        g.op(
            "Transpose",
            g.op("Reshape", g.op("MatMul", "x", g.weight(D, dh)), g.const([0, 0, 1, dh])),
            perm=[0, 2, 1, 3],
        )
        for _ in range(2)
    )
    out = g.op("Attention", q, k, v, is_causal=1, name="gqa")
    out = g.op("Reshape", g.op("Transpose", out, perm=[0, 2, 1, 3]), g.const([0, 0, D]))
    model = g.model(g.op("MatMul", out, g.weight(D, D)))
    model.opset_imports[""] = 23
    result, entry = _streamed(model, StreamAttentionPass(chunk=4))
    assert entry.counts == {"attention-cache": 1, "decompose-attention": 1}
    assert offline_difference(model, result, _x(rng, 29), chunks=[1, 4, 7]) < 1e-5
