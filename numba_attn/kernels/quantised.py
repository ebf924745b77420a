"""Quantised keys and values: int8 and 4-bit schemes along the last axis, and their inner loops.

int8 (ggml's q8_0 when block = 32): for each block b of ``block`` consecutive entries of a row,

    scale_b = max_{d∈b} |x_d| / 127,   q_d = clamp(rint(x_d / scale_b), -127, 127)   (scale_b = 0 → q = 0)
    x_d ≈ scale_b · q_d

``block = D`` (one block per row) is the "per row" scheme. Memory per row: D bytes + 4·ceil(D/block).

4-bit (ggml's q4_1 when block = 32; see the section below ``quantize_row_q4_into``): 16 levels from each
block's minimum in steps of (max - min)/15, two codes per byte, float16 step and minimum. Memory per row:
D/2 bytes + 4·D/block.

Attention reads quantised keys dequantised in registers (code → float, times the block's scale, plus
the minimum for 4-bit) and dotted with the float query, which is never rounded (``block_scores``);
values likewise (``block_values``). That is the decode kernel; the prefill kernel dequantises each
block of key or value rows once into a float scratch (``dequantised_rows``), the same numbers. Blocks
are powers of two (entry d is in block d >> log2(block)) or the whole row.

``int8_dot`` (an int8 × int8 dot product accumulated in int32, ``np.int32(acc + np.int32(a)·np.int32(b))``
each step: written plainly numba widens to int64 and the loop compiles to ``vpmuldq``; forced to int32
LLVM emits ``vpmaddwd``/``vpdpwssd`` on x86, ``sdot`` on Armv8.2+ and ``smull``/``sadalp`` on Cortex-A72)
is kept for the aarch64 code-generation probe; attention no longer rounds the query to use it.
"""

import numpy as np
from numba import njit, prange, types
from numba.extending import overload

from .. import config
from ._decode_tiles import rows_as_float32, rows_of_key_scores, rows_of_values
from ._load import half_bits, load, rows_for_compute
from ._prefill_tiles import VW
from ._vector_ir import is_c_array

#: smallest normal float32: below it 1/scale overflows, so such (rare) blocks divide instead
_TINY = np.float32(1.1754944e-38)


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
            inv = np.float32(1) / s if s >= _TINY else np.float32(0)
            for d in range(d0, d1):
                xd = np.float32(load(x[i, d]))
                # a subnormal scale: 1/s overflows, so divide (exact enough, and rare)
                y = np.rint(xd * inv if s >= _TINY else (xd / s if s > 0 else np.float32(0)))
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
        inv = np.float32(1) / s if s >= _TINY else np.float32(0)
        for d in range(d0, d1):
            xd = np.float32(x[d])
            y = np.rint(xd * inv if s >= _TINY else (xd / s if s > 0 else np.float32(0)))
            data[d] = np.int8(min(np.float32(127), max(np.float32(-127), y)))


@njit(cache=config.CACHE, inline="always")
def int8_dot(a, b, d0, d1):
    """Σ_{d0 ≤ d < d1} a[d]·b[d] for int8 a, b, accumulated in int32 (see the module doc)."""
    acc = np.int32(0)
    for d in range(d0, d1):
        acc = np.int32(acc + np.int32(a[d]) * np.int32(b[d]))
    return acc


@njit(cache=config.CACHE, inline="always")
def block_shift(block):
    """ceil(log2(block)): entry d of a row belongs to scale block d >> shift (blocks are powers of
    two, or one block spanning the whole row, for which d >> shift is 0)."""
    shift = 0
    while (1 << shift) < block:
        shift += 1
    return shift


def block_scores(qs, kn, k_scales, k_block, j0, nk, s):  # pragma: no cover - numba overload
    raise TypeError("block_scores is a numba kernel helper: call it from @njit code")


