"""ORT CPU latency: session options, timed runs, and a worker process for ``onnxopt bench``.

Run as a script (``python latency.py JOB_JSON``) this file is the benchmark worker: it imports only
numpy and ONNX Runtime, so a model's numbers never include onnxopt's own memory. Peak memory is
the growth of the process's resident set from just before the session is created to the highest
point while it is created and run: Linux's VmHWM after resetting it through
``/proc/self/clear_refs``; elsewhere the growth of ``ru_maxrss``, which misses a peak lower than
the interpreter's start-up peak.

In the pass manager (``onnxopt run --latency N``) :func:`model_latency_ms` times an in-memory
model in this process instead.
"""

from __future__ import annotations

import dataclasses
import json
import os
import statistics
import sys
import time
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    import onnx_ir as ir
    import onnxruntime as ort

OPT_LEVELS = ("disable", "basic", "extended", "all")


@dataclasses.dataclass(frozen=True)
class LatencySettings:
    """How ``onnxopt run --latency`` times a model: ``runs`` timed runs after ``warmup``."""

    runs: int
    threads: int = 1
    """ORT intra-op threads; 0 is ORT's default (one per core)."""
    warmup: int = 1


def session_options(opt_level: str = "all", threads: int = 0) -> ort.SessionOptions:
    """ORT session options: graph optimization level by name, intra-op threads, quiet log."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = {
        "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
        "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
        "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
        "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
    }[opt_level]
    options.intra_op_num_threads = threads
    options.log_severity_level = 3
    return options


def time_runs(
    session: ort.InferenceSession, feeds: dict[str, np.ndarray], runs: int, warmup: int
) -> list[float]:
    """Run ``warmup`` times untimed, then ``runs`` times; each run's wall time in ms."""
    for _ in range(warmup):
        session.run(None, feeds)
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        session.run(None, feeds)
        times.append((time.perf_counter() - start) * 1000)
    return times


def model_latency_ms(
    model: ir.Model, feeds: dict[str, np.ndarray], settings: LatencySettings
) -> float:
    """Median run time (ms) of an in-memory model in ORT CPU with ORT's default optimizations.

    Raises whatever ONNX Runtime raises when it cannot load or run the model.
    """
    import onnx_ir as ir

    from onnxopt import ort_runner

    options = session_options("all", settings.threads)
    session = ort_runner.create_session(model, ir.to_proto(model), options)
    return statistics.median(time_runs(session, feeds, settings.runs, settings.warmup))


def measure(job: dict[str, Any]) -> dict[str, Any]:
    """In the worker: create the session, warm up, time ``runs`` runs, note peak memory."""
    import onnxruntime as ort

    with np.load(job["feeds"], allow_pickle=False) as data:
        feeds = {key: data[key] for key in data.files}
    options = session_options(job["opt_level"], job["threads"])
    baseline, method = _reset_peak()
    start = time.perf_counter()
    session = ort.InferenceSession(job["model"], options, providers=[job["provider"]])
    session_ms = (time.perf_counter() - start) * 1000
    times = time_runs(session, feeds, job["runs"], job["warmup"])
    return {
        "session_ms": session_ms,
        "peak_rss_bytes": max(_peak(method) - baseline, 0),
        "memory_method": method,
        "pid": os.getpid(),
        "times_ms": times,
    }


def _status_kb(field: str) -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise OSError(f"no {field} in /proc/self/status")


def _reset_peak() -> tuple[int, str]:
    """The current RSS (bytes) and how the peak will be read."""
    try:
        with open("/proc/self/clear_refs", "w") as refs:
            refs.write("5")  # resets VmHWM to the current RSS
        return _status_kb("VmRSS"), "VmHWM"
    except OSError:
        return _peak("ru_maxrss"), "ru_maxrss"


def _peak(method: str) -> int:
    if method == "VmHWM":
        return _status_kb("VmHWM")
    import resource

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


def _worker() -> None:
    try:
        answer = measure(json.loads(sys.argv[1]))
    except Exception as err:
        first = (str(err).strip().splitlines() or [type(err).__name__])[0]
        answer = {"error": f"ONNX Runtime cannot run it: {first}"}
    print(json.dumps(answer))


if __name__ == "__main__":
    _worker()
