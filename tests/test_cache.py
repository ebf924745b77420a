"""numba_attn.cache: KVCache storage, ring-buffer semantics, dtypes, errors, and ``attend``.

A cache stores int8 keys Hadamard-rotated by default (``rotate=None``): the storage tests expect
``quantize(hadamard_transform(k))`` there, and run int8 with ``rotate=False`` too; the attention tests
compare against the reference on the stored (rotated) content with the query rotated the same way."""

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import assert_unchanged, cache_reference, cache_sdpa, copies, randn
from numba_attn import KVCache, QuantizedTensor, dequantize, quantize
from numba_attn.rotation import hadamard_transform

STORAGE = (np.float32, np.float64, np.float16, np.int8)
#: (storage, rotate): every format with the default rotation (int8: keys rotated, values not), int8
#: unrotated, float32 with keys and values rotated (stored exactly as hadamard_transform computes them)
CASES = [(d, None) for d in STORAGE] + [(np.int8, False), (np.float32, "both")]
CASE_IDS = [f"{np.dtype(d).name}-{r}" for d, r in CASES]
B, H, D = 2, 3, 64


def tokens(rng, T, dim=D, dtype=np.float32):
    """(key, value) for T new tokens, (B, H, T, dim)."""
    return randn(rng, (B, H, T, dim), dtype), randn(rng, (B, H, T, dim), dtype)


def stored(x, dtype, block=32):
    """What a cache of ``dtype`` holds for the float input x (int8: the dequantised values)."""
    if np.dtype(dtype) == np.int8:
        return dequantize(quantize(x, block))
    return x.astype(dtype)


def as_float(x):
    """Cache views as plain float arrays (int8 QuantizedTensors dequantised)."""
    return dequantize(x) if isinstance(x, QuantizedTensor) else np.asarray(x)


def as_stored(cache, x, which):
    """x ("key" or "value" tokens) as the cache has it before converting it to its format: Hadamard-
    rotated (``hadamard_transform``: what ``KVCache`` computes, same kernel, same bits) where it rotates."""
    rotated = cache.rotate_keys if which == "key" else cache.rotate_values
    return hadamard_transform(x) if rotated else x


# ----------------------------------------------------------------------------------------------
# basics
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype,rotate", CASES, ids=CASE_IDS)
def test_append_and_views(dtype, rotate):
    rng = np.random.default_rng(0)
    cache = KVCache(B, H, D, capacity=20, dtype=dtype, rotate=rotate)
    assert cache.rotate == {None: "keys" if dtype == np.int8 else False}.get(rotate, rotate)
    assert cache.length == len(cache) == cache.n_valid == 0
    assert cache.dtype == np.dtype(dtype) and cache.slots == 20 and not cache.wrapped
    assert cache.keys.shape == cache.values.shape == (B, H, 0, D)
    chunks = [tokens(rng, T) for T in (5, 1, 1, 3)]
    for i, (k, v) in enumerate(chunks):
        before = copies(k, v)
        cache.append(k, v)
        assert_unchanged([k, v], before)
        assert cache.length == sum(c[0].shape[2] for c in chunks[: i + 1])
    all_k = as_stored(cache, np.concatenate([c[0] for c in chunks], axis=2), "key")
    all_v = as_stored(cache, np.concatenate([c[1] for c in chunks], axis=2), "value")
    assert cache.length == len(cache) == cache.n_valid == 10
    keys, values = cache.keys, cache.values
    if dtype == np.int8:
        assert isinstance(keys, QuantizedTensor) and isinstance(values, QuantizedTensor)
        assert keys.shape == (B, H, 10, D) and keys.block == 32
        # each token is quantised on its own: the same bits as quantising everything at once
        whole = quantize(all_k)
        np.testing.assert_array_equal(keys.data, whole.data)
        np.testing.assert_array_equal(keys.scales, whole.scales)
    else:
        assert isinstance(keys, np.ndarray) and keys.dtype == np.dtype(dtype)
        assert keys.shape == (B, H, 10, D)
    np.testing.assert_array_equal(as_float(keys), stored(all_k, dtype))
    np.testing.assert_array_equal(as_float(values), stored(all_v, dtype))
    np.testing.assert_array_equal(cache.positions(), np.arange(10))
    ok, ov = cache.ordered()
    np.testing.assert_array_equal(as_float(ok), as_float(keys))
    np.testing.assert_array_equal(as_float(ov), as_float(values))
    assert repr(cache).startswith("KVCache(") and "length=10" in repr(cache)
    assert (f"rotate={cache.rotate!r}" in repr(cache)) == bool(cache.rotate)


