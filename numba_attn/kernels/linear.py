"""y = x · W + b with W stored as float32, float16 (uint16 bits), int8 or int4 blocks, read at its width.

Maths. For x (M, K) and W (K, N) (the repo's ``x @ W`` layout), y[m, n] = b[n] + Σ_k x[m, k] · W[k, n].
int8 weights are affine blocks along the input axis (like q8_1, or ONNX Runtime's uint8 with a zero
point): for block j (inputs 32j … 32j+31) and output n, W[k, n] ≈ s[j, n] · q[k, n] + m[j, n] with
q ∈ [-128, 127] int8 and a float32 scale s and offset m per block and output, so

    y[m', n] = b[n] + Σ_j s[j, n] · (Σ_{k ∈ block j} x[m', k] · q[k, n]) + m[j, n] · X[m', j],
    X[m', j] = Σ_{k ∈ block j} x[m', k]   (one sum per block, shared by every output)

int8 (gemv and gemm): each row of x is first rounded to int16 codes per block, x[k] ≈ σ_j · c[k] with
σ_j = max_{k∈j} |x[k]| / 32767 and c = rint(x / σ_j) (|x − σ_j·c| ≤ σ_j / 2), so the inner sum is an
exact integer, Σ_{k∈j} c[k]·q[k, n] (|·| < 32 · 128 · 32767 < 2³¹), taken two products at a time with
``madd_pairs_into`` (``vpmaddwd``: 16 int16 products summed in pairs into 8 int32 lanes per instruction,
where converting each weight to float32 costs a ``vpmovsxbd``, a ``vcvtdq2ps`` and an FMA per 8), and
scaled once per block and output: y[n] += (s[j, n]·σ_j)·Σ c·q + m[j, n]·X[j] with X[j] = σ_j·Σ c (an
exact integer sum), i.e. the product of the rounded row with W_eff. A row with NaN or inf, or a block
whose max |x| is below 2⁻¹⁰⁰, sends the call to a float32 path (``_gemm_quantised_float``, the GEMV's
row as a 1-row matrix: each weight s·q + m in float32; serial, it is rare) so that NaN and inf propagate
as in numpy. int4 weights (4-bit affine blocks, like GGUF's Q4_1) use the same sums with q ∈ [0, 15]
(two codes per byte, laid out so that the low nibbles of an output's two bytes are one ``vpmaddwd``
pair of inputs and the high nibbles the next: ``madd_nibble_quads_into`` reads them where they lie, an
``and`` and a shift per 16 bytes, no unpacking pass) and the scale and offset stored as float16 bits
(|Σ c·q| < 32 · 15 · 32767 < 2³¹). float16 weights are converted with ``load``
(``vcvtph2ps``). Apart from the int8/int4 kernels' integer block sums, everything accumulates in float32.

Memory layout ("panels", written by ``numba_attn.linear``): the N outputs are cut into panels of
``PANEL`` = 64 consecutive outputs, and each panel is stored contiguously as (K_pad, PANEL):

    weights (P, K_pad, PANEL)  float32 / uint16,          P = ceil(N / 64),  K_pad = 32 · ceil(K / 32)
            (P, K_pad / 2, PANEL, 2) int8: inputs 2i and 2i+1 of an output side by side (vpmaddwd's pairs)
            (P, K_pad / 4, PANEL, 2) uint8 for int4: byte [g, t, h] = q[4g + h, t] | q[4g + 2 + h, t] << 4
    scales  (P, K_pad / 32, 2, PANEL) float32 (int8) or float16 bits (int4): [..., 0, :] scales s,
            [..., 1, :] offsets m

Rows past K and outputs past N are zero padding, so every inner loop has the fixed trip counts
BLOCK = 32 (inputs) and PANEL = 64 (outputs, 4 AVX-512 / 8 AVX2 vectors) and reads memory in one
forward stream per panel. Activations are vector-broadcast, weights are the streamed operand:
per 4 inputs, one pass over the panel's 64 outputs adds x[k]·W[k, :] + … + x[k+3]·W[k+3, :]
to a block partial sum (4 FMAs per output, 1 load + 1 store of the partial sum).

Kernels:

- ``gemv`` (M = 1, the decode step): parallel over panels (one work item = 64 outputs × all K);
  int8: the row's int16 codes first (serial, K_pad entries), then per block 16 steps of 8 ``vpmaddwd``
  (AVX2) into 8 int32 accumulators held in registers. The panel is prefetched one block ahead
  (``_vector_ir.prefetch_stream``, ``prefetchnta`` / ``prfm pldl1strm``): from DRAM on a Zen 1 VM, 2
  threads, the int8 GEMVs of SmolLM2's shapes took 15-22 % less time with it (576 × 3072: 189 against
  223 µs, median of 9 in turns in one process; the 49152-output lm_head 2.49 against 3.18 ms), int4 3-5 %
  (compute-bound there).
- ``gemm`` (M > 1, prefill): parallel over (panel, group of ``ROWS`` rows) work items; for each
  block of 32 inputs the block of the panel (32 × 64) is first converted once per row group, not once
  per row: float16 to float32 (8 KiB, L1-resident, then a float32 register loop per row), int8 codes
  widened to int16 (4 KiB; each row then runs ``madd_pairs_into`` on it, ``vpmaddwd`` reading the
  weights from L1). int8 first rounds every row of x to int16 (a ``prange`` of its own).
- int4 (gemv and gemm): the int8 kernels with the scales as float16 bits; the GEMV multiplies the
  packed codes directly (``madd_nibble_quads_into``: per 8 outputs and 4 inputs one 16-byte load, and,
  shift, two ``vpmaddwd``), the GEMM widens each block of the panel to the int16 pairs the int8 GEMM uses
  (a plain loop of masks and shifts, 4 KiB). Measured (Zen 1 VM, AVX2 on 128-bit units, 576 × 3072,
  weights in cache): 1 thread 176 µs against 255-259 µs with the former unpack-to-scratch pass and 192 µs
  for int8; from DRAM (30 different matrices in turn), 2 threads, 159-186 µs against 240-248 µs.

Each kernel has a parallel (``prange``) and a serial build (``variant``); the caller picks the
serial one below ``SERIAL_BELOW_MACS`` multiply-adds (a parallel launch costs ~2 µs idle, far more
on a busy machine). Activations arrive as float32 (M, K_pad), zero-padded by the caller when K is
not a multiple of 32. Memory: no allocation beyond the output and per-work-item scratch (64 floats
for gemv, plus the K_pad / 32 block sums of x, and for int8 the K_pad int16 codes, 64 int32 block sums
and K_pad / 32 activation scales; 32 × 64 + ROWS × 64 floats for gemm, and for int8 the (M, K_pad)
int16 codes with their (M, K_pad / 32) scales and sums).
"""

