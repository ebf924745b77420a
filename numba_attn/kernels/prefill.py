"""Fused prefill attention: many query rows against many keys, streaming softmax, no L×S matrix.

Maths, for one batch entry n and one query row i (s = scale, K/V rows j, optional mask M):

    z_ij = s·q_i·k_j + M_ij            (M_ij = -inf where a boolean mask or the causal rule hides j)
    m_i  = max_j z_ij,   l_i = Σ_j exp(z_ij - m_i)
    o_i  = Σ_j exp(z_ij - m_i)·v_j / l_i,   lse_i = m_i + log l_i

computed one key block at a time (flash attention): for each block B,

    m' = max(m, max_{j∈B} z_ij);  α = exp(m - m');  p_j = exp(z_ij - m')
    l  ← α·l + Σ p_j;  acc ← α·acc + Σ p_j·v_j;  m ← m'

and o_i = acc / l at the end. A row that has seen only masked keys keeps m = -inf and acc = 0; it is
skipped (no exp(-inf - -inf) = NaN) and its output is zeros with lse = -inf.

Work split: ``prange`` over (batch entry, block of BLOCK_Q query rows), so a single sequence with few
heads still feeds every core. Key blocks of BLOCK_K keys; key blocks that the causal rule hides from
every row of the query block are never visited.

Row groups: a work item's rows are taken in groups of W, the register tile's rows (float32: W = 64
with AVX-512, 16 with AVX2 or NEON, 8 otherwise; float64: one group of all the rows). Each group has
its own query block, accumulator and score block, each a contiguous array of W-row lines, so the
micro-kernels read and write them with unit stride (on a Zen 3 the P·V tile went from 47 to 85
GFLOP/s per core when its probabilities stopped being 512 bytes apart). The last group is padded
with zero query rows to a whole tile (those rows are computed and never written; a group of a few rows
costs about what plain loops on its rows would, and plain float32 loops beside the tiles cost ~1.5 s
of a cold start). For each key block (converted once if float16),
each group in turn: scores, (check and) adjust, softmax step, rescale, P·V. Causal: a group visits
only the keys its own rows can see, so blocks on the diagonal cost about half.

Memory per work item (float32, BLOCK_Q = BLOCK_K = 128, E = Ev = 64): the scaled query rows and the
output accumulators, both transposed per group (E × BLOCK_Q in all, 32 KiB each), and one group's
score block (BLOCK_K × W): O(threads·block·D), independent of L and S; they sit in L2. The API
doubles BLOCK_Q to 256 when every thread still gets 4 work items (``api.prefill_block_q``).

Layout: everything is kept transposed, query rows last, so every inner loop runs along a group's
query rows with no horizontal reductions:

- scores and P·V, float32: ``_prefill_tiles`` micro-kernels, 4 keys (or value columns) × W query rows
  accumulated in registers over the whole head dim (or key block), written as LLVM vector IR with
  ``llvm.fma``;
- softmax, float32 on a whole tile: ``_prefill_tiles.softmax_tile`` (vector IR: the W rows' maxima and
  sums in registers, ``_vector_ir.exp_nonpositive_vector``);
- float64 (and the varlen kernel's unpadded rows): plain loops, 4 keys × 4 head-dim
  entries (or 4 columns × 4 keys) per step, vectorised by LLVM along r; softmax with running max,
  exp (``exp_nonpositive``) and sums elementwise along r.

Non-finite check, when asked: the query block is checked as it is transposed, raw scores in the
softmax's max pass (or in a pass of their own, before masks, for blocks a mask touches), results as
they are written; each adds x·0 into a per-row sum (0 unless x is NaN or ±inf) and ``check[w]``
counts the rows whose sum is not 0 (see ``api._run``).

Storage: float32, float64, float16 as uint16 bits, or quantised (int8, 4-bit); the arithmetic runs in
``out.dtype`` (float32 for float16 and quantised storage with a float16/float32 query). Each float16
or quantised key/value block is converted (dequantised) once per work item into a BLOCK_K × D scratch
(``quantised.dequantised_rows``, ``_load.rows_for_compute``) before the micro-kernels, which reuse
every row BLOCK_Q times: quantised prefill runs at float speed.
"""

