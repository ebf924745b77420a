"""numba_attn.api: scaled_dot_product_attention and attention_weights against the float64 reference."""

import concurrent.futures
import inspect

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import DTYPES, assert_close, assert_unchanged, copies, randn, random_bool_mask, random_float_mask
from numba_attn import api, attention_weights, config, reference, scaled_dot_product_attention
from numba_attn.api import ROW_TILE

try:
    import torch
except ImportError:  # torch is optional: the comparison with it is only collected when it is installed
    torch = None

CAUSAL = (False, True, "upper_left", "lower_right")


def reference_sdpa(*args, **kwargs):
    """reference.scaled_dot_product_attention with return_lse=True, its lse broadcast to the output's
    batch dims (the reference leaves out batch dims that only ``value`` has; tested in test_reference)."""
    out, lse = reference.scaled_dot_product_attention(*args, **kwargs, return_lse=True)
    return out, np.broadcast_to(lse, out.shape[:-1])


# ----------------------------------------------------------------------------------------------
# hypothesis strategies
# ----------------------------------------------------------------------------------------------

#: cap on the multiply-adds of one example (batch·L·S·(E+Ev)) and on the reference's L×S scores
MAX_WORK = 2e7
MAX_SCORES = 5e5

lengths = st.one_of(st.integers(1, 12), st.integers(1, 300), st.sampled_from([127, 128, 129, 255, 256, 257]))
features = st.one_of(
    st.integers(1, 9),
    st.integers(1, 256),
    st.sampled_from([15, 16, 17, 31, 32, 33, 63, 64, 65, 127, 128, 129, 255, 256]),
)


def _operand_batch(draw, batch, keep_last, heads=None, broadcast=True):
    """An operand's batch shape that broadcasts to ``batch``: some dims 1, maybe fewer leading dims.
    ``heads`` replaces the last batch dim (grouped-query key/value heads); ``keep_last`` keeps that dim."""
    if broadcast:
        dims = [d if not draw(st.booleans()) or d == 1 else 1 for d in batch]
    else:
        dims = list(batch)
    if heads is not None:
        dims[-1] = heads
    elif keep_last and dims:
        dims[-1] = batch[-1]
    droppable = len(dims) - (1 if keep_last and dims else 0)
    drop = draw(st.integers(0, droppable)) if broadcast else 0
    return tuple(dims[drop:])


@st.composite
def attention_cases(
    draw,
    max_len=None,
    gqa_allowed=True,
    max_features=None,
    with_value=True,
    broadcast=True,
    query_lengths=lengths,
    key_lengths=lengths,
):
    """Random attention inputs. ``broadcast=False``: every operand (and the mask) has the full batch dims."""
    seed = draw(st.integers(0, 2**32 - 1))
    dtype = draw(st.sampled_from(DTYPES))
    L = draw(query_lengths)
    S = draw(key_lengths)
    E = draw(features)
    Ev = draw(features)
    if max_len is not None:
        L, S = min(L, max_len), min(S, max_len)
    if max_features is not None:
        E, Ev = min(E, max_features), min(Ev, max_features)
    nb = draw(st.integers(0, 3))
    batch = [draw(st.integers(1, 3)) for _ in range(nb)]
    gqa = gqa_allowed and nb >= 1 and draw(st.booleans())
    hkv = None
    if gqa:
        hkv = draw(st.integers(1, 3))
        batch[-1] = hkv * draw(st.integers(1, 3))
    bq = _operand_batch(draw, batch, keep_last=gqa, broadcast=broadcast)
    bk = _operand_batch(draw, batch, keep_last=gqa, heads=hkv, broadcast=broadcast)
    bv = _operand_batch(draw, batch, keep_last=gqa, heads=hkv, broadcast=broadcast) if with_value else ()
    if gqa:  # key and value carry the same heads; the rest of their batch dims may differ
        bv = bv[:-1] + (hkv,)
    out_batch = np.broadcast_shapes(bq, bk[:-1] + (bq[-1],) if gqa else bk, bv[:-1] + (bq[-1],) if gqa else bv)
    n = int(np.prod(out_batch, dtype=np.int64))
    # keep each example cheap: shrink the longer sequence until the work fits
    while n * L * S * (E + Ev) > MAX_WORK or n * L * S > MAX_SCORES:
        if L >= S:
            L = max(1, L // 2)
        else:
            S = max(1, S // 2)

    mask_type = draw(st.sampled_from([None, "bool", "float"]))
    mask_shape = None
    if mask_type is not None and not broadcast:
        mask_shape = tuple(out_batch) + (L, S)
    elif mask_type is not None:
        full = tuple(out_batch) + (L, S)
        shape = [d if draw(st.integers(0, 3)) else 1 for d in full]  # mostly kept, sometimes 1
        drop = draw(st.integers(0, len(shape) - 1))
        mask_shape = tuple(shape[drop:])
    mask_density = draw(st.sampled_from([0.0, 0.1, 0.5, 0.9, 1.0]))
    masked_rows = draw(st.sampled_from([0, 0, 1, 3]))
    mask_dtype = draw(st.sampled_from(DTYPES)) if broadcast else dtype
    bias = draw(st.sampled_from([0.0, 1.0, 3.0]))
    is_causal = draw(st.sampled_from(CAUSAL))
    scale = draw(st.one_of(st.none(), st.floats(0.1, 3.0).map(lambda f: f / np.sqrt(E))))

    rng = np.random.default_rng(seed)
    q = randn(rng, bq + (L, E), dtype)
    k = randn(rng, bk + (S, E), dtype)
    v = randn(rng, bv + (S, Ev), dtype)
    if mask_type == "bool":
        mask = random_bool_mask(rng, mask_shape, mask_density, masked_rows)
    elif mask_type == "float":
        mask = random_float_mask(rng, mask_shape, mask_dtype, 1.0 - mask_density, bias, masked_rows)
    else:
        mask = None
    return dict(query=q, key=k, value=v, attn_mask=mask, is_causal=is_causal, scale=scale, enable_gqa=gqa), dtype


HYPO = settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large]
)


def _describe(case):
    return {k: (v.shape, v.dtype) if isinstance(v, np.ndarray) else v for k, v in case.items()}


def _check_against_reference(case, dtype):
    note = _describe(case)
    arrays = [case["query"], case["key"], case["value"], case["attn_mask"]]
    before = copies(*arrays)
    out, lse = scaled_dot_product_attention(**case, return_lse=True)
    ref_out, ref_lse = reference_sdpa(**case)
    assert out.dtype == dtype and lse.dtype == dtype, note
    assert out.shape == ref_out.shape and lse.shape == ref_lse.shape, note
    assert_close(out, ref_out, dtype)
    assert_close(lse, ref_lse, dtype)
    # fully-masked rows: zeros, lse = -inf
    dead = np.isneginf(ref_lse)
    assert (out[dead] == 0).all(), note
    assert_unchanged(arrays, before)
    # without return_lse: the same output, bit for bit (the same kernel ran)
    np.testing.assert_array_equal(scaled_dot_product_attention(**case), out)


