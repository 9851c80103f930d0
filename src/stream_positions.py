"""Positions in a stream: the stream position state, absolute and relative positions.

The stream passes count frames from ``stream.position`` (a state), so that what the offline
graph computes from frame positions, ``Range(0, T)`` and ``table[0:T]`` (rule
``position-offset``), relative-position biases ``table[f(i - j)]`` (``relative-position``)
and Transformer-XL distance embeddings with their ``rel_shift`` (``relative-shift``), is
computed for the chunk's frames and the cached ones exactly as offline.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from onnxopt.streaming import NotStreamable, Relative, RelShift, Rewrite, Site, Timed, family


def stream_position(rw: Rewrite, before: ir.Node, chunk: ir.Value, rate: int) -> ir.Value:
    """The stream position (frames at ``rate`` before this chunk): a state shared per rate."""
    key = ("position", rate)
    if key not in rw.shared:
        name = "stream.position" if rate == 1 else f"stream.position{rate}"
        state_in = rw.state(f"{name}_in", [], ir.DataType.INT64, initial=0)
        after = rw.op("Add", [state_in, chunk], before=before, name=f"{name}_next")
        rw.finish_state(state_in, after, f"{name}_out")
        rw.shared[key] = state_in
    return rw.shared[key]


def chunk_positions(
    rw: Rewrite, node: ir.Node, keys: ir.Value, k_in: ir.Value, axis: int
) -> tuple[ir.Value, ir.Value]:
    """Positions ``pos..pos+C-1`` of the chunk's queries and ``pos-P..pos+C-1`` of its keys."""
    rate = rw.an.info[keys].rate
    shared = ("positions", rate, cache_size(k_in, axis))
    if shared in rw.shared:
        return rw.shared[shared]

    def op(op_type: str, inputs: list, attrs: dict | None = None, tag: str = "") -> ir.Value:
        return rw.op(op_type, inputs, attrs, before=node, name=f"stream.mask/{tag or op_type}")

    chunk, past = chunk_lengths(rw, node, keys, k_in, axis)
    position = stream_position(rw, node, chunk, rate)
    one = rw.const(np.array(1, np.int64), "stream.mask/one")
    end = op("Add", [position, chunk], tag="end")
    queries = op("Range", [position, end, one], tag="queries")
    keys_from = op("Range", [op("Sub", [position, past], tag="start"), end, one], tag="keys")
    rw.shared[shared] = queries, keys_from
    return queries, keys_from


def cache_size(k_in: ir.Value, axis: int) -> int | str:
    """Frames in a cache: fixed, or ``grows`` (every growing cache holds all frames so far)."""
    dim = k_in.shape[axis] if k_in.shape is not None else None
    return dim if isinstance(dim, int) else "grows"


def chunk_lengths(
    rw: Rewrite, node: ir.Node, keys: ir.Value, k_in: ir.Value, axis: int
) -> tuple[ir.Value, ir.Value]:
    """Scalars: the chunk's frames C (of ``keys``) and the cached frames P (of ``k_in``)."""
    shared = ("lengths", rw.an.info[keys].rate, cache_size(k_in, axis))
    if shared in rw.shared:
        return rw.shared[shared]

    def scalar(value: ir.Value, tag: str) -> ir.Value:
        attrs = {"start": axis, "end": axis + 1}
        length = rw.op("Shape", [value], attrs, before=node, name=f"stream.mask/{tag}_shape")
        axis0 = rw.const(np.array([0], np.int64), "stream.mask/axis0")
        return rw.op("Squeeze", [length, axis0], before=node, name=f"stream.mask/{tag}")

    rw.shared[shared] = scalar(keys, "chunk"), scalar(k_in, "past")
    return rw.shared[shared]