import math

import numpy as np
from numba import njit, prange, types
from numba.extending import overload

from .. import config
from . import variant
from ._link import callee, shared
from ._load import load
from ._math import exp_nonpositive, running_max
from ._prefill_tiles import W, check_tile, is_c_f32, mask_block, softmax_tile, tile_rows, tile_scores, tile_values
from ._scores import (
    MASK_NONE,
    add_sink,
    adjust_score_line,
    count_flagged,
    hide_causal_line,
    mask_line_by_one,
    mask_score_line,
    refuse_unbuilt_features,
    visible_key_range,
)
from .quantised import dequantised_rows


@njit(fastmath=config.FASTMATH, cache=config.CACHE, inline="always")
def _scores_loops(qt, kn, j0, nk, st, nr, r_lo):
    """st[j, r] = Σ_d kn[j0 + j, d]·qt[d, r] for j < nk and r_lo ≤ r < nr (the register tiles did every
    key of the rows below r_lo). Plain loops, vector over query rows r: 4 keys ×
    4 head-dim entries per step (16 broadcast scalars), each score row read and written once per
    4 FMAs.
    """
    E = qt.shape[0]
    nk4 = nk // 4 * 4
    E4 = E // 4 * 4
    for j in range(0, nk4 if r_lo < nr else 0, 4):
        s0 = st[j]
        s1 = st[j + 1]
        s2 = st[j + 2]
        s3 = st[j + 3]
        s0[r_lo:nr] = 0
        s1[r_lo:nr] = 0
        s2[r_lo:nr] = 0
        s3[r_lo:nr] = 0
        ka = kn[j0 + j]
        kb = kn[j0 + j + 1]
        kc = kn[j0 + j + 2]
        kd = kn[j0 + j + 3]
        for d in range(0, E4, 4):
            q0 = qt[d]
            q1 = qt[d + 1]
            q2 = qt[d + 2]
            q3 = qt[d + 3]
            a0, a1, a2, a3 = load(ka[d]), load(ka[d + 1]), load(ka[d + 2]), load(ka[d + 3])
            b0, b1, b2, b3 = load(kb[d]), load(kb[d + 1]), load(kb[d + 2]), load(kb[d + 3])
            c0, c1, c2, c3 = load(kc[d]), load(kc[d + 1]), load(kc[d + 2]), load(kc[d + 3])
            e0, e1, e2, e3 = load(kd[d]), load(kd[d + 1]), load(kd[d + 2]), load(kd[d + 3])
            for r in range(r_lo, nr):
                x0 = q0[r]
                x1 = q1[r]
                x2 = q2[r]
                x3 = q3[r]
                s0[r] += a0 * x0 + a1 * x1 + a2 * x2 + a3 * x3
                s1[r] += b0 * x0 + b1 * x1 + b2 * x2 + b3 * x3
                s2[r] += c0 * x0 + c1 * x1 + c2 * x2 + c3 * x3
                s3[r] += e0 * x0 + e1 * x1 + e2 * x2 + e3 * x3
        for d in range(E4, E):
            qd = qt[d]
            a0, b0, c0, e0 = load(ka[d]), load(kb[d]), load(kc[d]), load(kd[d])
            for r in range(r_lo, nr):
                x0 = qd[r]
                s0[r] += a0 * x0
                s1[r] += b0 * x0
                s2[r] += c0 * x0
                s3[r] += e0 * x0
    for j in range(nk4, nk):
        s0 = st[j]
        s0[r_lo:nr] = 0
        ka = kn[j0 + j]
        for d in range(E):
            a0 = load(ka[d])
            qd = qt[d]
            for r in range(r_lo, nr):
                s0[r] += a0 * qd[r]


@njit(fastmath=config.FASTMATH, cache=config.CACHE, inline="always")
def scores_block(qt, kn, j0, nk, st, nr):
    """st[j, r] = Σ_d kn[j0 + j, d]·qt[d, r] for j < nk, r < nr (vector over query rows r).

    float32: KI keys × ``_prefill_tiles.W`` rows at a time in registers (``_prefill_tiles.tile_scores``), the
    keys left over by smaller tiles; the rows left over, and float64, take the plain loops.
    """
    r_lo = tile_scores(qt, kn, j0, nk, st, nr)
    _scores_loops(qt, kn, j0, nk, st, nr, r_lo)


