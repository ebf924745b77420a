"""numba_attn.quant: quantize / dequantize / QuantizedTensor, and attention on int8 keys and values."""

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from numba import njit

from conftest import assert_close, assert_unchanged, copies, exact_values, int8_effective_inputs, randn
from numba_attn import QuantizedTensor, dequantize, quantize, reference, scaled_dot_product_attention
from numba_attn.kernels.quantised import dequantised_rows

F32_EPS = float(np.finfo(np.float32).eps)


def expected_quantisation(x, block):
    """The documented scheme in numpy float32: scale = max|x|/127 per block, q = clip(rint(x/scale))."""
    x32 = np.asarray(x).astype(np.float32).reshape(-1, x.shape[-1])
    D = x32.shape[1]
    block = D if block is None else min(block, D)
    nb = -(-D // block)
    data = np.zeros(x32.shape, np.int8)
    scales = np.zeros((x32.shape[0], nb), np.float32)
    for b in range(nb):
        part = x32[:, b * block : (b + 1) * block]
        s = np.abs(part).max(axis=1) / np.float32(127) if part.size else np.zeros(x32.shape[0], np.float32)
        scales[:, b] = s
        inv = np.where(s > 0, np.float32(1) / np.where(s > 0, s, 1), 0).astype(np.float32)
        data[:, b * block : (b + 1) * block] = np.clip(np.rint(part * inv[:, None]), -127, 127)
    return data.reshape(x.shape), scales.reshape(x.shape[:-1] + (nb,))


def block_of_each_entry(qt):
    """scales broadcast to data's shape: the scale each entry was quantised with."""
    return np.repeat(qt.scales, qt.block, axis=-1)[..., : qt.shape[-1]]


def assert_round_trip_bound(x, qt):
    """|x - dequantize(q)| <= scale/2 per element (plus float32 rounding of x/scale and q·scale)."""
    x32 = np.asarray(x).astype(np.float32).astype(np.float64)
    back = dequantize(qt).astype(np.float64)
    s = block_of_each_entry(qt).astype(np.float64)
    err = np.abs(x32 - back)
    bound = 0.5 * s + 4 * F32_EPS * (np.abs(x32) + 127 * s)
    assert (err <= bound).all(), float((err - bound).max())


# ----------------------------------------------------------------------------------------------
# quantize / dequantize
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("block", [32, None, 16, 64, 128])
@pytest.mark.parametrize("dtype", [np.float32, np.float64, np.float16])
def test_round_trip_and_scheme(block, dtype):
    rng = np.random.default_rng(0)
    x = (randn(rng, (3, 5, 64), np.float64) * rng.uniform(0.01, 30, (3, 5, 1))).astype(dtype)
    before = copies(x)
    qt = quantize(x, block)
    assert_unchanged([x], before)
    D = 64
    eff = D if block is None else min(block, D)
    assert isinstance(qt, QuantizedTensor)
    assert qt.block == eff
    assert qt.data.dtype == np.int8 and qt.scales.dtype == np.float32
    assert qt.shape == qt.data.shape == x.shape and qt.ndim == 3 and qt.dtype == np.int8
    assert qt.scales.shape == (3, 5, -(-D // eff))
    assert qt.nbytes == qt.data.nbytes + qt.scales.nbytes
    data, scales = expected_quantisation(x, block)
    np.testing.assert_array_equal(qt.scales, scales)
    np.testing.assert_array_equal(qt.data, data)
    assert qt.data.min() >= -127 and qt.data.max() <= 127
    assert_round_trip_bound(x, qt)
    back = dequantize(qt)
    assert back.dtype == np.float32 and back.shape == x.shape
    np.testing.assert_array_equal(qt.dequantize(), back)
    np.testing.assert_array_equal(back, qt.data.astype(np.float32) * block_of_each_entry(qt))


_magnitudes = st.floats(float(np.float32(1e-30)), float(np.float32(1e30)), width=32)
_elements = st.one_of(
    st.just(0.0),
    st.sampled_from([0.5, 1.5, 2.5, 127.0, -63.5]),
    st.tuples(st.booleans(), _magnitudes).map(lambda t: -t[1] if t[0] else t[1]),
)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    x=hnp.arrays(np.float32, st.tuples(st.integers(1, 4), st.integers(1, 70)), elements=_elements),
    block=st.sampled_from([None, 1, 2, 4, 8, 16, 32, 64, 128, 1000]),
)
def test_round_trip_property(x, block):
    """Finite float32 input (zeros, ties, magnitudes 1e-30 … 1e30; subnormal scales: test_tiny_values):
    the scheme, bit for bit, and the per-element bound |x - x̂| <= scale/2."""
    qt = quantize(x, block)
    data, scales = expected_quantisation(x, block)
    np.testing.assert_array_equal(qt.scales, scales)
    np.testing.assert_array_equal(qt.data, data)
    assert qt.data.min() >= -127
    assert_round_trip_bound(x, qt)


def test_rint_rounds_half_to_even():
    # max|x| = 127 gives scale exactly 1: x/scale = x
    x = np.array([[127, 2.5, 3.5, -2.5, 0.5, -0.5, 1.5, -1.5, -127, 126.5]], np.float32)
    qt = quantize(x, None)
    assert qt.scales[0, 0] == 1.0
    np.testing.assert_array_equal(qt.data[0], [127, 2, 4, -2, 0, 0, 2, -2, -127, 126])


def test_clamping_to_127():
    rng = np.random.default_rng(1)
    x = randn(rng, (200, 64), np.float32) * 10 ** rng.uniform(-30, 30, (200, 1)).astype(np.float32)
    x[:, 0] = -np.abs(x).max(axis=1)  # the extreme of each row negative: never -128
    for block in (32, None):
        qt = quantize(x, block)
        assert qt.data.min() == -127 and qt.data.max() <= 127
        assert_round_trip_bound(x, qt)


def test_zero_blocks():
    x = np.zeros((2, 96), np.float32)
    x[1, 40:50] = 3.0
    qt = quantize(x, 32)
    np.testing.assert_array_equal(qt.scales, np.array([[0, 0, 0], [0, 3 / 127, 0]], np.float32))
    assert (qt.data[0] == 0).all() and (qt.data[1, :32] == 0).all() and (qt.data[1, 64:] == 0).all()
    np.testing.assert_array_equal(dequantize(qt), np.where(x != 0, np.float32(3 / 127) * 127, 0))
    assert not np.isnan(dequantize(qt)).any()


def test_tiny_values():
    """Blocks whose largest entry is tiny (subnormal scale): zeros stay zero, the bound holds."""
    for row in ([1e-40, 0, 0, 0], [3e-39, 1e-39, 0, -1e-39], [1e-37, 0, 5e-38, 0]):
        x = np.array([row], np.float32)
        qt = quantize(x, None)
        assert (qt.data[x == 0] == 0).all(), (row, qt.data)
        assert_round_trip_bound(x, qt)


def test_float64_beyond_float32_range():
    """A finite float64 too large for the float32 scale: refused (or quantised finitely), never inf/NaN."""
    x = np.array([[1e39, 1.0, 0.0, -2.0]])
    try:
        qt = quantize(x)
    except ValueError as err:
        assert "x" in str(err)
    else:
        assert np.isfinite(qt.scales).all()
        assert np.isfinite(dequantize(qt)).all()


def test_float16_input():
    rng = np.random.default_rng(2)
    x16 = randn(rng, (4, 3, 64), np.float16)
    for block in (32, None):
        a, b = quantize(x16, block), quantize(x16.astype(np.float32), block)
        np.testing.assert_array_equal(a.data, b.data)
        np.testing.assert_array_equal(a.scales, b.scales)
    big = np.array([[65504, -65504, 1, 0]], np.float16)
    qt = quantize(big)
    np.testing.assert_allclose(dequantize(qt), big.astype(np.float32), rtol=0, atol=65504 / 127 / 2)


def test_strided_and_fortran_inputs():
    rng = np.random.default_rng(3)
    base = randn(rng, (6, 128), np.float32)
    for x in (base[::2, ::2], np.asfortranarray(base), base.T):
        qt = quantize(x)
        ref = quantize(np.ascontiguousarray(x))
        np.testing.assert_array_equal(qt.data, ref.data)
        np.testing.assert_array_equal(qt.scales, ref.scales)


@pytest.mark.parametrize("shape", [(0, 64), (3, 0, 64)])
def test_empty(shape):
    qt = quantize(np.zeros(shape, np.float32))
    assert qt.shape == shape
    back = dequantize(qt)
    assert back.shape == shape and back.dtype == np.float32


def test_1d_input():
    x = np.linspace(-1, 1, 50).astype(np.float32)
    qt = quantize(x, 16)
    assert qt.shape == (50,) and qt.scales.shape == (4,)
    assert_round_trip_bound(x, qt)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64])
