"""``onnxopt bench``: ORT CPU latency, peak memory and size of one or two models, side by side.

Each model is measured in a fresh process (``onnxopt/latency.py`` run as a script, importing only
numpy and ONNX Runtime), so one model's allocations never show in the other's numbers; that module
says how peak memory is read.
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from onnxopt import latency

RATIOS = {
    "latency_median": ("latency_ms", "median"),
    "latency_p90": ("latency_ms", "p90"),
    "session": ("session_ms", None),
    "peak_memory": ("peak_rss_bytes", None),
    "size": ("size_bytes", None),
}


def bench(
    models: list[Path],
    *,
    runs: int,
    warmup: int,
    threads: int,
    opt_level: str,
    dims: dict[str, int],
    seed: int,
    golden: Path | None,
    progress: Any = None,
) -> dict[str, Any]:
    """Measure each model in its own process; ratios are the second model over the first."""
    from onnxopt.errors import UsageError

    if runs < 1:
        raise UsageError(f"--runs must be at least 1, got {runs}")
    if warmup < 0 or threads < 0:
        raise UsageError("--warmup and --threads must not be negative")
    if golden is not None and dims:
        raise UsageError("--dim only applies to synthesized inputs; drop it or --golden")
    settings = {
        "runs": runs,
        "warmup": warmup,
        "threads": threads,
        "opt_level": opt_level,
        "inputs": "golden" if golden else "synthesized",
        "seed": None if golden else seed,
        "provider": "CPUExecutionProvider",
    }
    results = []
    with tempfile.TemporaryDirectory(prefix="onnxopt-bench-") as tmp:
        for index, path in enumerate(models):
            feeds_path = Path(tmp) / f"inputs{index}.npz"
            feeds, size = _prepare(path, feeds_path, dims=dims, seed=seed, golden=golden)
            if progress:
                progress(f"[{index + 1}/{len(models)}] {path}")
            measured = _measure_in_subprocess(path, feeds_path, settings)
            times = measured.pop("times_ms")
            results.append(
                {
                    "path": str(path),
                    **size,
                    "inputs": {
                        k: {"dtype": str(v.dtype), "shape": list(v.shape)} for k, v in feeds.items()
                    },
                    "latency_ms": summarize(times),
                    **measured,
                    "times_ms": times,
                }
            )
    report: dict[str, Any] = {"settings": settings, "models": results}
    if len(results) == 2:
        report["ratios"] = ratios(results[0], results[1])
    return report


def summarize(times: list[float]) -> dict[str, float]:
    """Median, 90th percentile, mean and minimum of run times (ms)."""
    return {
        "median": statistics.median(times),
        "p90": float(np.percentile(times, 90)),
        "mean": statistics.fmean(times),
        "min": min(times),
    }


def ratios(first: dict[str, Any], second: dict[str, Any]) -> dict[str, float | None]:
    """second / first for each compared number (None where the first is zero)."""
    result: dict[str, float | None] = {}
    for name, (key, sub) in RATIOS.items():
        a, b = first[key], second[key]
        if sub is not None:
            a, b = a[sub], b[sub]
        result[name] = b / a if a else None
    return result


def text(report: dict[str, Any]) -> str:
    """The measurements as a table, one column per model, and a ratio column for two."""
    from onnxopt.report import human_bytes

    models = report["models"]
    names = [Path(m["path"]).name for m in models]
    if len(set(names)) < len(names):
        names = [m["path"] for m in models]
    rows: list[tuple[str, ...]] = [("", *names, *(["ratio"] if len(models) == 2 else []))]
    lines_spec = [
        ("latency median", lambda m: f"{m['latency_ms']['median']:.3f} ms", "latency_median"),
        ("latency p90", lambda m: f"{m['latency_ms']['p90']:.3f} ms", "latency_p90"),
        ("session create", lambda m: f"{m['session_ms']:.1f} ms", "session"),
        ("peak memory", lambda m: human_bytes(m["peak_rss_bytes"]), "peak_memory"),
        ("size on disk", lambda m: human_bytes(m["size_bytes"]), "size"),
    ]
    for label, cell, ratio_key in lines_spec:
        row = [label, *(cell(m) for m in models)]
        if "ratios" in report:
            value = report["ratios"][ratio_key]
            row.append("-" if value is None else f"{value:.2f}x")
        rows.append(tuple(row))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows]
    s = report["settings"]
    threads = s["threads"] or "ORT default"
    inputs = "; ".join(f"{name}{v['shape']}" for name, v in models[0]["inputs"].items())
    source = "golden set" if s["inputs"] == "golden" else f"synthesized, seed {s['seed']}"
    lines.append(
        f"{s['runs']} runs after {s['warmup']} warm-up, threads {threads}, "
        f"opt level {s['opt_level']}, inputs {inputs} ({source})"
    )
    return "\n".join(lines)


def _prepare(
    path: Path, feeds_path: Path, *, dims: dict[str, int], seed: int, golden: Path | None
) -> tuple[dict[str, np.ndarray], dict[str, int]]:
    """The model's inputs (written for the worker) and its size on disk with external data."""
    from onnxopt import golden as golden_mod
    from onnxopt import model_io

    model = model_io.load(path)
    if golden is not None:
        feeds = golden_mod.GoldenSet.load(golden).inputs[:1]
        golden_mod.check_inputs(model, feeds)
    else:
        feeds = golden_mod.synthesize(model, dims=dims, seed=seed, shapes=1)[0]
    np.savez(feeds_path, **feeds[0])
    data = sum(p.stat().st_size for p in model_io.external_data_files(model))
    file_bytes = path.stat().st_size
    return feeds[0], {"file_bytes": file_bytes, "data_bytes": data, "size_bytes": file_bytes + data}


def _measure_in_subprocess(path: Path, feeds: Path, settings: dict[str, Any]) -> dict[str, Any]:
    from onnxopt.errors import UnsupportedModelError

    job = {**settings, "model": str(path), "feeds": str(feeds)}
    done = subprocess.run(
        [sys.executable, str(Path(latency.__file__).resolve()), json.dumps(job)],
        capture_output=True,
        text=True,
    )
    try:
        answer = json.loads(done.stdout.strip().splitlines()[-1])
    except (IndexError, ValueError):
        tail = (done.stderr.strip().splitlines() or [f"exit code {done.returncode}"])[-1]
        answer = {"error": f"the benchmark process failed: {tail}"}
    if "error" in answer:
        raise UnsupportedModelError(f"{path}: {answer['error']}")
    return answer
