"""Helpers the examples share: an output folder, ORT latency, accuracy figures and a table.

Only public APIs are used here (onnx, onnxruntime, numpy), so an example reads like user code.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import tempfile
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

from onnxopt import Report


def parser(doc: str | None) -> argparse.ArgumentParser:
    """An argument parser with the options every example takes (``--out``, ``--runs``)."""
    p = argparse.ArgumentParser(
        description=(doc or "").strip().splitlines()[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--out", type=folder, help="folder for the models (default: a temporary one)")
    p.add_argument("--runs", type=positive, default=20, help="timed runs per latency figure")
    p.add_argument("--threads", type=positive, default=1, help="ONNX Runtime intra-op threads")
    return p


def positive(text: str) -> int:
    """An argparse type: an integer of at least 1."""
    value = int(text) if text.strip().isdigit() else 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive integer")
    return value


def folder(text: str) -> Path:
    """An argparse type: a folder path that is not an existing file."""
    path = Path(text)
    if path.exists() and not path.is_dir():
        raise argparse.ArgumentTypeError(f"{text} exists and is not a folder")
    return path


@contextlib.contextmanager
def out_dir(path: Path | None) -> Iterator[Path]:
    """``path`` (created), or a temporary folder removed afterwards."""
    if path is not None:
        path.mkdir(parents=True, exist_ok=True)
        yield path
        return
    with tempfile.TemporaryDirectory(prefix="onnxopt-example-") as tmp:
        yield Path(tmp)


def size_mb(path: Path) -> float:
    """The model file plus any external data files beside it, in MB (10^6 bytes)."""
    files = [path, *path.parent.glob(path.name + ".data")]
    return sum(f.stat().st_size for f in files if f.exists()) / 1e6


def op_counts(path: Path) -> Counter[str]:
    """How many nodes of each op type the main graph of ``path`` has."""
    model = onnx.load(str(path), load_external_data=False)
    return Counter(node.op_type for node in model.graph.node)


def session_options(threads: int = 1) -> ort.SessionOptions:
    """ORT options as a user would set them: all graph optimizations on, ``threads`` threads."""
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    return options


def session(path: Path, threads: int = 1) -> ort.InferenceSession:
    """An ORT CPU session with ``session_options(threads)``."""
    options = session_options(threads)
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def run(sess: ort.InferenceSession, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    return sess.run(None, feeds)


def latency_ms(
    sess: ort.InferenceSession, feeds: dict[str, np.ndarray], runs: int = 20, warmup: int = 3
) -> float:
    """Median milliseconds of ``runs`` calls after ``warmup`` untimed ones."""
    for _ in range(warmup):
        sess.run(None, feeds)
    times = []
    for _ in range(max(1, runs)):
        start = time.perf_counter()
        sess.run(None, feeds)
        times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times)


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    """Cosine similarity of two tensors, flattened (1.0 when both are zero)."""
    a64, b64 = a.astype(np.float64).ravel(), b.astype(np.float64).ravel()
    norm = float(np.linalg.norm(a64) * np.linalg.norm(b64))
    return float(a64 @ b64) / norm if norm else 1.0


def max_abs(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.max(np.abs(a.astype(np.float64) - b.astype(np.float64))))


def ratio(before: float, after: float) -> str:
    return f"{after / before:.2f}x" if before else "-"


def table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """A plain-text table: one header line, a rule, then rows; columns left-aligned."""
    cells = [[str(c) for c in headers], *[[str(c) for c in row] for row in rows]]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)) for row in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(line.rstrip() for line in lines)


def verdict(ok: bool, what: str, code: int = 1) -> int:
    """Print the last line every example ends with; the exit code for ``main`` (``code`` when
    not ``ok``)."""
    print(f"{'OK' if ok else 'FAIL'}: {what}")
    return 0 if ok else code


def pass_table(report: Report) -> str:
    """The passes of an ``onnxopt.Report`` that changed the model: what fired and what onnxopt
    measured against the golden outputs when it verified them."""
    rows = []
    for p in report.passes:
        if p.status == "unchanged":
            continue
        metric = "-"
        if p.metrics:
            metric = (
                f"cos {p.metrics['cosine']:.4f}"
                if p.kind == "approximate"
                else f"max|d| {p.metrics['max_abs']:.1e}"
            )
        fired = ", ".join(f"{rule}={n}" for rule, n in p.counts.items()) or "-"
        rows.append([p.name, p.status, metric, fired])
    return table(["onnxopt pass", "status", "verified", "rules fired"], rows)


def failures(report: Report) -> str:
    """One line naming each pass that failed and why."""
    return "; ".join(f"{p.name} {p.status}: {p.reason}" for p in report.failed)
