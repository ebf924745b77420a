"""numba_attn._validate: every bad input is refused at the door, with a message naming the argument,
before any kernel runs and without touching the inputs."""

import types

import numpy as np
import pytest

from conftest import DTYPES, assert_unchanged, copies, randn
from numba_attn import attention_weights, config, reference, scaled_dot_product_attention
from numba_attn._validate import check_causal, check_scale, prepare_attention

L, S, E, EV = 5, 7, 4, 3


def _good(dtype=np.float64, batch=(2, 3)):
    rng = np.random.default_rng(0)
    return dict(
        query=randn(rng, batch + (L, E), dtype),
        key=randn(rng, batch + (S, E), dtype),
        value=randn(rng, batch + (S, EV), dtype),
    )


def _call(overrides, fn=scaled_dot_product_attention):
    """Call ``fn`` on good inputs with ``overrides`` (an entry may be a function of the good args)."""
    kwargs = _good()
    for name, val in overrides.items():
        kwargs[name] = val(kwargs) if isinstance(val, types.FunctionType) else val
    arrays = [kwargs[n] for n in ("query", "key", "value", "attn_mask") if isinstance(kwargs.get(n), np.ndarray)]
    before = copies(*arrays)
    try:
        fn(**kwargs)
    finally:
        assert_unchanged(arrays, before)


def _with_nonfinite(name, value, where=(0, 1, 2, 1)):
    def make(kw):
        x = kw[name].copy()
        x[where[: x.ndim]] = value
        return x

    return make


