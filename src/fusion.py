"""What the ``fuse-*`` passes share: target-aware rules, counted firings, explained misses.

A fusion pass lists :class:`Fusion` entries in the order they should run. Entries that share a
``name`` are alternatives, best first (say, ``com.microsoft::Gelu`` for ORT, then ``Gelu-20``):
the first whose created ops the target runs at the model's opset is applied, the others never.
A fusion that fired zero times is traced once more (read-only) and its nearest miss, with the
reason its ``check`` gave, goes into the result's ``misses``: why something stayed unfused.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import onnx
import onnx_ir as ir
from onnxscript.rewriter import pattern
from onnxscript.rewriter._basics import MatchingTracer, MatchStatus

from onnxopt.pass_api import Pass, PassResult
from onnxopt.stats import add_count
from onnxopt.targets import Target, load_target

_NEAR_MISS_NODES = 2  # a traced match must get this far (or reach ``check``) to be reported


@dataclasses.dataclass(frozen=True)
class Fusion:
    """A named rewrite: its onnxscript rules and the ops (domain, op type) they create.

    ``anchors``: op types of which the graph must hold at least one for the rules to be tried
    (say ``Erf`` for the exact GELU); empty means always try.
    """

    name: str
    rules: Sequence[pattern.RewriteRule]
    creates: Sequence[tuple[str, str]]
    commute: bool = False
    anchors: Sequence[str] = ()
    hint: str = ""
    """Appended to the note when the fusion is skipped (what to do instead)."""

    def rule_set(self) -> pattern.RewriteRuleSet:
        return pattern.RewriteRuleSet(list(self.rules), commute=self.commute)


def can_emit(model: ir.Model, target: Target, domain: str, op_type: str) -> bool:
    """Whether a new ``domain::op_type`` node is valid in the model and runs on the target."""
    return _why_not(model, target, domain, op_type) is None


def _why_not(model: ir.Model, target: Target, domain: str, op_type: str) -> str | None:
    opset = model.opset_imports.get(domain, 1)
    if domain == "" and not onnx.defs.has(op_type, opset, ""):
        # not in the model's standard opset: the checker (and runtimes) reject it
        if not onnx.defs.has(op_type):
            return f"{op_type} is not a standard ONNX operator"
        newest = onnx.defs.onnx_opset_version()
        since = next((v for v in range(opset + 1, newest + 1) if onnx.defs.has(op_type, v, "")), 0)
        if not since:
            return f"{op_type} is not in standard opset {opset}"
        return f"{op_type} needs opset {since} and the model imports {opset}"
    if not target.supports(domain, op_type, opset):
        return f"{target.name} cannot run {domain + '::' if domain else ''}{op_type}"
    return None


class FusionPass(Pass):
    """Base of the fusion passes; a subclass implements ``fusions(target)``."""

    kind = "exact"
    target: str = "ort-cpu"

    def __post_init__(self) -> None:
        load_target(self.target)  # an unknown target fails when the pipeline is built

    def fusions(self, target: Target) -> list[Fusion]:  # pragma: no cover - abstract
        raise NotImplementedError

    def after_fusions(self, model: ir.Model) -> None:
        """Called once after fusions fired, before unused nodes go; subclasses may rewire."""

    def call(self, model: ir.Model) -> PassResult:
        """Apply each fusion's best runnable alternative; note skips, trace misses, clean up."""
        target = load_target(self.target)
        _ensure_types(model)
        counts: dict[str, int] = {}
        notes: list[str] = []
        misses: list[str] = []
        chosen: dict[str, Fusion | None] = {}
        skipped: dict[str, str] = {}
        for fusion in self.fusions(target):
            if chosen.get(fusion.name) is not None:
                continue  # a better alternative was applied
            if fusion.anchors and not _has_op(model, fusion.anchors):
                continue
            reasons = [_why_not(model, target, d, op) for d, op in fusion.creates]
            lacking = [r for r in reasons if r]
            if lacking:
                chosen.setdefault(fusion.name, None)
                skipped.setdefault(fusion.name, lacking[0] + fusion.hint)
                continue
            chosen[fusion.name] = fusion
            fired = fusion.rule_set().apply_to_model(model)
            if fired:
                for domain, _ in fusion.creates:
                    model.opset_imports.setdefault(domain, 1)
                add_count(counts, fusion.name, fired)
            else:
                misses += near_misses(model, fusion)
        notes += [f"{name}: skipped, {skipped[name]}" for name, f in chosen.items() if f is None]
        if counts:
            self.after_fusions(model)
            ir.passes.common.RemoveUnusedNodesPass()(model)  # what fed only the fused nodes
        return PassResult(model, bool(counts), counts=counts, notes=notes, misses=misses)


def _ensure_types(model: ir.Model) -> None:
    """Infer types and shapes when some node output lacks a type (rule checks read them)."""
    if any(v.type is None for node in model.graph.all_nodes() for v in node.outputs):
        from onnxopt.passes.infer_shapes import InferShapesPass

        InferShapesPass()(model)


def _has_op(model: ir.Model, op_types: Sequence[str]) -> bool:
    wanted = set(op_types)
    return any(node.op_type in wanted for node in model.graph.all_nodes())


def near_misses(model: ir.Model, fusion: Fusion) -> list[str]:
    """For a fusion that never fired: the best partial match of each rule, and why it failed.

    Misses that reached a rule's ``check`` (the pattern matched, a condition did not hold) are
    preferred over partial pattern matches; each distinct (node, reason) is reported once,
    however many commuted copies of a rule reached it.
    """
    tracer = MatchingTracer()
    fusion.rule_set().apply_to_model(model, tracer=tracer)
    found: dict[tuple[str, str], tuple[bool, str]] = {}
    for rule, matches in tracer.best_matches_map.items():
        misses = [m for m in matches if m.status != MatchStatus.SUCCESS]
        if not misses:
            continue
        best = misses[0]
        reached_check = best.status == MatchStatus.CONDITION_FAILED
        if not reached_check and len(best.match_result.nodes) < _NEAR_MISS_NODES:
            continue
        reason = " ".join((best.match_result.reason or "the pattern did not match").split())
        where = f"node '{best.root_node.name}' ({best.root_node.op_type})"
        label = fusion.name if len(fusion.rules) == 1 else f"{fusion.name}/{rule.name or '?'}"
        found.setdefault(
            (where, reason), (reached_check, f"{label}: not fused at {where}: {reason}")
        )
    if any(checked for checked, _ in found.values()):
        return [text for checked, text in found.values() if checked]
    return [text for _, text in found.values()]
