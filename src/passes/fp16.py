"""fp16: float32 weights and compute to float16; IO and sensitive ops stay float32."""

from __future__ import annotations

import dataclasses
import fnmatch
import functools
import logging

import numpy as np
import onnx_ir as ir
import onnxruntime.capi.onnxruntime_pybind11_state as ort_c

from onnxopt.pass_api import Pass, PassResult
from onnxopt.registry import register_pass
from onnxopt.stats import add_count

logger = logging.getLogger(__name__)

F32, F16 = ir.DataType.FLOAT, ir.DataType.FLOAT16
FP16_MAX = float(np.finfo(np.float16).max)  # 65504
HALF = "tensor(float16)"
LAYER_ELEMENTS = 4096  # weights this large get a line in the report (as quant min_elements)
WAS_F32 = "fp16.was_f32"  # value meta: float16 now, float32 in the input model
# Ops whose float16 results drift (exponentials, roots, long sums) or that make index data.
SENSITIVE = [
    "Exp", "Log", "Pow", "Sqrt", "Reciprocal", "Softplus", "ReduceMean", "ReduceSum",
    "ReduceSumSquare", "ReduceProd", "ReduceL2", "ReduceLogSumExp", "CumSum", "Range", "TopK",
]  # fmt: skip


@functools.cache
def _schemas() -> dict[tuple[str, str], list]:
    """ORT's operator schemas (ONNX and contrib) by ``(domain, op)``, newest first."""
    table: dict[tuple[str, str], list] = {}
    for schema in ort_c.get_all_operator_schema():
        table.setdefault((schema.domain, schema.name), []).append(schema)
    for schemas in table.values():
        schemas.sort(key=lambda s: -s.since_version)
    return table


@functools.cache
def _cpu_kernels() -> dict[tuple[str, str], list]:
    """ORT CPU kernel definitions by ``(domain, op)``."""
    table: dict[tuple[str, str], list] = {}
    for kernel in ort_c.get_all_opkernel_def():
        if kernel.provider == "CPUExecutionProvider":
            table.setdefault((kernel.domain, kernel.op_name), []).append(kernel)
    return table


def _domain(node: ir.Node) -> str:
    return "" if node.domain in ("", "ai.onnx") else node.domain


def _schema(node: ir.Node, opset: int):
    schemas = _schemas().get((_domain(node), node.op_type), [])
    return next((s for s in schemas if s.since_version <= opset), None)


def _type_params(node: ir.Node, schema) -> tuple[list[str | None], list[str | None]]:
    """The type parameter (``T``) of each input and output; None where the type is fixed."""
    params = {c.type_param_str for c in schema.type_constraints}

    def bind(formals, count: int) -> list[str | None]:
        names = [f.typeStr if f.typeStr in params else None for f in formals]
        return [names[min(i, len(names) - 1)] if names else None for i in range(count)]

    return bind(schema.inputs, len(node.inputs)), bind(schema.outputs, len(node.outputs))


def _ort_runs(node: ir.Node, schema, params: set[str]) -> str:
    """``native`` (an fp16 CPU kernel), ``cast`` (ORT casts to its float kernel) or ``""``."""
    kernels = [
        k
        for k in _cpu_kernels().get((_domain(node), node.op_type), [])
        if k.version_range[0] <= schema.since_version <= k.version_range[1]
    ]
    for wanted, verdict in ((HALF, "native"), ("tensor(float)", "cast")):
        if any(all(wanted in k.type_constraints.get(p, []) for p in params) for k in kernels):
            return verdict
    return ""


