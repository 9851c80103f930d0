"""Fold constant subexpressions into initializers, under a size cap."""

from __future__ import annotations

import onnx_ir as ir
from onnxscript.optimizer import fold_constants

from onnxopt.pass_api import Pass, PassResult
from onnxopt.registry import register_pass
from onnxopt.stats import op_histogram, removed_ops


@register_pass
class FoldConstantsPass(Pass):
    """Fold nodes whose inputs are all constant; never creates a tensor above the size cap.

    Rules (counted by the op type folded away):
      1. A node with constant inputs is evaluated and replaced by its value, unless the value has
         more than ``max_output_elements`` elements and would grow the model (so ConstantOfShape,
         Tile, Expand and Range never blow up into huge initializers).
      2. Nodes with an input larger than ``max_input_elements`` are left alone (Transpose of a
         weight used once is folded regardless, as it does not grow the model).
      3. Shape computations are resolved from static shapes where they are known.
      4. ``Constant`` nodes become initializers (``lift_constants``), which ONNX Runtime and
         the other passes treat alike, and which the graph no longer counts as nodes.
      5. Nodes left dead by folding are removed.
    """

    name = "fold-constants"
    kind = "exact"
    max_output_elements: int = 65536
    max_input_elements: int = 8192
    lift_constants: bool = True

    def __post_init__(self) -> None:
        if self.max_output_elements < 0 or self.max_input_elements < 0:
            raise ValueError("size caps must be >= 0")

    def call(self, model: ir.Model) -> PassResult:
        before = op_histogram(model)
        hidden = _hide_unsafe_nodes(model)
        try:
            result = fold_constants(
                model,
                input_size_limit=self.max_input_elements,
                output_size_limit=self.max_output_elements,
            )
        finally:
            for node in hidden:
                node.domain = ""
        if self.lift_constants and model.ir_version >= 4:  # before IR 4 initializers are inputs
            ir.passes.common.LiftConstantsToInitializersPass(lift_all_constants=True, size_limit=0)(
                model
            )
        ir.passes.common.RemoveUnusedNodesPass()(model)
        counts = removed_ops(before, op_histogram(model))
        return PassResult(model, result.modified or bool(counts), counts=counts)


# A domain without an opset import: onnxscript's folder skips such nodes before any rewrite.
_HIDDEN_DOMAIN = "onnxopt.hidden"


def _hide_unsafe_nodes(model: ir.Model) -> list[ir.Node]:
    """Move nodes whose onnxscript rewrite is wrong (onnxscript 0.7) out of the folder's sight.

    - CastLike with ``saturate``/``round_mode``: rewritten to a Cast without them.
    - SplitToSequence/ConcatFromSequence below opset 18: rewritten to Split/Squeeze/Unsqueeze
      forms of opset 13/18; SplitToSequence with a scalar split not yet constant: crashes.
    """
    opset = model.opset_imports.get("", 1)
    hidden = []
    for node in ir.traversal.RecursiveGraphIterator(model.graph):
        if node.domain != "":
            continue
        unsafe = False
        if node.op_type == "CastLike":
            unsafe = bool(set(node.attributes) & {"saturate", "round_mode"})
        elif node.op_type in ("SplitToSequence", "ConcatFromSequence"):
            split = node.inputs[1] if len(node.inputs) > 1 else None
            scalar_split = (
                split is not None
                and split.const_value is None
                and split.shape is not None
                and split.shape.rank() == 0
            )
            unsafe = opset < 18 or scalar_split
        if unsafe:
            node.domain = _HIDDEN_DOMAIN
            hidden.append(node)
    return hidden
