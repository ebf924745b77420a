"""Differential fuzzer: random calls of the public API against an independent float64 formula.

Three families, each case drawn from ``np.random.default_rng(seed + i)`` (reproducible from its index):

- ``scaled_dot_product_attention``: 0–2 batch dims broadcast between query/key/value/mask, L 1–300,
  S 0–600 (with S = 0, short S, and split-K decode sizes L ≤ 8, S ≥ 256), E/Ev up to 160 (mostly odd;
  even for 4-bit operands), float16/32/64, int8 (per block and per row) and 4-bit (blocks of 2 … 128
  dividing the head dim, or per row) operands in every combination, bool/float masks with -inf and
  broadcast shapes (fully masked rows included), every causal alignment, window, ALiBi, softcap,
  learned sinks, GQA, custom scale, return_lse, out_dtype, and views (strided, Fortran order,
  transposed, reversed, read-only; quantised tensors strided along the tokens).
- ``KVCache`` with key and value formats drawn independently (float32, float64, float16, int8,
  "int4") and ``rotate`` drawn from None (the default: int8/int4 keys and int4 values rotated where
  their head dim is even), False, "keys", "values", "both" (the last three where the dims are even),
  with and without a window, filled in random chunks (one-token appends take the serial kernels, big
  chunks the numpy path) and attended with ``is_causal='lower_right'`` through
  ``cache.rotate_query``/``cache.unrotate_output``.
- ``MultiHeadAttention`` with and without a cache (its key and value formats and its rotation drawn
  like the cache family's), GQA, masks, against a float64 numpy layer.

The expected result is the textbook formula in float64 with the whole L×S score matrix materialised
(``attention_formula`` below; ``numba_attn.reference`` is not used), applied to the *same rounded
inputs* the kernels see: float16 values as they are, int8 tensors dequantised (data · scale of its
block, rounded to float32 as ``dequantize`` does), 4-bit tensors dequantised exactly (code · step +
min in float64 from the packed nibbles and the float16 (step, min) pairs, unpacked here, not by
numba_attn). The query is never rounded (the kernels dequantise keys in registers and dot them with
the float query, per-row int8 keys included).

Hadamard rotation (a cache's ``rotate``): the test builds its own matrix H (``hadamard_matrix``: blocks of
the largest power of two b dividing the head dim, each the Sylvester matrix from ``np.kron`` over √b;
numba_attn.rotation is not used). The library rotates in float32 (float64 for float64 inputs) with a
butterfly of log2(b) levels, so its rotation of a block x is off from H·x by at most
ρ(x) = (log2 b + 2)·eps·‖x‖₂ in 2-norm (one rounding per level, each level orthogonal up to a factor √2,
plus the 1/√b scaling; eps, not eps/2, for slack): every rotation the test can observe is checked against
H within ρ (``assert_rotation_within``). A rotating cache's content is checked against the test's rounding
of H·x (within ρ, what ρ moves a block's scale, and one quantisation step where a code sits at a tie:
``rotated_like_cache``); the formula then takes the stored content (as for every cache), the query as H·q in
float64, and for rotated values it is compared in the stored basis (H·out, H in float64; the layer family
folds H into the output projection instead: y = (merged in the stored basis)·(diag(H, …, H)·W_o)). The
rotation's float32 rounding adds small terms to a row's budget, measured where the test sees it: the
query's, δq = ``cache.rotate_query(q)`` − H·q, moves each score by scale·δq·k_j, hence the output by at most
4·max_j |scale·δq·k_j|·max|v| (a score error δ moves the weights by ≤ 2δ relative, each weight's move costs
≤ 2·max|v|); the output's, in the cache family, is |H·out − raw| for out = ``cache.unrotate_output(raw)``
(raw: the kernels' result in the stored basis). In the layer family the output is rotated back inside the
call: its rounding is bounded by ρ ≤ (log2 b + 2)·eps·√hd·max|v| per head (2-norm), moving y_e by at most
that times ‖W_o[head rows, e]‖₂ (Cauchy–Schwarz), counted twice. All are ~1e-7 … 1e-6 relative in float32.
"""

import math
import os
import traceback

import numpy as np
import pytest

from numba_attn import KVCache, MultiHeadAttention, QuantizedTensor, quantize, scaled_dot_product_attention
from numba_attn import cache as cache_module

FLOATS = (np.float16, np.float32, np.float64)
F32_EPS = float(np.finfo(np.float32).eps)
CAUSAL = (False, True, "upper_left", "lower_right")

#: the floor's constants (see the module docstring): 4 ulps of exp error on each weight, and 4 ulps of
#: the score magnitude, each moving the output by at most 2× that times max|v|
C_EXP = 8.0
C_SCORE = 8.0
#: cases per test (a failure report lists every failing case of its batch)
BATCH = 50
#: a case's cost cap: multiply-adds batch·L·S·(E + Ev), and the size of the materialised scores
MAX_WORK = 4_000_000
MAX_SCORES = 300_000


# ------------------------------------------------------------------------------------------------
# case counts, seeds, batches
# ------------------------------------------------------------------------------------------------


def _fuzz_count(config):
    n = config.getoption("fuzz", default=None)
    if n is None:
        n = int(os.environ.get("NUMBA_ATTN_FUZZ", "1000"))
    return max(0, int(n))


def _fuzz_seed(config):
    s = config.getoption("fuzz_seed", default=None)
    if s is None:
        s = int(os.environ.get("NUMBA_ATTN_FUZZ_SEED", "0"))
    return int(s)


#: cases of each family per N (the sdpa family gets N, the cache and layer families a fraction)
FAMILY_SHARE = {"sdpa": 1.0, "cache": 0.1, "layer": 0.1}


def pytest_generate_tests(metafunc):
    for family in FAMILY_SHARE:
        arg = f"{family}_batch"
        if arg in metafunc.fixturenames:
            n = math.ceil(_fuzz_count(metafunc.config) * FAMILY_SHARE[family])
            starts = list(range(0, n, BATCH))
            metafunc.parametrize(
                arg, [(s, min(n, s + BATCH)) for s in starts], ids=[f"cases{s}-{min(n, s + BATCH) - 1}" for s in starts]
            )


@pytest.fixture
def fuzz_seed(request):
    return _fuzz_seed(request.config)


def run_batch(family, runner, seed, first, stop):
    """Run cases [first, stop) of a family; one report of every failing case, with what reproduces it."""
    failures = []
    for i in range(first, stop):
        params = {}
        try:
            runner(seed + i, params)
        except Exception as exc:
            where = "".join(traceback.format_exception_only(type(exc), exc)).strip()
            failures.append(
                f"case {i} (rng seed {seed + i}; reproduce: tests/test_fuzz.py::{runner.__name__}"
                f"({seed + i}, {{}})):\n  params: {params}\n  {where[:1500]}"
            )
    if failures:
        pytest.fail(
            f"{len(failures)} of {stop - first} {family} fuzz cases failed:\n\n" + "\n\n".join(failures), pytrace=False
        )


# ------------------------------------------------------------------------------------------------
# the independent float64 formula (and the same in the arithmetic dtype, for the tolerance)
# ------------------------------------------------------------------------------------------------


def visible_keys(L, S, causal, window, mask):
    """Boolean (..., L, S): the keys each query row sees (mask broadcast, causal band, window)."""
    i = np.arange(L)[:, None]
    j = np.arange(S)[None, :]
    pos = i if causal in (True, "upper_left") else i + S - L
    vis = np.ones((L, S), bool)
    if causal:
        vis &= j <= pos
        if window is not None:
            vis &= j > pos - window
    if mask is not None:
        vis = vis & (mask if mask.dtype == np.bool_ else ~np.isneginf(mask))
    return vis


def attention_formula(
    q, k, v, scale, mask=None, causal=False, window=None, slopes=None, softcap=None, dtype=np.float64, sinks=None
):
    """softmax(q·kᵀ·scale [softcap] [ALiBi] + mask)·v with the L×S scores materialised, in ``dtype``.

    q (..., L, E), k (..., S, E), v (..., S, Ev), mask (..., L, S) bool (True = attend) or float, all
    already broadcast to the same batch dims; slopes and sinks (...,) per batch entry. Returns (out,
    lse, visible). Rows without a visible key: out 0, lse -inf (the sink's logit with sinks). A sink
    is one more term exp(sink) in each row's denominator (and lse) with no value row.
    """
    dt = np.dtype(dtype).type
    q, k, v = q.astype(dt), k.astype(dt), v.astype(dt)
    L, S = q.shape[-2], k.shape[-2]
    s = np.matmul(q, np.swapaxes(k, -1, -2)) * dt(scale)
    if softcap is not None:
        s = dt(softcap) * np.tanh(s / dt(softcap))
    pos = np.arange(L)[:, None] if causal in (True, "upper_left") else np.arange(L)[:, None] + S - L
    if slopes is not None:
        s = s - slopes.astype(dt)[..., None, None] * np.abs(pos - np.arange(S)[None, :]).astype(dt)
    if mask is not None and mask.dtype != np.bool_:
        s = s + mask.astype(dt)
    vis = np.broadcast_to(visible_keys(L, S, causal, window, mask), s.shape)
    s = np.where(vis, s, dt(-np.inf))
    any_vis = vis.any(axis=-1, keepdims=True)
    m = np.where(any_vis, np.max(s, axis=-1, keepdims=True, initial=-np.inf), dt(0))
    if sinks is not None:
        sink = np.broadcast_to(sinks.astype(dt)[..., None, None], m.shape)
        m = np.where(any_vis, np.maximum(m, sink), sink)
    e = np.where(vis, np.exp(s - m), dt(0))
    total = e.sum(axis=-1, keepdims=True)
    if sinks is not None:
        total = total + np.exp(sink - m)
        any_vis = np.ones_like(any_vis)  # every row has the sink in its denominator
    p = e / np.where(any_vis, total, dt(1))
    out = np.matmul(p, v)
    lse = np.where(any_vis[..., 0], m[..., 0] + np.log(np.where(any_vis[..., 0], total[..., 0], dt(1))), -np.inf)
    return out, lse, vis


