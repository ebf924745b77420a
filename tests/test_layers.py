"""numba_attn.layers: MultiHeadAttention against torch.nn.MultiheadAttention and a plain numpy
reference; decoding through a KVCache equals one causal prefill; bad input."""

import numpy as np
import pytest

from conftest import KernelSpy, assert_close, assert_unchanged, copies, randn
from numba_attn import KVCache, MultiHeadAttention, config, reference

try:
    import torch
except ImportError:  # torch is optional: the comparisons with it are only collected when it is installed
    torch = None

TOL = {np.dtype(np.float32): 1e-5, np.dtype(np.float64): 1e-10}


# ----------------------------------------------------------------------------------------------
# the numpy reference of the whole layer
# ----------------------------------------------------------------------------------------------


def split_heads(y, n_heads, head_dim):
    B, T, _ = y.shape
    return y.reshape(B, T, n_heads, head_dim).transpose(0, 2, 1, 3)


def layer_reference(
    layer, x, context=None, mask=None, is_causal=False, window=None, alibi_slopes=None, softcap=None, rotary=None
):
    """x@W_q+b, heads, reference attention (``mask``: True = attend, broadcastable to (B, H, L, S)),
    merge, @W_o+b; everything in float64 from the layer's own weights."""
    f = np.float64
    src = x if context is None else context
    x, src = np.asarray(x, f), np.asarray(src, f)

    def proj(a, w, b):
        y = a @ w.astype(f)
        return y if b is None else y + b.astype(f)

    hd = layer.head_dim
    q = split_heads(proj(x, layer.w_q, layer.b_q), layer.num_heads, hd)
    k = split_heads(proj(src, layer.w_k, layer.b_k), layer.num_kv_heads, hd)
    v = split_heads(proj(src, layer.w_v, layer.b_v), layer.num_kv_heads, hd)
    if rotary is not None:
        q, k = rotary(q, k, np.arange(x.shape[1]))
    out = reference.scaled_dot_product_attention(
        q,
        k,
        v,
        attn_mask=mask,
        is_causal=is_causal,
        enable_gqa=layer.num_kv_heads != layer.num_heads,
        window=window,
        alibi_slopes=alibi_slopes,
        softcap=softcap,
    )
    B, _, L, _ = out.shape
    merged = out.transpose(0, 2, 1, 3).reshape(B, L, -1)
    return proj(merged, layer.w_o, layer.b_o)


def random_layer(embed_dim, num_heads, num_kv_heads=None, dtype=np.float32, seed=0, **kwargs):
    """A layer with random (non-zero) biases too."""
    layer = MultiHeadAttention(embed_dim, num_heads, num_kv_heads, dtype=dtype, seed=seed, **kwargs)
    rng = np.random.default_rng(seed + 100)
    for name in ("b_q", "b_k", "b_v", "b_o"):
        b = getattr(layer, name)
        if b is not None:
            b[...] = 0.1 * rng.standard_normal(b.shape)
    return layer


def rope(q, k, positions, base=10000.0):
    """Rotary position embedding (half-split form), deterministic in the absolute positions."""
    half = q.shape[-1] // 2
    angles = np.asarray(positions, np.float64)[:, None] * base ** (-np.arange(half) / half)[None, :]
    cos, sin = np.cos(angles), np.sin(angles)

    def rotate(x):
        x1, x2 = x[..., :half], x[..., half:]
        return np.concatenate([x1 * cos - x2 * sin, x1 * sin + x2 * cos], axis=-1).astype(x.dtype)

    return rotate(q), rotate(k)


