"""Text shown by the CLI: the per-pass table, pass listings, model summaries, progress."""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import time
import typing
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click
import onnx_ir as ir

from onnxopt import model_io, registry
from onnxopt.pass_api import option_default
from onnxopt.report import Report, human_bytes
from onnxopt.stats import op_histogram


def progress_printer(always: bool = False) -> Callable[[str], None] | None:
    """Print pass progress on stderr when it is a terminal (or ``always``), with elapsed time."""
    if not always and not sys.stderr.isatty():
        return None
    start = time.perf_counter()
    return lambda message: click.echo(
        f"  {time.perf_counter() - start:6.2f}s running {message}", err=True
    )


def use_color(stream: Any = None) -> bool:
    """Color only on a terminal, and never when NO_COLOR is set (https://no-color.org)."""
    stream = stream or sys.stdout
    return bool(os.environ.get("NO_COLOR", "") == "" and stream.isatty())


STATUS_COLORS = {"ok": "green", "failed": "red", "error": "red", "skipped": "yellow"}


def status_word(word: str, color: bool, width: int = 0) -> str:
    """A status word padded to ``width``, colored when ``color``."""
    padded = word.ljust(width)
    key = word.lower()
    if not color or (key not in STATUS_COLORS and key not in ("different", "same")):
        return padded
    fg = STATUS_COLORS.get(key, "red" if key == "different" else "green")
    return click.style(word, fg=fg, bold=True if fg == "red" else None) + padded[len(word) :]


def _metric(entry: Any) -> str:
    if not entry.metrics:
        return "-"
    if entry.kind == "approximate":
        return f"cos {entry.metrics['cosine']:.5f}"
    max_abs = entry.metrics["max_abs"]
    return f"max|d| {max_abs:.2g}" if isinstance(max_abs, float) else f"max|d| {max_abs}"


def report_table(
    report: Report,
    *,
    explain: bool = False,
    quiet: bool = False,
    color: bool = False,
    seconds: float | None = None,
) -> str:
    """The per-pass table, pass notes (near misses too with ``explain``), then failures.

    ``quiet`` keeps only the failures and the outcome line; ``seconds`` (the whole run's wall
    time) adds a line splitting it into passes, checks and the rest.
    """
    lines = [] if quiet else _table(report, color)
    if not quiet and report.latency_settings is not None:
        lines.append(latency_line(report))
    if not quiet:
        for p in report.passes:
            lines += [f"{p.spec}: {note}" for note in p.notes]
            if explain:
                lines += [f"{p.spec}: {miss}" for miss in p.misses]
    for p in report.failed:
        lines.append(f"{p.name} {status_word(p.status, color)}: {p.reason} (rolled back)")
        if p.first_diverging:
            d = p.first_diverging
            lines.append(f"  first diverging tensor: '{d['name']}' ({d['reason']})")
        if p.reproducer:
            lines.append(f"  reproduce: {p.reproducer['command']}")
    if seconds is not None and not quiet:
        passes = sum(p.seconds for p in report.passes)
        checks = sum(p.verify_seconds for p in report.passes)
        lines.append(
            f"time: {seconds:.2f}s (passes {passes:.2f}s, checks {checks:.2f}s, "
            f"load, golden capture and save {max(seconds - passes - checks, 0):.2f}s)"
        )
    if report.output:
        lines.append(f"wrote {report.output}")
    elif not report.ok and not report.keep_going:
        lines.append(
            "no output written (use --keep-going to write the model without failed passes)"
        )
    return "\n".join(lines)


def latency_line(report: Report) -> str:
    """``latency: 4.10 ms -> 2.95 ms (0.72x), median of 20 runs, 1 thread`` (what was measured)."""
    settings = report.latency_settings or {}
    threads = settings.get("threads", 0)
    how = f"median of {settings.get('runs')} runs, " + (
        "ORT's default threads" if threads == 0 else f"{threads} thread{'s' * (threads > 1)}"
    )
    before = report.latency_ms_before
    after = report.latency_ms_after
    if before is None:
        return f"latency: input model not measured ({how})"
    if after is None or after == before:
        return f"latency: {before:.2f} ms, no pass changed it measurably ({how})"
    if not report.latency_comparable:
        return f"latency: {before:.2f} ms -> {after:.2f} ms per call of the new interface, {how}"
    return f"latency: {before:.2f} ms -> {after:.2f} ms ({after / before:.2f}x), {how}"


def _table(report: Report, color: bool) -> list[str]:
    timed = report.latency_settings is not None
    rows = [("pass", "kind", "status", "metric", "nodes", "weights", "time+check", "rules fired")]
    if timed:
        rows[0] = (*rows[0][:6], "latency", *rows[0][6:])
    for p in report.passes:
        delta = p.nodes_after - p.nodes_before
        rules = ", ".join(f"{k}={v}" for k, v in p.counts.items()) or "-"
        row = (
            p.spec,
            p.kind,
            p.status,
            _metric(p),
            f"{p.nodes_before}->{p.nodes_after} ({delta:+d})" if p.status != "skipped" else "-",
            human_bytes(p.bytes_after) if p.status != "skipped" else "-",
            f"{p.seconds:.2f}s+{p.verify_seconds:.2f}s" if p.status != "skipped" else "-",
            rules,
        )
        if timed:
            ms = "-" if p.latency_ms is None else f"{p.latency_ms:.2f} ms"
            row = (*row[:6], ms, *row[6:])
        rows.append(row)
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = [
        "  ".join(
            status_word(cell, color and i == 2 and r > 0, w) if i == 2 else cell.ljust(w)
            for i, (cell, w) in enumerate(zip(row, widths, strict=True))
        ).rstrip()
        for r, row in enumerate(rows)
    ]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return lines