def stream_rel_shift(
    rw: Rewrite, node: ir.Node, keys: ir.Value, k_in: ir.Value, axis: int, shift: RelShift
) -> None:
    """Distances ``K-1..1-C`` for the chunk's C queries and K keys; the shift as a gather.

    Column r of ``(q + v) @ P^T`` is distance ``K-1-r``; query i' and key j' (of the cache
    then the chunk) are ``i' + P - j'`` apart, so their score is column ``C-1-i'+j'``.
    """
    _check_shift(rw, shift)
    chunk, past = chunk_lengths(rw, node, keys, k_in, axis)

    def op(op_type: str, inputs: list, attrs: dict | None = None, tag: str = "") -> ir.Value:
        name = f"{shift.matmul.name}/stream/{tag or op_type}"
        return rw.op(op_type, inputs, attrs, before=node, name=name)

    total = op("Add", [past, chunk], tag="keys")
    size = cache_size(k_in, axis)
    for source in shift.ranges:
        if ("distances", source) in rw.shared:  # rewritten for an earlier attention
            if rw.shared[("distances", source)] != size:
                reason = "feeds distance embeddings of attentions with other caches"
                raise NotStreamable(source, reason)
            continue
        rw.shared[("distances", source)] = size
        _stream_distances(rw, source, total, chunk, op)
    one = rw.const(np.array(1, np.int64), "stream.mask/one")
    zero = rw.const(np.array(0, np.int64), "stream.mask/zero")
    rows = op("Sub", [op("Sub", [chunk, one], tag="last"), op("Range", [zero, chunk, one])])
    cols = op("Range", [zero, total, one], tag="cols")
    index = op(
        "Add",
        [
            op("Unsqueeze", [rows, rw.const(np.array([1], np.int64), "stream.mask/axis1")]),
            op("Unsqueeze", [cols, rw.const(np.array([0], np.int64), "stream.mask/axis0")]),
        ],
        tag="index",
    )
    lead = op("Shape", [shift.start], {"end": -1}, tag="lead")
    width = op("Reshape", [total, rw.const(np.array([1], np.int64), "stream.vector_shape")])
    index = op("Expand", [index, op("Concat", [lead, width], {"axis": 0})], tag="index_all")
    rank = len(shift.start.shape) if shift.start.shape is not None else 4
    shifted = op("GatherElements", [shift.start, index], {"axis": rank - 1}, tag="shifted")
    ir.convenience.replace_all_uses_with(shift.end, shifted)
    rw.count("relative-shift", f"{shift.matmul.name}: distances K-1..1-C, shift as a gather")


def _stream_distances(rw: Rewrite, source: ir.Node, total: ir.Value, chunk: ir.Value, op) -> None:
    """Distances for C queries over K keys: ``Range(K-1, -C, -1)``, ``table[c-K+1 : c+C]``."""
    if source.op_type == "Range":
        dtype = source.outputs[0].dtype or ir.DataType.INT64
        one = rw.const(np.array(1, np.int64), "stream.mask/one")
        start = op("Cast", [op("Sub", [total, one], tag="far")], {"to": dtype}, tag="start")
        limit = op("Cast", [op("Neg", [chunk], tag="near")], {"to": dtype}, tag="limit")
    else:
        center = _center(rw, source)
        vector = rw.const(np.array([1], np.int64), "stream.vector_shape")
        first = rw.const(np.array(center + 1, np.int64), f"{source.name}/center_next")
        last = rw.const(np.array(center, np.int64), f"{source.name}/center")
        start = op("Reshape", [op("Sub", [first, total], tag="far"), vector], tag="start")
        limit = op("Reshape", [op("Add", [last, chunk], tag="near"), vector], tag="limit")
    at = 0 if source.op_type == "Range" else 1
    source.replace_input_with(at, start)
    source.replace_input_with(at + 1, limit)


def _center(rw: Rewrite, source: ir.Node) -> int:
    """The row c of distance 0 in a table cut to ``table[c-T+1 : c+T]`` (the same each run)."""
    if ("center", source) in rw.shared:
        return rw.shared[("center", source)]
    centers = set()
    for run in (0, 1):
        start = int(np.ravel(rw.probes.value(source.inputs[1], run))[0])
        length = rw.probes.value(source.outputs[0], run).shape
        axis = int(np.ravel(rw.probes.value(source.inputs[3]))[0])
        frames = (length[axis] + 1) // 2
        if length[axis] != 2 * frames - 1 or start < 0:
            raise NotStreamable(source, "cuts a table to other than 2T-1 distances")
        centers.add(start + frames - 1)
    if len(centers) != 1:
        raise NotStreamable(source, "cuts a table to distances not centred on a fixed row")
    rw.shared[("center", source)] = centers.pop()
    return rw.shared[("center", source)]


def _check_shift(rw: Rewrite, shift: RelShift) -> None:
    """The probes show distances ``T-1..1-T`` and the Transformer-XL shift on the causal part."""
    for run in (0, 1):
        x = rw.probes.value(shift.start, run)
        y = rw.probes.value(shift.end, run)
        frames = x.shape[-2]
        for source in shift.ranges:
            if ("distances", source) in rw.shared:
                continue  # checked and rewritten for an earlier attention
            if source.op_type == "Slice":
                _center(rw, source)
                continue
            got = rw.probes.value(source.outputs[0], run)
            if not np.array_equal(got, np.arange(frames - 1, -frames, -1, dtype=got.dtype)):
                raise NotStreamable(source, "gives positions other than distances T-1..1-T")
        i, j = np.tril_indices(frames)
        shifted = x.shape[-1] == 2 * frames - 1 and y.shape[-2:] == (frames, frames)
        if not shifted or not np.array_equal(y[..., i, j], x[..., i, frames - 1 - i + j]):
            reason = "is followed by a relative shift that is not Transformer-XL's rel_shift"
            raise NotStreamable(shift.matmul, reason)
    if not shift.ranges:
        raise NotStreamable(shift.matmul, "uses distance embeddings not made by a Range")


