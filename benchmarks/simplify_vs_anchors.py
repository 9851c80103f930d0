"""Benchmark onnxopt's ``simplify`` pipeline against the anchor tools, on the same models.

Run it (about 4 minutes on 2 cores)::

    python benchmarks/simplify_vs_anchors.py --json /tmp/simplify_vs_anchors.json

``--big`` adds the 2.4 GB external-data model (build it first with
``python benchmarks/big_model.py build``; ``--big-only`` runs just that one, 3 runs per tool).
``--reps``, ``--models``, ``--tools`` narrow a run; ``--all-models`` adds two more CNNs.

Tools (default settings, through each one's Python API):

- ``onnxopt``: ``onnxopt.optimize(path, passes="simplify", golden=..., output=...)``, i.e.
  ``fold-constants,cleanup,infer-shapes`` with every pass verified in ONNX Runtime (the product).
  The whisper models get their golden sets; the others let onnxopt capture one (part of the time).
- ``onnxopt-nv``: the same with ``verify=False`` (``--no-verify``), to show what verification costs.
- ``onnxsim``: ``onnxsim.simplify(path, output_path=out)`` (onnx-simplifier; ``check_n=0``).
- ``onnxslim``: ``onnxslim.slim(path, output_model=out)``.
- ``onnxscript``: ``onnx_ir.load`` -> ``onnxscript.optimizer.optimize(model)`` -> ``onnx_ir.save``.
- ``ort-basic``: an ONNX Runtime session with ``ORT_ENABLE_BASIC`` and ``optimized_model_filepath``
  (offline optimization; the time includes building the whole session).

Models: ``golden/whisper_encoder.onnx`` (TorchScript export) and
``golden/whisper_encoder_dynamo.onnx`` (dynamo export), run on their golden inputs; and real CNNs
from the ``onnx`` package's backend test data (``onnx/backend/test/data/light/``), run on seeded
random inputs. Those ship as IR 3 graphs whose weights are ``ConstantOfShape(0.02)`` nodes fed by
initializers that are also graph inputs; they are turned into ordinary exported models first
(seeded random weights as initializers, not graph inputs, IR 8, opset 9 kept). The
``pytorch-converted/``, ``pytorch-operator/`` and ``simple/`` folders only hold 1-5 node graphs.

Method: every tool run is a fresh child process, timed and sampled by ``big_model.measure`` (RSS
of the child's process tree every ``--interval`` s, split into anon and file-backed parts). The
child imports numpy, onnx, onnxruntime and the tool (onnxopt: with its passes) first, then times
load -> optimize -> save: the ``time`` column, median of ``--reps`` runs interleaved across tools.
``proc`` is the child's whole wall time, interpreter start and imports included. The page cache
stays warm; ``os.sync()`` runs before each run. Each tool's last output is checked in another
child: ``onnx.checker.check_model(path)`` (and with ``full_check=True``), then an ORT session with
all graph optimizations off runs it on the model's inputs and its outputs are compared with the
original model's, run the same way: a max abs difference above ``--atol`` (1e-4) is WRONG.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import json
import math
import os
import shutil
import statistics
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

sys.path.insert(0, str(Path(__file__).resolve().parent))
from big_model import Measurement, measure, model_size

REPO = Path(__file__).resolve().parent.parent
GOLDEN_DIR = REPO / "golden"
LIGHT_DIR = Path(onnx.__file__).parent / "backend" / "test" / "data" / "light"
BIG_MODEL = Path("/tmp/onnxopt-big/model.onnx")
DEFAULT_WORKDIR = Path("/tmp/onnxopt-simplify-vs-anchors")

TOOLS = ("onnxopt", "onnxopt-nv", "onnxsim", "onnxslim", "onnxscript", "ort-basic")
ANCHORS = ("onnxsim", "onnxslim", "onnxscript", "ort-basic")
TOOL_MODULES = {
    "onnxopt": "onnxopt",
    "onnxopt-nv": "onnxopt",
    "onnxsim": "onnxsim",
    "onnxslim": "onnxslim",
    "onnxscript": "onnxscript",
    "ort-basic": "onnxruntime",
}
WHISPER_MODELS = ("whisper_encoder", "whisper_encoder_dynamo")
LIGHT_MODELS = ("light_squeezenet", "light_shufflenet", "light_resnet50", "light_inception_v2")
OPTIONAL_LIGHT_MODELS = ("light_densenet121", "light_inception_v1")
INPUT_SEED = 1234


# --------------------------------------------------------------------------------------------
# child side: run one tool, or evaluate one model
# --------------------------------------------------------------------------------------------


def _has_external_data(path: Path) -> bool:
    proto = onnx.load(str(path), load_external_data=False)
    return any(t.data_location == TensorProto.EXTERNAL for t in proto.graph.initializer)


def _run_onnxopt(src: Path, out: Path, golden: Path | None, verify: bool) -> dict[str, Any]:
    import onnxopt

    _, report = onnxopt.optimize(src, passes="simplify", golden=golden, verify=verify, output=out)
    passes = {p.name: p.status for p in report.passes}
    if report.exit_code != 0:
        failed = "; ".join(f"{p.name}: {p.reason}" for p in report.failed)
        raise RuntimeError(f"onnxopt exit code {report.exit_code}: {failed}")
    return {
        "passes": passes,
        "pass_s": sum(p.seconds for p in report.passes),
        "verify_s": sum(p.verify_seconds for p in report.passes),
        "golden": "given" if golden else ("captured" if verify else "none"),
    }


def _run_onnxsim(src: Path, out: Path) -> dict[str, Any]:
    import onnxsim

    _, ok = onnxsim.simplify(str(src), output_path=str(out))
    return {"check": bool(ok)}


def _run_onnxslim(src: Path, out: Path) -> dict[str, Any]:
    import onnxslim

    onnxslim.slim(str(src), output_model=str(out))
    return {}


def _run_onnxscript(src: Path, out: Path, external: bool) -> dict[str, Any]:
    import onnx_ir as ir
    import onnxscript.optimizer

    model = onnxscript.optimizer.optimize(ir.load(src))
    ir.save(model, out, external_data=f"{out.name}.data" if external else None)
    return {}


def _run_ort_basic(src: Path, out: Path, external: bool) -> dict[str, Any]:
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    so.optimized_model_filepath = str(out)
    if external:
        so.add_session_config_entry(
            "session.optimized_model_external_initializers_file_name", f"{out.name}.data"
        )
        so.add_session_config_entry(
            "session.optimized_model_external_initializers_min_size_in_bytes", "1024"
        )
    ort.InferenceSession(str(src), so, providers=["CPUExecutionProvider"])
    return {}


def child_run(tool: str, src: Path, out: Path, result: Path, golden: Path | None) -> int:
    """Run ``tool`` on ``src`` (imports first, then a timed load -> optimize -> save)."""
    import importlib

    t_import = time.perf_counter()
    importlib.import_module("onnxruntime")
    importlib.import_module(TOOL_MODULES[tool])
    if tool == "onnxscript":
        importlib.import_module("onnxscript.optimizer")
    if tool.startswith("onnxopt"):  # built-in passes are imported on first use: do it now
        from onnxopt import registry

        for name in registry.aliases()["simplify"].split(","):
            registry.get_pass(name)
    import_s = time.perf_counter() - t_import
    external = src.exists() and _has_external_data(src)
    runners: dict[str, Callable[[], dict[str, Any]]] = {
        "onnxopt": lambda: _run_onnxopt(src, out, golden, verify=True),
        "onnxopt-nv": lambda: _run_onnxopt(src, out, golden, verify=False),
        "onnxsim": lambda: _run_onnxsim(src, out),
        "onnxslim": lambda: _run_onnxslim(src, out),
        "onnxscript": lambda: _run_onnxscript(src, out, external),
        "ort-basic": lambda: _run_ort_basic(src, out, external),
    }
    payload: dict[str, Any] = {"ok": False, "time_s": None, "error": "", "notes": {}}
    t0 = time.perf_counter()
    try:
        payload["notes"] = runners[tool]()
        payload["ok"] = out.exists()
        if not payload["ok"]:
            payload["error"] = "no output written"
    except Exception as err:
        payload["error"] = f"{type(err).__name__}: {err}"[:500]
    payload["time_s"] = time.perf_counter() - t0
    payload["import_s"] = import_s
    result.write_text(json.dumps(payload, indent=2) + "\n")
    return 0 if payload["ok"] else 1


def _all_nodes(graph: onnx.GraphProto) -> Iterable[onnx.NodeProto]:
    """Nodes of ``graph`` and of its subgraphs (If/Loop/Scan bodies)."""
    for node in graph.node:
        yield node
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.GRAPH:
                yield from _all_nodes(attr.g)
            elif attr.type == onnx.AttributeProto.GRAPHS:
                for sub in attr.graphs:
                    yield from _all_nodes(sub)


def _first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0] if text else ''}"[:300]


def child_eval(model_path: Path, inputs_npz: Path, outputs_npz: Path, result: Path) -> int:
    """Count nodes, run the checker, run ORT (optimizations off) on every input case."""
    import onnxruntime as ort

    payload: dict[str, Any] = {"checker": "", "strict": "", "load": "", "run": ""}
    proto = onnx.load(str(model_path), load_external_data=False)
    hist = collections.Counter(n.op_type for n in _all_nodes(proto.graph))
    payload.update(
        nodes=sum(hist.values()),
        ops=dict(hist),
        functions=len(proto.functions),
        function_nodes=sum(len(f.node) for f in proto.functions),
        size=model_size(model_path),
        ir_version=proto.ir_version,
        opsets={o.domain or "ai.onnx": o.version for o in proto.opset_import},
        output_names=[o.name for o in proto.graph.output],
    )
    del proto
    for key, full in (("checker", False), ("strict", True)):
        try:
            onnx.checker.check_model(str(model_path), full_check=full)
            payload[key] = "ok"
        except Exception as err:
            payload[key] = _first_line(err)

    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    so.add_session_config_entry("session.disable_prepacking", "1")
    try:
        sess = ort.InferenceSession(str(model_path), so, providers=["CPUExecutionProvider"])
        payload["load"] = "ok"
    except Exception as err:
        payload["load"] = _first_line(err)
        result.write_text(json.dumps(payload, indent=2) + "\n")
        return 1
    cases = _load_cases(inputs_npz)
    outputs: dict[str, np.ndarray] = {}
    try:
        names = [o.name for o in sess.get_outputs()]
        for i, case in enumerate(cases):
            for j, value in enumerate(sess.run(names, case)):
                outputs[f"{i}/{j}"] = np.asarray(value)
        payload["run"] = "ok"
    except Exception as err:
        payload["run"] = _first_line(err)
    np.savez(outputs_npz, **outputs)
    result.write_text(json.dumps(payload, indent=2) + "\n")
    return 0 if payload["run"] == "ok" else 1


def _load_cases(npz: Path) -> list[dict[str, np.ndarray]]:
    """Cases from an npz keyed ``<case>/<name>`` (the golden-set layout)."""
    cases: dict[int, dict[str, np.ndarray]] = collections.defaultdict(dict)
    with np.load(npz) as data:
        for key in data.files:
            index, name = key.split("/", 1)
            cases[int(index)][name] = data[key]
    return [cases[i] for i in sorted(cases)]


def _child_main(argv: Sequence[str]) -> int:
    """``_run TOOL SRC OUT RESULT LOG [GOLDEN]`` or ``_eval MODEL INPUTS OUTPUTS RESULT LOG``."""
    log = os.open(argv[5], os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.dup2(log, 1)  # tools print tables and progress (some from C++): keep them in the log
    os.dup2(log, 2)
    if argv[0] == "_run":
        golden = Path(argv[6]) if len(argv) > 6 and argv[6] else None
        return child_run(argv[1], Path(argv[2]), Path(argv[3]), Path(argv[4]), golden)
    return child_eval(Path(argv[1]), Path(argv[2]), Path(argv[3]), Path(argv[4]))


# --------------------------------------------------------------------------------------------
# models
# --------------------------------------------------------------------------------------------


@dataclass
class ModelCase:
    name: str
    path: Path
    inputs_npz: Path  # input cases, keyed "<case>/<name>"
    golden: Path | None = None  # golden set folder handed to onnxopt, when the model has one
    reps: int = 5
    note: str = ""
    big: bool = False


def _random_weight(
    shape: list[int], consumers: list[tuple[str, int]], rng: np.random.Generator
) -> np.ndarray:
    """Plausible weights: fan-in scaled matrices, BN scale ~1, BN variance > 0, small biases."""
    roles = {(op, idx) for op, idx in consumers}
    if ("BatchNormalization", 4) in roles:
        return rng.uniform(0.5, 1.5, shape).astype(np.float32)
    if ("BatchNormalization", 1) in roles or any(op == "Mul" for op, _ in roles):
        return (1.0 + 0.1 * rng.standard_normal(shape)).astype(np.float32)
    if len(shape) >= 2:
        fan_in = int(np.prod(shape[1:])) if shape[0] != 0 else 1
        if any(op == "Gemm" for op, _ in roles) or any(op == "MatMul" for op, _ in roles):
            fan_in = min(shape[0], shape[1])
        return (rng.standard_normal(shape) / math.sqrt(max(fan_in, 1))).astype(np.float32)
    return (0.1 * rng.standard_normal(shape)).astype(np.float32)


def prepare_light_model(src: Path, dst: Path, seed: int = 0) -> None:
    """Turn a backend-test 'light' CNN into an ordinary model with random initializer weights.

    The shipped graphs (IR 3) make every weight with ``ConstantOfShape(value=0.02)`` fed by an
    int64 shape initializer, and list every initializer as a graph input too (so, by the spec,
    none of them is constant). Here each float ``ConstantOfShape`` of an initializer shape
    becomes a seeded random initializer, initializers stop being graph inputs, and the IR
    version becomes 8 (opset 9 is kept).
    """
    model = onnx.load(str(src))
    graph = model.graph
    inits = {t.name: t for t in graph.initializer}
    consumers: dict[str, list[tuple[str, int]]] = collections.defaultdict(list)
    for node in graph.node:
        for i, name in enumerate(node.input):
            consumers[name].append((node.op_type, i))
    rng = np.random.default_rng(seed)
    keep_nodes, new_inits = [], []
    for node in graph.node:
        value = next((a.t for a in node.attribute if a.name == "value"), None)
        if (
            node.op_type == "ConstantOfShape"
            and node.input[0] in inits
            and value is not None
            and value.data_type == TensorProto.FLOAT
        ):
            shape = [int(d) for d in numpy_helper.to_array(inits[node.input[0]])]
            arr = _random_weight(shape, consumers[node.output[0]], rng)
            new_inits.append(numpy_helper.from_array(arr, node.output[0]))
        else:
            keep_nodes.append(node)
    used = {name for node in keep_nodes for name in node.input}
    used |= {o.name for o in graph.output}
    kept_inits = [t for t in graph.initializer if t.name in used] + new_inits
    init_names = {t.name for t in kept_inits} | set(inits)
    real_inputs = [i for i in graph.input if i.name not in init_names]
    new_graph = helper.make_graph(
        keep_nodes,
        graph.name or src.stem,
        real_inputs,
        list(graph.output),
        initializer=kept_inits,
        value_info=list(graph.value_info),
    )
    out = helper.make_model(new_graph, opset_imports=list(model.opset_import), ir_version=8)
    out.producer_name = "onnxopt-benchmarks (from onnx backend test data)"
    onnx.checker.check_model(out)
    dst.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(out, str(dst))


def random_inputs(
    model_path: Path, seed: int, dims: dict[str, int] | None = None
) -> dict[str, np.ndarray]:
    """One case of seeded standard-normal float inputs (symbolic dims from ``dims``, else 1)."""
    proto = onnx.load(str(model_path), load_external_data=False)
    inits = {t.name for t in proto.graph.initializer}
    rng = np.random.default_rng(seed)
    case: dict[str, np.ndarray] = {}
    for inp in proto.graph.input:
        if inp.name in inits:
            continue
        tt = inp.type.tensor_type
        shape = [
            d.dim_value if d.HasField("dim_value") else (dims or {}).get(d.dim_param, 1)
            for d in tt.shape.dim
        ]
        dtype = helper.tensor_dtype_to_np_dtype(tt.elem_type)
        case[inp.name] = rng.standard_normal(shape).astype(dtype)
    return case


def prepare_models(args: argparse.Namespace, workdir: Path) -> list[ModelCase]:
    models_dir = workdir / "models"
    models_dir.mkdir(parents=True, exist_ok=True)
    cases: list[ModelCase] = []
    wanted = set(args.models) if args.models is not None else None
    for name in WHISPER_MODELS:
        if wanted is not None and name not in wanted:
            continue
        golden = GOLDEN_DIR / f"{name}.golden"
        cases.append(
            ModelCase(
                name,
                GOLDEN_DIR / f"{name}.onnx",
                golden / "inputs.npz",
                golden=golden,
                reps=args.reps,
                note="golden inputs",
            )
        )
    light = list(LIGHT_MODELS) + list(OPTIONAL_LIGHT_MODELS if args.all_models else ())
    for name in light:
        if wanted is not None and name not in wanted:
            continue
        dst = models_dir / f"{name}.onnx"
        if not dst.exists():
            prepare_light_model(LIGHT_DIR / f"{name}.onnx", dst)
        inputs = models_dir / f"{name}.inputs.npz"
        np.savez(inputs, **{f"0/{k}": v for k, v in random_inputs(dst, INPUT_SEED).items()})
        cases.append(ModelCase(name, dst, inputs, reps=args.reps, note="random inputs"))
    if args.big:
        if not args.big_model.exists():
            raise SystemExit(
                f"{args.big_model} not found: run `python benchmarks/big_model.py build` first"
            )
        inputs = models_dir / "big.inputs.npz"
        case = random_inputs(args.big_model, INPUT_SEED, dims={"batch": 2})
        np.savez(inputs, **{f"0/{k}": v for k, v in case.items()})
        cases.append(
            ModelCase(
                f"big-{model_size(args.big_model) / 1e9:.1f}GB",
                args.big_model,
                inputs,
                reps=args.big_reps,
                note="random inputs",
                big=True,
            )
        )
    return cases


# --------------------------------------------------------------------------------------------
# parent side: run, evaluate, compare
# --------------------------------------------------------------------------------------------


@dataclass
class ToolResult:
    tool: str
    status: str = ""  # ok | WRONG | FAILED | UNLOADABLE | not installed | timeout
    error: str = ""
    time_s: list[float] = field(default_factory=list)  # in-child load -> optimize -> save
    proc_s: list[float] = field(default_factory=list)  # whole child process
    peak_rss: list[int] = field(default_factory=list)  # sampled, whole child process tree
    peak_anon: list[int] = field(default_factory=list)  # sampled, anonymous (heap) part
    peak_file: list[int] = field(default_factory=list)  # sampled, file-backed (mmap) part
    ru_maxrss: list[int] = field(default_factory=list)  # see the note in bench_model
    notes: dict[str, Any] = field(default_factory=dict)
    eval: dict[str, Any] = field(default_factory=dict)
    max_abs_diff: float | None = None

    def median(self, attr: str) -> float | None:
        values = getattr(self, attr)
        return float(statistics.median(values)) if values else None

    @property
    def usable(self) -> bool:
        return self.status in ("ok", "WRONG")


def installed(tool: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(TOOL_MODULES[tool]) is not None


def tool_version(tool: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    dist = {"onnxsim": "onnxsim", "ort-basic": "onnxruntime", "onnxopt-nv": "onnxopt"}.get(
        tool, tool
    )
    try:
        return version(dist)
    except PackageNotFoundError:
        return "not installed"


def _spawn(args: list[str], log: Path, timeout: int, interval: float) -> Measurement:
    """Run this script's ``_run``/``_eval`` child under ``timeout``; the log is argument 6."""
    child = [*args[:5], str(log), *args[5:]]
    argv = ["timeout", "--signal=KILL", str(timeout), sys.executable, __file__, *child]
    return measure(args[0], argv, interval)


