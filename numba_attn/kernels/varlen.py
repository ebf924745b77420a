"""Packed ("varlen") attention: a batch of sequences of different lengths, no padding, no L×S matrix.

Layout (flash-attention's ``flash_attn_varlen_func``): the queries of all sequences are stacked into
one ``(total_q, H, E)`` array, the keys and values into ``(total_k, H_kv, E)`` and
``(total_k, H_kv, Ev)``; sequence b owns query rows ``cu_q[b] : cu_q[b+1]`` (L_b of them) and key
rows ``cu_k[b] : cu_k[b+1]`` (S_b). Query head h reads key/value head h // (H / H_kv) (grouped-query
attention when H_kv < H).

Maths, for sequence b, head h and its query row i (local index, 0 ≤ i < L_b), s = scale:

    z_ij = s·q_i·k_j, adjusted as in ``_scores`` (soft-cap, ALiBi, window, causal) with local key
           index j < S_b and query position p_i = i + pos_offset_b, where pos_offset_b = 0 for
           ``upper_left`` and S_b − L_b otherwise (``lower_right``, or no causal rule: ALiBi's
           positions, as in ``scaled_dot_product_attention``)
    o_i  = Σ_j exp(z_ij − m_i)·v_j / Σ_j exp(z_ij − m_i),   lse_i = m_i + log Σ_j exp(z_ij − m_i)

exactly what ``prefill`` computes for one (L_b, S_b) problem: a row that sees no key (S_b = 0, or
all hidden) gets zeros and lse = −inf.

Work split: one work item is (sequence b, head h, block of at most BLOCK_Q query rows of b); the
items are listed in a table made on the host (``numba_attn.varlen.work_table``), so the total work is
Σ_b H·L_b·S_b (halved by a causal rule), not B·H·max L·max S as with padding. The table is cut
into ``n_bins`` bins of about equal cost (items dealt largest first, in a snake order) and the
``prange`` runs over bins, each bin's items one after another: with as many bins as threads, each
thread gets one bin whatever the spread of the lengths.

Per item, the prefill kernel's steps in its order (``prefill.load_scaled_query_block``,
``scores_block``, ``check_score_block``, ``adjust_score_block``, ``online_softmax_block``,
``rescale_accumulator``, ``accumulate_values``, ``write_rows``) on key blocks of BLOCK_K keys; key
blocks that the causal rule or the window hides from every row of the item are never visited
(``_scores.visible_key_range``). Query rows are read in place (a strided view of head h); each key
and value block is gathered into a contiguous BLOCK_K × E scratch first (float16 storage:
converted on the way, as ``_load.rows_for_compute`` does), so the register-tiled float32
micro-kernels (which need C-contiguous rows) run on it; the gather costs E loads per key against
BLOCK_Q·E multiply-adds. Results are written in place into ``out[:, h]`` and ``lse[:, h]``.

Rows per item: the micro-kernels cover query rows in groups of W (``_prefill_tiles.W``: 64 with
AVX-512) and leave the rest to plain loops, which ran 4-7× slower per row here (1 thread, on a
busy machine, so ratios only: 32 sequences of 32 rows 7 GFLOP/s, of 64 rows 48 GFLOP/s). Sequences
are short, so most items end in such a remainder: an item computes its rows rounded up to a
multiple of W (``row_tile``) when the remainder is at least W/8 rows, the extra rows holding zero
queries (their results are never written), which costs at most 8× the remainder's multiply-adds
at tile speed.

Memory per bin (float32, BLOCK_Q = BLOCK_K = 128, E = Ev = 64): the scaled query block and the
output accumulator, transposed (E × BLOCK_Q, 32 KiB each), the score block (BLOCK_K × BLOCK_Q,
64 KiB) and the two key/value scratch blocks (BLOCK_K × E, 32 KiB each), allocated once per bin and
reshaped per item: O(threads·block·D), independent of the lengths.

Non-finite check, when asked: as in ``prefill`` (query block, raw scores, results; ``check[t]``
counts the rows of table entry t that saw a NaN/±inf), see ``api._run``.
"""

import numpy as np
from numba import njit, prange

