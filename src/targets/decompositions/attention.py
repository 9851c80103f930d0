"""Attention: ONNX Attention-23 and com.microsoft MultiHeadAttention, the common cases.

``Y = softmax(scale * Q @ K^T + bias) @ V`` per head, ``scale`` 1/sqrt(head_size) by default
(an attribute of 0.0 or none means the default). ``bias`` sums the additive mask (a bool mask
is ``Where(mask, 0, -inf)``) and, with ``is_causal``, ``-inf`` where key > query (top-left
aligned: no past). With a mask, rows masked entirely give 0, not NaN, as the spec says.

com.microsoft Attention projects ``input @ weights + bias`` into packed Q, K, V first. As in
ORT's CPU kernel, a 2D ``mask_index`` (key padding, > 0 kept) adds ``mask_filter_value``
(-10000 by default, so a row masked entirely averages V rather than giving 0), and
``unidirectional`` masks future keys outright (ORT uses the lowest float, here ``-inf``).

Not covered (the op is left alone): past key/value, softcap, nonpad_kv_seqlen, grouped-query
heads (fewer KV heads than Q heads), a mask shorter than the key sequence, 3D inputs with
both a mask and ``is_causal``; MultiHeadAttention with packed QKV/KV, bias, key_padding_mask,
past or unidirectional (its key/value may be 3D or 4D BNSH); com.microsoft Attention without
bias, with past, attention_bias, do_rotary, unequal qkv_hidden_sizes, or a mask_index that is
not 2D (sequence lengths, 3D or 4D masks).

com.microsoft GroupQueryAttention (as ``fuse-attention`` writes it): no past, ``causal=0``, an
``attention_bias``; keys past ``seqlens_k[b]`` are masked and K/V heads repeated. Not covered:
past state, ``do_rotary``, local windows, softcap, smooth softmax. com.microsoft
RotaryEmbedding: 4-D ``[B, N, S, D]`` input, rotate-half (not interleaved), whole head, scale 1,
positions an offset ``[1]`` or ``[B, S]``.
"""

from __future__ import annotations

from collections.abc import Callable

import onnx_ir as ir
from onnxscript import opset13 as op
from onnxscript import script

from onnxopt.targets.decompositions import register

NEG_INF = float("-inf")
_MASK, _PAST_KEY, _PAST_VALUE, _NONPAD = 3, 4, 5, 6


@script(default_opset=op)
def _scores(Q, K, scale: float):
    """scale * Q @ K^T on [batch, heads, seq, head_size]; scale 0 means 1/sqrt(head_size)."""
    given = op.CastLike(op.Constant(value_float=scale), Q)
    size = op.CastLike(op.Shape(Q), Q)[3]
    factor = op.Where(op.Equal(given, op.CastLike(0.0, Q)), op.Reciprocal(op.Sqrt(size)), given)
    return op.MatMul(Q * factor, op.Transpose(K, perm=[0, 1, 3, 2]))


@script(default_opset=op)
def _future(Q, K):
    """True where the key comes after the query (top-left aligned): [q_seq, kv_seq]."""
    one = op.Constant(value_int=1)
    rows = op.Unsqueeze(op.Range(0, op.Shape(Q)[2], one), op.Constant(value_ints=[1]))
    return op.Greater(op.Range(0, op.Shape(K)[2], one), rows)


@script(default_opset=op)
def _heads(X, num_heads: int):
    """[batch, seq, heads * size] -> [batch, heads, seq, size]."""
    heads = op.Unsqueeze(op.Constant(value_int=num_heads), op.Constant(value_ints=[0]))
    split = op.Concat(op.Constant(value_ints=[0, 0]), heads, op.Constant(value_ints=[-1]), axis=0)
    return op.Transpose(op.Reshape(X, split), perm=[0, 2, 1, 3])


