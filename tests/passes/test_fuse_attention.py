"""fuse-attention: SDPA subgraphs as the torch exporters write them become one attention op."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import onnx_ir as ir
import pytest
from conftest import FLOAT, GOLDEN, INT64, make_model, op_types, run
from onnx import TensorProto, helper

from onnxopt import GoldenSet, load
from onnxopt.passes.fuse_attention import FuseAttentionPass
from onnxopt.passes.infer_shapes import InferShapesPass

E, N, D = 16, 2, 8
BOOL, FLOAT16 = TensorProto.BOOL, TensorProto.FLOAT16
SHAPES = ((1, 5), (2, 7))  # (batch, seq) for the two runs of every dynamic graph


@dataclasses.dataclass
class Spec:
    """One way of writing attention, as the exporters do (see the module docstring)."""

    split: str = "const"  # Reshape target: const [0, 0, N, D], "ts" Shape/Gather/Concat, "dyn"
    key: str = "0132"  # Kᵀ: Transpose(K, 0132), Transpose(k, 0231) of [B,T,N,D], "3d" Reshapes
    scale: str = "div"  # div/mul on the scores, "q" on Q, "qk" sqrt on Q and Kᵀ, "none",
    # "sdpa": TorchScript's SDPA, sqrt(1/sqrt(d)) on Q and Kᵀ computed from Shape(Q)
    scale_value: float = D**-0.5
    mask: str = ""  # "", "add" [B,1,1,T], "full" [B,1,S,T], "where" fill, "bool" Where then Add
    fill: float = -np.inf
    guard: bool = False  # Where(IsNaN(p), 0, p) after Softmax
    merged: bool = True  # output Transpose + Reshape to [B, S, E]; else the 4-D context
    merge: str = "const"  # merge target [0, 0, E]; "flat" [-1, E] (for a Gemm); "ts": a no-op
    # Reshape of the context first, targets read with Shape, one of them also a graph output
    dtype: int = FLOAT
    opset: int = 17


class Graph:
    """onnx.helper nodes and initializers, with fresh names."""

    def __init__(self, rng: np.random.Generator, dtype: int = FLOAT) -> None:
        self.nodes: list = []
        self.inits: dict[str, np.ndarray] = {}
        self.rng, self.np_type = rng, helper.tensor_dtype_to_np_dtype(dtype)

    def __call__(self, op: str, *inputs: str, n_out: int = 1, **attrs) -> str:
        name = f"{op.lower()}{len(self.nodes)}"
        outs = [name] if n_out == 1 else [f"{name}_{i}" for i in range(n_out)]
        self.nodes.append(helper.make_node(op, list(inputs), outs, name=name, **attrs))
        return outs[0] if n_out == 1 else outs

    def const(self, value, dtype=None) -> str:
        name = f"c{len(self.inits)}"
        self.inits[name] = np.asarray(value, dtype or np.int64)
        return name

    def weight(self, *shape: int, scale: float = 0.3) -> str:
        return self.const(self.rng.standard_normal(shape) * scale, self.np_type)

    def linear(self, x: str, out: int = E) -> str:
        return self("Add", self("MatMul", x, self.weight(E, out)), self.weight(out))

    def split(self, x3: str, mode: str, heads: int = N) -> str:
        """[B, L, heads*D] -> [B, L, heads, D], as a const, TorchScript or dynamo target."""
        if mode == "const":
            return self("Reshape", x3, self.const([0, 0, heads, D]))
        if mode == "ts":
            shape = self("Shape", x3)
            b, s = (
                self("Unsqueeze", self("Gather", shape, self.const(i)), self.const([0]))
                for i in (0, 1)
            )
            return self("Reshape", x3, self("Concat", b, s, self.const([-1, D]), axis=0))
        b, s = (self("Shape", x3, start=i, end=i + 1) for i in (0, 1))
        target = self("Concat", b, s, self.const([heads, D]), axis=0)
        return self("Reshape", x3, target, allowzero=1)

    def heads(self, x3: str, mode: str, heads: int = N) -> str:
        return self("Transpose", self.split(x3, mode, heads), perm=[0, 2, 1, 3])


def build(spec: Spec, rng: np.random.Generator) -> ir.Model:
    g = Graph(rng, spec.dtype)
    q = g.heads(g.linear("x"), spec.split)
    k3 = g.linear("x")
    if spec.key == "0231":
        kt = g("Transpose", g.split(k3, spec.split), perm=[0, 2, 3, 1])
    elif spec.key == "3d":
        k4 = g.heads(k3, spec.split)
        shape = g("Shape", k4)
        flat = g(
            "Reshape",
            k4,
            g("Concat", g.const([-1]), g("Slice", shape, g.const([-2]), g.const([2**62])), axis=0),
        )
        last2 = g("Slice", shape, g.const([-1]), g.const([2**62]))
        seq = g("Slice", shape, g.const([-2]), g.const([-1]))
        lead = g("Slice", shape, g.const([0]), g.const([-2]))
        kt = g(
            "Reshape", g("Transpose", flat, perm=[0, 2, 1]), g("Concat", lead, last2, seq, axis=0)
        )
    else:
        kt = g("Transpose", g.heads(k3, spec.split), perm=[0, 1, 3, 2])
    v = g.heads(g.linear("x"), spec.split)
    s = spec.scale_value
    scalar = lambda value: g.const(value, g.np_type)  # noqa: E731
    if spec.scale == "q":
        q = g("Mul", q, scalar(s))
    elif spec.scale == "qk":
        q, kt = g("Mul", q, scalar(np.sqrt(s))), g("Mul", scalar(np.sqrt(s)), kt)
    elif spec.scale == "sdpa":
        size = g("Slice", g("Shape", q), g.const([-1]), g.const([2**62]))
        root = g("Sqrt", g("Div", scalar(1.0), g("Sqrt", g("Cast", size, to=spec.dtype))))
        q, kt = g("Mul", q, root), g("Mul", kt, root)
    scores = g("MatMul", q, kt)
    if spec.scale == "div":
        scores = g("Div", scores, scalar(1 / s))
    elif spec.scale == "mul":
        scores = g("Mul", scores, scalar(s))
    inputs = {"x": (spec.dtype, ["batch", "seq", E])}
    if spec.mask in ("add", "full"):
        inputs["mask"] = (spec.dtype, ["batch", 1, "seq" if spec.mask == "full" else 1, "seq"])
        scores = g("Add", scores, "mask")
    elif spec.mask in ("where", "bool"):
        inputs["mask"] = (BOOL, ["batch", 1, 1, "seq"])
        if spec.mask == "where":
            scores = g("Where", "mask", scores, scalar(spec.fill))
        else:
            scores = g("Add", scores, g("Where", "mask", scalar(0.0), scalar(spec.fill)))
    probs = g("Softmax", scores, axis=-1)
    if spec.guard:
        probs = g("Where", g("IsNaN", probs), scalar(0.0), probs)
    ctx = g("MatMul", probs, v)
    if spec.merged:
        out, outputs = _merge(g, ctx, q, v, spec.merge)
        outputs = {g("MatMul", out, g.weight(E, E)): (spec.dtype, None), **outputs}
    else:
        outputs = {ctx: (spec.dtype, None)}
    return _model(g, inputs, outputs, spec.opset)


def _merge(g: Graph, ctx: str, q: str, v: str, mode: str) -> tuple[str, dict]:
    if mode != "ts":
        target = g.const([-1, E] if mode == "flat" else [0, 0, E])
        return g("Reshape", g("Transpose", ctx, perm=[0, 2, 1, 3]), target), {}

    def dim(t: str, axis: int) -> str:
        return g("Unsqueeze", g("Gather", g("Shape", t), g.const(axis)), g.const([0]))

    same = g("Concat", dim(ctx, 0), g.const([-1]), dim(q, 2), dim(v, 3), axis=0)
    heads_last = g("Transpose", g("Reshape", ctx, same), perm=[0, 2, 1, 3])
    seq = dim(heads_last, 1)
    out = g("Reshape", heads_last, g("Concat", dim(heads_last, 0), seq, g.const([-1]), axis=0))
    return out, {seq: (INT64, None)}


def expected_scale(spec: Spec) -> float:
    """The product of the float32 constants the graph scales with, rounded to float32."""
    f32 = lambda value: float(np.float32(value))  # noqa: E731
    s = spec.scale_value
    root = f32(np.sqrt(f32(1) / f32(np.sqrt(D))))  # float32 ops, as ORT computes the graph's
    factor = {"div": 1 / f32(1 / s), "qk": f32(np.sqrt(s)) ** 2, "sdpa": root * root}
    factor = factor.get(spec.scale, f32(s))
    return f32(factor)


def _model(g: Graph, inputs: dict, outputs: dict, opset: int) -> ir.Model:
    model = make_model(g.nodes, inputs, outputs, g.inits, opset=opset)
    InferShapesPass()(model)
    return model


def feeds_for(model: ir.Model, rng: np.random.Generator) -> list[dict[str, np.ndarray]]:
    """Inputs for the two (batch, seq) cases; masks keep at least one key per row."""
    cases = []
    for batch, seq in SHAPES:
        sizes = {"batch": batch, "seq": seq, "past": 3, "total": seq + 3, "pos": 2 * seq - 1}
        feeds = {}
        for value in model.graph.inputs:
            shape = [d if isinstance(d, int) else sizes[d.value] for d in value.shape]
            dtype = value.dtype.numpy()
            if value.dtype == ir.DataType.BOOL:
                feeds[value.name] = rng.random(shape) < 0.7
                feeds[value.name][..., 0] = True
            elif value.name == "mask":
                feeds[value.name] = np.where(rng.random(shape) < 0.7, 0, -1e4).astype(dtype)
            else:
                feeds[value.name] = rng.standard_normal(shape).astype(dtype)
        cases.append(feeds)
    return cases


def fuse(model: ir.Model, rng, target: str = "ort-cpu", atol: float = 1e-5):
    """Run the pass; the outputs on both input shapes must not change."""
    cases = feeds_for(model, rng)
    before = [run(model, feeds) for feeds in cases]
    result = FuseAttentionPass(target=target)(model)
    for feeds, expected in zip(cases, before, strict=True):
        after = run(model, feeds)
        for name in expected:
            np.testing.assert_allclose(after[name], expected[name], atol=atol, rtol=1e-3)
    return result


def _core(model: ir.Model) -> list[str]:
    """Op types without the shape arithmetic (Shape, Slice, Concat, Constant, ...)."""
    shape_ops = {"Shape", "Slice", "Concat", "Constant", "Gather", "Unsqueeze", "Expand"}
    return [op for op in op_types(model) if op not in shape_ops]


MHA = "MultiHeadAttention"
GQA = "GroupQueryAttention"
PROJECTIONS = ["MatMul", "Add", "MatMul", "Add", "MatMul", "Add"]


# --- (a) encoder attention: scale forms, key forms, masks, exporters ------------------------


@pytest.mark.parametrize(
    "spec",
    [
        Spec(),
        Spec(split="ts", scale="mul"),
        Spec(split="dyn", scale="q", key="0231"),
        Spec(split="dyn", scale="qk", key="3d", mask="add"),
        Spec(split="ts", scale="qk", key="0231", mask="full", scale_value=0.2),
        Spec(scale="none", mask="add", scale_value=1.0),
        Spec(split="ts", scale="sdpa", key="0231", mask="full"),
    ],
    ids=[
        "const-div",
        "ts-mul",
        "dynamo-q-0231",
        "dynamo-sdpa-3d",
        "ts-qk-custom",
        "unscaled",
        "ts-sdpa",
    ],
)
def test_encoder_attention_becomes_multi_head_attention(spec: Spec, rng) -> None:
    model = build(spec, rng)
    result = fuse(model, rng)
    assert result.counts == {"attention": 1}
    assert _core(model) == [*PROJECTIONS, MHA, "MatMul"]
    (node,) = [n for n in model.graph if n.op_type == MHA]
    assert node.domain == "com.microsoft" and node.attributes["num_heads"].value == N
    assert node.attributes["scale"].value == expected_scale(spec)
    assert [v.producer().op_type for v in node.inputs[:3]] == ["Add", "Add", "Add"]


def test_scale_on_q_and_k_multiplies_in_float32(rng) -> None:
    model = build(Spec(split="dyn", scale="qk", key="3d", scale_value=0.3), rng)
    fuse(model, rng)
    (node,) = [n for n in model.graph if n.op_type == MHA]
    root = float(np.float32(np.sqrt(0.3)))
    assert node.attributes["scale"].value == float(np.float32(root * root))


@pytest.mark.parametrize("mask", ["where", "bool"])
def test_boolean_masks_become_an_additive_bias(mask: str, rng) -> None:
    model = build(Spec(mask=mask, fill=np.finfo(np.float32).min), rng)
    assert fuse(model, rng).counts == {"attention": 1}
    assert "Softmax" not in op_types(model) and "Where" in op_types(model)


def test_nan_guard_with_an_infinite_fill_zeroes_the_output_rows(rng) -> None:
    model = build(Spec(mask="bool", guard=True, split="ts", key="0231", scale="qk"), rng)
    fuse(model, rng)
    ops = _core(model)
    assert ops[ops.index(MHA) :] == [MHA, "IsNaN", "Where", "MatMul"]
    feeds = feeds_for(model, rng)[1]
    feeds["mask"][1] = False  # every key of batch 1 masked: the graph zeroes those rows
    assert np.all(run(model, feeds)[model.graph.outputs[0].name][1] == 0)


def test_nan_guard_with_a_finite_fill_is_dropped(rng) -> None:
    fill = np.finfo(np.float32).min
    model = build(Spec(mask="bool", guard=True, split="dyn", fill=fill), rng)
    fuse(model, rng)
    assert "IsNaN" not in op_types(model)


@pytest.mark.parametrize("merge", ["ts", "flat"])
def test_head_merges_as_exported_are_taken_over(merge: str, rng) -> None:
    """TorchScript reads the merge targets with Shape (one read is a graph output here)."""
    model = build(Spec(split="ts", merge=merge, mask="add"), rng)
    assert fuse(model, rng).counts == {"attention": 1}
    assert "Transpose" not in op_types(model)
    after = _core(model)[_core(model).index(MHA) :]
    assert after == ([MHA, "MatMul"] if merge == "ts" else [MHA, "Reshape", "MatMul"])


def test_kt_that_is_not_a_transpose_is_not_fused(rng) -> None:
    nodes = [
        helper.make_node("MatMul", ["q", "kt"], ["s"]),
        helper.make_node("Softmax", ["s"], ["p"], axis=-1),
        helper.make_node("MatMul", ["p", "v"], ["y"]),
    ]
    inputs = {"q": [1, N, 4, D], "kt": [1, N, D, 4], "v": [1, N, 4, D]}
    model = make_model(nodes, {k: (FLOAT, s) for k, s in inputs.items()}, {"y": (FLOAT, None)})
    InferShapesPass()(model)
    assert any("Kᵀ is not a transpose of K" in miss for miss in _without_fusion(model))


def test_four_d_context_output_is_transposed_back(rng) -> None:
    model = build(Spec(merged=False, mask="add"), rng)
    assert fuse(model, rng).counts == {"attention": 1}
    assert _core(model)[-3:] == [MHA, "Reshape", "Transpose"]


def test_float16_needs_attention_23_on_cpu(rng) -> None:
    model = build(Spec(dtype=FLOAT16), rng)
    result = FuseAttentionPass()(model)
    assert not result.modified
    assert any("no kernel for FLOAT16" in miss for miss in result.misses)
    model = build(Spec(dtype=FLOAT16, opset=23), rng)
    result = fuse(model, rng, target="onnx-23", atol=2e-3)
    assert result.counts == {"attention": 1} and "Attention" in op_types(model)


# --- (b) causal decoders: packed QKV, causal masks, rotary, grouped-query attention -----------


@dataclasses.dataclass
class Decoder:
    kv_heads: int = N
    packed: bool = False  # one projection, then Split (GPT-2's c_attn)
    rotary: bool = False  # Llama's rotate_half on Q and K in head layout
    causal: str = "trilu"  # SDPA's Trilu mask (added), "buffer": a sliced tril, Where-filled,
    # or "input": an additive [B, 1, S, T] mask the caller makes (transformers with a cache)
    fill: float = -np.inf
    padding: bool = False  # an additive [B, 1, 1, T] mask input too
    past: bool = False  # K/V concatenated after a cache input; present K/V are outputs
    opset: int = 17


def decoder(spec: Decoder, rng) -> ir.Model:
    g = Graph(rng)
    kv = spec.kv_heads * D
    if spec.packed:
        split = g.const([E, kv, kv]) if spec.opset >= 13 else None
        q3, k3, v3 = g("Split", g.linear("x", E + 2 * kv), split, n_out=3, axis=2)
    else:
        q3, k3, v3 = g.linear("x"), g.linear("x", kv), g.linear("x", kv)
    q, k, v = (
        g.heads(q3, "dyn"),
        g.heads(k3, "dyn", spec.kv_heads),
        g.heads(v3, "dyn", spec.kv_heads),
    )
    if spec.rotary:
        table = g.const(rng.standard_normal((32, D)), np.float32)
        seq = g("Shape", "x", start=1, end=2)
        cos = g("Unsqueeze", g("Slice", table, g.const([0]), seq), g.const([0, 1]))
        q, k = (g("Add", g("Mul", t, cos), g("Mul", _rotate_half(g, t), cos)) for t in (q, k))
    inputs = {"x": (FLOAT, ["batch", "seq", E])}
    outputs = {}
    if spec.past:
        for name, t in (("key", k), ("value", v)):
            inputs[f"past_{name}"] = (FLOAT, ["batch", spec.kv_heads, "past", D])
            outputs[g("Concat", f"past_{name}", t, axis=2)] = (FLOAT, None)
        k, v = outputs
    if spec.kv_heads != N:
        k, v = (_repeat_heads(g, t, spec.kv_heads) for t in (k, v))
    root = g.const(np.float32(D**-0.25), np.float32)
    scores = g("MatMul", g("Mul", q, root), g("Mul", g("Transpose", k, perm=[0, 1, 3, 2]), root))
    fill = g.const(spec.fill, np.float32)
    if spec.causal == "trilu":
        size = g("Slice", g("Shape", q), g.const([-2]), g.const([-1]))
        ones = g("Expand", g.const(1.0, np.float32), g("Concat", size, size, axis=0))
        upper = g("Equal", g("Trilu", ones, upper=0), g.const(0.0, np.float32))
        scores = g("Add", scores, g("Where", upper, fill, g.const(0.0, np.float32)))
    elif spec.causal == "input":
        inputs["mask"] = (FLOAT, ["batch", 1, "seq", "total" if spec.past else "seq"])
        scores = g("Add", scores, "mask")
    else:
        tril = g.const(np.tril(np.ones((1, 1, 32, 32), bool)), bool)
        seq = g("Shape", "x", start=1, end=2)
        causal = g(
            "Slice",
            g("Slice", tril, g.const([0]), seq, g.const([2])),
            g.const([0]),
            seq,
            g.const([3]),
        )
        scores = g("Where", causal, scores, fill)
    if spec.padding:
        inputs["mask"] = (FLOAT, ["batch", 1, 1, "seq"])
        scores = g("Add", scores, "mask")
    ctx = g("MatMul", g("Softmax", scores, axis=-1), v)
    out = g("Reshape", g("Transpose", ctx, perm=[0, 2, 1, 3]), g.const([0, 0, E]))
    outputs = {g("MatMul", out, g.weight(E, E)): (FLOAT, None), **outputs}
    return _model(g, inputs, outputs, spec.opset)


def _rotate_half(g: Graph, t: str) -> str:
    half = [
        g("Slice", t, g.const([a]), g.const([b]), g.const([3]))
        for a, b in ((0, D // 2), (D // 2, D))
    ]
    return g("Concat", g("Neg", half[1]), half[0], axis=-1)


def _repeat_heads(g: Graph, t: str, kv_heads: int) -> str:
    """transformers' repeat_kv: Unsqueeze, Expand to [B, n, r, T, D], Reshape to [B, n*r, T, D]."""
    shape = g("Shape", t)
    lead, tail = (g("Slice", shape, g.const([a]), g.const([b])) for a, b in ((0, 1), (2, 4)))
    wide = g("Concat", lead, g.const([kv_heads, N // kv_heads]), tail, axis=0)
    expanded = g("Expand", g("Unsqueeze", t, g.const([2])), wide)
    return g("Reshape", expanded, g("Concat", lead, g.const([N]), tail, axis=0))


@pytest.mark.parametrize(
    "spec",
    [
        Decoder(packed=True, causal="buffer", padding=True),
        Decoder(causal="buffer", fill=float(np.finfo(np.float32).min)),
        Decoder(kv_heads=1, rotary=True, fill=float(np.finfo(np.float32).min)),
        Decoder(kv_heads=1, packed=True),
    ],
    ids=["gpt2-packed", "gpt2-eager-lowest", "llama-gqa-rotary", "gqa-packed"],
)
def test_causal_decoder_becomes_multi_head_attention(spec: Decoder, rng) -> None:
    model = decoder(spec, rng)
    assert fuse(model, rng).counts == {"attention": 1}
    assert "Softmax" not in op_types(model)
    (node,) = [n for n in model.graph if n.op_type in (MHA, GQA)]
    assert node.attributes["num_heads"].value == N
    if spec.kv_heads == N:
        assert node.op_type == MHA
    elif spec.packed or node.op_type == GQA:  # Q/K/V of one proven length: grouped-query
        assert node.op_type == GQA and node.attributes["kv_num_heads"].value == spec.kv_heads
        if spec.packed:  # the Split outputs, K/V un-repeated
            assert [v.shape[-1] for v in node.inputs[:3]] == [E, D, D]
        assert node.attributes["causal"].value == 0 and node.inputs[10] is not None
    else:  # with rotary, when shape inference loses the lengths: the repeated K/V heads, 4-D
        assert [v.producer().op_type for v in node.inputs[1:3]] == ["Reshape", "Reshape"]


@pytest.mark.parametrize("padding", [False, True])
def test_grouped_query_heads_become_group_query_attention(padding: bool, rng) -> None:
    """Q, K, V in 3-D (K/V un-repeated), the causal and padding masks as attention_bias."""
    model = decoder(Decoder(kv_heads=1, padding=padding), rng)
    assert fuse(model, rng).counts == {"attention": 1}
    (node,) = [n for n in model.graph if n.op_type == GQA]
    assert [v.shape[-1] if v.shape else None for v in node.inputs[:3]] == [E, D, D]  # 1 KV head
    assert node.attributes["causal"].value == 0 and node.inputs[10] is not None


def test_attention_23_makes_the_trilu_mask_is_causal(rng) -> None:
    model = decoder(Decoder(opset=23), rng)
    assert fuse(model, rng, target="onnx-23").counts == {"attention": 1}
    (node,) = [n for n in model.graph if n.op_type == "Attention"]
    assert node.attributes["is_causal"].value == 1 and len(node.inputs) == 3
    assert "Trilu" not in op_types(model)


def test_attention_23_takes_grouped_query_heads_unrepeated(rng) -> None:
    model = decoder(Decoder(kv_heads=1, packed=True, opset=23, padding=True), rng)
    assert fuse(model, rng, target="onnx-23").counts == {"attention": 1}
    (node,) = [n for n in model.graph if n.op_type == "Attention"]
    assert node.attributes["q_num_heads"].value == N and node.attributes["kv_num_heads"].value == 1
    assert [v.producer().op_type for v in node.inputs[:3]] == ["Split"] * 3
    assert "Unsqueeze" not in op_types(model)  # the repeat of K/V heads is gone


def test_attention_23_with_rotary_gqa_is_4d(rng) -> None:
    """The causal mask becomes is_causal only where S == T is proven through rotary."""
    model = decoder(Decoder(kv_heads=1, rotary=True, opset=23), rng)
    assert fuse(model, rng, target="onnx-23").counts == {"attention": 1}
    (node,) = [n for n in model.graph if n.op_type == "Attention"]
    assert [v.shape[1] for v in node.inputs[1:3]] == [1, 1]  # one K/V head, not repeated
    assert ("is_causal" in node.attributes) == (len(node.inputs) == 3)


# --- (c) KV cache: the Concat stays outside, K/V go in 4-D ------------------------------------


@pytest.mark.parametrize("kv_heads", [N, 1], ids=["mha", "gqa"])
def test_cache_concat_stays_and_feeds_4d_key_and_value(kv_heads: int, rng) -> None:
    model = decoder(Decoder(kv_heads=kv_heads, past=True, causal="input", rotary=True), rng)
    assert fuse(model, rng).counts == {"attention": 1}
    (node,) = [n for n in model.graph if n.op_type == MHA]
    expected = "Concat" if kv_heads == N else "Reshape"  # the repeat of the concatenated K/V
    assert [v.producer().op_type for v in node.inputs[1:3]] == [expected] * 2
    assert [v.producer().op_type for v in model.graph.outputs[1:]] == ["Concat", "Concat"]


def test_cache_with_attention_23_keeps_gqa_heads(rng) -> None:
    model = decoder(Decoder(kv_heads=1, past=True, causal="input", opset=23), rng)
    assert fuse(model, rng, target="onnx-23").counts == {"attention": 1}
    (node,) = [n for n in model.graph if n.op_type == "Attention"]
    assert [v.producer().op_type for v in node.inputs[1:3]] == ["Concat", "Concat"]
    assert "is_causal" not in node.attributes  # S != T: the mask is an input, added


# --- (d) relative-position attention (Conformer) -----------------------------------------------


def conformer(rng, *, ts: bool = False, shifted: bool = True, scale: str = "div") -> ir.Model:
    """scores = ((Q + u) Kᵀ + shift((Q + v) Pᵀ)) / sqrt(D) + mask, as wav2vec2-conformer has it.

    ``ts`` adds u and v before the head transpose ([B, S, N, D] + [N, D]); dynamo after it.
    Without ``shifted`` the position term is a plain MatMul like Q·Kᵀ (P has batch 1).
    """
    g = Graph(rng)
    q3, k3, v3 = g.linear("x"), g.linear("x"), g.linear("x")
    if ts:
        q = g.split(q3, "ts")
        qu, qv = (g("Transpose", g("Add", q, g.weight(N, D)), perm=[0, 2, 1, 3]) for _ in "uv")
    else:
        q = g.heads(q3, "dyn")
        qu, qv = (g("Add", q, g.weight(N, 1, D)) for _ in "uv")
    kt = g("Transpose", g.split(k3, "ts" if ts else "dyn"), perm=[0, 2, 3, 1])
    v = g.heads(v3, "ts" if ts else "dyn")
    p3 = g("MatMul", "pos", g.weight(E, E))
    pt = g("Transpose", g("Reshape", p3, g.const([1, -1, N, D])), perm=[0, 2, 3, 1])
    bd = g("MatMul", qv, pt)
    if shifted:
        seq = g("Shape", "x", start=1, end=2)
        bd = g("Slice", bd, g.const([0]), seq, g.const([3]))
    scores = g("Add", g("MatMul", qu, kt), bd)
    if scale == "div":
        scores = g("Div", scores, g.const(np.float32(np.sqrt(D)), np.float32))
    else:
        scores = g("Mul", g.const(np.float32(D**-0.5), np.float32), scores)
    scores = g("Add", scores, "mask")
    ctx = g("MatMul", g("Softmax", scores, axis=-1), v)
    out = g("Reshape", g("Transpose", ctx, perm=[0, 2, 1, 3]), g.const([0, 0, E]))
    inputs = {
        "x": (FLOAT, ["batch", "seq", E]),
        "pos": (FLOAT, [1, "pos" if shifted else "seq", E]),
        "mask": (FLOAT, ["batch", 1, 1, "seq"]),
    }
    return _model(g, inputs, {g("MatMul", out, g.weight(E, E)): (FLOAT, None)}, 17)


@pytest.mark.parametrize(
    ("ts", "shifted", "scale"),
    [(False, True, "div"), (True, True, "mul"), (False, False, "div")],
    ids=["dynamo", "ts", "unshifted"],
)
def test_relative_position_term_becomes_the_attention_bias(ts, shifted, scale, rng) -> None:
    model = conformer(rng, ts=ts, shifted=shifted, scale=scale)
    assert fuse(model, rng).counts == {"attention": 1}
    (node,) = [n for n in model.graph if n.op_type == MHA]
    query, key = node.inputs[0].producer(), node.inputs[1].producer()
    assert (query.op_type, key.op_type) == ("Reshape" if ts else "Add", "Add")  # no Transpose
    scaled = next(n for n in model.graph if n.op_type in ("Div", "Mul"))  # the position term
    assert scaled.op_type == ("Div" if scale == "div" else "Mul")
    assert node.attributes["scale"].value == pytest.approx(D**-0.5, rel=1e-7)


# --- targets ---------------------------------------------------------------------------------


def test_attention_23_takes_the_3d_projections(rng) -> None:
    model = build(Spec(opset=23, mask="add", split="dyn"), rng)
    result = fuse(model, rng, target="onnx-23")
    assert result.counts == {"attention": 1}
    assert _core(model) == [*PROJECTIONS, "Attention", "MatMul"]
    (node,) = [n for n in model.graph if n.op_type == "Attention"]
    assert node.domain == "" and node.attributes["q_num_heads"].value == N


def test_ort_cpu_prefers_multi_head_attention_at_opset_23(rng) -> None:
    model = build(Spec(opset=23), rng)
    assert fuse(model, rng).counts == {"attention": 1} and MHA in op_types(model)


def test_standard_target_below_opset_23_is_skipped(rng) -> None:
    model = build(Spec(), rng)
    result = FuseAttentionPass(target="onnx-17")(model)
    assert not result.modified and "Softmax" in op_types(model)
    assert [note.split(",")[0] for note in result.notes] == ["attention: skipped"]


def test_an_exported_attention_op_is_left_alone(rng) -> None:
    nodes = [helper.make_node("Attention", ["q", "k", "v"], ["y"], scale=0.5)]
    io = {n: (FLOAT, [1, N, 4, D]) for n in "qkv"}
    model = make_model(nodes, io, {"y": (FLOAT, [1, N, 4, D])}, opset=23)
    assert not FuseAttentionPass(target="onnx-23")(model).modified


# --- what must not fuse ----------------------------------------------------------------------


def _without_fusion(model: ir.Model, target: str = "ort-cpu") -> list[str]:
    ops = op_types(model)
    result = FuseAttentionPass(target=target)(model)
    assert not result.modified and op_types(model) == ops
    return result.misses


def _add_output(model: ir.Model, op_type: str, index: int = 0) -> None:
    node = [n for n in model.graph if n.op_type == op_type][index]
    model.graph.outputs.append(node.outputs[0])


@pytest.mark.parametrize(
    ("op", "index", "reason"),
    [
        ("Softmax", 0, "the attention probabilities are also used elsewhere"),
        ("Div", 0, "the attention scores are also used elsewhere"),
    ],
)
def test_intermediates_used_elsewhere_are_not_fused(op, index, reason, rng) -> None:
    model = build(Spec(), rng)
    _add_output(model, op, index)
    assert any(reason in miss for miss in _without_fusion(model))


def test_a_per_head_scale_is_not_fused(rng) -> None:
    model = build(Spec(scale="none"), rng)
    matmul = next(n for n in model.graph if n.op_type == "Softmax")
    per_head = ir.Value(name="per_head", const_value=ir.tensor(np.ones((1, N, 1, 1), np.float32)))
    model.graph.initializers["per_head"] = per_head
    scores = matmul.inputs[0]
    mul = ir.node("Mul", [scores, per_head])
    model.graph.insert_before(matmul, mul)
    matmul.replace_input_with(0, mul.outputs[0])
    assert any("non-constant or non-scalar" in miss for miss in _without_fusion(model))


def test_a_finite_masked_fill_that_is_not_lowest_is_not_fused(rng) -> None:
    model = build(Spec(mask="where", fill=-1e4), rng)
    assert any("fill is not -inf or the lowest" in miss for miss in _without_fusion(model))


def test_softmax_over_another_axis_is_not_fused(rng) -> None:
    model = build(Spec(), rng)
    softmax = next(n for n in model.graph if n.op_type == "Softmax")
    softmax.attributes["axis"] = ir.AttrInt64("axis", 2)
    assert any("Softmax is over axis 2" in miss for miss in _without_fusion(model))


@pytest.mark.parametrize("mask", ["where", "bool"])
def test_attention_23_rewrites_the_lowest_float_fill(mask: str, rng) -> None:
    """ORT's Attention zeroes rows whose every score is the lowest float; the graph averages V."""
    model = build(Spec(mask=mask, fill=np.finfo(np.float32).min, opset=23, split="dyn"), rng)
    cases = feeds_for(model, rng)
    cases[1]["mask"][1] = False  # batch 1: every key masked
    before = [run(model, feeds) for feeds in cases]
    assert FuseAttentionPass(target="onnx-23")(model).counts == {"attention": 1}
    for feeds, expected in zip(cases, before, strict=True):
        for name, value in run(model, feeds).items():
            np.testing.assert_allclose(value, expected[name], atol=1e-5)
    assert np.abs(before[1][name][1]).max() > 0  # the graph's rows are not zero


def test_attention_23_refuses_a_float16_lowest_fill(rng) -> None:
    model = build(Spec(mask="bool", fill=-65504.0, dtype=FLOAT16, opset=23), rng)
    misses = _without_fusion(model, "onnx-23")
    assert any("fills with the lowest float and cannot be rebuilt" in miss for miss in misses)


# --- the zoo: real exporter output --------------------------------------------------------------

ZOO = GOLDEN / "zoo"
_MANIFEST = ZOO / "manifest.json"
_ZOO_MODELS = json.loads(_MANIFEST.read_text())["models"] if _MANIFEST.is_file() else []


@pytest.mark.parametrize("entry", _ZOO_MODELS, ids=[e["file"] for e in _ZOO_MODELS])
def test_zoo_models_fuse_every_attention(entry: dict) -> None:
    """Shape inference is all the pass needs (tests/test_fuse_zoo.py runs the whole ``fuse``)."""
    model = load(ZOO / entry["file"])
    InferShapesPass()(model)
    result = FuseAttentionPass()(model)
    assert result.counts == {"attention": entry["inventory"]["attention"]}, result.misses
    assert "Softmax" not in op_types(model)
    golden = GoldenSet.load(ZOO / entry["golden"])
    for feeds, expected in zip(golden.inputs, golden.outputs, strict=True):
        for name, value in run(model, feeds).items():
            np.testing.assert_allclose(value, expected[name], atol=1e-4, rtol=1e-3)


@pytest.mark.parametrize("name", ["whisper_dynamo", "llama_kv_dynamo", "conformer_dynamo"])
def test_zoo_models_at_opset_23_fuse_into_attention(name: str) -> None:
    """The dynamo exports (opset 20) read as opset 23: ONNX Attention, lowest fills rebuilt."""
    model = load(ZOO / f"{name}.onnx")
    model.opset_imports[""] = 23
    InferShapesPass()(model)
    assert FuseAttentionPass(target="onnx-23")(model).counts == {"attention": 2}
    assert "Attention" in op_types(model) and "Softmax" not in op_types(model)
    golden = GoldenSet.load(ZOO / f"{name}.golden")
    for feeds, expected in zip(golden.inputs, golden.outputs, strict=True):
        for key, value in run(model, feeds).items():
            np.testing.assert_allclose(value, expected[key], atol=1e-4, rtol=1e-3)
