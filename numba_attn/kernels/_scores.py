"""What happens to a score between Q·Kᵀ and the softmax, shared by the prefill and decode kernels.

For query row i (at key position p_i = i + pos_offset) and key j, with s = scale·q_i·k_j:

    z = cap·tanh(s / cap)            if softcap cap > 0 (Gemma-2 style logit soft-capping)
    z = z - slope_h·|p_i - j|        if ALiBi slopes are given (per head h)
    z = z + M_ij                     if a float mask is given; z = -inf where a boolean mask is False
    z = -inf                         if causal and j > p_i, or windowed and j <= p_i - window

applied in that order (the causal rule last, so it wins over anything a mask added).

A learned sink (gpt-oss; ggml's and ONNX Runtime's ``sinks``/``head_sink``) is one more logit per head,
taken as it is (no scale, cap, bias or mask), that joins each row's softmax denominator and has no
value row: o_i = Σ_j exp(z_ij)·v_j / (exp(sink_h) + Σ_j exp(z_ij)), lse_i = log(exp(sink_h) + Σ_j exp(z_ij)).
The kernels fold it into the finished row's (m, l) once (``add_sink``): no work per key.

The kernels hold their scores in different layouts (prefill: keys × query rows, ``st[j, r]``;
decode: query rows × keys, ``s[r, j]``) and want every loop to run along the contiguous axis. So
the rules are written once for a *line* of scores: x[t], t < count, is the score of query row
i0 + di·t and key j0 + dj·t, with (di, dj) = (1, 0) for a prefill row (one key, consecutive query
rows) and (0, 1) for a decode row (one query row, consecutive keys). The steps are inlined with
those constants, so each loop compiles to the same vectorised loop a hand-written one would.
Decode applies all steps to one row at a time (``adjust_scores_line``); prefill runs each step over
its whole block before the next (one loop nest per step: with all steps in one pass over the keys,
LLVM left the ALiBi/window loop scalar).
"""

import math

import numpy as np
from numba import njit

from .. import config
from ._math import fast_exp

MASK_NONE, MASK_BOOL, MASK_ADD = 0, 1, 2


@njit(fastmath=config.FASTMATH, cache=config.CACHE, inline="always")
def add_sink(m, l, sink):
    """A row's streaming-softmax state (max m, sum l = Σ exp(z - m)) with the sink logit added:
    (m', l', keep) with m' = max(m, sink), keep = exp(m - m') (what the row's accumulator is scaled by;
    0 when m = -inf: no visible key) and l' = l·keep + exp(sink - m')."""
    m_new = max(m, sink)
    keep = math.exp(m - m_new)
    return m_new, l * keep + math.exp(sink - m_new), keep


@njit(fastmath=config.FASTMATH, cache=config.CACHE, inline="always")
def visible_key_range(i0, i1, S, is_causal, pos_offset, window):
    """[begin, end) of the keys that at least one query row in [i0, i1) can see; the rest is skipped."""
    begin = 0
    end = S
    if is_causal:
        end = max(0, min(S, i1 + pos_offset))
        if window > 0:
            begin = min(end, max(0, i0 + pos_offset - window + 1))
    return begin, end


@njit(fastmath=config.FASTMATH, cache=config.CACHE, inline="always")
def adjust_score_line(x, count, i0, di, j0, dj, pos_offset, slope, softcap, window):
    """Soft-cap, ALiBi and the sliding window on the line x[t], t < count, the score of query row i0 + di·t
    (at key position i0 + di·t + pos_offset) and key j0 + dj·t: one pass along x per step that applies,
    each vectorised (masks and causality elsewhere).

    - soft-cap: x ← cap·tanh(x/cap), as cap - 2·cap/(exp(2x/cap) + 1) with the vectorising ``fast_exp``
      (2/cap once per line: one division per score);
    - ALiBi: x ← x - slope·|p - j|; along the line p - j = gap + (di - dj)·t, taken to float32 through int32
      (AVX2 converts no int64 vector to float: an int64 distance left the loop scalar); in the soft-cap's
      loop (slope 0: no ALiBi);
    - window: x ← -inf where j ≤ p - window, i.e. where gap + (di - dj)·t ≥ window: a prefix or a suffix of the
      line (``window_hidden_span``), written without a test per score."""
    gap = i0 + pos_offset - j0  # query position - key position at t = 0
    step = di - dj
    if softcap > 0 or slope != 0:  # one loop for both (one vectorised loop compiles ~1 s faster than two)
        twice = softcap + softcap  # x + x, not 2 * x: an int times a float32 is float64 in numba
        scale = twice / (softcap * softcap) if softcap > 0 else softcap  # 2 / cap
        for t in range(count):
            y = x[t]
            if softcap > 0:
                y = softcap - twice / (fast_exp(y * scale) + 1)
            x[t] = y - slope * abs(np.float32(np.int32(gap + step * t)))
    if window > 0:
        lo, hi = window_hidden_span(count, gap, step, window)
        for t in range(lo, hi):
            x[t] = -np.inf