def score_magnitude(q, k, scale, mask, slopes, causal, vis):
    """Per row (..., L): the largest |score term| over visible keys: |scale·q|·|k| + |ALiBi| + |mask|."""
    L, S = q.shape[-2], k.shape[-2]
    m = np.matmul(np.abs(q), np.swapaxes(np.abs(k), -1, -2)) * scale
    if slopes is not None:
        pos = np.arange(L)[:, None] if causal in (True, "upper_left") else np.arange(L)[:, None] + S - L
        m = m + np.abs(slopes)[..., None, None] * np.abs(pos - np.arange(S)[None, :])
    if mask is not None and mask.dtype != np.bool_:
        m = m + np.where(np.isfinite(mask), np.abs(mask), 0.0)
    return np.where(vis, m, 0.0).max(axis=-1, initial=0.0)


def value_magnitude(v, vis):
    """Per row (..., L): max |v| over the row's visible keys (all value columns)."""
    vrow = np.abs(v).max(axis=-1, initial=0.0) if v.shape[-1] else np.zeros(v.shape[:-1])  # (..., S)
    return np.where(vis, vrow[..., None, :], 0.0).max(axis=-1, initial=0.0)


def check_against_formula(
    out,
    lse,
    q,
    k,
    v,
    scale,
    mask=None,
    causal=False,
    window=None,
    slopes=None,
    softcap=None,
    arith=np.float32,
    extra_row_budget=None,
    label="out",
    sinks=None,
):
    """Assert ``out`` (and ``lse`` if given) match the float64 formula on the effective inputs within
    the budget of the module docstring; fully masked rows exactly 0 and lse -inf (without sinks; with
    them, the sink logit within the budget); no NaN."""
    assert not np.isnan(out).any(), f"{label} holds NaN"
    exact, exact_lse, vis = attention_formula(q, k, v, scale, mask, causal, window, slopes, softcap, sinks=sinks)
    naive, naive_lse, _ = attention_formula(
        q, k, v, scale, mask, causal, window, slopes, softcap, dtype=arith, sinks=sinks
    )
    assert out.shape == exact.shape, (out.shape, exact.shape)
    eps = float(np.finfo(arith).eps)
    dead = ~vis.any(axis=-1)  # fully masked rows
    if dead.any():
        assert (out[dead] == 0).all(), f"fully masked rows of {label} are not exactly 0: {out[dead].max()}"
    M = score_magnitude(q, k, scale, mask, slopes, causal, vis)
    if softcap is not None:
        # softcap·tanh(s/softcap) evaluated through exp (1 - 2/(e^{2x} + 1)) is accurate to ulps of softcap
        M = M + softcap
    if sinks is not None:  # the sink's logit joins the row's max: its ulps count like a score's
        M = M + np.abs(np.broadcast_to(sinks, M.shape[:-1])[..., None])
    V = value_magnitude(v, vis)
    naive_err = np.abs(naive.astype(np.float64) - exact).max(axis=-1, initial=0.0)
    budget = 2 * naive_err + eps * V * (C_EXP + C_SCORE * M)
    if extra_row_budget is not None:
        budget = budget + extra_row_budget
    tol = budget[..., None]
    if np.finfo(out.dtype).eps > eps:  # a result rounded to a narrower dtype than the arithmetic's
        tiny = float(np.finfo(out.dtype).smallest_subnormal)
        tol = tol + float(np.finfo(out.dtype).eps) / 2 * np.abs(exact) + tiny / 2
    err = np.abs(out.astype(np.float64) - exact)
    tol = np.broadcast_to(tol, err.shape)
    bad = err > tol
    if bad.any():
        idx = tuple(int(x) for x in np.argwhere(bad)[0])
        worst = np.unravel_index(np.argmax(err - tol), err.shape)
        raise AssertionError(
            f"{label}: {int(bad.sum())} of {err.size} elements outside the budget; first at {idx}: "
            f"got {out[idx]!r}, expected {exact[idx]!r}, |err| {err[idx]:.3g} > tol {tol[idx]:.3g}; worst at "
            f"{tuple(int(x) for x in worst)}: |err| {err[worst]:.3g}, tol {tol[worst]:.3g}, naive row error "
            f"{naive_err[worst[:-1]]:.3g}, M {M[worst[:-1]]:.3g}, max|v| {V[worst[:-1]]:.3g}"
        )
    if lse is not None:
        assert lse.shape == exact_lse.shape, (lse.shape, exact_lse.shape)
        assert not np.isnan(lse).any(), "lse holds NaN"
        if dead.any() and sinks is None:
            assert np.isneginf(lse[dead]).all(), "lse of fully masked rows is not -inf"
        live = ~dead if sinks is None else np.ones_like(dead)
        assert np.isfinite(lse[live]).all(), "lse of a row with visible keys is not finite"
        lse_err = np.abs(lse[live].astype(np.float64) - exact_lse[live])
        naive_lse_err = np.abs(naive_lse[live].astype(np.float64) - exact_lse[live])
        lse_tol = 2 * naive_lse_err + eps * (C_EXP + C_SCORE * (M[live] + np.abs(exact_lse[live])))
        if extra_row_budget is not None:
            lse_tol = lse_tol + np.broadcast_to(extra_row_budget, dead.shape)[live] / np.maximum(V[live], 1e-300)
        if (lse_err > lse_tol).any():
            w = int(np.argmax(lse_err - lse_tol))
            raise AssertionError(
                f"lse outside the budget: |err| {lse_err[w]:.3g} > tol {lse_tol[w]:.3g} "
                f"({int((lse_err > lse_tol).sum())} rows)"
            )


# ------------------------------------------------------------------------------------------------
# rounded inputs: what the kernels actually see
# ------------------------------------------------------------------------------------------------


def dequantised(qt):
    """float64 copy of a QuantizedTensor's values, written here, not taken from numba_attn. int8:
    data · scale of its block, rounded to float32 (what ``dequantize`` returns). 4-bit: code · step +
    min exactly (``unpack4``)."""
    if qt.bits == 4:
        codes, step, low = unpack4(qt)
        return codes * step + low
    D = qt.data.shape[-1]
    per_entry = np.repeat(np.asarray(qt.scales), qt.block, axis=-1)[..., :D]
    return (np.asarray(qt.data).astype(np.float32) * per_entry).astype(np.float32).astype(np.float64)


