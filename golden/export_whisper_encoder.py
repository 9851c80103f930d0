"""Export a small, randomly initialised Whisper-style audio encoder to ONNX.

The model is a structural fixture for onnxopt: it has the op mix of a real
speech encoder (Conv1d front end, exact-erf GELU, sinusoidal positional
embedding, pre-LN multi-head self-attention, MLP, LayerNorm) at a tiny size
(d_model=128, 4 heads, FFN 512, 2 layers).  The weights are random with a
fixed seed; the numbers mean nothing, only the graph shape does.

Regenerate (from the repository root)::

    pip install torch==2.13.0 onnx onnxruntime onnxscript numpy
    python golden/export_whisper_encoder.py            # -> golden/whisper_encoder.onnx
    python golden/export_whisper_encoder.py --dynamo   # -> golden/whisper_encoder_dynamo.onnx

``--verify`` additionally runs the exported file with onnxruntime (CPU) and
compares it with the PyTorch model.

Graph interface:

* input ``mel``: float32 ``[batch, 80, frames]`` (``batch``/``frames`` dynamic)
* output ``hidden``: float32 ``[batch, ceil(frames / 2), 128]``
"""

from __future__ import annotations

import argparse
import math
import sys
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

N_MELS = 80
D_MODEL = 128
N_HEADS = 4
D_FFN = 512
N_LAYERS = 2
# Rows of the positional-embedding table: the encoder accepts up to
# 2 * MAX_POSITIONS mel frames.  (Whisper uses 1500; kept small here so the
# file stays small.)
MAX_POSITIONS = 256
SEED = 0
OPSET = 17

HERE = Path(__file__).resolve().parent
DEFAULT_OUT = HERE / "whisper_encoder.onnx"
DEFAULT_OUT_DYNAMO = HERE / "whisper_encoder_dynamo.onnx"


def sinusoids(length: int, channels: int, max_timescale: float = 10000.0) -> Tensor:
    """Whisper's sinusoidal positional embedding, shape ``[length, channels]``."""
    assert channels % 2 == 0
    log_timescale_increment = math.log(max_timescale) / (channels // 2 - 1)
    inv_timescales = torch.exp(
        -log_timescale_increment * torch.arange(channels // 2, dtype=torch.float32)
    )
    scaled_time = torch.arange(length, dtype=torch.float32)[:, None] * inv_timescales[None, :]
    return torch.cat([torch.sin(scaled_time), torch.cos(scaled_time)], dim=1)


class MultiHeadSelfAttention(nn.Module):
    """Self-attention written out op by op, as Whisper does (k has no bias)."""

    def __init__(self, d_model: int, n_heads: int) -> None:
        super().__init__()
        assert d_model % n_heads == 0
        self.n_heads = n_heads
        self.head_dim = d_model // n_heads
        self.scale = self.head_dim**-0.5
        self.query = nn.Linear(d_model, d_model)
        self.key = nn.Linear(d_model, d_model, bias=False)
        self.value = nn.Linear(d_model, d_model)
        self.out = nn.Linear(d_model, d_model)

    def _split_heads(self, x: Tensor) -> Tensor:
        # [B, T, D] -> [B, H, T, Dh]
        b, t, _ = x.shape
        return x.view(b, t, self.n_heads, self.head_dim).transpose(1, 2)

    def forward(self, x: Tensor) -> Tensor:
        b, t, d = x.shape
        q = self._split_heads(self.query(x) * self.scale)
        k = self._split_heads(self.key(x))
        v = self._split_heads(self.value(x))
        scores = torch.matmul(q, k.transpose(-1, -2))  # [B, H, T, T]
        weights = torch.softmax(scores, dim=-1)
        ctx = torch.matmul(weights, v)  # [B, H, T, Dh]
        ctx = ctx.transpose(1, 2).reshape(b, t, d)
        return self.out(ctx)


class ResidualAttentionBlock(nn.Module):
    """Pre-LN transformer block: x + attn(ln(x)), then x + mlp(ln(x))."""

    def __init__(self, d_model: int, n_heads: int, d_ffn: int) -> None:
        super().__init__()
        self.attn_ln = nn.LayerNorm(d_model)
        self.attn = MultiHeadSelfAttention(d_model, n_heads)
        self.mlp_ln = nn.LayerNorm(d_model)
        self.mlp = nn.Sequential(
            nn.Linear(d_model, d_ffn),
            nn.GELU(approximate="none"),
            nn.Linear(d_ffn, d_model),
        )

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.attn_ln(x))
        return x + self.mlp(self.mlp_ln(x))


class WhisperEncoder(nn.Module):
    """Whisper-style audio encoder: mel ``[B, 80, T]`` -> hidden ``[B, ceil(T/2), D]``."""

    def __init__(
        self,
        n_mels: int = N_MELS,
        d_model: int = D_MODEL,
        n_heads: int = N_HEADS,
        d_ffn: int = D_FFN,
        n_layers: int = N_LAYERS,
        max_positions: int = MAX_POSITIONS,
    ) -> None:
        super().__init__()
        self.conv1 = nn.Conv1d(n_mels, d_model, kernel_size=3, padding=1)
        self.conv2 = nn.Conv1d(d_model, d_model, kernel_size=3, stride=2, padding=1)
        self.register_buffer("positional_embedding", sinusoids(max_positions, d_model))
        self.blocks = nn.ModuleList(
            ResidualAttentionBlock(d_model, n_heads, d_ffn) for _ in range(n_layers)
        )
        self.ln_post = nn.LayerNorm(d_model)

    def forward(self, mel: Tensor) -> Tensor:
        x = F.gelu(self.conv1(mel))
        x = F.gelu(self.conv2(x))
        x = x.permute(0, 2, 1)  # [B, T', D]
        pos: Tensor = self.positional_embedding
        x = x + pos[: x.shape[1]]
        for block in self.blocks:
            x = block(x)
        return self.ln_post(x)


def build_model() -> WhisperEncoder:
    """The fixture model: random weights from ``torch.manual_seed(SEED)``, eval mode."""
    torch.manual_seed(SEED)
    model = WhisperEncoder()
    # Default init leaves LayerNorm at weight=1/bias=0; randomise them too so a
    # rewrite that drops an affine parameter changes the output.
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.LayerNorm):
                module.weight.uniform_(0.5, 1.5)
                module.bias.uniform_(-0.1, 0.1)
    return model.eval()


