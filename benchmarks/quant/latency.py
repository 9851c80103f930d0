"""ORT CPU latency of quant-int4 / quant-int8 variants against fp32, on speech-encoder shapes.

Run it (times on 2 shared cores; results and conclusions in ``LATENCY.md`` beside this file)::

    /work/venv/bin/python benchmarks/quant/latency.py [--json /tmp/latency.json]  # 5-15 min
    /work/venv/bin/python benchmarks/quant/latency.py --cases tiny-30s --quick     # 5-10 min
    /work/venv/bin/python benchmarks/quant/latency.py --sweep                      # ~3 min

Models (torch 2.13, random weights, TorchScript export at opset 17, built once into ``--work``):

- ``whisper-tiny`` / ``whisper-base``: ``golden/export_whisper_encoder.py``'s encoder (conv front
  end, pre-LN transformer, exact GELU) at d_model 384 / 512, 6 / 8 heads, FFN 1536 / 2048, 4 / 6
  layers, 1500 positions. Run on a streaming chunk (``mel`` 300 frames -> 150 rows per MatMul)
  and, for tiny, on a full 30 s window (3000 -> 1500 rows).
- ``ffn-K{K}-M{rows}`` (``--sweep``): ``MatMul(Relu(MatMul(x, W1[K, 4K])), W2[4K, K])`` in
  onnx.helper, K 256/384/512, 1-1500 rows.
- ``conformer``: 6 Conformer-like blocks (half-step SiLU FFNs, self-attention, a conv module of
  pointwise Conv1d, GLU, depthwise Conv1d k=15, BatchNorm, SiLU), d_model 256, 4 heads, FFN 1024,
  behind a Linear 80 -> 256 front end; 250 frames (10 s after 4x subsampling).

Variants (onnxopt pipelines, built with ``onnxopt.optimize(..., verify=False)``):
``fp32``; ``fuse``; ``quant-int4(accuracy_level=L, block=B)`` for L in 0/1/4 and B in 32/64/128;
``quant-int4(ops=[MatMul,Gemm])`` (Conv left in float); ``fuse,quant-int4`` (block 32 and
128); ``quant-int8`` (8-bit MatMulNBits, level 4) and ``quant-int8(format=dynamic)``;
``ort-default``: ORT's
``MatMulNBitsQuantizer`` with every argument at its default (block 128, asymmetric, no
accuracy_level). Only through ``--variants``: ``int4-L4-b256``, ``int8-L4-b128``, ``simplify``
and ``fuse`` with one fusion left out (``fuse-no-*``). All 4-bit variants use ``algo=rtn`` only
to build faster: ``kquant`` (the default) writes the same tensors' shapes and dtypes (symmetric,
no zero points), so the kernel and its latency are the same.

Method: per (model, threads), one ORT session per variant (``onnxopt.latency.session_options``:
ORT_ENABLE_ALL, ``threads`` intra-op threads), 3 warm-up runs each, then ``--runs`` timed runs
per variant, interleaved run by run (each step runs every variant once, in a new random order), so
load from other users hits all variants alike. A round gives each variant's median and its ratio
to fp32's median; ``--rounds`` rounds (new sessions each) give the ratio's median and its spread
(min-max across rounds). ``SNR dB``: each variant's output against fp32's on the same input.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import logging
import statistics
import sys
import time
import warnings
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
WORK = Path("/tmp/onnxopt-quant-latency")

INT4 = "quant-int4(algo=rtn,accuracy_level={level},block={block})"
VARIANTS = {
    "fp32": None,
    "fuse": "fuse",
    **{
        f"int4-L{level}-b{block}": INT4.format(level=level, block=block)
        for level in (0, 1, 4)
        for block in (32, 64, 128)
    },
    "int4-L4-b256": INT4.format(level=4, block=256),
    "int4-L4-b32-noconv": "quant-int4(algo=rtn,ops=[MatMul,Gemm])",
    "fuse+int4-L4-b32": "fuse,quant-int4(algo=rtn)",
    "fuse+int4-L4-b128": "fuse,quant-int4(algo=rtn,block=128)",
    "int8-L4-b32": "quant-int8",
    "int8-L4-b128": "quant-int8(block=128)",
    "int8-dynamic": "quant-int8(format=dynamic)",
    "ort-default": "ort",
}
MAIN = [v for v in VARIANTS if v not in ("int4-L4-b256", "int8-L4-b128")]
FUSE = "simplify,fuse-layer-norm,fuse-rms-norm,fuse-gelu,fuse-rotary,fuse-attention,"
FUSE += "fuse-skip-layer-norm,fuse-bias,cleanup"
# --variants only: which part of `fuse` changes latency
VARIANTS |= {
    "simplify": "simplify",
    "fuse-no-attention": FUSE.replace("fuse-attention,", ""),
    "fuse-no-gelu": FUSE.replace("fuse-gelu,", ""),
    "fuse-no-skip-bias": FUSE.replace("fuse-skip-layer-norm,fuse-bias,", ""),
    "fuse-no-skip": FUSE.replace("fuse-skip-layer-norm,", ""),
    "fuse-no-bias": FUSE.replace("fuse-bias,", ""),
}
QUICK = ["fp32", "fuse", "int4-L0-b32", "int4-L4-b32", "int4-L4-b128", "fuse+int4-L4-b32"]
QUICK += ["int8-L4-b32", "int8-dynamic", "ort-default"]
SWEEP = ["fp32", "int4-L0-b32", "int4-L4-b32", "int4-L4-b128", "int4-L4-b256", "int8-L4-b32"]
SWEEP += ["int8-dynamic", "ort-default"]
FFN_ROWS = (1, 16, 64, 150, 500, 1500)
FFN_K = (256, 384, 512)

# name: (model file, input name, input shape)
CASES = {
    "tiny-chunk": ("whisper-tiny", "mel", (1, 80, 300)),
    "base-chunk": ("whisper-base", "mel", (1, 80, 300)),
    "conformer": ("conformer", "features", (1, 250, 80)),
    "tiny-30s": ("whisper-tiny", "mel", (1, 80, 3000)),
    **{f"ffn-K{k}-M{m}": (f"ffn-K{k}", "x", (1, m, k)) for k in FFN_K for m in FFN_ROWS},
}
TRANSFORMERS = ["tiny-chunk", "base-chunk", "conformer", "tiny-30s"]

# ---------------------------------------------------------------- models


def whisper(d_model: int, heads: int, ffn: int, layers: int):
    """The golden fixture's encoder class at Whisper's sizes, random weights (seed 0)."""
    import torch

    sys.path.insert(0, str(ROOT / "golden"))
    from export_whisper_encoder import WhisperEncoder

    torch.manual_seed(0)
    return WhisperEncoder(
        d_model=d_model, n_heads=heads, d_ffn=ffn, n_layers=layers, max_positions=1500
    ).eval()


def conformer(d_model: int = 256, heads: int = 4, ffn: int = 1024, layers: int = 6):
    """A Conformer-like stack: features [B, T, 80] -> [B, T, d_model]."""
    import torch
    from torch import nn

    sys.path.insert(0, str(ROOT / "golden"))
    from export_whisper_encoder import MultiHeadSelfAttention

    def feed_forward() -> nn.Module:
        return nn.Sequential(
            nn.LayerNorm(d_model), nn.Linear(d_model, ffn), nn.SiLU(), nn.Linear(ffn, d_model)
        )

    class ConvModule(nn.Module):
        def __init__(self, kernel: int = 15) -> None:
            super().__init__()
            self.ln = nn.LayerNorm(d_model)
            self.pointwise1 = nn.Conv1d(d_model, 2 * d_model, 1)
            self.depthwise = nn.Conv1d(
                d_model, d_model, kernel, padding=kernel // 2, groups=d_model
            )
            self.norm = nn.BatchNorm1d(d_model)
            self.pointwise2 = nn.Conv1d(d_model, d_model, 1)

        def forward(self, x):
            y = self.ln(x).transpose(1, 2)
            y = nn.functional.glu(self.pointwise1(y), dim=1)
            y = nn.functional.silu(self.norm(self.depthwise(y)))
            return self.pointwise2(y).transpose(1, 2)

    class Block(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.ff1, self.ff2 = feed_forward(), feed_forward()
            self.attn_ln = nn.LayerNorm(d_model)
            self.attn = MultiHeadSelfAttention(d_model, heads)
            self.conv = ConvModule()
            self.ln = nn.LayerNorm(d_model)

        def forward(self, x):
            x = x + 0.5 * self.ff1(x)
            x = x + self.attn(self.attn_ln(x))
            x = x + self.conv(x)
            return self.ln(x + 0.5 * self.ff2(x))

    class Conformer(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.front = nn.Linear(80, d_model)
            self.blocks = nn.ModuleList(Block() for _ in range(layers))

        def forward(self, features):
            x = self.front(features)
            for block in self.blocks:
                x = block(x)
            return x

    torch.manual_seed(0)
    return Conformer().eval()


BUILDERS = {
    "whisper-tiny": (lambda: whisper(384, 6, 1536, 4), "mel", (1, 80, 300)),
    "whisper-base": (lambda: whisper(512, 8, 2048, 6), "mel", (1, 80, 300)),
    "conformer": (conformer, "features", (1, 250, 80)),
}


def ffn(k: int, path: Path) -> None:
    """``MatMul(Relu(MatMul(x, W1[k, 4k])), W2[4k, k])``, x ``[1, rows, k]``, in onnx.helper."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(k)
    w1, w2 = (rng.standard_normal(s).astype(np.float32) * 0.05 for s in ((k, 4 * k), (4 * k, k)))
    nodes = [
        helper.make_node("MatMul", ["x", "w1"], ["h"]),
        helper.make_node("Relu", ["h"], ["r"]),
        helper.make_node("MatMul", ["r", "w2"], ["y"]),
    ]
    graph = helper.make_graph(
        nodes,
        f"ffn_k{k}",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, "rows", k])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, "rows", k])],
        [numpy_helper.from_array(w1, "w1"), numpy_helper.from_array(w2, "w2")],
    )
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)


