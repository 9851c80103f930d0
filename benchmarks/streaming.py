"""Streaming benchmark: per-chunk latency of a streamed model vs recomputing the offline model.

For each model (built here, seeded random weights) and chunk size (8, 16, 32 frames) a stream of
``--frames`` frames arrives chunk by chunk. Two ways to answer after each chunk:

- ``stream``: the model made by onnxopt's ``stream`` pass runs on the new chunk with its states
  (``StreamingSession.step``).
- ``recompute``: the offline model runs on every frame received so far (the naive alternative).

Both run in ONNX Runtime on CPU, one thread, graph optimizations on. Each chunk's time is the
fastest of ``--reps`` runs of the whole stream; the table gives the mean milliseconds per chunk,
the recompute time for the last chunk (the longest input), and ``ratio`` = mean recompute / mean
stream. ``max|d|`` checks the streamed outputs against the offline model on the whole stream.

Usage::

    python benchmarks/streaming.py [--frames 256] [--reps 5] [--models kws-tcn-gru ...]
        [--json results.json]
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable

import numpy as np
import onnx_ir as ir
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

from onnxopt.streaming import StreamingSession, StreamPass, offline_difference

CHUNKS = (8, 16, 32)


class Builder:
    """Appends onnx.helper nodes; ``op`` returns the output name."""

    def __init__(self, seed: int) -> None:
        self.rng = np.random.default_rng(seed)
        self.nodes: list = []
        self.inits: dict[str, np.ndarray] = {}

    def op(self, op_type: str, *inputs: str, outputs: int = 1, **attrs) -> str:
        names = [f"v{len(self.nodes)}_{i}" for i in range(outputs)]
        self.nodes.append(helper.make_node(op_type, list(inputs), names, **attrs))
        return names[0]

    def const(self, array) -> str:
        name = f"c{len(self.inits)}"
        self.inits[name] = np.asarray(array)
        return name

    def weight(self, *shape: int, fan_in: int | None = None) -> str:
        scale = 1 / np.sqrt(fan_in or shape[0])
        return self.const((self.rng.standard_normal(shape) * scale).astype(np.float32))

    def model(self, x_shape: list, y: str) -> ir.Model:
        self.nodes.append(helper.make_node("Identity", [y], ["y"]))
        graph = helper.make_graph(
            self.nodes,
            "bench",
            [helper.make_tensor_value_info("x", TensorProto.FLOAT, x_shape)],
            [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
            [numpy_helper.from_array(a, n) for n, a in self.inits.items()],
        )
        proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
        proto.ir_version = 8
        return ir.serde.deserialize_model(proto)


def kws_tcn_gru(features: int = 40, channels: int = 64) -> ir.Model:
    """x[batch, 40, time]: strided front end (k=4, s=2), TCN dilations 1/2/4, a GRU, a head."""
    b = Builder(0)
    h = b.op(
        "Conv", "x", b.weight(channels, features, 4, fan_in=4 * features), pads=[3, 0], strides=[2]
    )
    h = b.op("Relu", h)
    for dilation in (1, 2, 4):
        w = b.weight(channels, channels, 3, fan_in=3 * channels)
        c = b.op("Conv", h, w, pads=[2 * dilation, 0], dilations=[dilation])
        h = b.op("Add", h, b.op("Relu", c))
    seq = b.op("Transpose", h, perm=[2, 0, 1])  # [time, batch, channels]
    gates = 3 * channels
    y = b.op(
        "GRU",
        seq,
        b.weight(1, gates, channels, fan_in=channels),
        b.weight(1, gates, channels, fan_in=channels),
        b.const(np.zeros((1, 2 * gates), np.float32)),
        hidden_size=channels,
    )
    y = b.op("Squeeze", y, b.const([1]))
    return b.model(["batch", features, "time"], b.op("MatMul", y, b.weight(channels, 12)))


def _attention(b: Builder, x: str, dim: int, heads: int, mask: str, where: bool) -> str:
    dh = dim // heads
    split = b.const([0, 0, heads, dh])
    q, k, v = (b.op("Reshape", b.op("MatMul", x, b.weight(dim, dim)), split) for _ in range(3))
    q = b.op("Transpose", q, perm=[0, 2, 1, 3])
    kt = b.op("Transpose", k, perm=[0, 2, 3, 1])
    v = b.op("Transpose", v, perm=[0, 2, 1, 3])
    s = b.op("Mul", b.op("MatMul", q, kt), b.const(np.float32(dh**-0.5)))
    fill = b.const(np.float32(-np.inf))
    s = b.op("Where", mask, s, fill) if where else b.op("Add", s, mask)
    o = b.op("Transpose", b.op("MatMul", b.op("Softmax", s, axis=-1), v), perm=[0, 2, 1, 3])
    return b.op("MatMul", b.op("Reshape", o, b.const([0, 0, dim])), b.weight(dim, dim))


def _layer_norm(b: Builder, x: str, dim: int) -> str:
    ones, zeros = b.const(np.ones(dim, np.float32)), b.const(np.zeros(dim, np.float32))
    return b.op("LayerNormalization", x, ones, zeros, axis=-1)


def _ffn(b: Builder, x: str, dim: int) -> str:
    hidden = b.op("Relu", b.op("MatMul", x, b.weight(dim, 4 * dim)))
    return b.op("MatMul", hidden, b.weight(4 * dim, dim))


def causal_transformer(dim: int = 128, heads: int = 4, layers: int = 2) -> ir.Model:
    """x[batch, time, 128]: pre-norm blocks, causal mask sliced from a triangular buffer."""
    b = Builder(1)
    table = np.where(np.tril(np.ones((1024, 1024), bool)), 0, -np.inf).astype(np.float32)
    t = b.op("Gather", b.op("Shape", "x"), b.const([1]))
    mask = b.op("Slice", b.const(table), b.const([0, 0]), b.op("Concat", t, t, axis=0))
    h = "x"
    for _ in range(layers):
        h = b.op("Add", h, _attention(b, _layer_norm(b, h, dim), dim, heads, mask, where=False))
        h = b.op("Add", h, _ffn(b, _layer_norm(b, h, dim), dim))
    return b.model(["batch", "time", dim], h)


def conformer(dim: int = 128, heads: int = 4, left: int = 32, kernel: int = 15) -> ir.Model:
    """x[batch, time, 128]: FFN/2, attention limited to 32 frames, causal depthwise conv module."""
    b = Builder(2)
    t = b.op("Squeeze", b.op("Gather", b.op("Shape", "x"), b.const([1])), b.const([0]))
    pos = b.op("Range", b.const(np.array(0)), t, b.const(np.array(1)))
    diff = b.op("Sub", b.op("Unsqueeze", pos, b.const([1])), b.op("Unsqueeze", pos, b.const([0])))
    mask = b.op(
        "And",
        b.op("Not", b.op("Less", diff, b.const(np.array(0)))),
        b.op("Less", diff, b.const(np.array(left))),
    )
    h = b.op(
        "Add", "x", b.op("Mul", _ffn(b, _layer_norm(b, "x", dim), dim), b.const(np.float32(0.5)))
    )
    h = b.op("Add", h, _attention(b, _layer_norm(b, h, dim), dim, heads, mask, where=True))
    c = b.op("Transpose", _layer_norm(b, h, dim), perm=[0, 2, 1])
    c = b.op("Conv", c, b.weight(dim, dim, 1))
    dw = b.weight(dim, 1, kernel, fan_in=kernel)
    c = b.op("Conv", b.op("Pad", c, b.const([0, 0, kernel - 1, 0, 0, 0])), dw, group=dim)
    c = b.op("Mul", c, b.op("Sigmoid", c))
    c = b.op("Conv", c, b.weight(dim, dim, 1))
    return b.model(["batch", "time", dim], b.op("Add", h, b.op("Transpose", c, perm=[0, 2, 1])))


def _distances(b: Builder, x: str, dim: int, heads: int) -> str:
    """Sinusoids of distances T-1..1-T, projected per head: [heads, dh, 2T-1] (Transformer-XL)."""
    t = b.op("Squeeze", b.op("Gather", b.op("Shape", x), b.const([1])), b.const([0]))
    far = b.op("Cast", b.op("Sub", t, b.const(np.array(1))), to=TensorProto.FLOAT)
    near = b.op("Cast", b.op("Neg", t), to=TensorProto.FLOAT)
    dist = b.op("Range", far, near, b.const(np.float32(-1)))
    freq = b.const((10000.0 ** -(np.arange(dim // 2) / (dim // 2))).astype(np.float32))
    angles = b.op("Mul", b.op("Unsqueeze", dist, b.const([1])), freq)
    pe = b.op("Concat", b.op("Sin", angles), b.op("Cos", angles), axis=-1)
    p = b.op("Reshape", b.op("MatMul", pe, b.weight(dim, dim)), b.const([-1, heads, dim // heads]))
    return b.op("Transpose", p, perm=[1, 2, 0])


def _rel_shift(b: Builder, bd: str) -> str:
    """[B, H, T, 2T-1] -> [B, H, T, T]: pad, view [B, H, 2T, T], drop a row, view, keep T."""
    shape = b.op("Shape", bd)
    lead, t = b.op("Slice", shape, b.const([0]), b.const([2])), b.op("Gather", shape, b.const([2]))
    padded = b.op("Pad", bd, b.const([0, 0, 0, 1, 0, 0, 0, 0]))
    wide = b.op("Gather", b.op("Shape", padded), b.const([3]))
    rows = b.op("Reshape", padded, b.op("Concat", lead, wide, t, axis=0))
    rows = b.op("Slice", rows, b.const([1]), b.const([2**62]), b.const([2]))
    back = b.op("Concat", lead, t, b.op("Gather", shape, b.const([3])), axis=0)
    return b.op("Slice", b.op("Reshape", rows, back), b.const([0]), t, b.const([3]))


def _rel_attention(b: Builder, x: str, dim: int, heads: int, mask: str, pos: str) -> str:
    """Softmax(((q + u) K^T + rel_shift((q + v) P^T)) / sqrt(dh), banded) @ V."""
    dh = dim // heads
    split = b.const([0, 0, heads, dh])
    q, k, v = (b.op("Reshape", b.op("MatMul", x, b.weight(dim, dim)), split) for _ in range(3))
    qu = b.op("Transpose", b.op("Add", q, b.weight(heads, dh)), perm=[0, 2, 1, 3])
    qv = b.op("Transpose", b.op("Add", q, b.weight(heads, dh)), perm=[0, 2, 1, 3])
    ac = b.op("MatMul", qu, b.op("Transpose", k, perm=[0, 2, 3, 1]))
    s = b.op("Add", ac, _rel_shift(b, b.op("MatMul", qv, pos)))
    s = b.op(
        "Where", mask, b.op("Mul", s, b.const(np.float32(dh**-0.5))), b.const(np.float32(-1e9))
    )
    o = b.op("MatMul", b.op("Softmax", s, axis=-1), b.op("Transpose", v, perm=[0, 2, 1, 3]))
    o = b.op("Transpose", o, perm=[0, 2, 1, 3])
    return b.op("MatMul", b.op("Reshape", o, b.const([0, 0, dim])), b.weight(dim, dim))


def conformer_relpos(dim: int = 128, heads: int = 4, left: int = 32, kernel: int = 15) -> ir.Model:
    """The conformer with Transformer-XL relative-position attention (rel_shift) instead."""
    b = Builder(3)
    t = b.op("Squeeze", b.op("Gather", b.op("Shape", "x"), b.const([1])), b.const([0]))
    pos = b.op("Range", b.const(np.array(0)), t, b.const(np.array(1)))
    diff = b.op("Sub", b.op("Unsqueeze", pos, b.const([1])), b.op("Unsqueeze", pos, b.const([0])))
    mask = b.op(
        "And",
        b.op("Not", b.op("Less", diff, b.const(np.array(0)))),
        b.op("Less", diff, b.const(np.array(left))),
    )
    h = b.op(
        "Add", "x", b.op("Mul", _ffn(b, _layer_norm(b, "x", dim), dim), b.const(np.float32(0.5)))
    )
    distances = _distances(b, "x", dim, heads)
    h = b.op("Add", h, _rel_attention(b, _layer_norm(b, h, dim), dim, heads, mask, distances))
    c = b.op("Transpose", _layer_norm(b, h, dim), perm=[0, 2, 1])
    c = b.op("Conv", c, b.weight(dim, dim, 1))
    dw = b.weight(dim, 1, kernel, fan_in=kernel)
    c = b.op("Conv", b.op("Pad", c, b.const([0, 0, kernel - 1, 0, 0, 0])), dw, group=dim)
    c = b.op("Mul", c, b.op("Sigmoid", c))
    c = b.op("Conv", c, b.weight(dim, dim, 1))
    return b.model(["batch", "time", dim], b.op("Add", h, b.op("Transpose", c, perm=[0, 2, 1])))


MODELS: dict[str, tuple[Callable[[], ir.Model], int]] = {  # builder, time axis of x
    "kws-tcn-gru": (kws_tcn_gru, 2),
    "causal-transformer": (causal_transformer, 1),
    "conformer": (conformer, 1),
    "conformer-relpos": (conformer_relpos, 1),
}


def _options() -> ort.SessionOptions:
    """One thread, all graph optimizations: the latency set-up a busy machine disturbs least."""
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.intra_op_num_threads = options.inter_op_num_threads = 1
    options.log_severity_level = 3
    return options


def _cut(x: np.ndarray, axis: int, start: int, stop: int) -> np.ndarray:
    index = [slice(None)] * x.ndim
    index[axis] = slice(start, stop)
    return np.ascontiguousarray(x[tuple(index)])


def _timed(run: Callable[[], object]) -> float:
    begin = time.perf_counter()
    run()
    return (time.perf_counter() - begin) * 1e3


def _stream_ms(session: StreamingSession, x: np.ndarray, axis: int, chunk: int) -> list[float]:
    """Milliseconds of each chunk's step, the states threaded as in use."""
    state = session.initial_state({"x": x})
    times = []
    for start in range(0, x.shape[axis], chunk):
        feeds = {"x": _cut(x, axis, start, start + chunk)}
        begin = time.perf_counter()
        _, state = session.step(feeds, state)
        times.append((time.perf_counter() - begin) * 1e3)
    return times