@pytest.mark.parametrize("dtype,rotate", CASES, ids=CASE_IDS)
def test_reset(dtype, rotate):
    rng = np.random.default_rng(1)
    cache = KVCache(1, 2, 16, capacity=8, dtype=dtype, rotate=rotate)
    k, v = randn(rng, (1, 2, 8, 16), np.float32), randn(rng, (1, 2, 8, 16), np.float32)
    cache.append(k, v)
    nbytes = cache.nbytes
    cache.reset()
    assert cache.length == 0 and cache.n_valid == 0 and cache.keys.shape == (1, 2, 0, 16)
    assert cache.nbytes == nbytes  # storage is kept
    k2, v2 = randn(rng, (1, 2, 3, 16), np.float32), randn(rng, (1, 2, 3, 16), np.float32)
    cache.append(k2, v2)
    assert cache.length == 3
    np.testing.assert_array_equal(as_float(cache.keys), stored(as_stored(cache, k2, "key"), dtype))
    np.testing.assert_array_equal(as_float(cache.values), stored(as_stored(cache, v2, "value"), dtype))
    np.testing.assert_array_equal(cache.positions(), np.arange(3))
    cache.append(k[:, :, :5], v[:, :, :5])  # the full capacity is available again
    assert cache.length == 8


@pytest.mark.parametrize("dtype", (np.float32, np.float64, np.float16))
def test_nbytes_float(dtype):
    cache = KVCache(B, H, D, capacity=100, dtype=dtype)
    assert cache.nbytes == 2 * B * H * 100 * D * np.dtype(dtype).itemsize
    windowed = KVCache(B, H, D, capacity=100, dtype=dtype, window=10)
    assert windowed.slots == 10
    assert windowed.nbytes == 2 * B * H * 10 * D * np.dtype(dtype).itemsize


def test_nbytes_ratios_d64():
    f32 = KVCache(1, 8, 64, capacity=256, dtype=np.float32).nbytes
    f16 = KVCache(1, 8, 64, capacity=256, dtype=np.float16).nbytes
    i8 = KVCache(1, 8, 64, capacity=256, dtype=np.int8).nbytes
    i8_row = KVCache(1, 8, 64, capacity=256, dtype=np.int8, block=None).nbytes
    assert f16 == f32 // 2
    assert i8 <= 0.30 * f32
    assert i8 == 2 * 8 * 256 * (64 + 4 * 2)  # data + one float32 scale per 32 entries
    assert i8_row == 2 * 8 * 256 * (64 + 4)  # one scale per token and head
    assert i8_row < i8


def test_value_dim():
    rng = np.random.default_rng(2)
    cache = KVCache(1, 2, 8, capacity=4, value_dim=5)
    k, v = randn(rng, (1, 2, 3, 8), np.float32), randn(rng, (1, 2, 3, 5), np.float32)
    cache.append(k, v)
    assert cache.keys.shape == (1, 2, 3, 8) and cache.values.shape == (1, 2, 3, 5)
    np.testing.assert_array_equal(cache.values, v)
    # int8 with value_dim != head_dim: the block is capped at each tensor's own width (here one scale
    # per token and head for both; "block=None" is no longer required since the 4-bit formats came)
    for block in (None, 32):
        q = KVCache(1, 2, 8, capacity=4, value_dim=5, dtype=np.int8, block=block)
        assert q.rotate == "keys"  # (an even head_dim: int8 keys rotated by default; values never by default)
        q.append(k, v)
        assert q.keys.block == 8 and q.values.block == 5
        assert q.values.shape == (1, 2, 3, 5) and q.values.scales.shape == (1, 2, 3, 1)
        np.testing.assert_array_equal(as_float(q.values), stored(v, np.int8, block=5))
        np.testing.assert_array_equal(as_float(q.keys), stored(hadamard_transform(k), np.int8, block=8))