def export(name: str, path: Path) -> None:
    """Export ``name`` with the TorchScript exporter, batch and time axes dynamic."""
    if name.startswith("ffn-K"):
        ffn(int(name.removeprefix("ffn-K")), path)
        return
    import torch

    build, input_name, shape = BUILDERS[name]
    time_axis = 2 if input_name == "mel" else 1
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            build(),
            (torch.randn(*shape),),
            str(path),
            dynamo=False,
            opset_version=17,
            input_names=[input_name],
            output_names=["hidden"],
            dynamic_axes={input_name: {0: "batch", time_axis: "frames"}},
            do_constant_folding=True,
        )


def build_variant(source: Path, variant: str, out: Path) -> None:
    """Write ``variant`` of ``source`` to ``out``."""
    spec = VARIANTS[variant]
    if spec == "ort":
        logging.disable(logging.WARNING)
        import onnx
        from onnxruntime.quantization import matmul_nbits_quantizer as mnq

        with contextlib.redirect_stdout(io.StringIO()):
            quantizer = mnq.MatMulNBitsQuantizer(onnx.load(str(source)))
            quantizer.process()
        quantizer.model.save_model_to_file(str(out))
        return
    from onnxopt import optimize

    optimize(source, spec, verify=False, output=out)


def prepare(cases: list[str], variants: list[str], work: Path) -> dict[str, dict[str, Path]]:
    """Model files per case and variant, built when missing."""
    work.mkdir(parents=True, exist_ok=True)
    paths: dict[str, dict[str, Path]] = {}
    for case in cases:
        name = CASES[case][0]
        source = work / f"{name}.onnx"
        if not source.exists():
            print(f"exporting {name}", file=sys.stderr)
            export(name, source)
        paths[case] = {}
        for variant in variants:
            out = source if variant == "fp32" else work / f"{name}.{variant}.onnx"
            if not out.exists():
                start = time.perf_counter()
                build_variant(source, variant, out)
                print(f"built {out.name} ({time.perf_counter() - start:.1f} s)", file=sys.stderr)
            paths[case][variant] = out
    return paths


