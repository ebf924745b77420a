"""The split-K decode kernel (kernels/decode.py), through the public API: L <= 8 query rows against
S >= 256 keys, in every storage (float32/float64/float16/int8 keys and values), against the float64
reference; the exact merge of key parts (any n_split), row chunks, key blocks, serial vs parallel."""

import math

import numba
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import (
    KernelSpy,
    assert_close,
    assert_unchanged,
    copies,
    int8_effective_inputs,
    randn,
    random_bool_mask,
    random_float_mask,
)
from numba_attn import api, config, quantize, reference, scaled_dot_product_attention

KINDS = ("float32", "float64", "float16", "int8")
CAUSAL = (False, True, "upper_left", "lower_right")


def make_inputs(rng, kind, q_shape, k_shape, Ev, block=32):
    """(query, key, value) as numba_attn takes them for storage ``kind``."""
    kv_shape = k_shape[:-1] + (Ev,)
    if kind == "int8":
        q = randn(rng, q_shape, np.float32)
        return q, quantize(randn(rng, k_shape, np.float32), block), quantize(randn(rng, kv_shape, np.float32), block)
    dt = np.dtype(kind)
    return randn(rng, q_shape, dt), randn(rng, k_shape, dt), randn(rng, kv_shape, dt)


def reference_for(kind, q, k, v, scale=None, **kwargs):
    """The float64 reference on the numbers the kernel sees (int8: see int8_effective_inputs)."""
    if kind == "int8":
        q, k, v, scale = int8_effective_inputs(q, k, v, scale)
    out, lse = reference.scaled_dot_product_attention(q, k, v, scale=scale, return_lse=True, **kwargs)
    return out, np.broadcast_to(lse, out.shape[:-1])


def tolerances(kind):
    """(rtol of out, rtol of lse): the arithmetic is float32 except for float64; float16 results are
    rounded to float16."""
    return {"float64": (1e-10, 1e-10), "float32": (1e-5, 1e-5), "float16": (1e-3, 1e-5), "int8": (2e-5, 2e-5)}[kind]


# ----------------------------------------------------------------------------------------------
# property test against the reference
# ----------------------------------------------------------------------------------------------


@st.composite
def decode_cases(draw):
    kind = draw(st.sampled_from(KINDS))
    L = draw(st.integers(1, 8))
    S = draw(
        st.one_of(
            st.integers(256, 700),
            st.integers(256, 3000),
            st.sampled_from([256, 257, 383, 384, 511, 512, 513, 1024, 2999, 3000]),
        )
    )
    E = draw(st.sampled_from([16, 32, 40, 64]))
    Ev = draw(st.sampled_from([16, 24, 32, 64]))
    B = draw(st.integers(1, 2))
    Hkv = draw(st.integers(1, 3))
    g = draw(st.sampled_from([1, 1, 2, 3, 4]))
    H = Hkv * g
    causal = draw(st.sampled_from(CAUSAL))
    window = draw(st.one_of(st.none(), st.integers(1, 40), st.integers(1, S + 10))) if causal else None
    alibi = draw(st.booleans())
    softcap = draw(st.one_of(st.none(), st.floats(2.0, 50.0)))
    mask_type = draw(st.sampled_from([None, None, "bool", "float"]))
    # masks broadcast along L (e.g. (B, 1, 1, S)) reach the kernel as another numba type (see
    # test_argument_types_do_not_depend_on_layout): a fresh compilation per storage dtype, so the
    # property test leaves them to the explicit tests
    mask_shape = draw(st.sampled_from([(L, S), (B, 1, L, S), (B, H, L, S), (1, 1, L, S)]))
    density = draw(st.sampled_from([0.05, 0.5, 0.95, 1.0]))
    masked_rows = draw(st.sampled_from([0, 0, 1, 3]))
    scale = draw(st.one_of(st.none(), st.floats(0.2, 3.0).map(lambda f: f / math.sqrt(E))))
    seed = draw(st.integers(0, 2**32 - 1))

    rng = np.random.default_rng(seed)
    q, k, v = make_inputs(rng, kind, (B, H, L, E), (B, Hkv, S, E), Ev)
    mask = None
    if mask_type == "bool":
        mask = random_bool_mask(rng, mask_shape, density, masked_rows)
    elif mask_type == "float":
        mask = random_float_mask(
            rng, mask_shape, np.float32 if kind != "float64" else np.float64, 1.0 - density, 1.0, masked_rows
        )
    slopes = 2.0 ** -rng.uniform(1, 8, H) if alibi else None
    args = dict(
        attn_mask=mask,
        is_causal=causal,
        scale=scale,
        enable_gqa=g > 1,
        window=window,
        alibi_slopes=slopes,
        softcap=softcap,
    )
    return kind, (q, k, v), args


