"""Normalised Walsh–Hadamard transform of rows: out[i] = H · x[i], in place or into out.

Maths. The Sylvester–Hadamard matrix of size b = 2^m is H_1 = [1], H_2b = [[H_b, H_b], [H_b, -H_b]];
normalised, Ĥ_b = H_b / √b is symmetric and orthogonal (Ĥ_b Ĥ_b = I, entries ±1/√b). For a row of
length D and a block b (a power of two dividing D) the transform is block-diagonal,

    H = diag(Ĥ_b, …, Ĥ_b)   (D/b copies),   out[i, j·b:(j+1)·b] = Ĥ_b · x[i, j·b:(j+1)·b],

so it too is symmetric and orthogonal: dot products and norms are unchanged (q·k = (Hq)·(Hk)) and
applying it twice gives x back, up to rounding. It spreads a large entry of x over the b entries of
its block, which is why a KV cache rotates keys and queries before quantising (larger b: wider spread).

Algorithm: the fast butterfly, log2(b) levels of pairs (a, c) h = 1, 2, 4, … apart → (a + c, a − c).
The levels below min(b, 64) run in registers on chunks of min(b, 64) entries (``_chunk_vector``: up
to 8 vectors of 8 lanes; levels h = 1, 2, 4 by a lane shuffle, a multiply by ±1 and an add; h = 8, 16,
32 between whole vectors), reading x once (converted in the vector: float16 arrives as uint16 bits)
and multiplied by 1/√b as it is read (the transform is linear: scaling first is the same up to
rounding). Blocks of 128 and more then take the levels h ≥ 64 over the row in memory, two per pass
(``_butterfly_vector``: 8 lanes of 4 runs h apart). Written as LLVM vector IR (``_vector_ir``)
because plain loops did not vectorise the short levels (h < 8 needs shuffles; the h = 8, 16 loops are
too short for LLVM's vector loop), and row views cost reference counting per row: both kernels
address rows by flat offsets. Arrays that are not C-contiguous take plain scalar loops, same sums.

Cost per row: D·log2(b) additions (and multiplies by ±1 for h < 8) and D multiplications; one read
of x and one write of out for b ≤ 64, plus ⌈(log2(b) − 6)/2⌉ passes over out (in L1) for larger b.
Measured here (Zen 4, one thread): ~20 ns per row of 64 float32, plus ~0.3 µs for the call.
Memory: nothing beyond ``out`` (no temporaries, no allocation). ``out`` may be ``x`` itself (same dtype,
float32 or float64): every stage loads the entries it writes before storing them.

``hadamard_rows(x, block, out)``: serial, one Python thread; what ``numba_attn.rotation`` uses for
up to ``rotation.PARALLEL_ABOVE`` values, and what a KV cache should call directly (a decode step's
query heads or one token's keys are a few hundred values: a parallel launch costs more).
``hadamard_rows_parallel(x, block, out)``: the same with the rows spread over threads (``prange``),
for large arrays; call it through ``_threads.launch``.

x: (M, D) float32, float64 or uint16 (float16 bits); out: (M, D) float32 or float64. Both kernels raise
ValueError when ``block`` is not a power of two dividing D or out's shape differs from x's (a wrong
block would write outside the row). NaN and ±inf propagate: a NaN turns its whole block NaN, an inf
makes its block ±inf (NaN where two infinities of a block meet with opposite signs).
"""

import numpy as np
from llvmlite import ir
from numba import njit, prange, types
from numba.extending import intrinsic, overload

from .. import config
from . import variant
from ._load import load
from ._vector_ir import data_pointer, is_c_array, load_vector, splat, store_vector


def _scale_for(out, block):  # pragma: no cover - numba overload below
    raise TypeError("_scale_for is a numba kernel helper: call it from @njit code")


