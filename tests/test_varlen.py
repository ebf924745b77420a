"""numba_attn.varlen: packed batches of different lengths against the float64 reference, the padded
computation and the layer."""

import itertools

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import assert_close, assert_unchanged, copies, rtol_for
from numba_attn import (
    MultiHeadAttention,
    config,
    quantize,
    reference,
    scaled_dot_product_attention,
    scaled_dot_product_attention_varlen,
)
from numba_attn.varlen import work_table

CAUSAL = (False, True, "upper_left", "lower_right")


def offsets(lengths):
    return np.concatenate([[0], np.cumsum(lengths, dtype=np.int64)]).astype(np.int64)


def packed(rng, lengths_q, lengths_k, H, Hkv, E, Ev, dtype=np.float32):
    q = rng.standard_normal((int(sum(lengths_q)), H, E)).astype(dtype)
    k = rng.standard_normal((int(sum(lengths_k)), Hkv, E)).astype(dtype)
    v = rng.standard_normal((int(sum(lengths_k)), Hkv, Ev)).astype(dtype)
    return q, k, v, offsets(lengths_q), offsets(lengths_k)


@pytest.fixture(params=["serial", "parallel"])
def path(request, monkeypatch):
    """Both builds of the kernel (the API picks serial for small work), and small blocks so that short
    sequences still span several query and key blocks."""
    monkeypatch.setattr(config, "SERIAL_BELOW_FLOPS", 1 << 62 if request.param == "serial" else 0)
    return request.param


@pytest.fixture
def small_blocks(monkeypatch):
    monkeypatch.setattr(config, "PREFILL_BLOCK_Q", 16)
    monkeypatch.setattr(config, "PREFILL_BLOCK_Q_LARGE", 32)
    monkeypatch.setattr(config, "PREFILL_BLOCK_K", 16)


# ----------------------------------------------------------------------------------------------
# against the float64 reference
# ----------------------------------------------------------------------------------------------

#: (query, key/value) storage; the arithmetic is float64 if either is, else float32
STORAGE = [
    (np.float32, np.float32),
    (np.float64, np.float64),
    (np.float16, np.float16),
    (np.float32, np.float16),
    (np.float32, np.float64),
]
seq_lengths = st.one_of(st.integers(0, 3), st.integers(0, 40), st.integers(0, 140))


@st.composite
def varlen_cases(draw):
    B = draw(st.integers(0, 5))
    lq = draw(st.lists(seq_lengths, min_size=B, max_size=B))
    same = draw(st.booleans())
    lk = lq if same else draw(st.lists(seq_lengths, min_size=B, max_size=B))
    Hkv = draw(st.sampled_from([1, 2, 3]))
    H = Hkv * draw(st.sampled_from([1, 2, 3]))
    E = draw(st.sampled_from([1, 4, 16, 17, 32, 64]))
    Ev = draw(st.sampled_from([1, 3, 16, 32, 64]))
    causal = draw(st.sampled_from(CAUSAL))
    window = draw(st.sampled_from([None, 1, 5, 33])) if causal else None
    alibi = draw(st.booleans())
    softcap = draw(st.sampled_from([None, None, 2.0, 30.0]))
    sinks = draw(st.booleans())
    scale = draw(st.sampled_from([None, 0.05, 0.5]))
    storage = draw(st.sampled_from(STORAGE))
    seed = draw(st.integers(0, 2**31))
    return dict(
        lq=lq, lk=lk, H=H, Hkv=Hkv, E=E, Ev=Ev, causal=causal, window=window, alibi=alibi, softcap=softcap,
        sinks=sinks, scale=scale, storage=storage, seed=seed,
    )  # fmt: skip


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(case=varlen_cases())
def test_matches_reference(case, path, small_blocks):
    rng = np.random.default_rng(case["seed"])
    q_dt, kv_dt = case["storage"]
    q, k, v, cu_q, cu_k = packed(rng, case["lq"], case["lk"], case["H"], case["Hkv"], case["E"], case["Ev"])
    q, k, v = q.astype(q_dt), k.astype(kv_dt), v.astype(kv_dt)
    slopes = rng.uniform(0.01, 0.5, case["H"]) if case["alibi"] else None
    kw = dict(
        is_causal=case["causal"],
        scale=case["scale"],
        window=case["window"],
        alibi_slopes=slopes,
        softcap=case["softcap"],
        sinks=rng.uniform(-4, 4, case["H"]) if case["sinks"] else None,
    )
    originals = copies(q, k, v, cu_q, cu_k)
    out, lse = scaled_dot_product_attention_varlen(q, k, v, cu_q, cu_k, return_lse=True, out_dtype=np.float64, **kw)
    assert_unchanged([q, k, v, cu_q, cu_k], originals)
    ref, ref_lse = reference.scaled_dot_product_attention_varlen(q, k, v, cu_q, cu_k, return_lse=True, **kw)
    compute = np.float64 if np.float64 in (q_dt, kv_dt) else np.float32
    assert out.shape == (q.shape[0], case["H"], case["Ev"]) and lse.shape == q.shape[:2]
    assert lse.dtype == compute
    assert_close(out, ref, dtype=compute)
    assert_close(lse, ref_lse, dtype=compute)