def _recompute_ms(
    offline: ort.InferenceSession, x: np.ndarray, axis: int, chunk: int
) -> list[float]:
    """Milliseconds of running the offline model on all frames so far, after each chunk."""
    stops = range(chunk, x.shape[axis] + 1, chunk)
    return [_timed(lambda s=stop: offline.run(None, {"x": _cut(x, axis, 0, s)})) for stop in stops]


def _best(runs: list[list[float]]) -> list[float]:
    """Per chunk, the fastest of the repeated runs (noise from other processes only adds)."""
    return [min(times) for times in zip(*runs, strict=True)]


def measure(name: str, frames: int, reps: int) -> list[dict]:
    build, axis = MODELS[name]
    offline_model = build()
    dims = offline_model.graph.inputs[0].shape
    shape = [d if isinstance(d, int) else frames if i == axis else 1 for i, d in enumerate(dims)]
    x = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
    proto = ir.to_proto(offline_model).SerializeToString()
    offline = ort.InferenceSession(proto, _options(), providers=["CPUExecutionProvider"])
    rows = []
    for chunk in CHUNKS:
        streamed = StreamPass(chunk=chunk)(offline_model.clone()).model
        diff = offline_difference(offline_model, streamed, {"x": x}, chunks=[chunk])
        session = StreamingSession(streamed, session_options=_options())
        stream = _best([_stream_ms(session, x, axis, chunk) for _ in range(reps)])
        naive = _best([_recompute_ms(offline, x, axis, chunk) for _ in range(reps)])
        rows.append(
            {
                "model": name,
                "chunk": chunk,
                "stream_ms": float(np.mean(stream)),
                "recompute_ms": float(np.mean(naive)),
                "recompute_last_ms": naive[-1],
                "ratio": float(np.mean(naive) / np.mean(stream)),
                "max_abs_diff": diff,
            }
        )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--frames", type=int, default=256)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--models", nargs="+", choices=sorted(MODELS), default=list(MODELS))
    parser.add_argument("--json")
    args = parser.parse_args()
    rows = [row for name in args.models for row in measure(name, args.frames, args.reps)]
    header = f"{'model':<20}{'chunk':>6}{'stream ms':>11}{'recompute ms':>14}{'last ms':>9}"
    print(header + f"{'ratio':>8}{'max|d|':>10}")
    for r in rows:
        print(
            f"{r['model']:<20}{r['chunk']:>6}{r['stream_ms']:>11.3f}{r['recompute_ms']:>14.3f}"
            f"{r['recompute_last_ms']:>9.3f}{r['ratio']:>8.1f}{r['max_abs_diff']:>10.1e}"
        )
    if args.json:
        with open(args.json, "w") as file:
            json.dump({"frames": args.frames, "reps": args.reps, "rows": rows}, file, indent=2)


if __name__ == "__main__":
    main()
