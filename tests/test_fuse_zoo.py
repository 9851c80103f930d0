"""The `fuse` alias on the exported zoo (golden/zoo): every block fused on both exporters.

Each zoo model was exported from a transformers config with random weights by both torch
exporters; its manifest entry counts the attention blocks, norms, residual norms and GELUs the
config has. `fuse` must fuse them all, keep the stored golden outputs, and, for a standard
target, create no op outside the standard domain.
"""

from __future__ import annotations

import json

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
    "gelu": [f"{MS}Gelu", f"{MS}FastGelu", f"{MS}BiasGelu", f"{MS}QuickGelu", "Gelu"],
}
# What each model cannot fuse yet, and why; strict, so a fix makes the test fail until removed.
KNOWN_MISSES: dict[tuple[str, str], str] = {}


def _expected(entry: dict) -> dict[str, int]:
    inv = entry["inventory"]
    residual = inv["add_layer_norm"] + inv.get("embed_add_layer_norm", 0) + inv.get("add_rms_norm", 0)
    return {"attention": inv["attention"], "skip-norm": residual, "gelu": inv["gelu"]}


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
    assert sum(histogram[op] for op in GROUPS[group]) == _expected(MODELS[name])[group]


@pytest.mark.parametrize("name", ["bert_ts.onnx", "whisper_dynamo.onnx", "llama_ts.onnx"])
def test_a_standard_target_gets_only_standard_ops(fused, name: str) -> None:
    model, report = _fuse(fused, name, "onnx-17")
    assert report.ok, [(p.name, p.reason) for p in report.failed]
    assert not [op for op in op_histogram(model) if "::" in op]
    assert set(model.opset_imports) == {""}
