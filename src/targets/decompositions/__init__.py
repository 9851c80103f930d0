"""Decompositions: onnxscript functions computing an op with simpler standard ONNX ops.

A decomposition is registered for one ``(domain, op_type)``; ``replace`` swaps a node for a call
to the function, and ``inline_calls`` inlines every such call at the model's opset. Functions are
written with opset-13 ops whose semantics did not change up to opset 23 (``ReduceSum`` with an
``axes`` input, not ``ReduceMean``, whose ``axes`` moved to an input at 18), so one function
serves every model opset from ``min_opset`` on. The node's attributes reach the function's
attribute parameters by name.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable

import onnx
import onnx_ir as ir
from onnx_ir.passes import common
from onnxscript import OnnxFunction

DOMAIN = "onnxopt.decompose"
_REGISTRY: dict[tuple[str, str], list[Decomposition]] = {}
_MODULES = ("normalization", "activations", "attention", "quantized", "tensor_ops", "signal")


@dataclasses.dataclass(frozen=True)
class Decomposition:
    """How to compute ``domain::op_type`` with other ops.

    Attributes:
        domain: The replaced op's domain ("" for standard ONNX).
        op_type: The replaced op.
        function: The onnxscript function; its inputs and outputs are the op's, in order.
        min_opset: The lowest standard opset at which the function's body is valid.
        applies: Returns why the function cannot replace this node (None when it can).
    """

    domain: str
    op_type: str
    function: OnnxFunction
    min_opset: int = 13
    applies: Callable[[ir.Node], str | None] | None = None

    @functools.cached_property
    def function_proto(self) -> onnx.FunctionProto:
        return _in_our_domain(self.function.to_function_proto())

    @functools.cached_property
    def helper_protos(self) -> tuple[onnx.FunctionProto, ...]:
        """The onnxscript functions the body calls, moved into our domain as ``helper.<name>``."""
        called = self.function.function_ir.get_called_functions().values()
        return tuple(_in_our_domain(f.to_function_proto(), helper=True) for f in called)

    @property
    def function_name(self) -> str:
        return f"{self.domain or 'ai.onnx'}.{self.op_type}.{self.function_proto.name}"

    def new_ir_function(self) -> ir.Function:
        """A fresh onnx-ir copy of the function, renamed into the decomposition domain."""
        function = ir.serde.deserialize_function(self.function_proto)
        function.domain = DOMAIN
        function.name = self.function_name
        return function

    @functools.cached_property
    def produces(self) -> frozenset[tuple[str, str]]:
        """The (domain, op_type) pairs the body uses, helpers' bodies included."""
        bodies = (self.function_proto, *self.helper_protos)
        return frozenset(
            (n.domain, n.op_type) for f in bodies for n in f.node if n.domain != DOMAIN
        )

    def reason_not_applicable(self, node: ir.Node, opset: int) -> str | None:
        if opset < self.min_opset:
            return f"needs opset {self.min_opset}, the model has {opset}"
        n_out = len(self.function_proto.output)
        given = max((i + 1 for i, v in enumerate(node.inputs) if v is not None), default=0)
        if given > len(self.function_proto.input):
            return (
                f"input {given - 1} is given; the function takes {len(self.function_proto.input)}"
            )
        extra = [v for v in node.outputs[n_out:] if v.uses() or v.is_graph_output()]
        if extra:
            return f"optional output '{extra[0].name}' is used"
        return self.applies(node) if self.applies else None


def register(
    domain: str,
    op_type: str,
    *,
    min_opset: int = 13,
    applies: Callable[[ir.Node], str | None] | None = None,
) -> Callable[[OnnxFunction], OnnxFunction]:
    """Decorator: register an onnxscript function as a decomposition of ``domain::op_type``."""

    def decorate(function: OnnxFunction) -> OnnxFunction:
        entry = Decomposition(domain, op_type, function, min_opset, applies)
        _REGISTRY.setdefault((domain, op_type), []).append(entry)
        return function

    return decorate


def decompositions(domain: str, op_type: str) -> list[Decomposition]:
    """The registered decompositions of an op (built-in modules load on first use)."""
    _load_builtin()
    return list(_REGISTRY.get(("" if domain == "ai.onnx" else domain, op_type), []))


def registered_ops() -> list[tuple[str, str]]:
    _load_builtin()
    return sorted(_REGISTRY)


@functools.cache
def _load_builtin() -> None:
    import importlib

    for name in _MODULES:
        try:
            importlib.import_module(f"{__name__}.{name}")
        except ModuleNotFoundError as err:
            if err.name != f"{__name__}.{name}":
                raise


def replace(model: ir.Model, node: ir.Node, decomposition: Decomposition) -> None:
    """Replace ``node`` by a call to the decomposition's function (inline with ``inline_calls``)."""
    function = model.functions.get((DOMAIN, decomposition.function_name, ""))
    if function is None:
        function = decomposition.new_ir_function()
        model.functions[function.identifier()] = function
    for proto in decomposition.helper_protos:
        if (DOMAIN, proto.name, "") not in model.functions:
            helper = ir.serde.deserialize_function(proto)
            model.functions[helper.identifier()] = helper
    model.opset_imports.setdefault(DOMAIN, 1)
    declared = set(function.attributes)
    attributes = [a for a in node.attributes.values() if a.name in declared]
    inputs = list(node.inputs)
    while inputs and inputs[-1] is None:  # omitted trailing optional inputs
        inputs.pop()
    call = ir.Node(
        DOMAIN,
        function.name,
        inputs,
        attributes=attributes,
        num_outputs=len(function.outputs),
        name=node.name,
    )
    # An absent optional output ('' in the proto) has no name to lend: the call's value keeps
    # its own (else the inlined body would write a value named '', i.e. a missing one).
    pairs = [(old, new) for old, new in zip(node.outputs, call.outputs, strict=False) if old.name]
    ir.convenience.replace_nodes_and_values(
        node.graph, node, [node], [call], [old for old, _ in pairs], [new for _, new in pairs]
    )


def _in_our_domain(proto: onnx.FunctionProto, helper: bool = False) -> onnx.FunctionProto:
    """A copy whose calls to onnxscript's ``this`` domain point at our helper functions."""
    proto = onnx.FunctionProto.FromString(proto.SerializeToString())
    if helper:
        proto.domain, proto.name = DOMAIN, f"helper.{proto.name}"
    for node in proto.node:
        if node.domain == "this":
            node.domain, node.op_type = DOMAIN, f"helper.{node.op_type}"
    kept = [o for o in proto.opset_import if o.domain != "this"]
    del proto.opset_import[:]
    proto.opset_import.extend(kept)
    if any(n.domain == DOMAIN for n in proto.node):
        proto.opset_import.add(domain=DOMAIN, version=1)
    return proto


def inline_calls(model: ir.Model) -> None:
    """Inline every decomposition call at the model's standard opset, then drop the functions."""
    opset = model.opset_imports.get("", 1)
    for function in model.functions.values():
        if function.domain == DOMAIN:
            function.opset_imports[""] = opset
    common.InlinePass()(model)
    common.RemoveUnusedFunctionsPass()(model)
    if not any(n.domain == DOMAIN for n in model.graph.all_nodes()):
        model.opset_imports.pop(DOMAIN, None)
