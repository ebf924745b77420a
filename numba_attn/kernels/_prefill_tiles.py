"""Register-tiled float32 micro-kernels for the prefill kernel, written as LLVM vector IR.

The one product both halves of prefill attention need is a rank-T update of a small tile:

    C[i, 0:W] (+)= Σ_{t < T} A[i, t] · B[t, 0:W]         for i < KI

- scores:  C = st[j..j+KI-1, 0:W] (KI keys × W query rows), A[i, t] = K[j+i, t], B[t] = qᵀ[t, 0:W], T = E;
- P·V:     C = accᵀ[e..e+KI-1, 0:W] (KI value columns × W rows), A[i, t] = V[t, e+i], B[t] = pᵀ[t, 0:W], T = keys.

Written as plain numba loops, LLVM vectorises only the innermost loop (along the W rows), so the
accumulators go to memory and back every few FMAs (~75 % of the FMA peak). Here the KI × W
accumulators are vector values that live in registers for the whole loop over t: per step, NV
vector loads of B, KI scalar loads of A broadcast to vectors, and KI·NV fused multiply-adds; C is
read (for +=) and written once per tile. The IR is generic (``<VW x float>``, ``llvm.fma``), so
LLVM emits AVX-512, AVX2, SSE or NEON code for whatever CPU numba targets.

Tile shape (a family, ``tile_kernel(accumulate, ki, vw, nv)``): KI rows of A × NV vectors of VW
lanes (W = VW·NV query rows), KI·NV accumulators + NV operands + 1 broadcast inside the register
file (16 vectors with SSE/AVX/AVX2, 32 with AVX-512 and NEON). The kernels use
``config.tile_shape``'s: a shape ``python -m numba_attn tune`` measured best on this CPU, else
``NUMBA_ATTN_TILE``, else the instruction set's default (16×4×4 AVX-512, 8×2×4 AVX2, 4×4×4
NEON, 4×2×4 otherwise; lanes × vectors × rows). Keys or columns left over after the groups of KI
go through tiles of 4, 2 and 1 rows; ``prefill`` pads a group of query rows to W.

Measured (Zen 3 AVX2, one core, B contiguous: ``tune``): 8×2×4 at ~90-93 GFLOP/s on a prefill work
item's products (the core's peak ~100); llvm-mca (``scripts/mca_model.py``) models the 4×4×4 NEON
tiles at 97-100 % of the cortex-a72/a76 FMA peak.

``softmax_tile``: the streaming-softmax step of one tile's W rows, in the same vector IR.

Arrays must be C-contiguous float32 (checked at typing); offsets and strides are in elements.
The IR is assembled from the helpers in ``_vector_ir`` (shared with ``_decode_tiles``).
"""

from llvmlite import ir
from numba import types
from numba.core import cgutils
from numba.extending import intrinsic, overload

from .. import config
from . import _vector_ir as vir
from ._vector_ir import is_c_array

#: chosen per target in config.tile_shape (a tuned shape, NUMBA_ATTN_TILE, or the instruction set's default):
#: vector width (lanes), vectors per tile row, rows of A (keys, or value columns) per tile
VW, NV, KI = config.TILE_VW, config.TILE_NV, config.TILE_KI
#: query rows per tile
W = VW * NV


def is_c_f32(x):
    return is_c_array(x, types.float32)