def run_tool(
    case: ModelCase, tool: str, out_dir: Path, timeout: int, interval: float
) -> tuple[Measurement, dict[str, Any]]:
    shutil.rmtree(out_dir, ignore_errors=True)
    out_dir.mkdir(parents=True)
    result = out_dir / "result.json"
    golden = str(case.golden) if case.golden and tool.startswith("onnxopt") else ""
    args = ["_run", tool, str(case.path), str(out_dir / "model.onnx"), str(result), golden]
    m = _spawn(args, out_dir / "log.txt", timeout, interval)
    if result.exists():
        payload = json.loads(result.read_text())
    elif m.returncode in (124, 137, -9):
        payload = {"ok": False, "error": f"killed after {timeout}s timeout (or out of memory)"}
    else:
        payload = {
            "ok": False,
            "error": f"child exited with code {m.returncode}, see {out_dir / 'log.txt'}",
        }
    return m, payload


def evaluate(
    model: Path, inputs: Path, out_dir: Path, timeout: int, interval: float
) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    out_dir.mkdir(parents=True, exist_ok=True)
    result, outputs = out_dir / "eval.json", out_dir / "eval_outputs.npz"
    for p in (result, outputs):
        p.unlink(missing_ok=True)
    args = ["_eval", str(model), str(inputs), str(outputs), str(result)]
    m = _spawn(args, out_dir / "eval_log.txt", timeout, interval)
    payload = json.loads(result.read_text()) if result.exists() else {}
    if not payload:
        payload = {"load": f"evaluation child exited with code {m.returncode}", "run": ""}
    arrays: dict[str, np.ndarray] = {}
    if outputs.exists():
        with np.load(outputs) as data:
            arrays = {k: data[k] for k in data.files}
    return payload, arrays


