"""Reading stored numbers into the compute dtype inside a kernel: float16 without numpy copies.

numba has no CPU float16 type (a float16 array cannot even be passed to an @njit function), so
float16 data reaches the kernels as its ``uint16`` bit pattern and is converted here by LLVM's
``fpext half → float`` (``vcvtph2ps`` on x86 with F16C, ``fcvtl`` on aarch64): bit-exact for all
65 536 values, vectorised, and free of temporary arrays. Stores go the other way with ``fptrunc``
(round to nearest even, as numpy).

``load(x)``: uint16 → float32 (half bits), float → the same float.
``half_bits(f)``: float32 → uint16 bits of the nearest float16.
``to_float16(x)``: a float32 array → float16, vectorised (numpy's ``astype`` is ~100× slower).
"""

import ctypes

import numpy as np
from llvmlite import binding as llvm_binding
from llvmlite import ir
from numba import njit, types
from numba.extending import intrinsic, overload

from .. import config


def _provide_half_conversion_helpers():
    """On x86 without F16C (e.g. ``NUMBA_CPU_NAME=generic``, for a portable cache) LLVM lowers the
    half ↔ float conversions to the compiler-runtime calls ``__extendhfsf2``/``__truncsfhf2``,
    which numba's JIT cannot resolve on its own ("LLVM ERROR: Symbol not found", an abort). GCC's
    libgcc_s (12 and later) exports both with the same calling convention: hand them to the JIT."""
    try:
        libgcc = ctypes.CDLL("libgcc_s.so.1")
    except OSError:
        return
    for name in ("__extendhfsf2", "__truncsfhf2"):
        if llvm_binding.address_of_symbol(name) is None and hasattr(libgcc, name):
            llvm_binding.add_symbol(name, ctypes.cast(getattr(libgcc, name), ctypes.c_void_p).value)


_provide_half_conversion_helpers()


@intrinsic
def _half_bits_to_float32(typingctx, bits):
    if bits != types.uint16:
        return None

    def codegen(context, builder, signature, args):
        return builder.fpext(builder.bitcast(args[0], ir.HalfType()), ir.FloatType())

    return types.float32(types.uint16), codegen


@intrinsic
def half_bits(typingctx, value):
    """float32 → the uint16 bit pattern of the nearest float16 (overflow gives ±inf)."""
    if value != types.float32:
        return None

    def codegen(context, builder, signature, args):
        return builder.bitcast(builder.fptrunc(args[0], ir.HalfType()), ir.IntType(16))

    return types.uint16(types.float32), codegen


def load(x):  # pragma: no cover - replaced by the overload inside numba
    return x


@overload(load)
def _load_overload(x):
    if x == types.uint16:
        return lambda x: _half_bits_to_float32(x)
    if isinstance(x, types.Float):
        return lambda x: x
    return None


def rows_for_compute(x, j0, n, scratch):  # pragma: no cover - numba overload below
    raise TypeError("rows_for_compute is a numba kernel helper: call it from @njit code")


@overload(rows_for_compute)
def _rows_for_compute_overload(x, j0, n, scratch):
    """(rows, offset) such that rows[offset + j] is row j0 + j of x in the compute dtype.

    Float storage: x itself (no copy). float16 bits: rows j0 … j0+n-1 converted into ``scratch``
    once (a vectorised conversion), so inner loops that reuse each row many times read float32
    instead of converting every scalar they broadcast.
    """
    if isinstance(x, types.Array) and x.dtype == types.uint16:

        def impl_half(x, j0, n, scratch):
            for j in range(n):
                src = x[j0 + j]
                dst = scratch[j]
                for d in range(src.shape[0]):
                    dst[d] = _half_bits_to_float32(src[d])
            return scratch, 0

        return impl_half

    def impl_float(x, j0, n, scratch):
        return x, j0

    return impl_float


@njit(cache=config.CACHE)
def to_half_bits(x, out):
    """out[i] = the uint16 bits of float16(x[i]) (round to nearest even, as numpy), for flat arrays.

    One thread on purpose: the loop is vectorised (``vcvtps2ph``/``fcvtn``) and memory-bound, 0.04 ms
    for 0.5 M values here, while a ``prange`` version took 2.3 ms.
    """
    for i in range(x.shape[0]):
        out[i] = half_bits(x[i])


def to_float16(x):
    """float32 array → float16 array, bit-identical to numpy's ``astype`` and ~100× faster here
    (numpy converts element by element in software: 3.6 ms for 0.5 M values)."""
    flat = np.ascontiguousarray(x, dtype=np.float32).reshape(-1)
    bits = np.empty(flat.shape, np.uint16)
    to_half_bits(flat, bits)
    return bits.view(np.float16).reshape(x.shape)