@njit(fastmath=config.FASTMATH, cache=config.CACHE, inline="always")
def _values_loops(pt, vn, j0, nk, acct, nr, r_lo):
    """acct[e, r] += Σ_j pt[j, r]·vn[j0 + j, e] for e < Ev and r_lo ≤ r < nr (the register tiles did
    every column of the rows below r_lo). Plain loops, vector over query
    rows r: 4 value columns × 4 keys per step.
    """
    Ev = acct.shape[0]
    nk4 = nk // 4 * 4
    Ev4 = Ev // 4 * 4
    for e in range(0, Ev4 if r_lo < nr else 0, 4):
        o0 = acct[e]
        o1 = acct[e + 1]
        o2 = acct[e + 2]
        o3 = acct[e + 3]
        for j in range(0, nk4, 4):
            p0 = pt[j]
            p1 = pt[j + 1]
            p2 = pt[j + 2]
            p3 = pt[j + 3]
            va = vn[j0 + j]
            vb = vn[j0 + j + 1]
            vc = vn[j0 + j + 2]
            vd = vn[j0 + j + 3]
            a0, a1, a2, a3 = load(va[e]), load(vb[e]), load(vc[e]), load(vd[e])
            b0, b1, b2, b3 = load(va[e + 1]), load(vb[e + 1]), load(vc[e + 1]), load(vd[e + 1])
            c0, c1, c2, c3 = load(va[e + 2]), load(vb[e + 2]), load(vc[e + 2]), load(vd[e + 2])
            d0, d1, d2, d3 = load(va[e + 3]), load(vb[e + 3]), load(vc[e + 3]), load(vd[e + 3])
            for r in range(r_lo, nr):
                x0 = p0[r]
                x1 = p1[r]
                x2 = p2[r]
                x3 = p3[r]
                o0[r] += a0 * x0 + a1 * x1 + a2 * x2 + a3 * x3
                o1[r] += b0 * x0 + b1 * x1 + b2 * x2 + b3 * x3
                o2[r] += c0 * x0 + c1 * x1 + c2 * x2 + c3 * x3
                o3[r] += d0 * x0 + d1 * x1 + d2 * x2 + d3 * x3
        for j in range(nk4, nk):
            p0 = pt[j]
            vj = vn[j0 + j]
            a0, b0, c0, d0 = load(vj[e]), load(vj[e + 1]), load(vj[e + 2]), load(vj[e + 3])
            for r in range(r_lo, nr):
                x0 = p0[r]
                o0[r] += a0 * x0
                o1[r] += b0 * x0
                o2[r] += c0 * x0
                o3[r] += d0 * x0
    for e in range(Ev4, Ev):
        o0 = acct[e]
        for j in range(nk):
            p0 = pt[j]
            a0 = load(vn[j0 + j, e])
            for r in range(r_lo, nr):
                o0[r] += a0 * p0[r]


@njit(fastmath=config.FASTMATH, cache=config.CACHE, inline="always")
def accumulate_values(pt, vn, j0, nk, acct, nr):
    """acct[e, r] += Σ_j pt[j, r]·vn[j0 + j, e] for e < Ev, r < nr (vector over query rows r).

    float32: KI value columns × ``_prefill_tiles.W`` rows at a time in registers (``_prefill_tiles.tile_values``),
    the columns left over by smaller tiles; the rows left over, and float64, take the plain loops.
    """
    r_lo = tile_values(pt, vn, j0, nk, acct, nr)
    _values_loops(pt, vn, j0, nk, acct, nr, r_lo)


def group_scores(qt, kn, j0, nk, st, nr):  # pragma: no cover - numba overload below
    raise TypeError("group_scores is a numba kernel helper: call it from @njit code")


def group_values(pt, vn, j0, nk, acct, nr):  # pragma: no cover - numba overload below
    raise TypeError("group_values is a numba kernel helper: call it from @njit code")