@pytest.mark.parametrize("rotate", [None, False])
@pytest.mark.parametrize("block", [16, 32, 64, None])
def test_int8_block(block, rotate):
    rng = np.random.default_rng(3)
    cache = KVCache(1, 2, 64, capacity=4, dtype=np.int8, block=block, rotate=rotate)
    k, v = tokens(rng, 4)
    k, v = k[:1, :2], v[:1, :2]
    cache.append(k, v)
    expect = quantize(as_stored(cache, k, "key"), block)
    assert cache.keys.block == expect.block == (64 if block is None else block)
    np.testing.assert_array_equal(cache.keys.data, expect.data)
    np.testing.assert_array_equal(cache.keys.scales, expect.scales)
    assert cache.keys.scales.shape == (1, 2, 4, 64 // expect.block)


@pytest.mark.parametrize("dtype", STORAGE)
def test_views_are_read_only(dtype):
    rng = np.random.default_rng(4)
    cache = KVCache(1, 2, 32, capacity=6, dtype=dtype, window=4)
    k, v = randn(rng, (1, 2, 3, 32), np.float32), randn(rng, (1, 2, 3, 32), np.float32)
    cache.append(k, v)
    views = [cache.keys, cache.values, *cache.ordered()]
    cache.append(k, v)  # wraps: ordered() is a gathered copy now
    assert cache.wrapped
    views += [cache.keys, cache.values, *cache.ordered()]
    for view in views:
        arrays = [view.data, view.scales] if isinstance(view, QuantizedTensor) else [view]
        for a in arrays:
            assert not a.flags.writeable
            with pytest.raises(ValueError):
                a[...] = 0


@pytest.mark.parametrize("dtype,rotate", CASES, ids=CASE_IDS)
def test_inputs_are_converted_not_modified(dtype, rotate):
    """float16/float64/strided inputs are accepted and left alone (rotated caches rotate a copy)."""
    rng = np.random.default_rng(5)
    cache = KVCache(1, 2, 16, capacity=10, dtype=dtype, rotate=rotate)
    big = randn(rng, (1, 2, 16, 32), np.float64)
    k = big[:, :, ::4, ::2]  # strided view (1, 2, 4, 16)
    v = np.asfortranarray(randn(rng, (1, 2, 4, 16), np.float16))
    before = copies(big, v)
    cache.append(k, v)
    assert_unchanged([big, v], before)
    np.testing.assert_array_equal(as_float(cache.keys), stored(as_stored(cache, np.ascontiguousarray(k), "key"), dtype))
    np.testing.assert_array_equal(
        as_float(cache.values), stored(as_stored(cache, np.ascontiguousarray(v), "value"), dtype)
    )


# ----------------------------------------------------------------------------------------------
# ring buffer
# ----------------------------------------------------------------------------------------------


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    window=st.integers(1, 9),
    chunks=st.lists(st.integers(1, 14), min_size=1, max_size=10),
    dtype=st.sampled_from(STORAGE),
    rotate=st.sampled_from([None, False, "both"]),
    seed=st.integers(0, 2**32 - 1),
)
def test_ring_buffer_keeps_the_last_window_tokens(window, chunks, dtype, rotate, seed):
    rng = np.random.default_rng(seed)
    dim = 8
    cache = KVCache(1, 2, dim, capacity=10**6, dtype=dtype, window=window, rotate=rotate)
    assert cache.slots == window
    seen_k, seen_v = [], []
    for T in chunks:
        k, v = randn(rng, (1, 2, T, dim), np.float32), randn(rng, (1, 2, T, dim), np.float32)
        cache.append(k, v)
        seen_k.append(as_stored(cache, k, "key"))
        seen_v.append(as_stored(cache, v, "value"))
        all_k, all_v = np.concatenate(seen_k, axis=2), np.concatenate(seen_v, axis=2)
        n = all_k.shape[2]
        assert cache.length == n
        assert cache.n_valid == min(n, window)
        assert cache.wrapped == (n > window)
        first = n - cache.n_valid
        # ordered(): the last min(n, W) tokens, oldest first
        ok, ov = cache.ordered()
        np.testing.assert_array_equal(as_float(ok), stored(all_k[:, :, first:], dtype))
        np.testing.assert_array_equal(as_float(ov), stored(all_v[:, :, first:], dtype))
        # storage order: the token at position p lives in slot p mod W
        pos = cache.positions()
        assert pos.shape == (cache.n_valid,)
        np.testing.assert_array_equal(np.sort(pos), np.arange(first, n))
        np.testing.assert_array_equal(pos % window, np.arange(cache.n_valid))
        np.testing.assert_array_equal(as_float(cache.keys), stored(all_k[:, :, pos], dtype))
        np.testing.assert_array_equal(as_float(cache.values), stored(all_v[:, :, pos], dtype))


def test_ring_buffer_positions_example():
    cache = KVCache(1, 1, 2, capacity=100, window=5)
    x = np.arange(7, dtype=np.float32).reshape(1, 1, 7, 1) * np.ones(2, np.float32)
    cache.append(x, x)
    np.testing.assert_array_equal(cache.positions(), [5, 6, 2, 3, 4])
    np.testing.assert_array_equal(cache.keys[0, 0, :, 0], [5, 6, 2, 3, 4])
    np.testing.assert_array_equal(cache.ordered()[0][0, 0, :, 0], [2, 3, 4, 5, 6])


def test_chunk_longer_than_window():
    rng = np.random.default_rng(6)
    cache = KVCache(2, 1, 4, capacity=1000, window=4)
    k0, v0 = randn(rng, (2, 1, 2, 4), np.float32), randn(rng, (2, 1, 2, 4), np.float32)
    cache.append(k0, v0)
    k, v = randn(rng, (2, 1, 11, 4), np.float32), randn(rng, (2, 1, 11, 4), np.float32)
    cache.append(k, v)
    assert cache.length == 13 and cache.n_valid == 4
    ok, ov = cache.ordered()
    np.testing.assert_array_equal(ok, k[:, :, -4:])
    np.testing.assert_array_equal(ov, v[:, :, -4:])
    np.testing.assert_array_equal(np.sort(cache.positions()), np.arange(9, 13))