@overload(_scale_for)
def _scale_for_overload(out, block):
    """1/√block in out's dtype (a float64 factor would widen every float32 operation)."""
    if out.dtype == types.float32:
        return lambda out, block: np.float32(1.0 / np.sqrt(np.float64(block)))
    return lambda out, block: np.float64(1.0 / np.sqrt(np.float64(block)))


@njit(cache=config.CACHE, fastmath=config.FASTMATH)
def _check(x, block, out):
    if x.shape[0] != out.shape[0] or x.shape[1] != out.shape[1]:
        raise ValueError("hadamard_rows: out must have x's shape (M, D)")
    D = x.shape[1]
    if block < 1 or (block & (block - 1)) != 0 or D % block != 0:
        raise ValueError("hadamard_rows: block must be a power of two dividing D")


def _chunk_into(x, out, i, c, scale, vectors):  # pragma: no cover - numba overload below
    raise TypeError("_chunk_into is a numba kernel helper: call it from @njit code")


def _level(builder, sign, v, swapped):
    """One butterfly level on lanes: a + b where this lane's bit h is clear, a - b where it is set. A multiply
    by ±1 (exact) and an add, not ``llvm.fma``: as fast here, and a CPU target without FMA (``generic``)
    would call libm's ``fmaf`` per lane."""
    return builder.fadd(builder.fmul(sign, v), swapped)


@intrinsic
def _chunk_vector(typingctx, src, src_off, dst, dst_off, scale, vectors):
    """dst[dst_off : dst_off + n] = H_n · (scale · src[src_off : src_off + n]), n = 8·vectors ≤ 64, H_n the
    unnormalised Sylvester–Hadamard matrix, all in registers: ``vectors`` vectors of 8 lanes (one load and one
    store per entry). Levels h = 1, 2, 4 inside each vector as ``y = sign_h·v + shuffle(v, lane ^ h)``
    (sign_h = -1 on the lanes with bit h set: a multiply by ±1, exact);
    levels h = 8, 16, 32 between whole vectors. src C-contiguous float32, float64 or uint16 (float16
    bits), converted to dst's dtype; dst C-contiguous float32 or float64; scale dst's dtype."""
    if (
        not isinstance(vectors, types.IntegerLiteral)
        or vectors.literal_value not in (1, 2, 4, 8)
        or not is_c_array(src, types.float32, types.float64, types.uint16)
        or not is_c_array(dst, types.float32, types.float64)
        or scale != dst.dtype
    ):
        return None
    n = vectors.literal_value

    def codegen(context, builder, signature, args):
        src_, src_off_, dst_, dst_off_, scale_, _ = args
        vector_type = ir.VectorType(context.get_value_type(dst.dtype), 8)
        src_base = data_pointer(context, builder, src, src_)
        dst_base = data_pointer(context, builder, dst, dst_)
        factor = splat(builder, scale_, 8)
        lanes = []
        for j in range(n):
            v = load_vector(builder, src_base, builder.add(src_off_, ir.Constant(src_off_.type, 8 * j)), 8)
            if src.dtype == types.uint16:
                v = builder.bitcast(v, ir.VectorType(ir.HalfType(), 8))
            if v.type != vector_type:
                wider = src.dtype == types.uint16 or dst.dtype == types.float64
                v = builder.fpext(v, vector_type) if wider else builder.fptrunc(v, vector_type)
            v = builder.fmul(v, factor)
            for h in (1, 2, 4):
                partner = ir.Constant(ir.VectorType(ir.IntType(32), 8), [lane ^ h for lane in range(8)])
                swapped = builder.shuffle_vector(v, ir.Constant(vector_type, None), partner)
                sign = ir.Constant(vector_type, [-1.0 if lane & h else 1.0 for lane in range(8)])
                v = _level(builder, sign, v, swapped)
            lanes.append(v)
        h = 1
        while h < n:
            for j in range(n):
                if not j & h:
                    a, b = lanes[j], lanes[j + h]
                    lanes[j], lanes[j + h] = builder.fadd(a, b), builder.fsub(a, b)
            h *= 2
        for j in range(n):
            store_vector(builder, lanes[j], dst_base, builder.add(dst_off_, ir.Constant(dst_off_.type, 8 * j)))
        return context.get_dummy_value()

    return types.void(src, types.int64, dst, types.int64, scale, vectors), codegen


