"""Shared by the weight passes: find constant MatMul/Gemm weights, stream them, rewrite users."""

from __future__ import annotations

import dataclasses
import fnmatch
import logging
from collections.abc import Callable
from typing import ClassVar

import numpy as np
import onnx_ir as ir

from onnxopt.pass_api import Pass, PassResult
from onnxopt.quant import blocks, packing
from onnxopt.stats import add_count

logger = logging.getLogger(__name__)

_FLOATS = (ir.DataType.FLOAT, ir.DataType.FLOAT16)
MS_DOMAIN = "com.microsoft"


@dataclasses.dataclass
class Use:
    """One node reading a weight (as its input 1, directly or through ``via``)."""

    node: ir.Node
    rule: str  # "matmul", "matmul-transposed" or "gemm"
    via: ir.Node | None = None  # the Transpose bypassed by "matmul-transposed"


@dataclasses.dataclass
class WeightSite:
    """A constant weight and the nodes that read it as ``[K, N]`` (or ``[N, K]`` when ``rows``)."""

    weight: ir.Value
    rows: bool
    uses: list[Use] = dataclasses.field(default_factory=list)


class WeightQuantPass(Pass):
    """Shared by the weight quantization passes: find weights, stream them, rewrite their users.

    Subclasses set ``bits`` and implement :meth:`rewrite`. Weights are read one at a time
    (memory-mapped external data stays on disk until then) and dropped once replaced.
    """

    kind = "approximate"
    bits: ClassVar[int] = 4
    exclude: list[str] = dataclasses.field(default_factory=list)
    ops: list[str] = dataclasses.field(default_factory=lambda: ["MatMul", "Gemm"])
    min_elements: int = 4096

    supported_ops: ClassVar[tuple[str, ...]] = ("MatMul", "Gemm")

    def __post_init__(self) -> None:
        unknown = set(self.ops) - set(self.supported_ops)
        if unknown:
            allowed = ", ".join(self.supported_ops)
            raise ValueError(f"ops may hold {allowed}, not {', '.join(sorted(unknown))}")
        if self.min_elements < 0:
            raise ValueError("min_elements must be >= 0")

    def call(self, model: ir.Model) -> PassResult:
        result = PassResult(model, False)
        targets = find_prepared(self, model, result)
        before = after = 0
        for target in targets:
            tensor = target.weight.const_value
            if target.uses[0].rule == "conv":
                nbytes, rel_error = conv_to_int8(target, result.counts)
                layer = {**self.record(target, nbytes, rel_error), "precision": "int8"}
            else:
                nbytes, rel_error = self.rewrite(model, target, result.counts)
                layer = self.record(target, nbytes, rel_error)
            before, after = before + tensor.nbytes, after + nbytes
            result.layers.append(layer)
            logger.debug(
                "%s: %s quantized for %d node(s)", self.name, target.weight.name, len(target.uses)
            )
            drop_if_unused(target)
        if targets:
            result.modified = True
            result.notes.append(
                f"{len(targets)} weights quantized to {self.bits} bits: "
                f"{before / 2**20:.1f} MiB -> {after / 2**20:.1f} MiB"
            )
            logger.info("%s: %s", self.name, result.notes[-1])
        return result

    def prepare(self, model: ir.Model, result: PassResult) -> bool:
        """Set up opsets before any rewrite; False (with a note) when the format cannot be used."""
        model.opset_imports.setdefault(MS_DOMAIN, 1)
        return True

    def rewrite(
        self, model: ir.Model, target: WeightSite, counts: dict[str, int]
    ) -> tuple[int, float | None]:
        """Replace the weight's uses by quantized ones.

        Returns the bytes of the new tensors and the weight's relative L2 reconstruction error.
        """
        raise NotImplementedError

    def record(self, target: WeightSite, nbytes: int, rel_error: float | None) -> dict:
        """The report's line for one rewritten weight (``PassReport.layers``)."""
        tensor = target.weight.const_value
        return {
            "name": target.weight.name,
            "nodes": [use.node.name or use.node.op_type for use in target.uses],
            "precision": f"int{self.bits}",
            "format": getattr(self, "format", ""),
            "shape": list(tensor.shape.numpy()),
            "bytes_before": tensor.nbytes,
            "bytes_after": nbytes,
            "rel_error": rel_error,
        }

    def find(self, model: ir.Model, result: PassResult) -> list[WeightSite]:
        """The weights to quantize, each once however many nodes share it; skips are counted."""
        targets: dict[tuple[int, bool], WeightSite] = {}
        for node in model.graph.all_nodes():
            found = _weight_of(node) if node.op_type in self.ops and node.domain == "" else None
            if found is None:
                continue
            weight, rows, rule = found
            via = node.inputs[1].producer() if rule == "matmul-transposed" else None
            reason, skip_rule = self.skip_reason(node, weight)
            if reason:
                add_count(result.counts, skip_rule, 1)
                result.misses.append(f"{node.name or node.op_type}: {reason}")
                continue
            key = (id(weight), rows)
            targets.setdefault(key, WeightSite(weight, rows)).uses.append(Use(node, rule, via))
        skipped = sum(n for rule, n in result.counts.items() if rule.startswith("skipped-"))
        if skipped:
            result.notes.append(f"{skipped} weight uses left in float (see --explain)")
        return list(targets.values())

    def skip_reason(self, node: ir.Node, weight: ir.Value) -> tuple[str, str]:
        """Why this use of ``weight`` stays in float, and the rule that counts it ("" if not)."""
        name = node.name or ""
        if any(fnmatch.fnmatchcase(name, pattern) for pattern in self.exclude):
            return "excluded by name", "skipped-excluded"
        tensor = weight.const_value
        if node.op_type == "Conv":
            return _conv_skip_reason(node, tensor)
        if len(tensor.shape) != 2 or tensor.dtype not in _FLOATS:
            return f"weight is not a 2-D float tensor ({tensor.dtype}, {tensor.shape})", (
                "skipped-shape"
            )
        if weight.is_graph_input():
            return "weight is also a graph input (it may be overridden)", "skipped-input"
        if tensor.size < self.min_elements:
            return f"weight has {tensor.size} < min_elements={self.min_elements}", "skipped-small"
        if node.op_type == "Gemm" and node.attributes.get_int("transA", 0):
            return "Gemm with transA=1", "skipped-gemm-transA"
        a = node.inputs[0]
        if a is None or (a.shape is not None and len(a.shape) < 2):
            return "input A has rank < 2", "skipped-shape"
        if a.dtype is not None and a.dtype != tensor.dtype:
            return "input A and the weight differ in type", "skipped-shape"
        return "", ""