# ----------------------------------------------------------------------------------------------
# against the numpy reference
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("heads,kv_heads", [(4, 4), (4, 2), (4, 1), (6, 3)])
def test_self_attention_matches_reference(dtype, heads, kv_heads):
    rng = np.random.default_rng(0)
    E = 48
    layer = random_layer(E, heads, kv_heads, dtype=dtype)
    assert layer.head_dim == E // heads
    assert layer.w_q.shape == (E, E) and layer.w_k.shape == (E, kv_heads * E // heads)
    x = randn(rng, (2, 9, E), dtype)
    before = copies(x)
    y = layer(x)
    assert_unchanged([x], before)
    assert y.shape == (2, 9, E) and y.dtype == np.dtype(dtype)
    assert_close(y, layer_reference(layer, x), dtype)
    # masks in torch.nn.MultiheadAttention's convention (True = masked out)
    kpm = np.zeros((2, 9), bool)
    kpm[1, :2] = True
    am = rng.random((9, 9)) < 0.3
    np.fill_diagonal(am, False)
    y = layer(x, key_padding_mask=kpm, attn_mask=am, is_causal=True)
    mask = ~kpm[:, None, None, :] & ~am
    assert_close(y, layer_reference(layer, x, mask=mask, is_causal=True), dtype)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("heads,kv_heads", [(4, 4), (4, 2), (4, 1)])
def test_cross_attention_matches_reference(dtype, heads, kv_heads):
    rng = np.random.default_rng(1)
    layer = random_layer(32, heads, kv_heads, dtype=dtype, kdim=20, vdim=20)
    x, ctx = randn(rng, (3, 5, 32), dtype), randn(rng, (3, 11, 20), dtype)
    y = layer(x, ctx)
    assert y.shape == (3, 5, 32)
    assert_close(y, layer_reference(layer, x, ctx), dtype)
    kpm = rng.random((3, 11)) < 0.3
    kpm[:, 0] = False
    y = layer(x, ctx, key_padding_mask=kpm)
    assert_close(y, layer_reference(layer, x, ctx, mask=~kpm[:, None, None, :]), dtype)
    # a fused (kdim = vdim = embed_dim) layer attends over a context of its own width too
    fused = random_layer(32, heads, kv_heads, dtype=dtype)
    ctx2 = randn(rng, (3, 11, 32), dtype)
    assert_close(fused(x, ctx2), layer_reference(fused, x, ctx2), dtype)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_masks_float_and_bool_and_shapes(dtype):
    rng = np.random.default_rng(2)
    B, H, L, E = 2, 4, 6, 32
    layer = random_layer(E, H, dtype=dtype)
    x = randn(rng, (B, L, E), dtype)
    kpm_bool = np.zeros((B, L), bool)
    kpm_bool[0, -2:] = True
    kpm_float = np.where(kpm_bool, -np.inf, 0.0) + 0.5 * rng.standard_normal((B, L))
    am_bool = np.triu(np.ones((L, L), bool), 1)
    am_float = rng.standard_normal((L, L))
    am_bhls = rng.random((B, H, L, L)) < 0.3
    am_bhls[..., 0] = False
    ref_mask_float = np.where(kpm_bool, -np.inf, 0.0)
    cases = [
        (dict(key_padding_mask=kpm_bool), ~kpm_bool[:, None, None, :]),
        (dict(key_padding_mask=kpm_float), kpm_float[:, None, None, :]),
        (dict(attn_mask=am_bool), ~am_bool),
        (dict(attn_mask=am_float), am_float),
        (dict(attn_mask=am_bhls), ~am_bhls),
        (dict(attn_mask=am_bhls.reshape(B * H, L, L)), ~am_bhls),
        (dict(attn_mask=am_float, key_padding_mask=kpm_bool), am_float + ref_mask_float[:, None, None, :]),
        (
            dict(attn_mask=am_bool, key_padding_mask=kpm_float),
            np.where(am_bool, -np.inf, 0.0) + kpm_float[:, None, None, :],
        ),
    ]
    for kwargs, mask in cases:
        y = layer(x, **kwargs)
        assert_close(y, layer_reference(layer, x, mask=mask), dtype)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_window_alibi_softcap_rotary(dtype):
    rng = np.random.default_rng(3)
    layer = random_layer(64, 4, 2, dtype=dtype)
    x = randn(rng, (2, 40, 64), dtype)
    slopes = 2.0 ** -np.arange(1, 5)
    y = layer(x, is_causal=True, window=7, alibi_slopes=slopes, softcap=15.0, rotary=rope)
    ref = layer_reference(layer, x, is_causal=True, window=7, alibi_slopes=slopes, softcap=15.0, rotary=rope)
    assert_close(y, ref, dtype)


@pytest.mark.parametrize("bias", [True, False])
def test_explicit_head_dim_and_bias(bias):
    rng = np.random.default_rng(4)
    layer = random_layer(40, 4, 2, head_dim=16, bias=bias)
    assert layer.w_q.shape == (40, 64) and layer.w_k.shape == (40, 32) and layer.w_o.shape == (64, 40)
    assert (layer.b_q is None) == (not bias)
    x = randn(rng, (1, 7, 40), np.float32)
    assert_close(layer(x), layer_reference(layer, x), np.float32)


def test_from_linear_weights_equals_from_torch_weights():
    """Hugging Face's (out, in) q/k/v/o weights and torch's packed in_proj_weight give the same layer."""
    rng = np.random.default_rng(5)
    E, H = 32, 4
    wq, wk, wv, wo = (randn(rng, (E, E), np.float32) / 6 for _ in range(4))
    bq, bk, bv, bo = (randn(rng, (E,), np.float32) for _ in range(4))
    hf = MultiHeadAttention.from_linear_weights(wq, wk, wv, wo, num_heads=H, q_bias=bq, k_bias=bk, v_bias=bv, o_bias=bo)
    packed = MultiHeadAttention.from_torch_weights(
        np.concatenate([wq, wk, wv]), np.concatenate([bq, bk, bv]), wo, bo, num_heads=H
    )
    for name in ("w_q", "w_k", "w_v", "w_o", "b_q", "b_k", "b_v", "b_o"):
        np.testing.assert_array_equal(getattr(hf, name), getattr(packed, name))
    np.testing.assert_array_equal(hf.w_q, wq.T)
    x = randn(rng, (2, 6, E), np.float32)
    np.testing.assert_array_equal(hf(x), packed(x))
    # the (out, in) layout means y = x @ W.T + b
    q = x @ wq.T + bq
    np.testing.assert_allclose(x @ hf.w_q + hf.b_q, q, rtol=1e-5, atol=1e-5)
    # no biases: bias=False
    nb = MultiHeadAttention.from_linear_weights(wq, wk, wv, wo, num_heads=H)
    assert nb.b_q is None and nb.b_o is None
    nb2 = MultiHeadAttention.from_torch_weights(np.concatenate([wq, wk, wv]), None, wo, None, num_heads=H)
    np.testing.assert_array_equal(nb(x), nb2(x))


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_from_linear_weights_gqa(dtype):
    rng = np.random.default_rng(6)
    E, H, Hkv, hd = 48, 6, 2, 8
    wq, wo = randn(rng, (H * hd, E), np.float32), randn(rng, (E, H * hd), np.float32)
    wk, wv = randn(rng, (Hkv * hd, E), np.float32), randn(rng, (Hkv * hd, E), np.float32)
    bk = randn(rng, (Hkv * hd,), np.float32)
    layer = MultiHeadAttention.from_linear_weights(
        wq, wk, wv, wo, num_heads=H, num_kv_heads=Hkv, k_bias=bk, dtype=dtype
    )
    assert (layer.num_heads, layer.num_kv_heads, layer.head_dim, layer.dtype) == (H, Hkv, hd, np.dtype(dtype))
    assert (layer.b_q == 0).all() and (layer.b_o == 0).all()  # biases left out stay zero
    x = randn(rng, (2, 5, E), dtype)
    f = np.float64
    q = split_heads(x @ wq.T.astype(f), H, hd)
    k = split_heads(x @ wk.T.astype(f) + bk, Hkv, hd)
    v = split_heads(x @ wv.T.astype(f), Hkv, hd)
    att = reference.scaled_dot_product_attention(q, k, v, enable_gqa=True, is_causal=True)
    ref = att.transpose(0, 2, 1, 3).reshape(2, 5, H * hd) @ wo.T.astype(f)
    assert_close(layer(x, is_causal=True), ref, dtype)


def test_load_checks_shapes():
    layer = MultiHeadAttention(16, 2, bias=False)
    w = np.zeros((16, 16))
    with pytest.raises(ValueError, match="w_q"):
        layer.load(np.zeros((16, 8)), w, w, w)
    with pytest.raises(ValueError, match="b_q"):
        layer.load(w, w, w, w, b_q=np.zeros(16))
    with pytest.raises(ValueError, match="w_o"):
        layer.load(w, w, w, np.full((16, 16), np.nan))
    layer.load(np.eye(16), w, w, w)
    np.testing.assert_array_equal(layer.w_q, np.eye(16))
    with pytest.raises(ValueError, match="in_proj_weight"):
        MultiHeadAttention.from_torch_weights(np.zeros((30, 16)), None, np.zeros((16, 16)), None, num_heads=2)


# ----------------------------------------------------------------------------------------------
# against torch.nn.MultiheadAttention
# ----------------------------------------------------------------------------------------------

if torch is not None:

    def torch_mha(E, H, dtype, seed=0, **kwargs):
        torch.manual_seed(seed)
        m = torch.nn.MultiheadAttention(E, H, batch_first=True, **kwargs)
        with torch.no_grad():  # torch starts biases at zero: make them count
            if m.in_proj_bias is not None:
                m.in_proj_bias.normal_(0, 0.1)
                m.out_proj.bias.normal_(0, 0.1)
        m.eval()
        return m.double() if dtype == np.float64 else m

    def run_torch(m, x, ctx=None, **kwargs):
        t = {
            key: torch.from_numpy(np.ascontiguousarray(val)) if isinstance(val, np.ndarray) else val
            for key, val in kwargs.items()
        }
        q = torch.from_numpy(x)
        kv = q if ctx is None else torch.from_numpy(ctx)
        with torch.no_grad():
            out, weights = m(q, kv, kv, need_weights=False, **t)
        assert weights is None
        return out.numpy()

    TORCH_MASKS = [
        "none",
        "kpm bool",
        "kpm float",
        "attn bool",
        "attn float",
        "attn (B*H, L, S)",
        "causal",
        "kpm bool + attn bool",
        "kpm float + attn float",
    ]

    def torch_mask_case(name, rng, B, H, L, S, dtype):
        """(kwargs for both, extra kwargs for torch only, extra kwargs for ours only)."""
        kpm_bool = rng.random((B, S)) < 0.3
        kpm_bool[:, 0] = False  # no fully-masked rows (torch gives NaN there)
        kpm_float = (rng.standard_normal((B, S)) + np.where(kpm_bool, -np.inf, 0.0)).astype(dtype)
        am_bool = rng.random((L, S)) < 0.3
        am_bool[:, 0] = False
        am_float = rng.standard_normal((L, S)).astype(dtype)
        am_3d = rng.random((B * H, L, S)) < 0.3
        am_3d[..., 0] = False
        causal = np.triu(np.ones((L, S), bool), 1)
        return {
            "none": ({}, {}, {}),
            "kpm bool": (dict(key_padding_mask=kpm_bool), {}, {}),
            "kpm float": (dict(key_padding_mask=kpm_float), {}, {}),
            "attn bool": (dict(attn_mask=am_bool), {}, {}),
            "attn float": (dict(attn_mask=am_float), {}, {}),
            "attn (B*H, L, S)": (dict(attn_mask=am_3d), {}, {}),
            # torch's is_causal is a hint that needs the causal attn_mask too
            "causal": ({}, dict(attn_mask=causal, is_causal=True), dict(is_causal=True)),
            "kpm bool + attn bool": (dict(key_padding_mask=kpm_bool, attn_mask=am_bool), {}, {}),
            "kpm float + attn float": (dict(key_padding_mask=kpm_float, attn_mask=am_float), {}, {}),
        }[name]

    @pytest.mark.parametrize("dtype", [np.float32, np.float64])
    @pytest.mark.parametrize("mask", TORCH_MASKS)
    def test_matches_torch_self_attention(dtype, mask):
        rng = np.random.default_rng(10)
        B, H, L, E = 2, 4, 7, 32
        m = torch_mha(E, H, dtype)
        layer = MultiHeadAttention.from_torch(m, dtype=dtype)
        assert layer.dtype == np.dtype(dtype) and layer._fused
        x = randn(rng, (B, L, E), dtype)
        both, theirs, ours = torch_mask_case(mask, rng, B, H, L, L, dtype)
        expected = run_torch(m, x, **both, **theirs)
        got = layer(x, **both, **ours)
        assert got.dtype == np.dtype(dtype)
        assert_close(got, expected, rtol=TOL[np.dtype(dtype)])

    @pytest.mark.parametrize("dtype", [np.float32, np.float64])
    @pytest.mark.parametrize("mask", ["none", "kpm bool", "attn float", "kpm float + attn float"])
    def test_matches_torch_cross_attention_kdim(dtype, mask):
        """kdim = vdim != embed_dim: torch keeps separate q/k/v projection weights."""
        rng = np.random.default_rng(11)
        B, H, L, S, E, K = 3, 2, 5, 9, 16, 12
        m = torch_mha(E, H, dtype, kdim=K, vdim=K)
        assert not m._qkv_same_embed_dim
        layer = MultiHeadAttention.from_torch(m, dtype=dtype)
        assert (layer.kdim, layer.vdim) == (K, K) and not layer._fused
        x, ctx = randn(rng, (B, L, E), dtype), randn(rng, (B, S, K), dtype)
        both, _, _ = torch_mask_case(mask, rng, B, H, L, S, dtype)
        expected = run_torch(m, x, ctx, **both)
        assert_close(layer(x, ctx, **both), expected, rtol=TOL[np.dtype(dtype)])

    @pytest.mark.parametrize("dtype", [np.float32, np.float64])
    def test_matches_torch_cross_attention_fused(dtype):
        rng = np.random.default_rng(12)
        m = torch_mha(24, 3, dtype)
        layer = MultiHeadAttention.from_torch(m, dtype=dtype)
        x, ctx = randn(rng, (2, 4, 24), dtype), randn(rng, (2, 13, 24), dtype)
        assert_close(layer(x, ctx), run_torch(m, x, ctx), rtol=TOL[np.dtype(dtype)])

    def test_matches_torch_without_bias():
        rng = np.random.default_rng(13)
        m = torch_mha(32, 8, np.float32, bias=False)
        layer = MultiHeadAttention.from_torch(m)
        assert layer.b_q is None and layer.b_o is None
        x = randn(rng, (2, 6, 32), np.float32)
        assert_close(layer(x), run_torch(m, x), rtol=1e-5)

    def test_from_torch_float32_module_into_float64_layer():
        rng = np.random.default_rng(14)
        m = torch_mha(16, 2, np.float32)
        layer = MultiHeadAttention.from_torch(m, dtype=np.float64)
        x = randn(rng, (1, 5, 16), np.float64)
        expected = run_torch(m.double(), x)
        assert_close(layer(x), expected, rtol=1e-10)


# ----------------------------------------------------------------------------------------------
# decoding through a KVCache equals one causal prefill
# ----------------------------------------------------------------------------------------------


def schedule(total):
    """Token counts per call: a prompt of 5, single tokens, a 3-token chunk, more single tokens, a 3 and
    an 8 near the end (after the split-K decode kernel has taken over), single tokens to the end."""
    steps = [5] + [1] * 95 + [3] + [1] * 190
    steps += [3, 8]
    steps += [1] * (total - sum(steps))
    assert sum(steps) == total and min(steps) >= 1
    return steps


def decode(layer, x, cache, steps, key_padding_mask=None, **kwargs):
    """Feed x through the layer chunk by chunk; returns the concatenated outputs."""
    outs, t = [], 0
    for n in steps:
        kw = dict(kwargs)
        if key_padding_mask is not None:
            kw["key_padding_mask"] = key_padding_mask[:, : t + n]
        outs.append(layer(x[:, t : t + n], cache=cache, **kw))
        t += n
        assert cache.length == t
    return np.concatenate(outs, axis=1)


T_DECODE = 320


@pytest.fixture
def split_k(monkeypatch):
    """Parallel kernels for every size, so that the split-K decode kernel runs (S >= 256, L <= 8)."""
    monkeypatch.setattr(config, "SERIAL_BELOW_FLOPS", 0)
    return KernelSpy(monkeypatch)


@pytest.mark.parametrize("heads,kv_heads", [(4, 4), (4, 2), (4, 1)])
@pytest.mark.parametrize("window", [None, 260, 16])
def test_cached_decode_equals_prefill(split_k, heads, kv_heads, window):
    rng = np.random.default_rng(20)
    layer = random_layer(64, heads, kv_heads)
    x = randn(rng, (2, T_DECODE, 64), np.float32)
    full = layer(x, is_causal=True, window=window)
    steps = schedule(T_DECODE)
    if window == 16:
        steps = [5, 1, 1, 20, 1, 3] + [1] * (T_DECODE - 31)  # a chunk longer than the window
    cache = layer.new_cache(batch=2, capacity=T_DECODE, window=window)
    assert cache.window == window and cache.dtype == np.float32
    got = decode(layer, x, cache, steps, window=window if window else None)
    assert_close(got, full, rtol=1e-5)
    if window != 16:
        assert split_k.calls["decode_parallel"] > 0
    if window:
        assert cache.wrapped and cache.n_valid == window


@pytest.mark.parametrize("window", [None, 260])
def test_cached_decode_float64(split_k, window):
    rng = np.random.default_rng(21)
    layer = random_layer(32, 4, 2, dtype=np.float64)
    x = randn(rng, (1, T_DECODE, 32), np.float64)
    full = layer(x, is_causal=True, window=window)
    cache = layer.new_cache(batch=1, capacity=T_DECODE, window=window)
    assert cache.dtype == np.float64
    assert_close(decode(layer, x, cache, schedule(T_DECODE)), full, rtol=1e-10)


@pytest.mark.parametrize("cache_dtype", [np.float16, np.int8])
@pytest.mark.parametrize("heads,kv_heads,window", [(4, 2, None), (4, 1, 260), (4, 4, None)])
def test_cached_decode_low_precision(split_k, cache_dtype, heads, kv_heads, window):
    """float16 and int8 caches against the float32 prefill (the error of storing K and V)."""
    rng = np.random.default_rng(22)
    layer = random_layer(64, heads, kv_heads)
    x = randn(rng, (2, T_DECODE, 64), np.float32)
    full = layer(x, is_causal=True, window=window).astype(np.float64)
    cache = layer.new_cache(batch=2, capacity=T_DECODE, window=window, dtype=cache_dtype)
    assert cache.dtype == np.dtype(cache_dtype)
    got = decode(layer, x, cache, schedule(T_DECODE))
    assert got.dtype == np.float32 and np.isfinite(got).all()
    err = np.abs(got - full)
    if cache_dtype == np.float16:
        assert err.max() <= 2e-3, err.max()
    else:
        rel = np.linalg.norm(got - full) / np.linalg.norm(full)
        assert rel <= 3e-2, rel
    assert split_k.calls["decode_parallel"] > 0


@pytest.mark.parametrize("window", [None, 260, 16])
def test_cached_decode_alibi_softcap(split_k, window):
    rng = np.random.default_rng(23)
    layer = random_layer(64, 4, 2)
    x = randn(rng, (2, T_DECODE, 64), np.float32)
    slopes = 2.0 ** -np.arange(1, 5)
    full = layer(x, is_causal=True, window=window, alibi_slopes=slopes, softcap=10.0)
    cache = layer.new_cache(batch=2, capacity=T_DECODE, window=window)
    got = decode(layer, x, cache, schedule(T_DECODE), alibi_slopes=slopes, softcap=10.0)
    assert_close(got, full, rtol=1e-5)


@pytest.mark.parametrize("window", [None, 260])
def test_cached_decode_rotary(split_k, window):
    rng = np.random.default_rng(24)
    layer = random_layer(64, 4, 2)
    x = randn(rng, (1, T_DECODE, 64), np.float32)
    full = layer(x, is_causal=True, window=window, rotary=rope)
    seen = []

    def recording_rope(q, k, positions):
        assert q.shape[2] == k.shape[2] == len(positions)
        seen.append(np.array(positions))
        return rope(q, k, positions)

    cache = layer.new_cache(batch=1, capacity=T_DECODE, window=window)
    steps = schedule(T_DECODE)
    got = decode(layer, x, cache, steps, rotary=recording_rope)
    assert_close(got, full, rtol=1e-5)
    # the rotary callable saw the absolute positions, chunk by chunk
    np.testing.assert_array_equal(np.concatenate(seen), np.arange(T_DECODE))
    assert [len(p) for p in seen] == steps
    # and it matters: without it the result differs
    plain = layer(x, is_causal=True, window=window)
    assert np.abs(plain - full).max() > 1e-3


@pytest.mark.parametrize("window", [None, 260])
def test_cached_decode_key_padding(split_k, window):
    """Left padding of one sequence: key_padding_mask covers every position so far."""
    rng = np.random.default_rng(25)
    layer = random_layer(64, 4, 2)
    x = randn(rng, (2, T_DECODE, 64), np.float32)
    pad = np.zeros((2, T_DECODE), bool)
    pad[1, :4] = True
    pad[0, 100:103] = True
    full = layer(x, is_causal=True, window=window, key_padding_mask=pad)
    cache = layer.new_cache(batch=2, capacity=T_DECODE, window=window)
    got = decode(layer, x, cache, schedule(T_DECODE), key_padding_mask=pad)
    assert_close(got, full, rtol=1e-5)


def test_cache_reset_and_reuse():
    rng = np.random.default_rng(26)
    layer = random_layer(32, 4, 2)
    x = randn(rng, (1, 12, 32), np.float32)
    cache = layer.new_cache(batch=1, capacity=12)
    first = decode(layer, x, cache, [5, 1, 1, 3, 2])
    cache.reset()
    again = decode(layer, x, cache, [12])
    assert_close(first, layer(x, is_causal=True), rtol=1e-5)
    assert_close(again, layer(x, is_causal=True), rtol=1e-5)


# ----------------------------------------------------------------------------------------------
# bad input
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "args,kwargs,exc,match",
    [
        ((64, 4), dict(num_kv_heads=3), ValueError, "num_kv_heads"),
        ((64, 4), dict(num_kv_heads=8), ValueError, "num_kv_heads"),
        ((30, 4), {}, ValueError, "head_dim"),
        ((0, 4), {}, ValueError, "embed_dim"),
        ((64, 0), {}, ValueError, "num_heads"),
        ((64, 4.0), {}, ValueError, "num_heads"),
        ((64, 4), dict(head_dim=0), ValueError, "head_dim"),
        ((64, 4), dict(kdim=-1), ValueError, "kdim"),
        ((64, 4), dict(vdim=0), ValueError, "vdim"),
        ((64, 4), dict(dtype=np.float16), TypeError, "dtype"),
        ((64, 4), dict(dtype=np.int32), TypeError, "dtype"),
    ],
)
def test_bad_constructor_arguments(args, kwargs, exc, match):
    with pytest.raises(exc, match=match):
        MultiHeadAttention(*args, **kwargs)


