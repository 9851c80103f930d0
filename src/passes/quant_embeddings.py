"""Quantize constant embedding tables read by Gather: GatherBlockQuantized or blocked QDQ."""

from __future__ import annotations

import dataclasses
import fnmatch
import logging
from typing import Literal

import numpy as np
import onnx_ir as ir

from onnxopt.pass_api import Pass, PassResult
from onnxopt.passes._weight_quant import (
    _FLOATS,
    MS_DOMAIN,
    FileRows,
    Use,
    WeightQuantPass,
    WeightSite,
    add_initializer,
    drop_if_unused,
    find_prepared,
    owner,
    replace_node,
    require_opset,
    weight_rows,
)
from onnxopt.quant import blocks, kquant, packing
from onnxopt.registry import register_pass
from onnxopt.stats import add_count

logger = logging.getLogger(__name__)

_INDICES = (ir.DataType.INT32, ir.DataType.INT64, None)
_DATA_TYPES = {
    "int4": ir.DataType.INT4,
    "uint4": ir.DataType.UINT4,
    "int8": ir.DataType.INT8,
    "uint8": ir.DataType.UINT8,
}


@register_pass
class QuantEmbeddingsPass(Pass):
    """Quantize constant embedding tables read by Gather to 4 or 8 bits in blocks along hidden.

    Rule ``gather`` (counted per rewritten Gather): ``Gather(table, ids, axis=0)`` with
    ``table`` a constant 2-D float32/float16 initializer ``[vocab, hidden]``. A table read by
    several Gathers is quantized once. ``format=gbq`` emits com.microsoft
    ``GatherBlockQuantized(data, ids, scales, [zero_points], gather_axis=0, quantize_axis=1)``
    (ORT; uint8 data, 4-bit codes two a byte: ORT 1.32's fast path). ``format=qdq`` emits
    ``Gather(DequantizeLinear(data, scales, [zp], axis=1, block_size), ids)`` (standard, opset
    21: the model's opset is converted when lower); ORT dequantizes the whole table on every
    run, so it saves size and costs time.

    A table that other nodes also read (a tied LM head ``MatMul(x, Transpose(table))``, a
    Gather on axis 1, a graph output) stays float unless ``tied=copy``: then the Gathers read
    a quantized copy and the float table stays for the other readers (``quant-int4`` after
    this pass quantizes a MatMul's use and drops it). Uses left in float count as
    ``skipped-*`` with reasons in ``misses``.
    """

    name = "quant-embeddings"
    kind = "approximate"
    bits: int = 4
    block: int = 32
    symmetric: bool = True
    algo: Literal["rtn", "kquant"] = "kquant"
    format: Literal["gbq", "qdq"] = "gbq"
    tied: Literal["skip", "copy"] = "skip"
    exclude: list[str] = dataclasses.field(default_factory=list)
    min_elements: int = 4096

    def __post_init__(self) -> None:
        if self.bits not in (4, 8):
            raise ValueError(f"bits must be 4 or 8, not {self.bits}")
        if self.block not in (16, 32, 64, 128, 256):
            raise ValueError(f"block must be 16, 32, 64, 128 or 256, not {self.block}")
        if self.min_elements < 0:
            raise ValueError("min_elements must be >= 0")

    def call(self, model: ir.Model) -> PassResult:
        result = PassResult(model, False)
        targets = find_prepared(self, model, result)
        if not targets:
            return result
        before = after = 0
        for target in targets:
            tensor = target.weight.const_value
            nbytes, rel_error = self.rewrite(target, result.counts)
            before, after = before + tensor.nbytes, after + nbytes
            result.layers.append(WeightQuantPass.record(self, target, nbytes, rel_error))
            logger.debug("%s: %s quantized", self.name, target.weight.name)
            drop_if_unused(target)
            if target.weight.uses() or target.weight.is_graph_output():
                add_count(result.counts, "tied-kept", 1)
        result.modified = True
        result.notes.append(
            f"{len(targets)} tables quantized to {self.bits} bits: "
            f"{before / 2**20:.2f} MiB -> {after / 2**20:.2f} MiB"
        )
        logger.info("%s: %s", self.name, result.notes[-1])
        if self.format == "qdq":
            result.notes.append("format=qdq: ORT dequantizes each whole table on every run")
        if result.counts.get("tied-kept"):
            result.notes.append(
                f"{result.counts['tied-kept']} float tables kept: other nodes still read them"
            )
        return result

    def prepare(self, model: ir.Model, result: PassResult) -> bool:
        """The opset the format needs; False (with a note) when the model cannot have it."""
        if self.format == "qdq":
            return require_opset(model, 21, result)
        model.opset_imports.setdefault(MS_DOMAIN, 1)
        return True

    def find(self, model: ir.Model, result: PassResult) -> list[WeightSite]:
        """The tables to quantize, each with the Gathers that read it; skips are counted."""
        targets: dict[int, WeightSite] = {}
        for node in model.graph.all_nodes():
            if node.op_type != "Gather" or node.domain != "" or node.inputs[0] is None:
                continue
            table = node.inputs[0]
            if table.const_value is None:
                continue
            reason, rule = self.skip_reason(node, table)
            if reason:
                add_count(result.counts, rule, 1)
                result.misses.append(f"{node.name or node.op_type}: {reason}")
                continue
            targets.setdefault(id(table), WeightSite(table, True)).uses.append(Use(node, "gather"))
        skipped = sum(n for rule, n in result.counts.items() if rule.startswith("skipped-"))
        if skipped:
            result.notes.append(f"{skipped} table reads left in float (see --explain)")
        return list(targets.values())

    def skip_reason(self, node: ir.Node, table: ir.Value) -> tuple[str, str]:
        """Why this Gather keeps its float table, and the rule that counts it ("" if not)."""
        if any(fnmatch.fnmatchcase(node.name or "", p) for p in self.exclude) or any(
            fnmatch.fnmatchcase(table.name or "", p) for p in self.exclude
        ):
            return "excluded by name", "skipped-excluded"
        tensor = table.const_value
        if len(tensor.shape) != 2 or tensor.dtype not in _FLOATS:
            return f"table is not a 2-D float tensor ({tensor.dtype}, {tensor.shape})", (
                "skipped-shape"
            )
        if _axis(node) != 0:
            return f"Gather on axis {node.attributes.get_int('axis', 0)}, not 0", "skipped-axis"
        indices = node.inputs[1]
        if indices is None or indices.dtype not in _INDICES:
            return "indices are not int32/int64", "skipped-indices"
        if table.is_graph_input() or not table.is_initializer():
            return "table is not an initializer (or is also a graph input)", "skipped-input"
        if tensor.size < self.min_elements:
            return f"table has {tensor.size} < min_elements={self.min_elements}", "skipped-small"
        other = _other_reader(table)
        if other and self.tied == "skip":
            return f"table is also read by {other} (tied=copy quantizes a copy)", "skipped-tied"
        return "", ""

    def quantize(self, rows: np.ndarray | FileRows) -> blocks.Blockwise:
        options = {"bits": self.bits, "block": self.block, "symmetric": self.symmetric}
        options["along_k"] = getattr(rows, "along_k", None)
        if self.algo == "rtn":
            return blocks.rtn(rows, **options)
        return kquant.kquant(rows, **options)

    def rewrite(self, target: WeightSite, counts: dict[str, int]) -> tuple[int, float | None]:
        """Quantize the table once; every Gather reads it. Returns (new bytes, rel_error)."""
        quant = self.quantize(weight_rows(target))
        tensors = packing.gather_block_quantized(quant, standard=self.format == "qdq")
        inputs = _initializers(target, tensors, quant)
        if self.format == "gbq":
            _to_gather_block_quantized(target, inputs, quant, counts)
        else:
            _to_dequantize_linear(target, inputs, quant.block, counts)
        return sum(v.const_value.nbytes for v in inputs), quant.rel_error


