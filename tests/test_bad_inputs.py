"""The bad-input catalogue: one entry per class of bad input across the public API.

Every entry must raise ``TypeError`` or ``ValueError`` (the built-in ones: no numba ``TypingError``,
no ``IndexError``, ``ZeroDivisionError``, ``MemoryError``, no crash) whose message names the offending
argument (a regex on the name). Where the call takes a ``KVCache``, the cache must be unchanged
after the refused call: same length, same stored keys, values (and int8 scales).

Each entry is ``(id, make, pattern)``: ``make()`` builds fresh inputs and returns the call (a
zero-argument callable), or ``(call, cache)`` when a cache is involved.
"""

import re
import types

import numpy as np
import pytest

from numba_attn import (
    KVCache,
    MultiHeadAttention,
    QuantizedTensor,
    attention_weights,
    config,
    dequantize,
    quantize,
    scaled_dot_product_attention,
    scaled_dot_product_attention_varlen,
)

B, H, L, S, E, EV = 2, 3, 5, 7, 8, 6


def _given(value, *args):
    """An argument given as a function of the good inputs (a plain function), or as it is (types, arrays)."""
    return value(*args) if isinstance(value, types.FunctionType) else value


def _rng():
    return np.random.default_rng(0)


def qkv(dtype=np.float32):
    rng = _rng()
    return (
        rng.standard_normal((B, H, L, E)).astype(dtype),
        rng.standard_normal((B, H, S, E)).astype(dtype),
        rng.standard_normal((B, H, S, EV)).astype(dtype),
    )


def sdpa(**changes):
    """A call of scaled_dot_product_attention on good inputs with some arguments replaced."""

    def make():
        q, k, v = qkv()
        args = dict(query=q, key=k, value=v)
        for name, value in changes.items():
            args[name] = _given(value, args)
        return lambda: scaled_dot_product_attention(**args)

    return make


def with_value(name, index, value):
    """Replace one entry of operand ``name`` (a copy) by ``value`` (NaN, inf)."""

    def change(args):
        x = args[name].copy()
        x[index] = value
        return x

    return change


def reshaped(name, shape):
    return lambda args: np.zeros(shape, args[name].dtype)


def varlen(**changes):
    """A call of scaled_dot_product_attention_varlen on a good packed batch (sequences of 2 and 3 tokens,
    4 query heads over 2 key/value heads) with some arguments replaced."""

    def make():
        rng = _rng()
        args = dict(
            query=rng.standard_normal((5, 4, E)).astype(np.float32),
            key=rng.standard_normal((5, 2, E)).astype(np.float32),
            value=rng.standard_normal((5, 2, EV)).astype(np.float32),
            cu_seqlens_q=np.array([0, 2, 5]),
            cu_seqlens_k=np.array([0, 2, 5]),
        )
        for name, value in changes.items():
            args[name] = _given(value, args)
        return lambda: scaled_dot_product_attention_varlen(**args)

    return make


def weights(**changes):
    def make():
        q, k, _ = qkv()
        args = dict(query=q, key=k)
        for name, value in changes.items():
            args[name] = _given(value, args)
        return lambda: attention_weights(**args)

    return make


def quantize_call(x=None, block=32):
    def make():
        xx = _rng().standard_normal((4, 96)).astype(np.float32) if x is None else x()
        return lambda: quantize(xx, block)

    return make


def hand_built(data=None, scales=None, block=32, D=96):
    """QuantizedTensor(data, scales, block) from a good quantize() result with parts replaced."""

    def make():
        good = quantize(_rng().standard_normal((4, D)).astype(np.float32), 32)
        d = good.data if data is None else data(good)
        s = good.scales if scales is None else scales(good)
        return lambda: QuantizedTensor(d, s, block)

    return make


def nonfinite_scales(value, where=(0, 0)):
    def change(good):
        s = good.scales.copy()
        s[where] = value
        return s

    return change


def kv_cache(**kwargs):
    args = dict(batch=B, num_kv_heads=H, head_dim=E, capacity=16)
    args.update(kwargs)
    return lambda: lambda: KVCache(**args)


def rotated_cache_call():
    """scaled_dot_product_attention with an unrotated query on the views of a cache that stores its int8
    keys Hadamard-rotated (the default): refused (the cache must stay as it was)."""

    def make():
        cache = filled_cache(dtype=np.int8)
        q = _rng().standard_normal((B, H, 1, E)).astype(np.float32)
        return (lambda: scaled_dot_product_attention(q, cache.keys, cache.values, is_causal="lower_right")), cache

    return make


def filled_cache(dtype=np.float32, window=None, capacity=16, tokens=3, value_dim=None, heads=H, head_dim=E, block=32):
    cache = KVCache(B, heads, head_dim, capacity, dtype=dtype, window=window, value_dim=value_dim, block=block)
    rng = _rng()
    vd = head_dim if value_dim is None else value_dim
    cache.append(rng.standard_normal((B, heads, tokens, head_dim)), rng.standard_normal((B, heads, tokens, vd)))
    return cache