def example_input(batch: int = 1, frames: int = 64, seed: int = 1) -> Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(batch, N_MELS, frames, generator=gen)


def export_torchscript(model: nn.Module, out: Path) -> None:
    with warnings.catch_warnings():
        # The TorchScript exporter is deprecated in favour of dynamo; it is used on purpose.
        warnings.simplefilter("ignore", DeprecationWarning)
        _export_torchscript(model, out)


def _export_torchscript(model: nn.Module, out: Path) -> None:
    torch.onnx.export(
        model,
        (example_input(),),
        str(out),
        dynamo=False,
        opset_version=OPSET,
        input_names=["mel"],
        output_names=["hidden"],
        dynamic_axes={
            "mel": {0: "batch", 2: "frames"},
            "hidden": {0: "batch", 1: "enc_frames"},
        },
        do_constant_folding=True,
    )


def export_dynamo(model: nn.Module, out: Path) -> None:
    frames = torch.export.Dim("frames", min=2, max=2 * MAX_POSITIONS)
    batch = torch.export.Dim("batch", min=1, max=1024)
    program = torch.onnx.export(
        model,
        (example_input(),),
        dynamo=True,
        opset_version=OPSET,
        input_names=["mel"],
        output_names=["hidden"],
        dynamic_shapes={"mel": {0: batch, 2: frames}},
        external_data=False,
        optimize=True,
    )
    assert program is not None
    program.save(str(out), external_data=False)


def verify(model: nn.Module, out: Path) -> float:
    """Check the file and compare onnxruntime (CPU) against PyTorch; return the max |diff|."""
    import numpy as np
    import onnx
    import onnxruntime as ort

    onnx.checker.check_model(onnx.load(str(out)), full_check=True)
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    worst = 0.0
    for batch, frames in [(1, 64), (2, 100), (3, 37)]:
        mel = example_input(batch, frames, seed=frames)
        with torch.no_grad():
            expected = model(mel).numpy()
        (got,) = session.run(["hidden"], {"mel": mel.numpy()})
        assert got.shape == expected.shape, (got.shape, expected.shape)
        diff = float(np.abs(got - expected).max())
        print(
            f"  mel [{batch}, {N_MELS}, {frames}] -> hidden {list(got.shape)}:",
            f"max|diff| = {diff:.3g}",
        )
        worst = max(worst, diff)
    return worst


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=None, help="output .onnx path")
    parser.add_argument(
        "--dynamo", action="store_true", help="use the dynamo (torch.export) exporter"
    )
    parser.add_argument(
        "--verify", action="store_true", help="check the file and compare with onnxruntime"
    )
    args = parser.parse_args(argv)
    out: Path = args.out or (DEFAULT_OUT_DYNAMO if args.dynamo else DEFAULT_OUT)

    model = build_model()
    if args.dynamo:
        export_dynamo(model, out)
    else:
        export_torchscript(model, out)
    print(f"wrote {out} ({out.stat().st_size} bytes)")

    if args.verify:
        worst = verify(model, out)
        if worst >= 1e-4:
            print(f"FAIL: max|diff| {worst:.3g} >= 1e-4", file=sys.stderr)
            return 1
        print("OK")
    return 0


if __name__ == "__main__":
    sys.exit(main())