def test_non_finite_is_refused(bad, dtype):
    x = np.ones((2, 8), dtype)
    x[1, 3] = bad
    with pytest.raises(ValueError, match="x contains"):
        quantize(x)


@pytest.mark.parametrize("block,D", [(3, 64), (48, 64), (24, 32), (33, 64)])
def test_non_power_of_two_block_below_D_is_refused(block, D):
    with pytest.raises(ValueError, match=r"block.*power of two"):
        quantize(np.ones((2, D), np.float32), block)


@pytest.mark.parametrize("block,D", [(64, 64), (100, 64), (48, 48), (1000, 7)])
def test_block_at_least_D_is_per_row(block, D):
    rng = np.random.default_rng(4)
    x = randn(rng, (5, D), np.float32)
    a, b = quantize(x, block), quantize(x, None)
    assert a.block == b.block == D
    assert a.scales.shape == (5, 1)
    np.testing.assert_array_equal(a.data, b.data)
    np.testing.assert_array_equal(a.scales, b.scales)


@pytest.mark.parametrize("block,D,nb", [(32, 70, 3), (16, 17, 2), (1, 5, 5), (64, 100, 2)])
def test_partial_last_block(block, D, nb):
    rng = np.random.default_rng(5)
    x = randn(rng, (2, 3, D), np.float32)
    qt = quantize(x, block)
    assert qt.scales.shape == (2, 3, nb)
    data, scales = expected_quantisation(x, block)
    np.testing.assert_array_equal(qt.data, data)
    np.testing.assert_array_equal(qt.scales, scales)
    assert_round_trip_bound(x, qt)


