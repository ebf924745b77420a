"""KVCache(window=W, sink_tokens=n): StreamingLLM's sink tokens plus a ring of the last W tokens.

Every result is checked against the float64 reference given the whole history (no token dropped)
and an explicit boolean mask of what each query sees: the sink tokens (positions < n) and the keys
inside its own window (p - W < j <= p), causally. Positions are the tokens' absolute positions.
Caches that rotate (int8 keys by default, or ``rotate=...``) are compared as they store: the history
Hadamard-rotated (``hadamard_transform``), the reference's query rotated and its output rotated back.
"""

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import assert_close, cache_reference, cache_sdpa, randn
from numba_attn import KVCache, QuantizedTensor, quantize
from numba_attn.rotation import hadamard_transform
from test_layers import layer_reference, random_layer, rope

STORAGE = (np.float32, np.float64, np.float16, np.int8)
ATTEND_TOL = {np.dtype(np.float16): 2e-3, np.dtype(np.float32): 2e-5, np.dtype(np.float64): 1e-10}


def sees(T, sink_tokens, window, start=0, L=None):
    """Boolean (L, T): query at position start + i sees key j (written out here, independently of
    ``numba_attn.cache.streaming_mask``)."""
    L = T - start if L is None else L
    allowed = np.zeros((L, T), bool)
    for i in range(L):
        p = start + i
        for j in range(p + 1):
            allowed[i, j] = j < sink_tokens or j > p - window
    return allowed


def stored(x, dtype, block=32):
    """What a cache of ``dtype`` holds for the float input x, as float64 (int8: dequantised)."""
    if np.dtype(dtype) == np.int8:
        return as_float(quantize(x, block))
    return x.astype(dtype).astype(np.float64)


def as_stored(cache, x, which):
    """x ("key" or "value" tokens) Hadamard-rotated where the cache rotates them before storing."""
    rotated = cache.rotate_keys if which == "key" else cache.rotate_values
    return hadamard_transform(x) if rotated else x


def as_float(x):
    """Cache views as float64 (int8 QuantizedTensors dequantised in float64, as the kernels read them)."""
    if isinstance(x, QuantizedTensor):
        return x.data.astype(np.float64) * np.repeat(x.scales.astype(np.float64), x.block, axis=-1)[..., : x.shape[-1]]
    return np.asarray(x, np.float64)


# ----------------------------------------------------------------------------------------------
# storage: which tokens are held, where, and the memory
# ----------------------------------------------------------------------------------------------


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    sink_tokens=st.integers(0, 5),
    window=st.integers(1, 7),
    chunks=st.lists(st.integers(1, 15), min_size=1, max_size=10),
    dtype=st.sampled_from(STORAGE),
    rotate=st.sampled_from([None, False, "both"]),
    serial=st.booleans(),
    seed=st.integers(0, 2**32 - 1),
)
def test_sink_ring_keeps_the_first_n_and_the_last_w(sink_tokens, window, chunks, dtype, rotate, serial, seed):
    from numba_attn import cache as cache_module

    # both append paths: the serial kernels and numpy's fancy-index writes
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(cache_module, "APPEND_SERIAL_ROWS", 10**9 if serial else 0)
        check_sink_ring(sink_tokens, window, chunks, dtype, seed, rotate)