# Every broadcasting pattern gives the kernels differently typed index arrays (see
# test_broadcasting_does_not_multiply_compilations), each a fresh compilation of seconds. The broad
# property test therefore sticks to one kernel, the serial prefill kernel; the parallel and decode
# kernels get a property test without broadcasting (a handful of signatures) and explicit tests.


@HYPO
@given(attention_cases())
def test_sdpa_matches_reference(case_dtype):
    case, dtype = case_dtype
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(config, "SERIAL_BELOW_FLOPS", 10**18)
        mp.setattr(config, "DECODE_MIN_KEYS", 10**9)
        _check_against_reference(case, dtype)


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(
    attention_cases(
        broadcast=False,
        query_lengths=st.one_of(st.integers(1, 8), lengths),
        key_lengths=st.one_of(st.integers(256, 1200), lengths),
    )
)
def test_sdpa_parallel_kernels_match_reference(case_dtype):
    """The kernels' own choice (parallel prefill, or decode for L <= 8 and S >= 256) on large enough work."""
    case, dtype = case_dtype
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(config, "SERIAL_BELOW_FLOPS", 0)
        _check_against_reference(case, dtype)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(attention_cases(max_len=64, gqa_allowed=False, with_value=False))
def test_attention_weights_match_reference(case_dtype):
    case, dtype = case_dtype
    del case["value"]
    before = copies(case["query"], case["key"], case["attn_mask"])
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(config, "SERIAL_BELOW_FLOPS", 10**18)
        mp.setattr(config, "DECODE_MIN_KEYS", 10**9)
        w = attention_weights(**case)
    ref = reference.attention_weights(**case)
    assert w.dtype == dtype
    assert_close(w, ref, dtype)
    sums = w.sum(axis=-1, dtype=np.float64)
    ref_sums = ref.sum(axis=-1)  # 1, or 0 for a fully-masked row
    np.testing.assert_allclose(sums, ref_sums, atol=10 * np.finfo(dtype).eps * w.shape[-1])
    assert (w >= 0).all()
    assert_unchanged([case["query"], case["key"], case["attn_mask"]], before)


