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
past or unidirectional; com.microsoft Attention without bias, with past, attention_bias,
do_rotary, unequal qkv_hidden_sizes, or a mask_index that is not 2D (sequence lengths,
3D or 4D masks).
"""

from __future__ import annotations

from collections.abc import Callable

import onnx_ir as ir
from onnxscript import opset13 as op
from onnxscript import script

from onnxopt.targets.decompositions import register

NEG_INF = float("-inf")
_MASK, _PAST_KEY, _PAST_VALUE, _NONPAD = 3, 4, 5, 6


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
@script()
def attention(Q, K, V, attn_mask, past_key, past_value, nonpad_kv_seqlen, scale: float = 0.0):
    """softmax(scale * Q @ K^T) @ V on [batch, heads, seq, head_size]."""
    given = op.CastLike(op.Constant(value_float=scale), Q)
    size = op.CastLike(op.Shape(Q), Q)[3]
    factor = op.Where(op.Equal(given, op.CastLike(0.0, Q)), op.Reciprocal(op.Sqrt(size)), given)
    scores = op.MatMul(Q * factor, op.Transpose(K, perm=[0, 1, 3, 2]))
    return op.MatMul(op.Softmax(scores, axis=-1), V)


@register("", "Attention", applies=_attention_applies(4, "none", causal=True))
@script()
def attention_causal(
    Q, K, V, attn_mask, past_key, past_value, nonpad_kv_seqlen, scale: float = 0.0
):
    """softmax(scale * Q @ K^T + causal) @ V, causal = -inf where key > query."""
    given = op.CastLike(op.Constant(value_float=scale), Q)
    size = op.CastLike(op.Shape(Q), Q)[3]
    factor = op.Where(op.Equal(given, op.CastLike(0.0, Q)), op.Reciprocal(op.Sqrt(size)), given)
    scores = op.MatMul(Q * factor, op.Transpose(K, perm=[0, 1, 3, 2]))
    one = op.Constant(value_int=1)
    rows = op.Unsqueeze(op.Range(0, op.Shape(Q)[2], one), op.Constant(value_ints=[1]))
    future = op.Greater(op.Range(0, op.Shape(K)[2], one), rows)
    causal = op.Where(future, op.CastLike(NEG_INF, Q), op.CastLike(0.0, Q))
    return op.MatMul(op.Softmax(scores + causal, axis=-1), V)


@register("", "Attention", applies=_attention_applies(4, "float", causal=False))
@script()
def attention_float_mask(
    Q, K, V, attn_mask, past_key, past_value, nonpad_kv_seqlen, scale: float = 0.0
):
    """softmax(scale * Q @ K^T + attn_mask) @ V, masked rows 0."""
    given = op.CastLike(op.Constant(value_float=scale), Q)
    size = op.CastLike(op.Shape(Q), Q)[3]
    factor = op.Where(op.Equal(given, op.CastLike(0.0, Q)), op.Reciprocal(op.Sqrt(size)), given)
    scores = op.MatMul(Q * factor, op.Transpose(K, perm=[0, 1, 3, 2]))
    probs = op.Softmax(scores + attn_mask, axis=-1)
    probs = op.Where(op.IsNaN(probs), op.CastLike(0.0, Q), probs)
    return op.MatMul(probs, V)


@register("", "Attention", applies=_attention_applies(4, "float", causal=True))
@script()
def attention_float_mask_causal(
    Q, K, V, attn_mask, past_key, past_value, nonpad_kv_seqlen, scale: float = 0.0
):
    """softmax(scale * Q @ K^T + attn_mask + causal) @ V, masked rows 0."""
    given = op.CastLike(op.Constant(value_float=scale), Q)
    size = op.CastLike(op.Shape(Q), Q)[3]
    factor = op.Where(op.Equal(given, op.CastLike(0.0, Q)), op.Reciprocal(op.Sqrt(size)), given)
    scores = op.MatMul(Q * factor, op.Transpose(K, perm=[0, 1, 3, 2]))
    one = op.Constant(value_int=1)
    rows = op.Unsqueeze(op.Range(0, op.Shape(Q)[2], one), op.Constant(value_ints=[1]))
    future = op.Greater(op.Range(0, op.Shape(K)[2], one), rows)
    causal = op.Where(future, op.CastLike(NEG_INF, Q), op.CastLike(0.0, Q))
    probs = op.Softmax(scores + (attn_mask + causal), axis=-1)
    probs = op.Where(op.IsNaN(probs), op.CastLike(0.0, Q), probs)
    return op.MatMul(probs, V)


@register("", "Attention", applies=_attention_applies(4, "bool", causal=False))
@script()
def attention_bool_mask(
    Q, K, V, attn_mask, past_key, past_value, nonpad_kv_seqlen, scale: float = 0.0
):
    """softmax(scale * Q @ K^T + Where(attn_mask, 0, -inf)) @ V, masked rows 0."""
    given = op.CastLike(op.Constant(value_float=scale), Q)
    size = op.CastLike(op.Shape(Q), Q)[3]
    factor = op.Where(op.Equal(given, op.CastLike(0.0, Q)), op.Reciprocal(op.Sqrt(size)), given)
    scores = op.MatMul(Q * factor, op.Transpose(K, perm=[0, 1, 3, 2]))
    bias = op.Where(attn_mask, op.CastLike(0.0, Q), op.CastLike(NEG_INF, Q))
    probs = op.Softmax(scores + bias, axis=-1)
    probs = op.Where(op.IsNaN(probs), op.CastLike(0.0, Q), probs)
    return op.MatMul(probs, V)


@register("", "Attention", applies=_attention_applies(4, "bool", causal=True))
@script()
def attention_bool_mask_causal(
    Q, K, V, attn_mask, past_key, past_value, nonpad_kv_seqlen, scale: float = 0.0
):
    """softmax(scale * Q @ K^T + Where(attn_mask and key <= query, 0, -inf)) @ V."""
    given = op.CastLike(op.Constant(value_float=scale), Q)
    size = op.CastLike(op.Shape(Q), Q)[3]
    factor = op.Where(op.Equal(given, op.CastLike(0.0, Q)), op.Reciprocal(op.Sqrt(size)), given)
    scores = op.MatMul(Q * factor, op.Transpose(K, perm=[0, 1, 3, 2]))
    one = op.Constant(value_int=1)
    rows = op.Unsqueeze(op.Range(0, op.Shape(Q)[2], one), op.Constant(value_ints=[1]))
    past = op.Not(op.Greater(op.Range(0, op.Shape(K)[2], one), rows))
    bias = op.Where(op.And(attn_mask, past), op.CastLike(0.0, Q), op.CastLike(NEG_INF, Q))
    probs = op.Softmax(scores + bias, axis=-1)
    probs = op.Where(op.IsNaN(probs), op.CastLike(0.0, Q), probs)
    return op.MatMul(probs, V)


@register("", "Attention", applies=_attention_applies(3, "none", causal=False))
@script()
def attention_3d(
    Q, K, V, attn_mask, past_key, past_value, nonpad_kv_seqlen, q_num_heads: int, scale: float = 0.0
):
    """Attention on [batch, seq, heads * head_size]: split heads, attend, merge heads."""
    heads = op.Unsqueeze(op.Constant(value_int=q_num_heads), op.Constant(value_ints=[0]))
    split = op.Concat(op.Constant(value_ints=[0, 0]), heads, op.Constant(value_ints=[-1]), axis=0)
    q = op.Transpose(op.Reshape(Q, split), perm=[0, 2, 1, 3])
    k = op.Transpose(op.Reshape(K, split), perm=[0, 2, 3, 1])  # [batch, heads, size, kv]
    v = op.Transpose(op.Reshape(V, split), perm=[0, 2, 1, 3])
    given = op.CastLike(op.Constant(value_float=scale), Q)
    size = op.CastLike(op.Shape(q), Q)[3]
    factor = op.Where(op.Equal(given, op.CastLike(0.0, Q)), op.Reciprocal(op.Sqrt(size)), given)
    y = op.MatMul(op.Softmax(op.MatMul(q * factor, k), axis=-1), v)
    return op.Reshape(op.Transpose(y, perm=[0, 2, 1, 3]), op.Constant(value_ints=[0, 0, -1]))


@register("", "Attention", applies=_attention_applies(3, "none", causal=True))
@script()
def attention_3d_causal(
    Q, K, V, attn_mask, past_key, past_value, nonpad_kv_seqlen, q_num_heads: int, scale: float = 0.0
):
    """Causal attention on [batch, seq, heads * head_size]."""
    heads = op.Unsqueeze(op.Constant(value_int=q_num_heads), op.Constant(value_ints=[0]))
    split = op.Concat(op.Constant(value_ints=[0, 0]), heads, op.Constant(value_ints=[-1]), axis=0)
    q = op.Transpose(op.Reshape(Q, split), perm=[0, 2, 1, 3])
    k = op.Transpose(op.Reshape(K, split), perm=[0, 2, 3, 1])
    v = op.Transpose(op.Reshape(V, split), perm=[0, 2, 1, 3])
    given = op.CastLike(op.Constant(value_float=scale), Q)
    size = op.CastLike(op.Shape(q), Q)[3]
    factor = op.Where(op.Equal(given, op.CastLike(0.0, Q)), op.Reciprocal(op.Sqrt(size)), given)
    one = op.Constant(value_int=1)
    rows = op.Unsqueeze(op.Range(0, op.Shape(Q)[1], one), op.Constant(value_ints=[1]))
    future = op.Greater(op.Range(0, op.Shape(K)[1], one), rows)
    causal = op.Where(future, op.CastLike(NEG_INF, Q), op.CastLike(0.0, Q))
    y = op.MatMul(op.Softmax(op.MatMul(q * factor, k) + causal, axis=-1), v)
    return op.Reshape(op.Transpose(y, perm=[0, 2, 1, 3]), op.Constant(value_ints=[0, 0, -1]))


@register("", "Attention", applies=_attention_applies(3, "float", causal=False))
@script()
def attention_3d_float_mask(
    Q, K, V, attn_mask, past_key, past_value, nonpad_kv_seqlen, q_num_heads: int, scale: float = 0.0
):
    """Attention on [batch, seq, heads * head_size] with an additive mask, masked rows 0."""
    heads = op.Unsqueeze(op.Constant(value_int=q_num_heads), op.Constant(value_ints=[0]))
    split = op.Concat(op.Constant(value_ints=[0, 0]), heads, op.Constant(value_ints=[-1]), axis=0)
    q = op.Transpose(op.Reshape(Q, split), perm=[0, 2, 1, 3])
    k = op.Transpose(op.Reshape(K, split), perm=[0, 2, 3, 1])
    v = op.Transpose(op.Reshape(V, split), perm=[0, 2, 1, 3])
    given = op.CastLike(op.Constant(value_float=scale), Q)
    size = op.CastLike(op.Shape(q), Q)[3]
    factor = op.Where(op.Equal(given, op.CastLike(0.0, Q)), op.Reciprocal(op.Sqrt(size)), given)
    probs = op.Softmax(op.MatMul(q * factor, k) + attn_mask, axis=-1)
    probs = op.Where(op.IsNaN(probs), op.CastLike(0.0, Q), probs)
    y = op.MatMul(probs, v)
    return op.Reshape(op.Transpose(y, perm=[0, 2, 1, 3]), op.Constant(value_ints=[0, 0, -1]))


@register("", "Attention", applies=_attention_applies(3, "bool", causal=False))
@script()
def attention_3d_bool_mask(
    Q, K, V, attn_mask, past_key, past_value, nonpad_kv_seqlen, q_num_heads: int, scale: float = 0.0
):
    """Attention on [batch, seq, heads * head_size] with a bool mask, masked rows 0."""
    heads = op.Unsqueeze(op.Constant(value_int=q_num_heads), op.Constant(value_ints=[0]))
    split = op.Concat(op.Constant(value_ints=[0, 0]), heads, op.Constant(value_ints=[-1]), axis=0)
    q = op.Transpose(op.Reshape(Q, split), perm=[0, 2, 1, 3])
    k = op.Transpose(op.Reshape(K, split), perm=[0, 2, 3, 1])
    v = op.Transpose(op.Reshape(V, split), perm=[0, 2, 1, 3])
    given = op.CastLike(op.Constant(value_float=scale), Q)
    size = op.CastLike(op.Shape(q), Q)[3]
    factor = op.Where(op.Equal(given, op.CastLike(0.0, Q)), op.Reciprocal(op.Sqrt(size)), given)
    bias = op.Where(attn_mask, op.CastLike(0.0, Q), op.CastLike(NEG_INF, Q))
    probs = op.Softmax(op.MatMul(q * factor, k) + bias, axis=-1)
    probs = op.Where(op.IsNaN(probs), op.CastLike(0.0, Q), probs)
    y = op.MatMul(probs, v)
    return op.Reshape(op.Transpose(y, perm=[0, 2, 1, 3]), op.Constant(value_ints=[0, 0, -1]))


def _mha_applies(attention_bias: bool) -> Callable[[ir.Node], str | None]:
    """MultiHeadAttention with separate 3D query/key/value, with or without attention_bias."""

    def check(node: ir.Node) -> str | None:
        if len(node.inputs) < 3 or any(_rank(v) != 3 for v in node.inputs[:3] if v is not None):
            return "query, key, value not known to be separate 3D tensors"
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
@script()
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
    heads = op.Unsqueeze(op.Constant(value_int=num_heads), op.Constant(value_ints=[0]))
    split = op.Concat(op.Constant(value_ints=[0, 0]), heads, op.Constant(value_ints=[-1]), axis=0)
    q = op.Transpose(op.Reshape(query, split), perm=[0, 2, 1, 3])
    k = op.Transpose(op.Reshape(key, split), perm=[0, 2, 3, 1])
    v = op.Transpose(op.Reshape(value, split), perm=[0, 2, 1, 3])
    given = op.CastLike(op.Constant(value_float=scale), query)
    size = op.CastLike(op.Shape(q), query)[3]
    zero = op.CastLike(0.0, query)
    factor = op.Where(op.Equal(given, zero), op.Reciprocal(op.Sqrt(size)), given)
    y = op.MatMul(op.Softmax(op.MatMul(q * factor, k), axis=-1), v)
    return op.Reshape(op.Transpose(y, perm=[0, 2, 1, 3]), op.Constant(value_ints=[0, 0, -1]))


@register("com.microsoft", "MultiHeadAttention", applies=_mha_applies(attention_bias=True))
@script()
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
    heads = op.Unsqueeze(op.Constant(value_int=num_heads), op.Constant(value_ints=[0]))
    split = op.Concat(op.Constant(value_ints=[0, 0]), heads, op.Constant(value_ints=[-1]), axis=0)
    q = op.Transpose(op.Reshape(query, split), perm=[0, 2, 1, 3])
    k = op.Transpose(op.Reshape(key, split), perm=[0, 2, 3, 1])
    v = op.Transpose(op.Reshape(value, split), perm=[0, 2, 1, 3])
    given = op.CastLike(op.Constant(value_float=scale), query)
    size = op.CastLike(op.Shape(q), query)[3]
    zero = op.CastLike(0.0, query)
    factor = op.Where(op.Equal(given, zero), op.Reciprocal(op.Sqrt(size)), given)
    scores = op.MatMul(q * factor, k) + attention_bias
    y = op.MatMul(op.Softmax(scores, axis=-1), v)
    return op.Reshape(op.Transpose(y, perm=[0, 2, 1, 3]), op.Constant(value_ints=[0, 0, -1]))


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
@script()
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
    heads = op.Unsqueeze(op.Constant(value_int=num_heads), op.Constant(value_ints=[0]))
    split = op.Concat(
        op.Constant(value_ints=[0, 0, 3]), heads, op.Constant(value_ints=[-1]), axis=0
    )
    qkv = op.Reshape(op.MatMul(input, weights) + bias, split)  # [batch, seq, 3, heads, size]
    q = op.Transpose(op.Gather(qkv, op.Constant(value_int=0), axis=2), perm=[0, 2, 1, 3])
    k = op.Transpose(op.Gather(qkv, op.Constant(value_int=1), axis=2), perm=[0, 2, 3, 1])
    v = op.Transpose(op.Gather(qkv, op.Constant(value_int=2), axis=2), perm=[0, 2, 1, 3])
    given = op.CastLike(op.Constant(value_float=scale), input)
    size = op.CastLike(op.Shape(q), input)[3]
    zero = op.CastLike(0.0, input)
    factor = op.Where(op.Equal(given, zero), op.Reciprocal(op.Sqrt(size)), given)
    y = op.MatMul(op.Softmax(op.MatMul(q * factor, k), axis=-1), v)
    return op.Reshape(op.Transpose(y, perm=[0, 2, 1, 3]), op.Constant(value_ints=[0, 0, -1]))


@register("com.microsoft", "Attention", applies=_packed_attention_applies(True, causal=False))
@script()
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
    heads = op.Unsqueeze(op.Constant(value_int=num_heads), op.Constant(value_ints=[0]))
    split = op.Concat(
        op.Constant(value_ints=[0, 0, 3]), heads, op.Constant(value_ints=[-1]), axis=0
    )
    qkv = op.Reshape(op.MatMul(input, weights) + bias, split)
    q = op.Transpose(op.Gather(qkv, op.Constant(value_int=0), axis=2), perm=[0, 2, 1, 3])
    k = op.Transpose(op.Gather(qkv, op.Constant(value_int=1), axis=2), perm=[0, 2, 3, 1])
    v = op.Transpose(op.Gather(qkv, op.Constant(value_int=2), axis=2), perm=[0, 2, 1, 3])
    given = op.CastLike(op.Constant(value_float=scale), input)
    size = op.CastLike(op.Shape(q), input)[3]
    zero = op.CastLike(0.0, input)
    factor = op.Where(op.Equal(given, zero), op.Reciprocal(op.Sqrt(size)), given)
    kept = op.Greater(mask_index, op.CastLike(0, mask_index))
    filler = op.CastLike(op.Constant(value_float=mask_filter_value), input)
    padding = op.Unsqueeze(op.Where(kept, zero, filler), op.Constant(value_ints=[1, 2]))
    y = op.MatMul(op.Softmax(op.MatMul(q * factor, k) + padding, axis=-1), v)
    return op.Reshape(op.Transpose(y, perm=[0, 2, 1, 3]), op.Constant(value_ints=[0, 0, -1]))


@register("com.microsoft", "Attention", applies=_packed_attention_applies(False, causal=True))
@script()
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
    heads = op.Unsqueeze(op.Constant(value_int=num_heads), op.Constant(value_ints=[0]))
    split = op.Concat(
        op.Constant(value_ints=[0, 0, 3]), heads, op.Constant(value_ints=[-1]), axis=0
    )
    qkv = op.Reshape(op.MatMul(input, weights) + bias, split)
    q = op.Transpose(op.Gather(qkv, op.Constant(value_int=0), axis=2), perm=[0, 2, 1, 3])
    k = op.Transpose(op.Gather(qkv, op.Constant(value_int=1), axis=2), perm=[0, 2, 3, 1])
    v = op.Transpose(op.Gather(qkv, op.Constant(value_int=2), axis=2), perm=[0, 2, 1, 3])
    given = op.CastLike(op.Constant(value_float=scale), input)
    size = op.CastLike(op.Shape(q), input)[3]
    zero = op.CastLike(0.0, input)
    factor = op.Where(op.Equal(given, zero), op.Reciprocal(op.Sqrt(size)), given)
    one = op.Constant(value_int=1)
    positions = op.Range(0, op.Shape(input)[1], one)
    future = op.Greater(positions, op.Unsqueeze(positions, op.Constant(value_ints=[1])))
    causal = op.Where(future, op.CastLike(NEG_INF, input), zero)
    y = op.MatMul(op.Softmax(op.MatMul(q * factor, k) + causal, axis=-1), v)
    return op.Reshape(op.Transpose(y, perm=[0, 2, 1, 3]), op.Constant(value_ints=[0, 0, -1]))


@register("com.microsoft", "Attention", applies=_packed_attention_applies(True, causal=True))
@script()
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
    heads = op.Unsqueeze(op.Constant(value_int=num_heads), op.Constant(value_ints=[0]))
    split = op.Concat(
        op.Constant(value_ints=[0, 0, 3]), heads, op.Constant(value_ints=[-1]), axis=0
    )
    qkv = op.Reshape(op.MatMul(input, weights) + bias, split)
    q = op.Transpose(op.Gather(qkv, op.Constant(value_int=0), axis=2), perm=[0, 2, 1, 3])
    k = op.Transpose(op.Gather(qkv, op.Constant(value_int=1), axis=2), perm=[0, 2, 3, 1])
    v = op.Transpose(op.Gather(qkv, op.Constant(value_int=2), axis=2), perm=[0, 2, 1, 3])
    given = op.CastLike(op.Constant(value_float=scale), input)
    size = op.CastLike(op.Shape(q), input)[3]
    zero = op.CastLike(0.0, input)
    factor = op.Where(op.Equal(given, zero), op.Reciprocal(op.Sqrt(size)), given)
    kept = op.Greater(mask_index, op.CastLike(0, mask_index))
    filler = op.CastLike(op.Constant(value_float=mask_filter_value), input)
    padding = op.Unsqueeze(op.Where(kept, zero, filler), op.Constant(value_ints=[1, 2]))
    one = op.Constant(value_int=1)
    positions = op.Range(0, op.Shape(input)[1], one)
    future = op.Greater(positions, op.Unsqueeze(positions, op.Constant(value_ints=[1])))
    bias_ = op.Where(future, op.CastLike(NEG_INF, input), padding)  # [batch, 1, seq, seq]
    y = op.MatMul(op.Softmax(op.MatMul(q * factor, k) + bias_, axis=-1), v)
    return op.Reshape(op.Transpose(y, perm=[0, 2, 1, 3]), op.Constant(value_ints=[0, 0, -1]))
