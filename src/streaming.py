"""Streaming models: their metadata, a driver that runs them chunk by chunk, and its checks.

A streaming model takes one chunk of frames at a time plus its *states* (RNN hidden states,
conv caches, attention key/value caches) and returns the chunk's outputs plus the next states.
What a runtime needs to drive it is stored as JSON in ``metadata_props["onnxopt.streaming"]``::

    {
      "version": 1,
      "chunk": 16,                  # frames per chunk the model was made for
      "frame_multiple": 4,          # every chunk but the last is a multiple of this (strides)
      "time_axis": 1,               # of the first chunked input
      "batch": {"input": "x", "axis": 0},           # where the batch size is read (or null)
      "inputs": {"x": 1},           # chunked input -> its time axis; other inputs: fed whole
      "outputs": {"y": 1, "logits": null},          # time axis; null: the last chunk's value
      "states": [{"input": "gru.h_in", "output": "gru.h_out", "shape": [1, "batch", 64],
                  "dtype": "float32", "initial": 0.0, "grow_axis": null}],
      "passes": ["stream-rnn"]
    }

In a state's ``shape``, ``"batch"`` is the batch size, ``"k*batch"`` k times it, and ``"past"``
is 0: a state with a ``grow_axis`` starts empty and grows along that axis by the chunk's frames
each step. A state's ``initial`` is a number or a nested list, broadcast to its shape.

The stream passes (``stream``, ``stream-rnn``, ``stream-conv``, ``stream-attention``) share one
analysis here: it follows the time axis of every value through the graph, refuses by name any
node that reads future frames, and collects the nodes that keep past frames (sites); each
family's module (``onnxopt.passes.stream_*``) rewrites its sites, and
``onnxopt.stream_positions`` rewrites what is computed from frame positions.
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import math
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import onnx_ir as ir
import onnxruntime as ort

from onnxopt import model_io
from onnxopt.errors import UnsupportedModelError, UsageError, VerificationError
from onnxopt.metrics import DEFAULT_TOLERANCES, compare
from onnxopt.ort_runner import RunnableModel
from onnxopt.pass_api import Pass, PassResult
from onnxopt.passes.infer_shapes import InferShapesPass

METADATA_KEY = "onnxopt.streaming"
_MAX_CHUNKS = 256  # chunks per verification run; smaller chunk sizes are scaled up to keep this


@dataclasses.dataclass
class StateSpec:
    """One state: a graph input fed with the previous chunk's value of a graph output."""

    input: str
    output: str
    shape: list[int | str]
    dtype: str = "float32"
    initial: float | list = 0.0
    grow_axis: int | None = None

    def initial_value(self, batch: int) -> np.ndarray:
        """The state before the first chunk, for ``batch`` sequences."""
        shape = [parse_dim(d, batch) for d in self.shape]
        initial = np.asarray(self.initial, dtype=self.dtype)
        return np.ascontiguousarray(np.broadcast_to(initial, shape))


@dataclasses.dataclass
class StreamSpec:
    """How to drive a streaming model; stored as JSON under ``METADATA_KEY``."""

    chunk: int
    inputs: dict[str, int]
    outputs: dict[str, int | None]
    states: list[StateSpec]
    frame_multiple: int = 1
    batch: tuple[str, int] | None = None
    passes: list[str] = dataclasses.field(default_factory=list)

    @property
    def time_axis(self) -> int:
        return next(iter(self.inputs.values()))

    def to_json(self) -> str:
        data = {
            "version": 1,
            "chunk": self.chunk,
            "frame_multiple": self.frame_multiple,
            "time_axis": self.time_axis,
            "batch": {"input": self.batch[0], "axis": self.batch[1]} if self.batch else None,
            "inputs": self.inputs,
            "outputs": self.outputs,
            "states": [dataclasses.asdict(s) for s in self.states],
            "passes": self.passes,
        }
        return json.dumps(data)

    @classmethod
    def from_json(cls, text: str) -> StreamSpec:
        try:
            data = json.loads(text)
            batch = data.get("batch")
            return cls(
                chunk=int(data["chunk"]),
                inputs={k: int(v) for k, v in data["inputs"].items()},
                outputs=dict(data["outputs"]),
                states=[StateSpec(**s) for s in data["states"]],
                frame_multiple=int(data.get("frame_multiple", 1)),
                batch=(batch["input"], int(batch["axis"])) if batch else None,
                passes=list(data.get("passes", [])),
            )
        except (ValueError, KeyError, TypeError) as err:
            raise UsageError(f"bad '{METADATA_KEY}' metadata: {err}") from None

    @classmethod
    def read(cls, model: ir.Model) -> StreamSpec | None:
        """The model's streaming metadata, or None for a model that is not streaming."""
        text = model.metadata_props.get(METADATA_KEY)
        return cls.from_json(text) if text else None

    def write(self, model: ir.Model) -> None:
        model.metadata_props[METADATA_KEY] = self.to_json()

    def state_names(self) -> set[str]:
        return {s.input for s in self.states} | {s.output for s in self.states}


