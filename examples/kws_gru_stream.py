"""Make a causal conv + GRU keyword spotter streaming, and drive it chunk by chunk.

What it shows: a keyword spotter (a strided causal Conv1d front end, a TCN with dilations 1, 2
and 4, a GRU and a linear head; random weights, seed 0) is exported from PyTorch for whole
utterances. ``onnxopt.optimize(..., "stream(chunk=16)")`` rewrites it to take 16 frames at a
time plus its states (a cache per conv, the GRU's hidden state), verified by onnxopt over
several chunkings. ``onnxopt.StreamingSession`` then feeds a new utterance chunk by chunk; the
script checks that the concatenated chunk outputs equal the offline model's on the whole
utterance, and compares one streaming step with what a non-streaming service does on each new
chunk: run the offline model again over everything received so far.

Run it (about 3 s of CPU)::

    python examples/kws_gru_stream.py
    python examples/kws_gru_stream.py --frames 800 --chunk 32 --out /tmp/kws

It exits 1 when the streamed outputs differ from the offline ones by more than ``--atol``
(1e-4), and with onnxopt's exit code when the pass is refused or fails (2: a bad option, such as
an odd ``--chunk``; 3: verification failed; 4: the model cannot stream).
"""

from __future__ import annotations

import argparse
import sys
import time
import warnings
from pathlib import Path

import _common as common
import numpy as np
import onnxruntime as ort
import torch
import torch.nn.functional as F
from torch import nn

import onnxopt

FEATURES, CHANNELS, KEYWORDS = 40, 64, 12


class CausalKWS(nn.Module):
    """features ``[batch, 40, time]`` -> logits ``[batch, time / 2, 12]``; reads no future frame."""

    def __init__(self) -> None:
        super().__init__()
        self.front = nn.Conv1d(FEATURES, CHANNELS, kernel_size=4, stride=2)
        self.tcn = nn.ModuleList(
            nn.Conv1d(CHANNELS, CHANNELS, kernel_size=3, dilation=d) for d in (1, 2, 4)
        )
        self.gru = nn.GRU(CHANNELS, CHANNELS, batch_first=True)
        self.head = nn.Linear(CHANNELS, KEYWORDS)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.front(F.pad(x, (3, 0))))  # pad the past only: causal
        for conv in self.tcn:
            x = x + F.relu(conv(F.pad(x, (2 * conv.dilation[0], 0))))
        y, _ = self.gru(x.transpose(1, 2))
        return self.head(y)


def export(path: Path) -> None:
    """TorchScript export with a dynamic batch and time axis (opset 17)."""
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation notice
        torch.onnx.export(
            CausalKWS().eval(),
            (torch.randn(1, FEATURES, 100),),
            str(path),
            dynamo=False,
            opset_version=17,
            input_names=["x"],
            output_names=["logits"],
            dynamic_axes={"x": {0: "batch", 2: "time"}, "logits": {0: "batch", 1: "time"}},
        )


def main(argv: list[str] | None = None) -> int:
    args = _arguments(argv)
    with common.out_dir(args.out) as out:
        offline_path, stream_path = out / "kws.onnx", out / f"kws.stream{args.chunk}.onnx"
        export(offline_path)
        _, report = onnxopt.optimize(
            offline_path,
            f"stream(chunk={args.chunk})",
            dims={"batch": 1, "time": 200},
            output=stream_path,
        )
        print(common.pass_table(report))
        if not report.ok:
            return common.verdict(False, common.failures(report), report.exit_code)
        rows, diff = _measure(offline_path, stream_path, args)
    setup = f"ORT CPU, {args.threads} thread"
    print(f"\nutterance: {args.frames} frames, chunks of {args.chunk} ({setup})")
    print("per chunk: offline = rerun over every frame so far; streaming = one step with states")
    print(common.table(["", "offline", "streaming", "ratio"], rows))
    return common.verdict(diff <= args.atol, f"streamed == offline (max |diff| {diff:.1e})")


def _arguments(argv: list[str] | None) -> argparse.Namespace:
    p = common.parser(__doc__)
    p.add_argument(
        "--chunk", type=common.positive, default=16, help="frames per chunk (even: stride 2)"
    )
    p.add_argument(
        "--frames", type=common.positive, default=1000, help="frames in the test utterance"
    )
    p.add_argument("--atol", type=float, default=1e-4)
    p.set_defaults(runs=5)
    return p.parse_args(argv)


def _measure(
    offline_path: Path, stream_path: Path, args: argparse.Namespace
) -> tuple[list[list[object]], float]:
    """Table rows and the largest difference between streamed and offline logits."""
    x = np.random.default_rng(7).standard_normal((1, FEATURES, args.frames)).astype(np.float32)
    offline = common.session(offline_path, args.threads)
    stream = onnxopt.StreamingSession(
        stream_path, session_options=common.session_options(args.threads)
    )
    expected = common.run(offline, {"x": x})[0]
    streamed = stream.run({"x": x})["logits"]
    diff = common.max_abs(expected, streamed) if expected.shape == streamed.shape else np.inf
    step_ms, recompute_ms = _chunk_times(offline, stream, x, args.runs)
    mean_step, mean_recompute = float(np.mean(step_ms)), float(np.mean(recompute_ms))
    nodes = (common.op_counts(offline_path).total(), common.op_counts(stream_path).total())
    rows: list[list[object]] = [
        ["nodes", nodes[0], nodes[1], common.ratio(*nodes)],
        ["states", 0, len(stream.spec.states), ""],
        ["logits shape", list(expected.shape), list(streamed.shape), ""],
        ["max |diff|", "-", f"{diff:.1e}", ""],
        ["ms per chunk (mean)", f"{mean_recompute:.3f}", f"{mean_step:.3f}",
         common.ratio(mean_recompute, mean_step)],
        ["ms last chunk", f"{recompute_ms[-1]:.3f}", f"{step_ms[-1]:.3f}",
         common.ratio(recompute_ms[-1], step_ms[-1])],
    ]  # fmt: skip
    return rows, diff


def _chunk_times(
    offline: ort.InferenceSession, stream: onnxopt.StreamingSession, x: np.ndarray, runs: int
) -> tuple[list[float], list[float]]:
    """Per chunk, the best of ``runs`` passes over the utterance: one streaming step, and the
    offline model recomputing every frame received so far (what a non-streaming service does)."""
    chunks = list(stream.chunks({"x": x}))
    step = [np.inf] * len(chunks)
    recompute = [np.inf] * len(chunks)
    for _ in range(max(1, runs)):
        state = stream.initial_state({"x": x})
        received = 0
        for i, feeds in enumerate(chunks):
            start = time.perf_counter()
            _, state = stream.step(feeds, state)
            step[i] = min(step[i], 1e3 * (time.perf_counter() - start))
            received += feeds["x"].shape[2]
            start = time.perf_counter()
            offline.run(None, {"x": x[:, :, :received]})
            recompute[i] = min(recompute[i], 1e3 * (time.perf_counter() - start))
    return step, recompute


if __name__ == "__main__":
    sys.exit(main())