@script(default_opset=op)
def _merge_heads(Y):
    """[batch, heads, seq, size] -> [batch, seq, heads * size]."""
    return op.Reshape(op.Transpose(Y, perm=[0, 2, 1, 3]), op.Constant(value_ints=[0, 0, -1]))


@script(default_opset=op)
def _packed_qkv(input, weights, bias, num_heads: int):
    """input @ weights + bias, split into Q, K, V of [batch, heads, seq, size]."""
    heads = op.Unsqueeze(op.Constant(value_int=num_heads), op.Constant(value_ints=[0]))
    split = op.Concat(
        op.Constant(value_ints=[0, 0, 3]), heads, op.Constant(value_ints=[-1]), axis=0
    )
    qkv = op.Reshape(op.MatMul(input, weights) + bias, split)  # [batch, seq, 3, heads, size]
    q = op.Transpose(op.Gather(qkv, op.Constant(value_int=0), axis=2), perm=[0, 2, 1, 3])
    k = op.Transpose(op.Gather(qkv, op.Constant(value_int=1), axis=2), perm=[0, 2, 1, 3])
    v = op.Transpose(op.Gather(qkv, op.Constant(value_int=2), axis=2), perm=[0, 2, 1, 3])
    return q, k, v


@script(default_opset=op)
def _padding(mask_index, like, mask_filter_value: float):
    """ORT's key padding: 0 where mask_index > 0, else mask_filter_value: [batch, 1, 1, kv]."""
    kept = op.Greater(mask_index, op.CastLike(0, mask_index))
    filler = op.CastLike(op.Constant(value_float=mask_filter_value), like)
    padded = op.Where(kept, op.CastLike(0.0, like), filler)
    return op.Unsqueeze(padded, op.Constant(value_ints=[1, 2]))


@script(default_opset=op)
def _attend(scores, V):
    """softmax(scores) @ V, rows masked entirely giving 0 rather than NaN."""
    probs = op.Softmax(scores, axis=-1)
    probs = op.Where(op.IsNaN(probs), op.CastLike(0.0, V), probs)
    return op.MatMul(probs, V)


def _present(node: ir.Node, index: int) -> bool:
    return len(node.inputs) > index and node.inputs[index] is not None


def _rank(value: ir.Value) -> int | None:
    return None if value.shape is None else value.shape.rank()


def _attention_applies(rank: int, mask: str, causal: bool) -> Callable[[ir.Node], str | None]:
    """Attention with ``rank``-D inputs, mask "none" / "bool" / "float", ``is_causal``."""

    def check(node: ir.Node) -> str | None:
        q, k = node.inputs[0], node.inputs[1]
        if _rank(q) != rank:
            return f"Q is not known to be {rank}D"
        if _present(node, _PAST_KEY) or _present(node, _PAST_VALUE) or _present(node, _NONPAD):
            return "past key/value or nonpad_kv_seqlen"
        if node.attributes.get_float("softcap", 0.0) != 0.0:
            return "softcap"
        if bool(node.attributes.get_int("is_causal", 0)) != causal:
            return "is_causal " + ("off" if causal else "on")
        if rank == 4:
            heads = (q.shape[1], k.shape[1]) if k.shape is not None else (None, None)
        else:
            heads = (
                node.attributes.get_int("q_num_heads", 0),
                node.attributes.get_int("kv_num_heads", 0),
            )
        if not isinstance(heads[0], int) or heads[0] != heads[1] or heads[0] <= 0:
            return "Q and KV head counts not known to be equal"
        if not _present(node, _MASK):
            return None if mask == "none" else "no attn_mask"
        attn_mask = node.inputs[_MASK]
        if attn_mask.dtype is None:
            return "attn_mask of unknown type"
        kind = "bool" if attn_mask.dtype == ir.DataType.BOOL else "float"
        if kind != mask:
            return f"attn_mask is {kind}"
        kv_length = k.shape[-2] if rank == 4 else k.shape[1]
        if attn_mask.shape is None or attn_mask.shape[-1] != kv_length:
            return "attn_mask not known to span the key sequence"
        return None

    return check