import numpy as np
from numba import njit, prange, types
from numba.extending import overload

from .. import config
from . import variant
from ._load import load
from ._vector_ir import madd_nibble_quads_into, madd_pairs_into

#: outputs per panel (the vector loop's fixed length: 4 × 16 float32 lanes)
PANEL = 64
#: inputs per int8 scale and offset
BLOCK = 32
#: activation rows per gemm work item
ROWS = 16
#: below this many multiply-adds (M · K · N) the serial build runs. Measured on a loaded 2-core box:
#: at 576 × 576 (330 k, one row) 2 threads were already faster (16-18 µs against 21-24 µs serial);
#: below ~60 k (≤ ~5 µs of work) a launch's ~2 µs (idle) cannot pay off. Not finely tuned.
SERIAL_BELOW_MACS = 60_000


#: int16 activation codes span ±ACT_LEVELS (per block of 32 inputs: x ≈ x_scale · code)
ACT_LEVELS = 32767
#: a block whose largest |x| is below this (and not 0) is not rounded to int16 (its scale would be
#: subnormal): the whole call then takes the float path, as it does for NaN or inf
_ACT_TINY = np.float32(2.0**-100)


@njit(fastmath=config.FASTMATH, cache=config.CACHE, inline="always")
def _activation_codes(x, codes, x_scales, x_sums):
    """x (K_pad,) float32 → int16 ``codes`` (K_pad,), per block b of 32: x_scales[b] = max|x| / 32767,
    codes = rint(x / x_scales[b]) (so |x − x_scales[b]·code| ≤ x_scales[b] / 2), and x_sums[b] =
    x_scales[b]·Σ codes, the block sum of the rounded x (an exact integer sum: the same in every build
    and order). False (nothing usable) when a block holds NaN or inf or a largest |x| below 2⁻¹⁰⁰."""
    for b in range(x_scales.shape[0]):
        k0 = b * BLOCK
        top = np.float32(0)
        finite = np.float32(0)
        for k in range(k0, k0 + BLOCK):
            top = max(top, abs(x[k]))
            finite += x[k] * np.float32(0)  # 0, or NaN once a NaN or ±inf is seen (max would skip a NaN)
        if finite != 0 or not (top <= np.float32(3.4028235e38)) or (top > 0 and top < _ACT_TINY):
            return False
        x_scales[b] = top / np.float32(ACT_LEVELS)
        inverse = np.float32(ACT_LEVELS) / top if top > 0 else np.float32(0)
        total = np.int32(0)
        for k in range(k0, k0 + BLOCK):
            c = np.int16(min(np.float32(ACT_LEVELS), max(np.float32(-ACT_LEVELS), np.rint(x[k] * inverse))))
            codes[k] = c
            total = np.int32(total + np.int32(c))
        x_sums[b] = np.float32(total) * x_scales[b]
    return True