def check_sink_ring(sink_tokens, window, chunks, dtype, seed, rotate=None):
    rng = np.random.default_rng(seed)
    dim = 8
    cache = KVCache(1, 2, dim, capacity=10**6, dtype=dtype, window=window, sink_tokens=sink_tokens, rotate=rotate)
    assert cache.slots == sink_tokens + window and cache.sink_tokens == sink_tokens
    shape, nbytes = cache._keys.shape, cache.nbytes
    all_k = np.zeros((1, 2, 0, dim), np.float32)
    all_v = all_k
    for T in chunks:
        k, v = randn(rng, (1, 2, T, dim), np.float32), randn(rng, (1, 2, T, dim), np.float32)
        cache.append(k, v)
        k, v = as_stored(cache, k, "key"), as_stored(cache, v, "value")  # (what it stores: rotated or not)
        all_k, all_v = np.concatenate([all_k, k], axis=2), np.concatenate([all_v, v], axis=2)
        n = all_k.shape[2]
        held = np.r_[0 : min(n, sink_tokens), max(sink_tokens, n - window) : n]
        assert cache.length == n and cache.n_valid == held.size == min(n, sink_tokens + window)
        assert cache.wrapped == (n > sink_tokens + window)
        np.testing.assert_array_equal(cache.ordered_positions(), held)
        ok, ov = cache.ordered()
        np.testing.assert_array_equal(as_float(ok), stored(all_k[:, :, held], dtype))
        np.testing.assert_array_equal(as_float(ov), stored(all_v[:, :, held], dtype))
        # storage order: sinks in slots 0 … n-1, position p ≥ n in slot n + (p - n) mod W
        pos = cache.positions()
        np.testing.assert_array_equal(np.sort(pos), held)
        slot = np.where(pos < sink_tokens, pos, sink_tokens + (pos - sink_tokens) % window)
        np.testing.assert_array_equal(slot, np.arange(pos.size))
        np.testing.assert_array_equal(as_float(cache.keys), stored(all_k[:, :, pos], dtype))
        np.testing.assert_array_equal(as_float(cache.values), stored(all_v[:, :, pos], dtype))
        # fixed memory: the same storage whatever the length
        assert cache._keys.shape == shape and cache.nbytes == nbytes


def test_positions_example():
    cache = KVCache(1, 1, 2, capacity=100, window=4, sink_tokens=2)
    x = np.arange(11, dtype=np.float32).reshape(1, 1, 11, 1) * np.ones(2, np.float32)
    cache.append(x, x)
    # position 10 ≥ 2 lives in slot 2 + (10 - 2) mod 4 = 2
    np.testing.assert_array_equal(cache.positions(), [0, 1, 10, 7, 8, 9])
    np.testing.assert_array_equal(cache.keys[0, 0, :, 0], [0, 1, 10, 7, 8, 9])
    np.testing.assert_array_equal(cache.ordered()[0][0, 0, :, 0], [0, 1, 7, 8, 9, 10])
    np.testing.assert_array_equal(cache.ordered_positions(), [0, 1, 7, 8, 9, 10])
    np.testing.assert_array_equal(cache.positions(appended=1), [0, 1, 10, 11, 8, 9])
    np.testing.assert_array_equal(cache.ordered_positions(appended=1), [0, 1, 8, 9, 10, 11])
    # the mask over ordered(): the last query (position 10) sees all, a chunk's first ones less
    np.testing.assert_array_equal(cache.attn_mask(1), np.ones((1, 6), bool))
    np.testing.assert_array_equal(
        cache.attn_mask(3), [[1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 0], [1, 1, 1, 1, 1, 1]]
    )  # positions 8, 9, 10 against 0, 1, 7, 8, 9, 10 (window 4)
    assert repr(cache).endswith("window=4, sink_tokens=2, length=11)")


@pytest.mark.parametrize("dtype", STORAGE)
@pytest.mark.parametrize("block", [32, None])
def test_memory_stays_constant_over_many_windows(dtype, block):
    """≥ 4·W tokens through a layer: the storage is allocated once and never grows."""
    B, W, n = 2, 16, 4
    fdtype = np.float64 if dtype == np.float64 else np.float32
    layer = random_layer(128, 4, 2, dtype=fdtype)  # head_dim 32
    rng = np.random.default_rng(1)
    cache = layer.new_cache(B, capacity=10**6, window=W, dtype=dtype, block=block, sink_tokens=n)
    itemsize = np.dtype(dtype).itemsize
    data = 2 * B * 2 * (n + W) * layer.head_dim * itemsize
    if dtype == np.int8:
        per_token = 1 if block is None else layer.head_dim // 32
        data += 2 * B * 2 * (n + W) * per_token * 4
    assert cache.nbytes == data
    keys, values = cache._keys, cache._values
    for T in [5, 1, 1, 30] + [1] * 40 + [7]:
        layer(randn(rng, (B, T, 128), fdtype), cache=cache)
        assert cache._keys is keys and cache._values is values and cache.nbytes == data
        assert cache._keys.shape == (B, 2, n + W, layer.head_dim)
    assert cache.length == 84 >= 4 * W and cache.n_valid == n + W