def _weight_of(node: ir.Node) -> tuple[ir.Value, bool, str] | None:
    """``(constant, is_rows, rule)`` for a MatMul/Gemm whose B is constant (maybe transposed)."""
    if len(node.inputs) < 2 or node.inputs[1] is None:
        return None
    b = node.inputs[1]
    if node.op_type == "Conv":
        return (b, True, "conv") if b.const_value is not None else None
    if node.op_type == "Gemm":
        if b.const_value is None:
            return None
        return b, bool(node.attributes.get_int("transB", 0)), "gemm"
    if b.const_value is not None:
        return b, False, "matmul"
    producer = b.producer()
    if producer is None or producer.op_type != "Transpose" or producer.domain != "":
        return None
    source = producer.inputs[0]
    perm = producer.attributes.get_ints("perm", None)
    if source is None or source.const_value is None or len(source.const_value.shape) != 2:
        return None
    return (source, True, "matmul-transposed") if perm in (None, [1, 0], (1, 0)) else None


def find_prepared(pass_: Pass, model: ir.Model, result: PassResult) -> list[WeightSite]:
    """``pass_.find`` then ``pass_.prepare``; found again when preparing changed the model.

    An opset conversion may replace nodes, so skips and notes are counted afresh. Returns []
    when there is nothing to do or ``prepare`` refused (with a note).
    """
    targets = pass_.find(model, result)
    if not targets or not pass_.prepare(model, result):
        return []
    if result.modified:
        result.counts = {k: v for k, v in result.counts.items() if not k.startswith("skip")}
        result.misses, result.notes = [], []
        targets = pass_.find(model, result)
    return targets


