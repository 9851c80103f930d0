"""Small inline SVG charts for the HTML report: bars, a line, paired bars and a timeline.

Each function returns one ``<svg>`` element (no XML namespace, which inline SVG in HTML does not
need) sized by its ``viewBox``, so it scales to the page's width. Every mark carries a ``<title>``
the browser shows on hover. Text is escaped here; callers pass plain strings.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from html import escape

AXIS = "#868e96"
GRID = "#e9ecef"
INK = "#343a40"


@dataclasses.dataclass(frozen=True)
class Bar:
    """One bar (or point): its x label, value, fill, hover text and an optional label above it."""

    label: str
    value: float | None
    color: str
    title: str
    note: str = ""


@dataclasses.dataclass(frozen=True)
class Span:
    """One timeline row: a pass's own time then its check time, starting at ``start`` seconds."""

    label: str
    start: float
    seconds: float
    verify_seconds: float
    color: str
    title: str
    note: str = ""


def e(text: object) -> str:
    """Escape text for HTML/SVG content and attribute values."""
    return escape(str(text), quote=True)


def nice_ticks(top: float, count: int = 4) -> list[float]:
    """Round tick values from 0 covering ``top`` (1, 2, 2.5 or 5 times a power of ten apart)."""
    if top <= 0 or not math.isfinite(top):
        return [0.0, 1.0]
    raw = top / count
    power = 10 ** math.floor(math.log10(raw))
    step = next(m * power for m in (1, 2, 2.5, 5, 10) if m * power >= raw)
    return [i * step for i in range(math.ceil(top / step - 1e-9) + 1)]


def _svg(width: int, height: int, body: list[str], label: str) -> str:
    return (
        f'<svg class="chart" viewBox="0 0 {width} {height}" width="100%" role="img" '
        f'aria-label="{e(label)}" preserveAspectRatio="xMinYMin meet">' + "".join(body) + "</svg>"
    )


def _y_axis(
    ticks: list[float], scale: Callable[[float], float], left: int, right: int, fmt: Callable
) -> list[str]:
    parts = []
    for tick in ticks:
        y = scale(tick)
        parts.append(
            f'<line x1="{left}" x2="{right}" y1="{y:.1f}" y2="{y:.1f}" stroke="{GRID}"/>'
            f'<text x="{left - 6}" y="{y + 4:.1f}" text-anchor="end" class="tick">{e(fmt(tick))}'
            "</text>"
        )
    return parts


def _x_labels(labels: Sequence[str], centers: list[float], y: float, every: int) -> list[str]:
    return [
        f'<text x="{x:.1f}" y="{y:.1f}" text-anchor="middle" class="tick">{e(label)}</text>'
        for i, (label, x) in enumerate(zip(labels, centers, strict=True))
        if i % every == 0 or i == len(labels) - 1
    ]


def bar_chart(
    bars: Sequence[Bar],
    *,
    fmt: Callable[[float], str],
    label: str,
    width: int = 560,
    height: int = 240,
    max_labels: int = 30,
    baseline: float | None = None,
) -> str:
    """Vertical bars on a zero-based axis (no bar where the value is None, NaN or infinite);
    ``baseline`` draws a dashed reference line."""
    left, right, top, bottom = 56, width - 8, 18, height - 26
    bars = [b if _finite(b.value) else dataclasses.replace(b, value=None) for b in bars]
    values = [b.value or 0.0 for b in bars]
    ticks = nice_ticks(max([*values, baseline or 0.0, 0.0]))
    y = _scale(ticks[-1], top, bottom)
    band = (right - left) / max(len(bars), 1)
    bar_width = max(min(band * 0.72, 56), 1.0)
    parts = _y_axis(ticks, y, left, right, fmt)
    centers = []
    for i, bar in enumerate(bars):
        cx = left + band * (i + 0.5)
        centers.append(cx)
        if bar.value is None:
            continue
        top_y = y(bar.value)
        parts.append(
            f'<rect x="{cx - bar_width / 2:.1f}" y="{top_y:.1f}" width="{bar_width:.1f}" '
            f'height="{max(bottom - top_y, 0.5):.1f}" fill="{bar.color}">'
            f"<title>{e(bar.title)}</title></rect>"
        )
        if bar.note:
            parts.append(_note(bar.note, cx, top_y - 4, left, right))
    if baseline is not None:
        parts.append(
            f'<line x1="{left}" x2="{right}" y1="{y(baseline):.1f}" y2="{y(baseline):.1f}" '
            f'stroke="{INK}" stroke-dasharray="4 3"/>'
        )
    parts.append(f'<line x1="{left}" x2="{right}" y1="{bottom}" y2="{bottom}" stroke="{AXIS}"/>')
    every = max(1, math.ceil(len(bars) / max_labels))
    parts += _x_labels([b.label for b in bars], centers, bottom + 16, every)
    return _svg(width, height, parts, label)


