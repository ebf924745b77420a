"""kernels/_vector_ir.py: every LLVM-IR helper, through its @intrinsic wrapper, against its plain-numba twin.

Random data at offsets away from 0, in arrays of odd lengths (the lanes around the vector must stay
untouched), vector widths 4, 8 and 16 (AVX-512, AVX2 and NEON/SSE widths), for each dtype a helper
supports. Exact equality wherever both sides compute the same thing; where the wrapper rounds once
(``llvm.fma``) and the loop twice, or sums in another order, the tolerance is stated, and the same
operation on integer-valued floats (exact either way) is checked for equality as well.
"""

import functools

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from llvmlite import ir
from numba import literally, njit

from numba_attn.kernels import _vector_ir as vir

WIDTHS = (4, 8, 16)
FLOATS = (np.float32, np.float64)
INTS = (np.int8, np.int32, np.int64)
EXAMPLES = settings(max_examples=40, deadline=None)


# @njit drivers: the wrappers need the vector width as a compile-time constant
@njit
def _splat_into(value, out, out_off, width):
    vir.splat_into(value, out, out_off, literally(width))


@njit
def _copy_vector(src, src_off, dst, dst_off, width):
    vir.copy_vector(src, src_off, dst, dst_off, literally(width))


@njit
def _load_float32_into(src, src_off, scales, scale_index, dst, dst_off, width):
    vir.load_float32_into(src, src_off, scales, scale_index, dst, dst_off, literally(width))


@njit
def _load_float32_all(src, dst, width):
    """Every width-long chunk of src through load_float32_into (scale 1)."""
    one = np.ones(1, np.float32)
    for start in range(0, src.shape[0] - width + 1, width):
        vir.load_float32_into(src, start, one, 0, dst, start, literally(width))


@njit
def _fma_into(a, a_off, b, b_off, c, c_off, out, out_off, width):
    vir.fma_into(a, a_off, b, b_off, c, c_off, out, out_off, literally(width))


@njit
def _fma_tile_into(a, a_off, a_step, b, b_off, b_step, steps, out, out_off, out_stride, rows, width):
    vir.fma_tile_into(
        a, a_off, a_step, b, b_off, b_step, steps, out, out_off, out_stride, literally(rows), literally(width)
    )


@njit
def _butterfly_sums_into(x, x_off, x_stride, out, out_off, width):
    vir.butterfly_sums_into(x, x_off, x_stride, out, out_off, literally(width))


@njit
def _exp_nonpositive_into(x, x_off, out, out_off, width):
    vir.exp_nonpositive_into(x, x_off, out, out_off, literally(width))


@njit
def _transpose_into(x, x_off, x_stride, out, out_off, out_stride, width):
    vir.transpose_into(x, x_off, x_stride, out, out_off, out_stride, literally(width))


def _random(rng, n, dtype, integer_valued=False):
    """n random numbers of dtype: small integers for integer dtypes (and for ``integer_valued``
    floats), standard normal otherwise."""
    if np.issubdtype(dtype, np.integer) or integer_valued:
        return rng.integers(-9, 10, n).astype(dtype)
    return rng.standard_normal(n).astype(dtype)


def _same_bits(actual, expected):
    assert actual.dtype == expected.dtype
    np.testing.assert_array_equal(actual.view(f"u{actual.itemsize}"), expected.view(f"u{expected.itemsize}"))


@given(
    dtype=st.sampled_from(FLOATS + INTS + (np.uint16,)),
    width=st.sampled_from(WIDTHS),
    offset=st.integers(1, 9),
    extra=st.integers(0, 6).map(lambda n: 2 * n + 1),
    seed=st.integers(0, 2**32 - 1),
)
@EXAMPLES
def test_splat_into_matches_loop(dtype, width, offset, extra, seed):
    rng = np.random.default_rng(seed)
    out = _random(rng, offset + width + extra, dtype)
    value = _random(rng, 1, dtype)[0]
    expected = out.copy()
    vir.splat_into_loop(value, expected, offset, width)
    _splat_into(value, out, offset, width)
    _same_bits(out, expected)
    assert (out[offset : offset + width] == value).all()