from .. import config
from . import variant
from ._link import callee, shared
from ._load import load
from ._scores import MASK_NONE, visible_key_range
from .prefill import (
    accumulate_values,
    adjust_score_block,
    check_score_block,
    load_scaled_query_block,
    online_softmax_block,
    rescale_accumulator,
    scores_block,
    write_rows,
)


@njit(fastmath=config.FASTMATH, cache=config.CACHE, inline="always")
def packed_rows(x, head, j0, n, scratch):
    """(scratch, 0) with scratch[j] = x[j0 + j, head] (j < n) in the compute dtype: rows of one head of
    a packed (tokens, heads, D) array gathered into a C-contiguous block, float16 bits converted on the
    way (``_load.load``; the row loop of ``_load.rows_for_compute``, on rows that ``x[t, head]`` gives
    as contiguous vectors, so both the copy and the conversion vectorise)."""
    for j in range(n):
        src = x[j0 + j, head]
        dst = scratch[j]
        for d in range(src.shape[0]):
            dst[d] = load(src[d])
    return scratch, 0


def _varlen_body(
    q,
    k,
    v,
    cu_q,
    cu_k,
    items,
    bin_start,
    group,
    is_causal,
    upper_left,
    window,
    slopes,
    sinks,
    softcap,
    scale,
    block_q,
    block_k,
    row_tile,
    check_finite,
    out,
    lse,
    check,
    w_begin,
    w_end,
):
    """out[cu_q[b] + i, h] = softmax(z)·v for the table entries of bins w_begin ≤ w < w_end; see module doc.

    q (total_q, H, E), k (total_k, H_kv, E), v (total_k, H_kv, Ev): C-contiguous, float32/float64 or
    float16 bits; cu_q, cu_k (B + 1,) int64 offsets; items (n_items, 3) int64 rows (b, h, i0) with
    i0 the first local query row of the item (it covers rows i0 … min(L_b, i0 + block_q) − 1);
    bin_start (n_bins + 1,): bin w runs items bin_start[w] … bin_start[w+1] − 1; group = H / H_kv;
    upper_left: query i sits at key position i (causal ``upper_left``), else at i + S_b − L_b (the
    ``lower_right`` alignment, and the ALiBi positions without a causal rule); window 0 = none;
    slopes (H,) or (0,) for no ALiBi; sinks (H,) learned sink logits or (0,) for none; softcap 0 = none;
    row_tile: query rows of the register tile
    (``_prefill_tiles.W`` for float32, 1 where there is no tile). out (total_q, H, Ev) and lse
    (total_q, H) in the arithmetic's dtype; check (n_items,) int64.
    """
    E = q.shape[2]
    Ev = v.shape[2]
    dt = out.dtype
    has_alibi = slopes.shape[0] > 0
    has_sink = sinks.shape[0] > 0
    no_mask = np.zeros((1, 1), dt)
    cap = (block_q + row_tile - 1) // row_tile * row_tile  # most rows an item computes
    for w in range(w_begin, w_end):
        # scratch of the largest item, reshaped per item (the micro-kernels want C-contiguous blocks)
        qt_buf = np.empty(E * cap, dt)
        acc_buf = np.empty(Ev * cap, dt)
        st_buf = np.empty(block_k * cap, dt)
        chk_buf = np.empty(cap, dt)
        m_buf = np.empty(cap, dt)
        l_buf = np.empty(cap, dt)
        alpha_buf = np.empty(cap, dt)
        m_blk_buf = np.empty(cap, dt)
        k_conv = np.empty((block_k, E), dt)
        v_conv = np.empty((block_k, Ev), dt)
        for t in range(bin_start[w], bin_start[w + 1]):
            b = items[t, 0]
            h = items[t, 1]
            i0 = items[t, 2]
            q_begin = cu_q[b]
            k_begin = cu_k[b]
            L = cu_q[b + 1] - q_begin
            S = cu_k[b + 1] - k_begin
            i1 = min(L, i0 + block_q)
            nr = i1 - i0
            # rows computed: nr, or up to the next multiple of the register tile's rows when that
            # remainder is at least 1/8 of a tile (the extra rows hold zero queries and are not written)
            rem = nr % row_tile
            nc = nr + row_tile - rem if rem > 0 and 8 * rem >= row_tile else nr
            pos_offset = 0 if upper_left else S - L
            hk = h // group
            qn = q[:, h, :]  # head h of every token: rows strided by H·E, read in place
            slope = slopes[h] if has_alibi else dt.type(0)
            qt = qt_buf[: E * nc].reshape((E, nc))
            acct = acc_buf[: Ev * nc].reshape((Ev, nc))
            st = st_buf[: block_k * nc].reshape((block_k, nc))
            chk = chk_buf[:nc]
            m = m_buf[:nc]
            l = l_buf[:nc]
            alpha = alpha_buf[:nc]
            m_blk = m_blk_buf[:nc]
            acct[:] = 0
            m[:] = -np.inf
            l[:] = 0
            if nc > nr:
                qt[:, nr:] = 0
                chk[nr:] = 0
            load_scaled_query_block(qn, q_begin + i0, nr, scale, qt, chk)
            kv_begin, kv_end = visible_key_range(i0, i1, S, is_causal, pos_offset, window)
            for j0 in range(kv_begin, kv_end, block_k):
                nk = min(block_k, kv_end - j0)
                k_rows, k_off = packed_rows(k, hk, k_begin + j0, nk, k_conv)
                scores_block(qt, k_rows, k_off, nk, st, nc)
                diagonal = is_causal and j0 + nk - 1 > i0 + pos_offset
                raw = not (has_alibi or softcap > 0 or window > 0 or diagonal)
                if not raw:
                    if check_finite:  # check before the adjustments write their -inf
                        check_score_block(st, nk, nc, chk)
                    adjust_score_block(
                        st,
                        nk,
                        nc,
                        nc,
                        i0,
                        j0,
                        pos_offset,
                        diagonal,
                        has_alibi,
                        slope,
                        softcap,
                        window,
                        no_mask,
                        MASK_NONE,
                        0,
                        0,
                    )
                online_softmax_block(st, nk, nc, m, l, alpha, m_blk, chk, check_finite and raw)
                rescale_accumulator(acct, alpha, nc)
                v_rows, v_off = packed_rows(v, hk, k_begin + j0, nk, v_conv)
                accumulate_values(st, v_rows, v_off, nk, acct, nc)
            sink = sinks[h] if has_sink else dt.type(0)
            n_bad = write_rows(acct, m, l, nr, chk, out[:, h, :], lse[:, h], q_begin + i0, has_sink, sink)
            check[t] = n_bad if check_finite else 0


