"""KVCache's Hadamard rotation (``rotate``): keys and/or values stored as H·k, H·v.

Every attention result of a rotating cache is checked against the float64 reference on the cache's own
content as stored (rotated, dequantised exactly), with the query rotated like the keys and the output
rotated back like the values (``conftest.cache_reference``: ``numba_attn.rotation.hadamard_transform``,
itself checked against an explicit ``np.kron`` matrix in test_hadamard.py), and against the documented
general call ``cache.unrotate_output(scaled_dot_product_attention(cache.rotate_query(q), keys, values))``.
Also: the defaults and refusals of ``rotate``, the guard of ``scaled_dot_product_attention`` and
``attention_weights`` against an unrotated query, result dtypes and ``out=``, windows, sink tokens,
ALiBi/softcap/learned sinks, ``MultiHeadAttention`` with rotating caches against the uncached layer,
inputs left alone, and the accuracy gain on outlier key channels the README claims.
"""

import numpy as np
import pytest

from conftest import assert_close, assert_unchanged, cache_reference, copies, randn
from numba_attn import (
    KVCache,
    QuantizedTensor,
    attention_weights,
    quantize,
    reference,
    scaled_dot_product_attention,
)
from numba_attn.rotation import hadamard_transform
from test_int4 import exact
from test_layers import random_layer
from test_streaming import sees

FORMATS = (np.float32, np.float16, np.int8, "int4")
PAIRS = [(k, v) for k in FORMATS for v in FORMATS]
ROTATIONS = ("keys", "values", "both")
ATTEND_TOL = {np.dtype(np.float16): 2e-3, np.dtype(np.float32): 2e-5, np.dtype(np.float64): 1e-10}


def name(fmt):
    return fmt if isinstance(fmt, str) else np.dtype(fmt).name


def pair_id(pair):
    return f"{name(pair[0])}-{name(pair[1])}"


def content(cache):
    """(keys, values) in position order as float64, exactly as stored (rotated where the cache rotates)."""
    keys, values = cache.ordered()
    return exact(keys), exact(values)


def stored_form(x, fmt):
    """What a store of ``fmt`` makes of the (already rotated) float tokens x: the same bytes as
    ``quantize`` for int8/int4 (a QuantizedTensor), the array converted for float formats."""
    if name(fmt) in ("int8", "int4"):
        return quantize(x, 32, bits=4 if fmt == "int4" else 8)
    return x.astype(fmt)


def assert_same_storage(view, expected):
    if isinstance(expected, QuantizedTensor):
        assert isinstance(view, QuantizedTensor) and view.bits == expected.bits
        np.testing.assert_array_equal(view.data, expected.data)
        np.testing.assert_array_equal(view.scales, expected.scales)
    else:
        np.testing.assert_array_equal(view, expected)


def general(cache, q, keys=None, values=None, **kw):
    """The documented general call on the cache's views."""
    keys = cache.keys if keys is None else keys
    values = cache.values if values is None else values
    return cache.unrotate_output(scaled_dot_product_attention(cache.rotate_query(q), keys, values, **kw))


# ----------------------------------------------------------------------------------------------
# attend on every format pair
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kfmt,vfmt", PAIRS, ids=[pair_id(p) for p in PAIRS])
@pytest.mark.parametrize("rotate", ROTATIONS)
@pytest.mark.parametrize("L", [1, 3])
def test_attend_on_every_format_pair(kfmt, vfmt, rotate, L):
    rng = np.random.default_rng(1)
    B, Hkv, D, T = 2, 2, 64, 41
    cache = KVCache(B, Hkv, D, 64, key_dtype=kfmt, value_dtype=vfmt, rotate=rotate)
    assert cache.rotate == rotate and f"rotate={rotate!r}" in repr(cache)
    k, v = randn(rng, (B, Hkv, T, D), np.float32), randn(rng, (B, Hkv, T, D), np.float32)
    cache.append(k[:, :, :37], v[:, :, :37])  # a chunk (numpy path for the big ones) and one-token appends
    for t in range(37, T):
        cache.append(k[:, :, t : t + 1], v[:, :, t : t + 1])
    # stored: the rotation of each token, in the format's own bytes
    assert_same_storage(cache.keys, stored_form(hadamard_transform(k) if cache.rotate_keys else k, kfmt))
    assert_same_storage(cache.values, stored_form(hadamard_transform(v) if cache.rotate_values else v, vfmt))
    q = randn(rng, (B, 2 * Hkv, L, D), np.float32)
    before = copies(q)
    out = cache.attend(q)
    assert_unchanged([q], before)
    assert out.shape == (B, 2 * Hkv, L, D) and out.dtype == np.float32
    keys, values = content(cache)
    ref = cache_reference(cache, q, keys, values, is_causal="lower_right", enable_gqa=True)
    assert_close(out, ref, rtol=ATTEND_TOL[out.dtype])
    np.testing.assert_allclose(out, general(cache, q, is_causal="lower_right", enable_gqa=True), rtol=1e-5, atol=1e-6)
    # the same as attending over the unrotated tokens, up to the storage's rounding (exactly, in float)
    plain = reference.scaled_dot_product_attention(q, k, v, is_causal="lower_right", enable_gqa=True)
    if name(kfmt) == name(vfmt) == "float32":
        assert_close(out, plain, rtol=2e-5)


