"""Scalar helpers that vectorise inside numba loops.

``fast_exp(x)``: numba lowers ``np.exp``/``math.exp`` to scalar ``expf`` calls (no SVML), which keeps
the softmax loop from vectorising. For float32 we use a range-reduced polynomial instead:

    x = n·ln2 + r,  n = round(x·log2 e),  |r| ≤ ln2/2
    exp(x) = 2ⁿ · P(r),  P = degree-6 Taylor polynomial (Horner form)
    2ⁿ is built from bits: float32 with exponent field n + 127 (as 2·2ⁿ⁻¹ when n > 0, to reach FLT_MAX)

Max relative error ≈ 2e-7 (one float32 ulp or two). Inputs below -87.3 (including -inf) return
exactly 0, inputs above log(FLT_MAX) ≈ 88.7228 return +inf, so -inf masking keeps its meaning. Every step is an
add, multiply, floor, int conversion, shift or bitcast: LLVM turns the loop into vector code.
For float64 we call ``math.exp`` (the float64 path is the accurate one, not the fast one).

``exp_nonpositive(x)``: the same for x ≤ 0 only (the softmax's arguments), without the overflow path.
"""

import math

import numpy as np
from llvmlite import ir
from numba import njit, types
from numba.extending import intrinsic, overload

from .. import config


@intrinsic
def _int32_bits_as_float32(typingctx, bits):
    """Reinterpret an int32's bits as a float32 (no conversion): LLVM ``bitcast``."""
    if bits != types.int32:
        return None

    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], ir.FloatType())

    return types.float32(types.int32), codegen


@intrinsic
def running_max(typingctx, a, x):
    """``x if a < x else a`` (Python's ``max(a, x)`` for floats, NaN ``x`` ignored) as one LLVM ``fcmp``
    + ``select``: a value, not a branch. Written as ``max``, LLVM turns ``a[r] = max(a[r], x[r])``
    into a conditional store, which the vectoriser emits as a masked store (``vmaskmovps`` on AVX2:
    microcoded, ~8× slower than the max pass needs)."""
    if not (isinstance(a, types.Float) and a == x):
        return None

    def codegen(context, builder, signature, args):
        lhs, rhs = args
        return builder.select(builder.fcmp_ordered("<", lhs, rhs), rhs, lhs)

    return a(a, x), codegen


def fast_exp(x):
    """Pure-Python stand-in; inside numba kernels the overload below is used."""
    return math.exp(x)


_LOG2E = np.float32(1.4426950408889634)
_LN2_HI = np.float32(0.693145751953125)
_LN2_LO = np.float32(1.428606765330187e-06)
_EXP_LO = np.float32(-87.3)
_EXP_HI = np.float32(88.72283)  # log(largest float32): above it exp overflows


@njit(fastmath=config.FASTMATH, inline="always")
def _exp_reduced(xc):
    """(n, P(r)) with xc = n·ln2 + r, |r| ≤ ln2/2, P the degree-6 Taylor polynomial of exp (float32):
    exp(xc) = 2ⁿ·P(r). Shared by ``fast_exp`` and ``exp_nonpositive``, which differ only in how
    they clamp xc and build 2ⁿ."""
    n = np.floor(xc * _LOG2E + np.float32(0.5))
    r = xc - n * _LN2_HI - n * _LN2_LO
    p = np.float32(1.0 / 720.0)
    p = p * r + np.float32(1.0 / 120.0)
    p = p * r + np.float32(1.0 / 24.0)
    p = p * r + np.float32(1.0 / 6.0)
    p = p * r + np.float32(0.5)
    p = p * r + np.float32(1.0)
    p = p * r + np.float32(1.0)
    return n, p


@overload(fast_exp, fastmath=config.FASTMATH)
def _fast_exp_overload(x):
    if x == types.float32:

        def impl(x):
            xc = min(max(x, _EXP_LO), _EXP_HI)
            n, p = _exp_reduced(xc)
            # for n > 0 build 2ⁿ as 2·2ⁿ⁻¹: n reaches 128 just below log(FLT_MAX), where 2ⁿ itself is inf
            ni = np.int32(n)
            high = ni > np.int32(0)
            two = _int32_bits_as_float32(np.int32((ni + np.int32(127) - np.int32(high)) << np.int32(23)))
            y = p * two
            y = y + y if high else y
            y = np.float32(0.0) if x < _EXP_LO else y
            return np.float32(np.inf) if x > _EXP_HI else y

        return impl
    if isinstance(x, types.Float):

        def impl(x):
            return math.exp(x)

        return impl
    return None


def exp_nonpositive(x):
    """Pure-Python stand-in; inside numba kernels the overload below is used."""
    return math.exp(x)


@overload(exp_nonpositive, fastmath=config.FASTMATH)
def _exp_nonpositive_overload(x):
    """``fast_exp`` for x ≤ 0 (and -inf), the softmax's case: s - max(s) and m_old - m_new.

    Same polynomial and accuracy, without the overflow path (n ≤ 0, so 2ⁿ is built directly):
    about 7 fewer vector operations per exp. A positive x gives garbage and NaN an unspecified
    value (the kernels check their scores for NaN before the softmax).
    """
    if x == types.float32:

        def impl(x):
            xc = max(x, _EXP_LO)
            n, p = _exp_reduced(xc)
            y = p * _int32_bits_as_float32(np.int32((np.int32(n) + np.int32(127)) << np.int32(23)))
            return np.float32(0.0) if x < _EXP_LO else y

        return impl
    if isinstance(x, types.Float):

        def impl(x):
            return math.exp(x)

        return impl
    return None


@njit(fastmath=config.FASTMATH, cache=config.CACHE)
def exp_nonpositive_array(x, out):
    """``out[i] = exp_nonpositive(x[i])``: exposed for tests of the approximation."""
    for i in range(x.shape[0]):
        out[i] = exp_nonpositive(x[i])


@njit(fastmath=config.FASTMATH, cache=config.CACHE)
def fast_exp_array(x, out):
    """``out[i] = fast_exp(x[i])``: exposed for tests of the approximation."""
    for i in range(x.shape[0]):
        out[i] = fast_exp(x[i])
