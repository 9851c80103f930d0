"""Mixed precision: int4 / int8 / fp16 / fp32 per weight, the smallest model within a budget."""

from __future__ import annotations

import dataclasses
import fnmatch
import logging
import math
import re
from typing import ClassVar, Literal

import numpy as np
import onnx_ir as ir

from onnxopt import golden as golden_mod
from onnxopt import ort_runner
from onnxopt.errors import VerificationError
from onnxopt.golden import GoldenSet
from onnxopt.metrics import Metrics, Tolerance, compare_all
from onnxopt.pass_api import PassResult
from onnxopt.passes._weight_quant import (
    WeightQuantPass,
    WeightSite,
    add_initializer,
    conv_to_int8,
    drop_if_unused,
    owner,
    to_matmul_nbits,
    weight_rows,
)
from onnxopt.passes.quant_int4 import QuantInt4Pass
from onnxopt.passes.quant_int8 import QuantInt8Pass
from onnxopt.quant import blocks
from onnxopt.registry import register_pass
from onnxopt.stats import add_count

logger = logging.getLogger(__name__)

PRECISIONS = ("int4", "int8", "fp16", "fp32")  # smallest first
DEFAULT_BUDGETS = {"cosine": 0.999, "snr": 30.0, "rel_l2": 0.03}
# preset=llama-cpp: weights whose node or weight name matches get int8 (regex, case-insensitive).
ATTENTION_V = r"v_proj|value|attn_v|to_v"
FFN_DOWN = r"down_proj|fc2|ffn_down|mlp[./]2\b|mlp[./]c_proj|(?<!attention)[./]output[./]dense"
MORE_BITS = re.compile(f"{ATTENTION_V}|{FFN_DOWN}", re.IGNORECASE)