@register_pass
class Fp16Pass(Pass):
    """Convert float32 weights and compute to float16, keeping float32 IO and sensitive ops.

    Rules (counted): ``nodes`` run in float16; ``initializers``/``constants`` converted one
    tensor at a time (values beyond +-65504 are clamped, with a note); ``casts-inserted`` at
    every float32/float16 boundary (graph inputs and outputs keep their float32 type);
    ``casts-removed`` where a float16->float32->float16 pair cancels. Nodes stay float32 when
    their op is in ``keep_fp32_ops`` (``kept-fp32``), their name matches an ``exclude`` glob
    (``excluded``), ORT's CPU provider cannot run them (``kept-unsupported``), or they hold
    or feed an If/Loop/Scan body (``kept-subgraph``; bodies are left in float32), or an input's
    type is unknown (``kept-untyped``). A weight read
    by any float32 node stays float32. ``ort-cast`` counts float16 nodes ORT runs by casting
    to its float kernel (no native fp16 CPU kernel): smaller, not faster.
    """

    name = "fp16"
    kind = "approximate"
    keep_fp32_ops: list[str] = dataclasses.field(default_factory=lambda: list(SENSITIVE))
    exclude: list[str] = dataclasses.field(default_factory=list)

    def call(self, model: ir.Model) -> PassResult:
        result = PassResult(model, False)
        graph = model.graph
        opsets = model.opset_imports
        captured = _captured(graph)
        plans = {id(n): self._plan(n, opsets, captured, result.counts) for n in graph}
        if any(True for _ in graph.subgraphs()):
            result.notes.append("If/Loop/Scan nodes, their bodies and what they read stay float32")
        if not any(plans.values()):
            return result
        clamped = self._convert_constants(graph, plans, captured, result)
        _insert_casts(graph, plans, result.counts)
        _cast_outputs(graph, result.counts)
        _remove_cancelling_casts(graph, result.counts)
        result.modified = True
        if clamped:
            result.notes.append(f"{clamped} constant values beyond +-65504 clamped")
        logger.info("%s: %s", self.name, result.counts)
        return result

    def _plan(self, node, opsets, captured: set[int], counts: dict[str, int]) -> set[str]:
        """The type parameters this node runs in float16 (empty: it stays as it is)."""
        schema = _schema(node, opsets.get(_domain(node), 1))
        ins, outs = _type_params(node, schema) if schema else ([], [])
        _fill_dtypes(node, ins, outs)
        # Only types bound by a float32 input: an output typed by an attribute (Cast) keeps it.
        params = {p for p, v in zip(ins, node.inputs, strict=True) if p and _is_f32(v)}
        if not params or node.op_type == "Constant":
            return set()
        params &= {c.type_param_str for c in schema.type_constraints if HALF in c.allowed_type_strs}
        rule = self._keep_reason(node, captured)
        if not rule and _untyped_input(node, ins, params):
            rule = "kept-untyped"  # a Cast could not be placed before an input of unknown type
        verdict = "" if rule or not params else _ort_runs(node, schema, params)
        if not verdict:
            add_count(counts, rule or "kept-unsupported", 1)
            return set()
        if verdict == "cast":
            add_count(counts, "ort-cast", 1)
        node.meta["fp16.params"] = (ins, outs)
        add_count(counts, "nodes", 1)
        return params

    def _keep_reason(self, node: ir.Node, captured: set[int]) -> str:
        if any(a.type in _GRAPH_ATTRS for a in node.attributes.values()) or any(
            id(v) in captured for v in node.outputs
        ):
            return "kept-subgraph"
        if any(fnmatch.fnmatchcase(node.name or "", p) for p in self.exclude):
            return "excluded"
        return "kept-fp32" if node.op_type in self.keep_fp32_ops else ""

    def _convert_constants(self, graph, plans, captured, result: PassResult) -> int:
        """Weights read only at float16 inputs become float16, one tensor at a time.

        Weights of at least ``LAYER_ELEMENTS`` values get a line in ``result.layers``.
        """
        counts, clamped = result.counts, 0
        for value, tensor in _constants(graph):
            if tensor is None or tensor.dtype != F32 or id(value) in captured:
                continue
            if value.is_graph_input() or value.is_graph_output():
                continue
            if not all(_reads_half(use.node, use.idx, plans) for use in value.uses()):
                continue
            new, over = _to_half(tensor)
            clamped += over
            if tensor.size >= LAYER_ELEMENTS:
                result.layers.append(_layer(value, tensor, new))
            producer = value.producer()
            if producer is None:
                value.const_value = new
                add_count(counts, "initializers", 1)
            else:
                producer.attributes["value"] = ir.AttrTensor("value", new)
                if value.const_value is not None:
                    value.const_value = new
                add_count(counts, "constants", 1)
            value.dtype = F16
            value.meta[WAS_F32] = True
            _release(tensor)
        return clamped


def _to_half(tensor: ir.TensorProtocol) -> tuple[ir.Tensor, int]:
    """The tensor in float16, clamped to +-65504, and how many values were clamped."""
    array = tensor.numpy()
    over = int(np.count_nonzero(np.abs(array) > FP16_MAX))
    half = np.clip(array, -FP16_MAX, FP16_MAX) if over else array
    return ir.tensor(half.astype(np.float16), name=tensor.name), over


def _layer(value: ir.Value, tensor: ir.TensorProtocol, half: ir.Tensor) -> dict:
    """The report's line for one weight (``PassReport.layers``), with its rounding error."""
    array = tensor.numpy().astype(np.float32)
    diff = half.numpy().astype(np.float32) - array
    signal = float(np.vdot(array, array))
    error = float(np.sqrt(np.vdot(diff, diff) / signal)) if signal > 0 else 0.0
    return {
        "name": value.name,
        "nodes": [use.node.name or use.node.op_type for use in value.uses()],
        "precision": "fp16",
        "format": "float16",
        "shape": list(tensor.shape.numpy()),
        "bytes_before": tensor.nbytes,
        "bytes_after": half.nbytes,
        "rel_error": error,
    }


def _release(tensor: ir.TensorProtocol) -> None:
    """Let an external tensor go of its memory map (kept when someone holds a view)."""
    if isinstance(tensor, ir.ExternalTensor):
        try:
            tensor.release()
        except BufferError:
            logger.debug("%s stays mapped (views exist)", tensor.name)


_CONSTANT_TYPES = {"value_float": F32, "value_floats": F32}
_GRAPH_ATTRS = (ir.AttributeType.GRAPH, ir.AttributeType.GRAPHS)