def test_capacity_smaller_than_the_sinks_and_window():
    cache = KVCache(1, 1, 4, capacity=5, window=10, sink_tokens=3)
    assert cache.slots == 5
    x = np.ones((1, 1, 5, 4), np.float32)
    cache.append(x, x)
    np.testing.assert_array_equal(cache.positions(), np.arange(5))
    with pytest.raises(ValueError, match="capacity"):
        cache.append(x[:, :, :1], x[:, :, :1])


# ----------------------------------------------------------------------------------------------
# attention: cache.attend and scaled_dot_product_attention on the cache's views
# ----------------------------------------------------------------------------------------------


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    sink_tokens=st.integers(0, 4),
    window=st.integers(1, 8),
    chunks=st.lists(st.integers(1, 6), min_size=1, max_size=8),
    dtype=st.sampled_from(STORAGE),
    rotate=st.sampled_from([None, False, "values", "both"]),
    qdtype=st.sampled_from([np.float32, np.float16, np.float64]),
    kv_heads=st.integers(1, 2),
    group=st.integers(1, 3),
    batch=st.integers(1, 2),
    block=st.sampled_from([32, None]),
    extra=st.sampled_from(["none", "alibi", "softcap", "smaller-window"]),
    seed=st.integers(0, 2**32 - 1),
)
def test_attend_matches_the_reference(
    sink_tokens, window, chunks, dtype, rotate, qdtype, kv_heads, group, batch, block, extra, seed
):
    rng = np.random.default_rng(seed)
    D, H = 32, kv_heads * group
    cache = KVCache(
        batch, kv_heads, D, 10**6, dtype=dtype, window=window, sink_tokens=sink_tokens, block=block, rotate=rotate
    )
    T = sum(chunks)
    k, v = randn(rng, (batch, kv_heads, T, D)), randn(rng, (batch, kv_heads, T, D))
    q = randn(rng, (batch, H, T, D), qdtype)
    kw, ref_kw = {}, {}
    w = window
    if extra == "alibi":
        kw["alibi_slopes"] = ref_kw["alibi_slopes"] = 2.0 ** -np.arange(1, H + 1)
    elif extra == "softcap":
        kw["softcap"] = ref_kw["softcap"] = 3.0
    elif extra == "smaller-window":
        w = max(1, window - 2)
        kw["window"] = w
    k_all, v_all = stored(as_stored(cache, k, "key"), dtype, block), stored(as_stored(cache, v, "value"), dtype, block)
    t = 0
    for L in chunks:
        cache.append(k[:, :, t : t + L], v[:, :, t : t + L])
        qc = q[:, :, t : t + L]
        dropped = cache.length - cache.n_valid
        if dropped and max(sink_tokens, t - w + 1) < sink_tokens + dropped:
            with pytest.raises(ValueError, match=r"ring|the cache holds"):  # the chunk's first queries' keys are gone
                cache.attend(qc, **kw)
            t += L
            continue
        out = cache.attend(qc, **kw)
        # (the query is never rounded, int8 keys included; a rotating cache: the reference's query
        # rotated like the keys, its output rotated back like the values)
        ref = cache_reference(
            cache,
            qc,
            k_all[:, :, : t + L],
            v_all[:, :, : t + L],
            attn_mask=sees(t + L, sink_tokens, w, start=t),
            enable_gqa=True,
            **ref_kw,
        )
        tol = ATTEND_TOL[np.dtype(out.dtype)]
        assert_close(out, ref, rtol=tol)
        # scaled_dot_product_attention on ordered() with the cache's mask gives the same
        mask = cache.attn_mask(L, window=w)
        if "alibi_slopes" not in kw:
            kv = cache.ordered()
            general = cache_sdpa(cache, qc, *kv, attn_mask=mask, enable_gqa=True, softcap=kw.get("softcap"))
            assert_close(general, out.astype(np.float64), rtol=tol)
        t += L


