"""Fuse and int4-quantize a Whisper-style encoder exported from PyTorch.

What it shows: a speech encoder (two Conv1d + GELU front end, sinusoidal positions, pre-LN
transformer blocks with exact GELU; random weights, seed 0) is exported with
``torch.onnx.export``, then ``onnxopt.optimize(..., "fuse,quant-int4")`` fuses attention,
LayerNorms, residual Adds and GELUs into ONNX Runtime's fused operators, packs the MatMul
weights to 4 bits (MatMulNBits, k-quant, block 32) and the front-end Conv weights to int8 per
channel (``Cast(q) * scales``, folded back by ORT at load). Every pass is verified by onnxopt
against golden outputs; the script then measures, with ONNX Runtime on CPU, what a user gets: nodes,
fused op counts, file size, median latency, and the outputs' cosine and max error against the
fp32 export on an input the golden set never saw.

Run it (about 5 s of CPU with the TorchScript exporter, 9 s with dynamo)::

    python examples/whisper_encoder_fuse_int4.py
    python examples/whisper_encoder_fuse_int4.py --exporter dynamo --out /tmp/whisper

It exits 1 when the optimized model's cosine to the fp32 model drops below ``--min-cosine``
(0.99), and with onnxopt's exit code (3 when verification failed) when a pass was rolled back,
so it works as a regression check.
"""

from __future__ import annotations

import argparse
import logging
import math
import sys
import warnings
from pathlib import Path

import _common as common
import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

import onnxopt

N_MELS, D_MODEL, HEADS, FFN, LAYERS, MAX_FRAMES = 80, 256, 4, 1024, 4, 200
SHOWN_OPS = (
    "MultiHeadAttention",
    "SkipLayerNormalization",
    "LayerNormalization",
    "Gelu",
    "BiasGelu",
    "MatMulNBits",
)


