"""kernels/prefill.py and its vector-IR softmax step (``_prefill_tiles.softmax_tile``): the register
tile's streaming-softmax step against the plain-loop ``online_softmax_block`` (the same maths) on
random score blocks with masked (-inf) keys, fully masked rows, running maxima that move or stay,
and the finite check; the raw-score check of adjusted blocks (``check_tile`` against the loops); masked
tiles that hide a non-finite key; and the row groups of a prefill work item (padding rows, causal skipping per
group) against the float64 formula."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from numba import njit

from conftest import cache_reference, exact_values
from numba_attn import KVCache, quantize, scaled_dot_product_attention
from numba_attn.kernels._prefill_tiles import W, softmax_tile
from numba_attn.kernels.prefill import check_score_block, online_softmax_block
from numba_attn.reference import scaled_dot_product_attention as reference


@njit
def _tile_step(st, nk, m, l, alpha, chk, check):
    softmax_tile(st, nk, m, l, alpha, chk, check)


@njit
def _loop_step(st, nk, m, l, alpha, chk, check):
    m_blk = np.empty(st.shape[1], st.dtype)
    online_softmax_block(st, nk, st.shape[1], m, l, alpha, m_blk, chk, check)


@given(
    nk=st.integers(0, 70),
    masked=st.floats(0.0, 1.0),
    start=st.sampled_from(["fresh", "running", "masked so far"]),
    check=st.booleans(),
    spread=st.sampled_from([0.1, 3.0, 40.0]),
    seed=st.integers(0, 2**32 - 1),
)
@settings(max_examples=60, deadline=None)
def test_softmax_tile_matches_the_plain_loops(nk, masked, start, check, spread, seed):
    rng = np.random.default_rng(seed)
    scores = (rng.standard_normal((nk + 3, W)) * spread).astype(np.float32)
    scores[:nk][rng.random((nk, W)) < masked] = -np.inf
    scores[:nk, rng.integers(0, W)] = -np.inf  # one row fully masked in this block
    if start == "fresh":
        m0, l0 = np.full(W, -np.inf, np.float32), np.zeros(W, np.float32)
    else:
        m0 = (rng.standard_normal(W) * spread).astype(np.float32)
        l0 = rng.uniform(0.5, 20, W).astype(np.float32)
        if start == "masked so far":
            m0[::3], l0[::3] = -np.inf, 0.0
    chk0 = np.zeros(W, np.float32)
    a = [scores.copy(), m0.copy(), l0.copy(), np.full(W, 7.0, np.float32), chk0.copy()]
    b = [scores.copy(), m0.copy(), l0.copy(), np.full(W, 7.0, np.float32), chk0.copy()]
    _tile_step(a[0], nk, a[1], a[2], a[3], a[4], check)
    _loop_step(b[0], nk, b[1], b[2], b[3], b[4], check)
    np.testing.assert_array_equal(a[1], b[1])  # running max: exact
    np.testing.assert_array_equal(a[0][nk:], scores[nk:])  # rows past nk untouched
    for x, y in ((a[0][:nk], b[0][:nk]), (a[2], b[2]), (a[3], b[3])):
        np.testing.assert_allclose(x, y, rtol=4e-6 * max(1, nk) ** 0.5, atol=1e-37)
    assert ((a[0][:nk] == 0) == (b[0][:nk] == 0)).all()  # masked keys give exactly 0
    np.testing.assert_array_equal(a[4], b[4])


def test_softmax_tile_flags_non_finite_scores_only_when_checking():
    scores = np.zeros((5, W), np.float32)
    scores[2, 3] = np.nan
    scores[4, W - 1] = np.inf
    for check in (True, False):
        m, l = np.full(W, -np.inf, np.float32), np.zeros(W, np.float32)
        alpha, chk = np.empty(W, np.float32), np.zeros(W, np.float32)
        _tile_step(scores.copy(), 5, m, l, alpha, chk, check)
        bad = ~np.isfinite(chk) | (chk != 0)
        assert list(np.flatnonzero(bad)) == ([3, W - 1] if check else [])


@njit
def _check_block(st, nk, nr, chk):
    check_score_block(st, nk, nr, chk)


@given(
    nk=st.integers(0, 40),
    bad=st.lists(st.tuples(st.integers(0, 45), st.integers(0, W - 1), st.sampled_from([np.nan, np.inf, -np.inf]))),
    big=st.booleans(),
)
@settings(max_examples=60, deadline=None)
def test_score_check_flags_exactly_the_rows_with_non_finite_raw_scores(nk, bad, big):
    """``check_score_block`` on a whole float32 tile (``_prefill_tiles.check_tile``, an integer max of
    exponent fields) and on fewer rows (the plain loops): NaN in chk for each row with a NaN or ±inf among
    its first nk scores, nothing for the others (largest finite float32 values included), nothing for the
    scores past nk, and the loops agree with the tile."""
    scores = np.random.default_rng(nk).standard_normal((46, W)).astype(np.float32)
    if big:
        scores[::3] = np.float32(3.4e38)  # the largest exponent below inf's
    for j, r, x in bad:
        scores[j, r] = x
    expected = ~np.isfinite(scores[:nk]).all(axis=0) if nk else np.zeros(W, bool)
    tile, loops = np.zeros(W, np.float32), np.zeros(W, np.float32)
    _check_block(scores, nk, W, tile)
    _check_block(scores, nk, W - 1, loops)  # fewer rows than the tile: the loops
    assert list(np.isnan(tile)) == list(expected)
    assert list(np.isnan(loops[: W - 1])) == list(expected[: W - 1]) and loops[W - 1] == 0


@pytest.mark.parametrize("mask_kind", ["bool", "float", "key padding"])
@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_masked_tiles_refuse_a_non_finite_key_that_the_mask_hides(mask_kind, bad):
    """float32, whole register tiles: a key holding NaN/inf is refused even where the mask hides it from
    every query (the raw scores are checked before the mask adds its -inf); without the check the visible
    keys' result is unspecified but the call returns."""
    rng = np.random.default_rng(7)
    L, S = 2 * W, 3 * W
    q, k, v = (rng.standard_normal((1, 2, n, 32)).astype(np.float32) for n in (L, S, S))
    k[0, 1, 5, 3] = bad
    keep = np.ones((L, S), bool)
    keep[:, 5] = False
    mask = {"bool": keep, "float": np.where(keep, np.float32(0.5), np.float32(-np.inf)), "key padding": keep[:1]}
    with pytest.raises(ValueError, match="key contains"):
        scaled_dot_product_attention(q, k, v, attn_mask=mask[mask_kind])
    out = scaled_dot_product_attention(q, k, v, attn_mask=mask[mask_kind], check_finite=False)
    assert out.shape == (1, 2, L, 32)
    expected = reference(*(x.astype(np.float64)[:, :1] for x in (q, k, v)), attn_mask=mask[mask_kind])
    np.testing.assert_allclose(out[:, :1], expected, atol=2e-6, rtol=2e-6)  # the head without the bad key