@given(
    dtype=st.sampled_from(FLOATS + INTS + (np.uint16,)),
    width=st.sampled_from(WIDTHS),
    src_off=st.integers(1, 9),
    dst_off=st.integers(1, 9),
    extra=st.integers(0, 6).map(lambda n: 2 * n + 1),
    seed=st.integers(0, 2**32 - 1),
)
@EXAMPLES
def test_copy_vector_matches_loop(dtype, width, src_off, dst_off, extra, seed):
    rng = np.random.default_rng(seed)
    src = _random(rng, src_off + width + extra, dtype)
    out = _random(rng, dst_off + width + extra, dtype)
    src_before, expected = src.copy(), out.copy()
    vir.copy_vector_loop(src, src_off, expected, dst_off, width)
    _copy_vector(src, src_off, out, dst_off, width)
    _same_bits(out, expected)
    _same_bits(src, src_before)


@given(
    dtype=st.sampled_from((np.float32, np.uint16, np.int8)),
    width=st.sampled_from(WIDTHS),
    src_off=st.integers(1, 9),
    dst_off=st.integers(1, 9),
    extra=st.integers(0, 6).map(lambda n: 2 * n + 1),
    seed=st.integers(0, 2**32 - 1),
)
@EXAMPLES
def test_load_float32_into_matches_loop(dtype, width, src_off, dst_off, extra, seed):
    rng = np.random.default_rng(seed)
    n = src_off + width + extra
    if dtype == np.uint16:  # float16 bit patterns of ordinary numbers
        src = rng.standard_normal(n).astype(np.float16).view(np.uint16)
    else:
        src = _random(rng, n, dtype)
    scales = rng.random(5).astype(np.float32) + np.float32(0.5)
    out = _random(rng, dst_off + width + extra, np.float32)
    expected = out.copy()
    vir.load_float32_into_loop(src, src_off, scales, 3, expected, dst_off, width)
    _load_float32_into(src, src_off, scales, 3, out, dst_off, width)
    _same_bits(out, expected)
    stored = src.view(np.float16) if dtype == np.uint16 else src
    np.testing.assert_array_equal(
        out[dst_off : dst_off + width], stored[src_off : src_off + width].astype(np.float32) * scales[3]
    )


@njit
def _load_nibbles_into(src, src_off, high, scale, offset, dst, dst_off, width):
    vir.load_nibbles_into(src, src_off, high, scale, offset, dst, dst_off, literally(width))


@given(
    width=st.sampled_from(WIDTHS),
    high=st.booleans(),
    src_off=st.integers(1, 9),
    dst_off=st.integers(1, 9),
    extra=st.integers(0, 6).map(lambda n: 2 * n + 1),
    seed=st.integers(0, 2**32 - 1),
)
@EXAMPLES
def test_load_nibbles_into_matches_loop(width, high, src_off, dst_off, extra, seed):
    rng = np.random.default_rng(seed)
    src = rng.integers(0, 256, src_off + width + extra).astype(np.uint8)
    scale, offset = np.float32(rng.random() + 0.25), np.float32(rng.standard_normal())
    out = _random(rng, dst_off + width + extra, np.float32)
    expected = out.copy()
    vir.load_nibbles_into_loop(src, src_off, int(high), scale, offset, expected, dst_off, width)
    _load_nibbles_into(src, src_off, int(high), scale, offset, out, dst_off, width)
    np.testing.assert_array_equal(out[:dst_off], expected[:dst_off])  # lanes around the vector untouched
    np.testing.assert_array_equal(out[dst_off + width :], expected[dst_off + width :])
    np.testing.assert_allclose(out, expected, rtol=1e-6, atol=1e-6)  # fma rounds once, the twin twice
    codes = (src[src_off : src_off + width] >> (4 if high else 0)) & 15
    np.testing.assert_allclose(out[dst_off : dst_off + width], codes * np.float64(scale) + offset, rtol=1e-6, atol=1e-6)
    # integer-valued scale and offset: exact either way
    vir.load_nibbles_into_loop(src, src_off, int(high), np.float32(3), np.float32(-8), expected, dst_off, width)
    _load_nibbles_into(src, src_off, int(high), np.float32(3), np.float32(-8), out, dst_off, width)
    np.testing.assert_array_equal(out, expected)


@pytest.mark.parametrize("width", WIDTHS)
def test_load_float32_converts_every_float16_bit_pattern_as_numpy(width):
    bits = np.arange(2**16, dtype=np.uint16)
    out = np.empty(bits.shape, np.float32)
    _load_float32_all(bits, out, width)
    expected = bits.view(np.float16).astype(np.float32)
    nan = np.isnan(expected)
    np.testing.assert_array_equal(np.isnan(out), nan)
    _same_bits(out[~nan], expected[~nan])