@pytest.mark.parametrize("causal", CAUSAL)
def test_result_dtype_follows_the_inputs(causal):
    rng = np.random.default_rng(1)
    q, k, v, cu_q, cu_k = packed(rng, [5, 0, 9], [7, 3, 9], 4, 2, 16, 8)
    for q_dt, kv_dt, want in [
        (np.float16, np.float16, np.float16),
        (np.float32, np.float16, np.float32),
        (np.float64, np.float32, np.float64),
    ]:
        args = (q.astype(q_dt), k.astype(kv_dt), v.astype(kv_dt), cu_q, cu_k)
        out = scaled_dot_product_attention_varlen(*args, is_causal=causal)
        assert out.dtype == want
        ref = reference.scaled_dot_product_attention_varlen(*args, is_causal=causal)
        assert_close(out, ref, rtol=rtol_for(np.float32) if want != np.float16 else 1e-3)
        assert scaled_dot_product_attention_varlen(*args, is_causal=causal, out_dtype=np.float64).dtype == np.float64


def test_queries_without_keys_get_zeros_and_minus_inf(path):
    """Empty key sets (S_b = 0), rows that a lower-right diagonal leaves keyless, empty query sets."""
    rng = np.random.default_rng(2)
    q, k, v, cu_q, cu_k = packed(rng, [4, 0, 6, 3], [0, 5, 2, 3], 2, 2, 8, 8)
    out, lse = scaled_dot_product_attention_varlen(q, k, v, cu_q, cu_k, is_causal="lower_right", return_lse=True)
    assert (out[:4] == 0).all() and np.isneginf(lse[:4]).all()  # sequence 0 has no keys
    assert (out[4:8] == 0).all() and np.isneginf(lse[4:8]).all()  # sequence 2: rows 0-3 see no key (S - L = -4)
    assert np.isfinite(lse[8:]).all()
    ref = reference.scaled_dot_product_attention_varlen(q, k, v, cu_q, cu_k, is_causal="lower_right")
    assert_close(out, ref)


def test_sinks_on_queries_without_keys(path):
    """A learned sink takes the whole softmax of a keyless row: zeros, lse = the sink."""
    rng = np.random.default_rng(12)
    q, k, v, cu_q, cu_k = packed(rng, [4, 0, 6, 3], [0, 5, 2, 3], 2, 2, 8, 8)
    sinks = np.array([0.5, -1.5])
    out, lse = scaled_dot_product_attention_varlen(
        q, k, v, cu_q, cu_k, is_causal="lower_right", sinks=sinks, return_lse=True
    )
    assert (out[:4] == 0).all()
    np.testing.assert_allclose(lse[:4], np.broadcast_to(sinks, (4, 2)), rtol=1e-7)
    ref, ref_lse = reference.scaled_dot_product_attention_varlen(
        q, k, v, cu_q, cu_k, is_causal="lower_right", sinks=sinks, return_lse=True
    )
    assert_close(out, ref)
    assert_close(lse, ref_lse)


