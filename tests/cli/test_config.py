"""Pipeline files: `onnxopt run --config FILE` and `--save-config FILE`."""

from __future__ import annotations

import json
import re
import shutil
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner, Result
from conftest import WHISPER, WHISPER_GOLDEN

from onnxopt.cli import config
from onnxopt.cli.main import build_passes, cli

TOML = pytest.mark.skipif(sys.version_info < (3, 11), reason="TOML needs tomllib")


def invoke(*args: object) -> Result:
    result = CliRunner().invoke(cli, [str(a) for a in args])
    assert result.exc_info is None or result.exc_info[0] is SystemExit, result.exc_info
    return result


def assert_one_line_error(result: Result, code: int, *fragments: str) -> None:
    assert result.exit_code == code, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


def run_json(tmp_path: Path, *args: object) -> dict:
    result = invoke("run", WHISPER, "-o", tmp_path / "out.onnx", "--json", *args)
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


@pytest.fixture
def project(tmp_path: Path) -> Path:
    """A folder with the model's golden set beside a pipeline file, run from elsewhere."""
    folder = tmp_path / "project"
    folder.mkdir()
    shutil.copytree(WHISPER_GOLDEN, folder / "golden")
    meta = json.loads((folder / "golden" / "golden.json").read_text())
    (folder / "golden" / "golden.json").write_text(json.dumps({**meta, "source": "project"}))
    return folder


@TOML
def test_toml_file_sets_passes_golden_and_tolerances(project: Path, tmp_path: Path) -> None:
    (project / "pipeline.toml").write_text(
        'passes = "cleanup"\ngolden = "golden"\nreport = "r.json"\n'
        "[tolerances.exact]\natol = 0.002\n"
    )
    report = run_json(tmp_path, "--config", project / "pipeline.toml")
    assert report["pipeline"] == "cleanup"
    assert report["golden"]["source"] == "project"  # the file's golden set, relative to the file
    assert "atol=0.002" in report["passes"][0]["tolerance"]
    assert json.loads((project / "r.json").read_text())["pipeline"] == "cleanup"


@TOML
def test_passes_as_tables_and_flags_override_the_file(project: Path, tmp_path: Path) -> None:
    (project / "p.toml").write_text(
        "seed = 5\n"
        '[[passes]]\nname = "fold-constants"\nmax_output_elements = 100\nlift_constants = false\n'
        '[[passes]]\nname = "fuse-gelu"\ntarget = "onnx-17"\n'
    )
    report = run_json(tmp_path, "--config", project / "p.toml")
    assert report["pipeline"] == (
        "fold-constants(max_output_elements=100,lift_constants=false),fuse-gelu(target=onnx-17)"
    )
    report = run_json(tmp_path, "--config", project / "p.toml", "--passes", "cleanup")
    assert report["pipeline"] == "cleanup"


def test_target_goes_to_passes_without_their_own(tmp_path: Path) -> None:
    report = run_json(
        tmp_path, "--passes", "fuse-gelu,fuse-bias(target=ort-cpu)", "--target", "onnx-17"
    )
    assert report["pipeline"] == "fuse-gelu(target=onnx-17),fuse-bias"
    result = invoke(
        "run", WHISPER, "-o", tmp_path / "x.onnx", "--passes", "cleanup", "--target", "onnx-17"
    )
    assert_one_line_error(result, 2, "no pass in 'cleanup' has a target option")
    result = invoke(
        "run", WHISPER, "-o", tmp_path / "x.onnx", "--passes", "lower", "--target", "onnx-99"
    )
    assert_one_line_error(result, 2, "unknown target 'onnx-99'")


