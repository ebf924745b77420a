"""Appending a few tokens to a ``KVCache``: check, convert and write in one serial call.

A decode step appends one token per layer: B·H_kv rows of D values for the keys and as many for the
values. Through numpy that is a dozen small operations (finite scan, conversion, quantisation in a
parallel kernel, fancy-index writes), ~12-35 µs, and a parallel launch for a few hundred numbers
can stall for milliseconds when the machine is busy. Here each step is one serial call:

- ``scan_rows(x, limit)``: 0 if every value of x (B, H, T, D) is finite with |x| ≤ limit, 1 if one is
  NaN or ±inf, 2 if one is finite but beyond ``limit`` (float16's 65504 for a float16 store, float32's
  max for an int8 one): the caller refuses before anything is written.
- ``write_rows(x, data, slot0, t0, ring0)``: token t ≥ t0 of x goes to slot s = slot0 + t − t0 of
  ``data`` (B, H, slots, D), folded back onto the ring ``ring0 … slots-1`` when s ≥ slots
  (``ring0`` = a sink cache's sink slots, else 0: plain mod slots), converted to the storage type:
  a float, float16 bits (round to nearest even, as numpy), or a raw copy when both are float16 bits.
- ``write_rows_int8(x, data, scales, block, slot0, t0, ring0, row)``: the same, quantised to int8 per block
  (``quantised.quantize_row_into``: the scheme and rounding of ``quantize``) through the float32
  scratch ``row`` (D,).

- ``write_rows_int4(x, data, scales, block, slot0, t0, ring0)``: the same into a 4-bit store (codes
  (B, H, slots, D/2) uint8, (step, min) float16 bits (B, H, slots, 2·blocks)), ``quantize``'s 4-bit
  scheme (``quantised.quantize_row_q4_into``) read straight from x.

- ``append_rows(key, …, value, …, slot0, t0, ring0)``: all of the above for a key and a value in one
  call (a decode step's append: one numba dispatch instead of four): both scanned, then both written
  unless one is refused. A tensor the cache stores Hadamard-rotated (its ``rotation`` an int block,
  not None) is rotated here first (``hadamard_rows_max``, the kernel the numpy path rotates with, so the
  bytes stored are the same): the caller's NaN/inf is refused as the caller's (code 1),
  a finite x whose rotation overflows as the rotation's (code 3), and the range limit applies to H·x.

x may be float32, float64 or float16 bits (uint16); memory: nothing beyond the scratch row, and for a
rotated tensor one (B·H·T, D) float32 (float64 for float64 x) copy of H·x.
"""

import numpy as np
from numba import njit, types
from numba.extending import overload

from .. import config
from ._load import half_bits, load
from .hadamard import hadamard_rows_max
from .quantised import quantize_row_into, quantize_row_q4_into


@njit(cache=config.CACHE)
def scan_rows(x, limit):
    """0: all finite and |x| ≤ limit; 1: a NaN or ±inf; 2: a finite value beyond limit."""
    B, H, T, D = x.shape
    code = 0
    for b in range(B):
        for h in range(H):
            for t in range(T):
                row = x[b, h, t]
                for d in range(D):
                    v = abs(np.float64(load(row[d])))
                    if not v < np.inf:
                        return 1  # NaN (every compare fails) or inf
                    if v > limit:
                        code = 2
    return code


@njit(cache=config.CACHE)
def _fold(s, slots, ring0):
    """Slot s, or past the last slot, its place on the ring ring0 … slots-1."""
    return s if s < slots else ring0 + (s - ring0) % (slots - ring0)


@njit(cache=config.CACHE)
def write_rows(x, data, slot0, t0, ring0):
    """data[b, h, fold(slot0 + t - t0)] = x[b, h, t] for t ≥ t0, converted to data's type."""
    B, H, T, _D = x.shape
    slots = data.shape[2]
    for b in range(B):
        for h in range(H):
            for t in range(t0, T):
                src = x[b, h, t]
                dst = data[b, h, _fold(slot0 + t - t0, slots, ring0)]
                _store_row(src, dst)


def _store_row(src, dst):  # pragma: no cover - numba overload below
    raise TypeError("_store_row is a numba kernel helper: call it from @njit code")


@overload(_store_row)
def _store_row_overload(src, dst):
    """One row into the store: raw bits (float16 into float16), float16 bits, or a float."""
    if dst.dtype == types.uint16 and src.dtype == types.uint16:

        def impl_copy(src, dst):
            for d in range(src.shape[0]):
                dst[d] = src[d]

        return impl_copy
    if dst.dtype == types.uint16:

        def impl_half(src, dst):
            for d in range(src.shape[0]):
                dst[d] = half_bits(np.float32(load(src[d])))

        return impl_half

    def impl_float(src, dst):
        for d in range(src.shape[0]):
            dst[d] = load(src[d])

    return impl_float


