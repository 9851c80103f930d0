"""Benchmark onnxopt's quant-int4 / quant-int8 against ONNX Runtime's own quantizers.

Run it (1-2 minutes on 2 cores; ``--big`` adds 5-8, most of it ORT's k_quant)::

    /work/venv/bin/python benchmarks/quant/run.py [--json /tmp/quant.json] [--big]
    /work/venv/bin/python benchmarks/quant/run.py --models minilm-ts minilm-dynamo \
        --torch-python /work/torchvenv/bin/python        # real weights, ~3 min

Tools (4-bit ones at block 32, symmetric, accuracy_level 4; each in a fresh child process that
loads, quantizes and saves; wall time and ``ru_maxrss`` come from ``big_model.measure``):

- ``onnxopt-int4-rtn`` / ``onnxopt-int4-kquant``: ``quant-int4(algo=...)`` on a lazily loaded
  model, saved with ``model_io.save`` (no golden verification: the pass alone, like the others);
  ``onnxopt-int4-kquant-asym``: with ``symmetric=false`` (zero points, as ORT's k_quant stores).
- ``onnxopt-int8``: ``quant-int8`` (8-bit MatMulNBits, RTN); ``onnxopt-int8-dyn``:
  ``quant-int8(format=dynamic)`` (DynamicQuantizeMatMul, int8 per channel).
- ``ort-rtn`` / ``ort-kquant`` / ``ort-default``: ``MatMulNBitsQuantizer`` with
  ``RTNWeightOnlyQuantConfig`` / ``KQuantWeightOnlyQuantConfig`` / its default (C++) config.
- ``ort-dynamic``: ``quantize_dynamic`` (QInt8 weights, its defaults).

Models: ``golden/whisper_encoder.onnx`` (2 MB, real exporter graph, random torch weights) and
``stack``: ``big_model.py``'s builder at hidden 384, FFN 1536, 4 blocks (28 MB, Gaussian
weights; a Whisper-tiny-sized MatMul stack). ``--big`` quantizes the 2.4 GB model
(``/tmp/onnxopt-big``, built if missing) with the 4-bit tools only, for time and memory.
Only with ``--models``: ``minilm-ts`` / ``minilm-dynamo``, sentence-transformers'
all-MiniLM-L6-v2 with its real weights (``benchmarks/real_models.py``: both torch exporters,
built into ``--cache`` with ``--torch-python`` on first use), run on 50 tokenized English
sentences; ``s_cos`` / ``s_min`` are the mean and the smallest cosine between each sentence's
embedding (masked mean pooling + L2 norm of ``last_hidden_state``, as sentence-transformers
computes it) from the quantized model and from fp32.

Columns: ``time`` (the child's wall time: interpreter start, imports, load, quantize, save;
seconds), ``rss_mib`` (the child's peak RSS, VmHWM, file-backed pages of memory-mapped weights
included), ``anon_mib`` (peak anonymous RSS, sampled every 0.1 s), ``size`` (output / fp32
bytes), ``cos`` / ``rel_l2`` / ``snr`` (outputs against fp32 on seeded random inputs, ORT with
its default optimizations, so accuracy_level 4 is in effect), ``w_err`` (mean relative squared
error of the MatMulNBits weights read back against the float ones), ``lat1`` / ``lat2`` (ORT
latency at 1 and 2 threads over fp32's: best of 18 runs each, quantized and fp32 alternating).
``size`` counts the bytes a model's tensors reference: ORT's RTN/k_quant outputs keep pointing
into the input's data file for the tensors they leave alone.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import logging
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "benchmarks"))

import big_model  # noqa: E402
import real_models  # noqa: E402

WORK = Path("/tmp/onnxopt-quant-bench")
TOOLS = [
    "onnxopt-int4-rtn",
    "onnxopt-int4-kquant",
    "onnxopt-int4-kquant-asym",
    "onnxopt-int8",
    "onnxopt-int8-dyn",
    "onnxopt-int4+emb8",
    "ort-rtn",
    "ort-kquant",
    "ort-default",
    "ort-dynamic",
]
BIG_TOOLS = ["onnxopt-int4-rtn", "onnxopt-int4-kquant", "ort-rtn", "ort-kquant", "ort-default"]
DEFAULT_MODELS = ["whisper", "stack"]
REAL_MODELS = ["minilm-ts", "minilm-dynamo"]
# A Conformer encoder (transformers' FastConformer/Parakeet at the fusion zoo's bench size,
# random weights), built with benchmarks/fusion/zoo.py and --torch-python.
ZOO_MODELS = {"parakeet": ("parakeet_ts.onnx", {"input_features": (1, 400, 80)})}


# ---------------------------------------------------------------- the tools (child processes)


def run_tool(tool: str, source: Path, out: Path) -> None:
    """Load ``source``, quantize with ``tool``, save to ``out`` (external data when large)."""
    large = big_model.model_size(source) > 1 << 30
    if tool.startswith("onnxopt"):
        from onnxopt import model_io
        from onnxopt.passes.quant_embeddings import QuantEmbeddingsPass
        from onnxopt.passes.quant_int4 import QuantInt4Pass
        from onnxopt.passes.quant_int8 import QuantInt8Pass

        passes = {
            "onnxopt-int4-rtn": [QuantInt4Pass(algo="rtn")],
            "onnxopt-int4-kquant": [QuantInt4Pass(algo="kquant")],
            "onnxopt-int4-kquant-asym": [QuantInt4Pass(algo="kquant", symmetric=False)],
            "onnxopt-int8": [QuantInt8Pass()],
            "onnxopt-int8-dyn": [QuantInt8Pass(format="dynamic")],
            # Embedding tables (Gather) in 8 bits too, then the MatMuls in 4.
            "onnxopt-int4+emb8": [QuantEmbeddingsPass(bits=8), QuantInt4Pass(algo="kquant")],
        }
        model = model_io.load(source)
        for pass_ in passes[tool]:
            pass_(model)
        model_io.save(model, out, external_data=large)
        return
    logging.disable(logging.WARNING)
    from onnxruntime.quantization import QuantType, quantize_dynamic
    from onnxruntime.quantization import matmul_nbits_quantizer as mnq

    if tool == "ort-dynamic":
        quantize_dynamic(source, out, weight_type=QuantType.QInt8, use_external_data_format=large)
        return
    configs = {
        "ort-rtn": mnq.RTNWeightOnlyQuantConfig(),
        "ort-kquant": mnq.KQuantWeightOnlyQuantConfig(),
        "ort-default": None,
    }
    with contextlib.redirect_stdout(io.StringIO()):  # its progress bar
        quantizer = mnq.MatMulNBitsQuantizer(
            str(source),
            block_size=32,
            is_symmetric=True,
            accuracy_level=4,
            algo_config=configs[tool],
        )
        quantizer.process()
    quantizer.model.save_model_to_file(str(out), use_external_data_format=large)


# ---------------------------------------------------------------- models and inputs


def prepare_models(names: list[str], args) -> dict[str, tuple[Path, dict[str, np.ndarray]]]:
    """The models named, with their feeds (also the latency inputs); built when missing."""
    rng = np.random.default_rng(0)
    models = {}
    if "whisper" in names:
        models["whisper"] = (ROOT / "golden" / "whisper_encoder.onnx", {"mel": (2, 80, 400)})
    if "stack" in names:
        stack = WORK / "stack" / big_model.MODEL_NAME
        if not stack.exists():
            big_model.build(stack.parent, gb=0.028, hidden=384, ffn=1536)
        models["stack"] = (stack, {"x": (64, 384)})
    if "big-2.4GB" in names:
        path = big_model.DEFAULT_OUT / big_model.MODEL_NAME
        if not path.exists():
            big_model.build(path.parent, gb=2.4, hidden=2048, ffn=8192)
        models["big-2.4GB"] = (path, {})
    prepared = {
        name: (path, {k: rng.standard_normal(s).astype(np.float32) for k, s in shapes.items()})
        for name, (path, shapes) in models.items()
    }
    for name in [n for n in ZOO_MODELS if n in names]:
        file, shapes = ZOO_MODELS[name]
        path = _zoo_model(name, file, args.torch_python)
        feeds = {k: rng.standard_normal(shape).astype(np.float32) for k, shape in shapes.items()}
        prepared[name] = (path, feeds)
    real = [n for n in REAL_MODELS if n in names]
    if real:
        folder = real_models.ensure(args.cache, args.torch_python)
        tokens = real_models.load_tokens(folder)
        for name in real:
            exporter = name.split("-", 1)[1]
            prepared[name] = (folder / f"minilm_{exporter}.onnx", tokens)
    return prepared


def _zoo_model(name: str, file: str, torch_python: str | None) -> Path:
    """A bench-size fusion-zoo export under WORK, built once with a Python that has torch."""
    path = WORK / "zoo" / file
    if not path.exists():
        zoo = ROOT / "benchmarks" / "fusion" / "zoo.py"
        command = [torch_python or sys.executable, str(zoo), "--size", "bench", "--no-golden"]
        command += ["--out", str(path.parent), "--models", name, "--exporters", "ts"]
        subprocess.run(command, check=True)
    return path


# ---------------------------------------------------------------- measurements


def session(path: Path, threads: int):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.log_severity_level = 3
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def latency_ratio(fp32: Path, quantized: Path, feeds, threads: int, rounds: int = 6) -> float:
    """Best-of latency of ``quantized`` over ``fp32``'s, the two run in alternation.

    Alternating and taking the minimum keeps other load on the machine out of the ratio.
    """
    sessions = [session(fp32, threads), session(quantized, threads)]
    best = [float("inf"), float("inf")]
    for sess in sessions:
        sess.run(None, feeds)
    for _ in range(rounds):
        for i, sess in enumerate(sessions):
            for _ in range(3):
                start = time.perf_counter()
                sess.run(None, feeds)
                best[i] = min(best[i], time.perf_counter() - start)
    return best[1] / best[0]


def output_error(reference: list[np.ndarray], path: Path, feeds) -> dict[str, float]:
    from onnxopt.metrics import Tolerance, compare

    outputs = session(path, 2).run(None, feeds)
    worst = None
    for exp, act in zip(reference, outputs, strict=True):
        m = compare(exp, act, Tolerance())
        worst = m if worst is None else worst.merge(m)
    return {"cos": worst.cosine, "rel_l2": worst.rel_l2, "snr": worst.snr_db}


def weight_error(source: Path, quantized: Path) -> float | None:
    """Mean over MatMulNBits nodes of |W_q - W|^2 / |W|^2, matched by output name."""
    import onnx_ir as ir

    from onnxopt.quant import packing

    original = ir.load(source)
    weights = {}
    for node in original.graph:
        if node.op_type == "MatMul" and node.inputs[1].const_value is not None:
            weights[node.outputs[0].name] = node.inputs[1]
    model = ir.load(quantized)
    errors = []
    for node in model.graph:
        if node.op_type != "MatMulNBits" or node.outputs[0].name not in weights:
            continue
        ins = [v.const_value.numpy() if v is not None else None for v in node.inputs[1:4]]
        ins += [None] * (3 - len(ins))
        zp = ins[2] if ins[2] is not None and ins[2].dtype == np.uint8 else None
        bits, k = node.attributes["bits"].value, node.attributes["K"].value
        back = packing.from_matmul_nbits(ins[0], ins[1], zp, bits=bits, k=k).dequantize()
        w = weights[node.outputs[0].name].const_value.numpy().T
        errors.append(float(np.sum((back - w) ** 2) / np.sum(w**2)))
    return float(np.mean(errors)) if errors else None


def peak_rss() -> int:
    """This process's own peak RSS (VmHWM): unlike ``ru_maxrss`` it does not carry over the
    parent's RSS from before ``exec``."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return 0