def test_json_file_round_trips_through_save_config(project: Path, tmp_path: Path) -> None:
    saved = project / "saved.json"
    args = ["--passes", "fold-constants(max_output_elements=100),cleanup", "--keep-going"]
    args += ["--golden", project / "golden", "--atol", "0.01", "--seed", "4", "--no-verify"]
    result = invoke("run", WHISPER, "-o", tmp_path / "out.onnx", *args, "--save-config", saved)
    assert result.exit_code == 0, result.output
    data = json.loads(saved.read_text())
    assert data == {
        "passes": "fold-constants(max_output_elements=100),cleanup",
        "golden": "golden",
        "verify": False,
        "keep-going": True,
        "seed": 4,
        "tolerances": {"exact": {"atol": 0.01}, "interface": {"atol": 0.01}},
    }
    expected = config.merge(config.read(saved), {})
    assert expected.golden == project / "golden" and expected.verify is False
    again = project / "again.json"
    result = invoke(
        "run", WHISPER, "-o", tmp_path / "o2.onnx", "--config", saved, "--save-config", again
    )
    assert result.exit_code == 0, result.output
    assert json.loads(again.read_text()) == data


@TOML
def test_toml_round_trip(tmp_path: Path) -> None:
    settings = config.RunConfig(
        passes="fuse(target=onnx-17)",
        golden=tmp_path / "g",
        external_data=False,
        dims={"frames": 40, "odd name": 2},
        plugins=["my_module", str(tmp_path / "p.py")],
        tolerances={"exact": {"atol": 1e-5, "rtol": None}, "approximate": {"min_cosine": 0.99}},
    )
    path = config.write(settings, tmp_path / "sub.toml")
    assert config.merge(config.read(path), {}) == settings
    assert 'golden = "g"' in path.read_text()


def test_save_config_never_overwrites_the_model(tmp_path: Path) -> None:
    model = tmp_path / "model.json"  # a model whose name looks like a pipeline file
    shutil.copy(WHISPER, model)
    before = model.read_bytes()
    result = invoke("run", model, "-o", tmp_path / "o.onnx", "--save-config", model)
    assert_one_line_error(result, 2, "refusing to overwrite the input")
    assert model.read_bytes() == before and not (tmp_path / "o.onnx").exists()
    result = invoke("run", WHISPER, "-o", tmp_path / "o.onnx", "--save-config", tmp_path / "c.yaml")
    assert_one_line_error(result, 2, "expected a .toml or .json file")


def test_save_config_is_atomic(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "c.json"
    path.write_text('{"seed": 1}\n')

    def broken(*args: object) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(config.os, "replace", broken)
    with pytest.raises(OSError):
        config.write(config.RunConfig(seed=2), path)
    assert path.read_text() == '{"seed": 1}\n'
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.json"]  # no temporary left


def test_save_config_line_and_quiet(tmp_path: Path) -> None:
    out, saved = tmp_path / "o.onnx", tmp_path / "c.json"
    result = invoke("run", WHISPER, "-o", out, "--passes", "cleanup", "-q", "--save-config", saved)
    assert result.exit_code == 0 and result.stdout == f"wrote {saved}\nwrote {out}\n"
    report = run_json(tmp_path, "--passes", "cleanup", "--save-config", saved)
    assert report["pipeline"] == "cleanup"  # the 'wrote' line went to stderr


@pytest.mark.parametrize(
    ("content", "fragments"),
    [
        ({"kep-going": True}, ["unknown key 'kep-going'", "did you mean 'keep-going'"]),
        ({"zzz": 1}, ["unknown key 'zzz'", "known keys: passes"]),
        ({"seed": "x"}, ["'seed' must be an integer"]),
        ({"verify": "no"}, ["'verify' must be true or false"]),
        ({"dims": {"frames": 0}}, ["'dims.frames' must be a positive integer"]),
        ({"tolerances": {"exakt": {}}}, ["unknown tolerance kind 'exakt'", "'exact'"]),
        ({"tolerances": {"exact": {"atl": 1}}}, ["'tolerances.exact.atl'", "'atol'"]),
        ({"passes": "cleanup)"}, ["column 8"]),
        ({"passes": "cleanp"}, ["unknown pass 'cleanp'", "did you mean 'cleanup'"]),
        ({"passes": [{"target": "x"}]}, ["passes[0]", "string 'name'"]),
        ({"passes": [{"name": "fold-constants", "max_output_element": 3}]}, ["did you mean"]),
        ({"golden": "nope"}, ["golden set folder not found", "nope"]),
        ({"target": "onnx-99", "passes": "lower"}, ["unknown target 'onnx-99'"]),
        ({"plugins": ["no_such.py"]}, ["plugin file not found"]),
        ([1, 2], ["expected a table of settings"]),
        ({"report": "no/such/folder/r.json"}, ["report folder does not exist"]),
    ],
)
def test_bad_file_is_a_one_line_error(tmp_path: Path, content: object, fragments: list) -> None:
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(content))
    out = tmp_path / "out"
    out.mkdir()
    result = invoke("run", WHISPER, "-o", out / "x.onnx", "--config", path)
    assert_one_line_error(result, 2, *fragments)
    assert not any(out.iterdir())


