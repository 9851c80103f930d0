"""Export a tiny causal conv + GRU keyword spotter with random weights to ONNX.

A structural fixture for the ``stream`` pass and the docs' streaming how-to: 20 log-mel
features, a causal Conv1d front end with stride 2, one causal dilated conv block with a
residual, a GRU and a per-frame linear head over 4 keywords. The weights are random with a
fixed seed; only the graph matters.

Regenerate (from the repository root)::

    pip install torch==2.13.0 onnx onnxruntime numpy
    python golden/export_kws_gru.py --verify     # -> golden/kws_gru.onnx
    onnxopt golden golden/kws_gru.onnx -o golden/kws_gru.golden --dim batch=1 --dim time=64

Graph interface: input ``x`` float32 ``[batch, 20, time]``, output ``logits`` float32
``[batch, ceil(time / 2), 4]``; ``batch`` and ``time`` are dynamic.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

FEATURES = 20
CHANNELS = 24
KEYWORDS = 4
SEED = 0
OPSET = 17
DEFAULT_OUT = Path(__file__).resolve().parent / "kws_gru.onnx"


class CausalKWS(nn.Module):
    """Causal conv front end (stride 2), a dilated causal conv block, a GRU, a linear head."""

    def __init__(self) -> None:
        super().__init__()
        self.front = nn.Conv1d(FEATURES, CHANNELS, kernel_size=4, stride=2)
        self.block = nn.Conv1d(CHANNELS, CHANNELS, kernel_size=3, dilation=2)
        self.gru = nn.GRU(CHANNELS, CHANNELS, batch_first=True)
        self.head = nn.Linear(CHANNELS, KEYWORDS)

    def forward(self, x: Tensor) -> Tensor:  # x: [batch, features, time]
        x = F.relu(self.front(F.pad(x, (3, 0))))  # pad the past only: causal
        x = x + F.relu(self.block(F.pad(x, (4, 0))))  # (kernel - 1) * dilation frames
        y, _ = self.gru(x.transpose(1, 2))
        return self.head(y)  # [batch, time / 2, keywords]


def export(out: Path) -> CausalKWS:
    torch.manual_seed(SEED)
    model = CausalKWS().eval()
    torch.onnx.export(
        model,
        (torch.randn(1, FEATURES, 64),),
        str(out),
        dynamo=False,
        opset_version=OPSET,
        input_names=["x"],
        output_names=["logits"],
        dynamic_axes={"x": {0: "batch", 2: "time"}, "logits": {0: "batch", 1: "time_out"}},
    )
    return model


def verify(model: CausalKWS, out: Path) -> float:
    """Largest difference between ONNX Runtime and PyTorch over a few input shapes."""
    import onnx
    import onnxruntime as ort

    onnx.checker.check_model(onnx.load(str(out)), full_check=True)
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    worst = 0.0
    for shape in ((1, FEATURES, 64), (2, FEATURES, 37), (3, FEATURES, 10)):
        x = torch.randn(*shape)
        with torch.no_grad():
            expected = model(x).numpy()
        got = session.run(None, {"x": x.numpy()})[0]
        worst = max(worst, float(abs(got - expected).max()))
    return worst


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="Where to write the model.")
    parser.add_argument("--verify", action="store_true", help="Compare ORT with PyTorch.")
    args = parser.parse_args()
    model = export(args.out)
    print(f"wrote {args.out} ({args.out.stat().st_size} bytes)")
    if args.verify:
        worst = verify(model, args.out)
        print(f"max abs difference ORT vs PyTorch: {worst:.2e}")
        if worst > 1e-4:
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
