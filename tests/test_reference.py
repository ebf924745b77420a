"""numba_attn.reference (the float64 oracle) against a naive per-row loop on tiny shapes."""

import math

import numpy as np
import pytest

from conftest import randn, random_bool_mask, random_float_mask
from numba_attn import reference


def naive_attention(q, k, v, mask=None, is_causal=False, scale=None, enable_gqa=False):
    """One query row at a time, plain Python softmax: (out, lse, weights), all float64."""
    q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
    L, E = q.shape[-2:]
    S, Ev = k.shape[-2], v.shape[-1]
    if scale is None:
        scale = 1.0 / math.sqrt(E)
    bq, bk, bv = q.shape[:-2], k.shape[:-2], v.shape[:-2]
    group = 1
    if enable_gqa:
        group = bq[-1] // bk[-1]
        bk = bk[:-1] + (bq[-1],)
        bv = bv[:-1] + (bq[-1],)
    shapes = [bq, bk, bv]
    if mask is not None:
        mask = np.asarray(mask)
        m2 = mask.reshape((1,) * max(0, 2 - mask.ndim) + mask.shape)
        shapes.append(m2.shape[:-2])
    batch = np.broadcast_shapes(*shapes)
    alignment = {False: None, True: "upper_left"}.get(is_causal, is_causal)
    out = np.zeros(batch + (L, Ev))
    lse = np.full(batch + (L,), -np.inf)
    weights = np.zeros(batch + (L, S))

    def pick(x, idx, heads_div=1):
        nb = x.ndim - 2
        idx = idx[len(idx) - nb :] if nb else ()
        own = []
        for axis, i in enumerate(idx):
            last = axis == nb - 1
            size = x.shape[axis]
            if last and heads_div > 1:
                own.append(i // heads_div)
            else:
                own.append(0 if size == 1 else i)
        return x[tuple(own)]

    for idx in np.ndindex(*batch):
        qn = pick(q, idx)
        kn = pick(k, idx, group)
        vn = pick(v, idx, group)
        mn = None
        if mask is not None:
            mn = np.broadcast_to(pick(m2, idx), (L, S))
        for i in range(L):
            scores = []
            for j in range(S):
                visible = True
                if alignment == "upper_left":
                    visible = j <= i
                elif alignment == "lower_right":
                    visible = j <= i + S - L
                z = scale * sum(float(qn[i, d]) * float(kn[j, d]) for d in range(E))
                if mn is not None:
                    if mn.dtype == np.bool_:
                        visible = visible and bool(mn[i, j])
                    else:
                        z += float(mn[i, j])
                if not visible or z == -math.inf:
                    continue
                scores.append((j, z))
            if not scores:
                continue
            mx = max(z for _, z in scores)
            total = sum(math.exp(z - mx) for _, z in scores)
            lse[idx + (i,)] = mx + math.log(total)
            for j, z in scores:
                w = math.exp(z - mx) / total
                weights[idx + (i, j)] = w
                out[idx + (i,)] += w * vn[j]
    return out, lse, weights


CASES = [
    # (id, q batch, k batch, v batch, L, S, E, Ev, mask kind, mask shape, is_causal, scale, gqa)
    ("plain", (), (), (), 3, 5, 4, 2, None, None, False, None, False),
    ("batch", (2,), (2,), (2,), 4, 4, 3, 3, None, None, False, None, False),
    ("broadcast", (2, 1), (1, 3), (3,), 3, 4, 2, 5, None, None, False, 0.7, False),
    ("bool", (2,), (2,), (2,), 4, 6, 3, 2, "bool", (2, 4, 6), False, None, False),
    ("bool-bcast", (2,), (2,), (2,), 4, 6, 3, 2, "bool", (6,), False, None, False),
    ("float", (), (), (), 5, 3, 2, 2, "float", (5, 3), False, None, False),
    ("float-bcast", (3,), (3,), (1,), 5, 3, 2, 2, "float", (1, 1, 3), False, 1.5, False),
    ("causal-ul-LgtS", (), (), (), 6, 3, 2, 2, None, None, True, None, False),
    ("causal-ul-LltS", (), (), (), 3, 6, 2, 2, None, None, "upper_left", None, False),
    ("causal-lr-LgtS", (), (), (), 6, 3, 2, 2, None, None, "lower_right", None, False),
    ("causal-lr-LltS", (2,), (2,), (2,), 3, 6, 2, 2, None, None, "lower_right", None, False),
    ("causal+bool", (), (), (), 5, 5, 2, 2, "bool", (5, 5), "lower_right", None, False),
    ("causal+float", (), (), (), 4, 7, 3, 1, "float", (4, 7), True, None, False),
    ("gqa", (2, 4), (2, 2), (2, 2), 3, 4, 2, 2, None, None, False, None, True),
    ("gqa-causal", (1, 6), (1, 3), (1, 3), 4, 4, 3, 2, "bool", (1, 1, 4, 4), "lower_right", None, True),
    ("gqa-1kv", (3,), (1,), (1,), 2, 5, 2, 2, None, None, False, 0.3, True),
]


def _make(case, seed):
    _, bq, bk, bv, L, S, E, Ev, mask_kind, mask_shape, causal, scale, gqa = case
    rng = np.random.default_rng(seed)
    q, k, v = randn(rng, bq + (L, E)), randn(rng, bk + (S, E)), randn(rng, bv + (S, Ev))
    if mask_kind == "bool":
        mask = random_bool_mask(rng, mask_shape, 0.6)
    elif mask_kind == "float":
        mask = random_float_mask(rng, mask_shape, np.float64, 0.3, 2.0)
    else:
        mask = None
    return q, k, v, mask, causal, scale, gqa


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
@pytest.mark.parametrize("seed", [0, 1])
def test_reference_matches_naive_loop(case, seed):
    q, k, v, mask, causal, scale, gqa = _make(case, seed)
    out, lse = reference.scaled_dot_product_attention(
        q, k, v, attn_mask=mask, is_causal=causal, scale=scale, enable_gqa=gqa, return_lse=True
    )
    w = reference.attention_weights(q, k, attn_mask=mask, is_causal=causal, scale=scale, enable_gqa=gqa)
    n_out, n_lse, n_w = naive_attention(q, k, v, mask, causal, scale, gqa)
    assert out.dtype == lse.dtype == w.dtype == np.float64
    assert out.shape == n_out.shape
    np.testing.assert_allclose(out, n_out, rtol=1e-12, atol=1e-12)
    np.testing.assert_array_equal(np.isneginf(lse), np.isneginf(np.broadcast_to(n_lse, lse.shape)))
    finite = np.isfinite(lse)
    np.testing.assert_allclose(lse[finite], np.broadcast_to(n_lse, lse.shape)[finite], rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(w, np.broadcast_to(n_w, w.shape), rtol=1e-12, atol=1e-12)
    # the same input as float32 gives float64 results (computed from the exactly upcast values)
    out32 = reference.scaled_dot_product_attention(
        q.astype(np.float32),
        k.astype(np.float32),
        v.astype(np.float32),
        attn_mask=mask,
        is_causal=causal,
        scale=scale,
        enable_gqa=gqa,
    )
    assert out32.dtype == np.float64


@pytest.mark.parametrize("L,S", [(1, 1), (3, 5), (5, 3), (4, 4), (0, 3), (3, 0), (1, 7), (7, 1)])
@pytest.mark.parametrize("alignment", ["upper_left", "lower_right"])
def test_causal_mask(L, S, alignment):
    m = reference.causal_mask(L, S, alignment)
    assert m.shape == (L, S) and m.dtype == np.bool_
    offset = 0 if alignment == "upper_left" else S - L
    for i in range(L):
        for j in range(S):
            assert m[i, j] == (j <= i + offset), (i, j)


def test_causal_mask_default_is_upper_left():
    np.testing.assert_array_equal(reference.causal_mask(4, 6), reference.causal_mask(4, 6, "upper_left"))


@pytest.mark.parametrize("kind", ["bool", "float", "causal"])
def test_fully_masked_rows_are_zeros(kind):
    rng = np.random.default_rng(3)
    q, k, v = randn(rng, (2, 5, 3)), randn(rng, (2, 4, 3)), randn(rng, (2, 4, 2))
    causal = False
    if kind == "bool":
        mask = random_bool_mask(rng, (5, 4), 0.7)
        mask[[1, 3]] = False
        dead = [1, 3]
    elif kind == "float":
        mask = random_float_mask(rng, (5, 4), np.float64, 0.2)
        mask[[0, 4]] = -np.inf
        dead = [0, 4]
    else:
        mask, causal, dead = None, "lower_right", [0]  # L - S = 1 row sees no key
    with np.errstate(all="raise"):
        out, lse = reference.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal, return_lse=True)
        w = reference.attention_weights(q, k, attn_mask=mask, is_causal=causal)
    assert not np.isnan(out).any() and not np.isnan(lse).any() and not np.isnan(w).any()
    assert (out[:, dead] == 0).all() and (w[:, dead] == 0).all()
    assert np.isneginf(lse[:, dead]).all()
    alive = [i for i in range(5) if i not in dead]
    np.testing.assert_allclose(w[:, alive].sum(-1), 1.0, rtol=1e-14)
    n_out, _n_lse, _ = naive_attention(q, k, v, mask, causal)
    np.testing.assert_allclose(out, n_out, rtol=1e-12, atol=1e-12)


def test_huge_logits_stay_finite():
    rng = np.random.default_rng(4)
    q, k, v = randn(rng, (6, 4)), randn(rng, (9, 4)), randn(rng, (9, 3))
    out, lse = reference.scaled_dot_product_attention(q, k, v, scale=1e4, return_lse=True)
    assert np.isfinite(out).all() and np.isfinite(lse).all()
    n_out, n_lse, _ = naive_attention(q, k, v, scale=1e4)
    np.testing.assert_allclose(out, n_out, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(lse, n_lse, rtol=1e-12)


def test_no_keys_gives_zeros():
    """S == 0: no key for any query, as if fully masked: zeros and lse = -inf."""
    rng = np.random.default_rng(5)
    q, k, v = randn(rng, (2, 3, 4)), np.zeros((2, 0, 4)), np.zeros((2, 0, 5))
    out, lse = reference.scaled_dot_product_attention(q, k, v, return_lse=True)
    np.testing.assert_array_equal(out, np.zeros((2, 3, 5)))
    assert lse.shape == (2, 3) and np.isneginf(lse).all()
    np.testing.assert_array_equal(reference.attention_weights(q, k), np.zeros((2, 3, 0)))


def test_lse_has_the_output_batch_dims():
    """lse is (..., L) with the same batch dims as the output, also when only value carries some."""
    rng = np.random.default_rng(6)
    q, k, v = randn(rng, (3, 4)), randn(rng, (5, 4)), randn(rng, (2, 5, 2))
    out, lse = reference.scaled_dot_product_attention(q, k, v, return_lse=True)
    assert out.shape == (2, 3, 2)
    assert lse.shape == out.shape[:-1]
    _n_out, n_lse, _ = naive_attention(q, k, v)
    np.testing.assert_allclose(lse, n_lse, rtol=1e-12)
