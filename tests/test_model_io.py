"""Model I/O: lazy external data, atomic saves, the input never overwritten."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from conftest import FLOAT, assert_same_outputs, make_model, run
from onnx import helper, numpy_helper

import onnxopt
from onnxopt import model_io

FEEDS = {"x": np.random.default_rng(0).standard_normal((2, 32)).astype(np.float32)}


def linear_proto() -> onnx.ModelProto:
    """x @ w + b, with weights big enough (4 KB, 128 B) for onnx-ir to put w outside."""
    rng = np.random.default_rng(1)
    model = make_model(
        [helper.make_node("MatMul", ["x", "w"], ["y"]), helper.make_node("Add", ["y", "b"], ["z"])],
        {"x": (FLOAT, [2, 32])},
        {"z": (FLOAT, [2, 32])},
        {
            "w": rng.standard_normal((32, 32)).astype(np.float32),
            "b": rng.standard_normal(32).astype(np.float32),
        },
    )
    return ir.to_proto(model)


@pytest.fixture
def external_model(tmp_path: Path) -> Path:
    """A model in ``in/`` whose every weight lives in ``in/weights.bin``."""
    folder = tmp_path / "in"
    folder.mkdir()
    onnx.save_model(
        linear_proto(),
        folder / "model.onnx",
        save_as_external_data=True,
        location="weights.bin",
        size_threshold=0,
    )
    return folder / "model.onnx"


def digest(*paths: Path) -> list[str]:
    return [hashlib.sha256(p.read_bytes()).hexdigest() for p in paths]


def temp_folders(folder: Path) -> list[Path]:
    return list(folder.glob(".onnxopt-*"))


def expected_outputs() -> dict[str, np.ndarray]:
    return run(ir.serde.deserialize_model(linear_proto()), FEEDS)


def test_load_keeps_external_weights_on_disk(external_model: Path) -> None:
    model = onnxopt.load(external_model)
    weights = [v.const_value for v in model.graph.initializers.values()]
    assert len(weights) == 2
    assert all(isinstance(t, ir.ExternalTensor) for t in weights)
    assert {Path(t.path).resolve() for t in weights} == {external_model.parent / "weights.bin"}
    assert_same_outputs(run(model, FEEDS), expected_outputs())


def test_missing_external_data_file_is_named(external_model: Path) -> None:
    (external_model.parent / "weights.bin").unlink()
    with pytest.raises(onnxopt.UnsupportedModelError, match=r"weights\.bin"):
        onnxopt.load(external_model)


def test_save_leaves_no_temp_folder(tmp_path: Path) -> None:
    model = ir.serde.deserialize_model(linear_proto())
    assert onnxopt.save(model, tmp_path / "out.onnx") == tmp_path / "out.onnx"
    assert (tmp_path / "out.onnx").is_file()
    assert temp_folders(tmp_path) == []


def test_failed_save_keeps_the_old_output(tmp_path: Path, monkeypatch) -> None:
    out = tmp_path / "out.onnx"
    out.write_bytes(b"previous output")

    def broken_save(model, path, **kwargs):
        Path(path).write_bytes(b"half a model")  # a partial write, then the failure
        raise OSError("disk full")

    monkeypatch.setattr(ir, "save", broken_save)
    with pytest.raises(OSError, match="disk full"):
        onnxopt.save(ir.serde.deserialize_model(linear_proto()), out)
    assert out.read_bytes() == b"previous output"
    assert temp_folders(tmp_path) == []
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.onnx"]


def test_refuses_to_overwrite_the_input(external_model: Path) -> None:
    before = digest(external_model, external_model.with_name("weights.bin"))
    model = onnxopt.load(external_model)
    with pytest.raises(onnxopt.UsageError, match="refusing to overwrite"):
        onnxopt.save(model, external_model, protected=(external_model,))
    with pytest.raises(onnxopt.UsageError, match="refusing to overwrite"):
        onnxopt.optimize(external_model, "cleanup", output=external_model)
    assert digest(external_model, external_model.with_name("weights.bin")) == before


def test_refuses_to_overwrite_the_inputs_external_data(tmp_path: Path) -> None:
    # The input keeps its weights in "out.onnx.data": saving to "out.onnx" would replace them.
    onnx.save_model(
        linear_proto(),
        tmp_path / "model.onnx",
        save_as_external_data=True,
        location="out.onnx.data",
        size_threshold=0,
    )
    before = digest(tmp_path / "out.onnx.data")
    model = onnxopt.load(tmp_path / "model.onnx")
    with pytest.raises(onnxopt.UsageError, match=r"out\.onnx\.data"):
        onnxopt.save(model, tmp_path / "out.onnx")
    assert digest(tmp_path / "out.onnx.data") == before
    assert not (tmp_path / "out.onnx").exists()


def test_external_data_true_writes_data_file(tmp_path: Path) -> None:
    out = tmp_path / "out.onnx"
    onnxopt.save(ir.serde.deserialize_model(linear_proto()), out, external_data=True)
    assert (tmp_path / "out.onnx.data").is_file()
    reloaded = onnxopt.load(out)
    assert model_io.has_external_data(reloaded)
    assert_same_outputs(run(reloaded, FEEDS), expected_outputs())


def test_external_input_keeps_external_data_by_default(
    external_model: Path, tmp_path: Path
) -> None:
    out = tmp_path / "out.onnx"
    onnxopt.save(onnxopt.load(external_model), out)
    assert (tmp_path / "out.onnx.data").is_file()
    reloaded = onnxopt.load(out)
    assert model_io.external_data_files(reloaded) == {tmp_path / "out.onnx.data"}
    assert_same_outputs(run(reloaded, FEEDS), expected_outputs())


def test_in_memory_model_is_saved_as_one_file(tmp_path: Path) -> None:
    onnxopt.save(ir.serde.deserialize_model(linear_proto()), tmp_path / "out.onnx")
    assert [p.name for p in tmp_path.iterdir()] == ["out.onnx"]
    reloaded = onnxopt.load(tmp_path / "out.onnx")
    assert not model_io.has_external_data(reloaded)
    assert_same_outputs(run(reloaded, FEEDS), expected_outputs())


def test_external_data_false_embeds_external_weights(external_model: Path, tmp_path: Path) -> None:
    out = tmp_path / "single.onnx"
    model = onnxopt.load(external_model)
    onnxopt.save(model, out, external_data=False)
    assert model_io.has_external_data(model)  # the caller's model stays lazy
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith("single")] == [out.name]
    proto = onnx.load(out, load_external_data=False)
    assert not any(t.data_location == onnx.TensorProto.EXTERNAL for t in proto.graph.initializer)
    assert_same_outputs(run(onnxopt.load(out), FEEDS), expected_outputs())


def test_not_onnx_is_unsupported(tmp_path: Path) -> None:
    (tmp_path / "x.onnx").write_text("hello")
    with pytest.raises(onnxopt.UnsupportedModelError, match=r"x\.onnx"):
        onnxopt.load(tmp_path / "x.onnx")
    with pytest.raises(onnxopt.UnsupportedModelError, match="no such file"):
        onnxopt.load(tmp_path / "missing.onnx")
    with pytest.raises(onnxopt.UnsupportedModelError, match="not a file"):
        onnxopt.load(tmp_path)


def test_loaded_initializers_match_onnx(external_model: Path) -> None:
    model = onnxopt.load(external_model)
    proto = onnx.load(external_model)  # reads the data eagerly, independently of onnx-ir
    for tensor in proto.graph.initializer:
        np.testing.assert_array_equal(
            model.graph.initializers[tensor.name].const_value.numpy(),
            numpy_helper.to_array(tensor),
        )