@pytest.mark.parametrize("dtype,rotate", [(d, None) for d in STORAGE] + [(np.int8, False), (np.float16, "both")])
def test_one_query_after_the_wrap_reads_the_storage_as_it_is(dtype, rotate):
    """A decode step sees every held key: cache.keys/values in storage order, no mask, no copy."""
    rng = np.random.default_rng(3)
    cache = KVCache(1, 2, 64, 10**6, dtype=dtype, window=8, sink_tokens=4, rotate=rotate)
    k, v = randn(rng, (1, 2, 50, 64)), randn(rng, (1, 2, 50, 64))
    q = randn(rng, (1, 4, 50, 64), np.float32)
    for t in range(50):
        cache.append(k[:, :, t : t + 1], v[:, :, t : t + 1])
        if t in (5, 12, 30, 49):  # before the sinks are full, before and after the ring wraps
            out = cache.attend(q[:, :, t : t + 1])
            plain = cache_sdpa(cache, q[:, :, t : t + 1], cache.keys, cache.values, enable_gqa=True)
            np.testing.assert_allclose(out, plain, rtol=1e-5, atol=1e-5)
            into = np.empty_like(out)
            assert cache.attend(q[:, :, t : t + 1], out=into) is into
            np.testing.assert_array_equal(into, out)


def test_int8_per_token_scales_with_another_value_dim():
    """int8 with block=None (one scale per token and head) and value_dim != head_dim (keys rotated by
    default, values of 24 entries too with rotate="both": a block-diagonal rotation, blocks of 8)."""
    for rotate in (None, "both"):
        check_int8_per_token_scales_with_another_value_dim(rotate)


def check_int8_per_token_scales_with_another_value_dim(rotate):
    rng = np.random.default_rng(7)
    cache = KVCache(2, 1, 32, 10**6, dtype=np.int8, window=5, sink_tokens=2, value_dim=24, block=None, rotate=rotate)
    assert cache.rotate == ("keys" if rotate is None else rotate)
    T = 30
    k, v = randn(rng, (2, 1, T, 32)), randn(rng, (2, 1, T, 24))
    q = randn(rng, (2, 3, T, 32))  # float64 queries: the keys are dequantised exactly
    k_all, v_all = (
        stored(as_stored(cache, k, "key"), np.int8, None),
        stored(as_stored(cache, v, "value"), np.int8, None),
    )
    t = 0
    for L in [4, 1, 1, 1, 1, 9] + [1] * 13:
        cache.append(k[:, :, t : t + L], v[:, :, t : t + L])
        if L == 1 or not t:  # (the chunk of 9 after the wrap: its first queries' keys are gone, see above)
            out = cache.attend(q[:, :, t : t + L])
            ref = cache_reference(
                cache,
                q[:, :, t : t + L],
                k_all[:, :, : t + L],
                v_all[:, :, : t + L],
                attn_mask=sees(t + L, 2, 5, start=t),
                enable_gqa=True,
            )
            assert_close(out, ref, rtol=1e-10)
        t += L
    assert cache.nbytes == 2 * (7 * 32 + 7 * 24) + 2 * 2 * 7 * 4


# ----------------------------------------------------------------------------------------------
# the layer: a cache with sink tokens equals the masked prefill, whatever the chunks
# ----------------------------------------------------------------------------------------------


def run(layer, x, cache, steps, key_padding_mask=None, **kwargs):
    outs, t = [], 0
    for n in steps:
        kw = dict(kwargs)
        if key_padding_mask is not None:
            kw["key_padding_mask"] = key_padding_mask[:, : t + n]
        outs.append(layer(x[:, t : t + n], cache=cache, **kw))
        t += n
    return np.concatenate(outs, axis=1)


STEPS = [5, 1, 1, 20, 1, 3] + [1] * 30 + [12, 2] + [1] * 15  # chunks longer than the window too