# ----------------------------------------------------------------------------------------------
# fully-masked rows, extreme logits, empty dims
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kind", ["bool", "float", "float_mixed"])
def test_fully_masked_rows_give_zeros(dtype, kind):
    rng = np.random.default_rng(1)
    q, k, v = randn(rng, (2, 40, 16), dtype), randn(rng, (2, 70, 16), dtype), randn(rng, (2, 70, 9), dtype)
    dead_rows = [0, 7, 39]
    if kind == "bool":
        mask = random_bool_mask(rng, (2, 40, 70), 0.5)
        mask[:, dead_rows] = False
    elif kind == "float":
        mask = random_float_mask(rng, (40, 70), dtype, 0.5)
        mask[dead_rows] = -np.inf
    else:  # some rows masked only by the bool-equivalent -inf in one batch entry
        mask = random_float_mask(rng, (2, 40, 70), dtype, 0.0)
        mask[1, dead_rows] = -np.inf
    out, lse = scaled_dot_product_attention(q, k, v, attn_mask=mask, return_lse=True)
    ref_out, ref_lse = reference_sdpa(q, k, v, attn_mask=mask)
    assert not np.isnan(out).any() and not np.isnan(lse).any()
    batches = [1] if kind == "float_mixed" else [0, 1]
    for b in batches:
        assert (out[b, dead_rows] == 0).all()
        assert np.isneginf(lse[b, dead_rows]).all()
    assert_close(out, ref_out, dtype)
    assert_close(lse, ref_lse, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("L,S", [(10, 4), (200, 70), (300, 129)])
def test_lower_right_causal_with_more_queries_than_keys(dtype, L, S):
    """With "lower_right" and L > S the first L - S queries see no key: zeros, lse = -inf."""
    rng = np.random.default_rng(2)
    q, k, v = randn(rng, (3, L, 8), dtype), randn(rng, (3, S, 8), dtype), randn(rng, (3, S, 5), dtype)
    out, lse = scaled_dot_product_attention(q, k, v, is_causal="lower_right", return_lse=True)
    assert (out[:, : L - S] == 0).all()
    assert np.isneginf(lse[:, : L - S]).all()
    assert np.isfinite(lse[:, L - S :]).all()
    ref_out, ref_lse = reference_sdpa(q, k, v, is_causal="lower_right")
    assert_close(out, ref_out, dtype)
    assert_close(lse, ref_lse, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("causal", CAUSAL)
@pytest.mark.parametrize("L,S", [(5, 9), (9, 5), (130, 300), (300, 130)])
def test_causal_alignments(dtype, causal, L, S):
    rng = np.random.default_rng(3)
    q, k, v = randn(rng, (L, 12), dtype), randn(rng, (S, 12), dtype), randn(rng, (S, 7), dtype)
    out, lse = scaled_dot_product_attention(q, k, v, is_causal=causal, return_lse=True)
    ref_out, ref_lse = reference_sdpa(q, k, v, is_causal=causal)
    assert_close(out, ref_out, dtype)
    assert_close(lse, ref_lse, dtype)
    # the same thing as an explicit boolean mask
    alignment = {False: None, True: "upper_left"}.get(causal, causal)
    if alignment is not None:
        explicit = scaled_dot_product_attention(q, k, v, attn_mask=reference.causal_mask(L, S, alignment))
        assert_close(explicit, ref_out, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    "low,high,E,scale",
    [
        (-1, 1, 1, 1e4),  # logits in {-1e4, 0, 1e4}
        (-50, 50, 4, 1.0),  # integer logits up to ±1e4
        (-1, 1, 8, 1250.0),  # integer multiples of 1250 up to ±1e4
    ],
)
def test_huge_logits_are_finite_and_correct(dtype, low, high, E, scale):
    """Exactly representable logits of magnitude up to 1e4: no overflow, no NaN, exact softmax."""
    rng = np.random.default_rng(4)
    L, S = 45, 200
    q = rng.integers(low, high + 1, (2, L, E)).astype(dtype)
    k = rng.integers(low, high + 1, (2, S, E)).astype(dtype)
    q[:, 0], k[:, 0], k[:, 1] = high, high, low  # logits of exactly +1e4 and -1e4 occur
    v = randn(rng, (2, S, 6), dtype)
    logits = np.abs(q.astype(np.float64) @ np.swapaxes(k, -1, -2).astype(np.float64) * scale)
    assert logits.max() >= 1e4 * 0.99
    for causal in (False, "lower_right"):
        out, lse = scaled_dot_product_attention(q, k, v, scale=scale, is_causal=causal, return_lse=True)
        ref_out, ref_lse = reference_sdpa(q, k, v, scale=scale, is_causal=causal)
        assert np.isfinite(out).all() and np.isfinite(lse).all()
        assert_close(out, ref_out, dtype)
        assert_close(lse, ref_lse, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_huge_random_logits(dtype):
    """Random inputs, scale 1e4: the softmax saturates; still finite and a convex combination of V."""
    rng = np.random.default_rng(5)
    q, k, v = randn(rng, (2, 50, 16), dtype), randn(rng, (2, 150, 16), dtype), randn(rng, (2, 150, 4), dtype)
    out, lse = scaled_dot_product_attention(q, k, v, scale=1e4, return_lse=True)
    assert np.isfinite(out).all() and np.isfinite(lse).all()
    vmin, vmax = v.min(axis=-2, keepdims=True), v.max(axis=-2, keepdims=True)
    eps = 1e-5 if dtype == np.float32 else 1e-12
    assert (out >= vmin - eps).all() and (out <= vmax + eps).all()
    ref_out, ref_lse = reference_sdpa(q, k, v, scale=1e4)
    # float32 logits of size 1e4 carry absolute rounding errors ~1e-3: compare lse relative to its size
    assert_close(lse, ref_lse, dtype, rtol=1e-5 if dtype == np.float32 else 1e-10)
    if dtype == np.float64:
        assert_close(out, ref_out, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("batch", [(), (3,), (2, 3)])
def test_no_keys_gives_zeros(dtype, batch):
    """S == 0: every row is fully masked: zeros of shape (..., L, Ev), lse = -inf."""
    rng = np.random.default_rng(6)
    q = randn(rng, batch + (4, 8), dtype)
    k = np.zeros(batch + (0, 8), dtype)
    v = np.zeros(batch + (0, 5), dtype)
    out, lse = scaled_dot_product_attention(q, k, v, return_lse=True)
    assert out.shape == batch + (4, 5) and out.dtype == dtype
    assert lse.shape == batch + (4,)
    np.testing.assert_array_equal(out, np.zeros(batch + (4, 5)))
    assert np.isneginf(lse).all()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("batch", [(), (3,), (2, 3)])
def test_no_queries_gives_empty_output(dtype, batch):
    rng = np.random.default_rng(7)
    q = np.zeros(batch + (0, 8), dtype)
    k, v = randn(rng, batch + (6, 8), dtype), randn(rng, batch + (6, 5), dtype)
    out, lse = scaled_dot_product_attention(q, k, v, return_lse=True)
    assert out.shape == batch + (0, 5) and out.dtype == dtype
    assert lse.shape == batch + (0,)
    w = attention_weights(q, k)
    assert w.shape == batch + (0, 6)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    "bq,bk,bv",
    [
        ((), (), ()),
        ((3,), (3,), (3,)),
        ((0,), (0,), (0,)),
        ((2, 3), (2, 3), (2, 3)),
        ((2, 3), (1, 3), (3,)),  # broadcasting, fewer dims
        ((2, 1), (1, 4), (2, 4)),
        ((2, 3, 2), (2, 3, 2), (2, 3, 2)),
        ((2, 1, 2), (3, 1), (1, 2, 3, 1)),  # value has more batch dims than query
        ((2, 0, 3), (2, 1, 3), (1, 0, 1)),
    ],
)
def test_batch_dims(dtype, bq, bk, bv):
    rng = np.random.default_rng(8)
    q, k, v = randn(rng, bq + (5, 6), dtype), randn(rng, bk + (7, 6), dtype), randn(rng, bv + (7, 3), dtype)
    mask = random_bool_mask(rng, (5, 7), 0.7, masked_rows=1)
    out, lse = scaled_dot_product_attention(q, k, v, attn_mask=mask, return_lse=True)
    expected_batch = np.broadcast_shapes(bq, bk, bv)
    assert out.shape == expected_batch + (5, 3)
    assert lse.shape == expected_batch + (5,)
    ref_out, ref_lse = reference_sdpa(q, k, v, attn_mask=mask)
    assert_close(out, ref_out, dtype)
    assert_close(lse, ref_lse, dtype)


# ----------------------------------------------------------------------------------------------
# both kernels (serial, parallel) across block boundaries
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("path", ["serial", "parallel"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    "mask_kind,causal", [(None, False), ("bool", "lower_right"), ("float", True), ("bool_bcast", "upper_left")]
)
def test_large_shapes_both_paths(monkeypatch, kernel_spy, path, dtype, mask_kind, causal):
    monkeypatch.setattr(config, "SERIAL_BELOW_FLOPS", 10**18 if path == "serial" else 0)
    rng = np.random.default_rng(9)
    L, S, E, Ev = 300, 517, 67, 33
    q, k, v = randn(rng, (2, L, E), dtype), randn(rng, (1, S, E), dtype), randn(rng, (2, S, Ev), dtype)
    if mask_kind == "bool":
        mask = random_bool_mask(rng, (2, L, S), 0.8, masked_rows=5)
    elif mask_kind == "float":
        mask = random_float_mask(rng, (L, S), dtype, 0.3, 2.0, masked_rows=2)
    elif mask_kind == "bool_bcast":
        mask = random_bool_mask(rng, (1, S), 0.5)
    else:
        mask = None
    out, lse = scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal, return_lse=True)
    assert kernel_spy.ran() == {f"prefill_{path}": 1}
    ref_out, ref_lse = reference_sdpa(q, k, v, attn_mask=mask, is_causal=causal)
    assert_close(out, ref_out, dtype)
    assert_close(lse, ref_lse, dtype)


@pytest.mark.parametrize("block_q,block_k", [(256, 128), (256, 64), (64, 32), (100, 37), (1, 1)])
@pytest.mark.parametrize("mask_kind,causal", [(None, False), ("bool", "lower_right"), (None, True)])
def test_prefill_block_sizes(monkeypatch, block_q, block_k, mask_kind, causal):
    """The result does not depend on the prefill tiles (query rows × keys per block), including
    the larger query block the API picks for big problems (rounded down to whole register tiles) and
    sizes that do not divide L or S."""
    monkeypatch.setattr(config, "SERIAL_BELOW_FLOPS", 0)
    monkeypatch.setattr(config, "PREFILL_BLOCK_Q_LARGE", block_q)
    monkeypatch.setattr(config, "PREFILL_ITEMS_PER_THREAD", 0)  # always the "large" block
    monkeypatch.setattr(config, "PREFILL_BLOCK_K", block_k)
    rng = np.random.default_rng(11)
    L, S, E, Ev = 300, 517, 64, 32
    q, k, v = randn(rng, (2, L, E), np.float32), randn(rng, (2, S, E), np.float32), randn(rng, (2, S, Ev), np.float32)
    mask = random_bool_mask(rng, (2, L, S), 0.8, masked_rows=5) if mask_kind == "bool" else None
    assert api.prefill_block_q(2, L) == max(ROW_TILE, block_q // ROW_TILE * ROW_TILE)  # whole register tiles
    out, lse = scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal, return_lse=True)
    ref_out, ref_lse = reference_sdpa(q, k, v, attn_mask=mask, is_causal=causal)
    assert_close(out, ref_out, np.float32)
    assert_close(lse, ref_lse, np.float32)


def test_prefill_block_q_choice(monkeypatch):
    """The larger query block only when every thread still gets PREFILL_ITEMS_PER_THREAD items."""
    monkeypatch.setattr(api, "get_num_threads", lambda: 2)
    big, small = config.PREFILL_BLOCK_Q_LARGE, config.PREFILL_BLOCK_Q
    need = config.PREFILL_ITEMS_PER_THREAD * 2
    assert api.prefill_block_q(need, big) == big
    assert api.prefill_block_q(need - 1, big) == small
    assert api.prefill_block_q(1, need * big) == big
    assert api.prefill_block_q(1, (need - 1) * big) == small


@pytest.mark.parametrize("dtype", DTYPES)
def test_serial_and_parallel_agree(monkeypatch, dtype):
    rng = np.random.default_rng(10)
    q, k, v = randn(rng, (3, 150, 20), dtype), randn(rng, (3, 260, 20), dtype), randn(rng, (3, 260, 9), dtype)
    results = []
    for threshold in (10**18, 0):
        monkeypatch.setattr(config, "SERIAL_BELOW_FLOPS", threshold)
        results.append(scaled_dot_product_attention(q, k, v, is_causal="lower_right", return_lse=True))
    (o1, l1), (o2, l2) = results
    np.testing.assert_array_equal(o1, o2)  # the same code, the same block order: bit for bit
    np.testing.assert_array_equal(l1, l2)


# the decode kernel: a few query rows (L <= DECODE_MAX_QUERY_ROWS) against many keys (S >= DECODE_MIN_KEYS)

DECODE_CASES = [
    # (L, S, q batch, kv batch, gqa, mask kind, is_causal)
    (1, 256, (2, 4), (2, 4), False, None, False),
    (1, 1000, (1, 8), (1, 2), True, None, "lower_right"),
    (5, 777, (2, 3), (1, 3), False, "bool", "lower_right"),
    (8, 1337, (2, 6), (2, 3), True, "float", False),
    (3, 300, (4,), (), False, "bool_bcast", True),  # upper_left: row i sees keys 0..i only
    (8, 520, (3, 2), (3, 2), False, "dead_rows", "lower_right"),
]


@pytest.mark.parametrize("path", ["serial", "parallel"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("L,S,bq,bkv,gqa,mask_kind,causal", DECODE_CASES)
def test_decode_kernel(monkeypatch, kernel_spy, path, dtype, L, S, bq, bkv, gqa, mask_kind, causal):
    monkeypatch.setattr(config, "SERIAL_BELOW_FLOPS", 10**18 if path == "serial" else 0)
    monkeypatch.setattr(config, "DECODE_MIN_SPLIT", 64)  # several key parts, merged at the end
    rng = np.random.default_rng(26)
    E, Ev = 40, 24
    q, k, v = randn(rng, bq + (L, E), dtype), randn(rng, bkv + (S, E), dtype), randn(rng, bkv + (S, Ev), dtype)
    if mask_kind == "bool":
        mask = random_bool_mask(rng, (L, S), 0.7)
    elif mask_kind == "float":
        mask = random_float_mask(rng, bq[:1] + (1, L, S), dtype, 0.3, 2.0, masked_rows=1)
    elif mask_kind == "bool_bcast":
        mask = random_bool_mask(rng, (S,), 0.5)
        mask[:2] = True
    elif mask_kind == "dead_rows":
        mask = random_bool_mask(rng, bq + (L, S), 0.9, masked_rows=2)
    else:
        mask = None
    out, lse = scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal, enable_gqa=gqa, return_lse=True)
    assert kernel_spy.ran() == {f"decode_{path}": 1}
    ref_out, ref_lse = reference_sdpa(q, k, v, attn_mask=mask, is_causal=causal, enable_gqa=gqa)
    assert_close(out, ref_out, dtype)
    assert_close(lse, ref_lse, dtype)
    # the prefill kernel on the same input agrees
    monkeypatch.setattr(config, "DECODE_MIN_KEYS", 10**9)
    out2, lse2 = scaled_dot_product_attention(
        q, k, v, attn_mask=mask, is_causal=causal, enable_gqa=gqa, return_lse=True
    )
    assert kernel_spy.calls[f"prefill_{path}"] == 1
    assert_close(out2, out.astype(np.float64), dtype)
    assert_close(lse2, lse.astype(np.float64), dtype)


# ----------------------------------------------------------------------------------------------
# float16 storage
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("L,S", [(37, 150), (4, 600)])  # prefill and decode kernels
@pytest.mark.parametrize("mask_kind,causal", [(None, False), ("bool", "lower_right"), ("float", True)])
def test_float16_inputs(L, S, mask_kind, causal):
    """float16 operands: computed in float32, returned in float16 (lse in float32)."""
    rng = np.random.default_rng(27)
    q, k, v = (
        randn(rng, (2, 3, L, 32), np.float16),
        randn(rng, (2, 3, S, 32), np.float16),
        randn(rng, (2, 3, S, 16), np.float16),
    )
    if mask_kind == "bool":
        mask = random_bool_mask(rng, (L, S), 0.6, masked_rows=1)
    elif mask_kind == "float":
        mask = random_float_mask(rng, (L, S), np.float16, 0.3)
    else:
        mask = None
    before = copies(q, k, v, mask)
    out, lse = scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal, return_lse=True)
    assert_unchanged([q, k, v, mask], before)
    assert out.dtype == np.float16 and lse.dtype == np.float32
    ref_out, ref_lse = reference_sdpa(q, k, v, attn_mask=mask, is_causal=causal)
    assert_close(out, ref_out, np.float16)
    assert_close(lse, ref_lse, np.float32)
    # out_dtype=float32: the float32 result before rounding, float32 accuracy
    out32 = scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal, out_dtype=np.float32)
    assert out32.dtype == np.float32
    assert_close(out32, ref_out, np.float32)
    np.testing.assert_array_equal(out32.astype(np.float16), out)


@pytest.mark.parametrize(
    "dq,dk,dv,expected,compute",
    [
        (np.float16, np.float16, np.float32, np.float32, np.float32),
        (np.float32, np.float16, np.float16, np.float32, np.float32),
        (np.float16, np.float64, np.float16, np.float64, np.float64),
        (np.float64, np.float16, np.float32, np.float64, np.float64),
    ],
)
def test_float16_mixed_dtypes(dq, dk, dv, expected, compute):
    rng = np.random.default_rng(28)
    q, k, v = randn(rng, (3, 20, 8), dq), randn(rng, (3, 30, 8), dk), randn(rng, (3, 30, 5), dv)
    out, lse = scaled_dot_product_attention(q, k, v, is_causal=True, return_lse=True)
    assert out.dtype == expected and lse.dtype == compute
    ref_out, ref_lse = reference_sdpa(q, k, v, is_causal=True)  # upcasts the same (exact) values
    assert_close(out, ref_out, compute)
    assert_close(lse, ref_lse, compute)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("out_dtype", [np.float16, np.float32, np.float64, "float32", np.dtype("float64")])
def test_out_dtype(dtype, out_dtype):
    rng = np.random.default_rng(29)
    q, k, v = randn(rng, (2, 9, 8), dtype), randn(rng, (2, 13, 8), dtype), randn(rng, (2, 13, 4), dtype)
    out = scaled_dot_product_attention(q, k, v, out_dtype=out_dtype)
    assert out.dtype == np.dtype(out_dtype)
    np.testing.assert_array_equal(out, scaled_dot_product_attention(q, k, v).astype(out_dtype))


def test_float16_result_out_of_range_is_refused():
    rng = np.random.default_rng(30)
    q, k, v = randn(rng, (4, 8), np.float32), randn(rng, (6, 8), np.float32), randn(rng, (6, 3), np.float32)
    v[:, 0] = 1e5  # every output row has 1e5 in column 0
    with pytest.raises(ValueError, match="float16"):
        scaled_dot_product_attention(q, k, v, out_dtype=np.float16)
    out = scaled_dot_product_attention(q, k, v, out_dtype=np.float32)
    assert_close(out, reference.scaled_dot_product_attention(q, k, v), np.float32)


# ----------------------------------------------------------------------------------------------
# sliding window, ALiBi, soft-capping (both kernels)
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("L,S", [(50, 50), (30, 300), (300, 140), (3, 700)])
@pytest.mark.parametrize(
    "extra",
    [
        dict(window=16, is_causal="lower_right"),
        dict(window=1, is_causal=True),
        dict(window=200, is_causal="upper_left"),
        dict(alibi=True),
        dict(alibi=True, is_causal="lower_right"),
        dict(alibi=True, is_causal=True, window=40),
        dict(softcap=5.0),
        dict(softcap=0.5, is_causal="lower_right", alibi=True, mask=True),
    ],
)
def test_window_alibi_softcap(dtype, L, S, extra):
    rng = np.random.default_rng(31)
    H = 4
    q, k, v = randn(rng, (2, H, L, 16), dtype), randn(rng, (2, 2, S, 16), dtype), randn(rng, (2, 2, S, 8), dtype)
    kw = dict(
        is_causal=extra.get("is_causal", False),
        window=extra.get("window"),
        softcap=extra.get("softcap"),
        enable_gqa=True,
        alibi_slopes=2.0 ** -np.arange(1, H + 1) if extra.get("alibi") else None,
        attn_mask=random_bool_mask(rng, (L, S), 0.7, masked_rows=1) if extra.get("mask") else None,
    )
    out, lse = scaled_dot_product_attention(q, k, v, **kw, return_lse=True)
    ref_out, ref_lse = reference_sdpa(q, k, v, **kw)
    assert_close(out, ref_out, dtype)
    assert_close(lse, ref_lse, dtype)


# ----------------------------------------------------------------------------------------------
# memory layouts, read-only inputs, inputs unchanged
# ----------------------------------------------------------------------------------------------


def _layout(x, how):
    if how == "contiguous":
        return x
    if how == "strided":  # every other row and an offset in the last dim
        big = np.zeros(x.shape[:-2] + (2 * x.shape[-2], x.shape[-1] + 3), x.dtype)
        big[..., ::2, 1:-2] = x
        return big[..., ::2, 1:-2]
    if how == "fortran":
        return np.asfortranarray(x)
    if how == "reversed":  # negative strides
        return np.ascontiguousarray(x[..., ::-1, ::-1])[..., ::-1, ::-1]
    if how == "readonly":
        y = x.copy()
        y.setflags(write=False)
        return y
    if how == "broadcast":  # zero strides along a batch dim
        return np.broadcast_to(x[:1], x.shape)
    if how == "prefix":  # the first rows of a longer buffer (a KV cache's valid tokens)
        big = np.full(x.shape[:-2] + (x.shape[-2] + 9, x.shape[-1]), np.nan if x.dtype.kind == "f" else True, x.dtype)
        big[..., : x.shape[-2], :] = x
        return big[..., : x.shape[-2], :]
    if how == "middle":  # rows in the middle of a longer buffer
        big = np.full(x.shape[:-2] + (x.shape[-2] + 9, x.shape[-1]), np.nan if x.dtype.kind == "f" else True, x.dtype)
        big[..., 4 : 4 + x.shape[-2], :] = x
        return big[..., 4 : 4 + x.shape[-2], :]
    if how == "every_other_entry":  # every other batch entry of a larger buffer
        big = np.full((2,) + x.shape, np.nan if x.dtype.kind == "f" else True, x.dtype)
        big[0] = x
        return np.moveaxis(big, 0, -3)[..., 0, :, :] if x.ndim >= 3 else big[0]
    raise ValueError(how)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    "how", ["strided", "fortran", "reversed", "readonly", "broadcast", "prefix", "middle", "every_other_entry"]
)
@pytest.mark.parametrize("which", ["query", "key", "value", "attn_mask", "all"])
def test_layouts(dtype, how, which):
    rng = np.random.default_rng(11)
    arrays = dict(
        query=randn(rng, (2, 3, 33, 10), dtype),
        key=randn(rng, (2, 3, 41, 10), dtype),
        value=randn(rng, (2, 3, 41, 6), dtype),
        attn_mask=random_bool_mask(rng, (2, 3, 33, 41), 0.7, masked_rows=2),
    )
    for name in arrays:
        if which in (name, "all"):
            arrays[name] = _layout(arrays[name], how)
    before = copies(*arrays.values())
    plain = {name: np.array(a) for name, a in arrays.items()}
    out, lse = scaled_dot_product_attention(**arrays, is_causal="lower_right", return_lse=True)
    assert_unchanged(list(arrays.values()), before)
    ref_out, ref_lse = reference_sdpa(**plain, is_causal="lower_right")
    assert_close(out, ref_out, dtype)
    assert_close(lse, ref_lse, dtype)
    # and the same bits as with contiguous copies
    np.testing.assert_array_equal(out, scaled_dot_product_attention(**plain, is_causal="lower_right"))


@pytest.mark.parametrize("dtype", DTYPES)
def test_float_mask_layouts_and_inputs_unchanged(dtype):
    rng = np.random.default_rng(12)
    q, k, v = randn(rng, (4, 30, 8), dtype), randn(rng, (4, 50, 8), dtype), randn(rng, (4, 50, 8), dtype)
    mask = random_float_mask(rng, (50, 30), np.float64, 0.3).T  # transposed view, other dtype
    mask.setflags(write=False)
    before = copies(q, k, v, mask)
    out = scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=True)
    assert_unchanged([q, k, v, mask], before)
    assert_close(out, reference.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=True), dtype)
    w = attention_weights(q, k, attn_mask=mask, is_causal=True)
    assert_unchanged([q, k, v, mask], before)
    assert_close(w, reference.attention_weights(q, k, attn_mask=mask, is_causal=True), dtype)


