"""The pipeline report: what each pass did, what it cost, and whether it kept the model."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any, Literal

Status = Literal["ok", "unchanged", "failed", "error", "skipped"]


def human_bytes(n: float) -> str:
    """``512 B``, ``1.5 KB``, ``2.0 MB``, ``1.2 GB`` (powers of 1024)."""
    for unit in ("B", "KB", "MB", "GB"):
        if abs(n) < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GB"


@dataclasses.dataclass
class PassReport:
    """One pass's line in the report."""

    name: str
    spec: str
    kind: str
    status: Status = "skipped"
    seconds: float = 0.0
    verify_seconds: float = 0.0
    nodes_before: int = 0
    nodes_after: int = 0
    bytes_before: int = 0
    bytes_after: int = 0
    counts: dict[str, int] = dataclasses.field(default_factory=dict)
    notes: list[str] = dataclasses.field(default_factory=list)
    misses: list[str] = dataclasses.field(default_factory=list)
    layers: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    """Per weight a weight pass changed: ``name``, ``precision``, ``shape``, ``bytes_before``,
    ``bytes_after``, ``rel_error`` (relative L2 error of the weight), maybe more."""
    tolerance: str = ""
    metrics: dict[str, Any] | None = None
    reason: str = ""
    error_code: int = 0
    """The exit code of the user-facing error a pass raised (2 usage, 4 unsupported model)."""
    first_diverging: dict[str, Any] | None = None
    reproducer: dict[str, str] | None = None
    latency_ms: float | None = None
    """Median ORT CPU run time of the model after this pass (``--latency``; None: not measured)."""


@dataclasses.dataclass
class Report:
    """The whole run: the pipeline as given, one entry per pass, and the outcome."""

    pipeline: str
    input: str = ""
    output: str = ""
    golden: dict[str, Any] = dataclasses.field(default_factory=dict)
    passes: list[PassReport] = dataclasses.field(default_factory=list)
    keep_going: bool = False
    ops_before: dict[str, int] = dataclasses.field(default_factory=dict)
    """Node count per op type (``domain::Op`` outside the default domain) of the input model."""
    ops_after: dict[str, int] = dataclasses.field(default_factory=dict)
    """The same for the model the run ended with."""
    latency_ms_before: float | None = None
    """Median ORT CPU run time of the input model (``--latency``; None: not measured)."""
    latency_settings: dict[str, int] | None = None
    """How latency was measured: ``runs``, ``warmup``, ``threads`` (None: it was not)."""

    @property
    def failed(self) -> list[PassReport]:
        return [p for p in self.passes if p.status in ("failed", "error")]

    @property
    def ok(self) -> bool:
        return not self.failed

    @property
    def latency_ms_after(self) -> float | None:
        """Latency of the model the run ended with: after the last pass that changed it."""
        changed = [p for p in self.passes if p.status == "ok"]
        return changed[-1].latency_ms if changed else self.latency_ms_before

    @property
    def latency_comparable(self) -> bool:
        """Whether the first and last latency time the same work: no interface pass (streaming)
        changed what one call of the model computes."""
        return not any(p.status == "ok" and p.kind == "interface" for p in self.passes)

    @property
    def exit_code(self) -> int:
        """0 if every pass held (or ``keep_going``), 3 if one failed verification, the error's own
        code when a pass refused the model (2 bad option, 4 unsupported model), 1 on a crash."""
        if self.ok or self.keep_going:
            return 0
        if any(p.status == "failed" for p in self.failed):
            return 3
        return next((p.error_code for p in self.failed if p.error_code), 1)

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["ok"] = self.ok
        data["exit_code"] = self.exit_code
        return data

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    def write(self, path: str | Path) -> None:
        """Write the report: a self-contained HTML page for ``.html``/``.htm``, JSON otherwise."""
        path = Path(path)
        if path.suffix.lower() in (".html", ".htm"):
            from onnxopt.html_report import render

            path.write_text(render(self), encoding="utf-8")
        else:
            path.write_text(self.to_json() + "\n")