@given(
    dtype=st.sampled_from(FLOATS),
    width=st.sampled_from(WIDTHS),
    integer_valued=st.booleans(),
    offsets=st.tuples(*[st.integers(1, 9)] * 4),
    extra=st.integers(0, 6).map(lambda n: 2 * n + 1),
    seed=st.integers(0, 2**32 - 1),
)
@EXAMPLES
def test_fma_into_matches_loop(dtype, width, integer_valued, offsets, extra, seed):
    """float32: the twin's a·b + c in float64 (a·b exact) rounded to float32 is the fused result but for
    double rounding, within 1 ulp. float64: the twin rounds a·b and then the sum, the fused result
    only the sum, so they differ by at most eps·(|a·b| + |a·b + c|). Integer-valued data: both exact."""
    rng = np.random.default_rng(seed)
    a_off, b_off, c_off, out_off = offsets
    a, b, c = (_random(rng, off + width + extra, dtype, integer_valued) for off in (a_off, b_off, c_off))
    out = _random(rng, out_off + width + extra, dtype)
    expected = out.copy()
    vir.fma_into_loop(a, a_off, b, b_off, c, c_off, expected, out_off, width)
    _fma_into(a, a_off, b, b_off, c, c_off, out, out_off, width)
    window = slice(out_off, out_off + width)
    _same_bits(np.delete(out, np.r_[window]), np.delete(expected, np.r_[window]))
    if integer_valued:
        _same_bits(out, expected)
    elif dtype == np.float32:
        np.testing.assert_array_max_ulp(out[window], expected[window], maxulp=1)
    else:
        product = np.abs(a[a_off : a_off + width] * b[b_off : b_off + width])
        bound = np.finfo(dtype).eps * (product + np.abs(expected[window]))
        assert (np.abs(out[window] - expected[window]) <= bound).all()


@given(
    dtype=st.sampled_from(FLOATS),
    width=st.sampled_from(WIDTHS),
    rows=st.sampled_from((1, 4)),
    steps=st.sampled_from((0, 1, 7, 33)),
    integer_valued=st.booleans(),
    a_off=st.integers(1, 9),
    b_off=st.integers(1, 9),
    out_off=st.integers(1, 9),
    pad=st.integers(0, 3).map(lambda n: 2 * n + 1),
    seed=st.integers(0, 2**32 - 1),
)
@EXAMPLES
def test_fma_tile_into_matches_loop(dtype, width, rows, steps, integer_valued, a_off, b_off, out_off, pad, seed):
    """A register tile over a runtime loop. The wrapper accumulates with fused multiply-adds in dtype,
    the twin in float64 rounded once: they differ by at most (steps + 1)·eps·(|out| + Σ|a·b|).
    Integer-valued data (sums below 2^24): both exact."""
    rng = np.random.default_rng(seed)
    a_step, b_step, out_stride = rows + pad, width + pad, width + pad  # odd gaps between rows
    a = _random(rng, a_off + steps * a_step + rows + pad, dtype, integer_valued)
    b = _random(rng, b_off + steps * b_step + width + pad, dtype, integer_valued)
    out = _random(rng, out_off + rows * out_stride + pad, dtype, integer_valued)
    before = out.copy()
    expected = out.copy()
    vir.fma_tile_into_loop(a, a_off, a_step, b, b_off, b_step, steps, expected, out_off, out_stride, rows, width)
    _fma_tile_into(a, a_off, a_step, b, b_off, b_step, steps, out, out_off, out_stride, rows, width)
    if integer_valued or steps == 0:
        _same_bits(out, expected)
        return
    bound = np.zeros_like(out, dtype=np.float64)
    for i in range(rows):
        a_i = np.abs(a[a_off + i : a_off + i + steps * a_step : a_step].astype(np.float64))
        b_t = np.abs(np.stack([b[b_off + t * b_step : b_off + t * b_step + width] for t in range(steps)]))
        row = slice(out_off + i * out_stride, out_off + i * out_stride + width)
        bound[row] = (steps + 1) * np.finfo(dtype).eps * (np.abs(before[row]) + a_i @ b_t)
    assert (np.abs(out.astype(np.float64) - expected) <= bound).all()