def _constants(graph: ir.Graph) -> list[tuple[ir.Value, ir.TensorProtocol | None]]:
    """Initializers and ``Constant(value=...)`` outputs, with their tensors."""
    found = [(v, v.const_value) for v in graph.initializers.values()]
    for node in graph:
        if node.op_type == "Constant" and _domain(node) == "" and "value" in node.attributes:
            found.append((node.outputs[0], node.attributes["value"].value))
    return found


def _is_f32(value: ir.Value | None) -> bool:
    return value is not None and value.dtype == F32


def _fill_dtypes(node: ir.Node, ins: list[str | None], outs: list[str | None]) -> None:
    """Outputs without a type take the type of the inputs bound to the same parameter."""
    bound = {p: v.dtype for p, v in zip(ins, node.inputs, strict=True) if p and v and v.dtype}
    if node.op_type == "Constant" and node.attributes:
        value = next(iter(node.attributes.values()))
        bound[outs[0]] = (
            value.value.dtype if value.name == "value" else _CONSTANT_TYPES.get(value.name)
        )
    if node.op_type == "Cast" and "to" in node.attributes:
        bound[outs[0]] = ir.DataType(node.attributes.get_int("to"))
    for value, param in zip(node.outputs, outs, strict=True):
        if value.dtype is None and param in bound:
            value.dtype = bound[param]


def _untyped_input(node: ir.Node, ins: list[str | None], params: set[str]) -> bool:
    pairs = zip(ins, node.inputs, strict=True)
    return any(p in params and v is not None and v.dtype is None for p, v in pairs)


def _reads_half(node: ir.Node, index: int, plans: dict[int, set[str]]) -> bool:
    params = plans.get(id(node))
    if not params:
        return False
    ins, _ = node.meta["fp16.params"]
    return ins[index] in params


def _captured(graph: ir.Graph) -> set[int]:
    """Ids of top-level values read inside an If/Loop/Scan body (they keep their type)."""
    outer = {id(v) for v in graph.initializers.values()} | {id(v) for v in graph.inputs}
    outer |= {id(v) for n in graph for v in n.outputs}
    return {
        id(v)
        for sub in graph.subgraphs()
        for n in sub.all_nodes()
        for v in n.inputs
        if v is not None and id(v) in outer
    }


def _insert_casts(graph: ir.Graph, plans: dict[int, set[str]], counts: dict[str, int]) -> None:
    """Give every node its inputs in the type it runs in; retype float16 nodes' outputs."""
    casts: dict[tuple[int, ir.DataType], ir.Value] = {}
    for node in list(graph):
        params = plans.get(id(node))
        ins, outs = node.meta.get("fp16.params", ([], []))
        for index, value in enumerate(node.inputs):
            if value is None or value.dtype not in (F32, F16):
                continue
            want = F16 if params and ins[index] in params else F32
            if value.dtype == want or (value.dtype == F16 and not _was_f32(value)):
                continue
            key = (id(value), want)
            if key not in casts:
                cast = ir.node(
                    "Cast", [value], {"to": int(want)}, name=f"{value.name}_to_{want.name}"
                )
                cast.outputs[0].dtype, cast.outputs[0].shape = want, value.shape
                cast.outputs[0].name = cast.name
                graph.insert_before(node, cast)
                casts[key] = cast.outputs[0]
                add_count(counts, "casts-inserted", 1)
            node.replace_input_with(index, casts[key])
        for out, param in zip(node.outputs, outs, strict=False):
            if params and param in params and out.dtype in (F32, None):
                out.meta[WAS_F32] = True
                out.dtype = F16
        node.meta.pop("fp16.params", None)


def _was_f32(value: ir.Value) -> bool:
    return bool(value.meta.get(WAS_F32))


def _cast_outputs(graph: ir.Graph, counts: dict[str, int]) -> None:
    """Graph outputs made float16 get a Cast back to float32 under their own name."""
    for index, value in enumerate(graph.outputs):
        if value.dtype != F16 or not value.meta.get(WAS_F32):
            continue
        name = value.name
        value.name = f"{name}_fp16"
        cast = ir.node("Cast", [value], {"to": int(F32)}, name=f"{name}_to_FLOAT")
        cast.outputs[0].name, cast.outputs[0].dtype = name, F32
        cast.outputs[0].shape = value.shape
        graph.append(cast)
        graph.outputs[index] = cast.outputs[0]
        add_count(counts, "casts-inserted", 1)


def _remove_cancelling_casts(graph: ir.Graph, counts: dict[str, int]) -> None:
    """``Cast(to=f16)`` of ``Cast(to=f32)`` of a float16 value reads that value directly."""
    for node in list(graph):
        if node.op_type != "Cast" or node.attributes.get_int("to") != F16:
            continue
        inner = node.inputs[0].producer()
        if inner is None or inner.op_type != "Cast" or inner.attributes.get_int("to") != F32:
            continue
        source = inner.inputs[0]
        if source.dtype != F16 or node.outputs[0].is_graph_output():
            continue
        node.outputs[0].replace_all_uses_with(source)
        graph.remove(node, safe=True)
        add_count(counts, "casts-removed", 1)
        if not inner.outputs[0].uses() and not inner.outputs[0].is_graph_output():
            graph.remove(inner, safe=True)
            add_count(counts, "casts-removed", 1)
