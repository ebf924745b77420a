"""Split-K decode attention (flash-decoding): a few query rows against a long run of keys.

Keys and values may be quantised (int8 or 4-bit): its inner loops dequantise one key or value row
at a time in registers (``quantised.block_scores``/``block_values``). Where several query rows share
the keys (a GQA group, a few query tokens), keys stored as int8, 4-bit or float16 are converted once
per VW keys into a float32 scratch and scored for every row from L1 (``_decode_tiles.rows_as_float32``,
the prefill's conversion). Longer queries over quantised keys take the prefill kernel, which
dequantises each block once (``quantised.dequantised_rows``).

Decode reads every cached key and value once per step and does little arithmetic on each: it is
bound by memory bandwidth, so the design goals are (1) read K and V once, (2) keep every core
reading.

(1) Grouped-query attention: the g query heads that share a key/value head are processed together,
    as R = g·L rows against one pass over that head's K and V.
(2) The key range [0, S) is cut into ``n_split`` contiguous parts; work item = (KV group, chunk of
    ``row_chunk`` rows, part), so
    one sequence with 8 heads still feeds 2 or 32 cores. Each part keeps its own streaming-softmax
    state for its R rows (running max m, sum l, accumulator acc, as in the prefill kernel) and the
    parts are merged exactly:

        M = max_s m_s,   l = Σ_s l_s·exp(m_s - M),   out = Σ_s acc_s·exp(m_s - M) / l,
        lse = M + log l

Scores: float32 queries take ``_decode_tiles.key_scores`` (VW keys at a time, no horizontal sum per key);
otherwise dot products over E. Softmax vectorised along the keys; P·V in ``_decode_tiles`` register tiles
(float32) or loops vectorised along the value columns. Key block: ``block_k`` keys (scores block
R × block_k).

Finite check without a second pass: instead of scanning K and V up front (a second read of a
cache that does not fit in L3 would double the time of a memory-bound step), each work item counts
its query values and raw scores that are NaN or ±inf (a key or the query held NaN/inf, or a score
overflowed) and whether its accumulator is finite (a value row it read held NaN/inf: even under a
masked key, as 0·inf is NaN); the caller checks those counts and the result.

Memory: partial results G·n_split·R·(Ev + 2) floats, plus per work item the R × block_k score block
and R × Ev accumulator; independent of S.
"""

import math

import numpy as np
from numba import njit, prange, types
from numba.extending import overload

from .. import config
from . import variant
from ._link import callee, shared
from ._load import load
from ._math import exp_nonpositive, fast_exp
from ._scores import (
    add_sink,
    adjust_scores_line,
    count_flagged,
    hide_causal_line,
    refuse_unbuilt_features,
    visible_key_range,
)
from .hadamard import _row, _scale_for
from .quantised import block_scores, block_values


@njit(fastmath=config.FASTMATH, cache=config.CACHE, inline="always")
def query_position_range(r0, nr, L):
    """[i_lo, i_hi): the query positions i = r % L of the item's rows r0 ≤ r < r0 + nr (row r is query
    position r % L of head r // L of the group)."""
    i_lo = L
    i_hi = 0
    for r in range(r0, r0 + nr):
        i_lo = min(i_lo, r % L)
        i_hi = max(i_hi, r % L + 1)
    return i_lo, i_hi


