"""Quantize constant MatMul/Gemm weights to 4 bits in blocks: MatMulNBits or INT4 QDQ."""

from __future__ import annotations

import dataclasses
from typing import ClassVar, Literal

import numpy as np
import onnx_ir as ir

from onnxopt.pass_api import PassResult
from onnxopt.passes._weight_quant import (
    FileRows,
    WeightQuantPass,
    WeightSite,
    add_initializer,
    owner,
    require_opset,
    to_matmul_nbits,
    weight_rows,
    wire_dequantized,
)
from onnxopt.quant import blocks, kquant, packing
from onnxopt.registry import register_pass


@register_pass
class QuantInt4Pass(WeightQuantPass):
    """Quantize constant MatMul/Gemm weights to 4 bits in blocks (MatMulNBits or INT4 QDQ).

    Conv weights, which no 4-bit kernel takes, go to int8 per channel (drop ``Conv`` from
    ``ops`` to keep them in float).

    Rules (counted per rewritten node; ``skipped-*`` count uses left in float, with reasons in
    ``misses``):
      1. ``matmul``: ``MatMul(A, W)``, ``W`` a constant ``[K, N]``.
      2. ``matmul-transposed``: ``MatMul(A, Transpose(W))``, ``W`` a constant ``[N, K]``.
      3. ``gemm``: ``Gemm(A, B, C)`` with constant ``B`` (``transB`` either way, ``transA=0``);
         ``alpha`` goes into the scales and a per-column constant ``beta * C`` into the bias,
         any other ``C`` into an ``Add`` after.
      4. ``conv``: a constant ``Conv`` weight becomes int8 per output channel behind
         ``DequantizeLinear`` (no ORT kernel takes 4-bit Conv weights; opset 13+).
    A weight shared by several nodes is quantized once. ``format=matmulnbits`` emits
    ``com.microsoft::MatMulNBits`` (ORT); ``format=qdq`` emits standard INT4/UINT4 blocked
    ``DequantizeLinear`` (opset 21; the model's opset is converted when lower) feeding the
    original MatMul/Gemm. Blocks run along K; ``symmetric`` blocks store no zero point.
    """

    name = "quant-int4"
    bits: ClassVar[int] = 4
    supported_ops: ClassVar[tuple[str, ...]] = ("MatMul", "Gemm", "Conv")
    ops: list[str] = dataclasses.field(default_factory=lambda: ["MatMul", "Gemm", "Conv"])
    algo: Literal["rtn", "kquant"] = "kquant"
    block: int = 32
    symmetric: bool = True
    accuracy_level: int = 4
    format: Literal["matmulnbits", "qdq"] = "matmulnbits"
    importance: Literal["uniform", "magnitude"] = "magnitude"

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.block not in (16, 32, 64, 128, 256):
            raise ValueError(f"block must be 16, 32, 64, 128 or 256, not {self.block}")
        if self.accuracy_level not in range(5):
            raise ValueError(f"accuracy_level must be 0 to 4, not {self.accuracy_level}")

    def quantize(self, rows: np.ndarray | FileRows) -> blocks.Blockwise:
        options = {"bits": self.bits, "block": self.block, "symmetric": self.symmetric}
        options["along_k"] = getattr(rows, "along_k", None)
        if self.algo == "rtn":
            return blocks.rtn(rows, **options)
        return kquant.kquant(rows, importance=self.importance, **options)

    def prepare(self, model: ir.Model, result: PassResult) -> bool:
        if self.format == "matmulnbits":
            return super().prepare(model, result)
        return require_opset(model, 21, result)

    def rewrite(
        self, model: ir.Model, target: WeightSite, counts: dict[str, int]
    ) -> tuple[int, float | None]:
        quant = self.quantize(weight_rows(target))
        if self.format == "qdq":
            return to_dequantize_linear(target, quant, counts), quant.rel_error
        return to_matmul_nbits(target, quant, self.accuracy_level, counts), quant.rel_error


def to_dequantize_linear(
    target: WeightSite, quant: blocks.Blockwise, counts: dict[str, int]
) -> int:
    """Every use reads ``DequantizeLinear(q, scales, [zp], axis=0, block_size)``, ``[K, N]``."""
    graph, name = owner(target), target.weight.name
    tensors = packing.dequantize_linear_int4(quant)
    k, n, kb = quant.k, quant.n, quant.k_blocks
    dtype = ir.DataType.INT4 if tensors["signed"] else ir.DataType.UINT4
    scales = tensors["scales"].astype(target.weight.const_value.dtype.numpy())
    inputs = [
        add_initializer(graph, f"{name}_q4", ir.PackedTensor(tensors["data"], dtype, shape=[k, n])),
        add_initializer(graph, f"{name}_scales", ir.tensor(scales)),
    ]
    if "zero_points" in tensors:
        zp = ir.PackedTensor(tensors["zero_points"], ir.DataType.UINT4, shape=[kb, n])
        inputs.append(add_initializer(graph, f"{name}_zp", zp))
    return wire_dequantized(target, inputs, {"axis": 0, "block_size": quant.block}, counts)