def line_chart(
    points: Sequence[Bar],
    *,
    fmt: Callable[[float], str],
    label: str,
    width: int = 560,
    height: int = 240,
) -> str:
    """Points joined by a line, on a zero-based axis; points with no value are left out."""
    left, right, top, bottom = 56, width - 8, 18, height - 26
    points = [p if _finite(p.value) else dataclasses.replace(p, value=None) for p in points]
    ticks = nice_ticks(max([p.value or 0.0 for p in points] + [0.0]))
    y = _scale(ticks[-1], top, bottom)
    band = (right - left) / max(len(points), 1)
    centers = [left + band * (i + 0.5) for i in range(len(points))]
    parts = _y_axis(ticks, y, left, right, fmt)
    measured = [(cx, p) for cx, p in zip(centers, points, strict=True) if p.value is not None]
    if len(measured) > 1:
        path = " ".join(f"{cx:.1f},{y(p.value or 0):.1f}" for cx, p in measured)
        color = measured[0][1].color
        parts.append(f'<polyline points="{path}" fill="none" stroke="{color}" stroke-width="2.5"/>')
    for cx, p in measured:
        parts.append(
            f'<circle cx="{cx:.1f}" cy="{y(p.value or 0):.1f}" r="5" fill="{p.color}">'
            f"<title>{e(p.title)}</title></circle>"
        )
        if p.note:
            parts.append(_note(p.note, cx, y(p.value or 0) - 9, left, right))
    parts.append(f'<line x1="{left}" x2="{right}" y1="{bottom}" y2="{bottom}" stroke="{AXIS}"/>')
    parts += _x_labels([p.label for p in points], centers, bottom + 16, 1)
    return _svg(width, height, parts, label)


def paired_bars(
    rows: Sequence[tuple[str, int, int]],
    *,
    colors: tuple[str, str],
    names: tuple[str, str],
    label: str,
    width: int = 1100,
) -> str:
    """Horizontal bar pairs, one row per label: the first value above the second."""
    left, right, top, row_h = 280, width - 50, 8, 26
    height = top + row_h * len(rows) + 8
    high = max([max(a, b) for _, a, b in rows] + [1])
    scale = (right - left) / high
    parts = []
    for i, (name, first, second) in enumerate(rows):
        y0 = top + i * row_h
        parts.append(
            f'<text x="{left - 8}" y="{y0 + 15}" text-anchor="end" class="label">'
            f"{e(_clip(name, 42))}<title>{e(name)}</title></text>"
        )
        for j, (value, color) in enumerate(((first, colors[0]), (second, colors[1]))):
            yy = y0 + 3 + j * 10
            w = value * scale
            title = f"{name}: {value} {names[j]}"
            parts.append(
                f'<rect x="{left}" y="{yy}" width="{max(w, 0.0):.1f}" height="9" '
                f'fill="{color}"><title>{e(title)}</title></rect>'
                f'<text x="{left + w + 4:.1f}" y="{yy + 8}" class="note">{value}</text>'
            )
    parts.append(f'<line x1="{left}" x2="{left}" y1="{top}" y2="{height - 8}" stroke="{AXIS}"/>')
    return _svg(width, height, parts, label)


def timeline(spans: Sequence[Span], *, label: str, width: int = 1100, light: float = 0.45) -> str:
    """One row per span: its own time solid, its check time lighter, along a shared time axis;
    each span's ``note`` goes in a column at the right."""
    left, right, top, row_h = 240, width - 110, 24, 24
    height = top + row_h * len(spans) + 6
    total = max([s.start + s.seconds + s.verify_seconds for s in spans] + [1e-9])
    ticks = nice_ticks(total, 5)
    scale = (right - left) / ticks[-1]
    parts = []
    for tick in ticks:
        x = left + tick * scale
        parts.append(
            f'<line x1="{x:.1f}" x2="{x:.1f}" y1="{top - 4}" y2="{height - 4}" stroke="{GRID}"/>'
            f'<text x="{x:.1f}" y="{top - 8}" text-anchor="middle" class="tick">{tick:g} s</text>'
        )
    for i, span in enumerate(spans):
        y0 = top + i * row_h
        parts.append(
            f'<text x="{left - 8}" y="{y0 + 16}" text-anchor="end" class="label">'
            f"{e(_clip(span.label, 34))}<title>{e(span.title)}</title></text>"
        )
        x0 = left + span.start * scale
        w1 = max(span.seconds * scale, 2.0)
        w2 = span.verify_seconds * scale
        parts.append(
            f'<g><title>{e(span.title)}</title><rect x="{x0:.1f}" y="{y0 + 4}" '
            f'width="{w1:.1f}" height="16" fill="{span.color}"/>'
            + (
                f'<rect x="{x0 + w1:.1f}" y="{y0 + 4}" width="{w2:.1f}" height="16" '
                f'fill="{span.color}" fill-opacity="{light}"/>'
                if w2 > 0
                else ""
            )
            + "</g>"
        )
        if span.note:
            parts.append(f'<text x="{right + 10}" y="{y0 + 16}" class="note">{e(span.note)}</text>')
    return _svg(width, height, parts, label)


def _note(text: str, x: float, y: float, left: float, right: float) -> str:
    """A value label above a mark, kept inside the plot near its edges."""
    room = 3.2 * len(text)  # about half the label's width at the note font size
    anchor, x = "middle", x
    if x + room > right:
        anchor, x = "end", right
    elif x - room < left:
        anchor, x = "start", left + 2
    return f'<text x="{x:.1f}" y="{y:.1f}" text-anchor="{anchor}" class="note">{e(text)}</text>'


def _finite(value: float | None) -> bool:
    return value is not None and math.isfinite(value)


def _scale(top_value: float, top: float, bottom: float) -> Callable[[float], float]:
    span = top_value or 1.0
    return lambda v: bottom - (bottom - top) * (v / span)


def _clip(text: str, n: int) -> str:
    return text if len(text) <= n else text[: n - 1] + "…"
