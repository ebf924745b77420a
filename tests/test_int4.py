"""4-bit ("int4", q4_1-like) storage: quant.py's bits=4 path, the attention kernels reading it, and the
KVCache's key/value formats.

The scheme is re-implemented here in numpy (``reference_quantize``/``unpack``), not taken from
numba_attn: per block of ``block`` entries (or per row), step = half((max − min)/15) and
min' = half(min) (float16, computed in float32 from float32 inputs), code = clamp(rint((x − min')·(1/step)),
0, 15), two codes per byte (entry w of a block in the low nibble of the block's byte w, entry w + block/2
in its high nibble). Attention is checked against ``numba_attn.reference`` on the exactly dequantised
inputs (code·step + min' in float64) at the tolerances test_quant.py uses for int8.

A KVCache rotates 4-bit keys and values (and int8 keys) by default (``rotate=None``): its attention is
compared with the reference on the stored (rotated) content, the reference's query rotated like the keys
and its output rotated back like the values (conftest.cache_reference); storage tests expect the rotated
tokens, and run with ``rotate=False`` too.
"""

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from conftest import assert_close, assert_unchanged, cache_reference, cache_sdpa, copies, randn
from numba_attn import (
    KVCache,
    MultiHeadAttention,
    QuantizedTensor,
    attention_weights,
    dequantize,
    quantize,
    reference,
    scaled_dot_product_attention,
)
from numba_attn import cache as cache_module
from numba_attn.rotation import hadamard_transform

F32_EPS = float(np.finfo(np.float32).eps)
FLOAT16_MAX = 65504.0

# ----------------------------------------------------------------------------------------------
# the scheme, independently
# ----------------------------------------------------------------------------------------------