def test_kdim_differing_from_vdim_is_refused():
    """One ``context`` feeds both the K and the V projection, so a layer with kdim != vdim could never
    be called: it must be refused when built, naming the arguments (not fail later inside numpy)."""
    with pytest.raises(ValueError, match="vdim"):
        MultiHeadAttention(32, 4, kdim=24, vdim=20)


@pytest.fixture
def gqa_layer():
    return random_layer(32, 4, 2)


def _x(B=2, L=3, E=32, dtype=np.float32):
    return np.ones((B, L, E), dtype) * np.linspace(-1, 1, E, dtype=np.float32)


@pytest.mark.parametrize(
    "x,exc,match",
    [
        (np.ones((2, 3, 31), np.float32), ValueError, "x must have shape"),
        (np.ones((3, 32), np.float32), ValueError, "x must have shape"),
        (np.ones((1, 2, 3, 32), np.float32), ValueError, "x must have shape"),
        (np.ones((2, 3, 32), np.int64), TypeError, "x must be a floating"),
        (np.full((2, 3, 32), np.nan, np.float32), ValueError, "x contains NaN"),
    ],
)
def test_bad_x(gqa_layer, x, exc, match):
    with pytest.raises(exc, match=match):
        gqa_layer(x)


def test_bad_context(gqa_layer):
    with pytest.raises(ValueError, match="context must have batch"):
        gqa_layer(_x(B=2), np.ones((3, 5, 32), np.float32))
    with pytest.raises(ValueError, match="context must have shape"):
        gqa_layer(_x(), np.ones((2, 5, 31), np.float32))
    with pytest.raises(TypeError, match="context"):
        gqa_layer(_x(), np.ones((2, 5, 32), np.int32))
    cache = gqa_layer.new_cache(2, 10)
    with pytest.raises(ValueError, match=r"context.*cache"):
        gqa_layer(_x(), np.ones((2, 5, 32), np.float32), cache=cache)
    assert cache.length == 0
    cross = random_layer(32, 4, kdim=16, vdim=16)
    with pytest.raises(ValueError, match="context"):
        cross(_x())