@njit(fastmath=config.FASTMATH, cache=config.CACHE, inline="always")
def _add_block_sums(acc, dots, sb, mb, sx, xb, scaled):
    """acc[t] += dots[t]·(sb[t]·sx) + xb·mb[t] for the PANEL outputs: one block's integer sums scaled
    (weights' scale × activations' scale) plus the offsets times the block's sum of x (sb, mb float32,
    or float16 bits for int4). The products sb·sx go through ``scaled`` (memory), so every build
    rounds the same products in the same order."""
    for t in range(PANEL):
        scaled[t] = np.float32(load(sb[t])) * sx
    for t in range(PANEL):
        acc[t] += np.float32(dots[t]) * scaled[t] + xb * np.float32(load(mb[t]))


def madd_block(qp, b, codes, dots):  # pragma: no cover - replaced by the overload inside numba
    """dots[t] += Σ_{k ∈ block b} codes[k] · q[k, t] for the PANEL outputs of a flat quantised panel ``qp``."""


@overload(madd_block, inline="always")
def _madd_block(qp, b, codes, dots):
    """int8 panels: pairs of inputs (``madd_pairs_into``); int4 (uint8) panels: quads of inputs in the
    nibbles of two bytes per output (``madd_nibble_quads_into``), read where they lie (no unpacking)."""
    if qp.dtype == types.int8:
        return lambda qp, b, codes, dots: madd_pairs_into(
            qp, b * BLOCK * PANEL, 2 * PANEL, codes, b * BLOCK, BLOCK // 2, dots, 0, PANEL
        )
    if qp.dtype == types.uint8:
        return lambda qp, b, codes, dots: madd_nibble_quads_into(
            qp, b * (BLOCK // 2) * PANEL, 2 * PANEL, codes, b * BLOCK, BLOCK // 4, dots, 0, PANEL
        )
    return None


def widen_block(qp, b, wide):  # pragma: no cover - replaced by the overload inside numba
    """wide[:] = block ``b`` of a flat quantised panel ``qp`` as int16 input pairs."""


@overload(widen_block, inline="always")
def _widen_block(qp, b, wide):
    if qp.dtype == types.int8:

        def widened(qp, b, wide):
            base = b * BLOCK * PANEL
            for i in range(BLOCK * PANEL):
                wide[i] = qp[base + i]

        return widened
    if qp.dtype == types.uint8:

        def unpacked(qp, b, wide):  # group g: 128 bytes (64 outputs × 2) → pairs 2g (low nibbles), 2g + 1 (high)
            base = b * (BLOCK // 2) * PANEL
            for g in range(BLOCK // 4):
                src = base + g * 2 * PANEL
                dst = g * 4 * PANEL
                for j in range(2 * PANEL):
                    wide[dst + j] = qp[src + j] & np.uint8(15)
                for j in range(2 * PANEL):
                    wide[dst + 2 * PANEL + j] = qp[src + j] >> np.uint8(4)

        return unpacked
    return None


def pair_codes(qp, i, t):  # pragma: no cover - replaced by the overload inside numba
    """The codes of inputs 2i and 2i + 1 of output t of a quantised panel ``qp`` (2-D or 3-D)."""


@overload(pair_codes, inline="always")
def _pair_codes(qp, i, t):
    if qp.dtype == types.int8:  # (K_pad/2, 64, 2)
        return lambda qp, i, t: (np.float32(qp[i, t, 0]), np.float32(qp[i, t, 1]))
    if qp.dtype == types.uint8:  # (K_pad/4, 64, 2): pair 2g in the low nibbles of group g, pair 2g + 1 in the high

        def nibbles(qp, i, t):
            shift = np.uint8(4 * (i & 1))
            g = i >> 1
            return np.float32((qp[g, t, 0] >> shift) & np.uint8(15)), np.float32((qp[g, t, 1] >> shift) & np.uint8(15))

        return nibbles
    return None


def _gemv_quantised_body(x, q, scales, bias, y):
    """y (N,) = bias + x (K_pad,) · W, W as int8 panels of input pairs q (P, K_pad/2, 64, 2) with float32
    scales and offsets, or int4 panels q (P, K_pad/4, 64, 2) uint8 with float16-bit ones (P, K_pad/32, 2, 64);
    x rounded to int16 per block (``_activation_codes``), each block's Σ code·q in int32 by
    ``madd_block`` (``vpmaddwd``: int8 pairs, or int4 quads in place), then scaled in float32."""
    P = q.shape[0]
    nb = scales.shape[1]
    N = y.shape[0]
    codes = np.empty(nb * BLOCK, np.int16)
    x_scales = np.empty(nb, np.float32)
    x_sums = np.empty(nb, np.float32)
    if not _activation_codes(x, codes, x_scales, x_sums):
        _gemm_quantised_float(x.reshape(1, x.shape[0]), q, scales, bias, y.reshape(1, N))
        return
    for p in prange(P):
        acc = np.zeros(PANEL, np.float32)
        dots = np.empty(PANEL, np.int32)
        scaled = np.empty(PANEL, np.float32)
        qp = q[p].reshape(q[p].size)
        sp = scales[p]
        for b in range(nb):
            for t in range(PANEL):
                dots[t] = 0
            madd_block(qp, b, codes, dots)
            _add_block_sums(acc, dots, sp[b, 0], sp[b, 1], x_scales[b], x_sums[b], scaled)
        o0 = p * PANEL
        for t in range(min(PANEL, N - o0)):
            y[o0 + t] = acc[t] + bias[o0 + t]


def _gemv_float_body(x, w, bias, y):
    """y (N,) = bias + x (K_pad,) · W, W as float32 or float16-bit panels w (P, K_pad, 64)."""
    P, K = w.shape[0], w.shape[1]
    N = y.shape[0]
    for p in prange(P):
        acc = np.zeros(PANEL, np.float32)
        wp = w[p]
        for k in range(0, K, 4):
            x0, x1, x2, x3 = x[k], x[k + 1], x[k + 2], x[k + 3]
            w0, w1, w2, w3 = wp[k], wp[k + 1], wp[k + 2], wp[k + 3]
            for t in range(PANEL):
                acc[t] += (
                    x0 * np.float32(load(w0[t]))
                    + x1 * np.float32(load(w1[t]))
                    + x2 * np.float32(load(w2[t]))
                    + x3 * np.float32(load(w3[t]))
                )
        o0 = p * PANEL
        for t in range(min(PANEL, N - o0)):
            y[o0 + t] = acc[t] + bias[o0 + t]


@njit(fastmath=config.FASTMATH, cache=config.CACHE, inline="always")
def _rows_times_block(x, r0, r1, k0, wf, acc):
    """acc[r - r0, :] += x[r, k0:k0+32] · wf (32, 64) for rows r0 … r1-1 (the gemm inner product)."""
    for r in range(r0, r1):
        xr = x[r]
        ar = acc[r - r0]
        for k in range(0, BLOCK, 4):
            x0, x1, x2, x3 = xr[k0 + k], xr[k0 + k + 1], xr[k0 + k + 2], xr[k0 + k + 3]
            f0, f1, f2, f3 = wf[k], wf[k + 1], wf[k + 2], wf[k + 3]
            for t in range(PANEL):
                ar[t] += x0 * f0[t] + x1 * f1[t] + x2 * f2[t] + x3 * f3[t]


@njit(cache=config.CACHE, inline="always")
def _work_item(item, groups, M):
    """(panel, first row, end row) of gemm work item ``item``: ``groups`` groups of ROWS rows per panel."""
    r0 = (item % groups) * ROWS
    return item // groups, r0, min(M, r0 + ROWS)


@njit(fastmath=config.FASTMATH, cache=config.CACHE, inline="always")
def _store_rows(acc, bias, r0, r1, o0, y):
    """y[r, o0:o0+64] = acc[r - r0] + bias (the last panel: only the outputs that exist)."""
    n = min(PANEL, y.shape[1] - o0)
    for r in range(r0, r1):
        for t in range(n):
            y[r, o0 + t] = acc[r - r0, t] + bias[o0 + t]


def _gemm_quantised_float_body(x, q, scales, bias, y):
    """The float path of the int8 / int4 GEMM (rows with NaN, inf or tiny blocks): y (M, N) = bias +
    x · (s·q + m), each block of the panel converted to float32 once and reused by the group's rows."""
    M = x.shape[0]
    P, K = q.shape[0], scales.shape[1] * BLOCK
    groups = (M + ROWS - 1) // ROWS
    for item in prange(P * groups):
        p, r0, r1 = _work_item(item, groups, M)
        acc = np.zeros((ROWS, PANEL), np.float32)
        wf = np.empty((BLOCK, PANEL), np.float32)
        sf = np.empty(PANEL, np.float32)
        mf = np.empty(PANEL, np.float32)
        qp = q[p]
        for b in range(K // BLOCK):
            k0 = b * BLOCK
            for t in range(PANEL):
                sf[t] = np.float32(load(scales[p, b, 0, t]))
                mf[t] = np.float32(load(scales[p, b, 1, t]))
            for j in range(BLOCK // 2):
                w0 = wf[2 * j]
                w1 = wf[2 * j + 1]
                for t in range(PANEL):
                    c0, c1 = pair_codes(qp, k0 // 2 + j, t)
                    w0[t] = c0 * sf[t] + mf[t]
                    w1[t] = c1 * sf[t] + mf[t]
            _rows_times_block(x, r0, r1, k0, wf, acc)
        _store_rows(acc, bias, r0, r1, p * PANEL, y)


def _gemm_quantised_body(x, q, scales, bias, y):
    """y (M, N) = bias + x (M, K_pad) · W for int8 or int4 panels q with their scales and offsets (as the
    GEMV): each row of x rounded to int16 per block (``_activation_codes``, a parallel pass), then per
    work item (panel, group of ``ROWS`` rows) and block the panel's codes widened (int8) or unpacked
    (int4) to int16 pairs once (4 KiB, L1; ``widen_block``) and, for each row, Σ code·q by
    ``madd_pairs_into`` (``vpmaddwd``), scaled in float32 as in the GEMV."""
    M = x.shape[0]
    P = q.shape[0]
    nb = scales.shape[1]
    K = nb * BLOCK
    codes = np.empty((M, K), np.int16)
    x_scales = np.empty((M, nb), np.float32)
    x_sums = np.empty((M, nb), np.float32)
    usable = np.empty(M, np.bool_)
    for r in prange(M):
        usable[r] = _activation_codes(x[r], codes[r], x_scales[r], x_sums[r])
    if not usable.all():
        _gemm_quantised_float(x, q, scales, bias, y)
        return
    groups = (M + ROWS - 1) // ROWS
    for item in prange(P * groups):
        p, r0, r1 = _work_item(item, groups, M)
        acc = np.zeros((ROWS, PANEL), np.float32)
        wide = np.empty(BLOCK * PANEL, np.int16)
        dots = np.empty(PANEL, np.int32)
        scaled = np.empty(PANEL, np.float32)
        qp = q[p].reshape(q[p].size)
        for b in range(nb):
            widen_block(qp, b, wide)
            sb = scales[p, b, 0]
            mb = scales[p, b, 1]
            for r in range(r0, r1):
                for t in range(PANEL):
                    dots[t] = 0
                madd_pairs_into(wide, 0, 2 * PANEL, codes[r], b * BLOCK, BLOCK // 2, dots, 0, PANEL)
                _add_block_sums(acc[r - r0], dots, sb, mb, x_scales[r, b], x_sums[r, b], scaled)
        _store_rows(acc, bias, r0, r1, p * PANEL, y)


def _gemm_float_body(x, w, bias, y):
    """y (M, N) = bias + x (M, K_pad) · W for float32 or float16-bit panels w (P, K_pad, 64)."""
    M = x.shape[0]
    P, K = w.shape[0], w.shape[1]
    groups = (M + ROWS - 1) // ROWS
    for item in prange(P * groups):
        p, r0, r1 = _work_item(item, groups, M)
        acc = np.zeros((ROWS, PANEL), np.float32)
        wf = np.empty((BLOCK, PANEL), np.float32)
        wp = w[p]
        for b in range(K // BLOCK):
            k0 = b * BLOCK
            for k in range(BLOCK):
                wk = wp[k0 + k]
                for t in range(PANEL):
                    wf[k, t] = np.float32(load(wk[t]))
            _rows_times_block(x, r0, r1, k0, wf, acc)
        _store_rows(acc, bias, r0, r1, p * PANEL, y)


_FLAGS = {"fastmath": config.FASTMATH, "cache": config.CACHE}
# int8 and int4 panels share each quantised dispatcher (one compiled specialisation per panel dtype)
gemv_quantised_parallel = njit(parallel=True, **_FLAGS)(variant(_gemv_quantised_body, "_parallel"))
gemv_quantised_serial = njit(parallel=False, **_FLAGS)(variant(_gemv_quantised_body, "_serial"))
gemv_float_parallel = njit(parallel=True, **_FLAGS)(variant(_gemv_float_body, "_parallel"))
gemv_float_serial = njit(parallel=False, **_FLAGS)(variant(_gemv_float_body, "_serial"))
_gemm_quantised_float = njit(parallel=False, **_FLAGS)(_gemm_quantised_float_body)  # rare: serial
gemm_quantised_parallel = njit(parallel=True, **_FLAGS)(variant(_gemm_quantised_body, "_parallel"))
gemm_quantised_serial = njit(parallel=False, **_FLAGS)(variant(_gemm_quantised_body, "_serial"))
gemm_float_parallel = njit(parallel=True, **_FLAGS)(variant(_gemm_float_body, "_parallel"))
gemm_float_serial = njit(parallel=False, **_FLAGS)(variant(_gemm_float_body, "_serial"))

#: storage → (gemv parallel, gemv serial, gemm parallel, gemm serial)
KERNELS = {
    "float32": (gemv_float_parallel, gemv_float_serial, gemm_float_parallel, gemm_float_serial),
    "float16": (gemv_float_parallel, gemv_float_serial, gemm_float_parallel, gemm_float_serial),
    "int8": (gemv_quantised_parallel, gemv_quantised_serial, gemm_quantised_parallel, gemm_quantised_serial),
    "int4": (gemv_quantised_parallel, gemv_quantised_serial, gemm_quantised_parallel, gemm_quantised_serial),
}