# ----------------------------------------------------------------------------------------------
# dtypes, array-likes, scale, argument spellings
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dq", DTYPES)
@pytest.mark.parametrize("dk", DTYPES)
@pytest.mark.parametrize("dv", DTYPES)
@pytest.mark.parametrize("mask_dtype", [None, np.bool_, np.float32, np.float64])
def test_result_dtype(dq, dk, dv, mask_dtype):
    """The result (and lse) come in np.result_type(query, key, value); the mask does not count."""
    rng = np.random.default_rng(13)
    q, k, v = randn(rng, (2, 9, 5), dq), randn(rng, (2, 11, 5), dk), randn(rng, (2, 11, 3), dv)
    if mask_dtype is None:
        mask = None
    elif mask_dtype is np.bool_:
        mask = random_bool_mask(rng, (9, 11), 0.6, masked_rows=1)
    else:
        mask = random_float_mask(rng, (9, 11), mask_dtype, 0.3)
    expected = np.result_type(dq, dk, dv)
    out, lse = scaled_dot_product_attention(q, k, v, attn_mask=mask, return_lse=True)
    assert out.dtype == expected and lse.dtype == expected
    ref_out, ref_lse = reference_sdpa(q, k, v, attn_mask=mask)
    # float32 operands upcast exactly: a float64 result has float64 accuracy
    assert_close(out, ref_out, expected)
    assert_close(lse, ref_lse, expected)
    w = attention_weights(q, k, attn_mask=mask)
    assert w.dtype == np.result_type(dq, dk)


