"""stream-attention: causal self-attention keeps past keys and values in caches."""

from __future__ import annotations

import dataclasses

import numpy as np
import onnx_ir as ir

from onnxopt.registry import register_pass
from onnxopt.streaming import (
    AttentionSite,
    NotStreamable,
    Relative,
    RelShift,
    Rewrite,
    Site,
    StreamPassBase,
    Timed,
    family,
)

_INT64_MAX = np.iinfo(np.int64).max
_BLOCKED = -1e4  # additive mask entries at or below this block a key


@dataclasses.dataclass(frozen=True)
class MaskKind:
    """How a mask is applied: added (0 or ``fill``), or a Where condition (True keeps scores).

    ``bias``: a relative-position bias (finite values computed from ``i - j``), kept and fed
    the chunk's positions; ``causal``: the mask blocks later frames (a bias may not).
    """

    additive: bool
    fill: float = 0.0
    keep_when: bool = True
    dtype: str = "float32"
    rank: int = 2
    bias: bool = False
    causal: bool = True


def band_of(allowed: np.ndarray) -> int | None:
    """The left context L of a causal mask (query i sees keys i-L+1..i), None when unlimited.

    Raises ValueError when ``allowed`` (queries x keys) is not causal and banded.
    """
    frames = allowed.shape[-1]
    if allowed.shape != (frames, frames):
        raise ValueError("it is not square (queries and keys differ)")
    rows = allowed.sum(axis=1)
    band = int(rows.max()) if frames else 0
    i, j = np.indices(allowed.shape)
    expected = (j <= i) & (i - j < band)
    if not np.array_equal(allowed, expected):
        raise ValueError("it is not causal (a query sees a later frame) or not a band")
    return None if band >= frames else band


def _mask_2d(array: np.ndarray, node: ir.Node) -> np.ndarray:
    """The last two axes (queries x keys) of a mask that is the same for every batch and head."""
    flat = array.reshape(-1, *array.shape[-2:])
    if not all(np.array_equal(flat[0], other) for other in flat[1:]):
        raise NotStreamable(node, "masks attention differently per sequence or head")
    return flat[0]


def _analyse_mask(site: AttentionSite, index: int, rw: Rewrite) -> tuple[int | None, MaskKind]:
    """The band and kind of one mask, checked on both probe runs."""
    node, slot = site.masks[index]
    if node.op_type == "Add" and isinstance(rw.an.of(node.inputs[slot]), Relative):
        bias = _analyse_bias(node, slot, rw)
        if bias is not None:
            return bias
    scores_slot = next(i for i, v in enumerate(node.inputs) if isinstance(rw.an.info.get(v), Timed))
    bands = []
    for run in (0, 1):
        array = rw.probes.value(node.inputs[slot], run)
        if node.op_type == "Add":
            mask = _mask_2d(array, node)
            blocked = mask <= _BLOCKED
            if np.any(mask[~blocked] != 0) or len(np.unique(mask[blocked])) > 1:
                raise NotStreamable(node, "adds a position-dependent bias, not just a causal mask")
            kind = MaskKind(True, float(mask[blocked].flat[0]) if blocked.any() else 0.0)
            allowed = ~blocked
        else:
            keep_when = scores_slot == 1
            fill_value = rw.probes.value(node.inputs[3 - scores_slot], run)
            if np.unique(fill_value).size != 1:
                raise NotStreamable(node, "fills masked scores with varying values")
            allowed = _mask_2d(array, node).astype(bool) == keep_when
            kind = MaskKind(False, float(np.ravel(fill_value)[0]), keep_when)
        try:
            bands.append(band_of(allowed))
        except ValueError as err:
            reason = f"masks attention with a mask that is not causal: {err}"
            raise NotStreamable(node, reason) from None
    kind = dataclasses.replace(kind, dtype=str(array.dtype), rank=array.ndim)
    if bands[0] != bands[1] and bands[0] is not None:
        raise NotStreamable(node, "masks attention with a band that changes with the length")
    return bands[1], kind