def test_ordered_with_appends_without_storing():
    rng = np.random.default_rng(7)
    cache = KVCache(1, 2, 8, capacity=100, window=3)
    k, v = randn(rng, (1, 2, 5, 8), np.float32), randn(rng, (1, 2, 5, 8), np.float32)
    cache.append(k, v)
    nk, nv = randn(rng, (1, 2, 2, 8), np.float32), randn(rng, (1, 2, 2, 8), np.float32)
    wk, wv = cache.ordered_with(nk, nv)
    np.testing.assert_array_equal(wk, np.concatenate([k[:, :, 2:], nk], axis=2))
    np.testing.assert_array_equal(wv, np.concatenate([v[:, :, 2:], nv], axis=2))
    assert cache.length == 5


def test_window_larger_than_capacity():
    cache = KVCache(1, 1, 4, capacity=3, window=10)
    assert cache.slots == 3
    x = np.ones((1, 1, 3, 4), np.float32)
    cache.append(x, x)
    with pytest.raises(ValueError, match="capacity"):
        cache.append(x[:, :, :1], x[:, :, :1])


# ----------------------------------------------------------------------------------------------
# errors: nothing is written
# ----------------------------------------------------------------------------------------------


def _snapshot(cache):
    keys, values = cache.ordered()
    return cache.length, np.array(as_float(keys)), np.array(as_float(values))


def _assert_same(cache, snap):
    length, keys, values = snap
    assert cache.length == length
    ok, ov = cache.ordered()
    np.testing.assert_array_equal(as_float(ok), keys)
    np.testing.assert_array_equal(as_float(ov), values)


@pytest.mark.parametrize("dtype", STORAGE)
@pytest.mark.parametrize("window", [None, 4])
def test_capacity_overflow_writes_nothing(dtype, window):
    rng = np.random.default_rng(8)
    cache = KVCache(1, 2, 16, capacity=10, dtype=dtype, window=window)
    k, v = randn(rng, (1, 2, 7, 16), np.float32), randn(rng, (1, 2, 7, 16), np.float32)
    cache.append(k, v)
    snap = _snapshot(cache)
    raw = cache._keys.copy(), cache._values.copy()
    with pytest.raises(ValueError, match="capacity"):
        cache.append(randn(rng, (1, 2, 4, 16), np.float32), randn(rng, (1, 2, 4, 16), np.float32))
    _assert_same(cache, snap)
    np.testing.assert_array_equal(cache._keys, raw[0])
    np.testing.assert_array_equal(cache._values, raw[1])
    cache.append(k[:, :, :3], v[:, :, :3])  # exactly full is fine
    assert cache.length == 10


def test_float16_refuses_out_of_range_values():
    rng = np.random.default_rng(9)
    cache = KVCache(1, 1, 4, capacity=10, dtype=np.float16)
    ok = np.full((1, 1, 2, 4), 65504.0, np.float32)  # float16's largest value is accepted
    cache.append(ok, -ok)
    assert np.isfinite(cache.keys.astype(np.float32)).all()
    snap = _snapshot(cache)
    for name in ("key", "value"):
        k, v = randn(rng, (1, 1, 2, 4), np.float32), randn(rng, (1, 1, 2, 4), np.float32)
        (k if name == "key" else v)[0, 0, 1, 2] = -1e5
        with pytest.raises(ValueError, match=f"{name}.*65504"):
            cache.append(k, v)
        _assert_same(cache, snap)
    # float32/float64 caches take large values
    big = KVCache(1, 1, 4, capacity=10, dtype=np.float32)
    big.append(np.full((1, 1, 1, 4), 1e30, np.float32), np.full((1, 1, 1, 4), -1e30, np.float32))
    assert big.keys[0, 0, 0, 0] == np.float32(1e30)


@pytest.mark.parametrize("dtype", STORAGE)
def test_non_finite_is_refused(dtype):
    cache = KVCache(1, 1, 4, capacity=10, dtype=dtype)
    cache.append(np.ones((1, 1, 1, 4)), np.ones((1, 1, 1, 4)))
    snap = _snapshot(cache)
    for name, bad in (("key", np.nan), ("value", np.inf), ("key", -np.inf)):
        k, v = np.ones((1, 1, 2, 4)), np.ones((1, 1, 2, 4))
        (k if name == "key" else v)[0, 0, 0, 0] = bad
        with pytest.raises(ValueError, match=name):
            cache.append(k, v)
        _assert_same(cache, snap)