BAD = [
    # (id, overrides, exception, message pattern)
    ("query-1d", dict(query=np.ones(E)), ValueError, r"query .*at least 2 dims"),
    ("key-1d", dict(key=np.ones(E)), ValueError, r"key .*at least 2 dims"),
    ("value-1d", dict(value=np.ones(EV)), ValueError, r"value .*at least 2 dims"),
    ("query-0d", dict(query=np.float64(1.0)), (ValueError, TypeError), r"query"),
    ("value-0d-array", dict(value=np.array(1.0)), ValueError, r"value .*at least 2 dims"),
    ("E-mismatch", dict(key=lambda kw: kw["key"][..., : E - 1]), ValueError, r"key's last dim .*query"),
    ("E-mismatch-longer", dict(key=lambda kw: np.concatenate([kw["key"]] * 2, -1)), ValueError, r"key's last dim"),
    ("S-mismatch", dict(value=lambda kw: kw["value"][..., : S - 1, :]), ValueError, r"value's .*key"),
    ("E-zero", dict(query=np.ones((L, 0)), key=np.ones((S, 0))), ValueError, r"query's last dim"),
    ("batch-query-key", dict(key=lambda kw: np.ones((4, 3, S, E))), ValueError, r"batch dims of query .*key"),
    ("batch-value", dict(value=lambda kw: np.ones((2, 5, S, EV))), ValueError, r"batch dims .*value \(2, 5\)"),
    ("batch-query", dict(query=lambda kw: np.ones((3, 3, L, E))), ValueError, r"batch dims of query \(3, 3\)"),
    ("mask-L", dict(attn_mask=np.ones((L + 1, S), bool)), ValueError, r"attn_mask .*broadcast"),
    ("mask-S", dict(attn_mask=np.ones((L, S - 1), bool)), ValueError, r"attn_mask .*broadcast"),
    ("mask-batch", dict(attn_mask=np.ones((4, 1, L, S), bool)), ValueError, r"attn_mask .*broadcast"),
    ("mask-extra-batch", dict(attn_mask=np.ones((5, 2, 3, L, S), bool)), ValueError, r"attn_mask .*broadcast"),
    ("mask-float-shape", dict(attn_mask=np.zeros((S, L))), ValueError, r"attn_mask .*broadcast"),
    ("mask-int", dict(attn_mask=np.ones((L, S), np.int64)), TypeError, r"attn_mask .*dtype"),
    ("mask-uint8", dict(attn_mask=np.ones((L, S), np.uint8)), TypeError, r"attn_mask .*dtype"),
    ("mask-complex", dict(attn_mask=np.ones((L, S), complex)), TypeError, r"attn_mask .*dtype"),
    ("mask-object", dict(attn_mask=np.ones((L, S), object)), TypeError, r"attn_mask .*dtype"),
    ("mask-str", dict(attn_mask=np.full((L, S), "a")), TypeError, r"attn_mask"),
    ("mask-scalar", dict(attn_mask=3), TypeError, r"attn_mask"),
    ("mask-nan", dict(attn_mask=np.where(np.eye(L, S, dtype=bool), np.nan, 0.0)), ValueError, r"attn_mask .*NaN"),
    ("mask-posinf", dict(attn_mask=np.where(np.eye(L, S, dtype=bool), np.inf, 0.0)), ValueError, r"attn_mask .*\+inf"),
    ("mask-posinf-f32", dict(attn_mask=np.full((S,), np.inf, np.float32)), ValueError, r"attn_mask"),
    ("scale-zero", dict(scale=0.0), ValueError, r"scale"),
    ("scale-negative", dict(scale=-1.0), ValueError, r"scale"),
    ("scale-negative-int", dict(scale=-2), ValueError, r"scale"),
    ("scale-nan", dict(scale=float("nan")), ValueError, r"scale"),
    ("scale-inf", dict(scale=float("inf")), ValueError, r"scale"),
    ("scale-np-inf", dict(scale=np.float32(np.inf)), ValueError, r"scale"),
    ("scale-bool", dict(scale=True), TypeError, r"scale"),
    ("scale-np-bool", dict(scale=np.bool_(True)), TypeError, r"scale"),
    ("scale-str", dict(scale="0.5"), TypeError, r"scale"),
    ("scale-complex", dict(scale=1j), TypeError, r"scale"),
    ("scale-array", dict(scale=np.array([0.5, 0.5])), TypeError, r"scale"),
    ("causal-str", dict(is_causal="yes"), ValueError, r"is_causal"),
    ("causal-dash", dict(is_causal="lower-right"), ValueError, r"is_causal"),
    ("causal-case", dict(is_causal="Upper_Left"), ValueError, r"is_causal"),
    ("causal-empty", dict(is_causal=""), ValueError, r"is_causal"),
    ("causal-int", dict(is_causal=2), ValueError, r"is_causal"),
    ("causal-list", dict(is_causal=[True]), ValueError, r"is_causal"),
    ("dropout", dict(dropout_p=0.1), ValueError, r"dropout_p"),
    ("dropout-one", dict(dropout_p=1.0), ValueError, r"dropout_p"),
    ("dropout-negative", dict(dropout_p=-0.5), ValueError, r"dropout_p"),
    ("dropout-nan", dict(dropout_p=float("nan")), ValueError, r"dropout_p"),
    ("dropout-str", dict(dropout_p="0"), ValueError, r"dropout_p"),
    ("dropout-none", dict(dropout_p=None), ValueError, r"dropout_p"),
    (
        "heads-differ",
        dict(key=np.ones((2, 2, S, E)), value=np.ones((2, 2, S, EV))),
        ValueError,
        r"batch dims .*enable_gqa",
    ),
    (
        "gqa-not-divisible",
        dict(key=np.ones((2, 2, S, E)), value=np.ones((2, 2, S, EV)), enable_gqa=True),
        ValueError,
        r"enable_gqa.*query heads \(3\).*key/value heads \(2\)",
    ),
    (
        "gqa-more-kv-heads",
        dict(key=np.ones((2, 6, S, E)), value=np.ones((2, 6, S, EV)), enable_gqa=True),
        ValueError,
        r"enable_gqa.*heads",
    ),
    (
        "gqa-kv-heads-differ",
        dict(key=np.ones((2, 1, S, E)), value=np.ones((2, 3, S, EV)), enable_gqa=True),
        ValueError,
        r"enable_gqa.*key and value",
    ),
    ("gqa-no-heads-dim", dict(query=np.ones((L, E)), enable_gqa=True), ValueError, r"enable_gqa.*heads dim"),
    (
        "gqa-zero-kv-heads",
        dict(key=np.ones((2, 0, S, E)), value=np.ones((2, 0, S, EV)), enable_gqa=True),
        ValueError,
        r"enable_gqa",
    ),
    ("out_dtype-int", dict(out_dtype=np.int32), TypeError, r"out_dtype"),
    ("out_dtype-complex", dict(out_dtype=complex), TypeError, r"out_dtype"),
    ("out_dtype-str", dict(out_dtype="half-ish"), TypeError, r"out_dtype"),
    ("window-zero", dict(window=0, is_causal=True), ValueError, r"window"),
    ("window-negative", dict(window=-3, is_causal="lower_right"), ValueError, r"window"),
    ("window-float", dict(window=2.5, is_causal=True), TypeError, r"window"),
    ("window-bool", dict(window=True, is_causal=True), TypeError, r"window"),
    ("window-not-causal", dict(window=4), ValueError, r"window .*is_causal"),
    ("softcap-zero", dict(softcap=0.0), ValueError, r"softcap"),
    ("softcap-negative", dict(softcap=-1.0), ValueError, r"softcap"),
    ("softcap-nan", dict(softcap=float("nan")), ValueError, r"softcap"),
    ("softcap-inf", dict(softcap=float("inf")), ValueError, r"softcap"),
    ("softcap-str", dict(softcap="30"), TypeError, r"softcap"),
    ("softcap-bool", dict(softcap=True), TypeError, r"softcap"),
    ("alibi-shape", dict(alibi_slopes=np.ones(4)), ValueError, r"alibi_slopes .*\(3,\)"),
    ("alibi-2d", dict(alibi_slopes=np.ones((1, 3))), ValueError, r"alibi_slopes"),
    (
        "alibi-no-heads",
        dict(query=np.ones((L, E)), key=np.ones((S, E)), value=np.ones((S, EV)), alibi_slopes=np.ones(1)),
        ValueError,
        r"alibi_slopes",
    ),
    ("alibi-nan", dict(alibi_slopes=np.array([0.5, np.nan, 0.1])), ValueError, r"alibi_slopes .*NaN"),
    ("alibi-complex", dict(alibi_slopes=np.ones(3, complex)), TypeError, r"alibi_slopes"),
    ("alibi-str", dict(alibi_slopes="abc"), TypeError, r"alibi_slopes"),
]

