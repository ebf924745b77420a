"""numba_attn.Rotary: rotary position embedding against a float64 numpy formula, both pairings."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import assert_unchanged, copies, randn
from numba_attn import MultiHeadAttention, Rotary


def reference(x, positions, base, interleaved):
    """float64: plane i of row x at position p, pair (i, i + D/2) or (2i, 2i + 1), turned by p·base^(−2i/D)."""
    x = np.asarray(x, np.float64)
    D = x.shape[-1]
    half = D // 2
    inv_freq = 1.0 / base ** (np.arange(0, D, 2, dtype=np.float64) / D)  # f_i, as Rotary computes it
    angles = np.asarray(positions, np.float64)[:, None] * inv_freq[None, :]
    cos, sin = np.cos(angles), np.sin(angles)
    if interleaved:
        a, b = x[..., 0::2], x[..., 1::2]
    else:
        a, b = x[..., :half], x[..., half:]
    ra, rb = a * cos - b * sin, b * cos + a * sin
    out = np.empty_like(x)
    if interleaved:
        out[..., 0::2], out[..., 1::2] = ra, rb
    else:
        out[..., :half], out[..., half:] = ra, rb
    return out


@settings(max_examples=40, deadline=None)
@given(
    B=st.integers(1, 2),
    H=st.integers(1, 4),
    groups=st.sampled_from([1, 2, 4]),
    T=st.integers(0, 6),
    half=st.integers(1, 40),
    base=st.sampled_from([10000.0, 100000.0, 2.5]),
    start=st.sampled_from([0, 7, 60, 5000]),
    max_positions=st.sampled_from([0, 64, 4096]),
    interleaved=st.booleans(),
    dtype=st.sampled_from([np.float16, np.float32, np.float64]),
    strided=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_matches_float64_formula(B, H, groups, T, half, base, start, max_positions, interleaved, dtype, strided, seed):
    """q and k rotated in one call, tabled positions and computed ones (past max_positions) alike,
    within a few float32 roundings of the float64 formula (float64 rows: of float64's)."""
    rng = np.random.default_rng(seed)
    D = 2 * half
    H_kv = max(1, H // groups)
    if strided:  # (B, T, H, D) views transposed, as the layer's projections give them
        q = randn(rng, (B, T, H, D), dtype).transpose(0, 2, 1, 3)
        k = randn(rng, (B, T, H_kv, D), dtype).transpose(0, 2, 1, 3)
    else:
        q, k = randn(rng, (B, H, T, D), dtype), randn(rng, (B, H_kv, T, D), dtype)
    positions = start + np.arange(T) * 3
    originals = copies(q, k, positions)
    rope = Rotary(D, base, max_positions=max_positions, interleaved=interleaved)
    q_rot, k_rot = rope(q, k, positions)
    out_dtype = np.float64 if dtype == np.float64 else np.float32
    eps = np.finfo(out_dtype).eps
    for x, got in ((q, q_rot), (k, k_rot)):
        assert got.dtype == out_dtype and got.shape == x.shape and got.flags.c_contiguous
        ref = reference(x, positions, base, interleaved)
        # two products and a sum of float-rounded cos/sin and rows: |error| ≤ ~4 eps·(|a| + |b|)
        magnitude = np.abs(np.asarray(x, np.float64))
        pair = (
            magnitude[..., 0::2] + magnitude[..., 1::2]
            if interleaved
            else magnitude[..., :half] + magnitude[..., half:]
        )
        bound = 4 * eps * (np.repeat(pair, 2, axis=-1) if interleaved else np.concatenate([pair, pair], axis=-1))
        assert np.all(np.abs(got - ref) <= bound)
    assert_unchanged([q, k, positions], originals)
    np.testing.assert_array_equal(rope.rotate(q, positions), q_rot)


def test_position_zero_is_the_identity_and_norms_are_kept():
    rng = np.random.default_rng(1)
    rope = Rotary(64, 100000.0)
    q, k = randn(rng, (1, 9, 3, 64), np.float64), randn(rng, (1, 3, 3, 64), np.float64)
    q_rot, k_rot = rope(q, k, np.array([0, 1, 10**6]))
    np.testing.assert_array_equal(q_rot[:, :, 0], q[:, :, 0])
    np.testing.assert_array_equal(k_rot[:, :, 0], k[:, :, 0])
    np.testing.assert_allclose(np.linalg.norm(q_rot, axis=-1), np.linalg.norm(q, axis=-1), rtol=1e-13)
    # relative: the score of a query and a key depends on their positions' difference only
    a = rope(q[:, :1, :1], k[:, :1, :1], np.array([5]))
    b = rope(q[:, :1, :1], k[:, :1, :1], np.array([1005]))
    assert np.isclose((a[0] * a[1]).sum(), (q[:, :1, :1] * k[:, :1, :1]).sum(), rtol=1e-12)  # same position
    assert np.isclose((a[0] * a[1]).sum(), (b[0] * b[1]).sum(), rtol=1e-12)


@pytest.mark.parametrize("interleaved", [False, True])
def test_layer_with_rotary_equals_a_numpy_rope(interleaved):
    """MultiHeadAttention(rotary=Rotary(...)) gives what the same layer gives with a numpy RoPE, prompt
    and decode steps from a cache."""
    base = 10000.0
    layer = MultiHeadAttention(48, 6, num_kv_heads=2, seed=3)
    rope = Rotary(8, base, max_positions=16, interleaved=interleaved)  # the decode goes past the table

    def numpy_rope(q, k, positions):
        return (
            reference(q, positions, base, interleaved).astype(np.float32),
            reference(k, positions, base, interleaved).astype(np.float32),
        )

    rng = np.random.default_rng(2)
    x = randn(rng, (1, 12, 48), np.float32)
    cache_a, cache_b = layer.new_cache(1, 40), layer.new_cache(1, 40)
    for chunk in (x, *(randn(rng, (1, 1, 48), np.float32) for _ in range(8))):
        got = layer(chunk, cache=cache_a, rotary=rope)
        want = layer(chunk, cache=cache_b, rotary=numpy_rope)
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "make, error, words",
    [
        (lambda: Rotary(63), ValueError, "head_dim must be a positive even int"),
        (lambda: Rotary(0), ValueError, "head_dim must be a positive even int"),
        (lambda: Rotary(64, base=1.0), ValueError, "base must be a finite number > 1"),
        (lambda: Rotary(64, base=float("inf")), ValueError, "base must be a finite number > 1"),
        (lambda: Rotary(64, max_positions=-1), ValueError, "max_positions must be a non-negative int"),
        (
            lambda: Rotary(4)(np.ones((1, 1, 2, 4), np.int32), np.ones((1, 1, 2, 4)), [0, 1]),
            TypeError,
            "q must be a float16",
        ),
        (
            lambda: Rotary(4)(np.ones((1, 1, 2, 6)), np.ones((1, 1, 2, 4)), [0, 1]),
            ValueError,
            "q must have shape (batch, heads, T, head_dim=4)",
        ),
        (
            lambda: Rotary(4)(np.ones((1, 1, 2, 4)), np.ones((1, 1, 3, 4)), [0, 1]),
            ValueError,
            "k must have q's batch and token count",
        ),
        (
            lambda: Rotary(4)(np.ones((1, 1, 2, 4)), np.ones((1, 1, 2, 4)), [0.0, 1.0]),
            TypeError,
            "positions must be an integer array",
        ),
        (
            lambda: Rotary(4)(np.ones((1, 1, 2, 4)), np.ones((1, 1, 2, 4)), [0, 1, 2]),
            ValueError,
            "positions must have shape (T,) = (2,)",
        ),
        (lambda: Rotary(4)(np.ones((1, 1, 2, 4)), np.ones((1, 1, 2, 4)), [0, -1]), ValueError, "non-negative"),
        (lambda: Rotary(4).rotate(np.ones((2, 4)), [0, 1]), ValueError, "x must have shape"),
    ],
)
def test_bad_input(make, error, words):
    with pytest.raises(error) as info:
        make()
    assert words in str(info.value)