@pytest.mark.parametrize(
    "key_shape,value_shape,match",
    [
        ((1, 2, 3, 16), (1, 2, 3, 15), "value"),
        ((1, 2, 3, 15), (1, 2, 3, 16), "key"),
        ((2, 2, 3, 16), (2, 2, 3, 16), "key"),  # wrong batch
        ((1, 3, 3, 16), (1, 3, 3, 16), "key"),  # wrong heads
        ((2, 3, 16), (2, 3, 16), "key"),  # 3-D
        ((1, 2, 3, 16), (1, 2, 4, 16), "same number of tokens"),
    ],
)
def test_bad_shapes(key_shape, value_shape, match):
    cache = KVCache(1, 2, 16, capacity=10)
    cache.append(np.ones((1, 2, 1, 16)), np.ones((1, 2, 1, 16)))
    snap = _snapshot(cache)
    with pytest.raises(ValueError, match=match):
        cache.append(np.zeros(key_shape), np.zeros(value_shape))
    _assert_same(cache, snap)


def test_bad_dtypes_of_appended_data():
    cache = KVCache(1, 1, 4, capacity=10)
    with pytest.raises(TypeError, match="key"):
        cache.append(np.ones((1, 1, 1, 4), np.int32), np.ones((1, 1, 1, 4)))
    with pytest.raises(TypeError, match="value"):
        cache.append(np.ones((1, 1, 1, 4)), np.ones((1, 1, 1, 4), bool))
    assert cache.length == 0


@pytest.mark.parametrize(
    "kwargs,exc,match",
    [
        (dict(batch=0), ValueError, "batch"),
        (dict(num_kv_heads=-1), ValueError, "num_kv_heads"),
        (dict(head_dim=2.5), ValueError, "head_dim"),
        (dict(capacity=True), ValueError, "capacity"),
        (dict(capacity=0), ValueError, "capacity"),
        (dict(window=0), ValueError, "window"),
        (dict(window=-3), ValueError, "window"),
        (dict(window=2.0), ValueError, "window"),
        (dict(value_dim=0), ValueError, "value_dim"),
        (dict(dtype=np.int16), TypeError, "dtype"),
        (dict(dtype=np.complex64), TypeError, "dtype"),
        (dict(dtype=np.int8, block=0), ValueError, "block"),
    ],
)
def test_bad_constructor_arguments(kwargs, exc, match):
    args = dict(batch=1, num_kv_heads=2, head_dim=8, capacity=10)
    args.update(kwargs)
    with pytest.raises(exc, match=match):
        KVCache(**args)


# ----------------------------------------------------------------------------------------------
# KVCache.attend: the decode fast path, against the float64 reference on the cache's content
# ----------------------------------------------------------------------------------------------


def _content(cache):
    """(keys, values) in position order as float64: what the kernels read (int8 dequantised exactly)."""
    keys, values = cache.ordered()

    def f64(x):
        if isinstance(x, QuantizedTensor):
            return (
                x.data.astype(np.float64) * np.repeat(x.scales.astype(np.float64), x.block, axis=-1)[..., : x.shape[-1]]
            )
        return x.astype(np.float64)

    return f64(keys), f64(values)


ATTEND_TOL = {np.dtype(np.float16): 2e-3, np.dtype(np.float32): 2e-5, np.dtype(np.float64): 1e-10}


@pytest.mark.parametrize("dtype,rotate", CASES, ids=CASE_IDS)
@pytest.mark.parametrize("qdtype", [np.float32, np.float16, np.float64])
@pytest.mark.parametrize("window", [None, 6])
@pytest.mark.parametrize("L", [1, 3])
def test_attend_matches_the_reference(dtype, rotate, qdtype, window, L):
    """attend against the float64 reference on the stored content (rotated where the cache rotates:
    the reference's query is rotated the same way, its output rotated back for rotated values)."""
    rng = np.random.default_rng(50)
    cache = KVCache(2, 2, 16, 64, dtype=dtype, window=window, rotate=rotate)
    for T in (5, 4, 1, L):  # the ring wraps (window 6) before the last chunk
        cache.append(randn(rng, (2, 2, T, 16)), randn(rng, (2, 2, T, 16)))
    q = q_in = randn(rng, (2, 6, L, 16), qdtype)
    keys, values = _content(cache)
    if window is not None and cache.wrapped and L > 1:
        with pytest.raises(ValueError, match="ring"):  # the first queries' keys were dropped
            cache.attend(q)
        return
    out = cache.attend(q)
    expected_dtype = np.result_type(qdtype, dtype) if np.dtype(dtype).kind == "f" else np.dtype(qdtype)
    assert out.dtype == expected_dtype and out.shape == (2, 6, L, 16)
    ref = cache_reference(cache, q, keys, values, is_causal="lower_right", enable_gqa=True, window=window)
    tol = ATTEND_TOL[np.dtype(out.dtype)]
    scale = max(1.0, float(np.abs(ref).max()))
    np.testing.assert_allclose(out.astype(np.float64), ref, rtol=tol, atol=tol * scale)
    # the same numbers as the general call on the cache's views (the query rotated by rotate_query, the
    # output rotated back by unrotate_output where the cache rotates)
    k, v = cache.ordered()
    general = cache_sdpa(cache, q_in, k, v, is_causal="lower_right", enable_gqa=True, window=window)
    np.testing.assert_allclose(out, general, rtol=tol, atol=tol * scale)


