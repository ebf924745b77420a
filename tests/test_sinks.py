"""Learned attention sinks (``sinks=``, one logit per query head) on every path, against the float64 reference.

The reference (``numba_attn.reference``) appends each head's sink as one more score column, takes the
softmax and drops that column: the plain formula, written apart from the kernels (which fold the
sink into each finished row's running max and sum, ``kernels._scores.add_sink``).
"""

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import (
    assert_close,
    cache_reference,
    cache_sdpa,
    copies,
    int8_effective_inputs,
    randn,
    random_bool_mask,
    random_float_mask,
)
from numba_attn import (
    KVCache,
    MultiHeadAttention,
    attention_weights,
    quantize,
    reference,
    scaled_dot_product_attention,
)

FLOAT16_RTOL = 1e-3


def _reference(q, k, v, **kw):
    out, lse = reference.scaled_dot_product_attention(q, k, v, return_lse=True, **kw)
    return out, np.broadcast_to(lse, out.shape[:-1])


@st.composite
def sink_cases(draw):
    """(query, key, value, kwargs) with sinks; lengths that reach both kernels (decode: L ≤ 8, S ≥ 32)."""
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    dtype = draw(st.sampled_from([np.float16, np.float32, np.float64]))
    B = draw(st.integers(1, 2))
    Hkv = draw(st.integers(1, 3))
    H = Hkv * draw(st.integers(1, 3))
    L = draw(st.one_of(st.integers(1, 8), st.integers(1, 200)))
    S = draw(st.one_of(st.integers(1, 40), st.integers(32, 400)))
    E = draw(st.sampled_from([1, 7, 16, 32, 64]))
    Ev = draw(st.sampled_from([1, 5, 16, 64]))
    q = randn(rng, (B, H, L, E), dtype)
    k = randn(rng, (B, Hkv, S, E), dtype)
    v = randn(rng, (B, Hkv, S, Ev), dtype)
    # sinks from well below to well above the scores (a sink of +8 takes most of the weight)
    sinks = rng.uniform(-8, 8, H).astype(draw(st.sampled_from([np.float32, np.float64])))
    kw = dict(enable_gqa=True, sinks=sinks)
    causal = draw(st.sampled_from([False, True, "lower_right"]))
    kw["is_causal"] = causal
    if causal and draw(st.booleans()):
        kw["window"] = draw(st.integers(1, S + 2))
    mask_kind = draw(st.sampled_from([None, "bool", "float"]))
    if mask_kind == "bool":
        kw["attn_mask"] = random_bool_mask(rng, (L, S), density=0.7, masked_rows=draw(st.integers(0, 2)))
    elif mask_kind == "float":
        kw["attn_mask"] = random_float_mask(rng, (B, H, L, S), masked_rows=draw(st.integers(0, 2)))
    if draw(st.booleans()):
        kw["alibi_slopes"] = rng.uniform(0, 0.3, H)
    if draw(st.booleans()):
        kw["softcap"] = float(rng.uniform(2, 30))
    return q, k, v, kw


@given(sink_cases())
@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
def test_sdpa_with_sinks_matches_the_reference(case):
    q, k, v, kw = case
    before = copies(q, k, v, kw["sinks"])
    out, lse = scaled_dot_product_attention(q, k, v, return_lse=True, **kw)
    ref, ref_lse = _reference(q, k, v, **kw)
    dtype = q.dtype
    rtol = FLOAT16_RTOL if dtype == np.float16 else None
    arith = np.float64 if dtype == np.float64 else np.float32
    assert_close(out, ref, dtype=None if rtol else dtype, rtol=rtol)
    assert_close(lse, ref_lse, dtype=arith)
    for a, b in zip((q, k, v, kw["sinks"]), before):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("L, S", [(1, 300), (4, 64), (200, 200)])  # decode, decode, prefill
