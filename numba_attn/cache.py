"""KVCache: preallocated key/value storage for decoding one token at a time.

Layout: ``(batch, num_kv_heads, slots, head_dim)`` for keys and ``(..., value_dim)`` for values,
C-contiguous, allocated once. ``slots`` is ``capacity`` or, with ``window=W``, ``W`` (a ring
buffer: token at absolute position p lives in slot p mod W).

The attention kernels read the valid slots straight from this storage: no copy per step.
"""
import numbers

import numpy as np

from ._validate import FLOAT16_MAX, check_finite_array
from .quant import DEFAULT_BLOCK, QuantizedTensor, quantize

__all__ = ["KVCache"]

_DTYPES = (np.dtype(np.float32), np.dtype(np.float64), np.dtype(np.float16), np.dtype(np.int8))


class KVCache:
    """Keys and values of the tokens seen so far, for ``batch`` sequences and ``num_kv_heads`` heads.

    Parameters
    ----------
    batch, num_kv_heads, head_dim : int
    capacity : int
        Most tokens held. Without a window, appending past it raises ``ValueError`` (nothing is
        written, nothing lost). With a window it is the longest sequence accepted overall (use a
        large number for unbounded streaming); storage is ``window`` slots.
    dtype : float32, float64, float16 or int8
        Storage. float16 halves the memory of float32 (values beyond ±65504 are refused); int8
        quantises each token's key and value per block of ``block`` entries on append (about 0.28×
        float32 with the default block of 32) and the kernels decode straight from int8.
    window : int, optional
        Keep only the last ``window`` tokens (sliding-window models): a ring buffer of ``window``
        slots.
    value_dim : int, optional
        Value head size when it differs from ``head_dim``.
    block : int or None
        int8 only: entries per scale (default 32, ggml's q8_0); None for one scale per token and head.

    Examples
    --------
    Decoding token by token gives what attention over the whole sequence gives:

    >>> import numpy as np
    >>> import numba_attn
    >>> rng = np.random.default_rng(0)
    >>> q, k, v = (rng.standard_normal((1, 2, 4, 8), dtype=np.float32) for _ in range(3))
    >>> cache = numba_attn.KVCache(batch=1, num_kv_heads=2, head_dim=8, capacity=16)
    >>> steps = []
    >>> for t in range(4):
    ...     cache.append(k[:, :, t:t + 1], v[:, :, t:t + 1])
    ...     steps.append(numba_attn.scaled_dot_product_attention(q[:, :, t:t + 1], cache.keys, cache.values,
    ...                                                          is_causal="lower_right"))
    >>> cache.length, cache.keys.shape
    (4, (1, 2, 4, 8))
    >>> full = numba_attn.reference.scaled_dot_product_attention(q, k, v, is_causal=True)
    >>> bool(np.allclose(np.concatenate(steps, axis=2), full, atol=1e-5))
    True
    """

    def __init__(self, batch, num_kv_heads, head_dim, capacity, dtype=np.float32, window=None, value_dim=None,
                 block=DEFAULT_BLOCK):
        for name, val in (("batch", batch), ("num_kv_heads", num_kv_heads), ("head_dim", head_dim),
                          ("capacity", capacity)):
            if isinstance(val, bool) or not isinstance(val, numbers.Integral) or val <= 0:
                raise ValueError(f"{name} must be a positive int, got {val!r}")
        value_dim = head_dim if value_dim is None else value_dim
        if isinstance(value_dim, bool) or not isinstance(value_dim, numbers.Integral) or value_dim <= 0:
            raise ValueError(f"value_dim must be a positive int, got {value_dim!r}")
        if window is not None:
            if isinstance(window, bool) or not isinstance(window, numbers.Integral) or window <= 0:
                raise ValueError(f"window must be a positive int or None, got {window!r}")
        dtype = np.dtype(dtype)
        if dtype not in _DTYPES:
            raise TypeError(f"dtype must be float32, float64, float16 or int8, got {dtype}")
        self.batch, self.num_kv_heads, self.head_dim, self.value_dim = int(batch), int(num_kv_heads), int(head_dim), int(value_dim)
        self.capacity = int(capacity)
        self.window = None if window is None else int(window)
        self.dtype = dtype
        slots = self.capacity if self.window is None else min(self.window, self.capacity)
        self._keys = np.zeros((self.batch, self.num_kv_heads, slots, self.head_dim), dtype)
        self._values = np.zeros((self.batch, self.num_kv_heads, slots, self.value_dim), dtype)
        self._key_scales = self._value_scales = None
        self.block = None
        if dtype == np.int8:
            self.block = self.head_dim if block is None else int(block)
            if self.block <= 0:
                raise ValueError(f"block must be a positive int or None, got {block!r}")
            if block is not None and self.value_dim != self.head_dim:
                raise ValueError("int8 with value_dim != head_dim: use block=None (per-token scales)")
            self._key_scales = np.zeros(self._keys.shape[:3] + (-(-self.head_dim // self.block),), np.float32)
            self._value_scales = np.zeros(self._values.shape[:3] + (-(-self.value_dim // self.block),), np.float32)
        self._length = 0

    # -- state ------------------------------------------------------------------------------------
    @property
    def slots(self):
        return self._keys.shape[2]

    @property
    def length(self):
        """Tokens appended since the last reset (the next token's position)."""
        return self._length

    def __len__(self):
        return self._length

    @property
    def n_valid(self):
        """Tokens held now: ``min(length, slots)``."""
        return min(self._length, self.slots)

    @property
    def wrapped(self):
        """True when a ring buffer has overwritten its oldest slots (storage order ≠ position order)."""
        return self._length > self.slots

    @property
    def nbytes(self):
        """Bytes of storage (data and, for int8, scales)."""
        extra = 0 if self._key_scales is None else self._key_scales.nbytes + self._value_scales.nbytes
        return self._keys.nbytes + self._values.nbytes + extra

    def reset(self):
        """Forget every token (storage is kept)."""
        self._length = 0

    # -- views ------------------------------------------------------------------------------------
    def _view(self, data, scales, index):
        d = data[:, :, index]
        if scales is None:
            d.flags.writeable = False
            return d
        sc = scales[:, :, index]
        d.flags.writeable = False
        sc.flags.writeable = False
        return QuantizedTensor(d, sc, self.block)

    @property
    def keys(self):
        """Read-only view (batch, H_kv, n_valid, head_dim) of the stored keys, in storage order
        (a ``QuantizedTensor`` for int8). Without a window, or before the ring wraps, storage order
        is position order."""
        return self._view(self._keys, self._key_scales, slice(0, self.n_valid))

    @property
    def values(self):
        return self._view(self._values, self._value_scales, slice(0, self.n_valid))

    def ordered(self):
        """(keys, values) in position order: views when possible, a copy once a ring has wrapped."""
        if not self.wrapped:
            return self.keys, self.values
        start = self._length % self.slots
        order = np.r_[start:self.slots, 0:start]
        return (self._view(self._keys, self._key_scales, order),
                self._view(self._values, self._value_scales, order))

    def ordered_with(self, key, value):
        """(keys, values) in position order followed by the new ``key``/``value`` (not stored), in
        the cache's storage format: what a windowed chunk of several new tokens attends over."""
        old_k, old_v = self.ordered()
        new_k, new_v = self._encode(key, "key"), self._encode(value, "value")
        return _concat_tokens(old_k, new_k), _concat_tokens(old_v, new_v)

    def positions(self, appended=0):
        """Absolute position of the token in each valid slot, shape (n_valid,): now, or once
        ``appended`` more tokens have been appended (what a caller needs before it appends)."""
        length = self._length + appended
        n = min(length, self.slots)
        if length <= self.slots:
            return np.arange(n)
        start = length - self.slots             # position held by slot start % slots
        return start + (np.arange(n) - start) % self.slots

    def _encode(self, x, name):
        """x in the storage format: an array of the cache dtype, or a QuantizedTensor for int8."""
        if self.dtype == np.int8:
            return quantize(x, self.block)
        if self.dtype == np.float16 and x.dtype != np.float16 and x.size and np.abs(x).max() > FLOAT16_MAX:
            raise ValueError(f"{name} holds values beyond float16's range (|x| > 65504): a float16 cache would "
                             "store inf; use a float32 cache")
        return x.astype(self.dtype, copy=False)

    # -- writing ----------------------------------------------------------------------------------
    def append(self, key, value, check_finite=True):
        """Store ``key`` (batch, H_kv, T, head_dim) and ``value`` (batch, H_kv, T, value_dim).

        Values are converted to the cache dtype. Raises ``ValueError`` before writing anything if
        the shapes are wrong, the inputs are not finite, or (without a window) the cache would
        overflow ``capacity``.
        """
        key = np.asarray(key)
        value = np.asarray(value)
        for name, x, dim in (("key", key, self.head_dim), ("value", value, self.value_dim)):
            if x.dtype.kind != "f":
                raise TypeError(f"{name} must be a floating array, got dtype {x.dtype}")
            if x.ndim != 4 or x.shape[0] != self.batch or x.shape[1] != self.num_kv_heads or x.shape[3] != dim:
                raise ValueError(f"{name} must have shape (batch, num_kv_heads, T, {dim}) = "
                                 f"({self.batch}, {self.num_kv_heads}, T, {dim}), got {x.shape}")
        if key.shape[2] != value.shape[2]:
            raise ValueError(f"key and value must hold the same number of tokens, got {key.shape[2]} and {value.shape[2]}")
        T = key.shape[2]
        if self._length + T > self.capacity:
            raise ValueError(f"KVCache is full: {self._length} tokens held + {T} new > capacity {self.capacity}"
                             + ("" if self.window is not None else "; create it with a larger capacity or a window"))
        if check_finite:
            check_finite_array(key, "key")
            check_finite_array(value, "value")
        key, value = self._encode(key, "key"), self._encode(value, "value")
        slots = self.slots
        if self.window is None or self._length + T <= slots:
            where = slice(self._length, self._length + T)
            first = 0
        else:
            keep = min(T, slots)                  # only the last `slots` new tokens can survive
            where = (self._length + T - keep + np.arange(keep)) % slots
            first = T - keep
        for data, scales, x in ((self._keys, self._key_scales, key), (self._values, self._value_scales, value)):
            if scales is None:
                data[:, :, where] = x[:, :, first:]
            else:
                data[:, :, where] = x.data[:, :, first:]
                scales[:, :, where] = x.scales[:, :, first:]
        self._length += T

    def __repr__(self):
        return (f"KVCache(batch={self.batch}, num_kv_heads={self.num_kv_heads}, head_dim={self.head_dim}, "
                f"capacity={self.capacity}, dtype={self.dtype.name}, window={self.window}, length={self._length})")


def _concat_tokens(a, b):
    """Concatenate two blocks of tokens (axis 2): arrays, or QuantizedTensors with the same block."""
    if isinstance(a, QuantizedTensor):
        return QuantizedTensor(np.concatenate([a.data, b.data], axis=2), np.concatenate([a.scales, b.scales], axis=2),
                               a.block)
    return np.concatenate([a, b], axis=2)