@pytest.mark.parametrize("dtype,rotate", CASES, ids=CASE_IDS)
def test_attend_into_out(dtype, rotate):
    rng = np.random.default_rng(51)
    cache = KVCache(1, 3, 64, 300, dtype=dtype, rotate=rotate)
    cache.append(randn(rng, (1, 3, 300, 64)), randn(rng, (1, 3, 300, 64)))
    q = randn(rng, (1, 9, 1, 64), np.float32)
    q_copy = q.copy()
    expected = cache.attend(q)
    out = np.full(expected.shape, np.nan, expected.dtype)
    assert cache.attend(q, out=out) is out
    np.testing.assert_array_equal(out, expected)
    np.testing.assert_array_equal(q, q_copy)
    for bad in (
        np.empty((1, 9, 1, 64), np.float16 if expected.dtype != np.float16 else np.float32),
        np.empty((1, 9, 2, 64), expected.dtype),
        np.empty((1, 9, 1, 128), expected.dtype)[..., ::2],
        [[0.0]],
    ):
        with pytest.raises(ValueError, match="out must be"):
            cache.attend(q, out=bad)


@pytest.mark.parametrize("dtype,rotate", CASES, ids=CASE_IDS)
@pytest.mark.parametrize("window", [None, 40])
@pytest.mark.parametrize("L", [1, 2])
def test_attend_decode_steps_take_the_lean_path(dtype, rotate, window, L, monkeypatch):
    """Decode steps as a model runs them (append, then attend(q) alone): the first call goes through the
    general path, the later ones with a query of that dtype and shape through api.attend_lean (attend_cache
    is not called again; a cache that rotates its values rotates the result back there) unless the cache
    computes in another dtype than the query's, all with the reference's numbers, across
    a ring's wrap; on a wrapped ring a query of L > 1 tokens still gets the general path's refusal."""
    from numba_attn import api

    rng = np.random.default_rng(53)
    cache = KVCache(1, 2, 32, 120, dtype=dtype, window=window, rotate=rotate)
    cache.append(randn(rng, (1, 2, 34, 32)), randn(rng, (1, 2, 34, 32)))
    general = []
    real = api.attend_cache
    monkeypatch.setattr(api, "attend_cache", lambda *a, **k: general.append(1) or real(*a, **k))
    answered = 0
    for _ in range(10):  # 34 + 10·L tokens: a window of 40 wraps
        cache.append(randn(rng, (1, 2, L, 32)), randn(rng, (1, 2, L, 32)))
        q = randn(rng, (1, 6, L, 32), np.float32)
        if window is not None and cache.wrapped and L > 1:
            with pytest.raises(ValueError, match="ring"):
                cache.attend(q)
            continue
        out = cache.attend(q)
        keys, values = _content(cache)
        ref = cache_reference(cache, q, keys, values, is_causal="lower_right", enable_gqa=True, window=window)
        scale = max(1.0, float(np.abs(ref).max()))
        np.testing.assert_allclose(out.astype(np.float64), ref, rtol=2e-5, atol=2e-5 * scale)
        answered += 1
    # (a float64 cache computes in float64: a float32 query is converted on the general path)
    lean = np.dtype(dtype) != np.float64
    assert len(general) == (1 if lean else answered)
    # a query the lean path does not take (not C-contiguous) and a forgotten cache: the general path answers
    q = randn(rng, (1, 6, 2 * L, 32), np.float32)[:, :, ::2]
    if not (window is not None and cache.wrapped and L > 1):
        np.testing.assert_array_equal(cache.attend(q), cache.attend(np.ascontiguousarray(q)))
    cache.reset()
    with pytest.raises(ValueError, match="append the new tokens"):
        cache.attend(np.ascontiguousarray(q))