NON_FLOAT = [
    np.int64,
    np.int32,
    np.uint8,
    np.int8,
    np.bool_,
    np.complex128,
    np.complex64,
    np.longdouble,
    object,
    "U3",
    "S3",
]


@pytest.mark.parametrize("overrides,exc,pattern", [b[1:] for b in BAD], ids=[b[0] for b in BAD])
def test_bad_input_is_refused(no_kernel, overrides, exc, pattern):
    with pytest.raises(exc, match=pattern):
        _call(overrides)
    assert not no_kernel.ran()


NON_FINITE = [
    ("query-nan", dict(query=_with_nonfinite("query", np.nan)), r"query contains NaN"),
    ("query-inf", dict(query=_with_nonfinite("query", np.inf)), r"query contains inf"),
    ("key-neginf", dict(key=_with_nonfinite("key", -np.inf)), r"key contains inf"),
    ("key-nan", dict(key=_with_nonfinite("key", np.nan)), r"key contains NaN"),
    ("value-nan", dict(value=_with_nonfinite("value", np.nan)), r"value contains NaN"),
    ("value-inf", dict(value=_with_nonfinite("value", np.inf)), r"value contains inf"),
]


@pytest.mark.parametrize("overrides,pattern", [b[1:] for b in NON_FINITE], ids=[b[0] for b in NON_FINITE])
@pytest.mark.parametrize("path", ["serial", "parallel"])
def test_non_finite_input_is_refused(monkeypatch, overrides, pattern, path):
    """NaN/inf in query/key/value: ValueError naming the operand, and no result. The kernels find
    them (in a loop that already reads the values, see api._run), so the kernel runs first; the
    inputs are left as they were (``_call`` checks)."""
    monkeypatch.setattr(config, "SERIAL_BELOW_FLOPS", 10**18 if path == "serial" else 0)
    with pytest.raises(ValueError, match=pattern):
        _call(overrides)