@pytest.mark.parametrize(
    "kwargs,exc,match",
    [
        (dict(key_padding_mask=np.zeros((2, 2), bool)), ValueError, "key_padding_mask"),
        (dict(key_padding_mask=np.zeros((3, 3), bool)), ValueError, "key_padding_mask"),
        (dict(key_padding_mask=np.zeros(3, bool)), ValueError, "key_padding_mask"),
        (dict(key_padding_mask=np.zeros((2, 3), np.int32)), TypeError, "key_padding_mask"),
        (dict(attn_mask=np.zeros((3, 4), bool)), ValueError, "attn_mask"),
        (dict(attn_mask=np.zeros((4, 3), bool)), ValueError, "attn_mask"),
        (dict(attn_mask=np.zeros((9, 3, 3), bool)), ValueError, "attn_mask"),
        (dict(attn_mask=np.zeros((2, 3, 3, 3), bool)), ValueError, "attn_mask"),
        (dict(attn_mask=np.zeros((3, 3), np.int8)), TypeError, "attn_mask"),
        (dict(attn_mask=np.full((3, 3), np.nan)), ValueError, "attn_mask"),
        (dict(is_causal="diagonal"), ValueError, "is_causal"),
        (dict(window=0, is_causal=True), ValueError, "window"),
        (dict(window=-2, is_causal=True), ValueError, "window"),
        (dict(window=4), ValueError, "window"),
        (dict(alibi_slopes=np.ones(3)), ValueError, "alibi_slopes"),
        (dict(softcap=0.0), ValueError, "softcap"),
    ],
)
def test_bad_call_arguments(gqa_layer, kwargs, exc, match):
    with pytest.raises(exc, match=match):
        gqa_layer(_x(), **kwargs)