def _analyse_bias(node: ir.Node, slot: int, rw: Rewrite) -> tuple[int | None, MaskKind] | None:
    """A relative-position bias added to the scores (None when it is just a 0/-inf mask).

    Entries at or below ``_BLOCKED`` must block the same keys for every sequence and head; if
    any do, they must form a causal band (the bias then masks too).
    """
    bands: list[int | None] = []
    for run in (0, 1):
        array = rw.probes.value(node.inputs[slot], run)
        flat = array.reshape(-1, *array.shape[-2:])
        blocked = flat <= _BLOCKED
        if run == 0 and not np.any(flat[~blocked] != 0):
            return None
        if not all(np.array_equal(blocked[0], other) for other in blocked[1:]):
            raise NotStreamable(node, "masks attention differently per sequence or head")
        causal = bool(blocked.any())
        if causal:
            try:
                bands.append(band_of(~blocked[0]))
            except ValueError as err:
                reason = f"adds a relative-position bias that masks attention: {err}"
                raise NotStreamable(node, reason) from None
    fill = float(flat[blocked].flat[0]) if causal else 0.0
    kind = MaskKind(True, fill, dtype=str(array.dtype), rank=array.ndim, bias=True, causal=causal)
    if bands and bands[0] != bands[1] and bands[0] is not None:
        raise NotStreamable(node, "masks attention with a band that changes with the length")
    return (bands[1] if bands else None), kind


@family("attention")
def _rewrite(site: Site, rw: Rewrite) -> None:
    """Keys and values get caches; each mask is rebuilt from frame positions in the stream."""
    assert isinstance(site, AttentionSite)
    node = site.node
    name = (node.name or f"attention_{len(rw.states)}").lstrip("/")
    masks = [_analyse_mask(site, i, rw) for i in range(len(site.masks))]
    if not any(kind.causal for _, kind in masks):
        reason = "attends to every frame, future ones too (its only mask is a position bias)"
        raise NotStreamable(node, reason)
    bands = [band for band, kind in masks if band is not None and kind.causal]
    left_context = getattr(rw.options, "left_context", None)
    if left_context is not None:
        frames: int | None = left_context
    else:
        frames = min(bands) - 1 if bands else None  # None: the cache grows with the stream
    keys = node.inputs[1]
    key_axis = rw.an.info[keys].axis
    k_in = _cache(rw, node, 1, f"{name}.k", frames)
    for index, value_node in enumerate(site.values):
        suffix = "" if index == 0 else f"{index}"
        _cache(rw, value_node, 1, f"{name}.v{suffix}", frames)
    band = left_context + 1 if left_context is not None else (min(bands) if bands else None)
    for (mask_node, slot), (_, kind) in zip(site.masks, masks, strict=True):
        if kind.bias:
            _stream_bias(rw, node, keys, k_in, key_axis, mask_node.inputs[slot])
        if kind.bias and not kind.causal:
            continue
        mask = _stream_mask(rw, node, keys, k_in, key_axis, band, kind)
        if kind.bias:  # the bias's own mask cannot see empty cache slots: add ours
            tag = f"{mask_node.name}/masked_bias"
            mask = rw.op("Add", [mask_node.inputs[slot], mask], before=mask_node, name=tag)
        mask_node.replace_input_with(slot, mask)
    for shift in rw.an.rel_shifts.values():
        if shift.scores is None:
            raise NotStreamable(shift.matmul, "makes relative scores not added to attention")
        if shift.scores is node:
            _stream_rel_shift(rw, node, keys, k_in, key_axis, shift)
    context = "unlimited (the cache grows)" if frames is None else f"{frames} frames"
    rw.count("attention-cache", f"{node.name}: key/value caches, left context {context}")


