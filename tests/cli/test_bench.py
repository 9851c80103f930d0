"""`onnxopt bench`: structure and arithmetic of the measurements, never their timing values."""

from __future__ import annotations

import json
import os
import statistics
from pathlib import Path

import numpy as np
import onnx
import pytest
from click.testing import CliRunner, Result
from conftest import WHISPER, WHISPER_GOLDEN
from onnx import helper

from onnxopt.cli.main import cli
from onnxopt.golden import GoldenSet

FAST = ("--runs", "3", "--warmup", "1")


def invoke(*args: object) -> Result:
    result = CliRunner().invoke(cli, [str(a) for a in args])
    assert result.exc_info is None or result.exc_info[0] is SystemExit, result.exc_info
    return result


def bench_json(*args: object) -> dict:
    result = invoke("bench", *args, *FAST, "--json")
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def assert_one_line_error(result: Result, code: int, *fragments: str) -> None:
    assert result.exit_code == code, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


@pytest.fixture(scope="module")
def with_external_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("ext") / "w.onnx"
    result = invoke("run", WHISPER, "-o", path, "--passes", "cleanup", "--external-data")
    assert result.exit_code == 0, result.output
    return path


def test_two_models_side_by_side_with_ratios(with_external_data: Path) -> None:
    report = bench_json(WHISPER, with_external_data, "--threads", "1", "--opt-level", "basic")
    assert report["settings"] == {
        "runs": 3,
        "warmup": 1,
        "threads": 1,
        "opt_level": "basic",
        "inputs": "synthesized",
        "seed": 0,
        "provider": "CPUExecutionProvider",
    }
    first, second = report["models"]
    assert first["path"] == str(WHISPER) and second["path"] == str(with_external_data)
    for model in (first, second):
        times = model["times_ms"]
        assert len(times) == 3 and all(t > 0 for t in times)
        latency = model["latency_ms"]
        assert latency["median"] == statistics.median(times)
        assert latency["p90"] == pytest.approx(float(np.percentile(times, 90)))
        assert latency["min"] == min(times) <= latency["median"] <= latency["p90"] <= max(times)
        assert model["session_ms"] > 0 and model["peak_rss_bytes"] > 0
        assert model["inputs"] == {"mel": {"dtype": "float32", "shape": [1, 80, 16]}}
    # Each model in its own process, not this one.
    assert len({first["pid"], second["pid"], os.getpid()}) == 3
    # Size on disk counts external data.
    assert first["data_bytes"] == 0 and first["size_bytes"] == WHISPER.stat().st_size
    data_file = with_external_data.with_name("w.onnx.data")
    assert second["data_bytes"] == data_file.stat().st_size > 0
    assert second["size_bytes"] == with_external_data.stat().st_size + second["data_bytes"]
    ratios = report["ratios"]
    assert (
        ratios["latency_median"] == second["latency_ms"]["median"] / first["latency_ms"]["median"]
    )
    assert ratios["latency_p90"] == second["latency_ms"]["p90"] / first["latency_ms"]["p90"]
    assert ratios["peak_memory"] == second["peak_rss_bytes"] / first["peak_rss_bytes"]
    assert ratios["size"] == second["size_bytes"] / first["size_bytes"]
    assert ratios["session"] == second["session_ms"] / first["session_ms"]


def test_text_table_has_a_ratio_column_only_for_two() -> None:
    result = invoke("bench", WHISPER, *FAST)
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert lines[0].split() == ["whisper_encoder.onnx"]
    for label in ("latency median", "latency p90", "session create", "peak memory", "size on disk"):
        assert any(line.startswith(label) for line in lines), label
    assert "3 runs after 1 warm-up" in lines[-1] and "mel[1, 80, 16]" in lines[-1]
    result = invoke("bench", WHISPER, WHISPER, *FAST)
    assert result.exit_code == 0, result.output
    header = result.stdout.splitlines()[0].split()
    assert header[-1] == "ratio" and len(header) == 3  # same names: full paths
    size_row = next(line for line in result.stdout.splitlines() if line.startswith("size"))
    assert size_row.endswith("1.00x")


def test_golden_inputs_and_dims() -> None:
    report = bench_json(WHISPER, "--golden", WHISPER_GOLDEN)
    mel = GoldenSet.load(WHISPER_GOLDEN).inputs[0]["mel"]
    assert report["models"][0]["inputs"]["mel"]["shape"] == list(mel.shape)
    assert report["settings"]["inputs"] == "golden" and report["settings"]["seed"] is None
    report = bench_json(WHISPER, "--dim", "frames=40", "--dim", "batch=2")
    assert report["models"][0]["inputs"]["mel"]["shape"] == [2, 80, 40]


def unrunnable(tmp_path: Path) -> Path:
    node = helper.make_node("Mystery", ["x"], ["y"], domain="my.custom")
    graph = helper.make_graph(
        [node],
        "g",
        [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [2])],
        [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [2])],
    )
    opsets = [helper.make_opsetid("", 17), helper.make_opsetid("my.custom", 1)]
    path = tmp_path / "mystery.onnx"
    onnx.save(helper.make_model(graph, opset_imports=opsets), path)
    return path


@pytest.mark.parametrize(
    ("args", "code", "fragments"),
    [
        (["--runs", "0"], 2, ["--runs must be at least 1"]),
        (["--warmup", "-1"], 2, ["must not be negative"]),
        (["--dim", "bogus=2"], 2, ["--dim", "bogus"]),
        (["--dim", "frames=2", "--golden", WHISPER_GOLDEN], 2, ["--dim only applies"]),
        (["--golden", "nowhere"], 2, ["golden set folder not found"]),
    ],
)
def test_bad_options_are_one_line_errors(args: list, code: int, fragments: list) -> None:
    assert_one_line_error(invoke("bench", WHISPER, *args), code, *fragments)


def test_unreadable_or_unrunnable_model_exits_4(tmp_path: Path) -> None:
    (tmp_path / "empty.onnx").write_bytes(b"")
    assert_one_line_error(invoke("bench", tmp_path / "empty.onnx"), 4, "not an ONNX model")
    result = invoke("bench", WHISPER, unrunnable(tmp_path), *FAST)
    assert_one_line_error(result, 4, "mystery.onnx", "ONNX Runtime cannot run it")


def test_in_process_latency_of_a_model_with_external_data(with_external_data: Path) -> None:
    from onnxopt import latency, model_io

    model = model_io.load(with_external_data)
    feeds = GoldenSet.load(WHISPER_GOLDEN).inputs[0]
    median = latency.model_latency_ms(model, feeds, latency.LatencySettings(runs=3))
    assert 0 < median < 10_000
    # No temporary graph file is left beside the weights.
    assert sorted(p.name for p in with_external_data.parent.iterdir()) == ["w.onnx", "w.onnx.data"]


def test_time_runs_counts_warmup_and_timed_runs() -> None:
    from onnxopt import latency

    class Session:
        calls = 0

        def run(self, outputs: object, feeds: dict) -> list:
            Session.calls += 1
            return []

    times = latency.time_runs(Session(), {}, runs=4, warmup=2)
    assert Session.calls == 6 and len(times) == 4 and all(t >= 0 for t in times)