@njit(cache=config.CACHE)
def write_rows_int8(x, data, scales, block, slot0, t0, ring0, row):
    """``write_rows`` into an int8 store: each row quantised with ``quantize``'s scheme."""
    B, H, T, D = x.shape
    slots = data.shape[2]
    for b in range(B):
        for h in range(H):
            for t in range(t0, T):
                src = x[b, h, t]
                for d in range(D):
                    row[d] = np.float32(load(src[d]))
                s = _fold(slot0 + t - t0, slots, ring0)
                quantize_row_into(row, block, data[b, h, s], scales[b, h, s])


@njit(cache=config.CACHE)
def write_rows_int4(x, data, scales, block, slot0, t0, ring0):
    """``write_rows`` into a 4-bit store: each row quantised with ``quantize``'s 4-bit scheme."""
    B, H, T, _D = x.shape
    slots = data.shape[2]
    for b in range(B):
        for h in range(H):
            for t in range(t0, T):
                s = _fold(slot0 + t - t0, slots, ring0)
                quantize_row_q4_into(x[b, h, t], block, data[b, h, s], scales[b, h, s])


def _write_tensor(x, data, scales, block, slot0, t0, ring0):  # pragma: no cover - numba overload below
    raise TypeError("_write_tensor is a numba kernel helper: call it from @njit code")


@overload(_write_tensor)
def _write_tensor_overload(x, data, scales, block, slot0, t0, ring0):
    """``write_rows``, ``write_rows_int8`` or ``write_rows_int4``, by the store's element type (int8, uint8
    4-bit codes, or a float / float16 bits); ``scales`` is ignored by the float stores."""
    if data.dtype == types.int8:

        def impl_int8(x, data, scales, block, slot0, t0, ring0):
            write_rows_int8(x, data, scales, block, slot0, t0, ring0, np.empty(data.shape[3], np.float32))

        return impl_int8
    if data.dtype == types.uint8:

        def impl_int4(x, data, scales, block, slot0, t0, ring0):
            write_rows_int4(x, data, scales, block, slot0, t0, ring0)

        return impl_int4

    def impl_float(x, data, scales, block, slot0, t0, ring0):
        write_rows(x, data, slot0, t0, ring0)

    return impl_float


def _checked(x, limit, rotation):  # pragma: no cover - numba overload below
    raise TypeError("_checked is a numba kernel helper: call it from @njit code")


@overload(_checked)
def _checked_overload(x, limit, rotation):
    """(scan code, the rows to store): x and ``scan_rows(x, limit)`` when ``rotation`` is None; else H·x
    (B, H, T, D) by ``hadamard_rows_max`` with block ``rotation`` (float32, float64 for float64 x: the
    kernel the numpy path rotates with, reading x once), with code 1 for NaN/inf in x, 3 for a finite x
    whose rotation is not finite, 2 for H·x beyond ``limit``."""
    if isinstance(rotation, types.NoneType):
        return lambda x, limit, rotation: (scan_rows(x, limit) if x.size else 0, x)
    dtype = np.float64 if x.dtype == types.float64 else np.float32

    def impl(x, limit, rotation):
        B, H, T, D = x.shape
        out = np.empty((B * H * T, D), dtype)
        top = hadamard_rows_max(x.reshape((B * H * T, D)), rotation, out)  # inf if x holds NaN or ±inf
        rotated = out.reshape((B, H, T, D))
        if x.size == 0:
            return 0, rotated
        if not top < np.inf:
            return 1, rotated
        code = scan_rows(rotated, limit)
        return (3 if code == 1 else code), rotated

    return impl


@njit(cache=config.CACHE)
def append_rows(
    key, key_limit, key_nan_ok, key_rotation, key_data, key_scales, key_block,
    value, value_limit, value_nan_ok, value_rotation, value_data, value_scales, value_block,
    slot0, t0, ring0,
):  # fmt: skip
    """A decode step's append in one call: the key and the value checked (``_checked``: rotated first
    when ``*_rotation`` is a block, not None), then, unless one is refused (code 2 or 3, or code 1
    without ``*_nan_ok``), both written from token ``t0`` on at ``slot0`` (``_write_tensor``). Returns
    4·key_code + value_code; nothing is written when either is refused."""
    key_code, key_rows = _checked(key, key_limit, key_rotation)
    value_code, value_rows = _checked(value, value_limit, value_rotation)
    refused = key_code >= 2 or (key_code == 1 and not key_nan_ok)
    refused = refused or value_code >= 2 or (value_code == 1 and not value_nan_ok)
    if not refused:
        _write_tensor(key_rows, key_data, key_scales, key_block, slot0, t0, ring0)
        _write_tensor(value_rows, value_data, value_scales, value_block, slot0, t0, ring0)
    return 4 * key_code + value_code
