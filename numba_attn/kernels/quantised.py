"""int8 quantisation (symmetric, per row or per block along the last axis) and the int8 inner loops.

Scheme (ggml's q8_0 when block = 32): for each block b of ``block`` consecutive entries of a row,

    scale_b = max_{d∈b} |x_d| / 127,   q_d = clamp(rint(x_d / scale_b), -127, 127)   (scale_b = 0 → q = 0)
    x_d ≈ scale_b · q_d

``block = D`` (one block per row) is the "per row" scheme. Memory per row: D bytes + 4·ceil(D/block).

int8 × int8 dot products accumulate in int32 (``np.int32(acc + np.int32(a)·np.int32(b))`` each step:
written plainly numba widens to int64 and the loop compiles to ``vpmuldq``; forced to int32 LLVM
emits ``vpmaddwd``/``vpdpwssd`` on x86, ``sdot`` on Armv8.2+ and ``smull``/``sadalp`` on Cortex-A72).
"""
import numpy as np
from numba import njit, prange, types
from numba.extending import overload

from .. import config
from ._load import load


def _quantize_body(x, block, data, scales):
    """Quantise rows of x (M, D) (float32/float64/uint16 half bits) into data (M, D) int8, scales (M, nb)."""
    M, D = x.shape
    nb = scales.shape[1]
    for i in prange(M):
        for b in range(nb):
            d0 = b * block
            d1 = min(D, d0 + block)
            amax = np.float32(0)
            for d in range(d0, d1):
                amax = max(amax, abs(np.float32(load(x[i, d]))))
            s = amax / np.float32(127)
            scales[i, b] = s
            inv = np.float32(1) / s if s > 0 else np.float32(0)
            for d in range(d0, d1):
                y = np.rint(np.float32(load(x[i, d])) * inv)
                data[i, d] = np.int8(min(np.float32(127), max(np.float32(-127), y)))


quantize_rows = njit(parallel=True, cache=config.CACHE)(_quantize_body)


@njit(parallel=True, cache=config.CACHE)
def dequantize_rows(data, scales, block, out):
    """out (M, D) float32 = data · scale of its block."""
    M, D = data.shape
    for i in prange(M):
        for d in range(D):
            out[i, d] = np.float32(data[i, d]) * scales[i, d // block]


@njit(fastmath=config.FASTMATH, cache=config.CACHE, inline="always")
def quantize_row_into(x, block, data, scales):
    """One row (float) → int8 ``data`` and float32 ``scales`` (same scheme as ``quantize_rows``)."""
    D = x.shape[0]
    for b in range(scales.shape[0]):
        d0 = b * block
        d1 = min(D, d0 + block)
        amax = np.float32(0)
        for d in range(d0, d1):
            amax = max(amax, abs(np.float32(x[d])))
        s = amax / np.float32(127)
        scales[b] = s
        inv = np.float32(1) / s if s > 0 else np.float32(0)
        for d in range(d0, d1):
            y = np.rint(np.float32(x[d]) * inv)
            data[d] = np.int8(min(np.float32(127), max(np.float32(-127), y)))


@njit(cache=config.CACHE, inline="always")
def int8_dot(a, b, d0, d1):
    """Σ_{d0 ≤ d < d1} a[d]·b[d] for int8 a, b, accumulated in int32 (see the module doc)."""
    acc = np.int32(0)
    for d in range(d0, d1):
        acc = np.int32(acc + np.int32(a[d]) * np.int32(b[d]))
    return acc


def score_dot(q_row, q_data, q_scales, k_row, k_scales, block):  # pragma: no cover - numba overload below
    raise TypeError("score_dot is a numba kernel helper: call it from @njit code")


@overload(score_dot, fastmath=config.FASTMATH)
def _score_dot_overload(q_row, q_data, q_scales, k_row, k_scales, block):
    """q·k for one query row and one key row: int8 keys use the int8 copy of the query row."""
    if isinstance(k_row, types.Array) and k_row.dtype == types.int8:
        def impl_int8(q_row, q_data, q_scales, k_row, k_scales, block):
            E = k_row.shape[0]
            total = np.float32(0)
            for b in range(k_scales.shape[0]):
                d0 = b * block
                acc = int8_dot(q_data, k_row, d0, min(E, d0 + block))
                total += np.float32(acc) * (q_scales[b] * k_scales[b])
            return total
        return impl_int8

    def impl_float(q_row, q_data, q_scales, k_row, k_scales, block):
        a = q_row.dtype.type(0)
        for d in range(q_row.shape[0]):
            a += q_row[d] * load(k_row[d])
        return a
    return impl_float


def add_value(p, v_row, v_scales, block, acc):  # pragma: no cover - numba overload below
    raise TypeError("add_value is a numba kernel helper: call it from @njit code")


@overload(add_value, fastmath=config.FASTMATH)
def _add_value_overload(p, v_row, v_scales, block, acc):
    """acc += p · v (int8 values dequantised on the fly, block by block)."""
    if isinstance(v_row, types.Array) and v_row.dtype == types.int8:
        def impl_int8(p, v_row, v_scales, block, acc):
            Ev = v_row.shape[0]
            for b in range(v_scales.shape[0]):
                pb = p * v_scales[b]
                for e in range(b * block, min(Ev, (b + 1) * block)):
                    acc[e] += pb * np.float32(v_row[e])
        return impl_int8

    def impl_float(p, v_row, v_scales, block, acc):
        for e in range(acc.shape[0]):
            acc[e] += p * load(v_row[e])
    return impl_float