@overload(_chunk_into)
def _chunk_into_overload(x, out, i, c, scale, vectors):
    """out[i, c : c + 8·vectors] = H_n · (scale · x[i, c : c + 8·vectors]): the register intrinsic when x
    and out are C-contiguous (addressed by flat element offsets: no row views, whose reference counting
    cost as much as the arithmetic), plain scalar loops for other layouts (the same sums)."""
    if is_c_array(x, types.float32, types.float64, types.uint16) and is_c_array(out, types.float32, types.float64):

        def impl_vector(x, out, i, c, scale, vectors):
            _chunk_vector(x, i * x.shape[1] + c, out, i * out.shape[1] + c, scale, vectors)

        return impl_vector

    def impl(x, out, i, c, scale, vectors):
        n = 8 * vectors
        for k in range(c, c + n):
            out[i, k] = load(x[i, k]) * scale
        h = 1
        while h < n:
            for j in range(c, c + n, 2 * h):
                for k in range(j, j + h):
                    a = out[i, k]
                    b = out[i, k + h]
                    out[i, k] = a + b
                    out[i, k + h] = a - b
            h *= 2

    return impl


def _butterfly_into(out, i, k, h, levels):  # pragma: no cover - numba overload below
    raise TypeError("_butterfly_into is a numba kernel helper: call it from @njit code")


@intrinsic
def _butterfly_vector(typingctx, out, off, h, levels):
    """One (levels = 1) or two (levels = 2) butterfly levels h and 2h apart on 8 lanes at flat offset ``off``
    of the C-contiguous float32/float64 ``out``: a, b = out[off:+8], out[off+h:+8] → a + b, a − b (levels 1);
    a, b, c, d at off, off+h, off+2h, off+3h → the two levels in registers (levels 2)."""
    if (
        not isinstance(levels, types.IntegerLiteral)
        or levels.literal_value not in (1, 2)
        or not is_c_array(out, types.float32, types.float64)
    ):
        return None
    runs = 2**levels.literal_value

    def codegen(context, builder, signature, args):
        out_, off_, h_, _ = args
        base = data_pointer(context, builder, out, out_)
        offsets = [off_]
        for _ in range(runs - 1):
            offsets.append(builder.add(offsets[-1], h_))
        v = [load_vector(builder, base, o, 8) for o in offsets]
        step = 1
        while step < runs:
            for j in range(runs):
                if not j & step:
                    a, b = v[j], v[j + step]
                    v[j], v[j + step] = builder.fadd(a, b), builder.fsub(a, b)
            step *= 2
        for vector, o in zip(v, offsets):
            store_vector(builder, vector, base, o)
        return context.get_dummy_value()

    return types.void(out, types.int64, types.int64, levels), codegen


@overload(_butterfly_into)
def _butterfly_into_overload(out, i, k, h, levels):
    """Levels h (and 2h, levels = 2) on out[i, k : k + 8] and its partners: the vector intrinsic for a
    C-contiguous out, scalar loops otherwise."""
    if is_c_array(out, types.float32, types.float64):

        def impl_vector(out, i, k, h, levels):
            _butterfly_vector(out, i * out.shape[1] + k, h, levels)

        return impl_vector

    def impl(out, i, k, h, levels):
        for lane in range(k, k + 8):
            if levels == 1:
                a = out[i, lane]
                b = out[i, lane + h]
                out[i, lane] = a + b
                out[i, lane + h] = a - b
            else:
                a = out[i, lane]
                b = out[i, lane + h]
                c = out[i, lane + 2 * h]
                d = out[i, lane + 3 * h]
                out[i, lane] = (a + b) + (c + d)
                out[i, lane + h] = (a - b) + (c - d)
                out[i, lane + 2 * h] = (a + b) - (c + d)
                out[i, lane + 3 * h] = (a - b) - (c - d)

    return impl