def reference_quantize(x, block):
    """(data uint8 (..., D/2), scales float16 (..., D/block, 2), codes (..., D), ties (..., D)) of x by
    the documented scheme in numpy. ``ties``: entries within 1e-6 (relative to |x| + |min'|) of a
    rounding tie, where the kernel's float32 arithmetic may round the other way."""
    x32 = np.asarray(x).astype(np.float32)
    D = x32.shape[-1]
    block = D if block is None else min(block, D)
    nb, half = D // block, block // 2
    blocks = x32.reshape(x32.shape[:-1] + (nb, block))
    lo, hi = blocks.min(axis=-1), blocks.max(axis=-1)
    step16 = ((hi - lo) / np.float32(15)).astype(np.float16)
    min16 = lo.astype(np.float16)
    step, low = step16.astype(np.float32)[..., None], min16.astype(np.float32)[..., None]
    inv = np.where(step > 0, np.float32(1) / np.where(step > 0, step, 1), 0).astype(np.float32)
    y = (blocks - low) * inv
    codes = np.clip(np.rint(y), 0, 15).astype(np.uint8)
    exact_y = (blocks.astype(np.float64) - low) / np.where(step > 0, step, 1).astype(np.float64)
    gap = np.abs(exact_y - np.floor(exact_y) - 0.5) * step.astype(np.float64)
    ties = (step > 0) & (gap <= 1e-6 * (np.abs(blocks.astype(np.float64)) + np.abs(low)))
    data = codes[..., :half] | (codes[..., half:] << 4)
    return (
        data.reshape(x32.shape[:-1] + (D // 2,)),
        np.stack([step16, min16], axis=-1),
        codes.reshape(x32.shape),
        ties.reshape(x32.shape),
    )


def unpack(data, scales, block):
    """(codes, step, min) per entry, float64 (..., D), from packed 4-bit data and (step, min) pairs."""
    data, scales = np.asarray(data), np.asarray(scales)
    D, half = 2 * data.shape[-1], block // 2
    by_block = data.reshape(data.shape[:-1] + (D // block, half))
    codes = np.concatenate([by_block & 15, by_block >> 4], axis=-1).reshape(data.shape[:-1] + (D,))
    step = np.repeat(scales[..., 0].astype(np.float64), block, axis=-1)
    low = np.repeat(scales[..., 1].astype(np.float64), block, axis=-1)
    return codes.astype(np.float64), step, low


def exact(x):
    """float64 values of an operand as the kernels read them: 4-bit code·step + min and int8 data·scale
    exactly, floats as they are."""
    if isinstance(x, QuantizedTensor):
        if x.bits == 4:
            codes, step, low = unpack(x.data, x.scales, x.block)
            return codes * step + low
        per_entry = np.repeat(x.scales.astype(np.float64), x.block, axis=-1)[..., : x.shape[-1]]
        return x.data.astype(np.float64) * per_entry
    return np.asarray(x).astype(np.float64)


def round_trip_bound(x, block):
    """Per entry: |x − dequantised| ≤ step'/2 + 15·|step − step'| + |min − min'| (+ float32 rounding):
    half a step, plus what float16's rounding of the step and of the minimum move the code grid (the top
    code reaches min' + 15·step', not max)."""
    x32 = np.asarray(x).astype(np.float32)
    D = x32.shape[-1]
    block = D if block is None else min(block, D)
    blocks = x32.astype(np.float64).reshape(x32.shape[:-1] + (D // block, block))
    lo, hi = blocks.min(axis=-1, keepdims=True), blocks.max(axis=-1, keepdims=True)
    step32 = ((hi - lo).astype(np.float32) / np.float32(15)).astype(np.float64)
    step16 = step32.astype(np.float16).astype(np.float64)
    min16 = lo.astype(np.float16).astype(np.float64)
    bound = step16 / 2 + 15 * np.abs(step32 - step16) + np.abs(lo - min16)
    bound = bound + 4 * F32_EPS * (np.abs(blocks) + np.abs(min16) + 15 * step16 + (hi - lo))
    return np.broadcast_to(bound, blocks.shape).reshape(x32.shape)


def assert_scheme(x, qt, block):
    """qt holds x quantised by the scheme: scales bit for bit, codes exact (±1 only at a tie)."""
    data, scales, codes, ties = reference_quantize(x, block)
    np.testing.assert_array_equal(qt.scales, scales)
    got, _, _ = unpack(qt.data, qt.scales, qt.block)
    diff = np.abs(got - codes)
    assert (diff <= 1).all() and (diff[~ties] == 0).all(), (
        f"codes differ from the scheme at {np.argwhere((diff > 0) & ~ties)[:3].tolist()}"
    )
    if not ties.any():
        np.testing.assert_array_equal(qt.data, data)


# (D, blocks that divide it, or cover it: capped to one block per row)
D_BLOCKS = [
    (D, block)
    for D in (2, 16, 48, 64, 80, 128)
    for block in (8, 16, 32, 64, None)
    if block is None or block >= D or D % block == 0
]


# ----------------------------------------------------------------------------------------------
# quantize(bits=4) / dequantize
# ----------------------------------------------------------------------------------------------


def test_the_reference_packing_is_ggmls():
    """The test's own packing on a hand-made row (so the comparisons below compare with the scheme)."""
    x = np.arange(16, dtype=np.float32)  # min 0, step 1: code = x
    data, scales, codes, _ = reference_quantize(x, None)
    np.testing.assert_array_equal(codes, np.arange(16))
    np.testing.assert_array_equal(scales, np.array([[1, 0]], np.float16))
    # entry w in the low nibble of byte w, entry w + 8 in its high nibble
    np.testing.assert_array_equal(data, [(w | ((w + 8) << 4)) for w in range(8)])
    qt = quantize(x, None, bits=4)
    np.testing.assert_array_equal(qt.data, data)
    np.testing.assert_array_equal(dequantize(qt), x)


@pytest.mark.parametrize("D,block", D_BLOCKS)
@pytest.mark.parametrize("dtype", [np.float32, np.float64, np.float16])
@pytest.mark.parametrize("lead", [(), (5,), (2, 3), (2, 1, 3)])
def test_quantize_matches_the_scheme(D, block, dtype, lead):
    rng = np.random.default_rng(D + len(lead))
    scale = rng.uniform(0.01, 30, lead + (1,)) if lead else 3.0
    x = (randn(rng, lead + (D,)) * scale + rng.uniform(-5, 5)).astype(dtype)
    before = copies(x)
    qt = quantize(x, block, bits=4)
    assert_unchanged([x], before)
    eff = D if block is None else min(block, D)
    assert isinstance(qt, QuantizedTensor)
    assert qt.bits == 4 and qt.block == eff and qt.format == "int4"
    assert qt.data.dtype == np.uint8 and qt.dtype == np.uint8 and qt.scales.dtype == np.float16
    assert qt.shape == x.shape and qt.data.shape == lead + (D // 2,) and qt.ndim == len(lead) + 1
    assert qt.scales.shape == lead + (D // eff, 2)
    assert qt.nbytes == qt.data.nbytes + qt.scales.nbytes == int(np.prod(lead, dtype=int)) * (D // 2 + 4 * (D // eff))
    assert_scheme(x, qt, block)
    back = dequantize(qt)
    assert back.dtype == np.float32 and back.shape == x.shape
    np.testing.assert_array_equal(qt.dequantize(), back)
    # code·step is exact in float32 (4 + 11 bits), so dequantize is the exact value rounded once
    np.testing.assert_array_equal(back, exact(qt).astype(np.float32))
    err = np.abs(x.astype(np.float32).astype(np.float64) - back.astype(np.float64))
    assert (err <= round_trip_bound(x, block)).all(), float((err - round_trip_bound(x, block)).max())


_magnitudes = st.floats(float(np.float32(1e-6)), float(np.float32(6e4)), width=32)
_elements = st.one_of(
    st.just(0.0),
    st.sampled_from([0.5, 1.5, 2.5, 7.5, 15.0, -7.5, 65504.0, -65504.0]),
    st.tuples(st.booleans(), _magnitudes).map(lambda t: -t[1] if t[0] else t[1]),
)


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    x=hnp.arrays(np.float32, st.tuples(st.integers(1, 4), st.sampled_from([2, 4, 16, 48, 64])), elements=_elements),
    block=st.sampled_from([None, 2, 4, 8, 16, 32, 64]),
)
def test_quantize_property(x, block):
    """Any finite float32 within float16's range (zeros, constant blocks, ties, ±65504, 1e-6 … 6e4):
    the scheme's scales bit for bit, its codes, and the round-trip bound."""
    D = x.shape[-1]
    if block is not None and block < D and D % block:
        with pytest.raises(ValueError, match="block"):
            quantize(x, block, bits=4)
        return
    qt = quantize(x, block, bits=4)
    assert_scheme(x, qt, block)
    back = dequantize(qt).astype(np.float64)
    assert np.isfinite(back).all()
    err = np.abs(x.astype(np.float64) - back)
    bound = round_trip_bound(x, block)
    assert (err <= bound).all(), float((err - bound).max())


def test_round_half_to_even_and_constant_blocks():
    x = np.array([[0, 15, 0.5, 1.5, 2.5, 3.5, 14.5, 7], [3, 3, 3, 3, 3, 3, 3, 3]], np.float32)
    qt = quantize(x, None, bits=4)
    codes, step, low = unpack(qt.data, qt.scales, qt.block)
    np.testing.assert_array_equal(codes[0], [0, 15, 0, 2, 2, 4, 14, 7])  # step exactly 1: x − min = x
    assert step[1, 0] == 0 and low[1, 0] == 3 and (codes[1] == 0).all()  # constant: step 0, value = min
    np.testing.assert_array_equal(dequantize(qt)[1], 3)


def test_float16_input_is_read_exactly():
    rng = np.random.default_rng(2)
    x16 = randn(rng, (4, 3, 64), np.float16)
    for block in (32, None, 8):
        a, b = quantize(x16, block, bits=4), quantize(x16.astype(np.float32), block, bits=4)
        np.testing.assert_array_equal(a.data, b.data)
        np.testing.assert_array_equal(a.scales, b.scales)
    edge = np.array([[65504, -65504, 1, 0]], np.float16)
    qt = quantize(edge, bits=4)
    assert np.isfinite(dequantize(qt)).all()
    assert (np.abs(dequantize(qt) - edge.astype(np.float32)) <= round_trip_bound(edge, 4)).all()


def test_strided_fortran_and_read_only_inputs():
    rng = np.random.default_rng(3)
    base = randn(rng, (6, 128), np.float32)
    ro = base.copy()
    ro.flags.writeable = False
    for x in (base[::2, ::2], np.asfortranarray(base), base.T, ro, base[:, ::-1]):
        before = copies(x)
        qt = quantize(x, bits=4)
        assert_unchanged([x], before)
        ref = quantize(np.ascontiguousarray(x), bits=4)
        np.testing.assert_array_equal(qt.data, ref.data)
        np.testing.assert_array_equal(qt.scales, ref.scales)


@pytest.mark.parametrize("shape", [(0, 64), (3, 0, 64)])
def test_no_rows(shape):
    qt = quantize(np.zeros(shape, np.float32), bits=4)
    assert qt.shape == shape and qt.data.shape == shape[:-1] + (32,) and qt.scales.shape == shape[:-1] + (2, 2)
    back = dequantize(qt)
    assert back.shape == shape and back.dtype == np.float32


def test_empty_last_dim():
    """D = 0 is even: an empty tensor, or a ValueError naming the block/last dim, as for 8 bits; not a
    ZeroDivisionError from the block check (quant._check_block: ``D % block`` with block = min(block, 0))."""
    assert quantize(np.zeros((3, 0), np.float32)).shape == (3, 0)  # 8 bits: fine
    for block in (32, None):
        try:
            qt = quantize(np.zeros((3, 0), np.float32), block, bits=4)
        except ValueError:
            continue
        assert qt.shape == (3, 0) and dequantize(qt).shape == (3, 0)


@pytest.mark.parametrize(
    "D,block",
    [(7, None), (7, 32), (1, None), (48, 32), (80, 32), (6, 3), (6, 1), (12, 6), (48, 24), (64, 0), (64, -32)],
)
def test_bad_blocks_and_dims(D, block):
    x = np.ones((2, D), np.float32)
    before = copies(x)
    # (D = 1: "the last dim must be even and ≥ 2", no block named)
    with pytest.raises(ValueError, match=r"block|even"):
        quantize(x, block, bits=4)
    assert_unchanged([x], before)


@pytest.mark.parametrize("bits", [5, 0, 2, 16, True, "4", None])
def test_bad_bits(bits):
    with pytest.raises(ValueError, match="bits must be 8 or 4"):
        quantize(np.ones((2, 8), np.float32), bits=bits)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64])
def test_non_finite_is_refused(bad, dtype):
    x = np.ones((2, 8), dtype)
    x[1, 3] = bad
    with pytest.raises(ValueError, match="x contains"):
        quantize(x, bits=4)


@pytest.mark.parametrize("big", [65505.0, 7e4, -1e5, 1e30])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_beyond_float16_range_is_refused(big, dtype):
    x = np.ones((2, 8), dtype)
    x[0, 5] = big
    with pytest.raises(ValueError, match=r"x holds values beyond float16's range"):
        quantize(x, bits=4)
    quantize(x, bits=8)  # int8's scales are float32: fine there


# ----------------------------------------------------------------------------------------------
# QuantizedTensor with bits=4
# ----------------------------------------------------------------------------------------------


def test_constructor_accepts_a_valid_tensor():
    data = np.arange(24, dtype=np.uint8).reshape(2, 12)
    scales = np.array([[[0.5, -1], [0.25, 2], [0, 3]], [[1, 0], [2, -4], [0.125, 0]]], np.float16)
    qt = QuantizedTensor(data, scales, 8, bits=4)
    assert qt.bits == 4 and qt.block == 8 and qt.shape == (2, 24) and qt.format == "int4"
    assert qt.nbytes == 24 + 24
    assert repr(qt) == "QuantizedTensor(shape=(2, 24), bits=4, block=8, nbytes=48)"
    codes, step, low = unpack(data, scales, 8)
    np.testing.assert_array_equal(dequantize(qt), (codes * step + low).astype(np.float32))
    # a block ≥ the row is one block per row
    assert QuantizedTensor(data, scales[:, :1], 64, bits=4).block == 24


@pytest.mark.parametrize(
    "data,scales,block,bits,exc,match",
    [
        (np.zeros((2, 4), np.int8), np.zeros((2, 1, 2), np.float16), 8, 4, TypeError, "data must be uint8"),
        (np.zeros((2, 4), np.uint8), np.zeros((2, 1, 2), np.float32), 8, 4, TypeError, "scales must be float16"),
        (np.zeros((2, 4), np.uint8), np.zeros((2, 1), np.float16), 8, 4, ValueError, "scales must have shape"),
        (np.zeros((2, 4), np.uint8), np.zeros((2, 2, 2), np.float16), 8, 4, ValueError, "scales must have shape"),
        (np.zeros((2, 4), np.uint8), np.zeros((2, 1, 2), np.float16), 8, 5, ValueError, "bits"),
        (np.zeros((2, 4), np.uint8), np.zeros((2, 1, 2), np.float16), 8, True, ValueError, "bits"),
        (np.zeros((2, 4), np.uint8), np.zeros((2, 1, 2), np.float16), 8, 8, TypeError, "data must be int8"),
        (np.zeros((2, 6), np.uint8), np.zeros((2, 2, 2), np.float16), 6, 4, ValueError, "block"),
        (np.zeros((2, 4), np.uint8), np.zeros((2, 1, 2), np.float16), 0, 4, ValueError, "block"),
        (np.zeros((2, 4), np.uint8), np.zeros((2, 8, 2), np.float16), 1, 4, ValueError, "block"),
        (np.uint8(1), np.zeros((1, 2), np.float16), 2, 4, ValueError, "at least 1 dim"),
    ],
)
def test_constructor_checks(data, scales, block, bits, exc, match):
    with pytest.raises(exc, match=match):
        QuantizedTensor(data, scales, block, bits=bits)


@pytest.mark.parametrize("where,bad", [(0, -1.0), (0, np.nan), (0, np.inf), (1, np.nan), (1, -np.inf)])
def test_constructor_refuses_bad_scales(where, bad):
    """Steps must be finite and ≥ 0; minimums finite (negative ones are what most blocks have)."""
    scales = np.ones((4, 2, 2), np.float16)
    scales[2, 1, where] = bad
    with pytest.raises(ValueError, match="scales"):
        QuantizedTensor(np.zeros((4, 32), np.uint8), scales, 32, bits=4)
    scales[2, 1, where] = 1
    scales[..., 1] = -3  # negative minimums are fine
    QuantizedTensor(np.zeros((4, 32), np.uint8), scales, 32, bits=4)


def test_getitem_indexes_leading_dims():
    rng = np.random.default_rng(6)
    qt = quantize(randn(rng, (2, 3, 4, 64), np.float32), bits=4)
    whole = dequantize(qt)
    for index in (0, (1, 2), slice(0, 1), (slice(None), 1), np.array([1, 0]), (1, slice(None), 3)):
        part = qt[index]
        idx = index if isinstance(index, tuple) else (index,)
        assert isinstance(part, QuantizedTensor) and part.bits == 4 and part.block == qt.block
        assert part.shape == whole[idx].shape
        np.testing.assert_array_equal(part.data, qt.data[idx])
        np.testing.assert_array_equal(part.scales, qt.scales[idx])
        np.testing.assert_array_equal(dequantize(part), whole[idx])
    view = qt[1]
    assert np.shares_memory(view.data, qt.data) and np.shares_memory(view.scales, qt.scales)
    for bad in ((0, 0, 0, 0), (0, 0, 0, slice(None)), (Ellipsis, 0), Ellipsis):
        with pytest.raises(IndexError):
            qt[bad]


def test_dequantize_leaves_the_tensor_alone():
    rng = np.random.default_rng(7)
    qt = quantize(randn(rng, (3, 5, 48), np.float32), 16, bits=4)
    before = copies(qt.data, qt.scales)
    dequantize(qt)
    assert_unchanged([qt.data, qt.scales], before)


# ----------------------------------------------------------------------------------------------
# attention over 4-bit keys/values
# ----------------------------------------------------------------------------------------------

#: (head dim, block): D = 64 with blocks 32 and None take the vector-IR tiles; 48 and 80 with blocks of
#: 8 and 16 (half blocks narrower than a vector), and 48 per row, the scalar loops
LAYOUTS = [(64, 32), (64, None), (48, 16), (80, 16), (80, 8), (48, None)]
#: (L, S): a decode step over many keys, a few rows over few keys, a prefill-sized block, tiny
SIZES = [(1, 600), (3, 40), (70, 300), (1, 1), (5, 17)]
FORMATS = ("int4", "int8", np.float16, np.float32)
PAIRS = [(k, v) for k in FORMATS for v in FORMATS if "int4" in (k, v)]


def fmt_name(f):
    return f if isinstance(f, str) else np.dtype(f).name


def make(rng, shape, fmt, block, magnitude=1.0, offset=0.0):
    x = randn(rng, shape) * magnitude + offset
    if fmt == "int4":
        return quantize(x.astype(np.float32), block, bits=4)
    if fmt == "int8":
        return quantize(x.astype(np.float32), block)
    return x.astype(fmt)


def tol_for(out):
    return {np.dtype(np.float16): 1e-3, np.dtype(np.float32): 2e-5, np.dtype(np.float64): 1e-9}[out.dtype]


@pytest.mark.parametrize("kfmt,vfmt", PAIRS, ids=[f"{fmt_name(k)}-{fmt_name(v)}" for k, v in PAIRS])
@pytest.mark.parametrize("D,block", LAYOUTS)
@pytest.mark.parametrize("L,S", SIZES)
def test_attention_matches_the_reference(kfmt, vfmt, D, block, L, S):
    rng = np.random.default_rng(L * 1000 + S + D)
    q = randn(rng, (2, 4, L, D), np.float32)
    # keys with an offset (min ≠ 0, partly cancelling) and values of another size
    key = make(rng, (2, 2, S, D), kfmt, block, 1.0, 0.5)
    value = make(rng, (2, 2, S, D), vfmt, block, 2.0, -1.0)
    mask = rng.random((L, S)) < 0.8
    causal = "lower_right" if (L + S) % 2 else False
    before = copies(q, mask, *(getattr(x, "data", x) for x in (key, value)))
    out, lse = scaled_dot_product_attention(
        q, key, value, attn_mask=mask, is_causal=causal, enable_gqa=True, return_lse=True
    )
    assert_unchanged([q, mask, *(getattr(x, "data", x) for x in (key, value))], before)
    floats = [np.dtype(f) for f in (kfmt, vfmt) if not isinstance(f, str)]
    assert out.dtype == np.result_type(np.float32, *floats) and out.shape == (2, 4, L, D)
    ref, ref_lse = reference.scaled_dot_product_attention(
        q, exact(key), exact(value), attn_mask=mask, is_causal=causal, enable_gqa=True, return_lse=True
    )
    assert_close(out, ref, rtol=2e-5)
    assert_close(lse, ref_lse, rtol=2e-5)


OPTIONS = {
    "bool-mask-upper-left": dict(mask="bool", is_causal=True),
    "float-mask-lower-right": dict(mask="float", is_causal="lower_right"),
    "window": dict(is_causal="lower_right", window=7),
    "window-upper-left": dict(is_causal="upper_left", window=3),
    "alibi": dict(alibi=True, is_causal="lower_right"),
    "softcap": dict(softcap=5.0),
    "sinks": dict(sinks=True, mask="bool"),
    "scale": dict(scale=0.3),
    "everything": dict(mask="float", is_causal="lower_right", window=40, alibi=True, softcap=8.0, sinks=True),
}


@pytest.mark.parametrize("option", list(OPTIONS))
@pytest.mark.parametrize("D,block", [(64, 32), (48, 16)])
@pytest.mark.parametrize("L,S", [(1, 600), (70, 300), (5, 17)])
@pytest.mark.parametrize("kfmt,vfmt", [("int4", "int4"), ("int8", "int4"), ("int4", np.float16)])
def test_attention_options(option, D, block, L, S, kfmt, vfmt):
    rng = np.random.default_rng(len(option) + L + S)
    opt = OPTIONS[option]
    H, Hkv = 6, 2
    q = randn(rng, (1, H, L, D), np.float32)
    key, value = make(rng, (1, Hkv, S, D), kfmt, block, 1.0, 0.3), make(rng, (1, Hkv, S, D), vfmt, block)
    kw = dict(is_causal=opt.get("is_causal", False), window=opt.get("window"), softcap=opt.get("softcap"))
    kw["scale"] = opt.get("scale")
    if opt.get("mask") == "bool":
        kw["attn_mask"] = rng.random((1, H, L, S)) < 0.7
        kw["attn_mask"][..., 0, :] = False  # a fully masked row
    elif opt.get("mask") == "float":
        kw["attn_mask"] = np.where(rng.random((L, S)) < 0.8, rng.standard_normal((L, S)), -np.inf)
    if opt.get("alibi"):
        kw["alibi_slopes"] = rng.uniform(0, 0.3, H)
    if opt.get("sinks"):
        kw["sinks"] = rng.uniform(-3, 3, H)
    out, lse = scaled_dot_product_attention(q, key, value, enable_gqa=True, return_lse=True, **kw)
    ref, ref_lse = reference.scaled_dot_product_attention(
        q, exact(key), exact(value), enable_gqa=True, return_lse=True, **kw
    )
    assert_close(out, ref, rtol=2e-5)
    assert_close(lse, ref_lse, rtol=2e-5)


@pytest.mark.parametrize("qdtype", [np.float16, np.float64])
@pytest.mark.parametrize("kfmt,vfmt", [("int4", "int4"), ("int4", "int8"), ("int8", "int4"), (np.float64, "int4")])
@pytest.mark.parametrize("D,block", [(64, 32), (80, 16)])
@pytest.mark.parametrize("L,S", [(1, 600), (30, 50)])
def test_query_dtypes(qdtype, kfmt, vfmt, D, block, L, S):
    """float16 queries (float32 arithmetic, float16 result) and float64 ones (float64 arithmetic, the
    codes dequantised in float64: the reference's precision)."""
    rng = np.random.default_rng(11 + L)
    q = randn(rng, (3, L, D), qdtype)
    key, value = make(rng, (3, S, D), kfmt, block, 1.0, 0.5), make(rng, (3, S, D), vfmt, block)
    out, lse = scaled_dot_product_attention(q, key, value, is_causal="lower_right", return_lse=True)
    floats = [np.dtype(qdtype)] + [np.dtype(f) for f in (kfmt, vfmt) if not isinstance(f, str)]
    assert out.dtype == np.result_type(*floats)
    arith = np.float64 if np.dtype(np.float64) in floats else np.float32
    assert lse.dtype == arith
    ref, ref_lse = reference.scaled_dot_product_attention(
        q, exact(key), exact(value), is_causal="lower_right", return_lse=True
    )
    assert_close(out, ref, rtol=tol_for(out))
    assert_close(lse, ref_lse, rtol=1e-9 if arith == np.float64 else 2e-5)


def test_serial_and_parallel_kernels_both_run(kernel_spy):
    """The sizes above reach both builds of both kernels: a few query rows against many keys decode,
    longer queries (or few keys) take the prefill kernel, as for float keys/values."""
    rng = np.random.default_rng(12)
    for L, S in ((1, 40), (4, 600), (1, 8), (70, 600)):
        q = randn(rng, (2, 4, L, 64), np.float32)
        kv = make(rng, (2, 4, S, 64), "int4", 32)
        out = scaled_dot_product_attention(q, kv, kv)
        assert_close(out, reference.scaled_dot_product_attention(q, exact(kv), exact(kv)), rtol=2e-5)
    ran = kernel_spy.ran()
    assert ran == {"decode_serial": 1, "decode_parallel": 1, "prefill_serial": 1, "prefill_parallel": 1}, ran


def test_out_dtype_and_float16_results():
    rng = np.random.default_rng(13)
    q = randn(rng, (2, 4, 64), np.float16)
    kq, vq = make(rng, (2, 300, 64), "int4", 32), make(rng, (2, 300, 64), "int4", 32)
    assert scaled_dot_product_attention(q, kq, vq).dtype == np.float16  # quantised operands do not count
    out = scaled_dot_product_attention(q, kq, vq, out_dtype=np.float32)
    assert out.dtype == np.float32
    assert_close(out, reference.scaled_dot_product_attention(q, exact(kq), exact(vq)), rtol=2e-5)


def test_attention_weights_with_4bit_keys():
    rng = np.random.default_rng(14)
    q = randn(rng, (2, 5, 48), np.float32)
    kq = make(rng, (2, 33, 48), "int4", 16, 1.0, 0.5)
    w = attention_weights(q, kq, is_causal="lower_right")
    ref = reference.attention_weights(q, exact(kq), is_causal="lower_right")
    assert_close(w, ref, rtol=2e-5)


def test_hand_built_tensor_attends_like_its_dequantised_self():
    """Random codes, steps and minimums (not from quantize), strided along the tokens."""
    rng = np.random.default_rng(15)
    data = rng.integers(0, 256, (2, 2 * 300, 48)).astype(np.uint8)
    scales = np.stack([rng.uniform(0, 0.3, (2, 600, 3)), rng.uniform(-2, 0, (2, 600, 3))], axis=-1)
    qt = QuantizedTensor(data[:, ::2], scales.astype(np.float16)[:, ::2], 32, bits=4)
    assert qt.shape == (2, 300, 96)
    q = randn(rng, (2, 3, 96), np.float32)
    for kv in ((qt, qt), (qt, exact(qt).astype(np.float32))):
        out = scaled_dot_product_attention(q, *kv)
        assert_close(out, reference.scaled_dot_product_attention(q, exact(qt), exact(qt)), rtol=2e-5)


def test_big_values_and_steps():
    """Values at float16's edge: steps of ~8736, minimums of −65504 (dequantised in float32, where
    code·step + min is finite); the result is exact to float32 precision."""
    rng = np.random.default_rng(16)
    q = randn(rng, (1, 2, 64), np.float32) * 1e-4
    v = rng.uniform(-65504, 65504, (1, 400, 64)).astype(np.float32)
    v[..., 0] = 65504
    v[..., 1] = -65504
    vq = quantize(v, bits=4)
    kq = quantize(rng.uniform(-3, 3, (1, 400, 64)), bits=4)
    out = scaled_dot_product_attention(q, kq, vq)
    ref = reference.scaled_dot_product_attention(q, exact(kq), exact(vq))
    assert_close(out, ref, rtol=2e-5)


def test_4bit_query_is_refused():
    rng = np.random.default_rng(17)
    qq = quantize(randn(rng, (2, 32), np.float32), bits=4)
    with pytest.raises(TypeError, match="query"):
        scaled_dot_product_attention(qq, qq, qq)


# ----------------------------------------------------------------------------------------------
# KVCache with "int4" keys and/or values
# ----------------------------------------------------------------------------------------------

CACHE_FORMATS = (np.float32, np.float16, np.int8, "int4")
CACHE_PAIRS = [(k, v) for k in CACHE_FORMATS for v in CACHE_FORMATS] + [
    (np.float64, "int4"),
    ("int4", np.float64),
    (np.float64, np.int8),
    (np.float64, np.float64),
]


def content(cache):
    """(keys, values) in position order, float64, exactly as stored."""
    keys, values = cache.ordered()
    return exact(keys), exact(values)


def storage(cache):
    return [x for x in (cache._keys, cache._values, cache._key_scales, cache._value_scales) if x is not None]


ATTEND_TOL = {np.dtype(np.float16): 2e-3, np.dtype(np.float32): 2e-5, np.dtype(np.float64): 1e-10}


@pytest.mark.parametrize("kfmt,vfmt", CACHE_PAIRS, ids=[f"{fmt_name(k)}-{fmt_name(v)}" for k, v in CACHE_PAIRS])
@pytest.mark.parametrize("window", [None, 6])
@pytest.mark.parametrize("L", [1, 3])
@pytest.mark.parametrize("D,block", [(64, 32), (48, 16)])
@pytest.mark.parametrize("rotate", [None, False])
def test_cache_attend_matches_the_reference(kfmt, vfmt, window, L, D, block, rotate):
    """attend on every format pair, rotated the default way (int8/int4 keys, int4 values) and not at all,
    against the reference on the stored content (conftest.cache_reference)."""
    rng = np.random.default_rng(50 + D)
    cache = KVCache(2, 2, D, 64, key_dtype=kfmt, value_dtype=vfmt, window=window, block=block, rotate=rotate)
    rotate_keys = rotate is None and fmt_name(kfmt) in ("int4", "int8")
    rotate_values = rotate is None and fmt_name(vfmt) == "int4"
    assert (cache.rotate_keys, cache.rotate_values) == (rotate_keys, rotate_values)
    assert cache.key_dtype == (kfmt if isinstance(kfmt, str) else np.dtype(kfmt))
    assert cache.value_dtype == (vfmt if isinstance(vfmt, str) else np.dtype(vfmt))
    assert cache.dtype == (cache.key_dtype if fmt_name(kfmt) == fmt_name(vfmt) else None)
    for T in (5, 4, 1, L):  # one-token appends (serial kernels) and chunks; the window-6 ring wraps
        cache.append(randn(rng, (2, 2, T, D)) + 0.5, randn(rng, (2, 2, T, D)))
    has64 = np.dtype(np.float64) in [np.dtype(f) for f in (kfmt, vfmt) if not isinstance(f, str)]
    qdtype = np.float64 if has64 else np.float32
    q = randn(rng, (2, 6, L, D), qdtype)
    keys, values = content(cache)
    if window is not None and cache.wrapped and L > 1:
        with pytest.raises(ValueError, match="ring"):  # the first queries' keys were dropped
            cache.attend(q)
        return
    before = copies(q, *storage(cache))
    out = cache.attend(q)
    assert_unchanged([q, *storage(cache)], before)
    floats = [np.dtype(qdtype)] + [np.dtype(f) for f in (kfmt, vfmt) if not isinstance(f, str)]
    assert out.dtype == np.result_type(*floats) and out.shape == (2, 6, L, D)
    ref = cache_reference(cache, q, keys, values, is_causal="lower_right", enable_gqa=True, window=window)
    tol = ATTEND_TOL[out.dtype]
    assert_close(out, ref, rtol=tol)
    # the general call on the cache's views: in storage order (one query sees every key held), or in
    # position order (rotate_query / unrotate_output where the cache rotates)
    k, v = (cache.keys, cache.values) if L == 1 or not cache.wrapped else cache.ordered()
    general = cache_sdpa(cache, q, k, v, is_causal="lower_right", enable_gqa=True)
    assert_close(general, ref, rtol=tol)


@pytest.mark.parametrize("kfmt,vfmt", [("int4", "int4"), (np.int8, "int4"), ("int4", np.float16)])
@pytest.mark.parametrize("window,sink_tokens", [(5, 2), (8, 1)])
def test_cache_sink_tokens(kfmt, vfmt, window, sink_tokens):
    rng = np.random.default_rng(60)
    cache = KVCache(1, 2, 64, 10**6, key_dtype=kfmt, value_dtype=vfmt, window=window, sink_tokens=sink_tokens)
    for step, T in enumerate((3, 1, 1, 7, 1, 1, 20, 1)):
        cache.append(randn(rng, (1, 2, T, 64)), randn(rng, (1, 2, T, 64)))
        q = randn(rng, (1, 4, 1, 64), np.float32)
        keys, values = content(cache)
        out = cache.attend(q)
        mask = cache.attn_mask(1)
        ref = cache_reference(cache, q, keys, values, attn_mask=mask, enable_gqa=True)
        assert_close(out, ref, rtol=2e-5)
        if step == 3:
            np.testing.assert_array_equal(cache.ordered_positions(), np.r_[0:sink_tokens, 12 - window : 12])


def _spy(monkeypatch, name):
    calls = []
    original = getattr(cache_module, name)

    def spy(*args, **kwargs):
        calls.append(name)
        return original(*args, **kwargs)

    monkeypatch.setattr(cache_module, name, spy)
    return calls


@pytest.mark.parametrize("kfmt,vfmt", [("int4", "int4"), (np.int8, "int4"), ("int4", np.float32), (np.float16, "int4")])
@pytest.mark.parametrize("window,sink_tokens", [(None, 0), (7, 0), (7, 2)])
@pytest.mark.parametrize("xdtype", [np.float32, np.float64, np.float16])
@pytest.mark.parametrize("D,block", [(64, 32), (48, 16), (48, None)])
def test_serial_and_numpy_appends_store_the_same_bytes(monkeypatch, kfmt, vfmt, window, sink_tokens, xdtype, D, block):
    """One-token appends (kernels/cache_append.py write_rows_int4) and a big chunk (quantize), and both
    forced by APPEND_SERIAL_ROWS, store identical bytes (ring wrap and sink slots included)."""
    rng = np.random.default_rng(70)
    B, H, T = 2, 3, 180  # B·H·T = 1080 > APPEND_SERIAL_ROWS: one chunk takes the numpy path
    assert B * H * T > cache_module.APPEND_SERIAL_ROWS
    k, v = randn(rng, (B, H, T, D), xdtype) * 3 + 1, randn(rng, (B, H, T, D), xdtype)
    kw = dict(key_dtype=kfmt, value_dtype=vfmt, window=window, sink_tokens=sink_tokens, block=block)
    serial, chunked, forced = (KVCache(B, H, D, 1000, **kw) for _ in range(3))
    # append_rows: the check and write_rows_int4 (or the other stores' writes) in one serial call
    writes, quantizes = _spy(monkeypatch, "append_rows"), _spy(monkeypatch, "quantize")
    for t in range(T):
        serial.append(k[:, :, t : t + 1], v[:, :, t : t + 1])
    if not (kfmt == np.float16 and xdtype == np.float64):  # (float64 into float16 always goes through numpy)
        assert writes and not quantizes, "one-token appends took the numpy path"
    writes.clear()
    chunked.append(k, v)
    assert quantizes and not writes, "a chunk of B·H·T > APPEND_SERIAL_ROWS rows took the serial kernels"
    monkeypatch.setattr(cache_module, "APPEND_SERIAL_ROWS", 0)
    for t0 in range(0, T, 7):  # small chunks, forced through the numpy path
        forced.append(k[:, :, t0 : t0 + 7], v[:, :, t0 : t0 + 7])
    for other in (chunked, forced):
        assert other.length == serial.length == T
        for a, b in zip(storage(serial), storage(other)):
            np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("rotate", [False, None])
def test_big_chunk_matches_quantize_of_the_tokens(rotate):
    """A big chunk stores the numpy re-implementation's bytes of the tokens (rotated by default: of
    hadamard_transform(tokens), the same float32 rotation the cache computes)."""
    rng = np.random.default_rng(71)
    k, v = randn(rng, (2, 3, 200, 64), np.float32), randn(rng, (2, 3, 200, 64), np.float32)
    cache = KVCache(2, 3, 64, 200, dtype="int4", rotate=rotate)
    assert cache.rotate == ("both" if rotate is None else False)
    cache.append(k, v)
    if cache.rotate:
        k, v = hadamard_transform(k), hadamard_transform(v)
    for got, x in ((cache.keys, k), (cache.values, v)):
        assert isinstance(got, QuantizedTensor) and got.bits == 4 and got.block == 32
        data, scales, _, _ = reference_quantize(x, 32)
        np.testing.assert_array_equal(got.data, data)
        np.testing.assert_array_equal(got.scales, scales)


@pytest.mark.parametrize(
    "kw,per_token_head",
    [
        (dict(dtype="int4"), 40 + 40),  # 32 bytes of codes + 2 blocks × (step, min) float16, per tensor
        (dict(dtype="int4", block=None), 36 + 36),
        (dict(dtype="int4", block=16), 48 + 48),
        (dict(key_dtype=np.int8, value_dtype="int4"), 72 + 40),
        (dict(key_dtype="int4", value_dtype=np.float16), 40 + 128),
        (dict(key_dtype=np.float32, value_dtype="int4"), 256 + 40),
        (dict(key_dtype=np.int8, value_dtype="int4", value_dim=32), 72 + 20),
    ],
)
def test_nbytes(kw, per_token_head):
    B, H, capacity = 2, 3, 10
    cache = KVCache(B, H, 64, capacity, **kw)
    assert cache.nbytes == B * H * capacity * per_token_head
    cache.append(np.ones((B, H, 4, 64)), np.ones((B, H, 4, kw.get("value_dim", 64))))
    assert cache.nbytes == B * H * capacity * per_token_head  # preallocated


def test_int4_is_about_a_sixth_of_float32():
    f32 = KVCache(1, 8, 64, 1024).nbytes
    assert KVCache(1, 8, 64, 1024, dtype="int4").nbytes <= 0.16 * f32
    assert KVCache(1, 8, 64, 1024, key_dtype=np.int8, value_dtype="int4").nbytes <= 0.22 * f32


@pytest.mark.parametrize("name", ["int4", "INT4", "Int4"])
def test_int4_is_named_by_a_string(name):
    cache = KVCache(1, 1, 8, 4, dtype=name)
    assert cache.dtype == cache.key_dtype == cache.value_dtype == "int4"
    cache = KVCache(1, 1, 8, 4, key_dtype=name, value_dtype=np.float16)
    assert cache.key_dtype == "int4" and cache.value_dtype == np.float16 and cache.dtype is None
    assert cache.keys.bits == 4 and cache.values.dtype == np.float16


@pytest.mark.parametrize("argument", ["dtype", "key_dtype", "value_dtype"])
@pytest.mark.parametrize("bad", [np.int32, np.dtype("i4"), "int32", "i4", np.uint8, None])
def test_numpy_int4_is_not_4_bit(argument, bad):
    """numpy 1.x spells int32 "int4" (np.dtype("int4") is int32 there): a 32-bit integer dtype, whatever
    its name, is refused with a TypeError naming the argument."""
    if bad is None:
        if argument != "dtype":
            return  # (None means "as dtype" for key_dtype/value_dtype)
        bad = np.int16
    with pytest.raises(TypeError, match=rf"^{argument} must be"):
        KVCache(1, 1, 8, 4, **{argument: bad})


@pytest.mark.parametrize("argument", ["dtype", "key_dtype", "value_dtype"])
@pytest.mark.parametrize("bad", ["int3", "bfloat16"])
def test_unknown_format_names_are_refused(argument, bad):
    """A string numpy does not know: refused like any other format. (cache.storage_format turns
    np.dtype's TypeError into fmt = None, and ``None in _DTYPES`` is True because np.dtype(None) is
    float64: such a cache silently stores float64 with key_dtype None, and its repr raises.)"""
    with pytest.raises(TypeError, match=rf"^{argument} must be"):
        KVCache(1, 1, 8, 4, **{argument: bad})


def test_numpys_own_int4_is_refused():
    """The string "int4" is the 4-bit format, not numpy's old alias of int32 (numpy 1 read
    np.dtype("int4") as int32; numpy 2 refuses the name): an int32 dtype object is refused."""
    assert KVCache(1, 1, 8, 4, dtype="int4").key_dtype == "int4"
    with pytest.raises(TypeError, match="dtype"):
        KVCache(1, 1, 8, 4, dtype=np.dtype("i4"))


@pytest.mark.parametrize(
    "kw,match",
    [
        (dict(head_dim=48, dtype="int4"), '"int4" keys of 48'),  # block 32 does not divide 48
        (dict(head_dim=7, dtype="int4", block=None), '"int4" keys of 7'),
        (dict(head_dim=64, value_dim=40, value_dtype="int4", block=16), '"int4" values of 40'),
        (dict(head_dim=64, value_dim=10, key_dtype=np.float32, value_dtype="int4", block=4), '"int4" values of 10'),
        (dict(head_dim=64, key_dtype="int4", block=24), '"int4" keys of 64'),
    ],
)
def test_bad_block_for_int4_names_the_tensor(kw, match):
    with pytest.raises(ValueError, match=match):
        KVCache(1, 1, capacity=4, **kw)


#: (key format, value format, the int4 tensor that gets the bad value)
BAD_SIDES = [
    ("int4", "int4", "key"),
    ("int4", "int4", "value"),
    (np.float32, "int4", "value"),
    ("int4", np.float32, "key"),
    (np.int8, "int4", "value"),
    ("int4", np.float16, "key"),
]


@pytest.mark.parametrize("kfmt,vfmt,bad_name", BAD_SIDES)
@pytest.mark.parametrize("T", [1, 200])  # the serial kernels and the numpy path (2·3·200 > 1024 rows)
@pytest.mark.parametrize("bad", ["nan", "inf", "big32", "big64"])
def test_refused_appends_change_nothing(kfmt, vfmt, bad_name, T, bad):
    """NaN/inf into an int4 tensor (even with check_finite=False: there is no code for them), or |x| > 65504
    (float32 7e4, float64 1e300), is refused before anything is written: keys, values (the other tensor
    too), scales and length as they were."""
    rng = np.random.default_rng(80)
    # unrotated: the range is the input's (a rotated cache checks the rotated values, which spread one
    # large entry over its block: test_rotation_cache.py)
    cache = KVCache(2, 3, 64, 500, key_dtype=kfmt, value_dtype=vfmt, window=300, rotate=False)
    cache.append(randn(rng, (2, 3, 250, 64)), randn(rng, (2, 3, 250, 64)))
    new = {"key": randn(rng, (2, 3, T, 64)), "value": randn(rng, (2, 3, T, 64))}
    new[bad_name][1, 2, T - 1, 5] = {"nan": np.nan, "inf": -np.inf, "big32": 7e4, "big64": 1e300}[bad]
    if bad == "big32":
        new[bad_name] = new[bad_name].astype(np.float32)
    match = "contains (NaN|inf)" if bad in ("nan", "inf") else "holds values beyond float16's range"
    before = copies(*storage(cache))
    inputs = copies(new["key"], new["value"])
    for check_finite in (True, False):
        with pytest.raises(ValueError, match=f"{bad_name} {match}"):
            cache.append(new["key"], new["value"], check_finite=check_finite)
        assert cache.length == 250
        assert_unchanged(storage(cache), before)
        assert_unchanged([new["key"], new["value"]], inputs)


@pytest.mark.parametrize("T", [1, 200])
def test_refusal_of_nan_does_not_offer_check_finite_false(T):
    """An int4 store refuses NaN whatever check_finite says, so its message must not suggest
    check_finite=False: the serial path says so (cache.py, _append_serial), the numpy path (T = 200:
    2·3·200 rows > APPEND_SERIAL_ROWS) passes on kernels/finite.py's generic "(or check_finite=False
    to skip the check)"."""
    cache = KVCache(2, 3, 64, 500, dtype="int4")
    k = np.ones((2, 3, T, 64))
    k[0, 0, 0, 0] = np.nan
    with pytest.raises(ValueError, match="key contains NaN") as info:
        cache.append(k, np.ones((2, 3, T, 64)))
    assert "check_finite=False" not in str(info.value), str(info.value)


@pytest.mark.parametrize(
    "kw,shown",
    [
        (dict(dtype="int4"), "dtype=int4,"),
        (dict(key_dtype=np.int8, value_dtype="int4"), "key_dtype=int8, value_dtype=int4"),
        (dict(key_dtype="int4", value_dtype=np.float16), "key_dtype=int4, value_dtype=float16"),
        (dict(dtype=np.float32, value_dtype="int4"), "key_dtype=float32, value_dtype=int4"),
        (dict(dtype="int4", key_dtype="INT4"), "dtype=int4,"),
    ],
)
def test_repr_shows_the_formats(kw, shown):
    text = repr(KVCache(1, 2, 64, 8, **kw))
    assert shown in text, text
    if "key_dtype" not in shown:
        assert "key_dtype" not in text and "value_dtype" not in text


def test_views_are_read_only_4bit_tensors():
    cache = KVCache(1, 2, 64, 8, key_dtype="int4", value_dtype=np.int8)
    cache.append(np.ones((1, 2, 3, 64)), np.ones((1, 2, 3, 64)))
    keys, values = cache.keys, cache.values
    assert keys.bits == 4 and values.bits == 8 and keys.shape == (1, 2, 3, 64)
    for a in (keys.data, keys.scales):
        with pytest.raises(ValueError):
            a[...] = 0


# ----------------------------------------------------------------------------------------------
# MultiHeadAttention with 4-bit caches
# ----------------------------------------------------------------------------------------------


def _layer_reference(layer, x, cache):
    """The cached call's output from the cache's own (dequantised) content: queries of x, keys and values
    as stored, bottom-right causal, the output projection in float64 (a rotating cache: the query rotated
    like the keys, the attention output rotated back like the values)."""
    q, _, _ = layer.project_qkv(x)
    keys, values = content(cache)
    att = cache_reference(cache, q, keys, values, is_causal="lower_right", enable_gqa=True)
    B, L = x.shape[:2]
    merged = att.transpose(0, 2, 1, 3).reshape(B, L, -1)
    y = merged @ layer.w_o.astype(np.float64)
    return y if layer.b_o is None else y + layer.b_o


@pytest.mark.parametrize("kfmt,vfmt", [("int4", "int4"), (np.int8, "int4"), ("int4", np.float16)])
@pytest.mark.parametrize("block", [32, 16, None])
@pytest.mark.parametrize("rotate", [None, False])
def test_layer_with_a_4bit_cache(kfmt, vfmt, block, rotate):
    layer = MultiHeadAttention(96, 6, 2, head_dim=32, seed=3)
    rng = np.random.default_rng(90)
    B = 2
    if kfmt == vfmt:
        cache = layer.new_cache(B, 64, dtype=kfmt, block=block, rotate=rotate)
    else:
        cache = layer.new_cache(B, 64, key_dtype=kfmt, value_dtype=vfmt, block=block, rotate=rotate)
    for T in (9, 1, 1, 4, 1):  # a prompt, decode steps, a chunk
        x = randn(rng, (B, T, 96), np.float32)
        y = layer(x, cache=cache)
        assert y.dtype == np.float32 and y.shape == (B, T, 96)
        assert_close(y, _layer_reference(layer, x, cache), rtol=2e-5)


def test_new_cache_passes_key_and_value_formats():
    """layer.new_cache(key_dtype=..., value_dtype=...): int8 keys with int4 values, the README's pair."""
    layer = MultiHeadAttention(64, 4, 2)
    cache = layer.new_cache(1, 16, key_dtype=np.int8, value_dtype="int4")
    assert cache.key_dtype == np.int8 and cache.value_dtype == "int4" and cache.head_dim == 16
    assert cache.rotate == "both"  # the default: int8 keys and int4 values rotated
    assert layer.new_cache(1, 16, key_dtype=np.int8, value_dtype="int4", rotate="keys").rotate == "keys"
