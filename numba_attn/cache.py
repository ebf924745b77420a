"""KVCache: preallocated key/value storage for decoding one token at a time.

Layout: ``(batch, num_kv_heads, slots, head_dim)`` for keys and ``(..., value_dim)`` for values,
C-contiguous, allocated once. ``slots`` is ``capacity`` or, with ``window=W``, ``W`` (a ring
buffer: token at absolute position p lives in slot p mod W). With ``sink_tokens=n`` too (StreamingLLM)
it is ``n + W``: slots 0 … n-1 keep the first n tokens forever, and position p ≥ n lives in ring slot
``n + (p - n) mod W``.

The attention kernels read the valid slots straight from this storage: no copy per step.
"""

import math
import numbers
import weakref

import numpy as np

from . import config
from ._validate import FLOAT16_MAX, check_finite_array, check_sinks, check_slopes, check_softcap, per_head_in
from .kernels.cache_append import append_rows, scan_rows
from .kernels.finite import max_abs
from .kernels.hadamard import hadamard_rows, hadamard_rows_max
from .quant import DEFAULT_BLOCK, QuantizedTensor, _check_block, quantize
from .rotation import hadamard_block

__all__ = ["KVCache"]

_DTYPES = (np.dtype(np.float32), np.dtype(np.float64), np.dtype(np.float16), np.dtype(np.int8))
_QUERY_DTYPES = (np.dtype(np.float16), np.dtype(np.float32), np.dtype(np.float64))
_NO_SCALES = np.broadcast_to(np.zeros((1, 1, 0), np.float32), (1, 1, 0))
#: the scales argument of the append kernels for a float store (never read)
_NO_WRITE_SCALES = np.zeros((1, 1, 1, 1), np.float32)
#: every cache's key/value storage by id, to recognise views of it (``is_kv_cache_view``)
_STORAGE = weakref.WeakValueDictionary()
#: the key/value storage of caches that rotate them, and the queries ``rotate_query`` made
_ROTATED = weakref.WeakValueDictionary()
_ROTATED_QUERIES = weakref.WeakValueDictionary()


#: appends of at most this many rows (batch · kv heads · tokens) take the serial kernels
APPEND_SERIAL_ROWS = 1024
#: appends of at most this many tokens (decode steps, a few drafted tokens) remember their validated
#: dtypes and shapes for ``KVCache._append_lean``
LEAN_APPEND_TOKENS = 8
_FLOAT32_MAX = float(np.finfo(np.float32).max)


def _range_message(name, fmt):
    if fmt == "int4":
        return f"{name} holds values beyond float16's range (|x| > 65504): int4 steps and minimums are float16"
    if fmt == np.float16:
        return (
            f"{name} holds values beyond float16's range (|x| > 65504): a float16 cache would store inf; "
            "use a float32 cache"
        )
    return f"{name} holds values beyond float32's range: int8 scales are float32"


def storage_format(value, name):
    """A cache storage format from what a user passed: an ``np.dtype`` (float32, float64, float16,
    int8) or the string "int4" (numpy has no 4-bit dtype; ``np.dtype("int4")`` would be int32)."""
    if isinstance(value, str) and value.lower() in ("int4", "q4"):
        return "int4"
    try:
        fmt = np.dtype(value)
    except TypeError:
        fmt = None
    if fmt is None or fmt not in _DTYPES:  # (None == np.dtype(float64) in numpy: test for None first)
        raise TypeError(f'{name} must be float32, float64, float16, int8 or "int4", got {value!r}')
    return fmt


def _same_format(a, b):
    return (a == "int4") == (b == "int4") and (a == "int4" or a == b)


def _rotation(rotate, key_fmt, value_fmt, head_dim, value_dim):
    """(rotate keys, rotate values) from ``rotate`` (None: keys stored as int8 or int4, values stored as
    int4, each when its head dim is even)."""
    if rotate is None:
        keys = (key_fmt == "int4" or key_fmt == np.int8) and head_dim % 2 == 0
        return keys, value_fmt == "int4" and value_dim % 2 == 0
    if isinstance(rotate, (bool, np.bool_)):
        keys, values = bool(rotate), False
    elif isinstance(rotate, str) and rotate in ("keys", "values", "both"):
        keys, values = rotate != "values", rotate != "keys"
    else:
        raise ValueError(f'rotate must be None, False, True, "keys", "values" or "both", got {rotate!r}')
    for name, dim, wanted in (("head_dim", head_dim, keys), ("value_dim", value_dim, values)):
        if wanted and dim % 2:
            raise ValueError(f"rotate={rotate!r}: a Hadamard rotation needs an even {name}, got {dim}")
    return keys, values


def _rotated(x, block, wide=False):
    """H·x along the last axis (block-diagonal, ``block`` wide), a new C-contiguous float32 array
    (float64 for float64 x, or with ``wide``: a float64 cache's arithmetic)."""
    out = np.empty(x.shape, np.float64 if wide or x.dtype == np.float64 else np.float32)
    if out.size:
        rows = np.ascontiguousarray(x).reshape(-1, x.shape[-1])
        hadamard_rows(rows.view(np.uint16) if rows.dtype == np.float16 else rows, block, out.reshape(rows.shape))
    return out


def _rotated_and_max(x, block):
    """(``_rotated(x, block)``, max |x|: inf if x holds NaN or ±inf) in one kernel call."""
    out = np.empty(x.shape, np.float64 if x.dtype == np.float64 else np.float32)
    if not out.size:
        return out, 0.0
    rows = np.ascontiguousarray(x).reshape(-1, x.shape[-1])
    top = hadamard_rows_max(rows.view(np.uint16) if rows.dtype == np.float16 else rows, block, out.reshape(rows.shape))
    return out, top


def is_rotated_view(x):
    """True if ``x`` (an array or a QuantizedTensor) is a view of keys or values a KVCache stores rotated."""
    if not _ROTATED:
        return False
    x = x.data if isinstance(x, QuantizedTensor) else x
    while isinstance(x, np.ndarray):
        if _ROTATED.get(id(x)) is x:
            return True
        x = x.base
    return False


def is_rotated_query(x):
    """True if ``x`` came from some cache's ``rotate_query``."""
    return isinstance(x, np.ndarray) and _ROTATED_QUERIES.get(id(x)) is x