@register_pass
class MixedPrecisionPass(WeightQuantPass):
    """Give each MatMul/Gemm weight int4, int8, fp16 or fp32: the smallest model within a budget.

    Conv weights (no 4-bit kernel exists) go to int8 per channel first, as in ``quant-int4``.

    Steps:
      1. Each weight's sensitivity: the golden outputs' error with that weight alone at the lowest
         candidate (one ORT run per weight; local proxies such as ``||A (W_q - W)||`` did not
         rank weights the same way, see docs/mixed-precision.md).
      2. Greedy: all weights start at the lowest candidate; the promotion (one weight one
         precision up) that removes the most estimated error per added byte goes first, until
         the estimate (calibrated by the last measured run) meets ``budget``; then a measured
         run decides whether to go on. Every measured run feeds the dequantized weights of a
         single ORT session (optimizations and pre-packing off).
      3. ``preset=llama-cpp``: no search; int8 for the first and last weights in graph order and
         for attention V and FFN down projections (``MORE_BITS`` on node names, weight names and
         the dynamo exporter's ``namespace`` metadata), int4 elsewhere.
      4. ``overrides`` (``glob=precision`` or ``glob:precision`` on node names) pin weights first.
      5. The chosen assignment is written (int4/int8: ``MatMulNBits``; fp16: a float16
         initializer behind a ``Cast`` to float32) and verified with a real ORT run.
    The golden set is ``self.golden`` (the pipeline sets it; ``needs_golden``); without one a
    random set is captured from the model as it stands.
    """

    name = "mixed-precision"
    supported_ops: ClassVar[tuple[str, ...]] = ("MatMul", "Gemm", "Conv")
    ops: list[str] = dataclasses.field(default_factory=lambda: ["MatMul", "Gemm", "Conv"])
    needs_golden: ClassVar[bool] = True
    golden: ClassVar[GoldenSet | None] = None  # set per instance before the pass runs
    budget: float | None = None
    metric: Literal["cosine", "snr", "rel_l2", "max_abs"] = "cosine"
    candidates: list[str] = dataclasses.field(default_factory=lambda: list(PRECISIONS))
    preset: Literal["none", "llama-cpp"] = "none"
    overrides: list[str] = dataclasses.field(default_factory=list)
    block: int = 32
    algo: Literal["rtn", "kquant"] = "kquant"
    accuracy_level: int = 4

    def __post_init__(self) -> None:
        super().__post_init__()
        unknown = [c for c in self.candidates if c not in PRECISIONS]
        if unknown or not self.candidates:
            raise ValueError(f"candidates must be among {', '.join(PRECISIONS)}, not {unknown}")
        self.candidates = [p for p in PRECISIONS if p in self.candidates]
        if self.budget is None and self.metric == "max_abs":
            raise ValueError("metric=max_abs needs a budget (the largest absolute error allowed)")
        if self.budget is not None and not _budget_ok(self.metric, self.budget):
            raise ValueError(f"budget {self.budget} is out of range for metric={self.metric}")
        self.pins()  # validate overrides now
        QuantInt4Pass(block=self.block, accuracy_level=self.accuracy_level)  # validates both

    @property
    def limit(self) -> float:
        return DEFAULT_BUDGETS[self.metric] if self.budget is None else self.budget

    def pins(self) -> list[tuple[str, str]]:
        """``overrides`` as ``(glob, precision)`` pairs."""
        pairs = []
        for item in self.overrides:
            glob, sep, precision = item.rpartition("=") if "=" in item else item.rpartition(":")
            if not sep or not glob or precision not in PRECISIONS:
                raise ValueError(
                    f"override {item!r} is not glob=precision ({'/'.join(PRECISIONS)})"
                )
            pairs.append((glob, precision))
        return pairs

    def call(self, model: ir.Model) -> PassResult:
        result = PassResult(model, False)
        targets = [t for t in self.find(model, result) if self._simulable(model, t, result)]
        convs = [t for t in targets if t.uses[0].rule == "conv"]
        targets = [t for t in targets if t.uses[0].rule != "conv"]
        if not targets and not convs:
            return result
        golden = golden_mod.capture(model) if self.golden is None else self.golden
        before = sum(t.weight.const_value.nbytes for t in targets + convs)
        conv_bytes = self._convs_to_int8(convs, result)
        search = Search(self, model, targets, golden)
        assignment = search.run()
        result.modified = bool(convs) or any(p != "fp32" for p in assignment)
        if any(p != "fp32" for p in assignment):
            self._rewrite(model, targets, assignment, search, result)
        metrics = _measure(ort_runner.run(model, golden.inputs), golden)
        value = metric_value(self.metric, metrics)
        met = self.meets(metrics)
        if not met and self.preset == "none":
            raise VerificationError(
                f"mixed-precision: the written model gives {self.metric} {value:.6g}, "
                f"short of the budget {self.limit} (the simulated search said it met it)"
            )
        after = conv_bytes + sum(search.bytes[i][p] for i, p in enumerate(assignment))
        chosen = {p: assignment.count(p) for p in PRECISIONS if p in assignment}
        if convs:
            chosen["int8"] = chosen.get("int8", 0) + len(convs)
        missed = "" if met else ", missed: preset"
        result.notes.append(
            f"{self.metric} {value:.6g} (budget {self.limit}{missed}) with "
            + ", ".join(f"{n} {p}" for p, n in chosen.items())
            + f"; weights {before / 2**20:.2f} MiB -> {after / 2**20:.2f} MiB "
            f"({after / max(before, 1):.3f}); {search.runs} ORT runs"
        )
        logger.info("%s: %s", self.name, result.notes[-1])
        return result

    def _convs_to_int8(self, convs: list[WeightSite], result: PassResult) -> int:
        """Conv weights (no 4-bit kernel) go to int8 per channel before the search."""
        total = 0
        for target in convs:
            nbytes, error = conv_to_int8(target, result.counts)
            result.layers.append({**self.record(target, nbytes, error), "precision": "int8"})
            drop_if_unused(target)
            total += nbytes
        return total

    def meets(self, metrics: Metrics) -> bool:
        return to_error(self.metric, metric_value(self.metric, metrics)) <= to_error(
            self.metric, self.limit
        )

    def _simulable(self, model: ir.Model, target: WeightSite, result: PassResult) -> bool:
        """Only main-graph initializers can be fed to the search's session."""
        weight = target.weight
        if weight.graph is model.graph and weight.is_initializer():
            return True
        add_count(result.counts, "skipped-subgraph", 1)
        result.misses.append(f"{weight.name}: not an initializer of the main graph")
        return False

    def _rewrite(
        self,
        model: ir.Model,
        targets: list[WeightSite],
        assignment: list[str],
        search: Search,
        result: PassResult,
    ) -> None:
        if any(p.startswith("int") for p in assignment):
            super().prepare(model, result)
        for index, (target, precision) in enumerate(zip(targets, assignment, strict=True)):
            quant = search.quantized(index, precision)
            nbytes = search.bytes[index][precision]
            if precision in ("int4", "int8"):
                to_matmul_nbits(target, quant, self.accuracy_level, result.counts)
            elif precision == "fp16" and target.weight.const_value.dtype == ir.DataType.FLOAT:
                to_fp16(target, result.counts)
            else:
                add_count(result.counts, f"kept-{precision}", 1)
            line = self.record(target, nbytes, search.rel_error(index, precision))
            line.update(
                precision=precision,
                format="matmulnbits" if precision.startswith("int") else "",
                sensitivity=search.sensitivity[index],
                output_error=search.alone(index, precision),
            )
            result.layers.append(line)
            drop_if_unused(target)