def test_lean_attend_reuses_entry_points_and_scratch_safely(monkeypatch):
    """Lean calls reuse the plan's compiled entry points and the kernel's lse/check arrays: the numbers stay
    the reference's when a step turns from serial to parallel (a split key range) and back, every call
    returns a new array (an earlier result is not overwritten), an unaligned query (numba types it apart)
    takes the general path with the same numbers, and a non-finite query is still refused."""
    from numba_attn import api, config

    rng = np.random.default_rng(57)
    cache = KVCache(1, 2, 32, 400)
    cache.append(randn(rng, (1, 2, 300, 32)), randn(rng, (1, 2, 300, 32)))
    general = []
    real = api.attend_cache
    monkeypatch.setattr(api, "attend_cache", lambda *a, **k: general.append(1) or real(*a, **k))
    results = []
    for serial_below in [config.SERIAL_BELOW_FLOPS, 1, 1, config.SERIAL_BELOW_FLOPS, 1]:
        monkeypatch.setattr(config, "SERIAL_BELOW_FLOPS", serial_below)  # 1: every call parallel, split
        cache.append(randn(rng, (1, 2, 1, 32)), randn(rng, (1, 2, 1, 32)))
        q = randn(rng, (1, 6, 1, 32), np.float32)
        out = cache.attend(q)
        keys, values = _content(cache)
        ref = cache_reference(cache, q, keys, values, is_causal="lower_right", enable_gqa=True)
        np.testing.assert_allclose(out.astype(np.float64), ref, rtol=2e-5, atol=2e-5)
        results.append((out, out.copy()))
    assert len(general) == 1
    for out, copy in results:
        np.testing.assert_array_equal(out, copy)
    plan = cache._lean[(np.dtype(np.float32), (1, 6, 1, 32))]
    assert len(plan[-1]) == 2  # an entry point for each of the serial and the parallel kernel
    buffer = bytearray(q.nbytes + 1)
    unaligned = np.ndarray(q.shape, np.float32, buffer=buffer, offset=1)
    unaligned[...] = q
    assert not unaligned.flags.aligned
    np.testing.assert_array_equal(cache.attend(unaligned), cache.attend(q))
    assert len(general) == 2
    q[0, 3, 0, 5] = np.nan
    with pytest.raises(ValueError, match="query"):
        cache.attend(q)


def test_attend_window_that_hides_no_key_is_no_window():
    """A window at least as long as what the cache holds changes nothing: attend passes the kernels no
    window (their build without the score features) and gives the numbers of a cache without one."""
    rng = np.random.default_rng(54)
    k, v = randn(rng, (1, 2, 50, 32)), randn(rng, (1, 2, 50, 32))
    windowed, plain = KVCache(1, 2, 32, 64, window=60), KVCache(1, 2, 32, 64)
    for cache in (windowed, plain):
        cache.append(k, v)
    for L in (1, 3, 20):
        q = randn(rng, (1, 4, L, 32), np.float32)
        np.testing.assert_array_equal(windowed.attend(q), plain.attend(q))
        np.testing.assert_array_equal(windowed.attend(q, window=50), plain.attend(q))


def test_attend_options_match_the_general_call():
    from numba_attn import scaled_dot_product_attention

    rng = np.random.default_rng(52)
    cache = KVCache(1, 2, 32, 400)
    cache.append(randn(rng, (1, 2, 300, 32)), randn(rng, (1, 2, 300, 32)))
    q = randn(rng, (1, 4, 2, 32), np.float32)
    slopes = np.array([0.5, 0.25, 0.125, 0.0625])
    kw = dict(scale=0.3, window=40, alibi_slopes=slopes, softcap=5.0)
    out = cache.attend(q, **kw)
    general = scaled_dot_product_attention(q, cache.keys, cache.values, is_causal="lower_right", enable_gqa=True, **kw)
    np.testing.assert_allclose(out, general, rtol=1e-5, atol=1e-6)


def test_attend_refuses_bad_queries_and_arguments():
    cache = KVCache(2, 2, 8, 10)
    cache.append(np.ones((2, 2, 3, 8)), np.ones((2, 2, 3, 8)))
    good = np.ones((2, 4, 1, 8), np.float32)
    for q, exc, match in (
        (good.astype(np.int32), TypeError, "query"),
        (np.ones((2, 3, 1, 8)), ValueError, "query"),
        (np.ones((1, 4, 1, 8)), ValueError, "query"),
        (np.ones((2, 4, 1, 7)), ValueError, "query"),
        (np.ones((4, 1, 8)), ValueError, "query"),
        (np.ones((2, 4, 4, 8)), ValueError, "append"),
    ):
        with pytest.raises(exc, match=match):
            cache.attend(q)
    for kw, match in (
        (dict(window=0), "window"),
        (dict(softcap=-1.0), "softcap"),
        (dict(scale=0.0), "scale"),
        (dict(alibi_slopes=np.ones(3)), "alibi_slopes"),
    ):
        with pytest.raises(ValueError, match=match):
            cache.attend(good, **kw)
    bad = good.copy()
    bad[0, 1, 0, 2] = np.nan
    with pytest.raises(ValueError, match="query"):
        cache.attend(bad)