class StreamingSession:
    """Run a streaming model chunk by chunk, threading its states (the reference driver).

    Args:
        model: A streaming model (an onnx-ir model or a path).
        optimized: Let ONNX Runtime optimize the graph (off by default, as for verification).
        session_options: ONNX Runtime options to use instead (threads, optimization level).
    """

    def __init__(
        self,
        model: ir.Model | str | os.PathLike,
        *,
        optimized: bool = False,
        session_options: ort.SessionOptions | None = None,
    ) -> None:
        if not isinstance(model, ir.Model):
            model = model_io.load(Path(model))
        spec = StreamSpec.read(model)
        if spec is None:
            raise UsageError(f"the model has no '{METADATA_KEY}' metadata: it is not streaming")
        self.spec = spec
        self._run = _ort_runner(model, optimized, session_options)

    def initial_state(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Every state's value before the first chunk, sized for the batch in ``feeds``."""
        batch = 1
        if self.spec.batch is not None:
            name, axis = self.spec.batch
            batch = feeds[name].shape[axis]
        return {s.input: s.initial_value(batch) for s in self.spec.states}

    def step(
        self, feeds: dict[str, np.ndarray], state: dict[str, np.ndarray]
    ) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
        """Run one chunk: its outputs and the states for the next chunk."""
        results = self._run({**feeds, **state})
        next_state = {s.input: results.pop(s.output) for s in self.spec.states}
        return results, next_state

    def chunks(
        self, feeds: dict[str, np.ndarray], chunk: int | None = None
    ) -> Iterator[dict[str, np.ndarray]]:
        """Cut the chunked inputs of ``feeds`` into chunks; other inputs go whole with each."""
        chunk = chunk or self.spec.chunk
        self.check_chunk(chunk)
        length = self.length(feeds)
        for start in range(0, length, chunk):
            yield {
                name: _cut(array, self.spec.inputs.get(name), start, chunk)
                for name, array in feeds.items()
            }

    def run(self, feeds: dict[str, np.ndarray], chunk: int | None = None) -> dict[str, np.ndarray]:
        """Outputs over the whole input, run ``chunk`` frames at a time (the last may be short)."""
        self.length(feeds)
        state = self.initial_state(feeds)
        pieces: dict[str, list[np.ndarray]] = {}
        for chunk_feeds in self.chunks(feeds, chunk):
            outputs, state = self.step(chunk_feeds, state)
            for name, value in outputs.items():
                pieces.setdefault(name, []).append(value)
        return {name: self._join(name, values) for name, values in pieces.items()}

    def length(self, feeds: dict[str, np.ndarray]) -> int:
        """Frames in the chunked inputs of ``feeds`` (they must agree)."""
        missing = [name for name in self.spec.inputs if name not in feeds]
        if missing:
            raise UsageError(f"missing chunked input(s): {', '.join(missing)}")
        lengths = {feeds[name].shape[axis] for name, axis in self.spec.inputs.items()}
        if len(lengths) != 1:
            raise UsageError(f"chunked inputs have different lengths: {sorted(lengths)}")
        return lengths.pop()

    def check_chunk(self, chunk: int) -> None:
        multiple = self.spec.frame_multiple
        if chunk <= 0 or chunk % multiple:
            raise UsageError(
                f"chunk {chunk} is not a positive multiple of {multiple} frames "
                "(the model's total stride)"
            )

    def _join(self, name: str, values: list[np.ndarray]) -> np.ndarray:
        axis = self.spec.outputs.get(name)
        return values[-1] if axis is None else np.concatenate(values, axis=axis)


def _cut(array: np.ndarray, axis: int | None, start: int, size: int) -> np.ndarray:
    if axis is None:
        return array
    index = [slice(None)] * array.ndim
    index[axis] = slice(start, start + size)
    return np.ascontiguousarray(array[tuple(index)])


def _ort_runner(
    model: ir.Model, optimized: bool, options: ort.SessionOptions | None
) -> Callable[[dict[str, np.ndarray]], dict[str, np.ndarray]]:
    """A function running ``model`` on a feed dict: ORT optimizations off unless asked for."""
    if not optimized and options is None:
        return RunnableModel(model).run
    if options is None:
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.log_severity_level = 3
    proto = ir.to_proto(model).SerializeToString()
    session = ort.InferenceSession(proto, options, providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]

    def run(feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return dict(zip(names, session.run(None, feeds), strict=True))

    return run


def verification_chunks(chunk: int, multiple: int, length: int) -> list[int]:
    """Chunk sizes to verify with: ``chunk``, the smallest allowed, and one not dividing ``length``.

    Sizes that would need more than ``_MAX_CHUNKS`` runs are scaled up (keeping the multiple).
    """
    floor = multiple * max(1, -(-length // (_MAX_CHUNKS * multiple)))
    odd = next(
        (k for k in range(2 * floor, length, multiple) if length % k),
        floor + multiple,
    )
    return list(dict.fromkeys([chunk, floor, odd]))


def run_chunked(model: ir.Model, cases: list[dict[str, np.ndarray]]) -> list[dict[str, np.ndarray]]:
    """Outputs of a streaming model over whole golden inputs, checked across chunk sizes.

    Each case runs with every size of ``verification_chunks``; the chunkings must agree within
    the ``interface`` tolerance (else ``VerificationError``). The first size's outputs are kept.
    """
    session = StreamingSession(model)
    tol = DEFAULT_TOLERANCES["interface"]
    results = []
    for case in cases:
        spec = session.spec
        sizes = verification_chunks(spec.chunk, spec.frame_multiple, session.length(case))
        first = session.run(case, sizes[0])
        for size in sizes[1:]:
            other = session.run(case, size)
            for name, value in first.items():
                metrics = compare(value, other[name], tol, name)
                if not metrics.passed:
                    raise VerificationError(
                        f"chunks of {sizes[0]} and {size} frames disagree: {metrics.reason}"
                    )
        results.append(first)
    return results


def offline_difference(
    offline: ir.Model,
    streaming: ir.Model,
    feeds: dict[str, np.ndarray],
    chunks: list[int] | None = None,
) -> float:
    """The largest absolute difference between offline outputs and chunked streaming ones.

    Every output of the offline model is compared, for each chunk size (by default those
    ``run_chunked`` verifies with).
    """
    expected = RunnableModel(offline).run(feeds)
    session = StreamingSession(streaming)
    spec = session.spec
    sizes = chunks or verification_chunks(spec.chunk, spec.frame_multiple, session.length(feeds))
    worst = 0.0
    for size in sizes:
        actual = session.run(feeds, size)
        for name, value in expected.items():
            both_nan = np.isnan(actual[name]) & np.isnan(value)  # NaN where offline has NaN
            diff = np.where(both_nan, 0.0, np.abs(actual[name] - value))
            worst = max(worst, float(np.max(np.nan_to_num(diff, nan=np.inf), initial=0.0)))
    return worst


def describe(spec: StreamSpec) -> list[str]:
    """Lines for ``inspect``: chunking, chunked I/O and states."""
    lines = [f"streaming: chunk {spec.chunk} frames (multiple of {spec.frame_multiple})"]
    lines += [f"  input  {name}: time axis {axis}" for name, axis in spec.inputs.items()]
    for name, axis in spec.outputs.items():
        where = "last chunk's value" if axis is None else f"time axis {axis}"
        lines.append(f"  output {name}: {where}")
    for s in spec.states:
        grows = f", grows along axis {s.grow_axis}" if s.grow_axis is not None else ""
        shape = "x".join(str(d) for d in s.shape)
        lines.append(f"  state  {s.input} -> {s.output}: {s.dtype}[{shape}]{grows}")
    return lines


def _json_ready(value: Any) -> Any:
    """A numpy value as plain JSON (a number or nested lists)."""
    array = np.asarray(value)
    return array.item() if array.ndim == 0 else array.tolist()


# ---------------------------------------------------------------------------------------------
# Causality analysis: which axis of each value is time, and which nodes keep past frames.
# ---------------------------------------------------------------------------------------------


class NotStreamable(UnsupportedModelError):
    """A node reads future frames, or does something along time that cannot be streamed."""

    def __init__(self, node: ir.Node, reason: str) -> None:
        super().__init__(f"not streamable: node '{node.name}' ({node.op_type}) {reason}")
        self.node, self.reason = node, reason


class AlreadyStreaming(Exception):
    """The model already takes a node's past from a graph input: it is left as it is."""


@dataclasses.dataclass(frozen=True)
class Timed:
    """A value holding frames along ``axis`` (one frame per ``rate`` input frames).

    Attention scores and probabilities also have a ``key_axis`` over the frames attended to;
    ``scores`` is the MatMul that made them and ``masked`` says a causal mask was applied.
    ``absolute`` values are computed from frame positions alone (``Range(0, T)``, ``pe[:T]``).
    ``distance``: the axis (or the key axis, for scores) runs over the ``2T-1`` relative
    distances ``T-1..1-T`` of a Transformer-XL position embedding, not over frames.
    """

    axis: int
    rank: int
    rate: int = 1
    key_axis: int | None = None
    scores: ir.Node | None = None
    masked: bool = False
    absolute: bool = False
    distance: bool = False

    def moved(self, axis: int, rank: int, key_axis: int | None = None) -> Timed:
        return dataclasses.replace(self, axis=axis, rank=rank, key_axis=key_axis)


@dataclasses.dataclass(frozen=True)
class Final:
    """A summary of every frame so far (an RNN's last state, the last frame): causal."""

    rank: int | None


@dataclasses.dataclass(frozen=True)
class Length:
    """Integers computed from the number of frames (shape arithmetic).

    ``flags`` has one entry per element of a 1-D shape vector: 0 fixed, ``r > 0`` the frame
    count of a value at rate ``r``, -1 something else computed from it; None when unknown.
    """

    flags: tuple[int, ...] | None


@dataclasses.dataclass(frozen=True)
class Positions:
    """Values that depend on absolute frame positions (a Range over the length, a sliced mask)."""


@dataclasses.dataclass(frozen=True)
class Relative(Positions):
    """Values computed elementwise from a grid of query and key positions alone (``i - j``).

    A relative-position bias (``table[clip(i - j)]``) is one; the nodes forming the grid are in
    ``Analysis.grids``, so that a rewrite can feed them the positions of a chunk and its cache.
    """


Info = Timed | Final | Length | Positions


@dataclasses.dataclass
class Site:
    """A node that keeps past frames, to be rewritten by ``family``'s pass."""

    family: str
    node: ir.Node


@dataclasses.dataclass
class RelShift:
    """Transformer-XL relative scores: ``rel_shift((q + v) @ P^T)``, P over distances.

    ``matmul`` makes ``start`` ([.., T, 2T-1]); the pad/reshape/slice nodes after it make
    ``end`` ([.., T, T]); ``ranges`` are the ``Range(T-1, -T, -1)`` nodes P is computed from;
    ``scores`` is the score MatMul of the attention whose scores ``end`` is added to.
    """

    matmul: ir.Node
    start: ir.Value
    end: ir.Value
    ranges: list[ir.Node]
    scores: ir.Node | None = None
    masks: list[tuple[ir.Node, int]] = dataclasses.field(default_factory=list)


@dataclasses.dataclass
class AttentionSite(Site):
    """Self-attention: the score MatMul (Q @ K^T), the MatMuls with V, and the causal masks."""

    values: list[ir.Node] = dataclasses.field(default_factory=list)
    masks: list[tuple[ir.Node, int]] = dataclasses.field(default_factory=list)


FAMILY_PASSES = {"rnn": "stream-rnn", "conv": "stream-conv", "attention": "stream-attention"}
Rule = Callable[[ir.Node, "Analysis"], list["Info | None"]]
_RULES: dict[str, Rule] = {}


def rule(*op_types: str) -> Callable[[Rule], Rule]:
    """Register the analysis rule for ``op_types``: node -> info of each output."""

    def register(fn: Rule) -> Rule:
        for op_type in op_types:
            _RULES[op_type] = fn
        return fn

    return register


class Analysis:
    """Walk the graph once, giving each value its ``Info`` and collecting ``Site``s."""

    def __init__(self, model: ir.Model, chunked: dict[str, int], families: frozenset[str]):
        self.model = model
        self.families = families
        self.info: dict[ir.Value, Info] = {}
        self.sites: list[Site] = []
        self.absorbed: set[ir.Node] = set()  # nodes a site takes over (a chomping Slice)
        self.probes: set[ir.Value] = set()  # values whose shape or content a rewrite needs
        self.grids: dict[ir.Node, tuple[int, int]] = {}  # pos grid node -> (query, key) slots
        self.distance_ranges: set[ir.Node] = set()  # Range(T-1, -T, -1) candidates
        self.rel_shifts: dict[ir.Node, RelShift] = {}  # by the (q + v) @ P^T MatMul
        self.passthrough: dict[ir.Node, int] = {}  # rel_shift nodes -> slot of the scores
        self.score_expands: dict[ir.Node, tuple[int, ...]] = {}  # masks expanded to [.., T, T]
        for value in model.graph.inputs:
            if value.name in chunked:
                self.info[value] = Timed(chunked[value.name], len(value.shape or ()))

    def run(self) -> Analysis:
        for node in self.model.graph:
            self._visit(node)
        for value in self.model.graph.outputs:
            self._check_output(value)
        self.sites = [s for s in self.sites if s.family != "positions" or self._feeds_data(s)]
        return self

    def _feeds_data(self, site: Site) -> bool:
        """Whether positions reach frames of data (else they only build masks, rebuilt anyway)."""
        stack, seen = list(site.node.outputs), set()
        while stack:
            value = stack.pop()
            if value in seen:
                continue
            seen.add(value)
            info = self.of(value)
            if value.is_graph_output() or isinstance(info, Final):
                return True
            if isinstance(info, Timed):
                if not info.absolute:
                    return True
                stack.extend(out for node in value.consumers() for out in node.outputs)
        return False

    def of(self, value: ir.Value | None) -> Info | None:
        return None if value is None else self.info.get(value)

    def rank(self, value: ir.Value | None) -> int | None:
        info = self.of(value)
        if isinstance(info, Timed):
            return info.rank
        if isinstance(info, Final) and info.rank is not None:
            return info.rank
        if value is not None and value.shape is not None:
            return len(value.shape)
        const = static_array(value)
        return None if const is None else const.ndim

    def need(self, node: ir.Node, family: str) -> None:
        """Fail unless ``family`` is streamed by the running pass."""
        if family not in self.families:
            raise UsageError(
                f"node '{node.name}' ({node.op_type}) keeps past frames; it needs "
                f"{FAMILY_PASSES[family]}: use the 'stream' pass to stream every kind of node"
            )

    def attention(self, scores: ir.Node) -> AttentionSite:
        for site in self.sites:
            if isinstance(site, AttentionSite) and site.node is scores:
                return site
        raise KeyError(scores.name)

    def _visit(self, node: ir.Node) -> None:
        infos = [self.of(v) for v in node.inputs]
        if node in self.absorbed:
            outputs: list[Info | None] = [infos[0]]
        elif node in self.passthrough:
            outputs = [_through_shift(node, self, infos[self.passthrough[node]])]
        elif all(info is None for info in infos):
            return  # nothing here depends on the frames
        elif (node.domain.replace("ai.onnx", ""), node.op_type) in FUSED_ATTENTION:
            _past_from_inputs(node)
            reason = node.meta.get(_UNDECOMPOSED, "was not decomposed")
            raise NotStreamable(node, f"is a fused attention that cannot be decomposed: {reason}")
        elif node.domain not in ("", "ai.onnx") or node.op_type not in _RULES:
            raise NotStreamable(node, "is not known to keep frames apart (no streaming rule)")
        else:
            outputs = _RULES[node.op_type](node, self)
        for value, info in zip(node.outputs, outputs, strict=False):
            if info is not None:
                self.info[value] = info

    def _check_output(self, value: ir.Value) -> None:
        info = self.of(value)
        node = value.producer()
        if isinstance(info, Timed) and info.key_axis is not None and node is not None:
            raise NotStreamable(node, "outputs attention weights, which have no fixed size")
        if isinstance(info, Timed) and info.distance and node is not None:
            raise NotStreamable(node, "outputs values over relative distances")
        if isinstance(info, (Length, Positions)) and node is not None:
            raise NotStreamable(node, f"outputs '{value.name}', computed from the input length")


_PAST_SLOTS = {"Attention": (4, 5), "MultiHeadAttention": (6, 7)}


def _past_from_inputs(node: ir.Node) -> None:
    """A fused attention fed past keys or values by a graph input: the model streams already."""
    for slot in _PAST_SLOTS[node.op_type]:
        value = node.inputs[slot] if len(node.inputs) > slot else None
        if value is not None and value.is_graph_input():
            raise AlreadyStreaming(
                f"node '{node.name}' takes past keys and values from input '{value.name}': "
                "the model keeps its own cache"
            )


def static_array(value: ir.Value | None) -> np.ndarray | None:
    """The value's content if it is constant: an initializer, a Constant, or computed from them.

    Exporters compute pads and shapes from constants (ConstantOfShape, Concat, Reshape...);
    such small subgraphs are evaluated once (ONNX's reference evaluator) and remembered.
    """
    if value is None:
        return None
    tensor = ir.convenience.get_const_tensor(value)
    if tensor is not None:
        return tensor.numpy()
    if _FOLDED not in value.meta:
        value.meta[_FOLDED] = _fold(value)
    return value.meta[_FOLDED]


_FOLDED = "onnxopt.streaming.folded"
_FOLD_NODES, _FOLD_ELEMENTS = 64, 1 << 16


def _fold(value: ir.Value) -> np.ndarray | None:
    """Evaluate ``value`` when only constants feed it (a few small nodes); else None."""
    graph, producer = value.graph, value.producer()
    if graph is None or producer is None:
        return None
    nodes: list[ir.Node] = []
    constants: dict[str, np.ndarray] = {}
    stack = [producer]
    while stack:
        node = stack.pop()
        if node in nodes:
            continue
        if len(nodes) >= _FOLD_NODES or node.graph is not graph or _has_subgraph(node):
            return None
        nodes.append(node)
        for source in (v for v in node.inputs if v is not None):
            tensor = ir.convenience.get_const_tensor(source)
            if tensor is not None:
                constants[source.name] = tensor.numpy()
            elif source.producer() is None:
                return None  # a graph input
            else:
                stack.append(source.producer())
    if sum(a.size for a in constants.values()) > _FOLD_ELEMENTS:
        return None
    return _evaluate(graph, nodes, constants, value.name)


def _has_subgraph(node: ir.Node) -> bool:
    return any(
        a.type in (ir.AttributeType.GRAPH, ir.AttributeType.GRAPHS)
        for a in node.attributes.values()
    )


def _evaluate(
    graph: ir.Graph, nodes: list[ir.Node], constants: dict[str, np.ndarray], name: str
) -> np.ndarray | None:
    import onnx
    from onnx.reference import ReferenceEvaluator

    order = {node: i for i, node in enumerate(graph)}
    protos = [ir.serde.serialize_node(n) for n in sorted(nodes, key=order.__getitem__)]
    body = onnx.helper.make_graph(
        protos,
        "fold",
        [],
        [onnx.helper.make_value_info(name, onnx.TypeProto())],
        [onnx.numpy_helper.from_array(a, n) for n, a in constants.items()],
    )
    opsets = [onnx.helper.make_opsetid(d, v) for d, v in graph.opset_imports.items()]
    try:
        return np.asarray(
            ReferenceEvaluator(onnx.helper.make_model(body, opset_imports=opsets)).run(None, {})[0]
        )
    except Exception:  # anything the evaluator cannot do leaves the value unknown
        return None


def static_ints(value: ir.Value | None) -> list[int] | None:
    array = static_array(value)
    return None if array is None else [int(x) for x in np.ravel(array)]


def int_attr(node: ir.Node, name: str, default: int) -> int:
    attr = node.attributes.get(name)
    return default if attr is None else int(attr.as_int())


def ints_attr(node: ir.Node, name: str) -> list[int] | None:
    attr = node.attributes.get(name)
    return None if attr is None else [int(x) for x in attr.as_ints()]


def str_attr(node: ir.Node, name: str, default: str) -> str:
    attr = node.attributes.get(name)
    return default if attr is None else attr.as_string()


def opset(node: ir.Node, model: ir.Model) -> int:
    return node.version or model.opset_imports.get("", 1)


def axes_input(node: ir.Node, an: Analysis, index: int = 1) -> list[int] | None:
    """Axes from an attribute (old opsets) or a constant input (new ones); None if absent."""
    attr = ints_attr(node, "axes")
    if attr is not None:
        return attr
    if len(node.inputs) > index and node.inputs[index] is not None:
        axes = static_ints(node.inputs[index])
        if axes is None:
            raise NotStreamable(node, "has axes that are not constant")
        return axes
    return None


def _norm(axis: int, rank: int) -> int:
    return axis + rank if axis < 0 else axis


# --- elementwise ops and shape arithmetic ---------------------------------------------------

_UNARY = (  # noqa: SIM905 - a word list
    "Abs Acos Acosh Asin Asinh Atan Atanh Cast Ceil Celu Cos Cosh Dropout Elu Erf Exp Floor "
    "Gelu HardSigmoid HardSwish Identity IsInf IsNaN LeakyRelu Log Mish Neg Not Reciprocal "
    "Relu Round Selu Shrink Sigmoid Sign Sin Sinh Softplus Softsign Sqrt Tan Tanh "
    "ThresholdedRelu Clip Swish"
).split()
_NARY = (  # noqa: SIM905 - a word list
    "Add Sub Mul Div Pow Mod Max Min Sum Mean And Or Xor Equal Less LessOrEqual Greater "
    "GreaterOrEqual Where PRelu CastLike BitShift BitwiseAnd BitwiseOr BitwiseXor"
).split()
_SELECTING = {"Where", "Max", "Min", "Cast", "CastLike", "Identity", "Abs", "Clip"}


@rule(*_UNARY, *_NARY)
def _elementwise(node: ir.Node, an: Analysis) -> list[Info | None]:
    values = [v for v in node.inputs if v is not None]
    kinds = {type(an.of(v)) for v in values} - {type(None)}
    if Timed in kinds:
        info: Info | None = _timed_elementwise(node, an)
    elif Final in kinds:
        if kinds - {Final}:
            raise NotStreamable(node, "combines a summary of all frames with the input length")
        ranks = [r for r in (an.rank(v) for v in values) if r is not None]
        info = Final(max(ranks) if ranks else None)
    elif kinds == {Relative}:
        info = Relative()
    elif kinds & {Positions, Relative}:
        info = Positions()
    else:
        info = _length_elementwise(node, an)
    return [info] * len(node.outputs)


def _timed_elementwise(node: ir.Node, an: Analysis) -> Info:
    """Broadcast frames with other operands; a causal mask added to attention scores is noted.

    Positions along two axes (``pos[:, None] - pos[None, :]``) make a position grid (a mask).
    """
    ranks = [r for r in (an.rank(v) for v in node.inputs if v is not None) if r is not None]
    out_rank = max(ranks)
    aligned: Timed | None = None
    aligned_index, others = 0, []
    for index, value in enumerate(node.inputs):
        info = an.of(value)
        if value is None:
            continue
        if isinstance(info, Timed):
            shift = out_rank - info.rank
            key = None if info.key_axis is None else info.key_axis + shift
            moved = info.moved(info.axis + shift, out_rank, key)
            if aligned is not None and (
                moved.axis,
                moved.key_axis,
                moved.rate,
                moved.distance,
            ) != (aligned.axis, aligned.key_axis, aligned.rate, aligned.distance):
                if aligned.absolute and moved.absolute:
                    return _grid(node, an, (aligned_index, aligned), (index, moved))
                raise NotStreamable(node, "combines frames along different axes or strides")
            if aligned is None:
                aligned, aligned_index = moved, index
            else:
                aligned = _merge_timed(aligned, moved, node, an)
        elif isinstance(info, Final):
            raise NotStreamable(node, "uses a summary of all frames at every frame (reads ahead)")
        elif isinstance(info, Length):
            raise NotStreamable(node, "combines frames with the input length")
        else:
            others.append(index)
    assert aligned is not None
    for index in others:
        if _per_frame(node.inputs[index], an, aligned):
            aligned = _masked(node, index, an, aligned)
    return aligned


def _grid(node: ir.Node, an: Analysis, a: tuple[int, Timed], b: tuple[int, Timed]) -> Positions:
    """Positions along two axes: a grid of query (the earlier axis) and key positions."""
    live = [v for v in node.inputs if v is not None and an.of(v) is not None]
    if len(live) != 2 or a[1].key_axis is not None or b[1].key_axis is not None:
        return Positions()
    (query, _), (key, _) = sorted((a, b), key=lambda pair: pair[1].axis)
    an.grids[node] = (query, key)
    return Relative()


def _merge_timed(a: Timed, b: Timed, node: ir.Node | None = None, an: Analysis | None = None):
    scores = a.scores or b.scores
    differ = a.scores is not None and b.scores is not None and a.scores is not b.scores
    if differ and a.key_axis is not None:  # scores added to scores
        scores = _link_shift(node, an, a.scores, b.scores)
    return dataclasses.replace(
        a,
        masked=a.masked or b.masked,
        scores=scores,
        absolute=a.absolute and b.absolute,
    )


def _link_shift(node: ir.Node | None, an: Analysis | None, a: ir.Node, b: ir.Node) -> ir.Node:
    """Relative scores added to an attention's scores: link them; the attention's MatMul."""
    assert node is not None and an is not None
    shift, scores = (an.rel_shifts.get(a), b) if a in an.rel_shifts else (an.rel_shifts.get(b), a)
    if shift is None or shift.scores not in (None, scores):
        raise NotStreamable(node, "adds the scores of two attentions")
    shift.scores = scores
    an.attention(scores).masks.extend(shift.masks)
    shift.masks.clear()
    return scores


def _per_frame(value: ir.Value, an: Analysis, timed: Timed) -> bool:
    """Whether a non-frame operand still varies along the time (or key) axis."""
    if isinstance(an.of(value), Positions):
        return True
    shape = value.shape
    if shape is None:
        const = static_array(value)
        shape = None if const is None else ir.Shape(const.shape)
    if shape is None:
        return False
    shift = timed.rank - len(shape)
    for axis in (timed.axis, timed.key_axis):
        if axis is not None and axis - shift >= 0:
            dim = shape[axis - shift]
            if isinstance(dim, int) and dim > 1:
                return True
    return False


def _masked(node: ir.Node, index: int, an: Analysis, scores: Timed) -> Timed:
    """Note a mask on attention scores (Add, or Where's condition) or refuse the operand."""
    is_mask = scores.key_axis is not None and (
        node.op_type == "Add" or (node.op_type == "Where" and index == 0)
    )
    if not is_mask:
        raise NotStreamable(
            node, "combines frames with values fixed per absolute position (a position table?)"
        )
    assert scores.scores is not None
    shift = an.rel_shifts.get(scores.scores)
    if shift is not None and shift.scores is None:
        shift.masks.append((node, index))  # the attention's, once the shift is added to it
    else:
        an.attention(shift.scores if shift else scores.scores).masks.append((node, index))
    an.probes.add(node.inputs[index])
    parts = mask_parts(node.inputs[index], an)
    if parts is not None:
        an.probes.update(parts[0].inputs[i] for i in parts[1:])
    if node.op_type == "Where":
        an.probes.update(v for v in node.inputs[1:] if not isinstance(an.of(v), Timed))
    return dataclasses.replace(scores, masked=True)


def mask_parts(value: ir.Value, an: Analysis) -> tuple[ir.Node, int, int] | None:
    """A relative bias plus a mask, summed (then perhaps expanded): the Add and their slots."""
    node = value.producer()
    if node is not None and node in an.score_expands:
        node = node.inputs[0].producer()
    if node is None or node.op_type != "Add" or len(node.inputs) != 2:
        return None
    infos = [an.of(v) for v in node.inputs]
    for bias, mask in ((0, 1), (1, 0)):
        if isinstance(infos[bias], Relative) and type(infos[mask]) is Positions:
            return node, bias, mask
    return None


def _length_elementwise(node: ir.Node, an: Analysis) -> Length | None:
    """Shape arithmetic: an element keeps its frame flag when the op only selects or casts."""
    vectors = []
    for value in (v for v in node.inputs if v is not None):
        info = an.of(value)
        if isinstance(info, Length):
            if info.flags is None:
                return Length(None)
            vectors.append(info.flags)
        else:
            size = _size(value)
            if size is None:
                return Length(None)
            vectors.append((0,) * size)
    width = max(len(v) for v in vectors)
    if any(len(v) not in (1, width) for v in vectors):
        return Length(None)
    flags = []
    for i in range(width):
        column = {v[0] if len(v) == 1 else v[i] for v in vectors} - {0}
        keep = node.op_type in _SELECTING and len(column) == 1
        flags.append(0 if not column else column.pop() if keep else -1)
    return Length(tuple(flags)) if any(flags) else None


def _size(value: ir.Value) -> int | None:
    """Number of elements of a static value, when known."""
    const = static_array(value)
    if const is not None:
        return int(const.size)
    if value.shape is not None and all(isinstance(d, int) for d in value.shape):
        return int(np.prod(value.shape, dtype=np.int64))
    return None


@rule("CastLike")
def _cast_like(node: ir.Node, an: Analysis) -> list[Info | None]:
    """CastLike takes only the type of its second input."""
    return [an.of(node.inputs[0])]


@rule("BatchNormalization", "QuantizeLinear", "DequantizeLinear")
def _per_channel(node: ir.Node, an: Analysis) -> list[Info | None]:
    """Parameters broadcast along one axis (the channels, or Q/DQ's ``axis``), not numpy-style."""
    info = an.of(node.inputs[0])
    if any(an.of(v) is not None for v in node.inputs[1:]):
        raise NotStreamable(node, "has parameters computed from the frames")
    if isinstance(info, Timed):
        axis = _norm(int_attr(node, "axis", 1), info.rank)
        scales = static_array(node.inputs[1]) if len(node.inputs) > 1 else None
        per_axis = node.op_type == "BatchNormalization" or (scales is not None and scales.size > 1)
        if per_axis and axis in (info.axis, info.key_axis):
            raise NotStreamable(node, "has a parameter per frame (time is its channel axis)")
    elif isinstance(info, (Length, Positions)):
        raise NotStreamable(node, "normalizes a value computed from the length")
    return [info] + [None] * (len(node.outputs) - 1)


@rule("Shape")
def _shape(node: ir.Node, an: Analysis) -> list[Info | None]:
    info = an.of(node.inputs[0])
    if isinstance(info, Relative):
        return [Relative()]  # a grid's shape: the grid's, whatever positions feed it
    if not isinstance(info, Timed):
        return [Length(None) if isinstance(info, Positions) else None]
    start = _norm(int_attr(node, "start", 0), info.rank)
    end = _norm(int_attr(node, "end", info.rank), info.rank)
    flags = tuple(
        info.rate if i == info.axis else -1 if i == info.key_axis else 0
        for i in range(max(0, start), min(info.rank, end))
    )
    return [Length(flags) if any(flags) else None]


@rule("Size")
def _size_rule(node: ir.Node, an: Analysis) -> list[Info | None]:
    return [Length((-1,)) if isinstance(an.of(node.inputs[0]), (Timed, Positions)) else None]


@rule("Range", "Trilu", "EyeLike")
def _positions(node: ir.Node, an: Analysis) -> list[Info | None]:
    if any(isinstance(an.of(v), (Timed, Final)) for v in node.inputs):
        raise NotStreamable(node, "takes a range or triangle over frames")
    if node.op_type == "Range":
        start, delta = static_array(node.inputs[0]), static_array(node.inputs[2])
        rate = _frame_count(an.of(node.inputs[1]))
        if rate and _is_scalar(start, 0) and _is_scalar(delta, 1):
            an.sites.append(Site("positions", node))
            return [Timed(0, 1, rate, absolute=True)]  # frame positions 0..T-1
        lengths = [an.of(v) for v in node.inputs[:2]]
        if _is_scalar(delta, -1) and all(isinstance(i, Length) for i in lengths):
            an.distance_ranges.add(node)  # T-1..1-T, probed when a rel_shift uses it
            an.probes.add(node.outputs[0])
            return [Timed(0, 1, distance=True)]
    return [Positions()]


def _is_scalar(array: np.ndarray | None, number: float) -> bool:
    return array is not None and array.size == 1 and float(array.item()) == number


def _frame_count(info: Info | None) -> int | None:
    """The rate r when ``info`` is exactly the frame count of values at rate r."""
    if isinstance(info, Length) and info.flags is not None and len(info.flags) == 1:
        return info.flags[0] if info.flags[0] > 0 else None
    return None


@rule("ConstantOfShape")
def _constant_of_shape(node: ir.Node, an: Analysis) -> list[Info | None]:
    info = an.of(node.inputs[0])
    if isinstance(info, Relative):
        return [Relative()]  # zeros_like(grid)
    flags = info.flags if isinstance(info, Length) else None
    if flags is None or -1 in flags or sum(1 for f in flags if f > 0) != 1:
        return [Positions()]
    axis = next(i for i, f in enumerate(flags) if f > 0)
    return [Timed(axis, len(flags), flags[axis])]  # the same value at every frame


# --- layout ops -------------------------------------------------------------------------------


@rule("Transpose")
def _transpose(node: ir.Node, an: Analysis) -> list[Info | None]:
    info = an.of(node.inputs[0])
    if not isinstance(info, Timed):
        return [info]
    perm = ints_attr(node, "perm") or list(reversed(range(info.rank)))
    key = None if info.key_axis is None else perm.index(info.key_axis)
    return [info.moved(perm.index(info.axis), info.rank, key)]


@rule("Unsqueeze")
def _unsqueeze(node: ir.Node, an: Analysis) -> list[Info | None]:
    info = an.of(node.inputs[0])
    if not isinstance(info, Timed):
        return [Final(None) if isinstance(info, Final) else info]
    axes = axes_input(node, an) or []
    rank = info.rank + len(axes)
    kept = [i for i in range(rank) if i not in {_norm(a, rank) for a in axes}]
    key = None if info.key_axis is None else kept[info.key_axis]
    return [info.moved(kept[info.axis], rank, key)]


@rule("Squeeze")
def _squeeze(node: ir.Node, an: Analysis) -> list[Info | None]:
    info = an.of(node.inputs[0])
    if not isinstance(info, Timed):
        return [Final(None) if isinstance(info, Final) else info]
    axes = axes_input(node, an)
    if axes is None:
        raise NotStreamable(node, "squeezes without axes (it could squeeze a 1-frame chunk)")
    gone = {_norm(a, info.rank) for a in axes}
    if info.axis in gone or info.key_axis in gone:
        raise NotStreamable(node, "squeezes the time axis")
    kept = [i for i in range(info.rank) if i not in gone]
    key = None if info.key_axis is None else kept.index(info.key_axis)
    return [info.moved(kept.index(info.axis), len(kept), key)]


@rule("Reshape")
def _reshape(node: ir.Node, an: Analysis) -> list[Info | None]:
    data, shape = node.inputs[0], node.inputs[1]
    info, shape_info = an.of(data), an.of(shape)
    if isinstance(info, Positions) or (isinstance(info, Length) and shape_info is None):
        return [info]
    if isinstance(info, Final) and shape_info is None:
        return [Final(_size(shape))]
    if not isinstance(info, Timed) or info.key_axis is not None:
        raise NotStreamable(node, "reshapes values computed from the frames in a way not followed")
    if isinstance(shape_info, Length):
        return [_reshape_to_length(node, info, shape_info)]
    target = static_ints(shape)
    if shape_info is not None or target is None:
        raise NotStreamable(node, "reshapes frames to a shape it cannot follow")
    return [_reshape_static(node, data, info, target)]


def _reshape_to_length(node: ir.Node, info: Timed, shape: Length) -> Timed:
    flags = shape.flags
    if flags is None or -1 in flags or sum(1 for f in flags if f > 0) != 1:
        raise NotStreamable(node, "reshapes frames with a computed shape that merges time")
    axis = next(i for i, f in enumerate(flags) if f > 0)
    if flags[axis] != info.rate:
        raise NotStreamable(node, "reshapes frames to the length of a differently strided value")
    return info.moved(axis, len(flags))


def _reshape_static(node: ir.Node, data: ir.Value, info: Timed, target: list[int]) -> Timed:
    """Time must stay its own axis: copied (0) or inferred (-1) at its place, prefix unchanged."""
    axis, dims = info.axis, list(data.shape or [None] * info.rank)
    copy = int_attr(node, "allowzero", 0) == 0
    fixed = dims[axis] if isinstance(dims[axis], int) else None
    if axis < len(target) and fixed is not None and target[axis] == fixed:
        raise NotStreamable(
            node, f"reshapes to a fixed {fixed} frames: export the model with a dynamic time axis"
        )
    prefix_kept = all(
        (t == 0 and copy) or (isinstance(d, int) and t == d)
        for t, d in zip(target[:axis], dims[:axis], strict=False)
    )
    if axis < len(target) and prefix_kept and target[axis] in ((0, -1) if copy else (-1,)):
        return info.moved(axis, len(target))
    raise NotStreamable(node, "reshapes frames so that time merges with another axis")


@rule("Flatten")
def _flatten(node: ir.Node, an: Analysis) -> list[Info | None]:
    info = an.of(node.inputs[0])
    if not isinstance(info, Timed):
        return [Final(2) if isinstance(info, Final) else info]
    at = _norm(int_attr(node, "axis", 1), info.rank)
    if info.key_axis is None and (info.axis, at) == (0, 1):
        return [info.moved(0, 2)]
    if info.key_axis is None and info.axis == at == info.rank - 1:
        return [info.moved(1, 2)]
    raise NotStreamable(node, "flattens time together with other axes")


@rule("Expand")
def _expand(node: ir.Node, an: Analysis) -> list[Info | None]:
    info, shape_info = an.of(node.inputs[0]), an.of(node.inputs[1])
    if isinstance(shape_info, Relative) and (info is None or isinstance(info, Relative)):
        return [Relative()]  # full_like(grid, value)
    scores = isinstance(info, Positions) or (isinstance(info, Timed) and info.key_axis is not None)
    if scores and isinstance(shape_info, Length) and shape_info.flags is not None:
        an.score_expands[node] = shape_info.flags  # made to broadcast over frames instead
        if isinstance(info, Timed):
            shift = len(shape_info.flags) - info.rank
            return [info.moved(info.axis + shift, info.rank + shift, info.key_axis + shift)]
    if isinstance(info, Positions) or (isinstance(info, Final) and shape_info is None):
        return [info]
    if isinstance(shape_info, Length):
        flags = shape_info.flags
        if flags is None or -1 in flags:
            raise NotStreamable(node, "expands to a shape computed from the length")
        rank = len(flags)
        if info is None:
            return _constant_of_shape(node, an)  # a fixed value repeated at every frame
    elif shape_info is None:
        rank = max(_size(node.inputs[1]) or 0, an.rank(node.inputs[0]) or 0)
    else:
        raise NotStreamable(node, "expands to a shape that depends on frames")
    if not isinstance(info, Timed):
        raise NotStreamable(node, "expands the input length")
    shift = rank - info.rank
    key = None if info.key_axis is None else info.key_axis + shift
    return [info.moved(info.axis + shift, rank, key)]


@rule("Tile")
def _tile(node: ir.Node, an: Analysis) -> list[Info | None]:
    info, repeats = an.of(node.inputs[0]), static_ints(node.inputs[1])
    if isinstance(info, Timed) and repeats is not None and repeats[info.axis] == 1:
        return [info]
    raise NotStreamable(node, "repeats along time, or by a computed count")


@rule("Concat")
def _concat(node: ir.Node, an: Analysis) -> list[Info | None]:
    infos = [an.of(v) for v in node.inputs]
    if all(isinstance(i, Length) or i is None for i in infos):
        return [_concat_lengths(node, an)]
    timed = [i for i in infos if isinstance(i, Timed)]
    if not timed:
        return [Positions() if any(isinstance(i, Positions) for i in infos) else Final(None)]
    first = timed[0]
    axis = _norm(int_attr(node, "axis", 0), first.rank)
    if axis == first.axis:
        for value, info in zip(node.inputs, infos, strict=True):
            if info is None and value.is_graph_input():
                raise AlreadyStreaming(
                    f"node '{node.name}' puts input '{value.name}' before the frames: "
                    "the model keeps its own cache"
                )
        raise NotStreamable(node, "concatenates along time")
    if any(not isinstance(i, Timed) or i.axis != first.axis or i.rate != first.rate for i in infos):
        raise NotStreamable(node, "concatenates frames with values that have no frames")
    return [first]


def _concat_lengths(node: ir.Node, an: Analysis) -> Length | None:
    flags: list[int] = []
    for value in node.inputs:
        info = an.of(value)
        if isinstance(info, Length):
            if info.flags is None:
                return Length(None)
            flags += info.flags
        else:
            size = _size(value)
            if size is None:
                return Length(None)
            flags += [0] * size
    return Length(tuple(flags)) if any(flags) else None


@rule("Split")
def _split(node: ir.Node, an: Analysis) -> list[Info | None]:
    info = an.of(node.inputs[0])
    if isinstance(info, Timed):
        if _norm(int_attr(node, "axis", 0), info.rank) in (info.axis, info.key_axis):
            raise NotStreamable(node, "splits along time")
    elif not isinstance(info, (Final, Positions)):
        raise NotStreamable(node, "splits a value computed from the length")
    return [info] * len(node.outputs)


@rule("Gather")
def _gather(node: ir.Node, an: Analysis) -> list[Info | None]:
    data, indices = node.inputs[0], node.inputs[1]
    info, index_info = an.of(data), an.of(indices)
    picked = static_array(indices)
    if isinstance(info, Length) and index_info is None and picked is not None:
        return [_pick(info, picked)]
    if isinstance(index_info, Timed) and info is None:  # an embedding lookup per frame
        axis = _norm(int_attr(node, "axis", 0), an.rank(data) or 1)
        rank = (an.rank(data) or 1) - 1 + index_info.rank
        return [index_info.moved(axis + index_info.axis, rank)]
    if isinstance(info, (Final, Positions)) and index_info is None:
        return [info]
    if isinstance(index_info, Positions) and info is None:  # a table looked up by position
        return [Relative() if isinstance(index_info, Relative) else Positions()]
    if not isinstance(info, Timed) or picked is None or info.key_axis is not None:
        raise NotStreamable(node, "gathers frames by computed indices")
    axis = _norm(int_attr(node, "axis", 0), info.rank)
    if axis == info.axis:
        if picked.ndim == 0 and int(picked) == -1:
            return [Final(info.rank - 1)]  # the last frame so far
        raise NotStreamable(node, "picks frames by position")
    moved = info.axis if info.axis < axis else info.axis + picked.ndim - 1
    return [info.moved(moved, info.rank + picked.ndim - 1)]


def _pick(info: Length, picked: np.ndarray) -> Length | None:
    if info.flags is None:
        return Length(None)
    flags = tuple(info.flags[int(i)] for i in np.ravel(picked))
    return Length(flags) if any(flags) else None


@rule("GatherND")
def _gather_nd(node: ir.Node, an: Analysis) -> list[Info | None]:
    info, index_info = an.of(node.inputs[0]), an.of(node.inputs[1])
    if info is None and isinstance(index_info, Positions):
        return [Relative() if isinstance(index_info, Relative) else Positions()]
    raise NotStreamable(node, "gathers frames by computed indices")


@rule("Slice")
def _slice(node: ir.Node, an: Analysis) -> list[Info | None]:
    info = an.of(node.inputs[0])
    if any(an.of(v) is not None for v in node.inputs[1:]):
        if info is None and _is_table_cut(node, an):
            rank = an.rank(node.inputs[0]) or 1
            axis = _norm(static_ints(node.inputs[3])[0], rank) if len(node.inputs) > 3 else 0
            an.sites.append(Site("positions", node))
            return [Timed(axis, rank, _frame_count(an.of(node.inputs[2])) or 1, absolute=True)]
        if info is None and _is_distance_cut(node, an):
            an.distance_ranges.add(node)  # table[c-T+1 : c+T], probed when a rel_shift uses it
            an.probes.update([node.outputs[0], node.inputs[1]])
            rank = an.rank(node.inputs[0]) or 1
            return [Timed(_norm(static_ints(node.inputs[3])[0], rank), rank, distance=True)]
        if info is None or isinstance(info, Positions) or getattr(info, "absolute", False):
            return [Positions()]  # a fixed table cut to the length: absolute positions
        raise NotStreamable(node, "slices by the input length")
    starts, ends, axes, steps = _slice_params(node)
    if isinstance(info, Length):
        if info.flags is None or axes != [0]:
            return [Length(None)]
        flags = info.flags[slice(starts[0], ends[0], steps[0])]
        return [Length(flags) if any(flags) else None]
    if not isinstance(info, Timed):
        return [info]
    for start, end, axis, step in zip(starts, ends, axes, steps, strict=True):
        axis = _norm(axis, info.rank)
        if axis == info.axis and (start, step) == (-1, 1) and end >= 2**30:
            return [Final(info.rank)]  # the last frame so far
        if axis in (info.axis, info.key_axis):
            raise NotStreamable(node, f"selects frames {start}:{end} along time")
    return [info]


def _is_table_cut(node: ir.Node, an: Analysis) -> bool:
    """``table[0:T]`` along one axis (a position table cut to the frame count)."""
    inputs = list(node.inputs) + [None] * 3
    starts, axes, steps = static_ints(inputs[1]), static_ints(inputs[3]), static_ints(inputs[4])
    return (
        starts == [0]
        and _frame_count(an.of(inputs[2])) is not None
        and (inputs[3] is None or (axes is not None and len(axes) == 1))
        and (inputs[4] is None or steps == [1])
    )


def _is_distance_cut(node: ir.Node, an: Analysis) -> bool:
    """``table[a:b]`` along one constant axis, both bounds computed from the length."""
    inputs = list(node.inputs) + [None] * 3
    axes, steps = static_ints(inputs[3]), static_ints(inputs[4])
    return (
        all(isinstance(an.of(v), Length) for v in inputs[1:3])
        and axes is not None
        and len(axes) == 1
        and (inputs[4] is None or steps == [1])
    )


def _slice_params(node: ir.Node) -> tuple[list[int], list[int], list[int], list[int]]:
    if "starts" in node.attributes:  # opset < 10
        starts, ends = ints_attr(node, "starts") or [], ints_attr(node, "ends") or []
        axes = ints_attr(node, "axes")
        steps: list[int] | None = None
    else:
        values = list(node.inputs[1:]) + [None] * 4
        starts, ends = static_ints(values[0]), static_ints(values[1])
        axes, steps = static_ints(values[2]), static_ints(values[3])
        if starts is None or ends is None:
            raise NotStreamable(node, "has slice bounds that are not constant")
    axes = axes if axes is not None else list(range(len(starts)))
    return starts, ends, axes, steps if steps is not None else [1] * len(starts)


def pad_amounts(node: ir.Node, axis: int, rank: int) -> tuple[int, int]:
    """A Pad node's (before, after) padding along ``axis``."""
    pads = ints_attr(node, "pads") if "pads" in node.attributes else None
    if pads is None:
        pads = static_ints(node.inputs[1])
    if pads is None:
        raise NotStreamable(node, "has pads that are not constant")
    axes = static_ints(node.inputs[3]) if len(node.inputs) > 3 and node.inputs[3] else None
    axes = [_norm(a, rank) for a in axes] if axes is not None else list(range(rank))
    if axis not in axes:
        return 0, 0
    where = axes.index(axis)
    return pads[where], pads[where + len(axes)]


@rule("Pad")
def _pad(node: ir.Node, an: Analysis) -> list[Info | None]:
    info = an.of(node.inputs[0])
    if any(an.of(v) is not None for v in node.inputs[1:]):
        raise NotStreamable(node, "pads by a computed amount")
    if not isinstance(info, Timed):
        return [info]
    before, after = pad_amounts(node, info.axis, info.rank)
    consumers = node.outputs[0].consumers()
    if (before, after) == (0, 0) or (consumers and all(c.op_type == "Conv" for c in consumers)):
        return [info]  # a Conv takes padding along time as its own (stream-conv)
    raise NotStreamable(node, f"pads {before} frames before and {after} after, not for a Conv")


# --- normalizations, reductions, products -----------------------------------------------------


@rule("Softmax", "LogSoftmax", "Hardmax", "LpNormalization")
def _softmax(node: ir.Node, an: Analysis) -> list[Info | None]:
    info = an.of(node.inputs[0])
    if not isinstance(info, Timed):
        return [info]
    new_style = node.op_type == "LpNormalization" or opset(node, an.model) >= 13
    axis = _norm(int_attr(node, "axis", -1 if new_style else 1), info.rank)
    axes = {axis} if new_style else set(range(axis, info.rank))
    if info.axis in axes:
        raise NotStreamable(node, "normalizes over time (reads every frame)")
    if info.key_axis in axes and not info.masked:
        raise NotStreamable(node, "attends to every frame, future ones too (no causal mask)")
    return [info]


@rule("LayerNormalization", "SimplifiedLayerNormalization", "RMSNormalization")
def _layer_norm(node: ir.Node, an: Analysis) -> list[Info | None]:
    info = an.of(node.inputs[0])
    if isinstance(info, Timed):
        if info.axis >= _norm(int_attr(node, "axis", -1), info.rank) or info.key_axis is not None:
            raise NotStreamable(node, "normalizes over time (reads every frame)")
    elif any(an.of(v) is not None for v in node.inputs[1:]):
        raise NotStreamable(node, "normalizes with frame-dependent parameters")
    return [info] + [None] * (len(node.outputs) - 1)


@rule("InstanceNormalization", "GroupNormalization", "MeanVarianceNormalization")
def _instance_norm(node: ir.Node, an: Analysis) -> list[Info | None]:
    info = an.of(node.inputs[0])
    if isinstance(info, Timed):
        axes = ints_attr(node, "axes")
        if axes is None or info.axis in {_norm(a, info.rank) for a in axes}:
            raise NotStreamable(node, "normalizes over time (reads every frame)")
    return [info]


_REDUCE = (  # noqa: SIM905 - a word list
    "ReduceMean ReduceSum ReduceMax ReduceMin ReduceProd ReduceL1 ReduceL2 ReduceLogSum "
    "ReduceLogSumExp ReduceSumSquare ArgMax ArgMin"
).split()


@rule(*_REDUCE)
def _reduce(node: ir.Node, an: Analysis) -> list[Info | None]:
    info = an.of(node.inputs[0])
    if not isinstance(info, Timed):
        if isinstance(info, Length):
            raise NotStreamable(node, "reduces the input length")
        return [info]
    if node.op_type in ("ArgMax", "ArgMin"):
        axes: list[int] | None = [int_attr(node, "axis", 0)]
    else:
        axes = axes_input(node, an)
    if not axes:
        if int_attr(node, "noop_with_empty_axes", 0):
            return [info]
        axes = list(range(info.rank))
    reduced = {_norm(a, info.rank) for a in axes}
    if info.axis in reduced or info.key_axis in reduced:
        raise NotStreamable(node, "reduces over time (a global pooling reads every frame)")
    if int_attr(node, "keepdims", 1):
        return [info]
    kept = [i for i in range(info.rank) if i not in reduced]
    key = None if info.key_axis is None else kept.index(info.key_axis)
    return [info.moved(kept.index(info.axis), len(kept), key)]


@rule("GlobalAveragePool", "GlobalMaxPool", "GlobalLpPool")
def _global_pool(node: ir.Node, an: Analysis) -> list[Info | None]:
    info = an.of(node.inputs[0])
    if isinstance(info, Timed) and info.axis >= 2:
        raise NotStreamable(node, "pools over every frame (reads future frames)")
    return [info]


POSITIONS_REASON = (
    "projects positions that are neither frame positions counted from 0 nor the distances "
    "T-1..1-T of a Transformer-XL rel_shift: only Range(0, T), table[0:T], grids of them "
    "(i - j), Range(T-1, -T, -1) and table[c-T+1 : c+T] are streamed"
)


@rule("MatMul")
def _matmul(node: ir.Node, an: Analysis) -> list[Info | None]:
    a, b = node.inputs[0], node.inputs[1]
    ia, ib = an.of(a), an.of(b)
    ra, rb = an.rank(a), an.rank(b)
    if ra is None or rb is None or ra < 2 or rb < 2:
        raise NotStreamable(node, "multiplies values of unknown or vector rank")
    rank = max(ra, rb)
    if isinstance(ia, Timed) and isinstance(ib, Timed):
        return [_matmul_frames(node, an, ia, ib, rank)]
    if isinstance(ia, Timed) and ib is None:
        if ia.axis == ra - 1 or ia.key_axis is not None:
            raise NotStreamable(node, "sums over time (its contraction axis)")
        return [ia.moved(ia.axis + rank - ra, rank)]
    if isinstance(ib, Timed) and ia is None:
        if ib.axis == rb - 2 or ib.key_axis is not None:
            raise NotStreamable(node, "sums over time (its contraction axis)")
        return [ib.moved(ib.axis + rank - rb, rank)]
    if (isinstance(ia, Final) and ib is None) or (isinstance(ib, Final) and ia is None):
        return [Final(rank)]
    if isinstance(ia, Positions) or isinstance(ib, Positions):
        raise NotStreamable(node, POSITIONS_REASON)
    raise NotStreamable(node, "multiplies frames with a summary of all frames or the length")


def _matmul_frames(node: ir.Node, an: Analysis, a: Timed, b: Timed, rank: int) -> Timed:
    """Scores Q @ K^T (keys along b's last axis) or attention probabilities @ V."""
    if a.distance or b.distance:
        plain_query = not a.distance and a.key_axis is None and a.axis == a.rank - 2
        if plain_query and b.key_axis is None and b.axis == b.rank - 1:
            return _rel_shift(node, an, a, b, rank)
        raise NotStreamable(node, "multiplies distance embeddings in a way not followed")
    if a.rate != b.rate:
        raise NotStreamable(node, "multiplies frames of different strides")
    ra, rb = a.rank, b.rank
    if a.key_axis is not None and a.key_axis == ra - 1 and b.axis == rb - 2:
        if not a.masked or a.scores is None:
            raise NotStreamable(node, "attends to every frame, future ones too (no causal mask)")
        an.attention(a.scores).values.append(node)
        an.probes.add(node.inputs[1])
        return a.moved(rank - 2, rank)
    if a.key_axis is None and b.key_axis is None and a.axis == ra - 2 and b.axis == rb - 1:
        an.need(node, "attention")
        an.sites.append(AttentionSite("attention", node))
        an.probes.add(node.inputs[1])
        return Timed(rank - 2, rank, a.rate, key_axis=rank - 1, scores=node)
    if a.axis + rank - ra == b.axis + rank - rb < rank - 2:
        return a.moved(a.axis + rank - ra, rank)  # frames along a batch axis of both
    raise NotStreamable(node, "mixes frames of both operands in a way that reads ahead")


_SHIFT_OPS = {"Pad", "Reshape", "Slice", "Concat"}


def _rel_shift(node: ir.Node, an: Analysis, q: Timed, p: Timed, rank: int) -> Timed:
    """``(q + v) @ P^T``: follow the rel_shift after it (pad, reshapes, slices) to its end."""
    value, chain = node.outputs[0], []
    while True:
        users = [(c, i) for c in value.consumers() for i, v in enumerate(c.inputs) if v is value]
        data = [(c, i) for c, i in users if c.op_type not in ("Shape", "Size")]
        if len(data) != 1 or data[0][0].op_type not in _SHIFT_OPS or value.is_graph_output():
            break
        consumer, slot = data[0]
        if consumer.op_type != "Concat" and slot != 0:
            break
        chain.append((consumer, slot))
        value = consumer.outputs[0]
    if not chain:
        raise NotStreamable(node, "uses relative-distance scores without a rel_shift")
    ranges = _distance_sources(node.inputs[1], an)
    an.rel_shifts[node] = RelShift(node, node.outputs[0], value, ranges)
    an.passthrough.update(chain)
    an.probes.update([node.outputs[0], value])
    return Timed(rank - 2, rank, q.rate, key_axis=rank - 1, scores=node, distance=True)


def _distance_sources(value: ir.Value, an: Analysis) -> list[ir.Node]:
    """The ``Range(T-1, -T, -1)`` and ``table[c-T+1 : c+T]`` nodes of a distance embedding."""
    found, stack, seen = [], [value], set()
    while stack:
        node = stack.pop().producer()
        if node is None or node in seen:
            continue
        seen.add(node)
        if node in an.distance_ranges:
            found.append(node)
            continue
        stack.extend(v for v in node.inputs if getattr(an.of(v), "distance", False))
    return found


def _through_shift(node: ir.Node, an: Analysis, info: Info | None) -> Info | None:
    """A rel_shift node passes its scores on; after the last, keys are frames again."""
    shift = next((s for s in an.rel_shifts.values() if s.end is node.outputs[0]), None)
    if shift is None or not isinstance(info, Timed):
        return info
    return dataclasses.replace(info, distance=False)


@rule("Gemm")
def _gemm(node: ir.Node, an: Analysis) -> list[Info | None]:
    info = an.of(node.inputs[0])
    others = [an.of(v) for v in node.inputs[1:]]
    if any(o is not None for o in others):
        raise NotStreamable(node, "multiplies frames with frames")
    if isinstance(info, Timed) and info.axis == 0 and not int_attr(node, "transA", 0):
        return [info]
    if isinstance(info, Final):
        return [info]
    if isinstance(info, Positions):
        raise NotStreamable(node, POSITIONS_REASON)
    raise NotStreamable(node, "multiplies along time")


def refuse(reason: str) -> Rule:
    """A rule that refuses its op whenever frames reach it."""

    def refuse_node(node: ir.Node, an: Analysis) -> list[Info | None]:
        raise NotStreamable(node, reason)

    return refuse_node


for _op, _reason in {
    "CumSum": "accumulates over time (a running sum is not supported)",
    "Einsum": "is an Einsum, not analysed (decompose it first)",
    "Resize": "resamples along time",
    "Upsample": "resamples along time",
    "ConvTranspose": "upsamples along time (transposed convolutions are not supported)",
    "ReverseSequence": "reverses frames (reads future frames)",
    "TopK": "sorts values (not analysed along time)",
    "NonZero": "has a data-dependent shape",
}.items():
    rule(_op)(refuse(_reason))


# ---------------------------------------------------------------------------------------------
# The rewrite: probes, state I/O, metadata; the pass base class.
# ---------------------------------------------------------------------------------------------

_TIME_WORDS = ("time", "seq", "frame", "len", "step")
_BATCH_WORDS = ("batch", "n", "b", "bs")
_PROBES = ((2, 48), (3, 67))  # (batch, frames) of the two offline runs a rewrite may look at


def chunked_inputs(model: ir.Model, time_axis: int | None) -> dict[str, int]:
    """Inputs cut into chunks and their time axis: the first input's, and those sharing its dim."""
    inputs = feed_inputs(model)
    if not inputs or inputs[0].shape is None:
        raise UsageError("the model's first input has no known shape; cannot find its time axis")
    first = inputs[0]
    rank = len(first.shape)
    axis = _guess_time_axis(first) if time_axis is None else _norm(time_axis, rank)
    if not 0 <= axis < rank:
        raise UsageError(f"time_axis {time_axis} is out of range for input '{first.name}'")
    symbol = _symbol(first.shape[axis])
    if symbol is None:
        return {first.name: axis}
    chunked = {}
    for value in inputs:
        symbols = [_symbol(d) for d in value.shape or ()]
        if symbol in symbols:
            chunked[value.name] = symbols.index(symbol)
    return chunked


def _guess_time_axis(value: ir.Value) -> int:
    symbols = [(axis, _symbol(d)) for axis, d in enumerate(value.shape or ())]
    named = [(axis, s) for axis, s in symbols if s is not None]
    timely = [axis for axis, s in named if any(w in s.lower() for w in _TIME_WORDS)]
    if len(timely) == 1:
        return timely[0]
    others = [axis for axis, s in named if s.lower() not in _BATCH_WORDS]
    if len(others) == 1:
        return others[0]
    raise UsageError(
        f"cannot tell the time axis of input '{value.name}' (shape {value.shape}); "
        "give the time_axis option"
    )


def _symbol(dim: Any) -> str | None:
    return dim.value if isinstance(dim, ir.SymbolicDim) and dim.value else None


def batch_source(model: ir.Model, chunked: dict[str, int]) -> tuple[str, int] | None:
    """The chunked input and axis that give the batch size (a symbolic non-time dim)."""
    candidates = []
    for value in feed_inputs(model):
        if value.name not in chunked:
            continue
        for axis, dim in enumerate(value.shape or ()):
            symbol = _symbol(dim)
            if symbol is not None and axis != chunked[value.name]:
                candidates.append((symbol.lower() not in _BATCH_WORDS, value.name, axis))
    return min(candidates)[1:] if candidates else None


def feed_inputs(model: ir.Model) -> list[ir.Value]:
    initializers = model.graph.initializers
    return [v for v in model.graph.inputs if v.name not in initializers]


class Probes:
    """Two offline runs (batch 2 and 3, different lengths) exposing values a rewrite inspects.

    The model is copied when the probes are made (before any rewrite) and run on first use;
    dims known from shape inference (fixed, or the batch symbol) need no run.
    """

    def __init__(
        self,
        model: ir.Model,
        values: set[ir.Value],
        chunked: dict[str, int],
        batch: tuple[str, int] | None,
    ) -> None:
        self.batches = [b for b, _ in _PROBES] if batch else [1, 1]
        self.lengths = [t for _, t in _PROBES]
        self.batch_symbol = _batch_symbol(model, batch)
        self._chunked, self._batch = chunked, batch
        self._runs: list[dict[str, np.ndarray]] | None = None
        names = sorted(v.name for v in values if static_array(v) is None and v.name)
        self._model = _exposing(model, names) if names else None

    def _run(self) -> list[dict[str, np.ndarray]]:
        if self._runs is not None:
            return self._runs
        if self._model is None:
            raise KeyError("nothing was probed")
        try:
            runnable = RunnableModel(self._model)
            rng = np.random.default_rng(0)
            self._runs = []
            for size, frames in zip(self.batches, self.lengths, strict=True):
                feeds = _probe_feeds(self._model, self._chunked, self._batch, size, frames, rng)
                self._runs.append({**feeds, **runnable.run(feeds)})
        except VerificationError as err:
            message = f"cannot run the offline model to size states: {err}"
            raise UnsupportedModelError(message) from None
        return self._runs

    def value(self, value: ir.Value, run: int = 0) -> np.ndarray:
        const = static_array(value)
        return const if const is not None else self._run()[run][value.name]

    def dim(self, value: ir.Value, axis: int) -> int | str:
        """A dim of ``value``: a fixed size, or ``batch``/``k*batch`` when it follows the batch."""
        known = value.shape[axis] if value.shape is not None and axis < len(value.shape) else None
        if isinstance(known, int):
            return known
        if self.batch_symbol is not None and _symbol(known) == self.batch_symbol:
            return "batch"
        d1, d2 = self.value(value, 0).shape[axis], self.value(value, 1).shape[axis]
        return int(d1) if d1 == d2 else _batch_dim(value, d1, d2, self.batches)

    def state_shape(self, value: ir.Value, axis: int | None, frames: int | str) -> list[int | str]:
        """The shape of a state cut from ``value``: ``frames`` along ``axis``, batch symbolic."""
        rank = len(value.shape) if value.shape is not None else self.value(value).ndim
        return [frames if i == axis else self.dim(value, i) for i in range(rank)]


def _exposing(model: ir.Model, names: list[str]) -> ir.Model:
    """A copy of ``model`` that also outputs the values ``names``."""
    clone = model.clone()
    produced = {v.name: v for node in clone.graph for v in node.outputs}
    present = {v.name for v in clone.graph.outputs}
    clone.graph.outputs.extend(produced[n] for n in names if n in produced and n not in present)
    return clone


def _batch_symbol(model: ir.Model, batch: tuple[str, int] | None) -> str | None:
    if batch is None:
        return None
    value = next(v for v in model.graph.inputs if v.name == batch[0])
    return _symbol(value.shape[batch[1]])


def _batch_dim(value: ir.Value, d1: int, d2: int, batches: list[int]) -> str:
    b1, b2 = batches
    if d1 % b1 == 0 and d2 % b2 == 0 and d1 // b1 == d2 // b2:
        k = d1 // b1
        return "batch" if k == 1 else f"{k}*batch"
    raise UnsupportedModelError(f"cannot size the state cut from '{value.name}' ({d1} vs {d2})")


def _probe_feeds(
    model: ir.Model,
    chunked: dict[str, int],
    batch: tuple[str, int] | None,
    size: int,
    frames: int,
    rng: np.random.Generator,
) -> dict[str, np.ndarray]:
    from onnxopt.golden import random_array

    batch_symbol = None
    if batch is not None:
        value = next(v for v in model.graph.inputs if v.name == batch[0])
        batch_symbol = _symbol(value.shape[batch[1]])
    feeds = {}
    for value in feed_inputs(model):
        dims = []
        for axis, dim in enumerate(value.shape or ()):
            if isinstance(dim, int):
                dims.append(dim)
            elif chunked.get(value.name) == axis:
                dims.append(frames)
            else:
                dims.append(size if _symbol(dim) == batch_symbol else 1)
        feeds[value.name] = random_array(rng, value, tuple(dims))
    return feeds


def parse_dim(dim: int | str, batch: int) -> int:
    """A state dim from the metadata: an int, ``batch``, ``k*batch`` or ``past`` (0)."""
    if isinstance(dim, int):
        return dim
    if dim == "past":
        return 0
    if dim == "batch":
        return batch
    factor, _, rest = dim.partition("*")
    if rest != "batch":
        raise UsageError(f"bad state dim {dim!r} in '{METADATA_KEY}' metadata")
    return int(factor) * batch


class Rewrite:
    """Builds the streaming model: new nodes and constants, state inputs and outputs."""

    def __init__(self, model: ir.Model, an: Analysis, probes: Probes, options: Pass) -> None:
        self.model, self.an, self.probes, self.options = model, an, probes, options
        self.states: list[StateSpec] = []
        self.counts: dict[str, int] = {}
        self.notes: list[str] = []
        self._names: set[str] = {v.name for v in _all_values(model) if v.name}
        self.batch_symbol: str | None = None
        self.shared: dict[Any, Any] = {}  # values families build once and reuse

    def unique(self, name: str) -> str:
        base, index = name, 1
        while name in self._names:
            name, index = f"{base}_{index}", index + 1
        self._names.add(name)
        return name

    def op(
        self,
        op_type: str,
        inputs: list[ir.Value | None],
        attributes: dict[str, Any] | None = None,
        *,
        before: ir.Node | None,
        name: str,
    ) -> ir.Value:
        """Insert a node before ``before`` (or last); its output is named ``name``, made unique."""
        node = ir.node(op_type, inputs, attributes, name=self.unique(f"{name}/{op_type}"))
        node.outputs[0].name = self.unique(name)
        if before is None:
            self.model.graph.append(node)
        else:
            self.model.graph.insert_before(before, node)
        return node.outputs[0]

    def const(self, array: np.ndarray, name: str) -> ir.Value:
        value = ir.Value(name=self.unique(name), const_value=ir.tensor(np.asarray(array)))
        value.shape = ir.Shape(np.asarray(array).shape)
        value.dtype = value.const_value.dtype
        self.model.graph.register_initializer(value)
        return value

    def state(
        self,
        name: str,
        shape: list[int | str],
        dtype: ir.DataType,
        *,
        initial: Any = 0.0,
        grow_axis: int | None = None,
    ) -> ir.Value:
        """A new state input ``<name>_in``-style value; ``finish_state`` sets its output."""
        value = ir.Value(
            name=self.unique(name),
            type=ir.TensorType(dtype),
            shape=ir.Shape([self._dim(d, name) for d in shape]),
        )
        self.model.graph.inputs.append(value)
        spec = StateSpec(value.name, "", list(shape), str(dtype.numpy()), _json_ready(initial))
        spec.grow_axis = grow_axis
        self.states.append(spec)
        return value

    def finish_state(self, state_in: ir.Value, value: ir.Value, name: str) -> None:
        """Make ``value`` the graph output ``name`` that feeds ``state_in`` at the next chunk."""
        if value.is_graph_output() or value.is_graph_input() or value.const_value is not None:
            value = self.op("Identity", [value], before=None, name=name)
        else:
            self._names.discard(value.name)
            value.name = self.unique(name)
        spec = next(s for s in self.states if s.input == state_in.name)
        dims = list(state_in.shape or ())
        if spec.grow_axis is not None:
            dims[spec.grow_axis] = None  # one chunk longer than the input's
        value.dtype, value.shape = value.dtype or state_in.dtype, ir.Shape(dims)
        self.model.graph.outputs.append(value)
        spec.output = value.name

    def count(self, rule_name: str, note: str) -> None:
        self.counts[rule_name] = self.counts.get(rule_name, 0) + 1
        self.notes.append(note)

    def _dim(self, dim: int | str, name: str) -> int | str | None:
        if isinstance(dim, int):
            return dim
        if dim == "past":
            return f"{name}_past"
        return self.batch_symbol if dim == "batch" else None


def _all_values(model: ir.Model) -> Iterator[ir.Value]:
    yield from model.graph.inputs
    yield from model.graph.initializers.values()
    for node in model.graph.all_nodes():
        yield from node.outputs


FamilyRewrite = Callable[[Site, Rewrite], None]
_FAMILIES: dict[str, FamilyRewrite] = {}
_FAMILY_MODULES = ("stream_rnn", "stream_conv", "stream_attention")


def family(name: str) -> Callable[[FamilyRewrite], FamilyRewrite]:
    """Register how sites of the family ``name`` are rewritten."""

    def register(fn: FamilyRewrite) -> FamilyRewrite:
        _FAMILIES[name] = fn
        return fn

    return register


class StreamPassBase(Pass):
    """Shared options and driver of the stream passes (``families`` says which nodes they take).

    Options:
        chunk: Frames per chunk the streaming model is made and verified for; a multiple of
            the model's total stride.
        time_axis: The first input's time axis; by default the symbolic dim named like time,
            or its only symbolic dim that is not the batch.
    """

    kind = "interface"
    families: ClassVar[frozenset[str]] = frozenset()
    chunk: int = 16
    time_axis: int | None = None

    def __post_init__(self) -> None:
        if self.chunk < 1:
            raise ValueError(f"chunk must be at least 1 frame, not {self.chunk}")

    def call(self, model: ir.Model) -> PassResult:
        return make_streaming(model, self)

    def run_golden(
        self, model: ir.Model, cases: list[dict[str, np.ndarray]]
    ) -> list[dict[str, np.ndarray]]:
        return run_chunked(model, cases)


def make_streaming(model: ir.Model, options: StreamPassBase) -> PassResult:
    """Turn ``model`` into a streaming model in place, or say why it is left as it is."""
    for module in _FAMILY_MODULES:
        importlib.import_module(f"onnxopt.passes.{module}")
    if StreamSpec.read(model) is not None:
        return PassResult(
            model,
            False,
            notes=["the model streams already (it has streaming metadata); left unchanged"],
        )
    InferShapesPass()(model)
    decomposed = decompose_fused_attention(model)
    chunked = chunked_inputs(model, options.time_axis)
    try:
        an = Analysis(model, chunked, options.families).run()
    except AlreadyStreaming as signal:
        return PassResult(model, bool(decomposed), notes=[f"{signal}; left unchanged"])
    if not an.sites:
        note = "no node keeps past frames: nothing to stream"
        return PassResult(model, bool(decomposed), notes=[note])
    multiple = frame_multiple(an)
    if options.chunk % multiple:
        raise UsageError(
            f"chunk {options.chunk} is not a multiple of the model's total stride ({multiple} "
            "frames): a chunk must keep every strided layer aligned"
        )
    batch = batch_source(model, chunked)
    probes = Probes(model, an.probes, chunked, batch)
    rewrite = Rewrite(model, an, probes, options)
    rewrite.batch_symbol = probes.batch_symbol
    for site in an.sites:
        _FAMILIES[site.family](site, rewrite)
    _broadcast_expands(rewrite)
    spec = StreamSpec(
        chunk=options.chunk,
        inputs=chunked,
        outputs=_output_axes(model, an, {s.output for s in rewrite.states}),
        states=rewrite.states,
        frame_multiple=multiple,
        batch=batch,
        passes=[options.name],
    )
    _mark_time_dims(an)
    spec.write(model)
    ir.passes.common.RemoveUnusedNodesPass()(model)
    model.graph.sort()
    counts = {**rewrite.counts, **({"decompose-attention": decomposed} if decomposed else {})}
    return PassResult(model, True, counts=counts, notes=rewrite.notes)


FUSED_ATTENTION = {("", "Attention"), ("com.microsoft", "MultiHeadAttention")}
_UNDECOMPOSED = "onnxopt.streaming.undecomposed"
FUSED_FROM = "onnxopt.streaming.fused_from"  # meta of nodes from a decomposed fused attention


def decompose_fused_attention(model: ir.Model) -> int:
    """Replace fused attention (Attention-23, MultiHeadAttention) by its decomposition.

    The ``lower`` pass's decompositions spell out the scores, the mask (``is_causal`` becomes
    ``-inf`` where key > query, built from ``Range``s over the lengths) and the softmax, which
    the analysis then streams like any exported attention. Why a node could not be decomposed
    is kept in its ``meta`` for the refusal. Returns how many nodes were replaced.
    """
    from onnxopt.targets import decompositions as decomp

    replaced = 0
    opset_version = model.opset_imports.get("", 1)
    for node in list(model.graph):
        domain = "" if node.domain == "ai.onnx" else node.domain
        if (domain, node.op_type) not in FUSED_ATTENTION:
            continue
        if node.op_type == "Attention":
            _repeat_kv_heads(model, node)
        reasons = []
        for option in decomp.decompositions(domain, node.op_type):
            reason = option.reason_not_applicable(node, opset_version)
            if reason is None:
                before = set(model.graph)
                decomp.replace(model, node, option)
                decomp.inline_calls(model)
                new = [n for n in model.graph if n not in before]
                for index, inlined in enumerate(new):  # a refusal names the fused node
                    inlined.name = f"{node.name}/{index}_{inlined.op_type}"
                    inlined.meta[FUSED_FROM] = node.name
                replaced += 1
                break
            reasons.append(reason)
        else:
            node.meta[_UNDECOMPOSED] = "; ".join(dict.fromkeys(reasons)) or "no decomposition"
    if replaced:
        InferShapesPass()(model)
    return replaced


def _repeat_kv_heads(model: ir.Model, node: ir.Node) -> None:
    """4-D Attention with fewer K/V heads than Q heads (grouped): K/V heads gathered to match.

    KV head i serves Q heads ``i*g .. i*g+g-1`` (g = Q heads / KV heads).
    """
    q, k = node.inputs[0], node.inputs[1]
    if q.shape is None or k.shape is None or q.shape.rank() != 4 or k.shape.rank() != 4:
        return
    heads, kv_heads = q.shape[1], k.shape[1]
    if not isinstance(heads, int) or not isinstance(kv_heads, int) or heads == kv_heads:
        return
    if heads % kv_heads:
        return
    picks = np.arange(heads, dtype=np.int64) // (heads // kv_heads)
    index = ir.Value(name=f"{node.name}/kv_heads", const_value=ir.tensor(picks))
    model.graph.register_initializer(index)
    for slot in (1, 2):
        value = node.inputs[slot]
        gather = ir.node("Gather", [value, index], {"axis": 1}, name=f"{node.name}/repeat{slot}")
        model.graph.insert_before(node, gather)
        if value.shape is not None and value.shape.rank() == 4:
            gather.outputs[0].shape = ir.Shape([value.shape[0], heads, *value.shape[2:]])
        gather.outputs[0].dtype = value.dtype
        node.replace_input_with(slot, gather.outputs[0])


def _broadcast_expands(rw: Rewrite) -> None:
    """Masks and biases expanded to ``[.., T, T]`` broadcast along frames instead (dims of 1).

    In a stream they have C queries and K keys (cache and chunk); the offline target would
    say C by C. Expanding to 1 along those axes keeps what the mask already has.
    """
    for node, flags in rw.an.score_expands.items():
        if node.graph is None:
            continue
        framed = rw.const(np.array([f != 0 for f in flags]), f"{node.name}/framed")
        ones = rw.const(np.ones(len(flags), np.int64), f"{node.name}/ones")
        target = rw.op("Where", [framed, ones, node.inputs[1]], before=node, name="broadcast")
        node.replace_input_with(1, target)


def frame_multiple(an: Analysis) -> int:
    """The least chunk length keeping every strided layer aligned: the largest stride product."""
    rates = {info.rate for info in an.info.values() if isinstance(info, Timed)}
    return math.lcm(*rates) if rates else 1


def _output_axes(model: ir.Model, an: Analysis, states: set[str]) -> dict[str, int | None]:
    axes: dict[str, int | None] = {}
    for value in model.graph.outputs:
        if value.name in states:
            continue
        info = an.of(value)
        axes[value.name] = info.axis if isinstance(info, Timed) else None
    return axes


def _mark_time_dims(an: Analysis) -> None:
    """Chunk-sized dims become symbolic (``chunk``, ``chunk_4`` after a stride of 4)."""
    for value, info in an.info.items():
        if isinstance(info, Relative) and value.shape is not None:
            value.shape = ir.Shape([None] * len(value.shape))  # C queries by K keys now
            continue
        if not isinstance(info, Timed) or value.shape is None or len(value.shape) != info.rank:
            continue
        dims = list(value.shape)
        dims[info.axis] = "chunk" if info.rate == 1 else f"chunk_{info.rate}"
        if info.distance and info.key_axis is None:
            dims[info.axis] = None  # distances, not frames
        if info.key_axis is not None:
            dims[info.key_axis] = None
        value.shape = ir.Shape(dims)