def stream_bias(
    rw: Rewrite, node: ir.Node, keys: ir.Value, k_in: ir.Value, axis: int, bias: ir.Value
) -> None:
    """Feed each position grid under ``bias`` the positions of the chunk's queries and keys.

    The grid's two operands are recomputed from those positions by copies of the nodes between
    them and their ``Range(0, T)``. Key positions before the stream (empty cache slots, masked)
    are clamped to 0, so that a table lookup stays in range.
    """
    queries, keys_from = chunk_positions(rw, node, keys, k_in, axis)
    zero = rw.const(np.array(0, np.int64), "stream.mask/zero")
    keys_from = rw.op("Max", [keys_from, zero], before=node, name="stream.mask/keys_seen")
    size = cache_size(k_in, axis)
    for grid in _grids_under(rw, bias):
        if ("grid", grid) in rw.shared:  # rewritten for an earlier attention
            if rw.shared[("grid", grid)] != size:
                reason = "feeds position biases of attentions with different caches"
                raise NotStreamable(grid, reason)
            continue
        rw.shared[("grid", grid)] = size
        query_slot, key_slot = rw.an.grids[grid]
        memo: dict[ir.Value, ir.Value] = {}
        for slot, positions in ((query_slot, queries), (key_slot, keys_from)):
            grid.replace_input_with(slot, _recompute(rw, grid, grid.inputs[slot], positions, memo))
        rw.count("relative-position", f"{grid.name}: relative positions from stream.position")


def _grids_under(rw: Rewrite, bias: ir.Value) -> list[ir.Node]:
    """The position grid nodes a relative bias is computed from."""
    grids, stack, seen = [], [bias], set()
    while stack:
        value = stack.pop()
        node = value.producer()
        if node is None or node in seen:
            continue
        seen.add(node)
        if node in rw.an.grids:
            grids.append(node)
            continue
        stack.extend(v for v in node.inputs if isinstance(rw.an.of(v), Relative))
    return grids


def _recompute(
    rw: Rewrite, grid: ir.Node, value: ir.Value, positions: ir.Value, memo: dict
) -> ir.Value:
    """``value`` (computed from ``Range(0, T)``) computed from ``positions`` instead."""
    key = (value, positions)
    if key in memo:
        return memo[key]
    node = value.producer()
    if node is None or node.op_type == "Slice":
        reason = "builds relative positions from a position table cut to the length"
        raise NotStreamable(grid, reason + " (only Range(0, T) is followed)")
    if node.op_type == "Range":
        dtype = value.dtype or ir.DataType.INT64
        result = rw.op("Cast", [positions], {"to": dtype}, before=grid, name=f"{value.name}_stream")
    else:
        inputs = [
            _recompute(rw, grid, v, positions, memo) if _is_position(rw, v) else v
            for v in node.inputs
        ]
        copy = ir.Node(
            node.domain,
            node.op_type,
            inputs,
            attributes=[ir.Attr(a.name, a.type, a.value) for a in node.attributes.values()],
            num_outputs=len(node.outputs),
            version=node.version,
            name=rw.unique(f"{node.name}/stream"),
        )
        rw.model.graph.insert_before(grid, copy)
        result = copy.outputs[list(node.outputs).index(value)]
        result.name = rw.unique(f"{value.name}_stream")
    memo[key] = result
    return result


def _is_position(rw: Rewrite, value: ir.Value | None) -> bool:
    info = rw.an.of(value)
    return isinstance(info, Timed) and info.absolute


@family("positions")
def _rewrite_positions(site: Site, rw: Rewrite) -> None:
    """``Range(0, T)`` and ``table[0:T]`` start at the stream position instead of 0."""
    node = site.node
    rate = rw.an.info[node.outputs[0]].rate
    length = node.inputs[1] if node.op_type == "Range" else node.inputs[2]
    shape = rw.const(np.array([], np.int64), "stream.scalar_shape")
    chunk = rw.op("Reshape", [length, shape], before=node, name=f"{node.name}/frames")
    if length.dtype not in (None, ir.DataType.INT64):
        chunk = rw.op("Cast", [chunk], {"to": ir.DataType.INT64}, before=node, name="frames64")
    position = stream_position(rw, node, chunk, rate)
    if node.op_type == "Range":
        dtype = node.inputs[0].dtype or ir.DataType.INT64
        start = rw.op("Cast", [position], {"to": dtype}, before=node, name=f"{node.name}/start")
        node.replace_input_with(0, start)
        node.replace_input_with(1, rw.op("Add", [start, length], before=node, name="end"))
    else:
        one = rw.const(np.array([1], np.int64), "stream.vector_shape")
        start = rw.op("Reshape", [position, one], before=node, name=f"{node.name}/start")
        node.replace_input_with(1, start)
        node.replace_input_with(2, rw.op("Add", [start, length], before=node, name="end"))
    rw.count("position-offset", f"{node.name}: positions count from stream.position")