def model_bytes(path: Path) -> int:
    """The .onnx file plus the external bytes its tensors reference (not whole data files)."""
    import onnx

    proto = onnx.load(path, load_external_data=False)
    total = path.stat().st_size
    for tensor in proto.graph.initializer:
        if tensor.data_location == onnx.TensorProto.EXTERNAL:
            total += int({e.key: e.value for e in tensor.external_data}.get("length", 0))
    return total


def measure_tool(tool: str, source: Path, out: Path) -> big_model.Measurement:
    argv = [sys.executable, __file__, "worker", tool, str(source), str(out)]
    return big_model.measure(tool, argv, interval=0.1)


def sentence_metrics(reference: list[np.ndarray], path: Path, feeds) -> dict[str, float]:
    """Mean and min cosine of the sentence embeddings (``last_hidden_state`` pooled with the
    attention mask) of ``path`` against fp32's."""
    (hidden,) = session(path, 2).run(None, feeds)
    cos = real_models.embedding_cosines(reference[0], hidden, feeds["attention_mask"])
    return {"s_cos": float(cos.mean()), "s_min": float(cos.min())}


def bench_model(name: str, source: Path, feeds, tools: list[str], quality: bool) -> list[dict]:
    folder = WORK / name
    folder.mkdir(parents=True, exist_ok=True)
    fp32_size = model_bytes(source)
    rows = []
    if quality:
        reference = session(source, 2).run(None, feeds)
    for tool in tools:
        out = folder / f"{tool}.onnx"
        m = measure_tool(tool, source, out)
        row = {"model": name, "tool": tool, "time": m.wall_s}
        hwm = out.with_name(out.name + ".hwm")
        row["rss_mib"] = int(hwm.read_text()) / 2**20 if hwm.exists() else None
        row["anon_mib"] = m.peak_tree_anon / 2**20
        if m.returncode != 0:
            row["error"] = f"exit {m.returncode}"
            rows.append(row)
            continue
        row["size"] = model_bytes(out) / fp32_size
        if quality:
            row |= output_error(reference, out, feeds)
            if name in REAL_MODELS:
                row |= sentence_metrics(reference, out, feeds)
            row["w_err"] = weight_error(source, out)
            for t in (1, 2):
                row[f"lat{t}"] = latency_ratio(source, out, feeds, t)
        rows.append(row)
        print(json.dumps(row), file=sys.stderr, flush=True)
    return rows


