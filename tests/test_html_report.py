"""The HTML report: structure, escaping, plots true to the numbers, a real page in Chromium."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from conftest import FLOAT, WHISPER, WHISPER_GOLDEN, make_model
from onnx import helper

from onnxopt import html_report
from onnxopt.cli.main import cli
from onnxopt.html_report import OPS_COLORS, PRECISION_COLORS, STATUS_COLORS, checks, render
from onnxopt.latency import LatencySettings
from onnxopt.pipeline import Pipeline
from onnxopt.report import PassReport, Report, human_bytes
from onnxopt.stats import op_histogram

SECTIONS = ("summary", "timeline", "charts", "layers", "ops", "passes", "details")


def metrics(cosine: float, max_abs: float = 1e-3, passed: bool = True, reason: str = "") -> dict:
    return {
        "max_abs": max_abs,
        "rel_l2": 0.01,
        "cosine": cosine,
        "snr_db": 30.0,
        "passed": passed,
        "reason": reason,
    }


LAYERS = [
    {
        "name": "w0",
        "nodes": ["/blocks.0/q/MatMul"],
        "precision": "int4",
        "shape": [64, 64],
        "bytes_before": 16384,
        "bytes_after": 2560,
        "rel_error": 0.06,
    },
    {
        "name": "w1",
        "nodes": ["/blocks.0/mlp/MatMul"],
        "precision": "int8",
        "shape": [64, 256],
        "bytes_before": 65536,
        "bytes_after": 16640,
        "rel_error": 0.004,
    },
    {
        "name": "w2",
        "precision": "fp16",
        "shape": [256],
        "bytes_before": 1024,
        "bytes_after": 512,
        "rel_error": 0.0003,
    },
]


def sample_report(**changes: object) -> Report:
    """One pass of each status, a weight pass with layers, a failure with its reproducer."""
    passes = [
        PassReport(
            "fuse-gelu",
            "fuse-gelu",
            "exact",
            status="ok",
            seconds=0.2,
            verify_seconds=0.1,
            nodes_before=20,
            nodes_after=14,
            bytes_before=82944,
            bytes_after=82944,
            counts={"gelu-erf": 2, "bias-gelu": 1},
            tolerance="atol=0.0001, rtol=0.001",
            metrics=metrics(1.0, max_abs=1.2e-6),
            latency_ms=1.5,
        ),
        PassReport(
            "fuse-bias",
            "fuse-bias",
            "exact",
            status="unchanged",
            seconds=0.05,
            nodes_before=14,
            nodes_after=14,
            bytes_before=82944,
            bytes_after=82944,
            misses=["gemm: not fused at node 'add': the MatMul input has rank 3, Gemm needs 2"],
        ),
        PassReport(
            "quant-mixed",
            "quant-mixed(block=32)",
            "approximate",
            status="ok",
            seconds=0.4,
            verify_seconds=0.2,
            nodes_before=14,
            nodes_after=14,
            bytes_before=82944,
            bytes_after=19712,
            counts={"matmul": 3},
            notes=["3 weights quantized"],
            layers=[dict(layer) for layer in LAYERS],
            tolerance="min_cosine=0.99",
            metrics=metrics(0.99931),
            latency_ms=1.2,
        ),
        PassReport(
            "scale-weight",
            "scale-weight",
            "exact",
            status="failed",
            seconds=0.1,
            verify_seconds=0.3,
            nodes_before=14,
            nodes_after=14,
            bytes_before=19712,
            bytes_after=19712,
            tolerance="atol=0.0001, rtol=0.001",
            metrics=metrics(0.9, max_abs=2.5, passed=False, reason="12 of 40 values outside atol"),
            reason="case 0: 'y' 12 of 40 values outside atol=0.0001, rtol=0.001",
            first_diverging={"name": "/blocks.0/q/MatMul_output_0", "reason": "max abs 2.5"},
            reproducer={
                "model": "/tmp/out.before-scale-weight.onnx",
                "spec": "scale-weight",
                "command": "onnxopt run /tmp/out.before-scale-weight.onnx -o x.onnx "
                "--passes scale-weight --golden /tmp/g",
            },
        ),
        PassReport("cleanup", "cleanup", "exact"),
    ]
    report = Report(
        pipeline="fuse-gelu,fuse-bias,quant-mixed(block=32),scale-weight,cleanup",
        input="model.onnx",
        golden={"cases": 2, "source": "random", "dims": [{"batch": 1}, {"batch": 2}]},
        passes=passes,
        ops_before={"MatMul": 3, "Erf": 2, "Add": 9, "Mul": 6},
        ops_after={"com.microsoft::MatMulNBits": 3, "com.microsoft::BiasGelu": 2, "Add": 5},
        latency_ms_before=2.0,
        latency_settings={"runs": 3, "threads": 1, "warmup": 1},
    )
    for key, value in changes.items():
        setattr(report, key, value)
    return report


def section(page: str, name: str) -> str:
    match = re.search(rf'<(section|header) id="{name}">(.*?)</\1>', page, re.S)
    assert match, name
    return match.group(2)


def svgs(fragment: str) -> list[ET.Element]:
    """Each inline SVG parsed as XML (which also proves its text is escaped)."""
    return [ET.fromstring(s) for s in re.findall(r"<svg.*?</svg>", fragment, re.S)]


def title(element: ET.Element) -> str:
    found = element.find("title")
    return found.text or "" if found is not None else ""


def test_every_section_is_there_and_nothing_is_fetched() -> None:
    page = render(sample_report())
    assert page.startswith("<!DOCTYPE html>") and page.rstrip().endswith("</html>")
    for name in SECTIONS:
        section(page, name)
    assert "http://" not in page and "https://" not in page
    for fetching in ("<script", "<link", "<img", "<iframe", " src=", "url(", "@import"):
        assert fetching not in page, fetching


def test_names_with_markup_are_escaped() -> None:
    evil = "<b>&amp;</b>"
    report = sample_report(input="in<put>&.onnx", ops_before={"com.x::<Op>": 1}, ops_after={})
    report.passes[0].spec = f"fuse-gelu(tag={evil})"
    report.passes[0].notes = ["<script>alert(1)</script>"]
    report.passes[1].misses = ["a & b < c"]
    report.passes[2].layers[0]["nodes"] = ["layer<&>'\""]
    report.passes[3].reproducer["command"] += " --plugin 'a<b>.py'"
    page = render(report)
    assert "<script>" not in page and "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    assert evil not in page and "&lt;b&gt;&amp;amp;&lt;/b&gt;" in page
    assert "in&lt;put&gt;&amp;.onnx" in page and "a &amp; b &lt; c" in page
    assert "--plugin &#x27;a&lt;b&gt;.py&#x27;" in page
    # Every SVG is well-formed XML, so no raw '<' or '&' got into a label or <title>.
    titles = [title(el) for svg in svgs(page) for el in svg.iter() if el.find("title") is not None]
    assert any("layer<&>'\"" in t for t in titles)
    assert any("com.x::<Op>" in t for t in titles)


def test_timeline_has_one_bar_per_pass_sized_by_time_and_colored_by_status() -> None:
    report = sample_report()
    (svg,) = svgs(section(render(report), "timeline"))
    groups = [g for g in svg.iter("g") if g.find("title") is not None]
    assert len(groups) == len(report.passes)
    widths = {}
    for i, (group, entry) in enumerate(zip(groups, report.passes, strict=True), 1):
        assert title(group).startswith(f"#{i} {entry.spec}: {entry.status}")
        rects = group.findall("rect")
        assert rects[0].get("fill") == STATUS_COLORS[entry.status]
        assert len(rects) == (2 if entry.verify_seconds else 1)
        if entry.verify_seconds:
            assert rects[1].get("fill-opacity") == "0.45"
            check_width = float(rects[1].get("width"))
            assert check_width / float(rects[0].get("width")) == pytest.approx(
                entry.verify_seconds / entry.seconds, rel=0.02
            )
        widths[entry.name] = float(rects[0].get("width"))
        if i > 1:  # bars follow each other along the time axis
            previous = groups[i - 2].findall("rect")[-1]
            end = float(previous.get("x")) + float(previous.get("width"))
            assert float(rects[0].get("x")) == pytest.approx(end, abs=0.2)
    assert widths["quant-mixed"] / widths["fuse-gelu"] == pytest.approx(0.4 / 0.2, rel=0.02)


def test_per_layer_bars_follow_the_error_with_precision_colors() -> None:
    report = sample_report()
    (svg,) = svgs(section(render(report), "layers"))
    bars = [r for r in svg.iter("rect") if r.find("title") is not None]
    assert len(bars) == len(LAYERS)
    for bar, layer in zip(bars, LAYERS, strict=True):
        assert bar.get("fill") == PRECISION_COLORS[layer["precision"]]
        label = layer.get("nodes", [layer["name"]])[0]
        assert title(bar).startswith(f"{label} (weight {layer['name']}): {layer['precision']}")
        assert f"rel error {layer['rel_error']:.4g}" in title(bar)
    heights = np.array([float(b.get("height")) for b in bars])
    errors = np.array([layer["rel_error"] for layer in LAYERS])
    np.testing.assert_allclose(heights / heights[0], errors / errors[0], rtol=0.02, atol=0.01)
    # The mean is drawn as the dashed line, and the worst layer heads the table.
    page = section(render(report), "layers")
    assert f"mean {errors.mean():.4g}" in page
    worst = re.findall(r"<tr><td><code>(.*?)</code>", page)
    assert worst[0] == "/blocks.0/q/MatMul" and len(worst) == 3


def test_op_histogram_pairs_before_and_after_to_scale() -> None:
    report = sample_report()
    (svg,) = svgs(section(render(report), "ops"))
    bars = [r for r in svg.iter("rect")]
    ops = set(report.ops_before) | set(report.ops_after)
    assert len(bars) == 2 * len(ops)
    seen = {}
    for bar in bars:
        op, count, when = re.fullmatch(r"(.*): (\d+) (before|after)", title(bar)).groups()
        expected = (report.ops_before if when == "before" else report.ops_after).get(op, 0)
        assert int(count) == expected
        assert bar.get("fill") == OPS_COLORS[when == "after"]
        seen[op, when] = float(bar.get("width"))
    assert seen["Add", "after"] / seen["Add", "before"] == pytest.approx(5 / 9, rel=0.01)
    assert seen["MatMul", "after"] == 0
    # The busiest op type comes first.
    assert title(bars[0]).startswith("Add: 9 before")


def test_charts_plot_weights_nodes_and_latency_per_pass() -> None:
    report = sample_report()
    bar_svgs = svgs(section(render(report), "charts"))
    weights, nodes, latency = bar_svgs
    sizes = [float(r.get("height")) for r in weights.iter("rect")]
    expected = [82944, 82944, 82944, 19712, 19712]  # input, then each pass that ran
    np.testing.assert_allclose(np.array(sizes) / sizes[0], np.array(expected) / 82944, rtol=0.02)
    assert len(list(nodes.iter("rect"))) == 5
    points = list(latency.iter("circle"))
    assert [title(p).split(": ")[-1] for p in points] == ["2 ms", "1.5 ms", "1.2 ms"]
    assert len(list(latency.iter("polyline"))) == 1

    unmeasured = render(sample_report(latency_settings=None, latency_ms_before=None))
    assert "not measured: run with <code>--latency N</code>" in section(unmeasured, "charts")
    assert len(svgs(section(unmeasured, "charts"))) == 2


def test_summary_states_verdict_and_ratios() -> None:
    page = render(sample_report(output="out.onnx"))
    head = section(page, "summary")
    assert "failed (exit 3)" in head and STATUS_COLORS["failed"] in head
    assert f"{human_bytes(82944)} → {human_bytes(19712)}" in head
    assert f"<b>{19712 / 82944:.2f}\u00d7</b>" in head  # weights ratio
    assert "20 → 14" in head and f"<b>{14 / 20:.2f}\u00d7</b>" in head
    assert "2 ms → 1.2 ms" in head and "<b>0.60\u00d7</b> (\u221240%)" in head
    assert "2 ok · 1 unchanged · 1 failed · 1 skipped" in head
    assert "median of 3 runs after 1 warm-up" in head
    kept = section(render(sample_report(keep_going=True)), "summary")
    assert "kept going: 1 pass rolled back" in kept
    report = sample_report()
    report.passes = report.passes[:3]
    assert "passed" in section(render(report), "summary")


def test_checks_compare_the_metric_with_its_budget() -> None:
    report = sample_report()
    assert checks(report.passes[2]) == [("cosine 0.99931 ≥ 0.99", True, "cosine 0.99931 ≥ 0.99")]
    gelu = checks(report.passes[0])
    assert gelu[0].text == "max |Δ| 1.2e-06 ≤ atol 0.0001 + rtol 0.001·|golden|" and gelu[0].held
    failed = checks(report.passes[3])
    assert failed[0].text.startswith("max |Δ| 2.5 > atol") and not failed[0].held
    low = PassReport("q", "q", "approximate", tolerance="min_cosine=0.99, min_snr_db=20")
    low.metrics = metrics(0.95, passed=False, reason="cosine 0.95 < 0.99")
    assert [(c.text, c.held) for c in checks(low)] == [
        ("cosine 0.95000 < 0.99", False),
        ("SNR 30.0 dB ≥ 20 dB", True),
    ]
    # A failure no criterion explains (a shape mismatch) shows its reason.
    shape = PassReport("f", "f", "exact", tolerance="atol=0.0001")
    shape.metrics = metrics(1.0, max_abs=0.0, passed=False, reason="'y' shape (2,) != (3,)")
    assert checks(shape)[-1] == ("'y' shape (2,) != (3,)", False, "'y' shape (2,) != (3,)")


def test_failed_pass_shows_its_reason_and_reproducer() -> None:
    details = section(render(sample_report()), "details")
    card = details[details.index("4. <code>scale-weight</code>") :]
    assert STATUS_COLORS["failed"] in card[:400]
    assert "<b>Rolled back</b>: case 0: &#x27;y&#x27; 12 of 40 values outside atol" in card
    assert "/blocks.0/q/MatMul_output_0" in card
    assert "<pre>onnxopt run /tmp/out.before-scale-weight.onnx -o x.onnx" in card
    # Rules fired with counts, near misses and notes have their own places.
    assert '<span class="chip">gelu-erf <b>\u00d72</b></span>' in details
    assert "Near misses" in details and "Gemm needs 2" in details
    assert "3 weights quantized" in details
    assert "Nothing to report (unchanged or not run): <code>5. cleanup</code>" in details


def test_report_suffix_picks_html_or_json(tmp_path: Path) -> None:
    report = sample_report()
    report.write(tmp_path / "r.json")
    data = json.loads((tmp_path / "r.json").read_text())
    assert data["ops_after"] == report.ops_after and data["latency_ms_before"] == 2.0
    assert data["passes"][0]["latency_ms"] == 1.5
    for name in ("r.html", "R.HTM"):
        report.write(tmp_path / name)
        assert (tmp_path / name).read_text(encoding="utf-8") == render(report)
    report.write(tmp_path / "r.txt")
    assert json.loads((tmp_path / "r.txt").read_text())["pipeline"] == report.pipeline


def tiny_model():
    nodes = [
        helper.make_node("Identity", ["x"], ["a"]),
        helper.make_node("Relu", ["a"], ["b"]),
        helper.make_node("Add", ["b", "one"], ["y"]),
    ]
    one = np.ones((2, 3), np.float32)
    return make_model(nodes, {"x": (FLOAT, [2, 3])}, {"y": (FLOAT, [2, 3])}, {"one": one})


def test_pipeline_records_ops_and_latency() -> None:
    model = tiny_model()
    settings = LatencySettings(runs=2)
    result, report = Pipeline("cleanup,fold-batchnorm", latency=settings).run(model)
    assert report.ops_before == dict(op_histogram(model)) == {"Identity": 1, "Relu": 1, "Add": 1}
    assert report.ops_after == dict(op_histogram(result)) == {"Relu": 1, "Add": 1}
    assert report.latency_settings == {"runs": 2, "threads": 1, "warmup": 1}
    cleanup, batchnorm = report.passes
    assert cleanup.status == "ok" and batchnorm.status == "unchanged"
    assert report.latency_ms_before > 0 and cleanup.latency_ms > 0
    assert batchnorm.latency_ms is None and report.latency_ms_after == cleanup.latency_ms

    _, plain = Pipeline("cleanup").run(tiny_model())
    assert plain.latency_ms_before is None and plain.latency_settings is None
    assert plain.passes[0].latency_ms is None and plain.ops_after == {"Relu": 1, "Add": 1}


# --- a real page in a real browser ---------------------------------------------------------

CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


def chromium() -> str:
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    if found is None:
        message = "Debian's chromium is needed to render the HTML report"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    return found


def pixels_of(image: np.ndarray, color: str) -> tuple[int, tuple[int, int, int, int]]:
    """How many pixels have exactly ``color`` (±2 per channel), and their box (x0, y0, x1, y1)."""
    rgb = np.array([int(color[i : i + 2], 16) for i in (1, 3, 5)])
    ys, xs = np.nonzero(np.abs(image.astype(int) - rgb).max(axis=-1) <= 2)
    if not len(xs):
        return 0, (0, 0, 0, 0)
    return len(xs), (int(xs.min()), int(ys.min()), int(xs.max()), int(ys.max()))


def test_real_report_renders_in_chromium(tmp_path: Path) -> None:
    from PIL import Image

    browser = chromium()
    page, out = tmp_path / "report.html", tmp_path / "out.onnx"
    args = ["run", WHISPER, "-o", out, "--golden", WHISPER_GOLDEN, "--passes", "fuse,quant-int4"]
    args += ["--latency", "3", "--report", page, "--json"]
    result = CliRunner().invoke(cli, [str(a) for a in args])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)  # the same run as JSON: the figures the page must show
    first, last = report["passes"][0], report["passes"][-1]
    assert last["name"] == "quant-int4" and last["status"] == "ok" and last["layers"]
    html = page.read_text(encoding="utf-8")
    assert "http://" not in html and "https://" not in html

    shot = tmp_path / "shot.png"
    done = subprocess.run(
        [
            browser,
            *CHROMIUM_FLAGS,
            f"--user-data-dir={tmp_path / 'profile'}",
            f"--screenshot={shot}",
            "--window-size=1280,2400",
            "--dump-dom",
            page.as_uri(),
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0 and shot.is_file(), done.stderr[-2000:]
    dom = done.stdout

    # The DOM holds every pass, the figures of the run and the per-layer names.
    assert f"✓ cosine {last['metrics']['cosine']:.5f} ≥ 0.99" in dom
    for entry in report["passes"]:
        assert f"<code>{entry['spec']}</code>" in dom
    assert f"{first['nodes_before']} → {last['nodes_after']}" in dom
    assert f"{human_bytes(first['bytes_before'])} → {human_bytes(last['bytes_after'])}" in dom
    latency = (
        f"{html_report.ms(report['latency_ms_before'])} → {html_report.ms(last['latency_ms'])}"
    )
    assert latency in dom
    for layer in last["layers"]:
        where = (layer.get("nodes") or [layer["name"]])[0]
        assert f"{where} (weight {layer['name']}): {layer['precision']}, shape" in dom
    assert len(re.findall(r"\(weight [^)]*\): \w+, shape ", dom)) == len(last["layers"])

    image = np.asarray(Image.open(shot).convert("RGB"))
    assert image.shape == (2400, 1280, 3)
    non_white = (image < 245).any(axis=-1).mean()
    assert 0.03 < non_white < 0.6, non_white
    total = image.shape[0] * image.shape[1]
    for color, low in (
        (STATUS_COLORS["ok"], 1500),  # timeline bars and badges
        (STATUS_COLORS["unchanged"], 500),
        (PRECISION_COLORS["int4"], 20000),  # 12 per-layer bars
        (html_report.WEIGHTS_COLOR, 3000),
        (html_report.NODES_COLOR, 1500),
        (html_report.LATENCY_COLOR, 100),
    ):
        count, (x0, y0, x1, y1) = pixels_of(image, color)
        assert low <= count <= 0.1 * total, (color, count)
        assert x0 > 20 and x1 < 1260 and y1 < 2390, (color, (x0, y0, x1, y1))
    # The three charts sit side by side, the layer plot below them.
    _, weights_box = pixels_of(image, html_report.WEIGHTS_COLOR)
    _, latency_box = pixels_of(image, html_report.LATENCY_COLOR)
    _, layers_box = pixels_of(image, PRECISION_COLORS["int4"])
    # Side by side: the latency line (its height follows the data) overlaps the bars' rows.
    assert weights_box[2] < latency_box[0]
    assert latency_box[1] < weights_box[3] and latency_box[3] > weights_box[1]
    assert layers_box[1] > weights_box[3] and layers_box[2] - layers_box[0] > 800


def test_edge_cases_render() -> None:
    empty = render(Report(pipeline=""))
    for name in SECTIONS:
        section(empty, name)
    assert "No nodes." in section(empty, "ops") and "passed" in section(empty, "summary")

    crashed = PassReport("stream", "stream", "interface", status="error", seconds=0.01)
    crashed.reason, crashed.error_code = "UnsupportedModelError: a bidirectional <RNN>", 4
    page = render(Report(pipeline="stream", passes=[crashed], ops_before={"RNN": 1}))
    assert "failed (exit 4)" in section(page, "summary")
    assert "<b>Rolled back</b>: UnsupportedModelError: a bidirectional &lt;RNN&gt;" in page
    assert STATUS_COLORS["error"] in section(page, "timeline")

    layers = [
        {"name": f"w{i}", "precision": "int4" if i % 3 else "int8", "rel_error": 0.01 + i * 1e-4}
        for i in range(400)
    ]
    layers[7]["rel_error"] = float("nan")
    layers[8]["rel_error"] = None
    big = PassReport("q", "q", "approximate", status="ok", layers=layers)
    (svg,) = svgs(section(render(Report(pipeline="q", passes=[big])), "layers"))
    bars = [r for r in svg.iter("rect") if r.find("title") is not None]
    assert len(bars) == 398  # no bar for an unknown error
    assert {b.get("fill") for b in bars} == {PRECISION_COLORS["int4"], PRECISION_COLORS["int8"]}
    assert all(float(b.get("width")) >= 1 and float(b.get("height")) > 0 for b in bars)
    labels = [t for t in svg.iter("text") if t.get("class") == "tick" and t.get("y") == "200.0"]
    assert 10 <= len(labels) <= 31 and labels[-1].text == "400"
    # The table of largest errors leaves out the unknown ones.
    page = section(render(Report(pipeline="q", passes=[big])), "layers")
    worst = re.findall(r"<tr><td><code>(.*?)</code>", page)
    assert worst == ["w399", "w398", "w397", "w396", "w395"]


def test_latency_without_golden_and_on_a_model_ort_cannot_run() -> None:
    settings = LatencySettings(runs=1, warmup=0)
    _, report = Pipeline("cleanup", verify=False, latency=settings).run(tiny_model())
    assert report.golden == {} and report.latency_ms_before > 0  # on synthesized inputs
    assert report.passes[0].latency_ms > 0

    node = helper.make_node("Mystery", ["x"], ["y"], domain="my.custom")
    mystery = make_model([node], {"x": (FLOAT, [2])}, {"y": (FLOAT, [2])})
    mystery.opset_imports["my.custom"] = 1
    value, why = Pipeline("cleanup", latency=settings)._latency(mystery, None)
    assert value is None and "Mystery" in why


def test_latency_after_an_interface_pass_is_not_a_ratio() -> None:
    from onnxopt.cli.render import latency_line

    report = sample_report()
    assert report.latency_comparable
    assert latency_line(report) == (
        "latency: 2.00 ms -> 1.20 ms (0.60x), median of 3 runs, 1 thread"
    )
    report.passes[0].kind = "interface"  # an ok pass that changed what one call computes
    assert not report.latency_comparable
    assert latency_line(report).startswith("latency: 2.00 ms -> 1.20 ms per call of the new")
    head = section(render(report), "summary")
    assert "after: one call of the new interface" in head and "0.60\u00d7" not in head
