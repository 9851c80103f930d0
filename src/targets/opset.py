"""Convert a model's standard opset, with our own adapters where onnx's converter has none.

onnx's converter refuses a whole model when one op lacks an adapter, even an op whose newer
version only added an attribute or input the node does not use (Shape-15's ``start``/``end``,
say). Such a node means the same at the older opset, so after onnx's converter gives up we move
those nodes ourselves, and name the first node that really needs an adapter we do not have.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator

import numpy as np
import onnx
import onnx_ir as ir
from onnxscript.version_converter import ConvertVersionPass

# Ops whose attribute values gained meanings without a new attribute name: same signature,
# different semantics. The predicate says whether this node is safe to move down.
_VALUE_CHANGES: dict[str, Callable[[ir.Node], bool]] = {
    "Pad": lambda n: n.attributes.get_string("mode", "constant") != "wrap",
    "Resize": lambda n: (
        n.attributes.get_string("coordinate_transformation_mode", "") != "half_pixel_symmetric"
    ),
    "GridSample": lambda n: False,
}


def convert_opset(model: ir.Model, opset: int) -> str | None:
    """Move the standard domain to ``opset``; returns why it could not (None when it did)."""
    if model.opset_imports.get("", 1) == opset:
        return None
    with _quiet("onnxscript.version_converter"):
        ConvertVersionPass(target_version=opset, fallback=True)(model)
    if model.opset_imports.get("", 1) == opset:
        _drop_default_attributes_unknown_at(model, opset)
        return None
    return _move_compatible_nodes(model, opset)


def _drop_default_attributes_unknown_at(model: ir.Model, opset: int) -> None:
    """Attributes newer than ``opset`` that hold their default go (a converter may keep them:
    onnxscript leaves ``noop_with_empty_axes=0`` on a ReduceMean moved below 18)."""
    for node in model.graph.all_nodes():
        if node.domain not in ("", "ai.onnx") or not onnx.defs.has(node.op_type, opset, ""):
            continue
        declared = onnx.defs.get_schema(node.op_type, opset, "").attributes
        newest = onnx.defs.get_schema(node.op_type, "")
        for name in [n for n in node.attributes if n not in declared]:
            if _is_default(node.attributes[name], newest):
                del node.attributes[name]


def _move_compatible_nodes(model: ir.Model, opset: int) -> str | None:
    current = model.opset_imports.get("", 1)
    adapters = []
    for node in model.graph.all_nodes():
        if node.domain not in ("", "ai.onnx"):
            continue
        if _is_reduce_with_axes_input(node, current, opset):
            problem = None if node.inputs[1].const_value is not None else "axes are not constant"
            adapters.append((node, _axes_input_to_attribute))
        elif _is_shape_with_bounds(node, current, opset):
            problem = None
            adapters.append((node, _shape_bounds_to_slice))
        else:
            problem = _incompatibility(node, current, opset)
        if problem:
            return f"node '{node.name}' ({node.op_type}): {problem}"
    for node, adapt in adapters:
        adapt(node)
    for node in model.graph.all_nodes():
        if node.domain in ("", "ai.onnx"):
            _drop_attributes_unknown_at(node, opset)
    model.opset_imports[""] = opset
    for function in model.functions.values():
        if "" in function.opset_imports:
            function.opset_imports[""] = opset
    return None


_REDUCE_AXES_MOVED_AT_18 = frozenset(
    {
        "ReduceL1",
        "ReduceL2",
        "ReduceLogSum",
        "ReduceLogSumExp",
        "ReduceMax",
        "ReduceMean",
        "ReduceMin",
        "ReduceProd",
        "ReduceSumSquare",
    }
)


def _is_reduce_with_axes_input(node: ir.Node, current: int, opset: int) -> bool:
    """Reductions whose axes became an input at opset 18, going below 18 with axes given."""
    return (
        node.op_type in _REDUCE_AXES_MOVED_AT_18
        and current >= 18 > opset
        and len(node.inputs) > 1
        and node.inputs[1] is not None
        and not node.attributes.get_int("noop_with_empty_axes", 0)
    )


def _axes_input_to_attribute(node: ir.Node) -> None:
    """Reduce-18 ``axes`` input -> Reduce-13 ``axes`` attribute (the input is constant)."""
    axes = node.inputs[1].const_value.numpy().reshape(-1).tolist()
    node.resize_inputs(1)
    node.attributes["axes"] = ir.AttrInt64s("axes", [int(a) for a in axes])


def _incompatibility(node: ir.Node, current: int, opset: int) -> str | None:
    try:
        new = onnx.defs.get_schema(node.op_type, current, "")
        old = onnx.defs.get_schema(node.op_type, opset, "")
    except onnx.defs.SchemaError:
        return f"does not exist at opset {opset}"
    if new.since_version == old.since_version:
        return None
    if old.deprecated:
        return f"is deprecated at opset {opset}"
    used_inputs = max((i + 1 for i, v in enumerate(node.inputs) if v is not None), default=0)
    variadic = (
        old.inputs and old.inputs[-1].option == onnx.defs.OpSchema.FormalParameterOption.Variadic
    )
    if not variadic and used_inputs > len(old.inputs):
        return f"uses input {used_inputs} that opset {opset} does not have"
    if [i.name for i in new.inputs[:used_inputs]] != [i.name for i in old.inputs[:used_inputs]]:
        return f"its inputs changed meaning between opset {opset} and {current}"
    extra = sorted(
        name
        for name in set(node.attributes) - set(old.attributes)
        if not _is_default(node.attributes[name], new) and not _is_moot(node, name)
    )
    if extra:
        return f"uses attribute(s) {', '.join(extra)} that opset {opset} does not have"
    safe = _VALUE_CHANGES.get(node.op_type)
    if safe is not None and not safe(node):
        return f"uses a mode that opset {opset} does not have"
    return None


def _is_shape_with_bounds(node: ir.Node, current: int, opset: int) -> bool:
    """Shape-15's start/end attributes, going below 15."""
    bounded = "start" in node.attributes or "end" in node.attributes
    return node.op_type == "Shape" and current >= 15 > opset and bounded


