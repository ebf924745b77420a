"""Quantised keys and values: ``quantize``, ``dequantize`` and ``QuantizedTensor``.

Along the last axis (the head dim), per block of ``block`` entries (default 32) or per row
(``block=None``):

- ``bits=8`` (ggml's q8_0): symmetric, scale = max|x| / 127 over the block, q = rint(x / scale)
  clamped to [-127, 127]; int8 codes, one float32 scale per block. A quarter of float32's memory
  plus 4 bytes per block.
- ``bits=4`` (ggml's q4_1): 16 levels from the block's minimum in steps of (max - min) / 15,
  code = rint((x - min) / step) in [0, 15], two codes per byte (entry w of a block in the low
  nibble of the block's byte w, entry w + block/2 in its high nibble), step and minimum in float16.
  An eighth of float32's memory plus 4 bytes per block (0.156× float32 at block 32).

The attention kernels take a ``QuantizedTensor`` as ``key``/``value`` and dequantise each key and
value in registers (the float query is never rounded). Accuracy: see the README's tables.
"""

import math
import numbers

import numpy as np

from ._threads import launch
from .kernels.finite import check_finite_array, max_abs
from .kernels.quantised import dequantize_rows, dequantize_rows_q4, quantize_rows, quantize_rows_q4

__all__ = ["QuantizedTensor", "quantize", "dequantize"]

DEFAULT_BLOCK = 32
_FLOAT16_MAX = 65504.0