@overload(block_scores, fastmath=config.FASTMATH)
def _block_scores_overload(qs, kn, k_scales, k_block, j0, nk, s):
    """s[r, j] = q_r · k_{j0+j} for the rows r of ``qs`` and nk keys from j0.

    float32 queries: VW keys at a time by ``_decode_tiles.key_scores`` (no horizontal sum per key), for
    float keys, int8 keys and 4-bit keys; the keys left over, and float64 queries, by the loops here.
    The query is never rounded: quantised keys are dequantised in registers and dotted with it (with
    several rows, once per VW keys into a float32 scratch that every row reads: ``rows_of_key_scores``).

    Float keys (float32/float64, or float16 bits): a dot product along the head dim, vectorised.
    int8 keys (one scale per block of a power of two, or per row, which is one block spanning the row):
    k8[d]·k_scales[j, d >> shift] dotted with the float query. (An int32 accumulation per 32-entry
    block compiles to short loops that LLVM vectorises badly, 5-15× slower here; an int8 × int8 product
    against a quantised query also rounds the query, which added a third to the KL divergence of the
    per-row format on SmolLM2: this form runs at float speed and adds no error to the storage's.)
    4-bit keys (uint8, two codes per byte, see ``quantize_row_q4_into``): per block, step·Σ q·code +
    min·Σ q (``q4_dot``).
    """
    if isinstance(kn, types.Array) and kn.dtype == types.uint8:

        def impl_q4(qs, kn, k_scales, k_block, j0, nk, s):
            j_lo = rows_of_key_scores(qs, kn, k_scales, k_block, j0, nk, s)  # VW keys at a time
            for j in range(j_lo, nk):
                kj = kn[j0 + j]
                ksj = k_scales[j0 + j]
                for r in range(qs.shape[0]):
                    s[r, j] = q4_dot(qs[r], kj, ksj, k_block)

        return impl_q4

    if isinstance(kn, types.Array) and kn.dtype == types.int8:

        def impl_int8(qs, kn, k_scales, k_block, j0, nk, s):
            E = kn.shape[1]
            j_lo = rows_of_key_scores(qs, kn, k_scales, k_block, j0, nk, s)  # VW keys at a time
            if k_block == 32:  # the default: a constant shift lets LLVM broadcast one scale per vector
                for j in range(j_lo, nk):
                    kj = kn[j0 + j]
                    ksj = k_scales[j0 + j]
                    for r in range(qs.shape[0]):
                        qr = qs[r]
                        a = qs.dtype.type(0)
                        for d in range(E):
                            a += qr[d] * (qs.dtype.type(kj[d]) * ksj[d >> 5])
                        s[r, j] = a
            else:  # another power of two, or one block per row (then d >> shift is 0 for every d < E)
                shift = block_shift(k_block)
                for j in range(j_lo, nk):
                    kj = kn[j0 + j]
                    ksj = k_scales[j0 + j]
                    for r in range(qs.shape[0]):
                        qr = qs[r]
                        a = qs.dtype.type(0)
                        for d in range(E):
                            a += qr[d] * (qs.dtype.type(kj[d]) * ksj[d >> shift])
                        s[r, j] = a

        return impl_int8

    def impl_float(qs, kn, k_scales, k_block, j0, nk, s):
        E = qs.shape[1]
        j_lo = rows_of_key_scores(qs, kn, k_scales, k_block, j0, nk, s)  # VW keys at a time
        for j in range(j_lo, nk):
            kj = kn[j0 + j]
            for r in range(qs.shape[0]):
                qr = qs[r]
                a = qs.dtype.type(0)
                for d in range(E):
                    a += qr[d] * load(kj[d])
                s[r, j] = a

    return impl_float


def block_values(s, vn, v_scales, v_block, j0, nk, acc):  # pragma: no cover - numba overload
    raise TypeError("block_values is a numba kernel helper: call it from @njit code")