# ----------------------------------------------------------------------------------------------
# the rotate argument
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kw,expected",
    [
        (dict(dtype=np.int8), "keys"),
        (dict(dtype="int4"), "both"),
        (dict(key_dtype=np.int8, value_dtype="int4"), "both"),
        (dict(key_dtype="int4", value_dtype=np.float16), "keys"),
        (dict(key_dtype=np.float32, value_dtype="int4"), "values"),
        (dict(key_dtype=np.float16, value_dtype=np.int8), False),  # int8 values: not by default
        (dict(dtype=np.float16), False),
        (dict(dtype=np.float32), False),
        (dict(dtype=np.float64), False),
        (dict(dtype=np.int8, head_dim=7), False),  # odd: cannot be rotated, not by default either
        (dict(dtype=np.int8, head_dim=80), "keys"),  # block-diagonal (blocks of 16)
        (dict(key_dtype=np.int8, value_dtype="int4", head_dim=9, value_dim=8), "values"),
        (dict(key_dtype="int4", value_dtype=np.int8, head_dim=8, value_dim=5), "keys"),
        (dict(dtype=np.int8, rotate=False), False),
        (dict(dtype="int4", rotate=False), False),
        (dict(dtype=np.float32, rotate=True), "keys"),
        (dict(dtype=np.float32, rotate=np.True_), "keys"),
        (dict(dtype=np.int8, rotate=np.False_), False),
        (dict(dtype=np.float16, rotate="values"), "values"),
        (dict(dtype="int4", rotate="keys"), "keys"),
        (dict(dtype=np.float64, rotate="both"), "both"),
    ],
)
def test_defaults_and_explicit_choices(kw, expected):
    args = dict(batch=1, num_kv_heads=2, head_dim=64, capacity=8)
    args.update(kw)
    cache = KVCache(**args)
    assert cache.rotate == expected
    assert (cache.rotate_keys, cache.rotate_values) == (expected in ("keys", "both"), expected in ("values", "both"))
    assert ("rotate=" in repr(cache)) == bool(expected)
    if expected:
        assert f"rotate={expected!r}" in repr(cache)


def test_layer_new_cache_passes_rotate():
    layer = random_layer(64, 4, 2)  # head_dim 16
    assert layer.new_cache(1, 8, dtype=np.int8).rotate == "keys"
    assert layer.new_cache(1, 8, dtype=np.int8, rotate=False).rotate is False
    assert layer.new_cache(1, 8, rotate="both").rotate == "both"
    assert layer.new_cache(1, 8, key_dtype=np.int8, value_dtype="int4", rotate="values").rotate == "values"


@pytest.mark.parametrize(
    "kw,match",
    [
        (dict(head_dim=7, rotate="keys"), "head_dim"),
        (dict(head_dim=7, rotate=True), "head_dim"),
        (dict(head_dim=7, rotate="both"), "head_dim"),
        (dict(head_dim=7, dtype=np.int8, rotate="keys"), "head_dim"),
        (dict(head_dim=8, value_dim=5, rotate="values"), "value_dim"),
        (dict(head_dim=8, value_dim=5, rotate="both"), "value_dim"),
        (dict(head_dim=8, value_dim=5, dtype=np.int8, block=None, rotate="both"), "value_dim"),
    ],
)
def test_rotating_an_odd_dim_is_refused(kw, match):
    with pytest.raises(ValueError, match=match):
        KVCache(1, 1, capacity=4, **kw)
    # without asking: an odd dim is simply not rotated
    kw = {k: v for k, v in kw.items() if k != "rotate"}
    assert KVCache(1, 1, capacity=4, **kw).rotate in (False, "keys")
    assert KVCache(1, 1, capacity=4, rotate=False, **kw).rotate is False