@given(
    dtype=st.sampled_from(FLOATS + (np.int32, np.int64)),
    width=st.sampled_from((2,) + WIDTHS),
    integer_valued=st.booleans(),
    x_off=st.integers(1, 9),
    out_off=st.integers(1, 9),
    pad=st.integers(0, 3).map(lambda n: 2 * n + 1),
    seed=st.integers(0, 2**32 - 1),
)
@EXAMPLES
def test_butterfly_sums_into_matches_loop(dtype, width, integer_valued, x_off, out_off, pad, seed):
    """Integer lanes and integer-valued floats: exact. Other floats: the butterfly sums in a tree,
    the loop in order; both within (width - 1)·eps·Σ|x| of the exact sum."""
    rng = np.random.default_rng(seed)
    x_stride = width + pad
    x = _random(rng, x_off + width * x_stride + pad, dtype, integer_valued)
    out = _random(rng, out_off + width + pad, dtype)
    expected = out.copy()
    vir.butterfly_sums_into_loop(x, x_off, x_stride, expected, out_off, width)
    _butterfly_sums_into(x, x_off, x_stride, out, out_off, width)
    window = slice(out_off, out_off + width)
    _same_bits(np.delete(out, np.r_[window]), np.delete(expected, np.r_[window]))
    if integer_valued or np.issubdtype(dtype, np.integer):
        _same_bits(out, expected)
    else:
        rows = np.stack([x[x_off + j * x_stride : x_off + j * x_stride + width] for j in range(width)])
        bound = 2 * (width - 1) * np.finfo(dtype).eps * np.abs(rows).sum(axis=1)
        assert (np.abs(out[window] - expected[window]) <= bound).all()


@njit
def _element_address(x, index):
    return vir.element_address(x, index)


@pytest.mark.parametrize("dtype", FLOATS + INTS + (np.uint16, np.int16))
def test_element_address_matches_loop(dtype):
    x = np.zeros(13, dtype)
    for index in (0, 1, 6, 12):
        address = _element_address(x, index)
        assert address == vir.element_address_loop(x, index) == x.ctypes.data + index * x.itemsize


@given(
    width=st.sampled_from(WIDTHS),
    x_off=st.integers(0, 9),
    out_off=st.integers(0, 9),
    scale=st.sampled_from([1e-3, 1.0, 10.0, 40.0, 200.0]),
    seed=st.integers(0, 2**32 - 1),
)
@EXAMPLES
def test_exp_nonpositive_into_matches_loop(width, x_off, out_off, scale, seed):
    """exp(x) for x ≤ 0 in vector IR: within 2 float32 ulps of the twin's (the scalar
    ``exp_nonpositive``), within the approximation's documented error of float64 exp (relative 1e-6, the
    bound ``tests/test_math.py`` holds the scalar one to: its worst case is a little over 2 ulps, e.g.
    2.03 at x = -0.3425 in both), exact 0 below -87.3 and for -inf, 1 at 0."""
    rng = np.random.default_rng(seed)
    x = (-np.abs(rng.standard_normal(x_off + width + 3)) * scale).astype(np.float32)
    x[x_off] = 0.0
    if width > 4:
        x[x_off + 1] = -np.inf
        x[x_off + 2] = np.float32(-87.31)
    out = rng.standard_normal(out_off + width + 5).astype(np.float32)
    expected = out.copy()
    _exp_nonpositive_into(x, x_off, out, out_off, width)
    vir.exp_nonpositive_into_loop(x, x_off, expected, out_off, width)
    window = slice(out_off, out_off + width)
    _same_bits(np.delete(out, np.r_[window]), np.delete(expected, np.r_[window]))
    exact = np.exp(x[x_off : x_off + width].astype(np.float64))
    exact[x[x_off : x_off + width] < np.float32(-87.3)] = 0.0
    ulp = np.spacing(exact.astype(np.float32)).astype(np.float64)
    assert (np.abs(out[window] - exact) <= 1e-6 * exact).all()
    assert (np.abs(out[window].astype(np.float64) - expected[window]) <= 2 * ulp).all()
    assert out[out_off] == 1.0
    if width > 4:
        assert out[out_off + 1] == 0.0 and out[out_off + 2] == 0.0


