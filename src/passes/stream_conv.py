"""stream-conv: causal convolutions along time keep their left context in a cache."""

from __future__ import annotations

import dataclasses

import numpy as np
import onnx_ir as ir

from onnxopt.registry import register_pass
from onnxopt.streaming import (
    Analysis,
    Info,
    NotStreamable,
    Rewrite,
    Site,
    StreamPassBase,
    Timed,
    _slice_params,
    family,
    int_attr,
    ints_attr,
    pad_amounts,
    rule,
    static_array,
    str_attr,
)

_INT64_MAX = np.iinfo(np.int64).max


@dataclasses.dataclass
class ConvSite(Site):
    """A causal conv: ``frames`` of left context along ``axis`` come from its cache."""

    axis: int = 0
    frames: int = 0
    pad: ir.Node | None = None
    chomp: ir.Node | None = None
    initial: float = 0.0


@dataclasses.dataclass
class _Window:
    kernel: int
    dilation: int
    stride: int
    before: int
    after: int


@rule("Conv", "MaxPool", "AveragePool", "LpPool")
def _analyse(node: ir.Node, an: Analysis) -> list[Info | None]:
    """A window along time is causal when it is padded by exactly its reach before, none after."""
    x = an.of(node.inputs[0])
    if any(an.of(v) is not None for v in node.inputs[1:]):
        raise NotStreamable(node, "has weights computed from the frames")
    if not isinstance(x, Timed):
        return [x]
    if x.axis < 2 or x.key_axis is not None:
        raise NotStreamable(node, f"mixes frames: time is its axis {x.axis}, not a spatial axis")
    window = _window(node, x)
    site = ConvSite("conv", node, axis=x.axis)
    _absorb_pad(node, an, x, window, site)
    _absorb_chomp(node, an, x, window, site)
    _check_causal(node, window)
    if window.before:
        an.need(node, "conv")
        site.frames = window.before
        an.sites.append(site)
        an.probes.add(node.inputs[0])
    return [Timed(x.axis, x.rank, x.rate * window.stride)] + [None] * (len(node.outputs) - 1)


def _window(node: ir.Node, x: Timed) -> _Window:
    spatial = x.rank - 2
    index = x.axis - 2
    if node.op_type == "Conv":
        weights = static_array(node.inputs[1])
        kernels = ints_attr(node, "kernel_shape") or (
            list(weights.shape[2:]) if weights is not None else None
        )
    else:
        kernels = ints_attr(node, "kernel_shape")
    if kernels is None:
        raise NotStreamable(node, "has a kernel of unknown size")
    pads = ints_attr(node, "pads") or [0] * (2 * spatial)
    window = _Window(
        kernel=kernels[index],
        dilation=(ints_attr(node, "dilations") or [1] * spatial)[index],
        stride=(ints_attr(node, "strides") or [1] * spatial)[index],
        before=pads[index],
        after=pads[index + spatial],
    )
    auto_pad = str_attr(node, "auto_pad", "NOTSET")
    if auto_pad.startswith("SAME") and window.kernel > 1:
        raise NotStreamable(node, f"pads both sides (auto_pad={auto_pad}): reads future frames")
    if auto_pad == "VALID":
        window.before = window.after = 0
    return window


def _absorb_pad(node: ir.Node, an: Analysis, x: Timed, window: _Window, site: ConvSite) -> None:
    """A constant Pad along time in front of a Conv counts as the Conv's own padding."""
    pad = node.inputs[0].producer()
    if pad is None or pad.op_type != "Pad" or node.op_type != "Conv":
        return
    before, after = pad_amounts(pad, x.axis, x.rank)
    if (before, after) == (0, 0):
        return
    if str_attr(pad, "mode", "constant") != "constant":
        raise NotStreamable(pad, "pads time by reflection or edge copies (reads future frames)")
    fill = static_array(pad.inputs[2]) if len(pad.inputs) > 2 and pad.inputs[2] else None
    site.pad, site.initial = pad, 0.0 if fill is None else float(np.ravel(fill)[0])
    window.before += before
    window.after += after


def _absorb_chomp(node: ir.Node, an: Analysis, x: Timed, window: _Window, site: ConvSite) -> None:
    """``Conv(pads=p both sides)`` then a Slice dropping the last p frames is a causal conv."""
    consumers = node.outputs[0].consumers()
    if window.after == 0 or window.stride != 1 or len(consumers) != 1:
        return
    chomp = consumers[0]
    if chomp.op_type != "Slice" or chomp.inputs[0] is not node.outputs[0]:
        return
    try:
        starts, ends, axes, steps = _slice_params(chomp)
    except NotStreamable:
        return
    axes = [a + x.rank if a < 0 else a for a in axes]
    if axes == [x.axis] and starts == [0] and steps == [1] and ends == [-window.after]:
        window.after = 0
        site.chomp = chomp
        an.absorbed.add(chomp)


def _check_causal(node: ir.Node, window: _Window) -> None:
    reach = (window.kernel - 1) * window.dilation
    if window.after > 0:
        raise NotStreamable(
            node, f"pads {_frames(window.after)} after the input: it reads future frames"
        )
    if window.before < reach:
        raise NotStreamable(
            node,
            f"reads {_frames(reach - window.before)} ahead (left padding {window.before} < "
            f"(kernel-1)*dilation = {reach})",
        )
    if window.before > reach:
        raise NotStreamable(
            node, f"pads {_frames(window.before)} before a reach of {reach} (a delay; unsupported)"
        )
    if node.op_type == "AveragePool" and reach and not int_attr(node, "count_include_pad", 0):
        raise NotStreamable(node, "averages without counting padding (count_include_pad=0)")