def test_mixed_float32_float64_is_float64():
    rng = np.random.default_rng(14)
    q = randn(rng, (3, 40, 16), np.float32)
    k = randn(rng, (3, 60, 16), np.float64)
    v = randn(rng, (3, 60, 16), np.float32)
    out = scaled_dot_product_attention(q, k, v, is_causal=True)
    assert out.dtype == np.float64
    assert_close(out, reference.scaled_dot_product_attention(q, k, v, is_causal=True), np.float64)


@pytest.mark.parametrize("dtype", DTYPES)
def test_array_likes(dtype):
    rng = np.random.default_rng(15)
    q, k, v = randn(rng, (2, 4, 3), dtype), randn(rng, (2, 5, 3), dtype), randn(rng, (2, 5, 2), dtype)
    mask = random_bool_mask(rng, (4, 5), 0.6, masked_rows=1)
    ref = reference.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal="lower_right")
    out = scaled_dot_product_attention(
        q.tolist(), tuple(k.tolist()), v.tolist(), attn_mask=mask.tolist(), is_causal="lower_right"
    )
    assert out.dtype == np.float64  # python floats are float64 (and hold the float32 values exactly)
    assert_close(out, ref, np.float64)
    w = attention_weights(q.tolist(), k.tolist(), attn_mask=mask.tolist())
    assert w.dtype == np.float64
    assert_close(w, reference.attention_weights(q, k, attn_mask=mask), np.float64)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("scale", [None, 0.01, 0.5, 2, np.float32(0.3), np.float64(1.7), 7])
