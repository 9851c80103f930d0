"""Quantize constant MatMul/Gemm weights to 8 bits: MatMulNBits, int8 QDQ, or dynamic int8."""

from __future__ import annotations

from typing import ClassVar, Literal

import numpy as np
import onnx_ir as ir

from onnxopt.pass_api import PassResult
from onnxopt.passes._weight_quant import (
    FusedOp,
    WeightSite,
    add_initializer,
    owner,
    require_opset,
    to_matmul_nbits,
    weight_rows,
    wire_dequantized,
)
from onnxopt.passes.quant_int4 import QuantInt4Pass
from onnxopt.quant import blocks
from onnxopt.registry import register_pass


@register_pass
class QuantInt8Pass(QuantInt4Pass):
    """Quantize constant MatMul/Gemm weights to 8 bits (MatMulNBits, int8 QDQ or dynamic int8).

    Finds, counts and skips weights exactly as ``quant-int4`` (rules ``matmul``,
    ``matmul-transposed``, ``gemm``); the formats:
      1. ``matmulnbits``: 8-bit blocks along K in ``com.microsoft::MatMulNBits`` (``algo``,
         ``block``, ``symmetric`` and ``accuracy_level`` as in ``quant-int4``).
      2. ``qdq``: int8 per output channel, ``DequantizeLinear(q, scale[N], axis=1)`` feeding the
         original MatMul/Gemm (opset 13 or later; a lower opset is converted).
      3. ``dynamic``: int8 per output channel in ``com.microsoft::DynamicQuantizeMatMul``; ORT
         quantizes the activations to uint8 at run time and multiplies in integers.
    ``qdq`` and ``dynamic`` take float32 weights only (``skipped-dtype`` otherwise).
    """

    name = "quant-int8"
    bits: ClassVar[int] = 8
    algo: Literal["rtn", "kquant"] = "rtn"
    format: Literal["matmulnbits", "qdq", "dynamic"] = "matmulnbits"

    def skip_reason(self, node: ir.Node, weight: ir.Value) -> tuple[str, str]:
        reason = super().skip_reason(node, weight)
        if reason[0] or self.format == "matmulnbits":
            return reason
        if weight.const_value.dtype != ir.DataType.FLOAT:
            return f"format={self.format} takes float32 weights only", "skipped-dtype"
        return "", ""

    def prepare(self, model: ir.Model, result: PassResult) -> bool:
        if self.format == "qdq":
            return require_opset(model, 13, result)
        return super(QuantInt4Pass, self).prepare(model, result)

    def rewrite(
        self, model: ir.Model, target: WeightSite, counts: dict[str, int]
    ) -> tuple[int, float | None]:
        if self.format == "matmulnbits":
            quant = self.quantize(weight_rows(target))
            return to_matmul_nbits(target, quant, self.accuracy_level, counts), quant.rel_error
        rows = weight_rows(target, stream=False)
        q, scales = blocks.per_channel_int8(rows)  # [N, K], [N]
        error = blocks.relative_error(rows, q, scales)
        if self.format == "qdq":
            return _to_dequantize_linear(target, q, scales, counts), error
        return _to_dynamic(target, q, scales, counts), error


def _to_dequantize_linear(
    target: WeightSite, q: np.ndarray, scales: np.ndarray, counts: dict[str, int]
) -> int:
    """Every use reads ``DequantizeLinear(q[K, N], scales[N], axis=1)``."""
    graph, name = owner(target), target.weight.name
    dtype = target.weight.const_value.dtype.numpy()
    inputs = [
        add_initializer(graph, f"{name}_q8", ir.tensor(np.ascontiguousarray(q.T))),
        add_initializer(graph, f"{name}_scales", ir.tensor(scales.astype(dtype))),
    ]
    return wire_dequantized(target, inputs, {"axis": 1}, counts)


def _to_dynamic(
    target: WeightSite, q: np.ndarray, scales: np.ndarray, counts: dict[str, int]
) -> int:
    """Every use becomes ``DynamicQuantizeMatMul(A, q[K, N], scales[N], -, bias)``."""
    b = add_initializer(owner(target), f"{target.weight.name}_q8", ir.tensor(q.T.copy()))

    def inputs(a: ir.Value, scale: ir.Value, bias: ir.Value | None) -> list[ir.Value | None]:
        return [a, b, scale, None, bias]

    fused = FusedOp("DynamicQuantizeMatMul", {}, inputs)
    return b.const_value.nbytes + fused.replace_uses(target, scales, counts)