def _one_row_group(tiles, loops):
    """The overload of ``group_scores`` (``tiles`` = ``tile_scores``, ``loops`` = ``scores_block``) or
    ``group_values`` (``tile_values``, ``accumulate_values``) on one row group of the prefill kernel.
    float32 (C arrays): the groups are whole register tiles (nr = W), so the tiles alone, raising if a
    group is not one: the kernel then compiles no plain loops for float32, seconds less of a cold start.
    Anything else: ``loops`` (the tiles where they apply, plain loops for the rest)."""

    def group_overload(a, b, j0, nk, c, nr):
        if is_c_f32(a) and is_c_f32(b) and is_c_f32(c):

            def impl_tiles(a, b, j0, nk, c, nr):
                if tiles(a, b, j0, nk, c, nr) != nr:
                    raise AssertionError("prefill: a float32 row group that is not a whole register tile")

            return impl_tiles
        return lambda a, b, j0, nk, c, nr: loops(a, b, j0, nk, c, nr)

    return group_overload


overload(group_scores)(_one_row_group(tile_scores, scores_block))
overload(group_values)(_one_row_group(tile_values, accumulate_values))


@njit(fastmath=config.FASTMATH, cache=config.CACHE, inline="always")
def online_softmax_block(st, nk, nr, m, l, alpha, m_blk, chk, check_raw):
    """Streaming-softmax step for a block of scores ``st[j, r]`` (keys × query rows), in place.

    st ← exp(st - m'), l ← α·l + Σ_j st, alpha ← α = exp(m - m'), m ← m' with m' = max(m, max_j st).
    A row whose visible scores are all -inf so far uses 0 as its shift, so every exp sees -inf - 0
    (= 0), never -inf - -inf (= NaN); its m stays -inf. All loops run along r and vectorise.
    ``check_raw`` (the scores are raw: no mask or adjustment touched them): the max pass also adds
    st·0 into ``chk`` (0, or NaN once a score is NaN or ±inf) at the cost of one FMA per vector.
    """
    neg_inf = st.dtype.type(-np.inf)
    zero = st.dtype.type(0)
    m_blk[:nr] = neg_inf
    if check_raw:
        for j in range(nk):
            row = st[j]
            for r in range(nr):
                m_blk[r] = running_max(m_blk[r], row[r])
                chk[r] += row[r] * zero
    else:
        for j in range(nk):
            row = st[j]
            for r in range(nr):
                m_blk[r] = running_max(m_blk[r], row[r])
    for r in range(nr):
        m_new = max(m[r], m_blk[r])
        shift = m_new if m_new > neg_inf else zero
        alpha[r] = exp_nonpositive(m[r] - shift)
        m[r] = m_new
        m_blk[r] = shift
        l[r] *= alpha[r]
    for j in range(nk):
        row = st[j]
        for r in range(nr):
            p = exp_nonpositive(row[r] - m_blk[r])
            row[r] = p
            l[r] += p


def softmax_step(st, nk, nr, m, l, alpha, m_blk, chk, check_raw):  # pragma: no cover - numba overload below
    raise TypeError("softmax_step is a numba kernel helper: call it from @njit code")


@overload(softmax_step)
def _softmax_step_overload(st, nk, nr, m, l, alpha, m_blk, chk, check_raw):
    """``online_softmax_block``; in float32, where the prefill kernel's row groups are whole register
    tiles (nr = W, st of W columns), the vector-IR ``_prefill_tiles.softmax_tile`` alone."""
    if st.dtype == types.float32:

        def impl_f32(st, nk, nr, m, l, alpha, m_blk, chk, check_raw):
            if nr != W or st.shape[1] != W:
                raise AssertionError("prefill: a float32 row group that is not a whole register tile")
            softmax_tile(st, nk, m, l, alpha, chk, check_raw)

        return impl_f32

    def impl(st, nk, nr, m, l, alpha, m_blk, chk, check_raw):
        online_softmax_block(st, nk, nr, m, l, alpha, m_blk, chk, check_raw)

    return impl