def _make(accumulate, ki, vw, nv):
    """The @intrinsic C (+)= A·B on one ki × (nv·vw) tile: ki·nv accumulators of ``<vw x float>``."""

    def microkernel(typingctx, a, a_off, a_si, a_st, b, b_off, b_st, c, c_off, c_si, T):
        if not (is_c_f32(a) and is_c_f32(b) and is_c_f32(c)):
            return None
        i64 = types.int64
        sig = types.void(a, i64, i64, i64, b, i64, i64, c, i64, i64, i64)

        def codegen(context, builder, signature, args):
            a_, a_off_, a_si_, a_st_, b_, b_off_, b_st_, c_, c_off_, c_si_, T_ = args
            ap = vir.data_pointer(context, builder, a, a_)
            bp = vir.data_pointer(context, builder, b, b_)
            cp = vir.data_pointer(context, builder, c, c_)

            def c_index(i, m):
                return vir.strided_index(builder, c_off_, i, c_si_, vw * m)

            # ki × nv accumulators, in registers for the whole loop over t
            accs = vir.tile_accumulators(builder, cp, c_index, ki, nv, vw, zero=not accumulate)
            with cgutils.for_range(builder, T_) as loop:
                t = loop.index
                bvs = [
                    vir.load_vector(builder, bp, vir.strided_index(builder, b_off_, t, b_st_, vw * m), vw)
                    for m in range(nv)
                ]
                a_col = vir.strided_index(builder, a_off_, t, a_st_)
                a_t = [vir.load_element(builder, ap, vir.strided_index(builder, a_col, i, a_si_)) for i in range(ki)]
                vir.rank1_update(builder, accs, a_t, bvs)
            vir.store_tile(builder, accs, cp, c_index)
            return context.get_dummy_value()

        return sig, codegen

    microkernel.__name__ = microkernel.__qualname__ = f"tile_{'add' if accumulate else 'set'}_{ki}x{nv}x{vw}"
    return intrinsic(microkernel)


_TILES = {}


def tile_kernel(accumulate, ki, vw, nv):
    """The micro-kernel of one shape (built once): ki rows of A × nv vectors of vw lanes."""
    key = (accumulate, ki, vw, nv)
    if key not in _TILES:
        _TILES[key] = _make(accumulate, ki, vw, nv)
    return _TILES[key]


#: C = A·B on one KI × W tile (scores: overwrite)
tile_set = tile_kernel(False, KI, VW, NV)
#: C += A·B on one KI × W tile (P·V: accumulate)
tile_add = tile_kernel(True, KI, VW, NV)


def tile_scores(qt, kn, j0, nk, st, nr):  # pragma: no cover - numba overload below
    raise TypeError("tile_scores is a numba kernel helper: call it from @njit code")


def tile_values(pt, vn, j0, nk, acct, nr):  # pragma: no cover - numba overload below
    raise TypeError("tile_values is a numba kernel helper: call it from @njit code")


#: the smaller tiles that cover what is left after the groups of KI (at most KI - 1 rows of A)
_REST = (4, 2, 1)
_set4, _set2, _set1 = (tile_kernel(False, ki, VW, NV) for ki in _REST)
_add4, _add2, _add1 = (tile_kernel(True, ki, VW, NV) for ki in _REST)


@overload(tile_scores)
def _tile_scores_overload(qt, kn, j0, nk, st, nr):
    """st[j, r] = Σ_d kn[j0 + j, d]·qt[d, r] for every key j < nk and the rows r < nr//W·W: KI keys per
    tile, the last nk % KI keys by tiles of 4, 2 and 1; returns nr//W·W (the rows done). Any other
    dtype or layout: does nothing and returns 0."""
    if not (is_c_f32(qt) and is_c_f32(kn) and is_c_f32(st)):
        return lambda qt, kn, j0, nk, st, nr: 0

    def impl(qt, kn, j0, nk, st, nr):
        E = qt.shape[0]
        ks = kn.shape[1]  # row stride of the keys (= E)
        ss = st.shape[1]
        rows_done = nr // W * W
        for r0 in range(0, rows_done, W):
            j = 0
            while j + KI <= nk:
                tile_set(kn, (j0 + j) * ks, ks, 1, qt, r0, qt.shape[1], st, j * ss + r0, ss, E)
                j += KI
            if KI > 4 and j + 4 <= nk:
                _set4(kn, (j0 + j) * ks, ks, 1, qt, r0, qt.shape[1], st, j * ss + r0, ss, E)
                j += 4
            if KI > 2 and j + 2 <= nk:
                _set2(kn, (j0 + j) * ks, ks, 1, qt, r0, qt.shape[1], st, j * ss + r0, ss, E)
                j += 2
            if KI > 1 and j < nk:
                _set1(kn, (j0 + j) * ks, ks, 1, qt, r0, qt.shape[1], st, j * ss + r0, ss, E)
        return rows_done

    return impl