@given(
    dtype=st.sampled_from(FLOATS + (np.int8, np.int32)),
    width=st.sampled_from((2,) + WIDTHS),
    x_off=st.integers(0, 7),
    pad=st.integers(0, 5),
    out_off=st.integers(0, 7),
    seed=st.integers(0, 2**32 - 1),
)
@EXAMPLES
def test_transpose_into_matches_loop(dtype, width, x_off, pad, out_off, seed):
    rng = np.random.default_rng(seed)
    x_stride, out_stride = width + pad, width + 2 * pad + 1
    x = _random(rng, x_off + width * x_stride + 3, dtype)
    out = _random(rng, out_off + width * out_stride + 3, dtype)
    expected = out.copy()
    _transpose_into(x, x_off, x_stride, out, out_off, out_stride, width)
    vir.transpose_into_loop(x, x_off, x_stride, expected, out_off, out_stride, width)
    _same_bits(out, expected)
    block = np.stack([x[x_off + i * x_stride : x_off + i * x_stride + width] for i in range(width)])
    got = np.stack([out[out_off + c * out_stride : out_off + c * out_stride + width] for c in range(width)])
    _same_bits(got, np.ascontiguousarray(block.T))


@functools.cache
def _madd_driver(intrinsic, kind):
    """An @njit driver of ``intrinsic`` (madd_pairs_into or madd_nibble_quads_into) for ``vir.MADD_KIND``
    = ``kind``: one per kind, called only while MADD_KIND is ``kind``, so every specialisation it compiles
    (``vir.MADD_KIND`` is read at compile time) emits that kind's code."""

    @njit
    def driver(q, q_off, q_step, x, x_off, steps, out, out_off, width):
        intrinsic(q, q_off, q_step, x, x_off, steps, out, out_off, literally(width))

    return driver


def _run_madd(kind, intrinsic, *args):
    """``intrinsic(*args)`` through its driver compiled with ``vir.MADD_KIND`` = ``kind`` (restored after)."""
    saved = vir.MADD_KIND
    try:
        vir.MADD_KIND = kind
        _madd_driver(intrinsic, kind)(*args)
    finally:
        vir.MADD_KIND = saved


#: the hypothesis strategies both integer products' tests share (and each its offset into x)
_MADD_CASES = dict(
    width=st.sampled_from([8, 16, 64]),
    steps=st.integers(0, 20),
    q_off=st.integers(0, 9),
    out_off=st.integers(0, 5),
    pad=st.integers(0, 3),
    extreme=st.booleans(),
    seed=st.integers(0, 2**16),
)


def _madd_kinds():
    kinds = ["generic"]
    if vir.MADD_KIND in ("avx2", "sse2"):
        kinds += ["sse2"] + (["avx2"] if vir.MADD_KIND == "avx2" else [])
    return kinds


@pytest.mark.parametrize("kind", _madd_kinds())
@pytest.mark.parametrize("q_dtype", [np.int8, np.int16])
@given(x_half=st.integers(0, 4), **_MADD_CASES)
@EXAMPLES
def test_madd_pairs_into_matches_loop(kind, q_dtype, width, steps, q_off, x_half, out_off, pad, extreme, seed):
    """Pairs of int8/int16 codes times int16 pairs, summed into int32 lanes: exact integers, equal to the
    twin bit for bit, for each way ``multiply_add_pairs`` can be emitted here (x86's AVX2 and SSE2
    ``pmaddwd``, the generic IR NEON gets). ``extreme``: codes at their limits (±127/−128, ±32767)."""
    rng = np.random.default_rng(seed)
    q_step = 2 * width + pad
    q_hi = 127 if q_dtype == np.int8 else 32767
    n_q = q_off + steps * q_step + 2 * width + pad
    if extreme:
        q = rng.choice(np.array([-128 if q_dtype == np.int8 else -q_hi, q_hi, 0, 1, -1]), n_q).astype(q_dtype)
        x = rng.choice(np.array([-32767, 32767, 0, 1]), 2 * (x_half + steps) + pad).astype(np.int16)
    else:
        q = rng.integers(-q_hi, q_hi + 1, n_q).astype(q_dtype)
        x = rng.integers(-32767, 32768, 2 * (x_half + steps) + pad).astype(np.int16)
    if q_dtype == np.int16:
        steps = min(steps, 1)  # one pair of int16 products is already up to 2·32767²: |Σ| stays below 2³¹
    out = rng.integers(-1000, 1000, out_off + width + pad).astype(np.int32)
    before = out.copy()
    expected = out.copy()
    vir.madd_pairs_into_loop(q, q_off, q_step, x, 2 * x_half, steps, expected, out_off, width)
    _run_madd(kind, vir.madd_pairs_into, q, q_off, q_step, x, 2 * x_half, steps, out, out_off, width)
    _same_bits(out, expected)
    for lane in range(width):  # and the twin against numpy in int64 (no wrapping at these sizes)
        first = q[q_off + 2 * lane :: q_step][:steps].astype(np.int64)
        second = q[q_off + 2 * lane + 1 :: q_step][:steps].astype(np.int64)
        xs = x[2 * x_half : 2 * x_half + 2 * steps].astype(np.int64)
        total = int(before[out_off + lane]) + int(first @ xs[0::2] + second @ xs[1::2])
        assert int(expected[out_off + lane]) == total