@overload(block_values, fastmath=config.FASTMATH)
def _block_values_overload(s, vn, v_scales, v_block, j0, nk, acc):
    """acc[r, :] += Σ_j s[r, j]·v_{j0+j} for nk keys from j0 (int8 values dequantised on the fly).

    float32 probabilities and a value dim that is a multiple of VW: register tiles in LLVM vector
    IR (``_decode_tiles.rows_of_values``: 4 rows × up to 4 vectors of columns, accumulated over all
    nk keys without touching memory). Otherwise the loops here: float32 (a value dim that is not a
    multiple of VW) one key at a time; float64 four keys per pass over an accumulator row, so each
    accumulator entry is read and written once per four keys (one at a time, the loop waits on its
    own stores).
    """
    if isinstance(vn, types.Array) and vn.dtype == types.uint8:

        def impl_q4(s, vn, v_scales, v_block, j0, nk, acc):
            if rows_of_values(s, vn, v_scales, v_block, j0, nk, acc):  # register tiles, see _decode_tiles
                return
            for j in range(nk):
                vj = vn[j0 + j]
                vsj = v_scales[j0 + j]
                for r in range(acc.shape[0]):
                    q4_axpy(s[r, j], vj, vsj, v_block, acc[r])

        return impl_q4

    if isinstance(vn, types.Array) and vn.dtype == types.int8:

        def impl_int8(s, vn, v_scales, v_block, j0, nk, acc):
            if rows_of_values(s, vn, v_scales, v_block, j0, nk, acc):  # register tiles, see _decode_tiles
                return
            if v_block == 32 and vn.shape[1] % 32 == 0:  # the default: constant 32-wide blocks
                _values_int8_32(s, vn, v_scales, j0, nk, acc)
            else:
                _values_int8(s, vn, v_scales, block_shift(v_block), j0, nk, acc)

        return impl_int8

    if s.dtype == types.float32 and acc.dtype == types.float32:

        def impl_float32(s, vn, v_scales, v_block, j0, nk, acc):
            if rows_of_values(s, vn, v_scales, v_block, j0, nk, acc):  # register tiles, see _decode_tiles
                return
            # a value dim that is not a multiple of VW (rare): one key at a time, the loop over e
            # vectorised by LLVM (the four-key form below compiled ~1 s longer, for shapes few models have)
            for j in range(nk):
                vj = vn[j0 + j]
                for r in range(acc.shape[0]):
                    arow = acc[r]
                    pj = s[r, j]
                    for e in range(vj.shape[0]):
                        arow[e] += pj * load(vj[e])

        return impl_float32

    def impl_float(s, vn, v_scales, v_block, j0, nk, acc):
        if rows_of_values(s, vn, v_scales, v_block, j0, nk, acc):  # register tiles, see _decode_tiles
            return
        Ev = vn.shape[1]
        nk4 = nk // 4 * 4
        for j in range(0, nk4, 4):
            va = vn[j0 + j]
            vb = vn[j0 + j + 1]
            vc = vn[j0 + j + 2]
            vd = vn[j0 + j + 3]
            for r in range(acc.shape[0]):
                arow = acc[r]
                pa = s[r, j]
                pb = s[r, j + 1]
                pc = s[r, j + 2]
                pd = s[r, j + 3]
                for e in range(Ev):
                    arow[e] += pa * load(va[e]) + pb * load(vb[e]) + pc * load(vc[e]) + pd * load(vd[e])
        for j in range(nk4, nk):
            vj = vn[j0 + j]
            for r in range(acc.shape[0]):
                arow = acc[r]
                pj = s[r, j]
                for e in range(Ev):
                    arow[e] += pj * load(vj[e])

    return impl_float