def _note(kind, qkv, args):
    shapes = [x.shape for x in qkv]
    extra = {key: (val.shape, val.dtype) if isinstance(val, np.ndarray) else val for key, val in args.items()}
    return f"{kind} {shapes} {extra}"


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(decode_cases())
def test_decode_matches_reference(case):
    kind, (q, k, v), args = case
    note = _note(kind, (q, k, v), args)
    floats = [x for x in (q, k, v, args["attn_mask"]) if isinstance(x, np.ndarray)]
    before = copies(*floats)
    with pytest.MonkeyPatch.context() as mp:
        spy = KernelSpy(mp)
        mp.setattr(config, "SERIAL_BELOW_FLOPS", 0)  # the parallel, split-K build
        out, lse = scaled_dot_product_attention(q, k, v, return_lse=True, **args)
        assert spy.ran() == {"decode_parallel": 1}, note
    expected_dtype = np.dtype(np.float16 if kind == "float16" else np.float64 if kind == "float64" else np.float32)
    assert out.dtype == expected_dtype, note
    assert lse.dtype == (np.float64 if kind == "float64" else np.float32), note
    ref_out, ref_lse = reference_for(kind, q, k, v, **args)
    rtol_out, rtol_lse = tolerances(kind)
    assert_close(out, ref_out, rtol=rtol_out)
    assert_close(lse, ref_lse, rtol=rtol_lse)
    dead = np.isneginf(ref_lse)
    assert (out[dead] == 0).all(), note
    assert_unchanged(floats, before)


# ----------------------------------------------------------------------------------------------
# fully-masked rows
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("mask_type", ["bool", "float"])
def test_fully_masked_rows(kind, mask_type):
    rng = np.random.default_rng(1)
    L, S = 6, 900
    q, k, v = make_inputs(rng, kind, (2, 4, L, 64), (2, 4, S, 64), 64)
    dead = [0, 3, 5]
    if mask_type == "bool":
        mask = random_bool_mask(rng, (2, 4, L, S), 0.5)
        mask[..., dead, :] = False
    else:
        mask = random_float_mask(rng, (L, S), np.float32 if kind != "float64" else np.float64, 0.3)
        mask[dead] = -np.inf
    for causal in (False, "lower_right"):
        out, lse = scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal, return_lse=True)
        assert not np.isnan(out).any() and not np.isnan(lse).any()
        assert (out[..., dead, :] == 0).all()
        assert np.isneginf(lse[..., dead]).all()
        assert np.isfinite(lse[..., [1, 2, 4]]).all()
        ref_out, ref_lse = reference_for(kind, q, k, v, attn_mask=mask, is_causal=causal)
        rtol_out, rtol_lse = tolerances(kind)
        assert_close(out, ref_out, rtol=rtol_out)
        assert_close(lse, ref_lse, rtol=rtol_lse)