def test_scale(dtype, scale):
    rng = np.random.default_rng(16)
    q, k, v = randn(rng, (3, 20, 9), dtype), randn(rng, (3, 30, 9), dtype), randn(rng, (3, 30, 4), dtype)
    out, lse = scaled_dot_product_attention(q, k, v, scale=scale, return_lse=True)
    ref_out, ref_lse = reference_sdpa(q, k, v, scale=scale)
    assert_close(out, ref_out, dtype)
    assert_close(lse, ref_lse, dtype)
    if scale is None:  # the default is 1/sqrt(E)
        np.testing.assert_array_equal(out, scaled_dot_product_attention(q, k, v, scale=1 / np.sqrt(9)))


def test_argument_spellings_are_equivalent():
    rng = np.random.default_rng(17)
    q, k, v = randn(rng, (2, 9, 4)), randn(rng, (2, 9, 4)), randn(rng, (2, 9, 3))
    upper = scaled_dot_product_attention(q, k, v, is_causal="upper_left")
    for spelling in (True, np.bool_(True)):
        np.testing.assert_array_equal(scaled_dot_product_attention(q, k, v, is_causal=spelling), upper)
    plain = scaled_dot_product_attention(q, k, v)
    for spelling in (False, np.bool_(False), None):
        np.testing.assert_array_equal(scaled_dot_product_attention(q, k, v, is_causal=spelling), plain)
    for dropout in (0, 0.0, np.float64(0.0)):
        np.testing.assert_array_equal(scaled_dot_product_attention(q, k, v, dropout_p=dropout), plain)
    # L == S: the two causal alignments coincide
    np.testing.assert_array_equal(scaled_dot_product_attention(q, k, v, is_causal="lower_right"), upper)
    # an all-True mask is no mask, an all-zero float mask too
    assert_close(scaled_dot_product_attention(q, k, v, attn_mask=np.ones((9, 9), bool)), plain, np.float64)
    assert_close(scaled_dot_product_attention(q, k, v, attn_mask=np.zeros(9)), plain, np.float64)


# ----------------------------------------------------------------------------------------------
# grouped-query attention
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("H,Hkv", [(4, 1), (4, 2), (6, 3), (5, 5), (8, 2)])
def test_gqa_matches_repeated_heads(dtype, H, Hkv):
    rng = np.random.default_rng(18)
    q = randn(rng, (2, H, 20, 8), dtype)
    k, v = randn(rng, (2, Hkv, 35, 8), dtype), randn(rng, (1, Hkv, 35, 5), dtype)
    mask = random_bool_mask(rng, (2, 1, 20, 35), 0.7, masked_rows=1)
    out = scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal="lower_right", enable_gqa=True)
    # query head h uses key/value head h // (H // Hkv)
    g = H // Hkv
    k_rep, v_rep = np.repeat(k, g, axis=1), np.repeat(v, g, axis=1)
    expected = reference.scaled_dot_product_attention(q, k_rep, v_rep, attn_mask=mask, is_causal="lower_right")
    assert_close(out, expected, dtype)
    np.testing.assert_array_equal(
        out, scaled_dot_product_attention(q, k_rep, v_rep, attn_mask=mask, is_causal="lower_right")
    )


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("H,Hkv", [(4, 2), (6, 3), (3, 3), (4, 1)])
def test_attention_weights_gqa(dtype, H, Hkv):
    rng = np.random.default_rng(19)
    q, k = randn(rng, (2, H, 6, 8), dtype), randn(rng, (2, Hkv, 10, 8), dtype)
    w = attention_weights(q, k, is_causal=True, enable_gqa=True)
    assert w.shape == (2, H, 6, 10)
    assert_close(w, reference.attention_weights(q, k, is_causal=True, enable_gqa=True), dtype)