@pytest.mark.parametrize(
    "x,block,exc,match",
    [
        (np.ones((2, 8), np.int32), 32, TypeError, "x must be a floating"),
        (np.ones((2, 8), bool), 32, TypeError, "x must be a floating"),
        (np.float32(1.0), 32, ValueError, "x must have at least 1 dim"),
        (np.ones((2, 8), np.float32), 0, ValueError, "block"),
        (np.ones((2, 8), np.float32), -4, ValueError, "block"),
        (np.ones((2, 8), np.float32), True, ValueError, "block"),
        (np.ones((2, 8), np.float32), 4.0, ValueError, "block"),
    ],
)
def test_quantize_bad_arguments(x, block, exc, match):
    with pytest.raises(exc, match=match):
        quantize(x, block)


def test_dequantize_refuses_other_types():
    with pytest.raises(TypeError, match="q must be a QuantizedTensor"):
        dequantize(np.ones((2, 8), np.int8))


# ----------------------------------------------------------------------------------------------
# QuantizedTensor
# ----------------------------------------------------------------------------------------------


def test_getitem_indexes_leading_dims():
    rng = np.random.default_rng(6)
    qt = quantize(randn(rng, (2, 3, 4, 64), np.float32))
    for index in (0, (1, 2), slice(0, 1), (slice(None), 1), np.array([1, 0])):
        part = qt[index]
        assert isinstance(part, QuantizedTensor) and part.block == qt.block
        idx = index if isinstance(index, tuple) else (index,)
        np.testing.assert_array_equal(part.data, qt.data[idx])
        np.testing.assert_array_equal(part.scales, qt.scales[idx])
        np.testing.assert_array_equal(dequantize(part), dequantize(qt)[idx])
    view = qt[1]
    assert np.shares_memory(view.data, qt.data)
    for bad in ((0, 0, 0, 0), (0, 0, 0, slice(None)), (Ellipsis, 0), Ellipsis):
        with pytest.raises(IndexError):
            qt[bad]


def test_quantized_tensor_constructor():
    data = np.zeros((2, 64), np.int8)
    scales = np.ones((2, 2), np.float32)
    qt = QuantizedTensor(data, scales, 32)
    assert qt.block == 32 and "QuantizedTensor" in repr(qt)
    with pytest.raises(TypeError, match="data must be int8"):
        QuantizedTensor(data.astype(np.int16), scales, 32)
    with pytest.raises(TypeError, match="scales must be float32"):
        QuantizedTensor(data, scales.astype(np.float64), 32)
    with pytest.raises(ValueError, match="scales must have shape"):
        QuantizedTensor(data, np.ones((2, 3), np.float32), 32)
    with pytest.raises(ValueError, match="block"):
        QuantizedTensor(data, scales, 0)
    with pytest.raises(ValueError, match="block"):
        QuantizedTensor(data, scales, True)
    with pytest.raises(ValueError, match="at least 1 dim"):
        QuantizedTensor(np.int8(1), np.ones(1, np.float32), 32)


