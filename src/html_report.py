"""The run report as one self-contained HTML page: inline CSS and SVG, no scripts, no network.

Sections, top to bottom: a summary (verdict, input and output, size, node and latency ratios),
the pipeline as a timeline, charts of weights, nodes and latency per pass, per-layer weight error
of weight passes, the op histogram before and after, a table of passes, and one card per pass
that has something to say (rules fired, near misses, notes, the rollback and its reproducer).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable
from typing import Any, NamedTuple

import onnxopt
from onnxopt.report import PassReport, Report, human_bytes
from onnxopt.svg_plots import Bar, Span, bar_chart, e, line_chart, paired_bars, timeline

STATUS_COLORS = {
    "ok": "#2f9e44",
    "unchanged": "#adb5bd",
    "failed": "#e03131",
    "error": "#f76707",
    "skipped": "#fcc419",
}
PRECISION_COLORS = {"int4": "#7048e8", "int8": "#1c7ed6", "fp16": "#0ca678", "bf16": "#66a80f"}
OTHER_COLORS = ("#e64980", "#f59f00", "#495057", "#3bc9db")
WEIGHTS_COLOR, NODES_COLOR, LATENCY_COLOR = "#4c6ef5", "#15aabf", "#d6336c"
OPS_COLORS = ("#a5d8ff", "#1971c2")
SMALL = {"width": 360, "height": 210}  # the three charts side by side
TIMES, MINUS, DASH = "\u00d7", "\u2212", "\u2013"  # typographic x, minus sign, en dash

CSS = """
:root { color-scheme: light; --ink: #212529; --muted: #6c757d; --line: #dee2e6; --bg: #f8f9fa; }
* { box-sizing: border-box; }
body { margin: 0; background: #fff; color: var(--ink); line-height: 1.45;
  font: 14px/1.45 system-ui, -apple-system, "Segoe UI", Roboto, "Helvetica Neue", Arial,
  sans-serif; }
main { max-width: 1180px; margin: 0 auto; padding: 28px 32px 48px; }
h1 { font-size: 24px; margin: 0; }
h2 { font-size: 17px; margin: 34px 0 10px; padding-bottom: 6px; border-bottom: 1px solid
  var(--line); }
h3 { font-size: 15px; margin: 0 0 8px; }
code, pre { font-family: ui-monospace, "SFMono-Regular", Menlo, Consolas, monospace;
  font-size: 12.5px; }
code { background: var(--bg); padding: 1px 5px; border-radius: 4px; overflow-wrap: anywhere; }
pre { background: #f1f3f5; padding: 10px 12px; border-radius: 6px; white-space: pre-wrap;
  overflow-wrap: anywhere; margin: 6px 0; }
.muted { color: var(--muted); }
.title { display: flex; align-items: center; gap: 14px; }
.verdict { font-weight: 700; color: #fff; padding: 3px 12px; border-radius: 14px;
  font-size: 14px; }
.io { margin: 10px 0 2px; }
.kpis { display: grid; grid-template-columns: repeat(5, 1fr); gap: 12px; margin: 18px 0 8px; }
.kpi { border: 1px solid var(--line); border-radius: 8px; padding: 10px 14px; background: #fff; }
.kpi .k { color: var(--muted); font-size: 12px; text-transform: uppercase;
  letter-spacing: .04em; }
.kpi .v { font-size: 16px; white-space: nowrap; font-weight: 600; margin-top: 2px; }
.kpi .r { font-size: 13px; color: var(--muted); }
.kpi .r b { color: var(--ink); }
.legend { display: flex; flex-wrap: wrap; gap: 14px; font-size: 12.5px; color: var(--muted);
  margin: 4px 0 6px; }
.legend span::before { content: ""; display: inline-block; width: 11px; height: 11px;
  border-radius: 2px; margin-right: 5px; vertical-align: -1px; background: var(--c); }
.legend .light::before { opacity: .45; }
.charts { display: grid; grid-template-columns: repeat(3, 1fr); gap: 18px; }
.chart-box { border: 1px solid var(--line); border-radius: 8px; padding: 10px 12px 4px; }
#layers .chart-box { margin-bottom: 16px; }
.chart-box h3 { font-size: 13.5px; display: flex; justify-content: space-between; }
.chart-box h3 .range { font-weight: 400; color: var(--muted); }
.empty { color: var(--muted); padding: 70px 8px; text-align: center; }
svg.chart { display: block; font-size: 11px; }
svg .tick { fill: #868e96; font-size: 10.5px; }
svg .note { fill: #495057; font-size: 10.5px; }
svg .label { fill: var(--ink); font-size: 12px; }
table { border-collapse: collapse; width: 100%; font-size: 13px; }
th, td { text-align: left; padding: 6px 8px; border-bottom: 1px solid var(--line);
  vertical-align: top; }
td code, td.check span { white-space: nowrap; }
th { color: var(--muted); font-weight: 600; font-size: 12px; background: var(--bg); }
td.num, th.num { text-align: right; font-variant-numeric: tabular-nums; white-space: nowrap; }
.badge { display: inline-block; color: #fff; font-size: 11.5px; font-weight: 600;
  padding: 1px 8px; border-radius: 10px; }
.badge.unchanged, .badge.skipped { color: #343a40; }
.pass-ok { color: #2b8a3e; } .pass-bad { color: #c92a2a; font-weight: 600; }
.cards { display: grid; grid-template-columns: repeat(2, 1fr); gap: 14px; }
.card { border: 1px solid var(--line); border-left: 5px solid var(--c); border-radius: 8px;
  padding: 12px 16px; min-width: 0; }
.card.wide { grid-column: 1 / -1; }
.card dl { display: grid; grid-template-columns: max-content 1fr; gap: 3px 14px; margin: 6px 0; }
.card dt { color: var(--muted); }
.card dd { margin: 0; }
.chips { display: flex; flex-wrap: wrap; gap: 6px; margin: 4px 0; }
.chip { background: #e7f5ff; color: #1864ab; border-radius: 12px; padding: 1px 9px;
  font-size: 12.5px; }
.chip b { font-weight: 700; }
.card ul { margin: 4px 0; padding-left: 20px; }
.failure { background: #fff5f5; border: 1px solid #ffc9c9; border-radius: 6px; padding: 8px 12px;
  margin-top: 8px; }
.failure b { color: #c92a2a; }
.sub { font-weight: 600; margin-top: 10px; font-size: 13px; }
footer { margin-top: 40px; color: var(--muted); font-size: 12px; }
"""


def render(report: Report) -> str:
    """The whole page as a string."""
    body = "\n".join(
        [
            _summary(report),
            _timeline(report),
            _charts(report),
            _layers(report),
            _ops(report),
            _pass_table(report),
            _details(report),
        ]
    )
    title = f"onnxopt report: {report.input or report.pipeline}"
    return (
        '<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
        '<meta name="viewport" content="width=device-width, initial-scale=1">\n'
        '<meta name="color-scheme" content="light">\n'
        f"<title>{e(title)}</title>\n<style>{CSS}</style>\n</head>\n<body>\n<main>\n{body}\n"
        f"<footer>onnxopt {e(onnxopt.__version__)}</footer>\n</main>\n</body>\n</html>\n"
    )


def verdict(report: Report) -> tuple[str, str]:
    """The outcome in a few words and its color."""
    if report.ok:
        return "passed", STATUS_COLORS["ok"]
    rolled = len(report.failed)
    if report.keep_going:
        return f"kept going: {rolled} pass{'es' * (rolled > 1)} rolled back", "#f08c00"
    return f"failed (exit {report.exit_code})", STATUS_COLORS["failed"]


def ratio(before: float | None, after: float | None) -> str:
    """``0.35x (-65%)`` in typographic signs; empty when either side is unknown or zero."""
    if not before or after is None:
        return ""
    change = (after / before - 1) * 100
    return f"<b>{after / before:.2f}{TIMES}</b> ({change:+.0f}%)".replace("-", MINUS)


def ms(value: float | None) -> str:
    if value is None:
        return DASH
    return f"{value:.3g} ms" if value < 10 else f"{value:.1f} ms"


def _run_passes(report: Report) -> list[PassReport]:
    return [p for p in report.passes if p.status != "skipped"]


def _summary(report: Report) -> str:
    word, color = verdict(report)
    run = _run_passes(report)
    bytes0 = run[0].bytes_before if run else 0
    bytes1 = run[-1].bytes_after if run else 0
    nodes0 = run[0].nodes_before if run else 0
    nodes1 = run[-1].nodes_after if run else 0
    lat0, lat1 = report.latency_ms_before, report.latency_ms_after
    counts = {s: sum(1 for p in report.passes if p.status == s) for s in STATUS_COLORS}
    counted = " · ".join(f"{n} {s}" for s, n in counts.items() if n)
    seconds = sum(p.seconds for p in report.passes)
    checking = sum(p.verify_seconds for p in report.passes)
    output = (
        f"<code>{e(report.output)}</code>"
        if report.output
        else '<span class="muted">no output written</span>'
    )
    kpis = [
        ("weights", f"{human_bytes(bytes0)} → {human_bytes(bytes1)}", ratio(bytes0, bytes1)),
        ("nodes", f"{nodes0} → {nodes1}", ratio(nodes0, nodes1)),
        (
            "latency",
            f"{ms(lat0)} → {ms(lat1)}" if lat0 is not None else "not measured",
            _latency_ratio(report),
        ),
        ("passes", f"{len(report.passes)}", e(counted)),
        (
            "time",
            f"{seconds + checking:.2f} s",
            f"passes {seconds:.2f} s, checks {checking:.2f} s",
        ),
    ]
    cards = "".join(
        f'<div class="kpi"><div class="k">{k}</div><div class="v">{e(v)}</div>'
        f'<div class="r">{r or "&nbsp;"}</div></div>'
        for k, v, r in kpis
    )
    return (
        '<header id="summary">\n<div class="title"><h1>onnxopt report</h1>'
        f'<span class="verdict" style="background:{color}">{e(word)}</span></div>\n'
        f'<p class="io"><code>{e(report.input or "(in-memory model)")}</code> → {output}</p>\n'
        f'<p class="muted">pipeline <code>{e(report.pipeline)}</code></p>\n'
        f'<div class="kpis">{cards}</div>\n<p class="muted">{e(_setup(report))}</p>\n</header>'
    )


def _latency_ratio(report: Report) -> str:
    if report.latency_ms_before is None:
        return "run with <code>--latency N</code>"
    if not report.latency_comparable:
        return "after: one call of the new interface"
    return ratio(report.latency_ms_before, report.latency_ms_after)


def _setup(report: Report) -> str:
    golden = report.golden
    if golden:
        dims = "; ".join(
            ", ".join(f"{k}={v}" for k, v in case.items()) for case in golden.get("dims") or []
        )
        parts = [
            f"Verified on {golden.get('cases')} golden case(s) ({golden.get('source')}"
            + (f"; {dims}" if dims else "")
            + ")"
        ]
    else:
        parts = ["Numerics not verified (structure only)"]
    settings = report.latency_settings
    if settings:
        threads = settings.get("threads") or "ORT's default"
        parts.append(
            f"latency: median of {settings.get('runs')} runs after {settings.get('warmup')} "
            f"warm-up, ORT CPU, {threads} thread(s)"
        )
    return "; ".join(parts) + "."


def _legend(items: Iterable[tuple[str, str]], light: Iterable[tuple[str, str]] = ()) -> str:
    spans = [f'<span style="--c:{c}">{e(label)}</span>' for label, c in items]
    spans += [f'<span class="light" style="--c:{c}">{e(label)}</span>' for label, c in light]
    return f'<div class="legend">{"".join(spans)}</div>'


def _timeline(report: Report) -> str:
    spans, start = [], 0.0
    for i, p in enumerate(report.passes, 1):
        note = "skipped" if p.status == "skipped" else f"{p.seconds + p.verify_seconds:.2f} s"
        title = f"#{i} {p.spec}: {p.status}, pass {p.seconds:.3f} s, check {p.verify_seconds:.3f} s"
        spans.append(
            Span(
                f"{i}. {p.spec}",
                start,
                p.seconds,
                p.verify_seconds,
                STATUS_COLORS[p.status],
                title,
                note,
            )
        )
        start += p.seconds + p.verify_seconds
    used = [(s, c) for s, c in STATUS_COLORS.items() if any(p.status == s for p in report.passes)]
    legend = _legend(used, [("check (lighter)", STATUS_COLORS["ok"])])
    return (
        '<section id="timeline">\n<h2>Pipeline timeline</h2>\n'
        + legend
        + timeline(spans, label="time per pass: the pass, then its check")
        + "\n</section>"
    )


def _charts(report: Report) -> str:
    labels = ["in"] + [str(i) for i in range(1, len(report.passes) + 1)]
    names = ["input model"] + [f"#{i} {p.spec}" for i, p in enumerate(report.passes, 1)]
    run = _run_passes(report)
    weights = [run[0].bytes_before if run else 0] + [
        None if p.status == "skipped" else p.bytes_after for p in report.passes
    ]
    nodes = [run[0].nodes_before if run else 0] + [
        None if p.status == "skipped" else p.nodes_after for p in report.passes
    ]
    unit, unit_name = byte_unit(max([w or 0 for w in weights]))
    size_bars = [
        dataclasses.replace(b, value=None if b.value is None else b.value / unit)
        for b in _series(labels, names, weights, WEIGHTS_COLOR, human_bytes)
    ]
    node_bars = _series(labels, names, nodes, NODES_COLOR, lambda v: f"{v:.0f} nodes")
    latency = [report.latency_ms_before] + [p.latency_ms for p in report.passes]
    boxes = [
        (
            "Weights",
            _span(weights, human_bytes),
            bar_chart(size_bars, fmt=lambda v: f"{v:g} {unit_name}", label="weights", **SMALL),
        ),
        (
            "Nodes",
            _span(nodes, str),
            bar_chart(node_bars, fmt=lambda v: f"{v:g}", label="nodes", **SMALL),
        ),
        ("Latency", _span(latency, ms), _latency_chart(report, labels, names)),
    ]
    html = "".join(
        f'<div class="chart-box"><h3>{t} <span class="range">{e(r)}</span></h3>{svg}</div>'
        for t, r, svg in boxes
    )
    return (
        '<section id="charts">\n<h2>Size and speed per pass</h2>\n'
        '<p class="muted">x axis: <b>in</b> is the input model, numbers are passes '
        "(see the timeline); hover a bar for its value.</p>\n"
        f'<div class="charts">{html}</div>\n</section>'
    )


def byte_unit(n: float) -> tuple[int, str]:
    """The power of 1024 that writes ``n`` with at most three digits before the point."""
    for power, name in ((3, "GB"), (2, "MB"), (1, "KB")):
        if n >= 1024**power:
            return 1024**power, name
    return 1, "B"


def _series(
    labels: list[str], names: list[str], values: list[Any], color: str, fmt: Any
) -> list[Bar]:
    """Bars (or points) with their value and pass name as hover text."""
    return [
        Bar(label, value, color, f"{name}: {fmt(value) if value is not None else 'not run'}")
        for label, name, value in zip(labels, names, values, strict=True)
    ]


def _span(values: list[Any], fmt: Any) -> str:
    """``first → last`` of the values that are known, for a chart's heading."""
    known = [v for v in values if v is not None]
    return f"{fmt(known[0])} → {fmt(known[-1])}" if known else ""


def _latency_chart(report: Report, labels: list[str], names: list[str]) -> str:
    if report.latency_settings is None:
        return '<div class="empty">not measured: run with <code>--latency N</code></div>'
    values = [report.latency_ms_before] + [p.latency_ms for p in report.passes]
    if all(v is None for v in values):
        return '<div class="empty">no model could be timed (see the pass notes)</div>'
    points = _series(labels, names, values, LATENCY_COLOR, ms)
    return line_chart(points, fmt=lambda v: f"{v:g} ms", label="median latency (ms)", **SMALL)


def precision_color(precision: str, seen: list[str]) -> str:
    """A fixed color per known precision; others take the next free one."""
    if precision in PRECISION_COLORS:
        return PRECISION_COLORS[precision]
    if precision not in seen:
        seen.append(precision)
    return OTHER_COLORS[seen.index(precision) % len(OTHER_COLORS)]


def _layers(report: Report) -> str:
    weight_passes = [(i, p) for i, p in enumerate(report.passes, 1) if p.layers]
    if not weight_passes:
        return (
            '<section id="layers">\n<h2>Per-layer weight error</h2>\n'
            '<p class="muted">No pass in this run changed weights layer by layer.</p>\n</section>'
        )
    blocks = [_layer_block(i, p) for i, p in weight_passes]
    return (
        '<section id="layers">\n<h2>Per-layer weight error</h2>\n'
        '<p class="muted">Relative L2 error of each weight a pass rewrote, in graph order; '
        "hover a bar for the layer.</p>\n" + "\n".join(blocks) + "\n</section>"
    )


def _layer_name(layer: dict[str, Any]) -> str:
    nodes = layer.get("nodes") or []
    return str(nodes[0]) if nodes else str(layer.get("name", "?"))


def _layer_block(index: int, p: PassReport) -> str:
    seen: list[str] = []
    bars = []
    for n, layer in enumerate(p.layers):
        precision = str(layer.get("precision", "?"))
        error = _float(layer.get("rel_error"))
        shape = TIMES.join(str(d) for d in layer.get("shape") or [])
        title = (
            f"{_layer_name(layer)} (weight {layer.get('name')}): {precision}, shape {shape}, "
            f"{human_bytes(layer.get('bytes_before', 0))} → "
            f"{human_bytes(layer.get('bytes_after', 0))}, rel error {error:.4g}"
        )
        bars.append(Bar(str(n + 1), error, precision_color(precision, seen), title))
    precisions: dict[str, int] = {}
    for layer in p.layers:
        precisions[str(layer.get("precision", "?"))] = (
            precisions.get(str(layer.get("precision", "?")), 0) + 1
        )
    legend = _legend((f"{k} ({n})", precision_color(k, seen)) for k, n in precisions.items())
    errors = [b.value for b in bars if b.value is not None and math.isfinite(b.value)]
    mean = sum(errors) / len(errors) if errors else None
    chart = bar_chart(
        bars,
        fmt=lambda v: f"{v:.3g}",
        label=f"relative error per layer, {p.spec}",
        width=1100,
        height=210,
        baseline=mean,
    )
    return (
        f'<div class="chart-box"><h3>#{index} {e(p.spec)}: {len(p.layers)} weights '
        f"{_badge(p.status)}</h3>"
        f"{legend}{chart}"
        + (f'<p class="muted">dashed line: mean {mean:.4g}</p>' if mean is not None else "")
        + _worst_layers(p.layers)
        + "</div>"
    )


def _worst_layers(layers: list[dict[str, Any]], n: int = 5) -> str:
    known = [layer for layer in layers if math.isfinite(_float(layer.get("rel_error")))]
    ranked = sorted(known, key=lambda layer: -_float(layer.get("rel_error")))[:n]
    rows = "".join(
        f"<tr><td><code>{e(_layer_name(layer))}</code></td><td>{e(layer.get('precision'))}</td>"
        f"<td>{e(TIMES.join(str(d) for d in layer.get('shape') or []))}</td>"
        f'<td class="num">{human_bytes(layer.get("bytes_before", 0))} → '
        f"{human_bytes(layer.get('bytes_after', 0))}</td>"
        f'<td class="num">{_float(layer.get("rel_error")):.4g}</td></tr>'
        for layer in ranked
    )
    return (
        f'<div class="sub">Largest errors</div><table><tr><th>layer</th><th>precision</th>'
        f'<th>shape</th><th class="num">size</th><th class="num">rel error</th></tr>{rows}'
        "</table>"
    )


def _float(value: Any) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        return math.nan


def _ops(report: Report) -> str:
    before, after = report.ops_before, report.ops_after
    names = sorted(
        set(before) | set(after), key=lambda op: (-max(before.get(op, 0), after.get(op, 0)), op)
    )
    if not names:
        return (
            '<section id="ops">\n<h2>Op histogram</h2>\n<p class="muted">No nodes.</p>\n</section>'
        )
    rows = [(op, before.get(op, 0), after.get(op, 0)) for op in names]
    new = [op for op in names if op not in before]
    gone = [op for op in names if op not in after]
    facts = []
    if new:
        facts.append("new: " + ", ".join(f"<code>{e(op)}</code>" for op in new))
    if gone:
        facts.append("gone: " + ", ".join(f"<code>{e(op)}</code>" for op in gone))
    chart = paired_bars(
        rows, colors=OPS_COLORS, names=("before", "after"), label="nodes per op type"
    )
    return (
        '<section id="ops">\n<h2>Op histogram, before and after the pipeline</h2>\n'
        + _legend([("before", OPS_COLORS[0]), ("after", OPS_COLORS[1])])
        + (f"<p>{'; '.join(facts)}</p>" if facts else "")
        + f'<div class="chart-box">{chart}</div>\n</section>'
    )


class Check(NamedTuple):
    """One criterion of a pass's budget: the full sentence, whether it held, a short form."""

    text: str
    held: bool
    short: str


def checks(p: PassReport) -> list[Check]:
    """The pass's measured metrics against each criterion of its budget (``cosine 0.99931 ≥
    0.99``), then the failure reason when no criterion shows why the check failed."""
    m = p.metrics or {}
    if "cosine" not in m:
        return []
    tol = {}
    for part in p.tolerance.split(","):
        key, _, value = part.strip().partition("=")
        if key:
            tol[key] = _float(value)
    result = []
    for key, name, unit in (("min_cosine", "cosine", ""), ("min_snr_db", "snr_db", " dB")):
        if key in tol:
            value, limit = _float(m[name]), tol[key]
            held = value >= limit
            shown = f"{value:.5f}" if name == "cosine" else f"{value:.1f}"
            text = f"{'cosine' if name == 'cosine' else 'SNR'} {shown}{unit} "
            text += f"{'≥' if held else '<'} {limit:g}{unit}"
            result.append(Check(text, held, text))
    if "atol" in tol or "rtol" in tol:
        held = bool(m.get("passed")) or "outside atol" not in str(m.get("reason", ""))
        bound = " + ".join(
            f"{k} {tol[k]:g}" + ("·|golden|" if k == "rtol" else "")
            for k in ("atol", "rtol")
            if k in tol
        )
        measured = f"max |Δ| {_float(m['max_abs']):.2g}"
        result.append(Check(f"{measured} {'≤' if held else '>'} {bound}", held, measured))
    if not m.get("passed") and all(c.held for c in result):
        reason = str(m.get("reason") or p.reason or "failed")
        result.append(Check(reason, False, reason))
    return result


def _check_html(p: PassReport, compact: bool = False) -> str:
    """The checks, each marked held or not; ``compact`` leaves out the atol/rtol budget."""
    if p.status in ("unchanged", "skipped"):
        text = "not checked: unchanged" if p.status == "unchanged" else "not run"
        return f'<span class="muted">{DASH if compact else text}</span>'
    found = checks(p)
    if not found:
        if p.status == "ok":
            return '<span class="muted">structure only</span>'
        return f'<span class="pass-bad">{e(p.reason)}</span>'
    return "<br>".join(
        f'<span class="{"pass-ok" if c.held else "pass-bad"}">{"✓" if c.held else "✗"} '
        f"{e(c.short if compact else c.text)}</span>"
        for c in found
    )


def _badge(status: str) -> str:
    return (
        f'<span class="badge {status}" style="background:{STATUS_COLORS[status]}">{status}</span>'
    )


def _latencies(report: Report) -> list[str]:
    """Each pass's latency cell, with the change from the model before it."""
    cells, previous = [], report.latency_ms_before
    for p in report.passes:
        if p.latency_ms is None:
            cells.append(DASH)
            continue
        change = f" ({(p.latency_ms / previous - 1) * 100:+.0f}%)" if previous else ""
        cells.append(ms(p.latency_ms) + change.replace("-", MINUS))
        previous = p.latency_ms
    return cells


def _pass_table(report: Report) -> str:
    head = (
        '<tr><th class="num">#</th><th>pass</th><th>kind</th><th>status</th><th>check</th>'
        '<th class="num">nodes</th><th class="num">weights</th><th class="num">latency</th>'
        '<th class="num">time</th><th>rules fired</th></tr>'
    )
    rows = []
    for i, (p, latency) in enumerate(zip(report.passes, _latencies(report), strict=True), 1):
        ran = p.status != "skipped"
        rules = ", ".join(f"{k} {v}" for k, v in p.counts.items()) or DASH
        rows.append(
            f'<tr><td class="num">{i}</td><td><code>{e(p.spec)}</code></td><td>{e(p.kind)}</td>'
            f'<td>{_badge(p.status)}</td><td class="check">{_check_html(p, compact=True)}</td>'
            f'<td class="num">{f"{p.nodes_before} → {p.nodes_after}" if ran else DASH}</td>'
            f'<td class="num">{human_bytes(p.bytes_after) if ran else DASH}</td>'
            f'<td class="num">{e(latency)}</td>'
            f'<td class="num">{f"{p.seconds:.2f} + {p.verify_seconds:.2f} s" if ran else DASH}'
            f"</td><td>{e(rules)}</td></tr>"
        )
    return (
        f'<section id="passes">\n<h2>Passes</h2>\n<table>{head}{"".join(rows)}</table>\n</section>'
    )


def _has_story(p: PassReport) -> bool:
    return p.status in ("ok", "failed", "error") or bool(p.notes or p.misses or p.counts)


def _details(report: Report) -> str:
    cards = [_card(i, p) for i, p in enumerate(report.passes, 1) if _has_story(p)]
    quiet = [f"{i}. {p.spec}" for i, p in enumerate(report.passes, 1) if not _has_story(p)]
    tail = ""
    if quiet:
        tail = (
            '<p class="muted">Nothing to report (unchanged or not run): '
            + ", ".join(f"<code>{e(q)}</code>" for q in quiet)
            + "</p>"
        )
    return (
        '<section id="details">\n<h2>Pass details</h2>\n'
        f'<div class="cards">{"".join(cards)}</div>\n{tail}\n</section>'
    )


def _card(index: int, p: PassReport) -> str:
    failed = p.status in ("failed", "error")
    facts = [("check", _check_html(p))]
    if p.tolerance:
        facts.append(("budget", f"<code>{e(p.tolerance)}</code> ({e(p.kind)})"))
    facts += [
        ("nodes", f"{p.nodes_before} → {p.nodes_after} ({p.nodes_after - p.nodes_before:+d})"),
        ("weights", f"{human_bytes(p.bytes_before)} → {human_bytes(p.bytes_after)}"),
    ]
    if p.latency_ms is not None:
        facts.append(("latency", ms(p.latency_ms)))
    facts.append(("time", f"pass {p.seconds:.3f} s, check {p.verify_seconds:.3f} s"))
    dl = "".join(f"<dt>{k}</dt><dd>{v}</dd>" for k, v in facts)
    parts = [
        f'<div class="card{" wide" if failed or p.misses else ""}" '
        f'style="--c:{STATUS_COLORS[p.status]}">'
        f"<h3>{index}. <code>{e(p.spec)}</code> {_badge(p.status)}</h3><dl>{dl}</dl>"
    ]
    if p.counts:
        chips = "".join(
            f'<span class="chip">{e(k)} <b>{TIMES}{v}</b></span>' for k, v in p.counts.items()
        )
        parts.append(f'<div class="sub">Rules fired</div><div class="chips">{chips}</div>')
    if p.misses:
        items = "".join(f"<li>{e(miss)}</li>" for miss in p.misses)
        parts.append(
            f'<div class="sub">Near misses (rules that fired 0 times)</div><ul>{items}</ul>'
        )
    if p.notes:
        items = "".join(f"<li>{e(note)}</li>" for note in p.notes)
        parts.append(f'<div class="sub">Notes</div><ul>{items}</ul>')
    if failed:
        parts.append(_failure(p))
    return "".join(parts) + "</div>"


def _failure(p: PassReport) -> str:
    lines = [f"<b>Rolled back</b>: {e(p.reason)}"]
    if p.first_diverging:
        d = p.first_diverging
        lines.append(
            f"First diverging tensor: <code>{e(d.get('name'))}</code> ({e(d.get('reason', ''))})"
        )
    if p.reproducer:
        lines.append(
            "Reproduce (the model from just before this pass: "
            f"<code>{e(p.reproducer['model'])}</code>):<pre>{e(p.reproducer['command'])}</pre>"
        )
    return '<div class="failure">' + "<br>".join(lines) + "</div>"
