"""stream-attention: causal self-attention keeps past keys and values in caches."""

from __future__ import annotations

import dataclasses

import numpy as np
import onnx_ir as ir

from onnxopt.registry import register_pass
from onnxopt.stream_positions import cache_size, chunk_positions, stream_bias, stream_rel_shift
from onnxopt.streaming import (
    FUSED_FROM,
    AttentionSite,
    NotStreamable,
    Relative,
    Rewrite,
    Site,
    StreamPassBase,
    Timed,
    family,
    mask_parts,
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
            timed = (i for i, v in enumerate(node.inputs) if isinstance(rw.an.of(v), Timed))
            scores_slot = next(timed)
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


def _split_masks(masks: list[tuple[ir.Node, int]], rw: Rewrite) -> list[tuple[ir.Node, int]]:
    """A relative bias and a mask summed before the scores (as fusion leaves them): two masks."""
    split = []
    for node, slot in masks:
        parts = mask_parts(node.inputs[slot], rw.an) if node.op_type == "Add" else None
        if parts is None:
            split.append((node, slot))
        else:
            split += [(parts[0], parts[1]), (parts[0], parts[2])]
    return split


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
    name = (node.meta.get(FUSED_FROM) or node.name or f"attention_{len(rw.states)}").lstrip("/")
    site.masks = _split_masks(site.masks, rw)
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
            stream_bias(rw, node, keys, k_in, key_axis, mask_node.inputs[slot])
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
            stream_rel_shift(rw, node, keys, k_in, key_axis, shift)
    context = "unlimited (the cache grows)" if frames is None else f"{frames} frames"
    label = node.meta.get(FUSED_FROM) or node.name
    rw.count("attention-cache", f"{label}: key/value caches, left context {context}")


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
    shared = ("mask", rate, band, kind, cache_size(k_in, axis))
    if shared in rw.shared:
        return rw.shared[shared]

    def op(op_type: str, inputs: list, attrs: dict | None = None, tag: str = "") -> ir.Value:
        return rw.op(op_type, inputs, attrs, before=node, name=f"stream.mask/{tag or op_type}")

    queries, keys_from = chunk_positions(rw, node, keys, k_in, axis)
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


def _in_kind(rw: Rewrite, op, allowed: ir.Value, kind: MaskKind) -> ir.Value:
    if not kind.additive:
        return allowed if kind.keep_when else op("Not", [allowed], tag="blocked")
    zero = rw.const(np.array(0, kind.dtype), "stream.mask/open")
    fill = rw.const(np.array(kind.fill, kind.dtype), "stream.mask/fill")
    return op("Where", [allowed, zero, fill], tag="additive")


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
