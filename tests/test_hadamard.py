"""The normalised Walsh–Hadamard transform (``kernels/hadamard.py``, ``rotation.py``) against an explicit
float64 matrix built here with ``np.kron``, independently of the kernels' butterfly."""

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from numba_attn import rotation
from numba_attn._threads import launch
from numba_attn.kernels.hadamard import hadamard_rows, hadamard_rows_max, hadamard_rows_parallel
from numba_attn.rotation import hadamard_block, hadamard_transform

DIMS = (2, 4, 8, 16, 64, 80, 96, 128, 256)
#: every code path of the kernel: in-register chunks of 2, 4, 8 … 64, then 1 or 2 levels per pass beyond
EXTRA_DIMS = (32, 72, 512, 1024)
DTYPES = (np.float16, np.float32, np.float64)
#: bound on |result − reference| relative to the largest |reference| of the array; float16 inputs are
#: exact in float32, so they are computed (and held to the same bound) as float32
RTOL = {np.float16: 1e-6, np.float32: 1e-6, np.float64: 1e-12}


def sylvester(b):
    """The unnormalised b × b Sylvester–Hadamard matrix (entries ±1)."""
    H = np.ones((1, 1))
    while H.shape[0] < b:
        H = np.kron(np.array([[1.0, 1.0], [1.0, -1.0]]), H)
    return H


