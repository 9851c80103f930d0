"""The pass manager: run passes in order, verify each change, roll back what breaks the model."""

from __future__ import annotations

import dataclasses
import logging
import shlex
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import onnx_ir as ir

from onnxopt import golden as golden_mod
from onnxopt import model_io, spec
from onnxopt.errors import OnnxoptError, VerificationError
from onnxopt.golden import GoldenSet
from onnxopt.latency import LatencySettings, model_latency_ms
from onnxopt.metrics import Metrics, compare_all
from onnxopt.pass_api import Pass, PassResult
from onnxopt.report import PassReport, Report
from onnxopt.stats import node_count, op_histogram
from onnxopt.verify import first_diverging, structural_problems

logger = logging.getLogger(__name__)


class Pipeline:
    """An ordered list of passes and how to check them.

    Args:
        passes: A pipeline spec (``"fold-constants,cleanup"``) or pass instances.
        golden: The golden set; captured from the input model when None and ``verify`` is on.
        verify: Check numerics after each pass that changed the model (structure: always).
        dims: Sizes of symbolic dims, for a golden set captured here.
        seed: Seed for a golden set captured here.
        tolerances: Per-kind overrides, e.g. ``{"exact": {"atol": 1e-3}}``.
        keep_going: Roll back a failing pass and go on instead of stopping.
        reproducer_dir: Where to write the model from just before a failing pass.
        progress: Called with a short message as each pass starts.
        latency: Time the input model and the model after each pass that changed it in ORT CPU
            (median ms, in the report); on the first golden case, or synthesized inputs.
    """

    def __init__(
        self,
        passes: str | Sequence[Pass],
        *,
        golden: GoldenSet | None = None,
        verify: bool = True,
        dims: dict[str, int] | None = None,
        seed: int = 0,
        tolerances: dict[str, dict[str, float | None]] | None = None,
        keep_going: bool = False,
        reproducer_dir: str | Path | None = None,
        reproducer_stem: str = "model",
        progress: Callable[[str], None] | None = None,
        latency: LatencySettings | None = None,
    ) -> None:
        self.passes = spec.build(passes) if isinstance(passes, str) else list(passes)
        self.golden = golden
        self.verify = verify
        self.dims = dims
        self.seed = seed
        self.tolerances = tolerances or {}
        self.keep_going = keep_going
        self.reproducer_dir = Path(reproducer_dir) if reproducer_dir else None
        self.reproducer_stem = reproducer_stem
        self.progress = progress
        self.latency = latency

    @property
    def spec(self) -> str:
        return spec.to_spec(self.passes)

    def run(self, model: ir.Model) -> tuple[ir.Model, Report]:
        """Run every pass on a copy of ``model`` (left as it is); return the result and report.

        The copy shares weight tensors with ``model``, so it costs no weight memory.
        """
        report = Report(pipeline=self.spec, keep_going=self.keep_going)
        report.ops_before = dict(op_histogram(model))
        model = model.clone()
        golden = self.golden
        if self.verify:
            if golden is None:
                golden = golden_mod.capture(model, dims=self.dims, seed=self.seed)
            else:
                golden_mod.check_inputs(model, golden.inputs)
            report.golden = {
                "cases": len(golden.inputs),
                "source": golden.source,
                "dims": golden.dims,
            }
        else:
            golden = None
        reference = golden.outputs if golden else None
        feeds = golden.inputs[0] if golden else None
        if self.latency:
            report.latency_settings = dataclasses.asdict(self.latency)
            report.latency_ms_before, _ = self._latency(model, feeds)
        interface: Pass | None = None  # the last interface pass that held runs the model after it
        for index, pass_ in enumerate(self.passes):
            if self.progress:
                self.progress(f"[{index + 1}/{len(self.passes)}] {pass_.to_spec()}")
            entry, model, new_reference = self._run_one(pass_, model, golden, reference, interface)
            report.passes.append(entry)
            if self.latency and entry.status == "ok":
                entry.latency_ms, problem = self._latency(model, feeds)
                if problem:
                    entry.notes.append(f"latency not measured: {problem}")
                elif pass_.kind == "interface":
                    entry.notes.append(
                        "latency: one call of the new interface on synthesized inputs "
                        "(e.g. one chunk), not comparable with the model before"
                    )
            if entry.status in ("failed", "error"):
                if not self.keep_going:
                    break
            elif new_reference is not None and pass_.kind == "approximate":
                reference = new_reference
            if pass_.kind == "interface" and entry.status == "ok":
                interface = pass_
        for pass_ in self.passes[len(report.passes) :]:
            report.passes.append(PassReport(pass_.name, pass_.to_spec(), pass_.kind))
        report.ops_after = dict(op_histogram(model))
        return model, report

    def _latency(
        self, model: ir.Model, feeds: dict[str, np.ndarray] | None
    ) -> tuple[float | None, str]:
        """Median ms on ``feeds`` (synthesized where they do not fit the model), or why not."""
        assert self.latency is not None
        names = {value.name for value in golden_mod.feed_inputs(model)}
        if feeds is None or set(feeds) != names:  # no golden set, or an interface pass changed IO
            try:
                cases, _ = golden_mod.synthesize(model, dims=self.dims, seed=self.seed, shapes=1)
                feeds = cases[0]
            except OnnxoptError as err:
                return None, str(err)
        try:
            return model_latency_ms(model, feeds, self.latency), ""
        except Exception as err:
            logger.debug("latency of the model failed", exc_info=True)
            return None, " ".join(str(err).split())[:200] or type(err).__name__

    def _run_one(
        self,
        pass_: Pass,
        model: ir.Model,
        golden: GoldenSet | None,
        reference: list[dict[str, np.ndarray]] | None,
        interface: Pass | None = None,
    ) -> tuple[PassReport, ir.Model, list[dict[str, np.ndarray]] | None]:
        entry = PassReport(pass_.name, pass_.to_spec(), pass_.kind)
        if golden is not None and reference is not None and pass_.kind != "approximate":
            # Exact passes answer to the model as it stood (after any approximate pass).
            golden = dataclasses.replace(golden, outputs=reference)
        entry.nodes_before = node_count(model)
        entry.bytes_before = model_io.weight_bytes(model)
        before = model.clone()
        if getattr(pass_, "needs_golden", False):
            pass_.golden = golden  # mixed-precision measures its candidates on the golden set
        start = time.perf_counter()
        try:
            result = pass_(model)
        except Exception as err:
            logger.debug("pass %s raised", pass_.name, exc_info=True)
            entry.status, entry.reason = "error", f"{type(err).__name__}: {err}"
            entry.error_code = err.exit_code if isinstance(err, OnnxoptError) else 0
            entry.seconds = time.perf_counter() - start
            return self._rolled_back(entry, pass_, before, golden), before, None
        entry.seconds = time.perf_counter() - start
        model = result.model
        if isinstance(result, PassResult):
            entry.counts, entry.notes = dict(result.counts), list(result.notes)
            entry.misses, entry.layers = list(result.misses), list(result.layers)
        entry.nodes_after = node_count(model)
        entry.bytes_after = model_io.weight_bytes(model)
        if not result.modified:
            entry.status = "unchanged"
            return entry, model, None

        start = time.perf_counter()
        problems = structural_problems(model)
        entry.verify_seconds = time.perf_counter() - start
        if problems:
            entry.status = "failed"
            entry.reason = f"structure: {problems[0]}" + (
                f" (+{len(problems) - 1} more)" if len(problems) > 1 else ""
            )
            return self._rolled_back(entry, pass_, before, golden), before, None
        if golden is None:
            entry.status = "ok"
            return entry, model, None

        tol = golden.tolerance(pass_.kind, self.tolerances.get(pass_.kind))
        entry.tolerance = tol.describe()
        try:
            runner = pass_ if pass_.kind == "interface" or interface is None else interface
            outputs = runner.run_golden(model, golden.inputs)
            metrics = compare_all(golden.outputs, outputs, tol)
        except VerificationError as err:
            outputs, metrics = None, Metrics(passed=False, reason=str(err))
        entry.metrics = metrics.as_dict()
        entry.verify_seconds = time.perf_counter() - start
        if metrics.passed:
            entry.status = "ok"
            return entry, model, outputs
        entry.status, entry.reason = "failed", metrics.reason
        # An interface pass changed the inputs: the old and new models cannot share feeds.
        streaming = pass_.kind == "interface" or interface is not None
        diverging = None if streaming else first_diverging(before, model, golden.inputs[0], tol)
        if diverging:
            name, worst = diverging
            entry.first_diverging = {"name": name, **worst.as_dict()}
        return self._rolled_back(entry, pass_, before, golden), before, None

    def _rolled_back(
        self, entry: PassReport, pass_: Pass, before: ir.Model, golden: GoldenSet | None
    ) -> PassReport:
        """Note the rollback and write a reproducer: the model before the pass, and its spec."""
        entry.nodes_after, entry.bytes_after = entry.nodes_before, entry.bytes_before
        logger.info("pass %s %s: %s (rolled back)", pass_.name, entry.status, entry.reason)
        if self.reproducer_dir is None:
            return entry
        stem = self.reproducer_dir / f"{self.reproducer_stem}.before-{pass_.name}"
        path = model_io.save(before, f"{stem}.onnx")
        words = ["onnxopt", "run", str(path), "-o", f"{stem}.out.onnx", "--passes", pass_.to_spec()]
        if golden is not None:
            words += ["--golden", str(golden.save(f"{stem}.golden"))]
        command = shlex.join(words)
        entry.reproducer = {"model": str(path), "spec": pass_.to_spec(), "command": command}
        return entry