@njit(fastmath=config.FASTMATH, cache=config.CACHE, inline="always")
def load_scaled_query_block(qn, i0, nr, scale, qt, chk):
    """qt[d, r] = scale·qn[i0 + r, d] for r < nr: the block's query rows, converted from their storage,
    scaled and transposed (rows unit-stride in r); chk[r] = Σ_d qn[i0 + r, d]·0 (0 unless the row holds
    NaN or ±inf)."""
    E = qt.shape[0]
    zero = qt.dtype.type(0)
    for r in range(nr):
        c = zero  # a local sum: chk[r] itself would be a store per value
        for d in range(E):
            x = load(qn[i0 + r, d])
            qt[d, r] = x * scale
            c += x * zero
        chk[r] = c


@njit(fastmath=config.FASTMATH, cache=config.CACHE, inline="always")
def _check_score_loops(st, nk, nr, chk):
    zero = st.dtype.type(0)
    for j in range(nk):
        row = st[j]
        for r in range(nr):
            chk[r] += row[r] * zero


def check_score_block(st, nk, nr, chk):  # pragma: no cover - numba overload below
    raise TypeError("check_score_block is a numba kernel helper: call it from @njit code")


@overload(check_score_block, fastmath=config.FASTMATH)
def _check_score_block_overload(st, nk, nr, chk):
    """chk[r] += Σ_j st[j, r]·0 for j < nk, r < nr: NaN once a raw score of row r is NaN or ±inf (a pass of its
    own, for blocks whose scores a mask or adjustment will change before the softmax reads them).
    A float32 block of a whole register tile (nr = W, the prefill kernel's groups) takes
    ``_prefill_tiles.check_tile``; anything else plain loops."""
    loops = _check_score_loops
    if is_c_f32(st) and is_c_f32(chk):

        def impl_f32(st, nk, nr, chk):
            if nr == st.shape[1] and chk.shape[0] >= nr:
                check_tile(st, nk, chk)
            else:
                loops(st, nk, nr, chk)

        return impl_f32

    def impl(st, nk, nr, chk):
        loops(st, nk, nr, chk)

    return impl


@njit(fastmath=config.FASTMATH, cache=config.CACHE, inline="always")
def adjust_score_block(
    st, nk, nr, nc, i0, j0, pos_offset, diagonal, has_alibi, slope, softcap, window, mask_n, mask_kind, mask_li, mask_sj
):
    """The score adjustments of ``_scores`` on st[j, r] = score of query row i0 + r and key j0 + j: soft-cap,
    ALiBi and window, the mask, then the causal rule if ``diagonal`` (the block straddles the diagonal).
    Each step is its own pass over the block, one key row at a time along the query rows r (the
    ``_scores`` line steps with (di, dj) = (1, 0)): one loop per step lets LLVM hoist the step's
    conditions out of the loop and vectorise it (all steps in one pass over j left the ALiBi loop
    scalar).

    ``nc`` ≥ nr: the rows the block holds (float32: a whole register tile, W; the rows past nr are padding
    rows of zero queries, never written). Steps that read no per-row data (soft-cap, ALiBi, window, a
    mask broadcast along the rows, the causal rule) run over all nc rows, which costs nothing more and
    keeps the loops' trip count that of the tile; a mask with one entry per query row reads only the nr
    real rows (there is no mask row past L)."""
    if has_alibi or softcap > 0 or window > 0:
        for j in range(nk):
            adjust_score_line(st[j], nc, i0, 1, j0 + j, 0, pos_offset, slope, softcap, window)
    if mask_kind != MASK_NONE:
        if mask_li == 0:  # one mask row for every query row: one value per key, for the key's whole line
            for j in range(nk):
                mask_line_by_one(st[j], nc, mask_n[0, (j0 + j) * mask_sj], mask_kind)
        elif mask_sj == 0:  # one value per query row: the real rows only (no mask row past L)
            for j in range(nk):
                mask_score_line(st[j], nr, mask_n, mask_kind, i0, 1, j0 + j, 0, mask_li, mask_sj)
        else:
            # VW × VW blocks transposed in registers (float32), then one query row at a time for the
            # rest: the mask read along its rows (contiguous), st down a column
            rows_done, keys_done = mask_block(st, nk, nr, mask_n, i0, j0)
            for r in range(nr):
                lo = keys_done if r < rows_done else 0
                mask_score_line(st[lo:, r], nk - lo, mask_n, mask_kind, i0 + r, 0, j0 + lo, 1, mask_li, mask_sj)
    if diagonal:
        hide_above_diagonal(st, nk, nc, i0, j0, pos_offset)