@pytest.mark.parametrize("name", ["query", "key", "value"])
@pytest.mark.parametrize("dtype", NON_FLOAT, ids=str)
def test_non_float_operands_are_refused(no_kernel, name, dtype):
    def make(kw):
        x = kw[name]
        if np.dtype(dtype).kind in "US":
            return np.full(x.shape, "abc", dtype)
        return x.astype(dtype)

    with pytest.raises(TypeError, match=rf"{name} must be float16, float32 or float64"):
        _call({name: make})


@pytest.mark.parametrize("name", ["query", "key", "value"])
def test_float16_operands_are_accepted(name):
    """float16 storage is supported (computed in float32); only its non-finite values are refused."""
    kw = _good()
    kw[name] = kw[name].astype(np.float16)
    out = scaled_dot_product_attention(**kw)
    assert out.dtype == np.float64 and out.shape == (2, 3, L, EV)
    x = kw[name].copy()
    x[1, 2, 0, 0] = np.inf
    kw[name] = x
    with pytest.raises(ValueError, match=rf"{name} contains inf"):
        scaled_dot_product_attention(**kw)


@pytest.mark.parametrize("name", ["query", "key", "value"])
@pytest.mark.parametrize("bad", [["a", "b"], 3.0, None, {"a": 1}, [[1.0, 2.0], [3.0]]], ids=repr)
def test_non_arrays_are_refused(no_kernel, name, bad):
    with pytest.raises((TypeError, ValueError), match=name):
        _call({name: bad})


def test_float16_mask_is_accepted_as_additive():
    """A float16 *mask* is an additive bias like any floating mask."""
    kw = _good()
    mask = np.zeros((L, S), np.float16)
    mask[:, 0] = -np.inf
    out = scaled_dot_product_attention(**kw, attn_mask=mask)
    ref = scaled_dot_product_attention(**kw, attn_mask=mask.astype(np.float64))
    np.testing.assert_array_equal(out, ref)


@pytest.mark.parametrize("name", ["query", "key", "value"])
@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_check_finite_false_skips_the_scan(name, bad):
    kw = _good()
    x = kw[name].copy()
    x[0, 0, 0, 0] = bad
    kw[name] = x
    with pytest.raises(ValueError, match=name):
        scaled_dot_product_attention(**kw)
    out = scaled_dot_product_attention(**kw, check_finite=False)  # no error; values unspecified
    assert out.shape == (2, 3, L, EV)
    w = attention_weights(kw["query"], kw["key"], check_finite=False)
    assert w.shape == (2, 3, L, S)


def test_check_finite_is_on_by_default_in_attention_weights():
    kw = _good()
    q = kw["query"].copy()
    q[1, 1, 1, 1] = np.nan
    with pytest.raises(ValueError, match="query contains NaN"):
        attention_weights(q, kw["key"])


def test_quantized_query_is_refused(no_kernel):
    from numba_attn import quantize

    kw = _good()
    with pytest.raises(TypeError, match="query cannot be a QuantizedTensor"):
        scaled_dot_product_attention(quantize(kw["query"]), kw["key"], kw["value"])


def test_int8_keys_with_float64_query_compute_in_float64():
    """Once refused (TypeError) against the README's rule; now float64 arithmetic (tests/test_quant.py
    checks the numbers)."""
    from numba_attn import quantize

    kw = _good()
    out = scaled_dot_product_attention(kw["query"], quantize(kw["key"]), kw["value"])
    assert out.dtype == np.float64 and not np.isnan(out).any()