# ---------------------------------------------------------------- timing


def sessions(paths: dict[str, Path], threads: int) -> dict:
    import onnxruntime as ort

    from onnxopt.latency import session_options

    options = session_options("all", threads)
    return {
        v: ort.InferenceSession(str(p), options, providers=["CPUExecutionProvider"])
        for v, p in paths.items()
    }


def snr_db(reference: np.ndarray, output: np.ndarray) -> float:
    """Signal-to-noise ratio of ``output`` against ``reference``, in dB."""
    noise = float(np.sum((reference.astype(np.float64) - output) ** 2))
    return float("inf") if noise == 0 else 10 * np.log10(float(np.sum(reference**2.0)) / noise)


def one_round(paths: dict[str, Path], feeds: dict, threads: int, runs: int, seed: int) -> tuple:
    """Each variant's run times (ms), interleaved run by run in random order; output SNR (dB)."""
    sess = sessions(paths, threads)
    outputs = {}
    for v, s in sess.items():
        for _ in range(3):
            outputs[v] = s.run(None, feeds)[0]
    snr = {v: snr_db(outputs["fp32"], out) for v, out in outputs.items()}
    rng = np.random.default_rng(seed)
    names = list(sess)
    times: dict[str, list[float]] = {v: [] for v in names}
    for _ in range(runs):
        for i in rng.permutation(len(names)):
            start = time.perf_counter()
            sess[names[i]].run(None, feeds)
            times[names[i]].append((time.perf_counter() - start) * 1000)
    return times, snr