@pytest.mark.parametrize(
    "bad", ["yes", "Keys", "", "key", "value", "none", 1, 0, 2.0, ["keys"], ("keys",), np.int64(1)]
)
def test_bad_rotate_values_are_refused(bad):
    with pytest.raises(ValueError, match="rotate"):
        KVCache(1, 1, 8, 4, dtype=np.int8, rotate=bad)


# ----------------------------------------------------------------------------------------------
# scaled_dot_product_attention / attention_weights on a rotating cache's views
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kw",
    [dict(dtype=np.int8), dict(key_dtype=np.float32, value_dtype="int4"), dict(dtype=np.float32, rotate="both")],
    ids=["int8-keys", "int4-values", "float32-both"],
)
def test_a_plain_query_on_rotated_views_is_refused(no_kernel, kw):
    rng = np.random.default_rng(2)
    cache = KVCache(1, 2, 32, 16, **kw)
    cache.append(randn(rng, (1, 2, 9, 32)), randn(rng, (1, 2, 9, 32)))
    assert cache.rotate
    q = randn(rng, (1, 2, 1, 32), np.float32)
    for key, value in ((cache.keys, cache.values), cache.ordered(), (cache.keys[:, :1], cache.values[:, :1])):
        with pytest.raises(ValueError, match="rotate"):
            scaled_dot_product_attention(q[:, : key.shape[1]], key, value, is_causal="lower_right")
    plain_v = randn(rng, (1, 2, 9, 32), np.float32)
    if cache.rotate_keys:
        with pytest.raises(ValueError, match="rotate"):  # rotated keys with any values
            scaled_dot_product_attention(q, cache.keys, plain_v, is_causal="lower_right")
        with pytest.raises(ValueError, match="rotate"):
            attention_weights(q, cache.keys, is_causal="lower_right")
    else:
        plain_k = randn(rng, (1, 2, 9, 32), np.float32)
        with pytest.raises(ValueError, match="rotate"):  # rotated values with any keys
            scaled_dot_product_attention(q, plain_k, cache.values, is_causal="lower_right")


@pytest.mark.parametrize(
    "kw", [dict(dtype=np.int8), dict(key_dtype=np.float32, value_dtype="int4"), dict(dtype=np.float16, rotate="both")]
)
def test_rotate_query_is_accepted_and_right(kw):
    rng = np.random.default_rng(3)
    cache = KVCache(1, 2, 32, 16, **kw)
    cache.append(randn(rng, (1, 2, 9, 32)), randn(rng, (1, 2, 9, 32)))
    q = randn(rng, (1, 4, 2, 32), np.float32)
    keys, values = content(cache)
    out = general(cache, q, is_causal="lower_right", enable_gqa=True)
    ref = cache_reference(cache, q, keys, values, is_causal="lower_right", enable_gqa=True)
    assert_close(out, ref, rtol=2e-5)
    np.testing.assert_allclose(cache.attend(q), out, rtol=1e-5, atol=1e-6)
    # attention_weights: softmax of the rotated scores (= the unrotated ones in exact arithmetic)
    weights = attention_weights(cache.rotate_query(q), cache.keys, is_causal="lower_right", enable_gqa=True)
    expected = reference.attention_weights(
        hadamard_transform(q.astype(np.float64)) if cache.rotate_keys else q.astype(np.float64),
        keys,
        is_causal="lower_right",
        enable_gqa=True,
    )
    np.testing.assert_allclose(weights, expected, rtol=1e-5, atol=1e-6)
    if not cache.rotate_keys:  # values-only rotation: the keys are plain, attention_weights takes any query
        plain = attention_weights(q, cache.keys, is_causal="lower_right", enable_gqa=True)
        np.testing.assert_allclose(plain, expected, rtol=1e-5, atol=1e-6)


def test_rotate_query_and_unrotate_output_are_no_ops_without_rotation():
    cache = KVCache(1, 2, 8, 4, dtype=np.int8, rotate=False)
    q = np.ones((1, 2, 1, 8), np.float32)
    assert cache.rotate_query(q) is q
    assert cache.unrotate_output(q) is q
    cache.append(np.ones((1, 2, 2, 8)), np.ones((1, 2, 2, 8)))
    scaled_dot_product_attention(q, cache.keys, cache.values, is_causal="lower_right")  # no refusal