@register("", "Attention", applies=_attention_applies(4, "none", causal=False))
@script(default_opset=op)
def attention(Q, K, V, attn_mask, past_key, past_value, nonpad_kv_seqlen, scale: float = 0.0):
    """softmax(scale * Q @ K^T) @ V on [batch, heads, seq, head_size]."""
    return op.MatMul(op.Softmax(_scores(Q, K, scale=scale), axis=-1), V)


@register("", "Attention", applies=_attention_applies(4, "none", causal=True))
@script(default_opset=op)
def attention_causal(
    Q, K, V, attn_mask, past_key, past_value, nonpad_kv_seqlen, scale: float = 0.0
):
    """softmax(scale * Q @ K^T + causal) @ V, causal = -inf where key > query."""
    causal = op.Where(_future(Q, K), op.CastLike(NEG_INF, Q), op.CastLike(0.0, Q))
    return op.MatMul(op.Softmax(_scores(Q, K, scale=scale) + causal, axis=-1), V)


@register("", "Attention", applies=_attention_applies(4, "float", causal=False))
@script(default_opset=op)
def attention_float_mask(
    Q, K, V, attn_mask, past_key, past_value, nonpad_kv_seqlen, scale: float = 0.0
):
    """softmax(scale * Q @ K^T + attn_mask) @ V, masked rows 0."""
    return _attend(_scores(Q, K, scale=scale) + attn_mask, V)


@register("", "Attention", applies=_attention_applies(4, "float", causal=True))
@script(default_opset=op)
def attention_float_mask_causal(
    Q, K, V, attn_mask, past_key, past_value, nonpad_kv_seqlen, scale: float = 0.0
):
    """softmax(scale * Q @ K^T + attn_mask + causal) @ V, masked rows 0."""
    causal = op.Where(_future(Q, K), op.CastLike(NEG_INF, Q), op.CastLike(0.0, Q))
    return _attend(_scores(Q, K, scale=scale) + (attn_mask + causal), V)


@register("", "Attention", applies=_attention_applies(4, "bool", causal=False))
@script(default_opset=op)
def attention_bool_mask(
    Q, K, V, attn_mask, past_key, past_value, nonpad_kv_seqlen, scale: float = 0.0
):
    """softmax(scale * Q @ K^T + Where(attn_mask, 0, -inf)) @ V, masked rows 0."""
    bias = op.Where(attn_mask, op.CastLike(0.0, Q), op.CastLike(NEG_INF, Q))
    return _attend(_scores(Q, K, scale=scale) + bias, V)


@register("", "Attention", applies=_attention_applies(4, "bool", causal=True))
@script(default_opset=op)
def attention_bool_mask_causal(
    Q, K, V, attn_mask, past_key, past_value, nonpad_kv_seqlen, scale: float = 0.0
):
    """softmax(scale * Q @ K^T + Where(attn_mask and key <= query, 0, -inf)) @ V."""
    kept = op.And(attn_mask, op.Not(_future(Q, K)))
    bias = op.Where(kept, op.CastLike(0.0, Q), op.CastLike(NEG_INF, Q))
    return _attend(_scores(Q, K, scale=scale) + bias, V)


@register("", "Attention", applies=_attention_applies(3, "none", causal=False))
@script(default_opset=op)
def attention_3d(
    Q, K, V, attn_mask, past_key, past_value, nonpad_kv_seqlen, q_num_heads: int, scale: float = 0.0
):
    """Attention on [batch, seq, heads * head_size]: split heads, attend, merge heads."""
    q, k = _heads(Q, num_heads=q_num_heads), _heads(K, num_heads=q_num_heads)
    scores = _scores(q, k, scale=scale)
    y = op.MatMul(op.Softmax(scores, axis=-1), _heads(V, num_heads=q_num_heads))
    return _merge_heads(y)


