"""Remove what computes nothing: dead nodes and initializers, Identity, duplicates."""

from __future__ import annotations

from typing import NamedTuple

import onnx_ir as ir
from onnx_ir.passes import common

from onnxopt.pass_api import Pass, PassResult
from onnxopt.registry import register_pass
from onnxopt.stats import add_count, initializer_count, op_histogram


@register_pass
class CleanupPass(Pass):
    """Remove inference Dropout, Identity, duplicate initializers, common subexpressions, dead code.

    Rules (each counted by the nodes or initializers it removed):
      0. ``dropout``: Dropout outside training (no ``training_mode``, or a constant false; mask
         unused; opset 7+) is the identity and becomes an Identity node, removed by rule 1.
      1. ``identity``: Identity nodes are bypassed (graph outputs keep their names).
      2. ``dedup-initializers``: initializers with equal dtype, shape and bytes are merged; only
         those up to ``dedup_max_elements`` are compared, so large weights are never read.
      3. ``same-shape``: ``Shape`` of a value whose inferred shape (constants and symbolic dims;
         shape inference names a dim alike only when it knows the dims are equal) equals that of
         a value read earlier reuses that read, so the shape arithmetic after it merges too.
      4. ``cse``: nodes computing the same op on the same inputs are merged.
      5. ``dead-nodes`` / ``unused-initializers``: whatever no output depends on is removed,
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
            ("dropout", _InferenceDropoutToIdentity()),
            ("identity", _IdentityElimination()),
            ("dedup-initializers", common.DeduplicateInitializersPass(self.dedup_max_elements)),
            ("same-shape", _ShareShapeReads()),
            ("cse", common.CommonSubexpressionEliminationPass()),
            ("dead-nodes", common.RemoveUnusedNodesPass()),
            ("unused-functions", common.RemoveUnusedFunctionsPass()),
            ("unused-opsets", common.RemoveUnusedOpsetsPass()),
        ]
        for rule, step in steps:
            before = _sizes(model)
            modified |= step(model).modified
            after = _sizes(model)
            if rule == "dead-nodes":
                add_count(counts, "dead-nodes", before.nodes - after.nodes)
                add_count(counts, "unused-initializers", before.initializers - after.initializers)
            elif rule == "dedup-initializers":
                add_count(counts, rule, before.initializers - after.initializers)
            elif rule == "dropout":
                add_count(counts, rule, before.dropouts - after.dropouts)
            elif rule.startswith("unused-"):
                add_count(counts, rule, int(before != after))
            else:
                add_count(counts, rule, before.nodes - after.nodes)
        for value, (type_, shape) in zip(model.graph.outputs, output_types, strict=True):
            # Bypassing an Identity makes its input the graph output: keep the declared type.
            value.type = value.type or type_
            value.shape = value.shape or shape
        return PassResult(model, modified, counts=counts)


class _ShareShapeReads(ir.passes.InPlacePass):
    """Shape(b) -> Shape(a) when a and b have the same fully known (symbolic) shape."""

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        modified = False
        for graph in (model.graph, *model.graph.subgraphs()):
            first: dict[tuple, ir.Value] = {}
            for node in list(graph):
                key = _shape_key(node)
                if key is None:
                    continue
                if key not in first:
                    first[key] = node.outputs[0]
                    continue
                if node.outputs[0].is_graph_output():
                    continue
                ir.convenience.replace_all_uses_with(node.outputs[0], first[key])
                graph.remove(node, safe=True)
                modified = True
        return ir.passes.PassResult(model, modified)


def _shape_key(node: ir.Node) -> tuple | None:
    """What a Shape node reads, when it is fully known: dims and start/end."""
    if node.op_type != "Shape" or node.domain not in ("", "ai.onnx") or node.inputs[0] is None:
        return None
    shape = node.inputs[0].shape
    if shape is None or any(isinstance(d, ir.SymbolicDim) and not d.value for d in shape):
        return None
    dims = tuple(d if isinstance(d, int) else f"sym:{d.value}" for d in shape)
    bounds = (node.attributes.get_int("start", 0), node.attributes.get_int("end", len(dims)))
    return dims, bounds


class _InferenceDropoutToIdentity(ir.passes.InPlacePass):
    """Replace inference-mode Dropout nodes by Identity nodes."""

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        if model.opset_imports.get("", 1) < 7:  # before opset 7 Dropout had an is_test attribute
            return ir.passes.PassResult(model, False)
        dropouts = [
            node
            for node in ir.traversal.RecursiveGraphIterator(model.graph)
            if node.op_type == "Dropout" and node.domain in ("", "ai.onnx") and _is_inference(node)
        ]
        for node in dropouts:
            identity = ir.node("Identity", [node.inputs[0]], name=node.name)
            ir.convenience.replace_nodes_and_values(
                node.graph, node, [node], [identity], [node.outputs[0]], [identity.outputs[0]]
            )
        return ir.passes.PassResult(model, bool(dropouts))


def _is_inference(node: ir.Node) -> bool:
    mask = node.outputs[1] if len(node.outputs) > 1 else None
    if mask is not None and (mask.uses() or mask.is_graph_output()):
        return False
    training = node.inputs[2] if len(node.inputs) > 2 else None
    if training is None:
        return True
    value = training.const_value
    return value is not None and not bool(value.numpy().any())


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


class _Sizes(NamedTuple):
    nodes: int
    initializers: int
    dropouts: int
    functions: int
    opsets: int


def _sizes(model: ir.Model) -> _Sizes:
    ops = op_histogram(model)
    return _Sizes(
        sum(ops.values()),
        initializer_count(model),
        ops["Dropout"],
        len(model.functions),
        len(model.opset_imports),
    )