# ----------------------------------------------------------------------------------------------
# attention_weights specifics
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
def test_weights_are_the_weights_sdpa_uses(dtype):
    rng = np.random.default_rng(20)
    q, k, v = randn(rng, (3, 25, 7), dtype), randn(rng, (3, 40, 7), dtype), randn(rng, (3, 40, 5), dtype)
    mask = random_float_mask(rng, (25, 40), dtype, 0.4, masked_rows=2)
    w = attention_weights(q, k, attn_mask=mask, scale=0.8)
    out = scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=0.8)
    assert_close(out, w.astype(np.float64) @ v.astype(np.float64), dtype)
    rows = w.sum(axis=-1, dtype=np.float64)
    dead = np.isneginf(mask).all(axis=-1)
    np.testing.assert_allclose(rows[:, ~dead], 1.0, rtol=10 * np.finfo(dtype).eps * 40)
    assert (w[:, dead] == 0).all()


def test_attention_weights_refuses_huge_matrices(monkeypatch):
    monkeypatch.setattr(config, "MAX_WEIGHTS_ELEMENTS", 1000)
    rng = np.random.default_rng(21)
    q, k = randn(rng, (2, 20, 4)), randn(rng, (2, 100, 4))
    with pytest.raises(ValueError, match="attention_weights"):
        attention_weights(q, k)
    w = attention_weights(q[:1, :10], k[:1])  # exactly the limit (1·10·100) is fine
    assert_close(w, reference.attention_weights(q[:1, :10], k[:1]), np.float64)


def test_attention_weights_bounds_its_identity_temporary(monkeypatch):
    """The guard bounded the (..., L, S) result but the (S, S) identity "value" it built was not:
    q (1, 64) against k (50000, 64) passed and asked for 9.3 GiB. The identity now comes a block of
    columns at a time, none over MAX_WEIGHTS_ELEMENTS (S × columns), and the weights are unchanged."""
    rng = np.random.default_rng(22)
    q, k = randn(rng, (2, 3, 5, 16)), randn(rng, (2, 3, 700, 16))
    mask = rng.random((5, 700)) < 0.7
    ref = reference.attention_weights(q, k, attn_mask=mask, is_causal="lower_right")
    whole = attention_weights(q, k, attn_mask=mask, is_causal="lower_right")
    biggest = []
    real = api.scaled_dot_product_attention

    def spy(query, key, value, **kwargs):
        biggest.append(np.asarray(value).shape[-2] * np.asarray(value).shape[-1])
        return real(query, key, value, **kwargs)

    monkeypatch.setattr(config, "MAX_WEIGHTS_ELEMENTS", 2 * 3 * 5 * 700)
    monkeypatch.setattr(api, "scaled_dot_product_attention", spy)
    chunked = attention_weights(q, k, attn_mask=mask, is_causal="lower_right")
    assert len(biggest) > 1 and max(biggest) <= 2 * 3 * 5 * 700 < 700 * 700
    np.testing.assert_allclose(chunked, whole, rtol=1e-13, atol=1e-16)  # same kernel, other value tiling
    assert_close(chunked, ref, np.float64)


# ----------------------------------------------------------------------------------------------
# log-sum-exp: merging partial results over disjoint key sets
# ----------------------------------------------------------------------------------------------


def _merge(o1, l1, o2, l2):
    lse = np.logaddexp(l1, l2)
    with np.errstate(invalid="ignore"):
        w1 = np.where(np.isneginf(lse), 0.0, np.exp(l1 - lse))
        w2 = np.where(np.isneginf(lse), 0.0, np.exp(l2 - lse))
    return w1[..., None] * o1 + w2[..., None] * o2, lse


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("split", [1, 64, 129, 200])
@pytest.mark.parametrize("mask_kind", [None, "bool", "causal"])
def test_lse_merges_disjoint_key_halves(dtype, split, mask_kind):
    rng = np.random.default_rng(22)
    L, S = 150, 257
    q, k, v = randn(rng, (2, 2, L, 16), dtype), randn(rng, (2, 2, S, 16), dtype), randn(rng, (2, 2, S, 8), dtype)
    if mask_kind == "bool":
        mask = random_bool_mask(rng, (2, 1, L, S), 0.6, masked_rows=3)
        mask[:, :, 5, :split] = False  # a row masked in the first part only
        mask[:, :, 6, split:] = False  # and one in the second part only
    elif mask_kind == "causal":  # lower_right split by key: an explicit mask per part
        mask = reference.causal_mask(L, S, "lower_right")
    else:
        mask = None
    full, full_lse = scaled_dot_product_attention(q, k, v, attn_mask=mask, return_lse=True)
    parts = []
    for sl in (slice(None, split), slice(split, None)):
        m = None if mask is None else mask[..., sl]
        parts.append(scaled_dot_product_attention(q, k[..., sl, :], v[..., sl, :], attn_mask=m, return_lse=True))
    merged, merged_lse = _merge(*parts[0], *parts[1])
    assert_close(merged, full.astype(np.float64), dtype)
    assert_close(merged_lse, full_lse.astype(np.float64), dtype)
    ref_out, ref_lse = reference_sdpa(q, k, v, attn_mask=mask)
    assert_close(merged, ref_out, dtype)
    assert_close(merged_lse, ref_lse, dtype)


# ----------------------------------------------------------------------------------------------
# threads
# ----------------------------------------------------------------------------------------------


def test_concurrent_calls_from_threads(kernel_spy):
    """4 Python threads calling at once (parallel prefill and parallel decode kernels) get the results
    of one-at-a-time calls, bit for bit."""
    rng = np.random.default_rng(23)
    cases = []
    for i, dtype in enumerate([np.float32, np.float64, np.float32, np.float64, np.float32, np.float64]):
        L, S = (160, 200) if i < 4 else (4, 2048)  # the last two take the decode kernel
        q = randn(rng, (2, 4, L, 32), dtype)
        k, v = randn(rng, (2, 4, S, 32), dtype), randn(rng, (2, 4, S, 32), dtype)
        mask = random_bool_mask(rng, (L, S), 0.8, masked_rows=1) if i % 2 else None
        causal = ["lower_right", False, True, "upper_left", "lower_right", False][i]
        cases.append(dict(query=q, key=k, value=v, attn_mask=mask, is_causal=causal))
        assert 2 * 4 * L * S * 64 >= config.SERIAL_BELOW_FLOPS  # the parallel kernels
    serial = [scaled_dot_product_attention(**c, return_lse=True) for c in cases]
    assert kernel_spy.ran() == {"prefill_parallel": 4, "decode_parallel": 2}

    def run(i):
        return i, scaled_dot_product_attention(**cases[i], return_lse=True)

    with concurrent.futures.ThreadPoolExecutor(max_workers=4) as pool:
        results = list(pool.map(run, [i % len(cases) for i in range(16)]))
    for i, (out, lse) in results:
        np.testing.assert_array_equal(out, serial[i][0])
        np.testing.assert_array_equal(lse, serial[i][1])
    for c, (out, _) in zip(cases, serial):
        assert_close(out, reference.scaled_dot_product_attention(**c), out.dtype)