def _shape_bounds_to_slice(node: ir.Node) -> None:
    """Shape(x, start, end) -> Slice(Shape(x), [start], [end]) (Slice-13 clamps the bounds)."""
    start = node.attributes.get_int("start", 0)
    end = node.attributes.get_int("end", np.iinfo(np.int64).max)
    bounds = [
        ir.node("Constant", [], attributes={"value": ir.tensor(np.array([v], np.int64))})
        for v in (start, end)
    ]
    shape = ir.node("Shape", [node.inputs[0]], name=f"{node.name}.full")
    sliced = ir.node("Slice", [shape.outputs[0], bounds[0].outputs[0], bounds[1].outputs[0]])
    sliced.name = node.name
    ir.convenience.replace_nodes_and_values(
        node.graph, node, [node], [*bounds, shape, sliced], [node.outputs[0]], [sliced.outputs[0]]
    )


def _is_default(attr: ir.Attr, schema: onnx.defs.OpSchema) -> bool:
    """Whether a node attribute holds the schema's default (the behaviour before it existed)."""
    declared = schema.attributes.get(attr.name)
    if declared is None or not declared.default_value.name:
        return False
    value = onnx.helper.get_attribute_value(ir.serde.serialize_attribute(attr))
    return value == onnx.helper.get_attribute_value(declared.default_value)


def _is_moot(node: ir.Node, attribute: str) -> bool:
    """An attribute the older op does not need to mean the same thing.

    Reshape's ``allowzero`` only matters when the constant target shape holds a 0; Split-18's
    ``num_outputs`` says what Split-13 does without it (equal parts, one per output) when the
    split axis has a static size those outputs divide evenly.
    """
    if node.op_type == "Reshape" and attribute == "allowzero":
        shape = node.inputs[1].const_value if len(node.inputs) > 1 and node.inputs[1] else None
        return shape is not None and 0 not in shape.numpy().tolist()
    if node.op_type == "Split" and attribute == "num_outputs":
        parts, data = node.attributes.get_int("num_outputs"), node.inputs[0]
        if parts != len(node.outputs) or (len(node.inputs) > 1 and node.inputs[1] is not None):
            return False
        if data is None or data.shape is None:
            return False
        size = data.shape[node.attributes.get_int("axis", 0)]
        return isinstance(size, int) and size % parts == 0
    return False


def _drop_attributes_unknown_at(node: ir.Node, opset: int) -> None:
    """Remove attributes the op's schema at ``opset`` does not declare (checked: defaults)."""
    declared = onnx.defs.get_schema(node.op_type, opset, "").attributes
    for name in [n for n in node.attributes if n not in declared]:
        del node.attributes[name]


@contextlib.contextmanager
def _quiet(logger_name: str) -> Iterator[None]:
    """Silence a library's warnings (its fallback's traceback) for the duration."""
    logger = logging.getLogger(logger_name)
    level = logger.level
    logger.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        logger.setLevel(level)