@njit(fastmath=config.FASTMATH, cache=config.CACHE, inline="always")
def _values_int8(s, vn, v_scales, shift, j0, nk, acc):
    """acc[r, :] += Σ_j s[r, j]·v_scales[j, e >> shift]·v8[j, e], four keys per pass."""
    Ev = vn.shape[1]
    nk4 = nk // 4 * 4
    for j in range(0, nk4, 4):
        va = vn[j0 + j]
        vb = vn[j0 + j + 1]
        vc = vn[j0 + j + 2]
        vd = vn[j0 + j + 3]
        sa = v_scales[j0 + j]
        sb = v_scales[j0 + j + 1]
        sc = v_scales[j0 + j + 2]
        sd = v_scales[j0 + j + 3]
        for r in range(acc.shape[0]):
            arow = acc[r]
            pa = s[r, j]
            pb = s[r, j + 1]
            pc = s[r, j + 2]
            pd = s[r, j + 3]
            for e in range(Ev):
                b = e >> shift
                arow[e] += (
                    pa * sa[b] * np.float32(va[e])
                    + pb * sb[b] * np.float32(vb[e])
                    + pc * sc[b] * np.float32(vc[e])
                    + pd * sd[b] * np.float32(vd[e])
                )
    for j in range(nk4, nk):
        vj = vn[j0 + j]
        sj = v_scales[j0 + j]
        for r in range(acc.shape[0]):
            arow = acc[r]
            pj = s[r, j]
            for e in range(Ev):
                arow[e] += pj * sj[e >> shift] * np.float32(vj[e])


@njit(fastmath=config.FASTMATH, cache=config.CACHE, inline="always")
def _values_int8_32(s, vn, v_scales, j0, nk, acc):
    """``_values_int8`` for blocks of exactly 32 with Ev a multiple of 32: each block's four
    probability × scale products are scalars over a constant 32-wide loop (two vectors)."""
    nb = vn.shape[1] // 32
    nk4 = nk // 4 * 4
    for j in range(0, nk4, 4):
        va = vn[j0 + j]
        vb = vn[j0 + j + 1]
        vc = vn[j0 + j + 2]
        vd = vn[j0 + j + 3]
        for r in range(acc.shape[0]):
            arow = acc[r]
            for b in range(nb):
                pa = s[r, j] * v_scales[j0 + j, b]
                pb = s[r, j + 1] * v_scales[j0 + j + 1, b]
                pc = s[r, j + 2] * v_scales[j0 + j + 2, b]
                pd = s[r, j + 3] * v_scales[j0 + j + 3, b]
                e0 = b * 32
                for e in range(32):
                    arow[e0 + e] += (
                        pa * np.float32(va[e0 + e])
                        + pb * np.float32(vb[e0 + e])
                        + pc * np.float32(vc[e0 + e])
                        + pd * np.float32(vd[e0 + e])
                    )
    for j in range(nk4, nk):
        vj = vn[j0 + j]
        for r in range(acc.shape[0]):
            arow = acc[r]
            for b in range(nb):
                pj = s[r, j] * v_scales[j0 + j, b]
                e0 = b * 32
                for e in range(32):
                    arow[e0 + e] += pj * np.float32(vj[e0 + e])


# ---------------------------------------------------------------------------------------------------------------------
# 4-bit ("int4") storage: two codes per byte, a float16 step and minimum per block
# ---------------------------------------------------------------------------------------------------------------------
#
# Scheme (ggml's q4_1 when block = 32): for each block b of ``block`` consecutive entries of a row,
#
#     step_b = half((max_b - min_b) / 15),  min'_b = half(min_b),  code_d = clamp(rint((x_d - min'_b) / step_b), 0, 15)
#     x_d ≈ code_d · step_b + min'_b                                (step_b = 0 → code 0: x ≈ min'_b)
#
# (half(): rounded to float16, the stored form; codes are computed from the rounded values, so the
# error stays within half a step plus float16's rounding of the minimum.) Packing, ggml's: block b's
# codes take bytes b·block/2 … (b+1)·block/2 - 1 of the row; entry w < block/2 of the block is the low
# nibble of byte w, entry w + block/2 the high nibble of the same byte. So ``width`` consecutive entries
# (width dividing block/2) are the low or the high nibbles of ``width`` consecutive bytes: one vector
# load, one shift, one ``and``. ``scales`` holds (step, min) pairs: (rows, 2·nb) float16 bits (uint16),
# step_b at 2b and min_b at 2b + 1. Memory per row of D: D/2 bytes + 4 bytes per block.


