"""What a target cannot run in a model: op by op, with the reason and whether lower fixes it."""

from __future__ import annotations

import dataclasses
from collections import Counter

import onnx_ir as ir

from onnxopt.targets import Target, node_opset
from onnxopt.targets.decompositions import decompositions


@dataclasses.dataclass
class Finding:
    """One unsupported op type, with how many nodes have it."""

    domain: str
    op_type: str
    count: int
    reason: str
    fix: str  # "decompose", "convert-opset" or "" (nothing onnxopt can do)

    @property
    def op(self) -> str:
        return f"{self.domain}::{self.op_type}" if self.domain else self.op_type


def unsupported(model: ir.Model, target: Target) -> list[Finding]:
    """What ``target`` cannot run as it is: the model's opset, then op types (subgraphs too).

    When the target does not load the model's standard opset, ops are judged at the target's
    opset (where ``lower`` converts the model), and the opset itself is the first finding.
    """
    findings = []
    model_opset = model.opset_imports.get("", 1)
    convert = not target.accepts_opset(model_opset)
    if convert:
        reason = f"{target.name} does not load standard opset {model_opset}"
        findings.append(Finding("", f"opset {model_opset}", 1, reason, "convert-opset"))
    counts: Counter[tuple[str, str]] = Counter()
    reasons: dict[tuple[str, str], tuple[str, str]] = {}
    for node in model.graph.all_nodes():
        domain = "" if node.domain == "ai.onnx" else node.domain
        opset = target.opset if convert and domain == "" else node_opset(model, node)
        if target.supports(domain, node.op_type, opset):
            continue
        counts[(domain, node.op_type)] += 1
        reasons.setdefault((domain, node.op_type), _why(node, target, opset))
    findings += [Finding(d, op, counts[(d, op)], *reasons[(d, op)]) for d, op in sorted(counts)]
    return findings


def _why(node: ir.Node, target: Target, opset: int) -> tuple[str, str]:
    if node.domain not in ("", "ai.onnx"):
        reason = f"{target.name} has no {node.domain} operator {node.op_type}"
    else:
        reason = f"{target.name} has no {node.op_type} at opset {opset}"
    options = decompositions(node.domain, node.op_type)
    return reason, "decompose" if options else ""