def _conv_skip_reason(node: ir.Node, tensor: ir.TensorProtocol) -> tuple[str, str]:
    """Why a Conv weight stays in float."""
    if tensor.dtype not in _FLOATS or len(tensor.shape) < 3:
        return f"Conv weight is not a float tensor of rank >= 3 ({tensor.dtype})", "skipped-shape"
    return "", ""


def conv_to_int8(target: WeightSite, counts: dict[str, int]) -> tuple[int, float]:
    """A Conv weight ``[M, C/g, ...]`` as int8 per output channel: ``Cast(q) * scales``.

    No ORT kernel takes 4-bit Conv weights, so the weight passes store Conv weights in 8 bits.
    Cast and Mul rather than DequantizeLinear: ORT's constant folding skips DequantizeLinear
    (kept for its QDQ fusions), which left the Conv reading a computed weight every run and
    without its pre-packed kernels (1.16x slower on a conformer); Cast and Mul fold at load.
    """
    tensor = target.weight.const_value
    array = tensor.numpy()
    rows = array.reshape(array.shape[0], -1)
    q, scales = blocks.per_channel_int8(rows)
    error = blocks.relative_error(rows, q, scales)
    graph, name = owner(target), target.weight.name
    per_channel = scales.astype(array.dtype).reshape(-1, *[1] * (array.ndim - 1))
    codes = add_initializer(graph, f"{name}_q8", ir.tensor(q.reshape(array.shape)))
    scale = add_initializer(graph, f"{name}_scales", ir.tensor(per_channel))
    weights: dict[int, ir.Value] = {}
    for use in target.uses:
        owner_graph = use.node.graph
        if id(owner_graph) not in weights:
            cast = ir.node("Cast", [codes], {"to": tensor.dtype.value}, name=f"{name}_cast")
            mul = ir.node("Mul", [cast.outputs[0], scale], name=f"{name}_dq")
            mul.outputs[0].dtype, mul.outputs[0].shape = tensor.dtype, tensor.shape
            owner_graph.insert_before(next(iter(owner_graph)), [cast, mul])
            weights[id(owner_graph)] = mul.outputs[0]
        use.node.replace_input_with(1, weights[id(owner_graph)])
        add_count(counts, "conv", 1)
    return codes.const_value.nbytes + scale.const_value.nbytes, error


def weight_rows(target: WeightSite, *, stream: bool = True) -> np.ndarray | FileRows:
    """The weight as rows ``[N, K]``, read nowhere yet.

    A weight in external data comes as a :class:`FileRows` reader of slabs when ``stream``;
    otherwise it is a view of the array (memory-mapped for external data), no copy.
    """
    tensor = target.weight.const_value
    if stream and isinstance(tensor, ir.ExternalTensor) and tensor.dtype in _FLOATS:
        return FileRows(tensor, transposed=not target.rows)
    array = tensor.numpy()
    return array if target.rows else array.T


class FileRows:
    """Rows ``[N, K]`` of a 2-D weight in an external data file, read slab by slab.

    Nothing is memory-mapped: each slab is read with ``np.fromfile`` and dropped after use,
    so the process never holds more of the weight than the slabs being quantized. When
    ``transposed`` the file holds ``W[K, N]`` and the cheap slabs are whole rows of W
    (``along_k``); otherwise the file holds the rows themselves.
    """

    def __init__(self, tensor: ir.ExternalTensor, *, transposed: bool) -> None:
        self.path, self.offset = tensor.path, tensor.offset or 0
        self.dtype = tensor.dtype.numpy()
        self.file_shape = tuple(tensor.shape.numpy())
        self.along_k = transposed
        self.shape = self.file_shape[::-1] if transposed else self.file_shape

    def __getitem__(self, index: tuple[slice, slice]) -> np.ndarray:
        rows, columns = index
        if self.along_k:  # rows of the file are columns here
            return self._read(columns).T[rows]
        return self._read(rows)[:, columns]

    def _read(self, lines: slice) -> np.ndarray:
        """Lines ``start:stop`` of the file's ``[A, B]`` array (contiguous bytes)."""
        total, width = self.file_shape
        start, stop = lines.start or 0, min(lines.stop if lines.stop is not None else total, total)
        offset = self.offset + start * width * self.dtype.itemsize
        data = np.fromfile(self.path, self.dtype, count=(stop - start) * width, offset=offset)
        return data.reshape(stop - start, width)