@pytest.mark.parametrize("kind", _madd_kinds())
@given(x_quad=st.integers(0, 3), **_MADD_CASES)
@EXAMPLES
def test_madd_nibble_quads_into_matches_loop(kind, width, steps, q_off, x_quad, out_off, pad, extreme, seed):
    """4-bit codes, four inputs in the nibbles of an output's two bytes, times int16 activations, summed into
    int32 lanes: exact integers, equal to the twin bit for bit for each way ``multiply_add_pairs`` can be
    emitted here, and the twin equal to numpy's int64 sums of the codes taken apart by hand.
    ``extreme``: bytes 0x00/0xFF/0x0F/0xF0 and activations ±32767."""
    rng = np.random.default_rng(seed)
    q_step = 2 * width + pad
    n_q = q_off + steps * q_step + 2 * width + pad
    if extreme:
        q = rng.choice(np.array([0, 255, 15, 240], np.uint8), n_q)
        x = rng.choice(np.array([-32767, 32767, 0, 1]), 4 * (x_quad + steps) + pad).astype(np.int16)
    else:
        q = rng.integers(0, 256, n_q).astype(np.uint8)
        x = rng.integers(-32767, 32768, 4 * (x_quad + steps) + pad).astype(np.int16)
    out = rng.integers(-1000, 1000, out_off + width + pad).astype(np.int32)
    before = out.copy()
    expected = out.copy()
    vir.madd_nibble_quads_into_loop(q, q_off, q_step, x, 4 * x_quad, steps, expected, out_off, width)
    _run_madd(kind, vir.madd_nibble_quads_into, q, q_off, q_step, x, 4 * x_quad, steps, out, out_off, width)
    _same_bits(out, expected)
    xs = x[4 * x_quad : 4 * x_quad + 4 * steps].astype(np.int64)
    for lane in range(width):
        b0 = q[q_off + 2 * lane :: q_step][:steps].astype(np.int64)
        b1 = q[q_off + 2 * lane + 1 :: q_step][:steps].astype(np.int64)
        codes = np.stack([b0 & 15, b1 & 15, b0 >> 4, b1 >> 4], axis=1).reshape(-1)  # inputs 4t … 4t+3
        assert int(expected[out_off + lane]) == int(before[out_off + lane]) + int(codes @ xs)


def test_every_wrapper_has_a_twin_and_a_test():
    tested = {
        "splat_into",
        "copy_vector",
        "load_float32_into",
        "load_nibbles_into",
        "fma_into",
        "fma_tile_into",
        "butterfly_sums_into",
        "element_address",
        "exp_nonpositive_into",
        "transpose_into",
        "madd_pairs_into",
        "madd_nibble_quads_into",
    }
    assert {wrapper._defn.__name__ for wrapper in vir.TWINS} == tested
    assert all(twin.py_func.__name__ == wrapper._defn.__name__ + "_loop" for wrapper, twin in vir.TWINS.items())


def _builder():
    function_type = ir.FunctionType(ir.VoidType(), [])
    block = ir.Function(ir.Module(), function_type, "f").append_basic_block()
    return ir.IRBuilder(block)


def test_butterfly_sum_refuses_a_wrong_number_of_vectors():
    builder = _builder()
    vectors = [vir.zeros(ir.FloatType(), 4)] * 3
    with pytest.raises(ValueError, match="width vectors of width lanes"):
        vir.butterfly_sum(builder, vectors)


def test_load_float32_vector_refuses_other_element_types():
    builder = _builder()
    base = ir.Constant(ir.IntType(32).as_pointer(), None)
    with pytest.raises(TypeError, match="float32, float16 bits"):
        vir.load_float32_vector(builder, base, 0, 8)