def test_empty_batches():
    rng = np.random.default_rng(3)
    for lengths in ([], [0], [0, 0, 0]):
        q, k, v, cu_q, cu_k = packed(rng, lengths, lengths, 3, 1, 8, 5)
        out, lse = scaled_dot_product_attention_varlen(q, k, v, cu_q, cu_k, return_lse=True)
        assert out.shape == (0, 3, 5) and lse.shape == (0, 3)


def test_strided_and_read_only_inputs():
    rng = np.random.default_rng(4)
    q, k, v, cu_q, cu_k = packed(rng, [20, 7], [20, 7], 4, 4, 16, 16)
    big = np.repeat(q, 2, axis=2)[:, :, ::2]  # a strided view of the same values
    ro = k.copy()
    ro.flags.writeable = False
    out = scaled_dot_product_attention_varlen(big, ro, np.asfortranarray(v), cu_q, cu_k, is_causal=True)
    np.testing.assert_allclose(out, scaled_dot_product_attention_varlen(q, k, v, cu_q, cu_k, is_causal=True))


def test_lists_of_offsets_and_uint_dtypes():
    rng = np.random.default_rng(5)
    q, k, v, cu_q, cu_k = packed(rng, [3, 4], [3, 4], 2, 2, 8, 8)
    want = scaled_dot_product_attention_varlen(q, k, v, cu_q, cu_k)
    for cu in ([0, 3, 7], np.array([0, 3, 7], np.int32), np.array([0, 3, 7], np.uint16)):
        np.testing.assert_array_equal(scaled_dot_product_attention_varlen(q, k, v, cu, cu), want)


# ----------------------------------------------------------------------------------------------
# the same as the padded computation
# ----------------------------------------------------------------------------------------------


def pad(x, cu, T):
    """(total, H, D) packed → (B, H, T, D) zero-padded."""
    B = len(cu) - 1
    out = np.zeros((B, x.shape[1], T, x.shape[2]), x.dtype)
    for b in range(B):
        n = cu[b + 1] - cu[b]
        out[b, :, :n] = x[cu[b] : cu[b + 1]].transpose(1, 0, 2)
    return out


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("heads", [(12, 12), (8, 2)])
def test_equals_padded_on_valid_rows(path, causal, heads):
    """A batch of 32 sentences of 8-128 tokens: the padded batch with a key padding mask gives the same
    valid rows (to float32 rounding: the two runs split the rows into register tiles differently)."""
    rng = np.random.default_rng(6)
    lengths = rng.integers(8, 129, 32)
    H, Hkv = heads
    q, k, v, cu, _ = packed(rng, lengths, lengths, H, Hkv, 32, 32)
    T = int(lengths.max())
    keep = (np.arange(T)[None, :] < lengths[:, None])[:, None, None, :]
    padded = scaled_dot_product_attention(
        pad(q, cu, T), pad(k, cu, T), pad(v, cu, T), attn_mask=keep, is_causal=causal, enable_gqa=H != Hkv
    )
    out = scaled_dot_product_attention_varlen(q, k, v, cu, cu, is_causal=causal)
    for b in range(32):
        np.testing.assert_allclose(
            out[cu[b] : cu[b + 1]], padded[b, :, : lengths[b]].transpose(1, 0, 2), rtol=1e-5, atol=1e-6
        )


# ----------------------------------------------------------------------------------------------
# work table
# ----------------------------------------------------------------------------------------------


