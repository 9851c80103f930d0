"""The docs site: it builds with warnings as errors, its pass reference follows the registry,
every command on the how-to pages runs as written, and troubleshooting quotes real errors."""

from __future__ import annotations

import dataclasses
import json
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Literal

import pytest
import yaml
from click.testing import CliRunner
from conftest import ROOT

import onnxopt
from onnxopt import Pass, PassResult, pass_reference, registry
from onnxopt.cli.main import cli

DOCS = ROOT / "docs"
BIN = Path(sys.executable).parent
# Every ```sh and ```python block of these pages runs, in order, in one folder, and must exit 0
# (or with the code given here); shown output is ```text, and excerpts that do not run are ```py.
EXPECTED_EXIT = {"onnxopt check golden/whisper_encoder.onnx --target onnx-13\n": 3}
HOWTOS = [*sorted((DOCS / "howto").glob("*.md")), DOCS / "ship-to-an-older-runtime.md"]
_BLOCK = re.compile(r"^([ \t]*)```(sh|python)\n(.*?)^\1```$", re.S | re.M)
_OUTPUTS = re.compile(r"""(?:\s(?:-o|--output|--out|--report)\s+|output=")([^\s"]+)""")


def test_site_builds_without_warnings(tmp_path: Path) -> None:
    result = subprocess.run(
        [BIN / "mkdocs", "build", "--strict", "-f", ROOT / "mkdocs.yml", "-d", tmp_path / "site"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert "WARNING" not in result.stderr, result.stderr
    passes = (tmp_path / "site" / "reference" / "passes" / "index.html").read_text()
    # What a fresh process registers (other tests add passes to this one's registry).
    listing = json.loads(
        subprocess.run(
            [BIN / "onnxopt", "passes", "--json"], capture_output=True, text=True, check=True
        ).stdout
    )
    for entry in listing["passes"]:
        assert f'id="{entry["name"]}"' in passes, entry["name"]
    for alias in listing["aliases"]:
        assert f"<code>{alias}</code>" in passes, alias
    api = (tmp_path / "site" / "reference" / "api" / "index.html").read_text()
    for name in onnxopt.__all__:  # every public name has its entry, under its defining module
        obj = getattr(onnxopt, name)
        assert f'id="{obj.__module__}.{obj.__qualname__}"' in api, name


def test_every_page_is_in_the_nav() -> None:
    config = yaml.safe_load((ROOT / "mkdocs.yml").read_text())
    listed = set(re.findall(r"[\w/.-]+\.md", str(config["nav"])))
    pages = {str(p.relative_to(DOCS)) for p in DOCS.rglob("*.md")}
    assert pages == listed, (sorted(pages - listed), sorted(listed - pages))


class _Mode(Pass):
    """Do nothing, in one of two modes.

    Rules:
      1. ``a``: first.
    Then a paragraph.
    """

    name = "test-docs-ref"
    mode: Literal["a", "b"] = "a"
    names: list[str] = dataclasses.field(default_factory=lambda: ["x", "y"])
    limit: int | None = None
    strict: bool = False

    def call(self, model):  # pragma: no cover - never run
        return PassResult(model, False)


def test_pass_reference_renders_options() -> None:
    registry.register_pass(_Mode)
    try:
        text = pass_reference.markdown()
    finally:
        del registry._PASSES[_Mode.name]
    section = text.split("### `test-docs-ref`")[1].split("\n### ")[0]
    assert "*exact*: Do nothing, in one of two modes." in section
    assert "Rules:\n\n1. ``a``: first.\n\nThen a paragraph." in section
    assert "| `mode` | `str` | `a` | `a`, `b` |" in section
    assert "| `names` | `list[str]` | `[x,y]` |  |" in section
    assert "| `limit` | `int \\| None` | `none` | `none`, or any `int` |" in section
    assert "| `strict` | `bool` | `false` | `true`, `false` |" in section
    row = "| [`test-docs-ref`](#test-docs-ref) | exact | Do nothing, in one of two modes. |"
    assert row in text


def test_pass_reference_lists_every_pass_option_and_alias() -> None:
    text = pass_reference.markdown()
    sections = dict(re.findall(r"^### `([\w-]+)`\n(.*?)(?=^### |\Z)", text, re.S | re.M))
    assert list(sections) == registry.pass_names()
    for name, section in sections.items():
        cls = registry.get_pass(name)
        assert f"*{cls.kind}*: {cls.summary()}" in section
        for field in cls.options():
            assert f"| `{field.name}` |" in section, (name, field.name)
    for alias, spec in registry.aliases().items():
        row = next(line for line in text.splitlines() if line.startswith(f"| `{alias}` |"))
        assert [item.strip() for item in spec.split(",")] == re.findall(r"`([\w-]+)`", row)[1:]


def _blocks(page: Path) -> list[tuple[str, str]]:
    """The runnable blocks of a page, in order: (language, code without its indentation)."""
    found = []
    for indent, language, code in _BLOCK.findall(page.read_text()):
        lines = [line.removeprefix(indent) for line in code.splitlines()]
        found.append((language, "\n".join(lines) + "\n"))
    return found


@pytest.mark.parametrize("page", HOWTOS, ids=lambda p: p.stem)
def test_howto_commands_run(page: Path, tmp_path: Path) -> None:
    blocks = _blocks(page)
    assert blocks, f"{page.name} has no runnable blocks"
    golden = tmp_path / "golden"
    golden.mkdir()  # links to each shipped file: what a command writes stays in tmp_path
    for entry in (ROOT / "golden").iterdir():
        (golden / entry.name).symlink_to(entry)
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}", "NO_COLOR": "1"}
    for language, code in blocks:
        command = ["bash", "-euo", "pipefail", "-c", code]
        if language == "python":
            command = [sys.executable, "-c", code]
        result = subprocess.run(
            command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120
        )
        expected = EXPECTED_EXIT.get(code, 0)
        assert result.returncode == expected, f"{code}\n{result.stdout}\n{result.stderr}"
        for output in _OUTPUTS.findall(code):
            assert not output.startswith("golden/"), f"{page.name} writes into golden/: {output}"
            assert (tmp_path / output).exists(), f"{page.name}: {output} was not written"


def test_bash_completion_completes_commands() -> None:
    env = {
        **os.environ,
        "_ONNXOPT_COMPLETE": "bash_complete",
        "COMP_WORDS": "onnxopt ru",
        "COMP_CWORD": "1",
    }
    result = subprocess.run([BIN / "onnxopt"], env=env, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert "plain,run" in result.stdout.splitlines()


def test_troubleshooting_covers_every_exit_code() -> None:
    from onnxopt import errors

    text = (DOCS / "troubleshooting.md").read_text()
    codes = {
        cls.exit_code
        for cls in vars(errors).values()
        if isinstance(cls, type) and issubclass(cls, errors.OnnxoptError)
    }
    for code in codes:
        assert f"## Exit {code}: " in text, code


@pytest.mark.parametrize(
    ("args", "code"),
    [
        (["run", "model.onnx", "-o", "{out}"], 4),
        (["run", "{kws}", "-o", "{out}", "--passes", "fuse-atention"], 2),
        (["run", "{kws}", "-o", "{out}", "--passes", "quant-int4(blok=32)"], 2),
        (["run", "{kws}", "-o", "{out}", "--passes", "quant-int4(algo=gptq)"], 2),
        (["run", "{kws}", "-o", "{out}", "--golden", "DIR"], 2),
        (["run", "{kws}", "-o", "{out}", "--golden", "{whisper_golden}"], 2),
        (["run", "{kws}", "-o", "{out}", "--passes", "lower", "--target", "onnx-99"], 2),
        (["run", "{kws}", "-o", "{out}", "--target", "onnx-13"], 2),
        (["run", "{kws}", "-o", "{out}", "--tolerance", "exact.foo=1"], 2),
    ],
)
def test_troubleshooting_quotes_real_messages(
    args: list[str], code: int, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The error a user gets is the one the page explains, word for word (paths aside)."""
    paths = {
        "out": str(tmp_path / "out.onnx"),
        "kws": str(ROOT / "golden" / "kws_gru.onnx"),
        "whisper_golden": str(ROOT / "golden" / "whisper_encoder.golden"),
    }
    monkeypatch.chdir(tmp_path)  # no model.onnx, no DIR here
    result = CliRunner().invoke(cli, [a.format(**paths) for a in args])
    assert result.exit_code == code, result.output
    message = result.output.strip().splitlines()[-1].removeprefix("error: ")
    message = re.sub(r"^pipeline '.*?', column \d+: ", "", message)  # echoes the user's spec
    text = (DOCS / "troubleshooting.md").read_text()
    assert message.split(" (built-in")[0] in text, message