# the bins' work, compiled once and called by both builds below (see ``prefill._prefill_launch``)
_varlen_items = callee(_varlen_body)
_call_varlen_items = shared(_varlen_items, "_varlen_items")


def _varlen_launch(
    q,
    k,
    v,
    cu_q,
    cu_k,
    items,
    bin_start,
    group,
    is_causal,
    upper_left,
    window,
    slopes,
    sinks,
    softcap,
    scale,
    block_q,
    block_k,
    row_tile,
    check_finite,
    out,
    lse,
    check,
):
    """The varlen kernel: ``_varlen_body`` for each bin, one ``prange`` step each (see ``prefill._prefill_launch``)."""
    fixed = (
        q,
        k,
        v,
        cu_q,
        cu_k,
        items,
        bin_start,
        group,
        is_causal,
        upper_left,
        window,
        slopes,
        sinks,
        softcap,
        scale,
        block_q,
        block_k,
        row_tile,
        check_finite,
        out,
        lse,
        check,
    )
    for w in prange(bin_start.shape[0] - 1):
        b = np.int64(w)  # the parallel build's index is unsigned: one signature for both builds
        _call_varlen_items(fixed, (b, b + 1))


varlen_parallel = njit(parallel=True, fastmath=config.FASTMATH, error_model=config.ERROR_MODEL, cache=config.CACHE)(
    variant(_varlen_launch, "_parallel")
)
varlen_serial = njit(parallel=False, fastmath=config.FASTMATH, error_model=config.ERROR_MODEL, cache=config.CACHE)(
    variant(_varlen_launch, "_serial")
)
