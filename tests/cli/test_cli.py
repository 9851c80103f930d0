"""The ``onnxopt`` command line, end to end on the shipped Whisper encoder."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from importlib.metadata import version
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from click.testing import CliRunner, Result
from conftest import WHISPER, WHISPER_GOLDEN, assert_same_outputs, run
from onnx import numpy_helper

import onnxopt
from onnxopt import registry
from onnxopt.cli.main import cli
from onnxopt.golden import GoldenSet, load_npz

ONNXOPT = Path(sys.executable).with_name("onnxopt")
BIN_ENV = {**os.environ, "PATH": f"{ONNXOPT.parent}{os.pathsep}{os.environ['PATH']}"}

# A user pass that breaks numerics on purpose: it doubles the first MatMul weight.
SCALE_PLUGIN = '''
import numpy as np
import onnx_ir as ir
import onnxopt


@onnxopt.register_pass
class ScaleWeightPass(onnxopt.Pass):
    """Double the first MatMul weight."""

    name = "scale-weight"

    def call(self, model):
        for node in model.graph:
            weight = node.inputs[1] if node.op_type == "MatMul" else None
            if weight is not None and weight.const_value is not None:
                weight.const_value = ir.tensor(weight.const_value.numpy() * np.float32(2))
                return onnxopt.PassResult(model, True)
        return onnxopt.PassResult(model, False)
'''


def invoke(*args: object) -> Result:
    result = CliRunner().invoke(cli, [str(a) for a in args])
    # Only a deliberate sys.exit is acceptable: any other exception is a crash.
    assert result.exc_info is None or result.exc_info[0] is SystemExit, result.exc_info
    return result


def onnxopt_cli(*args: object) -> subprocess.CompletedProcess:
    """The installed console script, in a fresh process."""
    return subprocess.run(
        [str(ONNXOPT), *map(str, args)], capture_output=True, text=True, timeout=300
    )


def assert_one_line_error(result: Result, code: int, *fragments: str) -> None:
    assert result.exit_code == code, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert "Traceback" not in result.output
    for fragment in fragments:
        assert fragment in lines[0]


def golden_outputs(model_path: Path) -> list[dict[str, np.ndarray]]:
    model = onnxopt.load(model_path)
    return [run(model, case) for case in load_npz(WHISPER_GOLDEN / "inputs.npz")]


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# --- run ----------------------------------------------------------------------------------


def test_run_simplify_writes_verified_model_and_report(tmp_path: Path) -> None:
    out, report_path = tmp_path / "out.onnx", tmp_path / "r.json"
    result = invoke("run", WHISPER, "-o", out, "--golden", WHISPER_GOLDEN, "--report", report_path)
    assert result.exit_code == 0, result.output
    for expected, actual in zip(golden_outputs(WHISPER), golden_outputs(out), strict=True):
        assert_same_outputs(expected, actual)

    report = json.loads(report_path.read_text())
    assert report["ok"] and report["exit_code"] == 0
    expected = registry.aliases()["simplify"].split(",")
    assert [p["name"] for p in report["passes"]] == expected
    for entry in report["passes"]:
        assert {"status", "counts", "metrics", "seconds"} <= entry.keys()
        assert entry["status"] in ("ok", "unchanged")
        assert isinstance(entry["counts"], dict)
        if entry["status"] == "ok":
            assert entry["metrics"]["passed"] and entry["metrics"]["max_abs"] <= 1e-4
    assert any(p["status"] == "ok" for p in report["passes"])
    for name in ("fold-constants", "cleanup", "infer-shapes"):
        assert name in result.stdout
    assert f"wrote {out}" in result.stdout


def test_run_json_prints_the_report(tmp_path: Path) -> None:
    result = invoke("run", WHISPER, "-o", tmp_path / "o.onnx", "--passes", "cleanup", "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["pipeline"] == "cleanup" and report["passes"][0]["status"] == "ok"


@pytest.fixture
def plugin(tmp_path: Path) -> Path:
    path = tmp_path / "scale_plugin.py"
    path.write_text(SCALE_PLUGIN)
    return path


def test_failing_plugin_pass_stops_with_reproducer(tmp_path: Path, plugin: Path) -> None:
    out = tmp_path / "out.onnx"
    args = ["run", WHISPER, "-o", out, "--golden", WHISPER_GOLDEN, "--plugin", plugin]
    result = onnxopt_cli(*args, "--passes", "cleanup,scale-weight,infer-shapes")
    assert result.returncode == 3, result.stdout + result.stderr
    assert "Traceback" not in result.stderr
    assert not out.exists()
    assert "scale-weight failed" in result.stdout

    diverging = next(line for line in result.stdout.splitlines() if "first diverging" in line)
    tensor = diverging.split("'")[1]
    produced = {v.name for node in onnxopt.load(WHISPER).graph for v in node.outputs}
    assert tensor in produced

    assert (tmp_path / "out.before-scale-weight.onnx").is_file()
    command = next(
        line.split("reproduce: ", 1)[1]
        for line in result.stdout.splitlines()
        if "reproduce: " in line
    )
    again = subprocess.run(
        command, shell=True, capture_output=True, text=True, env=BIN_ENV, timeout=300
    )
    assert again.returncode == 3, again.stdout + again.stderr
    assert "scale-weight failed" in again.stdout


def test_keep_going_rolls_back_the_failing_pass(tmp_path: Path, plugin: Path) -> None:
    out = tmp_path / "out.onnx"
    result = onnxopt_cli(
        *("run", WHISPER, "-o", out, "--golden", WHISPER_GOLDEN, "--plugin", plugin),
        *("--passes", "scale-weight,cleanup", "--keep-going"),
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "scale-weight failed" in result.stdout
    for expected, actual in zip(golden_outputs(WHISPER), golden_outputs(out), strict=True):
        assert_same_outputs(expected, actual)


def test_reproduce_command_survives_a_path_with_spaces(tmp_path: Path, plugin: Path) -> None:
    folder = tmp_path / "my models"
    folder.mkdir()
    result = onnxopt_cli(
        *("run", WHISPER, "-o", folder / "out.onnx", "--golden", WHISPER_GOLDEN),
        *("--plugin", plugin, "--passes", "scale-weight"),
    )
    assert result.returncode == 3
    command = result.stdout.split("reproduce: ", 1)[1].splitlines()[0]
    again = subprocess.run(
        command, shell=True, capture_output=True, text=True, env=BIN_ENV, timeout=300
    )
    assert again.returncode == 3, again.stderr


def test_external_data_output_can_be_optimized_again(tmp_path: Path) -> None:
    (tmp_path / "m").mkdir()
    first = tmp_path / "m" / "w.onnx"
    assert (
        invoke("run", WHISPER, "-o", first, "--passes", "cleanup", "--external-data").exit_code == 0
    )
    assert (tmp_path / "m" / "w.onnx.data").is_file()
    # The working directory is the repository root, not the model's folder.
    result = invoke("run", first, "-o", tmp_path / "again.onnx", "--passes", "infer-shapes")
    assert result.exit_code == 0, result.output


# --- errors -------------------------------------------------------------------------------

UNCLOSED = "cleanup,fold-constants(max_input_elements=3"


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        ("missing.onnx", None, "no such file"),
        ("text.onnx", b"not a model\n", "not a readable ONNX model"),
        ("truncated.onnx", WHISPER.read_bytes()[:100_000], "not a readable ONNX model"),
        ("empty.onnx", b"", "not an ONNX model"),
    ],
)
def test_unreadable_model_exits_4(tmp_path: Path, name: str, content: bytes, message: str) -> None:
    model = tmp_path / name
    if content is not None:
        model.write_bytes(content)
    out = tmp_path / "out"
    out.mkdir()
    assert_one_line_error(invoke("run", model, "-o", out / "x.onnx"), 4, message, name)
    assert not any(out.iterdir())


@pytest.mark.parametrize(
    ("spec", "fragments"),
    [
        ("cleanp", ["unknown pass 'cleanp'", "did you mean 'cleanup'"]),
        ("fold-constants(max_output_element=3)", ["did you mean 'max_output_elements'"]),
        ("fold-constants(max_output_elements=lots)", ["expected int", "'lots'"]),
        (UNCLOSED, [f"column {len(UNCLOSED) + 1}", "expected ')', found end of input"]),
        ("cleanup)", ["column 8", "unexpected ')'"]),
    ],
)
def test_bad_pipeline_spec_exits_2(tmp_path: Path, spec: str, fragments: list[str]) -> None:
    result = invoke("run", WHISPER, "-o", tmp_path / "x.onnx", "--passes", spec)
    assert_one_line_error(result, 2, *fragments)
    assert not any(tmp_path.iterdir())


@pytest.mark.parametrize(
    ("args", "fragments"),
    [
        (["--dim", "bogus=3"], ["--dim", "bogus"]),
        (["--dim", "frames=zero"], ["--dim frames", "positive integer"]),
        (["--tolerance", "exact.atol=abc"], ["--tolerance exact.atol", "'abc'"]),
        (["--tolerance", "exact=1"], ["KIND.NAME=VALUE"]),
        (["--tolerance", "exact.bogus=1"], ["unknown tolerance key", "bogus"]),
        (["--golden", "no-such-golden"], ["golden set folder not found"]),
        (["--plugin", "no_such_plugin.py"], ["plugin file not found"]),
    ],
)
def test_bad_option_exits_2(tmp_path: Path, args: list[str], fragments: list[str]) -> None:
    result = invoke("run", WHISPER, "-o", tmp_path / "x.onnx", *args)
    assert_one_line_error(result, 2, *fragments)
    assert not any(tmp_path.iterdir())


def test_unknown_cli_option_is_a_usage_error_with_suggestion(tmp_path: Path) -> None:
    result = invoke("run", WHISPER, "-o", tmp_path / "x.onnx", "--pases", "cleanup")
    assert result.exit_code == 2
    assert "--passes" in result.stderr and "Traceback" not in result.output


def test_output_over_input_is_refused(tmp_path: Path) -> None:
    model = tmp_path / "model.onnx"
    shutil.copy(WHISPER, model)
    (tmp_path / "link.onnx").symlink_to(model)
    before = sha256(model)
    for target in (model, tmp_path / "sub" / ".." / "model.onnx", tmp_path / "link.onnx"):
        (tmp_path / "sub").mkdir(exist_ok=True)
        result = invoke("run", model, "-o", target, "--passes", "cleanup")
        assert_one_line_error(result, 2, "refusing to overwrite the input")
    assert sha256(model) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["link.onnx", "model.onnx", "sub"]


@pytest.mark.parametrize("problem", ["wrong name", "wrong dtype", "wrong rank"])
def test_golden_set_not_matching_the_model_exits_2(tmp_path: Path, problem: str) -> None:
    golden = GoldenSet.load(WHISPER_GOLDEN)
    mel = golden.inputs[0]["mel"]
    bad = {
        "wrong name": {"audio": mel},
        "wrong dtype": {"mel": mel.astype(np.float64)},
        "wrong rank": {"mel": mel[0]},
    }[problem]
    GoldenSet(inputs=[bad], outputs=golden.outputs[:1]).save(tmp_path / "bad.golden")
    out = tmp_path / "out"
    out.mkdir()
    result = invoke("run", WHISPER, "-o", out / "x.onnx", "--golden", tmp_path / "bad.golden")
    assert_one_line_error(result, 2, "golden inputs")
    assert not any(out.iterdir())


def test_missing_output_folder_exits_2(tmp_path: Path) -> None:
    result = invoke("run", WHISPER, "-o", tmp_path / "nope" / "x.onnx", "--passes", "cleanup")
    assert_one_line_error(result, 2, "output folder does not exist")
    assert not (tmp_path / "nope").exists()


def test_errors_end_to_end_have_no_traceback(tmp_path: Path) -> None:
    (tmp_path / "empty.onnx").write_bytes(b"")
    cases = [
        (["run", tmp_path / "empty.onnx", "-o", tmp_path / "x.onnx"], 4),
        (["run", WHISPER, "-o", tmp_path / "x.onnx", "--passes", "cleanp"], 2),
        (["run", WHISPER, "-o", tmp_path / "x.onnx", "--pases", "cleanup"], 2),
    ]
    for args, code in cases:
        result = onnxopt_cli(*args)
        assert result.returncode == code, result.stderr
        assert "Traceback" not in result.stderr and result.stderr.strip()
    assert not (tmp_path / "x.onnx").exists()


# --- passes, golden, verify, inspect, version ---------------------------------------------


def test_passes_lists_builtins_and_aliases() -> None:
    result = invoke("passes")
    assert result.exit_code == 0
    for name in ("fold-constants", "cleanup", "infer-shapes", "simplify"):
        assert name in result.stdout
    listing = json.loads(invoke("passes", "--json").stdout)
    names = {p["name"] for p in listing["passes"]}
    assert {"fold-constants", "cleanup", "infer-shapes"} <= names
    assert listing["aliases"]["simplify"] == registry.aliases()["simplify"]
    fold = next(p for p in listing["passes"] if p["name"] == "fold-constants")
    assert {o["name"] for o in fold["options"]} >= {"max_output_elements", "max_input_elements"}


def test_golden_writes_a_golden_set(tmp_path: Path) -> None:
    result = invoke("golden", WHISPER, "-o", tmp_path / "g")
    assert result.exit_code == 0, result.output
    assert {p.name for p in (tmp_path / "g").iterdir()} == {
        "inputs.npz",
        "outputs.npz",
        "golden.json",
    }
    folder = tmp_path / "g"
    inputs, outputs = load_npz(folder / "inputs.npz"), load_npz(folder / "outputs.npz")
    meta = json.loads((folder / "golden.json").read_text())
    assert len(inputs) == len(outputs) == len(meta["cases"]) >= 1
    model = onnxopt.load(WHISPER)
    for case, expected in zip(inputs, outputs, strict=True):
        assert case["mel"].dtype == np.float32 and case["mel"].shape[1] == 80
        assert_same_outputs(run(model, case), expected)


def test_golden_dim_fixes_frames(tmp_path: Path) -> None:
    result = invoke("golden", WHISPER, "-o", tmp_path / "g", "--dim", "frames=40")
    assert result.exit_code == 0, result.output
    inputs = load_npz(tmp_path / "g" / "inputs.npz")
    assert inputs and all(case["mel"].shape[2] == 40 for case in inputs)
    outputs = load_npz(tmp_path / "g" / "outputs.npz")
    assert all(case["hidden"].shape[1] == 20 for case in outputs)  # stride-2 conv


def test_golden_uses_the_users_inputs(tmp_path: Path) -> None:
    mel = np.random.default_rng(7).standard_normal((3, 80, 10)).astype(np.float32)
    np.savez(tmp_path / "x.npz", mel=mel)
    result = invoke("golden", WHISPER, "-o", tmp_path / "g", "--inputs", tmp_path / "x.npz")
    assert result.exit_code == 0, result.output
    golden = GoldenSet.load(tmp_path / "g")
    assert len(golden.inputs) == 1
    np.testing.assert_array_equal(golden.inputs[0]["mel"], mel)
    assert_same_outputs(run(onnxopt.load(WHISPER), {"mel": mel}), golden.outputs[0])


def test_golden_shapes_1_gives_one_case(tmp_path: Path) -> None:
    result = invoke("golden", WHISPER, "-o", tmp_path / "g", "--shapes", "1")
    assert result.exit_code == 0, result.output
    assert len(load_npz(tmp_path / "g" / "inputs.npz")) == 1


def test_golden_shapes_0_is_refused(tmp_path: Path) -> None:
    assert_one_line_error(invoke("golden", WHISPER, "-o", tmp_path / "g", "--shapes", "0"), 2)
    assert not (tmp_path / "g").exists()


def perturbed_whisper(tmp_path: Path) -> Path:
    model = ir.load(WHISPER)
    weight = next(
        node.inputs[1]
        for node in model.graph
        if node.op_type == "MatMul" and node.inputs[1].const_value is not None
    )
    array = weight.const_value.numpy().copy()
    array[0, 0] += 1.0
    weight.const_value = ir.tensor(array, name=weight.name)
    ir.save(model, tmp_path / "perturbed.onnx")
    return tmp_path / "perturbed.onnx"


def test_verify_same_and_different(tmp_path: Path) -> None:
    same = invoke("verify", WHISPER, WHISPER, "--golden", WHISPER_GOLDEN)
    assert same.exit_code == 0 and same.stdout.startswith("same"), same.output
    different = invoke("verify", WHISPER, perturbed_whisper(tmp_path))
    assert different.exit_code == 3, different.output
    assert different.stdout.startswith("DIFFERENT")
    report = json.loads(invoke("verify", WHISPER, tmp_path / "perturbed.onnx", "--json").stdout)
    assert report["passed"] is False and report["max_abs"] > 0


def test_inspect_matches_an_independent_count() -> None:
    proto = onnx.load(WHISPER)
    parameters = sum(numpy_helper.to_array(t).size for t in proto.graph.initializer)
    layernorms = sum(node.op_type == "LayerNormalization" for node in proto.graph.node)
    opsets = {o.domain: o.version for o in proto.opset_import}

    result = invoke("inspect", WHISPER)
    assert result.exit_code == 0, result.output
    text = result.stdout
    assert f"ai.onnx={opsets['']}" in text
    assert "mel: FLOAT" in text and "hidden: FLOAT" in text
    assert ["LayerNormalization", str(layernorms)] in [line.split() for line in text.splitlines()]
    assert f"parameters: {parameters:,}" in text

    summary = json.loads(invoke("inspect", WHISPER, "--json").stdout)
    assert summary["parameters"] == parameters
    assert summary["opsets"] == opsets
    assert summary["ops"]["LayerNormalization"] == layernorms
    assert summary["nodes"] == len(proto.graph.node)
    assert [i["name"] for i in summary["inputs"]] == [i.name for i in proto.graph.input]
    assert [o["name"] for o in summary["outputs"]] == [o.name for o in proto.graph.output]


def test_version() -> None:
    result = invoke("--version")
    assert result.exit_code == 0
    assert version("onnxopt") in result.stdout and onnxopt.__version__ in result.stdout


def test_dim_with_a_given_golden_set_is_refused(tmp_path: Path) -> None:
    out = tmp_path / "out.onnx"
    result = invoke("run", WHISPER, "-o", out, "--golden", WHISPER_GOLDEN, "--dim", "frames=9")
    assert result.exit_code == 2 and "--dim" in result.stderr and not out.exists()


# --- pre-deploy gate, JSON on stdout, quiet/verbose, color, completion (issue 7) -----------


def on_tty(args: list, stream: str = "stdout", env: dict | None = None) -> tuple[int, str, str]:
    """Run the console script with one stream on a pseudo-terminal; (code, tty text, other)."""
    import pty
    import tempfile

    master, slave = pty.openpty()
    with tempfile.TemporaryFile() as other:
        streams = {"stdout": other, "stderr": other, stream: slave}
        proc = subprocess.Popen([str(ONNXOPT), *map(str, args)], env=env, **streams)
        os.close(slave)
        chunks = []
        while True:
            try:
                data = os.read(master, 65536)
            except OSError:  # the other side closed
                break
            if not data:
                break
            chunks.append(data)
        code = proc.wait(timeout=300)
        os.close(master)
        other.seek(0)
        return code, b"".join(chunks).decode(), other.read().decode()


def gate_script() -> str:
    text = (Path(__file__).parents[2] / "docs" / "ci.md").read_text()
    return text.split("```sh\n#!/bin/sh\n", 1)[1].split("```", 1)[0]


@pytest.mark.parametrize(
    ("target", "passes", "code", "expected"),
    [
        ("ort-cpu", "cleanup", 0, "gate passed"),
        ("onnx-13", "cleanup", 3, "onnx-13 cannot run LayerNormalization (5 nodes)"),
        ("ort-cpu", "cleanup,scale-weight", 3, "pass scale-weight failed:"),
    ],
)
def test_the_documented_ci_gate_fails_the_build(
    tmp_path: Path, plugin: Path, target: str, passes: str, code: int, expected: str
) -> None:
    (tmp_path / "gate.sh").write_text(gate_script())
    (tmp_path / "pipeline.json").write_text(
        json.dumps({"passes": passes, "plugins": [str(plugin)], "golden": str(WHISPER_GOLDEN)})
    )
    env = {**BIN_ENV, "MODEL": str(WHISPER), "CONFIG": "pipeline.json", "TARGET": target}
    result = subprocess.run(
        ["sh", "gate.sh"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == code, result.stdout + result.stderr
    assert expected in result.stdout + result.stderr
    report = json.loads((tmp_path / "build" / "report.json").read_text())
    assert report["pipeline"] == passes


def test_keep_going_gate_reads_ok_from_the_report(tmp_path: Path, plugin: Path) -> None:
    (tmp_path / "gate.sh").write_text(gate_script())
    config = {"passes": "scale-weight", "plugins": [str(plugin)], "keep-going": True}
    (tmp_path / "p.json").write_text(json.dumps(config))
    env = {**BIN_ENV, "MODEL": str(WHISPER), "CONFIG": "p.json"}
    result = subprocess.run(
        ["sh", "gate.sh"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 3, result.stdout + result.stderr
    assert "pass scale-weight failed" in result.stdout


@pytest.mark.parametrize(
    "args",
    [
        ["run", WHISPER, "-o", "{tmp}/o.onnx", "--passes", "cleanup", "--json", "--verbose"],
        ["run", WHISPER, "-o", "{tmp}/o.onnx", "--passes", "scale-weight", "--json"],
        ["check", WHISPER, "--target", "onnx-13", "--json"],
        ["inspect", WHISPER, "--json"],
        ["passes", "--json"],
        ["bench", WHISPER, WHISPER, "--runs", "2", "--warmup", "0", "--json"],
    ],
)
def test_json_stdout_is_only_json_even_with_a_terminal(
    tmp_path: Path, plugin: Path, args: list
) -> None:
    args = [str(a).replace("{tmp}", str(tmp_path)) for a in args] + ["--plugin", str(plugin)]
    if args[0] in ("check", "inspect", "bench"):
        args = args[:-2]
    out = tmp_path / "stdout"
    with out.open("w") as stdout:
        import pty

        master, slave = pty.openpty()  # stderr is a terminal: progress would show if allowed
        code = subprocess.run(
            [str(ONNXOPT), *args], stdout=stdout, stderr=slave, timeout=300
        ).returncode
        os.close(slave)
        os.close(master)
    assert code in (0, 3)
    assert isinstance(json.loads(out.read_text()), dict)


def test_quiet_prints_only_failures_and_the_wrote_line(tmp_path: Path, plugin: Path) -> None:
    out = tmp_path / "o.onnx"
    result = invoke("run", WHISPER, "-o", out, "--passes", "cleanup", "--quiet")
    assert result.exit_code == 0 and result.stdout == f"wrote {out}\n" and not result.stderr
    result = invoke(
        *("run", WHISPER, "-o", out, "--plugin", plugin, "--passes", "scale-weight", "-q")
    )
    assert result.exit_code == 3
    assert result.stdout.startswith("scale-weight failed") and "pass " not in result.stdout
    result = invoke("run", WHISPER, "-o", out, "-q", "--verbose")
    assert result.exit_code == 2 and "--quiet cannot be combined" in result.stderr


def test_verbose_adds_misses_progress_and_timings(tmp_path: Path) -> None:
    out = tmp_path / "o.onnx"
    args = ["run", WHISPER, "-o", out, "--passes", "fuse-bias", "--golden", WHISPER_GOLDEN]
    plain, verbose = invoke(*args), invoke(*args, "--verbose")
    assert plain.exit_code == verbose.exit_code == 0
    misses = [line for line in verbose.stdout.splitlines() if "not fused at node" in line]
    assert misses and not any(line in plain.stdout for line in misses)
    assert "time: " in verbose.stdout and "time: " not in plain.stdout
    assert "running [1/1] fuse-bias" in verbose.stderr  # even though stderr is no terminal


def test_status_words_are_colored_only_on_a_terminal_without_no_color(tmp_path: Path) -> None:
    args = ["run", WHISPER, "-o", tmp_path / "o.onnx", "--passes", "cleanup"]
    green = "\x1b[32mok"
    code, text, _ = on_tty(args)
    assert code == 0 and green in text
    code, text, _ = on_tty(args, env={**os.environ, "NO_COLOR": "1"})
    assert code == 0 and "\x1b[" not in text and " ok " in text
    piped = onnxopt_cli(*args)
    assert piped.returncode == 0 and "\x1b[" not in piped.stdout


def test_shell_completion_as_documented() -> None:
    assert (
        "_ONNXOPT_COMPLETE=bash_source onnxopt"
        in (Path(__file__).parents[2] / "docs" / "cli.md").read_text()
    )
    env = {**os.environ, "_ONNXOPT_COMPLETE": "bash_source"}
    script = subprocess.run([str(ONNXOPT)], env=env, capture_output=True, text=True, timeout=60)
    assert script.returncode == 0 and "complete -o nosort -F" in script.stdout
    env = {**os.environ, "_ONNXOPT_COMPLETE": "bash_complete", "COMP_WORDS": "onnxopt be"}
    words = subprocess.run(
        [str(ONNXOPT)], env={**env, "COMP_CWORD": "1"}, capture_output=True, text=True, timeout=60
    )
    assert "bench" in words.stdout


def test_click_usage_errors_are_one_line_too(tmp_path: Path) -> None:
    for args in (["run"], ["bench", WHISPER, "--runs", "x"], ["nope"]):
        result = onnxopt_cli(*args)
        assert result.returncode == 2, result.stderr
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr


def test_a_closed_pipe_ends_quietly() -> None:
    proc = subprocess.Popen(
        [str(ONNXOPT), "passes", "--json"], stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    proc.stdout.close()  # like `onnxopt passes --json | head -c 0`
    assert proc.wait(timeout=60) == 1
    assert proc.stderr.read() == b""


# --- run --latency, HTML report ------------------------------------------------------------


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        (["--latency", "0"], "--latency expects at least 1 run, got 0"),
        (["--threads", "2"], "--threads only applies with --latency N"),
        (["--latency", "2", "--threads", "-1"], "--threads must not be negative"),
    ],
)
def test_bad_latency_options_exit_2(tmp_path: Path, args: list, fragment: str) -> None:
    result = invoke("run", WHISPER, "-o", tmp_path / "o.onnx", *args)
    assert_one_line_error(result, 2, fragment)
    assert not (tmp_path / "o.onnx").exists()


def test_run_latency_times_the_input_and_each_changed_model(tmp_path: Path) -> None:
    import re

    out, page = tmp_path / "o.onnx", tmp_path / "r.html"
    common = ["run", WHISPER, "-o", out, "--golden", WHISPER_GOLDEN, "--passes"]
    args = [*common, "cleanup,fold-batchnorm", "--latency", "2", "--threads", "0"]
    result = invoke(*args, "--json", "--report", page)
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["latency_settings"] == {"runs": 2, "threads": 0, "warmup": 1}
    cleanup, batchnorm = report["passes"]
    assert report["latency_ms_before"] > 0 and cleanup["latency_ms"] > 0
    assert cleanup["status"] == "ok" and batchnorm["status"] == "unchanged"
    assert batchnorm["latency_ms"] is None
    assert report["ops_before"] == dict(onnxopt.stats.op_histogram(onnxopt.load(WHISPER)))
    assert report["ops_after"] == dict(onnxopt.stats.op_histogram(onnxopt.load(out)))
    text = page.read_text(encoding="utf-8")
    assert text.startswith("<!DOCTYPE html>") and "<code>fold-batchnorm</code>" in text
    assert f"{report['latency_ms_before']:.3g} ms" in text

    table = invoke(*common, "cleanup", "--latency", "2")
    lines = table.stdout.splitlines()
    column = lines[0].index("latency")
    assert re.match(r"\d+\.\d\d ms ", lines[2][column:]), lines[2]
    summary = next(line for line in lines if line.startswith("latency: "))
    assert re.fullmatch(
        r"latency: [\d.]+ ms -> [\d.]+ ms \([\d.]+x\), median of 2 runs, 1 thread", summary
    )
    plain = invoke(*common, "cleanup").stdout.splitlines()
    assert "latency" not in plain[0] and not any(line.startswith("latency: ") for line in plain)


def test_latency_run_still_rolls_back_and_writes_the_reproducer(
    tmp_path: Path, plugin: Path
) -> None:
    out, page = tmp_path / "out.onnx", tmp_path / "r.html"
    result = onnxopt_cli(
        *("run", WHISPER, "-o", out, "--golden", WHISPER_GOLDEN, "--plugin", plugin),
        *("--passes", "cleanup,scale-weight", "--latency", "1", "--report", page),
    )
    assert result.returncode == 3, result.stdout + result.stderr
    assert not out.exists() and (tmp_path / "out.before-scale-weight.onnx").is_file()
    text = page.read_text(encoding="utf-8")
    assert "failed (exit 3)" in text and "out.before-scale-weight.onnx" in text
    assert "--plugin" in text  # the reproducer names the plugin, as in the table