AW_BAD = [
    ("query-1d", dict(query=np.ones(E)), ValueError, r"query"),
    ("key-1d", dict(key=np.ones(E)), ValueError, r"key"),
    ("E-mismatch", dict(key=np.ones((2, 3, S, E + 1))), ValueError, r"key"),
    ("batch", dict(key=np.ones((4, 3, S, E))), ValueError, r"query.*key|key.*query"),
    ("complex-query", dict(query=np.ones((L, E), complex)), TypeError, r"query must be float16, float32 or float64"),
    ("int-key", dict(key=np.ones((S, E), np.int64)), TypeError, r"key"),
    ("mask", dict(attn_mask=np.ones((L, S + 1), bool)), ValueError, r"attn_mask"),
    ("scale", dict(scale=-1.0), ValueError, r"scale"),
    ("causal", dict(is_causal="left"), ValueError, r"is_causal"),
]


@pytest.mark.parametrize("overrides,exc,pattern", [b[1:] for b in AW_BAD], ids=[b[0] for b in AW_BAD])
def test_attention_weights_refuses_bad_input(no_kernel, overrides, exc, pattern):
    def weights(query, key, value, **kw):
        return attention_weights(query, key, **kw)

    with pytest.raises(exc, match=pattern):
        _call(overrides, fn=weights)


# ------------------------------------------------------------------------------------------
# the helpers and the plan, directly
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "value,expected",
    [
        (False, None),
        (None, None),
        (np.bool_(False), None),
        (True, "upper_left"),
        (np.bool_(True), "upper_left"),
        ("upper_left", "upper_left"),
        ("lower_right", "lower_right"),
    ],
)
def test_check_causal(value, expected):
    assert check_causal(value) == expected


@pytest.mark.parametrize(
    "scale,E_,expected", [(None, 16, 0.25), (None, 1, 1.0), (2, 5, 2.0), (np.float32(0.5), 3, 0.5), (1e-30, 3, 1e-30)]
)
def test_check_scale(scale, E_, expected):
    assert check_scale(scale, E_) == expected
    assert isinstance(check_scale(scale, E_), float)


@pytest.mark.parametrize("dtype", DTYPES)
def test_plan_normalises_operands(dtype):
    rng = np.random.default_rng(1)
    q = randn(rng, (2, 3, L, E), dtype)[:, :, ::-1]  # negative strides
    k = np.asfortranarray(randn(rng, (1, 3, S, E), dtype))
    v = randn(rng, (3, S, EV), np.float64)
    mask = rng.random((L, S)) < 0.5
    before = copies(q, k, v, mask)
    plan = prepare_attention(q, k, v, mask, 0.0, "lower_right", None, False, True)
    assert_unchanged([q, k, v, mask], before)
    assert plan.dtype == np.float64  # result_type with the float64 value
    assert plan.batch_shape == (2, 3) and plan.n_batch == 6
    assert (plan.L, plan.S, plan.E, plan.Ev) == (L, S, E, EV)
    assert plan.pos_offset == S - L and plan.is_causal
    assert plan.scale == pytest.approx(1 / np.sqrt(E))
    for arr in (plan.query, plan.key, plan.value):
        assert arr.ndim == 3 and arr.flags.c_contiguous and not arr.flags.writeable
        assert arr.dtype == np.float64
    # each output batch entry maps to the right operand entry
    for n in range(6):
        b0, b1 = divmod(n, 3)
        np.testing.assert_array_equal(plan.query[plan.q_idx[n]][:L], q[b0, b1])
        np.testing.assert_array_equal(plan.key[plan.k_idx[n]][:S], k[0, b1])
        np.testing.assert_array_equal(plan.value[plan.v_idx[n]][:S], v[b1])
        np.testing.assert_array_equal(plan.mask[plan.m_idx[n]], mask)
    assert plan.mask_kind == 1


