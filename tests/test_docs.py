"""The docs stay true: every CLI option is documented, and the pass example runs."""

from __future__ import annotations

import re

import click
import numpy as np
from conftest import FLOAT, ROOT, assert_same_outputs, make_model, op_types, run
from onnx import helper

from onnxopt.cli.main import cli

DOCS = ROOT / "docs"


def test_every_cli_option_is_in_the_reference() -> None:
    reference = (DOCS / "cli.md").read_text()
    for name, command in cli.commands.items():
        assert f"onnxopt {name}" in reference
        for param in command.params:
            if isinstance(param, click.Option) and param.name != "help":
                assert any(o in reference for o in param.opts), (name, param.opts)


def test_writing_a_pass_example_runs() -> None:
    text = (DOCS / "writing-a-pass.md").read_text()
    code = re.search(r"```python\n# my_passes.py\n(.*?)```", text, re.S).group(1)
    namespace: dict = {}
    exec(
        compile(code.replace('"drop-dropout"', '"test-doc-drop-dropout"'), "doc", "exec"), namespace
    )
    nodes = [
        helper.make_node("Dropout", ["x"], ["d"], name="d0"),
        helper.make_node("Relu", ["d"], ["y"]),
    ]
    model = make_model(nodes, {"x": (FLOAT, [2, 3])}, {"y": (FLOAT, [2, 3])})
    feeds = {"x": np.arange(6, dtype=np.float32).reshape(2, 3) - 3}
    before = run(model, feeds)
    result = namespace["DropDropout"]()(model)
    assert result.counts == {"dropout": 1} and op_types(model) == ["Relu"]
    assert_same_outputs(before, run(model, feeds))
    kept = make_model(nodes, {"x": (FLOAT, [2, 3])}, {"y": (FLOAT, [2, 3])})
    assert not namespace["DropDropout"](keep_names=["d0"])(kept).modified


def test_every_builtin_target_is_documented() -> None:
    from onnxopt.targets import builtin_targets

    overview = (DOCS / "targets.md").read_text()
    for name in builtin_targets():
        assert f"`{name}`" in overview, name