def test_rotate_query_shapes_and_dtypes():
    cache = KVCache(1, 2, 16, 4, dtype=np.int8)
    for dtype, expected in ((np.float16, np.float32), (np.float32, np.float32), (np.float64, np.float64)):
        q = np.arange(32, dtype=dtype).reshape(2, 16)
        r = cache.rotate_query(q)
        assert r.dtype == expected and r.shape == q.shape and r is not q
        np.testing.assert_allclose(r, hadamard_transform(q), rtol=1e-6)
    for bad in (np.ones((2, 15), np.float32), np.ones((2, 16), np.int32)):
        with pytest.raises(ValueError, match="head_dim"):
            cache.rotate_query(bad)
    values_only = KVCache(1, 2, 16, 4, key_dtype=np.float32, value_dtype="int4")
    q = np.ones((1, 2, 1, 16), np.float16)
    r = values_only.rotate_query(q)  # a copy in the arithmetic's dtype (float32): the guard recognises it
    assert r is not q and r.dtype == np.float32
    np.testing.assert_array_equal(r, q)


# ----------------------------------------------------------------------------------------------
# result dtypes, out=
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kfmt,vfmt", PAIRS, ids=[pair_id(p) for p in PAIRS])
@pytest.mark.parametrize("qdtype", [np.float16, np.float32, np.float64])
def test_result_dtype_is_the_unrotated_caches(kfmt, vfmt, qdtype):
    rng = np.random.default_rng(4)
    k, v = randn(rng, (1, 2, 20, 32), np.float32), randn(rng, (1, 2, 20, 32), np.float32)
    q = randn(rng, (1, 2, 1, 32), qdtype)
    rotated, plain = (KVCache(1, 2, 32, 20, key_dtype=kfmt, value_dtype=vfmt, rotate=r) for r in ("both", False))
    for cache in (rotated, plain):
        cache.append(k, v)
    out, ref = rotated.attend(q), plain.attend(q)
    assert out.dtype == ref.dtype and out.shape == ref.shape
    if name(kfmt) in ("float32", "float16") and name(vfmt) in ("float32", "float16"):
        # float storage: the rotation changes only the rounding (of the storage, and float16 results)
        tol = 3e-3 if "float16" in (name(kfmt), name(vfmt), np.dtype(out.dtype).name) else 2e-5
        np.testing.assert_allclose(out.astype(np.float64), ref.astype(np.float64), rtol=tol, atol=tol)
    keys, values = content(rotated)
    assert_close(out, cache_reference(rotated, q, keys, values, is_causal="lower_right"), rtol=ATTEND_TOL[out.dtype])


@pytest.mark.parametrize(
    "kw,qdtype",
    [
        (dict(dtype=np.int8), np.float32),
        (dict(dtype="int4"), np.float64),
        (dict(dtype=np.float16, rotate="both"), np.float16),
        (dict(key_dtype=np.float32, value_dtype="int4"), np.float16),
    ],
)
def test_attend_into_out(kw, qdtype):
    rng = np.random.default_rng(5)
    cache = KVCache(1, 3, 64, 300, **kw)
    cache.append(randn(rng, (1, 3, 300, 64)), randn(rng, (1, 3, 300, 64)))
    q = randn(rng, (1, 6, 1, 64), qdtype)
    q_copy = q.copy()
    expected = cache.attend(q)
    out = np.full(expected.shape, np.nan, expected.dtype)
    assert cache.attend(q, out=out) is out
    np.testing.assert_array_equal(out, expected)
    np.testing.assert_array_equal(q, q_copy)
    other = np.float16 if expected.dtype != np.float16 else np.float32
    for bad in (
        np.empty(expected.shape, other),
        np.empty((1, 6, 2, 64), expected.dtype),
        np.empty((1, 6, 1, 128), expected.dtype)[..., ::2],
    ):
        with pytest.raises(ValueError, match="out must be"):
            cache.attend(q, out=bad)


