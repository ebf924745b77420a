"""numba_attn.kernels._math: the vectorisable float32 exp and the float64 fallback."""

import math

import numpy as np
import pytest

from numba_attn.kernels._math import exp_nonpositive_array, fast_exp_array

F32_MAX_LOG = math.log(float(np.finfo(np.float32).max))  # 88.7228...: exp(x) overflows float32 above


def _elementwise(kernel, x):
    x = np.ascontiguousarray(x)
    out = np.empty_like(x)
    kernel(x, out)
    return out


def fast_exp(x):
    return _elementwise(fast_exp_array, x)


def test_float32_relative_error_dense_range():
    """Every float32 on a dense grid over [-87, 88] (plus random points): relative error < 1e-6."""
    rng = np.random.default_rng(0)
    grid = np.linspace(-87.0, 88.0, 1_000_001, dtype=np.float32)
    near_zero = np.linspace(-1.0, 1.0, 100_001, dtype=np.float32)
    rand = rng.uniform(-87.0, 88.0, 200_000).astype(np.float32)
    x = np.concatenate([grid, near_zero, rand, np.float32([0.0, -0.0, 1.0, -1.0, -87.0, 88.0])])
    y = fast_exp(x)
    assert y.dtype == np.float32
    exact = np.exp(x.astype(np.float64))
    rel = np.abs(y.astype(np.float64) - exact) / exact
    worst = int(np.argmax(rel))
    assert rel.max() < 1e-6, f"relative error {rel.max():.3g} at x = {x[worst]!r}"


def test_float32_ln2_reduction_boundaries():
    """Around every multiple of ln 2/2 (where the range reduction switches n) the error stays small."""
    ks = np.arange(-250, 254)
    centres = ks * math.log(2) / 2
    centres = centres[(centres > -87.0) & (centres < 88.0)]
    x = (centres[:, None] + np.linspace(-1e-4, 1e-4, 41)[None, :]).astype(np.float32).ravel()
    y = fast_exp(x).astype(np.float64)
    exact = np.exp(x.astype(np.float64))
    assert (np.abs(y - exact) / exact).max() < 1e-6


@pytest.mark.parametrize(
    "x", [-np.inf, -1e30, -np.finfo(np.float32).max, -1000.0, -100.0, -87.31, -87.4, -88.0, -103.0]
)
def test_float32_underflow_is_exact_zero(x):
    y = fast_exp(np.float32([x]))
    assert y[0] == 0.0 and not np.signbit(y[0])


@pytest.mark.parametrize("x", [np.inf, 1e30, np.finfo(np.float32).max, 1000.0, 89.0, 88.8])
def test_float32_overflow_is_inf(x):
    y = fast_exp(np.float32([x]))
    assert np.isposinf(y[0])


def test_float32_finite_up_to_the_float32_range():
    """Wherever exp(x) is representable in float32 (x ≤ ln(FLT_MAX) ≈ 88.72) the result is finite and
    accurate, as documented ("inputs above 88.7 return +inf", "max relative error ≈ 2e-7")."""
    x = np.linspace(88.0, 88.7, 2001, dtype=np.float32)
    x = x[x.astype(np.float64) < F32_MAX_LOG]
    y = fast_exp(x)
    exact = np.exp(x.astype(np.float64))
    bad = ~np.isfinite(y)
    assert not bad.any(), f"{bad.sum()} of {x.size} inputs in [88, 88.7] give inf, first at x = {x[bad][0]!r}"
    assert (np.abs(y.astype(np.float64) - exact) / exact).max() < 1e-6


def test_float32_just_above_the_cutoffs():
    """Just inside the documented cut-offs: -87.3 < x (finite, > 0) is not flushed."""
    x = np.float32([-87.29, -87.2, -87.0])
    y = fast_exp(x)
    assert (y > 0).all()
    np.testing.assert_allclose(y, np.exp(x.astype(np.float64)), rtol=1e-6)


def test_float32_monotonic():
    x = np.sort(np.random.default_rng(1).uniform(-87.0, 88.0, 500_000).astype(np.float32))
    x = np.concatenate([x, np.linspace(-2.0, 2.0, 400_001, dtype=np.float32)])
    x = np.sort(x)
    y = fast_exp(x).astype(np.float64)
    d = np.diff(y)
    # non-decreasing up to one float32 ulp-ish wobble at the polynomial's seams
    assert (d >= -2e-7 * y[1:]).all()
    assert fast_exp(np.float32([0.0]))[0] == 1.0


def test_float32_special_values():
    y = fast_exp(np.float32([0.0, -0.0, -np.inf, np.inf]))
    assert y[0] == 1.0 and y[1] == 1.0 and y[2] == 0.0 and np.isposinf(y[3])


def test_float64_equals_math_exp():
    rng = np.random.default_rng(2)
    x = np.concatenate(
        [
            rng.uniform(-745.0, 709.0, 100_000),
            rng.standard_normal(10_000),
            [0.0, -0.0, 1.0, -1.0, 709.7, 710.0, -745.2, -746.0, -np.inf, np.inf, 1e-300, -1e-300],
        ]
    )
    y = fast_exp(x)
    assert y.dtype == np.float64
    expected = np.array([math.exp(v) if v < 709.8 else math.inf for v in x])
    np.testing.assert_array_equal(y, expected)


def test_float64_nan_propagates():
    y = fast_exp(np.array([np.nan]))
    assert np.isnan(y[0])


def exp_nonpositive(x):
    return _elementwise(exp_nonpositive_array, x)


def test_exp_nonpositive_matches_fast_exp_on_its_domain():
    """The softmax's exp (x ≤ 0 only, no overflow path): relative error < 1e-6 against float64, and
    bit-identical to ``fast_exp`` wherever both apply; -inf and everything below -87.3 give exactly 0."""
    rng = np.random.default_rng(1)
    x = np.concatenate(
        [
            np.linspace(-87.29, 0.0, 1_000_001, dtype=np.float32),
            rng.uniform(-87.29, 0.0, 200_000).astype(np.float32),
            np.float32([0.0, -0.0, -1e-30, -87.29]),
        ]
    )
    y = exp_nonpositive(x)
    assert y.dtype == np.float32
    exact = np.exp(x.astype(np.float64))
    rel = np.abs(y.astype(np.float64) - exact) / exact
    assert rel.max() < 1e-6, f"relative error {rel.max():.3g} at x = {x[int(np.argmax(rel))]!r}"
    np.testing.assert_array_equal(y, fast_exp(x))
    low = np.float32([-np.inf, -1e30, -1000.0, -87.31, -88.0])
    np.testing.assert_array_equal(exp_nonpositive(low), np.zeros(5, np.float32))


def test_exp_nonpositive_float64_is_math_exp():
    x = np.array([0.0, -1.5, -700.0, -np.inf])
    np.testing.assert_array_equal(exp_nonpositive(x), np.exp(x))