def test_work_table_covers_every_row_once_and_balances():
    rng = np.random.default_rng(7)
    lengths = np.concatenate([rng.integers(8, 129, 30), [0, 300]])
    cu = offsets(lengths)
    items, bin_start, work = work_table(cu, cu, 12, 128, None, 0, 32, 32, 2)
    assert bin_start[0] == 0 and bin_start[-1] == len(items) and len(bin_start) == 3
    seen = np.zeros((cu[-1], 12), int)
    for b, h, i0 in items:
        seen[cu[b] + i0 : cu[b] + min(lengths[b], i0 + 128), h] += 1
    assert (seen == 1).all()
    assert work == 12 * sum(int(n) * (int(n) * 64 + 32 + 64) for n in lengths)
    item_cost = [(min(lengths[b], i0 + 128) - i0) * lengths[b] for b, _, i0 in items]
    cost = [sum(item_cost[s:e]) for s, e in itertools.pairwise(bin_start)]
    assert max(cost) / min(cost) < 1.05, cost
    # the causal rule and the window cut the keys an item visits (by whole key blocks: 16 here)
    _, _, causal_work = work_table(cu, cu, 12, 16, "upper_left", 0, 32, 32, 2)
    _, _, window_work = work_table(cu, cu, 12, 16, "upper_left", 8, 32, 32, 2)
    assert window_work < 0.2 * work and causal_work < 0.65 * work, (window_work / work, causal_work / work)


# ----------------------------------------------------------------------------------------------
# checks
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["query", "key", "value"])
def test_nonfinite_inputs_are_named(name):
    rng = np.random.default_rng(8)
    q, k, v, cu_q, cu_k = packed(rng, [5, 6], [5, 6], 2, 2, 8, 8)
    args = dict(query=q, key=k, value=v)
    args[name] = args[name].copy()
    args[name][7, 1, 3] = np.nan
    with pytest.raises(ValueError, match=name):
        scaled_dot_product_attention_varlen(**args, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k)
    out = scaled_dot_product_attention_varlen(**args, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, check_finite=False)
    assert np.isfinite(out[:5]).all()  # sequence 0 never reads row 7


def test_unread_keys_are_not_checked():
    """Keys of a sequence with no queries are never read (as a KV cache's free slots)."""
    rng = np.random.default_rng(9)
    q, k, v, cu_q, cu_k = packed(rng, [0, 4], [3, 4], 2, 2, 8, 8)
    k[1] = np.inf
    out = scaled_dot_product_attention_varlen(q, k, v, cu_q, cu_k)
    assert np.isfinite(out).all()


def test_overflow_is_reported():
    q = np.full((2, 1, 4), 1e30, np.float32)
    cu = np.array([0, 2])
    with pytest.raises(ValueError, match="overflowed"):
        scaled_dot_product_attention_varlen(q, q, q, cu, cu)


def test_quantized_keys_are_refused():
    rng = np.random.default_rng(10)
    q, k, v, cu_q, cu_k = packed(rng, [4], [4], 2, 2, 32, 32)
    with pytest.raises(TypeError, match=r"key.*QuantizedTensor"):
        scaled_dot_product_attention_varlen(q, quantize(k), v, cu_q, cu_k)
    with pytest.raises(TypeError, match=r"value.*QuantizedTensor"):
        scaled_dot_product_attention_varlen(q, k, quantize(v), cu_q, cu_k)


def _good():
    rng = np.random.default_rng(11)
    q, k, v, cu_q, cu_k = packed(rng, [3, 4], [2, 5], 4, 2, 8, 6)
    return dict(query=q, key=k, value=v, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k)