@pytest.mark.parametrize(
    "kw", [dict(dtype=np.int8), dict(dtype="int4"), dict(key_dtype=np.float32, value_dtype="int4")]
)
@pytest.mark.parametrize("qdtype", [np.float32, np.float16, np.float64])
def test_attend_refuses_bad_queries_and_arguments(kw, qdtype):
    """The rotated paths (the lean one of float32/float64 queries with rotated keys, and the general one)
    validate like an unrotated cache's attend, and a refused call leaves the query and the cache alone."""
    cache = KVCache(2, 2, 8, 10, **kw)
    cache.append(np.ones((2, 2, 3, 8)), np.arange(96.0).reshape(2, 2, 3, 8) / 96)
    good = np.ones((2, 4, 1, 8), qdtype)
    for q, exc, match in (
        (good.astype(np.int32), TypeError, "query"),
        (np.ones((2, 3, 1, 8), qdtype), ValueError, "query"),
        (np.ones((1, 4, 1, 8), qdtype), ValueError, "query"),
        (np.ones((2, 4, 1, 7), qdtype), ValueError, "query"),
        (np.ones((4, 1, 8), qdtype), ValueError, "query"),
        (np.ones((2, 4, 4, 8), qdtype), ValueError, "append"),
    ):
        with pytest.raises(exc, match=match):
            cache.attend(q)
    for options, match in (
        (dict(window=0), "window"),
        (dict(softcap=-1.0), "softcap"),
        (dict(scale=0.0), "scale"),
        (dict(alibi_slopes=np.ones(3)), "alibi_slopes"),
        (dict(sinks=np.ones(5)), "sinks"),
        (dict(out=np.empty((2, 4, 1, 8), np.int32)), "out must be"),
    ):
        with pytest.raises(ValueError, match=match):
            cache.attend(good, **options)
    for bad_value in (np.nan, np.inf):
        bad = good.copy()
        bad[0, 1, 0, 2] = bad_value
        before = copies(bad)
        with pytest.raises(ValueError, match="query"):
            cache.attend(bad)
        assert_unchanged([bad], before)
    assert cache.length == 3
    keys, values = content(cache)
    out = cache.attend(good)
    assert_close(
        out,
        cache_reference(cache, good, keys, values, is_causal="lower_right", enable_gqa=True),
        rtol=ATTEND_TOL[out.dtype],
    )


# ----------------------------------------------------------------------------------------------
# windows, sink tokens, ALiBi / softcap / learned sinks
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kw", [dict(dtype=np.int8), dict(dtype="int4"), dict(dtype=np.float32, rotate="both")])
def test_window_ring(kw):
    rng = np.random.default_rng(6)
    W = 6
    cache = KVCache(2, 2, 32, 100, window=W, **kw)
    assert cache.rotate
    k, v = randn(rng, (2, 2, 40, 32)), randn(rng, (2, 2, 40, 32))
    t = 0
    for T in (5, 4, 1, 1, 3, 1, 9, 1, 1):
        cache.append(k[:, :, t : t + T], v[:, :, t : t + T])
        t += T
        q = randn(rng, (2, 4, 1, 32), np.float32)
        keys, values = content(cache)
        out = cache.attend(q)
        ref = cache_reference(cache, q, keys, values, is_causal="lower_right", enable_gqa=True, window=W)
        assert_close(out, ref, rtol=2e-5)
        np.testing.assert_allclose(
            out, general(cache, q, *cache.ordered(), is_causal="lower_right", enable_gqa=True, window=W), atol=1e-6
        )
        if cache.wrapped:  # a chunk whose first queries' keys the ring dropped: refused as without rotation
            with pytest.raises(ValueError, match="ring"):
                cache.attend(randn(rng, (2, 4, 3, 32), np.float32))
    assert cache.wrapped


@pytest.mark.parametrize("kw", [dict(dtype=np.int8), dict(dtype="int4"), dict(dtype=np.float16, rotate="values")])
@pytest.mark.parametrize("L", [1, 2])
def test_sink_tokens(kw, L):
    rng = np.random.default_rng(7)
    n, W = 2, 5
    cache = KVCache(1, 2, 32, 1000, window=W, sink_tokens=n, **kw)
    checked = 0
    for T in (3, 1, 1, 6, 1, 1, 12, 1, 2, 1):
        cache.append(randn(rng, (1, 2, T, 32)), randn(rng, (1, 2, T, 32)))
        Lq = min(L, T)
        q = randn(rng, (1, 4, Lq, 32), np.float32)
        keys, values = content(cache)
        mask = cache.attn_mask(Lq)
        dropped = cache.length - cache.n_valid  # (positions n … n + dropped - 1)
        if dropped and max(n, cache.length - Lq - W + 1) < n + dropped:
            with pytest.raises(ValueError, match="ring"):  # the chunk's first queries' keys are gone
                cache.attend(q)
            continue
        out = cache.attend(q)
        ref = cache_reference(cache, q, keys, values, attn_mask=mask, enable_gqa=True)
        assert_close(out, ref, rtol=2e-5)
        checked += 1
    assert cache.wrapped and checked >= 6, checked


