"""Decode micro-kernel: VW keys' scores at once, as LLVM vector IR, with no horizontal sum per key.

A decode step scores one query row against many keys: s_j = Σ_d q[d]·k_j[d]. As a plain loop
(vectorised along d) every key ends in a horizontal sum of a vector (log2 VW shuffle + add steps)
and the loop's set-up; that is most of its cost. Here VW keys are done together:

    P_j = Σ_c q[c·VW : (c+1)·VW] ⊙ k_j[c·VW : (c+1)·VW]        (one vector per key, E/VW FMAs)

and the VW vectors P_0 … P_{VW-1} are summed "transposed" by a butterfly of shuffles: at each of
log2 VW levels, pairs of vectors A, B become shuffle(A, B, lo) + shuffle(A, B, hi), each result
holding twice as many keys in half as many lanes; the last one holds s_0 … s_{VW-1} in order.
That is 2·(VW-1) shuffles and VW-1 adds for VW keys (about 3 operations per key at VW = 16,
against ~8 for a horizontal sum), and the VW accumulators stay in registers.

Key storage: float32, float16 bits (uint16, converted with ``fpext``) or int8 (``sitofp``) with
one float32 scale per block of 2^shift entries (``scale_shift``; blocks a multiple of VW): int8 and 4-bit
keys are summed per block from their raw codes and scaled once per key and block, KEYS_PER_PASS keys
at a time (see ``_int8_key_sums``, ``key_scores_q4``). Scores are written to s[s_off : s_off + VW].

Vector width as in ``_prefill_tiles``: VW = 16 (AVX-512), 8 (AVX/AVX2), 4 (other). E must be a multiple of VW.
The IR is assembled from the helpers in ``_vector_ir`` (shared with ``_prefill_tiles``).
"""

import numpy as np
from llvmlite import ir
from numba import njit, types
from numba.core import cgutils
from numba.extending import intrinsic, overload

from . import _vector_ir as vir
from ._prefill_tiles import NV, VW
from ._vector_ir import is_c_array


@intrinsic
def key_scores(typingctx, q, q_off, k, k_off, k_stride, ks, ks_off, ks_stride, scale_shift, E, s, s_off):
    """s[s_off + j] = Σ_{d<E} q[q_off + d]·key_j[d] for j < VW, key_j[d] = k[k_off + j·k_stride + d]
    (· ks[ks_off + j·ks_stride + (d >> scale_shift)] for int8 keys). Offsets in elements."""
    if not (
        is_c_array(q, types.float32)
        and is_c_array(s, types.float32)
        and is_c_array(ks, types.float32)
        and is_c_array(k, types.float32, types.uint16, types.int8)
    ):
        return None
    i64 = types.int64
    sig = types.void(q, i64, k, i64, i64, ks, i64, i64, i64, i64, s, i64)
    scaled = k.dtype == types.int8

    def codegen(context, builder, signature, args):
        q_, q_off_, k_, k_off_, k_stride_, ks_, ks_off_, ks_stride_, shift_, E_, s_, s_off_ = args
        qp = vir.data_pointer(context, builder, q, q_)
        kp = vir.data_pointer(context, builder, k, k_)
        ksp = vir.data_pointer(context, builder, ks, ks_)
        sp = vir.data_pointer(context, builder, s, s_)
        accs = [vir.accumulator(builder, vir.zeros(ir.FloatType(), VW)) for _ in range(VW)]
        if scaled:
            _int8_key_sums(builder, qp, q_off_, kp, k_off_, k_stride_, ksp, ks_off_, ks_stride_, shift_, E_, accs)
        else:
            n_chunks = builder.udiv(E_, vir.as_index(VW))
            with cgutils.for_range(builder, n_chunks) as loop:
                d0 = builder.mul(loop.index, vir.as_index(VW))
                qv = vir.load_vector(builder, qp, builder.add(q_off_, d0), VW)
                for j in range(VW):
                    key_index = vir.strided_index(builder, k_off_, j, k_stride_, d0)
                    vir.accumulate_fma(builder, accs[j], qv, vir.load_float32_vector(builder, kp, key_index, VW))
        total = vir.butterfly_sum(builder, [builder.load(acc) for acc in accs])
        vir.store_vector(builder, total, sp, s_off_)
        return context.get_dummy_value()

    return sig, codegen