@overload(tile_values)
def _tile_values_overload(pt, vn, j0, nk, acct, nr):
    """acct[e, r] += Σ_{j < nk} pt[j, r]·vn[j0 + j, e] for every column e < Ev and the rows r < nr//W·W:
    KI columns per tile, the last Ev % KI columns by tiles of 4, 2 and 1; returns nr//W·W. Any other
    dtype or layout: does nothing and returns 0."""
    if not (is_c_f32(pt) and is_c_f32(vn) and is_c_f32(acct)):
        return lambda pt, vn, j0, nk, acct, nr: 0

    def impl(pt, vn, j0, nk, acct, nr):
        Ev = acct.shape[0]
        vs = vn.shape[1]  # row stride of the values (= Ev)
        cs = acct.shape[1]
        ps = pt.shape[1]
        rows_done = nr // W * W
        for r0 in range(0, rows_done, W):
            e = 0
            while e + KI <= Ev:
                tile_add(vn, j0 * vs + e, 1, vs, pt, r0, ps, acct, e * cs + r0, cs, nk)
                e += KI
            if KI > 4 and e + 4 <= Ev:
                _add4(vn, j0 * vs + e, 1, vs, pt, r0, ps, acct, e * cs + r0, cs, nk)
                e += 4
            if KI > 2 and e + 2 <= Ev:
                _add2(vn, j0 * vs + e, 1, vs, pt, r0, ps, acct, e * cs + r0, cs, nk)
                e += 2
            if KI > 1 and e < Ev:
                _add1(vn, j0 * vs + e, 1, vs, pt, r0, ps, acct, e * cs + r0, cs, nk)
        return rows_done

    return impl


@intrinsic
def softmax_tile(typingctx, st, nk, m, l, alpha, chk, check):
    """The streaming-softmax step on one register tile's W query rows (float32), in vector IR.

    st (≥ nk, W) holds the block's scores, keys × rows; m, l, alpha, chk hold (at least) the W rows'
    running max, running sum, rescale factor and finite check. Per row r, with z_j = st[j, r]:

        m' = max(m, max_j z_j);  shift = m' (0 while m' = -inf);  alpha = exp(m - shift)
        st[j, r] ← p_j = exp(z_j - shift);  l ← alpha·l + Σ_j p_j;  m ← m'
        check: chk += Σ_j z_j·0 (0, or NaN once a score is NaN or ±inf)

    The NV vectors of VW rows are the loop's state: two passes over the nk keys (max, then exp and
    sum) with the maxima and sums in registers, no per-key load or store of m or l; the exp is
    ``_vector_ir.exp_nonpositive_vector``. What ``prefill.online_softmax_block`` does with plain
    loops, which LLVM vectorises only for long rows: a 16-row group left its max pass scalar.
    """
    arrays = (st, m, l, alpha, chk)
    if not all(is_c_f32(x) for x in arrays) or st.ndim != 2 or any(x.ndim != 1 for x in arrays[1:]):
        return None
    sig = types.void(st, types.int64, m, l, alpha, chk, types.boolean)

    def codegen(context, builder, signature, args):
        st_, nk_, *_, check_ = args
        sp = vir.data_pointer(context, builder, st, st_)
        mp, lp, ap, cp = (vir.data_pointer(context, builder, t, a) for t, a in zip(arrays[1:], args[2:6]))
        row = cgutils.unpack_tuple(builder, context.make_array(st)(context, builder, st_).shape, 2)[1]  # = W
        f32 = vir.zeros(ir.FloatType(), VW).type
        neg_inf = ir.Constant(f32, [float("-inf")] * VW)
        zero = vir.zeros(ir.FloatType(), VW)

        def at(j, c):
            return vir.strided_index(builder, 0, j, row, c * VW)

        maxima = [vir.accumulator(builder, neg_inf) for _ in range(NV)]
        checks = [vir.accumulator(builder, zero) for _ in range(NV)]
        with builder.if_else(check_) as (with_check, without_check):
            for checking in (True, False):
                with with_check if checking else without_check, cgutils.for_range(builder, nk_) as loop:
                    for c in range(NV):
                        z = vir.load_vector(builder, sp, at(loop.index, c), VW)
                        slot = maxima[c]
                        builder.store(vir.running_max_vector(builder, builder.load(slot), z), slot)
                        if checking:
                            vir.accumulate_fma(builder, checks[c], z, zero)
        shifts, sums = [], []
        for c in range(NV):
            m_old = vir.load_vector(builder, mp, c * VW, VW)
            m_new = vir.running_max_vector(builder, m_old, builder.load(maxima[c]))
            shift = builder.select(builder.fcmp_ordered(">", m_new, neg_inf), m_new, zero)
            a = vir.exp_nonpositive_vector(builder, builder.fsub(m_old, shift))
            vir.store_vector(builder, a, ap, c * VW)
            vir.store_vector(builder, m_new, mp, c * VW)
            shifts.append(shift)
            sums.append(vir.accumulator(builder, builder.fmul(vir.load_vector(builder, lp, c * VW, VW), a)))
        with cgutils.for_range(builder, nk_) as loop:
            for c in range(NV):
                index = at(loop.index, c)
                p = vir.exp_nonpositive_vector(
                    builder, builder.fsub(vir.load_vector(builder, sp, index, VW), shifts[c])
                )
                vir.store_vector(builder, p, sp, index)
                builder.store(builder.fadd(builder.load(sums[c]), p), sums[c])
        for c in range(NV):
            vir.store_vector(builder, builder.load(sums[c]), lp, c * VW)
        with builder.if_then(check_):
            for c in range(NV):
                total = builder.fadd(vir.load_vector(builder, cp, c * VW, VW), builder.load(checks[c]))
                vir.store_vector(builder, total, cp, c * VW)
        return context.get_dummy_value()

    return sig, codegen


