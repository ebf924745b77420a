"""Largest magnitude, NaN and inf: a scan of the bits, at memory speed.

For IEEE floats, clearing the sign bit leaves an unsigned integer that orders like |x|, with
every finite value below the all-ones exponent and inf/NaN at or above it:

    float16  bits & 0x7fff               ≥ 0x7c00               ⇔ NaN or ±inf
    float32  bits & 0x7fffffff           ≥ 0x7f800000
    float64  bits & 0x7fff…ff            ≥ 0x7ff0000000000000

so one integer max over ``bits & magnitude_mask`` gives both max |x| and whether anything is not
finite (vectorised integer max, no float compares, no ``np.isfinite`` temporary; numpy's
``isfinite`` on float16 runs ~10× slower than on float32). Work split: ``prange`` over (batch
entry, chunk of ``config.FINITE_CHUNK_ROWS`` rows); memory: one integer per work item.

The attention kernels do not scan their operands up front (a second read of K and V): they check
the query, the raw scores and the result in loops that already read them (see ``api._run``).
This scan names the culprit once they report a non-finite value, and checks the inputs of
``KVCache.append``, ``quantize`` and the layers.
"""

import numpy as np
from numba import njit, prange

from .. import config
from . import variant

_CHUNK_ROWS = config.FINITE_CHUNK_ROWS  # a compile-time constant of the scan kernels

_BITS = {
    np.dtype(np.float16): (np.uint16, np.uint16(0x7FFF)),
    np.dtype(np.float32): (np.uint32, np.uint32(0x7FFFFFFF)),
    np.dtype(np.float64): (np.uint64, np.uint64(0x7FFFFFFFFFFFFFFF)),
}
#: the magnitude bits of inf: ``_max_magnitude_bits`` at or above them ⇔ NaN or ±inf
_INF_BITS = {np.dtype(np.float16): 0x7C00, np.dtype(np.float32): 0x7F800000, np.dtype(np.float64): 0x7FF0000000000000}


def _max_magnitude_bits(bits, rows, magnitude):
    """max over bits[:, :rows, :] of (bits & magnitude): the bit pattern of the largest |x|."""
    N = bits.shape[0]
    C = bits.shape[2]
    n_chunks = (rows + _CHUNK_ROWS - 1) // _CHUNK_ROWS
    best = np.zeros(N * n_chunks, bits.dtype)
    for w in prange(N * n_chunks):
        n = w // n_chunks
        i0 = (w % n_chunks) * _CHUNK_ROWS
        i1 = min(rows, i0 + _CHUNK_ROWS)
        top = magnitude ^ magnitude  # an unsigned zero: mixing in a signed 0 would type it float64
        for i in range(i0, i1):
            row = bits[n, i]
            for c in range(C):
                v = row[c] & magnitude
                top = v if v > top else top
        best[w] = top
    # a loop, not best.max(): numpy's reduction took ~0.7 s (serial) to 1.5 s (parallel) of this kernel's
    # 1.8 / 3.5 s first compile, which a cache's first prompt append paid
    top = magnitude ^ magnitude
    for w in range(best.shape[0]):
        top = best[w] if best[w] > top else top
    return top


_max_parallel = njit(parallel=True, cache=config.CACHE)(variant(_max_magnitude_bits, "_parallel"))
_max_serial = njit(parallel=False, cache=config.CACHE)(variant(_max_magnitude_bits, "_serial"))


def _scan(bits, rows, magnitude):
    if bits.shape[0] * rows * bits.shape[2] < config.FINITE_SERIAL_BELOW:
        return _max_serial(bits, rows, magnitude)
    from .._threads import launch

    return launch(_max_parallel, bits, rows, magnitude)


def _few_values_bits(x):
    """The bits of max |x| (an integer, as ``_max_magnitude_bits`` gives them) for a few C-contiguous float
    values (a decode step's token: one serial scan, none of ``max_abs``' bookkeeping), or None where the
    general scan applies (more values, a view, ``x`` not float16/32/64)."""
    if x.dtype not in _BITS or x.size >= config.FINITE_SERIAL_BELOW or not x.flags.c_contiguous:
        return None
    width, magnitude = _BITS[x.dtype]
    return _max_serial(x.reshape(1, 1, -1).view(width), 1, magnitude) if x.size else 0


def max_abs(x, rows=None):
    """max |x| over x (float16/32/64, any shape; uint16 is read as float16 bits): inf or NaN if x
    holds any (NaN wins), 0.0 for an empty array. For a C-contiguous (N, slots, C) array with
    ``rows`` given, only x[:, :rows] is read (a KV cache's valid tokens)."""
    if x.dtype == np.uint16:
        x = x.view(np.float16)
    if x.size == 0 or (rows is not None and x.ndim == 3 and rows == 0):
        return 0.0
    if x.dtype not in _BITS:
        raise TypeError(f"max_abs takes float16/32/64 arrays, got {x.dtype}")
    width, magnitude = _BITS[x.dtype]
    top = None if rows is not None else _few_values_bits(x)
    if top is not None:
        return float(width(top).view(x.dtype))
    if rows is not None and x.ndim == 3 and x.flags.c_contiguous:
        top = _scan(x.view(width), rows, magnitude)
    else:
        flat = np.ascontiguousarray(x).reshape(-1).view(width)
        row = config.FINITE_ROW
        whole = flat.size // row * row
        parts = [flat[:whole].reshape(1, -1, row), flat[whole:].reshape(1, 1, -1)]
        top = max(_scan(p, p.shape[1], magnitude) for p in parts if p.size)
    return float(np.array(top, width).view(x.dtype))


def all_finite(x, rows=None):
    """True if x holds no NaN or inf (same arguments as ``max_abs``)."""
    return bool(np.isfinite(max_abs(x, rows)))


def check_finite_array(x, name, rows=None):
    """Raise ``ValueError`` naming ``name`` if x holds NaN or inf.

    float16/32/64 (and uint16, read as float16 bits) go through the bit-level scan above; other
    dtypes (integers, longdouble) through ``np.isfinite``. ``rows``: for a (N, slots, C) kernel
    operand, scan only x[:, :rows] (a KV cache's valid tokens).
    """
    bits = None if rows is not None else _few_values_bits(x)
    if bits is not None:
        # a few values: the bits' max compared with inf's as an integer, no float made of it
        if bits < _INF_BITS[x.dtype]:
            return
        top = max_abs(x)
    elif x.dtype in (np.float16, np.float32, np.float64, np.uint16):
        top = max_abs(x, rows)
    else:
        part = x if rows is None else x[:, :rows]
        top = (
            0.0 if part.dtype.kind in "iub" or np.isfinite(part).all() else (np.nan if np.isnan(part).any() else np.inf)
        )
    if not np.isfinite(top):
        bad = "NaN" if np.isnan(top) else "inf"
        raise ValueError(f"{name} contains {bad}; pass finite values (or check_finite=False to skip the check)")