def append(key=None, value=None, dtype=np.float32, T=2, **cache_kwargs):
    """cache.append on a cache holding 3 tokens, with key/value replaced (functions of the good ones)."""

    def make():
        cache = filled_cache(dtype, **cache_kwargs)
        rng = _rng()
        k = rng.standard_normal((B, H, T, cache.head_dim)).astype(np.float32)
        v = rng.standard_normal((B, H, T, cache.value_dim)).astype(np.float32)
        kk = k if key is None else key(k)
        vv = v if value is None else value(v)
        return (lambda: cache.append(kk, vv)), cache

    return make


def set_entry(value, index=(0, 0, 0, 0)):
    def change(x):
        x = x.copy()
        x[index] = value
        return x

    return change


EMBED, HEADS, KV_HEADS = 12, 4, 2


def layer(dtype=np.float32, **kwargs):
    args = dict(embed_dim=EMBED, num_heads=HEADS, num_kv_heads=KV_HEADS, seed=0, dtype=dtype)
    args.update(kwargs)
    return MultiHeadAttention(**args)


def layer_ctor(**kwargs):
    args = dict(embed_dim=EMBED, num_heads=HEADS)
    args.update(kwargs)
    return lambda: lambda: MultiHeadAttention(**args)


def load(**changes):
    def make():
        lay = layer()
        args = dict(w_q=lay.w_q.copy(), w_k=lay.w_k.copy(), w_v=lay.w_v.copy(), w_o=lay.w_o.copy())
        for name, value in changes.items():
            args[name] = _given(value, lay)
        return lambda: lay.load(**args)

    return make


def from_linear(num_heads=HEADS, **changes):
    def make():
        lay = layer()
        args = dict(
            q_proj=lay.w_q.T.copy(),
            k_proj=lay.w_k.T.copy(),
            v_proj=lay.w_v.T.copy(),
            o_proj=lay.w_o.T.copy(),
            num_heads=num_heads,
            num_kv_heads=KV_HEADS,
        )
        for name, value in changes.items():
            args[name] = _given(value, args)
        return lambda: MultiHeadAttention.from_linear_weights(**args)

    return make


def x_input(T=L, batch=B, dim=EMBED, dtype=np.float32):
    return _rng().standard_normal((batch, T, dim)).astype(dtype)