def _filled_cache(layer, rng, capacity=10, window=None, dtype=None, n=4):
    cache = layer.new_cache(2, capacity, window=window, dtype=dtype)
    layer(randn(rng, (2, n, 32), np.float32), cache=cache)
    return cache


def _state(cache):
    keys, values = cache.ordered()
    return cache.length, np.array(keys), np.array(values)


def _assert_state(cache, state):
    length, keys, values = state
    assert cache.length == length
    k, v = cache.ordered()
    np.testing.assert_array_equal(k, keys)
    np.testing.assert_array_equal(v, values)


@pytest.mark.parametrize("window", [None, 3])
def test_capacity_overflow_through_the_layer_writes_nothing(gqa_layer, window):
    rng = np.random.default_rng(30)
    cache = _filled_cache(gqa_layer, rng, capacity=6, window=window)
    state = _state(cache)
    with pytest.raises(ValueError, match="capacity"):
        gqa_layer(randn(rng, (2, 3, 32), np.float32), cache=cache)
    _assert_state(cache, state)
    gqa_layer(randn(rng, (2, 2, 32), np.float32), cache=cache)  # the rest still fits
    assert cache.length == 6


def test_cache_that_does_not_fit_the_layer(gqa_layer):
    x = _x()
    for cache, match in (
        (KVCache(2, 2, 9, 10), "head_dim"),
        (KVCache(2, 4, 8, 10), "num_kv_heads"),
        (KVCache(3, 2, 8, 10), "batch"),
        (KVCache(2, 2, 8, 10, value_dim=4), "head_dim"),
    ):
        with pytest.raises(ValueError, match=match):
            gqa_layer(x, cache=cache)
        assert cache.length == 0
    # dtype: a float64 layer takes float64 caches only; a float32 layer float32/float16/int8
    layer64 = random_layer(32, 4, 2, dtype=np.float64)
    for dtype in (np.float32, np.float16, np.int8):
        cache = KVCache(2, 2, 8, 10, dtype=dtype)
        with pytest.raises(TypeError, match=r"cache (key_)?dtype"):  # (the message names key_dtype/value_dtype)
            layer64(x.astype(np.float64), cache=cache)
        assert cache.length == 0
    cache = KVCache(2, 2, 8, 10, dtype=np.float64)
    with pytest.raises(TypeError, match=r"cache (key_)?dtype"):
        gqa_layer(x, cache=cache)
    assert cache.length == 0