def _frames(count: int) -> str:
    return f"{count} frame" if count == 1 else f"{count} frames"


@family("conv")
def _rewrite(site: Site, rw: Rewrite) -> None:
    """Concat(cache_in, x) feeds the conv unpadded along time; its last frames are cache_out."""
    assert isinstance(site, ConvSite)
    node = site.node
    name = (node.name or f"{node.op_type.lower()}_{len(rw.states)}").lstrip("/")
    x = node.inputs[0]
    shape = rw.probes.state_shape(x, site.axis, site.frames)
    initial = site.initial
    if node.op_type == "MaxPool":
        initial = float(np.finfo(np.float32).min)
    state_in = rw.state(f"{name}.cache_in", shape, x.dtype or ir.DataType.FLOAT, initial=initial)
    source = _unpadded_source(site, rw)
    joined = rw.op(
        "Concat", [state_in, source], {"axis": site.axis}, before=node, name=f"{name}.window"
    )
    node.replace_input_with(0, joined)
    _drop_time_pads(node, site.axis)
    bounds = [
        rw.const(np.array([v], np.int64), f"{name}.cache_{k}")
        for k, v in (("start", -site.frames), ("end", _INT64_MAX), ("axis", site.axis))
    ]
    cache_out = rw.op("Slice", [joined, *bounds], before=node, name=f"{name}.cache_out")
    rw.finish_state(state_in, cache_out, f"{name}.cache_out")
    if site.chomp is not None:
        _bypass(site.chomp, node.outputs[0])
    rw.count(
        f"{node.op_type.lower()}-cache",
        f"{node.name}: {site.frames}-frame cache {state_in.name}",
    )


def _unpadded_source(site: ConvSite, rw: Rewrite) -> ir.Value:
    """The conv input without the Pad's time padding (the cache stands in for it)."""
    if site.pad is None:
        return site.node.inputs[0]
    pad = site.pad
    data = pad.inputs[0]
    rank = rw.an.info[data].rank  # type: ignore[union-attr]
    pads = list(ints_attr(pad, "pads") or _ints(pad.inputs[1]))
    axes = _ints(pad.inputs[3]) if len(pad.inputs) > 3 and pad.inputs[3] else list(range(rank))
    axes = [a + rank if a < 0 else a for a in axes]
    where = axes.index(site.axis)
    pads[where] = pads[where + len(axes)] = 0
    if not any(pads):
        return data
    new_pads = rw.const(np.array(pads, np.int64), f"{pad.name}.pads_unpadded_time")
    inputs = [data, new_pads, *pad.inputs[2:]]
    attrs = {k: v for k, v in pad.attributes.items() if k != "pads"}
    if "pads" in pad.attributes:
        inputs = [data]
        attrs["pads"] = ir.AttrInt64s("pads", pads)
    return rw.op("Pad", inputs, attrs, before=site.node, name=f"{pad.name}.without_time")


def _ints(value: ir.Value | None) -> list[int]:
    array = static_array(value)
    return [] if array is None else [int(v) for v in np.ravel(array)]


def _drop_time_pads(node: ir.Node, axis: int) -> None:
    spatial = len(ints_attr(node, "kernel_shape") or static_array(node.inputs[1]).shape[2:])
    pads = ints_attr(node, "pads") or [0] * (2 * spatial)
    pads[axis - 2] = pads[axis - 2 + spatial] = 0
    node.attributes["pads"] = ir.AttrInt64s("pads", pads)
    if "auto_pad" in node.attributes:
        node.attributes["auto_pad"] = ir.AttrString("auto_pad", "NOTSET")


def _bypass(chomp: ir.Node, value: ir.Value) -> None:
    """Route the chomping Slice's users (and graph output name) to ``value``."""
    out = chomp.outputs[0]
    if out.is_graph_output():
        name = out.name
        out.name = f"{name}.chomped"
        value.name = name
    out.replace_all_uses_with(value, replace_graph_outputs=True)


@register_pass
class StreamConvPass(StreamPassBase):
    """Make causal conv models streaming: the left padding of each conv becomes a cache.

    Rules (counted: ``conv-cache``, and ``maxpool-cache``/``averagepool-cache`` for pools):
      1. A Conv (or pool) along time padded by exactly ``(kernel-1)*dilation`` frames before
         and none after (in its ``pads``, a constant Pad node feeding it, or symmetric pads
         followed by a Slice dropping the extra frames, "chomp") reads only past frames. Its
         input is concatenated after ``<name>.cache_in`` (that many frames, zeros or the Pad's
         value at first), and the last frames of that concatenation are ``<name>.cache_out``.
         Depthwise and dilated convs, Conv1d and Conv2d (time on either spatial axis) alike.
      2. Strides: a chunk must be a multiple of the product of strides up to every layer (the
         model's ``frame_multiple``), so that each chunk starts on a frame of every layer.
      3. A conv padded after the input (symmetric or "same" padding) reads future frames and
         is refused by name, as is any other node reading ahead (see ``onnxopt.streaming``).
    """

    name = "stream-conv"
    families = frozenset({"conv"})
