"""``optimize()``: the one-call Python entry point."""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from pathlib import Path

import onnx_ir as ir

from onnxopt import model_io
from onnxopt.golden import GoldenSet
from onnxopt.latency import LatencySettings
from onnxopt.pass_api import Pass
from onnxopt.pipeline import Pipeline
from onnxopt.report import Report


def optimize(
    model: ir.Model | str | os.PathLike,
    passes: str | Sequence[Pass] = "simplify",
    *,
    golden: GoldenSet | str | os.PathLike | None = None,
    verify: bool = True,
    dims: dict[str, int] | None = None,
    seed: int = 0,
    tolerances: dict[str, dict[str, float | None]] | None = None,
    keep_going: bool = False,
    output: str | os.PathLike | None = None,
    external_data: bool | None = None,
    progress: Callable[[str], None] | None = None,
    latency: LatencySettings | None = None,
) -> tuple[ir.Model, Report]:
    """Run a pipeline on a model, verifying every pass, and optionally save the result.

    Args:
        model: A path (loaded lazily) or an ``ir.Model``; neither is modified.
        passes: A pipeline spec such as ``"fold-constants,cleanup"`` or pass instances.
        golden: A golden set or its folder; captured from the model when None.
        verify: Check numerics against the golden set after each pass that changed the model.
        dims: Sizes for symbolic dims when the golden set is captured here.
        seed: Seed for captured golden inputs.
        tolerances: Per-kind tolerance overrides, e.g. ``{"exact": {"atol": 1e-3}}``.
        keep_going: Roll back failing passes and continue instead of stopping.
        output: Where to save the result. Nothing is written when a pass failed and
            ``keep_going`` is off; the model from before the failing pass is written beside it.
        external_data: Force (True) or forbid (False) external data for the output.
        progress: Called with a message as each pass starts.
        latency: Time the input model and the model after each pass that changed it in ORT
            CPU (median ms in the report).

    Returns:
        The optimized model and the report.
    """
    source = Path(model) if isinstance(model, (str, os.PathLike)) else None
    loaded = model_io.load(source) if source else model
    if golden is not None and not isinstance(golden, GoldenSet):
        golden = GoldenSet.load(golden)
    out_path = Path(output).absolute() if output else None
    protected = (source, *model_io.external_data_files(loaded)) if source else ()
    if out_path is not None:
        model_io.check_writable(out_path, protected)
    pipeline = Pipeline(
        passes,
        golden=golden,
        verify=verify,
        dims=dims,
        seed=seed,
        tolerances=tolerances,
        keep_going=keep_going,
        reproducer_dir=out_path.parent if out_path else None,
        reproducer_stem=out_path.stem if out_path else "model",
        progress=progress,
        latency=latency,
    )
    result, report = pipeline.run(loaded)
    report.input = str(source) if source else ""
    if out_path is not None and report.exit_code == 0:
        model_io.save(result, out_path, external_data=external_data, protected=protected)
        report.output = str(out_path)
    return result, report