def table(rows: list[dict]) -> str:
    cols = ["model", "tool", "time", "rss_mib", "anon_mib", "size", "cos", "rel_l2", "snr"]
    if any("s_cos" in row for row in rows):
        cols += ["s_cos", "s_min"]
    cols += ["w_err", "lat1", "lat2"]
    formats = {"time": "{:.2f}", "rss_mib": "{:.0f}", "anon_mib": "{:.0f}", "size": "{:.3f}"}
    formats |= {"cos": "{:.5f}", "rel_l2": "{:.4f}", "snr": "{:.2f}", "w_err": "{:.5f}"}
    formats |= {"lat1": "{:.2f}", "lat2": "{:.2f}", "s_cos": "{:.5f}", "s_min": "{:.5f}"}
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for row in rows:
        cells = []
        for col in cols:
            value = row.get(col)
            cells.append("-" if value is None else formats.get(col, "{}").format(value))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "worker":
        out = Path(sys.argv[4])
        run_tool(sys.argv[2], Path(sys.argv[3]), out)
        out.with_name(out.name + ".hwm").write_text(str(peak_rss()))
        return
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--big", action="store_true", help="also the 2.4 GB model (time, RSS)")
    parser.add_argument("--big-only", action="store_true")
    parser.add_argument("--tools", nargs="*", default=TOOLS)
    parser.add_argument(
        "--models",
        nargs="*",
        choices=[*DEFAULT_MODELS, "big-2.4GB", *ZOO_MODELS, *REAL_MODELS],
        help=f"default: {' '.join(DEFAULT_MODELS)} (with --big: and big-2.4GB)",
    )
    parser.add_argument(
        "--cache", type=Path, default=real_models.DEFAULT_CACHE, help="real-weight models"
    )
    parser.add_argument(
        "--torch-python",
        help="a Python with torch and transformers to build the MiniLM and parakeet exports",
    )
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    WORK.mkdir(parents=True, exist_ok=True)
    if args.models is None:
        names = [] if args.big_only else list(DEFAULT_MODELS)
        names += ["big-2.4GB"] if args.big or args.big_only else []
    else:
        names = args.models
    rows = []
    for name, (path, feeds) in prepare_models(names, args).items():
        big = name.startswith("big")
        tools = [t for t in args.tools if t in BIG_TOOLS] if big else args.tools
        rows += bench_model(name, path, feeds, tools, quality=not big)
    print(table(rows))
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