@register("", "Attention", applies=_attention_applies(3, "none", causal=True))
@script(default_opset=op)
def attention_3d_causal(
    Q, K, V, attn_mask, past_key, past_value, nonpad_kv_seqlen, q_num_heads: int, scale: float = 0.0
):
    """Causal attention on [batch, seq, heads * head_size]."""
    q, k = _heads(Q, num_heads=q_num_heads), _heads(K, num_heads=q_num_heads)
    causal = op.Where(_future(q, k), op.CastLike(NEG_INF, Q), op.CastLike(0.0, Q))
    scores = _scores(q, k, scale=scale) + causal
    y = op.MatMul(op.Softmax(scores, axis=-1), _heads(V, num_heads=q_num_heads))
    return _merge_heads(y)


@register("", "Attention", applies=_attention_applies(3, "float", causal=False))
@script(default_opset=op)
def attention_3d_float_mask(
    Q, K, V, attn_mask, past_key, past_value, nonpad_kv_seqlen, q_num_heads: int, scale: float = 0.0
):
    """Attention on [batch, seq, heads * head_size] with an additive mask, masked rows 0."""
    q, k = _heads(Q, num_heads=q_num_heads), _heads(K, num_heads=q_num_heads)
    scores = _scores(q, k, scale=scale) + attn_mask
    return _merge_heads(_attend(scores, _heads(V, num_heads=q_num_heads)))


@register("", "Attention", applies=_attention_applies(3, "bool", causal=False))
@script(default_opset=op)
def attention_3d_bool_mask(
    Q, K, V, attn_mask, past_key, past_value, nonpad_kv_seqlen, q_num_heads: int, scale: float = 0.0
):
    """Attention on [batch, seq, heads * head_size] with a bool mask, masked rows 0."""
    q, k = _heads(Q, num_heads=q_num_heads), _heads(K, num_heads=q_num_heads)
    bias = op.Where(attn_mask, op.CastLike(0.0, Q), op.CastLike(NEG_INF, Q))
    scores = _scores(q, k, scale=scale) + bias
    return _merge_heads(_attend(scores, _heads(V, num_heads=q_num_heads)))


def _mha_applies(attention_bias: bool, kv_rank: int = 3) -> Callable[[ir.Node], str | None]:
    """MultiHeadAttention with a 3D query and separate key/value, 3D or 4D (BNSH: already
    split into heads, as fuse-attention passes them after a cache Concat or rotary), with or
    without attention_bias."""

    def check(node: ir.Node) -> str | None:
        if len(node.inputs) < 3 or _rank(node.inputs[0]) != 3:
            return "query not known to be 3D"
        if any(_rank(v) != kv_rank for v in node.inputs[1:3] if v is not None):
            return f"key, value not known to be separate {kv_rank}D tensors"
        if node.inputs[1] is None or node.inputs[2] is None:
            return "packed QKV"
        if any(_present(node, i) for i in (3, 4, 6, 7, 8, 9)):
            return "bias, key_padding_mask or past state"
        if node.attributes.get_int("unidirectional", 0):
            return "unidirectional"
        if _present(node, 5) != attention_bias:
            return "attention_bias " + ("missing" if attention_bias else "present")
        return None

    return check


@register("com.microsoft", "MultiHeadAttention", applies=_mha_applies(attention_bias=False))
@script(default_opset=op)
def multi_head_attention(
    query,
    key,
    value,
    bias,
    key_padding_mask,
    attention_bias,
    past_key,
    past_value,
    past_sequence_length,
    cache_indirection,
    num_heads: int,
    scale: float = 0.0,
):
    """softmax(scale * Q @ K^T) @ V per head on [batch, seq, heads * head_size]."""
    q, k = _heads(query, num_heads=num_heads), _heads(key, num_heads=num_heads)
    scores = _scores(q, k, scale=scale)
    return _merge_heads(op.MatMul(op.Softmax(scores, axis=-1), _heads(value, num_heads=num_heads)))


