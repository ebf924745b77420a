"""What happens to a score between Q·Kᵀ and the softmax, shared by the prefill and decode kernels.

For query row i (at key position p_i = i + pos_offset) and key j, with s = scale·q_i·k_j:

    z = cap·tanh(s / cap)            if softcap cap > 0 (Gemma-2 style logit soft-capping)
    z = z - slope_h·|p_i - j|        if ALiBi slopes are given (per head h)
    z = z + M_ij                     if a float mask is given; z = -inf where a boolean mask is False
    z = -inf                         if causal and j > p_i, or windowed and j <= p_i - window
"""
import numpy as np
from numba import njit

from .. import config
from ._math import fast_exp

MASK_NONE, MASK_BOOL, MASK_ADD = 0, 1, 2


@njit(fastmath=config.FASTMATH, cache=config.CACHE, inline="always")
def adjust_score(x, qpos, kpos, slope, softcap, window):
    """Soft-cap, ALiBi bias and the sliding window for one score (masks and causality elsewhere).

    tanh(y) is computed as 1 - 2/(exp(2y) + 1) with the vectorising ``fast_exp``.
    """
    if softcap > 0:
        x = softcap - 2 * softcap / (fast_exp(2 * x / softcap) + 1)
    x -= slope * abs(qpos - kpos)
    if window > 0 and kpos <= qpos - window:
        x = -np.inf
    return x


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
