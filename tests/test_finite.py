"""kernels/finite.py: the bit-level NaN/inf scan, against np.isfinite, for every float dtype, shape
and position of the bad value (including KV-cache views whose free slots must not be read)."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from numba_attn import config
from numba_attn.kernels.finite import all_finite, check_finite_array, max_abs

DTYPES = (np.float16, np.float32, np.float64)
SPECIALS = (np.nan, np.inf, -np.inf)


@settings(max_examples=60, deadline=None)
@given(
    dtype=st.sampled_from(DTYPES),
    shape=st.lists(st.integers(0, 40), min_size=1, max_size=4),
    bad=st.one_of(st.none(), st.sampled_from(SPECIALS)),
    where=st.integers(0, 10**6),
    transpose=st.booleans(),
)
def test_matches_isfinite(dtype, shape, bad, where, transpose):
    rng = np.random.default_rng(where)
    x = (rng.standard_normal(shape) * 1e3).astype(dtype)
    if bad is not None and x.size:
        x.reshape(-1)[where % x.size] = bad
    if transpose:
        x = x.T  # a non-contiguous view is scanned as well
    before = x.copy()
    assert all_finite(x) == bool(np.isfinite(x).all())
    top = max_abs(x)
    if x.size == 0:
        assert top == 0.0
    elif np.isnan(x).any():
        assert np.isnan(top)
    else:
        assert top == np.abs(x.astype(np.float64)).max()
    np.testing.assert_array_equal(x, before)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("bad", SPECIALS)
@pytest.mark.parametrize("size", [1, 1023, 1024, 1025, 300_000])
def test_every_position_of_a_bad_value_is_found(dtype, bad, size):
    """Flat arrays are cut into 1024-wide rows plus a tail, large ones run in parallel: the bad
    value is found at the start, the end, the row seams and the tail."""
    x = np.ones(size, dtype)
    assert all_finite(x)
    for i in sorted({0, size - 1, min(1023, size - 1), min(1024, size - 1), size // 2}):
        y = x.copy()
        y[i] = bad
        assert not all_finite(y), i


@pytest.mark.parametrize("dtype", DTYPES)
def test_largest_finite_and_subnormal_values_are_finite(dtype):
    info = np.finfo(dtype)
    x = np.array([info.max, -info.max, info.tiny, info.smallest_subnormal, -0.0, 0.0], dtype)
    assert all_finite(x)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("parallel", [False, True])
def test_rows_limits_the_scan_to_valid_tokens(monkeypatch, dtype, parallel):
    """(N, slots, C) with rows: slots past ``rows`` (a cache's free slots) are never read."""
    if parallel:
        monkeypatch.setattr(config, "FINITE_SERIAL_BELOW", 0)
    x = np.ones((3, 600, 8), dtype)
    x[:, 500:] = np.nan
    assert all_finite(x, 500)
    assert not all_finite(x, 501)
    x[2, 499, 7] = np.inf
    assert not all_finite(x, 500)


def test_max_abs_reads_float16_bits_and_refuses_other_dtypes():
    x = np.array([[1.5, -65504.0], [2.0, 0.0]], np.float16)
    assert max_abs(x.view(np.uint16)) == 65504.0
    with pytest.raises(TypeError, match="float16/32/64"):
        max_abs(np.ones(3, np.int32))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1,), (1, 1, 576), (2, 3, 7), (1, 1, 64, 1)])
def test_check_finite_array_on_a_few_values(dtype, shape):
    """check_finite_array's short path for a few contiguous values (a decode step's token: the bits'
    integer max against inf's bits): passes finite values up to the dtype's largest and subnormals,
    and names NaN, +inf and -inf wherever they are."""
    info = np.finfo(dtype)
    x = np.ones(shape, dtype)
    x.reshape(-1)[0] = info.max
    x.reshape(-1)[-1] = -info.smallest_subnormal
    check_finite_array(x, "x")
    for bad, word in ((np.nan, "NaN"), (np.inf, "inf"), (-np.inf, "inf")):
        for i in sorted({0, x.size // 2, x.size - 1}):
            y = x.copy()
            y.reshape(-1)[i] = bad
            with pytest.raises(ValueError, match=f"x contains {word}"):
                check_finite_array(y, "x")
