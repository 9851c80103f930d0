"""Ship a Conformer exported at opset 23 to a runtime that only knows opset 17, with the CLI.

What it shows: two Conformer blocks (macaron feed-forwards with RMSNorm and SiLU, self-attention
through ``F.scaled_dot_product_attention``, a convolution module with GLU, a depthwise conv,
BatchNorm and GELU; random weights, seed 0) exported by torch's dynamo exporter at opset 23,
which writes ``Attention``, ``RMSNormalization`` (opset 23) and ``Gelu`` (opset 20). The script
then does what a CI job would, with the ``onnxopt`` command:

1. ``onnxopt check model.onnx --target onnx-17`` lists what an opset-17 runtime cannot run
   (exit 3);
2. ``onnxopt run model.onnx -o model17.onnx --passes lower,fuse --target onnx-17`` decomposes
   those ops, converts the model to opset 17 and re-fuses only what opset 17 has, every pass
   verified against golden outputs;
3. ``onnxopt check model17.onnx --target onnx-17`` passes (exit 0).

It prints what ``lower`` replaced, and compares the two models in ONNX Runtime on a length the
golden set never used. The same in Python:
``onnxopt.optimize("model.onnx", "lower(target=onnx-17),fuse(target=onnx-17)", output=...)``.

Run it (about 11 s of CPU, the ``onnxopt`` commands included)::

    python examples/conformer_older_runtime.py
    python examples/conformer_older_runtime.py --target onnx-13 --out /tmp/conformer

It exits 1 when the lowered model is not clean for the target or its outputs differ from the
opset-23 export by more than ``--atol`` (1e-4), and with the command's exit code when an
``onnxopt`` command fails (2: a bad option or target; 3: verification failed).
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import _common as common
import numpy as np
import onnx
import torch
import torch.nn.functional as F
from torch import nn

D_MODEL, HEADS, KERNEL = 144, 4, 15


class FeedForward(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.norm = nn.RMSNorm(D_MODEL)
        self.up, self.down = nn.Linear(D_MODEL, 4 * D_MODEL), nn.Linear(4 * D_MODEL, D_MODEL)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(F.silu(self.up(self.norm(x))))


class ConformerBlock(nn.Module):
    """``x + ff/2``, ``+ attention``, ``+ conv module``, ``+ ff/2``, then LayerNorm."""

    def __init__(self) -> None:
        super().__init__()
        self.ff1, self.ff2 = FeedForward(), FeedForward()
        self.attn_norm, self.conv_norm = nn.LayerNorm(D_MODEL), nn.LayerNorm(D_MODEL)
        self.qkv, self.out = nn.Linear(D_MODEL, 3 * D_MODEL), nn.Linear(D_MODEL, D_MODEL)
        self.pointwise_in = nn.Conv1d(D_MODEL, 2 * D_MODEL, 1)
        self.depthwise = nn.Conv1d(D_MODEL, D_MODEL, KERNEL, padding=KERNEL // 2, groups=D_MODEL)
        self.batch_norm = nn.BatchNorm1d(D_MODEL)
        self.pointwise_out = nn.Conv1d(D_MODEL, D_MODEL, 1)
        self.final_norm = nn.LayerNorm(D_MODEL)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + 0.5 * self.ff1(x)
        b, t, _ = x.shape
        qkv = self.qkv(self.attn_norm(x)).view(b, t, 3, HEADS, D_MODEL // HEADS)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)
        context = F.scaled_dot_product_attention(q, k, v)
        x = x + self.out(context.transpose(1, 2).reshape(b, t, D_MODEL))
        c = F.glu(self.pointwise_in(self.conv_norm(x).transpose(1, 2)), dim=1)
        c = self.pointwise_out(F.gelu(self.batch_norm(self.depthwise(c))))
        x = x + c.transpose(1, 2)
        return self.final_norm(x + 0.5 * self.ff2(x))


def export(path: Path) -> None:
    """Dynamo export at opset 23, frames ``[batch, frames, 144]`` with a dynamic frame axis."""
    torch.manual_seed(0)
    model = nn.Sequential(ConformerBlock(), ConformerBlock()).eval()
    logging.getLogger("torch.onnx").setLevel(logging.ERROR)  # "torchvision is not installed"
    frames = torch.export.Dim("frames", min=2, max=2000)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(
            model,
            (torch.randn(1, 50, D_MODEL),),
            dynamo=True,
            opset_version=23,
            dynamic_shapes=({1: frames},),
            input_names=["x"],
            output_names=["y"],
            verbose=False,
        )
    program.save(str(path), external_data=False)


def onnxopt_cli(cwd: Path, *args: str) -> subprocess.CompletedProcess:
    """Run the ``onnxopt`` command installed beside this Python in ``cwd``, echoing it."""
    exe = Path(sys.executable).with_name("onnxopt")
    command = [str(exe) if exe.exists() else shutil.which("onnxopt") or "onnxopt", *args]
    print("$ onnxopt " + " ".join(args))
    return subprocess.run(command, cwd=cwd, capture_output=True, text=True, check=False)


class CliError(Exception):
    """An ``onnxopt`` command exited with an unexpected code; ``code`` and ``output`` are its."""

    def __init__(self, command: str, result: subprocess.CompletedProcess) -> None:
        super().__init__(f"onnxopt {command} exited {result.returncode}")
        self.code, self.output = result.returncode, result.stdout + result.stderr


def check(path: Path, target: str) -> list[str]:
    """What ``onnxopt check`` says the target cannot run: ``op xN`` and ``opset N`` items."""
    result = onnxopt_cli(path.parent, "check", path.name, "--target", target, "--json")
    if result.returncode not in (0, 3):  # 3: something is unsupported
        raise CliError("check", result)
    found = json.loads(result.stdout)["unsupported"]
    return [
        u["op_type"] if u["fix"] == "convert-opset" else f"{u['op_type']} x{u['count']}"
        for u in found
    ]


def lower(source: Path, lowered: Path, target: str) -> dict:
    """``onnxopt run --passes lower,fuse --target T``; its JSON report."""
    result = onnxopt_cli(
        source.parent, "run", source.name, "-o", lowered.name, "--passes", "lower,fuse",
        "--target", target, "--dim", "frames=120", "--report", "report.json",
    )  # fmt: skip
    if result.returncode != 0:
        raise CliError("run", result)
    return json.loads((source.parent / "report.json").read_text())


def main(argv: list[str] | None = None) -> int:
    args = _arguments(argv)
    with common.out_dir(args.out) as out:
        source, lowered = out / "conformer23.onnx", out / "conformer.lowered.onnx"
        export(source)
        try:
            before = check(source, args.target)
            report = lower(source, lowered, args.target)
            after = check(lowered, args.target)
        except CliError as err:
            print(err.output, end="")
            return common.verdict(False, str(err), err.code)
        rows, diff = _compare(source, lowered, before, after, args)
    print(f"\n{args.target} cannot run the export: {', '.join(before) or 'nothing'}")
    print(f"lower replaced: {_fired(report, 'lower')}")
    print(f"{args.target} cannot run the lowered model: {', '.join(after) or 'nothing'}")
    print(common.table(["", "opset-23 export", f"lower,fuse --target {args.target}"], rows))
    ok = not after and diff <= args.atol
    return common.verdict(ok, f"runs on {args.target}, max |diff| {diff:.1e} <= {args.atol}")


def _arguments(argv: list[str] | None) -> argparse.Namespace:
    p = common.parser(__doc__)
    p.add_argument("--target", default="onnx-17", help="target profile (onnx-13, onnx-17, ...)")
    p.add_argument("--atol", type=float, default=1e-4)
    return p.parse_args(argv)


def _fired(report: dict, name: str) -> str:
    counts = next((p["counts"] for p in report["passes"] if p["name"] == name), {})
    return ", ".join(f"{op}={n}" for op, n in counts.items()) or "nothing"


def _compare(
    source: Path, lowered: Path, before: list[str], after: list[str], args: argparse.Namespace
) -> tuple[list[list[object]], float]:
    """Table rows and the largest output difference on a frame count the golden set lacks."""
    x = np.random.default_rng(7).standard_normal((1, 237, D_MODEL)).astype(np.float32)
    sessions = [common.session(p, args.threads) for p in (source, lowered)]
    ref, got = (common.run(s, {"x": x})[0] for s in sessions)
    diff = common.max_abs(ref, got)
    ms = [common.latency_ms(s, {"x": x}, args.runs) for s in sessions]
    models = [onnx.load(str(p), load_external_data=False) for p in (source, lowered)]
    opsets = [
        next(o.version for o in m.opset_import if o.domain in ("", "ai.onnx")) for m in models
    ]
    rows: list[list[object]] = [
        ["opset", *opsets],
        ["onnxopt check", *(f"{len(found)} unsupported" for found in (before, after))],
        ["nodes", *(len(m.graph.node) for m in models)],
        ["size MB", *(f"{common.size_mb(p):.2f}" for p in (source, lowered))],
        ["latency ms", *(f"{t:.2f}" for t in ms)],
        ["max |diff| (237 frames)", "-", f"{diff:.1e}"],
    ]
    return rows, diff


if __name__ == "__main__":
    sys.exit(main())
