"""Adapter: a function ``gs.Graph -> gs.Graph`` (onnx-graphsurgeon) used as an onnxopt pass.

The model crosses into graphsurgeon as a protobuf whose large weights stay references to
external data; after the round trip the original onnx-ir tensors are re-attached by name, so
weights are not copied and external data still resolves.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any, ClassVar

import onnx
import onnx_graphsurgeon as gs
import onnx_ir as ir
from onnx_graphsurgeon.ir.tensor import LazyValues

from onnxopt.pass_api import Kind, Pass, PassResult
from onnxopt.registry import register_pass

GraphFn = Callable[[gs.Graph], "gs.Graph | None"]


class GsFunctionPass(Pass):
    """Base of passes made by :func:`gs_pass`; ``function`` is the user's graph rewrite."""

    function: ClassVar[GraphFn | None] = None

    def call(self, model: ir.Model) -> PassResult:
        proto = ir.to_proto(model)
        graph = gs.import_onnx(proto)
        bound = _bind_external_values(graph, model)
        new_graph = type(self).function(graph) or graph
        _unload_untouched(bound)
        new_proto = gs.export_onnx(new_graph, do_type_check=False)
        _embed_edited_weights(new_proto)
        modified = new_proto.graph.SerializeToString() != proto.graph.SerializeToString()
        if not modified:
            return PassResult(model, False)
        new_model = ir.serde.deserialize_model(new_proto)
        reattached = _reattach_weights(model, new_model)
        model.graph = new_model.graph
        model.functions.clear()
        model.functions.update(new_model.functions)
        return PassResult(model, True, counts={"weights-reattached": reattached})


def gs_pass(
    function: GraphFn | None = None,
    *,
    name: str,
    kind: Kind = "exact",
    register: bool = True,
) -> Any:
    """Make a pass from ``function(graph: gs.Graph) -> gs.Graph``; usable as a decorator.

    Args:
        function: Rewrites the graph in place or returns a new one.
        name: The pass name (kebab-case) used in pipeline specs.
        kind: How the pass is verified: ``exact``, ``approximate`` or ``interface``.
        register: Register the pass so that specs can name it.

    Returns:
        The new pass class (instantiate it, or name it in a spec).
    """

    def make(fn: GraphFn) -> type[Pass]:
        doc = (fn.__doc__ or f"onnx-graphsurgeon pass {fn.__name__}").strip()
        attrs = {"name": name, "kind": kind, "__doc__": doc, "function": staticmethod(fn)}
        cls = type(f"GsPass_{fn.__name__}", (GsFunctionPass,), attrs)
        return register_pass(cls) if register else cls

    return make(function) if function is not None else make


class _IrBackedValues(LazyValues):
    """Lazy values loaded by onnx-ir: memory-mapped, resolved against the model's folder."""

    def __init__(self, tensor: onnx.TensorProto, source: ir.ExternalTensor) -> None:
        super().__init__(tensor)
        self.source = source

    def load(self):
        return self.source.numpy()


def _bind_external_values(
    graph: gs.Graph, model: ir.Model
) -> list[tuple[gs.Constant, _IrBackedValues]]:
    """Make graphsurgeon read external weights through onnx-ir rather than the working dir."""
    originals = {
        name: value.const_value
        for g in (model.graph, *model.graph.subgraphs())
        for name, value in g.initializers.items()
        if isinstance(value.const_value, ir.ExternalTensor)
    }
    bound = []
    for g in (graph, *graph.subgraphs(recursive=True)):
        for tensor in g.tensors().values():
            lazy = getattr(tensor, "_values", None)
            if isinstance(lazy, LazyValues) and tensor.name in originals:
                backed = _IrBackedValues(lazy.tensor, originals[tensor.name])
                tensor._values = backed
                bound.append((tensor, backed))
    return bound


def _unload_untouched(bound: list[tuple[gs.Constant, _IrBackedValues]]) -> None:
    """Weights only read (still the mapped array) go back to lazy, so they stay external."""
    for constant, backed in bound:
        if constant._values is not backed and constant._values is backed.source.numpy():
            constant._values = backed


def _embed_edited_weights(proto: onnx.ModelProto) -> None:
    """Weights the user edited come back with data but still marked external: embed them."""
    for graph in _proto_graphs(proto.graph):
        for tensor in graph.initializer:
            external = tensor.data_location == onnx.TensorProto.EXTERNAL
            if external and not any(e.key == "location" for e in tensor.external_data):
                tensor.data_location = onnx.TensorProto.DEFAULT
                del tensor.external_data[:]


def _proto_graphs(graph: onnx.GraphProto) -> Iterator[onnx.GraphProto]:
    yield graph
    for node in graph.node:
        for attr in node.attribute:
            for sub in (*([attr.g] if attr.HasField("g") else []), *attr.graphs):
                yield from _proto_graphs(sub)


def _reattach_weights(old: ir.Model, new: ir.Model) -> int:
    """Point the new model's weights back at the original tensors where they are unchanged."""
    originals = {
        name: value.const_value
        for graph in (old.graph, *old.graph.subgraphs())
        for name, value in graph.initializers.items()
        if value.const_value is not None
    }
    base_dirs = {t.base_dir for t in originals.values() if isinstance(t, ir.ExternalTensor)}
    count = 0
    for graph in (new.graph, *new.graph.subgraphs()):
        for name, value in graph.initializers.items():
            original, tensor = originals.get(name), value.const_value
            if not isinstance(tensor, ir.ExternalTensor):
                continue
            if isinstance(original, ir.ExternalTensor) and _same_place(original, tensor):
                value.const_value = original
                count += 1
            elif len(base_dirs) == 1:
                tensor.base_dir = next(iter(base_dirs))
    return count


def _same_place(a: ir.ExternalTensor, b: ir.ExternalTensor) -> bool:
    return (a.location, a.offset, a.length) == (b.location, b.offset, b.length)