@intrinsic
def rows_as_float32(typingctx, x, x_off, scales, s_off, s_stride, block, E, out, out_off, n_rows):
    """out[out_off + i·E + d] = row_i[d] as float32 for i < n_rows, d < E: the rows of a key or value
    store dequantised once, VW lanes a step, for loops that read each row many times (the prefill's
    micro-kernels; decode's query rows of a GQA group). Row i starts at x[x_off + i·E] (4-bit:
    x[x_off + i·E/2], bytes) and its scales at scales[s_off + i·s_stride]:

        float32, float16 bits (uint16)   as is / ``fpext``, exact (``scales`` is not read)
        int8                             code·scales[… + b] for entry d in block b = d // block (the
                                         last block may be short; block = E for one scale per row)
        4-bit (uint8, two codes a byte)  code·step + min (one ``fma``), (step, min) the float16 bits
                                         scales[… + 2b], scales[… + 2b + 1]; entry w of a block is the
                                         low nibble of its byte w, entry w + block/2 the high nibble

    the rounding of the decode loops that convert in registers (code·scale once; ``load_float32_vector``,
    ``load_nibbles_vector``). Needs E and block multiples of VW (4-bit: block/2 a multiple of VW and
    E a multiple of block)."""
    if not (is_c_array(x, types.float32, types.uint16, types.int8, types.uint8) and is_c_array(out, types.float32)):
        return None
    if x.dtype == types.int8 and not is_c_array(scales, types.float32):
        return None
    if x.dtype == types.uint8 and not is_c_array(scales, types.uint16):
        return None
    if not isinstance(scales, types.Array):
        return None
    i64 = types.int64
    kind = "q4" if x.dtype == types.uint8 else "int8" if x.dtype == types.int8 else "float"

    def codegen(context, builder, signature, args):
        x_, x_off_, scales_, s_off_, s_stride_, block_, E_, out_, out_off_, n_rows_ = args
        xp = vir.data_pointer(context, builder, x, x_)
        sp = vir.data_pointer(context, builder, scales, scales_)
        op = vir.data_pointer(context, builder, out, out_)
        lanes = vir.as_index(VW)
        if kind == "float":
            block_ = E_
        n_blocks = builder.udiv(builder.add(E_, builder.sub(block_, vir.as_index(1))), block_)
        half = builder.lshr(block_, vir.as_index(1))
        row_length = builder.lshr(E_, vir.as_index(1)) if kind == "q4" else E_
        with cgutils.for_range(builder, n_rows_) as rows:
            i = rows.index
            x_row = vir.strided_index(builder, x_off_, i, row_length)
            out_row = vir.strided_index(builder, out_off_, i, E_)
            s_row = vir.strided_index(builder, s_off_, i, s_stride_)
            with cgutils.for_range(builder, n_blocks) as blocks:
                b = blocks.index
                e0 = builder.mul(b, block_)  # the block's first entry
                if kind == "q4":
                    pair = builder.add(s_row, builder.mul(b, vir.as_index(2)))
                    step = vir.load_half(builder, sp, pair)
                    low = vir.load_half(builder, sp, builder.add(pair, vir.as_index(1)))
                    y0 = builder.add(x_row, builder.mul(b, half))  # the block's first byte
                    with cgutils.for_range(builder, builder.udiv(half, lanes)) as chunks:
                        w = builder.mul(chunks.index, lanes)
                        at = builder.add(y0, w)
                        entry = builder.add(out_row, builder.add(e0, w))
                        for high, offset in ((False, entry), (True, builder.add(entry, half))):
                            vector = vir.load_nibbles_vector(builder, xp, at, VW, high, step, low)
                            vir.store_vector(builder, vector, op, offset)
                else:
                    scale = None
                    if kind == "int8":
                        scale = vir.load_element(builder, sp, builder.add(s_row, b))
                    rest = builder.sub(E_, e0)
                    width = builder.select(builder.icmp_unsigned("<", rest, block_), rest, block_)
                    with cgutils.for_range(builder, builder.udiv(width, lanes)) as chunks:
                        d = builder.add(e0, builder.mul(chunks.index, lanes))
                        vector = vir.load_float32_vector(builder, xp, builder.add(x_row, d), VW, scale)
                        vir.store_vector(builder, vector, op, builder.add(out_row, d))
        return context.get_dummy_value()

    return types.void(x, i64, scales, i64, i64, i64, i64, out, i64, i64), codegen


#: quantised keys scored per pass (``_int8_key_sums``, ``key_scores_q4``): each needs a block sum and an
#: accumulator in registers, so 4 where there are 16 vector registers (AVX2, SSE: VW ≤ 8), 8 with 32
#: (AVX-512; NEON has VW = 4)
KEYS_PER_PASS = min(VW, 4 if VW <= 8 else 8)