def test_plan_gqa_head_mapping():
    rng = np.random.default_rng(2)
    q, k, v = randn(rng, (2, 6, L, E)), randn(rng, (2, 2, S, E)), randn(rng, (1, 2, S, EV))
    plan = prepare_attention(q, k, v, None, 0.0, False, None, True, True)
    assert plan.batch_shape == (2, 6)
    for n in range(12):
        b, h = divmod(n, 6)
        np.testing.assert_array_equal(plan.key[plan.k_idx[n]][:S], k[b, h // 3])
        np.testing.assert_array_equal(plan.value[plan.v_idx[n]][:S], v[0, h // 3])
    assert plan.mask_kind == 0 and not plan.is_causal


def test_batch_plan_is_worked_out_once_per_batch_shapes():
    """The batch indices and KV groups depend on the operands' batch shapes alone: kept per combination
    (the same arrays for a second call, whatever L, S and the data), different for other shapes, and
    the groups list the output entries that share a key/value entry (GQA: consecutive heads; a key
    broadcast over the batch: entries of different batches)."""
    rng = np.random.default_rng(3)
    q, k, v = randn(rng, (2, 6, L, E)), randn(rng, (2, 2, S, E)), randn(rng, (2, 2, S, EV))
    first = prepare_attention(q, k, v, None, 0.0, False, None, True, True)
    q2, k2, v2 = randn(rng, (2, 6, L + 1, E)), randn(rng, (2, 2, S + 3, E)), randn(rng, (2, 2, S + 3, EV))
    again = prepare_attention(q2, k2, v2, None, 0.0, "lower_right", None, True, True)
    for name in ("q_idx", "k_idx", "v_idx", "groups", "m_idx"):
        assert getattr(again, name) is getattr(first, name), name
    np.testing.assert_array_equal(first.groups, np.arange(12).reshape(4, 3))
    broadcast = prepare_attention(q, k[:1], v[:1], None, 0.0, False, None, True, True)
    assert broadcast.k_idx is not first.k_idx
    np.testing.assert_array_equal(broadcast.k_idx, np.tile(np.repeat(np.arange(2), 3), 2))
    np.testing.assert_array_equal(broadcast.groups, [[0, 1, 2, 6, 7, 8], [3, 4, 5, 9, 10, 11]])
    uneven = prepare_attention(q[:, :1], k[:, :1], v[:1, :1], None, 0.0, False, None, False, True)
    np.testing.assert_array_equal(uneven.v_idx, [0, 0])
    np.testing.assert_array_equal(uneven.groups, [[0], [1]])  # k entries 0, 1 with v entry 0: one each


@pytest.mark.parametrize("dtype", [np.float32, np.float16])
def test_overflowing_scores_are_refused_in_prefill(dtype):
    """Finite inputs so large that scale·q·k exceeds float32: a ValueError, not zeros or NaN. Inputs
    large but safe (the bound max|q|·max|k|·E·scale stays finite) compute normally."""
    rng = np.random.default_rng(3)
    k = (np.abs(rng.standard_normal((2, 16, 32))) + 1).astype(dtype)
    v = rng.standard_normal((2, 16, 32)).astype(dtype)
    q = np.full((2, 16, 32), 1e38, np.float32)
    with pytest.raises(ValueError, match="overflowed"):
        scaled_dot_product_attention(q, k, v)
    q = np.full((2, 16, 32), 1e30, np.float32) * np.sign(rng.standard_normal((2, 16, 32))).astype(np.float32)
    out = scaled_dot_product_attention(q, k, v)
    ref = reference.scaled_dot_product_attention(q.astype(np.float64), k.astype(np.float64), v.astype(np.float64))
    assert np.isfinite(out).all()
    np.testing.assert_allclose(out, ref, atol=2e-3 if dtype == np.float16 else 1e-5)


def test_non_finite_value_under_a_fully_masked_row_is_refused():
    """Prefill: a row that sees no key still multiplies the values by 0, and 0·inf is NaN: refused
    like any other non-finite value (not silently zeroed)."""
    rng = np.random.default_rng(4)
    q, k, v = (rng.standard_normal((1, 2, n, 16)) for n in (20, 30, 30))
    v[0, 0, 5, 1] = np.inf
    mask = np.zeros((20, 30), bool)  # no row sees any key: every output row is zeros
    with pytest.raises(ValueError, match="value contains inf"):
        scaled_dot_product_attention(q, k, v, attn_mask=mask)
    np.testing.assert_array_equal(scaled_dot_product_attention(q, k, v, attn_mask=mask, check_finite=False), 0)