def test_sink_is_one_more_score_with_no_value(kernel_spy, L, S):
    """The sink's share leaves the keys: out = out_without_sink · (1 − share), share = exp(sink − lse)."""
    rng = np.random.default_rng(1)
    q, k, v = randn(rng, (2, 4, L, 32), np.float32), randn(rng, (2, 4, S, 32), np.float32), randn(rng, (2, 4, S, 16))
    v = v.astype(np.float32)
    sinks = np.array([-3.0, 0.0, 2.0, 6.0])
    plain, lse0 = scaled_dot_product_attention(q, k, v, return_lse=True)
    out, lse = scaled_dot_product_attention(q, k, v, sinks=sinks, return_lse=True)
    expected_lse = np.logaddexp(lse0.astype(np.float64), sinks[:, None])
    np.testing.assert_allclose(lse, expected_lse, rtol=1e-6, atol=1e-6)
    share = np.exp(sinks[:, None] - expected_lse)  # the sink's weight, per row
    np.testing.assert_allclose(out, plain * (1 - share)[..., None], rtol=2e-5, atol=2e-6)
    assert sum(kernel_spy.ran().values()) == 2
    assert any(name.startswith("decode" if L <= 8 else "prefill") for name in kernel_spy.ran())


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("L, S", [(1, 300), (3, 40), (50, 70)])
def test_fully_masked_rows_give_zeros_and_the_sink_as_lse(dtype, L, S):
    rng = np.random.default_rng(2)
    q, k, v = randn(rng, (1, 2, L, 8), dtype), randn(rng, (1, 2, S, 8), dtype), randn(rng, (1, 2, S, 8), dtype)
    mask = np.ones((L, S), bool)
    mask[0] = False
    sinks = np.array([1.5, -2.0])
    out, lse = scaled_dot_product_attention(q, k, v, attn_mask=mask, sinks=sinks, return_lse=True)
    assert (out[:, :, 0] == 0).all()
    np.testing.assert_allclose(lse[:, :, 0], np.broadcast_to(sinks, (1, 2)), rtol=1e-7)
    ref, ref_lse = _reference(q, k, v, attn_mask=mask, sinks=sinks)
    assert_close(out, ref, dtype=dtype)
    assert_close(lse, ref_lse, dtype=dtype)


@pytest.mark.parametrize("sink", [-1e30, -80.0, 80.0, 1e30])
def test_extreme_sinks_stay_finite(sink):
    """A sink far below the scores changes nothing; far above, it takes (almost) all the weight: never NaN."""
    rng = np.random.default_rng(3)
    q, k, v = (randn(rng, (1, 2, L, 16), np.float32) for L in (5, 300, 300))
    sinks = np.full(2, sink)
    for query in (q, q[:, :, :1]):  # prefill and decode
        out, lse = scaled_dot_product_attention(query, k, v, sinks=sinks, return_lse=True)
        plain, lse0 = scaled_dot_product_attention(query, k, v, return_lse=True)
        assert np.isfinite(out).all() and np.isfinite(lse).all()
        if sink < 0:
            np.testing.assert_array_equal(out, plain)
            np.testing.assert_array_equal(lse, lse0)
        else:
            np.testing.assert_allclose(lse, sink, rtol=1e-6)
            assert np.abs(out).max() < 1e-20


@pytest.mark.parametrize("block", [32, None])
@pytest.mark.parametrize("L", [1, 20])
def test_int8_keys_and_values_with_sinks(block, L):
    rng = np.random.default_rng(4)
    q = randn(rng, (1, 6, L, 64), np.float32)
    k8 = quantize(randn(rng, (1, 2, 150, 64), np.float32), block)
    v8 = quantize(randn(rng, (1, 2, 150, 64), np.float32), block)
    sinks = rng.uniform(-2, 2, 6)
    out, lse = scaled_dot_product_attention(q, k8, v8, enable_gqa=True, sinks=sinks, return_lse=True)
    qe, ke, ve, scale = int8_effective_inputs(q, k8, v8)
    ref, ref_lse = _reference(qe, ke, ve, enable_gqa=True, sinks=sinks, scale=scale)
    assert_close(out, ref, dtype=np.float32, rtol=2e-5)
    assert_close(lse, ref_lse, dtype=np.float32, rtol=2e-5)