def max_abs_diff(ref: dict[str, np.ndarray], got: dict[str, np.ndarray]) -> float:
    """Max abs difference over all cases and outputs; inf on a missing output or shape change."""
    if not ref or set(ref) != set(got):
        return math.inf
    worst = 0.0
    for key, a in ref.items():
        b = got.get(key)
        if b is None or a.shape != b.shape:
            return math.inf
        if a.size == 0:
            continue
        if a.dtype.kind in "fc":
            nan_mismatch = np.isnan(a) != np.isnan(b)
            if nan_mismatch.any():
                return math.inf
            d = np.abs(a.astype(np.float64) - b.astype(np.float64))
            worst = max(worst, float(np.nanmax(d)) if not np.isnan(d).all() else 0.0)
        else:
            worst = max(worst, 0.0 if np.array_equal(a, b) else math.inf)
    return worst


def check_output(
    case: ModelCase,
    r: ToolResult,
    ref: dict[str, np.ndarray],
    out_dir: Path,
    args: argparse.Namespace,
) -> None:
    """Evaluate the tool's last output; set its status. The big model's output is then deleted."""
    out = out_dir / "model.onnx"
    r.eval, got = evaluate(out, case.inputs_npz, out_dir, args.timeout, args.interval)
    if r.eval.get("load") != "ok":
        r.status, r.error = "UNLOADABLE", r.eval.get("load", "")
    elif r.eval.get("run") != "ok":
        r.status, r.error = "UNLOADABLE", f"run: {r.eval.get('run')}"
    else:
        r.max_abs_diff = max_abs_diff(ref, got)
        r.status = "ok" if r.max_abs_diff <= args.atol else "WRONG"
    if case.big and not args.keep:
        for p in out_dir.glob("model.onnx*"):
            p.unlink()