def _int8_key_sums(builder, qp, q_off, kp, k_off, k_stride, ksp, ks_off, ks_stride, shift, E, accs):
    """accs[j] += Σ_b scale_{j,b}·Σ_{d in block b} q[q_off + d]·k8_j[d] (lane by lane, lanes summed later) for
    the VW int8 keys j, blocks of 2^shift entries (the last one may be short; a shift with 2^shift ≥ E
    is one block, one scale per row).

    Per block the products of the raw int8 codes (``sitofp``, exact) are summed in a float32 vector, which
    is then scaled once (one ``fma`` per key and block, not one multiply per key and vector); keys go
    KEYS_PER_PASS at a time, so the block sums and the accumulators stay in registers."""
    size = builder.shl(vir.as_index(1), shift)
    n_blocks = builder.lshr(builder.add(E, builder.sub(size, vir.as_index(1))), shift)
    for first in range(0, VW, KEYS_PER_PASS):
        keys = range(first, first + KEYS_PER_PASS)
        sums = [vir.accumulator(builder, vir.zeros(ir.FloatType(), VW)) for _ in keys]
        with cgutils.for_range(builder, n_blocks) as blocks:
            b = blocks.index
            e0 = builder.shl(b, shift)
            left = builder.sub(E, e0)
            width = builder.select(builder.icmp_unsigned("<", left, size), left, size)
            for slot in sums:
                builder.store(vir.zeros(ir.FloatType(), VW), slot)
            with cgutils.for_range(builder, builder.udiv(width, vir.as_index(VW))) as chunks:
                d0 = builder.add(e0, builder.mul(chunks.index, vir.as_index(VW)))
                qv = vir.load_vector(builder, qp, builder.add(q_off, d0), VW)
                for slot, j in zip(sums, keys):
                    key_index = vir.strided_index(builder, k_off, j, k_stride, d0)
                    vir.accumulate_fma(builder, slot, qv, vir.load_float32_vector(builder, kp, key_index, VW))
            for slot, j in zip(sums, keys):
                scale = vir.load_element(builder, ksp, vir.strided_index(builder, ks_off, j, ks_stride, b))
                vir.accumulate_fma(builder, accs[j], builder.load(slot), vir.splat(builder, scale, VW))


