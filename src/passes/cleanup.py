"""Remove what computes nothing: dead nodes and initializers, Identity, duplicates."""

from __future__ import annotations

import onnx_ir as ir
from onnx_ir.passes import common

from onnxopt.pass_api import Pass, PassResult
from onnxopt.registry import register_pass
from onnxopt.stats import initializer_count, node_count


@register_pass
class CleanupPass(Pass):
    """Remove Identity nodes, common subexpressions, duplicate and unused initializers, dead nodes.

    Rules (each counted by the nodes or initializers it removed):
      1. ``identity``: Identity nodes are bypassed (graph outputs keep their names).
      2. ``dedup-initializers``: initializers with equal dtype, shape and bytes are merged; only
         those up to ``dedup_max_elements`` are compared, so large weights are never read.
      3. ``cse``: nodes computing the same op on the same inputs are merged.
      4. ``dead-nodes`` / ``unused-initializers``: whatever no output depends on is removed,
         then unused functions and opset imports.
    """

    name = "cleanup"
    kind = "exact"
    dedup_max_elements: int = 1 << 20

    def call(self, model: ir.Model) -> PassResult:
        counts: dict[str, int] = {}
        modified = False
        output_types = [(v.type, v.shape) for v in model.graph.outputs]
        steps = [
            ("identity", _IdentityElimination()),
            ("dedup-initializers", common.DeduplicateInitializersPass(self.dedup_max_elements)),
            ("cse", common.CommonSubexpressionEliminationPass()),
            ("dead-nodes", common.RemoveUnusedNodesPass()),
            ("unused-functions", common.RemoveUnusedFunctionsPass()),
            ("unused-opsets", common.RemoveUnusedOpsetsPass()),
        ]
        for rule, step in steps:
            nodes, inits = node_count(model), initializer_count(model)
            result = step(model)
            modified |= result.modified
            removed_nodes = nodes - node_count(model)
            removed_inits = inits - initializer_count(model)
            if rule == "dead-nodes":
                _add(counts, "dead-nodes", removed_nodes)
                _add(counts, "unused-initializers", removed_inits)
            elif rule == "dedup-initializers":
                _add(counts, rule, removed_inits)
            elif rule.startswith("unused-"):
                _add(counts, rule, int(result.modified))
            else:
                _add(counts, rule, removed_nodes)
        for value, (type_, shape) in zip(model.graph.outputs, output_types, strict=True):
            # Bypassing an Identity makes its input the graph output: keep the declared type.
            value.type = value.type or type_
            value.shape = value.shape or shape
        return PassResult(model, modified, counts=counts)


class _IdentityElimination(common.IdentityEliminationPass):
    """onnx-ir's Identity elimination, minus the cases where it breaks a graph's outputs.

    ``y = Identity(x)`` with ``y`` a graph output is kept when ``x`` is also an output of that
    graph (bypassing it would list one value twice and rename an output) or comes from an
    outer graph (onnx-ir raises: the value already belongs to another graph).
    """

    def _try_eliminate_identity_node(self, node: ir.Node) -> bool:
        if node.op_type == "Identity" and node.domain == "" and len(node.inputs) == 1:
            source, output = node.inputs[0], node.outputs[0]
            if (
                source is not None
                and output.is_graph_output()
                and (source.is_graph_output() or source.graph is not node.graph)
            ):
                return False
        return super()._try_eliminate_identity_node(node)


def _add(counts: dict[str, int], rule: str, n: int) -> None:
    if n > 0:
        counts[rule] = counts.get(rule, 0) + n