def _cache(rw: Rewrite, node: ir.Node, slot: int, name: str, frames: int | None) -> ir.Value:
    """``Concat(cache_in, x)`` replaces the node's input; its last ``frames`` are cache_out."""
    value = node.inputs[slot]
    axis = rw.an.info[value].axis
    shape = rw.probes.state_shape(value, axis, "past" if frames is None else frames)
    grow = axis if frames is None else None
    state_in = rw.state(f"{name}_in", shape, value.dtype or ir.DataType.FLOAT, grow_axis=grow)
    joined = rw.op("Concat", [state_in, value], {"axis": axis}, before=node, name=f"{name}_all")
    node.replace_input_with(slot, joined)
    out = joined
    if frames is not None:
        bounds = [
            rw.const(np.array([v], np.int64), f"{name}_{k}")
            for k, v in (("start", -frames), ("end", _INT64_MAX), ("axis", axis))
        ]
        out = rw.op("Slice", [joined, *bounds], before=node, name=f"{name}_out")
    rw.finish_state(state_in, out, f"{name}_out")
    return state_in


def _position(rw: Rewrite, before: ir.Node, chunk: ir.Value, rate: int) -> ir.Value:
    """The stream position (frames at ``rate`` before this chunk): a state shared per rate."""
    key = ("position", rate)
    if key not in rw.shared:
        name = "stream.position" if rate == 1 else f"stream.position{rate}"
        state_in = rw.state(f"{name}_in", [], ir.DataType.INT64, initial=0)
        after = rw.op("Add", [state_in, chunk], before=before, name=f"{name}_next")
        rw.finish_state(state_in, after, f"{name}_out")
        rw.shared[key] = state_in
    return rw.shared[key]


def _stream_mask(
    rw: Rewrite,
    node: ir.Node,
    keys: ir.Value,
    k_in: ir.Value,
    axis: int,
    band: int | None,
    kind: MaskKind,
) -> ir.Value:
    """A mask for queries ``pos..pos+C-1`` over cached and new keys ``pos-P..pos+C-1``."""
    rate = rw.an.info[keys].rate
    shared = ("mask", rate, band, kind, _cache_size(k_in, axis))
    if shared in rw.shared:
        return rw.shared[shared]

    def op(op_type: str, inputs: list, attrs: dict | None = None, tag: str = "") -> ir.Value:
        return rw.op(op_type, inputs, attrs, before=node, name=f"stream.mask/{tag or op_type}")

    queries, keys_from = _stream_positions(rw, node, keys, k_in, axis)
    q = op("Unsqueeze", [queries, rw.const(np.array([1], np.int64), "stream.mask/axis1")])
    k = op("Unsqueeze", [keys_from, rw.const(np.array([0], np.int64), "stream.mask/axis0")])
    zero = rw.const(np.array(0, np.int64), "stream.mask/zero")
    allowed = op("And", [op("Not", [op("Greater", [k, q])]), op("Not", [op("Less", [k, zero])])])
    if band is not None:
        near = op("Less", [op("Sub", [q, k]), rw.const(np.array(band, np.int64), "stream.band")])
        allowed = op("And", [allowed, near])
    mask = _in_kind(rw, op, allowed, kind)
    if kind.rank > 2:
        axes = np.arange(kind.rank - 2, dtype=np.int64)
        mask = op("Unsqueeze", [mask, rw.const(axes, "stream.mask/lead_axes")], tag="mask")
    rw.shared[shared] = mask
    return mask


def _stream_positions(
    rw: Rewrite, node: ir.Node, keys: ir.Value, k_in: ir.Value, axis: int
) -> tuple[ir.Value, ir.Value]:
    """Positions ``pos..pos+C-1`` of the chunk's queries and ``pos-P..pos+C-1`` of its keys."""
    rate = rw.an.info[keys].rate
    shared = ("positions", rate, _cache_size(k_in, axis))
    if shared in rw.shared:
        return rw.shared[shared]

    def op(op_type: str, inputs: list, attrs: dict | None = None, tag: str = "") -> ir.Value:
        return rw.op(op_type, inputs, attrs, before=node, name=f"stream.mask/{tag or op_type}")

    chunk, past = _stream_lengths(rw, node, keys, k_in, axis)
    position = _position(rw, node, chunk, rate)
    one = rw.const(np.array(1, np.int64), "stream.mask/one")
    end = op("Add", [position, chunk], tag="end")
    queries = op("Range", [position, end, one], tag="queries")
    keys_from = op("Range", [op("Sub", [position, past], tag="start"), end, one], tag="keys")
    rw.shared[shared] = queries, keys_from
    return queries, keys_from