@njit(fastmath=config.FASTMATH, cache=config.CACHE, inline="always")
def load_query_rows(q, q_idx, group, r0, nr, L, scale, q_rotation, qs):
    """qs[r] = scale·q[q_idx[group[(r0 + r) // L]], (r0 + r) % L] for r < nr (the item's query rows,
    converted from their storage); with a ``q_rotation`` block (not None), scale·H·q (``_load_query_row``).
    Returns Σ q·0 over the rows read: 0, or NaN once a query value is NaN or ±inf."""
    q_chk = qs.dtype.type(0)
    for r in range(nr):
        q_chk += _load_query_row(q[q_idx[group[(r0 + r) // L]], (r0 + r) % L], qs, r, scale, q_rotation)
    return q_chk


def _load_query_row(qrow, qs, r, scale, q_rotation):  # pragma: no cover - numba overload below
    raise TypeError("_load_query_row is a numba kernel helper: call it from @njit code")


@overload(_load_query_row, inline="always")
def _load_query_row_overload(qrow, qs, r, scale, q_rotation):
    """qs[r] = scale·qrow; or, for a ``q_rotation`` block (an int, not None: a KV cache storing its keys
    Hadamard-rotated), scale·H·qrow: ``hadamard._row`` on the loaded row, then the scale (the arithmetic
    of rotating the query before the call). A type-level choice: a cache that rotates nothing compiles
    no rotation code. Returns Σ qrow·0."""
    if isinstance(q_rotation, types.NoneType):

        def impl_plain(qrow, qs, r, scale, q_rotation):
            zero = qs.dtype.type(0)
            q_chk = zero
            for d in range(qs.shape[1]):
                x = load(qrow[d])
                qs[r, d] = x * scale
                q_chk += x * zero
            return q_chk

        return impl_plain

    def impl_rotated(qrow, qs, r, scale, q_rotation):
        zero = qs.dtype.type(0)
        q_chk = zero
        for d in range(qs.shape[1]):
            x = load(qrow[d])
            qs[r, d] = x
            q_chk += x * zero
        _row(qs, qs, r, q_rotation, _scale_for(qs, q_rotation))
        for d in range(qs.shape[1]):
            qs[r, d] = qs[r, d] * scale
        return q_chk

    return impl_rotated


@njit(fastmath=config.FASTMATH, cache=config.CACHE, inline="always")
def count_nonfinite(srow, nk):
    """How many of srow[:nk] are NaN or ±inf (a NaN fails every compare)."""
    pos_inf = srow.dtype.type(np.inf)
    n_bad = 0
    for j in range(nk):
        n_bad += 0 if abs(srow[j]) < pos_inf else 1
    return n_bad


@njit(fastmath=config.FASTMATH, cache=config.CACHE, inline="always")
def streaming_softmax_row(srow, nk, m, l, r, arow):
    """Streaming-softmax step for query row r over one key block srow[:nk], in place (vectorised along
    the keys): m' = max(m[r], max_j srow[j]), srow[j] ← exp(srow[j] - m'), l[r] ← α·l[r] + Σ_j srow[j],
    arow ← α·arow with α = exp(m[r] - m'), m[r] ← m'. While every score so far is -inf the shift is 0
    (exp(-inf - 0) = 0, never exp(-inf - -inf) = NaN) and m[r] stays -inf."""
    neg_inf = srow.dtype.type(-np.inf)
    zero = srow.dtype.type(0)
    mx = neg_inf
    for j in range(nk):
        mx = max(mx, srow[j])
    m_new = max(m[r], mx)
    shift = m_new if m_new > neg_inf else zero
    alpha = exp_nonpositive(m[r] - shift)
    total = zero
    for j in range(nk):
        p = exp_nonpositive(srow[j] - shift)
        srow[j] = p
        total += p
    l[r] = l[r] * alpha + total
    m[r] = m_new
    for e in range(arow.shape[0]):
        arow[e] *= alpha


@njit(fastmath=config.FASTMATH, cache=config.CACHE, inline="always")
def nonfinite_sum(acc):
    """Σ acc·0 over the accumulator: 0, or NaN if it holds NaN/±inf (0·v under masked keys is NaN for a
    non-finite value row v, also in parts the merge skips because their l = 0)."""
    zero = acc.dtype.type(0)
    total = zero
    for r in range(acc.shape[0]):
        for e in range(acc.shape[1]):
            total += acc[r, e] * zero
    return total


def _decode_body(
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
    groups,
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
    row_chunk,
    n_split,
    block_k,
    score_features,
    q_rotation,
    out,
    lse,
    check,
    part_acc,
    part_m,
    part_l,
    w_begin,
    w_end,
):
    """The work items w_begin ≤ w < w_end of the attention for out[groups[g, t]] (all t share
    k[k_idx[...]], v[v_idx[...]]), each into its slice of the parts ``part_acc``/``part_m``/``part_l``
    that ``_decode_merge`` combines; see module doc.

    Same arguments as the prefill kernel (``sinks`` enter in the merge), plus: ``groups`` (G, g), the
    output batch entries that read the same key/value entry; ``k_scales``/``v_scales`` (N, ≥S, blocks)
    float32 for int8 keys/values, (N, ≥S, 2·blocks) float16 bits (step, min) for 4-bit ones (uint8, two
    codes per byte), and ``k_block``/``v_block`` (ignored for float ones); ``row_chunk``: query rows per
    work item; ``n_split``: parts of the key range; ``score_features``: None when there is no mask, ALiBi,
    soft-cap or window (as the prefill kernel's: that build is compiled without their code and raises
    if it meets one), True otherwise; ``q_rotation``: None, or the Hadamard block of a KV cache that
    stores its keys rotated: the query rows are rotated as they are loaded (``load_query_rows``).
    Storage may be float32/float64, uint16 (float16 bits), int8 or uint8 (4-bit codes); the arithmetic
    runs in ``out.dtype``. ``check``
    (G·n_chunks·n_split,) int64: per work item, how many of its raw scores (before masks) are NaN or
    ±inf (a key or the query held NaN/inf, or a score overflowed), whether its query rows or
    accumulator are not finite; ``check[0]`` also
    counts the result rows that are not finite (the merge checks them as it writes them).

    Per work item (KV group g, rows [r0, r0 + nr), key part sp): load the query rows; for each key
    block of the part: scores, then per row: count non-finite raw scores, adjust them
    (``_scores.adjust_scores_line`` along the keys), streaming-softmax step; then P·V. The parts
    are stored and merged per row at the end.
    """
    _, L, Ev = out.shape
    E = q.shape[2]
    S = kv_len
    gsize = groups.shape[1]
    R = gsize * L
    dt = out.dtype
    neg_inf = dt.type(-np.inf)
    zero = dt.type(0)
    has_alibi = slopes.shape[0] > 0
    n_chunks = (R + row_chunk - 1) // row_chunk
    refuse_unbuilt_features(score_features, has_alibi, softcap, window, mask_kind)
    kv_begin, kv_end = visible_key_range(0, L, S, is_causal, pos_offset, window)
    span = kv_end - kv_begin
    split_len = (span + n_split - 1) // n_split if span > 0 else 0
    # the items' scratch, allocated once per call (the serial build runs every item in one call): each
    # item views its first nr rows (C-contiguous) and resets its running state (m, l, acc) below
    rc = min(R, row_chunk)
    qs_all = np.empty((rc, E), dt)
    acc_all = np.empty((rc, Ev), dt)
    m_all = np.empty(rc, dt)
    l_all = np.empty(rc, dt)
    s_all = np.empty((rc, block_k), dt)
    for w in range(w_begin, w_end):
        g = w // (n_chunks * n_split)
        r0 = ((w // n_split) % n_chunks) * row_chunk
        sp = w % n_split
        nr = min(R, r0 + row_chunk) - r0
        i_lo, i_hi = query_position_range(r0, nr, L)
        vis_begin, vis_end = visible_key_range(i_lo, i_hi, S, is_causal, pos_offset, window)
        j_begin = max(vis_begin, kv_begin + sp * split_len)
        j_end = min(vis_end, kv_begin + (sp + 1) * split_len)
        n0 = groups[g, 0]
        kn = k[k_idx[n0]]
        vn = v[v_idx[n0]]
        ksn = k_scales[k_idx[n0] if k_block > 0 else 0]
        vsn = v_scales[v_idx[n0] if v_block > 0 else 0]
        qs = qs_all[:nr]
        q_chk = load_query_rows(q, q_idx, groups[g], r0, nr, L, scale, q_rotation, qs)
        # this item's running state, private until the end: part_m/part_l hold one float per row, so
        # the rows of items on different threads share cache lines, and writing them once per key
        # block made the threads fight over those lines (false sharing)
        acc = acc_all[:nr]
        m = m_all[:nr]
        l = l_all[:nr]
        s = s_all[:nr]
        for r in range(nr):
            m[r] = neg_inf
            l[r] = zero
            for e in range(Ev):
                acc[r, e] = zero
        n_bad = 0
        for j0 in range(j_begin, j_end, block_k):
            nk = min(block_k, j_end - j0)
            block_scores(qs, kn, ksn, k_block, j0, nk, s)
            for r in range(nr):
                n = groups[g, (r0 + r) // L]
                srow = s[r]
                n_bad += count_nonfinite(srow, nk)
                if score_features is not None:  # None: compiled without them (see above)
                    adjust_scores_line(
                        srow,
                        nk,
                        (r0 + r) % L,
                        0,
                        j0,
                        1,
                        pos_offset,
                        is_causal,
                        has_alibi,
                        slopes[n] if has_alibi else zero,
                        softcap,
                        window,
                        mask[m_idx[n]],
                        mask_kind,
                        mask_li,
                        mask_sj,
                    )
                elif is_causal:
                    hide_causal_line(srow, nk, (r0 + r) % L, 0, j0, 1, pos_offset)
                streaming_softmax_row(srow, nk, m, l, r, acc[r])
            block_values(s, vn, vsn, v_block, j0, nk, acc)
        # element by element: a slice assignment compiles numba's shape-mismatch error message (~4 s)
        for r in range(nr):
            part_m[g, sp, r0 + r] = m[r]
            part_l[g, sp, r0 + r] = l[r]
            for e in range(Ev):
                part_acc[g, sp, r0 + r, e] = acc[r, e]
        check[w] = n_bad + (0 if q_chk == zero else 1) + (0 if nonfinite_sum(acc) == zero else 1)


_decode_items = callee(_decode_body)
_call_decode_items = shared(_decode_items, "_decode_items")


@callee
def _decode_merge(groups, L, sinks, part_acc, part_m, part_l, out, lse, check):
    """out and lse of every row from the parts of ``_decode_body``; adds to ``check[0]`` how many result
    rows are not finite. Row r of KV group g (query position i of batch entry n) over the key parts s
    with l_s > 0:

        M = max_s m_s,   l = Σ_s l_s·exp(m_s - M),   out[n, i] = Σ_s acc_s·exp(m_s - M) / l,
        lse = M + log l

    (zeros and lse = -inf if no part saw a visible key). With ``sinks``, the row's sink logit joins as
    one more part with l = 1 at m = sink and no value (``_scores.add_sink``): M ≥ sink, l gains
    exp(sink - M), a row without visible keys gets zeros and lse = sink.

    Written as one loop that indexes out and the parts in place: a row view, or an inlined helper
    taking the four arrays, costs two atomic reference-count operations (numba's NRT) per array and row,
    which a small decode call felt (~0.1 µs a row on Zen 1)."""
    G, gsize = groups.shape
    R = gsize * L
    n_split = part_m.shape[1]
    Ev = out.shape[2]
    zero = out.dtype.type(0)
    neg_inf = out.dtype.type(-np.inf)
    has_sink = sinks.shape[0] > 0
    # exact merge of the parts, on the calling thread: G·R·n_split·Ev multiply-adds, too few to pay
    # for a second parallel region (a call is one parallel launch), and the result's finite check
    # rides along (0·x is NaN for a NaN or ±inf result) instead of a scan of its own after the kernel
    bad_results = 0
    for t in range(G * R):
        g = t // R
        r = t % R
        n = groups[g, r // L]
        i = r % L
        big = neg_inf
        for sp in range(n_split):
            big = max(big, part_m[g, sp, r])
        total = zero
        for sp in range(n_split):
            if part_l[g, sp, r] > 0:
                total += part_l[g, sp, r] * fast_exp(part_m[g, sp, r] - big)
        if has_sink:
            big, total, _ = add_sink(big, total, sinks[n])
        for e in range(Ev):
            out[n, i, e] = zero
        lse[n, i] = neg_inf
        if total > 0:
            for sp in range(n_split):
                if part_l[g, sp, r] > 0:
                    wgt = fast_exp(part_m[g, sp, r] - big) / total
                    for e in range(Ev):
                        out[n, i, e] += wgt * part_acc[g, sp, r, e]
            lse[n, i] = big + math.log(total)
        c = zero
        for e in range(Ev):
            c += out[n, i, e] * zero
        bad_results += 0 if c == zero else 1
    check[0] += bad_results


_call_decode_merge = shared(_decode_merge)


def _decode_launch(
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
    groups,
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
    row_chunk,
    n_split,
    block_k,
    score_features,
    q_rotation,
    items_per_call,
    out,
    lse,
    check,
):
    """The decode kernel: ``_decode_body`` over every work item, one ``prange`` step each, then
    ``_decode_merge``. Both are compiled once and called, not inlined or linked, by the parallel
    and the serial build (``_link.shared``): see ``prefill._prefill_launch``. ``items_per_call``: work
    items per call of the body, 1 for the parallel build (one ``prange`` step each), all of them for the
    serial one (one call, one set of scratch arrays: a small decode step has a few work items of a
    few microseconds each). Every work item writes all of its parts' rows, so the parts need no
    initial values. Returns how many entries of ``check``
    are not 0 (the caller raises when one is; no numpy call after the kernel)."""
    _, L, Ev = out.shape
    G, gsize = groups.shape
    R = gsize * L
    n_items = G * ((R + row_chunk - 1) // row_chunk) * n_split
    part_acc = np.empty((G, n_split, R, Ev), out.dtype)
    part_m = np.empty((G, n_split, R), out.dtype)
    part_l = np.empty((G, n_split, R), out.dtype)
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
        groups,
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
        row_chunk,
        n_split,
        block_k,
        score_features,
        q_rotation,
        out,
        lse,
        check,
        part_acc,
        part_m,
        part_l,
    )
    n_calls = (n_items + items_per_call - 1) // items_per_call
    for c in prange(n_calls):
        w0 = np.int64(c) * items_per_call  # the parallel build's index is unsigned: one signature for both builds
        _call_decode_items(fixed, (w0, min(w0 + items_per_call, n_items)))
    _call_decode_merge((groups, L, sinks, part_acc, part_m, part_l, out, lse, check), ())
    return count_flagged(check)


decode_parallel = njit(parallel=True, fastmath=config.FASTMATH, error_model=config.ERROR_MODEL, cache=config.CACHE)(
    variant(_decode_launch, "_parallel")
)
decode_serial = njit(parallel=False, fastmath=config.FASTMATH, error_model=config.ERROR_MODEL, cache=config.CACHE)(
    variant(_decode_launch, "_serial")
)
