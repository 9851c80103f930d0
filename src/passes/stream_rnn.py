"""stream-rnn: RNN, GRU and LSTM nodes take their initial state as input and give their last."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from onnxopt.registry import register_pass
from onnxopt.streaming import (
    AlreadyStreaming,
    Analysis,
    Final,
    Info,
    NotStreamable,
    Rewrite,
    Site,
    StreamPassBase,
    Timed,
    family,
    int_attr,
    rule,
    str_attr,
)

_STATES = {"RNN": ("h",), "GRU": ("h",), "LSTM": ("h", "c")}
_STATE_SLOT = {"h": (5, 1), "c": (6, 2)}  # state -> (initial-state input, final-state output)


@rule("RNN", "GRU", "LSTM")
def _analyse(node: ir.Node, an: Analysis) -> list[Info | None]:
    """Forward recurrences over the frame axis are causal; their states become the site's I/O."""
    direction = str_attr(node, "direction", "forward")
    if direction != "forward":
        raise NotStreamable(node, f"runs {direction} over time (reads future frames)")
    layout = int_attr(node, "layout", 0)
    x = an.of(node.inputs[0])
    if not isinstance(x, Timed) or x.axis != layout or x.key_axis is not None:
        raise NotStreamable(node, "gets frames along an axis that is not its sequence axis")
    weights = node.inputs[1:5] + node.inputs[7:8]
    if any(an.of(v) is not None for v in weights):
        raise NotStreamable(node, "has weights computed from the frames")
    if len(node.inputs) > 4 and node.inputs[4] is not None:
        raise NotStreamable(node, "takes sequence lengths (padded batches are not streamed)")
    for state in _STATES[node.op_type]:
        _check_initial(node, an, _input(node, _STATE_SLOT[state][0]))
    an.need(node, "rnn")
    an.sites.append(Site("rnn", node))
    an.probes.add(node.inputs[0])
    return [Timed(layout, 4, x.rate), Final(3), Final(3)][: len(node.outputs)]


def _check_initial(node: ir.Node, an: Analysis, value: ir.Value | None) -> None:
    if value is None:
        return
    if an.of(value) is not None:
        raise NotStreamable(node, f"starts from a state computed from the frames ('{value.name}')")
    if value.is_graph_input() and value.const_value is None:
        raise AlreadyStreaming(
            f"node '{node.name}' ({node.op_type}) takes its state from input '{value.name}'"
        )
    an.probes.add(value)


def _input(node: ir.Node, index: int) -> ir.Value | None:
    return node.inputs[index] if len(node.inputs) > index else None


@family("rnn")
def _rewrite(site: Site, rw: Rewrite) -> None:
    """Initial states become ``<name>.h_in``/``.c_in``; Y_h/Y_c ``.h_out``/``.c_out``."""
    node = site.node
    name = (node.name or f"{node.op_type.lower()}_{len(rw.states)}").lstrip("/")
    x = node.inputs[0]
    layout = int_attr(node, "layout", 0)
    batch = rw.probes.dim(x, 1 - layout)
    hidden = int_attr(node, "hidden_size", 0)
    shape: list[int | str] = [1, batch, hidden] if layout == 0 else [batch, 1, hidden]
    for state in _STATES[node.op_type]:
        slot, out_index = _STATE_SLOT[state]
        initial = _initial(rw, _input(node, slot), layout)
        dtype = x.dtype or ir.DataType.FLOAT
        state_in = rw.state(f"{name}.{state}_in", shape, dtype, initial=initial)
        if len(node.inputs) <= slot:
            node.resize_inputs(slot + 1)
        node.replace_input_with(slot, state_in)
        if len(node.outputs) <= out_index:
            node.resize_outputs(out_index + 1)
        out = node.outputs[out_index]
        out.dtype, out.shape = dtype, state_in.shape
        rw.finish_state(state_in, out, f"{name}.{state}_out")
    states = ", ".join(f"{name}.{s}_in" for s in _STATES[node.op_type])
    rw.count(f"{node.op_type.lower()}-state", f"{node.name or node.op_type}: state inputs {states}")


def _initial(rw: Rewrite, value: ir.Value | None, layout: int) -> float | np.ndarray:
    """The initial state: 0 when absent or all zeros, else its value (the same for each batch)."""
    if value is None:
        return 0.0
    array = rw.probes.value(value)
    if not array.any():
        return 0.0
    batch_axis = 1 - layout
    first = np.take(array, [0], axis=batch_axis)
    if not np.array_equal(np.broadcast_to(first, array.shape), array):
        raise NotStreamable(
            value.producer() or next(iter(rw.model.graph)),
            f"starts from a state that differs between sequences ('{value.name}')",
        )
    return first


@register_pass
class StreamRnnPass(StreamPassBase):
    """Make RNN/GRU/LSTM models streaming: initial and final states become inputs and outputs.

    Rules (counted per node type: ``rnn-state``, ``gru-state``, ``lstm-state``):
      1. A forward RNN, GRU or LSTM over the time axis, with absent or constant initial states
         (zeros or a value shared by every sequence), gets graph inputs ``<name>.h_in`` (and
         ``.c_in`` for LSTM) and its last states ``<name>.h_out`` (``.c_out``) as graph
         outputs; Y_h/Y_c are added when the node did not output them. Stacked layers each get
         theirs; both layouts work.
      2. A reverse or bidirectional recurrence reads future frames and is refused by name, as
         is any other node that reads ahead (see ``onnxopt.streaming``).
      3. A recurrence whose initial state is already a graph input leaves the model unchanged.
    """

    name = "stream-rnn"
    families = frozenset({"rnn"})