def test_hand_built_block_must_be_a_power_of_two():
    """The kernels find a value's scale as d >> ceil(log2 block): a block of 48 over D = 96 put the
    upper entries under the wrong scale (attention off by 2.4 while dequantize was right). The
    constructor now refuses what quantize refuses; blocks ≥ D (one scale per row) stay allowed."""
    data = np.zeros((16, 96), np.int8)
    with pytest.raises(ValueError, match="block must be a power of two"):
        QuantizedTensor(data, np.ones((16, 2), np.float32), 48)
    for block in (96, 128):  # one scale per row, stored as D
        assert QuantizedTensor(data, np.ones((16, 1), np.float32), block).block == 96


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf, -1.0])
def test_hand_built_scales_must_be_finite_and_non_negative(bad):
    """Such scales were reported as "the attention overflowed ... although query, key and value are finite"."""
    scales = np.ones((4, 2), np.float32)
    scales[2, 1] = bad
    with pytest.raises(ValueError, match="scales"):
        QuantizedTensor(np.ones((4, 64), np.int8), scales, 32)


def test_hand_built_tensor_attends_like_its_dequantised_self():
    rng = np.random.default_rng(14)
    data = rng.integers(-127, 128, (16, 96)).astype(np.int8)
    scales = rng.uniform(0.001, 0.02, (16, 3)).astype(np.float32)
    kq = QuantizedTensor(data, scales, 32)
    q = randn(rng, (3, 96), np.float32)
    out = scaled_dot_product_attention(q, kq, kq)
    k = dequantize(kq).astype(np.float64)
    assert_close(out, reference.scaled_dot_product_attention(q, k, k), rtol=2e-5)


# ----------------------------------------------------------------------------------------------
# attention on QuantizedTensor keys/values
# ----------------------------------------------------------------------------------------------


def emulated_int8_reference(q, kq, vq, scale=None, **kwargs):
    """The reference on exactly the numbers the int8 kernels use (see conftest.int8_effective_inputs)."""
    q, k, v, scale = int8_effective_inputs(q, kq, vq, scale)
    return reference.scaled_dot_product_attention(q, k, v, scale=scale, **kwargs)


@pytest.mark.parametrize("block", [32, None, 16])
@pytest.mark.parametrize("L,S", [(1, 300), (4, 1000), (64, 200), (1, 30)])
@pytest.mark.parametrize("causal", [False, "lower_right"])
def test_attention_matches_dequantised_reference(block, L, S, causal):
    """Measures the kernels only: the reference sees the same (dequantised) numbers."""
    rng = np.random.default_rng(7)
    q = randn(rng, (1, 4, L, 64), np.float32)
    k, v = randn(rng, (1, 2, S, 64), np.float32), randn(rng, (1, 2, S, 64), np.float32)
    kq, vq = quantize(k, block), quantize(v, block)
    mask = rng.random((L, S)) < 0.8
    out, lse = scaled_dot_product_attention(
        q, kq, vq, attn_mask=mask, is_causal=causal, enable_gqa=True, return_lse=True
    )
    assert out.dtype == np.float32 and out.shape == (1, 4, L, 64)
    ref, ref_lse = emulated_int8_reference(
        q, kq, vq, attn_mask=mask, is_causal=causal, enable_gqa=True, return_lse=True
    )
    assert_close(out, ref, rtol=2e-5)
    assert_close(lse, ref_lse, rtol=2e-5)


@pytest.mark.parametrize("kv", ["key", "value"])
def test_one_quantized_operand(kv):
    rng = np.random.default_rng(8)
    q = randn(rng, (2, 3, 64), np.float32)
    k, v = randn(rng, (2, 400, 64), np.float32), randn(rng, (2, 400, 48), np.float32)
    if kv == "key":
        kq = quantize(k)
        out = scaled_dot_product_attention(q, kq, v)
        ref = reference.scaled_dot_product_attention(q, dequantize(kq), v)
    else:
        vq = quantize(v, 16)
        out = scaled_dot_product_attention(q, k, vq)
        ref = reference.scaled_dot_product_attention(q, k, dequantize(vq))
    assert_close(out, ref, rtol=2e-5)


def _accuracy(out, ref):
    diff = out.astype(np.float64) - ref
    rel = np.linalg.norm(diff) / np.linalg.norm(ref)
    cos = (out * ref).sum(-1) / (np.linalg.norm(out, axis=-1) * np.linalg.norm(ref, axis=-1))
    return float(np.abs(diff).max()), float(rel), float(cos.min())