def test_attention_weights_with_sinks():
    rng = np.random.default_rng(5)
    q, k = randn(rng, (2, 3, 6, 8)), randn(rng, (2, 3, 9, 8))
    sinks = np.array([0.0, 1.0, -1.0])
    w = attention_weights(q, k, is_causal=True, sinks=sinks)
    ref = reference.attention_weights(q, k, is_causal=True, sinks=sinks)
    assert_close(w, ref, dtype=np.float64)
    _, lse = reference.scaled_dot_product_attention(q, k, k, is_causal=True, return_lse=True, sinks=sinks)
    np.testing.assert_allclose(w.sum(axis=-1), 1 - np.exp(sinks[:, None] - lse), rtol=1e-12)


#: every cache format: (dtype, int8 block, rotate): the default rotation (int8: keys rotated), int8
#: unrotated, and keys and values rotated
STORAGE = [
    (np.float32, 32, None),
    (np.float16, 32, None),
    (np.float64, 32, None),
    (np.int8, 32, None),
    (np.int8, None, None),
    (np.int8, 32, False),
    (np.int8, 32, "both"),
    ("int4", 32, None),
]


@pytest.mark.parametrize("dtype, block, rotate", STORAGE)
@pytest.mark.parametrize("window", [None, 7])
@pytest.mark.parametrize("L", [1, 3])
def test_cache_attend_with_sinks(dtype, block, rotate, window, L):
    """attend with learned sinks = the general call on the cache's views = the float64 reference on
    the stored content (a rotating cache: the query rotated like its keys, the output rotated back)."""
    rng = np.random.default_rng(6)
    cache = KVCache(1, 2, 32, 64, dtype=dtype, window=window, block=block, rotate=rotate)
    cache.append(randn(rng, (1, 2, 9 if window else 40, 32)), randn(rng, (1, 2, 9 if window else 40, 32)))
    cache.append(randn(rng, (1, 2, L, 32)), randn(rng, (1, 2, L, 32)))  # a 7-slot ring has wrapped
    q = randn(rng, (1, 4, L, 32), np.float32)
    sinks = rng.uniform(-3, 3, 4)
    attend_window = None if window is None else 4  # narrower than the ring: chunks stay answerable
    out = cache.attend(q, sinks=sinks, window=attend_window)
    keys, values = cache.ordered()
    general = cache_sdpa(
        cache, q, keys, values, is_causal="lower_right", enable_gqa=True, window=attend_window, sinks=sinks
    )
    np.testing.assert_allclose(out, general, rtol=1e-5, atol=1e-6)
    _, ke, ve, _ = int8_effective_inputs(q, keys, values)
    ref = cache_reference(
        cache,
        q,
        np.asarray(ke, np.float64),
        np.asarray(ve, np.float64),
        is_causal="lower_right",
        enable_gqa=True,
        window=attend_window,
        sinks=sinks,
    )
    assert_close(out, ref, dtype=np.float32, rtol=2e-5)


@pytest.mark.parametrize("cache_dtype", [None, np.float32, np.float16, np.int8])
def test_layer_with_sinks_cached_and_not(cache_dtype):
    """A layer's decode steps with sinks give what one causal call over the whole sequence gives."""
    rng = np.random.default_rng(7)
    layer = MultiHeadAttention(64, 4, num_kv_heads=2, dtype=np.float32, seed=3)
    x = randn(rng, (1, 12, 64), np.float32)
    sinks = np.array([-1.0, 0.5, 2.0, 0.0])
    full = layer(x, is_causal=True, sinks=sinks)
    q, k, v = layer.project_qkv(x)
    ref = reference.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True, sinks=sinks)
    merged = ref.transpose(0, 2, 1, 3).reshape(12, 64) @ layer.w_o.astype(np.float64)
    np.testing.assert_allclose(full[0], merged, rtol=1e-4, atol=1e-4)
    if cache_dtype is None:
        return
    cache = layer.new_cache(1, 16, dtype=cache_dtype)
    steps = [layer(x[:, :5], cache=cache, sinks=sinks)] + [
        layer(x[:, t : t + 1], cache=cache, sinks=sinks) for t in range(5, 12)
    ]
    tol = 1e-4 if cache_dtype == np.float32 else (5e-3 if cache_dtype == np.float16 else 5e-2)
    np.testing.assert_allclose(np.concatenate(steps, axis=1), full, rtol=tol, atol=tol)