@pytest.mark.parametrize("dtype", [np.float32, np.float16, np.float64])
@pytest.mark.parametrize("is_causal", [False, True, "lower_right"])
@pytest.mark.parametrize(
    "L, S", [(5, 20), (W + W // 8, 50), (W + W // 8 - 1, 50), (W + 1, W + 1), (3 * W - 5, 200), (300, 129)]
)
def test_row_groups_match_the_formula(dtype, is_causal, L, S):
    """Item rows in groups of W (the last group padded with zero query rows when at least W/8 full,
    else computed alone), causal keys skipped per group: every row against the float64 formula."""
    rng = np.random.default_rng(L * 1000 + S)
    q, k, v = (rng.standard_normal((2, 3, n, 32)).astype(dtype) for n in (L, S, S))
    out = scaled_dot_product_attention(q, k, v, is_causal=is_causal)
    expected = reference(*(x.astype(np.float64) for x in (q, k, v)), is_causal=is_causal)
    tol = {np.float16: 4e-3, np.float32: 2e-6, np.float64: 1e-12}[dtype]
    np.testing.assert_allclose(out.astype(np.float64), expected, atol=tol, rtol=tol)


@pytest.mark.parametrize("dtype", [np.float32, np.float16, np.float64])
@pytest.mark.parametrize("kind", ["bool", "float"])
@pytest.mark.parametrize("mask_shape", ["L S", "1 S", "L 1", "B H L S"])
@pytest.mark.parametrize("L, S", [(20, 24), (W + 3, 2 * W + 5), (3 * W, 130), (37, 300)])
def test_masks_match_the_formula(dtype, kind, mask_shape, L, S):
    """Masks applied VW × VW at a time (transposed in registers) where they vary along both axes, by
    lines elsewhere and for the blocks' edges; rows that a boolean mask hides entirely give zeros."""
    rng = np.random.default_rng(L * 7 + S)
    q, k, v = (rng.standard_normal((2, 3, n, 32)).astype(dtype) for n in (L, S, S))
    shape = {"L S": (L, S), "1 S": (1, S), "L 1": (L, 1), "B H L S": (2, 3, L, S)}[mask_shape]
    if kind == "bool":
        mask = rng.random(shape) > 0.3
        if mask_shape != "1 S":
            mask[..., 1, :] = False  # a fully hidden row
    else:
        mask = (rng.standard_normal(shape) * 3).astype(np.float32 if dtype != np.float64 else dtype)
    out = scaled_dot_product_attention(q, k, v, attn_mask=mask)
    exact = reference(
        *(x.astype(np.float64) for x in (q, k, v)), attn_mask=mask if kind == "bool" else mask.astype(np.float64)
    )
    tol = {np.float16: 4e-3, np.float32: 2e-6, np.float64: 1e-12}[dtype]
    np.testing.assert_allclose(out.astype(np.float64), np.nan_to_num(exact), atol=tol, rtol=tol)


# ----------------------------------------------------------------------------------------------
# quantised keys/values: each block dequantised once into the float scratch, then the float tiles
# ----------------------------------------------------------------------------------------------


def stored(rng, shape, fmt, offset=0.0):
    """A key/value operand in format ``fmt``: "int8/B" or "int4/B" (B a block, "row" = one per row), or a
    float dtype name."""
    x = (rng.standard_normal(shape) + offset).astype(np.float32)
    if "/" not in fmt:
        return x.astype(fmt)
    bits, block = fmt.split("/")
    return quantize(x, None if block == "row" else int(block), bits=int(bits[3:]))


#: (key format, value format, head dim): int8 per block and per row, 4-bit per block and per row, mixes
#: with each other and with floats; D = 48 with blocks of 16 and 8 (a partial last int8 block, 4-bit half
#: blocks narrower than a vector) and D = 40 take the scalar dequantisation loops where the vector one
#: does not fit
QUANTISED = [
    ("int8/32", "int8/32", 64),
    ("int8/row", "int8/row", 64),
    ("int4/32", "int4/32", 64),
    ("int4/row", "int4/16", 64),
    ("int8/32", "int4/32", 64),
    ("int4/32", "float16", 64),
    ("float32", "int8/16", 64),
    ("int8/32", "int8/8", 48),
    ("int4/16", "int4/8", 48),
    ("int8/8", "int4/8", 40),
]


@pytest.mark.parametrize("kfmt,vfmt,D", QUANTISED, ids=["-".join(map(str, c)) for c in QUANTISED])
@pytest.mark.parametrize("is_causal", [False, True, "lower_right"])
@pytest.mark.parametrize("L, S", [(W + W // 8 - 1, 50), (3 * W - 5, 200), (300, 129)])
def test_quantised_kv_take_the_prefill_kernel(kernel_spy, kfmt, vfmt, D, is_causal, L, S):
    """Grouped-query heads with quantised keys/values against the float64 formula on the exactly
    dequantised keys/values: row groups with padding rows, causal skipping, a boolean mask with a
    fully masked row (the prefill kernel, serial or parallel build)."""
    rng = np.random.default_rng(L * 1000 + S + D)
    q = rng.standard_normal((2, 4, L, D)).astype(np.float32)
    k, v = stored(rng, (2, 2, S, D), kfmt, 0.4), stored(rng, (2, 2, S, D), vfmt, -1.0)
    mask = rng.random((L, S)) < 0.8
    mask[1] = False
    out, lse = scaled_dot_product_attention(
        q, k, v, attn_mask=mask, is_causal=is_causal, enable_gqa=True, return_lse=True
    )
    assert set(kernel_spy.ran()) <= {"prefill_serial", "prefill_parallel"}, kernel_spy.ran()
    assert out.dtype == np.float32  # the float32 query's (quantised operands do not count)
    kw = dict(attn_mask=mask, is_causal=is_causal, enable_gqa=True, return_lse=True)
    expected, expected_lse = reference(q.astype(np.float64), exact_values(k), exact_values(v), **kw)
    np.testing.assert_allclose(out, expected, atol=2e-5, rtol=2e-5)
    np.testing.assert_allclose(lse, expected_lse, atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize("kfmt,vfmt", [("int8/32", "int8/row"), ("int4/32", "int8/16")])
@pytest.mark.parametrize("is_causal", [False, "lower_right"])
def test_float64_query_over_quantised_kv(kernel_spy, kfmt, vfmt, is_causal):
    """A float64 query makes the arithmetic float64, the keys/values dequantised exactly (as decode)."""
    rng = np.random.default_rng(3)
    q = rng.standard_normal((1, 3, 2 * W + 3, 32))
    k, v = stored(rng, (1, 3, 90, 32), kfmt), stored(rng, (1, 3, 90, 32), vfmt)
    out, lse = scaled_dot_product_attention(q, k, v, is_causal=is_causal, return_lse=True)
    assert set(kernel_spy.ran()) <= {"prefill_serial", "prefill_parallel"}, kernel_spy.ran()
    assert out.dtype == np.float64
    expected, expected_lse = reference(q, exact_values(k), exact_values(v), is_causal=is_causal, return_lse=True)
    np.testing.assert_allclose(out, expected, atol=1e-12, rtol=1e-12)
    np.testing.assert_allclose(lse, expected_lse, atol=1e-12, rtol=1e-12)


@given(
    L=st.integers(1, 3 * W + 2),
    S=st.integers(1, 300),
    heads=st.sampled_from([(2, 2), (4, 1), (6, 2)]),
    D=st.sampled_from([16, 32, 64]),
    kfmt=st.sampled_from(["int8/8", "int8/32", "int8/row", "int4/8", "int4/16", "int4/row", "float32"]),
    vfmt=st.sampled_from(["int8/16", "int8/row", "int4/8", "int4/32", "float16"]),
    is_causal=st.sampled_from([False, True, "lower_right"]),
    seed=st.integers(0, 2**32 - 1),
)
@settings(max_examples=40, deadline=None)
def test_quantised_kv_property(L, S, heads, D, kfmt, vfmt, is_causal, seed):
    """Any size, grouping, block and format mix: the formula on the dequantised keys/values (whichever
    kernel the shape takes)."""
    rng = np.random.default_rng(seed)
    H, Hkv = heads
    q = rng.standard_normal((H, L, D)).astype(np.float32)
    k, v = stored(rng, (Hkv, S, D), kfmt, 0.3), stored(rng, (Hkv, S, D), vfmt)
    out = scaled_dot_product_attention(q, k, v, is_causal=is_causal, enable_gqa=True)
    expected = reference(q.astype(np.float64), exact_values(k), exact_values(v), is_causal=is_causal, enable_gqa=True)
    assert out.dtype == np.float32
    np.testing.assert_allclose(out, expected, atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize("kfmt,vfmt", [(np.int8, "int4"), ("int4", "int4"), (np.int8, np.int8)])
@pytest.mark.parametrize("window", [None, 50])
def test_quantised_cache_prefill_chunk(kernel_spy, kfmt, vfmt, window):
    """A prompt-sized chunk attended over a quantised cache (keys and values Hadamard-rotated the
    default way: the query is rotated by ``attend``, the kernel does not care), with and without a
    window, takes the prefill kernel and matches the formula on the stored content."""
    rng = np.random.default_rng(9)
    cache = KVCache(1, 2, 64, 256, key_dtype=kfmt, value_dtype=vfmt)
    cache.append(rng.standard_normal((1, 2, 60, 64)), rng.standard_normal((1, 2, 60, 64)))
    cache.append(rng.standard_normal((1, 2, 40, 64)), rng.standard_normal((1, 2, 40, 64)))
    q = rng.standard_normal((1, 4, 40, 64)).astype(np.float32)
    out = cache.attend(q, window=window)
    assert set(kernel_spy.ran()) == {"prefill_parallel"}, kernel_spy.ran()
    keys, values = (exact_values(x) for x in cache.ordered())
    expected = cache_reference(cache, q, keys, values, is_causal="lower_right", enable_gqa=True, window=window)
    np.testing.assert_allclose(out, expected, atol=2e-5, rtol=2e-5)
