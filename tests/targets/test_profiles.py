"""Target profiles: built-in and user files, and what each says a runtime runs."""

from __future__ import annotations

import json

import pytest

from onnxopt import UsageError
from onnxopt.targets import builtin_targets, load_target


def test_builtin_profiles_load_and_document_their_source() -> None:
    names = builtin_targets()
    assert {"onnx-13", "onnx-17", "onnx-21", "onnx-23", "ort-cpu", "ort-mobile"} <= set(names)
    for name in names:
        target = load_target(name)
        assert target.name == name and target.description and target.source


@pytest.mark.parametrize(
    ("target", "op", "opset", "expected"),
    [
        ("onnx-17", "LayerNormalization", 17, True),
        ("onnx-13", "LayerNormalization", 13, False),
        ("onnx-17", "GroupNormalization", 17, False),
        ("onnx-21", "GroupNormalization", 21, True),
        ("onnx-23", "RMSNormalization", 23, True),
        ("onnx-21", "RMSNormalization", 21, False),
        ("onnx-13", "Constant", 13, True),
        ("ort-mobile", "Conv", 13, True),
        ("ort-mobile", "Conv", 17, False),
        ("ort-mobile", "Einsum", 13, False),
        ("ort-cpu", "LayerNormalization", 17, True),
    ],
)
def test_standard_ops(target: str, op: str, opset: int, expected: bool) -> None:
    assert load_target(target).supports("", op, opset) is expected


def test_contrib_ops_only_where_the_runtime_has_them() -> None:
    assert load_target("ort-cpu").supports("com.microsoft", "SkipLayerNormalization", 1)
    assert load_target("ort-cpu").supports("com.microsoft", "MatMulNBits", 1)
    assert not load_target("onnx-23").supports("com.microsoft", "SkipLayerNormalization", 1)
    assert load_target("ort-mobile").supports("com.microsoft", "BiasGelu", 1)
    assert not load_target("ort-mobile").supports("com.microsoft", "MatMulNBits", 1)


def test_opsets_each_target_loads() -> None:
    assert load_target("onnx-17").accepts_opset(13) and not load_target("onnx-17").accepts_opset(18)
    mobile = load_target("ort-mobile")
    assert mobile.opset == 13 and mobile.accepts_opset(12) and not mobile.accepts_opset(11)


def test_user_profile_file(tmp_path) -> None:
    path = tmp_path / "tiny.json"
    profile = {"name": "tiny", "source": "us", "opset": 13, "ops": {"": {"13": ["Add", "Relu"]}}}
    path.write_text(json.dumps(profile))
    target = load_target(path)
    assert target.supports("", "Relu", 13) and not target.supports("", "Sigmoid", 13)
    assert target.opset == 13


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("{", "does not parse"),
        ('{"name": "x"}', "exactly one of"),
        ('{"standard_opset": 17, "ops": {}}', "exactly one of"),
        ('{"ops": {"": {"x": ["Add"]}}}', "malformed"),
    ],
)
def test_bad_profiles_are_usage_errors(tmp_path, text: str, message: str) -> None:
    path = tmp_path / "bad.json"
    path.write_text(text)
    with pytest.raises(UsageError, match=message):
        load_target(path)


def test_unknown_target_lists_the_builtin_ones() -> None:
    with pytest.raises(UsageError, match="onnx-17"):
        load_target("onnx-99")