@njit(fastmath=config.FASTMATH, cache=config.CACHE, inline="always")
def window_hidden_span(count, gap, step, window):
    """[lo, hi): the t < count where the window hides the key, gap + step·t ≥ window (step ∈ {-1, 0, 1}:
    the distance from the query's position to the key's along a line, see ``adjust_score_line``)."""
    if step > 0:  # t ≥ window - gap
        return min(count, max(0, window - gap)), count
    if step < 0:  # t ≤ gap - window
        return 0, min(count, max(0, gap - window + 1))
    return 0, (count if gap >= window else 0)


@njit(fastmath=config.FASTMATH, cache=config.CACHE, inline="always")
def mask_score_line(x, count, mask_n, mask_kind, i0, di, j0, dj, mask_li, mask_sj):
    """Apply one batch entry's mask ``mask_n`` (L or 1, S or 1), read at [i·mask_li, j·mask_sj], to the line
    x[t] (query row i = i0 + di·t, key j = j0 + dj·t, t < count): -inf where a boolean mask is False,
    + M_ij for a float mask, nothing for ``MASK_NONE``."""
    if mask_kind == MASK_BOOL:
        for t in range(count):  # a select and an unconditional store: no branch per score
            x[t] = x[t] if mask_n[(i0 + di * t) * mask_li, (j0 + dj * t) * mask_sj] else -np.inf
    elif mask_kind == MASK_ADD:
        for t in range(count):
            x[t] += mask_n[(i0 + di * t) * mask_li, (j0 + dj * t) * mask_sj]


@njit(fastmath=config.FASTMATH, cache=config.CACHE, inline="always")
def mask_line_by_one(x, count, value, mask_kind):
    """x[t], t < count, scores that share one mask entry ``value`` (one key's scores for every query row,
    under a mask broadcast along the rows): all -inf where a boolean entry is False, all + value for a
    float one; nothing to do for True or 0. One test per line instead of one select per score (a select
    stored back into the scores compiles to a masked store, ``vmaskmovps``, slow on Zen 3)."""
    if mask_kind == MASK_BOOL:
        if not value:
            for t in range(count):
                x[t] = -np.inf
    elif mask_kind == MASK_ADD and value != 0:
        for t in range(count):
            x[t] += value


@njit(fastmath=config.FASTMATH, cache=config.CACHE, inline="always")
def causal_hidden_span(count, i0, di, j0, dj, pos_offset):
    """[lo, hi): the t < count whose key j0 + dj·t lies after the query position i0 + di·t + pos_offset,
    hidden by the causal rule. The line runs along one axis, (di, dj) ∈ {(1, 0), (0, 1)}, so the
    hidden part is a prefix (along query rows: rows before the key's position) or a suffix (along
    keys: keys after the row's position)."""
    gap = i0 + pos_offset - j0  # query position - key position at t = 0
    if dj > di:  # hidden where t > gap
        return min(count, max(0, gap + 1)), count
    if di > dj:  # hidden where t < -gap
        return 0, min(count, max(0, -gap))
    return 0, (count if gap < 0 else 0)


@njit(fastmath=config.FASTMATH, cache=config.CACHE, inline="always")
def adjust_scores_line(
    x, count, i0, di, j0, dj, pos_offset, causal, has_alibi, slope, softcap, window, mask_n, mask_kind, mask_li, mask_sj
):
    """Every rule of the module doc applied to the line x[t] = score of (query row i0 + di·t, key j0 + dj·t),
    t < count, in order: soft-cap/ALiBi/window, mask, then the causal rule if ``causal``. Each step
    that has nothing to do is skipped; each is one pass along x."""
    if has_alibi or softcap > 0 or window > 0:
        adjust_score_line(x, count, i0, di, j0, dj, pos_offset, slope, softcap, window)
    mask_score_line(x, count, mask_n, mask_kind, i0, di, j0, dj, mask_li, mask_sj)
    if causal:
        hide_causal_line(x, count, i0, di, j0, dj, pos_offset)


@njit(fastmath=config.FASTMATH, cache=config.CACHE, inline="always")
def hide_causal_line(x, count, i0, di, j0, dj, pos_offset):
    """x[t] = -inf where the causal rule hides key j0 + dj·t from query row i0 + di·t (``causal_hidden_span``)."""
    lo, hi = causal_hidden_span(count, i0, di, j0, dj, pos_offset)
    for t in range(lo, hi):
        x[t] = -np.inf


@njit(fastmath=config.FASTMATH, cache=config.CACHE, inline="always")
def refuse_unbuilt_features(score_features, has_alibi, softcap, window, mask_kind):
    """Raise where a kernel build compiled without the score adjustments (``score_features`` None, the
    prefill and decode kernels' plain build) is handed a call that has one: ALiBi, soft-cap, window or mask."""
    if score_features is None and (has_alibi or softcap > 0 or window > 0 or mask_kind != MASK_NONE):
        raise ValueError("attention kernel: score_features=None with a mask, ALiBi, soft-cap or window")


@njit(fastmath=config.FASTMATH, cache=config.CACHE, inline="always")
def count_flagged(check):
    """How many work items flagged a non-finite value (entries of ``check`` that are not 0)."""
    n = 0
    for i in range(check.shape[0]):
        n += 0 if check[i] == 0 else 1
    return n