@pytest.mark.parametrize("cache", [{"keys": []}, "cache", 5])
def test_cache_must_be_a_kvcache(gqa_layer, cache):
    with pytest.raises(TypeError, match=r"cache must be a numba_attn\.KVCache"):
        gqa_layer(_x(), cache=cache)


def test_window_must_match_the_cache(gqa_layer):
    rng = np.random.default_rng(32)
    with pytest.raises(ValueError, match="window"):
        gqa_layer.new_cache(2, 10, window=0)
    for window, call_window in ((None, 4), (4, 5), (4, 0), (None, -1)):
        cache = _filled_cache(gqa_layer, rng, window=window, n=2)
        state = _state(cache)
        with pytest.raises(ValueError, match="window"):
            gqa_layer(randn(rng, (2, 1, 32), np.float32), cache=cache, window=call_window)
        _assert_state(cache, state)
    cache = _filled_cache(gqa_layer, rng, window=4, n=2)
    gqa_layer(randn(rng, (2, 1, 32), np.float32), cache=cache, window=4)  # the same window is fine
    assert cache.length == 3


@pytest.mark.parametrize("window", [None, 5])
@pytest.mark.parametrize(
    "kwargs",
    [
        dict(key_padding_mask=np.zeros((2, 3), bool)),  # must cover 4 + 2 positions
        dict(attn_mask=np.zeros((2, 6), np.int64)),
        dict(alibi_slopes=np.ones(3)),
    ],
    ids=["key_padding_mask shape", "attn_mask dtype", "alibi_slopes shape"],
)
def test_rejected_cached_call_leaves_the_cache_alone(gqa_layer, window, kwargs):
    """A call that raises must not have appended its tokens: the caller cannot retry or go on."""
    rng = np.random.default_rng(33)
    cache = _filled_cache(gqa_layer, rng, window=window)
    state = _state(cache)
    with pytest.raises((ValueError, TypeError)):
        gqa_layer(randn(rng, (2, 2, 32), np.float32), cache=cache, **kwargs)
    _assert_state(cache, state)