@njit(fastmath=config.FASTMATH, cache=config.CACHE, inline="always")
def hide_above_diagonal(st, nk, nr, i0, j0, pos_offset):
    """st[j, r] = -inf where key j0 + j lies after query row i0 + r's position (i0 + r + pos_offset): the
    causal rule on a block that straddles the diagonal."""
    for j in range(nk):
        hide_causal_line(st[j], nr, i0, 1, j0 + j, 0, pos_offset)


@njit(fastmath=config.FASTMATH, cache=config.CACHE, inline="always")
def rescale_accumulator(acct, alpha, nr):
    """acct[e, r] *= alpha[r] for r < nr: the running P·V of each row moved to its new running max."""
    for e in range(acct.shape[0]):
        orow = acct[e]
        for r in range(nr):
            orow[r] *= alpha[r]


@njit(fastmath=config.FASTMATH, cache=config.CACHE, inline="always")
def write_rows(acct, m, l, nr, chk, on, lse_n, i0, has_sink, sink):
    """on[i0 + r, e] = acct[e, r] / l[r] and lse_n[i0 + r] = m[r] + log l[r] for r < nr; a row with l = 0
    (every key masked) gets zeros and lse = -inf. chk[r] += the written values·0 (for a fully masked
    row: its accumulator·0, NaN if a value row under a masked key held NaN/inf, as 0·v is NaN there).
    Returns how many rows have chk[r] ≠ 0 (a NaN/±inf query value, raw score or result).

    ``has_sink``: the learned sink logit ``sink`` joins each row's softmax as one more score with no
    value row (``_scores.add_sink``): m and l absorb it first, so a fully masked row gets zeros and
    lse = sink.
    """
    Ev = acct.shape[0]
    dt = acct.dtype
    zero = dt.type(0)
    n_bad = 0
    for r in range(nr):
        m_r, l_r, keep = m[r], l[r], dt.type(1.0)
        if has_sink:
            m_r, l_r, keep = add_sink(m_r, l_r, sink)
        if l[r] > 0:
            inv = keep / l_r
            c = zero
            for e in range(Ev):
                o = acct[e, r] * inv
                on[i0 + r, e] = o
                c += o * zero
            chk[r] += c
        else:
            c = zero
            for e in range(Ev):
                on[i0 + r, e] = 0.0
                c += acct[e, r] * zero
            chk[r] += c
        lse_n[i0 + r] = m_r + math.log(l_r) if l_r > 0 else -np.inf
        n_bad += 0 if chk[r] == zero else 1
    return n_bad


