"""Fusion benchmark: onnxopt's ``fuse`` pipeline against the anchor tools on the fusion zoo.

For every model of a zoo (``benchmarks/fusion/zoo.py`` output: ``*.onnx`` + ``manifest.json``)
and every tool, in one run:

- fused-op counts in the saved model (Attention, MultiHeadAttention, GroupQueryAttention,
  LayerNormalization, SkipLayerNormalization, SimplifiedLayerNormalization / RMSNormalization,
  SkipSimplifiedLayerNormalization, Gelu / FastGelu / BiasGelu / QuickGelu, RotaryEmbedding, ...)
- nodes before and after, whether the saved model runs in ONNX Runtime (CPU)
- max abs output error against the unoptimized model (both run with ORT optimizations off)
- ORT CPU latency as a ratio to the unoptimized model, with ORT_ENABLE_ALL and ORT_DISABLE_ALL,
  at 1 and 2 intra-op threads (median of ``--repeat`` runs after 2 warm-ups)

Tools (each runs in its own child process, so a crash or a hang costs one cell):

- ``onnxopt``: ``onnxopt.optimize(src, passes="fuse", golden=..., keep_going=True, output=out)``
- ``ort``: ``onnxruntime.transformers.optimizer.optimize_model(src, model_type=<per model>,
  opt_level=None (the model type's default), only_onnxruntime=False)``
- ``onnxscript``: ``onnxscript.rewriter.ort_fusions.optimize_for_ort(ir.load(src))``
- ``onnxsim``: ``onnxsim.simplify(src)``; ``onnxslim``: ``onnxslim.slim(src)``

Usage (with the onnxopt environment; ``--torch-python`` builds the bench-size zoo first)::

    python benchmarks/fusion/run.py                                  # the tiny zoo in golden/zoo
    python benchmarks/fusion/run.py --torch-python /work/torchvenv/bin/python   # bench sizes
    python benchmarks/fusion/run.py --zoo DIR --models bert gpt2 --repeat 20 --json out.json
    python benchmarks/fusion/run.py --models minilm --torch-python /work/torchvenv/bin/python

``minilm`` (only when named in ``--models``): sentence-transformers' all-MiniLM-L6-v2 with its real
weights, both exporters (``benchmarks/real_models.py``, built into ``--real-cache`` on first
use), run on 50 tokenized English sentences instead of random ids; ORT's model type ``bert``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent
sys.path.insert(0, str(REPO / "benchmarks"))

import real_models  # noqa: E402

TOOLS = ("onnxopt", "ort", "onnxscript", "onnxsim", "onnxslim")
# onnxruntime.transformers model_type per zoo model.
ORT_MODEL_TYPE = {
    "bert": "bert",
    "whisper": "bart",
    "wav2vec2": "bert",
    "conformer": "conformer",
    "conformer_rotary": "conformer",
    "parakeet": "conformer",
    "gpt2": "gpt2",
    "gpt2_kv": "gpt2",
    "llama": "qwen3",  # ORT's decoder-only type with RoPE, GQA and RMSNorm
    "llama_kv": "qwen3",
    "minilm": "bert",
}
# Real-weight models from benchmarks/real_models.py: not in the zoo, run only when named.
REAL_MODELS = ("minilm",)
# Fused ops counted in every output, with the short label the table prints.
FUSED = {
    "com.microsoft::Attention": "Attn",
    "Attention": "OnnxAttention",
    "com.microsoft::MultiHeadAttention": "MHA",
    "com.microsoft::GroupQueryAttention": "GQA",
    "com.microsoft::PackedAttention": "PackedAttn",
    "com.microsoft::EmbedLayerNormalization": "EmbLN",
    "LayerNormalization": "LN",
    "com.microsoft::SkipLayerNormalization": "SLN",
    "com.microsoft::SimplifiedLayerNormalization": "SimpLN",
    "SimplifiedLayerNormalization": "SimpLN",
    "RMSNormalization": "OnnxRMSNorm",
    "com.microsoft::SkipSimplifiedLayerNormalization": "SSLN",
    "Gelu": "OnnxGelu",
    "com.microsoft::Gelu": "Gelu",
    "com.microsoft::FastGelu": "FastGelu",
    "com.microsoft::BiasGelu": "BiasGelu",
    "com.microsoft::QuickGelu": "QuickGelu",
    "com.microsoft::RotaryEmbedding": "Rotary",
    "RotaryEmbedding": "OnnxRotary",
    "com.microsoft::BiasAdd": "BiasAdd",
    "com.microsoft::BiasSplitGelu": "BiasSplitGelu",
}
LEVELS = {
    "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
    "off": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
}


# ----------------------------------------------------------------------------- tools (child)


def run_tool(tool: str, src: Path, out: Path, model: str, golden: Path | None) -> dict[str, Any]:
    """Optimize ``src`` into ``out`` with one tool; returns tool-specific details."""
    if tool == "onnxopt":
        import onnxopt
        from onnxopt import golden as golden_mod
        from onnxopt import model_io

        if golden is not None and golden.suffix == ".npz":  # inputs only: capture the outputs
            golden = golden_mod.capture(model_io.load(src), inputs=golden_mod.load_npz(golden))
        _, report = onnxopt.optimize(src, passes="fuse", golden=golden, keep_going=True, output=out)
        counts: dict[str, int] = {}
        for p in report.passes:
            for rule, n in p.counts.items():
                counts[f"{p.name}:{rule}"] = counts.get(f"{p.name}:{rule}", 0) + n
        return {
            "passes": {p.name: p.status for p in report.passes},
            "failed": {p.name: p.reason for p in report.failed},
            "rule_counts": counts,
        }
    if tool == "ort":
        import logging

        from onnxruntime.transformers.optimizer import optimize_model

        logging.disable(logging.WARNING)
        _stub_torch_version()
        model_type = ORT_MODEL_TYPE.get(model, "bert")
        optimized = optimize_model(
            str(src),
            model_type=model_type,
            num_heads=0,
            hidden_size=0,
            opt_level=None,
            only_onnxruntime=False,
        )
        optimized.save_model_to_file(str(out))
        return {
            "model_type": model_type,
            "fused_operator_statistics": optimized.get_fused_operator_statistics(),
        }
    if tool == "onnxscript":
        import onnx_ir as ir
        from onnxscript.rewriter.ort_fusions import optimize_for_ort

        optimized, fusions = optimize_for_ort(ir.load(src))
        ir.save(optimized, out)
        return {"fusions": {k: v for k, v in fusions.items() if v}}
    if tool == "onnxsim":
        import onnxsim

        simplified, ok = onnxsim.simplify(str(src))
        onnx.save(simplified, str(out))
        return {"check": bool(ok)}
    if tool == "onnxslim":
        import onnxslim

        onnxslim.slim(str(src), output_model=str(out))
        return {}
    raise ValueError(f"unknown tool {tool}")


def _stub_torch_version() -> None:
    """ORT's ``optimize_by_onnxruntime`` (opt_level >= 1) imports torch only to read
    ``torch.version.hip``; the onnxopt environment has no torch, so answer "not ROCm"."""
    import importlib.util
    import types

    if importlib.util.find_spec("torch") is None:
        torch_stub = types.ModuleType("torch")
        torch_stub.version = types.SimpleNamespace(hip=None)
        sys.modules["torch"] = torch_stub


def child_main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("tool")
    parser.add_argument("src", type=Path)
    parser.add_argument("out", type=Path)
    parser.add_argument("result", type=Path)
    parser.add_argument("--model", default="")
    parser.add_argument("--golden", type=Path, default=None)
    args = parser.parse_args(argv)
    start = time.perf_counter()
    try:
        details = run_tool(args.tool, args.src, args.out, args.model, args.golden)
        result = {"ok": True, "seconds": time.perf_counter() - start, "details": details}
    except Exception as err:
        line = next((ln for ln in str(err).splitlines() if ln.strip()), "")
        result = {
            "ok": False,
            "seconds": time.perf_counter() - start,
            "error": f"{type(err).__name__}: {line}"[:300],
            "traceback": traceback.format_exc()[-2000:],
        }
    args.result.write_text(json.dumps(result, default=str))
    return 0


# ----------------------------------------------------------------------------- measuring


def fused_counts(model: onnx.ModelProto) -> dict[str, int]:
    counts: dict[str, int] = {}
    for node in model.graph.node:
        key = node.op_type if node.domain in ("", "ai.onnx") else f"{node.domain}::{node.op_type}"
        label = FUSED.get(key)
        if label:
            counts[label] = counts.get(label, 0) + 1
    return counts


def make_feeds(path: Path, entry: dict, case: dict, seed: int = 0) -> dict[str, np.ndarray]:
    """Inputs for a zoo model at ``case`` (batch, seq, past), named dims resolved by name."""
    model = onnx.load(str(path), load_external_data=False)
    sizes = {
        "batch": case["batch"],
        "seq": case["seq"],
        "samples": case["seq"],
        "frames": case["seq"],
        "past_seq": case.get("past", 0),
        "total_seq": case.get("past", 0) + case["seq"],
    }
    vocab = int(entry.get("config", {}).get("vocab_size", 2))
    rng = np.random.default_rng(seed)
    feeds = {}
    for value in model.graph.input:
        ttype = value.type.tensor_type
        shape = []
        for d in ttype.shape.dim:
            if d.dim_param:
                if d.dim_param not in sizes:
                    raise ValueError(f"{path.name}: no size for dim {d.dim_param!r}")
                shape.append(sizes[d.dim_param])
            else:
                shape.append(d.dim_value)
        dtype = onnx.helper.tensor_dtype_to_np_dtype(ttype.elem_type)
        if value.name == "input_ids":
            feeds[value.name] = rng.integers(0, vocab, shape).astype(dtype)
        elif value.name == "attention_mask":
            feeds[value.name] = np.ones(shape, dtype)
        elif value.name == "token_type_ids":
            feeds[value.name] = np.zeros(shape, dtype)
        elif np.issubdtype(dtype, np.floating):
            feeds[value.name] = rng.standard_normal(shape).astype(dtype)
        else:
            feeds[value.name] = np.zeros(shape, dtype)
    return feeds


def session(path: Path, level: str, threads: int) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.graph_optimization_level = LEVELS[level]
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.log_severity_level = 4  # failures are reported in the table, not on stderr
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def run_outputs(path: Path, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    sess = session(path, "off", 2)
    names = {i.name for i in sess.get_inputs()}
    return sess.run(None, {k: v for k, v in feeds.items() if k in names})


def latencies(
    paths: dict[str, Path], feeds: dict[str, np.ndarray], level: str, threads: int, repeat: int
) -> dict[str, float | None]:
    """Median seconds per run of each model, timed round-robin so that load from other
    processes hits every variant alike; None where ORT cannot build the session."""
    runners = {}
    for name, path in paths.items():
        try:
            sess = session(path, level, threads)
        except Exception:
            continue
        names = {i.name for i in sess.get_inputs()}
        own = {k: v for k, v in feeds.items() if k in names}
        for _ in range(2):  # warm-up
            sess.run(None, own)
        runners[name] = (sess, own)
    times: dict[str, list[float]] = {name: [] for name in runners}
    order = list(runners)
    for round_ in range(repeat):
        shift = round_ % max(1, len(order))
        for name in order[shift:] + order[:shift]:
            sess, own = runners[name]
            start = time.perf_counter()
            sess.run(None, own)
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(times[name]) if name in times else None for name in paths}


def max_abs_error(ref: list[np.ndarray], got: list[np.ndarray]) -> float:
    if len(ref) != len(got):
        return float("nan")
    errs = []
    for r, g in zip(ref, got, strict=True):
        if r.shape != g.shape:
            return float("nan")
        errs.append(
            float(np.max(np.abs(r.astype(np.float64) - g.astype(np.float64)))) if r.size else 0.0
        )
    return max(errs, default=0.0)


# ----------------------------------------------------------------------------- driver


def build_zoo(torch_python: str, out: Path, models: list[str] | None) -> None:
    cmd = [torch_python, str(HERE / "zoo.py"), "--size", "bench", "--out", str(out), "--no-golden"]
    cmd += ["--models", *models] if models else []
    print("building the bench zoo:", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=False)


def zoo_entries(zoo: Path) -> list[dict]:
    manifest = zoo / "manifest.json"
    if manifest.exists():
        data = json.loads(manifest.read_text())
        return [dict(e, size=data.get("size")) for e in data["models"] if "error" not in e]
    return [
        {"model": p.stem.rsplit("_", 1)[0], "exporter": p.stem.rsplit("_", 1)[-1], "file": p.name}
        for p in sorted(zoo.glob("*.onnx"))
    ]


def case_for(entry: dict, zoo: Path) -> dict:
    """The bench case for a bench zoo; the larger golden case for the tiny one."""
    golden = zoo / Path(entry["file"]).with_suffix(".golden") / "golden.json"
    if entry.get("size") != "bench" and golden.exists():
        dims = json.loads(golden.read_text())["cases"][-1]["dims"]
        return {"batch": dims["batch"], "seq": dims["seq"], "past": dims.get("past", 0)}
    return entry.get("bench_case") or {"batch": 1, "seq": 16, "past": 0}


def measure(entry: dict, zoo: Path, tools: list[str], args, workdir: Path) -> dict:
    src = zoo / entry["file"]
    case = case_for(entry, zoo)
    # Real-weight models come with real inputs (tokenized sentences) saved beside them.
    feeds = real_models.load_tokens(zoo) if entry.get("feeds") else make_feeds(src, entry, case)
    base_model = onnx.load(str(src), load_external_data=False)
    result: dict[str, Any] = {
        "model": entry["model"],
        "exporter": entry["exporter"],
        "file": str(src),
        "case": case,
        "nodes": len(base_model.graph.node),
        "fused_before": fused_counts(base_model),
        "tools": {},
    }
    ref = run_outputs(src, feeds)
    stem = f"{entry['model']}_{entry['exporter']}"
    npz = workdir / f"{stem}.inputs.npz"
    np.savez(npz, **{f"0/{k}": v for k, v in feeds.items()})
    runnable = {"original": src}
    for tool in tools:
        out = workdir / f"{stem}.{tool}.onnx"
        res_path = workdir / f"{stem}.{tool}.json"
        for stale in (out, res_path):
            stale.unlink(missing_ok=True)
        cmd = [
            sys.executable,
            str(Path(__file__).resolve()),
            "--child",
            tool,
            str(src),
            str(out),
            str(res_path),
            "--model",
            entry["model"],
            "--golden",
            str(npz),
        ]
        try:
            subprocess.run(
                cmd, timeout=args.tool_timeout, capture_output=True, text=True, cwd=workdir
            )
            child = (
                json.loads(res_path.read_text())
                if res_path.exists()
                else {"ok": False, "error": "child died without a result"}
            )
        except subprocess.TimeoutExpired:
            child = {"ok": False, "error": f"timed out after {args.tool_timeout} s"}
        row: dict[str, Any] = {
            "tool_ok": child["ok"],
            "seconds": child.get("seconds"),
            "details": child.get("details"),
            "error": child.get("error"),
        }
        if child["ok"] and out.exists():
            optimized = onnx.load(str(out), load_external_data=False)
            row["nodes"] = len(optimized.graph.node)
            row["fused"] = fused_counts(optimized)
            try:
                row["max_abs_err"] = max_abs_error(ref, run_outputs(out, feeds))
                row["runs"] = True
                runnable[tool] = out
            except Exception as err:
                row["runs"] = False
                row["run_error"] = f"{type(err).__name__}: {str(err).splitlines()[0][:200]}"
        result["tools"][tool] = row
    result["latency_ms"] = {}
    for level in ("all", "off"):
        for threads in args.threads:
            key = f"{level}@{threads}"
            medians = latencies(runnable, feeds, level, threads, args.repeat)
            base = medians.pop("original")
            result["latency_ms"][key] = base * 1e3 if base else None
            for tool, median in medians.items():
                ratio = median / base if (median and base) else None
                result["tools"][tool].setdefault("latency_ratio", {})[key] = ratio
    return result


def fmt_counts(counts: dict[str, int]) -> str:
    return " ".join(f"{k}{v}" for k, v in sorted(counts.items())) or "-"


def _ratio(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.2f}"


def _ms(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.2f} ms"


def table(results: list[dict], tools: list[str], threads: list[int]) -> str:
    cols = [f"{lv}@{t}" for lv in ("all", "off") for t in threads]
    head = [
        "model",
        "exp",
        "tool",
        "nodes",
        "fused ops",
        "runs",
        "max err",
        *[f"lat {c}" for c in cols],
        "s",
    ]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for res in results:
        lines.append(
            f"| {res['model']} | {res['exporter']} | (original) | {res['nodes']} | "
            f"{fmt_counts(res['fused_before'])} | | | "
            + " | ".join(_ms(res["latency_ms"].get(c)) for c in cols)
            + " | |"
        )
        for tool in tools:
            row = res["tools"].get(tool, {})
            if not row.get("tool_ok"):
                err = (row.get("error") or "not run").replace("|", "/")[:70]
                lines.append(f"| | | {tool} | n/a | {err} | | |" + " |" * len(cols) + " |")
                continue
            if not row.get("runs"):
                err = (row.get("run_error") or "").replace("|", "/")[:60]
                lines.append(
                    f"| | | {tool} | {row.get('nodes')} | {fmt_counts(row['fused'])} | "
                    f"no: {err} | |" + " |" * len(cols) + f" {row['seconds']:.1f} |"
                )
                continue
            ratios = " | ".join(_ratio(row["latency_ratio"].get(c)) for c in cols)
            lines.append(
                f"| | | {tool} | {row['nodes']} | {fmt_counts(row['fused'])} | yes | "
                f"{row['max_abs_err']:.1e} | {ratios} | {row['seconds']:.1f} |"
            )
    return "\n".join(lines)


def compact_table(results: list[dict], tools: list[str], ratio_key: str = "off@1") -> str:
    """One row per model file: per tool 'nodes, fused ops, latency ratio at ``ratio_key``'."""
    head = ["model", "exp", "nodes", *tools]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for res in results:
        cells = []
        for tool in tools:
            row = res["tools"].get(tool, {})
            if not row.get("tool_ok"):
                cells.append("failed")
            elif not row.get("runs"):
                cells.append(f"{row['nodes']}: {fmt_counts(row['fused'])}; **does not run**")
            else:
                ratio = _ratio(row.get("latency_ratio", {}).get(ratio_key))
                cells.append(f"{row['nodes']}: {fmt_counts(row['fused'])}; {ratio}")
        lines.append(
            f"| {res['model']} | {res['exporter']} | {res['nodes']} | " + " | ".join(cells) + " |"
        )
    return "\n".join(lines)


def select_zoo(args, models: list[str] | None) -> Path:
    """``--zoo``; else the bench zoo (built first when missing) with ``--torch-python``; else
    the tiny zoo in golden/zoo."""
    zoo = args.zoo
    if zoo is None and args.torch_python:
        zoo = args.cache
        if args.rebuild or not (zoo / "manifest.json").exists():
            build_zoo(args.torch_python, zoo, models)  # None: zoo.py builds all
    return zoo or REPO / "golden" / "zoo"


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "--child":
        return child_main(argv[1:])
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--zoo",
        type=Path,
        default=None,
        help="zoo folder (default: the bench zoo when --torch-python is given, else golden/zoo)",
    )
    parser.add_argument(
        "--torch-python",
        default=None,
        help="a Python with torch+transformers: build the bench-size zoo first",
    )
    parser.add_argument(
        "--cache",
        type=Path,
        default=Path(tempfile.gettempdir()) / "onnxopt-fusion-zoo-bench",
        help="where the bench zoo is built",
    )
    parser.add_argument("--rebuild", action="store_true", help="rebuild the bench zoo")
    parser.add_argument(
        "--real-cache",
        type=Path,
        default=real_models.DEFAULT_CACHE,
        help="where benchmarks/real_models.py builds the real-weight models (minilm)",
    )
    parser.add_argument("--models", nargs="*", default=None)
    parser.add_argument("--exporters", nargs="*", default=["ts", "dynamo"])
    parser.add_argument("--tools", nargs="*", default=list(TOOLS), choices=TOOLS)
    parser.add_argument("--repeat", type=int, default=5, help="timed runs per latency cell")
    parser.add_argument("--threads", type=int, nargs="*", default=[1, 2])
    parser.add_argument("--tool-timeout", type=int, default=300)
    parser.add_argument(
        "--workdir", type=Path, default=Path(tempfile.gettempdir()) / "onnxopt-fusion-bench"
    )
    parser.add_argument("--json", type=Path, default=None, help="write the results here")
    parser.add_argument(
        "--summary",
        type=Path,
        default=None,
        metavar="JSON",
        help="print the compact table of an earlier run's JSON and exit",
    )
    args = parser.parse_args(argv)
    if args.summary:
        data = json.loads(args.summary.read_text())
        tools = [t for t in TOOLS if any(t in r["tools"] for r in data["results"])]
        print(compact_table(data["results"], tools))
        return 0

    zoo_models = None if args.models is None else [m for m in args.models if m not in REAL_MODELS]
    real = [m for m in REAL_MODELS if args.models and m in args.models]
    pairs = []
    if zoo_models or not real:
        zoo = select_zoo(args, zoo_models)
        pairs += [
            (e, zoo)
            for e in zoo_entries(zoo)
            if (not zoo_models or e["model"] in zoo_models) and e["exporter"] in args.exporters
        ]
    if real:
        folder = real_models.ensure(args.real_cache, args.torch_python)
        zoo = folder
        pairs += [
            (e, folder)
            for e in zoo_entries(folder)
            if e["model"] in real and e["exporter"] in args.exporters
        ]
    if not pairs:
        print(f"no models in {zoo}", file=sys.stderr)
        return 2
    args.workdir.mkdir(parents=True, exist_ok=True)
    results = []
    start = time.perf_counter()
    for entry, where in pairs:
        t0 = time.perf_counter()
        res = measure(entry, where, args.tools, args, args.workdir)
        results.append(res)
        summary = "; ".join(
            f"{t}: {fmt_counts(r.get('fused', {}))}" if r.get("tool_ok") else f"{t}: n/a"
            for t, r in res["tools"].items()
        )
        print(
            f"{entry['model']}_{entry['exporter']} ({time.perf_counter() - t0:.0f} s): {summary}",
            flush=True,
        )
    text = table(results, args.tools, args.threads)
    print()
    print(
        f"zoo: {zoo}  case per model in the JSON; latency ratio = tool / original, "
        f"median of {args.repeat}; total {time.perf_counter() - start:.0f} s"
    )
    print(text)
    print()
    print("nodes: fused ops; latency ratio with ORT optimizations off, 1 thread")
    print(compact_table(results, args.tools))
    if args.json:
        payload = {
            "zoo": str(zoo),
            "repeat": args.repeat,
            "threads": args.threads,
            "versions": versions(),
            "results": results,
        }
        args.json.write_text(json.dumps(payload, indent=1, default=str) + "\n")
    return 0


def versions() -> dict[str, str]:
    from importlib import metadata

    out = {}
    for dist in ("onnxopt", "onnxruntime", "onnxscript", "onnx", "onnxsim", "onnxslim", "onnx-ir"):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            out[dist] = "not installed"
    out["cpu_count"] = str(os.cpu_count())
    return out


if __name__ == "__main__":
    sys.exit(main())