def _cache_size(k_in: ir.Value, axis: int) -> int | str:
    """Frames in a cache: fixed, or ``grows`` (every growing cache holds all frames so far)."""
    dim = k_in.shape[axis] if k_in.shape is not None else None
    return dim if isinstance(dim, int) else "grows"


def _stream_lengths(
    rw: Rewrite, node: ir.Node, keys: ir.Value, k_in: ir.Value, axis: int
) -> tuple[ir.Value, ir.Value]:
    """Scalars: the chunk's frames C (of ``keys``) and the cached frames P (of ``k_in``)."""
    shared = ("lengths", rw.an.info[keys].rate, _cache_size(k_in, axis))
    if shared in rw.shared:
        return rw.shared[shared]

    def scalar(value: ir.Value, tag: str) -> ir.Value:
        attrs = {"start": axis, "end": axis + 1}
        length = rw.op("Shape", [value], attrs, before=node, name=f"stream.mask/{tag}_shape")
        axis0 = rw.const(np.array([0], np.int64), "stream.mask/axis0")
        return rw.op("Squeeze", [length, axis0], before=node, name=f"stream.mask/{tag}")

    rw.shared[shared] = scalar(keys, "chunk"), scalar(k_in, "past")
    return rw.shared[shared]


def _stream_rel_shift(
    rw: Rewrite, node: ir.Node, keys: ir.Value, k_in: ir.Value, axis: int, shift: RelShift
) -> None:
    """Distances ``K-1..1-C`` for the chunk's C queries and K keys; the shift as a gather.

    Column r of ``(q + v) @ P^T`` is distance ``K-1-r``; query i' and key j' (of the cache
    then the chunk) are ``i' + P - j'`` apart, so their score is column ``C-1-i'+j'``.
    """
    _check_shift(rw, shift)
    chunk, past = _stream_lengths(rw, node, keys, k_in, axis)

    def op(op_type: str, inputs: list, attrs: dict | None = None, tag: str = "") -> ir.Value:
        name = f"{shift.matmul.name}/stream/{tag or op_type}"
        return rw.op(op_type, inputs, attrs, before=node, name=name)

    one = rw.const(np.array(1, np.int64), "stream.mask/one")
    total = op("Add", [past, chunk], tag="keys")
    cache = _cache_size(k_in, axis)
    for source in shift.ranges:
        if rw.shared.setdefault(("distances", source), cache) != cache:
            raise NotStreamable(source, "feeds distance embeddings of attentions with other caches")
        if ("distances-done", source) in rw.shared:
            continue  # shared by an earlier attention with the same caches
        rw.shared[("distances-done", source)] = True
        if source.op_type == "Range":
            dtype = source.outputs[0].dtype or ir.DataType.INT64
            start = op("Cast", [op("Sub", [total, one], tag="far")], {"to": dtype}, tag="start")
            limit = op("Cast", [op("Neg", [chunk], tag="near")], {"to": dtype}, tag="limit")
        else:  # table[c-K+1 : c+C]
            center = _center(rw, source)
            vector = rw.const(np.array([1], np.int64), "stream.vector_shape")
            first = rw.const(np.array(center + 1, np.int64), f"{source.name}/center_next")
            last = rw.const(np.array(center, np.int64), f"{source.name}/center")
            start = op("Reshape", [op("Sub", [first, total], tag="far"), vector], tag="start")
            limit = op("Reshape", [op("Add", [last, chunk], tag="near"), vector], tag="limit")
        at = 0 if source.op_type == "Range" else 1
        source.replace_input_with(at, start)
        source.replace_input_with(at + 1, limit)
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
            if ("distances-done", source) in rw.shared:
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