BAD = [
    ("query-2d", dict(query=np.zeros((7, 8), np.float32)), ValueError, "query.*3-D"),
    ("query-int", dict(query=np.zeros((7, 4, 8), np.int32)), TypeError, "query"),
    ("key-features", dict(key=np.zeros((7, 2, 5), np.float32)), ValueError, "key"),
    ("value-tokens", dict(value=np.zeros((6, 2, 6), np.float32)), ValueError, "value"),
    ("value-heads", dict(value=np.zeros((7, 1, 6), np.float32)), ValueError, "value"),
    ("heads-not-multiple", dict(key=np.zeros((7, 3, 8)), value=np.zeros((7, 3, 6))), ValueError, "heads"),
    ("gqa-false", dict(enable_gqa=False), ValueError, "enable_gqa"),
    ("gqa-type", dict(enable_gqa="yes"), TypeError, "enable_gqa"),
    ("cu-float", dict(cu_seqlens_q=np.array([0.0, 3.0, 7.0])), TypeError, "cu_seqlens_q"),
    ("cu-bool", dict(cu_seqlens_k=np.array([False, True, True])), TypeError, "cu_seqlens_k"),
    ("cu-2d", dict(cu_seqlens_q=np.array([[0, 3, 7]])), ValueError, "cu_seqlens_q"),
    ("cu-empty", dict(cu_seqlens_q=np.array([], np.int64)), ValueError, "cu_seqlens_q"),
    ("cu-start", dict(cu_seqlens_q=np.array([1, 3, 7])), ValueError, r"cu_seqlens_q.*start at 0"),
    ("cu-decreasing", dict(cu_seqlens_k=np.array([0, 5, 2, 7])), ValueError, "cu_seqlens_k.*nondecreasing"),
    ("cu-last", dict(cu_seqlens_q=np.array([0, 3, 6])), ValueError, r"cu_seqlens_q\[-1\]"),
    ("cu-counts-differ", dict(cu_seqlens_k=np.array([0, 2, 3, 7])), ValueError, "cu_seqlens_q and cu_seqlens_k"),
    ("cu-string", dict(cu_seqlens_q="0,3,7"), TypeError, "cu_seqlens_q"),
    ("causal", dict(is_causal="sideways"), ValueError, "is_causal"),
    ("window-no-causal", dict(window=3), ValueError, "window"),
    ("scale", dict(scale=-1.0), ValueError, "scale"),
    ("softcap", dict(softcap=np.nan), ValueError, "softcap"),
    ("alibi-length", dict(alibi_slopes=np.ones(2)), ValueError, "alibi_slopes"),
    ("sinks-length", dict(sinks=np.ones(2)), ValueError, r"sinks must have shape \(H,\)"),
    ("sinks-nan", dict(sinks=np.array([0.0, np.nan, 0.0, 0.0])), ValueError, "sinks contains NaN"),
    ("out-dtype", dict(out_dtype=np.int8), TypeError, "out_dtype"),
    ("query-quantized", dict(query=quantize(np.zeros((7, 4, 32), np.float32))), TypeError, "query"),
]


@pytest.mark.parametrize("changes, error, pattern", [pytest.param(c, e, p, id=i) for i, c, e, p in BAD])
def test_bad_inputs(changes, error, pattern, no_kernel):
    args = _good()
    args.update(changes)
    with pytest.raises(error, match=pattern):
        scaled_dot_product_attention_varlen(**args)


# ----------------------------------------------------------------------------------------------
# the layer on a packed batch
# ----------------------------------------------------------------------------------------------


def _packed_rows(y, lengths):
    """(B, T, d) padded → (total, d) valid rows."""
    return np.concatenate([y[b, :n] for b, n in enumerate(lengths)])


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("kv_heads", [4, 2])
def test_layer_packed_equals_padded(causal, kv_heads):
    rng = np.random.default_rng(12)
    layer = MultiHeadAttention(embed_dim=32, num_heads=4, num_kv_heads=kv_heads, seed=0)
    layer.b_q[:] = rng.standard_normal(layer.b_q.shape)
    lengths = np.array([5, 1, 17, 9])
    T = int(lengths.max())
    x = rng.standard_normal((4, T, 32)).astype(np.float32)
    padding = np.arange(T)[None, :] >= lengths[:, None]  # True = pad (torch's convention)
    padded = layer(x, key_padding_mask=padding, is_causal=causal)
    xp = _packed_rows(x, lengths)
    originals = copies(xp)
    out = layer(xp, cu_seqlens=offsets(lengths), is_causal=causal)
    assert_unchanged([xp], originals)
    assert out.shape == (int(lengths.sum()), 32) and out.dtype == np.float32
    np.testing.assert_allclose(out, _packed_rows(padded, lengths), rtol=1e-5, atol=1e-5)