@pytest.mark.parametrize(
    "kw", [dict(dtype=np.int8), dict(dtype="int4"), dict(key_dtype=np.float32, value_dtype="int4")]
)
@pytest.mark.parametrize("window", [None, 30])
def test_alibi_softcap_sinks_scale_pass_through(kw, window):
    rng = np.random.default_rng(8)
    cache = KVCache(1, 2, 64, 300, window=window, **kw)
    cache.append(randn(rng, (1, 2, 200, 64)), randn(rng, (1, 2, 200, 64)))
    # (two queries on the whole cache; one on a wrapped window: a chunk would need keys the ring dropped)
    q = randn(rng, (1, 4, 2 if window is None else 1, 64), np.float32)
    options = dict(
        alibi_slopes=np.array([0.5, 0.25, 0.125, 0.0625]), softcap=5.0, sinks=np.array([0.3, -1.0, 2.0, 0.0]), scale=0.2
    )
    keys, values = content(cache)
    for chosen in ({}, *({k: v} for k, v in options.items()), options, dict(options, window=12)):
        out = cache.attend(q, **chosen)
        ref_kw = {k: v for k, v in chosen.items() if k != "window"}
        w = chosen.get("window", window)
        w = w if window is None else min(w, window)
        ref = cache_reference(cache, q, keys, values, is_causal="lower_right", enable_gqa=True, window=w, **ref_kw)
        assert_close(out, ref, rtol=2e-5)
        np.testing.assert_allclose(
            out,
            general(cache, q, *cache.ordered(), is_causal="lower_right", enable_gqa=True, window=w, **ref_kw),
            atol=1e-5,
        )


# ----------------------------------------------------------------------------------------------
# MultiHeadAttention with rotating caches against the layer without a cache
# ----------------------------------------------------------------------------------------------

#: relative error ‖cached − uncached‖ / ‖uncached‖ allowed per storage (measured here: float32 2e-7,
#: float16 2.7e-4, int8 5.9e-3, int4 8.1e-2 for rotated caches; the unrotated ones alike)
LAYER_TOL = {"float32": 1e-6, "float16": 1e-3, "int8": 1.5e-2, "int4": 0.12}
LAYER_CASES = [
    (np.float32, "both"),
    (np.float16, "both"),
    (np.int8, None),
    (np.int8, "both"),
    ("int4", None),
    ("int4", "keys"),
]
STEPS = [7, 1, 1, 1, 5, 1, 1, 12, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1]  # prefill, decode, chunks


@pytest.mark.parametrize("fmt,rotate", LAYER_CASES, ids=[f"{name(f)}-{r}" for f, r in LAYER_CASES])
@pytest.mark.parametrize("path", ["plain", "padded", "window", "sinks"])
def test_layer_with_a_rotating_cache_equals_the_uncached_layer(fmt, rotate, path):
    layer = random_layer(64, 4, 2)  # head_dim 16
    rng = np.random.default_rng(9)
    B, T, W, n = 2, sum(STEPS), 9, 3
    x = randn(rng, (B, T, 64), np.float32)
    x_copy = x.copy()
    pad = None
    if path == "padded":
        pad = np.zeros((B, T), bool)
        pad[1, :3] = True
        pad[0, 20:22] = True
        full = layer(x, is_causal=True, key_padding_mask=pad)
    elif path == "window":
        full = layer(x, is_causal=True, window=W)
    elif path == "sinks":
        full = layer(x, attn_mask=~sees(T, n, W))  # (the layer's boolean attn_mask: True = masked out)
    else:
        full = layer(x, is_causal=True)
    window = W if path in ("window", "sinks") else None
    cache = layer.new_cache(B, 64, dtype=fmt, rotate=rotate, window=window, sink_tokens=n if path == "sinks" else 0)
    assert cache.rotate == (rotate if rotate is not None else ("both" if fmt == "int4" else "keys"))
    outs, t = [], 0
    for s in STEPS:
        kw = {} if pad is None else dict(key_padding_mask=pad[:, : t + s])
        outs.append(layer(x[:, t : t + s], cache=cache, **kw))
        t += s
    got = np.concatenate(outs, axis=1)
    np.testing.assert_array_equal(x, x_copy)
    assert got.dtype == np.float32 and got.shape == full.shape
    rel = np.linalg.norm(got - full) / np.linalg.norm(full)
    assert rel <= LAYER_TOL[name(fmt)], rel