def _prefill_body(
    q,
    k,
    k_scales,
    k_block,
    v,
    v_scales,
    v_block,
    q_idx,
    k_idx,
    v_idx,
    kv_len,
    mask,
    m_idx,
    mask_kind,
    mask_li,
    mask_sj,
    is_causal,
    pos_offset,
    window,
    slopes,
    sinks,
    softcap,
    scale,
    block_q,
    block_k,
    check_finite,
    score_features,
    out,
    lse,
    check,
    w_begin,
    w_end,
):
    """out[n] = softmax(z)·v[v_idx[n]] with z as in ``_scores`` for the work items w_begin ≤ w < w_end
    (w = n·⌈L / block_q⌉ + query block); see module doc.

    q (Nq, L, E), k (Nk, ≥S, E), v (Nv, ≥S, Ev): C-contiguous, the first kv_len = S rows of k and v
    are the keys (the rest may be a KV cache's free slots); k and v may be quantised (int8, or uint8
    4-bit codes (…, E/2)) with ``k_scales``/``k_block``, ``v_scales``/``v_block`` as the decode kernel
    takes them (ignored for float storage: block 0); q_idx/k_idx/v_idx/m_idx (N,) map each
    output batch entry to its operands; mask (Nm, L or 1, S or 1), read at
    [m_idx[n], i·mask_li, j·mask_sj]; slopes (N,) or (0,) for no
    ALiBi; sinks (N,) learned sink logits or (0,) for none (``_scores.add_sink``); window 0 = none;
    softcap 0 = none; query i sits at key position i + pos_offset. ``score_features``: None when there is
    no mask, ALiBi, soft-cap or window (the causal rule may apply), True otherwise: numba compiles the
    None build without the code of those features (its branch is pruned from the argument's type: ~2 s
    less of the first prefill's compile); the None build raises if it meets one of them.
    ``check_finite``: ``check[w]`` (one int64 per work item) counts the query rows whose query,
    raw scores (before masks: NaN or ±inf from a non-finite query or key, or an overflow) or
    result are not all finite; each check adds x·0 (0, or NaN for NaN and ±inf) into a per-row sum
    inside a loop that already reads x, so no pass of its own over Q, K or V.

    Per work item (batch entry n, query rows [i0, i1)): load the query block; for each visible key
    block: scores, (check and) adjust them, online-softmax step, rescale the accumulator, add P·V;
    then write the rows.
    """
    _, L, Ev = out.shape
    E = q.shape[2]
    S = kv_len
    dt = out.dtype
    nqb = (L + block_q - 1) // block_q
    has_alibi = slopes.shape[0] > 0
    has_sink = sinks.shape[0] > 0
    row_tile = tile_rows(out)  # W for float32 arithmetic, 0 where no register tile applies
    refuse_unbuilt_features(score_features, has_alibi, softcap, window, mask_kind)
    for w in range(w_begin, w_end):
        n = w // nqb
        i0 = (w % nqb) * block_q
        i1 = min(L, i0 + block_q)
        nr = i1 - i0
        # the item's rows in n_tiles groups of tw rows: one register tile's rows each (float32), or
        # all rows at once; a group's query block, accumulator and scores are contiguous arrays of
        # tw-row lines, so the micro-kernels stream them with unit stride
        tw = row_tile if row_tile > 0 else nr
        n_tiles = (nr + tw - 1) // tw
        kn = k[k_idx[n]]
        vn = v[v_idx[n]]
        ksn = k_scales[k_idx[n] if k_block > 0 else 0]
        vsn = v_scales[v_idx[n] if v_block > 0 else 0]
        mask_n = mask[m_idx[n]]
        slope = slopes[n] if has_alibi else dt.type(0)
        chk = np.zeros(n_tiles * tw, dt)  # per row: 0 while every checked value is finite
        qt = np.zeros((n_tiles, E, tw), dt)  # scaled query rows, transposed per group; padding rows 0
        acct = np.zeros((n_tiles, Ev, tw), dt)  # output accumulators, transposed per group
        m = np.full(n_tiles * tw, -np.inf, dt)
        l = np.zeros(n_tiles * tw, dt)
        alpha = np.empty(n_tiles * tw, dt)
        m_blk = np.empty(n_tiles * tw, dt)
        st = np.empty((block_k, tw), dt)  # one group's scores, then probabilities, keys × rows
        k_conv = np.empty((block_k, E), dt)  # float16/quantised key/value blocks, converted (unused for floats)
        v_conv = np.empty((block_k, Ev), dt)
        for t in range(n_tiles):
            r0 = t * tw
            load_scaled_query_block(q[q_idx[n]], i0 + r0, min(tw, nr - r0), scale, qt[t], chk[r0:])
        kv_begin, kv_end = visible_key_range(i0, i1, S, is_causal, pos_offset, window)
        for j0 in range(kv_begin, kv_end, block_k):
            nk = min(block_k, kv_end - j0)
            k_rows, k_off = dequantised_rows(kn, ksn, k_block, j0, nk, k_conv)
            v_rows, v_off = dequantised_rows(vn, vsn, v_block, j0, nk, v_conv)
            for t in range(n_tiles):
                r0 = t * tw
                it0 = i0 + r0
                nr_t = min(tw, nr - r0)  # the group's rows of the output
                # rows computed: the whole group (the padding rows hold zero queries and are never
                # written); float64 has one group of all the rows
                nc = tw
                # the keys of this block that the group's rows can see (causal: fewer near the diagonal)
                vis_begin, vis_end = visible_key_range(it0, it0 + nr_t, S, is_causal, pos_offset, window)
                nk_t = min(nk, vis_end - j0)
                if nk_t <= 0 or j0 + nk_t <= vis_begin:
                    continue
                group_scores(qt[t], k_rows, k_off, nk_t, st, nc)
                diagonal = is_causal and j0 + nk_t - 1 > it0 + pos_offset
                raw = not (has_alibi or softcap > 0 or window > 0 or diagonal or mask_kind != MASK_NONE)
                if not raw:
                    if check_finite:  # check before masks write their -inf (padding rows: zero scores)
                        check_score_block(st, nk_t, nc, chk[r0:])
                    if score_features is not None:  # None: compiled without them (see above)
                        adjust_score_block(
                            st,
                            nk_t,
                            nr_t,
                            nc,
                            it0,
                            j0,
                            pos_offset,
                            diagonal,
                            has_alibi,
                            slope,
                            softcap,
                            window,
                            mask_n,
                            mask_kind,
                            mask_li,
                            mask_sj,
                        )
                    elif diagonal:
                        hide_above_diagonal(st, nk_t, nc, it0, j0, pos_offset)
                softmax_step(st, nk_t, nc, m[r0:], l[r0:], alpha[r0:], m_blk[r0:], chk[r0:], check_finite and raw)
                rescale_accumulator(acct[t], alpha[r0:], nc)
                group_values(st, v_rows, v_off, nk_t, acct[t], nc)
        sink = sinks[n] if has_sink else dt.type(0)
        n_bad = 0
        for t in range(n_tiles):
            r0 = t * tw
            nr_t = min(tw, nr - r0)
            n_bad += write_rows(acct[t], m[r0:], l[r0:], nr_t, chk[r0:], out[n], lse[n], i0 + r0, has_sink, sink)
        check[w] = n_bad if check_finite else 0