_FLOAT16 = np.dtype(np.float16)


def _kernel_rows(x):
    """x as the append kernels read it: C-contiguous, float16 as its uint16 bits."""
    if x.dtype == _FLOAT16:
        return np.ascontiguousarray(x).view(np.uint16)
    return x if x.flags.c_contiguous else np.ascontiguousarray(x)


def _append_limit(fmt, input_dtype):
    """The largest |x| a store of ``fmt`` takes from ``input_dtype`` (``scan_rows``' limit): float16's max for
    float16 and 4-bit stores (unless x is float16 already), float32's for int8 from float64, else none."""
    if (fmt == np.float16 or fmt == "int4") and input_dtype != np.float16:
        return FLOAT16_MAX
    if fmt == np.int8 and input_dtype == np.float64:
        return _FLOAT32_MAX
    return np.inf


def _is_float_store(fmt):
    """float32/float64 stores can hold NaN/inf (``check_finite=False`` lets them in); the others cannot."""
    return fmt != "int4" and fmt in (np.dtype(np.float32), np.dtype(np.float64))


def _format_name(fmt):
    return fmt if fmt == "int4" else fmt.name


def _allocate(fmt, prefix, dim, block, name):
    """(data, scales, block) of one tensor's storage: float (scales and block None), int8 (float32
    scales per block) or int4 (two codes per byte, float16 (step, min) per block)."""
    if fmt == "int4":
        try:
            blk = _check_block(dim if block is None else block, dim, bits=4)
        except ValueError as error:
            raise ValueError(f'"int4" {name}s of {dim} entries: {error}') from None
        return np.zeros(prefix + (dim // 2,), np.uint8), np.zeros(prefix + (dim // blk, 2), np.float16), blk
    if fmt == np.int8:
        blk = dim if block is None else _check_block(block, dim)
        return np.zeros(prefix + (dim,), np.int8), np.zeros(prefix + (-(-dim // blk),), np.float32), blk
    return np.zeros(prefix + (dim,), fmt), None, None


def is_kv_cache_view(x):
    """True if ``x`` (an array or a QuantizedTensor) is a view of some KVCache's storage."""
    x = getattr(x, "data", x) if isinstance(x, QuantizedTensor) else x
    while isinstance(x, np.ndarray):
        if _STORAGE.get(id(x)) is x:
            return True
        x = x.base
    return False


class KVCache:
    """Keys and values of the tokens seen so far, for ``batch`` sequences and ``num_kv_heads`` heads.

    Parameters
    ----------
    batch, num_kv_heads, head_dim : int
    capacity : int
        Most tokens held. Without a window, appending past it raises ``ValueError`` (nothing is
        written, nothing lost). With a window it is the longest sequence accepted overall (use a
        large number for unbounded streaming); storage is ``window`` slots.
    dtype : float32, float64, float16, int8 or "int4"
        Storage of keys and values (``key_dtype``/``value_dtype`` set them apart). float16 halves the
        memory of float32 (values beyond ±65504 are refused); int8 quantises each token's key and
        value per block of ``block`` entries on append (about 0.28× float32 with the default block of
        32); "int4" (numpy has no 4-bit type: the string names the packed format) stores 16 levels
        per entry, two per byte, with a float16 step and minimum per block (0.156× float32 at block
        32; values beyond ±65504 are refused). The kernels decode straight from the storage.
    key_dtype, value_dtype : optional
        The keys' and the values' storage when they differ (each one of ``dtype``'s choices; default
        ``dtype``). Keys are the more sensitive (an error in a score moves every weight of the row):
        int8 keys with "int4" values is the small format that keeps quality (see the README's table).
    window : int, optional
        Keep only the last ``window`` tokens (sliding-window models): a ring buffer of ``window``
        slots.
    sink_tokens : int
        With ``window``: also keep the first ``sink_tokens`` tokens forever (StreamingLLM's attention
        sinks; default 0), for endless generation in fixed memory: storage is ``sink_tokens + window``
        slots. A query at position p then sees the sink tokens (positions < ``sink_tokens``) and the
        keys p - window < j <= p. Positions stay the tokens' original (absolute) positions: keys are
        cached after RoPE, so ``rotary`` gets absolute positions and a sink key keeps the rotation of
        its own position (its distance to a query grows, as in a full cache, and ALiBi counts the same
        absolute distance). StreamingLLM's alternative, positions inside the cache, would need
        un-rotated keys and re-rotating all ``sink_tokens + window`` of them every step (O(W·D) per
        token); absolute positions give exactly the full cache's scores on the keys kept, but leave the
        model's trained context once the sequence outgrows it.
    rotate : None, False, True, "keys", "values" or "both"
        Hadamard rotation (``numba_attn.rotation``): keys (True/"keys"), values ("values") or both
        are multiplied by the normalised Walsh–Hadamard matrix H along the head dim as they are
        appended, which spreads a few large channels over all of them before quantising; ``attend``
        rotates the query the same way (scores are unchanged in exact arithmetic: Hq·Hk = q·k) and,
        for rotated values, rotates the output back (softmax·(V Hᵀ) = (softmax·V) Hᵀ). None (the
        default) rotates keys stored as int8 or "int4" and values stored as "int4", nothing else
        (measured on SmolLM2: rotation cut the KL divergence of int8 keys by ~30 % and of 4-bit
        values by ~half; float storage gains nothing; see the README's table). Head dims that are
        not powers of two use a block-diagonal H (``rotation.hadamard_block``); odd ones cannot be
        rotated (refused if asked for). The stored ``keys``/``values`` (and ``ordered()``) hold the
        rotated vectors: give ``scaled_dot_product_attention`` ``cache.rotate_query(query)`` with them
        (it refuses an unrotated query against rotated keys) and ``cache.unrotate_output(out)`` for
        rotated values; ``attend`` and ``MultiHeadAttention`` do both.
    value_dim : int, optional
        Value head size when it differs from ``head_dim``.
    block : int or None
        int8 and "int4": entries per scale (default 32, ggml's q8_0/q4_1; capped at the head dim);
        None for one scale per token and head. "int4" needs an even block dividing the head dim.

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

    def __init__(
        self,
        batch,
        num_kv_heads,
        head_dim,
        capacity,
        dtype=np.float32,
        window=None,
        value_dim=None,
        block=DEFAULT_BLOCK,
        sink_tokens=0,
        key_dtype=None,
        value_dtype=None,
        rotate=None,
    ):
        for name, val in (
            ("batch", batch),
            ("num_kv_heads", num_kv_heads),
            ("head_dim", head_dim),
            ("capacity", capacity),
        ):
            if isinstance(val, bool) or not isinstance(val, numbers.Integral) or val <= 0:
                raise ValueError(f"{name} must be a positive int, got {val!r}")
        value_dim = head_dim if value_dim is None else value_dim
        if isinstance(value_dim, bool) or not isinstance(value_dim, numbers.Integral) or value_dim <= 0:
            raise ValueError(f"value_dim must be a positive int, got {value_dim!r}")
        if window is not None:
            if isinstance(window, bool) or not isinstance(window, numbers.Integral) or window <= 0:
                raise ValueError(f"window must be a positive int or None, got {window!r}")
        if (
            isinstance(sink_tokens, (bool, np.bool_))
            or not isinstance(sink_tokens, numbers.Integral)
            or sink_tokens < 0
        ):
            raise ValueError(f"sink_tokens must be a non-negative int, got {sink_tokens!r}")
        if sink_tokens and window is None:
            raise ValueError(
                f"sink_tokens={sink_tokens} needs a window: the sink tokens are kept besides the last `window` tokens"
            )
        dtype = storage_format(dtype, "dtype")
        key_fmt = dtype if key_dtype is None else storage_format(key_dtype, "key_dtype")
        value_fmt = dtype if value_dtype is None else storage_format(value_dtype, "value_dtype")
        self.batch, self.num_kv_heads, self.head_dim, self.value_dim = (
            int(batch),
            int(num_kv_heads),
            int(head_dim),
            int(value_dim),
        )
        self.capacity = int(capacity)
        self.window = None if window is None else int(window)
        self.sink_tokens = int(sink_tokens)
        self.key_dtype, self.value_dtype = key_fmt, value_fmt
        slots = self.capacity if self.window is None else min(self.sink_tokens + self.window, self.capacity)
        prefix = (self.batch, self.num_kv_heads, slots)
        self._keys, self._key_scales, self.block = _allocate(key_fmt, prefix, self.head_dim, block, "key")
        self._values, self._value_scales, self._value_block = _allocate(
            value_fmt, prefix, self.value_dim, block, "value"
        )
        self.rotate_keys, self.rotate_values = _rotation(rotate, key_fmt, value_fmt, self.head_dim, self.value_dim)
        self._rotating = self.rotate_keys or self.rotate_values
        self._key_rotation = hadamard_block(self.head_dim) if self.rotate_keys else 0
        self._value_rotation = hadamard_block(self.value_dim) if self.rotate_values else 0
        self._length = 0
        self._operands = None  # kernel views of the storage, made on first use
        self._writing = None  # the append kernels' views of the storage (``_write_operands``)
        self._serial_plans = {}  # (key dtype, value dtype, check_finite) → ``_serial_plan``
        self._lean_appends = {}  # (key dtype and shape, value dtype and shape, check_finite) → its ``_serial_plan``
        self._float_stores = (_is_float_store(key_fmt), _is_float_store(value_fmt))
        self._attend_fixed = {}  # per (query dtype, head count): what attend's kernel calls share (api._cache_fixed)
        self._lean = {}  # per (query dtype, query shape): api.lean_plan, or False (attend(query) alone)
        _STORAGE[id(self._keys)] = self._keys
        _STORAGE[id(self._values)] = self._values
        for data, rotated in ((self._keys, self.rotate_keys), (self._values, self.rotate_values)):
            if rotated:
                _ROTATED[id(data)] = data

    @property
    def rotate(self):
        """What is stored rotated: "keys", "values", "both" or False."""
        return {(True, True): "both", (True, False): "keys", (False, True): "values"}.get(
            (self.rotate_keys, self.rotate_values), False
        )

    def rotate_query(self, query):
        """``query`` (..., head_dim) as this cache's keys are stored: H·query along the last axis for
        a cache with rotated keys (a new float32 array, float64 for float64), a copy for one that
        rotates only its values, ``query`` itself for one that rotates nothing. What
        ``scaled_dot_product_attention`` needs beside ``keys``/``values`` of a rotating cache (it
        refuses a query that did not come from here), with ``unrotate_output`` on its result."""
        if not (self.rotate_keys or self.rotate_values):
            return query
        q = query if isinstance(query, np.ndarray) else np.asarray(query)
        if q.dtype.kind != "f" or q.ndim < 1 or q.shape[-1] != self.head_dim:
            raise ValueError(f"query must be a float array (..., head_dim = {self.head_dim}), got {q.dtype} {q.shape}")
        if self.rotate_keys:
            rotated = self._rotated_query(q)
        else:
            rotated = np.array(q, np.float64 if q.dtype == np.float64 else np.float32)
        _ROTATED_QUERIES[id(rotated)] = rotated
        return rotated

    def _rotated_query(self, q):
        """H·q for a cache with rotated keys, in its arithmetic (float64 when either store is float64,
        else float32 unless q is float64): a new C-contiguous array, not registered."""
        return _rotated(q, self._key_rotation, np.float64 in (self._keys.dtype, self._values.dtype))

    def unrotate_output(self, out):
        """An attention output computed over this cache's ``values`` (..., value_dim) back in the
        values' own basis (H·out: H is its own inverse) for a cache with rotated values; else ``out``."""
        if not self.rotate_values:
            return out
        return _rotated(np.asarray(out), self._value_rotation)

    @property
    def dtype(self):
        """The storage format of keys and values when they share one (an np.dtype, or "int4"), else
        None (see ``key_dtype`` and ``value_dtype``)."""
        return self.key_dtype if _same_format(self.key_dtype, self.value_dtype) else None

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
        """True when a ring buffer has overwritten its oldest slots (storage order ≠ position order;
        with ``sink_tokens``, the ring's slots after the sink slots)."""
        return self._length > self.slots

    @property
    def nbytes(self):
        """Bytes of storage (data and, for int8 and int4, scales)."""
        scales = sum(x.nbytes for x in (self._key_scales, self._value_scales) if x is not None)
        return self._keys.nbytes + self._values.nbytes + scales

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
        block = self.block if data is self._keys else self._value_block
        return QuantizedTensor._trusted(d, sc, block, 4 if data.dtype == np.uint8 else 8)

    @property
    def keys(self):
        """Read-only view (batch, H_kv, n_valid, head_dim) of the stored keys, in storage order
        (a ``QuantizedTensor`` for int8 and int4). Without a window, or before the ring wraps, storage order
        is position order."""
        return self._view(self._keys, self._key_scales, slice(0, self.n_valid))

    @property
    def values(self):
        return self._view(self._values, self._value_scales, slice(0, self.n_valid))

    def ordered(self):
        """(keys, values) in position order: views when possible, a copy once a ring has wrapped
        (with ``sink_tokens``: the sink tokens first, then the last ``window`` tokens; their
        positions are ``ordered_positions()``)."""
        if not self.wrapped:
            return self.keys, self.values
        n, ring = self.sink_tokens, self.slots - self.sink_tokens
        start = n + (self._length - n) % ring
        order = np.r_[0:n, start : self.slots, n:start]
        return self._mark_rotated(
            self._view(self._keys, self._key_scales, order), self._view(self._values, self._value_scales, order)
        )

    def _mark_rotated(self, keys, values):
        """(keys, values), copies of rotated storage registered as rotated (for sdpa's guard, which
        recognises views of the storage by their base but cannot see where a copy came from)."""
        for x, rotated in ((keys, self.rotate_keys), (values, self.rotate_values)):
            if rotated:
                data = x.data if isinstance(x, QuantizedTensor) else x
                _ROTATED[id(data)] = data
        return keys, values

    def ordered_positions(self, appended=0):
        """Absolute positions of the tokens ``ordered()`` returns, shape (n_valid,), increasing: now,
        or once ``appended`` more tokens have been appended."""
        length = self._length + appended
        if length <= self.slots:
            return np.arange(length)
        n = self.sink_tokens
        return np.r_[0:n, length - (self.slots - n) : length]

    def attn_mask(self, query_len=1, window=None):
        """Boolean (query_len, n_valid) mask for ``scaled_dot_product_attention`` over ``ordered()``
        (True = attend, ``is_causal=False``): query i is the token at position
        ``length - query_len + i`` and sees the sink tokens plus the keys inside its own window
        (the cache's, or ``window`` when smaller), causally. Needed with ``sink_tokens`` (the kernels' own
        ``window`` rule would hide the sinks); without them it equals ``is_causal="lower_right"``
        with the window. Keys the ring has already dropped are not there: a chunk of several new
        tokens needs the keys before appending (``ordered_with``)."""
        if isinstance(query_len, (bool, np.bool_)) or not isinstance(query_len, numbers.Integral) or query_len < 0:
            raise ValueError(f"query_len must be a non-negative int, got {query_len!r}")
        if window is not None and (
            isinstance(window, (bool, np.bool_)) or not isinstance(window, numbers.Integral) or window <= 0
        ):
            raise ValueError(f"window must be a positive int or None, got {window!r}")
        w = self.window if window is None else window if self.window is None else min(window, self.window)
        q_pos = self._length - query_len + np.arange(query_len)
        return streaming_mask(q_pos, self.ordered_positions(), self.sink_tokens, w)

    def ordered_with(self, key, value):
        """(keys, values) in position order followed by the new ``key``/``value`` (not stored), in
        the cache's storage format (rotated as stored): what a windowed chunk of several new tokens
        attends over."""
        old_k, old_v = self.ordered()
        if self.rotate_keys:
            key = _rotated(np.asarray(key), self._key_rotation)
        if self.rotate_values:
            value = _rotated(np.asarray(value), self._value_rotation)
        new_k, new_v = self._encode(key, "key"), self._encode(value, "value")
        return self._mark_rotated(_concat_tokens(old_k, new_k), _concat_tokens(old_v, new_v))

    def positions(self, appended=0):
        """Absolute position of the token in each valid slot (storage order, the order of ``keys``;
        the sink tokens first), shape (n_valid,): now, or once ``appended`` more tokens have been
        appended (what a caller needs before it appends)."""
        length = self._length + appended
        if length <= self.slots:
            return np.arange(length)
        n, ring = self.sink_tokens, self.slots - self.sink_tokens
        start = length - n - ring  # ring position (counted from the first non-sink token) in slot n + start % ring
        return np.r_[np.arange(n), n + start + (np.arange(ring) - start) % ring]

    def _encode(self, x, name):
        """x in the storage format of ``name`` ("key" or "value"): an array of its dtype, or a
        QuantizedTensor for int8 and int4."""
        fmt = self.key_dtype if name == "key" else self.value_dtype
        block = self.block if name == "key" else self._value_block
        if fmt == "int4" or fmt == np.int8:
            limit = FLOAT16_MAX if fmt == "int4" else _FLOAT32_MAX
            if x.dtype != np.float16 and x.size and np.abs(x).max() > limit:
                raise ValueError(_range_message(name, fmt))
            return quantize(x, block, bits=4 if fmt == "int4" else 8)
        if fmt == np.float16 and x.dtype != np.float16 and x.size and np.abs(x).max() > FLOAT16_MAX:
            raise ValueError(_range_message(name, fmt))
        return x.astype(fmt, copy=False)

    # -- attending --------------------------------------------------------------------------------
    def attend(
        self,
        query,
        *,
        scale=None,
        window=None,
        alibi_slopes=None,
        sinks=None,
        softcap=None,
        out=None,
        check_finite=True,
    ):
        """Attention of the newest ``L`` tokens' queries over everything cached: the decode fast path.

        ``query`` (batch, H, L, head_dim), H a multiple of ``num_kv_heads`` (grouped-query attention
        from the cache's heads; query head h reads key/value head h // (H / num_kv_heads)). Query i
        is the token at position ``length - L + i``: append the new tokens' keys and values first,
        then attend. Causal with bottom-right alignment by construction (the last query sees every
        cached key), windowed to the cache's ``window`` (and to ``window`` if given, the smaller of
        the two wins). ``scale``, ``alibi_slopes`` (H,), ``sinks`` (H,, learned sink logits) and
        ``softcap`` as in :func:`~numba_attn.scaled_dot_product_attention`. With ``sink_tokens`` each
        query also sees the sink tokens (``attn_mask``); ALiBi then counts absolute position distances.

        ``out``: a C-contiguous (batch, H, L, value_dim) array of the result's dtype to write into
        (no allocation). The result's dtype follows ``scaled_dot_product_attention``: float32 for a
        float32/float16/int8 cache and a float32 query, float16 for float16 query and cache, float64
        when the query or the cache is float64.

        What the cache already guarantees (shapes, dtypes, finite contents when they were appended
        with ``check_finite=True``) is not checked again: a call validates the query and the
        arguments, then runs one kernel on the cache's storage (no copy, except for a window whose
        ring has wrapped when L > 1 or with ALiBi: the keys are then put in position order; with
        ``sink_tokens``, anything but one query without ALiBi takes that path with a mask).
        Returns ``(batch, H, L, value_dim)``.
        """
        q = query if isinstance(query, np.ndarray) else np.asarray(query)
        plain = scale is None and window is None and alibi_slopes is None and sinks is None and softcap is None
        if plain and out is None:
            # a decode step with a query of a dtype and shape an earlier such call validated: the lean path
            plan = self._lean.get((q.dtype, q.shape))
            if plan:
                res = _api.attend_lean(self, q, plan, check_finite)
                if res is not None:
                    return res
        if q.dtype not in _QUERY_DTYPES:
            raise TypeError(f"query must be float16, float32 or float64, got dtype {q.dtype}")
        if (
            q.ndim != 4
            or q.shape[0] != self.batch
            or q.shape[1] == 0
            or q.shape[1] % self.num_kv_heads
            or q.shape[3] != self.head_dim
        ):
            raise ValueError(
                f"query must have shape (batch, H, L, head_dim) = ({self.batch}, H, L, {self.head_dim}) "
                f"with H a multiple of num_kv_heads = {self.num_kv_heads}, got {q.shape}"
            )
        L = q.shape[2]
        slots = self._keys.shape[2]
        n_valid = self._length if self._length < slots else slots
        if L > n_valid:
            raise ValueError(
                f"query holds {L} tokens but the cache holds {self.n_valid}: append the new tokens' "
                "keys and values first (query i is the token at position length - L + i)"
            )
        if window is not None:
            if isinstance(window, (bool, np.bool_)) or not isinstance(window, numbers.Integral) or window <= 0:
                raise ValueError(f"window must be a positive int or None, got {window!r}")
            window = int(window) if self.window is None else min(int(window), self.window)
        else:
            window = self.window
        # a ring that has dropped keys the chunk's first queries still see cannot answer exactly
        # (the dropped ones are positions sink_tokens … sink_tokens + dropped - 1)
        first_needed = 0 if window is None else max(0, self._length - L - window + 1)
        dropped = self._length - n_valid
        if dropped and max(first_needed, self.sink_tokens) < self.sink_tokens + dropped:
            raise ValueError(
                f"the cache's ring ({self.slots} slots) no longer holds the keys the first of these {L} "
                f"queries sees (window {window}): attend to a chunk this long before appending it "
                "(MultiHeadAttention does), or append and attend one token at a time"
            )
        softcap = 0.0 if softcap is None else check_softcap(softcap)
        # shapes and dtypes here; NaN/inf once, after the conversion to the arithmetic's dtype (attend_cache)
        slopes = None if alibi_slopes is None else check_slopes(alibi_slopes, q.shape[1], finite=False)
        sinks = None if sinks is None else check_sinks(sinks, q.shape[1], finite=False)
        user_out = result = None
        q_rotation = None
        rotated = self._rotating
        if rotated and q.dtype != np.float16 and self.rotate_keys:
            # the lean path (a decode step's): the result's dtype is the query's, the kernel writes into
            # ``out`` unless the values are rotated too (then rotated back in place, into ``out``). The
            # decode kernel rotates the query as it loads it (q_rotation); attend_cache's other paths
            # and the sink path below rotate it first. (A query attend_cache or the sink path hands to
            # sdpa, over views in position order, is registered there: sdpa's guard asks for it.)
            q_rotation = self._key_rotation
            if self.rotate_values:
                user_out, out = out, None
        elif rotated:  # float16 query (its result may be float16), or only the values rotated
            from ._validate import _dtypes
            from .api import check_attend_out

            result = _dtypes(q, self._keys, self._values, None)[1]
            check_attend_out(out, (q.shape[0], q.shape[1], L, self.value_dim), result)
            user_out, out = out, None
            q = self.rotate_query(q)
        if self.sink_tokens and not (L == 1 and slopes is None and window == self.window):
            # (made into a mask there: checked for NaN/inf, and for the arithmetic's range, first)
            arith = np.float64 if np.float64 in (q.dtype, self._keys.dtype, self._values.dtype) else np.float32
            slopes = None if slopes is None else per_head_in(slopes, "alibi_slopes", arith, finite=True)
            if q_rotation:
                q = self._rotated_query(q)
            if rotated:
                _ROTATED_QUERIES[id(q)] = q
            res = self._attend_streaming(q, scale, window, slopes, sinks, softcap, out, check_finite)
        else:
            # (a sink cache's newest query sees every key held: no window for the kernel, which would hide the sinks)
            window = None if self.sink_tokens else window
            res = _api.attend_cache(self, q, scale, window, slopes, sinks, softcap, out, check_finite, q_rotation)
            if plain and out is None and result is None and L <= config.DECODE_MAX_QUERY_ROWS:
                key = (q.dtype, q.shape)
                if key not in self._lean:  # later calls like this one take the lean path
                    self._lean[key] = _api.lean_plan(self, q, self._attend_fixed[(q.dtype, q.shape[1])]) or False
        if not rotated:
            return res
        if result is None:  # the lean path
            if not self.rotate_values:
                return res
            if user_out is not None:
                from .api import check_attend_out

                check_attend_out(user_out, res.shape, res.dtype)
            target = res if user_out is None else user_out
            rows = res.reshape(-1, self.value_dim)
            hadamard_rows(rows, self._value_rotation, target.reshape(rows.shape))
            return target
        return self._deliver(self.unrotate_output(res), result, user_out)

    def _deliver(self, res, result, out):
        """A rotated call's result in the dtype an unrotated call gives (``result``), into ``out`` if given."""
        from .api import _to_out_dtype, into_out

        return into_out(_to_out_dtype(res, result, self.value_dtype == np.float16), out)

    def _attend_streaming(self, q, scale, window, slopes, sinks, softcap, out, check_finite):
        """A sink cache's queries when they do not all see every held key (a chunk, a smaller
        window, ALiBi): the keys in position order with ``streaming_mask`` (ALiBi on absolute
        positions as an additive mask)."""
        from ._validate import _dtypes
        from .api import check_attend_out, into_out, scaled_dot_product_attention

        B, H, L, _ = q.shape
        dtype, result = _dtypes(q, self._keys, self._values, None)
        check_attend_out(out, (B, H, L, self.value_dim), result)
        keys, values = self.ordered()
        q_pos, k_pos = self._length - L + np.arange(L), self.ordered_positions()
        mask = streaming_mask(q_pos, k_pos, self.sink_tokens, window)
        if slopes is not None:
            mask = np.where(mask, alibi_bias(q_pos, k_pos, slopes, dtype), -np.inf).astype(dtype)
        res = scaled_dot_product_attention(
            q,
            keys,
            values,
            attn_mask=mask,
            scale=scale,
            enable_gqa=True,
            softcap=softcap or None,
            sinks=sinks,
            check_finite=check_finite,
        )
        return into_out(res, out)

    def _kernel_operands(self):
        """(keys, key scales, key block, values, value scales, value block) as the kernels take them:
        C-contiguous read-only 3-D views (batch·heads, slots, dim) of the whole storage (float16 as its
        bits; int4 scales as (step, min) float16 bit pairs, (batch·heads, slots, 2·blocks))."""
        if self._operands is None:

            def as3(x):
                v = x.reshape(self.batch * self.num_kv_heads, x.shape[2], -1)
                v = v.view(np.uint16) if v.dtype == np.float16 else v.view()
                v.flags.writeable = False
                return v

            parts = []
            for data, scales, block in (
                (self._keys, self._key_scales, self.block),
                (self._values, self._value_scales, self._value_block),
            ):
                parts += [as3(data), _NO_SCALES, 0] if scales is None else [as3(data), as3(scales), block]
            self._operands = tuple(parts)
        return self._operands

    # -- writing ----------------------------------------------------------------------------------
    def append(self, key, value, check_finite=True):
        """Store ``key`` (batch, H_kv, T, head_dim) and ``value`` (batch, H_kv, T, value_dim).

        Values are converted to the cache's formats. Raises ``ValueError`` before writing anything if
        the shapes are wrong, the inputs are not finite (float16, int8 and int4 stores refuse NaN/inf
        whatever ``check_finite`` says: they have no code for them), a float32/float64 array holds
        values beyond a float16 or int4 store's range (±65504; float32's for int8), or (without a
        window) the cache would overflow
        ``capacity``. A few tokens (B·H_kv·T ≤ ``APPEND_SERIAL_ROWS``, a decode step) take one
        serial kernel per tensor that checks, converts and writes (``kernels/cache_append.py``).
        """
        if isinstance(key, np.ndarray) and isinstance(value, np.ndarray):
            # a decode step's append with arrays of dtypes and shapes an earlier append validated: the lean path
            plan = self._lean_appends.get((key.dtype, key.shape, value.dtype, value.shape, check_finite))
            if plan is not None and self._append_lean(key, value, plan):
                return
        key = key if isinstance(key, np.ndarray) else np.asarray(key)
        value = value if isinstance(value, np.ndarray) else np.asarray(value)
        for name, x, dim in (("key", key, self.head_dim), ("value", value, self.value_dim)):
            if x.dtype.kind != "f":
                raise TypeError(f"{name} must be a floating array, got dtype {x.dtype}")
            if x.ndim != 4 or x.shape[0] != self.batch or x.shape[1] != self.num_kv_heads or x.shape[3] != dim:
                raise ValueError(
                    f"{name} must have shape (batch, num_kv_heads, T, {dim}) = "
                    f"({self.batch}, {self.num_kv_heads}, T, {dim}), got {x.shape}"
                )
        if key.shape[2] != value.shape[2]:
            raise ValueError(
                f"key and value must hold the same number of tokens, got {key.shape[2]} and {value.shape[2]}"
            )
        T = key.shape[2]
        if self._length + T > self.capacity:
            raise ValueError(
                f"KVCache is full: {self._length} tokens held + {T} new > capacity {self.capacity}"
                + ("" if self.window is not None else "; create it with a larger capacity or a window")
            )
        # (float64 into float16 goes through numpy: the kernels would round twice, via float32)
        serial = (
            self.batch * self.num_kv_heads * T <= APPEND_SERIAL_ROWS
            and key.dtype in _QUERY_DTYPES
            and value.dtype in _QUERY_DTYPES
            and not (self.key_dtype == np.float16 and key.dtype == np.float64)
            and not (self.value_dtype == np.float16 and value.dtype == np.float64)
        )
        writes = self._writes(T) if serial else None
        if serial and (not self._rotating or not writes[0]):
            # (into a rotating cache: rotated, checked and written in the one kernel call)
            self._append_serial(key, value, writes, check_finite, rotate=self._rotating)
            if T <= LEAN_APPEND_TOKENS:  # later appends like this one take the lean path
                rotate = self._rotating
                plan = self._serial_plans[(key.dtype, value.dtype, check_finite, rotate)]
                self._lean_appends[(key.dtype, key.shape, value.dtype, value.shape, check_finite)] = plan
        else:
            if self.rotate_keys:  # stored rotated (a copy: the caller's arrays are never modified)
                key = self._rotate_in(key, "key", self._key_rotation, self.key_dtype, check_finite)
            if self.rotate_values:
                value = self._rotate_in(value, "value", self._value_rotation, self.value_dtype, check_finite)
            if serial:
                self._append_serial(key, value, writes, check_finite)
            else:
                self._append_numpy(key, value, T, check_finite)
        self._length += T

    def _append_lean(self, key, value, plan):
        """``append`` for arrays of dtypes and shapes an earlier serial append validated (``plan``: its
        ``_serial_plan``): the capacity, where the tokens go and the one kernel call that checks, rotates
        (where the cache does), converts and writes them (``_append_serial`` without its plan lookup and
        sink wrap). False, having changed nothing, where the general path must answer: a full cache, a
        sink cache's first wrap."""
        T = key.shape[2]
        if self._length + T > self.capacity:
            return False
        sink, first, slot0 = self._writes(T)
        if sink:
            return False
        self._write_checked(plan, (_kernel_rows(key), _kernel_rows(value)), slot0, first, (key.dtype, value.dtype))
        self._length += T
        return True

    def _name(self, tensor):
        """How messages name ``tensor`` ("key"/"value"): said to be rotated when the cache rotates it
        (a range refusal is then about H·x, not about what the caller passed)."""
        if (self.rotate_keys if tensor == "key" else self.rotate_values) is False:
            return tensor
        return (
            f"{tensor}, Hadamard-rotated as this cache stores it (rotate={self.rotate!r}; "
            "rotate=False stores it as given),"
        )

    def _rotate_in(self, x, name, block, fmt, check_finite):
        """H·x for storing. NaN/inf in x are refused here as the caller's (the rotation would spread them
        over the block; float32/float64 stores with check_finite=False take them), and a finite x whose
        rotation overflows (|x| near float32's max) as the rotation's."""
        rotated, top = _rotated_and_max(x, block)  # a new array: nothing is stored before the checks
        finite = math.isfinite(top)
        if not finite and (check_finite or not _is_float_store(fmt)):
            raise ValueError(
                f"{name} contains NaN or inf; pass finite values"
                + (" (or check_finite=False to skip the check)" if _is_float_store(fmt) else "")
            )
        # |H·x| ≤ √block · max|x| (H orthonormal): only a top near the type's max needs the second scan
        limit = _FLOAT32_MAX if rotated.dtype == np.float32 else np.finfo(np.float64).max
        near = finite and x.size and top * math.sqrt(block) * 1.001 >= limit
        if near and not np.isfinite(max_abs(rotated)):
            raise ValueError(self._overflow_message(name, rotated.dtype))
        return rotated

    def _overflow_message(self, name, dtype):
        """Why a finite ``name`` is refused: its Hadamard rotation overflows ``dtype``."""
        return (
            f"{name} overflows {np.dtype(dtype).name} in the Hadamard rotation this cache applies "
            f"(rotate={self.rotate!r}): scale it down, or use rotate=False"
        )

    def _writes(self, T):
        """Where T new tokens go: (sink, first, slot0). New tokens 0 … sink-1 fill the sink slots
        ``length`` … (sink tokens, kept forever); tokens t ≥ first go to slots ``fold(slot0 + t - first)``
        (``fold`` wraps past the last slot back to ``sink_tokens``, the ring's first slot); the ones
        in between would be overwritten within this append and are skipped."""
        slots, n, length = self._keys.shape[2], self.sink_tokens, self._length
        if self.window is None or length + T <= slots:
            return 0, 0, length
        # (comparisons, not max/min: a decode step's append asks on every token, ~0.2 µs a builtin call)
        sink = n - length if 0 < n - length < T else (T if n - length >= T else 0)
        ring = slots - n
        first = T - ring if T - ring > sink else sink  # only the last `ring` new tokens can survive in the ring
        return sink, first, n + (length + first - n) % ring

    def _append_serial(self, key, value, writes, check_finite, rotate=False):
        """``append_rows`` on key and value to ``writes`` (``_writes``); ``rotate``: the raw inputs,
        rotated in the kernel as the cache stores them (else rows already rotated, or a cache that
        rotates nothing)."""
        # the scan limits, NaN/inf flags and rotations for these input dtypes, worked out once (``_serial_plan``)
        plan = self._serial_plans.get((key.dtype, value.dtype, check_finite, rotate))
        if plan is None:
            plan = self._serial_plans[(key.dtype, value.dtype, check_finite, rotate)] = self._serial_plan(
                key.dtype, value.dtype, check_finite, rotate
            )
        rows = (_kernel_rows(key), _kernel_rows(value))
        sink, first, slot0 = writes
        if sink:  # a sink cache's first wrap (never rotated here): checked first, then written in two parts
            self._refuse(plan, [scan_rows(r, plan[i]) if r.size else 0 for r, i in zip(rows, (0, 3))])
            # the sink slots take new tokens 0 … sink-1 (once per cache: a copy of those rows is fine)
            self._write_rows(plan, [np.ascontiguousarray(r[:, :, :sink]) for r in rows], self._length, 0)
        # every other append is checked and written in this one call
        self._write_checked(plan, rows, slot0, first, (key.dtype, value.dtype))

    def _write_checked(self, plan, rows, slot0, t0, dtypes):
        """``_write_rows``, then the refusal of the first tensor whose scan refused (nothing written then)."""
        codes = self._write_rows(plan, rows, slot0, t0)
        if codes:
            self._refuse(plan, divmod(codes, 4), dtypes)

    def _write_rows(self, plan, rows, slot0, t0):
        """``append_rows`` on (key rows, value rows) with ``plan`` (``_serial_plan``): token t ≥ t0 to slot
        slot0 + t − t0 (folded onto the ring) unless one is refused; 4·key_code + value_code."""
        key_limit, key_ok, key_rotation, value_limit, value_ok, value_rotation = plan
        key_data, key_scales, key_block, value_data, value_scales, value_block = self._write_operands()
        return append_rows(
            rows[0], key_limit, key_ok, key_rotation, key_data, key_scales, key_block,
            rows[1], value_limit, value_ok, value_rotation, value_data, value_scales, value_block,
            slot0, t0, self.sink_tokens,
        )  # fmt: skip

    def _serial_plan(self, key_dtype, value_dtype, check_finite, rotate):
        """(limit, NaN/inf allowed, rotation) of the key, then of the value, for ``_append_serial`` on
        these input dtypes. No code for NaN/inf in a float16/int8/int4 store: refused whatever
        ``check_finite`` says. ``rotate``: the kernel rotates what the cache stores rotated (block,
        else None) and the limit applies to H·x, float32 (float64 for float64 input)."""
        plan = ()
        for fmt, dtype, float_store, rotated, block in (
            (self.key_dtype, key_dtype, self._float_stores[0], self.rotate_keys, self._key_rotation),
            (self.value_dtype, value_dtype, self._float_stores[1], self.rotate_values, self._value_rotation),
        ):
            rotation = block if rotate and rotated else None
            if rotation is not None:
                dtype = np.dtype(np.float64 if dtype == np.float64 else np.float32)
            plan += (_append_limit(fmt, dtype), float_store and not check_finite, rotation)
        return plan

    def _refuse(self, plan, codes, dtypes=None):
        """Raise for the first refused tensor (key, then value) by its scan code (``append_rows``), with
        ``plan``'s NaN/inf flags; ``dtypes``: the inputs' (code 3, an overflowing rotation, names the
        rotation's dtype: float64 for float64 input, else float32)."""
        for tensor, fmt, nan_ok, code, dtype in (
            ("key", self.key_dtype, plan[1], codes[0], dtypes and dtypes[0]),
            ("value", self.value_dtype, plan[4], codes[1], dtypes and dtypes[1]),
        ):
            if code == 1 and not nan_ok:
                no_code = not _is_float_store(fmt)
                raise ValueError(
                    f"{tensor} contains NaN or inf; pass finite values"
                    + ("" if no_code else " (or check_finite=False to skip the check)")
                )
            if code == 2:
                raise ValueError(_range_message(self._name(tensor), fmt))
            if code == 3:  # a finite input whose rotation is not (rotated in the kernel)
                raise ValueError(self._overflow_message(tensor, np.float64 if dtype == np.float64 else np.float32))

    def _write_operands(self):
        """(data, scales, block) of the keys, then of the values, as the append kernels take them: a
        float16 store as its uint16 bits, a 4-bit store's (step, min) as float16 bits (B, H, slots,
        2·blocks), a float store with placeholder scales; made once."""
        if self._writing is None:
            parts = []
            for data, scales, block in (
                (self._keys, self._key_scales, self.block),
                (self._values, self._value_scales, self._value_block),
            ):
                if data.dtype == np.uint8:
                    scales = scales.view(np.uint16).reshape(scales.shape[:3] + (-1,))
                elif data.dtype == np.float16:
                    data = data.view(np.uint16)
                parts += [data, _NO_WRITE_SCALES if scales is None else scales, block]
            self._writing = tuple(parts)
        return self._writing

    def _append_numpy(self, key, value, T, check_finite):
        for name, x, fmt in ((self._name("key"), key, self.key_dtype), (self._name("value"), value, self.value_dtype)):
            if not _is_float_store(fmt):  # no code for NaN/inf: refused whatever check_finite says
                if x.size and not np.isfinite(max_abs(x)):
                    raise ValueError(f"{name} contains NaN or inf; pass finite values")
            elif check_finite:
                check_finite_array(x, name)
        key, value = self._encode(key, "key"), self._encode(value, "value")
        sink, first, slot0 = self._writes(T)
        n, ring = self.sink_tokens, self.slots - self.sink_tokens
        if first or slot0 + T > self.slots:
            where = slot0 + np.arange(T - first)
            where = np.where(where < self.slots, where, n + (where - n) % ring)
        else:
            where = slice(slot0, slot0 + T)
        targets = [(slice(self._length, self._length + sink), slice(0, sink))] if sink else []
        targets.append((where, slice(first, None)))
        for data, scales, x in ((self._keys, self._key_scales, key), (self._values, self._value_scales, value)):
            for dst, src in targets:
                if scales is None:
                    data[:, :, dst] = x[:, :, src]
                else:
                    data[:, :, dst] = x.data[:, :, src]
                    scales[:, :, dst] = x.scales[:, :, src]

    def __repr__(self):
        sinks = f", sink_tokens={self.sink_tokens}" if self.sink_tokens else ""
        if _same_format(self.key_dtype, self.value_dtype):
            formats = f"dtype={_format_name(self.key_dtype)}"
        else:
            formats = f"key_dtype={_format_name(self.key_dtype)}, value_dtype={_format_name(self.value_dtype)}"
        rotate = f", rotate={self.rotate!r}" if self.rotate else ""
        return (
            f"KVCache(batch={self.batch}, num_kv_heads={self.num_kv_heads}, head_dim={self.head_dim}, "
            f"capacity={self.capacity}, {formats}{rotate}, window={self.window}{sinks}, length={self._length})"
        )


def streaming_mask(query_positions, key_positions, sink_tokens, window):
    """Boolean (L, S): True where the query at ``query_positions[i]`` sees the key at
    ``key_positions[j]``: causal (key ≤ query), and the key is a sink token (position <
    ``sink_tokens``) or inside the window (query - window < key). ``window`` None: causal only."""
    q = np.asarray(query_positions)[:, None]
    k = np.asarray(key_positions)[None, :]
    allowed = k <= q
    if window is not None:
        allowed &= (k < sink_tokens) | (k > q - window)
    return allowed


def alibi_bias(query_positions, key_positions, slopes, dtype):
    """-slope[h]·|query - key| as (H, L, S) in ``dtype``: ALiBi on absolute positions, for keys whose
    positions have gaps (a sink cache), where the kernels' index distance would be wrong."""
    dist = np.abs(np.asarray(query_positions)[:, None] - np.asarray(key_positions)[None, :])
    return (-np.asarray(slopes, np.float64)[:, None, None] * dist).astype(dtype)


def _concat_tokens(a, b):
    """Concatenate two blocks of tokens (axis 2): arrays, or QuantizedTensors with the same block and bits."""
    if isinstance(a, QuantizedTensor):
        return QuantizedTensor._trusted(
            np.concatenate([a.data, b.data], axis=2), np.concatenate([a.scales, b.scales], axis=2), a.block, a.bits
        )
    return np.concatenate([a, b], axis=2)


# (at the end: api imports this module; attend reaches api through the module, not a per-call import)
from . import api as _api  # noqa: E402