def reference_matrix(D, block):
    """diag(H_b, …, H_b) / √b, D × D, float64."""
    return np.kron(np.eye(D // block), sylvester(block)) / np.sqrt(block)


def reference(x, block=None):
    """H · x along the last axis, in float64 from x's exact values."""
    D = x.shape[-1]
    block = block or (D & -D)
    return np.asarray(x, np.float64) @ reference_matrix(D, block).T


def assert_matches(actual, expected, dtype):
    expected = np.asarray(expected, np.float64)
    assert actual.shape == expected.shape
    scale = max(1.0, float(np.abs(expected).max())) if expected.size else 1.0
    np.testing.assert_allclose(actual.astype(np.float64), expected, rtol=0, atol=RTOL[dtype] * scale)


def out_dtype(dtype):
    return np.float64 if dtype == np.float64 else np.float32


def test_reference_is_the_sylvester_matrix():
    H4 = np.array([[1, 1, 1, 1], [1, -1, 1, -1], [1, 1, -1, -1], [1, -1, -1, 1]], float)
    np.testing.assert_array_equal(sylvester(4), H4)
    for b in (1, 2, 8, 64):
        H = sylvester(b)
        np.testing.assert_array_equal(H, H.T)
        np.testing.assert_array_equal(H @ H, b * np.eye(b))
    R = reference_matrix(80, 16)
    np.testing.assert_allclose(R @ R, np.eye(80), atol=1e-15)
    assert R[0, 16] == 0 and R[0, 15] == 0.25


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("D", DIMS + EXTRA_DIMS)
def test_transform_matches_reference(D, dtype):
    x = np.random.default_rng(D).standard_normal((3, 5, D)).astype(dtype)
    y = hadamard_transform(x)
    assert y.dtype == out_dtype(dtype) and y.shape == x.shape
    assert_matches(y, reference(x), dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("D", (64, 80, 96, 256, 512))
def test_every_block(D, dtype):
    x = np.random.default_rng(1).standard_normal((4, D)).astype(dtype)
    for p in range(11):
        block = 2**p
        if D % block == 0:
            assert_matches(hadamard_transform(x, block=block), reference(x, block), dtype)


def test_block_1_is_a_copy_and_odd_D_needs_it():
    x = np.random.default_rng(2).standard_normal((3, 5)).astype(np.float32)
    np.testing.assert_array_equal(hadamard_transform(x, block=1), x)


@pytest.mark.parametrize(
    ("D", "block"), [(64, 64), (80, 16), (96, 32), (72, 8), (128, 128), (2, 2), (6, 2), (1024, 1024)]
)
def test_hadamard_block(D, block):
    assert hadamard_block(D) == block
    assert hadamard_block(np.int64(D)) == block


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    lead=st.lists(st.integers(0, 4), min_size=0, max_size=3),
    D=st.sampled_from(DIMS + EXTRA_DIMS[:2]),
    dtype=st.sampled_from(DTYPES),
    seed=st.integers(0, 2**32 - 1),
    magnitude=st.sampled_from((1e-3, 1.0, 300.0)),
)
def test_random_shapes(lead, D, dtype, seed, magnitude):
    x = (magnitude * np.random.default_rng(seed).standard_normal((*lead, D))).astype(dtype)
    before = x.copy()
    y = hadamard_transform(x)
    np.testing.assert_array_equal(x, before)
    assert y.shape == x.shape and y.dtype == out_dtype(dtype)
    assert_matches(y, reference(x), dtype)


@pytest.mark.parametrize("dtype", (np.float32, np.float64))
@pytest.mark.parametrize("D", (64, 80, 96, 256))
def test_orthogonal(D, dtype):
    rng = np.random.default_rng(3)
    x = rng.standard_normal((6, D)).astype(dtype)
    y = hadamard_transform(x)
    tol = RTOL[dtype] * 10
    np.testing.assert_allclose(np.linalg.norm(y, axis=-1), np.linalg.norm(x.astype(np.float64), axis=-1), rtol=tol)
    np.testing.assert_allclose(hadamard_transform(y), x, rtol=0, atol=tol * np.abs(x).max())
    # q·k unchanged when both are rotated; values rotated give the output rotated (undone by one more H)
    q, k, v = (rng.standard_normal((n, D)).astype(dtype) for n in (3, 7, 7))
    hq, hk, hv = (hadamard_transform(a) for a in (q, k, v))
    scores = q.astype(np.float64) @ k.astype(np.float64).T
    np.testing.assert_allclose(hq @ hk.T, scores, rtol=0, atol=tol * 10 * np.abs(scores).max())
    w = np.exp(scores - scores.max(-1, keepdims=True))
    w /= w.sum(-1, keepdims=True)
    np.testing.assert_allclose(hadamard_transform(w @ hv), w @ v, rtol=0, atol=tol * 10)


def test_spreads_an_outlier():
    x = np.zeros(64, np.float32)
    x[5] = 64.0
    np.testing.assert_array_equal(np.abs(hadamard_transform(x)), np.full(64, 8.0, np.float32))
    x = np.zeros(80, np.float32)
    x[5] = 4.0
    y = hadamard_transform(x)  # block 16: the outlier reaches its own block only
    np.testing.assert_array_equal(np.abs(y[:16]), np.ones(16))
    np.testing.assert_array_equal(y[16:], 0)


def test_nan_and_inf_propagate_to_their_block():
    x = np.ones((2, 32), np.float32)
    x[0, 3] = np.nan
    x[1, 20] = np.inf
    y = hadamard_transform(x, block=16)
    assert np.isnan(y[0, :16]).all() and np.isfinite(y[0, 16:]).all()
    assert np.isinf(y[1, 16:]).all() and np.isfinite(y[1, :16]).all()


def test_input_layouts():
    rng = np.random.default_rng(4)
    x = rng.standard_normal((6, 128)).astype(np.float32)
    expected = hadamard_transform(x)
    np.testing.assert_array_equal(hadamard_transform(np.asfortranarray(x)), expected)
    np.testing.assert_array_equal(hadamard_transform(x.astype(">f4")), expected)
    wide = np.zeros((6, 256), np.float32)
    wide[:, ::2] = x
    np.testing.assert_array_equal(hadamard_transform(wide[:, ::2]), expected)
    frozen = x.copy()
    frozen.setflags(write=False)
    np.testing.assert_array_equal(hadamard_transform(frozen), expected)
    np.testing.assert_array_equal(hadamard_transform(x.tolist()), hadamard_transform(x.astype(np.float64)))
    assert hadamard_transform(np.zeros((0, 3, 64), np.float16)).shape == (0, 3, 64)


def test_large_input_takes_the_parallel_kernel(monkeypatch):
    x = np.random.default_rng(5).standard_normal((40, 96)).astype(np.float32)
    serial = hadamard_transform(x)
    monkeypatch.setattr(rotation, "PARALLEL_ABOVE", 100)
    calls = []
    monkeypatch.setattr(rotation, "hadamard_rows_parallel", lambda *a: calls.append(1) or hadamard_rows_parallel(*a))
    np.testing.assert_array_equal(hadamard_transform(x), serial)
    assert calls


# -- the kernel itself, as a cache calls it ------------------------------------------------------------------------


@pytest.mark.parametrize("x_dtype", (np.float16, np.float32, np.float64))
@pytest.mark.parametrize("out_dt", (np.float32, np.float64))
@pytest.mark.parametrize("D", (8, 64, 96, 256, 512))
def test_kernel_dtypes_and_layouts(D, out_dt, x_dtype):
    x = np.random.default_rng(6).standard_normal((5, D)).astype(x_dtype)
    bits = x.view(np.uint16) if x_dtype == np.float16 else x
    block = D & -D
    out = np.empty((5, D), out_dt)
    hadamard_rows(bits, block, out)
    assert_matches(out, reference(x), np.float64 if (out_dt, x_dtype) == (np.float64, np.float64) else np.float32)
    # strided rows (numba's 'A' layout: the scalar fallback) give the same numbers to rounding
    wide_x = np.zeros((5, 2 * D), bits.dtype)
    wide_x[:, :D] = bits
    wide_out = np.full((5, 2 * D), 7, out_dt)
    hadamard_rows(wide_x[:, :D], block, wide_out[:, :D])
    np.testing.assert_allclose(wide_out[:, :D], out, rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(wide_out[:, D:], 7)  # nothing written beyond the rows
    parallel = np.empty_like(out)
    launch(hadamard_rows_parallel, bits, block, parallel)  # as the API calls it (workqueue: one at a time)
    np.testing.assert_array_equal(parallel, out)


@pytest.mark.parametrize("dtype", (np.float32, np.float64))
@pytest.mark.parametrize("D", (2, 4, 16, 32, 64, 80, 128, 1024))
def test_kernel_in_place(D, dtype):
    x = np.random.default_rng(7).standard_normal((3, D)).astype(dtype)
    block = D & -D
    out = np.empty_like(x)
    hadamard_rows(x, block, out)
    y = x.copy()
    hadamard_rows(y, block, y)
    np.testing.assert_array_equal(y, out)
    hadamard_rows(y, block, y)
    np.testing.assert_allclose(y, x, rtol=0, atol=RTOL[dtype] * 10 * np.abs(x).max())


def test_kernel_refuses_bad_block_or_shape():
    x = np.zeros((2, 48), np.float32)
    for block in (0, 3, 32, 64):
        with pytest.raises(ValueError, match="block must be a power of two dividing D"):
            hadamard_rows(x, block, np.empty_like(x))
    with pytest.raises(ValueError, match="out must have x's shape"):
        hadamard_rows(x, 16, np.empty((3, 48), np.float32))


# -- errors at the door ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("bad", [np.arange(8), np.ones(8, bool), np.ones(8, np.complex64), np.ones(8, np.longdouble)])
def test_non_float_refused(bad):
    if bad.dtype == np.longdouble and np.dtype(np.longdouble).itemsize == 8:
        pytest.skip("longdouble is float64 here")
    with pytest.raises(TypeError, match="x must be a float16, float32 or float64 array"):
        hadamard_transform(bad)


def test_bad_shapes_and_blocks_refused():
    with pytest.raises(ValueError, match="at least one axis"):
        hadamard_transform(np.float32(1.0))
    with pytest.raises(ValueError, match=r"head_dim must be a positive even int.*got 5"):
        hadamard_transform(np.ones((2, 5), np.float32))
    with pytest.raises(ValueError, match=r"head_dim .* got 0"):
        hadamard_transform(np.ones((2, 0), np.float32))
    for block in (0, -2, 3, 6, 32, 128):
        with pytest.raises(ValueError, match=r"block must be a power of two dividing x's last axis \(D = 80\)"):
            hadamard_transform(np.ones((2, 80), np.float32), block=block)
    for block in (2.0, True, "4"):
        with pytest.raises(TypeError, match="block must be an int"):
            hadamard_transform(np.ones((2, 8), np.float32), block=block)


@pytest.mark.parametrize("D", (1, 7, 81, 0, -4))
def test_hadamard_block_refuses_odd_or_nonpositive(D):
    with pytest.raises(ValueError, match=rf"head_dim must be a positive even int.*got {D}"):
        hadamard_block(D)


@pytest.mark.parametrize("D", (64.0, True, "64", None))
def test_hadamard_block_refuses_non_int(D):
    with pytest.raises(TypeError, match="head_dim must be an int"):
        hadamard_block(D)


@pytest.mark.parametrize("dtype", [np.float32, np.float64, np.float16])
@pytest.mark.parametrize("special", [None, "nan", "inf", "-inf"])
def test_hadamard_rows_max_is_the_rotation_and_max_abs(dtype, special):
    """hadamard_rows_max (a cache append's rotation and check in one call): the same bits as hadamard_rows,
    and max |x| exactly, or inf when x holds a NaN or ±inf."""
    rng = np.random.default_rng(9)
    x = (rng.standard_normal((5, 64)) * 3).astype(dtype)
    if special:
        x[3, 17] = float(special)
    rows = x.view(np.uint16) if dtype == np.float16 else x
    out_dtype = np.float64 if dtype == np.float64 else np.float32
    expected, got = np.empty(x.shape, out_dtype), np.empty(x.shape, out_dtype)
    hadamard_rows(rows, 32, expected)
    top = hadamard_rows_max(rows, 32, got)
    np.testing.assert_array_equal(got, expected)
    assert top == (np.inf if special else float(np.abs(x.astype(np.float64)).max()))