def _normal_inputs(L, seed=9, outliers=()):
    rng = np.random.default_rng(seed)
    q = rng.standard_normal((1, 8, L, 64))
    k = rng.standard_normal((1, 8, 1024, 64))
    v = rng.standard_normal((1, 8, 1024, 64))
    k[..., list(outliers)] *= 20
    return q, k, v


@pytest.mark.parametrize("L", [1, 64])
def test_int8_accuracy_contract(L):
    """N(0, 1), D = 64, S = 1024: ‖out − ref‖/‖ref‖ ≤ 1.5e-2 and per-row cosine ≥ 0.999 for the
    default (block 32) and per-row scales, against the unquantised float64 reference."""
    q, k, v = _normal_inputs(L)
    ref = reference.scaled_dot_product_attention(q, k, v)
    for block in (32, None):
        out = scaled_dot_product_attention(q.astype(np.float32), quantize(k, block), quantize(v, block))
        _, rel, cos = _accuracy(out, ref)
        assert rel <= 1.5e-2, (block, rel)
        assert cos >= 0.999, (block, cos)


@pytest.mark.parametrize("L", [1, 64])
def test_int8_accuracy_with_outlier_key_channels(L):
    """Keys with 4 outlier channels × 20: the N(0,1) contract does not hold there (README), but the
    default per-block scales stay within the documented figures (rel ≤ 6e-2, min cosine ≥ 0.98)."""
    q, k, v = _normal_inputs(L, outliers=(3, 17, 40, 51))
    ref = reference.scaled_dot_product_attention(q, k, v)
    out = scaled_dot_product_attention(q.astype(np.float32), quantize(k), quantize(v))
    _, rel, cos = _accuracy(out, ref)
    assert rel <= 6e-2 and cos >= 0.98, f"int8 block 32 with outlier channels: rel {rel:.3g}, min cos {cos:.5g}"


@pytest.mark.parametrize("L", [1, 64])
def test_outlier_channels_per_block_beats_per_row(L):
    """With outlier channels the default per-block scales are more accurate than per-row ones."""
    q, k, v = _normal_inputs(L, outliers=(3, 17, 40, 51))
    ref = reference.scaled_dot_product_attention(q, k, v)
    acc = {}
    for block in (32, None):
        out = scaled_dot_product_attention(q.astype(np.float32), quantize(k, block), quantize(v, block))
        acc[block] = _accuracy(out, ref)
    assert acc[32][1] < acc[None][1], acc
    assert acc[32][2] > acc[None][2], acc


@pytest.mark.parametrize("L", [1, 64])
def test_float16_accuracy_contract(L):
    q, k, v = _normal_inputs(L)
    ref = reference.scaled_dot_product_attention(q, k, v)
    out = scaled_dot_product_attention(*(x.astype(np.float16) for x in (q, k, v)), out_dtype=np.float32)
    assert out.dtype == np.float32
    err, _rel, cos = _accuracy(out, ref)
    assert err <= 2e-3, err
    assert cos >= 0.9999


@pytest.mark.parametrize(
    "qdtype,out_dtype,expected",
    [
        (np.float32, None, np.float32),
        (np.float16, None, np.float16),  # int8 operands do not count towards the result dtype
        (np.float16, np.float32, np.float32),
        (np.float32, np.float64, np.float64),
        (np.float32, np.float16, np.float16),
    ],
)
def test_out_dtype(qdtype, out_dtype, expected):
    rng = np.random.default_rng(10)
    q = randn(rng, (2, 4, 32), qdtype)
    k, v = randn(rng, (2, 300, 32), np.float32), randn(rng, (2, 300, 32), np.float32)
    kq, vq = quantize(k), quantize(v)
    out = scaled_dot_product_attention(q, kq, vq, out_dtype=out_dtype)
    assert out.dtype == np.dtype(expected)
    ref = emulated_int8_reference(q, kq, vq)  # E = 32 = block: per-row scales
    assert_close(out, ref, rtol=1e-3 if expected == np.float16 else 2e-5)


