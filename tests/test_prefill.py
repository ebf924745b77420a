"""kernels/prefill.py and its vector-IR softmax step (``_prefill_tiles.softmax_tile``): the register
tile's streaming-softmax step against the plain-loop ``online_softmax_block`` (the same maths) on
random score blocks with masked (-inf) keys, fully masked rows, running maxima that move or stay,
and the finite check; and the row groups of a prefill work item (padding rows, causal skipping per
group) against the float64 formula."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from numba import njit

from numba_attn import scaled_dot_product_attention
from numba_attn.kernels._prefill_tiles import W, softmax_tile
from numba_attn.kernels.prefill import online_softmax_block
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
