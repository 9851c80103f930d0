"""Large-model benchmark helpers for onnxopt: build a >2 GB ONNX model and measure tools on it.

The model is written with bounded memory: weights are generated in small row chunks and streamed
straight into ONE external-data file, and the ``ModelProto`` only holds external-data references
(``location``/``offset``/``length``). Building a 2.4 GB model needs well under 100 MB of RSS.

Graph (opset 17, IR version 8)::

    x[batch, H] -> Identity x3 -> N x block -> final LayerNorm -> Identity x2 -> y[batch, H]

    block(h):  a = LN(h);  q,k,v = a@Wq, a@Wk, a@Wv;  h += Relu(q + k + v) @ Wo
               b = LN(h);  h += Relu(b @ W1) @ W2          (W1: H x 4H, W2: 4H x H)

LayerNorm is decomposed (ReduceMean/Sub/Mul/ReduceMean/Add/Sqrt/Div/Mul/Add). Junk for a cleanup
pass: an Identity chain at the input and output, a dead ``Relu`` whose output goes nowhere, an
unused initializer (``unused.bias``), and a duplicated initializer (``block0.ln1.gamma_dup`` holds
the same bytes as ``block0.ln1.gamma`` and is used by ``block0.ln2``).

With H=2048 one block is 4*16 MiB + 2*64 MiB = 192 MiB, so the default ``--gb 2.4`` gives 12
blocks = 2.42e9 bytes of weights (48 MatMuls of 2048x2048 and 24 of 2048x8192 / 8192x2048).

Usage::

    # build (+ optional validation: checker, onnxruntime run, numpy reference comparison)
    python benchmarks/big_model.py build [--out /tmp/onnxopt-big] [--gb 2.4] [--check]
    python benchmarks/big_model.py check [--out /tmp/onnxopt-big]

    # measure wall time and peak RSS of commands (each run in its own child process)
    python benchmarks/big_model.py measure --model /tmp/onnxopt-big/model.onnx \\
        --baseline onnx-ir --baseline onnx \\
        --cmd "onnxopt run /tmp/onnxopt-big/model.onnx -o /tmp/onnxopt-big/out.onnx \\
               --passes cleanup --no-verify" [--json results.json]

``measure`` reports, per command: wall time; ``peak_rss`` = ``ru_maxrss`` from ``os.wait4`` (the
largest peak of the child or any descendant it reaped; includes file-backed mmap pages); and
sampled peaks (every ``--interval`` s) of the RSS summed over the whole process tree, split into
anonymous (heap) and file-backed (mmap / page-cache) parts. A tool that mmaps external data may
show a ``peak_rss`` near the model size while ``peak_anon`` stays small: the file-backed pages
are reclaimable. Page cache is not dropped between runs (needs root), so timings are warm-cache.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shlex
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper

DEFAULT_OUT = Path("/tmp/onnxopt-big")
MODEL_NAME = "model.onnx"
DATA_NAME = "model.onnx.data"
OPSET = 17
IR_VERSION = 8
ALIGNMENT = 64 * 1024  # offsets of big tensors aligned to 64 KiB so runtimes can mmap them
ALIGN_THRESHOLD = 1024 * 1024  # only tensors of at least this size are aligned
EXTERNAL_THRESHOLD = 1024  # tensors with at least this many bytes go to the data file
CHUNK_BYTES = 8 * 1024 * 1024  # generate / write at most ~8 MiB at a time
LN_EPS = 1e-5


# --------------------------------------------------------------------------------------------
# build
# --------------------------------------------------------------------------------------------


@dataclass
class WeightSpec:
    """One initializer: how to generate it, and where it was written."""

    name: str
    shape: tuple[int, ...]
    kind: str  # "normal" (scaled N(0,1)), "gamma" (1 + 0.1 N(0,1)), "beta" (0.1 N(0,1))
    seed: int
    copy_of: str | None = None  # write the same bytes as this (earlier) weight
    offset: int = 0
    length: int = 0

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape)) * 4


def _chunks(spec: WeightSpec) -> Iterator[np.ndarray]:
    """Yield the float32 contents of ``spec`` as C-order row chunks of at most CHUNK_BYTES."""
    rng = np.random.default_rng([spec.seed, 0x0BB])
    rows = spec.shape[0]
    row_elems = int(np.prod(spec.shape[1:])) if len(spec.shape) > 1 else 1
    rows_per_chunk = max(1, CHUNK_BYTES // (4 * row_elems))
    scale = np.float32(1.0 / np.sqrt(rows)) if spec.kind == "normal" else np.float32(0.1)
    for start in range(0, rows, rows_per_chunk):
        n = min(rows_per_chunk, rows - start)
        buf = rng.standard_normal(n * row_elems, dtype=np.float32)
        buf *= scale
        if spec.kind == "gamma":
            buf += np.float32(1.0)
        yield buf


def _write_weights(specs: Sequence[WeightSpec], data_path: Path) -> None:
    """Stream all external weights into ``data_path``; fill in offset/length of each spec."""
    written: dict[str, WeightSpec] = {}
    with open(data_path, "wb") as f:
        for spec in specs:
            pad = (-f.tell()) % ALIGNMENT
            if pad and spec.nbytes >= ALIGN_THRESHOLD:
                f.write(b"\0" * pad)
            spec.offset = f.tell()
            source = written[spec.copy_of] if spec.copy_of else spec
            for chunk in _chunks(source):
                chunk.tofile(f)
            spec.length = f.tell() - spec.offset
            assert spec.length == spec.nbytes, (spec.name, spec.length, spec.nbytes)
            written[spec.name] = spec


def _external_initializer(spec: WeightSpec, location: str) -> TensorProto:
    t = TensorProto()
    t.name = spec.name
    t.data_type = TensorProto.FLOAT
    t.dims.extend(spec.shape)
    t.data_location = TensorProto.EXTERNAL
    for key, value in (("location", location), ("offset", spec.offset), ("length", spec.length)):
        entry = t.external_data.add()
        entry.key = key
        entry.value = str(value)
    return t


class _GraphBuilder:
    """Collects nodes and weight specs with unique, readable value names."""

    def __init__(self) -> None:
        self.nodes: list[onnx.NodeProto] = []
        self.weights: list[WeightSpec] = []
        self._counter = 0

    def weight(
        self, name: str, shape: tuple[int, ...], kind: str = "normal", copy_of: str | None = None
    ) -> str:
        self.weights.append(WeightSpec(name, shape, kind, seed=len(self.weights), copy_of=copy_of))
        return name

    def op(self, op_type: str, inputs: Sequence[str], prefix: str, **attrs: object) -> str:
        self._counter += 1
        out = f"{prefix}/{op_type.lower()}_{self._counter}"
        self.nodes.append(
            helper.make_node(
                op_type, list(inputs), [out], name=f"{prefix}/{op_type}_{self._counter}", **attrs
            )
        )
        return out

    def layer_norm(self, x: str, gamma: str, beta: str, prefix: str) -> str:
        mean = self.op("ReduceMean", [x], prefix, axes=[-1], keepdims=1)
        centered = self.op("Sub", [x, mean], prefix)
        sq = self.op("Mul", [centered, centered], prefix)
        var = self.op("ReduceMean", [sq], prefix, axes=[-1], keepdims=1)
        var_eps = self.op("Add", [var, "ln_eps"], prefix)
        std = self.op("Sqrt", [var_eps], prefix)
        normed = self.op("Div", [centered, std], prefix)
        scaled = self.op("Mul", [normed, gamma], prefix)
        return self.op("Add", [scaled, beta], prefix)


def build_graph(num_blocks: int, hidden: int, ffn: int) -> tuple[onnx.GraphProto, list[WeightSpec]]:
    """Return the graph (initializers not yet attached) and the weight specs in file order."""
    g = _GraphBuilder()
    h = "x"
    for _ in range(3):  # Identity chain on the input (cleanup fodder)
        h = g.op("Identity", [h], "input_ids")

    for b in range(num_blocks):
        p = f"block{b}"
        gamma1 = g.weight(f"{p}.ln1.gamma", (hidden,), "gamma")
        beta1 = g.weight(f"{p}.ln1.beta", (hidden,), "beta")
        a = g.layer_norm(h, gamma1, beta1, f"{p}/ln1")
        wq = g.weight(f"{p}.attn.wq", (hidden, hidden))
        wk = g.weight(f"{p}.attn.wk", (hidden, hidden))
        wv = g.weight(f"{p}.attn.wv", (hidden, hidden))
        wo = g.weight(f"{p}.attn.wo", (hidden, hidden))
        q = g.op("MatMul", [a, wq], f"{p}/attn")
        k = g.op("MatMul", [a, wk], f"{p}/attn")
        v = g.op("MatMul", [a, wv], f"{p}/attn")
        mixed = g.op(
            "Relu", [g.op("Add", [g.op("Add", [q, k], f"{p}/attn"), v], f"{p}/attn")], f"{p}/attn"
        )
        h = g.op("Add", [h, g.op("MatMul", [mixed, wo], f"{p}/attn")], f"{p}/attn")

        if b == 0:  # duplicated initializer: same bytes as block0.ln1.gamma, used by block0.ln2
            gamma2 = g.weight(f"{p}.ln1.gamma_dup", (hidden,), "gamma", copy_of=gamma1)
            g.op("Relu", [q], f"{p}/dead")  # dead node: output goes nowhere
        else:
            gamma2 = g.weight(f"{p}.ln2.gamma", (hidden,), "gamma")
        beta2 = g.weight(f"{p}.ln2.beta", (hidden,), "beta")
        c = g.layer_norm(h, gamma2, beta2, f"{p}/ln2")
        w1 = g.weight(f"{p}.ffn.w1", (hidden, ffn))
        w2 = g.weight(f"{p}.ffn.w2", (ffn, hidden))
        up = g.op("Relu", [g.op("MatMul", [c, w1], f"{p}/ffn")], f"{p}/ffn")
        h = g.op("Add", [h, g.op("MatMul", [up, w2], f"{p}/ffn")], f"{p}/ffn")

    gf = g.weight("final_ln.gamma", (hidden,), "gamma")
    bf = g.weight("final_ln.beta", (hidden,), "beta")
    h = g.layer_norm(h, gf, bf, "final_ln")
    h = g.op("Identity", [h], "output_ids")
    g.nodes.append(helper.make_node("Identity", [h], ["y"], name="output_ids/Identity_last"))
    g.weight("unused.bias", (hidden,), "beta")  # unused initializer

    graph = helper.make_graph(
        g.nodes,
        "onnxopt_big_synthetic",
        inputs=[helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", hidden])],
        outputs=[helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", hidden])],
        initializer=[helper.make_tensor("ln_eps", TensorProto.FLOAT, [], [LN_EPS])],
    )
    return graph, g.weights


def blocks_for_size(gb: float, hidden: int, ffn: int) -> int:
    per_block = 4 * hidden * hidden * 4 + 2 * hidden * ffn * 4
    return max(1, round(gb * 1e9 / per_block))


def build(out_dir: Path, gb: float, hidden: int, ffn: int) -> Path:
    out_dir.mkdir(parents=True, exist_ok=True)
    model_path = out_dir / MODEL_NAME
    num_blocks = blocks_for_size(gb, hidden, ffn)
    graph, specs = build_graph(num_blocks, hidden, ffn)
    external = [s for s in specs if s.nbytes >= EXTERNAL_THRESHOLD]
    assert len(external) == len(specs), "all generated weights are expected to be external"
    _write_weights(external, out_dir / DATA_NAME)
    graph.initializer.extend(_external_initializer(s, DATA_NAME) for s in external)
    model = helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid("", OPSET)],
        ir_version=IR_VERSION,
        producer_name="onnxopt-benchmarks",
    )
    # The proto itself is tiny (no raw data), so plain serialization is fine.
    model_path.write_bytes(model.SerializeToString())
    return model_path


def model_size(model_path: Path) -> int:
    """Size of the model file plus every external-data file it references."""
    model = onnx.load(model_path, load_external_data=False)
    locations: set[str] = set()
    for t in model.graph.initializer:
        if t.data_location == TensorProto.EXTERNAL:
            locations.update(e.value for e in t.external_data if e.key == "location")
    return model_path.stat().st_size + sum(
        (model_path.parent / loc).stat().st_size for loc in locations
    )


# --------------------------------------------------------------------------------------------
# check
# --------------------------------------------------------------------------------------------


def _load_initializer(t: TensorProto, base: Path) -> np.ndarray:
    if t.data_location != TensorProto.EXTERNAL:
        return onnx.numpy_helper.to_array(t)
    info = {e.key: e.value for e in t.external_data}
    mm = np.memmap(
        base / info["location"],
        dtype=np.float32,
        mode="r",
        offset=int(info["offset"]),
        shape=tuple(t.dims),
    )
    assert int(info["length"]) == mm.nbytes
    return mm


def reference_run(model_path: Path, x: np.ndarray) -> np.ndarray:
    """Evaluate the graph with numpy, reading weights lazily via memmap (one at a time)."""
    model = onnx.load(model_path, load_external_data=False)
    inits = {t.name: t for t in model.graph.initializer}
    env: dict[str, np.ndarray] = {"x": x}

    def get(name: str) -> np.ndarray:
        if name not in env:
            env[name] = _load_initializer(inits[name], model_path.parent)
        return env[name]

    for node in model.graph.node:
        ins = [get(n) for n in node.input]
        op = node.op_type
        if op == "Identity":
            out = ins[0]
        elif op == "MatMul":
            out = ins[0] @ ins[1]
        elif op in ("Add", "Sub", "Mul", "Div"):
            out = getattr(
                np, {"Add": "add", "Sub": "subtract", "Mul": "multiply", "Div": "divide"}[op]
            )(*ins)
        elif op == "Sqrt":
            out = np.sqrt(ins[0])
        elif op == "Relu":
            out = np.maximum(ins[0], np.float32(0))
        elif op == "ReduceMean":
            attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
            out = ins[0].mean(axis=tuple(attrs["axes"]), keepdims=bool(attrs.get("keepdims", 1)))
        else:
            raise NotImplementedError(op)
        env[node.output[0]] = np.asarray(out, dtype=np.float32)
    return env["y"]


def check(model_path: Path) -> None:
    import onnxruntime as ort

    t0 = time.perf_counter()
    onnx.checker.check_model(str(model_path))
    print(f"onnx.checker.check_model(path): OK ({time.perf_counter() - t0:.1f}s)")

    t0 = time.perf_counter()
    sess = ort.InferenceSession(str(model_path), providers=["CPUExecutionProvider"])
    t_load = time.perf_counter() - t0
    hidden = sess.get_inputs()[0].shape[1]
    x = np.random.default_rng(0).standard_normal((2, hidden), dtype=np.float32)
    t0 = time.perf_counter()
    (y,) = sess.run(["y"], {"x": x})
    t_run = time.perf_counter() - t0
    print(
        f"onnxruntime: session {t_load:.1f}s, run {t_run * 1e3:.0f}ms, y{list(y.shape)} "
        f"finite={bool(np.isfinite(y).all())} mean={y.mean():.4f} std={y.std():.4f}"
    )
    del sess

    expected = reference_run(model_path, x)
    diff = float(np.abs(y - expected).max())
    print(f"numpy reference (memmap weights): max|ort - ref| = {diff:.2e}")
    if not np.isfinite(y).all() or diff > 1e-3:
        raise SystemExit("check FAILED")
    print(f"peak RSS of this process: {_self_maxrss() / 2**30:.2f} GiB (ORT holds the weights)")


def _self_maxrss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


# --------------------------------------------------------------------------------------------
# measure
# --------------------------------------------------------------------------------------------

_ONNX_IR_ROUNDTRIP = """\
import sys, onnx_ir as ir
m = ir.load(sys.argv[1])
ir.save(m, sys.argv[2], external_data=sys.argv[3])
"""

_ONNX_ROUNDTRIP = """\
import sys, onnx
m = onnx.load(sys.argv[1])
onnx.save_model(m, sys.argv[2], save_as_external_data=True, all_tensors_to_one_file=True,
                location=sys.argv[3])