class Search:
    """Measures weights' effect on the golden outputs and picks a precision for each."""

    def __init__(
        self,
        pass_: MixedPrecisionPass,
        model: ir.Model,
        targets: list[WeightSite],
        golden: GoldenSet,
    ) -> None:
        self.pass_, self.model, self.targets, self.golden = pass_, model, targets, golden
        self.quantizers = {
            "int4": QuantInt4Pass(algo=pass_.algo, block=pass_.block),
            "int8": QuantInt8Pass(algo=pass_.algo, block=pass_.block),
        }
        self._cache: dict[tuple[int, str], blocks.Blockwise] = {}
        self.bytes = [{p: self._bytes(t, p) for p in PRECISIONS} for t in targets]
        self.sensitivity: list[float | None] = [None] * len(targets)
        self._alone: dict[tuple[int, str], float] = {}
        self.runs = 0
        self._session = _feedable(model, targets)

    def run(self) -> list[str]:
        """The assignment: one precision per target."""
        p = self.pass_
        pinned = self._pinned()
        if p.preset == "llama-cpp":
            assignment = [pinned.get(i, self._preset(i)) for i in range(len(self.targets))]
            self._sensitivities(assignment)
            return assignment
        top = [pinned.get(i, p.candidates[-1]) for i in range(len(self.targets))]
        metrics = self.measure(top)
        if not p.meets(metrics):
            raise VerificationError(
                f"mixed-precision: even {p.candidates[-1]} everywhere"
                f"{' outside the overrides' if pinned else ''} gives {p.metric} "
                f"{metric_value(p.metric, metrics):.6g}, short of the budget {p.limit}"
            )
        assignment = [pinned.get(i, p.candidates[0]) for i in range(len(self.targets))]
        errors = self._sensitivities(assignment)
        free = [i for i in range(len(self.targets)) if i not in pinned]
        limit = to_error(p.metric, p.limit)
        while True:
            measured = to_error(p.metric, metric_value(p.metric, self.measure(assignment)))
            if measured <= limit:
                return assignment
            estimate = sum(errors[i][q] for i, q in enumerate(assignment))
            scale = measured / estimate if estimate > 0 else 1.0
            if not self._promote(assignment, errors, free, limit / scale):
                raise VerificationError(  # only pinned weights are left to blame
                    f"mixed-precision: the overrides keep {p.metric} short of the budget {p.limit}"
                )

    def _promote(
        self, assignment: list[str], errors: list[dict[str, float]], free: list[int], goal: float
    ) -> int:
        """Promote (at least once) until the estimated error is within ``goal``; how many."""
        cands, steps = self.pass_.candidates, 0
        while steps == 0 or sum(errors[i][q] for i, q in enumerate(assignment)) > goal:
            step = self._best_promotion(assignment, errors, free)
            if step is None:
                break
            assignment[step] = cands[cands.index(assignment[step]) + 1]
            steps += 1
        return steps

    def _best_promotion(
        self, assignment: list[str], errors: list[dict[str, float]], free: list[int]
    ) -> int | None:
        """The free weight whose next precision removes the most error per added byte."""
        cands = self.pass_.candidates
        best, best_gain = None, -1.0
        for i in free:
            current = assignment[i]
            if current == cands[-1]:
                continue
            nxt = cands[cands.index(current) + 1]
            added = max(self.bytes[i][nxt] - self.bytes[i][current], 1)
            gain = (errors[i][current] - errors[i][nxt]) / added
            if gain > best_gain:
                best, best_gain = i, gain
        return best

    def _pinned(self) -> dict[int, str]:
        pins = self.pass_.pins()
        chosen = {}
        for i, target in enumerate(self.targets):
            names = [use.node.name or "" for use in target.uses] + [target.weight.name]
            for glob, precision in pins:
                if any(fnmatch.fnmatchcase(n, glob) for n in names):
                    chosen[i] = precision
        return chosen

    def _preset(self, index: int) -> str:
        target = self.targets[index]
        names = [use.node.name or "" for use in target.uses] + [target.weight.name]
        # torch.onnx's dynamo exporter names nodes node_linear_3; the module path is metadata.
        names += [use.node.metadata_props.get("namespace", "") for use in target.uses]
        first_or_last = index in (0, len(self.targets) - 1)
        return "int8" if first_or_last or any(MORE_BITS.search(n) for n in names) else "int4"

    def _sensitivities(self, assignment: list[str]) -> list[dict[str, float]]:
        """Each weight's estimated error (metric units turned additive) at each candidate.

        The lowest candidate is measured; the others scale by the squared ratio of
        the weights' relative errors (output noise power goes as weight noise power).
        """
        p = self.pass_
        lowest = p.candidates[0]
        errors = []
        for i in range(len(self.targets)):
            base = self.alone_error(i, lowest)
            self.sensitivity[i] = from_error(p.metric, base)
            low = self.rel_error(i, lowest) or 0.0
            power = 1 if p.metric == "max_abs" else 2
            errors.append(
                {
                    q: base * ((self.rel_error(i, q) or 0.0) / low) ** power if low > 0 else 0.0
                    for q in PRECISIONS
                }
            )
        return errors

    def alone_error(self, index: int, precision: str) -> float:
        """The error (additive units) with only this weight at ``precision``; measured once."""
        key = (index, precision)
        if key not in self._alone:
            if precision == "fp32":
                self._alone[key] = 0.0
            else:
                values = ["fp32"] * len(self.targets)
                values[index] = precision
                metrics = self.measure(values)
                self._alone[key] = to_error(
                    self.pass_.metric, metric_value(self.pass_.metric, metrics)
                )
        return self._alone[key]

    def alone(self, index: int, precision: str) -> float:
        """The metric (its own units) with only this weight at ``precision``."""
        return from_error(self.pass_.metric, self.alone_error(index, precision))

    def measure(self, assignment: list[str]) -> Metrics:
        """The golden comparison with each weight fed at its assigned precision."""
        feeds = {
            t.weight.name: self.weight_as_fed(i, p)
            for i, (t, p) in enumerate(zip(self.targets, assignment, strict=True))
            if p != "fp32"
        }
        outputs = [self._session.run({**case, **feeds}) for case in self.golden.inputs]
        self.runs += 1
        return _measure(outputs, self.golden)

    def weight_as_fed(self, index: int, precision: str) -> np.ndarray:
        """The weight as the model would compute with it, in its stored layout and type."""
        target = self.targets[index]
        tensor = target.weight.const_value
        if precision == "fp32":
            return tensor.numpy()
        if precision == "fp16":
            return tensor.numpy().astype(np.float16).astype(tensor.dtype.numpy())
        rows = self.quantized(index, precision).dequantize()
        return (rows if target.rows else rows.T).astype(tensor.dtype.numpy())

    def quantized(self, index: int, precision: str) -> blocks.Blockwise | None:
        """The blockwise codes of one weight at int4/int8 (quantized once), else None."""
        if precision not in self.quantizers:
            return None
        key = (index, precision)
        if key not in self._cache:
            self._cache[key] = self.quantizers[precision].quantize(weight_rows(self.targets[index]))
        return self._cache[key]

    def rel_error(self, index: int, precision: str) -> float | None:
        if precision == "fp32":
            return 0.0
        if precision == "fp16":
            w = self.targets[index].weight.const_value.numpy().astype(np.float32)
            norm = float(np.linalg.norm(w))
            return float(np.linalg.norm(w.astype(np.float16) - w)) / norm if norm else 0.0
        return self.quantized(index, precision).rel_error

    def _bytes(self, target: WeightSite, precision: str) -> int:
        tensor = target.weight.const_value
        if precision == "fp32" or (precision == "fp16" and tensor.dtype != ir.DataType.FLOAT):
            return tensor.nbytes
        if precision == "fp16":
            return tensor.size * 2
        n, k = tensor.shape[0 if target.rows else 1], tensor.shape[1 if target.rows else 0]
        kb = -(-k // self.pass_.block)
        bits = int(precision[3:])
        return n * kb * self.pass_.block * bits // 8 + n * kb * tensor.dtype.itemsize  # + scales


def _feedable(model: ir.Model, targets: list[WeightSite]) -> ort_runner.RunnableModel:
    """An ORT session of ``model`` whose target weights are also inputs (fed to override)."""
    clone = model.clone()
    clone.ir_version = max(clone.ir_version or 0, 4)
    for target in targets:
        clone.graph.inputs.append(clone.graph.initializers[target.weight.name])
    return ort_runner.RunnableModel(clone)


def to_fp16(target: WeightSite, counts: dict[str, int]) -> int:
    """Store the weight as float16; every use reads it through one ``Cast`` to float32."""
    graph = owner(target)
    array = target.weight.const_value.numpy().astype(np.float16)
    half = add_initializer(graph, f"{target.weight.name}_fp16", ir.tensor(array))
    cast = ir.node("Cast", [half], {"to": ir.DataType.FLOAT}, name=f"{target.weight.name}_cast")
    graph.insert_before(next(iter(graph)), cast)
    for use in target.uses:
        node, slot = (use.via, 0) if use.via is not None else (use.node, 1)
        node.replace_input_with(slot, cast.outputs[0])
        add_count(counts, "fp16", 1)
    return array.nbytes


def _measure(outputs: list[dict[str, np.ndarray]], golden: GoldenSet) -> Metrics:
    return compare_all(golden.outputs, outputs, Tolerance())


def metric_value(metric: str, metrics: Metrics) -> float:
    return {
        "cosine": metrics.cosine,
        "snr": metrics.snr_db,
        "rel_l2": metrics.rel_l2,
        "max_abs": metrics.max_abs,
    }[metric]


def to_error(metric: str, value: float) -> float:
    """A metric value as an error that adds roughly over independent weights (higher: worse)."""
    if metric == "cosine":
        return 1.0 - value
    if metric == "snr":
        return 0.0 if value == math.inf else 10 ** (-value / 10)
    if metric == "rel_l2":
        return value**2
    return value


def from_error(metric: str, error: float) -> float:
    """The inverse of :func:`to_error`."""
    if metric == "cosine":
        return 1.0 - error
    if metric == "snr":
        return math.inf if error <= 0 else -10 * math.log10(error)
    if metric == "rel_l2":
        return math.sqrt(max(error, 0.0))
    return error


def _budget_ok(metric: str, budget: float) -> bool:
    if metric == "cosine":
        return -1.0 < budget <= 1.0
    return budget >= 0 if metric != "snr" else math.isfinite(budget)