@register("com.microsoft", "MultiHeadAttention", applies=_mha_applies(attention_bias=True))
@script(default_opset=op)
def multi_head_attention_bias(
    query,
    key,
    value,
    bias,
    key_padding_mask,
    attention_bias,
    past_key,
    past_value,
    past_sequence_length,
    cache_indirection,
    num_heads: int,
    scale: float = 0.0,
):
    """softmax(scale * Q @ K^T + attention_bias) @ V per head on [batch, seq, heads * size]."""
    q, k = _heads(query, num_heads=num_heads), _heads(key, num_heads=num_heads)
    scores = _scores(q, k, scale=scale) + attention_bias
    return _merge_heads(op.MatMul(op.Softmax(scores, axis=-1), _heads(value, num_heads=num_heads)))


@register("com.microsoft", "MultiHeadAttention", applies=_mha_applies(False, kv_rank=4))
@script(default_opset=op)
def multi_head_attention_bnsh_kv(
    query,
    key,
    value,
    bias,
    key_padding_mask,
    attention_bias,
    past_key,
    past_value,
    past_sequence_length,
    cache_indirection,
    num_heads: int,
    scale: float = 0.0,
):
    """As ``multi_head_attention`` with key and value given as [batch, heads, kv_seq, size]."""
    scores = _scores(_heads(query, num_heads=num_heads), key, scale=scale)
    return _merge_heads(op.MatMul(op.Softmax(scores, axis=-1), value))


@register("com.microsoft", "MultiHeadAttention", applies=_mha_applies(True, kv_rank=4))
@script(default_opset=op)
def multi_head_attention_bnsh_kv_bias(
    query,
    key,
    value,
    bias,
    key_padding_mask,
    attention_bias,
    past_key,
    past_value,
    past_sequence_length,
    cache_indirection,
    num_heads: int,
    scale: float = 0.0,
):
    """As ``multi_head_attention_bias`` with key and value as [batch, heads, kv_seq, size]."""
    scores = _scores(_heads(query, num_heads=num_heads), key, scale=scale) + attention_bias
    return _merge_heads(op.MatMul(op.Softmax(scores, axis=-1), value))


_MS_BIAS, _MS_MASK, _MS_PAST, _MS_ATTENTION_BIAS, _MS_PAST_LENGTH = 2, 3, 4, 5, 6


def _packed_attention_applies(mask: bool, causal: bool) -> Callable[[ir.Node], str | None]:
    """com.microsoft Attention with 3D input and bias, a 2D key padding mask_index or none."""

    def check(node: ir.Node) -> str | None:
        if _rank(node.inputs[0]) != 3:
            return "input not known to be 3D"
        if not _present(node, _MS_BIAS):
            return "no bias"
        if _present(node, _MS_PAST) or _present(node, _MS_PAST_LENGTH):
            return "past state"
        if _present(node, _MS_ATTENTION_BIAS):
            return "attention_bias"
        if node.attributes.get_int("do_rotary", 0):
            return "do_rotary"
        sizes = node.attributes.get_ints("qkv_hidden_sizes", None)
        if sizes is not None and (len(sizes) != 3 or len(set(sizes)) != 1):
            return "qkv_hidden_sizes not all equal"
        if bool(node.attributes.get_int("unidirectional", 0)) != causal:
            return "unidirectional " + ("off" if causal else "on")
        if not _present(node, _MS_MASK):
            return "no mask_index" if mask else None
        mask_index = node.inputs[_MS_MASK]
        if _rank(mask_index) != 2:
            return "mask_index not known to be 2D (a key padding mask)"
        if mask_index.dtype != ir.DataType.INT32:
            return "mask_index not int32"
        return None if mask else "mask_index present"

    return check