class QuantizedTensor:
    """A quantised array of logical shape (..., D) (see the module doc for the two schemes).

    ``bits=8``: ``data`` int8 (..., D), ``scales`` float32 (..., ceil(D / block)); x ≈ data · scale of
    its block. ``bits=4``: ``data`` uint8 (..., D / 2), two codes per byte, ``scales`` float16
    (..., D / block, 2), each block's (step, min); x ≈ code · step + min.

    Built by :func:`quantize` (or a :class:`KVCache`); built by hand, the constructor checks what
    the kernels rely on: ``block`` a power of two or ≥ D (one scale per row; for 4 bits an even
    block that divides D), ``scales`` of the matching shape, finite (8 bits: and ≥ 0).
    """

    __slots__ = ("bits", "block", "data", "scales")

    def __init__(self, data, scales, block, bits=8):
        data = np.asarray(data)
        scales = np.asarray(scales)
        if bits not in (4, 8) or isinstance(bits, (bool, np.bool_)):
            raise ValueError(f"bits must be 8 or 4, got {bits!r}")
        code_dtype, scale_dtype = (np.int8, np.float32) if bits == 8 else (np.uint8, np.float16)
        if data.dtype != code_dtype:
            raise TypeError(f"data must be {np.dtype(code_dtype).name} for bits={bits}, got {data.dtype}")
        if scales.dtype != scale_dtype:
            raise TypeError(f"scales must be {np.dtype(scale_dtype).name} for bits={bits}, got {scales.dtype}")
        if data.ndim < 1:
            raise ValueError("data must have at least 1 dim")
        D = data.shape[-1] * (2 if bits == 4 else 1)
        block = _check_block(block, D, bits)
        nb = -(-D // block)
        expected = data.shape[:-1] + ((nb,) if bits == 8 else (nb, 2))
        if scales.shape != expected:
            raise ValueError(
                f"scales must have shape {expected} for data {data.shape}, bits={bits} and block {block}, "
                f"got {scales.shape}"
            )
        if scales.size:
            if not np.isfinite(max_abs(scales)):
                raise ValueError("scales contains NaN or inf; every scale must be finite")
            low = float(scales[..., 0].min()) if bits == 4 else float(scales.min())
            if low < 0:
                raise ValueError(f"scales must be >= 0 (the steps of the blocks), got a scale of {low}")
        self.data, self.scales, self.block, self.bits = data, scales, block, bits

    @classmethod
    def _trusted(cls, data, scales, block, bits=8):
        """A tensor whose parts come from ``quantize``, a cache or a valid tensor: no checks (a cache
        hands out views of its storage on every decode step)."""
        self = object.__new__(cls)
        self.data, self.scales, self.block, self.bits = data, scales, block, bits
        return self

    @property
    def shape(self):
        """The logical shape (..., D) (for 4 bits, D is twice the bytes of a row of ``data``)."""
        shape = self.data.shape
        return shape if self.bits == 8 else shape[:-1] + (2 * shape[-1],)

    @property
    def ndim(self):
        return self.data.ndim

    @property
    def dtype(self):
        """The codes' storage dtype: int8, or uint8 for 4 bits (not a float: the kernels tell the
        formats apart by it)."""
        return self.data.dtype

    @property
    def nbytes(self):
        return self.data.nbytes + self.scales.nbytes

    @property
    def format(self):
        """The storage format's name, as a cache names it: ``np.dtype(np.int8)`` or ``"int4"``."""
        return np.dtype(np.int8) if self.bits == 8 else "int4"

    def __getitem__(self, index):
        """Index the leading dims (not the last): returns a QuantizedTensor view."""
        if not isinstance(index, tuple):
            index = (index,)
        if len(index) >= self.data.ndim or any(i is Ellipsis for i in index):
            raise IndexError("index the leading dims only (the last, quantised axis stays whole)")
        return QuantizedTensor._trusted(self.data[index], self.scales[index], self.block, self.bits)

    def dequantize(self):
        return dequantize(self)

    def __repr__(self):
        return f"QuantizedTensor(shape={self.shape}, bits={self.bits}, block={self.block}, nbytes={self.nbytes})"


def quantize(x, block=DEFAULT_BLOCK, bits=8):
    """Quantise ``x`` (..., D) (float16/32/64) along its last axis: int8 (``bits=8``) or 4-bit (``bits=4``).

    ``block``: entries per scale, a power of two (default 32); ``None`` for one scale per row. For 4
    bits the block must divide D and be even (``None``: D must be even). Raises ``ValueError`` for NaN
    or inf (there is no code for them) and for values beyond the range of the scales (float32 for 8
    bits, float16's ±65504 for 4 bits).

    Examples
    --------
    >>> import numpy as np
    >>> import numba_attn
    >>> x = np.random.default_rng(0).standard_normal((3, 64)).astype(np.float32)
    >>> qx = numba_attn.quantize(x)
    >>> qx.data.dtype, qx.data.shape, qx.scales.shape, qx.block      # one float32 scale per 32 values
    (dtype('int8'), (3, 64), (3, 2), 32)
    >>> scale = np.repeat(qx.scales, 32, axis=-1)                     # each value's scale: max |block| / 127
    >>> bool((np.abs(numba_attn.dequantize(qx) - x) <= scale / 2 + 1e-7).all())   # rounding: half a step
    True
    >>> q4 = numba_attn.quantize(x, bits=4)                           # two codes per byte, (step, min) per block
    >>> q4.data.dtype, q4.data.shape, q4.scales.dtype, q4.scales.shape, q4.shape
    (dtype('uint8'), (3, 32), dtype('float16'), (3, 2, 2), (3, 64))
    >>> step = np.repeat(q4.scales[..., 0].astype(np.float32), 32, axis=-1)
    >>> bool((np.abs(numba_attn.dequantize(q4) - x) <= step / 2 + 1e-3).all())   # half a step (+ float16's min)
    True
    """
    if isinstance(bits, (bool, np.bool_)) or bits not in (4, 8):
        raise ValueError(f"bits must be 8 or 4, got {bits!r}")
    x = np.asarray(x)
    if x.dtype.kind != "f":
        raise TypeError(f"x must be a floating array, got dtype {x.dtype}")
    if x.ndim < 1:
        raise ValueError("x must have at least 1 dim")
    D = x.shape[-1]
    if block is None:
        block = max(D, 1)
    block = _check_block(block, D, bits)
    check_finite_array(x, "x")
    limit = np.finfo(np.float32).max if bits == 8 else _FLOAT16_MAX
    if x.dtype != np.float16 and x.size and max_abs(x) > limit:
        raise ValueError(
            "x holds values beyond float32's range: int8 scales are float32"
            if bits == 8
            else "x holds values beyond float16's range (|x| > 65504): 4-bit steps and minimums are float16"
        )
    rows = np.ascontiguousarray(x.reshape(math.prod(x.shape[:-1]), D))
    if rows.dtype == np.float16:
        rows = rows.view(np.uint16)
    nb = -(-D // block)
    if bits == 4:
        data = np.empty((rows.shape[0], D // 2), np.uint8)
        scales = np.empty((rows.shape[0], 2 * nb), np.uint16)
        if rows.size:
            launch(quantize_rows_q4, rows, int(block), data, scales)
        scales = scales.view(np.float16).reshape(x.shape[:-1] + (nb, 2))
        return QuantizedTensor._trusted(data.reshape(x.shape[:-1] + (D // 2,)), scales, block, 4)
    data = np.empty(rows.shape, np.int8)
    scales = np.empty((rows.shape[0], nb), np.float32)
    if rows.size:
        launch(quantize_rows, rows, int(block), data, scales)
    return QuantizedTensor._trusted(data.reshape(x.shape), scales.reshape(x.shape[:-1] + (nb,)), block)


def _check_block(block, D, bits=8):
    """A block size the kernels can use for rows of D entries, returned as an int. 8 bits: a power of
    two (entry d has scale d >> log2(block)), or ≥ D (one scale per row, stored as D). 4 bits: an even
    power of two that divides D, or D itself (even)."""
    if isinstance(block, (bool, np.bool_)) or not isinstance(block, numbers.Integral) or block <= 0:
        raise ValueError(f"block must be a positive int (None in quantize: one scale per row), got {block!r}")
    block = int(block)
    if bits == 4:
        block = min(block, D)
        if D % 2 or block % 2 or D % block or (block < D and block & (block - 1)):
            raise ValueError(
                f"4-bit blocks pack two entries per byte: block must be an even power of two that divides the "
                f"last dim {D} (or None: one block per row, D even), got {block}"
            )
        return block
    if block < D and block & (block - 1):
        raise ValueError(f"block must be a power of two (or ≥ the last dim {D}: one scale per row), got {block}")
    return min(block, max(D, 1))


def dequantize(q):
    """float32 array ≈ the tensor ``q`` was made from.

    >>> import numpy as np
    >>> import numba_attn
    >>> x = np.linspace(-1, 1, 8, dtype=np.float32)
    >>> y = numba_attn.dequantize(numba_attn.quantize(x, block=None))     # one scale for the row: 1 / 127
    >>> y.dtype, bool(np.abs(y - x).max() <= 0.5 / 127 + 1e-7)
    (dtype('float32'), True)
    """
    if not isinstance(q, QuantizedTensor):
        raise TypeError(f"q must be a QuantizedTensor, got {type(q).__name__}")
    D = q.shape[-1]
    rows = math.prod(q.shape[:-1])
    data = np.ascontiguousarray(q.data.reshape(rows, q.data.shape[-1]))
    out = np.empty((rows, D), np.float32)
    if q.bits == 4:
        scales = np.ascontiguousarray(q.scales.view(np.uint16).reshape(rows, -1))
        if data.size:
            launch(dequantize_rows_q4, data, scales, q.block, out)
        return out.reshape(q.shape)
    scales = np.ascontiguousarray(q.scales.reshape(rows, q.scales.shape[-1]))
    if data.size:
        launch(dequantize_rows, data, scales, q.block, out)
    return out.reshape(q.shape)