@intrinsic
def key_scores_q4(typingctx, q, q_off, k, k_off, k_stride, ks, ks_off, ks_stride, block, E, s, s_off):
    """``key_scores`` for 4-bit keys: s[s_off + j] = Σ_{d<E} q[q_off + d]·key_j[d] for j < VW, where key j's
    row is the E/2 bytes k[k_off + j·k_stride …] (two codes per byte, blocks of ``block`` entries: entry w of
    a block is the low nibble of its byte w, entry w + block/2 the high nibble; ``quantised``'s packing)
    and key_j[d] = code·step + min with the block's (step, min) float16 bits at ks[ks_off + j·ks_stride + 2b].
    Per block b, step·Σ_d q[d]·code_j[d] + min·Σ_d q[d] (as ``quantised.q4_dot``): the row's bytes VW at a
    time (block/2 a multiple of VW), each byte vector giving the codes of the low and the high half, dotted
    (raw, ``uitofp``) with the two matching query vectors; the block's sums are scaled once per key
    (two FMAs), keys KEYS_PER_PASS at a time so that the sums and accumulators stay in registers."""
    if not (
        is_c_array(q, types.float32)
        and is_c_array(s, types.float32)
        and is_c_array(ks, types.uint16)
        and is_c_array(k, types.uint8)
    ):
        return None
    i64 = types.int64
    sig = types.void(q, i64, k, i64, i64, ks, i64, i64, i64, i64, s, i64)

    def codegen(context, builder, signature, args):
        q_, q_off_, k_, k_off_, k_stride_, ks_, ks_off_, ks_stride_, block_, E_, s_, s_off_ = args
        qp = vir.data_pointer(context, builder, q, q_)
        kp = vir.data_pointer(context, builder, k, k_)
        ksp = vir.data_pointer(context, builder, ks, ks_)
        sp = vir.data_pointer(context, builder, s, s_)
        f32 = ir.FloatType()
        accs = [vir.accumulator(builder, vir.zeros(f32, VW)) for _ in range(VW)]
        half = builder.lshr(block_, vir.as_index(1))  # bytes per block
        n_blocks = builder.udiv(builder.lshr(E_, vir.as_index(1)), half)
        for first in range(0, VW, KEYS_PER_PASS):
            keys = range(first, first + KEYS_PER_PASS)
            sums = [vir.accumulator(builder, vir.zeros(f32, VW)) for _ in keys]
            q_sum = vir.accumulator(builder, vir.zeros(f32, VW))
            with cgutils.for_range(builder, n_blocks) as blocks:
                b = blocks.index
                y0 = builder.mul(b, half)  # the block's first byte
                for slot in (*sums, q_sum):
                    builder.store(vir.zeros(f32, VW), slot)
                with cgutils.for_range(builder, builder.udiv(half, vir.as_index(VW))) as chunks:
                    y = builder.add(y0, builder.mul(chunks.index, vir.as_index(VW)))  # byte offset in the row
                    low_entry = builder.add(q_off_, builder.add(y, y0))  # entry of the low nibble of byte y
                    q_low = vir.load_vector(builder, qp, low_entry, VW)
                    q_high = vir.load_vector(builder, qp, builder.add(low_entry, half), VW)
                    builder.store(builder.fadd(builder.load(q_sum), builder.fadd(q_low, q_high)), q_sum)
                    for slot, j in zip(sums, keys):
                        byte_index = vir.strided_index(builder, k_off_, j, k_stride_, y)
                        vir.accumulate_fma(
                            builder, slot, q_low, vir.load_nibble_codes(builder, kp, byte_index, VW, False)
                        )
                        vir.accumulate_fma(
                            builder, slot, q_high, vir.load_nibble_codes(builder, kp, byte_index, VW, True)
                        )
                pair = builder.mul(b, vir.as_index(2))
                for slot, j in zip(sums, keys):
                    scale_index = vir.strided_index(builder, ks_off_, j, ks_stride_, pair)
                    step = vir.load_half(builder, ksp, scale_index)
                    low = vir.load_half(builder, ksp, builder.add(scale_index, vir.as_index(1)))
                    vir.accumulate_fma(builder, accs[j], builder.load(slot), vir.splat(builder, step, VW))
                    vir.accumulate_fma(builder, accs[j], builder.load(q_sum), vir.splat(builder, low, VW))
        total = vir.butterfly_sum(builder, [builder.load(acc) for acc in accs])
        vir.store_vector(builder, total, sp, s_off_)
        return context.get_dummy_value()

    return sig, codegen


@njit(inline="always")
def _scores_of_converted(qs, kn, k_scales, block, j0, done, s):
    """s[r, j] = qs[r]·key_{j0+j} for every row r and j < done (a multiple of VW), for keys stored as int8,
    4-bit codes or float16 bits that several query rows share (a GQA group, a few query tokens): VW keys
    at a time converted into a float32 scratch once (``rows_as_float32``, scale blocks of ``block``
    entries), then scored for every row by the float32 ``key_scores`` from L1, instead of each row
    converting every key again. Memory: VW·E float32. Returns done."""
    E = qs.shape[1]
    row = kn.shape[1]  # entries (bytes for 4-bit codes) per stored key
    nbk = k_scales.shape[1] if k_scales.ndim > 1 else 0
    scratch = np.empty(VW * E, np.float32)
    for j in range(0, done, VW):
        rows_as_float32(kn, (j0 + j) * row, k_scales, (j0 + j) * nbk, nbk, block, E, scratch, 0, VW)
        for r in range(qs.shape[0]):
            # float32 rows have no scales: the query stands in for the unused scale array
            key_scores(qs, r * E, scratch, 0, E, qs, 0, 0, 0, E, s, r * s.shape[1] + j)
    return done


def rows_of_key_scores(qs, kn, k_scales, k_block, j0, nk, s):  # pragma: no cover - numba overload below
    raise TypeError("rows_of_key_scores is a numba kernel helper: call it from @njit code")


