"""numba_attn.linear.LinearWeight: y = x @ W + b with float32 / float16 / int8 / int4 weights, against float64 numpy."""

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import assert_unchanged, copies, randn
from numba_attn.kernels import linear as kernels
from numba_attn.linear import LinearWeight

F32_EPS = float(np.finfo(np.float32).eps)
STORAGE = ["float32", "float16", "int8", "int4"]
#: the block-quantised storages (s·q + m per block of 32 inputs; x rounded to int16 by their kernels)
QUANTISED = ("int8", "int4")
#: SmolLM2-135M's projections (in, out): fused q/k/v, o, gate+up, down
SMOLLM_SHAPES = [(576, 960), (576, 576), (576, 3072), (1536, 576)]


def reference(x, w, bias):
    """float64 x @ W_eff + b, with x rounded to float32 (what the kernels read) and W_eff the
    dequantised weight: isolates the kernels' arithmetic from the (tested separately) storage."""
    x64 = np.asarray(x).astype(np.float32).astype(np.float64)
    b = 0.0 if bias is None else np.asarray(bias).astype(np.float32).astype(np.float64)
    return x64 @ w.dequantize().astype(np.float64) + b


def magnitudes(w):
    """(K, N) float64 bound on what the kernels multiply x by: |W_eff| for float weights; for int8 and
    int4, s·|q| + |m| (the kernels take s·Σ x·q and m·Σ x apart, which can cancel where s·q + m is small)."""
    if w.dtype not in QUANTISED:
        return np.abs(w.dequantize().astype(np.float64))
    codes = w._codes()
    P, K_pad, T = codes.shape
    q = np.abs(codes.astype(np.float64)).reshape(P, K_pad // 32, 32, T)
    s = w._block_scales()[:, :, None, 0, :].astype(np.float64)
    m = np.abs(w._block_scales()[:, :, None, 1, :].astype(np.float64))
    mag = (q * s + m).reshape(P, K_pad, T).transpose(1, 0, 2).reshape(K_pad, P * T)
    return mag[: w.in_features, : w.out_features]


def activation_rounding(x, w):
    """The int8 / int4 kernels round each row of x to int16 per block of 32 inputs, x ≈ (max|x_b| / 32767)·code,
    and multiply that by W_eff = s·q + m: bound Σ_b (max|x_b| / 65534)·Σ_{k∈b} (s_b·|q_k| + |m_b|) on what
    the rounding changes, (rows, out_features) in the shape of x @ W; 0 for the float storages."""
    if w.dtype not in QUANTISED:
        return 0.0
    x64 = np.asarray(x).astype(np.float32).astype(np.float64)
    rows = x64.reshape(-1, w.in_features)
    codes = w._codes()
    P, K_pad, T = codes.shape
    padded = np.zeros((rows.shape[0], K_pad))
    padded[:, : w.in_features] = np.abs(rows)
    half_step = padded.reshape(rows.shape[0], -1, 32).max(axis=2) / (2 * 32767)  # (rows, nb)
    q_sums = np.abs(codes.astype(np.float64)).reshape(P, K_pad // 32, 32, T).sum(axis=2)  # (P, nb, T)
    s = w._block_scales()[:, :, 0, :].astype(np.float64)  # (P, nb, T)
    m = np.abs(w._block_scales()[:, :, 1, :].astype(np.float64))
    per_block = (s * q_sums + 32 * m).transpose(1, 0, 2).reshape(K_pad // 32, P * T)[:, : w.out_features]
    return (half_step @ per_block).reshape(x64.shape[:-1] + (w.out_features,)) * (1 + 1e-6)


def assert_matches_reference(y, x, w, bias):
    """|y − ref| ≤ n·eps32·(|x| @ magnitudes(w) + |b|) + activation_rounding(x, w), n = K + 2·(K/32
    blocks) + 4 roundings: the worst-case float32 accumulation bound (per block: the scale's product,
    the offset's, the sum), plus the int8 / int4 kernels' documented rounding of x to int16."""
    ref = reference(x, w, bias)
    x64 = np.abs(np.asarray(x).astype(np.float32).astype(np.float64))
    b = 0.0 if bias is None else np.abs(np.asarray(bias).astype(np.float64))
    n = w.in_features + 2 * -(-w.in_features // 32) + 4
    bound = n * F32_EPS * (x64 @ magnitudes(w) + b) + activation_rounding(x, w) + 1e-30
    assert y.shape == ref.shape
    excess = np.abs(y.astype(np.float64) - ref) - bound
    assert excess.max(initial=-1) <= 0, f"worst excess {excess.max()} over the float32 bound"


def expected_int8(W):
    """The documented scheme in numpy: per output n and block j of 32 inputs (zero rows pad the last
    block), lo/hi = the block's min/max, s = (hi − lo) / 255, q = clip(rint((W − lo) / s), 0, 255) − 128,
    m = lo + 128·s; returns the dequantised weight s·q + m (float32)."""
    w32 = np.asarray(W, np.float32)
    K = w32.shape[0]
    padded = np.zeros((-(-K // 32) * 32, w32.shape[1]), np.float32)
    padded[:K] = w32
    out = np.zeros_like(padded)
    for k0 in range(0, padded.shape[0], 32):
        part = padded[k0 : k0 + 32]
        lo, hi = part.min(axis=0), part.max(axis=0)
        s = (hi - lo) / np.float32(255)
        q = np.clip(np.rint(np.divide(part - lo, s, out=np.zeros_like(part), where=s > 0)), 0, 255) - 128
        out[k0 : k0 + 32] = q.astype(np.float32) * s + (lo + np.float32(128) * s)
    return out[:K]


def expected_int4(W):
    """The documented int4 scheme in numpy: per output and block of 32 inputs (zero rows pad the last),
    s = float16((hi − lo) / 15), m = float16(lo) (nearest), q = clip(rint((W − m) / s), 0, 15); returns
    (s·q + m as float32, s, lo, hi) with s, lo, hi per block (K_pad / 32, N) float32."""
    w32 = np.asarray(W, np.float32)
    K = w32.shape[0]
    padded = np.zeros((-(-K // 32) * 32, w32.shape[1]), np.float32)
    padded[:K] = w32
    out = np.zeros_like(padded)
    steps, lows, highs = [], [], []
    for k0 in range(0, padded.shape[0], 32):
        part = padded[k0 : k0 + 32]
        lo, hi = part.min(axis=0), part.max(axis=0)
        s = ((hi - lo) / np.float32(15)).astype(np.float16).astype(np.float32)
        m = lo.astype(np.float16).astype(np.float32)
        q = np.clip(np.rint(np.divide(part - m, s, out=np.zeros_like(part), where=s > 0)), 0, 15)
        out[k0 : k0 + 32] = q.astype(np.float32) * s + m
        steps.append(s), lows.append(lo), highs.append(hi)
    return out[:K], np.array(steps), np.array(lows), np.array(highs)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    K=st.integers(1, 130),
    N=st.integers(1, 200),
    M=st.integers(1, 70),
    storage=st.sampled_from(STORAGE),
    with_bias=st.booleans(),
    x_dtype=st.sampled_from([np.float32, np.float64]),
    seed=st.integers(0, 2**16),
)
def test_matches_float64_reference(K, N, M, storage, with_bias, x_dtype, seed):
    rng = np.random.default_rng(seed)
    W = randn(rng, (K, N))
    bias = randn(rng, N) if with_bias else None
    x = randn(rng, (M, K), x_dtype)
    originals = copies(W, bias, x)
    w = LinearWeight(W, bias, dtype=storage)
    y = w.apply(x)
    assert y.dtype == (np.float64 if x_dtype == np.float64 else np.float32)
    assert_matches_reference(y, x, w, bias)
    assert_unchanged([W, bias, x], originals)


@pytest.mark.parametrize("storage", STORAGE)
@pytest.mark.parametrize("K, N", SMOLLM_SHAPES)
@pytest.mark.parametrize("M", [1, 3, 70])
def test_model_shapes(storage, K, N, M):
    """The SmolLM2 shapes: parallel builds, decode (M = 1) and prefill rows."""
    rng = np.random.default_rng(K + N + M)
    W = randn(rng, (K, N), np.float32) * 0.05
    x = randn(rng, (M, K), np.float32)
    bias = randn(rng, N, np.float32)
    w = LinearWeight(W, bias, dtype=storage)
    assert_matches_reference(w(x), x, w, bias)


@pytest.mark.parametrize("kind", ["gemv_int8", "gemv_int4", "gemv_float", "gemm_int8", "gemm_int4", "gemm_float"])
def test_serial_and_parallel_builds_agree(kind):
    rng = np.random.default_rng(3)
    storage = kind.split("_")[1] if kind.endswith(QUANTISED) else "float16"
    w = LinearWeight(randn(rng, (100, 300)), randn(rng, 300), dtype=storage)
    M = 1 if kind.startswith("gemv") else 37
    x = np.zeros((M, 128), np.float32)
    x[:, :100] = randn(rng, (M, 100), np.float32)
    outs = []
    gemv_parallel, gemv_serial, gemm_parallel, gemm_serial = kernels.KERNELS[storage]
    builds = (gemv_serial, gemv_parallel) if kind.startswith("gemv") else (gemm_serial, gemm_parallel)
    for fn in builds:
        y = np.empty((M, 300), np.float32)
        parts = (w._weights, w._scales) if storage in QUANTISED else (w._weights,)
        if kind.startswith("gemv"):
            fn(x[0], *parts, w._bias, y[0])
        else:
            fn(x, *parts, w._bias, y)
        outs.append(y)
    np.testing.assert_array_equal(outs[0], outs[1])


def test_int8_scheme_and_error_bound():
    rng = np.random.default_rng(1)
    W = randn(rng, (77, 130))
    W[:, 5] = 0.0  # an all-zero column: scale 0, q -128, offset 0
    W[:, 6] = 0.75  # a constant column: scale 0, offset 0.75 (exact)
    W[3, 7] = 40.0  # an outlier widens only its own block's scale
    w = LinearWeight(W, dtype=np.int8)
    eff = w.dequantize()
    big = np.abs(W.astype(np.float32)).max(axis=0)  # the offset's float32 rounding scales with the block's values
    np.testing.assert_allclose(eff, expected_int8(W), rtol=0, atol=4 * F32_EPS * float(big.max()))
    assert np.all(eff[:, 5] == 0)
    assert np.all(eff[:64, 6] == np.float32(0.75))  # (the last block's zero padding widens its range)
    # |W − (s·q + m)| ≤ s / 2 (+ float32 rounding), s = the block's (max − min) / 255 (padding rows count)
    for k0 in range(0, 77, 32):
        block = np.zeros((32, 130), np.float32)
        block[: min(32, 77 - k0)] = W[k0 : k0 + 32]
        s = (block.max(axis=0) - block.min(axis=0)) / 255
        err = np.abs(eff[k0 : k0 + 32] - W[k0 : k0 + 32])
        assert np.all(err <= s / 2 * (1 + 1e-5) + 4 * F32_EPS * np.abs(block).max(axis=0))
    assert w.dtype == np.int8 and w.shape == (77, 130)


def test_int8_keeps_a_16_level_block_exactly():
    """A block of 4-bit levels lo + d·k (k = 0 … 15: a GGUF Q4_1 block dequantised) is kept up to float32
    rounding, where a symmetric max/127 scale would round most of them."""
    rng = np.random.default_rng(5)
    K, N = 96, 70
    d = rng.uniform(0.001, 0.05, (K // 32, N)).astype(np.float32)
    lo = rng.uniform(-0.5, 0.1, (K // 32, N)).astype(np.float32)
    levels = rng.integers(0, 16, (K, N))
    levels[0], levels[1] = 0, 15  # every block spans its full range
    levels[32], levels[33], levels[64], levels[65] = 0, 15, 0, 15
    W = (np.repeat(lo, 32, axis=0) + np.repeat(d, 32, axis=0) * levels).astype(np.float32)
    eff = LinearWeight(W, dtype="int8").dequantize()
    np.testing.assert_allclose(eff, W, rtol=0, atol=8 * F32_EPS * np.abs(W).max())
    symmetric = np.abs(W).max() / 127
    assert np.abs(eff - W).max() < symmetric / 100


@settings(max_examples=30, deadline=None)
@given(
    K=st.integers(1, 100),
    N=st.integers(1, 80),
    spread=st.sampled_from([1e-8, 1e-7, 1e-6, 1e-3, 1.0, 300.0, 5e3]),
    offset=st.sampled_from([0.0, 1.0, -50.0, 1e4]),
    seed=st.integers(0, 2**16),
)
def test_int4_scheme_and_error_bound(K, N, spread, offset, seed):
    """int4: the documented scheme exactly, and |W − (s·q + m)| ≤ s / 2 + 2⁻⁹·max(|lo|, |hi|) + 2⁻²¹ per
    block (s and m are float16: their rounding, and the clipping it can cause, are the other terms; tiny
    spreads give steps in float16's subnormal range, where the absolute term is what holds)."""
    rng = np.random.default_rng(seed)
    W = (randn(rng, (K, N)) * spread + offset).astype(np.float32)
    W[:, rng.integers(0, N)] = np.float32(offset)  # a constant column: step 0
    w = LinearWeight(W, dtype="int4")
    eff = w.dequantize()
    expected, s, lo, hi = expected_int4(W)
    np.testing.assert_array_equal(eff, expected)
    for b, k0 in enumerate(range(0, K, 32)):
        block = W[k0 : k0 + 32]
        bound = s[b] / 2 + 2.0**-9 * np.maximum(np.abs(lo[b]), np.abs(hi[b])) + 2.0**-21
        bound = bound * (1 + 1e-5) + 4 * F32_EPS * np.maximum(np.abs(lo[b]), np.abs(hi[b]))
        assert np.all(np.abs(eff[k0 : k0 + 32] - block) <= bound)
    assert w.dtype == "int4" and w.shape == (K, N) and "dtype=int4" in repr(w)


def test_int4_keeps_a_q4_1_block_exactly():
    """A GGUF Q4_1 block dequantised (lo + d·k, k = 0 … 15, d and lo float16, both ends used) is kept
    exactly: int4 finds the same step, minimum and levels."""
    rng = np.random.default_rng(7)
    K, N = 96, 70
    d = rng.uniform(0.001, 0.05, (K // 32, N)).astype(np.float16).astype(np.float32)
    lo = rng.uniform(-0.5, 0.1, (K // 32, N)).astype(np.float16).astype(np.float32)
    levels = rng.integers(0, 16, (K, N))
    levels[0], levels[1] = 0, 15  # every block spans its full range
    levels[32], levels[33], levels[64], levels[65] = 0, 15, 0, 15
    W = (np.repeat(d, 32, axis=0) * levels.astype(np.float32) + np.repeat(lo, 32, axis=0)).astype(np.float32)
    w = LinearWeight(W, dtype="int4")
    np.testing.assert_array_equal(w._codes()[:, :K].transpose(1, 0, 2).reshape(K, -1)[:, :N], levels)
    np.testing.assert_array_equal(w.dequantize(), W)


def test_float_storage_is_exact_rounding():
    rng = np.random.default_rng(2)
    W = randn(rng, (40, 70))
    np.testing.assert_array_equal(LinearWeight(W, dtype="float32").dequantize(), W.astype(np.float32))
    np.testing.assert_array_equal(
        LinearWeight(W, dtype=np.float16).dequantize(), W.astype(np.float16).astype(np.float32)
    )


def test_layouts_operators_and_shapes():
    rng = np.random.default_rng(4)
    W_out_in = randn(rng, (50, 33), np.float32)
    bias = randn(rng, 50, np.float32)
    w = LinearWeight.from_linear(W_out_in, bias, dtype="float32")
    assert w.shape == (33, 50) and w.in_features == 33 and w.out_features == 50
    x = randn(rng, (2, 3, 33), np.float32)
    y = w(x)
    assert y.shape == (2, 3, 50) and y.dtype == np.float32
    np.testing.assert_allclose(y, x @ W_out_in.T + bias, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(x @ w, y)
    np.testing.assert_array_equal(w.apply(x[0, 0]), y[0, 0])  # 1-D x: one row
    assert w.apply(x[0, 0]).shape == (50,)
    assert w.apply(np.zeros((0, 33), np.float32)).shape == (0, 50)
    assert w.apply(x.astype(np.float16)).dtype == np.float32
    np.testing.assert_array_equal(w.bias, bias)
    assert LinearWeight(W_out_in.T).bias is None


def test_weight_is_copied():
    rng = np.random.default_rng(5)
    W = randn(rng, (32, 64), np.float32)
    x = randn(rng, (1, 32), np.float32)
    w = LinearWeight(W)
    before = w(x)
    W[:] = 0
    np.testing.assert_array_equal(w(x), before)


def test_nbytes():
    rng = np.random.default_rng(6)
    W = randn(rng, (576, 960), np.float32)
    sizes = {s: LinearWeight(W, dtype=s).nbytes - 960 * 4 for s in STORAGE}  # minus the bias
    assert sizes["float32"] == W.nbytes
    assert sizes["float16"] == W.nbytes // 2
    assert sizes["int8"] == W.size + W.size // 32 * 8  # 1.25 bytes / weight: a scale and an offset per 32
    assert sizes["int4"] == W.size // 2 + W.size // 32 * 4  # 0.625: two codes per byte, float16 scale and offset


@pytest.mark.parametrize("M", [1, 5])
@pytest.mark.parametrize("K", [64, 100])
@pytest.mark.parametrize("special", ["nan", "inf", "-inf", "tiny", "zero block", "huge"])
@pytest.mark.parametrize("storage", QUANTISED)
def test_quantised_special_activations(M, K, special, storage):
    """The int8 / int4 GEMV (M = 1) and GEMM round x to int16 per row and block; x with NaN or inf, or a block
    whose largest |x| is below 2⁻¹⁰⁰, takes the float path: NaN and inf propagate as in numpy's
    x @ W_eff, tiny values are not flushed. A zero block and values near float32's limit stay on the
    int16 path."""
    rng = np.random.default_rng(K + M)
    N = 130
    W = randn(rng, (K, N), np.float32)
    w = LinearWeight(W, randn(rng, N, np.float32), dtype=storage)
    x = randn(rng, (M, K), np.float32)
    if special in ("nan", "inf", "-inf"):
        x[M // 2, 37] = np.float32(special)
    elif special == "tiny":
        x[M // 2, 32:64] *= np.float32(2.0**-110)  # the second block only
    elif special == "zero block":
        x[:, :32] = 0
    else:
        x *= np.float32(1e30)
    ref = x.astype(np.float64) @ w.dequantize().astype(np.float64) + w.bias.astype(np.float64)
    with np.errstate(all="ignore"):
        y = w(x)
    assert y.shape == (M, N)
    if special in ("nan", "inf", "-inf"):
        np.testing.assert_array_equal(np.isnan(y), np.isnan(ref))
        np.testing.assert_array_equal(y[np.isinf(ref)], ref[np.isinf(ref)])
        assert not np.isfinite(y[M // 2]).any()
        if M > 1:  # the other rows: finite, and as accurate as ever
            others = np.arange(M) != M // 2
            assert_matches_reference(y[others], x[others], w, w.bias)
    else:
        assert_matches_reference(y, x, w, w.bias)


@pytest.mark.parametrize(
    "make, error, words",
    [
        (lambda: LinearWeight(np.ones((4, 3), np.int32)), TypeError, "weight must be a float16/float32/float64"),
        (lambda: LinearWeight(np.ones(4)), ValueError, "weight must have shape (in_features, out_features)"),
        (lambda: LinearWeight(np.ones((0, 3))), ValueError, "weight must have shape"),
        (lambda: LinearWeight(np.full((4, 3), np.nan)), ValueError, "weight contains NaN"),
        (lambda: LinearWeight(np.full((4, 3), np.inf), dtype="int8"), ValueError, "weight contains inf"),
        (lambda: LinearWeight(np.full((4, 3), 7e4), dtype="float16"), ValueError, "beyond float16's range"),
        (lambda: LinearWeight(np.full((4, 3), -7e4), dtype="int4"), ValueError, "int4 scales and offsets are float16"),
        (lambda: LinearWeight(np.full((4, 3), np.nan), dtype="int4"), ValueError, "weight contains NaN"),
        (lambda: LinearWeight(np.ones((4, 3)), dtype="int3"), ValueError, 'or "int4"'),
        (lambda: LinearWeight(np.full((4, 3), 1e39)), ValueError, "beyond float32's range"),
        (lambda: LinearWeight(np.ones((4, 3)), bias=np.ones(4)), ValueError, "bias must have shape (out_features,)"),
        (lambda: LinearWeight(np.ones((4, 3)), bias=np.ones(3, np.int64)), TypeError, "bias must be a float"),
        (lambda: LinearWeight(np.ones((4, 3)), bias=np.array([1, np.nan, 0])), ValueError, "bias contains NaN"),
        (lambda: LinearWeight(np.ones((4, 3)), dtype="bfloat16"), ValueError, "dtype must be one of"),
        (lambda: LinearWeight(np.ones((4, 3)), dtype=np.int16), ValueError, "dtype must be one of"),
        (lambda: LinearWeight.from_linear(np.ones((2, 4, 3))), ValueError, "(out_features, in_features)"),
        (lambda: LinearWeight(np.ones((4, 3)))(np.ones((2, 4), np.int64)), TypeError, "x must be a float16"),
        (lambda: LinearWeight(np.ones((4, 3)))(np.ones((2, 3))), ValueError, "(..., in_features) = (..., 4)"),
        (lambda: LinearWeight(np.ones((4, 3)))(np.float64(1.0)), ValueError, "x must have shape"),
    ],
)
def test_bad_input(make, error, words):
    with pytest.raises(error) as info:
        make()
    assert words in str(info.value)