# ----------------------------------------------------------------------------------------------
# PyTorch (collected only where torch is installed)
# ----------------------------------------------------------------------------------------------

if torch is not None:
    TORCH_CASES = [
        # (L, S, E, Ev, H, Hkv, mask kind, is_causal)
        (17, 33, 16, 8, 4, 4, None, False),
        (33, 17, 16, 8, 4, 4, None, True),  # L > S, upper_left
        (17, 33, 16, 8, 4, 4, None, True),  # L < S, upper_left
        (40, 40, 7, 13, 2, 2, None, True),
        (20, 130, 32, 32, 4, 4, "bool", False),
        (20, 130, 32, 32, 4, 4, "float", False),
        (20, 130, 32, 32, 4, 4, "lower_right", False),  # lower_right as an explicit mask for torch
        (25, 30, 8, 8, 8, 2, None, False),  # GQA
        (25, 30, 8, 8, 6, 3, "bool", False),
        (150, 150, 64, 64, 4, 1, None, True),
    ]

    @pytest.mark.parametrize("dtype", DTYPES)
    @pytest.mark.parametrize("L,S,E,Ev,H,Hkv,mask_kind,causal", TORCH_CASES)
    def test_matches_torch(dtype, L, S, E, Ev, H, Hkv, mask_kind, causal):
        rng = np.random.default_rng(24)
        q = randn(rng, (2, H, L, E), dtype)
        k, v = randn(rng, (2, Hkv, S, E), dtype), randn(rng, (2, Hkv, S, Ev), dtype)
        if mask_kind == "bool":
            mask = random_bool_mask(rng, (2, 1, L, S), 0.5)
            mask[..., 0] = True  # torch gives NaN for fully-masked rows: keep one key per row
        elif mask_kind == "float":
            mask = random_float_mask(rng, (L, S), dtype, 0.5, 2.0)
            mask[..., 0] = 0.0
        elif mask_kind == "lower_right":
            mask = reference.causal_mask(L, S, "lower_right")
        else:
            mask = None
        gqa = H != Hkv
        ours = scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal, enable_gqa=gqa)
        t = torch.nn.functional.scaled_dot_product_attention(
            torch.from_numpy(q),
            torch.from_numpy(k),
            torch.from_numpy(v),
            attn_mask=None if mask is None else torch.from_numpy(mask),
            is_causal=causal,
            enable_gqa=gqa,
        )
        theirs = t.numpy()
        assert theirs.dtype == ours.dtype
        assert_close(ours, theirs.astype(np.float64), dtype)
        if mask_kind == "lower_right":
            np.testing.assert_array_equal(
                ours, scaled_dot_product_attention(q, k, v, is_causal="lower_right", enable_gqa=gqa)
            )


# ----------------------------------------------------------------------------------------------
# compilation: broadcasting patterns must not multiply kernel specialisations
# ----------------------------------------------------------------------------------------------


def test_broadcasting_does_not_multiply_compilations(monkeypatch):
    """``_validate`` normalises operands to one numba type whatever the caller passed (read-only,
    C-contiguous). Broadcast batch dims and grouped-query heads must not change the kernel's argument
    types either, or every new broadcasting pattern costs a fresh compilation of the kernel (seconds)."""
    import numba

    from numba_attn.kernels import prefill

    seen = []
    original = prefill.prefill_serial

    def record(*args):
        seen.append(tuple(numba.typeof(a) for a in args))
        return original(*args)

    monkeypatch.setattr(prefill, "prefill_serial", record)
    rng = np.random.default_rng(25)
    q, k, v = randn(rng, (2, 4, 5, 8)), randn(rng, (2, 4, 6, 8)), randn(rng, (2, 4, 6, 3))
    variants = [
        (q, k, v, False),  # same batch everywhere
        (q, k[:1], v, False),  # key broadcast over dim 0
        (q[0], k, v, False),  # query with fewer batch dims
        (q, k[:, :2], v[:, :2], True),  # grouped-query heads
        (q, k[0, 0], v[0, 0], False),  # 2-D key/value
    ]
    for qq, kk, vv, gqa in variants:
        out = scaled_dot_product_attention(qq, kk, vv, enable_gqa=gqa)
        assert_close(out, reference.scaled_dot_product_attention(qq, kk, vv, enable_gqa=gqa), np.float64)
    assert len(seen) == len(variants)
    differ = [i for i, types in enumerate(seen) if types != seen[0]]
    detail = {
        i: [f"arg {a}: {t0} -> {t}" for a, (t, t0) in enumerate(zip(seen[i], seen[0])) if t != t0] for i in differ
    }
    assert not differ, f"variants {differ} call the kernel with other argument types: {detail}"


@pytest.mark.parametrize("kernel_kind", ["prefill", "decode"])
@pytest.mark.parametrize("feature", ["window", "softcap", "alibi", "mask"])
def test_the_plain_kernel_build_is_chosen_only_without_score_features(kernel_kind, feature):
    """``api._score_features``: a call with no mask, ALiBi, soft-cap or window runs the kernels' plain
    build (score_features None: compiled without that code); a call with one of them the full build
    (True); and the plain build, handed one of them, raises instead of ignoring it."""
    from numba_attn import bench

    rng = np.random.default_rng(3)
    L, S = (40, 40) if kernel_kind == "prefill" else (1, 300)
    q = rng.standard_normal((1, 2, L, 16), dtype=np.float32)
    k = rng.standard_normal((1, 2, S, 16), dtype=np.float32)
    options = {
        "window": dict(is_causal="lower_right", window=8),
        "softcap": dict(softcap=30.0),
        "alibi": dict(alibi_slopes=np.array([0.5, 0.25])),
        "mask": dict(attn_mask=rng.standard_normal((L, S)).astype(np.float32)),
    }[feature]
    plain_kernel, plain = bench._captured_kernel_call(
        lambda: scaled_dot_product_attention(q, k, k, is_causal="lower_right")
    )
    kernel, args = bench._captured_kernel_call(lambda: scaled_dot_product_attention(q, k, k, **options))
    assert kernel_kind in plain_kernel.py_func.__name__ and kernel_kind in kernel.py_func.__name__
    at = list(inspect.signature(kernel.py_func).parameters).index("score_features")
    assert plain[at] is None and args[at] is True
    with pytest.raises(ValueError, match="score_features=None with a mask, ALiBi, soft-cap or window"):
        kernel(*args[:at], None, *args[at + 1 :])
