"""fuse-rotary: rotate-half rotary embeddings (Llama, Conformer; both exporters) into one op."""

from __future__ import annotations

import dataclasses

import numpy as np
import onnx_ir as ir
import pytest
from conftest import FLOAT, GOLDEN, INT64, make_model, op_types, run
from onnx import TensorProto
from test_fuse_attention import Graph

from onnxopt import GoldenSet, load
from onnxopt.passes.fuse_attention import FuseAttentionPass
from onnxopt.passes.fuse_rotary import FuseRotaryPass
from onnxopt.passes.infer_shapes import InferShapesPass

N, D = 2, 8
E = N * D
FLOAT16 = TensorProto.FLOAT16
SHAPES = ((1, 5), (2, 7))  # (batch, seq)


@dataclasses.dataclass
class Rope:
    """One way of writing ``x * cos + rotate_half(x) * sin``, as the exporters do."""

    halves: str = "dynamo"  # "dynamo": constant Slices; "ts": ends from Shape; "split"
    angles: str = "range"  # cos/sin from Range(0, seq) (batch 1); "ids": position ids input
    # [B, S] (per batch); "table": a constant cache gathered by position ids, "sliced": sliced
    # to the sequence length; "input": given
    layout: str = "bnsh"  # x as [B, N, S, D]; "sbnd": Conformer's [S, B, N, D]
    table_halves_equal: bool = True  # for angles="table"
    scale: bool = False  # TorchScript's Mul by attention_scaling after Cos/Sin
    dtype: int = FLOAT
    opset: int = 17
    head: int = D  # the head size