# ----------------------------------------------------------------------------------------------
# inputs are never modified
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("rotate", ["keys", "values", "both"])
@pytest.mark.parametrize("fmt", FORMATS)
def test_inputs_are_left_alone(rotate, fmt):
    """float16/float64/strided/Fortran/read-only tokens, queries and outputs: rotated copies, never in place."""
    rng = np.random.default_rng(10)
    cache = KVCache(1, 2, 16, 40, dtype=fmt, rotate=rotate)
    big = randn(rng, (1, 2, 16, 32), np.float64)
    k = big[:, :, ::4, ::2]  # strided view (1, 2, 4, 16)
    v = np.asfortranarray(randn(rng, (1, 2, 4, 16), np.float16))
    v.flags.writeable = False
    before = copies(big, v)
    cache.append(k, v)  # (a chunk)
    cache.append(k[:, :, :1], v[:, :, :1])  # (the serial kernels)
    assert_unchanged([big, v], before)
    q = randn(rng, (1, 4, 1, 16), np.float32)
    q.flags.writeable = False
    q_before = copies(q)
    rq = cache.rotate_query(q)
    out = cache.attend(q)
    raw = scaled_dot_product_attention(rq, cache.keys, cache.values, is_causal="lower_right", enable_gqa=True)
    raw_before = copies(raw)
    cache.unrotate_output(raw)
    assert_unchanged([q, raw], q_before + raw_before)
    keys, values = content(cache)
    assert_close(out, cache_reference(cache, q, keys, values, is_causal="lower_right", enable_gqa=True), rtol=2e-5)


# ----------------------------------------------------------------------------------------------
# the accuracy claim (README; asv_bench/benchmarks/quantised.py _accuracy)
# ----------------------------------------------------------------------------------------------


def _accuracy(**cache_kw):
    """(‖out − ref‖/‖ref‖, min per-row cosine): N(0,1) q, k, v, B1 H8 L16 S1024 D64, keys with 4
    channels ×20, through a KVCache (the documented general call: its own rotation of query and output)."""
    rng = np.random.default_rng(0)
    q = rng.standard_normal((1, 8, 16, 64))
    k = rng.standard_normal((1, 8, 1024, 64))
    v = rng.standard_normal((1, 8, 1024, 64))
    k[..., :4] *= 20
    ref = reference.scaled_dot_product_attention(q, k, v)
    cache = KVCache(1, 8, 64, 1024, **cache_kw)
    cache.append(k, v)
    out = general(cache, q.astype(np.float32), out_dtype=np.float32)
    rel = float(np.linalg.norm(out - ref) / np.linalg.norm(ref))
    cos = float(np.min((out * ref).sum(-1) / np.linalg.norm(out, axis=-1) / np.linalg.norm(ref, axis=-1)))
    return rel, cos


def test_rotated_int8_keys_are_more_accurate_on_outlier_channels():
    """Measured: rotated 1.6e-2 (min cosine 0.9976) against unrotated 3.7e-2 (0.9939)."""
    rotated, cos_rotated = _accuracy(dtype=np.int8)  # the default: keys rotated
    plain, cos_plain = _accuracy(dtype=np.int8, rotate=False)
    assert rotated < 0.6 * plain, (rotated, plain)
    assert rotated <= 2e-2, rotated
    assert cos_rotated >= 0.997 > cos_plain, (cos_rotated, cos_plain)


# ----------------------------------------------------------------------------------------------
# guard and messages on copies and rotated tokens (found by review, fixed)
# ----------------------------------------------------------------------------------------------


def test_plain_query_on_a_wrapped_rings_ordered_keys_is_refused():
    """Once a ring has wrapped, ``cache.ordered()`` is a gathered copy of the rotated storage, which
    ``is_rotated_view`` does not recognise: an unrotated query against it is accepted and silently scores
    against rotated keys (the KVCache docstring: the stored keys/values "(and ordered())" hold the rotated
    vectors; scaled_dot_product_attention "refuses an unrotated query against rotated keys")."""
    rng = np.random.default_rng(11)
    cache = KVCache(1, 1, 8, 100, dtype=np.int8, window=4)
    x = randn(rng, (1, 1, 6, 8), np.float32)
    cache.append(x, x)
    assert cache.wrapped and cache.rotate == "keys"
    q = randn(rng, (1, 1, 1, 8), np.float32)
    with pytest.raises(ValueError, match="rotate"):
        scaled_dot_product_attention(q, *cache.ordered())


def test_plain_query_on_ordered_with_is_refused():
    """``cache.ordered_with(k, v)`` returns the cache's keys/values "rotated as stored" (its
    docstring), new arrays the guard knows only because they are registered: an unrotated query is refused."""
    rng = np.random.default_rng(12)
    cache = KVCache(1, 1, 8, 100, dtype="int4")
    x = randn(rng, (1, 1, 5, 8), np.float32)
    cache.append(x, x)
    keys, values = cache.ordered_with(x[:, :, :2], x[:, :, :2])
    q = randn(rng, (1, 1, 2, 8), np.float32)
    with pytest.raises(ValueError, match="rotate"):
        scaled_dot_product_attention(q, keys, values, is_causal="lower_right")