@TOML
def test_unparsable_toml_and_missing_file(tmp_path: Path) -> None:
    (tmp_path / "bad.toml").write_text("passes = \n")
    result = invoke("run", WHISPER, "-o", tmp_path / "x.onnx", "--config", tmp_path / "bad.toml")
    assert_one_line_error(result, 2, "bad.toml is not valid TOML", "line 1")
    result = invoke("run", WHISPER, "-o", tmp_path / "x.onnx", "--config", tmp_path / "no.toml")
    assert_one_line_error(result, 2, "pipeline file not found")


def test_toml_on_python_310_says_use_json(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "p.toml").write_text('passes = "cleanup"\n')
    monkeypatch.setitem(sys.modules, "tomllib", None)  # what 3.10 gives: ImportError
    result = invoke("run", WHISPER, "-o", tmp_path / "x.onnx", "--config", tmp_path / "p.toml")
    assert_one_line_error(result, 2, "need Python 3.11+", "p.json")


def test_dims_in_file_merge_with_flags(tmp_path: Path) -> None:
    path = tmp_path / "p.json"
    path.write_text(json.dumps({"passes": "cleanup", "dims": {"frames": 40}}))
    report = run_json(tmp_path, "--config", path)
    assert [d["frames"] for d in report["golden"]["dims"]] == [40, 40]
    report = run_json(tmp_path, "--config", path, "--dim", "frames=30", "--dim", "batch=1")
    assert report["golden"]["dims"] == [{"frames": 30, "batch": 1}]
    path.write_text(json.dumps({"dims": {"frames": 40}, "golden": str(WHISPER_GOLDEN)}))
    result = invoke("run", WHISPER, "-o", tmp_path / "x.onnx", "--config", path)
    assert_one_line_error(result, 2, "--dim")


def test_the_documented_files_read(tmp_path: Path) -> None:
    text = (Path(__file__).parents[2] / "docs" / "pipeline-files.md").read_text()
    blocks = re.findall(r"```(toml|json)\n(.*?)```", text, re.S)
    assert len(blocks) >= 5
    for index, (suffix, body) in enumerate(blocks):
        if suffix == "toml" and sys.version_info < (3, 11):
            continue
        path = tmp_path / f"doc{index}.{suffix}"
        path.write_text(body)
        settings = config.merge(config.read(path), {})
        assert build_passes(settings.passes, settings.target)


def test_plugin_paths_are_relative_to_the_file(project: Path, tmp_path: Path) -> None:
    plugin = project / "plugins" / "drop.py"
    plugin.parent.mkdir()
    plugin.write_text(
        "import onnxopt\n\n\n@onnxopt.register_pass(replace=True)\n"
        "class NothingPass(onnxopt.Pass):\n"
        '    """Do nothing."""\n\n    name = "test-config-nothing"\n\n'
        "    def call(self, model):\n        return onnxopt.PassResult(model, False)\n"
    )
    path = project / "p.json"
    path.write_text(json.dumps({"plugins": ["plugins/drop.py"], "passes": "test-config-nothing"}))
    report = run_json(tmp_path, "--config", path)
    assert report["passes"][0]["status"] == "unchanged"