# the work items, compiled once and called by both builds below (see ``_prefill_launch``)
_prefill_items = callee(_prefill_body)
_call_prefill_items = shared(_prefill_items, "_prefill_items")


def _prefill_launch(
    q,
    k,
    k_scales,
    k_block,
    v,
    v_scales,
    v_block,
    q_idx,
    k_idx,
    v_idx,
    kv_len,
    mask,
    m_idx,
    mask_kind,
    mask_li,
    mask_sj,
    is_causal,
    pos_offset,
    window,
    slopes,
    sinks,
    softcap,
    scale,
    block_q,
    block_k,
    check_finite,
    score_features,
    out,
    lse,
    check,
):
    """The prefill kernel: ``_prefill_body`` over every work item, one ``prange`` step each.

    The loop holds nothing but the call: numba's parfor passes and LLVM then see a few statements
    instead of the whole inlined body, and the parallel and serial builds share one compiled body
    (``_prefill_items``), which cut the first float32 prefill in a fresh process from ~33 s of
    compiling to a fraction of that. A call per work item (≥ 128 query rows × all keys) costs
    nothing measurable.
    """
    N, L, _ = out.shape
    n_items = N * ((L + block_q - 1) // block_q)
    fixed = (
        q,
        k,
        k_scales,
        k_block,
        v,
        v_scales,
        v_block,
        q_idx,
        k_idx,
        v_idx,
        kv_len,
        mask,
        m_idx,
        mask_kind,
        mask_li,
        mask_sj,
        is_causal,
        pos_offset,
        window,
        slopes,
        sinks,
        softcap,
        scale,
        block_q,
        block_k,
        check_finite,
        score_features,
        out,
        lse,
        check,
    )
    for w in prange(n_items):
        item = np.int64(w)  # the parallel build's index is unsigned: one signature for both builds
        _call_prefill_items(fixed, (item, item + 1))
    return count_flagged(check)


prefill_parallel = njit(parallel=True, fastmath=config.FASTMATH, error_model=config.ERROR_MODEL, cache=config.CACHE)(
    variant(_prefill_launch, "_parallel")
)
prefill_serial = njit(parallel=False, fastmath=config.FASTMATH, error_model=config.ERROR_MODEL, cache=config.CACHE)(
    variant(_prefill_launch, "_serial")
)