@intrinsic
def check_tile(typingctx, st, nk, chk):
    """chk[r] += NaN for each of the W rows r of a float32 score block st (keys × W, C-contiguous) whose
    scores st[j, r], j < nk, hold a NaN or ±inf, else nothing: the raw-score check of a block that a
    mask or adjustment changes before the softmax reads it (``prefill.check_score_block``). Per vector of
    VW rows the largest exponent field (bits & 0x7f800000: all ones only for inf and NaN) is kept in a
    register by an integer max (a one-cycle chain, where summing x·0 chained 4-cycle FMAs); a plain loop
    over the 16 rows of an AVX2 tile ran scalar."""
    if not (is_c_f32(st) and is_c_f32(chk) and st.ndim == 2 and chk.ndim == 1):
        return None
    sig = types.void(st, types.int64, chk)

    def codegen(context, builder, signature, args):
        st_, nk_, chk_ = args
        sp = vir.data_pointer(context, builder, st, st_)
        cp = vir.data_pointer(context, builder, chk, chk_)
        row = cgutils.unpack_tuple(builder, context.make_array(st)(context, builder, st_).shape, 2)[1]  # = W
        i32v = ir.VectorType(ir.IntType(32), VW)
        exponent = ir.Constant(i32v, [0x7F800000] * VW)
        tops = [vir.accumulator(builder, ir.Constant(i32v, [0] * VW)) for _ in range(NV)]
        with cgutils.for_range(builder, nk_) as loop:
            for c in range(NV):
                z = vir.load_vector(builder, sp, vir.strided_index(builder, 0, loop.index, row, c * VW), VW)
                e = builder.and_(builder.bitcast(z, i32v), exponent)
                top = builder.load(tops[c])
                builder.store(builder.select(builder.icmp_signed(">", e, top), e, top), tops[c])
        nan = ir.Constant(ir.VectorType(ir.FloatType(), VW), [float("nan")] * VW)
        for c in range(NV):
            bad = builder.icmp_signed("==", builder.load(tops[c]), exponent)
            add = builder.select(bad, nan, vir.zeros(ir.FloatType(), VW))
            total = builder.fadd(vir.load_vector(builder, cp, c * VW, VW), add)
            vir.store_vector(builder, total, cp, c * VW)
        return context.get_dummy_value()

    return sig, codegen