def test_everything_masked_by_window_and_mask():
    """Rows whose only visible keys (the window) are masked out: zeros and -inf."""
    rng = np.random.default_rng(2)
    L, S, W = 4, 600, 8
    q, k, v = (randn(rng, (1, 2, n, 32), np.float32) for n in (L, S, S))
    mask = np.ones((L, S), bool)
    mask[1, S - L + 1 - W + 1 :] = False  # query 1 (position S - L + 1) loses its whole window
    out, lse = scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal="lower_right", window=W, return_lse=True)
    assert (out[:, :, 1] == 0).all() and np.isneginf(lse[:, :, 1]).all()
    ref_out, ref_lse = reference_for("float32", q, k, v, attn_mask=mask, is_causal="lower_right", window=W)
    assert_close(out, ref_out)
    assert_close(lse, ref_lse)


# ----------------------------------------------------------------------------------------------
# the split of the key range, row chunks, key blocks
# ----------------------------------------------------------------------------------------------

SPLIT_CASES = {
    # name: (kind, L, S, H, Hkv, args)
    "plain": ("float32", 1, 1000, 4, 4, {}),
    "gqa causal mask": ("float32", 5, 2000, 8, 2, dict(is_causal="lower_right", mask="bool")),
    "window alibi softcap": (
        "float32",
        3,
        1500,
        4,
        4,
        dict(is_causal="lower_right", window=700, alibi=True, softcap=20.0, mask="float"),
    ),
    "upper_left window": ("float32", 8, 700, 2, 1, dict(is_causal=True, window=3)),
    "float16": ("float16", 2, 1200, 4, 2, dict(is_causal="lower_right")),
    "int8": ("int8", 4, 1300, 4, 2, dict(is_causal="lower_right", mask="bool")),
    "float64": ("float64", 1, 800, 2, 2, dict(mask="float")),
}


def split_case(name, seed=3):
    kind, L, S, H, Hkv, extra = SPLIT_CASES[name]
    rng = np.random.default_rng(seed)
    q, k, v = make_inputs(rng, kind, (1, H, L, 64), (1, Hkv, S, 64), 64)
    args = dict(
        enable_gqa=H != Hkv,
        is_causal=extra.get("is_causal", False),
        window=extra.get("window"),
        softcap=extra.get("softcap"),
    )
    if extra.get("alibi"):
        args["alibi_slopes"] = 2.0 ** -np.arange(1, H + 1)
    if extra.get("mask") == "bool":
        args["attn_mask"] = random_bool_mask(rng, (1, H, L, S), 0.7, masked_rows=1)
    elif extra.get("mask") == "float":
        args["attn_mask"] = random_float_mask(rng, (L, S), np.float64 if kind == "float64" else np.float32, 0.2)
    return kind, (q, k, v), args


def _run_with(monkeypatch, qkv, args, **overrides):
    """Call the API with config/api attributes overridden; returns (out, lse) and which kernels ran."""
    with monkeypatch.context() as mp:
        spy = KernelSpy(mp)
        for key, value in overrides.items():
            if key == "n_split":
                mp.setattr(api, "decode_splits", lambda n_items, S, n=value: n)
            else:
                mp.setattr(config, key, value)
        out, lse = scaled_dot_product_attention(*qkv, return_lse=True, **args)
    return out, lse, spy.ran()


def assert_same_up_to_rounding(a, b, kind):
    """Two results of the same maths summed in a different order (fp32: 1e-5 relative to the row size)."""
    rtol = 1e-12 if kind == "float64" else 1e-5
    if kind == "float16":
        rtol = 1e-3  # two float16 roundings of nearly the same float32 number
    a64, b64 = a.astype(np.float64), b.astype(np.float64)
    np.testing.assert_array_equal(np.isneginf(a64), np.isneginf(b64))
    fin = np.isfinite(b64)
    mag = max(1.0, float(np.abs(b64[fin]).max())) if fin.any() else 1.0
    np.testing.assert_allclose(a64[fin], b64[fin], rtol=rtol, atol=rtol * mag)