@pytest.mark.parametrize("heads,kv_heads", [(4, 4), (4, 2), (6, 2)])
@pytest.mark.parametrize("sink_tokens", [1, 4])
def test_layer_with_sinks_equals_the_masked_prefill(heads, kv_heads, sink_tokens):
    W, T = 10, sum(STEPS)
    rng = np.random.default_rng(4)
    layer = random_layer(48, heads, kv_heads)
    x = randn(rng, (2, T, 48), np.float32)
    allowed = sees(T, sink_tokens, W)
    expected = layer_reference(layer, x, mask=allowed, rotary=rope)
    # the layer's own boolean attn_mask is True = masked out (torch.nn.MultiheadAttention)
    full = layer(x, attn_mask=~allowed, rotary=rope)
    assert_close(full, expected, rtol=1e-5)
    seen = []

    def recording_rope(q, k, positions):
        seen.append(np.array(positions))
        return rope(q, k, positions)

    cache = layer.new_cache(2, capacity=10**6, window=W, sink_tokens=sink_tokens)
    got = run(layer, x, cache, STEPS, rotary=recording_rope)
    assert_close(got, expected, rtol=1e-5)
    # rotary got the absolute positions, chunk by chunk
    np.testing.assert_array_equal(np.concatenate(seen), np.arange(T))
    # and the sinks matter: the plain window differs
    plain = run(layer, x, layer.new_cache(2, capacity=10**6, window=W), STEPS, rotary=rope)
    assert np.abs(plain - expected)[:, W + sink_tokens :].max() > 1e-3


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_layer_with_sinks_alibi_softcap_padding(dtype):
    W, n, T = 9, 3, sum(STEPS)
    rng = np.random.default_rng(5)
    layer = random_layer(32, 4, 2, dtype=dtype)
    x = randn(rng, (2, T, 32), dtype)
    slopes = 2.0 ** -np.arange(1, 5)
    pad = np.zeros((2, T), bool)
    pad[1, :2] = True  # left padding: one of the sinks of sequence 1
    pad[0, 40:43] = True
    allowed = sees(T, n, W) & ~pad[:, None, None, :]
    expected = layer_reference(layer, x, mask=allowed, alibi_slopes=slopes, softcap=8.0)
    cache = layer.new_cache(2, capacity=10**6, window=W, sink_tokens=n)
    got = run(layer, x, cache, STEPS, key_padding_mask=pad, alibi_slopes=slopes, softcap=8.0)
    assert_close(got, expected, rtol=1e-5 if dtype == np.float32 else 1e-10)
    # without ALiBi and padding too, through the float mask path of a float attn_mask
    cache.reset()
    bias = np.where(rng.random((T, T)) < 0.1, -1.0, 0.0).astype(dtype)
    expected = layer_reference(layer, x, mask=np.where(sees(T, n, W), bias, -np.inf))
    outs, t = [], 0
    for s in STEPS:
        positions = cache.positions(appended=s) if s == 1 else np.r_[cache.ordered_positions(), t + np.arange(s)]
        outs.append(layer(x[:, t : t + s], cache=cache, attn_mask=bias[t : t + s][:, positions]))
        t += s
    assert_close(np.concatenate(outs, axis=1), expected, rtol=1e-5 if dtype == np.float32 else 1e-10)


@pytest.mark.parametrize("cache_dtype", [np.float16, np.int8])
def test_layer_with_sinks_low_precision(cache_dtype):
    W, n, T = 12, 4, sum(STEPS)
    rng = np.random.default_rng(6)
    layer = random_layer(64, 4, 2)
    x = randn(rng, (1, T, 64), np.float32)
    expected = layer_reference(layer, x, mask=sees(T, n, W))
    got = run(layer, x, layer.new_cache(1, 10**6, window=W, sink_tokens=n, dtype=cache_dtype), STEPS)
    if cache_dtype == np.float16:
        assert np.abs(got - expected).max() <= 2e-3
    else:
        assert np.linalg.norm(got - expected) / np.linalg.norm(expected) <= 3e-2


# ----------------------------------------------------------------------------------------------
# bad input
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("bad", [-1, 1.5, True, "2", None, np.float64(2.0)])
def test_bad_sink_tokens(bad):
    with pytest.raises(ValueError, match="sink_tokens"):
        KVCache(1, 1, 4, 10, window=4, sink_tokens=bad)


def test_sink_tokens_need_a_window():
    with pytest.raises(ValueError, match=r"sink_tokens.*window"):
        KVCache(1, 1, 4, 10, sink_tokens=2)
    layer = random_layer(16, 2)
    with pytest.raises(ValueError, match="sink_tokens"):
        layer.new_cache(1, 10, sink_tokens=2)
    assert KVCache(1, 1, 4, 10, sink_tokens=0).sink_tokens == 0
    assert KVCache(1, 1, 4, 10, window=3, sink_tokens=np.int64(2)).slots == 5


@pytest.mark.parametrize("bad", [-1, 1.5, True])
def test_bad_attn_mask_arguments(bad):
    cache = KVCache(1, 1, 4, 10, window=4, sink_tokens=1)
    with pytest.raises(ValueError, match="query_len"):
        cache.attn_mask(bad)
    with pytest.raises(ValueError, match="window"):
        cache.attn_mask(1, window=bad if bad != -1 else 0)
