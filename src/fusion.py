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

    def rule_set(self) -> pattern.RewriteRuleSet:
        return pattern.RewriteRuleSet(list(self.rules), commute=self.commute)


def can_emit(model: ir.Model, target: Target, domain: str, op_type: str) -> bool:
    """Whether a new ``domain::op_type`` node is valid in the model and runs on the target."""
    opset = model.opset_imports.get(domain, 1)
    if domain == "" and not onnx.defs.has(op_type, opset, ""):
        return False  # not in the model's standard opset: the checker (and runtimes) reject it
    return target.supports(domain, op_type, opset)


class FusionPass(Pass):
    """Base of the fusion passes; a subclass implements ``fusions(target)``."""

    kind = "exact"
    target: str = "ort-cpu"

    def __post_init__(self) -> None:
        load_target(self.target)  # an unknown target fails when the pipeline is built

    def fusions(self, target: Target) -> list[Fusion]:  # pragma: no cover - abstract
        raise NotImplementedError

    def call(self, model: ir.Model) -> PassResult:
        target = load_target(self.target)
        counts: dict[str, int] = {}
        notes: list[str] = []
        misses: list[str] = []
        chosen: dict[str, Fusion | None] = {}
        for fusion in self.fusions(target):
            if chosen.get(fusion.name) is not None:
                continue  # a better alternative was applied
            if fusion.anchors and not _has_op(model, fusion.anchors):
                continue
            lacking = [
                f"{d}::{op}" if d else op
                for d, op in fusion.creates
                if not can_emit(model, target, d, op)
            ]
            if lacking:
                chosen.setdefault(fusion.name, None)
                continue
            chosen[fusion.name] = fusion
            fired = fusion.rule_set().apply_to_model(model)
            if fired:
                for domain, _ in fusion.creates:
                    model.opset_imports.setdefault(domain, 1)
                add_count(counts, fusion.name, fired)
            else:
                misses += near_misses(model, fusion)
        for name, fusion in chosen.items():
            if fusion is None:
                notes.append(f"{name}: skipped, {target.name} cannot run what it would create")
        return PassResult(model, bool(counts), counts=counts, notes=notes, misses=misses)


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