@register("com.microsoft", "Attention", applies=_packed_attention_applies(False, causal=False))
@script(default_opset=op)
def packed_attention(
    input,
    weights,
    bias,
    mask_index,
    past,
    attention_bias,
    past_sequence_length,
    num_heads: int,
    scale: float = 0.0,
):
    """softmax(scale * Q @ K^T) @ V per head, with Q, K, V = split(input @ weights + bias)."""
    q, k, v = _packed_qkv(input, weights, bias, num_heads=num_heads)
    return _merge_heads(op.MatMul(op.Softmax(_scores(q, k, scale=scale), axis=-1), v))


@register("com.microsoft", "Attention", applies=_packed_attention_applies(True, causal=False))
@script(default_opset=op)
def packed_attention_mask(
    input,
    weights,
    bias,
    mask_index,
    past,
    attention_bias,
    past_sequence_length,
    num_heads: int,
    scale: float = 0.0,
    mask_filter_value: float = -10000.0,
):
    """Packed QKV attention, mask_filter_value added where the 2D mask_index is not > 0."""
    q, k, v = _packed_qkv(input, weights, bias, num_heads=num_heads)
    padding = _padding(mask_index, input, mask_filter_value=mask_filter_value)
    scores = _scores(q, k, scale=scale) + padding
    return _merge_heads(op.MatMul(op.Softmax(scores, axis=-1), v))


@register("com.microsoft", "Attention", applies=_packed_attention_applies(False, causal=True))
@script(default_opset=op)
def packed_attention_causal(
    input,
    weights,
    bias,
    mask_index,
    past,
    attention_bias,
    past_sequence_length,
    num_heads: int,
    scale: float = 0.0,
):
    """Packed QKV attention, -inf where key > query."""
    q, k, v = _packed_qkv(input, weights, bias, num_heads=num_heads)
    causal = op.Where(_future(q, k), op.CastLike(NEG_INF, input), op.CastLike(0.0, input))
    scores = _scores(q, k, scale=scale) + causal
    return _merge_heads(op.MatMul(op.Softmax(scores, axis=-1), v))


@register("com.microsoft", "Attention", applies=_packed_attention_applies(True, causal=True))
@script(default_opset=op)
def packed_attention_mask_causal(
    input,
    weights,
    bias,
    mask_index,
    past,
    attention_bias,
    past_sequence_length,
    num_heads: int,
    scale: float = 0.0,
    mask_filter_value: float = -10000.0,
):
    """Packed QKV attention, -inf where key > query, else mask_filter_value where masked."""
    q, k, v = _packed_qkv(input, weights, bias, num_heads=num_heads)
    padding = _padding(mask_index, input, mask_filter_value=mask_filter_value)
    bias_ = op.Where(_future(q, k), op.CastLike(NEG_INF, input), padding)  # causal wins
    scores = _scores(q, k, scale=scale) + bias_
    return _merge_heads(op.MatMul(op.Softmax(scores, axis=-1), v))


def _gqa_applies(node: ir.Node) -> str | None:
    given = [i for i, v in enumerate(node.inputs) if v is not None]
    if any(i in given for i in (3, 4, 7, 8, 9)) or 10 not in given or max(given) > 10:
        return "past state, rotary caches, position ids, no attention_bias or later inputs"
    attrs = node.attributes
    if (
        attrs.get_int("causal", 1)
        or attrs.get_int("do_rotary", 0)
        or attrs.get_int("local_window_size", -1) != -1
    ):
        return "causal, do_rotary or a local window"
    if (
        attrs.get_float("softcap", 0.0)
        or attrs.get_int("smooth_softmax", 0)
        or attrs.get_int("qk_output", 0)
    ):
        return "softcap, smooth softmax or qk output"
    return None