@pytest.mark.parametrize("block", [32, None])
@pytest.mark.parametrize("S", [40, 300])  # prefill-shaped and decode-kernel-shaped (L ≤ 8, S ≥ 256)
def test_float64_query_with_int8(block, S):
    """float64 arithmetic over int8 keys/values (the README: float64 if any input is float64): the
    result is float64 and matches the float64 formula on the dequantised keys/values, with the
    query never rounded to int8 (not even for per-row keys)."""
    rng = np.random.default_rng(11)
    q = randn(rng, (2, 3, 32), np.float64)
    kq = quantize(randn(rng, (2, S, 32), np.float32), block=block)
    vq = quantize(randn(rng, (2, S, 32), np.float32), block=block)
    out, lse = scaled_dot_product_attention(q, kq, vq, return_lse=True)
    assert out.dtype == np.float64 and lse.dtype == np.float64

    def exact(t):  # data · scale in float64 (dequantize() rounds the products to float32)
        return t.data.astype(np.float64) * np.repeat(t.scales.astype(np.float64), t.block, axis=-1)[..., :32]

    ref, ref_lse = reference.scaled_dot_product_attention(q, exact(kq), exact(vq), return_lse=True)
    assert_close(out, ref, rtol=1e-9)
    assert_close(lse, ref_lse, rtol=1e-9)


def test_query_cannot_be_quantized():
    rng = np.random.default_rng(12)
    qq = quantize(randn(rng, (2, 32), np.float32))
    with pytest.raises(TypeError, match="query"):
        scaled_dot_product_attention(qq, qq, qq)


def test_float16_result_overflow_is_refused():
    """int8 values of size 1e5 with a float16 query: the float16 result would be inf."""
    rng = np.random.default_rng(13)
    q = randn(rng, (1, 2, 3, 32), np.float16)
    k = quantize(randn(rng, (1, 2, 300, 32), np.float32))
    v = quantize(np.full((1, 2, 300, 32), 1e5, np.float32))
    with pytest.raises(ValueError, match="float16"):
        scaled_dot_product_attention(q, k, v)
    with pytest.raises(ValueError, match="float16"):
        scaled_dot_product_attention(q.astype(np.float32), k, v, out_dtype=np.float16)
    out = scaled_dot_product_attention(q, k, v, out_dtype=np.float32)
    np.testing.assert_allclose(out, 1e5, rtol=1e-6)


# ----------------------------------------------------------------------------------------------
# kernels/quantised.dequantised_rows: the prefill kernel's conversion of a block of rows
# ----------------------------------------------------------------------------------------------


@njit
def _dequantised_rows(x, scales, block, j0, n, scratch):
    rows, offset = dequantised_rows(x, scales, block, j0, n, scratch)
    return rows[offset : offset + n].copy()


@pytest.mark.parametrize(
    "bits,D,block",
    [(8, 64, 32), (8, 64, None), (8, 48, 32), (8, 64, 16), (8, 40, 8), (8, 20, None),
     (4, 64, 32), (4, 64, None), (4, 48, 16), (4, 80, 8), (4, 20, None)],
)  # fmt: skip
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_dequantised_rows_are_the_kernels_numbers(bits, D, block, dtype):
    """Rows j0 … j0+n-1 converted into the scratch: float32, each entry the nearest float32 of data·scale
    (int8) or code·step + min (4-bit) — what the decode kernel's vector tiles compute — whether the
    vector-IR or the scalar loops run (D and blocks below or not a multiple of the vector width);
    float64 (a float64 query's arithmetic), exactly."""
    rng = np.random.default_rng(D + bits)
    x = (rng.standard_normal((2, 40, D)) * rng.uniform(0.1, 10, (2, 40, 1)) + 0.5).astype(np.float32)
    qt = quantize(x, block, bits=bits)
    scales = qt.scales if bits == 8 else qt.scales.view(np.uint16).reshape(2, 40, -1)
    want = exact_values(qt)[1, 7:30]
    scratch = np.full((32, D), np.nan, dtype)
    got = _dequantised_rows(qt.data[1], scales[1], qt.block, 7, 23, scratch)
    np.testing.assert_array_equal(got, want.astype(dtype))
    assert np.isnan(scratch[23:]).all()  # rows past n untouched


def test_dequantised_rows_of_float_storage_are_the_rows_themselves():
    x = np.arange(12, dtype=np.float32).reshape(4, 3)
    scratch = np.zeros((2, 3), np.float32)
    np.testing.assert_array_equal(_dequantised_rows(x, np.zeros((1, 0), np.float32), 0, 1, 2, scratch), x[1:3])
    half = x.astype(np.float16).view(np.uint16)
    np.testing.assert_array_equal(_dequantised_rows(half, np.zeros((1, 0), np.float32), 0, 2, 2, scratch), x[2:4])