def test_layer_packed_cross_attention_and_rotary():
    rng = np.random.default_rng(13)
    layer = MultiHeadAttention(embed_dim=16, num_heads=2, kdim=8, vdim=8, seed=1, dtype=np.float64)
    lq, lk = np.array([3, 0, 4]), np.array([5, 2, 0])
    x = rng.standard_normal((3, 4, 16))
    ctx = rng.standard_normal((3, 5, 8))
    kpm = np.arange(5)[None, :] >= lk[:, None]
    padded = layer(x, ctx, key_padding_mask=kpm)
    out = layer(_packed_rows(x, lq), _packed_rows(ctx, lk), cu_seqlens=offsets(lq), cu_seqlens_k=offsets(lk))
    want = _packed_rows(padded, lq)
    want[3:] = layer.b_o  # sequence 2 has no context tokens: attention gives zeros, then the output bias
    np.testing.assert_allclose(out, want, rtol=1e-10, atol=1e-10)

    def rotary(q, k, positions):  # a toy position-dependent map: scales by (1 + position)
        return q * (1 + positions)[:, None], k * (1 + positions)[:, None]

    self_layer = MultiHeadAttention(embed_dim=16, num_heads=2, seed=2, dtype=np.float64)
    y = self_layer(x, key_padding_mask=np.arange(4)[None, :] >= lq[:, None], rotary=rotary, is_causal=True)
    yp = self_layer(_packed_rows(x, lq), cu_seqlens=offsets(lq), rotary=rotary, is_causal=True)
    np.testing.assert_allclose(yp, _packed_rows(y, lq), rtol=1e-10, atol=1e-10)


LAYER_BAD = [
    ("x-3d", dict(x=np.zeros((1, 7, 16))), ValueError, "x"),
    ("x-int", dict(x=np.zeros((7, 16), np.int64)), TypeError, "x"),
    ("x-nan", dict(x=np.full((7, 16), np.nan)), ValueError, "x"),
    ("cu-last", dict(cu_seqlens=np.array([0, 3, 6])), ValueError, "cu_seqlens"),
    ("cu-float", dict(cu_seqlens=np.array([0.0, 7.0])), TypeError, "cu_seqlens"),
    ("kpm", dict(key_padding_mask=np.zeros((2, 4), bool)), ValueError, "key_padding_mask"),
    ("attn-mask", dict(attn_mask=np.zeros((7, 7), bool)), ValueError, "attn_mask"),
    ("cache", dict(cache=object()), ValueError, "cache"),
    ("cu-k-without-context", dict(cu_seqlens_k=np.array([0, 3, 7])), ValueError, "cu_seqlens_k"),
    ("cu-k-without-cu", dict(cu_seqlens=None, cu_seqlens_k=np.array([0, 3, 7])), ValueError, "cu_seqlens"),
    ("context-without-cu-k", dict(context=np.zeros((5, 16))), ValueError, "cu_seqlens_k"),
    (
        "context-cu-k-last",
        dict(context=np.zeros((5, 16)), cu_seqlens_k=np.array([0, 3, 7])),
        ValueError,
        "cu_seqlens_k",
    ),
    ("rotary", dict(rotary=3), TypeError, "rotary"),
    ("window", dict(window=2), ValueError, "window"),
]


@pytest.mark.parametrize("changes, error, pattern", [pytest.param(c, e, p, id=i) for i, c, e, p in LAYER_BAD])
def test_layer_packed_bad_inputs(changes, error, pattern, no_kernel):
    layer = MultiHeadAttention(embed_dim=16, num_heads=2, seed=0)
    args = dict(x=np.zeros((7, 16), np.float32), cu_seqlens=np.array([0, 3, 7]))
    args.update(changes)
    x = args.pop("x")
    with pytest.raises(error, match=pattern):
        layer(x, **args)