def _stream_bias(
    rw: Rewrite, node: ir.Node, keys: ir.Value, k_in: ir.Value, axis: int, bias: ir.Value
) -> None:
    """Feed each position grid under ``bias`` the positions of the chunk's queries and keys.

    The grid's two operands are recomputed from those positions by copies of the nodes between
    them and their ``Range(0, T)``. Key positions before the stream (empty cache slots, masked)
    are clamped to 0, so that a table lookup stays in range.
    """
    queries, keys_from = _stream_positions(rw, node, keys, k_in, axis)
    zero = rw.const(np.array(0, np.int64), "stream.mask/zero")
    keys_from = rw.op("Max", [keys_from, zero], before=node, name="stream.mask/keys_seen")
    for grid in _grids_under(rw, bias):
        done = rw.shared.setdefault(("grid", grid), _cache_size(k_in, axis))
        if done != _cache_size(k_in, axis):
            raise NotStreamable(grid, "feeds position biases of attentions with different caches")
        if ("grid-done", grid) in rw.shared:
            continue
        rw.shared[("grid-done", grid)] = True
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


def _in_kind(rw: Rewrite, op, allowed: ir.Value, kind: MaskKind) -> ir.Value:
    if not kind.additive:
        return allowed if kind.keep_when else op("Not", [allowed], tag="blocked")
    zero = rw.const(np.array(0, kind.dtype), "stream.mask/open")
    fill = rw.const(np.array(kind.fill, kind.dtype), "stream.mask/fill")
    return op("Where", [allowed, zero, fill], tag="additive")


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
    position = _position(rw, node, chunk, rate)
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


@register_pass
class StreamAttentionPass(StreamPassBase):
    """Make causal self-attention streaming: past keys and values come from caches.

    Rules (counted: ``attention-cache``):
      1. ``Softmax(Q @ K^T [*scale] + mask) @ V`` over time, where the mask (added, or a Where
         condition, built from constants or from the length) lets frame i see frames
         ``i-L+1..i``: K^T and V are concatenated after ``<name>.k_in``/``.v_in`` caches of
         ``L-1`` frames (``<name>.k_out``/``.v_out``), and the mask is rebuilt from a shared
         ``stream.position`` state so that empty cache slots stay masked.
      2. A fully causal mask (no band): the caches grow by each chunk (``grow_axis`` in the
         metadata), unless ``left_context`` caps them, and the attention, to that many frames.
      3. ``position-offset``: absolute positions made explicit, ``Range(0, T)`` (then, say, an
         embedding Gather) or a table cut to ``table[0:T]``, count from the stream position.
         (Every stream pass applies this rule.)
      4. ``relative-position``: a bias added to the scores computed from a grid of positions
         (``Range(0, T)`` as queries x keys, ``table[f(i - j)]``) is fed the positions of the
         chunk's queries and of the cached and new keys; a bias holding -inf also masks.
      5. ``relative-shift``: Transformer-XL scores ``rel_shift((q + v) @ P^T)``, P embedding
         the distances ``T-1..1-T`` (``Range(T-1, -T, -1)`` or ``pe[c-T+1 : c+T]``), get the
         distances ``K-1..1-C`` of the chunk's C queries over K keys; the pad/reshape/slice
         shift becomes a ``GatherElements`` (probes check both are what they seem).
      6. Attention with no mask (a position bias alone is none), or a mask letting a frame see
         later frames, reads the future and is refused by name; so are other positions.
    Fused attention (``Attention``-23, ``MultiHeadAttention``) is decomposed first (every
    stream pass does this; rule ``decompose-attention``).

    Options:
        left_context: Past frames kept in the caches (and attended to); by default the
            model's own band, or unlimited.
    """

    name = "stream-attention"
    families = frozenset({"attention"})
    left_context: int | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.left_context is not None and self.left_context < 0:
            raise ValueError(f"left_context must be 0 or more, not {self.left_context}")
