"""KVCache: preallocated key/value storage for decoding one token at a time.

Layout: ``(batch, num_kv_heads, slots, head_dim)`` for keys and ``(..., value_dim)`` for values,
C-contiguous, allocated once. ``slots`` is ``capacity`` or, with ``window=W``, ``W`` (a ring
buffer: token at absolute position p lives in slot p mod W).

The attention kernels read the valid slots straight from this storage: no copy per step.
"""
import numbers

import numpy as np

from ._validate import check_finite_array

__all__ = ["KVCache"]


class KVCache:
    """Keys and values of the tokens seen so far, for ``batch`` sequences and ``num_kv_heads`` heads.

    Parameters
    ----------
    batch, num_kv_heads, head_dim : int
    capacity : int
        Most tokens held. Without a window, appending past it raises ``ValueError`` (nothing is
        written, nothing lost). With a window it is the longest sequence accepted overall (use a
        large number for unbounded streaming); storage is ``window`` slots.
    dtype : float32 or float64
    window : int, optional
        Keep only the last ``window`` tokens (sliding-window models): a ring buffer of ``window``
        slots.
    value_dim : int, optional
        Value head size when it differs from ``head_dim``.
    """

    def __init__(self, batch, num_kv_heads, head_dim, capacity, dtype=np.float32, window=None, value_dim=None):
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
        if dtype not in (np.dtype(np.float32), np.dtype(np.float64)):
            raise TypeError(f"dtype must be float32 or float64, got {dtype}")
        self.batch, self.num_kv_heads, self.head_dim, self.value_dim = int(batch), int(num_kv_heads), int(head_dim), int(value_dim)
        self.capacity = int(capacity)
        self.window = None if window is None else int(window)
        self.dtype = dtype
        slots = self.capacity if self.window is None else min(self.window, self.capacity)
        self._keys = np.zeros((self.batch, self.num_kv_heads, slots, self.head_dim), dtype)
        self._values = np.zeros((self.batch, self.num_kv_heads, slots, self.value_dim), dtype)
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
        return self._keys.nbytes + self._values.nbytes

    def reset(self):
        """Forget every token (storage is kept)."""
        self._length = 0

    # -- views ------------------------------------------------------------------------------------
    @property
    def keys(self):
        """Read-only view (batch, H_kv, n_valid, head_dim) of the stored keys, in storage order.

        Without a window (or before the ring wraps) storage order is position order.
        """
        view = self._keys[:, :, : self.n_valid]
        view.flags.writeable = False
        return view

    @property
    def values(self):
        view = self._values[:, :, : self.n_valid]
        view.flags.writeable = False
        return view

    def ordered(self):
        """(keys, values) in position order: views when possible, a copy once a ring has wrapped."""
        if not self.wrapped:
            return self.keys, self.values
        start = self._length % self.slots
        order = np.r_[start:self.slots, 0:start]
        return self._keys[:, :, order], self._values[:, :, order]

    def positions(self):
        """Absolute position of the token in each valid slot, shape (n_valid,)."""
        n = self.n_valid
        if not self.wrapped:
            return np.arange(n)
        slots = np.arange(n)
        start = self._length - self.slots       # position held by slot start % slots
        return start + (slots - start) % self.slots

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
        slots = self.slots
        if self.window is None or self._length + T <= slots:
            self._keys[:, :, self._length:self._length + T] = key
            self._values[:, :, self._length:self._length + T] = value
        else:
            keep = min(T, slots)                  # only the last `slots` new tokens can survive
            first = self._length + T - keep       # position of the first token kept
            idx = (first + np.arange(keep)) % slots
            self._keys[:, :, idx] = key[:, :, T - keep:]
            self._values[:, :, idx] = value[:, :, T - keep:]
        self._length += T

    def __repr__(self):
        return (f"KVCache(batch={self.batch}, num_kv_heads={self.num_kv_heads}, head_dim={self.head_dim}, "
                f"capacity={self.capacity}, dtype={self.dtype.name}, window={self.window}, length={self._length})")