class Block(nn.Module):
    """Pre-LN transformer block: ``x + attn(ln(x))``, then ``x + mlp(ln(x))``."""

    def __init__(self) -> None:
        super().__init__()
        self.attn_ln, self.mlp_ln = nn.LayerNorm(D_MODEL), nn.LayerNorm(D_MODEL)
        self.qkv = nn.ModuleList(nn.Linear(D_MODEL, D_MODEL) for _ in range(3))
        self.out = nn.Linear(D_MODEL, D_MODEL)
        self.mlp = nn.Sequential(nn.Linear(D_MODEL, FFN), nn.GELU(), nn.Linear(FFN, D_MODEL))

    def attention(self, x: torch.Tensor) -> torch.Tensor:
        b, t, _ = x.shape
        q, k, v = (p(x).view(b, t, HEADS, -1).transpose(1, 2) for p in self.qkv)
        scores = q @ k.transpose(-1, -2) / math.sqrt(D_MODEL // HEADS)
        ctx = torch.softmax(scores, dim=-1) @ v
        return self.out(ctx.transpose(1, 2).reshape(b, t, D_MODEL))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attention(self.attn_ln(x))
        return x + self.mlp(self.mlp_ln(x))


class Encoder(nn.Module):
    """mel ``[batch, 80, frames]`` -> hidden ``[batch, ceil(frames / 2), 256]``."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv1d(N_MELS, D_MODEL, 3, padding=1)
        self.conv2 = nn.Conv1d(D_MODEL, D_MODEL, 3, stride=2, padding=1)
        positions = torch.arange(MAX_FRAMES // 2)[:, None]
        freqs = torch.exp(-math.log(10000.0) * torch.arange(D_MODEL // 2) / (D_MODEL // 2 - 1))
        table = torch.cat([torch.sin(positions * freqs), torch.cos(positions * freqs)], dim=1)
        self.register_buffer("positions", table)
        self.blocks = nn.ModuleList(Block() for _ in range(LAYERS))
        self.ln_post = nn.LayerNorm(D_MODEL)

    def forward(self, mel: torch.Tensor) -> torch.Tensor:
        x = F.gelu(self.conv2(F.gelu(self.conv1(mel)))).transpose(1, 2)
        x = x + self.positions[: x.shape[1]]
        for block in self.blocks:
            x = block(x)
        return self.ln_post(x)


def build() -> Encoder:
    """The encoder with seeded random weights; LayerNorm affines randomised too."""
    torch.manual_seed(0)
    model = Encoder().eval()
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.LayerNorm):
                module.weight.uniform_(0.5, 1.5)
                module.bias.uniform_(-0.1, 0.1)
    return model


def export(model: nn.Module, path: Path, exporter: str) -> None:
    """``torch.onnx.export`` with dynamic batch and frames (opset 17; 18 for dynamo, its lowest)."""
    example = (torch.randn(1, N_MELS, 100),)
    names = {"input_names": ["mel"], "output_names": ["hidden"]}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # TorchScript exporter deprecation, dynamo's notices
        if exporter == "torchscript":
            axes = {"mel": {0: "batch", 2: "frames"}, "hidden": {0: "batch", 1: "enc_frames"}}
            torch.onnx.export(
                model,
                example,
                str(path),
                dynamo=False,
                opset_version=17,
                dynamic_axes=axes,
                **names,
            )
            return
        logging.getLogger("torch.onnx").setLevel(logging.ERROR)  # "torchvision is not installed"
        frames = torch.export.Dim("frames", min=2, max=MAX_FRAMES)
        shapes = {"mel": {0: torch.export.Dim("batch", max=64), 2: frames}}
        program = torch.onnx.export(
            model,
            example,
            dynamo=True,
            opset_version=18,
            dynamic_shapes=shapes,
            verbose=False,
            **names,
        )
        program.save(str(path), external_data=False)


def main(argv: list[str] | None = None) -> int:
    args = _arguments(argv)
    with common.out_dir(args.out) as out:
        source, target = out / f"encoder_{args.exporter}.onnx", out / "encoder.fuse-int4.onnx"
        export(build(), source, args.exporter)
        _, report = onnxopt.optimize(
            source, "fuse,quant-int4", dims={"batch": 1, "frames": 160}, output=target
        )
        print(common.pass_table(report))
        if not report.ok:
            return common.verdict(False, common.failures(report), report.exit_code)
        rows, cos = _measure(source, target, args)
    print(f"\nexporter: {args.exporter}; measured in ORT on mel [1, 80, 160], {args.runs} runs")
    print(common.table(["", "fp32 export", "fuse,quant-int4", "ratio"], rows))
    return common.verdict(cos >= args.min_cosine, f"cosine {cos:.4f} >= {args.min_cosine}")


def _arguments(argv: list[str] | None) -> argparse.Namespace:
    p = common.parser(__doc__)
    p.add_argument("--exporter", choices=["torchscript", "dynamo"], default="torchscript")
    p.add_argument("--min-cosine", type=float, default=0.99)
    return p.parse_args(argv)


def _measure(
    source: Path, target: Path, args: argparse.Namespace
) -> tuple[list[list[object]], float]:
    """The table rows (nodes, fused ops, size, latency, accuracy) and the output cosine."""
    mel = np.random.default_rng(7).standard_normal((1, N_MELS, 160)).astype(np.float32)
    before, after = common.session(source, args.threads), common.session(target, args.threads)
    ref, got = common.run(before, {"mel": mel})[0], common.run(after, {"mel": mel})[0]
    ops_before, ops_after = common.op_counts(source), common.op_counts(target)
    mb_before, mb_after = common.size_mb(source), common.size_mb(target)
    ms_before = common.latency_ms(before, {"mel": mel}, args.runs)
    ms_after = common.latency_ms(after, {"mel": mel}, args.runs)
    n_before, n_after = ops_before.total(), ops_after.total()
    rows: list[list[object]] = [["nodes", n_before, n_after, common.ratio(n_before, n_after)]]
    shown = [op for op in SHOWN_OPS if ops_before[op] or ops_after[op]]
    rows += [[op, ops_before[op], ops_after[op], ""] for op in shown]
    cos = common.cosine(ref, got)
    rows += [
        ["size MB", f"{mb_before:.2f}", f"{mb_after:.2f}", common.ratio(mb_before, mb_after)],
        ["latency ms", f"{ms_before:.2f}", f"{ms_after:.2f}", common.ratio(ms_before, ms_after)],
        ["cosine", "1.0000", f"{cos:.4f}", ""],
        ["max |error|", "0", f"{common.max_abs(ref, got):.4f}", ""],
    ]
    return rows, cos


if __name__ == "__main__":
    sys.exit(main())