# ----------------------------------------------------------------------------------------------
# refused calls leave the cache alone (everything refusable is checked before the cache changes)
# ----------------------------------------------------------------------------------------------


def _nan_float_mask(shape, bad):
    m = np.zeros(shape, np.float32)
    m.flat[-1] = bad
    return m


@pytest.mark.parametrize("bad", [np.nan, np.inf])
@pytest.mark.parametrize("which", ["attn_mask", "key_padding_mask"])
@pytest.mark.parametrize("window", [None, 3])
def test_cached_call_refuses_non_finite_float_masks_before_appending(bad, which, window):
    """A float attn_mask/key_padding_mask holding NaN or +inf was refused inside the attention call,
    after cache.append: the cache's length went 0 -> 2 on a call that raised."""
    layer = random_layer(32, 4, 2)
    cache = layer.new_cache(1, 16, window=window)
    rng = np.random.default_rng(40)
    layer(randn(rng, (1, 2, 32), np.float32), cache=cache)
    before = (cache.length, np.array(cache._keys, copy=True), np.array(cache._values, copy=True))
    x = randn(rng, (1, 2, 32), np.float32)
    mask = _nan_float_mask((2, 4) if which == "attn_mask" else (1, 4), bad)
    with pytest.raises(ValueError, match=which):
        layer(x, cache=cache, **{which: mask})
    assert cache.length == before[0]
    np.testing.assert_array_equal(cache._keys, before[1])
    np.testing.assert_array_equal(cache._values, before[2])


