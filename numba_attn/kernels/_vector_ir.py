"""The LLVM vector-IR building blocks of the register-tiled micro-kernels, and checkable wrappers of them.

The micro-kernels (``_prefill_tiles``: C[4 × W] += A·B for prefill; ``_decode_tiles``: VW keys'
scores and the value tiles for decode) are written as LLVM IR with llvmlite, so that their
accumulators are vector values that stay in registers. They are built from these pieces, each a
function of an llvmlite ``builder`` (and numba's ``context`` where an array is unpacked):

``data_pointer``          the element pointer of a numba array (its ``data`` field)
``element_pointer``       ``base + index`` (a GEP; index in elements)
``strided_index``         ``offset + row·stride + column``: where row ``row``, column ``column`` of a tile is
``load_element``          one scalar ``base[index]``
``load_vector``           ``<width x T>`` from ``base[index : index + width]`` (any alignment of the element)
``store_vector``          the same, stored
``load_float32_vector``   ``load_vector`` widened to float32: float32 as is, uint16 as float16 bits (``fpext``),
                          int8 (``sitofp``), optionally times a scalar scale (dequantisation)
``load_nibble_codes``     ``width`` 4-bit codes (the low or the high halves of ``width`` bytes) as ``<width x float>``
``load_nibbles_vector``   the same, times a scale plus an offset (int4 dequantisation)
``load_half``             one float16 bit pattern (i16) as a float32 scalar (``fpext``)
``prefetch_stream``       a prefetch, for reading once, of the lines a fixed distance ahead of a weight stream
``splat``                 a scalar broadcast to every lane (``insertelement`` + ``shufflevector``)
``fma``                   ``llvm.fma`` on float/double vectors or scalars: a·b + c with one rounding
``accumulator``           a vector variable (an ``alloca`` in the entry block, which LLVM's mem2reg turns into
                          a register) holding an initial value
``accumulate_fma``        ``acc = fma(a, b, acc)``
``rank1_update``          accs[i][c] += splat(a[i])·b[c] over a register tile (one step of C += A·B)
``tile_accumulators``     rows × chunks accumulators loaded from (or zero for) a tile of an array
``store_tile``            the accumulators written back to that tile
``running_max_vector``    ``x if a < x else a`` lane by lane (``fcmp`` + ``select``: a NaN ``x`` is ignored)
``exp_nonpositive_vector`` exp(x) for float32 lanes x ≤ 0 (and -inf): ``_math.exp_nonpositive``'s range reduction
                          and polynomial, in vector IR (``llvm.floor``, ``llvm.fma``, an exponent built from bits)
``transpose``             width vectors of width lanes → their transpose (lane i of result c = lane c of
                          vector i), in width·log2(width) shuffles
``butterfly_sum``         width vectors of width lanes → one vector whose lane j is the sum of vector j's lanes,
                          in 2·(width-1) shuffles and width-1 adds (log2 width levels; see ``butterfly_sum``)
``madd_nibble_quads_into`` (wrapper) int16 pairs · 4-bit codes packed two per byte (the int4 GEMV's panels)
                          → int32 sums: the bytes widened to int16, an ``and`` / a shift, ``multiply_add_pairs``
``multiply_add_pairs``    int8/int16 × int16 lanes → int32 lanes, each the sum of a pair of products (x86's
                          ``pmaddwd`` called directly, ``MADD_KIND``; generic IR elsewhere)

The IR is generic (``<W x float>``, ``llvm.fma``): LLVM emits AVX-512, AVX2, SSE or NEON code for the
CPU numba targets; the one exception is ``multiply_add_pairs`` on x86 (see there). Nothing here
allocates memory; offsets, indices and strides are int64 element counts.

Each IR helper also has a small ``@intrinsic`` wrapper callable from @njit code and a plain-numba
twin (the same operation as an ordinary loop); ``TWINS`` maps one to the other and
``tests/test_vector_ir.py`` checks every pair on random data. The wrappers take the vector width as
a compile-time constant (an integer literal, or ``numba.literally(width)``) and C-contiguous arrays.
"""

import functools

import numpy as np
from llvmlite import ir
from numba import njit, types
from numba.core import cgutils
from numba.extending import intrinsic, overload

from ._load import load
from ._math import _EXP_LO, _LN2_HI, _LN2_LO, _LOG2E, exp_nonpositive

_I32 = ir.IntType(32)
_I64 = ir.IntType(64)
_F32 = ir.FloatType()


def is_c_array(x, *dtypes):
    """Typing-time check: ``x`` is a C-contiguous numba array type of one of ``dtypes``."""
    return isinstance(x, types.Array) and x.layout == "C" and x.dtype in dtypes


# ---------------------------------------------------------------------------------------------------------------------
# IR helpers (codegen time)
# ---------------------------------------------------------------------------------------------------------------------


def as_index(value):
    """An int64 IR value from an IR value or a Python int."""
    return ir.Constant(_I64, value) if isinstance(value, int) else value