@njit(cache=config.CACHE, fastmath=config.FASTMATH)
def _row(x, out, i, block, s):
    """out[i] = H · x[i] (x may be out)."""
    D = x.shape[1]
    # levels h < min(block, 64): in registers, chunk by chunk, scaled as they are read
    if block >= 64:
        for c in range(0, D, 64):
            _chunk_into(x, out, i, c, s, 8)
        h = 64
    elif block == 32:
        for c in range(0, D, 32):
            _chunk_into(x, out, i, c, s, 4)
        h = 32
    elif block == 16:
        for c in range(0, D, 16):
            _chunk_into(x, out, i, c, s, 2)
        h = 16
    elif block == 8:
        for c in range(0, D, 8):
            _chunk_into(x, out, i, c, s, 1)
        h = 8
    elif block == 4:
        for c in range(0, D, 4):
            a0 = load(x[i, c]) * s
            a1 = load(x[i, c + 1]) * s
            a2 = load(x[i, c + 2]) * s
            a3 = load(x[i, c + 3]) * s
            b0 = a0 + a1
            b1 = a0 - a1
            b2 = a2 + a3
            b3 = a2 - a3
            out[i, c] = b0 + b2
            out[i, c + 1] = b1 + b3
            out[i, c + 2] = b0 - b2
            out[i, c + 3] = b1 - b3
        h = 4
    elif block == 2:
        for c in range(0, D, 2):
            a0 = load(x[i, c]) * s
            a1 = load(x[i, c + 1]) * s
            out[i, c] = a0 + a1
            out[i, c + 1] = a0 - a1
        h = 2
    else:  # block 1: the identity
        for c in range(D):
            out[i, c] = load(x[i, c])
        h = 1
    # levels h ≥ 64 (blocks of 128 and more): 8 lanes of contiguous runs h entries apart at a time, two
    # levels per pass (entries k, k+h, k+2h, k+3h), then a last single level if one is left
    while 4 * h <= block:
        for j in range(0, D, 4 * h):
            for k in range(j, j + h, 8):
                _butterfly_into(out, i, k, h, 2)
        h *= 4
    if 2 * h <= block:
        for j in range(0, D, 2 * h):
            for k in range(j, j + h, 8):
                _butterfly_into(out, i, k, h, 1)


@njit(cache=config.CACHE, fastmath=config.FASTMATH)
def hadamard_rows(x, block, out):
    """out[i] = H · x[i] for every row of x (M, D); H block-diagonal Ĥ_block (see the module). out may be x."""
    _check(x, block, out)
    s = _scale_for(out, block)
    for i in range(x.shape[0]):
        _row(x, out, i, block, s)


@njit(cache=config.CACHE, fastmath=config.FASTMATH)
def hadamard_rows_max(x, block, out):
    """``hadamard_rows``, and returns max |x| over every input (inf if one is NaN or ±inf), read in
    the same call: what a cache's append checks before it stores the rotation (x may not be out)."""
    _check(x, block, out)
    s = _scale_for(out, block)
    top = 0.0
    bad = 0.0
    for i in range(x.shape[0]):
        for c in range(x.shape[1]):
            v = np.float64(load(x[i, c]))
            top = max(top, abs(v))
            bad += v * 0.0  # 0, or NaN once a NaN or ±inf is seen (max would skip a NaN)
        _row(x, out, i, block, s)
    return top if bad == 0.0 else np.inf


def _rows_parallel(x, block, out):
    """The same as ``hadamard_rows``, rows spread over numba's threads."""
    _check(x, block, out)
    s = _scale_for(out, block)
    for i in prange(x.shape[0]):
        _row(x, out, i, block, s)


hadamard_rows_parallel = njit(parallel=True, cache=config.CACHE, fastmath=config.FASTMATH)(
    variant(_rows_parallel, "_parallel")
)