@pytest.mark.parametrize(
    "fmt,value,dtype", [("int4", 3e4, np.float32), (np.int8, 3e38, np.float32)], ids=["int4-3e4", "int8-3e38"]
)
def test_range_refusal_of_a_rotated_cache_is_explained(fmt, value, dtype):
    """The range checks run on the rotated tokens. A key whose every entry is 3e4 (within
    int4's ±65504) rotates to 3e4·√64 = 2.4e5 and is refused with "key holds values beyond float16's range
    (|x| > 65504)", which the key does not; a finite float32 key of 3e38 (int8) overflows float32 in the
    rotation and is refused with "key contains NaN or inf". The refusals are right (the rotated values
    cannot be stored) and nothing is written; the messages must say it is the Hadamard rotation's result
    (rotate=False stores these keys), not blame the input."""
    cache = KVCache(1, 1, 64, 10, dtype=fmt)
    assert cache.rotate_keys
    key, value_ok = np.full((1, 1, 1, 64), value, dtype), np.ones((1, 1, 1, 64), np.float32)
    KVCache(1, 1, 64, 10, dtype=fmt, rotate=False).append(key, value_ok)  # unrotated: stored
    with pytest.raises(ValueError) as info:
        cache.append(key, value_ok)
    assert cache.length == 0
    message = str(info.value)
    assert "NaN or inf" not in message and "rotat" in message, message


@pytest.mark.parametrize("fmt", [np.float32, np.float16, np.int8, "int4"])
@pytest.mark.parametrize("xdtype", [np.float32, np.float64, np.float16])
@pytest.mark.parametrize("window,sink_tokens", [(None, 0), (5, 0), (5, 2)])
def test_one_token_appends_rotate_in_the_kernel(monkeypatch, fmt, xdtype, window, sink_tokens):
    """A decode step's append into a rotating cache is rotated, checked and written by the one
    append_rows call (no separate rotation call), and stores the bytes a chunk through the numpy path
    stores: the same float32 rotation (ring wrap and sink slots included)."""
    from numba_attn import cache as cache_module

    rng = np.random.default_rng(90)
    B, H, T, D = 2, 3, 12, 64
    k, v = randn(rng, (B, H, T, D), xdtype) * 3, randn(rng, (B, H, T, D), xdtype)
    kw = dict(dtype=fmt, rotate="both", window=window, sink_tokens=sink_tokens)
    one, chunk, mixed = (KVCache(B, H, D, 100, **kw) for _ in range(3))
    mixed.append(k[:, :, :8], v[:, :, :8])  # serial, rotated first (a sink cache's first wrap: the sink slots)
    mixed.append(k[:, :, 8:], v[:, :, 8:])
    rotations = []
    original = cache_module.hadamard_rows_max
    monkeypatch.setattr(cache_module, "hadamard_rows_max", lambda *a: rotations.append(1) or original(*a))
    for t in range(T):
        one.append(k[:, :, t : t + 1], v[:, :, t : t + 1])
    two_step = fmt == np.float16 and xdtype == np.float64  # (float64 into float16 goes through numpy)
    assert len(rotations) == (2 * T if two_step else 0), len(rotations)
    monkeypatch.setattr(cache_module, "APPEND_SERIAL_ROWS", 0)
    for t0 in range(0, T, 5):
        chunk.append(k[:, :, t0 : t0 + 5], v[:, :, t0 : t0 + 5])
    for other in (chunk, mixed):
        for a, b in ((one.keys, other.keys), (one.values, other.values)):
            for field in ("data", "scales"):
                if hasattr(a, field):
                    np.testing.assert_array_equal(getattr(a, field), getattr(b, field))
            if not hasattr(a, "data"):
                np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("fmt", [np.float32, np.int8])
def test_one_token_rotated_appends_refuse_non_finite_input(fmt):
    """NaN in a one-token append to a rotating cache is the caller's: refused as such (a float32 store
    takes it with check_finite=False), nothing written."""
    cache = KVCache(1, 2, 64, 10, dtype=fmt, rotate="both")
    good = np.ones((1, 2, 1, 64), np.float32)
    bad = good.copy()
    bad[0, 1, 0, 7] = np.nan
    for key, value, name in ((bad, good, "key"), (good, bad, "value")):
        with pytest.raises(ValueError, match=f"^{name} contains NaN or inf"):
            cache.append(key, value)
        assert cache.length == 0
    if fmt == np.float32:
        cache.append(bad, good, check_finite=False)
        assert cache.length == 1 and np.isnan(cache.keys[0, 1, 0]).all()  # (spread over its Hadamard block)
    else:
        with pytest.raises(ValueError, match=r"^key contains NaN or inf; pass finite values$"):
            cache.append(bad, good, check_finite=False)