def measure(paths: dict[str, Path], feeds: dict, threads: int, runs: int, rounds: int) -> dict:
    """Per variant: median ms, ratio to fp32 (median over rounds), its min/max, output SNR."""
    medians: dict[str, list[float]] = {v: [] for v in paths}
    ratios: dict[str, list[float]] = {v: [] for v in paths}
    for r in range(rounds):
        times, snr = one_round(paths, feeds, threads, runs, seed=r)
        base = statistics.median(times["fp32"])
        for v, t in times.items():
            medians[v].append(statistics.median(t))
            ratios[v].append(statistics.median(t) / base)
    return {
        v: {
            "ms": statistics.median(medians[v]),
            "ratio": statistics.median(ratios[v]),
            "lo": min(ratios[v]),
            "hi": max(ratios[v]),
            "rounds": ratios[v],
            "snr_db": snr[v],
        }
        for v in paths
    }


def table(case: str, threads: int, result: dict) -> str:
    fastest = min(result, key=lambda v: result[v]["ratio"])
    head = "| variant | ms | ratio | spread | SNR dB |\n|---|---|---|---|---|"
    lines = [f"\n{case}, {threads} thread(s)", head]
    for v, r in result.items():
        mark = " **fastest**" if v == fastest else ""
        lines.append(
            f"| {v}{mark} | {r['ms']:.2f} | {r['ratio']:.2f} | {r['lo']:.2f}-{r['hi']:.2f} "
            f"| {r['snr_db']:.1f} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", nargs="*", choices=list(CASES), default=TRANSFORMERS)
    parser.add_argument(
        "--sweep",
        action="store_true",
        help=f"FFN pairs K x 4K, K {FFN_K}, rows {FFN_ROWS}; variants {' '.join(SWEEP)}",
    )
    parser.add_argument("--variants", nargs="*", choices=list(VARIANTS), default=MAIN)
    parser.add_argument("--quick", action="store_true", help=f"variants {' '.join(QUICK)}")
    parser.add_argument("--threads", nargs="*", type=int, default=[1, 2])
    parser.add_argument("--runs", type=int, default=20, help="timed runs per variant per round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--work", type=Path, default=WORK)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    variants = ["fp32", *(v for v in args.variants if v != "fp32")]
    variants = QUICK if args.quick else SWEEP if args.sweep else variants
    if args.sweep and args.cases == TRANSFORMERS:
        args.cases = [c for c in CASES if c.startswith("ffn-")]
    paths = prepare(args.cases, variants, args.work)
    rng = np.random.default_rng(0)
    results = {}
    for case in args.cases:
        _, input_name, shape = CASES[case]
        feeds = {input_name: rng.standard_normal(shape).astype(np.float32)}
        for threads in args.threads:
            start = time.perf_counter()
            result = measure(paths[case], feeds, threads, args.runs, args.rounds)
            results[f"{case}/t{threads}"] = result
            print(table(case, threads, result), flush=True)
            print(f"({time.perf_counter() - start:.0f} s)", file=sys.stderr)
            if args.json:
                args.json.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