def drop_if_unused(target: WeightSite) -> None:
    """Remove bypassed Transposes and the float initializer once nothing reads them.

    An external tensor also lets go of its memory map (it maps again if read later).
    """
    for use in target.uses:
        via = use.via
        if via is None or via.graph is None:
            continue
        if not via.outputs[0].uses() and not via.outputs[0].is_graph_output():
            via.graph.remove(via, safe=True)
    weight = target.weight
    tensor = weight.const_value
    if not weight.uses() and not weight.is_graph_output() and weight.is_initializer():
        del weight.graph.initializers[weight.name]
    if isinstance(tensor, ir.ExternalTensor):
        try:
            tensor.release()
        except BufferError:  # someone still holds a view of the mapped array: leave it mapped
            logger.debug("%s: %s stays mapped (views exist)", target.weight.name, tensor.path)


def add_initializer(graph: ir.Graph, name: str, tensor: ir.TensorProtocol) -> ir.Value:
    """Register ``tensor`` as a new initializer named ``name`` (made unique)."""
    unique, count = name, 0
    while unique in graph.initializers:
        count += 1
        unique = f"{name}_{count}"
    value = ir.Value(name=unique, shape=tensor.shape, type=ir.TensorType(tensor.dtype))
    value.const_value = tensor
    graph.register_initializer(value)
    return value


def owner(target: WeightSite) -> ir.Graph:
    graph = target.weight.graph
    return graph if graph is not None else target.uses[0].node.graph


def replace_node(node: ir.Node, new_nodes: list[ir.Node]) -> None:
    """Put ``new_nodes`` where ``node`` was; the last one's output takes over its output."""
    ir.convenience.replace_nodes_and_values(
        node.graph, node, [node], new_nodes, [node.outputs[0]], [new_nodes[-1].outputs[0]]
    )


def gemm_bias(node: ir.Node, n: int, dtype: np.dtype) -> tuple[np.ndarray | None, bool]:
    """``beta * C`` as a ``[N]`` bias when C is constant and per column; else ``(None, has_c)``."""
    c = node.inputs[2] if len(node.inputs) > 2 else None
    if c is None:
        return None, False
    beta = node.attributes.get_float("beta", 1.0)
    if c.const_value is None or c.const_value.size not in (1, n) or len(c.const_value.shape) > 2:
        return None, True
    if len(c.const_value.shape) == 2 and c.const_value.shape[0] != 1:
        return None, True
    values = np.broadcast_to(c.const_value.numpy().reshape(-1), (n,))
    return (beta * values).astype(dtype), False


def require_opset(model: ir.Model, opset: int, result: PassResult) -> bool:
    """Raise the standard opset to at least ``opset`` (and IR to 10); False if it cannot."""
    if model.opset_imports.get("", 1) < opset:
        from onnxopt.targets.opset import convert_opset  # onnxscript: only when needed

        problem = convert_opset(model, opset)
        if problem:
            result.notes.append(f"nothing quantized: cannot convert to opset {opset}: {problem}")
            return False
        add_count(result.counts, "opset", 1)
        result.modified = True
    model.ir_version = max(model.ir_version or 0, 10)
    return True