@script(default_opset=op)
def _repeat_kv(X, kv_num_heads: int, num_heads: int):
    """[batch, kv_heads, seq, size] -> [batch, heads, seq, size], each K/V head repeated."""
    kv = op.Constant(value_int=kv_num_heads)
    times = op.Div(op.Constant(value_int=num_heads), kv)
    shape = op.Shape(X)
    wide = op.Concat(shape[0:2], op.Unsqueeze(times, [0]), shape[2:4], axis=0)
    heads = op.Unsqueeze(op.Constant(value_int=num_heads), [0])
    return op.Reshape(
        op.Expand(op.Unsqueeze(X, [2]), wide), op.Concat(shape[0:1], heads, shape[2:4], axis=0)
    )


@register("com.microsoft", "GroupQueryAttention", applies=_gqa_applies)
@script(default_opset=op)
def group_query_attention(
    query,
    key,
    value,
    past_key,
    past_value,
    seqlens_k,
    total_sequence_length,
    cos_cache,
    sin_cache,
    position_ids,
    attention_bias,
    num_heads: int,
    kv_num_heads: int,
    scale: float = 0.0,
):
    """No cache, causal=0: keys past seqlens_k[b] masked, attention_bias added, K/V repeated."""
    q = _heads(query, num_heads=num_heads)
    present_key = _heads(key, num_heads=kv_num_heads)
    present_value = _heads(value, num_heads=kv_num_heads)
    k = _repeat_kv(present_key, kv_num_heads=kv_num_heads, num_heads=num_heads)
    v = _repeat_kv(present_value, kv_num_heads=kv_num_heads, num_heads=num_heads)
    keys = op.Range(0, op.Shape(key)[1], op.Constant(value_int=1))
    valid = op.LessOrEqual(op.Unsqueeze(keys, [0]), op.Unsqueeze(op.Cast(seqlens_k, to=7), [1]))
    padding = op.Unsqueeze(
        op.Where(valid, op.CastLike(0.0, query), op.CastLike(NEG_INF, query)), [1, 2]
    )
    scores = _scores(q, k, scale=scale) + attention_bias + padding
    return _merge_heads(_attend(scores, v)), present_key, present_value


def _rotary_applies(node: ir.Node) -> str | None:
    if node.inputs[0].shape is None or node.inputs[0].shape.rank() != 4:
        return "input not known to be 4-D"
    if any(
        node.attributes.get_int(a, 0)
        for a in ("interleaved", "rotary_embedding_dim", "is_packed_batching")
    ):
        return "interleaved, partial or packed"
    return None if node.attributes.get_float("scale", 1.0) == 1.0 else "scale"


@register("com.microsoft", "RotaryEmbedding", applies=_rotary_applies)
@script(default_opset=op)
def rotary_embedding(
    input,
    position_ids,
    cos_cache,
    sin_cache,
    interleaved: int = 0,
    num_heads: int = 0,
    rotary_embedding_dim: int = 0,
    scale: float = 1.0,
    is_packed_batching: int = 0,
):
    """x*cos + rotate_half(x)*sin on [B, N, S, D]; position_ids an offset [1] or [B, S]."""
    seq = op.Gather(op.Shape(input), 2)
    offset = op.Slice(op.Reshape(position_ids, [-1]), [0], [1])
    from_offset = op.Unsqueeze(
        offset + op.Range(op.CastLike(0, seq), seq, op.CastLike(1, seq)), [0]
    )
    positions = op.Where(
        op.Equal(op.Size(position_ids), 1), from_offset, op.Reshape(position_ids, [0, -1])
    )
    cos = op.Unsqueeze(op.Gather(cos_cache, positions), [1])
    sin = op.Unsqueeze(op.Gather(sin_cache, positions), [1])
    half = op.Slice(op.Shape(cos_cache), [1], [2])
    x1 = op.Slice(input, [0], half, [3])
    x2 = op.Slice(input, half, [9223372036854775807], [3])
    return op.Concat(x1 * cos - x2 * sin, x2 * cos + x1 * sin, axis=-1)