@pytest.mark.parametrize("name", list(SPLIT_CASES))
def test_any_number_of_key_parts_gives_the_same_result(monkeypatch, name):
    """The LSE merge of the parts is exact up to rounding: n_split = 1 … more parts than keys agree."""
    kind, qkv, args = split_case(name)
    S = qkv[1].shape[-2]
    base_out, base_lse, ran = _run_with(monkeypatch, qkv, args, SERIAL_BELOW_FLOPS=0, n_split=1)
    assert ran == {"decode_parallel": 1}
    ref_out, ref_lse = reference_for(kind, *qkv, **args)
    rtol_out, rtol_lse = tolerances(kind)
    assert_close(base_out, ref_out, rtol=rtol_out)
    assert_close(base_lse, ref_lse, rtol=rtol_lse)
    for n in (2, 3, 7, 16, 64, S // 3, S + 5):
        out, lse, ran = _run_with(monkeypatch, qkv, args, SERIAL_BELOW_FLOPS=0, n_split=n)
        assert ran == {"decode_parallel": 1}
        assert_same_up_to_rounding(out, base_out, kind)
        assert_same_up_to_rounding(lse, base_lse, kind)


@pytest.mark.parametrize("items,min_split", [(1, 256), (4, 256), (100, 1), (1000, 7), (1, 10**6)])
def test_split_tunables(monkeypatch, items, min_split):
    """decode_splits follows DECODE_ITEMS_PER_THREAD / DECODE_MIN_SPLIT, and results do not depend on them."""
    kind, qkv, args = split_case("gqa causal mask")
    threads = numba.get_num_threads()
    for n_items, S in ((1, 2000), (3, 256), (50, 10**5), (7, 100)):
        with monkeypatch.context() as mp:
            mp.setattr(config, "DECODE_ITEMS_PER_THREAD", items)
            mp.setattr(config, "DECODE_MIN_SPLIT", min_split)
            want = max(1, min(-(-items * threads // n_items), S // min_split))
            assert api.decode_splits(n_items, S) == want
    base_out, base_lse, _ = _run_with(monkeypatch, qkv, args, SERIAL_BELOW_FLOPS=0, n_split=1)
    out, lse, ran = _run_with(
        monkeypatch, qkv, args, SERIAL_BELOW_FLOPS=0, DECODE_ITEMS_PER_THREAD=items, DECODE_MIN_SPLIT=min_split
    )
    assert ran == {"decode_parallel": 1}
    assert_same_up_to_rounding(out, base_out, kind)
    assert_same_up_to_rounding(lse, base_lse, kind)


def test_decode_splits_default():
    threads = numba.get_num_threads()
    assert api.decode_splits(1, 100) == 1  # fewer keys than one part
    assert api.decode_splits(1, 10**6) == config.DECODE_ITEMS_PER_THREAD * threads
    assert api.decode_splits(10**6, 10**6) == 1  # enough work items already
    assert api.decode_splits(1, 2 * config.DECODE_MIN_SPLIT) == min(2, config.DECODE_ITEMS_PER_THREAD * threads)


@pytest.mark.parametrize("name", ["gqa causal mask", "int8", "window alibi softcap"])
@pytest.mark.parametrize("max_rows,block_k", [(1, 128), (3, 7), (7, 1), (64, 1000), (1000, 128)])
def test_row_chunks_and_key_blocks(monkeypatch, name, max_rows, block_k):
    """DECODE_MAX_ROWS (rows per work item) and DECODE_BLOCK_K (keys per softmax block) change the
    order of the sums only."""
    kind, qkv, args = split_case(name)
    base_out, base_lse, _ = _run_with(monkeypatch, qkv, args, SERIAL_BELOW_FLOPS=0)
    out, lse, ran = _run_with(
        monkeypatch, qkv, args, SERIAL_BELOW_FLOPS=0, DECODE_MAX_ROWS=max_rows, DECODE_BLOCK_K=block_k, n_split=3
    )
    assert ran == {"decode_parallel": 1}
    assert_same_up_to_rounding(out, base_out, kind)
    assert_same_up_to_rounding(lse, base_lse, kind)


@pytest.mark.parametrize("name", ["plain", "gqa causal mask", "int8", "float16"])
def test_serial_path_equals_parallel_path(monkeypatch, name):
    kind, qkv, args = split_case(name)
    par_out, par_lse, ran = _run_with(monkeypatch, qkv, args, SERIAL_BELOW_FLOPS=0)
    assert ran == {"decode_parallel": 1}
    ser_out, ser_lse, ran = _run_with(monkeypatch, qkv, args, SERIAL_BELOW_FLOPS=10**18)
    assert ran == {"decode_serial": 1}
    assert_same_up_to_rounding(ser_out, par_out, kind)
    assert_same_up_to_rounding(ser_lse, par_lse, kind)
    # the serial build with one part is the parallel build with one part
    one_out, _one_lse, _ = _run_with(monkeypatch, qkv, args, SERIAL_BELOW_FLOPS=0, n_split=1)
    assert_same_up_to_rounding(ser_out, one_out, kind)


@pytest.mark.parametrize(
    "L,S,expected",
    [
        (8, 32, "decode"),
        (9, 256, "prefill"),
        (8, 31, "prefill"),
        (1, 32, "decode"),
        (1, 100000 // 64, "decode"),
    ],
)
def test_kernel_choice(monkeypatch, L, S, expected):
    rng = np.random.default_rng(4)
    q, k, v = (
        randn(rng, (1, 2, L, 64), np.float32),
        randn(rng, (1, 2, S, 64), np.float32),
        randn(rng, (1, 2, S, 64), np.float32),
    )
    out, _, ran = _run_with(monkeypatch, (q, k, v), {}, SERIAL_BELOW_FLOPS=0)
    assert ran == {f"{expected}_parallel": 1}
    assert_close(out, reference.scaled_dot_product_attention(q, k, v))


@pytest.mark.parametrize("L,S,expected", [(100, 50, "prefill"), (8, 50, "decode"), (9, 300, "prefill")])
def test_int8_takes_the_kernel_its_shape_picks(monkeypatch, L, S, expected):
    """Quantised keys/values follow the float rule: the prefill kernel dequantises a block at a time."""
    rng = np.random.default_rng(5)
    q = randn(rng, (1, 2, L, 64), np.float32)
    kq, vq = quantize(randn(rng, (1, 2, S, 64), np.float32)), quantize(randn(rng, (1, 2, S, 64), np.float32))
    out, lse, ran = _run_with(monkeypatch, (q, kq, vq), dict(is_causal=True), SERIAL_BELOW_FLOPS=0)
    assert ran == {f"{expected}_parallel": 1}
    ref_out, ref_lse = reference_for("int8", q, kq, vq, is_causal=True)
    assert_close(out, ref_out, rtol=2e-5)
    assert_close(lse, ref_lse, rtol=2e-5)


def test_batch_broadcast_and_gqa_groups(monkeypatch):
    """Key/value shared across a broadcast batch dim, and uneven key/value pairings (no GQA groups)."""
    rng = np.random.default_rng(6)
    q = randn(rng, (3, 4, 2, 32), np.float32)
    k = randn(rng, (1, 4, 700, 32), np.float32)  # broadcast over the batch
    v = randn(rng, (3, 1, 700, 32), np.float32)  # broadcast over the heads
    out, lse, ran = _run_with(monkeypatch, (q, k, v), dict(is_causal="lower_right"), SERIAL_BELOW_FLOPS=0)
    assert ran == {"decode_parallel": 1}
    ref_out, ref_lse = reference_for("float32", q, k, v, is_causal="lower_right")
    assert_close(out, ref_out)
    assert_close(lse, np.broadcast_to(ref_lse, lse.shape))


# ----------------------------------------------------------------------------------------------
# compilation: the layout of masks and slopes must not change the kernel's argument types
# ----------------------------------------------------------------------------------------------


def test_argument_types_do_not_depend_on_layout(monkeypatch):
    """Each distinct tuple of argument types is a fresh compilation of the decode kernel (10-20 s).
    A mask's batch layout (broadcast or full) and the batch size under ALiBi are not types: they
    must reach the kernel with the same numba types as the plain call (``m_idx`` and ``slopes``
    are the index/slope arrays built by ``_validate``)."""
    from numba_attn.kernels import decode

    seen = []
    original = decode.decode_parallel

    def record(*args):
        seen.append(tuple(numba.typeof(a) for a in args))
        return original(*args)

    monkeypatch.setattr(decode, "decode_parallel", record)
    monkeypatch.setattr(config, "SERIAL_BELOW_FLOPS", 0)
    rng = np.random.default_rng(7)
    q, k = randn(rng, (2, 4, 2, 32), np.float32), randn(rng, (2, 4, 300, 32), np.float32)
    ones = np.ones((2, 4, 2, 300), bool)
    variants = {
        "mask (L, S)": dict(attn_mask=ones[0, 0]),
        "mask (B, 1, L, S)": dict(attn_mask=ones[:, :1]),
        "mask (B, H, L, S)": dict(attn_mask=ones),
        "mask (1, H, 1, S)": dict(attn_mask=ones[:1, :, :1]),
        "key padding mask (B, 1, 1, S)": dict(attn_mask=ones[:, :1, :1]),
        "mask (S,)": dict(attn_mask=ones[0, 0, 0]),
        "ALiBi, B = 2": dict(alibi_slopes=np.ones(4)),
        "ALiBi, B = 1": dict(alibi_slopes=np.ones(4), batch=1),
        "ALiBi, no batch dim": dict(alibi_slopes=np.ones(4), batch=None),
    }
    names = [
        "query",
        "key",
        "k_scales",
        "k_block",
        "value",
        "v_scales",
        "v_block",
        "q_idx",
        "k_idx",
        "v_idx",
        "groups",
        "S",
        "mask",
        "m_idx",
        "mask_kind",
        "is_causal",
        "pos_offset",
        "window",
        "slopes",
        "softcap",
        "scale",
        "row_chunk",
        "n_split",
        "block_k",
        "out",
        "lse",
    ]
    baseline, problems = {}, []
    for name, kw in variants.items():
        kw = dict(kw)
        batch = kw.pop("batch", 2)
        qq, kk = (q[0], k[0]) if batch is None else (q[:batch], k[:batch])
        seen.clear()
        out = scaled_dot_product_attention(qq, kk, kk, **kw)
        assert_close(out, reference.scaled_dot_product_attention(qq, kk, kk, **kw))
        kind = "mask" if "attn_mask" in kw else "alibi"
        baseline.setdefault(kind, (name, seen[0]))
        first_name, first = baseline[kind]
        problems += [
            f"{name}: {names[i]} is {b}, with {first_name} {a}"
            for i, (a, b) in enumerate(zip(first, seen[0]))
            if a != b
        ]
    assert not problems, "argument types of the decode kernel differ:\n" + "\n".join(problems)


# ----------------------------------------------------------------------------------------------
# non-finite input: checked in the kernel (raw scores) and on the result, not by a second pass
# over the cache
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["float32", "float64", "float16"])
@pytest.mark.parametrize("name", ["key", "value"])
@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
@pytest.mark.parametrize("serial", [False, True])
def test_non_finite_key_or_value_is_refused(monkeypatch, kind, name, bad, serial):
    """A NaN/inf anywhere in the keys or values the kernel reads raises ValueError naming the
    operand, whatever the key's weight (a masked key's value still counts: 0·inf is NaN), and
    the inputs are left as they were."""
    rng = np.random.default_rng(7)
    q, k, v = make_inputs(rng, kind, (1, 4, 1, 32), (1, 4, 600, 32), 32)
    args = {"query": q, "key": k, "value": v}
    x = args[name].copy()
    x[0, 3, 517, 5] = bad
    args[name] = x
    mask = np.ones(600, bool)
    mask[517] = False  # the poisoned key is masked out: still refused
    monkeypatch.setattr(config, "SERIAL_BELOW_FLOPS", 10**12 if serial else 0)
    spy = KernelSpy(monkeypatch)
    before = copies(*args.values())
    for attn_mask in (None, mask):
        with pytest.raises(ValueError, match=rf"{name} contains {'NaN' if np.isnan(bad) else 'inf'}"):
            scaled_dot_product_attention(**args, attn_mask=attn_mask)
    assert spy.ran() == {("decode_serial" if serial else "decode_parallel"): 2}
    assert_unchanged(list(args.values()), before)
    out = scaled_dot_product_attention(**args, check_finite=False)  # no scan, no check: no error
    assert out.shape == (1, 4, 1, 32)


@pytest.mark.parametrize("kind", KINDS)
def test_non_finite_query_is_refused(kind):
    rng = np.random.default_rng(8)
    q, k, v = make_inputs(rng, kind, (1, 2, 1, 32), (1, 2, 512, 32), 32)
    q = q.copy()
    q[0, 1, 0, 0] = np.nan
    with pytest.raises(ValueError, match="query contains NaN"):
        scaled_dot_product_attention(q, k, v)


@pytest.mark.parametrize("dtype", [np.float32, np.float16, np.int8])
def test_free_cache_slots_are_not_checked(dtype):
    """A KV cache's slots past its valid tokens may hold anything: they are never read."""
    from numba_attn import KVCache

    rng = np.random.default_rng(9)
    cache = KVCache(1, 2, 32, capacity=1024, dtype=dtype)
    cache.append(randn(rng, (1, 2, 300, 32), np.float32), randn(rng, (1, 2, 300, 32), np.float32))
    if dtype != np.int8:
        cache._keys[:, :, 300:] = np.nan  # garbage in the free slots
        cache._values[:, :, 300:] = np.inf
    q = randn(rng, (1, 2, 1, 32), np.float32)
    # (int8 keys are stored Hadamard-rotated by default: the query goes the same way, rotate_query)
    out = scaled_dot_product_attention(cache.rotate_query(q), cache.keys, cache.values, is_causal="lower_right")
    assert np.isfinite(out).all()


@pytest.mark.parametrize("kind", ["float32", "float16", "int8"])
def test_overflowing_scores_are_refused(kind):
    """Finite but huge inputs whose scores exceed float32: an error, not a silent NaN."""
    rng = np.random.default_rng(10)
    k_pos = np.abs(randn(rng, (1, 2, 512, 32), np.float32)) + 1
    k = quantize(k_pos) if kind == "int8" else k_pos.astype(kind)
    v = randn(rng, (1, 2, 512, 32), np.float32)
    q = np.full((1, 2, 1, 32), 1e38, np.float32)  # finite; q·k·scale ≈ 1e39 is not
    with pytest.raises(ValueError, match="overflowed"):
        scaled_dot_product_attention(q, k, v)


@pytest.mark.parametrize("n_split", [1, 2, 6])
def test_non_finite_value_under_a_masked_span_is_refused_for_any_split(monkeypatch, n_split):
    """A NaN value whose key is masked, in a part of the key range where every key is masked (the
    merge skips that part: its l is 0), is still refused, whatever the split."""
    rng = np.random.default_rng(12)
    q, k, v = make_inputs(rng, "float32", (1, 2, 1, 32), (1, 2, 600, 32), 32)
    v = v.copy()
    v[0, 1, 100, 3] = np.nan
    mask = np.ones(600, bool)
    mask[:400] = False  # keys 0..399 hidden from every query
    monkeypatch.setattr(config, "SERIAL_BELOW_FLOPS", 0)
    monkeypatch.setattr(api, "decode_splits", lambda n_items, S, n=n_split: n)
    with pytest.raises(ValueError, match="value contains NaN"):
        scaled_dot_product_attention(q, k, v, attn_mask=mask)
