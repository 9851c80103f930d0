"""The end-to-end examples run, and the figures they print hold: each runs as a user would."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ROOT

pytest.importorskip("torch", reason="the examples export their models with torch (test extra)")

EXAMPLES = ROOT / "examples"
TIMEOUT_S = 180  # each takes 5-20 s of CPU; generous for a loaded 2-core machine


def run_example(name: str, *args: str, expect: int = 0) -> tuple[str, dict[str, list[str]]]:
    """Run ``examples/<name>``; its output and the rows of its tables by their first cell."""
    done = subprocess.run(
        [sys.executable, str(EXAMPLES / name), "--runs", "3", *args],
        capture_output=True,
        text=True,
        timeout=TIMEOUT_S,
        check=False,
    )
    assert done.returncode == expect, done.stdout + done.stderr
    assert "Traceback" not in done.stderr, done.stderr
    return done.stdout, table_rows(done.stdout)


def table_rows(text: str) -> dict[str, list[str]]:
    """Rows of every table printed by ``_common.table`` (below a rule of dashes), by label."""
    rows: dict[str, list[str]] = {}
    in_table = False
    for line in text.splitlines():
        if re.fullmatch(r"-+(  -+)*", line):
            in_table = True
        elif not line.strip() or line.startswith(("OK:", "FAIL:")):
            in_table = False
        elif in_table:
            label, *cells = re.split(r"\s{2,}", line)
            rows[label] = cells
    return rows


def fired(cell: str) -> dict[str, int]:
    """``rule=n, rule=n`` from the pass table's ``rules fired`` column."""
    return {rule: int(n) for rule, n in (item.split("=") for item in cell.split(", "))}


def ratio(cell: str) -> float:
    assert cell.endswith("x"), cell
    return float(cell[:-1])


@pytest.mark.parametrize(
    ("exporter", "min_cosine", "expect"),
    [("torchscript", "0.99", 0), ("dynamo", "0.99999", 1)],  # int4 cannot meet 0.99999
)
def test_whisper_encoder_fuse_int4(
    exporter: str, min_cosine: str, expect: int, tmp_path: Path
) -> None:
    out, rows = run_example(
        "whisper_encoder_fuse_int4.py",
        *("--exporter", exporter, "--min-cosine", min_cosine, "--out", str(tmp_path)),
        expect=expect,
    )
    assert f"{'OK' if expect == 0 else 'FAIL'}: cosine" in out
    for name in ("fuse-attention", "fuse-skip-layer-norm", "fuse-gelu", "quant-int4"):
        assert rows[name][0] == "ok", (name, rows[name])
    assert fired(rows["fuse-attention"][2])["attention"] == 4
    assert fired(rows["quant-int4"][2])["matmul"] == 24  # 6 Linear layers in each of 4 blocks
    assert rows["MultiHeadAttention"][:2] == ["0", "4"]
    assert rows["MatMulNBits"][:2] == ["0", "24"]
    assert int(rows["SkipLayerNormalization"][1]) >= 8  # two residual norms per block
    nodes_before, nodes_after = (int(c) for c in rows["nodes"][:2])
    assert nodes_after < nodes_before / 2
    assert ratio(rows["size MB"][2]) < 0.5
    assert float(rows["latency ms"][0]) > 0 and float(rows["latency ms"][1]) > 0
    assert 0.99 <= float(rows["cosine"][1]) < 0.99999  # int4 moves the outputs, within budget
    assert 0 < float(rows["max |error|"][1]) < 2.0
    assert (tmp_path / "encoder.fuse-int4.onnx").is_file()  # --out is honoured


def test_kws_gru_stream() -> None:
    out, rows = run_example("kws_gru_stream.py", "--frames", "600")
    assert "OK: streamed == offline" in out
    assert rows["stream"][0] == "ok"
    assert fired(rows["stream"][2]) == {"conv-cache": 4, "gru-state": 1}
    assert rows["states"][:2] == ["0", "5"]
    assert rows["logits shape"][0] == rows["logits shape"][1] == "[1, 300, 12]"
    assert float(rows["max |diff|"][1]) < 1e-4
    assert int(rows["nodes"][1]) < int(rows["nodes"][0])
    # A step over 16 new frames costs far less than rerunning over all 600 frames.
    assert ratio(rows["ms last chunk"][2]) < 0.5


def test_kws_refused_chunk_exits_with_onnxopts_code() -> None:
    out, rows = run_example("kws_gru_stream.py", "--chunk", "15", expect=2)  # stride is 2
    assert rows["stream"][0] == "error"
    assert out.splitlines()[-1].startswith("FAIL: stream error: UsageError: chunk 15")
    assert "max |diff|" not in rows  # nothing measured on a model that was not made


def test_conformer_older_runtime() -> None:
    out, rows = run_example("conformer_older_runtime.py")
    assert "OK: runs on onnx-17" in out
    assert "$ onnxopt run conformer23.onnx -o conformer.lowered.onnx" in out
    replaced = re.search(r"lower replaced: (.*)", out).group(1).split(", ")
    assert {"Attention=2", "RMSNormalization=4", "Gelu=2", "opset=1"} <= set(replaced)
    assert rows["opset"] == ["23", "17"]
    assert rows["onnxopt check"] == ["4 unsupported", "0 unsupported"]
    assert float(rows["max |diff| (237 frames)"][1]) < 1e-4