@pytest.mark.parametrize("is_causal", [True, "upper_left"])
def test_top_left_causal_on_cache_views_is_refused(is_causal):
    """The silent trap: torch's is_causal=True on a cache's keys attends a decode step to key 0 only."""
    from numba_attn import scaled_dot_product_attention

    for dtype, rotate in ((np.float32, None), (np.int8, False), (np.int8, None)):
        cache = KVCache(1, 2, 8, 10, dtype=dtype, rotate=rotate)
        cache.append(np.ones((1, 2, 5, 8)), np.ones((1, 2, 5, 8)))
        q = cache.rotate_query(np.ones((1, 2, 1, 8)))  # (int8 keys are rotated by default: the query too)
        with pytest.raises(ValueError, match="lower_right"):
            scaled_dot_product_attention(q, cache.keys, cache.values, is_causal=is_causal)
        scaled_dot_product_attention(q, cache.keys, cache.values, is_causal="lower_right")
    # plain arrays keep torch's meaning
    k = np.ones((1, 2, 5, 8))
    scaled_dot_product_attention(np.ones((1, 2, 1, 8)), k, k, is_causal=is_causal)


@pytest.mark.parametrize("dtype,rotate", CASES, ids=CASE_IDS)
@pytest.mark.parametrize("window", [None, 4])
@pytest.mark.parametrize("xdtype", [np.float32, np.float64, np.float16])
def test_serial_append_stores_what_the_numpy_path_stores(monkeypatch, dtype, rotate, window, xdtype):
    """Small appends take the serial kernels (kernels/cache_append.py): same bits as the numpy path."""
    from numba_attn import cache as cache_module

    rng = np.random.default_rng(53)
    serial, numpy_path = (
        KVCache(2, 3, 40, 50, dtype=dtype, window=window, rotate=rotate),
        KVCache(2, 3, 40, 50, dtype=dtype, window=window, rotate=rotate),
    )
    for T in (3, 1, 5, 1):
        k, v = randn(rng, (2, 3, T, 40), xdtype), randn(rng, (2, 3, T, 40), xdtype)
        monkeypatch.setattr(cache_module, "APPEND_SERIAL_ROWS", 10**6)
        serial.append(k, v)
        monkeypatch.setattr(cache_module, "APPEND_SERIAL_ROWS", 0)
        numpy_path.append(k, v)
    assert serial.length == numpy_path.length
    for a, b in (
        (serial._keys, numpy_path._keys),
        (serial._values, numpy_path._values),
        (serial._key_scales, numpy_path._key_scales),
        (serial._value_scales, numpy_path._value_scales),
    ):
        if a is not None:
            np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("dtype,rotate", CASES, ids=CASE_IDS)
@pytest.mark.parametrize("window", [None, 5])
def test_decode_step_appends_take_the_lean_path(monkeypatch, dtype, rotate, window):
    """Token-by-token appends of the same dtypes and shapes: after the first, KVCache._append_lean
    answers (_append_serial is not called again) and the cache holds what one append of all the tokens
    stores; on that path too a NaN is refused before anything changes, a non-contiguous token is
    stored like a contiguous one and a full cache refuses."""
    rng = np.random.default_rng(56)
    kw = dict(dtype=dtype, window=window, rotate=rotate)
    k, v = randn(rng, (1, 2, 12, 32), np.float32), randn(rng, (1, 2, 12, 32), np.float32)
    whole = KVCache(1, 2, 32, 13, **kw)
    whole.append(k[:, :, :11], v[:, :, :11])
    steps = KVCache(1, 2, 32, 13, **kw)
    calls = []
    real = KVCache._append_serial
    monkeypatch.setattr(KVCache, "_append_serial", lambda self, *a, **kws: calls.append(1) or real(self, *a, **kws))
    for t in range(10):
        steps.append(np.ascontiguousarray(k[:, :, t : t + 1]), np.ascontiguousarray(v[:, :, t : t + 1]))
    assert len(calls) == 1
    bad = np.ascontiguousarray(k[:, :, :1]).copy()
    bad[0, 1, 0, 3] = np.nan
    before = [np.copy(x) for x in (steps._keys, steps._values)]
    with pytest.raises(ValueError, match="NaN"):
        steps.append(bad, np.ascontiguousarray(v[:, :, :1]))
    assert steps.length == 10 and len(calls) == 1
    for a, b in zip(before, (steps._keys, steps._values)):
        np.testing.assert_array_equal(a, b)
    steps.append(k[:, :, 10:11], v[:, :, 10:11])  # a view, not C-contiguous: stored like a contiguous token
    for a, b in zip(whole.ordered(), steps.ordered()):
        a, b = (x.data if isinstance(x, QuantizedTensor) else x for x in (a, b))
        np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(whole.ordered_positions(), steps.ordered_positions())
    steps.append(np.ascontiguousarray(k[:, :, 11:]), np.ascontiguousarray(v[:, :, 11:]))
    if window is None:  # 12 of 13 slots held, then 2 more tokens: full
        with pytest.raises(ValueError, match="full"):
            steps.append(np.ascontiguousarray(k[:, :, :2]), np.ascontiguousarray(v[:, :, :2]))
        assert steps.length == 12