def bench_model(
    case: ModelCase, tools: Sequence[str], args: argparse.Namespace, workdir: Path
) -> dict[str, Any]:
    base = workdir / "out" / case.name
    print(f"\n=== {case.name} ({case.path}) ===", flush=True)
    orig_dir = base / "original"
    orig_dir.mkdir(parents=True, exist_ok=True)
    orig_eval, ref = evaluate(case.path, case.inputs_npz, orig_dir, args.timeout, args.interval)
    if orig_eval.get("run") != "ok":
        raise SystemExit(f"original model does not run in ORT: {orig_eval}")
    header = {
        "path": str(case.path),
        "note": case.note,
        "reps": case.reps,
        "ref_max_abs": max(float(np.abs(v).max()) for v in ref.values()),
    }
    if case.golden:
        golden_out = _load_cases(case.golden / "outputs.npz")
        golden_flat = {
            f"{i}/{j}": v for i, c in enumerate(golden_out) for j, v in enumerate(c.values())
        }
        header["golden_vs_ort"] = max_abs_diff(golden_flat, ref)

    results = {t: ToolResult(t) for t in tools}
    runnable = []
    for tool in tools:
        if installed(tool):
            runnable.append(tool)
        else:
            results[tool].status = "not installed"
    for rep in range(case.reps):
        for tool in runnable:
            r = results[tool]
            if r.status:  # failed in an earlier rep: no point repeating it
                continue
            os.sync()  # start each run without the previous outputs' dirty pages pending
            m, payload = run_tool(case, tool, base / tool, args.timeout, args.interval)
            print(
                f"  [{rep + 1}/{case.reps}] {tool:<11} "
                f"{'ok' if payload['ok'] else 'FAILED'} {m.wall_s:6.2f}s",
                flush=True,
            )
            r.proc_s.append(m.wall_s)
            # ru_maxrss is kept in the JSON only: Python starts children with vfork, and Linux
            # records the pre-exec (parent's) high-water mark in the child's maxrss, so it is
            # never below this script's own peak. The tables use the sampled tree RSS.
            r.peak_rss.append(m.peak_tree_rss)
            r.ru_maxrss.append(m.peak_rss)
            r.peak_anon.append(m.peak_tree_anon)
            r.peak_file.append(m.peak_tree_file)
            if not payload["ok"]:
                r.status, r.error = "FAILED", payload.get("error", "")
                continue
            r.time_s.append(payload["time_s"])
            r.notes = payload.get("notes", {})
            if rep == case.reps - 1:
                check_output(case, r, ref, base / tool, args)
    return {
        "model": case.name,
        "big": case.big,
        "header": header,
        "original": orig_eval,
        "results": results,
    }