def _axis(node: ir.Node) -> int:
    axis = node.attributes.get_int("axis", 0)
    return axis + 2 if axis < 0 else axis


def _other_reader(table: ir.Value) -> str:
    """The first reader of ``table`` that is not an axis-0 Gather of it ("" if none)."""
    if table.is_graph_output():
        return "a graph output"
    for node, index in table.uses():
        if node.op_type != "Gather" or node.domain != "" or index != 0 or _axis(node) != 0:
            return node.name or node.op_type
    return ""


def _initializers(target: WeightSite, tensors: dict, quant: blocks.Blockwise) -> list[ir.Value]:
    """The new initializers: data, scales (in the table's float type) and zero points."""
    graph, name = owner(target), target.weight.name
    data_type = _DATA_TYPES[tensors["data_type"]]
    v, h = quant.n, quant.k
    if data_type in (ir.DataType.INT4, ir.DataType.UINT4):
        data = ir.PackedTensor(tensors["data"], data_type, shape=[v, h])
    else:
        data = ir.tensor(tensors["data"])
    scales = tensors["scales"].astype(target.weight.const_value.dtype.numpy())
    values = [
        add_initializer(graph, f"{name}_q{quant.bits}", data),
        add_initializer(graph, f"{name}_scales", ir.tensor(scales)),
    ]
    if "zero_points" in tensors:
        zp = tensors["zero_points"]
        if data_type == ir.DataType.UINT4:
            zp = ir.PackedTensor(zp, data_type, shape=[v, quant.k_blocks])
        else:
            zp = ir.tensor(zp)
        values.append(add_initializer(graph, f"{name}_zp", zp))
    return values


def _to_gather_block_quantized(
    target: WeightSite, inputs: list[ir.Value], quant: blocks.Blockwise, counts: dict[str, int]
) -> None:
    """Each Gather becomes ``GatherBlockQuantized(data, ids, scales, [zero_points])``."""
    attributes = {
        "gather_axis": 0,
        "quantize_axis": 1,
        "block_size": quant.block,
        "bits": quant.bits,
    }
    for use in target.uses:
        node = use.node
        data, scales, *zp = inputs
        new = ir.node(
            "GatherBlockQuantized",
            [data, node.inputs[1], scales, *zp],
            attributes,
            domain=MS_DOMAIN,
            name=node.name,
        )
        replace_node(node, [new])
        add_count(counts, "gather", 1)


def _to_dequantize_linear(
    target: WeightSite, inputs: list[ir.Value], block: int, counts: dict[str, int]
) -> None:
    """One ``DequantizeLinear(axis=1, block_size)`` per graph; each Gather reads its output."""
    outputs: dict[int, ir.Value] = {}
    for use in target.uses:
        graph = use.node.graph
        if id(graph) not in outputs:
            attributes = {"axis": 1, "block_size": block}
            dq = ir.node("DequantizeLinear", inputs, attributes, name=f"{target.weight.name}_dq")
            graph.insert_before(next(iter(graph)), dq)
            outputs[id(graph)] = dq.outputs[0]
        use.node.replace_input_with(0, outputs[id(graph)])
        add_count(counts, "gather", 1)