@njit(fastmath=config.FASTMATH, cache=config.CACHE, inline="always")
def quantize_row_q4_into(x, block, data, scales):
    """One row x (D,) (float, or float16 bits) → ``data`` (D/2,) uint8 codes, ``scales`` (2·nb,) uint16."""
    D = x.shape[0]
    half = block // 2
    for b in range(D // block):
        d0 = b * block
        lo = np.float32(np.inf)
        hi = np.float32(-np.inf)
        for d in range(d0, d0 + block):
            xd = np.float32(load(x[d]))
            lo = min(lo, xd)
            hi = max(hi, xd)
        step_bits = half_bits((hi - lo) / np.float32(15))
        min_bits = half_bits(lo)
        scales[2 * b] = step_bits
        scales[2 * b + 1] = min_bits
        step = load(step_bits)
        low = load(min_bits)
        inv = np.float32(1) / step if step > 0 else np.float32(0)
        for w in range(half):
            a = np.rint((np.float32(load(x[d0 + w])) - low) * inv)
            c = np.rint((np.float32(load(x[d0 + half + w])) - low) * inv)
            a = min(np.float32(15), max(np.float32(0), a))
            c = min(np.float32(15), max(np.float32(0), c))
            data[b * half + w] = np.uint8(np.int32(a) | (np.int32(c) << 4))


@njit(parallel=True, cache=config.CACHE)
def quantize_rows_q4(x, block, data, scales):
    """Rows of x (M, D) (float32/float64/float16 bits) → data (M, D/2) uint8, scales (M, 2·nb) uint16."""
    for i in prange(x.shape[0]):
        quantize_row_q4_into(x[i], block, data[i], scales[i])


@njit(parallel=True, cache=config.CACHE)
def dequantize_rows_q4(data, scales, block, out):
    """out (M, D) float32 = code · step + min of its block."""
    M, D = out.shape
    half = block // 2
    for i in prange(M):
        for b in range(D // block):
            step = load(scales[i, 2 * b])
            low = load(scales[i, 2 * b + 1])
            for w in range(half):
                byte = np.int32(data[i, b * half + w])
                out[i, b * block + w] = np.float32(byte & 15) * step + low
                out[i, b * block + half + w] = np.float32(byte >> 4) * step + low


@njit(fastmath=config.FASTMATH, cache=config.CACHE, inline="always")
def q4_dot(q, kb, ks, block):
    """Σ_d q[d]·k[d] for one packed 4-bit key row ``kb`` (D/2,) with (step, min) pairs ``ks`` (float16
    bits): per block, step·Σ q·code + min·Σ q (the codes of a block's two halves in one pass)."""
    half = block // 2
    total = q.dtype.type(0)
    for b in range(q.shape[0] // block):
        d0 = b * block
        dot = q.dtype.type(0)
        qsum = q.dtype.type(0)
        for w in range(half):
            byte = np.int32(kb[b * half + w])
            qa = q[d0 + w]
            qc = q[d0 + half + w]
            dot += qa * q.dtype.type(byte & 15) + qc * q.dtype.type(byte >> 4)
            qsum += qa + qc
        total += q.dtype.type(load(ks[2 * b])) * dot + q.dtype.type(load(ks[2 * b + 1])) * qsum
    return total


@njit(fastmath=config.FASTMATH, cache=config.CACHE, inline="always")
def q4_axpy(p, vb, vs, block, arow):
    """arow += p · v for one packed 4-bit value row ``vb`` (D/2,) with (step, min) pairs ``vs``."""
    half = block // 2
    dt = arow.dtype.type
    for b in range(arow.shape[0] // block):
        e0 = b * block
        ps = p * dt(load(vs[2 * b]))
        pm = p * dt(load(vs[2 * b + 1]))
        for w in range(half):
            byte = np.int32(vb[b * half + w])
            arow[e0 + w] += ps * dt(byte & 15) + pm
            arow[e0 + half + w] += ps * dt(byte >> 4) + pm


# ---------------------------------------------------------------------------------------------------------------------
# prefill: a block of quantised key or value rows dequantised once into a float scratch
# ---------------------------------------------------------------------------------------------------------------------


def dequantised_rows(x, scales, block, j0, n, scratch):  # pragma: no cover - numba overload below
    raise TypeError("dequantised_rows is a numba kernel helper: call it from @njit code")


@njit(fastmath=config.FASTMATH, cache=config.CACHE, inline="always")
def _int8_row_loops(src, sc, blk, dst):
    """dst[d] = data·scale of d's block, in dst's dtype (what ``block_scores``/``block_values`` use)."""
    D = dst.shape[0]
    dt = dst.dtype.type
    for b in range(sc.shape[0]):
        s = dt(sc[b])
        for d in range(b * blk, min(D, b * blk + blk)):
            dst[d] = dt(src[d]) * s


@njit(fastmath=config.FASTMATH, cache=config.CACHE, inline="always")
def _q4_row_loops(src, sc, block, dst):
    """dst[d] = code·step + min of d's block, in dst's dtype (ggml's nibble order, see above)."""
    dt = dst.dtype.type
    half = block // 2
    for b in range(dst.shape[0] // block):
        step = dt(load(sc[2 * b]))
        low = dt(load(sc[2 * b + 1]))
        for w in range(half):
            byte = np.int32(src[b * half + w])
            dst[b * block + w] = dt(byte & 15) * step + low
            dst[b * block + half + w] = dt(byte >> 4) * step + low


@overload(dequantised_rows, fastmath=config.FASTMATH)
def _dequantised_rows_overload(x, scales, block, j0, n, scratch):
    """(rows, offset) such that rows[offset + j] is row j0 + j of x in the compute dtype (scratch's).

    int8 rows (``scales`` float32 (rows, blocks)) and 4-bit rows (uint8 codes, ``scales`` (rows, 2·blocks)
    float16 bits): rows j0 … j0+n-1 dequantised into ``scratch`` once, as the decode loops do in
    registers (int8: data·scale; 4-bit: code·step + min), so that the prefill micro-kernels, which
    reuse each row for every query row of a work item, read plain floats. float32 scratch: VW entries
    at a time in vector IR (``_decode_tiles.rows_as_float32``, which decode's GQA groups share) when the head dim and
    the scale blocks (4-bit: half blocks) are multiples of VW, else the loops (float64 arithmetic too).
    Float storage: ``_load.rows_for_compute`` (float16 bits converted into ``scratch``, floats as they are).
    """
    vector = is_c_array(scratch, types.float32) and is_c_array(x, types.int8, types.uint8)
    vector = vector and is_c_array(scales, types.float32, types.uint16)
    if isinstance(x, types.Array) and x.dtype == types.uint8:

        def impl_q4(x, scales, block, j0, n, scratch):
            D = scratch.shape[1]
            half = block // 2
            if vector and half % VW == 0:
                nb2 = scales.shape[1]
                rows_as_float32(x, j0 * x.shape[1], scales, j0 * nb2, nb2, block, D, scratch, 0, n)
            else:
                for j in range(n):
                    _q4_row_loops(x[j0 + j], scales[j0 + j], block, scratch[j])
            return scratch, 0

        return impl_q4

    if isinstance(x, types.Array) and x.dtype == types.int8:

        def impl_int8(x, scales, block, j0, n, scratch):
            D = scratch.shape[1]
            nb = scales.shape[1]
            blk = block if nb > 1 else D  # one scale per row: a block of the whole row
            if vector and D % VW == 0 and blk % VW == 0:
                rows_as_float32(x, j0 * D, scales, j0 * nb, nb, blk, D, scratch, 0, n)
            else:
                for j in range(n):
                    _int8_row_loops(x[j0 + j], scales[j0 + j], blk, scratch[j])
            return scratch, 0

        return impl_int8

    return lambda x, scales, block, j0, n, scratch: rows_for_compute(x, j0, n, scratch)