def unpack4(qt):
    """(codes, step, min) of a 4-bit QuantizedTensor, each float64 (..., D), entry by entry: block b's
    codes are bytes b·block/2 … (b+1)·block/2 − 1 of a row, entry w < block/2 the low nibble of byte
    w, entry w + block/2 its high nibble; (step, min) the block's float16 pair."""
    data, scales, block = np.asarray(qt.data), np.asarray(qt.scales), qt.block
    D, half = 2 * data.shape[-1], block // 2
    blocks = data.reshape(data.shape[:-1] + (D // block, half))
    codes = np.concatenate([blocks & 15, blocks >> 4], axis=-1).reshape(data.shape[:-1] + (D,))
    step = np.repeat(scales[..., 0].astype(np.float64), block, axis=-1)
    low = np.repeat(scales[..., 1].astype(np.float64), block, axis=-1)
    return codes.astype(np.float64), step, low


def dequantised_size(x):
    """Per entry, |code·step| + |min| of a 4-bit QuantizedTensor (the size its dequantisation rounds
    at: module docstring), else None."""
    if not (isinstance(x, QuantizedTensor) and x.bits == 4):
        return None
    codes, step, low = unpack4(x)
    return codes * np.abs(step) + np.abs(low)


def effective(x):
    """float64 values of an operand as the kernels read them."""
    if isinstance(x, QuantizedTensor):
        return dequantised(x)
    return np.asarray(x).astype(np.float64)


def int4_budget(q, k_size, v_size, v, scale, arith):
    """Per row (..., L): the 4-bit terms of the module docstring. ``q`` (..., L, E) and ``v`` (..., S, Ev)
    effective (float64, broadcast); ``k_size``/``v_size`` the keys'/values' ``dequantised_size``
    broadcast the same way, or None for other formats. None when neither is 4-bit."""
    if k_size is None and v_size is None:
        return None
    eps = float(np.finfo(arith).eps)
    budget = np.zeros(q.shape[:-1])
    if k_size is not None and k_size.shape[-2]:
        M4 = scale * np.matmul(np.abs(q), np.swapaxes(k_size, -1, -2)).max(axis=-1)
        budget = budget + eps * C_SCORE * M4 * np.abs(v).max(initial=0.0)
    if v_size is not None:
        budget = budget + eps * C_EXP * v_size.max(initial=0.0)
    return budget


# ------------------------------------------------------------------------------------------------
# Hadamard rotation, independently of numba_attn.rotation
# ------------------------------------------------------------------------------------------------


def rotation_block(D):
    """The block of a head dim's rotation: the largest power of two dividing D (KVCache's documented rule)."""
    return D & -D


def hadamard_matrix(D):
    """diag(S_b, …, S_b)/√b, D × D float64, S_b the Sylvester–Hadamard matrix (S_1 = [1],
    S_2b = [[S_b, S_b], [S_b, −S_b]], built with np.kron), b = ``rotation_block(D)``. Symmetric and
    orthogonal: the row form of H·x is ``x @ H``."""
    b = rotation_block(D)
    S = np.ones((1, 1))
    while S.shape[0] < b:
        S = np.kron(np.array([[1.0, 1.0], [1.0, -1.0]]), S)
    return np.kron(np.eye(D // b), S / np.sqrt(b))


def rotated(x, H):
    """H·x along the last axis, in float64 from x's exact values."""
    return np.asarray(x).astype(np.float64) @ H


def block_norms(x, b):
    """‖x_blk‖₂ per block of b entries of the last axis: (..., D/b)."""
    x = np.asarray(x, np.float64)
    return np.sqrt((x.reshape(x.shape[:-1] + (x.shape[-1] // b, b)) ** 2).sum(axis=-1))


def rotation_rounding(x, eps):
    """ρ per block (module docstring): the bound on the 2-norm of the library's rounding error when it
    rotates x in the precision of ``eps`` (..., D/b)."""
    b = rotation_block(x.shape[-1])
    return (math.log2(b) + 2) * eps * block_norms(x, b)


def rotation_eps(dtype):
    """The precision a cache rotates an array of ``dtype`` in: float64 for float64, else float32."""
    return float(np.finfo(np.float64 if np.dtype(dtype) == np.float64 else np.float32).eps)


def assert_rotation_within(actual, exact, eps, what):
    """The library's rotation ``actual`` of some x against the test's ``exact`` = H·x (float64): per block,
    ‖actual − exact‖₂ ≤ ρ(x) = (log2 b + 2)·eps·‖x‖₂ (‖x_blk‖₂ = ‖(H·x)_blk‖₂: H is orthogonal per block)."""
    b = rotation_block(exact.shape[-1])
    err = block_norms(np.asarray(actual, np.float64) - exact, b)
    bound = (math.log2(b) + 2) * eps * block_norms(exact, b) * (1 + 1e-9) + 1e-300
    assert (err <= bound).all(), f"{what}: the rotation is off by {err.max():.3g} > ρ {bound[err > bound].min():.3g}"


def query_rotation_budget(dq, k, v, scale, vis):
    """Per row (..., L): what the query rotation's rounding ``dq`` (the library's H·q minus the test's)
    may move the output: 4·max_j visible |scale·dq·k_j|·max|v| (module docstring). k, v float64 in the
    stored basis, broadcast like dq (..., L, D)."""
    if not k.shape[-2]:
        return np.zeros(dq.shape[:-1])
    ds = np.abs(scale * np.matmul(dq, np.swapaxes(k, -1, -2)))  # (..., L, S)
    ds = np.where(vis, ds, 0.0).max(axis=-1, initial=0.0)
    return 4 * ds * value_magnitude(v, vis)


def expected_rotation(rotate, key_fmt, value_fmt, D, Dv):
    """(keys rotated, values rotated) the cache documents for ``rotate``."""
    if rotate is None:
        return (key_fmt == "int4" or key_fmt == np.int8) and D % 2 == 0, value_fmt == "int4" and Dv % 2 == 0
    if rotate is False:
        return False, False
    return rotate in ("keys", "both"), rotate in ("values", "both")


def draw_rotate(rng, D, Dv):
    """None (the default), False, or what the dims allow: "keys" (even D), "values" (even Dv), "both"."""
    options = [None, False]
    options += ["keys"] if D % 2 == 0 else []
    options += ["values"] if Dv % 2 == 0 else []
    options += ["both"] if D % 2 == 0 and Dv % 2 == 0 else []
    return _choice(rng, options)


def rotated_like_cache(x, fmt, block, eps):
    """(expected, step, near, tie) per entry for a rotating cache's content of the tokens x (B, H, T, D):
    the test's rounding of H·x (``rounded_like_cache``), its quantisation step, how far the stored value
    may be from it without a code tipping, and how far each code position is from a rounding tie
    (|position − nearest half-integer|, in steps; inf for float formats). ``near``: the rotation's rounding
    (ρ of the row's blocks, precision ``eps``: the stored value rounds from a rotated value off by that
    much), plus what that moves the block's scale (int8: its maximum; int4: its min and step, whose
    float16 rounding may tip by one float16 ulp) or the float rounding (one ulp of the store)."""
    D = x.shape[-1]
    expected, step, pos = rounded_like_cache(rotated(x, hadamard_matrix(D)), fmt, block, positions=True)
    R = rotation_rounding(x, eps).max(axis=-1, keepdims=True, initial=0.0)
    if fmt == "int4":
        row_max = np.abs(expected).max(axis=-1, keepdims=True, initial=0.0)
        near = 3 * R + 15 * (2.0**-10 * step + 2.0**-24) + 2.0**-10 * row_max + 2.0**-24
    elif fmt == np.int8:
        near = 2 * R + 4 * F32_EPS * 127 * step
    else:
        f = np.finfo(fmt)
        near = R + float(f.eps) * (np.abs(expected) + R) + float(f.smallest_subnormal)
    tie = np.full(x.shape, np.inf) if pos is None else np.abs(pos - np.floor(pos) - 0.5)
    return expected, step, np.broadcast_to(near, x.shape), tie


def assert_rotated_within(actual, expected, step, near, tie, fmt):
    """A rotating cache's content: within ``near`` of the test's rounding, or one quantisation step
    further where a code tipped, which it may only do at a tie: where the code's position before
    rounding was within near/step (+ float32 rounding) of a half-integer."""
    err = np.abs(actual - expected)
    with np.errstate(divide="ignore", invalid="ignore"):
        at_tie = tie <= np.where(step > 0, near / step, 0.0) + 1e-5
    bad = err > near + np.where(at_tie, step * (1 + 1e-6), 0.0)
    if bad.any():
        i = tuple(int(j) for j in np.argwhere(bad)[0])
        raise AssertionError(
            f"rotated {_format_name(fmt)} content off at {i}: got {actual[i]!r}, expected {expected[i]!r}, "
            f"|err| {err[i]:.3g} > {near[i]:.3g} (the rotation's rounding) + a step {step[i]:.3g} only at a tie "
            f"(the code's position is {tie[i]:.3g} steps from one) ({int(bad.sum())} entries)"
        )


# ------------------------------------------------------------------------------------------------
# views and invariants
# ------------------------------------------------------------------------------------------------

VIEWS = ("plain", "plain", "plain", "strided_rows", "strided_cols", "fortran", "transposed", "reversed", "readonly")


def as_view(x, kind):
    """An array holding x's values in another memory layout."""
    if kind == "plain" or x.ndim < 2:
        return x
    if kind == "strided_rows":
        buf = np.zeros(x.shape[:-2] + (2 * x.shape[-2] + 1, x.shape[-1]), x.dtype)
        buf[..., 1::2, :] = x
        return buf[..., 1::2, :]
    if kind == "strided_cols":
        buf = np.zeros(x.shape[:-1] + (3 * x.shape[-1],), x.dtype)
        buf[..., ::3] = x
        return buf[..., ::3]
    if kind == "fortran":
        return np.asfortranarray(x)
    if kind == "transposed":
        return np.ascontiguousarray(np.swapaxes(x, -1, -2)).swapaxes(-1, -2)
    if kind == "reversed":
        return np.ascontiguousarray(x[..., ::-1, :])[..., ::-1, :]
    if kind == "readonly":
        y = x.copy()
        y.flags.writeable = False
        return y
    raise ValueError(kind)


class Snapshot:
    """Copies of every array a call receives (and of the buffers under views), compared afterwards."""

    def __init__(self, *objs):
        self.items = []
        for obj in objs:
            arrays = [obj.data, obj.scales] if isinstance(obj, QuantizedTensor) else [obj]
            for a in arrays:
                if isinstance(a, np.ndarray):
                    self.items.append((a, a.copy()))
                    if isinstance(a.base, np.ndarray):
                        self.items.append((a.base, a.base.copy()))

    def assert_unchanged(self):
        for a, original in self.items:
            assert a.dtype == original.dtype and a.shape == original.shape, "an input changed shape or dtype"
            np.testing.assert_array_equal(a, original, err_msg="the call modified an input")


def float_dtypes_of(*xs):
    return [x.dtype for x in xs if not isinstance(x, QuantizedTensor)]


# ------------------------------------------------------------------------------------------------
# family 1: scaled_dot_product_attention
# ------------------------------------------------------------------------------------------------


def _choice(rng, options, p=None):
    return options[int(rng.choice(len(options), p=p))]


def _operand_batch(rng, batch, keep_last, heads=None):
    dims = [d if d == 1 or rng.random() < 0.7 else 1 for d in batch]
    if heads is not None:
        dims[-1] = heads
    elif keep_last and dims:
        dims[-1] = batch[-1]
    droppable = len(dims) - (1 if keep_last and dims else 0)
    drop = int(rng.integers(0, droppable + 1))
    return tuple(dims[drop:])


def _features(rng):
    if rng.random() < 0.2:
        return int(_choice(rng, [1, 2, 3, 15, 16, 17, 31, 32, 33, 63, 64, 65, 127, 128, 129, 159, 160]))
    return int(rng.integers(0, 80)) * 2 + 1  # odd, 1..159


def _lengths(rng):
    shape = rng.random()
    if shape < 0.25:  # split-K decode sizes
        return int(rng.integers(1, 9)), int(rng.integers(256, 601)), "decode"
    if shape < 0.35:  # no keys, or very few
        return int(rng.integers(1, 40)), int(_choice(rng, [0, 0, 1, 2, 3])), "short"
    L = int(rng.integers(1, 301)) if rng.random() < 0.5 else int(rng.integers(1, 33))
    S = int(rng.integers(0, 601)) if rng.random() < 0.5 else int(rng.integers(1, 65))
    return L, S, "any"


def _operand(rng, shape, kind, block, magnitude, outlier):
    """A random operand: float array in ``kind``'s dtype (in a random layout), or an int8 / 4-bit
    ("int4") QuantizedTensor (from a random float dtype, or built by hand as a view of every other token
    of a bigger one)."""
    x = rng.standard_normal(shape) * magnitude
    if outlier and shape[-1] > 1:
        x[..., int(rng.integers(0, shape[-1]))] *= 20.0
    if kind in ("int8", "int4"):
        bits = 8 if kind == "int8" else 4
        view = _choice(rng, ("plain", "plain", "strided"))
        if view == "strided" and len(shape) >= 2:
            big = np.zeros(shape[:-2] + (2 * shape[-2], shape[-1]))
            big[..., ::2, :] = x
            qt = quantize(big.astype(np.float32), block, bits=bits)
            every_other = (slice(None, None, 2),) + (slice(None),) * (qt.scales.ndim - qt.data.ndim + 1)
            return QuantizedTensor(
                qt.data[..., ::2, :], qt.scales[(Ellipsis, *every_other)], qt.block, bits=bits
            ), "strided"
        return quantize(x.astype(_choice(rng, FLOATS)), block, bits=bits), "plain"
    view = _choice(rng, VIEWS)
    return as_view(x.astype(kind), view), view


def _int4_block(rng, D):
    """A block for 4-bit rows of D (even) entries: an even power of two dividing D (32 the likeliest;
    32 also over fewer entries: capped to one block per row), or None (one block per row)."""
    options = [b for b in (2, 4, 8, 16, 32, 64, 128) if D % b == 0] + ([32] if D < 32 else []) + [None]
    weights = np.array([4.0 if b == 32 else 1.0 for b in options])
    return _choice(rng, options, p=weights / weights.sum())


def _block_for(rng, kind, D):
    if kind == "int8":
        return _choice(rng, (32, 32, None, 16, 64))
    if kind == "int4":
        return _int4_block(rng, D)
    return None


def draw_sdpa_case(rng, params):
    nb = int(rng.integers(0, 3))
    batch = [int(rng.integers(1, 4)) for _ in range(nb)]
    gqa = nb >= 1 and rng.random() < 0.3
    hkv = None
    if gqa:
        hkv = int(rng.integers(1, 4))
        batch[-1] = hkv * int(rng.integers(1, 4))
    bq = _operand_batch(rng, batch, keep_last=gqa)
    bk = _operand_batch(rng, batch, keep_last=gqa, heads=hkv)
    bv = _operand_batch(rng, batch, keep_last=gqa, heads=hkv)
    if gqa:
        bv = bv[:-1] + (hkv,)
        out_batch = np.broadcast_shapes(bq, bk[:-1] + (bq[-1],), bv[:-1] + (bq[-1],))
    else:
        out_batch = np.broadcast_shapes(bq, bk, bv)
    n = math.prod(out_batch)
    L, S, size_kind = _lengths(rng)
    E, Ev = _features(rng), _features(rng)
    while n * L * S * (E + Ev) > MAX_WORK or n * L * S > MAX_SCORES:
        if size_kind == "decode":
            E, Ev = max(1, E // 2), max(1, Ev // 2)
            if E == 1 and Ev == 1:
                S = max(256, S // 2)
                if S == 256:
                    L = max(1, L // 2)
        elif L >= S:
            L = max(1, L // 2)
        else:
            S = max(1, S // 2)

    kinds = [np.float16, np.float32, np.float64, "int8", "int4"]
    q_kind = _choice(rng, FLOATS)
    k_kind = _choice(rng, kinds, p=[0.15, 0.3, 0.15, 0.2, 0.2])
    v_kind = _choice(rng, kinds, p=[0.15, 0.3, 0.15, 0.2, 0.2])
    # 4-bit rows pack two entries per byte: even head dims; often multiples of 32, where the blocks of 32
    # (and 64, 128, per row) take the vector-IR tiles (half blocks a multiple of the vector width)
    if k_kind == "int4":
        E = 32 * max(1, round(E / 32)) if rng.random() < 0.4 else E + E % 2
    if v_kind == "int4":
        Ev = 32 * max(1, round(Ev / 32)) if rng.random() < 0.4 else Ev + Ev % 2
    k_block = _block_for(rng, k_kind, E)
    v_block = _block_for(rng, v_kind, Ev)
    magnitude = _choice(rng, (1.0, 1.0, 1.0, 0.1, 4.0))
    outlier = rng.random() < 0.1
    query, q_view = _operand(rng, bq + (L, E), q_kind, None, magnitude, outlier)
    key, k_view = _operand(rng, bk + (S, E), k_kind, k_block, magnitude, outlier)
    value, v_view = _operand(rng, bv + (S, Ev), v_kind, v_block, 1.0, False)

    mask_type = _choice(rng, (None, None, "bool", "float"))
    mask = None
    mask_shape = None
    if mask_type is not None:
        full = tuple(out_batch) + (L, S)
        shape = [d if rng.random() < 0.75 else 1 for d in full]
        drop = int(rng.integers(0, len(shape) - 1)) if len(shape) > 2 else 0
        mask_shape = tuple(shape[drop:])
        density = _choice(rng, (0.0, 0.1, 0.5, 0.9, 1.0), p=[0.05, 0.15, 0.4, 0.3, 0.1])
        if mask_type == "bool":
            mask = rng.random(mask_shape) < density
            fill = False
        else:
            mask_dtype = _choice(rng, (np.float16, np.float32, np.float32, np.float64))
            mask = (_choice(rng, (0.0, 1.0, 3.0)) * rng.standard_normal(mask_shape)).astype(mask_dtype)
            mask[rng.random(mask_shape) >= density] = -np.inf
            fill = -np.inf
        if rng.random() < 0.3 and mask.shape[-2] > 0:  # some fully masked rows
            rows = rng.choice(mask.shape[-2], size=min(2, mask.shape[-2]), replace=False)
            mask[..., rows, :] = fill
        mask = as_view(mask, _choice(rng, VIEWS))
    is_causal = _choice(rng, CAUSAL)
    window = int(rng.integers(1, S + 3)) if is_causal and rng.random() < 0.35 else None
    slopes = None
    if len(out_batch) >= 1 and rng.random() < 0.2:
        slopes = rng.uniform(0, 0.5, out_batch[-1]) * (rng.random(out_batch[-1]) < 0.9)
        slopes = slopes.astype(_choice(rng, (np.float32, np.float64)))
    softcap = float(rng.uniform(1, 30)) if rng.random() < 0.2 else None
    scale = None if rng.random() < 0.6 else float(rng.uniform(0.05, 3) / math.sqrt(E))
    return_lse = bool(rng.random() < 0.5)
    enable_gqa = gqa or (
        len(bq) >= 1
        and len(bk) >= 1
        and len(bv) >= 1
        and bk[-1] == bv[-1]
        and bq[-1] % bk[-1] == 0
        and rng.random() < 0.1
    )
    out_dtype = _choice(rng, FLOATS) if rng.random() < 0.1 else None
    sinks = None
    if len(out_batch) >= 1 and rng.random() < 0.2:
        sinks = rng.uniform(-6, 6, out_batch[-1]).astype(_choice(rng, (np.float32, np.float64)))

    params.update(
        batch=tuple(batch),
        q=(q_kind if isinstance(q_kind, str) else np.dtype(q_kind).name, bq, q_view),
        k=(k_kind if isinstance(k_kind, str) else np.dtype(k_kind).name, bk, k_view, k_block),
        v=(v_kind if isinstance(v_kind, str) else np.dtype(v_kind).name, bv, v_view, v_block),
        L=L,
        S=S,
        E=E,
        Ev=Ev,
        magnitude=magnitude,
        outlier=outlier,
        mask=None if mask is None else (mask.dtype.name, mask_shape),
        is_causal=is_causal,
        window=window,
        alibi=slopes is not None,
        softcap=softcap,
        scale=scale,
        return_lse=return_lse,
        enable_gqa=enable_gqa,
        out_dtype=out_dtype and np.dtype(out_dtype).name,
        sinks=sinks is not None,
    )
    kwargs = dict(
        attn_mask=mask,
        is_causal=is_causal,
        scale=scale,
        enable_gqa=enable_gqa,
        window=window,
        alibi_slopes=slopes,
        softcap=softcap,
        return_lse=return_lse,
        out_dtype=out_dtype,
        sinks=sinks,
    )
    return query, key, value, kwargs, out_batch, gqa


def _full(x, out_batch, gqa, group):
    """Effective float64 operand broadcast to the output batch (key/value heads repeated for GQA)."""
    if gqa and group > 1:
        x = np.repeat(x, group, axis=-3)
    return np.broadcast_to(x, tuple(out_batch) + x.shape[-2:])


def run_sdpa_case(seed, params):
    rng = np.random.default_rng(seed)
    query, key, value, kwargs, out_batch, gqa = draw_sdpa_case(rng, params)
    snap = Snapshot(query, key, value, kwargs["attn_mask"], kwargs["alibi_slopes"], kwargs["sinks"])
    result = scaled_dot_product_attention(query, key, value, **kwargs)
    snap.assert_unchanged()
    out, lse = result if kwargs["return_lse"] else (result, None)

    floats = float_dtypes_of(query, key, value)
    arith = np.float64 if np.dtype(np.float64) in floats else np.float32
    expected_dtype = np.dtype(kwargs["out_dtype"]) if kwargs["out_dtype"] else np.result_type(*floats)
    L, E, S, Ev = query.shape[-2], query.shape[-1], key.shape[-2], value.shape[-1]
    assert out.dtype == expected_dtype, f"result dtype {out.dtype}, documented {expected_dtype}"
    assert out.shape == tuple(out_batch) + (L, Ev), f"result shape {out.shape}"
    if lse is not None:
        assert lse.dtype == arith, f"lse dtype {lse.dtype}, expected the arithmetic's {np.dtype(arith)}"
        assert lse.shape == tuple(out_batch) + (L,), f"lse shape {lse.shape}"

    group = out_batch[-1] // key.shape[-3] if gqa else 1
    scale = kwargs["scale"] if kwargs["scale"] is not None else 1.0 / math.sqrt(E)
    q = np.broadcast_to(effective(query), tuple(out_batch) + (L, E))
    k = _full(effective(key), out_batch, gqa, group)
    v = _full(effective(value), out_batch, gqa, group)
    k_size, v_size = dequantised_size(key), dequantised_size(value)
    extra = int4_budget(
        q,
        None if k_size is None else _full(k_size, out_batch, gqa, group),
        None if v_size is None else _full(v_size, out_batch, gqa, group),
        v,
        scale,
        arith,
    )
    extra = _add(extra, int8_exact_budget(q, k, v, scale, arith, (key, value)))
    mask = kwargs["attn_mask"]
    if mask is not None:
        mask = np.broadcast_to(mask if mask.dtype == np.bool_ else mask.astype(arith), tuple(out_batch) + (L, S))
    slopes = kwargs["alibi_slopes"]
    if slopes is not None:
        slopes = np.broadcast_to(slopes.astype(np.float64), tuple(out_batch))
    sinks = kwargs["sinks"]
    if sinks is not None:  # in the arithmetic's dtype, as the kernels take them
        sinks = np.broadcast_to(sinks.astype(arith).astype(np.float64), tuple(out_batch))
    check_against_formula(
        out,
        lse,
        q,
        k,
        v,
        scale,
        mask,
        kwargs["is_causal"],
        kwargs["window"],
        slopes,
        kwargs["softcap"],
        arith,
        extra,
        sinks=sinks,
    )


def test_fuzz_sdpa(sdpa_batch, fuzz_seed):
    run_batch("scaled_dot_product_attention", run_sdpa_case, fuzz_seed, *sdpa_batch)


# ------------------------------------------------------------------------------------------------
# family 2: KVCache in every format
# ------------------------------------------------------------------------------------------------


def rounded_like_cache(x, fmt, block, positions=False):
    """float64 values of x (B, H, T, D) as a cache of format ``fmt`` stores them, and per entry the
    quantisation step (0 for float formats). int8 and "int4" are quantised here, in numpy, the
    documented way. int8: s = max|x|/127 per block, q = clamp(rint(x/s), ±127), value q·s. int4: per
    block step = half((max − min)/15) and min' = half(min) (float16), code = clamp(rint((x − min')/step),
    0, 15) in float32, value code·step + min' (exact). ``positions``: also each entry's code before
    rounding ((x − min')/step, x/s; float64; None for float formats)."""
    x = np.asarray(x)
    if fmt == "int4":
        D = x.shape[-1]
        b = D if block is None else min(block, D)
        blocks = x.astype(np.float32).reshape(x.shape[:-1] + (D // b, b))
        lo, hi = blocks.min(axis=-1, keepdims=True), blocks.max(axis=-1, keepdims=True)
        step = ((hi - lo) / np.float32(15)).astype(np.float16).astype(np.float32)
        low = lo.astype(np.float16).astype(np.float32)
        with np.errstate(divide="ignore", invalid="ignore"):
            inv = np.where(step > 0, np.float32(1) / step, np.float32(0)).astype(np.float32)
        pos = (blocks - low) * inv
        codes = np.clip(np.rint(pos), 0, 15).astype(np.float64)
        vals = codes * step.astype(np.float64) + low.astype(np.float64)
        per_entry = np.broadcast_to(step, blocks.shape).reshape(x.shape).astype(np.float64)
        if positions:
            return vals.reshape(x.shape), per_entry, pos.reshape(x.shape).astype(np.float64)
        return vals.reshape(x.shape), per_entry
    if fmt == np.int8:
        D = x.shape[-1]
        b = D if block is None else min(block, D)
        nb = -(-D // b)
        pad = np.zeros(x.shape[:-1] + (nb * b,), np.float32)
        pad[..., :D] = x.astype(np.float32)
        blocks = pad.reshape(x.shape[:-1] + (nb, b))
        s = (np.abs(blocks).max(axis=-1, keepdims=True) / np.float32(127)).astype(np.float32)
        with np.errstate(divide="ignore", invalid="ignore"):
            inv = np.where(s > 0, np.float32(1) / s, np.float32(0)).astype(np.float32)
        pos = blocks * inv
        q8 = np.clip(np.rint(pos), -127, 127)
        vals = (q8 * s).astype(np.float32).reshape(x.shape[:-1] + (nb * b,))[..., :D]
        step = np.broadcast_to(s, blocks.shape).reshape(x.shape[:-1] + (nb * b,))[..., :D]
        if positions:
            pos = pos.reshape(x.shape[:-1] + (nb * b,))[..., :D].astype(np.float64)
            return vals.astype(np.float64), step.astype(np.float64), pos
        return vals.astype(np.float64), step.astype(np.float64)
    if positions:
        return x.astype(fmt).astype(np.float64), np.zeros(x.shape), None
    return x.astype(fmt).astype(np.float64), np.zeros(x.shape)


def int4_size_like_cache(x, block):
    """|code·step| + |min| per entry of x (B, H, T, D) quantised to 4 bits as ``rounded_like_cache`` does."""
    vals, _ = rounded_like_cache(x, "int4", block)
    D = x.shape[-1]
    b = D if block is None else min(block, D)
    low = np.asarray(x).astype(np.float32).reshape(x.shape[:-1] + (D // b, b)).min(axis=-1, keepdims=True)
    low = np.broadcast_to(low.astype(np.float16).astype(np.float64), x.shape[:-1] + (D // b, b)).reshape(x.shape)
    return (vals - low) + np.abs(low)


def cache_content(cache):
    """(keys, values) of a cache in position order, as float64."""
    keys, values = cache.ordered()
    return effective(keys), effective(values)


#: cache storage formats (key and value drawn independently)
FORMATS = (np.dtype(np.float32), np.dtype(np.float16), np.dtype(np.int8), "int4", np.dtype(np.float64))
FORMAT_P = (0.2, 0.2, 0.2, 0.25, 0.15)


def _format_name(fmt):
    return fmt if isinstance(fmt, str) else fmt.name


def _is_quantised(fmt):
    return fmt == "int4" or fmt == np.int8


def _int4_dim(rng, block):
    """A head dim a 4-bit store with ``block`` accepts: even, and a multiple of the block (or below it:
    one block per row)."""
    if block is None:
        return 2 * int(rng.integers(1, 81))
    if block > 2 and rng.random() < 0.2:
        return 2 * int(rng.integers(1, block // 2))  # fewer entries than the block: capped, one per row
    return block * int(rng.integers(1, 160 // block + 1))


def _cache_dims(rng, key_fmt, value_fmt, block):
    """(D, Dv) for the formats: any for float and int8 stores, 4-bit-compatible for "int4"."""
    D = (
        _int4_dim(rng, block)
        if key_fmt == "int4"
        else (_features(rng) if rng.random() < 0.5 else int(rng.integers(1, 65)))
    )
    if rng.random() < 0.7 and (value_fmt != "int4" or key_fmt == "int4"):
        return D, D
    Dv = _int4_dim(rng, block) if value_fmt == "int4" else _features(rng)
    return D, Dv


def int8_exact_budget(q, k, v, scale, arith, operands):
    """float64 arithmetic with int8 ``operands``: the kernel may dequantise exactly where the test's
    ``dequantised`` rounds to float32: ±2⁻²⁴ on k and v (module docstring). None otherwise."""
    if arith != np.float64 or not any(isinstance(x, QuantizedTensor) and x.bits == 8 for x in operands):
        return None
    S = k.shape[-2]
    return (
        2.0**-24
        * (2 * score_magnitude(q, k, scale, None, None, False, np.ones(q.shape[:-1] + (S,), bool)) + 1.0)
        * np.abs(v).max(initial=0.0)
    )


def _add(a, b):
    return a if b is None else b if a is None else a + b


def run_cache_case(seed, params):
    rng = np.random.default_rng(seed)
    B, Hkv, group = int(rng.integers(1, 3)), int(rng.integers(1, 4)), int(rng.integers(1, 4))
    key_fmt = FORMATS[int(rng.choice(len(FORMATS), p=FORMAT_P))]
    value_fmt = key_fmt if rng.random() < 0.3 else FORMATS[int(rng.choice(len(FORMATS), p=FORMAT_P))]
    quantised = _is_quantised(key_fmt) or _is_quantised(value_fmt)
    block = _choice(rng, (32, None, 16, 8)) if quantised else 32
    D, Dv = _cache_dims(rng, key_fmt, value_fmt, block)
    window = None if rng.random() < 0.5 else int(rng.integers(1, 80))
    total = int(rng.integers(1, 700))
    capacity = total + int(rng.integers(0, 20))
    params.update(
        B=B,
        Hkv=Hkv,
        group=group,
        key_dtype=_format_name(key_fmt),
        value_dtype=_format_name(value_fmt),
        block=block,
        D=D,
        Dv=Dv,
        window=window,
        capacity=capacity,
        total=total,
        chunks=[],
    )
    rotate = draw_rotate(rng, D, Dv)
    params.update(rotate=rotate)
    if key_fmt == value_fmt and rng.random() < 0.5:
        cache = KVCache(B, Hkv, D, capacity, dtype=key_fmt, window=window, value_dim=Dv, block=block, rotate=rotate)
    else:
        cache = KVCache(
            B,
            Hkv,
            D,
            capacity,
            key_dtype=key_fmt,
            value_dtype=value_fmt,
            window=window,
            value_dim=Dv,
            block=block,
            rotate=rotate,
        )
    assert cache.key_dtype == key_fmt and cache.value_dtype == value_fmt
    assert cache.dtype == (key_fmt if key_fmt == value_fmt else None), cache.dtype
    rot_k, rot_v = expected_rotation(rotate, key_fmt, value_fmt, D, Dv)
    assert (cache.rotate_keys, cache.rotate_values) == (rot_k, rot_v), (cache.rotate, rot_k, rot_v)
    # a rotated tensor's content: how far it may be from the test's rounding without a tipped code
    near_k, near_v = np.zeros((B, Hkv, 0, D)), np.zeros((B, Hkv, 0, Dv))
    tie_k, tie_v = np.zeros((B, Hkv, 0, D)), np.zeros((B, Hkv, 0, Dv))
    hist_k, hist_v = np.zeros((B, Hkv, 0, D)), np.zeros((B, Hkv, 0, Dv))
    step_k, step_v = np.zeros((B, Hkv, 0, D)), np.zeros((B, Hkv, 0, Dv))
    appended = 0
    has64 = np.dtype(np.float64) in (key_fmt, value_fmt)
    q_dtype = np.float64 if has64 and rng.random() < 0.7 else _choice(rng, (np.float32, np.float32, np.float16))
    while appended < total:
        T = min(total - appended, int(_choice(rng, (1, 1, rng.integers(1, 9), rng.integers(1, 200)))))
        numpy_path = bool(rng.random() < 0.25)  # the numpy path (quantize) for any T, not only big chunks
        params["chunks"].append((T, "numpy") if numpy_path else T)
        k_new = rng.standard_normal((B, Hkv, T, D)).astype(_choice(rng, (np.float32, np.float64, np.float16)))
        v_new = rng.standard_normal((B, Hkv, T, Dv)).astype(_choice(rng, (np.float32, np.float64, np.float16)))
        k_new, v_new = as_view(k_new, _choice(rng, VIEWS)), as_view(v_new, _choice(rng, VIEWS))
        snap = Snapshot(k_new, v_new)
        serial_rows = cache_module.APPEND_SERIAL_ROWS
        try:
            if numpy_path:
                cache_module.APPEND_SERIAL_ROWS = 0
            cache.append(k_new, v_new)
        finally:
            cache_module.APPEND_SERIAL_ROWS = serial_rows
        snap.assert_unchanged()
        appended += T
        # (a rotating cache: the test's own H·x, rotated by the cache in its input's precision)
        nk = nv = tk = tv = np.zeros(())
        if rot_k:
            rk, sk, nk, tk = rotated_like_cache(k_new, key_fmt, block, rotation_eps(k_new.dtype))
        else:
            rk, sk = rounded_like_cache(k_new, key_fmt, block)
        if rot_v:
            rv, sv, nv, tv = rotated_like_cache(v_new, value_fmt, block, rotation_eps(v_new.dtype))
        else:
            rv, sv = rounded_like_cache(v_new, value_fmt, block)
        near_k = np.concatenate([near_k, np.broadcast_to(nk, rk.shape)], 2)
        near_v = np.concatenate([near_v, np.broadcast_to(nv, rv.shape)], 2)
        tie_k = np.concatenate([tie_k, np.broadcast_to(tk, rk.shape)], 2)
        tie_v = np.concatenate([tie_v, np.broadcast_to(tv, rv.shape)], 2)
        hist_k, hist_v = np.concatenate([hist_k, rk], 2), np.concatenate([hist_v, rv], 2)
        step_k, step_v = np.concatenate([step_k, sk], 2), np.concatenate([step_v, sv], 2)
        assert cache.length == appended, (cache.length, appended)
        n_valid = appended if window is None else min(window, appended)
        assert cache.n_valid == n_valid, (cache.n_valid, n_valid)
        np.testing.assert_array_equal(np.sort(cache.positions()), np.arange(appended - n_valid, appended))
        keys, values = cache_content(cache)
        assert keys.shape == (B, Hkv, n_valid, D) and values.shape == (B, Hkv, n_valid, Dv)
        # what the cache holds: the last n_valid tokens, rounded to its format (int8 and int4: within one
        # step of the documented scheme, since a reciprocal may differ by an ulp at a tie)
        for name, got, hist, step, fmt, rot, near, tie in (
            ("keys", keys, hist_k, step_k, key_fmt, rot_k, near_k, tie_k),
            ("values", values, hist_v, step_v, value_fmt, rot_v, near_v, tie_v),
        ):
            held = slice(appended - n_valid, appended)
            if rot:  # stored as H·x: against the test's own rotation and rounding
                assert_rotated_within(got, hist[:, :, held], step[:, :, held], near[:, :, held], tie[:, :, held], fmt)
            elif _is_quantised(fmt):
                assert_within_step(got, hist[:, :, appended - n_valid :], step[:, :, appended - n_valid :])
            else:
                np.testing.assert_array_equal(got, hist[:, :, appended - n_valid :], err_msg=f"cache {name}")
        if rng.random() < 0.6 or appended == total:
            Lq = int(min(n_valid, _choice(rng, (1, 1, rng.integers(1, 9), rng.integers(1, 300)))))
            q = rng.standard_normal((B, Hkv * group, Lq, D)).astype(q_dtype)
            ordered_k, ordered_v = cache.ordered()
            if not cache.wrapped and rng.random() < 0.5:
                ordered_k, ordered_v = cache.keys, cache.values  # views straight onto the storage
            scale = None if rng.random() < 0.7 else float(rng.uniform(0.1, 2) / math.sqrt(D))
            kw = dict(
                is_causal="lower_right",
                window=window,
                enable_gqa=group > 1,
                scale=scale,
                return_lse=bool(rng.random() < 0.5),
                sinks=rng.uniform(-6, 6, Hkv * group) if rng.random() < 0.3 else None,
            )
            snap = Snapshot(q, ordered_k, ordered_v)
            # a rotating cache: the query rotated like the keys, the output rotated back (no-ops otherwise)
            q_call = cache.rotate_query(q)
            if (rot_k or rot_v) and not cache.wrapped:  # (views of the storage: a plain query is refused)
                try:
                    scaled_dot_product_attention(q, ordered_k, ordered_v, **kw)
                    raise AssertionError("an unrotated query on a rotating cache's views was not refused")
                except ValueError as exc:
                    assert "rotate" in str(exc), exc
            res = scaled_dot_product_attention(q_call, ordered_k, ordered_v, **kw)
            raw, lse = res if kw["return_lse"] else (res, None)
            out = cache.unrotate_output(raw)
            snap.assert_unchanged()
            floats = float_dtypes_of(q_call, ordered_k, ordered_v)
            arith = np.float64 if np.dtype(np.float64) in floats else np.float32
            assert out.dtype == np.result_type(*floats), out.dtype
            k_eff, v_eff = (np.repeat(effective(x), group, axis=1) for x in (ordered_k, ordered_v))
            k_size, v_size = (
                None if x is None else np.repeat(x, group, axis=1)
                for x in (dequantised_size(ordered_k), dequantised_size(ordered_v))
            )
            s = 1.0 / math.sqrt(D) if scale is None else scale
            q_eff = rotated(q, hadamard_matrix(D)) if rot_k else q.astype(np.float64)
            extra = _add(
                int4_budget(q_eff, k_size, v_size, v_eff, s, arith),
                int8_exact_budget(q_eff, k_eff, v_eff, s, arith, (ordered_k, ordered_v)),
            )
            vis = visible_keys(Lq, k_eff.shape[-2], "lower_right", window, None)
            if rot_k:  # the library's rotated query: H·q within ρ; its rounding joins the budget
                assert_rotation_within(q_call, q_eff, rotation_eps(q.dtype), "rotate_query")
                extra = _add(extra, query_rotation_budget(q_call.astype(np.float64) - q_eff, k_eff, v_eff, s, vis))
            if rot_v:  # compared in the stored basis: H·out against the formula on the stored values
                Hv = hadamard_matrix(Dv)
                assert_rotation_within(out, rotated(raw, Hv), float(np.finfo(arith).eps), "unrotate_output")
                out = rotated(out, Hv)
                extra = _add(extra, np.abs(out - raw.astype(np.float64)).max(axis=-1, initial=0.0))
            sinks = None
            if kw["sinks"] is not None:
                sinks = np.broadcast_to(kw["sinks"].astype(arith).astype(np.float64), (B, Hkv * group))
            check_against_formula(
                out, lse, q_eff, k_eff, v_eff, s, None, "lower_right", window, None, None, arith, extra, sinks=sinks
            )


def assert_within_step(actual, expected, step):
    """int8/int4 content: equal to the documented rounding, or one quantisation step off (a tie)."""
    err = np.abs(actual - expected)
    bad = err > step * (1 + 1e-6) + 1e-30
    assert not bad.any(), f"quantised cache content off by more than one step at {np.argwhere(bad)[0]}"
    exact_share = float((err == 0).mean()) if err.size else 1.0
    assert exact_share > 0.99, f"quantised cache content differs from the documented rounding in {1 - exact_share:.1%}"


def test_fuzz_kv_cache(cache_batch, fuzz_seed):
    run_batch("KVCache", run_cache_case, fuzz_seed, *cache_batch)


# ------------------------------------------------------------------------------------------------
# family 3: MultiHeadAttention against a float64 numpy layer
# ------------------------------------------------------------------------------------------------


def numpy_layer(
    layer,
    x_new,
    dtype,
    x_all=None,
    k_hist=None,
    v_hist=None,
    kpm=None,
    attn_mask=None,
    is_causal=False,
    window=None,
    key_rotation=None,
    value_rotation=None,
):
    """The layer in numpy, all in ``dtype``: projections, heads, attention, output projection.

    Queries from ``x_new`` (B, L, embed); keys and values from ``x_all`` (B, S, embed; default x_new; a
    cached call's whole history, the new tokens last), or given as ``k_hist``/``v_hist`` (B, H_kv, S, hd)
    (a float16, int8 or int4 cache's rounded content, or a rotating cache's content as stored). ``kpm``:
    bool (B, S) True = padding, or float added; ``attn_mask``: bool True = not allowed, or float added
    (torch.nn.MultiheadAttention's conventions). ``key_rotation``/``value_rotation``: the test's H (hd × hd)
    of a cache storing keys/values rotated: queries rotated (in float64, then ``dtype``); the attention
    output stays in the values' stored basis and the output projection takes H in: diag(H, …)·W_o (the
    ``w_o`` returned in the parts, float64)."""
    dt = np.dtype(dtype).type
    W = {n: getattr(layer, n).astype(dt) for n in ("w_q", "w_k", "w_v", "w_o")}
    w_o = layer.w_o.astype(np.float64)
    if value_rotation is not None:
        w_o = np.kron(np.eye(layer.num_heads), value_rotation) @ w_o
        W["w_o"] = w_o.astype(dt)
    b = {n: (None if getattr(layer, n) is None else getattr(layer, n).astype(dt)) for n in ("b_q", "b_k", "b_v", "b_o")}
    H, Hkv, hd = layer.num_heads, layer.num_kv_heads, layer.head_dim

    def proj(x, w, bias, heads):
        x = x.astype(dt)
        y = x @ W[w]
        if b[bias] is not None:
            y = y + b[bias]
        return y.reshape(x.shape[0], x.shape[1], heads, hd).transpose(0, 2, 1, 3)

    B, L, _ = x_new.shape
    q = proj(x_new, "w_q", "b_q", H)
    if key_rotation is not None:
        q = rotated(q, key_rotation).astype(dt)
    if k_hist is None:
        src = x_new if x_all is None else x_all
        k, v = proj(src, "w_k", "b_k", Hkv), proj(src, "w_v", "b_v", Hkv)
    else:
        k, v = k_hist.astype(dt), v_hist.astype(dt)
    g = H // Hkv
    k, v = np.repeat(k, g, axis=1), np.repeat(v, g, axis=1)
    S = k.shape[2]
    mask = None
    parts = []
    if kpm is not None:
        parts.append(
            np.where(kpm, -np.inf, 0.0)[:, None, None, :]
            if kpm.dtype == np.bool_
            else kpm.astype(np.float64)[:, None, None, :]
        )
    if attn_mask is not None:
        parts.append(np.where(attn_mask, -np.inf, 0.0) if attn_mask.dtype == np.bool_ else attn_mask.astype(np.float64))
    if parts:
        mask = np.broadcast_to(sum(parts), (B, H, L, S)).astype(dt)
    scale = 1.0 / math.sqrt(hd)
    out, _, vis = attention_formula(q, k, v, scale, mask, is_causal, window, dtype=dt)
    merged = out.transpose(0, 2, 1, 3).reshape(B, L, H * hd)
    y = merged @ W["w_o"]
    if b["b_o"] is not None:
        y = y + b["b_o"]
    return y, dict(q=q, k=k, v=v, mask=mask, vis=vis, merged=merged, w_o=w_o)


def check_layer(y, layer, x_new, arith, k_size=None, v_size=None, query_rounding=None, **kw):
    """y against the float64 numpy layer: error ≤ 2× the naive-``arith`` layer's + a floor propagated
    through the output projection (the attention floor per head row, and eps·|merged|·|W_o|).
    ``k_size``/``v_size``: a 4-bit cache's |code·step| + |min| per entry of ``k_hist``/``v_hist`` (the
    4-bit terms of the module docstring join the attention floor). A rotating cache (``key_rotation``/
    ``value_rotation`` in kw): ``query_rounding`` (the library's rotated query minus the test's, (B, H, L,
    hd)) joins the attention floor; rotating the output back rounds each head's output by ≤ ρ ≤
    (log2 b + 2)·eps·√hd·max|v| in 2-norm, which moves y_e by at most that times ‖W_o[head rows, e]‖₂
    (Cauchy–Schwarz; counted twice, module docstring)."""
    assert y.dtype == layer.dtype and y.shape == x_new.shape[:2] + (layer.embed_dim,), (y.dtype, y.shape)
    assert not np.isnan(y).any(), "layer output holds NaN"
    exact, parts = numpy_layer(layer, x_new, np.float64, **kw)
    scale = 1.0 / math.sqrt(layer.head_dim)
    g = layer.num_heads // layer.num_kv_heads
    k_size, v_size = (None if x is None else np.repeat(x, g, axis=1) for x in (k_size, v_size))
    int4_floor = int4_budget(parts["q"], k_size, v_size, parts["v"], scale, arith)
    naive, _ = numpy_layer(layer, x_new, arith, **kw)
    eps = float(np.finfo(arith).eps)
    M = score_magnitude(parts["q"], parts["k"], scale, parts["mask"], None, kw.get("is_causal", False), parts["vis"])
    V = value_magnitude(parts["v"], parts["vis"])
    head_floor = _add(eps * V * (C_EXP + C_SCORE * M), int4_floor)  # (B, H, L)
    if query_rounding is not None:
        head_floor = head_floor + query_rotation_budget(query_rounding, parts["k"], parts["v"], scale, parts["vis"])
    w_o = np.abs(parts["w_o"])
    per_head = w_o.reshape(layer.num_heads, layer.head_dim, -1).sum(axis=1)  # (H, embed)
    floor = np.einsum("bhl,he->ble", head_floor, per_head) + C_EXP * eps * (np.abs(parts["merged"]) @ w_o)
    # the output projection's own sums (hq terms: a γ_n bound, n·eps·Σ|a||b|) and the result's rounding: at
    # tiny magnitudes (head_dim 1, float64) these alone decide (seed 7004458: 7.5e-17 against 6.7e-17)
    n_in = layer.num_heads * layer.head_dim
    floor = floor + eps * (n_in * (np.abs(parts["merged"]) @ w_o) + np.abs(exact))
    if kw.get("value_rotation") is not None:
        hd = layer.head_dim
        rho = 2 * (math.log2(rotation_block(hd)) + 2) * eps * math.sqrt(hd) * V  # (B, H, L)
        w_norm = np.sqrt((layer.w_o.astype(np.float64).reshape(layer.num_heads, hd, -1) ** 2).sum(axis=1))
        floor = floor + np.einsum("bhl,he->ble", rho, w_norm)
    naive_err = np.abs(naive - exact).max(axis=-1, keepdims=True)
    err = np.abs(y.astype(np.float64) - exact)
    tol = 2 * naive_err + floor
    if (err > tol).any():
        w = np.unravel_index(np.argmax(err - tol), err.shape)
        raise AssertionError(
            f"layer output outside the budget at {tuple(int(i) for i in w)}: |err| {err[w]:.3g} > "
            f"tol {tol[w]:.3g} ({int((err > tol).sum())} of {err.size})"
        )


def run_layer_case(seed, params):
    rng = np.random.default_rng(seed)
    Hkv = int(rng.integers(1, 4))
    H = Hkv * int(rng.integers(1, 4))
    hd = int(rng.integers(1, 40))
    hd += hd % 2 if rng.random() < 0.5 else 0  # (even head dims for 4-bit caches more often)
    embed = H * hd if rng.random() < 0.7 else int(rng.integers(1, 100))
    dtype = np.dtype(_choice(rng, (np.float32, np.float32, np.float64)))
    bias = bool(rng.random() < 0.7)
    B = int(rng.integers(1, 3))
    cached = rng.random() < 0.5
    params.update(H=H, Hkv=Hkv, head_dim=hd, embed=embed, dtype=dtype.name, bias=bias, B=B, cached=cached)
    layer = MultiHeadAttention(embed, H, Hkv, head_dim=hd, bias=bias, dtype=dtype, seed=int(rng.integers(1 << 31)))
    if bias:
        layer.load(
            layer.w_q,
            layer.w_k,
            layer.w_v,
            layer.w_o,
            *(rng.standard_normal(getattr(layer, n).shape) * 0.1 for n in ("b_q", "b_k", "b_v", "b_o")),
        )
    arith = np.float64 if dtype == np.float64 else np.float32
    if not cached:
        L = int(rng.integers(1, 60))
        x = as_view(rng.standard_normal((B, L, embed)).astype(dtype), _choice(rng, VIEWS))
        kpm = attn_mask = None
        if rng.random() < 0.4:
            kpm = rng.random((B, L)) < 0.3
            if rng.random() < 0.3:
                kpm = np.where(kpm, -np.inf, rng.standard_normal((B, L))).astype(dtype)
        if rng.random() < 0.4:
            shape = (L, L) if rng.random() < 0.6 else (B, H, L, L)
            attn_mask = rng.random(shape) < 0.3
            if rng.random() < 0.4:
                attn_mask = np.where(attn_mask, -np.inf, rng.standard_normal(shape)).astype(dtype)
        is_causal = _choice(rng, CAUSAL)
        params.update(
            L=L,
            kpm=None if kpm is None else kpm.dtype.name,
            attn_mask=None if attn_mask is None else (attn_mask.dtype.name, attn_mask.shape),
            is_causal=is_causal,
            view=None,
        )
        snap = Snapshot(x, kpm, attn_mask)
        y = layer(x, key_padding_mask=kpm, attn_mask=attn_mask, is_causal=is_causal)
        snap.assert_unchanged()
        check_layer(y, layer, np.asarray(x), arith, kpm=kpm, attn_mask=attn_mask, is_causal=is_causal)
        return
    if dtype == np.float64:
        key_fmt = value_fmt = np.dtype(np.float64)
    else:
        layer_formats = FORMATS[:4]  # a float32 layer's caches: float32, float16, int8, int4
        key_fmt = _choice(rng, layer_formats, p=[0.2, 0.15, 0.2, 0.45])
        value_fmt = key_fmt if rng.random() < 0.5 else _choice(rng, layer_formats, p=[0.2, 0.15, 0.2, 0.45])
    if hd % 2:  # 4-bit rows pack two entries per byte: an odd head dim gets int8 instead
        key_fmt, value_fmt = (np.dtype(np.int8) if f == "int4" else f for f in (key_fmt, value_fmt))
    quantised = _is_quantised(key_fmt) or _is_quantised(value_fmt)
    blocks = (32, None, 16, 8)
    if "int4" in (key_fmt, value_fmt):  # blocks that divide the head dim (or cover it: one per row)
        blocks = tuple(b for b in blocks if b is None or hd <= b or hd % b == 0)
    block = _choice(rng, blocks) if quantised else 32
    window = None if rng.random() < 0.5 else int(rng.integers(1, 40))
    total = int(rng.integers(1, 120))
    rotate = draw_rotate(rng, hd, hd)
    if key_fmt == value_fmt:
        cache = layer.new_cache(B, total + 5, window=window, dtype=key_fmt, block=block, rotate=rotate)
    elif rng.random() < 0.5:
        cache = layer.new_cache(
            B, total + 5, window=window, key_dtype=key_fmt, value_dtype=value_fmt, block=block, rotate=rotate
        )
    else:  # (built directly: a cached layer call takes any KVCache of its shape)
        cache = KVCache(
            B,
            Hkv,
            hd,
            total + 5,
            key_dtype=key_fmt,
            value_dtype=value_fmt,
            window=window,
            block=block,
            rotate=rotate,
        )
    params.update(
        key_dtype=_format_name(key_fmt),
        value_dtype=_format_name(value_fmt),
        block=block,
        window=window,
        total=total,
        rotate=rotate,
        chunks=[],
    )
    rot_k, rot_v = expected_rotation(rotate, key_fmt, value_fmt, hd, hd)
    assert (cache.rotate_keys, cache.rotate_values) == (rot_k, rot_v), (cache.rotate, rot_k, rot_v)
    rotation = dict(
        key_rotation=hadamard_matrix(hd) if rot_k else None, value_rotation=hadamard_matrix(hd) if rot_v else None
    )
    rounded = rot_k or rot_v or any(f in (np.float16, np.int8) or f == "int4" for f in (key_fmt, value_fmt))
    x_all = np.zeros((B, 0, embed), dtype)
    k_hist, v_hist = np.zeros((B, Hkv, 0, hd)), np.zeros((B, Hkv, 0, hd))
    k_size = None if key_fmt != "int4" else np.zeros((B, Hkv, 0, hd))
    v_size = None if value_fmt != "int4" else np.zeros((B, Hkv, 0, hd))
    while x_all.shape[1] < total:
        done = x_all.shape[1]
        T = min(total - done, int(_choice(rng, (1, 1, rng.integers(1, 8), rng.integers(1, 50)))))
        params["chunks"].append(T)
        x = rng.standard_normal((B, T, embed)).astype(dtype)
        x_all = np.concatenate([x_all, x], 1)
        hist = {}
        if rounded:
            # K and V as the layer computes them (float32), rounded as the cache stores them: the same
            # rounded inputs for the float64 formula
            _, k_new, v_new = layer.project_qkv(x)
            # a rotated tensor: what the cache will store for the new tokens (ordered_with: rotated and
            # converted as stored; the layer attends over exactly that), checked against the test's own
            # rotation and rounding (the cache rotates in float32: a code may tip at a tie, so the test's
            # rounding cannot stand in for it)
            new_k, new_v = cache.ordered_with(k_new, v_new) if rot_k or rot_v else (None, None)
            for name, rot, new, raw, fmt in (
                ("k", rot_k, new_k, k_new, key_fmt),
                ("v", rot_v, new_v, v_new, value_fmt),
            ):
                if rot:
                    stored = effective(new)[:, :, -T:]
                    expected, step, near, tie = rotated_like_cache(raw, fmt, block, rotation_eps(raw.dtype))
                    assert_rotated_within(stored, expected, step, near, tie, fmt)
                    size = dequantised_size(new)
                    size = None if size is None else size[:, :, -T:]
                else:
                    stored = rounded_like_cache(raw, fmt, block)[0]
                    size = int4_size_like_cache(raw, block) if fmt == "int4" else None
                if name == "k":
                    k_hist = np.concatenate([k_hist, stored], 2)
                    k_size = None if k_size is None else np.concatenate([k_size, size], 2)
                else:
                    v_hist = np.concatenate([v_hist, stored], 2)
                    v_size = None if v_size is None else np.concatenate([v_size, size], 2)
            hist = dict(k_hist=k_hist, v_hist=v_hist)
        query_rounding = None
        if rot_k:  # the layer's query, rotated by the cache as the call will (H·q within ρ, its rounding)
            q_new, _, _ = layer.project_qkv(x)
            q_exact = rotated(q_new, rotation["key_rotation"])
            q_lib = cache.rotate_query(q_new)
            assert_rotation_within(q_lib, q_exact, float(np.finfo(arith).eps), "rotate_query")
            query_rounding = q_lib.astype(np.float64) - q_exact
        kpm = rng.random((B, done + T)) < 0.2 if rng.random() < 0.3 else None
        y = layer(x, cache=cache, key_padding_mask=kpm)
        assert cache.length == done + T, (cache.length, done + T)
        if rot_k or rot_v:  # the cache holds what ordered_with said it would (the newest tokens it keeps)
            kept = min(T, cache.n_valid)
            for got, want in zip(cache.ordered(), (k_hist, v_hist)):
                np.testing.assert_array_equal(
                    effective(got)[:, :, cache.n_valid - kept :], want[:, :, done + T - kept :]
                )
        check_layer(
            y,
            layer,
            x,
            arith,
            k_size=k_size,
            v_size=v_size,
            query_rounding=query_rounding,
            x_all=x_all,
            kpm=kpm,
            is_causal="lower_right",
            window=window,
            **hist,
            **rotation,
        )


def test_fuzz_layer(layer_batch, fuzz_seed):
    run_batch("MultiHeadAttention", run_layer_case, fuzz_seed, *layer_batch)


# ------------------------------------------------------------------------------------------------
# the fuzzer can fail
# ------------------------------------------------------------------------------------------------


def test_formula_check_catches_a_small_error():
    """A result off by a relative 1e-3 in the scale fails the budget (the same check the fuzzer runs)."""
    rng = np.random.default_rng(1)
    q, k, v = (rng.standard_normal((2, 37, 33)).astype(np.float32) for _ in range(3))
    good = scaled_dot_product_attention(q, k, v)
    check_against_formula(
        good, None, q.astype(np.float64), k.astype(np.float64), v.astype(np.float64), 1 / math.sqrt(33)
    )
    wrong = scaled_dot_product_attention(q, k, v, scale=(1 + 1e-3) / math.sqrt(33))
    with pytest.raises(AssertionError, match="outside the budget"):
        check_against_formula(
            wrong, None, q.astype(np.float64), k.astype(np.float64), v.astype(np.float64), 1 / math.sqrt(33)
        )


def test_formula_check_with_4bit_operands_catches_a_small_error():
    """With 4-bit keys and values (their budget terms included), a scale off by a relative 1e-3 still
    fails, and so does a value read with its nibbles swapped."""
    rng = np.random.default_rng(2)
    q = rng.standard_normal((2, 37, 64)).astype(np.float32)
    kq = quantize(rng.standard_normal((2, 300, 64)) + 0.5, 32, bits=4)
    vq = quantize(rng.standard_normal((2, 300, 64)), 32, bits=4)
    k, v, scale = dequantised(kq), dequantised(vq), 1 / math.sqrt(64)
    extra = int4_budget(q.astype(np.float64), dequantised_size(kq), dequantised_size(vq), v, scale, np.float32)
    good = scaled_dot_product_attention(q, kq, vq)
    check_against_formula(good, None, q.astype(np.float64), k, v, scale, extra_row_budget=extra)
    wrong = scaled_dot_product_attention(q, kq, vq, scale=(1 + 1e-3) * scale)
    with pytest.raises(AssertionError, match="outside the budget"):
        check_against_formula(wrong, None, q.astype(np.float64), k, v, scale, extra_row_budget=extra)
    swapped = QuantizedTensor(((vq.data & 15) << 4) | (vq.data >> 4), vq.scales, vq.block, bits=4)
    wrong = scaled_dot_product_attention(q, kq, swapped)
    with pytest.raises(AssertionError, match="outside the budget"):
        check_against_formula(wrong, None, q.astype(np.float64), k, v, scale, extra_row_budget=extra)


def test_rotation_budget_catches_a_missing_or_wrong_rotation():
    """A rotating int8/int4 cache through the cache family's checks: the documented call passes; a query
    that skipped the rotation or an output rotated once too often fails the budget, and a query rotation
    off by a relative 1e-5 fails the rotation check (ρ: ~1e-6 relative here)."""
    rng = np.random.default_rng(3)
    B, Hkv, S, D = 1, 2, 300, 64
    cache = KVCache(B, Hkv, D, S, key_dtype=np.int8, value_dtype="int4", rotate="both")
    cache.append(rng.standard_normal((B, Hkv, S, D)), rng.standard_normal((B, Hkv, S, D)))
    q = rng.standard_normal((B, Hkv, 3, D)).astype(np.float32)
    keys, values = cache.keys, cache.values
    k, v, s = effective(keys), effective(values), 1 / math.sqrt(D)
    H = hadamard_matrix(D)
    q_eff = rotated(q, H)
    vis = visible_keys(3, S, "lower_right", None, None)

    def check(q_call, raw):
        """The cache family's check of unrotate_output(sdpa(q_call, ...)) = ``raw`` rotated back."""
        out = cache.unrotate_output(raw)
        assert_rotation_within(out, rotated(raw, H), F32_EPS, "unrotate_output")
        back = rotated(out, H)
        extra = _add(
            int4_budget(q_eff, None, dequantised_size(values), v, s, np.float32),
            query_rotation_budget(q_call.astype(np.float64) - q_eff, k, v, s, vis) + np.abs(back - raw).max(axis=-1),
        )
        check_against_formula(back, None, q_eff, k, v, s, None, "lower_right", arith=np.float32, extra_row_budget=extra)

    q_call = cache.rotate_query(q)
    assert_rotation_within(q_call, q_eff, F32_EPS, "rotate_query")
    check(q_call, scaled_dot_product_attention(q_call, keys, values, is_causal="lower_right"))
    # copies of the stored content (not the cache's views: the guard would refuse a plain query on those)
    kc, vc = (QuantizedTensor(x.data.copy(), x.scales.copy(), x.block, x.bits) for x in (keys, values))
    for q_wrong, raw in (
        (q_call, scaled_dot_product_attention(q, kc, vc, is_causal="lower_right")),  # the query not rotated
        # the output rotated once more (as if unrotate_output were missing)
        (q_call, cache.unrotate_output(scaled_dot_product_attention(q_call, keys, values, is_causal="lower_right"))),
    ):
        with pytest.raises(AssertionError, match="outside the budget"):
            check(q_wrong, raw)
    # a query rotation off by a relative 1e-5: the budget takes the measured rounding in, so the rotation
    # check (within ρ of the test's H, ~1e-6 relative here) is what catches it
    with pytest.raises(AssertionError, match="rotation is off"):
        assert_rotation_within((q_eff * (1 + 1e-5)).astype(np.float32), q_eff, F32_EPS, "rotate_query")