def to_matmul_nbits(
    target: WeightSite, quant: blocks.Blockwise, accuracy_level: int, counts: dict[str, int]
) -> int:
    """Every use becomes ``MatMulNBits(A, B, scales, [zero_points], bias)``."""
    graph, name = owner(target), target.weight.name
    tensors = packing.matmul_nbits(quant)
    b = add_initializer(graph, f"{name}_q{quant.bits}", ir.tensor(tensors["B"]))
    zero_points = None
    if "zero_points" in tensors:
        zero_points = add_initializer(graph, f"{name}_zp", ir.tensor(tensors["zero_points"]))
    attributes = {"K": quant.k, "N": quant.n, "bits": quant.bits, "block_size": quant.block}
    if accuracy_level:
        attributes["accuracy_level"] = accuracy_level

    def inputs(a: ir.Value, scales: ir.Value, bias: ir.Value | None) -> list[ir.Value | None]:
        return [a, b, scales, zero_points, None, bias]

    fused = FusedOp("MatMulNBits", attributes, inputs)
    return (
        b.const_value.nbytes
        + (zero_points.const_value.nbytes if zero_points else 0)
        + (fused.replace_uses(target, tensors["scales"], counts))
    )


@dataclasses.dataclass
class FusedOp:
    """A com.microsoft op taking A, a quantized weight, its scales and a bias.

    ``inputs(a, scales, bias)`` lists the op's inputs; trailing Nones are dropped.
    """

    op: str
    attributes: dict
    inputs: Callable[[ir.Value, ir.Value, ir.Value | None], list[ir.Value | None]]

    def replace_uses(self, target: WeightSite, scales: np.ndarray, counts: dict[str, int]) -> int:
        """Replace every use; Gemm ``alpha`` scales the scales, ``beta * C`` becomes the bias.

        Returns the bytes of the scales and biases added.
        """
        graph, name = owner(target), target.weight.name
        dtype = target.weight.const_value.dtype.numpy()
        scale_values: dict[float, ir.Value] = {}
        added = 0
        for use in target.uses:
            node = use.node
            alpha = node.attributes.get_float("alpha", 1.0) if use.rule == "gemm" else 1.0
            if alpha not in scale_values:
                scaled = ir.tensor((scales * dtype.type(alpha)).astype(dtype))
                scale_values[alpha] = add_initializer(graph, f"{name}_scales", scaled)
                added += scaled.nbytes
            n = scales.shape[0]
            bias, add_c = gemm_bias(node, n, dtype) if use.rule == "gemm" else (None, False)
            bias_value = None
            if bias is not None:
                bias_value = add_initializer(graph, f"{name}_bias", ir.tensor(bias))
                added += bias.nbytes
            inputs = self.inputs(node.inputs[0], scale_values[alpha], bias_value)
            while inputs[-1] is None:
                inputs.pop()
            new = [ir.node(self.op, inputs, self.attributes, domain=MS_DOMAIN, name=node.name)]
            if add_c:
                new += _add_c(graph, node, new[0].outputs[0], dtype)
            replace_node(node, new)
            add_count(counts, use.rule, 1)
        return added


def _add_c(graph: ir.Graph, node: ir.Node, y: ir.Value, dtype: np.dtype) -> list[ir.Node]:
    """``y + beta * C`` for a Gemm whose C is not a per-column constant."""
    c = node.inputs[2]
    beta = node.attributes.get_float("beta", 1.0)
    if beta == 1.0:
        return [ir.node("Add", [y, c])]
    beta_value = add_initializer(graph, f"{node.name}_beta", ir.tensor(np.array(beta, dtype)))
    mul = ir.node("Mul", [c, beta_value])
    return [mul, ir.node("Add", [y, mul.outputs[0]])]


def wire_dequantized(
    target: WeightSite, inputs: list[ir.Value], attributes: dict, counts: dict[str, int]
) -> int:
    """Insert one DequantizeLinear per graph that uses the weight; each use reads ``[K, N]``."""
    outputs: dict[int, ir.Value] = {}
    for use in target.uses:
        graph = use.node.graph
        if id(graph) not in outputs:
            dq = ir.node("DequantizeLinear", inputs, attributes, name=f"{target.weight.name}_dq")
            graph.insert_before(next(iter(graph)), dq)
            outputs[id(graph)] = dq.outputs[0]
        use.node.replace_input_with(1, outputs[id(graph)])
        if use.rule == "gemm" and use.node.attributes.get_int("transB", 0):
            use.node.attributes["transB"] = ir.AttrInt64("transB", 0)
        add_count(counts, use.rule, 1)
    return sum(v.const_value.nbytes for v in inputs)