def _element_bytes(element_type):
    if isinstance(element_type, ir.IntType):
        return max(1, element_type.width // 8)
    return {ir.HalfType: 2, ir.FloatType: 4, ir.DoubleType: 8}[type(element_type)]


def data_pointer(context, builder, array_type, array):
    """Pointer to element 0 of a numba array value ``array`` of numba type ``array_type``."""
    return context.make_array(array_type)(context, builder, array).data


def element_pointer(builder, base, index):
    """Pointer to ``base[index]`` (``index``: int64 IR value or Python int, in elements)."""
    return builder.gep(base, [as_index(index)])


def strided_index(builder, offset, row, stride, column=0):
    """``offset + row·stride + column`` in int64 (each an IR value or a Python int): element (row, column)
    of a tile whose rows are ``stride`` elements apart and whose element (0, 0) is at ``offset``."""
    return builder.add(builder.add(as_index(offset), builder.mul(as_index(row), as_index(stride))), as_index(column))


def load_element(builder, base, index):
    """The scalar ``base[index]``."""
    return builder.load(element_pointer(builder, base, index))


def load_vector(builder, base, index, width):
    """``<width x T>`` holding ``base[index : index + width]``, T the element type of ``base``. Aligned only
    to the element (arrays and offsets give no more), which costs nothing on x86 and aarch64."""
    element = base.type.pointee
    pointer = builder.bitcast(element_pointer(builder, base, index), ir.VectorType(element, width).as_pointer())
    return builder.load(pointer, align=_element_bytes(element))


def store_vector(builder, vector, base, index):
    """``base[index : index + width] = vector`` (``width`` lanes, aligned to the element only)."""
    pointer = builder.bitcast(element_pointer(builder, base, index), vector.type.as_pointer())
    builder.store(vector, pointer, align=_element_bytes(vector.type.element))


def splat(builder, scalar, width):
    """``<width x T>`` with every lane = ``scalar`` (lane 0 inserted, then a shuffle with an all-zero mask,
    which LLVM emits as one broadcast: ``vbroadcastss``, ``dup``)."""
    vector_type = ir.VectorType(scalar.type, width)
    first = builder.insert_element(ir.Constant(vector_type, None), scalar, ir.Constant(_I32, 0))
    return builder.shuffle_vector(first, ir.Constant(vector_type, None), ir.Constant(ir.VectorType(_I32, width), None))


def zeros(element_type, width):
    """The constant ``<width x element_type>`` of zeros."""
    return ir.Constant(ir.VectorType(element_type, width), None)


#: how far ahead of the bytes it multiplies a GEMV's weight stream is prefetched (``prefetch_stream``): one
#: int8 block of a panel (32 inputs × 64 outputs). Measured on a Zen 1 VM (2 threads, weights from DRAM,
#: int8 GEMVs of SmolLM2's shapes): 15-22 % faster than none; 1024 and 4096 bytes about the same, a
#: prefetch that keeps the lines in every cache level (locality 1 or 3) a little slower than this one.
STREAM_PREFETCH_BYTES = 2048


def prefetch_stream(builder, base, index, nbytes):
    """Prefetch, for reading once (``llvm.prefetch`` locality 0: ``prefetchnta``, NEON ``prfm pldl1strm``),
    the ``nbytes`` bytes (whole 64-byte lines) starting ``STREAM_PREFETCH_BYTES`` past ``base[index]``
    (``base`` a byte pointer). A prefetch never faults, past the array's end included."""
    byte_pointer = ir.IntType(8).as_pointer()
    function = cgutils.get_or_insert_function(
        builder.module, ir.FunctionType(ir.VoidType(), [byte_pointer, _I32, _I32, _I32]), "llvm.prefetch.p0i8"
    )
    for line in range(0, nbytes, 64):
        at = builder.add(as_index(index), as_index(STREAM_PREFETCH_BYTES + line))
        pointer = builder.bitcast(builder.gep(base, [at]), byte_pointer)
        builder.call(function, [pointer, ir.Constant(_I32, 0), ir.Constant(_I32, 0), ir.Constant(_I32, 1)])


def fma(builder, a, b, c):
    """``a·b + c`` rounded once (``llvm.fma``), for float or double scalars or vectors of one type."""
    value_type = a.type
    element = value_type.element if isinstance(value_type, ir.VectorType) else value_type
    suffix = {ir.FloatType: "f32", ir.DoubleType: "f64"}[type(element)]
    name = f"llvm.fma.v{value_type.count}{suffix}" if isinstance(value_type, ir.VectorType) else f"llvm.fma.{suffix}"
    function = cgutils.get_or_insert_function(builder.module, ir.FunctionType(value_type, [value_type] * 3), name)
    return builder.call(function, [a, b, c])


def load_float32_vector(builder, base, index, width, scale=None):
    """``base[index : index + width]`` as ``<width x float>``: float32 elements as they are, 16-bit elements as
    float16 bit patterns (``fpext``, exact), 8-bit elements as signed integers (``sitofp``, exact); then
    times the float32 scalar ``scale`` in every lane if one is given (int8 dequantisation)."""
    raw = load_vector(builder, base, index, width)
    element = base.type.pointee
    vector_type = ir.VectorType(_F32, width)
    if isinstance(element, ir.FloatType):
        value = raw
    elif element == ir.IntType(16):
        value = builder.fpext(builder.bitcast(raw, ir.VectorType(ir.HalfType(), width)), vector_type)
    elif element == ir.IntType(8):
        value = builder.sitofp(raw, vector_type)
    else:
        raise TypeError(f"load_float32_vector: float32, float16 bits (i16) or int8 elements, got {element}")
    if scale is not None:
        value = builder.fmul(value, splat(builder, scale, width))
    return value


def load_half(builder, base, index):
    """The float16 bit pattern ``base[index]`` (an i16 array) as a float32 scalar (``fpext``, exact)."""
    return builder.fpext(builder.bitcast(load_element(builder, base, index), ir.HalfType()), _F32)


def load_nibble_codes(builder, base, index, width, high):
    """``width`` 4-bit codes (0 … 15) as ``<width x float>`` (``uitofp``, exact): the low nibbles (``high``
    false) or the high nibbles (``high`` true) of the bytes ``base[index : index + width]`` (an i8 array);
    ``high`` is a Python bool or an i1 IR value (then the shift, 0 or 4, is chosen at run time: one vector
    shift and one ``and`` either way)."""
    raw = load_vector(builder, base, index, width)
    byte_vector = raw.type
    if isinstance(high, bool):
        shift = ir.Constant(ir.IntType(8), 4 if high else 0)
    else:
        shift = builder.select(high, ir.Constant(ir.IntType(8), 4), ir.Constant(ir.IntType(8), 0))
    shifted = builder.lshr(raw, splat(builder, shift, width)) if not isinstance(high, bool) or high else raw
    codes = builder.and_(shifted, ir.Constant(byte_vector, [15] * width))
    return builder.uitofp(codes, ir.VectorType(_F32, width))


def load_nibbles_vector(builder, base, index, width, high, scale, offset):
    """``load_nibble_codes`` dequantised: code·scale + offset (one ``fma``); ``scale`` and ``offset`` are
    float32 scalars."""
    codes = load_nibble_codes(builder, base, index, width, high)
    return fma(builder, codes, splat(builder, scale, width), splat(builder, offset, width))


def accumulator(builder, initial):
    """A variable holding ``initial`` (an ``alloca`` in the function's entry block, promoted to a register by
    LLVM when every use is a load or store of the whole value, as here)."""
    slot = cgutils.alloca_once(builder, initial.type)
    builder.store(initial, slot)
    return slot


def accumulate_fma(builder, slot, a, b):
    """``slot = fma(a, b, slot)`` for an ``accumulator``."""
    builder.store(fma(builder, a, b, builder.load(slot)), slot)


def rank1_update(builder, accumulators, scalars, vectors):
    """accs[i][c] = fma(splat(scalars[i]), vectors[c], accs[i][c]) for every i, c: one step of a register-tiled
    product (C += a·bᵀ with a = ``scalars``, one per row of the tile, b = ``vectors``, one per chunk)."""
    for row, scalar in zip(accumulators, scalars, strict=True):
        broadcast = splat(builder, scalar, vectors[0].type.count)
        for slot, vector in zip(row, vectors, strict=True):
            accumulate_fma(builder, slot, broadcast, vector)


def tile_accumulators(builder, base, index_of, rows, chunks, width, zero=False):
    """``rows`` × ``chunks`` accumulators of ``<width x T>``: accs[i][c] starts as the vector at
    ``base[index_of(i, c)]``, or as zeros if ``zero`` (then ``base`` is only read for its element type)."""
    if zero:
        return [[accumulator(builder, zeros(base.type.pointee, width)) for _ in range(chunks)] for _ in range(rows)]
    return [
        [accumulator(builder, load_vector(builder, base, index_of(i, c), width)) for c in range(chunks)]
        for i in range(rows)
    ]


def store_tile(builder, accumulators, base, index_of):
    """Write each accumulator accs[i][c] of ``tile_accumulators`` to ``base[index_of(i, c)]``."""
    for i, row in enumerate(accumulators):
        for c, slot in enumerate(row):
            store_vector(builder, builder.load(slot), base, index_of(i, c))


def running_max_vector(builder, a, x):
    """Lane by lane ``x if a < x else a`` (Python's ``max(a, x)``; a NaN lane of ``x`` leaves ``a``)."""
    return builder.select(builder.fcmp_ordered("<", a, x), x, a)


def _intrinsic_call(builder, name, value):
    value_type = value.type
    function = cgutils.get_or_insert_function(builder.module, ir.FunctionType(value_type, [value_type]), name)
    return builder.call(function, [value])


def exp_nonpositive_vector(builder, x):
    """exp(x) on a ``<width x float>`` whose lanes are ≤ 0 or -inf: ``_math.exp_nonpositive`` lane by lane.

    x = n·ln2 + r with n = floor(x·log2 e + 1/2) (``llvm.floor``), r by two FMAs (ln 2 split in a high
    and a low part), exp(r) by the degree-6 Taylor polynomial in Horner form (FMAs), 2ⁿ from the bits
    (n + 127) << 23; lanes below -87.3 (-inf included) give exactly 0. ~17 vector instructions, no
    libm call, no branch. A positive lane gives garbage; a NaN lane gives NaN.
    """
    width = x.type.count
    vector_type = x.type

    def const(value):
        return ir.Constant(vector_type, [float(value)] * width)

    low = const(_EXP_LO)
    below = builder.fcmp_ordered("<", x, low)
    xc = builder.select(below, low, x)
    n = _intrinsic_call(builder, f"llvm.floor.v{width}f32", fma(builder, xc, const(_LOG2E), const(0.5)))
    r = fma(builder, n, const(-_LN2_HI), xc)
    r = fma(builder, n, const(-_LN2_LO), r)
    p = const(1.0 / 720.0)
    for coefficient in (1.0 / 120.0, 1.0 / 24.0, 1.0 / 6.0, 0.5, 1.0, 1.0):
        p = fma(builder, p, r, const(np.float32(coefficient)))
    int_type = ir.VectorType(_I32, width)
    bits = builder.shl(
        builder.add(builder.fptosi(n, int_type), ir.Constant(int_type, [127] * width)),
        ir.Constant(int_type, [23] * width),
    )
    y = builder.fmul(p, builder.bitcast(bits, vector_type))
    return builder.select(below, zeros(_F32, width), y)


def transpose(builder, vectors):
    """The transpose of ``width`` vectors of ``width`` lanes (``width`` a power of two): lane i of result c
    is lane c of ``vectors[i]``. log2(width) levels; at distance d, vectors i and i + d (i's bit d clear)
    exchange their lanes' d-blocks: the new i holds the even d-blocks of both, the new i + d the odd
    ones (one shuffle each), which swaps the off-diagonal blocks at every scale."""
    width = vectors[0].type.count
    if len(vectors) != width or width & (width - 1):
        raise ValueError(f"transpose: needs width vectors of width lanes, width a power of two; got {len(vectors)}")
    mask_type = ir.VectorType(_I32, width)
    vectors = list(vectors)
    d = width // 2
    while d >= 1:
        lo, hi = [], []
        for lane in range(width):
            block, within = lane // (2 * d) * 2 * d, lane % (2 * d)
            lo.append(block + within if within < d else width + block + within - d)
            hi.append(block + d + within if within < d else width + block + within)
        lo, hi = ir.Constant(mask_type, lo), ir.Constant(mask_type, hi)
        for i in range(width):
            if i & d:
                continue
            a, b = vectors[i], vectors[i + d]
            vectors[i], vectors[i + d] = builder.shuffle_vector(a, b, lo), builder.shuffle_vector(a, b, hi)
        d //= 2
    return vectors


def butterfly_sum(builder, vectors):
    """Lane j of the result = the sum of the lanes of ``vectors[j]``, for ``width`` vectors of ``width`` lanes
    (``width`` a power of two; float or integer lanes).

    A "transposed" horizontal sum: at each of log2(width) levels, neighbouring vectors A, B become
    shuffle(A, B, lo) + shuffle(A, B, hi), each result holding the partial sums of twice as many
    vectors in half as many lanes each; after the last level vector j's sum is in lane j. That is
    2·(width-1) shuffles and width-1 adds for all width sums, against log2(width) shuffles and adds
    per vector for separate horizontal sums.
    """
    width = vectors[0].type.count
    if len(vectors) != width or width & (width - 1):
        raise ValueError(
            f"butterfly_sum: needs width vectors of width lanes, width a power of two; "
            f"got {len(vectors)} vectors of {width} lanes"
        )
    add = builder.fadd if isinstance(vectors[0].type.element, (ir.FloatType, ir.DoubleType)) else builder.add
    mask_type = ir.VectorType(_I32, width)
    half = 1  # lanes per partial sum block at this level
    while len(vectors) > 1:
        lo, hi = [], []
        for lane in range(width):
            block, within = divmod(lane, 2 * half)
            source = block * 2 * half + within % half + (0 if within < half else width)
            lo.append(source)
            hi.append(source + half)
        lo, hi = ir.Constant(mask_type, lo), ir.Constant(mask_type, hi)
        vectors = [
            add(
                builder.shuffle_vector(vectors[n], vectors[n + 1], lo),
                builder.shuffle_vector(vectors[n], vectors[n + 1], hi),
            )
            for n in range(0, len(vectors), 2)
        ]
        half *= 2
    return vectors[0]


def _madd_kind():
    """Return "avx2" on an x86 target with AVX2, "sse2" on other x86, else "generic" (see ``MADD_KIND``)."""
    import platform

    from .. import config

    if platform.machine().lower() not in ("x86_64", "amd64", "i686", "i386", "x86"):
        return "generic"
    features = config.target_cpu()[1]
    flags = {f[1:] for f in features.split(",") if f}
    return "avx2" if "avx2" in flags else "sse2"


#: how ``multiply_add_pairs`` is emitted: "avx2" (``llvm.x86.avx2.pmadd.wd``, 8 lanes a call), "sse2"
#: (``llvm.x86.sse2.pmadd.wd``, 4 lanes: any x86-64) or "generic" (sext, multiply, even + odd lanes: NEON
#: and anything else). Chosen once from the CPU numba compiles for (part of numba's cache key);
#: ``tests/aarch64_codegen_probe.py`` sets "generic" before it cross-compiles.
MADD_KIND = _madd_kind()


def multiply_add_pairs(builder, a, b):
    """``<2n x i8|i16>`` a, ``<2n x i16>`` b → ``<n x i32>``, lane i = a[2i]·b[2i] + a[2i+1]·b[2i+1]
    (exact: |a|, |b| ≤ 2¹⁵ and not both pairs −2¹⁵·−2¹⁵). x86's ``pmaddwd`` (16 products in one
    instruction on AVX2, each pair summed): written as plain IR LLVM's instcombine turns the even/odd
    sums back into ``vpmulld`` + adds, so on x86 the target intrinsic is called (``MADD_KIND``); the
    generic form (sext, mul, shuffle, add) is left to LLVM elsewhere (NEON: ``smull``/``smull2`` +
    ``addp``-class pairwise adds). ``n`` a multiple of 4."""
    count = a.type.count
    v16 = ir.VectorType(ir.IntType(16), count)
    a16 = builder.sext(a, v16) if a.type.element.width < 16 else a
    lanes = 8 if MADD_KIND == "avx2" and count % 16 == 0 else 4
    if MADD_KIND in ("avx2", "sse2"):
        name = "llvm.x86.avx2.pmadd.wd" if lanes == 8 else "llvm.x86.sse2.pmadd.wd"
        piece16, piece32 = ir.VectorType(ir.IntType(16), 2 * lanes), ir.VectorType(_I32, lanes)
        function = cgutils.get_or_insert_function(builder.module, ir.FunctionType(piece32, [piece16] * 2), name)
        parts = []
        for start in range(0, count, 2 * lanes):
            mask = ir.Constant(ir.VectorType(_I32, 2 * lanes), list(range(start, start + 2 * lanes)))
            pa, pb = (builder.shuffle_vector(v, v, mask) if count > 2 * lanes else v for v in (a16, b))
            parts.append(builder.call(function, [pa, pb]))
        while len(parts) > 1:  # concatenate the pieces
            n = parts[0].type.count
            mask = ir.Constant(ir.VectorType(_I32, 2 * n), list(range(2 * n)))
            parts = [builder.shuffle_vector(parts[i], parts[i + 1], mask) for i in range(0, len(parts), 2)]
        return parts[0]
    wide = ir.VectorType(_I32, count)
    return sum_pairs(builder, builder.mul(builder.sext(a16, wide), builder.sext(b, wide)))


def sum_pairs(builder, v):
    """``<2n x iN>`` → ``<n x iN>``, lane i = v[2i] + v[2i+1] (even lanes plus odd lanes)."""
    count = v.type.count
    even = ir.Constant(ir.VectorType(_I32, count // 2), list(range(0, count, 2)))
    odd = ir.Constant(ir.VectorType(_I32, count // 2), list(range(1, count, 2)))
    return builder.add(builder.shuffle_vector(v, v, even), builder.shuffle_vector(v, v, odd))


# ---------------------------------------------------------------------------------------------------------------------
# @intrinsic wrappers of the helpers, and their plain-numba twins
# ---------------------------------------------------------------------------------------------------------------------

_NUMBERS = (types.float32, types.float64, types.int8, types.int16, types.uint16, types.int32, types.int64)
_FLOATS = (types.float32, types.float64)


def _width(width):
    """The literal vector width, or None (then typing fails and numba reports no matching signature)."""
    if isinstance(width, types.IntegerLiteral) and 1 <= width.literal_value <= 64:
        return width.literal_value
    return None


@intrinsic
def splat_into(typingctx, value, out, out_off, width):
    """``out[out_off : out_off + width] = value`` through ``splat`` + ``store_vector``."""
    lanes = _width(width)
    if lanes is None or not is_c_array(out, *_NUMBERS):
        return None

    def codegen(context, builder, signature, args):
        value_, out_, out_off_, _ = args
        store_vector(builder, splat(builder, value_, lanes), data_pointer(context, builder, out, out_), out_off_)
        return context.get_dummy_value()

    return types.void(out.dtype, out, types.int64, width), codegen


@njit
def splat_into_loop(value, out, out_off, width):
    """Twin of ``splat_into``."""
    for lane in range(width):
        out[out_off + lane] = value


@intrinsic
def copy_vector(typingctx, src, src_off, dst, dst_off, width):
    """``dst[dst_off : dst_off + width] = src[src_off : src_off + width]`` through ``load_vector`` +
    ``store_vector`` (same dtype)."""
    lanes = _width(width)
    if lanes is None or not is_c_array(src, *_NUMBERS) or not is_c_array(dst, src.dtype):
        return None

    def codegen(context, builder, signature, args):
        src_, src_off_, dst_, dst_off_, _ = args
        vector = load_vector(builder, data_pointer(context, builder, src, src_), src_off_, lanes)
        store_vector(builder, vector, data_pointer(context, builder, dst, dst_), dst_off_)
        return context.get_dummy_value()

    return types.void(src, types.int64, dst, types.int64, width), codegen


@njit
def copy_vector_loop(src, src_off, dst, dst_off, width):
    """Twin of ``copy_vector``."""
    for lane in range(width):
        dst[dst_off + lane] = src[src_off + lane]


@intrinsic
def load_float32_into(typingctx, src, src_off, scales, scale_index, dst, dst_off, width):
    """``dst[dst_off + l] = float32(src[src_off + l])·scales[scale_index]`` for l < width through
    ``load_float32_vector`` (src float32, uint16 float16 bits or int8; dst and scales float32)."""
    lanes = _width(width)
    if (
        lanes is None
        or not is_c_array(src, types.float32, types.uint16, types.int8)
        or not is_c_array(scales, types.float32)
        or not is_c_array(dst, types.float32)
    ):
        return None

    def codegen(context, builder, signature, args):
        src_, src_off_, scales_, scale_index_, dst_, dst_off_, _ = args
        scale = load_element(builder, data_pointer(context, builder, scales, scales_), scale_index_)
        vector = load_float32_vector(builder, data_pointer(context, builder, src, src_), src_off_, lanes, scale)
        store_vector(builder, vector, data_pointer(context, builder, dst, dst_), dst_off_)
        return context.get_dummy_value()

    return types.void(src, types.int64, scales, types.int64, dst, types.int64, width), codegen


@intrinsic
def load_nibbles_into(typingctx, src, src_off, high, scale, offset, dst, dst_off, width):
    """``dst[dst_off + l] = nibble(src[src_off + l])·scale + offset`` for l < width through
    ``load_nibbles_vector`` (src uint8; the high nibble when ``high``, else the low one; dst float32)."""
    lanes = _width(width)
    if lanes is None or not is_c_array(src, types.uint8) or not is_c_array(dst, types.float32):
        return None

    def codegen(context, builder, signature, args):
        src_, src_off_, high_, scale_, offset_, dst_, dst_off_, _ = args
        high_bit = builder.icmp_unsigned("!=", high_, ir.Constant(high_.type, 0))
        src_p = data_pointer(context, builder, src, src_)
        vector = load_nibbles_vector(builder, src_p, src_off_, lanes, high_bit, scale_, offset_)
        store_vector(builder, vector, data_pointer(context, builder, dst, dst_), dst_off_)
        return context.get_dummy_value()

    i64, f32 = types.int64, types.float32
    return types.void(src, i64, i64, f32, f32, dst, i64, width), codegen


@njit
def load_nibbles_into_loop(src, src_off, high, scale, offset, dst, dst_off, width):
    """Twin of ``load_nibbles_into`` (code·scale + offset rounded twice)."""
    for lane in range(width):
        byte = np.int64(src[src_off + lane])
        code = (byte >> 4) & 15 if high else byte & 15
        dst[dst_off + lane] = np.float32(np.float64(code) * np.float64(scale) + np.float64(offset))


def _float32_of(x):  # pragma: no cover - numba overload below
    raise TypeError("_float32_of is a numba helper: call it from @njit code")


@overload(_float32_of)
def _float32_of_overload(x):
    """A stored scalar as float32: uint16 as float16 bits (``_load.load``), other numbers converted."""
    if x == types.uint16:
        return lambda x: load(x)
    if isinstance(x, types.Number):
        return lambda x: np.float32(x)
    return None


@njit
def load_float32_into_loop(src, src_off, scales, scale_index, dst, dst_off, width):
    """Twin of ``load_float32_into``."""
    for lane in range(width):
        dst[dst_off + lane] = _float32_of(src[src_off + lane]) * scales[scale_index]


@intrinsic
def fma_into(typingctx, a, a_off, b, b_off, c, c_off, out, out_off, width):
    """``out[out_off + l] = a[a_off + l]·b[b_off + l] + c[c_off + l]`` (one rounding) for l < width
    through ``load_vector``, ``fma``, ``store_vector``; float32 or float64, one dtype."""
    lanes = _width(width)
    if lanes is None or not is_c_array(a, *_FLOATS) or not all(is_c_array(x, a.dtype) for x in (b, c, out)):
        return None

    def codegen(context, builder, signature, args):
        a_, a_off_, b_, b_off_, c_, c_off_, out_, out_off_, _ = args
        av, bv, cv = (
            load_vector(builder, data_pointer(context, builder, ty, x), off, lanes)
            for ty, x, off in ((a, a_, a_off_), (b, b_, b_off_), (c, c_, c_off_))
        )
        store_vector(builder, fma(builder, av, bv, cv), data_pointer(context, builder, out, out_), out_off_)
        return context.get_dummy_value()

    i64 = types.int64
    return types.void(a, i64, b, i64, c, i64, out, i64, width), codegen


@njit
def fma_into_loop(a, a_off, b, b_off, c, c_off, out, out_off, width):
    """Twin of ``fma_into`` (rounded twice for float64: a·b, then + c)."""
    for lane in range(width):
        product = np.float64(a[a_off + lane]) * np.float64(b[b_off + lane])  # exact for float32 inputs
        out[out_off + lane] = product + c[c_off + lane]


@intrinsic
def fma_tile_into(typingctx, a, a_off, a_step, b, b_off, b_step, steps, out, out_off, out_stride, rows, width):
    """``out[out_off + i·out_stride + l] += Σ_{t<steps} a[a_off + t·a_step + i]·b[b_off + t·b_step + l]`` for
    i < rows, l < width: a rows × 1 register tile (``tile_accumulators``, ``rank1_update``, ``store_tile``)
    over a runtime loop, the pattern of the micro-kernels. float32 or float64, one dtype; ``rows`` a
    literal too."""
    lanes, n_rows = _width(width), _width(rows)
    if (
        lanes is None
        or n_rows is None
        or not is_c_array(a, *_FLOATS)
        or not all(is_c_array(x, a.dtype) for x in (b, out))
    ):
        return None

    def codegen(context, builder, signature, args):
        a_, a_off_, a_step_, b_, b_off_, b_step_, steps_, out_, out_off_, out_stride_, _, _ = args
        ap, bp, op = (data_pointer(context, builder, ty, x) for ty, x in ((a, a_), (b, b_), (out, out_)))

        def out_index(i, c):
            return strided_index(builder, out_off_, i, out_stride_, c * lanes)

        accs = tile_accumulators(builder, op, out_index, n_rows, 1, lanes)
        with cgutils.for_range(builder, steps_) as loop:
            bv = load_vector(builder, bp, strided_index(builder, b_off_, loop.index, b_step_), lanes)
            a_row = strided_index(builder, a_off_, loop.index, a_step_)
            a_t = [load_element(builder, ap, builder.add(a_row, as_index(i))) for i in range(n_rows)]
            rank1_update(builder, accs, a_t, [bv])
        store_tile(builder, accs, op, out_index)
        return context.get_dummy_value()

    i64 = types.int64
    return types.void(a, i64, i64, b, i64, i64, i64, out, i64, i64, rows, width), codegen


@njit
def fma_tile_into_loop(a, a_off, a_step, b, b_off, b_step, steps, out, out_off, out_stride, rows, width):
    """Twin of ``fma_tile_into`` (float64 sums, rounded once per element)."""
    for i in range(rows):
        for lane in range(width):
            total = np.float64(out[out_off + i * out_stride + lane])
            for t in range(steps):
                total += np.float64(a[a_off + t * a_step + i]) * np.float64(b[b_off + t * b_step + lane])
            out[out_off + i * out_stride + lane] = total


@intrinsic
def butterfly_sums_into(typingctx, x, x_off, x_stride, out, out_off, width):
    """``out[out_off + j] = Σ_{l<width} x[x_off + j·x_stride + l]`` for j < width (width a power of two)
    through ``load_vector``, ``butterfly_sum``, ``store_vector``; float or integer, one dtype (integers wrap)."""
    lanes = _width(width)
    if lanes is None or lanes & (lanes - 1) or not is_c_array(x, *_NUMBERS) or not is_c_array(out, x.dtype):
        return None

    def codegen(context, builder, signature, args):
        x_, x_off_, x_stride_, out_, out_off_, _ = args
        xp = data_pointer(context, builder, x, x_)
        rows = [load_vector(builder, xp, strided_index(builder, x_off_, j, x_stride_), lanes) for j in range(lanes)]
        store_vector(builder, butterfly_sum(builder, rows), data_pointer(context, builder, out, out_), out_off_)
        return context.get_dummy_value()

    return types.void(x, types.int64, types.int64, out, types.int64, width), codegen


@njit
def butterfly_sums_into_loop(x, x_off, x_stride, out, out_off, width):
    """Twin of ``butterfly_sums_into`` (sums in order, in the dtype of x)."""
    for j in range(width):
        total = x[x_off + j * x_stride]
        for lane in range(1, width):
            total += x[x_off + j * x_stride + lane]
        out[out_off + j] = total


@intrinsic
def element_address(typingctx, x, index):
    """The address of ``x[index]`` (``data_pointer`` + ``element_pointer``) as an int64."""
    if not is_c_array(x, *_NUMBERS):
        return None

    def codegen(context, builder, signature, args):
        pointer = element_pointer(builder, data_pointer(context, builder, x, args[0]), args[1])
        return builder.ptrtoint(pointer, _I64)

    return types.int64(x, types.int64), codegen


@njit
def element_address_loop(x, index):
    """Twin of ``element_address``."""
    return x.ctypes.data + index * x.itemsize


@intrinsic
def exp_nonpositive_into(typingctx, x, x_off, out, out_off, width):
    """``out[out_off + l] = exp(x[x_off + l])`` for l < width through ``exp_nonpositive_vector`` (float32)."""
    lanes = _width(width)
    if lanes is None or not is_c_array(x, types.float32) or not is_c_array(out, types.float32):
        return None

    def codegen(context, builder, signature, args):
        x_, x_off_, out_, out_off_, _ = args
        vector = load_vector(builder, data_pointer(context, builder, x, x_), x_off_, lanes)
        store_vector(
            builder, exp_nonpositive_vector(builder, vector), data_pointer(context, builder, out, out_), out_off_
        )
        return context.get_dummy_value()

    return types.void(x, types.int64, out, types.int64, width), codegen


@njit
def exp_nonpositive_into_loop(x, x_off, out, out_off, width):
    """Twin of ``exp_nonpositive_into``."""
    for lane in range(width):
        out[out_off + lane] = exp_nonpositive(x[x_off + lane])


@intrinsic
def transpose_into(typingctx, x, x_off, x_stride, out, out_off, out_stride, width):
    """``out[out_off + c·out_stride + i] = x[x_off + i·x_stride + c]`` for i, c < width through ``transpose``."""
    lanes = _width(width)
    if lanes is None or lanes & (lanes - 1) or not is_c_array(x, *_NUMBERS) or not is_c_array(out, x.dtype):
        return None

    def codegen(context, builder, signature, args):
        x_, x_off_, x_stride_, out_, out_off_, out_stride_, _ = args
        xp = data_pointer(context, builder, x, x_)
        op = data_pointer(context, builder, out, out_)
        rows = [load_vector(builder, xp, strided_index(builder, x_off_, i, x_stride_), lanes) for i in range(lanes)]
        for c, vector in enumerate(transpose(builder, rows)):
            store_vector(builder, vector, op, strided_index(builder, out_off_, c, out_stride_))
        return context.get_dummy_value()

    return types.void(x, types.int64, types.int64, out, types.int64, types.int64, width), codegen


@njit
def transpose_into_loop(x, x_off, x_stride, out, out_off, out_stride, width):
    """Twin of ``transpose_into``."""
    for i in range(width):
        for c in range(width):
            out[out_off + c * out_stride + i] = x[x_off + i * x_stride + c]


def _integer_products_codegen(context, builder, args, q, x, out, lanes, per_step, operands, streamed):
    """The loop of ``madd_pairs_into`` and ``madd_nibble_quads_into``: for each of ``steps`` steps (row
    ``q_off + step·q_step`` of ``q``), ``out[out_off + l] += Σ_terms Σ_h a[2l + h]·x_pair[h]`` over the
    ``per_step`` terms, each an int16 pair of x (``x[x_off + 2·(per_step·step + term)]`` and the next, x_off
    even) against the int16 (or int8) lanes ``operands(qp, row, c)[term]`` of outputs 8c … 8c+7 (``qp``: q's
    data pointer). x86: one
    ``multiply_add_pairs`` per term and 8 outputs into accumulators held in registers; generic (NEON): no
    pair-summing multiply, so each product keeps its own int32 lane over the loop (sext + mul + add:
    smlal/smlal2) and the pairs are summed once at the end, 32 outputs at a time (64 int32 lanes: 16 NEON
    registers of accumulators). ``streamed``: ``q`` is prefetched ahead (``prefetch_stream``), 2 bytes per
    output and step (the GEMVs' panels)."""
    q_, q_off_, q_step_, x_, x_off_, steps_, out_, out_off_, _ = args
    qp, xp, op = (data_pointer(context, builder, ty, v) for ty, v in ((q, q_), (x, x_), (out, out_)))
    pair_pointer = builder.bitcast(xp, _I32.as_pointer())

    def out_index(i, c):
        return builder.add(out_off_, as_index(8 * c))

    def x_pairs(step):  # each term's two int16 of x, repeated over 16 lanes
        first = builder.add(builder.ashr(x_off_, as_index(1)), builder.mul(step, as_index(per_step)))
        pairs = []
        for term in range(per_step):
            pair = builder.load(element_pointer(builder, pair_pointer, builder.add(first, as_index(term))), align=2)
            pairs.append(builder.bitcast(splat(builder, pair, 8), ir.VectorType(ir.IntType(16), 16)))
        return pairs

    if MADD_KIND != "generic":
        accs = tile_accumulators(builder, op, out_index, 1, lanes // 8, 8)[0]
        with cgutils.for_range(builder, steps_) as loop:
            xs = x_pairs(loop.index)
            row = strided_index(builder, q_off_, loop.index, q_step_)
            if streamed:
                prefetch_stream(builder, qp, row, 2 * lanes)
            for c, slot in enumerate(accs):
                terms = [multiply_add_pairs(builder, a, xv) for a, xv in zip(operands(qp, row, c), xs, strict=True)]
                builder.store(builder.add(builder.load(slot), functools.reduce(builder.add, terms)), slot)
        store_tile(builder, [accs], op, out_index)
        return context.get_dummy_value()
    wide = ir.VectorType(_I32, 16)
    for group in range(0, lanes, 32):
        chunks = range(group // 8, min(lanes, group + 32) // 8)
        accs = [accumulator(builder, zeros(_I32, 16)) for _ in chunks]
        with cgutils.for_range(builder, steps_) as loop:
            xs = [builder.sext(xv, wide) for xv in x_pairs(loop.index)]
            row = strided_index(builder, q_off_, loop.index, q_step_)
            if streamed:
                prefetch_stream(builder, qp, builder.add(row, as_index(2 * group)), 2 * (len(chunks) * 8))
            for c, slot in zip(chunks, accs, strict=True):
                terms = [builder.mul(builder.sext(a, wide), xv) for a, xv in zip(operands(qp, row, c), xs, strict=True)]
                builder.store(builder.add(builder.load(slot), functools.reduce(builder.add, terms)), slot)
        for c, slot in zip(chunks, accs, strict=True):
            sums = sum_pairs(builder, builder.load(slot))
            index = out_index(0, c)
            store_vector(builder, builder.add(load_vector(builder, op, index, 8), sums), op, index)
    return context.get_dummy_value()


@intrinsic
def madd_pairs_into(typingctx, q, q_off, q_step, x, x_off, steps, out, out_off, width):
    """``out[out_off + l] += Σ_{t<steps} Σ_{h<2} q[q_off + t·q_step + 2l + h] · x[x_off + 2t + h]`` for
    l < width (int32, wrapping like int32): ``q`` int8 or int16 (pairs of inputs interleaved per output),
    ``x`` int16 pairs (x_off even), ``out`` int32; ``width`` a multiple of 8, ≤ 64. The width/8
    accumulators stay in registers over the runtime loop; one step is one ``multiply_add_pairs``
    (``vpmaddwd``) per 8 lanes and an add, the pair of x broadcast as one 32-bit value. An int8 ``q`` (a
    GEMV's panel, streamed from memory once) is prefetched ``STREAM_PREFETCH_BYTES`` ahead
    (``_integer_products_codegen``)."""
    lanes = _width(width)
    if (
        lanes is None
        or lanes % 8
        or not is_c_array(q, types.int8, types.int16)
        or not is_c_array(x, types.int16)
        or not is_c_array(out, types.int32)
    ):
        return None

    def codegen(context, builder, signature, args):
        def operands(qp, row, c):  # the 16 codes of outputs 8c … 8c+7, their pairs side by side
            return [load_vector(builder, qp, builder.add(row, as_index(16 * c)), 16)]

        # (an int16 q is a GEMM's widened block, in L1: not prefetched)
        streamed = q.dtype == types.int8
        return _integer_products_codegen(context, builder, args, q, x, out, lanes, 1, operands, streamed)

    i64 = types.int64
    return types.void(q, i64, i64, x, i64, i64, out, i64, width), codegen


@njit
def madd_pairs_into_loop(q, q_off, q_step, x, x_off, steps, out, out_off, width):
    """Twin of ``madd_pairs_into``."""
    for lane in range(width):
        total = np.int64(out[out_off + lane])
        for t in range(steps):
            for h in range(2):
                total += np.int64(q[q_off + t * q_step + 2 * lane + h]) * np.int64(x[x_off + 2 * t + h])
        out[out_off + lane] = np.int32(total)


@intrinsic
def madd_nibble_quads_into(typingctx, q, q_off, q_step, x, x_off, steps, out, out_off, width):
    """``out[out_off + l] += Σ_{t<steps} Σ_{h<2} lo(b_h)·x[x_off + 4t + h] + hi(b_h)·x[x_off + 4t + 2 + h]``
    with ``b_h = q[q_off + t·q_step + 2l + h]``, ``lo(b) = b & 15``, ``hi(b) = b >> 4``, for l < width (int32,
    wrapping like int32): ``q`` uint8, two bytes per output and step holding the 4-bit codes of four inputs
    (inputs 4t, 4t+1 in the low nibbles, 4t+2, 4t+3 in the high ones), ``x`` int16 (x_off a multiple of 4),
    ``out`` int32; ``width`` a multiple of 8, ≤ 64. The low nibbles of an output's two bytes are already
    the int16 pair ``vpmaddwd`` wants (after a zero-extension), and so are the high ones after a 16-bit
    shift: per 8 outputs and step one 16-byte load widened to 16 int16 lanes, an ``and``, a shift and two
    ``multiply_add_pairs`` against the two broadcast pairs of x. No unpacking pass, no scratch; the
    accumulators stay in registers over the runtime loop, and ``q`` is prefetched ahead (the loop is
    ``madd_pairs_into``'s: ``_integer_products_codegen``)."""
    lanes = _width(width)
    if (
        lanes is None
        or lanes % 8
        or not is_c_array(q, types.uint8)
        or not is_c_array(x, types.int16)
        or not is_c_array(out, types.int32)
    ):
        return None

    def codegen(context, builder, signature, args):
        i16x16 = ir.VectorType(ir.IntType(16), 16)

        def operands(qp, row, c):  # outputs 8c … 8c+7's 16 bytes as int16 lanes: (low codes, high codes)
            codes = builder.zext(load_vector(builder, qp, builder.add(row, as_index(16 * c)), 16), i16x16)
            return [
                builder.and_(codes, ir.Constant(i16x16, [15] * 16)),
                builder.lshr(codes, ir.Constant(i16x16, [4] * 16)),
            ]

        return _integer_products_codegen(context, builder, args, q, x, out, lanes, 2, operands, True)

    i64 = types.int64
    return types.void(q, i64, i64, x, i64, i64, out, i64, width), codegen


@njit
def madd_nibble_quads_into_loop(q, q_off, q_step, x, x_off, steps, out, out_off, width):
    """Twin of ``madd_nibble_quads_into``."""
    for lane in range(width):
        total = np.int64(out[out_off + lane])
        for t in range(steps):
            for h in range(2):
                b = np.int64(q[q_off + t * q_step + 2 * lane + h])
                total += (b & 15) * np.int64(x[x_off + 4 * t + h]) + (b >> 4) * np.int64(x[x_off + 4 * t + 2 + h])
        out[out_off + lane] = np.int32(total)


#: each @intrinsic wrapper → its plain-numba twin (tests/test_vector_ir.py checks that every pair agrees)
TWINS = {
    splat_into: splat_into_loop,
    copy_vector: copy_vector_loop,
    load_float32_into: load_float32_into_loop,
    load_nibbles_into: load_nibbles_into_loop,
    fma_into: fma_into_loop,
    fma_tile_into: fma_tile_into_loop,
    butterfly_sums_into: butterfly_sums_into_loop,
    element_address: element_address_loop,
    exp_nonpositive_into: exp_nonpositive_into_loop,
    transpose_into: transpose_into_loop,
    madd_pairs_into: madd_pairs_into_loop,
    madd_nibble_quads_into: madd_nibble_quads_into_loop,
}