@pytest.mark.parametrize(
    "sinks, exc, match",
    [
        (np.zeros(3), ValueError, r"sinks must have shape \(H,\) = \(4,\)"),
        (np.zeros((4, 1)), ValueError, r"sinks must have shape \(H,\)"),
        (np.array([0.0, np.nan, 0.0, 0.0]), ValueError, "sinks contains NaN or inf"),
        (np.array([0.0, np.inf, 0.0, 0.0]), ValueError, "sinks contains NaN or inf"),
        pytest.param(
            np.array([0.0, 1e300, 0.0, 0.0]),
            ValueError,
            "sinks holds values beyond float32.s range",
            marks=pytest.mark.filterwarnings("ignore:overflow encountered in cast"),
        ),
        (np.array(["a", "b", "c", "d"]), TypeError, "sinks must be a real array"),
        ("sinks", TypeError, "sinks must be a numpy array"),
    ],
)
def test_bad_sinks_are_refused_before_anything_runs(no_kernel, sinks, exc, match):
    rng = np.random.default_rng(8)
    q, k, v = (randn(rng, (1, 4, 3, 8), np.float32) for _ in range(3))
    with pytest.raises(exc, match=match):
        scaled_dot_product_attention(q, k, v, sinks=sinks)
    with pytest.raises(exc, match=match):
        attention_weights(q, k, sinks=sinks)
    cache = KVCache(1, 4, 8, 10)
    cache.append(k, v)
    with pytest.raises(exc, match=match):
        cache.attend(q[:, :, :1], sinks=sinks)


def test_sinks_need_a_heads_dim():
    q = np.zeros((3, 8), np.float32)
    with pytest.raises(ValueError, match=r"sinks needs a heads dim \(-3\)"):
        scaled_dot_product_attention(q, q, q, sinks=np.zeros(1))


@pytest.mark.filterwarnings("ignore:overflow encountered in cast")
@pytest.mark.parametrize("window, sink_tokens", [(None, 0), (4, 0), (4, 2)])
@pytest.mark.parametrize("name", ["sinks", "alibi_slopes"])
@pytest.mark.parametrize(
    "bad",
    [np.zeros(3), np.array([0.0, np.nan, 0.0, 0.0]), np.array([1e39, 0.0, 0.0, 0.0])],
    ids=["shape", "nan", "big"],
)
def test_a_refused_cached_layer_call_leaves_the_cache_alone(bad, name, window, sink_tokens):
    """Shape, NaN, and a value beyond the layer's float32 (1e39): refused before the new token is cached."""
    rng = np.random.default_rng(9)
    layer = MultiHeadAttention(32, 4, dtype=np.float32, seed=1)
    cache = layer.new_cache(1, 8, window=window, sink_tokens=sink_tokens)
    layer(randn(rng, (1, 2, 32), np.float32), cache=cache)
    keys = np.array(cache.keys)
    for L in (1, 3):
        with pytest.raises(ValueError, match=name):
            layer(randn(rng, (1, L, 32), np.float32), cache=cache, **{name: bad})
    assert cache.length == 2
    np.testing.assert_array_equal(cache.keys, keys)


@pytest.mark.parametrize("dtype", [np.float32, np.float16, np.int8, "int4"])
@pytest.mark.parametrize("L", [1, 3])
def test_learned_sinks_on_a_cache_with_sink_tokens(dtype, L):
    """Both kinds of sink at once: StreamingLLM's kept first tokens (``sink_tokens``) and learned sink logits.
    (int8 and int4 caches rotate by default: the general call takes ``rotate_query``'s query and
    ``unrotate_output``, the reference the rotated query and the output rotated back.)"""
    rng = np.random.default_rng(10)
    n, W = 2, 6
    cache = KVCache(1, 2, 16, 100, dtype=dtype, window=W, sink_tokens=n)
    history_k, history_v = randn(rng, (1, 2, 20, 16)), randn(rng, (1, 2, 20, 16))
    cache.append(history_k[:, :, : 20 - L], history_v[:, :, : 20 - L])
    q = randn(rng, (1, 4, L, 16), np.float32)
    sinks = rng.uniform(-2, 2, 4)
    if L > 1:  # a chunk: attend over the cached keys and the new ones before the ring drops any
        keys, values = cache.ordered_with(history_k[:, :, 20 - L :], history_v[:, :, 20 - L :])
        k_pos = np.r_[cache.ordered_positions(), np.arange(20 - L, 20)]
    cache.append(history_k[:, :, 20 - L :], history_v[:, :, 20 - L :])
    out = None
    if L == 1:
        keys, values = cache.ordered()
        k_pos = cache.ordered_positions()
        out = cache.attend(q, sinks=sinks)
    mask = (k_pos[None, :] <= (20 - L + np.arange(L))[:, None]) & (
        (k_pos[None, :] < n) | (k_pos[None, :] > (20 - L + np.arange(L))[:, None] - W)
    )
    general = cache_sdpa(cache, q, keys, values, attn_mask=mask, enable_gqa=True, sinks=sinks)
    _, ke, ve, _ = int8_effective_inputs(q, keys, values)
    ref = cache_reference(
        cache, q, np.asarray(ke, np.float64), np.asarray(ve, np.float64), attn_mask=mask, enable_gqa=True, sinks=sinks
    )
    assert_close(general, ref, dtype=np.float32, rtol=2e-5)
    if out is not None:
        np.testing.assert_allclose(out, general, rtol=1e-5, atol=1e-6)