def test_uncached_call_names_the_non_finite_key_padding_mask():
    layer = random_layer(32, 4)
    x = randn(np.random.default_rng(41), (2, 3, 32), np.float32)
    with pytest.raises(ValueError, match="key_padding_mask"):
        layer(x, key_padding_mask=_nan_float_mask((2, 3), np.nan))


@pytest.mark.parametrize("use_cache", [False, True])
def test_layer_checks_is_causal(use_cache):
    """A cached call ignored an invalid is_causal ("sideways" was accepted)."""
    layer = random_layer(32, 4)
    cache = layer.new_cache(2, 8) if use_cache else None
    x = randn(np.random.default_rng(42), (2, 3, 32), np.float32)
    with pytest.raises(ValueError, match="is_causal"):
        layer(x, cache=cache, is_causal="sideways")
    if use_cache:
        assert cache.length == 0


def test_cached_call_refuses_a_misshapen_4d_attn_mask_before_appending():
    layer = random_layer(32, 4)
    cache = layer.new_cache(2, 8)
    x = randn(np.random.default_rng(43), (2, 3, 32), np.float32)
    with pytest.raises(ValueError, match="attn_mask"):
        layer(x, cache=cache, attn_mask=np.zeros((3, 4, 3, 3), bool))
    assert cache.length == 0


def test_cached_call_refuses_masks_that_add_up_to_inf():
    layer = random_layer(32, 4)
    cache = layer.new_cache(1, 8)
    x = randn(np.random.default_rng(44), (1, 2, 32), np.float32)
    big = np.full((1, 2), 3e38, np.float32)
    with pytest.raises(ValueError, match="overflows"):
        layer(x, cache=cache, key_padding_mask=big, attn_mask=np.full((2, 2), 3e38, np.float32))
    assert cache.length == 0


# ----------------------------------------------------------------------------------------------
# quantised projection weights (LinearWeight inside the layer)
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("weight_dtype", ["float16", "int8", "int4"])
@pytest.mark.parametrize("num_kv_heads", [4, 2])
@pytest.mark.parametrize("cross", [False, True])
def test_quantized_weights_compute_with_the_effective_weights(weight_dtype, num_kv_heads, cross):
    """A layer with float16/int8/int4 projections equals a float32 layer holding the effective
    (dequantised) weights, with and without a cache, and quantize_weights("float32") restores it."""
    from numba_attn import LinearWeight

    kdim = 24 if cross else None
    layer = random_layer(32, 4, num_kv_heads, kdim=kdim, vdim=kdim, seed=3)
    rng = np.random.default_rng(60)
    x = randn(rng, (2, 5, 32), np.float32)
    ctx = randn(rng, (2, 7, 24), np.float32) if cross else None
    before = layer(x, ctx)
    effective = random_layer(32, 4, num_kv_heads, kdim=kdim, vdim=kdim, seed=3)
    effective.load(
        *(LinearWeight(w, dtype=weight_dtype).dequantize() for w in (layer.w_q, layer.w_k, layer.w_v, layer.w_o))
    )
    assert layer.quantize_weights(weight_dtype) is layer
    assert layer.weight_dtype == (weight_dtype if weight_dtype == "int4" else np.dtype(weight_dtype))
    out = layer(x, ctx)
    assert out.dtype == np.float32
    # int8/int4 projections also round their input rows to int16 per block of 32 (|δx| ≤ max|x_block| / 65534,
    # numba_attn.linear): through two projections that moves these outputs by up to ~1e-4 of their scale
    rtol = 2e-5 if weight_dtype == "float16" else 2e-4
    assert_close(out, effective(x, ctx).astype(np.float64), rtol=rtol)
    if not cross:
        cache, ref_cache = layer.new_cache(2, 16), effective.new_cache(2, 16)
        for T in (5, 1, 1):
            xt = randn(rng, (2, T, 32), np.float32)
            assert_close(layer(xt, cache=cache), effective(xt, cache=ref_cache).astype(np.float64), rtol=rtol)
    layer.quantize_weights("float32")
    np.testing.assert_array_equal(layer(x, ctx), before)


def test_load_repacks_quantized_weights():
    layer = random_layer(32, 4, seed=4).quantize_weights("int8")
    other = random_layer(32, 4, seed=5)
    layer.load(other.w_q, other.w_k, other.w_v, other.w_o, other.b_q, other.b_k, other.b_v, other.b_o)
    x = randn(np.random.default_rng(61), (1, 3, 32), np.float32)
    assert_close(layer(x), other.quantize_weights("int8")(x).astype(np.float64), rtol=1e-6)


def test_quantize_weights_refuses_unknown_dtypes():
    layer = random_layer(32, 4)
    for bad in ("int3", np.int16, "bfloat16"):
        with pytest.raises((TypeError, ValueError), match="dtype"):
            layer.quantize_weights(bad)
    assert layer.weight_dtype == np.float32