@overload(rows_of_key_scores)
def _rows_of_key_scores_overload(qs, kn, k_scales, k_block, j0, nk, s):
    """s[r, j] = qs[r]·key_{j0+j} for every row r and the first nk//VW·VW keys, VW keys per
    ``key_scores`` (``key_scores_q4`` for 4-bit keys; with several rows, keys stored narrower than float32 are
    converted once for all of them: ``_scores_of_converted``); returns how many keys it did (0 where it does not
    apply: a float64 query, a head dim that is not a multiple of VW, int8 scale blocks narrower than VW,
    4-bit keys whose half blocks are not a multiple of VW)."""
    if is_c_array(qs, types.float32) and is_c_array(s, types.float32) and is_c_array(kn, types.uint8):
        if not is_c_array(k_scales, types.uint16):
            return lambda qs, kn, k_scales, k_block, j0, nk, s: 0

        def impl_q4(qs, kn, k_scales, k_block, j0, nk, s):
            row = kn.shape[1]  # bytes per key: E / 2
            E = qs.shape[1]
            nbk = k_scales.shape[1]
            if (k_block // 2) % VW != 0:
                return 0
            done = nk // VW * VW
            if qs.shape[0] > 1:
                return _scores_of_converted(qs, kn, k_scales, k_block, j0, done, s)
            for j in range(0, done, VW):
                key_scores_q4(qs, 0, kn, (j0 + j) * row, row, k_scales, (j0 + j) * nbk, nbk, k_block, E, s, j)
            return done

        return impl_q4
    if not (
        is_c_array(qs, types.float32)
        and is_c_array(s, types.float32)
        and is_c_array(kn, types.float32, types.uint16, types.int8)
    ):
        return lambda qs, kn, k_scales, k_block, j0, nk, s: 0
    if kn.dtype == types.int8:
        if not is_c_array(k_scales, types.float32):
            return lambda qs, kn, k_scales, k_block, j0, nk, s: 0

        def impl_int8(qs, kn, k_scales, k_block, j0, nk, s):
            E = kn.shape[1]
            nbk = k_scales.shape[1]
            if E % VW != 0 or (nbk > 1 and k_block % VW != 0):
                return 0
            shift = 0  # one scale per row: every d0 >> shift is 0
            while (1 << shift) < (k_block if nbk > 1 else E):
                shift += 1
            done = nk // VW * VW
            if qs.shape[0] == 1:
                for j in range(0, done, VW):
                    key_scores(qs, 0, kn, (j0 + j) * E, E, k_scales, (j0 + j) * nbk, nbk, shift, E, s, j)
                return done
            return _scores_of_converted(qs, kn, k_scales, k_block if nbk > 1 else E, j0, done, s)

        return impl_int8

    converts = kn.dtype != types.float32  # float16 bits

    def impl_float(qs, kn, k_scales, k_block, j0, nk, s):
        E = kn.shape[1]
        if E % VW != 0:
            return 0
        done = nk // VW * VW
        if converts and qs.shape[0] > 1:
            return _scores_of_converted(qs, kn, qs, E, j0, done, s)
        # float keys have no scales: the query stands in for the unused scale array
        for r in range(qs.shape[0]):
            for j in range(0, done, VW):
                key_scores(qs, r * E, kn, (j0 + j) * E, E, qs, 0, 0, 0, E, s, r * s.shape[1] + j)
        return done

    return impl_float


def _make_value_rows(rows, chunks):
    """acc[i] += Σ_j p[i, j]·v_j over a rows × (chunks·VW columns) tile held in registers.

    Value row j's columns col0 … col0 + chunks·VW - 1 are at v[v_off + j·v_stride + c·VW …] (float or
    int8 values; int8 times the scale vs[vs_off + j·vs_stride + (col0 >> shift)]: the tile's columns lie in
    one scale block, so one scale per key multiplies the rows' weights p[i, j] where there are fewer rows
    than vectors, else the vectors)."""

    def value_rows(
        typingctx,
        p,
        p_off,
        p_stride,
        v,
        v_off,
        v_stride,
        vs,
        vs_off,
        vs_stride,
        col0,
        shift,
        acc,
        acc_off,
        acc_stride,
        nk,
    ):
        if not (
            is_c_array(p, types.float32)
            and is_c_array(acc, types.float32)
            and is_c_array(vs, types.float32)
            and is_c_array(v, types.float32, types.uint16, types.int8)
        ):
            return None
        i64 = types.int64
        sig = types.void(p, i64, i64, v, i64, i64, vs, i64, i64, i64, i64, acc, i64, i64, i64)
        kind = v.dtype

        def codegen(context, builder, signature, args):
            (
                p_,
                p_off_,
                p_stride_,
                v_,
                v_off_,
                v_stride_,
                vs_,
                vs_off_,
                vs_stride_,
                col0_,
                shift_,
                acc_,
                acc_off_,
                acc_stride_,
                nk_,
            ) = args
            pp = vir.data_pointer(context, builder, p, p_)
            vp = vir.data_pointer(context, builder, v, v_)
            vsp = vir.data_pointer(context, builder, vs, vs_)
            ap = vir.data_pointer(context, builder, acc, acc_)

            def acc_index(i, c):
                return vir.strided_index(builder, acc_off_, i, acc_stride_, c * VW)

            accs = vir.tile_accumulators(builder, ap, acc_index, rows, chunks, VW)
            with cgutils.for_range(builder, nk_) as loop:
                j = loop.index
                weights = [
                    vir.load_element(builder, pp, vir.strided_index(builder, p_off_, i, p_stride_, j))
                    for i in range(rows)
                ]
                scale = None
                if kind == types.int8:  # one scale for the tile's columns
                    scale_index = vir.strided_index(builder, vs_off_, j, vs_stride_, builder.lshr(col0_, shift_))
                    scale = vir.load_element(builder, vsp, scale_index)
                    if rows < chunks:  # fewer weights than vectors: scale the weights (scalar multiplies)
                        weights = [builder.fmul(weight, scale) for weight in weights]
                        scale = None
                vals = [
                    vir.load_float32_vector(
                        builder, vp, vir.strided_index(builder, v_off_, j, v_stride_, c * VW), VW, scale
                    )
                    for c in range(chunks)
                ]
                vir.rank1_update(builder, accs, weights, vals)
            vir.store_tile(builder, accs, ap, acc_index)
            return context.get_dummy_value()

        return sig, codegen

    value_rows.__name__ = value_rows.__qualname__ = f"value_rows_{rows}x{chunks}"
    return intrinsic(value_rows)


value_rows_4x4 = _make_value_rows(4, 4)
value_rows_4x2 = _make_value_rows(4, 2)
value_rows_4x1 = _make_value_rows(4, 1)
value_rows_3x4 = _make_value_rows(3, 4)
value_rows_3x2 = _make_value_rows(3, 2)
value_rows_3x1 = _make_value_rows(3, 1)
value_rows_2x4 = _make_value_rows(2, 4)
value_rows_2x2 = _make_value_rows(2, 2)
value_rows_2x1 = _make_value_rows(2, 1)
value_rows_1x8 = _make_value_rows(1, 8)
value_rows_1x4 = _make_value_rows(1, 4)
value_rows_1x2 = _make_value_rows(1, 2)
value_rows_1x1 = _make_value_rows(1, 1)

#: vectors of columns in a four-row value tile: NV (the prefill tile's vectors per row, 2 where there are 16
#: vector registers, 4 with 32) rounded down to 4, 2 or 1, so its 4·NV accumulators leave registers for the
#: value vectors and weights (4 × 4 on AVX2 spilled accumulators in every step)
FOUR_ROW_VECTORS = 4 if NV >= 4 else (2 if NV >= 2 else 1)


def _make_value_rows_q4(rows, pairs):
    """acc[i] += Σ_j p[i, j]·v_j for 4-bit values over a rows × (2·pairs·VW columns) tile in registers.

    Value row j is the bytes v[v_off + j·v_stride …] (two codes per byte, ``quantised``'s packing); the
    tile is the bytes y0 … y0 + pairs·VW - 1 of each row: byte vector i (block b = y / (block/2))
    holds the codes of columns y + b·block/2 … (low nibbles) and those block/2 further on (high
    nibbles), so one load, one ``and`` and one constant shift give two column vectors, dequantised
    with the block's (step, min) float16 bits at vs[vs_off + j·vs_stride + 2b] (read once per byte
    vector). ``acc_off``: row 0 of the tile, column 0; the columns are found from the bytes."""

    def value_rows_q4(
        typingctx, p, p_off, p_stride, v, v_off, v_stride, vs, vs_off, vs_stride, y0, block, acc, acc_off, acc_stride, n
    ):
        if not (
            is_c_array(p, types.float32)
            and is_c_array(acc, types.float32)
            and is_c_array(vs, types.uint16)
            and is_c_array(v, types.uint8)
        ):
            return None
        i64 = types.int64
        sig = types.void(p, i64, i64, v, i64, i64, vs, i64, i64, i64, i64, acc, i64, i64, i64)

        def codegen(context, builder, signature, args):
            p_, p_off_, p_stride_, v_, v_off_, v_stride_, vs_, vs_off_, vs_stride_, y0_, block_ = args[:11]
            acc_, acc_off_, acc_stride_, nk_ = args[11:]
            pp = vir.data_pointer(context, builder, p, p_)
            vp = vir.data_pointer(context, builder, v, v_)
            vsp = vir.data_pointer(context, builder, vs, vs_)
            ap = vir.data_pointer(context, builder, acc, acc_)
            half = builder.lshr(block_, vir.as_index(1))
            places, columns = [], []
            for i in range(pairs):  # loop-invariant: each byte vector's offset, block and two columns
                y = builder.add(y0_, vir.as_index(i * VW))
                b = builder.udiv(y, half)
                low_column = builder.add(y, builder.mul(b, half))
                places.append((y, builder.mul(b, vir.as_index(2))))
                columns += [low_column, builder.add(low_column, half)]

            def acc_index(r, c):
                return vir.strided_index(builder, acc_off_, r, acc_stride_, columns[c])

            accs = vir.tile_accumulators(builder, ap, acc_index, rows, 2 * pairs, VW)
            with cgutils.for_range(builder, nk_) as loop:
                j = loop.index
                vals = []
                for y, pair in places:
                    scale_index = vir.strided_index(builder, vs_off_, j, vs_stride_, pair)
                    step = vir.load_half(builder, vsp, scale_index)
                    low = vir.load_half(builder, vsp, builder.add(scale_index, vir.as_index(1)))
                    byte_index = vir.strided_index(builder, v_off_, j, v_stride_, y)
                    vals.append(vir.load_nibbles_vector(builder, vp, byte_index, VW, False, step, low))
                    vals.append(vir.load_nibbles_vector(builder, vp, byte_index, VW, True, step, low))
                weights = [
                    vir.load_element(builder, pp, vir.strided_index(builder, p_off_, r, p_stride_, j))
                    for r in range(rows)
                ]
                vir.rank1_update(builder, accs, weights, vals)
            vir.store_tile(builder, accs, ap, acc_index)
            return context.get_dummy_value()

        return sig, codegen

    value_rows_q4.__name__ = value_rows_q4.__qualname__ = f"value_rows_q4_{rows}x{pairs}"
    return intrinsic(value_rows_q4)


value_rows_q4_4x2 = _make_value_rows_q4(4, 2)
value_rows_q4_4x1 = _make_value_rows_q4(4, 1)
value_rows_q4_1x2 = _make_value_rows_q4(1, 2)
value_rows_q4_1x1 = _make_value_rows_q4(1, 1)


def rows_of_values(s, vn, v_scales, v_block, j0, nk, acc):  # pragma: no cover - numba overload below
    raise TypeError("rows_of_values is a numba kernel helper: call it from @njit code")


@overload(rows_of_values)
def _rows_of_values_overload(s, vn, v_scales, v_block, j0, nk, acc):
    """acc[r, :] += Σ_{j<nk} s[r, j]·v_{j0+j} for every row and column, in register tiles of 4, 3, 2 or 1
    rows × 4, 2 or 1 vectors of columns, 8 for a single row of float32 values (``value_rows_*``; see
    ``_value_tiles``, ``_row_tiles``); returns True, or False without doing
    anything where it does not apply (float64, a value dim that is not a multiple of VW, int8
    scale blocks narrower than VW, 4-bit half blocks that are not a multiple of VW)."""
    if is_c_array(s, types.float32) and is_c_array(acc, types.float32) and is_c_array(vn, types.uint8):
        if not is_c_array(v_scales, types.uint16):
            return lambda s, vn, v_scales, v_block, j0, nk, acc: False

        def impl_q4(s, vn, v_scales, v_block, j0, nk, acc):
            if acc.shape[1] % VW != 0 or (v_block // 2) % VW != 0:
                return False
            R = acc.shape[0]
            for r in range(0, R, 4):
                if r + 4 <= R:
                    _q4_row_tiles(True, r, s, vn, v_scales, v_block, j0, nk, acc)
                else:
                    for rr in range(r, R):
                        _q4_row_tiles(False, rr, s, vn, v_scales, v_block, j0, nk, acc)
            return True

        return impl_q4
    if not (
        is_c_array(s, types.float32)
        and is_c_array(acc, types.float32)
        and is_c_array(vn, types.float32, types.uint16, types.int8)
    ):
        return lambda s, vn, v_scales, v_block, j0, nk, acc: False
    is_int8 = vn.dtype == types.int8
    if is_int8 and not is_c_array(v_scales, types.float32):
        return lambda s, vn, v_scales, v_block, j0, nk, acc: False

    if is_int8:

        def impl_int8(s, vn, v_scales, v_block, j0, nk, acc):
            Ev = vn.shape[1]
            nb = v_scales.shape[1]
            if Ev % VW != 0 or (nb > 1 and v_block % VW != 0):
                return False
            shift = 0
            while (1 << shift) < (v_block if nb > 1 else Ev):  # one scale per row: every column → 0
                shift += 1
            # tiles no wider than a scale block (blocks are powers of two ≥ VW, so a tile never straddles two)
            cap = 4 * VW if nb == 1 else min(4 * VW, 1 << shift)
            _value_tiles(s, vn, v_scales, nb, shift, cap, j0, nk, acc)
            return True

        return impl_int8

    # one row (a head of its own) of float32 values: tiles of 8 vectors, each value row read in one pass
    # (its loads fold into the FMAs: 8 accumulators fit in 16 registers); values that need converting
    # (float16, int8) keep 4: their converted vectors would not fit beside 8 accumulators on AVX2
    cap = 8 * VW if vn.dtype == types.float32 else 4 * VW

    def impl_float(s, vn, v_scales, v_block, j0, nk, acc):
        if vn.shape[1] % VW != 0:
            return False
        _value_tiles(s, vn, s, 0, 0, cap, j0, nk, acc)  # float values have no scales: s stands in
        return True

    return impl_float


@njit(inline="always")
def _value_tiles(s, vn, scales, nb, shift, cap, j0, nk, acc):
    """Cover acc (R, Ev) with tiles: 4 rows at a time, the 3 or 2 rows left over as one tile (each value
    row is then read once per group of rows: the rows of a grouped-query head one at a time read it 3
    times from L2, the decode kernel's bound at a few hundred cached keys), a last single row alone;
    4, 2 or 1 vectors of columns, at most ``cap`` columns (a power of two times VW)."""
    R = acc.shape[0]
    r = 0
    while r < R:
        # one call site: _row_tiles is inlined once (its 12 tiles), not once per row count (48 tiles to
        # compile: ~2 s of a cold start)
        rows = min(4, R - r)
        _row_tiles(rows, r, s, vn, scales, nb, shift, cap, j0, nk, acc)
        r += rows


@njit(inline="always")
def _q4_row_tiles(four, r, s, vn, scales, block, j0, nk, acc):
    """Rows r … r+3 (``four``) or row r of acc, for 4-bit values: the row's bytes in tiles of 2 or 1
    byte vectors (each two vectors of columns, ``value_rows_q4``)."""
    Ev = acc.shape[1]
    row = vn.shape[1]  # bytes per value row: Ev / 2
    nb = scales.shape[1]
    ps = s.shape[1]
    y = 0
    while y < row:
        a = (s, r * ps, ps, vn, j0 * row, row, scales, j0 * nb, nb, y, block, acc, r * Ev, Ev, nk)
        if row - y >= 2 * VW:
            if four:
                value_rows_q4_4x2(*a)
            else:
                value_rows_q4_1x2(*a)
            y += 2 * VW
        else:
            if four:
                value_rows_q4_4x1(*a)
            else:
                value_rows_q4_1x1(*a)
            y += VW


@njit(inline="always")
def _row_tiles(rows, r, s, vn, scales, nb, shift, cap, j0, nk, acc):
    """Rows r … r + rows - 1 of acc (rows = 1 … 4), across all Ev columns in tiles of 4, 2 or 1 vectors (at
    most ``cap`` columns; several rows at most FOUR_ROW_VECTORS vectors: each tile starts at a multiple of
    its width, so none straddles a block of ``cap``)."""
    Ev = vn.shape[1]
    ps = s.shape[1]
    e = 0
    while e < Ev:
        left = min(Ev - e, cap, FOUR_ROW_VECTORS * VW if rows > 1 else 8 * VW)
        width = 8 * VW if left >= 8 * VW else (4 * VW if left >= 4 * VW else (2 * VW if left >= 2 * VW else VW))
        a = (s, r * ps, ps, vn, j0 * Ev + e, Ev, scales, j0 * nb, nb, e, shift, acc, r * Ev + e, Ev, nk)
        if rows == 4:
            if width == 4 * VW:
                value_rows_4x4(*a)
            elif width == 2 * VW:
                value_rows_4x2(*a)
            else:
                value_rows_4x1(*a)
        elif rows == 3:
            if width == 4 * VW:
                value_rows_3x4(*a)
            elif width == 2 * VW:
                value_rows_3x2(*a)
            else:
                value_rows_3x1(*a)
        elif rows == 2:
            if width == 4 * VW:
                value_rows_2x4(*a)
            elif width == 2 * VW:
                value_rows_2x2(*a)
            else:
                value_rows_2x1(*a)
        elif width == 8 * VW:  # one row (a head of its own): 8 accumulators, one pass over each value row
            value_rows_1x8(*a)
        elif width == 4 * VW:
            value_rows_1x4(*a)
        elif width == 2 * VW:
            value_rows_1x2(*a)
        else:
            value_rows_1x1(*a)
        e += width
