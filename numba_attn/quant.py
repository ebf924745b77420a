"""int8 quantisation of keys and values: ``quantize``, ``dequantize`` and ``QuantizedTensor``.

Symmetric, along the last axis (the head dim), per block of ``block`` entries (default 32, ggml's
q8_0) or per row (``block=None``): scale = max|x| / 127 over the block, q = rint(x / scale) clamped
to [-127, 127]. A quarter of float32's memory plus 4 bytes per block. The attention kernels take a
``QuantizedTensor`` as ``key``/``value`` and compute Q·Kᵀ in int8 × int8 → int32, dequantising V
inside the kernel. Accuracy: see the README's accuracy table.
"""

import math
import numbers

import numpy as np

from ._threads import launch
from .kernels.finite import check_finite_array, max_abs
from .kernels.quantised import dequantize_rows, quantize_rows

__all__ = ["QuantizedTensor", "quantize", "dequantize"]

DEFAULT_BLOCK = 32


class QuantizedTensor:
    """int8 ``data`` (..., D) and float32 ``scales`` (..., ceil(D / block)); x ≈ data · scale of its block.

    Built by :func:`quantize` (or a :class:`KVCache`); built by hand, the constructor checks what
    the kernels rely on: ``block`` a power of two or ≥ D (one scale per row), ``scales`` of the
    matching shape, finite and ≥ 0.
    """

    __slots__ = ("block", "data", "scales")

    def __init__(self, data, scales, block):
        data = np.asarray(data)
        scales = np.asarray(scales)
        if data.dtype != np.int8:
            raise TypeError(f"data must be int8, got {data.dtype}")
        if scales.dtype != np.float32:
            raise TypeError(f"scales must be float32, got {scales.dtype}")
        if data.ndim < 1:
            raise ValueError("data must have at least 1 dim")
        D = data.shape[-1]
        block = _check_block(block, D)
        nb = -(-D // block)
        if scales.shape != data.shape[:-1] + (nb,):
            raise ValueError(
                f"scales must have shape {data.shape[:-1] + (nb,)} for data {data.shape} and block "
                f"{block}, got {scales.shape}"
            )
        if scales.size:
            low = float(scales.min())
            if not np.isfinite(low) or not np.isfinite(max_abs(scales)):
                raise ValueError("scales contains NaN or inf; every scale must be finite and >= 0")
            if low < 0:
                raise ValueError(f"scales must be >= 0 (a block's max |x| / 127), got a scale of {low}")
        self.data, self.scales, self.block = data, scales, block

    @classmethod
    def _trusted(cls, data, scales, block):
        """A tensor whose parts come from ``quantize``, a cache or a valid tensor: no checks (a cache
        hands out views of its storage on every decode step)."""
        self = object.__new__(cls)
        self.data, self.scales, self.block = data, scales, block
        return self

    @property
    def shape(self):
        return self.data.shape

    @property
    def ndim(self):
        return self.data.ndim

    @property
    def dtype(self):
        return self.data.dtype

    @property
    def nbytes(self):
        return self.data.nbytes + self.scales.nbytes

    def __getitem__(self, index):
        """Index the leading dims (not the last): returns a QuantizedTensor view."""
        if not isinstance(index, tuple):
            index = (index,)
        if len(index) >= self.data.ndim or any(i is Ellipsis for i in index):
            raise IndexError("index the leading dims only (the last, quantised axis stays whole)")
        return QuantizedTensor._trusted(self.data[index], self.scales[index], self.block)

    def dequantize(self):
        return dequantize(self)

    def __repr__(self):
        return f"QuantizedTensor(shape={self.shape}, block={self.block}, nbytes={self.nbytes})"


def quantize(x, block=DEFAULT_BLOCK):
    """Quantise ``x`` (..., D) (float16/32/64) to int8 along its last axis.

    ``block``: entries per scale, a power of two (default 32); ``None`` for one scale per row.
    Raises ``ValueError`` for NaN or inf (there is no int8 for them).

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
    """
    x = np.asarray(x)
    if x.dtype.kind != "f":
        raise TypeError(f"x must be a floating array, got dtype {x.dtype}")
    if x.ndim < 1:
        raise ValueError("x must have at least 1 dim")
    D = x.shape[-1]
    if block is None:
        block = max(D, 1)
    block = _check_block(block, D)
    check_finite_array(x, "x")
    if x.dtype == np.float64 and x.size and np.abs(x).max() > np.finfo(np.float32).max:
        raise ValueError("x holds values beyond float32's range: int8 scales are float32")
    rows = np.ascontiguousarray(x.reshape(math.prod(x.shape[:-1]), D))
    if rows.dtype == np.float16:
        rows = rows.view(np.uint16)
    nb = -(-D // block)
    data = np.empty(rows.shape, np.int8)
    scales = np.empty((rows.shape[0], nb), np.float32)
    if rows.size:
        launch(quantize_rows, rows, int(block), data, scales)
    return QuantizedTensor._trusted(data.reshape(x.shape), scales.reshape(x.shape[:-1] + (nb,)), block)


def _check_block(block, D):
    """A block size the kernels can use for rows of D entries: a power of two (entry d has scale
    d >> log2(block)), or ≥ D (one scale per row, stored as D). Returns it as an int."""
    if isinstance(block, (bool, np.bool_)) or not isinstance(block, numbers.Integral) or block <= 0:
        raise ValueError(f"block must be a positive int (None in quantize: one scale per row), got {block!r}")
    block = int(block)
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
    data = np.ascontiguousarray(q.data.reshape(rows, D))
    scales = np.ascontiguousarray(q.scales.reshape(rows, q.scales.shape[-1]))
    out = np.empty(data.shape, np.float32)
    if data.size:
        launch(dequantize_rows, data, scales, q.block, out)
    return out.reshape(q.shape)
