"""Lower a model to a target: decompose the ops it lacks and convert the standard opset."""

from __future__ import annotations

import onnx_ir as ir
from onnxscript.optimizer import fold_constants

from onnxopt.pass_api import Pass, PassResult
from onnxopt.passes.infer_shapes import InferShapesPass
from onnxopt.registry import register_pass
from onnxopt.stats import add_count
from onnxopt.targets import Target, load_target, node_opset
from onnxopt.targets import decompositions as decomp
from onnxopt.targets.check import unsupported
from onnxopt.targets.opset import convert_opset

_ROUNDS = 3  # a decomposition may use ops that need decomposing in turn


@register_pass
class LowerPass(Pass):
    """Replace ops the target lacks with equivalent standard ops; convert to its opset.

    Rules (counted per replaced op type, plus ``CastLike`` and ``opset``):
      1. A node the target cannot run (judged at the opset the model will end at) is replaced by a
         registered decomposition whose ops the target runs; calls are inlined.
      2. ``CastLike`` (opset 15) becomes ``Cast`` where the target lacks it and the type is known.
      3. The standard opset is converted (up or down) when the target does not load it, with
         onnxscript's version converter, falling back to onnx's.
      4. Constant subgraphs the decompositions created (weight unpacking, DFT bases, axes) are
         folded, up to ``max_folded_elements`` per tensor (MatMulNBits becomes a MatMul with
         fp32 weights); nodes that were in the model before are left to ``fold-constants``.
    What is still unsupported afterwards is listed in the notes.
    """

    name = "lower"
    kind = "exact"
    target: str = "onnx-17"
    max_folded_elements: int = 1 << 26

    def __post_init__(self) -> None:
        load_target(self.target)  # unknown targets fail when the pipeline is built

    def call(self, model: ir.Model) -> PassResult:
        target = load_target(self.target)
        end_opset = _end_opset(model, target)
        counts: dict[str, int] = {}
        original = set(model.graph.all_nodes())
        InferShapesPass()(model)  # decompositions choose their variant by rank and dtype
        for _ in range(_ROUNDS):
            replaced = _decompose(model, target, end_opset, counts)
            if not replaced:
                break
            decomp.inline_calls(model)
        if not target.supports("", "CastLike", end_opset):
            InferShapesPass()(model)  # the inlined bodies are not annotated yet
            add_count(counts, "CastLike", _castlike_to_cast(model))
        if counts:
            limit = self.max_folded_elements
            fold_constants(  # only what lower created (the folder's own rewrites count as such)
                model,
                input_size_limit=limit,
                output_size_limit=limit,
                should_fold=lambda node: node not in original,
            )
            ir.passes.common.RemoveUnusedNodesPass()(model)
        notes = []
        if model.opset_imports.get("", 1) != end_opset:
            problem = convert_opset(model, end_opset)
            if problem:
                notes.append(f"opset not converted to {end_opset}: {problem}")
            else:
                counts["opset"] = 1
        notes += [
            f"{target.name} cannot run {f.op} (x{f.count}): {f.reason}"
            for f in unsupported(model, target)
        ]
        return PassResult(model, bool(counts), counts=counts, notes=notes)


def _end_opset(model: ir.Model, target: Target) -> int:
    opset = model.opset_imports.get("", 1)
    return opset if target.accepts_opset(opset) else target.opset


def _decompose(model: ir.Model, target: Target, end_opset: int, counts: dict[str, int]) -> int:
    """Swap each node the target lacks for a decomposition it can run; return how many."""
    replaced = 0
    model_opset = model.opset_imports.get("", 1)
    for node in list(model.graph.all_nodes()):
        domain = "" if node.domain == "ai.onnx" else node.domain
        opset = end_opset if domain == "" else node_opset(model, node)
        if target.supports(domain, node.op_type, opset):
            continue
        for option in decomp.decompositions(domain, node.op_type):
            runnable = all(
                op == "CastLike" or target.supports(d, op, end_opset) for d, op in option.produces
            )
            if runnable and option.reason_not_applicable(node, model_opset) is None:
                decomp.replace(model, node, option)
                add_count(counts, node.op_type, 1)
                replaced += 1
                break
    return replaced


def _castlike_to_cast(model: ir.Model) -> int:
    """CastLike(x, like) -> Cast(x, to=like's dtype), where that dtype is known."""
    count = 0
    for node in list(model.graph.all_nodes()):
        if node.op_type != "CastLike" or node.domain not in ("", "ai.onnx"):
            continue
        dtype = node.inputs[1].dtype if node.inputs[1] is not None else None
        if dtype is None:
            continue
        cast = ir.node("Cast", [node.inputs[0]], attributes={"to": dtype}, name=node.name)
        ir.convenience.replace_nodes_and_values(
            node.graph, node, [node], [cast], [node.outputs[0]], [cast.outputs[0]]
        )
        count += 1
    return count