"""


def baseline_command(kind: str, model_path: Path) -> list[str]:
    """Round-trip ``model_path`` through onnx-ir or raw onnx, next to the input."""
    tag = kind.replace("-", "_")
    out = model_path.parent / f"roundtrip_{tag}.onnx"
    script = _ONNX_IR_ROUNDTRIP if kind == "onnx-ir" else _ONNX_ROUNDTRIP
    return [sys.executable, "-c", script, str(model_path), str(out), f"{out.name}.data"]


@dataclass
class Measurement:
    label: str
    command: str
    returncode: int
    wall_s: float
    peak_rss: int  # ru_maxrss via wait4: max over the child and its reaped descendants
    peak_tree_rss: int = 0  # sampled: sum of VmRSS over the live process tree
    peak_tree_anon: int = 0  # sampled: sum of RssAnon
    peak_tree_file: int = 0  # sampled: sum of RssFile + RssShmem
    samples: int = 0
    extra: dict[str, float] = field(default_factory=dict)


def _proc_tree(root: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(ppid, []).append(int(entry))
    tree, stack = [], [root]
    while stack:
        pid = stack.pop()
        tree.append(pid)
        stack.extend(children.get(pid, []))
    return tree


def _rss_fields(pid: int) -> tuple[int, int, int]:
    vals = {"VmRSS": 0, "RssAnon": 0, "RssFile": 0, "RssShmem": 0}
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                key = line.split(":", 1)[0]
                if key in vals:
                    vals[key] = int(line.split()[1]) * 1024
    except OSError:
        pass
    return vals["VmRSS"], vals["RssAnon"], vals["RssFile"] + vals["RssShmem"]


def _sampler(root: int, interval: float, result: Measurement, stop: threading.Event) -> None:
    while not stop.is_set():
        totals = [0, 0, 0]
        for pid in _proc_tree(root):
            for i, v in enumerate(_rss_fields(pid)):
                totals[i] += v
        result.peak_tree_rss = max(result.peak_tree_rss, totals[0])
        result.peak_tree_anon = max(result.peak_tree_anon, totals[1])
        result.peak_tree_file = max(result.peak_tree_file, totals[2])
        result.samples += 1
        stop.wait(interval)


def measure(label: str, argv: list[str], interval: float, shell: bool = False) -> Measurement:
    """Run ``argv`` in a child process; return wall time and peak memory."""
    shown = argv[0] if shell else shlex.join(argv)
    t0 = time.perf_counter()
    proc = subprocess.Popen(argv[0] if shell else argv, shell=shell)
    result = Measurement(label, shown, returncode=-1, wall_s=0.0, peak_rss=0)
    stop = threading.Event()
    sampler = threading.Thread(
        target=_sampler, args=(proc.pid, interval, result, stop), daemon=True
    )
    sampler.start()
    # Reap only this child: its rusage covers it and every descendant it waited for.
    _, status, usage = os.wait4(proc.pid, 0)
    result.wall_s = time.perf_counter() - t0
    stop.set()
    sampler.join()
    proc.returncode = result.returncode = os.waitstatus_to_exitcode(status)
    result.peak_rss = usage.ru_maxrss * 1024
    result.extra = {"user_s": usage.ru_utime, "sys_s": usage.ru_stime, "majflt": usage.ru_majflt}
    return result


def _gib(n: int) -> str:
    return f"{n / 2**30:.2f}"


def print_table(results: Sequence[Measurement], size: int | None) -> None:
    cols = [
        "label",
        "rc",
        "wall s",
        "user s",
        "sys s",
        "peak RSS GiB",
        "tree RSS",
        "anon",
        "file",
        "RSS/model",
    ]
    rows = []
    for r in results:
        ratio = f"{r.peak_rss / size:.2f}" if size else "-"
        rows.append(
            [
                r.label,
                str(r.returncode),
                f"{r.wall_s:.1f}",
                f"{r.extra['user_s']:.1f}",
                f"{r.extra['sys_s']:.1f}",
                _gib(r.peak_rss),
                _gib(r.peak_tree_rss),
                _gib(r.peak_tree_anon),
                _gib(r.peak_tree_file),
                ratio,
            ]
        )
    widths = [max(len(c), *(len(row[i]) for row in rows)) for i, c in enumerate(cols)]
    if size:
        print(f"model size: {size:,} bytes ({size / 1e9:.2f} GB, {_gib(size)} GiB)")
    print("  ".join(c.ljust(w) for c, w in zip(cols, widths, strict=True)))
    for row in rows:
        print("  ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)))
    for r in results:
        print(f"[{r.label}] {r.command}")


# --------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    sub = parser.add_subparsers(dest="command", required=True)

    p_build = sub.add_parser("build", help="write model.onnx + model.onnx.data")
    p_build.add_argument("--out", type=Path, default=DEFAULT_OUT, help="output directory")
    p_build.add_argument("--gb", type=float, default=2.4, help="target weight size in 1e9 bytes")
    p_build.add_argument("--hidden", type=int, default=2048)
    p_build.add_argument("--ffn", type=int, default=None, help="FFN width (default 4*hidden)")
    p_build.add_argument("--check", action="store_true", help="run `check` afterwards")

    p_check = sub.add_parser("check", help="checker + onnxruntime + numpy reference")
    p_check.add_argument("--out", type=Path, default=DEFAULT_OUT, help="directory of model.onnx")

    p_meas = sub.add_parser("measure", help="wall time and peak RSS of commands")
    p_meas.add_argument("--cmd", action="append", default=[], help="command line (shlex-split)")
    p_meas.add_argument(
        "--baseline",
        action="append",
        default=[],
        choices=["onnx-ir", "onnx"],
        help="round-trip --model with onnx-ir or raw onnx",
    )
    p_meas.add_argument(
        "--model",
        type=Path,
        default=DEFAULT_OUT / MODEL_NAME,
        help="model whose size is the ratio denominator (and baseline input)",
    )
    p_meas.add_argument("--shell", action="store_true", help="run --cmd through /bin/sh")
    p_meas.add_argument("--interval", type=float, default=0.05, help="RSS sampling period (s)")
    p_meas.add_argument("--json", type=Path, help="also write results to this JSON file")
    args = parser.parse_args(argv)

    if args.command == "build":
        ffn = args.ffn or 4 * args.hidden
        t0 = time.perf_counter()
        path = build(args.out, args.gb, args.hidden, ffn)
        wall = time.perf_counter() - t0
        size = model_size(path)
        print(
            f"built {path} (+ {DATA_NAME}): {blocks_for_size(args.gb, args.hidden, ffn)} blocks, "
            f"{size:,} bytes ({size / 1e9:.2f} GB) in {wall:.1f}s, "
            f"peak RSS {_self_maxrss() / 2**20:.0f} MiB"
        )
        if args.check:
            check(path)
        return 0

    if args.command == "check":
        check(args.out / MODEL_NAME)
        return 0

    jobs: list[tuple[str, list[str]]] = []
    for kind in args.baseline:
        jobs.append((f"baseline:{kind}", baseline_command(kind, args.model)))
    for i, cmd in enumerate(args.cmd):
        jobs.append((f"cmd{i}", [cmd] if args.shell else shlex.split(cmd)))
    if not jobs:
        parser.error("measure: give at least one --cmd or --baseline")
    size = model_size(args.model) if args.model.exists() else None
    results = []
    for label, job in jobs:
        print(f"--- running {label}", flush=True)
        results.append(measure(label, job, args.interval, shell=args.shell))
    print_table(results, size)
    if args.json:
        payload = {
            "model": str(args.model),
            "model_size": size,
            "results": [
                asdict(r) | {"rss_over_model": r.peak_rss / size if size else None} for r in results
            ],
        }
        args.json.write_text(json.dumps(payload, indent=2) + "\n")
    return 0 if all(r.returncode == 0 for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