def call(cached=False, cache_kwargs=None, x=None, **kwargs):
    """layer(x, **kwargs); ``cached``: with a cache already holding 3 tokens (kwargs may be functions of it)."""

    def make():
        lay = layer()
        xx = x_input() if x is None else x()
        if not cached:
            return lambda: lay(xx, **{n: _given(v) for n, v in kwargs.items()})
        ck = dict(dtype=np.float32, capacity=16)
        ck.update(cache_kwargs or {})
        cache = filled_cache(heads=KV_HEADS, head_dim=EMBED // HEADS, **ck)
        kw = {n: _given(v, cache) for n, v in kwargs.items()}
        kw.setdefault("cache", cache)
        return (lambda: lay(xx, **kw)), cache

    return make


def nan_mask(shape, value=np.nan, dtype=np.float32):
    def make(*_):
        m = np.zeros(shape, dtype)
        m[(0,) * len(shape)] = value
        return m

    return make


NaN, INF = np.nan, np.inf

CATALOGUE = [
    # ---- scaled_dot_product_attention_varlen: packed operands and offsets ----
    ("varlen-query-4d", varlen(query=lambda a: a["query"][None]), "query"),
    ("varlen-key-int8-array", varlen(key=lambda a: a["key"].astype(np.int8)), "key"),
    ("varlen-value-quantized", varlen(value=lambda a: quantize(a["value"])), "value"),
    ("varlen-key-features", varlen(key=lambda a: a["key"][..., :-1]), "key"),
    ("varlen-value-tokens", varlen(value=lambda a: a["value"][:-1]), "value"),
    ("varlen-heads-not-multiple", varlen(key=lambda a: np.zeros((5, 3, E), np.float32)), "heads"),
    ("varlen-cu-float", varlen(cu_seqlens_q=lambda a: a["cu_seqlens_q"].astype(np.float64)), "cu_seqlens_q"),
    ("varlen-cu-start", varlen(cu_seqlens_k=np.array([1, 2, 5])), "cu_seqlens_k"),
    ("varlen-cu-decreasing", varlen(cu_seqlens_q=np.array([0, 3, 2, 5])), "cu_seqlens_q"),
    ("varlen-cu-last", varlen(cu_seqlens_k=np.array([0, 2, 4])), "cu_seqlens_k"),
    ("varlen-cu-counts", varlen(cu_seqlens_k=np.array([0, 5])), "cu_seqlens"),
    ("varlen-cu-2d", varlen(cu_seqlens_q=np.array([[0, 2, 5]])), "cu_seqlens_q"),
    ("varlen-alibi-length", varlen(alibi_slopes=np.ones(2)), "alibi_slopes"),
    ("varlen-window-no-causal", varlen(window=2), "window"),
    ("varlen-query-nan", varlen(query=with_value("query", (3, 1, 0), NaN)), "query"),
    ("varlen-value-inf", varlen(value=with_value("value", (4, 0, 0), INF)), "value"),
    # ---- scaled_dot_product_attention: operand dtypes and shapes ----
    ("sdpa-query-int32", sdpa(query=lambda a: a["query"].astype(np.int32)), "query"),
    ("sdpa-query-int8-array", sdpa(query=lambda a: a["query"].astype(np.int8)), "query"),
    ("sdpa-query-complex", sdpa(query=lambda a: a["query"].astype(np.complex64)), "query"),
    ("sdpa-query-bool", sdpa(query=lambda a: a["query"] > 0), "query"),
    ("sdpa-query-strings", sdpa(query=[["a", "b"], ["c", "d"]]), "query"),
    ("sdpa-query-ragged-list", sdpa(query=[[1.0, 2.0], [3.0]]), "query"),
    ("sdpa-query-None", sdpa(query=None), "query"),
    ("sdpa-query-object", sdpa(query=object()), "query"),
    ("sdpa-query-1d", sdpa(query=np.zeros(E, np.float32)), "query"),
    ("sdpa-query-0d", sdpa(query=np.float32(1.0)), "query"),
    ("sdpa-query-quantized", sdpa(query=lambda a: quantize(a["query"])), "query"),
    ("sdpa-query-longdouble", sdpa(query=lambda a: a["query"].astype(np.longdouble)), "query"),
    ("sdpa-key-int64", sdpa(key=lambda a: a["key"].astype(np.int64)), "key"),
    ("sdpa-key-1d", sdpa(key=np.zeros(E, np.float32)), "key"),
    ("sdpa-key-features", sdpa(key=reshaped("key", (B, H, S, E + 1))), "key"),
    ("sdpa-key-quantized-features", sdpa(key=lambda a: quantize(np.zeros((B, H, S, E + 2), np.float32))), "key"),
    ("sdpa-value-int32", sdpa(value=lambda a: a["value"].astype(np.int32)), "value"),
    ("sdpa-value-1d", sdpa(value=np.zeros(EV, np.float32)), "value"),
    ("sdpa-value-length", sdpa(value=reshaped("value", (B, H, S + 1, EV))), "value"),
    ("sdpa-value-quantized-length", sdpa(value=lambda a: quantize(np.zeros((B, H, S - 1, EV), np.float32))), "value"),
    (
        "sdpa-E-zero",
        sdpa(query=np.zeros((L, 0), np.float32), key=np.zeros((S, 0), np.float32), value=np.zeros((S, EV), np.float32)),
        "query",
    ),
    # ---- NaN/inf in every operand ----
    ("sdpa-query-nan", sdpa(query=with_value("query", (0, 0, 0, 0), NaN)), "query"),
    ("sdpa-query-inf", sdpa(query=with_value("query", (1, 2, 4, 7), INF)), "query"),
    (
        "sdpa-query-float16-inf",
        sdpa(query=lambda a: with_value("query", (0, 1, 2, 3), INF)(a).astype(np.float16)),
        "query",
    ),
    ("sdpa-key-nan", sdpa(key=with_value("key", (1, 1, 3, 2), NaN)), "key"),
    ("sdpa-key-neg-inf", sdpa(key=with_value("key", (0, 0, 6, 0), -INF)), "key"),
    ("sdpa-key-float64-nan", sdpa(key=lambda a: with_value("key", (0, 0, 0, 0), NaN)(a).astype(np.float64)), "key"),
    ("sdpa-value-nan", sdpa(value=with_value("value", (0, 2, 1, 5), NaN)), "value"),
    ("sdpa-value-inf", sdpa(value=with_value("value", (1, 0, 0, 0), INF)), "value"),
    (
        "sdpa-value-nan-under-masked-key",
        sdpa(value=with_value("value", (0, 0, S - 1, 0), NaN), attn_mask=np.arange(S) < S - 1),
        "value",
    ),
    (
        "sdpa-overflow-float32",
        sdpa(query=lambda a: a["query"] * np.float32(1e30), key=lambda a: a["key"] * np.float32(1e30)),
        "overflow|scale",
    ),
    # ---- batch dims ----
    (
        "sdpa-batch-no-broadcast",
        sdpa(key=reshaped("key", (3, H, S, E)), value=reshaped("value", (3, H, S, EV))),
        "batch dims|query",
    ),
    (
        "sdpa-heads-differ-no-gqa",
        sdpa(key=reshaped("key", (B, 1 + H, S, E)), value=reshaped("value", (B, 1 + H, S, EV))),
        "key|enable_gqa",
    ),
    ("sdpa-value-batch-no-broadcast", sdpa(value=reshaped("value", (5, H, S, EV))), "value"),
    (
        "sdpa-gqa-not-multiple",
        sdpa(key=reshaped("key", (B, 2, S, E)), value=reshaped("value", (B, 2, S, EV)), enable_gqa=True),
        "enable_gqa",
    ),
    (
        "sdpa-gqa-kv-heads-differ",
        sdpa(key=reshaped("key", (B, 1, S, E)), value=reshaped("value", (B, 3, S, EV)), enable_gqa=True),
        "enable_gqa",
    ),
    (
        "sdpa-gqa-no-heads-dim",
        sdpa(
            query=reshaped("query", (L, E)),
            key=reshaped("key", (S, E)),
            value=reshaped("value", (S, EV)),
            enable_gqa=True,
        ),
        "enable_gqa",
    ),
    (
        "sdpa-gqa-zero-kv-heads",
        sdpa(key=reshaped("key", (B, 0, S, E)), value=reshaped("value", (B, 0, S, EV)), enable_gqa=True),
        "enable_gqa",
    ),
    # ---- attn_mask ----
    ("sdpa-mask-int", sdpa(attn_mask=np.ones((L, S), np.int32)), "attn_mask"),
    ("sdpa-mask-uint8", sdpa(attn_mask=np.ones((L, S), np.uint8)), "attn_mask"),
    ("sdpa-mask-complex", sdpa(attn_mask=np.ones((L, S), np.complex64)), "attn_mask"),
    ("sdpa-mask-strings", sdpa(attn_mask=np.full((L, S), "x")), "attn_mask"),
    ("sdpa-mask-object", sdpa(attn_mask=object()), "attn_mask"),
    ("sdpa-mask-wrong-S", sdpa(attn_mask=np.ones((L, S + 1), bool)), "attn_mask"),
    ("sdpa-mask-wrong-L", sdpa(attn_mask=np.ones((L + 2, S), bool)), "attn_mask"),
    ("sdpa-mask-batch", sdpa(attn_mask=np.ones((5, 1, L, S), bool)), "attn_mask"),
    ("sdpa-mask-too-many-dims", sdpa(attn_mask=np.ones((2, B, H, L, S), bool)), "attn_mask"),
    ("sdpa-mask-nan", sdpa(attn_mask=nan_mask((L, S))), "attn_mask"),
    ("sdpa-mask-pos-inf", sdpa(attn_mask=nan_mask((B, H, L, S), INF)), "attn_mask"),
    ("sdpa-mask-float16-nan", sdpa(attn_mask=nan_mask((1, S), NaN, np.float16)), "attn_mask"),
    ("sdpa-mask-float64-inf", sdpa(attn_mask=nan_mask((L, 1), INF, np.float64)), "attn_mask"),
    # ---- dropout_p, is_causal ----
    ("sdpa-dropout", sdpa(dropout_p=0.1), "dropout_p"),
    ("sdpa-dropout-string", sdpa(dropout_p="0"), "dropout_p"),
    ("sdpa-dropout-None", sdpa(dropout_p=None), "dropout_p"),
    ("sdpa-causal-sideways", sdpa(is_causal="sideways"), "is_causal"),
    ("sdpa-causal-float", sdpa(is_causal=1.5), "is_causal"),
    ("sdpa-causal-string-True", sdpa(is_causal="True"), "is_causal"),
    ("sdpa-causal-int", sdpa(is_causal=2), "is_causal"),
    ("sdpa-causal-list", sdpa(is_causal=["lower_right"]), "is_causal"),
    ("sdpa-causal-array", sdpa(is_causal=np.array([True, False])), "is_causal"),
    ("sdpa-causal-case", sdpa(is_causal="Lower_Right"), "is_causal"),
    # ---- scale ----
    ("sdpa-scale-zero", sdpa(scale=0.0), "scale"),
    ("sdpa-scale-negative", sdpa(scale=-1.0), "scale"),
    ("sdpa-scale-nan", sdpa(scale=NaN), "scale"),
    ("sdpa-scale-inf", sdpa(scale=INF), "scale"),
    ("sdpa-scale-string", sdpa(scale="0.5"), "scale"),
    ("sdpa-scale-bool", sdpa(scale=True), "scale"),
    ("sdpa-scale-array", sdpa(scale=np.array([0.5, 0.5])), "scale"),
    ("sdpa-scale-complex", sdpa(scale=1j), "scale"),
    # ---- window ----
    ("sdpa-window-zero", sdpa(window=0, is_causal=True), "window"),
    ("sdpa-window-negative", sdpa(window=-3, is_causal=True), "window"),
    ("sdpa-window-float", sdpa(window=2.5, is_causal=True), "window"),
    ("sdpa-window-bool", sdpa(window=True, is_causal=True), "window"),
    ("sdpa-window-string", sdpa(window="4", is_causal=True), "window"),
    ("sdpa-window-not-causal", sdpa(window=4), "window"),
    # ---- softcap ----
    ("sdpa-softcap-zero", sdpa(softcap=0.0), "softcap"),
    ("sdpa-softcap-negative", sdpa(softcap=-5.0), "softcap"),
    ("sdpa-softcap-nan", sdpa(softcap=NaN), "softcap"),
    ("sdpa-softcap-inf", sdpa(softcap=INF), "softcap"),
    ("sdpa-softcap-string", sdpa(softcap="30"), "softcap"),
    ("sdpa-softcap-bool", sdpa(softcap=True), "softcap"),
    # ---- alibi_slopes ----
    ("sdpa-alibi-length", sdpa(alibi_slopes=np.ones(H + 1)), "alibi_slopes"),
    ("sdpa-alibi-2d", sdpa(alibi_slopes=np.ones((1, H))), "alibi_slopes"),
    ("sdpa-alibi-scalar", sdpa(alibi_slopes=0.5), "alibi_slopes"),
    ("sdpa-alibi-nan", sdpa(alibi_slopes=np.array([0.5, NaN, 0.1])), "alibi_slopes"),
    ("sdpa-alibi-inf", sdpa(alibi_slopes=np.array([0.5, 0.2, INF])), "alibi_slopes"),
    ("sdpa-alibi-strings", sdpa(alibi_slopes=np.array(["a", "b", "c"])), "alibi_slopes"),
    ("sdpa-alibi-complex", sdpa(alibi_slopes=np.ones(H, np.complex128)), "alibi_slopes"),
    ("sdpa-alibi-object", sdpa(alibi_slopes=object()), "alibi_slopes"),
    (
        "sdpa-alibi-no-heads-dim",
        sdpa(
            query=reshaped("query", (L, E)),
            key=reshaped("key", (S, E)),
            value=reshaped("value", (S, EV)),
            alibi_slopes=np.ones(1),
        ),
        "alibi_slopes",
    ),
    # ---- out_dtype ----
    ("sdpa-out-dtype-int", sdpa(out_dtype=np.int32), "out_dtype"),
    ("sdpa-out-dtype-bool", sdpa(out_dtype=bool), "out_dtype"),
    ("sdpa-out-dtype-nonsense", sdpa(out_dtype="banana"), "out_dtype"),
    (
        "sdpa-out-dtype-float16-overflow",
        sdpa(value=lambda a: a["value"] * np.float32(1e5), out_dtype=np.float16),
        "out_dtype",
    ),
    # ---- attention_weights ----
    ("weights-query-int", weights(query=lambda a: a["query"].astype(np.int16)), "query"),
    ("weights-query-1d", weights(query=np.zeros(E, np.float32)), "query"),
    ("weights-key-1d", weights(key=np.zeros(E, np.float32)), "key"),
    ("weights-key-strings", weights(key=np.full((S, E), "k")), "key"),
    ("weights-query-nan", weights(query=with_value("query", (0, 0, 0, 0), NaN)), "query"),
    ("weights-key-inf", weights(key=with_value("key", (0, 0, 0, 0), INF)), "key"),
    ("weights-batch-no-broadcast", weights(key=reshaped("key", (4, H, S, E))), "batch dims|key"),
    ("weights-mask-nan", weights(attn_mask=nan_mask((L, S))), "attn_mask"),
    ("weights-mask-shape", weights(attn_mask=np.ones((L, S + 3), bool)), "attn_mask"),
    ("weights-causal-bad", weights(is_causal="diagonal"), "is_causal"),
    ("weights-scale-bad", weights(scale=-2.0), "scale"),
    ("weights-gqa-not-multiple", weights(key=reshaped("key", (B, 2, S, E)), enable_gqa=True), "enable_gqa"),
    # the (L, S) result over the guard (the identity "value" is taken in column blocks, so a small L
    # against many keys is answered, not refused: tests/test_api.py)
    (
        "weights-too-large",
        weights(query=np.zeros((300, 8), np.float32), key=np.zeros((4096, 8), np.float32)),
        "attention_weights|materialise",
    ),
    # ---- quantize / dequantize ----
    ("quantize-int", quantize_call(x=lambda: np.ones((4, 32), np.int32)), "x"),
    ("quantize-bool", quantize_call(x=lambda: np.ones((4, 32), bool)), "x"),
    ("quantize-0d", quantize_call(x=lambda: np.float32(1.0)), "x"),
    ("quantize-nan", quantize_call(x=lambda: np.full((2, 32), NaN, np.float32)), "x"),
    ("quantize-inf", quantize_call(x=lambda: np.full((2, 32), -INF, np.float16)), "x"),
    ("quantize-beyond-float32", quantize_call(x=lambda: np.full((2, 32), 1e39)), "x"),
    ("quantize-block-not-pow2", quantize_call(block=48), "block"),
    ("quantize-block-zero", quantize_call(block=0), "block"),
    ("quantize-block-negative", quantize_call(block=-32), "block"),
    ("quantize-block-float", quantize_call(block=32.0), "block"),
    ("quantize-block-bool", quantize_call(block=True), "block"),
    ("quantize-block-string", quantize_call(block="32"), "block"),
    ("dequantize-array", lambda: lambda: dequantize(np.zeros((2, 32), np.int8)), "q"),
    ("dequantize-None", lambda: lambda: dequantize(None), "q"),
    # ---- QuantizedTensor by hand ----
    ("qt-data-float", hand_built(data=lambda g: g.data.astype(np.float32)), "data"),
    ("qt-data-uint8", hand_built(data=lambda g: g.data.view(np.uint8)), "data"),
    ("qt-data-0d", hand_built(data=lambda g: np.int8(1), scales=lambda g: np.ones(1, np.float32)), "data"),
    ("qt-scales-float64", hand_built(scales=lambda g: g.scales.astype(np.float64)), "scales"),
    ("qt-scales-shape", hand_built(scales=lambda g: g.scales[:, :1]), "scales"),
    ("qt-scales-rows", hand_built(scales=lambda g: g.scales[:2]), "scales"),
    ("qt-block-zero", hand_built(block=0), "block"),
    ("qt-block-negative", hand_built(block=-1), "block"),
    ("qt-block-string", hand_built(block="32"), "block"),
    ("qt-block-bool", hand_built(block=True), "block"),
    ("qt-block-not-pow2", hand_built(block=48, scales=lambda g: np.ones((4, 2), np.float32)), "block"),
    ("qt-scales-nan", hand_built(scales=nonfinite_scales(NaN)), "scales"),
    ("qt-scales-inf", hand_built(scales=nonfinite_scales(INF, (3, 2))), "scales"),
    ("qt-scales-negative", hand_built(scales=nonfinite_scales(-0.5, (1, 1))), "scales"),
    # ---- KVCache constructor ----
    ("cache-batch-zero", kv_cache(batch=0), "batch"),
    ("cache-heads-negative", kv_cache(num_kv_heads=-1), "num_kv_heads"),
    ("cache-head-dim-float", kv_cache(head_dim=2.5), "head_dim"),
    ("cache-capacity-zero", kv_cache(capacity=0), "capacity"),
    ("cache-capacity-bool", kv_cache(capacity=True), "capacity"),
    ("cache-capacity-string", kv_cache(capacity="16"), "capacity"),
    ("cache-value-dim-zero", kv_cache(value_dim=0), "value_dim"),
    ("cache-window-zero", kv_cache(window=0), "window"),
    ("cache-window-float", kv_cache(window=1.5), "window"),
    ("cache-sink-tokens-negative", kv_cache(window=4, sink_tokens=-1), "sink_tokens"),
    ("cache-sink-tokens-float", kv_cache(window=4, sink_tokens=2.0), "sink_tokens"),
    ("cache-sink-tokens-bool", kv_cache(window=4, sink_tokens=True), "sink_tokens"),
    ("cache-sink-tokens-no-window", kv_cache(sink_tokens=4), "sink_tokens"),
    ("cache-dtype-int32", kv_cache(dtype=np.int32), "dtype"),
    ("cache-dtype-complex", kv_cache(dtype=np.complex64), "dtype"),
    ("cache-dtype-nonsense", kv_cache(dtype="banana"), "dtype"),
    ("cache-int8-block-zero", kv_cache(dtype=np.int8, block=0), "block"),
    ("cache-int8-block-not-pow2", kv_cache(dtype=np.int8, head_dim=96, block=48), "block"),
    ("cache-int8-block-string", kv_cache(dtype=np.int8, block="x"), "block"),
    # (int8 with value_dim != head_dim is accepted since the 4-bit formats: the block is capped per tensor)
    ("cache-int4-odd-value-dim", kv_cache(value_dtype="int4", value_dim=E + 3), "value"),
    ("cache-rotate-nonsense", kv_cache(dtype=np.int8, rotate="queries"), "rotate"),
    ("cache-rotate-number", kv_cache(dtype=np.int8, rotate=1), "rotate"),
    ("cache-rotate-odd-head-dim", kv_cache(head_dim=7, rotate="keys"), "head_dim"),
    ("cache-rotate-odd-value-dim", kv_cache(value_dim=5, rotate="both"), "value_dim"),
    ("sdpa-plain-query-on-rotated-cache", rotated_cache_call(), "rotate"),
    # ---- KVCache.append (the cache must stay as it was) ----
    ("append-key-int", append(key=lambda k: k.astype(np.int32)), "key"),
    ("append-value-strings", append(value=lambda v: np.full(v.shape, "v")), "value"),
    ("append-key-3d", append(key=lambda k: k[0]), "key"),
    ("append-key-batch", append(key=lambda k: np.concatenate([k, k])), "key"),
    ("append-key-heads", append(key=lambda k: k[:, :1]), "key"),
    ("append-key-head-dim", append(key=lambda k: k[..., :-1]), "key"),
    ("append-value-dim", append(value=lambda v: v[..., :-1]), "value"),
    ("append-token-count", append(value=lambda v: v[:, :, :1]), "key|value"),
    ("append-over-capacity", append(T=14), "capacity"),
    ("append-key-nan", append(key=set_entry(NaN)), "key"),
    ("append-value-inf", append(value=set_entry(INF, (1, 2, 1, 3))), "value"),
    ("append-float16-key-range", append(key=set_entry(1e5), dtype=np.float16), "key"),
    ("append-float16-value-range", append(value=set_entry(-7e4), dtype=np.float16), "value"),
    ("append-int8-key-nan", append(key=set_entry(NaN), dtype=np.int8), "key"),
    (
        "append-int8-value-beyond-float32",
        append(value=lambda v: set_entry(1e39)(v.astype(np.float64)), dtype=np.int8),
        "value",
    ),
    ("append-window-key-inf", append(key=set_entry(-INF), window=4), "key"),
    # ---- MultiHeadAttention constructor ----
    ("layer-embed-zero", layer_ctor(embed_dim=0), "embed_dim"),
    ("layer-heads-zero", layer_ctor(num_heads=0), "num_heads"),
    ("layer-heads-float", layer_ctor(num_heads=2.0), "num_heads"),
    ("layer-kv-heads-not-divisor", layer_ctor(num_kv_heads=3), "num_kv_heads|num_heads"),
    ("layer-kv-heads-negative", layer_ctor(num_kv_heads=-2), "num_kv_heads"),
    ("layer-embed-not-divisible", layer_ctor(embed_dim=10), "embed_dim|head_dim"),
    ("layer-head-dim-zero", layer_ctor(head_dim=0), "head_dim"),
    ("layer-kdim-vdim", layer_ctor(kdim=8, vdim=9), "kdim|vdim"),
    ("layer-dtype-float16", layer_ctor(dtype=np.float16), "dtype"),
    ("layer-dtype-int", layer_ctor(dtype=np.int64), "dtype"),
    ("layer-dtype-nonsense", layer_ctor(dtype="banana"), "dtype"),
    # ---- load / from_linear_weights ----
    ("load-w-q-shape", load(w_q=lambda lay: lay.w_q[:, :-1].copy()), "w_q"),
    ("load-w-o-nan", load(w_o=lambda lay: set_entry(NaN, (0, 0))(lay.w_o)), "w_o"),
    ("load-w-v-inf", load(w_v=lambda lay: set_entry(INF, (1, 1))(lay.w_v)), "w_v"),
    ("load-w-k-strings", load(w_k=lambda lay: np.full(lay.w_k.shape, "w")), "w_k"),
    ("load-b-q-shape", load(b_q=np.zeros(3)), "b_q"),
    ("load-b-o-nan", load(b_o=np.full(EMBED, NaN)), "b_o"),
    (
        "load-bias-without-bias",
        lambda: lambda: layer(bias=False).load(layer().w_q, layer().w_k, layer().w_v, layer().w_o, b_q=np.zeros(EMBED)),
        "b_q",
    ),
    ("linear-q-proj-1d", from_linear(q_proj=np.zeros(EMBED, np.float32)), "q_proj"),
    ("linear-num-heads-zero", from_linear(num_heads=0), "num_heads"),
    ("linear-o-proj-shape", from_linear(o_proj=lambda a: a["o_proj"][:, :-1]), "o_proj|w_o"),
    (
        "linear-k-v-in-features",
        from_linear(k_proj=lambda a: np.zeros((a["k_proj"].shape[0], 5), np.float32)),
        "k_proj|v_proj|kdim|vdim",
    ),
    ("linear-q-bias-shape", from_linear(q_bias=np.zeros(5)), "q_bias|b_q"),
    ("linear-q-proj-nan", from_linear(q_proj=lambda a: set_entry(NaN, (0, 0))(a["q_proj"])), "q_proj|w_q"),
    # ---- layer call, no cache ----
    ("call-x-int", call(x=lambda: np.ones((B, L, EMBED), np.int32)), "x"),
    ("call-x-2d", call(x=lambda: np.ones((L, EMBED), np.float32)), "x"),
    ("call-x-embed", call(x=lambda: np.ones((B, L, EMBED + 1), np.float32)), "x"),
    ("call-x-nan", call(x=lambda: set_entry(NaN, (0, 0, 0))(x_input())), "x"),
    ("call-context-batch", call(context=lambda: x_input(batch=B + 1)), "context"),
    ("call-context-dim", call(context=lambda: x_input(dim=EMBED - 1)), "context"),
    ("call-context-inf", call(context=lambda: set_entry(INF, (1, 1, 1))(x_input())), "context"),
    ("call-cache-not-cache", call(cache=lambda: {"k": 1}), "cache"),
    ("call-kpm-shape", call(key_padding_mask=lambda: np.zeros((B, L + 1), bool)), "key_padding_mask"),
    ("call-kpm-1d", call(key_padding_mask=lambda: np.zeros(L, bool)), "key_padding_mask"),
    ("call-kpm-int", call(key_padding_mask=lambda: np.zeros((B, L), np.int64)), "key_padding_mask"),
    ("call-kpm-nan", call(key_padding_mask=nan_mask((B, L))), "key_padding_mask"),
    ("call-kpm-pos-inf", call(key_padding_mask=nan_mask((B, L), INF)), "key_padding_mask"),
    ("call-mask-shape", call(attn_mask=lambda: np.zeros((L, L + 1), bool)), "attn_mask"),
    ("call-mask-3d-wrong", call(attn_mask=lambda: np.zeros((5, L, L), bool)), "attn_mask"),
    ("call-mask-int", call(attn_mask=lambda: np.zeros((L, L), np.int8)), "attn_mask"),
    ("call-mask-nan", call(attn_mask=nan_mask((L, L))), "attn_mask"),
    ("call-causal-bad", call(is_causal="sideways"), "is_causal"),
    ("call-window-not-causal", call(window=3), "window"),
    ("call-softcap-bad", call(softcap=-1.0), "softcap"),
    ("call-alibi-length", call(alibi_slopes=lambda: np.ones(HEADS + 1)), "alibi_slopes"),
    ("call-rotary-not-callable", call(rotary=lambda: 3), "rotary"),
    # ---- layer call with a cache (the cache must stay as it was) ----
    ("cached-cache-batch", call(cached=True, x=lambda: x_input(batch=B + 1)), "cache"),
    ("cached-cache-dtype", call(cached=True, cache_kwargs=dict(dtype=np.float64)), "cache"),
    ("cached-window-differs", call(cached=True, window=4), "window"),
    ("cached-full", call(cached=True, cache_kwargs=dict(capacity=6)), "capacity|full"),
    ("cached-with-context", call(cached=True, context=lambda c: x_input()), "context"),
    ("cached-x-nan", call(cached=True, x=lambda: set_entry(NaN, (1, 2, 3))(x_input())), "x"),
    ("cached-mask-nan", call(cached=True, attn_mask=lambda c: nan_mask((L, 3 + L))()), "attn_mask"),
    ("cached-mask-pos-inf", call(cached=True, attn_mask=lambda c: nan_mask((L, 3 + L), INF)()), "attn_mask"),
    ("cached-mask-shape", call(cached=True, attn_mask=lambda c: np.zeros((L, L), bool)), "attn_mask"),
    ("cached-kpm-nan", call(cached=True, key_padding_mask=lambda c: nan_mask((B, 3 + L))()), "key_padding_mask"),
    ("cached-kpm-short", call(cached=True, key_padding_mask=lambda c: np.zeros((B, 3), bool)), "key_padding_mask"),
    (
        "cached-kpm-int",
        call(cached=True, key_padding_mask=lambda c: np.zeros((B, 3 + L), np.int32)),
        "key_padding_mask",
    ),
    ("cached-causal-bad", call(cached=True, is_causal="sideways"), "is_causal"),
    ("cached-softcap-bad", call(cached=True, softcap=NaN), "softcap"),
    ("cached-alibi-length", call(cached=True, alibi_slopes=lambda c: np.ones(2)), "alibi_slopes"),
    (
        "cached-window-mask-nan",
        call(cached=True, cache_kwargs=dict(window=4), attn_mask=lambda c: nan_mask((L, 3 + L))()),
        "attn_mask",
    ),
    (
        "cached-int8-kpm-nan",
        call(cached=True, cache_kwargs=dict(dtype=np.int8), key_padding_mask=lambda c: nan_mask((B, 3 + L))()),
        "key_padding_mask",
    ),
]


def cache_state(cache):
    """Everything a refused call must leave alone: length and the stored tokens (data and scales)."""
    keys, values = cache.keys, cache.values
    arrays = []
    for x in (keys, values):
        arrays += [np.array(x.data), np.array(x.scales)] if isinstance(x, QuantizedTensor) else [np.array(x)]
    return cache.length, arrays


def test_catalogue_is_large_and_unique():
    ids = [entry[0] for entry in CATALOGUE]
    assert len(ids) == len(set(ids)), "duplicate ids"
    assert len(ids) >= 100


@pytest.mark.parametrize("make, pattern", [pytest.param(m, p, id=i) for i, m, p in CATALOGUE])
def test_bad_input(make, pattern, monkeypatch):
    # keep attention_weights' size guard small, so that a missing guard allocates ~1 GiB at most, not 9 GiB
    monkeypatch.setattr(config, "MAX_WEIGHTS_ELEMENTS", 1 << 20)
    made = make()
    action, cache = made if isinstance(made, tuple) else (made, None)
    before = cache_state(cache) if cache is not None else None
    with pytest.raises(Exception) as info:
        action()
    exc = info.value
    assert type(exc) in (TypeError, ValueError), f"raised {type(exc).__module__}.{type(exc).__name__}: {exc}"
    assert re.search(pattern, str(exc)), f"message does not name {pattern!r}: {exc}"
    if cache is not None:
        length, arrays = cache_state(cache)
        assert length == before[0], f"the refused call changed cache.length: {before[0]} -> {length}"
        for a, b in zip(arrays, before[1]):
            np.testing.assert_array_equal(a, b, err_msg="the refused call changed the cached tokens")