# --------------------------------------------------------------------------------------------
# reporting
# --------------------------------------------------------------------------------------------


def _fmt_size(n: int | None) -> str:
    if n is None:
        return "-"
    for unit, div in (("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if n >= div:
            return f"{n / div:.1f} {unit}"
    return f"{n} B"


def _fmt_s(x: float | None) -> str:
    return "-" if x is None else (f"{x:.3f}" if x < 10 else f"{x:.1f}")


def _fmt_diff(x: float | None) -> str:
    return "-" if x is None else ("inf" if math.isinf(x) else f"{x:.1e}")


def op_delta(before: dict[str, int], after: dict[str, int], top: int = 5) -> str:
    """The largest changes in the op histogram, e.g. ``Constant-67 Gemm+8``."""
    keys = set(before) | set(after)
    deltas = [(k, after.get(k, 0) - before.get(k, 0)) for k in keys]
    deltas = sorted((d for d in deltas if d[1]), key=lambda d: (-abs(d[1]), d[0]))
    text = " ".join(f"{k}{d:+d}" for k, d in deltas[:top])
    if len(deltas) > top:
        text += f" (+{len(deltas) - top} more)"
    return text or "="


def _checker_cell(ev: dict[str, Any]) -> str:
    if not ev:
        return "-"
    if ev.get("checker") != "ok":
        return "FAIL"
    return "ok" if ev.get("strict") == "ok" else "ok/strict-FAIL"


def print_table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> None:
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(headers)]
    print("  ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True)).rstrip())
    print("  ".join("-" * w for w in widths))
    for row in rows:
        print("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip())


def print_model(bench: dict[str, Any], big: bool) -> None:
    h, orig = bench["header"], bench["original"]
    extra = f", golden vs ORT {h['golden_vs_ort']:.1e}" if "golden_vs_ort" in h else ""
    print(
        f"\n## {bench['model']}: {orig['nodes']} nodes, {_fmt_size(orig['size'])}, "
        f"{h['note']}, reps {h['reps']}, max|ref output| {h['ref_max_abs']:.3g}{extra}"
    )
    headers = ["tool", "status", "nodes", "Δnodes", "size", "time s", "proc s"]
    headers += ["RSS MiB", "anon MiB"] if big else ["RSS MiB"]
    headers += ["checker", "max|Δ|", "op delta"]
    rows = []
    for r in bench["results"].values():
        ev = r.eval
        nodes = ev.get("nodes")
        row = [
            r.tool,
            r.status,
            "-" if nodes is None else str(nodes),
            "-" if nodes is None else f"{nodes - orig['nodes']:+d}",
            _fmt_size(ev.get("size")),
            _fmt_s(r.median("time_s")),
            _fmt_s(r.median("proc_s")),
            "-" if not r.peak_rss else f"{max(r.peak_rss) / 2**20:.0f}",
        ]
        if big:
            row.append("-" if not r.peak_anon else f"{max(r.peak_anon) / 2**20:.0f}")
        row += [
            _checker_cell(ev),
            _fmt_diff(r.max_abs_diff),
            op_delta(orig["ops"], ev["ops"]) if ev.get("ops") else "",
        ]
        rows.append(row)
    print_table(headers, rows)
    for r in bench["results"].values():
        if r.error:
            print(f"  {r.tool}: {r.error}")
        elif r.eval.get("strict") not in (None, "ok"):
            print(f"  {r.tool}: checker full_check: {r.eval['strict']}")


def _ratio(a: float | None, b: float | None) -> float | None:
    if a is None or b is None or b == 0:
        return None
    return a / b


def ratios(benches: Sequence[dict[str, Any]], anchors: Sequence[str]) -> dict[str, Any]:
    """Per model and anchor: onnxopt / anchor for nodes and median times."""
    table: dict[str, dict[str, dict[str, float | None]]] = {}
    for bench in benches:
        res = bench["results"]
        mine, mine_nv = res.get("onnxopt"), res.get("onnxopt-nv")
        row = table.setdefault(bench["model"], {})
        for anchor in anchors:
            a = res.get(anchor)
            if mine is None or a is None or not a.usable or not mine.usable:
                row[anchor] = {"nodes": None, "time": None, "time_nv": None}
                continue
            row[anchor] = {
                "nodes": _ratio(mine.eval["nodes"], a.eval["nodes"]),
                "time": _ratio(mine.median("time_s"), a.median("time_s")),
                "time_nv": _ratio(
                    mine_nv.median("time_s") if mine_nv and mine_nv.usable else None,
                    a.median("time_s"),
                ),
                "anchor_wrong": a.status == "WRONG",
            }
    return table


def _geomean(values: Iterable[float | None]) -> float | None:
    vals = [v for v in values if v is not None and v > 0 and math.isfinite(v)]
    return math.exp(sum(math.log(v) for v in vals) / len(vals)) if vals else None


RATIO_KINDS = (
    ("nodes", "nodes after"),
    ("time", "median time, onnxopt WITH verification"),
    ("time_nv", "median time, onnxopt --no-verify"),
)


def print_ratios(
    table: dict[str, Any], anchors: Sequence[str], exclude: Iterable[str] = ()
) -> dict[str, Any]:
    """Print one ratio table per kind; return the geomeans (over models not in ``exclude``)."""
    skip = set(exclude)
    geo: dict[str, dict[str, float | None]] = {
        anchor: {
            key: _geomean(row[anchor][key] for model, row in table.items() if model not in skip)
            for key, _ in RATIO_KINDS
        }
        for anchor in anchors
    }
    for key, title in RATIO_KINDS:
        print(f"\n## onnxopt / anchor: {title}  (< 1: onnxopt better; * anchor output WRONG)")
        rows = []
        for model, row in table.items():
            cells = []
            for anchor in anchors:
                star = "*" if row[anchor].get("anchor_wrong") else ""
                cells.append(_fmt_ratio(row[anchor][key]) + star)
            rows.append([model + (" (not in geomean)" if model in skip else ""), *cells])
        rows.append(["geomean", *(_fmt_ratio(geo[a][key]) for a in anchors)])
        print_table(["model", *anchors], rows)
    return geo


def _fmt_ratio(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.2f}"


def summary_line(
    benches: Sequence[dict[str, Any]],
    table: dict[str, Any],
    geo: dict[str, Any],
    exclude: Iterable[str] = (),
) -> str:
    """One line: node wins/ties/losses and geomeans per anchor, verification cost, failures."""
    skip = set(exclude)
    counted = [b for b in benches if b["model"] not in skip]
    per_anchor = []
    for anchor, g in geo.items():
        nodes = [table[b["model"]][anchor]["nodes"] for b in counted]
        nodes = [x for x in nodes if x is not None]
        if not nodes:
            per_anchor.append(f"{anchor}: n/a (not installed, failed or unloadable)")
            continue
        wins = sum(x < 1 for x in nodes)
        ties = sum(x == 1 for x in nodes)
        per_anchor.append(
            f"{anchor}: fewer/same/more nodes {wins}/{ties}/{len(nodes) - wins - ties}, "
            f"nodes x{_fmt_ratio(g['nodes'])}, time x{_fmt_ratio(g['time'])} "
            f"(no-verify x{_fmt_ratio(g['time_nv'])})"
        )
    costs = [
        _ratio(
            b["results"]["onnxopt"].median("time_s"), b["results"]["onnxopt-nv"].median("time_s")
        )
        for b in counted
        if "onnxopt" in b["results"] and "onnxopt-nv" in b["results"]
    ]
    bad = [
        f"{r.tool}@{b['model']} {r.status}"
        for b in benches
        for r in b["results"].values()
        if r.status in ("WRONG", "UNLOADABLE", "FAILED")
    ]
    scope = f"{len(counted)} models" + (f", not {', '.join(sorted(skip))}" if skip else "")
    return (
        f"SUMMARY ({scope}; geomeans of onnxopt/anchor): "
        + "; ".join(per_anchor)
        + f". Verification costs x{_fmt_ratio(_geomean(costs))} onnxopt's own time. "
        + f"Failed/wrong/unloadable: {', '.join(bad) if bad else 'none'}."
    )


def to_json(
    benches: Sequence[dict[str, Any]], table: dict[str, Any], geo: dict[str, Any], summary: str
) -> dict[str, Any]:
    def clean(x: Any) -> Any:
        if isinstance(x, float) and not math.isfinite(x):
            return str(x)
        if isinstance(x, dict):
            return {k: clean(v) for k, v in x.items()}
        if isinstance(x, list):
            return [clean(v) for v in x]
        return x

    return clean(
        {
            "method": (
                "each run in a fresh child process; time_s = in-child load->optimize->save "
                "after imports; proc_s = whole child wall; medians over reps"
            ),
            "python": sys.version.split()[0],
            "versions": {t: tool_version(t) for t in TOOLS} | {"onnx": onnx.__version__},
            "models": [
                {
                    "model": b["model"],
                    **b["header"],
                    "original": b["original"],
                    "results": {
                        t: asdict(r)
                        | {
                            "time_median_s": r.median("time_s"),
                            "proc_median_s": r.median("proc_s"),
                        }
                        for t, r in b["results"].items()
                    },
                }
                for b in benches
            ],
            "ratios": table,
            "geomean": geo,
            "summary": summary,
        }
    )


# --------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in ("_run", "_eval"):
        return _child_main(argv)

    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--reps", type=int, default=5, help="runs per (model, tool); median")
    parser.add_argument("--tools", nargs="+", choices=TOOLS, default=list(TOOLS))
    parser.add_argument("--models", nargs="+", help="only these models (by name)")
    parser.add_argument(
        "--all-models", action="store_true", help=f"also {', '.join(OPTIONAL_LIGHT_MODELS)}"
    )
    parser.add_argument("--big", action="store_true", help="also the >2 GB model, one run each")
    parser.add_argument("--big-only", action="store_true", help="only the >2 GB model")
    parser.add_argument("--big-model", type=Path, default=BIG_MODEL)
    parser.add_argument("--big-reps", type=int, default=3, help="runs per tool on the big model")
    parser.add_argument("--workdir", type=Path, default=DEFAULT_WORKDIR)
    parser.add_argument("--atol", type=float, default=1e-4, help="max abs diff before WRONG")
    parser.add_argument("--timeout", type=int, default=900, help="seconds per child process")
    parser.add_argument("--interval", type=float, default=0.05, help="RSS sampling period (s)")
    parser.add_argument("--keep", action="store_true", help="keep the big model's outputs")
    parser.add_argument("--json", type=Path, help="write all results here")
    args = parser.parse_args(argv)
    if args.big_only:
        args.big, args.models = True, []

    args.workdir.mkdir(parents=True, exist_ok=True)
    tools = list(dict.fromkeys(args.tools))
    anchors = [t for t in ANCHORS if t in tools]
    print(f"python {sys.version.split()[0]}, {os.cpu_count()} cpus, onnx {onnx.__version__}")
    print("tools: " + ", ".join(f"{t} {tool_version(t)}" for t in tools))
    t0 = time.perf_counter()
    cases = prepare_models(args, args.workdir)
    benches = [bench_model(case, tools, args, args.workdir) for case in cases]

    for bench in benches:
        print_model(bench, big=bench["big"])
    table = ratios(benches, anchors)
    small = [b["model"] for b in benches if not b["big"]]
    big = [b["model"] for b in benches if b["big"]]
    geo = {}
    if anchors and "onnxopt" in tools:
        geo = print_ratios(table, anchors, exclude=big if small else ())
    summary = summary_line(benches, table, geo, exclude=big if small else ())
    print("\n" + summary)
    print(f"(total {time.perf_counter() - t0:.0f}s)")
    if args.json:
        args.json.write_text(json.dumps(to_json(benches, table, geo, summary), indent=2) + "\n")
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        sys.exit(main())