def test_layer_with_learned_sinks_and_sink_tokens():
    rng = np.random.default_rng(11)
    layer = MultiHeadAttention(32, 4, num_kv_heads=2, dtype=np.float32, seed=5)
    x = randn(rng, (1, 20, 32), np.float32)
    sinks = np.array([0.5, -1.0, 1.5, 0.0])
    cache = layer.new_cache(1, 64, window=6, sink_tokens=2)
    steps = [layer(x[:, :4], cache=cache, sinks=sinks), layer(x[:, 4:9], cache=cache, sinks=sinks)]
    steps += [layer(x[:, t : t + 1], cache=cache, sinks=sinks) for t in range(9, 20)]
    q, k, v = layer.project_qkv(x)
    pos = np.arange(20)
    mask = (pos[None, :] <= pos[:, None]) & ((pos[None, :] < 2) | (pos[None, :] > pos[:, None] - 6))
    ref = reference.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True, sinks=sinks)
    expected = ref.transpose(0, 2, 1, 3).reshape(20, 32) @ layer.w_o.astype(np.float64)
    np.testing.assert_allclose(np.concatenate(steps, axis=1)[0], expected, rtol=1e-4, atol=1e-4)
    assert cache.nbytes == layer.new_cache(1, 64, window=6, sink_tokens=2).nbytes


def test_packed_layer_with_sinks_equals_each_sequence_alone():
    rng = np.random.default_rng(12)
    layer = MultiHeadAttention(32, 4, num_kv_heads=2, dtype=np.float32, seed=6)
    lengths = [5, 0, 9]
    cu = np.concatenate([[0], np.cumsum(lengths)])
    x = randn(rng, (int(cu[-1]), 32), np.float32)
    sinks = np.array([1.0, -0.5, 0.0, 2.0])
    packed = layer(x, cu_seqlens=cu, is_causal=True, sinks=sinks)
    for b, L in enumerate(lengths):
        if L:
            alone = layer(x[None, cu[b] : cu[b + 1]], is_causal=True, sinks=sinks)[0]
            np.testing.assert_allclose(packed[cu[b] : cu[b + 1]], alone, rtol=1e-5, atol=1e-5)


@pytest.mark.filterwarnings("ignore:overflow encountered in cast")
@pytest.mark.parametrize("L", [1, 3])
def test_cache_attend_refuses_slopes_and_sinks_beyond_float32(L):
    """Every path of ``KVCache.attend`` (the fast one, a sink cache's masked one) refuses 1e39 in float32."""
    rng = np.random.default_rng(13)
    cache = KVCache(1, 2, 8, 32, window=4, sink_tokens=2)
    cache.append(randn(rng, (1, 2, 9, 8)), randn(rng, (1, 2, 9, 8)))
    q = randn(rng, (1, 2, L, 8), np.float32)
    big = np.array([1e39, 0.0])
    for name in ("alibi_slopes", "sinks"):
        with pytest.raises(ValueError, match=f"{name} holds values beyond float32's range"):
            cache.attend(q, window=2, **{name: big})