def pass_listing() -> dict[str, Any]:
    """Every pass with its kind, summary and options (name, type, default), and the aliases."""
    passes = []
    for name in registry.pass_names():
        cls = registry.get_pass(name)
        assert cls is not None
        hints = typing.get_type_hints(cls)
        options = []
        for f in cls.options():
            default = option_default(f)
            options.append(
                {
                    "name": f.name,
                    "type": _type_name(hints[f.name]),
                    "default": None if default is dataclasses.MISSING else default,
                }
            )
        passes.append(
            {"name": name, "kind": cls.kind, "summary": cls.summary(), "options": options}
        )
    return {"passes": passes, "aliases": registry.aliases()}


def pass_listing_text(listing: dict[str, Any]) -> str:
    lines = ["passes:"]
    for p in listing["passes"]:
        lines.append(f"  {p['name']:<20} {p['kind']:<12} {p['summary']}")
        for o in p["options"]:
            lines.append(f"  {'':<20} {'':<12}   {o['name']}: {o['type']} = {o['default']}")
    lines.append("aliases:")
    for name, expansion in listing["aliases"].items():
        lines.append(f"  {name:<20} = {expansion}")
    return "\n".join(lines)


def _type_name(hint: Any) -> str:
    text = getattr(hint, "__name__", None) if not typing.get_args(hint) else None
    return text or str(hint).replace("typing.", "")


def model_summary(model: ir.Model, path: Path) -> dict[str, Any]:
    """Opsets, IO, op histogram, and parameter count and size by dtype."""
    by_dtype: dict[str, dict[str, int]] = {}
    for tensor in model_io.tensors(model):
        entry = by_dtype.setdefault(str(tensor.dtype), {"tensors": 0, "parameters": 0, "bytes": 0})
        entry["tensors"] += 1
        entry["parameters"] += tensor.size
        entry["bytes"] += tensor.nbytes
    ops = op_histogram(model)
    from onnxopt.streaming import StreamSpec

    stream = StreamSpec.read(model)
    return {
        "path": str(path),
        "file_bytes": path.stat().st_size,
        "ir_version": model.ir_version,
        "producer": f"{model.producer_name or ''} {model.producer_version or ''}".strip(),
        "opsets": dict(model.opset_imports),
        "external_data": sorted(str(p) for p in model_io.external_data_files(model)),
        "inputs": [_io(v) for v in model.graph.inputs],
        "outputs": [_io(v) for v in model.graph.outputs],
        "nodes": sum(ops.values()),
        "ops": dict(ops.most_common()),
        "parameters": sum(e["parameters"] for e in by_dtype.values()),
        "weight_bytes": sum(e["bytes"] for e in by_dtype.values()),
        "by_dtype": by_dtype,
        "streaming": json.loads(stream.to_json()) if stream is not None else None,
    }


def _io(value: ir.Value) -> dict[str, Any]:
    shape = [d if isinstance(d, int) else (d.value or "?") for d in value.shape or ()]
    return {"name": value.name, "dtype": str(value.dtype), "shape": shape}


def model_summary_text(s: dict[str, Any]) -> str:
    opsets = ", ".join(f"{d or 'ai.onnx'}={v}" for d, v in s["opsets"].items())
    lines = [
        f"{s['path']}  ({human_bytes(s['file_bytes'])} file, ir_version {s['ir_version']}"
        + (f", {s['producer']}" if s["producer"] else "")
        + ")",
        f"opsets: {opsets}",
    ]
    if s["external_data"]:
        lines.append(f"external data: {', '.join(s['external_data'])}")
    for label in ("inputs", "outputs"):
        lines.append(f"{label}:")
        lines += [f"  {v['name']}: {v['dtype']} {v['shape']}" for v in s[label]]
    lines.append(f"nodes: {s['nodes']}")
    lines += [f"  {op:<28} {n}" for op, n in s["ops"].items()]
    lines.append(f"parameters: {s['parameters']:,} ({human_bytes(s['weight_bytes'])})")
    lines += [
        f"  {dtype:<10} {e['tensors']} tensors, {e['parameters']:,} ({human_bytes(e['bytes'])})"
        for dtype, e in s["by_dtype"].items()
    ]
    if s["streaming"] is not None:
        from onnxopt.streaming import StreamSpec, describe

        lines += describe(StreamSpec.from_json(json.dumps(s["streaming"])))
    return "\n".join(lines)


def findings_text(target: Any, findings: list[Any]) -> str:
    """What a target cannot run, one op type a line, with what `lower` does about it."""
    if not findings:
        return f"{target.name}: every node is supported"
    fixes = {"decompose": "lower decomposes it", "convert-opset": "lower converts it", "": "-"}
    rows = [("op", "nodes", "why", "fix")] + [
        (f.op, str(f.count), f.reason, fixes[f.fix]) for f in findings
    ]
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    lines = [f"{target.name}: {len(findings)} unsupported"]
    lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows]
    fixable = sum(1 for f in findings if f.fix)
    spec = f"lower(target={target.name})"
    lines.append(
        f"{fixable} of {len(findings)} fixable: onnxopt run MODEL -o OUT --passes '{spec}'"
    )
    return "\n".join(lines)