def _mask_kernel(typingctx, st, n_key_chunks, n_row_chunks, mask, i0, j0):
    """st[j, r] (+)= the mask at (i0 + r, j0 + j) for the first n_key_chunks·VW keys and n_row_chunks·VW
    rows, VW × VW at a time: VW mask rows (VW keys each, contiguous) loaded, transposed in registers
    (``_vector_ir.transpose``) into VW key lines of VW rows, added to the score block's lines. A boolean
    mask's bytes become 0 (True) or -inf (False) before the transposition, so the scores take the same
    add: selecting -inf into the scores let LLVM store them with ``vmaskmovps`` on x86, which made a
    boolean mask cost 0.60 ns per score against a float one's 0.16 (Zen 3). A raw score of NaN or +inf
    under a False entry then stays NaN, where a select gave -inf: the kernel's raw-score check reports
    it first (``check_finite``). ``mask`` (L', S') C-contiguous, float32 or bool; st float32 (keys × rows,
    C-contiguous)."""
    if not (is_c_f32(st) and isinstance(mask, types.Array) and mask.ndim == 2 and mask.layout == "C"):
        return None
    if mask.dtype not in (types.float32, types.boolean):
        return None
    is_bool = mask.dtype == types.boolean
    i64 = types.int64
    sig = types.void(st, i64, i64, mask, i64, i64)

    def codegen(context, builder, signature, args):
        st_, nkc_, nrc_, mask_, i0_, j0_ = args
        sp = vir.data_pointer(context, builder, st, st_)
        mp = vir.data_pointer(context, builder, mask, mask_)
        row_stride = cgutils.unpack_tuple(builder, context.make_array(st)(context, builder, st_).shape, 2)[1]
        mask_stride = cgutils.unpack_tuple(builder, context.make_array(mask)(context, builder, mask_).shape, 2)[1]
        f32 = ir.FloatType()
        zero = vir.zeros(f32, VW)
        neg_inf = ir.Constant(ir.VectorType(f32, VW), [float("-inf")] * VW)
        with cgutils.for_range(builder, nrc_) as rows:
            r0 = builder.mul(rows.index, vir.as_index(VW))
            with cgutils.for_range(builder, nkc_) as keys:
                c0 = builder.mul(keys.index, vir.as_index(VW))
                lines = []
                for i in range(VW):
                    row = builder.add(builder.add(i0_, r0), vir.as_index(i))
                    index = vir.strided_index(builder, builder.add(j0_, c0), row, mask_stride)
                    x = vir.load_vector(builder, mp, index, VW)
                    if is_bool:  # bytes 1/0 as the float mask 0/-inf: shuffled and added like a float one
                        x = builder.select(builder.icmp_unsigned("!=", x, vir.zeros(x.type.element, VW)), zero, neg_inf)
                    lines.append(x)
                for c, m in enumerate(vir.transpose(builder, lines)):
                    index = vir.strided_index(builder, r0, builder.add(c0, vir.as_index(c)), row_stride)
                    vir.store_vector(builder, builder.fadd(vir.load_vector(builder, sp, index, VW), m), sp, index)
        return context.get_dummy_value()

    return sig, codegen


mask_kernel = intrinsic(_mask_kernel)


def mask_block(st, nk, nr, mask, i0, j0):  # pragma: no cover - numba overload below
    raise TypeError("mask_block is a numba kernel helper: call it from @njit code")


@overload(mask_block)
def _mask_block_overload(st, nk, nr, mask, i0, j0):
    """Apply ``mask`` (read at [i0 + r, j0 + j], one mask row per query row, keys contiguous) to the
    score block st[j, r] for the keys j < nk//VW·VW and rows r < nr//VW·VW with ``mask_kernel``; returns
    (rows done, keys done), (0, 0) where it does not apply (float64, another mask dtype)."""
    if (
        is_c_f32(st)
        and isinstance(mask, types.Array)
        and mask.layout == "C"
        and mask.dtype in (types.float32, types.boolean)
    ):

        def impl(st, nk, nr, mask, i0, j0):
            mask_kernel(st, nk // VW, nr // VW, mask, i0, j0)
            return nr // VW * VW, nk // VW * VW

        return impl
    return lambda st, nk, nr, mask, i0, j0: (0, 0)


def tile_rows(out):  # pragma: no cover - numba overload below
    raise TypeError("tile_rows is a numba kernel helper: call it from @njit code")


@overload(tile_rows)
def _tile_rows_overload(out):
    """W (query rows of a register tile) when ``out`` is a float32 array, the arithmetic the tiles
    run; 0 otherwise (float64: no tile). A compile-time constant in the kernel."""
    if isinstance(out, types.Array) and out.dtype == types.float32:
        return lambda out: W
    return lambda out: 0
