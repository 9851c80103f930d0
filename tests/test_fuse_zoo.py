"""The `fuse` alias on the exported zoo (golden/zoo): every block fused on both exporters.

Each zoo model was exported from a transformers config with random weights by both torch
exporters; its manifest entry counts the attention blocks, norms, residual norms and GELUs the
config has. `fuse` must fuse them all, keep the stored golden outputs, and, for a standard
target, create no op outside the standard domain.
"""

from __future__ import annotations

import json

import onnx
import pytest
from conftest import GOLDEN

import onnxopt
from onnxopt.stats import op_histogram

ZOO = GOLDEN / "zoo"
MODELS = {e["file"]: e for e in json.loads((ZOO / "manifest.json").read_text())["models"]}
MS = "com.microsoft::"
GROUPS = {
    "attention": [f"{MS}MultiHeadAttention", f"{MS}Attention", f"{MS}GroupQueryAttention"],
    "skip-norm": [f"{MS}SkipLayerNormalization", f"{MS}SkipSimplifiedLayerNormalization"],
    "gelu": [f"{MS}Gelu", f"{MS}FastGelu", f"{MS}BiasGelu", f"{MS}QuickGelu", "Gelu"],  # + SiLU
}
# What each model cannot fuse yet, and why; strict, so a fix makes the test fail until removed.
KNOWN_MISSES: dict[tuple[str, str], str] = {}  # none left on the zoo


def _silu_count(name: str) -> int:
    """``x * sigmoid(x)`` in the exported graph (SiLU fuses into QuickGelu(alpha=1))."""
    model = onnx.load(ZOO / name, load_external_data=False)
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for node in model.graph.node:
        for name_in in node.input:
            consumers.setdefault(name_in, []).append(node)
    return sum(
        1
        for node in model.graph.node
        if node.op_type == "Sigmoid"
        for user in consumers.get(node.output[0], [])
        if user.op_type == "Mul" and node.input[0] in user.input
    )


def _expected(name: str) -> dict[str, int]:
    inv = MODELS[name]["inventory"]
    residual = sum(
        inv.get(k, 0) for k in ("add_layer_norm", "embed_add_layer_norm", "add_rms_norm")
    )
    return {
        "attention": inv["attention"],
        "skip-norm": residual,
        "gelu": inv["gelu"] + _silu_count(name),
    }


def _cases() -> list:
    cases = []
    for name in MODELS:
        for group in GROUPS:
            miss = KNOWN_MISSES.get((name, group))
            marks = [pytest.mark.xfail(strict=True, reason=miss)] if miss else []
            cases.append(pytest.param(name, group, marks=marks, id=f"{name}-{group}"))
    return cases


@pytest.fixture(scope="module")
def fused() -> dict:
    return {}


def _fuse(cache: dict, name: str, target: str = "ort-cpu"):
    if (name, target) not in cache:
        stem = name.removesuffix(".onnx")
        cache[(name, target)] = onnxopt.optimize(
            ZOO / name, f"fuse(target={target})", golden=ZOO / f"{stem}.golden"
        )
    return cache[(name, target)]


@pytest.mark.parametrize(("name", "group"), _cases())
def test_every_block_is_fused(fused, name: str, group: str) -> None:
    model, report = _fuse(fused, name)
    assert report.ok, [(p.name, p.reason) for p in report.failed]
    histogram = op_histogram(model)
    assert sum(histogram[op] for op in GROUPS[group]) == _expected(name)[group]


@pytest.mark.parametrize("name", ["bert_ts.onnx", "whisper_dynamo.onnx", "llama_ts.onnx"])
def test_a_standard_target_gets_only_standard_ops(fused, name: str) -> None:
    model, report = _fuse(fused, name, "onnx-17")
    assert report.ok, [(p.name, p.reason) for p in report.failed]
    assert not [op for op in op_histogram(model) if "::" in op]
    assert set(model.opset_imports) == {""}


@pytest.mark.parametrize(
    ("name", "lowered"),
    [
        ("gpt2_kv_dynamo.onnx", {"MultiHeadAttention": 2}),
        ("llama_kv_dynamo.onnx", {"MultiHeadAttention": 2, "RotaryEmbedding": 4}),
        ("llama_ts.onnx", {"GroupQueryAttention": 2, "RotaryEmbedding": 4}),
        ("conformer_dynamo.onnx", {"MultiHeadAttention": 2}),
    ],
)
def test_lower_undoes_the_ort_fusions_for_a_standard_runtime(name: str, lowered: dict) -> None:
    from onnxopt.targets import load_target
    from onnxopt.targets.check import unsupported

    stem = name.removesuffix(".onnx")
    model, report = onnxopt.optimize(
        ZOO / name, "fuse,lower(target=onnx-17)", golden=ZOO / f"{stem}.golden"
    )
    assert report.ok, [(p.name, p.reason) for p in report.failed]
    counts = report.passes[-1].counts
    assert {op: counts.get(op, 0) for op in lowered} == lowered
    assert unsupported(model, load_target("onnx-17")) == []


@pytest.mark.parametrize("name", [n for n, e in MODELS.items() if e["inventory"].get("rotary")])
def test_rotary_fuses_and_attention_still_does(name: str) -> None:
    stem = name.removesuffix(".onnx")
    model, report = onnxopt.optimize(ZOO / name, "fuse", golden=ZOO / f"{stem}.golden")
    assert report.ok, [(p.name, p.reason) for p in report.failed]
    histogram = op_histogram(model)
    inventory = MODELS[name]["inventory"]
    assert histogram[f"{MS}RotaryEmbedding"] == inventory["rotary"]
    assert sum(histogram[op] for op in GROUPS["attention"]) == inventory["attention"]
    # grouped-query heads without a cache: GroupQueryAttention; with one, MultiHeadAttention
    gqa = 0 if "_kv_" in name else inventory.get("group_query_attention", 0)
    assert histogram[f"{MS}GroupQueryAttention"] == gqa
    assert "Neg" not in histogram