def _angles(g: Graph, spec: Rope, inputs: dict) -> tuple[str, str]:
    """cos and sin, [1 or B, S, D] (or [S, D] for Conformer)."""
    np_type = g.np_type
    if spec.angles in ("table", "sliced"):
        tables = []
        for fn in (np.cos, np.sin):
            half = fn(np.arange(32)[:, None] * 0.3 ** np.arange(spec.head // 2))
            other = half if spec.table_halves_equal else half[:, ::-1]
            tables.append(g.const(np.concatenate([half, other], -1), np_type))
        if spec.angles == "sliced":  # the cache sliced to the sequence length, [1, S, D]
            seq = g("Shape", "x", start=1, end=2)
            return tuple(
                g("Unsqueeze", g("Slice", t, g.const([0]), seq, g.const([0])), g.const([0]))
                for t in tables
            )
        inputs["position_ids"] = (INT64, ["batch", "seq"])
        return tuple(g("Gather", t, "position_ids") for t in tables)
    if spec.angles == "input":
        inputs["cos"] = (spec.dtype, [1, "seq", spec.head])
        inputs["sin"] = (spec.dtype, [1, "seq", spec.head])
        return "cos", "sin"
    if spec.angles == "ids":
        inputs["position_ids"] = (INT64, ["batch", "seq"])
        positions = "position_ids"
    elif spec.halves == "ts":  # TorchScript: Gather(Shape) as the Range limit
        seq = g("Gather", g("Shape", "x"), g.const(1), axis=0)
        positions = g("Range", g.const(0), seq, g.const(1))
    else:
        seq = g("Squeeze", g("Shape", "x", start=1, end=2))
        positions = g("Range", g.const(0), seq, g.const(1))
    if spec.layout == "bnsh" and spec.angles == "range":
        positions = g("Unsqueeze", positions, g.const([0]))
    inv_freq = g.const(10000.0 ** (-np.arange(0, spec.head, 2) / spec.head), np.float32)
    freqs = g("Mul", g("Cast", g("Unsqueeze", positions, g.const([-1])), to=FLOAT), inv_freq)
    emb = g("Concat", freqs, freqs, axis=-1)
    out = []
    for op in ("Cos", "Sin"):
        t = g(op, emb)
        if spec.scale:
            t = g("Mul", t, g.const(1.0, np.float32))
        out.append(g("Cast", t, to=spec.dtype) if spec.dtype != FLOAT else t)
    return out[0], out[1]


def _halves(g: Graph, x: str, spec: Rope) -> tuple[str, str]:
    half = spec.head // 2
    if spec.halves == "split":
        if spec.opset >= 18:
            return g("Split", x, axis=-1, num_outputs=2, n_out=2)
        return g("Split", x, g.const([half, half]), axis=-1, n_out=2)
    if spec.halves == "ts":
        mid = g(
            "Unsqueeze", g("Div", g("Gather", g("Shape", x), g.const(3)), g.const(2)), g.const([0])
        )
        ends = (mid, g.const([2**63 - 1]))
        starts = (g.const([0]), mid)
    else:
        starts, ends = (g.const([0]), g.const([half])), (g.const([half]), g.const([2**63 - 1]))
    return tuple(
        g("Slice", x, start, end, g.const([3]), g.const([1]))
        for start, end in zip(starts, ends, strict=True)
    )


def rope(g: Graph, x: str, cos: str, sin: str, spec: Rope) -> str:
    x1, x2 = _halves(g, x, spec)
    rotated = g("Concat", g("Neg", x2), x1, axis=-1)
    return g("Add", g("Mul", x, cos), g("Mul", rotated, sin))


def build(spec: Rope, rng: np.random.Generator) -> ir.Model:
    g = Graph(rng, spec.dtype)
    inputs = {"x": (spec.dtype, ["batch", "seq", E])}
    cos, sin = _angles(g, spec, inputs)
    heads = g("Reshape", "x", g.const([0, 0, N, D]))
    if spec.layout == "sbnd":  # Conformer: [S, B, N, D], cos [S, 1, 1, D]
        x = g("Transpose", heads, perm=[1, 0, 2, 3])
        cos, sin = (g("Unsqueeze", t, g.const([1, 2])) for t in (cos, sin))
    else:
        x = g("Transpose", heads, perm=[0, 2, 1, 3])
        cos, sin = (g("Unsqueeze", t, g.const([1])) for t in (cos, sin))
    y = rope(g, x, cos, sin, spec)
    model = make_model(g.nodes, inputs, {y: (spec.dtype, None)}, g.inits, opset=spec.opset)
    InferShapesPass()(model)
    return model


def feeds_for(model: ir.Model, rng) -> list[dict[str, np.ndarray]]:
    cases = []
    for batch, seq in SHAPES:
        feeds = {}
        for value in model.graph.inputs:
            sizes = {"batch": batch, "seq": seq}
            shape = [d if isinstance(d, int) else sizes[d.value] for d in value.shape]
            if value.dtype == ir.DataType.INT64:
                feeds[value.name] = rng.integers(0, 32, shape).astype(np.int64)
            elif value.name in ("cos", "sin"):
                feeds[value.name] = np.tile(rng.standard_normal([*shape[:-1], D // 2]), 2)
                feeds[value.name] = feeds[value.name].astype(value.dtype.numpy())
            else:
                feeds[value.name] = rng.standard_normal(shape).astype(value.dtype.numpy())
        cases.append(feeds)
    return cases


def fuse(model: ir.Model, rng, target: str = "ort-cpu", atol: float = 1e-5):
    """Run the pass; the outputs on both input shapes must not change."""
    cases = feeds_for(model, rng)
    before = [run(model, feeds) for feeds in cases]
    result = FuseRotaryPass(target=target)(model)
    for feeds, expected in zip(cases, before, strict=True):
        for name, value in run(model, feeds).items():
            np.testing.assert_allclose(value, expected[name], atol=atol, rtol=1e-3)
    return result


def _rotary(model: ir.Model) -> ir.Node:
    (node,) = [n for n in model.graph if n.op_type == "RotaryEmbedding"]
    return node


@pytest.mark.parametrize(
    "spec",
    [
        Rope(),
        Rope(halves="ts", scale=True),
        Rope(halves="split"),
        Rope(halves="split", opset=18),
        Rope(angles="ids"),
        Rope(angles="table"),
        Rope(angles="sliced", halves="split"),
        Rope(layout="sbnd"),
        Rope(layout="sbnd", halves="ts"),
    ],
    ids=[
        "dynamo",
        "ts",
        "split-17",
        "split-18",
        "position-ids",
        "gathered-table",
        "sliced-table",
        "conformer",
        "conformer-ts",
    ],
)
def test_rotate_half_becomes_ort_rotary_embedding(spec: Rope, rng) -> None:
    model = build(spec, rng)
    assert fuse(model, rng).counts == {"rotary": 1}
    node = _rotary(model)
    assert node.domain == "com.microsoft"
    assert not {"Neg", "Add"} & set(op_types(model))  # no rotate-half arithmetic is left
    positions = node.inputs[1]
    per_batch = spec.angles in ("ids", "table")
    assert (positions.const_value is None) == per_batch  # offset 0 unless cos varies by batch
    if spec.layout == "sbnd":  # x goes in as [B, N, S, D], straight from the [B, S, N, D] heads
        assert node.inputs[0].producer().attributes["perm"].as_ints() == (0, 2, 1, 3)
        assert node.outputs[0].uses()[0][0].op_type == "Transpose"


def test_standard_target_at_opset_23_gets_rotary_embedding_23(rng) -> None:
    model = build(Rope(opset=23), rng)
    assert fuse(model, rng, target="onnx-23").counts == {"rotary": 1}
    node = _rotary(model)
    assert node.domain == "" and len(node.inputs) == 3  # per-token caches, no position ids
    assert set(model.opset_imports) == {""}


def test_standard_op_takes_per_batch_caches(rng) -> None:
    model = build(Rope(angles="ids", halves="split", opset=23), rng)
    assert fuse(model, rng, target="onnx-23").counts == {"rotary": 1}
    assert _rotary(model).domain == ""


def test_ort_cpu_prefers_the_contrib_op_at_opset_23(rng) -> None:
    model = build(Rope(opset=23), rng)
    assert fuse(model, rng).counts == {"rotary": 1}
    assert _rotary(model).domain == "com.microsoft"


def test_standard_target_below_opset_23_is_skipped(rng) -> None:
    model = build(Rope(), rng)
    result = fuse(model, rng, target="onnx-17")
    assert result.counts == {} and "Neg" in op_types(model)
    assert result.notes == [
        "rotary: skipped, onnx-17 cannot run com.microsoft::RotaryEmbedding; "
        "ONNX RotaryEmbedding needs a model at opset 23"
    ]


@pytest.mark.parametrize("target", ["ort-cpu", "onnx-23"])
def test_float16_rounds_once(target: str, rng) -> None:
    model = build(Rope(dtype=FLOAT16, opset=23), rng)
    assert fuse(model, rng, target=target, atol=2e-3).counts == {"rotary": 1}
    assert _rotary(model).domain == ("com.microsoft" if target == "ort-cpu" else "")


def test_partial_rotary_fuses_the_rotated_slice(rng) -> None:
    """rotary_dim 4 of head size 8 (GPT-NeoX, Phi): the op rotates x[..., :4], x[..., 4:] stays."""
    g, spec = Graph(rng), Rope(head=4)
    inputs = {"x": (FLOAT, ["batch", "seq", E])}
    cos, sin = (g("Unsqueeze", t, g.const([1])) for t in _angles(g, spec, inputs))
    x = g("Transpose", g("Reshape", "x", g.const([0, 0, N, D])), perm=[0, 2, 1, 3])
    part, rest = (
        g("Slice", x, g.const([a]), g.const([b]), g.const([-1])) for a, b in ((0, 4), (4, D))
    )
    y = g("Concat", rope(g, part, cos, sin, spec), rest, axis=-1)
    model = make_model(g.nodes, inputs, {y: (FLOAT, None)}, g.inits)
    InferShapesPass()(model)
    assert fuse(model, rng).counts == {"rotary": 1}
    assert _rotary(model).inputs[0].producer().op_type == "Slice"


# --- not fused: what the op cannot express exactly -------------------------------------------


def _misses(model: ir.Model) -> list[str]:
    result = FuseRotaryPass()(model)
    assert result.counts == {} and "Neg" in op_types(model)
    return result.misses


def test_cos_given_as_an_input_is_not_fused(rng) -> None:
    """Nothing proves that its two halves are equal (the op takes one angle per pair)."""
    misses = _misses(build(Rope(angles="input"), rng))
    assert any("the two halves of" in m and "not provably equal" in m for m in misses)


def test_a_table_with_different_halves_is_not_fused(rng) -> None:
    misses = _misses(build(Rope(angles="table", table_halves_equal=False), rng))
    assert any("halves of" in m and "not provably equal" in m for m in misses)


def test_halves_that_are_not_halves_are_not_fused(rng) -> None:
    g = Graph(rng)
    inputs = {"x": (FLOAT, ["batch", N, "seq", D])}
    cos, sin = _angles(g, Rope(), inputs)
    cos, sin = (g("Unsqueeze", t, g.const([1])) for t in (cos, sin))
    x1 = g("Slice", "x", g.const([0]), g.const([3]), g.const([3]))
    x2 = g("Slice", "x", g.const([3]), g.const([D]), g.const([3]))
    y = g("Add", g("Mul", "x", cos), g("Mul", g("Concat", g("Neg", x2), x1, axis=-1), sin))
    model = make_model(g.nodes, inputs, {y: (FLOAT, None)}, g.inits)
    InferShapesPass()(model)
    assert any("is not the first half of its last axis" in m for m in _misses(model))


def test_cos_whose_sequence_is_not_provably_x_s_is_not_fused(rng) -> None:
    """cos [1, 1, T, D] with T another input's length: it may broadcast, the op cannot."""
    g = Graph(rng)
    inputs = {"x": (FLOAT, ["batch", N, "seq", D]), "f": (FLOAT, [1, 1, "other", D // 2])}
    emb = g("Concat", "f", "f", axis=-1)
    y = rope(g, "x", g("Cos", emb), g("Sin", emb), Rope())
    model = make_model(g.nodes, inputs, {y: (FLOAT, None)}, g.inits)
    InferShapesPass()(model)
    assert any("axis 2 of cos/sin is not provably 1" in m for m in _misses(model))


# --- attention after rotary ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("head", "kv_heads", "fused"),
    [
        (8, 4, {"MultiHeadAttention": 1, "RotaryEmbedding": 2}),
        (8, 2, {"GroupQueryAttention": 1, "RotaryEmbedding": 2}),
        (16, 2, {"GroupQueryAttention": 1}),  # it rotates Q and K itself (do_rotary)
    ],
    ids=["mha", "gqa", "gqa-do-rotary"],
)
def test_attention_fuses_on_rotary_outputs(head: int, kv_heads: int, fused: dict, rng) -> None:
    """Llama's block: rotary on Q and K, K/V heads repeated to 4 query heads, causal SDPA."""
    g, heads, spec = Graph(rng), 4, Rope(head=head)
    inputs = {"x": (FLOAT, ["batch", "seq", 16])}
    cos, sin = (g("Unsqueeze", t, g.const([1])) for t in _angles(g, spec, inputs))

    def project(n: int) -> str:
        flat = g("MatMul", "x", g.weight(16, n * head))
        return g("Transpose", g("Reshape", flat, g.const([0, 0, n, head])), perm=[0, 2, 1, 3])

    q, k, v = project(heads), project(kv_heads), project(kv_heads)
    q, k = (rope(g, t, cos, sin, spec) for t in (q, k))
    if kv_heads != heads:
        k, v = (_repeat(g, t, kv_heads, heads // kv_heads, head) for t in (k, v))
    size = g("Slice", g("Shape", q), g.const([2]), g.const([3]))
    ones = g("Expand", g.const(1.0, np.float32), g("Concat", size, size, axis=0))
    upper = g("Equal", g("Trilu", ones, upper=0), g.const(0.0, np.float32))
    causal = g("Where", upper, g.const(-np.inf, np.float32), g.const(0.0, np.float32))
    scores = g(
        "Add",
        g(
            "Mul",
            g("MatMul", q, g("Transpose", k, perm=[0, 1, 3, 2])),
            g.const(head**-0.5, np.float32),
        ),
        causal,
    )
    ctx = g("MatMul", g("Softmax", scores, axis=-1), v)
    out = g("Reshape", g("Transpose", ctx, perm=[0, 2, 1, 3]), g.const([0, 0, heads * head]))
    model = make_model(g.nodes, inputs, {out: (FLOAT, None)}, g.inits)
    InferShapesPass()(model)
    cases = feeds_for(model, rng)
    before = [run(model, feeds) for feeds in cases]
    assert FuseRotaryPass()(model).counts == {"rotary": 2}
    assert FuseAttentionPass()(model).counts == {"attention": 1}
    assert {op: op_types(model).count(op) for op in fused} == fused
    assert not {"Softmax", "RotaryEmbedding"} - set(fused) & set(op_types(model))
    for feeds, expected in zip(cases, before, strict=True):
        for name, value in run(model, feeds).items():
            np.testing.assert_allclose(value, expected[name], atol=1e-5, rtol=1e-3)


def _repeat(g: Graph, t: str, kv_heads: int, times: int, head: int) -> str:
    """transformers' repeat_kv: Unsqueeze, Expand to [B, n, r, T, D], Reshape to [B, n*r, T, D]."""
    shape = g("Shape", t)
    lead, tail = (g("Slice", shape, g.const([a]), g.const([b])) for a, b in ((0, 1), (2, 4)))
    wide = g("Concat", lead, g.const([kv_heads, times]), tail, axis=0)
    expanded = g("Expand", g("Unsqueeze", t, g.const([2])), wide)
    return g("Reshape", expanded, g("Concat", lead, g.const([kv_heads * times]), tail, axis=0))


# --- the zoo: real exporter output --------------------------------------------------------------

ZOO = GOLDEN / "zoo"
_ROTARY_ZOO = [
    f"{m}_{e}" for m in ("llama", "llama_kv", "conformer_rotary") for e in ("ts", "dynamo")
]


def _check_golden(model: ir.Model, name: str) -> None:
    golden = GoldenSet.load(ZOO / f"{name}.golden")
    for feeds, expected in zip(golden.inputs, golden.outputs, strict=True):
        for key, value in run(model, feeds).items():
            np.testing.assert_allclose(value, expected[key], atol=1e-4, rtol=1e-3)


@pytest.mark.parametrize("name", _ROTARY_ZOO)
def test_zoo_rotary_fuses_and_attention_still_does(name: str) -> None:
    """Llama rotates Q and K per layer; Conformer the hidden states once per layer."""
    model = load(ZOO / f"{name}.onnx")
    InferShapesPass()(model)
    result = FuseRotaryPass()(model)
    assert result.counts == {"rotary": 2 if name.startswith("conformer") else 4}, result.misses
    assert FuseAttentionPass()(model).counts == {"attention": 2}
    assert "Neg" not in op_types(model) and "Softmax" not in op_types(model)
    _check_golden(model, name)


def test_zoo_llama_at_opset_23_gets_the_standard_op() -> None:
    model = load(ZOO / "llama_dynamo.onnx")
    model.opset_imports[""] = 23
    InferShapesPass()(model)
    assert FuseRotaryPass(target="onnx-23")(model).counts == {"rotary": 4}
    assert {n.domain for n in model.graph if n.op_type == "RotaryEmbedding"} == {""}
    _check_golden(model, "llama_dynamo")
